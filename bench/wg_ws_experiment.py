"""Experiment (not dispatched): the wg tile of ``q3n_compile/kernels/qlinear_wgmma.py`` with a
producer warp, to test whether it lifts the tile from the 55-59% of the tensor pipe that Nsight
Compute measured (bench/RESULTS.md, session 19: latency-bound, two CTA barriers and a cp.async
wait each K block in every warp).

Result (bench/RESULTS.md, session 20; s20run1, s20run4, s20run6): correct everywhere, and no
general gain. Faster than the dispatch only where that runs the same one-wave grid (12288 x
4096 at 128 rows, 128 x 128 tiles: 1.10-1.11x); equal or slower where the dispatch uses stream-K
or K splits (0.89-1.01x on 28672 x 8192 and 12288 x 4096 at 128-256 rows, 0.56-0.84x on the
4096-column shapes, which this kernel cannot split). At 16 rows it runs the same 0.077 ms as
mmT on 28672 x 8192; Nsight Compute (s20run5) puts 46% of its consumers' stalls at the CTA
barriers Gluon places before every mbarrier wait and arrival of a multi-warp partition. One
consumer warpgroup (``...x4`` tiles, two programs an SM) did not help.

The kernel here (:func:`wg_ws_kernel`, one tile a program, 4-bit g128 weights with zero points
or symmetric) splits the program with ``gl.warp_specialize``:

- a producer warp issues every copy of a K block: x's two 64-channel halves by TMA (the
  descriptor's 128-byte swizzle is the layout the MMA reads), the packed words, zero points and
  scales by ``cp.async``; each block's stage has a "ready" mbarrier (the TMA's bytes, plus one
  arrival from each of the warp's 32 lanes when their copies land) and an "empty" one;
- the 8 consumer warps wait on "ready", unpack and issue the MMAs as the wg kernel does, and
  arrive on the "empty" barrier of the block before (its MMAs retired: LOOKAHEAD < 8); they
  never wait for a copy of their own and share one barrier a K block (the one Gluon puts
  before an mbarrier arrival), where the wg kernel has two CTA barriers.

Compiled for sm_90 on the CPU (``--compile-only``: registers, spills, shared memory, the
consumer loop's barriers). On a GPU: every launch checked against float64 (the op's reference)
first, then timed against the dispatched op and bf16 cuBLAS as bench_qlinear_wgmma.py does.

    python bench/wg_ws_experiment.py --compile-only
    python bench/wg_ws_experiment.py --nk 12288x4096 28672x8192 --ms 128 256
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma,
                                                              warpgroup_mma_wait)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compile_qlinear_sm90 import resource_usage  # noqa: E402
from q3n_compile.kernels import packing as P  # noqa: E402
from q3n_compile.kernels import qlinear_wgmma as WG  # noqa: E402
from q3n_compile.kernels.qlinear_swap import permute_x_blocks  # noqa: E402

# 8 consumer warps and a producer warpgroup (1 warp working): 384 threads, so at most 170
# registers a thread at launch. In the specialised region Triton gives the producer warpgroup
# PRODUCER_REGS and the consumers the rest (sm_90 PTX: setmaxnreg 96 and 200). At 56 / 72 the
# producer of a 256-column tile spilled (its copy addresses), at 96 neither partition does.
PRODUCER_REGS = gl.constexpr(96)
MAXNREG = 168
# With one consumer warpgroup (num_warps 4; 256 threads with the producer's warpgroup) a cap of
# 128 registers lets two programs share an SM: the CTA barriers Gluon puts before each mbarrier
# wait and arrival then hold 4 warps, not 8 (Nsight Compute, s20run5: 46% of the 8-warp tile's
# stalls at 16 rows were those barriers).
PRODUCER_REGS_4 = gl.constexpr(56)
MAXNREG_4 = 128


def _caps(num_warps: int):
    """(launch register cap, producer's registers) for a tile's consumer warps."""
    return (MAXNREG, PRODUCER_REGS) if num_warps == 8 else (MAXNREG_4, PRODUCER_REGS_4)


@gluon.jit
def _produce(x_desc, QW, S, Z, x0, x1, w_smem, z_smem, s_smem, ready, empty, N, K_PAD, ROW4,
             m0, n0, k_start, k_end, SYM: gl.constexpr, BLOCK_N: gl.constexpr,
             STAGES: gl.constexpr):
    """One warp: every K block's copies into its stage once the consumers have released it."""
    w_bl: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4],
                                          threads_per_warp=[2 if BLOCK_N == 64 else 1,
                                                            16 if BLOCK_N == 64 else 32],
                                          warps_per_cta=[1, 1], order=[1, 0])
    z_bl: gl.constexpr = gl.BlockedLayout(size_per_thread=[4], threads_per_warp=[32],
                                          warps_per_cta=[1], order=[0])
    s_bl: gl.constexpr = gl.BlockedLayout(size_per_thread=[2], threads_per_warp=[32],
                                          warps_per_cta=[1], order=[0])
    w_rows = gl.arange(0, 16, layout=gl.SliceLayout(1, w_bl))
    w_cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, w_bl))
    w_ptrs = QW + (ROW4 + w_rows)[:, None] * N + w_cols[None, :]
    w_ok = (w_cols < N)[None, :]
    W_ROWS = K_PAD // 8
    zs_offs = n0 + gl.arange(0, BLOCK_N, layout=z_bl)
    ss_offs = n0 + gl.arange(0, BLOCK_N, layout=s_bl)
    i = 0
    for k0 in range(k_start, k_end, 128):
        st = i % STAGES
        # Free once the consumers arrived for the block STAGES before (a fresh barrier counts
        # as released: its phase before the first is complete).
        mbarrier.wait(empty.index(st), ((i // STAGES) & 1) ^ 1)
        bar = ready.index(st)
        mbarrier.expect(bar, 2 * x_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [m0, k0], bar, x0.index(st))
        tma.async_copy_global_to_shared(x_desc, [m0, k0 + 64], bar, x1.index(st))
        cp.async_copy_global_to_shared(w_smem.index(st), w_ptrs + (k0 // 8) * N,
                                       mask=w_ok & (k0 // 8 + w_rows < W_ROWS)[:, None])
        g = k0 // 128
        if not SYM:
            cp.async_copy_global_to_shared(z_smem.index(st), Z + g * N + zs_offs,
                                           mask=zs_offs < N)
        cp.async_copy_global_to_shared(s_smem.index(st), S + g * N + ss_offs, mask=ss_offs < N)
        # One arrival a lane, when that lane's copies have landed.
        cp.mbarrier_arrive(bar, increment_count=False)
        i += 1


@gluon.jit
def _consume(Y, BIAS, x0, x1, w_smem, z_smem, s_smem, ready, empty, M, N, stride_ym, m0, n0,
             k_start, k_end, SYM: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr,
             BLOCK_N: gl.constexpr, STAGES: gl.constexpr, LOOKAHEAD: gl.constexpr):
    """The default partition (num_warps): the wg kernel's unpack and asynchronous MMAs on each
    ready stage, then the tile's store."""
    num_warps: gl.constexpr = gl.num_warps()
    OPD: gl.constexpr = x0.dtype
    F16: gl.constexpr = OPD == gl.float16
    MAGIC: gl.constexpr = 1024.0 if F16 else 128.0
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    rows_l: gl.constexpr = gl.SliceLayout(1, a_l)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
    a_1 = gl.zeros([BLOCK_N, 16], OPD, layout=a_l)
    a_2 = a_1
    a_3 = a_1
    i = 0
    for k0 in range(k_start, k_end, 128):
        st = i % STAGES
        mbarrier.wait(ready.index(st), (i // STAGES) & 1)
        w = w_smem.index(st).permute((1, 0)).load(a_l)
        if SYM:
            zb = WG._pair_bits(gl.full([BLOCK_N], MAGIC + 8, gl.float32, layout=rows_l),
                               OPD)[:, None]
        else:
            zb = WG._pair_bits(z_smem.index(st).load(rows_l).to(gl.float32) + MAGIC,
                               OPD)[:, None]
        sb = WG._pair_bits(s_smem.index(st).load(rows_l).to(gl.float32), OPD)[:, None]
        acc, a_1, a_2, a_3 = WG._block_mmas(w, w, zb, sb, x0.index(st), x1.index(st), acc,
                                            a_1, a_2, a_3, 4, F16, LOOKAHEAD)
        # Every MMA of the block before this one has retired (LOOKAHEAD < 8): its stage is
        # free for the producer.
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=i > 0)
        i += 1
    acc, a_1, a_2, a_3 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a_1, a_2, a_3))
    WG._store_tile(Y, BIAS, acc, M, N, stride_ym, m0, n0, HAS_BIAS, BLOCK_M, BLOCK_N, mma)


@gluon.jit
def wg_ws_kernel(x_desc, QW, S, Z, BIAS, Y, M, N, K_PAD, KX, ROW4, stride_ym,
                 SYM: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr, LOOKAHEAD: gl.constexpr,
                 PRODUCER: gl.constexpr):
    """Y = x @ W^T (+ bias), one [BLOCK_N, BLOCK_M] tile a program (grid: weight-column tiles,
    1, row tiles), 4-bit g128 weights; x (bf16 or fp16, permuted per 128 channels, [M, KX]) by
    the TMA descriptor x_desc (block [BLOCK_M, 64])."""
    OPD: gl.constexpr = x_desc.dtype
    w_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0])
    v_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    x0 = gl.allocate_shared_memory(OPD, [STAGES, BLOCK_M, 64], x_desc.layout)
    x1 = gl.allocate_shared_memory(OPD, [STAGES, BLOCK_M, 64], x_desc.layout)
    w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, 16, BLOCK_N], w_sl)
    z_smem = gl.allocate_shared_memory(gl.uint8, [STAGES, BLOCK_N], v_sl)
    s_smem = gl.allocate_shared_memory(S.dtype.element_ty, [STAGES, BLOCK_N], v_sl)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        # ready: the TMA's expect (one arrival and the bytes) and the producer's 32 lanes.
        mbarrier.init(ready.index(s), count=33)
        mbarrier.init(empty.index(s), count=1)
    m0 = gl.program_id(2) * BLOCK_M
    n0 = gl.program_id(0) * BLOCK_N
    gl.warp_specialize([
        (_consume, (Y, BIAS, x0, x1, w_smem, z_smem, s_smem, ready, empty, M, N, stride_ym, m0,
                    n0, 0, KX, SYM, HAS_BIAS, BLOCK_M, BLOCK_N, STAGES, LOOKAHEAD)),
        (_produce, (x_desc, QW, S, Z, x0, x1, w_smem, z_smem, s_smem, ready, empty, N, K_PAD,
                    ROW4, m0, n0, 0, KX, SYM, BLOCK_N, STAGES)),
    ], [1], [PRODUCER])


def x_layout():
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)


