"""Seconds of one calibrated ``quantize_layer`` call per weight shape and format, and where they
go (cProfile, the quantize algorithms' own functions), on random weights with a few outlier input
channels.

    python bench/profile_quant_layer.py 4096x4096,12288x4096 256 w8a8,w4a8,w6a12

`rows`: calibration rows added to the statistics (at most 512 are kept as samples: with more, the
held-out GPTQ check is skipped and GPTQ runs once on all of them). Prints the GPU, torch, triton
and commit first. Session 33: before and after GPTQ's column kernel
(``quant-layer-profile-*-s33run{1,4}.txt`` in bench/results).
"""

import cProfile
import io
import pstats
import sys
import time

import torch
import triton

from q3n_compile.quant.algorithms import quantize_layer
from q3n_compile.quant.calibration import LayerStats
from q3n_compile.quant.config import CalibrationSettings, LayerFormat

from profile_quant_compile import _commit


def main() -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"# {gpu}, torch {torch.__version__}, triton {triton.__version__}, commit {_commit()}")
    shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[1].split(",")]
    rows = int(sys.argv[2])
    fp8 = "fp8" if dev == "cuda" else "int8"
    fmts = {"w8a8": LayerFormat(8, 8, -1, True, "int8"), "w4a8": LayerFormat(4, 8, 128, False, fp8),
            "w6a12": LayerFormat(6, 12, 128, False, "int12"),
            "w4a16": LayerFormat(4, 16, 128, False, "none")}
    gen = torch.Generator().manual_seed(0)
    for n, k in shapes:
        w = (torch.randn(n, k, generator=gen) * 0.02).to(dev, torch.bfloat16)
        x = torch.randn(rows, k, generator=gen)
        x[:, :8] *= 20  # a few outlier channels
        stats = LayerStats(k)
        stats.add(x.to(dev))
        for name in sys.argv[3].split(","):
            fmt = fmts[name]
            quantize_layer(w, None, fmt, CalibrationSettings(), stats)  # warm up (kernel compiles)
            if dev == "cuda":
                torch.cuda.synchronize()
            prof = cProfile.Profile()
            start = time.perf_counter()
            prof.enable()
            res = quantize_layer(w, None, fmt, CalibrationSettings(), stats)
            if dev == "cuda":
                torch.cuda.synchronize()
            prof.disable()
            print(f"== {n}x{k} rows={rows} {name}: {time.perf_counter() - start:.3f} s "
                  f"method={res.info['method']}", flush=True)
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(22)
            print("\n".join(line for line in out.getvalue().splitlines()
                            if "algorithms" in line or "function calls" in line
                            or "cumtime" in line))


if __name__ == "__main__":
    main()
