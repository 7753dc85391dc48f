"""End to end through torch.compile: capture, executors, dynamic shapes, training graphs, reports."""

import json

import pytest
import torch
from torch._dynamo.utils import counters

import q3n_compile
from q3n_compile.models import build_model, example_inputs
from q3n_compile.report import PASS_STATUSES

PASS_NAMES = ["attention", "norm_linear", "quantize", "memory_plan"]


def _tiny(name="qwen3"):
    model = build_model(name, "tiny", dtype=torch.float32)
    return model, example_inputs(name, model, 2, 11, device="cpu")


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("executor", ["q3n", "inductor"])
@pytest.mark.parametrize("name", ["qwen3", "bert"])
def test_executors_match_eager(executor, name):
    model, inputs = _tiny(name)
    compiled = torch.compile(model, backend="q3n", options={"executor": executor})
    with torch.no_grad():
        want = model(*inputs)
        got = compiled(*inputs)
    assert got.shape == want.shape
    assert _rel_err(got, want) < 1e-5
    reports = q3n_compile.reports()
    assert len(reports) == 1
    assert reports[0]["executor"] == executor
    assert reports[0]["inference"] is True


def test_report_schema_is_json_and_complete():
    model, inputs = _tiny()
    with torch.no_grad():
        torch.compile(model, backend="q3n")(*inputs)
    (report,) = q3n_compile.reports()
    json.dumps(report)
    assert isinstance(report["graph_id"], int)
    # executor="auto" on a CPU graph: q3n's own, and the report says why.
    assert report["executor"] == "q3n" and report["executor_reason"].startswith("auto: off CUDA")
    assert list(report["passes"]) == PASS_NAMES
    for entry in report["passes"].values():
        assert entry["status"] in PASS_STATUSES
        assert isinstance(entry["matched"], int) and isinstance(entry["rewritten"], int)
        assert isinstance(entry["time_s"], float)
        assert "detail" in entry
    # Not built yet, so visible as such; quantize is off without a quant_config.
    assert report["passes"]["quantize"]["status"] == "disabled"
    assert report["ops"]["aten.mm.default"] > 0
    assert isinstance(report["fallbacks"], list) and isinstance(report["memory"], dict)


def test_reports_newest_last_and_reset():
    model, inputs = _tiny()
    with torch.no_grad():
        torch.compile(model, backend="q3n")(*inputs)
        torch.compile(model, backend="q3n", options={"attention": "off"})(*inputs)
    reports = q3n_compile.reports()
    assert [r["options"]["attention"] for r in reports] == ["tiled", "off"]
    assert reports[1]["graph_id"] > reports[0]["graph_id"]
    assert reports[1]["passes"]["attention"]["status"] == "disabled"
    reports[0]["passes"].clear()  # a copy: the registry is not affected
    assert q3n_compile.reports()[0]["passes"]
    q3n_compile.reset_reports()
    assert q3n_compile.reports() == []


@pytest.mark.parametrize("how", ["dynamic", "mark_dynamic"])
def test_dynamic_lengths_do_not_recompile(how):
    model = build_model("qwen3", "tiny")
    compiled = torch.compile(model, backend="q3n", dynamic=True if how == "dynamic" else None)
    counters.clear()
    with torch.no_grad():
        for seq_len in (7, 12, 29):
            ids = example_inputs("qwen3", model, 2, seq_len, device="cpu")[0]
            if how == "mark_dynamic":
                torch._dynamo.mark_dynamic(ids, 1)
            assert _rel_err(compiled(ids), model(ids)) < 1e-5
    assert counters["stats"]["unique_graphs"] == 1
    (report,) = q3n_compile.reports()
    assert report["dynamic_symbols"], "the sequence length should stay a symbol"


def test_graph_needing_gradients_skips_inference_passes():
    model, inputs = _tiny()
    model.train()
    compiled = torch.compile(model, backend="q3n")
    out = compiled(*inputs)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    (report,) = q3n_compile.reports()
    assert report["inference"] is False
    assert "needs gradients" in report["training_note"]
    assert report["passes"]["attention"]["status"] == "skipped"
    assert "gradients" in report["passes"]["attention"]["detail"]["reason"]


def test_training_gradients_match_eager():
    model, inputs = _tiny("gpt2")
    model.train()
    twin = build_model("gpt2", "tiny")
    twin.train()
    out = torch.compile(model, backend="q3n")(*inputs)
    ref = twin(*inputs)
    out.pow(2).mean().backward()
    ref.pow(2).mean().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert _rel_err(p.grad, q.grad) < 1e-4, name


def test_verify_passes_on_a_faithful_graph():
    model, inputs = _tiny()
    with torch.no_grad():
        torch.compile(model, backend="q3n", options={"verify": True})(*inputs)
    assert q3n_compile.reports()[0]["verify"] == {"status": "passed", "lossy": False}


