"""``q3n::qlinear``'s "wg" path: the swapped tile of :mod:`qlinear_swap` (``Y^T = W @ X^T``, x
permuted per 128-channel block) written in Gluon (Triton's explicit-layout dialect), so that the
weight's unpack overlaps the tensor cores. 4- and 6-bit weights in groups of 128 (zero points
or symmetric), bf16 or fp16 x, an sm_90 GPU; dispatched from 33 to 256 rows (49 for 4-bit
weights with quantized activations on the 64 x 64 tile; to 512 / 768 for 4-bit weights of at
least 3 * 2^25 / 2^27 entries with 16-bit x, :data:`MAX_M_LARGE`), quantized
activations dequantised and permuted by the op first, to 128 rows where cuBLAS's fp8 GEMM on
unpacked codes takes the call and K exceeds 8192 (:func:`choose`); and at 1-32 rows of large
weights with bf16 x (:func:`choose_decode`, session 24), on tiles of 8, 16 or 32 rows with
SCALE_AFTER (and XSUM at 17-32 rows), below.

Why: in Triton 3.6 the swapped tile's MMA reads the unpacked weight from registers, and Triton
waits for every such MMA to finish before the next instruction (sm_90 SASS of
``qlinear_mmT_kernel``: ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` after each of the 8 ``HGMMA`` of a K
block), so a warpgroup unpacks, then waits, then unpacks: at 96-128 rows that tile ran 0.61-0.73x
bf16 cuBLAS, and dequantise + cuBLAS 0.43-0.67x at 129-256 (bench/RESULTS.md). Here each MMA
is issued asynchronously and the next sub-tile is unpacked while it runs; only the MMA before the
one just issued is waited for (its operand registers are then free).

Math, per K block of 128 channels: the 8 sub-tiles ``B_j = (q - z) * s`` (x's dtype; code j of
each word, :func:`_scaled_pairs`; 6-bit codes add the 2-bit plane's field,
:func:`_six_scaled_pairs`) times x's sub-tile j (16 contiguous channels of x permuted by
:func:`qlinear_swap.permute_x_blocks`), accumulated in fp32 over the whole K range. Rounding:
``q - z`` is exact; for bf16 x the fp16 scale is rounded to bf16 and the product rounded once
more to bf16 (two roundings of the weight, each at most 2^-9 relative); for fp16 x the scale is
exact and the product rounded once. (The mm path rounds the weight once, in fp32 math; the fp32
unpack here was 10-11% slower, s17run7.)

Memory: every operand of a K block (x's two 64-channel halves, the packed words, zero points,
scales) goes to shared memory by ``cp.async``, STAGES - 2 blocks ahead; x as 128-byte-swizzled
rows (a warp copies 4 rows x 128 contiguous bytes) read by the MMA as its second operand; the
words into a swizzled buffer read back in the MMA operand's register layout without bank
conflicts. Loading the words straight into registers two blocks ahead (the first version) made
the warps wait on each load at the loop's register rotation.

Work split: one program a tile, K split by tickets, or stream-K (equal ranges of (tile, K block)
units a program, pieces summed by tickets in program order), which the rule uses where the
128 x 128 tiles make at least a wave: their count is rarely a multiple of the SMs (224 tiles on
132 SMs are 1.7 waves of whole tiles).

Measured (H200, CUDA-graph ms, x bf16; against the paths dispatched before the tile in the same
run; bench/RESULTS.md sessions 17-19): W4A16 1.01-1.50x faster in all 24 cases (49-256 rows,
the issue's four shapes; s17run9), x bf16 cuBLAS 0.85-1.43 at 49-64 rows (s19run8-9), 0.75-1.11
at 96-128 and 0.62-0.86 at 192-256 (s19run3); W6A16 and W6A12 1.10-3.13x faster than mmT and
dequantise + cuBLAS on those shapes (s18run1, s18run4).

Session 19 (s19run1-3, s19run8): x's two halves in separate shared allocations (Triton's hazard
analysis put a CTA barrier between their copies: two barriers a K block now, three before); two
MMA groups left in flight (LOOKAHEAD) on WIDE and TALL; WIDE256, 256 weight columns a tile
(each warpgroup two MMAs of 64 a sub-tile, so x, the most L2 traffic, is read half as often),
and SIXTY_FOUR256, its 64-row form, to 64 rows. Nsight Compute at 256 rows of 28672 x 8192
(s19run2): tensor pipe 55% (WIDE) and 59% (WIDE256) of the elapsed cycles against cuBLAS's 78%,
L2 50% / 33%, issue slots 36% / 31%: latency-bound, not bound by L2 or issue. Unrolling the K
loop by stages (one barrier a block) gained 0.3-2.3% and spilled at WIDE256, so the loop stays
rolled.

Session 22 (s22run1-4): x's permutation and the kernel are launched with programmatic
dependent launch (:func:`with_pdl`; W4A16 1.002-1.08x faster in 24 of 28 cases), and WIDE takes
the grids where TALL's programs exceed the SMs (by stream-K) or K exceeds :data:`MAX_K_TALL`
at 129-256 rows (K split 2): 1.09-1.74x the TALL launches of before.

Session 24 (s24run1-6), the decode tiles: SCALE_AFTER makes the operand q - z (exact: no
multiply by s a code pair, no rounding of the weight) and sums each K block (one group of 128)
in its own accumulator, scaled into the total in fp32 after the block's MMAs retire (one
FFMA an accumulator register a block). XSUM (bf16 x) makes it M + q (M = 128: no subtraction
either) and takes (M + z) times the block's sum of x off in fp32; the sums come from x's
permutation ([K blocks, M] fp32, :func:`permute_x_blocks` with ``sums``) and through the stages
with x. The two sums cancel to within fp32 rounding of about 136 sum |x| (a GPU test runs x
of mean 4 and -300 against float64). sm_90 SASS of the 16 x 256 tile's K loop, bf16 x,
instructions a code: 3.16 with the scale in the unpack and 2.72 with SCALE_AFTER (K split by
tickets); 2.74 with SCALE_AFTER and 2.39 with XSUM (stream-K). At 1-16 rows XSUM timed
0.96-1.07x SCALE_AFTER alone (the tile is not bound by its instruction count there), so the
rule takes it at 17-32 rows only.

Session 36 (s36run1-3), the fp8 form (:func:`run_fp8`; 4-bit weights, groups of 128, e4m3
activation codes per token): the operand is q itself as e4m3 integers (:func:`_fp8_quads_asm`,
5 instructions for 4 codes), on fp8 MMAs (K = 32 a sub-tile, 4 a block) with x's codes in
:func:`fp8_block_order`; SCALE_AFTER and XSUM as above, z times the block's sum of codes taken
off in fp32, the per-token scale applied on the way out. Correct (67 GPU tests against
float64) but **not dispatched**: alone it ran 0.96-1.00x the bf16 form's time on TALL at 256
rows of 4096^2 (0.0268 / 0.0269 ms; 0.81x on 28672 x 8192, 0.2484 / 0.3085) and, with the
quantizer in front (0.006-0.020 ms), 0.69-1.06x the W4A8 op as dispatched at 129-1024 rows
on the four shapes, never above 0.91x bf16 (bench/bench_wg_fp8.py). Nsight Compute at 256 rows
of 4096^2 (TALL, 128 programs, one warpgroup an SM): 1.49 instructions issued a cycle, one
warp a scheduler and 0.39 eligible, top stall a fixed-latency dependency: the tile is bound
by the latency of its one warpgroup's instruction chain, not by the MMA rate that fp8
doubles. 256-column tiles spill in this form (about 500 bytes of stack at WIDE256): it
refuses them.

Session 37 (s37run1-5), x by TMA (``X_TMA``): Nsight Compute's samples by SASS line at 256
rows of 4096^2 (TALL, bench/ncu_sass_top.py) put about 400 instructions a warp a K block in the
bf16 form's loop, some 80 of them x's 16 cp.async a thread and their addresses and masks; the
tensor-memory accelerator copies x's two halves of a block on one thread's word instead
(:func:`x_descriptor`; a barrier a stage, initialised and invalidated per call of the
pipeline). With 5 stages (:data:`TALL_TMA`) the tile ran 1.10-1.12x TALL on 4096^2 and
1.05-1.07x WIDE with K split 2 on 4096 x 12288 at 129-256 rows; dispatched there for 4-bit
weights with zero points and 16-bit activations. Symmetric weights lose (ptxas serialises the
MMAs), and the other shapes, forms and tiles gained nothing (see TALL_TMA).

Session 38 (s38run1-6) timed the op as a whole (1.06-1.14x the launch without TMA at 129-256
rows, s38run1) and took x by TMA wherever the rule gives TALL for weights with zero points
and 16-bit activations: at 65-128 rows with K split 2 and for 6-bit weights too (in place of
WIDE with K split 2 for long K), and :data:`WIDE_TMA` for 4-bit weights where WIDE's tiles do
not make a wave; the op 1.02-1.15x the rule without TMA (s38run4).

Gluon has no interpreter: this kernel runs on sm_90 only; the CPU lane compiles it for sm_90
and executes its PTX unpack in an emulator (tests/kernels/test_qlinear_wgmma.py), the GPU lane
checks it against float64.
"""

from __future__ import annotations

from typing import Optional

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from q3n_compile.kernels import contract
from q3n_compile.kernels import packing as P
from q3n_compile.kernels.qlinear_swap import (MMT_BLOCK_K, _nibble_pairs_asm, _six_pairs_asm,
                                              permute_x_blocks)


def _scaled_pairs_asm(j: int, f16: bool) -> str:
    """PTX for code j of two words ($1, $2: adjacent K of one operand row) as the 16-bit pair
    (q - z) * s: mmT's nibble-pair unpack (:func:`qlinear_swap._nibble_pairs_asm`: PRMT gathers
    the byte holding code j from both words, a shift for odd j and one LOP3 make each half the
    16-bit float M + q, M = 128 for bf16, 1024 for fp16; one SUB takes M + z off, $3, exact),
    then one MUL by s ($5, both halves; one rounding)."""
    return _nibble_pairs_asm(j, f16, scaled=True)


_PAIRS_BF16 = gl.constexpr(tuple(_scaled_pairs_asm(j, False) for j in range(8)))
_PAIRS_F16 = gl.constexpr(tuple(_scaled_pairs_asm(j, True) for j in range(8)))
_SIX_BF16 = gl.constexpr(tuple(_six_pairs_asm(j, False, words=True, scaled=True)
                               for j in range(8)))
_SIX_F16 = gl.constexpr(tuple(_six_pairs_asm(j, True, words=True, scaled=True)
                              for j in range(8)))
# The same without the scale (SCALE_AFTER): q - z, exact.
_CODES_BF16 = gl.constexpr(tuple(_nibble_pairs_asm(j, False) for j in range(8)))
_CODES_F16 = gl.constexpr(tuple(_nibble_pairs_asm(j, True) for j in range(8)))
_SIX_CODES_BF16 = gl.constexpr(tuple(_six_pairs_asm(j, False, words=True) for j in range(8)))
_SIX_CODES_F16 = gl.constexpr(tuple(_six_pairs_asm(j, True, words=True) for j in range(8)))
# And with nothing taken off (bf16 SCALE_AFTER): M + q, exact (M = 128).
_BIASED_BF16 = gl.constexpr(tuple(_nibble_pairs_asm(j, False, biased=True) for j in range(8)))
_SIX_BIASED_BF16 = gl.constexpr(tuple(_six_pairs_asm(j, False, words=True, biased=True)
                                      for j in range(8)))

# e4m3 bytes of the integers 0-7 (FP8_LUT) and 8-15 (FP8_LUT_HI), as PRMT's two 4-byte tables.
FP8_LUT = (0x44403800, 0x4E4C4A48)
FP8_LUT_HI = (0x53525150, 0x57565554)


