"""Norm + linear on one GPU: q3n::norm_linear against eager, Inductor and the linear alone.

Two sections, bf16, K = 4096, M (rows = batch * tokens) in {1, 16, 2048, 8192}:

- ``norm_linear``: LayerNorm (γ, β) and RMSNorm (γ), then a linear 4096 -> 12288 (no bias):
  eager (``F.layer_norm``/``F.rms_norm`` then ``F.linear``), Inductor (``torch.compile`` of the same
  function), the linear alone (``F.linear``, cuBLAS) and q3n (the op as the compiled graph calls
  it, with γ/β folded once beforehand), plus each of the kernel's two designs launched directly
  ("fused": one launch, statistics in the GEMM's K loop; "split": statistics kernel + GEMM).
- ``swiglu``: RMSNorm, then gate/up (intermediate 11008) and ``silu(gate) * up``: eager (two
  linears, and one concatenated gate/up linear + chunk), Inductor, the concatenated gate/up GEMM
  alone, and q3n's SiLU-gate epilogue (one launch), with both designs.

At M <= 16 the q3n op, eager and the linear alone are also timed as CUDA-graph replays
(``*_cudagraph_ms``, triton.testing.do_bench_cudagraph): there the kernels are as short as the
Python that launches them, and the replay shows the GPU time alone.

Every shape is first checked against a float64 reference (max abs error of q3n, of each design and
of eager; q3n must be no farther than 2x eager + a bf16 half-ulp), then every implementation is
timed in the same process with triton.testing.do_bench (median, after warm-up).

    python bench/bench_norm_linear.py --out bench/results/norm_linear-h200.json
    python bench/bench_norm_linear.py --ms 1 16 --sweep     # also time a few block configs

Writes JSON (GPU, versions, git commit, date, rows) to --out and prints a table. Exits 1 if a
correctness check failed (the timings are still written).
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from q3n_compile.kernels import norm_linear as NL  # noqa: E402

K = 4096
N = 12288
INTER = 11008
EPS = 1e-5
DTYPE = torch.bfloat16
DEVICE = "cuda"
# Candidates for --sweep: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
SWEEP = {
    "small": [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 32, 256, 4, 3), (16, 64, 64, 4, 5),
              (16, 128, 64, 4, 4), (16, 16, 256, 4, 4)],
    "large": [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4),
              (128, 64, 64, 4, 4), (256, 128, 64, 8, 3), (128, 256, 32, 8, 4)],
}


from q3n_compile.compare import git_commit  # noqa: E402  (one definition for every result file)


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_graphs(row, fns):
    """At decode sizes the kernels take tens of microseconds, about what Python spends launching
    them; replaying a CUDA graph times the GPU work alone (what mode="reduce-overhead" gets)."""
    if DEVICE != "cuda" or row["M"] > 16:
        return
    for name, fn in fns.items():
        try:
            row[f"{name}_cudagraph_ms"] = do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception as exc:  # capture can fail (e.g. an op that syncs)
            row[f"{name}_cudagraph_error"] = str(exc).splitlines()[0][:200]


def fold(weight, gamma, beta, kind):
    """W' = W·diag(γ), b' = W·β, rowsum(W') -- what the norm_linear pass computes at compile time."""
    w64 = weight.double()
    w_folded = (w64 * gamma.double()[None, :]).to(weight.dtype)
    bias = (w64 @ beta.double()).float() if beta is not None else None
    rowsum = w_folded.float().sum(1) if kind == "layernorm" else None
    return w_folded, bias, rowsum


def max_err(outs, exact):
    return max((o.double() - e).abs().max().item() for o, e in zip(outs, exact))


def launch(args, M, n_cols, epilogue, design, blocks=None):
    cfg = dict(NL.choose_config(M, n_cols, K, DTYPE, epilogue), design=design)
    if blocks is not None:
        bm, bn, bk, w, s = blocks
        cfg.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s)
    return lambda: NL._launch(*args, config=cfg, interpreter=DEVICE == "cpu")


def check(row, outs_by_name, exact, eager_name):
    """Errors against float64; q3n and both designs must be no farther than 2x eager + slack."""
    eager_err = max_err(outs_by_name[eager_name], exact)
    row[f"{eager_name}_max_err"] = eager_err
    ok = True
    for name, outs in outs_by_name.items():
        if name == eager_name:
            continue
        err = max_err(outs, exact)
        row[f"{name}_max_err"] = err
        ok &= err <= 2 * eager_err + 1.6e-2
    row["correct"] = ok
    return ok


