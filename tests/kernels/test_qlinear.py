"""q3n::qlinear and its packing against a float64 reference (CPU lane: Triton interpreter; GPU: -m gpu)."""

import zlib

import pytest
import torch

from q3n_compile.kernels import act_dequant as AD
from q3n_compile.kernels import packing as P
from q3n_compile.kernels import qlinear as Q
from q3n_compile.kernels import qlinear_swap as SW

from .subprocess_lane import run_without_interpreter

op = torch.ops.q3n.qlinear

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
# Max |kernel - float64| relative to max |float64 result|: fp32 is exact up to accumulation order;
# 16-bit outputs are rounded once (2^-11 / 2^-8), and the 16-bit-activation tensor-core path
# rounds each dequantised weight to x's dtype too.
TOL = {f32: 2e-5, f16: 3e-3, bf16: 2e-2}


# Forced launches the interpreter runs on small shapes (split-K GEMV and tiles, dequant + matmul).
INTERPRETER_PATHS = [
    dict(path="gemv", BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, num_warps=4, num_stages=1),
    dict(path="mm", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, num_warps=4, num_stages=1),
    dict(path="dequant"),
]
INTERPRETER_PATH_IDS = ["gemv_splitk", "mm_splitk", "dequant"]


def _gen(name):
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _packed(gen, N, K, bits, group, sym, device="cpu"):
    codes = torch.randint(0, 1 << bits, (N, K), generator=gen, dtype=torch.int64)
    ng = 1 if group == P.PER_CHANNEL else K // group
    scales = (torch.rand(ng, N, generator=gen) * 0.02 + 0.002).to(torch.float16)
    zeros = None if sym else torch.randint(0, 1 << bits, (ng, N), generator=gen).to(torch.uint8)
    return P.pack(codes, scales, zeros, bits, group).to(device)


def _args(x, pw, bias, smooth, act):
    return (x, pw.qweight, pw.scales, pw.zeros, bias, smooth, pw.bits, pw.group_size,
            pw.in_features, act)


def _exact(x, pw, bias, smooth, act, ag=Q.PER_TOKEN):
    """The op's function in float64 (activation codes and scales from x in float32, as defined)."""
    return Q.reference(x.double(), pw.qweight, pw.scales, pw.zeros,
                       None if bias is None else bias.double(), smooth, pw.bits, pw.group_size,
                       pw.in_features, act, ag)


def _check(x, pw, bias=None, smooth=None, act="none", path=None, ag=Q.PER_TOKEN):
    """The op (or `path` forced) against float64, to TOL of the result's largest magnitude."""
    args = _args(x, pw, bias, smooth, act)
    if path is None:
        out = op(*args, ag)
    else:
        out = Q._launch(*args, interpreter=x.device.type == "cpu", path=path, act_group_size=ag)
    assert out.shape == (x.shape[0], pw.out_features) and out.dtype == x.dtype
    exact = _exact(x, pw, bias, smooth, act, ag)
    scale = exact.abs().max().item()
    err = (out.double() - exact).abs().max().item()
    assert err <= TOL[x.dtype] * scale, f"max err {err:.3g} > {TOL[x.dtype]:.1g} * {scale:.3g}"
    return out


# ---------------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_round_trip_every_value(bits):
    # Every code value appears in every position of a word; K off the 32-alignment.
    for K in (45, 96, 256):
        N = 7
        codes = (torch.arange(N * K).reshape(N, K) * 7919 % (1 << bits)).to(torch.uint8)
        codes[0, : min(K, 1 << bits)] = torch.arange(min(K, 1 << bits))
        q = P.pack_codes(codes, bits)
        assert q.dtype == torch.int32 and q.shape == (P.packed_rows(bits, K), N)
        assert torch.equal(P.unpack_codes(q, bits, K), codes)
        # Dense: bits per weight exactly, over K padded to a multiple of 32.
        assert q.numel() * 4 == P.padded_k(K) * bits // 8 * N


