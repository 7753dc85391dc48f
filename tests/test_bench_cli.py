"""`q3n bench` end to end on the CPU: the table, results.json/.csv/.png, decode, plots, errors."""

import csv
import json
import sys

import pytest
import torch

from q3n_compile import compare
from q3n_compile.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
META_KEYS = {"model", "label", "kind", "device", "dtype", "torch", "triton", "q3n", "commit", "date", "parameters",
             "seq_lens", "batches", "decode_batches", "decode_context", "decode_steps", "repeats", "dynamic",
             "specialize_float"}


pytestmark = pytest.mark.usefixtures("reference_kernels")



def test_bench_writes_table_json_csv_png_with_decode(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["bench", "--model", "qwen3", "--size", "tiny", "--device", "cpu", "--backends", "q3n",
                 "--seq-len", "8", "13", "--decode-batch", "2", "--decode-context", "6", "--decode-steps", "3",
                 "--repeats", "2", "--warmup", "1", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    table = captured.out
    for heading in ("prefill (time to first token)", "decode (KV cache", "q3n passes", "latency ms", "step ms"):
        assert heading in table
    assert "[" in captured.err and "decode B=2" in captured.err  # progress lines

    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == compare.SCHEMA
    assert META_KEYS <= set(data["meta"])
    assert data["meta"]["device"] == "cpu" and data["meta"]["model"] == "qwen3"
    # float attributes specialised by default: no q3n graph is handed them as per-call tensors
    assert data["meta"]["specialize_float"] is True
    assert not [r for row in data["rows"] for r in row["reports"] or [] if "float_inputs" in r["runtime"]]
    assert set(data["backends"]) == {"eager", "q3n"} and data["backends"]["q3n"]["spec"]["backend"] == "q3n"
    assert "attention" in data["backends"]["q3n"]["passes"]
    assert set(data["summary"]["vs"]["eager"]) == {"q3n"}
    rows = data["rows"]
    assert all(set(r) == set(compare.CSV_FIELDS) | {"reports"} for r in rows)
    assert [(r["phase"], r["backend"], r["batch"], r["seq_len"]) for r in rows] == [
        ("prefill", "eager", 1, 8), ("prefill", "q3n", 1, 8), ("prefill", "eager", 1, 13),
        ("prefill", "q3n", 1, 13), ("decode", "eager", 2, 6), ("decode", "q3n", 2, 6)]
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["latency_ms"] > 0 and r["tokens_per_s"] > 0 and r["repeats"] >= 2
    prefill_q3n = rows[1]
    assert prefill_q3n["compile_s"] > 0 and prefill_q3n["max_abs_err"] < 1e-4 and prefill_q3n["rel_err_vs_fp64"] < 1e-5
    assert rows[0]["compile_s"] is None  # eager compiles nothing
    assert rows[3]["graphs"] == 0 and rows[3]["compile_s"] is None  # dynamic=True: S=13 reuses S=8's graph
    decode_q3n = rows[5]
    assert decode_q3n["new_tokens"] == 3 and decode_q3n["max_abs_err"] < 1e-4
    assert decode_q3n["token_match"] == 1.0 and decode_q3n["speedup_vs_eager"] > 0
    assert decode_q3n["tokens_per_s"] == pytest.approx(2 * 1e3 / decode_q3n["latency_ms"])

    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == compare.CSV_FIELDS
        csv_rows = list(reader)
    assert len(csv_rows) == len(rows)
    assert [r["backend"] for r in csv_rows] == [r["backend"] for r in rows]
    assert float(csv_rows[1]["latency_ms"]) == pytest.approx(rows[1]["latency_ms"])
    assert csv_rows[0]["error"] == ""

    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC
    assert str(out / "results.png") in table
    assert not (out / "results.partial.jsonl").exists()  # results.json holds every row


def test_bench_keeps_measured_rows_when_stopped_before_the_end(tmp_path, monkeypatch):
    def stopped(rows):
        raise KeyboardInterrupt  # as a killed or interrupted run: after measuring, before writing

    monkeypatch.setattr(compare, "summarize", stopped)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--model", "qwen3", "--size", "tiny", "--device", "cpu", "--backends", "q3n",
              "--seq-len", "8", "--no-decode", "--repeats", "2", "--warmup", "1", "--quiet", "--out", str(out)])
    assert not (out / "results.json").exists()
    partial = out / "results.partial.jsonl"
    header, *rows = [json.loads(line) for line in partial.read_text().splitlines()]
    assert header["meta"]["label"] == "qwen3/tiny" and header["meta"]["device"] == "cpu"
    assert [(r["backend"], r["phase"], r["seq_len"]) for r in rows] == [("eager", "prefill", 8), ("q3n", "prefill", 8)]
    assert all(r["latency_ms"] > 0 and r["error"] is None for r in rows)
    # The saved rows draw as a plot like a finished run's JSON.
    assert main(["plot", str(partial), "--out", str(tmp_path / "partial.png")]) == 0
    assert (tmp_path / "partial.png").read_bytes()[:8] == PNG_MAGIC


