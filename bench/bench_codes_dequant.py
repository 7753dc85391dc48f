"""``q3n::qlinear_codes`` where it dequantises its codes for a tile that takes 16-bit x (the wg
path, 65-256 rows, and the heads and rests of its row split): the codes' dequantisation by
torch (one multiply for int8, a widening copy and a multiply for fp8; plain stream order before
the tile, as before session 43) against ``act_dequant.dequantize_codes`` (one Triton pass), in
plain stream order and with programmatic dependent launch into the wg tile
(``qlinear.CODES_WG_PDL``). bf16 ``F.linear`` timed in the same process.

For each (N, K), M and code format: the op as dispatched in the three forms (outputs must be
bit-equal: the same products, rounded once), then the dequantisation alone (torch against the
kernel, permuted as the wg tile takes it). CUDA-graph replays, ``do_bench`` median, L2
flushed. 4-bit g128 weights with zero points, codes per token from the op's quantizer.

    python bench/bench_codes_dequant.py --out bench/results/codes-dequant-h200.json
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_qlinear as BQ  # noqa: E402
from q3n_compile.kernels import act_dequant as AD  # noqa: E402
from q3n_compile.kernels import qlinear as Q  # noqa: E402

NKS = ("4096x4096", "12288x4096", "4096x12288", "28672x8192")
MS = (96, 128, 130, 136, 144, 160, 192, 256)


def _torch_dequant(codes, xs, act_group_size, dtype, perm128=False, pdl=False):
    return AD.dequantize_codes_torch(codes, xs, act_group_size, dtype, perm128)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nk", nargs="+", default=list(NKS))
    ap.add_argument("--ms", nargs="+", type=int, default=list(MS))
    ap.add_argument("--acts", nargs="+", default=["int8", "fp8"], choices=["int8", "fp8", "int12"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_codes_dequant.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    kernel_dequant = AD.dequantize_codes
    rows = []
    for nk in args.nk:
        N, K = (int(v) for v in nk.split("x"))
        pw = BQ.random_packed(gen, N, K, 4, 128, False)
        w = (torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).to(torch.bfloat16)
        for M in args.ms:
            x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16)
            _, bf16_ms = BQ.timed(lambda: F.linear(x, w), eager=False)
            for act in args.acts:
                codes, xs = Q.quantize_activations_triton(x, act, None, False)
                cfmt = (pw.qweight, pw.scales, pw.zeros, None, 4, 128, K, act, torch.bfloat16)
                path = Q.choose_codes_path(M, N, K, 4, 128, act, torch.bfloat16, x.device)

                def op():
                    return torch.ops.q3n.qlinear_codes(codes, xs, *cfmt)

                row = dict(N=N, K=K, M=M, act=act, path=path, bf16_ms=bf16_ms)
                outs = {}
                for form, dequant, pdl in (("torch", _torch_dequant, False),
                                           ("kernel", kernel_dequant, False),
                                           ("kernel_pdl", kernel_dequant, True)):
                    AD.dequantize_codes, Q.CODES_WG_PDL = dequant, pdl
                    try:
                        outs[form] = op()
                        _, row[f"{form}_ms"] = BQ.timed(op, eager=False)
                    finally:
                        AD.dequantize_codes, Q.CODES_WG_PDL = kernel_dequant, True
                row["bit_equal"] = all(torch.equal(outs["torch"], o) for o in outs.values())
                ref = Q.reference_codes(codes, xs, *cfmt[:-1], torch.float64)
                row["rel_err"] = ((outs["kernel_pdl"].double() - ref).abs().max()
                                  / ref.abs().max()).item()
                _, row["dequant_torch_ms"] = BQ.timed(
                    lambda: AD.dequantize_codes_torch(codes, xs, Q.PER_TOKEN, torch.bfloat16,
                                                      True), eager=False)
                _, row["dequant_kernel_ms"] = BQ.timed(
                    lambda: AD.dequantize_codes(codes, xs, Q.PER_TOKEN, torch.bfloat16, True),
                    eager=False)
                rows.append(row)
                print(f"{N:>6} {K:>6} {M:>4} {act:>5} {path['path']:>8} bf16 {bf16_ms:.4f} | "
                      f"torch {row['torch_ms']:.4f} kernel {row['kernel_ms']:.4f} "
                      f"({row['torch_ms'] / row['kernel_ms']:.3f}x) +pdl {row['kernel_pdl_ms']:.4f}"
                      f" ({row['torch_ms'] / row['kernel_pdl_ms']:.3f}x, "
                      f"{bf16_ms / row['kernel_pdl_ms']:.2f}x bf16) | dequant alone "
                      f"{row['dequant_torch_ms'] * 1e3:.1f} / {row['dequant_kernel_ms'] * 1e3:.1f}"
                      f" us | bit-equal {row['bit_equal']} err {row['rel_err']:.1e}", flush=True)
        del pw, w
        torch.cuda.empty_cache()
    BQ.write_result(args.out, dict(BQ.result_header("CUDA-graph replay, do_bench median, L2 "
                                                    "flushed"), rows=rows))


if __name__ == "__main__":
    main()
