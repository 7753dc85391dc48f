"""The observer around passes: rollback, strict mode, provenance, lint, frozen weights, verify."""

import operator

import pytest
import torch

import q3n_compile
from q3n_compile import pipeline
from q3n_compile.passes.base import PassStats
from q3n_compile.pipeline import PassSpec, Q3NPassError
from q3n_compile.runtime import FrozenWeightChanged


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.proj(self.norm(x))) + x


def _with_passes(monkeypatch, *specs):
    monkeypatch.setattr(pipeline, "PASSES", tuple(specs))


def _always(_config):
    return None


def _first(gm, target):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


def _run(model, x, **options):
    with torch.no_grad():
        return torch.compile(model, backend="q3n", options=options)(x)


def test_failing_pass_is_rolled_back_and_compilation_goes_on(monkeypatch, caplog):
    def breaks_then_raises(gm, ctx):
        relu = _first(gm, torch.ops.aten.relu.default)
        relu.target = torch.ops.aten.neg.default  # a half-done rewrite...
        raise RuntimeError("cannot handle this graph")  # ...then the pass gives up

    _with_passes(monkeypatch, PassSpec("breaker", breaks_then_raises, _always))
    model, x = Block().eval(), torch.randn(3, 8)
    got = _run(model, x)
    torch.testing.assert_close(got, model(x))
    (report,) = q3n_compile.reports()
    entry = report["passes"]["breaker"]
    assert entry["status"] == "failed"
    assert "cannot handle this graph" in entry["detail"]["error"]
    assert "Traceback" in entry["detail"]["traceback"]
    assert report["ops"].get("aten.neg.default") is None
    assert "rolled back" in caplog.text


def test_strict_raises(monkeypatch):
    def raises(gm, ctx):
        raise RuntimeError("boom")

    _with_passes(monkeypatch, PassSpec("breaker", raises, _always))
    with pytest.raises(Exception, match="pass 'breaker' failed"):
        _run(Block().eval(), torch.randn(3, 8), strict=True)


def test_strict_error_type(monkeypatch):
    def raises(gm, ctx):
        raise RuntimeError("boom")

    _with_passes(monkeypatch, PassSpec("breaker", raises, _always))
    model = Block().eval()
    with pytest.raises(Exception) as info:
        _run(model, torch.randn(3, 8), strict=True)
    # Dynamo wraps a backend's error and keeps the original as `inner_exception`.
    assert isinstance(getattr(info.value, "inner_exception", info.value), Q3NPassError)


def test_created_nodes_carry_provenance(monkeypatch):
    def relu_to_clamp(gm, ctx):
        relu = _first(gm, torch.ops.aten.relu.default)
        with gm.graph.inserting_after(relu):
            clamp = gm.graph.call_function(torch.ops.aten.clamp_min.default, (relu.args[0], 0.0))
        clamp.meta["val"] = relu.meta["val"]
        relu.replace_all_uses_with(clamp)
        gm.graph.erase_node(relu)
        return PassStats(matched=1, rewritten=1)

    _with_passes(monkeypatch, PassSpec("clamp", relu_to_clamp, _always))
    model, x = Block().eval(), torch.randn(3, 8)
    torch.testing.assert_close(_run(model, x, dump_dir=None), model(x))
    (report,) = q3n_compile.reports()
    assert report["passes"]["clamp"] | {"time_s": 0} == {
        "status": "applied", "matched": 1, "rewritten": 1, "time_s": 0, "declined": {}, "detail": {}}
    assert report["ops"]["aten.clamp_min.default"] == 1 and "aten.relu.default" not in report["ops"]


