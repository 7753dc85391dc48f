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


class ThreeHeads(nn.Module):
    """Three siblings on one input of width k: widths (a, b, c), b without a bias."""

    def __init__(self, k, widths):
        super().__init__()
        self.a, self.b = nn.Linear(k, widths[0]), nn.Linear(k, widths[1], bias=False)
        self.c = nn.Linear(k, widths[2])

    def forward(self, x):
        return self.a(x), self.b(x), self.c(x)


def _merged_and_apart(model, x, qc, columns):
    """`model` compiled with `qc` merged (asserting one q3n.qlinear call whose outputs are
    `columns` of the merged weight) and with ``merge_siblings`` false (three calls): both
    outputs."""
    torch._dynamo.reset()
    merged = torch.compile(model, backend="q3n", options={"quant_config": qc, "strict": True})(x)
    report = q3n_compile.reports()[-1]
    assert report["ops"]["q3n.qlinear.default"] == 1, qc
    (group,) = report["passes"]["quantize"]["detail"]["siblings"]["groups"]
    assert group["columns"] == columns
    torch._dynamo.reset()
    apart = torch.compile(model, backend="q3n", options={
        "quant_config": {**qc, "merge_siblings": False}, "strict": True})(x)
    assert q3n_compile.reports()[-1]["ops"]["q3n.qlinear.default"] == 3
    return merged, apart


def test_merged_call_in_the_interpreter_matches_the_separate_calls():
    """The Triton kernels (interpreter) on a merged call of three odd widths, one without a bias."""
    torch.manual_seed(0)
    model = ThreeHeads(64, (24, 8, 13)).eval()
    x = torch.randn(3, 5, 64)
    for fmt in ({"weight_bits": 4, "activation_bits": 8, "activation_format": "int8",
                 "group_size": 32},
                {"weight_bits": 8, "activation_bits": 8, "activation_format": "int8",
                 "group_size": -1},
                {"weight_bits": 6, "activation_bits": 16, "group_size": 32}):
        qc = {"rules": [{"match": "*", **fmt}], "calibration": RTN}
        merged, apart = _merged_and_apart(model, x, qc, [[0, 24], [24, 32], [32, 45]])
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



def _outlier_rows(g, rows, k=64):
    x = torch.randn(rows, k, generator=g)
    x[:, 5] *= 40  # an outlier channel: smoothing pays
    return x


