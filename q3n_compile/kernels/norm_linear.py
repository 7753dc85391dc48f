"""``q3n::norm_linear``: LayerNorm/RMSNorm fused into the linear(s) that follow it.

What this module guarantees:

- ``torch.ops.q3n.norm_linear(x, weight, bias, rowsum, eps, kind, residual=None, epilogue="none",
  splits=None) -> list[Tensor]`` computes, for ``x [..., K]`` and ``weight [N, K]``:

      xn = (x - mean(x)) * rsqrt(var(x) + eps)          kind = "layernorm" (biased variance)
      xn = x * rsqrt(mean(x^2) + eps)                   kind = "rmsnorm"
      y  = xn @ weight^T (+ bias)                       [..., N]
      y  = silu(y[..., :N/2]) * y[..., N/2:]             epilogue = "silu_gate" -> [..., N/2]
      y  = y + residual                                 residual [..., N] (or [..., N/2])

  and returns ``[y]``, or with ``splits = [n0, n1, ...]`` (summing to N, at most
  :data:`MAX_OUTPUTS`) the column blocks ``[y[..., :n0], y[..., n0:n0+n1], ...]`` as separate
  contiguous tensors that share no storage with each other or with any input (a custom op may
  not return aliases; at one row a column block of one buffer *is* contiguous, so every path
  allocates each output on its own). Outputs have ``weight``'s dtype. The norm's affine
  parameters are not arguments: the caller folds them into the linear, ``weight = W·diag(γ)``,
  ``bias = W·β + b`` (exact algebra; the ``norm_linear`` pass does it at compile time).
- ``torch.ops.q3n.normalize(x, eps, kind, dtype)`` (end of this module) is the normalisation alone,
  x_hat without the affine parameters, for linears whose folded weights the quantize pass
  quantizes with 16-bit activations (see ``passes/norm_linear.py``).
- ``rowsum`` (LayerNorm only; ignored for RMSNorm) must be ``weight.float().sum(1)`` of the weight
  as given (rounded); ``None`` computes it on every call, which reads the weight once more: pass it.
- x and weight may differ in dtype (float16, bfloat16, float32): the GEMM runs in weight's dtype
  with float32 accumulation; statistics are always accumulated in float32 from x as given.
- Three designs, all exact up to rounding and tested alike; :func:`choose_config` picks one per
  call from :data:`DISPATCH` by the number of rows M (the benchmark prints the table and times
  every design, so the table is set from measurements):

  ``"fused"`` -- one launch. Each program owns BLOCK_N weight rows and BLOCK_M rows of x and
  streams W once per row block; the weight tile is the MMA's first operand ("swap AB": W rows
  fill the 64-row tensor-core tile, the few rows of x are the narrow side), so decode (M <= 16)
  reads the 100 MB of a 4096x12288 bf16 weight exactly once, like cuBLAS's GEMV. The row
  statistics come from the x tiles the program loads anyway (M*K extra adds per program, nothing
  extra from memory), applied in the epilogue.
  ``"split"`` -- a statistics kernel (reads x once), then a Triton GEMM (TMA loads when the
  strides allow, GROUP_M ordering, optionally persistent) whose main loop is a plain GEMM and
  whose epilogue applies the norm: ``y = rstd·(x·W'ᵀ − μ·rowsum(W')) + b'``.
  ``"cublas"`` -- a normalise kernel (reads x once, writes x̂ = (x − μ)·rstd in weight's dtype:
  one pass over x, which for N >= K is less traffic than any pass over the output), then cuBLAS
  (``torch.mm``/``addmm``, one call per output), then for SiLU-gate one pass that forms
  ``silu(gate)·up`` (+ residual). It is eager's arithmetic with one launch fewer and γ/β folded;
  its float32 products follow torch's matmul precision setting (TF32 if the user allowed it).

- Accuracy on rows whose mean is large relative to their spread (LayerNorm): "fused" subtracts
  a per-row centre (the mean of the row's first BLOCK_K elements: ``tiles.first_tile_mean``)
  from every x element before the product and "cublas" normalises before it, so neither
  cancels; the one-pass statistics of every design are centred the same way. "split"
  multiplies the raw x when x and weight are both bf16/fp16 (so its main loop is a plain GEMM)
  and subtracts μ·rowsum(W') in the epilogue: the float32 accumulator then loses about
  log2(|μ|/σ) of its 24 bits, below the output's rounding for |μ|/σ < ~1e4 (tested at 1000);
  for float32 weights or x of another dtype it centres x on its float32 mean in the loop
  instead (the operand passes through registers anyway).
- No program writes what another reads: each output element is written by exactly one program,
  statistics are written by one kernel and read by a later launch on the same stream, and no
  workspace is read before it is written. See the note on the Triton pipeliner at
  :func:`fused_kernel` for the one hazard that a single program can hit, and
  ``tests/kernels/test_norm_linear.py::test_no_wgmma_buffer_hazard`` for the check that
  catches it without a GPU.
"""

from __future__ import annotations

import functools
import weakref
from typing import List, Optional

import torch
import triton
import triton.language as tl

from q3n_compile.kernels import contract
from q3n_compile.kernels.tiles import first_tile_mean

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KINDS = ("layernorm", "rmsnorm")
EPILOGUES = ("none", "silu_gate")
DESIGNS = ("fused", "split", "cublas")
MAX_OUTPUTS = 4

# Which design runs for how many rows: (largest M, design), first match wins; None = any M.
# Set from bench/bench_norm_linear.py, which times every design (and a sweep of each one's launch
# parameters) and prints the fastest beside this table. Measured on the H200 (s7run3/s7run4, K =
# 4096, N = 12288 and SwiGLU 2 x 11008, bf16, medians of interleaved rounds): "fused" reads the
# weight once in one launch and runs at the linear's own GPU time at 1 and 16 rows; from 256 to
# 8192 rows "cublas" (normalise, then cuBLAS) was the fastest design or within 1% of it, at
# 0.97-1.15x the linear alone; "split" (a Triton GEMM with the norm in its epilogue) ran
# 0.99-1.65x the "cublas" design's time from 256 rows up, with 3 or 4 pipeline stages alike.
DISPATCH = ((64, "fused"), (None, "cublas"))