def run_norm_linear(kind, M, gen, sweep):
    x = torch.randn(M, K, generator=gen, device=DEVICE).to(DTYPE)
    w = (torch.randn(N, K, generator=gen, device=DEVICE) / K ** 0.5).to(DTYPE)
    gamma = (1 + 0.1 * torch.randn(K, generator=gen, device=DEVICE)).to(DTYPE)
    beta = (0.1 * torch.randn(K, generator=gen, device=DEVICE)).to(DTYPE) if kind == "layernorm" else None

    if kind == "layernorm":
        def eager():
            return F.linear(F.layer_norm(x, (K,), gamma, beta, EPS), w)
    else:
        def eager():
            return F.linear(F.rms_norm(x, (K,), gamma, EPS), w)
    inductor = torch.compile(eager, dynamic=False)
    w_f, b_f, rs = fold(w, gamma, beta, kind)
    args = (x, w_f, b_f, rs, EPS, kind, None, "none", None)

    def q3n():
        return torch.ops.q3n.norm_linear(*args)

    designs = {d: launch(args, M, N, "none", d) for d in NL.DESIGNS}
    row = dict(section="norm_linear", kind=kind, M=M, K=K, N=N,
               design=NL.choose_config(M, N, K, DTYPE)["design"],
               blocks={k: v for k, v in NL.choose_config(M, N, K, DTYPE).items() if k != "design"})
    # Exact: the norm (with its affine) in float64, then the linear.
    xd = x.double()
    if kind == "layernorm":
        xn = F.layer_norm(xd, (K,), gamma.double(), beta.double(), EPS)
    else:
        xn = F.rms_norm(xd, (K,), gamma.double(), EPS)
    exact = [xn @ w.double().t()]
    del xd
    del xn
    check(row, {"eager": [eager()], "inductor": [inductor()], "q3n": q3n(),
                **{f"q3n_{d}": fn() for d, fn in designs.items()}}, exact, "eager")
    del exact
    row["q3n_ms"] = bench(q3n)
    for d, fn in designs.items():
        row[f"q3n_{d}_ms"] = bench(fn)
    row["eager_ms"] = bench(eager)
    row["inductor_ms"] = bench(inductor)
    row["linear_ms"] = bench(lambda: F.linear(x, w))
    bench_graphs(row, {"q3n": q3n, "eager": eager, "linear": lambda: F.linear(x, w)})
    row["weight_TBps"] = w.numel() * w.element_size() / (row["q3n_ms"] * 1e-3) / 1e12
    if sweep:
        row["sweep"] = sweep_configs(args, M, N, "none")
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def run_swiglu(M, gen, sweep):
    x = torch.randn(M, K, generator=gen, device=DEVICE).to(DTYPE)
    wg = (torch.randn(INTER, K, generator=gen, device=DEVICE) / K ** 0.5).to(DTYPE)
    wu = (torch.randn(INTER, K, generator=gen, device=DEVICE) / K ** 0.5).to(DTYPE)
    w_cat = torch.cat([wg, wu])
    gamma = (1 + 0.1 * torch.randn(K, generator=gen, device=DEVICE)).to(DTYPE)

    def eager():
        h = F.rms_norm(x, (K,), gamma, EPS)
        return F.silu(F.linear(h, wg)) * F.linear(h, wu)

    def eager_concat():
        gate, up = F.linear(F.rms_norm(x, (K,), gamma, EPS), w_cat).chunk(2, dim=-1)
        return F.silu(gate) * up

    inductor = torch.compile(eager, dynamic=False)
    w_f, _, _ = fold(w_cat, gamma, None, "rmsnorm")
    args = (x, w_f, None, None, EPS, "rmsnorm", None, "silu_gate", None)

    def q3n():
        return torch.ops.q3n.norm_linear(*args)

    designs = {d: launch(args, M, INTER, "silu_gate", d) for d in NL.DESIGNS}
    cfg = NL.choose_config(M, INTER, K, DTYPE, "silu_gate")
    row = dict(section="swiglu", kind="rmsnorm", M=M, K=K, N=2 * INTER, design=cfg["design"],
               blocks={k: v for k, v in cfg.items() if k != "design"})
    exact = NL.reference(x.double(), (w_cat.double() * gamma.double()[None, :]), None, None, EPS,
                         "rmsnorm", None, "silu_gate")
    check(row, {"eager": [eager()], "eager_concat": [eager_concat()], "inductor": [inductor()],
                "q3n": q3n(), **{f"q3n_{d}": fn() for d, fn in designs.items()}}, exact, "eager")
    del exact
    row["q3n_ms"] = bench(q3n)
    for d, fn in designs.items():
        row[f"q3n_{d}_ms"] = bench(fn)
    row["eager_ms"] = bench(eager)
    row["eager_concat_ms"] = bench(eager_concat)
    row["inductor_ms"] = bench(inductor)
    row["linear_ms"] = bench(lambda: F.linear(x, w_cat))  # the gate/up GEMM alone
    bench_graphs(row, {"q3n": q3n, "eager": eager_concat, "linear": lambda: F.linear(x, w_cat)})
    row["weight_TBps"] = w_cat.numel() * w_cat.element_size() / (row["q3n_ms"] * 1e-3) / 1e12
    if sweep:
        row["sweep"] = sweep_configs(args, M, INTER, "silu_gate")
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def sweep_configs(args, M, n_cols, epilogue):
    out = []
    for blocks in SWEEP["small" if M <= 64 else "large"]:
        if epilogue == "silu_gate" and blocks[1] > 128:
            continue
        for design in NL.DESIGNS:
            fn = launch(args, M, n_cols, epilogue, design, blocks)
            entry = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), blocks),
                         design=design)
            try:
                fn()
                entry["ms"] = bench(fn)
            except Exception as exc:  # e.g. out of shared memory for this config
                entry["error"] = str(exc).splitlines()[0][:200]
            out.append(entry)
    return out


