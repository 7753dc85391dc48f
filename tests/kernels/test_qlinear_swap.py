"""q3n::qlinear's mmT path (swapped operands for a few rows of 16-bit activations) against
float64 (CPU lane: Triton interpreter; GPU: -m gpu, model widths)."""

import pytest
import torch

from q3n_compile.kernels import act_dequant as AD
from q3n_compile.kernels import qlinear as Q
from q3n_compile.kernels import qlinear_swap as SW

from .subprocess_lane import run_without_interpreter
from .test_qlinear import TOL, _gen, _packed, bf16, f16, f32
from .test_qlinear import _check as check_against_float64

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _check(x, pw, bias, cfg):
    """The forced mmT launch against float64 (tests/kernels/test_qlinear.py's check)."""
    return check_against_float64(x, pw, bias, path=cfg)


CASES = [  # bits, group, sym, dtype, M, split
    (4, 64, False, bf16, 5, 1), (4, -1, True, f16, 16, 2), (6, 32, False, f32, 17, 1),
    (8, -1, True, bf16, 1, 2), (3, 32, True, f16, 33, 1), (2, -1, False, f32, 3, 2),
    (5, 64, False, bf16, 16, 1), (7, -1, False, f16, 9, 1),
]


@pytest.mark.parametrize("bits,group,sym,dtype,M,split", CASES,
                         ids=[f"w{b}g{g}{'s' if s else 'a'}_{str(d)[6:]}_m{m}_split{sp}"
                              for b, g, s, d, m, sp in CASES])
@pytest.mark.parametrize("bias,reduce", [(False, "ticket"), (True, "ticket"), (True, "atomic")])
def test_mmT_against_float64(bits, group, sym, dtype, M, split, bias, reduce):
    N, K = 72, 192  # N off the 64-column block; one whole K block of 128 and half of one
    gen = _gen(f"mmT{bits}{group}{sym}{dtype}{M}{split}{bias}{reduce}")
    pw = _packed(gen, N, K, bits, group, sym)
    x = torch.randn(M, K, generator=gen).to(dtype)
    cfg = dict(path="mmT", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=split, num_warps=4,
               num_stages=1, REDUCE=reduce)
    _check(x, pw, torch.randn(N, generator=gen).to(dtype) if bias else None, cfg)
    if split > 1 and reduce == "ticket":  # every ticket back at 0 for the next call
        assert int(Q._tickets(x.device, 1).abs().sum()) == 0


@pytest.mark.parametrize("bits,group,sym,K", [(4, 32, False, 224), (6, 64, True, 320),
                                              (8, -1, True, 77), (3, -1, False, 130),
                                              (2, 32, False, 96), (5, -1, True, 45)])
@pytest.mark.parametrize("xperm", [False, True])
def test_mmT_k_off_the_blocks(bits, group, sym, K, xperm):
    # K off the 128-channel block (rows of 8 channels past the padded K, groups past the last;
    # the split's second range partial or empty) and, per channel, off 32 (padded codes, x
    # masked inside a word); XPERM: x permuted per block beforehand, zero padded to 128.
    gen = _gen(f"mmTk{bits}{group}{sym}{K}")
    pw = _packed(gen, 40, K, bits, group, sym)
    x = torch.randn(7, K, generator=gen).to(bf16)
    cfg = dict(path="mmT", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, num_warps=4,
               num_stages=1, XPERM=xperm)
    if xperm:  # a register cap is a GPU launch option; the interpreter runs without it
        cfg["maxnreg"] = 128
    got = _check(x, pw, None, cfg)
    if xperm:  # the same products summed in the same order as from the unpermuted x
        plain = Q._launch(x, pw.qweight, pw.scales, pw.zeros, None, None, bits, group, K,
                          "none", interpreter=True, path=dict(cfg, XPERM=False))
        assert torch.equal(got, plain)