def run(x, qweight, scales, zeros, bias, K, cfg):
    """The experiment's launch: x [M, K] bf16/fp16, 4-bit g128 weights as the op packs them."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    M, N = x.shape[0], qweight.shape[1]
    xk = permute_x_blocks(x)
    desc = TensorDescriptor.from_tensor(xk, [cfg["BLOCK_M"], 64], x_layout())
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), 1, triton.cdiv(M, cfg["BLOCK_M"]))
    wg_ws_kernel[grid](desc, qweight, scales, zeros if zeros is not None else scales,
                       bias if bias is not None else scales, y, M, N, P.padded_k(K),
                       xk.shape[1], P.plane_starts(4, K)[0], y.stride(0),
                       SYM=zeros is None, HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"],
                       BLOCK_N=cfg["BLOCK_N"], STAGES=cfg["STAGES"],
                       LOOKAHEAD=cfg["LOOKAHEAD"], PRODUCER=_caps(cfg["num_warps"])[1],
                       num_warps=cfg["num_warps"], maxnreg=_caps(cfg["num_warps"])[0])
    return y


def compile_sm90(cfg: dict, x_type: str = "bf16", sym: bool = False) -> dict:
    """Registers, spills, shared bytes and the consumer loop's barriers of the sm_90 build
    (Triton's frontend and the wheel's ptxas run on any machine)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = wg_ws_kernel.arg_names
    ce = dict(SYM=sym, HAS_BIAS=False, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
              STAGES=cfg["STAGES"], LOOKAHEAD=cfg["LOOKAHEAD"],
              PRODUCER=_caps(cfg["num_warps"])[1])
    desc = f"tensordesc<{x_type}[{cfg['BLOCK_M']}, 64],{x_layout()!r}>"
    types = dict(x_desc=desc, QW="*i32", S="*fp16", Z="*u8", BIAS=f"*{x_type}", Y=f"*{x_type}")
    sig = {n: "constexpr" if n in ce else types.get(n, "i32") for n in names}
    src = GluonASTSource(fn=wg_ws_kernel, signature=sig,
                         constexprs={(names.index(k),): v for k, v in ce.items()},
                         attrs={(names.index(n),): [["tt.divisibility", 16]]
                                for n in ("QW", "S", "Z", "Y", "N", "K_PAD", "KX",
                                          "stride_ym")})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg["num_warps"],
                                       "maxnreg": _caps(cfg["num_warps"])[0]})
    usage = resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return dict(cfg, regs=usage["reg"], stack=usage["stack"], shared=compiled.metadata.shared,
                setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)",
                                                 ptx))),
                wgmma=ptx.count("wgmma.mma_async"), bar_sync=len(re.findall(r"\bbar\.sync", ptx)))


