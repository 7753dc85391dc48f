"""The FX graph picture: well-formed, complete, highlighted, escaped, self-contained, fast."""

import operator
import re
import time
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.shape_prop import ShapeProp

from q3n_compile.graph_picture import describe_value, node_label, render_graph_html, target_name

SVG_NS = "{http://www.w3.org/2000/svg}"


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.scale = torch.nn.Parameter(torch.randn(8))

    def forward(self, x, y):
        h = torch.relu(self.fc(x)) * self.scale
        return (h + y).softmax(-1).view(-1)


def _svg(page: str) -> ET.Element:
    start = page.index("<svg xmlns=")
    end = page.index("</svg>", start) + len("</svg>")
    return ET.fromstring(page[start:end])


def _boxes(root: ET.Element) -> dict:
    """node name -> the <g> drawing it."""
    out = {}
    for g in root.iter(f"{SVG_NS}g"):
        if "node" in g.get("class", "").split():
            out[g.get("id")[2:]] = g
    return out


def _aten_graph():
    def f(x, w):
        s = (x @ w).mul(0.125)
        return torch.softmax(s, dim=-1) @ w.transpose(0, 1)

    return make_fx(f, tracing_mode="symbolic")(torch.randn(6, 4), torch.randn(4, 5))


def test_symbolic_trace_graph_draws_every_node_and_edge():
    gm = torch.fx.symbolic_trace(Small())
    ShapeProp(gm).propagate(torch.randn(3, 8), torch.randn(3, 8))  # gives meta["tensor_meta"]
    page = render_graph_html(gm, "small", lambda n: None)
    root = _svg(page)
    boxes = _boxes(root)
    assert set(boxes) == {n.name for n in gm.graph.nodes}
    n_edges = sum(len(set(n.all_input_nodes)) for n in gm.graph.nodes)
    assert len([p for p in root.iter(f"{SVG_NS}path") if "edge" in p.get("class", "")]) == n_edges
    fc = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert target_name(fc, gm) == "Linear: fc"
    assert "f32[3, 8]" in node_label(fc)
    assert "k-placeholder" in boxes["x"].get("class")
    assert "k-get_attr" in boxes["scale"].get("class")
    assert "k-output" in boxes["output"].get("class")
    # Layers run top to bottom: every edge points downwards.
    ys = {name: float(g.find(f"{SVG_NS}rect").get("y")) for name, g in boxes.items()}
    for n in gm.graph.nodes:
        for i in n.all_input_nodes:
            assert ys[i.name] < ys[n.name]
    assert "Highlighted nodes (0)" in page


def test_aten_graph_with_symbolic_sizes_and_highlights():
    gm = _aten_graph()
    nodes = list(gm.graph.nodes)
    assert any(isinstance(getattr(n.meta.get("val"), "shape", [None])[0], torch.SymInt) for n in nodes)

    def highlight(node):
        if node.target == torch.ops.aten._softmax.default:
            return "attention"
        if node.target in (torch.ops.aten.mm.default,):
            return "quantize"
        return None

    marked = {n.name: highlight(n) for n in nodes if highlight(n)}
    assert set(marked.values()) == {"attention", "quantize"}
    page = render_graph_html(gm, "aten", highlight)
    root = _svg(page)
    boxes = _boxes(root)
    assert set(boxes) == {n.name for n in nodes}

    colours = {}
    for name, g in boxes.items():
        classes = g.get("class").split()
        if name in marked:
            assert "hl" in classes and g.get("data-highlight") == marked[name]
            rect = g.find(f"{SVG_NS}rect")
            colours.setdefault(marked[name], set()).add(rect.get("fill"))
            assert f"highlight: {marked[name]}" in g.find(f"{SVG_NS}title").text
        else:
            assert "hl" not in classes and g.find(f"{SVG_NS}rect").get("fill") is None
    # One colour per highlight string, different strings different colours, all in the legend.
    assert all(len(c) == 1 for c in colours.values())
    assert len({next(iter(c)) for c in colours.values()}) == 2
    for mark, (colour,) in colours.items():
        assert f"background:{colour}" in page and f"highlight: {mark}" in page

    # The table under the picture lists exactly the highlighted nodes.
    table = page[page.index("<h2>Highlighted nodes"):]
    assert f"Highlighted nodes ({len(marked)})" in table
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td[^>]*>([^<]*)</td></tr>", table)
    assert {r[0]: r[2] for r in rows} == marked
    assert any("aten::_softmax" in r[1] for r in rows)

    # Symbolic sizes are printed as symbols; short names are namespace.op.
    labels = "\n".join(node_label(n) for n in nodes)
    assert re.search(r"f32\[s\d+, s\d+\]", labels)
    assert "aten.mm" in labels and "aten._softmax" in labels
    title = boxes[next(iter(marked))].find(f"{SVG_NS}title").text
    assert "aten::" in title and "value: f32[" in title


