"""What the norm-fusion tests share: parameters that make a wrong fold visible."""

import torch
from torch import nn
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm


def randomize(model: nn.Module, spread: float, seed: int = 0) -> nn.Module:
    """Norm weights `spread`-far from 1 (zero-centred Qwen3-Next norms: from 0), biases from 0,
    linear weights at 1/sqrt(in_features): γ and β that folding drops or misplaces show in the
    output. Returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            for name, p in mod.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen)
                if isinstance(mod, nn.Linear) and name == "weight":
                    value = noise / mod.in_features ** 0.5
                elif name == "bias" or isinstance(mod, Qwen3NextRMSNorm):
                    value = spread * noise
                elif "norm" in type(mod).__name__.lower():
                    value = 1.0 + spread * noise
                else:
                    continue
                p.copy_(value.to(p.dtype))
    return model.eval()