@triton.jit
def _round(x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """x (fp32) rounded to `dtype`. RNE_BF16 (interpreter only): Triton 3.6's interpreter truncates
    fp32 -> bf16; rounding to nearest even on the bits first makes its result the GPU's."""
    if RNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _finish(acc, acc_up, offs_m, offs_n, M, N, d, rstd, BIAS, RS, RES, stride_rm, stride_rn,
            O0, O1, O2, O3, E1, E2, E3, UP_ROW,
            KIND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
            SILU_GATE: tl.constexpr, NUM_OUT: tl.constexpr, RNE_BF16: tl.constexpr):
    """The shared epilogue of both GEMM kernels, on a [BLOCK_M, BLOCK_N] tile of fp32 sums.

    y = rstd * (acc - d * rowsum) + bias (LayerNorm; d is the part of the mean the loop did not
    subtract) or rstd * acc + bias (RMSNorm); SiLU-gate: the same for the up half (weight rows
    UP_ROW + n), then silu(y) * up; + residual; rounded once; output j holds columns [E_j, E_j+1).
    Rows >= M and columns >= N are never stored (their sums came from wrapped, valid addresses).
    """
    row_ok = offs_m < M
    col_ok = offs_n < N
    y = acc
    if KIND == 0:
        rs = tl.load(RS + offs_n, mask=col_ok, other=0.0)
        y = y - d[:, None] * rs[None, :]
    y = y * rstd[:, None]
    if HAS_BIAS:
        y += tl.load(BIAS + offs_n, mask=col_ok, other=0.0)[None, :]
    if SILU_GATE:
        up = acc_up
        if KIND == 0:
            rs2 = tl.load(RS + UP_ROW + offs_n, mask=col_ok, other=0.0)
            up = up - d[:, None] * rs2[None, :]
        up = up * rstd[:, None]
        if HAS_BIAS:
            up += tl.load(BIAS + UP_ROW + offs_n, mask=col_ok, other=0.0)[None, :]
        y = y * tl.sigmoid(y) * up
    ok = row_ok[:, None] & col_ok[None, :]
    m2 = offs_m[:, None]
    n2 = offs_n[None, :]
    if HAS_RES:
        r = tl.load(RES + m2 * stride_rm + n2 * stride_rn, mask=ok, other=0.0)
        y += r.to(tl.float32)
    y = _round(y, O0.dtype.element_ty, RNE_BF16)
    if NUM_OUT == 1:
        tl.store(O0 + m2 * N + n2, y, mask=ok)
    else:
        tl.store(O0 + m2 * E1 + n2, y, mask=ok & (n2 < E1))
        if NUM_OUT == 2:
            tl.store(O1 + m2 * (N - E1) + (n2 - E1), y, mask=ok & (n2 >= E1))
        else:
            tl.store(O1 + m2 * (E2 - E1) + (n2 - E1), y, mask=ok & (n2 >= E1) & (n2 < E2))
            if NUM_OUT == 3:
                tl.store(O2 + m2 * (N - E2) + (n2 - E2), y, mask=ok & (n2 >= E2))
            else:
                tl.store(O2 + m2 * (E3 - E2) + (n2 - E2), y, mask=ok & (n2 >= E2) & (n2 < E3))
                tl.store(O3 + m2 * (N - E3) + (n2 - E3), y, mask=ok & (n2 >= E3))


@triton.jit
def fused_kernel(
    X, W, BIAS, RS, RES, O0, O1, O2, O3,
    M, N, K, eps, one,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn,
    E1, E2, E3, UP_ROW,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    SILU_GATE: tl.constexpr, NUM_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    FULL_M: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    OFFSETS_64: tl.constexpr, RNE_BF16: tl.constexpr,
):
    """"fused": one program computes y[BLOCK_M rows, BLOCK_N cols] with the statistics in-loop.

    Math (per row m, all sums in fp32): LayerNorm (KIND 0): with c_m = the mean of row m's first
    BLOCK_K elements (``tiles.first_tile_mean``, a tile loaded once more before the loop), every x
    element becomes x - c (rounded once to W's dtype for the product), and from the same
    tiles s1 = sum(x - c), s2 = sum((x - c)^2); then d = s1/K, var = max(s2/K - d^2, 0),
    rstd = rsqrt(var + eps), y = rstd * ((x - c)·W'^T - d * rowsum(W')) + b', which equals
    ((x - mean) * rstd)·W'^T + b' in real arithmetic and cancels nothing when |mean| >> std.
    RMSNorm (KIND 1): s2 = sum(x^2), rstd = rsqrt(s2/K + eps), y = rstd * (x·W'^T) + b'.
    The product is acc[n, m] = sum_k W'[n, k] * a[m, k] (W tile first: "swap AB").

    Why x goes through registers before the dot, even for RMSNorm where it is not changed: a
    loaded tile that is both an operand of an asynchronous Hopper wgmma (read from shared memory)
    and read into registers (for the statistics) gets one shared-memory slot too few from Triton
    3.6's software pipeliner (num_stages - 1 instead of num_stages, sized for the register use),
    so the async copy of tile k + num_stages - 1 overwrites the slot the still-running wgmma of
    tile k reads -- a race inside one program that gave wrong, run-to-run different results at
    M = 2048 on the H200 (the previous kernel's RMSNorm path) and that the interpreter cannot
    show. Here the dot's operand is computed in registers (LayerNorm: x - c; RMSNorm: x * `one`,
    a run-time 1.0, because the compiler folds a plain fp32 round trip back into the loaded
    tile), so the pipelined x buffer is only read into registers and the wgmma reads its own
    buffer (Triton then waits for it before that buffer is reused).

    Traffic (bytes; e_x, e_w, e_o element sizes; P_m = ceil(M / BLOCK_M)): W is read P_m times,
    P_m * N * K * e_w (once at decode); x is read once per column block, ceil(N / BLOCK_N) *
    M * K * e_x, from L2 after the first; bias/rowsum 4 bytes per column per row block; the
    residual is read and y written once, M * N_out * e_o each. FLOPs: 2 * M_pad * N * K
    (SiLU-gate: N counts both halves; M_pad = P_m * BLOCK_M).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    # Programs sharing a weight block are adjacent, so its second reader finds it in L2.
    pid_m = pid % num_pid_m
    pid_n = pid // num_pid_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if OFFSETS_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    # Loads use wrapped row/column indices (always in bounds; weight loads need no predicate);
    # stores are masked.
    rows = offs_m % M
    cols = offs_n % N
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + cols[:, None] * stride_wn + offs_k[None, :] * stride_wk
    w2_ptrs = W + (cols[:, None] + UP_ROW) * stride_wn + offs_k[None, :] * stride_wk
    # x rows past M are not loaded (they are zeros): wrapped, at M = 1 all 16 rows of every
    # program's x tile read the same few lines, and that L2 hot spot made decode 1.23x slower
    # than at M = 16 with the same grid and weight traffic (s7run2).
    x_row_ok = (offs_m < M)[:, None]
    if KIND == 0:
        centre = first_tile_mean(x_ptrs, x_row_ok & (offs_k < K)[None, :],
                                 tl.minimum(K, BLOCK_K))
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            if FULL_M:
                xt = tl.load(x_ptrs)
            else:
                xt = tl.load(x_ptrs, mask=x_row_ok, other=0.0)
            w = tl.load(w_ptrs)
            if SILU_GATE:
                w2 = tl.load(w2_ptrs)
        else:
            k_ok = offs_k < K - k0
            xt = tl.load(x_ptrs, mask=x_row_ok & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            if SILU_GATE:
                w2 = tl.load(w2_ptrs, mask=k_ok[None, :], other=0.0)
        af = xt.to(tl.float32)
        if KIND == 0:
            af = af - centre[:, None]
            if not EVEN_K:
                af = tl.where(k_ok[None, :], af, 0.0)
            s1 += tl.sum(af, 1)
        else:
            # `one` is 1.0 at run time: the compiler cannot fold x * one back into the loaded
            # tile (it does fold x.to(fp32).to(bf16)), so the dot reads its own copy of x.
            af = af * one
        s2 += tl.sum(af * af, 1)
        a = _round(af, W.dtype.element_ty, RNE_BF16)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        at = tl.trans(a)
        acc = tl.dot(w, at, acc, input_precision=DOT_PRECISION)
        if SILU_GATE:
            if DOT_IN_FP32:
                w2 = w2.to(tl.float32)
            acc2 = tl.dot(w2, at, acc2, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        w2_ptrs += BLOCK_K * stride_wk

    if KIND == 0:
        d = s1 / K
        var = tl.maximum(s2 / K - d * d, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
    else:
        d = s1  # unused
        rstd = 1.0 / tl.sqrt(s2 / K + eps)
    _finish(tl.trans(acc), tl.trans(acc2), offs_m, offs_n, M, N, d, rstd, BIAS, RS, RES,
            stride_rm, stride_rn, O0, O1, O2, O3, E1, E2, E3, UP_ROW,
            KIND, HAS_BIAS, HAS_RES, SILU_GATE, NUM_OUT, RNE_BF16)


@triton.jit
def _gemm_tile(
    tile, X, W, x_desc, w_desc, STATS, BIAS, RS, RES, O0, O1, O2, O3, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn, E1, E2, E3, UP_ROW,
    KIND: tl.constexpr, CENTRE: tl.constexpr, CONVERT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, SILU_GATE: tl.constexpr, NUM_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr, RNE_BF16: tl.constexpr,
):
    # Grouped ordering: GROUP_M row blocks sweep the column blocks together, so their W tiles are
    # shared in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile % num_pid_in_group) % group_size_m)
    pid_n = (tile % num_pid_in_group) // group_size_m
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if OFFSETS_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    rows = offs_m % M
    cols = offs_n % N
    if not USE_TMA:
        x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = W + cols[:, None] * stride_wn + offs_k[None, :] * stride_wk
        w2_ptrs = W + (cols[:, None] + UP_ROW) * stride_wn + offs_k[None, :] * stride_wk
    if CENTRE:
        centre = tl.load(STATS + rows * 4)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if USE_TMA:
            # Out-of-bounds rows and K columns read as zeros.
            a = x_desc.load([off_m, k0])
            b = w_desc.load([off_n, k0])
            if SILU_GATE:
                b2 = w_desc.load([UP_ROW + off_n, k0])
        elif EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
            if SILU_GATE:
                b2 = tl.load(w2_ptrs)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
            if SILU_GATE:
                b2 = tl.load(w2_ptrs, mask=k_ok[None, :], other=0.0)
        if CENTRE:
            af = a.to(tl.float32) - centre[:, None]
            if not EVEN_K:
                af = tl.where((offs_k < K - k0)[None, :], af, 0.0)
            a = _round(af, W.dtype.element_ty, RNE_BF16)
        elif CONVERT:
            a = _round(a.to(tl.float32), W.dtype.element_ty, RNE_BF16)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        if SILU_GATE:
            if DOT_IN_FP32:
                b2 = b2.to(tl.float32)
            acc2 = tl.dot(a, tl.trans(b2), acc2, input_precision=DOT_PRECISION)
        if not USE_TMA:
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
            w2_ptrs += BLOCK_K * stride_wk
    d = tl.load(STATS + rows * 4 + 1)
    rstd = tl.load(STATS + rows * 4 + 2)
    _finish(acc, acc2, offs_m, offs_n, M, N, d, rstd, BIAS, RS, RES, stride_rm, stride_rn,
            O0, O1, O2, O3, E1, E2, E3, UP_ROW,
            KIND, HAS_BIAS, HAS_RES, SILU_GATE, NUM_OUT, RNE_BF16)


@triton.jit
def gemm_kernel(
    X, W, x_desc, w_desc, STATS, BIAS, RS, RES, O0, O1, O2, O3,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn,
    E1, E2, E3, UP_ROW, NUM_PROGS,
    KIND: tl.constexpr, CENTRE: tl.constexpr, CONVERT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, SILU_GATE: tl.constexpr, NUM_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, PERSISTENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, OFFSETS_64: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    """"split": y tiles of x·W'^T with the norm applied in the epilogue from STATS.

    STATS[m] = (c, d, rstd, 0) in fp32 from :func:`row_stats_kernel` (an earlier launch on the
    same stream: complete before this kernel starts). Main loop: acc = a·W'^T with a = x as
    loaded (CENTRE 0: a plain GEMM whose operands go from the async copy / TMA straight to the
    tensor cores) or a = x - c rounded to W's dtype (CENTRE 1: float32 weights or x of another
    dtype, where the operand is converted in registers anyway; CONVERT: the conversion alone,
    RMSNorm). Epilogue: :func:`_finish` with d and rstd (LayerNorm raw: d is the whole mean).
    PERSISTENT: NUM_PROGS programs take tiles pid, pid + NUM_PROGS, ... (each tile still written
    by exactly one program); otherwise one tile per program.

    Traffic: W read ceil(M / BLOCK_M) times (L2 absorbs most through GROUP_M), x read
    ceil(N / BLOCK_N) times, 12 bytes of statistics per row per column block, y written once.
    FLOPs: 2 * M * N * K (SiLU-gate: N counts both halves).
    """
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in range(tl.program_id(0), num_tiles, NUM_PROGS):
            _gemm_tile(tile, X, W, x_desc, w_desc, STATS, BIAS, RS, RES, O0, O1, O2, O3, M, N, K,
                       stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn,
                       E1, E2, E3, UP_ROW, KIND, CENTRE, CONVERT, HAS_BIAS, HAS_RES, SILU_GATE,
                       NUM_OUT, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, USE_TMA,
                       DOT_PRECISION, DOT_IN_FP32, OFFSETS_64, RNE_BF16)
    else:
        _gemm_tile(tl.program_id(0), X, W, x_desc, w_desc, STATS, BIAS, RS, RES, O0, O1, O2, O3,
                   M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_rm, stride_rn,
                   E1, E2, E3, UP_ROW, KIND, CENTRE, CONVERT, HAS_BIAS, HAS_RES, SILU_GATE,
                   NUM_OUT, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, USE_TMA,
                   DOT_PRECISION, DOT_IN_FP32, OFFSETS_64, RNE_BF16)


@triton.jit
def _row_block(X, M, stride_xm, stride_xk, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
               OFFSETS_64: tl.constexpr):
    """(offs_m, row_ok, offs_k, x_ptrs) of this program's BLOCK_M rows and first BLOCK_K columns.
    Rows past M wrap (x_ptrs reads row offs_m % M), so loads need no row mask; row_ok says
    which rows to store."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if OFFSETS_64:
        offs_m = offs_m.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + (offs_m % M)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    return offs_m, offs_m < M, offs_k, x_ptrs