def test_text_is_escaped():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    odd = graph.call_method("a<b>&c'd", (x,))  # GraphModule's codegen needs a valid string
    graph.output(odd)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    evil = "<script>alert('x')</script> & \"q\""
    page = render_graph_html(gm, "t<i>tle & co", lambda n: evil if n is odd else None)
    assert "<script" not in page
    assert "a<b>" not in page and "<i>" not in page
    assert "a&lt;b&gt;&amp;c&#x27;d" in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;q&quot;" in page
    assert "t&lt;i&gt;tle &amp; co" in page
    root = _svg(page)  # still well-formed
    g = _boxes(root)[odd.name]
    assert evil in g.find(f"{SVG_NS}title").text  # the parser unescapes back to the original
    assert "call_method a<b>&c'd" in g.find(f"{SVG_NS}title").text


def test_page_is_self_contained():
    page = render_graph_html(_aten_graph(), "self-contained",
                             lambda n: "p" if n.op == "call_function" else None)
    assert page.startswith("<!DOCTYPE html>")
    lowered = page.lower()
    assert "<script" not in lowered and "<link" not in lowered and "@import" not in lowered
    assert "src=" not in lowered and "href" not in lowered
    # The only URL-looking text is the SVG namespace name, which is never fetched.
    assert "http" not in lowered.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert set(re.findall(r"url\(([^)]*)\)", page)) <= {"#arrow"}


def test_describe_value():
    assert describe_value(torch.zeros(2, 3, dtype=torch.bfloat16)) == "bf16[2, 3]"
    assert describe_value((torch.zeros(1), torch.zeros(2, dtype=torch.int64))) == "(f32[1], i64[2])"
    assert describe_value(None) == ""
    assert describe_value(3) == "3"


def test_large_graph_renders_quickly():
    class Deep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ws = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(4, 4)) for _ in range(300))

        def forward(self, x):
            outs = []
            for w in self.ws:
                y = torch.relu(x @ w)
                x = x + y
                outs.append(y.sum())
            return x, torch.stack(outs)

    gm = torch.fx.symbolic_trace(Deep())
    n = len(gm.graph.nodes)
    assert n >= 1500
    start = time.perf_counter()
    page = render_graph_html(gm, "deep", lambda node: "mm" if node.target is operator.matmul else None)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, elapsed
    root = _svg(page)
    assert len(_boxes(root)) == n
    assert sum("hl" in g.get("class").split() for g in _boxes(root).values()) == 300
    assert "Highlighted nodes (300)" in page
    # The viewBox holds every box and every edge (lanes included), and no row is wider than max_per_row boxes.
    _, _, width, height = map(float, root.get("viewBox").split())
    for g in _boxes(root).values():
        rect = g.find(f"{SVG_NS}rect")
        assert 0 <= float(rect.get("x")) and float(rect.get("x")) + float(rect.get("width")) <= width
        assert 0 <= float(rect.get("y")) and float(rect.get("y")) + float(rect.get("height")) <= height
    for path in root.iter(f"{SVG_NS}path"):
        for x, y in re.findall(r"(-?[\d.]+),(-?[\d.]+)", path.get("d")):
            assert 0 <= float(x) <= width and 0 <= float(y) <= height
    assert width <= 2 * 32 + 12 * 216 + 11 * 24
    # Sinking keeps each weight next to its matmul rather than all 300 in the first rows.
    ys = {name: float(g.find(f"{SVG_NS}rect").get("y")) for name, g in _boxes(root).items()}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            (user,) = node.users
            assert ys[node.name] < ys[user.name] <= ys[node.name] + 2 * (50 + 36)


def test_wide_layer_wraps_and_edges_stay_inside():
    graph = torch.fx.Graph()
    xs = [graph.placeholder(f"x{i}") for i in range(40)]
    doubled = [graph.call_function(operator.mul, (x, 2)) for x in xs]
    graph.output(graph.call_function(torch.stack, (doubled + xs[:3],)))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    root = _svg(render_graph_html(gm, "wide", lambda n: None, max_per_row=12))
    boxes = _boxes(root)
    xs_of = {name: float(g.find(f"{SVG_NS}rect").get("x")) for name, g in boxes.items()}
    ys_of = {name: float(g.find(f"{SVG_NS}rect").get("y")) for name, g in boxes.items()}
    assert len(set(xs_of.values())) == 12  # 12 columns
    assert len({ys_of[f"x{i}"] for i in range(40)}) == 4  # 40 inputs wrap onto 4 rows
    _, _, width, height = map(float, root.get("viewBox").split())
    # Edges from x0..x2 skip rows (to the stack, far below): they run in lanes inside the picture.
    for path in root.iter(f"{SVG_NS}path"):
        for x, y in re.findall(r"(-?[\d.]+),(-?[\d.]+)", path.get("d")):
            assert 0 <= float(x) <= width and 0 <= float(y) <= height


def test_bad_max_per_row():
    with pytest.raises(ValueError, match="max_per_row"):
        render_graph_html(_aten_graph(), "x", lambda n: None, max_per_row=0)
