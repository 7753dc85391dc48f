"""The one kernel contract every `q3n::<name>` op follows (DESIGN.md, "Kernels: one contract").

Each kernel module in this package holds, in this order:

1. the Triton kernel (`@triton.jit`), whose docstring states the math and the memory traffic;
2. the launcher, which chooses the variant (block sizes, constexpr specialisations) and launches;
3. `reference(...)`: plain torch with the same signature as the op, the ground truth on CPU;
4. the op registration through :func:`register_kernel_op` (a `torch.library.custom_op` with a fake
   implementation that computes its output sizes from the inputs' sizes, SymInts included);
5. `supports(...) -> str | None`: ``None`` if the kernel handles the arguments, otherwise the reason
   it does not. A pass asks this before it lowers anything, and counts the reason when it declines.

Where the op runs is decided per call by :func:`backend_for`:

- CUDA tensors run the Triton kernel;
- CPU tensors run the Triton kernel in Triton's interpreter when ``TRITON_INTERPRET=1`` was set
  before Triton was imported (that is how the CPU test lane exercises kernels), and the torch
  reference otherwise.

The contract guarantees that the op's result does not depend on which of the three paths ran,
beyond the rounding the kernel's docstring states.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Literal

import torch

Backend = Literal["triton", "interpreter", "reference"]


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton kernels were built for its CPU interpreter.

    Triton chooses between compiled and interpreted functions when `@triton.jit` runs, at import,
    so the variable must be set before the kernel modules are imported; reading it later is only
    right if it was not changed in between, which is what the tests' conftest guarantees.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_for(device: torch.device) -> Backend:
    """Which implementation a kernel op runs for tensors on `device`."""
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu" and interpreter_enabled() and triton_available():
        return "interpreter"
    return "reference"


def register_kernel_op(
    name: str,
    impl: Callable,
    fake: Callable,
    *,
    schema: str | None = None,
) -> torch._ops.OpOverloadPacket:
    """Register `impl` as the op ``q3n::<name>`` with `fake` as its FakeTensor implementation.

    `impl` is the dispatching function (Triton, interpreter or reference by :func:`backend_for`);
    it must not mutate its inputs. The schema is inferred from `impl`'s annotations unless given.
    Returns ``torch.ops.q3n.<name>``.
    """
    qualname = f"q3n::{name}"
    op = torch.library.custom_op(qualname, mutates_args=(), schema=schema)(impl)
    op.register_fake(fake)
    return getattr(torch.ops.q3n, name)
