"""The whole-weight unpack (``kernels/weight_unpack.py``: the "dequant" path's ``W [N, K]`` in
x's dtype, and the "cublas8" path's 8-bit ``q - z``) on one GPU: its launch tiles, its bandwidth
against a copy, and the dequant path against bf16 ``F.linear``.

Why: from 257 rows 16-bit activations (and 12-bit ones from 65) take dequantise + cuBLAS, so the
kernel's time is what that path loses to bf16 there. For each shape and format this times, by
CUDA-graph replay (``do_bench`` median, L2 flushed):
- the kernel at every tile of :data:`TILES` (BLOCK_N x BLOCK_K, warps; BLOCK_K capped by the
  group), each checked bit for bit against the launcher's output first, with TB/s of its
  traffic (packed weight, scales and zero points read, the output written);
- peers: ``Tensor.copy_`` of a tensor of the output's size (it reads and writes those bytes: the
  copy ceiling of the issue) and ``fill_`` (writes only);
- at each M of ``--ms`` (scaled formats): bf16 ``F.linear`` on a bf16 weight, and the path as
  the op runs it (the launcher's unpack, then ``F.linear``) and with the fastest tile.
The kernel it replaced (``W^T [K, N]`` and ``torch.mm``) is timed by the earlier tree's own
copy of this script or of ``bench_dequant_parts.py``, run in the same device call.

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
from q3n_compile.kernels import weight_unpack as WU  # noqa: E402

NKS = ((4096, 4096), (12288, 4096), (4096, 12288), (28672, 8192), (1024, 4096))
# name -> (bits, group (-1 per channel), symmetric, output dtype, scaled)
FORMATS = {
    "w4g128": (4, 128, False, torch.bfloat16, True),
    "w6g128": (6, 128, False, torch.bfloat16, True),
    "w8pc": (8, -1, True, torch.bfloat16, True),
    "w4g128-fp8codes": (4, 128, False, torch.float8_e4m3fn, False),
    "w8pc-int8codes": (8, -1, True, torch.int8, False),
}
# (BLOCK_N, BLOCK_K, num_warps)
TILES = ((64, 128, 4), (32, 128, 4), (128, 128, 4), (128, 128, 8), (64, 64, 4), (128, 64, 4),
         (64, 128, 8), (256, 64, 8), (32, 256, 4), (64, 256, 8), (16, 256, 4))


def unpack(pw, dtype, scaled, launch=None):
    return WU.unpack_weight(pw.qweight, pw.scales, pw.zeros, pw.bits, pw.group_size,
                            pw.in_features, dtype, scaled=scaled, launch=launch)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--nk", nargs="+", default=[f"{n}x{k}" for n, k in NKS])
    ap.add_argument("--ms", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--no-sweep", action="store_true", help="time the launcher's tile only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_dequant.py needs a CUDA GPU")
    started = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for nk in args.nk:
        N, K = map(int, nk.split("x"))
        src = torch.randn(N, K, generator=gen, device="cuda").to(torch.bfloat16)
        dst = torch.empty_like(src)
        _, copy_ms = timed(lambda: dst.copy_(src), eager=False)
        _, fill_ms = timed(lambda: dst.fill_(1.0), eager=False)
        print(f"{N}x{K}: bf16 copy_ {copy_ms:.4f} ms ({4 * N * K / copy_ms / 1e9:.2f} TB/s), "
              f"fill_ {fill_ms:.4f} ms ({2 * N * K / fill_ms / 1e9:.2f} TB/s)", flush=True)
        rows.append(dict(N=N, K=K, impl="copy_ bf16", graph_ms=copy_ms,
                         TBps=4 * N * K / copy_ms / 1e9))
        rows.append(dict(N=N, K=K, impl="fill_ bf16", graph_ms=fill_ms,
                         TBps=2 * N * K / fill_ms / 1e9))
        src = dst = None  # free them before the formats
        for name in args.formats:
            bits, group, sym, dtype, scaled = FORMATS[name]
            pw = random_packed(gen, N, K, bits, group, sym)
            out_bytes = N * K * torch.empty((), dtype=dtype).element_size()
            traffic = pw.nbytes + out_bytes
            ref = unpack(pw, dtype, scaled)
            launcher = WU.tile(group, out_bytes=torch.empty((), dtype=dtype).element_size())
            tiles = []
            sweep = [launcher] if args.no_sweep else \
                list(dict.fromkeys([launcher] + [WU.tile(group, launch=t) for t in TILES]))
            for tile in sweep:
                out = unpack(pw, dtype, scaled, tile)
                same = torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
                del out
                _, ms = timed(lambda: unpack(pw, dtype, scaled, tile), eager=False)
                tiles.append(dict(tile=list(tile), graph_ms=ms, TBps=traffic / ms / 1e9,
                                  equal=same, launcher=tile == launcher))
                print(f"  {name} tile {tile}{' (launcher)' if tile == launcher else ''}: "
                      f"{ms:.4f} ms {traffic / ms / 1e9:.2f} TB/s"
                      f"{'' if same else '  DIFFERS'}", flush=True)
            best = min((t for t in tiles if t["equal"]), key=lambda t: t["graph_ms"])
            row = dict(N=N, K=K, impl=name, bytes_read=pw.nbytes, bytes_written=out_bytes,
                       tiles=tiles, best_tile=best["tile"], paths=[])
            del ref
            for M in (args.ms if scaled else []):
                x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16)
                w = torch.randn(N, K, generator=gen, device="cuda").to(torch.bfloat16)
                _, bf16 = timed(lambda: F.linear(x, w), eager=False)
                w = None
                _, path = timed(lambda: F.linear(x, unpack(pw, dtype, True)), eager=False)
                btile = tuple(best["tile"])
                _, best_path = timed(lambda: F.linear(x, unpack(pw, dtype, True, btile)),
                                     eager=False)
                row["paths"].append(dict(M=M, bf16_ms=bf16, path_ms=path,
                                         best_tile_path_ms=best_path))
                print(f"  {name} M={M}: bf16 {bf16:.4f} ms, unpack + F.linear {path:.4f} "
                      f"({bf16 / path:.3f}x), best tile {best_path:.4f} "
                      f"({bf16 / best_path:.3f}x)", flush=True)
            rows.append(row)
            torch.cuda.empty_cache()
    write_result(args.out, dict(result_header("CUDA-graph replay, do_bench median, L2 flushed"),
                                wall_s=round(time.time() - started, 1), rows=rows))


if __name__ == "__main__":
    main()
