"""search_precision: bits per layer within an error budget, at the fewest bytes."""

import json

import pytest
import torch

import q3n_compile
from q3n_compile import quant
from q3n_compile.models import build_model, example_inputs
from q3n_compile.quant.config import parse_quant_config

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")


def test_search_meets_the_budget_at_fewer_bytes_and_compiles():
    quant.clear()
    model = build_model("llama", "tiny")
    batches = [example_inputs("llama", model, 2, 32, seed=s) for s in range(1, 3)]
    loose = quant.search_precision(model, batches, budget=0.08)
    tight = quant.search_precision(model, batches, budget=0.02)
    for res, budget in ((loose, 0.08), (tight, 0.02)):
        cfg = res["quant_config"]
        parse_quant_config(json.loads(json.dumps(cfg)))  # JSON, and accepted as quant_config
        assert len(res["layers"]) == 14  # lm_head is not searched unless asked
        for layer in res["layers"]:
            if layer["format"] != "high precision":
                assert layer["rel_err"] <= budget
        assert res["weight_bytes_after"] < res["weight_bytes_before"]
    assert loose["weight_bytes_after"] < tight["weight_bytes_after"]
    bits = lambda res: sorted(r["weight_bits"] for r in res["quant_config"]["rules"])  # noqa: E731
    assert bits(loose) != bits(tight)

    inputs = example_inputs("llama", model, 1, 8)
    with torch.no_grad():
        torch.compile(model, backend="q3n", options={"quant_config": loose["quant_config"],
                                                     "norm_fusion": False, "attention": "off"})(*inputs)
    q = q3n_compile.reports()[-1]["passes"]["quantize"]
    chosen = {r["match"]: r["weight_bits"] for r in loose["quant_config"]["rules"]}
    assert {e["layer"]: e["weight_bits"] for e in q["detail"]["layers"]} == {
        k: v for k, v in chosen.items() if v != 16}
    assert q["detail"]["cache"]["misses"] == 0  # the search's quantizations are reused
    quant.clear()
