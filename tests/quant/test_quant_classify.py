"""Layer classes by module path and, for renamed modules, by graph structure."""

import math

import pytest
import torch
from torch import nn

import q3n_compile
from q3n_compile.quant.classify import classify_path, normalise_path

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")


@pytest.mark.parametrize("raw,path", [
    ("L['self'].layers.0.mlp.up_proj", "layers.0.mlp.up_proj"),
    ("L['self'].layers[0].self_attn", "layers.0.self_attn"),
    ("L['self']._modules['layers']._modules['1'].mlp", "layers.1.mlp"),
    ("getattr(getattr(L['self'].layers, '2'), 'mlp').fc1", "layers.2.mlp.fc1"),
    ("L['model'].lm_head", "lm_head"),
    ("L['self']", ""),
])
def test_normalise_path(raw, path):
    assert normalise_path(raw) == path


@pytest.mark.parametrize("path,cls", [
    ("model.layers.0.self_attn.q_proj", "attn"),
    ("model.layers.0.self_attn.qkv_proj", "attn"),
    ("model.layers.0.self_attn.o_proj", "attn"),
    ("transformer.h.0.attn.c_attn", "attn"),
    ("transformer.h.0.attn.c_proj", "attn"),  # c_proj by its parent...
    ("transformer.h.0.mlp.c_proj", "ffn"),  # ...in both places
    ("bert.encoder.layer.0.attention.self.query", "attn"),
    ("bert.encoder.layer.0.attention.output.dense", "attn"),
    ("bert.encoder.layer.0.intermediate.dense", "ffn"),
    ("bert.encoder.layer.0.output.dense", None),  # names say nothing: structure decides
    ("model.layers.0.mlp.gate_proj", "ffn"),
    ("model.layers.0.mlp.experts.3.down_proj", "ffn"),
    ("model.layers.0.block_sparse_moe.experts.0.w1", "ffn"),
    ("model.layers.0.mlp.gate", "router"),
    ("lm_head", "head"),
    ("block.q_proj", "attn"),
    ("block.fc2", "ffn"),
    ("block.alpha", None),
    (None, None),
])
def test_classify_path(path, cls):
    assert classify_path(path) == cls


class _Renamed(nn.Module):
    """An attention block and a gated MLP whose module names say nothing about their roles."""

    def __init__(self, d=32, heads=2):
        super().__init__()
        self.heads = heads
        self.alpha = nn.Linear(d, d, bias=False)
        self.beta = nn.Linear(d, d, bias=False)
        self.gamma = nn.Linear(d, d, bias=False)
        self.delta = nn.Linear(d, d, bias=False)
        self.one = nn.Linear(d, 64, bias=False)
        self.two = nn.Linear(d, 64, bias=False)
        self.three = nn.Linear(64, d, bias=True)
        self.fuse = nn.Linear(d, 3 * d)  # fused q/k/v, split below
        self.out = nn.Linear(d, d)

    def _attend(self, q, k, v):
        B, S, D = q.shape
        h = self.heads
        q, k, v = (t.view(B, S, h, D // h).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // h), dim=-1)
        return (w @ v).transpose(1, 2).reshape(B, S, D)

    def forward(self, x):
        x = x + self.delta(self._attend(self.alpha(x), self.beta(x), self.gamma(x)))
        x = x + self.three(nn.functional.silu(self.one(x)) * self.two(x))
        q, k, v = self.fuse(x).split(x.shape[-1], dim=-1)
        return x + self.out(self._attend(q, k, v))


def test_renamed_modules_classify_by_structure():
    torch.manual_seed(0)
    model = _Renamed().eval()
    x = torch.randn(2, 5, 32)
    cfg = {"attn_layers": {"weight_bits": 8}, "ffn_layers": {"weight_bits": 4},
           "calibration": {"method": "rtn"}}
    with torch.no_grad():
        torch.compile(model, backend="q3n", options={"quant_config": cfg, "norm_fusion": False,
                                                     "attention": "off"})(x)
    layers = {e["layer"]: e for e in q3n_compile.reports()[-1]["passes"]["quantize"]["detail"]["layers"]}
    want = {"alpha": "attn", "beta": "attn", "gamma": "attn", "delta": "attn", "one": "ffn",
            "two": "ffn", "three": "ffn", "fuse": "attn", "out": "attn"}
    assert {k: v["class"] for k, v in layers.items()} == want
    assert all(v["classified_by"] == "structure" for v in layers.values())
    assert layers["three"]["weight_bits"] == 4 and layers["alpha"]["weight_bits"] == 8
