"""The bench-era examples run on the CPU and print what their docstrings promise."""

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script, *args, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("Q3N_")}
    # Whole models: q3n's ops run their torch reference, not Triton's (slow) interpreter.
    env["TRITON_INTERPRET"] = "0"
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                         env=env, timeout=600, cwd=cwd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_quant_config_example_reads_the_report(tmp_path):
    out = _run("quant_config.py", "--length", "16", cwd=tmp_path)
    assert '"weight_bits": 4' in out and '"activation_bits": 12' in out
    assert "quantize pass: status" in out and "relative error against eager" in out
    status = out.split("quantize pass: status '")[1].split("'")[0]
    assert status in ("applied", "not implemented", "failed", "skipped", "disabled")
    if status == "not implemented":
        assert "has not landed yet" in out


def test_long_context_memory_example(tmp_path):
    out = _run("long_context_memory.py", "--backends", "q3n", "--lengths", "16", "32", cwd=tmp_path)
    assert "qwen3/tiny on cpu" in out and "latency (ms) for scale" in out
    assert "S=    32: eager" in out


# examples/qwen3_next.py and examples/bench_api.py are not run here: they compile the same models as
# tests/test_bench_models.py and tests/test_bench_cli.py, which would double the lane's time.
