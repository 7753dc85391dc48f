"""Liveness with aliasing, end to end through torch.compile: views, in-place reuse, outputs, mutation.

Each case is checked twice: structurally (what the analysis decided) and by results against eager
over two calls with different inputs — a wrong lifetime lets a later buffer overwrite a value that
is still read, which shows as a wrong result.
"""

import torch

import q3n_compile

# Other passes off: these cases are about the memory plan only.
OPTIONS = {"attention": "off", "norm_fusion": False, "verify": True}


def _run(fn, make_args, runtimes, calls=2):
    compiled = torch.compile(fn, backend="q3n", options=OPTIONS)
    results = []
    with torch.no_grad():
        for seed in range(calls):
            torch.manual_seed(seed)
            args = make_args()
            eager_args = [a.clone() for a in args]
            got = compiled(*args)
            want = fn(*eager_args)
            torch.testing.assert_close(got, want)
            for a, b in zip(args, eager_args):  # input mutations happened as in eager
                torch.testing.assert_close(a, b)
            results.append((got, want))
    # Outputs are their own memory: later calls did not change earlier results.
    for got, want in results:
        torch.testing.assert_close(got, want)
    (report,) = q3n_compile.reports()
    assert report["memory"]["status"] == "applied" and report["memory"]["verified"] is True
    assert report["verify"]["status"] == "passed"
    return runtimes[-1]


def _value(spec, op):
    return next(v for v in spec.values if v.op == op)


def _position(rt, name):
    return rt.spec.order.index(name)


def _last_user_position(rt, node_name):
    nodes = {n.name: n for n in rt.module.graph.nodes}
    order = [n.name for n in rt.module.graph.nodes if n.name in set(rt.spec.order)]
    users = [u.name for u in nodes[node_name].users if u.name in set(rt.spec.order)]
    return max(order.index(u) for u in users) if users else order.index(node_name)


def test_a_view_keeps_its_base_alive(runtimes):
    def f(x, w):
        h = torch.mm(x, w)
        hv = h.t()  # a view, read at the very end
        a = torch.sin(x)
        b = torch.cos(a) * 3
        return (hv * 2).sum(0) + b.sum(1)

    rt = _run(f, lambda: (torch.randn(16, 16), torch.randn(16, 16)), runtimes)
    mm = _value(rt.spec, "aten.mm.default")
    group = rt.spec.groups[mm.group]
    nodes = {n.name: n for n in rt.module.graph.nodes}
    views = [u for u in nodes[mm.node].users
             if u.target in (torch.ops.aten.t.default, torch.ops.aten.permute.default, torch.ops.aten.transpose.int)]
    assert views
    # The base lives until the last use of the view (the mul), past the sin/cos buffers' births.
    assert group.end >= _last_user_position(rt, views[0].name) > _value(rt.spec, "aten.sin.default").position
    sin = _value(rt.spec, "aten.sin.default")
    assert rt.spec.groups[sin.group] is not group


def test_unsafe_view_is_an_alias(runtimes):
    def f(x, w):
        h = x @ w  # 3-D @ 2-D: view, mm, _unsafe_view
        a = torch.sin(x).sum()
        b = torch.cos(x) * 2
        return h.sum(-1) + a + b.sum(-1)

    rt = _run(f, lambda: (torch.randn(2, 5, 8), torch.randn(8, 8)), runtimes)
    mm = _value(rt.spec, "aten.mm.default")
    nodes = {n.name: n for n in rt.module.graph.nodes}
    unsafe = [u for u in nodes[mm.node].users if "unsafe_view" in str(u.target)]
    assert unsafe, "the graph should reshape the mm result with _unsafe_view"
    assert rt.spec.groups[mm.group].end >= _last_user_position(rt, unsafe[0].name)
    assert not any("unsafe_view" in v.op for v in rt.spec.values)


