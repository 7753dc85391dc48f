"""The wg tile's fp8 form (kernels/qlinear_wgmma.py, :func:`run_fp8`: 4-bit weights times fp8
activation codes on fp8 tensor cores) against what the op dispatches for W4A8 today and bf16
``F.linear``, on one GPU.

Why: W4A8 (fp8 e4m3 activations, what ``activation_format: auto`` picks on an H200) runs
0.61-0.86x bf16 at 256 rows (bench/RESULTS.md, session 35): there the op dequantises the codes to
bf16 and runs the W4A16 tile (bf16 MMAs), or unpacks the weight for cuBLAS's fp8 GEMM (cublas8).
The fp8 form puts the codes themselves on the MMA (twice bf16's rate), the weight's q as e4m3
integers, each 128-channel block's sum scaled in fp32.

For each (N, K) of ``--nk``, M of ``--ms``, weights with zero points and symmetric: bf16; the op
as dispatched (quantizer included); the fp8 kernel alone on codes already in its order, with
each launch of ``--tiles`` (the wg rule's for the M, and fixed alternatives), checked against
float64 of the same codes; the activations' quantizer alone (what the fp8 form adds in front
of the kernel once the quantizer stores its order). CUDA-graph replay, do_bench median, L2
flushed. A tile is ``NAME[:split | :stream][/sSTAGES][/lLOOKAHEAD][/t]`` (``TALL:2/s3``: TALL
with K split 2 and 3 stages; ``/t``: x copied by TMA, X_TMA; ``rule/t``: the rule's launch
so). ``--form bf16`` times the bf16 form (:func:`qlinear_wgmma.run`, W4A16, on bf16 x already
permuted) with the same tiles instead, against float64 of x @ W^T, beside the W4A16 op and
the 16-bit activations' rule (before session 38 this form's "op" and "rule" were W4A8's);
``--bits 6`` with it: W6A16.

    python bench/bench_wg_fp8.py --out bench/results/wg-fp8-h200.json
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

TOL = 2e-2


def rule_tile(M: int, N: int, K: int, sms: int, bits: int = 4, quantized: bool = True) -> dict:
    """The wg rule's launch for M rows (of quantized activations, or 16-bit ones with
    `quantized` False), row limit lifted."""
    limits = WG.MAX_M, WG.MAX_M_LARGE
    WG.MAX_M, WG.MAX_M_LARGE = max(limits[0], M), ()
    try:
        cfg = WG.choose(M, N, sms, False, bits, K, quantized=quantized)
    finally:
        WG.MAX_M, WG.MAX_M_LARGE = limits
    if cfg is None:
        return None
    return dict(cfg, SPLIT_K=Q._keep_two_blocks(cfg["SPLIT_K"], P.padded_k(K), SW.MMT_BLOCK_K))


def tiles(M: int, N: int, K: int, sms: int, names, form: str, bits: int = 4) -> dict:
    """{name: launch cfg, or why there is none}; a name is the rule's launch ("rule") or a tile
    of qlinear_wgmma, then ``:split`` / ``:stream``, then options ``/sSTAGES``,
    ``/lLOOKAHEAD``, ``/t`` (X_TMA)."""
    out = {}
    for name in names:
        spec, *opts = name.split("/")
        base, _, split = spec.partition(":")
        if base == "rule":
            cfg = rule_tile(M, N, K, sms, bits, quantized=form == "fp8")
        else:
            cfg = dict(getattr(WG, base))
            if split == "stream":
                cfg["STREAM"] = sms
            else:
                cfg["SPLIT_K"] = Q._keep_two_blocks(int(split or 1), P.padded_k(K),
                                                    SW.MMT_BLOCK_K)
        if cfg is None:
            out[name] = "the rule gives no wg launch here"
            continue
        for opt in opts:
            if opt == "t":
                cfg["X_TMA"] = True
            else:
                cfg[{"s": "STAGES", "l": "LOOKAHEAD"}[opt[0]]] = int(opt[1:])
        if cfg["BLOCK_N"] > 128 and form == "fp8":
            out[name] = f"{cfg['BLOCK_N']} weight columns (the fp8 form refuses them: spills)"
        else:
            out[name] = {k: v for k, v in cfg.items() if k not in ("path", "PDL", "XSUM")}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--ms", type=int, nargs="+", default=[129, 192, 256, 384, 512, 1024])
    ap.add_argument("--nk", nargs="+", default=[f"{n}x{k}" for n, k in BQ.NKS])
    ap.add_argument("--tiles", nargs="+",
                    default=["rule", "TALL", "TALL:2", "WIDE", "WIDE:2", "WIDE:stream",
                             "SMALL:2"])
    ap.add_argument("--sym", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--form", choices=("fp8", "bf16"), default="fp8")
    ap.add_argument("--bits", type=int, choices=(4, 6), default=4,
                    help="weight bits (6: the bf16 form only; the fp8 form takes 4)")
    args = ap.parse_args()
    if args.bits != 4 and args.form == "fp8":
        sys.exit("bench_wg_fp8.py: the fp8 form takes 4-bit weights; give --form bf16 for 6")
    bits, act = args.bits, ("fp8" if args.form == "fp8" else "none")
    if not torch.cuda.is_available():
        sys.exit("bench_wg_fp8.py needs a CUDA GPU")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for N, K, M, x, bf16 in BQ.bf16_cases(gen, args.nk, args.ms):
        for sym in map(bool, args.sym):
            pw = BQ.random_packed(gen, N, K, bits, 128, sym)
            op_args = (x, pw.qweight, pw.scales, pw.zeros, None, None, bits, 128, K, act)
            dispatched = Q.choose_path(M, N, K, bits, 128, act, x.dtype, x.device,
                                       symmetric=sym)
            codes, xs = Q.quantize_activations_triton(x, "fp8", None, False)
            xk, sums = WG.fp8_block_order(codes)
            xp = WG.permute_x_blocks(x, pad_rows=128)  # X_TMA's tiles in the allocation
            w = Q.dequantize_triton(pw.qweight, pw.scales, pw.zeros, bits, 128, K, torch.float32)
            if args.form == "fp8":
                ref = (codes.double() * xs.double()[:, None]) @ w.double().t()
            else:
                ref = x.double() @ w.double().t()
            row = dict(N=N, K=K, M=M, sym=sym, bf16_ms=bf16, dispatched=dispatched["path"],
                       op_rel_err=BQ.rel_err(torch.ops.q3n.qlinear(*op_args), ref))
            # What runs in front of the kernel: the quantizer (fp8 form), x's permutation (bf16)
            front = (lambda: WG.permute_x_blocks(x)) if args.form == "bf16" else \
                (lambda: Q.quantize_activations_triton(x, "fp8", None, False))
            parts = {"op": lambda: torch.ops.q3n.qlinear(*op_args), "quantizer": front}
            for name, cfg in tiles(M, N, K, sms, args.tiles, args.form, bits).items():
                if isinstance(cfg, str):
                    row[f"{name}_skipped"] = cfg
                    continue
                def fn(cfg=cfg):
                    if args.form == "bf16":
                        return WG.run(xp, pw.qweight, pw.scales, pw.zeros, None, K, cfg,
                                      Q._tickets, x_permuted=True, bits=bits)
                    return WG.run_fp8(xk, sums, xs, pw.qweight, pw.scales, pw.zeros, None, K,
                                      cfg, Q._tickets)
                try:
                    err = BQ.rel_err(fn(), ref)
                except Exception as exc:
                    row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                    continue
                row[f"{name}_rel_err"] = err
                row[f"{name}_cfg"] = cfg
                if err > TOL:
                    row[f"{name}_error"] = f"wrong result: {err:.3g}"
                    continue
                parts[name] = fn
            BQ.time_parts(parts, row)
            best = min((row[f"{n}_ms"], n) for n in args.tiles if f"{n}_ms" in row) \
                if any(f"{n}_ms" in row for n in args.tiles) else (None, None)
            row["best"] = best[1]
            q = row.get("quantizer_ms", 0.0)
            print(f"{N:>6} {K:>6} {M:>5} {'sym' if sym else 'zp ':>3} bf16 {bf16:.4f} "
                  f"op ({dispatched['path']}) {row['op_ms']:.4f} ({bf16 / row['op_ms']:.2f}x) "
                  f"quantizer {q:.4f} | "
                  + " ".join(f"{n} {row[n + '_ms']:.4f}" if f"{n}_ms" in row
                             else f"{n} n/a" if f"{n}_skipped" in row
                             else f"{n} ERR({row.get(n + '_error', '?')[:60]})"
                             for n in args.tiles)
                  + (f" | best+quant {(best[0] + q):.4f} ({bf16 / (best[0] + q):.2f}x bf16, "
                     f"{row['op_ms'] / (best[0] + q):.2f}x op)" if best[0] else ""),
                  flush=True)
            rows.append(row)
        torch.cuda.empty_cache()
    BQ.write_result(args.out, dict(BQ.result_header("CUDA-graph replay, do_bench median"),
                                   form=args.form, bits=bits, rows=rows))


if __name__ == "__main__":
    main()
