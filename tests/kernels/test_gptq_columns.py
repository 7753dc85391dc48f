"""gptq_columns: GPTQ's column loop as one kernel, against the torch loop it replaces, bit for bit
(CPU lane: Triton's interpreter; GPU lane: the compiled kernel and whole GPTQ runs)."""

import pytest
import torch

from q3n_compile.kernels import gptq_columns as GC
from q3n_compile.quant import algorithms as A
from q3n_compile.quant.config import PER_CHANNEL, LayerFormat

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _block(n: int, c: int, groups: int, bits: int, seed: int, device="cpu"):
    """A GPTQ block: weights with a few large rows, the upper Cholesky factor of a damped inverse
    Hessian of correlated inputs, group parameters from RTN, and each column's group."""
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(n, c, generator=gen)
    w1[: n // 5] *= 7.0
    x = torch.randn(3 * c, c, generator=gen) @ (torch.eye(c) + 0.3 * torch.randn(c, c, generator=gen))
    h = (x.t() @ x / x.shape[0]).double() + 0.05 * torch.eye(c, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    group_of = torch.randint(0, groups, (c,), generator=gen).tolist()
    scales = torch.rand(groups, n, generator=gen) * 0.5 + 0.05
    zeros = torch.randint(0, 1 << bits, (groups, n), generator=gen).float()
    err1 = torch.zeros(n, c)
    codes = torch.full((n, c + 9), -1.0)[:, 4:4 + c]  # a view with the row stride of a wider K
    to = dict(device=device)
    return (w1.to(**to), err1.to(**to), codes.to(**to), hinv.float().to(**to),
            scales.to(**to), zeros.to(**to), group_of)


def _spans(c: int, cuts: tuple) -> list[tuple[int, int]]:
    edges = [0, *[x for x in cuts if 0 < x < c], c]
    return list(zip(edges[:-1], edges[1:]))


def _run_both(n, c, groups, bits, seed, cuts, device):
    kern = _block(n, c, groups, bits, seed, device)
    ref = [t.clone() if isinstance(t, torch.Tensor) else t for t in kern]
    ref[2] = kern[2].clone()  # clone() makes it dense: keep the reference's own layout simple
    gdev = torch.tensor(kern[6], dtype=torch.int32, device=device)
    for j0, j1 in _spans(c, cuts):
        GC.launch(*kern[:6], gdev, j0, j1, bits)
        GC.reference(*ref[:6], ref[6], j0, j1, bits)
    return kern, ref


# (rows, columns, groups, bits, span cuts): rows off the 32-row program, a partial last block
# (c < 128), one group (per channel) and several, spans that start mid-block as after a group's
# search.
CASES = [
    (50, 128, 1, 8, ()),
    (37, 96, 3, 4, (17, 60)),
    (64, 128, 4, 6, (1, 2, 100)),
    (33, 40, 2, 2, (39,)),
]


@pytest.mark.parametrize("n,c,groups,bits,cuts", CASES)
def test_interpreter_matches_the_torch_loop_bit_for_bit(n, c, groups, bits, cuts):
    (w1, err1, codes, *_), (rw1, rerr1, rcodes, *_) = _run_both(n, c, groups, bits, 0, cuts, "cpu")
    assert torch.equal(codes, rcodes)
    assert torch.equal(err1, rerr1)
    assert torch.equal(w1, rw1)
    assert float(codes.min()) >= 0 and float(codes.max()) <= (1 << bits) - 1
    # The codes are not all one value (the test can fail): both ends of the range are reached.
    assert len(torch.unique(codes)) > 2


def test_launch_writes_only_the_span():
    n, c, bits = 20, 64, 4
    w1, err1, codes, hinv1, s, z, g = _block(n, c, 2, bits, 3)
    before = codes.clone()
    GC.launch(w1, err1, codes, hinv1, s, z, torch.tensor(g, dtype=torch.int32), 10, 30, bits)
    assert torch.equal(codes[:, :10], before[:, :10]) and torch.equal(codes[:, 30:], before[:, 30:])
    assert not torch.equal(codes[:, 10:30], before[:, 10:30])
    assert torch.count_nonzero(err1[:, :10]) == 0 and torch.count_nonzero(err1[:, 30:]) == 0


def test_launch_rejects_a_layout_it_cannot_read():
    w1, err1, codes, hinv1, s, z, g = _block(8, 16, 1, 4, 1)
    with pytest.raises(ValueError, match="unit-stride columns"):
        GC.launch(w1.t().contiguous().t(), err1, codes, hinv1, s, z,
                  torch.tensor(g, dtype=torch.int32), 0, 16, 4)


def test_cpu_tensors_keep_the_torch_loop():
    assert "CPU" in GC.supports(torch.zeros(4, 8))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("n,c,groups,bits,cuts", CASES + [(4096, 128, 3, 8, (5, 77))])
def test_gpu_kernel_matches_the_torch_loop_bit_for_bit(n, c, groups, bits, cuts):
    (w1, err1, codes, *_), (rw1, rerr1, rcodes, *_) = _run_both(n, c, groups, bits, 1, cuts,
                                                                "cuda")
    assert torch.equal(codes, rcodes)
    assert torch.equal(err1, rerr1)
    assert torch.equal(w1, rw1)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("bits,group,sym,act_order", [(8, PER_CHANNEL, True, True),
                                                      (4, 128, False, True),
                                                      (6, 64, False, False),
                                                      (3, 32, True, True)])
def test_gpu_gptq_with_the_kernel_equals_gptq_with_the_torch_loop(monkeypatch, bits, group, sym,
                                                                  act_order):
    gen = torch.Generator().manual_seed(bits)
    n, k = 300, 640  # K: five blocks of 128, groups split across them by act-order
    w = torch.randn(n, k, generator=gen).cuda()
    x = (torch.randn(2048, k, generator=gen) * torch.rand(k, generator=gen) * 3).cuda()
    h = x.t() @ x / x.shape[0]
    fmt = LayerFormat(bits, 16, group, sym)
    got = A.gptq(w, h, fmt, 0.01, True, act_order)
    monkeypatch.setattr(GC, "supports", lambda w1: "forced: the torch loop")
    want = A.gptq(w, h, fmt, 0.01, True, act_order)
    assert torch.equal(got.codes, want.codes)
    assert torch.equal(got.scales, want.scales) and torch.equal(got.zeros, want.zeros)


def test_compiles_for_sm90_with_correctly_rounded_steps():
    """The CPU lane compiles the kernel for an H100/H200 (no GPU needed): it must compile, divide
    with div.rn (not Triton's approximate fp32 division) and hold no fused multiply-add (the
    launch turns contraction off, so each step rounds as the torch loop's ops do)."""
    from .subprocess_lane import json_without_interpreter

    got = json_without_interpreter("""
        import json
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from q3n_compile.kernels import gptq_columns as GC

        kernel = GC.gptq_columns_kernel
        constexprs = dict(QMAX=15.0, BLOCK_N=GC.BLOCK_N, BLOCK_C=GC.BLOCK_C)
        types = dict(W1="*fp32", ERR="*fp32", CODES="*fp32", HINV="*fp32", S="*fp32", Z="*fp32",
                     G="*i32")
        names = kernel.arg_names
        signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
        src = ASTSource(fn=kernel, signature=signature,
                        constexprs={(names.index(k),): v for k, v in constexprs.items()})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4, "enable_fp_fusion": False})
        ptx = k.asm["ptx"]
        print(json.dumps(dict(div_rn=ptx.count("div.rn.f32"), fma=ptx.count("fma.rn.f32"),
                              div_approx=ptx.count("div.full.f32"))))
    """)
    assert got["div_rn"] >= 2 and got["div_approx"] == 0 and got["fma"] == 0, got


@needs_cuda
@pytest.mark.gpu
def test_gpu_one_compiled_variant_serves_every_span():
    """The spans' ends vary at every launch (act-order cuts blocks at each group's first column):
    they are not specialised on, so a GPTQ run compiles the kernel once, not once per class of
    span ends (each a compile of about half a second)."""
    gen = torch.Generator().manual_seed(7)
    n, k = 96, 1024
    w = torch.randn(n, k, generator=gen).cuda()
    x = (torch.randn(1024, k, generator=gen) * torch.rand(k, generator=gen) * 3).cuda()
    fmt = LayerFormat(4, 16, 32, False)  # 32 groups reached in act-order: many spans
    before = {key: len(caches[0]) for key, caches in GC.gptq_columns_kernel.device_caches.items()}
    A.gptq(w, x.t() @ x / x.shape[0], fmt, 0.01, True, True)
    after = {key: len(caches[0]) for key, caches in GC.gptq_columns_kernel.device_caches.items()}
    new = sum(after.values()) - sum(before.values())
    assert new <= 1, (before, after)
