"""Host cost of a decode step without CUDA graphs: where q3n's time over Inductor's goes.

    python bench/bench_decode_overhead.py --out bench/results/decode-overhead-h200.json

Two parts, on one CUDA GPU:

1. **One op, layer by layer.** A decode-shaped ``q3n::attention`` call (B=1, 32 query heads,
   8 KV heads, one query row, 1025 keys, D=128, bf16) issued 300 times back to back, timed on
   the host (``time.perf_counter`` around the loop, synchronised after): through
   ``torch.ops.q3n.attention.default`` (what Inductor's generated code calls), the same below
   the autograd keys (what q3n's inference executor does), the Python impl directly, the launcher
   ``_launch``, and the cached kernel launch alone; next to SDPA and a no-op
   ``torch.library.custom_op`` (the dispatcher's floor). The GPU time of one call (CUDA-graph
   replay) says whether the loop was host-bound.
2. **Quantized linears, layer by layer** (``--qlinear``). ``q3n::qlinear`` at decode sizes
   (4096 x 4096, g128, 1 and 32 rows; W4A8, W6A12, W4A16) issued 300 times back to back, through
   the op below the autograd keys (q3n's executor), the Python impl, its pieces (``supports``,
   ``choose_path``, the activation quantization alone), next to bf16 ``F.linear``.
3. **Whole steps.** The built-in qwen3 "bench" model's single-token step after 1024 cached
   tokens, compiled by Inductor, q3n, and q3n with its attention rewrite off: ms per step over
   50 steps issued back to back (CUDA events), after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import q3n_compile  # noqa: E402,F401  (registers the backend and the ops)
from q3n_compile.compare import git_commit  # noqa: E402
from q3n_compile.kernels import attention as A  # noqa: E402


def host_us(fn, calls=300):
    """Host µs per call of ``calls`` back-to-back calls (after warm-up)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


def graph_us(fn):
    """GPU µs of one call (CUDA-graph replay, median of 200)."""
    from triton.testing import do_bench

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return do_bench(g.replay, warmup=20, rep=100, return_mode="median") * 1e3


@torch.library.custom_op("q3n_bench::noop", mutates_args=())
def _noop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)


def op_layers():
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, 1, 128, generator=g, device="cuda").bfloat16()
    k = torch.randn(1, 8, 1025, 128, generator=g, device="cuda").bfloat16()
    v = torch.randn(1, 8, 1025, 128, generator=g, device="cuda").bfloat16()
    op = torch.ops.q3n.attention.default
    op(q, k, v, None, None, False, False)
    plan = next(p for p in A._PLANS.values() if p.out_shape == (1, 32, 1, 128))
    out = torch.empty(plan.out_shape, dtype=q.dtype, device=q.device)

    def below_autograd():
        with torch._C._AutoDispatchBelowAutograd():
            op(q, k, v, None, None, False, False)

    rows = {
        "torch.ops.q3n.attention.default": lambda: op(q, k, v, None, None, False, False),
        "same, below autograd (q3n executor)": below_autograd,
        "_attention_impl (Python impl)": lambda: A._attention_impl(q, k, v),
        "_launch (plan lookup + empty + run)": lambda: A._launch(q, k, v, None, None, False,
                                                                 False),
        "plan.run (cached kernel launches)": lambda: plan.run(q, k, v, q, out),
        "F.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(
            q, k, v, enable_gqa=True),
        "no-op custom_op (dispatcher floor)": lambda: torch.ops.q3n_bench.noop(q, k, v),
        "torch.empty_like (allocator floor)": lambda: torch.empty_like(q),
    }
    result = []
    for name, fn in rows.items():
        r = dict(row=name, host_us=host_us(fn))
        try:
            r["gpu_us"] = graph_us(fn)
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            r["gpu_us"], r["graph_error"] = None, f"{type(exc).__name__}: {exc}"[:160]
        result.append(r)
        gpu = "-" if r["gpu_us"] is None else f"{r['gpu_us']:.1f}"
        print(f"  {name:40s} host {r['host_us']:7.1f} us/call   GPU {gpu} us", flush=True)
    return result


