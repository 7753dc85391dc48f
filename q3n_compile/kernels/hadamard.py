"""Block-diagonal Hadamard rotation of activation rows, for quantized activations.

What this module guarantees:

- The rotation of block size ``b`` (:data:`ROTATIONS`: 32, 64 or 128) is
  ``R = blockdiag(H_b / sqrt(b), ..., H_b / sqrt(b))`` (``K / b`` blocks), ``H_b`` the
  Sylvester Hadamard matrix of order b (entries +-1, ``H[i, j] = (-1)^popcount(i & j)``):
  symmetric and orthogonal, so
  ``x W^T = (x R)(W R)^T`` exactly. A layer quantized with rotation keeps ``W R`` (quantized)
  and its op quantizes the rows ``x R`` (:func:`rotate_rows` is the definition; K must be a
  multiple of b).
- Why: a per-token activation scale is set by the row's largest channel. The rotation spreads
  an outlier channel over its block, so the row's range is closer to its RMS and 8-bit codes
  resolve the other channels better. Measured on MiniLM compiled with W8A8 per token,
  calibrated (bench/eval_minilm_quant.py): Spearman of pairwise similarities 0.99836 -> 0.99945
  with every linear's input rotated by 128-channel blocks (session 34), 0.99940 by 64, 0.99939
  by 32 (session 35; 32 is quant_config's default for int8 activations).
- :func:`rotate_tile` is the kernels' form: a ``[BLOCK_M, BLOCK_K]`` tile in x's dtype (BLOCK_K a
  multiple of b) times ``H_b`` on the tensor cores per b-column block, the +-1 entries exact in
  any operand type, sums in float32 (float32 x: IEEE products, no TF32), then times
  ``1 / sqrt(b)`` in float32. It differs from :func:`rotate_rows` only by the float32 summation
  order. On a GPU, ``BLOCK_M * BLOCK_K / b`` must be at least 16 (tl.dot's smallest M).
  Cost: ``2 b`` flops per element on the tensor cores and the +-1 matrix made in registers
  (about ten integer operations an entry), no load. On the H200 the int8 quantizer of 8192 bf16
  rows of 4096 took 40.6 us rotated by 128-channel blocks against 30.6 unrotated (a copy: 29.2),
  at 1-256 rows 1.1-2.5 us more (session 34); by 32-channel blocks 5.4 / 6.7 / 15.3 / 37.6 us at
  1 / 256 / 2048 / 8192 rows against 5.3 / 6.4 / 12.0 / 30.4 unrotated (s35run2, before the
  launch went to one row a program at 4 programs an SM from 1024 rows: 14.0 / 33.7 in that
  sweep; ``bench/RESULTS.md``, session 35).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

ROTATION_BLOCK = 128
ROTATIONS = (0, 32, 64, ROTATION_BLOCK)  # 0: no rotation
# tl.dot's smallest M on the GPU: rotated tiles hold at least this many b-column blocks.
MIN_DOT_ROWS = 16


def hadamard_pm1(b: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order b (a power of two), entries +-1."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"a Hadamard rotation block must be a power of two, got {b}")
    i = torch.arange(b, device=device)
    p = i[:, None] & i[None, :]
    parity = torch.zeros_like(p)
    for bit in range(b.bit_length()):  # a fixed loop: traceable (torch.compile of the definition)
        parity ^= (p >> bit) & 1
    return (1 - 2 * parity).to(dtype)


def rotate_rows(x: torch.Tensor, b: int) -> torch.Tensor:
    """``x R`` over the last dimension (a multiple of b), in float32 (float64 for float64 x):
    each b-channel block times ``H_b / sqrt(b)``."""
    k = x.shape[-1]
    if k % b:
        raise ValueError(f"a rotation of {b}-channel blocks needs K a multiple of {b}, got {k}")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = hadamard_pm1(b, cdt, x.device)
    y = (x.to(cdt).reshape(*x.shape[:-1], k // b, b) @ h).reshape(x.shape)
    return y * (1.0 / math.sqrt(b))


def rotate_hessian(h: torch.Tensor, b: int) -> torch.Tensor:
    """``R^T H R`` for a symmetric ``[K, K]`` H (the Hessian of the rows ``x R``), in H's dtype
    (float32 math at least)."""
    return rotate_rows(rotate_rows(h, b).t(), b).t().to(h.dtype)


@triton.jit
def hadamard_sign(ROT: tl.constexpr, DOT_F32: tl.constexpr, dtype: tl.constexpr):
    """The +-1 Hadamard matrix [ROT, ROT] made in registers, in the dot's operand type (`dtype`,
    float32 under DOT_F32). About ten integer operations an entry: a kernel that rotates many
    tiles makes it once."""
    i = tl.arange(0, ROT)
    p = i[:, None] & i[None, :]
    # popcount(p) & 1, by folding the bits of an index below 256 (ROT <= 256).
    p = p ^ (p >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    sign = tl.where((p & 1) == 1, -1.0, 1.0)
    if DOT_F32 or dtype == tl.float32:
        return sign
    return sign.to(dtype)


@triton.jit
def hadamard_dot(xb, sign, ROT: tl.constexpr, DOT_F32: tl.constexpr):
    """``xb H / sqrt(ROT)`` in float32 for rows of one ROT-channel block each (xb: [R, ROT] in
    x's dtype; `sign`: :func:`hadamard_sign`), on the tensor cores. DOT_F32 (the interpreter,
    whose tl.dot multiplies bfloat16 tiles as their raw bits): xb widened to float32 first, the
    same exact products."""
    if DOT_F32 or xb.dtype == tl.float32:
        y = tl.dot(xb.to(tl.float32), sign, input_precision="ieee")
    else:
        y = tl.dot(xb, sign, out_dtype=tl.float32)
    INV: tl.constexpr = 1.0 / (ROT ** 0.5)
    return y * INV


@triton.jit
def rotate_tile(x, ROT: tl.constexpr, DOT_F32: tl.constexpr):
    """``x R`` of a tile (x's dtype, [BLOCK_M, BLOCK_K], BLOCK_K a multiple of ROT) in float32:
    the tile viewed as rows of one ROT-channel block each, :func:`hadamard_dot`, viewed back."""
    BM: tl.constexpr = x.shape[0]
    BK: tl.constexpr = x.shape[1]
    sign = hadamard_sign(ROT, DOT_F32, x.dtype)
    y = hadamard_dot(tl.reshape(x, (BM * BK // ROT, ROT)), sign, ROT, DOT_F32)
    return tl.reshape(y, (BM, BK))
