"""Where a calibrated quantized compile spends its time: cProfile of the first call of qwen3
(built-in, random init) compiled with every linear W8A8 (per channel, per token, calibrated on the
example inputs), the pass times from the report, then the functions by cumulative and own time.

    python bench/profile_quant_compile.py [size=bench] [seq_len=256]

Prints the GPU, torch, triton and commit (Q3N_COMMIT or git) first. Session 33 ran it on an H200
before and after GPTQ's column kernel and the written-out noise-model gradient (bench/RESULTS.md,
``quant-compile-profile-*-s33run6.txt``).
"""

import cProfile
import io
import os
import pstats
import subprocess
import sys
import time

import torch
import triton

import q3n_compile
from q3n_compile import models


def _commit() -> str:
    if os.environ.get("Q3N_COMMIT"):
        return os.environ["Q3N_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__)).stdout.strip() or "?"
    except OSError:
        return "?"


def main() -> None:
    size = sys.argv[1] if len(sys.argv) > 1 else "bench"
    seq = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"# {gpu}, torch {torch.__version__}, triton {triton.__version__}, commit {_commit()}")
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    m = models.build_model("qwen3", size, dtype=dtype, device=dev).eval()
    inp = models.example_inputs("qwen3", m, 1, seq, device=dev)
    w8a8 = {"weight_bits": 8, "activation_bits": 8, "group_size": -1}
    c = torch.compile(m, backend="q3n",
                      options={"quant_config": {"ffn_layers": w8a8, "attn_layers": w8a8}})
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    with torch.no_grad():
        c(*inp)
    if dev == "cuda":
        torch.cuda.synchronize()
    prof.disable()
    print(f"first call {time.perf_counter() - start:.1f} s")
    for name, p in q3n_compile.reports()[-1]["passes"].items():
        print(name, p.get("status"), p.get("time_s", p.get("seconds")))
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(120)
    print("\n".join(line for line in out.getvalue().splitlines()
                    if "q3n_compile" in line or "cumtime" in line or "function calls" in line))
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
    print(out.getvalue())


if __name__ == "__main__":
    main()
