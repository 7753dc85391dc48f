"""``q3n::qlinear_codes`` (the norm fusion's sibling linears, fed activation codes) on one GPU:
the mmT tile reading the codes itself against the route it replaced, with bf16 cuBLAS and the
plain ``q3n::qlinear`` (activation quantisation + GEMM) in the same process.

- ``codes_mmT``: the dispatched mmT tile reading int8 / fp8 / 12-bit codes and their scales
  itself (XCODES, x unpermuted: one launch);
- ``codes_dequant_then_mmT``: the codes dequantised by a torch multiply (permuted per block
  where the dispatched tile takes x permuted), then mmT on 16-bit x (two launches);
- ``qlinear_codes``: the op as dispatched (one of the two, by ``qlinear.mmT_reads_codes``);
- ``qlinear``: ``q3n::qlinear`` on the 16-bit x (quantise-dequantise pass + mmT);
- ``bf16``: ``F.linear``.

Every implementation is checked against a float64 reference first; times are CUDA-graph replays
(``do_bench`` median, L2 flushed). Writes JSON (GPU, versions, commit, date, rows).

    python bench/bench_qlinear_codes.py --out bench/results/qlinear-codes-h200.json
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_qlinear import (NKS, check_and_time, random_packed, result_header, timed,  # noqa: E402
                           write_result)
from q3n_compile.kernels import act_dequant as AD  # noqa: E402
from q3n_compile.kernels import qlinear as Q  # noqa: E402
from q3n_compile.kernels import qlinear_swap as SW  # noqa: E402

# name -> (bits, group, symmetric, activation format, activation group)
FORMATS = {"w4a8": (4, 128, False, "fp8", Q.PER_TOKEN), "w6a12": (6, 128, False, "int12",
                                                                  Q.PER_TOKEN),
           "w4a8_ag128": (4, 128, False, "fp8", 128)}
TOL = 1e-2  # relative to max |y|: bf16 output rounding


def bf16_peer(M, N, K, gen):
    """(bf16 x [M, K], bf16 ``F.linear``'s CUDA-graph ms on a random [N, K] weight, its row)."""
    x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16)
    w = (torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).to(torch.bfloat16)
    _, bf16_ms = timed(lambda: F.linear(x, w), eager=False)
    return x, bf16_ms, dict(M=M, N=N, K=K, impl="bf16", graph_ms=bf16_ms)


def codes_case(x, N, fmt, gen):
    """(act, packed weight, codes, scales, float64 reference) of format `fmt` = (bits, group,
    symmetric, activation format, activation group) on x: a random packed [N, K] weight, x's
    codes by the op's quantizer, and ``qlinear.reference_codes`` in float64 (fp8 becomes int8
    on a GPU without fp8)."""
    bits, group, sym, act, ag = fmt
    if act == "fp8" and not Q.fp8_supported(x.device):
        act = "int8"
    K = x.shape[1]
    pw = random_packed(gen, N, K, bits, group, sym)
    codes, xs = Q.quantize_activations_triton(x, act, None, False, ag)
    ref = Q.reference_codes(codes, xs, pw.qweight, pw.scales, pw.zeros, None, bits, group, K,
                            act, torch.float64, ag)
    return act, pw, codes, xs, ref


def run_shape(M, N, K, formats, gen):
    x, bf16_ms, bf16_row = bf16_peer(M, N, K, gen)
    rows = [bf16_row]
    for name in formats:
        bits, group, sym, _, ag = FORMATS[name]
        act, pw, codes, xs, ref = codes_case(x, N, FORMATS[name], gen)
        cfg = Q.choose_path(M, N, K, bits, group, act, x.dtype, x.device, act_group_size=ag)
        w_args = (pw.qweight, pw.scales, pw.zeros, None, bits, group)

        def op():
            return torch.ops.q3n.qlinear_codes(codes, xs, *w_args, K, act, x.dtype, ag)

        def new():
            return SW.run(codes, *w_args, dict(cfg, XPERM=False), False, Q._tickets,
                          xscales=xs, act_group_size=ag, out_dtype=x.dtype)

        def old():
            xperm = bool(cfg.get("XPERM"))
            a = AD.dequantize_codes_torch(codes, xs, ag, x.dtype, perm128=xperm)
            return SW.run(a, *w_args, cfg, False, Q._tickets, x_permuted=xperm, K=K)

        def plain():
            return torch.ops.q3n.qlinear(x, pw.qweight, pw.scales, pw.zeros, None, None, bits,
                                         group, K, act, ag)

        impls = [("qlinear_codes", op), ("qlinear", plain)]
        if cfg["path"] == "mmT":
            impls[1:1] = [("codes_mmT", new), ("codes_dequant_then_mmT", old)]
        for impl, fn in impls:
            row = dict(M=M, N=N, K=K, impl=f"{name}_{impl}", act=act, path=cfg)
            rows.append(check_and_time(fn, ref, bf16_ms, TOL, row, check=impl != "qlinear"))
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--ms", type=int, nargs="+", default=[4, 16, 32, 64, 128])
    ap.add_argument("--nk", nargs="+", default=[f"{n}x{k}" for n, k in NKS])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_qlinear_codes.py needs a CUDA GPU")
    started = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print(f"{'N':>6} {'K':>6} {'M':>4} {'impl':>32} {'err':>8} {'graph ms':>9} {'vs bf16':>8}")
    for nk in args.nk:
        N, K = map(int, nk.lower().split("x"))
        for M in args.ms:
            for r in run_shape(M, N, K, args.formats, gen):
                rows.append(r)
                err = r.get("rel_err_vs_float64")
                print(f"{N:>6} {K:>6} {M:>4} {r['impl']:>32} "
                      f"{'' if err is None else format(err, '8.1e'):>8} "
                      f"{r.get('graph_ms') or 0:9.4f} {r.get('vs_bf16') or 0:8.2f}"
                      + (f"  {r['error']}" if "error" in r else ""), flush=True)
    write_result(args.out, dict(
        result_header("triton.testing.do_bench median of CUDA-graph replays (L2 flushed)"),
        wall_s=round(time.time() - started, 1), rows=rows))


if __name__ == "__main__":
    main()
