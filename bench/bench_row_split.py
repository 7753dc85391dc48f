"""The op's row split (path "rowsplit", :func:`q3n_compile.kernels.qlinear_wgmma.row_split_head`)
measured: W4A16 g128 (other formats with ``--bits`` / ``--act``) just past whole 128-row tiles
as the op dispatches it, as one launch (the tile rule alone, ``allow_row_split=False``) and as
the split forced at every M (the whole tiles of rows, then the rest), against ``F.linear`` in
x's dtype (bf16, or fp16 with ``--dtype``; the column is named bf16_ms either way), on one GPU.

Why: from 129 rows the wg rule's tiles hold 128 rows of x each, so a second tile of rows unpacks
the whole weight again for as little as one row (12288 x 4096: 0.0635 ms at 129 rows against
0.0385 at 128, s39run1). The split reads the packed weight twice, but the rest's few rows go to
the memory-bound small-M paths. Each timed as one CUDA graph, ``do_bench`` median, L2 flushed;
the split's output is checked against the one launch's. ``--codes`` times
``q3n::qlinear_codes`` (a fused norm's sibling linears) on x's codes instead of the op;
``--concurrent`` adds the split with its rest on a second stream beside the head (with
``--codes`` also the op's concurrent launch, its rest on the decode tile, where the op takes
one).

    python bench/bench_row_split.py --out bench/results/row-split-h200.json
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
from q3n_compile.kernels import qlinear as Q  # noqa: E402

GROUP = 128


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--ms", type=int, nargs="+", default=[129, 136, 144, 160, 192])
    ap.add_argument("--nk", nargs="+", default=["12288x4096", "28672x8192", "4096x12288"])
    ap.add_argument("--sym", action="store_true", help="symmetric weights (no zero points)")
    ap.add_argument("--bits", type=int, choices=[4, 6], default=4)
    ap.add_argument("--act", choices=["none", "int8", "fp8", "int12"], default="none")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16",
                    help="x's dtype (and the F.linear peer's)")
    ap.add_argument("--codes", action="store_true",
                    help="time q3n::qlinear_codes on x's codes (quantized by the op's quantizer "
                         "first, not timed) in place of the op; needs --act int8/fp8/int12")
    ap.add_argument("--concurrent", action="store_true",
                    help="also time the split with its rest on a second stream beside the head "
                         "(CONCURRENT), the rest as dispatched")
    args = ap.parse_args()
    if args.codes and args.act == "none":
        ap.error("--codes needs quantized activations: --act int8, fp8 or int12")
    if any(m % 128 == 0 or m < 128 for m in args.ms):
        ap.error(f"--ms: every M must exceed 128 and not be a whole number of 128-row tiles "
                 f"(the split's rest would be empty), got {args.ms}")
    if not torch.cuda.is_available():
        sys.exit("bench_row_split.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16)[args.dtype]
    for N, K, M, x, bf16 in BQ.bf16_cases(gen, args.nk, args.ms, dtype):
        pw = BQ.random_packed(gen, N, K, args.bits, GROUP, args.sym)
        fmt = (pw.qweight, pw.scales, pw.zeros, None, None, args.bits, GROUP, K, args.act)
        head = M - M % 128
        choose = Q.choose_codes_path if args.codes else Q.choose_path
        one_path = choose(M, N, K, args.bits, GROUP, args.act, x.dtype, x.device,
                          symmetric=args.sym, allow_row_split=False)
        split_path = dict(path="rowsplit", HEAD=head)

        if args.codes:
            codes, xs = Q.quantize_activations_triton(x, args.act, None, False)
            cfmt = fmt[:4] + fmt[5:] + (x.dtype,)

            def launch(path):
                return lambda: Q._qlinear_codes_launch(codes, xs, *cfmt, interpreter=False,
                                                       path=path)

            def op_call():
                return torch.ops.q3n.qlinear_codes(codes, xs, *cfmt)
        else:
            def launch(path):
                return lambda: Q._launch(x, *fmt, interpreter=False, path=path)

            def op_call():
                return torch.ops.q3n.qlinear(x, *fmt)

        row = dict(N=N, K=K, M=M, bits=args.bits, act=args.act, sym=args.sym,
                   codes=args.codes, dtype=args.dtype, bf16_ms=bf16,
                   path=choose(M, N, K, args.bits, GROUP, args.act, x.dtype, x.device,
                               symmetric=args.sym),
                   one_path=one_path,
                   split_rel_err_vs_one=BQ.rel_err(launch(split_path)(), launch(one_path)()))
        calls = {"op": op_call, "one": launch(one_path), "split": launch(split_path)}
        if args.concurrent:
            calls["concurrent"] = launch(dict(split_path, CONCURRENT=True))
            row["concurrent_rel_err_vs_one"] = BQ.rel_err(calls["concurrent"](),
                                                          launch(one_path)())
            op_cfg = Q.choose_path(M, N, K, args.bits, GROUP, args.act, x.dtype, x.device,
                                   symmetric=args.sym)
            if args.codes and op_cfg.get("CONCURRENT"):
                # The op's own concurrent launch (its rest on the decode tile, capped) on codes.
                calls["concurrent_op_rest"] = launch(op_cfg)
                row["concurrent_op_rest_rel_err_vs_one"] = BQ.rel_err(
                    calls["concurrent_op_rest"](), launch(one_path)())
        BQ.time_parts(calls, row)
        op, one, sp = row.get("op_ms"), row.get("one_ms"), row.get("split_ms")
        rows.append(row)
        if None in (op, one, sp):
            print(f"{N:>6} {K:>6} {M:>4} failed: "
                  f"{ {k: v for k, v in row.items() if k.endswith('_error')} }", flush=True)
            continue
        print(f"{N:>6} {K:>6} {M:>4} bf16 {bf16:.4f} | op {op:.4f} ({bf16 / op:.2f}x bf16, "
              f"{row['path']['path']}) | one launch {one:.4f} ({bf16 / one:.2f}x) | split "
              f"{sp:.4f} ({bf16 / sp:.2f}x bf16, {one / sp:.2f}x one) "
              f"err {row['split_rel_err_vs_one']:.1e}"
              + (f" | concurrent {row['concurrent_ms']:.4f} ({sp / row['concurrent_ms']:.2f}x "
                 f"split) err {row['concurrent_rel_err_vs_one']:.1e}"
                 if row.get("concurrent_ms") else "")
              + (f" | with the op's rest {row['concurrent_op_rest_ms']:.4f} "
                 f"({sp / row['concurrent_op_rest_ms']:.2f}x split)"
                 if row.get("concurrent_op_rest_ms") else ""), flush=True)
    BQ.write_result(args.out, dict(BQ.result_header("CUDA-graph replay, do_bench median"),
                                   rows=rows))


if __name__ == "__main__":
    main()
