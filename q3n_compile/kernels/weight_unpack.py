"""A packed weight written out whole, for the ``q3n::qlinear`` paths that hand the GEMM to cuBLAS:
the "dequant" path (``(q - z) * s`` in x's dtype, then ``F.linear``) and the "cublas8" path
(``q - z`` as int8 or fp8 e4m3, then cuBLAS's 8-bit GEMMs).

Layout: ``W [N, K]``, K contiguous: the weight's own ``nn.Linear`` layout, so the dequant path's
GEMM is the very ``F.linear`` call (cuBLAS's "TN" GEMM) that a bf16 model makes, and the layout
cuBLAS's 8-bit GEMMs read for their second operand.

Why one program per ``[BLOCK_N, BLOCK_K]`` tile with the words loaded ``[BLOCK_N, words]``: a
packed word holds consecutive input channels of one output channel, so its fields are
consecutive elements of one row of W. Unpacked along the last axis
(:func:`q3n_compile.kernels.qcodes.load_codes` with ``NK``), each thread holds runs of K and
stores them as 16-byte vectors with no transpose of the tile: for 2-byte outputs the sm_90
compile of Triton 3.6 moves only the word tile through shared memory (one layout conversion a
bit plane; 1-byte outputs, at their wider tile, convert the unpacked tile once more into runs
of 16 codes). The kernel it replaced wrote ``W^T [K, N]`` and converted both the words and the
unpacked tile (two conversions, 11 barriers a 32 x 128 tile at 4 bits).

Measured (H200, s28run1, CUDA-graph replay, against that kernel in the same device call): the
weight written 1.19-1.35x faster to bf16 (W4 g128 on 28672 x 8192 in 0.154 ms against 0.203,
3.86 TB/s where a bf16 copy of the weight's size ran 4.13), the fp8 codes of W4 1.13-1.15x;
int8 codes of W8 unchanged (3.3-3.9 TB/s before and after).

What this module guarantees: :func:`unpack_weight` returns, for every bit width 2..8, group size
(32, 64, 128 or per channel), symmetric or with zero points, and any K and N:
- ``scaled=True``: ``W[n, k] = (q - z) * s`` computed in fp32 and rounded once to `dtype`;
- ``scaled=False``: ``W[n, k] = q - z``, exact wherever `dtype` holds the integer (int8 for
  every width, fp8 e4m3 up to 4 bits, fp16 for every width).
Traffic: the packed words, zero points and scales read once, ``N * K`` elements written.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from q3n_compile.kernels import contract
from q3n_compile.kernels import packing as P
from q3n_compile.kernels.qcodes import load_codes


@triton.jit
def unpack_weight_kernel(QW, S, Z, W, N, K, K_PAD, ROW4, ROW2, ROW1,
                         BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
                         SCALED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[n, k] = (q - z) * s (SCALED; fp32, rounded once to W's dtype) or q - z, for the tile
    (pid_k, pid_n); BLOCK_K divides GROUP (one group a tile; GROUP = 0: per channel).

    Traffic: each packed word, zero point and scale of the tile read once; the tile written
    once, K contiguous.
    """
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    q = load_codes(QW, k0, offs_n, n_ok, K_PAD, N, ROW4, ROW2, ROW1, BITS, BLOCK_K, True)
    if GROUP == 0:
        g = 0
    else:
        g = k0 // GROUP
    if SYM:
        w = q - (1 << (BITS - 1))
    else:
        w = q - tl.load(Z + g * N + offs_n, mask=n_ok, other=0).to(tl.int32)[:, None]
    # Through fp32 in both forms: Triton converts int32 to fp8 only from a float, and the scaled
    # product is rounded once.
    v = w.to(tl.float32)
    if SCALED:
        v = v * tl.load(S + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(W + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], v.to(W.dtype.element_ty),
             mask=n_ok[:, None] & (offs_k < K)[None, :])


# (BLOCK_N, BLOCK_K, warps) on a GPU, by the output's element size; BLOCK_K is capped by the
# weight's group size. From bench/bench_dequant.py (s28run1: eleven tiles on the four
# shapes and 1024 x 4096; W4 and W6 g128 and W8 per channel to bf16, W4 g128 to fp8 codes, W8
# to int8 codes): 2-byte outputs 64 x 128, 4 warps: the best or within 3% of it in 14 of the
# 15 cases (4096^2 W4: 1.09x); 1-byte outputs 128 x 128: within 5% in all 10 (64 x 128 ran
# 1.05-1.12x the best for fp8 codes).
GPU_TILE = (64, 128, 4)
GPU_TILE_1BYTE = (128, 128, 4)
INTERPRETER_TILE = (16, 32, 4)


def tile(group_size: int, interpreter: bool = False, launch: Optional[tuple] = None,
         out_bytes: int = 2) -> tuple[int, int, int]:
    """The launch tile (BLOCK_N, BLOCK_K, warps) for a weight with `group_size` (-1: per
    channel) written as `out_bytes`-byte elements: `launch` where given (a benchmark's), else
    the GPU or interpreter default, with BLOCK_K at most the group (a tile reads one group's
    scales and zero points)."""
    default = GPU_TILE_1BYTE if out_bytes == 1 else GPU_TILE
    bn, bk, warps = launch or (INTERPRETER_TILE if interpreter else default)
    if group_size != P.PER_CHANNEL:
        bk = min(bk, group_size)
    if bk < P.K_ALIGN or bk & (bk - 1):
        raise ValueError(f"unpack_weight: BLOCK_K must be a power of two >= {P.K_ALIGN}, "
                         f"got {bk}")
    return bn, bk, warps


def unpack_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                  bits: int, group_size: int, K: int, dtype: torch.dtype, *,
                  scaled: bool = True, interpreter: bool = False,
                  launch: Optional[tuple] = None) -> torch.Tensor:
    """The packed weight (bit planes, :mod:`q3n_compile.kernels.packing`) as a dense ``W [N, K]``
    of `dtype`: ``(q - z) * s`` when `scaled`, else ``q - z``."""
    N = qweight.shape[1]
    w = torch.empty((N, K), dtype=dtype, device=qweight.device)
    bn, bk, warps = tile(group_size, interpreter, launch, w.element_size())
    contract.launch(
        unpack_weight_kernel, (contract.cdiv(K, bk), contract.cdiv(N, bn)),
        (qweight, scales, zeros if zeros is not None else scales, w),
        (N, K, P.padded_k(K), *P.plane_starts(bits, K)),
        dict(BITS=bits, GROUP=0 if group_size == P.PER_CHANNEL else group_size,
             SYM=zeros is None, SCALED=scaled, BLOCK_N=bn, BLOCK_K=bk),
        dict(num_warps=warps), fast=qweight.is_cuda and not interpreter)
    return w
