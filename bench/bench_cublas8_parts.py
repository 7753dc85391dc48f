"""Where q3n::qlinear's cublas8 path spends its time, on one GPU: each part timed alone.

For the issue's (N, K) shapes and M in {256, 4096} (``--ms``), W4A8 g128 (fp8 activations, 1x128
block scales) and W8A8 per channel (int8): the activation quantizer, the unpack of the packed
weight to 8-bit ``[N, K]`` codes, cuBLAS's 8-bit GEMM alone on those codes (``torch._scaled_mm``
block-scaled / row-wise, ``torch._int_mm``), the whole path, and bf16 ``F.linear`` in the same
run. CUDA-graph replay, triton.testing.do_bench median (bench_qlinear.py's ``timed``).

    python bench/bench_cublas8_parts.py --out bench/results/cublas8-parts-h200.json
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
from q3n_compile.kernels import qlinear_cublas8 as C8  # noqa: E402

FORMATS = {"w4a8_g128": (4, 128, False, "fp8"), "w8a8_pc": (8, -1, True, "int8")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--ms", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--nk", nargs="+", default=[f"{n}x{k}" for n, k in BQ.NKS])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cublas8_parts.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for N, K, M, x, bf16 in BQ.bf16_cases(gen, args.nk, args.ms):
        for name, (bits, group, sym, act) in FORMATS.items():
            pw = BQ.random_packed(gen, N, K, bits, group, sym)
            codes, xs = Q.quantize_activations_triton(x, act, None, False)
            w8 = C8.unpack_codes_8bit(pw.qweight, pw.zeros, bits, group, K,
                                      codes.dtype)
            parts = {
                "quantize": lambda: Q.quantize_activations_triton(x, act, None, False),
                "unpack": lambda: C8.unpack_codes_8bit(pw.qweight, pw.zeros, bits, group, K,
                                                       codes.dtype),
                "path": lambda: C8.run(codes, xs, pw.qweight, pw.scales, pw.zeros, None,
                                       bits, group, act, Q.PER_TOKEN, torch.bfloat16),
                "op": lambda: torch.ops.q3n.qlinear(x, pw.qweight, pw.scales, pw.zeros,
                                                    None, None, bits, group, K, act),
            }
            if act == "fp8":
                sa = xs[None, :].expand(K // 128, M).contiguous().t()
                s = pw.scales.float()
                parts["gemm"] = lambda: torch._scaled_mm(codes, w8.t(), scale_a=sa, scale_b=s,
                                                         out_dtype=torch.bfloat16)
                s1 = s[:1].contiguous()
                parts["gemm_rowwise"] = lambda: torch._scaled_mm(
                    codes, w8.t(), scale_a=xs[:, None], scale_b=s1, out_dtype=torch.bfloat16)
            else:
                parts["gemm"] = lambda: torch._int_mm(codes, w8.t())
            row = dict(N=N, K=K, M=M, format=name, bf16_ms=bf16)
            rows.append(BQ.time_parts(parts, row))
            print(f"{N:>6} {K:>6} {M:>5} {name:>10} bf16 {bf16:.4f} " + " ".join(
                f"{p} {row[p + '_ms']:.4f}" for p in parts if row.get(p + "_ms")), flush=True)
        torch.cuda.empty_cache()
    BQ.write_result(args.out, dict(BQ.result_header("CUDA-graph replay, do_bench median"),
                                   rows=rows))


if __name__ == "__main__":
    main()