def test_lint_rejects_nodes_without_fake_values(monkeypatch):
    def forgets_meta(gm, ctx):
        relu = _first(gm, torch.ops.aten.relu.default)
        with gm.graph.inserting_after(relu):
            clamp = gm.graph.call_function(torch.ops.aten.clamp_min.default, (relu.args[0], 0.0))
        relu.replace_all_uses_with(clamp)
        gm.graph.erase_node(relu)
        return PassStats(rewritten=1)

    _with_passes(monkeypatch, PassSpec("sloppy", forgets_meta, _always))
    model, x = Block().eval(), torch.randn(3, 8)
    torch.testing.assert_close(_run(model, x), model(x))
    entry = q3n_compile.reports()[0]["passes"]["sloppy"]
    assert entry["status"] == "failed" and "without meta['val']" in entry["detail"]["error"]


def test_pass_returning_wrong_type_fails_cleanly(monkeypatch):
    _with_passes(monkeypatch, PassSpec("lazy", lambda gm, ctx: None, _always))
    model, x = Block().eval(), torch.randn(3, 8)
    torch.testing.assert_close(_run(model, x), model(x))
    assert "not PassStats" in q3n_compile.reports()[0]["passes"]["lazy"]["detail"]["error"]


def _fold_linear_weight(gm, ctx):
    """Replaces the linear's weight input by a constant copy of its value, as a folding pass does."""
    addmm = _first(gm, torch.ops.aten.addmm.default)
    transpose = addmm.args[2]
    weight = transpose.args[0]
    value = ctx.freeze(weight)
    gm.register_buffer("folded_weight_t", value.detach().t().contiguous())
    with gm.graph.inserting_before(addmm):
        const = gm.graph.get_attr("folded_weight_t")
    const.meta["val"] = transpose.meta["val"]
    addmm.replace_input_with(transpose, const)
    return PassStats(matched=1, rewritten=1)


def test_folded_weight_changed_later_is_detected(monkeypatch):
    _with_passes(monkeypatch, PassSpec("fold", _fold_linear_weight, _always))
    model, x = Block().eval(), torch.randn(3, 8)
    compiled = torch.compile(model, backend="q3n")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
        (report,) = q3n_compile.reports()
        assert report["runtime"]["frozen_weights"] and report["passes"]["fold"]["status"] == "applied"
        model.proj.weight.mul_(2.0)
        with pytest.raises(FrozenWeightChanged, match="Recompile after changing weights"):
            compiled(x)


def test_verify_falls_back_when_a_pass_is_wrong(monkeypatch):
    def wrong(gm, ctx):
        node = _first(gm, torch.ops.aten.add.Tensor)
        node.target = torch.ops.aten.sub.Tensor
        return PassStats(matched=1, rewritten=1)

    _with_passes(monkeypatch, PassSpec("wrong", wrong, _always))
    model, x = Block().eval(), torch.randn(3, 8)
    with pytest.warns(UserWarning, match="verify=True found the compiled graph disagrees"):
        got = _run(model, x, verify=True)
    torch.testing.assert_close(got, model(x))
    (report,) = q3n_compile.reports()
    assert report["verify"]["status"] == "failed"
    assert report["fallbacks"][0]["stage"] == "verify"


def test_disabled_and_skipped_statuses(monkeypatch):
    calls = []

    def record(gm, ctx):
        calls.append(ctx.inference)
        return PassStats()

    _with_passes(
        monkeypatch,
        PassSpec("off", record, lambda c: "turned off"),
        PassSpec("inference_only", record, _always),
        PassSpec("any", record, _always, inference_only=False),
    )
    model, x = Block().train(), torch.randn(3, 8)
    torch.compile(model, backend="q3n")(x).sum().backward()
    passes = q3n_compile.reports()[0]["passes"]
    assert passes["off"]["status"] == "disabled" and passes["off"]["detail"]["reason"] == "turned off"
    assert passes["inference_only"]["status"] == "skipped"
    assert passes["any"]["status"] == "applied"
    assert calls == [False]


