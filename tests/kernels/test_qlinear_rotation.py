"""q3n::qlinear with the block-Hadamard rotation of its activations (``rotation`` 128 or 32,
:mod:`q3n_compile.kernels.hadamard`) against a float64 reference.

CPU lane: the rotation's definition, the quantizer in the interpreter against
``quantize_activations``, the op on every path the interpreter runs (bit planes and the K-major
int8 layout, per token and per activation group, with a smoothing vector), that the rotation
keeps the layer's function and helps a row with an outlier channel, and the refusals. GPU lane
(-m gpu): the compiled quantizer (one tile, looped rows, narrow rows of many programs) and the
op at model widths.
"""

import math

import pytest
import torch

from q3n_compile.kernels import hadamard as HD
from q3n_compile.kernels import packing as P
from q3n_compile.kernels import qlinear as Q
from q3n_compile.quant.algorithms import quantize_rtn
from q3n_compile.quant.config import LayerFormat

from .subprocess_lane import json_without_interpreter
from .test_norm_act_quant import _normalised64
from .test_qlinear import INTERPRETER_PATH_IDS, INTERPRETER_PATHS, TOL, _gen, _packed

op = torch.ops.q3n.qlinear

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
ROT = HD.ROTATION_BLOCK
# The block sizes the kernels' tests run: the default's 128 and the smallest, 32 (64 lies
# between: the same code with another constexpr).
ROTS = [128, 32]


