"""Activation codes back to 16-bit activations, in one Triton pass: ``q3n::qlinear_codes``'s
input to the tiles that take x rather than codes (the wg tile, mmT on permuted x, dequantise +
cuBLAS).

What this module guarantees:

- :func:`dequantize_codes` returns ``c * s_x`` computed in fp32 and rounded once to `dtype`
  (round to nearest even), for int8, fp8 (e4m3) or 12-bit (fp16-held) codes with fp32 scales
  per token ``[M]`` or per token and group of 32, 64 or 128 channels ``[M, G]``; bit for bit
  what :func:`dequantize_codes_torch` (torch's multiply of the codes by their expanded scales)
  gives. With `perm128` the result is in the XPERM layout of
  :func:`q3n_compile.kernels.qlinear_swap.permute_x_blocks` (``[M, K rounded up to 128]``,
  channel ``k0 + 8r + j`` of each 128-channel block at ``k0 + 16j + r``, zeros past K).
- On a GPU and under Triton's interpreter it is :func:`dequantize_codes_kernel`; elsewhere
  (the "reference" backend, and float8 codes under the interpreter, which cannot load them) the
  torch form.

Why a kernel of its own: torch needs two passes for fp8 codes (float8 does not promote with
float32, so they are widened to bf16 first) and one for int8, each a launch; in a decode step
``q3n::qlinear_codes`` runs this once per sibling linear on the wg path (65-256 rows), and twice
where the op splits its rows. One kernel reads the codes once (1 byte a value) and writes the
16-bit activations once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from q3n_compile.kernels import contract
from q3n_compile.kernels.qlinear_swap import MMT_BLOCK_K as BLOCK_K
from q3n_compile.kernels.qlinear_swap import PER_TOKEN, block_permuted, row_block, xperm_blocks

# x's permutation's programs (8 rows x 4 blocks of 128 channels): at 130 rows of K 4096, 136.
from q3n_compile.kernels.qlinear_swap import PERMUTE_BLOCK_M as BLOCK_M  # noqa: E402
from q3n_compile.kernels.qlinear_swap import PERMUTE_BLOCKS as BLOCKS  # noqa: E402


@triton.jit
def dequantize_codes_kernel(C, XS, Y, M, K, KY, stride_cm, stride_sm, BLOCK_M: tl.constexpr,
                            BLOCKS: tl.constexpr, GROUP: tl.constexpr, PERMUTE: tl.constexpr,
                            PDL: tl.constexpr):
    """Y[m, k] = C[m, k] * XS[m] (GROUP 0) or XS[m, k // GROUP], in fp32, rounded once to Y's
    dtype, for BLOCK_M rows and BLOCKS x 128 channels of Y [M, KY] a program (zero past K).
    PERMUTE: channel k0 + 8r + j of each 128-channel block is written at k0 + 16j + r (a [16,
    8] transpose in registers). PDL: launched with programmatic dependent launch: lets the
    kernel after it start at once and waits for the kernel before it before reading C."""
    rows, cols, rows64 = row_block(BLOCK_M, BLOCKS, PDL)
    row_ok = (rows < M)[:, None]
    in_k = row_ok & (cols < K)[None, :]
    # No `other`: Triton 3.6 cannot cast a constant to float8; masked values are zeroed below.
    c = tl.where(in_k, tl.load(C + rows64 * stride_cm + cols[None, :], mask=in_k).to(tl.float32),
                 0.0)
    if GROUP == 0:
        s = tl.load(XS + rows[:, None], mask=row_ok, other=0.0)
    else:
        s = tl.load(XS + rows64 * stride_sm + (cols // GROUP)[None, :], mask=in_k, other=0.0)
    y = (c * s).to(Y.dtype.element_ty)
    if PERMUTE:
        y = xperm_blocks(y, BLOCK_M, BLOCKS)
    tl.store(Y + rows64 * KY + cols[None, :], y, mask=row_ok & (cols < KY)[None, :])


def expand_scales(xs: torch.Tensor, k: int, act_group_size: int) -> torch.Tensor:
    """Every element's activation scale: ``[M]`` -> ``[M, 1]`` (broadcasts over K); ``[M, G]``
    -> ``[M, k]``."""
    if act_group_size == PER_TOKEN:
        return xs[:, None]
    return xs.repeat_interleave(act_group_size, dim=1)[:, :k]


_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantize_codes_torch(codes: torch.Tensor, xs: torch.Tensor, act_group_size: int,
                           dtype: torch.dtype, perm128: bool = False) -> torch.Tensor:
    """:func:`dequantize_codes` in torch: one multiply writing `dtype` straight into the
    (possibly permuted) output view; fp8 codes widened to bf16 first (exact: e4m3 has 3
    mantissa bits)."""
    M, K = codes.shape
    if codes.dtype in _FLOAT8:
        codes = codes.to(torch.bfloat16)
    scale = expand_scales(xs, K, act_group_size)
    if not perm128:
        return torch.mul(codes, scale, out=torch.empty((M, K), dtype=dtype, device=codes.device))
    blocks = contract.cdiv(K, BLOCK_K)
    kp = blocks * BLOCK_K
    if kp != K:  # zero codes past K: their products are the padding's zeros
        codes = torch.nn.functional.pad(codes, (0, kp - K))
        if scale.shape[1] != 1:
            scale = torch.nn.functional.pad(scale, (0, kp - K))
    out = torch.empty((M, kp), dtype=dtype, device=codes.device)
    # Read in the permuted order, written contiguously (a per-token scale broadcasts).
    per_token = scale.shape[1] == 1
    torch.mul(block_permuted(codes), scale[:, :, None, None] if per_token
              else block_permuted(scale), out=out.view(M, blocks, 8, 16))
    return out


def dequantize_codes(codes: torch.Tensor, xs: torch.Tensor, act_group_size: int,
                     dtype: torch.dtype, perm128: bool = False, pdl: bool = False
                     ) -> torch.Tensor:
    """``c * s_x`` as described in the module docstring: codes ``[M, K]`` (unit column
    stride), `xs` fp32 ``[M]`` (`act_group_size` :data:`PER_TOKEN`) or contiguous ``[M, G]``;
    [M, K] in `dtype`, or with `perm128` [M, K rounded up to 128] in the XPERM layout. `pdl`:
    launch with programmatic dependent launch (the caller has asked
    :func:`contract.pdl_capable`; the kernel launched next must wait before reading the
    result)."""
    backend = contract.backend_for(codes.device)
    if backend == "reference" or (backend == "interpreter" and codes.dtype in _FLOAT8):
        # (Triton 3.6's interpreter cannot load float8; its quantizer stores fp8 codes in fp16.)
        return dequantize_codes_torch(codes, xs, act_group_size, dtype, perm128)
    M, K = codes.shape
    ky = contract.cdiv(K, BLOCK_K) * BLOCK_K if perm128 else K
    out = torch.empty((M, ky), dtype=dtype, device=codes.device)
    if M == 0 or ky == 0:
        return out.zero_()
    if codes.stride(1) != 1:
        codes = codes.contiguous()
    xs = xs.contiguous()
    group = 0 if act_group_size == PER_TOKEN else act_group_size
    grid = (contract.cdiv(M, BLOCK_M), contract.cdiv(ky, BLOCKS * BLOCK_K))
    pdl = pdl and backend == "triton"
    contract.launch(dequantize_codes_kernel, grid, (codes, xs, out),
                    (M, K, ky, codes.stride(0), xs.stride(0) if group else 0),
                    dict(BLOCK_M=BLOCK_M, BLOCKS=BLOCKS, GROUP=group, PERMUTE=perm128, PDL=pdl),
                    dict(num_warps=4, launch_pdl=pdl), fast=backend == "triton")
    return out
