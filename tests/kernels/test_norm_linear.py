"""q3n::norm_linear against a float64 reference (CPU lane: Triton interpreter; GPU lane: -m gpu).

Every design ("fused", "split", "cublas") runs on both lanes. What the interpreter cannot show
(races between a program's async copies and its tensor cores) is checked without a GPU by
compiling the kernels for sm_90 and reading Triton's GPU IR (test_no_wgmma_buffer_hazard), and
on the GPU lane by repeating launches and requiring bitwise-equal results.
"""

import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from q3n_compile.kernels import contract
from q3n_compile.kernels import norm_linear as NL

from .subprocess_lane import run_without_interpreter

op = torch.ops.q3n.norm_linear

# Triton 3.6's interpreter turns each runtime loop bound into an int through a 1-element array.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
EPS = 1e-5
# Error = max |kernel - float64| / max(1, |float64|): absolute on O(1) outputs, relative on large
# ones (a SiLU-gate product reaches ~30, where one bf16 rounding alone is up to 0.06: an absolute
# bound there failed correct kernels on the H200). The fp16/bf16 bounds are loose backstops; the
# sharp check is "no farther from float64 than eager norm-then-linear in the same dtype" below.
TOL = {f32: 2e-5, f16: 8e-3, bf16: 4e-2}
# Slack on top of 2x eager's error: both round the output once, so a single half-ulp step of
# difference must not fail the test.
SLACK = {f16: 2e-3, bf16: 1.6e-2}


def _randn(gen, *shape, dtype=f32, device="cpu", scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen, device=device) * scale + shift).to(dtype)


def _args(gen, M, K, N, dtype, kind, *, bias=True, residual=False, epilogue="none", splits=None,
          mean=0.0, lead=None, wdtype=None, device="cpu"):
    """Random inputs for one call; the weight is [N, K] with N counting both SiLU-gate halves."""
    wdtype = wdtype or dtype
    shape = (*lead, K) if lead else (M, K)
    x = _randn(gen, *shape, dtype=dtype, device=device, shift=mean)
    w = _randn(gen, N, K, dtype=wdtype, device=device, scale=K ** -0.5)
    b = _randn(gen, N, device=device, scale=0.5) if bias else None
    n_out = N // 2 if epilogue == "silu_gate" else N
    r = _randn(gen, *shape[:-1], n_out, dtype=wdtype, device=device) if residual else None
    rowsum = w.float().sum(1) if kind == "layernorm" else None
    return x, w, b, rowsum, EPS, kind, r, epilogue, splits


def _exact(x, w, b, rowsum, eps, kind, r, epilogue, splits):
    return NL.reference(x.double(), w.double(), None if b is None else b.double(), None, eps, kind,
                        None if r is None else r.double(), epilogue, splits)


def _eager(x, w, b, rowsum, eps, kind, r, epilogue, splits):
    """Unfused eager in the inputs' dtype: the norm, then F.linear, then the epilogue."""
    K = x.shape[-1]
    xn = F.layer_norm(x, (K,), eps=eps) if kind == "layernorm" else F.rms_norm(x, (K,), eps=eps)
    y = F.linear(xn, w, None if b is None else b.to(w.dtype))
    if epilogue == "silu_gate":
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if r is not None:
        y = y + r
    widths = splits or [y.shape[-1]]
    return list(y.split(widths, dim=-1))


def _err(out, want):
    return ((out.double() - want).abs() / want.abs().clamp_min(1.0)).max().item()


