"""Sibling quantized linears as one GEMM (``quant_config["merge_siblings"]``, on by default):
the merged graph, its values against the separate calls and eager, the report, the one copy of
the packed bytes, and the groups left apart with their reasons."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import q3n_compile
from q3n_compile.models import build_model, example_inputs
from q3n_compile.passes import qlinear_siblings as SIB
from q3n_compile.quant import calibration as C

pytestmark = [pytest.mark.usefixtures("fresh_quant_state"),
              pytest.mark.filterwarnings("ignore:overflow encountered")]

RTN = {"method": "rtn", "clip_search": False, "smoothquant": False, "example_inputs": False}
W8A8 = {"weight_bits": 8, "activation_bits": 8, "group_size": -1}
DESIGN = {"ffn_layers": {"weight_bits": 4, "activation_bits": 8},
          "attn_layers": {"weight_bits": 6, "activation_bits": 12}}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _compile(model, inputs, qc, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="q3n", options={
        "quant_config": qc, "norm_fusion": False, **options})
    out = _logits(compiled(*inputs))
    return compiled, out, q3n_compile.reports()[-1]


@pytest.mark.usefixtures("reference_kernels")
@pytest.mark.parametrize("fmt", ["w8a8", "design"])
def test_qkv_and_gate_up_become_one_gemm_each(fmt):
    model = build_model("qwen3", "tiny")
    inputs = example_inputs("qwen3", model, 2, 16, seed=3)
    want = _logits(model(*inputs))
    qc = ({"ffn_layers": W8A8, "attn_layers": W8A8} if fmt == "w8a8" else dict(DESIGN))
    qc["calibration"] = RTN
    _, merged, report = _compile(model, inputs, qc)
    _, apart, report_apart = _compile(model, inputs, {**qc, "merge_siblings": False})

    q = report["passes"]["quantize"]
    sib = q["detail"]["siblings"]
    assert [g["layers"] for g in sib["groups"]] == [
        [f"layers.{i}.self_attn.{p}_proj" for p in "qkv"] if j == 0 else
        [f"layers.{i}.mlp.gate_proj", f"layers.{i}.mlp.up_proj"]
        for i in range(2) for j in range(2)]
    # tiny qwen3: hidden 64, 4 query heads and 2 k/v heads of 16, intermediate 128.
    assert sib["groups"][0]["columns"] == [[0, 64], [64, 96], [96, 128]]
    assert sib["groups"][1]["columns"] == [[0, 128], [128, 256]]
    assert sib["calls_saved"] == 6 and sib["apart"] == []
    assert report["ops"]["q3n.qlinear.default"] == 14 - 6
    assert report["ops"]["aten.slice.Tensor"] == report_apart["ops"].get("aten.slice.Tensor", 0) + 10
    assert report_apart["ops"]["q3n.qlinear.default"] == 14
    assert report_apart["passes"]["quantize"]["detail"]["siblings"] is None
    # Every layer is still reported as itself, with where its columns sit.
    layers = {e["layer"]: e for e in q["detail"]["layers"]}
    assert len(layers) == 14
    assert layers["layers.1.self_attn.k_proj"]["merged"] == {
        "call": "layers.1.self_attn.q_proj+layers.1.self_attn.k_proj+layers.1.self_attn.v_proj",
        "columns": [64, 96]}
    assert "merged" not in layers["layers.1.self_attn.o_proj"]
    assert q["detail"]["weight_bytes_after"] == (
        report_apart["passes"]["quantize"]["detail"]["weight_bytes_after"])
    # The same codes, scales and activations: the columns are the separate calls' values (the
    # reference kernels sum in one order either way).
    torch.testing.assert_close(merged, apart, rtol=1e-5, atol=1e-5)
    assert _rel(merged, want) < (0.03 if fmt == "w8a8" else 0.2)


def test_merged_call_in_the_interpreter_matches_the_separate_calls():
    """The Triton kernels (interpreter) on a merged call of three odd widths, one without a bias."""

    class ThreeHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(64, 24), nn.Linear(64, 8, bias=False), nn.Linear(64, 13)

        def forward(self, x):
            return self.a(x), self.b(x), self.c(x)

    torch.manual_seed(0)
    model = ThreeHeads().eval()
    x = torch.randn(3, 5, 64)
    for fmt in ({"weight_bits": 4, "activation_bits": 8, "activation_format": "int8",
                 "group_size": 32},
                {"weight_bits": 8, "activation_bits": 8, "activation_format": "int8",
                 "group_size": -1},
                {"weight_bits": 6, "activation_bits": 16, "group_size": 32}):
        qc = {"rules": [{"match": "*", **fmt}], "calibration": RTN}
        torch._dynamo.reset()
        merged = torch.compile(model, backend="q3n", options={"quant_config": qc, "strict": True})(x)
        report = q3n_compile.reports()[-1]
        assert report["ops"]["q3n.qlinear.default"] == 1, fmt
        (group,) = report["passes"]["quantize"]["detail"]["siblings"]["groups"]
        assert group["columns"] == [[0, 24], [24, 32], [32, 45]]
        torch._dynamo.reset()
        apart = torch.compile(model, backend="q3n", options={
            "quant_config": {**qc, "merge_siblings": False}, "strict": True})(x)
        assert q3n_compile.reports()[-1]["ops"]["q3n.qlinear.default"] == 3
        for m, a, (name, lin) in zip(merged, apart, model.named_children()):
            assert m.shape == a.shape == (3, 5, lin.out_features)
            torch.testing.assert_close(m, a, rtol=1e-4, atol=1e-4)
            assert _rel(m, lin(x)) < 0.1, (name, fmt)


@pytest.mark.usefixtures("reference_kernels")
@pytest.mark.parametrize("fmt", ["w8a8", "w4a16"])  # K-major int8 rows; bit planes' columns
def test_one_copy_of_the_packed_bytes_across_compiles(monkeypatch, fmt):
    """The cached per-layer results view the merged buffer; a recompile for another shape reuses
    that buffer instead of concatenating again; a compile that does not merge gets contiguous
    copies and the same values."""
    from q3n_compile import pipeline

    buffers = []

    def spy(spec):
        def run(gm, ctx):
            stats = spec.run(gm, ctx)
            if spec.name == "quantize":
                buffers.append(dict(gm.named_buffers()))
            return stats
        return dataclasses.replace(spec, run=run)

    monkeypatch.setattr(pipeline, "PASSES", tuple(spy(s) for s in pipeline.PASSES))
    model = build_model("qwen3", "tiny")
    layer = W8A8 if fmt == "w8a8" else {"weight_bits": 4}
    qc = {"ffn_layers": layer, "attn_layers": layer, "calibration": RTN}
    short = example_inputs("qwen3", model, 2, 16, seed=3)
    _, first, _ = _compile(model, short, qc)
    longer = example_inputs("qwen3", model, 1, 24, seed=4)
    _, second, _ = _compile(model, longer, qc)
    names = [[n for n in b if n.startswith("_q3n_siblings_") and n.endswith("_qweight")]
             for b in buffers]
    assert len(names[0]) == len(names[1]) == 4
    # Per-layer packed buffers are left for o_proj and down_proj only (2 layers).
    assert len([n for n in buffers[0] if n.startswith("_q3n_qlinear")
                and n.endswith("_qweight")]) == 4
    ptrs = [sorted(b[n].data_ptr() for n in ns) for b, ns in zip(buffers, names)]
    assert ptrs[0] == ptrs[1]
    merged = [n.replace("_qweight", "_scales") for n in names[0]]
    assert sorted(buffers[0][n].data_ptr() for n in merged) == sorted(
        buffers[1][n].data_ptr() for n in merged)
    # The quantize cache's per-layer results view those buffers.
    bases = {t.data_ptr() for t in (buffers[0][n] for n in names[0])}
    views = [r.packed.qweight for _, r in C._CACHE.values() if hasattr(r, "packed")]
    assert len(views) == 14
    assert sum(v._base is not None and v._base.data_ptr() in bases for v in views) == 10
    # Not merged: the views are copied to contiguous tensors for the separate calls.
    _, apart, report = _compile(model, short, {**qc, "merge_siblings": False})
    assert report["ops"]["q3n.qlinear.default"] == 14
    assert all(t.is_contiguous() for t in buffers[2].values())
    torch.testing.assert_close(apart, first, rtol=1e-5, atol=1e-5)
    assert _rel(second, _logits(model(*longer))) < (0.03 if fmt == "w8a8" else 0.2)


def test_joined_reuses_consecutive_views_and_concatenates_otherwise():
    base = torch.arange(24).reshape(2, 12).clone()
    parts = [base[:, :5], base[:, 5:9], base[:, 9:]]
    assert SIB._joined(parts, 1) is base
    shuffled = [base[:, 5:9], base[:, :5], base[:, 9:]]
    out = SIB._joined(shuffled, 1)
    assert out is not base and torch.equal(out, torch.cat(shuffled, 1))
    partial = [base[:, :5], base[:, 5:9]]  # not the whole base
    assert torch.equal(SIB._joined(partial, 1), base[:, :9])
    rows = torch.arange(20).reshape(5, 4).clone()
    assert SIB._joined([rows[:2], rows[2:]], 0) is rows


@pytest.mark.usefixtures("reference_kernels")
def test_siblings_left_apart_say_why():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(32, 32, bias=False) for _ in range(3))
            self.scaled = nn.Linear(32, 16)
            self.plain = nn.Linear(32, 16, bias=False)

        def forward(self, x):
            h = x * 2  # a second input, read by two linears
            # A bias computed in the graph cannot be folded into a merged bias.
            return (self.q(x), self.k(x), self.v(x),
                    F.linear(h, self.scaled.weight, self.scaled.bias * 2), self.plain(h))

    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(4, 32)
    qc = {"rules": [{"match": "k", "weight_bits": 4, "group_size": 32},
                    {"match": "*", "weight_bits": 8, "group_size": 32}], "calibration": RTN}
    torch._dynamo.reset()
    outs = torch.compile(model, backend="q3n", options={"quant_config": qc})(x)
    report = q3n_compile.reports()[-1]
    sib = report["passes"]["quantize"]["detail"]["siblings"]
    assert [g["layers"] for g in sib["groups"]] == [["q", "v"]]
    reasons = {tuple(a["layers"]): a["reason"] for a in sib["apart"]}
    assert reasons[("q", "k")] == "different formats (W8A16 g32 sym and W4A16 g32 asym)"
    # F.linear outside a module has no module path: the report names its node.
    assert reasons[("<addmm>", "plain")] == "a bias computed in the graph"
    assert report["ops"]["q3n.qlinear.default"] == 4
    for out, want in zip(outs, model(x)):
        assert _rel(out, want) < 0.1


def test_different_smoothing_vectors_stay_apart():
    a = SIB.Member(None, "a", "fmt", None, None, torch.ones(4), None, True, None)
    b = dataclasses.replace(a, layer="b", smooth=torch.full((4,), 2.0))
    same = dataclasses.replace(a, layer="c", smooth=torch.ones(4))
    none = dataclasses.replace(a, layer="d", smooth=None)

    class P:  # the fields _apart_reason reads of a packed weight
        qweight, zeros = torch.zeros(1, dtype=torch.int32), None

    for m in (a, b, same, none):
        m.pw = P
    assert SIB._apart_reason(a, same) is None
    assert "smoothing" in SIB._apart_reason(a, b)
    assert "smoothing" in SIB._apart_reason(a, none)


@pytest.mark.usefixtures("reference_kernels")
def test_merged_bias_parameters_are_frozen():
    """BERT's q/k/v carry biases: the merged call holds their values, so changing one after
    compiling raises, as changing a quantized weight does."""
    model = build_model("bert", "tiny")
    inputs = example_inputs("bert", model, 2, 8, seed=1)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="q3n", options={
        "quant_config": {"attn_layers": W8A8, "calibration": RTN}})
    compiled(*inputs)
    sib = q3n_compile.reports()[-1]["passes"]["quantize"]["detail"]["siblings"]
    assert len(sib["groups"]) == 2 and all(len(g["layers"]) == 3 for g in sib["groups"])
    with torch.no_grad():
        model.layers[0].attention.key.bias.add_(1.0)
    with pytest.raises(q3n_compile.FrozenWeightChanged):
        compiled(*inputs)



@pytest.mark.usefixtures("reference_kernels")
def test_calibrated_siblings_share_one_smoothing_choice_when_asked():
    """With calibration, 8-bit-activation siblings would each choose a smoothing vector; the
    group's choice is made once for their concatenated weight, so they quantize x alike and
    merge with ``merge_siblings: "shared_smoothing"`` (by default they stay apart). An outlier
    input channel makes smoothing worth it here: every member gets the same vector, and the
    merged outputs stay within W8A8's noise of eager."""

    class GateUp(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up = nn.Linear(64, 48, bias=False), nn.Linear(64, 48, bias=False)

        def forward(self, x):
            return self.gate(x), self.up(x)

    torch.manual_seed(0)
    model = GateUp().eval()
    g = torch.Generator().manual_seed(1)

    def batch(rows):
        x = torch.randn(rows, 64, generator=g)
        x[:, 5] *= 40  # an outlier channel
        return x

    from q3n_compile import quant
    quant.calibrate(model, [batch(64) for _ in range(4)])
    qc = {"rules": [{"match": "*", "weight_bits": 8, "activation_bits": 8,
                     "activation_format": "int8", "group_size": -1}]}
    x = batch(16)
    # By default each layer chooses its own vector: they stay apart, and the report says why.
    torch._dynamo.reset()
    torch.compile(model, backend="q3n", options={"quant_config": qc})(x)
    q = q3n_compile.reports()[-1]["passes"]["quantize"]["detail"]
    assert q["siblings"]["groups"] == []
    assert q["siblings"]["apart"] == [{"layers": ["gate", "up"], "reason": (
        "different smoothing vectors (each quantizes x its own way)")}]
    assert all(e["method"].endswith("+smooth(noise-model)") for e in q["layers"])
    torch._dynamo.reset()
    out = torch.compile(model, backend="q3n", options={
        "quant_config": {**qc, "merge_siblings": "shared_smoothing"}})(x)
    q = q3n_compile.reports()[-1]["passes"]["quantize"]["detail"]
    assert [g["layers"] for g in q["siblings"]["groups"]] == [["gate", "up"]]
    methods = {e["layer"]: e["method"] for e in q["layers"]}
    assert all(m.endswith("+smooth(shared with siblings)") for m in methods.values()), methods
    results = [r for _, r in C._CACHE.values() if hasattr(r, "smooth")
               and "shared" in r.info["method"]]
    assert len(results) == 2 and torch.equal(results[0].smooth, results[1].smooth)
    for o, w in zip(out, model(x)):
        assert _rel(o, w) < 0.02


def test_shared_smoothing_weighs_every_sibling_alike():
    """The group's choice is made with each member's rows scaled to unit output energy, so a
    member with outputs 1000x larger does not decide it alone: the vector is the same when one
    member's weight is scaled, and it is not the vector of the scaled member by itself."""
    from q3n_compile.quant.algorithms import choose_shared_smoothing, noise_model_smoothing
    from q3n_compile.quant.config import CalibrationSettings, LayerFormat

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, 3] *= 30  # an outlier channel: smoothing pays
    a = torch.randn(32, 64, generator=g)
    b = torch.randn(16, 64, generator=g) * torch.linspace(0.1, 3, 64)
    stats = C.LayerStats(64, 512)
    stats.add(x)
    fmt = LayerFormat(8, 8, -1, True, "int8")
    settings = CalibrationSettings()
    t1, _ = choose_shared_smoothing([a, b], [None, None], fmt, settings, stats)
    t2, _ = choose_shared_smoothing([a * 1000, b], [None, None], fmt, settings, stats)
    assert t1 is not None and t2 is not None
    torch.testing.assert_close(t1, t2, rtol=2e-3, atol=0)
    alone = noise_model_smoothing(x, a, fmt)
    assert (t1 - alone).abs().max() > 1e-2
