"""Quantized linears on one GPU: q3n::qlinear formats against bf16 cuBLAS and torch's int4 kernel.

Shapes: the baseline file's GEMV set, M in {1, 16, 256, 4096} x (N, K) in {(4096, 4096),
(12288, 4096), (4096, 12288), (28672, 8192)} (/work/shared/baselines/h200-2026-11-28.json).
Implementations, all on the same bf16 activations:
- ``bf16``: ``F.linear`` (cuBLAS);
- ``int4_torch``: ``aten._weight_int4pack_mm`` (tinygemm, group 128) with
  ``aten._convert_weight_to_int4pack`` (uint8 [N, K/2] input since torch 2.5, int32 [N, K]
  before; both tried);
- q3n: W4A16 g128, W6A16 g128, W8A16 per-channel, W4A8 g128 (fp8 e4m3 activations on sm_89+,
  int8 elsewhere: what ``activation_format: auto`` picks), W8A8 per-channel int8, W6A12 g128,
  and with activation scales per token and 128 channels (``act_group_size`` 128): W8A8 g128
  int8 and W4A8 g128 (auto), to set beside their per-token rows; and with the 128-channel
  Hadamard rotation of the activations (``rotation`` 128): W8A8 per channel and W4A8 g128, to
  set beside their unrotated rows (the quantizer's extra work).

Every implementation is first checked against a float32 reference of its own quantized weights
(max |error| relative to max |reference|), then timed with triton.testing.do_bench (median,
L2 flushed between repetitions, after warm-up) twice: called from Python ("eager": includes the
launcher's CPU overhead, which dominates at M = 1 for 4096 x 4096) and replayed from a CUDA graph
("graph": GPU time, what q3n's CUDA-graph executor sees). From M = 256 the rows also time the
large-M alternatives the dispatch weighs, whichever the dispatch did not pick: ``dequant``
(dequantise + bf16 cuBLAS) and, where it computes the format exactly, ``cublas8`` (codes
unpacked to 8 bits + cuBLAS's fp8/int8 GEMM; ``kernels/qlinear_cublas8.py``). TB/s counts the
weight bytes each implementation reads (packed codes + scales + zero points; bf16: 2 bytes per
weight).

    python bench/bench_qlinear.py --out bench/results/qlinear-h200.json
    python bench/bench_qlinear.py --sweep --formats w4a16 w4a8 --out bench/results/qlinear-sweep.json
    python bench/bench_qlinear.py --gemv --formats w4a16 w8a8 --nk 28672x8192 --ms 1 16

``--sweep`` also times every dispatch candidate (gemv splits, mm tiles, dequant + cuBLAS) per
shape and prints the table ``kernels/qlinear.py: CUDA_TABLE`` should hold.

Writes JSON (GPU, versions, git commit, date, rows) to --out and prints a table.
"""

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from q3n_compile.kernels import packing as P  # noqa: E402
from q3n_compile.kernels import qlinear as Q  # noqa: E402
from q3n_compile.kernels import qlinear_cublas8 as C8  # noqa: E402
from q3n_compile.kernels import qlinear_i8 as I8  # noqa: E402

MS = (1, 16, 256, 4096)
# From these rows the large-M alternatives (dequantise + cuBLAS, cublas8) are timed beside the
# dispatched path: the rows where the dispatch weighs them (cublas8 from 65 rows for fp8).
ALTERNATIVES_FROM_M = 65
NKS = ((4096, 4096), (12288, 4096), (4096, 12288), (28672, 8192))
# name -> (bits, group, symmetric, activation format or "auto"[, activation group: -1 per token])
FORMATS = {
    "w4a16": (4, 128, False, "none"),
    "w6a16": (6, 128, False, "none"),
    "w8a16": (8, -1, True, "none"),
    "w4a8": (4, 128, False, "auto"),
    "w8a8": (8, -1, True, "int8"),
    "w6a12": (6, 128, False, "int12"),
    "w8a8_g128": (8, 128, True, "int8"),
    "w8a8_g128_ag128": (8, 128, True, "int8", 128),
    "w4a8_ag128": (4, 128, False, "auto", 128),
    # Hadamard rotation of the activations in blocks of 128 or 32 channels (kernels/hadamard.py)
    # in the quantizer.
    "w8a8_rot128": (8, -1, True, "int8", -1, 128),
    "w4a8_rot128": (4, 128, False, "auto", -1, 128),
    "w8a8_rot32": (8, -1, True, "int8", -1, 32),
    "w4a8_rot32": (4, 128, False, "auto", -1, 32),
}
TOL = 2e-2  # bf16 output rounding, 16-bit dequantised weights on the tensor-core path