def test_six_bit_is_dense():
    N, K = 5, 96
    q = P.pack_codes(torch.randint(0, 64, (N, K), dtype=torch.uint8), 6)
    assert q.numel() * 4 == -(-K * 6 // 8) * N  # 4 values in 3 bytes: 72 bytes per column
    assert P.planes(6) == (4, 2)
    assert P.plane_rows(6, K) == {4: (0, 12), 2: (12, 6)}
    assert q.numel() * 4 < N * K  # never one byte per value


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        P.pack_codes(torch.full((2, 32), 16), 4)
    with pytest.raises(ValueError, match="bits must be"):
        P.planes(9)


def test_plane_starts_are_the_planes_first_rows():
    # The kernels' ROW4 / ROW2 / ROW1: where each plane starts, 0 for a plane the width lacks.
    # K = 100 padded to 128: the 4-bit plane in int32 rows 0..15 (128 x 4 bits), then the 2-bit.
    assert P.plane_starts(6, 100) == (0, 16, 0)
    for bits in range(P.MIN_BITS, P.MAX_BITS + 1):
        for k in (32, 100, 4096):
            rows = P.plane_rows(bits, k)
            assert P.plane_starts(bits, k) == tuple(rows[p][0] if p in rows else 0
                                                    for p in (4, 2, 1))


def test_packed_weight_dequantize_matches_definition():
    gen = _gen("deq")
    pw = _packed(gen, 9, 64, 5, 32, sym=False)
    codes = pw.codes().double()
    g = torch.arange(64) // 32
    want = (codes - pw.zeros.double().t()[:, g]) * pw.scales.double().t()[:, g]
    torch.testing.assert_close(pw.dequantize(torch.float64), want, rtol=0, atol=0)
    sym = _packed(gen, 9, 64, 3, -1, sym=True)
    want = (sym.codes().double() - 4) * sym.scales.double().t()
    torch.testing.assert_close(sym.dequantize(torch.float64), want, rtol=0, atol=0)
    assert pw.nbytes == pw.qweight.numel() * 4 + pw.scales.numel() * 2 + pw.zeros.numel()


# ---------------------------------------------------------------------------------------------
# The kernels against float64

# (weight bits, activation format): the formats the design and the issue name.
FORMATS = [(4, "none"), (6, "none"), (8, "none"), (4, "int8"), (8, "int8"), (6, "int12")]
# (group, symmetric, M, bias, dtype) cycled over the formats: every group size, sym/asym, bias,
# every M and dtype meet every format.
VARIANTS = [(32, True, 1, True, f32), (64, False, 5, False, bf16), (128, False, 33, True, f16),
            (-1, False, 5, True, bf16), (-1, True, 33, False, f32)]


def _cases():
    for bits, act in FORMATS:
        for group, sym, M, bias, dtype in VARIANTS:
            if bits == 8:
                sym = True  # 8-bit weights with zero points are refused (see test_supports)
            name = f"w{bits}_{act}_g{group}_{'sym' if sym else 'asym'}_m{M}_{str(dtype)[6:]}" + (
                "_bias" if bias else "")
            yield pytest.param(bits, act, group, sym, M, bias, dtype, id=name)


@pytest.mark.parametrize("bits,act,group,sym,M,bias,dtype", list(_cases()))
def test_kernel_against_float64(bits, act, group, sym, M, bias, dtype):
    gen = _gen(f"{bits}{act}{group}{sym}{M}{dtype}")
    N = 45
    K = 128 if group != -1 else 83  # odd K only per-channel (groups must divide K)
    pw = _packed(gen, N, K, bits, group, sym)
    x = torch.randn(M, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    _check(x, pw, b, act=act)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, -1, True), (5, 64, True),
                                            (2, 32, False), (3, -1, False), (7, 128, False)])
def test_fp8_activations_and_other_widths(bits, group, sym):
    gen = _gen(f"fp8{bits}{group}")
    K = 128 if group != -1 else 70
    pw = _packed(gen, 37, K, bits, group, sym)
    x = torch.randn(5, K, generator=gen)
    x[:, 3] *= 30  # an outlier channel
    _check(x, pw, torch.randn(37, generator=gen), act="fp8")
    _check(x.to(bf16), pw, act="none")


def test_smooth_vector_is_applied_before_quantization():
    gen = _gen("smooth")
    pw = _packed(gen, 33, 64, 4, 32, False)
    x = torch.randn(5, 64, generator=gen)
    smooth = torch.rand(64, generator=gen) + 0.5
    for act in ("int8", "fp8", "int12"):
        out = _check(x, pw, smooth=smooth, act=act)
        plain = op(x * smooth, pw.qweight, pw.scales, pw.zeros, None, None, 4, 32, 64, act)
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", INTERPRETER_PATHS, ids=INTERPRETER_PATH_IDS)
@pytest.mark.parametrize("act", ["none", "int8"])
def test_forced_paths(path, act):
    gen = _gen(f"path{path['path']}{act}")
    pw = _packed(gen, 40, 128, 4, 32, False)
    x = torch.randn(3, 128, generator=gen).to(bf16)
    _check(x, pw, torch.randn(40, generator=gen).to(bf16), act=act, path=path)