def qlinear_layers():
    from q3n_compile.kernels import packing as P
    from q3n_compile.kernels import qlinear as Q

    g = torch.Generator(device="cuda").manual_seed(1)
    N = K = 4096
    w = torch.randn(N, K, generator=g, device="cuda").bfloat16()
    fp8 = Q.fp8_supported(torch.device("cuda"))
    formats = {"W4A8": (4, "fp8" if fp8 else "int8"), "W6A12": (6, "int12"), "W4A16": (4, "none")}
    op = torch.ops.q3n.qlinear.default
    result = []
    for M in (1, 32):
        x = torch.randn(M, K, generator=g, device="cuda").bfloat16()
        rows = {f"F.linear bf16 (M={M})": lambda x=x: F.linear(x, w)}
        for name, (bits, act) in formats.items():
            codes = torch.randint(0, 1 << bits, (N, K), generator=g, device="cuda")
            scales = (torch.rand(K // 128, N, generator=g, device="cuda") * 0.02 + 0.002).half()
            pw = P.pack(codes, scales, None, bits, 128)
            args = (x, pw.qweight, pw.scales, None, None, None, bits, 128, K, act)

            def below(args=args):
                with torch._C._AutoDispatchBelowAutograd():
                    op(*args)

            tag = f"{name} M={M}"
            rows[f"{tag}: op below autograd (executor)"] = below
            rows[f"{tag}: _qlinear_impl"] = lambda args=args: Q._qlinear_impl(*args)
            rows[f"{tag}: supports"] = lambda args=args: Q.supports(*args)
            rows[f"{tag}: choose_path"] = lambda bits=bits, act=act, M=M: Q.choose_path(
                M, N, K, bits, 128, act, torch.bfloat16, x.device)
            if act != "none":
                cfg = Q.choose_path(M, N, K, bits, 128, act, torch.bfloat16, x.device)
                perm = cfg["path"] == "mmT" and bool(cfg.get("XPERM"))
                deq = cfg["path"] in ("mmT", "dequant")
                rows[f"{tag}: activation quantization ({cfg['path']})"] = (
                    lambda x=x, act=act, deq=deq, perm=perm: Q.quantize_activations_triton(
                        x, act, None, False, dequant=deq, perm128=perm))
        for name, fn in rows.items():
            r = dict(row=name, host_us=host_us(fn))
            if "supports" not in name and "choose_path" not in name:
                try:
                    r["gpu_us"] = graph_us(fn)
                except Exception as exc:  # noqa: BLE001 - reported, not hidden
                    r["gpu_us"], r["graph_error"] = None, f"{type(exc).__name__}: {exc}"[:160]
            result.append(r)
            gpu = "-" if r.get("gpu_us") is None else f"{r['gpu_us']:.1f}"
            print(f"  {name:55s} host {r['host_us']:7.1f} us/call   GPU {gpu} us", flush=True)
    return result


def whole_steps(steps=50):
    from q3n_compile.models import build_model, new_kv_cache

    model = build_model("qwen3", "bench", dtype=torch.bfloat16, device="cuda")
    context = 1024
    gen = torch.Generator(device="cpu").manual_seed(5)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=gen).cuda()
    variants = {
        "inductor": dict(backend="inductor"),
        "q3n": dict(backend="q3n"),
        "q3n, attention off": dict(backend="q3n", options={"attention": "off"}),
    }
    result = []
    for name, kw in variants.items():
        torch._dynamo.reset()
        cache = new_kv_cache(model, 1, context + 1)
        with torch.no_grad():
            logits = model(prompt, kv_cache=cache, cache_position=torch.arange(context,
                                                                                 device="cuda"))
        token = logits[:, -1:].argmax(-1)
        pos = torch.tensor([context], device="cuda")
        fn = torch.compile(model, dynamic=True, **kw)
        with torch.no_grad():
            for _ in range(5):
                fn(token, kv_cache=cache, cache_position=pos)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            for _ in range(steps):
                fn(token, kv_cache=cache, cache_position=pos)
            end.record()
            host_ms = (time.perf_counter() - t0) * 1e3 / steps
            torch.cuda.synchronize()
        r = dict(row=name, ms_per_step=start.elapsed_time(end) / steps, host_ms_per_step=host_ms)
        if name == "q3n":
            r.update(_diagnose(lambda: fn(token, kv_cache=cache, cache_position=pos), steps))
        result.append(r)
        print(f"  {name:22s} {r['ms_per_step']:.3f} ms/step (host issue {host_ms:.3f} ms)",
              flush=True)
    return result


def _diagnose(step, steps):
    """For q3n's step: does it synchronise with the GPU (set_sync_debug_mode raises where), and
    how much host time per step is spent inside q3n's attention launcher (``_launch``)."""
    import traceback

    out = {}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            step()
        out["sync"] = None
    except RuntimeError:
        out["sync"] = traceback.format_exc().splitlines()[-24:]
        print("  q3n step synchronises:\n    " + "\n    ".join(out["sync"]), flush=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    inner, spent, calls = A._launch, [0.0], [0]

    def timed_launch(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0
            calls[0] += 1

    A._launch = timed_launch
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                step()
        total = time.perf_counter() - t0
    finally:
        A._launch = inner
    torch.cuda.synchronize()
    out.update(launch_calls_per_step=calls[0] / steps, launch_us_per_step=spent[0] / steps * 1e6,
               host_us_per_step_instrumented=total / steps * 1e6)
    print(f"  q3n: {out['launch_calls_per_step']:.0f} attention launches per step, "
          f"{out['launch_us_per_step']:.0f} us/step inside _launch of "
          f"{out['host_us_per_step_instrumented']:.0f} us/step", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-steps", action="store_true", help="only the op-level parts")
    ap.add_argument("--qlinear", action="store_true",
                    help="the quantized linears' host cost (part 2) instead of attention's")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_decode_overhead.py needs CUDA")
    import triton

    if a.qlinear:
        print("quantized linear calls, 300 back to back:")
        ops = qlinear_layers()
    else:
        print("one decode attention call, 300 back to back:")
        ops = op_layers()
    steps = [] if a.no_steps else (print("qwen3 bench decode steps:") or whole_steps())
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(dict(
            gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
            commit=git_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
            op_layers=ops, steps=steps), indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