@triton.jit
def row_stats_kernel(X, STATS, XN, M, K, eps, stride_xm, stride_xk,
                     KIND: tl.constexpr, CENTRE: tl.constexpr, WRITE_STATS: tl.constexpr,
                     WRITE_XN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN_K: tl.constexpr, OFFSETS_64: tl.constexpr, RNE_BF16: tl.constexpr):
    """Per-row statistics ("split") and/or the normalised rows ("cublas").

    Math (fp32): LayerNorm: with x0 = the mean of the row's first BLOCK_K elements
    (``tiles.first_tile_mean``), s1 = sum(x - x0),
    s2 = sum((x - x0)^2), dm = s1/K, mean = x0 + dm, var = max(s2/K - dm^2, 0),
    rstd = rsqrt(var + eps). RMSNorm: rstd = rsqrt(sum(x^2)/K + eps).
    WRITE_STATS: STATS[m] = (c, d, rstd, 0), where c is what the GEMM subtracts in its loop and
    d = mean - c what its epilogue still has to: CENTRE: c = mean rounded to fp32 and
    d = (x0 - c) + dm (the part of the mean c does not hold); else c = 0, d = mean (RMSNorm: 0).
    WRITE_XN: XN[m, :] = ((x - x0) - dm) * rstd (LayerNorm) or x * rstd, rounded to XN's dtype
    (a second sweep over the row, from L2).
    Traffic: reads x once from memory (twice from L2 with WRITE_XN), writes 16 bytes per row and
    with WRITE_XN M * K * e_w.
    """
    offs_m, row_ok, offs_k, x_ptrs = _row_block(X, M, stride_xm, stride_xk, BLOCK_M, BLOCK_K,
                                                OFFSETS_64)
    row_start = x_ptrs
    if KIND == 0:
        x0 = first_tile_mean(x_ptrs, (offs_k < K)[None, :], tl.minimum(K, BLOCK_K))
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs).to(tl.float32)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0).to(tl.float32)
        if KIND == 0:
            a = a - x0[:, None]
            if not EVEN_K:
                a = tl.where(k_ok[None, :], a, 0.0)
            s1 += tl.sum(a, 1)
        s2 += tl.sum(a * a, 1)
        x_ptrs += BLOCK_K * stride_xk
    if KIND == 0:
        dm = s1 / K
        var = tl.maximum(s2 / K - dm * dm, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        if CENTRE:
            c = x0 + dm
            d = (x0 - c) + dm
        else:
            c = tl.zeros([BLOCK_M], dtype=tl.float32)
            d = x0 + dm
    else:
        rstd = 1.0 / tl.sqrt(s2 / K + eps)
        c = tl.zeros([BLOCK_M], dtype=tl.float32)
        d = tl.zeros([BLOCK_M], dtype=tl.float32)
    if WRITE_STATS:
        tl.store(STATS + offs_m * 4, c, mask=row_ok)
        tl.store(STATS + offs_m * 4 + 1, d, mask=row_ok)
        tl.store(STATS + offs_m * 4 + 2, rstd, mask=row_ok)
        tl.store(STATS + offs_m * 4 + 3, tl.zeros([BLOCK_M], dtype=tl.float32), mask=row_ok)
    if WRITE_XN:
        x_ptrs = row_start
        xn_ptrs = XN + offs_m[:, None] * K + offs_k[None, :]
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0).to(tl.float32)
            if KIND == 0:
                a = (a - x0[:, None]) - dm[:, None]
            a = a * rstd[:, None]
            tl.store(xn_ptrs, _round(a, XN.dtype.element_ty, RNE_BF16),
                     mask=row_ok[:, None] & k_ok[None, :])
            x_ptrs += BLOCK_K * stride_xk
            xn_ptrs += BLOCK_K


