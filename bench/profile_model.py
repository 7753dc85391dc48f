"""Where a compiled built-in model spends its time: one prefill (or decode step) under torch.profiler, per backend.

    python bench/profile_model.py --model qwen3 --size bench --seq-len 512 --backends q3n,inductor
    python bench/profile_model.py --model qwen3 --decode 1024 --backends q3n,inductor

``--decode CONTEXT`` profiles one single-token step with the built-in KV cache after a prompt of
CONTEXT tokens (prefilled eagerly), as ``q3n bench``'s decode phase runs it (no CUDA graphs).

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
from q3n_compile.compare import compiled, named_backend, parse_backend_set  # noqa: E402
from q3n_compile.models import build_model, example_inputs  # noqa: E402

from host_profile import python_per_call  # noqa: E402  (bench/, the script's folder)


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


def _decode_call(model, batch, context):
    """(step function of one token, its args): a cache holding an eager prefill of ``context``
    random tokens; every call writes the same position, so repeats see the same work."""
    from q3n_compile.models import new_kv_cache

    cache = new_kv_cache(model, batch, context + 1)
    gen = torch.Generator(device="cpu").manual_seed(5)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).cuda()
    with torch.no_grad():
        logits = model(prompt, kv_cache=cache, cache_position=torch.arange(context, device="cuda"))
    token = logits[:, -1:].argmax(-1)
    pos = torch.tensor([context], device="cuda")

    def step(fn):
        return lambda: fn(token, kv_cache=cache, cache_position=pos)
    return step


def profile(model, name, spec, args, top, decode=None):
    fn = compiled(model, spec, dynamic=True)
    if decode is not None:
        fn, args = decode(fn), ()
    with torch.no_grad():
        for _ in range(3):
            fn(*args)
        torch.cuda.synchronize()
        wall = _wall_ms(fn, args)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn(*args)
            torch.cuda.synchronize()
        # Host side, per Python function: where a host-bound call's time goes.
        host_top = python_per_call(lambda: fn(*args), 20, top)["tottime"]
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    by_gpu = sorted(events, key=lambda e: -e.self_device_time_total)[:top]
    by_cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {
        "backend": name, "wall_ms": wall, "gpu_ms": gpu_us / 1e3,
        "top_gpu": [(e.key, e.count, round(e.self_device_time_total / 1e3, 4)) for e in by_gpu],
        "top_cpu": [(e.key, e.count, round(e.self_cpu_time_total / 1e3, 4)) for e in by_cpu],
        "host_python_20_calls": host_top,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3")
    ap.add_argument("--size", default="bench")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--backends", default="eager,inductor,q3n,q3n+inductor")
    ap.add_argument("--decode", type=int, default=None, metavar="CONTEXT",
                    help="profile one decode step after CONTEXT cached tokens instead of a prefill")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=JSON",
                    help="an extra q3n backend NAME with these options (JSON), as q3n bench's "
                         "--q3n-set; name it in --backends")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_model.py needs CUDA")
    try:
        extra = dict(parse_backend_set(text) for text in a.set)
        specs = {name: named_backend(name, extra) for name in a.backends.split(",")}
    except ValueError as err:
        sys.exit(f"profile_model.py: {err}")
    model = build_model(a.model, a.size, dtype=torch.bfloat16, device="cuda")
    args = example_inputs(a.model, model, a.batch, a.seq_len)
    decode = None if a.decode is None else _decode_call(model, a.batch, a.decode)
    results = []
    for name, spec in specs.items():
        torch._dynamo.reset()
        r = profile(model, name, spec, args, a.top, decode)
        results.append(r)
        print(f"== {name}: wall {r['wall_ms']:.3f} ms, GPU busy {r['gpu_ms']:.3f} ms")
        for title, rows in (("GPU", r["top_gpu"]), ("CPU", r["top_cpu"])):
            print(f"  top by {title} time (name, calls, ms)")
            for key, count, ms in rows:
                print(f"    {ms:9.4f}  {count:5d}  {key[:90]}")
        print("  host Python a call over 20 calls, by own time (cProfile)")
        for line in r["host_python_20_calls"]:
            print("    " + line[:150])
    if a.out:
        import datetime

        import triton

        from q3n_compile.compare import git_commit

        a.out.write_text(json.dumps({"model": a.model, "size": a.size, "seq_len": a.seq_len,
                                     "batch": a.batch, "backend_sets": extra,
                                     "decode_context": a.decode,
                                     "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                     "triton": triton.__version__, "commit": git_commit(),
                                     "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                                     "results": results}, indent=1))


if __name__ == "__main__":
    main()