def test_unsafe_view_after_a_pass_rewrote_its_producer(runtimes, monkeypatch):
    """A pass that replaces a producer gives it a new FakeTensor; the _unsafe_view after it keeps
    the old one, so storages no longer tell the alias: the op itself must."""
    from q3n_compile import pipeline
    from q3n_compile.passes.base import PassStats

    def remake_mm(gm, ctx):
        for node in list(gm.graph.nodes):
            if node.target is torch.ops.aten.mm.default:
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_function(torch.ops.aten.mm.default, node.args)
                with ctx.fake_mode:
                    new.meta["val"] = torch.ops.aten.mm.default(*[a.meta["val"] for a in node.args])
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
        return PassStats()

    memory = next(p for p in pipeline.PASSES if p.name == "memory_plan")
    monkeypatch.setattr(pipeline, "PASSES", (pipeline.PassSpec("remake", remake_mm, lambda c: None), memory))

    def f(x, w):
        h = x @ w
        a = torch.sin(x) * 2  # same size as h: would take h's slot if h were thought dead
        b = torch.cos(a) + 1
        return h * 3 + b

    rt = _run(f, lambda: (torch.randn(2, 5, 8), torch.randn(8, 8)), runtimes)
    mm = _value(rt.spec, "aten.mm.default")
    nodes = {n.name: n for n in rt.module.graph.nodes}
    (unsafe,) = [u for u in nodes[mm.node].users if "unsafe_view" in str(u.target)]
    assert rt.spec.groups[mm.group].end >= _last_user_position(rt, unsafe.name)


def test_elementwise_op_reuses_a_dying_input(runtimes):
    def f(x, w):
        h = torch.mm(x, w)
        g = torch.sigmoid(h)  # h dies here: g is written over it
        return torch.mm(g, w).sum(0)

    rt = _run(f, lambda: (torch.randn(12, 12), torch.randn(12, 12)), runtimes)
    sig = _value(rt.spec, "aten.sigmoid.default")
    assert sig.inplace_of == _value(rt.spec, "aten.mm.default").node
    (report,) = q3n_compile.reports()
    assert report["memory"]["inplace_count"] >= 1


def test_slice_and_row_assignments_write_into_the_dying_tensor(runtimes):
    # transformers' torch fallback of the gated delta rule writes row i of a chunk matrix in a
    # loop (attn[..., i, :i] = ...). Functionalised, each write is a scatter that returns a whole
    # new matrix; written over the dying old one, only the row is stored.
    def f(x, y):
        a = x * 0.5
        for i in range(1, 5):
            a[..., i, :i] = a[..., i, :i] + (a[..., i, :, None] * a[..., :i]).sum(-2) * 0.1
        a[:, 1:3] = a[:, 3:5]  # the source is a view of the tensor it is written into
        b = a.exp()
        b[0] = y
        return b * 1.5

    rt = _run(f, lambda: (torch.randn(3, 5, 5), torch.randn(5, 5)), runtimes)
    scatters = [v for v in rt.spec.values if v.op in ("aten.select_scatter.default", "aten.slice_scatter.default")]
    assert {v.op for v in scatters} == {"aten.select_scatter.default", "aten.slice_scatter.default"}
    assert sum(v.inplace_of is not None for v in scatters) >= 4
    (report,) = q3n_compile.reports()
    assert not any("scatter" in reason for reason in report["memory"]["unplanned_reasons"]
                   if "computes then copies" in reason)


def test_scatter_writers_keep_their_inputs_whatever_memory_they_are_given():
    from q3n_compile.memory.writers import select_scatter_into, slice_scatter_into

    base = torch.randn(4, 6)
    want = torch.slice_scatter(base, torch.ones(4, 2), 1, 2, 4)
    out = torch.empty(4, 6)
    assert torch.equal(slice_scatter_into(out, base, torch.ones(4, 2), 1, 2, 4), want)
    inplace = base.clone()  # out is self: the row is written, nothing else changes
    assert torch.equal(slice_scatter_into(inplace, inplace, torch.ones(4, 2), 1, 2, 4), want)
    # out is the source's own (dying) memory: the source is read before it is overwritten.
    src = torch.randn(4, 6)
    want = torch.slice_scatter(base, src, 1, 0, 6)
    assert torch.equal(slice_scatter_into(src, base, src, 1, 0, 6), want)
    row = torch.randn(6)
    want = torch.select_scatter(base, row, 0, 2)
    assert torch.equal(select_scatter_into(torch.empty(4, 6), base, row, 0, 2), want)
    assert torch.equal(select_scatter_into(base, base, row, 0, 2), want)


