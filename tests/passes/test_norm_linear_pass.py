"""The norm_linear pass end to end: what it rewrites, what it declines, and that outputs match eager.

Every compile here goes through torch.compile(backend="q3n"); the fused op runs in Triton's
interpreter on the CPU lane. Toy modules switch the attention pass off and use strict=True, so a
failure of this pass raises instead of being rolled back; whole models run the full pipeline.
"""

import copy
import importlib
import io
import pkgutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
# Qwen3-Next's (and Gemma's) zero-centred RMSNorm: the weight multiplies as (1 + w), in float32.
from transformers.models.qwen3_next.modeling_qwen3_next import (
    Qwen3NextRMSNorm as ZeroCentredRMSNorm,
)

import q3n_compile
import q3n_compile.kernels
from q3n_compile.models import RMSNorm, build_model, example_inputs
from q3n_compile.runtime import FrozenWeightChanged

from .norm_models import randomize

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")
# Every kernel module is imported now, at collection: Triton fixes interpreted-or-compiled when
# @triton.jit runs, and a first import inside a test that switched the interpreter off (the
# reference_kernels fixture) would leave the tests after it with kernels that need a GPU.
for _module in pkgutil.iter_modules(q3n_compile.kernels.__path__):
    importlib.import_module(f"q3n_compile.kernels.{_module.name}")

OP = "q3n.norm_linear.default"
K = 40


# ---------------------------------------------------------------------------------------------
# Norm forms as models write them


class T5LayerNorm(nn.Module):
    """T5: statistics of the float32 copy, applied to the tensor as given."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


NORMS = {
    "layernorm": lambda k: nn.LayerNorm(k),
    "layernorm_no_affine": lambda k: nn.LayerNorm(k, elementwise_affine=False),
    "layernorm_no_bias": lambda k: nn.LayerNorm(k, bias=False),
    "rmsnorm_hf": lambda k: RMSNorm(k, eps=1e-6),
    "rmsnorm_torch": lambda k: nn.RMSNorm(k, eps=1e-5),
    "rmsnorm_zero_centred": lambda k: ZeroCentredRMSNorm(k),
    "rmsnorm_t5": lambda k: T5LayerNorm(k),
}
# What is left of each norm in the graph when something else still reads its output.
NORM_OPS = {"layernorm": "aten.native_layer_norm.default", "rmsnorm": "aten.rsqrt.default"}


def _kind(norm):
    return "layernorm" if norm.startswith("layernorm") else "rmsnorm"


def _randomize(model, seed=0):
    return randomize(model, spread=0.1, seed=seed)


class NormThenLinears(nn.Module):
    def __init__(self, norm, widths=(24, 8, 8), bias=(True, False, True), reader=False):
        super().__init__()
        self.norm = NORMS[norm](K)
        self.linears = nn.ModuleList(nn.Linear(K, n, bias=b) for n, b in zip(widths, bias))
        self.reader = reader

    def forward(self, x):
        h = self.norm(x)
        outs = [lin(h) for lin in self.linears]
        if self.reader:
            outs.append(x + h)  # BERT's post-norm residual reads the normalised tensor too
        return tuple(outs)


class SwiGLU(nn.Module):
    def __init__(self, norm="rmsnorm_hf", inter=24, written_out=False):
        super().__init__()
        self.norm = NORMS[norm](K)
        self.gate_proj = nn.Linear(K, inter, bias=False)
        self.up_proj = nn.Linear(K, inter, bias=False)
        self.down_proj = nn.Linear(inter, K, bias=False)
        self.written_out = written_out

    def forward(self, x):
        h = self.norm(x)
        g = self.gate_proj(h)
        act = g * torch.sigmoid(g) if self.written_out else F.silu(g)
        return x + self.down_proj(act * self.up_proj(h))


class ResidualLinear(nn.Module):
    """x + W·norm(x): the add becomes the kernel's residual epilogue."""

    def __init__(self, norm="layernorm"):
        super().__init__()
        self.norm = NORMS[norm](K)
        self.proj = nn.Linear(K, K)

    def forward(self, x):
        return x + self.proj(self.norm(x))


