"""Small built-in transformer models in plain torch, for q3n's tests and before/after comparisons.

Four families, each written the way Hugging Face's "eager" implementation writes it, so that what
q3n's passes meet here is what they meet in a real Hugging Face model:

- ``qwen3``: decoder-only; RMSNorm written out (float32 statistics, ``rsqrt``), q/k/v/o projections
  without bias, per-head ``q_norm``/``k_norm`` RMSNorm, rotary embeddings (``rotate_half`` form),
  grouped-query attention with ``repeat_kv`` (``expand`` + ``reshape``), attention written out
  (``q @ k^T * scaling``, additive causal mask, float32 softmax cast back, dropout with p=0,
  ``@ v``), SwiGLU MLP, final norm, ``lm_head``. ``forward(input_ids) -> logits [B, S, vocab]``.
- ``llama``: the same without ``q_norm``/``k_norm``.
- ``gpt2``: pre-norm LayerNorm, one fused ``c_attn`` linear (q, k, v with bias) split in three,
  learned positions, GELU written out in its tanh form (HF's ``NewGELUActivation``), causal mask,
  multi-head attention (no GQA). ``forward(input_ids) -> logits [B, S, vocab]``.
- ``bert``: post-norm encoder (LayerNorm after each residual add), embeddings LayerNorm, padding
  mask from ``attention_mask`` [B, S] of 1/0 turned additive, exact (erf) GELU MLP.
  ``forward(input_ids, attention_mask=None, token_type_ids=None) -> last hidden state [B, S, H]``.

Guarantees:

- :func:`build_model` returns the model in eval mode, on ``device``, in ``dtype``. Its weights are a
  function of ``(name, size, seed)`` only: they are drawn in float32 on the CPU from a generator
  seeded with ``seed`` and then rounded to ``dtype`` and moved, so the same seed gives the same
  weights on every device, and a bfloat16 model is the float64 model's weights rounded. (The rotary
  ``inv_freq`` buffer stays float32, as Hugging Face keeps it.)
- Weights are not Hugging Face's ``std=0.02`` init: linears are ``N(0, 1/fan_in)``, norm weights
  ``1 + N(0, 0.1)`` (so folding a norm's weight into a linear is visible), biases small but
  non-zero. Activations then stay near unit scale at any width, and attention is far from uniform,
  which is what a test of an attention kernel needs.
- Everything traces with Dynamo, ``dynamic=True`` included: no data-dependent Python control flow;
  sizes are read from tensors, never turned into Python ints by the model.
- Masked positions get ``torch.finfo(dtype).min`` added, so they receive exactly zero weight: a
  padded token cannot change an unpadded position's output, a later token cannot change an
  earlier position's logits.

KV cache (decoder families: qwen3, llama, gpt2). Called as ``model(input_ids)`` a decoder runs a
full forward over ``input_ids`` (prefill, no cache), exactly as before. Called as
``model(input_ids, kv_cache=cache, cache_position=pos)`` it uses a *static* cache, as transformers'
``StaticCache`` does: :func:`new_kv_cache` allocates per layer a key and a value tensor
``[B, kv_heads, max_len, head_dim]``; each call writes its keys/values at ``cache_position``
(a LongTensor ``[S]`` of absolute positions, default ``arange(S)``) with ``index_copy_`` and attends
over all ``max_len`` slots, slots after a query's position masked out. Positions are tensors, so a
compiled model does not recompile as decoding advances: decode steps (S = 1) share one graph. The
cache tensors are call arguments, not module buffers, so a backend never mistakes them for weights.

``qwen3-next`` (in :data:`HF_MODEL_NAMES`) is transformers' ``Qwen3NextForCausalLM`` with a small
random config; :func:`build_model` builds it through :mod:`q3n_compile.hf_models` (transformers is
imported only then). It returns logits like the other decoders but has no ``kv_cache`` argument.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

__all__ = [
    "MODEL_NAMES",
    "HF_MODEL_NAMES",
    "DECODER_NAMES",
    "SIZES",
    "KVCache",
    "new_kv_cache",
    "ModelConfig",
    "get_config",
    "build_model",
    "example_inputs",
    "Qwen3Model",
    "GPT2Model",
    "BertModel",
]

# The four plain-torch families (each with a ModelConfig).
MODEL_NAMES: tuple[str, ...] = ("qwen3", "llama", "gpt2", "bert")
# Built-in families that are transformers models with a small random config (built lazily).
HF_MODEL_NAMES: tuple[str, ...] = ("qwen3-next",)
# Families that take ``kv_cache=`` / ``cache_position=`` (see new_kv_cache).
DECODER_NAMES: tuple[str, ...] = ("qwen3", "llama", "gpt2")
SIZES: tuple[str, ...] = ("tiny", "bench")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shape of one model; one type for all four families (fields a family ignores are unused).

    ``num_kv_heads < num_heads`` means grouped-query attention (qwen3/llama only).
    ``max_position`` bounds the sequence length of the families with learned positions
    (gpt2, bert); the rotary families accept any length.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position: int = 4096
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    type_vocab_size: int = 2


def _check(kind: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown model {kind} {value!r}; valid {kind}s: {', '.join(valid)}")


def get_config(name: str, size: str = "tiny") -> ModelConfig:
    """The :class:`ModelConfig` that :func:`build_model` uses for ``(name, size)``.

    Only the plain-torch families; ``qwen3-next``'s transformers config comes from
    :func:`q3n_compile.hf_models.qwen3_next_config`.
    """
    if name in HF_MODEL_NAMES:
        raise ValueError(f"{name!r} is a transformers model with no ModelConfig; "
                         "use q3n_compile.hf_models.qwen3_next_config(size)")
    _check("name", name, MODEL_NAMES)
    _check("size", size, SIZES)
    if name in ("qwen3", "llama"):
        eps = 1e-6 if name == "qwen3" else 1e-5
        theta = 1_000_000.0 if name == "qwen3" else 500_000.0
        if size == "tiny":
            return ModelConfig(name, vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=16, intermediate_size=128,
                               norm_eps=eps, rope_theta=theta)
        # Qwen3-8B / Llama-3-8B widths, 4 layers (the baseline DESIGN.md measured).
        return ModelConfig(name, vocab_size=32000, hidden_size=4096, num_layers=4, num_heads=32,
                           num_kv_heads=8, head_dim=128, intermediate_size=12288,
                           max_position=32768, norm_eps=eps, rope_theta=theta)
    # gpt2 / bert: multi-head attention, learned positions, LayerNorm (eps 1e-5 / 1e-12 as in HF).
    eps = 1e-5 if name == "gpt2" else 1e-12
    if size == "tiny":
        return ModelConfig(name, vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=4, head_dim=16, intermediate_size=256,
                           max_position=4096, norm_eps=eps)
    return ModelConfig(name, vocab_size=32000, hidden_size=2048, num_layers=4, num_heads=16,
                       num_kv_heads=16, head_dim=128, intermediate_size=8192,
                       max_position=16384, norm_eps=eps)


# --------------------------------------------------------------------------------------------
# Shared pieces, written as in transformers' modeling_qwen3.py / modeling_llama.py
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.attention_scaling = 1.0
        self.register_buffer("inv_freq", self._inv_freq(torch.device("cpu")), persistent=False)

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        dim = self.head_dim
        return 1.0 / (self.base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device)
                                    .to(torch.float32) / dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        # float32 on purpose: cos/sin of large positions lose their meaning in bf16.
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
        position_ids_expanded = position_ids[:, None, :].float()
        freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, kv_heads, S, D] -> [B, kv_heads * n_rep, S, D], as HF writes it (expand + reshape)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def causal_mask(seq_len, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask [1, 1, S, S]: 0 where key <= query, finfo(dtype).min elsewhere.

    Built as transformers' ``eager_mask`` builds it: a boolean mask, then ``torch.where``.
    """
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    min_dtype = torch.finfo(dtype).min
    mask = torch.where(allowed, torch.tensor(0.0, device=device, dtype=dtype), min_dtype)
    return mask[None, None, :, :]