@triton.jit
def normalize_tile_kernel(X, XN, M, K, eps, stride_xm, stride_xk, KIND: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                          OFFSETS_64: tl.constexpr, RNE_BF16: tl.constexpr):
    """XN = the normalised rows of X, each row whole in one tile (BLOCK_K >= K).

    The same formulas as :func:`row_stats_kernel` with WRITE_XN, its centre x0 being the whole
    row's mean (as :func:`normalise_rows` states them): x is loaded once and kept in registers,
    where row_stats_kernel reads the row's first tile, then sweeps it, then sweeps it again to
    write (3 dependent rounds of loads, the later ones from L2): here a program's only load is
    issued at its start, so the memory system sees every resident program's rows at once.
    Traffic: reads x once, writes M * K * e_w.
    """
    offs_m, row_ok, offs_k, x_ptrs = _row_block(X, M, stride_xm, stride_xk, BLOCK_M, BLOCK_K,
                                                OFFSETS_64)
    k_ok = offs_k < K
    if EVEN_K:
        a = tl.load(x_ptrs).to(tl.float32)
    else:
        a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0).to(tl.float32)
    if KIND == 0:
        x0 = tl.sum(a, 1) / K
        a = a - x0[:, None]
        if not EVEN_K:
            a = tl.where(k_ok[None, :], a, 0.0)
        dm = tl.sum(a, 1) / K
        var = tl.maximum(tl.sum(a * a, 1) / K - dm * dm, 0.0)
        a = (a - dm[:, None]) * (1.0 / tl.sqrt(var + eps))[:, None]
    else:
        a = a * (1.0 / tl.sqrt(tl.sum(a * a, 1) / K + eps))[:, None]
    tl.store(XN + offs_m[:, None] * K + offs_k[None, :], _round(a, XN.dtype.element_ty, RNE_BF16),
             mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def gate_kernel(G, RES, OUT, M, N, stride_gm, stride_rm, stride_rn,
                HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, OFFSETS_64: tl.constexpr,
                RNE_BF16: tl.constexpr):
    """"cublas" SiLU-gate: OUT[m, n] = silu(G[m, n]) * G[m, N + n] (+ RES[m, n]), fp32 math,
    rounded once. One program per (row, BLOCK_N columns). Traffic: reads 2N + N (residual),
    writes N elements per row. Rows are grid axis 0 (axis 1 stops at 65535 rows)."""
    m = tl.program_id(0)
    if OFFSETS_64:
        m = m.to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs_n < N
    g = tl.load(G + m * stride_gm + offs_n, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(G + m * stride_gm + N + offs_n, mask=ok, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    if HAS_RES:
        y += tl.load(RES + m * stride_rm + offs_n * stride_rn, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + m * N + offs_n, _round(y, OUT.dtype.element_ty, RNE_BF16), mask=ok)


# ------------------------------------------------------------------------------------------------
# Configuration: the dispatch table and each design's launch parameters
# ------------------------------------------------------------------------------------------------

# Shared memory per SM (H100/H200: 228 KB, of which 227 KB per block) and the CTA limit used to
# estimate how many "fused" programs run at once.
_SMEM_PER_SM = 227 * 1024
_MAX_CTAS_PER_SM = 16


@functools.lru_cache(maxsize=16)
def _num_sms(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 132  # H200: only used to shape configs the CPU lane checks
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# The "cublas" design's normalise kernel: whole rows in one tile (normalize_tile_kernel) to
# ONE_TILE_MAX_K columns, BLOCK_M rows and num_warps by the row's padded width; past it the looped
# row_stats_kernel, 2 rows x 2048 columns a program (s7run1-3's default). H200, K = 4096 bf16
# (s27run1, bench/bench_row_kernels.py, CUDA-graph replay, L2 flushed): one row and 4 warps a
# program ran 13.8-13.9 us at 2048 rows (a copy of the same 32 MB: 13.8-13.9 us; the looped
# kernel 14.2-15.9; Inductor's norm 14.2-19.3) and 38.5-39.4 us at 8192 (copy 37.1-37.4; looped
# 40.0-43.0; Inductor 40.2-48.1); 1-2 rows with 2-8 warps were within 5% of it, 4 rows 1.05-1.2x
# slower. Rows padded to 8192 and 16384 columns (s27run4 at K = 12288, s27run6 at 5120, 11008
# and 14336; LayerNorm / RMSNorm at 2048 rows, ms at 8192 in the raw files): one row with 4
# warps at 5120 ran 17.4 / 15.9 us (8 warps 18.6 / 16.1, the looped kernel 19.0 / 17.7,
# Inductor 22.5 / 16.4, a copy 15.6-15.9); one row with 8 warps at 11008 27.5 us for RMSNorm
# (16 warps 29.8, Inductor 26.3) and 34.7 for LayerNorm (16 warps 34.0, Inductor 38.6), at
# 12288 and 14336 8 and 16 warps within 3% of each other and 1.2-1.45x faster than the looped
# kernel; 2-4 rows a program 1.1-1.5x slower. Inductor's normalisation is faster in places (RMSNorm
# 1.04-1.05x at 11008-14336 columns, LayerNorm 1.12x at 14336 columns and 8192 rows).
ONE_TILE_MAX_K = 16384
ONE_TILE_BY_K = {  # padded K -> (rows a program, warps)
    16: (4, 4), 32: (4, 4), 64: (4, 4), 128: (4, 4), 256: (4, 4), 512: (2, 4), 1024: (1, 4),
    2048: (1, 4), 4096: (1, 4), 8192: (1, 4), 16384: (1, 8)}
# Under the interpreter rows to this padded width take the one-tile kernel (the CPU tests' odd K
# of 33-50 columns), wider ones the looped kernel in 32-column tiles: both run on the CPU lane.
INTERPRETER_ONE_TILE_MAX_K = 64
# The SiLU-gate pass: BLOCK_N gated columns of one row a program. s27run1 (N = 11008): 38.9 us
# at 2048 rows (copy of as many bytes 37.1, Inductor 39.2), 135.6 at 8192 (copy 132.2, Inductor
# 129.4); 512-4096 columns and 2-8 warps were within 3% of it.
GATE_BLOCK_N = 1024
GATE_WARPS = 4


def normalize_tile(K: int) -> dict:
    """The normalise kernel's STATS_BLOCK_M / STATS_BLOCK_K / STATS_WARPS for rows of K."""
    kp2 = max(16, triton.next_power_of_2(K))
    if kp2 <= ONE_TILE_MAX_K:
        bm, warps = ONE_TILE_BY_K[kp2]
        return dict(STATS_BLOCK_M=bm, STATS_BLOCK_K=kp2, STATS_WARPS=warps)
    return dict(STATS_BLOCK_M=2, STATS_BLOCK_K=2048, STATS_WARPS=8)


def design_for(M: int) -> str:
    """The design :data:`DISPATCH` gives M rows."""
    for max_m, design in DISPATCH:
        if max_m is None or M <= max_m:
            return design
    raise AssertionError("DISPATCH must end with (None, design)")


def _fused_config(M, N, K, dtype, epilogue, num_sms):
    """Rows per program by M; then the (BLOCK_N, num_stages) whose grid is one wave.

    Decode reads the weight once, so its speed is how much of it is in flight and whether every
    SM streams until the end: the grid should fill the SMs (>= num_sms programs) and fit in one
    wave at the occupancy shared memory allows (a second, partial wave leaves most SMs idle while
    it runs). The product (BLOCK_N x BLOCK_K by BLOCK_M) is tensor-core work of no consequence.
    """
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    bk = 128 if dtype != torch.float32 else 64
    halves = 2 if epilogue == "silu_gate" else 1
    if halves == 2 and bm == 16 and dtype != torch.float32:
        # Two weight tiles a step: 128-row tiles, 8 warps, 3 stages (209 KB of shared memory,
        # one program per SM, under one wave) were the fastest swept at M = 1 and 16 (CUDA-graph
        # time, s7run2: 0.0455 / 0.0451 ms against 0.0500 / 0.0453 for this rule's 64 x 3).
        return dict(design="fused", BLOCK_M=bm, BLOCK_N=128, BLOCK_K=bk, num_warps=8,
                    num_stages=3)
    esize = 4 if dtype == torch.float32 else 2
    rows_blocks = _cdiv(M, bm)
    choice = None
    for bn, stages in ((128, 4), (64, 4), (64, 3), (32, 4), (32, 3), (16, 4), (16, 3)):
        smem = stages * (halves * bn + bm) * bk * esize
        per_sm = min(_SMEM_PER_SM // smem, _MAX_CTAS_PER_SM)
        grid = rows_blocks * _cdiv(N, bn)
        if num_sms <= grid <= per_sm * num_sms:
            choice = (bn, stages)
            break
    bn, stages = choice or (64, 4)
    return dict(design="fused", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=stages)


def choose_config(M: int, N: int, K: int, dtype: torch.dtype, epilogue: str = "none", *,
                  interpreter: bool = False, design: Optional[str] = None,
                  num_sms: int = 132) -> dict:
    """Launch parameters for one call; a pure function of its arguments.

    `N` is the number of output columns (SiLU-gate: the gated width, half the weight's rows),
    `dtype` the weight's. `design` overrides :data:`DISPATCH`. Returns ``dict(design=..., ...)``:
    "fused": BLOCK_M/BLOCK_N/BLOCK_K/num_warps/num_stages (:func:`_fused_config`);
    "split": the GEMM tile (128 x 256 x 64, 8 warps, 3 stages, GROUP_M 8, TMA where the strides
    allow, not persistent: the usual Hopper bf16 tile; SiLU-gate holds two accumulators, so
    128 x 128; fp32 halves BLOCK_K) and the statistics kernel's STATS_BLOCK_M/K and STATS_WARPS;
    "cublas": the normalise kernel's STATS_* (:func:`normalize_tile`) and, for SiLU-gate, the
    gate pass's GATE_BLOCK_N / GATE_WARPS (module defaults when absent).
    Interpreter: 16 x 32 x 32 tiles, one stage (it only has to be right; its cost is per program
    and per step), the same design rule, so every design runs on the CPU lane.
    """
    design = design or design_for(M)
    if design not in DESIGNS:
        raise ValueError(f"unknown norm_linear design {design!r}; valid: {', '.join(DESIGNS)}")
    kp2 = max(16, triton.next_power_of_2(K))
    stats = dict(STATS_BLOCK_M=4, STATS_BLOCK_K=min(kp2, 1024), STATS_WARPS=4)
    if interpreter:
        return dict(design=design, BLOCK_M=16, BLOCK_N=32,
                    BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1, USE_TMA=False,
                    PERSISTENT=False, STATS_BLOCK_M=16,
                    STATS_BLOCK_K=kp2 if kp2 <= INTERPRETER_ONE_TILE_MAX_K else 32,
                    STATS_WARPS=4)
    if design == "fused":
        cfg = _fused_config(M, N, K, dtype, epilogue, num_sms)
    elif design == "split":
        bm, bn, bk, warps, stages = 128, 256, 64, 8, 3
        if epilogue == "silu_gate":
            bn = 128
        if dtype == torch.float32:
            bk = 32
        cfg = dict(design="split", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                   num_warps=warps, num_stages=stages, USE_TMA=True, PERSISTENT=False, **stats)
    else:
        cfg = dict(design="cublas", **normalize_tile(K))
    if "BLOCK_K" in cfg:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], kp2)
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(N)))
    return cfg


def dispatch_table(N: int, K: int, dtype: torch.dtype, epilogue: str = "none",
                   ms=(1, 16, 64, 65, 2048, 8192)) -> list[dict]:
    """What :func:`choose_config` gives at each M (for the benchmark's printout)."""
    return [dict(M=m, **choose_config(m, N, K, dtype, epilogue)) for m in ms]


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
#
# Decode calls take ~30 µs of GPU time, so the Python between the op's entry and the kernel launch
# matters as much as the kernel: everything that depends only on the call's signature (sizes,
# strides, dtypes, flags: what `supports` checks, the config, grid, constexprs) is computed once
# into a _Plan and cached; a call then allocates its outputs and launches.


_cdiv = contract.cdiv


def _out_widths(N: int, epilogue: str, splits) -> list[int]:
    n_out = N // 2 if epilogue == "silu_gate" else N
    return [int(s) for s in splits] if splits else [n_out]


def _needs_64bit_offsets(x2, weight, res2, n_cols, cfg) -> bool:
    """Whether any element offset a program forms (row blocks overhang M by < BLOCK_M rows, column
    blocks N by < BLOCK_N) can pass int32: x, W, the outputs, the residual, x̂, and cuBLAS's
    [M, weight rows] product that the SiLU-gate kernel reads."""
    M, K = x2.shape
    pad_m = M + cfg.get("BLOCK_M", 0) + cfg.get("STATS_BLOCK_M", 0)
    pad_n = max(n_cols, weight.shape[0]) + cfg.get("BLOCK_N", 0)
    spans = [pad_m * x2.stride(0) + K * x2.stride(1),
             weight.shape[0] * weight.stride(0) + K * weight.stride(1),
             pad_m * pad_n, pad_m * K]
    if res2 is not None:
        spans.append(pad_m * res2.stride(0) + pad_n * res2.stride(1))
    return max(spans) >= 2**31


def _tma_ok(t: torch.Tensor) -> bool:
    """TMA needs a 16-byte aligned base, unit last stride and 16-byte aligned other strides."""
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1]))


