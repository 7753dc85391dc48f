"""Liveness with alias analysis over an ATen FX graph, and the per-bucket arena plan built on it.

Storages, not values, are what occupy memory. Every tensor value of the graph is mapped to the
storage(s) it may alias:

- placeholders (graph inputs, parameters, buffers) and ``get_attr`` constants own storages that
  never go in the arena;
- an op whose schema marks an argument as aliased (``Tensor(a)`` views such as ``view``,
  ``transpose``, ``expand``, ``split``; ``Tensor(a!)`` mutations such as ``copy_``) aliases that
  argument's storages; so does an op whose FakeTensor result shares its FakeTensor storage with a
  known storage (``_unsafe_view``, whose schema does not say so); ``getitem`` aliases its parent;
- an op we cannot read (not an ATen ``OpOverload``: Python functions, higher-order ops, modules)
  is assumed to alias every tensor it is given, and its result is not planned;
- any other op creates a fresh storage: a candidate for the arena.

A storage is live from the node that creates it to the last use of any value aliasing it (the
positions are those of the final node order). Storages reachable from the graph's outputs are
never planned (the caller keeps them), nor are those of inputs and constants. A fresh storage is
planned when its node can write into given memory (:mod:`.writers`), it is a dense strided tensor
with storage offset 0, and its size uses only symbols bound to input sizes; otherwise it is
allocated as usual and counted as unplanned with its reason.

In-place reuse: an elementwise op (``Tag.pointwise``, an ``out=`` TensorIterator kernel) whose
input dies at that op, has exactly the output's size, strides and dtype, covers its whole storage
and is not also read through another alias by the same op, writes its result into that input's
memory: the two share one arena buffer whose lifetime is the union of theirs.

Sizes are sympy expressions of the shape symbols (bytes spanned by the FakeTensor's sizes and
strides). :func:`make_bucket_plan` evaluates them at a bucket's symbol values, aligns them to 256
bytes and places the buffers with :mod:`.planner`, per device.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import time
from collections import Counter
from typing import Any, Iterable, Sequence

import sympy
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from . import planner
from .writers import Writer, find_writer

PLAN_KEY = "q3n_memory_plan"


@dataclasses.dataclass
class Value:
    """One planned result: the tensor `node` computes, written into an arena slice."""

    index: int
    node: str
    position: int
    op: str
    dtype: torch.dtype
    device: torch.device
    sizes: tuple[sympy.Expr, ...]
    strides: tuple[sympy.Expr, ...]
    nbytes: sympy.Expr
    writer: Writer
    last_use: int
    group: int = -1
    inplace_of: str | None = None
    # The argument node the in-place result overwrites (a view of `inplace_of`'s value, or that
    # value itself): the planned op is given that very tensor as its output, not a second view of
    # the same bytes, because ATen refuses an `out` whose strides differ from an input's over the
    # same memory even where they differ only in size-1 dimensions ("partial overlap").
    inplace_arg: str | None = None


@dataclasses.dataclass
class Group:
    """One arena buffer: a value, or a chain of values each written in place over the one before."""

    index: int
    members: list[int]
    start: int
    end: int
    device: torch.device

    @property
    def name(self) -> str:
        return f"buf{self.index}"


@dataclasses.dataclass
class Unplanned:
    node: str
    op: str
    reason: str
    nbytes: sympy.Expr | None
    device: str
    start: int = 0
    end: int = 0


@dataclasses.dataclass
class MemorySpec:
    """What the memory plan knows about one graph, independent of concrete sizes."""

    order: list[str]
    values: list[Value]
    groups: list[Group]
    unplanned: list[Unplanned]
    outputs: list[Unplanned]
    # Shape symbols the planned sizes use, and where each comes from at run time:
    # (symbol name, placeholder position, dim or None for a SymInt placeholder).
    symbols: list[str]
    bindings: list[tuple[str, int, int | None]]
    hints: dict[str, int]
    # Placeholder positions an op writes into (a static KV cache); empty when nothing is mutated.
    mutated_inputs: list[int]
    outputs_alias_inputs: list[int]

    @property
    def mutates_inputs(self) -> bool:
        return bool(self.mutated_inputs)

    @property
    def dynamic(self) -> bool:
        return bool(self.symbols)

    def evaluate(self, symbol_values: dict[str, int]) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
        """(sizes, strides, nbytes) of every value at concrete symbol values."""
        fn = _evaluator(self)
        return fn(*[symbol_values[s] for s in self.symbols])


# ------------------------------------------------------------------------------------------
# Analysis
# ------------------------------------------------------------------------------------------


def _expr(x: Any) -> sympy.Expr:
    if isinstance(x, torch.SymInt):
        return sympy.sympify(x.node.expr)
    return sympy.Integer(int(x))


def _span_bytes(val: torch.Tensor) -> sympy.Expr:
    """Bytes from the storage's start to the end of the last element (the storage it needs)."""
    span = sympy.Integer(1)
    for size, stride in zip(val.shape, val.stride()):
        span = span + (_expr(size) - 1) * _expr(stride)
    return (span + _expr(val.storage_offset())) * val.element_size()


