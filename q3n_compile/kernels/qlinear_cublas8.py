"""``q3n::qlinear``'s "cublas8" path: the weight's integer codes unpacked to 8 bits for one call,
then multiplied by cuBLAS's 8-bit GEMMs (fp8 e4m3 with block scales, or int8).

What this module guarantees:

- :func:`eligible` says whether the path computes the op's function exactly for a format: the
  weight's ``q - z`` must be an integer the 8-bit operand holds exactly and the scales must be a
  layout cuBLAS applies itself:
  - ``act="fp8"`` (on a GPU with fp8 tensor cores): weights of at most 4 bits (``|q - z| <= 15``,
    exact in e4m3), weight scales per 128 channels or per output channel, activation scales per
    token or per 128 channels, K a multiple of 128 (of 16 when both scales are per row/channel);
  - ``act="int8"``: per-channel weights (``|q - z| <= 127``; 8-bit weights are symmetric, as the
    op requires), per-token activation scales, K a multiple of 16;
  - bfloat16 output (cuBLAS's row-wise fp8 scaling takes no other on every GPU), N a multiple
    of 16.
- :func:`unpack_codes_8bit` writes ``q - z`` as a dense ``[N, K]`` matrix (K contiguous, the
  layout cuBLAS's 8-bit GEMMs read for the second operand) by
  :func:`q3n_compile.kernels.weight_unpack.unpack_weight`; exact.
- :func:`run` computes ``y = (c * s_x) @ ((q - z) * s)^T + bias`` from the activation codes ``c``
  and scales ``s_x`` of the op's quantizer:
  - fp8: ``torch._scaled_mm`` with 1x128 block scales on both operands (weight scales per 128
    channels, or activation scales per 128 channels) or row-wise scales (per-channel weights and
    per-token activations); ``use_fast_accum=False``, so cuBLAS adds each block's fp8 products
    into an fp32 accumulator, as the mm kernel does per K block;
  - int8: ``torch._int_mm`` (exact int32 sums), then :func:`int8_epilogue_kernel`:
    ``acc * s_x[m] * s[n] (+ bias)`` in fp32, rounded once;
  - bias is added to the bf16 product (fp8; one more rounding than the kernels' fp32 add) or in
    the int8 epilogue's fp32.

Cost: per call the unpack reads the packed weight and writes ``N * K`` bytes that live until the
GEMM returns (a 28672 x 8192 weight: 235 MB); the packed weight stays the only resident copy.
This pays where the GEMM is long (large M); :func:`q3n_compile.kernels.qlinear.choose_path` takes
this path from the M where it measured faster than the alternatives.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from q3n_compile.kernels import contract
from q3n_compile.kernels import packing as P
from q3n_compile.kernels import weight_unpack as WU

FP8_GROUP = 128  # cuBLAS's block-scaled fp8 GEMM takes blocks of 128 channels (1x128)


@triton.jit
def int8_epilogue_kernel(ACC, XS, S, BIAS, Y, M, N, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y[m, n] = ACC[m, n] * XS[m] * S[n] (+ BIAS[n]) in fp32, rounded once to Y's dtype.

    ACC is torch._int_mm's int32 [M, N]; traffic: reads it once (4 bytes per output), writes Y.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    mask = m_ok[:, None] & n_ok[None, :]
    acc = tl.load(ACC + offs_m[:, None] * N + offs_n[None, :], mask=mask, other=0).to(tl.float32)
    xs = tl.load(XS + offs_m, mask=m_ok, other=0.0)
    s = tl.load(S + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    y = acc * xs[:, None] * s[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * N + offs_n[None, :], y.to(Y.dtype.element_ty), mask=mask)


def eligible(N: int, K: int, bits: int, group_size: int, act: str, out_dtype: torch.dtype,
             fp8_hardware: bool, act_group_size: int) -> Optional[str]:
    """None if the cublas8 path computes this format exactly, else why not."""
    if out_dtype != torch.bfloat16:
        return "cublas8 takes bfloat16 outputs only"
    if N % 16:
        return f"cublas8 needs N a multiple of 16, got {N}"
    if act == "fp8":
        if not fp8_hardware:
            return "fp8 activations without fp8 tensor cores"
        if bits > 4:
            return f"{bits}-bit codes are not exact in e4m3 (at most 4 bits)"
        if group_size not in (FP8_GROUP, P.PER_CHANNEL) or act_group_size not in (FP8_GROUP, -1):
            return "cublas8's fp8 scales are per 128 channels or per row/channel"
        rowwise = group_size == P.PER_CHANNEL and act_group_size == -1
        if K % (16 if rowwise else FP8_GROUP):
            return f"cublas8's fp8 GEMM needs K a multiple of {16 if rowwise else FP8_GROUP}"
        return None
    if act == "int8":
        if group_size != P.PER_CHANNEL or act_group_size != -1:
            return "cublas8's int8 GEMM takes per-channel weights and per-token activations"
        if K % 16:
            return "cublas8's int8 GEMM needs K a multiple of 16"
        return None
    return f"cublas8 takes int8 or fp8 activations, not {act}"


def unpack_codes_8bit(qweight: torch.Tensor, zeros: Optional[torch.Tensor], bits: int,
                      group_size: int, K: int, dtype: torch.dtype,
                      interpreter: bool = False) -> torch.Tensor:
    """``q - z`` as a dense ``[N, K]`` tensor of `dtype` (int8, float8_e4m3fn, or float16), by
    :func:`q3n_compile.kernels.weight_unpack.unpack_weight` (no scales read)."""
    # The scales argument is only a placeholder pointer: unscaled, the kernel reads none.
    return WU.unpack_weight(qweight, qweight, zeros, bits, group_size, K, dtype, scaled=False,
                            interpreter=interpreter)


def _block_scales_a(xs: torch.Tensor, M: int, K: int, act_group_size: int) -> torch.Tensor:
    """Activation scales as cuBLAS's 1x128 blocks: [M, K / 128] fp32, M contiguous."""
    G = K // FP8_GROUP
    if act_group_size == -1:
        return xs[None, :].expand(G, M).contiguous().t()
    return xs.t().contiguous().t()


