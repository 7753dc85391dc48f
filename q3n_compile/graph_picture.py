"""Draw an FX graph as one self-contained HTML page (inline SVG), for q3n's per-pass dumps.

:func:`render_graph_html` guarantees:

- The page is one string with everything inline: no script, no external stylesheet, font, image
  or link. It opens from a dump folder with no network. The ``<svg>`` element is well-formed XML
  (its styles live inside it), so it can also be cut out and saved as an ``.svg`` file.
- One box per graph node, with the node's name, the short name of its target (``aten.mm``,
  ``q3n.attention``, ``operator.add``) and, when ``node.meta`` carries a value (``"val"``,
  Dynamo's ``"example_value"`` or ShapeProp's ``"tensor_meta"``), its dtype and shape, e.g.
  ``f32[s0, 64]``. Sizes are printed with ``str()``: symbolic sizes stay symbolic and nothing is
  specialised or guarded by drawing. Each box has a ``<title>`` tooltip with the full target, the
  value's description and, for a highlighted node, the highlight string.
- One edge from each input node to each of its users (drawn once per pair, however many times
  the input is used). No edge runs behind a box: an edge that skips rows goes down the lane
  between two columns. Edges carrying sizes (SymInts) are drawn faint and dashed.
- Layout in layers, top to bottom: a node's layer is the longest path from the graph's sources
  to it. Then the nodes that hang off one user (weights, constants, a weight's transpose, a
  ``full``/``ones`` factory: nodes whose inputs are such nodes used by nothing else) are moved
  down to just above that user, instead of filling a huge first row with edges running the
  length of the graph (``sink=False`` keeps plain longest-path layers). Within a layer, nodes
  keep the graph's order, left-aligned on one grid of columns; a layer wider than
  ``max_per_row`` boxes wraps onto more rows. Boxes have one fixed size, so the layout is
  O(nodes + edges) and stays readable for thousands of nodes.
- ``highlight(node)`` returning a non-empty string fills the box with a colour given to that
  string (one colour per distinct string, first seen first coloured), puts the string in the
  tooltip and lists the node in a table under the picture; a legend explains every colour and
  box style. Placeholders, get_attr nodes and the output are drawn in their own styles.
- All text is escaped with ``html.escape`` (and characters XML forbids are dropped), so node
  names, targets and highlight strings cannot inject markup.

``highlight`` is called once per node; an exception from it propagates (the caller decides
whether a failed picture matters).
"""

from __future__ import annotations

import html
import operator
import re
from typing import Any, Callable

import torch
import torch.fx

__all__ = ["render_graph_html", "node_label", "target_name", "describe_value"]

# Geometry, in SVG user units (pixels at 100% zoom). The box fits three lines of 11px monospace
# text of at most _MAX_CHARS characters each; longer text is cut with an ellipsis (full in tooltip).
_BOX_W = 216
_BOX_H = 50
_GAP_X = 24
_GAP_Y = 36
_MARGIN = 32  # wide enough for the edge lane left of the first column (and right of the last)
_LINE_H = 14
_MAX_CHARS = 31

_KIND_STYLE = {
    # op: (css class, legend text)
    "placeholder": ("k-placeholder", "placeholder (graph input)"),
    "get_attr": ("k-get_attr", "get_attr (constant / parameter)"),
    "output": ("k-output", "output"),
    "call_function": ("k-call", "call_function"),
    "call_method": ("k-call_method", "call_method"),
    "call_module": ("k-call_module", "call_module"),
}

# First highlight colours: light enough for black text, far from the kind colours (green, yellow,
# grey, white). After these, hues follow the golden angle so any number of strings stay distinct.
_PALETTE = ("#ff9e9e", "#8ec5ff", "#ffbf69", "#c9a0ff", "#6fdcc0", "#ff9edb", "#c5d86d", "#a3a8ff")

_STYLE = """
.node rect { stroke: #555; stroke-width: 1; }
.k-call rect { fill: #ffffff; }
.k-call_method rect { fill: #f3f3ff; }
.k-call_module rect { fill: #eef6ff; }
.k-placeholder rect { fill: #d9f2d9; stroke: #2e7d32; stroke-width: 1.5; }
.k-get_attr rect { fill: #fff4c2; stroke: #a68b00; stroke-dasharray: 5 3; }
.k-output rect { fill: #e0e0e0; stroke: #000; stroke-width: 3; }
.hl rect { stroke: #000; stroke-width: 2.5; }
.node text { font-family: monospace; font-size: 11px; fill: #111; }
.node text.name { font-weight: bold; }
.edge { fill: none; stroke: #8a8a8a; stroke-width: 1; }
.edge.size { stroke: #c8c8ff; stroke-dasharray: 3 3; }
"""