def _storage_key(val: Any) -> Any:
    try:
        return StorageWeakRef(val.untyped_storage())
    except Exception:
        return None


def _node_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)
    return out


# Ops that return a view of their first argument although their schema does not say so.
_UNANNOTATED_VIEWS = {torch.ops.aten._unsafe_view.default}


def _schema_aliased_args(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """Argument nodes the result may alias per the op's schema; None when there is no schema."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return None
    if target in _UNANNOTATED_VIEWS:
        return [node.args[0]] if isinstance(node.args[0], torch.fx.Node) else []
    aliased: list[torch.fx.Node] = []
    for i, arg in enumerate(target._schema.arguments):
        if arg.alias_info is None:
            continue
        value = node.args[i] if i < len(node.args) and not arg.kwarg_only else node.kwargs.get(arg.name)
        torch.fx.map_arg(value, lambda n: aliased.append(n) or n)
    return aliased


def _is_dense_strided(val: torch.Tensor) -> bool:
    return val.layout == torch.strided and not val.is_quantized and not val.is_nested


def analyze(gm: torch.fx.GraphModule, *, inplace: bool = True) -> MemorySpec:
    """Storages, aliases and lifetimes of `gm`'s tensors; which fresh results can be planned."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    roots: dict[torch.fx.Node, frozenset[int]] = {}
    multi_roots: dict[torch.fx.Node, list[frozenset[int]]] = {}
    kinds: list[str] = []
    creator: list[torch.fx.Node | None] = []
    last_use: list[int] = []
    by_fake: dict[Any, int] = {}

    def new_storage(kind: str, node: torch.fx.Node, val: Any) -> int:
        sid = len(kinds)
        kinds.append(kind)
        creator.append(node)
        last_use.append(position[node])
        key = _storage_key(val)
        if key is not None:
            by_fake.setdefault(key, sid)
        return sid

    def union(args: Iterable[torch.fx.Node]) -> frozenset[int]:
        out: set[int] = set()
        for a in args:
            out |= roots.get(a, frozenset())
        return frozenset(out)

    output_storages: set[int] = set()
    output_nodes: list[torch.fx.Node] = []
    placeholders = [n for n in nodes if n.op == "placeholder"]

    for node in nodes:
        val = node.meta.get("val")
        if node.op in ("placeholder", "get_attr"):
            if isinstance(val, torch.Tensor):
                roots[node] = frozenset({new_storage("input" if node.op == "placeholder" else "const", node, val)})
        elif node.op == "output":
            torch.fx.map_arg(node.args, lambda n: output_nodes.append(n) or n)
            for n in output_nodes:
                output_storages |= roots.get(n, frozenset())
        else:
            args = _node_args(node)
            if node.op == "call_function" and node.target is operator.getitem and node.args[0] in multi_roots:
                parts = multi_roots[node.args[0]]
                idx = node.args[1]
                roots[node] = parts[idx] if isinstance(idx, int) and -len(parts) <= idx < len(parts) else union([node.args[0]])
            elif isinstance(val, torch.Tensor):
                aliased = _schema_aliased_args(node) if node.op == "call_function" else None
                if aliased is None:
                    ids = set(union(args)) | {new_storage("unknown", node, val)}
                else:
                    ids = set(union(aliased))
                    key = _storage_key(val)
                    if key is not None and key in by_fake:
                        ids.add(by_fake[key])
                    if not ids:
                        ids = {new_storage("fresh", node, val)}
                roots[node] = frozenset(ids)
            elif isinstance(val, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in val):
                aliased = _schema_aliased_args(node) if node.op == "call_function" else None
                base = union(args if aliased is None else aliased)
                parts = []
                for v in val:
                    if not isinstance(v, torch.Tensor):
                        parts.append(frozenset())
                        continue
                    ids = set(base)
                    key = _storage_key(v)
                    if key is not None and key in by_fake:
                        ids.add(by_fake[key])
                    if aliased is None or not ids:
                        ids.add(new_storage("multi", node, v))
                    parts.append(frozenset(ids))
                multi_roots[node] = parts
                roots[node] = frozenset().union(*parts)
            elif not isinstance(val, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)):
                # A value we cannot see into (no FakeTensor, or a container a Python function
                # returned): it may alias anything it was given.
                if args:
                    roots[node] = union(args)
        # Every use of any alias keeps all the storages it may alias alive.
        here = position[node]
        for a in _node_args(node):
            for sid in roots.get(a, ()):
                if last_use[sid] < here:
                    last_use[sid] = here

    # ---- which fresh storages get planned ----
    values: list[Value] = []
    unplanned: list[Unplanned] = []
    outputs: list[Unplanned] = []
    value_of_storage: dict[int, int] = {}
    bindable = _bindings(placeholders)
    bound = {b[0] for b in bindable}
    multi_sids: dict[torch.fx.Node, list[int]] = {}
    for sid, kind in enumerate(kinds):
        if kind == "multi":
            multi_sids.setdefault(creator[sid], []).append(sid)
    for sid, kind in enumerate(kinds):
        node = creator[sid]
        if kind in ("input", "const"):
            continue
        val = node.meta.get("val")
        if kind == "multi":
            # A node with several tensor results: counted once, with all its results.
            sids = multi_sids[node]
            if sid != sids[0]:
                continue
            tensor_vals = [v for v in val if isinstance(v, torch.Tensor)]
            nbytes = sum((_span_bytes(v) for v in tensor_vals), sympy.Integer(0))
            is_output = any(x in output_storages for x in sids)
            end = len(nodes) if is_output else max(last_use[x] for x in sids)
            entry = Unplanned(node.name, _op_name(node), "several outputs", nbytes, _device_of(tensor_vals),
                              position[node], end)
            (outputs if is_output else unplanned).append(entry)
            continue
        op = _op_name(node)
        nbytes = _span_bytes(val) if isinstance(val, torch.Tensor) else None
        device = str(val.device) if isinstance(val, torch.Tensor) else "?"
        if sid in output_storages:
            outputs.append(Unplanned(node.name, op, "graph output", nbytes, device, position[node], len(nodes)))
            continue
        reason = None
        writer = None
        if kind == "unknown":
            reason = "op of unknown aliasing"
        elif not _is_dense_strided(val):
            reason = "not a dense strided tensor"
        elif val.device.type not in ("cpu", "cuda"):
            reason = f"device {val.device.type}"
        elif val.storage_offset() != 0:
            reason = "storage offset is not 0"
        else:
            free = {str(s) for s in nbytes.free_symbols}
            for e in (*map(_expr, val.shape), *map(_expr, val.stride())):
                free |= {str(s) for s in e.free_symbols}
            if free - bound:
                reason = "size uses a symbol that is not an input size"
            else:
                writer, reason = find_writer(node, val.device.type)
        if reason is not None:
            unplanned.append(Unplanned(node.name, op, reason, nbytes, device, position[node], last_use[sid]))
            continue
        value_of_storage[sid] = len(values)
        values.append(Value(
            index=len(values),
            node=node.name,
            position=position[node],
            op=op,
            dtype=val.dtype,
            device=val.device,
            sizes=tuple(_expr(s) for s in val.shape),
            strides=tuple(_expr(s) for s in val.stride()),
            nbytes=nbytes,
            writer=writer,
            last_use=last_use[sid],
        ))

    # ---- in-place reuse and arena buffers (groups) ----
    groups: list[Group] = []
    by_name = {n.name: n for n in nodes}
    for v in sorted(values, key=lambda v: v.position):
        node = by_name[v.node]
        target_group = None
        if inplace and v.writer.inplace_ok:
            target_group = _inplace_source(node, v, roots, value_of_storage, values, position, groups)
        if target_group is not None:
            src_value, group, arg = target_group
            v.group = group.index
            v.inplace_of = values[src_value].node
            v.inplace_arg = arg.name
            group.members.append(v.index)
            group.end = max(group.end, v.last_use)
        else:
            g = Group(index=len(groups), members=[v.index], start=v.position, end=v.last_use, device=v.device)
            groups.append(g)
            v.group = g.index

    needed = set()
    for v in values:
        for e in (v.nbytes, *v.sizes, *v.strides):
            needed |= {str(s) for s in e.free_symbols}
    symbols = sorted(needed)
    bindings = [b for b in bindable if b[0] in needed]
    hints = _hints(gm, placeholders, symbols)

    # Input mutation (an op writing into a placeholder's storage) and outputs aliasing inputs
    # matter to CUDA graphs, which copy inputs into static buffers.
    input_storages = {sid for sid, k in enumerate(kinds) if k == "input"}
    mutated: set[int] = set()
    for node in nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            for i, arg in enumerate(node.target._schema.arguments):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    value = node.args[i] if i < len(node.args) and not arg.kwarg_only else node.kwargs.get(arg.name)
                    written: list[torch.fx.Node] = []
                    torch.fx.map_arg(value, lambda n: written.append(n) or n)
                    for sid in union(written) & input_storages:
                        mutated.add(placeholders.index(creator[sid]))
    alias_inputs = sorted({
        i for i, n in enumerate(output_nodes)
        if any(kinds[s] == "input" for s in roots.get(n, ()))
    })
    return MemorySpec(
        order=[n.name for n in nodes],
        values=values,
        groups=groups,
        unplanned=unplanned,
        outputs=outputs,
        symbols=symbols,
        bindings=bindings,
        hints=hints,
        mutated_inputs=sorted(mutated),
        outputs_alias_inputs=alias_inputs,
    )


