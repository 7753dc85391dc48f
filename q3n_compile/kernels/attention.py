"""``q3n::attention``: tiled (FlashAttention-2 style) scaled-dot-product attention, forward only.

What this module guarantees:

- ``torch.ops.q3n.attention(q, k, v, mask=None, scale=None, is_causal=False)`` computes
  ``softmax(q @ k^T * scale + mask) @ v`` with the semantics of
  ``torch.nn.functional.scaled_dot_product_attention`` (``scale`` defaults to ``1/sqrt(D)``), for
  q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, v ``[B, Hkv, Sk, Dv]``, output ``[B, Hq, Sq, Dv]`` in
  q's dtype. Grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hkv)``; K and V
  are never repeated in memory.
- ``bshd_out=True`` (the op's last argument) returns the same values as a contiguous
  ``[B, Sq, Hq, Dv]`` tensor: the kernels store each row at its place in that layout, so the
  ``transpose(1, 2).reshape(B, Sq, Hq * Dv)`` that feeds the output projection is a view, not a
  copy (the attention pass asks for it where the replaced value was laid out that way, as CUDA
  SDPA's fused outputs are).
- ``mask`` is None, a bool mask (True = keep) or an additive float mask, broadcastable to
  ``[B, Hq, Sq, Sk]``; it is read through stride-0 views, never expanded in memory.
  ``is_causal`` is top-left aligned (query ``i`` sees keys ``j <= i``), as in SDPA; given together
  with a mask, both apply (torch's CPU SDPA does the same; its CUDA backends refuse the pair).
- Fully masked rows (every key removed by the mask) give **0**, which is what torch's SDPA gives
  for them on CPU (math and fused kernels). A row whose additive mask is a large finite negative
  everywhere (HF's ``finfo.min``) is not fully masked: like SDPA it averages V uniformly.
- The kernel, the interpreter and :func:`reference` agree up to the rounding the kernel's
  docstring states; nothing here allocates an ``Sq x Sk`` matrix except :func:`reference`.
- Two kernels serve the op, chosen per call from the concrete shapes (so a dynamic-shape graph
  never recompiles for it): ``Sq <= 16`` (decode, speculative drafts) runs the split-KV kernels
  of ``attention_decode`` (:func:`uses_split_kv`); longer queries run the prefill kernel below,
  with tiles from the length-bucketed table of ``attention_blocks`` (:func:`choose_blocks`).
  :func:`describe_blocks` says, JSON-serialisably, what both will choose.
- The prefill kernel has an opt-in Hopper variant (TMA loads through in-kernel tensor
  descriptors), asked for by the launch parameters' ``tma`` key and off in every table entry, so
  the op's default launches are the pointer kernel's, unchanged. Asked for where it cannot run
  (strides or pointers off the 16-byte rules, a GPU older than sm_90), the call runs the pointer
  kernel instead: same result, no error. :func:`prefill_variant` says which one a call runs and
  why. Measured on an H200 (torch 2.11, Triton 3.6, bf16, D 64/128, S 1k/4k/16k, causal and
  not; 2026-11-29) it is correct but runs at 0.79-1.00x the pointer kernel's TFLOP/s, so no table
  entry uses it. A warp-specialised key loop (``warp_specialize``) gave NaN on 11 of those 12
  shapes and was removed; asking for it raises ``ValueError``.
- Host cost: what a call needs besides its tensors' data (the ``supports`` verdict, decode plan
  or prefill tiles, grids, scalar arguments, constexprs, the 64-bit offsets rule) depends only on
  its signature (shapes, strides, dtypes, device, mask, scale, flags) and is computed once per
  signature into a cached plan; a call then allocates its output (and the decode workspace) and
  launches through ``contract.TritonLaunch``. A decode call costs ~18 µs of Python in this module
  (measured on a CPU with launches stubbed; ~130 µs before), plus the dispatcher's round trip
  into Python (16-17 µs a call on a CPU below the autograd keys, as compiled inference graphs
  call it; 34-36 µs with them; :func:`q3n_compile.kernels.contract.register_kernel_op`).
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from q3n_compile.kernels import attention_blocks, attention_decode, contract
from q3n_compile.kernels.tiles import load_2d as _load_2d
from q3n_compile.kernels.attention_decode import DECODE_MAX_SQ, uses_split_kv  # noqa: F401

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MASK_DTYPES = (torch.bool, torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


@triton.jit
def _attn_inner(acc, l_i, m_i, q, k_src, v_src, m_ptrs, offs_m, row_ok, offs_n0,
                offs_dk, dk_ok, offs_dv, dv_ok, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_mn, Sk, qk_scale, lo, hi,
                BLOCK_N: tl.constexpr, EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr,
                MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, BOUNDARY: tl.constexpr,
                DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, TMA: tl.constexpr):
    # k_src/v_src: tensor descriptors of this (batch, kv head)'s [Sk, D] K and V when TMA, else
    # base pointers.
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Sk
        if TMA:
            # Rows past Sk and columns past D come back as zeros (the descriptor's padding), as
            # the pointer path's `other=0` gives them.
            k = k_src.load([start_n, 0])
        else:
            k = _load_2d(k_src + offs_n[:, None] * stride_kn + offs_dk[None, :] * stride_kd,
                         n_ok, dk_ok, BOUNDARY, not EVEN_DK)
        if DOT_IN_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASK_KIND == 1:
            keep = tl.load(m_ptrs + offs_n[None, :] * stride_mn,
                           mask=row_ok[:, None] & n_ok[None, :], other=0)
            s = tl.where(keep != 0, s, float("-inf"))
        elif MASK_KIND == 2:
            add = tl.load(m_ptrs + offs_n[None, :] * stride_mn,
                          mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            # finfo.min * log2(e) would overflow to -inf and turn HF's "masked" rows into fully
            # masked ones (0 instead of SDPA's uniform average); a true -inf stays -inf.
            add = tl.where(add == float("-inf"), add, tl.maximum(add * 1.4426950408889634,
                                                                 -3.4028234663852886e38))
            s = s + add
        if BOUNDARY:
            valid = n_ok[None, :]
            if IS_CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
        if MASK_KIND != 0:
            # A row with no key left so far has m_new = -inf; exp2(-inf - -inf) would be NaN.
            # m_i itself stays -inf so a later block's (maybe very negative) max is taken as is.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = v_src.load([start_n, 0])
        else:
            v = _load_2d(v_src + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                         n_ok, dv_ok, BOUNDARY, not EVEN_DV)
        p = p.to(v.dtype)
        if DOT_IN_FP32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attention_fwd_kernel(
    Q, K, V, M, O,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    Sq, Sk, qk_scale,
    GROUP: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr, TMA: tl.constexpr,
):
    """One program computes O for BLOCK_M query rows of one (batch, query head).

    Math: with c = scale * log2(e) (the factor exp -> exp2 folded into the scale),
    for each key block n: s = c * q k_n^T (+ log2(e) * mask, or -inf where a bool mask/causality/
    the Sk tail removes a key); m' = max(m, rowmax s); p = exp2(s - m'); l = l * exp2(m - m') +
    rowsum p; acc = acc * exp2(m - m') + p v_n. Finally O = acc / l (0 where l = 0: fully masked).
    m, l, acc and both products' accumulation are fp32; p is rounded to V's dtype for the second
    product (fp16/bf16: ~2^-11 / 2^-8 relative per weight, as in FlashAttention-2); fp32 inputs use
    IEEE fp32 products (no TF32). O is rounded once to q's dtype. DOT_IN_FP32 (interpreter, bf16
    only) widens the bf16 operands to fp32 before each product: same values, exact products.

    Causal: key blocks entirely above the diagonal are never visited; the causal and Sk-tail
    predicates are applied only to the last (diagonal/tail) blocks, the others run unmasked.

    Hopper variant (off unless the launcher asks): TMA loads Q, K and V tiles through tensor
    descriptors made in the kernel, whose zero padding past Sq, Sk and D gives the values the
    pointer loads' `other=0` gives, so the math and its rounding are unchanged (bit-identical on
    the interpreter). Same traffic. On an H200 (Triton 3.6) it measured 0.79-1.00x the pointer
    loads' TFLOP/s, so no table entry turns it on.

    Traffic (bytes, e = element size, GROUP = Hq / Hkv): reads Q once, B*Hq*Sq*D*e; reads K and V
    once per query block, B*Hq*ceil(Sq/BLOCK_M)*Sk*(D+Dv)*e (about half with causal), of which the
    GROUP heads sharing a kv head and the query blocks of one head mostly hit L2, so HBM sees about
    B*Hkv*Sk*(D+Dv)*e; reads a mask tile per (row block, key block) actually used (up to
    B*Hq*Sq*Sk*e_mask, less with broadcast dims); writes O once, B*Hq*Sq*Dv*e.
    FLOPs: 2*B*Hq*Sq*Sk*(D+Dv) = 4*B*Hq*Sq*Sk*D for Dv = D, halved for causal (Sq = Sk).
    """
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    off_hkv = off_h // GROUP
    start_m = tl.program_id(0) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    if OFFSETS_64:
        # Row/key offsets times strides pass 2^31 (long contexts, wide layouts, [S, S] masks).
        # int32 everywhere else: 64-bit tile offsets cost ~15% at D = 128.
        offs_m = offs_m.to(tl.int64)
        offs_n0 = offs_n0.to(tl.int64)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Sq
    dk_ok = offs_dk < HEAD_DK
    dv_ok = offs_dv < HEAD_DV
    EVEN_DK: tl.constexpr = BLOCK_DK == HEAD_DK
    EVEN_DV: tl.constexpr = BLOCK_DV == HEAD_DV

    # TMA: one 2-D descriptor per (batch, head) over its [S, D] rows, so any batch/head/row
    # strides work (the launcher checked the 16-byte rules) and the row and head-dim tails are
    # zero-padded by the descriptor instead of predicated. Built in the kernel (global scratch
    # from triton.set_allocator): a launch passes the same pointers as the pointer kernel's.
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    if TMA:
        q_desc = tl.make_tensor_descriptor(q_base, shape=[Sq, HEAD_DK], strides=[stride_qm, 1],
                                           block_shape=[BLOCK_M, BLOCK_DK])
        q = q_desc.load([start_m, 0])
    else:
        q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_dk[None, :] * stride_qd
        q = _load_2d(q_ptrs, row_ok, dk_ok, True, not EVEN_DK)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    k_src = K + off_b * stride_kb + off_hkv * stride_kh
    v_src = V + off_b * stride_vb + off_hkv * stride_vh
    if TMA:
        k_src = tl.make_tensor_descriptor(k_src, shape=[Sk, HEAD_DK], strides=[stride_kn, 1],
                                          block_shape=[BLOCK_N, BLOCK_DK])
        v_src = tl.make_tensor_descriptor(v_src, shape=[Sk, HEAD_DV], strides=[stride_vn, 1],
                                          block_shape=[BLOCK_N, BLOCK_DV])
    m_ptrs = M + off_b * stride_mb + off_h * stride_mh + offs_m[:, None] * stride_mm

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # [0, lo): whole key blocks every row of this tile sees; [lo, hi): diagonal and tail blocks.
    lo = (Sk // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        lo = tl.minimum(lo, ((start_m + 1) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(Sk, start_m + BLOCK_M)
    else:
        hi = Sk
    acc, l_i, m_i = _attn_inner(
        acc, l_i, m_i, q, k_src, v_src, m_ptrs, offs_m, row_ok, offs_n0, offs_dk, dk_ok,
        offs_dv, dv_ok, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, Sk, qk_scale,
        0, lo, BLOCK_N, EVEN_DK, EVEN_DV, MASK_KIND, IS_CAUSAL, False, DOT_PRECISION,
        DOT_IN_FP32, TMA)
    acc, l_i, m_i = _attn_inner(
        acc, l_i, m_i, q, k_src, v_src, m_ptrs, offs_m, row_ok, offs_n0, offs_dk, dk_ok,
        offs_dv, dv_ok, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, Sk, qk_scale,
        lo, hi, BLOCK_N, EVEN_DK, EVEN_DV, MASK_KIND, IS_CAUSAL, True, DOT_PRECISION,
        DOT_IN_FP32, TMA)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = (O + off_b * stride_ob + off_h * stride_oh
              + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)
    if EVEN_DV:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


_pow2_at_least_16 = attention_blocks.pow2_at_least_16
_cdiv = attention_blocks.cdiv


def choose_blocks(seq_len_q: int, seq_len_k: int, head_dim: int, dtype: torch.dtype,
                  causal: bool, *, interpreter: bool = False, arch: Optional[int] = None,
                  device: Optional[int] = None) -> dict:
    """Prefill launch parameters for one call: see ``attention_blocks.choose_blocks`` (a
    length-bucketed table per head dim, dtype, causality and GPU architecture; autotuned once
    per bucket on an untabled GPU; 16 x 16 tiles under the interpreter)."""
    return attention_blocks.choose_blocks(seq_len_q, seq_len_k, head_dim, dtype, causal,
                                          interpreter=interpreter, arch=arch, device=device)


def _arch_for_description(arch):
    if arch is not None:
        return arch
    if torch.cuda.is_available():
        return attention_blocks.device_arch(torch.cuda.current_device())
    return "interpreter" if contract.interpreter_enabled() else "reference"


def describe_blocks(head_dim: int, dtype: torch.dtype, causal: bool, arch=None, *,
                    symbol: str = "Sk") -> dict:
    """What the op will launch for this head dim, dtype and causality, as a JSON-serialisable
    dict for reports: the prefill buckets (``bucket_expr``/``block_n_expr`` are sympy-printable
    ``Piecewise`` expressions of the key length, named ``symbol``) and the decode dispatch.

    ``arch``: a compute capability major (9 = Hopper), ``"interpreter"`` or ``"reference"``;
    by default the current CUDA device's, else what this machine's CPU path runs.
    """
    arch = _arch_for_description(arch)
    desc = attention_blocks.describe_prefill(head_dim, dtype, causal, arch, symbol=symbol)
    if isinstance(arch, int):
        desc["with_mask"] = ("fewer pipeline stages, then narrower key tiles, where a mask tile per "
                             "stage would not fit shared memory (attention_blocks.fit_shared_memory)")
    desc["decode"] = attention_decode.describe(head_dim, dtype, arch)
    return desc


def _needs_64bit_offsets(q, k, v, m, out, cfg) -> bool:
    """Whether a row or key offset times its stride (padded to whole tiles) can pass int32.

    Batch and head offsets are always int64 in the kernel; this covers the rest.
    """
    pad_m = _cdiv(q.shape[2], cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    pad_n = _cdiv(k.shape[2], cfg["BLOCK_N"]) * cfg["BLOCK_N"]
    spans = [pad_m * q.stride(2) + q.shape[3] * q.stride(3),
             pad_m * out.stride(2) + out.shape[3] * out.stride(3),
             pad_n * k.stride(2) + k.shape[3] * k.stride(3),
             pad_n * v.stride(2) + v.shape[3] * v.stride(3),
             pad_m * m.stride(2) + pad_n * m.stride(3) if m is not q else 0]
    return max(spans) >= 2**31


def _mask_view(mask, B, Hq, Sq, Sk):
    """(kind, [B, Hq, Sq, Sk] view) of the mask: kind 0 none, 1 bool (read as uint8), 2 additive."""
    if mask is None:
        return 0, None
    kind = 1 if mask.dtype == torch.bool else 2
    # Same-size reinterpretation keeps the strides; expand only writes 0 strides.
    return kind, (mask.view(torch.uint8) if kind == 1 else mask).expand(B, Hq, Sq, Sk)


# ---------------------------------------------------------------------------------------------
# The prefill kernel's Hopper variant: TMA loads
#
# Opt-in per launch through an optional key of the launch parameters, ``tma``
# (``_launch(blocks=...)``, the benchmark's ``--hopper-variants``; a table entry could carry it
# too). What it changes: Q, K and V tiles come through in-kernel tensor descriptors (on sm_90+
# the TMA unit copies them to shared memory; tails are zero-padded by the descriptor) instead of
# predicated pointer loads.
# The mask (bool or additive), causality, GQA and the output store are the pointer kernel's, so
# every case the op supports is served. When the inputs break a descriptor rule (unit last
# stride, 16-byte aligned base pointers and strides, tiles <= 256 per dimension) or the GPU is
# older than sm_90, the call runs the pointer kernel instead, silently and with its exact result.
# `prefill_variant` says which kernel a call runs and why.
# Measured on an H200 (2026-11-29, torch 2.11, Triton 3.6, bench_attention.py --hopper-variants,
# bf16, D 64/128, S 1k/4k/16k, causal and not): correct, 0.79-1.00x the pointer kernel's
# TFLOP/s with the table's tiles, so no table entry uses it; it stays forcible for future
# measurements. The warp-specialised key loop (``warp_specialize``) gave NaN on 11 of those 12
# shapes and was removed: asking for it raises ValueError (`_WARP_SPEC_REMOVED`).

HOPPER_KEYS = ("tma",)
_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
_TMA_MAX_BOX = 256  # elements per dimension of one TMA copy


_WARP_SPEC_REMOVED = (
    "q3n::attention: the prefill launch parameter warp_specialize was removed: the "
    "warp-specialised key loop computed NaN on an H200 with Triton 3.6 (measured 2026-11-29, "
    "11 of 12 shapes of bench_attention.py --hopper-variants); use tma=True alone")


def _hopper_request(cfg: dict) -> bool:
    """Whether launch parameters ask for TMA; ValueError for unknown keys (a misspelt flag would
    otherwise time the default kernel under the variant's name) and for the removed
    ``warp_specialize`` (a stale script fails loudly instead of timing something else)."""
    if "warp_specialize" in cfg:
        raise ValueError(_WARP_SPEC_REMOVED)
    unknown = set(cfg) - set(_TILE_KEYS) - set(HOPPER_KEYS)
    if unknown:
        raise ValueError(f"q3n::attention: unknown prefill launch parameters {sorted(unknown)}; "
                         f"valid: {', '.join(_TILE_KEYS + HOPPER_KEYS)}")
    return bool(cfg.get("tma", False))


def tma_refusal(q, k, v, cfg: dict, arch: Optional[int]) -> Optional[str]:
    """None if the TMA variant can serve inputs with these shapes and strides, else why not.

    ``arch``: the GPU's compute capability major, None under the interpreter (which runs
    descriptors on any machine). The pointers' own 16-byte alignment can change from call to
    call with the same strides, so it is checked per call (:class:`_HopperLaunch`).
    """
    if arch is not None and arch < 9:
        return f"TMA needs sm_90 or newer, this GPU is sm_{arch}x"
    if max(cfg["BLOCK_M"], cfg["BLOCK_N"]) > _TMA_MAX_BOX:
        return f"tiles over {_TMA_MAX_BOX} rows do not fit one TMA copy"
    if k.shape[2] == 0:
        return "no keys (a descriptor cannot describe an empty tensor)"
    e = q.element_size()
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1 and t.shape[3] != 1:
            return f"{name}'s head dim is strided ({t.stride(3)}), descriptors need stride 1"
        # The descriptor's row stride must be 16-byte aligned even for one row; batch and head
        # strides only move the base pointer, which a size-1 dim never does.
        if (t.stride(2) * e) % 16 or t.stride(2) * e >= 2**40:
            return f"{name}'s row stride ({t.stride(2)} elements) is not a multiple of 16 bytes"
        for dim, what in ((0, "batch"), (1, "head")):
            if t.shape[dim] > 1 and (t.stride(dim) * e) % 16:
                return (f"{name}'s {what} stride ({t.stride(dim)} elements) is not a multiple "
                        "of 16 bytes")
    return None


def _misaligned(q, k, v) -> bool:
    return bool((q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15)


class _HopperLaunch:
    """The TMA launch of a plan, with the pointer launch for calls whose tensors start off a
    16-byte boundary (views with an odd storage offset); same call signature as TritonLaunch."""

    __slots__ = ("hopper", "pointer", "cuda")

    def __init__(self, hopper, pointer, *, cuda: bool):
        self.hopper, self.pointer, self.cuda = hopper, pointer, cuda

    def __call__(self, q, k, v, m, out):
        if _misaligned(q, k, v):
            self.pointer(q, k, v, m, out)
            return
        if self.cuda:
            _ensure_scratch_allocator()
        self.hopper(q, k, v, m, out)


# The in-kernel descriptors' global scratch (shared with the i8 path's TMA tile).
_scratch = contract.descriptor_scratch
_ensure_scratch_allocator = contract.ensure_descriptor_allocator


def prefill_variant(q, k, v, mask=None, scale=None, is_causal=False, *, blocks=None) -> dict:
    """Which prefill kernel a call with these arguments runs: ``{"tma": bool, "fallback": None
    or why the requested TMA variant is not used}``
    (None for a call that runs no prefill kernel: decode, or an empty output). ``blocks`` as
    for ``_launch``; the tensors' alignment is checked as a call would."""
    backend = contract.backend_for(q.device)
    if backend == "reference":
        return None
    interpreter = backend == "interpreter"
    key = _plan_key(q, k, v, mask, scale, is_causal, interpreter, blocks, None)
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        plan = _Plan(q, k, v, mask, scale, is_causal, interpreter, blocks, None)
    if plan.variant is None or not plan.variant["tma"] or not _misaligned(q, k, v):
        return None if plan.variant is None else dict(plan.variant)
    return dict(plan.variant, tma=False,
                fallback="a tensor's data does not start on a 16-byte boundary")


