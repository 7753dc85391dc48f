"""What-if: W4A16 just above 128 rows as two calls of q3n::qlinear, the first 128 rows and the
rest, against the op as dispatched on all rows and bf16 ``F.linear``, on one GPU.

Why: from 129 rows the wg rule's tiles hold 128 rows of x each, so a second tile of rows
unpacks the whole weight again for as little as one row: 12288 x 4096 took 0.0636 ms at 129
rows against 0.0385 at 128 (s38run4). Two calls read the packed weight twice, but the second
one's few rows go to the memory-bound small-M tiles. Timed as one CUDA graph each (the split
includes the concatenation of the two outputs), ``do_bench`` median, L2 flushed; the split's
output is checked against the op's. Not dispatched: an experiment for the rule. Written in
session 38 and not run yet (the session's device time was spent): no figure exists.

    python bench/wg_row_split_experiment.py --out bench/results/wg-row-split-h200.json
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

BITS, GROUP, HEAD = 4, 128, 128


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--ms", type=int, nargs="+", default=[129, 136, 160, 192])
    ap.add_argument("--nk", nargs="+",
                    default=["12288x4096", "4096x12288", "4096x4096", "28672x8192"])
    args = ap.parse_args()
    if min(args.ms) <= HEAD:
        ap.error(f"--ms: every M must exceed {HEAD} (the first call's rows), got {min(args.ms)}")
    if not torch.cuda.is_available():
        sys.exit("wg_row_split_experiment.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for N, K, M, x, bf16 in BQ.bf16_cases(gen, args.nk, args.ms):
        pw = BQ.random_packed(gen, N, K, BITS, GROUP, False)
        fmt = (pw.qweight, pw.scales, pw.zeros, None, None, BITS, GROUP, K, "none")
        head, tail = x[:HEAD], x[HEAD:]

        def split():
            return torch.cat([torch.ops.q3n.qlinear(head, *fmt),
                              torch.ops.q3n.qlinear(tail, *fmt)])

        row = dict(N=N, K=K, M=M, bf16_ms=bf16,
                   path=Q.choose_path(M, N, K, BITS, GROUP, "none", x.dtype, x.device),
                   tail_path=Q.choose_path(M - HEAD, N, K, BITS, GROUP, "none", x.dtype,
                                           x.device),
                   split_rel_err_vs_op=BQ.rel_err(split(), torch.ops.q3n.qlinear(x, *fmt)))
        BQ.time_parts({"op": lambda: torch.ops.q3n.qlinear(x, *fmt), "split": split,
                       "head": lambda: torch.ops.q3n.qlinear(head, *fmt)}, row)
        op, sp = row.get("op_ms"), row.get("split_ms")
        print(f"{N:>6} {K:>6} {M:>4} bf16 {bf16:.4f} op {op:.4f} ({bf16 / op:.2f}x) "
              f"split {sp:.4f} ({bf16 / sp:.2f}x bf16, {op / sp:.2f}x op; 128 rows alone "
              f"{row.get('head_ms', 0):.4f}, tail {row['tail_path']['path']}) "
              f"err {row['split_rel_err_vs_op']:.1e}", flush=True)
        rows.append(row)
    BQ.write_result(args.out, dict(BQ.result_header("CUDA-graph replay, do_bench median"),
                                   rows=rows))


if __name__ == "__main__":
    main()