@pytest.mark.parametrize("M,head", [(37, 32), (34, 32), (20, 3)])
@pytest.mark.parametrize("act,ag", [("none", Q.PER_TOKEN), ("int8", Q.PER_TOKEN), ("fp8", 32)])
def test_forced_row_split(M, head, act, ag):
    # The op as two launches (the rows' head, then the rest as dispatched): every path's rows
    # are independent, so it is the op's function, bias on both parts.
    gen = _gen(f"rowsplit{M}{head}{act}{ag}")
    pw = _packed(gen, 40, 64, 4, 32, False)
    x = torch.randn(M, 64, generator=gen).to(f16)
    bias = torch.randn(40, generator=gen).to(f16)
    out = _check(x, pw, bias, act=act, ag=ag, path=dict(path="rowsplit", HEAD=head))
    whole = [_check(x[:head], pw, bias, act=act, ag=ag), _check(x[head:], pw, bias, act=act, ag=ag)]
    assert torch.equal(out, torch.cat(whole))


@pytest.mark.parametrize("path", [None, dict(path="rowsplit", HEAD=3)])
def test_launch_writes_into_rows_of_an_output(path):
    # `out` (the row split's halves): y lands in the given rows, the rows around them are left
    # as they were, and the call returns `out` itself, equal to the call without it.
    gen = _gen(f"launchout{path is None}")
    pw = _packed(gen, 40, 64, 4, 32, False)
    x = torch.randn(7, 64, generator=gen).to(f16)
    bias = torch.randn(40, generator=gen).to(f16)
    args = _args(x, pw, bias, None, "int8")
    want = Q._launch(*args, interpreter=True, path=path)
    big = torch.full((11, 40), 7.0, dtype=f16)
    got = Q._launch(*args, interpreter=True, path=path, out=big[2:9])
    assert got.data_ptr() == big[2:9].data_ptr() and torch.equal(got, want)
    assert (big[:2] == 7).all() and (big[9:] == 7).all()


def test_forced_row_split_rest_path_and_concurrent_off_a_gpu():
    # REST_PATH forces the rest's launch; CONCURRENT (a second stream on a GPU) runs the two in
    # one stream here: the same rows as the halves' own calls.
    gen = _gen("rowsplitrest")
    pw = _packed(gen, 40, 64, 4, 32, False)
    x = torch.randn(9, 64, generator=gen).to(f16)
    rest = dict(path="mm", BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, SPLIT_K=2, num_warps=4,
                num_stages=1)
    out = _check(x, pw, path=dict(path="rowsplit", HEAD=4, REST_PATH=rest, CONCURRENT=True))
    args = _args(x[4:], pw, None, None, "none")
    assert torch.equal(out[4:], Q._launch(*args, interpreter=True, path=rest))
    assert torch.equal(out[:4], _check(x[:4], pw))


def test_row_split_refuses_a_head_outside_the_rows():
    gen = _gen("rowsplitbad")
    pw = _packed(gen, 40, 64, 4, 32, False)
    x = torch.randn(5, 64, generator=gen)
    for head in (0, 5, 2.0):
        with pytest.raises(ValueError, match="rowsplit path's HEAD must be 1-4 rows of the 5"):
            _check(x, pw, path=dict(path="rowsplit", HEAD=head))
    for part in ("HEAD_PATH", "REST_PATH"):
        with pytest.raises(ValueError, match="HEAD_PATH and REST_PATH cannot split again"):
            _check(x, pw, path={"path": "rowsplit", "HEAD": 2, part: dict(path="rowsplit")})


@pytest.mark.parametrize("K", [70, 200])  # a row in one tile (read once); rows swept twice
@pytest.mark.parametrize("act", ["int8", "fp8", "int12"])
def test_activation_quantizer_matches_reference_exactly(act, K):
    assert (K <= Q.ACT_QUANT_INTERPRETER[1]) == (K == 70)
    gen = _gen(f"aq{act}{K}")
    x = torch.randn(37, K, generator=gen) * torch.logspace(-3, 2, K)
    x[4] = 0.0  # all-zero row: scale 1, codes 0
    x[5, 7] = 0.5 * 2047 / 2047  # values at exact ties appear after scaling for some rows
    smooth = torch.rand(K, generator=gen) + 0.5
    for sm in (None, smooth):
        codes, scales = Q.quantize_activations_triton(x, act, sm, interpreter=True)
        want_codes, want_scales = Q.quantize_activations(x, act, sm)
        torch.testing.assert_close(scales, want_scales, rtol=0, atol=0)
        torch.testing.assert_close(codes.float(), want_codes, rtol=0, atol=0)
    assert scales[4] == 1 and codes[4].abs().max() == 0