def test_backward_compatible_call_without_grad_mode():
    """A model called without no_grad but with frozen weights still runs as inference."""
    model, inputs = _tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    got = torch.compile(model, backend="q3n")(*inputs)
    assert _rel_err(got, model(*inputs)) < 1e-5
    assert q3n_compile.reports()[0]["inference"] is True


def test_compiled_model_does_not_keep_the_first_inputs_alive():
    import gc
    import weakref

    model, inputs = _tiny("gpt2")
    compiled = torch.compile(model, backend="q3n")
    ids = inputs[0].clone()
    alive = weakref.ref(ids)
    with torch.no_grad():
        compiled(ids)
    del ids
    gc.collect()
    assert alive() is None


def test_cuda_graph_outputs_are_copied_unless_they_are_an_input():
    """Inductor's CUDA graphs return outputs in the graph's pool, which the next replay
    overwrites: q3n copies them out, except an output that is an input's storage (a written
    cache), which must stay the caller's tensor."""
    from q3n_compile.runtime import _copied, _outputs_to_copy, _storages

    cache, x = torch.zeros(4), torch.ones(3)
    inputs = [cache, x, 2]
    outputs = [cache[1:], x * 2, 5]
    decision = _outputs_to_copy(outputs, _storages(inputs))
    assert decision == [False, True, False]
    got = _copied(outputs, decision)
    assert got[0] is outputs[0] and got[2] == 5
    assert torch.equal(got[1], outputs[1]) and got[1].data_ptr() != outputs[1].data_ptr()


# An op whose autograd kernel (the layer custom_op puts in Python) counts its calls.
_AUTOGRAD_LAYER_CALLS: list[int] = []
_PROBE_LIB = torch.library.Library("q3n_test", "DEF")
_PROBE_LIB.define("autograd_probe(Tensor x) -> Tensor")


def _probe_autograd(keyset, x):
    _AUTOGRAD_LAYER_CALLS.append(1)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.q3n_test.autograd_probe.default.redispatch(
            keyset & torch._C._after_autograd_keyset, x)


_PROBE_LIB.impl("autograd_probe", lambda x: x * 2, "CPU")
_PROBE_LIB.impl("autograd_probe", _probe_autograd, "Autograd", with_keyset=True)
torch.library.register_fake("q3n_test::autograd_probe", lambda x: torch.empty_like(x), lib=_PROBE_LIB)


def _with_probe(x):
    return torch.ops.q3n_test.autograd_probe(x.sin()) + 1


def _attend(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) * 2


@pytest.mark.parametrize("memory_plan", [False, True])
def test_inference_graphs_call_kernel_ops_directly(memory_plan, monkeypatch):
    # q3n's executor calls its kernel ops' Python implementations in an inference graph (no
    # round trip through the dispatcher, whose registered implementation is not this wrapper);
    # the report still counts the op, and the result is the op's.
    from q3n_compile.kernels import attention as A, contract

    op = torch.ops.q3n.attention.default
    assert contract.python_impl(op) is A._attention_impl
    impl, calls = contract.python_impl(op), []

    def counted(*args, **kwargs):
        calls.append(1)
        return impl(*args, **kwargs)

    monkeypatch.setitem(contract._IMPLS, op, counted)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 7, 16, generator=gen) for _ in range(3))
    compiled = torch.compile(_attend, backend="q3n", options={"memory_plan": memory_plan})
    with torch.no_grad():
        compiled(q, k, v)
        calls.clear()
        got = compiled(q, k, v)
    assert calls == [1]
    assert q3n_compile.reports()[-1]["ops"].get("q3n.attention.default") == 1
    torch.testing.assert_close(got, _attend(q, k, v), rtol=1e-4, atol=1e-5)
    op(q, k, v, None, None, True)  # eager: through the dispatcher, not the wrapper
    assert calls == [1]


def test_direct_kernel_calls_copies_the_graph():
    from q3n_compile.kernels import attention as A
    from q3n_compile.runtime import direct_kernel_calls

    gm = torch.fx.symbolic_trace(lambda q, k, v: torch.ops.q3n.attention.default(
        q, k, v, None, None, True) + 1)
    direct = direct_kernel_calls(gm)
    targets = [n.target for n in direct.graph.nodes if n.op == "call_function"]
    assert A._attention_impl in targets and torch.ops.q3n.attention.default not in targets
    assert torch.ops.q3n.attention.default in [n.target for n in gm.graph.nodes]  # unchanged
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=gen) for _ in range(3))
    assert torch.equal(direct(q, k, v), gm(q, k, v))
    plain = torch.fx.symbolic_trace(lambda x: x.sin())
    assert direct_kernel_calls(plain) is plain  # nothing to replace: no copy