def test_no_inplace_when_the_input_is_read_later(runtimes):
    def f(x, w):
        h = torch.mm(x, w)
        g = torch.sigmoid(h)
        return (g + h).sum(0)  # h still alive after the sigmoid

    rt = _run(f, lambda: (torch.randn(12, 12), torch.randn(12, 12)), runtimes)
    assert _value(rt.spec, "aten.sigmoid.default").inplace_of is None


def test_no_inplace_over_a_partially_overlapping_alias(runtimes):
    def f(x, w):
        h = torch.mm(x, w)
        y = h * h.t()  # h dies here but is read through two different layouts
        return torch.mm(y, w).sum(0)

    rt = _run(f, lambda: (torch.randn(10, 10), torch.randn(10, 10)), runtimes)
    assert _value(rt.spec, "aten.mul.Tensor").inplace_of is None


def test_no_inplace_across_shapes_or_dtypes(runtimes):
    def f(x, w):
        h = torch.mm(x, w)
        r = h.sum(1, keepdim=True)
        y = (r * h).to(torch.float64)  # r dies at the mul, but has another shape
        return y.sum(0)

    rt = _run(f, lambda: (torch.randn(9, 7), torch.randn(7, 7)), runtimes)
    mul = _value(rt.spec, "aten.mul.Tensor")
    assert mul.inplace_of != _value(rt.spec, "aten.sum.dim_IntList").node


def test_outputs_aliasing_inputs_are_left_alone(runtimes):
    def f(x):
        return x.view(-1), torch.sin(x) * 2

    rt = _run(f, lambda: (torch.randn(6, 4),), runtimes)
    names = {v.node for v in rt.spec.values}
    placeholders = {n.name for n in rt.module.graph.nodes if n.op == "placeholder"}
    assert not names & placeholders


def test_a_returned_view_of_an_intermediate_is_never_planned(runtimes):
    def f(x, w):
        h = torch.mm(x, w)
        s = torch.sin(h)
        return s.t(), torch.cos(s).sum()

    rt = _run(f, lambda: (torch.randn(8, 8), torch.randn(8, 8)), runtimes, calls=3)
    assert "aten.sin.default" in {u.op for u in rt.spec.outputs}
    assert "aten.sin.default" not in {v.op for v in rt.spec.values}
    assert _value(rt.spec, "aten.mm.default")  # the mm is still planned


def test_input_mutation(runtimes):
    def f(x, buf):
        buf.add_(1.0)
        return torch.sin(x) * 2 + buf

    rt = _run(f, lambda: (torch.randn(4, 4), torch.randn(4, 4)), runtimes)
    # The functional add + copy_ back became one add_ into the input (memory/reinplace.py).
    targets = [n.target for n in rt.module.graph.nodes]
    assert torch.ops.aten.add_.Tensor in targets and torch.ops.aten.copy_.default not in targets
    assert len(rt.spec.mutated_inputs) == 1 and rt.spec.mutates_inputs


def test_nothing_but_fresh_results_goes_in_the_arena(runtimes):
    def f(x, w):
        a = torch.relu(x @ w)
        return (a @ w.t()).softmax(-1)

    rt = _run(f, lambda: (torch.randn(7, 5), torch.randn(5, 5)), runtimes)
    nodes = {n.name: n for n in rt.module.graph.nodes}
    for v in rt.spec.values:
        assert nodes[v.node].op == "call_function"
    assert {u.reason for u in rt.spec.outputs} == {"graph output"}