def _inplace_source(node, v, roots, value_of_storage, values, position, groups):
    """(value index, group, argument node) of a dying input `node` may overwrite with its
    result, or None."""
    here = position[node]
    tensor_args = [a for a in _node_args(node) if a in roots]
    for a in tensor_args:
        ids = roots[a]
        if len(ids) != 1:
            continue
        (sid,) = ids
        src = value_of_storage.get(sid)
        if src is None:
            continue
        sv = values[src]
        if sv.last_use != here or sv.device != v.device:
            continue
        aval = a.meta.get("val")
        if not isinstance(aval, torch.Tensor) or aval.dtype != v.dtype or aval.storage_offset() != 0:
            continue
        if tuple(_expr(s) for s in aval.shape) != v.sizes or tuple(_expr(s) for s in aval.stride()) != v.strides:
            continue
        if sv.nbytes != v.nbytes:
            continue
        if any(b is not a and sid in roots[b] for b in tensor_args):
            continue
        group = groups[sv.group]
        if group.end != here:
            continue
        return src, group, a
    return None


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    return getattr(target, "__qualname__", None) or str(target)


def _device_of(vals: Sequence[torch.Tensor]) -> str:
    return str(vals[0].device) if vals else "?"


def _bindings(placeholders: Sequence[torch.fx.Node]) -> list[tuple[str, int, int | None]]:
    """Where each shape symbol can be read at run time: a SymInt argument or an input's size."""
    out: list[tuple[str, int, int | None]] = []
    seen: set[str] = set()
    for i, node in enumerate(placeholders):
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):
            expr = val.node.expr
            if isinstance(expr, sympy.Symbol) and str(expr) not in seen:
                seen.add(str(expr))
                out.append((str(expr), i, None))
        elif isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt):
                    expr = size.node.expr
                    if isinstance(expr, sympy.Symbol) and str(expr) not in seen:
                        seen.add(str(expr))
                        out.append((str(expr), i, d))
    return out


