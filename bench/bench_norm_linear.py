"""Norm + linear on one GPU: q3n::norm_linear's designs against eager, Inductor and the linear alone.

Three sections, bf16, K = 4096, M (rows = batch * tokens) in {1, 16, 2048, 8192}:

- ``layernorm`` / ``rmsnorm``: the norm (LayerNorm with γ, β; RMSNorm with γ), then a linear
  4096 -> 12288 (no bias). Peers: eager (``F.layer_norm``/``F.rms_norm`` then ``F.linear``),
  Inductor (``torch.compile`` of that same function, default options: one compile reused across
  M, so M = 1 is a static graph and the others one dynamic-M graph, as a user gets it), and the
  linear alone (``F.linear``: cuBLAS, the goal's yardstick). q3n: the op as a compiled graph calls
  it (γ/β folded once beforehand, design chosen by ``DISPATCH``), and each design forced.
- ``swiglu``: RMSNorm, then gate/up (intermediate 11008) and ``silu(gate) * up``: eager (two
  linears), Inductor, the concatenated gate/up GEMM alone, and q3n's SiLU-gate epilogue.

Timing: ``triton.testing.do_bench`` median (L2 flushed before each call, warm-up first) of every
implementation in the same process, on random non-zero inputs; every implementation once per
round, the median of ROUNDS interleaved rounds kept (one config timed twice in a row moved by up
to 5% on the H200, so what is compared is timed alternately). At M <= 16 also CUDA-graph replays
(``*_graph_ms``: GPU time without Python) and the host time of one call (``*_host_us``: wall time
of back-to-back calls). There a call's host time exceeds its GPU time (a Python custom op against
cuBLAS's C++ call), and do_bench's numbers include it; the graph replays are the GPU comparison.

Sweep (default on; --no-sweep skips it): each design's launch parameters around its default --
"fused" block sizes/stages at M <= 64, "split" GEMM tiles/stages/TMA/persistent and the "cublas"
normalise kernel at M >= 2048 -- so one run says which design and config is fastest at each M
(at M <= 16 by CUDA-graph time). The last block printed is that recommendation, next to the
``DISPATCH`` table in use.

Every implementation is first checked against a float64 reference: error = max |y - exact| /
max(1, |exact|); q3n's must be <= 2 x eager's + a bf16 half-ulp (rows say ``ok``/``NO``).

    python bench/bench_norm_linear.py --out results/norm_linear-h200.json --commit abc1234
    python bench/bench_norm_linear.py --ms 1 16 --sections rmsnorm --no-sweep   # quick look
    TRITON_INTERPRET=1 python bench/bench_norm_linear.py --smoke   # CPU: the script's own check

Writes JSON (GPU, versions, commit, date, dispatch table, rows) to --out and prints a table.
Exits 1 if a correctness check failed (the timings are still written). About 3-4 minutes on an
H200 with the sweep (most of it Triton and Inductor compiles).
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from q3n_compile.compare import git_commit  # noqa: E402  (one definition for every result file)
from q3n_compile.kernels import norm_linear as NL  # noqa: E402

K = 4096
N = 12288
INTER = 11008
EPS = 1e-5
DTYPE = torch.bfloat16
DEVICE = "cuda"
SMOKE = False  # --smoke: tiny sizes on the CPU (Triton's interpreter), to test this script
ROUNDS = 3  # interleaved timing rounds of every implementation in a row (medians kept)
GRAPH_M = 16  # up to here rows (and the sweep) are also timed as CUDA-graph replays (--graph-until)
LARGE_M = 2048  # the sweep times "split"/"cublas" configs from here on, "fused" up to 64
SECTIONS = ("layernorm", "rmsnorm", "swiglu")
# Sweep candidates, as overrides of choose_config's default for the design.
# (A config equal to the design's default is not timed twice.)
FUSED_SWEEP = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
    (16, 256, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3),
    (128, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3)]
SPLIT_SWEEP = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, USE_TMA, PERSISTENT)
    (128, 256, 64, 8, 3, True, False), (128, 256, 64, 8, 4, True, False),
    (128, 256, 64, 8, 3, True, True), (128, 128, 64, 4, 4, True, False),
    (256, 128, 64, 8, 3, True, False), (128, 256, 64, 8, 4, True, True)]
# (STATS_BLOCK_M, STATS_BLOCK_K, STATS_WARPS)
CUBLAS_SWEEP = [(1, 4096, 8), (1, 4096, 4), (1, 2048, 8), (2, 4096, 8), (1, 4096, 16)]


def bench(fn, quick=False, graph=False):
    """Median ms of fn: do_bench, or with `graph` the replay of a CUDA graph of it (GPU time
    alone: at decode sizes a call's host time exceeds its GPU time and do_bench measures that)."""
    if SMOKE:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    if graph:
        return do_bench_cudagraph(fn, rep=50 if quick else 100, return_mode="median")
    return do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 100, return_mode="median")


