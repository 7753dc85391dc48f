"""Decode step by step: each step's latency, host time and GPU kernels, per backend.

    python bench/decode_steps.py --batch 1 --backends q3n+cudagraphs \
        --set 'quant+cudagraphs={"quant_config": "design", "cuda_graphs": true}'

``q3n bench`` reports a decode step's median and spread; this shows the steps themselves, to
tell a steady slowdown from one that comes and goes. Like ``q3n bench``'s decode phase: the
built-in model with its KV cache after an eager prefill of ``--context`` random tokens,
compiled with ``dynamic=True``, one token a step at increasing positions (position tensors made
up front), 3 warm-up steps. Per step: the CUDA-event time around the call (what ``q3n bench``
reports), and the host time of the call alone (no synchronisation: if it is near the event
time, the step is host-bound). Then ``--profile`` steps under torch.profiler: kernels per step,
GPU time per step, CUDA-graph launches, and the top kernels; and as many under cProfile: the
host's Python functions by own time. ``"quant_config": "design"`` stands
for the design's config (``q3n_compile.compare.QUANT_CONFIG``). ``--device cpu`` is a smoke run
(no GPU kernels to count).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import q3n_compile  # noqa: E402,F401  (registers the backend)
from q3n_compile.compare import (QUANT_CONFIG, compiled, git_commit, named_backend,  # noqa: E402
                                 parse_backend_set)
from q3n_compile.models import build_model, new_kv_cache  # noqa: E402

from host_profile import python_per_call  # noqa: E402  (bench/, the script's folder)


class _Clock:
    """Step timer: CUDA events on a GPU (what ``q3n bench`` records), perf_counter on a CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def _host_ops(prof, n: int, top: int) -> list[str]:
    """torch.profiler's host-side events (ATen ops, CUDA runtime calls such as cudaGraphLaunch)
    by self CPU time, µs a step."""
    rows = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    rows.sort(key=lambda e: -e.self_cpu_time_total)
    return [f"{e.self_cpu_time_total / n:8.1f} us self {e.cpu_time_total / n:8.1f} us total "
            f"{e.count / n:6.1f} calls  {e.key[:90]}" for e in rows[:top]]


class _GcLog:
    """Python garbage collections while timed steps run: (step, generation, ms)."""

    def __init__(self):
        self.step = -1
        self.events: list[tuple[int, int, float]] = []
        self._t0 = 0.0

    def __call__(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.events.append((self.step, info["generation"],
                                round((time.perf_counter() - self._t0) * 1e3, 3)))

    def __enter__(self):
        import gc

        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc):
        import gc

        gc.callbacks.remove(self)