def _config(args, design, **over):
    x, w = args[0], args[1]
    M = x.numel() // x.shape[-1]
    n_out = sum(args[8]) if args[8] else (w.shape[0] // 2 if args[7] == "silu_gate" else w.shape[0])
    cfg = NL.choose_config(M, n_out, x.shape[-1], w.dtype, args[7],
                           interpreter=x.device.type == "cpu", design=design)
    return dict(cfg, **over)


def _run(args, design=None, **over):
    if design is None and not over:
        return op(*args)
    x = args[0]
    return NL._launch(*args, interpreter=x.device.type == "cpu", config=_config(args, design, **over))


def _check(args, *, design=None, **over):
    x, w = args[0], args[1]
    outs = _run(args, design, **over)
    exact = _exact(*args)
    assert len(outs) == len(exact)
    eager = _eager(*args) if w.dtype in SLACK and x.dtype == w.dtype else None
    errs = []
    storages = set()
    for i, (out, want) in enumerate(zip(outs, exact)):
        assert out.shape == want.shape and out.dtype == w.dtype and out.device == x.device
        assert out.is_contiguous()
        storages.add(out.untyped_storage().data_ptr())
        assert not torch.isnan(out).any()
        err = _err(out, want)
        errs.append(err)
        assert err <= TOL[w.dtype], f"output {i}: error {err:.3g} > {TOL[w.dtype]:.3g}"
        if eager is not None:
            eager_err = _err(eager[i], want)
            assert err <= 2 * eager_err + SLACK[w.dtype], (
                f"output {i}: kernel error {err:.3g} vs eager {w.dtype} error {eager_err:.3g}")
    assert len(storages) == len(outs), "outputs share storage"
    return outs, max(errs)


# (M, K, N, dtype, kind, design, options); K and N are odd or off the 16-wide interpreter tiles.
CPU_CASES = {
    "ln_f32_fused": (33, 80, 96, f32, "layernorm", "fused", {}),
    "ln_f32_split_oddK": (21, 37, 45, f32, "layernorm", "split", {}),
    "ln_f32_cublas_oddK": (21, 37, 45, f32, "layernorm", "cublas", {}),
    "rms_f32_fused_nobias": (17, 37, 45, f32, "rmsnorm", "fused", dict(bias=False)),
    "rms_f32_split_3d": (10, 80, 96, f32, "rmsnorm", "split", dict(lead=(2, 5))),
    "ln_bf16_fused": (33, 48, 40, bf16, "layernorm", "fused", {}),
    "ln_bf16_split_residual": (19, 40, 33, bf16, "layernorm", "split", dict(residual=True)),
    "ln_bf16_cublas_residual": (19, 40, 33, bf16, "layernorm", "cublas", dict(residual=True)),
    "rms_bf16_cublas_residual_nobias": (
        19, 40, 33, bf16, "rmsnorm", "cublas", dict(residual=True, bias=False)),
    "rms_bf16_fused_silu": (17, 40, 46, bf16, "rmsnorm", "fused", dict(epilogue="silu_gate")),
    "rms_bf16_split_silu_residual": (
        21, 33, 50, bf16, "rmsnorm", "split", dict(epilogue="silu_gate", residual=True)),
    "ln_bf16_cublas_silu_residual": (
        21, 33, 50, bf16, "layernorm", "cublas", dict(epilogue="silu_gate", residual=True)),
    "ln_f16_fused_qkv": (13, 40, 40, f16, "layernorm", "fused", dict(splits=[24, 8, 8])),
    "rms_f16_split_4_outputs": (19, 37, 45, f16, "rmsnorm", "split", dict(splits=[20, 9, 9, 7])),
    "ln_f16_cublas_qkv_3d": (
        10, 37, 45, f16, "layernorm", "cublas", dict(splits=[29, 9, 7], lead=(5, 2))),
    "ln_f16_fused_residual": (9, 64, 48, f16, "layernorm", "fused", dict(residual=True)),
    "rms_f16_decode_m1": (1, 80, 96, f16, "rmsnorm", "fused", {}),
    "ln_bf16_decode_m1_silu": (1, 40, 34, bf16, "layernorm", "fused", dict(epilogue="silu_gate")),
    "ln_f32_split_silu": (7, 40, 46, f32, "layernorm", "split", dict(epilogue="silu_gate")),
    "rms_x_f32_w_bf16_fused": (17, 40, 24, f32, "rmsnorm", "fused", dict(wdtype=bf16)),
    "ln_x_bf16_w_f32_split": (17, 40, 24, bf16, "layernorm", "split", dict(wdtype=f32)),
    "ln_x_f32_w_bf16_split": (17, 40, 24, f32, "layernorm", "split", dict(wdtype=bf16)),
    "ln_x_f32_w_f16_cublas": (17, 40, 24, f32, "layernorm", "cublas", dict(wdtype=f16)),
}


@pytest.mark.parametrize("case", list(CPU_CASES), ids=list(CPU_CASES))
def test_against_float64(case):
    M, K, N, dtype, kind, design, opts = CPU_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    _check(_args(gen, M, K, N, dtype, kind, **opts), design=design)


# Tile overrides that give several programs per row block and per column block, K tails in every
# tile, a partial GROUP_M group, and a persistent grid smaller than the number of tiles (each
# program then computes several tiles). Under the interpreter's sequential programs a tile that
# two programs wrote, or one never written, shows as a wrong or uninitialised value.
MULTI_PROGRAM = {
    "fused": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16),
    "split": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=3, STATS_BLOCK_M=8,
                  STATS_BLOCK_K=16),
    "split_persistent": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=3, PERSISTENT=True,
                             NUM_PROGS=5),
    "cublas": dict(STATS_BLOCK_M=8, STATS_BLOCK_K=16),
}


@pytest.mark.parametrize("variant", list(MULTI_PROGRAM))
def test_many_programs_and_tails(variant):
    # M = 35: 3 row blocks of 16 (the last partial); N = 45 = 20 + 25: 3 column blocks, an
    # output boundary inside one; K = 37: 3 K steps, the last 5 wide.
    gen = torch.Generator().manual_seed(27)
    design = variant.split("_")[0]
    for kind, n, opts in (("layernorm", 45, dict(splits=[20, 25])),
                          ("rmsnorm", 90, dict(epilogue="silu_gate", residual=True))):
        outs, _ = _check(_args(gen, 35, 37, n, f16, kind, **opts), design=design,
                         **MULTI_PROGRAM[variant])
        assert outs[0].shape == (35, 20 if kind == "layernorm" else 45)