def host_us(fn, calls=200):
    """Wall time of back-to-back calls: the host's cost while the GPU keeps up."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def num_sms():
    return NL._num_sms(torch.cuda.current_device()) if DEVICE == "cuda" else 132


def fold(weight, gamma, beta, kind):
    """W' = W·diag(γ), b' = W·β, rowsum(W'): what the norm_linear pass computes at compile time."""
    w64 = weight.double()
    w_folded = (w64 * gamma.double()[None, :]).to(weight.dtype)
    bias = (w64 @ beta.double()).float() if beta is not None else None
    rowsum = w_folded.float().sum(1) if kind == "layernorm" else None
    return w_folded, bias, rowsum


def rel_err(out, exact):
    return ((out.double() - exact).abs() / exact.abs().clamp_min(1.0)).max().item()


class Section:
    """Weights, the eager/Inductor peers and the op's arguments of one section (all M)."""

    def __init__(self, name, gen):
        self.name = name
        self.kind = "layernorm" if name == "layernorm" else "rmsnorm"
        self.epilogue = "silu_gate" if name == "swiglu" else "none"
        n_w = 2 * INTER if name == "swiglu" else N
        self.n_out = INTER if name == "swiglu" else N
        self.w = (torch.randn(n_w, K, generator=gen, device=DEVICE) / K ** 0.5).to(DTYPE)
        self.gamma = (1 + 0.1 * torch.randn(K, generator=gen, device=DEVICE)).to(DTYPE)
        self.beta = ((0.1 * torch.randn(K, generator=gen, device=DEVICE)).to(DTYPE)
                     if self.kind == "layernorm" else None)
        w, gamma, beta = self.w, self.gamma, self.beta
        if name == "layernorm":
            def eager(x):
                return F.linear(F.layer_norm(x, (K,), gamma, beta, EPS), w)
        elif name == "rmsnorm":
            def eager(x):
                return F.linear(F.rms_norm(x, (K,), gamma, EPS), w)
        else:
            wg, wu = w[:INTER], w[INTER:]

            def eager(x):
                h = F.rms_norm(x, (K,), gamma, EPS)
                return F.silu(F.linear(h, wg)) * F.linear(h, wu)
        self.eager = eager
        # (--smoke: a CPU Inductor compile would take longer than the rest; eager stands in)
        self.inductor = eager if SMOKE else torch.compile(eager)
        self.w_f, self.b_f, self.rs = fold(w, gamma, beta, self.kind)

    def args(self, x):
        return (x, self.w_f, self.b_f, self.rs, EPS, self.kind, None, self.epilogue, None)

    def exact(self, x):
        xd = x.double()
        if self.kind == "layernorm":
            xn = F.layer_norm(xd, (K,), self.gamma.double(), self.beta.double(), EPS)
        else:
            xn = F.rms_norm(xd, (K,), self.gamma.double(), EPS)
        y = xn @ self.w.double().t()
        if self.epilogue == "silu_gate":
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        return y


def variant(sec, x, design, **over):
    M = x.shape[0]
    cfg = dict(NL.choose_config(M, sec.n_out, K, DTYPE, sec.epilogue, design=design,
                                interpreter=SMOKE, num_sms=num_sms()), **over)
    args = sec.args(x)
    return (lambda: NL._launch(*args, config=cfg, interpreter=SMOKE)[0]), cfg


def sweep(sec, x, exact, eager_err, quick):
    M = x.shape[0]
    plans = []
    # Each swept design's default is timed again here, in the sweep's own timing: sweep timings
    # (shorter runs) came out up to 10% under the rows' interleaved rounds for the same config
    # (s7run3/s7run4), so a recommendation compares sweep entries only with each other.
    if M <= 64:
        plans.append(("fused", {}))
        for bn, bk, warps, stages in FUSED_SWEEP:
            plans.append(("fused", dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)))
    if M >= LARGE_M:
        plans += [("split", {}), ("cublas", {})]
        for bm, bn, bk, warps, stages, tma, persistent in SPLIT_SWEEP:
            if sec.epilogue == "silu_gate":
                bn = min(bn, 128)  # two accumulators
            plans.append(("split", dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                                        num_stages=stages, USE_TMA=tma, PERSISTENT=persistent)))
        for sbm, sbk, warps in CUBLAS_SWEEP:
            plans.append(("cublas", dict(STATS_BLOCK_M=sbm, STATS_BLOCK_K=sbk, STATS_WARPS=warps)))
    out = []
    for design, over in plans:
        entry = dict(design=design, **over)
        default = NL.choose_config(M, sec.n_out, K, DTYPE, sec.epilogue, design=design,
                                   interpreter=SMOKE, num_sms=num_sms())
        if over and all(default.get(k) == v for k, v in over.items()):
            continue
        entry["default"] = not over
        try:
            fn, _ = variant(sec, x, design, **over)
            err = rel_err(fn(), exact)
            entry["max_err"] = err
            entry["correct"] = err <= 2 * eager_err + 1.6e-2
            entry["ms"] = bench(fn, quick=True)
            if M <= GRAPH_M and not SMOKE:
                entry["graph_ms"] = bench(fn, quick=True, graph=True)
        except Exception as exc:  # e.g. out of shared memory for this config
            entry["error"] = str(exc).splitlines()[0][:200]
        out.append(entry)
    return out