def _x(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _compile_run(model, *inputs, dynamic=False, strict=True, **options):
    options = {"norm_fusion": True, "attention": "off", "strict": strict, **options}
    compiled = torch.compile(model, backend="q3n", dynamic=dynamic, options=options)
    with torch.no_grad():
        want = model(*inputs)
        got = compiled(*inputs)
    report = q3n_compile.reports()[-1]
    return want, got, report, compiled


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _assert_close(got, want, tol=2e-5):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert _rel_err(g, w) < tol, _rel_err(g, w)


def _pass(report):
    return report["passes"]["norm_linear"]


# ---------------------------------------------------------------------------------------------
# What is rewritten


@pytest.mark.parametrize("norm", list(NORMS))
def test_each_norm_form_with_three_linears(norm):
    model = _randomize(NormThenLinears(norm))
    want, got, report, _ = _compile_run(model, _x(2, 5, K))
    _assert_close(got, want)
    p = _pass(report)
    assert (p["status"], p["matched"], p["rewritten"], p["declined"]) == ("applied", 1, 1, {})
    ops = report["ops"]
    assert ops.get(OP) == 1
    assert "aten.mm.default" not in ops and "aten.addmm.default" not in ops
    assert NORM_OPS[_kind(norm)] not in ops  # the norm is gone: nothing else read it
    (fusion,) = p["detail"]["fusions"]
    assert fusion["kind"] == _kind(norm) and fusion["norm"] == "norm"
    (call,) = fusion["calls"]
    assert call["N"] == [24, 8, 8] and call["epilogue"] == "none" and not call["residual"]
    assert call["linears"] == ["linears.0", "linears.1", "linears.2"]
    assert fusion["norm_kept_for"] == []


@pytest.mark.parametrize("n_linears", [1, 2])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm_hf"])
def test_one_and_two_linears(norm, n_linears):
    widths, bias = (33, 17)[:n_linears], (True, False)[:n_linears]
    model = _randomize(NormThenLinears(norm, widths, bias))
    want, got, report, _ = _compile_run(model, _x(3, 7, K))
    _assert_close(got, want)
    assert report["ops"].get(OP) == 1 and "aten.mm.default" not in report["ops"]
    (fusion,) = _pass(report)["detail"]["fusions"]
    assert fusion["calls"][0]["N"] == list(widths)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm_hf", "rmsnorm_zero_centred"])
def test_remaining_reader_keeps_the_norm_once(norm):
    model = _randomize(NormThenLinears(norm, reader=True))
    want, got, report, _ = _compile_run(model, _x(2, 5, K))
    _assert_close(got, want)
    ops = report["ops"]
    assert ops.get(OP) == 1 and "aten.mm.default" not in ops and "aten.addmm.default" not in ops
    assert ops.get(NORM_OPS[_kind(norm)]) == 1  # still produced, once, for the other reader
    (fusion,) = _pass(report)["detail"]["fusions"]
    assert fusion["norm_kept_for"] == ["add.Tensor"]


@pytest.mark.parametrize("written_out", [False, True], ids=["silu", "x_sigmoid_x"])
@pytest.mark.parametrize("norm", ["rmsnorm_hf", "layernorm"])
def test_gate_up_uses_silu_gate_epilogue(norm, written_out):
    model = _randomize(SwiGLU(norm, written_out=written_out))
    want, got, report, _ = _compile_run(model, _x(2, 5, K))
    _assert_close(got, want)
    ops = report["ops"]
    assert ops.get(OP) == 1 and ops.get("aten.mm.default") == 1  # down_proj only
    assert "aten.silu.default" not in ops and "aten.sigmoid.default" not in ops
    (fusion,) = _pass(report)["detail"]["fusions"]
    (call,) = fusion["calls"]
    assert call["epilogue"] == "silu_gate" and call["linears"] == ["gate_proj", "up_proj"]


def test_residual_add_becomes_the_epilogue():
    model = _randomize(ResidualLinear())
    want, got, report, _ = _compile_run(model, _x(2, 5, K))
    _assert_close(got, want)
    ops = report["ops"]
    assert ops.get(OP) == 1 and "aten.add.Tensor" not in ops and "aten.addmm.default" not in ops
    (fusion,) = _pass(report)["detail"]["fusions"]
    assert fusion["calls"][0]["residual"] is True


def test_two_dim_input_and_siblings_with_matching_widths():
    model = _randomize(NormThenLinears("rmsnorm_torch", widths=(16, 16), bias=(False, False)))
    want, got, report, _ = _compile_run(model, _x(9, K))
    _assert_close(got, want)
    assert report["ops"].get(OP) == 1 and "aten.view.default" not in report["ops"]


def test_dynamic_shapes_eps_from_static_input_no_recompile():
    # Under dynamic=True the norm's eps reaches the graph as a 0-d tensor input whose value is a
    # compile-time constant (ctx.static_values); new lengths must not recompile.
    model = build_model("qwen3", "tiny")
    compiled = torch.compile(model, backend="q3n", dynamic=True, options={"norm_fusion": True, "attention": "off"})
    with torch.no_grad():
        for seq in (5, 9):
            (ids,) = example_inputs("qwen3", model, 1, seq)
            _assert_close(compiled(ids), model(ids))
    (report,) = q3n_compile.reports()
    assert report["dynamic_symbols"]
    p = _pass(report)
    assert (p["status"], p["matched"], p["rewritten"]) == ("applied", 5, 5)
    assert report["ops"].get(OP) == 5
    for fusion in p["detail"]["fusions"]:
        assert fusion["eps"] == pytest.approx(1e-6, rel=1e-6)
    assert any(i.startswith("torch.float64 []") for i in report["inputs"])  # eps as an input


def test_zero_centred_norm_dynamic_eps_input():
    model = _randomize(SwiGLU("rmsnorm_zero_centred"))
    want, got, report, compiled = _compile_run(model, _x(2, 5, K), dynamic=True)
    _assert_close(got, want)
    with torch.no_grad():
        _assert_close(compiled(_x(3, 11, K, seed=2)), model(_x(3, 11, K, seed=2)))
    assert len(q3n_compile.reports()) == 1
    (fusion,) = _pass(report)["detail"]["fusions"]
    assert fusion["eps"] == pytest.approx(1e-6, rel=1e-6) and fusion["calls"][0]["epilogue"] == "silu_gate"


# ---------------------------------------------------------------------------------------------
# What is declined, and why


class _WeightIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(K, 24)

    def forward(self, x, w):
        return self.lin(F.layer_norm(x, (K,), w))


class _LinearWeightIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(K)

    def forward(self, x, w):
        return F.linear(self.norm(x), w)


class _NotLastDim(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(K, 24)

    def forward(self, x):
        return self.lin(x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6))


class _EpsIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(K, 24)

    def forward(self, x, eps):
        return self.lin(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


DECLINES = {
    "norm weight is not a constant": (_WeightIn, lambda: (_x(2, 5, K), _x(K, seed=3))),
    "linear weight is not a constant": (_LinearWeightIn, lambda: (_x(2, 5, K), _x(24, K, seed=3))),
    "normalised dim is not the last": (_NotLastDim, lambda: (_x(2, 5, K),)),
    "eps is not a constant": (_EpsIn, lambda: (_x(2, 5, K), torch.tensor(1e-6))),
}


@pytest.mark.parametrize("reason", list(DECLINES))
def test_declines_with_reason(reason):
    cls, inputs = DECLINES[reason]
    model = _randomize(cls())
    want, got, report, _ = _compile_run(model, *inputs())
    _assert_close(got, want)
    p = _pass(report)
    assert (p["status"], p["matched"], p["rewritten"], p["declined"]) == ("applied", 1, 0, {reason: 1})
    assert OP not in report["ops"]


def test_declines_float64():
    model = _randomize(NormThenLinears("layernorm")).double()
    want, got, report, _ = _compile_run(model, _x(2, 5, K, dtype=torch.float64))
    _assert_close(got, want, tol=1e-12)
    p = _pass(report)
    assert p["rewritten"] == 0 and list(p["declined"]) == [
        "dtype float64 not supported (float16, bfloat16, float32)"]
    assert OP not in report["ops"]


def test_some_linears_fused_others_left_with_reason():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = RMSNorm(K)
            self.lin = nn.Linear(K, 24)

        def forward(self, x, w):
            h = self.norm(x)
            return self.lin(h), F.linear(h, w)

    model = _randomize(Mixed())
    want, got, report, _ = _compile_run(model, _x(2, 5, K), _x(8, K, seed=4))
    _assert_close(got, want)
    p = _pass(report)
    assert (p["matched"], p["rewritten"]) == (1, 1)
    assert p["detail"]["linears_left_unfused"] == {"linear weight is not a constant": 1}
    assert report["ops"].get(OP) == 1 and report["ops"].get("aten.mm.default") == 1
    assert report["ops"].get("aten.rsqrt.default") == 1  # kept for the unfused linear
    assert p["detail"]["fusions"][0]["norm_kept_for"] == ["mm.default"]


def test_norm_fusion_off():
    model = _randomize(NormThenLinears("layernorm"))
    want, got, report, _ = _compile_run(model, _x(2, 5, K), norm_fusion=False)
    _assert_close(got, want)
    assert _pass(report)["status"] == "disabled" and OP not in report["ops"]


# ---------------------------------------------------------------------------------------------
# Options, guards, executors


def test_quant_config_norm_dtype_is_recorded():
    model = _randomize(NormThenLinears("rmsnorm_hf"))
    qc = {"norm_layers": {"dtype": "float16"}}
    want, got, report, _ = _compile_run(model, _x(2, 5, K), strict=False, quant_config=qc)
    _assert_close(got, want)
    info = _pass(report)["detail"]["norm_dtype"]
    assert info["requested"] == "float16" and info["applied"] == "float32" and "float32" in info["note"]
    _, _, report, _ = _compile_run(model, _x(2, 5, K))
    assert _pass(report)["detail"]["norm_dtype"] == {"requested": None, "applied": "float32"}


def test_linears_quant_config_quantizes_are_folded_for_quantize():
    # The passes compose (tests/passes/test_norm_quant_compose.py): gate/up (ffn, quantized) get
    # the norm folded into their weights and are left to quantize, behind q3n::normalize, which
    # quantize turns into q3n::norm_act_quant (8-bit activations); q/k/v (attention not
    # configured) and lm_head fuse as q3n::norm_linear. Nothing is declined.
    model = build_model("llama", "tiny")
    (ids,) = example_inputs("llama", model, 1, 8)
    qc = {"ffn_layers": {"weight_bits": 4, "activation_bits": 8}}
    compiled = torch.compile(model, backend="q3n", options={"norm_fusion": True, "attention": "off", "quant_config": qc})
    with torch.no_grad():
        compiled(ids)
    report = q3n_compile.reports()[-1]
    p = _pass(report)
    assert (p["matched"], p["rewritten"], p["declined"]) == (5, 5, {})
    assert p["detail"]["linears_left_unfused"] == {}
    assert report["ops"].get(OP) == 3
    assert [f["norm"] for f in p["detail"]["fusions"]] == [
        "layers.0.input_layernorm", "layers.0.post_attention_layernorm",
        "layers.1.input_layernorm", "layers.1.post_attention_layernorm", "norm"]
    quantized = [c["linears"] for f in p["detail"]["fusions"] for c in f["calls"] if c.get("quantized")]
    assert quantized == [[f"layers.{i}.mlp.gate_proj", f"layers.{i}.mlp.up_proj"] for i in (0, 1)]
    assert report["ops"]["q3n.norm_act_quant.default"] == 2  # 8 rows: no calibration, no smoothing
    # gate/up of each layer: one GEMM on the shared codes (quant_config's merge_siblings).
    assert report["ops"]["q3n.qlinear_codes.default"] == 2


def test_folded_weights_are_frozen():
    model = _randomize(NormThenLinears("layernorm"))
    _, _, report, compiled = _compile_run(model, _x(2, 5, K))
    frozen = report["runtime"]["frozen_weights"]
    assert len(frozen) == 2 + 3 + 2  # γ, β, three weights, two biases
    assert _pass(report)["detail"]["folded_bytes"] == (40 * 40 + 40 + 40) * 4
    with torch.no_grad():
        model.linears[1].weight.mul_(2.0)
        with pytest.raises(FrozenWeightChanged):
            compiled(_x(2, 5, K))


def test_graphs_of_one_model_share_their_folds():
    # A second graph of the model (another shape, compiled without dynamic shapes) takes the
    # first one's W', b' and rowsum: the same tensors, no bytes added.
    model = _randomize(NormThenLinears("layernorm"))
    _, _, first, compiled = _compile_run(model, _x(2, 5, K))
    with torch.no_grad():
        want, got = model(_x(3, 7, K, seed=2)), compiled(_x(3, 7, K, seed=2))
    _assert_close(got, want)
    second = q3n_compile.reports()[-1]
    assert second is not first and _pass(second)["rewritten"] == 1
    size = (40 * 40 + 40 + 40) * 4
    assert (_pass(first)["detail"]["folded_bytes"], _pass(first)["detail"]["fold_shared_bytes"]) \
        == (size, 0)
    assert (_pass(second)["detail"]["folded_bytes"], _pass(second)["detail"]["fold_shared_bytes"]) \
        == (0, size)
    # Changed weights (then a recompile, as FrozenWeightChanged asks) are folded anew.
    with torch.no_grad():
        model.linears[1].weight.mul_(2.0)
    torch._dynamo.reset()
    want, got, third, _ = _compile_run(model, _x(3, 7, K, seed=2))
    _assert_close(got, want)
    assert _pass(third)["detail"]["folded_bytes"] == size


class TwoNormsOneLinear(nn.Module):
    """One linear's weight read after two norms: two folds from the same source matrix."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(K), nn.LayerNorm(K)
        self.lin = nn.Linear(K, 24)

    def forward(self, x):
        return self.lin(self.norm1(x)) + self.lin(self.norm2(x))


def test_a_model_with_cached_folds_still_pickles_and_copies():
    # The fold cache on the parameters (weak references) pickles and copies as nothing.
    model = _randomize(NormThenLinears("layernorm"))
    _compile_run(model, _x(2, 5, K))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for copied in (loaded, copy.deepcopy(model)):
        with torch.no_grad():
            _assert_close(copied(_x(2, 5, K)), model(_x(2, 5, K)), tol=1e-7)
        torch._dynamo.reset()  # a second instance of the class: else the first graph is reused
        want, got, report, _ = _compile_run(copied, _x(3, 5, K))
        _assert_close(got, want)


def test_folds_of_one_weight_with_different_norms_are_not_shared():
    model = _randomize(TwoNormsOneLinear())
    want, got, report, _ = _compile_run(model, _x(2, 5, K))
    _assert_close(got, want)
    detail = _pass(report)["detail"]
    assert _pass(report)["rewritten"] == 2
    assert (detail["folded_bytes"], detail["fold_shared_bytes"]) == (2 * (24 * 40 + 24 + 24) * 4, 0)


def test_inductor_executor_runs_the_rewritten_graph():
    # The folded weights are get_attr constants: Inductor must take them (no fallback to q3n's
    # executor) and the q3n op stays opaque inside the Inductor-compiled graph.
    model = _randomize(SwiGLU("layernorm"))
    want, got, report, _ = _compile_run(model, _x(2, 5, K), executor="inductor")
    _assert_close(got, want)
    assert _pass(report)["rewritten"] == 1
    assert report["executor"] == "inductor" and report["fallbacks"] == []


def test_bf16_no_farther_from_float64_than_eager():
    model = build_model("llama", "tiny", dtype=torch.bfloat16)
    exact_model = copy.deepcopy(model).double()  # the same (rounded) weights, in float64
    (ids,) = example_inputs("llama", model, 2, 7)
    want, got, report, _ = _compile_run(model, ids)
    with torch.no_grad():
        exact = exact_model(ids)
    err, eager_err = _rel_err(got, exact), _rel_err(want, exact)
    assert err <= 1.5 * eager_err + 2e-3, (err, eager_err)
    assert report["ops"].get(OP) == 5


# ---------------------------------------------------------------------------------------------
# Whole models: q3n's built-in ones and transformers' (random init, no download)

BUILTIN_EXPECTED = {  # fusions, silu-gate epilogues, norms kept for other readers, without linear
    "qwen3": (5, 2, 0, ["layers.0.self_attn.q_norm", "layers.0.self_attn.k_norm",
                        "layers.1.self_attn.q_norm", "layers.1.self_attn.k_norm"]),
    "llama": (5, 2, 0, []),
    "gpt2": (5, 0, 0, []),
    "bert": (4, 0, 4, ["layers.1.output.LayerNorm"]),
}


def _check_counts(report, fusions, silu, kept, without):
    p = _pass(report)
    assert (p["status"], p["matched"], p["rewritten"], p["declined"]) == ("applied", fusions, fusions, {})
    assert report["ops"].get(OP) == fusions  # one q3n.norm_linear per norm that feeds linears
    detail = p["detail"]
    assert sum(c["epilogue"] == "silu_gate" for f in detail["fusions"] for c in f["calls"]) == silu
    assert sum(bool(f["norm_kept_for"]) for f in detail["fusions"]) == kept
    assert detail["norms_without_linear"] == without


@pytest.mark.parametrize("name", list(BUILTIN_EXPECTED))
def test_builtin_models_match_eager(name):
    model = build_model(name, "tiny")
    inputs = example_inputs(name, model, 2, 6)
    compiled = torch.compile(model, backend="q3n", options={"norm_fusion": True})
    with torch.no_grad():
        _assert_close(compiled(*inputs), model(*inputs))
    (report,) = q3n_compile.reports()
    _check_counts(report, *BUILTIN_EXPECTED[name])


@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_one_token_at_batch_one(name, reference_kernels):
    # Decode, or a 1-token prefill, at batch 1: the op sees one row, where q/k/v column blocks of
    # one buffer are contiguous views of it. The reference path (CPU without the interpreter, as
    # `q3n bench` runs) returned such views and torch.compile failed with "may not alias any
    # inputs to this custom operator or other returns"; every path now gives each output its own
    # storage (the Triton paths: tests/kernels/test_norm_linear.py, one-row cases).
    model = build_model(name, "tiny")
    ids = torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(7))
    compiled = torch.compile(model, backend="q3n", options={"norm_fusion": True})
    with torch.no_grad():
        _assert_close(compiled(ids), model(ids))
    (report,) = q3n_compile.reports()
    assert report["ops"].get(OP) == BUILTIN_EXPECTED[name][0]
    assert report["fallbacks"] == []


def _hf(name):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  max_position_embeddings=64, attn_implementation="eager")
    if name == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=1, num_key_value_heads=2, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif name == "qwen3":
        cfg = transformers.Qwen3Config(num_hidden_layers=1, num_key_value_heads=2, head_dim=16, **common)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.BertConfig(num_hidden_layers=1, **common)
        model = transformers.BertModel(cfg)
    return _randomize(model, seed=5)


HF_EXPECTED = {
    # input_layernorm -> q/k/v, post_attention_layernorm -> gate/up (SiLU-gate), norm -> lm_head
    "llama": (3, 1, 0, []),
    "qwen3": (3, 1, 0, ["model.layers.0.self_attn.q_norm", "model.layers.0.self_attn.k_norm"]),
    # embeddings -> q/k/v, attention output -> intermediate (both kept for the residual); the last
    # LayerNorm feeds the pooler through a row select, not a linear on its rows.
    "bert": (2, 0, 2, ["encoder.layer.0.output.LayerNorm"]),
}


@pytest.mark.parametrize("name", list(HF_EXPECTED))
def test_transformers_models_match_eager(name):
    model = _hf(name)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(6))
    compiled = torch.compile(model, backend="q3n", options={"norm_fusion": True})
    with torch.no_grad():
        want, got = model(ids), compiled(ids)
    keys = ["logits"] if name != "bert" else ["last_hidden_state", "pooler_output"]
    for key in keys:
        _assert_close(got[key], want[key])
    (report,) = q3n_compile.reports()
    _check_counts(report, *HF_EXPECTED[name])


# ---------------------------------------------------------------------------------------------
# GPU lane

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2", "bert"])
def test_gpu_builtin_models_bf16(name):
    model = build_model(name, "tiny", dtype=torch.bfloat16, device="cuda")
    exact_model = copy.deepcopy(model).double()
    inputs = example_inputs(name, model, 2, 37)
    compiled = torch.compile(model, backend="q3n", options={"norm_fusion": True, "attention": "off"})
    with torch.no_grad():
        want, got, exact = model(*inputs), compiled(*inputs), exact_model(*inputs)
    err, eager_err = _rel_err(got, exact), _rel_err(want, exact)
    assert err <= 1.5 * eager_err + 2e-3, (err, eager_err)
    (report,) = q3n_compile.reports()
    assert report["ops"].get(OP) == BUILTIN_EXPECTED[name][0]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("seq", [1, 600])
def test_gpu_bench_size_llama_bf16(seq):
    # Llama-3-8B widths, 4 layers: decode (M = 1: "fused") and prefill (M = 600: "cublas").
    model = build_model("llama", "bench", dtype=torch.bfloat16, device="cuda")
    (ids,) = example_inputs("llama", model, 1, seq)
    compiled = torch.compile(model, backend="q3n", options={"norm_fusion": True, "attention": "off"})
    with torch.no_grad():
        want, got = model(ids), compiled(ids)
        del model
        exact = build_model("llama", "bench", dtype=torch.bfloat16, device="cuda").double()(ids)
    err, eager_err = _rel_err(got, exact), _rel_err(want, exact)
    assert err <= 1.5 * eager_err + 2e-3, (err, eager_err)
    (report,) = q3n_compile.reports()
    assert _pass(report)["rewritten"] == 9
