"""kernels/act_dequant.py: activation codes to 16-bit activations in one Triton pass, against
the torch definition (CPU lane: Triton's interpreter; GPU: -m gpu, bit for bit)."""

import pytest
import torch

from q3n_compile.kernels import act_dequant as AD
from q3n_compile.kernels import qlinear as Q
from q3n_compile.kernels import qlinear_swap as SW

from .test_qlinear import _gen, bf16, f16, f32

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _codes(gen, M, K, act, ag, device="cpu", interpreter=True):
    """Codes and scales from the op's own quantizer, on x with rows and channels of very
    different magnitudes (scales from ~1e-3 to ~10)."""
    x = (torch.randn(M, K, generator=gen) * torch.logspace(-2, 1, K)
         * torch.logspace(-1, 0.5, M)[:, None]).to(bf16).to(device)
    return Q.quantize_activations_triton(x, act, None, interpreter, ag)


def _bf16_within_truncation(got, want):
    # Triton 3.6's interpreter truncates fp32 -> bf16 where the GPU (and torch) round: the two
    # differ by at most one unit in the last place, and only toward zero.
    g, w = got.float(), want.float()
    ulp = torch.finfo(bf16).eps * w.abs()
    return bool(((g - w).abs() <= ulp).all() and (g.abs() <= w.abs()).all())


@pytest.mark.parametrize("act", ["int8", "fp8", "int12"])
@pytest.mark.parametrize("ag", [Q.PER_TOKEN, 32, 64, 128])
@pytest.mark.parametrize("M,K", [(1, 128), (5, 200), (9, 448), (17, 640)])
@pytest.mark.parametrize("dtype", [f16, f32, bf16])
@pytest.mark.parametrize("perm128", [False, True])
def test_kernel_is_the_torch_definition(act, ag, M, K, dtype, perm128):
    """Every code format, scales per token and per 32 / 64 / 128 channels, K with a partial
    last group and 128-channel block, rows past the program's 8: the kernel's c * s equals
    torch's (f16, f32 bit for bit; bf16 within the interpreter's truncation), and the XPERM
    layout is the permutation of the plain result with zeros past K."""
    gen = _gen(f"actdeq{act}{ag}{M}{K}{dtype}{perm128}")
    codes, xs = _codes(gen, M, K, act, ag)
    got = AD.dequantize_codes(codes, xs, ag, dtype, perm128=perm128)
    want = AD.dequantize_codes_torch(codes, xs, ag, dtype, perm128=perm128)
    kp = -(-K // 128) * 128
    assert got.dtype == dtype and got.shape == (M, kp if perm128 else K)
    if dtype == bf16:
        assert _bf16_within_truncation(got, want)
    else:
        assert torch.equal(got, want)
    # The definition itself: fp32 products of codes and their scales, rounded once.
    plain = AD.dequantize_codes_torch(codes, xs, ag, dtype)
    assert torch.equal(plain, (codes.float() * AD.expand_scales(xs, K, ag)).to(dtype))
    if perm128:  # permute_x_blocks_torch pads with zeros past K
        assert torch.equal(want, SW.permute_x_blocks_torch(plain))


def test_kernel_reads_rows_of_a_strided_view_and_empty_input():
    """The op's row split passes row slices of the codes (their own row stride); no rows give
    an empty result."""
    gen = _gen("actdeq_view")
    codes, xs = _codes(gen, 12, 256, "int8", Q.PER_TOKEN)
    rows = slice(3, 10)
    got = AD.dequantize_codes(codes[rows], xs[rows], Q.PER_TOKEN, f32, perm128=True)
    assert torch.equal(got, AD.dequantize_codes_torch(codes[rows], xs[rows], Q.PER_TOKEN, f32,
                                                      perm128=True))
    empty = AD.dequantize_codes(codes[:0], xs[:0], Q.PER_TOKEN, f16, perm128=True)
    assert empty.shape == (0, 256) and empty.dtype == f16
    # Column-strided codes are made contiguous first.
    t = codes.t().contiguous().t()
    assert torch.equal(AD.dequantize_codes(t, xs, Q.PER_TOKEN, f32),
                       AD.dequantize_codes_torch(codes, xs, Q.PER_TOKEN, f32))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("act", ["int8", "fp8", "int12"])
@pytest.mark.parametrize("ag", [Q.PER_TOKEN, 32, 128])
@pytest.mark.parametrize("M,K", [(130, 4096), (300, 4000), (1, 12288)])
@pytest.mark.parametrize("perm128", [False, True])
@pytest.mark.parametrize("pdl", [False, True])
def test_gpu_kernel_is_the_torch_definition(act, ag, M, K, perm128, pdl):
    """On the GPU (fp8 codes in float8_e4m3fn storage), bf16 and fp16 bit for bit, launched
    with and without programmatic dependent launch."""
    from q3n_compile.kernels import contract

    gen = _gen(f"gpuactdeq{act}{ag}{M}{K}")
    codes, xs = _codes(gen, M, K, act, ag, device="cuda", interpreter=False)
    if act == "fp8" and Q.fp8_supported(codes.device):
        assert codes.dtype == torch.float8_e4m3fn
    pdl = pdl and contract.pdl_capable(codes.device)
    for dtype in (bf16, f16):
        got = AD.dequantize_codes(codes, xs, ag, dtype, perm128=perm128, pdl=pdl)
        want = AD.dequantize_codes_torch(codes, xs, ag, dtype, perm128=perm128)
        assert torch.equal(got, want), (dtype, (got.float() - want.float()).abs().max())