def run_row(sec, M, gen, do_sweep):
    t0 = time.time()
    x = torch.randn(M, K, generator=gen, device=DEVICE).to(DTYPE)
    args = sec.args(x)

    def q3n():
        return torch.ops.q3n.norm_linear(*args)[0]

    def eager():
        return sec.eager(x)

    def inductor():
        return sec.inductor(x)

    def linear():
        return F.linear(x, sec.w)

    designs = {d: variant(sec, x, d) for d in NL.DESIGNS}
    auto = NL.choose_config(M, sec.n_out, K, DTYPE, sec.epilogue, interpreter=SMOKE,
                            num_sms=num_sms())
    row = dict(section=sec.name, kind=sec.kind, M=M, K=K, N=sec.w.shape[0], design=auto["design"],
               config=auto, design_configs={d: cfg for d, (_, cfg) in designs.items()})
    exact = sec.exact(x)
    outs = {"eager": eager(), "inductor": inductor(), "q3n": q3n(),
            **{f"q3n_{d}": fn() for d, (fn, _) in designs.items()}}
    eager_err = rel_err(outs["eager"], exact)
    row["correct"] = True
    for name, out in outs.items():
        err = rel_err(out, exact)
        row[f"{name}_max_err"] = err
        if name.startswith("q3n"):
            row["correct"] &= err <= 2 * eager_err + 1.6e-2
    del outs
    fns = {"q3n": q3n, "eager": eager, "inductor": inductor, "linear": linear,
           **{f"q3n_{d}": fn for d, (fn, _) in designs.items()}}
    # Every implementation once per round, ROUNDS rounds, the median kept: one config timed
    # twice in a row moved by up to 5% on the H200 (s7run2), so A and B are interleaved.
    rounds = {name: [] for name in fns}
    for _ in range(1 if SMOKE else ROUNDS):
        for name, fn in fns.items():
            rounds[name].append(bench(fn))
    for name, times in rounds.items():
        row[f"{name}_ms"] = statistics.median(times)
        row[f"{name}_ms_rounds"] = times
    if M <= GRAPH_M and not SMOKE:
        graphed = ("q3n", "q3n_fused", "linear", "eager", "inductor")
        for name in graphed:
            row[f"{name}_host_us"] = host_us(fns[name])
        for _ in range(ROUNDS):
            for name in graphed:
                try:
                    t = bench(fns[name], graph=True)
                except Exception as exc:  # capture can fail (e.g. an op that syncs)
                    row[f"{name}_graph_error"] = str(exc).splitlines()[0][:200]
                    continue
                row.setdefault(f"{name}_graph_ms_rounds", []).append(t)
        for name in graphed:
            if f"{name}_graph_ms_rounds" in row:
                row[f"{name}_graph_ms"] = statistics.median(row[f"{name}_graph_ms_rounds"])
    row["weight_TBps"] = sec.w.numel() * sec.w.element_size() / (row["q3n_ms"] * 1e-3) / 1e12
    row["tflops"] = 2 * M * sec.w.shape[0] * K / (row["q3n_ms"] * 1e-3) / 1e12
    if do_sweep:
        row["sweep"] = sweep(sec, x, exact, eager_err, quick=True)
    del exact
    row["seconds"] = time.time() - t0
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def best_of(row):
    """The fastest correct (design, ms, config) of a row: its designs' defaults and its sweep;
    by CUDA-graph time where the row has it for every design it timed, else by do_bench (a
    --graph-until past 16 rows graphs the dispatched op and "fused" only: comparing those by
    graph time with nothing else would name "fused" the best whatever its time)."""
    timed = [d for d in NL.DESIGNS if f"q3n_{d}_ms" in row]
    key = "graph_ms" if timed and all(f"q3n_{d}_graph_ms" in row for d in timed) else "ms"
    swept = [e for e in row.get("sweep", []) if key in e]
    if swept:  # one timing mode: the sweep's entries, the designs' defaults among them
        cands = [(e[key], e["design"], {k: v for k, v in e.items() if k not in (
            "design", "ms", "graph_ms", "max_err", "correct")}) for e in swept if e.get("correct")]
    else:
        cands = [(row[f"q3n_{d}_{key}"], d, {k: v for k, v in row["design_configs"][d].items()
                                              if k != "design"})
                 for d in NL.DESIGNS if f"q3n_{d}_{key}" in row
                 and row[f"q3n_{d}_max_err"] <= 2 * row["eager_max_err"] + 1.6e-2]
    return min(cands, key=lambda c: c[0]) if cands else (float("nan"), "-", {})