@pytest.mark.parametrize("K", [256, 200])
def test_permuted_blocks(K):
    # Channel k0 + 8r + j of each 128-channel block lands at k0 + 16j + r, padding zero; the
    # activation quantizer's permuted store is the same permutation of its plain output.
    x = torch.randn(5, K, generator=_gen(f"perm{K}")).to(bf16)
    xp = SW.permute_x_blocks(x)
    assert xp.shape == (5, 256)
    for k in range(K):
        k0, r, j = k - k % 128, (k % 128) // 8, k % 8
        assert torch.equal(xp[:, k0 + 16 * j + r], x[:, k])
    assert xp.reshape(-1).count_nonzero() == x.reshape(-1).count_nonzero()
    for act, ag in (("int8", Q.PER_TOKEN), ("int12", 64)):
        plain, s1 = Q.quantize_activations_triton(x, act, None, True, ag, dequant=True)
        perm, s2 = Q.quantize_activations_triton(x, act, None, True, ag, dequant=True,
                                                 perm128=True)
        assert torch.equal(perm, SW.permute_x_blocks(plain)) and torch.equal(s1, s2)


def _permute_cases(device):
    """x of odd sizes, each 16-bit dtype and float32, rows and columns strided, no rows."""
    gen = torch.Generator(device=device).manual_seed(41)
    out = []
    for M, K, dtype in ((5, 300, bf16), (9, 128, f16), (17, 1000, f32), (1, 4096, bf16),
                        (33, 520, f16), (0, 64, bf16)):
        out.append(torch.randn(M, K, generator=gen, device=device).to(dtype))
    out.append(torch.randn(40, 7, 600, generator=gen, device=device).to(bf16)[:, 3, :])
    out.append(torch.randn(300, 6, generator=gen, device=device).to(f16).t())
    return out


def test_permute_kernel_is_the_torch_permutation():
    # The CPU lane runs permute_x_kernel in Triton's interpreter; the torch transpose-copy it
    # replaced on the GPU is the reference (whose mapping test_permuted_blocks checks).
    for x in _permute_cases("cpu"):
        got = SW.permute_x_blocks(x)
        want = SW.permute_x_blocks_torch(x)
        assert got.shape == want.shape and got.dtype == x.dtype and got.is_contiguous()
        assert torch.equal(got, want), (tuple(x.shape), x.stride(), x.dtype)


