"""weight_unpack: a packed weight written out as ``W [N, K]`` (CPU lane: Triton interpreter;
the GPU tiles: -m gpu), against the packing's definition, bit for bit."""

import dataclasses

import pytest
import torch

from q3n_compile.kernels import packing as P
from q3n_compile.kernels import weight_unpack as WU

from .subprocess_lane import json_without_interpreter
from .test_qlinear import _gen, _packed

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (group, K): K off the interpreter's 32-channel block where the group allows (per channel:
# 100 channels, padded to 128 in the planes), and more than one group.
GROUPS_K = [(32, 96), (64, 192), (128, 256), (P.PER_CHANNEL, 100)]


def _rounded_once(got: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `got` is fp32 `v` rounded once to got's dtype. Triton's interpreter converts fp32
    to bf16 by truncation (round toward zero) where the GPU rounds to nearest (the GPU tests
    check that exactly), so for bf16 either neighbour of v passes."""
    if got.dtype != bf16:
        return torch.equal(got, v.to(got.dtype))
    truncated = (v.view(torch.int32) & ~0xFFFF).view(f32).to(bf16)
    return bool(((got == v.to(bf16)) | (got == truncated)).all())


def _minus_zero(pw) -> torch.Tensor:
    """q - z [N, K] (int64) from the packing's own unpack."""
    K, N = pw.in_features, pw.qweight.shape[1]
    codes = P.unpack_codes(pw.qweight.cpu(), pw.bits, K).to(torch.int64)
    g = (torch.zeros(K, dtype=torch.long) if pw.group_size == P.PER_CHANNEL
         else torch.arange(K) // pw.group_size)
    z = (torch.full((int(g.max()) + 1, N), 1 << (pw.bits - 1)) if pw.zeros is None
         else pw.zeros.cpu().long())
    return codes - z[g].t()


@pytest.mark.parametrize("bits", range(P.MIN_BITS, P.MAX_BITS + 1))
@pytest.mark.parametrize("group,K", GROUPS_K)
@pytest.mark.parametrize("sym", [True, False])
def test_scaled_is_the_definition_rounded_once(bits, group, K, sym):
    # N = 37: off the interpreter's 16-column block. (q - z) * s in fp32, rounded once.
    pw = _packed(_gen(f"wu{bits}{group}{sym}"), 37, K, bits, group, sym)
    got = WU.unpack_weight(pw.qweight, pw.scales, pw.zeros, bits, group, K, bf16,
                           interpreter=True)
    assert got.shape == (37, K) and got.dtype == bf16 and got.is_contiguous()
    assert _rounded_once(got, pw.dequantize(f32))


@pytest.mark.parametrize("dtype", [f16, f32])
def test_scaled_other_dtypes(dtype):
    pw = _packed(_gen(f"wud{dtype}"), 21, 192, 6, 64, False)
    got = WU.unpack_weight(pw.qweight, pw.scales, pw.zeros, 6, 64, 192, dtype, interpreter=True)
    assert torch.equal(got, pw.dequantize(f32).to(dtype))


def test_fp32_scales_outside_fp16_range():
    # The packing keeps a scale outside fp16's normal range in fp32; the kernel reads it as is.
    pw = _packed(_gen("wu32"), 19, 128, 4, 64, False)
    pw = dataclasses.replace(pw, scales=pw.scales.float() * 1e-6)
    got = WU.unpack_weight(pw.qweight, pw.scales, pw.zeros, 4, 64, 128, f32, interpreter=True)
    assert got.abs().max() < 1e-6 and got.abs().max() > 0
    assert torch.equal(got, pw.dequantize(f32))


@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (8, P.PER_CHANNEL, True),
                                            (3, 32, True), (6, P.PER_CHANNEL, False)])
@pytest.mark.parametrize("dtype", [torch.int8, f16])
def test_unscaled_is_q_minus_z_exactly(bits, group, sym, dtype):
    K = 256 if group != P.PER_CHANNEL else 100
    pw = _packed(_gen(f"wuq{bits}{group}{sym}"), 45, K, bits, group, sym)
    got = WU.unpack_weight(pw.qweight, pw.qweight, pw.zeros, bits, group, K, dtype,
                           scaled=False, interpreter=True)
    assert got.dtype == dtype
    assert torch.equal(got.to(torch.int64), _minus_zero(pw))