def cache_causal_mask(cache_position: torch.Tensor, max_len, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, S, max_len] for a static cache: query at absolute position
    ``cache_position[i]`` sees cache slots ``0 .. cache_position[i]``; later slots get finfo.min."""
    slots = torch.arange(max_len, device=cache_position.device)
    allowed = slots[None, :] <= cache_position[:, None]
    min_dtype = torch.finfo(dtype).min
    mask = torch.where(allowed, torch.tensor(0.0, device=cache_position.device, dtype=dtype), min_dtype)
    return mask[None, None, :, :]


@dataclasses.dataclass
class KVCache:
    """A static KV cache for the decoder families: per layer ``[B, kv_heads, max_len, head_dim]``.

    Pass it as ``model(input_ids, kv_cache=cache, cache_position=positions)``; the model writes the
    new keys/values in place. Build it with :func:`new_kv_cache`.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def reset(self) -> None:
        for t in (*self.keys, *self.values):
            t.zero_()


def new_kv_cache(model: nn.Module, batch: int, max_len: int, *, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> KVCache:
    """An empty (zeroed) :class:`KVCache` for ``model`` (qwen3, llama or gpt2 from :func:`build_model`).

    ``dtype`` and ``device`` default to the model's. For gpt2 ``max_len`` is bounded by its learned
    positions (``config.max_position``).
    """
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig) or config.family not in DECODER_NAMES:
        raise ValueError(f"new_kv_cache: only the built-in decoders ({', '.join(DECODER_NAMES)}) have a KV cache")
    if batch < 1 or max_len < 1:
        raise ValueError(f"batch and max_len must be >= 1, got batch={batch}, max_len={max_len}")
    if config.family == "gpt2" and max_len > config.max_position:
        raise ValueError(f"gpt2 has learned positions for at most {config.max_position} tokens, got max_len={max_len}")
    param = next(model.parameters())
    dtype = dtype or param.dtype
    device = param.device if device is None else torch.device(device)
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    cache = KVCache(
        keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
        values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
    )
    # As transformers' StaticCache does: the cache never moves, so CUDA graphs (Inductor's
    # reduce-overhead, q3n's cuda_graphs) may write it in place instead of refusing mutated inputs.
    for t in cache.keys + cache.values:
        torch._dynamo.mark_static_address(t)
    return cache