def _hints(gm: torch.fx.GraphModule, placeholders, symbols: Sequence[str]) -> dict[str, int]:
    """The example inputs' value of each symbol (the compile-time bucket is planned from them)."""
    hints: dict[str, int] = {}
    for node in placeholders:
        val = node.meta.get("val")
        sizes = [val] if isinstance(val, torch.SymInt) else list(val.shape) if isinstance(val, torch.Tensor) else []
        for s in sizes:
            if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                hint = s.node.hint
                if hint is not None:
                    hints[str(s.node.expr)] = int(hint)
        if isinstance(val, torch.Tensor) or isinstance(val, torch.SymInt):
            shape_env = getattr(getattr(val, "node", None), "shape_env", None)
            if shape_env is None and isinstance(val, torch.Tensor):
                fm = getattr(val, "fake_mode", None)
                shape_env = getattr(fm, "shape_env", None)
            if shape_env is not None:
                table = getattr(shape_env, "backed_var_to_val", None)
                if table is None:
                    table = shape_env.var_to_val
                for sym, v in table.items():
                    if str(sym) in symbols and str(sym) not in hints:
                        hints[str(sym)] = int(v)
    return {s: hints[s] for s in symbols if s in hints}


# ------------------------------------------------------------------------------------------
# Concrete sizes
# ------------------------------------------------------------------------------------------

