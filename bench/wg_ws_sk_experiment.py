"""Experiment (not dispatched): the warp-specialised wg tile of ``bench/wg_ws_experiment.py``
with stream-K over a fixed number of programs and one consumer partition per warpgroup, for
W4A16 at 129-256 rows, where the dispatch runs 0.64-0.88x bf16 (bench/RESULTS.md, session 22).

Why these two changes:

- stream-K: session 20's WS tile (one tile a program) beat the dispatch 1.10-1.11x where both
  ran the same one-wave grid, and lost where the dispatch used stream-K or K splits. Here every
  program walks the same share of (tile, K block) units, pieces summed by tickets as
  ``qlinear_wgmma.qlinear_wg_kernel``'s REDUCE 3 does; the producer's ring of stages runs on
  across a program's tiles, so the next tile's copies overlap the epilogue of the one before.
- two consumer partitions of 4 warps (one warpgroup each, each the MMAs of half the tile's
  weight columns, each with its own tickets): Nsight Compute put 46% of the 8-warp consumers'
  stalls at the CTA barriers Gluon places before every mbarrier wait and arrival of a
  multi-warp partition (s20run5); here such a barrier holds one warpgroup, and the two never
  wait for each other (the "empty" barrier counts one arrival from each).

Result (bench/RESULTS.md, session 23; s23run1-2): correct in all 100 launches; the best launch
ran 1.04-1.09x the dispatch on 28672 x 8192 at 160-256 rows (0.90x bf16 at best), 1.05x on 12288
x 4096 at 256 rows, 0.99-1.02x on 4096 x 12288, and lost at 160-192 rows of 12288 x 4096 and on
4096 x 4096 (0.81-0.92x); the same launch moved 3-8% between runs. Not dispatched.

A producer warp issues each K block's copies: x's two 64-channel halves by TMA, each half's
packed words, zero points and scales by ``cp.async`` into that half's buffers; "ready" counts
the TMA's bytes and the warp's 32 lanes. 4-bit g128 weights with zero points or symmetric, bf16
or fp16 x permuted per 128 channels by ``qlinear_swap.permute_x_blocks``.

    python bench/wg_ws_sk_experiment.py --compile-only
    python bench/wg_ws_sk_experiment.py --nk 12288x4096 28672x8192 --ms 160 256
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
from q3n_compile.kernels import contract  # noqa: E402
from q3n_compile.kernels.qlinear_swap import (MMT_BLOCK_K, PERMUTE_BLOCK_M,  # noqa: E402
                                              PERMUTE_BLOCKS, permute_x_kernel)

# 4 + 4 consumer warps and a producer warp (padded to a warpgroup): 384 threads, so at most
# 168 registers a thread at launch; in the specialised region the producer's warpgroup gives
# up registers (setmaxnreg) to the consumers'. A producer of 40 or 64 registers spilled its
# copy addresses (sm_90 build: 40-128 bytes of stack), 96 does not; so 200 for each consumer.
MAXNREG = 168


@gluon.jit
def _segment(u, u1, kb, tiles_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """The piece of a program's range starting at unit u: (tile, first and end K block, m0,
    n0); units are (tile, K block), tile-major, tiles n-fastest."""
    t = u // kb
    kb0 = u - t * kb
    kb1 = gl.minimum(kb, kb0 + (u1 - u))
    pid_m = t // tiles_n
    return t, kb0, kb1, pid_m * BLOCK_M, (t - pid_m * tiles_n) * BLOCK_N


@gluon.jit
def _range(M, N, KX, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """This program's units [u0, u1), and the K blocks a tile and weight-column tiles."""
    kb = gl.cdiv(KX, 128)
    tiles_n = gl.cdiv(N, BLOCK_N)
    units = tiles_n * gl.cdiv(M, BLOCK_M) * kb
    p = gl.program_id(0)
    P_ = gl.num_programs(0)
    return p * units // P_, (p + 1) * units // P_, kb, tiles_n, units


