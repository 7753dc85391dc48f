"""The planned executor: generated code writing into one arena, and CUDA graphs on static addresses.

Route. The memory plan (``gm.meta["q3n_memory_plan"]``) is turned into a second FX graph once, at
compile time: it takes one more argument, ``q3n_arena_outs`` (a list of tensors, each a view of
the arena with the size, strides and dtype of one planned value's FakeTensor), and each planned
node calls its writer on its slot — ``aten.mm.out(a, b, out=q3n_arena_outs[7])``, or a
hand-written writer such as ``copy_into(q3n_arena_outs[3], x)`` for ``clone``. FX generates
Python from it, so a call costs what the unplanned graph's generated Python costs, plus one list
look-up per planned node. (An ``fx.Interpreter`` doing the same is several times slower per node
on CPU; see the memory tests' notes / the report to the lead.)

Arena and views. Per device, the arena is one ``uint8`` tensor. The list of views for one set of
concrete sizes is built once and cached with the arena, so a call with sizes seen before does no
per-node work besides the writers. Under dynamic shapes each length's sizes select a bucket (the
symbols' values rounded up to a power of two, or to ``memory_buckets``); the bucket's plan is
made on first use (verified, cached) at the bucket's upper bound, and the arena grows to the
largest bucket used (it is reallocated, never shrunk: the memory held is the largest bucket's
arena, not the sum over buckets). If a length's sizes exceed its bucket's plan (a size that is
not monotone in the symbols), that length gets its own exact plan. No recompile happens.

Outputs are never planned (the liveness analysis excludes every storage an output may alias), so
what a call returns is its own memory; the arena is only reused for intermediates.

Threads. Arenas live in a pool: a call takes a free arena set (or creates one when every set is
in use by a concurrent call) and gives it back when it returns. Two threads calling at once thus
run on different arenas, concurrently, and the memory held is one arena per call that actually
overlapped. On CUDA, a set reused from another stream first makes the new stream wait for the
old one. With CUDA graphs, calls are serialised by a lock instead (the captured graphs bake in
one arena's addresses).

CUDA graphs (``cuda_graphs=True`` / ``mode="reduce-overhead"``, CUDA only): per input signature
(shapes, strides, dtypes of the non-constant inputs, and int arguments) the first call runs
normally (warm-up), the second captures the graph into a pool shared by this graph's captures
and replays it, later calls copy their inputs into the captured static buffers and replay.
Weights are used in place; if one moves (its data pointer changes) or the arena grows, the graph
is captured again. Outputs are cloned out of the graph's static outputs, so a result is never
overwritten by a later call. Graphs that mutate an input or return an alias of an input are not
captured, nor are signatures whose capture fails (the reason is logged and reported).
"""

from __future__ import annotations

import copy
import logging
import operator
import threading
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch

from ..runtime import direct_kernel_calls
from . import timeline
from .liveness import PLAN_KEY, BucketPlan, GraphMemoryPlan, analyze, unplanned_reasons

log = logging.getLogger("q3n")

OUTS_ARG = "q3n_arena_outs"
THREADING = (
    "a pool of arena sets: each call takes a free one (a new one if all are in use) and returns it; "
    "concurrent calls never share an arena"
)
MAX_VIEW_SETS = 64
MAX_EXACT_KEYS = 1024
MAX_CUDA_GRAPHS = 32


