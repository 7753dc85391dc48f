"""q3n::norm_linear against a float64 reference (CPU lane: Triton interpreter; GPU lane: -m gpu)."""

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
# Max |kernel - float64| on O(1) outputs. The fp16/bf16 bounds are loose backstops; the sharp
# check is "no farther from float64 than eager norm-then-linear in the same dtype" below.
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


def _check(args, *, design=None, tol_scale=1.0):
    x, w = args[0], args[1]
    if design is None:
        outs = op(*args)
    else:
        M = x.numel() // x.shape[-1]
        n_out = sum(args[8]) if args[8] else (w.shape[0] // 2 if args[7] == "silu_gate" else w.shape[0])
        interp = x.device.type == "cpu"
        cfg = dict(NL.choose_config(M, n_out, x.shape[-1], w.dtype, args[7], interpreter=interp),
                   design=design)
        outs = NL._launch(*args, interpreter=interp, config=cfg)
    exact = _exact(*args)
    assert len(outs) == len(exact)
    eager = _eager(*args) if w.dtype in SLACK and x.dtype == w.dtype else None
    errs = []
    for i, (out, want) in enumerate(zip(outs, exact)):
        assert out.shape == want.shape and out.dtype == w.dtype and out.device == x.device
        assert out.is_contiguous()
        assert not torch.isnan(out).any()
        err = (out.double() - want).abs().max().item()
        errs.append(err)
        assert err <= TOL[w.dtype] * tol_scale, f"output {i}: max abs err {err:.3g} > {TOL[w.dtype]:.3g}"
        if eager is not None:
            eager_err = (eager[i].double() - want).abs().max().item()
            assert err <= 2 * eager_err + SLACK[w.dtype], (
                f"output {i}: kernel err {err:.3g} vs eager {w.dtype} err {eager_err:.3g}")
    return outs, max(errs)


# (M, K, N, dtype, kind, design, options); K and N are odd or off the 16-wide interpreter tiles.
CPU_CASES = {
    "ln_f32_fused": (33, 80, 96, f32, "layernorm", "fused", {}),
    "ln_f32_split_oddK": (21, 37, 45, f32, "layernorm", "split", {}),
    "rms_f32_fused_nobias": (17, 37, 45, f32, "rmsnorm", "fused", dict(bias=False)),
    "rms_f32_split_3d": (10, 80, 96, f32, "rmsnorm", "split", dict(lead=(2, 5))),
    "ln_bf16_fused": (33, 48, 40, bf16, "layernorm", "fused", {}),
    "ln_bf16_split_residual": (19, 40, 33, bf16, "layernorm", "split", dict(residual=True)),
    "rms_bf16_fused_silu": (17, 40, 46, bf16, "rmsnorm", "fused", dict(epilogue="silu_gate")),
    "rms_bf16_split_silu_residual": (
        21, 33, 50, bf16, "rmsnorm", "split", dict(epilogue="silu_gate", residual=True)),
    "ln_f16_fused_qkv": (13, 40, 40, f16, "layernorm", "fused", dict(splits=[24, 8, 8])),
    "rms_f16_split_4_outputs": (19, 37, 45, f16, "rmsnorm", "split", dict(splits=[20, 9, 9, 7])),
    "ln_f16_split_2_outputs_nobias": (
        19, 37, 45, f16, "layernorm", "split", dict(splits=[29, 16], bias=False)),
    "ln_f16_fused_residual": (9, 64, 48, f16, "layernorm", "fused", dict(residual=True)),
    "rms_f16_decode_m1": (1, 80, 96, f16, "rmsnorm", "fused", {}),
    "ln_bf16_decode_m1_silu": (1, 40, 34, bf16, "layernorm", "fused", dict(epilogue="silu_gate")),
    "ln_f32_silu_gate": (7, 40, 46, f32, "layernorm", "split", dict(epilogue="silu_gate")),
    "rms_x_f32_w_bf16": (17, 40, 24, f32, "rmsnorm", "fused", dict(wdtype=bf16)),
    "ln_x_bf16_w_f32": (17, 40, 24, bf16, "layernorm", "split", dict(wdtype=f32)),
}


@pytest.mark.parametrize("case", list(CPU_CASES), ids=list(CPU_CASES))
def test_against_float64(case):
    M, K, N, dtype, kind, design, opts = CPU_CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    _check(_args(gen, M, K, N, dtype, kind, **opts), design=design)


@pytest.mark.parametrize("design", ["fused", "split"])
def test_small_tiles_and_grouped_order(design):
    # 16 x 16 x 16 tiles with GROUP_M = 3: 4 row blocks (a partial group), 3 column blocks, K tail.
    gen = torch.Generator().manual_seed(27)
    args = _args(gen, 50, 37, 45, f16, "layernorm", splits=[20, 25], residual=False)
    cfg = dict(NL.choose_config(50, 45, 37, f16, interpreter=True), design=design, BLOCK_M=16,
               BLOCK_N=16, BLOCK_K=16, GROUP_M=3, STATS_BLOCK_M=8, STATS_BLOCK_K=16)
    outs = NL._launch(*args, interpreter=True, config=cfg)
    for out, want in zip(outs, _exact(*args)):
        assert (out.double() - want).abs().max().item() <= TOL[f16]
    assert outs[0].shape == (50, 20) and outs[1].shape == (50, 25)


@pytest.mark.parametrize("design", ["fused", "split"])
@pytest.mark.parametrize("dtype", [f32, f16, bf16], ids=["f32", "f16", "bf16"])
def test_layernorm_large_mean(dtype, design):
    # mean 1000, std 1: x·W'ᵀ − μ·rowsum(W') would cancel ~10 bits; the kernel centres first.
    gen = torch.Generator().manual_seed(20 + len(design) + dtype.itemsize)
    args = _args(gen, 19, 64, 40, dtype, "layernorm", mean=1000.0)
    _, err = _check(args, design=design)
    if dtype == f32:
        # The same inputs through the uncentred formula lose far more than the kernel does.
        x, w, b = args[0].double(), args[1], args[2]
        xf = x.float()
        mu, rstd = x.mean(-1, keepdim=True), torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + EPS)
        naive = (rstd.float() * (xf @ w.t() - mu.float() * w.sum(1))) + b
        naive_err = (naive.double() - _exact(*args)[0]).abs().max().item()
        assert naive_err > 10 * err, (naive_err, err)


