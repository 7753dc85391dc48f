"""norm_linear and quantize composed: a norm before linears that quant_config quantizes.

norm_linear folds γ/β into the linears (W' = W·diag(γ), b' = W·β + b) and emits the
normalisation (``q3n::normalize``) with float linears on W' marked for quantize; quantize
quantizes W' (calibrated on x_hat, the rows the layer really receives) and, for quantized
activations, replaces normalise + quantize-activations by ``q3n::norm_act_quant`` whose codes feed
``q3n::qlinear_codes``. Toy modules run the kernels in Triton's interpreter; whole models use the
kernels' torch references (the kernel tests cover Triton).
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
# Qwen3-Next's (and Gemma's) zero-centred RMSNorm: the weight multiplies as (1 + w), in float32.
from transformers.models.qwen3_next.modeling_qwen3_next import (
    Qwen3NextRMSNorm as ZeroCentredRMSNorm,
)

import q3n_compile
from q3n_compile import quant
from q3n_compile.models import RMSNorm, build_model, example_inputs
from q3n_compile.quant import calibration as C

from .norm_models import randomize

pytestmark = [pytest.mark.usefixtures("fresh_quant_state"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0"),
              pytest.mark.filterwarnings("ignore:overflow encountered")]

K = 40
OLD_REASONS = ("left to quantize: quant_config quantizes this linear",
               "fused into norm_linear: quantizing fused linears is not built yet")


NORMS = {
    "layernorm": lambda: nn.LayerNorm(K),
    "layernorm_no_affine": lambda: nn.LayerNorm(K, elementwise_affine=False),
    "layernorm_no_bias": lambda: nn.LayerNorm(K, bias=False),
    "rmsnorm_hf": lambda: RMSNorm(K, eps=1e-6),
    "rmsnorm_torch": lambda: nn.RMSNorm(K, eps=1e-5),
    "rmsnorm_zero_centred": lambda: ZeroCentredRMSNorm(K),
}


class NormThenLinears(nn.Module):
    def __init__(self, norm, widths=(24, 8, 8), bias=(True, False, True)):
        super().__init__()
        self.norm = NORMS[norm]()
        self.linears = nn.ModuleList(nn.Linear(K, n, bias=b) for n, b in zip(widths, bias))

    def forward(self, x):
        h = self.norm(x)
        return torch.cat([lin(h) for lin in self.linears], -1)


def _randomize(model, seed=0):
    return randomize(model, spread=0.3, seed=seed)


def _x(*shape, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


FORMATS = {  # rules for every linear; toy modules have no layer classes
    "w8a8": {"weight_bits": 8, "activation_bits": 8, "activation_format": "int8"},
    "w4a8_fp8": {"weight_bits": 4, "activation_bits": 8, "activation_format": "fp8"},
    "w6a12": {"weight_bits": 6, "activation_bits": 12},
    "w4a16": {"weight_bits": 4},
}
# Relative L2 error against eager allowed per format (quantization noise at K = 40, 32 rows).
NOISE = {"w8a8": 0.02, "w4a8_fp8": 0.15, "w6a12": 0.05, "w4a16": 0.15}


def _compile(model, x, qc, fuse=True, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="q3n", options={
        "quant_config": qc, "norm_fusion": fuse, "attention": "off", **options})
    out = compiled(x)
    return compiled, out, q3n_compile.reports()[-1]


def _no_old_reasons(report):
    for name in ("norm_linear", "quantize"):
        p = report["passes"][name]
        assert not set(p["declined"]) & set(OLD_REASONS), p["declined"]
        assert not set(p["detail"].get("linears_left_unfused", {})) & set(OLD_REASONS)


CASES = [("layernorm", "w8a8"), ("layernorm_no_affine", "w8a8"), ("rmsnorm_hf", "w8a8"),
         ("rmsnorm_zero_centred", "w6a12"), ("layernorm_no_bias", "w4a8_fp8"),
         ("rmsnorm_torch", "w4a16")]


@pytest.mark.parametrize("norm,fmt", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_norm_forms_compose_in_the_interpreter(norm, fmt):
    model = _randomize(NormThenLinears(norm))
    x = _x(4, 8, K)  # 32 rows: enough to calibrate on the example inputs
    qc = {"rules": [{"match": "*", **FORMATS[fmt]}], "calibration": {"smoothquant": False}}
    _, out, report = _compile(model, x, qc, strict=True)
    assert _rel(out, model(x)) < NOISE[fmt], _rel(out, model(x))
    _no_old_reasons(report)

    nl = report["passes"]["norm_linear"]
    assert (nl["status"], nl["matched"], nl["rewritten"], nl["declined"]) == ("applied", 1, 1, {})
    (fusion,) = nl["detail"]["fusions"]
    (call,) = fusion["calls"]
    assert call["quantized"] and call["linears"] == ["linears.0", "linears.1", "linears.2"]
    assert nl["detail"]["folded_for_quantize_bytes"] > 0 and nl["detail"]["folded_bytes"] == 0

    q = report["passes"]["quantize"]
    assert (q["status"], q["matched"], q["rewritten"], q["declined"]) == ("applied", 3, 3, {})
    a16 = fmt == "w4a16"
    for entry in q["detail"]["layers"]:
        assert entry["norm_fused"] == {
            "norm": "norm", "activations": "q3n::normalize" if a16 else "q3n::norm_act_quant"}
        assert entry["calibration"] == "example inputs" and entry["calibration_rows"] == 32
        assert 0 < entry["rel_err"] < 0.2
        # K = 40 takes per-channel scales: W8A8 is then packed K-major (the i8 path, whose
        # qlinear_codes reads norm_act_quant's codes as they are).
        assert entry["weight_layout"] == ("k-major int8" if fmt == "w8a8" else "bit planes")
    ops = report["ops"]
    # One pass over x for the three siblings (no smoothing vectors: they quantize x_hat alike),
    # and one GEMM for them (merge_siblings): biases 24 + 0 (none) + 8 columns.
    assert ops.get("q3n.norm_act_quant.default", 0) == (0 if a16 else 1)
    assert ops.get("q3n.qlinear_codes.default", 0) == (0 if a16 else 1)
    assert ops.get("q3n.qlinear.default", 0) == (1 if a16 else 0)
    assert ops["aten.slice.Tensor"] == 3
    (group,) = q["detail"]["siblings"]["groups"]
    assert group["layers"] == ["linears.0", "linears.1", "linears.2"]
    assert group["columns"] == [[0, 24], [24, 32], [32, 40]]
    assert ops.get("q3n.normalize.default", 0) == (1 if a16 else 0)
    assert "aten.mm.default" not in ops and "aten.addmm.default" not in ops
    assert "aten.native_layer_norm.default" not in ops and "aten.rsqrt.default" not in ops
    assert q["detail"]["norm_fused"] == {"layers": 3, "norm_act_quant_calls": 0 if a16 else 1,
                                         "normalize_kept": 1 if a16 else 0}

    # W' of the three linears; b' = W·β + b where there is a β or a b (all three with β).
    biased = 40 if norm == "layernorm" else 24 + 8
    assert nl["detail"]["folded_for_quantize_bytes"] == (40 * 40 + biased) * 4
    # Calibration saw x_hat: the statistics attached to the weights are those of the normalised
    # rows (γ/β not applied), under this fold.
    st, _ = C.lookup_stats(model.linears[0].weight)
    assert st.q3n_normalised
    kind = "layernorm" if norm.startswith("layernorm") else "rmsnorm"
    eps = getattr(model.norm, "eps", None) or getattr(model.norm, "variance_epsilon", None)
    xh = (F.layer_norm(x, (K,), eps=eps) if kind == "layernorm"
          else F.rms_norm(x, (K,), eps=eps)).reshape(-1, K)
    torch.testing.assert_close(st.samples(), xh, rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("reference_kernels")  # whole models: the kernel tests cover Triton
@pytest.mark.parametrize("fmt", ["w8a8", "w4a16"])
def test_builtin_model_matches_quant_config_alone(fmt):
    # Calibrated on the example inputs (the error figures); plain RTN keeps the test fast (GPTQ,
    # SmoothQuant and the clipping search are the quantize tests' business).
    cfg = {"ffn_layers": {"weight_bits": 8, "activation_bits": 8},
           "attn_layers": {"weight_bits": 8, "activation_bits": 8}} if fmt == "w8a8" else {
        "ffn_layers": {"weight_bits": 4}, "attn_layers": {"weight_bits": 4}}
    cfg["calibration"] = {"method": "rtn", "smoothquant": False, "clip_search": False}
    model = build_model("qwen3", "tiny")
    inputs = example_inputs("qwen3", model, 2, 16, seed=1)  # 32 rows: calibrated on them
    want = model(*inputs)
    torch._dynamo.reset()
    alone = torch.compile(model, backend="q3n", options={"quant_config": cfg})(*inputs)
    q_alone = q3n_compile.reports()[-1]["passes"]["quantize"]

    def fused():  # the whole pipeline: attention, norm_linear, quantize, memory_plan
        torch._dynamo.reset()
        out = torch.compile(model, backend="q3n", options={
            "quant_config": cfg, "norm_fusion": True})(*inputs)
        return out, q3n_compile.reports()[-1]

    out, report = fused()
    # Both are quantizations of the same function: their distance is quantization noise (the
    # bound the quantize tests use), and the fused one is no farther from eager.
    assert _rel(out, alone) < 0.2, _rel(out, alone)
    assert _rel(out, want) <= 1.25 * _rel(alone, want) + 0.01, (_rel(out, want), _rel(alone, want))
    _no_old_reasons(report)
    assert {name: p["status"] for name, p in report["passes"].items()} == dict.fromkeys(
        ("attention", "norm_linear", "quantize", "memory_plan"), "applied")
    assert report["fallbacks"] == []

    nl = report["passes"]["norm_linear"]
    # input_layernorm -> q/k/v and post_attention_layernorm -> gate/up of both layers are folded
    # for quantize; the final norm -> lm_head (a head: not quantized) fuses as q3n::norm_linear.
    assert (nl["matched"], nl["rewritten"], nl["declined"]) == (5, 5, {})
    assert nl["detail"]["linears_left_unfused"] == {}
    assert sum(c.get("quantized", False) for f in nl["detail"]["fusions"] for c in f["calls"]) == 4
    ops = report["ops"]
    assert ops["q3n.norm_linear.default"] == 1
    q = report["passes"]["quantize"]
    # The same layers quantized, kept and counted as without norm fusion.
    assert q["rewritten"] == q_alone["rewritten"] == 14
    assert q["declined"] == q_alone["declined"] == {
        "head layers stay in high precision unless a rule names them": 1}
    assert q["detail"]["kept_high_precision"] == q_alone["detail"]["kept_high_precision"]
    layers = {e["layer"]: e for e in q["detail"]["layers"]}
    fused_layers = [k for k, e in layers.items() if "norm_fused" in e]
    assert len(fused_layers) == 10 and not any(k.endswith(("o_proj", "down_proj"))
                                               for k in fused_layers)
    assert all(e["calibration"] == "example inputs" and e["rel_err"] is not None
               for e in layers.values())
    # q/k/v and gate/up of each layer: one GEMM each (merge_siblings).
    assert q["detail"]["siblings"]["calls_saved"] == 6
    if fmt == "w8a8":
        assert ops["q3n.qlinear_codes.default"] == 4 and ops["q3n.qlinear.default"] == 4
        assert ops["q3n.norm_act_quant.default"] == 4  # one per norm: siblings share x's codes
        assert "q3n.normalize.default" not in ops
    else:
        assert ops["q3n.qlinear.default"] == 8 and ops["q3n.normalize.default"] == 4
    # A recompile quantizes the folded weights the same way, from the cache (the x_hat
    # statistics were attached to the source weights under this fold).
    again, report2 = fused()
    assert report2["passes"]["quantize"]["detail"]["cache"] == {"hits": 14, "misses": 0}
    assert torch.equal(again, out)


def test_activation_groups_compose_in_the_interpreter():
    """Per-group activation scales through norm_act_quant + qlinear_codes: K = 40 is one group
    of 32 and a partial one of 8. Siblings share one call only when their groups match."""
    model = _randomize(NormThenLinears("layernorm"))
    x = _x(4, 8, K)
    # An outlier channel in the partial group (32..39): per token it coarsens every code of its
    # row; per 32 channels, only those of its own group of 8.
    x[..., 35] *= 30
    want = model(x)
    rtn = {"method": "rtn", "clip_search": False, "smoothquant": False, "example_inputs": False}
    w8a8 = FORMATS["w8a8"]

    def run(rules):
        return _compile(model, x, {"rules": rules, "calibration": rtn}, strict=True)

    _, grouped, report = run([{"match": "*", **w8a8, "activation_group_size": 32}])
    ops = report["ops"]
    assert ops["q3n.norm_act_quant.default"] == 1 and ops["q3n.qlinear_codes.default"] == 1
    q = report["passes"]["quantize"]
    assert all(e["format"].endswith("int8 act-g32") and e["norm_fused"]["activations"]
               == "q3n::norm_act_quant" for e in q["detail"]["layers"])
    assert _rel(grouped, want) < NOISE["w8a8"], _rel(grouped, want)
    _, token, _ = run([{"match": "*", **w8a8}])
    # RTN weights, the same in both: only the activation groups differ. Measured: 1.23e-2 per
    # token, 8.2e-3 per 32 channels (the weights' rounding is the rest).
    assert _rel(grouped, want) < 0.8 * _rel(token, want), (_rel(grouped, want), _rel(token, want))

    # linears.0 per 32 channels, the others per token: two norm_act_quant calls.
    _, mixed, report = run([{"match": "linears.0", **w8a8, "activation_group_size": 32},
                            {"match": "*", **w8a8}])
    assert report["ops"]["q3n.norm_act_quant.default"] == 2
    assert report["passes"]["quantize"]["detail"]["norm_fused"]["norm_act_quant_calls"] == 2
    # linears.1 and .2 share their codes and format: one GEMM; linears.0 reads other codes.
    siblings = report["passes"]["quantize"]["detail"]["siblings"]
    assert [g["layers"] for g in siblings["groups"]] == [["linears.1", "linears.2"]]
    assert report["ops"]["q3n.qlinear_codes.default"] == 2
    torch.testing.assert_close(mixed[..., :24], grouped[..., :24], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(mixed[..., 24:], token[..., 24:], rtol=1e-3, atol=1e-3)


def test_calibrate_statistics_are_mapped_to_the_normalised_rows():
    """calibrate() records h = γ·x_hat + β at the linear's input; the folded linear's input is
    x_hat. Without β the map is exact; with β the kept rows are mapped."""
    from q3n_compile.passes.quantize import _normalised_stats

    gen = torch.Generator().manual_seed(0)
    xh = torch.randn(300, 24, generator=gen)
    gamma = (torch.randn(24, generator=gen) + 2).double()
    beta = torch.randn(24, generator=gen).double()
    direct = C.LayerStats(24, 512)
    direct.add(xh)
    for b in (None, beta):
        h = C.LayerStats(24, 512)
        h.add((xh.double() * gamma + (0 if b is None else b)).float())
        mapped = _normalised_stats(h, {"gamma": gamma, "beta": b})
        assert mapped.n == 300 and mapped.source == "calibrate()"
        torch.testing.assert_close(mapped.h, direct.h, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(mapped.absmax, direct.absmax, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mapped.samples(), xh, rtol=1e-5, atol=1e-5)
    assert _normalised_stats(h, {"gamma": gamma * 0, "beta": None}) is None  # γ = 0: not invertible


@pytest.mark.usefixtures("reference_kernels")
def test_calibrate_before_compile_feeds_the_folded_layers():
    model = _randomize(NormThenLinears("rmsnorm_hf"))
    quant.calibrate(model, [_x(4, 16, K, seed=s) for s in range(3)])
    qc = {"rules": [{"match": "*", "weight_bits": 4, "activation_bits": 8}]}
    x = _x(1, 5, K, seed=9)
    _, out, report = _compile(model, x, qc)
    q = report["passes"]["quantize"]
    assert q["rewritten"] == 3 and q["detail"]["calibration"]["sources"] == {"calibrate()": 3}
    assert all(e["calibration_rows"] == 192 and e["rel_err"] < 0.15 for e in q["detail"]["layers"])
    assert _rel(out, model(x)) < 0.15


class _TwoNorms(nn.Module):
    """q/k/v-like siblings the config quantizes, and one it leaves alone (a head)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(K)
        self.up_proj = nn.Linear(K, 24)
        self.lm_head = nn.Linear(K, 16, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return self.up_proj(h), self.lm_head(h)


@pytest.mark.usefixtures("reference_kernels")
def test_quantized_and_unquantized_siblings_and_the_report(monkeypatch):
    from q3n_compile import pipeline

    buffers = {}

    def spy(spec):
        def run(gm, ctx):
            stats = spec.run(gm, ctx)
            buffers[spec.name] = sorted(gm._buffers)
            return stats
        return dataclasses.replace(spec, run=run)

    monkeypatch.setattr(pipeline, "PASSES", tuple(spy(s) for s in pipeline.PASSES))
    model = _randomize(_TwoNorms())
    qc = {"ffn_layers": {"weight_bits": 4, "activation_bits": 8},
          "calibration": {"example_inputs": False}}
    x = _x(2, 5, K)
    _, (up, head), report = _compile(model, x, qc, strict=True)
    # quantize drops the folded weight it packed; the folded bias feeds q3n::qlinear_codes.
    assert "_q3n_norm_quant_weight_0" in buffers["norm_linear"]
    assert "_q3n_norm_quant_weight_0" not in buffers["quantize"]
    assert "_q3n_norm_quant_bias_0" in buffers["quantize"]
    want_up, want_head = model(x)
    assert _rel(head, want_head) < 2e-5  # fused, not quantized: exact
    assert _rel(up, want_up) < 0.15
    nl = report["passes"]["norm_linear"]
    assert (nl["matched"], nl["rewritten"], nl["declined"]) == (1, 1, {})
    (fusion,) = nl["detail"]["fusions"]
    assert [c["linears"] for c in fusion["calls"]] == [["lm_head"], ["up_proj"]]
    assert [bool(c.get("quantized")) for c in fusion["calls"]] == [False, True]
    q = report["passes"]["quantize"]
    # The head inside q3n::norm_linear is reported as the unfused head would be.
    assert q["declined"] == {"head layers stay in high precision unless a rule names them": 1}
    assert q["detail"]["kept_high_precision"] == [{
        "layer": "lm_head", "class": "head",
        "reason": "head layers stay in high precision unless a rule names them"}]
    assert [e["layer"] for e in q["detail"]["layers"]] == ["up_proj"]
    assert report["ops"]["q3n.norm_linear.default"] == 1
    assert report["ops"]["q3n.norm_act_quant.default"] == 1


@pytest.mark.usefixtures("reference_kernels")
def test_format_that_cannot_be_honoured_strict_and_not():
    model = _randomize(NormThenLinears("layernorm"))
    qc = {"rules": [{"match": "linears.0", "weight_bits": 4, "group_size": 32}],  # K = 40
          "calibration": {"example_inputs": False}}
    x = _x(2, 5, K)
    with pytest.raises(Exception, match=r"linears\.0.*group_size 32 does not divide in_features "
                                        r"40\. Fix: use group_size -1"):
        _compile(model, x, qc, strict=True)
    quant.clear()
    _, out, report = _compile(model, x, qc)
    # Kept in high precision: the normalise kernel, then the float linear on the folded weight
    # (exact); the two linears the config leaves alone fuse as q3n::norm_linear.
    assert _rel(out, model(x)) < 2e-5
    q = report["passes"]["quantize"]
    assert q["rewritten"] == 0
    assert q["declined"] == {"format cannot be honoured (see kept_high_precision)": 1,
                             "no rule matched and the layer is neither attention nor "
                             "feed-forward": 2}
    ops = report["ops"]
    assert ops["q3n.normalize.default"] == 1 and ops["aten.addmm.default"] == 1
    assert ops["q3n.norm_linear.default"] == 1
    _no_old_reasons(report)


@pytest.mark.usefixtures("reference_kernels")
def test_release_keeps_the_weights_norm_linear_refolds():
    model = _randomize(NormThenLinears("rmsnorm_hf"))
    qc = {"rules": [{"match": "*", "weight_bits": 4}], "calibration": {"example_inputs": False}}
    x = _x(2, 5, K)
    compiled, out, _ = _compile(model, x, qc)
    result = q3n_compile.release_quantized_weights(model)
    assert result["released"] == []
    assert sorted(result["kept"]) == ["linears.0.weight", "linears.1.weight", "linears.2.weight"]
    assert all("norm_linear folds it" in why for why in result["kept"].values())
    assert torch.equal(compiled(x), out)


# ---------------------------------------------------------------------------------------------
# GPU lane: compiled kernels, bf16, the design's config (fp8 activations where the GPU has them)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DESIGN = {"ffn_layers": {"weight_bits": 4, "activation_bits": 8},
          "attn_layers": {"weight_bits": 6, "activation_bits": 12},
          "norm_layers": {"dtype": "float16"}}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_gpu_design_config_bf16_composed(name):
    from q3n_compile.kernels.qlinear import fp8_supported

    model = build_model(name, "tiny", dtype=torch.bfloat16, device="cuda")
    quant.calibrate(model, [example_inputs(name, model, 4, 64, seed=s) for s in (1, 2)])
    outs = {}
    for fuse in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="q3n",
                                 options={"quant_config": DESIGN, "norm_fusion": fuse})
        # Prefill (74 rows: mmT's 64-row tile, dequant), a 16-row decode (mmT reading the
        # codes) and a one-row decode (gemv paths).
        for shape in ((2, 37), (16, 1), (1, 1)):
            inputs = example_inputs(name, model, *shape, seed=7)
            outs[fuse, shape] = (compiled(*inputs), model(*inputs))
        report = q3n_compile.reports()[-1]
    for shape in ((2, 37), (16, 1), (1, 1)):
        (alone, want), (fused, _) = outs[False, shape], outs[True, shape]
        assert _rel(fused, alone) < 0.2, (shape, _rel(fused, alone))
        assert _rel(fused, want) <= 1.25 * _rel(alone, want) + 0.02, shape
    _no_old_reasons(report)
    q = report["passes"]["quantize"]
    assert q["rewritten"] == 14 and q["detail"]["norm_fused"]["layers"] == 10
    ops = report["ops"]
    # Siblings with one smoothing vector (or none) share a GEMM.
    saved = q["detail"]["siblings"]["calls_saved"]
    assert ops["q3n.qlinear_codes.default"] + saved == 10 and ops["q3n.norm_act_quant.default"] >= 4
    assert saved >= 4  # q/k/v: 12-bit activations take no smoothing vector
    a8 = "fp8" if fp8_supported(torch.device("cuda")) else "int8"
    for entry in q["detail"]["layers"]:
        assert entry["activation_format"] == (a8 if entry["class"] == "ffn" else "int12")
        if "norm_fused" in entry:
            assert entry["norm_fused"]["activations"] == "q3n::norm_act_quant"
