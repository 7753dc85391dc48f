"""The Gluon swapped tile (``kernels/qlinear_wgmma.py``, asynchronous MMAs) against the dispatched
q3n::qlinear and bf16 cuBLAS on one GPU: 4-bit (or ``--bits 6``) g128 weights with zero points,
bf16 x, 16-bit activations or (``--act``) quantised ones, which the op dequantises for the tile.

For each (N, K) and M: bf16 ``F.linear``; the op as dispatched (``torch.ops.q3n.qlinear``);
where that is the wg path, the same launch without programmatic dependent launch (PDL False);
the dispatch without the wg path ("before": mmT, mm8, cublas8 or dequantise + cuBLAS); and
the Gluon tile at each launch of ``--tiles`` (BLOCK_M, BLOCK_N, warps, stages, split: K split
by tickets, summed in the launch). Every launch is first checked against the
float64 product of the dequantised weight (max |error| / max |reference|, must be below 2e-2 as
in bench_qlinear.py), then timed as a CUDA-graph replay (``do_bench`` median, L2 flushed, after
warm-up), with x permuted (and quantised) inside the timed call (the op's own cost).

    python bench/bench_qlinear_wgmma.py --out bench/results/qlinear-wgmma-h200.json
    python bench/bench_qlinear_wgmma.py --act fp8 --out bench/results/qlinear-wgmma-w4a8-h200.json
    python bench/bench_qlinear_wgmma.py --bits 6 --act int12 --out qlinear-wgmma-w6a12-h200.json
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_qlinear import TOL, random_packed, result_header, timed, write_result  # noqa: E402
from q3n_compile.kernels import qlinear as Q  # noqa: E402

NKS = ((4096, 4096), (12288, 4096), (4096, 12288), (28672, 8192))
MS = (32, 64, 96, 128, 192, 256)
# (BLOCK_M, BLOCK_N, num_warps, STAGES, SPLIT_K[, LOOKAHEAD])
TILES = [(128, 128, 8, 4, 1), (128, 64, 4, 4, 1), (64, 64, 4, 4, 1), (64, 128, 8, 4, 1),
         (64, 64, 4, 4, 2), (64, 64, 4, 4, 4), (128, 64, 4, 4, 2), (64, 128, 8, 4, 2),
         (256, 128, 8, 3, 1), (128, 128, 8, 3, 1)]


def parse_tile(s):
    return tuple(int(v) for v in s.split(","))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nk", nargs="+", default=[f"{n}x{k}" for n, k in NKS])
    ap.add_argument("--ms", nargs="+", type=int, default=list(MS))
    ap.add_argument("--tiles", nargs="*", type=parse_tile, default=TILES,
                    help="BLOCK_M,BLOCK_N,warps,stages,split[,lookahead[,pdl[,scale_after[,x_tma]]]] "
                         "(split -k: stream-K over k programs an SM; lookahead: MMAs left in "
                         "flight, default 1; pdl 0: without programmatic dependent launch; "
                         "scale_after 1: q - z on the MMA, each K block's sum scaled in fp32; "
                         "2: and M + q on the MMA, (M + z) times x's block sums taken off; x_tma 1: "
                         "x by TMA copies)")
    ap.add_argument("--act", default="none",
                    help="activations: none (W4A16), fp8, int8 or int12 (quantised, then "
                         "dequantised and permuted for the tile, as the op does)")
    ap.add_argument("--bits", type=int, default=4, choices=(4, 6), help="weight bits")
    ap.add_argument("--whole-rows", action="store_true",
                    help="skip tiles of fewer rows than M (x's rows in one tile)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = dict(result_header("CUDA-graph replay, do_bench median, L2 flushed"),
                  format=f"W{args.bits} g128 zero points, bf16 x, activations {args.act}", rows=[])
    for nk in args.nk:
        N, K = (int(v) for v in nk.split("x"))
        pw = random_packed(gen, N, K, args.bits, 128, False)
        w = (torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).to(torch.bfloat16)
        for M in args.ms:
            x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16)
            qargs = (x, pw.qweight, pw.scales, pw.zeros, None, None, args.bits, 128, K, args.act,
                     Q.PER_TOKEN)
            ref = Q.reference(x.double(), *qargs[1:]).double()
            _, bf16_ms = timed(lambda: F.linear(x, w), eager=False)
            path = Q.choose_path(M, N, K, args.bits, 128, args.act, x.dtype, x.device)
            _, q3n_ms = timed(lambda: torch.ops.q3n.qlinear(*qargs), eager=False)
            q3n_err = ((torch.ops.q3n.qlinear(*qargs).double() - ref).abs().max()
                       / ref.abs().max()).item()
            # The dispatch without this path (mmT, mm8, cublas8 or dequantise + cuBLAS).
            before = Q.choose_path(M, N, K, args.bits, 128, args.act, x.dtype, x.device,
                                   allow_wg=False)
            fb = lambda: Q._launch(*qargs[:-1], interpreter=False, path=before)  # noqa: E731
            _, before_ms = timed(fb, eager=False)
            row = dict(M=M, N=N, K=K, bf16_ms=bf16_ms, q3n_ms=q3n_ms, q3n_err=q3n_err,
                       q3n_path=path, before_path=before, before_ms=before_ms, wg=[])
            nopdl = ""
            if path.get("path") == "wg":
                # The same launch without programmatic dependent launch (plain stream order
                # between x's permutation and the kernel), checked like the others.
                f0 = lambda: Q._launch(*qargs[:-1], interpreter=False,  # noqa: E731
                                       path=dict(path, PDL=False))
                row["q3n_nopdl_err"] = ((f0().double() - ref).abs().max()
                                        / ref.abs().max()).item()
                _, row["q3n_nopdl_ms"] = timed(f0, eager=False)
                nopdl = f"  without PDL {row['q3n_nopdl_ms']:.4f}"
            print(f"{N}x{K} M={M}: bf16 {bf16_ms:.4f}  q3n {q3n_ms:.4f} ({path.get('path')}, "
                  f"{bf16_ms / q3n_ms:.2f}x){nopdl}  before {before_ms:.4f} ({before['path']}, "
                  f"{bf16_ms / before_ms:.2f}x)", flush=True)
            for bm, bn, warps, stages, split, *more in args.tiles:
                if (bm > 2 * M and bm > 32) or (args.whole_rows and bm < M):
                    continue
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, STAGES=stages,
                           SPLIT_K=max(split, 1), LOOKAHEAD=more[0] if more else 1,
                           PDL=bool(more[1]) if len(more) > 1 else True,
                           SCALE_AFTER=bool(more[2]) if len(more) > 2 else False,
                           XSUM=len(more) > 2 and more[2] == 2,
                           X_TMA=len(more) > 3 and bool(more[3]))
                if split < 0:
                    cfg["STREAM"] = -split * sms
                ent = dict(cfg)
                try:
                    f = lambda: Q._launch(*qargs[:-1], interpreter=False,  # noqa: E731
                                          path=dict(cfg, path="wg"))
                    y = f().double()
                    ent["err"] = ((y - ref).abs().max() / ref.abs().max()).item()
                    if ent["err"] > TOL:
                        ent["error"] = f"wrong result: {ent['err']:.3g}"
                    else:
                        _, ent["graph_ms"] = timed(f, eager=False)
                        ent["vs_bf16"] = bf16_ms / ent["graph_ms"]
                        ent["vs_q3n"] = q3n_ms / ent["graph_ms"]
                        ent["vs_before"] = before_ms / ent["graph_ms"]
                except Exception as exc:
                    ent["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                row["wg"].append(ent)
                print(f"    wg {bm}x{bn} w{warps} s{stages} l{cfg['LOOKAHEAD']} "
                      + ("" if cfg["PDL"] else "no PDL ")
                      + ("scale-after " if cfg["SCALE_AFTER"] else "")
                      + ("xsum " if cfg["XSUM"] else "")
                      + ("x-tma " if cfg["X_TMA"] else "")
                      + (f"stream{cfg['STREAM']}: " if split < 0 else f"split{split}: ")
                      + (ent.get("error") or f"{ent['graph_ms']:.4f} ms "
                         f"({ent['vs_bf16']:.2f}x bf16, {ent['vs_before']:.2f}x before, "
                         f"err {ent['err']:.1e})"), flush=True)
            result["rows"].append(row)
        del pw, w
        torch.cuda.empty_cache()
    write_result(args.out, result)


if __name__ == "__main__":
    main()