@pytest.mark.parametrize("act", ["int8", "fp8", "int12"])
@pytest.mark.parametrize("ag", [Q.PER_TOKEN, 32, 128])
@pytest.mark.parametrize("dtype", [f16, f32])
def test_fused_dequantised_activations_are_codes_times_scales(act, ag, dtype):
    # The dequant path's one-pass activations (dequant=True) are c * s rounded once to x's dtype:
    # what the codes and scales give (the interpreter truncates fp32 -> bf16 instead of
    # rounding, so bf16 is checked on the GPU).
    gen = _gen(f"fq{act}{ag}{dtype}")
    x = (torch.randn(9, 200, generator=gen) * torch.logspace(-2, 1, 200)).to(dtype)
    smooth = torch.rand(200, generator=gen) + 0.5
    codes, scales = Q.quantize_activations_triton(x, act, smooth, True, ag)
    a, scales2 = Q.quantize_activations_triton(x, act, smooth, True, ag, dequant=True)
    assert a.dtype == dtype and torch.equal(scales, scales2)
    assert torch.equal(a, AD.dequantize_codes(codes, scales, ag, dtype))


def test_rounding_is_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, -2.5, 3.49]])
    codes, scales = Q.quantize_activations_triton(x, "int8", None, interpreter=True)
    assert scales.item() == 1.0
    assert codes[0].tolist() == [127, 0, 2, -2, 3]


def test_supports_reasons():
    gen = _gen("supports")
    pw = _packed(gen, 16, 64, 4, 32, False)
    x = torch.randn(3, 64)
    args = lambda **kw: dict(dict(x=x, qweight=pw.qweight, scales=pw.scales, zeros=pw.zeros,  # noqa: E731
                                  bias=None, smooth=None, bits=4, group_size=32, in_features=64,
                                  act="none"), **kw)
    assert Q.supports(**args()) is None
    assert "2..8" in Q.supports(**args(bits=9))
    assert "group size 48" in Q.supports(**args(group_size=48))
    assert "2-D" in Q.supports(**args(x=x[None]))
    assert "int64" in Q.supports(**args(x=x.long()))
    assert "input features" in Q.supports(**args(x=torch.randn(3, 32)))
    assert "smoothing vector needs quantized" in Q.supports(**args(smooth=torch.ones(64)))
    assert "bias must be" in Q.supports(**args(bias=torch.ones(15)))
    assert "symmetric: true" in Q.supports(**args(bits=8, act="int8"))
    assert "rows" in Q.supports(**args(bits=6))
    with pytest.raises(ValueError, match="group size 48"):
        Q._launch(*args(group_size=48).values(), interpreter=True)


def test_supports_and_path_are_decided_once_per_signature(monkeypatch):
    # A repeated call signature skips supports() and choose_path() (host time at decode); a new
    # shape, dtype or format decides again; a forced path is never remembered; a refused call
    # is refused every time.
    seen = []
    choose, check = Q.choose_path, Q.supports
    monkeypatch.setattr(Q, "choose_path", lambda *a, **k: seen.append("path") or choose(*a, **k))
    monkeypatch.setattr(Q, "supports", lambda *a, **k: seen.append("supports") or check(*a, **k))
    monkeypatch.setattr(Q, "_PATHS", {})
    gen = _gen("once")
    pw = _packed(gen, 40, 64, 4, 32, True)
    x = torch.randn(3, 64, generator=gen)
    first = op(*_args(x, pw, None, None, "int8"))
    assert seen == ["supports", "path"]
    assert torch.equal(op(*_args(x, pw, None, None, "int8")), first)
    assert seen == ["supports", "path"]
    op(*_args(x[:2], pw, None, None, "int8"))  # other rows
    op(*_args(x.half(), pw, None, None, "int8"))  # other dtype
    op(*_args(x, pw, None, None, "fp8"))  # other format
    assert seen == ["supports", "path"] * 4
    _check(x, pw, act="int8", path=Q.choose_path(3, 40, 64, 4, 32, "int8", f32, x.device,
                                                  interpreter=True))
    _check(x, pw, act="int8", path=Q.choose_path(3, 40, 64, 4, 32, "int8", f32, x.device,
                                                  interpreter=True))
    assert seen.count("supports") == 6 and len(Q._PATHS) == 4
    for _ in range(2):
        with pytest.raises(ValueError, match="input features"):
            op(torch.randn(3, 63), *_args(x, pw, None, None, "int8")[1:])


@pytest.mark.parametrize("K,group,ag", [(64, 64, Q.PER_TOKEN), (96, 32, 64)],
                         ids=["per_token", "act_groups_of_64"])