def test_rmsnorm_large_values():
    gen = torch.Generator().manual_seed(21)
    _check(_args(gen, 17, 48, 40, bf16, "rmsnorm", mean=300.0))


def test_default_design_and_rowsum_computed_when_missing():
    gen = torch.Generator().manual_seed(22)
    args = list(_args(gen, 5, 40, 24, f32, "layernorm"))
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
    for kind in ("layernorm", "rmsnorm"):
        rs = w.float().sum(1) if kind == "layernorm" else None
        _check((x, w, b, rs, EPS, kind, r, "none", None))


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


def test_choose_config_rule():
    cfg = NL.choose_config(2048, 12288, 4096, bf16)
    assert cfg["design"] == "split" and (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) == (128, 128, 64)
    assert NL.choose_config(1, 12288, 4096, bf16)["design"] == "fused"
    assert NL.choose_config(16, 12288, 4096, bf16)["BLOCK_M"] == 16
    assert NL.choose_config(NL.FUSED_MAX_M, 12288, 4096, bf16)["design"] == "fused"
    assert NL.choose_config(NL.FUSED_MAX_M + 1, 12288, 4096, bf16)["design"] == "split"
    assert NL.choose_config(2048, 11008, 4096, bf16, "silu_gate")["BLOCK_N"] == 64
    assert NL.choose_config(2048, 12288, 4096, f32)["BLOCK_K"] == 32
    assert NL.choose_config(100, 20, 24, bf16)["BLOCK_N"] == 32  # never wider than padded N
    cfg = NL.choose_config(33, 96, 80, f32, interpreter=True)
    assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) == (16, 32, 32)
    for m in (1, 7, 16, 17, 64, 65, 4096):
        for epi in ("none", "silu_gate"):
            cfg = NL.choose_config(m, 4096, 4096, f32, epi)
            assert min(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) >= 16  # tl.dot's minimum


