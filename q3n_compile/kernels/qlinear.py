"""``q3n::qlinear``: a linear layer with packed 2..8-bit weights and 16/12/8-bit activations.

What this module guarantees:

- ``torch.ops.q3n.qlinear(x, qweight, scales, zeros, bias, smooth, bits, group_size,
  in_features, act, act_group_size=-1, rotation=0)`` computes ``y = A(x) @ W^T + bias`` for
  ``x`` ``[M, K]``
  (float16, bfloat16 or float32), output ``[M, N]`` in x's dtype, where
  - ``W = (q - z) * s`` is the packed weight of :mod:`q3n_compile.kernels.packing` (``bits`` in
    2..8; ``group_size`` 32/64/128 or -1 for per-channel scales; ``zeros`` None = symmetric);
  - ``A`` is the activation format ``act``:
    ``"none"`` (16-bit: x as given, weight-only quantization);
    ``"int8"`` (per-token dynamic: ``c = round(x' / s_x)`` in [-127, 127], ``s_x = max|x'| / 127``);
    ``"fp8"`` (per-token dynamic float8 e4m3: ``c = e4m3(x' / s_x)``, ``s_x = max|x'| / 448``);
    ``"int12"`` (per-token 12-bit integers in [-2047, 2047], ``s_x = max|x'| / 2047``, carried
    exactly in float16 operands). ``A(x) = c * s_x``, with ``x' = x * smooth`` when a SmoothQuant
    vector ``smooth`` ``[K]`` is given (quantized formats only). Activation quantization is computed
    in float32 from x's values; rounding is to nearest, ties to even.
  - ``act_group_size`` (quantized formats only) says what one activation scale covers: -1 (the
    default) one token, as above; 32, 64 or 128: one token and that many consecutive input
    channels, ``s_x[m, g] = max_{k in group g} |x'[m, k]| / qmax``, ``G = ceil(K / group)``
    scales per token (when the size does not divide K, the last group holds the ``K % group``
    channels left over; a group that is all zero gets scale 1). An outlier channel then coarsens
    only its own group's codes.
  - ``rotation`` (quantized formats only; 0 or 128, K a multiple of it): the activations
    quantized are the rotated rows ``x R`` (:mod:`q3n_compile.kernels.hadamard`: each
    128-channel block times the normalised Hadamard matrix), before the smoothing vector:
    ``x' = (x R) * smooth``, and ``W`` is then the rotated layer's weight ``W_0 R`` (so ``y =
    x W_0^T`` up to quantization). The activations' quantizer rotates each tile on the tensor
    cores as it loads it; nothing else changes, so every path takes it.
- The Triton kernels, the interpreter and :func:`reference` compute the same function; they differ
  only by the rounding the kernels' docstrings state (float32 accumulation order, the 16-bit
  rounding of dequantised weights on the 16-bit-activation tensor-core paths (on ``mmT`` only
  for weight groups of 32 and 64: with groups of 128 and per-channel scales it scales fp32 sums
  of exact ``q - z`` products instead; on ``wg`` for every call but its decode tiles, which
  scale each K block's fp32 sum the same way), of dequantised
  activations ``c * s_x`` on the ``dequant``, ``mmT`` and ``wg`` paths, of the product before
  the bias on ``cublas8``'s fp8 GEMM, and on GPUs an
  activation code that may differ by one where ``x'/s_x`` lies within an ulp of a rounding tie,
  because GPU float32 division is not correctly rounded).

Composed with a norm (the norm_linear and quantize passes, see the section at the end of this
module): ``q3n::norm_act_quant(x, eps, kind, act, smooth)`` computes a LayerNorm/RMSNorm's row
statistics and the per-token activation codes of the normalised rows in one pass over x, and
``q3n::qlinear_codes(codes, xscales, ...)`` runs this op's kernels on precomputed codes
(``qlinear_codes(*quantize_activations_triton(x, act, smooth), ...)`` is ``qlinear(x, ...)``);
both take the same trailing ``act_group_size``, and their scales are then ``[M, G]``. Where its
path's tile takes 16-bit x (wg, mmT on permuted x, dequantise + cuBLAS) the codes are first
dequantised in one Triton pass (:mod:`q3n_compile.kernels.act_dequant`), launched with PDL into
the wg tile (:data:`CODES_WG_PDL`).

Two weight layouts (:mod:`packing`): bit planes (``qweight`` int32 ``[R, N]``) for every
format, and K-major int8 (``qweight`` int8 ``[N, K_pad]``, :func:`packing.to_kmajor8`) for W8A8
per channel and per token, the layout the quantize pass packs that format in since session 26.
A K-major weight always runs the ``i8`` path (:mod:`q3n_compile.kernels.qlinear_i8`): the int8
codes of x and the weight as stored, both straight into the int8 MMAs, the two scales applied
once to the exact int32 sums; launched by :func:`qlinear_i8.choose` (to 512 rows swapped or
plain tiles by the sweeps' rule, above a plain one, on TMA copies where it makes 3.5 waves).
Against bf16 cuBLAS (s26run4, the issue's four shapes, CUDA graphs): 1.28-1.63x at 1 row,
1.29-1.81x at 16, 0.97-1.59x at 256, 1.28-1.60x at 4096, where the bit-plane W8A8 paths ran
1.21-1.54 / 1.01-1.31 / 0.41-0.92 / 0.85-1.18x (s25run2); s30run5: 1.29-1.66 / 1.29-1.84 /
1.01-1.61 / 1.43-1.69x. Below 0.95x bf16 it stays on small weights (1024 x 4096: 0.93x at 16
rows, 0.74-0.83x at 64-512, s30run4-5; the quantizer's launch weighs there) and on 12288 x 4096 at 352-384
rows (0.92x, s30run8). The sections below are the bit-plane paths.

Variants (all ``tl.constexpr`` specialisations of the kernels below, chosen per call by
:func:`choose_path` from a table indexed by M):

- ``gemv``: M <= a few rows, memory-bound: no tensor cores, each program reduces a
  ``[BLOCK_K, BLOCK_N]`` strip of packed weights in registers; K split across programs
  (float32 atomics) at least 4 ways (:func:`_gemv_split`), which kept more loads in flight
  than splitting only to fill the GPU.
  Every path loads each packed int32 word once and splits it by shifts in registers.
- ``gemv1p``: the GEMV for weights of one bit plane (8, 4 and 2 bits) and for 6-bit weights
  (a 4-bit and a 2-bit plane), which takes the place of ``gemv`` for them
  (:func:`qlinear_gemv1p_kernel`): 16-byte word loads, codes unpacked in the thread that loaded
  them with no reshape and no int->float conversion (one integer op and one
  FMA per code), group scales and zero points applied once per word, BLOCK_M rows of x per
  program, and split-K in one launch (a ticket per output tile: the last split sums the
  partials) instead of atomics into a zeroed fp32 output and a cast (three kernels). Its launch
  parameters are :func:`gemv1p_config`'s; :data:`GEMV1P_SWEEP` is what the benchmark sweeps.
  On the H200 (s8run1) its tuned launch ran W4A16 g128 at 28672 x 8192, M = 1 in 0.062 ms
  against the old GEMV's 0.135 and bf16 cuBLAS's 0.125, and was the faster GEMV for 8-bit
  weights too.
- ``mm``: tensor-core tiles: weights are unpacked and dequantised in registers and fed to
  ``tl.dot`` in the activation's operand type — bf16/fp16 (16-bit activations), int8 x int8 ->
  int32 (``int8``), fp8 e4m3 x fp8 e4m3 (``fp8`` with weight codes that e4m3 holds exactly, i.e.
  bits <= 4; wider codes are multiplied in fp16, exactly), fp16 x fp16 (``int12``); per-group
  scales are applied to each K block's partial product — the weights' group scale and, with
  ``act_group_size``, the rows' activation scales of that block's group; optional split-K.
- ``dequant``: dequantise the whole weight to x's dtype as ``W [N, K]``
  (:mod:`q3n_compile.kernels.weight_unpack`) and call cuBLAS (``F.linear``): for the
  M where that is faster than the fused kernel (above 64 rows for 16-bit and 12-bit
  activations, above 256 for 8-bit ones, as measured on the H200). Quantized activations are
  quantized and dequantised first, in one pass over x (with their groups' scales), so the
  function computed is the same.
- ``cublas8`` (:mod:`q3n_compile.kernels.qlinear_cublas8`): for 8-bit activations from
  :data:`CUBLAS8_MIN_M` rows (fp8: 65, 256 with per-channel weights; int8: 257, and 65 on
  weights of at most 4096 x 4096 entries), where the
  format allows (fp8 with weights
  of <= 4 bits and scales per 128 channels or per channel; int8 with per-channel weights and
  per-token scales): the
  weight's integer codes are unpacked to an 8-bit ``[N, K]`` matrix for the call and cuBLAS's
  block-scaled fp8 GEMM (or its int8 GEMM) multiplies them. s8run1 (H200, M = 4096): W4A8 g128
  1.02-1.23x bf16, W8A8 0.87-1.12x, where dequantise + cuBLAS ran 0.49-0.87x.
- ``mm8`` (:mod:`q3n_compile.kernels.qlinear_mm8`): fp8 codes with per-token scales times 4-bit
  g128 weights on fp8 MMAs, the packed weight unpacked in the tile (nothing written), from 65 to
  128 rows where its 128 x 32 tiles make two programs an SM, or with K split 4 ways where they
  are 0.75-1 of the SMs (:func:`_mm8_split`); elsewhere cublas8 was faster (session 15).
- ``mmT`` (:mod:`q3n_compile.kernels.qlinear_swap`): the tiles with operands swapped, for 3 to
  64 rows and every bit width, to 128 rows for 4-bit weights (:data:`MMT_64_MAX_M`; fp8 codes
  that cublas8 takes go there from 65 rows instead) (8-, 16-,
  32- and 64-row tiles; K blocks of 128 channels whatever the group; K split as the GEMV's up
  to 16 rows, by the mm rule above from 17 to 32, in 4 at 64): the weight is unpacked in 8
  sub-tiles of channels ``8r + j`` that reach the MMA with no layout conversion; split K is
  finished in the launch by tickets, as gemv1p's. Quantized activations are quantised and
  dequantised to x's dtype first, in one pass (the function of the ``dequant`` path); for
  4-bit weights from 9 rows that pass stores x permuted per block (XPERM, :func:`_mmT_xperm`;
  16-bit x is permuted by one more pass from 17 rows on 32M+ weights). H200, the issue's four
  shapes: W4A16 g128 1.22-1.39x bf16 cuBLAS at 16 rows (the one-tile kernel before session 9
  0.90-0.95x), 0.81-0.97x at 64 rows, 0.56-0.60x at 128 (s10run4-5).
- ``wg`` (:mod:`q3n_compile.kernels.qlinear_wgmma`, a Gluon kernel, sm_90 only): mmT's tile
  for 4- and 6-bit g128 weights with its warpgroup MMAs asynchronous, from 33 to 256 rows
  (to 512 / 768 for 4-bit weights of at least 3 * 2^25 / 2^27 entries with 16-bit x;
  quantized activations dequantised first as for mmT; with 4-bit weights from 49 rows where
  the tile is the 64 x 64 one, e.g. on 4096 columns; to 128 rows where cublas8 takes the
  call and K > 8192), ahead of mmT, mm8, cublas8 and dequantise + cuBLAS there; tiles by
  stream-K where they make a wave, 128 x 256 tiles for 4-bit weights of many columns; weights
  with few columns to 128 rows only unless 128 x 64 tiles fill the SMs, or their activations
  are quantized (:func:`qlinear_wgmma.choose`). Its weight operand is ``(q - z) * s`` rounded
  to x's dtype (with bf16 x the scale is rounded to bf16 first). H200: W4A16 1.05-1.54x the
  paths before it (s18run4) and 1.00-1.15x more at 96-256 rows (s19run3), fp8 activations
  1.03-1.26x cublas8 at 160-256 rows on K <= 8192 (s19run5), W6A12 1.22-3.13x (s18run4); at
  33-48 rows W4A16 1.02-1.19x mmT (s21run4). Since session 24 also 1-32 rows of large weights
  with bf16 x (:func:`qlinear_wgmma.choose_decode`: 8-, 16- and 32-row tiles whose operand is
  the exact ``q - z`` (or ``M + q`` with x's block sums, XSUM), each K block's sum scaled in
  fp32), ahead of gemv1p and mmT there: W4A16 on 28672 x 8192 1.13x the GEMV at one row and
  1.42-1.49x mmT at 4-32 rows (s24run4).
- ``rowsplit`` (:func:`_launch_row_split`, since session 40): just past whole 128-row tiles
  of wide 4- and 6-bit weights on ``wg`` (:func:`qlinear_wgmma.row_split_head`), the whole
  tiles of rows on ``wg`` (written straight into the output's first rows) and the rest as a
  call of its own (the small-M paths), rather than one more tile of rows that unpacks the
  whole weight again for those few: W4A16 (bf16 x, zero points) 1.10-1.18x the one launch at
  129-144 rows of 12288 / 14336 x 4096, 1.06-1.33x at 129-192 rows of 28672 x 8192; W4A8
  1.04-1.29x, W6A12 1.03-1.20x (s40run1-5; fewer rest rows for symmetric weights, fp16 x and
  6-bit weights, :data:`qlinear_wgmma.ROW_SPLIT_REST`). Rows are independent in every path,
  so the function is the op's. Where the 128-row head leaves a quarter of the SMs idle
  (12288 columns; :func:`qlinear_wgmma.rest_beside_head`, session 41), the rest's 2-32 rows
  run on a second stream beside it (CONCURRENT, its decode tile's grid capped to the idle
  SMs): W4A16 at 136 / 144 / 160 rows of 12288 x 4096 1.60 / 1.42 / 1.17x the one launch and
  1.33 / 1.21 / 1.09x the split in one stream (s41run7; 0.97 / 0.86 / 0.74x bf16); since
  session 42 for symmetric weights and int8 / fp8 activations too (their 17-32 rest rows of
  quantized activations on mmT, as dispatched): 1.15-1.40x what was dispatched before at
  130-160 rows (s42run3; 0.68-0.90x bf16).
  ``q3n::qlinear_codes`` splits alike since session 41 (its codes and their scales by rows;
  :func:`_row_split` serves both) where at most :data:`CODES_ROW_SPLIT_REST` rows are left:
  1.02-1.25x its one launch at 129-144 rows (W4A8, s41run1); since session 42 its two
  launches run at once where the op's rest takes the decode tile, for weights with zero
  points and per-token codes (1.03-1.36x the split in one stream, s42run6).

Every K block of the gemv and mm kernels lies in one weight group and one activation group:
:func:`choose_path` caps BLOCK_K at both (powers of two from 32, so the block divides both), which
is why any weight ``group_size`` goes with any ``act_group_size``. Per token is the constexpr
``ACT_GROUP = 0``, the kernels as they were before activation groups existed.

16-bit activations with 8-bit asymmetric weights, and int8 activations with 8-bit asymmetric
weights (``q - z`` does not fit int8), are refused by :func:`supports`; the quantize pass turns
those into symmetric formats or declines with that reason.

What each activation format costs and gains (weights: ``bits/8`` bytes per weight plus 2-3
bytes per group, read once per call — the gain at small M, where a linear is memory-bound):

- ``none``: no activation error, no extra pass over x. Compute runs on bf16/fp16 tensor cores
  after an in-register unpack, so at large M it cannot beat a bf16 GEMM (the dispatch table uses
  dequantise + cuBLAS there).
- ``int8``: an extra kernel reads x and writes 1 byte per element plus a scale per row; products
  run on int8 tensor cores (H200: ``torch._int_mm`` reached 952 TOPS against 817 TFLOP/s bf16;
  the i8 path, its quantizer included, 1110-1140 TOPS on 28672 x 8192 at 4096 rows, s26run4). 8-bit
  per-token activations lose accuracy on outlier channels: SmoothQuant (the ``smooth`` vector)
  moves that range into the weights.
- ``fp8``: same traffic as int8; e4m3 keeps ~2^-4 relative precision per element whatever the
  row's range (better with outliers, worse for flat rows); fp8 tensor cores (1292 TFLOP/s) only
  for weight codes e4m3 holds exactly (<= 4 bits), fp16 products otherwise.
- ``int12``: 16x finer than int8 but no faster than 16-bit activations: there are no 12-bit tensor
  cores, so products run in fp16 (exactly) and the quantization pass over x is pure cost. It is
  there to reproduce the design's W6A12 attention setting faithfully.
- per-group activation scales (``act_group_size`` 32/64/128, any of the quantized formats): the
  quantizer writes one fp32 scale per token and group (``4 * G`` bytes per token instead of 4:
  ``4 / group`` bytes per element, 3% of int8 codes at 128) and reads x once (a tile holds
  whole groups; per token, rows past 16384 columns are read twice); the GEMM loads a
  ``[BLOCK_M]`` fp32 scale per K block and converts and multiplies each block's
  ``[BLOCK_M, BLOCK_N]`` partial in fp32 (int8: no int32 accumulator chained over K, which
  per-channel weights with per-token scales keep), and the
  gemv kernel multiplies each block's codes by their scale; groups of 32 or 64 also cap the
  K block there (smaller tensor-core tiles than the table's 64/128). Gain: an activation outlier
  coarsens 1 group instead of the whole row (on MiniLM W8A8 with g128 weights see
  ``bench/RESULTS.md``). Not yet run on a GPU. They are compiled for sm_90 by
  ``bench/compile_qlinear_sm90.py``, which needs no GPU. That compile shows the same shared
  memory as per token at 128 channels, and a few more stack bytes per thread where the per-token
  tile already spills.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from q3n_compile.kernels import act_dequant as AD
from q3n_compile.kernels import contract
from q3n_compile.kernels import hadamard as HD
from q3n_compile.kernels import packing as P
from q3n_compile.kernels import qlinear_cublas8 as C8
from q3n_compile.kernels import qlinear_i8 as I8
from q3n_compile.kernels import qlinear_mm8 as M8
from q3n_compile.kernels import qlinear_swap as SW
from q3n_compile.kernels import weight_unpack as WU
from q3n_compile.kernels.act_dequant import expand_scales as expand_act_scales
from q3n_compile.kernels.hadamard import hadamard_dot, hadamard_sign, rotate_tile
from q3n_compile.kernels.norm_linear import normalise_rows
from q3n_compile.kernels.qcodes import block_minus_zero, load_codes, tile_setup
from q3n_compile.kernels.tiles import first_tile_mean, ticket_split_k

try:  # Gluon (Triton >= 3.5's explicit-layout dialect) with Hopper's warpgroup MMA
    from q3n_compile.kernels import qlinear_wgmma as WG
except ImportError:  # pragma: no cover - an older Triton: the other paths take those calls
    WG = None

ACT_FORMATS = ("none", "int8", "fp8", "int12")
ACT_QMAX = {"int8": 127.0, "fp8": 448.0, "int12": 2047.0}
# Activation scale groups (``act_group_size``): one scale per token (the kernels' ACT_GROUP = 0),
# or one per token and 32/64/128 consecutive input channels (ACT_GROUP = that size).
PER_TOKEN = SW.PER_TOKEN  # -1: one activation scale per token
ACT_GROUP_SIZES = (32, 64, 128)
_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ACT_CODE = {"none": 0, "int8": 1, "fp8": 2, "int12": 3}
# Operand types of tl.dot (DOT_DTYPE): 0 = x's dtype (16-bit activations), 1 = fp32, 2 = fp16,
# 3 = int8, 4 = fp8 e4m3.
_DD_X, _DD_F32, _DD_F16, _DD_I8, _DD_F8 = 0, 1, 2, 3, 4


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _to_operand(t, like, DD: tl.constexpr):
    if DD == 1:
        r = t.to(tl.float32)
    elif DD == 2:
        r = t.to(tl.float16)
    elif DD == 3:
        r = t.to(tl.int8)
    elif DD == 4:
        r = t.to(tl.float32).to(tl.float8e4nv)
    else:
        r = t.to(like.dtype)
    return r


@triton.jit
def qlinear_mm_kernel(
    X, XS, QW, S, Z, BIAS, Y,
    M, N, K, K_PAD, ROW4, ROW2, ROW1, K_PER_SPLIT,
    stride_xm, stride_xk, stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, ACT: tl.constexpr,
    ACT_GROUP: tl.constexpr, DOT_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program computes a [BLOCK_M, BLOCK_N] tile of Y over one split of K, on tensor cores.

    Math: with codes q (unpacked from bit planes), zero points z (2^(BITS-1) when SYM) and scales
    s of group g = k // GROUP (GROUP = 0: per-channel):
    - ACT = 0 (16-bit activations): B = (q - z) * s rounded to x's dtype (per-channel: B = q - z,
      exact, and s multiplies the fp32 result); acc += x_tile @ B in fp32.
    - ACT = 1/2/3 (codes c and per-row scales s_x from the activation quantizer): B = q - z, exact
      in the operand type (int8, fp8 e4m3 or fp16); each K block's c_tile @ B is exact (int32, or
      fp32 with products of at most 12 + 8 significant bits; fp8 products are summed over one
      K block in the tensor core's accumulator, which on sm_90 keeps about 14 bits, then added in
      fp32, as DeepSeek-V3 does); it is multiplied by its group's s (per-channel: once at the
      end) and accumulated in fp32; the result is multiplied by s_x.
    - ACT_GROUP > 0 (activation scales s_x[m, k // ACT_GROUP], XS [M, ceil(K / ACT_GROUP)]):
      as above, but each K block's partial product is converted to fp32 (int8: from its own
      int32 sum, no accumulator chained across blocks), multiplied by its group's s (grouped
      weights) and by its rows' s_x of that block's activation group, then accumulated in fp32;
      per-channel s multiplies at the end. Cost over per-token: one [BLOCK_M] fp32 load and a
      convert + multiply of the [BLOCK_M, BLOCK_N] partial per K block.
    Then + bias (by the first K split only); stored in Y's dtype, or atomically added to an fp32
    Y when K is split (ATOMIC).
    Grouped formats need BLOCK_K <= GROUP and BLOCK_K <= ACT_GROUP (powers of two: BLOCK_K then
    divides them; the launcher guarantees it): one weight group and one activation group per
    K block.

    Traffic: reads the packed weight once per row block of M (bits/8 bytes per weight, plus
    2 bytes of scale and 1 of zero per group and column), x (or its codes) once per column block,
    writes Y once (per split with ATOMIC).
    """
    pid_k = tl.program_id(2)
    offs_m, offs_n, m_ok, n_ok, k_start, k_end, s_col, z_col = tile_setup(
        S, Z, tl.program_id(0), tl.program_id(1), pid_k, M, N, K_PAD, K_PER_SPLIT, GROUP, SYM,
        BLOCK_M, BLOCK_N)
    PER_CHANNEL: tl.constexpr = GROUP == 0
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    iacc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    if ACT_GROUP != 0:
        n_act_groups = (K + ACT_GROUP - 1) // ACT_GROUP  # XS's row stride
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        w = block_minus_zero(QW, Z, z_col, k0, offs_n, n_ok, K_PAD, N, ROW4, ROW2, ROW1, BITS,
                             GROUP, SYM, BLOCK_K)
        if not PER_CHANNEL:
            s_row = tl.load(S + (k0 // GROUP) * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if ACT == 0:
            if PER_CHANNEL:
                b = _to_operand(w, a, DOT_DTYPE)
            else:
                b = _to_operand(w.to(tl.float32) * s_row[None, :], a, DOT_DTYPE)
            acc = tl.dot(_to_operand(a, a, DOT_DTYPE), b, acc, input_precision=DOT_PRECISION)
        elif ACT_GROUP != 0:
            # Per-group activation scales: each block's exact partial product, in fp32, times
            # its weight group's and its activation group's scales.
            b = _to_operand(w, a, DOT_DTYPE)
            a_op = _to_operand(a, a, DOT_DTYPE)
            if DOT_DTYPE == 3:
                part = tl.dot(a_op, b, out_dtype=tl.int32).to(tl.float32)
            else:
                part = tl.dot(a_op, b, input_precision=DOT_PRECISION)
            if not PER_CHANNEL:
                part = part * s_row[None, :]
            xs_blk = tl.load(XS + offs_m * n_act_groups + k0 // ACT_GROUP, mask=m_ok, other=0.0)
            acc += part * xs_blk[:, None]
        else:
            b = _to_operand(w, a, DOT_DTYPE)
            a_op = _to_operand(a, a, DOT_DTYPE)
            if DOT_DTYPE == 3:
                if PER_CHANNEL:
                    iacc = tl.dot(a_op, b, iacc, out_dtype=tl.int32)
                else:
                    part = tl.dot(a_op, b, out_dtype=tl.int32)
                    acc += part.to(tl.float32) * s_row[None, :]
            elif PER_CHANNEL and DOT_DTYPE != 4:
                acc = tl.dot(a_op, b, acc, input_precision=DOT_PRECISION)
            else:
                # fp8: never chain the accumulator across K blocks (sm_90 accumulates fp8 products
                # in reduced precision); each block's sum is added in fp32.
                part = tl.dot(a_op, b, input_precision=DOT_PRECISION)
                if PER_CHANNEL:
                    acc += part
                else:
                    acc += part * s_row[None, :]
    if ACT != 0 and ACT_GROUP == 0 and DOT_DTYPE == 3 and PER_CHANNEL:
        acc = iacc.to(tl.float32)
    if PER_CHANNEL:
        acc = acc * s_col[None, :]
    if ACT != 0 and ACT_GROUP == 0:
        xs = tl.load(XS + offs_m, mask=m_ok, other=0.0)
        acc = acc * xs[:, None]
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n, mask=n_ok & (pid_k == 0), other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)
    else:
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_mask)


@triton.jit
def qlinear_gemv_kernel(
    X, XS, QW, S, Z, BIAS, Y,
    M, N, K, K_PAD, ROW4, ROW2, ROW1, K_PER_SPLIT,
    stride_xm, stride_xk, stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, ACT: tl.constexpr,
    ACT_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program computes BLOCK_N outputs of one row of Y over one split of K, in registers.

    Math (all fp32): w = (q - z) * s per weight (per-channel: s multiplies the result);
    acc[k, n] += a[k] * w[k, n] over the split, where a is x (ACT = 0) or its codes c; then
    y[n] = sum_k acc[k, n] (* s_x) + bias (first split only), stored or atomically added (ATOMIC).
    ACT_GROUP > 0: a = c * s_x[m, k // ACT_GROUP] (one fp32 load and BLOCK_K multiplies per K
    block), and no s_x at the end. Grouped formats need BLOCK_K <= GROUP and <= ACT_GROUP.

    Traffic: the packed weight strip [K, BLOCK_N] once per row of x (rows after the first mostly
    hit L2), x's row once per column block, Y once (per split with ATOMIC). Memory-bound: the
    figure of merit is packed bytes per second.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    PER_CHANNEL: tl.constexpr = GROUP == 0
    HALF: tl.constexpr = 1 << (BITS - 1)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K_PAD)
    if PER_CHANNEL:
        s_col = tl.load(S + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if not SYM:
            z_col = tl.load(Z + offs_n, mask=n_ok, other=0).to(tl.int32)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    if ACT_GROUP != 0:
        n_act_groups = (K + ACT_GROUP - 1) // ACT_GROUP  # XS's row stride
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(X + m * stride_xm + offs_k * stride_xk, mask=offs_k < K, other=0.0)
        if ACT_GROUP != 0:
            # The codes of one activation group, dequantised (BLOCK_K <= ACT_GROUP).
            a = a.to(tl.float32) * tl.load(XS + m * n_act_groups + k0 // ACT_GROUP)
        q = load_codes(QW, k0, offs_n, n_ok, K_PAD, N, ROW4, ROW2, ROW1, BITS, BLOCK_K)
        if SYM:
            w = (q - HALF).to(tl.float32)
        elif PER_CHANNEL:
            w = (q - z_col[None, :]).to(tl.float32)
        else:
            z_row = tl.load(Z + (k0 // GROUP) * N + offs_n, mask=n_ok, other=0).to(tl.int32)
            w = (q - z_row[None, :]).to(tl.float32)
        if not PER_CHANNEL:
            s_row = tl.load(S + (k0 // GROUP) * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            w = w * s_row[None, :]
        acc += a.to(tl.float32)[:, None] * w
    y = tl.sum(acc, axis=0)
    if PER_CHANNEL:
        y = y * s_col
    if ACT != 0 and ACT_GROUP == 0:
        y = y * tl.load(XS + m)
    if HAS_BIAS:
        y = y + tl.load(BIAS + offs_n, mask=n_ok & (pid_k == 0), other=0.0).to(tl.float32)
    y_ptrs = Y + m * stride_ym + offs_n * stride_yn
    if ATOMIC:
        tl.atomic_add(y_ptrs, y, mask=n_ok)
    else:
        tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=n_ok)


# The single-plane GEMV (``gemv1p``): formats whose codes sit in one bit plane (bits 8, 4, 2),
# and 6-bit codes (a 4-bit plane and a 2-bit plane).
# _MAGIC is the bit pattern of 2^23 as float32: OR-ing an integer v < 2^23 into its mantissa
# gives the float 2^23 + v exactly, which turns a code into a float with one integer op and
# no int->float conversion (I2F issues at 16 per clock per SM on sm_90 against 128 FP32 FMAs).
_MAGIC = tl.constexpr(0x4B000000)


@triton.jit
def _gemv1p_words(QW, k, k_end, r4, n4, n_ok4, rows_total, N, PER: tl.constexpr,
                  BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    """The [1, 1, WORDS, BLOCK_N] words of the K block at k. A block at or past k_end (a
    prefetch beyond the split, or a split with no block) is not used: EVEN loads the split's last
    block instead (in bounds, no mask), otherwise the load is masked off."""
    if EVEN:
        rows = tl.minimum(k, k_end - BLOCK_K) // PER + r4
        w = tl.load(QW + rows * N + n4)
    else:
        rows = k // PER + r4
        w = tl.load(QW + rows * N + n4, mask=(rows < rows_total) & (k < k_end) & n_ok4, other=0)
    return w


@triton.jit
def _gemv1p_words2(QW, k, k_end, ROW2, r4, n4, n_ok4, rows2_total, N, BLOCK_K: tl.constexpr,
                   EVEN: tl.constexpr):
    """6-bit weights' 2-bit plane for the K block at k, in the 4-bit plane's word layout
    [1, 1, WORDS, BLOCK_N]: 4-bit word r (channels 8r .. 8r + 7 of the block) pairs with half
    r % 2 of 2-bit word r // 2 (loaded once per pair of words; the second load of a word hits
    the same line). Out-of-split blocks as :func:`_gemv1p_words`."""
    if EVEN:
        rows = tl.minimum(k, k_end - BLOCK_K) // 16 + r4 // 2
        w = tl.load(QW + (ROW2 + rows) * N + n4)
    else:
        rows = k // 16 + r4 // 2
        w = tl.load(QW + (ROW2 + rows) * N + n4, mask=(rows < rows2_total) & (k < k_end) & n_ok4,
                    other=0)
    return w


@triton.jit
def _gemv1p_block_words(QW, k, k_end, ROW2, r4, n4, n_ok4, rows_total, rows2_total, N,
                        PER: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
                        TWO_PLANES: tl.constexpr):
    """The K block at k's words: (4-bit or only plane, 2-bit plane) with TWO_PLANES (6-bit
    weights), else (the plane, the same tensor again, unused)."""
    w = _gemv1p_words(QW, k, k_end, r4, n4, n_ok4, rows_total, N, PER, BLOCK_K, EVEN)
    if TWO_PLANES:
        v = _gemv1p_words2(QW, k, k_end, ROW2, r4, n4, n_ok4, rows2_total, N, BLOCK_K, EVEN)
    else:
        v = w
    return w, v


@triton.jit
def qlinear_gemv1p_kernel(
    X, XS, QW, S, Z, BIAS, Y, WS, CNT,
    M, N, K, K_PAD, K_PER_SPLIT, ROW2,
    stride_xm, stride_xk, stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, ACT: tl.constexpr,
    ACT_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr, EVEN: tl.constexpr, DENORM: tl.constexpr = 0,
    SUBS: tl.constexpr = 1, PDL: tl.constexpr = 0,
):
    """One program computes a [BLOCK_M, BLOCK_N] tile of Y (BLOCK_M rows of x, few) over one
    split of K, on CUDA cores, for weights of one bit plane (BITS 8, 4 or 2: PER = 32 / BITS
    codes per int32 word) or of two (BITS 6: the 4-bit plane laid out as 4-bit weights, PER = 8,
    and the 2-bit plane, at row ROW2 of QW, read in the same layout by :func:`_gemv1p_words2`:
    a 16-bit half of a 2-bit word holds the high bits of one 4-bit word's 8 codes).

    Layout: the K block's packed words are loaded as one [WORDS, BLOCK_N] tile (WORDS =
    BLOCK_K / PER; N contiguous, so a thread's 4 neighbouring columns are one 16-byte load) and
    are never reshaped: a code is addressed as [word r, position j, column n] in a
    [BLOCK_M, WORDS, PER, BLOCK_N] broadcast, x's block is loaded as [BLOCK_M, WORDS, PER]
    (channel k = r * PER + j, PER consecutive channels per thread), and the sum over j stays in
    the thread that loaded the word. The sum over words is kept per word ([BLOCK_M, WORDS,
    BLOCK_N] accumulator) and reduced across threads once, after the K loop.

    Unpack, per code (one integer op and one FMA, no int->float conversion): position j lies in
    half h = j // (PER / 2) of the word at bit p = BITS * (j % (PER / 2)) of that half;
    f = float_bits(((word >> 16h) & (2^BITS - 1) << p) | bits(2^23)) = 2^23 + q * 2^p exactly
    (q * 2^p < 2^16); d = fma(f, 2^-p, -(2^(23-p) + z0)) = q - z0 exactly (every intermediate is
    an integer below 2^24), z0 = 2^(BITS-1) when symmetric, else 0 and z is subtracted once per
    word: sum_j a_j (q_j - z) = sum_j a_j q_j - z * sum_j a_j. The shifts, masks and 2^-p are
    compile-time per register because the position dimension lies in one thread. 6-bit: the
    4-bit plane's d as above (with z0 = 32), the 2-bit field of position j (bits 2j of the
    word's half, a shift per word) turned into its value q2 the same way, and d = fma(q2, 16, d):
    three more operations per code, all exact.

    DENORM (one plane only): the code's bits are read as a float where they lie, with no
    constant and no conversion. Position j's field, at bit p = BITS * j of the word (or of the
    word >> 16 where it would pass bit 23: one shift per word), as an fp32 bit pattern with
    exponent field 0 or 1 is the float q * 2^(p - 149) exactly (a denormal, or the smallest
    normal binade, where value = bits * 2^-149 still holds). x is scaled per position by
    2^(85 - p) (exact: a power of two) once per x element, so a'' * f = a * q * 2^-64 and the
    code costs one LOP3 and one FFMA; z (or 2^(BITS-1) when symmetric) is subtracted once per
    word as z * sum_j a, and 2^64 is put back once after the loop. Rounding is the magic
    path's (one rounding per product, the same partial sums) but for where z is subtracted.
    Range: a * q * 2^-64 must be a normal float and a * 2^85 finite, so x entries (or codes)
    with |x| < 2^-62 count as zero and |x| >= 2^43 overflow: the launcher takes it
    (:func:`gemv1p_denorm`) for 4-bit weights with 16-bit x or activation codes (fp16's and the
    codes' whole range lies inside); float32 x keeps the magic path. Needs FFMA without
    flush-to-zero: Triton 3.6 emits ``fma.rn.f32`` (checked in the sm_90 compile), and the
    interpreter's numpy keeps denormals.

    Layout (Triton 3.6, sm_90, checked with bench/compile_qlinear_sm90.py --gemv1p): the words'
    load is LDG.128 and the inner loop has no shared-memory layout conversion when BLOCK_M *
    BLOCK_K < 32 * num_warps (x's block is then loaded directly in the words' layout, LDG.128 of
    8 channels per row) and, for grouped weights, BLOCK_N < 32 * num_warps or >= 128 *
    num_warps (the scale row likewise). Larger loads keep a layout of their own, and each K
    block then converts them through shared memory (two barriers each).

    Math (fp32): for each K block, part[m, r, n] = sum_j a[m, r*PER + j] * (q - z)[k, n], with a
    = x (ACT = 0) or its codes c; grouped weights: acc += part * s[g, n] (one multiply per word,
    not per code: each K block lies in one group); per-channel: acc += part and acc *= s[n] after
    the loop. ACT_GROUP > 0: the block's part is also multiplied by s_x[m, k0 // ACT_GROUP] (per
    word); per token (ACT != 0): y *= s_x[m] at the end. Then y = sum_r acc (+ bias, first split
    only), and by REDUCE: 0 (one split) stored in Y's dtype; 1 atomically added to an fp32 Y
    (zeroed by the launcher, cast by it afterwards: two more kernels); 2 (split-K in one launch)
    written to the fp32 workspace WS [splits, M, N], and the last of a tile's splits to arrive
    (a ticket counter per output tile in CNT, int32, zero between calls) sums the tile's
    partials in split order (deterministic), stores Y in its dtype and resets the counter.
    Rounding differs from :func:`qlinear_gemv_kernel` only by float32 summation order (and,
    with ACT_GROUP, by where s_x multiplies).

    SUBS (1, 2 or 4): the block's columns as SUBS sub-tiles of BLOCK_N / SUBS; every
    per-column tensor is [..., BLOCK_N / SUBS, SUBS] with column h * BLOCK_N / SUBS + c at
    [c, h]. Triton 3.6 lays the sub-tile axis (last, no contiguity) out after the words' axis,
    so once the threads and warps are spread over the columns and words it stays in the
    thread: a thread holds 4 columns of each sub-tile (SUBS 16-byte word loads per word row)
    and each x element it loads and scales serves 4 * SUBS columns instead of 4.

    PREFETCH (0, 1 or 2): the words of the next 1 or 2 K blocks are loaded before this block is
    computed (register buffers: Triton 3.6 does not pipeline loads that feed no tl.dot, whatever
    num_stages says, so this is how more bytes are kept in flight per thread).

    PDL (launched with programmatic dependent launch, sm_90; never under the interpreter): the
    program loads its first PREFETCH K blocks' words (and per-channel scales and zero points:
    weights, which no kernel writes), and only then waits for the kernel before it
    (``griddepcontrol.wait``), before it reads x or writes anything: a decode step's GEMV so
    streams its first words while that kernel finishes. It lets the next PDL kernel start
    once its K loop is done.

    Traffic: the packed strip [K, BLOCK_N] once per BLOCK_M rows of x, scales (and zero points)
    once per K block and column, x's [BLOCK_M, K] block once per column block (L2), Y once
    (REDUCE 1: once per split, atomically; REDUCE 2: 4 bytes per output and split written and read
    back through L2). At M = 1 the sm_90 SASS of the inner loop (8 warps, 128 x 128 blocks,
    EVEN) issues 4.9 instructions per code for 4-bit g128 with zero points (4.4 symmetric, 4.8
    for 8-bit per channel): at 4 warp-instructions per clock per SM and 1.98 GHz on 132 SMs,
    4-bit codes cannot be consumed faster than ~3.6 TB/s (3.9 symmetric) of packed bytes, so
    4-bit is as much issue-bound as memory-bound there, 8-bit memory-bound. Per code BLOCK_M
    FMAs: CUDA-core compute bounds it as BLOCK_M grows.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    TWO_PLANES: tl.constexpr = BITS == 6
    PB: tl.constexpr = 4 if TWO_PLANES else BITS  # the (first) plane's width
    PER: tl.constexpr = 32 // PB
    HALF_PER: tl.constexpr = PER // 2
    WORDS: tl.constexpr = BLOCK_K // PER
    PER_CHANNEL: tl.constexpr = GROUP == 0
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = offs_m < M
    cols = tl.arange(0, BLOCK_N)
    offs_n = pid_n * BLOCK_N + cols
    n_ok = offs_n < N
    # The same columns, written so that Triton's axis analysis sees runs of 4 consecutive
    # columns, not BLOCK_N: the scale and zero-point loads then get the words' layout (4 columns
    # per thread) rather than wider vectors that would need a conversion to it.
    # SUBS sub-tiles of BN_SUB columns: column h * BN_SUB + c of the block is [c, h] of the
    # per-column tensors, whose last axis stays in the thread (see the layout note below).
    BN_SUB: tl.constexpr = BLOCK_N // SUBS
    csub = tl.arange(0, BN_SUB)
    hsub = tl.arange(0, SUBS)[None, :] * BN_SUB
    offs_n2 = pid_n * BLOCK_N + csub[:, None] + hsub  # [BN_SUB, SUBS]
    offs_n4 = pid_n * BLOCK_N + ((csub // 4) * 4 + csub % 4)[:, None] + hsub
    n_ok3 = (offs_n4 < N)[None, None, :, :]
    sn3 = offs_n4[None, None, :, :]  # [1, 1, BN_SUB, SUBS], for scales and zero points
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K_PAD)
    rows_total = K_PAD // PER

    # Per position j (all [PER]): the half's shift, the field mask in place, 2^-p, and
    # -(2^(23-p) + z0), z0 = 2^(BITS-1) when symmetric (q - z0 in one FMA), else 0 (q; z is
    # subtracted per word below).
    j = tl.arange(0, PER)
    pos = (j % HALF_PER) * PB
    shift4 = ((j // HALF_PER) * 16)[:, None, None, None, None]
    field4 = (((1 << PB) - 1) << pos)[:, None, None, None, None]
    inv4 = ((127 - pos) << 23).to(tl.float32, bitcast=True)[:, None, None, None, None]
    big = ((127 + 23 - pos) << 23).to(tl.float32, bitcast=True)
    if SYM:
        negc4 = -(big + (1 << (BITS - 1)))[:, None, None, None, None]
    else:
        negc4 = -big[:, None, None, None, None]
    if DENORM:
        # Fields reaching past bit 23 are taken from the word's upper half instead.
        upper = (j * PB + PB > 24).to(tl.int32)
        dpos = j * PB - upper * 16
        dshift4 = (upper * 16)[:, None, None, None, None]
        dfield4 = (((1 << PB) - 1) << dpos)[:, None, None, None, None]
        dscale = ((127 + 85 - dpos) << 23).to(tl.float32, bitcast=True)  # 2^(85 - p)
    if PER_CHANNEL:
        s3 = tl.load(S + sn3, mask=n_ok3, other=0.0).to(tl.float32)
        if not SYM:
            z3 = tl.load(Z + sn3, mask=n_ok3, other=0).to(tl.float32)
    if ACT_GROUP != 0:
        n_act_groups = (K + ACT_GROUP - 1) // ACT_GROUP  # XS's row stride

    # The arithmetic is 5-D, [PER, BLOCK_M, WORDS, BN_SUB, SUBS]: the words are loaded as a
    # [1, 1, WORDS, BN_SUB, SUBS] tile and x's block as [PER, BLOCK_M, WORDS] (k = r * PER + j),
    # and they broadcast against each other without a reshape. Positions come first so that in
    # the words' layout (order [3, 0, 1, 2, 4]) a thread's x registers run along j, i.e. along
    # consecutive channels: x's block is then loaded in vectors (8 bf16 channels: LDG.128).
    # EVEN (N, K and M multiples of the blocks): no masks in the loop.
    r4 = tl.arange(0, WORDS)[None, None, :, None, None]
    n4 = offs_n2[None, None, None, :, :]
    if TWO_PLANES:
        # Position j's 2-bit field sits at bit 2j of half r % 2 of its 2-bit word.
        pos2 = j * 2
        half2 = (r4 % 2) * 16
        field2 = (3 << pos2)[:, None, None, None, None]
        inv2 = ((127 - pos2) << 23).to(tl.float32, bitcast=True)[:, None, None, None, None]
        negc2 = -(((127 + 23 - pos2) << 23).to(tl.float32, bitcast=True))[:, None, None, None, None]
        rows2_total = K_PAD // 16
    n_ok4 = (offs_n2 < N)[None, None, None, :, :]
    x_rows = X + offs_m[None, :, None] * stride_xm
    m_ok3 = m_ok[None, :, None]
    kx3 = j[:, None, None] + tl.arange(0, WORDS)[None, None, :] * PER  # [PER, 1, WORDS]
    acc = tl.zeros([BLOCK_M, WORDS, BN_SUB, SUBS], dtype=tl.float32)
    if not TWO_PLANES:
        rows2_total = rows_total  # unused
    if PREFETCH >= 1:
        w_next, v_next = _gemv1p_block_words(QW, k_start, k_end, ROW2, r4, n4, n_ok4, rows_total,
                                             rows2_total, N, PER, BLOCK_K, EVEN, TWO_PLANES)
    if PREFETCH == 2:
        w_next2, v_next2 = _gemv1p_block_words(QW, k_start + BLOCK_K, k_end, ROW2, r4, n4, n_ok4,
                                               rows_total, rows2_total, N, PER, BLOCK_K, EVEN,
                                               TWO_PLANES)
    if PDL:
        # Everything above reads weights only; x (and the activation scales) and every store
        # come after the kernel before this one has finished.
        gdc_wait()
    for k0 in range(k_start, k_end, BLOCK_K):
        # x, the scales and the zero points are loaded before the words, and the words' load is
        # the block's last: Triton's layout propagation (RemoveLayoutConversions, sm_90 compile
        # of Triton 3.6) gave the 4-D arithmetic the layout of the load it met last, and that
        # must be the words' (4 consecutive columns per thread, every position of a word in the
        # thread that loaded it); with x's layout instead, every block's words went through
        # shared memory to another layout.
        offs_k = k0 + kx3
        if EVEN:
            a = tl.load(x_rows + offs_k * stride_xk)
        else:
            a = tl.load(x_rows + offs_k * stride_xk, mask=m_ok3 & (offs_k < K), other=0.0)
        a = a.to(tl.float32)[:, :, :, None, None]  # [PER, BLOCK_M, WORDS, 1, 1]
        if DENORM:
            # Per x element, shared by the thread's columns: the position's power of two.
            a2 = a * dscale[:, None, None, None, None]
        if not PER_CHANNEL:
            g = k0 // GROUP
            if EVEN:
                s3 = tl.load(S + g * N + sn3).to(tl.float32)
            else:
                s3 = tl.load(S + g * N + sn3, mask=n_ok3, other=0.0).to(tl.float32)
            if not SYM:
                if EVEN:
                    z3 = tl.load(Z + g * N + sn3).to(tl.float32)
                else:
                    z3 = tl.load(Z + g * N + sn3, mask=n_ok3, other=0).to(tl.float32)
        if ACT_GROUP != 0:
            xs3 = tl.load(XS + offs_m * n_act_groups + k0 // ACT_GROUP, mask=m_ok,
                          other=0.0)[:, None, None, None]
        if PREFETCH >= 1:
            w, v = w_next, v_next
        else:
            w, v = _gemv1p_block_words(QW, k0, k_end, ROW2, r4, n4, n_ok4, rows_total,
                                       rows2_total, N, PER, BLOCK_K, EVEN, TWO_PLANES)
        # ((half | MAGIC) & (field | MAGIC)) = MAGIC | (half & field): the first OR is per half
        # word (computed once for all its positions), the AND is one LOP3 per code with one
        # immediate operand; written as (half & field) | MAGIC, ptxas emitted two per code.
        if DENORM:
            f = ((w >> dshift4) & dfield4).to(tl.float32, bitcast=True)  # q * 2^(p - 149)
            part = tl.sum(a2 * f, axis=0)  # sum_j a q 2^-64, [BLOCK_M, WORDS, BN_SUB, SUBS]
            suma = tl.sum(a, axis=0) * 5.421010862427522e-20  # sum_j a * 2^-64
            if SYM:
                part -= suma * (1 << (BITS - 1))
            else:
                part -= suma * z3
        else:
            f = (((w >> shift4) & 0xFFFF) | _MAGIC) & (field4 | _MAGIC)
            d = tl.fma(f.to(tl.float32, bitcast=True), inv4, negc4)  # q - z0
            if TWO_PLANES:
                f2 = (((v >> half2) & 0xFFFF) | _MAGIC) & (field2 | _MAGIC)
                d = tl.fma(tl.fma(f2.to(tl.float32, bitcast=True), inv2, negc2), 16.0, d)
            part = tl.sum(a * d, axis=0)  # [BLOCK_M, WORDS, BN_SUB, SUBS]
            if not SYM:
                part -= tl.sum(a, axis=0) * z3  # one FMA per word: sum_j a * (q - z)
        if not PER_CHANNEL:
            if ACT_GROUP != 0:
                acc += part * (xs3 * s3)
            else:
                acc += part * s3
        elif ACT_GROUP != 0:
            acc += part * xs3
        else:
            acc += part
        if PREFETCH == 1:
            w_next, v_next = _gemv1p_block_words(QW, k0 + BLOCK_K, k_end, ROW2, r4, n4, n_ok4,
                                                 rows_total, rows2_total, N, PER, BLOCK_K, EVEN,
                                                 TWO_PLANES)
        elif PREFETCH == 2:
            w_next, v_next = w_next2, v_next2
            w_next2, v_next2 = _gemv1p_block_words(QW, k0 + 2 * BLOCK_K, k_end, ROW2, r4, n4,
                                                   n_ok4, rows_total, rows2_total, N, PER,
                                                   BLOCK_K, EVEN, TWO_PLANES)
    if PDL:
        # After the K loop, not at the start: the grid is about 3 waves (_gemv1p_split), and
        # programs of the next kernel made resident early would hold the slots of this one's
        # later waves while they wait (s23run4: with the GEMV dispatched with PDL and
        # triggering at its start, qwen3 decode at one row ran 2.3% slower a step).
        gdc_launch_dependents()
    if PER_CHANNEL:
        acc = acc * s3
    y = tl.sum(acc, axis=1)  # [BLOCK_M, BN_SUB, SUBS]
    if SUBS == 1:
        y = tl.reshape(y, [BLOCK_M, BLOCK_N])
    else:
        y = tl.reshape(tl.permute(y, (0, 2, 1)), [BLOCK_M, BLOCK_N])
    if DENORM:
        y = y * 18446744073709551616.0  # 2^64
    if ACT != 0 and ACT_GROUP == 0:
        y = y * tl.load(XS + offs_m, mask=m_ok, other=0.0)[:, None]
    if HAS_BIAS:
        y = y + tl.load(BIAS + offs_n, mask=n_ok & (pid_k == 0), other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = m_ok[:, None] & n_ok[None, :]
    if REDUCE == 1:
        tl.atomic_add(y_ptrs, y, mask=y_mask)
    elif REDUCE == 2:
        # Split-K in one launch (tiles.ticket_split_k), a ticket per output tile.
        ticket_split_k(y, Y, offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, y_mask,
                       WS, offs_m[:, None] * N + offs_n[None, :], M * N, CNT,
                       pid_m * tl.num_programs(0) + pid_n, pid_k, tl.num_programs(1))
    else:
        tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=y_mask)


@triton.jit
def _act_code(v, QMAX: tl.constexpr, FP8: tl.constexpr):
    """An activation code: v (fp32) rounded to the nearest integer or float8 e4m3 value, ties to
    even, clamped to [-QMAX, QMAX] (act_quant_kernel and norm_act_quant_kernel share it)."""
    if FP8:
        e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.maximum(e, -6)  # e4m3 subnormals are spaced 2^-9 apart
        inv_quantum = ((127 + 3 - e) << 23).to(tl.float32, bitcast=True)
        quantum = ((127 - 3 + e) << 23).to(tl.float32, bitcast=True)
        c = ((v * inv_quantum + 12582912.0) - 12582912.0) * quantum
    else:
        c = (v + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(c, -QMAX), QMAX)


@triton.jit
def _group_codes(xq, QMAX: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr, ACT_GROUP: tl.constexpr):
    """(codes [BLOCK_M, BLOCK_K], scales [BLOCK_M, BLOCK_K // ACT_GROUP]) of a tile of x' (fp32,
    zero outside the row): one scale per row and ACT_GROUP consecutive columns, s = max|x'| /
    QMAX over the group (1 for an all-zero group), c = code(x' / s)."""
    NG: tl.constexpr = BLOCK_K // ACT_GROUP
    xg = tl.reshape(xq, (BLOCK_M, NG, ACT_GROUP))
    scale = tl.max(tl.abs(xg), axis=2) / QMAX
    scale = tl.where(scale == 0.0, 1.0, scale)
    c = _act_code(xg / scale[:, :, None], QMAX, FP8)
    return tl.reshape(c, (BLOCK_M, BLOCK_K)), scale


@triton.jit
def _store_group_scales(XS, scale, offs_m, m_ok, k0, K, BLOCK_K: tl.constexpr,
                        ACT_GROUP: tl.constexpr):
    """Store the [BLOCK_M, BLOCK_K // ACT_GROUP] scales of the tile starting at column k0 into
    XS [M, ceil(K / ACT_GROUP)] (contiguous)."""
    NG: tl.constexpr = BLOCK_K // ACT_GROUP
    n_groups = (K + ACT_GROUP - 1) // ACT_GROUP
    g = k0 // ACT_GROUP + tl.arange(0, NG)
    tl.store(XS + offs_m[:, None] * n_groups + g[None, :], scale,
             mask=m_ok[:, None] & (g < n_groups)[None, :])


@triton.jit
def _act_dst(offs, PERM128: tl.constexpr):
    """Where channel `offs` is stored: itself, or (PERM128) its place in the mmT kernel's
    permuted 128-channel blocks."""
    if PERM128:
        return (offs // 128) * 128 + (offs % 8) * 16 + (offs % 128) // 8
    return offs


@triton.jit
def _x_tile(X, SM, offs_m, m_ok, offs, K, stride_xm, stride_xk, HAS_SMOOTH: tl.constexpr,
            ROT: tl.constexpr = 0, DOT_F32: tl.constexpr = False):
    """(x' fp32 [BLOCK_M, BLOCK_K], mask): x's rows offs_m at columns offs (0 outside the rows
    and K), rotated (ROT: each ROT-column block times the normalised Hadamard matrix,
    :func:`hadamard.rotate_tile`; the tile holds whole blocks), then times the smoothing vector
    where there is one."""
    mask = m_ok[:, None] & (offs < K)[None, :]
    x = tl.load(X + offs_m[:, None] * stride_xm + offs[None, :] * stride_xk, mask=mask,
                other=0.0)
    if ROT != 0:
        x = rotate_tile(x, ROT, DOT_F32)
    else:
        x = x.to(tl.float32)
    if HAS_SMOOTH:
        x = x * tl.load(SM + offs, mask=offs < K, other=0.0)[None, :]
    return x, mask


@triton.jit
def _token_scale(amax, QMAX: tl.constexpr):
    """The per-token scale from |x'| ([BLOCK_M, n]): max / QMAX, 1 for an all-zero row."""
    scale = tl.max(amax, axis=1) / QMAX
    return tl.where(scale == 0.0, 1.0, scale)


@triton.jit
def _store_token_codes(C, x, scale, offs_m, offs, mask, stride_cm, QMAX: tl.constexpr,
                       FP8: tl.constexpr, DEQUANT: tl.constexpr, PERM128: tl.constexpr):
    """Store the codes of the tile x' under per-token `scale` (or c * s with DEQUANT)."""
    c = _act_code(x / scale[:, None], QMAX, FP8)
    if DEQUANT:
        c = c * scale[:, None]
    tl.store(C + offs_m[:, None] * stride_cm + _act_dst(offs, PERM128)[None, :],
             c.to(C.dtype.element_ty), mask=mask)


@triton.jit
def act_quant_kernel(X, SM, C, XS, M, K, stride_xm, stride_xk, stride_cm,
                     QMAX: tl.constexpr, FP8: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ACT_GROUP: tl.constexpr,
                     DEQUANT: tl.constexpr = False, PERM128: tl.constexpr = False,
                     PDL: tl.constexpr = False, ONE_TILE: tl.constexpr = False,
                     ROT: tl.constexpr = 0, DOT_F32: tl.constexpr = False,
                     ROT_BLOCKS: tl.constexpr = True):
    """Dynamic activation quantization: one program per BLOCK_M rows of x.

    Math (fp32): x' = x (ROT: x R, the block-Hadamard rotation of :mod:`hadamard`, BLOCK_K a
    multiple of ROT; DOT_F32 under the interpreter; ROT_BLOCKS, per token with the row in one tile:
    the tile loaded as rows of one rotation block each, a program taking every num_programs-th tile,
    else reshaped) (* smooth); s = max|x'| / QMAX over the row (ACT_GROUP = 0: per token) or over
    each group of ACT_GROUP consecutive columns (the last one partial when ACT_GROUP does not divide
    K), 1 where that is all zero; v = x' / s; integer formats: c = clamp(rint(v), -QMAX, QMAX); FP8:
    c = v rounded to the nearest float8 e4m3 value (ties to even; |v| <= 448 = QMAX by
    construction), computed exactly in fp32 from
    v's exponent so that every backend rounds alike. Writes c (in C's dtype, which holds it
    exactly) and s (XS [M] per token; [M, ceil(K / ACT_GROUP)] per group). DEQUANT writes
    c * s (fp32, rounded once to C's dtype: the dequantise path's activations) instead of c.
    PERM128 stores channel k0 + 8r + j of each 128-channel block at k0 + 16j + r (the mmT
    kernel's XPERM layout, :func:`qlinear_swap.permute_x_blocks`; C's padding columns are the
    caller's).
    Traffic: per token, reads the rows once when ONE_TILE (BLOCK_K >= K: the row stays in
    registers), else twice (the second time mostly from L1/L2); per group (BLOCK_K a multiple
    of ACT_GROUP: a tile holds whole groups), once; writes the codes once and 4 bytes per scale.

    PDL (launched with programmatic dependent launch; never under the interpreter): the program
    lets the next PDL kernel start at once (the GEMV that reads the codes: its programs then
    load their first weight blocks while this one runs; its grid is one or a few programs) and
    waits for the kernel before it before it reads x.
    """
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = offs_m < M
    offs0 = tl.arange(0, BLOCK_K)
    if ACT_GROUP != 0:
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + offs0
            x, mask = _x_tile(X, SM, offs_m, m_ok, offs, K, stride_xm, stride_xk, HAS_SMOOTH,
                              ROT, DOT_F32)
            c, scale = _group_codes(x, QMAX, FP8, BLOCK_M, BLOCK_K, ACT_GROUP)
            if DEQUANT:
                NG: tl.constexpr = BLOCK_K // ACT_GROUP
                c = tl.reshape(tl.reshape(c, (BLOCK_M, NG, ACT_GROUP)) * scale[:, :, None],
                               (BLOCK_M, BLOCK_K))
            tl.store(C + offs_m[:, None] * stride_cm + _act_dst(offs, PERM128)[None, :],
                     c.to(C.dtype.element_ty), mask=mask)
            _store_group_scales(XS, scale, offs_m, m_ok, k0, K, BLOCK_K, ACT_GROUP)
    elif ONE_TILE and ROT != 0 and ROT_BLOCKS:
        # Rotated, the row whole in the tile: loaded straight as rows of one rotation block
        # each ([BLOCK_M * BLOCK_K / ROT, ROT], tl.dot's operand as it is), not as a
        # [BLOCK_M, BLOCK_K] tile reshaped for the dot and back. A program takes every
        # num_programs-th tile of BLOCK_M rows (the launcher may start fewer programs than
        # tiles): the +-1 matrix, about ten integer operations an entry, is made once a program.
        NB: tl.constexpr = BLOCK_K // ROT
        sign = hadamard_sign(ROT, DOT_F32, X.dtype.element_ty)
        r = tl.arange(0, BLOCK_M * NB)
        cols = (r % NB)[:, None] * ROT + tl.arange(0, ROT)[None, :]
        col_ok = cols < K
        if HAS_SMOOTH:
            sm = tl.load(SM + cols, mask=col_ok, other=0.0)
        for tile in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
            rows = (tile * BLOCK_M + r // NB).to(tl.int64)  # tile * BLOCK_M < M: no overflow
            mask = (rows < M)[:, None] & col_ok
            xb = tl.load(X + rows[:, None] * stride_xm + cols * stride_xk, mask=mask, other=0.0)
            y = hadamard_dot(xb, sign, ROT, DOT_F32)
            if HAS_SMOOTH:
                y = y * sm
            scale = _token_scale(tl.reshape(tl.max(tl.abs(y), axis=1), (BLOCK_M, NB)), QMAX)
            s_rows = tl.reshape(tl.broadcast_to(scale[:, None], (BLOCK_M, NB)), (BLOCK_M * NB,))
            c = _act_code(y / s_rows[:, None], QMAX, FP8)
            if DEQUANT:
                c = c * s_rows[:, None]
            tl.store(C + rows[:, None] * stride_cm + _act_dst(cols, PERM128),
                     c.to(C.dtype.element_ty), mask=mask)
            tile_rows = (tile * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            tl.store(XS + tile_rows, scale, mask=tile_rows < M)
    elif ONE_TILE:
        # The row is whole in the tile: loaded once, kept in registers between its max and its
        # codes (the loop below reads it twice, the second time from L1/L2, one round of
        # dependent loads after the other).
        x, mask = _x_tile(X, SM, offs_m, m_ok, offs0, K, stride_xm, stride_xk, HAS_SMOOTH,
                          ROT, DOT_F32)
        scale = _token_scale(tl.abs(x), QMAX)
        _store_token_codes(C, x, scale, offs_m, offs0, mask, stride_cm, QMAX, FP8, DEQUANT,
                           PERM128)
        tl.store(XS + offs_m, scale, mask=m_ok)
    else:
        amax = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x, mask = _x_tile(X, SM, offs_m, m_ok, k0 + offs0, K, stride_xm, stride_xk,
                              HAS_SMOOTH, ROT, DOT_F32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = _token_scale(amax, QMAX)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + offs0
            x, mask = _x_tile(X, SM, offs_m, m_ok, offs, K, stride_xm, stride_xk, HAS_SMOOTH,
                              ROT, DOT_F32)
            _store_token_codes(C, x, scale, offs_m, offs, mask, stride_cm, QMAX, FP8, DEQUANT,
                               PERM128)
        tl.store(XS + offs_m, scale, mask=m_ok)


# ---------------------------------------------------------------------------------------------
# Launchers and the dispatch table
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def fp8_supported(device: torch.device) -> bool:
    """Whether float8 e4m3 tensor-core products exist on `device` (sm_89+)."""
    return _fp8_capable(_device_capability(device))


def _fp8_capable(capability: Optional[tuple[int, int]]) -> bool:
    return capability is not None and capability >= (8, 9)


def _device_capability(device: torch.device) -> Optional[tuple[int, int]]:
    """`device`'s compute capability, None off CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return contract.device_capability(device.index if device.index is not None
                                      else torch.cuda.current_device())


def _k_block(group_size: int, want: int, act_group_size: int = PER_TOKEN) -> int:
    """The K block: `want`, at most the weight group and the activation group (powers of two from
    32, so the block divides both and lies in one group of each)."""
    for group in (group_size, act_group_size):
        if group > 0:
            want = min(want, group)
    return want


def _split(n_tiles: int, k_pad: int, block_k: int, sms: int, max_split: int = 16) -> int:
    """Split K until the grid covers the GPU about twice (each split keeps >= 2 K blocks)."""
    split = 1
    k_blocks = -(-k_pad // block_k)
    while split < max_split and n_tiles * split < 2 * sms and k_blocks // (split * 2) >= 2:
        split *= 2
    return split


# The mm tile's K split (65-256 rows; its 64 x 128 tile, 4 warps, fits three programs an SM):
# split only where the tiles are fewer than the SMs, into as many splits as keep the programs
# within one wave of three an SM, at most MM_MAX_SPLIT. s25run4 (`bench_qlinear.py --splits`,
# W8A8 per channel at 96-256 rows on 4096^2, 12288 x 4096, 4096 x 12288, 28672 x 8192 and
# 5120^2, CUDA-graph ms): every best split kept the programs at or below 384 (3 x 132), and
# past a wave each lost 1.3-1.5x (4096^2 at 256 rows: 128 tiles x split 4 = 512 programs
# 0.0599 ms against split 3's 0.0428 and split 1's 0.0410; 4096 x 12288 at 256 rows 0.1043
# against split 3's 0.0765); from 192 tiles split 1 was best (12288 x 4096 at 96 rows: 0.0476
# against split 2's 0.0532). This rule's split was the best swept or within 5% of it in all 25
# cases (at most 1.05x), where the "cover the SMs twice" rule of before (_split) ran 1.03-1.40x
# slower in 11 of them.
MM_PROGRAMS_PER_SM = 3
MM_MAX_SPLIT = 6


def _mm_split(n_tiles: int, k_pad: int, block_k: int, sms: int) -> int:
    """mm's K split (:data:`MM_PROGRAMS_PER_SM`), each split keeping >= 2 K blocks."""
    if n_tiles >= sms:
        return 1
    split = max(1, min(MM_MAX_SPLIT, MM_PROGRAMS_PER_SM * sms // n_tiles))
    return _keep_two_blocks(split, k_pad, block_k)


def _keep_two_blocks(split: int, k_pad: int, block_k: int) -> int:
    """`split` halved until each split keeps at least 2 K blocks (or it is 1)."""
    k_blocks = -(-k_pad // block_k)
    while split > 1 and k_blocks // split < 2:
        split //= 2
    return split


def _gemv_split(n_tiles: int, k_pad: int, block_k: int, sms: int) -> int:
    """The GEMV's K split: the mm rule (cover the SMs twice), but at least 4 (each split
    keeping >= 2 K blocks). H200, M = 1, 64 columns per program (s6run4): the mm rule alone
    chose 8, 2 and 1 at 4096 x 4096, 12288 x 4096 and 28672 x 8192, and 1 was 1.02-1.37x
    slower than 4 at 28672 x 8192 (more programs keep more loads in flight); 4 alone was
    1.17-1.20x slower than 8 for W8A8 and W4A8 at 4096 x 4096. With this rule each format
    measured there (W4A16, W8A8, W4A8) was within 8% of its best split at 64 columns."""
    return max(_keep_two_blocks(4, k_pad, block_k), _split(n_tiles, k_pad, block_k, sms))


# The single-plane GEMV (qlinear_gemv1p_kernel): which weights it takes, and the launch
# parameters a benchmark sweeps (bench/bench_qlinear_gemv.py). GEMV1P_DEFAULT is the H200
# sweep's (s8run1, `bench_qlinear_gemv.py --grid`: K splits 1-16 x PREFETCH 1, 2 x 64/128
# columns, W4A16 g128 and W8A16 per channel at the issue's four shapes, M = 1): 64 columns and
# 4 warps were the fastest in 7 of the 8 rows (the 8th, 4096 x 12288 W4, 2% behind 128 columns),
# with SPLIT_K "auto" (:func:`_gemv1p_split`) within 2.3% of each row's best. BLOCK_K is capped at
# the weight and activation groups by the launcher's caller (:func:`gemv1p_config`).
# Tiles: the sm_90 compile (bench/compile_qlinear_sm90.py) shows no shared-memory conversion in
# the inner loop for these at BLOCK_M = 1 (BLOCK_M * BLOCK_K < 32 * num_warps; BLOCK_N < 32 *
# num_warps), except the one 4-warp 128 x 128 entry, kept to measure what the conversions cost.
GEMV1P_BITS = (2, 4, 6, 8)
# Quantized activations at one row: the activation quantizer (one program) and the GEMV that
# reads its codes launched with programmatic dependent launch, the quantizer letting the GEMV
# start at once (see act_quant_kernel, qlinear_gemv1p_kernel): four linears in a chain 1.02-1.18x
# (W4A8) and 1.01-1.14x (W6A12) faster, qwen3 "bench" decode at one row with the design config
# 0.554 / 0.557 ms a step against 0.584 / 0.584 (s23run6, bench_decode_pdl.py, two alternating
# pairs). 16-bit x keeps plain stream order there (the GEMV after Inductor's kernels gained
# nothing a decode step, s23run4-5).
GEMV1P_PDL_AFTER_QUANT = True
# 2-32 rows with quantized activations: whether the quantizer (one program a row, writing x
# quantised and dequantised) and the swapped tile after it (which waits at its start, so only
# its launch is hidden) take programmatic dependent launch. Off: qwen3 "bench" decode at 16 rows
# with the design config took 0.844 ms a step with it against 0.796 without (s23run7, one pair;
# the tile triggers the next kernel at its start, and its grid is several waves, as the GEMV's
# was when it lost 2.3% that way). A forced launch's cfg ``PDL`` still asks for it.
MMT_PDL_AFTER_QUANT = False
# q3n::qlinear_codes on the wg path: the codes' dequantisation (act_dequant.dequantize_codes)
# and the wg tile after it launched with programmatic dependent launch, as the tile behind x's
# own permutation is (where the launch's PDL, qlinear_wgmma.with_pdl, says so). s43run4
# (bench_codes_dequant.py, 96-256 rows of three shapes): 1.00-1.06x the same kernels in plain
# stream order in 29 of 30 cases (0.994x in one); s43run5, qwen3 "bench" decode at 200 rows
# with the design config and norm fusion: 2.248 / 2.250 ms a step against 2.266 without.
CODES_WG_PDL = True
GEMV1P_DEFAULT = dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=1, PREFETCH=1,
                      SPLIT_K="auto", REDUCE="ticket")
GEMV1P_SWEEP = [
    dict(BLOCK_N=n, BLOCK_K=bk, num_warps=w, num_stages=1, PREFETCH=pf, SPLIT_K=s, REDUCE=r)
    for n, bk, w, pf, s, r in [
        (64, 128, 4, 1, "auto", "ticket"),       # the default
        (128, 128, 8, 1, "auto", "ticket"),      # the default until s8run1
        (128, 128, 8, 0, "auto", "ticket"),      # no register buffer
        (128, 128, 8, 2, "auto", "ticket"),      # two blocks ahead
        (128, 128, 8, 1, "auto", "atomic"),      # split by atomics (3 kernels)
        (128, 128, 8, 1, 1, "ticket"),           # no split
        (64, 128, 8, 1, "auto", "ticket"),
        (64, 64, 4, 2, "auto", "ticket"),
        (128, 64, 8, 2, "auto", "ticket"),
        (128, 128, 16, 1, "auto", "ticket"),
        (256, 128, 16, 1, "auto", "ticket"),
        (128, 128, 4, 1, "auto", "ticket"),      # x and scales converted through shared memory
    ]
] + [
    # Column sub-tiles per thread (SUBS): each x element serves 4 * SUBS columns.
    dict(BLOCK_N=n, BLOCK_K=128, num_warps=w, num_stages=1, PREFETCH=1, SPLIT_K="auto",
         REDUCE="ticket", SUBS=subs)
    for n, w, subs in [(64, 4, 2), (128, 8, 2), (128, 4, 2), (128, 4, 4)]
]


def _gemv1p_split(programs: int, k_pad: int, block_k: int, sms: int,
                  denorm: bool = False) -> int:
    """K split for the single-plane GEMV: at least 4, doubled until the grid covers the SMs 3
    times, at most 16, keeping >= 2 K blocks per split. On the H200 (s8run1, 64 columns, M = 1)
    it picks 8, 4, 8 and 4 at 4096 x 4096, 12288 x 4096, 4096 x 12288 and 28672 x 8192: the
    best split in 5 of the 8 rows (W4 g128, W8 per channel), within 2.3% in the others (28672 x
    8192 W8 was fastest at 2, 69.6 against 71.2 us). `denorm` (the denormal unpack, 4-bit
    weights): also doubled while a split has more than 8 K blocks, which gives 16 at 4096 x 12288
    and 8 at 28672 x 8192: 12% faster at the first (0.0195 / 0.0196 against 0.0222 / 0.0224 ms
    with 8 splits, s16run1-2), 2% at the second, the same splits as before at the other two."""
    split = 4
    while split < 16 and programs * split < 3 * sms:
        split *= 2
    if denorm:
        while split < 16 and k_pad // block_k > 8 * split:
            split *= 2
    return _keep_two_blocks(split, k_pad, block_k)


def gemv1p_config(M: int, N: int, K: int, group_size: int, *, sms: int,
                  act_group_size: int = PER_TOKEN, base: Optional[dict] = None,
                  bits: Optional[int] = None, x_dtype: torch.dtype = torch.bfloat16) -> dict:
    """The gemv1p path's launch parameters for one call: `base` (a :data:`GEMV1P_SWEEP` entry;
    :data:`GEMV1P_DEFAULT` if None, whose warps then double from 2 rows on, up to 16, while x's
    block has as many elements as the program has threads) with BLOCK_K capped at the groups,
    BLOCK_M = M rounded up to a power of two (at most 16) unless `base` gives it, SPLIT_K "auto"
    resolved (for the unpack :func:`gemv1p_denorm` gives `bits` and the kernel's x dtype, the
    activation codes' where x is quantized; `bits` None: the magic unpack's rule)."""
    cfg = dict(GEMV1P_DEFAULT if base is None else base, path="gemv1p")
    cfg["BLOCK_K"] = _k_block(group_size, cfg["BLOCK_K"], act_group_size)
    cfg.setdefault("BLOCK_M", min(16, contract.next_power_of_2(max(M, 1))))
    if base is None and cfg["BLOCK_M"] > 1:
        # More warps rather than x's block converted through shared memory every K block. Not at
        # one row: there the 4-warp tile, with that conversion, was the fastest (s8run1).
        while cfg["BLOCK_M"] * cfg["BLOCK_K"] >= 32 * cfg["num_warps"] and cfg["num_warps"] < 16:
            cfg["num_warps"] *= 2
    if cfg["SPLIT_K"] == "auto":
        programs = contract.cdiv(N, cfg["BLOCK_N"]) * contract.cdiv(max(M, 1), cfg["BLOCK_M"])
        cfg["SPLIT_K"] = _gemv1p_split(programs, P.padded_k(K), cfg["BLOCK_K"], sms,
                                       denorm=bits is not None and gemv1p_denorm(bits, x_dtype))
    return cfg


# The M-indexed dispatch table for CUDA: (max M, path, tile for the mm and mmT paths). First
# match wins.
# Untuned first rule; bench/bench_qlinear.py --sweep measures every path per shape on the GPU
# and prints the table it would choose.
CUDA_TABLE = {
    # One row takes the GEMV in every table; from 2 rows the swapped-operand tile (mmT, its
    # 8-row tile up to 8 rows). At 2 rows the 2-row GEMV (16 warps) ran 1.03-2.07x mmT's time
    # in all 28 rows of s16run5 (W4A16, W8A16, W6A16, W2A16, W4A8, W6A12, W8A8; the issue's
    # four shapes; W2A16 1.03-1.21x, the others 1.22-2.07x). E.g. W4A16 0.0233 / 0.0404 /
    # 0.0463 / 0.1535 ms against 0.0146 / 0.0238 / 0.0248 / 0.0743 at 4096^2 / 12288 x 4096 /
    # 4096 x 12288 / 28672 x 8192 (bf16 0.0187 / 0.0378 / 0.0404 / 0.1252); W4A8 0.0279 /
    # 0.0414 / 0.0475 / 0.1485 against 0.0170 / 0.0265 / 0.0283 / 0.0770.
    # 16-bit activations: tensor-core tiles up to 64 rows, and dequantise + cuBLAS above, where
    # cuBLAS's GEMM beats a Triton GEMM whose inner loop also
    # unpacks: at M = 256 it took 0.64x (4096 x 4096) and 0.88x (28672 x 8192) of the 64 x 128
    # tile's time, at M = 4096 0.92-0.94x bf16 (s6run6).
    # From 2 (before session 16: 3) to 16 rows the swapped-operand tile (mmT, K split as the
    # GEMV's, 8-row tiles up to 8 rows, see choose_path): W4A16 g128 at 16 rows ran 0.0174 /
    # 0.0298 / 0.0898 ms at 4096^2 / 12288 x 4096 / 28672 x 8192 (s9run2; bf16 0.0188 /
    # 0.0377 / 0.1264), where the mm tile had run 0.0259 / 0.0422 / 0.1581 (s8run2).
    # 17-64 rows: mmT with x's 32 or 64 rows on the MMA's N side. W4A16 g128 at 32 rows ran
    # 0.0212 / 0.0393 / 0.0361 / 0.1253 ms at 4096^2 / 12288 x 4096 / 4096 x 12288 / 28672 x
    # 8192 against the mm tile's 0.0301 / 0.0492 / 0.0580 / 0.2120, and at 64 rows 0.0262 /
    # 0.0519 / 0.0432 / 0.1593 against 0.0427 / 0.0768 / 0.0917 / 0.3294 (s9run6).
    # On an sm_90 GPU, 4- and 6-bit weights in groups of 128 take the Gluon tile ("wg",
    # kernels/qlinear_wgmma.py) from 33 (session 21; 49 before) to 256 rows instead (sessions
    # 17-18; choose_path).
    "a16": [(1, "gemv", None), (16, "mmT", (16, 64, 128, 4, 3)),
            (32, "mmT", (32, 64, 128, 4, 3)), (64, "mmT", (64, 128, 128, 8, 3)),
            (None, "dequant", None)],
    # 8-bit activations: tensor-core tiles up to M = 256, dequantise + cuBLAS above; where the
    # format allows, the cublas8 path replaces both from CUBLAS8_MIN_M rows. At M = 1024 the
    # 128 x 128 tile this table had there ran 0.17-0.39x bf16 against dequantise + cuBLAS's
    # 0.42-0.76x in all 16 rows of s8run1 (W4A8, W8A8, 4 shapes; the weight tile is unpacked in
    # registers, so its loads are not pipelined like a plain GEMM's).
    # K blocks of 64 from M > 64: with 128, the 6-bit planes' unpack buffers overflowed the H200's
    # 227 KiB of shared memory (311-328 KB asked for, measured 2026-11-28).
    # From 2 (before session 16: 3) to 16 rows: x quantised and dequantised in one pass, then
    # the swapped-operand tile: W4A8 ran 0.0202 / 0.0324 / 0.0932 ms at 4096^2 / 12288 x 4096 /
    # 28672 x 8192 (s9run2), where the mm tile had run 0.0263 / 0.0512 / 0.1948 (s8run5).
    # 17-64 rows likewise: W4A8 at 32 rows ran 0.0238 / 0.0418 / 0.0396 / 0.1283 ms on mmT
    # against the mm tile's 0.0302 / 0.0596 / 0.0594 / 0.2344, W8A8 0.0233 / 0.0362 / 0.0363 /
    # 0.1052 against 0.0251 / 0.0428 / 0.0432 / 0.1478 (s9run7 sweep; 64 rows 1.2-2.4x).
    "a8": [(1, "gemv", None), (16, "mmT", (16, 64, 128, 4, 3)),
           (32, "mmT", (32, 64, 128, 4, 3)), (64, "mmT", (64, 128, 128, 8, 3)),
           (256, "mm", (64, 128, 64, 4, 3)), (None, "dequant", None)],
    # 12-bit activations (fp16 products): dequantise + cuBLAS from 65 rows. At 256 rows it ran
    # 0.056 / 0.121 / 0.139 / 0.476 ms against the 64 x 128 tile's 0.095 / 0.214 / 0.213 / 0.830
    # (W6A12 g128, 4096^2, 12288 x 4096, 4096 x 12288, 28672 x 8192; s8run3).
    # W6A12 at 16 rows, mmT against the mm tile: 0.0268 / 0.0518 / 0.1831 ms against 0.0313 /
    # 0.0516 / 0.2472 (s8run5).
    # 17-64 rows: W6A12 on mmT 1.3-1.9x faster than the mm tile (s9run7 sweep).
    "a12": [(1, "gemv", None), (16, "mmT", (16, 64, 128, 4, 3)),
            (32, "mmT", (32, 64, 128, 4, 3)), (64, "mmT", (64, 128, 128, 8, 3)),
            (None, "dequant", None)],
}
_TABLE_KEY = {"none": "a16", "int8": "a8", "fp8": "a8", "int12": "a12"}
# From these many rows the cublas8 path (:mod:`qlinear_cublas8`) takes the formats it computes
# exactly. H200, s8run1, the issue's 4 shapes: at 256 rows fp8 ran 0.048-0.26 ms against the
# tiles' 0.072-0.56 and dequantise + cuBLAS's 0.054-0.43 (W4A8 g128, per token and per 128
# channels: 8 of 8 rows faster); int8 (W8A8 per channel) was slower than its tile in 3 of 4
# shapes at 256 rows and faster than every alternative at 1024 and 4096.
# s15run1-2 (bench_qlinear_mm8.py, W4A8 g128 fp8 per token and per 128 channels, codes given):
# at 96 and 128 rows cublas8 ran 0.0292-0.1990 ms against the 64-row mmT tile's (codes
# dequantised first) 0.0354-0.2281, faster in all 20 rows (1.02-1.38x), so fp8 takes it from
# 65 rows; between, the mm tile had lost to mmT (s10run4), and at 256 cublas8 won (s8run1).
# Per-channel weights (cuBLAS's row-scaled fp8 GEMM) were not measured below 256 rows: they keep
# the session-8 threshold.
# int8 (W8A8 per channel) on weights of at most CUBLAS8_INT8_SMALL_WEIGHTS entries from 65 rows:
# s25run3-5 (bench_qlinear.py, the same process) 4096^2 at 96 / 128 / 160 / 192 / 256 rows
# 0.0301 / 0.0301 / 0.0372 / 0.0338 / 0.0345 ms against the mm tile's 0.0331 / 0.0342 / 0.0374 /
# 0.0383 / 0.0428 with its split of s25run4 (1.01-1.24x); on 5120^2 (26M) the mm tile was as
# fast or faster (0.0403-0.0551 against 0.0459-0.0581), on 4096 x 12288, 12288 x 4096 and
# 28672 x 8192 faster (1.20-1.67x). Only 4096^2 measured at or below the threshold.
CUBLAS8_MIN_M = {"fp8": 65, "int8": 257}
CUBLAS8_FP8_PER_CHANNEL_MIN_M = 256
CUBLAS8_INT8_SMALL_MIN_M, CUBLAS8_INT8_SMALL_WEIGHTS = 65, 4096 * 4096


def _cublas8_min_m(act: str, group_size: int, weights: int) -> int:
    if act == "fp8" and group_size == P.PER_CHANNEL:
        return CUBLAS8_FP8_PER_CHANNEL_MIN_M
    if act == "int8" and weights <= CUBLAS8_INT8_SMALL_WEIGHTS:
        return CUBLAS8_INT8_SMALL_MIN_M
    return CUBLAS8_MIN_M.get(act, 1 << 62)
# mm8 (:mod:`qlinear_mm8`) for fp8 codes with one scale per token and 4-bit g128 weights from 65
# to 128 rows, with its 128 x 32 tile (128 registers: 4 programs an SM), where measured faster:
# - unsplit where the tiles make at least two per SM: s15run2-4 (ms, mm8 / cublas8) 96 rows
#   0.0444 / 0.0562 (12288 x 4096, 384 tiles), 0.1728 / 0.1940 (28672 x 8192, 896); 128 rows
#   0.0434 / 0.0612, 0.1702 / 0.1995 (s15run4); split 2 and 4 were slower there;
# - K split 4 ways where the tiles are 0.75-1 of the SMs (N = 4096: 128 tiles), each split
#   keeping at least 8 K blocks: s15run4 65 / 128 rows 0.0224 / 0.0345 and 0.0241 / 0.0302
#   (4096^2), 0.0462 / 0.0620 and 0.0472 / 0.0578 (4096 x 12288), where split 2 and 8 and the
#   unsplit tile (0.0289 / 0.0750 at 65 rows) were slower.
# Elsewhere cublas8: with scales per 128 channels mm8 lost at 28672 x 8192 (0.2351 / 0.1956,
# s15run2); at 256 rows it won on two shapes and lost on two (4096 x 12288, 28672 x 8192:
# 0.3255 / 0.2598; s15run3), split or not (s15run4); other tile counts were not measured.
MM8_ROWS = (65, 128)
MM8_TILE = dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3, GROUP_M=8)
MM8_SPLIT, MM8_MIN_BLOCKS_PER_SPLIT = 4, 8


def _mm8_split(M: int, N: int, K: int, bits: int, group_size: int, act: str,
               act_group_size: int, sms: int) -> Optional[int]:
    """mm8's K split where it was measured faster than cublas8 (above), else None (per-channel
    weights, whose cuBLAS GEMM is row-scaled, were not measured against it)."""
    if not (act == "fp8" and bits == 4 and group_size == 128 and act_group_size == PER_TOKEN
            and MM8_ROWS[0] <= M <= MM8_ROWS[1]):
        return None
    tiles = contract.cdiv(M, MM8_TILE["BLOCK_M"]) * contract.cdiv(N, MM8_TILE["BLOCK_N"])
    if tiles >= 2 * sms:
        return 1
    blocks = contract.cdiv(P.padded_k(K), 128)
    if 3 * sms <= MM8_SPLIT * tiles <= 4 * sms and blocks >= MM8_SPLIT * MM8_MIN_BLOCKS_PER_SPLIT:
        return MM8_SPLIT
    return None


def choose_path(M: int, N: int, K: int, bits: int, group_size: int, act: str,
                dtype: torch.dtype, device: torch.device, *, interpreter: bool = False,
                sm_count: Optional[int] = None, act_group_size: int = PER_TOKEN,
                capability: Optional[tuple] = None, allow_wg: bool = True,
                symmetric: bool = False, allow_row_split: bool = True,
                allow_concurrent: bool = True) -> dict:
    """The path and launch parameters for one call; a pure function of its arguments
    (`symmetric`: the weights have no zero points; the wg rule copies x by TMA only for weights
    with them, TALL_TMA and WIDE_TMA).

    Interpreter: few programs (each costs ~0.1 s there): 16/32 x 64 x 64 (<= group) tiles, gemv
    for M <= 2, no split. Every K block is at most the weight group and the activation group.
    CUDA: :data:`CUDA_TABLE` by M; GEMV: :func:`gemv1p_config` for 8-, 4- and 2-bit weights,
    else 64 columns x 128 (<= groups) K per
    step, K split at least 4 ways (:func:`_gemv_split`);
    mm: split-K (fp32 atomics) where the output tiles are fewer than the SMs, as many splits as
    keep the programs within one wave (:func:`_mm_split`); from
    :data:`CUBLAS8_MIN_M` rows, 8-bit activations take "cublas8" (:mod:`qlinear_cublas8`) where
    that path computes the format exactly on this device.
    Both send single-plane weights at GEMV sizes to gemv1p: on CUDA one row (from 2 rows the
    swapped tile, s16run5), in the interpreter up to 2 rows.
    On an sm_90 GPU (`capability`, else the device's), 4- and 6-bit g128 weights take the Gluon
    tile ("wg", :func:`qlinear_wgmma.choose`) from 33 to 256 rows (512 / 768 for 4-bit weights
    of at least 3 * 2^25 / 2^27 entries with 16-bit x; quantized activations dequantised
    first; with 4-bit weights from 49 rows where the tile is the 64 x 64 one), to
    128 where cublas8 computes the call, ahead of mm8 and cublas8, and at 1-32 rows of large
    weights with bf16 x (:func:`qlinear_wgmma.choose_decode`);
    `allow_wg` False keeps the paths of before (``q3n::qlinear_codes`` where mmT reads the codes
    themselves).
    Just past whole 128-row tiles of wide 4- and 6-bit weights on the wg tile
    (:func:`qlinear_wgmma.row_split_head`), "rowsplit": the whole tiles (HEAD rows, on
    HEAD_PATH) and the rest as two launches
    (:func:`_launch_row_split`); where the head's one wave leaves a quarter of the SMs idle
    (:func:`qlinear_wgmma.rest_beside_head`), the two at once (CONCURRENT: the rest on a
    second stream, on REST_PATH, its decode tile's grid capped to the idle SMs, or mmT as it
    is; `allow_concurrent` False keeps the split in one stream where it applies);
    `allow_row_split` False gives the one launch instead.
    """
    k_pad = P.padded_k(K)
    if interpreter:
        if M <= 2 and bits in GEMV1P_BITS:
            return dict(path="gemv1p", BLOCK_M=contract.next_power_of_2(M), BLOCK_N=64,
                        BLOCK_K=_k_block(group_size, 64, act_group_size), SPLIT_K=1,
                        num_warps=4, num_stages=1, PREFETCH=1)
        if M <= 2:
            return dict(path="gemv", BLOCK_N=64, BLOCK_K=_k_block(group_size, 64, act_group_size),
                        SPLIT_K=1, num_warps=4, num_stages=1)
        return dict(path="mm", BLOCK_M=16 if M <= 16 else 32, BLOCK_N=64,
                    BLOCK_K=_k_block(group_size, 64, act_group_size), SPLIT_K=1, num_warps=4,
                    num_stages=1)
    sms = sm_count or _sm_count(device.index if device.index is not None
                                else torch.cuda.current_device())
    for max_m, path, tile in CUDA_TABLE[_TABLE_KEY[act]]:
        if max_m is None or M <= max_m:
            break
    # fp8 tensor cores from the capability the caller gives (a dispatch asked for another
    # GPU), else from the device
    fp8 = _fp8_capable(capability) if capability is not None else fp8_supported(device)
    cublas8 = (M >= _cublas8_min_m(act, group_size, N * K)
               and C8.eligible(N, K, bits, group_size, act, dtype, fp8, act_group_size) is None)
    if allow_wg and WG is not None and WG.supported(
            bits, group_size, act, dtype, N, capability or _device_capability(device)):
        split_kw = dict(quantized=act != "none", symmetric=symmetric,
                        bf16=dtype == torch.bfloat16, cublas8=cublas8)
        beside = (WG.rest_beside_head(M, N, K, sms, bits, **split_kw)
                  if allow_row_split and allow_concurrent else None)
        if beside is not None:
            kw = dict(sm_count=sms, act_group_size=act_group_size, capability=capability,
                      symmetric=symmetric, allow_row_split=False)
            rest = choose_path(M - 128, N, K, bits, group_size, act, dtype, device, **kw)
            # The rest's stream-K grid capped to the idle SMs, or mmT as it is (the form
            # measured where the decode tiles leave the rest's rows).
            if (rest.get("STREAM") and beside) or (rest["path"] == "mmT" and beside == 0):
                return dict(path="rowsplit", HEAD=128, CONCURRENT=True,
                            HEAD_PATH=choose_path(128, N, K, bits, group_size, act, dtype,
                                                  device, **kw),
                            REST_PATH=dict(rest, STREAM=beside) if beside else rest)
        head = WG.row_split_head(M, N, K, sms, bits, **split_kw) if allow_row_split else 0
        if head:
            return dict(path="rowsplit", HEAD=head, HEAD_PATH=choose_path(
                head, N, K, bits, group_size, act, dtype, device, sm_count=sms,
                act_group_size=act_group_size, capability=capability, symmetric=symmetric))
        wg = (WG.choose_decode(M, N, K, sms, bits, bf16=dtype == torch.bfloat16,
                               quantized=act != "none")
              if M < WG.MIN_M else WG.choose(M, N, sms, cublas8, bits, K,
                                             quantized=act != "none", symmetric=symmetric))
        if wg is not None:
            wg = dict(wg, SPLIT_K=_keep_two_blocks(wg["SPLIT_K"], k_pad, SW.MMT_BLOCK_K))
            return WG.with_pdl(wg, M, N, sms)
    mm8_split = _mm8_split(M, N, K, bits, group_size, act, act_group_size, sms) if cublas8 else None
    if mm8_split is not None:
        return dict(path="mm8", **MM8_TILE, SPLIT_K=mm8_split)
    if cublas8:
        return dict(path="cublas8")
    if bits == 4 and MMT_64_MAX_M[0] < M <= MMT_64_MAX_M[1]:
        tiles64 = contract.cdiv(M, 64) * contract.cdiv(N, 128)
        return dict(path="mmT", BLOCK_M=64, BLOCK_N=128, BLOCK_K=SW.MMT_BLOCK_K,
                    SPLIT_K=1 if _tiles_fill(tiles64, sms)
                    else _keep_two_blocks(2, k_pad, SW.MMT_BLOCK_K),
                    num_warps=8, num_stages=3, XPERM=True)
    if path == "dequant":
        return dict(path="dequant")
    if path == "gemv" and bits in GEMV1P_BITS:
        # The kernel's x is the activation codes when act is not "none" (never float32).
        return gemv1p_config(M, N, K, group_size, sms=sms, act_group_size=act_group_size,
                             bits=bits, x_dtype=dtype if act == "none" else torch.int8)
    if path == "gemv":
        bn, bk = 64, _k_block(group_size, 128, act_group_size)
        split = _gemv_split(M * contract.cdiv(N, bn), k_pad, bk, sms)
        return dict(path="gemv", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4,
                    num_stages=2)
    bm, bn, bk, warps, stages = tile
    if path == "mmT" and M <= 8:
        # x's rows are the MMA's N side, 8 the least it takes: W4A16 g128 at 4 rows, 28672 x
        # 8192, ran 0.081 ms against 0.088 with 16 (s9run1 sweep).
        bm, stages = 8, 4
    # mmT's K block is 128 channels whatever the groups (its sub-tiles never straddle one).
    bk = SW.MMT_BLOCK_K if path == "mmT" else _k_block(group_size, bk, act_group_size)
    n_tiles = contract.cdiv(M, bm) * contract.cdiv(N, bn)
    if path == "mmT" and bm == 64 and bits == 4 and _tiles_fill(n_tiles, sms):
        split = 1  # the tiles alone fill the SMs (MMT_FILL)
    elif path == "mmT" and bm == 64:
        # 4 (each split keeping >= 2 K blocks): the best split swept in all four of the issue's
        # shapes at 64 rows (s10run2; the mm rule's 8 / 4 / 4 / 2 ran 1.15x slower at 4096^2
        # and 1.03x at 28672 x 8192).
        split = _keep_two_blocks(4, k_pad, bk)
    elif path == "mmT" and M > 16:
        # The mm rule, at least 2 and at most 8: within 4% of the best split swept at 32 and
        # 64 rows (s9run6; the GEMV's minimum of 4 was 10% slower at 12288 x 4096, 32 rows).
        split = max(2, _split(n_tiles, k_pad, bk, sms, max_split=8))
    else:
        split = (_gemv_split if path == "mmT" else _mm_split)(n_tiles, k_pad, bk, sms)
    cfg = dict(path=path, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps,
               num_stages=stages)
    if path == "mmT":
        cfg["XPERM"] = _mmT_xperm(M, N, K, bits, act)
        if bits == 6 and bm == 64 and n_tiles * split >= 2 * sms:
            # 6-bit weights at 64 rows take 163-180 registers a thread, so one 8-warp program
            # per SM. Capped at 128 (no spills, sm_90 ptxas) with x permuted, two share an SM:
            # 0.0582 / 0.1884 ms against 0.0610 / 0.2263 at 12288 x 4096 / 28672 x 8192
            # (W6A16; W6A12 0.0580 / 0.1884 against 0.0641 / 0.2290), but 1.10-1.22x slower
            # where the grid has fewer programs than SMs (N = 4096) (s10run6).
            cfg.update(XPERM=True, maxnreg=128)
    return cfg


# mmT's 64-row tile (8 warps, ~116 registers a thread: two programs per SM) with 4-bit weights
# runs K unsplit where its tiles alone make at least this fraction of a wave (2 programs x SMs):
# splitting then only adds a partial wave (ncu, s14run1: 384 programs on 264 slots at 128 rows,
# 12288 x 4096, left the SMs idle 28% of the time). s14run3 (bench_qlinear.py --splits, W4A16 /
# W4A8 g128, ms): 128 rows 12288 x 4096 (192 tiles) 0.0594 / 0.0587 against split 2's 0.0692 /
# 0.0691, 28672 x 8192 (448) 0.2193 / 0.2189 against 0.2277 / 0.2182; 64 rows 28672 x 8192
# (224) 0.1191 / 0.1198 against split 4's 0.1262 / 0.1320. Where the tiles fall short (4096
# columns: 32-64 tiles; 96 at 64 rows, 12288 x 4096) the splits of before stay (split 1 ran
# 1.1-3.0x slower there).
MMT_FILL = 0.7


def _tiles_fill(tiles: int, sms: int) -> bool:
    return tiles >= MMT_FILL * 2 * sms


# mmT reads activation codes itself (``q3n::qlinear_codes``) up to CODES_MAX_ROWS rows; above
# (4-bit weights to 128 rows) the codes are dequantised (permuted) by one torch multiply first,
# for the tile with x permuted. s14run7 (bench_qlinear_codes.py, ms, codes read / dequantised
# first, at 29d6101: the K block converted before its split): W4A8 fp8 per token 16 rows
# 0.0152 / 0.0236 (4096^2), 0.0242 / 0.0327 (12288 x 4096), 0.0263 / 0.0324 (4096 x 12288),
# 0.0739 / 0.0826 (28672 x 8192); 32 rows 0.0176 / 0.0267, 0.0313 / 0.0357, 0.0300 / 0.0388,
# 0.1064 / 0.1101; 64 rows 0.0241 / 0.0292, 0.0417 / 0.0460, 0.0457 / 0.0463, 0.1189 / 0.1257;
# W6A12 likewise (0.77-0.95x). Before that fix (s14run2) the codes tile lost from 64 rows and
# at 28672 x 8192 from 16 rows. 65-128 rows: not measured with the fix.
CODES_MAX_ROWS = 64
# q3n::qlinear_codes splits rows as the op does (qlinear_wgmma.row_split_head) only where at
# most this many rows are left past the whole tiles: its rest reads the codes on mmT, not the
# op's decode tiles. s41run1 (bench_row_split.py --codes, W4A8 g128 per token, split against
# the one launch): 129 / 136 / 144 rows of 12288 x 4096 1.14 / 1.06 / 1.03x (int8) and 1.10 /
# 1.08 / 1.02x (fp8), of 28672 x 8192 1.25 / 1.18 / 1.14x and 1.22 / 1.22 / 1.14x; 160 rows
# (32 left, where the op's rule splits 28672 x 8192) 0.96 / 1.00x.
CODES_ROW_SPLIT_REST = 16


def mmT_reads_codes(M: int) -> bool:
    """Whether ``q3n::qlinear_codes`` hands mmT the codes themselves (else dequantised x)."""
    return M <= CODES_MAX_ROWS


# 4-bit weights from 65 to 128 rows, every activation format: mmT's 64-row tile (x permuted,
# K split in 2, or not where the tiles fill the SMs: MMT_FILL; the weight is unpacked once per
# 64 rows). W4A16 and W4A8 g128 at 128 rows ran
# 0.0323 / 0.0671 / 0.233 ms at 4096^2 / 12288 x 4096 / 28672 x 8192, within 4% of the best
# tile swept, where the table's dequantise + cuBLAS (16-bit) ran 0.0359 / 0.0869 / 0.432 and
# the mm tile (8-bit) 0.053 / 0.095 / 0.301 (s10run4 sweep; 0.57-0.59x bf16, from 0.31-0.52x).
# At 256 rows dequantise + cuBLAS (and cublas8) stay ahead. 12-bit activations run the same
# two kernels as 8-bit ones on this path (quantise-dequantise, then the 16-bit tile).
MMT_64_MAX_M = (64, 128)


# mmT's x permuted per 128-channel block (kernels/qlinear_swap.py, XPERM): each sub-tile's x
# slice then goes to the MMA's shared-memory operand as loaded, with no split in registers and
# no store + fence per sub-tile. Measured for 4-bit weights only (s10run1-2, the issue's four
# shapes, dispatched tiles): with quantized activations (the quantizer stores x permuted, at no
# extra cost) 0.79-0.98x the time of plain x from 16 to 64 rows, but 1.19-1.43x at 4 rows (the
# 8-row tile); with 16-bit activations (one more pass over x) 0.73-1.00x from 32 to 64 rows on
# the three larger shapes, but 1.13x at 4096^2 (32 rows) and 0.93-1.18x at 16 rows. 6-bit
# weights ran 1.00-1.17x the time with it at 32-64 rows and 8-bit weights 0.95-1.19x (no gain),
# so neither takes it (6-bit weights do at 64 rows with a register cap, below).
XPERM_MIN_WEIGHTS_A16 = 1 << 25


def _mmT_xperm(M: int, N: int, K: int, bits: int, act: str) -> bool:
    if bits != 4 or M <= 8:
        return False
    if act == "none":
        return M > 16 and N * K >= XPERM_MIN_WEIGHTS_A16
    return True


def _act_codes_dtype(act: str, device: torch.device, interpreter: bool) -> torch.dtype:
    if act == "int8":
        return torch.int8
    if act == "int12":
        return torch.float16
    # fp8: real float8 storage where tensor cores take it; elsewhere fp16 holds e4m3 values exactly.
    return torch.float8_e4m3fn if (not interpreter and fp8_supported(device)) else torch.float16


def _act_scales_empty(M, K: int, act_group_size: int, device) -> torch.Tensor:
    """The fp32 scale tensor of M rows: [M] per token, [M, G] per group (contiguous)."""
    if act_group_size == PER_TOKEN:
        return torch.empty((M,), dtype=torch.float32, device=device)
    return torch.empty((M, n_act_groups(K, act_group_size)), dtype=torch.float32, device=device)


# The activations' quantizer's launch (act_quant_kernel). Per token, rows to
# ACT_QUANT_ONE_TILE_MAX_K columns (padded) are whole in one tile, loaded once: (rows a
# program, warps) by the padded width; wider rows are swept in 4096-column tiles twice, one
# row a program. Per group, tiles of
# the same widths, each read once. H200, int8 codes of K = 4096 bf16 (s27run1,
# bench/bench_row_kernels.py, CUDA-graph replay, L2 flushed): one row and 4 warps a program in
# one tile ran 12.3 us at 2048 rows and 30.4 at 8192, where the looped launch of before (1 x
# 4096, 16 warps) ran 16.4 and 46.2, Inductor's compile of the op's definition 18.2 and 50.9,
# and a copy of as many bytes 11.6 and 29.3; 1-2 rows with 2-8 warps within 4% of it, 16 warps
# 1.2-1.3x slower. Wider rows, 64 elements a thread (at 2048 / 8192 rows): K = 5120 (s27run6)
# one row and 4 warps 15.7 / 41.7 us (8 warps 16.2 / 44.6, looped 20.6 / 63.3, Inductor 25.7 /
# 68.0, copy 13.1 / 35.0); K = 11008, 12288, 14336 (s27run4, s27run6) 8 warps 26.1 / 79.6,
# 26.5 / 82.9, 28.7 / 89.6 against 16 warps 1.1-1.2x slower, the looped launch 1.15-1.3x slower
# and Inductor 1.5-1.9x slower.
ACT_QUANT_ONE_TILE_MAX_K = 16384
ACT_QUANT_TILE_BY_K = {
    16: (8, 4), 32: (8, 4), 64: (8, 4), 128: (4, 4), 256: (4, 4), 512: (2, 4), 1024: (1, 4),
    2048: (1, 4), 4096: (1, 4), 8192: (1, 4), 16384: (1, 8)}
# Under the interpreter: 32 rows x 128 columns (so per-token rows past 128 columns run the looped
# form on the CPU lane too).
ACT_QUANT_INTERPRETER = (32, 128, 4)
# Rotated rows whole in one tile, from 1024 rows: a capped number of programs an SM, each taking
# every num_programs-th tile (it makes the Hadamard matrix once), and for 128-channel blocks 2
# rows a program to 4096 columns (below 1024 rows, one: at 1-16 rows the second row's dots were wasted work, and
# the W8A8 op at 16 rows of 4096 x 4096 ran 0.0187 ms with 2 rows against 0.0162 with one,
# s34run5 / s34run1). H200, int8 codes of bf16 rows (s34run4, bench_row_kernels.py --rotation 128,
# CUDA-graph replay, L2 flushed), K = 4096 at 8192 rows: 2 rows x 4 warps at 2 programs an SM 41.1
# us (4 an SM 43.0, 8 49.2, a program a tile 81.7; 1 row x 4 warps 48.0-104.7), the unrotated
# quantizer 30.5, Inductor's compile of the rotated definition 336.5, a copy 29.3; at 256 rows every
# launch 9.0-11.1 us (unrotated 7.0). K = 12288 (one row, 8 warps, 4 an SM) 167.1 us against 83.6
# unrotated and 962.9 for Inductor: the padded 16384-column tile's dots.
# With 32-channel blocks (s35run2, the same sweep with --rotation 32), K = 4096: 1 row x 4 warps
# at 4 programs an SM 14.0 us at 2048 rows and 33.7 at 8192 (2 rows at 2 an SM 15.3 / 37.5;
# unrotated 12.0 / 30.4): a smaller dot and +-1 matrix leave the load to hide. 64-channel blocks
# alike (s35run3): 14.6 / 35.1 us against 15.4 / 38.7.
# The rows-of-blocks form from ACT_QUANT_ROT_BLOCKS_FROM_M rows, by rotation block: (rows a
# program to ACT_QUANT_ROT_MAX_ROWS_K columns (padded), programs an SM).
ACT_QUANT_ROT_BLOCKS_LAUNCH = {128: (2, 2), 64: (1, 4), 32: (1, 4)}
ACT_QUANT_ROT_MAX_ROWS_K = 4096
ACT_QUANT_ROT_BLOCKS_FROM_M = 1024


def act_quant_launch(K: int, act_group: int, interpreter: bool,
                     rotation: int = 0, M: int = 0) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps) of act_quant_kernel for M rows of K (act_group 0: per
    token); the kernel runs ONE_TILE where per-token BLOCK_K >= K. With a rotation, the tile
    holds at least :data:`hadamard.MIN_DOT_ROWS` rotation blocks (tl.dot's smallest M): more
    rows a program for narrow rows, and for many rows of up to
    :data:`ACT_QUANT_ROT_MAX_ROWS_K` columns."""
    if interpreter:
        return ACT_QUANT_INTERPRETER
    kp2 = max(16, contract.next_power_of_2(K))
    if act_group == 0 and kp2 <= ACT_QUANT_ONE_TILE_MAX_K:
        block_m, warps = ACT_QUANT_TILE_BY_K[kp2]
        block_k = kp2
    else:
        block_m, block_k = 1, min(4096, kp2)
        warps = min(16, max(4, block_k // 256))
    if rotation:
        block_k = max(block_k, rotation)
        if (act_group == 0 and kp2 <= ACT_QUANT_ROT_MAX_ROWS_K
                and M >= ACT_QUANT_ROT_BLOCKS_FROM_M):
            block_m = max(block_m, ACT_QUANT_ROT_BLOCKS_LAUNCH[rotation][0])
        block_m = max(block_m, HD.MIN_DOT_ROWS * rotation // block_k)
    return block_m, block_k, warps


def quantize_activations_triton(x: torch.Tensor, act: str, smooth: Optional[torch.Tensor],
                                interpreter: bool, act_group_size: int = PER_TOKEN,
                                dequant: bool = False, perm128: bool = False,
                                pdl: bool = False, launch: Optional[tuple] = None,
                                rotation: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [M, K], scales fp32 [M] per token or [M, ceil(K / group)]) by
    :func:`act_quant_kernel`; `dequant`: the dequantised activations ``c * s`` in x's dtype in
    place of the codes (the dequant path's input, in one pass over x); `perm128`: the codes in
    the mmT kernel's permuted blocks, [M, K rounded up to 128] (padding 0); `pdl`: launched with
    programmatic dependent launch (the kernel after it must wait with ``griddepcontrol.wait``
    before it reads the codes; the caller has asked :func:`contract.pdl_capable`, as
    :func:`_pdl_after_quant` does); `launch`: (BLOCK_M, BLOCK_K, num_warps[, one_tile[,
    rot_blocks[, programs]]]) in place of :func:`act_quant_launch`'s (a benchmark's sweep;
    one_tile False forces the looped form where the row fits the tile; rot_blocks True / False,
    the rotated one-tile form that loads rows of blocks / reshapes the tile; programs: the
    rows-of-blocks form's grid cap, 0 for a program a tile); `rotation`: the rows ``x R`` are
    quantized (:mod:`hadamard`; K a multiple of it)."""
    M, K = x.shape
    codes_dtype = x.dtype if dequant else _act_codes_dtype(act, x.device, interpreter)
    if perm128:
        kp = contract.cdiv(K, SW.MMT_BLOCK_K) * SW.MMT_BLOCK_K
        codes = (torch.zeros if kp != K else torch.empty)((M, kp), dtype=codes_dtype,
                                                           device=x.device)
    else:
        codes = torch.empty((M, K), dtype=codes_dtype, device=x.device)
    scales = _act_scales_empty(M, K, act_group_size, x.device)
    if M == 0:
        return codes, scales
    act_group = 0 if act_group_size == PER_TOKEN else act_group_size
    block_m, block_k, warps = (launch or act_quant_launch(K, act_group, interpreter,
                                                          rotation, M))[:3]
    one_tile = act_group == 0 and block_k >= K
    if launch is not None and len(launch) > 3:
        one_tile = one_tile and bool(launch[3])
    # Rotated, the row in one tile: loaded as rows of one block each (with the grid capped) for
    # many rows' plain codes; else the tile reshaped for the dot, a program a tile. At 16-256
    # rows, and wherever the codes are dequantised or permuted (the dequant, mmT and wg paths),
    # the rows-of-blocks form made the op slower: W8A8 at 16 rows of 4096 x 4096 0.0181 ms
    # against 0.0162, W4A8 (wg) at 256 rows 0.0501 against 0.0332 (s34run6 / s34run1).
    rot_blocks = (M >= ACT_QUANT_ROT_BLOCKS_FROM_M and not dequant and not perm128)
    if launch is not None and len(launch) > 4:
        rot_blocks = bool(launch[4])
    grid = contract.cdiv(M, block_m)
    if rotation and one_tile and rot_blocks:
        if launch is not None and len(launch) > 5:
            cap = launch[5]
        else:
            cap = 0 if interpreter else ACT_QUANT_ROT_BLOCKS_LAUNCH[rotation][1] * _sm_count(
                x.device.index if x.device.index is not None else torch.cuda.current_device())
        grid = min(grid, cap) if cap else grid
    pdl = pdl and not interpreter
    contract.launch(
        act_quant_kernel, (grid,),
        (x, smooth if smooth is not None else scales, codes, scales),
        (M, K, x.stride(0), x.stride(1), codes.stride(0)),
        dict(QMAX=ACT_QMAX[act], FP8=act == "fp8", HAS_SMOOTH=smooth is not None,
             BLOCK_M=block_m, BLOCK_K=max(block_k, act_group), ACT_GROUP=act_group,
             DEQUANT=dequant, PERM128=perm128, PDL=pdl,
             ONE_TILE=one_tile, ROT=rotation, DOT_F32=interpreter, ROT_BLOCKS=rot_blocks),
        dict(num_warps=warps, launch_pdl=pdl), fast=not interpreter)
    return codes, scales


def dequantize_triton(qweight, scales, zeros, bits, group_size, in_features, dtype,
                      interpreter: bool = False) -> torch.Tensor:
    """The dense weight ``W [N, K]`` in `dtype` (:func:`weight_unpack.unpack_weight`): the
    dequant path's second operand of ``F.linear``, the call a 16-bit model makes."""
    return WU.unpack_weight(qweight, scales, zeros, bits, group_size, in_features, dtype,
                            interpreter=interpreter)


def _dot_dtype(act: str, bits: int, symmetric: bool, x_dtype: torch.dtype, codes_dtype,
               interpreter: bool) -> int:
    if act == "none":
        if x_dtype == torch.float32 or (interpreter and x_dtype == torch.bfloat16):
            # Triton 3.6's interpreter multiplies bf16 tiles as raw bits; fp32 holds them exactly.
            return _DD_F32
        return _DD_X
    if act == "int8":
        return _DD_I8
    if act == "fp8" and codes_dtype == torch.float8_e4m3fn and _codes_fit_fp8(bits, symmetric):
        return _DD_F8
    # int12, or fp8 values whose weight codes e4m3 cannot hold: exact fp16 products.
    return _DD_F16


def _codes_fit_fp8(bits: int, symmetric: bool) -> bool:
    """Whether every q - z is an integer e4m3 holds exactly (|v| <= 16)."""
    return bits <= 4 or (bits == 5 and symmetric)


# The supports verdict and choose_path's answer per call signature (shapes, strides, dtypes and
# devices of the tensors; the format): a decode call is host-bound, and the two cost ~10-15 µs a
# call (s11run1), as much as a launch. Bounded like contract.launch's cache.
_PATHS: dict = {}
_MAX_PATHS = 4096


_sig = contract.signature


def _remember_path(key, cfg: dict) -> None:
    if key is not None:
        contract.remember(_PATHS, key, cfg, _MAX_PATHS)


def _launch(x, qweight, scales, zeros, bias, smooth, bits, group_size, in_features, act,
            interpreter: bool, path: Optional[dict] = None,
            act_group_size: int = PER_TOKEN, rotation: int = 0,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run the op's Triton path; `path` overrides :func:`choose_path` (tests and the benchmark).
    A rotation changes only the activations' quantizer (every path quantizes x through it).
    `out` ([M, N] in x's dtype, rows of a larger output: the row split's halves): the wg
    path's tiles write y straight into it; the other paths' y is copied into it."""
    return _into(out, _launch_path(x, qweight, scales, zeros, bias, smooth, bits, group_size,
                                   in_features, act, interpreter, path, act_group_size, rotation,
                                   out))


def _into(out: Optional[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """`y`, copied into `out` where one is given and the path did not write there itself."""
    if out is not None and y is not out:
        out.copy_(y)
        return out
    return y


def _launch_path(x, qweight, scales, zeros, bias, smooth, bits, group_size, in_features, act,
                 interpreter: bool, path: Optional[dict], act_group_size: int, rotation: int,
                 out: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`_launch`'s dispatch: y, which is `out` where the path wrote into it."""
    key = None if path is not None else (
        "qlinear", _sig(x), _sig(qweight), _sig(scales), _sig(zeros), _sig(bias), _sig(smooth),
        bits, group_size, in_features, act, act_group_size, rotation, interpreter)
    cfg = _PATHS.get(key) if key is not None else None
    if cfg is None:
        reason = supports(x, qweight, scales, zeros, bias, smooth, bits, group_size, in_features,
                          act, act_group_size, rotation)
        if reason is not None:
            raise ValueError(f"q3n::qlinear: {reason}")
        cfg = path or _choose_i8(x.shape[0], qweight, x.shape[1], x.device, interpreter) or \
            choose_path(x.shape[0], qweight.shape[1], x.shape[1], bits, group_size, act,
                        x.dtype, x.device, interpreter=interpreter,
                        act_group_size=act_group_size, symmetric=zeros is None)
        _remember_path(key, cfg)
    M, K = x.shape
    N = P.out_features(qweight)
    if M == 0:
        return x.new_empty((0, N))
    if cfg["path"] == "rowsplit":
        return _launch_row_split(x, qweight, scales, zeros, bias, smooth, bits, group_size,
                                 in_features, act, interpreter, cfg, act_group_size, rotation,
                                 out)
    if P.is_kmajor8(qweight):
        pdl = _pdl_after_quant(cfg, I8.PDL_AFTER_QUANT, x, interpreter)
        codes, xs = quantize_activations_triton(x, act, smooth, interpreter, act_group_size,
                                                pdl=pdl, rotation=rotation)
        return _run_i8(codes, xs, x.dtype, qweight, scales, bias, cfg, interpreter, pdl)
    if act == "none":
        if cfg["path"] == "dequant":
            w = dequantize_triton(qweight, scales, zeros, bits, group_size, K, x.dtype,
                                  interpreter)
            return F.linear(x, w, bias)
        return _gemm(x, x, None, x.dtype, qweight, scales, zeros, bias, bits, group_size, act,
                     cfg, interpreter, act_group_size, out=out)
    if cfg["path"] in ("dequant", "mmT", "wg"):
        # Quantise and dequantise x in one pass (not codes, then three torch passes over them).
        xperm = cfg["path"] == "wg" or (cfg["path"] == "mmT" and bool(cfg.get("XPERM")))
        pdl = cfg["path"] == "mmT" and _pdl_after_quant(cfg, MMT_PDL_AFTER_QUANT, x,
                                                        interpreter)
        if cfg["path"] == "mmT":
            cfg = dict(cfg, PDL=pdl)
        a, _ = quantize_activations_triton(x, act, smooth, interpreter, act_group_size,
                                           dequant=True, perm128=xperm, pdl=pdl,
                                           rotation=rotation)
        if cfg["path"] == "mmT":
            return SW.run(a, qweight, scales, zeros, bias, bits, group_size, cfg, interpreter,
                          _tickets, x_permuted=xperm, K=K)
        if cfg["path"] == "wg":
            return _wg(a, qweight, scales, zeros, bias, bits, group_size, K, cfg, interpreter,
                       x_permuted=True, out=out)
        w = dequantize_triton(qweight, scales, zeros, bits, group_size, K, x.dtype, interpreter)
        return F.linear(a, w, bias)
    # The quantizer's one program (a row) lets the GEMV start at once: the GEMV's programs load
    # their first words while it runs (GEMV1P_PDL_AFTER_QUANT).
    pdl = cfg["path"] == "gemv1p" and _pdl_after_quant(cfg, GEMV1P_PDL_AFTER_QUANT, x,
                                                       interpreter)
    if cfg["path"] == "gemv1p":
        cfg = dict(cfg, PDL=pdl)
    codes, xs = quantize_activations_triton(x, act, smooth, interpreter, act_group_size, pdl=pdl,
                                            rotation=rotation)
    return _gemm_codes(codes, xs, x.dtype, qweight, scales, zeros, bias, bits, group_size, act,
                       cfg, interpreter, act_group_size)


def _launch_row_split(x, qweight, scales, zeros, bias, smooth, bits, group_size, in_features,
                      act, interpreter: bool, cfg: dict, act_group_size: int,
                      rotation: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``q3n::qlinear`` as two launches (:func:`_row_split`), each a call of :func:`_launch`
    on its rows of x."""
    args = (qweight, scales, zeros, bias, smooth, bits, group_size, in_features, act)

    def launch(rows: slice, path: Optional[dict], y_rows: torch.Tensor) -> None:
        _launch(x[rows], *args, interpreter=interpreter, path=path,
                act_group_size=act_group_size, rotation=rotation, out=y_rows)

    return _row_split("q3n::qlinear", x.shape[0], x.shape[1], x.dtype, x.device, qweight,
                      bits, group_size, act, zeros is None, interpreter, act_group_size, cfg,
                      launch, out)


def _row_split(op: str, M: int, K: int, dtype: torch.dtype, device: torch.device, qweight,
               bits: int, group_size: int, act: str, symmetric: bool, interpreter: bool,
               act_group_size: int, cfg: dict, launch, out: Optional[torch.Tensor]
               ) -> torch.Tensor:
    """The row split (`cfg` {"path": "rowsplit", "HEAD": rows, "HEAD_PATH": their launch,
    else :func:`choose_path`'s, "REST_PATH": the rest's, else dispatched, "CONCURRENT": the two
    at once}): ``launch(rows, path, y_rows)`` for x's first HEAD rows on that path, then for
    the rest, each into its rows of y (`out` where given); CONCURRENT (on a GPU) launches the
    rest on a second stream beside the head, which the current stream then waits for. Rows are
    independent in every path (activations quantized per token, or per token and channel
    group), so y is the one launch's up to summation order. A head or rest on the wg path
    writes straight into its rows; other paths' rows are copied in."""
    head = cfg.get("HEAD")
    if not isinstance(head, int) or not 0 < head < M:
        raise ValueError(f"{op}: the rowsplit path's HEAD must be 1-{M - 1} rows of the {M}, "
                         f"got {head!r}")
    N = P.out_features(qweight)
    head_cfg = cfg.get("HEAD_PATH") or choose_path(
        head, N, K, bits, group_size, act, dtype, device, interpreter=interpreter,
        act_group_size=act_group_size, symmetric=symmetric, allow_row_split=False)
    rest_cfg = cfg.get("REST_PATH")
    if "rowsplit" in (head_cfg["path"], (rest_cfg or {}).get("path")):
        raise ValueError(f"{op}: the rowsplit path's HEAD_PATH and REST_PATH cannot split again")
    concurrent = bool(cfg.get("CONCURRENT")) and device.type == "cuda" and not interpreter
    if concurrent and (head_cfg.get("STREAM") or head_cfg.get("SPLIT_K", 1) != 1):
        # Both halves would count on the same stream-K / split tickets at once.
        raise ValueError(f"{op}: the concurrent row split needs a head launch without a K "
                         f"split or stream-K, got {head_cfg}; leave CONCURRENT out")
    y = out if out is not None else torch.empty((M, N), dtype=dtype, device=device)
    if not concurrent:
        launch(slice(0, head), head_cfg, y[:head])
        # The rest's few rows take the small-M paths, dispatched (and remembered) as any call
        # (or on REST_PATH).
        launch(slice(head, M), rest_cfg, y[head:])
        return y
    # The head first, then the rest on a second stream forked before it (both branches of a
    # CUDA graph when captured): the rest's programs take the SMs the head's one wave leaves
    # idle. The current stream waits for both; y, x and the rest's own buffers are then free
    # to reuse only after the rest.
    cur = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(cur)
    launch(slice(0, head), head_cfg, y[:head])
    with torch.cuda.stream(side):
        launch(slice(head, M), rest_cfg, y[head:])
    cur.wait_stream(side)
    return y


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The device's second stream for the concurrent row split (one made per device, as the
    tickets are kept: a stream made per call costs a driver call)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(device=key)
    return _SIDE_STREAMS[key]


_SIDE_STREAMS: dict = {}


def _choose_i8(M: int, qweight: torch.Tensor, K: int, device: torch.device,
               interpreter: bool) -> Optional[dict]:
    """The i8 path's launch for a K-major 8-bit weight (:mod:`qlinear_i8`), else None."""
    if not P.is_kmajor8(qweight):
        return None
    sms = 0 if interpreter else _sm_count(device.index if device.index is not None
                                          else torch.cuda.current_device())
    return dict(I8.choose(M, qweight.shape[0], K, sms, interpreter=interpreter), path="i8")


def _run_i8(codes, xs, out_dtype, qweight, scales, bias, cfg, interpreter,
            pdl: bool = False) -> torch.Tensor:
    if cfg.get("path") != "i8":  # only a forced `path` can get here
        raise ValueError(f"q3n::qlinear: a K-major int8 weight runs on the i8 path, not "
                         f"{cfg.get('path')!r}")
    return I8.run(codes, xs, qweight, scales, bias, out_dtype, cfg, interpreter, _tickets, pdl)


def _pdl_after_quant(cfg: dict, default: bool, x: torch.Tensor, interpreter: bool) -> bool:
    """Whether the activations' quantizer and the kernel after it (`cfg`'s) take PDL: cfg's
    ``PDL`` where a forced launch gives it, else `default`, and only where the device can
    (decided once a call; the quantizer's launcher takes the answer as given)."""
    want = cfg.get("PDL")
    return (default if want is None else bool(want)) and not interpreter and \
        contract.pdl_capable(x.device)


def _gemm_codes(codes, xs, out_dtype, qweight, scales, zeros, bias, bits, group_size, act,
                cfg: dict, interpreter: bool, act_group_size: int,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y from quantized activations (codes [M, K] and fp32 scales) on `cfg`'s path: "dequant"
    (the codes and the weight dequantised to `out_dtype`, then cuBLAS), "cublas8"
    (:mod:`qlinear_cublas8`), "mmT" or a Triton GEMM/GEMV.

    mmT reads the codes and their scales itself (per token or per 128 channels; x unpermuted,
    as ``q3n::norm_act_quant`` stores it) where :func:`mmT_reads_codes` says so, so each
    sibling linear of a fused norm is one launch; elsewhere (and for smaller token groups) the
    codes are dequantised first, permuted where the tile takes x permuted (the dequant path's
    function)."""
    M, K = codes.shape
    if (cfg["path"] == "mmT" and act_group_size in SW.CODE_ACT_GROUPS
            and mmT_reads_codes(M)):
        return SW.run(codes, qweight, scales, zeros, bias, bits, group_size,
                      dict(cfg, XPERM=False), interpreter, _tickets, xscales=xs,
                      act_group_size=act_group_size, out_dtype=out_dtype)
    if cfg["path"] in ("dequant", "mmT", "wg"):
        xperm = cfg["path"] == "wg" or (cfg["path"] == "mmT" and bool(cfg.get("XPERM")))
        pdl = (cfg["path"] == "wg" and CODES_WG_PDL and bool(cfg.get("PDL", True))
               and not interpreter and contract.pdl_capable(codes.device))
        a = AD.dequantize_codes(codes, xs, act_group_size, out_dtype, perm128=xperm, pdl=pdl)
        if cfg["path"] == "mmT":
            return SW.run(a, qweight, scales, zeros, bias, bits, group_size, cfg, interpreter,
                          _tickets, x_permuted=xperm, K=K)
        if cfg["path"] == "wg":
            return _wg(a, qweight, scales, zeros, bias, bits, group_size, K, cfg, interpreter,
                       x_permuted=True, out=out, x_pdl=pdl)
        w = dequantize_triton(qweight, scales, zeros, bits, group_size, K, out_dtype, interpreter)
        return F.linear(a, w, bias)
    if cfg["path"] == "mm8":
        return M8.run(codes, xs, qweight, scales, zeros, bias, bits, group_size, act,
                      act_group_size, out_dtype, cfg, interpreter, _tickets)
    if cfg["path"] == "cublas8":
        reason = C8.eligible(qweight.shape[1], K, bits, group_size, act, out_dtype,
                             codes.dtype == torch.float8_e4m3fn, act_group_size)
        if reason is not None:  # only a forced `path` can get here
            raise ValueError(f"q3n::qlinear: the cublas8 path does not take this call: {reason}")
        return C8.run(codes, xs, qweight, scales, zeros, bias, bits, group_size, act,
                      act_group_size, out_dtype)
    return _gemm(codes, xs.contiguous(), codes.dtype, out_dtype, qweight, scales, zeros, bias,
                 bits, group_size, act, cfg, interpreter, act_group_size)


# Ticket counters of the one-launch split-K (gemv1p and mmT, REDUCE 2): int32, zero between
# calls (the last split of each tile resets its own), one buffer per device. Calls in one stream
# (q3n's executor, a CUDA graph's replay) follow each other; split-K calls that overlap in time
# on two streams of one device would share tickets, which this does not support.
# - While a CUDA graph is captured, a buffer not yet allocated is not cached (its zeroing is only
#   recorded, and it would live in the graph's pool): the call gets a fresh one, which the graph
#   zeroes on every replay.
# - The cached buffer is allocated outside the CUDA-graph pools (contract.made_off_graph_pools):
#   a buffer first allocated in a CUDA-graph trees' warm-up would be refused there (s10run8).
# - A grown buffer never frees the old one: a CUDA graph captured earlier still points at it.
_TICKETS: dict = {}


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    key = (device.type, device.index)
    kept = _TICKETS.get(key)
    if kept and kept[-1].numel() >= n:
        return kept[-1]
    size = max(n, 4096)
    if contract.capturing(device):
        return torch.zeros(size, dtype=torch.int32, device=device)
    fresh = contract.made_off_graph_pools(
        lambda: torch.zeros(size, dtype=torch.int32, device=device), device)
    _TICKETS.setdefault(key, []).append(fresh)
    return fresh


def gemv1p_denorm(bits: int, x_dtype: torch.dtype) -> bool:
    """Whether gemv1p reads codes as denormal floats (:func:`qlinear_gemv1p_kernel`'s DENORM):
    4-bit weights, with x of 16 bits or activation codes, whose range the scaled products hold.
    float32 x keeps the magic-float unpack and its full range; 6-bit weights (two planes) have
    no denormal variant. On the H200 at one row (s16run1-2, CUDA-graph replay, the same launch
    both ways): 4-bit gained 10-11% at 28672 x 8192 (0.0570 / 0.0571 against 0.0639 / 0.0638
    ms) and was within 4% at the other three shapes; 8-bit lost 18% at 12288 x 4096 (0.0298
    against 0.0243 ms, 95 registers against 80 at the default tile); 2-bit (g64) lost at three
    of the four shapes (up to 0.0282 against 0.0220 ms at 4096 x 12288) though its loop has
    fewer instructions and registers. Those keep the magic unpack."""
    return bits == 4 and x_dtype != torch.float32


def _gemv1p(a, xs, qweight, scales, zeros, bias, out_dtype, k_pad, k_per_split, split, cfg,
            flags, interpreter: bool) -> torch.Tensor:
    """Launch :func:`qlinear_gemv1p_kernel`: split-K by tickets in one launch (cfg REDUCE
    "ticket", the default) or by fp32 atomics (REDUCE "atomic": Y zeroed first, cast after).
    A forced `cfg` may leave out BLOCK_M (M rounded up to a power of two, at most 16), REDUCE,
    PREFETCH (1), num_stages (1) and PDL (True: launched with programmatic dependent launch on
    an sm_90+ GPU, see the kernel; default False, plain stream order: in chains of four
    linears with a multiply between them it ran 1.066x at 4096 x 4096 and 0.998-1.001x at 12288
    x 4096 and 28672 x 8192, and qwen3 "bench" decode at one row, every linear W4A16, took
    0.488 against 0.485-0.487 ms a step (design config 0.587-0.591 against 0.583-0.586) in
    s23run5, two alternating pairs: no gain a model sees). After the activations' quantizer the
    op sets it (:data:`GEMV1P_PDL_AFTER_QUANT`)."""
    M, K = a.shape
    N = qweight.shape[1]
    block_m = cfg.get("BLOCK_M", min(16, contract.next_power_of_2(M)))
    n_tiles, m_tiles = contract.cdiv(N, cfg["BLOCK_N"]), contract.cdiv(M, block_m)
    mode = 0 if split == 1 else (2 if cfg.get("REDUCE", "ticket") == "ticket" else 1)
    if mode == 1:
        y = torch.zeros((M, N), dtype=torch.float32, device=a.device)
    else:
        y = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if mode == 2:
        ws = torch.empty((split, M, N), dtype=torch.float32, device=a.device)
        cnt = _tickets(a.device, n_tiles * m_tiles)
    else:
        ws = cnt = y  # unused
    denorm = int(cfg.get("DENORM", gemv1p_denorm(flags["BITS"], a.dtype)))
    if denorm and flags["BITS"] == 6:
        raise ValueError("q3n::qlinear: gemv1p's DENORM unpack reads one bit plane; 6-bit "
                         "weights have two (leave DENORM out or 0)")
    subs = int(cfg.get("SUBS", 1))
    if subs not in (1, 2, 4) or cfg["BLOCK_N"] % (4 * subs):
        raise ValueError(f"q3n::qlinear: gemv1p's SUBS {subs} must be 1, 2 or 4, with BLOCK_N "
                         f"({cfg['BLOCK_N']}) a multiple of 4 * SUBS")
    pdl = bool(cfg.get("PDL", False)) and not interpreter and contract.pdl_capable(a.device)
    consts = {k: v for k, v in flags.items() if k != "ATOMIC"}
    consts.update(REDUCE=mode, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                  PREFETCH=int(cfg.get("PREFETCH", 1)), DENORM=denorm, SUBS=subs,
                  EVEN=N % cfg["BLOCK_N"] == 0 and K % cfg["BLOCK_K"] == 0 and M % block_m == 0,
                  PDL=pdl)
    contract.launch(
        qlinear_gemv1p_kernel, (n_tiles, split, m_tiles),
        (a, xs, qweight, scales, zeros if zeros is not None else scales,
         bias if bias is not None else scales, y, ws, cnt),
        (M, N, K, k_pad, k_per_split,
         P.plane_starts(6, K)[1] if flags["BITS"] == 6 else 0,
         a.stride(0), a.stride(1), y.stride(0), y.stride(1)),
        consts, dict(num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 1),
                     launch_pdl=pdl),
        fast=not interpreter)
    return y.to(out_dtype) if mode == 1 and out_dtype != torch.float32 else y


def _wg(a, qweight, scales, zeros, bias, bits, group_size, K, cfg, interpreter,
        x_permuted: bool, out: Optional[torch.Tensor] = None, x_pdl: bool = False):
    """The wg path on 16-bit activations `a`: x [M, K], or (`x_permuted`) quantized
    activations dequantised and permuted per 128 channels ([M, K rounded up to 128]; `x_pdl`:
    by a kernel launched with PDL); y into `out` where given (:func:`qlinear_wgmma.run`)."""
    # Only a forced `path` can ask for it where it does not run.
    if WG is None or interpreter or not WG.supported(
            bits, group_size, "none", a.dtype, qweight.shape[1], _device_capability(a.device)):
        raise ValueError("q3n::qlinear: the wg path (a Gluon kernel) takes 4- or 6-bit weights in "
                         "groups of 128, a multiple of 16 output features and bf16/fp16 "
                         "activations, on an sm_90 GPU only; use another path "
                         "(choose_path picks one)")
    return WG.run(a, qweight, scales, zeros, bias, K, cfg, _tickets, x_permuted=x_permuted,
                  bits=bits, out=out, x_pdl=x_pdl)


def _gemm(a, xs, codes_dtype, out_dtype, qweight, scales, zeros, bias, bits, group_size, act,
          cfg: dict, interpreter: bool, act_group_size: int = PER_TOKEN,
          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the gemv/mm kernel of `cfg` on `a` [M, K]: x itself (act "none") or its codes with
    scales `xs` (fp32 [M] per token, or contiguous [M, G] per token and group of
    `act_group_size` channels); the output is [M, N] in `out_dtype` (x's dtype for the op).
    `out`: the wg path writes y into it (:func:`_launch`); the other paths return their own."""
    if cfg["path"] == "mmT":  # K blocks of 128 whatever the groups: its own launcher
        if act != "none":  # the launchers dequantise quantized activations first
            raise ValueError("q3n::qlinear: the mmT kernel takes 16-bit activations")
        return SW.run(a, qweight, scales, zeros, bias, bits, group_size, cfg, interpreter,
                      _tickets)
    if cfg["path"] == "wg":
        if act != "none":  # the launchers dequantise quantized activations first
            raise ValueError("q3n::qlinear: the wg kernel takes 16-bit activations")
        return _wg(a, qweight, scales, zeros, bias, bits, group_size, a.shape[1], cfg,
                   interpreter, x_permuted=False, out=out)
    M, K = a.shape
    N = qweight.shape[1]
    split = cfg.get("SPLIT_K", 1)
    atomic = split > 1
    k_pad = P.padded_k(K)
    row4, row2, row1 = P.plane_starts(bits, K)
    block_k = cfg["BLOCK_K"]
    k_per_split = contract.cdiv(contract.cdiv(k_pad, block_k), split) * block_k
    group = 0 if group_size == P.PER_CHANNEL else group_size
    act_group = 0 if act_group_size == PER_TOKEN else act_group_size
    if cfg["path"] == "gemv1p" and bits not in GEMV1P_BITS:
        raise ValueError(f"q3n::qlinear: the gemv1p path takes {GEMV1P_BITS}-bit weights "
                         f"(one bit plane, or 6 = 4 + 2), not {bits}")
    if cfg["path"] == "gemv1p" and (block_k < 32 or block_k & (block_k - 1)):
        raise ValueError(f"q3n::qlinear: gemv1p's BLOCK_K {block_k} is not a power of two >= 32")
    if group and group % block_k:  # only a forced `path` can get here
        raise ValueError(f"q3n::qlinear: BLOCK_K {block_k} does not divide the group {group} "
                         f"(each K block must lie in one group)")
    if act_group and act_group % block_k:  # only a forced `path` can get here
        raise ValueError(f"q3n::qlinear: BLOCK_K {block_k} does not divide the activation group "
                         f"{act_group} (each K block must lie in one group)")
    flags = dict(BITS=bits, GROUP=group, SYM=zeros is None, ACT=_ACT_CODE[act],
                 ACT_GROUP=act_group, HAS_BIAS=bias is not None, ATOMIC=atomic)
    if cfg["path"] == "gemv1p":
        return _gemv1p(a, xs, qweight, scales, zeros, bias, out_dtype, k_pad, k_per_split, split,
                       cfg, flags, interpreter)
    y = (torch.zeros((M, N), dtype=torch.float32, device=a.device) if atomic
         else torch.empty((M, N), dtype=out_dtype, device=a.device))
    pointers = (a, xs, qweight, scales, zeros if zeros is not None else scales,
                bias if bias is not None else scales, y)
    scalars = (M, N, K, k_pad, row4, row2, row1, k_per_split,
               a.stride(0), a.stride(1), y.stride(0), y.stride(1))
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg["path"] == "gemv":
        grid = (contract.cdiv(N, cfg["BLOCK_N"]), split, M)
        contract.launch(qlinear_gemv_kernel, grid, pointers, scalars,
                        dict(flags, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k), options,
                        fast=not interpreter)
    else:
        dd = _dot_dtype(act, bits, zeros is None, out_dtype, codes_dtype, interpreter)
        grid = (contract.cdiv(M, cfg["BLOCK_M"]), contract.cdiv(N, cfg["BLOCK_N"]), split)
        contract.launch(qlinear_mm_kernel, grid, pointers, scalars,
                        dict(flags, DOT_DTYPE=dd, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                             BLOCK_K=block_k, DOT_PRECISION="ieee" if dd == _DD_F32 else "tf32"),
                        options, fast=not interpreter)
    return y.to(out_dtype) if atomic and out_dtype != torch.float32 else y


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def n_act_groups(k: int, act_group_size: int) -> int:
    """Scales per token: 1 per token (``PER_TOKEN``), else ``ceil(K / group)``: the last group of
    a row holds the ``K % group`` channels left over when the group does not divide K."""
    return 1 if act_group_size == PER_TOKEN else -(-k // act_group_size)


def _amax_per_group(xf: torch.Tensor, act_group_size: int) -> torch.Tensor:
    """max |x| per token (``[M]``) or per token and group (``[M, G]``, the last group partial)."""
    m, k = xf.shape
    if act_group_size == PER_TOKEN:
        return xf.abs().amax(dim=-1) if k else xf.new_zeros(m)
    g = act_group_size
    padded = torch.nn.functional.pad(xf.abs(), (0, n_act_groups(k, g) * g - k))
    return padded.reshape(m, -1, g).amax(dim=-1)


def quantize_activations(x: torch.Tensor, act: str, smooth: Optional[torch.Tensor] = None,
                         act_group_size: int = PER_TOKEN, rotation: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic quantization of x ``[M, K]``, the op's definition: (codes as float32 [M, K],
    scales: [M] per token, or [M, ceil(K / act_group_size)] per token and channel group), of
    the rows ``x R`` (:func:`hadamard.rotate_rows`) where `rotation` is given."""
    xf = HD.rotate_rows(x, rotation).to(torch.float32) if rotation else x.to(torch.float32)
    if smooth is not None:
        xf = xf * smooth.to(torch.float32)
    qmax = ACT_QMAX[act]
    scale = _amax_per_group(xf, act_group_size) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    v = xf / expand_act_scales(scale, xf.shape[-1], act_group_size)
    if act == "fp8":
        codes = v.clamp(-qmax, qmax).to(torch.float8_e4m3fn).to(torch.float32)
    else:
        codes = torch.round(v).clamp(-qmax, qmax)
    return codes, scale


def fake_quantize_activations(x: torch.Tensor, act: str, smooth: Optional[torch.Tensor] = None,
                              act_group_size: int = PER_TOKEN, rotation: int = 0
                              ) -> torch.Tensor:
    """``A(x)`` in float32 (``x * smooth`` quantized and dequantised; of ``x R`` with a
    rotation, so in the rotated basis); x itself for "none"."""
    if act == "none":
        return x.to(torch.float32)
    codes, scale = quantize_activations(x, act, smooth, act_group_size, rotation)
    return codes * expand_act_scales(scale, x.shape[-1], act_group_size)


def reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              zeros: Optional[torch.Tensor], bias: Optional[torch.Tensor],
              smooth: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
              act: str, act_group_size: int = PER_TOKEN, rotation: int = 0) -> torch.Tensor:
    """Plain torch with the op's semantics; float32 math (float64 for float64 x)."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    codes = P.unpack_codes(qweight, bits, in_features)
    w = P.dequantize(codes, scales, zeros, bits, group_size, dtype=cdt)  # [N, K]
    if act == "none":
        a = x.to(cdt)
    else:
        c, s = quantize_activations(x, act, smooth, act_group_size, rotation)
        a = c.to(cdt) * expand_act_scales(s.to(cdt), in_features, act_group_size)
    y = a @ w.t()
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Registration and supports
# ---------------------------------------------------------------------------------------------


def _known(cond) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    return statically_known_true(cond)


def format_supported(bits: int, group_size: int, symmetric: bool, act: str,
                     act_group_size: int = PER_TOKEN) -> Optional[str]:
    """None if the kernels implement this (weight, activation) format, else why not.

    Any activation group goes with any weight group: both are powers of two from 32, and the
    kernels' K block is at most the smaller of them, so each K block lies in one group of each.
    An activation group need not divide K (the last group of a row is partial)."""
    if not P.MIN_BITS <= bits <= P.MAX_BITS:
        return f"{bits}-bit weights are not supported (2..8)"
    if group_size != P.PER_CHANNEL and group_size not in P.GROUP_SIZES:
        return f"group size {group_size} is not supported (32, 64, 128 or per-channel)"
    if act not in ACT_FORMATS:
        return f"activation format {act!r} is not one of {ACT_FORMATS}"
    if act_group_size != PER_TOKEN and act_group_size not in ACT_GROUP_SIZES:
        return (f"activation group size {act_group_size} is not supported (32, 64, 128 or "
                f"{PER_TOKEN} for per-token scales)")
    if act == "none" and act_group_size != PER_TOKEN:
        return "activation scale groups need quantized activations (int8, fp8 or int12)"
    if act in ("int8", "none") and bits == 8 and not symmetric:
        return ("8-bit weights with zero points are not supported (q - z needs 9 bits); "
                "use symmetric: true")
    return None


def rotation_supported(rotation: int, act: str, k: Optional[int]) -> Optional[str]:
    """None if activations of a K-wide layer in format `act` can take `rotation`
    (:mod:`hadamard`), else why not."""
    if rotation not in HD.ROTATIONS:
        return (f"rotation {rotation} is not supported (0: none, or {HD.ROTATION_BLOCK}: "
                f"{HD.ROTATION_BLOCK}-channel Hadamard blocks)")
    if rotation and act == "none":
        return "a rotation needs quantized activations (int8, fp8 or int12)"
    if rotation and k is not None and k % rotation:
        return f"a rotation of {rotation}-channel blocks needs K a multiple of {rotation}, got {k}"
    return None


def supports(x, qweight, scales, zeros=None, bias=None, smooth=None, bits=4, group_size=128,
             in_features=None, act="none", act_group_size=PER_TOKEN,
             rotation=0) -> Optional[str]:
    """None if the op handles these arguments, else why not. Safe on FakeTensors."""
    reason = format_supported(bits, group_size, zeros is None, act, act_group_size)
    if reason:
        return reason
    if x.dim() != 2:
        return f"x must be 2-D [M, K], got {x.dim()}-D"
    if x.dtype not in _X_DTYPES:
        return f"x dtype {str(x.dtype).replace('torch.', '')} not supported (float16, bfloat16, float32)"
    K = in_features
    if K is None or not _known(x.shape[1] == K):
        return f"x has {x.shape[1]} input features, the weight {K}"
    reason = rotation_supported(rotation, act, K)
    if reason:
        return reason
    if P.is_kmajor8(qweight):
        return _supports_kmajor8(x, qweight, scales, zeros, bias, smooth, bits, group_size, K,
                                 act, act_group_size)
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        return "qweight must be a 2-D int32 tensor (bit planes) or int8 [N, K_pad] (K-major 8-bit)"
    N = qweight.shape[1]
    if not _known(qweight.shape[0] == P.packed_rows(bits, K)):
        return f"qweight has {qweight.shape[0]} rows, {bits}-bit K={K} needs {P.packed_rows(bits, K)}"
    if group_size != P.PER_CHANNEL and K % group_size:
        return f"group size {group_size} does not divide K={K}"
    n_groups = 1 if group_size == P.PER_CHANNEL else K // group_size
    if tuple(scales.shape) != (n_groups, N) or scales.dtype not in (torch.float16, torch.float32):
        return f"scales must be float16/float32 [{n_groups}, {N}]"
    if zeros is not None and (tuple(zeros.shape) != (n_groups, N) or zeros.dtype != torch.uint8):
        return f"zeros must be uint8 [{n_groups}, {N}]"
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype != x.dtype):
        return f"bias must be [{N}] in x's dtype"
    if smooth is not None:
        if act == "none":
            return "a smoothing vector needs quantized activations"
        if tuple(smooth.shape) != (K,) or smooth.dtype != torch.float32:
            return f"smooth must be float32 [{K}]"
    devices = {t.device for t in (x, qweight, scales, zeros, bias, smooth) if t is not None}
    if len(devices) != 1:
        return f"tensors on different devices: {sorted(map(str, devices))}"
    return None


def _supports_kmajor8(x, qweight, scales, zeros, bias, smooth, bits, group_size, K, act,
                      act_group_size) -> Optional[str]:
    """:func:`supports` for the K-major 8-bit layout (:func:`packing.to_kmajor8`)."""
    reason = I8.eligible(bits, group_size, zeros is None, act, act_group_size)
    if reason is not None:
        return reason
    if K > I8.MAX_K:
        return (f"K={K} is past the i8 path's {I8.MAX_K} channels (its int32 sums could "
                "overflow); use int8 activations with weight groups (bit planes) or fp8")
    if qweight.dim() != 2 or not _known(qweight.shape[1] == P.padded_k(K)):
        return f"a K-major int8 qweight must be [N, {P.padded_k(K)}] for K={K}"
    N = qweight.shape[0]
    if tuple(scales.shape) != (1, N) or scales.dtype not in (torch.float16, torch.float32):
        return f"scales must be float16/float32 [1, {N}]"
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype != x.dtype):
        return f"bias must be [{N}] in x's dtype"
    if smooth is not None and (tuple(smooth.shape) != (K,) or smooth.dtype != torch.float32):
        return f"smooth must be float32 [{K}]"
    devices = {t.device for t in (x, qweight, scales, bias, smooth) if t is not None}
    if len(devices) != 1:
        return f"tensors on different devices: {sorted(map(str, devices))}"
    return None


def _qlinear_impl(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  zeros: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  smooth: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                  act: str, act_group_size: int = PER_TOKEN, rotation: int = 0) -> torch.Tensor:
    backend = contract.backend_for(x.device)
    if backend == "reference":
        reason = rotation_supported(rotation, act, in_features)
        if reason is not None:
            raise ValueError(f"q3n::qlinear: {reason}")
        return reference(x, qweight, scales, zeros, bias, smooth, bits, group_size, in_features,
                         act, act_group_size, rotation)
    return _launch(x, qweight, scales, zeros, bias, smooth, bits, group_size, in_features, act,
                   interpreter=backend == "interpreter", act_group_size=act_group_size,
                   rotation=rotation)


def _qlinear_fake(x, qweight, scales, zeros, bias, smooth, bits, group_size, in_features, act,
                  act_group_size=PER_TOKEN, rotation=0):
    return x.new_empty((x.shape[0], P.out_features(qweight)))


qlinear = contract.register_kernel_op("qlinear", _qlinear_impl, _qlinear_fake)


# =============================================================================================
# Composed with a norm: ``q3n::norm_act_quant`` and ``q3n::qlinear_codes``
# =============================================================================================
#
# When the norm_linear pass folds a LayerNorm/RMSNorm's gamma/beta into the linears after it and
# the quantize pass quantizes those folded linears with quantized activations, the linears' input
# is the normalised row x_hat. ``q3n::norm_act_quant`` reads x once, computes the row statistics,
# normalises and quantizes per token in the same kernel (the norm costs no pass of its own and
# x_hat is never written); its codes and scales are shared by the sibling linears (q/k/v,
# gate/up) that quantize x_hat alike (same activation format, same SmoothQuant vector), and each
# sibling runs ``q3n::qlinear_codes``: the qlinear kernels of this module on those codes.
#
# ``q3n::norm_act_quant(x, eps, kind, act, smooth, act_group_size=-1, rotation=0) -> (codes [M, K],
# scales [M] fp32, or [M, ceil(K / act_group_size)] per token and channel group)``, x ``[..., K]``
# (float16, bfloat16, float32; M = the product of the leading sizes):
#
#     LayerNorm (kind "layernorm"): x0 = mean(x[m, :B]) (B = BLOCK_K; the whole row in the
#         reference); s1 = sum(x - x0); s2 = sum((x - x0)^2);
#         dm = s1 / K; rstd = 1 / sqrt(max(s2 / K - dm^2, 0) + eps); x_hat = ((x - x0) - dm) * rstd
#     RMSNorm (kind "rmsnorm"): rstd = 1 / sqrt(sum(x^2) / K + eps); x_hat = x * rstd
#     then (codes, scales) = quantize_activations(x_hat, act, smooth, act_group_size, rotation)
#                                                                      (this module's definition)
#
# (with a rotation the kernel rotates x's own values and corrects LayerNorm's centring after it:
# :func:`_normalised_rotated`; the same function up to float32 rounding)
#
# all in float32 from x's values (the statistics are those of ``kernels.norm_linear``'s
# row_stats_kernel, centred near the row's mean so that neither a large mean nor a far first
# element cancels anything: tiles.first_tile_mean).
# Codes are stored as :func:`_act_codes_dtype` says (int8; float16 for int12, and for fp8 where
# there are no fp8 tensor cores; float8 e4m3 on sm_89+): a function of the format and the device.
# Kernel, interpreter and :func:`reference_norm_act_quant` differ only by float32 rounding in the
# statistics (summation order; GPU division and square root), which moves x_hat by a few ulps:
# a code can then differ by one step where x_hat * smooth / scale lies within those ulps of a
# rounding tie, and a scale by a few ulps. Nothing else differs.
#
# ``q3n::qlinear_codes(codes, xscales, qweight, scales, zeros, bias, bits, group_size,
# in_features, act, out_dtype, act_group_size=-1) -> [M, N]`` is ``q3n::qlinear`` with its
# activation quantization already done: ``y = (codes * s_x) @ W^T + bias`` (s_x: ``xscales[m]``
# per token, ``xscales[m, k // act_group_size]`` per group) in `out_dtype` (bias, if given,
# in `out_dtype`), by the same kernels, the same dispatch table and the same rounding as the op.
# For every (x, smooth, g): ``qlinear_codes(*quantize_activations_triton(x, act, smooth,
# act_group_size=g), ..., act, out_dtype, g)`` is ``qlinear(x, ..., smooth, ..., act, g)``.


@triton.jit
def _normalised(x, x0, dm, rstd, KIND: tl.constexpr):
    """x_hat of a [BLOCK_M, BLOCK_K] tile (fp32), as row_stats_kernel writes it."""
    if KIND == 0:
        xh = ((x - x0[:, None]) - dm[:, None]) * rstd[:, None]
    else:
        xh = x * rstd[:, None]
    return xh


@triton.jit
def _normalised_rotated(x, offs, x0, dm, rstd, KIND: tl.constexpr, ROT: tl.constexpr,
                        DOT_F32: tl.constexpr):
    """x_hat R of a [BLOCK_M, BLOCK_K] tile of x as stored (its dtype; whole ROT-blocks), fp32:
    R is linear and maps the all-ones vector to sqrt(ROT) at each block's first channel, so
    x_hat R = (x R - mean sqrt(ROT) [k % ROT == 0]) * rstd for LayerNorm (mean = x0 + dm) and
    x R * rstd for RMSNorm: the rotation runs on x's own values (exact products on the tensor
    cores, :func:`hadamard.rotate_tile`), not on a float32 x_hat."""
    xr = rotate_tile(x, ROT, DOT_F32)
    if KIND == 0:
        SQRT_ROT: tl.constexpr = ROT ** 0.5
        first = (offs % ROT) == 0
        xr = xr - tl.where(first[None, :], ((x0 + dm) * SQRT_ROT)[:, None], 0.0)
    return xr * rstd[:, None]


@triton.jit
def _smoothed_tile(x_row, SM, offs, mask, stride_xk, K, x0, dm, rstd, KIND: tl.constexpr,
                   HAS_SMOOTH: tl.constexpr, ROT: tl.constexpr = 0,
                   DOT_F32: tl.constexpr = False):
    """x' = x_hat (ROT: x_hat R) (* smooth) of one [BLOCK_M, BLOCK_K] tile of the rows, in fp32
    (the sweeps' second and third reads)."""
    x = tl.load(x_row + offs[None, :] * stride_xk, mask=mask, other=0.0)
    if ROT != 0:
        xh = _normalised_rotated(x, offs, x0, dm, rstd, KIND, ROT, DOT_F32)
    else:
        xh = _normalised(x.to(tl.float32), x0, dm, rstd, KIND)
    if HAS_SMOOTH:
        xh = xh * tl.load(SM + offs, mask=offs < K, other=0.0)[None, :]
    return xh


@triton.jit
def norm_act_quant_kernel(X, SM, C, XS, M, K, eps, stride_xm, stride_xk, stride_cm,
                          KIND: tl.constexpr, QMAX: tl.constexpr, FP8: tl.constexpr,
                          HAS_SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          ONE_TILE: tl.constexpr, ACT_GROUP: tl.constexpr,
                          ROT: tl.constexpr = 0, DOT_F32: tl.constexpr = False):
    """Row statistics, normalisation and dynamic activation quantization (per token, or per
    token and ACT_GROUP channels): one program per BLOCK_M rows of x.

    Math (fp32, per row): the statistics of the module comment above (LayerNorm: centred on
    x0 = the mean of the row's first BLOCK_K elements; RMSNorm: sum of squares),
    rstd = 1 / sqrt(var + eps); x_hat as there; x' = x_hat (ROT: x_hat R, computed as
    :func:`_normalised_rotated` says, BLOCK_K a multiple of ROT) (* smooth); s = max|x'| / QMAX
    (1 for an all-zero row); c = round(x' / s) as
    :func:`act_quant_kernel` rounds (integers, or e4m3 values, ties to even), clamped to QMAX.
    Writes c (in C's dtype, which holds it exactly) and s.
    ACT_GROUP > 0: s per row and group of ACT_GROUP columns (XS [M, ceil(K / ACT_GROUP)]), as
    :func:`act_quant_kernel` computes it; BLOCK_K is a multiple of ACT_GROUP (a tile holds whole
    groups), so the sweeps need no max|x'| sweep of their own: two, statistics and codes.

    ONE_TILE (K <= BLOCK_K: every row up to 8192 wide on the GPU): the row is loaded once into
    registers and everything is computed from there. Otherwise three sweeps over the row: the
    statistics, max|x'|, the codes; the second and third read the row from L1/L2 (a row of
    BLOCK_M x K elements, a few KB per program).
    Traffic: reads x once from memory (M * K * e_x), writes M * K code bytes (1, or 2 where codes
    are held in float16) and 4 bytes of scale per row: the norm and the activation quantization
    of the unfused model cost two reads of x, one write of x_hat and one read of it.
    """
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = offs_m < M
    offs0 = tl.arange(0, BLOCK_K)
    x_row = X + offs_m[:, None] * stride_xm
    if KIND == 0:
        x0 = first_tile_mean(x_row + offs0[None, :] * stride_xk,
                             m_ok[:, None] & (offs0 < K)[None, :], tl.minimum(K, BLOCK_K))
    else:
        x0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ONE_TILE:
        mask = m_ok[:, None] & (offs0 < K)[None, :]
        x_raw = tl.load(x_row + offs0[None, :] * stride_xk, mask=mask, other=0.0)
        x = x_raw.to(tl.float32)
        if KIND == 0:
            a = tl.where(mask, x - x0[:, None], 0.0)
            dm = tl.sum(a, 1) / K
            var = tl.maximum(tl.sum(a * a, 1) / K - dm * dm, 0.0)
            rstd = 1.0 / tl.sqrt(var + eps)
        else:
            dm = x0
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / K + eps)
        if ROT != 0:
            xh = _normalised_rotated(x_raw, offs0, x0, dm, rstd, KIND, ROT, DOT_F32)
        else:
            xh = _normalised(x, x0, dm, rstd, KIND)
        if HAS_SMOOTH:
            xh = xh * tl.load(SM + offs0, mask=offs0 < K, other=0.0)[None, :]
        xh = tl.where(mask, xh, 0.0)
        if ACT_GROUP != 0:
            c, gscale = _group_codes(xh, QMAX, FP8, BLOCK_M, BLOCK_K, ACT_GROUP)
            _store_group_scales(XS, gscale, offs_m, m_ok, 0, K, BLOCK_K, ACT_GROUP)
        else:
            scale = tl.max(tl.abs(xh), axis=1) / QMAX
            scale = tl.where(scale == 0.0, 1.0, scale)
            c = _act_code(xh / scale[:, None], QMAX, FP8)
        tl.store(C + offs_m[:, None] * stride_cm + offs0[None, :], c.to(C.dtype.element_ty),
                 mask=mask)
    else:
        s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + offs0
            mask = m_ok[:, None] & (offs < K)[None, :]
            x = tl.load(x_row + offs[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            if KIND == 0:
                x = tl.where(mask, x - x0[:, None], 0.0)
                s1 += tl.sum(x, 1)
            s2 += tl.sum(x * x, 1)
        if KIND == 0:
            dm = s1 / K
            var = tl.maximum(s2 / K - dm * dm, 0.0)
            rstd = 1.0 / tl.sqrt(var + eps)
        else:
            dm = x0
            rstd = 1.0 / tl.sqrt(s2 / K + eps)
        if ACT_GROUP != 0:
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + offs0
                mask = m_ok[:, None] & (offs < K)[None, :]
                xh = _smoothed_tile(x_row, SM, offs, mask, stride_xk, K, x0, dm, rstd, KIND,
                                    HAS_SMOOTH, ROT, DOT_F32)
                c, gscale = _group_codes(tl.where(mask, xh, 0.0), QMAX, FP8, BLOCK_M, BLOCK_K,
                                         ACT_GROUP)
                tl.store(C + offs_m[:, None] * stride_cm + offs[None, :],
                         c.to(C.dtype.element_ty), mask=mask)
                _store_group_scales(XS, gscale, offs_m, m_ok, k0, K, BLOCK_K, ACT_GROUP)
        else:
            amax = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + offs0
                mask = m_ok[:, None] & (offs < K)[None, :]
                xh = _smoothed_tile(x_row, SM, offs, mask, stride_xk, K, x0, dm, rstd, KIND,
                                    HAS_SMOOTH, ROT, DOT_F32)
                amax = tl.maximum(amax, tl.where(mask, tl.abs(xh), 0.0))
            scale = tl.max(amax, axis=1) / QMAX
            scale = tl.where(scale == 0.0, 1.0, scale)
            for k0 in range(0, K, BLOCK_K):
                offs = k0 + offs0
                mask = m_ok[:, None] & (offs < K)[None, :]
                xh = _smoothed_tile(x_row, SM, offs, mask, stride_xk, K, x0, dm, rstd, KIND,
                                    HAS_SMOOTH, ROT, DOT_F32)
                c = _act_code(xh / scale[:, None], QMAX, FP8)
                tl.store(C + offs_m[:, None] * stride_cm + offs[None, :],
                         c.to(C.dtype.element_ty), mask=mask)
    if ACT_GROUP == 0:
        tl.store(XS + offs_m, scale, mask=m_ok)


NORM_KINDS = ("layernorm", "rmsnorm")
# The widest row the GPU launch keeps in registers (ONE_TILE): 8192 fp32 values over 16 warps.
ONE_TILE_MAX_K = 8192


def norm_act_quant_config(M: int, K: int, *, interpreter: bool = False,
                          rotation: int = 0) -> dict:
    """Launch parameters: a pure function of the sizes. GPU: one row per program, the whole row
    in one tile up to :data:`ONE_TILE_MAX_K` (4096-wide sweeps beyond), 4 to 16 warps; with a
    rotation, tiles of at least :data:`hadamard.MIN_DOT_ROWS` rotation blocks (more rows a
    program for narrow rows). Interpreter: 16 rows per program (its cost is per program), one
    tile up to 256 wide."""
    if interpreter:
        kp2 = max(16, contract.next_power_of_2(K))
        return dict(BLOCK_M=16, BLOCK_K=kp2 if kp2 <= 256 else 128, num_warps=4)
    kp2 = max(32, contract.next_power_of_2(K))
    block_k = kp2 if kp2 <= ONE_TILE_MAX_K else 4096
    block_m = max(1, HD.MIN_DOT_ROWS * rotation // block_k) if rotation else 1
    return dict(BLOCK_M=block_m, BLOCK_K=block_k, num_warps=min(16, max(4, block_k // 512)))


def _norm_act_quant_launch(x: torch.Tensor, eps: float, kind: str, act: str,
                           smooth: Optional[torch.Tensor], interpreter: bool,
                           config: Optional[dict] = None, act_group_size: int = PER_TOKEN,
                           rotation: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run :func:`norm_act_quant_kernel`; `config` overrides :func:`norm_act_quant_config`
    (its BLOCK_K is raised to the activation group, and to the rotation, where it is
    smaller)."""
    reason = supports_norm_act_quant(x, eps, kind, act, smooth, act_group_size, rotation)
    if reason is not None:
        raise ValueError(f"q3n::norm_act_quant: {reason}")
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    codes = torch.empty((M, K), dtype=_act_codes_dtype(act, x.device, interpreter), device=x.device)
    scales = _act_scales_empty(M, K, act_group_size, x.device)
    if M == 0:
        return codes, scales
    cfg = config or norm_act_quant_config(M, K, interpreter=interpreter, rotation=rotation)
    act_group = 0 if act_group_size == PER_TOKEN else act_group_size
    block_k = max(cfg["BLOCK_K"], act_group, rotation)  # a tile holds whole groups and blocks
    contract.launch(
        norm_act_quant_kernel, (contract.cdiv(M, cfg["BLOCK_M"]),),
        (x2, smooth if smooth is not None else scales, codes, scales),
        (M, K, float(eps), x2.stride(0), x2.stride(1), codes.stride(0)),
        dict(KIND=0 if kind == "layernorm" else 1, QMAX=ACT_QMAX[act], FP8=act == "fp8",
             HAS_SMOOTH=smooth is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=block_k,
             ONE_TILE=block_k >= K, ACT_GROUP=act_group, ROT=rotation, DOT_F32=interpreter),
        dict(num_warps=cfg["num_warps"]), fast=not interpreter)
    return codes, scales


def choose_codes_path(M: int, N: int, K: int, bits: int, group_size: int, act: str,
                      out_dtype: torch.dtype, device: torch.device, *, interpreter: bool = False,
                      sm_count: Optional[int] = None, act_group_size: int = PER_TOKEN,
                      capability: Optional[tuple] = None, symmetric: bool = False,
                      allow_row_split: bool = True) -> dict:
    """``q3n::qlinear_codes``'s launch for bit-plane weights: :func:`choose_path`'s, but where
    mmT reads the codes themselves (one launch a sibling linear of a fused norm, s14run7) it
    keeps them (the wg path would dequantise them in a pass of its own first; not measured
    against it at 49-64 rows), and the row split only to :data:`CODES_ROW_SPLIT_REST` rows
    past the tiles (the codes and their scales split by rows alike); the op's concurrent split
    only where its rest takes the decode tile (its grid capped) and the weights have zero
    points with per-token codes (s42run5: 1.04-1.35x the split in one stream at 130-144 rows
    of 12288 x 4096; symmetric weights, codes per channel group and the op's mmT rest not
    measured on codes); `allow_row_split` False gives the one launch."""
    reads = mmT_reads_codes(M) and act_group_size in SW.CODE_ACT_GROUPS
    kw = dict(interpreter=interpreter, sm_count=sm_count, act_group_size=act_group_size,
              capability=capability, symmetric=symmetric)
    measured = not symmetric and act_group_size == PER_TOKEN
    cfg = choose_path(M, N, K, bits, group_size, act, out_dtype, device, allow_wg=not reads,
                      allow_row_split=allow_row_split, allow_concurrent=measured, **kw)
    # More rest rows (among them the op's concurrent mmT rest, 17-32 rows): the one launch.
    if cfg["path"] == "rowsplit" and M - cfg["HEAD"] > CODES_ROW_SPLIT_REST:
        cfg = choose_path(M, N, K, bits, group_size, act, out_dtype, device,
                          allow_row_split=False, **kw)
    return cfg


def _qlinear_codes_launch(codes, xscales, qweight, scales, zeros, bias, bits, group_size,
                          in_features, act, out_dtype, interpreter: bool,
                          path: Optional[dict] = None, act_group_size: int = PER_TOKEN,
                          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``q3n::qlinear_codes``'s Triton path; `path` overrides :func:`choose_path`. `out` as
    :func:`_launch`'s (the wg path writes into it, other paths' y is copied in)."""
    return _into(out, _qlinear_codes_path(codes, xscales, qweight, scales, zeros, bias, bits,
                                          group_size, in_features, act, out_dtype, interpreter,
                                          path, act_group_size, out))


def _qlinear_codes_path(codes, xscales, qweight, scales, zeros, bias, bits, group_size,
                        in_features, act, out_dtype, interpreter: bool, path: Optional[dict],
                        act_group_size: int, out: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`_qlinear_codes_launch`'s dispatch: y, which is `out` where the path wrote into
    it."""
    key = None if path is not None else (
        "qlinear_codes", _sig(codes), _sig(xscales), _sig(qweight), _sig(scales), _sig(zeros),
        _sig(bias), bits, group_size, in_features, act, out_dtype, act_group_size, interpreter)
    cfg = _PATHS.get(key) if key is not None else None
    if cfg is None:
        reason = supports_codes(codes, xscales, qweight, scales, zeros, bias, bits, group_size,
                                in_features, act, out_dtype, act_group_size)
        if reason is not None:
            raise ValueError(f"q3n::qlinear_codes: {reason}")
        cfg = path or _choose_i8(codes.shape[0], qweight, codes.shape[1], codes.device,
                                 interpreter) or \
            choose_codes_path(codes.shape[0], qweight.shape[1], codes.shape[1], bits, group_size,
                              act, out_dtype, codes.device, interpreter=interpreter,
                              act_group_size=act_group_size, symmetric=zeros is None)
        _remember_path(key, cfg)
    M, K = codes.shape
    N = P.out_features(qweight)
    if M == 0:
        return torch.empty((0, N), dtype=out_dtype, device=codes.device)
    if cfg["path"] == "rowsplit":
        def launch(rows: slice, path: Optional[dict], y_rows: torch.Tensor) -> None:
            _qlinear_codes_launch(codes[rows], xscales[rows], qweight, scales, zeros, bias, bits,
                                  group_size, in_features, act, out_dtype, interpreter, path,
                                  act_group_size, out=y_rows)

        return _row_split("q3n::qlinear_codes", M, K, out_dtype, codes.device, qweight, bits,
                          group_size, act, zeros is None, interpreter, act_group_size, cfg,
                          launch, out)
    if P.is_kmajor8(qweight):
        return _run_i8(codes, xscales, out_dtype, qweight, scales, bias, cfg, interpreter)
    return _gemm_codes(codes, xscales, out_dtype, qweight, scales, zeros, bias, bits, group_size,
                       act, cfg, interpreter, act_group_size, out=out)


def reference_norm_act_quant(x: torch.Tensor, eps: float, kind: str, act: str,
                             smooth: Optional[torch.Tensor] = None,
                             act_group_size: int = PER_TOKEN, rotation: int = 0
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch with ``q3n::norm_act_quant``'s semantics: :func:`normalise_rows` in float32,
    then :func:`quantize_activations` (of ``x_hat R`` with a rotation); codes in the op's
    storage dtype."""
    xh = normalise_rows(x, eps, kind).to(torch.float32)
    codes, scales = quantize_activations(xh.reshape(-1, xh.shape[-1]), act, smooth,
                                         act_group_size, rotation)
    return codes.to(_act_codes_dtype(act, x.device, False)), scales


def reference_codes(codes: torch.Tensor, xscales: torch.Tensor, qweight: torch.Tensor,
                    scales: torch.Tensor, zeros: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                    act: str, out_dtype: torch.dtype, act_group_size: int = PER_TOKEN
                    ) -> torch.Tensor:
    """Plain torch with ``q3n::qlinear_codes``'s semantics: float32 math (float64 for a float64
    `out_dtype`, the tests' and benchmarks' reference), as :func:`reference`."""
    cdt = torch.float64 if out_dtype == torch.float64 else torch.float32
    w = P.dequantize(P.unpack_codes(qweight, bits, in_features), scales, zeros, bits, group_size,
                     dtype=cdt)
    a = codes.to(cdt) * expand_act_scales(xscales.to(cdt), in_features, act_group_size)
    y = a @ w.t()
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(out_dtype)


def supports_norm_act_quant(x, eps=1e-5, kind="rmsnorm", act="int8", smooth=None,
                            act_group_size=PER_TOKEN, rotation=0) -> Optional[str]:
    """None if ``q3n::norm_act_quant`` handles these arguments, else why not. Safe on FakeTensors
    (K must be static; the leading sizes may be symbolic)."""
    if kind not in NORM_KINDS:
        return f"kind {kind!r} is not one of {NORM_KINDS}"
    if act not in ACT_QMAX:
        return f"activation format {act!r} is not a quantized one ({', '.join(ACT_QMAX)})"
    if act_group_size != PER_TOKEN and act_group_size not in ACT_GROUP_SIZES:
        return (f"activation group size {act_group_size} is not supported (32, 64, 128 or "
                f"{PER_TOKEN} for per-token scales)")
    if x.dim() < 1:
        return "x must have at least one dim"
    if x.dtype not in _X_DTYPES:
        return f"x dtype {str(x.dtype).replace('torch.', '')} not supported (float16, bfloat16, float32)"
    K = x.shape[-1]
    if not isinstance(K, int) or K < 1:
        return f"the normalised size must be a static positive int, got {K}"
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        return f"eps must be a non-negative Python number, got {eps!r}"
    reason = rotation_supported(rotation, act, K)
    if reason:
        return reason
    if smooth is not None:
        if tuple(smooth.shape) != (K,) or smooth.dtype != torch.float32:
            return f"smooth must be float32 [{K}]"
        if smooth.device != x.device:
            return f"smooth on {smooth.device}, x on {x.device}"
    return None


def supports_codes(codes, xscales, qweight, scales, zeros=None, bias=None, bits=4, group_size=128,
                   in_features=None, act="int8", out_dtype=torch.float32,
                   act_group_size=PER_TOKEN) -> Optional[str]:
    """None if ``q3n::qlinear_codes`` handles these arguments, else why not. Safe on FakeTensors."""
    if act not in ACT_QMAX:
        return f"activation format {act!r} is not a quantized one ({', '.join(ACT_QMAX)})"
    if out_dtype not in _X_DTYPES:
        return f"out_dtype {str(out_dtype).replace('torch.', '')} not supported"
    if act_group_size == PER_TOKEN:
        if codes.dim() != 2 or xscales.dim() != 1 or xscales.dtype != torch.float32 or not _known(
                xscales.shape[0] == codes.shape[0]):
            return "codes must be [M, K] and xscales float32 [M]"
    elif act_group_size in ACT_GROUP_SIZES and codes.dim() == 2:
        groups = n_act_groups(codes.shape[1], act_group_size)
        if xscales.dim() != 2 or xscales.dtype != torch.float32 or not _known(
                xscales.shape[0] == codes.shape[0]) or not _known(xscales.shape[1] == groups):
            return (f"codes must be [M, K] and xscales float32 [M, {groups}] (one scale per "
                    f"token and {act_group_size} channels)")
    if codes.dtype != _act_codes_dtype(act, codes.device, False):
        return (f"codes dtype {str(codes.dtype).replace('torch.', '')} is not what "
                f"q3n::norm_act_quant stores for {act} on {codes.device.type}")
    # The weight side: qlinear's own checks, on a stand-in for x (codes' shape and device, the
    # output dtype).
    return supports(_XLike(codes, out_dtype), qweight, scales, zeros, bias, None, bits,
                    group_size, in_features, act, act_group_size)


class _XLike:
    """What :func:`supports` reads of x (shape, dtype, device, dim) for codes of dtype `dtype`."""

    def __init__(self, codes: torch.Tensor, dtype: torch.dtype):
        self.shape, self.dtype, self.device = codes.shape, dtype, codes.device

    def dim(self) -> int:
        return len(self.shape)


def _norm_act_quant_impl(x: torch.Tensor, eps: float, kind: str, act: str,
                         smooth: Optional[torch.Tensor], act_group_size: int = PER_TOKEN,
                         rotation: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    backend = contract.backend_for(x.device)
    if backend == "reference":
        reason = supports_norm_act_quant(x, eps, kind, act, smooth, act_group_size, rotation)
        if reason is not None:
            raise ValueError(f"q3n::norm_act_quant: {reason}")
        return reference_norm_act_quant(x, eps, kind, act, smooth, act_group_size, rotation)
    return _norm_act_quant_launch(x, eps, kind, act, smooth, interpreter=backend == "interpreter",
                                  act_group_size=act_group_size, rotation=rotation)


def _norm_act_quant_fake(x, eps, kind, act, smooth, act_group_size=PER_TOKEN, rotation=0):
    m = 1
    for s in x.shape[:-1]:
        m = m * s
    K = x.shape[-1]  # static (supports_norm_act_quant): the group count is a plain int
    scales_shape = (m,) if act_group_size == PER_TOKEN else (m, n_act_groups(K, act_group_size))
    return (x.new_empty((m, K), dtype=_act_codes_dtype(act, x.device, False)),
            x.new_empty(scales_shape, dtype=torch.float32))


def _qlinear_codes_impl(codes: torch.Tensor, xscales: torch.Tensor, qweight: torch.Tensor,
                        scales: torch.Tensor, zeros: Optional[torch.Tensor],
                        bias: Optional[torch.Tensor], bits: int, group_size: int,
                        in_features: int, act: str, out_dtype: torch.dtype,
                        act_group_size: int = PER_TOKEN) -> torch.Tensor:
    backend = contract.backend_for(codes.device)
    if backend == "reference":
        return reference_codes(codes, xscales, qweight, scales, zeros, bias, bits, group_size,
                               in_features, act, out_dtype, act_group_size)
    return _qlinear_codes_launch(codes, xscales, qweight, scales, zeros, bias, bits, group_size,
                                 in_features, act, out_dtype, interpreter=backend == "interpreter",
                                 act_group_size=act_group_size)


def _qlinear_codes_fake(codes, xscales, qweight, scales, zeros, bias, bits, group_size,
                        in_features, act, out_dtype, act_group_size=PER_TOKEN):
    return codes.new_empty((codes.shape[0], P.out_features(qweight)), dtype=out_dtype)


norm_act_quant = contract.register_kernel_op("norm_act_quant", _norm_act_quant_impl,
                                             _norm_act_quant_fake)
qlinear_codes = contract.register_kernel_op("qlinear_codes", _qlinear_codes_impl,
                                            _qlinear_codes_fake)