def test_fake_with_symbolic_rows_and_opcheck(K, group, ag):
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (DimDynamic, ShapeEnv,
                                                       StatelessSymbolicContext)

    gen = _gen(f"fake{ag}")
    pw = _packed(gen, 24, K, 6, group, False)
    mode = FakeTensorMode(shape_env=ShapeEnv())
    x = mode.from_tensor(torch.randn(7, K), source=ConstantSource("x"),
                         symbolic_context=StatelessSymbolicContext(
                             dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC]))
    with mode:
        fq = tuple(mode.from_tensor(t, static_shapes=True) for t in (pw.qweight, pw.scales, pw.zeros))
        assert Q.supports(x, *fq, None, None, 6, group, K, "int12", ag) is None
        out = op(x, *fq, None, None, 6, group, K, "int12", ag)
    assert isinstance(out.shape[0], torch.SymInt) and out.shape[1] == 24
    xr = torch.randn(5, K, generator=gen)
    torch.library.opcheck(op, (xr, pw.qweight, pw.scales, pw.zeros, torch.randn(24), None, 6,
                               group, K, "int8", ag))


def test_choose_path_table():
    cpu = torch.device("cpu")
    cuda = torch.device("cuda", 0)
    # 8-, 6-, 4- and 2-bit weights take the gemv1p path (tests/kernels/test_qlinear_gemv1p.py);
    # the word-per-plane GEMV and its split rule are those of the other widths.
    assert Q.choose_path(1, 4096, 4096, 4, 128, "none", bf16, cpu, interpreter=True)["path"] == "gemv1p"
    assert Q.choose_path(1, 4096, 4096, 6, 128, "none", bf16, cpu, interpreter=True)["path"] == "gemv1p"
    assert Q.choose_path(1, 4096, 4096, 5, 128, "none", bf16, cpu, interpreter=True)["path"] == "gemv"
    assert Q.choose_path(33, 64, 64, 4, 32, "none", f32, cpu, interpreter=True)["BLOCK_K"] == 32
    assert Q.choose_path(1, 4096, 4096, 4, 128, "none", bf16, cuda, sm_count=132)["path"] == "gemv1p"
    # From 2 rows the swapped tile, its 8-row tile, every format (s16run5).
    for bits, act in ((4, "none"), (8, "none"), (6, "int12"), (2, "none"), (4, "fp8"), (5, "int8")):
        two = Q.choose_path(2, 28672, 8192, bits, 128, act, bf16, cuda, sm_count=132)
        assert (two["path"], two["BLOCK_M"]) == ("mmT", 8)
    one = Q.choose_path(1, 4096, 4096, 5, 128, "none", bf16, cuda, sm_count=132)
    assert one["path"] == "gemv" and one["SPLIT_K"] == 8  # 64 column blocks: cover the SMs
    mid = Q.choose_path(1, 12288, 4096, 7, 128, "none", bf16, cuda, sm_count=132)
    assert mid["SPLIT_K"] == 4  # at least 4, though 2 would cover the SMs
    wide = Q.choose_path(1, 28672, 8192, 3, 128, "none", bf16, cuda, sm_count=132)
    assert wide["SPLIT_K"] == 4  # not 1, though 448 column blocks cover the SMs
    short = Q.choose_path(1, 64, 128, 5, 32, "none", bf16, cuda, sm_count=132)
    assert short["SPLIT_K"] == 2  # 4 K blocks: each split keeps 2
    m16 = Q.choose_path(16, 4096, 4096, 4, 128, "none", bf16, cuda, sm_count=132)
    assert m16["path"] == "mmT" and m16["SPLIT_K"] == 8  # swapped tiles, K split as the GEMV's
    m32 = Q.choose_path(17, 12288, 4096, 4, 128, "none", bf16, cuda, sm_count=132)
    assert (m32["path"], m32["BLOCK_M"], m32["SPLIT_K"]) == ("mmT", 32, 2)  # the mm split rule
    m64 = Q.choose_path(64, 28672, 8192, 4, 128, "none", bf16, cuda, sm_count=132)
    # 224 tiles of 64 rows fill 0.7 of the 264 program slots: K unsplit (MMT_FILL); 96 do not.
    assert (m64["path"], m64["BLOCK_M"], m64["SPLIT_K"]) == ("mmT", 64, 1)
    assert Q.choose_path(64, 12288, 4096, 4, 128, "none", bf16, cuda, sm_count=132)["SPLIT_K"] == 4
    assert Q.choose_path(64, 28672, 8192, 6, 128, "none", bf16, cuda, sm_count=132)["SPLIT_K"] == 4
    assert Q.choose_path(64, 64, 256, 4, 128, "none", bf16, cuda, sm_count=132)["SPLIT_K"] == 1
    # x permuted per block: 4-bit weights; 16-bit activations from 17 rows on 32M+ weights,
    # quantized ones (permuted by the quantizer) from 9 rows.
    assert m64["XPERM"] and m32["XPERM"] and not m16["XPERM"]
    assert not Q.choose_path(64, 4096, 4096, 4, 128, "none", bf16, cuda, sm_count=132)["XPERM"]
    # 6-bit at 64 rows: registers capped and x permuted where the grid has 2+ programs per SM.
    w6 = Q.choose_path(64, 28672, 8192, 6, 128, "none", bf16, cuda, sm_count=132)
    assert w6["XPERM"] and w6["maxnreg"] == 128
    w6 = Q.choose_path(64, 4096, 4096, 6, 128, "int12", bf16, cuda, sm_count=132)
    assert not w6["XPERM"] and "maxnreg" not in w6
    assert not Q.choose_path(32, 28672, 8192, 6, 128, "none", bf16, cuda, sm_count=132)["XPERM"]
    assert not Q.choose_path(64, 28672, 8192, 8, -1, "int8", bf16, cuda, sm_count=132)["XPERM"]
    assert Q.choose_path(9, 4096, 4096, 4, 128, "fp8", bf16, cuda, sm_count=132)["XPERM"]
    assert not Q.choose_path(8, 4096, 4096, 4, 128, "fp8", bf16, cuda, sm_count=132)["XPERM"]
    # 4-bit weights to 128 rows: the 64-row tile, x permuted, K in 2; others dequantise.
    m128 = Q.choose_path(128, 4096, 4096, 4, 128, "int12", bf16, cuda, sm_count=132)
    assert (m128["path"], m128["BLOCK_M"], m128["SPLIT_K"], m128["XPERM"]) == ("mmT", 64, 2, True)
    assert Q.choose_path(128, 12288, 4096, 4, 128, "int8", bf16, cuda, sm_count=132)["SPLIT_K"] == 1
    assert Q.choose_path(65, 4096, 4096, 6, 128, "none", bf16, cuda, sm_count=132)["path"] == "dequant"
    assert Q.choose_path(129, 4096, 4096, 4, 128, "none", bf16, cuda, sm_count=132)["path"] == "dequant"
    assert Q.choose_path(16, 4096, 4096, 8, -1, "none", bf16, cuda, sm_count=132)["path"] == "mmT"
    for act in ("int8", "fp8", "int12"):  # quantized activations too (dequantised first)
        assert Q.choose_path(16, 4096, 4096, 4, 128, act, bf16, cuda, sm_count=132)["path"] == "mmT"
    assert Q.choose_path(16, 4096, 4096, 8, -1, "int8", bf16, cuda, sm_count=132)["path"] == "mmT"
    few = Q.choose_path(5, 4096, 4096, 4, 32, "none", bf16, cuda, sm_count=132)
    assert (few["path"], few["BLOCK_M"], few["BLOCK_K"]) == ("mmT", 8, 128)  # 8: the MMA's least N
    big = Q.choose_path(4096, 4096, 4096, 4, 128, "none", bf16, cuda, sm_count=132)
    assert big["path"] == "dequant"
    a8 = Q.choose_path(256, 4096, 4096, 4, 32, "int8", bf16, cuda, sm_count=132)
    assert a8["path"] == "mm" and a8["BLOCK_K"] == 32  # BLOCK_K <= group
    # mm's K split (s25run4): where its tiles are fewer than the SMs, as many splits as keep
    # the programs within one wave of three an SM (at most 6, each split >= 2 K blocks).
    def w8a8(m, n, k):
        return Q.choose_path(m, n, k, 8, -1, "int8", bf16, cuda, sm_count=132)
    assert (w8a8(256, 4096, 4096 + 64)["path"], w8a8(256, 4096, 4096 + 64)["SPLIT_K"]) == (
        "mm", 3)  # (4096^2 itself takes cublas8 from 65 rows)
    assert w8a8(96, 4096, 12288)["SPLIT_K"] == 6  # 64 tiles
    assert w8a8(160, 5120, 5120)["SPLIT_K"] == 3  # 120 tiles
    assert w8a8(96, 12288, 4096)["SPLIT_K"] == 1  # 192 tiles: a wave without a split
    g32 = Q.choose_path(96, 4096, 256, 5, 32, "int8", bf16, cuda, sm_count=132)
    assert (g32["path"], g32["SPLIT_K"]) == ("mm", 3)  # 8 K blocks of 32: 6 would leave one
    # Above 256 rows (8-bit) and 64 (12-bit): dequantise + cuBLAS where cublas8 does not take
    # the format (group 32 here).
    assert Q.choose_path(1024, 4096, 4096, 4, 32, "int8", bf16, cuda, sm_count=132)["path"] == "dequant"
    assert Q.choose_path(65, 4096, 4096, 6, 128, "int12", bf16, cuda, sm_count=132)["path"] == "dequant"
    assert Q.choose_path(64, 4096, 4096, 6, 128, "int12", bf16, cuda, sm_count=132)["path"] == "mmT"
    for act in ("int8", "fp8", "int12"):
        assert Q.choose_path(4096, 4096, 4096, 4, 32, act, bf16, cuda, sm_count=132)["path"] == "dequant"
    for m in (1, 3, 16, 17, 64, 200, 256, 1000, 5000):
        for act in Q.ACT_FORMATS:
            cfg = Q.choose_path(m, 12288, 4096, 6, 64, act, bf16, cuda, sm_count=132)
            assert cfg["path"] in ("gemv", "gemv1p", "mm", "mmT", "dequant", "cublas8")
            if cfg["path"] == "mmT":  # K blocks of 128 channels whatever the group
                assert cfg["BLOCK_K"] == 128
            elif cfg["path"] != "dequant":
                assert cfg["BLOCK_K"] <= 64