def _fp8_quads_asm(j: int) -> str:
    """PTX for byte j of two words ($1 = $2 and $3 = $4: adjacent K rows of one operand row) as
    four e4m3 bytes, the codes q (0-15, exact) in order: $1's codes 2j and 2j + 1, then $3's.
    One PRMT gathers the two bytes; their four nibbles are then the selectors of two table
    PRMTs: the first maps 0-7 to their e4m3 bytes (FP8_LUT) and 8-15 to 0 (a selector's bit 3
    replicates the sign of a byte below 0x80), the second, on the nibbles with bit 3 flipped,
    8-15 to theirs (FP8_LUT_HI) and 0-7 to 0; an OR merges them: 5 instructions a 4 codes."""
    sel = j | ((4 + j) << 4)
    return (f"{{ .reg .b32 t, lo, hi; prmt.b32 t, $1, $3, {sel}; "
            f"prmt.b32 lo, {FP8_LUT[0]}, {FP8_LUT[1]}, t; xor.b32 t, t, {0x8888}; "
            f"prmt.b32 hi, {FP8_LUT_HI[0]}, {FP8_LUT_HI[1]}, t; or.b32 $0, lo, hi; }}")


_FP8_QUADS = gl.constexpr(tuple(_fp8_quads_asm(j) for j in range(4)))


@gluon.jit
def _scaled_pairs(w, zb, sb, j: gl.constexpr, F16: gl.constexpr):
    """Code j of the words w as (q - z) * s in x's 16-bit dtype, two codes an instance: each
    pair is two adjacent K of one row of the MMA operand (one column: one z, one s)."""
    if F16:
        return gl.inline_asm_elementwise(_PAIRS_F16[j], "=r,r,r,r,r,r,r", [w, zb, sb],
                                         dtype=gl.float16, is_pure=True, pack=2)
    else:
        return gl.inline_asm_elementwise(_PAIRS_BF16[j], "=r,r,r,r,r,r,r", [w, zb, sb],
                                         dtype=gl.bfloat16, is_pure=True, pack=2)


@gluon.jit
def _six_scaled_pairs(w, w2, zb, sb, j: gl.constexpr, F16: gl.constexpr):
    """6-bit code j as (q - z) * s, two codes an instance: the 4-bit field from w as in
    :func:`_scaled_pairs`, the 2-bit field from w2 (the 2-bit plane's word holding both rows of
    the pair, :func:`qlinear_swap._six_pairs_asm` with ``words``) merged into bits 4-5 of each
    half before z comes off (q < 64: exact in both dtypes)."""
    if F16:
        return gl.inline_asm_elementwise(_SIX_F16[j], "=r,r,r,r,r,r,r,r,r", [w, w2, zb, sb],
                                         dtype=gl.float16, is_pure=True, pack=2)
    else:
        return gl.inline_asm_elementwise(_SIX_BF16[j], "=r,r,r,r,r,r,r,r,r", [w, w2, zb, sb],
                                         dtype=gl.bfloat16, is_pure=True, pack=2)


@gluon.jit
def _code_pairs(w, w2, zb, j: gl.constexpr, F16: gl.constexpr, BITS: gl.constexpr):
    """Code j of the words w (6-bit: and the 2-bit plane's w2) as q - z in x's 16-bit dtype
    (exact), two codes an instance: :func:`_scaled_pairs` / :func:`_six_scaled_pairs` without
    the scale."""
    if BITS == 6:
        asm: gl.constexpr = _SIX_CODES_F16[j] if F16 else _SIX_CODES_BF16[j]
        return gl.inline_asm_elementwise(asm, "=r,r,r,r,r,r,r", [w, w2, zb],
                                         dtype=gl.float16 if F16 else gl.bfloat16,
                                         is_pure=True, pack=2)
    else:
        asm: gl.constexpr = _CODES_F16[j] if F16 else _CODES_BF16[j]
        return gl.inline_asm_elementwise(asm, "=r,r,r,r,r", [w, zb],
                                         dtype=gl.float16 if F16 else gl.bfloat16,
                                         is_pure=True, pack=2)


@gluon.jit
def _biased_pairs(w, w2, j: gl.constexpr, BITS: gl.constexpr):
    """Code j of the words w (6-bit: and the 2-bit plane's w2) as the bf16 M + q (M = 128;
    exact), two codes an instance: one PRMT per two instances, a shift for odd j and one LOP3
    (6-bit: a second PRMT, shift and LOP3 for the 2-bit field)."""
    if BITS == 6:
        return gl.inline_asm_elementwise(_SIX_BIASED_BF16[j], "=r,r,r,r,r", [w, w2],
                                         dtype=gl.bfloat16, is_pure=True, pack=2)
    else:
        return gl.inline_asm_elementwise(_BIASED_BF16[j], "=r,r,r", [w],
                                         dtype=gl.bfloat16, is_pure=True, pack=2)


@gluon.jit
def _pair_bits(v, OPD: gl.constexpr):
    """v (fp32) as OPD in both 16-bit halves of an int32."""
    h = v.to(OPD).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    return h | (h << 16)


@gluon.jit
def _block_mmas(w, w2, zb, sb, x_lo, x_hi, acc, a_1, a_2, a_3, BITS: gl.constexpr,
                F16: gl.constexpr, LOOKAHEAD: gl.constexpr, SCALED: gl.constexpr = True,
                BIASED: gl.constexpr = False):
    """One K block's 8 sub-tiles into acc: sub-tile j's weight operand, (q - z) * s in x's
    dtype from the words w (6-bit: and the 2-bit plane's w2), times x's sub-tile j (16
    channels: columns 16 (j % 4) of x_lo, j < 4, or x_hi, x's two [rows, 64] halves in shared
    memory), each an asynchronous MMA. Only the MMA LOOKAHEAD before the one just issued is
    waited for: its operand's registers may then be reused, and the next sub-tile is unpacked
    while the LOOKAHEAD latest run. a_1 (the last issued), a_2, a_3: the operands of the MMAs
    in flight, kept live until a wait has retired their MMA. Returns (acc, a_1, a_2, a_3).

    Not SCALED: the operand is q - z (sb unused), or M + q where BIASED (bf16 x; zb unused),
    and the block's sum starts afresh in acc (its value on entry is ignored), for the caller to
    scale (SCALE_AFTER of :func:`_tile_sum`) and, BIASED, to take (M + z) sum x off."""
    for j in gl.static_range(8):
        if SCALED:
            if BITS == 6:
                a = _six_scaled_pairs(w, w2, zb, sb, j, F16)
            else:
                a = _scaled_pairs(w, zb, sb, j, F16)
        elif BIASED:
            a = _biased_pairs(w, w2, j, BITS)
        else:
            a = _code_pairs(w, w2, zb, j, F16, BITS)
        if j < 4:
            xj = x_lo.slice(16 * j, 16, 1)
        else:
            xj = x_hi.slice(16 * (j - 4), 16, 1)
        acc = warpgroup_mma(a, xj.permute((1, 0)), acc, use_acc=SCALED or j > 0, is_async=True)
        if LOOKAHEAD == 1:
            acc, a_1 = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_1))
        elif LOOKAHEAD == 2:
            acc, a_2 = warpgroup_mma_wait(num_outstanding=2, deps=(acc, a_2))
            a_2 = a_1
        else:
            acc, a_3 = warpgroup_mma_wait(num_outstanding=3, deps=(acc, a_3))
            a_3 = a_2
            a_2 = a_1
        a_1 = a
    return acc, a_1, a_2, a_3


@gluon.jit
def _block_mmas_fp8(wq, x_blk, acc, LOOKAHEAD: gl.constexpr):
    """One K block's 4 fp8 sub-tiles (32 channels each) into a fresh sum acc (its value on entry
    is ignored): sub-tile j's operand is byte j of each word (codes 2j, 2j + 1) as the e4m3
    integers q (:func:`_fp8_quads_asm`; wq the words joined with themselves, [BLOCK_N, 32] in
    the fp8 operand's layout), times columns 32 j of x's fp8 block (x_blk [rows, 128] in shared
    memory, permuted by :func:`fp8_block_order`). Asynchronous MMAs, LOOKAHEAD in flight, as in
    :func:`_block_mmas`, but the operands are not passed to the waits (Triton 3.6 cannot
    lower 8-bit ``deps``: "Unexpected bitwidth in WGMMAWaitGroupOp"); ptxas keeps a register
    that an MMA in flight reads (its operands are PTX values it allocates itself)."""
    for j in gl.static_range(4):
        a = gl.inline_asm_elementwise(_FP8_QUADS[j], "=r,r,r,r,r", [wq],
                                      dtype=gl.float8e4nv, is_pure=True, pack=4)
        xj = x_blk.slice(32 * j, 32, 1)
        acc = warpgroup_mma(a, xj.permute((1, 0)), acc, use_acc=j > 0, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=LOOKAHEAD, deps=(acc,))
    return acc