@pytest.mark.parametrize("persistent", [False, True], ids=["grid", "persistent"])
def test_split_tensor_descriptors(persistent):
    # K = 40 fp16 rows are 80 bytes: TMA-legal strides; M, N, K not multiples of the 16-wide tiles,
    # so the descriptors' zero fill covers the row, column and K tails.
    gen = torch.Generator().manual_seed(28)
    args = _args(gen, 35, 40, 2 * 27, f16, "layernorm", epilogue="silu_gate", residual=True)
    over = dict(USE_TMA=True, PERSISTENT=persistent, NUM_PROGS=4, BLOCK_K=16)
    plan_key = NL._plan_key(*args, True, _config(args, "split", **over))
    _check(args, design="split", **over)
    assert NL._PLANS[plan_key].use_tma
    # Strides TMA cannot take fall back to pointer loads, same result.
    x = torch.empty(35, 41, dtype=f16)[:, :40].copy_(args[0])
    assert not NL._tma_ok(x)
    _check((x, *args[1:]), design="split", **over)


@pytest.mark.parametrize("design", NL.DESIGNS)
@pytest.mark.parametrize("dtype", [f32, bf16], ids=["f32", "bf16"])
def test_layernorm_large_mean(dtype, design):
    # mean 1000, std 1: x·W'ᵀ − μ·rowsum(W') would cancel ~10 bits if computed uncentred in the
    # inputs' precision; each design avoids it (or, "split" with bf16, stays below the rounding).
    gen = torch.Generator().manual_seed(20 + len(design) + dtype.itemsize)
    args = _args(gen, 19, 64, 40, dtype, "layernorm", mean=1000.0)
    _, err = _check(args, design=design)
    if dtype == f32:
        # The same inputs through the uncentred formula in float32 lose far more.
        x, w, b = args[0].double(), args[1], args[2]
        xf = x.float()
        mu, rstd = x.mean(-1, keepdim=True), torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + EPS)
        naive = (rstd.float() * (xf @ w.t() - mu.float() * w.sum(1))) + b
        naive_err = _err(naive, _exact(*args)[0])
        assert naive_err > 10 * err, (naive_err, err)


@pytest.mark.parametrize("design", NL.DESIGNS)
def test_layernorm_far_first_element(design):
    # One-pass statistics centred on x[m, 0] cancel by (1 + (x0 - mean)^2 / var): 1600x for a
    # first element 40 std from the mean, over the float32 tolerance (the GPU lane saw 3e-5 from a
    # 3-sigma one at M = 2048). Centred on the first tile's mean, they cancel nothing.
    gen = torch.Generator().manual_seed(23 + len(design))
    args = _args(gen, 19, 96, 40, f32, "layernorm", residual=True)
    args[0][:, 0] += 40.0
    _check(args, design=design)


def test_rmsnorm_large_values():
    gen = torch.Generator().manual_seed(21)
    for design in NL.DESIGNS:
        _check(_args(gen, 17, 48, 40, bf16, "rmsnorm", mean=300.0), design=design)


def test_default_design_and_rowsum_computed_when_missing():
    gen = torch.Generator().manual_seed(22)
    for M in (5, 70):  # "fused" and "cublas" by DISPATCH
        args = list(_args(gen, M, 40, 24, f32, "layernorm"))
        args[3] = None  # rowsum None: computed by the launcher
        outs, _ = _check(tuple(args))
        assert len(outs) == 1


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(23)
    M, K, N = 21, 40, 33
    x = _randn(gen, K, M, dtype=f16).t()  # [M, K] with strides (1, M)
    w = _randn(gen, N, 2 * K, dtype=f16, scale=K ** -0.5)[:, ::2]  # row stride 2K, col stride 2
    r = _randn(gen, N, M, dtype=f16).t()
    b = _randn(gen, N, scale=0.5)
    assert not (x.is_contiguous() or w.is_contiguous() or r.is_contiguous())
    for kind, design in (("layernorm", "fused"), ("rmsnorm", "split"), ("layernorm", "cublas")):
        rs = w.float().sum(1) if kind == "layernorm" else None
        _check((x, w, b, rs, EPS, kind, r, "none", None), design=design)


def test_outputs_never_alias_at_one_row():
    # At one row a column block of one [1, N] buffer is contiguous, so `.contiguous()` returns a
    # view of that buffer: the reference did that, and torch.compile with norm_fusion at batch 1,
    # length 1 failed with "may not alias any inputs to this custom operator or other returns".
    gen = torch.Generator().manual_seed(29)
    x, w, b, rs, eps, kind, r, epi, splits = _args(gen, 1, 40, 24, f32, "layernorm",
                                                   splits=[16, 8], lead=(1, 1))
    calls = {"reference": lambda: NL.reference(x, w, b, rs, eps, kind, None, "none", splits),
             "op": lambda: op(x, w, b, rs, eps, kind, None, "none", splits)}
    for design in NL.DESIGNS:
        calls[design] = lambda d=design: _run((x, w, b, rs, eps, kind, None, "none", splits), d)
    for name, call in calls.items():
        outs = call()
        ptrs = {o.untyped_storage().data_ptr() for o in outs}
        inputs = {t.untyped_storage().data_ptr() for t in (x, w, b, rs)}
        assert len(ptrs) == len(outs) and not ptrs & inputs, name