def main(argv=None):
    global K, N, INTER, DEVICE, SMOKE, LARGE_M, GRAPH_M
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    ap.add_argument("--commit", default=None,
                    help="the commit the tree was at (default: git, or Q3N_COMMIT)")
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 16, 2048, 8192])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--no-sweep", action="store_true", help="skip the launch-parameter sweep")
    ap.add_argument("--sweep-until", type=float, default=150.0, metavar="S",
                    help="sweep only in rows that start before S seconds (bounds the run time; "
                         "rows after it still time every design at its default)")
    ap.add_argument("--sweep-large-from", type=int, default=LARGE_M, metavar="M",
                    help=f"sweep the split and cublas designs from M rows (default {LARGE_M})")
    ap.add_argument("--graph-until", type=int, default=GRAPH_M, metavar="M",
                    help=f"also time rows up to M as CUDA-graph replays, and host time a call "
                         f"(default {GRAPH_M}; above, do_bench of Python calls includes the "
                         f"host's time, which exceeds the GPU's at a few hundred rows)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes on the CPU under TRITON_INTERPRET=1: checks this script")
    args = ap.parse_args(argv)
    if args.smoke:
        K, N, INTER, DEVICE, SMOKE, LARGE_M = 48, 80, 40, "cpu", True, 65
        if args.ms == ap.get_default("ms"):
            args.ms = [1, 70]
    elif not torch.cuda.is_available():
        sys.exit("bench_norm_linear.py needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
    else:
        LARGE_M = args.sweep_large_from
    GRAPH_M = args.graph_until
    if not SMOKE:  # (--smoke may run inside a test process: leave its settings alone)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch._dynamo.config.recompile_limit = 64
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    start = time.time()

    table = {sec: NL.dispatch_table(INTER if sec == "swiglu" else N, K, DTYPE,
                                    "silu_gate" if sec == "swiglu" else "none",
                                    ms=tuple(args.ms)) for sec in args.sections}
    print(f"DISPATCH = {NL.DISPATCH}")
    rows = []
    result = {
        "benchmark": "norm_linear",
        "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (--smoke)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": args.commit or git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": "bfloat16",
        "timing": f"triton.testing.do_bench median (warmup 25 ms, rep 100 ms; sweep 10/50), "
                  f"the median of {ROUNDS} interleaved rounds (*_ms_rounds); *_graph_ms: "
                  f"do_bench_cudagraph median, likewise; *_host_us: wall time per call",
        "inductor": "torch.compile(fn) with default options, one compile per section reused "
                    "across M (automatic dynamic shapes)",
        "dispatch": [list(d) for d in NL.DISPATCH],
        "dispatch_table": table,
        "rows": rows,
    }

    def write():  # after every row: a run cut short still leaves what it measured
        if args.out is not None:
            result["seconds"] = time.time() - start
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1, default=str))

    hdr = (f"{'section':>9} {'M':>5} {'auto':>6} {'q3n':>7} {'fused':>7} {'split':>7} "
           f"{'cublas':>7} {'eager':>7} {'induct':>7} {'linear':>7} {'q3n/lin':>7} "
           f"{'q3n/ind':>7} {'graph q3n/lin':>13} {'graph q3n/ind':>13} {'host us q3n/lin':>15}"
           f"  best            ok")
    print(hdr)
    for name in args.sections:
        sec = Section(name, gen)
        for M in args.ms:
            r = run_row(sec, M, gen, not args.no_sweep and time.time() - start < args.sweep_until)
            rows.append(r)
            best = best_of(r)
            r["best"] = dict(ms=best[0], design=best[1], config=best[2])
            g = (f"{r['q3n_graph_ms'] / r['linear_graph_ms']:.3f}"
                 if "q3n_graph_ms" in r and "linear_graph_ms" in r else "-")
            gi = (f"{r['q3n_graph_ms'] / r['inductor_graph_ms']:.3f}"
                 if "q3n_graph_ms" in r and "inductor_graph_ms" in r else "-")
            h = (f"{r['q3n_host_us']:.0f}/{r['linear_host_us']:.0f}"
                 if "q3n_host_us" in r else "-")
            print(f"{name:>9} {M:>5} {r['design']:>6} {r['q3n_ms']:7.4f} {r['q3n_fused_ms']:7.4f} "
                  f"{r['q3n_split_ms']:7.4f} {r['q3n_cublas_ms']:7.4f} {r['eager_ms']:7.4f} "
                  f"{r['inductor_ms']:7.4f} {r['linear_ms']:7.4f} "
                  f"{r['q3n_ms'] / r['linear_ms']:7.3f} {r['q3n_ms'] / r['inductor_ms']:7.3f} "
                  f"{g:>13} {gi:>13} {h:>15}  {best[1]:>6} {best[0]:7.4f}  "
                  f"{'ok' if r['correct'] else 'NO'}  ({r['seconds']:.0f}s)", flush=True)
            write()
        del sec
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    print("\nfastest correct design per M (its config; compare with DISPATCH and choose_config):")
    for r in rows:
        print(f"  {r['section']:>9} M={r['M']:<5} {r['best']['design']:>6} {r['best']['ms']:.4f} ms "
              f"(auto {r['design']} {r['q3n_ms']:.4f})  {r['best']['config']}")
    write()
    if args.out is not None:
        print(f"wrote {args.out}")
    print(f"total {time.time() - start:.0f} s")
    if not all(r["correct"] for r in rows):
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
