"""The ordered pass list and the observer that runs each pass.

A pass is a plain function ``(gm, ctx) -> PassStats`` that edits the ATen graph in place.
The observer around each pass guarantees:
- the pass is timed and its outcome lands in the report under the pass's name;
- every node the pass created carries ``node.meta["q3n_pass"] = <pass name>`` (provenance);
- the graph is linted afterwards (FX's lint, and every created value node has ``meta["val"]``);
- a pass that raises or leaves a broken graph is rolled back to the graph it was given, its
  traceback is logged and recorded, and compilation goes on; with ``strict=True`` it raises
  :class:`Q3NPassError` instead;
- when dumping is on, the graph after the pass and its diff are written.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import traceback
from typing import Any, Callable, Sequence

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .config import Q3NConfig
from .passes import attention, memory_plan, norm_linear, quantize
from .passes.base import PassContext, PassStats

log = logging.getLogger("q3n")


class Q3NPassError(RuntimeError):
    """A pass failed under ``strict=True``."""


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    run: Callable[[torch.fx.GraphModule, PassContext], PassStats]
    # None when the pass should run under this config, otherwise why it is off.
    disabled_because: Callable[[Q3NConfig], str | None]
    inference_only: bool = True


def _memory_plan_off(config: Q3NConfig) -> str | None:
    if not config.memory_plan:
        return "memory_plan=False"
    if config.executor == "inductor":
        return "executor='inductor' plans its own buffers"
    return None


PASSES: tuple[PassSpec, ...] = (
    PassSpec(
        "attention",
        attention.run,
        lambda c: "attention='off'" if c.attention == "off" else None,
    ),
    PassSpec(
        "norm_linear",
        norm_linear.run,
        lambda c: None if c.norm_fusion else "norm_fusion=False",
    ),
    PassSpec(
        "quantize",
        quantize.run,
        lambda c: None if c.quant_config is not None else "no quant_config given",
    ),
    PassSpec("memory_plan", memory_plan.run, _memory_plan_off),
)


def run_pipeline(
    gm: torch.fx.GraphModule,
    ctx: PassContext,
    passes: Sequence[PassSpec] | None = None,
    on_pass_done: Callable[[int, str, torch.fx.GraphModule], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run `passes` (default: :data:`PASSES`) in order on `gm`, in place.

    Returns the report's ``passes`` section: one entry per pass, in order.
    """
    passes = PASSES if passes is None else passes
    results: dict[str, dict[str, Any]] = {}
    for index, spec in enumerate(passes, start=1):
        reason = spec.disabled_because(ctx.config)
        if reason is None and spec.inference_only and not ctx.inference:
            results[spec.name] = PassStats(
                status="skipped",
                detail={"reason": "the graph needs gradients; inference-only passes are off"},
            ).to_json(0.0)
        elif reason is not None:
            results[spec.name] = PassStats(status="disabled", detail={"reason": reason}).to_json(0.0)
        else:
            results[spec.name] = _observe(spec, gm, ctx)
        if on_pass_done is not None:
            on_pass_done(index, spec.name, gm)
    return results


def _observe(spec: PassSpec, gm: torch.fx.GraphModule, ctx: PassContext) -> dict[str, Any]:
    snapshot = _Snapshot(gm)
    frozen_before = dict(ctx.frozen)
    before = set(gm.graph.nodes)
    start = time.perf_counter()
    try:
        # Passes compute on real weights (folding, packing); they enter `ctx.fake_mode` themselves
        # to give new nodes their FakeTensor values.
        with unset_fake_temporarily():
            stats = spec.run(gm, ctx)
        if not isinstance(stats, PassStats):
            raise TypeError(f"pass {spec.name} returned {type(stats).__name__}, not PassStats")
        created = [n for n in gm.graph.nodes if n not in before]
        for node in created:
            node.meta.setdefault("q3n_pass", spec.name)
        _lint(gm, created)
        gm.recompile()
    except Exception as err:
        elapsed = time.perf_counter() - start
        snapshot.restore(gm)
        ctx.frozen.clear()
        ctx.frozen.update(frozen_before)
        tb = traceback.format_exc()
        if ctx.config.strict:
            raise Q3NPassError(f"q3n pass {spec.name!r} failed (strict=True): {err}") from err
        log.warning("q3n: pass %s failed and was rolled back; compilation goes on.\n%s", spec.name, tb)
        return PassStats(
            status="failed", detail={"error": f"{type(err).__name__}: {err}", "traceback": tb}
        ).to_json(elapsed)
    return stats.to_json(time.perf_counter() - start)


def _lint(gm: torch.fx.GraphModule, created: list[torch.fx.Node]) -> None:
    gm.graph.lint()
    for node in created:
        if node.op in ("call_function", "call_method", "placeholder", "get_attr") and "val" not in node.meta:
            raise ValueError(f"node {node.name} ({node.target}) was created without meta['val']")


class _Snapshot:
    """Enough of a GraphModule to undo a pass: the graph and the module's attribute tables."""

    def __init__(self, gm: torch.fx.GraphModule):
        # Graph.__deepcopy__ copies nodes and shallow-copies their meta, so FakeTensors are shared
        # rather than duplicated.
        self.graph = copy.deepcopy(gm.graph)
        self.modules = dict(gm._modules)
        self.parameters = dict(gm._parameters)
        self.buffers = dict(gm._buffers)
        self.attrs = set(gm.__dict__)

    def restore(self, gm: torch.fx.GraphModule) -> None:
        for name in set(gm.__dict__) - self.attrs:
            delattr(gm, name)
        gm._modules.clear(); gm._modules.update(self.modules)  # noqa: E702
        gm._parameters.clear(); gm._parameters.update(self.parameters)  # noqa: E702
        gm._buffers.clear(); gm._buffers.update(self.buffers)  # noqa: E702
        gm.graph = self.graph
        gm.recompile()