def test_reference_path_without_interpreter():
    code = ("""
        import torch
        from q3n_compile.kernels import qlinear as Q, packing as P, contract
        assert contract.backend_for(torch.device("cpu")) == "reference"
        g = torch.Generator().manual_seed(3)
        codes = torch.randint(0, 16, (20, 64), generator=g)
        pw = P.pack(codes, torch.rand(2, 20, generator=g).half(), None, 4, 32)
        x = torch.randn(3, 64, generator=g).bfloat16()
        args = (x, pw.qweight, pw.scales, None, None, None, 4, 32, 64, "int8")
        assert torch.equal(torch.ops.q3n.qlinear(*args), Q.reference(*args))
        print("ok")
    """)
    run_without_interpreter(code)


# ---------------------------------------------------------------------------------------------
# GPU lane: compiled kernels at real sizes, every path the dispatch table picks.

def _w4a16_chain(pws, path_for):
    """(chain, exact) for W4A16 g128 linears `pws` in a row, each output times 0.05: chain(a)
    through the op's launcher with path path_for(pw, a), exact(a) in float64 with the bf16
    rounding of each output."""
    def chain(a):
        for pw in pws:
            a = Q._launch(a, pw.qweight, pw.scales, pw.zeros, None, None, 4, 128,
                          pw.in_features, "none", interpreter=False, path=path_for(pw, a)) * 0.05
        return a

    def exact(a):
        for pw in pws:
            w = pw.dequantize(torch.float64).cuda()
            a = (a.double() @ w.t()).to(bf16).double() * 0.05
        return a

    return chain, exact


