"""``q3n::qlinear``'s "mmT" path for a few rows of 16-bit activations: the tensor-core GEMM with
its operands swapped, ``Y^T = W @ X^T``.

Why: at M <= 64 the "mm" tile puts x's few rows on the MMA's M side, which Hopper's warpgroup
MMA sizes at 64 rows (a 16-row tile wastes 3/4 of it), and puts the weight, unpacked in
registers, on the side the MMA reads from shared memory (a store and a barrier per K block).
Swapped, the weight tile ``[BLOCK_N, BLOCK_K]`` is the first operand (the side an MMA may read
from registers) and x's ``[BLOCK_K, BLOCK_M]`` tile the second, 16 to 64 wide.

What this module guarantees: :func:`run` computes the op's function for ``act="none"``
(``y = x @ W^T + bias``, W dequantised as ``(q - z) * s`` and rounded to x's dtype, fp32
accumulation: the same rounding as the mm path's 16-bit-activation tiles), for every bit width,
weight group and symmetry the op takes; split-K by fp32 atomics as the mm path does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from q3n_compile.kernels import packing as P
from q3n_compile.kernels.qcodes import block_minus_zero, tile_setup


@triton.jit
def qlinear_mmT_kernel(
    X, QW, S, Z, BIAS, Y,
    M, N, K, K_PAD, ROW4, ROW2, ROW1, K_PER_SPLIT,
    stride_xm, stride_xk, stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr, F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program computes Y[m-block, n-block]^T over one split of K: acc[BLOCK_N, BLOCK_M] +=
    B[BLOCK_N, BLOCK_K] @ x_tile^T with B = (q - z) * s rounded to x's dtype (per-channel: B =
    q - z, exact, and s multiplies the fp32 result); F32 (fp32 x, or the interpreter) multiplies
    in fp32. Then + bias (first K split only), stored transposed into Y (or atomically added to
    an fp32 Y when K is split). BLOCK_K <= GROUP (the launcher's rule): one group per K block.

    The unpack is not what bounds it: gemv1p's float trick for one-plane codes (one LOP3 and one
    FMA per code, bit-identical results) was no faster at 16 rows (s8run5, W4A16, 3 shapes).

    Traffic: the packed weight once per row block of M (one block for M <= BLOCK_M), x once per
    column block, Y once (per split with ATOMIC).
    """
    pid_k = tl.program_id(1)
    offs_m, offs_n, m_ok, n_ok, k_start, k_end, s_col, z_col = tile_setup(
        S, Z, tl.program_id(2), tl.program_id(0), pid_k, M, N, K_PAD, K_PER_SPLIT, GROUP, SYM,
        BLOCK_M, BLOCK_N)
    PER_CHANNEL: tl.constexpr = GROUP == 0
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(X + offs_k[:, None] * stride_xk + offs_m[None, :] * stride_xm,
                     mask=(offs_k < K)[:, None] & m_ok[None, :], other=0.0)
        w = block_minus_zero(QW, Z, z_col, k0, offs_n, n_ok, K_PAD, N, ROW4, ROW2, ROW1, BITS,
                             GROUP, SYM, BLOCK_K, True)
        wf = w.to(tl.float32)
        if not PER_CHANNEL:
            s_row = tl.load(S + (k0 // GROUP) * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            wf = wf * s_row[:, None]
        b = wf.to(xt.dtype)
        if F32:
            acc = tl.dot(b.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(b, xt, acc)
    if PER_CHANNEL:
        acc = acc * s_col[:, None]
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n, mask=n_ok & (pid_k == 0), other=0.0).to(tl.float32)
        acc = acc + bias[:, None]
    y_ptrs = Y + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn
    y_mask = m_ok[None, :] & n_ok[:, None]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)
    else:
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_mask)


def run(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros, bias, bits: int,
        group_size: int, cfg: dict, interpreter: bool) -> torch.Tensor:
    """Launch :func:`qlinear_mmT_kernel` with `cfg` (BLOCK_M/N/K, SPLIT_K, num_warps,
    num_stages; BLOCK_K at most the group, the caller's rule)."""
    M, K = x.shape
    N = qweight.shape[1]
    split = cfg.get("SPLIT_K", 1)
    k_pad = P.padded_k(K)
    block_k = cfg["BLOCK_K"]
    k_per_split = triton.cdiv(triton.cdiv(k_pad, block_k), split) * block_k
    rows = P.plane_rows(bits, K)
    y = (torch.zeros((M, N), dtype=torch.float32, device=x.device) if split > 1
         else torch.empty((M, N), dtype=x.dtype, device=x.device))
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), split, triton.cdiv(M, cfg["BLOCK_M"]))
    qlinear_mmT_kernel[grid](
        x, qweight, scales, zeros if zeros is not None else scales,
        bias if bias is not None else scales, y, M, N, K, k_pad,
        rows.get(4, (0, 0))[0], rows.get(2, (0, 0))[0], rows.get(1, (0, 0))[0], k_per_split,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        BITS=bits, GROUP=0 if group_size == P.PER_CHANNEL else group_size, SYM=zeros is None,
        HAS_BIAS=bias is not None, ATOMIC=split > 1,
        # Triton 3.6's interpreter multiplies bf16 tiles as raw bits; fp32 holds them exactly.
        F32=x.dtype == torch.float32 or (interpreter and x.dtype == torch.bfloat16),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.to(x.dtype) if split > 1 and x.dtype != torch.float32 else y