_PLACEHOLDERS: dict = {}


def _placeholder(device: torch.device) -> torch.Tensor:
    """A 1-element fp32 tensor for pointer arguments the variant never reads (no bias, ...).
    Kept per device, allocated outside the CUDA-graph pools (one first made in a CUDA-graph
    trees' warm-up was refused there: s13run1); during a capture a new one, the graph's own."""
    t = _PLACEHOLDERS.get(device)
    if t is None:
        if contract.capturing(device):
            return torch.zeros(1, dtype=torch.float32, device=device)
        t = _PLACEHOLDERS[device] = contract.made_off_graph_pools(
            lambda: torch.zeros(1, dtype=torch.float32, device=device), device)
    return t


class _CastCache:
    """``t.to(dtype)`` remembered per source tensor (the folded bias for cuBLAS, in the weight's
    dtype): the conversion is a launch of its own, paid once instead of on every call. An entry
    is used only while its source is alive and unmodified (same object, same version).

    A CUDA graph that used an entry points at it, so an entry is dropped only once its source is
    gone (the graph's owner keeps the source alive): past `size` entries, the dead ones are
    pruned, never a live one. Conversions are made outside the CUDA-graph pools
    (:func:`contract.made_off_graph_pools`), and during a capture a miss is converted inside the
    graph and not kept."""

    def __init__(self, size: int = 256):
        self.size, self.entries = size, {}

    def __call__(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if t.dtype == dtype:
            return t
        key = (id(t), dtype)
        hit = self.entries.get(key)
        if hit is not None and hit[0]() is t and hit[1] == t._version:
            return hit[2]
        if contract.capturing(t.device):
            return t.to(dtype)
        out = contract.made_off_graph_pools(lambda: t.to(dtype), t.device)
        if len(self.entries) >= self.size:
            self.entries = {k: e for k, e in self.entries.items() if e[0]() is not None}
        self.entries[key] = (weakref.ref(t), t._version, out)
        return out


_cast = _CastCache()


def _fp32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.float().contiguous()


class _Plan:
    """What a call needs beyond its tensors; one per call signature (see :func:`_plan_key`)."""

    def __init__(self, x, weight, bias, rowsum, eps, kind, residual, epilogue, splits,
                 interpreter, config):
        K = x.shape[-1]
        self.widths = _out_widths(weight.shape[0], epilogue, splits)
        self.n_cols = n_cols = sum(self.widths)
        self.lead = tuple(x.shape[:-1])
        self.M = M = x.numel() // K if K else 0
        self.K = K
        self.kind, self.epilogue, self.eps = kind, epilogue, float(eps)
        if M == 0 or n_cols == 0:
            self.design = None
            return
        if config is None:
            num_sms = _num_sms(x.device.index or 0) if x.device.type == "cuda" else 132
            config = _cached_config(M, n_cols, K, weight.dtype, epilogue, interpreter, num_sms)
        self.cfg = cfg = dict(config)
        self.design = cfg["design"]
        # The Triton epilogues need rowsum(W') for LayerNorm; "cublas" normalises x instead.
        self.needs_rowsum = kind == "layernorm" and rowsum is None and self.design != "cublas"
        x2 = x.reshape(M, K)
        res2 = residual.reshape(M, n_cols) if residual is not None else None
        self.res_strides = res2.stride() if res2 is not None else (0, 0)
        self.offsets_64 = offsets_64 = _needs_64bit_offsets(x2, weight, res2, n_cols, cfg)
        bounds = [0]
        for w in self.widths:
            bounds.append(bounds[-1] + w)
        self.ends = (bounds[1:-1] + [n_cols] * 3)[:3]
        self.up_row = n_cols if epilogue == "silu_gate" else 0
        self.strides = (x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1))
        rne = interpreter and weight.dtype == torch.bfloat16
        self.common = dict(
            KIND=0 if kind == "layernorm" else 1, HAS_BIAS=bias is not None,
            HAS_RES=residual is not None, SILU_GATE=epilogue == "silu_gate",
            NUM_OUT=len(self.widths),
            DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
            # Triton 3.6's interpreter multiplies bf16 tiles as their raw uint16 bits; widening
            # the (already bf16-rounded) operands to fp32 gives the exact products of the GPU.
            DOT_IN_FP32=rne, OFFSETS_64=offsets_64, RNE_BF16=rne)
        if self.design in ("split", "cublas"):
            sbm, sbk = cfg["STATS_BLOCK_M"], cfg["STATS_BLOCK_K"]
            self.stats_grid = (_cdiv(M, sbm),)
            self.stats_meta = dict(
                KIND=0 if kind == "layernorm" else 1, BLOCK_M=sbm, BLOCK_K=sbk,
                EVEN_K=K % sbk == 0, OFFSETS_64=offsets_64, num_warps=cfg["STATS_WARPS"])
        if self.design == "fused":
            bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
            scalars = (M, n_cols, K, self.eps, 1.0, *self.strides, *self.res_strides,
                       *self.ends, self.up_row)
            consts = dict(self.common, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0,
                          FULL_M=M % bm == 0)
            # Decode calls are host-bound: launching through the cached CompiledKernel skips
            # Triton's per-call binding of its 37 arguments.
            self.fused_launch = contract.TritonLaunch(
                fused_kernel, (_cdiv(M, bm) * _cdiv(n_cols, bn),),
                contract.TritonLaunch.ordered(fused_kernel, 9, scalars, consts),
                dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
                fast=not interpreter)
        elif self.design == "split":
            bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
            # The operand passes through registers anyway when it must be converted to W's dtype
            # (or W is fp32, whose products are slow anyway): centre it there, exact for any mean.
            convert = x.dtype != weight.dtype
            self.centre = kind == "layernorm" and (convert or weight.dtype == torch.float32)
            self.use_tma = bool(cfg.get("USE_TMA")) and _tma_ok(x2) and _tma_ok(weight)
            self.tma_blocks = ([bm, bk], [bn, bk])
            tiles = _cdiv(M, bm) * _cdiv(n_cols, bn)
            persistent = bool(cfg.get("PERSISTENT"))
            if persistent:
                progs = cfg.get("NUM_PROGS") or (
                    _num_sms(x.device.index or 0) if x.device.type == "cuda" else 4)
                self.num_progs = min(tiles, progs)
            else:
                self.num_progs = tiles
            self.meta = dict(self.common, CENTRE=self.centre, CONVERT=convert, BLOCK_M=bm,
                             BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], EVEN_K=K % bk == 0,
                             USE_TMA=self.use_tma, PERSISTENT=persistent,
                             num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            self.stats_meta.update(CENTRE=self.centre, WRITE_STATS=True, WRITE_XN=False,
                                   RNE_BF16=False)
        else:
            self.norm_one_tile, self.norm_meta = _norm_meta(kind, cfg, K, offsets_64, rne)
            # cuBLAS adds the residual before its one rounding when it can take it as addmm's C.
            self.res_in_gemm = (residual is not None and bias is None
                                and residual.dtype == weight.dtype)
            gbn = cfg.get("GATE_BLOCK_N", GATE_BLOCK_N)
            self.gate_grid = (M, _cdiv(n_cols, gbn))
            self.gate_meta = dict(HAS_RES=residual is not None, BLOCK_N=gbn,
                                  OFFSETS_64=offsets_64, RNE_BF16=rne,
                                  num_warps=cfg.get("GATE_WARPS", GATE_WARPS))


