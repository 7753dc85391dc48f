"""W8A8 on one GPU: the i8 path (K-major int8 weight, ``kernels/qlinear_i8.py``) against bf16
``F.linear``, the bit-plane W8A8 as dispatched, and cuBLAS's int8 GEMM, in one process.

For each (N, K) of ``--nk`` and M of ``--ms``, with random 8-bit symmetric per-channel codes:
- ``bf16``: ``F.linear`` on a bf16 weight (cuBLAS), the peer;
- ``planes``: ``q3n::qlinear`` on the same codes in the bit-plane layout, as dispatched (the
  W8A8 path before the K-major layout);
- ``i8``: ``q3n::qlinear`` on the K-major weight as dispatched (:func:`qlinear_i8.choose`);
- ``int_mm``: ``torch._int_mm`` alone on the codes and the K-major weight (cuBLAS's int8 GEMM,
  the GEMM part only: no quantisation of x, no scales);
- ``quant``: the activations' quantizer alone (a part of both q3n paths);
- ``i8_noprefetch`` (where the dispatched launch prefetches the weight into L2 before its PDL
  wait, to 64 rows): the same launch without the prefetch;
- with ``--sweep``: the i8 kernel at each tile of :data:`SWEEP_MM` / :data:`SWEEP_SWAP` and K
  splits 1-16, and the fastest printed beside the dispatched one;
- with ``--mid-narrow`` (65-512 rows): the swapped tiles of :data:`SWEEP_MID_NARROW` (64
  weight rows) at their K splits;
- with ``--prefetch``: the dispatched launch asking L2 for its first 0, 2, 4, ... K blocks of
  the weight before its PDL wait (:data:`PREFETCH_BLOCKS`), while the quantizer runs.
Every q3n launch is checked against float64 first (max error relative to max |reference|);
timing is bench_qlinear.py's (CUDA-graph replay, do_bench median, L2 flushed).

    python bench/bench_qlinear_i8.py --sweep --out bench/results/qlinear-i8-h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_qlinear as BQ  # noqa: E402
from q3n_compile.kernels import packing as P  # noqa: E402
from q3n_compile.kernels import qlinear as Q  # noqa: E402
from q3n_compile.kernels import qlinear_i8 as I8  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
SWEEP_MM = ((128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (128, 256, 128, 8, 3),
            (64, 128, 128, 4, 4), (64, 256, 128, 8, 3), (128, 128, 64, 4, 5),
            (256, 128, 128, 8, 3))
SWEEP_SWAP = ((None, 128, 128, 4, 4), (None, 128, 128, 4, 6), (None, 64, 128, 4, 4),
              (None, 64, 256, 4, 4), (None, 128, 256, 4, 3), (None, 128, 128, 8, 4))
# From 65 to 512 rows the swapped form too, on x's rows in blocks of up to 128.
SWEEP_SWAP_MID = ((None, 64, 128, 4, 4), (None, 128, 128, 4, 4), (None, 128, 128, 8, 3),
                  (None, 64, 256, 4, 3))
SWAP_MID_MAX_M = 512
# --mid-narrow: the swapped tile on 64 (or 32) rows of x and 64 weight rows (two programs an
# SM), K split 1-8, against the dispatch (s30run1: 64 x 64 unsplit 0.91-0.99x the dispatch on
# 4096^2 to 256 rows and on 1024 / 2048 x 4096, 1.02-1.24x on 4096 x 12288 to 256 rows).
SWEEP_MID_NARROW = ((64, 64, 128, 4, 5, (1, 2, 4, 8)), (64, 64, 128, 4, 4, (1, 2)),
                    (64, 64, 256, 4, 3, (1, 2, 4)), (32, 64, 128, 4, 5, (1, 2, 4)))
PREFETCH_BLOCKS = (0, 2, 4, 8, 16)
SPLITS = (1, 2, 4, 8, 16)
MS = (1, 16, 64, 256, 1024, 4096)


def sweep_cfgs(M: int, N: int, K: int, sms: int):
    small = M <= I8.SWAP_MAX_M
    tiles_swept = [(True, t) for t in SWEEP_SWAP] if small else (
        [(False, t) for t in SWEEP_MM]
        + [(True, t) for t in (SWEEP_SWAP_MID if M <= SWAP_MID_MAX_M else ())])
    for swap, (bm, bn, bk, warps, stages) in tiles_swept:
        bm = bm or min(128, max(16, 1 << (M - 1).bit_length()))
        tiles = -(-M // bm) * -(-N // bn)
        for split in SPLITS:
            # past two programs an SM a split only adds waves
            if K // bk < 2 * split or (split > 1 and tiles * split > 2 * sms):
                continue
            yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps,
                       num_stages=stages, SWAP=swap, SPLIT_K=split, path="i8")


def mid_narrow_cfgs(M: int, K: int):
    for bm, bn, bk, warps, stages, splits in SWEEP_MID_NARROW:
        for split in splits:
            if K // bk >= 4 * split:
                yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps,
                           num_stages=stages, SWAP=True, SPLIT_K=split, path="i8")


def prefetch_cfgs(cfg: dict, K: int):
    blocks = -(-K // (cfg["BLOCK_K"] * cfg.get("SPLIT_K", 1)))
    for n in PREFETCH_BLOCKS:
        if n <= max(2, blocks):
            yield dict(cfg, PREFETCH=n, path="i8")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--ms", type=int, nargs="+", default=list(MS))
    ap.add_argument("--nk", nargs="+", default=[f"{n}x{k}" for n, k in BQ.NKS])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--mid-narrow", action="store_true",
                    help="sweep SWEEP_MID_NARROW (64 x 64 swapped tiles, K splits) instead")
    ap.add_argument("--prefetch", action="store_true",
                    help="sweep the dispatched launch's L2 prefetch depth instead")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_qlinear_i8.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{'N x K':>12} {'M':>5} {'bf16':>8} {'planes':>8} {'i8':>8} {'int_mm':>8} "
          f"{'quant':>7} {'codes':>8} {'i8/bf16':>7} {'i8/pl':>6} {'best':>8} cfg", flush=True)
    for N, K, M, x, bf16 in BQ.bf16_cases(gen, args.nk, args.ms):
        pw = BQ.random_packed(gen, N, K, 8, -1, True)
        kw = P.to_kmajor8(pw)
        ref = Q.reference(x.double(), pw.qweight, pw.scales, None, None, None, 8, -1, K,
                          "int8").double()
        row = dict(N=N, K=K, M=M, bf16_ms=bf16)
        planes = BQ.check_and_time(
            lambda: Q.qlinear(x, pw.qweight, pw.scales, None, None, None, 8, -1, K, "int8"),
            ref, bf16, BQ.TOL, {})
        row["planes"] = dict(planes, path=Q.choose_path(M, N, K, 8, -1, "int8", x.dtype,
                                                        x.device)["path"])
        cfg = Q._choose_i8(M, kw.qweight, K, x.device, False)
        row["i8"] = dict(BQ.check_and_time(
            lambda: Q.qlinear(x, kw.qweight, kw.scales, None, None, None, 8, -1, K, "int8"),
            ref, bf16, BQ.TOL, {}), cfg=cfg)
        if cfg.get("PREFETCH"):
            # The dispatched launch without its L2 prefetch before the PDL wait.
            off = dict(cfg, PREFETCH=False)
            row["i8_noprefetch"] = dict(BQ.check_and_time(
                lambda: Q._launch(x, kw.qweight, kw.scales, None, None, None, 8, -1, K, "int8",
                                  False, path=off), ref, bf16, BQ.TOL, {}), cfg=off)
        codes, xs = Q.quantize_activations_triton(x, "int8", None, False)
        w8t = kw.qweight[:, :K].t()
        # The dispatched kernel alone on codes quantized beforehand (no quantizer, no PDL): what
        # the op's quantizer costs is the op's time minus this.
        BQ.time_parts({"i8_codes": lambda: I8.run(codes, xs, kw.qweight, kw.scales, None,
                                                  x.dtype, cfg, False, Q._tickets),
                       "int_mm": lambda: torch._int_mm(codes, w8t),
                       "quant": lambda: Q.quantize_activations_triton(x, "int8", None, False)},
                      row)
        best = None
        if args.sweep or args.mid_narrow or args.prefetch:
            row["sweep"] = []
            for c in (mid_narrow_cfgs(M, K) if args.mid_narrow else prefetch_cfgs(cfg, K)
                      if args.prefetch else sweep_cfgs(M, N, K, sms)):
                r = BQ.check_and_time(
                    lambda: Q._launch(x, kw.qweight, kw.scales, None, None, None, 8, -1, K,
                                      "int8", False, path=c), ref, bf16, BQ.TOL, {})
                r["cfg"] = c
                row["sweep"].append(r)
                if "error" not in r and (best is None or r["graph_ms"] < best["graph_ms"]):
                    best = r
            row["best"] = best
        rows.append(row)
        i8 = row["i8"].get("graph_ms") or float("nan")
        pl = row["planes"].get("graph_ms") or float("nan")
        errs = [r["error"] for r in (row["i8"], row["planes"]) if "error" in r]
        bcfg = "" if best is None else (
            f"{best['cfg']['BLOCK_M']}x{best['cfg']['BLOCK_N']}x{best['cfg']['BLOCK_K']} "
            f"w{best['cfg']['num_warps']} s{best['cfg']['num_stages']} "
            f"split {best['cfg']['SPLIT_K']}" + (" swap" if best["cfg"]["SWAP"] else "")
            + f" prefetch {best['cfg'].get('PREFETCH', 0)}")
        print(f"{N:>6}x{K:<5} {M:>5} {bf16:8.4f} {pl:8.4f} {i8:8.4f} "
              f"{row.get('int_mm_ms', float('nan')):8.4f} {row.get('quant_ms', float('nan')):7.4f} "
              f"{row.get('i8_codes_ms', float('nan')):8.4f} "
              f"{bf16 / i8:7.2f} {pl / i8:6.2f} "
              f"{best['graph_ms'] if best else float('nan'):8.4f} {bcfg} "
              f"(dispatched split {cfg['SPLIT_K']})"
              + (f" no prefetch {row['i8_noprefetch'].get('graph_ms', float('nan')):.4f}"
                 if "i8_noprefetch" in row else "") + f" {' '.join(errs)}", flush=True)
    BQ.write_result(args.out, dict(BQ.result_header("cuda-graph replay, do_bench median"),
                                   rows=rows))


if __name__ == "__main__":
    main()
