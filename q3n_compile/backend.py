"""The `q3n` torch.compile backend: capture, the pass pipeline, the executor, the report.

``torch.compile(model, backend="q3n", options={...}, mode=...)`` reaches :func:`q3n_backend` through
the ``torch_dynamo_backends`` entry point. For each Dynamo graph:

1. AOTAutograd captures a functional ATen graph with FakeTensor metadata on every node; shape
   symbols stay symbolic, so dynamic lengths do not recompile.
2. In inference (no input needs a gradient) every pass runs; a graph that needs gradients gets no
   inference-only pass, its backward runs as captured, and the report says so.
3. The executor named by the config runs the result; with ``verify=True`` the result is first
   compared with the captured graph on the example inputs, and q3n falls back to the captured graph
   (with a warning) if they disagree.
4. One report per graph is published (``q3n_compile.reports()``) and, if asked, dumped.

Guarantee: a user's model does not break because q3n could not handle something; every such case
is a recorded fallback, unless ``strict=True`` asked for an error.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import warnings
from typing import Any, Callable, Sequence

import torch
from torch._dynamo.source import AttrSource
from torch._functorch.aot_autograd import aot_module_simplified
from torch._subclasses.fake_tensor import unset_fake_temporarily

from . import __version__
from .config import Q3NConfig
from .dump import GraphDumper
from .memory.arena_runtime import attach as attach_memory
from .memory.arena_runtime import cuda_graphs_status, memory_report
from .passes.base import PassContext
from .passes.matching import written_placeholders
from .pipeline import run_pipeline
from .quant.config import wants_example_inputs
from .report import next_graph_id, op_counts, publish
from .runtime import FrozenWeightGuard, below_autograd, inductor_executor, q3n_executor, verify_outputs

log = logging.getLogger("q3n")


def q3n_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Callable:
    """Dynamo backend entry: ``torch.compile(model, backend="q3n", mode=..., options=...)``."""
    config = Q3NConfig.from_options(options, mode=mode)
    static_values = _static_values(gm, example_inputs)
    float_inputs = _float_attribute_inputs(gm, example_inputs)
    # The first call's real inputs are kept only until the graph is compiled, and only when
    # verify=True or quantization (calibrating on them, see q3n_compile.quant.calibration) needs
    # them: holding activations for the model's lifetime would leak memory.
    real_inputs = _own_parameters(gm) + list(example_inputs)
    n_inputs = len(real_inputs)
    if not (config.verify or wants_example_inputs(config.quant_config)):
        real_inputs.clear()

    def inference_compiler(graph: torch.fx.GraphModule, args: Sequence[Any]) -> Callable:
        try:
            return _compile_graph(graph, args, n_inputs, real_inputs, static_values, config,
                                  inference=True, float_inputs=float_inputs)
        finally:
            real_inputs.clear()

    def forward_compiler(graph: torch.fx.GraphModule, args: Sequence[Any]) -> Callable:
        try:
            return _compile_graph(graph, args, n_inputs, real_inputs, static_values, config,
                                  inference=False, float_inputs=float_inputs)
        finally:
            real_inputs.clear()

    def backward_compiler(graph: torch.fx.GraphModule, args: Sequence[Any]) -> Callable:
        if config.executor == "inductor":
            return inductor_executor(graph, args, FrozenWeightGuard({}), is_backward=True)
        return q3n_executor(graph, FrozenWeightGuard({}))

    return aot_module_simplified(
        gm,
        example_inputs,
        fw_compiler=forward_compiler,
        bw_compiler=backward_compiler,
        inference_compiler=inference_compiler,
        # Mutated inputs (a static KV cache written with index_copy_) are written in place by the
        # graph itself: without this AOTAutograd returns the whole new cache as an output and
        # copies it back every call, which costs decode a full cache copy per step.
        keep_inference_input_mutations=True,
    )


def _compile_graph(
    graph: torch.fx.GraphModule,
    fake_args: Sequence[Any],
    n_inputs: int,
    real_inputs: Sequence[Any],
    static_by_position: dict[int, torch.Tensor],
    config: Q3NConfig,
    inference: bool,
    float_inputs: Sequence[str] = (),
) -> Callable:
    graph_id = next_graph_id()
    started = time.perf_counter()
    executor, executor_reason = config.resolve_executor(_devices(fake_args))
    config = dataclasses.replace(config, executor=executor)
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    # AOTAutograd keeps Dynamo's argument order unless it had to deduplicate or merge aliased
    # inputs; then positions no longer line up and no weight is treated as a constant.
    aligned = len(placeholders) == n_inputs
    static_values = (
        {placeholders[i].name: t for i, t in static_by_position.items()} if aligned else {}
    )
    # A buffer the graph writes (a cache registered on the module) is state, not a weight: it
    # must never be folded as a constant.
    for i in written_placeholders(graph):
        static_values.pop(placeholders[i].name, None)
    fallbacks: list[dict[str, str]] = []
    if not aligned:
        fallbacks.append({
            "stage": "capture",
            "reason": "AOTAutograd changed the input list (duplicated or aliased inputs); "
            "weights are not treated as constants in this graph",
        })
    # The verifier needs the graph as captured; constants are shared, only the node list is copied.
    captured = torch.fx.GraphModule(graph, copy.deepcopy(graph.graph)) if config.verify else None
    dumper = GraphDumper(config.dump_dir, graph_id) if config.dump_dir else None
    if dumper:
        dumper.captured(graph)

    ctx = PassContext(
        config=config,
        graph_id=graph_id,
        inference=inference,
        example_inputs=fake_args,
        static_values=static_values,
        real_inputs=[_concrete(a) for a in real_inputs] if aligned and real_inputs else None,
    )
    passes = run_pipeline(graph, ctx, on_pass_done=dumper.after_pass if dumper else None)
    # Positions only where the inputs line up with the placeholders (else nothing is frozen).
    guard = FrozenWeightGuard(ctx.frozen, {n.name: i for i, n in enumerate(placeholders)}
                              if aligned else None)

    executor = config.executor
    compiled = _run_executor(graph, fake_args, guard, config, fallbacks, static_values,
                             direct=inference)
    if compiled is None:
        executor = "q3n"
        compiled = q3n_executor(graph, guard, direct=inference)

    verify = None
    if config.verify:
        lossy = _lossy_rewrites(passes, config)
        verify, compiled = _verify(captured, compiled, real_inputs, aligned, fallbacks, lossy)

    report = {
        "graph_id": graph_id,
        "q3n_version": __version__,
        "torch_version": torch.__version__,
        "inference": inference,
        "training_note": None
        if inference
        else "the graph needs gradients: compiled without the inference-only passes",
        "executor": executor,
        "executor_reason": executor_reason,
        "options": config.as_dict(),
        "inputs": [_describe_input(a) for a in fake_args],
        "dynamic_symbols": sorted(_free_symbols(fake_args)),
        "passes": passes,
        "ops": op_counts(graph),
        "runtime": {
            "cuda_graphs": cuda_graphs_status(compiled, config),
            "frozen_weights": sorted(ctx.frozen),
            **({"float_inputs": {"names": list(float_inputs), "note": FLOAT_INPUTS_NOTE}}
               if float_inputs else {}),
        },
        "fallbacks": fallbacks,
        "memory": memory_report(compiled, passes),
        "verify": verify,
        "compile_time_s": round(time.perf_counter() - started, 4),
        "dump_dir": str(dumper.folder) if dumper else None,
    }
    attach_memory(compiled, report, dumper)  # memory dump files; later buckets add to the report
    publish(report)
    if dumper:
        dumper.final(graph, report)
    return below_autograd(compiled) if inference else compiled


def _run_executor(
    graph: torch.fx.GraphModule,
    fake_args: Sequence[Any],
    guard: FrozenWeightGuard,
    config: Q3NConfig,
    fallbacks: list[dict[str, str]],
    static_values: dict[str, torch.Tensor] | None = None,
    direct: bool = False,
) -> Callable | None:
    if config.executor == "q3n":
        return q3n_executor(graph, guard, config=config, static_inputs=sorted(static_values or {}),
                            fallbacks=fallbacks, direct=direct)
    try:
        return inductor_executor(graph, fake_args, guard, autotune=config.autotune,
                                 cuda_graphs=config.cuda_graphs)
    except Exception as err:
        if config.strict:
            raise
        log.warning("q3n: Inductor could not compile the rewritten graph; running it as Python.", exc_info=True)
        fallbacks.append({"stage": "executor", "reason": f"inductor failed: {type(err).__name__}: {err}"})
        return None


def _lossy_rewrites(passes: dict[str, dict[str, Any]], config: Q3NConfig) -> bool:
    quantized = passes.get("quantize", {}).get("rewritten", 0) > 0
    sparse = config.attention == "sparse" and passes.get("attention", {}).get("rewritten", 0) > 0
    return quantized or sparse


def _verify(
    captured: torch.fx.GraphModule,
    compiled: Callable,
    real_inputs: Sequence[Any],
    aligned: bool,
    fallbacks: list[dict[str, str]],
    lossy: bool,
) -> tuple[dict[str, Any], Callable]:
    if not aligned:
        return {"status": "skipped", "reason": "inputs could not be matched to real values"}, compiled
    args = [_concrete(a) for a in real_inputs]
    # Inputs the graph writes (a KV cache) are given to each run as a copy: the user's tensor must
    # be written once, by the real call, and the two runs must start from the same state. Their
    # final states are compared as outputs too.
    mutated = sorted(written_placeholders(captured))
    # The compiler is called inside AOTAutograd's fake mode; the check must run on real tensors.
    with unset_fake_temporarily(), torch.no_grad():
        def run(fn: Callable) -> list[Any]:
            written = {i: args[i].clone() for i in mutated}
            # A boxed callee empties the list it is given, so the copies are kept apart.
            out = fn([written.get(i, a) for i, a in enumerate(args)])
            out = list(out) if isinstance(out, (list, tuple)) else [out]
            return out + list(written.values())

        expected = run(lambda a: captured(*a))
        actual = run(lambda a: _call_boxed(compiled, a))
        problem = verify_outputs(expected, actual, lossy=lossy)
    if problem is None:
        return {"status": "passed", "lossy": lossy}, compiled
    warnings.warn(
        f"q3n: verify=True found the compiled graph disagrees with the captured one ({problem}); "
        "running the captured graph instead. Rerun with dump_dir set to see what each pass did.",
        stacklevel=2,
    )
    fallbacks.append({"stage": "verify", "reason": problem})
    return {"status": "failed", "reason": problem}, q3n_executor(captured, FrozenWeightGuard({}))


def _call_boxed(fn: Callable, args: list[Any]) -> Any:
    return fn(args) if getattr(fn, "_boxed_call", False) else fn(*args)


def _concrete(value: Any) -> Any:
    if isinstance(value, torch.SymInt):
        return value.node.hint
    return value


def _own_parameters(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """Parameters/buffers held by the Dynamo graph module itself; AOTAutograd puts them first."""
    return [p for _, p in gm.named_parameters(remove_duplicate=False)] + [
        b for _, b in gm.named_buffers(remove_duplicate=False)
    ]


FLOAT_INPUTS_NOTE = (
    "Dynamo passes these Python float attributes (a norm's eps, an attention's scaling) to the "
    "graph as 0-d tensors made on every call (dynamic=True with "
    "torch._dynamo.config.specialize_float=False, torch's default): host time per call before "
    "the graph runs, which a decode step feels. q3n treats them as constants either way; "
    "torch._dynamo.config.specialize_float = True before the first call makes Dynamo bake them "
    "in (and guard on their values) instead.")


def _float_attribute_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[str]:
    """Names of the placeholders that are float attributes Dynamo passes as 0-d tensors."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [node.name for node, value in zip(placeholders, example_inputs)
            if _float_attribute(node, value)]