# ---------------------------------------------------------------------------------------------
# Launch: a plan per call signature
#
# A decode step's kernels run for ~10 µs, so the Python between the op's entry and the launches
# counts as much as they do. Everything that depends only on the call's signature (shapes,
# strides, dtypes, device, mask kind, scale, flags: the `supports` verdict, the decode plan or
# prefill blocks, grids, scalar arguments, constexprs, the 64-bit offsets rule) is computed once
# into a _Plan; a call then allocates its output (and the decode workspace) and launches through
# contract.TritonLaunch, which skips Triton's per-launch argument binding once a variant is known.

_PLANS: dict = {}
_MAX_PLANS = 4096


def clear_plans() -> None:
    """Forget every cached launch plan (tests that patch a planning rule call this)."""
    _PLANS.clear()


def _plan_key(q, k, v, mask, scale, is_causal, interpreter, blocks, decode, bshd_out=False):
    """The call signature a plan depends on, or None when a plan must not be cached (a scale
    that is not a plain number: `supports` decides about it every time)."""
    if scale is not None and type(scale) is not float and type(scale) is not int:
        return None
    try:
        return (q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device,
                v.shape, v.stride(), v.dtype, v.device,
                None if mask is None else (mask.shape, mask.stride(), mask.dtype, mask.device),
                scale, is_causal, interpreter,
                None if blocks is None else tuple(sorted(blocks.items())),
                None if decode is None else tuple(sorted(decode.items())), bshd_out)
    except TypeError:  # unhashable override values
        return None