def build_planned_module(gm: torch.fx.GraphModule, plan: GraphMemoryPlan) -> torch.fx.GraphModule:
    """A copy of `gm` whose planned nodes write into ``q3n_arena_outs[i]`` (its last argument)."""
    graph = copy.deepcopy(gm.graph)
    if type(graph._codegen) is not torch.fx.graph.CodeGen:
        raise RuntimeError(f"the graph has its own code generator ({type(graph._codegen).__name__})")
    nodes = {n.name: n for n in graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(next(iter(graph.nodes)))
    with anchor:
        outs = graph.placeholder(OUTS_ARG)
    for v in plan.spec.values:
        node = nodes.get(v.node)
        if node is None:
            raise RuntimeError(f"planned node {v.node} is not in the graph (the graph changed after planning)")
        if v.inplace_arg is not None:
            slot = nodes[v.inplace_arg]  # the dying input itself (see Value.inplace_arg)
        else:
            with graph.inserting_before(node):
                slot = graph.call_function(operator.getitem, (outs, v.index))
        node.target = v.writer.target
        if v.writer.kind == "out":
            node.kwargs = {**node.kwargs, "out": slot}
        else:
            node.args = (slot, *node.args)
    graph.lint()
    return torch.fx.GraphModule(gm, graph)


class _ArenaSet:
    """One arena per device, the typed views of it, and the cached lists of slot views."""

    def __init__(self) -> None:
        self.arenas: dict[str, torch.Tensor] = {}
        self.pointers: dict[str, int] = {}
        self.typed: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self.views: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
        self.streams: dict[str, Any] = {}
        self.generation = 0

    def ensure(self, need: dict[str, int]) -> None:
        grown = [d for d, n in need.items() if n and (d not in self.arenas or self.arenas[d].numel() < n)]
        if not grown:
            return
        # Drop every view of the old arenas first, so their memory is free for the new ones.
        self.views.clear()
        self.typed.clear()
        for d in grown:
            self.arenas.pop(d, None)
            self.arenas[d] = torch.empty(need[d], dtype=torch.uint8, device=d)
            self.pointers[d] = self.arenas[d].untyped_storage().data_ptr()
        self.generation += 1

    def typed_view(self, device: str, dtype: torch.dtype) -> torch.Tensor:
        t = self.typed.get((device, dtype))
        if t is None:
            t = self.typed[(device, dtype)] = self.arenas[device].view(dtype)
        return t

    def check(self) -> None:
        for d, ptr in self.pointers.items():
            if self.arenas[d].untyped_storage().data_ptr() != ptr:
                raise RuntimeError(
                    "q3n memory plan: the arena's storage moved during a call (an op resized its out= "
                    "slice); this is a q3n bug — rerun with memory_plan=False and report it"
                )

    def enter(self, cuda_devices: Sequence[str]) -> None:
        for d in cuda_devices:
            last = self.streams.get(d)
            if last is not None:
                current = torch.cuda.current_stream(d)
                if current != last:
                    current.wait_stream(last)

    def leave(self, cuda_devices: Sequence[str]) -> None:
        for d in cuda_devices:
            self.streams[d] = torch.cuda.current_stream(d)


class _ArenaPool:
    def __init__(self) -> None:
        self._free: list[_ArenaSet] = []
        self._lock = threading.Lock()
        self.created = 0

    def acquire(self) -> _ArenaSet:
        with self._lock:
            if self._free:
                return self._free.pop()
            self.created += 1
        return _ArenaSet()

    def release(self, arenas: _ArenaSet) -> None:
        with self._lock:
            self._free.append(arenas)


class MemoryRuntime:
    """Runs one compiled graph: planned (arena) or not, with or without CUDA graphs."""

    def __init__(self, gm: torch.fx.GraphModule, plan: GraphMemoryPlan | None, *, cuda_graphs: bool,
                 static_inputs: Sequence[str] = (), direct: bool = False):
        self.plan = plan
        self.spec = plan.spec if plan is not None else None
        self.planned = plan is not None and bool(plan.spec.values)
        self.module = build_planned_module(gm, plan) if self.planned else gm
        # What runs: the module with its q3n kernel ops called directly (`direct`, inference
        # graphs); self.module stays as planned, for the dump.
        self.forward = (direct_kernel_calls(self.module) if direct else self.module).forward
        self._lock = threading.Lock()
        self.pool = _ArenaPool()
        self._exact: OrderedDict[tuple, tuple[BucketPlan, list]] = OrderedDict()
        self._report: dict[str, Any] | None = None
        self._dumper = None
        self._dumped: set[tuple] = set()
        self._reported: set[tuple] = set()
        if self.planned:
            where = {s: (i, d) for s, i, d in self.spec.bindings}
            self._readers = [where[s] for s in self.spec.symbols]
            self._cuda_devices = sorted({str(v.device) for v in self.spec.values if v.device.type == "cuda"})
        else:
            self._readers, self._cuda_devices = [], []
        self.graphs: _CudaGraphs | None = None
        self.cuda_graphs_status = "off"
        if cuda_graphs:
            self._setup_cuda_graphs(gm, static_inputs)

    # ---- sizes and plans ----

    def key(self, args: Sequence[Any]) -> tuple:
        return tuple(int(args[i]) if d is None else args[i].shape[d] for i, d in self._readers)

    def resolve(self, key: tuple) -> tuple[BucketPlan, list]:
        hit = self._exact.get(key)
        if hit is not None:
            return hit
        with self._lock:
            hit = self._exact.get(key)
            if hit is not None:
                return hit
            spec = self.spec
            values = dict(zip(spec.symbols, key))
            layouts = spec.evaluate(values)
            plan = self.plan.plan_for(values)
            if any(layouts[v.index][2] > plan.group_sizes[v.group] for v in spec.values):
                plan = self.plan.plan_for(values, exact=True)
            self._announce(plan)
            hit = (plan, layouts)
            self._exact[key] = hit
            if len(self._exact) > MAX_EXACT_KEYS:
                self._exact.popitem(last=False)
            return hit

    def views(self, arenas: _ArenaSet, key: tuple) -> list[torch.Tensor]:
        plan, layouts = self.resolve(key)
        arenas.ensure(plan.arena_bytes)
        views = []
        for v in self.spec.values:
            sizes, strides, _ = layouts[v.index]
            base = arenas.typed_view(str(v.device), v.dtype)
            views.append(base.as_strided(sizes, strides, plan.offsets[v.group] // base.element_size()))
        arenas.views[key] = views
        if len(arenas.views) > MAX_VIEW_SETS:
            arenas.views.popitem(last=False)
        return views

    # ---- calls ----

    def run_with(self, args: Sequence[Any], arenas: _ArenaSet) -> Any:
        key = self.key(args) if self._readers else ()
        views = arenas.views.get(key)
        if views is None:
            views = self.views(arenas, key)
        result = self.forward(*args, views)
        arenas.check()
        return result

    def __call__(self, args: list[Any]) -> Any:
        if self.graphs is not None:
            return self.graphs(args)
        if not self.planned:
            return self.forward(*args)
        arenas = self.pool.acquire()
        try:
            if self._cuda_devices:
                arenas.enter(self._cuda_devices)
            result = self.run_with(args, arenas)
            if self._cuda_devices:
                arenas.leave(self._cuda_devices)
            return result
        finally:
            self.pool.release(arenas)

    # ---- CUDA graphs ----

    def _setup_cuda_graphs(self, gm: torch.fx.GraphModule, static_inputs: Sequence[str]) -> None:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        devices = set()
        for n in gm.graph.nodes:
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor):
                devices.add(val.device.type)
        if "cuda" not in devices:
            where = ", ".join(sorted(devices)) or "no tensors"
            self.cuda_graphs_status = f"requested; only applies on CUDA (this graph runs on {where})"
            return
        if not torch.cuda.is_available():
            self.cuda_graphs_status = "requested; not applied: CUDA is not available"
            return
        spec = self.spec if self.spec is not None else analyze(gm, inplace=False)
        if spec.outputs_alias_inputs:
            self.cuda_graphs_status = "requested; not applied: an output aliases an input"
            return
        static = {i for i, n in enumerate(placeholders) if n.name in set(static_inputs)}
        # A mutated input (a static KV cache) must be written where the caller holds it, so the
        # capture uses it in place, like a weight: its address is part of the replay key, and a
        # cache at a new address is captured again (not copied into a static buffer and lost).
        static |= set(spec.mutated_inputs)
        self.graphs = _CudaGraphs(self, static)
        self.cuda_graphs_status = (
            "on: per input signature, the second call captures and later calls replay "
            "(inputs copied into static buffers, outputs cloned"
            + ("; mutated inputs used in place, keyed by address)" if spec.mutated_inputs else ")")
        )

    # ---- report and dumps ----

    def attach(self, report: dict[str, Any], dumper: Any) -> None:
        """Fill ``report["memory"]`` and write the dump files; later buckets are added as planned."""
        self._report = report
        self._dumper = dumper
        if self.graphs is not None and isinstance(report.get("runtime"), dict):
            report["runtime"]["cuda_graph_stats"] = self.graphs.stats()
        if dumper is not None and self.planned:
            files = {"memory_planned_graph.py": self.module.code}
            dumper.memory_files(files)
        if self.plan is not None:
            for plan in list(self.plan.plans.values()):
                self._write(plan)

    def report_section(self, status_entry: dict[str, Any]) -> dict[str, Any]:
        if self.plan is None:
            return {"status": status_entry.get("status", "not run")}
        spec = self.spec
        compile_plan = self.plan.plans[self.plan.compile_key]
        out: dict[str, Any] = {"status": "applied"}
        out.update(compile_plan.figures(spec))
        out["unplanned_reasons"] = unplanned_reasons(spec)
        out["dynamic"] = spec.dynamic
        out["bucketing"] = self.plan.buckets if self.plan.buckets is not None else "powers of two"
        plans = list(self.plan.plans.values())
        self._reported.update((p.exact, p.key) for p in plans)
        out["buckets"] = [p.figures(spec) for p in plans]
        out["executor"] = "generated Python: out= writers into arena slices" if self.planned else "no planned values"
        out["threading"] = THREADING if self.graphs is None else "CUDA graphs: calls serialised by a lock"
        return out

    def _note_cuda_graphs(self, graphs: "_CudaGraphs") -> None:
        if self._report is None:
            return
        from ..report import _lock as report_lock

        with report_lock:
            runtime = self._report.get("runtime")
            if isinstance(runtime, dict):
                runtime["cuda_graph_stats"] = graphs.stats()

    def _announce(self, plan: BucketPlan) -> None:
        if self._report is None or (plan.exact, plan.key) in self._reported:
            return
        self._reported.add((plan.exact, plan.key))
        from ..report import _lock as report_lock

        with report_lock:
            memory = self._report.get("memory")
            if isinstance(memory, dict) and isinstance(memory.get("buckets"), list):
                memory["buckets"].append(plan.figures(self.spec))
        self._write(plan)

    def _write(self, plan: BucketPlan) -> None:
        dumper = self._dumper
        ident = (plan.exact, plan.key)
        if dumper is None or ident in self._dumped:
            return
        self._dumped.add(ident)
        try:
            suffix = ""
            if plan.key != self.plan.compile_key or plan.exact:
                suffix = "_" + "_".join(f"{s}={v}" for s, v in plan.symbol_values.items()) + ("_exact" if plan.exact else "")
            files: dict[str, Any] = {f"memory_plan{suffix}.txt": timeline.plan_text(self.spec, plan)}
            devices = sorted(plan.arena_bytes)
            for d in devices:
                name = f"memory_timeline{suffix}.png" if len(devices) == 1 else f"memory_timeline{suffix}_{d.replace(':', '')}.png"
                files[name] = timeline.plan_png(self.spec, plan, d)
            dumper.memory_files(files)
        except Exception as err:  # a dump must never cost the user the call
            log.warning("q3n: could not write the memory plan dump: %s", err, exc_info=True)


class _Captured:
    def __init__(self, graph, buffers, outputs, static_ptrs, generation):
        self.graph = graph
        self.buffers = buffers
        self.outputs = outputs
        self.static_ptrs = static_ptrs
        self.generation = generation


class _CudaGraphs:
    def __init__(self, runtime: MemoryRuntime, static_positions: set[int]):
        self.rt = runtime
        self.static = static_positions
        self.arenas = _ArenaSet()
        self.lock = threading.Lock()
        self.graphs: dict[tuple, _Captured] = {}
        self.warm: set[tuple] = set()
        self.failed: dict[tuple, str] = {}
        self.mempool = None
        self.captures = 0
        self.replays = 0
        self._last_stream = None

    def _signature(self, args: Sequence[Any]) -> tuple:
        sig = []
        for i, a in enumerate(args):
            if i in self.static:
                continue
            if isinstance(a, torch.Tensor):
                sig.append((tuple(a.shape), a.stride(), a.dtype, a.device))
            elif isinstance(a, (int, float, bool)) or a is None:
                sig.append(a)
            else:
                sig.append(type(a))
        return tuple(sig)

    def _eager(self, args: Sequence[Any]) -> Any:
        if self.rt.planned:
            return self.rt.run_with(args, self.arenas)
        return self.rt.module.forward(*args)

    def _capture(self, args: Sequence[Any]) -> _Captured:
        static_args = list(args)
        buffers: dict[int, torch.Tensor] = {}
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and i not in self.static:
                if a.device.type != "cuda":
                    raise RuntimeError(f"input {i} is a {a.device.type} tensor")
                buf = torch.empty_strided(a.size(), a.stride(), dtype=a.dtype, device=a.device)
                buf.copy_(a)
                static_args[i] = buf
                buffers[i] = buf
        if self.rt.planned:  # the arena and its views exist before capture starts
            key = self.rt.key(static_args) if self.rt._readers else ()
            if key not in self.arenas.views:
                self.rt.views(self.arenas, key)
        # Weights on the GPU are used in place and must not move. Module float attributes arrive
        # as fresh 0-d CPU tensors each call (Dynamo's unspecialised floats): constants to q3n,
        # baked into the capture by value, so their addresses are not part of the key.
        static_ptrs = [(i, a.data_ptr()) for i, a in enumerate(args)
                       if i in self.static and isinstance(a, torch.Tensor) and a.is_cuda]
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=self.mempool, capture_error_mode="thread_local"):
            outputs = self._eager(static_args)
        return _Captured(graph, buffers, outputs, static_ptrs, self.arenas.generation)

    def _replay(self, cap: _Captured, args: Sequence[Any]) -> Any:
        for i, buf in cap.buffers.items():
            a = args[i]
            if a.data_ptr() != buf.data_ptr():
                buf.copy_(a)
        cap.graph.replay()
        self.replays += 1
        outs = cap.outputs
        cloned = [o.clone() if isinstance(o, torch.Tensor) else o for o in outs]
        return type(outs)(cloned) if isinstance(outs, (tuple, list)) else cloned[0]

    def __call__(self, args: list[Any]) -> Any:
        with self.lock:
            current = torch.cuda.current_stream()
            if self._last_stream is not None and self._last_stream != current:
                current.wait_stream(self._last_stream)
            try:
                return self._call(args)
            finally:
                self._last_stream = torch.cuda.current_stream()

    def _call(self, args: list[Any]) -> Any:
        sig = self._signature(args)
        cap = self.graphs.get(sig)
        if cap is not None:
            if cap.generation == self.arenas.generation and all(
                args[i].data_ptr() == p for i, p in cap.static_ptrs
            ):
                return self._replay(cap, args)
            del self.graphs[sig]  # a weight moved or the arena grew: capture again
        if sig in self.failed or len(self.graphs) >= MAX_CUDA_GRAPHS:
            return self._eager(args)
        if sig not in self.warm:
            self.warm.add(sig)
            return self._eager(args)
        try:
            cap = self._capture(args)
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            self.failed[sig] = reason
            log.warning("q3n: CUDA graph capture failed; this input signature runs without it: %s", reason)
            self.rt._note_cuda_graphs(self)
            return self._eager(args)
        self.graphs[sig] = cap
        self.captures += 1
        self.rt._note_cuda_graphs(self)
        return self._replay(cap, args)

    def stats(self) -> dict[str, Any]:
        return {"captured": self.captures, "graphs": len(self.graphs), "failed": sorted(set(self.failed.values()))}



# ------------------------------------------------------------------------------------------
# Glue used by runtime.py / backend.py
# ------------------------------------------------------------------------------------------


def planned_executor(
    gm: torch.fx.GraphModule,
    guard: Any,
    *,
    cuda_graphs: bool,
    static_inputs: Sequence[str] = (),
    strict: bool = False,
    fallbacks: list[dict[str, str]] | None = None,
    direct: bool = False,
) -> Callable | None:
    """The executor for a graph with a memory plan and/or CUDA graphs; None when neither applies
    (or, unless `strict`, when building it failed: recorded in `fallbacks`). `direct`: call the
    q3n kernel ops' Python implementations directly (inference graphs; runtime.direct_kernel_calls)."""
    plan = gm.meta.get(PLAN_KEY)
    if plan is None and not cuda_graphs:
        return None
    try:
        rt = MemoryRuntime(gm, plan, cuda_graphs=cuda_graphs, static_inputs=static_inputs,
                           direct=direct)
    except Exception as err:
        if strict:
            raise
        log.warning("q3n: could not build the planned executor; running the graph unplanned.", exc_info=True)
        if fallbacks is not None:
            fallbacks.append({"stage": "executor", "reason": f"memory plan runtime failed: {type(err).__name__}: {err}"})
        return None

    if guard:
        def run(args: list[Any]) -> Any:
            guard.check(args)
            return rt(args)
    else:
        def run(args: list[Any]) -> Any:
            return rt(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    run.q3n_memory = rt  # type: ignore[attr-defined]
    return run


def memory_report(compiled: Any, passes: dict[str, Any]) -> dict[str, Any]:
    """``report["memory"]``: the plan's figures when the compiled graph runs planned, else why not."""
    entry = passes.get("memory_plan", {})
    rt = getattr(compiled, "q3n_memory", None)
    if rt is not None and rt.plan is not None:
        return rt.report_section(entry)
    out: dict[str, Any] = {"status": entry.get("status", "not run")}
    detail = entry.get("detail") or {}
    reason = detail.get("reason") or detail.get("error")
    if entry.get("status") == "applied":
        out["status"] = "not used"
        reason = "the compiled graph runs without its plan (see fallbacks)"
    if reason:
        out["reason"] = reason
    return out


def cuda_graphs_status(compiled: Any, config: Any) -> str:
    if not getattr(config, "cuda_graphs", False):
        return "off"
    inductor_status = getattr(compiled, "q3n_cuda_graphs", None)
    if inductor_status is not None:
        return inductor_status
    rt = getattr(compiled, "q3n_memory", None)
    if rt is None:
        return "requested; not applied: the graph runs on the fallback executor"
    return rt.cuda_graphs_status


def attach(compiled: Any, report: dict[str, Any], dumper: Any) -> None:
    rt = getattr(compiled, "q3n_memory", None)
    if rt is not None:
        rt.attach(report, dumper)