def _tuple_code(items: Sequence[str]) -> str:
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _evaluate_sympy(spec: MemorySpec, vals: Sequence[int]):
    subs = {sym: sympy.Integer(v) for sym, v in zip(_symbols(spec), vals)}
    out = []
    for v in spec.values:
        sizes = tuple(int(e.xreplace(subs)) for e in v.sizes)
        strides = tuple(int(e.xreplace(subs)) for e in v.strides)
        nbytes = max(0, int(v.nbytes.xreplace(subs))) if all(s > 0 for s in sizes) else 0
        out.append((sizes, strides, nbytes))
    return out


def _evaluator(spec: MemorySpec):
    """A function of the symbol values returning every value's (sizes, strides, nbytes).

    Generated Python (sympy's expressions printed by torch's PythonPrinter) so that a new length
    costs microseconds; checked against sympy's own evaluation, which is the fallback."""
    cached = spec.__dict__.get("_evaluator")
    if cached is not None:
        return cached

    def fallback(*vals: int):
        return _evaluate_sympy(spec, vals)

    fn = fallback
    if spec.symbols:
        try:
            from torch.utils._sympy.printers import PythonPrinter

            printer = PythonPrinter()
            params = {name: f"_s{i}" for i, name in enumerate(spec.symbols)}

            def code(e: sympy.Expr) -> str:
                e = e.xreplace({sym: sympy.Symbol(params[str(sym)]) for sym in e.free_symbols})
                return f"int({printer.doprint(e)})"

            rows = []
            for v in spec.values:
                sizes = _tuple_code([code(e) for e in v.sizes])
                strides = _tuple_code([code(e) for e in v.strides])
                rows.append(f"({sizes}, {strides}, max(0, {code(v.nbytes)}) if all(x > 0 for x in {sizes}) else 0)")
            src = (f"def _evaluate({', '.join(params.values())}):\n    return [\n"
                   + "".join(f"        {r},\n" for r in rows) + "    ]\n")
            namespace: dict[str, Any] = {"math": math}
            exec(compile(src, "<q3n memory sizes>", "exec"), namespace)  # noqa: S102 - our own code
            generated = namespace["_evaluate"]
            for probe in ([spec.hints.get(s, 3) for s in spec.symbols], [7 + 2 * i for i in range(len(spec.symbols))]):
                if generated(*probe) != fallback(*probe):
                    raise ValueError("generated size code disagrees with sympy")
            fn = generated
        except Exception:
            fn = fallback
    else:
        fixed = fallback()
        fn = lambda: fixed  # noqa: E731
    spec.__dict__["_evaluator"] = fn
    return fn


def _symbols(spec: MemorySpec) -> list[sympy.Symbol]:
    by_name = {}
    for v in spec.values:
        for e in (v.nbytes, *v.sizes, *v.strides):
            for s in e.free_symbols:
                by_name[str(s)] = s
    return [by_name.get(s, sympy.Symbol(s)) for s in spec.symbols]


def bucket_of(value: int, buckets: Sequence[int] | None) -> int:
    """The bucket upper bound for a symbol's value: the smallest listed bucket that holds it, else
    the next power of two (values of 0 and 1 are their own bucket)."""
    if buckets:
        for b in sorted(buckets):
            if value <= b:
                return int(b)
    if value <= 1:
        return int(value)
    return 1 << (int(value) - 1).bit_length()


