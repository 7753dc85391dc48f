"""The `memory_plan` pass: liveness and offsets of intermediate buffers in one arena (executor 'q3n').

Runs last, on the final node order. It first writes mutated graph inputs in place
(:func:`q3n_compile.memory.reinplace.reinplace_input_mutations`: a static KV cache's
``index_copy`` + ``copy_`` becomes one ``index_copy_``; ``detail["input_mutations"]`` says what was
rewritten and what was not, by reason). Otherwise it does not change what the graph computes or
its ops: it analyses the graph
(:func:`q3n_compile.memory.liveness.analyze`: storages, aliases, lifetimes, in-place reuse, which
results can be written into given memory), places the buffers of the compile-time bucket
(:mod:`q3n_compile.memory.planner`, verified), and leaves the result in
``gm.meta["q3n_memory_plan"]``. The executor then generates the planned code from it
(:mod:`q3n_compile.memory.arena_runtime`), and plans further length buckets as they arrive.

Options read: ``memory_buckets`` (a list of bucket upper bounds for dynamic sizes; powers of two
when absent), ``memory_plan_time_s`` (the planner's search budget per bucket, default 0.5 s at
compile time). Both are read with ``getattr`` so the pass works before the config knows them.
"""

from __future__ import annotations

import torch

from ..memory.reinplace import reinplace_input_mutations
from ..memory.liveness import PLAN_KEY, GraphMemoryPlan, analyze, make_bucket_plan, unplanned_reasons
from .base import PassContext, PassStats


def _buckets(config) -> list[int] | None:
    raw = getattr(config, "memory_buckets", None)
    if raw is None:
        return None
    buckets = sorted({int(b) for b in raw})
    if not buckets or buckets[0] < 1:
        raise ValueError(f"memory_buckets must be positive integers, got {raw!r}")
    return buckets


def run(gm: torch.fx.GraphModule, ctx: PassContext) -> PassStats:
    budget = float(getattr(ctx.config, "memory_plan_time_s", None) or 0.5)
    mutations = reinplace_input_mutations(gm)
    spec = analyze(gm)
    buckets = _buckets(ctx.config)
    missing = [s for s in spec.symbols if s not in spec.hints]
    if missing:
        raise ValueError(f"no example value for shape symbol(s) {missing}")
    state = GraphMemoryPlan(spec=spec, buckets=buckets, plans={}, compile_key=(), time_budget_s=min(budget, 0.25))
    values = state.bucket_values(spec.hints)
    plan = make_bucket_plan(spec, values, time_budget_s=budget, verify=True)
    state.compile_key = plan.key
    state.plans[plan.key] = plan
    gm.meta[PLAN_KEY] = state

    stats = PassStats(status="applied")
    stats.rewritten = len(spec.values)
    stats.matched = len(spec.values)
    for reason, count in unplanned_reasons(spec).items():
        stats.matched += count
        stats.declined[reason] += count
    stats.detail = plan.figures(spec)
    stats.detail["bucketing"] = buckets if buckets is not None else "powers of two"
    stats.detail["input_mutations"] = mutations
    return stats
