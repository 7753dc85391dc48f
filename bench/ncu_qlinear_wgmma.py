"""One launch of the Gluon swapped tile (kernels/qlinear_wgmma.py) for Nsight Compute, after a
warm-up outside the profiled range (``ncu --profile-from-start off``).

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \
        --section WarpStateStats python bench/ncu_qlinear_wgmma.py 128 28672 8192 128,128,8,4,1
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_qlinear import random_packed  # noqa: E402
from q3n_compile.kernels import qlinear as Q  # noqa: E402
from q3n_compile.kernels import qlinear_wgmma as WG  # noqa: E402


def main():
    M, N, K = (int(v) for v in sys.argv[1:4])
    bm, bn, warps, stages, split = (int(v) for v in sys.argv[4].split(","))
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, STAGES=stages, SPLIT_K=split)
    gen = torch.Generator(device="cuda").manual_seed(0)
    pw = random_packed(gen, N, K, 4, 128, False)
    x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16)
    xp = WG.permute_x_blocks(x)
    for _ in range(3):
        WG.run(xp, pw.qweight, pw.scales, pw.zeros, None, K, cfg, Q._tickets, x_permuted=True)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    WG.run(xp, pw.qweight, pw.scales, pw.zeros, None, K, cfg, Q._tickets, x_permuted=True)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("case", M, N, K, cfg)


if __name__ == "__main__":
    main()