def test_64bit_offsets_rule_and_path(monkeypatch):
    meta = dict(device="meta", dtype=bf16)
    cfg = NL.choose_config(8192, 12288, 4096, bf16)
    assert not NL._needs_64bit_offsets(torch.empty(8192, 4096, **meta), torch.empty(12288, 4096, **meta),
                                       None, 12288, cfg)
    # A 152k-vocab lm_head at 16k tokens: the output has 2.5e9 elements.
    big = NL.choose_config(16384, 152064, 4096, bf16)
    assert NL._needs_64bit_offsets(torch.empty(16384, 4096, **meta),
                                   torch.empty(152064, 4096, **meta), None, 152064, big)
    monkeypatch.setattr(NL, "_needs_64bit_offsets", lambda *a: True)
    gen = torch.Generator().manual_seed(26)
    for design in ("fused", "split"):
        _check(_args(gen, 19, 40, 45, f16, "layernorm", splits=[20, 25], residual=False), design=design)


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
        print("ok")
    """)
    run_without_interpreter(code)


AOT_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from q3n_compile.kernels import norm_linear as NL

    ARGS = ["X", "W", "BIAS", "RS", "RES", "STATS", "O0", "O1", "O2", "O3", "M", "N", "K", "eps",
            "stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_rm", "stride_rn",
            "E1", "E2", "E3", "UP_ROW"]

    def build(M, N, K, kind, design, epilogue="none", num_out=1, residual=False):
        # What a launch on an H200 specialises: 16-byte aligned pointers, unit strides as
        # constants, sizes divisible by 16 marked so.
        cfg = NL.choose_config(M, N, K, torch_dtype, epilogue)
        ints = dict(M=M, N=N, K=K, stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1,
                    stride_rm=N if residual else 0, stride_rn=1 if residual else 0,
                    E1=N // 2, E2=3 * N // 4, E3=N, UP_ROW=N if epilogue == "silu_gate" else 0)
        sig, consts, attrs = {}, {}, {}
        for i, name in enumerate(ARGS):
            if name == "eps":
                sig[name] = "fp32"
            elif name in ints and ints[name] == 1:
                sig[name], consts[name] = "constexpr", 1
            elif name in ints:
                sig[name] = "i32"
                if ints[name] % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[name] = "*fp32" if name in ("BIAS", "RS", "STATS") else "*bf16"
                attrs[(i,)] = [["tt.divisibility", 16]]
        flags = dict(KIND=0 if kind == "layernorm" else 1, STATS_MODE=0 if design == "fused" else 1,
                     HAS_BIAS=True, HAS_RES=residual, SILU_GATE=epilogue == "silu_gate",
                     NUM_OUT=num_out, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                     BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], EVEN_K=True,
                     DOT_PRECISION="tf32", DOT_IN_FP32=False, OFFSETS_64=False, RNE_BF16=False)
        for name, value in flags.items():
            sig[name], consts[name] = "constexpr", value
        src = ASTSource(fn=NL.norm_linear_kernel, signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        return k.metadata.shared, "warp_group_dot" in k.asm["ttgir"], "async_copy" in k.asm["ttgir"]

    import torch
    torch_dtype = torch.bfloat16
    shared, wgmma, pipelined = build(1, 6144, 4096, "layernorm", "fused", num_out=3)
    assert shared <= 227 * 1024 and pipelined, (shared, pipelined)
    shared, wgmma, pipelined = build(2048, 11008, 4096, "rmsnorm", "split", epilogue="silu_gate")
    assert shared <= 227 * 1024 and wgmma and pipelined, (shared, wgmma, pipelined)
    shared, wgmma, pipelined = build(2048, 12288, 4096, "layernorm", "split", residual=True)
    assert shared <= 227 * 1024 and wgmma and pipelined, (shared, wgmma, pipelined)
    print("ok")
""")


def test_compiles_for_h100_class_gpu_without_one():
    # Triton compiles for sm_90 (TTIR -> TTGIR -> PTX -> ptxas) on a machine without a GPU: the
    # CPU lane catches what only the compiler (not the interpreter) rejects, for the configs
    # choose_config gives at decode and prefill, and checks they use wgmma and async copies.
    pytest.importorskip("triton.backends.nvidia")
    root = str(Path(__file__).resolve().parents[2])
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# GPU lane: the compiled kernels at a Llama-7B-like width (float64 reference computed on the GPU).

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_SHAPES = {  # id: (K, N, options)
    "proj": (4096, 12288, {}),
    "gate_up_silu": (4096, 2 * 11008, dict(epilogue="silu_gate", bias=False)),
    "qkv_gqa": (4096, 6144, dict(splits=[4096, 1024, 1024], bias=False)),
}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("design", ["auto", "fused", "split"])
@pytest.mark.parametrize("M", [1, 16, 2048])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
def test_gpu_against_float64(shape, kind, M, design):
    K, N, opts = GPU_SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(f"{shape}{kind}{M}".encode()))
    args = _args(gen, M, K, N, bf16, kind, device="cuda", **opts)
    _check(args, design=None if design == "auto" else design)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [f16, f32], ids=["f16", "f32"])
@pytest.mark.parametrize("M", [16, 2048])
def test_gpu_other_dtypes_residual(dtype, M):
    gen = torch.Generator(device="cuda").manual_seed(31 + M)
    _check(_args(gen, M, 4096, 4096, dtype, "layernorm", residual=True, device="cuda"))
    _check(_args(gen, M, 4096, 4096, dtype, "rmsnorm", residual=True, device="cuda"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("design", ["fused", "split"])
def test_gpu_large_mean(design):
    gen = torch.Generator(device="cuda").manual_seed(32)
    for M in (16, 2048):
        _check(_args(gen, M, 4096, 4096, bf16, "layernorm", mean=1000.0, device="cuda"), design=design)


@pytest.mark.gpu
@needs_cuda
def test_gpu_odd_sizes_and_3d():
    gen = torch.Generator(device="cuda").manual_seed(33)
    _check(_args(gen, None, 4000, 3001, bf16, "layernorm", lead=(3, 343), device="cuda"))
    _check(_args(gen, None, 1000, 2 * 1501, bf16, "rmsnorm", lead=(2, 7), epilogue="silu_gate",
                 residual=True, device="cuda"))