def run_backend(model, name, spec, batch, context, steps, profile_steps, top, device):
    fn = compiled(model, spec, dynamic=True)
    max_len = context + 5 + steps + 2 * profile_steps
    cache = new_kv_cache(model, batch, max_len)
    positions = [torch.tensor([p], device=device) for p in range(max_len)]
    clock = _Clock(device)
    gen = torch.Generator(device="cpu").manual_seed(1234 + batch)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)
    with torch.no_grad():
        logits = model(prompt, kv_cache=cache, cache_position=torch.arange(context, device=device))
        token = logits[:, -1:].argmax(-1)
        pos = context
        t0 = time.perf_counter()
        token = fn(token, kv_cache=cache, cache_position=positions[pos]).argmax(-1)
        clock.sync()
        compile_s = time.perf_counter() - t0
        pos += 1
        for _ in range(3):
            token = fn(token, kv_cache=cache, cache_position=positions[pos]).argmax(-1)
            pos += 1
        clock.sync()
        events, host = [], []
        with _GcLog() as gc_log:
            for i in range(steps):
                gc_log.step = i
                start = clock.mark()
                h0 = time.perf_counter()
                out = fn(token, kv_cache=cache, cache_position=positions[pos])
                host.append((time.perf_counter() - h0) * 1e3)
                events.append((start, clock.mark()))
                token = out.argmax(-1)
                pos += 1
        clock.sync()
        step_ms = [clock.ms(s, e) for s, e in events]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(profile_steps):
                token = fn(token, kv_cache=cache, cache_position=positions[pos]).argmax(-1)
                pos += 1
            clock.sync()
        state = {"token": token, "pos": pos}

        def one_step():
            out = fn(state["token"], kv_cache=cache, cache_position=positions[state["pos"]])
            state["token"] = out.argmax(-1)
            state["pos"] += 1
        host_top = python_per_call(one_step, profile_steps, top)
        clock.sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    graph_launches = sum(1 for e in prof.events() if e.name == "cudaGraphLaunch")
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time_total / 1e3)
    top_kernels = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    srt = sorted(step_ms)
    from torch._dynamo.utils import counters

    graph_counters = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
    return {
        "cudagraph_counters": graph_counters,
        "backend": name, "spec": spec, "batch": batch, "context": context,
        "compile_s": round(compile_s, 2),
        "step_ms": [round(t, 4) for t in step_ms],
        "host_ms": [round(t, 4) for t in host],
        "median_ms": srt[len(srt) // 2], "min_ms": srt[0], "max_ms": srt[-1],
        "host_median_ms": sorted(host)[len(host) // 2],
        "profile_steps": profile_steps,
        "kernels_per_step": len(kernels) / profile_steps,
        "gpu_ms_per_step": sum(e.device_time_total for e in kernels) / 1e3 / profile_steps,
        "graph_launches_per_step": graph_launches / profile_steps,
        "host_top": host_top,
        "host_ops": _host_ops(prof, profile_steps, top),
        "gc_collections": gc_log.events,
        "top_kernels": [(k, len(v) / profile_steps, round(sum(v) / profile_steps, 4))
                        for k, v in top_kernels],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3")
    ap.add_argument("--size", default="bench")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--profile", type=int, default=4, metavar="STEPS")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--backends", default="q3n+cudagraphs")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=JSON",
                    help='an extra q3n backend NAME with these options (JSON); "quant_config": '
                         '"design" stands for the design\'s config')
    ap.add_argument("--specialize-float", action="store_true",
                    help="compile every backend with torch._dynamo.config.specialize_float=True: "
                         "the model's float attributes become constants instead of 0-d tensors "
                         "Dynamo makes on every call (the report's runtime.float_inputs)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu (a smoke run: no GPU kernels)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("decode_steps.py: no CUDA device; --device cpu runs it on the CPU")
    try:
        extra = dict(parse_backend_set(text) for text in a.set)
        specs = {name: named_backend(name, extra) for name in a.backends.split(",")}
    except ValueError as err:
        sys.exit(f"decode_steps.py: {err}")
    for spec in extra.values():
        if spec["options"].get("quant_config") == "design":
            spec["options"]["quant_config"] = QUANT_CONFIG
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model = build_model(a.model, a.size, dtype=dtype, device=a.device)
    results = []
    for name, spec in specs.items():
        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        counters.clear()
        with torch._dynamo.config.patch(specialize_float=a.specialize_float):
            r = run_backend(model, name, spec, a.batch, a.context, a.steps, a.profile, a.top,
                            a.device)
        r["specialize_float"] = a.specialize_float
        results.append(r)
        print(f"== {name}, batch {a.batch}{', specialize_float' if a.specialize_float else ''}: compile {r['compile_s']} s; step ms median "
              f"{r['median_ms']:.3f}, min {r['min_ms']:.3f}, max {r['max_ms']:.3f}; host median "
              f"{r['host_median_ms']:.3f}; per profiled step: {r['kernels_per_step']:.0f} kernels, "
              f"GPU {r['gpu_ms_per_step']:.3f} ms, {r['graph_launches_per_step']:.1f} graph launches")
        if r["cudagraph_counters"]:
            print("  Inductor's CUDA-graph counters:", r["cudagraph_counters"])
        print("  steps (ms):", " ".join(f"{t:.3f}" for t in r["step_ms"]))
        print("  host  (ms):", " ".join(f"{t:.3f}" for t in r["host_ms"]))
        for key, count, ms in r["top_kernels"]:
            print(f"    {ms:8.4f} ms  {count:5.1f}x  {key[:100]}")
        print(f"  Python GCs in the timed steps (step, generation, ms): {r['gc_collections']}")
        print("  host ops a profiled step (torch.profiler, by self CPU time)")
        for line in r["host_ops"]:
            print("    " + line)
        for key, lines in r["host_top"].items():
            print(f"  host Python a step over {a.profile} steps, by {key} (cProfile)")
            for line in lines:
                print("    " + line[:170])
    if a.out:
        import triton

        a.out.write_text(json.dumps({
            "model": a.model, "size": a.size, "device": a.device,
            "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
            "torch": torch.__version__, "triton": triton.__version__, "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "results": results},
            indent=1))


if __name__ == "__main__":
    main()