# ------------------------------------------------------------------------------------------
# A plan for one bucket
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BucketPlan:
    key: tuple[int, ...]            # the bucket's symbol values, in spec.symbols order
    symbol_values: dict[str, int]
    exact: bool                     # planned at exact values (sizes outgrew the bucket)
    group_sizes: list[int]          # aligned bytes per group
    value_bytes: list[int]          # bytes per value at the bucket's values
    offsets: list[int]              # per group, in its device's arena
    arena_bytes: dict[str, int]     # per device
    lower_bound_bytes: dict[str, int]
    naive_bytes: int
    unplanned_bytes: int
    output_bytes: int
    # Intermediates at their peak (bytes, 256-aligned): with the plan, the arena plus the unplanned
    # values alive at the worst moment; without it, everything alive at the worst moment.
    peak_estimate_bytes: int
    unplanned_peak_estimate_bytes: int
    strategy: dict[str, str]
    tried: int
    plan_time_s: float
    verified: bool
    order_hint: dict[str, list[int]]

    def intervals(self, spec: MemorySpec, device: str | None = None) -> list[planner.Interval]:
        return [
            planner.Interval(g.name, self.group_sizes[g.index], g.start, g.end)
            for g in spec.groups if device is None or str(g.device) == device
        ]

    def figures(self, spec: MemorySpec) -> dict[str, Any]:
        arena = sum(self.arena_bytes.values())
        bound = sum(self.lower_bound_bytes.values())
        inplace = [v for v in spec.values if v.inplace_of is not None]
        return {
            "symbols": dict(self.symbol_values),
            "exact": self.exact,
            "arena_bytes": arena,
            "lower_bound_bytes": bound,
            "naive_bytes": self.naive_bytes,
            "unplanned_bytes": self.unplanned_bytes,
            "output_bytes": self.output_bytes,
            "peak_estimate_bytes": self.peak_estimate_bytes,
            "no_plan_peak_estimate_bytes": self.unplanned_peak_estimate_bytes,
            "ratio": round(arena / bound, 4) if bound else 1.0,
            "planned_count": len(spec.values),
            "buffer_count": len(spec.groups),
            "unplanned_count": len(spec.unplanned),
            "inplace_count": len(inplace),
            "inplace_bytes": sum(self.value_bytes[v.index] for v in inplace),
            "devices": {
                d: {"arena_bytes": self.arena_bytes[d], "lower_bound_bytes": self.lower_bound_bytes[d]}
                for d in sorted(self.arena_bytes)
            },
            "strategy": dict(self.strategy),
            "orders_tried": self.tried,
            "plan_time_s": round(self.plan_time_s, 4),
            "verified": self.verified,
        }


def _concrete(expr: sympy.Expr | None, subs: dict) -> int:
    if expr is None:
        return 0
    try:
        return max(0, int(expr.xreplace(subs)))
    except (TypeError, ValueError):
        return 0