def _plan_key(x, weight, bias, rowsum, eps, kind, residual, epilogue, splits, interpreter,
              config):
    sig = contract.signature
    return (sig(x), sig(weight), sig(bias), sig(rowsum), eps, kind, sig(residual), epilogue,
            None if splits is None else tuple(splits), interpreter,
            None if config is None else tuple(sorted(config.items())))


_PLANS: dict = {}
_MAX_PLANS = 4096


def _launch(x, weight, bias, rowsum, eps, kind, residual=None, epilogue="none", splits=None,
            *, interpreter=False, config=None):
    """Run the chosen design; `config` overrides :func:`choose_config` (the benchmark's sweep and
    the tests use it, e.g. ``dict(choose_config(...), design="split")``)."""
    key = _plan_key(x, weight, bias, rowsum, eps, kind, residual, epilogue, splits, interpreter,
                    config)
    plan = _PLANS.get(key)
    if plan is None:
        reason = supports(x, weight, bias, rowsum, eps, kind, residual, epilogue, splits)
        if reason is not None:
            raise ValueError(f"q3n::norm_linear: {reason}")
        plan = _Plan(x, weight, bias, rowsum, eps, kind, residual, epilogue, splits, interpreter,
                     config)
        contract.remember(_PLANS, key, plan, _MAX_PLANS)
    M = plan.M
    # One allocation per output: outputs must not share storage (see the module docstring).
    outs = [torch.empty((M, w), dtype=weight.dtype, device=x.device) for w in plan.widths]
    if plan.design is not None:
        x2 = x if x.dim() == 2 else x.reshape(M, plan.K)
        res2 = None if residual is None else (
            residual if residual.dim() == 2 else residual.reshape(M, plan.n_cols))
        if plan.needs_rowsum:  # (documented: pass rowsum, this reads the weight once more)
            rowsum = weight.float().sum(1)
        _RUN[plan.design](plan, x2, weight, bias, rowsum, res2, outs)
    if len(plan.lead) == 1:
        return outs
    return [out.view(*plan.lead, w) for out, w in zip(outs, plan.widths)]


