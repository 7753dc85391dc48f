"""The ops that compose a norm with quantized linears, against float64 references.

- ``q3n::norm_act_quant``: row statistics + normalisation + per-token activation quantization in
  one kernel; its codes are those :func:`qlinear.quantize_activations` gives the float64
  normalised rows, except where x_hat * smooth / scale lies within float32 rounding (of itself
  and of the row's largest value) of a tie (then either neighbour); its scales are the float64
  ones to float32 precision.
- ``q3n::qlinear_codes``: ``q3n::qlinear`` on precomputed codes (the same kernels: bitwise equal
  where K is not split; split-K adds partial sums with fp32 atomics in no fixed order).
- ``q3n::normalize``: the normalised rows alone (weight-only quantized consumers).

CPU lane: Triton interpreter, small odd shapes; GPU lane (-m gpu): compiled kernels at model widths.
"""

import zlib

import pytest
import torch

from q3n_compile.kernels import act_dequant as AD
from q3n_compile.kernels import norm_linear as NL
from q3n_compile.kernels import packing as P
from q3n_compile.kernels import qlinear as Q
from q3n_compile.kernels import qlinear_swap as SW

from .subprocess_lane import run_without_interpreter

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
EPS = 1e-5
# Perturbation of v = x_hat * smooth / scale within which a code may round either way: the
# kernel's float32 statistics (K-term sums, a square root, a division) move x_hat by a few ulps
# (2^-24 each) of itself and, through the row's mean, of the row's float32 floor (_check_codes);
# so a relative part, and an absolute one of 8 ulps of that floor (the fine float8 grid near
# zero has ties within that: one code in 10M was off without it, LayerNorm, K=5120, on an H200).
TIE = 2e-5
ROW_ULPS = 2.0 ** -21


def _gen(name):
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _normalised64(x, kind, eps=EPS):
    """x_hat in float64, textbook formulas (biased variance)."""
    xd = x.double().reshape(-1, x.shape[-1])
    if kind == "layernorm":
        mean = xd.mean(-1, keepdim=True)
        return (xd - mean) / torch.sqrt((xd - mean).square().mean(-1, keepdim=True) + eps)
    return xd / torch.sqrt(xd.square().mean(-1, keepdim=True) + eps)


def _round_codes(v, act):
    """The reference quantizer's rounding (kernels/qlinear.py, quantize_activations) of float32 v."""
    qmax = Q.ACT_QMAX[act]
    if act == "fp8":
        return v.clamp(-qmax, qmax).to(torch.float8_e4m3fn).to(torch.float32)
    return torch.round(v).clamp(-qmax, qmax)


