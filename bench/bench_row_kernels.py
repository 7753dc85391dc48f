"""The row-wise kernels beside the GEMMs, against the copy ceiling and Inductor, on one GPU.

Three kernels that read x [M, K] (bf16) once and write a row-shaped result; each is memory-bound,
so its figure is the bytes it moves over its time (TB/s), next to a plain copy of as many bytes
(``dst.copy_(src)``: the ceiling such a kernel can reach in this timing) and Inductor's kernel
for the same function (``torch.compile``, default options, one compile a shape):

- ``normalize``: ``q3n::normalize`` (the "cublas" norm_linear design's first pass): x -> x_hat
  in bf16, LayerNorm and RMSNorm statistics in fp32 without affine parameters. Launches: the
  dispatched one (:func:`norm_linear.normalize_tile`), ``looped`` (row_stats_kernel, 2 rows x
  2048 columns, 8 warps: the default of before) and one-tile (rows x warps) variants. Peer:
  Inductor's ``F.layer_norm`` / ``F.rms_norm`` without weight.
- ``gate``: the SiLU-gate pass, ``silu(g[:, :N]) * g[:, N:]`` from the GEMM's [M, 2N] output
  (N = 11008): BLOCK_N x warps variants. Peer: Inductor's ``F.silu(g[:, :N]) * g[:, N:]``.
- ``act_quant``: per-token int8 codes and fp32 scales (``quantize_activations_triton``): the
  dispatched launch (:func:`qlinear.act_quant_launch`), ``looped`` (1 row x 4096 columns, 16
  warps, the row read twice: the launch of before) and one-tile variants. Peer: Inductor's
  compile of the op's definition (``qlinear.quantize_activations``) with an int8 cast.
  ``--rotation 128``: the codes of the rotated rows ``x R`` (:mod:`q3n_compile.kernels.hadamard`,
  the ``rotation`` format key), the unrotated dispatched launch beside them, the one-tile row
  reshaped for the rotation's dot (``reshaped``) instead of loaded as rows of one 128-channel
  block each, more tiles in the sweep; the peer is Inductor's compile of the definition with the
  rotation.

Timing: CUDA-graph replay, ``do_bench`` median, L2 flushed (``bench_qlinear.timed``). Every
launch is checked first: normalize against float64 (relative error <= 8e-3, one bf16
rounding), gate against fp32 math (one bf16 rounding), act_quant's codes equal to the op's
definition (at most 1 apart where the fp32 division rounds a tie differently: counted) and its
scales to 1e-6.

    python bench/bench_row_kernels.py --out results/row-kernels-h200.json
    python bench/bench_row_kernels.py --ms 2048 --kernels normalize --no-sweep
    python bench/bench_row_kernels.py --kernels act_quant --rotation 128 --k 12288
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_qlinear as BQ  # noqa: E402
from q3n_compile.kernels import norm_linear as NL  # noqa: E402
from q3n_compile.kernels import qlinear as Q  # noqa: E402

MS = (1, 256, 2048, 8192)
K = 4096
GATE_N = 11008
EPS = 1e-5
KERNELS = ("normalize", "gate", "act_quant")
NORM_LOOPED = dict(STATS_BLOCK_M=2, STATS_BLOCK_K=2048, STATS_WARPS=8)
NORM_TILES = [(1, 2), (1, 4), (1, 8), (2, 4), (2, 8), (4, 8), (4, 16)]  # (rows, warps)
GATE_TILES = [(512, 4), (1024, 4), (2048, 4), (2048, 8), (4096, 8), (1024, 2)]
QUANT_LOOPED = (1, 4096, 16, False)
QUANT_TILES = [(1, 2), (1, 4), (1, 8), (2, 4), (2, 8), (4, 8), (1, 16)]  # (rows, warps)
# Rotated: (rows, warps) at 4096 columns, each with the grid capped at 0 (a program a tile),
# 2, 4 or 8 programs an SM (a program makes the Hadamard matrix once, then takes every
# num_programs-th tile).
ROTATED_TILES = [(1, 4), (2, 4), (4, 4), (2, 8), (4, 8), (8, 8)]
ROTATED_PER_SM = (0, 2, 4, 8)
ROTATION = 0  # --rotation


def tbs(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e9


def time_row(name: str, fn, nbytes: int, check) -> dict:
    """{ms, TB/s} of fn as a graph replay after `check(fn())` passed, else {error}."""
    try:
        err = check(fn())
        if err:
            return dict(name=name, error=err)
        _, ms = BQ.timed(fn, eager=False)
        return dict(name=name, ms=ms, tbs=tbs(nbytes, ms))
    except Exception as exc:  # reported, not hidden
        return dict(name=name, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")


def copy_row(nbytes: int) -> dict:
    """A plain copy moving `nbytes` (half read, half written): the ceiling of this timing."""
    src = torch.randn(nbytes // 4, device="cuda").to(torch.bfloat16)
    dst = torch.empty_like(src)
    return time_row("copy", lambda: dst.copy_(src), nbytes, lambda _: None)


def normalize_rows(M: int, gen, sweep: bool) -> list[dict]:
    rows = []
    for kind in ("layernorm", "rmsnorm"):
        x = (torch.randn(M, K, generator=gen, device="cuda") * 2 + 0.5).to(torch.bfloat16)
        want = NL.normalise_rows(x.double(), EPS, kind)
        nbytes = 2 * 2 * M * K

        def check(out):
            err = ((out.double() - want).abs() / want.abs().clamp_min(1.0)).max().item()
            return None if err <= 8e-3 else f"wrong result: {err:.3g}"

        def launch(cfg):
            return lambda: NL._normalize_launch(x, EPS, kind, torch.bfloat16, config=cfg)

        cfgs = [("dispatched", NL.normalize_tile(K)), ("looped", NORM_LOOPED)]
        if sweep:
            kp2 = NL.normalize_tile(K)["STATS_BLOCK_K"] if K <= NL.ONE_TILE_MAX_K else None
            wide = max(1, (kp2 or 0) // 4096)
            cfgs += [(f"tile {bm}x{min(32, w * wide)}",
                      dict(STATS_BLOCK_M=bm, STATS_BLOCK_K=kp2, STATS_WARPS=min(32, w * wide)))
                     for bm, w in NORM_TILES if kp2]
        out = [dict(time_row(name, launch(cfg), nbytes, check), cfg=cfg) for name, cfg in cfgs]
        norm = (lambda t: F.layer_norm(t, (K,), eps=EPS)) if kind == "layernorm" else \
            (lambda t: F.rms_norm(t, (K,), eps=EPS))
        ind = torch.compile(norm, dynamic=False)
        out.append(time_row("inductor", lambda: ind(x), nbytes, check))
        out.append(copy_row(nbytes))
        rows.append(dict(kernel="normalize", kind=kind, M=M, K=K, bytes=nbytes, launches=out))
    return rows


def gate_rows(M: int, gen, sweep: bool) -> list[dict]:
    g = torch.randn(M, 2 * GATE_N, generator=gen, device="cuda").to(torch.bfloat16)
    gf = g.float()
    want = (F.silu(gf[:, :GATE_N]) * gf[:, GATE_N:]).to(torch.bfloat16).float()
    nbytes = 2 * 3 * M * GATE_N
    unused = torch.empty(1, device="cuda")

    def check(out):
        err = (out.float() - want).abs().max().item() / want.abs().max().item()
        return None if err <= 8e-3 else f"wrong result: {err:.3g}"

    def launch(bn, warps):
        out = torch.empty(M, GATE_N, dtype=torch.bfloat16, device="cuda")

        def run():
            NL.gate_kernel[(M, -(-GATE_N // bn))](
                g, unused, out, M, GATE_N, g.stride(0), 0, 0, HAS_RES=False, BLOCK_N=bn,
                OFFSETS_64=False, RNE_BF16=False, num_warps=warps)
            return out
        return run

    tiles = [(NL.GATE_BLOCK_N, NL.GATE_WARPS)] + ([t for t in GATE_TILES
                                                    if t != (NL.GATE_BLOCK_N, NL.GATE_WARPS)]
                                                   if sweep else [])
    out = [dict(time_row(f"{'dispatched' if i == 0 else 'tile'} {bn}x{w}", launch(bn, w),
                         nbytes, check), cfg=dict(GATE_BLOCK_N=bn, GATE_WARPS=w))
           for i, (bn, w) in enumerate(tiles)]
    ind = torch.compile(lambda t: F.silu(t[:, :GATE_N]) * t[:, GATE_N:], dynamic=False)
    out.append(time_row("inductor", lambda: ind(g), nbytes, check))
    out.append(copy_row(nbytes))
    return [dict(kernel="gate", M=M, N=GATE_N, bytes=nbytes, launches=out)]


def _inductor_quant(x, rotation=0):
    codes, scale = Q.quantize_activations(x, "int8", rotation=rotation)
    return codes.to(torch.int8), scale


def act_quant_rows(M: int, gen, sweep: bool) -> list[dict]:
    x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16)
    rot = ROTATION
    nbytes = 2 * M * K + M * K + 4 * M

    def checker(rotation):
        want_c, want_s = Q.quantize_activations(x, "int8", rotation=rotation)

        def check(res):
            c, s = res
            diff = (c.float() - want_c).abs()
            if diff.max().item() > 1 or (s - want_s).abs().max().item() > \
                    2e-6 * want_s.abs().max():
                return f"wrong result: codes {diff.max().item()} apart"
            return None
        return check

    check = checker(rot)

    def launch(cfg):
        return lambda: Q.quantize_activations_triton(x, "int8", None, False, launch=cfg,
                                                     rotation=rot)

    kp2 = max(16, 1 << (K - 1).bit_length())
    cfgs = [("dispatched", Q.act_quant_launch(K, 0, False, rot, M)), ("looped", QUANT_LOOPED)]
    if rot:  # the one-tile row reshaped for the rotation's dot, not loaded as rows of blocks
        cfgs.append(("reshaped", (*Q.act_quant_launch(K, 0, False, rot, M), True, False)))
    if sweep:  # the same elements a thread as at 4096 columns for wider rows
        wide = max(1, kp2 // 4096)
        if rot:  # at most 16 warps (32 failed ptxas with the rotation's dot, s34run2)
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            cfgs += [(f"tile {bm}x{min(16, w * wide)} {p}/SM",
                      (bm, kp2, min(16, w * wide), True, True, p * sms))
                     for bm, w in ROTATED_TILES for p in ROTATED_PER_SM]
        else:
            cfgs += [(f"tile {bm}x{min(32, w * wide)}", (bm, kp2, min(32, w * wide)))
                     for bm, w in QUANT_TILES]
    out = [dict(time_row(name, launch(cfg), nbytes, check), cfg=list(cfg)) for name, cfg in cfgs]
    if rot:
        out.append(dict(time_row(
            "unrotated", lambda: Q.quantize_activations_triton(x, "int8", None, False), nbytes,
            checker(0)), cfg=list(Q.act_quant_launch(K, 0, False, 0, M))))
    ind = torch.compile(lambda t: _inductor_quant(t, rot), dynamic=False)
    out.append(time_row("inductor", lambda: ind(x), nbytes, check))
    out.append(copy_row(nbytes))
    return [dict(kernel="act_quant", M=M, K=K, rotation=rot, bytes=nbytes, launches=out)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--ms", type=int, nargs="+", default=list(MS))
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    ap.add_argument("--no-sweep", action="store_true", help="dispatched, before and peers only")
    ap.add_argument("--k", type=int, default=K, help="row width of normalize and act_quant")
    ap.add_argument("--rotation", type=int, default=0, choices=(0, 32, 64, 128),
                    help="act_quant: quantize the rows rotated by Hadamard blocks of this many "
                         "channels")
    args = ap.parse_args()
    globals()["K"] = args.k
    globals()["ROTATION"] = args.rotation
    if not torch.cuda.is_available():
        sys.exit("bench_row_kernels.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    build = dict(normalize=normalize_rows, gate=gate_rows, act_quant=act_quant_rows)
    rows = []
    for kernel in args.kernels:
        for M in args.ms:
            for row in build[kernel](M, gen, not args.no_sweep):
                rows.append(row)
                head = f"{kernel:>9} {row.get('kind', ''):>9} M={M:<5}"
                for r in row["launches"]:
                    fig = (f"{r['ms'] * 1e3:7.1f} us {r['tbs']:5.2f} TB/s" if "ms" in r
                           else r["error"])
                    print(f"{head} {r['name']:>14} {fig}", flush=True)
    BQ.write_result(args.out, dict(BQ.result_header("cuda-graph replay, do_bench median, L2 "
                                                    "flushed"), rows=rows))


if __name__ == "__main__":
    main()
