"""Input mutations written in place (q3n_compile/memory/reinplace.py) and decode with a static cache."""

import torch
from torch.fx.experimental.proxy_tensor import make_fx

import q3n_compile
from q3n_compile.memory.reinplace import reinplace_input_mutations
from q3n_compile.models import build_model, new_kv_cache

aten = torch.ops.aten


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _functional_graph(fn, *args):
    # index_copy + copy_ back into the input: the form AOTAutograd leaves with
    # keep_inference_input_mutations=True.
    gm = make_fx(torch.func.functionalize(fn))(*args)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def test_decode_step_writes_the_cache_in_place_and_matches_eager():
    torch.manual_seed(0)
    model = build_model("qwen3", "tiny").eval()
    ids = torch.randint(0, 100, (2, 5))
    eager_cache, q3n_cache = new_kv_cache(model, 2, 24), new_kv_cache(model, 2, 24)
    compiled = torch.compile(model, backend="q3n")
    with torch.no_grad():
        for step, (tokens, pos) in enumerate([(ids, torch.arange(5)), (ids[:, :1], torch.tensor([5])),
                                              (ids[:, 1:2], torch.tensor([6]))]):
            expected = model(tokens, kv_cache=eager_cache, cache_position=pos)
            key_ptr = q3n_cache.keys[0].data_ptr()
            actual = compiled(tokens, kv_cache=q3n_cache, cache_position=pos)
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
            assert q3n_cache.keys[0].data_ptr() == key_ptr
            for mine, theirs in zip(q3n_cache.keys + q3n_cache.values, eager_cache.keys + eager_cache.values):
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    report = q3n_compile.reports()[-1]
    mutations = report["passes"]["memory_plan"]["detail"]["input_mutations"]
    layers = len(q3n_cache.keys)
    assert mutations["rewritten"] == 2 * layers, mutations
    assert report["ops"].get("aten.index_copy_.default") == 2 * layers
    assert "aten.copy_.default" not in report["ops"]
    assert "aten.index_copy.default" not in report["ops"]


def test_index_copy_then_copy_back_becomes_one_inplace_write():
    def f(cache, pos, new):
        cache.index_copy_(1, pos, new)
        return cache.sum(1) * 2

    args = (torch.randn(3, 9, 4), torch.tensor([2, 7]), torch.randn(3, 2, 4))
    gm = _functional_graph(f, *[a.clone() for a in args])
    assert aten.copy_.default in _targets(gm)
    stats = reinplace_input_mutations(gm)
    assert stats["rewritten"] == 1 and stats["declined"] == {}
    assert aten.copy_.default not in _targets(gm) and aten.index_copy_.default in _targets(gm)
    expected_cache, actual_cache = args[0].clone(), args[0].clone()
    expected = f(expected_cache, args[1], args[2])
    actual = gm(actual_cache, args[1], args[2])
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_cache, expected_cache)


def test_old_value_read_after_the_mutation_is_declined():
    # Built by hand: functionalization never orders an old-value read after the write, but a pass
    # might; the rewrite must then keep the copy.
    g = torch.fx.Graph()
    cache, pos, new = g.placeholder("cache"), g.placeholder("pos"), g.placeholder("new")
    written = g.call_function(aten.index_copy.default, (cache, 0, pos, new))
    old_view = g.call_function(aten.view.default, (cache, [-1]))
    old_sum = g.call_function(aten.sum.default, (old_view,))
    g.call_function(aten.copy_.default, (cache, written))
    g.output((old_sum, g.call_function(aten.sum.default, (written,))))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    FakeTensorProp(gm, FakeTensorMode()).propagate(torch.randn(5, 3), torch.tensor([1]), torch.randn(1, 3))
    stats = reinplace_input_mutations(gm)
    assert stats["rewritten"] == 0
    assert stats["declined"] == {"the input's old value is read after the mutation": 1}
    c = torch.randn(5, 3)
    old, total = gm(c.clone(), torch.tensor([1]), torch.ones(1, 3))
    torch.testing.assert_close(old, c.sum())


def test_mutated_value_returned_as_output_matches_eager():
    def f(buf, pos, new):
        buf.index_copy_(0, pos, new)
        return buf * 1.5, buf

    args = lambda: (torch.randn(6, 2), torch.tensor([4]), torch.randn(1, 2))  # noqa: E731
    expected_buf, actual_buf = args(), args()
    actual_buf = tuple(a.clone() for a in expected_buf)
    expected = f(*expected_buf)
    actual = torch.compile(f, backend="q3n")(*actual_buf)
    torch.testing.assert_close(actual[0], expected[0])
    torch.testing.assert_close(actual_buf[0], expected_buf[0])


def test_op_reading_the_input_through_another_argument_is_declined():
    def f(buf):
        buf.add_(buf.t())
        return buf.sum()

    gm = _functional_graph(f, torch.randn(4, 4))
    stats = reinplace_input_mutations(gm)
    assert stats["rewritten"] == 0
    assert stats["declined"] == {"the op also reads the input through another argument": 1}


def test_a_buffer_the_model_writes_is_state_not_a_frozen_weight():
    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(3))
            self.weight = torch.nn.Parameter(torch.randn(3, 3))

        def forward(self, x):
            self.seen.add_(x.sum(0))
            return x @ self.weight + self.seen

    eager, mine = Counter(), Counter()
    mine.load_state_dict(eager.state_dict())
    compiled = torch.compile(mine, backend="q3n")
    with torch.no_grad():
        for _ in range(3):  # the buffer changes every call: folding it would fail the weight guard
            x = torch.randn(4, 3)
            torch.testing.assert_close(compiled(x), eager(x))
    torch.testing.assert_close(mine.seen, eager.seen)
    report = q3n_compile.reports()[-1]
    assert report["runtime"]["frozen_weights"] == []