def _cache_position(input_ids: torch.Tensor, cache_position: torch.Tensor | None) -> torch.Tensor:
    if cache_position is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device)
    return cache_position


def padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] of 1 (attend) / 0 (padding) -> additive [B, 1, 1, S], as BERT's extended mask."""
    extended = attention_mask[:, None, None, :].to(dtype=dtype)
    return (1.0 - extended) * torch.finfo(dtype).min


def eager_attention_forward(module: nn.Module, query, key, value, attention_mask, scaling: float,
                            dropout: float = 0.0):
    """transformers' ``eager_attention_forward`` (Llama/Qwen3), unchanged in form."""
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        causal = attention_mask[:, :, :, : key_states.shape[-2]]
        attn_weights = attn_weights + causal

    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


# --------------------------------------------------------------------------------------------
# qwen3 / llama
# --------------------------------------------------------------------------------------------


class Qwen3Attention(nn.Module):
    def __init__(self, config: ModelConfig, qk_norm: bool):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_heads // config.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = 0.0
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, config.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_heads * d, h, bias=False)
        # Qwen3 normalises each head of q and k (over head_dim) before rotary; Llama does not.
        self.q_norm = RMSNorm(d, eps=config.norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(d, eps=config.norm_eps) if qk_norm else None

    def forward(self, hidden_states, position_embeddings, attention_mask, kv=None, cache_position=None):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        if self.q_norm is not None:
            query_states = self.q_norm(query_states)
            key_states = self.k_norm(key_states)
        query_states = query_states.transpose(1, 2)
        key_states = key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if kv is not None:
            # Static cache, as transformers' StaticLayer.update: write in place, attend over it all.
            key_states = kv[0].index_copy_(2, cache_position, key_states)
            value_states = kv[1].index_copy_(2, cache_position, value_states)

        attn_output, _ = eager_attention_forward(
            self, query_states, key_states, value_states, attention_mask,
            scaling=self.scaling, dropout=0.0 if not self.training else self.attention_dropout,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output)


class SwiGLUMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, qk_norm: bool):
        super().__init__()
        self.self_attn = Qwen3Attention(config, qk_norm)
        self.mlp = SwiGLUMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask, kv=None, cache_position=None):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.self_attn(hidden_states, position_embeddings, attention_mask, kv, cache_position)
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class Qwen3Model(nn.Module):
    """qwen3 (``qk_norm=True``) or llama (``qk_norm=False``): ``forward(input_ids) -> logits``;
    ``forward(input_ids, kv_cache, cache_position)`` with a static cache (module docstring)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        qk_norm = config.family == "qwen3"
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, qk_norm) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None,
                cache_position: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        if kv_cache is None:
            seq_len = input_ids.shape[1]
            position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
            position_embeddings = self.rotary_emb(hidden_states, position_ids)
            mask = causal_mask(seq_len, hidden_states.dtype, hidden_states.device)
            for layer in self.layers:
                hidden_states = layer(hidden_states, position_embeddings, mask)
        else:
            cache_position = _cache_position(input_ids, cache_position)
            position_embeddings = self.rotary_emb(hidden_states, cache_position.unsqueeze(0))
            mask = cache_causal_mask(cache_position, kv_cache.keys[0].shape[2], hidden_states.dtype)
            for i, layer in enumerate(self.layers):
                kv = (kv_cache.keys[i], kv_cache.values[i])
                hidden_states = layer(hidden_states, position_embeddings, mask, kv, cache_position)
        hidden_states = self.norm(hidden_states)
        return self.lm_head(hidden_states)


# --------------------------------------------------------------------------------------------
# gpt2 (as modeling_gpt2.py, with nn.Linear where HF has its transposed Conv1D)
# --------------------------------------------------------------------------------------------


class NewGELUActivation(nn.Module):
    """GELU, tanh approximation, written out as transformers' ``NewGELUActivation`` (GPT-2's)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return 0.5 * input * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * torch.pow(input, 3.0))))


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.split_size = config.num_heads * config.head_dim
        self.scaling = self.head_dim**-0.5
        self.c_attn = nn.Linear(self.embed_dim, 3 * self.split_size)
        self.c_proj = nn.Linear(self.split_size, self.embed_dim)

    def forward(self, hidden_states, attention_mask, kv=None, cache_position=None):
        query_states, key_states, value_states = self.c_attn(hidden_states).split(self.split_size, dim=2)
        shape_kv = (*key_states.shape[:-1], -1, self.head_dim)
        key_states = key_states.view(shape_kv).transpose(1, 2)
        value_states = value_states.view(shape_kv).transpose(1, 2)
        shape_q = (*query_states.shape[:-1], -1, self.head_dim)
        query_states = query_states.view(shape_q).transpose(1, 2)
        if kv is not None:
            key_states = kv[0].index_copy_(2, cache_position, key_states)
            value_states = kv[1].index_copy_(2, cache_position, value_states)

        attn_weights = torch.matmul(query_states, key_states.transpose(-1, -2)) * self.scaling
        attn_weights = attn_weights + attention_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_weights = attn_weights.type(value_states.dtype)
        attn_weights = nn.functional.dropout(attn_weights, p=0.0, training=self.training)
        attn_output = torch.matmul(attn_weights, value_states)
        attn_output = attn_output.transpose(1, 2)

        attn_output = attn_output.reshape(*attn_output.shape[:-2], -1).contiguous()
        return self.c_proj(attn_output)


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = NewGELUActivation()

    def forward(self, hidden_states):
        return self.c_proj(self.act(self.c_fc(hidden_states)))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden_states, attention_mask, kv=None, cache_position=None):
        residual = hidden_states
        hidden_states = self.attn(self.ln_1(hidden_states), attention_mask, kv, cache_position)
        hidden_states = hidden_states + residual
        residual = hidden_states
        hidden_states = self.mlp(self.ln_2(hidden_states))
        return residual + hidden_states