def _dense_rotation(k: int, rot: int) -> torch.Tensor:
    """R = blockdiag(H / sqrt(rot), ...) built from the recursive Sylvester definition."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < rot:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.block_diag(*([h / math.sqrt(rot)] * (k // rot)))


@pytest.mark.parametrize("rot", [32, 64, 128])
def test_rotation_definition(rot):
    h = HD.hadamard_pm1(rot, torch.float64)
    assert torch.equal(h, h.t()) and set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h, rot * torch.eye(rot, dtype=torch.float64))
    gen = _gen(f"rotdef{rot}")
    x = torch.randn(5, 384, generator=gen, dtype=torch.float64)
    r = _dense_rotation(384, rot)
    torch.testing.assert_close(HD.rotate_rows(x, rot), x @ r, rtol=1e-12, atol=1e-12)
    # The Hessian of the rotated rows: R^T (X^T X) R.
    hx = x.t() @ x
    torch.testing.assert_close(HD.rotate_hessian(hx, rot), r.t() @ hx @ r, rtol=1e-10,
                               atol=1e-10)
    with pytest.raises(ValueError, match=f"K a multiple of {rot}, got 200"):
        HD.rotate_rows(torch.zeros(2, 200), rot)


def _steps(codes: torch.Tensor) -> torch.Tensor:
    """Codes as the index of their value among the format's values: integers as they are;
    float8 e4m3 codes by their bit pattern (sign and magnitude), so that neighbours differ by
    one whatever their exponent."""
    if codes.dtype != torch.float8_e4m3fn:
        return codes.float()
    bits = codes.view(torch.uint8).to(torch.int32)
    mag = (bits & 0x7F).float()
    return torch.where(bits >= 0x80, -mag, mag)


def _close_codes(codes, scales, want_codes, want_scales, act="int8"):
    """The kernels' rotation sums each block in another float32 order than torch: scales may
    differ by float32 ulps, and a code by one step (one e4m3 value for fp8) where x'/s lies
    that close to a tie."""
    torch.testing.assert_close(scales, want_scales, rtol=2e-6, atol=0)
    if act == "fp8":
        codes, want_codes = codes.to(torch.float8_e4m3fn), want_codes.to(torch.float8_e4m3fn)
    diff = (_steps(codes) - _steps(want_codes)).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01, diff.sum()


@pytest.mark.parametrize("act", ["int8", "fp8", "int12"])
@pytest.mark.parametrize("dtype", [f32, bf16, f16])
@pytest.mark.parametrize("ag", [Q.PER_TOKEN, 64])
@pytest.mark.parametrize("rot", ROTS)
def test_quantizer_rotates(act, dtype, ag, rot):
    gen = _gen(f"rotq{act}{dtype}{ag}{rot}")
    K = 384  # three blocks; the interpreter's 128-column tiles: the looped per-token form
    x = (torch.randn(17, K, generator=gen) * torch.logspace(-2, 1, K)).to(dtype)
    x[3] = 0.0  # an all-zero row keeps scale 1
    smooth = torch.rand(K, generator=gen) + 0.5
    # The interpreter's launch (128-column tiles), and per token the row whole in one tile:
    # loaded as rows of one rotation block each, and reshaped from [rows, 512] (the GPU forms).
    # (2 programs for 5 tiles: a program takes every other tile.)
    launches = [None] + ([(4, 512, 4), (4, 512, 4, True, False), (4, 512, 4, True, True, 2)]
                         if ag == Q.PER_TOKEN else [])
    for sm in (None, smooth):
        want_codes, want_scales = Q.quantize_activations(x, act, sm, ag, rotation=rot)
        for launch in launches:
            codes, scales = Q.quantize_activations_triton(x, act, sm, interpreter=True,
                                                          act_group_size=ag, rotation=rot,
                                                          launch=launch)
            _close_codes(codes, scales, want_codes, want_scales, act)
            assert (scales[3] == 1).all() and codes[3].abs().max() == 0
        # The rotation comes before the smoothing vector: x' = (x R) * smooth.
        xr = HD.rotate_rows(x, rot) * (1.0 if sm is None else sm)
        plain_codes, plain_scales = Q.quantize_activations(xr, act, None, ag)
        _close_codes(codes, scales, plain_codes, plain_scales, act)


@pytest.mark.parametrize("dequant,perm128", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("rot", ROTS)
def test_quantizer_dequant_and_permuted_forms(dequant, perm128, rot):
    # The forms the dequant, mmT and wg paths take, in both one-tile layouts.
    gen = _gen(f"rotforms{dequant}{perm128}{rot}")
    x = torch.randn(5, 256, generator=gen).to(bf16)
    x[:, 3] *= 40
    want_codes, want_scales = Q.quantize_activations(x, "int8", rotation=rot)
    want = want_codes * want_scales[:, None]
    for launch in (None, (4, 256, 4), (4, 256, 4, True, False), (2, 256, 4, True, True, 2)):
        out, _ = Q.quantize_activations_triton(x, "int8", None, interpreter=True, dequant=dequant,
                                               perm128=perm128, rotation=rot, launch=launch)
        if perm128:
            # Channel k0 + 8r + j of each 128-block is stored at k0 + 16j + r.
            k = torch.arange(256)
            out = out[:, (k // 128) * 128 + (k % 8) * 16 + (k % 128) // 8]
        if dequant:
            torch.testing.assert_close(out.float(), want.to(bf16).float(), rtol=1e-2, atol=0)
        else:
            assert (out.float() - want_codes).abs().max() <= 1


def _check_norm_codes(x, kind, act, sm, ag, interpreter, rot=ROT):
    """q3n::norm_act_quant with a rotation against float64 x_hat R quantized (the kernel rotates
    x's own values and corrects LayerNorm's centring after it: float32 rounding apart, and with
    a mean 100x the spread a scale moves by up to 1e-4 of itself)."""
    codes, scales = Q._norm_act_quant_launch(x, 1e-5, kind, act, sm, interpreter=interpreter,
                                             act_group_size=ag, rotation=rot)
    want_codes, want_scales = Q.quantize_activations(_normalised64(x, kind).to(x.device), act,
                                                     sm, ag, rotation=rot)
    torch.testing.assert_close(scales, want_scales, rtol=1e-4, atol=0)
    if act == "fp8":
        codes, want_codes = codes.to(torch.float8_e4m3fn), want_codes.to(torch.float8_e4m3fn)
    diff = (_steps(codes) - _steps(want_codes)).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01, diff.sum()


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("K", [256, 384])  # one tile; 128-column sweeps
@pytest.mark.parametrize("dtype,mean,ag", [(bf16, 0.0, -1), (f32, 100.0, -1), (bf16, 100.0, 64),
                                           (f16, 3.0, 64)])
@pytest.mark.parametrize("rot", ROTS)
def test_norm_act_quant_rotates(kind, K, dtype, mean, ag, rot):
    gen = _gen(f"rotnorm{kind}{K}{dtype}{mean}{ag}{rot}")
    x = torch.randn(2, 9, K, generator=gen) + mean
    x[..., 7] *= 20
    smooth = torch.rand(K, generator=gen) + 0.5
    for act, sm in (("int8", None), ("fp8", smooth), ("int12", None)):
        _check_norm_codes(x.to(dtype), kind, act, sm, ag, interpreter=True, rot=rot)
    assert f"K a multiple of {rot}" in Q.supports_norm_act_quant(x[..., :200], 1e-5, kind,
                                                                 "int8", None, ag, rot)


def _w8_planes(w: torch.Tensor):
    """w [N, K] at 8 bits per channel, symmetric (the project's round-to-nearest), bit planes."""
    fmt = LayerFormat(8, 16, P.PER_CHANNEL, True, "none")
    return quantize_rtn(w.float(), fmt).pack(fmt)


def _check(x, pw, bias=None, smooth=None, act="int8", ag=Q.PER_TOKEN, path=None, rot=ROT):
    args = (x, pw.qweight, pw.scales, pw.zeros, bias, smooth, pw.bits, pw.group_size,
            pw.in_features, act)
    if path is None:
        out = op(*args, ag, rot)
    else:
        out = Q._launch(*args, interpreter=x.device.type == "cpu", path=path, act_group_size=ag,
                        rotation=rot)
    assert out.shape == (x.shape[0], pw.out_features) and out.dtype == x.dtype
    exact = Q.reference(x.double(), *args[1:4], None if bias is None else bias.double(),
                        *args[5:], ag, rot)
    scale = exact.abs().max().item()
    err = (out.double() - exact).abs().max().item()
    assert err <= TOL[x.dtype] * scale, f"max err {err:.3g} > {TOL[x.dtype]:.1g} * {scale:.3g}"
    return out


# (weight bits, sym, weight group, act, act group, M, K, dtype, bias): M = 1 a gemv kernel,
# 3 and 17 the mm kernel; K = 128, 256 (one tile) and 384.
CASES = [
    (8, True, -1, "int8", -1, 1, 256, bf16, True),
    (8, True, -1, "int8", -1, 17, 384, f16, False),
    (8, True, 128, "int8", 128, 3, 256, bf16, True),
    (4, False, 128, "fp8", -1, 17, 128, f32, True),
    (4, False, 64, "int8", 64, 3, 384, bf16, False),
    (6, False, 128, "int12", -1, 17, 256, bf16, True),
    (6, True, -1, "int12", 32, 1, 128, f16, False),
]


@pytest.mark.parametrize("bits,sym,group,act,ag,M,K,dtype,bias", CASES,
                         ids=[f"w{b}_g{g}_{a}_ag{ag}_m{m}_k{k}_{str(d)[6:]}"
                              for b, _, g, a, ag, m, k, d, _ in CASES])
@pytest.mark.parametrize("rot", ROTS)
def test_kernel_against_float64(bits, sym, group, act, ag, M, K, dtype, bias, rot):
    gen = _gen(f"rot{bits}{group}{act}{ag}{M}{K}{dtype}{rot}")
    N = 45
    pw = _packed(gen, N, K, bits, group, sym)
    x = torch.randn(M, K, generator=gen)
    x[:, 5] *= 30
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    smooth = torch.rand(K, generator=gen) + 0.5
    _check(x.to(dtype), pw, b, act=act, ag=ag, rot=rot)
    _check(x.to(dtype), pw, b, smooth=smooth, act=act, ag=ag, rot=rot)


@pytest.mark.parametrize("path", INTERPRETER_PATHS, ids=INTERPRETER_PATH_IDS)
@pytest.mark.parametrize("act", ["int8", "fp8"])
@pytest.mark.parametrize("rot", ROTS)
def test_forced_paths(path, act, rot):
    gen = _gen(f"rotpath{path['path']}{act}{rot}")
    pw = _packed(gen, 37, 256, 4, 32, False)
    x = torch.randn(3, 256, generator=gen).to(bf16)
    _check(x, pw, torch.randn(37, generator=gen).to(bf16), act=act, path=path, rot=rot)


def test_kmajor_int8_layout_rotates():
    # W8A8 per channel and token: the K-major int8 layout and its i8 path.
    gen = _gen("rotkmajor")
    pw = P.to_kmajor8(_packed(gen, 40, 256, 8, -1, True))
    for m in (1, 17):
        x = torch.randn(m, 256, generator=gen).to(bf16)
        _check(x, pw, act="int8")


@pytest.mark.parametrize("act", ["int8", "int12", "fp8"])
@pytest.mark.parametrize("rot", ROTS)
def test_rotation_keeps_the_function_and_helps_an_outlier(act, rot):
    """W quantized as W R at 8 bits: the rotated op approximates x W^T. With a channel 100x the
    others, the rotated rows' per-token scale is set by a 128-channel mix, not by the outlier
    alone, so int8 codes resolve the other channels better and the error falls. int12 codes
    resolve them already (the 8-bit weights' error is left, alike); e4m3 codes keep a relative
    precision per element whatever the scale, and the rotation spreads the outlier's rounding
    over every channel: there it costs."""
    gen = _gen(f"rotoutlier{act}")  # the same layer for both block sizes
    M, K, N = 17, 256, 64
    w = torch.randn(N, K, generator=gen, dtype=torch.float64) / K ** 0.5
    pw_rot = _w8_planes(HD.rotate_rows(w, rot))
    x = torch.randn(M, K, generator=gen, dtype=torch.float64)
    x[:, 7] *= 100.0
    want = x @ w.t()
    args = (x.float(), pw_rot.qweight, pw_rot.scales, pw_rot.zeros, None, None, 8, -1, K, act)
    y_rot = op(*args, Q.PER_TOKEN, rot).double()
    # The unrotated layer, quantized alike: W itself at 8 bits per channel.
    pw = _w8_planes(w)
    y = op(x.float(), pw.qweight, pw.scales, pw.zeros, None, None, 8, -1, K, act).double()
    err_rot = ((y_rot - want).norm() / want.norm()).item()
    err = ((y - want).norm() / want.norm()).item()
    # Measured (unrotated, rotated 128 / 32): int8 3.3e-2, 7.5e-3 / 8.2e-3; int12 7.2e-3,
    # 7.5e-3 / 6.5e-3; fp8 7.0e-3, 2.6e-2 / 2.6e-2.
    if act == "int8":
        assert err_rot < 0.4 * err, (err, err_rot)
    else:
        assert err_rot < 0.04 and err < 0.04, (err, err_rot)


def test_supports_reasons():
    gen = _gen("rotsupports")
    pw = _packed(gen, 16, 192, 4, 64, False)
    x = torch.randn(3, 192)
    args = (x, pw.qweight, pw.scales, pw.zeros, None, None, 4, 64, 192, "int8")
    assert "K a multiple of 128, got 192" in Q.supports(*args, Q.PER_TOKEN, ROT)
    assert Q.supports(*args, Q.PER_TOKEN, 0) is None
    assert "rotation 16 is not supported" in Q.supports(*args, Q.PER_TOKEN, 16)
    assert Q.supports(*args, Q.PER_TOKEN, 64) is None and Q.supports(*args, Q.PER_TOKEN, 32) is None
    pw2 = _packed(gen, 16, 128, 4, 64, False)
    x2 = torch.randn(3, 128)
    none_args = (x2, pw2.qweight, pw2.scales, pw2.zeros, None, None, 4, 64, 128, "none")
    assert "needs quantized activations" in Q.supports(*none_args, Q.PER_TOKEN, ROT)
    with pytest.raises(ValueError, match="K a multiple of 128, got 192"):
        op(*args, Q.PER_TOKEN, ROT)


def test_launch_holds_enough_rotation_blocks_for_tl_dot():
    # tl.dot's smallest M is 16: a tile of a narrow row takes more rows.
    for rot in (32, 64, 128):
        for k in (128, 256, 384, 4096, 20480):
            for ag in (0, 64):
                bm, bk, _ = Q.act_quant_launch(k, ag, False, rot)
                assert bk % rot == 0 and bm * bk // rot >= HD.MIN_DOT_ROWS, (rot, k, ag, bm, bk)
    # 2 rows a program to 4096 columns from 1024 rows (the sweep's best at 8192 rows,
    # s34run4), else as unrotated.
    assert Q.act_quant_launch(4096, 0, False, ROT, 8192) == (2, 4096, 4)
    # 32- and 64-channel blocks: one row a program (at 4 programs an SM, s35run2-3).
    for rot in (32, 64):
        assert Q.act_quant_launch(4096, 0, False, rot, 8192) == (1, 4096, 4)
    for m in (1, 16, 256):
        assert Q.act_quant_launch(4096, 0, False, ROT, m) == Q.act_quant_launch(4096, 0, False, 0)
    assert Q.act_quant_launch(12288, 0, False, ROT, 8192) == \
        Q.act_quant_launch(12288, 0, False, 0, 8192)


def test_rotated_quantizers_compile_for_sm90_on_the_tensor_cores():
    # The rotation's dot is a tensor-core MMA on bf16 operands (no FMA loop, no TF32), in both
    # one-tile forms of act_quant and in norm_act_quant. Compiled for an H200 (no GPU needed).
    got = json_without_interpreter("""
        import json, os, re, sys
        sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"].split(os.pathsep)[0], "bench"))
        import compile_qlinear_sm90 as C
        from q3n_compile.kernels import qlinear as Q

        out = {}
        for rot in (128, 32):
            for blocks in (0, 1):
                k = C.compile_variant(Q, "act_quant", dict(
                    QMAX=127.0, FP8=False, HAS_SMOOTH=True, BLOCK_M=2, BLOCK_K=4096, ACT_GROUP=0,
                    DEQUANT=False, PERM128=False, stride_xk=1, ONE_TILE=True, ROT=rot,
                    ROT_BLOCKS=bool(blocks)), 4, 1)
                out[f"act_quant{blocks}_rot{rot}"] = k.asm["ptx"]
            k = C.compile_variant(Q, "norm_act_quant", dict(
                KIND=0, QMAX=127.0, FP8=False, HAS_SMOOTH=False, BLOCK_M=1, BLOCK_K=4096,
                ONE_TILE=True, ACT_GROUP=0, stride_xk=1, ROT=rot), 8, 1)
            out[f"norm_act_quant_rot{rot}"] = k.asm["ptx"]
        print(json.dumps({name: dict(mma=len(re.findall(r"\\bmma\\.sync\\S*bf16|wgmma\\S*bf16", p)),
                                     tf32=len(re.findall(r"tf32", p)))
                          for name, p in out.items()}))
    """)
    for name, counts in got.items():
        assert counts["mma"] > 0 and counts["tf32"] == 0, (name, counts)


# ---------------------------------------------------------------------------------------------
# GPU lane

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("K", [128, 384, 4096, 12288, 20480])
@pytest.mark.parametrize("act", ["int8", "fp8"])
@pytest.mark.parametrize("M", [67, 2100])
@pytest.mark.parametrize("rot", [128, 64, 32])  # each block's launch rule (from 1024 rows)
def test_gpu_quantizer(K, act, M, rot):
    # 128/384: narrow rows, several a program; 4096/12288: one tile (reshaped for the dot at
    # 67 rows; loaded as rows of blocks, a capped grid, at 2100); 20480: the looped form.
    gen = _gen(f"rotgpuq{K}{act}{M}{rot}")
    x = (torch.randn(M, K, generator=gen) * torch.logspace(-2, 1, K)).to(bf16).cuda()
    smooth = (torch.rand(K, generator=gen) + 0.5).cuda()
    for sm in (None, smooth):
        codes, scales = Q.quantize_activations_triton(x, act, sm, interpreter=False,
                                                      rotation=rot)
        want_codes, want_scales = Q.quantize_activations(x, act, sm, rotation=rot)
        _close_codes(codes, scales, want_codes, want_scales, act)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 16, 256, 4096])