@gluon.jit
def _issue_weight_block(w_smem, w2_smem, z_smem, s_smem, st, k0, k_end, w_ptrs, w2_ptrs, w_rows,
                        w_ok, W_ROWS, zs_offs, zs_ok, ss_offs, ss_ok, Z, S, N,
                        SYM: gl.constexpr, BITS: gl.constexpr):
    """cp.async of K block k0's weight operands into stage st (masked off past k_end), not
    committed: the packed words (BITS 6: and the 2-bit plane's, each word row copied twice),
    zero points and scales. They do not depend on an earlier kernel, so the prologue issues
    them before ``gdc_wait``."""
    live = k0 < k_end
    cp.async_copy_global_to_shared(w_smem.index(st), w_ptrs + (k0 // 8) * N,
                                   mask=w_ok & ((k0 // 8 + w_rows < W_ROWS) & live)[:, None])
    if BITS == 6:
        cp.async_copy_global_to_shared(
            w2_smem.index(st), w2_ptrs + (k0 // 16) * N,
            mask=w_ok & ((k0 // 16 + w_rows // 2 < W_ROWS // 2) & live)[:, None])
    g = k0 // 128
    if not SYM:
        cp.async_copy_global_to_shared(z_smem.index(st), Z + g * N + zs_offs,
                                       mask=zs_ok & live)
    cp.async_copy_global_to_shared(s_smem.index(st), S + g * N + ss_offs, mask=ss_ok & live)


@gluon.jit
def _issue_x_block(x_smem, xs_smem, st, k0, k_end, x_ptrs, x_ok, xs_ptrs, xs_ok, M,
                   XSUM: gl.constexpr, x_tma, m0, X_TMA: gl.constexpr):
    """cp.async of K block k0's two halves of x (64 channels each) into stage st, not
    committed; XSUM: and the block's sums of x for the tile's rows (XS [K blocks, M]).
    X_TMA: x by the tensor-memory accelerator instead (x_tma: x's descriptor, block [rows,
    64] (fp8: [rows, 128]), and the stages' barriers; rows past M come as zeros): one thread
    issues the block's copies, where each thread would compute 16 addresses and masks."""
    live = k0 < k_end
    if X_TMA:
        xd, xbar = x_tma
        FP8: gl.constexpr = x_smem[0].dtype == gl.float8e4nv
        bar = xbar.index(st)
        mbarrier.expect(bar, xd.block_type.nbytes * (1 if FP8 else 2), pred=live)
        tma.async_copy_global_to_shared(xd, [m0, k0], bar, x_smem[0].index(st), pred=live)
        if not FP8:
            tma.async_copy_global_to_shared(xd, [m0, k0 + 64], bar, x_smem[1].index(st),
                                            pred=live)
    elif x_smem[0].dtype == gl.float8e4nv:
        # fp8 codes: the block's 128 channels are one 128-byte row (one allocation).
        cp.async_copy_global_to_shared(x_smem[0].index(st), x_ptrs + k0, mask=x_ok & live)
    else:
        cp.async_copy_global_to_shared(x_smem[0].index(st), x_ptrs + k0, mask=x_ok & live)
        cp.async_copy_global_to_shared(x_smem[1].index(st), x_ptrs + (k0 + 64),
                                       mask=x_ok & live)
    if XSUM:
        cp.async_copy_global_to_shared(xs_smem.index(st), xs_ptrs + (k0 // 128) * M,
                                       mask=xs_ok & live)


@gluon.jit
def _issue_block(x_smem, xs_smem, w_smem, w2_smem, z_smem, s_smem, st, k0, k_end, x_ptrs, x_ok,
                 xs_ptrs, xs_ok, M, w_ptrs, w2_ptrs, w_rows, w_ok, W_ROWS, zs_offs, zs_ok,
                 ss_offs, ss_ok, Z, S, N, SYM: gl.constexpr, BITS: gl.constexpr,
                 XSUM: gl.constexpr, x_tma, m0, X_TMA: gl.constexpr):
    """cp.async of K block k0's operands into stage st (masked off past k_end), as one group:
    x's two halves (and sums) and the weight operands (:func:`_issue_weight_block`)."""
    _issue_x_block(x_smem, xs_smem, st, k0, k_end, x_ptrs, x_ok, xs_ptrs, xs_ok, M, XSUM,
                   x_tma, m0, X_TMA)
    _issue_weight_block(w_smem, w2_smem, z_smem, s_smem, st, k0, k_end, w_ptrs, w2_ptrs, w_rows,
                        w_ok, W_ROWS, zs_offs, zs_ok, ss_offs, ss_ok, Z, S, N, SYM, BITS)
    cp.commit_group()


@gluon.jit
def _tile_sum(X, QW, S, Z, XS, x_smem, xs_smem, w_smem, w2_smem, z_smem, s_smem, M, N, K_PAD,
              ROW4, ROW2, stride_xm, m0, n0, k_start, k_end, BITS: gl.constexpr, SYM: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              LOOKAHEAD: gl.constexpr, mma: gl.constexpr, x_bl: gl.constexpr,
              w_bl: gl.constexpr, z_bl: gl.constexpr, s_bl: gl.constexpr, PDL: gl.constexpr,
              SCALE_AFTER: gl.constexpr, XSUM: gl.constexpr, x_tma, X_TMA: gl.constexpr):
    """The fp32 sum [BLOCK_N, BLOCK_M] of the tile at weight column n0 and row m0 of x over
    channels [k_start, k_end) (multiples of 128): the pipeline of :func:`qlinear_wg_kernel`.
    Every stage is free when it is called (the caller's barrier), and every copy and MMA it
    issued is complete when it returns. X_TMA: x's stages are filled by TMA copies, each
    signalling its stage's barrier (x_tma[1]), initialised here for this call's blocks (block
    b in stage b % STAGES, phase (b // STAGES) & 1) and invalidated before it returns."""
    if X_TMA:
        for p in gl.static_range(STAGES):
            mbarrier.init(x_tma[1].index(p), count=1)
        fence_async_shared()
        gl.thread_barrier()  # every thread sees the barriers initialised
    OPD: gl.constexpr = X.dtype.element_ty
    F16: gl.constexpr = OPD == gl.float16
    FP8: gl.constexpr = OPD == gl.float8e4nv
    # The operand's offset M (M + q on the MMA: XSUM); fp8 codes take q itself.
    MAGIC: gl.constexpr = 0.0 if FP8 else 1024.0 if F16 else 128.0
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    rows_l: gl.constexpr = gl.SliceLayout(1, a_l)
    # fp8's operand: 4 adjacent K a register. The words' k_width = 2 layout joined with itself
    # ([BLOCK_N, 16, 2] -> [BLOCK_N, 32], K = 2r + h) is that layout: a thread's word rows
    # {2t, 2t + 1, 8 + 2t, 9 + 2t} become its K {4t..4t + 3, 16 + 4t..19 + 4t}.
    a8_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    # x: row m of a half at k0 is channels k0 + (0..63) of row m0 + m (fp8: the whole block,
    # 128 channels).
    XW: gl.constexpr = 128 if FP8 else 64
    xm = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_bl))
    c = gl.arange(0, XW, layout=gl.SliceLayout(0, x_bl))
    x_ptrs = X + xm.to(gl.int64)[:, None] * stride_xm + c[None, :]
    x_ok = (xm < M)[:, None] & (c < XW)[None, :]
    # The packed words: row r of a stage is word row k0 / 8 + r (channels k0 + 8 r + j), read
    # back as [BLOCK_N, 16] in the MMA operand's layout: element (n, r) holds sub-tile j's
    # K = r of column n in its bits 4 j.
    w_rows = gl.arange(0, 16, layout=gl.SliceLayout(1, w_bl))
    w_cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, w_bl))
    w_ptrs = QW + (ROW4 + w_rows)[:, None] * N + w_cols[None, :]
    w2_ptrs = QW + (ROW2 + w_rows // 2)[:, None] * N + w_cols[None, :]
    w_ok = (w_cols < N)[None, :]
    W_ROWS = K_PAD // 8
    zs_offs = n0 + gl.arange(0, BLOCK_N, layout=z_bl)
    zs_ok = zs_offs < N
    ss_offs = n0 + gl.arange(0, BLOCK_N, layout=s_bl)
    ss_ok = ss_offs < N
    # x's sums (XSUM), [K blocks, M] fp32: this tile's rows of a block, through the stages.
    xs_rows = m0 + gl.arange(0, BLOCK_M, layout=s_bl)
    xs_ptrs = XS + xs_rows
    xs_ok = xs_rows < M

    # The prologue's weight operands first: with PDL they stream in while the kernel before
    # (x's permutation, or the activations' quantizer) finishes. x only after the wait. The
    # first commit takes every weight copy with x's first block: group p still holds all of
    # block p's operands.
    for p in gl.static_range(STAGES - 2):
        _issue_weight_block(w_smem, w2_smem, z_smem, s_smem, p, k_start + p * 128, k_end, w_ptrs,
                            w2_ptrs, w_rows, w_ok, W_ROWS, zs_offs, zs_ok, ss_offs, ss_ok, Z, S,
                            N, SYM, BITS)
    if PDL:
        gdc_wait()
    for p in gl.static_range(STAGES - 2):
        _issue_x_block(x_smem, xs_smem, p, k_start + p * 128, k_end, x_ptrs, x_ok, xs_ptrs,
                       xs_ok, M, XSUM, x_tma, m0, X_TMA)
        cp.commit_group()
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
    part = acc
    # The operands of the MMAs in flight (a_1 the last issued): kept live until a wait has
    # retired their MMA, so that their registers are not reused under it.
    # (fp8: unused, see _block_mmas_fp8)
    a_1 = gl.zeros([BLOCK_N, 16], gl.bfloat16 if FP8 else OPD, layout=a_l)
    a_2 = a_1
    a_3 = a_1
    i = 0
    for k0 in range(k_start, k_end, 128):
        # This thread's copies of block i are in; the compiler puts the CTA barrier after
        # the wait (every thread's are in), the fence makes them visible to the MMA's proxy.
        cp.wait_group(STAGES - 3)
        st = i % STAGES
        if X_TMA:
            mbarrier.wait(x_tma[1].index(st), (i // STAGES) & 1)
        fence_async_shared()
        w = w_smem.index(st).permute((1, 0)).load(a_l)
        if BITS == 6:
            w2 = w2_smem.index(st).permute((1, 0)).load(a_l)
        if XSUM:
            zb = w  # unused
        elif SYM:
            zb = _pair_bits(gl.full([BLOCK_N], MAGIC + (1 << (BITS - 1)), gl.float32,
                                    layout=rows_l), OPD)[:, None]
        else:
            zb = _pair_bits(z_smem.index(st).load(rows_l).to(gl.float32) + MAGIC, OPD)[:, None]
        if BITS != 6:
            w2 = w
        if SCALE_AFTER:
            # The block's sum of (q - z) x in its own accumulator, then scaled in fp32. With
            # x's sums (XSUM) the operand is M + q and (M + z) times the block's sum of x is
            # taken off here: sum (M + q) x - (M + z) sum x, exact products, fp32 sums.
            if FP8:
                wq = gl.convert_layout(gl.reshape(gl.join(w, w), [BLOCK_N, 32]), a8_l)
                part = _block_mmas_fp8(wq, x_smem[0].index(st), part, LOOKAHEAD)
            else:
                part, a_1, a_2, a_3 = _block_mmas(w, w2, zb, zb, x_smem[0].index(st),
                                                  x_smem[1].index(st), part, a_1, a_2, a_3,
                                                  BITS, F16, LOOKAHEAD, False, XSUM)
            s_col = s_smem.index(st).load(gl.SliceLayout(1, mma)).to(gl.float32)
            part, a_1, a_2, a_3 = warpgroup_mma_wait(num_outstanding=0,
                                                     deps=(part, a_1, a_2, a_3))
            if XSUM:
                if SYM:
                    zc = gl.full([BLOCK_N], MAGIC + (1 << (BITS - 1)), gl.float32,
                                 layout=gl.SliceLayout(1, mma))
                else:
                    zc = z_smem.index(st).load(gl.SliceLayout(1, mma)).to(gl.float32) + MAGIC
                xs_row = xs_smem.index(st).load(gl.SliceLayout(0, mma))
                acc = acc + part * s_col[:, None] - (s_col * zc)[:, None] * xs_row[None, :]
            else:
                acc = acc + part * s_col[:, None]
        else:
            sb = _pair_bits(s_smem.index(st).load(rows_l).to(gl.float32), OPD)[:, None]
            acc, a_1, a_2, a_3 = _block_mmas(w, w2, zb, sb, x_smem[0].index(st),
                                             x_smem[1].index(st), acc, a_1, a_2, a_3, BITS,
                                             F16, LOOKAHEAD)
        # Refill the stage read two blocks back (every warp is past those MMAs: each has
        # waited for all but its last LOOKAHEAD (< 8) MMA groups of block i - 1 before the
        # barrier after the wait).
        _issue_block(x_smem, xs_smem, w_smem, w2_smem, z_smem, s_smem,
                     (i + STAGES - 2) % STAGES, k0 + (STAGES - 2) * 128, k_end, x_ptrs, x_ok,
                     xs_ptrs, xs_ok, M, w_ptrs, w2_ptrs, w_rows, w_ok, W_ROWS, zs_offs, zs_ok,
                     ss_offs, ss_ok, Z, S, N, SYM, BITS, XSUM, x_tma, m0, X_TMA)
        i += 1
    acc, a_1, a_2, a_3 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a_1, a_2, a_3))
    cp.wait_group(0)
    if X_TMA:
        # Every copy issued was waited for (blocks past k_end issue none); no thread still
        # waits on a barrier once all are here.
        gl.thread_barrier()
        for p in gl.static_range(STAGES):
            mbarrier.invalidate(x_tma[1].index(p))
    return acc


@gluon.jit
def _store_tile(Y, BIAS, XSC, acc, M, N, stride_ym, m0, n0, HAS_BIAS: gl.constexpr,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, mma: gl.constexpr,
                TOKEN_SCALE: gl.constexpr = False):
    """Y's tile (transposed back: acc[n, m] is y[m0 + m, n0 + n]) = acc (TOKEN_SCALE: times
    x's scale XSC[m], fp32) (+ bias), masked."""
    offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
    n_ok = offs_n < N
    if TOKEN_SCALE:
        acc = acc * gl.load(XSC + offs_m, mask=offs_m < M, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + gl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(gl.float32)[:, None]
    y_offs = offs_m.to(gl.int64)[None, :] * stride_ym + offs_n[:, None]
    gl.store(Y + y_offs, acc.to(Y.dtype.element_ty), mask=(offs_m < M)[None, :] & n_ok[:, None])


@gluon.jit
def _tile_offsets(BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, mma: gl.constexpr):
    """Offsets of a tile's elements in a partial sum's [BLOCK_N, BLOCK_M] slot of WS: constants
    per register (folded into the loads' immediates), so a sum over partials keeps no offset
    registers live (per-output offsets cost 190-255 registers)."""
    n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
    m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
    return n[:, None] * BLOCK_M + m[None, :]


@gluon.jit
def qlinear_wg_kernel(X, QW, S, Z, BIAS, Y, WS, CNT, XS, XSC, XD, M, N, K_PAD, KX, ROW4, ROW2,
                      K_PER_SPLIT,
                      stride_xm, stride_ym, BITS: gl.constexpr, SYM: gl.constexpr,
                      HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      STAGES: gl.constexpr, REDUCE: gl.constexpr, LOOKAHEAD: gl.constexpr,
                      PDL: gl.constexpr, SCALE_AFTER: gl.constexpr = False,
                      XSUM: gl.constexpr = False, X_TMA: gl.constexpr = False):
    """Y = x @ W^T (+ bias) for 4- or 6-bit weights (BITS; 6: the 4-bit plane from row ROW4 and
    the 2-bit plane from ROW2 of QW) in groups of 128, with zero points (Z [K_PAD / 128, N]
    uint8) or symmetric (SYM: z = 2^(BITS-1)), and x (bf16 or fp16) permuted per 128-channel
    block ([M, KX], KX a multiple of 128, zero past K), in tiles of BLOCK_N weight columns (64,
    128 or 256, shared by num_warps / 4 warpgroups, an MMA for each 64 of a warpgroup's) by
    BLOCK_M rows of x (the MMA's N). LOOKAHEAD: the MMA groups (one a sub-tile) left in flight
    while the next sub-tile is unpacked.

    REDUCE 0: program (n-block, 0, m-block) computes and stores its tile. 2: program (n-block,
    split, m-block) its tile over K_PER_SPLIT channels; each split's fp32 partial goes to WS,
    and the last split of a tile to arrive (a ticket in CNT) sums them in split order and
    stores (deterministic), resetting its ticket. 3 (stream-K): the (tile, K block) units,
    tile-major, are cut into num_programs equal ranges; a program computes the tiles' pieces in
    its range, stores a whole tile directly, and hands a piece to WS (slot 0: the first of its
    range, 1: the last) with a ticket; the last of a tile's programs to arrive sums its pieces
    in program order and stores. So every SM has the same share of the work however the tiles
    fall into waves (e.g. 224 tiles on 132 SMs: 1.7 waves of whole tiles).

    The weight operand is (q - z) * s in x's dtype (:func:`_scaled_pairs`), so the MMAs chain
    over the whole K range in one fp32 accumulator, each issued asynchronously while the next
    sub-tile is unpacked; only the MMA before the last one issued is waited for. Every operand
    of a K block (x's two halves, the packed words, zero points, scales) comes by cp.async,
    STAGES - 2 blocks ahead; a stage is refilled once every warp is past the MMAs that read it
    (two blocks back). The words are read back from a swizzled buffer into the MMA operand's
    register layout (conflict-free: a warp's 32 reads hit 8 chunks of 4 words, XOR-ed apart by
    the row). Traffic: the packed weight once per m-block, x once per n-block (from L2), Y once
    (REDUCE 2 and 3: plus 8 bytes an output and piece through L2).

    PDL (launched with programmatic dependent launch): the program may start while the kernel
    before it in the stream (x's permutation, the activations' quantizer) still runs; it issues
    its first blocks' weight operands, then waits for that kernel (``griddepcontrol.wait``)
    before it reads x or writes anything, and lets the next PDL kernel start at once.
    """
    OPD: gl.constexpr = X.dtype.element_ty
    FP8: gl.constexpr = OPD == gl.float8e4nv
    num_warps: gl.constexpr = gl.num_warps()
    gl.static_assert(STAGES >= 3)
    gl.static_assert(BLOCK_N == 64 or BLOCK_N == 128 or BLOCK_N == 256)
    # fp8 codes: SCALE_AFTER and XSUM (q on the MMA, z times the block's sum of x taken off),
    # 4-bit weights (the e4m3 integers 0-15).
    gl.static_assert(not FP8 or (SCALE_AFTER and XSUM and BITS == 4))
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 32 if FP8 else 16])
    # x's K block: two halves [BLOCK_M, 64] (128-byte rows, 128-byte swizzle); sub-tile j (16
    # channels) is columns 16 (j % 4) of half j // 4 (x_smem[j // 4]), the MMA's K-major
    # second operand. A warp copies 4 rows x 128 contiguous bytes (4 global lines, 512
    # unconflicted shared bytes; 16 rows x 32 bytes a warp, as first written, cost 16 shared
    # wavefronts an instruction).
    # fp8 codes: the block's 128 channels as one 128-byte row, a warp copying 4 rows of 128
    # bytes alike.
    x_sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128,
                                              element_bitwidth=8 if FP8 else 16, rank=2)
    x_bl: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 16 if FP8 else 8],
                                          threads_per_warp=[4, 8],
                                          warps_per_cta=[num_warps, 1], order=[1, 0])
    w_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0])
    w_bl: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4],
                                          threads_per_warp=[2 if BLOCK_N == 64 else 1,
                                                            16 if BLOCK_N == 64 else 32],
                                          warps_per_cta=[num_warps, 1], order=[1, 0])
    v_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    z_bl: gl.constexpr = gl.BlockedLayout(size_per_thread=[4], threads_per_warp=[32],
                                          warps_per_cta=[num_warps], order=[0])
    s_bl: gl.constexpr = gl.BlockedLayout(size_per_thread=[2], threads_per_warp=[32],
                                          warps_per_cta=[num_warps], order=[0])
    # The halves in two allocations: Triton's shared-memory hazard analysis cannot tell the
    # buffers of one allocation apart under a dynamic index, and put a CTA barrier between
    # the two halves' copies when they shared one (sm_90 SASS: 3 barriers a K block, now 2).
    if FP8:
        x_one = gl.allocate_shared_memory(OPD, [STAGES, BLOCK_M, 128], x_sl)
        x_smem = (x_one, x_one)
    else:
        x_smem = (gl.allocate_shared_memory(OPD, [STAGES, BLOCK_M, 64], x_sl),
                  gl.allocate_shared_memory(OPD, [STAGES, BLOCK_M, 64], x_sl))
    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, 16, BLOCK_N], w_sl)
    if BITS == 6:
        # The 2-bit plane's 8 word rows of a block, each copied to two rows (2r, 2r + 1), so
        # that it reads back in the 4-bit words' layout: the MMA operand's register pairs are
        # two adjacent K rows, whose 2-bit fields are the two halves of one word.
        w2_smem = gl.allocate_shared_memory(gl.int32, [STAGES, 16, BLOCK_N], w_sl)
    else:
        w2_smem = w_smem  # unused
    z_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N], v_sl)
    s_smem = gl.allocate_shared_memory(S.dtype.element_ty, [STAGES, BLOCK_N], v_sl)
    if XSUM:
        xs_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], v_sl)
    else:
        xs_smem = s_smem  # unused
    if X_TMA:
        x_tma = (XD, gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout()))
    else:
        x_tma = (XD, XD)  # unused

    if PDL:
        # Let the next kernel (launched with PDL) start its own prologue as early as it can.
        gdc_launch_dependents()
    TILE: gl.constexpr = BLOCK_N * BLOCK_M
    if REDUCE == 3:
        tiles_n = gl.cdiv(N, BLOCK_N)
        kb = gl.cdiv(KX, 128)
        units = tiles_n * gl.cdiv(M, BLOCK_M) * kb
        p = gl.program_id(0)
        P = gl.num_programs(0)  # at most `units`: every range holds a unit
        u0 = p * units // P
        u1 = (p + 1) * units // P
        u = u0
        while u < u1:
            t = u // kb
            kb0 = u - t * kb
            kb1 = gl.minimum(kb, kb0 + (u1 - u))
            pid_m = t // tiles_n
            m0 = pid_m * BLOCK_M
            n0 = (t - pid_m * tiles_n) * BLOCK_N
            gl.thread_barrier()  # every warp is done with the stages before they are refilled
            acc = _tile_sum(X, QW, S, Z, XS, x_smem, xs_smem, w_smem, w2_smem, z_smem, s_smem,
                            M, N, K_PAD, ROW4, ROW2, stride_xm, m0, n0, kb0 * 128, kb1 * 128,
                            BITS, SYM, BLOCK_M, BLOCK_N, STAGES, LOOKAHEAD, mma, x_bl, w_bl,
                            z_bl, s_bl, PDL, SCALE_AFTER, XSUM, x_tma, X_TMA)
            if kb1 - kb0 == kb:
                _store_tile(Y, BIAS, XSC, acc, M, N, stride_ym, m0, n0, HAS_BIAS, BLOCK_M,
                            BLOCK_N, mma, FP8)
            else:
                t_offs = _tile_offsets(BLOCK_M, BLOCK_N, mma)
                slot = (u != u0).to(gl.int32)
                gl.store(WS + (p * 2 + slot).to(gl.int64) * TILE + t_offs, acc)
                gl.thread_barrier()  # every thread's piece is written before the ticket
                cnt = CNT + t
                ticket = gl.atomic_add(cnt, 1, sem="acq_rel")
                # The programs whose ranges hold the tile's first and last units: the owner
                # of unit v is the largest q with q * units // P <= v.
                q0 = ((t * kb + 1) * P - 1) // units
                q1 = ((t + 1) * kb * P - 1) // units
                if ticket == q1 - q0:
                    total = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
                    for q in range(q0, q1 + 1):
                        # q's piece is its slot 0 if its range starts in this tile, else 1
                        qslot = ((q * units // P) // kb != t).to(gl.int32)
                        total += gl.load(WS + (q * 2 + qslot).to(gl.int64) * TILE + t_offs,
                                         cache_modifier=".cg")
                    _store_tile(Y, BIAS, XSC, total, M, N, stride_ym, m0, n0, HAS_BIAS,
                                BLOCK_M, BLOCK_N, mma, FP8)
                    gl.atomic_xchg(cnt, 0)
            u += kb1 - kb0
    else:
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        pid_m = gl.program_id(2)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        k_start = pid_k * K_PER_SPLIT
        acc = _tile_sum(X, QW, S, Z, XS, x_smem, xs_smem, w_smem, w2_smem, z_smem, s_smem, M, N,
                        K_PAD, ROW4, ROW2, stride_xm, m0, n0, k_start,
                        gl.minimum(k_start + K_PER_SPLIT, KX), BITS, SYM, BLOCK_M, BLOCK_N,
                        STAGES, LOOKAHEAD, mma, x_bl, w_bl, z_bl, s_bl, PDL, SCALE_AFTER, XSUM,
                        x_tma, X_TMA)
        if REDUCE == 2:
            # WS holds [split, tile, BLOCK_N, BLOCK_M] partials.
            t_offs = _tile_offsets(BLOCK_M, BLOCK_N, mma)
            tiles = gl.num_programs(0) * gl.num_programs(2)
            tile = pid_m * gl.num_programs(0) + pid_n
            gl.store(WS + (pid_k * tiles + tile).to(gl.int64) * TILE + t_offs, acc)
            gl.thread_barrier()  # every thread's partial is written before the ticket is taken
            cnt = CNT + tile
            ticket = gl.atomic_add(cnt, 1, sem="acq_rel")
            if ticket == gl.num_programs(1) - 1:
                total = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
                for sp in range(0, gl.num_programs(1)):
                    # .cg: from L2, never a line this SM's L1 kept from an earlier call
                    total += gl.load(WS + (sp * tiles + tile).to(gl.int64) * TILE + t_offs,
                                     cache_modifier=".cg")
                _store_tile(Y, BIAS, XSC, total, M, N, stride_ym, m0, n0, HAS_BIAS, BLOCK_M,
                            BLOCK_N, mma, FP8)
                gl.atomic_xchg(cnt, 0)
        else:
            _store_tile(Y, BIAS, XSC, acc, M, N, stride_ym, m0, n0, HAS_BIAS, BLOCK_M, BLOCK_N,
                        mma, FP8)


def run(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
        zeros: Optional[torch.Tensor], bias, K: int, cfg: dict, tickets=None,
        x_permuted: bool = False, bits: int = 4,
        out: Optional[torch.Tensor] = None, x_pdl: bool = False) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for 4- or 6-bit weights in groups of 128 (``qweight`` the packing's
    planes [K_PAD * bits / 32, N] int32, ``scales`` fp16 and ``zeros`` uint8 or None
    (symmetric) [K_PAD / 128, N]), x [M, K] bf16 or fp16 (or already
    :func:`permute_x_blocks`'s [M, K128] with `x_permuted`). cfg: BLOCK_M, BLOCK_N, STAGES,
    num_warps, and SPLIT_K (K split into that many programs a tile) or STREAM (stream-K over
    that many programs, at most one per (tile, K block)); both need `tickets(device, n)` (int32
    counters, zero between calls: :func:`q3n_compile.kernels.qlinear._tickets`); PDL (default
    True; ignored with `x_permuted` and where :func:`contract.pdl_capable` says no): x's
    permutation and this kernel launched with programmatic dependent launch, so that each
    overlaps the start of the next (False: plain stream order, as before session 22);
    SCALE_AFTER (q - z on the MMA, each K block's sum scaled in fp32) and with it XSUM (bf16
    x, permuted here: the operand M + q, and (M + z) times the block's sum of x, which x's
    permutation also gives, taken off in fp32). `out`: an [M, N] tensor of x's dtype with
    unit column stride (rows of a larger output) that the tiles write y into. `x_pdl`: the
    permuted x comes from a kernel launched with PDL just before this one in the stream
    (:func:`q3n_compile.kernels.act_dequant.dequantize_codes`), so this launch takes PDL as
    behind its own permutation."""
    # PDL only behind this op's own permutation (see with_pdl) or a PDL kernel that made x, and
    # not while Inductor launches its own kernels with PDL (contract.inductor_pdl).
    pdl = (bool(cfg.get("PDL", True)) and (not x_permuted or x_pdl)
           and contract.pdl_capable(x.device))
    xsum = bool(cfg.get("XSUM", False))
    if xsum and (x_permuted or x.dtype != torch.bfloat16 or not cfg.get("SCALE_AFTER")):
        raise ValueError("q3n::qlinear: the wg path's XSUM takes bf16 x that it permutes "
                         "itself, with SCALE_AFTER; launch without XSUM")
    pad = cfg["BLOCK_M"] if cfg.get("X_TMA") else 1
    if xsum:
        xk, xs = permute_x_blocks(x, pdl=pdl, sums=True, pad_rows=pad)
    else:
        xk = x if x_permuted else permute_x_blocks(x, pdl=pdl, pad_rows=pad)
        xs = scales  # unused
    return _launch_tiles(xk, xs, None, qweight, scales, zeros, bias, K, cfg, tickets, pdl, bits,
                         xsum, x.dtype, out)


def run_fp8(codes: torch.Tensor, sums: torch.Tensor, xscale: torch.Tensor,
            qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], bias,
            K: int, cfg: dict, tickets=None, out_dtype: torch.dtype = torch.bfloat16,
            pdl: bool = False) -> torch.Tensor:
    """``(c * s_x) @ W^T (+ bias)`` for 4-bit weights in groups of 128 on fp8 tensor cores:
    `codes` the activations' e4m3 codes in :func:`fp8_block_order` ([M, K128]), `sums` their
    fp32 sums per block ([K128 / 128, M]), `xscale` the per-token scales (fp32 [M]). The
    operand is q (e4m3 integers 0-15, exact); each K block's sum is scaled by s in fp32 and z
    times the block's sum of codes taken off (SCALE_AFTER and XSUM: Hopper's fp8 MMA adds into
    its accumulator with fewer than fp32's bits, so a block of 128 channels is the most it
    sums before fp32 takes over); s_x multiplies the tile on its way out. `pdl`: the kernel
    before it (the activations' quantizer) was launched with PDL. cfg as for :func:`run`."""
    if codes.dtype != torch.float8_e4m3fn or codes.shape[1] % MMT_BLOCK_K:
        raise ValueError("q3n::qlinear: the wg path's fp8 form takes e4m3 codes in "
                         "fp8_block_order ([M, K rounded up to 128])")
    if cfg["BLOCK_N"] > 128:
        # 256 weight columns spill in this form (about 500 bytes of stack at WIDE256).
        raise ValueError(f"q3n::qlinear: the wg path's fp8 form takes tiles of at most 128 "
                         f"weight columns, not {cfg['BLOCK_N']} (WIDE, TALL, SMALL, "
                         f"SIXTY_FOUR)")
    cfg = dict(cfg, SCALE_AFTER=True)
    return _launch_tiles(codes, sums, xscale, qweight, scales, zeros, bias, K, cfg, tickets,
                         pdl and contract.pdl_capable(codes.device), 4, True, out_dtype)


def fp8_block_order(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes [M, K] -> (codes [M, K128] (K rounded up to 128, zero padded) with channel
    ``k0 + 8r + 2j + h`` of each 128-channel block at ``k0 + 32j + 2r + h``, their fp32 sums
    per row and block [K128 / 128, M]): the fp8 form's x, whose sub-tile j (32 channels) is
    then codes 2j and 2j + 1 of each packed word row r, the order :func:`_fp8_quads_asm`
    unpacks. A torch reference of what the activations' quantizer stores (tests, benches)."""
    M, K = codes.shape
    kb = contract.cdiv(K, MMT_BLOCK_K)
    raw = codes.view(torch.uint8) if codes.dtype == torch.float8_e4m3fn else codes
    raw = torch.nn.functional.pad(raw, (0, kb * MMT_BLOCK_K - K))
    out = raw.view(M, kb, 16, 4, 2).permute(0, 1, 3, 2, 4).contiguous().view(M, kb * MMT_BLOCK_K)
    if codes.dtype == torch.float8_e4m3fn:
        out = out.view(torch.float8_e4m3fn)
    sums = torch.nn.functional.pad(codes.float(), (0, kb * MMT_BLOCK_K - K))
    return out, sums.view(M, kb, MMT_BLOCK_K).sum(dim=2).t().contiguous()


def tma_ready(xk: torch.Tensor) -> bool:
    """Whether x in block order can be copied by TMA: contiguous rows, 16-byte row stride and
    base (what a tensor map needs); the launch copies it by cp.async otherwise."""
    return (xk.stride(1) == 1 and (xk.stride(0) * xk.element_size()) % 16 == 0
            and xk.data_ptr() % 16 == 0)


def x_descriptor(xk: torch.Tensor, block_m: int):
    """x's tensor map for X_TMA: blocks of [block_m rows, 128 bytes] (64 bf16 / fp16 channels,
    a half of a K block; 128 fp8 codes, a whole one), in the 128-byte swizzle the kernel's x
    stages have (``x_sl``). Where xk's storage holds its rows rounded up to block_m
    (:func:`permute_x_blocks` with ``pad_rows``), the map covers them: a copy that runs past
    the map's rows fills them with zeros, which ran the 129-row bf16 tile 1.7x slower (s37run3);
    rows past M only reach output rows the kernel does not store."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    rows = contract.cdiv(xk.shape[0], block_m) * block_m
    held = (xk.untyped_storage().nbytes() // xk.element_size() - xk.storage_offset())
    if rows > xk.shape[0] and held >= (rows - 1) * xk.stride(0) + xk.shape[1]:
        xk = xk.as_strided((rows, xk.shape[1]), xk.stride())
    fp8 = xk.dtype == torch.float8_e4m3fn
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8 if fp8 else 16,
                                  rank=2)
    return TensorDescriptor.from_tensor(xk, [block_m, 128 if fp8 else 64], layout)


def _launch_tiles(xk, xs, xsc, qweight, scales, zeros, bias, K: int, cfg: dict, tickets,
                  pdl: bool, bits: int, xsum: bool, out_dtype: torch.dtype,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The wg kernel's launch on x already in its block order (xk [M, K128]); xs: its block
    sums (XSUM), xsc: its per-token scales (fp8 codes); `out`: where y goes (:func:`run`)."""
    M = xk.shape[0]
    N = qweight.shape[1]
    kx = xk.shape[1]
    split = cfg.get("SPLIT_K", 1)
    kps = contract.cdiv(contract.cdiv(kx, MMT_BLOCK_K), split) * MMT_BLOCK_K
    tiles_n, tiles_m = contract.cdiv(N, cfg["BLOCK_N"]), contract.cdiv(M, cfg["BLOCK_M"])
    tile_elems = cfg["BLOCK_N"] * cfg["BLOCK_M"]
    x = xk
    if out is None:
        y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    elif out.shape != (M, N) or out.dtype != out_dtype or out.stride(1) != 1:
        raise ValueError(f"q3n::qlinear: the wg path's out must be [{M}, {N}] {out_dtype} with "
                         f"unit column stride, got {list(out.shape)} {out.dtype} stride "
                         f"{out.stride()}")
    else:
        y = out
    stream = cfg.get("STREAM", 0)
    if (stream or split > 1) and tickets is None:
        raise ValueError("q3n::qlinear: the wg path's K split needs the ticket counters")
    if stream:
        programs = min(stream, tiles_n * tiles_m * contract.cdiv(kx, MMT_BLOCK_K))
        grid, reduce = (programs, 1, 1), 3
        ws = torch.empty((programs, 2, tile_elems), dtype=torch.float32, device=x.device)
        cnt = tickets(x.device, tiles_n * tiles_m)
    elif split > 1:
        grid, reduce = (tiles_n, split, tiles_m), 2
        ws = torch.empty((split, tiles_n * tiles_m, tile_elems), dtype=torch.float32,
                         device=x.device)
        cnt = tickets(x.device, tiles_n * tiles_m)
    else:
        grid, reduce = (tiles_n, 1, tiles_m), 0
        ws = cnt = y  # unused
    x_tma = bool(cfg.get("X_TMA")) and tma_ready(xk)
    contract.launch(
        qlinear_wg_kernel, grid,
        (xk, qweight, scales, zeros if zeros is not None else scales,
         bias if bias is not None else scales, y, ws, cnt, xs, xsc if xsc is not None else xs,
         x_descriptor(xk, cfg["BLOCK_M"]) if x_tma else xk),
        (M, N, P.padded_k(K), kx, *P.plane_starts(bits, K)[:2], kps, xk.stride(0), y.stride(0)),
        dict(BITS=bits, SYM=zeros is None, HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"],
             BLOCK_N=cfg["BLOCK_N"], STAGES=cfg["STAGES"], REDUCE=reduce,
             LOOKAHEAD=cfg.get("LOOKAHEAD", 1), PDL=pdl,
             SCALE_AFTER=cfg.get("SCALE_AFTER", False), XSUM=xsum, X_TMA=x_tma),
        dict(num_warps=cfg["num_warps"], launch_pdl=pdl), fast=True)
    return y


# The launches the dispatch uses (s17run8, W4A16 g128 at 49-256 rows on the four shapes of
# bench_qlinear_wgmma.py, CUDA-graph ms, every launch checked against float64): WIDE (128 x
# 128, 8 warps, one program an SM: 165 KB of shared memory) where its tiles make most of a wave,
# SIXTY_FOUR (64 rows x 128 columns) at 49-64 rows of such weights; for weights with few
# columns TALL (128 rows x 64 columns, 4 warps) with K split 2 to 128 rows, unsplit above, and
# SMALL (64 x 64, 4 warps, two programs an SM) with K split 4 at 49-64 rows. 6-bit weights
# (s18run1, W6A16 and W6A12 g128, the same 24 cases): the same rule's launch was the best tile
# swept or within 2.5% of it in all 48.
# Session 19 (s19run1-2): two MMA groups left in flight (LOOKAHEAD 2) ran 0-2.8% faster than
# one on WIDE and 0-1.6% on TALL (not measured on SMALL and SIXTY_FOUR, which keep one);
# WIDE256 (256 weight columns, each warpgroup two MMAs of 64 a sub-tile, so x is read from L2
# half as often) where its own tiles fill WAVE_FILL of the SMs from 65 rows, 4-bit weights
# (6-bit ones need 265 KB of shared memory at 4 stages): 28672 x 8192 at 128 rows 0.1220 ms
# against WIDE by stream-K's 0.1340 (bf16 0.1316), at 256 rows by stream-K 0.2329 against
# 0.2477 (bf16 0.1931); 12288 x 4096 at 256 rows 0.0681 against 0.0715 (bf16 0.0413). Where its
# tiles are fewer it lost (4096 columns: 0.0534 against 0.0384 at 256 rows).
WIDE = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, STAGES=4, LOOKAHEAD=2)
WIDE256 = dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, STAGES=4, LOOKAHEAD=2)
TALL = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, STAGES=4, LOOKAHEAD=2)
SMALL = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, STAGES=4, LOOKAHEAD=1)
SIXTY_FOUR = dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, STAGES=4, LOOKAHEAD=1)
# 64 x 256 to 64 rows where its tiles fill WAVE_FILL of the SMs (s19run8, 4-bit: 28672 x 8192
# at 49 / 64 rows 0.0868 / 0.0912 ms against SIXTY_FOUR's 0.0922 / 0.0949, bf16 0.127-0.128;
# on 12288 columns, 48 tiles, it lost: 0.0483 against 0.0341). LOOKAHEAD 2 as measured there;
# on SIXTY_FOUR 2 lost 3-4% to 1.
SIXTY_FOUR256 = dict(BLOCK_M=64, BLOCK_N=256, num_warps=8, STAGES=4, LOOKAHEAD=2)
# TALL with x copied by TMA (X_TMA) and 5 stages: 4-bit weights and 16-bit activations at
# 129-256 rows (s37run4, the kernel alone on x in block order, CUDA-graph ms, same process):
# 4096^2 0.0240-0.0243 against the rule's TALL 0.0267-0.0271 (1.10-1.12x) at 129 / 160 / 192 /
# 256 rows, 4096 x 12288 0.0569-0.0574 against WIDE with K split 2's 0.0599-0.0611
# (1.05-1.07x); TMA alone (4 stages) ran 0.97-1.01x and 5 stages alone 1.01-1.06x. Where x
# would be copied past its rows the zero fill ran 1.7x slower (s37run3, 129 rows): the op's
# permutation allocates whole tiles of rows (:func:`x_descriptor`). Not taken on 12288 x 4096
# (1.00x WIDE by stream-K) nor 28672 x 8192 (0.83-0.88x), nor for quantized activations (the
# fp8 and int8 quantizers' dequantised x is not padded; the fp8 form on TMA ran 1.03x), nor for
# symmetric weights: with X_TMA ptxas serialises their MMAs (sm_90 SASS: every wait in the
# loop "all done", 0x0, where the zero-point form keeps LOOKAHEAD's 0x2; not found why), and
# they ran 0.75-0.85x (s37run5: 4096^2 0.0313-0.0316 against TALL's 0.0261-0.0269 ms;
# 4096 x 12288 0.0798-0.0801 against WIDE with K split 2's 0.0599-0.0612).
# Session 38 (s38run3, same measure) took it to 65-128 rows (K split 2) and to 6-bit weights.
# 4-bit at 65 / 96 / 128 rows: 4096^2 0.0207-0.0215 against TALL's 0.0212-0.0226 (1.02-1.05x),
# 4096 x 12288 0.0374-0.0382 against 0.0411-0.0434 (1.10-1.14x); 6-bit: 4096^2 at 96 / 129 /
# 192 / 256 rows 0.0222 / 0.0263 / 0.0263 / 0.0265 against TALL's 0.0236 / 0.0295-0.0296
# (1.06-1.12x), 4096 x 12288 at 96 rows 0.0411 against 0.0468, and at 129-256 rows (where
# the rule gave WIDE with K split 2, which runs out of shared memory at 5 stages with 6-bit
# weights) 0.0635-0.0639 against 0.0687-0.0705 (1.08-1.10x). TMA alone (4 stages) ran 0.94-1.06x,
# 5 stages alone 0.98-1.04x. The op as dispatched: 1.02-1.15x the rule without TMA (s38run4).
TALL_TMA = dict(TALL, STAGES=5, X_TMA=True)
# WIDE so, for 4-bit weights where WIDE's tiles fill WAVE_FILL but not a wave of the SMs
# (s38run3, 12288 x 4096 at 65 / 96 / 128 rows: 0.0356 / 0.0363 / 0.0372 against WIDE's
# 0.0367 / 0.0378 / 0.0391, 1.03-1.05x; 6-bit weights run out of shared memory at 5 stages).
WIDE_TMA = dict(WIDE, STAGES=5, X_TMA=True)
DISPATCH_TILES = (WIDE, WIDE256, TALL, SMALL, SIXTY_FOUR, SIXTY_FOUR256)
# The rows this path takes (not measured outside them: mmT below, dequantise + cuBLAS above).
# Where cuBLAS's fp8 or int8 GEMM on unpacked codes computes the call (cublas8: 8-bit
# activations, 4-bit weights): the tile beat mm8 and cublas8 in all 8 cases of s17run11 (fp8,
# 1.02-1.24x) to 128 rows; at 192-256 rows with this session's tiles (s19run4, fp8, the rule's
# tile against cublas8) 1.09-1.26x on K = 4096-8192, but on 4096 x 12288 0.91x at 192 rows
# (1.05x at 256), so for K above MAX_K_CUBLAS8 only to 128 rows, and again from
# MIN_M_CUBLAS8_LONG_K: s25run3 (fp8, WIDE with K split 2 as the rule gives, against cublas8 as
# dispatched, same run) 4096 x 12288 and 4096 x 14336 at 160 / 192 / 256 rows 0.96-0.97x /
# 0.99-1.00x / 1.15-1.17x (0.0716 against 0.0824 ms, 0.0798 against 0.0937 at 256; only these
# two shapes measured). Other quantized activations
# (dequantised to x's dtype and permuted first) to 256: W6A12 at 192-256 rows ran 1.27-1.47x
# faster than dequantise + cuBLAS (s18run1, forced tiles).
# From 33 rows (49 before session 21): s21run3 (bench_qlinear_wgmma.py --ms 33 40 48, the rule's
# tiles against mmT's 64-row tile, the dispatch of before, same run) W4A16 1.01-1.21x faster
# in 12 of 12 cases, W6A16 1.16-1.56x in 12 of 12; W4A8 (fp8 codes dequantised first, as
# for mmT) 1.03-1.14x where the rule gives 64 x 128 or 64 x 256 tiles (6 of 6), but on SMALL
# (4096 columns) 0.94 / 0.96 / 1.00x at 33 / 40 / 48 rows of 4096^2 and 1.01-1.08x on 4096 x
# 12288, so 4-bit weights with quantized activations take SMALL from MIN_M_SMALL_W4_QUANTIZED
# rows only. W6A12 on SMALL (s21run5) 1.20-1.52x mmT at 33-48 rows of 4096^2, 4096 x 12288 and
# 1024 x 4096. 32 rows and fewer keep mmT's 32-row tile (x on the MMA's N side needs no
# 64-row padding there).
MIN_M, MIN_M_SMALL_W4_QUANTIZED, MAX_M, MAX_M_CUBLAS8, MAX_K_CUBLAS8 = 33, 49, 256, 128, 8192
# Above 256 rows the op writes the weight out whole for cuBLAS (dequantise + cuBLAS, cublas8).
# For large 4-bit weights with 16-bit activations the tile stays the faster: (entries at least,
# rows at most) in MAX_M_LARGE, the first that holds. bench/bench_wg_above_256.py, the tile
# forced against the dequant path in the same process at 384 / 512 / 768 / 1024 rows:
# 28672 x 8192 1.25 / 1.12 / 1.06 / 0.99x (s28run3; s28run5 1.23 / 1.13 / 1.07 / 1.02x),
# 16384 x 8192 (2^27 entries) 1.16 / 1.07 / 0.98 / 0.94x, 14336 x 8192 (117M) 1.14 / 1.12 /
# 0.97 / 0.93x (s28run5, both forced); as dispatched at 300 / 384 / 512 rows (s28run6), 14336 x 8192 1.05 /
# 1.12 / 1.12x and 28672 x 4096 (117M) 1.07 / 1.17 / 1.04x, but 8192^2 (67M) 0.89 / 1.03 /
# 1.12x, hence the second tier's 3 * 2^25 (101M) entries. The issue's 50.3M-entry weights ran
# 0.83-0.98x and 4096^2 0.79-0.98x at 384-1024 rows, W6A12 0.69-1.06x and W4A8 0.69-1.05x the
# paths dispatched there (s28run3): those keep MAX_M.
MAX_M_LARGE = ((1 << 27, 768), (3 << 25, 512))
MIN_M_CUBLAS8_LONG_K = 193
# Weights of 3040-4224 columns at 129-256 rows (one wave of TALL programs): TALL to this K,
# WIDE with K split 2 above (s22run2, W4A16 at 160 / 256 rows, same process: 4096 x 11008,
# 12288, 14336 1.08-1.14x TALL; 4096 x 8192 0.99 / 1.02x; 4096 x 4096 and 3072 x 4096 0.84-0.89x
# in s22run1 and s22run3). Where TALL's programs exceed the SMs (more than 4224 columns at
# 65-256 rows), WIDE by stream-K: s22run3 at 160 / 256 rows, 5120 x 5120 1.27 / 1.29x TALL,
# 5120 x 17408 1.73 / 1.75x, 6016 x 8192 1.33 / 1.35x (TALL's 160-188 programs are 1.2-1.4
# waves; stream-K the best of five launches in all six cases); s22run4 as dispatched at 96 /
# 128 rows against TALL with K split 2, 1.09-1.52x (but unsplit TALL, 80 programs, ran 1.07-
# 1.10x stream-K on 5120 x 5120 there; not taken into the rule from one shape).
MAX_K_TALL = 8192
# Decode (1-32 rows): the tile with x's rows on the MMA's N side (8, 16 or 32) and SCALE_AFTER
# (q - z on the MMA, each K block's sum scaled in fp32: sm_90 SASS of the 16 x 256 tile 2.72
# instructions a code against 3.16 with the scale in the unpack; mmT's 16-row tile 4.81, the
# one-row GEMV 4.06), by stream-K over two programs an SM. s24run1-4 (W4A16 g128, bf16 x,
# against the dispatch of before, same process, CUDA-graph ms): 28672 x 8192 0.0495-0.0508
# against the GEMV's 0.0559-0.0563 at one row (1.11x), 1.46x mmT at 4-8 rows, 1.42x at 16;
# 24576 x 4096 1.09x at one row, 1.35x at 4, 1.21x at 16; 12288 x 4096, 14336 x 4096 and
# 8192 x 8192 1.08-1.16x at 4 rows and 1.03-1.08x at 16 (but 0.86-0.91x at one row); weights
# of 4096-6144 columns or 16.8-25M weights 0.71-1.03x (the permutation's launch and the
# stream-K fix-ups weigh more than the unpack saves there). W4A8 int8 and W6A12 (6-bit:
# 128-column tiles, 256 spill) alike on 12288 x 4096 and 28672 x 8192 (1.06-1.41x, but W4A8 at
# one row on 12288 x 4096 0.84x); W6A12 lost on 4096^2. At 17-32 rows with 16-bit x, XSUM
# (x's block sums from its permutation, M + q on the MMA) on 32 x 128 (s24run4): 1.06 / 1.09 /
# 1.39 / 1.49x mmT at 32 rows of 12288 x 4096 / 8192^2 / 24576 x 4096 / 28672 x 8192, where
# the same tile without it ran 0.87-1.18x (and 0.0874 against 0.0684 ms with PDL on 28672 x
# 8192: with PDL its programs launched while the permutation's still ran, not profiled); at
# 1-16 rows XSUM ran 0.96-1.07x SCALE_AFTER alone (slower in 22 of 32), so it is not used
# there. The same tile without PDL ran as fast as XSUM on the two shapes timed both ways (0.0684
# / 0.0402 ms against 0.0696 / 0.0389 at 32 rows of 28672 x 8192 / 24576 x 4096), so most of
# that gain may be the launch's rather than the unpack's. Quantized activations (x dequantised
# and permuted by the quantizer, no sums, no PDL) take the tile without XSUM at 17-32 rows
# from DECODE_BIG_WEIGHTS (s24run6, int8 and fp8 codes: 1.26-1.49x mmT at 24 and 32 rows of
# 24576 x 4096 and 28672 x 8192; 0.98-1.02x on 12288 x 4096).
DECODE_TILES = {8: dict(BLOCK_M=8, BLOCK_N=256, num_warps=4, STAGES=4, LOOKAHEAD=1),
                16: dict(BLOCK_M=16, BLOCK_N=256, num_warps=4, STAGES=4, LOOKAHEAD=1),
                32: dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, STAGES=4, LOOKAHEAD=1)}
