"""bench/bench_memory.py's logic on the CPU (its --device cpu smoke mode): rows, JSON, ratios."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_memory_runs_on_cpu(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "bench_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "memory.json"
    monkeypatch.setenv("Q3N_ATTENTION", "off")  # Triton's interpreter would make this slow
    monkeypatch.setenv("Q3N_NORM_FUSION", "0")
    monkeypatch.setattr(sys, "argv", ["bench_memory.py", "--device", "cpu", "--model", "gpt2", "--size", "tiny",
                                      "--dtype", "fp32", "--seqs", "7", "12", "--reps", "2",
                                      "--backends", "eager,q3n", "--out", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    assert result["gpu"] == "cpu (smoke test)" and result["torch"]
    rows = {(r["backend"], r["seq"]): r for r in result["rows"]}
    assert set(rows) == {("eager", 7), ("eager", 12), ("q3n", 7), ("q3n", 12)}
    for row in rows.values():
        assert "error" not in row, row
        assert row["latency_ms"] > 0 and row["rel_err_vs_eager"] < 1e-5
    memory = rows[("q3n", 12)]["q3n_memory"]
    assert memory["status"] == "applied" and memory["ratio"] >= 1.0
    assert max(memory["symbols"].values()) == 16  # the bucket holding 12
    assert [s["seq"] for s in result["summary"]] == [7, 12]
    assert "arena/L" in capsys.readouterr().out
