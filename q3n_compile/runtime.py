"""Executors: what runs a rewritten graph, and the checks around running it.

- ``executor="q3n"``: the FX graph runs as its generated Python (the q3n ops inside it dispatch to
  Triton on CUDA). Boxed calling convention, so AOTAutograd can free inputs early.
- ``executor="inductor"``: the rewritten graph is re-traced with Inductor's decompositions (q3n's
  ops stay opaque custom ops) and compiled by Inductor's graph compiler for everything q3n did not
  rewrite.
- Weights folded at compile time are guarded: a compiled graph refuses to run after such a weight
  was changed in place or re-assigned, instead of silently computing with the old value.
- :func:`verify_outputs` compares two graphs on concrete inputs with a dtype-aware tolerance.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch._functorch.aot_autograd import make_boxed_func


class FrozenWeightChanged(RuntimeError):
    pass


class FrozenWeightGuard:
    """Remembers the version counter and storage of every weight a pass folded into the graph."""

    def __init__(self, frozen: dict[str, torch.Tensor]):
        self._frozen = [(name, t, t._version, t.data_ptr()) for name, t in frozen.items()]

    def __bool__(self) -> bool:
        return bool(self._frozen)

    def check(self) -> None:
        for name, tensor, version, ptr in self._frozen:
            if tensor._version != version or tensor.data_ptr() != ptr:
                raise FrozenWeightChanged(
                    f"q3n: the weight behind graph input {name!r} changed after compilation, but "
                    "q3n folded its value into the compiled graph (weights are compile-time "
                    "constants, as with Inductor's freezing). Recompile after changing weights: "
                    "call torch._dynamo.reset() and compile the model again."
                )


def q3n_executor(gm: torch.fx.GraphModule, guard: FrozenWeightGuard) -> Callable:
    if not guard:
        return make_boxed_func(gm.forward)

    def run(args: list[Any]) -> Any:
        guard.check()
        return gm.forward(*args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def inductor_executor(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    guard: FrozenWeightGuard,
    *,
    is_backward: bool = False,
    autotune: bool = False,
) -> Callable:
    from torch._guards import detect_fake_mode
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    # Re-trace under the capture's fake mode so SymInts keep their symbols: Inductor lowers only
    # decomposed ATen, and q3n's passes ran before its decompositions on purpose.
    fake_mode = detect_fake_mode(example_inputs)
    with fake_mode:
        decomposed = make_fx(gm, decomposition_table=select_decomp_table())(*example_inputs)
    patches = {"max_autotune": True} if autotune else {}
    with inductor_config.patch(patches):
        compiled = compile_fx_inner(
            decomposed, list(example_inputs), is_inference=not is_backward, is_backward=is_backward
        )
    if not guard:
        return compiled

    def run(args: list[Any]) -> Any:
        guard.check()
        return compiled(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


# Relative tolerance of a verified graph against the captured one, by output dtype. A rewrite may
# reorder reductions (attention's online softmax, fused GEMMs): the bound is a few units of the
# dtype's precision over the output's scale, not bit-equality.
VERIFY_RTOL = {
    torch.float64: 1e-9,
    torch.float32: 2e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 4e-2,
}


def verify_outputs(expected: Sequence[Any], actual: Sequence[Any]) -> str | None:
    """None if `actual` matches `expected` output by output, else what differs."""
    if len(expected) != len(actual):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for i, (want, got) in enumerate(zip(expected, actual)):
        if not isinstance(want, torch.Tensor):
            if want != got:
                return f"output {i}: {got!r} != {want!r}"
            continue
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            return f"output {i}: {_describe(got)} where {_describe(want)} was expected"
        if not want.is_floating_point():
            if not torch.equal(want, got):
                return f"output {i}: integer/bool values differ"
            continue
        if want.numel() == 0:
            continue
        want64, got64 = want.double(), got.double()
        if not torch.equal(torch.isnan(want64), torch.isnan(got64)):
            return f"output {i}: NaN in different places"
        finite = torch.isfinite(want64)
        scale = want64[finite].abs().max().item() if finite.any() else 0.0
        err = (want64 - got64)[finite].abs().max().item() if finite.any() else 0.0
        rtol = VERIFY_RTOL.get(want.dtype, 1e-2)
        if err > rtol * max(scale, 1e-6) or math.isnan(err):
            return f"output {i}: max abs error {err:.3g} > {rtol:g} × max|expected| {scale:.3g}"
    return None


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {value.dtype}"
    return type(value).__name__