class _Plan:
    """What one call signature needs beyond its tensors' data (see the section comment)."""

    __slots__ = ("out_shape", "out_strides", "dtype", "device", "mask_kind", "run", "cacheable",
                 "decode_plan", "variant")

    def __init__(self, q, k, v, mask, scale, is_causal, interpreter, blocks, decode,
                 bshd_out=False):
        reason = supports(q, k, v, mask, scale, is_causal)
        if reason is not None:
            raise ValueError(f"q3n::attention: {reason}")
        if blocks is not None and decode is not None:
            raise ValueError("q3n::attention: pass blocks= (prefill) or decode= (split-KV), "
                             "not both")
        B, Hq, Sq, D = q.shape
        Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
        if k.shape[0] != B or v.shape[:3] != k.shape[:3]:
            raise ValueError(f"q3n::attention: shapes q {tuple(q.shape)} k {tuple(k.shape)} "
                             f"v {tuple(v.shape)} do not match")
        # out_shape is what the op returns; out_strides are the kernels' view of it as
        # [B, Hq, Sq, Dv] (the transpose of a contiguous [B, Sq, Hq, Dv] when bshd_out).
        if bshd_out:
            self.out_shape = (B, Sq, Hq, Dv)
            self.out_strides = (Sq * Hq * Dv, Dv, Hq * Dv, 1)
        else:
            self.out_shape = (B, Hq, Sq, Dv)
            self.out_strides = attention_decode._contiguous_strides(self.out_shape)
        self.dtype, self.device = q.dtype, q.device
        self.cacheable = True
        self.run = self.decode_plan = self.variant = None
        self.mask_kind, m = _mask_view(mask, B, Hq, Sq, Sk)
        if B * Hq * Sq * Dv == 0:
            return  # nothing to compute: the call returns the empty output
        qk_scale = (1.0 / math.sqrt(D) if scale is None else float(scale)) * _LOG2E
        if decode is not None or (blocks is None and uses_split_kv(q, k)):
            run = attention_decode.prepare(q, k, v, m, self.mask_kind, qk_scale,
                                           bool(is_causal), interpreter, overrides=decode,
                                           out_strides=self.out_strides)
            self.run, self.decode_plan = run, run.plan
            return
        self.run = self._prefill(q, k, v, m, qk_scale, is_causal, interpreter, blocks)

    def _prefill(self, q, k, v, m, qk_scale, is_causal, interpreter, blocks):
        B, Hq, Sq, D = q.shape
        Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
        if m is None:
            m, m_strides = q, (0, 0, 0, 0)
        else:
            m_strides = m.stride()
        arch = None
        if not interpreter:
            index = q.device.index if q.device.index is not None else torch.cuda.current_device()
            arch = attention_blocks.device_arch(index)
        if blocks is not None:
            cfg = blocks
        elif interpreter:
            cfg = choose_blocks(Sq, Sk, D, q.dtype, is_causal, interpreter=True)
        else:
            table_key = (attention_blocks.table_head_dim(D), attention_blocks.dtype_name(q.dtype),
                         bool(is_causal), int(arch))
            # An untabled GPU's blocks come from a timing, except during a CUDA graph capture
            # (a fallback that is not cached there, so not here either).
            self.cacheable = (table_key in attention_blocks.BLOCK_TABLE
                              or not torch.cuda.is_current_stream_capturing())
            cfg = choose_blocks(Sq, Sk, D, q.dtype, is_causal, arch=arch, device=index)
            if self.mask_kind:
                cfg = attention_blocks.fit_shared_memory(
                    cfg, D, Dv, q.element_size(), m.element_size(),
                    attention_blocks.shared_memory_limit(index))
        want_tma = _hopper_request(cfg)
        out_strides = self.out_strides
        scalars = (*q.stride(), *k.stride(), *v.stride(), *m_strides, *out_strides,
                   Sq, Sk, qk_scale)
        consts = dict(
            GROUP=Hq // Hkv, HEAD_DK=D, HEAD_DV=Dv,
            BLOCK_DK=_pow2_at_least_16(D), BLOCK_DV=_pow2_at_least_16(Dv),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            MASK_KIND=self.mask_kind, IS_CAUSAL=bool(is_causal),
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            # Triton 3.6's interpreter multiplies bf16 tiles as their raw uint16 bits; widening
            # the (already bf16-rounded) operands to fp32 gives the exact products the GPU
            # computes.
            DOT_IN_FP32=interpreter and q.dtype == torch.bfloat16,
            OFFSETS_64=_needs_64bit_offsets(q, k, v, m, _Strided((B, Hq, Sq, Dv), out_strides),
                                            cfg),
            TMA=False,
        )
        grid = (_cdiv(Sq, cfg["BLOCK_M"]), Hq, B)
        options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

        def launch(**variant):
            args = contract.TritonLaunch.ordered(attention_fwd_kernel, 5, scalars,
                                                 dict(consts, **variant))
            return contract.TritonLaunch(attention_fwd_kernel, grid, args, options,
                                         fast=not interpreter)

        pointer = launch()
        self.variant = dict(tma=False, fallback=None)
        if not want_tma:
            return pointer
        refusal = tma_refusal(q, k, v, cfg, arch)
        if refusal is not None:
            self.variant["fallback"] = refusal
            return pointer
        self.variant["tma"] = True
        return _HopperLaunch(launch(TMA=True), pointer, cuda=not interpreter)


