"""``q3n::qlinear``'s "wg" path: the swapped tile of :mod:`qlinear_swap` (``Y^T = W @ X^T``, x
permuted per block) written in Gluon, so that the weight's unpack overlaps the tensor cores.

Why: in Triton 3.6 the swapped tile's MMA reads the unpacked weight from registers, and Triton
waits for every such MMA to finish before the next instruction (sm_90 SASS of
``qlinear_mmT_kernel``: ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` after each of the 8 ``HGMMA`` of a K
block), so a warpgroup unpacks, then waits, then unpacks: at 65-256 rows the tile ran 0.6-0.7x
bf16 cuBLAS (bench/RESULTS.md). Here each MMA is issued asynchronously and the next sub-tile is
unpacked while it runs; only the MMA before the one just issued is waited for (its registers are
then free), and a K block's MMAs are all waited for once, when its sum is scaled.

The math is :func:`qlinear_swap.qlinear_mmT_kernel`'s for 4-bit weights with zero points in
groups of 128 and 16-bit x (ASM unpack, XPERM): per K block of 128 channels, the 8 sub-tiles
``B_j = q - z`` (exact in x's dtype, :func:`qlinear_swap._nibble_pairs_asm`'s PTX) times x's
sub-tile j (16 contiguous channels of x permuted by :func:`qlinear_swap.permute_x_blocks`),
summed in fp32, the block's sum times the group's scale added to the output tile.

Memory: x's sub-tiles go to shared memory by ``cp.async`` (STAGES blocks in flight), read by
the MMA as its second operand; the packed words go straight from global memory into the MMA
operand's register layout, two K blocks ahead of use (8 words a thread a block at 128 columns
and 8 warps), so no shared memory round trip and no layout conversion for the weight.

Gluon has no interpreter: this kernel runs on a GPU only (sm_90); the CPU lane compiles it for
sm_90 (tests/kernels/test_qlinear_wgmma.py) and the GPU lane checks it against float64.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                              warpgroup_mma_wait)

from q3n_compile.kernels import contract
from q3n_compile.kernels import packing as P
from q3n_compile.kernels.qlinear_swap import MMT_BLOCK_K, _nibble_pairs_asm, permute_x_blocks

_NIB_BF16 = gl.constexpr(tuple(_nibble_pairs_asm(j, False) for j in range(8)))
_NIB_F16 = gl.constexpr(tuple(_nibble_pairs_asm(j, True) for j in range(8)))


@gluon.jit
def _nibbles(u, zb, j: gl.constexpr, F16: gl.constexpr):
    """Code j of each word of u minus z, as 16-bit floats, two at a time (the pair is two
    adjacent K of one row of the MMA operand: one zero point)."""
    if F16:
        return gl.inline_asm_elementwise(_NIB_F16[j], "=r,r,r,r,r", [u, zb], dtype=gl.float16,
                                         is_pure=True, pack=2)
    else:
        return gl.inline_asm_elementwise(_NIB_BF16[j], "=r,r,r,r,r", [u, zb], dtype=gl.bfloat16,
                                         is_pure=True, pack=2)


@gluon.jit
def _zb(Z, g, offs_n, n_ok, N, OPD: gl.constexpr):
    """M + z of group g for columns offs_n as a 16-bit float in both halves of an int32 (M = 128
    for bf16, 1024 for fp16: :func:`_nibbles`' magic)."""
    MAGIC: gl.constexpr = 1024.0 if OPD == gl.float16 else 128.0
    z = gl.load(Z + g * N + offs_n, mask=n_ok, other=0).to(gl.float32)
    h = (z + MAGIC).to(OPD).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    return h | (h << 16)


@gluon.jit
def qlinear_wg_kernel(X, QW, S, Z, Y, M, N, K_PAD, KX, ROW4, K_PER_SPLIT, stride_xm, stride_ym,
                      BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      REDUCE: gl.constexpr, num_warps: gl.constexpr):
    """Y[m-block, n-block] (REDUCE 0) or += into fp32 Y (REDUCE 1, one launch per K split
    summed by atomics) for 4-bit g128 weights with zero points, x permuted per block ([M, KX],
    KX a multiple of 128, zero past K) in bf16 or fp16. Program (n-block, K split, m-block);
    BLOCK_N columns over num_warps / 4 warpgroups (64 each), BLOCK_M rows of x the MMA's N."""
    OPD: gl.constexpr = X.dtype.element_ty
    F16: gl.constexpr = OPD == gl.float16
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    # x's K block in shared memory: the 8 sub-tiles [BLOCK_M, 16] one above the other (rows
    # j * BLOCK_M + m), 32-byte rows, the MMA's K-major second operand.
    x_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=32, element_bitwidth=16, rank=2)
    x_bl: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[16, 2],
                                          warps_per_cta=[num_warps, 1], order=[1, 0])
    x_smem = gl.allocate_shared_memory(OPD, [STAGES, 8 * BLOCK_M, 16], x_sl)

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    m0 = gl.program_id(2) * BLOCK_M
    k_start = pid_k * K_PER_SPLIT
    k_end = gl.minimum(k_start + K_PER_SPLIT, KX)

    # cp.async addresses of one K block's sub-tiles: row t = j * BLOCK_M + m, column c is
    # channel k0 + 16 j + c of row m0 + m.
    t = gl.arange(0, 8 * BLOCK_M, layout=gl.SliceLayout(1, x_bl))
    c = gl.arange(0, 16, layout=gl.SliceLayout(0, x_bl))
    xm = m0 + t % BLOCK_M
    x_ptrs = X + xm.to(gl.int64)[:, None] * stride_xm + ((t // BLOCK_M) * 16)[:, None] + c[None, :]
    x_ok = (xm < M)[:, None] & (c < 16)[None, :]

    # The packed words [BLOCK_N, 16] (16 rows of 8 channels of a K block) in the MMA's
    # first-operand layout: element (n, r) is row r of column n, whose code j is channel
    # k0 + 8 r + j, the sub-tile j's K = r.
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, a_l))
    n_ok = offs_n < N
    r16 = gl.arange(0, 16, layout=gl.SliceLayout(0, a_l))
    w_ptrs = QW + (ROW4 + r16)[None, :] * N + offs_n[:, None]
    W_ROWS = K_PAD // 8
    offs_ns = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    ns_ok = offs_ns < N

    for s in gl.static_range(STAGES - 1):
        kk = k_start + s * 128
        cp.async_copy_global_to_shared(x_smem.index(s), x_ptrs + kk, mask=x_ok & (kk < k_end))
        cp.commit_group()
    w0 = gl.load(w_ptrs + (k_start // 8) * N,
                 mask=n_ok[:, None] & (k_start // 8 + r16 < W_ROWS)[None, :], other=0)
    w1 = gl.load(w_ptrs + (k_start // 8 + 16) * N,
                 mask=n_ok[:, None] & ((k_start // 8 + 16 + r16 < W_ROWS)
                                       & (k_start + 128 < k_end))[None, :], other=0)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
    i = 0
    for k0 in range(k_start, k_end, 128):
        cp.wait_group(STAGES - 2)
        fence_async_shared()
        gl.thread_barrier()  # every thread's copies of block i are in; block i - 1 is read
        kn = k0 + (STAGES - 1) * 128
        cp.async_copy_global_to_shared(x_smem.index((i + STAGES - 1) % STAGES), x_ptrs + kn,
                                       mask=x_ok & (kn < k_end))
        cp.commit_group()
        # Two blocks ahead: the words' load latency hides behind two blocks of MMAs.
        w2 = gl.load(w_ptrs + (k0 // 8 + 32) * N,
                     mask=n_ok[:, None] & ((k0 // 8 + 32 + r16 < W_ROWS)
                                           & (k0 + 256 < k_end))[None, :], other=0)
        g = k0 // 128
        zb = _zb(Z, g, offs_n, n_ok, N, OPD)
        sc = gl.load(S + g * N + offs_ns, mask=ns_ok, other=0.0).to(gl.float32)
        xs = x_smem.index(i % STAGES)
        a = _nibbles(w0, zb[:, None], 0, F16)
        tok = warpgroup_mma(a, xs.slice(0, BLOCK_M, 0).permute((1, 0)), acc, use_acc=False,
                            is_async=True)
        for j in gl.static_range(1, 8):
            a_next = _nibbles(w0, zb[:, None], j, F16)
            tok = warpgroup_mma(a_next, xs.slice(j * BLOCK_M, BLOCK_M, 0).permute((1, 0)), tok,
                                is_async=True)
            # MMA j - 1 done: its operand's registers may be reused; MMA j keeps running.
            tok, a = warpgroup_mma_wait(num_outstanding=1, deps=(tok, a))
            a = a_next
        blk, a = warpgroup_mma_wait(num_outstanding=0, deps=(tok, a))
        acc += blk * sc[:, None]
        w0 = w1
        w1 = w2
        i += 1
    cp.wait_group(0)

    offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
    y_ptrs = Y + offs_m.to(gl.int64)[None, :] * stride_ym + offs_ns[:, None]
    y_ok = (offs_m < M)[None, :] & ns_ok[:, None]
    if REDUCE == 1:
        gl.atomic_add(y_ptrs, acc, mask=y_ok)
    else:
        gl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_ok)


def run(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
        K: int, cfg: dict, x_permuted: bool = False) -> torch.Tensor:
    """``x @ W^T`` for 4-bit g128 weights with zero points (``qweight`` [K_PAD / 8, N] int32,
    ``scales`` / ``zeros`` [K_PAD / 128, N]), x [M, K] bf16/fp16 (or already
    :func:`permute_x_blocks`'s [M, K128] with `x_permuted`). cfg: BLOCK_M, BLOCK_N, STAGES,
    SPLIT_K, num_warps."""
    M = x.shape[0]
    N = qweight.shape[1]
    xk = x if x_permuted else permute_x_blocks(x)
    kx = xk.shape[1]
    split = cfg.get("SPLIT_K", 1)
    kps = contract.cdiv(contract.cdiv(kx, MMT_BLOCK_K), split) * MMT_BLOCK_K
    grid = (contract.cdiv(N, cfg["BLOCK_N"]), split, contract.cdiv(M, cfg["BLOCK_M"]))
    y = (torch.zeros((M, N), dtype=torch.float32, device=x.device) if split > 1
         else torch.empty((M, N), dtype=x.dtype, device=x.device))
    qlinear_wg_kernel[grid](xk, qweight, scales, zeros, y, M, N, P.padded_k(K), kx,
                            P.plane_starts(4, K)[0], kps, xk.stride(0), y.stride(0),
                            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], STAGES=cfg["STAGES"],
                            REDUCE=1 if split > 1 else 0, num_warps=cfg["num_warps"])
    return y.to(x.dtype) if split > 1 else y
