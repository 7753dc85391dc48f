"""Decode-sized quantized linears in a chain, with and without programmatic dependent launch.

A decode step is a chain of short kernels; a linear's kernel launched with PDL (session 23, on
a forced launch's ``PDL``: ``qlinear_gemv1p_kernel`` at 1 row, the swapped tile
``qlinear_mmT_kernel`` at 2-32 rows) may start while the kernel before it finishes. That shows
only in a chain, so this times, as one CUDA graph, four linears in a row with a scaling
multiply between them (as an elementwise op sits between a decode step's linears): N x K,
K x N, N x K, K x N, W4A16 g128 with zero points, bf16 x, each launch as the op dispatches it,
once with PDL asked for and once without, in the same process. Every chain is first checked
against float64 (the dequantised weights). Result (s23run3, s23run5; bench/RESULTS.md): the
GEMV 1.066x at 4096 x 4096, 1.00x elsewhere, the tile 0.988-1.010x; neither gained in a decode
step, so the dispatch leaves PDL off for both with 16-bit x. With quantized activations
(``--act``) the activations' quantizer before each GEMV takes PDL as well at one row.

    python bench/bench_decode_pdl.py --out bench/results/decode-pdl.json
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_qlinear import random_packed, result_header, timed, write_result  # noqa: E402
from q3n_compile.kernels import qlinear as Q  # noqa: E402

TOL = 2e-2


def chain_fn(x, pws, paths, bits, act):
    def run():
        a = x
        for pw, path in zip(pws, paths):
            a = Q._launch(a, pw.qweight, pw.scales, pw.zeros, None, None, bits, 128,
                          pw.in_features, act, interpreter=False, path=path) * 0.05
        return a
    return run


def exact(x, pws, bits, act):
    a = x.double()
    for pw in pws:
        a = Q.reference(a, pw.qweight, pw.scales, pw.zeros, None, None, bits, 128,
                        pw.in_features, act, Q.PER_TOKEN).double().to(x.dtype).double() * 0.05
    return a


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nk", nargs="+", default=["4096x4096", "12288x4096", "28672x8192"])
    ap.add_argument("--ms", nargs="+", type=int, default=[1, 4, 16, 32])
    ap.add_argument("--bits", type=int, default=4, choices=(4, 6))
    ap.add_argument("--act", default="none", choices=("none", "int8", "fp8", "int12"),
                    help="activations: 16-bit, or quantized per token (at one row the "
                    "quantizer and the GEMV then both take PDL)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = dict(result_header("CUDA-graph replay of the chain, do_bench median, L2 flushed"),
                  format=f"W{args.bits} g128 zero points, activations {args.act}, bf16 x; "
                  "chain N x K, K x N, N x K, K x N",
                  rows=[])
    for nk in args.nk:
        N, K = (int(v) for v in nk.split("x"))
        pair = [random_packed(gen, N, K, args.bits, 128, False),
                random_packed(gen, K, N, args.bits, 128, False)]
        pws = pair + pair
        for M in args.ms:
            x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16)
            paths = [Q.choose_path(M, pw.qweight.shape[1], pw.in_features, args.bits, 128,
                                   args.act, x.dtype, x.device, sm_count=sms) for pw in pws]
            row = dict(M=M, N=N, K=K, paths=[p["path"] for p in paths])
            want = exact(x, pws, args.bits, args.act)
            for name, pdl in (("pdl", True), ("no_pdl", False)):
                fn = chain_fn(x, pws, [dict(p, PDL=pdl) for p in paths], args.bits, args.act)
                err = ((fn().double() - want).abs().max() / want.abs().max()).item()
                row[f"{name}_err"] = err
                if err > 4 * TOL:
                    row[f"{name}_error"] = f"wrong result: {err:.3g}"
                    continue
                _, row[f"{name}_ms"] = timed(fn, eager=False)
            if "pdl_ms" in row and "no_pdl_ms" in row:
                row["speedup"] = row["no_pdl_ms"] / row["pdl_ms"]
            result["rows"].append(row)
            print(f"{N}x{K} M={M} {'/'.join(sorted(set(row['paths'])))}: "
                  f"PDL {row.get('pdl_ms', float('nan')):.4f}  without "
                  f"{row.get('no_pdl_ms', float('nan')):.4f} ms  "
                  f"({row.get('speedup', float('nan')):.3f}x; err {row['pdl_err']:.1e})",
                  flush=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