def run(codes: torch.Tensor, xs: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
        zeros: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int, group_size: int,
        act: str, act_group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``y [M, N]`` from activation codes ``[M, K]`` and their fp32 scales (``[M]`` per token,
    ``[M, K / 128]`` per 128 channels); the caller checked :func:`eligible`."""
    M, K = codes.shape
    N = qweight.shape[1]
    if act == "fp8":
        w8 = unpack_codes_8bit(qweight, zeros, bits, group_size, K, torch.float8_e4m3fn)
        s = scales.to(torch.float32)
        if group_size == P.PER_CHANNEL and act_group_size == -1:
            y = torch._scaled_mm(codes, w8.t(), scale_a=xs[:, None], scale_b=s,
                                 out_dtype=out_dtype, use_fast_accum=False)
        else:
            # cuBLAS has no block-scaled algorithm for M = 17 (CUBLAS_STATUS_NOT_SUPPORTED on the
            # H200, s8run1) where it has one for 1000 and 4096 rows: zero rows pad M to a
            # multiple of 16 (a copy of the codes, only then).
            pad = -M % 16
            if pad:
                codes = torch.cat([codes, codes.new_zeros((pad, K))])
                xs = torch.cat([xs, xs.new_ones((pad,) + tuple(xs.shape[1:]))])
            # 1x128 blocks on both sides; the weight's [K / 128, N] scales are the transpose of
            # the N-major [N, K / 128] cuBLAS reads.
            sb = s.expand(K // FP8_GROUP, N).contiguous() if group_size == P.PER_CHANNEL else s
            y = torch._scaled_mm(codes, w8.t(),
                                 scale_a=_block_scales_a(xs, M + pad, K, act_group_size),
                                 scale_b=sb, out_dtype=out_dtype, use_fast_accum=False)[:M]
        return y.add_(bias) if bias is not None else y
    w8 = unpack_codes_8bit(qweight, zeros, bits, group_size, K, torch.int8)
    if M <= 16:  # torch._int_mm takes more than 16 rows: zero rows pad a forced small call
        codes = torch.cat([codes, codes.new_zeros((17 - M, K))])
    acc = torch._int_mm(codes, w8.t())
    y = torch.empty((M, N), dtype=out_dtype, device=codes.device)
    bm, bn = 32, 128
    int8_epilogue_kernel[(contract.cdiv(M, bm), contract.cdiv(N, bn))](
        acc, xs, scales, bias if bias is not None else scales, y, M, N,
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return y
