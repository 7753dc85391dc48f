"""One launch of the Gluon swapped tile (kernels/qlinear_wgmma.py) for Nsight Compute, after a
warm-up outside the profiled range (``ncu --profile-from-start off``).

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \
        --section WarpStateStats python bench/ncu_qlinear_wgmma.py 128 28672 8192 128,128,8,4,1

The tile ``decode`` profiles the launch :func:`qlinear_wgmma.choose_decode` gives (1-32 rows:
stream-K, SCALE_AFTER, XSUM at 17-32 rows), x permuted by the op itself (filter the tile with
``-k regex:qlinear_wg``). A tile may be named (``TALL``, ``WIDE``, ... with ``:split``), and a
fifth argument ``fp8`` profiles the fp8 form (:func:`qlinear_wgmma.run_fp8`) on the op's own
fp8 codes of x in :func:`qlinear_wgmma.fp8_block_order`, ``scale_after`` the bf16 form with
SCALE_AFTER and XSUM (x permuted by the op's own kernel: filter the tile with ``-k
regex:qlinear_wg``).
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
    gen = torch.Generator(device="cuda").manual_seed(0)
    pw = random_packed(gen, N, K, 4, 128, False)
    x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16)
    if sys.argv[4] == "decode":
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        cfg = WG.choose_decode(M, N, K, sms)
        if cfg is None:
            raise SystemExit(f"no decode launch for {M} rows of {N} x {K}")
        cfg = dict(cfg, PDL=False)
        xp, permuted = x, False
    elif sys.argv[4][0].isalpha():
        name, _, split = sys.argv[4].partition(":")
        cfg = dict(getattr(WG, name), SPLIT_K=int(split or 1))
        xp, permuted = WG.permute_x_blocks(x), True
    else:
        bm, bn, warps, stages, split = (int(v) for v in sys.argv[4].split(","))
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, STAGES=stages, SPLIT_K=split)
        xp, permuted = WG.permute_x_blocks(x), True
    if sys.argv[5:] == ["fp8"]:
        codes, xscale = Q.quantize_activations_triton(x, "fp8", None, False)
        xk, sums = WG.fp8_block_order(codes)

        def launch():
            WG.run_fp8(xk, sums, xscale, pw.qweight, pw.scales, pw.zeros, None, K, cfg,
                       Q._tickets)
    elif sys.argv[5:] == ["scale_after"]:
        cfg = dict(cfg, SCALE_AFTER=True, XSUM=True, PDL=False)

        def launch():
            WG.run(x, pw.qweight, pw.scales, pw.zeros, None, K, cfg, Q._tickets)
    else:
        def launch():
            WG.run(xp, pw.qweight, pw.scales, pw.zeros, None, K, cfg, Q._tickets,
                   x_permuted=permuted)
    for _ in range(3):
        launch()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    launch()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("case", M, N, K, cfg, *sys.argv[5:])


if __name__ == "__main__":
    main()