@functools.lru_cache(maxsize=4096)
def _cached_config(M, N, K, dtype, epilogue, interpreter, num_sms):
    return choose_config(M, N, K, dtype, epilogue, interpreter=interpreter, num_sms=num_sms)


def _run_fused(p, x2, weight, bias, rowsum, res2, outs):
    unused = _placeholder(x2.device)
    o = outs + [outs[0]] * (MAX_OUTPUTS - len(outs))
    p.fused_launch(x2, weight, _fp32(bias) if bias is not None else unused,
                   _fp32(rowsum) if p.kind == "layernorm" else unused,
                   unused if res2 is None else res2, o[0], o[1], o[2], o[3])


def _run_split(p, x2, weight, bias, rowsum, res2, outs):
    unused = _placeholder(x2.device)
    o = outs + [outs[0]] * (MAX_OUTPUTS - len(outs))
    stats = torch.empty((p.M, 4), dtype=torch.float32, device=x2.device)
    row_stats_kernel[p.stats_grid](x2, stats, unused, p.M, p.K, p.eps, p.strides[0],
                                   p.strides[1], **p.stats_meta)
    if p.use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_desc = TensorDescriptor(x2, list(x2.shape), list(x2.stride()), p.tma_blocks[0])
        w_desc = TensorDescriptor(weight, list(weight.shape), list(weight.stride()),
                                  p.tma_blocks[1])
    else:
        x_desc = w_desc = unused  # never read: USE_TMA is a constexpr
    gemm_kernel[(p.num_progs,)](
        x2, weight, x_desc, w_desc, stats, _fp32(bias) if bias is not None else unused,
        _fp32(rowsum) if p.kind == "layernorm" else unused,
        unused if res2 is None else res2, o[0], o[1], o[2], o[3], p.M, p.n_cols, p.K,
        *p.strides, *p.res_strides, p.ends[0], p.ends[1], p.ends[2], p.up_row, p.num_progs,
        **p.meta)


def _normalize_into(xn, x2, M, K, eps, stride_xm, stride_xk, grid, meta, one_tile):
    """xn = the normalised rows of x2 by :func:`normalize_tile_kernel` (`one_tile`: a row fits
    the tile) or :func:`row_stats_kernel` (WRITE_XN); `meta` is the kernel's constexprs."""
    if one_tile:
        normalize_tile_kernel[grid](x2, xn, M, K, eps, stride_xm, stride_xk, **meta)
    else:
        row_stats_kernel[grid](x2, _placeholder(x2.device), xn, M, K, eps, stride_xm, stride_xk,
                               **meta)


def _norm_meta(kind, cfg, K, offsets_64, rne) -> tuple[bool, dict]:
    """(one_tile, constexprs) of the normalise kernel :func:`_normalize_into` runs for `cfg`
    (its STATS_* keys): the one-tile kernel wherever STATS_BLOCK_K holds the whole row."""
    bm, bk = cfg["STATS_BLOCK_M"], cfg["STATS_BLOCK_K"]
    meta = dict(KIND=0 if kind == "layernorm" else 1, BLOCK_M=bm, BLOCK_K=bk,
                EVEN_K=K % bk == 0, OFFSETS_64=offsets_64, RNE_BF16=rne,
                num_warps=cfg["STATS_WARPS"])
    if bk >= K:
        return True, meta
    return False, dict(meta, CENTRE=False, WRITE_STATS=False, WRITE_XN=True)


def _run_cublas(p, x2, weight, bias, rowsum, res2, outs):
    unused = _placeholder(x2.device)
    xn = torch.empty((p.M, p.K), dtype=weight.dtype, device=x2.device)
    _normalize_into(xn, x2, p.M, p.K, p.eps, p.strides[0], p.strides[1], p.stats_grid,
                    p.norm_meta, p.norm_one_tile)
    b = _cast(bias, weight.dtype) if bias is not None else None
    if p.epilogue == "silu_gate":
        g = torch.mm(xn, weight.t()) if b is None else torch.addmm(b, xn, weight.t())
        gate_kernel[p.gate_grid](g, unused if res2 is None else res2, outs[0], p.M, p.n_cols,
                                 g.stride(0), *p.res_strides, **p.gate_meta)
        return
    start = 0
    for out, w in zip(outs, p.widths):
        wt = weight[start: start + w].t()
        if p.res_in_gemm:
            torch.addmm(res2, xn, wt, out=out)
        elif b is not None:
            torch.addmm(b[start: start + w], xn, wt, out=out)
        else:
            torch.mm(xn, wt, out=out)
        start += w
    if res2 is not None and not p.res_in_gemm:
        torch.add(outs[0], res2, out=outs[0])


_RUN = {"fused": _run_fused, "split": _run_split, "cublas": _run_cublas}


# ------------------------------------------------------------------------------------------------
# Reference, registration, supports
# ------------------------------------------------------------------------------------------------


def reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              rowsum: Optional[torch.Tensor], eps: float, kind: str,
              residual: Optional[torch.Tensor] = None, epilogue: str = "none",
              splits: Optional[List[int]] = None) -> List[torch.Tensor]:
    """Plain torch with the op's semantics: normalise, then the linear; fp32 (fp64 if any input
    is fp64). `rowsum` is not used: it is a kernel detail (``weight.sum(1)``)."""
    wide = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    xf = x.to(wide)
    if kind == "layernorm":
        mean = xf.mean(-1, keepdim=True)
        var = (xf - mean).square().mean(-1, keepdim=True)
        xn = (xf - mean) * torch.rsqrt(var + eps)
    else:
        xn = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    y = xn @ weight.to(wide).t()
    if bias is not None:
        y = y + bias.to(wide)
    if epilogue == "silu_gate":
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    if residual is not None:
        y = y + residual.to(wide)
    widths = _out_widths(weight.shape[0], epilogue, splits)
    # A fresh tensor per output: with one row, y[..., :n0] is already contiguous and
    # .contiguous() would hand back views of one buffer, which a custom op may not return.
    parts = y.split(widths, dim=-1)
    if len(parts) == 1:
        return [parts[0].to(weight.dtype).contiguous()]
    return [part.to(weight.dtype).clone(memory_format=torch.contiguous_format) for part in parts]


