"""Experiment (not dispatched): ``q3n::norm_linear`` as one Gluon kernel on sm_90 whose GEMM
computes the norm's statistics from its own x tiles, against the op's dispatched design from 65
rows ("cublas": a normalise kernel, then cuBLAS) and the linear alone.

Why: from 256 rows the "cublas" design costs 1.03-1.16x the linear alone (bench/RESULTS.md,
session 16), the normalise kernel's launch and drain; issue 4 asks for 3%. This kernel needs no
second launch and no pass over x of its own.

Result (s20run3, when it was the op's "wg" design at 1af61ed; bench/RESULTS.md, session 20):
correct (27 GPU tests against float64), and slower than the dispatched design at 256-8192 rows
(K 4096, N 12288; SwiGLU 2 x 11008): LayerNorm 1.23-1.49x the linear alone, RMSNorm 1.05-1.36x,
SwiGLU 0.99-1.54x, where "cublas" ran 0.95-1.14x in the same run. Its GEMM is a
warp-specialised 128 x 256 tile, one a program: at 256 rows its 96 tiles leave 36 of 132 SMs
idle (cuBLAS takes 0.041 ms there, a rate a 96-SM grid reaches only at 87% of the tensor pipe's
peak); at 8192 rows the RMSNorm form (the lightest statistics) runs 1.10x the op's "split"
design (a statistics kernel, then Triton's pipelined tile of the same shape) and the LayerNorm
form 1.23x (per element: the shift, the mask and a second sum in the consumer warps, and the x
tile read once more from shared memory, whose bandwidth the MMAs' operand reads and the TMA
writes nearly use up). Closing the gap needs stream-K over all SMs and the statistics off the
MMA warps (warps of their own reading x from L2); not done.

The kernel (:func:`norm_linear_wg_kernel`):

    y = rstd * (x @ W'^T - mean * rowsum(W')) + b'          LayerNorm
    y = rstd * (x @ W'^T) + b'                              RMSNorm
    SiLU-gate: y = silu(y_gate) * y_up;  + residual;  rounded once to W's dtype,

one [BLOCK_M, BLOCK_N] output tile a program, GROUP_M-ordered so the row tiles that share a
weight tile run together:

- a producer warp (``gl.warp_specialize``) copies each K block's x tile [BLOCK_M, BLOCK_K] and
  weight tile(s) [BLOCK_N, BLOCK_K] by TMA into a ring of STAGES shared buffers (128-byte
  swizzle, the layout the MMA reads), signalling a "ready" mbarrier per stage; SiLU-gate copies
  the gate rows n0.. and the up rows UP_ROW + n0.. of the concatenated weight;
- the consumer warpgroups (num_warps = BLOCK_M / 16: 64 rows of x a warpgroup) issue the
  block's warpgroup MMAs asynchronously (both operands from shared memory, fp32 accumulators),
  then, while they run, read the same x tile from shared memory into registers for the row
  statistics, wait until the block before has retired and release its stage ("empty");
- the epilogue applies the statistics, bias, SiLU-gate and residual to the accumulators and
  stores each column block to its output.

Statistics (fp32): LayerNorm shifts every element by c, the mean of the row's first K block
(as the op's designs do, so rows with a large mean do not cancel in the one-pass sums):
s1 = sum(x - c), s2 = sum((x - c)^2), dm = s1 / K, mean = c + dm, var = max(s2 / K - dm^2, 0);
RMSNorm s2 = sum(x^2). Elements past K (TMA fills them with zeros) are masked out of the sums.
The product runs on the raw x: for LayerNorm the fp32 accumulator loses about
log2(|mean| / std) bits before mean * rowsum(W') comes off, as the op's "split" design does.

Needs an sm_90 GPU, x and weight of one 16-bit dtype, contiguous rows, K a multiple of 8.

    python bench/norm_linear_wg_experiment.py --compile-only
    python bench/norm_linear_wg_experiment.py --ms 256 2048
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# The producer warp only issues TMA copies; the consumers get the rest of the register file
# (sm_90 setmaxnreg): with a 128 x 256 fp32 accumulator (128 registers a thread) and the x tile
# they read for the statistics, the consumers need ~200.
PRODUCER_REGS = gl.constexpr(40)
MAXNREG = 168  # 8 consumer warps + the producer's warpgroup: 384 threads at launch

# The tiles the dispatch uses: BLOCK_N is one accumulator's width (SiLU-gate keeps two, gate and
# up, so its output tile is BLOCK_N wide and its MMAs cover 2 * BLOCK_N weight rows).
TILE = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, STAGES=4, GROUP_M=8, num_warps=8)
TILE_GATE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=4, GROUP_M=8, num_warps=8)


@gluon.jit
def _produce(x_desc, w_desc, x_s, w_s, u_s, ready, empty, m0, n0, up0, K,
             BLOCK_K: gl.constexpr, STAGES: gl.constexpr, SILU_GATE: gl.constexpr):
    """One warp: each K block's TMA copies into its stage once the consumers released it."""
    i = 0
    for k0 in range(0, K, BLOCK_K):
        st = i % STAGES
        # A fresh barrier counts as released: the phase before its first is complete.
        mbarrier.wait(empty.index(st), ((i // STAGES) & 1) ^ 1)
        bar = ready.index(st)
        if SILU_GATE:
            mbarrier.expect(bar, x_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes)
        else:
            mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [m0, k0], bar, x_s.index(st))
        tma.async_copy_global_to_shared(w_desc, [n0, k0], bar, w_s.index(st))
        if SILU_GATE:
            tma.async_copy_global_to_shared(w_desc, [up0, k0], bar, u_s.index(st))
        i += 1


@gluon.jit
def _apply(acc, mean, rstd, RS, BIAS, offs_n, col_ok, KIND: gl.constexpr,
           HAS_BIAS: gl.constexpr):
    """rstd * (acc - mean * rowsum) (+ bias) on one accumulator (RMSNorm: no mean term)."""
    y = acc
    if KIND == 0:
        rs = gl.load(RS + offs_n, mask=col_ok, other=0.0)
        y = y - mean[:, None] * rs[None, :]
    y = y * rstd[:, None]
    if HAS_BIAS:
        y = y + gl.load(BIAS + offs_n, mask=col_ok, other=0.0)[None, :]
    return y


@gluon.jit
def _consume(x_s, w_s, u_s, ready, empty, BIAS, RS, RES, O0, O1, O2, O3, M, N, K, eps,
             stride_rm, stride_rn, E1, E2, E3, UP_ROW, m0, n0,
             KIND: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_RES: gl.constexpr,
             SILU_GATE: gl.constexpr, NUM_OUT: gl.constexpr, BLOCK_M: gl.constexpr,
             BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """The default partition: MMAs, statistics, epilogue."""
    num_warps: gl.constexpr = gl.num_warps()
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    # The statistics read x's tile two threads a row (BLOCK_K / 2 contiguous elements each), so
    # a row's sum is one in-thread reduction and one shuffle.
    st_l: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, BLOCK_K // 2],
                                          threads_per_warp=[16, 2], warps_per_cta=[num_warps, 1],
                                          order=[1, 0])
    rows_l: gl.constexpr = gl.SliceLayout(1, st_l)
    cols = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, st_l))
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
    acc_u = acc
    s1 = gl.zeros([BLOCK_M], gl.float32, layout=rows_l)
    s2 = gl.zeros([BLOCK_M], gl.float32, layout=rows_l)
    c = gl.zeros([BLOCK_M], gl.float32, layout=rows_l)
    if KIND == 0:
        # The shift: the mean of the row's first K block (the phase-0 wait again in the loop
        # returns at once: stage 0 is not released before its block's MMAs retire).
        mbarrier.wait(ready.index(0), 0)
        first = x_s.index(0).load(st_l).to(gl.float32)
        first = gl.where((cols < K)[None, :], first, 0.0)
        c = gl.sum(first, 1) / gl.minimum(K, BLOCK_K).to(gl.float32)
    i = 0
    for k0 in range(0, K, BLOCK_K):
        st = i % STAGES
        mbarrier.wait(ready.index(st), (i // STAGES) & 1)
        xs = x_s.index(st)
        acc = warpgroup_mma(xs, w_s.index(st).permute((1, 0)), acc, is_async=True)
        if SILU_GATE:
            acc_u = warpgroup_mma(xs, u_s.index(st).permute((1, 0)), acc_u, is_async=True)
        # While the MMAs run: this block's share of the statistics, from the same tile.
        a = xs.load(st_l).to(gl.float32)
        k_ok = (k0 + cols < K)[None, :]
        if KIND == 0:
            a = gl.where(k_ok, a - c[:, None], 0.0)
            s1 += gl.sum(a, 1)
        s2 += gl.sum(a * a, 1)
        # The block before has retired (this block's MMAs may still run): free its stage.
        if SILU_GATE:
            acc, acc_u = warpgroup_mma_wait(num_outstanding=2, deps=(acc, acc_u))
        else:
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=i > 0)
        i += 1
    acc, acc_u = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc_u))

    kf = K.to(gl.float32)
    if KIND == 0:
        dm = s1 / kf
        mean = c + dm
        rstd = gl.rsqrt(gl.maximum(s2 / kf - dm * dm, 0.0) + eps)
    else:
        mean = c
        rstd = gl.rsqrt(s2 / kf + eps)
    mean = gl.convert_layout(mean, gl.SliceLayout(1, mma))
    rstd = gl.convert_layout(rstd, gl.SliceLayout(1, mma))

    offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
    offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
    row_ok = offs_m < M
    col_ok = offs_n < N
    y = _apply(acc, mean, rstd, RS, BIAS, offs_n, col_ok, KIND, HAS_BIAS)
    if SILU_GATE:
        up = _apply(acc_u, mean, rstd, RS, BIAS, UP_ROW + offs_n, col_ok, KIND, HAS_BIAS)
        y = y / (1.0 + gl.exp(-y)) * up
    ok = row_ok[:, None] & col_ok[None, :]
    m2 = offs_m.to(gl.int64)[:, None]
    n2 = offs_n[None, :]
    if HAS_RES:
        y = y + gl.load(RES + m2 * stride_rm + n2 * stride_rn, mask=ok, other=0.0).to(gl.float32)
    y = y.to(O0.dtype.element_ty)
    if NUM_OUT == 1:
        gl.store(O0 + m2 * N + n2, y, mask=ok)
    else:
        gl.store(O0 + m2 * E1 + n2, y, mask=ok & (n2 < E1))
        if NUM_OUT == 2:
            gl.store(O1 + m2 * (N - E1) + (n2 - E1), y, mask=ok & (n2 >= E1))
        else:
            gl.store(O1 + m2 * (E2 - E1) + (n2 - E1), y, mask=ok & (n2 >= E1) & (n2 < E2))
            if NUM_OUT == 3:
                gl.store(O2 + m2 * (N - E2) + (n2 - E2), y, mask=ok & (n2 >= E2))
            else:
                gl.store(O2 + m2 * (E3 - E2) + (n2 - E2), y, mask=ok & (n2 >= E2) & (n2 < E3))
                gl.store(O3 + m2 * (N - E3) + (n2 - E3), y, mask=ok & (n2 >= E3))