# At least this many columns and weights; at one row at least DECODE_BIG_WEIGHTS (where 16 x 128
# also beat 16 x 256 at 9-16 rows below it).
DECODE_MIN_N, DECODE_MIN_WEIGHTS, DECODE_BIG_WEIGHTS = 8192, 48 << 20, 96 << 20
ACTS = ("none", "int8", "fp8", "int12")
BITS = (4, 6)
# WIDE's tiles (one program an SM) that make "most of a wave": 96 tiles of 132 SMs (12288
# columns at up to 128 rows) ran 0.0440 / 0.0451 ms at 96 / 128 rows against TALL split 2's
# 0.0567 / 0.0578; 32 tiles (4096 columns) 0.0422 / 0.0432 against 0.0260 / 0.0263.
WAVE_FILL = 0.72
# From a wave of WIDE tiles, stream-K over one program an SM (s18run3, W4A16): 224 tiles
# (28672 columns, 96-128 rows) 0.1341 / 0.1405 ms against whole tiles' 0.1399 / 0.1464, 448
# tiles (256 rows) 0.2682 against 0.2932, 192 tiles (12288 columns, 192-256 rows) 0.0720 /
# 0.0736 against 0.0780 / 0.0808; below a wave it lost (96 tiles: 0.0483 / 0.0496 against
# 0.0434 / 0.0447), each tile then summed from two pieces.
# Weights with few columns: SMALL with K split 4 to 64 rows; above, TALL (K split 2 to 128
# rows, unsplit above) where its programs make WAVE_FILL of the SMs (4096 columns: 128), else
# SMALL split 4 to 128 rows (split 2 from 65 rows where split 4 would make more programs than
# SMs: s21run10, 2048 x 4096 at 65 / 96 / 128 rows, 1.03-1.07x split 4 for W4A16, W6A12 and
# W4A8 fp8, 9 of 9; on 1024 x 4096, 32 tiles, split 4 stays: split 2 ran 0.84-0.88x); above,
# SMALL split 2 for quantized activations (s21run7, 1024 and 2048 columns x 4096 at 129 / 192
# / 256 rows: W4A8 fp8 1.04-1.41x cuBLAS's fp8 GEMM on unpacked codes, W6A12 1.00-1.06x
# dequantise + cuBLAS; the best of nine launches in 7 of 12, within 3% of it in the other 5,
# where 128 x 64 split 2 led on 2048 columns; int8 codes, which the mm tile takes there, were
# not timed) and the table's path for 16-bit x (dequantise + cuBLAS: SMALL split 2 ran
# 0.92-0.96x its time). s18run4 on 1024 x 4096 (16 TALL tiles):
# TALL split 8 / 4 (every SM a program) ran 0.0230 / 0.0235 ms at 96 / 128 rows and 0.0227 /
# 0.0229 at 192 / 256, SMALL split 4 0.0181 / 0.0186 and 0.0223 / 0.0233, dequantise + cuBLAS
# 0.0187 / 0.0194 at 192 / 256 (mmT 0.0287 / 0.0289 at 96 / 128); W6A12 alike (SMALL split 4
# 0.0184 / 0.0187 against dequantise + cuBLAS's 0.0215 / 0.0212 at 96 / 128, 0.0239 / 0.0249
# against 0.0231 / 0.0239 at 192 / 256).


