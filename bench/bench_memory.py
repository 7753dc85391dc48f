"""Peak memory and latency of eager, Inductor and q3n (memory plan on) on a built-in model, prefill.

For each backend (one compile per backend: the sequence dimension is marked dynamic, so the
lengths share one graph; ``--static`` compiles per length instead) and each length, after two warm
calls:

- peak memory: ``torch.cuda.max_memory_allocated()`` over one warm call, from
  ``reset_peak_memory_stats()`` — reported absolute, and above the baseline (model weights and
  inputs, measured before any compile), which includes what a backend keeps between calls (q3n's
  arena, folded weights);
- latency: CUDA events around each call, the median over ``--reps`` calls (fewer at long lengths);
- correctness: the last 16 positions of the output against eager's (relative error);
- for q3n, the memory plan's figures from its report for the length's bucket (arena, lower bound
  L, arena/L, naive and unplanned bytes, the peak estimates).

    python bench/bench_memory.py --out bench/results/memory-h200.json
    python bench/bench_memory.py --model gpt2 --seqs 512 2048 --backends eager,q3n,q3n-noplan

Backends: eager, inductor (torch.compile's default backend), q3n (memory_plan on), q3n-noplan
(q3n with memory_plan=False: the plan's own effect), q3n-cudagraphs, q3n-inductor (q3n's passes,
then Inductor: the executor comparison), q3n-inductor-pool (the same without q3n's Inductor
memory settings, runtime.INDUCTOR_MEMORY_CONFIG: what they save), q3n-inductor-noreuse (those
plus Inductor's allow_buffer_reuse=False). Writes JSON (GPU, versions,
commit, date, rows) to --out and prints a table. Built for one H200: qwen3 "bench" (about 1e9
parameters, bf16) is built once and shared by every backend; the default run takes a few minutes.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import q3n_compile  # noqa: E402
import q3n_compile.runtime  # noqa: E402,F401
from q3n_compile.models import build_model, example_inputs  # noqa: E402

# q3n's Inductor executor with other Inductor memory settings than runtime.INDUCTOR_MEMORY_CONFIG:
# Inductor's own ("pool"), or q3n's plus buffers freed at their last use ("noreuse").
INDUCTOR_SETTINGS = {"q3n-inductor-pool": {},
                     "q3n-inductor-noreuse": {"realize_reads_threshold": 1, "allow_buffer_reuse": False}}
BACKENDS = ("eager", "inductor", "q3n", "q3n-noplan", "q3n-cudagraphs", "q3n-inductor",
            *INDUCTOR_SETTINGS)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


from q3n_compile.compare import git_commit  # noqa: E402  (one definition for every result file)


def versions():
    out = {"torch": torch.__version__, "q3n": q3n_compile.__version__}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def make_fn(backend, model, static):
    dynamic = False if static else None
    if backend == "eager":
        return model
    if backend == "inductor":
        return torch.compile(model, dynamic=dynamic)
    # The arena is q3n's executor's; "auto" would pick Inductor on CUDA, so it is named here.
    options = {"q3n": {"executor": "q3n"}, "q3n-noplan": {"executor": "q3n", "memory_plan": False},
               "q3n-cudagraphs": {"cuda_graphs": True}, "q3n-inductor": {"executor": "inductor"},
               **{name: {"executor": "inductor"} for name in INDUCTOR_SETTINGS}}[backend]
    return torch.compile(model, backend="q3n", dynamic=dynamic, options=options)


def inputs_for(name, model, seq, static, device):
    inputs = example_inputs(name, model, 1, seq, device=device)
    if not static:
        for t in inputs:
            torch._dynamo.mark_dynamic(t, 1)
    return inputs


def q3n_memory(seq):
    """The memory figures of the newest q3n report, for the bucket holding `seq`."""
    reports = q3n_compile.reports()
    if not reports:
        return None
    memory = reports[-1].get("memory") or {}
    if memory.get("status") != "applied":
        return {"status": memory.get("status"), "reason": memory.get("reason")}
    # Static shapes: one plan. Dynamic: the smallest bucket whose sizes hold this length.
    candidates = [b for b in memory.get("buckets", []) if max(b["symbols"].values(), default=seq) >= seq]
    best = min(candidates, key=lambda b: max(b["symbols"].values(), default=0)) if candidates else memory
    keys = ("arena_bytes", "lower_bound_bytes", "ratio", "naive_bytes", "unplanned_bytes", "output_bytes",
            "peak_estimate_bytes", "no_plan_peak_estimate_bytes", "planned_count", "unplanned_count",
            "inplace_count", "symbols", "strategy", "plan_time_s")
    out = {k: best.get(k) for k in keys}
    out["status"] = "applied"
    out["unplanned_reasons"] = memory.get("unplanned_reasons")
    return out


class Device:
    """CUDA: events and the caching allocator's statistics. CPU (a smoke test of this script):
    wall-clock times, no memory figures."""

    def __init__(self, kind):
        self.cuda = kind == "cuda"
        self.kind = kind

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def allocated(self):
        return torch.cuda.memory_allocated() if self.cuda else None

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self):
        return torch.cuda.max_memory_allocated() if self.cuda else None

    def empty_cache(self):
        if self.cuda:
            torch.cuda.empty_cache()

    def time_calls(self, fn, inputs, reps):
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*inputs)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                out = fn(*inputs)
                times.append((time.perf_counter() - t0) * 1e3)
            del out
        return statistics.median(times), times


def _gb(x):
    return "       -" if x is None else f"{x / 1e9:8.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    ap.add_argument("--model", default="qwen3")
    ap.add_argument("--size", default="bench")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--seqs", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--backends", default="eager,q3n,inductor,q3n-noplan")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu only smoke-tests this script (no memory figures)")
    ap.add_argument("--reps", type=int, default=20, help="timed calls at 512 tokens (fewer when longer)")
    ap.add_argument("--static", action="store_true", help="compile per length instead of once, dynamic")
    ap.add_argument("--budget-s", type=float, default=210.0,
                    help="skip the backends not started once this much time has passed")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_memory.py needs a CUDA GPU (--device cpu only smoke-tests the script)")
    dev = Device(args.device)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        sys.exit(f"unknown backend(s) {unknown}; valid: {', '.join(BACKENDS)}")
    seqs = sorted(args.seqs)
    started = time.perf_counter()

    t0 = time.perf_counter()
    model = build_model(args.model, args.size, dtype=DTYPES[args.dtype], device=args.device)
    build_s = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    print(f"{args.model}/{args.size} {args.dtype}: {weights / 1e9:.2f} GB of weights, built in {build_s:.1f} s",
          flush=True)

    # Eager's output tail per length: what every backend is compared with.
    reference = {}
    with torch.no_grad():
        for seq in seqs:
            out = model(*example_inputs(args.model, model, 1, seq, device=args.device))
            reference[seq] = out[:, -16:].float().clone()
            del out
    dev.sync()
    dev.empty_cache()

    rows, skipped = [], []
    header = (f"{'backend':<20} {'S':>6} {'peak GB':>8} {'above wts':>8} {'kept GB':>8} {'ms':>8} "
              f"{'compile s':>9} {'rel err':>8} {'arena/L':>8}")
    print(header, flush=True)
    memory_config = q3n_compile.runtime.INDUCTOR_MEMORY_CONFIG
    q3n_settings = dict(memory_config)
    for backend in backends:
        memory_config.clear()
        memory_config.update(INDUCTOR_SETTINGS.get(backend, q3n_settings))
        if time.perf_counter() - started > args.budget_s:
            skipped.append(backend)
            print(f"{backend}: skipped (time budget of {args.budget_s:.0f} s spent)", flush=True)
            continue
        torch._dynamo.reset()
        q3n_compile.reset_reports()
        gc.collect()
        dev.empty_cache()
        dev.sync()
        baseline = dev.allocated()
        fn = None if args.static else make_fn(backend, model, args.static)
        for seq in seqs:
            row = {"model": args.model, "size": args.size, "dtype": args.dtype, "batch": 1, "seq": seq,
                   "backend": backend}
            try:
                if args.static:
                    torch._dynamo.reset()
                    q3n_compile.reset_reports()
                    fn = make_fn(backend, model, args.static)
                inputs = inputs_for(args.model, model, seq, args.static, args.device)
                with torch.no_grad():
                    dev.sync()
                    t0 = time.perf_counter()
                    out = fn(*inputs)  # compiles (first length) or plans the bucket
                    dev.sync()
                    row["first_call_s"] = round(time.perf_counter() - t0, 3)
                    row["rel_err_vs_eager"] = (
                        (out[:, -16:].float() - reference[seq]).norm() / reference[seq].norm()).item()
                    del out
                    fn(*inputs)  # warm
                    dev.sync()
                    before = dev.allocated()
                    dev.reset_peak()
                    out = fn(*inputs)
                    dev.sync()
                    peak = dev.peak()
                    del out
                    reps = max(3, args.reps * 512 // max(seq, 512)) if seq > 512 else args.reps
                    row["latency_ms"], row["latency_all_ms"] = dev.time_calls(fn, inputs, reps)
                row.update(
                    peak_bytes=peak,
                    peak_above_weights_bytes=None if peak is None else peak - baseline,
                    kept_between_calls_bytes=None if before is None else before - baseline,
                    weights_bytes=weights,
                )
                if backend.startswith("q3n"):
                    row["q3n_memory"] = q3n_memory(seq)
                    reports = q3n_compile.reports()
                    if reports:
                        row["q3n_passes"] = {k: v["status"] for k, v in reports[-1]["passes"].items()}
                        row["q3n_cuda_graphs"] = reports[-1]["runtime"].get("cuda_graphs")
            except Exception as err:  # one failing backend must not cost the others
                row["error"] = f"{type(err).__name__}: {err}"[:500]
                print(f"{backend:<20} {seq:>6} failed: {row['error']}", flush=True)
                rows.append(row)
                break
            rows.append(row)
            mem = row.get("q3n_memory") or {}
            ratio = mem.get("ratio")
            print(f"{backend:<20} {seq:>6} {_gb(row['peak_bytes'])} {_gb(row['peak_above_weights_bytes'])} "
                  f"{_gb(row['kept_between_calls_bytes'])} {row['latency_ms']:8.2f} {row['first_call_s']:9.1f} "
                  f"{row['rel_err_vs_eager']:8.1e} {ratio if ratio is not None else '-':>8}", flush=True)
            inputs = None
        del fn
        torch._dynamo.reset()
        gc.collect()
        dev.empty_cache()

    # Ratios the goals are stated in: q3n's peak against Inductor's and eager's.
    summary = []
    by = {(r["backend"], r["seq"]): r for r in rows if "error" not in r}
    for seq in seqs:
        q = by.get(("q3n", seq))
        if q is None:
            continue
        entry = {"seq": seq}
        for other in ("eager", "inductor", "q3n-noplan"):
            o = by.get((other, seq))
            if o is not None and q["peak_bytes"] is not None:
                entry[f"peak_vs_{other}"] = round(q["peak_bytes"] / o["peak_bytes"], 4)
                entry[f"peak_above_weights_vs_{other}"] = round(
                    q["peak_above_weights_bytes"] / max(1, o["peak_above_weights_bytes"]), 4)
            if o is not None:
                entry[f"latency_vs_{other}"] = round(q["latency_ms"] / o["latency_ms"], 4)
        summary.append(entry)
    if summary:
        print("q3n against the others (peak, peak above weights, latency ratios):")
        for entry in summary:
            print("  ", entry)

    result = dict(
        gpu=torch.cuda.get_device_name() if dev.cuda else "cpu (smoke test)", **versions(), commit=git_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        model=args.model, size=args.size, dtype=args.dtype, batch=1, seqs=seqs, static=args.static,
        weights_bytes=weights, timer="CUDA events, median", peak="max_memory_allocated over one warm call",
        rows=rows, summary=summary, skipped=skipped, total_s=round(time.perf_counter() - started, 1),
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