@gluon.jit
def norm_linear_wg_kernel(x_desc, w_desc, BIAS, RS, RES, O0, O1, O2, O3, M, N, K, eps,
                          stride_rm, stride_rn, E1, E2, E3, UP_ROW,
                          KIND: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_RES: gl.constexpr,
                          SILU_GATE: gl.constexpr, NUM_OUT: gl.constexpr,
                          BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                          STAGES: gl.constexpr, GROUP_M: gl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of the N output columns a program; x [M, K] by x_desc (block
    [BLOCK_M, BLOCK_K]), the folded weight by w_desc (block [BLOCK_N, BLOCK_K]); KIND 0
    LayerNorm (RS: rowsum(W') fp32), 1 RMSNorm; BIAS fp32; output column blocks end at E1, E2,
    E3 (NUM_OUT outputs)."""
    dtype: gl.constexpr = x_desc.dtype
    x_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    w_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    if SILU_GATE:
        u_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    else:
        u_s = w_s
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)  # the producer's expect; the TMA's bytes
        mbarrier.init(empty.index(s), count=1)  # the consumers' one arrival
    fence_async_shared()

    # GROUP_M row tiles of x per column tile, column tiles in order within a group: the row
    # tiles that read a weight tile run together, so the weight comes from memory once.
    pid = gl.program_id(0)
    tiles_m = gl.cdiv(M, BLOCK_M)
    tiles_n = gl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = gl.minimum(tiles_m - first_m, GROUP_M)
    m0 = (first_m + (pid % per_group) % group_m) * BLOCK_M
    n0 = ((pid % per_group) // group_m) * BLOCK_N

    gl.warp_specialize([
        (_consume, (x_s, w_s, u_s, ready, empty, BIAS, RS, RES, O0, O1, O2, O3, M, N, K, eps,
                    stride_rm, stride_rn, E1, E2, E3, UP_ROW, m0, n0, KIND, HAS_BIAS, HAS_RES,
                    SILU_GATE, NUM_OUT, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)),
        (_produce, (x_desc, w_desc, x_s, w_s, u_s, ready, empty, m0, n0, UP_ROW + n0, K,
                    BLOCK_K, STAGES, SILU_GATE)),
    ], [1], [PRODUCER_REGS])


def _smem_layout(block: list, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[dtype])


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def supports(x2: torch.Tensor, weight: torch.Tensor) -> Optional[str]:
    """Why this design cannot take the call (None: it can). x2 is x as [M, K]."""
    if x2.device.type != "cuda" or torch.cuda.get_device_capability(x2.device) != (9, 0):
        return "needs an sm_90 GPU (warpgroup MMA, TMA)"
    if weight.dtype not in _GL_DTYPES or x2.dtype != weight.dtype:
        return "needs x and weight of one 16-bit dtype"
    for name, t in (("x", x2), ("weight", weight)):
        if t.stride(-1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return f"{name} needs contiguous rows, 16-byte row strides and a 16-byte-aligned base"
    return None


def tile_for(epilogue: str) -> dict:
    return TILE_GATE if epilogue == "silu_gate" else TILE


def launch(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           rowsum: Optional[torch.Tensor], residual: Optional[torch.Tensor], outs: list,
           kind: str, eps: float, epilogue: str, n_cols: int, ends: tuple, up_row: int,
           cfg: Optional[dict] = None) -> None:
    """Write the op's outputs ``outs`` for x2 [M, K] (see the module docstring). bias and
    rowsum are fp32 (rowsum: LayerNorm only); residual [M, n_cols] or None; ``ends``: the
    column where outputs 1, 2, 3 start; ``up_row``: the first up row (SiLU-gate)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    cfg = dict(cfg or tile_for(epilogue))
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    M, K = x2.shape
    x_desc = TensorDescriptor.from_tensor(x2, [bm, bk], _smem_layout([bm, bk], x2.dtype))
    w_desc = TensorDescriptor.from_tensor(weight, [bn, bk], _smem_layout([bn, bk], weight.dtype))
    unused = outs[0]
    o = list(outs) + [unused] * (4 - len(outs))
    res_strides = residual.stride() if residual is not None else (0, 0)
    grid = (triton.cdiv(M, bm) * triton.cdiv(n_cols, bn),)
    norm_linear_wg_kernel[grid](
        x_desc, w_desc, bias if bias is not None else unused,
        rowsum if kind == "layernorm" else unused, residual if residual is not None else unused,
        o[0], o[1], o[2], o[3], M, n_cols, K, float(eps), res_strides[0], res_strides[1],
        ends[0], ends[1], ends[2], up_row,
        KIND=0 if kind == "layernorm" else 1, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, SILU_GATE=epilogue == "silu_gate", NUM_OUT=len(outs),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=cfg["STAGES"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], maxnreg=MAXNREG)


# ------------------------------------------------------------------------------------------------
# Compile for sm_90 on any machine; check and time on an H200
# ------------------------------------------------------------------------------------------------

# (dtype, KIND 0 LayerNorm / 1 RMSNorm, SiLU-gate, bias, residual, outputs)
VARIANTS = [("bf16", 0, False, True, False, 1), ("bf16", 1, False, False, True, 1),
            ("fp16", 0, False, False, True, 3), ("bf16", 1, True, False, False, 1),
            ("fp16", 0, True, True, True, 1)]


def compile_sm90(cfg: dict, dt: str, kind: int, silu: bool, bias: bool, res: bool,
                 nout: int) -> dict:
    """Shared bytes, stack (spills), setmaxnreg and the consumers' K loop (MMAs, waits, local
    memory accesses) of one variant's sm_90 build."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from compile_qlinear_sm90 import resource_usage

    kernel = norm_linear_wg_kernel
    names = kernel.arg_names
    ce = dict(KIND=kind, HAS_BIAS=bias, HAS_RES=res, SILU_GATE=silu, NUM_OUT=nout,
              BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
              STAGES=cfg["STAGES"], GROUP_M=cfg["GROUP_M"])
    tdt = torch.bfloat16 if dt == "bf16" else torch.float16
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    types = dict(x_desc=f"tensordesc<{dt}[{bm}, {bk}],{_smem_layout([bm, bk], tdt)!r}>",
                 w_desc=f"tensordesc<{dt}[{bn}, {bk}],{_smem_layout([bn, bk], tdt)!r}>",
                 BIAS="*fp32", RS="*fp32", RES=f"*{dt}", eps="fp32",
                 **{f"O{i}": f"*{dt}" for i in range(4)})
    sig = {n: "constexpr" if n in ce else types.get(n, "i32") for n in names}
    src = GluonASTSource(fn=kernel, signature=sig,
                         constexprs={(names.index(k),): v for k, v in ce.items()},
                         attrs={(names.index(n),): [["tt.divisibility", 16]]
                                for n in ("O0", "O1", "O2", "O3", "RES", "N", "K")})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg["num_warps"], "maxnreg": MAXNREG})
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout
    loop = _mma_loop(sass)
    return dict(variant=[dt, kind, silu, bias, res, nout], tile=cfg,
                stack=resource_usage(compiled.asm["cubin"])["stack"],
                shared=compiled.metadata.shared,
                setmaxnreg=sorted({int(v) for v in re.findall(
                    r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)",
                    compiled.asm["ptx"])}),
                loop_mmas=sum("HGMMA" in i for i in loop),
                loop_waits=[i for i in loop if "WARPGROUP.DEPBAR" in i],
                loop_local=sum(bool(re.match(r"(STL|LDL)\b", i)) for i in loop))


def _mma_loop(sass: str) -> list:
    """The first backward branch's range that issues MMAs (the consumers' K loop; the mbarrier
    spin-waits are loops too)."""
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]
    for addr, text in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            if any("HGMMA" in t for t in body):
                return body
    raise AssertionError("no MMA loop in the kernel")


SECTIONS = {"layernorm": ("layernorm", "none", 12288), "rmsnorm": ("rmsnorm", "none", 12288),
            "swiglu": ("rmsnorm", "silu_gate", 2 * 11008)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--ms", nargs="+", type=int, default=[256, 2048])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.compile_only:
        for v in VARIANTS:
            print(json.dumps(compile_sm90(tile_for("silu_gate" if v[2] else "none"), *v)),
                  flush=True)
        return
    import torch.nn.functional as F

    from bench_qlinear import result_header, timed, write_result
    from q3n_compile.kernels import norm_linear as NL

    K, eps = 4096, 1e-5
    gen = torch.Generator(device="cuda").manual_seed(0)
    # CUDA-graph replay: called from Python the experiment's launch (descriptors, Gluon's
    # argument binding) is host-bound at 256 rows (s20run4: ~0.10 ms for 0.06 of GPU time).
    result = dict(result_header("CUDA-graph replay, do_bench median (L2 flushed), median of 3 "
                                "interleaved rounds"),
                  rows=[])
    for name in args.sections:
        kind, epi, N = SECTIONS[name]
        n_cols = N // 2 if epi == "silu_gate" else N
        w = (torch.randn(N, K, generator=gen, device="cuda") / K ** 0.5).to(torch.bfloat16)
        b = torch.randn(N, generator=gen, device="cuda") * 0.5
        rs = w.float().sum(1)
        for M in args.ms:
            x = torch.randn(M, K, generator=gen, device="cuda").to(torch.bfloat16)
            out = [torch.empty(M, n_cols, dtype=w.dtype, device="cuda")]
            cub = dict(NL.choose_config(M, n_cols, K, w.dtype, epi, design="cublas"))
            fns = {
                "wg": lambda: launch(x, w, b, rs, None, out, kind, eps, epi, n_cols,
                                     (n_cols,) * 3, n_cols if epi == "silu_gate" else 0),
                "cublas": lambda: NL._launch(x, w, b, rs, eps, kind, None, epi, None,
                                             config=cub),
                "linear": lambda: F.linear(x, w),
            }
            want = NL.reference(x.double(), w.double(), b.double(), None, eps, kind, None, epi,
                                None)[0]
            row = dict(section=name, M=M, N=N, K=K)
            fns["wg"]()
            for key, got in (("wg", out[0]), ("cublas", fns["cublas"]()[0])):
                row[f"{key}_err"] = ((got.double() - want).abs()
                                     / want.abs().clamp_min(1)).max().item()
            rounds = {k: [] for k in fns}
            for _ in range(3):
                for k, fn in fns.items():
                    rounds[k].append(timed(fn, eager=False)[1])
            for k, times in rounds.items():
                row[f"{k}_ms"] = statistics.median(times)
            print(f"{name:>9} M={M:<5} wg {row['wg_ms']:.4f} ({row['wg_ms'] / row['linear_ms']:.3f}x "
                  f"linear, err {row['wg_err']:.1e})  cublas design {row['cublas_ms']:.4f} "
                  f"({row['cublas_ms'] / row['linear_ms']:.3f}x)  linear {row['linear_ms']:.4f}",
                  flush=True)
            result["rows"].append(row)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
