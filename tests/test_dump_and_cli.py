"""Dumps on disk, `q3n dump`, and `q3n bench` on the CPU."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import q3n_compile
from q3n_compile.cli import main
from q3n_compile.models import build_model, example_inputs

PASS_FILES = ["01_attention", "02_norm_linear", "03_quantize", "04_memory_plan"]


def _compile_tiny(tmp_path, **options):
    model = build_model("qwen3", "tiny")
    ids = example_inputs("qwen3", model, 1, 9, device="cpu")[0]
    with torch.no_grad():
        torch.compile(model, backend="q3n", options={"dump_dir": str(tmp_path), **options})(ids)
    (report,) = q3n_compile.reports()
    return report


def test_dump_folder_contents(tmp_path):
    report = _compile_tiny(tmp_path)
    folder = Path(report["dump_dir"])
    assert folder.parent == tmp_path and folder.name == f"graph_{report['graph_id']:03d}"
    captured = (folder / "00_captured.py").read_text()
    ast.parse(captured)
    assert "torch.ops.aten.mm.default" in captured and "f32[" in captured  # shapes and dtypes shown
    for stem in PASS_FILES:
        ast.parse((folder / f"{stem}.py").read_text())
        assert (folder / f"{stem}.diff").exists()
    assert json.loads((folder / "summary.json").read_text()) == report
    html = (folder / "graph.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and "<svg" in html and "mm" in html


def test_dump_diff_shows_a_rewrite(tmp_path, monkeypatch):
    from q3n_compile import pipeline
    from q3n_compile.passes.base import PassStats

    def relu_free(gm, ctx):  # swaps silu for its definition's first op, enough to show a diff
        for node in gm.graph.nodes:
            if node.target == torch.ops.aten.silu.default:
                node.target = torch.ops.aten.sigmoid.default
                node.meta["q3n_pass"] = "swap"
                return PassStats(matched=1, rewritten=1)
        return PassStats(status="skipped")

    monkeypatch.setattr(pipeline, "PASSES", (pipeline.PassSpec("swap", relu_free, lambda c: None),))
    with pytest.warns(UserWarning, match="verify=True"):
        report = _compile_tiny(tmp_path, verify=True)
    folder = Path(report["dump_dir"])
    diff = (folder / "01_swap.diff").read_text()
    assert "-" in diff and "+" in diff and "aten.sigmoid.default" in diff
    assert "swap" in (folder / "graph.html").read_text()


def test_dump_never_overwrites(tmp_path):
    first = _compile_tiny(tmp_path)
    q3n_compile.reset_reports()
    torch._dynamo.reset()
    # A new process would count graph ids from zero again: make the same folder exist already.
    second = _compile_tiny(tmp_path)
    assert first["dump_dir"] != second["dump_dir"]


def test_dump_env_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("Q3N_DUMP", str(tmp_path / "env"))
    model = build_model("llama", "tiny")
    with torch.no_grad():
        torch.compile(model, backend="q3n")(example_inputs("llama", model, 1, 5, device="cpu")[0])
    assert Path(q3n_compile.reports()[0]["dump_dir"]).parent == tmp_path / "env"


def test_q3n_dump_command(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent("""
        import sys
        import torch
        model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 4)).eval()
        compiled = torch.compile(model, backend="q3n")
        with torch.no_grad():
            print("result", tuple(compiled(torch.randn(2, 8)).shape), sys.argv[1:])
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("Q3N_")}
    out = subprocess.run(
        [sys.executable, "-m", "q3n_compile.cli", "dump", "--dir", str(tmp_path / "d"), str(script), "--flag", "x"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "result (2, 4) ['--flag', 'x']" in out.stdout
    assert "1 graph(s) compiled" in out.stdout
    assert str(tmp_path / "d" / "graph_000") in out.stdout
    for name in ("attention", "norm_linear", "quantize", "memory_plan"):
        assert f"  {name}" in out.stdout
    assert (tmp_path / "d" / "graph_000" / "summary.json").exists()


def test_q3n_bench_cpu(tmp_path, capsys, monkeypatch):
    # The bench is tested here, not the kernels: q3n's ops run their torch reference (not Triton's
    # interpreter, which the kernel tests use and which is slow on whole models).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    code = main(["bench", "--model", "qwen3", "--size", "tiny", "--device", "cpu", "--seq-len", "8", "12",
                 "--repeats", "2", "--backends", "q3n", "--no-decode", "--no-plot", "--quiet",
                 "--out", str(tmp_path)])
    assert code == 0
    table = capsys.readouterr().out
    assert "eager" in table and "q3n" in table and "latency ms" in table
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["rows"]
    assert [(r["backend"], r["seq_len"]) for r in rows] == [("eager", 8), ("q3n", 8), ("eager", 12), ("q3n", 12)]
    for row in rows:
        assert row["error"] is None and row["latency_ms"] > 0
        assert row["rel_err_vs_fp64"] < 1e-5
    assert rows[1]["max_abs_err"] < 1e-4
    assert rows[1]["reports"][0]["passes"]["attention"]["status"] in ("applied", "not implemented")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--model", "gpt5"], "unknown model 'gpt5'"),
        (["bench", "--model", "./no/such/folder"], "does not exist"),
        (["bench", "--size", "huge"], "unknown size 'huge'"),
        (["bench", "--backends", "tvm"], "unknown backend 'tvm'"),
        (["bench", "--option", "novalue"], "--option takes KEY=VALUE"),
        (["bench", "--option", "nosuch=1"], "unknown option 'nosuch'"),
        (["bench", "--option", "attention=dense"], "option 'attention' accepts"),
        (["bench", "--q3n-set", "mine={oops"], "not JSON"),
        (["bench", "--dtype", "float99"], "unknown --dtype"),
        (["bench", "--seq-len", "0"], "positive integers"),
    ],
)
def test_q3n_bench_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv + ["--device", "cpu"])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_reports_a_failing_backend_and_runs_the_rest(tmp_path, capsys):
    # A model that runs eagerly but cannot be compiled (its op's fake kernel raises while Dynamo
    # traces): every compiled row fails with its error, the eager row still runs, and the command
    # exits 1.
    (tmp_path / "flaky.py").write_text(textwrap.dedent("""
        import torch

        @torch.library.custom_op("q3n_test_flaky::op", mutates_args=())
        def flaky_op(x: torch.Tensor) -> torch.Tensor:
            return x.clone()

        @flaky_op.register_fake
        def _(x):
            raise RuntimeError("this model refuses to be compiled")

        class Flaky(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(8, 8)

            def forward(self, x):
                return flaky_op(self.lin(x))

        def make():
            return Flaky(), (torch.randn(2, 5, 8),)
    """))
    code = main(["bench", "--model", f"{tmp_path / 'flaky.py'}:make", "--device", "cpu", "--repeats", "1",
                 "--backends", "q3n", "--no-plot", "--quiet", "--out", str(tmp_path / "out")])
    assert code == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "eager" in captured.out
    assert "refuses to be compiled" in captured.out
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [(r["backend"], r["error"] is None) for r in rows] == [("eager", True), ("q3n", False)]
    assert "Traceback" in rows[1]["reports"][0]["traceback"]


def test_entry_point_in_a_fresh_interpreter():
    code = textwrap.dedent("""
        import sys, torch
        assert "q3n" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
        assert "q3n_compile" not in sys.modules
        model = torch.nn.Linear(4, 3)
        x = torch.randn(2, 4)
        with torch.no_grad():
            out = torch.compile(model, backend="q3n", options={"executor": "q3n"})(x)
            torch.testing.assert_close(out, model(x))
        import q3n_compile
        print("graphs", len(q3n_compile.reports()))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("Q3N_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "graphs 1" in out.stdout


def test_console_script_installed():
    # The script lands beside the interpreter of the environment the project is installed in.
    script = Path(sys.executable).parent / "q3n"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "bench" in out.stdout and "dump" in out.stdout