def _check_codes(codes, scales, x, kind, act, smooth, eps=EPS, ag=Q.PER_TOKEN):
    """Kernel codes/scales against the float64 normalisation + the reference quantizer (scales
    per token, or per token and `ag` channels).

    The float32 floor of a row: x - mean is rounded at the magnitude of x, so x_hat moves by
    ulps of max|x| * rstd (LayerNorm with |mean| >> std: far above max|x_hat|) and of max|x_hat|,
    times the smoothing. A group whose whole content is within a few floors of zero (bf16 x at
    mean 100 has channels that all round to 100, near the row's mean) has no float32 scale to
    check: there the kernel's dequantised values must stay within the group's content plus the
    floor. Every other group gets the exact checks, with the floor as absolute slack."""
    M, K = codes.shape
    want_shape = (M,) if ag == Q.PER_TOKEN else (M, Q.n_act_groups(K, ag))
    assert scales.shape == want_shape and scales.dtype == f32
    assert codes.dtype == Q._act_codes_dtype(act, x.device, False)
    qmax = Q.ACT_QMAX[act]
    xh = _normalised64(x, kind, eps)
    want_codes, _ = Q.quantize_activations(xh, act, smooth, ag)  # casts x_hat to float32 first
    sm = 1.0 if smooth is None else smooth.double()
    xs = xh * sm
    xd = x.double().reshape(-1, K)
    centred = xd - xd.mean(-1, keepdim=True) if kind == "layernorm" else xd
    rstd = 1.0 / torch.sqrt(centred.square().mean(-1, keepdim=True) + eps)
    smax = 1.0 if smooth is None else smooth.double().abs().max()
    floor = ROW_ULPS * torch.maximum(xs.abs().amax(-1, keepdim=True),
                                     xd.abs().amax(-1, keepdim=True) * rstd * smax)
    amax64 = Q._amax_per_group(xs, ag)
    row_floor = floor.reshape(M) if ag == Q.PER_TOKEN else floor
    faint = amax64 <= 4 * row_floor
    scale64 = amax64 / qmax
    scale64 = torch.where(scale64 == 0, torch.ones_like(scale64), scale64)
    got_scales = scales.double()
    slack = TIE * scale64 + row_floor / qmax
    bad = ~faint & ((got_scales - scale64).abs() > slack)
    assert not bad.any(), (f"{bad.sum().item()} scales off: got {got_scales[bad][:4].tolist()}, "
                           f"want {scale64[bad][:4].tolist()}")
    element_scale = Q.expand_act_scales(scale64, K, ag)
    element_faint = Q.expand_act_scales(faint.double(), K, ag) > 0
    got_deq = codes.double() * Q.expand_act_scales(got_scales, K, ag)
    faint_limit = Q.expand_act_scales(amax64 * (1 + TIE) + 2 * row_floor, K, ag)
    faint_bad = element_faint & (got_deq.abs() > faint_limit)
    assert not faint_bad.any(), f"{faint_bad.sum().item()} values of faint groups beyond them"
    v = (xs / element_scale).cpu()
    band = v.abs() * TIE + (floor / element_scale).cpu() + 1e-6
    lo = _round_codes((v - band).float(), act)
    hi = _round_codes((v + band).float(), act)
    got = codes.float().cpu()
    want = want_codes.cpu()
    # Any code the band reaches: with per-group scales a small group's quantum can be finer than
    # the row's ulps, so the band may span more than one code (rounding is monotonic, fp8 too).
    ok = (got == want) | ((got >= lo) & (got <= hi)) | element_faint.cpu()
    assert ok.all(), (f"{(~ok).sum().item()} codes off: got {got[~ok][:5].tolist()}, "
                      f"want {want[~ok][:5].tolist()}")
    differ = (got != want).sum().item()
    assert differ <= max(2, got.numel() // 200), f"{differ} codes at ties of {got.numel()}"
    return xh


def _x(gen, M, K, dtype, kind, mean=0.0, device="cpu"):
    x = torch.randn(M, K, generator=gen) * torch.logspace(-1, 0.5, K) + mean
    if kind == "layernorm" and mean == 0.0:
        x = x + 0.3  # LayerNorm must remove a mean
    x[min(3, M - 1), 5] *= 40  # an outlier channel in one row
    return x.to(dtype).to(device)


# ---------------------------------------------------------------------------------------------
# q3n::norm_act_quant

CASES = [(kind, act, dtype) for kind in ("rmsnorm", "layernorm") for act in ("int8", "fp8", "int12")
         for dtype in (f32, f16, bf16)]


@pytest.mark.parametrize("kind,act,dtype", CASES,
                         ids=[f"{k}-{a}-{str(d)[6:]}" for k, a, d in CASES])
def test_against_float64(kind, act, dtype):
    gen = _gen(f"naq{kind}{act}{dtype}")
    M, K = 21, 83  # odd: rows not a multiple of the row block, K not a power of two
    x = _x(gen, M, K, dtype, kind)
    smooth = torch.rand(K, generator=gen) + 0.5
    # Through the registered op, a 3-D x (rows are the leading sizes flattened), no smoothing.
    codes, scales = torch.ops.q3n.norm_act_quant(x.reshape(3, 7, K), EPS, kind, act, None)
    assert codes.shape == (M, K)
    _check_codes(codes, scales, x, kind, act, None)
    # With smoothing: one tile (the row in registers), and three sweeps of 32-wide blocks.
    for cfg in (None, dict(BLOCK_M=4, BLOCK_K=32, num_warps=4)):
        codes, scales = Q._norm_act_quant_launch(x, EPS, kind, act, smooth, interpreter=True,
                                                 config=cfg)
        _check_codes(codes, scales, x, kind, act, smooth)


@pytest.mark.parametrize("dtype", [f32, bf16])
def test_layernorm_large_mean(dtype):
    # |mean| / std = 1000: statistics centred on the first tile's mean cancel nothing.
    gen = _gen(f"naqmean{dtype}")
    x = _x(gen, 9, 200, dtype, "layernorm", mean=1000.0)
    for act in ("int8", "int12"):
        codes, scales = Q._norm_act_quant_launch(x, EPS, "layernorm", act, None, interpreter=True,
                                                 config=dict(BLOCK_M=4, BLOCK_K=64, num_warps=4))
        _check_codes(codes, scales, x, "layernorm", act, None)


@pytest.mark.parametrize("one_tile", [True, False], ids=["one_tile", "sweeps"])
def test_layernorm_far_first_element(one_tile):
    # The first element 40 std from the row's mean: statistics centred on it would cancel 1600x
    # in float32 (scales off by ~1e-4); centred on the first tile's mean they cancel nothing.
    gen = _gen(f"naqfirst{one_tile}")
    x = torch.randn(9, 200, generator=gen)
    x[:, 0] += 40.0
    cfg = dict(BLOCK_M=4, BLOCK_K=256 if one_tile else 64, num_warps=4)
    codes, scales = Q._norm_act_quant_launch(x, EPS, "layernorm", "int8", None, interpreter=True,
                                             config=cfg)
    _check_codes(codes, scales, x, "layernorm", "int8", None)


def test_constant_and_empty_rows():
    # A constant row has x_hat = 0 (LayerNorm): scale 1, codes 0, as the reference quantizer says.
    x = torch.randn(5, 40)
    x[2] = 7.0
    codes, scales = torch.ops.q3n.norm_act_quant(x, EPS, "layernorm", "int8", None)
    assert scales[2] == 1 and codes[2].abs().max() == 0
    _check_codes(codes, scales, x, "layernorm", "int8", None)
    codes, scales = torch.ops.q3n.norm_act_quant(x[:0], EPS, "rmsnorm", "fp8", None)
    assert codes.shape == (0, 40) and scales.shape == (0,)


def test_equals_quantizing_the_normalised_rows():
    """The composition it replaces: the reference normalisation, then qlinear's quantizer."""
    gen = _gen("compose")
    x = _x(gen, 13, 70, f32, "rmsnorm")
    smooth = torch.rand(70, generator=gen) + 0.5
    codes, scales = torch.ops.q3n.norm_act_quant(x, EPS, "rmsnorm", "int8", smooth)
    xh = Q.normalise_rows(x, EPS, "rmsnorm")
    want_codes, want_scales = Q.quantize_activations_triton(xh, "int8", smooth, interpreter=True)
    torch.testing.assert_close(scales, want_scales, rtol=1e-6, atol=0)
    assert (codes.float() - want_codes.float()).abs().max() <= 1


GROUP_CASES = [("rmsnorm", "int8", 32, f32), ("layernorm", "int8", 64, bf16),
               ("rmsnorm", "fp8", 128, f16), ("layernorm", "fp8", 32, f32),
               ("rmsnorm", "int12", 64, bf16), ("layernorm", "int12", 128, f32)]


@pytest.mark.parametrize("kind,act,ag,dtype", GROUP_CASES,
                         ids=[f"{k}-{a}-ag{g}-{str(d)[6:]}" for k, a, g, d in GROUP_CASES])
def test_grouped_scales_against_float64(kind, act, ag, dtype):
    """Per-group activation scales: [M, ceil(K / group)], the last group partial (K = 83)."""
    gen = _gen(f"naqg{kind}{act}{ag}{dtype}")
    M, K = 21, 83
    x = _x(gen, M, K, dtype, kind)
    smooth = torch.rand(K, generator=gen) + 0.5
    codes, scales = torch.ops.q3n.norm_act_quant(x.reshape(3, 7, K), EPS, kind, act, None, ag)
    _check_codes(codes, scales, x, kind, act, None, ag=ag)
    # One tile, and sweeps of one group per tile (BLOCK_K 32 is raised to the group).
    for cfg in (None, dict(BLOCK_M=4, BLOCK_K=32, num_warps=4)):
        codes, scales = Q._norm_act_quant_launch(x, EPS, kind, act, smooth, interpreter=True,
                                                 config=cfg, act_group_size=ag)
        _check_codes(codes, scales, x, kind, act, smooth, ag=ag)
    # A row's largest group scale is its per-token scale (to the float32 rounding of the
    # statistics: the sweeps sum in another order than one tile); the other groups' are finer.
    _, tok_scales = Q._norm_act_quant_launch(x, EPS, kind, act, smooth, interpreter=True)
    torch.testing.assert_close(scales.amax(1), tok_scales, rtol=1e-6, atol=0)
    if ag < K:
        assert (scales < tok_scales[:, None]).sum() >= M


def test_grouped_equals_quantizing_the_normalised_rows():
    gen = _gen("composeg")
    x = _x(gen, 13, 150, f32, "layernorm")
    smooth = torch.rand(150, generator=gen) + 0.5
    for ag in (32, 128):
        codes, scales = torch.ops.q3n.norm_act_quant(x, EPS, "layernorm", "int8", smooth, ag)
        xh = Q.normalise_rows(x, EPS, "layernorm")
        want_codes, want_scales = Q.quantize_activations_triton(xh, "int8", smooth,
                                                                interpreter=True, act_group_size=ag)
        torch.testing.assert_close(scales, want_scales, rtol=1e-6, atol=0)
        assert (codes.float() - want_codes.float()).abs().max() <= 1


# ---------------------------------------------------------------------------------------------
# q3n::qlinear_codes

def _packed(gen, N, K, bits, group, sym):
    codes = torch.randint(0, 1 << bits, (N, K), generator=gen, dtype=torch.int64)
    ng = 1 if group == P.PER_CHANNEL else K // group
    scales = (torch.rand(ng, N, generator=gen) * 0.02 + 0.002).to(torch.float16)
    zeros = None if sym else torch.randint(0, 1 << bits, (ng, N), generator=gen).to(torch.uint8)
    return P.pack(codes, scales, zeros, bits, group)


CODES_CASES = [(1, "int8", Q.PER_TOKEN, bf16), (2, "fp8", Q.PER_TOKEN, f16),
               (19, "int8", Q.PER_TOKEN, f32), (19, "int12", Q.PER_TOKEN, bf16),
               (19, "fp8", Q.PER_TOKEN, f32), (1, "int8", 32, bf16), (2, "fp8", 128, f16),
               (19, "int8", 64, f32), (19, "int12", 32, bf16), (19, "fp8", 128, f32)]


@pytest.mark.parametrize("M,act,ag,dtype", CODES_CASES)
def test_qlinear_codes_is_qlinear(M, act, ag, dtype):
    """Bitwise the op it stands for on gemv (M <= 2) and mm, and the dequant path against the
    reference; scales per token or per token and `ag` channels ([M, G]; K = 160: a partial last
    group for 64 and 128)."""
    gen = _gen(f"codes{M}{act}{ag}{dtype}")
    K, N = 160, 45
    pw = _packed(gen, N, K, 4, 32, False)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    smooth = torch.rand(K, generator=gen) + 0.5
    w = (pw.qweight, pw.scales, pw.zeros, bias)
    codes, xs = Q.quantize_activations_triton(x, act, smooth, interpreter=True, act_group_size=ag)
    assert xs.shape == ((M,) if ag == Q.PER_TOKEN else (M, -(-K // ag)))
    got = torch.ops.q3n.qlinear_codes(codes, xs, *w, 4, 32, K, act, dtype, ag)
    want = torch.ops.q3n.qlinear(x, *w, smooth, 4, 32, K, act, ag)
    assert got.dtype == dtype and torch.equal(got, want)
    ref = Q.reference_codes(codes, xs, *w, 4, 32, K, act, dtype, ag)
    tol = dict(rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    torch.testing.assert_close(got.float(), ref.float(), **tol)
    deq = Q._qlinear_codes_launch(codes, xs, *w, 4, 32, K, act, dtype, interpreter=True,
                                  path=dict(path="dequant"), act_group_size=ag)
    torch.testing.assert_close(deq.float(), ref.float(), **tol)
    if ag != Q.PER_TOKEN:
        # Per-token scales where groups are expected (and the reverse) are refused, not misread.
        tok_codes, tok_xs = Q.quantize_activations_triton(x, act, smooth, interpreter=True)
        with pytest.raises(ValueError, match=rf"xscales float32 \[M, {-(-K // ag)}\]"):
            Q._qlinear_codes_launch(tok_codes, tok_xs, *w, 4, 32, K, act, dtype,
                                    interpreter=True, act_group_size=ag)
        with pytest.raises(ValueError, match=r"xscales float32 \[M\]"):
            Q._qlinear_codes_launch(codes, xs, *w, 4, 32, K, act, dtype, interpreter=True)


@pytest.mark.parametrize("act,ag", [("int8", Q.PER_TOKEN), ("fp8", 32), ("int12", Q.PER_TOKEN)])
def test_qlinear_codes_forced_row_split(act, ag):
    """The row split of the codes (their scales split alike, per token or [M, G]): the codes'
    first HEAD rows on the head's path, the rest as dispatched, equal bit for bit to the two
    halves' own calls; into rows of a given output too; a bad HEAD named."""
    gen = _gen(f"codessplit{act}{ag}")
    M, K, N, head = 23, 160, 45, 16
    pw = _packed(gen, N, K, 4, 32, False)
    x = torch.randn(M, K, generator=gen).to(f16)
    bias = torch.randn(N, generator=gen).to(f16)
    w = (pw.qweight, pw.scales, pw.zeros, bias, 4, 32, K, act, f16)
    codes, xs = Q.quantize_activations_triton(x, act, None, interpreter=True, act_group_size=ag)
    split = dict(path="rowsplit", HEAD=head)
    got = Q._qlinear_codes_launch(codes, xs, *w, interpreter=True, path=split, act_group_size=ag)
    halves = [Q._qlinear_codes_launch(codes[r], xs[r], *w, interpreter=True, act_group_size=ag)
              for r in (slice(0, head), slice(head, M))]
    assert torch.equal(got, torch.cat(halves))
    ref = Q.reference_codes(codes, xs, *w, ag)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2,
                               atol=2e-2 * ref.abs().max().item())
    big = torch.zeros(M + 2, N, dtype=f16)
    into = Q._qlinear_codes_launch(codes, xs, *w, interpreter=True, path=split,
                                   act_group_size=ag, out=big[1:-1])
    assert into.data_ptr() == big[1:-1].data_ptr() and torch.equal(into, got)
    assert not big[0].any() and not big[-1].any()
    with pytest.raises(ValueError, match="qlinear_codes: the rowsplit path's HEAD must be 1-22"):
        Q._qlinear_codes_launch(codes, xs, *w, interpreter=True, path=dict(split, HEAD=M),
                                act_group_size=ag)


def _codes_float64(codes, xs, pw, bias, ag):
    """y = (c * s_x) @ W^T + b in float64: what q3n::qlinear_codes stands for."""
    return Q.reference_codes(codes, xs, pw.qweight, pw.scales, pw.zeros, bias, pw.bits,
                             pw.group_size, codes.shape[1], "int8", torch.float64, ag)


# The swapped-operand tile as the interpreter runs it (num_stages 1), K in 1 or 2 splits.
MMT_CODES_TILE = dict(path="mmT", BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4,
                      num_stages=1)
# Output tolerance against float64, relative to the largest |y|: the output dtype's rounding
# (fp32: the sums' order; groups of 32/64 also round (q - z) * s to an fp16 operand).
CODES_TOL = {f32: 1e-4, f16: 2e-3, bf16: 8e-3}


@pytest.mark.parametrize("act", ["int8", "fp8", "int12"])
@pytest.mark.parametrize("ag", [Q.PER_TOKEN, 128])
@pytest.mark.parametrize("group,sym,split,M,dtype", [
    (128, False, 1, 3, bf16), (128, False, 2, 17, f32), (-1, False, 2, 5, f16),
    (-1, True, 1, 16, f32), (32, False, 2, 9, bf16), (64, True, 1, 2, f16)])
def test_qlinear_codes_mmT_reads_the_codes(act, ag, group, sym, split, M, dtype, monkeypatch):
    """mmT multiplies the codes themselves (XCODES): no dequantise pass first (it would raise
    here), against float64, for every code format, scales per token and per 128 channels (K =
    384 + 64: a partial last group and K block), weight groups 32 / 64 / 128 / per channel,
    with zero points and symmetric, K split or not, odd rows and columns."""
    gen = _gen(f"mmTcodes{act}{ag}{group}{sym}{split}{M}{dtype}")
    K, N = 448 if group in (-1, 32, 64) else 384, 72
    pw = _packed(gen, N, K, 4, group, sym)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    codes, xs = Q.quantize_activations_triton(x, act, None, interpreter=True, act_group_size=ag)
    monkeypatch.setattr(AD, "dequantize_codes", lambda *a, **k: pytest.fail("dequantised"))
    got = Q._qlinear_codes_launch(codes, xs, pw.qweight, pw.scales, pw.zeros, bias, 4, group, K,
                                  act, dtype, interpreter=True,
                                  path=dict(MMT_CODES_TILE, SPLIT_K=split), act_group_size=ag)
    ref = _codes_float64(codes, xs, pw, bias, ag)
    assert got.dtype == dtype and got.shape == (M, N)
    err = (got.to(torch.float64) - ref).abs().max() / ref.abs().max()
    assert err <= CODES_TOL[dtype], err


@pytest.mark.parametrize("act", ["int8", "fp8"])
def test_qlinear_codes_mmT_keeps_tiny_group_scales(act):
    """Weights scaled per 32 channels by scales far below fp16's normal range (fp16-stored
    subnormals): the fp16 operand (q - z) * s stays a multiple of the scale's quantum, exact."""
    gen = _gen(f"mmTcodes_tiny{act}")
    K, N, M = 256, 48, 5
    pw = _packed(gen, N, K, 4, 32, False)
    pw.scales.copy_((torch.rand(pw.scales.shape, generator=gen) * 1e-7 + 1e-7).to(f16))
    x = torch.randn(M, K, generator=gen).to(bf16)
    codes, xs = Q.quantize_activations_triton(x, act, None, interpreter=True)
    got = Q._qlinear_codes_launch(codes, xs, pw.qweight, pw.scales, pw.zeros, None, 4, 32, K,
                                  act, f32, interpreter=True, path=dict(MMT_CODES_TILE),
                                  act_group_size=Q.PER_TOKEN)
    ref = _codes_float64(codes, xs, pw, None, Q.PER_TOKEN)
    assert (got.to(torch.float64) - ref).abs().max() / ref.abs().max() <= CODES_TOL[bf16]


def test_mmT_reads_codes_rule():
    # Up to 64 rows (every mmT tile but 4-bit weights' 65-128 rows).
    assert Q.mmT_reads_codes(1) and Q.mmT_reads_codes(64)
    assert not Q.mmT_reads_codes(65) and not Q.mmT_reads_codes(128)


def test_qlinear_codes_mmT_dequantises_first_above_64_rows(monkeypatch):
    """Above 64 rows the codes are dequantised (once) and the tile takes 16-bit x: against
    float64."""
    gen = _gen("mmTcodes_rows72")
    K, N, M = 256, 40, 72
    pw = _packed(gen, N, K, 4, 128, False)
    x = torch.randn(M, K, generator=gen).to(bf16)
    codes, xs = Q.quantize_activations_triton(x, "int8", None, interpreter=True)
    calls = []
    real = AD.dequantize_codes
    monkeypatch.setattr(AD, "dequantize_codes", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = Q._qlinear_codes_launch(codes, xs, pw.qweight, pw.scales, pw.zeros, None, 4, 128, K,
                                  "int8", bf16, interpreter=True, path=dict(MMT_CODES_TILE),
                                  act_group_size=Q.PER_TOKEN)
    assert calls == [1]
    ref = _codes_float64(codes, xs, pw, None, Q.PER_TOKEN)
    assert (got.to(torch.float64) - ref).abs().max() / ref.abs().max() <= CODES_TOL[bf16]


@pytest.mark.parametrize("ag", [32, 64])
def test_qlinear_codes_mmT_small_token_groups_are_dequantised_first(ag):
    """Token groups smaller than mmT's K block change inside its sub-tiles: the kernel refuses
    them by name and the op dequantises them first (against float64)."""
    gen = _gen(f"mmTcodes_small{ag}")
    K, N, M = 256, 40, 6
    pw = _packed(gen, N, K, 4, 128, False)
    x = torch.randn(M, K, generator=gen).to(bf16)
    codes, xs = Q.quantize_activations_triton(x, "int8", None, interpreter=True, act_group_size=ag)
    with pytest.raises(ValueError, match=rf"per token or per 128 channels, not per {ag}"):
        SW.run(codes, pw.qweight, pw.scales, pw.zeros, None, 4, 128, dict(MMT_CODES_TILE),
               True, xscales=xs, act_group_size=ag, out_dtype=bf16)
    got = Q._qlinear_codes_launch(codes, xs, pw.qweight, pw.scales, pw.zeros, None, 4, 128, K,
                                  "int8", bf16, interpreter=True, path=dict(MMT_CODES_TILE),
                                  act_group_size=ag)
    ref = _codes_float64(codes, xs, pw, None, ag)
    assert (got.to(torch.float64) - ref).abs().max() / ref.abs().max() <= CODES_TOL[bf16]


# ---------------------------------------------------------------------------------------------
# q3n::normalize

@pytest.mark.parametrize("K", [83, 40])  # rows swept in tiles; a row whole in one tile
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("dtype", [f32, f16, bf16])
def test_normalize_against_float64(kind, dtype, K):
    gen = _gen(f"norm{kind}{dtype}{K}")
    x = _x(gen, 15, K, dtype, kind, mean=300.0 if kind == "layernorm" else 0.0).reshape(3, 5, K)
    out = torch.ops.q3n.normalize(x, EPS, kind, dtype)
    assert out.shape == x.shape and out.dtype == dtype
    want = _normalised64(x, kind).reshape(x.shape)
    tol = {f32: 1e-5, f16: 1e-3, bf16: 8e-3}[dtype]  # one rounding to dtype
    assert ((out.double() - want).abs() / want.abs().clamp_min(1.0)).max() <= tol
    mixed = torch.ops.q3n.normalize(x, EPS, kind, f32)  # statistics and x_hat kept in float32
    assert ((mixed.double() - want).abs().max() <= 1e-5)


# ---------------------------------------------------------------------------------------------
# Contract: supports, fakes with symbolic rows, the reference path

def test_supports_reasons():
    x = torch.randn(4, 64)
    assert Q.supports_norm_act_quant(x, EPS, "rmsnorm", "int8", None) is None
    assert "kind" in Q.supports_norm_act_quant(x, EPS, "batchnorm", "int8", None)
    assert "quantized one" in Q.supports_norm_act_quant(x, EPS, "rmsnorm", "none", None)
    assert "float64" in Q.supports_norm_act_quant(x.double(), EPS, "rmsnorm", "int8", None)
    assert "smooth must be" in Q.supports_norm_act_quant(x, EPS, "rmsnorm", "int8", torch.ones(3))
    assert "eps" in Q.supports_norm_act_quant(x, -1.0, "rmsnorm", "int8", None)
    assert NL.supports_normalize(x, EPS, "layernorm", bf16) is None
    assert "float64" in NL.supports_normalize(x, EPS, "layernorm", torch.float64)
    gen = _gen("sup")
    pw = _packed(gen, 16, 64, 4, 32, False)
    codes, xs = Q.quantize_activations_triton(x, "int8", None, interpreter=True)
    args = (pw.qweight, pw.scales, pw.zeros, None, 4, 32, 64, "int8", f32)
    assert Q.supports_codes(codes, xs, *args) is None
    assert "codes dtype" in Q.supports_codes(codes.float(), xs, *args)
    assert "input features" in Q.supports_codes(codes[:, :32], xs, *args)
    with pytest.raises(ValueError, match="q3n::norm_act_quant: kind"):
        Q._norm_act_quant_launch(x, EPS, "batchnorm", "int8", None, interpreter=True)
    # Per-group activation scales.
    assert Q.supports_norm_act_quant(x, EPS, "rmsnorm", "int8", None, 32) is None
    assert "activation group size 48" in Q.supports_norm_act_quant(x, EPS, "rmsnorm", "int8",
                                                                    None, 48)
    gcodes, gxs = Q.quantize_activations_triton(x, "int8", None, interpreter=True,
                                                act_group_size=32)
    assert Q.supports_codes(gcodes, gxs, *args, 32) is None
    assert "[M, 2]" in Q.supports_codes(gcodes, xs, *args, 32)
    assert "[M, 2]" in Q.supports_codes(gcodes, gxs[:, :1], *args, 32)
    assert "activation group size 96" in Q.supports_codes(gcodes, gxs, *args, 96)


def test_fakes_with_symbolic_rows_and_opcheck():
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (DimDynamic, ShapeEnv,
                                                       StatelessSymbolicContext)

    gen = _gen("fake")
    pw = _packed(gen, 24, 64, 6, 64, False)
    mode = FakeTensorMode(shape_env=ShapeEnv())
    x = mode.from_tensor(torch.randn(2, 7, 64), source=ConstantSource("x"),
                         symbolic_context=StatelessSymbolicContext(
                             dynamic_sizes=[DimDynamic.STATIC, DimDynamic.DYNAMIC,
                                            DimDynamic.STATIC]))
    with mode:
        fq = tuple(mode.from_tensor(t, static_shapes=True) for t in (pw.qweight, pw.scales, pw.zeros))
        assert Q.supports_norm_act_quant(x, EPS, "layernorm", "int12", None) is None
        codes, xs = torch.ops.q3n.norm_act_quant(x, EPS, "layernorm", "int12", None)
        assert Q.supports_codes(codes, xs, *fq, None, 6, 64, 64, "int12", bf16) is None
        y = torch.ops.q3n.qlinear_codes(codes, xs, *fq, None, 6, 64, 64, "int12", bf16)
        xh = torch.ops.q3n.normalize(x, EPS, "rmsnorm", bf16)
    assert isinstance(codes.shape[0], torch.SymInt) and codes.shape[1] == 64
    assert codes.dtype == f16 and xs.shape[0] == codes.shape[0]
    assert y.shape[1] == 24 and y.dtype == bf16 and xh.shape == x.shape and xh.dtype == bf16
    with mode:  # per-group activation scales: [M, 64 / 32], M symbolic
        gcodes, gxs = torch.ops.q3n.norm_act_quant(x, EPS, "rmsnorm", "int8", None, 32)
        assert Q.supports_codes(gcodes, gxs, *fq, None, 6, 64, 64, "int8", bf16, 32) is None
        gy = torch.ops.q3n.qlinear_codes(gcodes, gxs, *fq, None, 6, 64, 64, "int8", bf16, 32)
    assert isinstance(gxs.shape[0], torch.SymInt) and gxs.shape[1] == 2 and gxs.dtype == f32
    assert gy.shape[1] == 24 and gy.dtype == bf16
    xr = torch.randn(2, 5, 64, generator=gen)
    torch.library.opcheck(torch.ops.q3n.norm_act_quant, (xr, EPS, "rmsnorm", "int8",
                                                          torch.rand(64, generator=gen) + 0.5))
    torch.library.opcheck(torch.ops.q3n.normalize, (xr, EPS, "layernorm", bf16))
    c, s = Q.quantize_activations_triton(xr.reshape(10, 64), "int8", None, interpreter=True)
    torch.library.opcheck(torch.ops.q3n.qlinear_codes,
                          (c, s, pw.qweight, pw.scales, pw.zeros, None, 6, 64, 64, "int8", f32))
    torch.library.opcheck(torch.ops.q3n.norm_act_quant, (xr, EPS, "layernorm", "int8", None, 32))
    c, s = Q.quantize_activations_triton(xr.reshape(10, 64), "int12", None, interpreter=True,
                                         act_group_size=64)
    torch.library.opcheck(torch.ops.q3n.qlinear_codes,
                          (c, s, pw.qweight, pw.scales, pw.zeros, None, 6, 64, 64, "int12", f32,
                           64))


def test_reference_path_without_interpreter():
    code = ("""
        import torch
        from q3n_compile.kernels import qlinear as Q, norm_linear as NL, packing as P, contract
        assert contract.backend_for(torch.device("cpu")) == "reference"
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 3, 64, generator=g).bfloat16()
        codes, xs = torch.ops.q3n.norm_act_quant(x, 1e-5, "layernorm", "fp8", None)
        want = Q.reference_norm_act_quant(x, 1e-5, "layernorm", "fp8", None)
        assert torch.equal(codes, want[0]) and torch.equal(xs, want[1]) and codes.shape == (6, 64)
        pw = P.pack(torch.randint(0, 16, (20, 64), generator=g), torch.rand(2, 20, generator=g).half(),
                    None, 4, 32)
        args = (codes, xs, pw.qweight, pw.scales, None, None, 4, 32, 64, "fp8", torch.bfloat16)
        assert torch.equal(torch.ops.q3n.qlinear_codes(*args), Q.reference_codes(*args))
        xh = torch.ops.q3n.normalize(x, 1e-5, "rmsnorm", torch.float32)
        assert torch.equal(xh, NL.reference_normalize(x, 1e-5, "rmsnorm", torch.float32))
        print("ok")
    """)
    run_without_interpreter(code)


def test_launch_config_rule():
    assert Q.norm_act_quant_config(1, 4096) == dict(BLOCK_M=1, BLOCK_K=4096, num_warps=8)
    assert Q.norm_act_quant_config(7, 8192)["BLOCK_K"] == 8192  # still one tile
    assert Q.norm_act_quant_config(7, 12288)["BLOCK_K"] == 4096  # sweeps
    assert Q.norm_act_quant_config(7, 83, interpreter=True)["BLOCK_K"] == 128


# ---------------------------------------------------------------------------------------------
# GPU lane: compiled kernels at model widths (float64 reference on the GPU).

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("K", [4096, 5120, 12288])  # one tile; one tile, not a power of 2; sweeps
@pytest.mark.parametrize("M", [1, 17, 2048])
@pytest.mark.parametrize("act", ["int8", "fp8", "int12"])
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_gpu_against_float64(kind, act, M, K):
    gen = torch.Generator().manual_seed(zlib.crc32(f"gpu{kind}{act}{M}{K}".encode()))
    x = _x(gen, M, K, bf16, kind, mean=100.0 if kind == "layernorm" else 0.0, device="cuda")
    smooth = (torch.rand(K, generator=gen) + 0.5).cuda()
    for sm in (None, smooth):
        codes, scales = torch.ops.q3n.norm_act_quant(x, EPS, kind, act, sm)
        assert codes.device.type == "cuda"
        if act == "fp8":
            want = torch.float8_e4m3fn if Q.fp8_supported(x.device) else f16
            assert codes.dtype == want
        _check_codes(codes, scales, x, kind, act, sm)
        again = torch.ops.q3n.norm_act_quant(x, EPS, kind, act, sm)
        assert torch.equal(codes, again[0]) and torch.equal(scales, again[1])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 2, 16, 256, 4096])
@pytest.mark.parametrize("act", ["int8", "fp8", "int12"])
def test_gpu_qlinear_codes_is_qlinear(act, M):
    gen = torch.Generator().manual_seed(zlib.crc32(f"gpucodes{act}{M}".encode()))
    K, N = 4096, 4096
    pw = _packed(gen, N, K, 4, 128, False).to("cuda")
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()
    bias = torch.randn(N, generator=gen).to(bf16).cuda()
    w = (pw.qweight, pw.scales, pw.zeros, bias)
    codes, xs = Q.quantize_activations_triton(x, act, None, interpreter=False)
    got = torch.ops.q3n.qlinear_codes(codes, xs, *w, 4, 128, K, act, bf16)
    want = torch.ops.q3n.qlinear(x, *w, None, 4, 128, K, act)
    path = Q.choose_path(M, N, K, 4, 128, act, bf16, x.device)
    if path["path"] == "mmT":
        # mmT multiplies the codes (no rounding of c * s to bf16 first, as qlinear's x has):
        # both against float64.
        ref = _codes_float64(codes.cpu(), xs.cpu(), pw.to("cpu"), bias.cpu(), Q.PER_TOKEN)
        for y in (got, want):
            assert (y.cpu().double() - ref).abs().max() <= CODES_TOL[bf16] * ref.abs().max()
    elif path.get("SPLIT_K", 1) == 1:
        assert torch.equal(got, want)
    else:
        # The fp32 sums agree to their rounding (split-K atomics add in any order); the bf16
        # results then to one bf16 ulp, up to 2^-7 of the value.
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-3).all()


@pytest.mark.gpu
@needs_cuda
# One tile; one tile, not a power of 2 (40 groups of 128); sweeps (96 groups of 128 and 64).
@pytest.mark.parametrize("K", [4096, 5120, 12352])
@pytest.mark.parametrize("M", [1, 17, 2048])
@pytest.mark.parametrize("act,ag", [("int8", 128), ("fp8", 64), ("int12", 32)])
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_gpu_grouped_against_float64(kind, act, ag, M, K):
    gen = torch.Generator().manual_seed(zlib.crc32(f"gpug{kind}{act}{ag}{M}{K}".encode()))
    x = _x(gen, M, K, bf16, kind, mean=100.0 if kind == "layernorm" else 0.0, device="cuda")
    smooth = (torch.rand(K, generator=gen) + 0.5).cuda()
    for sm in (None, smooth):
        codes, scales = torch.ops.q3n.norm_act_quant(x, EPS, kind, act, sm, ag)
        _check_codes(codes, scales, x, kind, act, sm, ag=ag)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 16, 256, 4096])