class GPT2Model(nn.Module):
    """gpt2: ``forward(input_ids) -> logits [B, S, vocab]``; S at most ``config.max_position``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None,
                cache_position: torch.Tensor | None = None) -> torch.Tensor:
        if kv_cache is None:
            seq_len = input_ids.shape[1]
            position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
            hidden_states = self.wte(input_ids) + self.wpe(position_ids)
            mask = causal_mask(seq_len, hidden_states.dtype, hidden_states.device)
            for block in self.h:
                hidden_states = block(hidden_states, mask)
        else:
            cache_position = _cache_position(input_ids, cache_position)
            hidden_states = self.wte(input_ids) + self.wpe(cache_position.unsqueeze(0))
            mask = cache_causal_mask(cache_position, kv_cache.keys[0].shape[2], hidden_states.dtype)
            for i, block in enumerate(self.h):
                hidden_states = block(hidden_states, mask, (kv_cache.keys[i], kv_cache.values[i]), cache_position)
        return self.lm_head(self.ln_f(hidden_states))


# --------------------------------------------------------------------------------------------
# bert (as modeling_bert.py)
# --------------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, input_ids, token_type_ids):
        seq_len = input_ids.shape[1]
        position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0)
        embeddings = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
                      + self.position_embeddings(position_ids))
        embeddings = self.LayerNorm(embeddings)
        return nn.functional.dropout(embeddings, p=0.0, training=self.training)


class BertSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        inner = config.num_heads * config.head_dim
        self.query = nn.Linear(config.hidden_size, inner)
        self.key = nn.Linear(config.hidden_size, inner)
        self.value = nn.Linear(config.hidden_size, inner)

    def forward(self, hidden_states, attention_mask):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.value(hidden_states).view(hidden_shape).transpose(1, 2)

        attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) * self.scaling
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_weights = nn.functional.dropout(attn_weights, p=0.0, training=self.training)
        attn_output = torch.matmul(attn_weights, value_states)
        attn_output = attn_output.transpose(1, 2).contiguous()
        return attn_output.reshape(*input_shape, -1).contiguous()


class BertResidualOutput(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)``: BERT's post-norm (BertSelfOutput/BertOutput)."""

    def __init__(self, in_features: int, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)

    def forward(self, hidden_states, input_tensor):
        hidden_states = self.dense(hidden_states)
        hidden_states = nn.functional.dropout(hidden_states, p=0.0, training=self.training)
        return self.LayerNorm(hidden_states + input_tensor)


class BertLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = BertSelfAttention(config)
        self.attention_output = BertResidualOutput(config.num_heads * config.head_dim, config)
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output = BertResidualOutput(config.intermediate_size, config)

    def forward(self, hidden_states, attention_mask):
        attention_output = self.attention_output(self.attention(hidden_states, attention_mask), hidden_states)
        intermediate = nn.functional.gelu(self.intermediate(attention_output))
        return self.output(intermediate, attention_output)


class BertModel(nn.Module):
    """bert: ``forward(input_ids, attention_mask=None, token_type_ids=None) -> [B, S, hidden]``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden_states = self.embeddings(input_ids, token_type_ids)
        extended = None if attention_mask is None else padding_mask(attention_mask, hidden_states.dtype)
        for layer in self.layers:
            hidden_states = layer(hidden_states, extended)
        return hidden_states


# --------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------

_MINOR_EMBEDDINGS = ("wpe", "position_embeddings", "token_type_embeddings")
_FAMILIES = {"qwen3": Qwen3Model, "llama": Qwen3Model, "gpt2": GPT2Model, "bert": BertModel}


def _init_weights(model: nn.Module, seed: int, dtype: torch.dtype, device: torch.device) -> None:
    """Fill every parameter from one seeded CPU generator, in ``named_modules`` order.

    Drawing on the CPU in float32 and only then rounding and moving is what makes the weights
    independent of device and dtype. One tensor at a time, so the float32 copy of a bench model
    never exists whole.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for mod_name, mod in model.named_modules():
        for pname, param in mod.named_parameters(recurse=False):
            noise = torch.randn(tuple(param.shape), generator=gen, dtype=torch.float32)
            if isinstance(mod, nn.Linear) and pname == "weight":
                value = noise / math.sqrt(mod.in_features)
            elif isinstance(mod, (RMSNorm, nn.LayerNorm)):
                # Norm weights away from 1 and biases away from 0, so folding them is visible.
                value = 1.0 + 0.1 * noise if pname == "weight" else 0.1 * noise
            elif pname == "bias":
                value = 0.02 * noise
            elif isinstance(mod, nn.Embedding) and mod_name.split(".")[-1] in _MINOR_EMBEDDINGS:
                value = 0.2 * noise  # positions / token types: smaller than the token embedding
            else:
                value = noise  # token embeddings
            with torch.no_grad():
                param.copy_(value.to(dtype=dtype).to(device))


