"""``q3n::qlinear``'s "mmT" path for a few rows of 16-bit activations: the tensor-core GEMM with
its operands swapped, ``Y^T = W @ X^T``, fed by sub-tiles that need no layout conversion.

Why swapped: at M <= 64 the "mm" tile puts x's few rows on the MMA's M side, which Hopper's
warpgroup MMA sizes at 64 rows (a 16-row tile wastes 3/4 of it). Swapped, the weight tile
``[BLOCK_N, 16]`` is the first operand (the side an MMA may read from registers) and x's
``[16, BLOCK_M]`` tile the second.

Why sub-tiles: a packed word holds 8 (4-bit) consecutive input channels of one column. Unpacked
into one ``[BLOCK_N, BLOCK_K]`` tile (a reshape of ``[BLOCK_N, words, 8]``), the codes sit in a
layout the MMA cannot read, and every K block went through shared memory to another (sm_90 SASS
of Triton 3.6: 12.4 instructions per code at 16 rows, 64 x 128 blocks, W4 g128). Here a K block
of 128 channels is 16 "rows" r of 8 channels, and sub-tile j (0..7) holds channels ``8r + j``:
each plane's field then sits at the same bits of every element of the sub-tile (its shift is a
constant), so the unpack is elementwise from the loaded words to the MMA operand and Triton
keeps the words in the operand's register layout (``bench/compile_qlinear_sm90.py --mmT``: 6.1
instructions per code for W4 g128 at 16 rows, no conversion of the weight). A per-row shift
breaks that, which is why the 2- and 1-bit planes are loaded as 16- and 8-bit parts. x's K
block is loaded contiguously and split into the 8 matching ``[16, BLOCK_M]`` slices in
registers (2048 values per K block, against 8192 codes), each stored to shared memory behind
a fence for the MMA. With XPERM, x comes permuted per block (:func:`permute_x_blocks`, or the
activation quantizer's permuted store), so each slice is 16 contiguous channels that the
pipeline loads straight into the MMA's operand: no split, no store, no fence (sm_90 SASS at 64
rows: 8 MEMBARs and 32 STS fewer per K block). It pays with more rows per program and for
4-bit weights (the dispatch's rule, :func:`q3n_compile.kernels.qlinear._mmT_xperm`).
With groups of 128 (one group per K block) the weight is not scaled: the block's fp32 sum of
exact ``(q - z) * x`` products is, once per output. For 4-bit weights with zero points (groups
of 128, per channel) on a GPU, the codes become the operand two at a time in inline PTX (ASM,
:func:`_nibble_pairs`), the 16-bit-float "magic number" form of the same trick: the K loop has
0.71-0.87x the instructions (sm_90 compile, ``compile-qlinear-mmT-sm90-2026-11-29-s13.json``);
6-bit weights likewise (:func:`_six_pairs`, 0.68-0.75x, session 14).

Measured (H200, bench/RESULTS.md, session 9): W4A16 g128 at 16 rows 1.23-1.44x bf16 cuBLAS in
the same run, where the earlier one-tile kernel ran 0.90-0.95x. Tried and slower (s9run2-3):
x permuted per block beforehand and the 8 sub-tiles joined into one dot over the block
(1.1-1.5x slower; x permuted with 8 dots per block is the XPERM option); x's 16 rows as two
8-row dots, which Triton gives the register-operand MMA (1.1-1.4x slower at 12288 x 4096 and
28672 x 8192).

What this module guarantees: :func:`run` computes the op's function for ``act="none"``
(``y = x @ W^T + bias``, fp32 accumulation) for every bit width, weight group and symmetry the
op takes, with the codes' ``q - z`` exact: groups of 32 and 64 multiply it by the scale and
round the weight to x's dtype (the mm path's 16-bit-activation rounding); groups of 128 and
per-channel scales multiply the fp32 sums instead (no rounding of the weight). Split K is
finished in the same launch by default (:func:`q3n_compile.kernels.tiles.ticket_split_k`: a
deterministic sum in split order), or by fp32 atomics as the mm path does (REDUCE "atomic").
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from q3n_compile.kernels import contract
from q3n_compile.kernels import packing as P
from q3n_compile.kernels.tiles import ticket_split_k

# A K block: 16 rows of 8 channels; the sub-tile of position j is the MMA's K = 16.
MMT_BLOCK_K = 128
# 0x4B000000 (written out in the kernels) is the bit pattern of 2^23 as float32: a field v placed
# at bit p of the mantissa (v * 2^p < 2^23) reads as the float 2^23 + v * 2^p, so fma(that,
# 2^-p, -2^(23-p)) = v exactly, with one LOP3 and one FFMA per field and no int->float
# conversion.


@triton.jit
def _plane_rows(QW, row0, k0, offs_n, n_ok, K_PAD, N, PB: tl.constexpr, HI: tl.constexpr):
    """Plane PB's bits of channels k0 + 8r + j (r < 16, j < 8) as a [BLOCK_N, 16] int32 u with
    channel 8r + j's field at bit PB * j of u[:, r] (PB <= 4: PB * 8 bits per row fit a word).
    PB = 8 (8 codes need two words): HI selects the word of j >= 4, fields at bit 8 * (j % 4).
    Rows past the padded K are 0."""
    PER: tl.constexpr = 32 // PB
    r = tl.arange(0, 16)
    if PB == 8:
        w_row = k0 // PER + 2 * r + HI
        u = tl.load(QW + (row0 + w_row)[None, :] * N + offs_n[:, None],
                    mask=(w_row < K_PAD // PER)[None, :] & n_ok[:, None], other=0)
    elif PB == 4:
        w_row = k0 // PER + r
        u = tl.load(QW + (row0 + w_row)[None, :] * N + offs_n[:, None],
                    mask=(w_row < K_PAD // PER)[None, :] & n_ok[:, None], other=0)
    else:
        # Row r's 8 fields are one 16-bit (PB = 2) or 8-bit (PB = 1) part of a word: loaded as
        # that part (little-endian), so that no per-row shift (which Triton 3.6 does not carry
        # into the MMA operand's layout) is needed. (Splitting loaded words into their parts
        # with tl.join instead gave wrong results with the 8-row tile's register-operand MMA on
        # the H200, s9run4, though right in the interpreter and with 16 rows.)
        R: tl.constexpr = 4 // PB  # rows of 8 channels per word
        w_row = k0 // PER + r // R
        if PB == 2:
            part = QW.to(tl.pointer_type(tl.int16))
        else:
            part = QW.to(tl.pointer_type(tl.int8))
        u = tl.load(part + ((row0 + w_row)[None, :] * N + offs_n[:, None]) * R + (r % R)[None, :],
                    mask=(w_row < K_PAD // PER)[None, :] & n_ok[:, None], other=0)
        u = u.to(tl.int32)
    return u


@triton.jit
def _halves(u):
    """(low, high) 16-bit halves of u, each OR-ed with the float32 bits of 2^23."""
    return (u & 0xFFFF) | 0x4B000000, ((u >> 16) & 0xFFFF) | 0x4B000000


@triton.jit
def _field(lo, hi, b: tl.constexpr, PB: tl.constexpr, sub):
    """The PB-bit field at bit b (< 32, b % 16 + PB <= 16) of the word whose magic halves are
    (lo, hi), minus `sub` (an integer-valued float32 tensor or 0.0), as an exact float32."""
    p: tl.constexpr = b % 16
    field: tl.constexpr = (((1 << PB) - 1) << p) | 0x4B000000
    if b >= 16:
        f = hi & field
    else:
        f = lo & field
    return tl.fma(f.to(tl.float32, bitcast=True), 1.0 / (1 << p), -8388608.0 / (1 << p) - sub)


@triton.jit
def _field6(lo4, hi4, h2, j: tl.constexpr, p2: tl.constexpr, z):
    """A 6-bit code's q - z at position j, in two LOP3 and two FFMA: the 4-bit field (bit 4j of
    the 4-bit plane's word, magic halves lo4 / hi4) and the 2-bit field (bit p2 of h2, a magic
    16-bit part) are each one float 2^23 + v * 2^p; fma(f4, 2^-p4, c) with c = -2^(23-p4) -
    2^(27-p2) - z leaves q4 - z - 2^(27-p2), and fma(f2, 2^(4-p2), that) adds 2^(27-p2) + 16 q2
    back. Exact: every constant and intermediate is an integer below 2^24 in magnitude for
    p2 >= 4 (the caller moves positions 0 and 1 up 6 bits: p2 = 6, 8)."""
    p4: tl.constexpr = (4 * j) % 16
    field4: tl.constexpr = (15 << p4) | 0x4B000000
    if j >= 4:
        f4 = hi4 & field4
    else:
        f4 = lo4 & field4
    f2 = h2 & ((3 << p2) | 0x4B000000)
    c = -(8388608.0 / (1 << p4) + 134217728.0 / (1 << p2)) - z
    d4 = tl.fma(f4.to(tl.float32, bitcast=True), 1.0 / (1 << p4), c)
    return tl.fma(f2.to(tl.float32, bitcast=True), 16.0 / (1 << p2), d4)


def _nibble_pairs_asm(j: int, f16: bool, scaled: bool = False, biased: bool = False) -> str:
    """The PTX of :func:`_nibble_pairs` for code j: $1, $2 the two words, $3 M + z; `scaled`
    (kernels/qlinear_wgmma.py): the pair then multiplied by $5 (s in both halves), rounded
    once; `biased` (kernels/qlinear_wgmma.py): M + q, nothing taken off (no $3)."""
    byte = j // 2
    sel = byte | (byte << 4) | ((4 + byte) << 8) | ((4 + byte) << 12)
    magic = 0x64006400 if f16 else 0x43004300
    shift = "shr.b32 t, t, 4; " if j % 2 else ""
    kind = "f16x2" if f16 else "bf16x2"
    tail = (f"sub.rn.{kind} t, t, $3; mul.rn.{kind} $0, t, $5;" if scaled
            else "mov.b32 $0, t;" if biased else f"sub.rn.{kind} $0, t, $3;")
    return (f"{{ .reg .b32 t; prmt.b32 t, $1, $2, {sel}; {shift}"
            f"lop3.b32 t, t, {0x000F000F}, {magic}, {0xEA}; {tail} }}")


def _six_pairs_asm(j: int, f16: bool, words: bool = False, scaled: bool = False,
                   biased: bool = False) -> str:
    """The PTX of :func:`_six_pairs` for code j: $1, $2 the 4-bit plane's words, $3, $4 the
    2-bit plane's 16-bit parts (fields at bit 2j), $5 M + z. `words` (kernels/qlinear_wgmma.py):
    $3 and $4 are both the whole 2-bit word holding the pair's two rows (the first's fields at
    bit 2j, the second's at bit 16 + 2j). `scaled`: the pair then multiplied by $7 (s in both
    halves), rounded once; `biased`: M + q, nothing taken off (no $5)."""
    byte4, byte2, p2 = j // 2, j // 4, (2 * j) % 8
    hi2 = (6 if words else 4) + byte2
    sel4 = byte4 | (byte4 << 4) | ((4 + byte4) << 8) | ((4 + byte4) << 12)
    sel2 = byte2 | (byte2 << 4) | (hi2 << 8) | (hi2 << 12)
    magic = 0x64006400 if f16 else 0x43004300
    shift4 = "shr.b32 t, t, 4; " if j % 2 else ""
    # The 2-bit field to bits 4-5 of each half (PRMT copied its byte into both bytes of the
    # half, so a shift of up to 4 either way keeps bits 4-5 and 20-21 within the right copy).
    shift2 = (f"shl.b32 u, u, {4 - p2}; " if p2 < 4 else f"shr.b32 u, u, {p2 - 4}; "
              if p2 > 4 else "")
    kind = "f16x2" if f16 else "bf16x2"
    tail = (f"sub.rn.{kind} t, t, $5; mul.rn.{kind} $0, t, $7;" if scaled
            else "mov.b32 $0, t;" if biased else f"sub.rn.{kind} $0, t, $5;")
    return (f"{{ .reg .b32 t, u; prmt.b32 t, $1, $2, {sel4}; {shift4}"
            f"lop3.b32 t, t, {0x000F000F}, {magic}, {0xEA}; "
            f"prmt.b32 u, $3, $4, {sel2}; {shift2}"
            f"lop3.b32 t, u, {0x00300030}, t, {0xEA}; {tail} }}")


# The 8 codes' PTX for bf16 and for fp16 operands (Triton's frontend builds no strings).
_NIBBLE_ASM_BF16 = tl.constexpr(tuple(_nibble_pairs_asm(j, False) for j in range(8)))
_NIBBLE_ASM_F16 = tl.constexpr(tuple(_nibble_pairs_asm(j, True) for j in range(8)))
_SIX_ASM_BF16 = tl.constexpr(tuple(_six_pairs_asm(j, False) for j in range(8)))
_SIX_ASM_F16 = tl.constexpr(tuple(_six_pairs_asm(j, True) for j in range(8)))


@triton.jit
def _nibble_pairs(u, zb, j: tl.constexpr, F16: tl.constexpr):
    """Code j (bits 4j of each word of u) minus z, as 16-bit floats, in a few instructions per
    two codes (ASM in :func:`qlinear_mmT_kernel`): PRMT gathers the byte holding code j from
    the two words whose codes become one 32-bit register of the MMA operand, a shift (odd j) and
    one LOP3 turn the two nibbles into the 16-bit floats M + q (M = 128 for bf16, whose unit is 1
    there; 1024 for fp16), and one SUB on the pair takes M + z off (zb: M + z as a 16-bit float
    in both halves, per column). Exact: integers below 2^8 (bf16) and 2^11 (fp16).

    With ``pack=2`` one instance gets two neighbouring elements of a thread's registers. Each
    output is its own word's code, whichever two they are, but both take the first element's
    M + z: right when the two lie in one row of the operand (one output column, one zero
    point), which holds for the MMA operand layouts Triton 3.6 gives this kernel (a register
    pair is two adjacent K of one row); checked bit for bit against the float unpack, with
    random zero points per column, on the H200 for the 8-, 16- and 64-row tiles
    (``test_gpu_asm_unpack_is_the_float_unpack``, ``test_gpu_mmT_against_float64``, s13run6);
    the 32-row tile, whose weight operand is the 16-row tile's (64 columns, 4 warps), was not
    run against a reference with it (its GPU case in that test was added after the run). A layout
    pairing two columns would need the second element's M + z for the high half (one more
    LOP3 a pair)."""
    if F16:
        return tl.inline_asm_elementwise(_NIBBLE_ASM_F16[j], "=r,r,r,r,r", [u, zb],
                                         dtype=tl.float16, is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise(_NIBBLE_ASM_BF16[j], "=r,r,r,r,r", [u, zb],
                                         dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def _six_pairs(u4, u2, zb, j: tl.constexpr, F16: tl.constexpr):
    """6-bit code j minus z as 16-bit floats, two codes at a time (ASM, 6-bit weights): the
    4-bit field as in :func:`_nibble_pairs`, the 2-bit field (bit 2j of u2, the 2-bit plane's
    16-bit part of the same row) gathered by PRMT, shifted to bits 4-5 of each half and merged
    by a second LOP3, so each half is M + q4 + 16 q2 = M + q (q < 64, exact in both formats);
    one SUB takes M + z off. Same register-pair assumption as :func:`_nibble_pairs`."""
    if F16:
        return tl.inline_asm_elementwise(_SIX_ASM_F16[j], "=r,r,r,r,r,r,r", [u4, u2, zb],
                                         dtype=tl.float16, is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise(_SIX_ASM_BF16[j], "=r,r,r,r,r,r,r", [u4, u2, zb],
                                         dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def _magic_pair(v, dt: tl.constexpr):
    """The float32 v (an integer that `dt` holds exactly) as a `dt` in both 16-bit halves of an
    int32: :func:`_nibble_pairs`' M + z."""
    h = v.to(dt).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return h | (h << 16)