def test_bench_without_matplotlib_still_writes_json_and_csv(tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
        code = main(["bench", "--model", "gpt2", "--device", "cpu", "--backends", "", "--seq-len", "5",
                     "--decode-batch", "1", "--decode-context", "4", "--decode-steps", "2", "--repeats", "1",
                     "--quiet", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0
    assert "pip install -e '.[bench]'" in captured.err and "q3n plot" in captured.err
    assert (tmp_path / "results.json").exists() and (tmp_path / "results.csv").exists()
    assert not (tmp_path / "results.png").exists()
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["files"]["png"] is None and "matplotlib" in data["files"]["png_error"]
    # gpt2's own static cache decodes (eager only here).
    assert [(r["phase"], r["backend"]) for r in data["rows"]] == [("prefill", "eager"), ("decode", "eager")]

    # Later, where matplotlib is installed: q3n plot draws the PNG from the JSON.
    pytest.importorskip("matplotlib")
    assert main(["plot", str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "results.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_with_lengths_memory_and_decode(tmp_path):
    pytest.importorskip("matplotlib")
    from q3n_compile.bench_plot import plot_results

    rows = []
    for b, scale in (("eager", 3.0), ("inductor", 1.2), ("q3n", 1.0)):
        for s in (512, 2048, 8192):
            rows.append(dict(compare.Row(backend=b, phase="prefill", batch=1, seq_len=s, latency_ms=scale * s / 100,
                                         compile_s=None if b == "eager" else 10.0, peak_alloc_mib=scale * s,
                                         activation_mib=scale * s / 2).__dict__))
        rows.append(dict(compare.Row(backend=b, phase="decode", batch=8, seq_len=1024, tokens_per_s=800 / scale).__dict__))
    png = plot_results({"meta": {"label": "qwen3/bench", "gpu": "NVIDIA H200", "dtype": "bfloat16"}, "rows": rows},
                       tmp_path / "p.png")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


def test_q3n_plot_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("model, message", [
    ("no_such_module_q3n:make", "cannot import 'no_such_module_q3n'"),
    ("json:no_such_factory", "has no callable 'no_such_factory'"),
])
def test_bench_model_that_cannot_be_built(model, message, capsys):
    code = main(["bench", "--model", model, "--device", "cpu", "--backends", "", "--quiet", "--no-plot"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot build the model" in err and message in err


def test_bench_local_folder_without_config(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"")
    assert main(["bench", "--model", str(tmp_path), "--device", "cpu", "--quiet", "--no-plot"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_backend_sets_and_defaults():
    assert compare.BACKEND_SETS["q3n+quant"]["options"]["quant_config"] == {
        "ffn_layers": {"weight_bits": 4, "activation_bits": 8},
        "attn_layers": {"weight_bits": 6, "activation_bits": 12},
        "norm_layers": {"dtype": "float16"},
    }
    assert compare.BACKEND_SETS["q3n+sparse"]["options"] == {"attention": "sparse"}
    assert compare.BACKEND_SETS["inductor-max-autotune"]["mode"] == "max-autotune-no-cudagraphs"
    specs = compare.resolve_backends(None, device="cpu", options={"verify": True})
    assert list(specs) == list(compare.DEFAULT_BACKENDS_CPU)
    assert specs["q3n+sparse"]["options"] == {"attention": "sparse", "verify": True}
    assert "options" not in specs["inductor"]
    assert "inductor-max-autotune" in compare.resolve_backends(None, device="cuda")
    with pytest.raises(compare.BenchError, match="unknown backend 'tvm'"):
        compare.resolve_backends(["tvm"], device="cpu")


def test_summary_against_inductor():
    rows = [
        compare.Row(backend="inductor", phase="prefill", batch=1, seq_len=512, latency_ms=10.0, compile_s=20.0,
                    peak_alloc_mib=100.0),
        compare.Row(backend="q3n", phase="prefill", batch=1, seq_len=512, latency_ms=7.0, compile_s=10.0,
                    peak_alloc_mib=80.0),
        compare.Row(backend="inductor", phase="decode", batch=1, seq_len=512, tokens_per_s=100.0, compile_s=5.0),
        compare.Row(backend="q3n", phase="decode", batch=1, seq_len=512, tokens_per_s=120.0, compile_s=5.0),
    ]
    vs = compare.summarize(rows)["vs"]["inductor"]["q3n"]
    assert vs["ttft"] == pytest.approx(0.7) and vs["met"]["ttft"] is True
    assert vs["decode_tokens_per_s"] == pytest.approx(1.2) and vs["met"]["decode_tokens_per_s"] is False
    assert vs["peak_memory"] == pytest.approx(0.8) and vs["met"]["peak_memory"] is True
    assert vs["compile_time"] == pytest.approx(0.6) and vs["met"]["compile_time"] is True


@pytest.mark.parametrize("text, message", [
    ("mine", "takes NAME=JSON, got 'mine'"),
    ("={}", "takes NAME=JSON"),
    ("mine={oops", "mine: the options are not JSON"),
    ("mine=[1]", "mine: the options must be a JSON object"),
])
def test_backend_sets_name_what_is_wrong(text, message):
    # NAME=JSON as q3n bench's --q3n-set and the bench scripts' --set read it.
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        compare.parse_backend_set(text)


def test_named_backends():
    name, spec = compare.parse_backend_set('mine={"norm_fusion": true}')
    assert (name, spec) == ("mine", {"backend": "q3n", "options": {"norm_fusion": True}})
    extra = {name: spec}
    assert compare.named_backend("eager", extra) is None
    assert compare.named_backend("mine", extra) is spec
    assert compare.named_backend("q3n+quant", extra) is compare.BACKEND_SETS["q3n+quant"]
    with pytest.raises(ValueError, match=r"unknown backend 'q3n\+nope'.*q3n\+quant.*NAME=JSON"):
        compare.named_backend("q3n+nope", extra)


def test_bench_without_float_specialisation_records_it(tmp_path):
    out = tmp_path / "run"
    code = main(["bench", "--model", "qwen3", "--size", "tiny", "--device", "cpu", "--backends", "q3n",
                 "--seq-len", "8", "--no-decode", "--repeats", "2", "--warmup", "1", "--quiet",
                 "--no-specialize-float", "--no-plot", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["specialize_float"] is False
    (q3n_row,) = [r for r in data["rows"] if r["backend"] == "q3n"]
    names = q3n_row["reports"][0]["runtime"]["float_inputs"]["names"]
    assert any(n.endswith("variance_epsilon") for n in names), names


@pytest.mark.usefixtures("fresh_quant_state")
def test_bench_releases_a_quantized_backends_weights_after_compiling(tmp_path, capsys, monkeypatch):
    """A backend with a quant_config has its model copy's quantized weights released after the
    first compile of each phase (as a deployment would), so its peak counts the packed form:
    the later prefill length and the decode graph compile from the packed weights, their
    outputs are the ones --keep-weights gives, and the note and results.json say what went."""
    def run(name, *extra):
        out = tmp_path / name
        code = main(["bench", "--model", "qwen3", "--size", "tiny", "--device", "cpu",
                     "--backends", "q3n+quant", "--seq-len", "8", "13", "--decode-batch", "2",
                     "--decode-context", "6", "--decode-steps", "3", "--repeats", "2",
                     "--warmup", "1", "--quiet", "--no-plot", "--out", str(out), *extra])
        captured = capsys.readouterr()
        assert code == 0, captured.out + captured.err
        return json.loads((out / "results.json").read_text()), captured.out

    from q3n_compile.quant import release as R
    live_at_free = []
    real_free = compare._free

    def free(device):
        real_free(device)
        live_at_free.append(sum(e.ref() is not None for e in R._QUANTIZED.values()))

    monkeypatch.setattr(compare, "_free", free)
    released, table = run("released")
    # When a backend is done, its model copy and packed weights go before the next one runs.
    assert live_at_free[-1] == 0 and max(live_at_free) == 0, live_at_free
    freed = released["backends"]["q3n+quant"]["released"]
    assert freed["parameters"] == 14 and freed["kept"] == {}  # every linear of qwen3 tiny
    from q3n_compile.models import build_model
    linears = [m.weight for m in build_model("qwen3", "tiny").layers.modules()
               if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 14 and freed["bytes"] == sum(w.numel() * 4 for w in linears)
    assert any(n.startswith("q3n+quant: 14 quantized weights of its model copy") for n in
               released["notes"])
    assert "released after compiling" in table
    kept, _ = run("kept", "--keep-weights")
    assert "released" not in kept["backends"]["q3n+quant"]
    assert not any("released after compiling" in n for n in kept["notes"])
    quant_rows = [[r for r in d["rows"] if r["backend"] == "q3n+quant"] for d in (released, kept)]
    assert [r["phase"] for r in quant_rows[0]] == ["prefill", "prefill", "decode"]
    for a, b in zip(*quant_rows):
        assert a["error"] is None and b["error"] is None
        assert a["max_abs_err"] == b["max_abs_err"]  # the same packed weights either way
    sources = [rep["passes"]["quantize"]["detail"]["calibration"]["sources"]
               for rep in quant_rows[0][2]["reports"] if "quantize" in rep.get("passes", {})]
    assert sources and all(s == {"released weight: packed before": 14} for s in sources)