# Programmatic dependent launch (session 22; s22run1-2, the dispatch with PDL against the same
# launch without, same process, W4A16): 1.002-1.08x faster in 24 of 28 cases on the issue's
# four shapes at 33-256 rows (4096 x 4096: 1.04-1.08x, where the permutation's share is
# largest), 0.993 / 0.999x on 28672 x 8192 at 192 / 64 rows, but 0.67-0.68x where SIXTY_FOUR's 96 programs (12288
# x 4096 at 48 and 64 rows) made one wave of a tile that fits two programs an SM (presumably,
# launched while x's permutation still held SMs, programs doubled up on some SMs while others
# stayed idle; not profiled). SMALL alike (s22run2): 128 programs 0.88-0.90x (1024 x 4096 at 96 / 128 rows, 2048 x
# 4096 at 48-128), but 64 programs 1.05-1.08x (1024 x 4096 at 48 / 64 rows) and 192-768
# 1.02-1.05x. So a grid of more than half and at most one program an SM of the tiles that fit
# two (64-row tiles of 64 or 128 columns) keeps plain stream order. Only where the op permutes
# x itself (16-bit activations): after the activations' quantizer it was not timed alone, and
# the design config end to end (qwen3, 40 / 128 rows) ran 0.5-0.8% slower with it (s22run2).
def with_pdl(cfg: dict, M: int, N: int, sms: int) -> dict:
    """`cfg` (a launch of :func:`choose`, its K split final) with PDL set: False where its
    programs are more than half and at most one an SM and two of them fit an SM, else True
    (:func:`run` uses it only where it permutes x itself)."""
    programs = (cfg.get("STREAM") or contract.cdiv(M, cfg["BLOCK_M"])
                * contract.cdiv(N, cfg["BLOCK_N"]) * cfg.get("SPLIT_K", 1))
    two_an_sm = cfg["BLOCK_M"] == 64 and cfg["BLOCK_N"] <= 128
    return dict(cfg, PDL=not (two_an_sm and sms < 2 * programs <= 2 * sms))


