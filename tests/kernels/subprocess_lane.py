"""Runs a snippet in a fresh interpreter without TRITON_INTERPRET: the kernel contract's
reference path, which the CPU lane (interpreter on) cannot reach in-process, and compiles for a
GPU, which a process that has run Triton's interpreter cannot do (the interpreter's launches
leave Triton's language patched: a Gluon compile then fails in the interpreter's builder)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])


def _run(code: str, timeout: int) -> subprocess.CompletedProcess:
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_without_interpreter(code: str) -> None:
    res = _run(code, 300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def json_without_interpreter(code: str, timeout: int = 600):
    """The JSON value `code` prints on its last line of output."""
    res = _run(code, timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
