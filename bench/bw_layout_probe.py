"""Probe (no unpack, no MMA): how fast an H200 streams a packed 4-bit weight laid out as q3n packs
it, read the way the quantized kernels read it, against the same bytes read contiguously.

Why: at 16 rows of 28672 x 8192 every 4-bit kernel measured (mmT, the warp-specialised wg tile
at 8 and 4 consumer warps, 112-448 programs) ran 0.077 ms, 1.6-1.8 TB/s of packed bytes, while
cuBLAS streamed the bf16 weight at 4.29 TB/s (Nsight Compute, s20run5-6). One cap for every
tile and grid points at the memory side: the packed words are [K / 8, N] int32, so a program's
K block is 16 rows of BLOCK_N words, 256 B to 1 KB pieces 4 * N bytes apart.

Kernels (each xors what it reads and writes one int32 a program, so nothing is optimised away):

- ``tiled``: program (n-block, split) reads rows [split range] x columns [n0, n0 + BLOCK_N) of
  the [R, N] int32 matrix, ROWS rows a step (the qlinear kernels' pattern: ROWS = 16 rows of
  words a K block of 128 channels);
- ``flat``: program p reads a contiguous 1-D chunk of the same bytes, CHUNK int32 a step.

    python bench/bw_layout_probe.py --out bench/results/x.json
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@triton.jit
def tiled_kernel(W, OUT, R, N, ROWS_PER_SPLIT, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.int32)
    start = split * ROWS_PER_SPLIT
    for r0 in range(start, start + ROWS_PER_SPLIT, ROWS):
        acc ^= tl.load(W + (r0 + rows)[:, None].to(tl.int64) * N + cols[None, :])
    tl.store(OUT + pid_n * tl.num_programs(1) + split, tl.xor_sum(tl.xor_sum(acc, 1), 0))


@triton.jit
def flat_kernel(W, OUT, PER_PROG, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, CHUNK)
    acc = tl.zeros([CHUNK], dtype=tl.int32)
    base = pid.to(tl.int64) * PER_PROG
    for i in range(0, PER_PROG, CHUNK):
        acc ^= tl.load(W + base + i + offs)
    tl.store(OUT + pid, tl.xor_sum(acc, 0))


def _xor(t: torch.Tensor) -> int:
    return int(np.bitwise_xor.reduce(t.cpu().numpy().ravel()))


def main():
    from bench_qlinear import result_header, timed, write_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nk", default="28672x8192")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    N, K = (int(v) for v in args.nk.split("x"))
    R = K // 8
    w = torch.randint(-2**31, 2**31 - 1, (R, N), dtype=torch.int32, device="cuda")
    nbytes = w.numel() * 4
    result = dict(result_header("CUDA-graph replay, do_bench median, L2 flushed"),
                  N=N, K=K, bytes=nbytes, rows=[])
    want = _xor(w)
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def record(name, cfg, fn, out):
        fn()
        got = _xor(out)
        _, ms = timed(fn, eager=False)
        row = dict(kernel=name, **cfg, ms=ms, TBps=nbytes / (ms * 1e-3) / 1e12,
                   checksum_ok=got == want)
        result["rows"].append(row)
        print(f"{name:6} {cfg}: {ms:.4f} ms  {row['TBps']:.2f} TB/s  "
              f"{'ok' if row['checksum_ok'] else 'CHECKSUM MISMATCH'}", flush=True)

    for bn in (64, 128, 256):
        for splits in (1, 2, 4, 8):
            for stages in (3, 6):
                for warps in (4, 8):
                    if R % (splits * 16):
                        continue
                    grid = (triton.cdiv(N, bn), splits)
                    if grid[0] * grid[1] < sms // 2:
                        continue
                    out = torch.zeros(grid[0] * splits, dtype=torch.int32, device="cuda")
                    cfg = dict(BLOCK_N=bn, splits=splits, num_stages=stages, num_warps=warps,
                               programs=grid[0] * grid[1])
                    record("tiled", cfg, lambda g=grid, o=out, bn=bn, s=stages, wp=warps, sp=splits:
                           tiled_kernel[g](w, o, R, N, R // sp, ROWS=16, BLOCK_N=bn,
                                           num_stages=s, num_warps=wp), out)
    total = w.numel()
    for progs in (128, 256, 512, 1024):
        for chunk in (2048, 4096):
            if total % (progs * chunk):
                continue
            out = torch.zeros(progs, dtype=torch.int32, device="cuda")
            cfg = dict(CHUNK=chunk, programs=progs, num_stages=4, num_warps=4)
            record("flat", cfg, lambda o=out, p=progs, c=chunk:
                   flat_kernel[(p,)](w, o, total // p, CHUNK=c, num_stages=4, num_warps=4), out)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
