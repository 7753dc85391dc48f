"""Test-lane setup shared by every test.

Without a GPU, kernel tests run the Triton kernels in Triton's CPU interpreter: the variable has
to be set before Triton decorates any kernel, i.e. before q3n_compile's kernel modules import.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Every kernel module imports now, under the setting above: Gluon refuses Triton functions
# decorated for the interpreter once it is off, so a test whose fixture turns it off
# (reference_kernels) must not be the first to import them (tests/test_bench_cli.py alone
# failed that way).
import q3n_compile.backend  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _fresh_dynamo_and_reports():
    """Each test compiles from a clean Dynamo cache and an empty report registry."""
    import q3n_compile

    torch._dynamo.reset()
    q3n_compile.reset_reports()
    yield
    torch._dynamo.reset()


@pytest.fixture
def fresh_quant_state():
    """For quantization tests: no calibration or release state from earlier tests, and gradients
    off (quantized graphs are inference graphs), restored afterwards."""
    from q3n_compile import quant

    quant.clear()
    torch.set_grad_enabled(False)
    yield
    torch.set_grad_enabled(True)
    quant.clear()


@pytest.fixture
def reference_kernels(monkeypatch):
    """For tests about whole models, not kernels: on the CPU q3n's ops run their torch reference
    (Triton's interpreter is far too slow for whole models; the kernel tests cover it). One thread:
    tiny models gain nothing from more, and a shared machine makes intra-op threads wait."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