def supported(bits: int, group_size: int, act: str, dtype: torch.dtype, N: int,
              capability: Optional[tuple]) -> bool:
    """Whether this path computes the call: 4- or 6-bit weights in groups of 128, bf16 or fp16 x
    (activations of 16 bits, or quantized to 8 or 12 and dequantised to x's dtype first, as the
    mmT path does), N a multiple of 16 (the rows of words, zero points and scales are copied
    16, 4 and 4 bytes at a time), on an sm_90 GPU (Hopper's warpgroup MMA; the interpreter and
    other GPUs take the other paths)."""
    return (bits in BITS and group_size == 128 and act in ACTS and N % 16 == 0
            and dtype in (torch.bfloat16, torch.float16) and capability == (9, 0))


def choose_decode(M: int, N: int, K: int, sms: int, bits: int = 4, bf16: bool = True,
                  quantized: bool = False) -> Optional[dict]:
    """The decode launch (:data:`DECODE_TILES`, SCALE_AFTER, stream-K over two programs an SM)
    for 1-32 rows of an N x K weight where it beat the GEMV and mmT (s24run1-4), else None:
    bf16 x (fp16 not measured), N >= :data:`DECODE_MIN_N` and :data:`DECODE_MIN_WEIGHTS`
    weights (:data:`DECODE_BIG_WEIGHTS` at one row); 17-32 rows 4-bit weights only, with
    XSUM for 16-bit activations, from DECODE_BIG_WEIGHTS for quantized ones (6-bit weights:
    128-column tiles, to 16 rows)."""
    weights = N * K
    if not (bf16 and 1 <= M <= 32 and N >= DECODE_MIN_N and weights >= DECODE_MIN_WEIGHTS):
        return None
    if M == 1 and weights < DECODE_BIG_WEIGHTS:
        return None
    if M > 16 and (bits == 6 or (quantized and weights < DECODE_BIG_WEIGHTS)):
        return None
    rows = 8 if M <= 8 else 16 if M <= 16 else 32
    tile = dict(DECODE_TILES[rows], path="wg", SPLIT_K=1, STREAM=2 * sms, SCALE_AFTER=True)
    if bits == 6 or (rows == 16 and weights < DECODE_BIG_WEIGHTS):
        tile["BLOCK_N"] = 128
    if rows == 32 and not quantized:
        tile["XSUM"] = True
    return tile


