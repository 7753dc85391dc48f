"""release_quantized_weights: the high-precision weights go, the compiled model keeps working."""

import gc

import pytest
import torch

import q3n_compile
from q3n_compile.models import build_model, example_inputs

pytestmark = [pytest.mark.usefixtures("fresh_quant_state", "reference_kernels"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")]

CFG = {"ffn_layers": {"weight_bits": 4}, "attn_layers": {"weight_bits": 8},
       "calibration": {"example_inputs": False}}
BASE = {"norm_fusion": False, "attention": "off"}


def live_storages() -> dict[int, int]:
    """Every CPU tensor storage alive in the process: data pointer -> bytes (each storage once)."""
    gc.collect()
    out: dict[int, int] = {}
    for obj in gc.get_objects():
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) or obj.device.type != "cpu":
            continue
        storage = obj.untyped_storage()
        if storage.nbytes():
            out[storage.data_ptr()] = storage.nbytes()
    return out


def bytes_only_in(a: dict[int, int], b: dict[int, int]) -> int:
    """Bytes of the storages alive in `a` and not in `b`. Comparing sets of storages, not totals,
    keeps the check independent of what earlier tests left for the garbage collector."""
    return sum(n for ptr, n in a.items() if ptr not in b)


def test_release_drops_the_weights_and_the_model_keeps_running():
    model = build_model("qwen3", "tiny")
    inputs = example_inputs("qwen3", model, 2, 16, seed=1)
    want = model(*inputs)
    eager = live_storages()
    model_bytes = sum(p.untyped_storage().nbytes() for p in model.parameters())
    compiled = torch.compile(model, backend="q3n", options={"quant_config": CFG, **BASE})
    first = compiled(*inputs)
    d = q3n_compile.reports()[-1]["passes"]["quantize"]["detail"]
    before, after = d["weight_bytes_before"], d["weight_bytes_after"]
    assert after < before / 2
    compiled_storages = live_storages()
    # The packed weights come on top of the eager ones.
    assert bytes_only_in(compiled_storages, eager) >= after

    result = q3n_compile.release_quantized_weights(model)
    assert len(result["released"]) == 14 and result["kept"] == {}
    assert result["bytes_released"] == before
    released = live_storages()
    # What drops: the quantized layers' weights (and their calibration statistics, if any).
    # What stays: embeddings, norms, lm_head (not quantized), the packed weights, and the compiled
    # graph's own buffers (the memory plan's arena, the output): less than the eager model alone.
    assert bytes_only_in(compiled_storages, released) >= before
    kept_by_model = sum(p.untyped_storage().nbytes() for p in model.parameters())
    added = bytes_only_in(released, eager)
    assert kept_by_model + added < model_bytes - before / 2, (model_bytes, kept_by_model, added, before)

    assert torch.equal(compiled(*inputs), first)  # no recompile, same packed weights
    other = example_inputs("qwen3", model, 1, 9, seed=2)  # a new shape compiles a new graph
    compiled(*other)
    q = q3n_compile.reports()[-1]["passes"]["quantize"]
    assert q["rewritten"] == 14
    assert q["detail"]["calibration"]["sources"] == {"released weight: packed before": 14}
    assert ((first - want).norm() / want.norm()) < 0.2  # 4-bit rounding without data: 0.11
    with pytest.raises(RuntimeError, match="storage"):
        model(*inputs)  # the eager model has lost those weights: documented


def test_weights_a_graph_still_reads_are_kept_and_a_new_config_fails_clearly():
    model = build_model("qwen3", "tiny")
    inputs = example_inputs("qwen3", model, 1, 8)
    cfg = dict(CFG, rules=[{"match": "layers.1.mlp.*", "skip": True}])
    compiled = torch.compile(model, backend="q3n", options={"quant_config": cfg, **BASE})
    compiled(*inputs)
    result = q3n_compile.release_quantized_weights(model)
    assert len(result["released"]) == 11  # 14 linears, 3 kept in high precision by the rule
    assert not any("layers.1.mlp" in name for name in result["released"])
    assert q3n_compile.release_quantized_weights(model)["released"] == []  # idempotent

    torch._dynamo.reset()
    other = dict(CFG, ffn_layers={"weight_bits": 6})  # never packed: needs the freed weights
    with pytest.raises(Exception, match=r"freed by release_quantized_weights\(\).*Fix: reload"):
        torch.compile(model, backend="q3n",
                      options={"quant_config": other, "strict": True, **BASE})(*inputs)


def test_prune_forgets_a_deleted_models_statistics_and_packed_weights():
    from q3n_compile.quant import calibration, release

    model = build_model("qwen3", "tiny")
    cfg = dict(CFG, calibration={"example_inputs": True})
    compiled = torch.compile(model, backend="q3n", options={"quant_config": cfg, **BASE})
    compiled(*example_inputs("qwen3", model, 2, 32, seed=1))
    assert q3n_compile.reports()[-1]["passes"]["quantize"]["rewritten"] == 14
    assert calibration._STATS and release._QUANTIZED
    q3n_compile.quant.prune()  # the model is alive: nothing goes
    assert calibration._STATS and release._QUANTIZED
    del model, compiled
    torch._dynamo.reset()
    gc.collect()
    q3n_compile.quant.prune()
    assert not calibration._STATS and not calibration._CACHE and not release._QUANTIZED


@pytest.mark.parametrize("merge", [True, "shared_smoothing"])
def test_siblings_that_took_a_group_smoothing_choice_recompile_after_release(merge):
    """Calibrated W8A8 siblings share their group's smoothing vector (merge_siblings); once
    their weights are released (and with them the calibration statistics the choice was made
    from), a new shape still finds each layer's packed form and merges the same groups."""
    model = build_model("qwen3", "tiny")
    q3n_compile.quant.calibrate(model, [example_inputs("qwen3", model, 2, 32, seed=1)])
    cfg = {"ffn_layers": {"weight_bits": 8, "activation_bits": 8, "group_size": -1},
           "attn_layers": {"weight_bits": 8, "activation_bits": 8, "group_size": -1},
           "calibration": {"method": "rtn"}, "merge_siblings": merge}
    compiled = torch.compile(model, backend="q3n", options={"quant_config": cfg, **BASE})
    inputs = example_inputs("qwen3", model, 1, 8)
    first = compiled(*inputs)
    q = q3n_compile.reports()[-1]["passes"]["quantize"]["detail"]
    groups = [g["layers"] for g in q["siblings"]["groups"]]
    assert groups  # some siblings took their group's vector and merged
    assert any("shared with siblings" in e["method"] for e in q["layers"])
    assert len(q3n_compile.release_quantized_weights(model)["released"]) == 14
    compiled(*example_inputs("qwen3", model, 1, 9, seed=2))  # a new shape: a new graph
    q = q3n_compile.reports()[-1]["passes"]["quantize"]["detail"]
    assert q["calibration"]["sources"] == {"released weight: packed before": 14}
    assert [g["layers"] for g in q["siblings"]["groups"]] == groups
    assert torch.equal(compiled(*inputs), first)