TILES = [dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, STAGES=4, LOOKAHEAD=2),
         dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, STAGES=4, LOOKAHEAD=2)]


def tile_name(tile: dict) -> str:
    return "x".join(str(tile[k]) for k in ("BLOCK_M", "BLOCK_N", "STAGES", "LOOKAHEAD",
                                           "num_warps"))


def parse_tile(text: str) -> dict:
    """MxNxSTAGESxLOOKAHEAD[xWARPS]: consumer warps 8 (default) or 4."""
    bm, bn, stages, lookahead, *warps = (int(v) for v in text.split("x"))
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps[0] if warps else 8, STAGES=stages,
                LOOKAHEAD=lookahead)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--nk", nargs="+", default=["12288x4096", "28672x8192"])
    ap.add_argument("--ms", nargs="+", type=int, default=[128, 256])
    ap.add_argument("--tiles", nargs="+", metavar="MxNxSTAGESxLOOKAHEAD[xWARPS]",
                    help="tiles to build (8 consumer warps each); default: "
                    + " ".join(tile_name(t) for t in TILES))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tiles = [parse_tile(t) for t in args.tiles] if args.tiles else TILES
    if args.compile_only:
        for tile in tiles:
            print(json.dumps(compile_sm90(tile)), flush=True)
        return
    import torch.nn.functional as F
    from bench_qlinear import TOL, random_packed, result_header, timed, write_result
    from q3n_compile.kernels import qlinear as Q

    gen = torch.Generator(device="cuda").manual_seed(0)
    result = dict(result_header("CUDA-graph replay, do_bench median, L2 flushed"),
                  format="W4A16 g128 zero points, bf16 x", rows=[])
    for nk in args.nk:
        N, K = (int(v) for v in nk.split("x"))
        pw = random_packed(gen, N, K, 4, 128, False)
        w = (torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).to(torch.bfloat16)
        for M in args.ms:
            x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16)
            qargs = (x, pw.qweight, pw.scales, pw.zeros, None, None, 4, 128, K, "none",
                     Q.PER_TOKEN)
            ref = Q.reference(x.double(), *qargs[1:]).double()
            _, bf16_ms = timed(lambda: F.linear(x, w), eager=False)
            _, q3n_ms = timed(lambda: torch.ops.q3n.qlinear(*qargs), eager=False)
            row = dict(M=M, N=N, K=K, bf16_ms=bf16_ms, q3n_ms=q3n_ms,
                       q3n_path=Q.choose_path(M, N, K, 4, 128, "none", x.dtype, x.device),
                       ws=[])
            print(f"{N}x{K} M={M}: bf16 {bf16_ms:.4f}  q3n {q3n_ms:.4f}", flush=True)
            for tile in tiles:
                ent = dict(tile)
                try:
                    f = lambda: run(x, pw.qweight, pw.scales, pw.zeros, None, K, tile)  # noqa
                    err = ((f().double() - ref).abs().max() / ref.abs().max()).item()
                    ent["err"] = err
                    if err > TOL:
                        ent["error"] = f"wrong result: {err:.3g}"
                    else:
                        _, ent["graph_ms"] = timed(f, eager=False)
                except Exception as exc:
                    ent["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                row["ws"].append(ent)
                print(f"    ws {tile_name(tile)}: "
                      + (ent.get("error") or f"{ent['graph_ms']:.4f} ms "
                         f"({bf16_ms / ent['graph_ms']:.2f}x bf16, "
                         f"{q3n_ms / ent['graph_ms']:.2f}x q3n, err {ent['err']:.1e})"),
                      flush=True)
            result["rows"].append(row)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
