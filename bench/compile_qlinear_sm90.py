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

    kernel = {"mm": Q.qlinear_mm_kernel, "gemv": Q.qlinear_gemv_kernel,
              "act_quant": Q.act_quant_kernel, "norm_act_quant": Q.norm_act_quant_kernel}[kernel_name]
    types = dict(MM_TYPES if kernel_name in ("mm", "gemv") else QUANT_TYPES)
    if constexprs.get("DOT_DTYPE") == 2:
        types["X"] = "*fp16"
    elif constexprs.get("DOT_DTYPE") == 4:
        types["X"] = "*fp8e4nv"
    names = kernel.arg_names
    # An older tree has no ACT_GROUP: its kernels are the per-token ones.
    constexprs = {k: v for k, v in constexprs.items() if k in names}
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
    args = ap.parse_args()
    variants = cases()
    here = compile_tree(ROOT, variants)
    base = None
    if args.compare:
        base = compile_tree(args.compare.resolve(), [v for v in variants if v[0].endswith("ag0")])
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