@pytest.mark.usefixtures("reference_kernels")
def test_calibrated_siblings_take_the_groups_smoothing_choice_where_it_suits_them(capsys):
    """With calibration, 8-bit-activation siblings would each choose a smoothing vector and stay
    apart. By default (merge_siblings true) the group's choice, made once for the concatenated
    weight, is offered to each member, which takes it if its calibration error rises by at most
    ``share_smoothing_within`` (0.02): gate and up take it and merge; a third sibling that leans
    on the outlier channel (smoothing it away costs that layer's weight precision) keeps its own
    vector, stays apart, and the report says why. ``"shared_smoothing"`` imposes the group's
    choice on all three; ``false`` offers nothing. Outputs stay within W8A8's noise of eager."""

    class GateUpSide(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up = nn.Linear(64, 48, bias=False), nn.Linear(64, 48, bias=False)
            self.side = nn.Linear(64, 16, bias=False)
            with torch.no_grad():
                self.side.weight[:, 5] *= 50

        def forward(self, x):
            return self.gate(x), self.up(x), self.side(x)

    torch.manual_seed(0)
    model = GateUpSide().eval()
    g = torch.Generator().manual_seed(1)
    from q3n_compile import quant
    quant.calibrate(model, [_outlier_rows(g, 64) for _ in range(4)])
    # Unrotated: the rotation (int8's default) spreads the outlier channel that makes
    # smoothing pay here.
    qc = {"rules": [{"match": "*", "weight_bits": 8, "activation_bits": 8,
                     "activation_format": "int8", "group_size": -1, "rotation": 0}]}
    x = _outlier_rows(g, 16)

    def compile_with(extra, **options):
        torch._dynamo.reset()
        out = torch.compile(model, backend="q3n", options={"quant_config": {**qc, **extra},
                                                           **options})(x)
        for o, w in zip(out, model(x)):
            assert _rel(o, w) < 0.02
        q = q3n_compile.reports()[-1]["passes"]["quantize"]["detail"]
        return q, {e["layer"]: e for e in q["layers"]}

    q, layers = compile_with({}, progress=True)
    assert "q3n: quantize: sibling smoothing 1/1 gate, up, side: 2 took the group's choice" in \
        capsys.readouterr().err
    assert [g["layers"] for g in q["siblings"]["groups"]] == [["gate", "up"]]
    for name in ("gate", "up"):
        offer = layers[name]["shared_smoothing"]
        assert offer["adopted"] and offer["within"] == 0.02
        assert offer["rel_err"] <= 1.02 * offer["own_rel_err"]
        assert layers[name]["method"].endswith("+smooth(shared with siblings)")
    side = layers["side"]["shared_smoothing"]
    assert not side["adopted"] and side["rel_err"] > 1.02 * side["own_rel_err"]
    assert "shared" not in layers["side"]["method"]  # its own choice (here: no smoothing)
    [apart] = q["siblings"]["apart"]
    assert apart["layers"] == ["gate", "side"]
    assert apart["reason"].startswith("different smoothing vectors (each quantizes x its own way)"
                                      "; side kept its own: the group's raised its calibration "
                                      "error ")
    assert apart["reason"].endswith("more than share_smoothing_within allows (1.02x)")
    shared = [r for _, r in C._CACHE.values() if hasattr(r, "smooth")
              and "shared" in r.info["method"]]
    assert len(shared) == 2 and torch.equal(shared[0].smooth, shared[1].smooth)

    q, layers = compile_with({"merge_siblings": "shared_smoothing"})
    assert [g["layers"] for g in q["siblings"]["groups"]] == [["gate", "up", "side"]]
    assert all(e["method"].endswith("+smooth(shared with siblings)") for e in layers.values())
    assert not any("shared_smoothing" in e for e in layers.values())  # imposed, not offered

    q, layers = compile_with({"merge_siblings": False})
    assert q["siblings"] is None
    assert all("shared" not in e["method"] and "shared_smoothing" not in e
               for e in layers.values())
    assert layers["gate"]["method"].endswith("+smooth(noise-model)")


def test_group_choice_is_remade_without_the_member_it_suits_least():
    """choose_shared_smoothing with a tolerance: every member that takes the choice is within it
    of its own error; the member it suits least is dropped and the choice made again for the
    rest; a member never takes it alone; without a tolerance every member takes it."""
    from q3n_compile.quant.algorithms import choose_shared_smoothing
    from q3n_compile.quant.config import CalibrationSettings, LayerFormat

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, 3] *= 30
    a, b = torch.randn(32, 64, generator=g), torch.randn(16, 64, generator=g)
    lean = torch.randn(16, 64, generator=g)
    lean[:, 3] *= 50  # leans on the outlier channel
    stats = C.LayerStats(64, 512)
    stats.add(x)
    fmt = LayerFormat(8, 8, -1, True, "int8")
    settings = CalibrationSettings()
    t, adopted, info = choose_shared_smoothing([a, b, lean], [None] * 3, fmt, settings, stats,
                                               0.02)
    assert adopted == [True, True, False] and t is not None
    for m, took in zip(info["members"], adopted):
        assert (m["rel_err"] <= 1.02 * m["own_rel_err"]) == took
    t_ab, adopted_ab, _ = choose_shared_smoothing([a, b], [None] * 2, fmt, settings, stats, 0.02)
    assert adopted_ab == [True, True] and torch.equal(t, t_ab)  # made again without `lean`
    _, adopted, info = choose_shared_smoothing([a, lean], [None] * 2, fmt, settings, stats, 0.02)
    assert adopted == [False, False]
    assert info["members"][0]["rel_err"] > 1.02 * info["members"][0]["own_rel_err"] or \
        info["members"][1]["rel_err"] > 1.02 * info["members"][1]["own_rel_err"]
    _, adopted, _ = choose_shared_smoothing([a, b, lean], [None] * 3, fmt, settings, stats)
    assert adopted == [True, True, True]


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
    t1, _, _ = choose_shared_smoothing([a, b], [None, None], fmt, settings, stats)
    t2, _, _ = choose_shared_smoothing([a * 1000, b], [None, None], fmt, settings, stats)
    assert t1 is not None and t2 is not None
    torch.testing.assert_close(t1, t2, rtol=2e-3, atol=0)
    alone = noise_model_smoothing(x, a, fmt)
    assert (t1 - alone).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# GPU lane: merged calls of odd widths on the compiled kernels, at the row counts of each path.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows", [1, 16, 100, 300])
@pytest.mark.parametrize("fmt", [
    {"weight_bits": 4, "activation_bits": 16, "group_size": 128},
    {"weight_bits": 4, "activation_bits": 8, "group_size": 128},
    {"weight_bits": 6, "activation_bits": 12, "group_size": 64},
    {"weight_bits": 8, "activation_bits": 8, "group_size": -1},
], ids=["w4a16", "w4a8", "w6a12", "w8a8"])
def test_gpu_merged_call_of_odd_widths_matches_the_separate_calls(fmt, rows):
    """Three siblings of widths 200 / 72 (no bias) / 136 on K 512, bf16: one merged call whose
    column slices match the separate calls (the GEMM's sums may run in another order) and the
    float64 linears within the format's noise."""
    torch.manual_seed(0)
    model = ThreeHeads(512, (200, 72, 136)).eval().to("cuda", torch.bfloat16)
    x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
    qc = {"rules": [{"match": "*", **fmt}], "calibration": RTN}
    merged, apart = _merged_and_apart(model, x, qc, [[0, 200], [200, 272], [272, 408]])
    noise = {4: 0.12, 6: 0.04, 8: 0.02}[fmt["weight_bits"]]
    for m, a, (name, lin) in zip(merged, apart, model.named_children()):
        assert m.shape == a.shape == (rows, lin.out_features)
        assert _rel(m, a) < 1e-2, name
        ref = F.linear(x.double(), lin.weight.double(),
                       None if lin.bias is None else lin.bias.double())
        assert _rel(m, ref) < noise, (name, _rel(m, ref))
