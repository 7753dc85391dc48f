"""The dequantise kernel (``q3n::qlinear``'s "dequant" path: packed weight -> dense ``W^T``, then
cuBLAS) on one GPU: its launch tiles, its bandwidth, and the path against bf16 ``F.linear``.

Why: from 257 rows 16-bit activations (and 12-bit ones from 65) take dequantise + cuBLAS, so
the kernel's time is what the path loses to bf16 there (s8run3: W4A16 0.86-0.93x bf16 at 4096
rows). For each shape and format this times, by CUDA-graph replay (``do_bench`` median, L2
flushed):
- the kernel at every tile of :data:`TILES` (BLOCK_K x BLOCK_N, warps), each checked bit for
  bit against the launcher's output (:func:`q3n_compile.kernels.qlinear.dequantize_triton`),
  with TB/s of its traffic (packed weight, scales and zero points read, 2 bytes a weight
  written);
- a write-only peer: ``Tensor.fill_`` of the same ``[K, N]`` bf16 tensor (the write ceiling);
- at each M of ``--ms``: bf16 ``F.linear`` and the path (the launcher's kernel + ``torch.mm``),
  and the path with the fastest tile and with :data:`OLD_TILE`.

    python bench/bench_dequant.py --out bench/results/dequant-h200.json
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_qlinear import random_packed, result_header, timed, write_result  # noqa: E402
from q3n_compile.kernels import contract  # noqa: E402
from q3n_compile.kernels import packing as P  # noqa: E402
from q3n_compile.kernels import qlinear as Q  # noqa: E402

NKS = ((4096, 4096), (12288, 4096), (4096, 12288), (28672, 8192), (1024, 4096))
# name -> (bits, group (-1 per channel), symmetric)
FORMATS = {"w4g128": (4, 128, False), "w6g128": (6, 128, False), "w8pc": (8, -1, True)}
# The launcher's tile before s21run2 (since then :func:`q3n_compile.kernels.qlinear.dequant_tile`).
OLD_TILE = (64, 128, 4)
# (BLOCK_K, BLOCK_N, num_warps), the ones swept in s21run2-3.
TILES = ((64, 128, 4), (32, 128, 4), (128, 128, 4), (128, 128, 8), (64, 256, 4), (64, 256, 8),
         (32, 256, 4), (128, 256, 8), (256, 128, 8))


def dequant_with(pw, tile, dtype=torch.bfloat16):
    """The dequantise kernel at `tile`, as the launcher runs it at its own."""
    bk, bn, warps = tile
    K, N = pw.in_features, pw.qweight.shape[1]
    wt = torch.empty((K, N), dtype=dtype, device=pw.qweight.device)
    contract.launch(
        Q.dequant_kernel, (contract.cdiv(K, bk), contract.cdiv(N, bn)),
        (pw.qweight, pw.scales, pw.zeros if pw.zeros is not None else pw.scales, wt),
        (N, K, P.padded_k(K), *P.plane_starts(pw.bits, K)),
        dict(BITS=pw.bits, GROUP=0 if pw.group_size == P.PER_CHANNEL else pw.group_size,
             SYM=pw.zeros is None, BLOCK_K=bk, BLOCK_N=bn),
        dict(num_warps=warps), fast=True)
    return wt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--nk", nargs="+", default=[f"{n}x{k}" for n, k in NKS])
    ap.add_argument("--ms", type=int, nargs="+", default=[256, 1024, 4096])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_dequant.py needs a CUDA GPU")
    started = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for nk in args.nk:
        N, K = map(int, nk.split("x"))
        fill = torch.empty((K, N), dtype=torch.bfloat16, device="cuda")
        _, fill_ms = timed(lambda: fill.fill_(1.0), eager=False)
        print(f"{N}x{K}: fill_ {fill_ms:.4f} ms ({2 * N * K / fill_ms / 1e9:.2f} TB/s)", flush=True)
        rows.append(dict(N=N, K=K, impl="fill_", graph_ms=fill_ms,
                         TBps=2 * N * K / fill_ms / 1e9))
        for name in args.formats:
            bits, group, sym = FORMATS[name]
            pw = random_packed(gen, N, K, bits, group, sym)
            traffic = pw.nbytes + 2 * N * K
            ref = Q.dequantize_triton(pw.qweight, pw.scales, pw.zeros, bits, group, K,
                                      torch.bfloat16)
            tiles = []
            for tile in TILES:
                out = dequant_with(pw, tile)
                same = torch.equal(out, ref)
                del out
                _, ms = timed(lambda: dequant_with(pw, tile), eager=False)
                tiles.append(dict(tile=list(tile), graph_ms=ms, TBps=traffic / ms / 1e9,
                                  equal=same))
                print(f"  {name} tile {tile}: {ms:.4f} ms {traffic / ms / 1e9:.2f} TB/s"
                      f"{'' if same else '  DIFFERS'}", flush=True)
            best = min((t for t in tiles if t["equal"]), key=lambda t: t["graph_ms"])
            row = dict(N=N, K=K, impl=name, bytes_read=pw.nbytes, bytes_written=2 * N * K,
                       tiles=tiles, best_tile=best["tile"], paths=[])
            for M in args.ms:
                x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16)
                w = torch.randn(N, K, generator=gen, device="cuda").to(torch.bfloat16)
                _, bf16 = timed(lambda: F.linear(x, w), eager=False)
                _, path = timed(lambda: torch.mm(x, Q.dequantize_triton(
                    pw.qweight, pw.scales, pw.zeros, bits, group, K, torch.bfloat16)),
                    eager=False)
                _, best_path = timed(lambda: torch.mm(x, dequant_with(pw, best["tile"])),
                                     eager=False)
                _, old_path = timed(lambda: torch.mm(x, dequant_with(pw, OLD_TILE)), eager=False)
                row["paths"].append(dict(M=M, bf16_ms=bf16, path_ms=path,
                                         best_tile_path_ms=best_path, old_tile_path_ms=old_path))
                print(f"  {name} M={M}: bf16 {bf16:.4f} ms, dequant + mm {path:.4f} "
                      f"({bf16 / path:.2f}x), best tile {best_path:.4f} ({bf16 / best_path:.2f}x)"
                      f", tile {OLD_TILE} {old_path:.4f} ({bf16 / old_path:.2f}x)", flush=True)
            rows.append(row)
            torch.cuda.empty_cache()
    write_result(args.out, dict(result_header("CUDA-graph replay, do_bench median, L2 flushed"),
                                wall_s=round(time.time() - started, 1), rows=rows))


if __name__ == "__main__":
    main()
