"""Compile q3n::qlinear's Triton kernels for an H200 (sm_90) on a machine without a GPU.

Triton's frontend, its NVIDIA passes and the ptxas bundled with the wheel run anywhere; only
launching needs a GPU. For each variant this prints what the compiled kernel asks of an SM:
shared memory (Triton's metadata), registers and stack bytes per thread (``cuobjdump
--dump-resource-usage`` on the cubin; stack above 0 means spills). ``--compare TREE`` also
compiles the per-token variants (ACT_GROUP 0) from another checkout of the repository (for
example ``git archive <commit> q3n_compile | tar -x -C /tmp/base``) and says whether their Triton
IR is identical, locations aside.

Variants: the mm kernel at the CUDA table's int8/fp8 tiles (16x64x128, 32x64x128, 64x128x64,
128x128x64) for W8A8 per-channel int8, W4A8 g128 int8 and fp8, W6A12 g64 and W8 per-channel
with fp16 operands, each with per-token activation scales and per 128 and 32 channels (BLOCK_K
capped by the groups as :func:`choose_path` does); the gemv kernel for the same formats; the
activation quantizer and norm_act_quant at the GPU launch sizes.

    python bench/compile_qlinear_sm90.py --compare /tmp/base --out bench/results/x.json

The single-plane GEMV (``gemv1p``: W4A16 g128 asymmetric and symmetric, W8A16 per channel, W2A16
g64, W4A8 g128 int8, W4A8 with activation groups of 64) is compiled at every
:data:`GEMV1P_SWEEP` tile and at the default launch for 1, 2, 4 and 16 rows, with the launch's
specialisation at N = K = 4096 (16-byte aligned pointers, sizes and row strides divisible by 16,
unit column strides), with the unpack the launcher picks (:func:`gemv1p_denorm`) and, at the
default tile, the other one too, and its inner loop is read from the SASS: instructions per
iteration and per code, global load widths, barriers and shared-memory layout conversions (TTGIR
``convert_layout``) in the loop. ``--gemv1p`` compiles only those.

    python bench/compile_qlinear_sm90.py --gemv1p --out bench/results/x.json

The swapped-operand tile (``mmT``, kernels/qlinear_swap.py) is compiled for W4 and W6 g128 (at
its 16- and 8-row tiles, at 128 columns, and at 32 and 64 rows with x as it is and permuted),
W4 g128 symmetric, g32 and per channel, W8 per channel and W2 g64, and read the same way (plus
MMAs and ``MEMBAR`` in the loop); W4 g128 and per channel with zero points (every tile) also
with the PTX unpack (``_asm``).
``--mmT`` compiles only those.

    python bench/compile_qlinear_sm90.py --mmT --out bench/results/x.json

The 8-bit-operand tile (``mm8``, kernels/qlinear_mm8.py) is compiled for W4 g128 with fp8 codes
per token and per 128 channels, with int8 codes, and W8 per channel (int8, the bytes path), at
the dispatch's 128 x 32 tile (unsplit and split), 128 x 64 and 128 x 128. ``--mm8`` compiles
only those.

It does not measure time or check results: the GPU lane does that.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compiled kernels, not the interpreter's

ROOT = Path(__file__).resolve().parents[1]

TILES = {"t16": (16, 64, 128, 4, 4), "t32": (32, 64, 128, 4, 4), "t64": (64, 128, 64, 4, 3),
         "t128": (128, 128, 64, 8, 3)}
# name: (BITS, GROUP (0: per channel), SYM, ACT (1 int8, 2 fp8, 3 int12), DOT_DTYPE)
FORMATS = {"w8i8pc": (8, 0, True, 1, 3), "w4i8g128": (4, 128, False, 1, 3),
           "w4f8g128": (4, 128, False, 2, 4), "w6i12g64": (6, 64, False, 3, 2),
           "w8f8pc_f16": (8, 0, True, 2, 2)}
ACT_GROUPS = (0, 128, 32)
MM_TYPES = {"X": "*i8", "XS": "*fp32", "QW": "*i32", "S": "*fp16", "Z": "*u8", "BIAS": "*bf16",
            "Y": "*bf16"}
QUANT_TYPES = {"X": "*bf16", "SM": "*fp32", "C": "*i8", "XS": "*fp32", "eps": "fp32"}


# name: (BITS, GROUP, SYM, ACT, ACT_GROUP, x type)
GEMV1P_FORMATS = {"w4a16g128": (4, 128, False, 0, 0, "*bf16"),
                  "w4a16g128sym": (4, 128, True, 0, 0, "*bf16"),
                  "w8a16pc": (8, 0, True, 0, 0, "*bf16"), "w2a16g64": (2, 64, False, 0, 0, "*bf16"),
                  "w4a8g128": (4, 128, False, 1, 0, "*i8"),
                  "w4a8g128_ag64": (4, 128, False, 1, 64, "*i8")}
GEMV1P_TYPES = {"XS": "*fp32", "QW": "*i32", "S": "*fp16", "Z": "*u8", "BIAS": "*bf16",
                "Y": "*bf16", "WS": "*fp32", "CNT": "*i32"}
# What a launch at N = K = 4096 specialises: 16-byte aligned pointers, these sizes and strides
# divisible by 16, unit column strides (constants).
GEMV1P_DIVISIBLE = ("X", "XS", "QW", "S", "Z", "BIAS", "Y", "WS", "CNT", "N", "K", "K_PAD",
                    "K_PER_SPLIT", "stride_xm", "stride_ym")


def gemv1p_cases() -> list[tuple[str, str, dict, int, int]]:
    """gemv1p variants: every sweep tile at BLOCK_M = 1 for each format, the default launch
    (:func:`gemv1p_config`) at 1, 2, 4 and 16 rows for W4A16 g128."""
    sys.path.insert(0, str(ROOT))
    from q3n_compile.kernels import qlinear as Q

    import torch

    out = []

    def add(name, fmt, cfg, block_m, denorm=None):
        bits, group, sym, act, ag, xt = GEMV1P_FORMATS[fmt]
        bk = min([cfg["BLOCK_K"]] + [g for g in (group, ag) if g])
        reduce = {"ticket": 2, "atomic": 1}[cfg["REDUCE"]] if cfg["SPLIT_K"] != 1 else 0
        if denorm is None:  # the launcher's choice (x here is bf16 or int8 codes)
            denorm = Q.gemv1p_denorm(bits, torch.bfloat16)
        out.append((name, "gemv1p", dict(
            BITS=bits, GROUP=group, SYM=sym, ACT=act, ACT_GROUP=ag, HAS_BIAS=False,
            REDUCE=reduce, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk,
            PREFETCH=int(cfg["PREFETCH"]), EVEN=True, DENORM=int(denorm),
            SUBS=int(cfg.get("SUBS", 1)), stride_xk=1,
            stride_yn=1, x_type=xt), cfg["num_warps"], cfg["num_stages"]))

    for fmt in GEMV1P_FORMATS:
        for i, cfg in enumerate(Q.GEMV1P_SWEEP):
            add(f"gemv1p_{fmt}_s{i}_n{cfg['BLOCK_N']}k{cfg['BLOCK_K']}w{cfg['num_warps']}"
                f"pf{int(cfg['PREFETCH'])}", fmt, cfg, 1)
        # The other unpack than the launcher's at the default tile (the magic float for 4-bit
        # weights, what they ran before session 16; the denormal one for 8- and 2-bit ones).
        other = not Q.gemv1p_denorm(GEMV1P_FORMATS[fmt][0], torch.bfloat16)
        add(f"gemv1p_{fmt}_s0_{'denorm' if other else 'magic'}", fmt, Q.GEMV1P_SWEEP[0], 1,
            denorm=other)
    for m in (1, 2, 4, 16):
        cfg = Q.gemv1p_config(m, 4096, 4096, 128, sms=132, bits=4)
        add(f"gemv1p_w4a16g128_default_m{m}_w{cfg['num_warps']}", "w4a16g128", cfg,
            cfg["BLOCK_M"])
    return out


# name: (BITS, GROUP, SYM) of the swapped-operand tile (kernels/qlinear_swap.py), x bf16.
MMT_FORMATS = {"w4g128": (4, 128, False), "w4g128sym": (4, 128, True), "w4g32": (4, 32, False),
               "w4pc_sym": (4, 0, True), "w4pc": (4, 0, False), "w6g128": (6, 128, False),
               "w8pc_sym": (8, 0, True),
               "w2g64": (2, 64, False)}
# (BLOCK_M, BLOCK_N, num_warps, num_stages, XPERM): the dispatch's 16- and 8-row tiles, 128
# columns, and the 32- and 64-row tiles with x as it is and permuted per block.
MMT_TILES = [(16, 64, 4, 3, False), (8, 64, 4, 4, False), (16, 128, 8, 3, False),
             (32, 64, 4, 3, False), (32, 64, 4, 3, True), (64, 128, 8, 3, False),
             (64, 128, 8, 3, True)]
MMT_TYPES = {"X": "*bf16", "XS": "*fp32", "QW": "*i32", "S": "*fp16", "Z": "*u8", "BIAS": "*bf16",
             "Y": "*bf16", "WS": "*fp32", "CNT": "*i32"}
MMT_DIVISIBLE = ("X", "XS", "QW", "S", "Z", "BIAS", "Y", "WS", "CNT", "N", "K", "K_PAD",
                 "K_PER_SPLIT", "stride_xm", "stride_ym")
# x as activation codes (XCODES, the norm fusion's siblings): the dispatch's 16- and 32-row
# tiles (x unpermuted), W4 g128 with the PTX unpack, int8 and fp8 codes per token and per 128.
MMT_CODES = [(16, 64, 4, 3), (32, 64, 4, 3), (64, 128, 8, 3)]


def mmT_cases() -> list[tuple[str, str, dict, int, int]]:
    """The mmT kernel for each of :data:`MMT_FORMATS` at the 16-row tile, and W4 and W6 g128
    at every :data:`MMT_TILES` entry (split K by tickets, the default)."""
    out = []
    for fmt, (bits, group, sym) in MMT_FORMATS.items():
        tiles = MMT_TILES if fmt in ("w4g128", "w6g128", "w4pc") else MMT_TILES[:1]
        # The PTX unpack (ASM) where the launcher uses it: 4- and 6-bit weights with zero points.
        asms = (False, True) if bits in (4, 6) and not sym and group in (0, 128) else (False,)
        for (bm, bn, warps, stages, xperm), asm in [(t, a) for t in tiles for a in asms]:
            out.append((f"mmT_{fmt}_m{bm}n{bn}w{warps}s{stages}{'_xperm' if xperm else ''}"
                        f"{'_asm' if asm else ''}",
                        "mmT", dict(BITS=bits, GROUP=group, SYM=sym, HAS_BIAS=False, REDUCE=2,
                                    F32=False, XPERM=xperm, BLOCK_M=bm, BLOCK_N=bn, stride_xk=1,
                                    stride_yn=1, ASM=asm, XCODES=0), warps, stages))
    for (bm, bn, warps, stages), (x_type, xcodes) in [
            (t, c) for t in MMT_CODES for c in (("*i8", 1), ("*fp8e4nv", 1), ("*i8", 2))]:
        out.append((f"mmT_w4g128_m{bm}n{bn}w{warps}s{stages}_asm_codes{x_type[1:]}_xs{xcodes}",
                    "mmT", dict(BITS=4, GROUP=128, SYM=False, HAS_BIAS=False, REDUCE=2, F32=False,
                                XPERM=False, BLOCK_M=bm, BLOCK_N=bn, stride_xk=1, stride_yn=1,
                                ASM=True, XCODES=xcodes, x_type=x_type), warps, stages))
    return out


# The 8-bit-operand tile (``mm8``, kernels/qlinear_mm8.py): name -> (BITS, PER_CHANNEL, SYM,
# XGROUPS, OPD, codes type); tiles (BLOCK_M, BLOCK_N, num_warps, num_stages, SPLIT).
MM8_FORMATS = {"w4f8g128": (4, False, False, False, 2, "*fp8e4nv"),
               "w4f8g128_ag128": (4, False, False, True, 2, "*fp8e4nv"),
               "w4i8g128": (4, False, False, False, 1, "*i8"),
               "w8i8pc_sym": (8, True, True, False, 1, "*i8")}
MM8_TILES = [(128, 32, 4, 3, False), (128, 32, 4, 3, True), (128, 64, 4, 3, False),
             (128, 128, 8, 3, False)]
MM8_TYPES = {"XS": "*fp32", "QW": "*i32", "S": "*fp16", "Z": "*u8", "BIAS": "*bf16", "Y": "*bf16",
             "WS": "*fp32", "CNT": "*i32"}
MM8_DIVISIBLE = ("C", "XS", "QW", "S", "Z", "BIAS", "Y", "WS", "CNT", "N", "K", "K_PAD",
                 "K_PER_SPLIT", "stride_cm", "stride_ym")


def mm8_cases() -> list[tuple[str, str, dict, int, int]]:
    """The mm8 kernel for each of :data:`MM8_FORMATS` at every :data:`MM8_TILES` entry."""
    out = []
    for fmt, (bits, pc, sym, xgroups, opd, c_type) in MM8_FORMATS.items():
        for bm, bn, warps, stages, split in MM8_TILES:
            out.append((f"mm8_{fmt}_m{bm}n{bn}w{warps}s{stages}{'_split' if split else ''}",
                        "mm8", dict(BITS=bits, PER_CHANNEL=pc, SYM=sym, XGROUPS=xgroups,
                                    HAS_BIAS=False, OPD=opd, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8,
                                    PREFETCH=True, SPLIT=split, c_type=c_type), warps, stages))
    return out


def cases() -> list[tuple[str, str, dict, int, int]]:
    """(name, kernel, constexprs, num_warps, num_stages) of every variant."""
    out = []
    for tile, (bm, bn, bk, warps, stages) in TILES.items():
        for fmt, (bits, group, sym, act, dd) in FORMATS.items():
            for ag in ACT_GROUPS:
                block_k = min(g for g in (bk, group or bk, ag or bk))
                out.append((f"mm_{fmt}_{tile}_ag{ag}", "mm", dict(
                    BITS=bits, GROUP=group, SYM=sym, ACT=act, ACT_GROUP=ag, DOT_DTYPE=dd,
                    HAS_BIAS=True, ATOMIC=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_k,
                    DOT_PRECISION="tf32"), warps, stages))
    for fmt, (bits, group, sym, act, _) in FORMATS.items():
        for ag in ACT_GROUPS[:2]:
            out.append((f"gemv_{fmt}_ag{ag}", "gemv", dict(
                BITS=bits, GROUP=group, SYM=sym, ACT=act, ACT_GROUP=ag, HAS_BIAS=True,
                ATOMIC=True, BLOCK_N=64, BLOCK_K=min(128, group or 128)), 4, 2))
    for ag in ACT_GROUPS:
        out.append((f"act_quant_ag{ag}", "act_quant", dict(
            QMAX=127.0, FP8=False, HAS_SMOOTH=True, BLOCK_M=1, BLOCK_K=4096, ACT_GROUP=ag), 16, 3))
        for one_tile in (True, False):
            out.append((f"norm_act_quant_{'one' if one_tile else 'sweeps'}_ag{ag}",
                        "norm_act_quant", dict(KIND=0, QMAX=127.0, FP8=False, HAS_SMOOTH=True,
                                               BLOCK_M=1, BLOCK_K=8192 if one_tile else 4096,
                                               ONE_TILE=one_tile, ACT_GROUP=ag), 16, 3))
    return out


def compile_variant(Q, kernel_name: str, constexprs: dict, warps: int, stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def with_defaults(kernel, given: dict) -> dict:
        # constexpr parameters left out take their defaults (as a launch does), not an i32 slot.
        out = {p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}
        out.update(given)
        return out

    def specialised(kernel, types, divisible):
        # The launch's specialisation: `divisible` arguments 16-byte aligned / divisible by 16.
        names = kernel.arg_names
        given = with_defaults(kernel, constexprs)  # the caller's, its types popped
        signature = {n: "constexpr" if n in given else types.get(n, "i32") for n in names}
        src = ASTSource(fn=kernel, signature=signature,
                        constexprs={(names.index(k),): v for k, v in given.items()},
                        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in divisible})
        return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})

    if kernel_name == "mmT":
        from q3n_compile.kernels import qlinear_swap as SW

        constexprs = dict(constexprs)
        types = dict(MMT_TYPES, X=constexprs.pop("x_type", MMT_TYPES["X"]))
        return specialised(SW.qlinear_mmT_kernel, types, MMT_DIVISIBLE)
    if kernel_name == "mm8":
        from q3n_compile.kernels import qlinear_mm8 as M8

        constexprs = dict(constexprs)
        types = dict(MM8_TYPES, C=constexprs.pop("c_type"))
        return specialised(M8.qlinear_mm8_kernel, types, MM8_DIVISIBLE)
    if kernel_name == "unpack":
        from q3n_compile.kernels import weight_unpack as WU

        constexprs = dict(constexprs)
        types = dict(QW="*i32", S="*fp16", Z="*u8", W=constexprs.pop("w_type"))
        return specialised(WU.unpack_weight_kernel, types,
                           ("QW", "S", "Z", "W", "N", "K", "K_PAD", "ROW4", "ROW2", "ROW1"))
    if kernel_name == "gemv1p":
        constexprs = dict(constexprs)
        types = dict(GEMV1P_TYPES, X=constexprs.pop("x_type"))
        return specialised(Q.qlinear_gemv1p_kernel, types, GEMV1P_DIVISIBLE)
    kernel = {"mm": Q.qlinear_mm_kernel, "gemv": Q.qlinear_gemv_kernel,
              "act_quant": Q.act_quant_kernel, "norm_act_quant": Q.norm_act_quant_kernel}[kernel_name]
    types = dict(MM_TYPES if kernel_name in ("mm", "gemv") else QUANT_TYPES)
    if constexprs.get("DOT_DTYPE") == 2:
        types["X"] = "*fp16"
    elif constexprs.get("DOT_DTYPE") == 4:
        types["X"] = "*fp8e4nv"
    names = kernel.arg_names
    # An older tree has no ACT_GROUP: its kernels are the per-token ones.
    constexprs = {k: v for k, v in with_defaults(kernel, constexprs).items() if k in names}
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})


def resource_usage(cubin: bytes) -> dict:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    return {key.lower(): int(re.search(rf"{key}:(\d+)", text).group(1))
            for key in ("REG", "STACK", "LOCAL")}


def inner_loop(cubin: bytes, ttgir: str, codes_per_iteration: int) -> dict:
    """The K loop of a gemv1p kernel: SASS instructions per iteration and per code (a weight;
    with BLOCK_M rows each code serves BLOCK_M products; the loop is the body of the function's
    one backward branch), global load widths, barriers and
    shared-memory traffic in it, and the TTGIR layout conversions inside ``scf.for``."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]
    body = []
    for addr, text in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            body = [t for a, t in ins if lo <= a <= addr]
            break
    ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body]
    def count(*prefixes):
        return {o: ops.count(o) for o in sorted(set(ops)) if o.startswith(prefixes)}
    loop = re.search(r"scf\.for.*?scf\.yield", ttgir, re.S)
    return dict(loop_instrs=len(body),
                instrs_per_code=round(len(body) / codes_per_iteration, 2) if body else None,
                loop_global_loads=count("LDG"), loop_shared=count("LDS", "STS", "STSM"),
                loop_barriers=ops.count("BAR.SYNC.DEFER_BLOCKING") + ops.count("BAR.SYNC"),
                loop_membar=ops.count("MEMBAR.ALL.CTA"), loop_mma=count("HGMMA", "HMMA", "QGMMA", "IGMMA"),
                loop_convert_layout=loop.group(0).count("ttg.convert_layout") if loop else None,
                FFMA=ops.count("FFMA"), LOP3=ops.count("LOP3.LUT"))


