"""q3n::qlinear with per-group activation scales (``act_group_size``: one scale per token and
32/64/128 input channels) against a float64 reference.

CPU lane: the Triton kernels in the interpreter, small odd shapes (K not a multiple of the
activation group: the last group of a row is partial); GPU lane (-m gpu): compiled kernels at
model widths, every path the dispatch table picks.
"""

import pytest
import torch

from q3n_compile.kernels import qlinear as Q

from .test_qlinear import (GPU_PATH_IDS, GPU_PATHS, INTERPRETER_PATH_IDS, INTERPRETER_PATHS,
                           _args, _gen, _packed)
from .test_qlinear import _check as check_op

op = torch.ops.q3n.qlinear

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16


def _check(x, pw, ag, bias=None, smooth=None, act="int8", path=None):
    return check_op(x, pw, bias, smooth, act, path, ag=ag)


@pytest.mark.parametrize("act", ["int8", "fp8", "int12"])
@pytest.mark.parametrize("ag", [32, 64, 128])
def test_quantizer_matches_reference_exactly(act, ag):
    gen = _gen(f"aqg{act}{ag}")
    K = 150  # 150 = 4 * 32 + 22 = 2 * 64 + 22 = 128 + 22: a partial last group for every size
    x = torch.randn(17, K, generator=gen) * torch.logspace(-3, 2, K)
    x[4] = 0.0  # all-zero row: every group's scale is 1, codes 0
    x[6, :ag] = 0.0  # one all-zero group in an otherwise ordinary row
    smooth = torch.rand(K, generator=gen) + 0.5
    for sm in (None, smooth):
        codes, scales = Q.quantize_activations_triton(x, act, sm, interpreter=True,
                                                      act_group_size=ag)
        want_codes, want_scales = Q.quantize_activations(x, act, sm, ag)
        assert scales.shape == (17, -(-K // ag)) and scales.dtype == f32
        torch.testing.assert_close(scales, want_scales, rtol=0, atol=0)
        torch.testing.assert_close(codes.float(), want_codes, rtol=0, atol=0)
    assert (scales[4] == 1).all() and codes[4].abs().max() == 0
    assert scales[6, 0] == 1 and codes[6, :ag].abs().max() == 0 and codes[6, ag:].abs().max() > 0
    # Each group's largest |code| is QMAX (the scale is its own max), unlike per-token codes.
    qmax = Q.ACT_QMAX[act]
    groups = torch.nn.functional.pad(codes.float().abs(), (0, scales.shape[1] * ag - K))
    group_max = groups.reshape(17, -1, ag).amax(-1)
    nonzero = scales != 1
    assert (group_max[nonzero] == qmax).all()


def test_one_group_wider_than_k_is_per_token():
    # A single (partial) group holds the whole row: the codes and scales are the per-token ones.
    gen = _gen("onegroup")
    x = torch.randn(9, 70, generator=gen)
    tok_codes, tok_scales = Q.quantize_activations_triton(x, "int8", None, interpreter=True)
    codes, scales = Q.quantize_activations_triton(x, "int8", None, interpreter=True,
                                                  act_group_size=128)
    assert scales.shape == (9, 1)
    assert torch.equal(scales[:, 0], tok_scales) and torch.equal(codes, tok_codes)


# ---------------------------------------------------------------------------------------------
# The GEMM paths against float64

# (weight bits, sym, weight group, activation format, activation group, M, K, dtype, bias):
# M = 1 runs a gemv kernel (gemv1p for 8-, 4- and 2-bit weights), 3 and 17 the mm kernel
# (int8 x int8 -> int32, fp16 operands for int12 and, in the interpreter, fp8); K is not a
# multiple of the activation group except where a case says so, N = 45 throughout.
CASES = [
    (8, True, -1, "int8", 32, 1, 83, f32, True),      # gemv, 83 = 2 * 32 + 19
    (8, True, -1, "int8", 64, 3, 83, bf16, False),    # mm: was the chained int32 accumulator
    (8, True, -1, "int8", 128, 17, 83, f16, True),    # one partial group
    (8, True, 128, "int8", 128, 17, 256, bf16, True),  # MiniLM's W8A8 g128 / act-g128 (K exact)
    (4, False, 32, "int8", 64, 17, 96, f32, False),   # weight group < activation group
    (4, False, 64, "int8", 32, 3, 128, bf16, True),   # activation group < weight group
    (6, False, 64, "int12", 128, 17, 192, bf16, True),  # 192 = 128 + 64
    (6, True, -1, "int12", 32, 1, 83, f16, False),    # gemv int12
    (4, False, 128, "fp8", 64, 3, 128, f32, True),
    (4, True, -1, "fp8", 32, 17, 70, bf16, False),
    (5, True, 32, "fp8", 128, 1, 160, f32, True),     # gemv fp8, 160 = 128 + 32
]


@pytest.mark.parametrize("bits,sym,group,act,ag,M,K,dtype,bias", CASES,
                         ids=[f"w{b}_g{g}_{a}_ag{ag}_m{m}_k{k}_{str(d)[6:]}"
                              for b, _, g, a, ag, m, k, d, _ in CASES])
def test_kernel_against_float64(bits, sym, group, act, ag, M, K, dtype, bias):
    gen = _gen(f"ag{bits}{group}{act}{ag}{M}{K}{dtype}")
    N = 45
    pw = _packed(gen, N, K, bits, group, sym)
    x = torch.randn(M, K, generator=gen)
    x[:, 5] *= 30  # an outlier channel
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    smooth = torch.rand(K, generator=gen) + 0.5
    _check(x.to(dtype), pw, ag, b, act=act)
    _check(x.to(dtype), pw, ag, b, smooth=smooth, act=act)


@pytest.mark.parametrize("path", INTERPRETER_PATHS, ids=INTERPRETER_PATH_IDS)
@pytest.mark.parametrize("act,ag", [("int8", 32), ("int12", 64), ("fp8", 128)])
def test_forced_paths(path, act, ag):
    gen = _gen(f"agpath{path['path']}{act}{ag}")
    K = 160  # partial last group for 64 and 128
    pw = _packed(gen, 37, K, 4, 32, False)
    x = torch.randn(3, K, generator=gen).to(bf16)
    _check(x, pw, ag, torch.randn(37, generator=gen).to(bf16), act=act, path=path)


def test_k_block_wider_than_the_activation_group_is_refused():
    gen = _gen("agblock")
    pw = _packed(gen, 16, 128, 8, -1, True)
    x = torch.randn(3, 128, generator=gen)
    path = dict(path="mm", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, num_warps=4,
                num_stages=1)
    with pytest.raises(ValueError, match="BLOCK_K 64 does not divide the activation group 32"):
        Q._launch(*_args(x, pw, None, None, "int8"), interpreter=True, path=path,
                  act_group_size=32)
    # The dispatch table never picks such a block: the K block is at most both groups.
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert Q.choose_path(17, 16, 128, 8, -1, "int8", f32, cpu, interpreter=True,
                         act_group_size=32)["BLOCK_K"] == 32
    for m in (1, 16, 64, 256):  # (above 256 rows: dequantise + cuBLAS, no K blocks)
        for group, ag in ((-1, 32), (128, 64), (32, 128), (-1, 128)):
            cfg = Q.choose_path(m, 4096, 4096, 8, group, "int8", bf16, cuda, sm_count=132,
                                act_group_size=ag)
            if cfg["path"] == "mmT":
                # x is quantised and dequantised first (with its groups' scales), and mmT's
                # sub-tiles never straddle a weight group: K blocks of 128 whatever the groups.
                assert 2 < m <= 64 and cfg["BLOCK_K"] == 128
            else:
                assert ag % cfg["BLOCK_K"] == 0 and (group == -1 or group % cfg["BLOCK_K"] == 0)


def test_outlier_channel_per_group_beats_per_token():
    """One channel 100x the others: a per-token scale spends 8 bits on it for the whole row; per
    group, only its own group's codes coarsen. Error of A(x) @ W^T against x @ W^T (float64)."""
    gen = _gen("agoutlier")
    M, K, N = 17, 256, 45
    pw = _packed(gen, N, K, 8, -1, True)
    x = torch.randn(M, K, generator=gen)
    x[:, 7] *= 100.0
    w = pw.dequantize(torch.float64)
    want = x.double() @ w.t()

    def err(ag):
        out = op(*_args(x, pw, None, None, "int8"), ag)
        return ((out.double() - want).norm() / want.norm()).item()

    token, g128, g32 = err(-1), err(128), err(32)
    # Measured: per token 3.8e-2, per 128 channels 2.8e-2, per 32 channels 1.4e-2. The outlier's
    # own group keeps the coarse step, so the error falls about as sqrt(group / K) (0.71, 0.35).
    assert g128 < 0.85 * token, (token, g128)
    assert g32 < 0.5 * token, (token, g32)


# ---------------------------------------------------------------------------------------------
# Contract: supports, fakes with symbolic rows, opcheck

def test_supports_reasons():
    gen = _gen("agsupports")
    pw = _packed(gen, 16, 64, 4, 32, False)
    x = torch.randn(3, 64)
    args = _args(x, pw, None, None, "int8")
    assert Q.supports(*args, 64) is None
    assert Q.supports(*args, 128) is None  # wider than K: one partial group
    assert "activation group size 48" in Q.supports(*args, 48)
    assert "need quantized activations" in Q.supports(*_args(x, pw, None, None, "none"), 32)
    assert "activation group size 0" in Q.format_supported(4, 32, False, "int8", 0)
    with pytest.raises(ValueError, match="activation group size 48"):
        Q._launch(*args, interpreter=True, act_group_size=48)


# ---------------------------------------------------------------------------------------------
# GPU lane: compiled kernels at real sizes, every path the dispatch table picks.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (weight bits, activation format, weight group, symmetric, activation group)
GPU_FORMATS = [(8, "int8", 128, True, 128), (8, "int8", -1, True, 128), (4, "int8", 128, False, 32),
               (4, "fp8", 128, False, 128), (6, "fp8", 64, True, 64), (6, "int12", 64, False, 128)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 16, 256, 4096])
@pytest.mark.parametrize("bits,act,group,sym,ag", GPU_FORMATS,
                         ids=[f"w{b}_{a}_g{g}_ag{ag}" for b, a, g, _, ag in GPU_FORMATS])
def test_gpu_against_float64(bits, act, group, sym, ag, M):
    # 4160 = 32 * 128 + 64: a partial last activation group of 128, where the weight groups
    # divide it (per-channel, 32, 64); 128-channel weight groups need K = 4096.
    K, N = (4096 if group == 128 else 4160), 4096
    gen = _gen(f"aggpu{bits}{act}{group}{ag}{M}")
    pw = _packed(gen, N, K, bits, group, sym, device="cuda")
    x = torch.randn(M, K, generator=gen)
    x[:, 11] *= 50
    bias = torch.randn(N, generator=gen).to(bf16).cuda()
    _check(x.to(bf16).cuda(), pw, ag, bias, act=act)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("path", GPU_PATHS, ids=GPU_PATH_IDS)
@pytest.mark.parametrize("act", ["int8", "fp8", "int12"])
def test_gpu_every_path(path, act):
    gen = _gen(f"aggpupath{path['path']}{act}")
    K, N, M = 4096, 4096, 17 if not path["path"].startswith("gemv") else 2
    pw = _packed(gen, N, K, 4, 128, False, device="cuda")
    x = torch.randn(M, K, generator=gen).to(f16).cuda()
    _check(x, pw, 128, None, act=act, path=path)
