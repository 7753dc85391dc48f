"""What x's per-block permutation costs the wg path (W4A16 g128, 16-bit x): the dispatched op,
the wg kernel alone on x already permuted (same launch), and the permutation alone
(``qlinear_swap.permute_x_blocks``: the Triton kernel since s20run9, and the torch transpose-copy
it replaced, ``permute_x_blocks_torch``), each as a CUDA-graph replay.

Why: the wg tile multiplies sub-tile j of each 128-channel block by channels {8r + j}, the order
the packing gives its unpack, so the op permutes x first, one more kernel per call. Removing it
(a nibble order in the packing that matches x's) would touch every 4-bit kernel; this measures
what it would gain first.

    python bench/wg_permute_cost.py --out bench/results/x.json
    python bench/wg_permute_cost.py --decode --ms 1 4 16 --nk 12288x4096 28672x8192

``--decode``: at 1-16 rows the decode tile (:data:`qlinear_wgmma.DECODE_TILES`) also where the
rule keeps the GEMV or mmT ("forced"; its op time is then the permutation and the tile).
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
    ap.add_argument("--decode", action="store_true",
                    help="at 1-16 rows, the decode tile (qlinear_wgmma.DECODE_TILES, SCALE_AFTER, "
                         "stream-K over two programs an SM) also where the rule keeps the GEMV "
                         "or mmT")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
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
            forced = cfg["path"] != "wg" and args.decode and M <= 16
            if forced:
                cfg = dict(WG.DECODE_TILES[8 if M <= 8 else 16], path="wg", SPLIT_K=1,
                           STREAM=2 * sms, SCALE_AFTER=True)
            if cfg["path"] != "wg":
                continue
            xk = permute_x_blocks(x)
            ref = Q.reference(x.double(), *qargs[1:]).double()

            def kernel():
                # XSUM needs the sums of x's own permutation: the kernel alone runs without it.
                return WG.run(xk, pw.qweight, pw.scales, pw.zeros, None, K,
                              dict(cfg, XSUM=False), tickets=Q._tickets, x_permuted=True)

            err = ((kernel().double() - ref).abs().max() / ref.abs().max()).item()
            op_ms = timed((lambda: WG.run(x, pw.qweight, pw.scales, pw.zeros, None, K, cfg,
                                          tickets=Q._tickets)) if forced
                          else (lambda: torch.ops.q3n.qlinear(*qargs)), eager=False)[1]
            kernel_ms = timed(kernel, eager=False)[1]
            perm_ms = timed(lambda: permute_x_blocks(x), eager=False)[1]
            torch_ms = timed(lambda: permute_x_blocks_torch(x), eager=False)[1]
            row = dict(N=N, K=K, M=M, cfg=cfg, forced=forced, op_ms=op_ms, kernel_ms=kernel_ms,
                       permute_ms=perm_ms, permute_torch_ms=torch_ms, err=err, ok=err <= TOL)
            result["rows"].append(row)
            print(f"{nk} M={M}{' (forced decode tile)' if forced else ''}: op {op_ms:.4f}  kernel on permuted x {kernel_ms:.4f} "
                  f"({kernel_ms / op_ms:.3f}x)  permute alone {perm_ms:.4f} (torch's "
                  f"{torch_ms:.4f})  err {err:.1e}",
                  flush=True)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
