"""Split-KV decode for ``q3n::attention``: a few query rows (``Sq <= 16``) against many keys.

``q3n::attention`` (kernels/attention.py) dispatches here when ``Sq <= DECODE_MAX_SQ``: decode
steps, speculative decoding's few draft tokens, short chunks. This module is part of that op: its
reference is ``attention.reference``, its fake implementation and ``supports`` check are the op's,
and ``attention._launch`` has checked the arguments and turned the mask into a ``[B, Hq, Sq, Sk]``
stride-0 view (bool as uint8) before :func:`launch` is called.

What this module guarantees:

- The result equals the prefill kernel's (the op's semantics: bool/additive masks incl. HF's
  ``finfo.min``, stride-0 broadcast, top-left ``is_causal``, fully masked rows give 0, any ``Sk``
  incl. 0, fp16/bf16/fp32, head dims up to 256, ``Dv != D``) up to fp32 reassociation: partial
  sums are kept in fp32 and merged with log-sum-exp, the output is rounded once.
- Work split: the key range is cut into ``splits`` chunks of whole ``BLOCK_N`` key blocks; one
  program handles one chunk of one (batch, KV head) for *all* ``GROUP * Sq`` query rows of that
  KV group (padded to >= 16 rows for ``tl.dot``; more than ``max_rows`` rows are cut into row
  blocks), so a K/V tile is read from memory once per row block, i.e. once for every realistic
  GQA shape. Decode is bandwidth-bound; that is what it optimises.
- ``splits`` is sized so that one wave of programs fills the GPU, at batch 1 too: SM count x
  the programs of the compiled kernel variant one SM holds at once (read from its shared memory
  and registers), divided among the (batch, KV head, row block) triples; a fixed small count
  under Triton's interpreter. Never more splits than key blocks, so no split is empty. One split
  writes the output directly; more write fp32 partials (unnormalised acc, running max, sum) to a
  workspace of ``B*Hq*Sq*splits*(Dv+2)`` floats that a second small kernel merges.
- With a mask, K/V rows of keys that no row of the tile keeps (False, or -inf) are not read
  (masked loads fetch nothing): a static KV cache whose unused tail is masked out costs the mask
  bytes there, not the K/V bytes. HF's additive ``finfo.min`` is finite, so such keys are read.
- When the (batch, KV head, row block) triples alone fill one wave (large B*Hkv), there is one
  split: a single kernel writes the output, no workspace, no merge. Otherwise the merge is a
  second launch rather than fused into the split kernel (a last-arriving-program merge needs a
  zeroed counter per call and cross-program memory ordering); the workspace is one fp32 buffer.
- :func:`plan` is a function of the shapes, dtype, mask kind and device only (the occupancy it
  reads is cached per kernel variant): it is what the launch uses, so tests and reports can see
  it (``splits``, ``chunk``, tiles). :func:`prepare` turns a call signature into a
  :class:`DecodeLaunch` (plan, grids, arguments, constexprs) that the op caches per signature;
  a call then only allocates and launches (through ``contract.TritonLaunch``).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from q3n_compile.kernels.attention_blocks import cdiv, pow2_at_least_16
from q3n_compile.kernels.contract import TritonLaunch
from q3n_compile.kernels.tiles import load_2d as _load_2d

DECODE_MAX_SQ = 16
# Under the interpreter the "GPU" is one CPU core: a few programs keep the tests fast while still
# exercising several splits.
INTERPRETER_PROGRAMS = 8
# Splits the merge kernel reduces per loop step.
_MERGE_BLOCK_S = 16
_LOG2E = 1.4426950408889634
_OVERRIDABLE = ("BLOCK_N", "num_warps", "num_stages", "max_rows", "programs_per_sm", "splits",
                "skip_dead")


@triton.jit
def _tile_bias(m_row_ptrs, offs_n, n_ok, row_ok, q_pos, stride_mn,
               BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
               IS_CAUSAL: tl.constexpr, BOUNDARY: tl.constexpr):
    """[BLOCK_R, BLOCK_N] fp32 added to the log2-scaled scores: 0 keeps a key, -inf drops it,
    an additive mask contributes log2(e) * mask (the prefill kernel's exact rules)."""
    bias = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    if MASK_KIND == 1:
        keep = tl.load(m_row_ptrs[:, None] + offs_n[None, :] * stride_mn,
                       mask=row_ok[:, None] & n_ok[None, :], other=0)
        bias = tl.where(keep != 0, bias, float("-inf"))
    elif MASK_KIND == 2:
        add = tl.load(m_row_ptrs[:, None] + offs_n[None, :] * stride_mn,
                      mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        # finfo.min * log2(e) would overflow to -inf and turn HF's "masked" rows into fully
        # masked ones (0 instead of SDPA's uniform average); a true -inf stays -inf.
        bias = tl.where(add == float("-inf"), add,
                        tl.maximum(add * 1.4426950408889634, -3.4028234663852886e38))
    if BOUNDARY:
        bias = tl.where(n_ok[None, :], bias, float("-inf"))
    if IS_CAUSAL:
        bias = tl.where(offs_n[None, :] <= q_pos[:, None], bias, float("-inf"))
    return bias


@triton.jit
def _decode_blocks(acc, l_i, m_i, q, k_base, v_base, m_row_ptrs, row_ok, q_pos, offs_n0,
                   offs_dk, dk_ok, offs_dv, dv_ok, stride_kn, stride_kd, stride_vn, stride_vd,
                   stride_mn, qk_scale, lo, hi, key_end,
                   BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_DK: tl.constexpr,
                   EVEN_DV: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   BOUNDARY: tl.constexpr, SKIP_DEAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   DOT_IN_FP32: tl.constexpr):
    """Online softmax over key blocks [lo, hi) (the prefill kernel's update, fp32 state)."""
    HAS_BIAS: tl.constexpr = MASK_KIND != 0 or IS_CAUSAL or BOUNDARY
    # A mask or causality can leave a row with no key in this split: its max stays -inf.
    SAFE_MAX: tl.constexpr = MASK_KIND != 0 or IS_CAUSAL
    SKIP: tl.constexpr = SKIP_DEAD and HAS_BIAS
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < key_end
        kv_ok = n_ok
        if HAS_BIAS:
            bias = _tile_bias(m_row_ptrs, offs_n, n_ok, row_ok, q_pos, stride_mn, BLOCK_R,
                              BLOCK_N, MASK_KIND, IS_CAUSAL, BOUNDARY)
            if SKIP:
                # Keys no (real) row keeps are not loaded: they are zeros and their p is 0.
                live = tl.where(row_ok[:, None] & (bias > float("-inf")), 1, 0)
                kv_ok = n_ok & (tl.max(live, 0) > 0)
        k = _load_2d(k_base + offs_n[:, None] * stride_kn + offs_dk[None, :] * stride_kd,
                     kv_ok, dk_ok, BOUNDARY or SKIP, not EVEN_DK)
        if DOT_IN_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            s = s + bias
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
        if SAFE_MAX:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # exp2(-inf - -inf) is NaN
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_2d(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                     kv_ok, dv_ok, BOUNDARY or SKIP, not EVEN_DV)
        p = p.to(v.dtype)
        if DOT_IN_FP32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def decode_split_kernel(
    Q, K, V, M, O, PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    Hkv, Sq, key_end, chunk, n_splits, row_blocks, part_m_offset, part_l_offset, qk_scale,
    GROUP: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, SKIP_DEAD: tl.constexpr,
    FINAL: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    OFFSETS_64: tl.constexpr,
):
    """One program: keys [split*chunk, min((split+1)*chunk, key_end)) of one (batch, KV head),
    for BLOCK_R of the GROUP*Sq query rows that share that KV head (row r is query head
    kv*GROUP + r // Sq, query position r % Sq).

    Math: the prefill kernel's online softmax (c = scale*log2(e); s = c q k^T + log2(e) mask;
    m' = max(m, rowmax s); p = exp2(s - m'); l = l exp2(m - m') + rowsum p; acc = acc exp2(m - m')
    + p v), with p rounded to V's dtype for the second product. FINAL (one split): O = acc / l
    (0 where l = 0). Otherwise the fp32 triple (acc, m, l) of each row goes to the workspace for
    decode_merge_kernel: one fp32 buffer PART holding acc [rows, splits, Dv] at 0, m [rows,
    splits] at ``part_m_offset`` and l at ``part_l_offset`` (elements). ``key_end`` is Sk, or
    min(Sk, Sq) with top-left causality (query i sees keys j <= i, so no later key matters).

    Traffic: K and V of the chunk once per row block, (chunk)*(D+Dv)*e bytes, minus the keys a
    mask drops for every row; the mask tile for the rows; Q once; writes BLOCK_R*(Dv+2)*4 bytes
    of partials (or the output rows).
    """
    split = tl.program_id(0)
    pid1 = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    off_g = (pid1 // row_blocks).to(tl.int64)
    rows = (pid1 % row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < GROUP * Sq
    # Row offsets are int64: a [B, S, H, D] view or an [Sq, huge] mask row may pass 2^31.
    head = off_g * GROUP + (rows // Sq).to(tl.int64)
    q_pos = (rows % Sq).to(tl.int64)
    offs_n0 = tl.arange(0, BLOCK_N)
    if OFFSETS_64:
        offs_n0 = offs_n0.to(tl.int64)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ok = offs_dk < HEAD_DK
    dv_ok = offs_dv < HEAD_DV
    EVEN_DK: tl.constexpr = BLOCK_DK == HEAD_DK
    EVEN_DV: tl.constexpr = BLOCK_DV == HEAD_DV

    q_ptrs = (Q + off_b * stride_qb + head[:, None] * stride_qh + q_pos[:, None] * stride_qm
              + offs_dk[None, :] * stride_qd)
    q = _load_2d(q_ptrs, row_ok, dk_ok, True, not EVEN_DK)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_g * stride_kh
    v_base = V + off_b * stride_vb + off_g * stride_vh
    m_row_ptrs = M + off_b * stride_mb + head * stride_mh + q_pos * stride_mm

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, key_end)
    # Chunks are whole key blocks: only the last split has a tail block needing the key predicate.
    full = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _decode_blocks(
        acc, l_i, m_i, q, k_base, v_base, m_row_ptrs, row_ok, q_pos, offs_n0, offs_dk, dk_ok,
        offs_dv, dv_ok, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale,
        lo, full, key_end, BLOCK_R, BLOCK_N, EVEN_DK, EVEN_DV, MASK_KIND, IS_CAUSAL, False,
        SKIP_DEAD, DOT_PRECISION, DOT_IN_FP32)
    acc, l_i, m_i = _decode_blocks(
        acc, l_i, m_i, q, k_base, v_base, m_row_ptrs, row_ok, q_pos, offs_n0, offs_dk, dk_ok,
        offs_dv, dv_ok, stride_kn, stride_kd, stride_vn, stride_vd, stride_mn, qk_scale,
        full, hi, key_end, BLOCK_R, BLOCK_N, EVEN_DK, EVEN_DV, MASK_KIND, IS_CAUSAL, True,
        SKIP_DEAD, DOT_PRECISION, DOT_IN_FP32)

    if FINAL:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = (O + off_b * stride_ob + head[:, None] * stride_oh + q_pos[:, None] * stride_om
                  + offs_dv[None, :] * stride_od)
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    else:
        # Flat (batch, query head, query position) row of the workspace: (b*Hq + head)*Sq + i.
        part = ((off_b * Hkv + off_g) * (GROUP * Sq) + rows) * n_splits + split
        tl.store(PART + part_m_offset + part, m_i, mask=row_ok)
        tl.store(PART + part_l_offset + part, l_i, mask=row_ok)
        tl.store(PART + part[:, None] * HEAD_DV + offs_dv[None, :], acc,
                 mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def decode_merge_kernel(PART, O, Hq, Sq, n_splits, part_m_offset, part_l_offset,
                        stride_ob, stride_oh, stride_om, stride_od,
                        HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per output row (batch, query head, position): log-sum-exp merge of its splits.

    Math (log2 domain, as the partials): M = max_s m_s; w_s = exp2(m_s - M); l = sum_s w_s l_s;
    O = (sum_s w_s acc_s) / l, 0 where l = 0 (every split of the row fully masked). Splits are
    reduced BLOCK_S at a time with a running max, so any split count fits in registers.
    Traffic: reads splits*(Dv+2)*4 bytes, writes Dv*e bytes per row.
    """
    row = tl.program_id(0).to(tl.int64)
    pos = row % Sq
    head = (row // Sq) % Hq
    b = row // (Sq * Hq)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < HEAD_DV
    m_run = tl.max(tl.full([BLOCK_S], float("-inf"), dtype=tl.float32), 0)
    l_run = tl.sum(tl.zeros([BLOCK_S], dtype=tl.float32), 0)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < n_splits
        part = row * n_splits + offs_s
        m = tl.load(PART + part_m_offset + part, mask=s_ok, other=float("-inf"))
        l = tl.load(PART + part_l_offset + part, mask=s_ok, other=0.0)
        a = tl.load(PART + part[:, None] * HEAD_DV + offs_dv[None, :],
                    mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_run - m_use)
        w = tl.math.exp2(m - m_use)
        l_run = l_run * alpha + tl.sum(w * l, 0)
        acc = acc * alpha + tl.sum(w[:, None] * a, 0)
        m_run = m_new
    out = acc / tl.where(l_run == 0.0, 1.0, l_run)
    o_ptrs = O + b * stride_ob + head * stride_oh + pos * stride_om + offs_dv * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=dv_ok)


# ---------------------------------------------------------------------------------------------
# Plan and launch


def uses_split_kv(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``q3n::attention(q, k, ...)`` runs this module's kernels (decode) rather than
    the prefill kernel: a question about the query length only (``k`` is for symmetry with the
    op's arguments and may be any length, 0 included)."""
    return q.shape[2] <= DECODE_MAX_SQ


def _tiles(head_dim: int, head_dim_v: int, dtype: torch.dtype, interpreter: bool) -> dict:
    """Key block, warps, stages and the row cap per program (before overrides).

    GPU: 64-key blocks for 16-bit head dims up to 128 (16 KiB K + 16 KiB V tiles per stage; with
    3 stages a program needs ~70 KiB of shared memory, three fit an H200 SM), 32 keys past 128,
    half for fp32. Rows: at most 64 per program (the 64 x Dv fp32 acc stays in registers).
    Interpreter: 16-key blocks and at most 32 rows, so small tests cross blocks and row blocks.
    """
    if interpreter:
        return dict(BLOCK_N=16, num_warps=4, num_stages=1, max_rows=32)
    wide = max(head_dim, head_dim_v) > 128
    block_n = 32 if wide else 64
    if dtype == torch.float32:
        block_n //= 2
    return dict(BLOCK_N=block_n, num_warps=4, num_stages=3, max_rows=64)


def _constexprs(group, head_dim, head_dim_v, dtype, mask_kind, causal, skip_dead, final,
                interpreter, tiles) -> dict:
    """The split kernel's constexprs (shared by the launch and the occupancy probe)."""
    return dict(
        GROUP=group, HEAD_DK=head_dim, HEAD_DV=head_dim_v,
        BLOCK_DK=pow2_at_least_16(head_dim), BLOCK_DV=pow2_at_least_16(head_dim_v),
        BLOCK_R=tiles["BLOCK_R"], BLOCK_N=tiles["BLOCK_N"], MASK_KIND=mask_kind,
        IS_CAUSAL=bool(causal), SKIP_DEAD=bool(skip_dead), FINAL=bool(final),
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        # Triton 3.6's interpreter multiplies bf16 tiles as their raw uint16 bits (see the
        # prefill launcher): widen the already-rounded operands to fp32 there.
        DOT_IN_FP32=interpreter and dtype == torch.bfloat16,
        num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
    )


def _estimated_shared(dtype: torch.dtype, consts: dict) -> int:
    """Shared memory of one program as Triton 3.6 lays it out for sm_90 (checked against the
    compiled kernel: 71680 B for bf16, D = 128, 64-key blocks, 3 stages): stages-1 buffered K
    and V tiles, plus the Q and P operand tiles."""
    e = torch.finfo(dtype).bits // 8
    kv = max(1, consts["num_stages"] - 1) * consts["BLOCK_N"] * (consts["BLOCK_DK"]
                                                                  + consts["BLOCK_DV"]) * e
    return kv + consts["BLOCK_R"] * (consts["BLOCK_DK"] + consts["BLOCK_N"]) * e


def _compiled_resources(index: int, dtype: torch.dtype, mask_kind: int, consts: dict):
    """(shared bytes, registers per thread) of the split kernel compiled for these constexprs,
    without launching it (Triton caches the compile for the real launch)."""
    mask_dtype = {0: dtype, 1: torch.uint8, 2: dtype}[mask_kind]
    strides = (16, 16, 16, 1) * 5  # unit last dims, 16-aligned others: the common layouts
    with torch.cuda.device(index):
        kernel = decode_split_kernel.warmup(
            dtype, dtype, dtype, mask_dtype, dtype, torch.float32, *strides,
            # Hkv, Sq (1: the decode step's specialisation), key_end, chunk, splits, row blocks,
            # the workspace's m and l offsets
            16, 1, 4096, 512, 2, 1, 4096, 8192, 0.1, grid=(1, 1, 1), OFFSETS_64=False,
            **consts)
        kernel._init_handles()
    return kernel.metadata.shared, kernel.n_regs


@functools.lru_cache(maxsize=None)
def _resident_per_sm(index: int, dtype: torch.dtype, mask_kind: int,
                     consts_items: tuple) -> tuple:
    """(programs of this kernel variant that fit one SM at once, how that was found).

    From the compiled kernel's shared memory and registers against the SM's limits; from an
    estimate if the probe fails (e.g. another Triton version's API)."""
    consts = dict(consts_items)
    try:
        shared, regs = _compiled_resources(index, dtype, mask_kind, consts)
        source = "compiled kernel"
    except Exception as exc:  # noqa: BLE001 - the estimate is a safe fallback
        shared, regs = _estimated_shared(dtype, consts), 128
        source = f"estimate ({type(exc).__name__})"
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    regs_sm = getattr(props, "regs_per_multiprocessor", 65536)
    threads_sm = getattr(props, "max_threads_per_multi_processor", 2048)
    threads = 32 * consts["num_warps"]
    # The driver reserves 1 KiB of shared memory per resident block; registers are allocated per
    # warp in multiples of 8 per thread.
    by_smem = smem // (shared + 1024)
    by_regs = regs_sm // (threads * 8 * cdiv(max(regs, 1), 8))
    return max(1, min(by_smem, by_regs, threads_sm // threads, 32)), source


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan(B: int, Hq: int, Hkv: int, Sq: int, Sk: int, head_dim: int, head_dim_v: int,
         dtype: torch.dtype, causal: bool, *, mask_kind: int, interpreter: bool,
         device: Optional[torch.device] = None, target_programs: Optional[int] = None,
         overrides: Optional[dict] = None) -> dict:
    """Launch plan of one decode call (a JSON-serialisable dict; :func:`launch` runs it).

    ``target_programs``: how many programs fill the device in one wave. By default: SM count x
    the programs of this kernel variant one SM holds at once (from the compiled kernel) on CUDA,
    ``INTERPRETER_PROGRAMS`` under the interpreter. ``splits`` = that target // (B * Hkv *
    row_blocks), at least 1, at most the number of key blocks: one wave of equal chunks, since a
    second, partial wave would take as long as the first.
    ``overrides`` may set any of ``BLOCK_N, num_warps, num_stages, max_rows, programs_per_sm,
    splits, skip_dead`` (the benchmark's sweep and the tests); ``splits`` is still capped.
    """
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise ValueError(f"decode plan overrides {unknown} unknown; valid: {list(_OVERRIDABLE)}")
    tiles = _tiles(head_dim, head_dim_v, dtype, interpreter)
    tiles.update({key: overrides[key] for key in tiles.keys() & overrides.keys()})
    block_n = tiles["BLOCK_N"]
    rows = (Hq // Hkv) * Sq
    tiles["BLOCK_R"] = min(pow2_at_least_16(rows), max(16, tiles.pop("max_rows")))
    row_blocks = cdiv(rows, tiles["BLOCK_R"])
    key_end = min(Sk, Sq) if causal else Sk
    key_blocks = cdiv(key_end, block_n)
    skip_dead = bool(overrides.get("skip_dead", mask_kind != 0 or causal))
    residency = None
    if "splits" in overrides:
        want = int(overrides["splits"])
    else:
        if target_programs is None:
            if interpreter:
                target_programs = INTERPRETER_PROGRAMS
            else:
                target_programs, residency = _device_programs(
                    device, dtype, mask_kind, Hq // Hkv, head_dim, head_dim_v, causal, skip_dead,
                    tiles, overrides.get("programs_per_sm"))
        want = target_programs // max(1, B * Hkv * row_blocks)
    splits = max(1, min(want, key_blocks))
    chunk = cdiv(key_blocks, splits) * block_n if key_blocks else block_n
    splits = max(1, cdiv(key_end, chunk))  # rounding chunks up can leave fewer splits
    return dict(tiles, row_blocks=row_blocks, splits=splits, chunk=chunk, key_end=key_end,
                skip_dead=skip_dead, target_programs=target_programs, residency=residency)


def _device_programs(device, dtype, mask_kind, group, head_dim, head_dim_v, causal, skip_dead,
                     tiles, programs_per_sm):
    """(programs filling CUDA ``device`` in one wave, how the per-SM count was found)."""
    if device is None or device.type != "cuda":
        raise ValueError(f"decode plan: no CUDA device given ({device}); pass device=cuda, "
                         "target_programs= or interpreter=True")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if programs_per_sm is not None:
        return _sm_count(index) * int(programs_per_sm), "override"
    consts = _constexprs(group, head_dim, head_dim_v, dtype, mask_kind, causal, skip_dead,
                         False, False, tiles)
    per_sm, source = _resident_per_sm(index, dtype, mask_kind, tuple(sorted(consts.items())))
    return _sm_count(index) * per_sm, f"{per_sm} per SM ({source})"


def _needs_64bit_offsets(k, v, m, plan_: dict) -> bool:
    """Whether a key offset times its stride (padded to whole blocks) can pass int32.

    Batch, head and query-row offsets are always int64 in the kernel; this covers the keys.
    """
    pad_n = cdiv(max(1, k.shape[2]), plan_["BLOCK_N"]) * plan_["BLOCK_N"]
    spans = [pad_n * k.stride(2) + k.shape[3] * k.stride(3),
             pad_n * v.stride(2) + v.shape[3] * v.stride(3),
             pad_n * m.stride(3)]
    return max(spans) >= 2**31


class DecodeLaunch:
    """The decode kernels of one call signature, ready to launch: built once by :func:`prepare`
    (the op caches it per signature), then ``launch(q, k, v, m, out)`` per call allocates the
    workspace (more than one split) and launches the split kernel and, if needed, the merge."""

    __slots__ = ("plan", "final", "ws_numel", "split", "merge")

    def __init__(self, plan_: dict, final: bool, ws_numel: int, split, merge):
        self.plan, self.final, self.ws_numel, self.split, self.merge = (
            plan_, final, ws_numel, split, merge)

    def __call__(self, q, k, v, m, out):
        if self.final:
            self.split(q, k, v, m, out, out)  # FINAL stores the output; no workspace is touched
            return
        ws = torch.empty(self.ws_numel, dtype=torch.float32, device=out.device)
        self.split(q, k, v, m, out, ws)
        self.merge(ws, out)


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def prepare(q, k, v, m, mask_kind: int, qk_scale: float, causal: bool, interpreter: bool,
            overrides: Optional[dict] = None, out_strides: Optional[tuple] = None
            ) -> DecodeLaunch:
    """Everything a decode call needs beyond its tensors' data: the plan, grids, scalar
    arguments, constexprs, workspace size. Depends only on the shapes, strides, dtypes and
    device of ``q, k, v, m`` (``m`` as in :func:`launch`), the flags and ``out_strides`` (those
    of the output, contiguous [B, Hq, Sq, Dv] by default)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    p = plan(B, Hq, Hkv, Sq, Sk, D, Dv, q.dtype, causal, mask_kind=mask_kind,
             interpreter=interpreter, device=q.device, overrides=overrides)
    final = p["splits"] == 1
    rows_total = B * Hq * Sq
    n_part = rows_total * p["splits"]
    # One fp32 workspace: acc [rows, splits, Dv], then m and l [rows, splits].
    m_offset, l_offset = n_part * Dv, n_part * (Dv + 1)
    if final:
        m_offset = l_offset = 0
    if out_strides is None:
        out_strides = _contiguous_strides((B, Hq, Sq, Dv))
    m_strides = m.stride() if mask_kind else (0, 0, 0, 0)
    consts = _constexprs(Hq // Hkv, D, Dv, q.dtype, mask_kind, causal, p["skip_dead"], final,
                         interpreter, p)
    options = dict(num_warps=consts.pop("num_warps"), num_stages=consts.pop("num_stages"))
    consts["OFFSETS_64"] = _needs_64bit_offsets(k, v, m if mask_kind else k, p)
    scalars = (*q.stride(), *k.stride(), *v.stride(), *m_strides, *out_strides,
               Hkv, Sq, p["key_end"], p["chunk"], p["splits"], p["row_blocks"], m_offset,
               l_offset, float(qk_scale))
    fast = not interpreter
    split = TritonLaunch(
        decode_split_kernel, (p["splits"], p["row_blocks"] * Hkv, B),
        TritonLaunch.ordered(decode_split_kernel, 6, scalars, consts), options, fast=fast)
    merge = None
    if not final:
        merge_consts = dict(HEAD_DV=Dv, BLOCK_DV=pow2_at_least_16(Dv), BLOCK_S=_MERGE_BLOCK_S)
        merge = TritonLaunch(
            decode_merge_kernel, (rows_total,),
            TritonLaunch.ordered(decode_merge_kernel, 2,
                                 (Hq, Sq, p["splits"], m_offset, l_offset, *out_strides),
                                 merge_consts),
            dict(num_warps=2), fast=fast)
    return DecodeLaunch(p, final, n_part * (Dv + 2), split, merge)


def launch(q, k, v, m, mask_kind: int, out, qk_scale: float, causal: bool, interpreter: bool,
           overrides: Optional[dict] = None) -> dict:
    """Write attention(q, k, v) into ``out`` ([B, Hq, Sq, Dv], q's dtype); returns the plan.

    ``m`` is the mask as a [B, Hq, Sq, Sk] view (None or anything when ``mask_kind`` is 0),
    ``mask_kind`` 0 none / 1 bool-as-uint8 / 2 additive; ``qk_scale`` is scale*log2(e).
    (The op itself caches :func:`prepare`'s result per call signature; this is the uncached
    form, for callers that hold their own output.)
    """
    run = prepare(q, k, v, m, mask_kind, qk_scale, causal, interpreter, overrides,
                  out_strides=out.stride())
    run(q, k, v, m if mask_kind else q, out)
    return run.plan


def describe(head_dim: int, dtype: torch.dtype, arch) -> dict:
    """JSON-serialisable description of the decode dispatch for reports (``arch`` as in
    ``attention_blocks.describe_prefill``)."""
    import sympy

    if arch == "reference":
        return dict(when=f"Sq <= {DECODE_MAX_SQ}", source="reference (torch, no kernel)")
    interpreter = arch == "interpreter"
    tiles = _tiles(head_dim, head_dim, dtype, interpreter)
    B, Hkv, Sk, R, T = sympy.symbols("B Hkv Sk row_blocks target_programs", positive=True,
                                     integer=True)
    key_blocks = sympy.ceiling(Sk / tiles["BLOCK_N"])
    splits = sympy.Min(key_blocks, sympy.Max(1, sympy.floor(T / (B * Hkv * R))))
    return dict(
        when=f"Sq <= {DECODE_MAX_SQ} (decode, speculative drafts)",
        kernel="split-KV: one program per (key chunk, row block, KV head, batch) for all "
               "GROUP*Sq query rows of the KV group; fp32 partials merged by log-sum-exp",
        BLOCK_N=tiles["BLOCK_N"], num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
        rows_per_program=f"max(16, next_pow2(GROUP*Sq)), at most {tiles['max_rows']}",
        target_programs=(INTERPRETER_PROGRAMS if interpreter else
                         "SM count x programs of the compiled variant one SM holds"),
        splits_expr=str(splits),
        chunk_expr=str(tiles["BLOCK_N"] * sympy.ceiling(key_blocks / sympy.Symbol("splits"))),
        skip_masked_keys="with a mask (or causal), K/V of keys no row keeps are not read",
    )
