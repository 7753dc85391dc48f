"""``q3n::qlinear``'s "mm8" path: 8-bit activation codes times packed weight codes on 8-bit tensor
cores (fp8 e4m3 or int8 MMAs), the weight unpacked in the kernel.

Why: the cublas8 path unpacks the weight's ``q - z`` to a dense 8-bit ``[N, K]`` matrix for
every call and hands it to cuBLAS; at 256 rows that unpack (0.113 ms at 28672 x 8192, s8run2)
was 44% of the call. Here the packed words (4 bits a weight) are read once per tile and unpacked
on the way to the MMA, so the weight's DRAM traffic is the packed bytes and nothing is written.

Measured (H200, bench/RESULTS.md session 15): its 128 x 32 tile beats cublas8 for 4-bit g128
weights and per-token fp8 codes from 65 to 128 rows where the tiles fill the SMs twice (0.0434
against 0.0612 ms at 128 rows, 12288 x 4096) or, with K split 4 ways, where they are about one
per SM (0.0241 against 0.0302 at 128 rows, 4096^2), which is where
:func:`q3n_compile.kernels.qlinear.choose_path` uses it. It loses where the GEMM is long (its
best tile 0.51-0.56x bf16 at 4096 rows, cublas8 1.17-1.27x): with per-group scales each
block's MMA is waited for before its sum is scaled, so the unpack and the MMA do not overlap
(Triton 3.6 does not warp-specialise on Hopper). The int8 variant for 8-bit per-channel
weights (the int32 accumulator chained) ran 0.09-0.45x bf16 from 256 rows, slower than the mm
tile and cublas8; it is not dispatched.

The tile: ``acc[BLOCK_M, BLOCK_N] += c[BLOCK_M, 128] @ (q - z)[128, BLOCK_N]`` per K block of 128
channels (one weight group), the codes ``c`` straight from memory to the MMA (K contiguous), the
weight's block from its words: a word holds 32 / BITS consecutive channels of one column, so the
``[128 / (32 / BITS), BLOCK_N]`` words, shifted by each position's ``BITS * j`` and masked, are the
``[128, BLOCK_N]`` block in channel order (a reshape). ``q - z`` (|q - z| <= 15 for 4 bits; int8
also takes 8-bit symmetric codes, -128..127) is exact in the operand: through fp16 to e4m3 (Triton
converts to fp8 only from a float), or int8. Each block's sum is exact (int32) or an fp8 MMA's
fp32 sum of exact products; it is multiplied by its group's scale (per-channel: at the end) and,
with per-128-channel activation scales, by its rows' scale of that block, then added in fp32 (the
fp8 accumulator is never chained across blocks: sm_90 adds fp8 products at reduced precision,
as the mm kernel's docstring says). Programs are ordered in groups of GROUP_M row blocks per
column block, so the rows of one weight tile run close together and read it from L2.

What this module guarantees: :func:`eligible` says whether the kernel computes a format exactly;
:func:`run` computes ``y = (c * s_x) @ ((q - z) * s)^T + bias`` in fp32, rounded once to the
output dtype, for the formats :func:`eligible` accepts, on the GPU and in the interpreter (where
fp16 operands stand in for e4m3: the codes are fp16 there, as the quantizer gives them); with K
split (SPLIT_K), the splits' fp32 partials are summed in split order in the same launch
(:func:`q3n_compile.kernels.tiles.ticket_split_k`), so the result does not depend on timing.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from q3n_compile.kernels import contract
from q3n_compile.kernels import packing as P
from q3n_compile.kernels.qlinear_swap import _field, _halves
from q3n_compile.kernels.tiles import grouped_tile, ticket_split_k

BLOCK_K = 128  # one weight group (and one activation group) a K block
# Operand codes (the OPD constexpr).
OPD_F16, OPD_I8, OPD_F8 = 0, 1, 2


@triton.jit
def _minus_zero(words, z, BITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """q - z (fp32, exact) of a K block's words [BLOCK_N, WORDS] as [BLOCK_N, 128]: each
    position j of the words (one LOP3 and one FFMA a code: the magic-float field of
    qlinear_swap), joined along new last axes, innermost first: j's highest bit first, its
    lowest last, so that the reshape puts position j of word r at channel 32 / BITS * r + j
    (the packing's order)."""
    lo, hi = _halves(words)
    if BITS == 8:
        wt = tl.join(tl.join(_field(lo, hi, 0, 8, z), _field(lo, hi, 16, 8, z)),
                     tl.join(_field(lo, hi, 8, 8, z), _field(lo, hi, 24, 8, z)))
    else:
        wt = tl.join(tl.join(tl.join(_field(lo, hi, 0, 4, z), _field(lo, hi, 16, 4, z)),
                             tl.join(_field(lo, hi, 8, 4, z), _field(lo, hi, 24, 4, z))),
                     tl.join(tl.join(_field(lo, hi, 4, 4, z), _field(lo, hi, 20, 4, z)),
                             tl.join(_field(lo, hi, 12, 4, z), _field(lo, hi, 28, 4, z))))
    return tl.reshape(wt, (BLOCK_N, 128))


@triton.jit
def qlinear_mm8_kernel(
    C, XS, QW, S, Z, BIAS, Y, WS, CNT,
    M, N, K, K_PAD, ROW, K_PER_SPLIT, stride_cm, stride_xsm, stride_ym,
    BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, SYM: tl.constexpr, XGROUPS: tl.constexpr,
    HAS_BIAS: tl.constexpr, OPD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    PREFETCH: tl.constexpr = True, SPLIT: tl.constexpr = False,
):
    """One program computes Y[m-block, n-block] over one split of K, K_PER_SPLIT channels (a
    multiple of 128; SPLIT: the splits' partials are summed by tickets, WS and CNT; see the
    module docstring).

    C [M, K] codes (e4m3, int8, or fp16 in the interpreter), XS their fp32 scales ([M] per token,
    or [M, cdiv(K, 128)] with row stride stride_xsm when XGROUPS), QW the packed weight (the
    single plane of BITS, 4 or 8, starts at row ROW), S / Z its scales and zero points
    ([groups of 128, N], or [1, N] PER_CHANNEL). Channels past K read as code 0 in C, so the
    padded weight rows add nothing.

    Traffic: the packed weight once per row block (consecutive programs share it through L2),
    the codes once per column block, Y once."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K_PAD)
    pid_m, pid_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    PER: tl.constexpr = 32 // BITS  # channels a word
    WORDS: tl.constexpr = 128 // PER  # word rows a K block
    w_rows = tl.arange(0, WORDS)
    offs_kb = tl.arange(0, 128)
    if PER_CHANNEL:
        s_col = tl.load(S + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if not SYM:
            z_col = tl.load(Z + offs_n, mask=n_ok, other=0).to(tl.float32)[:, None]
    if SYM:
        z = tl.full([BLOCK_N, 1], 1 << (BITS - 1), tl.float32)
    elif PER_CHANNEL:
        z = z_col
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Integer products with one scale per column and token: the int32 accumulator is exact
    # across blocks, so the MMAs chain (no per-block fp32 pass).
    CHAIN: tl.constexpr = OPD == 1 and PER_CHANNEL and not XGROUPS
    if CHAIN:
        iacc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    # 8-bit symmetric codes as int8: q - 128 is the byte with its top bit flipped, so the
    # plane's bytes are the operand after one XOR (no word split).
    BYTES: tl.constexpr = BITS == 8 and SYM and OPD == 1
    if BYTES:
        QB = QW.to(tl.pointer_type(tl.int8))
        b_offs = ((ROW + offs_kb // 4)[None, :] * N + offs_n[:, None]) * 4 + (offs_kb % 4)[None, :]
    # The block's words as [BLOCK_N, WORDS]: each thread then holds whole words, and the weight
    # operand leaves it K-contiguous (vector stores to the MMA's K-major buffer).
    w_ptrs = QW + (ROW + w_rows)[None, :] * N + offs_n[:, None]
    n_words = K_PAD // PER
    PF: tl.constexpr = PREFETCH and not BYTES
    if PF:
        words_next = tl.load(w_ptrs + (k_start // PER) * N,
                             mask=(k_start // PER + w_rows < n_words)[None, :] & n_ok[:, None],
                             other=0)
    for k0 in range(k_start, k_end, 128):
        offs_k = k0 + offs_kb
        a = tl.load(C + offs_m[:, None] * stride_cm + offs_k[None, :],
                    mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)
        r = k0 // PER + w_rows
        if BYTES:
            wb = tl.load(QB + b_offs + (k0 // 4) * N * 4,
                         mask=((k0 + offs_kb) // 4 < n_words)[None, :] & n_ok[:, None], other=0)
            wb = wb ^ -128
        elif PF:
            # The next block's words loaded a block ahead (registers): Triton's pipeline does
            # not stage loads that reach the MMA through arithmetic.
            words = words_next
            words_next = tl.load(w_ptrs + (r + WORDS)[None, :] * N - w_rows[None, :] * N,
                                 mask=(r + WORDS < n_words)[None, :] & n_ok[:, None]
                                 & (k0 + 128 < k_end), other=0)
        else:
            words = tl.load(w_ptrs + (r - w_rows)[None, :] * N,
                            mask=(r < n_words)[None, :] & n_ok[:, None], other=0)
        if not SYM and not PER_CHANNEL:
            z = tl.load(Z + (k0 // 128) * N + offs_n, mask=n_ok, other=0).to(tl.float32)[:, None]
        if BYTES:
            wt = wb
        else:
            wt = _minus_zero(words, z, BITS, BLOCK_N)
        if CHAIN:
            iacc = tl.dot(a, tl.trans(wt.to(tl.int8)), iacc, out_dtype=tl.int32)
        else:
            if OPD == 1:
                part = tl.dot(a, tl.trans(wt.to(tl.int8)), out_dtype=tl.int32).to(tl.float32)
            elif OPD == 2:
                part = tl.dot(a, tl.trans(wt.to(tl.float8e4nv)))
            else:
                part = tl.dot(a.to(tl.float16), tl.trans(wt.to(tl.float16)))
            if not PER_CHANNEL:
                part = part * tl.load(S + (k0 // 128) * N + offs_n, mask=n_ok,
                                      other=0.0).to(tl.float32)[None, :]
            if XGROUPS:
                part = part * tl.load(XS + offs_m * stride_xsm + k0 // 128, mask=m_ok,
                                      other=0.0)[:, None]
            acc += part
    if CHAIN:
        acc = iacc.to(tl.float32)
    if not XGROUPS:
        acc = acc * tl.load(XS + offs_m, mask=m_ok, other=0.0)[:, None]
    if PER_CHANNEL:
        acc = acc * s_col[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(BIAS + offs_n, mask=n_ok & (pid_k == 0),
                            other=0.0).to(tl.float32)[None, :]
    y_offs = offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        # The splits' fp32 partials (each already scaled: the scales are per token and column)
        # summed in split order by the tile's last split, in this launch.
        ticket_split_k(acc, Y, y_offs, y_mask, WS, offs_m[:, None] * N + offs_n[None, :],
                       M * N, CNT, pid, pid_k, tl.num_programs(1))
    else:
        tl.store(Y + y_offs, acc.to(Y.dtype.element_ty), mask=y_mask)


def eligible(bits: int, group_size: int, symmetric: bool, act: str, act_group_size: int,
             codes_dtype: torch.dtype) -> Optional[str]:
    """None if the kernel computes this format exactly, else why not."""
    if bits not in (4, 8):
        return f"mm8 reads 4- and 8-bit weights (one bit plane), not {bits}"
    if group_size not in (BLOCK_K, P.PER_CHANNEL):
        return f"mm8 takes weight groups of {BLOCK_K} or per-channel scales, not {group_size}"
    if act_group_size not in (BLOCK_K, -1):
        return (f"mm8 takes activation scales per token or per {BLOCK_K} channels, not per "
                f"{act_group_size}")
    if act == "fp8" and codes_dtype == torch.float8_e4m3fn:
        if bits > 4:
            return f"{bits}-bit codes are not exact in e4m3 (at most 4 bits)"
        return None
    if act == "int8" or (act == "fp8" and codes_dtype == torch.float16):
        if bits == 8 and not symmetric:
            return "8-bit codes with zero points (|q - z| up to 255) do not fit int8"
        return None
    return f"mm8 takes int8 or fp8 activation codes, not {act} ({codes_dtype})"


def operand(act: str, codes_dtype: torch.dtype) -> int:
    if codes_dtype == torch.float8_e4m3fn:
        return OPD_F8
    if codes_dtype == torch.int8:
        return OPD_I8
    return OPD_F16  # the interpreter's fp8 codes (fp16 values)


def run(codes: torch.Tensor, xs: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
        zeros: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int, group_size: int,
        act: str, act_group_size: int, out_dtype: torch.dtype, cfg: dict,
        interpreter: bool, tickets=None) -> torch.Tensor:
    """``y [M, N]`` from activation codes ``[M, K]`` (K contiguous) and their fp32 scales (``[M]``
    per token, ``[M, cdiv(K, 128)]`` per 128 channels); `cfg`: BLOCK_M, BLOCK_N, GROUP_M,
    num_warps, num_stages, SPLIT_K (default 1: K split that many ways, finished in the launch
    by tickets, `tickets(device, n)` giving the int32 counters, as the mmT path's)."""
    reason = eligible(bits, group_size, zeros is None, act, act_group_size, codes.dtype)
    if reason is not None:
        raise ValueError(f"q3n::qlinear: the mm8 path does not take this call: {reason}")
    if codes.stride(1) != 1:
        codes = codes.contiguous()
    M, K = codes.shape
    N = qweight.shape[1]
    y = torch.empty((M, N), dtype=out_dtype, device=codes.device)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    tiles = contract.cdiv(M, bm) * contract.cdiv(N, bn)
    # K_pad (a multiple of 32) in blocks of 128: the last block's padding reads as code 0.
    split, k_per_split, ws, cnt = contract.ticket_split_k_plan(
        contract.cdiv(P.padded_k(K), BLOCK_K) * BLOCK_K, BLOCK_K, cfg.get("SPLIT_K", 1), y,
        tiles, tickets, "mm8")
    xgroups = act_group_size != -1
    contract.launch(
        qlinear_mm8_kernel, (tiles, split),
        (codes, xs, qweight, scales, zeros if zeros is not None else scales,
         bias if bias is not None else scales, y, ws, cnt),
        (M, N, K, P.padded_k(K), P.plane_rows(bits, K)[bits][0], k_per_split, codes.stride(0),
         xs.stride(0) if xgroups else 0, y.stride(0)),
        dict(BITS=bits, PER_CHANNEL=group_size == P.PER_CHANNEL, SYM=zeros is None,
             XGROUPS=xgroups, HAS_BIAS=bias is not None, OPD=operand(act, codes.dtype),
             BLOCK_M=bm, BLOCK_N=bn, GROUP_M=cfg.get("GROUP_M", 8),
             PREFETCH=bool(cfg.get("PREFETCH", True)), SPLIT=split > 1),
        dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]), fast=not interpreter)
    return y