def _replay_with_new_x(chain, exact, x, gen, eager_equal: bool) -> None:
    """chain(x) captured in a CUDA graph, replayed three times after x takes new values: the
    output against exact(x) (float64 within four bf16 tolerances; the chain's roundings
    compound) and, with `eager_equal`, equal bit for bit to chain(x) called eagerly."""
    chain(x)  # compiled and the tickets made before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(x)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, generator=gen).to(x.dtype).cuda())
        graph.replay()
        torch.cuda.synchronize()
        if eager_equal:
            assert torch.equal(out, chain(x))
        want = exact(x)
        err = (out.double() - want).abs().max().item()
        assert err <= 4 * TOL[bf16] * want.abs().max().item(), err


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_FORMATS = [(4, "none", 128, False), (6, "none", 128, False), (8, "none", -1, True),
               (4, "int8", 128, False), (8, "int8", -1, True), (6, "int12", 64, False),
               (4, "fp8", 128, False), (6, "fp8", 128, True)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("N", [4096, 12288])
@pytest.mark.parametrize("M", [1, 2, 16, 48, 100, 256, 4096])
@pytest.mark.parametrize("bits,act,group,sym", GPU_FORMATS,
                         ids=[f"w{b}_{a}_g{g}" for b, a, g, _ in GPU_FORMATS])
def test_gpu_against_float64(bits, act, group, sym, M, N):
    K = 4096
    gen = _gen(f"gpu{bits}{act}{M}{N}")
    pw = _packed(gen, N, K, bits, group, sym, device="cuda")
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()
    bias = torch.randn(N, generator=gen).to(bf16).cuda()
    _check(x, pw, bias, act=act)


# Every GPU path at model widths: split GEMV, small and large tiles, dequantise + cuBLAS.
GPU_PATHS = [
    dict(path="gemv", BLOCK_N=64, BLOCK_K=128, SPLIT_K=8, num_warps=4, num_stages=2),
    dict(path="gemv1p", BLOCK_M=2, BLOCK_N=128, BLOCK_K=128, SPLIT_K=8, num_warps=8,
         num_stages=1, PREFETCH=True, REDUCE="ticket"),
    dict(path="mm", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=4),
    dict(path="mm", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, SPLIT_K=1, num_warps=8, num_stages=3),
    dict(path="dequant"),
]
GPU_PATH_IDS = ["gemv_split8", "gemv1p_split8", "mm16_split4", "mm128", "dequant"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("path", GPU_PATHS, ids=GPU_PATH_IDS)
@pytest.mark.parametrize("act", ["none", "int8", "fp8", "int12"])
def test_gpu_every_path(path, act):
    gen = _gen(f"gpupath{path['path']}{act}")
    K, N, M = 4096, 4096, 17 if not path["path"].startswith("gemv") else 2
    pw = _packed(gen, N, K, 4, 128, False, device="cuda")
    x = torch.randn(M, K, generator=gen).to(f16).cuda()
    _check(x, pw, None, act=act, path=path)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (6, 128, False), (8, -1, True),
                                            (3, 32, True), (5, 64, False)])
