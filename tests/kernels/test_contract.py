"""The kernel contract: which implementation a q3n op runs on this lane, and the cached launch."""

import os

import pytest
import torch
import triton
import triton.language as tl

from q3n_compile.kernels import contract

from .subprocess_lane import run_without_interpreter


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU lane only")
def test_backend_is_interpreter_on_cpu_lane():
    assert contract.backend_for(torch.device("cpu")) == "interpreter"


def test_backend_is_reference_without_interpreter():
    run_without_interpreter("""
        import torch
        from q3n_compile.kernels import contract
        assert contract.backend_for(torch.device("cpu")) == "reference"
        print("ok")
    """)


@triton.jit
def _axpb_kernel(X, Y, n, a, B: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + offs, mask=ok)
    tl.store(Y + offs, (x * a + B).to(Y.dtype.element_ty), mask=ok)


def test_launch_keeps_one_launch_per_signature_and_pointer_dtype():
    # contract.launch caches the TritonLaunch by everything but the pointers' data: a repeated
    # call reuses it, another pointer dtype (another compiled variant) or scalar gets its own.
    contract._LAUNCHES.clear()
    fast = contract.backend_for(torch.device("cpu")) != "interpreter"
    for dtype in (torch.float32, torch.float16):
        for n in (37, 37, 5):
            x = torch.arange(n, dtype=dtype) - 3
            y = torch.empty_like(x)
            contract.launch(_axpb_kernel, (triton.cdiv(n, 16),), (x, y), (n, 2.5),
                            dict(B=1, BLOCK=16), dict(num_warps=1), fast=fast)
            torch.testing.assert_close(y, (x.double() * 2.5 + 1).to(dtype))
    assert len(contract._LAUNCHES) == 4  # (float32, float16) x (n = 37, n = 5)
    with pytest.raises(KeyError):  # every constexpr is named
        contract.launch(_axpb_kernel, (1,), (x, y), (5, 1.0), dict(B=1), {}, fast=fast)


def test_launch_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(contract, "_MAX_LAUNCHES", 3)
    contract._LAUNCHES.clear()
    x = torch.ones(8)
    y = torch.empty_like(x)
    for b in range(5):
        contract.launch(_axpb_kernel, (1,), (x, y), (8, 1.0), dict(B=b, BLOCK=8), {},
                        fast=False)
        assert torch.equal(y, x + b)
    assert 1 <= len(contract._LAUNCHES) <= 3


def test_host_integer_helpers_match_triton():
    assert [contract.next_power_of_2(n) for n in range(0, 4100)] == [
        triton.next_power_of_2(n) for n in range(0, 4100)]
    assert all(contract.cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 300) for b in (1, 7, 16, 128))


def test_registered_ops_run_below_autograd_and_refuse_gradients():
    # register_kernel_op's ops (torch.library definitions): the impl runs for real tensors with
    # or without the autograd keys, an input needing a gradient is refused with the fix, and the
    # schema, tag and fake are what torch.library.custom_op gave them.
    from q3n_compile.kernels import attention as A

    op = torch.ops.q3n.attention.default
    assert torch.Tag.pt2_compliant_tag in op.tags
    assert str(op._schema).startswith("q3n::attention(Tensor q, Tensor k, Tensor v, Tensor? mask")
    assert contract.python_impl(op) is A._attention_impl
    q = torch.randn(1, 2, 5, 16)
    want = A.reference(q, q, q, None, None, True)
    with torch.no_grad():
        torch.testing.assert_close(op(q, q, q, None, None, True), want, atol=2e-5, rtol=2e-5)
        with torch._C._AutoDispatchBelowAutograd():
            torch.testing.assert_close(op(q, q, q, None, None, True), want, atol=2e-5, rtol=2e-5)
        assert op(q.requires_grad_(), q, q, None, None, True).shape == q.shape  # no grad mode
    with pytest.raises(RuntimeError, match=r"q3n::attention has no gradient.*torch.no_grad\(\)"):
        op(q, q, q, None, None, True)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq = mode.from_tensor(torch.randn(2, 3, 7, 16))
        assert op(fq, fq, fq, None, None, False).shape == (2, 3, 7, 16)


def test_made_off_graph_pools_runs_make_once_on_a_cpu():
    calls = []

    def make():
        calls.append(1)
        return torch.arange(3)

    got = contract.made_off_graph_pools(make, torch.device("cpu"))
    assert torch.equal(got, torch.arange(3)) and calls == [1]
    assert not contract.capturing(torch.device("cpu"))