def _float_attribute(placeholder: torch.fx.Node, value: Any) -> bool:
    """Whether Dynamo made this input from an object's float attribute (a 0-d tensor)."""
    grapharg = placeholder.meta.get("grapharg")
    return (isinstance(value, torch.Tensor) and value.dim() == 0
            and getattr(grapharg, "pass_arg_as_tensor", False)
            and isinstance(getattr(grapharg, "source", None), AttrSource))


def _static_values(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> dict[int, torch.Tensor]:
    """Positions (in AOTAutograd's input order) of the model's compile-time constants.

    Dynamo passes inlined modules' weights as graph inputs; they are recognised by type
    (nn.Parameter) or by where Dynamo found them (a module's `_parameters`/`_buffers`). Under
    dynamic shapes Dynamo also passes float attributes of objects (a norm's eps, an attention's
    scaling) as 0-d tensors instead of constants; those are constants to q3n as well, so a pass
    can read an eps. A float the user passes as an argument stays a variable.
    """
    own = _own_parameters(gm)
    static = {i: t for i, t in enumerate(own)}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor):
            continue
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        name = source.name if source is not None else ""
        name = name() if callable(name) else name
        weight = isinstance(value, torch.nn.Parameter) or "._parameters[" in name or "._buffers[" in name
        if weight or _float_attribute(node, value):
            static[len(own) + i] = value
    return static


def _devices(args: Sequence[Any]) -> set[str]:
    return {a.device.type for a in args if isinstance(a, torch.Tensor)}


def _describe_input(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {list(map(str, value.shape))} on {value.device.type}"
    return f"{type(value).__name__} {value}"


def _free_symbols(args: Sequence[Any]) -> set[str]:
    symbols: set[str] = set()
    for a in args:
        sizes = a.shape if isinstance(a, torch.Tensor) else [a]
        for s in sizes:
            if isinstance(s, torch.SymInt):
                symbols |= {str(x) for x in s.node.expr.free_symbols}
    return symbols
