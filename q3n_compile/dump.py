"""Graph dumps: what q3n did to each graph, as files a person can read.

With ``dump_dir`` (or ``Q3N_DUMP=dir``) each compiled graph gets its own folder holding
- ``00_captured.py``: the functional ATen graph as captured, with shapes and dtypes;
- ``NN_<pass>.py`` after each pass in pipeline order, and ``NN_<pass>.diff`` against the one before;
- ``summary.json``: the graph's report (the same object ``q3n_compile.reports()`` returns);
- ``graph.html``: a self-contained picture of the final graph; nodes q3n created are highlighted;
- with a memory plan: ``memory_plan.txt`` (every arena buffer, its lifetime, size and offset, and
  what was not planned and why), ``memory_timeline.png`` (time × offset, one rectangle per buffer),
  ``memory_planned_graph.py`` (the generated code that runs), and one plan/picture per further
  length bucket (``memory_plan_s0=256.txt``) as buckets are first used.

The folder never reuses an existing one: graph ids count per process, and a folder that exists
already (an earlier run) gets a numbered suffix instead of being overwritten.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from html import escape
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("q3n")


def readable(gm: torch.fx.GraphModule) -> str:
    """The graph as Python with each value's shape and dtype in a comment; valid Python."""
    text = gm.print_readable(print_output=False, include_stride=False, include_device=True)
    # AOTAutograd's graph modules are named "<lambda>", which would not parse as a class name.
    head, newline, rest = text.partition("\n")
    return head.replace("class <lambda>(", "class CapturedGraph(") + newline + rest


class GraphDumper:
    def __init__(self, root: str | os.PathLike, graph_id: int):
        base = Path(root) / f"graph_{graph_id:03d}"
        folder, n = base, 1
        while folder.exists():
            n += 1
            folder = base.with_name(f"{base.name}-{n}")
        folder.mkdir(parents=True)
        self.folder = folder
        self._previous: str | None = None

    def captured(self, gm: torch.fx.GraphModule) -> None:
        self._previous = readable(gm)
        (self.folder / "00_captured.py").write_text(self._previous)

    def after_pass(self, index: int, name: str, gm: torch.fx.GraphModule) -> None:
        text = readable(gm)
        stem = f"{index:02d}_{name}"
        (self.folder / f"{stem}.py").write_text(text)
        before = (self._previous or "").splitlines(keepends=True)
        diff = difflib.unified_diff(
            before, text.splitlines(keepends=True), fromfile="before", tofile=f"after {name}"
        )
        (self.folder / f"{stem}.diff").write_text("".join(diff))
        self._previous = text

    def memory_files(self, files: dict[str, str | bytes]) -> None:
        """The memory plan's files: the plan as text, the timeline PNG, the planned graph's code."""
        for name, content in files.items():
            path = self.folder / name
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)

    def final(self, gm: torch.fx.GraphModule, report: dict[str, Any]) -> None:
        from .graph_picture import render_graph_html

        (self.folder / "summary.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        try:
            html = render_graph_html(
                gm,
                title=f"q3n graph {report['graph_id']}",
                highlight=lambda node: node.meta.get("q3n_pass"),
            )
        except Exception as err:  # a picture must never cost the user the rest of the dump
            log.warning("q3n: could not draw graph %s: %s", report["graph_id"], err, exc_info=True)
            html = f"<!DOCTYPE html><p>q3n could not draw this graph: {escape(repr(err))}</p>"
        (self.folder / "graph.html").write_text(html)
