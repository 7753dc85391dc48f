"""The bench's PNG: latency against length per backend, memory per backend, decode and compile.

Needs matplotlib, which is an optional extra (``pip install -e '.[bench]'``): the bench writes its
table, JSON and CSV without it and says how to get the plot; ``q3n plot results.json`` draws it
later from the JSON, on any machine (the GPU machine here cannot install packages).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

INSTALL = "pip install -e '.[bench]'   (or: pip install matplotlib)"


class PlotUnavailable(RuntimeError):
    """matplotlib is missing (the message says how to install it)."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise PlotUnavailable(f"no PNG plot: matplotlib is not installed. Install it with {INSTALL}, "
                              "then draw the plot from the JSON with: q3n plot results.json") from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_results(result: dict[str, Any], path: str | Path) -> Path:
    """Draw ``result`` (the bench's JSON, as a dict) into the PNG ``path``; returns the path."""
    plt = _pyplot()
    rows = [r for r in result["rows"] if not r.get("error")]
    meta = result.get("meta", {})
    backends = list(dict.fromkeys(r["backend"] for r in result["rows"]))
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backends)}

    panels = ["latency", "memory"]
    if any(r["phase"] == "decode" for r in rows):
        panels.append("decode")
    if any(r["phase"] == "generate" for r in rows):
        panels.append("generate")
    if any(r["phase"] == "embed" for r in rows):
        panels.append("embed")
    panels.append("compile")
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(12, 4.2 * nrows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(panels):]:
        ax.axis("off")

    for ax, panel in zip(flat, panels):
        if panel == "latency":
            _latency(ax, rows, backends, colors)
        elif panel == "memory":
            _memory(ax, rows, backends, colors)
        elif panel == "decode":
            _bars(ax, rows, backends, colors, "decode", "tokens_per_s", "decode tokens/s (KV cache)",
                  lambda r: f"B={r['batch']}")
        elif panel == "generate":
            _bars(ax, rows, backends, colors, "generate", "tokens_per_s", "generate() tokens/s",
                  lambda r: f"B={r['batch']}")
        elif panel == "embed":
            _bars(ax, rows, backends, colors, "embed", "latency_ms", "sentence embedding latency (ms)",
                  lambda r: f"{r['batch']} sentences")
        elif panel == "compile":
            _compile(ax, rows, backends, colors)

    title = f"q3n bench: {meta.get('label', meta.get('model', '?'))} on {meta.get('gpu') or meta.get('device', '?')}"
    title += f", {meta.get('dtype', '')}  (torch {meta.get('torch', '?')}, {meta.get('date', '')[:10]})"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latency(ax, rows, backends, colors) -> None:
    prefill = [r for r in rows if r["phase"] == "prefill"]
    embed = [r for r in rows if r["phase"] == "embed"]
    if not prefill and embed:
        prefill = embed
    batches = sorted({r["batch"] for r in prefill})
    lengths = sorted({r["seq_len"] for r in prefill})
    if len(lengths) == 1 and prefill:
        # One length: bars per backend (and batch) instead of a line with one point.
        sel = [(b, r) for b in backends for r in prefill if r["backend"] == b]
        labels = [b if len(batches) == 1 else f"{b} B={r['batch']}" for b, r in sel]
        values = [r["latency_ms"] for _, r in sel]
        ax.bar(range(len(sel)), values, width=0.6, color=[colors[b] for b, _ in sel])
        ax.set_xticks(range(len(sel)), labels, rotation=30, ha="right", fontsize=8)
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_ylabel("latency (ms, median)")
        ax.set_title(f"prefill latency (time to first token), S={lengths[0]}")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        return
    styles = ["-", "--", ":", "-."]
    for b in backends:
        for i, batch in enumerate(batches):
            pts = sorted((r["seq_len"], r["latency_ms"]) for r in prefill if r["backend"] == b and r["batch"] == batch)
            if not pts:
                continue
            label = b if len(batches) == 1 else f"{b} B={batch}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[i % 4], marker="o", color=colors[b], label=label)
    if len(lengths) > 1 and lengths[0] > 0:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("latency (ms, median)")
    ax.set_title("prefill latency (time to first token)")
    ax.grid(True, which="both", alpha=0.3)
    if prefill:
        ax.legend(fontsize=8)
    else:
        _empty(ax, "no prefill rows")


def _memory(ax, rows, backends, colors) -> None:
    mem = [r for r in rows if r.get("peak_alloc_mib") is not None and r["phase"] in ("prefill", "embed")]
    ax.set_title("peak GPU memory at the longest length")
    if not mem:
        _empty(ax, "peak memory is measured on CUDA only")
        return
    longest = max(r["seq_len"] for r in mem)
    batch = max(r["batch"] for r in mem if r["seq_len"] == longest)
    names, peak, act = [], [], []
    for b in backends:
        r = next((r for r in mem if r["backend"] == b and r["seq_len"] == longest and r["batch"] == batch), None)
        if r is None:
            continue
        names.append(b)
        peak.append(r["peak_alloc_mib"])
        act.append(r.get("activation_mib") or 0.0)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], peak, width=0.4, color=[colors[n] for n in names], label="peak allocated")
    ax.bar([i + 0.2 for i in x], act, width=0.4, color=[colors[n] for n in names], alpha=0.45,
           hatch="//", label="above weights/inputs (activations)")
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"MiB (S={longest}, B={batch})")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)


def _bars(ax, rows, backends, colors, phase, key, title, group_label) -> None:
    sel = [r for r in rows if r["phase"] == phase and r.get(key) is not None]
    ax.set_title(title)
    if not sel:
        _empty(ax, f"no {phase} rows")
        return
    groups = list(dict.fromkeys(group_label(r) for r in sel))
    names = [b for b in backends if any(r["backend"] == b for r in sel)]
    width = 0.8 / max(len(names), 1)
    for j, b in enumerate(names):
        xs, ys = [], []
        for i, g in enumerate(groups):
            r = next((r for r in sel if r["backend"] == b and group_label(r) == g), None)
            if r is not None:
                xs.append(i + (j - (len(names) - 1) / 2) * width)
                ys.append(r[key])
        ax.bar(xs, ys, width=width, color=colors[b], label=b)
    ax.set_xticks(range(len(groups)), groups)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)


def _compile(ax, rows, backends, colors) -> None:
    ax.set_title("compile time (first calls, all cases, s)")
    totals = {b: sum(r.get("compile_s") or 0 for r in rows if r["backend"] == b) for b in backends if b != "eager"}
    totals = {b: v for b, v in totals.items() if v > 0}
    if not totals:
        _empty(ax, "no compiled backend")
        return
    names = list(totals)
    ax.bar(range(len(names)), [totals[n] for n in names], width=0.6, color=[colors[n] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("seconds")
    ax.grid(True, axis="y", alpha=0.3)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])