def max_m(N: int, K: int, bits: int, quantized: bool) -> int:
    """The most rows :func:`choose` gives the tile: :data:`MAX_M`, more for large 4-bit weights
    with 16-bit activations (:data:`MAX_M_LARGE`)."""
    if bits == 4 and not quantized:
        for entries, rows in MAX_M_LARGE:
            if N * K >= entries:
                return rows
    return MAX_M


# Just past a whole number of 128-row tiles a second tile of rows unpacks the whole weight again
# for as few as one row: 12288 x 4096 W4A16 took 0.0635 ms at 129 rows against 0.0385 at 128
# (s39run1; 0.0639 at 129 in s40run1). On wide weights (WIDE256 for 4-bit weights, WIDE by
# stream-K for 6-bit ones), the op then runs the whole tiles of rows and the rest as two
# launches (path "rowsplit", :func:`q3n_compile.kernels.qlinear._launch_row_split`): the weight
# is read twice, but the rest goes to the memory-bound small-M paths. bench_row_split.py, the
# split forced against the one launch, CUDA-graph ms (s40run1-4):
# - zero points, bf16 x: WIDE256 in one wave (12288 / 14336 x 4096) 1.18 / 1.14x at 129 rows,
#   1.15 / 1.10x at 144, 1.05 / 1.01x at 152-160, 0.89-0.93x from 176; by stream-K (28672 x
#   8192) 1.33x at 129-136, 1.17x at 160, 1.06x at 192, 0.95x at 224; past 256 rows the gain
#   shrinks with the head's share of the work: 28672 / 16384 x 8192 1.14 / 1.27x at 257,
#   1.04-1.05 / 1.15x at 288, 0.98-1.00 / 1.08-1.09x at 320, 1.10 / 1.07x at 385, 0.97 /
#   0.98x at 448, 1.12 / 1.09x at 513.
# - symmetric weights (the 128-row head without x by TMA): 1.07-1.08x at 129-136 rows of
#   12288 x 4096 (1.04-1.05x of 14336 x 4096) but 0.96 / 0.94x at 144 rows; by stream-K
#   1.34x at 129, 1.28x at 144, 1.06x at 192 of 28672 x 8192.
# - fp16 x (the rest's 2-32 rows on mmT: the decode tiles take bf16 only): 12288 x 4096 1.16 /
#   1.06 / 1.02x at 129 / 136 / 144, 0.96x at 160; 28672 x 8192 1.26 / 1.11 / 1.08x at 129 /
#   136 / 144, 0.97x at 160, 1.08x at 192.
# - 8-bit activations (s40run4, zero points, bf16 x; the head's x quantized and dequantised for
#   the tile): W4A8 fp8 / int8 on 12288 x 4096 1.10 / 1.13x at 129 rows, 1.04 / 1.05x at 144,
#   0.94 / 0.95x at 160; on 28672 x 8192 1.27x at 129, 1.24-1.25x at 144, 1.16x at 160,
#   1.04-1.05x at 192.
# - 6-bit weights (s40run4; WIDE by stream-K at 129-256 rows of both): W6A12 / W6A16 on 12288 x
#   4096 1.04 / 1.03x at 129 rows, 1.08 / 1.13x at 136, 1.08 / 1.10x at 144, 0.90 / 0.92x at
#   160; on 28672 x 8192 1.18-1.20x at 129-144, 0.93 / 0.94x at 160, 0.97 / 0.98x at 192.
# TALL weights (4096 x 12288) lost from 136 rows (0.78-0.97x). Past the tile's rows (the
# dequant path, s40run2) 256 rows on the tile and the rest ran 1.12-1.17x at 257-272 rows of
# 4096 x 12288 and 1.10x at 257-288 of 14336 x 4096 but 0.91-0.96x on 12288 x 4096 and
# 0.85-1.09x on 4096^2: not dispatched (no rule found that holds). Rest rows at most, for 4-bit
# weights: WIDE256 in one wave (zero points; symmetric); by stream-K with bf16 x (after one
# tile of rows; after more); with fp16 x; for 6-bit weights.
ROW_SPLIT_REST, ROW_SPLIT_REST_SYM = 16, 8
ROW_SPLIT_REST_STREAM, ROW_SPLIT_REST_STREAM_LATER, ROW_SPLIT_REST_STREAM_F16 = 64, 32, 16
ROW_SPLIT_REST_W6 = 16