def test_empty_rows():
    x = torch.empty(0, 3, 40)
    w = torch.randn(24, 40)
    outs = op(x, w, None, None, EPS, "rmsnorm", None, "none", [16, 8])
    assert [tuple(o.shape) for o in outs] == [(0, 3, 16), (0, 3, 8)]


def test_reference_matches_eager_float64():
    gen = torch.Generator().manual_seed(24)
    x = torch.randn(3, 5, 40, generator=gen, dtype=torch.float64)
    w = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    b = torch.randn(24, generator=gen, dtype=torch.float64)
    r = torch.randn(3, 5, 12, generator=gen, dtype=torch.float64)
    for kind in ("layernorm", "rmsnorm"):
        got = NL.reference(x, w, b, None, EPS, kind, r, "silu_gate")
        want = _eager(x, w, b, None, EPS, kind, r, "silu_gate", None)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        got = NL.reference(x, w, b, None, EPS, kind, None, "none", [20, 4])
        want = _eager(x, w, b, None, EPS, kind, None, "none", [20, 4])
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_supports_reasons():
    meta = dict(device="meta")
    x = torch.empty(2, 5, 64, **meta)
    w = torch.empty(48, 64, **meta)
    v = torch.empty(48, **meta)
    assert NL.supports(x, w, v, v, EPS, "layernorm") is None
    assert NL.supports(x, w, v, None, EPS, "rmsnorm", None, "none", [16, 16, 8, 8]) is None
    assert NL.supports(x, w, v, v, EPS, "layernorm", torch.empty(2, 5, 24, **meta), "silu_gate") is None
    assert "float64" in NL.supports(x.double(), w.double(), None, None, EPS, "rmsnorm")
    assert "float64" in NL.supports(x, w.double(), None, None, EPS, "rmsnorm")
    assert "kind" in NL.supports(x, w, None, None, EPS, "groupnorm")
    assert "epilogue" in NL.supports(x, w, None, None, EPS, "rmsnorm", None, "gelu")
    assert "2-D" in NL.supports(x, w[None], None, None, EPS, "rmsnorm")
    assert "last dim" in NL.supports(torch.empty(2, 5, 32, **meta), w, None, None, EPS, "rmsnorm")
    assert "even" in NL.supports(x, torch.empty(47, 64, **meta), None, None, EPS, "rmsnorm", None,
                                 "silu_gate")
    assert "bias must be [N]" in NL.supports(x, w, torch.empty(47, **meta), None, EPS, "rmsnorm")
    assert "rowsum must be [N]" in NL.supports(x, w, None, torch.empty(2, 48, **meta), EPS, "layernorm")
    assert "at most 4" in NL.supports(x, w, None, None, EPS, "rmsnorm", None, "none", [8] * 6)
    assert "partition" in NL.supports(x, w, None, None, EPS, "rmsnorm", None, "none", [8, 8])
    assert "splits need" in NL.supports(x, w, None, None, EPS, "rmsnorm", None, "silu_gate", [24, 24])
    assert "residual shape" in NL.supports(x, w, None, None, EPS, "rmsnorm", torch.empty(2, 48, **meta))
    assert "single output" in NL.supports(x, w, None, None, EPS, "rmsnorm",
                                          torch.empty(2, 5, 48, **meta), "none", [24, 24])
    assert "eps" in NL.supports(x, w, None, None, torch.tensor(1e-5), "rmsnorm")
    assert "devices differ" in NL.supports(torch.empty(2, 5, 64), w, None, None, EPS, "rmsnorm")
    with pytest.raises(ValueError, match="last dim"):
        NL._launch(torch.randn(3, 8), torch.randn(4, 9), None, None, EPS, "rmsnorm", interpreter=True)
    with pytest.raises(ValueError, match="unknown norm_linear design 'gemv'.*fused, split, cublas"):
        NL.choose_config(1, 8, 8, bf16, design="gemv")


def test_plan_is_cached_per_signature():
    gen = torch.Generator().manual_seed(30)
    args = _args(gen, 5, 40, 24, f16, "rmsnorm")
    NL._PLANS.clear()
    op(*args)
    op(*_args(gen, 5, 40, 24, f16, "rmsnorm"))  # new values, same signature
    assert len(NL._PLANS) == 1
    x_t = args[0].t().contiguous().t()  # same sizes, other strides: a plan of its own
    _check((x_t, *args[1:]))
    assert len(NL._PLANS) == 2
    with pytest.raises(ValueError, match="residual shape"):  # supports() still runs on a miss
        op(args[0], args[1], None, None, EPS, "rmsnorm", torch.randn(5, 7, dtype=f16))


