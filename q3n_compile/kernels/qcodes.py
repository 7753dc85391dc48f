"""Reading quantized weight codes out of the bit planes of :mod:`q3n_compile.kernels.packing`,
inside Triton kernels (the ``q3n::qlinear`` family's mm and gemv kernels, and
:mod:`q3n_compile.kernels.weight_unpack`).

Guarantees: :func:`load_codes` returns the unsigned codes ``q[k, n]`` of a ``[BLOCK_K, BLOCK_N]``
tile exactly as :func:`q3n_compile.kernels.packing.unpack_codes` defines them, 0 past ``K_PAD``
and where the column mask is False; each packed int32 word is loaded once.
:func:`tile_setup` gives a GEMM tile's offsets, masks, K range and per-channel scales and zero
points; :func:`block_minus_zero` one K block's ``q - z`` (int32, exact) for the GEMM tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def plane_words(QW, row0, k0, offs_n, n_ok, K_PAD, N, P: tl.constexpr, BLOCK_K: tl.constexpr,
                NK: tl.constexpr = False):
    """Bits of plane P for channels k0 .. k0 + BLOCK_K: each packed word is loaded once, as a
    [BLOCK_K / PER, BLOCK_N] tile, and split by shifts in registers (k0 is a multiple of 32).
    [BLOCK_K, BLOCK_N]; with NK, [BLOCK_N, BLOCK_K] (the words loaded as [BLOCK_N, BLOCK_K / PER]
    and split along the last axis, so no transpose is needed)."""
    PER: tl.constexpr = 32 // P
    WORDS: tl.constexpr = BLOCK_K // PER
    r = k0 // PER + tl.arange(0, WORDS)
    shifts = tl.arange(0, PER) * P
    # One return statement: Triton checks every return's type, even in a pruned constexpr branch.
    if NK:
        w = tl.load(QW + (row0 + r)[None, :] * N + offs_n[:, None],
                    mask=(r < K_PAD // PER)[None, :] & n_ok[:, None], other=0)
        q = (w[:, :, None] >> shifts[None, None, :]) & ((1 << P) - 1)  # [BLOCK_N, WORDS, PER]
        out = tl.reshape(q, (offs_n.shape[0], BLOCK_K))
    else:
        w = tl.load(QW + (row0 + r)[:, None] * N + offs_n[None, :],
                    mask=(r < K_PAD // PER)[:, None] & n_ok[None, :], other=0)
        q = (w[:, None, :] >> shifts[None, :, None]) & ((1 << P) - 1)  # [WORDS, PER, BLOCK_N]
        # Row-major merge: channel r * PER + j, the packing's order.
        out = tl.reshape(q, (BLOCK_K, offs_n.shape[0]))
    return out


@triton.jit
def load_codes(QW, k0, offs_n, n_ok, K_PAD, N, ROW4, ROW2, ROW1, BITS: tl.constexpr,
               BLOCK_K: tl.constexpr, NK: tl.constexpr = False):
    """Codes [BLOCK_K, BLOCK_N] (int32) of input channels k0 .. k0 + BLOCK_K (k0 a multiple of
    BLOCK_K >= 32) and output channels offs_n; 0 past K_PAD or where n_ok is False. With NK the
    tile is [BLOCK_N, BLOCK_K] (the weight as the first operand of a dot).

    Each packed word is loaded once and split in registers. Loading one word per code instead
    (repeated addresses hitting L1: the same DRAM traffic, 32/P times the load instructions) was
    slower in 32 of the 33 GEMV and tensor-core cases measured on the H200 (1.1-2.1x at M = 1 and
    16, 1.6-12.9x on the tiles at M = 256 and 4096) and the same for the dequantise kernel (3
    cases, 0.997-1.02x; s6run4, ``qlinear-unpack-h200-2026-11-29-s6run4.json``). The one
    exception, W4A16 at M = 1 on 28672 x 8192 with the GEMV's old split of 1 (0.160 against
    0.184 ms), is slower than word loads at the split of 4 the GEMV now uses there (0.135 ms).
    """
    if BITS == 8:
        q = plane_words(QW, 0, k0, offs_n, n_ok, K_PAD, N, 8, BLOCK_K, NK)
    elif BITS == 7:
        q = (plane_words(QW, ROW4, k0, offs_n, n_ok, K_PAD, N, 4, BLOCK_K, NK)
             | (plane_words(QW, ROW2, k0, offs_n, n_ok, K_PAD, N, 2, BLOCK_K, NK) << 4)
             | (plane_words(QW, ROW1, k0, offs_n, n_ok, K_PAD, N, 1, BLOCK_K, NK) << 6))
    elif BITS == 6:
        q = (plane_words(QW, ROW4, k0, offs_n, n_ok, K_PAD, N, 4, BLOCK_K, NK)
             | (plane_words(QW, ROW2, k0, offs_n, n_ok, K_PAD, N, 2, BLOCK_K, NK) << 4))
    elif BITS == 5:
        q = (plane_words(QW, ROW4, k0, offs_n, n_ok, K_PAD, N, 4, BLOCK_K, NK)
             | (plane_words(QW, ROW1, k0, offs_n, n_ok, K_PAD, N, 1, BLOCK_K, NK) << 4))
    elif BITS == 4:
        q = plane_words(QW, ROW4, k0, offs_n, n_ok, K_PAD, N, 4, BLOCK_K, NK)
    elif BITS == 3:
        q = (plane_words(QW, ROW2, k0, offs_n, n_ok, K_PAD, N, 2, BLOCK_K, NK)
             | (plane_words(QW, ROW1, k0, offs_n, n_ok, K_PAD, N, 1, BLOCK_K, NK) << 2))
    else:
        q = plane_words(QW, ROW2, k0, offs_n, n_ok, K_PAD, N, 2, BLOCK_K, NK)
    return q


@triton.jit
def block_minus_zero(QW, Z, z_col, k0, offs_n, n_ok, K_PAD, N, ROW4, ROW2, ROW1,
                     BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
                     BLOCK_K: tl.constexpr, NK: tl.constexpr = False):
    """q - z (int32) of the K block at k0: [BLOCK_K, BLOCK_N], or [BLOCK_N, BLOCK_K] with NK.
    z = 2^(BITS-1) when SYM; else the per-channel zero points z_col [BLOCK_N] (GROUP = 0; the
    caller loads them once) or the block's group's row of Z (one group per K block)."""
    q = load_codes(QW, k0, offs_n, n_ok, K_PAD, N, ROW4, ROW2, ROW1, BITS, BLOCK_K, NK)
    if SYM:
        w = q - (1 << (BITS - 1))
    else:
        if GROUP == 0:
            z = z_col
        else:
            z = tl.load(Z + (k0 // GROUP) * N + offs_n, mask=n_ok, other=0).to(tl.int32)
        if NK:
            w = q - z[:, None]
        else:
            w = q - z[None, :]
    return w


@triton.jit
def tile_setup(S, Z, pid_m, pid_n, pid_k, M, N, K_PAD, K_PER_SPLIT, GROUP: tl.constexpr,
               SYM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(offs_m (int64), offs_n, m_ok, n_ok, k_start, k_end, s_col, z_col) of the GEMM tile at
    (pid_m, pid_n) over K split pid_k: per-channel weights (GROUP = 0) load their scales s_col
    (fp32) and, unless SYM, zero points z_col (int32) once here; otherwise both are zeros."""
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K_PAD)
    s_col = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_col = tl.zeros([BLOCK_N], dtype=tl.int32)
    if GROUP == 0:
        s_col = tl.load(S + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if not SYM:
            z_col = tl.load(Z + offs_n, mask=n_ok, other=0).to(tl.int32)
    return offs_m, offs_n, m_ok, n_ok, k_start, k_end, s_col, z_col