def row_split_head(M: int, N: int, K: int, sms: int, bits: int = 4, quantized: bool = False,
                   symmetric: bool = False, bf16: bool = True, cublas8: bool = False) -> int:
    """The rows of the first of two launches that compute M rows of an N x K weight faster than
    one, else 0: M rounded down to whole 128-row tiles where the weight is wide (its 128-column
    tiles at least :data:`WAVE_FILL` of the SMs), :func:`choose` (with `cublas8` as the
    dispatch gives it) takes 128-row tiles at M rows, and the rest is at most the
    ROW_SPLIT_REST* rows that case measured faster: 4- and 6-bit weights, 16-bit x (`bf16`
    False: fp16) or `quantized` activations."""
    rest = M % 128
    if not (M > 128 and rest and bits in (4, 6)
            and contract.cdiv(N, 128) >= WAVE_FILL * sms):
        return 0
    cfg = choose(M, N, sms, cublas8, bits=bits, K=K, quantized=quantized, symmetric=symmetric)
    if cfg is None or cfg["BLOCK_M"] != 128:
        return 0
    head = M - rest
    if bits == 6:
        most = ROW_SPLIT_REST_W6
    elif not cfg.get("STREAM"):
        most = ROW_SPLIT_REST_SYM if symmetric else ROW_SPLIT_REST
    elif not bf16:
        most = ROW_SPLIT_REST_STREAM_F16
    else:
        most = ROW_SPLIT_REST_STREAM if head == 128 else ROW_SPLIT_REST_STREAM_LATER
    return head if rest <= most else 0


# The split's two launches at once (CONCURRENT, :func:`rest_beside_head`): where the head's 128
# rows take one program an SM on fewer tiles than SMs (WIDE_TMA on 12288 columns: 96 of 132),
# the rest's rows run on a second stream beside it, its stream-K grid capped at two programs on
# each idle SM, so they take the SMs the head leaves idle instead of running after it.
# s41run6 (bench/row_split_streams_experiment.py, W4A16 g128 zero points, bf16 x, CUDA-graph
# ms, the head launched first): 12288 x 4096 at 136 / 144 / 160 rows 0.0391 / 0.0452 / 0.0551
# against the split in one stream's 0.0529 / 0.0547 / 0.0595 and the one launch's 0.0638-0.0641
# (bf16 0.0381-0.0402: 0.97 / 0.85 / 0.73x bf16); the rest launched first 0.0583-0.0676; the
# rest not capped 0.0491-0.0573. With 20 idle SMs (14336 x 4096) the capped rest ran 1.2-1.6x
# slower than in one stream (too few SMs for it); uncapped 1.05x faster. At 129 rows the rest's
# one row goes to gemv1p, whose grid has no cap (0.0522 against 0.0538: kept in one stream); at
# 176-192 rows its 48-64 rows go to the 64-row tile (0.081 against 0.067: no cap either). Hence:
# 2-32 rest rows on the decode tiles, a head of 128 rows leaving at least a quarter of the SMs
# idle; measured for 4-bit weights with zero points, 16-bit activations and bf16 x only.
# s41run7, as dispatched: 0.0398 / 0.0449 / 0.0547 ms at 136 / 144 / 160 rows against the
# one launch's 0.0637-0.0642 and the one-stream split's 0.0529 / 0.0543 / 0.0596; the rest at
# three programs an idle SM 0.0485 / 0.0591 / 0.0718 (the third program of an SM waits for the
# head: 243 registers hold two), at four 0.0419 / 0.0486 / 0.0598, at two 0.0394 / 0.0450 /
# 0.0544.
# s42run2 (the same experiment, --sym and --act int8 / fp8, 12288 x 4096, ms; the op then split
# in one stream): symmetric weights at 136 / 144 / 160 rows 0.0425 / 0.0476 / 0.0522 (the
# rest at four / four / two programs an idle SM) against 0.0557 / 0.0609 / 0.0611; int8
# activations 0.0435 / 0.0485 (four) and, at 160 rows, whose 32 rest rows take mmT (no grid to
# cap), 0.0570 as dispatched against 0.0597 / 0.0614 / 0.0657; fp8 0.0437 / 0.0487 / 0.0571
# against 0.0605 / 0.0619 / 0.0660. Two programs an idle SM at 16 rest rows ran 0.0565-0.0591
# in these forms (and were the best for zero points and 16-bit activations, 0.0450 against
# four's 0.0486 in s41run7); four at 32 rest rows 0.0571 against two's 0.0522 (symmetric), and
# at 8 rows 0.0425-0.0437 against two's 0.0425-0.0432. At 129 rows (one rest row, gemv1p)
# concurrent ran 1.03-1.10x the one-stream split: not taken, as for 16-bit activations.
# s42run3, as dispatched at 130 / 136 / 144 / 152 / 160 rows: symmetric 0.0425 / 0.0428 /
# 0.0476 / 0.0521 / 0.0517 ms, int8 0.0432 / 0.0437 / 0.0484 / 0.0561 / 0.0574, fp8 0.0433 /
# 0.0435 / 0.0486 / 0.0562 / 0.0572, 1.15-1.40x what was dispatched before (the one-stream
# split to 8 / 16 rest rows, else the one launch).
CONCURRENT_MIN_IDLE = 0.25
CONCURRENT_REST_ROWS = (2, 32)
CONCURRENT_PER_IDLE_SM = 2
# Symmetric weights or quantized activations (measured apart, not together) to 16 rest rows.
CONCURRENT_PER_IDLE_SM_OTHER, CONCURRENT_OTHER_MAX_ROWS = 4, 16


def rest_beside_head(M: int, N: int, K: int, sms: int, bits: int = 4, quantized: bool = False,
                     symmetric: bool = False, bf16: bool = True,
                     cublas8: bool = False) -> Optional[int]:
    """Where the row split's two launches run at once (CONCURRENT), the cap on the rest's
    stream-K programs: :data:`CONCURRENT_PER_IDLE_SM` on each SM the 128-row head leaves idle
    (:data:`CONCURRENT_PER_IDLE_SM_OTHER` to :data:`CONCURRENT_OTHER_MAX_ROWS` rest rows for
    symmetric weights or quantized activations); 0 where the rest's 17-32 rows of quantized
    activations leave the decode tiles (for mmT, launched as dispatched); None where the split
    stays in one stream. Measured (:data:`CONCURRENT_MIN_IDLE`): 4-bit weights, bf16 x, a head
    of one tile of rows without a K split or stream-K (the rest's tickets are then the only
    ones in use), 2-32 rest rows."""
    rest = M - 128
    if not (bits == 4 and bf16 and CONCURRENT_REST_ROWS[0] <= rest <= CONCURRENT_REST_ROWS[1]):
        return None
    head = choose(128, N, sms, cublas8, bits, K, quantized=quantized, symmetric=symmetric)
    if head is None or head.get("STREAM") or head.get("SPLIT_K", 1) != 1:
        return None
    idle = sms - contract.cdiv(128, head["BLOCK_M"]) * contract.cdiv(N, head["BLOCK_N"])
    if idle < CONCURRENT_MIN_IDLE * sms:
        return None
    tile = choose_decode(rest, N, K, sms, bits, bf16=bf16, quantized=quantized)
    if tile is None or not tile.get("STREAM"):
        # Only the case measured: quantized activations' 17-32 rest rows of a weight whose 16
        # rows take the decode tile (these leave it for mmT). Weights below the decode tiles'
        # size were not measured.
        leaves_decode = (quantized and rest > CONCURRENT_OTHER_MAX_ROWS and choose_decode(
            CONCURRENT_OTHER_MAX_ROWS, N, K, sms, bits, bf16=bf16, quantized=quantized))
        return 0 if leaves_decode else None
    other = (quantized or symmetric) and rest <= CONCURRENT_OTHER_MAX_ROWS
    return (CONCURRENT_PER_IDLE_SM_OTHER if other else CONCURRENT_PER_IDLE_SM) * idle


def choose(M: int, N: int, sms: int, cublas8: bool = False, bits: int = 4,
           K: int = 0, quantized: bool = False, symmetric: bool = False) -> Optional[dict]:
    """The launch for M rows of an N x K weight, or None outside :data:`MIN_M`-:data:`MAX_M`
    rows (more for large 4-bit weights with 16-bit activations, :func:`max_m`; none above
    :data:`MAX_M_CUBLAS8` and below :data:`MIN_M_CUBLAS8_LONG_K` where `cublas8`, the
    qlinear_cublas8 path computes the call at this M, and K exceeds
    :data:`MAX_K_CUBLAS8`; below :data:`MIN_M_SMALL_W4_QUANTIZED` where 4-bit weights meet
    `quantized` activations and the tile would be SMALL). Same rule
    for 4- and 6-bit weights but for WIDE256 and SIXTY_FOUR256 (4-bit only).

    Wide weights (WIDE's tiles at least :data:`WAVE_FILL` of the SMs): to 64 rows
    SIXTY_FOUR256 where its own tiles fill WAVE_FILL of the SMs, else SIXTY_FOUR; above,
    WIDE256 where its own tiles fill WAVE_FILL, else WIDE (within 3.5% of the best tile swept
    at 129-256 rows), K unsplit, by stream-K over one program an SM where the tiles make a
    wave, else as :data:`WIDE_TMA` for 4-bit weights where x goes by TMA (below). Others: SMALL
    with K split 4 to 64 rows; TALL with K split 2 to 128 rows and unsplit above where its
    programs fill :data:`WAVE_FILL` of the SMs (WIDE by stream-K instead where they exceed
    the SMs), as :data:`TALL_TMA` where x goes by TMA (weights with zero points and 16-bit
    activations), else WIDE with K split 2 above 128 rows where K exceeds
    :data:`MAX_K_TALL`; else SMALL split 4 to 128 rows (2 from 65 rows where 4 would make
    more programs than SMs) and above SMALL split 2 for
    `quantized` activations, None for 16-bit ones. The caller halves a split that would leave
    fewer than two K blocks of 128 each (:func:`q3n_compile.kernels.qlinear.choose_path`)."""
    if not MIN_M <= M <= max_m(N, K, bits, quantized):
        return None
    if cublas8 and K > MAX_K_CUBLAS8 and MAX_M_CUBLAS8 < M < MIN_M_CUBLAS8_LONG_K:
        return None
    wide_tiles = contract.cdiv(M, 128) * contract.cdiv(N, 128)
    tiles256 = contract.cdiv(M, 128) * contract.cdiv(N, 256)
    # x copied by TMA from the op's padded permutation: 16-bit activations (the quantizers'
    # dequantised x is not padded) and weights with zero points (symmetric ones lose: TALL_TMA)
    x_tma = not quantized and not symmetric
    if bits == 4 and tiles256 >= WAVE_FILL * sms:
        if M <= 64:
            return dict(SIXTY_FOUR256, path="wg", SPLIT_K=1)
        return dict(WIDE256, path="wg", SPLIT_K=1, **({"STREAM": sms} if tiles256 >= sms else {}))
    if wide_tiles >= WAVE_FILL * sms:
        if M > 64 and wide_tiles >= sms:
            return dict(WIDE, path="wg", SPLIT_K=1, STREAM=sms)
        if M > 64 and bits == 4 and x_tma:
            return dict(WIDE_TMA, path="wg", SPLIT_K=1)  # s38run3
        return dict(SIXTY_FOUR if M <= 64 else WIDE, path="wg", SPLIT_K=1)
    if M <= 64:
        if quantized and bits == 4 and M < MIN_M_SMALL_W4_QUANTIZED:
            return None
        return dict(SMALL, path="wg", SPLIT_K=4)
    split = 2 if M <= 128 else 1
    tall_programs = contract.cdiv(M, 128) * contract.cdiv(N, 64) * split
    if tall_programs >= WAVE_FILL * sms:
        if tall_programs > sms:
            # More than a wave of TALL programs (more than 4224 columns): WIDE by stream-K
            # over the SMs (s22run3-4).
            return dict(WIDE, path="wg", SPLIT_K=1, STREAM=sms)
        if x_tma:
            return dict(TALL_TMA, path="wg", SPLIT_K=split)  # s37run4-5, s38run3
        if M > 128 and K > MAX_K_TALL:
            return dict(WIDE, path="wg", SPLIT_K=2)  # s22run2
        return dict(TALL, path="wg", SPLIT_K=split)
    if M <= 128:
        # K split 4, or 2 where 4 would make more programs than SMs (s21run10).
        small_tiles = contract.cdiv(M, 64) * contract.cdiv(N, 64)
        return dict(SMALL, path="wg", SPLIT_K=4 if 4 * small_tiles <= sms else 2)
    return dict(SMALL, path="wg", SPLIT_K=2) if quantized else None