def _symbolic(mode, t, name, dynamic_dims):
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    dims = [DimDynamic.DYNAMIC if i in dynamic_dims else DimDynamic.STATIC for i in range(t.dim())]
    return mode.from_tensor(t, source=ConstantSource(name),
                            symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))


def test_fake_and_supports_with_symbolic_sizes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv, statically_known_true

    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    x = _symbolic(mode, torch.randn(2, 7, 40), "x", {0, 1})
    w = mode.from_tensor(torch.randn(48, 40), static_shapes=True)
    v = mode.from_tensor(torch.randn(48), static_shapes=True)
    r = _symbolic(mode, torch.randn(2, 7, 24), "r", {0, 1})
    guards_before = len(env.guards)
    with mode:
        assert NL.supports(x, w, v, v, EPS, "layernorm", None, "none", [32, 8, 8]) is None
        outs = op(x, w, v, v, EPS, "layernorm", None, "none", [32, 8, 8])
        (gated,) = op(x, w, v, None, EPS, "rmsnorm", None, "silu_gate")
    assert [o.shape[-1] for o in outs] == [32, 8, 8]
    for out in (*outs, gated):
        assert isinstance(out.shape[0], torch.SymInt) and isinstance(out.shape[1], torch.SymInt)
        assert statically_known_true(out.shape[0] == x.shape[0])
        assert statically_known_true(out.shape[1] == x.shape[1])
        assert out.dtype == w.dtype
    assert gated.shape[-1] == 24
    # The residual's sizes cannot be proven equal to x's: refused without adding a guard.
    assert "residual shape" in NL.supports(x, w, v, None, EPS, "rmsnorm", r, "silu_gate")
    assert len(env.guards) == guards_before


def test_opcheck():
    gen = torch.Generator().manual_seed(25)
    x, w, b, rs, eps, kind, r, epi, splits = _args(gen, 5, 24, 20, f32, "layernorm")
    torch.library.opcheck(op, (x, w, b, rs, eps, kind, r, epi, splits))
    torch.library.opcheck(op, (x, w, None, None, eps, "rmsnorm", None, "none", [12, 8]))
    torch.library.opcheck(op, (x, w, b, None, eps, "rmsnorm", torch.randn(5, 10), "silu_gate", None))