@gluon.jit
def _produce(x_desc, QW, S, Z, x0, x1, w_a, w_b, z_a, z_b, s_a, s_b, ready, empty, M, N, K_PAD,
             KX, ROW4, SYM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
             STAGES: gl.constexpr):
    """One warp: every K block's copies into its stage once both consumers released it."""
    HALF: gl.constexpr = BLOCK_N // 2
    w_bl: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4],
                                          threads_per_warp=[2 if HALF == 64 else 1,
                                                            16 if HALF == 64 else 32],
                                          warps_per_cta=[1, 1], order=[1, 0])
    # cp.async copies 4 bytes at least: the 64-column halves' zero points repeat over lanes.
    z_bl: gl.constexpr = gl.BlockedLayout(size_per_thread=[4], threads_per_warp=[32],
                                          warps_per_cta=[1], order=[0])
    s_bl: gl.constexpr = gl.BlockedLayout(size_per_thread=[HALF // 32], threads_per_warp=[32],
                                          warps_per_cta=[1], order=[0])
    w_rows = gl.arange(0, 16, layout=gl.SliceLayout(1, w_bl))
    w_c = gl.arange(0, HALF, layout=gl.SliceLayout(0, w_bl))
    z_c = gl.arange(0, HALF, layout=z_bl)
    s_c = gl.arange(0, HALF, layout=s_bl)
    W_ROWS = K_PAD // 8
    u, u1, kb, tiles_n, units = _range(M, N, KX, BLOCK_M, BLOCK_N)
    i = 0
    while u < u1:
        t, kb0, kb1, m0, n0 = _segment(u, u1, kb, tiles_n, BLOCK_M, BLOCK_N)
        ca = n0 + w_c
        cb = ca + HALF
        wa_ptrs = QW + (ROW4 + w_rows)[:, None] * N + ca[None, :]
        wb_ptrs = wa_ptrs + HALF
        wa_ok = (ca < N)[None, :]
        wb_ok = (cb < N)[None, :]
        for kk in range(kb0, kb1):
            k0 = kk * 128
            st = i % STAGES
            # Free once both consumers arrived for the block STAGES before (a fresh barrier
            # counts as released: its phase before the first is complete).
            mbarrier.wait(empty.index(st), ((i // STAGES) & 1) ^ 1)
            bar = ready.index(st)
            mbarrier.expect(bar, 2 * x_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [m0, k0], bar, x0.index(st))
            tma.async_copy_global_to_shared(x_desc, [m0, k0 + 64], bar, x1.index(st))
            row_ok = (k0 // 8 + w_rows < W_ROWS)[:, None]
            cp.async_copy_global_to_shared(w_a.index(st), wa_ptrs + (k0 // 8) * N,
                                           mask=wa_ok & row_ok)
            cp.async_copy_global_to_shared(w_b.index(st), wb_ptrs + (k0 // 8) * N,
                                           mask=wb_ok & row_ok)
            g = kk
            if not SYM:
                za = n0 + z_c
                cp.async_copy_global_to_shared(z_a.index(st), Z + g * N + za, mask=za < N)
                cp.async_copy_global_to_shared(z_b.index(st), Z + g * N + za + HALF,
                                               mask=za + HALF < N)
            sa = n0 + s_c
            cp.async_copy_global_to_shared(s_a.index(st), S + g * N + sa, mask=sa < N)
            cp.async_copy_global_to_shared(s_b.index(st), S + g * N + sa + HALF,
                                           mask=sa + HALF < N)
            # One arrival a lane, when that lane's copies have landed.
            cp.mbarrier_arrive(bar, increment_count=False)
            i += 1
        u += kb1 - kb0


@gluon.jit
def _consume(Y, BIAS, WS, CNT, x0, x1, w_h, z_h, s_h, ready, empty, M, N, KX, stride_ym,
             H: gl.constexpr, SYM: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr,
             BLOCK_N: gl.constexpr, STAGES: gl.constexpr, LOOKAHEAD: gl.constexpr):
    """One warpgroup: weight columns [H * HALF, (H + 1) * HALF) of each piece of the program's
    range (the wg kernel's unpack and asynchronous MMAs), then its store, or its partial sum to
    WS with a ticket (CNT[2 t + H]); the last of a tile half's programs sums and stores."""
    HALF: gl.constexpr = BLOCK_N // 2
    OPD: gl.constexpr = x0.dtype
    F16: gl.constexpr = OPD == gl.float16
    MAGIC: gl.constexpr = 1024.0 if F16 else 128.0
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    rows_l: gl.constexpr = gl.SliceLayout(1, a_l)
    TILE: gl.constexpr = HALF * BLOCK_M
    u, u1, kb, tiles_n, units = _range(M, N, KX, BLOCK_M, BLOCK_N)
    u0 = u
    p = gl.program_id(0)
    P_ = gl.num_programs(0)
    i = 0
    while u < u1:
        t, kb0, kb1, m0, n0 = _segment(u, u1, kb, tiles_n, BLOCK_M, BLOCK_N)
        acc = gl.zeros([HALF, BLOCK_M], gl.float32, layout=mma)
        a_1 = gl.zeros([HALF, 16], OPD, layout=a_l)
        a_2 = a_1
        a_3 = a_1
        for kk in range(kb0, kb1):
            st = i % STAGES
            mbarrier.wait(ready.index(st), (i // STAGES) & 1)
            w = w_h.index(st).permute((1, 0)).load(a_l)
            if SYM:
                zb = WG._pair_bits(gl.full([HALF], MAGIC + 8, gl.float32, layout=rows_l),
                                   OPD)[:, None]
            else:
                zb = WG._pair_bits(z_h.index(st).load(rows_l).to(gl.float32) + MAGIC,
                                   OPD)[:, None]
            sb = WG._pair_bits(s_h.index(st).load(rows_l).to(gl.float32), OPD)[:, None]
            acc, a_1, a_2, a_3 = WG._block_mmas(w, w, zb, sb, x0.index(st), x1.index(st),
                                                acc, a_1, a_2, a_3, 4, F16, LOOKAHEAD)
            # Every MMA of the block before this one has retired (LOOKAHEAD < 8): its stage
            # is free as far as this warpgroup goes.
            mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=kk > kb0)
            i += 1
        acc, a_1, a_2, a_3 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a_1, a_2, a_3))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES))
        nh = n0 + H * HALF
        if kb1 - kb0 == kb:
            WG._store_tile(Y, BIAS, acc, M, N, stride_ym, m0, nh, HAS_BIAS, BLOCK_M, HALF, mma)
        else:
            t_offs = WG._tile_offsets(BLOCK_M, HALF, mma)
            slot = (u != u0).to(gl.int32)
            gl.store(WS + ((p * 2 + slot) * 2 + H).to(gl.int64) * TILE + t_offs, acc)
            gl.thread_barrier()  # every thread's piece is written before the ticket
            cnt = CNT + 2 * t + H
            ticket = gl.atomic_add(cnt, 1, sem="acq_rel")
            q0 = ((t * kb + 1) * P_ - 1) // units
            q1 = ((t + 1) * kb * P_ - 1) // units
            if ticket == q1 - q0:
                total = gl.zeros([HALF, BLOCK_M], gl.float32, layout=mma)
                for q in range(q0, q1 + 1):
                    qslot = ((q * units // P_) // kb != t).to(gl.int32)
                    total += gl.load(WS + ((q * 2 + qslot) * 2 + H).to(gl.int64) * TILE + t_offs,
                                     cache_modifier=".cg")
                WG._store_tile(Y, BIAS, total, M, N, stride_ym, m0, nh, HAS_BIAS, BLOCK_M, HALF,
                               mma)
                gl.atomic_xchg(cnt, 0)
        u += kb1 - kb0


@gluon.jit
def wg_ws_sk_kernel(x_desc, QW, S, Z, BIAS, Y, WS, CNT, M, N, K_PAD, KX, ROW4, stride_ym,
                    SYM: gl.constexpr, HAS_BIAS: gl.constexpr, BLOCK_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, LOOKAHEAD: gl.constexpr,
                    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    """Y = x @ W^T (+ bias) by stream-K: the (tile, K block) units, tile-major, cut into
    num_programs equal ranges ([BLOCK_N, BLOCK_M] tiles; num_programs = the tiles gives one
    whole tile a program). 4-bit g128 weights; x (bf16 or fp16, permuted per 128 channels,
    [M, KX]) by the TMA descriptor x_desc (block [BLOCK_M, 64]). WS: [programs, 2, 2, HALF *
    BLOCK_M] fp32; CNT: 2 x tiles int32 tickets, zero between calls (left zero)."""
    OPD: gl.constexpr = x_desc.dtype
    HALF: gl.constexpr = BLOCK_N // 2
    w_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0])
    v_sl: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    x0 = gl.allocate_shared_memory(OPD, [STAGES, BLOCK_M, 64], x_desc.layout)
    x1 = gl.allocate_shared_memory(OPD, [STAGES, BLOCK_M, 64], x_desc.layout)
    w_a = gl.allocate_shared_memory(gl.int32, [STAGES, 16, HALF], w_sl)
    w_b = gl.allocate_shared_memory(gl.int32, [STAGES, 16, HALF], w_sl)
    z_a = gl.allocate_shared_memory(gl.uint8, [STAGES, HALF], v_sl)
    z_b = gl.allocate_shared_memory(gl.uint8, [STAGES, HALF], v_sl)
    s_a = gl.allocate_shared_memory(S.dtype.element_ty, [STAGES, HALF], v_sl)
    s_b = gl.allocate_shared_memory(S.dtype.element_ty, [STAGES, HALF], v_sl)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        # ready: the TMA's expect (one arrival and the bytes) and the producer's 32 lanes;
        # empty: one arrival from each consumer warpgroup.
        mbarrier.init(ready.index(s), count=33)
        mbarrier.init(empty.index(s), count=2)
    gl.warp_specialize([
        (_consume, (Y, BIAS, WS, CNT, x0, x1, w_a, z_a, s_a, ready, empty, M, N, KX, stride_ym,
                    0, SYM, HAS_BIAS, BLOCK_M, BLOCK_N, STAGES, LOOKAHEAD)),
        (_consume, (Y, BIAS, WS, CNT, x0, x1, w_b, z_b, s_b, ready, empty, M, N, KX, stride_ym,
                    1, SYM, HAS_BIAS, BLOCK_M, BLOCK_N, STAGES, LOOKAHEAD)),
        (_produce, (x_desc, QW, S, Z, x0, x1, w_a, w_b, z_a, z_b, s_a, s_b, ready, empty, M, N,
                    K_PAD, KX, ROW4, SYM, BLOCK_M, BLOCK_N, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def x_layout():
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)


def _constexprs(cfg: dict, sym: bool, has_bias: bool) -> dict:
    return dict(SYM=sym, HAS_BIAS=has_bias, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                STAGES=cfg["STAGES"], LOOKAHEAD=cfg["LOOKAHEAD"],
                CONSUMER_REGS=cfg["CONSUMER_REGS"], PRODUCER_REGS=cfg["PRODUCER_REGS"])


def programs(M: int, N: int, K: int, cfg: dict, sms: int) -> int:
    """cfg's PROGRAMS: "sms" (stream-K over one program an SM), "tiles" (one whole tile a
    program) or a number; at most one a unit."""
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    want = {"sms": sms, "tiles": tiles}.get(cfg["PROGRAMS"], cfg["PROGRAMS"])
    return min(int(want), tiles * triton.cdiv(P.padded_k(K), 128))


class Launch:
    """A prepared launch for one (x, weight, cfg): its workspace and tickets allocated once
    (the tickets are left zero by every call), so that a CUDA graph can replay it."""

    def __init__(self, x, qweight, scales, zeros, bias, K, cfg, sms):
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        self.x, self.args = x, (qweight, scales, zeros, bias, K)
        M, N = x.shape[0], qweight.shape[1]
        self.cfg, self.M, self.N = cfg, M, N
        self.programs = programs(M, N, K, cfg, sms)
        half_tile = cfg["BLOCK_N"] // 2 * cfg["BLOCK_M"]
        self.ws = torch.empty((self.programs, 2, 2, half_tile), dtype=torch.float32,
                              device=x.device)
        tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
        self.cnt = torch.zeros(2 * tiles, dtype=torch.int32, device=x.device)
        self.xk = torch.empty((M, triton.cdiv(K, 128) * 128), dtype=x.dtype, device=x.device)
        self.desc = TensorDescriptor.from_tensor(self.xk, [cfg["BLOCK_M"], 64], x_layout())

    def __call__(self):
        qweight, scales, zeros, bias, K = self.args
        M, K_ = self.x.shape
        kp = self.xk.shape[1]
        # x's permutation into the buffer the descriptor names (qlinear_swap.permute_x_blocks'
        # launch, without PDL: this kernel does not wait for it by griddepcontrol).
        contract.launch(permute_x_kernel,
                        (triton.cdiv(M, PERMUTE_BLOCK_M), triton.cdiv(kp, PERMUTE_BLOCKS
                                                                      * MMT_BLOCK_K)),
                        (self.x, self.xk), (M, K_, kp, self.x.stride(0), self.x.stride(1)),
                        dict(BLOCK_M=PERMUTE_BLOCK_M, BLOCKS=PERMUTE_BLOCKS, PDL=False),
                        dict(num_warps=4, launch_pdl=False), fast=True)
        y = torch.empty((self.M, self.N), dtype=self.x.dtype, device=self.x.device)
        cfg = self.cfg
        wg_ws_sk_kernel[(self.programs, 1, 1)](
            self.desc, qweight, scales, zeros if zeros is not None else scales,
            bias if bias is not None else scales, y, self.ws, self.cnt, self.M, self.N,
            P.padded_k(K), self.xk.shape[1], P.plane_starts(4, K)[0], y.stride(0),
            **_constexprs(cfg, zeros is None, bias is not None), num_warps=4, maxnreg=MAXNREG)
        return y


def compile_sm90(cfg: dict, x_type: str = "bf16", sym: bool = False) -> dict:
    """Registers, spills, shared bytes, setmaxnreg and barriers of the sm_90 build (Triton's
    frontend and the wheel's ptxas run on any machine)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = wg_ws_sk_kernel.arg_names
    ce = _constexprs(cfg, sym, False)
    desc = f"tensordesc<{x_type}[{cfg['BLOCK_M']}, 64],{x_layout()!r}>"
    types = dict(x_desc=desc, QW="*i32", S="*fp16", Z="*u8", BIAS=f"*{x_type}", Y=f"*{x_type}",
                 WS="*fp32", CNT="*i32")
    sig = {n: "constexpr" if n in ce else types.get(n, "i32") for n in names}
    src = GluonASTSource(fn=wg_ws_sk_kernel, signature=sig,
                         constexprs={(names.index(k),): v for k, v in ce.items()},
                         attrs={(names.index(n),): [["tt.divisibility", 16]]
                                for n in ("QW", "S", "Z", "Y", "WS", "CNT", "N", "K_PAD",
                                          "KX", "stride_ym")})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "maxnreg": MAXNREG})
    usage = resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return dict(cfg, regs=usage["reg"], stack=usage["stack"], shared=compiled.metadata.shared,
                setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)",
                                                 ptx))),
                wgmma=ptx.count("wgmma.mma_async"), bar_sync=len(re.findall(r"\bbar\.sync", ptx)))


def tile_name(tile: dict) -> str:
    return "x".join(str(tile[k]) for k in ("BLOCK_M", "BLOCK_N", "STAGES", "LOOKAHEAD",
                                           "PROGRAMS"))


def parse_tile(text: str) -> dict:
    """MxNxSTAGESxLOOKAHEADxPROGRAMS[xCONSUMER_REGSxPRODUCER_REGS]; PROGRAMS "sms", "tiles"
    or a number."""
    bm, bn, stages, lookahead, progs, *regs = text.split("x")
    return dict(BLOCK_M=int(bm), BLOCK_N=int(bn), STAGES=int(stages), LOOKAHEAD=int(lookahead),
                PROGRAMS=progs if progs in ("sms", "tiles") else int(progs),
                CONSUMER_REGS=int(regs[0]) if regs else 200,
                PRODUCER_REGS=int(regs[1]) if regs else 96)


TILES = ["128x128x4x2xsms", "128x128x4x2xtiles", "256x128x3x2xsms", "128x256x4x2xsms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--nk", nargs="+", default=["12288x4096", "28672x8192"])
    ap.add_argument("--ms", nargs="+", type=int, default=[160, 256])
    ap.add_argument("--tiles", nargs="+", default=TILES,
                    metavar="MxNxSTAGESxLOOKAHEADxPROGRAMS[xCREGSxPREGS]")
    ap.add_argument("--sym", action="store_true", help="symmetric weights (no zero points)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tiles = [parse_tile(t) for t in args.tiles]
    if args.compile_only:
        for tile in tiles:
            try:
                print(json.dumps(compile_sm90(tile, sym=args.sym)), flush=True)
            except Exception as exc:
                print(json.dumps(dict(tile, error=f"{type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0][:300]}")), flush=True)
        return
    import torch.nn.functional as F
    from bench_qlinear import TOL, random_packed, result_header, timed, write_result
    from q3n_compile.kernels import qlinear as Q

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = dict(result_header("CUDA-graph replay, do_bench median, L2 flushed"),
                  format=f"W4A16 g128 {'symmetric' if args.sym else 'zero points'}, bf16 x",
                  rows=[])
    for nk in args.nk:
        N, K = (int(v) for v in nk.split("x"))
        pw = random_packed(gen, N, K, 4, 128, args.sym)
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
            print(f"{N}x{K} M={M}: bf16 {bf16_ms:.4f}  q3n {q3n_ms:.4f} "
                  f"({bf16_ms / q3n_ms:.2f}x bf16)", flush=True)
            for tile in tiles:
                ent = dict(tile)
                try:
                    f = Launch(x, pw.qweight, pw.scales, pw.zeros, None, K, tile, sms)
                    ent["programs"] = f.programs
                    # Twice: the second call proves the tickets were left zero.
                    errs = [((f().double() - ref).abs().max() / ref.abs().max()).item()
                            for _ in range(2)]
                    ent["err"] = max(errs)
                    if ent["err"] > TOL:
                        ent["error"] = f"wrong result: {errs}"
                    else:
                        _, ent["graph_ms"] = timed(f, eager=False)
                except Exception as exc:
                    ent["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                row["ws"].append(ent)
                print(f"    ws {tile_name(tile)} ({ent.get('programs')} programs): "
                      + (ent.get("error") or f"{ent['graph_ms']:.4f} ms "
                         f"({bf16_ms / ent['graph_ms']:.2f}x bf16, "
                         f"{q3n_ms / ent['graph_ms']:.2f}x q3n, err {ent['err']:.1e})"),
                      flush=True)
            result["rows"].append(row)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
