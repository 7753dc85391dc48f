"""The "wg" tile (kernels/qlinear_wgmma.py) above the 256 rows it is dispatched to, against the
path the op takes there (dequantise + cuBLAS for 16- and 12-bit activations, cublas8 for fp8
ones) and bf16 ``F.linear``, on one GPU.

Why: from 257 rows the op hands 4- and 6-bit weights to cuBLAS after writing the whole weight
out (kernels/weight_unpack.py); that write is what those paths lose to bf16 (0.74-0.89x at
1024 rows, s28run2). The wg tile reads the packed weight itself; this says from which M, if
any, it stops being the faster of the two. For each (N, K) of ``--nk``, M of ``--ms`` and
format: bf16, the op as dispatched, the op forced onto the dequant path, and onto the wg tile that
:func:`qlinear_wgmma.choose` gives for that M with its row limit lifted (plus the dispatch's
split and PDL adjustments), checked against the dispatched output first. CUDA-graph replay,
``do_bench`` median, L2 flushed.

    python bench/bench_wg_above_256.py --out bench/results/wg-above-256-h200.json
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
from q3n_compile.kernels import qlinear_swap as SW  # noqa: E402
from q3n_compile.kernels import qlinear_wgmma as WG  # noqa: E402

# name -> (bits, group, symmetric, act)
FORMATS = {"w4a16": (4, 128, False, "none"), "w6a12": (6, 128, False, "int12"),
           "w4a8": (4, 128, False, "fp8")}


def forced_wg(M: int, N: int, K: int, bits: int, act: str, sms: int) -> dict:
    """The wg launch the dispatch's rule gives M rows with no row limit."""
    limits = WG.MAX_M, WG.MAX_M_LARGE
    WG.MAX_M, WG.MAX_M_LARGE = max(limits[0], M), ()
    try:
        cfg = WG.choose(M, N, sms, False, bits, K, quantized=act != "none")
    finally:
        WG.MAX_M, WG.MAX_M_LARGE = limits
    cfg = dict(cfg, SPLIT_K=Q._keep_two_blocks(cfg["SPLIT_K"], P.padded_k(K), SW.MMT_BLOCK_K))
    return WG.with_pdl(cfg, M, N, sms)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--ms", type=int, nargs="+", default=[256, 384, 512, 768, 1024])
    ap.add_argument("--nk", nargs="+", default=[f"{n}x{k}" for n, k in BQ.NKS])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_wg_above_256.py needs a CUDA GPU")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for N, K, M, x, bf16 in BQ.bf16_cases(gen, args.nk, args.ms):
        for name in args.formats:
            bits, group, sym, act = FORMATS[name]
            act = BQ.resolve_act(act, bits, sym)
            pw = BQ.random_packed(gen, N, K, bits, group, sym)
            op_args = (x, pw.qweight, pw.scales, pw.zeros, None, None, bits, group, K, act)
            dispatched = Q.choose_path(M, N, K, bits, group, act, x.dtype, x.device)
            wg = forced_wg(M, N, K, bits, act, sms)
            ref = torch.ops.q3n.qlinear(*op_args)
            got = Q._launch(*op_args, interpreter=False, path=wg)
            err = BQ.rel_err(got, ref)
            row = dict(N=N, K=K, M=M, format=name, act=act, bf16_ms=bf16,
                       dispatched=dispatched["path"], wg_cfg={k: v for k, v in wg.items()},
                       wg_rel_err_vs_dispatched=err)
            parts = {"op": lambda: torch.ops.q3n.qlinear(*op_args),
                     "wg": lambda: Q._launch(*op_args, interpreter=False, path=wg),
                     "dequant": lambda: Q._launch(*op_args, interpreter=False,
                                                  path=dict(path="dequant"))}
            if err > 2e-2:
                parts.pop("wg")
                row["wg_error"] = f"differs from the dispatched output: {err:.2e}"
            BQ.time_parts(parts, row)
            wg_ms = row.get("wg_ms")
            print(f"{N:>6} {K:>6} {M:>5} {name:>6} bf16 {bf16:.4f} "
                  f"op ({dispatched['path']}) {row['op_ms']:.4f} ({bf16 / row['op_ms']:.2f}x) "
                  + (f"wg {wg_ms:.4f} ({bf16 / wg_ms:.2f}x, {row['op_ms'] / wg_ms:.2f}x the op)"
                     if wg_ms else row.get("wg_error", "wg failed"))
                  + (f", dequant path {row['dequant_ms']:.4f}" if row.get("dequant_ms") else ""),
                  flush=True)
            rows.append(row)
        torch.cuda.empty_cache()
    BQ.write_result(args.out, dict(BQ.result_header("CUDA-graph replay, do_bench median"),
                                   rows=rows))


if __name__ == "__main__":
    main()
