"""The kernel contract's dispatch: which implementation a q3n op runs on this lane."""

import os

import pytest
import torch

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