def graph_ratio(r):
    q, lin = r.get("q3n_cudagraph_ms"), r.get("linear_cudagraph_ms")
    return "-" if q is None or lin is None else f"{q / lin:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 16, 2048, 8192])
    ap.add_argument("--kinds", nargs="+", default=["layernorm", "rmsnorm"], choices=NL.KINDS)
    ap.add_argument("--no-swiglu", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time the SWEEP block configs")
    args = ap.parse_args()
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_norm_linear.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    # Each shape compiles the Inductor peers anew (dynamic=False); keep Dynamo from giving up.
    torch._dynamo.config.recompile_limit = 64
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    rows = []
    fmt = lambda v: "    -  " if v is None else f"{v:7.4f}"  # noqa: E731
    print(f"{'section':>11} {'kind':>9} {'M':>5} {'design':>6} {'q3n':>7} {'fused':>7} {'split':>7} "
          f"{'eager':>7} {'induct':>7} {'linear':>7}  q3n/lin q3n/ind graph:q3n/lin  err(q3n/eager)  ok")
    todo = [("norm_linear", kind, M) for kind in args.kinds for M in args.ms]
    if not args.no_swiglu:
        todo += [("swiglu", "rmsnorm", M) for M in args.ms]
    for section, kind, M in todo:
        if section == "norm_linear":
            r = run_norm_linear(kind, M, gen, args.sweep)
        else:
            r = run_swiglu(M, gen, args.sweep)
        rows.append(r)
        print(f"{section:>11} {kind:>9} {M:>5} {r['design']:>6} {fmt(r['q3n_ms'])} "
              f"{fmt(r['q3n_fused_ms'])} {fmt(r['q3n_split_ms'])} {fmt(r['eager_ms'])} "
              f"{fmt(r['inductor_ms'])} {fmt(r['linear_ms'])}  {r['q3n_ms'] / r['linear_ms']:7.3f} "
              f"{r['q3n_ms'] / r['inductor_ms']:7.3f} {graph_ratio(r):>13}  "
              f"{r['q3n_max_err']:.1e}/{r['eager_max_err']:.1e}"
              f"  {'yes' if r['correct'] else 'NO'}", flush=True)
    result = {
        "benchmark": "norm_linear",
        "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": "bfloat16",
        "timing": "triton.testing.do_bench median, warmup 25 ms, rep 100 ms",
        "rows": rows,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    if not all(r["correct"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