class _Strided:
    """Shape and strides of a tensor not yet allocated (the output), for the offsets rule."""

    __slots__ = ("shape", "_strides")

    def __init__(self, shape, strides):
        self.shape, self._strides = shape, strides

    def stride(self, dim=None):
        return self._strides if dim is None else self._strides[dim]


def _launch(q, k, v, mask, scale, is_causal, interpreter, blocks=None, decode=None,
            bshd_out=False):
    """Run the op's kernels: split-KV decode for Sq <= 16, else prefill.

    ``blocks`` forces the prefill kernel with these parameters (the benchmark's sweep and
    ``--hopper-variants``), instead of :func:`choose_blocks`: ``BLOCK_M``, ``BLOCK_N``,
    ``num_warps``, ``num_stages`` and, optionally, ``tma`` (the Hopper variant;
    :func:`prefill_variant` says whether it runs; the removed ``warp_specialize`` raises
    ValueError); ``decode`` forces the decode kernels with these plan overrides
    (``attention_decode.plan``), whatever Sq is. ``bshd_out`` as for the op.
    """
    key = _plan_key(q, k, v, mask, scale, is_causal, interpreter, blocks, decode, bshd_out)
    plan = None if key is None else _PLANS.get(key)
    if plan is None:
        plan = _Plan(q, k, v, mask, scale, is_causal, interpreter, blocks, decode, bshd_out)
        if key is not None and plan.cacheable:
            contract.remember(_PLANS, key, plan, _MAX_PLANS)
    out = torch.empty(plan.out_shape, dtype=plan.dtype, device=plan.device)
    run = plan.run
    if run is not None:
        kind = plan.mask_kind
        # The mask's data as the kernels read it: bool as uint8 (same bytes); no mask: any
        # valid pointer (never read). The plan holds its broadcast strides.
        run(q, k, v, q if kind == 0 else (mask.view(torch.uint8) if kind == 1 else mask), out)
    return out


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
              is_causal: bool = False) -> torch.Tensor:
    """Plain-torch attention with the op's semantics; computes in fp32 (fp64 for fp64 inputs)."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    Hq, Hkv, Sq, Sk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    if Hq != Hkv:
        kf = kf.repeat_interleave(Hq // Hkv, dim=1)
        vf = vf.repeat_interleave(Hq // Hkv, dim=1)
    if Sk == 0:
        return q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (qf @ kf.transpose(-2, -1)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(cdt)
    if is_causal:
        above = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(above, float("-inf"))
    dead = s.amax(-1, keepdim=True) == float("-inf")
    p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return (p @ vf).to(q.dtype)


def _known(cond) -> bool:
    if type(cond) is bool:  # concrete sizes (every eager launch): nothing to ask the shape env
        return cond
    # Guard-free: on SymInts this answers from what the shape env already knows, adding no guard.
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return statically_known_true(cond)


def supports(q, k, v, mask=None, scale=None, is_causal=False) -> Optional[str]:
    """None if the Triton kernel handles these arguments, else why not. Safe on FakeTensors.

    Symbolic sizes: head dims and head counts must be provably fine (they become constexprs and
    the grid's GQA factor); batch and sequence sizes are refused only when provably mismatched,
    and the launcher re-checks the real sizes.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            return f"{name} must be 4-D [B, H, S, D], got {t.dim()}-D"
    if q.dtype not in _DTYPES:
        dtype = str(q.dtype).replace("torch.", "")
        return f"dtype {dtype} not supported (float16, bfloat16, float32)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if not (q.device == k.device == v.device):
        return f"devices differ: q {q.device}, k {k.device}, v {v.device}"
    B, Hq, Sq, D = q.shape
    Bk, Hkv, Sk, Dk = k.shape
    Bv, Hv, Sv, Dv = v.shape
    for what, d in (("head dim", D), ("v head dim", Dv)):
        if not _known(d <= MAX_HEAD_DIM):
            return f"{what} {d} > {MAX_HEAD_DIM}"
        if not _known(d >= 1):
            return f"{what} {d} is empty"
    if not _known(Dk == D):
        return f"k head dim {Dk} != q head dim {D}"
    if _known(Bk != B) or _known(Bv != B):
        return f"batch sizes differ: q {B}, k {Bk}, v {Bv}"
    if _known(Sv != Sk) or _known(Hv != Hkv):
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in heads or length"
    if not (_known(Hkv >= 1) and _known(Hq % Hkv == 0)):
        return f"Hq {Hq} not a multiple of Hkv {Hkv}"
    if mask is not None:
        if mask.dtype not in _MASK_DTYPES:
            return f"mask dtype {str(mask.dtype).replace('torch.', '')} not supported"
        if mask.device != q.device:
            return f"mask on {mask.device}, q on {q.device}"
        target = (B, Hq, Sq, Sk)
        bad = mask.dim() > 4 or any(
            not _known(m == 1) and _known(m != t)
            for m, t in zip(reversed(tuple(mask.shape)), reversed(target)))
        if bad:
            return f"mask shape {tuple(mask.shape)} not broadcastable to [B, Hq, Sq, Sk] = {target}"
    if scale is not None and not isinstance(scale, (int, float)):
        return f"scale must be a Python number, got {type(scale).__name__}"
    return None


def _attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                    is_causal: bool = False, bshd_out: bool = False) -> torch.Tensor:
    backend = contract.backend_for(q.device)
    if backend == "reference":
        out = reference(q, k, v, mask, scale, is_causal)
        return out.transpose(1, 2).contiguous() if bshd_out else out
    return _launch(q, k, v, mask, scale, is_causal, interpreter=backend == "interpreter",
                   bshd_out=bshd_out)


def _attention_fake(q, k, v, mask=None, scale=None, is_causal=False, bshd_out=False):
    B, Hq, Sq = q.shape[:3]
    if bshd_out:
        return q.new_empty((B, Sq, Hq, v.shape[-1]))
    return q.new_empty((B, Hq, Sq, v.shape[-1]))


attention = contract.register_kernel_op("attention", _attention_impl, _attention_fake)