from q3n_compile.compare import git_commit  # noqa: E402  (one definition for every result file)


def captured(fn) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of fn(), after two warm-up calls on a side stream (what capture needs:
    kernels compiled, the allocator's blocks made)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def timed(fn, eager=True):
    """(eager ms, graph ms): do_bench medians of fn() and of a CUDA-graph replay of it
    (eager None when not asked)."""
    fn()
    torch.cuda.synchronize()
    eager = do_bench(fn, warmup=25, rep=100, return_mode="median") if eager else None
    graph_ms = None
    try:
        g = captured(fn)
        graph_ms = do_bench(g.replay, warmup=25, rep=100, return_mode="median")
        del g
    except Exception as exc:  # a path that cannot be captured is reported, not hidden
        print(f"      (CUDA graph capture failed: {type(exc).__name__}: {exc})", flush=True)
    return eager, graph_ms


def check_and_time(fn, ref, bf16_ms, tol, row, check=True) -> dict:
    """Fill `row`: fn()'s max error against the float64 `ref` relative to max |ref|
    (``rel_err_vs_float64``; ``error`` when it passes `tol` and `check`), then its CUDA-graph
    time (``graph_ms``) and ``vs_bf16``; an exception is recorded as the row's ``error``."""
    try:
        y = fn().double()
        row["rel_err_vs_float64"] = ((y - ref).abs().max() / ref.abs().max()).item()
        if check and row["rel_err_vs_float64"] > tol:
            row["error"] = f"wrong result: {row['rel_err_vs_float64']:.3g}"
        _, row["graph_ms"] = timed(fn, eager=False)
        row["vs_bf16"] = bf16_ms / row["graph_ms"]
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return row


def bf16_cases(gen, nks, ms, dtype=torch.bfloat16):
    """(N, K, M, x, bf16 ms) for each "NxK" of `nks` and each M of `ms`: a bf16 weight drawn from
    `gen` once per shape, bf16 x [M, K] per M, and bf16 ``F.linear`` timed as a CUDA-graph replay
    (the peer of the parts scripts, bench_cublas8_parts.py and bench_dequant_parts.py); weight,
    x and peer in `dtype` where given (fp16)."""
    for nk in nks:
        N, K = map(int, nk.split("x"))
        w = (torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).to(dtype)
        for M in ms:
            x = torch.randn(M, K, generator=gen, device="cuda").to(dtype)
            _, bf16 = timed(lambda: F.linear(x, w), eager=False)
            yield N, K, M, x, bf16


def time_parts(parts, row):
    """Each of `parts` ({name: fn}) timed as a CUDA-graph replay into ``row[name + "_ms"]``, or
    the first line of its error into ``row[name + "_error"]``; returns `row`."""
    for part, fn in parts.items():
        try:
            _, row[f"{part}_ms"] = timed(fn, eager=False)
        except Exception as exc:
            row[f"{part}_error"] = str(exc).splitlines()[0][:160]
    return row


def rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def random_packed(gen, N, K, bits, group, sym):
    codes = torch.randint(0, 1 << bits, (N, K), generator=gen, device="cuda", dtype=torch.int64)
    ng = 1 if group == -1 else K // group
    scales = (torch.rand(ng, N, generator=gen, device="cuda") * 0.02 + 0.002).half()
    zeros = None if sym else torch.randint(0, 1 << bits, (ng, N), generator=gen,
                                           device="cuda").to(torch.uint8)
    return P.pack(codes, scales, zeros, bits, group)


def resolve_act(act, bits, sym):
    if act != "auto":
        return act
    fp8 = Q.fp8_supported(torch.device("cuda")) and Q._codes_fit_fp8(bits, sym)
    return "fp8" if fp8 else "int8"


def int4_torch(w_bf16, x):
    """(fn, reference output, bytes) for aten._weight_int4pack_mm, or (None, error string, 0)."""
    N, K = w_bf16.shape
    group = 128
    w = w_bf16.float().reshape(N, K // group, group)
    wmin, wmax = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((wmax - wmin) / 15).clamp(min=1e-6)
    q = torch.clamp(torch.round((w - wmin) / scale), 0, 15).to(torch.int32).reshape(N, K)
    zero = wmin + 8 * scale  # tinygemm: w = (q - 8) * scale + zero
    sz = torch.cat([scale.reshape(N, -1, 1), zero.reshape(N, -1, 1)], 2).transpose(0, 1)
    sz = sz.contiguous().to(torch.bfloat16)
    deq = ((q.reshape(N, K // group, group).float() - 8) * sz.transpose(0, 1)[..., :1].float()
           + sz.transpose(0, 1)[..., 1:].float()).reshape(N, K)
    errors = []
    for packing in ("uint8", "int32"):
        try:
            src = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8) if packing == "uint8" else q
            packed = torch.ops.aten._convert_weight_to_int4pack(src.contiguous(), 8)
            fn = lambda: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)  # noqa: E731
            out = fn()
            ref = x.float() @ deq.t()
            err = rel_err(out, ref)
            if err > TOL:
                errors.append(f"{packing}: rel err {err:.3g}")
                continue
            nbytes = packed.numel() * packed.element_size() + sz.numel() * 2
            return fn, err, nbytes, packing
        except Exception as exc:
            errors.append(f"{packing}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return None, "; ".join(errors), 0, None


def sweep_candidates(M, group, act, paths=None):
    """Dispatch candidates; `group` is the smallest of the weight and activation groups (-1:
    neither is grouped): the K block must lie in one group of each. `paths`: only these."""
    bk = 128 if group == -1 else min(128, group)
    out = [dict(path="dequant")]
    if M <= 16:
        for bn in (32, 64, 128):
            for split in (1, 2, 4, 8, 16):
                out.append(dict(path="gemv", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=4,
                                num_stages=2))
    tiles = [(16, 64, bk, 4, 4), (32, 64, bk, 4, 4), (64, 128, 64, 4, 3), (64, 128, bk, 4, 3),
             (128, 128, 64, 8, 3), (128, 128, bk, 8, 3), (128, 256, 64, 8, 3), (128, 64, bk, 4, 4)]
    for bm, bn, k, w, s in tiles:
        if bm > max(16, triton.next_power_of_2(M)):
            continue
        for split in ((1, 2, 4, 8) if M <= 256 else (1,)):
            out.append(dict(path="mm", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(k, bk) if group != -1
                            else k, SPLIT_K=split, num_warps=w, num_stages=s))
    if M <= 64:
        # The swapped-operand tiles (weight [BLOCK_N, 16] sub-tiles first, x's rows second;
        # quantized activations dequantised first; K blocks of 128 whatever the group). The
        # MMA's N side is BLOCK_M: 8 is the smallest Hopper's warpgroup MMA takes.
        bms = sorted({max(16, triton.next_power_of_2(M))} | ({8} if M <= 8 else set()))
        for bm in bms:
            for bn, w, s in ((64, 4, 3), (64, 4, 4), (128, 8, 3)):
                for split in (2, 4, 8):
                    for xperm in (False, True):  # x as it is, or permuted per block
                        out.append(dict(path="mmT", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128,
                                        SPLIT_K=split, num_warps=w, num_stages=s, XPERM=xperm))
    elif M <= 256:
        # Wider swapped tiles: x's rows are the MMA's N side (64-128 of them per program).
        for bm, bn, w in ((64, 128, 8), (128, 128, 8)):
            for split in (1, 2):
                for xperm in (False, True):
                    out.append(dict(path="mmT", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128,
                                    SPLIT_K=split, num_warps=w, num_stages=3, XPERM=xperm))
    return [c for c in out if paths is None or c["path"] in paths]


def xperm_candidates(dispatched, regs=False):
    """The dispatched mmT launch with x as it is and permuted per block (XPERM; for quantized
    activations the quantizer stores it permuted); `regs`: each also capped at 128 registers
    per thread (two 8-warp programs per SM)."""
    if dispatched.get("path") != "mmT":
        return []
    out = [dict(dispatched, XPERM=False), dict(dispatched, XPERM=True)]
    return out + [dict(c, maxnreg=128) for c in out] if regs else out


def asm_candidates(dispatched):
    """The dispatched mmT launch with the float unpack and with the PTX one (ASM, where
    :func:`qlinear_swap.asm_unpack` allows it: 4- and 6-bit weights with zero points)."""
    if dispatched.get("path") != "mmT":
        return []
    return [dict(dispatched, ASM=False), dict(dispatched, ASM=True)]


def split_candidates(dispatched, M, K):
    """The dispatched mmT launch with each K split from 1 to 8 (each split keeping >= 2 K blocks)
    and, above 64 rows, the 128-row tile with 64 and 128 columns: how the grid fills the SMs
    (ncu, s14run1: 1.45 waves of programs at 128 rows, SMs idle 28% of the time). For the mm
    path, its launch at each split (each keeping >= 2 of its K blocks)."""
    if dispatched.get("path") == "mm":
        blocks = -(-K // dispatched["BLOCK_K"])
        return [dict(dispatched, SPLIT_K=s) for s in (1, 2, 3, 4, 6, 8) if blocks >= 2 * s]
    if dispatched.get("path") != "mmT":
        return []
    blocks = -(-K // 128)
    tiles = [dispatched]
    if M > 64:
        tiles += [dict(dispatched, BLOCK_M=128, BLOCK_N=128, num_warps=8),
                  dict(dispatched, BLOCK_M=128, BLOCK_N=64, num_warps=4)]
    return [dict(t, SPLIT_K=s) for t in tiles for s in (1, 2, 3, 4, 6, 8) if blocks >= 2 * s]


def gemv_candidates(M, N, K, bits, group, act, act_group):
    """The dispatched path and, for M <= 16, GEMV column blocks x splits x warps (a short
    sweep; s6run4 used it to set the GEMV split); where the dispatch gives gemv1p, the same
    launch with the other unpack (DENORM flipped) too; from 2 to 16 rows the 3-row dispatch (the
    swapped tile) where it is not the dispatch's, and the one-row GEMV tile once per row."""
    out = [Q.choose_path(M, N, K, bits, group, act, torch.bfloat16, torch.device("cuda"),
                         act_group_size=act_group)]
    if out[0]["path"] == "gemv1p" and bits != 6:
        codes = torch.bfloat16 if act == "none" else torch.int8
        out.append(dict(out[0], DENORM=int(not Q.gemv1p_denorm(bits, codes))))
    if 2 <= M <= 16:
        # The swapped tile as dispatched at 3 rows (unless it is the dispatch's), and the
        # one-row tile once per row.
        mmt = Q.choose_path(3, N, K, bits, group, act, torch.bfloat16, torch.device("cuda"),
                            act_group_size=act_group)
        if mmt != out[0]:
            out.append(mmt)
        out.append(dict(Q.choose_path(1, N, K, bits, group, act, torch.bfloat16,
                                      torch.device("cuda"), act_group_size=act_group),
                        BLOCK_M=1))
    if M <= 16:
        bk = min([128] + [g for g in (group, act_group) if g > 0])
        tiles = [(bn, split, 4) for bn in (32, 64, 128) for split in (1, 4, 16)]
        for bn, split, warps in tiles + [(64, 4, 2), (64, 4, 8)]:
            out.append(dict(path="gemv", BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
                            num_warps=warps, num_stages=2))
    return out


def run_shape(M, N, K, formats, sweep, gen, paths=None):
    x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16)
    w = (torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).to(torch.bfloat16)
    rows = []
    eager, graph = timed(lambda: F.linear(x, w))
    bf16 = dict(M=M, N=N, K=K, impl="bf16", eager_ms=eager, graph_ms=graph, bytes=N * K * 2,
                max_rel_err=0.0)
    rows.append(bf16)

    fn, err, nbytes, packing = int4_torch(w, x)
    if fn is None:
        rows.append(dict(M=M, N=N, K=K, impl="int4_torch", error=err))
    else:
        eager, graph = timed(fn)
        rows.append(dict(M=M, N=N, K=K, impl="int4_torch", eager_ms=eager, graph_ms=graph,
                         bytes=nbytes, max_rel_err=err, packing=packing))
    del fn
    for name in formats:
        bits, group, sym, act, *extra = FORMATS[name]
        ag = extra[0] if extra else Q.PER_TOKEN
        rot = extra[1] if len(extra) > 1 else 0
        act = resolve_act(act, bits, sym)
        planes = random_packed(gen, N, K, bits, group, sym)
        # The layout a compiled model holds (QuantizedWeight.pack): K-major int8 for W8A8 per
        # channel and token, bit planes elsewhere.
        kmajor = I8.eligible(bits, group, sym, act, ag) is None
        pw = P.to_kmajor8(planes) if kmajor else planes
        args = (x, pw.qweight, pw.scales, pw.zeros, None, None, bits, group, K, act, ag, rot)
        launch_kw = dict(interpreter=False, act_group_size=ag, rotation=rot)
        row = dict(M=M, N=N, K=K, impl=f"q3n_{name}", act=act, act_group_size=ag, rotation=rot,
                   bytes=pw.nbytes,
                   path=Q._choose_i8(M, pw.qweight, K, x.device, False) if kmajor else
                   Q.choose_path(M, N, K, bits, group, act, x.dtype, x.device,
                                 act_group_size=ag))
        try:
            out = torch.ops.q3n.qlinear(*args)
            row["max_rel_err"] = rel_err(out, Q.reference(*args))
            if row["max_rel_err"] > TOL:
                row["error"] = f"wrong result: rel err {row['max_rel_err']:.3g}"
            row["eager_ms"], row["graph_ms"] = timed(lambda: torch.ops.q3n.qlinear(*args))
            # The alternatives the dispatch table weighs at large M: dequantise + cuBLAS, and
            # (8-bit activations) the codes unpacked to 8 bits + cuBLAS's 8-bit GEMM.
            alts = ["dequant"]
            if C8.eligible(N, K, bits, group, act, x.dtype, Q.fp8_supported(x.device), ag) is None:
                alts.append("cublas8")
            if kmajor:
                # The same codes in bit planes, as dispatched there (W8A8 before session 26).
                pargs = (x, planes.qweight, planes.scales, None, None, None, bits, group, K, act,
                         ag, rot)
                row["planes_rel_err"] = rel_err(torch.ops.q3n.qlinear(*pargs),
                                                Q.reference(*args))
                _, row["planes_graph_ms"] = timed(lambda: torch.ops.q3n.qlinear(*pargs),
                                                  eager=False)
                alts = []
            for alt in alts if M >= ALTERNATIVES_FROM_M else ():
                if row["path"]["path"] == alt:
                    continue
                f = lambda: Q._launch(*args[:10], path=dict(path=alt),  # noqa: E731
                                      **launch_kw)
                row[f"{alt}_rel_err"] = rel_err(f(), Q.reference(*args))
                _, row[f"{alt}_graph_ms"] = timed(f, eager=False)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if sweep:
            row["sweep"] = []
            groups = [g for g in (group, ag) if g > 0]
            cands = (gemv_candidates(M, N, K, bits, group, act, ag) if sweep == "gemv"
                     else xperm_candidates(row["path"]) if sweep == "xperm"
                     else xperm_candidates(row["path"], regs=True) if sweep == "regs"
                     else asm_candidates(row["path"]) if sweep == "asm"
                     else split_candidates(row["path"], M, K) if sweep == "splits"
                     else sweep_candidates(M, min(groups) if groups else -1, act, paths))
            for cand in cands:
                try:
                    f = lambda: Q._launch(*args[:10], path=cand, **launch_kw)  # noqa: E731
                    e = rel_err(f(), Q.reference(*args))
                    _, gms = timed(f, eager=False)
                    row["sweep"].append(dict(cand, graph_ms=gms, max_rel_err=e))
                    if sweep in ("xperm", "regs", "asm", "splits"):
                        print(f"      {name} M={M} {cand}: {gms:.4f} ms, err {e:.1e}",
                              flush=True)
                except Exception as exc:
                    row["sweep"].append(dict(cand, error=str(exc).splitlines()[0][:160]))
        rows.append(row)
        del pw, planes
    for r in rows:
        for kind in ("eager", "graph"):
            ms = r.get(f"{kind}_ms")
            r[f"{kind}_TBps"] = None if ms is None else r["bytes"] / (ms * 1e-3) / 1e12
            base = bf16.get(f"{kind}_ms")
            r[f"{kind}_vs_bf16"] = None if ms is None or base is None else base / ms
    torch.cuda.empty_cache()
    return rows


def suggest_table(rows):
    """Best swept candidate per (format, M, N, K), and the M-indexed rule it suggests."""
    best = {}
    for r in rows:
        if "sweep" not in r:
            continue
        ok = [c for c in r["sweep"] if c.get("graph_ms") and c.get("max_rel_err", 1) <= TOL]
        if ok:
            c = min(ok, key=lambda c: c["graph_ms"])
            best[(r["impl"], r["M"], r["N"], r["K"])] = c
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--ms", type=int, nargs="+", default=list(MS))
    ap.add_argument("--nk", type=str, nargs="+", default=[f"{n}x{k}" for n, k in NKS],
                    help="N x K pairs, e.g. 4096x4096")
    ap.add_argument("--sweep", action="store_true", help="time every dispatch candidate too")
    ap.add_argument("--sweep-paths", nargs="+", default=None,
                    choices=["dequant", "gemv", "mm", "mmT"],
                    help="with --sweep: only these paths' candidates")
    ap.add_argument("--gemv", action="store_true",
                    help="a shorter sweep: the dispatched path and, for M <= 16, GEMV tiles")
    ap.add_argument("--xperm", action="store_true",
                    help="a sweep of the dispatched mmT launch with and without x permuted")
    ap.add_argument("--regs", action="store_true",
                    help="--xperm's sweep, each launch also capped at 128 registers per thread")
    ap.add_argument("--asm", action="store_true",
                    help="the dispatched mmT launch with the float unpack and the PTX one (ASM)")
    ap.add_argument("--splits", action="store_true",
                    help="the dispatched mmT or mm launch at every K split (and mmT's "
                         "128-row tiles above 64 rows)")
    args = ap.parse_args()
    sweep = ("gemv" if args.gemv else "xperm" if args.xperm else "regs" if args.regs
             else "asm" if args.asm else "splits" if args.splits else args.sweep)
    if not torch.cuda.is_available():
        sys.exit("bench_qlinear.py needs a CUDA GPU")
    started = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    hdr = (f"{'N':>6} {'K':>6} {'M':>5} {'impl':>13} {'act':>5} {'path':>7} {'err':>8} "
           f"{'eager ms':>9} {'graph ms':>9} {'TB/s':>6} {'vs bf16':>8}")
    print(hdr)
    for nk in args.nk:
        N, K = map(int, nk.lower().split("x"))
        for M in args.ms:
            for r in run_shape(M, N, K, args.formats, sweep, gen, args.sweep_paths):
                rows.append(r)
                if "error" in r and "eager_ms" not in r:
                    print(f"{N:>6} {K:>6} {M:>5} {r['impl']:>13}  ERROR {r['error']}", flush=True)
                    continue
                fmt = lambda v, f: "    -" if v is None else format(v, f)  # noqa: E731
                print(f"{N:>6} {K:>6} {M:>5} {r['impl']:>13} {r.get('act', ''):>5} "
                      f"{(r.get('path') or {}).get('path', ''):>7} {r['max_rel_err']:8.1e} "
                      f"{fmt(r['eager_ms'], '9.4f')} {fmt(r['graph_ms'], '9.4f')} "
                      f"{fmt(r['graph_TBps'], '6.2f')} {fmt(r['graph_vs_bf16'], '8.2f')}"
                      + "".join(f"  ({alt} path {r[alt + '_graph_ms']:.4f})"
                                for alt in ("dequant", "cublas8", "planes")
                                if r.get(f"{alt}_graph_ms"))
                      + (f"  {r['error']}" if "error" in r else ""), flush=True)
    if sweep:
        print("\nbest swept candidate per shape (graph ms):")
        for (impl, M, N, K), c in sorted(suggest_table(rows).items()):
            cfg = {k: v for k, v in c.items() if k not in ("graph_ms", "max_rel_err")}
            print(f"  {impl:>10} M={M:<5} N={N:<6} K={K:<6} {c['graph_ms']:.4f} ms  {cfg}")
    result = dict(
        result_header("triton.testing.do_bench median (L2 flushed); eager = Python call, "
                      "graph = CUDA graph replay"),
        wall_s=round(time.time() - started, 1), rows=rows)
    write_result(args.out, result)


def result_header(timer: str, cpu_check: bool = False) -> dict:
    """What every qlinear result file records first: GPU, versions, commit, date, method."""
    return dict(
        gpu="cpu (interpreter check)" if cpu_check else torch.cuda.get_device_name(),
        capability=None if cpu_check else list(torch.cuda.get_device_capability()),
        torch=torch.__version__, triton=triton.__version__, commit=git_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(), timer=timer,
        bytes="weight bytes read: packed codes + scales + zero points (bf16: 2 per weight)",
        tolerance=TOL)


def write_result(out, result: dict) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
