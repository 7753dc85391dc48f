"""Where q3n::qlinear's dequantise path spends its time at large M, on one GPU: each part timed
alone, beside bf16 ``F.linear`` in the same process.

For the issue's (N, K) shapes and M in {1024, 4096} (``--ms``), the formats that take
dequantise + cuBLAS from 257 rows (W4A16 and W6A16 g128; W6A12 g128, whose 12-bit activations
are quantised and dequantised in one pass first, ``quantize_activations_triton(dequant=True)``):
- ``act``: that activation pass alone (quantized activations only);
- ``dequant``: the weight's dequantise kernel alone (:func:`Q.dequantize_triton`, ``W [N, K]``
  in x's dtype; ``W^T [K, N]`` before session 28);
- ``gemm``: ``F.linear`` alone on the pass's outputs (the same cuBLAS call as bf16's; before
  session 28 ``torch.mm`` on ``W^T``);
- ``op``: the whole op as dispatched.
CUDA-graph replay, triton.testing.do_bench median (bench_qlinear.py's ``timed``). The op's
time against the parts' sum says what the launches between them cost.

    python bench/bench_dequant_parts.py --out bench/results/dequant-parts-h200.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_qlinear as BQ  # noqa: E402
from q3n_compile.kernels import qlinear as Q  # noqa: E402

FORMATS = {"w4a16": (4, 128, False, "none"), "w6a16": (6, 128, False, "none"),
           "w6a12": (6, 128, False, "int12")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--ms", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--nk", nargs="+", default=[f"{n}x{k}" for n, k in BQ.NKS])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_dequant_parts.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for N, K, M, x, bf16 in BQ.bf16_cases(gen, args.nk, args.ms):
        for name in args.formats:
            bits, group, sym, act = FORMATS[name]
            pw = BQ.random_packed(gen, N, K, bits, group, sym)
            op_args = (x, pw.qweight, pw.scales, pw.zeros, None, None, bits, group, K, act)
            path = Q.choose_path(M, N, K, bits, group, act, x.dtype, x.device)
            a = (x if act == "none" else
                 Q.quantize_activations_triton(x, act, None, False, dequant=True)[0])
            w = Q.dequantize_triton(pw.qweight, pw.scales, pw.zeros, bits, group, K, x.dtype)
            parts = {
                "dequant": lambda: Q.dequantize_triton(pw.qweight, pw.scales, pw.zeros,
                                                       bits, group, K, x.dtype),
                "gemm": lambda: F.linear(a, w),
                "op": lambda: torch.ops.q3n.qlinear(*op_args),
            }
            if act != "none":
                parts["act"] = lambda: Q.quantize_activations_triton(x, act, None, False,
                                                                     dequant=True)
            row = dict(N=N, K=K, M=M, format=name, path=path, bf16_ms=bf16)
            rows.append(BQ.time_parts(parts, row))
            print(f"{N:>6} {K:>6} {M:>5} {name:>6} {path['path']:>8} bf16 {bf16:.4f} "
                  + " ".join(f"{p} {row[p + '_ms']:.4f}" for p in parts
                             if row.get(p + "_ms"))
                  + (f"  (op {bf16 / row['op_ms']:.2f}x bf16)" if row.get("op_ms") else ""),
                  flush=True)
        torch.cuda.empty_cache()
    BQ.write_result(args.out, dict(BQ.result_header("CUDA-graph replay, do_bench median"),
                                   rows=rows))


if __name__ == "__main__":
    main()