@pytest.mark.parametrize("dtype", [bf16, f16])
def test_gpu_dequantise_kernel_is_the_definition(bits, group, sym, dtype):
    # The dequant path's weight W [N, K] (weight_unpack's GPU tile) with K and N off the tile:
    # (q - z) * s in fp32, rounded once.
    N, K = 1000, 3968 if group != -1 else 4040
    pw = _packed(_gen(f"gpudq{bits}{group}{dtype}"), N, K, bits, group, sym, device="cuda")
    got = Q.dequantize_triton(pw.qweight, pw.scales, pw.zeros, bits, group, K, dtype)
    assert torch.equal(got, pw.dequantize(torch.float32).to(dtype))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("act", ["int8", "fp8", "int12"])
@pytest.mark.parametrize("ag", [Q.PER_TOKEN, 128])
def test_gpu_fused_dequantised_activations(act, ag):
    gen = _gen(f"gpufq{act}{ag}")
    x = (torch.randn(300, 4096, generator=gen) * 3).to(bf16).cuda()
    codes, scales = Q.quantize_activations_triton(x, act, None, False, ag)
    a, _ = Q.quantize_activations_triton(x, act, None, False, ag, dequant=True)
    assert torch.equal(a, AD.dequantize_codes(codes, scales, ag, bf16))
    # The store permuted for mmT's XPERM is the same values in permute_x_blocks's places.
    p, _ = Q.quantize_activations_triton(x, act, None, False, ag, dequant=True, perm128=True)
    assert torch.equal(p, SW.permute_x_blocks(a))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("act", ["int8", "fp8", "int12"])
@pytest.mark.parametrize("K", [4096, 4000, 12288, 20000])  # one tile (12288: padded); looped
def test_gpu_activation_quantizer_launches_agree(act, K):
    # The dispatched launch (the row whole in one tile to 16384 columns) against the looped form
    # (the row read twice, one row a program): the same fp32 arithmetic, so the same bits; and
    # both against the op's definition (codes at most one apart where the GPU's fp32 division
    # and torch's round a tie differently, on a tiny fraction of them).
    gen = _gen(f"gpuaq{act}{K}")
    x = (torch.randn(300, K, generator=gen) * torch.logspace(-2, 1, K)).to(bf16).cuda()
    x[7] = 0.0
    smooth = (torch.rand(K, generator=gen) + 0.5).cuda()
    for sm in (None, smooth):
        codes, scales = Q.quantize_activations_triton(x, act, sm, False)
        looped = Q.quantize_activations_triton(x, act, sm, False, launch=(1, 4096, 16, False))
        assert torch.equal(codes.float(), looped[0].float()) and torch.equal(scales, looped[1])
        want_c, want_s = Q.quantize_activations(x, act, sm)
        torch.testing.assert_close(scales, want_s, rtol=1e-6, atol=0)
        diff = (codes.float() - want_c).abs()
        assert diff.max() <= (1 if act != "fp8" else 32) and (diff > 0).float().mean() < 1e-3
    assert scales[7] == 1 and codes[7].float().abs().max() == 0


@pytest.mark.gpu
@needs_cuda
def test_gpu_fp8_storage_where_supported():
    x = torch.randn(8, 256, device="cuda")
    codes, _ = Q.quantize_activations_triton(x, "fp8", None, interpreter=False)
    want = torch.float8_e4m3fn if Q.fp8_supported(x.device) else torch.float16
    assert codes.dtype == want
    ref, _ = Q.quantize_activations(x, "fp8")
    torch.testing.assert_close(codes.float(), ref, rtol=0, atol=0)
