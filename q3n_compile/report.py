"""The report registry: one JSON-serialisable report per graph q3n compiled in this process.

This is the only global mutable state in q3n. Reports are appended once a graph is compiled and
handed out as deep copies, so a caller can never change what the next caller sees. Access is
locked: two threads compiling at once each get their own graph id and report.

Run-time statistics of ``q3n::sparse_attention`` also live here: each measured call stores
references to its device tensors under ``(graph id, layer)`` (:func:`record_sparse_attention`, no
sync), and :func:`reports` turns the latest ones into floats in
``report["runtime"]["sparse_attention"]`` when it is read.
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
# (graph id, layer) -> the latest measured sparse-attention call's entry (tensors and numbers).
_sparse_runs: dict[tuple[int, int], dict[str, Any]] = {}

SPARSE_NOTE = (
    "latest measured call per layer (calls with Sq <= 16 or fewer than 4 key blocks run dense "
    "and are not recorded); kept_mass: mean over sampled rows of the attention weight the kept "
    "blocks hold, exact over all keys (kept_mass_min_head: the lowest per-(batch, head) mean); "
    "ran 'dense' when kept_mass < min_mass. Under CUDA graphs the entry is the one recorded at "
    "capture; replays overwrite its tensors in place, so the values are the latest replay's and "
    "the shapes those of capture."
)


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
        out = copy.deepcopy(_reports)
        runs = dict(_sparse_runs)
    # Reading device tensors syncs; done outside the lock so no kernel launch waits on it.
    sections = _sparse_sections(runs)
    for report in out:
        section = sections.get(report.get("graph_id"))
        if section is not None and isinstance(report.get("runtime"), dict):
            report["runtime"]["sparse_attention"] = section
    return out


def reset_reports() -> None:
    """Forget every report and sparse-attention statistic (graph ids keep counting, so dumps
    never reuse a folder name)."""
    with _lock:
        _reports.clear()
        _sparse_runs.clear()


def record_sparse_attention(graph_id: int, layer: int, entry: dict[str, Any]) -> None:
    """Keep `entry` as the latest measured call of `layer` in graph `graph_id`.

    `entry` holds ``mass_rows`` (tensor [B, H, R], kept mass per sampled row), ``dense`` (0-d
    tensor, 1 if the call ran dense) and ``work_fraction_if_sparse`` (0-d tensor) by reference, and
    JSON numbers/strings. Nothing is read from the device here.
    """
    with _lock:
        _sparse_runs[(graph_id, layer)] = entry


def sparse_attention_stats(graph_id: int) -> dict[str, Any] | None:
    """``report["runtime"]["sparse_attention"]`` of one graph, or None if nothing was measured."""
    with _lock:
        runs = {key: e for key, e in _sparse_runs.items() if key[0] == graph_id}
    return _sparse_sections(runs).get(graph_id)


def _sparse_sections(runs: dict[tuple[int, int], dict[str, Any]]) -> dict[int, dict[str, Any]]:
    sections: dict[int, dict[str, Any]] = {}
    for (graph_id, layer), entry in sorted(runs.items()):
        per_head = entry["mass_rows"].double().mean(-1)
        row = {"layer": layer, "ran": "dense" if int(entry["dense"]) else "sparse",
               "kept_mass": float(per_head.mean()), "kept_mass_min_head": float(per_head.min()),
               "work_fraction_if_sparse": round(float(entry["work_fraction_if_sparse"]), 6)}
        row.update({k: v for k, v in entry.items()
                    if k not in ("mass_rows", "dense", "work_fraction_if_sparse")})
        sections.setdefault(graph_id, {"note": SPARSE_NOTE, "layers": []})["layers"].append(row)
    return sections


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
