"""``q3n::qlinear``'s "i8" path: W8A8 on the int8 tensor cores from a K-major weight.

Why: 8-bit symmetric per-channel weights with int8 per-token activations (the W8A8 format)
need no unpacking at all: ``q - 128`` is the MMA's int8 operand as it is. In the bit-plane
layout (:mod:`packing`, N contiguous, four channels a word) the weight still has to be
transposed through registers before the MMA, which kept the mm tile at 0.41-0.92x bf16 at 256
rows and sent large M to cuBLAS's int8 GEMM behind an unpack of the whole weight on every call
(bench/RESULTS.md, session 25). Stored K-major (:func:`packing.to_kmajor8`: int8 ``[N, K_pad]``,
the layout int8 MMAs read for both operands), both operands go from memory to shared memory and
into the MMA as they are, and the format's scales (one a token, one a column) apply once, in the
epilogue, to the exact int32 sums.

The kernel: ``acc = c[BLOCK_M, K] @ w8[BLOCK_N, K]^T`` in int32 over one split of K (exact:
|c| <= 127, |w8| <= 128, K <= MAX_K = 2^17), then ``y = acc * s_x[m] * s[n] (+ bias[n])``
in fp32, rounded once to y's dtype. SWAP computes the transposed tile ``w8 @ c^T`` (the
weight's BLOCK_N rows
fill the MMA's 64-row side, the few rows of x are its narrow N side, down to 16), which is how
decode sizes use the tensor cores without padding x to 64 rows. Rows of x and weight past M and
N are read wrapped (``offs % M``: always in bounds, never stored), channels past K masked to 0
(EVEN_K drops the masks where every K block is full). With K split (SPLIT), the splits' fp32
partials (each already scaled) are summed in split order by the tile's last split in the same
launch (:func:`tiles.ticket_split_k`), so the result does not depend on timing.

From 513 rows, where its tiles make TMA_MIN_WAVES waves, the same plain tile runs as
:func:`qlinear_i8_tma_kernel`: both operands copied by TMA (whole tiles, zero-filled past M, N
and K), a persistent grid of one program an SM, the same result bit for bit; where TMA cannot
copy the operands (a row stride or base off 16 bytes) the pointer kernel runs the same tile.

Traffic: the weight once per row block of x (consecutive programs of a GROUP_M group share it
through L2), x's codes once per column block, y once; the codes are written by the
activations' quantizer (:func:`qlinear.quantize_activations_triton`) one launch before.

What this module guarantees: :func:`eligible` says whether a call's format is the one this
path computes; :func:`run` computes the op's function (``qlinear.reference`` on
``packing.unpack_codes`` of the K-major weight) for it on the GPU and in the interpreter;
:func:`choose` is a pure function of the shape and the SM count.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from q3n_compile.kernels import contract
from q3n_compile.kernels import packing as P
from q3n_compile.kernels.tiles import grouped_tile, ticket_split_k


@triton.jit
def _prefetch_l2(W, pid_n, N, stride_wn, k_start, k_end, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCKS: tl.constexpr):
    """``prefetch.global.L2`` of weight rows pid_n * BLOCK_N.. over channels [k_start,
    k_start + BLOCKS * BLOCK_K) (one 128-byte line an element; lines past k_end ask for row
    0's first line instead, which is always in bounds)."""
    LINES: tl.constexpr = BLOCKS * BLOCK_K // 128
    rows = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    offs = k_start + tl.arange(0, LINES) * 128
    ptrs = W + rows[:, None] * stride_wn + offs[None, :]
    ptrs = tl.where((offs < k_end)[None, :], ptrs, W)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def qlinear_i8_kernel(C, XS, W, S, BIAS, Y, WS, CNT, M, N, K, K_PER_SPLIT,
                      stride_cm, stride_wn, stride_ym,
                      HAS_BIAS: tl.constexpr, SWAP: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      EVEN_K: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr = False,
                      PREFETCH: tl.constexpr = 0, TRIGGER: tl.constexpr = False):
    """One program: Y[m-block, n-block] over K_PER_SPLIT channels (a multiple of BLOCK_K) of K.

    C int8 codes [M, K] (row stride stride_cm), XS their fp32 per-token scales [M], W int8
    [N, >= K] (row stride stride_wn), S per-column scales [N] (fp16/fp32), BIAS [N].
    PDL (launched with programmatic dependent launch; never under the interpreter): waits for
    the kernel before it (the quantizer writing C and XS) before it reads or writes anything;
    with PREFETCH (a number of K blocks, a power of two), it first asks L2 for its first
    PREFETCH K blocks of the weight (which the quantizer does not write), so those loads
    overlap the quantizer. TRIGGER (a grid of one
    wave): after its K loop it lets the next PDL kernel launch (the next linear's quantizer,
    which waits for this grid to finish before it reads anything), so that launch overlaps the
    epilogue and the split-K reduction."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    if PDL:
        if PREFETCH > 0:
            _prefetch_l2(W, pid_n, N, stride_wn, k_start, k_end, BLOCK_N, BLOCK_K, PREFETCH)
        gdc_wait()
    # Wrapped rows: every load in bounds without a row mask (the extra rows are never stored).
    rows_m = (offs_m % M).to(tl.int64)
    rows_n = (offs_n % N).to(tl.int64)
    c_ptrs = C + rows_m[:, None] * stride_cm + (k_start + offs_k)[None, :]
    w_ptrs = W + rows_n[:, None] * stride_wn + (k_start + offs_k)[None, :]
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(c_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_ok = (k0 + offs_k < k_end)[None, :]
            a = tl.load(c_ptrs, mask=k_ok, other=0)
            b = tl.load(w_ptrs, mask=k_ok, other=0)
        if SWAP:
            acc = tl.dot(b, tl.trans(a), acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        c_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if TRIGGER:
        gdc_launch_dependents()
    m_ok = offs_m < M
    n_ok = offs_n < N
    xs = tl.load(XS + rows_m)
    s = tl.load(S + rows_n).to(tl.float32)
    if SWAP:
        y = acc.to(tl.float32) * s[:, None] * xs[None, :]
        if HAS_BIAS:
            y += tl.load(BIAS + rows_n).to(tl.float32)[:, None] * (pid_k == 0).to(tl.float32)
        y_offs = offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
        y_mask = n_ok[:, None] & m_ok[None, :]
        ws_offs = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
    else:
        y = acc.to(tl.float32) * xs[:, None] * s[None, :]
        if HAS_BIAS:
            y += tl.load(BIAS + rows_n).to(tl.float32)[None, :] * (pid_k == 0).to(tl.float32)
        y_offs = offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
        y_mask = m_ok[:, None] & n_ok[None, :]
        ws_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if SPLIT:
        ticket_split_k(y, Y, y_offs, y_mask, WS, ws_offs, M * N, CNT, pid, pid_k,
                       tl.num_programs(1))
    else:
        tl.store(Y + y_offs, y.to(Y.dtype.element_ty), mask=y_mask)


@triton.jit
def qlinear_i8_tma_kernel(C, XS, W, S, BIAS, Y, M, N, K, stride_cm, stride_wn, stride_ym,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          NUM_PROGRAMS: tl.constexpr, PDL: tl.constexpr = False):
    """The plain tile of :func:`qlinear_i8_kernel` (no K split) with both operands copied to
    shared memory by TMA, persistent: program p computes the GROUP_M-ordered tiles p,
    p + NUM_PROGRAMS, ... (NUM_PROGRAMS is the grid), so the next tile's first copies start
    under the last one's epilogue.

    Same math, same order of the scale products, so the same result bit for bit: ``acc`` exact
    in int32, ``y = acc * s_x[m] * s[n] (+ bias[n])`` in fp32, rounded once. The descriptors
    (built here, in global scratch) cover ``C [M, K]`` and ``W [N, K]``: the copies fill rows
    past M and N and channels past K with zeros, so no load is masked or wrapped. A TMA copy
    moves a whole [BLOCK, BLOCK_K] tile in one instruction where the pointer kernel issues a
    ``cp.async`` per 16 bytes with its address arithmetic (48 a K block at 64 x 128).
    PDL: waits for the quantizer before it reads anything (the descriptors are built first)."""
    c_desc = tl.make_tensor_descriptor(C, shape=[M, K], strides=[stride_cm, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(W, shape=[N, K], strides=[stride_wn, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    if PDL:
        gdc_wait()
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            a = c_desc.load([m0, k0])
            b = w_desc.load([n0, k0])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        store_scaled_tile(acc, m0, n0, M, N, XS, S, BIAS, Y, stride_ym, HAS_BIAS, BLOCK_M,
                          BLOCK_N)


@triton.jit
def store_scaled_tile(acc, m0, n0, M, N, XS, S, BIAS, Y, stride_ym, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y[m0:, n0:] = acc * s_x[m] * s[n] (+ bias[n]) for an exact int32 tile ``acc [BLOCK_M,
    BLOCK_N]`` (plain orientation), in fp32 in the pointer tile's order, rounded once; rows
    past M and columns past N neither loaded nor stored."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    xs = tl.load(XS + offs_m, mask=m_ok, other=0.0)
    s = tl.load(S + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * xs[:, None] * s[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             y.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# |c| <= 127 and |q - 128| <= 128: K products stay exact in int32 while K * 127 * 128 < 2^31.
MAX_K = 131072


def eligible(bits: int, group_size: int, symmetric: bool, act: str,
             act_group_size: int) -> Optional[str]:
    """None if this path computes the format (the one :func:`packing.to_kmajor8` stores), else
    why not."""
    if bits != 8 or not symmetric:
        return f"the K-major int8 weight holds 8-bit symmetric codes, not {bits}-bit" + (
            "" if symmetric else " with zero points")
    if group_size != P.PER_CHANNEL:
        return f"the K-major int8 weight takes per-channel scales, not groups of {group_size}"
    if act != "int8":
        return f"the K-major int8 weight runs with int8 activations, not {act!r}"
    if act_group_size != -1:
        return (f"the K-major int8 weight takes one activation scale per token, not per "
                f"{act_group_size} channels")
    return None


# Interpreter tiles: few programs (each costs ~0.1 s there), both forms exercised.
_INTERPRETER = dict(BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
# GPU tiles, from bench/bench_qlinear_i8.py --sweep (the four shapes; times are against
# the best launch swept for the case):
# - to 16 rows (s26run1, 1 and 16 rows), 64 weight rows x 256 channels, K split to fill two
#   programs an SM: 1.00-1.07x the best (the 128-row tiles 1.00-1.73x);
# - 17-64 rows (s26run1, 64 rows), the same tile split to fill one program an SM where
#   N / 128 < SMs / 2, else 128 weight rows x 128 channels with 6 stages: 1.00-1.03x (the 64 x
#   256 tile unsplit was 1.10-1.18x on 12288 x 4096 and 28672 x 8192, split 4 1.27x on 4096^2);
# - 65-512 rows (s26run3: 96, 128, 192, 256, 384 and 512 rows, the swapped form on blocks of
#   up to 128 rows of x against seven plain tiles): swapped, 128 weight rows x 128 channels with
#   8 warps where those tiles make 1.4 waves or more; else, where the 64-row tiles are at most a
#   wave and K <= 8192, 64 x 256 channels (3 stages) split to fill one program an SM with at
#   least 4 blocks of 256 a split; else 64 x 128 (4 stages) split to fill two programs an SM:
#   1.00-1.11x the best in the 24 cases of the shapes, where the plain tiles of
#   s26run1's rule ran 1.00-1.36x. On 1024 x 4096 and 2048 x 4096 (s26run5, 128-512 rows) the
#   256-channel tile was the best swept in all six cases, and the 128-channel one 1.09-1.15x;
#   session 29 (s29run1: 288-512 rows) found the 128 x 128 tile's whole-tile waves costly where
#   they leave much of the last wave empty (12288 x 4096 at 288-320 rows: three waves of 288
#   tiles, 1.29-1.30x the plain 64 x 128 tile's four waves), so from 65 to 512 rows the rule
#   now counts waves (:func:`_mid_tile`): the 128 x 128 tile, the swapped 64-row tile and the
#   plain 64 x 128 tile each cost their waves of whole tiles, the first's at 2 / WIDE_RATE
#   (each of its tiles holds two of the others' at WIDE_RATE times their rate; 1.4 fits the
#   three sweeps of s26run3, s28run1 and s29run1, where any value outside 1.34-1.49 picks a
#   tile 1.10-1.30x the best in one case); the cheapest is taken (ties: wide, then swapped).
#   it is within 1.045x of the best swept in all 60 cases of those runs and s26run5 (1.30x
#   before); session 30 (s30run1-2, 96-512 rows of six shapes) found the swapped tile on 64
#   rows of x and 64 weight rows (5 stages: two programs an SM) 0.90-0.98x the rule's launch
#   wherever its tiles fit one such wave (2 x SMs) and K <= MID_NARROW_MAX_K (4096^2 to 256 rows,
#   1024 / 2048 x 4096 to 512), with K split to fill the wave by blocks of at least
#   NARROW_MIN_BLOCKS x 128 channels; past that wave (4096^2 from 320 rows, 12288 x 4096 from
#   96) it lost by 1.17-1.23x, and on 4096 x 12288 (K 12288) by up to 1.05x, so the rule takes
#   it there only (it replaces the 64 x 256-channel tile, whose cases all fall in it);
# - from 513 rows (s26run1, 1024 and 4096 rows) 128 x 128 tiles of 64 channels (5 stages)
#   where they make 0.9 of a wave or more: 1.00-1.07x; fewer (small N) 64 x 128 of 128
#   channels, K split in two where the tiles are at most one a wave and K has at least 64
#   blocks of 128 (not measured at those sizes).
SWAP_MAX_M = 64
TILE_SWAP_NARROW = dict(BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=4, num_stages=4)
TILE_SWAP_WIDE = dict(BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=6)
SWAP_MID_MAX_M = 512
TILE_SWAP_MID = dict(BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
TILE_SWAP_MID_NARROW = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4,
                            num_stages=5)
MID_NARROW_MAX_K = 8192
NARROW_MIN_BLOCKS = 8
TILE_SWAP_MID_WIDE = dict(BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
MID_WIDE_MIN_WAVES = 1.4
WIDE_RATE = 1.4
TILE_MM_WIDE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=5)
TILE_MM_NARROW = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4,
                      num_stages=4)
MM_WIDE_MIN_WAVE = 0.9
# From 513 rows where its tiles make TMA_MIN_WAVES waves or more, the TMA tile
# (:func:`qlinear_i8_tma_kernel`), 128 x 256, 8 warps, 3 stages, persistent: s29run3
# (bench/i8_tma_experiment.py, the kernels alone on the same codes) 1.07-1.10x the pointer
# tile at 4096 rows of the four shapes (3.9-27 waves) and at 1024 rows of 28672 x 8192
# (6.8 waves); at 1024 rows of the others (1-2.9 waves) 0.89-0.99x, and at 256-512 rows
# 0.90-1.07x the dispatched swapped tiles (s29run4), where it is not used.
TILE_MM_TMA = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
TMA_MIN_WAVES = 3.5
MM_SPLIT_MIN_BLOCKS = 64
MAX_SPLIT = 16
# The quantizer before the kernel and the kernel launch with programmatic dependent launch (the
# kernel's launch overlaps the quantizer; it waits before it reads anything). To
# PREFETCH_MAX_M rows the kernel first asks L2 for its first PREFETCH_BLOCKS weight blocks
# (PREFETCH): s26run4 to 64 rows; s30run4 (bench_qlinear_i8.py --prefetch, 0-16 blocks, 1-512
# rows of six shapes) 0.95-0.99x the launch without it at 65-512 rows but on 28672 x 8192
# (0.99-1.01x); deeper prefetches were faster than 2 blocks in 4 of 54 cases, by at most 1%,
# and up to 1.24x slower.
PDL_AFTER_QUANT = True
PREFETCH_MAX_M = 512
PREFETCH_BLOCKS = 2
# To 64 rows (one wave of programs) the kernel also lets the next PDL kernel launch after its K
# loop (TRIGGER), as the single-plane GEMV does; larger grids do not, since the next kernel's
# waiting programs would hold the SM slots of this one's later waves.
TRIGGER_DECODE = True


def _fill_split(programs: int, cap: int, blocks: int, min_blocks: int) -> int:
    """The largest power-of-two K split keeping `programs` x split within `cap` and every split
    at least `min_blocks` K blocks."""
    split = 1
    while (split < MAX_SPLIT and programs * split * 2 <= cap
           and blocks >= 2 * split * min_blocks):
        split *= 2
    return split


def _waves(tiles: int, sms: int) -> int:
    return contract.cdiv(tiles, sms)


def _mid_tile(M: int, N: int, K: int, sms: int) -> dict:
    """The launch for 65-512 rows (the rule above): the swapped 64 x 64 tile where its tiles
    fit two an SM and K is at most MID_NARROW_MAX_K, split to fill them; else the swapped tile
    on up to 128 rows, split where its tiles are few; where they are not, the cheapest in
    waves of whole tiles of the wide 128 x 128 tile (only from MID_WIDE_MIN_WAVES waves), the
    swapped 64-weight-row one and the plain 64 x 128 one."""
    narrow_tiles = (contract.cdiv(M, TILE_SWAP_MID_NARROW["BLOCK_M"])
                    * contract.cdiv(N, TILE_SWAP_MID_NARROW["BLOCK_N"]))
    if narrow_tiles <= 2 * sms and K <= MID_NARROW_MAX_K:
        return dict(TILE_SWAP_MID_NARROW, SWAP=True,
                    SPLIT_K=_fill_split(narrow_tiles, 2 * sms, contract.cdiv(K, 128),
                                        NARROW_MIN_BLOCKS))
    bm = min(128, contract.next_power_of_2(M))
    wide_tiles = contract.cdiv(M, 128) * contract.cdiv(N, 128)
    tiles = contract.cdiv(M, bm) * contract.cdiv(N, TILE_SWAP_MID["BLOCK_N"])
    if wide_tiles < MID_WIDE_MIN_WAVES * sms:
        split = _fill_split(tiles, 2 * sms, contract.cdiv(K, 128), 4)
        if split > 1:
            return dict(TILE_SWAP_MID, BLOCK_M=bm, SWAP=True, SPLIT_K=split)
    # Rows padded to a tile count as work: 288 rows in 128-row tiles do 384 rows' MMAs.
    cost_wide = float("inf")
    if wide_tiles >= MID_WIDE_MIN_WAVES * sms:
        cost_wide = 2 * _waves(wide_tiles, sms) / WIDE_RATE
    cost_swap = _waves(tiles, sms)
    cost_plain = _waves(contract.cdiv(M, TILE_MM_NARROW["BLOCK_M"])
                        * contract.cdiv(N, TILE_MM_NARROW["BLOCK_N"]), sms)
    if cost_wide <= min(cost_swap, cost_plain):
        return dict(TILE_SWAP_MID_WIDE, BLOCK_M=bm, SWAP=True, SPLIT_K=1)
    if cost_swap <= cost_plain:
        return dict(TILE_SWAP_MID, BLOCK_M=bm, SWAP=True, SPLIT_K=1)
    return dict(TILE_MM_NARROW, SWAP=False, SPLIT_K=1)


def choose(M: int, N: int, K: int, sms: int, *, interpreter: bool = False) -> dict:
    """The launch for M rows of an N x K weight (the rule above); a pure function. To
    :data:`SWAP_MID_MAX_M` rows the swapped tiles (and from 65 rows the plain 64 x 128 one where
    it costs fewer waves), with the weight's L2 prefetch; the plain tile above, on TMA copies
    where its tiles make TMA_MIN_WAVES waves."""
    if interpreter:
        cfg = dict(_INTERPRETER, BLOCK_M=16, SWAP=M <= 16)
        cfg["SPLIT_K"] = 2 if contract.cdiv(K, cfg["BLOCK_K"]) >= 4 else 1
        return cfg
    if M <= SWAP_MAX_M:
        bm = max(16, contract.next_power_of_2(M))
        wide = bm > 16 and 2 * contract.cdiv(N, TILE_SWAP_WIDE["BLOCK_N"]) >= sms
        cfg = dict(TILE_SWAP_WIDE if wide else TILE_SWAP_NARROW, BLOCK_M=bm, SWAP=True,
                   PREFETCH=PREFETCH_BLOCKS, TRIGGER=TRIGGER_DECODE)
        tiles = contract.cdiv(N, cfg["BLOCK_N"])
        cap = 2 * sms if bm <= 16 else sms
        cfg["SPLIT_K"] = 1 if wide else _fill_split(tiles, cap, contract.cdiv(K, cfg["BLOCK_K"]),
                                                    2)
        return cfg
    if M <= SWAP_MID_MAX_M:
        return dict(_mid_tile(M, N, K, sms),
                    PREFETCH=PREFETCH_BLOCKS if M <= PREFETCH_MAX_M else 0)
    tma_tiles = contract.cdiv(M, TILE_MM_TMA["BLOCK_M"]) * contract.cdiv(N, TILE_MM_TMA["BLOCK_N"])
    if tma_tiles >= TMA_MIN_WAVES * sms:
        return dict(TILE_MM_TMA, SWAP=False, SPLIT_K=1, TMA=True, PROGRAMS=sms)
    wide_tiles = contract.cdiv(M, 128) * contract.cdiv(N, 128)
    if wide_tiles >= MM_WIDE_MIN_WAVE * sms:
        return dict(TILE_MM_WIDE, SWAP=False, SPLIT_K=1)
    tiles = contract.cdiv(M, 64) * contract.cdiv(N, 128)
    blocks = contract.cdiv(K, 128)
    split = 2 if 2 * tiles <= 2 * sms and blocks >= MM_SPLIT_MIN_BLOCKS else 1
    return dict(TILE_MM_NARROW, SWAP=False, SPLIT_K=split)


def run(codes: torch.Tensor, xs: torch.Tensor, w8: torch.Tensor, scales: torch.Tensor,
        bias: Optional[torch.Tensor], out_dtype: torch.dtype, cfg: dict, interpreter: bool,
        tickets=None, pdl: bool = False) -> torch.Tensor:
    """``y [M, N]`` from int8 codes ``[M, K]`` with fp32 per-token scales ``[M]`` and the
    K-major weight ``w8`` int8 ``[N, K_pad]`` with its per-column scales (``[1, N]``); `cfg`
    from :func:`choose` (or a forced one: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SWAP, SPLIT_K,
    num_warps, num_stages); `tickets(device, n)` gives the split-K counters; `pdl`: launched
    with programmatic dependent launch (the caller asked :func:`contract.pdl_capable`)."""
    if codes.stride(1) != 1:
        codes = codes.contiguous()
    M, K = codes.shape
    N = w8.shape[0]
    y = torch.empty((M, N), dtype=out_dtype, device=codes.device)
    if M == 0:
        return y
    if cfg.get("TMA"):
        if tma_ok(codes, w8):
            _run_tma(codes, xs, w8, scales, bias, y, cfg, interpreter, pdl)
            return y
        # TMA's 16-byte rules unmet (a row stride or base off 16 bytes): the same tile on
        # pointer loads.
        cfg = dict(cfg, TMA=False)
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = contract.cdiv(M, bm) * contract.cdiv(N, bn)
    split, k_per_split, ws, cnt = contract.ticket_split_k_plan(
        K, bk, cfg.get("SPLIT_K", 1), y, tiles, tickets, "the i8 path")
    contract.launch(
        qlinear_i8_kernel, (tiles, split),
        (codes, xs, w8, scales, bias if bias is not None else scales, y, ws, cnt),
        (M, N, K, k_per_split, codes.stride(0), w8.stride(0), y.stride(0)),
        dict(HAS_BIAS=bias is not None, SWAP=bool(cfg["SWAP"]), BLOCK_M=bm, BLOCK_N=bn,
             BLOCK_K=bk, GROUP_M=cfg.get("GROUP_M", 8), EVEN_K=K % k_per_split == 0
             and k_per_split % bk == 0, SPLIT=split > 1, PDL=pdl,
             PREFETCH=int(cfg.get("PREFETCH", 0)) if pdl else 0,
             TRIGGER=pdl and bool(cfg.get("TRIGGER", False))),
        dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl),
        fast=not interpreter)
    return y


def tma_ok(codes: torch.Tensor, w8: torch.Tensor) -> bool:
    """Whether the TMA tile can copy these operands: 16-byte aligned bases and row strides
    (int8: multiples of 16 elements), unit channel strides."""
    return all(t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in (codes, w8))


# Programs of the TMA tile under the interpreter where the launch does not say (no SM count
# there): enough to walk several tiles a program on the tests' small shapes.
_INTERPRETER_PROGRAMS = 3


def _run_tma(codes, xs, w8, scales, bias, y, cfg, interpreter, pdl):
    """The TMA tile over cfg's PROGRAMS programs (:func:`choose` gives the SM count; a forced
    launch without it runs one tile a program, or :data:`_INTERPRETER_PROGRAMS` under the
    interpreter)."""
    M, K = codes.shape
    N = w8.shape[0]
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    tiles = contract.cdiv(M, bm) * contract.cdiv(N, bn)
    programs = min(tiles, cfg.get("PROGRAMS") or (_INTERPRETER_PROGRAMS if interpreter
                                                  else tiles))
    if not interpreter:
        contract.ensure_descriptor_allocator()
    contract.launch(
        qlinear_i8_tma_kernel, (programs,),
        (codes, xs, w8, scales, bias if bias is not None else scales, y),
        (M, N, K, codes.stride(0), w8.stride(0), y.stride(0)),
        dict(HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"],
             GROUP_M=cfg.get("GROUP_M", 8), NUM_PROGRAMS=programs, PDL=pdl),
        dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl),
        fast=not interpreter)