@pytest.mark.parametrize("act", ["int8", "fp8", "int12"])
def test_gpu_grouped_qlinear_codes_is_qlinear(act, M):
    gen = torch.Generator().manual_seed(zlib.crc32(f"gpucodesg{act}{M}".encode()))
    K, N = 4160, 4096  # 4160 = 32 * 128 + 64: a partial last group
    pw = _packed(gen, N, K, 4, 64, False).to("cuda")
    x = torch.randn(M, K, generator=gen).to(bf16).cuda()
    bias = torch.randn(N, generator=gen).to(bf16).cuda()
    w = (pw.qweight, pw.scales, pw.zeros, bias)
    codes, xs = Q.quantize_activations_triton(x, act, None, interpreter=False, act_group_size=128)
    got = torch.ops.q3n.qlinear_codes(codes, xs, *w, 4, 64, K, act, bf16, 128)
    want = torch.ops.q3n.qlinear(x, *w, None, 4, 64, K, act, 128)
    path = Q.choose_path(M, N, K, 4, 64, act, bf16, x.device, act_group_size=128)
    if path["path"] == "mmT":
        pass  # the codes multiplied, not c * s rounded to bf16: the float64 check below
    elif path.get("SPLIT_K", 1) == 1:
        assert torch.equal(got, want)
    else:
        # One bf16 ulp (up to 2^-7 of the value): split-K atomics add in any order.
        assert ((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-3).all()
    ref = Q.reference_codes(codes, xs, *w, 4, 64, K, act, bf16, 128)
    assert (got.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("act,ag", [("int8", Q.PER_TOKEN), ("fp8", Q.PER_TOKEN),
                                    ("int12", Q.PER_TOKEN), ("int8", 128), ("fp8", 128)])
@pytest.mark.parametrize("bits,group,sym,M", [
    (4, 128, False, 4), (4, 128, False, 16), (4, 128, False, 32), (4, 128, False, 48),
    (4, 128, False, 100), (4, -1, False, 16), (4, -1, False, 100), (6, 128, False, 16),
    (6, 128, False, 48), (8, -1, True, 4), (8, -1, True, 32)])
def test_gpu_qlinear_codes_mmT_against_float64(bits, group, sym, act, ag, M):
    """The dispatched mmT tiles (8 to 64 rows, 4-bit weights to 128) on codes, against float64:
    read by the tile (the PTX unpack on fp16 operands for 4- and 6-bit weights with zero points)
    where :func:`Q.mmT_reads_codes` says so (4 to 48 rows here), else dequantised first (100);
    fp8 codes with g128 weights from 65 rows go to cublas8 (Q.CUBLAS8_MIN_M) or, per token,
    mm8 (split 4 ways at these 4160 columns on an H200), checked the same way; on an sm_90 GPU
    4-bit g128 weights from 49 rows and 6-bit ones from 33 take the wg tile (codes dequantised
    first) in the op's dispatch (the codes op keeps mmT reading them to 64 rows)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"gpummTcodes{bits}{group}{act}{ag}{M}".encode()))
    K, N = 4096 + 128, 4160
    pw = _packed(gen, N, K, bits, group, sym)
    x = torch.randn(M, K, generator=gen).to(bf16)
    bias = torch.randn(N, generator=gen).to(bf16)
    codes, xs = Q.quantize_activations_triton(x.cuda(), act, None, interpreter=False,
                                              act_group_size=ag)
    path = Q.choose_path(M, N, K, bits, group, act, bf16, codes.device, act_group_size=ag)
    fp8 = (act == "fp8" and M >= Q.CUBLAS8_MIN_M["fp8"] and group == 128
           and codes.dtype == torch.float8_e4m3fn)
    # 130 tiles of 128 x 32 (0.98 of an H200's 132 SMs), 33 K blocks: mm8 split 4 ways for
    # per-token scales and g128 weights.
    sms = torch.cuda.get_device_properties(codes.device).multi_processor_count
    mm8 = fp8 and group == 128 and ag == Q.PER_TOKEN and 3 * sms <= 4 * 130 <= 4 * sms
    wg = (torch.cuda.get_device_capability(codes.device) == (9, 0) and bits in (4, 6)
          and group == 128 and M >= (49 if bits == 4 else 33))
    assert path["path"] == ("wg" if wg else "mm8" if mm8 else "cublas8" if fp8 else "mmT"), path
    pc = pw.to("cuda")
    got = torch.ops.q3n.qlinear_codes(codes, xs, pc.qweight, pc.scales, pc.zeros, bias.cuda(),
                                      bits, group, K, act, bf16, ag)
    ref = _codes_float64(codes.cpu(), xs.cpu(), pw, bias, ag)
    err = (got.cpu().double() - ref).abs().max() / ref.abs().max()
    assert err <= CODES_TOL[bf16], err


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M,K", [(2048, 4096), (37, 4000), (5, 20000)])  # 20000: looped
@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_gpu_normalize(kind, M, K):
    gen = torch.Generator().manual_seed(5)
    x = _x(gen, M, K, bf16, kind, device="cuda", mean=300.0 if kind == "layernorm" else 0.0)
    out = torch.ops.q3n.normalize(x, EPS, kind, bf16)
    want = _normalised64(x, kind)
    assert ((out.double() - want).abs() / want.abs().clamp_min(1.0)).max() <= 8e-3