@pytest.mark.parametrize("executor", ["q3n", "inductor"])
def test_inference_graphs_skip_the_autograd_layer(executor):
    compiled = torch.compile(_with_probe, backend="q3n", options={"executor": executor})
    x = torch.randn(5)
    with torch.no_grad():
        compiled(x)  # compiles (tracing calls the op through every layer)
        _AUTOGRAD_LAYER_CALLS.clear()
        got = compiled(x)
        torch.testing.assert_close(got, x.sin() * 2 + 1)
        # The compiled inference graph calls the op below its autograd layer; eager does not.
        assert _AUTOGRAD_LAYER_CALLS == []
        _with_probe(x)
        assert _AUTOGRAD_LAYER_CALLS == [1]
    assert q3n_compile.reports()[0]["inference"] is True
    # A graph that needs gradients is compiled and run as before.
    train = torch.compile(lambda t: (t.sin() * 2).sum(), backend="q3n", options={"executor": executor})
    xg = torch.randn(5, requires_grad=True)
    train(xg).backward()
    torch.testing.assert_close(xg.grad, 2 * xg.detach().cos())
    assert q3n_compile.reports()[-1]["inference"] is False


@pytest.mark.parametrize("specialize_float", [False, True])
def test_report_names_float_attributes_passed_as_tensors(specialize_float):
    # Under dynamic=True Dynamo passes a module's float attributes (RMSNorm's eps, attention's
    # scaling) as 0-d tensors made every call; the report names them and says how to bake them in.
    model = build_model("qwen3", "tiny")
    ids = example_inputs("qwen3", model, 1, 5, device="cpu")[0]
    with torch._dynamo.config.patch(specialize_float=specialize_float), torch.no_grad():
        out = torch.compile(model, backend="q3n", dynamic=True)(ids)
    assert _rel_err(out, model(ids)) < 1e-5
    (report,) = q3n_compile.reports()
    floats = report["runtime"].get("float_inputs")
    if specialize_float:
        assert floats is None
    else:
        assert any(n.endswith("variance_epsilon") for n in floats["names"]), floats
        assert any(n.endswith("self_attn_scaling") for n in floats["names"]), floats
        assert "specialize_float = True" in floats["note"]


class _NormLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(128)
        self.lin = torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.lin(self.norm(x))


def _two_instances(seed, options):
    """(a, b, x, compiled a, compiled b): two _NormLinear with random weights, one input."""
    gen = torch.Generator().manual_seed(seed)
    a, b = _NormLinear(), _NormLinear()
    with torch.no_grad():
        for p in list(a.parameters()) + list(b.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(2, 5, 128, generator=gen)
    compiled = [torch.compile(m, backend="q3n", dynamic=False, options=options) for m in (a, b)]
    return a, b, x, *compiled


_FOLDING_OPTIONS = {
    "norm_fusion": {"norm_fusion": True, "attention": "off"},
    "quant_config": {"attention": "off", "quant_config": {"rules": [{"match": "*",
                                                                       "weight_bits": 8}]}},
}


@pytest.mark.parametrize("executor", ["q3n", "inductor"])
@pytest.mark.parametrize("folding", list(_FOLDING_OPTIONS))
def test_a_graph_with_folded_weights_refuses_another_instances_weights(folding, executor):
    # Dynamo passes parameters as graph inputs and reuses one compiled graph for a second
    # instance of the class; a graph whose passes folded the first instance's weights must not
    # silently compute with them for the second.
    a, b, x, ca, cb = _two_instances(0, dict(_FOLDING_OPTIONS[folding], executor=executor))
    with torch.no_grad():
        got, want = ca(x), a(x)
        assert _rel_err(got, want) < (1e-5 if folding == "norm_fusion" else 2e-2)
        assert q3n_compile.reports()[-1]["runtime"]["frozen_weights"]
        with pytest.raises(q3n_compile.FrozenWeightChanged, match="is not the weight this graph"):
            cb(x)


def test_freezing_compiles_a_graph_for_each_instance():
    # The fix the error names: with Inductor's freezing flag (inference), Dynamo guards on the
    # parameters, so each instance gets its own graph and its own folds.
    with torch._inductor.config.patch(freezing=True):
        _two_instances_with_freezing()


def _two_instances_with_freezing():
    a, b, x, ca, cb = _two_instances(1, _FOLDING_OPTIONS["norm_fusion"])
    with torch.no_grad():
        assert _rel_err(ca(x), a(x)) < 1e-5 and _rel_err(cb(x), b(x)) < 1e-5
    assert len(q3n_compile.reports()) == 2