_PAGE_STYLE = """
body { font-family: sans-serif; margin: 16px; color: #111; }
.legend span.sw { display: inline-block; width: 28px; height: 14px; border: 1px solid #555;
  vertical-align: middle; margin: 0 6px 0 14px; }
.picture { overflow: auto; border: 1px solid #ccc; max-height: 85vh; }
table { border-collapse: collapse; margin-top: 12px; font-size: 13px; }
td, th { border: 1px solid #bbb; padding: 2px 8px; text-align: left; font-family: monospace; }
"""

_XML_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")

_DTYPE_SHORT = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "bool", torch.complex64: "c64", torch.complex128: "c128",
}


def _esc(text: Any) -> str:
    """Escape for HTML text and attributes alike, and drop what XML 1.0 cannot carry at all."""
    return html.escape(_XML_ILLEGAL.sub("", str(text)), quote=True)


def _cut(text: str, limit: int = _MAX_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_SHORT.get(dtype, str(dtype).replace("torch.", ""))


def describe_value(value: Any, *, _depth: int = 0) -> str:
    """A short description of a node's meta value: ``f32[s0, 64]``, ``(f32[2, 3], i64[2])``, ``s0``.

    Tensor sizes go through ``str()``: a SymInt prints as its expression and is never turned into
    an int (which would install a guard or fail on an unbacked size).
    """
    if isinstance(value, torch.Tensor):
        return f"{_dtype_name(value.dtype)}[{', '.join(str(s) for s in value.shape)}]"
    # ShapeProp's TensorMetadata (symbolic_trace graphs): a namedtuple with shape and dtype.
    if hasattr(value, "shape") and isinstance(getattr(value, "dtype", None), torch.dtype):
        return f"{_dtype_name(value.dtype)}[{', '.join(str(s) for s in value.shape)}]"
    if isinstance(value, (list, tuple)):
        if _depth > 2:
            return "(...)"
        items = [describe_value(v, _depth=_depth + 1) for v in value[:8]]
        if len(value) > 8:
            items.append(f"... {len(value)} items")
        return "(" + ", ".join(items) + ")"
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(value)
    if value is None:
        return ""
    return _cut(repr(value), 60)


def _is_tensor_like(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_is_tensor_like(v) for v in value)
    return isinstance(value, torch.Tensor) or (hasattr(value, "shape") and hasattr(value, "dtype"))


def _meta_value(node: torch.fx.Node) -> Any:
    for key in ("val", "example_value", "tensor_meta"):
        if key in node.meta and node.meta[key] is not None:
            return node.meta[key]
    return None


def target_name(node: torch.fx.Node, gm: torch.fx.GraphModule | None = None) -> str:
    """The short name of what a node runs: ``aten.mm``, ``q3n.attention``, ``operator.add``,
    ``torch.relu``, ``.view`` (call_method), ``Linear: layer.fc`` (call_module, with ``gm``)."""
    op, target = node.op, node.target
    if op == "placeholder":
        return "placeholder"
    if op == "output":
        return "output"
    if op == "get_attr":
        return f"get_attr {target}"
    if op == "call_method":
        return f".{target}"
    if op == "call_module":
        if gm is not None:
            try:
                return f"{type(gm.get_submodule(target)).__name__}: {target}"
            except AttributeError:
                pass
        return f"module {target}"
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        # "aten::mm.default" -> "aten.mm": the overload name is in the tooltip.
        qualified = target.name() if isinstance(target, torch._ops.OpOverload) else target._qualified_op_name
        ns, _, rest = qualified.partition("::")
        return f"{ns}.{rest.split('.')[0]}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"hop.{target.name()}"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None)
    if name is None:
        return _cut(str(target), 60)
    if module in ("_operator", "operator") or getattr(operator, name, None) is target:
        return f"operator.{name}"
    if module.startswith("torch"):
        return f"torch.{name}"
    if module in ("builtins", ""):
        return name
    return f"{module.rsplit('.', 1)[-1]}.{name}"


def _full_target(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return f"{node.op} {target}"
    if isinstance(target, torch._ops.OpOverload):
        return f"{node.op} {target.name()}"
    try:
        return f"{node.op} {torch.fx.node._get_qualified_name(target)}"
    except Exception:  # some callables have no importable qualified name; repr will do
        return f"{node.op} {target!r}"


def node_label(node: torch.fx.Node, gm: torch.fx.GraphModule | None = None) -> str:
    """The text drawn in a node's box, one item a line: name, target's short name, value
    description (the last line is left out when the node has no meta value)."""
    lines = [node.name, target_name(node, gm)]
    desc = describe_value(_meta_value(node))
    if desc:
        lines.append(desc)
    return "\n".join(lines)


def _layers(nodes: list[torch.fx.Node], sink: bool) -> dict[torch.fx.Node, int]:
    """Longest path from the sources (graph order is topological, so one forward sweep), then,
    optionally, one backward sweep that sinks each *hanging* node to just above its first user.

    A node hangs when every input it has is a hanging node used by nothing else: a weight, a
    constant, a weight's transpose or reshape, a factory like ``ones``. Moving such a node down
    lengthens no other edge (its inputs follow it down), so it only shortens the edge to its
    user. A node fed by shared values (an activation, a SymInt) stays where the longest path
    put it: sinking it would only trade a long edge to its user for a long edge from its input.
    """
    layer: dict[torch.fx.Node, int] = {}
    hangs: dict[torch.fx.Node, bool] = {}
    for n in nodes:
        ins = n.all_input_nodes
        layer[n] = 1 + max(layer[i] for i in ins) if ins else 0
        hangs[n] = n.op != "output" and all(hangs[i] and len(i.users) == 1 for i in ins)
    if sink:
        for n in reversed(nodes):
            if hangs[n] and n.users:
                # users come later in graph order, so their layers are final; never move a node up.
                layer[n] = max(layer[n], min(layer[u] for u in n.users) - 1)
    return layer


def _highlight_colour(index: int) -> str:
    if index < len(_PALETTE):
        return _PALETTE[index]
    hue = (index * 137.508) % 360
    return f"hsl({hue:.0f}, 70%, 78%)"


def render_graph_html(gm: torch.fx.GraphModule, title: str,
                      highlight: Callable[[torch.fx.Node], str | None] | None = None, *,
                      sink: bool = True, max_per_row: int = 12) -> str:
    """Return one self-contained HTML page drawing ``gm.graph`` (see the module docstring).

    ``highlight(node)`` -> a string to highlight the node with (e.g. the q3n pass that created
    it), or ``None``/``""`` not to. ``sink`` and ``max_per_row`` tune the layout.
    """
    if max_per_row < 1:
        raise ValueError(f"max_per_row must be >= 1, got {max_per_row}")
    nodes = list(gm.graph.nodes)
    layer = _layers(nodes, sink)

    # Rows: each layer, in graph order, wrapped every max_per_row boxes.
    by_layer: dict[int, list[torch.fx.Node]] = {}
    for n in nodes:
        by_layer.setdefault(layer[n], []).append(n)
    rows: list[list[torch.fx.Node]] = []
    for lay in sorted(by_layer):
        members = by_layer[lay]
        for start in range(0, len(members), max_per_row):
            rows.append(members[start : start + max_per_row])
    widest = max((len(r) for r in rows), default=1)
    width = 2 * _MARGIN + widest * _BOX_W + (widest - 1) * _GAP_X
    height = 2 * _MARGIN + len(rows) * _BOX_H + max(len(rows) - 1, 0) * _GAP_Y

    # Rows are left-aligned on one grid of columns, so the gaps between columns line up from top
    # to bottom and serve as lanes for the edges that skip rows (below).
    pos: dict[torch.fx.Node, tuple[float, float]] = {}
    grid: dict[torch.fx.Node, tuple[int, int]] = {}  # node -> (row, column)
    for r, row in enumerate(rows):
        y = _MARGIN + r * (_BOX_H + _GAP_Y)
        for c, n in enumerate(row):
            pos[n] = (_MARGIN + c * (_BOX_W + _GAP_X), y)
            grid[n] = (r, c)

    # Highlights: one colour per distinct string, in order of first appearance.
    colours: dict[str, str] = {}
    marks: dict[torch.fx.Node, str] = {}
    for n in nodes:
        mark = highlight(n) if highlight is not None else None
        if mark is None or mark == "":
            continue
        mark = str(mark)
        marks[n] = mark
        if mark not in colours:
            colours[mark] = _highlight_colour(len(colours))

    svg: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        f"<style>{_STYLE}</style>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#8a8a8a"/>'
        "</marker></defs>",
        '<g class="edges">',
    ]
    # Edges first, so boxes are drawn over them. An edge between adjacent rows is one curve in
    # the gap between them. An edge that skips rows must not run behind the boxes in between (it
    # would look like an input of each of them): it turns into the lane beside its source's
    # column, on the side of its target, runs down the lane, and turns into the target in the gap
    # above the target's row. Edges sharing a lane are spread across it by their source's index.
    n_edges = 0
    has_size_edges = False
    index = {n: i for i, n in enumerate(nodes)}
    for n in nodes:
        tx, ty = pos[n]
        tx += _BOX_W / 2
        t_row, t_col = grid[n]
        for src in dict.fromkeys(n.all_input_nodes):  # one edge per (input, user) pair
            sx, sy = pos[src]
            s_row, s_col = grid[src]
            sx += _BOX_W / 2
            sy += _BOX_H
            if t_row - s_row <= 1:
                mid = (sy + ty) / 2
                d = f"M{sx:.0f},{sy:.0f} C{sx:.0f},{mid:.0f} {tx:.0f},{mid:.0f} {tx:.0f},{ty:.0f}"
            else:
                side = 1 if t_col > s_col else -1
                spread = (index[src] % 7 - 3) * (_GAP_X / 8)
                lane = sx + side * (_BOX_W + _GAP_X) / 2 + spread
                y1, y2 = sy + _GAP_Y / 2, ty - _GAP_Y / 2
                d = (f"M{sx:.0f},{sy:.0f} Q{sx:.0f},{y1:.0f} {lane:.0f},{y1:.0f} L{lane:.0f},{y2:.0f} "
                     f"Q{tx:.0f},{y2:.0f} {tx:.0f},{ty:.0f}")
            # Sizes (SymInts from sym_size) feed many nodes; drawn faint so tensor flow stands out.
            value = _meta_value(src)
            ecls = "edge" if value is None or _is_tensor_like(value) else "edge size"
            has_size_edges = has_size_edges or ecls != "edge"
            svg.append(f'<path class="{ecls}" d="{d}" marker-end="url(#arrow)"/>')
            n_edges += 1
    svg.append("</g>")

    svg.append('<g class="nodes">')
    for n in nodes:
        x, y = pos[n]
        kind_cls = _KIND_STYLE.get(n.op, ("k-call", ""))[0]
        mark = marks.get(n)
        cls = f"node {kind_cls}" + (" hl" if mark is not None else "")
        lines = node_label(n, gm).split("\n")
        tip = [n.name, _full_target(n)]
        desc = describe_value(_meta_value(n))
        if desc:
            tip.append(f"value: {desc}")
        if mark is not None:
            tip.append(f"highlight: {mark}")
        fill = f' fill="{_esc(colours[mark])}" style="fill:{_esc(colours[mark])}"' if mark is not None else ""
        rx = 12 if n.op == "placeholder" else 3
        svg.append(f'<g class="{cls}" id="n-{_esc(n.name)}"'
                   + (f' data-highlight="{_esc(mark)}"' if mark is not None else "") + ">")
        svg.append(f"<title>{_esc(chr(10).join(tip))}</title>")
        svg.append(f'<rect x="{x:.0f}" y="{y:.0f}" width="{_BOX_W}" height="{_BOX_H}" rx="{rx}"{fill}/>')
        for i, line in enumerate(lines):
            tcls = ' class="name"' if i == 0 else ""
            ty_line = y + 14 + i * _LINE_H
            svg.append(f'<text{tcls} x="{x + 6:.0f}" y="{ty_line:.0f}">{_esc(_cut(line))}</text>')
        svg.append("</g>")
    svg.append("</g></svg>")

    legend = ['<div class="legend"><b>Legend:</b>']
    for op, (cls, text) in _KIND_STYLE.items():
        if any(n.op == op for n in nodes):
            # The main picture's <style> applies to the whole page, these swatches included.
            legend.append('<svg width="30" height="16" style="vertical-align:middle">'
                          f'<g class="node {cls}"><rect x="1" y="1" width="28" height="14" '
                          f'rx="{5 if op == "placeholder" else 2}"/></g></svg> {_esc(text)} ')
    edge_kinds = (("edge", "tensor flows to its user"), ("edge size", "size (SymInt) flows to its user"))
    for ecls, text in edge_kinds:
        if ecls == "edge" or has_size_edges:
            legend.append('<svg width="30" height="16" style="vertical-align:middle">'
                          f'<path class="{ecls}" d="M1,8 L29,8"/></svg> {_esc(text)} ')
    for mark, colour in colours.items():
        count = sum(1 for m in marks.values() if m == mark)
        legend.append(f'<span class="sw" style="background:{_esc(colour)}"></span>'
                      f"highlight: {_esc(mark)} ({count})")
    legend.append("</div>")

    table = [f"<h2>Highlighted nodes ({len(marks)})</h2>"]
    if marks:
        table.append("<table><tr><th>node</th><th>target</th><th>highlight</th></tr>")
        for n, mark in marks.items():
            table.append(f'<tr><td>{_esc(n.name)}</td><td>{_esc(_full_target(n))}</td>'
                         f'<td style="background:{_esc(colours[mark])}">{_esc(mark)}</td></tr>')
        table.append("</table>")
    else:
        table.append("<p>none</p>")

    n_layers = len(by_layer)
    page = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_PAGE_STYLE}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f"<p>{len(nodes)} nodes, {n_edges} edges, {n_layers} layers. Hover a box for its full "
        "target and value.</p>",
        "".join(legend),
        '<div class="picture">',
        "\n".join(svg),
        "</div>",
        "\n".join(table),
        "</body></html>",
    ]
    return "\n".join(page)