@triton.jit
def _x_subtiles(X, k0, offs_m, m_ok, K, stride_xm, stride_xk, ROWS: tl.constexpr,
                DT: tl.constexpr):
    """x's K block at k0 for rows offs_m in dtype DT, as the 8 sub-tiles x_j [16, ROWS] with
    x_j[r, m] = x[m, k0 + 8r + j]: [128, ROWS] -> [16, ROWS, 2, 2, 2] (j = 4a + 2b + c), split
    on c, then b, then a. (Codes are converted before the split: converted after it, each
    sub-tile went to shared memory behind its own barrier, 16 a block against 2.)"""
    offs_k = k0 + tl.arange(0, 128)
    xt = tl.load(X + offs_k[:, None] * stride_xk + offs_m[None, :] * stride_xm,
                 mask=(offs_k < K)[:, None] & m_ok[None, :], other=0.0).to(DT)
    x5 = tl.reshape(tl.permute(tl.reshape(xt, (16, 8, ROWS)), (0, 2, 1)), (16, ROWS, 2, 2, 2))
    xc0, xc1 = tl.split(x5)
    xc0b0, xc0b1 = tl.split(xc0)
    xc1b0, xc1b1 = tl.split(xc1)
    x0, x4 = tl.split(xc0b0)
    x2, x6 = tl.split(xc0b1)
    x1, x5j = tl.split(xc1b0)
    x3, x7 = tl.split(xc1b1)
    return x0, x1, x2, x3, x4, x5j, x6, x7


