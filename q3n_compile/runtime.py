"""Executors: what runs a rewritten graph, and the checks around running it.

- ``executor="q3n"``: the FX graph runs as its generated Python (the q3n ops inside it dispatch to
  Triton on CUDA). Boxed calling convention, so AOTAutograd can free inputs early.
- ``executor="inductor"``: the rewritten graph is re-traced with Inductor's decompositions (q3n's
  ops stay opaque custom ops) and compiled by Inductor's graph compiler for everything q3n did not
  rewrite. With ``cuda_graphs=True`` Inductor's CUDA graph trees capture and replay it, as its
  ``reduce-overhead`` mode does: weights (folded constants and parameters) and inputs Dynamo marked
  static (a KV cache with ``mark_static_address``) are used at their address, so a graph that
  writes such a cache in place is captured; other inputs are copied into the graph's buffers, and
  outputs are copied out of them (a result stays valid after later calls, unlike Inductor's own
  ``reduce-overhead``).
  The compiled function's ``q3n_cuda_graphs`` says whether Inductor applied them or why not.
  Inductor runs with :data:`INDUCTOR_MEMORY_CONFIG`: a value several kernels read (the residual
  stream) is stored once instead of being recomputed from every tensor summed into it, which
  would keep those tensors alive.
- Weights folded at compile time are guarded: a compiled graph refuses to run after such a weight
  was changed in place or re-assigned, instead of silently computing with the old value.
- :func:`verify_outputs` compares two graphs on concrete inputs with a dtype-aware tolerance.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch._functorch.aot_autograd import make_boxed_func


# Inductor settings q3n's Inductor executor compiles with, for a lower peak. A pointwise value
# with several readers is otherwise inlined into each reader while it reads up to 4 tensors, so
# the residual stream h = x + attn + mlp + ... keeps every summand alive until a 5th forces it
# out; at 1 it is stored once and the summands die (its readers then read one tensor instead of
# several). Measured on an H200 (bench_memory.py, qwen3 "bench", 2026-11-29): 512 tokens
# 37 MB above the weights instead of 50 MB, 2048: 148 instead of 198; latency within the
# qwen3's run-to-run spread (gpt2 saved nothing; bench/RESULTS.md). Also freeing buffers at their
# last use (allow_buffer_reuse=False) saved nothing more (bench_memory.py's backends
# q3n-inductor-pool and q3n-inductor-noreuse compare them with this).
INDUCTOR_MEMORY_CONFIG: dict[str, Any] = {"realize_reads_threshold": 1}


class FrozenWeightChanged(RuntimeError):
    pass


class FrozenWeightGuard:
    """Remembers the version counter and storage of every weight a pass folded into the graph,
    and (given its position among the graph's inputs) checks that a call passes that weight.

    Why the position: Dynamo passes a module's parameters to the graph as inputs and guards on
    their shapes and dtypes, not on which tensors they are, so one compiled graph serves every
    instance of a module class (a second model of the same class, ``layer.compile()`` on each
    of a model's layers). A graph whose passes folded the first instance's weights would compute
    with them for the others: this raises instead."""

    def __init__(self, frozen: dict[str, torch.Tensor],
                 positions: Optional[dict[str, int]] = None):
        positions = positions or {}
        # Float attributes (a norm's eps) come as 0-d tensors Dynamo makes anew on every call:
        # only weights (parameters, and buffers, which have a shape) are checked by identity.
        self._frozen = [(name, t, t._version, t.data_ptr(),
                         positions.get(name) if isinstance(t, torch.nn.Parameter) or t.dim()
                         else None)
                        for name, t in frozen.items()]

    def __bool__(self) -> bool:
        return bool(self._frozen)

    def check(self, args: Optional[Sequence[Any]] = None) -> None:
        released = False
        for name, tensor, version, ptr, pos in self._frozen:
            if getattr(tensor, "_q3n_released_key", None) is not None:
                released = True  # freed by release_quantized_weights(): the graph holds its
                continue         # packed form; not checked again (a decode step's host time)
            if tensor._version != version or tensor.data_ptr() != ptr:
                raise FrozenWeightChanged(
                    f"q3n: the weight behind graph input {name!r} changed after compilation, but "
                    "q3n folded its value into the compiled graph (weights are compile-time "
                    "constants, as with Inductor's freezing). Recompile after changing weights: "
                    "call torch._dynamo.reset() and compile the model again."
                )
            if args is not None and pos is not None:
                given = args[pos]
                if given is not tensor and (not isinstance(given, torch.Tensor)
                                            or given.data_ptr() != ptr):
                    raise FrozenWeightChanged(
                        f"q3n: graph input {name!r} ({tuple(tensor.shape)}, "
                        f"{str(tensor.dtype).replace('torch.', '')}) is not the weight this graph "
                        "was compiled with: q3n folded that weight's values into the graph, and Dynamo reuses "
                        "one compiled graph for every instance of a module class (another model "
                        "of the same class, or layer.compile() on each layer), passing the "
                        "instance's own weights, which this graph would ignore. Compile with "
                        "torch._inductor.config.freezing = True under torch.no_grad() (Dynamo "
                        "then compiles a graph for each instance's weights), or compile the "
                        "whole model once."
                    )
        if released:
            self._frozen = [e for e in self._frozen
                            if getattr(e[1], "_q3n_released_key", None) is None]


def below_autograd(compiled: Callable) -> Callable:
    """`compiled` (boxed) run with the autograd dispatch keys excluded, for inference graphs.

    An inference graph needs no autograd (AOTAutograd compiles one only when no input requires a
    gradient), but each q3n op call would still pass the op's Python autograd kernel first
    (``contract.register_kernel_op``: it refuses inputs that need a gradient). The dispatch of
    ``q3n::attention`` costs 34-36 µs a call on a CPU with the autograd keys on (under no_grad)
    and 16-17 µs below them (49.5 and 26.9 when they were ``torch.library.custom_op`` ops),
    which a decode step without CUDA graphs pays per op. In-place version bumps still happen
    (that key, ADInplaceOrView, stays on).
    """

    boxed = getattr(compiled, "_boxed_call", False)  # decided once: run is on every call's path

    def run(args: list[Any]) -> Any:
        with torch._C._AutoDispatchBelowAutograd():
            return compiled(args) if boxed else compiled(*args)

    run._boxed_call = True  # type: ignore[attr-defined]
    run.q3n_inner = compiled  # type: ignore[attr-defined]
    return run


def direct_kernel_calls(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` with each call of a q3n kernel op replaced by a call of the op's Python
    implementation (``kernels.contract.python_impl``): a copy (constants shared), or `gm` itself
    when it calls none. For inference graphs run by q3n's own executor: the same computation on
    real tensors, without the dispatcher's round trip into Python (25-95 µs a call measured on the
    H200 machine's host, which a decode step without CUDA graphs pays per kernel op). `gm` is left as it is (reports and
    dumps show the ops); profilers see the kernels' launches, not the ops' names."""
    from .kernels import contract

    if not any(n.op == "call_function" and contract.python_impl(n.target) is not None
               for n in gm.graph.nodes):
        return gm
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        impl = contract.python_impl(node.target) if node.op == "call_function" else None
        if impl is not None:
            node.target = impl
    return torch.fx.GraphModule(gm, graph)


def q3n_executor(
    gm: torch.fx.GraphModule,
    guard: FrozenWeightGuard,
    *,
    config: Any = None,
    static_inputs: Sequence[str] = (),
    fallbacks: list[dict[str, str]] | None = None,
    direct: bool = False,
) -> Callable:
    """Run `gm` as its generated Python. With `config`, a graph the memory_plan pass planned runs
    as generated code writing into one arena, and cuda_graphs=True captures/replays it
    (q3n_compile/memory/arena_runtime.py). `direct`: q3n's kernel ops are called as Python
    functions (:func:`direct_kernel_calls`; inference graphs only: they skip the ops' autograd
    layer, which would refuse a gradient)."""
    if config is not None:
        from .memory.arena_runtime import planned_executor

        planned = planned_executor(
            gm, guard, cuda_graphs=config.cuda_graphs, static_inputs=static_inputs,
            strict=config.strict, fallbacks=fallbacks, direct=direct,
        )
        if planned is not None:
            return planned
    forward = (direct_kernel_calls(gm) if direct else gm).forward
    if not guard:
        return make_boxed_func(forward)

    def run(args: list[Any]) -> Any:
        guard.check(args)
        return forward(*args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def inductor_executor(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    guard: FrozenWeightGuard,
    *,
    is_backward: bool = False,
    autotune: bool = False,
    cuda_graphs: bool = False,
) -> Callable:
    from torch._guards import detect_fake_mode
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    # Constants the passes created (folded, packed weights) become trailing graph inputs: Inductor
    # fake-propagates its graph under the capture's fake mode, which refuses real tensors.
    gm, constants = _constants_as_inputs(gm)
    fake_mode = detect_fake_mode(example_inputs)
    fake_args = [*example_inputs, *(fake_mode.from_tensor(c, static_shapes=True) for c in constants)]
    # Re-trace under the capture's fake mode so SymInts keep their symbols: Inductor lowers only
    # decomposed ATen, and q3n's passes ran before its decompositions on purpose.
    with fake_mode:
        decomposed = make_fx(gm, decomposition_table=select_decomp_table())(*fake_args)
    patches: dict[str, Any] = dict(INDUCTOR_MEMORY_CONFIG)
    if autotune:
        patches["max_autotune"] = True
    graph_kwargs: dict[str, Any] = {}
    applied = None
    on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in example_inputs)
    if cuda_graphs and not is_backward and on_cuda:
        from torch._inductor.cudagraph_utils import BoxedDeviceIndex
        from torch._inductor.utils import BoxedBool

        applied = BoxedBool(True)  # Inductor sets it False when it declines to capture
        patches["triton.cudagraphs"] = True
        graph_kwargs = dict(
            cudagraphs=applied,
            static_input_idxs=_static_input_indices(len(example_inputs), len(constants)),
            boxed_forward_device_index=BoxedDeviceIndex(None),
        )
    with inductor_config.patch(patches):
        compiled = compile_fx_inner(
            decomposed, fake_args, is_inference=not is_backward, is_backward=is_backward, **graph_kwargs
        )

    # Which outputs to copy out of the graph's pool: fixed by the graph, found on the first call
    # (a per-call scan of every input's storage costs more host time than a decode step has).
    copy_out: list[bool] = []

    def run(args: list[Any]) -> Any:
        guard.check(args)
        full = list(args)
        args.clear()  # boxed convention: the callee owns (and may free) the inputs
        full.extend(constants)
        if not applied:
            return compiled(full)
        # Read before the call: the compiled function empties the list it is given.
        storages = None if copy_out else _storages(full)
        outputs = compiled(full)
        if storages is not None:
            copy_out.extend(_outputs_to_copy(outputs, storages))
        return _copied(outputs, copy_out)

    run._boxed_call = True  # type: ignore[attr-defined]
    if cuda_graphs and not on_cuda:
        run.q3n_cuda_graphs = "requested; only applies on CUDA (this graph runs on cpu)"  # type: ignore[attr-defined]
    elif applied is not None:
        run.q3n_cuda_graphs = (  # type: ignore[attr-defined]
            "applied: Inductor's CUDA graph trees (weights and static inputs at their address)"
            if applied else
            "requested; not applied: Inductor declined to capture this graph (run with "
            "TORCH_LOGS=perf_hints to see its reason, e.g. a CPU tensor or an input mutated in place "
            "that is not marked static)"
        )
    return run


def _storages(tensors: list[Any]) -> set[int]:
    return {a.untyped_storage().data_ptr() for a in tensors if isinstance(a, torch.Tensor)}


def _outputs_to_copy(outputs: Any, storages: set[int]) -> list[bool]:
    """Per output: True where it must be copied out of the CUDA graph's memory pool, which the
    next replay overwrites (as q3n's own capture does: a result stays valid however many calls
    follow); False for an output that is an input's storage (`storages`: a written cache is the
    caller's tensor) or not a tensor."""
    outs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages for t in outs]


def _copied(outputs: Any, copy_out: list[bool]) -> Any:
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(t.clone() if c else t for t, c in zip(outputs, copy_out))
    return outputs.clone() if copy_out[0] else outputs


def _static_input_indices(n_inputs: int, n_constants: int) -> list[int]:
    """Graph inputs CUDA graphs may use at their address: the ones Dynamo and AOTAutograd marked
    static (parameters, buffers, tensors given to ``torch._dynamo.mark_static_address``) and the
    constants the passes created, appended after the inputs. Anything else is copied into the
    graph's own buffers before each replay."""
    from torch._guards import TracingContext

    context = TracingContext.try_get()
    marked = list(context.fw_metadata.static_input_indices) if context and context.fw_metadata else []
    return sorted({*(i for i in marked if i < n_inputs), *range(n_inputs, n_inputs + n_constants)})


def _constants_as_inputs(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """A copy of `gm` whose tensor get_attr nodes are placeholders after the real inputs."""
    constant_nodes = [
        n for n in gm.graph.nodes
        if n.op == "get_attr" and isinstance(_fetch_attr(gm, n.target), torch.Tensor)
    ]
    if not constant_nodes:
        return gm, []
    graph = copy.deepcopy(gm.graph)
    last_placeholder = None
    for node in graph.nodes:
        if node.op == "placeholder":
            last_placeholder = node
    constants = []
    by_name = {n.name: n for n in graph.nodes}
    for original in constant_nodes:
        node = by_name[original.name]
        if last_placeholder is None:
            with graph.inserting_before(next(iter(graph.nodes))):
                placeholder = graph.placeholder(f"q3n_const_{len(constants)}")
        else:
            with graph.inserting_after(last_placeholder):
                placeholder = graph.placeholder(f"q3n_const_{len(constants)}")
        placeholder.meta.update(node.meta)
        node.replace_all_uses_with(placeholder)
        graph.erase_node(node)
        last_placeholder = placeholder
        constants.append(_fetch_attr(gm, original.target))
    return torch.fx.GraphModule(gm, graph), constants


def _fetch_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


# Relative tolerance of a verified graph against the captured one, by output dtype. A rewrite may
# reorder reductions (attention's online softmax, fused GEMMs): the bound is a few units of the
# dtype's precision over the output's scale, not bit-equality.
VERIFY_RTOL = {
    torch.float64: 1e-9,
    torch.float32: 2e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 4e-2,
}


# Lossy rewrites (quantization, block-sparse attention) change outputs by design; verification
# then bounds the relative L2 error of each output instead: quantization noise passes, a broken
# kernel (errors of order 1) does not.
LOSSY_VERIFY_REL_L2 = 0.3


def verify_outputs(expected: Sequence[Any], actual: Sequence[Any], lossy: bool = False) -> str | None:
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
        if lossy:
            rel = ((want64 - got64)[finite].norm() / want64[finite].norm().clamp_min(1e-30)).item()
            if not rel <= LOSSY_VERIFY_REL_L2:
                return f"output {i}: relative L2 error {rel:.3g} > {LOSSY_VERIFY_REL_L2} (lossy rewrites)"
            continue
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
