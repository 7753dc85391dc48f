"""bench/bench_hf_attention_model.py on the CPU (its --device cpu smoke mode): the transformers
Qwen3 model's attention is rewritten under q3n, every row matches the SDPA row, the JSON is whole."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_hf_attention_model_runs_on_cpu(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "bench_hf_attention_model", ROOT / "bench" / "bench_hf_attention_model.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "hf.json"
    monkeypatch.setattr(sys, "argv", ["bench_hf_attention_model.py", "--device", "cpu", "--size", "tiny",
                                      "--seq", "37", "--reps", "2", "--rows", "sdpa,eager,q3n",
                                      "--out", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    assert result["commit"] and result["date"] and result["seq"] == 37
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ["sdpa", "eager", "q3n"]
    for row in rows.values():
        assert "error" not in row, row
        assert row["latency_ms"] > 0 and row["rel_err_vs_sdpa"] < 1e-5
    # Both of the tiny model's layers hold written-out attention; q3n replaces each of them.
    assert rows["q3n"]["q3n_attention"] == {"status": "applied", "rewritten": 2, "matched": 2}
    assert "rel err" in capsys.readouterr().out
