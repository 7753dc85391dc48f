"""The report registry: one JSON-serialisable report per graph q3n compiled in this process.

This is the only global mutable state in q3n. Reports are appended once a graph is compiled and
handed out as deep copies, so a caller can never change what the next caller sees. Access is
locked: two threads compiling at once each get their own graph id and report.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
from collections import Counter
from typing import Any

import torch

PASS_STATUSES = ("applied", "skipped", "failed", "disabled", "not implemented")

_lock = threading.Lock()
_reports: list[dict[str, Any]] = []
_graph_ids = itertools.count()


def next_graph_id() -> int:
    with _lock:
        return next(_graph_ids)


def publish(report: dict[str, Any]) -> None:
    """Add a finished report; it must already be JSON-serialisable (checked here, not later)."""
    json.dumps(report)
    with _lock:
        _reports.append(report)


def reports() -> list[dict[str, Any]]:
    """The reports of the graphs compiled in this process, newest last."""
    with _lock:
        return copy.deepcopy(_reports)


def reset_reports() -> None:
    """Forget every report (graph ids keep counting, so dumps never reuse a folder name)."""
    with _lock:
        _reports.clear()


def op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """How many times each operator is called in the graph, e.g. {"aten.mm.default": 4}."""
    counts = Counter(
        _op_name(node.target) for node in gm.graph.nodes if node.op == "call_function"
    )
    return dict(sorted(counts.items()))


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    return getattr(target, "__qualname__", None) or str(target)
