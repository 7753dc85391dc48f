"""The mm8 tile (8-bit activation codes times packed 4- or 8-bit weight codes on 8-bit tensor
cores, ``kernels/qlinear_mm8.py``) on one GPU, against the paths it could replace and bf16 cuBLAS
in the same process.

Per shape and format: ``bf16`` (``F.linear``), ``dispatched`` (``q3n::qlinear_codes`` on the
same codes, the path ``choose_path`` picks: cublas8 from 256 rows, mmT or the mm tile below),
``cublas8`` where it computes the format, and ``mm8`` at every tile of ``--tiles``
(BLOCK_M x BLOCK_N x warps x stages[xGROUP_M][:flags], flags comma-separated: noprefetch,
sN for K split N ways). Every launch is first checked
against the float64 reference of the codes (``qlinear.reference_codes``); times are CUDA-graph
replays (``do_bench`` median, L2 flushed). Writes JSON (GPU, versions, commit, date, rows).

    python bench/bench_qlinear_mm8.py --out bench/results/qlinear-mm8-h200.json
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_qlinear import NKS, check_and_time, result_header, write_result  # noqa: E402
from bench_qlinear_codes import bf16_peer, codes_case  # noqa: E402
from q3n_compile.kernels import qlinear as Q  # noqa: E402
from q3n_compile.kernels import qlinear_cublas8 as C8  # noqa: E402
from q3n_compile.kernels import qlinear_mm8 as M8  # noqa: E402

# name -> (bits, group, symmetric, activation format, activation group)
FORMATS = {"w4a8": (4, 128, False, "fp8", Q.PER_TOKEN),
           "w4a8_ag128": (4, 128, False, "fp8", 128),
           "w4a8_int8": (4, 128, False, "int8", Q.PER_TOKEN),
           "w8a8": (8, -1, True, "int8", Q.PER_TOKEN)}
TILES = ("128x128x8x3", "128x128x8x4", "128x64x4x3", "64x128x4x3", "128x128x8x3x1",
         "128x128x8x3:noprefetch")
TOL = 1e-2  # relative to max |y|: bf16 output rounding


def parse_tile(text: str) -> dict:
    dims, _, flag = text.partition(":")
    v = [int(t) for t in dims.split("x")]
    flags = flag.split(",") if flag else []
    split = [int(f[1:]) for f in flags if f.startswith("s")]
    return dict(BLOCK_M=v[0], BLOCK_N=v[1], num_warps=v[2], num_stages=v[3],
                GROUP_M=v[4] if len(v) > 4 else 8, PREFETCH="noprefetch" not in flags,
                SPLIT_K=split[0] if split else 1)


def run_shape(M, N, K, formats, tiles, gen):
    x, bf16_ms, bf16_row = bf16_peer(M, N, K, gen)
    rows = [bf16_row]
    print(f"M={M} N={N} K={K}: bf16 {bf16_ms:.4f} ms", flush=True)
    for name in formats:
        bits, group, sym, _, ag = FORMATS[name]
        act, pw, codes, xs, ref = codes_case(x, N, FORMATS[name], gen)
        w_args = (pw.qweight, pw.scales, pw.zeros, None, bits, group)
        cfg = Q.choose_path(M, N, K, bits, group, act, x.dtype, x.device, act_group_size=ag)
        impls = [("dispatched", lambda: torch.ops.q3n.qlinear_codes(codes, xs, *w_args, K, act,
                                                                     x.dtype, ag), cfg)]
        if cfg["path"] != "cublas8" and C8.eligible(N, K, bits, group, act, x.dtype, True,
                                                    ag) is None:
            impls.append(("cublas8", lambda: C8.run(codes, xs, *w_args, act, ag, x.dtype),
                          None))
        for tile in tiles:
            tcfg = parse_tile(tile)
            impls.append((f"mm8_{tile}", lambda tcfg=tcfg: M8.run(
                codes, xs, *w_args, act, ag, x.dtype, tcfg, False, Q._tickets), tcfg))
        for impl, fn, path in impls:
            row = dict(M=M, N=N, K=K, impl=f"{name}_{impl}", act=act, path=path)
            check_and_time(fn, ref, bf16_ms, TOL, row)
            if "graph_ms" in row:
                print(f"  {row['impl']:34s} {row['graph_ms']:.4f} ms  {row['vs_bf16']:.2f}x "
                      f"bf16  err {row['rel_err_vs_float64']:.1e}"
                      + (f"  {row['error']}" if "error" in row else ""), flush=True)
            else:
                print(f"  {row['impl']:34s} {row['error']}", flush=True)
            rows.append(row)
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--formats", nargs="+", default=["w4a8"], choices=list(FORMATS))
    ap.add_argument("--ms", type=int, nargs="+", default=[128, 256, 1024, 4096])
    ap.add_argument("--nk", nargs="+", default=[f"{n}x{k}" for n, k in NKS])
    ap.add_argument("--tiles", nargs="+", default=list(TILES))
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = dict(result_header("CUDA-graph replay, do_bench median, L2 flushed"), rows=[])
    for nk in args.nk:
        N, K = (int(v) for v in nk.split("x"))
        for M in args.ms:
            result["rows"] += run_shape(M, N, K, args.formats, args.tiles, gen)
            write_result(args.out, result)


if __name__ == "__main__":
    main()