def _strip_locations(ttir: str) -> str:
    ttir = re.sub(r"loc\([^)]*\)", "", ttir)
    ttir = re.sub(r"#loc\d*( = .*)?", "", ttir)
    return "\n".join(line.rstrip() for line in ttir.splitlines() if line.strip())


def compile_tree(tree: Path, selected) -> dict:
    """Compile `selected` variants from the q3n_compile package under `tree` (a subprocess per
    tree: the package is imported once per process)."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(tree)!r}); sys.path.insert(0, {str(ROOT / 'bench')!r})\n"
        "import compile_qlinear_sm90 as C\n"
        "from q3n_compile.kernels import qlinear as Q\n"
        "out = {}\n"
        f"for name, kind, ce, w, s in json.loads({json.dumps(json.dumps(selected))}):\n"
        "    try:\n"
        "        k = C.compile_variant(Q, kind, ce, w, s)\n"
        "        out[name] = dict(shared=k.metadata.shared, **C.resource_usage(k.asm['cubin']),\n"
        "                         ttir=C._strip_locations(k.asm['ttir']))\n"
        "        if kind in ('gemv1p', 'mmT', 'mm8'):\n"
        "            codes = ce.get('BLOCK_K', 128) * ce['BLOCK_N'] // (32 * w)\n"
        "            out[name].update(codes_per_thread_iteration=codes,\n"
        "                             **C.inner_loop(k.asm['cubin'], k.asm['ttgir'], codes))\n"
        "    except Exception as exc:\n"
        "        out[name] = dict(error=f'{type(exc).__name__}: {str(exc)[:300]}')\n"
        "print(json.dumps(out))\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", type=Path, help="another tree whose per-token kernels to diff")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    ap.add_argument("--gemv1p", action="store_true", help="only the gemv1p variants")
    ap.add_argument("--mmT", action="store_true", help="only the swapped-operand tile's variants")
    ap.add_argument("--mm8", action="store_true", help="only the 8-bit-operand tile's variants")
    args = ap.parse_args()
    variants = (gemv1p_cases() if args.gemv1p else mmT_cases() if args.mmT
                else mm8_cases() if args.mm8
                else cases() + gemv1p_cases() + mmT_cases() + mm8_cases())
    here = compile_tree(ROOT, variants)
    base = None
    if args.compare:
        base = compile_tree(args.compare.resolve(), [v for v in variants if v[0].endswith("ag0")
                                                     and v[1] not in ("gemv1p", "mmT", "mm8")])
    rows = []
    for name, *_ in variants:
        r = here[name]
        row = {"variant": name, **{k: v for k, v in r.items() if k != "ttir"}}
        if base is not None and name in base:
            b = base[name]
            row["same_ttir_as_compare"] = "ttir" in b and "ttir" in r and b["ttir"] == r["ttir"]
        rows.append(row)
        cells = " ".join(f"{k} {v}" for k, v in row.items() if k != "variant")
        print(f"{name:32s} {cells}")
    if args.out:
        args.out.write_text(json.dumps({"target": "cuda sm_90 (compiled, not run)",
                                        "compare": str(args.compare) if args.compare else None,
                                        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