def build_model(name: str, size: str = "tiny", *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """Build model ``name`` (one of :data:`MODEL_NAMES` or :data:`HF_MODEL_NAMES`) at ``size``
    (one of :data:`SIZES`).

    The result is in eval mode, on ``device``, in ``dtype``; its weights depend only on
    ``(name, size, seed)`` (see the module docstring). ``model.config`` is its :class:`ModelConfig`
    (for ``qwen3-next``: a wrapper whose ``forward(input_ids)`` returns logits, ``model.config`` the
    transformers config; needs transformers).
    Raises ``ValueError`` naming an unknown ``name`` or ``size`` and listing the valid ones.
    """
    if name in HF_MODEL_NAMES:
        _check("size", size, SIZES)
        from .hf_models import build_qwen3_next

        return build_qwen3_next(size, dtype=dtype, device=device, seed=seed)
    _check("name", name, MODEL_NAMES + HF_MODEL_NAMES)
    config = get_config(name, size)
    device = torch.device(device)
    # Construct on the meta device: no memory, no default init (a bench model is ~1e9 parameters),
    # then allocate in the target dtype on the target device and fill from our own generator.
    with torch.device("meta"):
        model = _FAMILIES[name](config)
    model = model.to(dtype=dtype).to_empty(device=device)
    _init_weights(model, seed, dtype, device)
    for mod in model.modules():
        if isinstance(mod, RotaryEmbedding):
            mod.inv_freq = mod._inv_freq(device)
    return model.eval()


def example_inputs(name: str, model: nn.Module, batch: int, seq_len: int, *,
                   device: str | torch.device | None = None, seed: int = 0) -> tuple:
    """Positional arguments to call ``model`` (built by :func:`build_model` for ``name``) with.

    qwen3/llama/gpt2: ``(input_ids,)``. bert: ``(input_ids, attention_mask)`` where the last row
    is padded: its last ``max(1, seq_len // 4)`` positions are 0 (when ``seq_len >= 2``).
    Token ids are drawn from a CPU generator seeded with ``seed``, so they too are device-independent.
    ``device`` defaults to the model's device. ``qwen3-next``: ``(input_ids,)`` below its vocabulary.
    """
    _check("name", name, MODEL_NAMES + HF_MODEL_NAMES)
    config = model.config
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch and seq_len must be >= 1, got batch={batch}, seq_len={seq_len}")
    if name in ("gpt2", "bert") and seq_len > config.max_position:
        raise ValueError(f"{name} has learned positions for at most {config.max_position} tokens, "
                         f"got seq_len={seq_len}")
    if device is None:
        device = next(model.parameters()).device
    if name in HF_MODEL_NAMES:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen, dtype=torch.int64)
        return (ids.to(device),)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen, dtype=torch.int64)
    if name != "bert":
        return (input_ids.to(device),)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.int64)
    if seq_len >= 2:
        attention_mask[-1, seq_len - max(1, seq_len // 4):] = 0
    return (input_ids.to(device), attention_mask.to(device))
