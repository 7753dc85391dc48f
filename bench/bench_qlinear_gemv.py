"""The single-plane GEMV (q3n::qlinear's gemv1p path) on one GPU, quick: against the old GEMV,
the dispatched path, bf16 F.linear (cuBLAS) and torch's int4 kernel, with gemv1p's config sweep.

Shapes: M in {1, 16} x (N, K) in {(4096, 4096), (28672, 8192), (12288, 4096), (4096, 12288)}.
Formats: W4A16 g128 with zero points (the issue's), W8A16 per channel, symmetric, W6A16 g128 with
zero points (two bit planes) and W2A16 g64 with zero points (``--formats``). Rows:
- ``bf16`` (F.linear) and ``int4_torch`` (aten._weight_int4pack_mm, group 128; see
  bench_qlinear.py) on the same bf16 activations;
- per format: ``dispatch`` (what torch.ops.q3n.qlinear runs: gemv1p at M = 1, the swapped tile
  from 2 rows), ``gemv_old`` (the word-per-plane GEMV with its split rule: what M = 1 ran
  before gemv1p), ``gemv1p`` (:func:`gemv1p_config`'s default), ``gemv1p_magic`` /
  ``gemv1p_denorm`` (the same launch with the other unpack than :func:`qlinear.gemv1p_denorm`
  picks: the magic float, DENORM 0, for 4-bit weights; the denormal one for 8- and 2-bit
  weights); from 2 rows :func:`few_rows_candidates`; then the sweep: every
  :data:`GEMV1P_SWEEP` entry, fixed K splits of the default tile, and at M = 16 rows per
  program (BLOCK_M) 2, 4, 8, 16.

Every launch is first checked against a float32 reference of its own packed weights (max |error|
relative to max |reference| <= 2e-2: bf16 output rounding), then timed as a CUDA-graph replay with
bench_qlinear.py's ``timed`` (triton.testing.do_bench median, L2 flushed between repetitions).
TB/s counts the weight bytes read: packed codes + scales + zero points (bf16: 2 per weight).
The essentials (baselines, dispatch, old GEMV, gemv1p default) run first for every shape, the
sweep after, and the sweep stops at ``--budget-s`` seconds from the start (default 150, so that
the run fits in 3 minutes on an H200 with an empty Triton cache); what it skipped is listed in
the JSON.

    python bench/bench_qlinear_gemv.py --out bench/results/qlinear-gemv1p-h200.json

``--cpu-check`` runs the same flow on the CPU (Triton interpreter, sizes given by ``--nk``/``--ms``,
no timing): a check of this script, not of the kernels' speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_qlinear as BQ  # noqa: E402  (timed, rel_err, random_packed, int4_torch)
from q3n_compile.kernels import packing as P  # noqa: E402
from q3n_compile.kernels import qlinear as Q  # noqa: E402

MS = (1, 16)
NKS = ((4096, 4096), (28672, 8192), (12288, 4096), (4096, 12288))
# name -> (bits, group, symmetric)
FORMATS = {"w4a16_g128": (4, 128, False), "w8a16_pc": (8, -1, True),
           "w6a16_g128": (6, 128, False), "w2a16_g64": (2, 64, False)}
TOL = BQ.TOL
CPU_CHECK = False  # --cpu-check: interpreter launches, no timing


def random_packed(gen, N, K, bits, group, sym, device):
    """bench_qlinear.random_packed on any device."""
    codes = torch.randint(0, 1 << bits, (N, K), generator=gen, device=device, dtype=torch.int64)
    ng = 1 if group == -1 else K // group
    scales = (torch.rand(ng, N, generator=gen, device=device) * 0.02 + 0.002).half()
    zeros = None if sym else torch.randint(0, 1 << bits, (ng, N), generator=gen,
                                           device=device).to(torch.uint8)
    return P.pack(codes, scales, zeros, bits, group)


def launch(args_, cfg):
    return lambda: Q._launch(*args_, interpreter=CPU_CHECK, path=cfg)


def old_gemv(M, N, K, group, sms):
    """The word-per-plane GEMV as the dispatch launched it at M = 1 before gemv1p."""
    bk = Q._k_block(group, 128)
    split = Q._gemv_split(M * triton.cdiv(N, 64), P.padded_k(K), bk, sms)
    return dict(path="gemv", BLOCK_N=64, BLOCK_K=bk, SPLIT_K=split, num_warps=4, num_stages=2)


def sweep_configs(M, N, K, group, sms, full, grid=False, bits=4):
    """(label, cfg) of the gemv1p sweep at M rows (`full`: every sweep entry; else a short one;
    `grid`, at M = 1: only the grid of K splits 1-16 x PREFETCH 1, 2 x 64/128 columns, to fit
    a split rule). The short sweep keeps the column sub-tile entries (SUBS > 1); for 8-bit
    weights those are also timed with the denormal unpack."""
    out = []
    if grid and M == 1:
        for bn, warps in ((128, 8), (64, 4)):
            for pf in (1, 2):
                for split in (1, 2, 4, 8, 16):
                    base = dict(Q.GEMV1P_DEFAULT, BLOCK_N=bn, num_warps=warps, PREFETCH=pf,
                                SPLIT_K=split)
                    out.append((f"n{bn}pf{pf}s{split}",
                                Q.gemv1p_config(M, N, K, group, sms=sms, base=base,
                                                bits=bits)))
        return out
    subs_entries = [(i, b) for i, b in enumerate(Q.GEMV1P_SWEEP) if b.get("SUBS", 1) > 1]
    bases = (list(enumerate(Q.GEMV1P_SWEEP)) if full
             else list(enumerate(Q.GEMV1P_SWEEP[:4])) + subs_entries)
    if M == 1:
        for i, base in bases:
            out.append((f"sweep{i}", Q.gemv1p_config(M, N, K, group, sms=sms, base=base,
                                                      bits=bits)))
            if bits == 8 and base.get("SUBS", 1) > 1:  # 8-bit's default unpack is the magic one
                out.append((f"sweep{i}_denorm", dict(out[-1][1], DENORM=1)))
        default = Q.gemv1p_config(M, N, K, group, sms=sms, bits=bits)
        for split in (1, 2, 4, 8, 16) if full else (1, 4):
            if split != default["SPLIT_K"]:
                out.append((f"split{split}", dict(default, SPLIT_K=split)))
    else:
        for bm in (2, 4, 8, 16) if full else (4, 16):
            for warps in (8, 16):
                base = dict(Q.GEMV1P_DEFAULT, BLOCK_M=bm, num_warps=warps)
                out.append((f"bm{bm}w{warps}", Q.gemv1p_config(M, N, K, group, sms=sms,
                                                                base=base, bits=bits)))
    return out


def few_rows_candidates(M, N, K, bits, group, sms, dev):
    """At 2-16 rows, beside the dispatched launch: the swapped tile as the dispatch gives it
    at 3 rows (``mmT_3rows``, rows past M masked), the one-row GEMV tile run once per row
    (``gemv1p_bm1``: BLOCK_M 1, M row programs, each reading the whole weight), and the M-row
    GEMV with 4 and 8 warps (the default doubles them to 16 at 2 rows)."""
    out = []
    mmt = Q.choose_path(3, N, K, bits, group, "none", torch.bfloat16, dev, sm_count=sms)
    if M < 3 and mmt != Q.choose_path(M, N, K, bits, group, "none", torch.bfloat16, dev,
                                      sm_count=sms):
        out.append(("mmT_3rows", mmt))  # (at 2 rows the dispatch runs it since session 16)
    one = Q.gemv1p_config(1, N, K, group, sms=sms, bits=bits)
    out.append(("gemv1p_bm1", dict(one, BLOCK_M=1)))
    for warps in (4, 8):
        base = dict(Q.GEMV1P_DEFAULT, num_warps=warps, BLOCK_M=min(16, 1 << (M - 1).bit_length()))
        out.append((f"gemv1p_w{warps}", Q.gemv1p_config(M, N, K, group, sms=sms, base=base,
                                                        bits=bits)))
    return out


class Runner:
    def __init__(self, budget_s: float):
        self.started = time.time()
        self.budget_s = budget_s
        self.rows: list[dict] = []
        self.skipped: list[str] = []

    def over_budget(self) -> bool:
        return time.time() - self.started > self.budget_s

    def time_launch(self, base: dict, fn, ref, nbytes, sweep=False):
        """Check fn() against ref, then time its CUDA-graph replay; appends and returns a row."""
        row = dict(base, bytes=nbytes)
        if sweep and self.over_budget():
            self.skipped.append(f"{base['N']}x{base['K']} M={base['M']} {base.get('format', '')} "
                                f"{base['impl']}")
            return None
        try:
            out = fn()
            row["max_rel_err"] = BQ.rel_err(out, ref)
            if not row["max_rel_err"] <= TOL:
                row["error"] = f"wrong result: rel err {row['max_rel_err']:.3g}"
            elif not CPU_CHECK:
                _, row["graph_ms"] = BQ.timed(fn, eager=False)
                if row["graph_ms"]:
                    row["graph_TBps"] = nbytes / (row["graph_ms"] * 1e-3) / 1e12
        except Exception as exc:  # a config that fails is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        self.rows.append(row)
        tbps = row.get("graph_TBps")
        print(f"{row['N']:>6} {row['K']:>6} {row['M']:>3} {row.get('format', ''):>11} "
              f"{row['impl']:>18} {row.get('max_rel_err', float('nan')):8.1e} "
              f"{row.get('graph_ms') or float('nan'):9.4f} {tbps or float('nan'):6.2f}"
              + (f"  {row['error']}" if "error" in row else "")
              + (f"  {_short(row['cfg'])}" if "cfg" in row else ""), flush=True)
        return row


def _short(cfg: dict) -> str:
    keys = ("path", "BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "SPLIT_K", "PREFETCH", "REDUCE",
            "DENORM", "SUBS")
    return " ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--nk", nargs="+", default=[f"{n}x{k}" for n, k in NKS])
    ap.add_argument("--ms", type=int, nargs="+", default=list(MS))
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="stop sweeping after this many seconds (the essentials always run)")
    ap.add_argument("--grid", action="store_true",
                    help="at M = 1 sweep the split x prefetch x columns grid for every format")
    ap.add_argument("--cpu-check", action="store_true",
                    help="run the flow in the Triton interpreter on the CPU, without timing")
    args = ap.parse_args()
    global CPU_CHECK
    CPU_CHECK = args.cpu_check
    if CPU_CHECK:
        from q3n_compile.kernels import contract
        if not contract.interpreter_enabled():
            sys.exit("--cpu-check needs TRITON_INTERPRET=1 set before the run")
    elif not torch.cuda.is_available():
        sys.exit("bench_qlinear_gemv.py needs a CUDA GPU")
    run = Runner(args.budget_s)
    dev = torch.device("cpu" if CPU_CHECK else "cuda")
    sms = 132 if CPU_CHECK else Q._sm_count(torch.cuda.current_device())
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"{'N':>6} {'K':>6} {'M':>3} {'format':>11} {'impl':>18} {'err':>8} {'graph ms':>9} "
          f"{'TB/s':>6}")

    # Pass 1, the essentials for every shape; the inputs are kept for pass 2.
    shapes = []
    for nk in args.nk:
        N, K = map(int, nk.lower().split("x"))
        x_all = torch.randn(max(args.ms), K, generator=gen, device=dev).to(torch.bfloat16)
        w = (torch.randn(N, K, generator=gen, device=dev) / K ** 0.5).to(torch.bfloat16)
        packed = {}
        for M in args.ms:
            x = x_all[:M].contiguous()
            base = dict(N=N, K=K, M=M)
            run.time_launch(dict(base, impl="bf16"), lambda: F.linear(x, w),
                            F.linear(x.float(), w.float()), N * K * 2)
            if CPU_CHECK:
                continue
            # int4_torch checks itself against its own float reference (own_rel_err).
            fn, err, nbytes, packing = BQ.int4_torch(w, x)
            if fn is None:
                run.rows.append(dict(base, impl="int4_torch", error=err))
            else:
                run.time_launch(dict(base, impl="int4_torch", packing=packing, own_rel_err=err),
                                fn, fn(), nbytes)
            del fn
        for name in args.formats:
            bits, group, sym = FORMATS[name]
            pw = random_packed(gen, N, K, bits, group, sym, dev)
            ref_all = Q.reference(x_all.float(), pw.qweight, pw.scales, pw.zeros, None, None,
                                  bits, group, K, "none")
            packed[name] = (pw, ref_all)
            for M in args.ms:
                x = x_all[:M].contiguous()
                args_ = (x, pw.qweight, pw.scales, pw.zeros, None, None, bits, group, K, "none")
                base = dict(N=N, K=K, M=M, format=name)
                cands = [("dispatch", Q.choose_path(M, N, K, bits, group, "none", x.dtype, dev,
                                                     interpreter=CPU_CHECK, sm_count=sms)),
                         ("gemv_old", old_gemv(M, N, K, group, sms)),
                         ("gemv1p", Q.gemv1p_config(M, N, K, group, sms=sms, bits=bits))]
                if bits != 6:  # the other unpack than the default's, same launch
                    other = 0 if Q.gemv1p_denorm(bits, x.dtype) else 1
                    cands.append((("gemv1p_magic", "gemv1p_denorm")[other],
                                  dict(Q.gemv1p_config(M, N, K, group, sms=sms, bits=bits),
                                       DENORM=other)))
                if 2 <= M <= 16:
                    cands += few_rows_candidates(M, N, K, bits, group, sms, dev)
                for impl, cfg in cands:
                    run.time_launch(dict(base, impl=impl, cfg=cfg), launch(args_, cfg),
                                    ref_all[:M], pw.nbytes)
        shapes.append((N, K, x_all, packed))
        if not CPU_CHECK:
            torch.cuda.empty_cache()

    # Pass 2, the sweep: W4A16 in full, the other formats short; stops at the budget.
    for N, K, x_all, packed in shapes:
        for name, (pw, ref_all) in packed.items():
            bits, group, sym = FORMATS[name]
            for M in args.ms:
                x = x_all[:M].contiguous()
                args_ = (x, pw.qweight, pw.scales, pw.zeros, None, None, bits, group, K, "none")
                for label, cfg in sweep_configs(M, N, K, group, sms, full=name == "w4a16_g128",
                                                grid=args.grid, bits=bits):
                    run.time_launch(dict(N=N, K=K, M=M, format=name, impl=f"gemv1p_{label}",
                                         cfg=cfg), launch(args_, cfg), ref_all[:M], pw.nbytes,
                                    sweep=True)

    # Summary: per shape, M and format, the best gemv1p launch against the others.
    summary = []
    print("\nbest gemv1p launch per shape (graph TB/s of packed bytes; bf16 / int4: their bytes)")
    for N, K, _, packed in shapes:
        for M in args.ms:
            for name in packed:
                sel = [r for r in run.rows if (r["N"], r["K"], r["M"]) == (N, K, M)
                       and r.get("graph_TBps")]
                mine = [r for r in sel if r.get("format") == name]
                g1p = [r for r in mine if r["impl"].startswith("gemv1p")]
                best = max(g1p, key=lambda r: r["graph_TBps"]) if g1p else None
                pick = {r["impl"]: r["graph_TBps"] for r in sel if r["impl"] in
                        ("bf16", "int4_torch")}
                pick.update({r["impl"]: r["graph_TBps"] for r in mine
                             if r["impl"] in ("dispatch", "gemv_old", "gemv1p",
                                              "gemv1p_magic", "gemv1p_denorm")})
                entry = dict(N=N, K=K, M=M, format=name, best_gemv1p=best and dict(
                    impl=best["impl"], TBps=best["graph_TBps"], graph_ms=best["graph_ms"],
                    cfg=best["cfg"]), **{f"{k}_TBps": v for k, v in pick.items()})
                summary.append(entry)
                cells = " ".join(f"{k} {v:.2f}" for k, v in pick.items())
                print(f"  {N}x{K} M={M:<3} {name:>11}: best gemv1p "
                      + (f"{best['graph_TBps']:.2f} ({best['impl']}: {_short(best['cfg'])})"
                         if best else "-") + f" | {cells}")
    if run.skipped:
        print(f"\nskipped at the time budget: {len(run.skipped)} launches")
    result = dict(
        BQ.result_header("CUDA-graph replay, triton.testing.do_bench median (L2 flushed)",
                         cpu_check=CPU_CHECK),
        wall_s=round(time.time() - run.started, 1), budget_s=args.budget_s,
        skipped=run.skipped, summary=summary, rows=run.rows)
    BQ.write_result(args.out, result)


if __name__ == "__main__":
    main()
