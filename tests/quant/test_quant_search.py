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


def test_cli_prints_a_table_and_saves_a_config_quant_config_accepts(tmp_path, capsys):
    from q3n_compile.cli import main

    out = tmp_path / "cfg.json"
    assert main(["quant-search", "--model", "bert", "--budget", "0.05", "--bits", "4", "8",
                 "--batches", "2", "--seq-len", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "[12/12] layers.1.output.dense: W" in printed.err  # progress, one line per layer
    table = printed.out
    assert "layers.0.attention.query" in table and "budget 0.05 per layer" in table
    cfg = json.loads(out.read_text())
    bits = {r["match"]: r["weight_bits"] for r in cfg["rules"]}
    assert len(bits) == 12 and set(bits.values()) <= {4, 8, 16} and 4 in bits.values()

    quant.clear()  # the saved file alone decides: nothing cached from the search
    model = build_model("bert", "tiny")
    inputs = example_inputs("bert", model, 2, 16, seed=9)
    with torch.no_grad():
        torch.compile(model, backend="q3n", options={"quant_config": cfg, "norm_fusion": False,
                                                     "attention": "off"})(*inputs)
    q = q3n_compile.reports()[-1]["passes"]["quantize"]
    assert {e["layer"]: e["weight_bits"] for e in q["detail"]["layers"]} == {
        k: v for k, v in bits.items() if v != 16}
    quant.clear()


def test_cli_searches_with_quantized_activations_and_their_groups(tmp_path, capsys):
    from q3n_compile.cli import main

    out = tmp_path / "cfg.json"
    assert main(["quant-search", "--model", "bert", "--budget", "0.05", "--bits", "4", "8",
                 "--activation-bits", "8", "--activation-group-size", "32", "--batches", "2",
                 "--seq-len", "16", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "formats W4A8 act-g32, W8A8 act-g32 per channel" in printed.err
    assert "act-g32" in printed.out  # the table names the chosen formats' activation groups
    rules = [r for r in json.loads(out.read_text())["rules"] if r["weight_bits"] != 16]
    assert rules and all(r["activation_bits"] == 8 and r["activation_group_size"] == 32
                         for r in rules)
    assert all(r["symmetric"] for r in rules if r["weight_bits"] == 8)  # int8 x int8 needs it
    quant.clear()


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet"], "unknown model 'resnet'; choose from qwen3"),
    (["--budget", "1.5"], "--budget 1.5 is not a relative error in (0, 1)"),
    (["--bits", "12"], "--bits 12 is not supported"),
    (["--activation-bits", "4"], "--activation-bits 4 is not supported; use 16"),
    (["--activation-group-size", "64"], "--activation-group-size 64 needs quantized activations"),
    (["--activation-bits", "8", "--activation-group-size", "48"],
     "--activation-group-size 48 is not supported; use 32, 64, 128 or 'token'"),
])
def test_cli_errors_name_the_problem(args, message, capsys):
    from q3n_compile.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["quant-search", *args])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_budget_must_be_a_relative_error():
    with pytest.raises(ValueError, match=r"budget 0 is not a relative error in \(0, 1\)\. Fix:"):
        quant.search_precision(torch.nn.Linear(4, 4), [], budget=0)


def test_candidates_with_activation_groups_are_written_into_the_rules():
    """A candidate (bits, activation bits, group, activation group) gives a rule that names its
    activation groups; compiling with the result reuses the search's quantizations."""
    quant.clear()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(80, 48), torch.nn.GELU(),
                                torch.nn.Linear(48, 24)).eval()
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 8, 80, generator=gen) for _ in range(2)]
    res = quant.search_precision(model, batches, budget=0.5, candidates=((8, 8, -1, 32),),
                                 calibration={"method": "rtn"})
    rules = res["quant_config"]["rules"]
    assert [r["activation_group_size"] for r in rules] == [32, 32]
    assert [e["format"] for e in res["layers"]] == ["W8A8 channel sym int8 act-g32"] * 2
    with torch.no_grad():
        torch.compile(model, backend="q3n", options={"quant_config": res["quant_config"],
                                                     "attention": "off"})(batches[0])
    q = q3n_compile.reports()[-1]["passes"]["quantize"]
    assert [e["activation_group_size"] for e in q["detail"]["layers"]] == [32, 32]
    assert q["detail"]["cache"]["misses"] == 0  # the same format, activation groups included
    quant.clear()
