"""Where a compiled built-in model spends its time: one prefill under torch.profiler, per backend.

    python bench/profile_model.py --model qwen3 --size bench --seq-len 512 --backends q3n,inductor

For each backend: the wall time of one warm call (CUDA events), the GPU time summed over kernels,
and the top kernels/ops by GPU time and by CPU time. The gap between wall and GPU time is launch
and Python overhead. Writes the tables as text (and JSON with --out). Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import q3n_compile  # noqa: E402,F401  (registers the backend)
from q3n_compile.compare import BACKEND_SETS  # noqa: E402
from q3n_compile.models import build_model, example_inputs  # noqa: E402


def _compile(model, name):
    if name == "eager":
        return model
    spec = BACKEND_SETS[name]
    return torch.compile(model, backend=spec["backend"], mode=spec.get("mode"),
                         options=spec.get("options") or None, dynamic=True)


def _wall_ms(fn, args, reps=10):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def profile(model, name, args, top):
    fn = _compile(model, name)
    with torch.no_grad():
        for _ in range(3):
            fn(*args)
        torch.cuda.synchronize()
        wall = _wall_ms(fn, args)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn(*args)
            torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    by_gpu = sorted(events, key=lambda e: -e.self_device_time_total)[:top]
    by_cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {
        "backend": name, "wall_ms": wall, "gpu_ms": gpu_us / 1e3,
        "top_gpu": [(e.key, e.count, round(e.self_device_time_total / 1e3, 4)) for e in by_gpu],
        "top_cpu": [(e.key, e.count, round(e.self_cpu_time_total / 1e3, 4)) for e in by_cpu],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3")
    ap.add_argument("--size", default="bench")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--backends", default="eager,inductor,q3n,q3n+inductor")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_model.py needs CUDA")
    model = build_model(a.model, a.size, dtype=torch.bfloat16, device="cuda")
    args = example_inputs(a.model, model, a.batch, a.seq_len)
    results = []
    for name in a.backends.split(","):
        torch._dynamo.reset()
        r = profile(model, name, args, a.top)
        results.append(r)
        print(f"== {name}: wall {r['wall_ms']:.3f} ms, GPU busy {r['gpu_ms']:.3f} ms")
        for title, rows in (("GPU", r["top_gpu"]), ("CPU", r["top_cpu"])):
            print(f"  top by {title} time (name, calls, ms)")
            for key, count, ms in rows:
                print(f"    {ms:9.4f}  {count:5d}  {key[:90]}")
    if a.out:
        import datetime

        import triton

        from q3n_compile.compare import git_commit

        a.out.write_text(json.dumps({"model": a.model, "size": a.size, "seq_len": a.seq_len,
                                     "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                     "triton": triton.__version__, "commit": git_commit(),
                                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                                     "results": results}, indent=1))


if __name__ == "__main__":
    main()