def make_bucket_plan(
    spec: MemorySpec,
    symbol_values: dict[str, int],
    *,
    exact: bool = False,
    time_budget_s: float = 0.25,
    order_hint: dict[str, list[int]] | None = None,
    verify: bool = True,
) -> BucketPlan:
    """Place every group of `spec` at `symbol_values` (a bucket's upper bounds), per device."""
    started = time.perf_counter()
    evaluated = spec.evaluate(symbol_values) if spec.values else []
    value_bytes = [nb for _, _, nb in evaluated]
    group_sizes = [
        planner.align(max((value_bytes[m] for m in g.members), default=0)) for g in spec.groups
    ]
    offsets = [0] * len(spec.groups)
    arena: dict[str, int] = {}
    bound: dict[str, int] = {}
    strategy: dict[str, str] = {}
    hints: dict[str, list[int]] = {}
    tried = 0
    verified = True
    devices = sorted({str(g.device) for g in spec.groups})
    for device in devices:
        members = [g for g in spec.groups if str(g.device) == device]
        intervals = [planner.Interval(g.name, group_sizes[g.index], g.start, g.end) for g in members]
        placement = planner.plan(
            intervals,
            time_budget_s=time_budget_s / max(1, len(devices)),
            hint_order=(order_hint or {}).get(device),
        )
        if verify:
            planner.verify(intervals, placement.offsets, placement.arena_bytes)
        else:
            verified = False
        for g, off in zip(members, placement.offsets):
            offsets[g.index] = off
        arena[device] = placement.arena_bytes
        bound[device] = placement.lower_bound_bytes
        strategy[device] = placement.strategy
        hints[device] = placement.order
        tried += placement.tried
    subs = {sym: sympy.Integer(symbol_values[str(sym)]) for sym in _symbols(spec)}
    extra = {}
    for u in (*spec.unplanned, *spec.outputs):
        if u.nbytes is not None:
            extra.update({s: sympy.Integer(symbol_values[str(s)]) for s in u.nbytes.free_symbols
                          if str(s) in symbol_values})
    subs.update(extra)
    others = [planner.Interval(u.node, planner.align(_concrete(u.nbytes, subs)), u.start, min(u.end, len(spec.order)))
              for u in (*spec.unplanned, *spec.outputs)]
    planned = [planner.Interval(g.name, group_sizes[g.index], g.start, g.end) for g in spec.groups]
    return BucketPlan(
        key=tuple(symbol_values[s] for s in spec.symbols),
        symbol_values={s: symbol_values[s] for s in spec.symbols},
        exact=exact,
        group_sizes=group_sizes,
        value_bytes=value_bytes,
        offsets=offsets,
        arena_bytes=arena,
        lower_bound_bytes=bound,
        naive_bytes=sum(planner.align(b) for b in value_bytes),
        unplanned_bytes=sum(planner.align(_concrete(u.nbytes, subs)) for u in spec.unplanned),
        output_bytes=sum(planner.align(_concrete(u.nbytes, subs)) for u in spec.outputs),
        peak_estimate_bytes=sum(arena.values()) + planner.lower_bound(others),
        unplanned_peak_estimate_bytes=planner.lower_bound(planned + others),
        strategy=strategy,
        tried=tried,
        plan_time_s=time.perf_counter() - started,
        verified=verified,
        order_hint=hints,
    )


def verify_bucket_plan(spec: MemorySpec, plan: BucketPlan) -> None:
    """Raise :class:`planner.PlanError` unless no two live buffers of `plan` overlap, per device."""
    for device, arena in plan.arena_bytes.items():
        members = [g for g in spec.groups if str(g.device) == device]
        intervals = [planner.Interval(g.name, plan.group_sizes[g.index], g.start, g.end) for g in members]
        planner.verify(intervals, [plan.offsets[g.index] for g in members], arena)
    # In-place members share their group's slice: each must fit in it.
    for v in spec.values:
        if plan.value_bytes[v.index] > plan.group_sizes[v.group]:
            raise planner.PlanError(f"{v.node} needs {plan.value_bytes[v.index]} bytes, its buffer has "
                                    f"{plan.group_sizes[v.group]}")


def unplanned_reasons(spec: MemorySpec) -> dict[str, int]:
    return dict(Counter(u.reason if u.reason.startswith(u.op) else f"{u.op}: {u.reason}" for u in spec.unplanned))


# ------------------------------------------------------------------------------------------
# What the pass leaves for the runtime
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GraphMemoryPlan:
    """The pass's result, kept in ``gm.meta[PLAN_KEY]``: the analysis and the plans made so far.

    `plans` holds one :class:`BucketPlan` per bucket key (plus exact keys when a length's sizes
    outgrew its bucket); the runtime adds to it under its own lock.
    """

    spec: MemorySpec
    buckets: list[int] | None
    plans: dict[tuple, BucketPlan]
    compile_key: tuple
    time_budget_s: float = 0.25

    def bucket_values(self, values: dict[str, int]) -> dict[str, int]:
        return {s: bucket_of(values[s], self.buckets) for s in self.spec.symbols}

    def plan_for(self, values: dict[str, int], *, exact: bool = False) -> BucketPlan:
        """The plan for these symbol values' bucket (or for the values themselves if `exact`)."""
        target = dict(values) if exact else self.bucket_values(values)
        key = (("exact",) if exact else ()) + tuple(target[s] for s in self.spec.symbols)
        plan = self.plans.get(key)
        if plan is None:
            hint = self.plans[self.compile_key].order_hint if self.compile_key in self.plans else None
            plan = make_bucket_plan(self.spec, target, exact=exact, time_budget_s=self.time_budget_s,
                                    order_hint=hint)
            self.plans[key] = plan
        return plan