def test_permute_kernel_pads_the_rows_it_allocates():
    # pad_rows: the first M rows of a buffer of M rounded up (X_TMA copies whole tiles of rows
    # from it), the same values and strides as unpadded.
    for x in _permute_cases("cpu"):
        for pad in (1, 64, 128):
            got = SW.permute_x_blocks(x, pad_rows=pad)
            rows = -(-x.shape[0] // pad) * pad
            assert torch.equal(got, SW.permute_x_blocks_torch(x)) and got.is_contiguous()
            assert got.untyped_storage().nbytes() == rows * got.shape[1] * got.element_size()


def _check_block_sums(x):
    # The permutation's sums per row and 128-channel block (the wg kernel's XSUM) against
    # float64: fp32 sums of the 16-bit values, zero past K, [blocks, M].
    y, xs = SW.permute_x_blocks(x, sums=True)
    assert torch.equal(y, SW.permute_x_blocks_torch(x))
    M, K = x.shape
    kb = -(-K // 128)
    want = torch.nn.functional.pad(x.double(), (0, kb * 128 - K)).view(M, kb, 128).sum(2).t()
    assert xs.shape == (kb, M) and xs.dtype == torch.float32 and xs.is_contiguous()
    bound = x.double().abs().sum() * 2 ** -20 + 1e-30
    if xs.numel():
        assert (xs.double() - want).abs().max() <= bound, tuple(x.shape)


def test_permute_kernel_gives_the_block_sums():
    for x in _permute_cases("cpu"):
        _check_block_sums(x)
    # The torch form (what the reference backend returns) the same way.
    x = _permute_cases("cpu")[0]  # 5 x 300: the last block partial
    ref = torch.nn.functional.pad(x.double(), (0, -x.shape[1] % 128))
    ref = ref.view(x.shape[0], -1, 128).sum(2).t()
    assert (SW.block_sums_torch(x).double() - ref).abs().max() <= x.double().abs().sum() * 2 ** -20


@pytest.mark.gpu
@needs_cuda
def test_gpu_permute_kernel_is_the_torch_permutation():
    cases = _permute_cases("cuda") + [
        torch.randn(256, 12288, device="cuda").to(bf16), torch.randn(129, 8200, device="cuda")]
    for x in cases:
        assert torch.equal(SW.permute_x_blocks(x), SW.permute_x_blocks_torch(x)), tuple(x.shape)
        _check_block_sums(x)


@pytest.mark.parametrize("act", ["int8", "fp8", "int12"])
@pytest.mark.parametrize("ag", [Q.PER_TOKEN, 32])
@pytest.mark.parametrize("K", [256, 200])
@pytest.mark.parametrize("dtype", [bf16, f16, f32])
def test_codes_dequantised_in_one_pass(act, ag, K, dtype):
    # The codes' c * s, rounded once to the dtype, plain and in the mmT kernel's permuted
    # blocks (zero padded): exactly what the quantizer gives from x with dequant=True, and the
    # permutation of the plain result.
    x = torch.randn(5, K, generator=_gen(f"deq{act}{ag}{K}")).to(dtype)
    codes, xs = Q.quantize_activations_triton(x, act, None, True, ag)
    plain = AD.dequantize_codes(codes, xs, ag, dtype)
    scale = Q.expand_act_scales(xs, K, ag)
    exact = (codes.float() * scale).to(dtype)
    from_x, _ = Q.quantize_activations_triton(x, act, None, True, ag, dequant=True)
    assert plain.dtype == dtype
    if dtype != bf16:
        assert torch.equal(plain, exact) and torch.equal(plain, from_x)
    else:  # Triton 3.6's interpreter truncates fp32 -> bf16 (the GPU rounds), in both kernels
        assert torch.equal(plain, from_x)
        ulp = torch.finfo(bf16).eps * exact.float().abs()
        assert ((plain.float() - exact.float()).abs() <= ulp).all()
    perm = AD.dequantize_codes(codes, xs, ag, dtype, perm128=True)
    assert perm.shape == (5, 256) and torch.equal(perm, SW.permute_x_blocks(plain))


@pytest.mark.parametrize("ag", [Q.PER_TOKEN, 64])
@pytest.mark.parametrize("dtype", [bf16, f16])
def test_float8_codes_dequantised_in_one_pass(ag, dtype):
    # On a GPU with fp8, 8-bit activation codes are float8_e4m3fn tensors, which torch does not
    # promote with float32: they are widened to bf16 (exactly) first. The interpreter's codes are
    # fp16, so this builds real float8 codes.
    gen = _gen(f"deqfp8{ag}{dtype}")
    K = 200
    codes = (torch.randn(3, K, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    xs = torch.rand(3, 1 if ag == Q.PER_TOKEN else -(-K // ag), generator=gen) + 0.01
    xs = xs[:, 0] if ag == Q.PER_TOKEN else xs
    want = (codes.float() * Q.expand_act_scales(xs, K, ag)).to(dtype)
    plain = AD.dequantize_codes(codes, xs, ag, dtype)
    assert torch.equal(plain, want)
    perm = AD.dequantize_codes(codes, xs, ag, dtype, perm128=True)
    assert torch.equal(perm, SW.permute_x_blocks(want))


@pytest.mark.parametrize("act,ag", [("int8", Q.PER_TOKEN), ("fp8", 32), ("int12", Q.PER_TOKEN)])
@pytest.mark.parametrize("xperm", [False, True])
@pytest.mark.parametrize("K", [128, 160])
def test_mmT_with_quantized_activations_is_the_dequant_path(act, ag, xperm, K):
    # Quantized activations are dequantised to x's dtype first (one pass), then the 16-bit tile:
    # the function of the dequant path (A(x) and W rounded to x's dtype, fp32 sums); K = 160
    # pads the permuted blocks. From precomputed codes (q3n::qlinear_codes) the tile multiplies
    # the codes themselves where their scales are per token or per 128 channels (no rounding of
    # c * s: against float64), and takes the dequantised route, bit for bit, for smaller groups.
    gen = _gen(f"mmTact{act}{ag}{K}")
    pw = _packed(gen, 72, K, 4, 32, False)
    x = torch.randn(6, K, generator=gen).to(f16)
    args = (x, pw.qweight, pw.scales, pw.zeros, None, None, 4, 32, K, act)
    cfg = dict(path="mmT", BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, SPLIT_K=1, num_warps=4,
               num_stages=1, XPERM=xperm)
    got = Q._launch(*args, interpreter=True, path=cfg, act_group_size=ag)
    want = Q._launch(*args, interpreter=True, path=dict(path="dequant"), act_group_size=ag)
    assert (got.float() - want.float()).abs().max() <= 3e-3 * want.float().abs().max()
    exact = Q.reference(x.double(), pw.qweight, pw.scales, pw.zeros, None, None, 4, 32, K, act,
                        ag)
    assert (got.double() - exact).abs().max() <= TOL[f16] * exact.abs().max()
    codes, xs = Q.quantize_activations_triton(x, act, None, True, ag)
    via_codes = Q._qlinear_codes_launch(codes, xs, pw.qweight, pw.scales, pw.zeros, None, 4, 32,
                                        K, act, f16, True, path=cfg, act_group_size=ag)
    if ag in SW.CODE_ACT_GROUPS:
        of_codes = Q.reference_codes(codes, xs, pw.qweight, pw.scales, pw.zeros, None, 4, 32, K,
                                     act, torch.float64, ag)
        assert (via_codes.double() - of_codes).abs().max() <= TOL[f16] * of_codes.abs().max()
        assert not torch.equal(via_codes, got)  # the codes themselves were multiplied
    else:
        assert torch.equal(via_codes, got)


GPU_TILES = [dict(path="mmT", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=4,
                  num_stages=3),
             dict(path="mmT", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=4,
                  num_stages=3, REDUCE="atomic"),
             dict(path="mmT", BLOCK_M=8, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=4,
                  num_stages=4),
             dict(path="mmT", BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, num_warps=8,
                  num_stages=3),
             dict(path="mmT", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=4,
                  num_stages=3, XPERM=True),
             dict(path="mmT", BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=2, num_warps=8,
                  num_stages=3, XPERM=True),
             dict(path="mmT", BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=4, num_warps=8,
                  num_stages=3, XPERM=True, maxnreg=128)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("cfg", GPU_TILES,
                         ids=["m16_split4", "m16_split4_atomic", "m8_split4", "m64",
                              "m16_split4_xperm", "m64_split2_xperm", "m64_split4_xperm_reg128"])
@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (8, -1, True), (6, 128, False),
                                            (7, 64, False), (3, -1, True)])
@pytest.mark.parametrize("M", [1, 16, 33])
def test_gpu_mmT_against_float64(cfg, bits, group, sym, M):
    N, K = 12288, 4096
    gen = _gen(f"gpummT{bits}{M}{cfg['BLOCK_M']}")
    pw = _packed(gen, N, K, bits, group, sym, device="cuda")
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()
    _check(x, pw, torch.randn(N, generator=gen).to(bf16).cuda(), cfg)


def test_asm_unpack_is_chosen_for_4_and_6bit_weights_with_zero_points_only():
    # The PTX unpack (ASM) where the sm_90 compile showed it keeps the MMA operand in
    # registers; never under the interpreter, which runs no PTX.
    yes = [(4, 128, False, bf16), (4, -1, False, f16), (6, 128, False, bf16), (6, -1, False, f16)]
    no = [(4, 128, True, bf16), (4, 64, False, bf16), (6, 128, True, bf16), (6, 32, False, bf16),
          (5, 128, False, bf16), (8, -1, False, bf16), (4, 128, False, f32)]
    for bits, group, sym, dtype in yes:
        assert SW.asm_unpack(bits, group, sym, dtype, interpreter=False)
        assert not SW.asm_unpack(bits, group, sym, dtype, interpreter=True)
    for bits, group, sym, dtype in no:
        assert not SW.asm_unpack(bits, group, sym, dtype, interpreter=False), (bits, group, sym)


def test_six_pairs_ptx_places_both_fields():
    # The 6-bit PTX per code position: the nibble's byte and the 2-bit field's byte gathered
    # from both words of the pair, the field shifted to bits 4-5 of each half (left by 4 - p,
    # right by p - 4, none at p = 4), merged under the magic exponent, and M + z subtracted.
    for j in range(8):
        asm = SW._six_pairs_asm(j, False)
        b4, b2, p = j // 2, j // 4, (2 * j) % 8
        assert f"prmt.b32 t, $1, $2, {b4 | b4 << 4 | (4 + b4) << 8 | (4 + b4) << 12};" in asm
        assert f"prmt.b32 u, $3, $4, {b2 | b2 << 4 | (4 + b2) << 8 | (4 + b2) << 12};" in asm
        assert ("shr.b32 t, t, 4;" in asm) == (j % 2 == 1)
        shift = (f"shl.b32 u, u, {4 - p};" if p < 4 else f"shr.b32 u, u, {p - 4};" if p > 4
                 else None)
        assert shift is None or shift in asm
        assert "lop3.b32 t, u, 3145776, t, 234;" in asm and asm.endswith("sub.rn.bf16x2 $0, t, $5; }")
    assert "sub.rn.f16x2" in SW._six_pairs_asm(3, True) and "1677747200" in SW._six_pairs_asm(3, True)


def test_asm_unpack_compiles_for_sm90_with_the_operand_in_registers():
    # The interpreter cannot run the PTX path; compiled for an H200 (no GPU needed), its K loop
    # must hold the PTX and read the weight operand from registers (no ldmatrix), with fewer
    # instructions than the float unpack.
    run_without_interpreter("""
        import os, sys
        sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"].split(os.pathsep)[0], "bench"))
        import compile_qlinear_sm90 as C
        from q3n_compile.kernels import qlinear as Q
        ldsm = lambda loop: sum(v for o, v in loop["loop_shared"].items() if o.startswith("LDSM"))
        for bits, x_type, sub, most in ((4, "*bf16", "sub.rn.bf16x2", 0.85),
                                        (4, "*fp16", "sub.rn.f16x2", 0.85),
                                        (6, "*bf16", "sub.rn.bf16x2", 0.8)):
            C.MMT_TYPES["X"] = C.MMT_TYPES["Y"] = C.MMT_TYPES["BIAS"] = x_type
            loops = {}
            for asm in (False, True):
                k = C.compile_variant(Q, "mmT", dict(
                    BITS=bits, GROUP=128, SYM=False, HAS_BIAS=False, REDUCE=2, F32=False,
                    XPERM=False, BLOCK_M=16, BLOCK_N=64, stride_xk=1, stride_yn=1, ASM=asm,
                    XCODES=0),
                    4, 3)
                loops[asm] = C.inner_loop(k.asm["cubin"], k.asm["ttgir"], 64 * 128)
                assert (sub in k.asm["ptx"] and "prmt.b32" in k.asm["ptx"]) == asm
                assert loops[asm]["loop_convert_layout"] == 0, loops[asm]
            # The weight operand stays in registers: no ldmatrix the float unpack does not have
            # (4-bit: none; 6-bit: the 2-bit plane's 16-bit parts, in both).
            assert ldsm(loops[True]) <= ldsm(loops[False]) <= (0 if bits == 4 else 1), loops
            assert loops[True]["loop_instrs"] < most * loops[False]["loop_instrs"], loops
        print("ok")
    """)


# The dispatch's 32-row tile (CUDA_TABLE), x permuted as for 4-bit weights.
MMT_32_ROWS = dict(path="mmT", BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, num_warps=4,
                   num_stages=3, XPERM=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [bf16, f16])
@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("group,M,N,K,tile", [(128, 1, 4160, 4096, 0), (-1, 16, 12288, 4000, 0),
                                              (128, 33, 4096, 12288, 1), (-1, 33, 4160, 4000, 1),
                                              (128, 64, 4160, 4096, 2), (128, 32, 12288, 4096, 3),
                                              (-1, 20, 4160, 4000, 3)])
def test_gpu_asm_unpack_is_the_float_unpack(bits, dtype, group, M, N, K, tile):
    # The PTX unpack's q - z are the float unpack's, exactly, so the launches agree bit for bit;
    # and both against float64. N off the column blocks; per channel, K off the 128-channel
    # blocks. (4-bit, 32-row cases: first run in s14run1; 6-bit: session 14.)
    cfg = [GPU_TILES[0], GPU_TILES[4], GPU_TILES[5], MMT_32_ROWS][tile]
    gen = _gen(f"gpuasm{bits}{group}{dtype}{M}{N}{K}")
    pw = _packed(gen, N, K, bits, group, False, device="cuda")
    x = torch.randn(M, K, generator=gen).to(dtype).cuda()
    assert SW.asm_unpack(bits, group, False, dtype, interpreter=False)
    args = (x, pw.qweight, pw.scales, pw.zeros, None, None, bits, group, K, "none")
    got = Q._launch(*args, interpreter=False, path=dict(cfg))
    plain = Q._launch(*args, interpreter=False, path=dict(cfg, ASM=False))
    assert torch.equal(got, plain)
    _check(x, pw, None, cfg)