def test_static_values_hold_weights_and_module_floats_under_dynamic_shapes(monkeypatch):
    seen = {}

    def spy(gm, ctx):
        placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
        for name, value in ctx.static_values.items():
            assert name in placeholders
            seen[name] = value
        return PassStats()

    class Scaled(Block):
        def __init__(self):
            super().__init__()
            self.alpha = 0.37  # a float attribute used in tensor arithmetic, like HF's `scaling`

        def forward(self, x):
            return super().forward(x) * self.alpha

    _with_passes(monkeypatch, PassSpec("spy", spy, _always))
    model = Scaled().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.compile(model, backend="q3n", dynamic=True)(x)
    weights = [v for v in seen.values() if v.dim() > 0]
    assert sorted(tuple(w.shape) for w in weights) == [(8,), (8,), (8,), (8, 8)]
    assert all(any(w is p for p in model.parameters()) for w in weights)
    # Under dynamic shapes Dynamo passes `alpha` as a 0-d input: still a constant to q3n.
    scalars = [v.item() for v in seen.values() if v.dim() == 0]
    assert scalars == [pytest.approx(0.37)]
    # The user's input is never a constant.
    assert not any(v.shape == x.shape for v in seen.values())


@pytest.mark.parametrize("dynamic", [False, True])
def test_inductor_executor_takes_constants_a_pass_created(monkeypatch, dynamic):
    _with_passes(monkeypatch, PassSpec("fold", _fold_linear_weight, _always))
    model = Block().eval()
    compiled = torch.compile(model, backend="q3n", dynamic=dynamic, options={"executor": "inductor"})
    with torch.no_grad():
        for rows in (3, 6):
            x = torch.randn(rows, 8)
            torch.testing.assert_close(compiled(x), model(x))
    report = q3n_compile.reports()[0]
    assert report["executor"] == "inductor" and report["fallbacks"] == []
    assert report["passes"]["fold"]["status"] == "applied"


def test_inductor_executor_compiles_with_the_memory_settings(monkeypatch):
    import torch._inductor.compile_fx as compile_fx
    from torch._inductor import config as inductor_config

    from q3n_compile.runtime import INDUCTOR_MEMORY_CONFIG

    seen = []
    inner = compile_fx.compile_fx_inner

    def recording(*args, **kwargs):
        seen.append({key: getattr(inductor_config, key) for key in INDUCTOR_MEMORY_CONFIG})
        return inner(*args, **kwargs)

    monkeypatch.setattr(compile_fx, "compile_fx_inner", recording)
    model = Block().eval()
    compiled = torch.compile(model, backend="q3n", options={"executor": "inductor"})
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    assert INDUCTOR_MEMORY_CONFIG == {"realize_reads_threshold": 1}
    assert seen == [INDUCTOR_MEMORY_CONFIG]
    # Only for q3n's graphs: Inductor's own defaults are left as they were.
    assert inductor_config.realize_reads_threshold == 4


@pytest.mark.parametrize("factor, passes", [(1.05, True), (-1.0, False)])
def test_verify_bounds_lossy_rewrites_by_relative_error(monkeypatch, factor, passes):
    """A quantizing pass changes outputs a little (accepted); a broken one changes them a lot."""

    def scale_linear_weight(gm, ctx):
        addmm = _first(gm, torch.ops.aten.addmm.default)
        with gm.graph.inserting_after(addmm):
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (addmm, factor))
        scaled.meta["val"] = addmm.meta["val"]
        addmm.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        return PassStats(matched=1, rewritten=1)

    _with_passes(monkeypatch, PassSpec("quantize", scale_linear_weight, _always))
    model, x = Block().eval(), torch.randn(3, 8)
    if passes:
        _run(model, x, verify=True, quant_config={"ffn_layers": {"weight_bits": 8}})
    else:
        with pytest.warns(UserWarning, match="relative L2 error"):
            _run(model, x, verify=True, quant_config={"ffn_layers": {"weight_bits": 8}})
    verify = q3n_compile.reports()[0]["verify"]
    assert verify["status"] == ("passed" if passes else "failed")
    if passes:
        assert verify["lossy"] is True