def test_other_tiles_agree():
    # A benchmark's launch (BLOCK_K capped by the group) writes the same weight.
    pw = _packed(_gen("wut"), 70, 256, 5, 64, False)
    want = WU.unpack_weight(pw.qweight, pw.scales, pw.zeros, 5, 64, 256, bf16, interpreter=True)
    for launch in ((32, 64, 4), (64, 128, 4), (16, 32, 1)):
        got = WU.unpack_weight(pw.qweight, pw.scales, pw.zeros, 5, 64, 256, bf16,
                               interpreter=True, launch=launch)
        assert torch.equal(got, want), launch


def test_tile_is_capped_by_the_group_and_checked():
    assert WU.tile(32, launch=(64, 128, 4)) == (64, 32, 4)
    assert WU.tile(P.PER_CHANNEL, launch=(64, 256, 8)) == (64, 256, 8)
    assert WU.tile(128)[1] <= 128
    assert WU.tile(P.PER_CHANNEL, out_bytes=1) == WU.GPU_TILE_1BYTE
    assert WU.tile(P.PER_CHANNEL, interpreter=True) == WU.INTERPRETER_TILE
    with pytest.raises(ValueError, match="BLOCK_K must be a power of two >= 32, got 48"):
        WU.tile(P.PER_CHANNEL, launch=(64, 48, 4))
    with pytest.raises(ValueError, match="got 16"):
        WU.tile(P.PER_CHANNEL, launch=(64, 16, 4))


def test_compiles_for_sm90_with_one_conversion_a_plane_and_16_byte_stores():
    # The layout the module docstring states: each thread stores runs of K as 16-byte vectors,
    # and for 2-byte outputs only the word tile of each bit plane goes through shared memory (no
    # transpose of the unpacked tile). Compiled for an H200 (no GPU needed).
    got = json_without_interpreter("""
        import json, os, sys
        sys.path.insert(0, os.path.join(os.environ["PYTHONPATH"].split(os.pathsep)[0], "bench"))
        import compile_qlinear_sm90 as C
        from q3n_compile.kernels import qlinear as Q
        from q3n_compile.kernels import weight_unpack as WU

        out = {}
        for bits, w_type, scaled in ((4, "*bf16", 1), (6, "*bf16", 1), (8, "*fp16", 1),
                                     (4, "*fp8e4nv", 0), (8, "*i8", 0)):
            bn, bk, warps = WU.tile(128, out_bytes=1 if w_type in ("*fp8e4nv", "*i8") else 2)
            k = C.compile_variant(Q, "unpack", dict(
                BITS=bits, GROUP=128, SYM=False, SCALED=scaled, BLOCK_N=bn, BLOCK_K=bk,
                w_type=w_type), warps, 1)
            ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
            out[f"{bits}{w_type}"] = dict(
                converts=ttgir.count("ttg.convert_layout"),
                stores=ptx.count("st.global"), v4=ptx.count("st.global.v4"))
        print(json.dumps(out))
    """)
    planes = {"4": 1, "6": 2, "8": 1}
    for name, got_one in got.items():
        # 1-byte outputs at their tile (128 x 128) convert the unpacked tile once more, into runs
        # of 16 codes a thread (measured faster than the 64 x 128 tile's single conversion).
        one_byte = name.endswith(("fp8e4nv", "i8"))
        assert got_one["converts"] == planes[name[0]] + one_byte, got
        assert got_one["stores"] == got_one["v4"] > 0, got


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bits,group,sym", [(4, 128, False), (6, 128, False), (8, -1, True),
                                            (3, 32, True), (5, 64, False), (2, 64, True)])
@pytest.mark.parametrize("dtype", [bf16, f16])
def test_gpu_scaled_is_the_definition(bits, group, sym, dtype):
    # The GPU tile with K and N off it.
    N, K = 1000, 3968 if group != -1 else 4040
    pw = _packed(_gen(f"gwu{bits}{group}{dtype}"), N, K, bits, group, sym, device="cuda")
    got = WU.unpack_weight(pw.qweight, pw.scales, pw.zeros, bits, group, K, dtype)
    assert torch.equal(got, pw.dequantize(f32).to(dtype))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_gpu_unscaled_is_q_minus_z(dtype):
    N, K = 1000, 3968
    pw = _packed(_gen(f"gwuq{dtype}"), N, K, 4, 128, False, device="cuda")
    got = WU.unpack_weight(pw.qweight, pw.qweight, pw.zeros, 4, 128, K, dtype, scaled=False)
    assert torch.equal(got.float().to(torch.int64).cpu(), _minus_zero(pw))
