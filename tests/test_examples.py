"""The examples a new user starts from still run and print what their docstrings promise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script, *args, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("Q3N_")}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, env=env, timeout=600, cwd=cwd)


def test_quickstart(tmp_path):
    out = _run("quickstart.py", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "max abs error vs eager" in out.stdout
    for name in ("attention", "norm_linear", "quantize", "memory_plan"):
        assert name in out.stdout


def test_dump_walkthrough(tmp_path):
    out = _run("dump_walkthrough.py", str(tmp_path / "d"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "d" / "graph_000"
    assert (folder / "graph.html").exists() and (folder / "00_captured.py").exists()
    assert str(folder / "summary.json") in out.stdout