def _known(cond) -> bool:
    # Guard-free: on SymInts this answers from what the shape env already knows, adding no guard.
    if isinstance(cond, bool):  # real sizes (every launch): no import, no sympy
        return cond
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return statically_known_true(cond)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def supports(x, weight, bias=None, rowsum=None, eps=1e-5, kind="layernorm", residual=None,
             epilogue="none", splits=None) -> Optional[str]:
    """None if the Triton kernels handle these arguments, else why not. Safe on FakeTensors.

    K and N must be provable (they are the weight's static sizes); the leading sizes of x may be
    symbolic.
    """
    if kind not in KINDS:
        return f"kind {kind!r} is not one of {KINDS}"
    if epilogue not in EPILOGUES:
        return f"epilogue {epilogue!r} is not one of {EPILOGUES}"
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in _DTYPES:
            return f"dtype {_dt(t.dtype)} not supported (float16, bfloat16, float32)"
    if weight.dim() != 2:
        return f"weight must be 2-D [N, K], got {weight.dim()}-D"
    if x.dim() < 1:
        return "x must have at least one dim"
    N, K = weight.shape
    if not _known(x.shape[-1] == K):
        return f"x's last dim {x.shape[-1]} != weight's K {K}"
    if not _known(K >= 1):
        return "K is empty"
    if x.device != weight.device:
        return f"devices differ: x {x.device}, weight {weight.device}"
    if epilogue == "silu_gate" and not _known(N % 2 == 0):
        return f"silu_gate needs an even number of weight rows, got {N}"
    n_out = N // 2 if epilogue == "silu_gate" else N
    for name, v in (("bias", bias), ("rowsum", rowsum)):
        if v is None:
            continue
        if v.dtype not in _DTYPES and v.dtype != torch.float64:
            return f"{name} dtype {_dt(v.dtype)} not supported"
        if v.dim() != 1 or not _known(v.shape[0] == N):
            return f"{name} must be [N] = [{N}], got {tuple(v.shape)}"
        if v.device != weight.device:
            return f"{name} on {v.device}, weight on {weight.device}"
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        return f"eps must be a non-negative Python number, got {eps!r}"
    if splits is not None:
        if epilogue != "none":
            return "splits need epilogue 'none'"
        if len(splits) < 1 or len(splits) > MAX_OUTPUTS:
            return f"{len(splits)} outputs; at most {MAX_OUTPUTS}"
        if any(not _known(s >= 1) for s in splits) or not _known(sum(splits) == N):
            return f"splits {list(splits)} do not partition N = {N}"
    if residual is not None:
        if splits is not None and len(splits) > 1:
            return "a residual needs a single output"
        if residual.dtype not in _DTYPES:
            return f"residual dtype {_dt(residual.dtype)} not supported"
        if residual.device != x.device:
            return f"residual on {residual.device}, x on {x.device}"
        want = (*x.shape[:-1], n_out)
        if residual.dim() != len(want) or not all(_known(a == b) for a, b in zip(residual.shape, want)):
            return f"residual shape {tuple(residual.shape)} != output shape {want}"
    return None


def _norm_linear_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      rowsum: Optional[torch.Tensor], eps: float, kind: str,
                      residual: Optional[torch.Tensor] = None, epilogue: str = "none",
                      splits: Optional[List[int]] = None) -> List[torch.Tensor]:
    backend = contract.backend_for(x.device)
    if backend == "reference":
        return reference(x, weight, bias, rowsum, eps, kind, residual, epilogue, splits)
    return _launch(x, weight, bias, rowsum, eps, kind, residual, epilogue, splits,
                   interpreter=backend == "interpreter")


def _norm_linear_fake(x, weight, bias, rowsum, eps, kind, residual=None, epilogue="none",
                      splits=None):
    n = weight.shape[0] // 2 if epilogue == "silu_gate" else weight.shape[0]
    widths = list(splits) if splits else [n]
    return [x.new_empty((*x.shape[:-1], w), dtype=weight.dtype) for w in widths]


norm_linear = contract.register_kernel_op("norm_linear", _norm_linear_impl, _norm_linear_fake)


# ------------------------------------------------------------------------------------------------
# q3n::normalize: the normalised rows alone (norm fused with weight-only quantized linears)
# ------------------------------------------------------------------------------------------------
#
# ``q3n::normalize(x, eps, kind, dtype) -> x_hat`` with x_hat [..., K] in `dtype` (float16,
# bfloat16 or float32): x_hat = (x - mean) * rstd (LayerNorm) or x * rstd (RMSNorm), the affine
# parameters left out (the caller folds them into the next linears). It is :func:`row_stats_kernel`
# with WRITE_XN, the "cublas" design's normalise kernel: statistics in float32 from x as given
# (centred on the mean of each row's first block for LayerNorm), one read of x from memory,
# x_hat rounded once and written once. The norm_linear pass emits it before linears that the
# quantize pass turns into ``q3n::qlinear`` with 16-bit activations (their input is x_hat;
# gamma/beta are in their quantized weights), and before linears quantize then keeps in high
# precision. Kernel, interpreter and :func:`reference_normalize` differ by float32 rounding in
# the statistics only.


def normalize_config(M: int, K: int, *, interpreter: bool = False) -> dict:
    """The statistics kernel's launch parameters, as the "cublas" design uses them."""
    cfg = choose_config(max(M, 1), K, K, torch.float32, interpreter=interpreter, design="cublas")
    return {key: cfg[key] for key in ("STATS_BLOCK_M", "STATS_BLOCK_K", "STATS_WARPS")}


def _normalize_launch(x: torch.Tensor, eps: float, kind: str, dtype: torch.dtype, *,
                      interpreter: bool = False, config: Optional[dict] = None) -> torch.Tensor:
    reason = supports_normalize(x, eps, kind, dtype)
    if reason is not None:
        raise ValueError(f"q3n::normalize: {reason}")
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty((M, K), dtype=dtype, device=x.device)
    if M:
        cfg = config or normalize_config(M, K, interpreter=interpreter)
        bm = cfg["STATS_BLOCK_M"]
        offsets_64 = max((M + bm) * max(x2.stride(0), 1) + K * x2.stride(1),
                         (M + bm) * K) >= 2**31
        one_tile, meta = _norm_meta(kind, cfg, K, offsets_64,
                                    interpreter and dtype == torch.bfloat16)
        _normalize_into(out, x2, M, K, float(eps), x2.stride(0), x2.stride(1),
                        (_cdiv(M, bm),), meta, one_tile)
    return out.view(*x.shape[:-1], K)


def normalise_rows(x: torch.Tensor, eps: float, kind: str) -> torch.Tensor:
    """x_hat [M, K] in float32 (float64 for float64 x) by the kernels' formulas: the one
    reference of this module's and ``q3n::norm_act_quant``'s normalisation (LayerNorm statistics
    centred on the row's mean; the kernels centre on the mean of the row's first BLOCK_K
    elements, which is the whole row when it fits one tile)."""
    K = x.shape[-1]
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.reshape(-1, K).to(wide)
    if kind == "layernorm":
        a = xf - xf.mean(1, keepdim=True)
        dm = a.sum(1, keepdim=True) / K
        var = (a.square().sum(1, keepdim=True) / K - dm * dm).clamp_min(0)
        return (a - dm) * (1.0 / torch.sqrt(var + eps))
    return xf * (1.0 / torch.sqrt(xf.square().sum(1, keepdim=True) / K + eps))


def reference_normalize(x: torch.Tensor, eps: float, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Plain torch with ``q3n::normalize``'s semantics (float32 statistics, rounded once)."""
    return normalise_rows(x.float(), eps, kind).to(dtype).view(*x.shape[:-1], x.shape[-1])


def supports_normalize(x, eps=1e-5, kind="rmsnorm", dtype=torch.float32) -> Optional[str]:
    """None if ``q3n::normalize`` handles these arguments, else why not. Safe on FakeTensors."""
    if kind not in KINDS:
        return f"kind {kind!r} is not one of {KINDS}"
    if x.dtype not in _DTYPES or dtype not in _DTYPES:
        bad = x.dtype if x.dtype not in _DTYPES else dtype
        return f"dtype {_dt(bad)} not supported (float16, bfloat16, float32)"
    if x.dim() < 1:
        return "x must have at least one dim"
    K = x.shape[-1]
    if not isinstance(K, int) or K < 1:
        return f"the normalised size must be a static positive int, got {K}"
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        return f"eps must be a non-negative Python number, got {eps!r}"
    return None


def _normalize_impl(x: torch.Tensor, eps: float, kind: str, dtype: torch.dtype) -> torch.Tensor:
    backend = contract.backend_for(x.device)
    if backend == "reference":
        return reference_normalize(x, eps, kind, dtype)
    return _normalize_launch(x, eps, kind, dtype, interpreter=backend == "interpreter")


def _normalize_fake(x, eps, kind, dtype):
    return x.new_empty(x.shape, dtype=dtype)


normalize = contract.register_kernel_op("normalize", _normalize_impl, _normalize_fake)