def test_dispatch_table_and_config_rule():
    # The table decides the design by M alone; choose_config follows it unless told otherwise.
    for m in (1, 16, 64, 65, 2048, 8192):
        want = next(d for top, d in NL.DISPATCH if top is None or m <= top)
        assert NL.design_for(m) == want == NL.choose_config(m, 12288, 4096, bf16)["design"]
    rows = NL.dispatch_table(12288, 4096, bf16)
    assert [r["M"] for r in rows] == [1, 16, 64, 65, 2048, 8192]
    assert all(r["design"] == NL.design_for(r["M"]) for r in rows)
    # "fused" at decode: one wave that fills the SMs (>= 132 programs, each SM's share fitting
    # its shared memory), the weight read once (one row block). SiLU-gate at decode: the measured
    # 128 x 128 tiles, 8 warps, 3 stages (one program per SM fits; under one wave).
    for n, epi in ((12288, "none"), (11008, "silu_gate"), (6144, "none")):
        cfg = NL.choose_config(1, n, 4096, bf16, epi, design="fused")
        halves = 2 if epi == "silu_gate" else 1
        smem = cfg["num_stages"] * (halves * cfg["BLOCK_N"] + cfg["BLOCK_M"]) * cfg["BLOCK_K"] * 2
        per_sm = min(NL._SMEM_PER_SM // smem, NL._MAX_CTAS_PER_SM)
        grid = -(-n // cfg["BLOCK_N"])
        if epi == "silu_gate":
            assert (cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"], cfg["num_stages"]) == (
                128, 128, 8, 3)
            assert per_sm == 1 and grid <= 132, (n, cfg)
        else:
            assert 132 <= grid <= 132 * per_sm, (n, cfg)
        assert cfg["BLOCK_M"] == 16
    assert NL.choose_config(33, 12288, 4096, bf16, design="fused")["BLOCK_M"] == 64
    split = NL.choose_config(2048, 12288, 4096, bf16, design="split")
    assert (split["BLOCK_M"], split["BLOCK_N"], split["BLOCK_K"]) == (128, 256, 64)
    assert NL.choose_config(2048, 11008, 4096, bf16, "silu_gate", design="split")["BLOCK_N"] == 128
    assert NL.choose_config(2048, 12288, 4096, f32, design="split")["BLOCK_K"] == 32
    assert NL.choose_config(100, 20, 24, bf16, design="split")["BLOCK_N"] == 32  # <= padded N
    for design in ("fused", "split"):
        for m in (1, 7, 16, 17, 64, 65, 4096):
            for epi in ("none", "silu_gate"):
                cfg = NL.choose_config(m, 4096, 4096, f32, epi, design=design)
                assert min(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) >= 16  # tl.dot minimum


def test_64bit_offsets_rule_and_path(monkeypatch):
    meta = dict(device="meta", dtype=bf16)
    cfg = NL.choose_config(8192, 12288, 4096, bf16, design="split")
    assert not NL._needs_64bit_offsets(torch.empty(8192, 4096, **meta),
                                       torch.empty(12288, 4096, **meta), None, 12288, cfg)
    # A 152k-vocab lm_head at 16k tokens: the output has 2.5e9 elements.
    big = NL.choose_config(16384, 152064, 4096, bf16)
    assert NL._needs_64bit_offsets(torch.empty(16384, 4096, **meta),
                                   torch.empty(152064, 4096, **meta), None, 152064, big)
    monkeypatch.setattr(NL, "_needs_64bit_offsets", lambda *a: True)
    NL._PLANS.clear()
    gen = torch.Generator().manual_seed(26)
    _check(_args(gen, 19, 40, 45, f16, "layernorm", splits=[20, 25]), design="fused")
    _check(_args(gen, 19, 40, 46, f16, "rmsnorm", epilogue="silu_gate", residual=True),
           design="split")
    _check(_args(gen, 19, 40, 46, f16, "layernorm", epilogue="silu_gate", residual=True),
           design="cublas")
    assert len(NL._PLANS) == 3 and all(p.offsets_64 for p in NL._PLANS.values())
    NL._PLANS.clear()


def test_reference_path_without_interpreter():
    code = ("""
        import torch
        from q3n_compile.kernels import norm_linear as NL, contract
        assert contract.backend_for(torch.device("cpu")) == "reference"
        g = torch.Generator().manual_seed(10)
        x = torch.randn(2, 9, 40, generator=g).bfloat16()
        w = (torch.randn(24, 40, generator=g) / 6).bfloat16()
        b = torch.randn(24, generator=g)
        out = torch.ops.q3n.norm_linear(x, w, b, None, 1e-5, "layernorm", None, "none", [16, 8])
        want = NL.reference(x, w, b, None, 1e-5, "layernorm", None, "none", [16, 8])
        assert all(torch.equal(o, v) for o, v in zip(out, want))
        one = torch.ops.q3n.norm_linear(x[:1, :1], w, b, None, 1e-5, "rmsnorm", None, "none", [16, 8])
        assert one[0].untyped_storage().data_ptr() != one[1].untyped_storage().data_ptr()
        print("ok")
    """)
    run_without_interpreter(code)


def test_bench_script_runs(tmp_path):
    # The H200 run is scarce: the benchmark's own logic (every design, the sweep, the checks, the
    # JSON) runs here on tiny sizes in the interpreter, so a crash shows before the GPU run.
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_norm_linear.py"
    out = tmp_path / "bench.json"
    argv = ["--smoke", "--ms", "1", "--sections", "swiglu", "--out", str(out), "--commit", "test"]
    if contract.interpreter_enabled():  # the CPU lane: in this process (saves an import of torch)
        spec = importlib.util.spec_from_file_location("bench_norm_linear", path)
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        bench.main(argv)
    else:  # kernels here were built for the GPU: the interpreter needs a process of its own
        res = subprocess.run([sys.executable, str(path), *argv],
                             env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["commit"] == "test" and row["correct"] and row["design"] == "fused"
    assert {f"q3n_{d}_ms" for d in NL.DESIGNS} <= set(row) and row["sweep"]
    assert all("ms" in e for e in row["sweep"]), row["sweep"]


# Compiles, for an H200 (sm_90), every Triton kernel the launcher starts for the shapes the
# benchmark and the GPU lane use, through the launcher itself (a stand-in driver reports an sm_90
# device; launches only compile), and reads Triton's GPU IR for the shared-memory race that made
# the M = 2048 GPU tests fail at random. A reproducer of that kernel pattern must be flagged.
AOT_SCRIPT = textwrap.dedent(r'''
    import re
    import torch, triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class SM90:
        def get_current_device(self): return 0
        def get_current_stream(self, device=None): return 0
        def get_current_target(self): return GPUTarget("cuda", 90, 32)
        def get_active_torch_device(self): return torch.device("cpu")

    driver.set_active(SM90())
    COMPILED = []
    _run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
        COMPILED.append((self.fn.__name__, kwargs.get("num_stages", 3), kernel))
        return kernel

    JITFunction.run = compile_only

    def wgmma_hazards(ttgir, num_stages):
        """Shared-memory buffers an asynchronous wgmma may read while they are rewritten:
        (1) a pipelined buffer that is a wgmma operand and also read by ttg.local_load (Triton 3.6
        sizes it for the register use: num_stages - 1 slots); (2) an operand buffer of a wgmma
        left in flight (pendings >= 1) with fewer than num_stages slots, or (3) written in the
        loop by local_alloc."""
        text = re.sub(r" loc\([^\n]*", "", ttgir)
        slots = {m[0]: int(m[1]) for m in re.findall(
            r"(%[\w.]+) = ttg\.local_alloc\s*: \(\) -> !ttg\.memdesc<(\d+)x\d", text)}
        from_value = set(re.findall(r"(%[\w.]+) = ttg\.local_alloc %", text))
        parent = dict(re.findall(
            r"(%[\w.]+) = ttg\.memdesc_(?:index|trans|subslice|reshape) (%[\w.]+)", text))

        def root(v):
            while v in parent:
                v = parent[v]
            return v

        loaded = {root(v) for v in re.findall(r"ttg\.local_load (%[\w.]+)", text)}
        problems = []
        for m in re.finditer(r"(%[\w.]+) = ttng\.warp_group_dot (%[\w.]+), (%[\w.]+)", text):
            wait = re.search(r"ttng\.warp_group_dot_wait " + re.escape(m[1])
                             + r"\b[^\n]*pendings = (\d+)", text[m.end():])
            pendings = int(wait[1]) if wait else 0
            for operand in (m[2], m[3]):
                r = root(operand)
                if r in slots and r in loaded:
                    problems.append(f"{r} is a wgmma operand and read into registers")
                if pendings and r in slots and slots[r] < num_stages:
                    problems.append(f"{r}: {slots[r]} slots, {num_stages} stages, wgmma in flight")
                if pendings and r in from_value:
                    problems.append(f"{r}: local_alloc'd while a wgmma may read it")
        return sorted(set(problems))

    @triton.jit
    def dual_use_kernel(X, W, O, S, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
        # The previous fused RMSNorm kernel's loop: one loaded tile is a dot operand and summed.
        offs = tl.arange(0, BLOCK)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        s = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(X + offs[:, None] * K + (k0 + offs_k)[None, :])
            b = tl.load(W + (k0 + offs_k)[:, None] * BLOCK + offs[None, :])
            s += tl.sum(a.to(tl.float32) * a.to(tl.float32), 1)
            acc = tl.dot(a, b, acc)
        tl.store(O + offs[:, None] * BLOCK + offs[None, :], acc)
        tl.store(S + offs, s)

    bf16 = torch.bfloat16
    dual_use_kernel[(1,)](torch.empty(128, 4096, dtype=bf16), torch.empty(4096, 128, dtype=bf16),
                          torch.empty(128, 128), torch.empty(128), 4096, BLOCK=128, BLOCK_K=64,
                          num_warps=8, num_stages=3)
    name, stages, kernel = COMPILED.pop()
    bad = wgmma_hazards(kernel.asm["ttgir"], stages)
    assert any("read into registers" in p for p in bad) and any("slots" in p for p in bad), bad

    from q3n_compile.kernels import norm_linear as NL

    def shape_only_mm(*args, out=None):  # "cublas" calls torch.mm/addmm: sizes are all we need
        a, b = args[-2], args[-1]
        return out if out is not None else torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)

    torch.mm = torch.addmm = shape_only_mm

    def launch(M, N, kind, design, epilogue="none", splits=None, residual=False, **over):
        K = 4096
        n_out = N // 2 if epilogue == "silu_gate" else N
        cfg = dict(NL.choose_config(M, n_out, K, bf16, epilogue, design=design), **over)
        r = torch.empty(M, n_out, dtype=bf16) if residual else None
        rs = torch.empty(N) if kind == "layernorm" else None
        NL._launch(torch.empty(M, K, dtype=bf16), torch.empty(N, K, dtype=bf16), torch.empty(N),
                   rs, 1e-5, kind, r, epilogue, splits, config=cfg)

    launch(1, 12288, "rmsnorm", "fused")
    launch(1, 2 * 11008, "layernorm", "fused", "silu_gate")
    launch(16, 6144, "layernorm", "fused", splits=[4096, 1024, 1024])
    launch(64, 12288, "rmsnorm", "fused", residual=True)
    launch(2048, 12288, "rmsnorm", "split")
    launch(2048, 2 * 11008, "layernorm", "split", "silu_gate", residual=True)
    launch(2048, 12288, "layernorm", "split", USE_TMA=False, PERSISTENT=True)
    launch(2048, 2 * 11008, "rmsnorm", "cublas", "silu_gate")  # normalise + gate kernels
    launch(2048, 12288, "layernorm", "cublas")  # the one-tile normalise kernel
    launch(2048, 12288, "rmsnorm", "cublas", STATS_BLOCK_M=2, STATS_BLOCK_K=2048)  # looped
    seen = set()
    for name, stages, kernel in COMPILED:
        ttgir = kernel.asm["ttgir"]
        problems = wgmma_hazards(ttgir, stages)
        assert not problems, (name, problems)
        assert kernel.metadata.shared <= 227 * 1024, (name, kernel.metadata.shared)
        if name == "gemm_kernel":  # the large-M GEMM: wgmma overlapped with the next tile's
            assert "warp_group_dot" in ttgir, name  # loads (TMA or async copies)
            assert re.search(r"pendings = [12]", ttgir), name
            assert "async_tma_copy" in ttgir or "async_copy_global_to_local" in ttgir, name
        seen.add(name)
    assert seen == {"fused_kernel", "gemm_kernel", "row_stats_kernel", "gate_kernel",
                    "normalize_tile_kernel"}, seen
    print("ok")
''')


def test_no_wgmma_buffer_hazard(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    root = str(Path(__file__).resolve().parents[2])
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    script = tmp_path / "aot_sm90.py"  # @triton.jit reads its source from a file
    script.write_text(AOT_SCRIPT)
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# GPU lane: the compiled kernels at a Llama-7B-like width (float64 reference computed on the GPU).

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_SHAPES = {  # id: (K, N, options)
    "proj": (4096, 12288, {}),
    "gate_up_silu": (4096, 2 * 11008, dict(epilogue="silu_gate", bias=False)),
    "qkv_gqa": (4096, 6144, dict(splits=[4096, 1024, 1024], bias=False)),
}
GPU_VARIANTS = {  # id: (design, config overrides)
    "auto": (None, {}),
    "fused": ("fused", {}),
    "split": ("split", {}),
    "split_pointer_persistent": ("split", dict(USE_TMA=False, PERSISTENT=True)),
    "cublas": ("cublas", {}),
}


# The pointer-load persistent GEMM is a large-M variant only.
GPU_CASES = [(m, v) for m in (1, 16, 2048) for v in GPU_VARIANTS
             if m == 2048 or v != "split_pointer_persistent"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M,variant", GPU_CASES, ids=[f"{m}-{v}" for m, v in GPU_CASES])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
def test_gpu_against_float64(shape, kind, M, variant):
    K, N, opts = GPU_SHAPES[shape]
    design, over = GPU_VARIANTS[variant]
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(f"{shape}{kind}{M}".encode()))
    args = _args(gen, M, K, N, bf16, kind, device="cuda", **opts)
    _check(args, design=design, **over)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant", list(GPU_VARIANTS)[1:])
@pytest.mark.parametrize("M", [1, 2048])
def test_gpu_repeated_launches_are_bitwise_equal(variant, M):
    # A race shows as results that change between identical launches (the old fused RMSNorm
    # kernel differed from run to run at M = 2048); every design here is deterministic.
    design, over = GPU_VARIANTS[variant]
    gen = torch.Generator(device="cuda").manual_seed(34 + M)
    for kind, opts in (("rmsnorm", dict(epilogue="silu_gate", bias=False)),
                       ("layernorm", dict(splits=[4096, 1024, 1024]))):
        n = 2 * 11008 if kind == "rmsnorm" else 6144
        args = _args(gen, M, 4096, n, bf16, kind, device="cuda", **opts)
        first = _run(args, design, **over)
        for _ in range(20):
            again = _run(args, design, **over)
            assert all(torch.equal(a, b) for a, b in zip(first, again)), (kind, variant)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [f16, f32], ids=["f16", "f32"])
@pytest.mark.parametrize("M", [16, 2048])
def test_gpu_other_dtypes_residual(dtype, M):
    gen = torch.Generator(device="cuda").manual_seed(31 + M)
    for design in NL.DESIGNS:
        _check(_args(gen, M, 4096, 4096, dtype, "layernorm", residual=True, device="cuda"),
               design=design)
        _check(_args(gen, M, 4096, 4096, dtype, "rmsnorm", residual=True, device="cuda"),
               design=design)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("design", NL.DESIGNS)
def test_gpu_large_mean(design):
    gen = torch.Generator(device="cuda").manual_seed(32)
    for M in (16, 2048):
        _check(_args(gen, M, 4096, 4096, bf16, "layernorm", mean=1000.0, device="cuda"), design=design)


@pytest.mark.gpu
@needs_cuda
def test_gpu_odd_sizes_and_3d():
    gen = torch.Generator(device="cuda").manual_seed(33)
    for design in NL.DESIGNS:
        _check(_args(gen, None, 4000, 3001, bf16, "layernorm", lead=(3, 343), device="cuda"),
               design=design)
        _check(_args(gen, None, 1000, 2 * 1501, bf16, "rmsnorm", lead=(2, 7), epilogue="silu_gate",
                     residual=True, device="cuda"), design=design)


def test_cast_cache_keeps_live_entries_and_prunes_dead_ones():
    # A CUDA graph that used a cached conversion points at it: past its size the cache drops
    # only entries whose source is gone, never one a live (folded) bias still maps to.
    cache = NL._CastCache(size=2)
    live = [torch.randn(4), torch.randn(4)]
    first = [cache(t, torch.float64) for t in live]
    dead = torch.randn(4)
    cache(dead, torch.float64)  # over the size: nothing dead yet, so nothing dropped
    assert len(cache.entries) == 3
    del dead
    cache(torch.randn(4), torch.float64)  # prunes the dead source's entry (and the new one's
    # source, a temporary, dies after the call: pruned at the next insertion)
    for t, out in zip(live, first):
        assert cache(t, torch.float64) is out  # same tensor: still cached
        assert torch.equal(out, t.double())
    live[0].add_(1)  # a modified source is converted again
    assert torch.equal(cache(live[0], torch.float64), live[0].double())