@triton.jit
def qlinear_mmT_kernel(
    X, XS, QW, S, Z, BIAS, Y, WS, CNT,
    M, N, K, K_PAD, ROW4, ROW2, ROW1, K_PER_SPLIT,
    stride_xm, stride_xk, stride_xsm, stride_ym, stride_yn,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, HAS_BIAS: tl.constexpr,
    REDUCE: tl.constexpr, F32: tl.constexpr, XPERM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr = False,
    XCODES: tl.constexpr = 0, PDL: tl.constexpr = 0,
):
    """One program computes Y[m-block, n-block]^T over one split of K (a multiple of 128):
    acc[BLOCK_N, BLOCK_M] += B_j @ x_j^T for the 8 sub-tiles j of each K block (see the module
    docstring), B_j = q - z (exact in x's dtype), times the scales of groups of 32 or 64 and
    rounded to x's dtype; groups of 128 scale each block's fp32 sum, per-channel scales the
    final one. F32 (fp32 x, or the interpreter) multiplies in fp32. Then + bias (first K split
    only), stored transposed into Y by REDUCE: 0 (one split) directly; 2 the splits' fp32
    partials summed in the launch (tickets, :func:`ticket_split_k`); 1 added atomically to an
    fp32 Y.

    Unpack, per code and plane: one LOP3 and one FFMA (the float trick above
    :func:`_plane_rows`), the zero point taken off in the first (widest) plane's FFMA; each
    further plane adds its field times 2^(its bit offset) (one more FFMA); all exact (integers
    below 2^24). Scales and zero points: one per row r of 8 channels (groups of 32 and 64 change
    along r, never along j) or per column (groups of 128, per channel).

    ASM (4- and 6-bit weights with zero points, groups of 128 or per channel, 16-bit operands,
    compiled for a GPU: :func:`asm_unpack`): the codes become the MMA operand two at a time in
    PTX (:func:`_nibble_pairs`: PRMT, a shift for odd positions, LOP3, SUB, on 16-bit pairs;
    :func:`_six_pairs` adds the 2-bit plane's field with a PRMT, a shift and a LOP3), in place
    of a LOP3 and an FFMA per code and plane and a conversion per two; the same exact ``q - z``.

    XCODES (x holds activation codes: int8, fp8 e4m3 or the integer-valued fp16 of 12-bit
    codes; XS their fp32 scales): 1 one scale per token, 2 one per token and 128 channels
    (column k0 // 128 of XS's rows). The codes and the weight's ``q - z`` are fp16 operands
    (both exact there: |c| <= 2047, e4m3 values, |q - z| < 256), so each block's fp32 sum is of
    exact products; the token scales multiply the finished sums (1) or each block's (2), as
    the weight's groups of 128 do. No rounding of ``c * s`` to 16 bits, which the codes'
    dequantise-then-16-bit-tile route had.

    PDL (launched with programmatic dependent launch; never under the interpreter): the program
    lets the next PDL kernel start, then waits for the kernel before it (``griddepcontrol.wait``)
    before anything else. Triton's pipeliner puts x's and the words' first loads together in the
    prologue, so nothing is loaded ahead of the wait: what PDL hides here is the launch's own
    latency (the programs are resident when the kernel before finishes).

    Traffic: the packed weight once per row block of M (one block for M <= BLOCK_M), x once per
    column block, Y once (REDUCE 2: 4 bytes per output and split to the workspace and back, in
    L2; REDUCE 1: once per split, atomically).
    """
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = (tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_ok = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K_PAD)
    PER_CHANNEL: tl.constexpr = GROUP == 0
    # The group of row r's channels is a function of r alone when the group is < 128: [N, 16]
    # scales (zero points); one per column otherwise: [N, 1].
    ROW_GROUPS: tl.constexpr = GROUP == 32 or GROUP == 64
    # Groups of 128: one group per K block, so its scale multiplies the block's fp32 sum of
    # exact (q - z) * x products (one FMUL per code less than scaling the weight).
    BLOCK_SCALE: tl.constexpr = GROUP == 128
    # Each K block's sum kept apart (then scaled): weight groups of 128, token groups of 128.
    SEPARATE: tl.constexpr = BLOCK_SCALE or XCODES == 2
    # The MMA operands' dtype: x's own, or fp16 for codes: exact for every code format (bf16
    # holds integers only to 256), and the scaled weights of groups of 32/64 round to fp16's 11
    # bits (finer than bf16's 8; an fp16 scale's multiples never underflow, and they overflow
    # only for weights above 65504 in magnitude).
    OPD: tl.constexpr = tl.float16 if XCODES != 0 else X.dtype.element_ty
    r16 = tl.arange(0, 16)
    if PER_CHANNEL:
        s_col = tl.load(S + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if not SYM:
            z_col = tl.load(Z + offs_n, mask=n_ok, other=0).to(tl.float32)

    if ASM:
        F16: tl.constexpr = OPD == tl.float16
        MAGIC: tl.constexpr = 1024.0 if F16 else 128.0
        if SYM:
            zb = _magic_pair(tl.full([BLOCK_N, 1], MAGIC + (1 << (BITS - 1)), tl.float32), OPD)
        elif PER_CHANNEL:
            zb = _magic_pair(MAGIC + z_col[:, None], OPD)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_start, k_end, 128):
        if not XPERM:
            xs = _x_subtiles(X, k0, offs_m, m_ok, K, stride_xm, stride_xk, BLOCK_M, OPD)
        # Scales and zero points, [BLOCK_N, 16] or [BLOCK_N, 1].
        if ROW_GROUPS:
            g = (k0 + 8 * r16) // GROUP
            g_ok = (g < (K_PAD + GROUP - 1) // GROUP)[None, :] & n_ok[:, None]
            s = tl.load(S + g[None, :] * N + offs_n[:, None], mask=g_ok, other=0.0)
            s = s.to(tl.float32)
            if not SYM:
                z = tl.load(Z + g[None, :] * N + offs_n[:, None], mask=g_ok, other=0)
                z = z.to(tl.float32)
        elif not PER_CHANNEL:
            g = k0 // GROUP
            s = tl.load(S + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            if not SYM:
                z = tl.load(Z + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)[:, None]
        else:
            s = s_col[:, None]
            if not SYM:
                z = z_col[:, None]
        if SYM:
            z = tl.full([BLOCK_N, 1], 1 << (BITS - 1), tl.float32)
        elif ASM and not PER_CHANNEL:
            zb = _magic_pair(MAGIC + z, OPD)
        # Each plane's rows, widest first (the packing's order: 8, 4, 2, 1).
        if BITS == 8:
            a_lo, a_hi = _halves(_plane_rows(QW, 0, k0, offs_n, n_ok, K_PAD, N, 8, 0))
            b_lo, b_hi = _halves(_plane_rows(QW, 0, k0, offs_n, n_ok, K_PAD, N, 8, 1))
        if ASM:
            u4 = _plane_rows(QW, ROW4, k0, offs_n, n_ok, K_PAD, N, 4, 0)
            if BITS == 6:
                u2a = _plane_rows(QW, ROW2, k0, offs_n, n_ok, K_PAD, N, 2, 0)
        elif BITS == 4 or BITS == 5 or BITS == 6 or BITS == 7:
            p4_lo, p4_hi = _halves(_plane_rows(QW, ROW4, k0, offs_n, n_ok, K_PAD, N, 4, 0))
        if BITS == 2 or BITS == 3 or (BITS == 6 and not ASM) or BITS == 7:
            u2 = _plane_rows(QW, ROW2, k0, offs_n, n_ok, K_PAD, N, 2, 0)
            p2_lo, p2_hi = _halves(u2)
            if BITS == 6:
                # Positions 0 and 1 moved up 6 bits, for :func:`_field6`.
                p2_up = ((u2 << 6) & 0xFFFF) | 0x4B000000
        if BITS == 3 or BITS == 5 or BITS == 7:
            p1_lo, p1_hi = _halves(_plane_rows(QW, ROW1, k0, offs_n, n_ok, K_PAD, N, 1, 0))
        if SEPARATE:
            blk = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            blk = acc
        for j in tl.static_range(8):
            # d = q - z: z comes off with the first (widest) plane's field.
            if ASM and BITS == 6:
                d = _six_pairs(u4, u2a, zb, j, F16)
            elif ASM:
                d = _nibble_pairs(u4, zb, j, F16)
            elif BITS == 8:
                if j < 4:
                    d = _field(a_lo, a_hi, 8 * j, 8, z)
                else:
                    d = _field(b_lo, b_hi, 8 * (j - 4), 8, z)
            elif BITS == 4:
                d = _field(p4_lo, p4_hi, 4 * j, 4, z)
            elif BITS == 2:
                d = _field(p2_lo, p2_hi, 2 * j, 2, z)
            elif BITS == 3:
                d = _field(p2_lo, p2_hi, 2 * j, 2, z) + 4.0 * _field(p1_lo, p1_hi, j, 1, 0.0)
            elif BITS == 5:
                d = _field(p4_lo, p4_hi, 4 * j, 4, z) + 16.0 * _field(p1_lo, p1_hi, j, 1, 0.0)
            elif BITS == 6:
                if j < 2:
                    d = _field6(p4_lo, p4_hi, p2_up, j, 2 * j + 6, z)
                else:
                    d = _field6(p4_lo, p4_hi, p2_lo, j, 2 * j, z)
            else:
                d = (_field(p4_lo, p4_hi, 4 * j, 4, z)
                     + 16.0 * _field(p2_lo, p2_hi, 2 * j, 2, 0.0)
                     + 64.0 * _field(p1_lo, p1_hi, j, 1, 0.0))
            if ROW_GROUPS:
                d = d * s
            b = d.to(OPD)  # already the operand dtype with ASM
            if XPERM:
                # x permuted per block (:func:`permute_x_blocks`): x_j is 16 contiguous
                # channels, loaded straight into the MMA's shared-memory operand.
                xj = tl.load(X + (k0 + 16 * j + r16)[:, None] * stride_xk
                             + offs_m[None, :] * stride_xm, mask=m_ok[None, :], other=0.0)
            else:
                xj = xs[j]
            xj = xj.to(OPD)  # codes: int8 / e4m3 / fp16 -> fp16, exact
            if F32:
                blk = tl.dot(b.to(tl.float32), xj.to(tl.float32), blk, input_precision="ieee")
            else:
                blk = tl.dot(b, xj, blk)
        if XCODES == 2:
            # The tokens' scales of this block's 128 channels (group k0 // 128 of each row).
            xsb = tl.load(XS + offs_m * stride_xsm + k0 // 128, mask=m_ok, other=0.0)
            if BLOCK_SCALE:
                acc += blk * s * xsb[None, :]
            else:
                acc += blk * xsb[None, :]
        elif BLOCK_SCALE:
            acc += blk * s
        else:
            acc = blk
    if XCODES == 1:
        acc = acc * tl.load(XS + offs_m, mask=m_ok, other=0.0)[None, :]
    if PER_CHANNEL:
        acc = acc * s_col[:, None]
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n, mask=n_ok & (pid_k == 0), other=0.0).to(tl.float32)
        acc = acc + bias[:, None]
    y_offs = offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn
    y_mask = m_ok[None, :] & n_ok[:, None]
    if REDUCE == 1:
        tl.atomic_add(Y + y_offs, acc, mask=y_mask)
    elif REDUCE == 2:
        ticket_split_k(acc, Y, y_offs, y_mask, WS, offs_m[None, :] * N + offs_n[:, None], M * N,
                       CNT, tl.program_id(2) * tl.num_programs(0) + pid_n, pid_k,
                       tl.num_programs(1))
    else:
        tl.store(Y + y_offs, acc.to(Y.dtype.element_ty), mask=y_mask)


@triton.jit
def row_block(BLOCK_M: tl.constexpr, BLOCKS: tl.constexpr, PDL: tl.constexpr):
    """The start of a program over BLOCK_M rows and BLOCKS 128-channel blocks of an [M, K]
    activation (the permutation's and the codes' dequantisation's grid: rows by axis 0,
    channel blocks by axis 1): PDL (launched with programmatic dependent launch) lets the
    kernel after it start at once and waits for the kernel before it; returns the rows, the
    channels, and the rows as int64 [BLOCK_M, 1] for row offsets."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * (BLOCKS * 128) + tl.arange(0, BLOCKS * 128)
    return rows, cols, rows.to(tl.int64)[:, None]


@triton.jit
def xperm_blocks(x, BLOCK_M: tl.constexpr, BLOCKS: tl.constexpr):
    """x [BLOCK_M, BLOCKS * 128] with channel k0 + 8r + j of each 128-channel block moved to
    k0 + 16j + r (the XPERM layout; a [16, 8] transpose per block in registers)."""
    return tl.reshape(tl.permute(tl.reshape(x, [BLOCK_M, BLOCKS, 16, 8]), (0, 1, 3, 2)),
                      [BLOCK_M, BLOCKS * 128])


@triton.jit
def permute_x_kernel(X, Y, XS, M, K, KP, stride_xm, stride_xk, BLOCK_M: tl.constexpr,
                     BLOCKS: tl.constexpr, PDL: tl.constexpr, SUMS: tl.constexpr = False):
    """Y[m, k0 + 16j + r] = X[m, k0 + 8r + j] for every 128-channel block k0 of Y [M, KP] (KP:
    K rounded up to 128; zero past K): a [16, 8] transpose per block, BLOCKS blocks of BLOCK_M
    rows a program. Traffic: reads x once (coalesced rows), writes Y once (coalesced rows); the
    transpose goes through registers and shared memory.

    PDL (launched with programmatic dependent launch; never under the interpreter, which has no
    inline assembly): lets the GEMM launched after it start its prologue at once, and waits for
    the kernel before it to finish before reading x or writing Y.

    SUMS: also XS[b, m] = the fp32 sum of row m's channels in block b (XS [KP / 128, M]), for
    the wg kernel's XSUM."""
    rows, cols, rows64 = row_block(BLOCK_M, BLOCKS, PDL)
    row_ok = (rows < M)[:, None]
    x = tl.load(X + rows64 * stride_xm + cols[None, :] * stride_xk,
                mask=row_ok & (cols < K)[None, :], other=0.0)
    if SUMS:
        sums = tl.sum(tl.reshape(x.to(tl.float32), [BLOCK_M, BLOCKS, 128]), axis=2)
        blocks = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
        tl.store(XS + blocks[None, :] * M + rows[:, None], sums,
                 mask=row_ok & (blocks < KP // 128)[None, :])
    x = xperm_blocks(x, BLOCK_M, BLOCKS)
    tl.store(Y + rows64 * KP + cols[None, :], x, mask=row_ok & (cols < KP)[None, :])


# 8 rows x 4 blocks (8 KB of bf16) a program: a few hundred programs from 128 rows of K 4096.
PERMUTE_BLOCK_M = 8
PERMUTE_BLOCKS = 4


def permute_x_blocks(x: torch.Tensor, pdl: bool = False, sums: bool = False,
                     pad_rows: int = 1):
    """x [M, K] -> [M, K128] (K rounded up to 128, zero padded) with channel ``k0 + 8r + j`` of
    each 128-channel block at position ``k0 + 16j + r``: the kernel's sub-tile x_j is then 16
    contiguous channels (XPERM). On a GPU (and on the CPU under Triton's interpreter)
    :func:`permute_x_kernel`; a torch transpose-copy otherwise (:func:`permute_x_blocks_torch`,
    the reference). The kernel replaces that copy on the GPU, which cost the wg path 3-10 µs a
    call at 64-256 rows (s20run8). `pdl`: launch it with programmatic dependent launch (a GPU
    of sm_90 or later; the kernel launched next must wait for it with ``griddepcontrol.wait``
    before reading the result, as the wg kernel does). `sums`: also return x's fp32 sums per
    row and block, [K128 / 128, M] (:func:`block_sums_torch`). `pad_rows`: the result is the
    first M rows of a buffer of M rounded up to a multiple of it, the rows past M left unwritten
    (the wg tile's X_TMA then copies whole tiles of rows inside the allocation, where a copy
    past the tensor's end would zero-fill them: :func:`qlinear_wgmma.x_descriptor`)."""
    backend = contract.backend_for(x.device)
    if backend == "reference":
        y = permute_x_blocks_torch(x)
        return (y, block_sums_torch(x)) if sums else y
    M, K = x.shape
    kp = contract.cdiv(K, MMT_BLOCK_K) * MMT_BLOCK_K
    y = torch.empty((contract.cdiv(M, pad_rows) * pad_rows, kp), dtype=x.dtype,
                    device=x.device)[:M]
    xs = torch.empty((kp // MMT_BLOCK_K, M), dtype=torch.float32, device=x.device) if sums else y
    if M == 0 or K == 0:
        y.zero_()
        return (y, xs.zero_()) if sums else y
    grid = (contract.cdiv(M, PERMUTE_BLOCK_M), contract.cdiv(kp, PERMUTE_BLOCKS * MMT_BLOCK_K))
    pdl = pdl and backend == "triton"
    contract.launch(permute_x_kernel, grid, (x, y, xs), (M, K, kp, x.stride(0), x.stride(1)),
                    dict(BLOCK_M=PERMUTE_BLOCK_M, BLOCKS=PERMUTE_BLOCKS, PDL=pdl, SUMS=sums),
                    dict(num_warps=4, launch_pdl=pdl), fast=backend == "triton")
    return (y, xs) if sums else y


def block_sums_torch(x: torch.Tensor) -> torch.Tensor:
    """x's sums per row and 128-channel block in float32, [K128 / 128, M] (zero past K)."""
    M, K = x.shape
    kb = contract.cdiv(K, MMT_BLOCK_K)
    xf = torch.nn.functional.pad(x.float(), (0, kb * MMT_BLOCK_K - K))
    return xf.view(M, kb, MMT_BLOCK_K).sum(dim=2).t().contiguous()


def permute_x_blocks_torch(x: torch.Tensor) -> torch.Tensor:
    """:func:`permute_x_blocks` as a torch pad and transpose-copy."""
    M, K = x.shape
    kb = contract.cdiv(K, MMT_BLOCK_K)
    if K % MMT_BLOCK_K:
        x = torch.nn.functional.pad(x, (0, kb * MMT_BLOCK_K - K))
    return block_permuted(x).contiguous().view(M, kb * MMT_BLOCK_K)


def block_permuted(t: torch.Tensor) -> torch.Tensor:
    """A [M, K] tensor (K a multiple of 128) viewed as [M, K / 128, 8, 16] with channel
    ``k0 + 8r + j`` at ``[m, k0 / 128, j, r]``: contiguous in that order, it is the XPERM
    layout of :func:`permute_x_blocks`."""
    M, K = t.shape
    return t.reshape(M, K // MMT_BLOCK_K, 16, 8).transpose(2, 3)


def k_per_split(K: int, split: int) -> int:
    """The K range of one split: a multiple of :data:`MMT_BLOCK_K`."""
    return contract.cdiv(contract.cdiv(P.padded_k(K), MMT_BLOCK_K), split) * MMT_BLOCK_K


# Weight widths the PTX unpack (ASM) takes: 4 (:func:`_nibble_pairs`) and 6 (:func:`_six_pairs`).
ASM_BITS = (4, 6)


def asm_unpack(bits: int, group_size: int, symmetric: bool, x_dtype: torch.dtype,
               interpreter: bool) -> bool:
    """Whether the kernel unpacks the codes in PTX (ASM): 4- and 6-bit weights with zero
    points, groups of 128 or per channel, 16-bit operands, compiled for a GPU (the interpreter
    runs no PTX). The sm_90 compile (``bench/compile_qlinear_sm90.py --mmT``) puts its K loop
    at 0.76-0.87x the instructions of the float unpack for 4-bit weights in groups of 128 (308
    against 389 at 16 rows, 325 against 406 at 32 with x permuted, 330 against 411 at 64; 0.85
    and 0.87 at 32 and 64 rows unpermuted) and 0.71-0.80x per channel (session 13); for 6-bit
    weights 0.68-0.75x (435 against 606 at 16 rows, g128; session 14), with no layout
    conversion. Symmetric weights (a constant M + z) made Triton read the 4-bit operand through
    shared memory, so they keep the float unpack."""
    return (bits in ASM_BITS and not symmetric and group_size in (P.PER_CHANNEL, 128)
            and x_dtype in (torch.bfloat16, torch.float16) and not interpreter)


# The token scales the kernel reads with codes (XCODES): one per token, or per token and 128
# channels (its K block; smaller token groups change within a sub-tile).
PER_TOKEN = -1
CODE_ACT_GROUPS = (PER_TOKEN, MMT_BLOCK_K)


def run(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros, bias, bits: int,
        group_size: int, cfg: dict, interpreter: bool, tickets=None, x_permuted: bool = False,
        K: Optional[int] = None, xscales: Optional[torch.Tensor] = None,
        act_group_size: int = PER_TOKEN, out_dtype: Optional[torch.dtype] = None
        ) -> torch.Tensor:
    """Launch :func:`qlinear_mmT_kernel` with `cfg` (BLOCK_M/N, SPLIT_K, num_warps, num_stages,
    REDUCE: "ticket" (the default: split-K finished in the same launch, `tickets(device, n)`
    giving the int32 ticket counters) or "atomic" (fp32 atomics into a zeroed Y, cast after:
    three kernels), ASM (default True: the PTX unpack where :func:`asm_unpack` allows it; False
    keeps the float unpack), XPERM (x permuted per block; `x_permuted`: it already is, as
    :func:`permute_x_blocks` gives it, and `K` is the weight's), maxnreg (registers per thread,
    on the GPU), PDL (True: x's permutation, if any, and this kernel launched with
    programmatic dependent launch where :func:`contract.pdl_capable`; default False, plain
    stream order: in chains of four dispatched linears it ran 0.988-1.010x, slower in 8 of 9
    cases at 4-32 rows, s23run3, ``bench/bench_decode_pdl.py``); the K block is always
    :data:`MMT_BLOCK_K`, whatever the group).

    `xscales`: x holds activation codes (XCODES) with these fp32 scales, [M] per token or [M, G]
    per token and `act_group_size` (:data:`CODE_ACT_GROUPS`) channels; the output is
    `out_dtype` (required then), else x's dtype."""
    M = x.shape[0]
    if xscales is None:
        xcodes, out_dtype = 0, x.dtype
    elif act_group_size not in CODE_ACT_GROUPS:
        raise ValueError(f"q3n::qlinear: the mmT kernel reads codes with scales per token or per "
                         f"{MMT_BLOCK_K} channels, not per {act_group_size}; dequantise them "
                         f"first")
    elif out_dtype is None:
        raise ValueError("q3n::qlinear: mmT on activation codes needs the output dtype")
    else:
        xcodes = 1 if act_group_size == PER_TOKEN else 2
    if x_permuted:  # x is already permute_x_blocks's [M, K128]; K is the weight's
        if K is None or not bool(cfg.get("XPERM")):
            raise ValueError("q3n::qlinear: a permuted x needs cfg XPERM and the weight's K")
    else:
        K = x.shape[1]
    N = qweight.shape[1]
    split = cfg.get("SPLIT_K", 1)
    xperm = bool(cfg.get("XPERM", False))
    pdl = bool(cfg.get("PDL", False)) and not interpreter and contract.pdl_capable(x.device)
    xk = x if x_permuted or not xperm else permute_x_blocks(x, pdl=pdl)
    grid = (contract.cdiv(N, cfg["BLOCK_N"]), split, contract.cdiv(M, cfg["BLOCK_M"]))
    mode = 0 if split == 1 else (2 if cfg.get("REDUCE", "ticket") == "ticket" else 1)
    if mode == 2 and tickets is None:
        raise ValueError("q3n::qlinear: mmT's ticket split-K needs the ticket counters")
    y = (torch.zeros((M, N), dtype=torch.float32, device=x.device) if mode == 1
         else torch.empty((M, N), dtype=out_dtype, device=x.device))
    if mode == 2:
        ws = torch.empty((split, M, N), dtype=torch.float32, device=x.device)
        cnt = tickets(x.device, grid[0] * grid[2])
    else:
        ws = cnt = y  # unused
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl)
    if cfg.get("maxnreg") and not interpreter:
        options["maxnreg"] = cfg["maxnreg"]  # ptxas's .maxnreg: more programs share an SM
    contract.launch(
        qlinear_mmT_kernel, grid,
        (xk, xscales if xcodes else scales, qweight, scales,
         zeros if zeros is not None else scales, bias if bias is not None else scales, y, ws,
         cnt),
        (M, N, K, P.padded_k(K), *P.plane_starts(bits, K), k_per_split(K, split),
         xk.stride(0), xk.stride(1), xscales.stride(0) if xcodes == 2 else 0,
         y.stride(0), y.stride(1)),
        dict(BITS=bits, GROUP=0 if group_size == P.PER_CHANNEL else group_size,
             SYM=zeros is None, HAS_BIAS=bias is not None, REDUCE=mode, XPERM=xperm,
             # Triton 3.6's interpreter multiplies bf16 tiles as raw bits; fp32 holds them
             # exactly (and every code).
             F32=out_dtype == torch.float32 if xcodes else (
                 x.dtype == torch.float32 or (interpreter and x.dtype == torch.bfloat16)),
             BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], XCODES=xcodes,
             ASM=bool(cfg.get("ASM", True))
             and asm_unpack(bits, group_size, zeros is None,
                      torch.float16 if xcodes else x.dtype, interpreter), PDL=pdl),
        options, fast=not interpreter)
    return y.to(out_dtype) if mode == 1 and out_dtype != torch.float32 else y
