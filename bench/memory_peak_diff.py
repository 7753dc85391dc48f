"""What is live at the peak of one warm prefill call, per backend: the tensors that make a peak.

For each backend the built-in model is compiled once, called twice (warm), then one call is run
with the CUDA caching allocator's history recorded. The allocator's event trace is replayed from
the memory allocated before the call: the moment with the most bytes allocated is the peak, and
the tensors allocated during the call and still live then are listed, largest first, each with the
Python frame that allocated it (generated Inductor code, a q3n kernel launcher, ...). Also given:
bytes held before the call (weights, inputs, what a backend keeps between calls) and the peak above
that. Use it to explain a peak difference between two backends:

    python bench/memory_peak_diff.py --seq 512 --backends inductor,q3n --out peak-512.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from q3n_compile.compare import git_commit  # noqa: E402
from q3n_compile.models import build_model, example_inputs  # noqa: E402

BACKENDS = {
    "eager": None,
    "inductor": dict(backend="inductor"),
    "q3n": dict(backend="q3n"),
    "q3n-arena": dict(backend="q3n", options={"executor": "q3n"}),
}


def _frame(frames: list[dict]) -> str:
    """The innermost Python frame outside torch's own files: who asked for the tensor (C++ frames
    and torch's Python are skipped; Inductor's generated code lives outside the torch package)."""
    for f in frames:
        name = f.get("filename", "")
        if not name.endswith(".py") or ("/torch/" in name and "/_inductor/" not in name):
            continue
        return f"{Path(name).name}:{f.get('line')}:{f.get('name')}"
    return "?"


def live_at_peak(fn, inputs) -> dict:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    with torch.no_grad():
        fn(*inputs)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for trace in snap["device_traces"] for e in trace]
    live: dict[int, tuple[int, str]] = {}
    current = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], _frame(e.get("frames", [])))
            current += e["size"]
            if current > peak:
                peak, at_peak = current, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            current -= live.pop(e["addr"])[0]
    tensors = sorted(at_peak.values(), key=lambda t: -t[0])
    return {
        "held_before_call_bytes": base,
        "peak_above_held_bytes": peak,
        "live_at_peak": [{"bytes": b, "allocated_by": who} for b, who in tensors[:25]],
        "live_at_peak_count": len(tensors),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3")
    ap.add_argument("--size", default="bench")
    ap.add_argument("--seq", type=int, nargs="+", default=[512])
    ap.add_argument("--backends", default="inductor,q3n")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    model = build_model(args.model, args.size, dtype=torch.bfloat16, device="cuda")
    rows = []
    for name in args.backends.split(","):
        torch._dynamo.reset()
        spec = BACKENDS[name]
        fn = model if spec is None else torch.compile(model, **spec)
        for seq in args.seq:
            inputs = example_inputs(args.model, model, 1, seq, device="cuda", seed=0)
            for t in inputs:  # as bench_memory.py: the length dynamic, the batch static
                torch._dynamo.mark_dynamic(t, 1)
            with torch.no_grad():
                fn(*inputs), fn(*inputs)
            gc.collect()
            row = {"backend": name, "seq": seq, **live_at_peak(fn, inputs)}
            rows.append(row)
            print(f"{name:10s} S={seq:6d} held {row['held_before_call_bytes'] / 2**20:9.1f} MiB  "
                  f"peak above held {row['peak_above_held_bytes'] / 2**20:8.1f} MiB  "
                  f"({row['live_at_peak_count']} tensors live at the peak)")
            for t in row["live_at_peak"][:8]:
                print(f"    {t['bytes'] / 2**20:9.2f} MiB  {t['allocated_by']}")
        del fn
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": git_commit(),
            "model": f"{args.model}/{args.size}", "dtype": "bf16"}
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
