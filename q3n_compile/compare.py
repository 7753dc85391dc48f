"""Before/after comparison: one built-in model run eagerly and compiled several ways, side by side.

For each backend the comparison measures compile time (the first call), latency (median and
spread over repeats, after warm-up; CUDA events on a GPU), peak memory on a GPU, and the error of
the output against eager (max abs and relative) and, on the CPU, against the model in float64.
A backend that fails is reported with its error; the other rows still run.
"""

from __future__ import annotations

import copy
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from .models import build_model, example_inputs


@dataclass
class Row:
    backend: str
    seq_len: int
    batch: int
    compile_s: float | None = None
    latency_ms: float | None = None
    latency_spread_ms: float | None = None
    peak_mib: float | None = None
    max_abs_err: float | None = None
    rel_err: float | None = None
    rel_err_vs_fp64: float | None = None
    error: str | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compare(
    model: str = "qwen3",
    size: str = "tiny",
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    batch: int = 1,
    seq_lens: Sequence[int] = (64,),
    backends: dict[str, dict[str, Any]] | None = None,
    repeats: int | None = None,
    warmup: int = 3,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """Compare eager with each entry of `backends` ({label: {"backend": ..., "options": ...}})."""
    import q3n_compile

    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    repeats = repeats or (50 if device == "cuda" else 10)
    backends = backends or {"q3n": {"backend": "q3n", "options": {}}}
    eager = build_model(model, size, dtype=dtype, device=device)
    fp64 = build_model(model, size, dtype=torch.float64, device="cpu") if device == "cpu" else None

    rows: list[Row] = []
    for seq_len in seq_lens:
        inputs = example_inputs(model, eager, batch, seq_len, device=device)
        with torch.no_grad():
            reference = _first_tensor(eager(*inputs)).float()
            exact = (
                _first_tensor(fp64(*[_to_fp64(x) for x in inputs])) if fp64 is not None else None
            )
        runners: dict[str, Callable] = {"eager": eager}
        for label, spec in backends.items():
            runners[label] = _compiled(eager, spec)
        for label, fn in runners.items():
            if progress:
                progress(f"{model}/{size} S={seq_len}: {label}")
            row = Row(backend=label, seq_len=seq_len, batch=batch)
            q3n_compile.reset_reports()
            try:
                _measure(row, fn, inputs, device, repeats, warmup, reference, exact)
            except Exception as err:  # one failing backend must not hide the others
                row.error = f"{type(err).__name__}: {err}"
                row.reports = [{"traceback": traceback.format_exc()}]
            else:
                row.reports = q3n_compile.reports()
            rows.append(row)
    return rows


def rows_as_json(rows: Sequence[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def format_table(rows: Sequence[Row]) -> str:
    header = ("backend", "S", "B", "compile s", "latency ms", "± ms", "peak MiB", "max err", "rel err", "vs fp64")
    lines = [header]
    for r in rows:
        if r.error:
            lines.append((r.backend, str(r.seq_len), str(r.batch), "FAILED: " + r.error[:60], "", "", "", "", "", ""))
            continue
        lines.append((
            r.backend, str(r.seq_len), str(r.batch), _fmt(r.compile_s, ".2f"), _fmt(r.latency_ms, ".3f"),
            _fmt(r.latency_spread_ms, ".3f"), _fmt(r.peak_mib, ".0f"), _fmt(r.max_abs_err, ".2e"),
            _fmt(r.rel_err, ".2e"), _fmt(r.rel_err_vs_fp64, ".2e"),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _compiled(model: torch.nn.Module, spec: dict[str, Any]) -> Callable:
    kwargs: dict[str, Any] = {"backend": spec.get("backend", "q3n")}
    if spec.get("options"):
        kwargs["options"] = spec["options"]
    if spec.get("mode"):
        kwargs["mode"] = spec["mode"]
    # Each backend compiles its own copy: compiled modules share parameters otherwise, and a
    # backend that folds weights must not see another's changes.
    return torch.compile(copy.deepcopy(model), dynamic=spec.get("dynamic"), **kwargs)


def _measure(row: Row, fn, inputs, device, repeats, warmup, reference, exact) -> None:
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        start = time.perf_counter()
        out = _first_tensor(fn(*inputs))
        if cuda:
            torch.cuda.synchronize()
        row.compile_s = time.perf_counter() - start
        for _ in range(warmup):
            fn(*inputs)
        times = _time_calls(fn, inputs, repeats, cuda)
    row.latency_ms = statistics.median(times)
    row.latency_spread_ms = (max(times) - min(times)) / 2
    if cuda:
        row.peak_mib = torch.cuda.max_memory_allocated() / 2**20
    diff = out.float() - reference
    row.max_abs_err = diff.abs().max().item()
    row.rel_err = (diff.norm() / reference.norm().clamp_min(1e-30)).item()
    if exact is not None:
        d64 = out.double().cpu() - exact
        row.rel_err_vs_fp64 = (d64.norm() / exact.norm().clamp_min(1e-30)).item()


def _time_calls(fn, inputs, repeats: int, cuda: bool) -> list[float]:
    times = []
    for _ in range(repeats):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(*inputs)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*inputs)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    if isinstance(out, dict):
        return _first_tensor(next(iter(out.values())))
    raise TypeError(f"cannot find a tensor in the model's output ({type(out).__name__})")


def _to_fp64(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double().cpu()
    return x.cpu() if isinstance(x, torch.Tensor) else x


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