@pytest.mark.parametrize("bits,group,sym,act,kmajor", [
    (8, -1, True, "int8", True), (8, 128, True, "int8", False), (4, 128, False, "fp8", False),
    (6, 128, False, "int12", False)], ids=["w8a8_kmajor", "w8a8_g128", "w4a8_fp8", "w6a12"])
@pytest.mark.parametrize("rot", ROTS)
def test_gpu_against_float64(bits, group, sym, act, kmajor, M, rot):
    K, N = 4096, 4096
    gen = _gen(f"rotgpu{bits}{group}{act}{M}")
    pw = _packed(gen, N, K, bits, group, sym, device="cuda")
    if kmajor:
        pw = P.to_kmajor8(pw)
    x = torch.randn(M, K, generator=gen)
    x[:, 11] *= 50
    bias = torch.randn(N, generator=gen).to(bf16).cuda()
    _check(x.to(bf16).cuda(), pw, bias, act=act, rot=rot)


@pytest.mark.gpu
@needs_cuda
# 384: narrow rows, several a program; 4096: one tile; 12288: the sweeps.
@pytest.mark.parametrize("K", [384, 4096, 12288])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("rot", ROTS)
def test_gpu_norm_act_quant(K, kind, rot):
    gen = _gen(f"rotgpunorm{K}{kind}{rot}")
    x = torch.randn(67, K, generator=gen) + 3.0
    x[:, 11] *= 30
    smooth = (torch.rand(K, generator=gen) + 0.5).cuda()
    for act, sm, ag in (("int8", None, -1), ("fp8", smooth, -1), ("int8", smooth, 128)):
        _check_norm_codes(x.to(bf16).cuda(), kind, act, sm, ag, interpreter=False, rot=rot)
