"""q3n::qlinear W4A16 / W6A16 g128 with zero points where the wg rule copies x by TMA (TALL_TMA,
WIDE_TMA: sessions 37-38) as dispatched, against the same op forced onto the launch the rule
gives without x by TMA, and bf16 ``F.linear``, on one GPU.

Why: sessions 37-38 measured those tiles as the kernel alone on x already in block order
(s37run4, s38run3); the op also permutes x into a padded buffer and builds a TMA descriptor
per call. This times the whole op both ways in one process. The launch without TMA is what
:func:`q3n_compile.kernels.qlinear.choose_path` gives with ``symmetric=True`` (the branch that
leaves x by TMA out, otherwise the same rule: the rule before session 37 at these shapes).
Each forced output is checked against the dispatched one first. CUDA-graph replay,
``do_bench`` median, L2 flushed.

    python bench/bench_tall_tma_op.py --out bench/results/tall-tma-op-h200.json
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


def _name(cfg: dict) -> str:
    return (f"{cfg['path']} {cfg.get('BLOCK_M')}x{cfg.get('BLOCK_N')} s{cfg.get('STAGES')}"
            f"{' tma' if cfg.get('X_TMA') else ''} split{cfg.get('SPLIT_K')}")


def time_shape(N: int, K: int, M: int, x, bf16: float, bits: int, gen) -> dict:
    """One row: the op as dispatched and forced onto the launch without TMA, timed."""
    pw = BQ.random_packed(gen, N, K, bits, GROUP, False)
    op_args = (x, pw.qweight, pw.scales, pw.zeros, None, None, bits, GROUP, K, "none")
    dispatched = Q.choose_path(M, N, K, bits, GROUP, "none", x.dtype, x.device)
    previous = Q.choose_path(M, N, K, bits, GROUP, "none", x.dtype, x.device, symmetric=True)
    ref = torch.ops.q3n.qlinear(*op_args)
    err = BQ.rel_err(Q._launch(*op_args, interpreter=False, path=previous), ref)
    row = dict(N=N, K=K, M=M, bits=bits, bf16_ms=bf16, dispatched=dispatched,
               previous=previous, previous_rel_err_vs_dispatched=err)
    parts = {"op": lambda: torch.ops.q3n.qlinear(*op_args),
             "previous": lambda: Q._launch(*op_args, interpreter=False, path=previous)}
    if err > 2e-2:
        parts.pop("previous")
        row["previous_error"] = f"differs from the dispatched output: {err:.2e}"
    BQ.time_parts(parts, row)
    op_ms, prev_ms = row.get("op_ms"), row.get("previous_ms")
    print(f"{N:>6} {K:>6} {M:>4} W{bits} bf16 {bf16:.4f}  op [{_name(dispatched)}] "
          + (f"{op_ms:.4f} ({bf16 / op_ms:.2f}x bf16)" if op_ms else row.get("op_error", "?"))
          + f"  previous [{_name(previous)}] "
          + (f"{prev_ms:.4f} ({bf16 / prev_ms:.2f}x bf16; op {prev_ms / op_ms:.2f}x it)"
             if prev_ms and op_ms else row.get("previous_error", "failed")), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--ms", type=int, nargs="+", default=[65, 96, 128, 129, 160, 192, 256])
    ap.add_argument("--nk", nargs="+", default=["4096x4096", "4096x12288", "12288x4096"])
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 6], choices=(4, 6))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_tall_tma_op.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = [time_shape(N, K, M, x, bf16, bits, gen)
            for N, K, M, x, bf16 in BQ.bf16_cases(gen, args.nk, args.ms) for bits in args.bits]
    BQ.write_result(args.out, dict(BQ.result_header("CUDA-graph replay, do_bench median"),
                                   rows=rows))


if __name__ == "__main__":
    main()
