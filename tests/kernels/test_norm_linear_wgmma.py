"""q3n::norm_linear's "wg" design (kernels/norm_linear_wgmma.py, a Gluon kernel: sm_90 only, no
interpreter). CPU lane: every variant the op launches compiles for sm_90 (Triton's frontend and
the wheel's ptxas run anywhere) within shared memory, with the producer warp's register cap, the
MMAs the tile needs, MMAs left in flight across the K loop's wait, and no local-memory traffic in
the K loop. Its results against float64 are GPU-lane tests in test_norm_linear.py (-m gpu)."""

import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from q3n_compile.kernels import norm_linear_wgmma as NW

from .subprocess_lane import json_without_interpreter

_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def _compile_sm90(cfg: dict, dt: str, kind: int, silu: bool, bias: bool, res: bool,
                  nout: int) -> dict:
    """Registers, stack, shared bytes, setmaxnreg and the consumer K loop's SASS of one variant
    (call it in a process that has not run Triton's interpreter)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    kernel = NW.norm_linear_wg_kernel
    names = kernel.arg_names
    ce = dict(KIND=kind, HAS_BIAS=bias, HAS_RES=res, SILU_GATE=silu, NUM_OUT=nout,
              BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
              STAGES=cfg["STAGES"], GROUP_M=cfg["GROUP_M"])
    tdt = getattr(torch, _DTYPES[dt])
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    types = dict(x_desc=f"tensordesc<{dt}[{bm}, {bk}],{NW._smem_layout([bm, bk], tdt)!r}>",
                 w_desc=f"tensordesc<{dt}[{bn}, {bk}],{NW._smem_layout([bn, bk], tdt)!r}>",
                 BIAS="*fp32", RS="*fp32", RES=f"*{dt}", eps="fp32",
                 **{f"O{i}": f"*{dt}" for i in range(4)})
    sig = {n: "constexpr" if n in ce else types.get(n, "i32") for n in names}
    src = GluonASTSource(fn=kernel, signature=sig,
                         constexprs={(names.index(k),): v for k, v in ce.items()},
                         attrs={(names.index(n),): [["tt.divisibility", 16]]
                                for n in ("O0", "O1", "O2", "O3", "RES", "N", "K")})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": cfg["num_warps"], "maxnreg": NW.MAXNREG})
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout
    loop = _mma_loop(sass)
    ptx = compiled.asm["ptx"]
    return dict(stack=int(re.search(r"STACK:(\d+)", usage).group(1)),
                shared=compiled.metadata.shared,
                setmaxnreg=sorted({int(v) for v in re.findall(
                    r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)}),
                mmas=[re.search(r"HGMMA\.(\w+)", i).group(1) for i in loop if "HGMMA" in i],
                waits=[i for i in loop if "WARPGROUP.DEPBAR" in i],
                local=sum(bool(re.match(r"(STL|LDL)\b", i)) for i in loop))


def _mma_loop(sass: str) -> list:
    """The instructions of the first backward branch's range that issues MMAs (the consumers'
    K loop; the mbarrier spin-waits are loops too)."""
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", sass, re.M)]
    for addr, text in ins:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            if any("HGMMA" in t for t in body):
                return body
    raise AssertionError("no MMA loop in the kernel")


# (dtype, KIND 0 LayerNorm / 1 RMSNorm, SiLU-gate, bias, residual, outputs)
_VARIANTS = [("bf16", 0, False, True, False, 1), ("bf16", 1, False, False, True, 1),
             ("fp16", 0, False, False, True, 3), ("bf16", 1, True, False, False, 1),
             ("fp16", 0, True, True, True, 1)]


@pytest.fixture(scope="module")
def sm90_builds():
    return json_without_interpreter("""
        import json
        from q3n_compile.kernels import norm_linear_wgmma as NW
        from tests.kernels import test_norm_linear_wgmma as T
        print(json.dumps([T._compile_sm90(NW.tile_for("silu_gate" if v[2] else "none"), *v)
                          for v in T._VARIANTS]))
    """)


def test_launched_variants_compile_for_sm90(sm90_builds):
    assert len(sm90_builds) == len(_VARIANTS)
    for variant, got in zip(_VARIANTS, sm90_builds):
        silu = variant[2]
        cfg = NW.tile_for("silu_gate" if silu else "none")
        where = f"{variant}: {got}"
        assert got["shared"] <= 227 * 1024, where
        # The producer warp gives its registers to the consumers.
        assert NW.PRODUCER_REGS.value in got["setmaxnreg"], where
        # Each warpgroup: BLOCK_K / 16 MMAs of 64 rows x BLOCK_N per accumulator per K block.
        shape = f"64x{cfg['BLOCK_N']}x16"
        accs = 2 if silu else 1
        assert got["mmas"] == [m for m in got["mmas"] if m.startswith(shape)], where
        assert len(got["mmas"]) == accs * cfg["BLOCK_K"] // 16, where
        # One wait a K block, leaving this block's MMA groups in flight (the block before them
        # has retired, so its stage can be released).
        assert len(got["waits"]) == 1 and got["waits"][0].endswith(f"0x{accs}"), where
        # Spills (if any) are the epilogue's: none in the K loop.
        assert got["local"] == 0, where


def test_tiles_are_the_design_s_defaults():
    from q3n_compile.kernels import norm_linear as NL

    assert NL.choose_config(4096, 12288, 4096, None, design="wg") == dict(design="wg", **NW.TILE)
    assert (NL.choose_config(4096, 11008, 4096, None, "silu_gate", design="wg")
            == dict(design="wg", **NW.TILE_GATE))
    for tile in (NW.TILE, NW.TILE_GATE):
        # The statistics layout reads 16 rows a warp: BLOCK_M = 16 x num_warps.
        assert tile["BLOCK_M"] == 16 * tile["num_warps"]
