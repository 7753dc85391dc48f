"""What x's per-block permutation costs the wg path (W4A16 g128, 16-bit x): the dispatched op,
the wg kernel alone on x already permuted (same launch), and the permutation alone
(``qlinear_swap.permute_x_blocks``: the Triton kernel since s20run9, and the torch transpose-copy
it replaced, ``permute_x_blocks_torch``), each as a CUDA-graph replay.

Why: the wg tile multiplies sub-tile j of each 128-channel block by channels {8r + j}, the order
the packing gives its unpack, so the op permutes x first, one more kernel per call. Removing it
(a nibble order in the packing that matches x's) would touch every 4-bit kernel; this measures
what it would gain first.

    python bench/wg_permute_cost.py --out bench/results/x.json
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_qlinear import TOL, random_packed, result_header, timed, write_result  # noqa: E402
from q3n_compile.kernels import qlinear as Q  # noqa: E402
from q3n_compile.kernels import qlinear_wgmma as WG  # noqa: E402
from q3n_compile.kernels.qlinear_swap import (permute_x_blocks,  # noqa: E402
                                              permute_x_blocks_torch)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nk", nargs="+", default=["4096x4096", "12288x4096", "4096x12288",
                                                 "28672x8192"])
    ap.add_argument("--ms", nargs="+", type=int, default=[64, 128, 256])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = dict(result_header("CUDA-graph replay, do_bench median, L2 flushed"), rows=[])
    for nk in args.nk:
        N, K = (int(v) for v in nk.split("x"))
        pw = random_packed(gen, N, K, 4, 128, False)
        for M in args.ms:
            x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16)
            qargs = (x, pw.qweight, pw.scales, pw.zeros, None, None, 4, 128, K, "none",
                     Q.PER_TOKEN)
            cfg = Q.choose_path(M, N, K, 4, 128, "none", x.dtype, x.device)
            if cfg["path"] != "wg":
                continue
            xk = permute_x_blocks(x)
            ref = Q.reference(x.double(), *qargs[1:]).double()

            def kernel():
                return WG.run(xk, pw.qweight, pw.scales, pw.zeros, None, K, cfg,
                              tickets=Q._tickets, x_permuted=True)

            err = ((kernel().double() - ref).abs().max() / ref.abs().max()).item()
            op_ms = timed(lambda: torch.ops.q3n.qlinear(*qargs), eager=False)[1]
            kernel_ms = timed(kernel, eager=False)[1]
            perm_ms = timed(lambda: permute_x_blocks(x), eager=False)[1]
            torch_ms = timed(lambda: permute_x_blocks_torch(x), eager=False)[1]
            row = dict(N=N, K=K, M=M, cfg=cfg, op_ms=op_ms, kernel_ms=kernel_ms,
                       permute_ms=perm_ms, permute_torch_ms=torch_ms, err=err, ok=err <= TOL)
            result["rows"].append(row)
            print(f"{nk} M={M}: op {op_ms:.4f}  kernel on permuted x {kernel_ms:.4f} "
                  f"({kernel_ms / op_ms:.3f}x)  permute alone {perm_ms:.4f} (torch's "
                  f"{torch_ms:.4f})  err {err:.1e}",
                  flush=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
