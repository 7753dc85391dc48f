"""The `attention` pass: every attention form becomes q3n::attention, or is declined with a reason.

End to end through ``torch.compile(backend="q3n")`` (kernels in Triton's interpreter on the CPU
lane) with outputs compared against eager, plus hand-built graphs for the SDPA forms only CUDA
produces (structure, and numerics on CPU through the kernel).
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel

import q3n_compile
from q3n_compile.config import Q3NConfig
from q3n_compile.models import build_model, example_inputs
from q3n_compile.passes import attention as attention_pass
from q3n_compile.passes.base import PassContext

aten = torch.ops.aten
ATTN_OP = "q3n.attention.default"
SOFTMAXES = ("aten._softmax.default", "aten._safe_softmax.default")


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _qkv(B=2, Hq=4, Hkv=4, Sq=11, Sk=11, D=16, dtype=torch.float32, seed=0):
    return (_rand(B, Hq, Sq, D, dtype=dtype, seed=seed), _rand(B, Hkv, Sk, D, dtype=dtype, seed=seed + 1),
            _rand(B, Hkv, Sk, D, dtype=dtype, seed=seed + 2))


def _rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


# This file tests the attention pass: the later passes are off (they have their own tests, and their
# kernels would only add interpreter time here); strict, so a failing pass fails the test.
OPTIONS = {"strict": True, "norm_fusion": False, "memory_plan": False}


def _compile(fn, *args, options=None, **compile_kwargs):
    """(compiled output, eager output, the one report)."""
    with torch.no_grad():
        want = fn(*args)
        got = torch.compile(fn, backend="q3n", options={**OPTIONS, **(options or {})},
                            **compile_kwargs)(*args)
    reports = q3n_compile.reports()
    assert len(reports) == 1, [r["graph_id"] for r in reports]
    return got, want, reports[0]


def _attn(report):
    return report["passes"]["attention"]


def _assert_rewritten(report, n, softmax_left=0):
    attn = _attn(report)
    assert attn["status"] == "applied", attn
    assert attn["rewritten"] == n, attn
    assert attn["matched"] == n, attn
    assert attn["declined"] == {}, attn
    assert report["ops"].get(ATTN_OP, 0) == n
    assert sum(report["ops"].get(s, 0) for s in SOFTMAXES) == softmax_left
    # The S x S score matrix is gone: no bmm is left that produces or consumes it.
    return attn["detail"]["rewrites"]


# --------------------------------------------------------------------------------------------
# SDPA through torch.compile (CPU capture gives _scaled_dot_product_flash_attention_for_cpu)
# --------------------------------------------------------------------------------------------


def _keep_mask(B, Sq, Sk, seed=5):
    keep = _rand(B, 1, Sq, Sk, seed=seed) > -0.3
    keep[..., 0] = True  # no fully masked row: eager's _softmax gives NaN there, SDPA/q3n 0
    return keep


@pytest.mark.parametrize("case", ["causal", "bool_mask", "additive_mask", "scale", "gqa_causal"])
def test_sdpa_forms_end_to_end(case):
    Hkv = 2 if case == "gqa_causal" else 4
    q, k, v = _qkv(Hkv=Hkv, Sq=11, Sk=13 if case in ("bool_mask", "additive_mask") else 11)
    mask = None
    if case == "bool_mask":
        mask = _keep_mask(2, 11, 13)
    elif case == "additive_mask":
        mask = _rand(2, 1, 11, 13, seed=7)
    kwargs = {"is_causal": case in ("causal", "gqa_causal"), "enable_gqa": case == "gqa_causal"}
    if case == "scale":
        kwargs["scale"] = 0.37

    def fn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)

    got, want, report = _compile(fn, q, k, v, mask)
    (rw,) = _assert_rewritten(report, 1)
    assert rw["form"] == "sdpa_flash_cpu"
    assert rw["causal"] == kwargs["is_causal"] and rw["causal_from"] == ("flag" if rw["causal"] else None)
    assert rw["mask"] == {"bool_mask": "bool", "additive_mask": "additive"}.get(case, "none")
    assert rw["gqa_groups"] == 4 // Hkv
    assert rw["scale"] == kwargs.get("scale")
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" not in report["ops"]
    assert _rel_err(got, want) < 1e-5


def test_sdpa_math_form_is_matched_written_out():
    """The math backend decomposes SDPA (scale on q and kᵀ, repeat_interleave GQA, _safe_softmax)."""
    q, k, v = _qkv(Hkv=2)

    def fn(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    got, want, report = _compile(fn, q, k, v)
    (rw,) = _assert_rewritten(report, 1)
    assert rw["form"] == "written_out" and rw["causal_from"] == "mask"
    assert rw["kv_unrepeated"] and rw["gqa_groups"] == 2
    assert rw["scale"] == pytest.approx(0.25)
    assert _rel_err(got, want) < 1e-5


def test_sdpa_with_dropout_is_declined():
    q, k, v = _qkv()

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    with torch.no_grad():
        torch.compile(fn, backend="q3n", options=OPTIONS)(q, k, v)
    (report,) = q3n_compile.reports()
    attn = _attn(report)
    assert attn["rewritten"] == 0 and attn["matched"] == 1
    assert list(attn["declined"]) == ["dropout p=0.5 in training mode"]
    assert ATTN_OP not in report["ops"]


# --------------------------------------------------------------------------------------------
# SDPA forms only CUDA produces: hand-built graphs, the pass run directly
# --------------------------------------------------------------------------------------------


def _run_pass(gm, fakes, attention="tiled"):
    ctx = PassContext(config=Q3NConfig(attention=attention), graph_id=0, inference=True,
                      example_inputs=fakes, static_values={})
    before = set(gm.graph.nodes)
    stats = attention_pass.run(gm, ctx)
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node not in before and node.op == "call_function":
            assert "val" in node.meta, node
    gm.recompile()
    return stats


def _sdpa_graph(target, build_args, inputs, use_lse=False):
    """placeholders → target(...) [→ getitem 0] → transpose(1, 2) → view/reshape to [B, S, H·D].

    As AOT does, the last step is a `view` when the output's layout allows it (the efficient
    form's output is laid out [B, S, H, D]), else a reshape.
    """
    mode = FakeTensorMode()
    graph = torch.fx.Graph()
    fakes = [mode.from_tensor(t) if t is not None else None for t in inputs]
    phs = []
    for i, f in enumerate(fakes):
        ph = None
        if f is not None:
            ph = graph.placeholder(f"arg{i}")
            ph.meta["val"] = f
        phs.append(ph)
    args, kwargs = build_args(*phs)
    to_fake = lambda a: a.meta["val"] if isinstance(a, torch.fx.Node) else a  # noqa: E731
    node = graph.call_function(target, args, kwargs)
    with mode:
        node.meta["val"] = target(*[to_fake(a) for a in args], **{k: to_fake(a) for k, a in kwargs.items()})
    out = node
    if isinstance(node.meta["val"], tuple):
        out = graph.call_function(operator.getitem, (node, 0))
        out.meta["val"] = node.meta["val"][0]
    B, H, S, D = out.meta["val"].shape
    t = graph.call_function(aten.transpose.int, (out, 1, 2))
    with mode:
        t.meta["val"] = out.meta["val"].transpose(1, 2)
        view = aten.view.default if t.meta["val"].is_contiguous() else aten.reshape.default
        r = graph.call_function(view, (t, [B, S, H * D]))
        r.meta["val"] = view(t.meta["val"], [B, S, H * D])
    outputs = [r]
    if use_lse:
        lse = graph.call_function(operator.getitem, (node, 1))
        lse.meta["val"] = node.meta["val"][1]
        outputs.append(lse)
    graph.output(tuple(outputs))
    return torch.fx.GraphModule(torch.nn.Module(), graph), [f for f in fakes if f is not None]


# form: (target, build args from (q, k, v, mask), is_causal, mask kind, kv heads)
HAND_BUILT = {
    "sdpa_flash": (aten._scaled_dot_product_flash_attention.default,
                   lambda q, k, v, m: ((q, k, v, 0.0, True), {"scale": 0.3}), True, "none", 4),
    "sdpa_efficient": (aten._scaled_dot_product_efficient_attention.default,
                       lambda q, k, v, m: ((q, k, v, m, False, 0.0, False), {"scale": 0.3}),
                       False, "additive", 4),
    "sdpa_cudnn": (aten._scaled_dot_product_cudnn_attention.default,
                   lambda q, k, v, m: ((q, k, v, m, True, 0.0, True), {"scale": 0.3}),
                   True, "additive", 4),
    "sdpa_overrideable": (aten._scaled_dot_product_fused_attention_overrideable.default,
                          lambda q, k, v, m: ((q, k, v, m), {"scale": 0.3}), False, "additive", 4),
    # What pre-dispatch/export graphs hold; a single output.
    "sdpa": (aten.scaled_dot_product_attention.default,
             lambda q, k, v, m: ((q, k, v, m), {"scale": 0.3, "enable_gqa": True}), False, "bool", 2),
    "sdpa_math": (aten._scaled_dot_product_attention_math.default,
                  lambda q, k, v, m: ((q, k, v, m), {"scale": 0.3}), False, "additive", 4),
}


@pytest.mark.parametrize("form", list(HAND_BUILT))
def test_sdpa_forms_hand_built(form):
    target, build, causal, mask_kind, hkv = HAND_BUILT[form]
    q, k, v = _qkv(Hkv=hkv, Sq=9, Sk=9)
    mask = {"none": None, "additive": _rand(2, 1, 9, 9, seed=9), "bool": _keep_mask(2, 9, 9)}[mask_kind]
    gm, fakes = _sdpa_graph(target, build, [q, k, v, mask])
    stats = _run_pass(gm, fakes)
    assert (stats.matched, stats.rewritten, dict(stats.declined)) == (1, 1, {})
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert target not in targets and operator.getitem not in targets
    (attn,) = [n for n in gm.graph.nodes if n.target == torch.ops.q3n.attention.default]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert list(attn.args[:4]) == placeholders[:3] + [placeholders[3] if mask is not None else None]
    assert attn.args[4] == 0.3 and attn.args[5] == causal
    (rw,) = stats.detail["rewrites"]
    assert rw["form"] == form and rw["mask"] == mask_kind and rw["gqa_groups"] == 4 // hkv
    # The efficient form's output is laid out [B, S, H, D] and the view after it relies on that:
    # the kernel stores that layout itself (bshd_out), so nothing copies it.
    assert aten.clone.default not in targets
    assert attn.args[6] is (form == "sdpa_efficient")
    assert rw["out_layout"] == ("bshd" if form == "sdpa_efficient" else "bhsd")
    # Numerics on CPU: the kernel against SDPA's CPU kernel.
    with torch.no_grad():
        (got,) = gm(q, k, v, *([] if mask is None else [mask]))
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.3,
                                              enable_gqa=hkv != 4)
    assert _rel_err(got, want.transpose(1, 2).reshape(2, 9, 64)) < 1e-5


def test_sdpa_with_used_logsumexp_is_declined():
    target, build = HAND_BUILT["sdpa_flash"][:2]
    gm, fakes = _sdpa_graph(target, build, list(_qkv(Sq=9, Sk=9)) + [None], use_lse=True)
    before = [n.target for n in gm.graph.nodes]
    stats = _run_pass(gm, fakes)
    assert stats.rewritten == 0 and stats.matched == 1
    assert dict(stats.declined) == {"SDPA's logsumexp or other auxiliary outputs are used": 1}
    assert [n.target for n in gm.graph.nodes] == before


# --------------------------------------------------------------------------------------------
# Attention written out, in several spellings
# --------------------------------------------------------------------------------------------


# Masks the functions below close over (drawn here: a generator inside them would break the graph).
KEEP = _keep_mask(2, 7, 13)
ADDITIVE = _rand(2, 1, 7, 13, seed=11)


def _causal_keep(S):
    return torch.ones(S, S, dtype=torch.bool).tril()


def matmul_mul(q, k, v):
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * 0.25, dim=-1) @ v


def div_sqrt(q, k, v):
    return torch.softmax(q @ k.transpose(2, 3) / math.sqrt(q.shape[-1]), dim=-1) @ v


def full_divisor(q, k, v):  # GPT-2 (transformers 4.x): divide by a 0-d tensor
    s = q @ k.transpose(-1, -2)
    s = s / torch.full([], v.size(-1) ** 0.5, dtype=s.dtype, device=s.device)
    return torch.softmax(s, dim=-1) @ v


def scale_on_q(q, k, v):
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1) @ v


def scale_on_q_and_k(q, k, v):
    return torch.softmax((q * 0.5) @ (k.transpose(-1, -2) * 0.5), dim=-1) @ v


def masked_fill_bool(q, k, v):
    s = (q @ k.transpose(-1, -2)) * 0.25
    s = s.masked_fill(~KEEP, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def where_bool(q, k, v):
    s = (q @ k.transpose(-1, -2)) * 0.25
    s = torch.where(KEEP, s, torch.tensor(float("-inf")))
    return torch.softmax(s, dim=-1) @ v


def additive_mask(q, k, v):
    s = (q @ k.transpose(-1, -2)) * 0.25 + ADDITIVE
    return torch.softmax(s, dim=-1) @ v


def causal_tril(q, k, v):
    s = (q @ k.transpose(-1, -2)) * 0.25
    s = s.masked_fill(_causal_keep(q.shape[2]).logical_not(), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def causal_triu(q, k, v):
    S = q.shape[2]
    above = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)
    s = ((q @ k.transpose(-1, -2)) * 0.25).masked_fill(above, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def causal_arange_min(q, k, v):  # transformers' masking utils, additive with finfo.min
    S = q.shape[2]
    keep = torch.arange(S)[None, :] <= torch.arange(S)[:, None]
    mask = torch.where(keep, torch.tensor(0.0), torch.finfo(q.dtype).min)[None, None]
    return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + mask, dim=-1) @ v


def bshd_layout(q, k, v):  # inputs [B, S, H, D]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v
    return out.transpose(1, 2)


def bshd_permute_kt(q, k, v):  # kᵀ built with one permute
    out = torch.softmax(q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * 0.25, dim=-1) @ v.transpose(1, 2)
    return out.transpose(1, 2)


def repeat_kv(q, k, v):  # transformers' repeat_kv
    def rep(x, n):
        b, h, s, d = x.shape
        return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)
    n = q.shape[1] // k.shape[1]
    return torch.softmax(q @ rep(k, n).transpose(2, 3) * 0.25, dim=-1) @ rep(v, n)


def repeat_interleave(q, k, v):
    n = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n, dim=1), torch.repeat_interleave(v, n, dim=1)
    return torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1) @ v


def dropout_p0(q, k, v):
    p = torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1)
    p = F.dropout(p, p=0.0, training=True)
    p = F.dropout(p, p=0.1, training=False)
    return p @ v


def fp32_upcast(q, k, v):  # HF eager: softmax in fp32, cast back
    s = q @ k.transpose(-1, -2) * 0.25
    S = q.shape[2]
    s = s + torch.zeros(S, S, dtype=q.dtype).masked_fill(~_causal_keep(S), torch.finfo(q.dtype).min)
    return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


WRITTEN = {
    # name: (fn, q/k/v layout kwargs, expected detail subset)
    "matmul_mul": (matmul_mul, {}, {"mask": "none", "causal": False, "scale": 0.25}),
    "div_sqrt": (div_sqrt, {"D": 32}, {"scale": pytest.approx(32 ** -0.5)}),
    "full_divisor": (full_divisor, {}, {"scale": 0.25}),
    "scale_on_q": (scale_on_q, {}, {"scale": 0.25}),
    "scale_on_q_and_k": (scale_on_q_and_k, {}, {"scale": 0.25}),
    "masked_fill_bool": (masked_fill_bool, {"Sq": 7, "Sk": 13}, {"mask": "bool", "causal": False}),
    "where_bool": (where_bool, {"Sq": 7, "Sk": 13}, {"mask": "bool", "causal": False}),
    "additive_mask": (additive_mask, {"Sq": 7, "Sk": 13}, {"mask": "additive"}),
    "causal_tril": (causal_tril, {}, {"mask": "none", "causal_from": "mask"}),
    "causal_triu": (causal_triu, {}, {"mask": "none", "causal_from": "mask"}),
    "causal_arange_min": (causal_arange_min, {}, {"mask": "none", "causal_from": "mask"}),
    "bshd_layout": (bshd_layout, {"bshd": True}, {"gqa_groups": 1}),
    "bshd_permute_kt": (bshd_permute_kt, {"bshd": True}, {"gqa_groups": 1}),
    "repeat_kv": (repeat_kv, {"Hkv": 2}, {"gqa_groups": 2, "kv_unrepeated": True}),
    "repeat_interleave": (repeat_interleave, {"Hkv": 1}, {"gqa_groups": 4, "kv_unrepeated": True}),
    "dropout_p0": (dropout_p0, {}, {"scale": 0.25}),
    "head_dim_256": (matmul_mul, {"D": 256, "Sq": 5, "Sk": 5}, {"head_dim": 256}),
}


@pytest.mark.parametrize("name", list(WRITTEN))
def test_written_out_spellings(name):
    fn, layout, expected = WRITTEN[name]
    layout = dict(layout)
    bshd = layout.pop("bshd", False)
    q, k, v = _qkv(**layout)
    if bshd:
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    got, want, report = _compile(fn, q, k, v)
    (rw,) = _assert_rewritten(report, 1)
    assert rw["form"] == "written_out"
    for key, value in expected.items():
        assert rw[key] == value, (key, rw)
    assert report["ops"].get("aten.bmm.default", 0) == 0
    assert _rel_err(got, want) < 1e-5


def _attend(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


def heads_to_rows_copy(q, k, v):  # every model here: .transpose(1, 2).contiguous().reshape()
    o = _attend(q, k, v).transpose(1, 2).contiguous()
    return o.reshape(o.shape[0], o.shape[1], -1)


def heads_to_rows_permute_twice(q, k, v):  # two readers, both the copied transpose
    o = _attend(q, k, v)
    return o.permute(0, 2, 1, 3).contiguous() * 2 + o.transpose(2, 1).contiguous()


def heads_to_rows_and_read(q, k, v):  # the [B, H, S, D] value itself is read too
    o = _attend(q, k, v)
    return o.transpose(1, 2).contiguous() + o.sum()


def heads_to_rows_view_only(q, k, v):  # no copy after the transpose: it is read strided
    return _attend(q, k, v).transpose(1, 2) * 3


@pytest.mark.parametrize("fn,layout,copies", [(heads_to_rows_copy, "bshd", 0),
                                               (heads_to_rows_permute_twice, "bshd", 0),
                                               (heads_to_rows_and_read, "bhsd", 1),
                                               (heads_to_rows_view_only, "bhsd", 0)])
def test_output_layout_drops_the_transpose_copy(fn, layout, copies):
    q, k, v = _qkv(Sq=13, Sk=13)
    got, want, report = _compile(fn, q, k, v)
    (rw,) = _assert_rewritten(report, 1)
    assert rw["out_layout"] == layout
    # With bshd the kernel stores [B, S, H, D] itself and the copies into that layout are gone.
    assert report["ops"].get("aten.clone.default", 0) == copies
    assert got.shape == want.shape and _rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_softmax_upcast_low_precision(dtype):
    q, k, v = _qkv(Hkv=4, D=32)
    got, want, report = _compile(fp32_upcast, q.to(dtype), k.to(dtype), v.to(dtype))
    (rw,) = _assert_rewritten(report, 1)
    assert rw["dtype"] == str(dtype).replace("torch.", "") and rw["causal_from"] == "mask"
    assert got.dtype == dtype
    ref = fp32_upcast(*(x.to(dtype).double() for x in (q, k, v)))
    assert _rel_err(got, ref) <= 2 * _rel_err(want, ref) + 1e-3


# --------------------------------------------------------------------------------------------
# Masks that look causal but are not: passed as masks, never as is_causal
# --------------------------------------------------------------------------------------------


def tril_diag1(q, k, v):
    S = q.shape[2]
    keep = torch.ones(S, S, dtype=torch.bool).tril(diagonal=1)
    return torch.softmax((q @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf")), -1) @ v


def bottom_right(q, k, v):  # key j visible to query i when j <= i + (Sk - Sq)
    Sq, Sk = q.shape[2], k.shape[2]
    keep = torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + (Sk - Sq)
    return torch.softmax((q @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf")), -1) @ v


def sliding_window(q, k, v):
    S = q.shape[2]
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    keep = (j <= i) & (j > i - 4)
    return torch.softmax((q @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf")), -1) @ v


def causal_small_value(q, k, v):  # -1e3 is not -inf: not a mask that removes keys
    S = q.shape[2]
    mask = torch.zeros(S, S).masked_fill(~_causal_keep(S), -1e3)
    return torch.softmax((q @ k.transpose(-1, -2)) + mask, -1) @ v


@pytest.mark.parametrize("fn,sq,sk", [(tril_diag1, 11, 11), (bottom_right, 5, 11),
                                      (sliding_window, 11, 11), (causal_small_value, 11, 11)])
def test_near_causal_masks_stay_masks(fn, sq, sk):
    got, want, report = _compile(fn, *_qkv(Sq=sq, Sk=sk))
    (rw,) = _assert_rewritten(report, 1)
    assert rw["causal"] is False and rw["mask"] != "none"
    assert _rel_err(got, want) < 1e-5


# --------------------------------------------------------------------------------------------
# Declines: left alone, counted with the reason, outputs still right
# --------------------------------------------------------------------------------------------


def softmax_dim2(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v


def weights_returned(q, k, v):
    p = torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1)
    return p @ v, p


def scores_returned(q, k, v):
    s = q @ k.transpose(-1, -2) * 0.25
    return torch.softmax(s, dim=-1) @ v, s


def fill_zero(q, k, v):
    s = (q @ k.transpose(-1, -2)).masked_fill(~_causal_keep(q.shape[2]), 0.0)
    return torch.softmax(s, -1) @ v


DECLINES = {
    "softmax_dim2": (softmax_dim2, {}, "softmax is not over the last dim"),
    "weights_returned": (weights_returned, {},
                         "attention weights are used outside the attention (e.g. returned)"),
    "scores_returned": (scores_returned, {}, "attention scores are used outside the attention"),
    "head_dim_272": (matmul_mul, {"D": 272, "Sq": 5, "Sk": 5}, "kernel: head dim 272 > 256"),
    "fill_zero": (fill_zero, {}, "masked value 0.0 is neither -inf nor <= -1e+30"),
}


@pytest.mark.parametrize("name", list(DECLINES))
def test_declined_candidates(name):
    fn, layout, reason = DECLINES[name]
    got, want, report = _compile(fn, *_qkv(**layout))
    attn = _attn(report)
    assert attn["status"] == "applied"
    assert (attn["matched"], attn["rewritten"]) == (1, 0)
    assert attn["declined"] == {reason: 1}
    assert ATTN_OP not in report["ops"]
    assert sum(report["ops"].get(s, 0) for s in SOFTMAXES) == 1
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert _rel_err(g, w) < 1e-6


def test_no_attention_is_applied_zero():
    _, _, report = _compile(lambda x: torch.softmax(x @ x.T, -1).sum(-1), _rand(5, 7))
    attn = _attn(report)
    assert (attn["status"], attn["matched"], attn["rewritten"]) == ("applied", 0, 0)


def test_attention_off_leaves_graph_untouched():
    got, want, report = _compile(repeat_kv, *_qkv(Hkv=2), options={"attention": "off"})
    attn = _attn(report)
    assert attn["status"] == "disabled" and attn["rewritten"] == 0
    assert ATTN_OP not in report["ops"] and report["ops"]["aten._softmax.default"] == 1
    assert report["ops"]["aten.bmm.default"] == 2
    assert _rel_err(got, want) == 0


SPARSE_OP = "q3n.sparse_attention.default"


def _assert_sparse(report, n, keep=0.2, min_mass=0.95):
    """n attentions became q3n::sparse_attention (layers 0..n-1 of this graph); none is dense."""
    attn = _attn(report)
    assert (attn["status"], attn["matched"], attn["rewritten"], attn["declined"]) == (
        "applied", n, n, {}), attn
    assert report["ops"].get(SPARSE_OP, 0) == n and ATTN_OP not in report["ops"]
    assert sum(report["ops"].get(s, 0) for s in SOFTMAXES) == 0
    sparse = attn["detail"]["sparse"]
    assert (sparse["op"], sparse["keep"], sparse["min_mass"]) == (
        "q3n::sparse_attention", keep, min_mass)
    assert [x["layer"] for x in sparse["layers"]] == list(range(n))
    assert "q_len <= 16" in sparse["dense_when"]
    assert [(r["op"], r["layer"]) for r in attn["detail"]["rewrites"]] == [
        ("q3n::sparse_attention", i) for i in range(n)]


def test_sparse_mode_short_input_runs_dense():
    """11 tokens are below the sparse threshold: the op runs dense, exact, and records nothing."""
    got, want, report = _compile(causal_tril, *_qkv(), options={"attention": "sparse"})
    _assert_sparse(report, 1)
    assert _rel_err(got, want) < 1e-5
    assert "sparse_attention" not in report["runtime"]


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")  # the interpreter
@pytest.mark.parametrize("min_mass", [0.95, 0.01])
def test_sparse_mode_builtin_model(min_mass):
    """qwen3 tiny, 70 tokens (5 blocks of 16): every layer rewritten; after a call the report
    holds each layer's kept mass, and the layer ran dense exactly when it was under min_mass."""
    model = build_model("qwen3", "tiny")
    (ids,) = example_inputs("qwen3", model, 2, 70)
    got, want, report = _compile(model, ids, options={"attention": "sparse",
                                                      "sparse_min_mass": min_mass})
    n = model.config.num_layers
    _assert_sparse(report, n, min_mass=min_mass)
    layers = report["runtime"]["sparse_attention"]["layers"]
    assert [x["layer"] for x in layers] == list(range(n))
    for x in layers:
        assert 0 < x["kept_mass"] <= 1 + 1e-6 and (x["q_len"], x["k_len"], x["block"]) == (70, 70, 16)
        assert x["ran"] == ("dense" if x["kept_mass"] < min_mass else "sparse")
    if min_mass == 0.95:
        # A random model's attention is spread out: under 95% kept, so every layer ran dense.
        assert all(x["ran"] == "dense" for x in layers)
        assert _rel_err(got, want) < 1e-4
    else:
        assert all(x["ran"] == "sparse" for x in layers)
        assert 1e-4 < _rel_err(got, want) < 0.3  # lossy, within verify's lossy bound


def test_sparse_mode_dynamic_lengths(reference_kernels):
    """Symbolic lengths: the op's fake handles SymInts; one graph serves short and long inputs."""
    compiled = torch.compile(QWEN3, backend="q3n", dynamic=True,
                             options={**OPTIONS, "attention": "sparse"})
    counters.clear()
    with torch.no_grad():
        for seq_len in (9, 70):
            args = _dynamic_case("qwen3", seq_len)
            assert _rel_err(compiled(*args), QWEN3(*args)) < 1e-4  # dense: short, or under 95%
    assert counters["stats"]["unique_graphs"] == 1
    (report,) = q3n_compile.reports()
    assert report["dynamic_symbols"]
    _assert_sparse(report, 2)
    layers = report["runtime"]["sparse_attention"]["layers"]
    assert [(x["q_len"], x["backend"]) for x in layers] == [(70, "reference")] * 2


# --------------------------------------------------------------------------------------------
# Models: transformers' eager attention and q3n's built-in models
# --------------------------------------------------------------------------------------------


def _hf_model(model_type, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64)
    extra = {
        "llama": dict(num_key_value_heads=2),
        "qwen2": dict(num_key_value_heads=2),
        "qwen3": dict(num_key_value_heads=2, head_dim=16),
        "mistral": dict(num_key_value_heads=2, sliding_window=8),
        "bert": {},
        "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
        # Hybrid: one gated-deltanet layer, one gated full-attention layer; MoE MLPs.
        "qwen3_next": dict(num_key_value_heads=2, head_dim=16, intermediate_size=64,
                           layer_types=["linear_attention", "full_attention"],
                           linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                           linear_num_key_heads=2, linear_num_value_heads=4, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=32),
    }[model_type]
    config = transformers.AutoConfig.for_model(model_type, **{**common, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config, attn_implementation="eager")
    return model.to(dtype).eval()


# model_type: (attention layers, softmaxes that are not attention)
HF_MODELS = {"llama": (2, 0), "qwen2": (2, 0), "qwen3": (2, 0), "mistral": (2, 0),
             "gpt2": (2, 0), "bert": (2, 0), "qwen3_next": (1, 2)}


def _hf_call(model_type, model):
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    if model_type == "bert":
        am = torch.ones(2, 11, dtype=torch.long)
        am[1, 8:] = 0
        return (lambda ids, am: model(input_ids=ids, attention_mask=am).last_hidden_state), (ids, am)
    return (lambda ids: model(input_ids=ids).last_hidden_state), (ids,)


@pytest.mark.parametrize("model_type", list(HF_MODELS))
def test_transformers_eager_attention(model_type):
    layers, other_softmax = HF_MODELS[model_type]
    fn, args = _hf_call(model_type, _hf_model(model_type))
    got, want, report = _compile(fn, *args)
    rewrites = _assert_rewritten(report, layers, softmax_left=other_softmax)
    if model_type == "bert":
        assert all(r["mask"] == "additive" and not r["causal"] for r in rewrites)  # padding
    elif model_type == "mistral":
        assert all(r["mask"] == "additive" for r in rewrites)  # sliding window 8 < 11 tokens
    else:
        assert all(r["causal_from"] == "mask" and r["mask"] == "none" for r in rewrites)
    if model_type in ("llama", "qwen2", "qwen3", "gpt2"):
        # The causal mask became is_causal: its construction is gone from the graph too.
        assert not {"aten.le.Tensor", "aten.where.self"} & set(report["ops"])
    if model_type in ("llama", "qwen2", "qwen3", "mistral", "qwen3_next"):
        assert all(r["gqa_groups"] == 2 and r["kv_unrepeated"] for r in rewrites)
    assert _rel_err(got, want) < 1e-4


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_transformers_causal_mask_without_a_cache_is_causal(model_type):
    # Without a cache, transformers' masks also test for packed sequences: the positions' steps
    # (cat, sub, ne 1, cumsum) indexed at q and k must agree. From arange positions that is
    # always true, and the mask is still exactly causal.
    model = _hf_model(model_type)
    ids = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(3))
    got, want, report = _compile(lambda ids: model(input_ids=ids, use_cache=False).last_hidden_state, ids)
    rewrites = _assert_rewritten(report, 2)
    assert all(r["causal_from"] == "mask" and r["mask"] == "none" for r in rewrites)
    assert not {"aten.cumsum.default", "aten.le.Tensor", "aten.where.self"} & set(report["ops"])
    assert _rel_err(got, want) < 1e-4


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_transformers_bf16_against_float64(model_type):
    model = _hf_model(model_type, torch.bfloat16)
    fn, args = _hf_call(model_type, model)
    got, want, report = _compile(fn, *args)
    _assert_rewritten(report, 2)
    with torch.no_grad():
        model.double()  # same (bf16-rounded) weights; `fn` now runs in float64
        ref = fn(*args)
    assert got.dtype == torch.bfloat16
    assert _rel_err(got, ref) <= 2 * _rel_err(want, ref) + 1e-3


def test_transformers_output_attentions_is_declined():
    model = _hf_model("llama")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))

    def fn(ids):
        out = model(input_ids=ids, output_attentions=True)
        return out.last_hidden_state, *out.attentions

    (got, *got_w), (want, *want_w), report = _compile(fn, ids)
    attn = _attn(report)
    assert attn["rewritten"] == 0
    assert attn["declined"] == {"attention weights are used outside the attention (e.g. returned)": 2}
    assert len(got_w) == 2
    for g, w in zip([got, *got_w], [want, *want_w]):
        assert _rel_err(g, w) < 1e-6


@pytest.mark.parametrize("name", ["qwen3", "llama", "gpt2", "bert"])
def test_builtin_models(name):
    model = build_model(name, "tiny")
    got, want, report = _compile(model, *example_inputs(name, model, 2, 11))
    rewrites = _assert_rewritten(report, model.config.num_layers)
    if name == "bert":
        assert all(r["mask"] == "additive" for r in rewrites)
    else:
        assert all(r["causal_from"] == "mask" for r in rewrites)
        assert "aten.tril.default" not in report["ops"]
    assert _rel_err(got, want) < 1e-4


def padded_attention(q, k, v, keep):
    """A padding mask [B, S] made additive (BERT's way), and an SDPA call with is_causal."""
    pad = (1.0 - keep[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + pad, dim=-1) @ v
    return a + F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _dynamic_case(name, seq_len):
    if name == "qwen3":
        return example_inputs(name, QWEN3, 2, seq_len, seed=seq_len)
    q, k, v = _qkv(Sq=seq_len, Sk=seq_len, seed=seq_len)
    keep = torch.ones(2, seq_len, dtype=torch.bool)
    keep[1, seq_len - 2:] = False
    # Only the lengths: under dynamic=True raw q/k/v would get a symbolic head dim too, which the
    # kernel refuses (it must be provably <= 256); a model's head dim comes from its weights.
    for x, dim in ((q, 2), (k, 2), (v, 2), (keep, 1)):
        torch._dynamo.mark_dynamic(x, dim)
    return q, k, v, keep


QWEN3 = build_model("qwen3", "tiny")


@pytest.mark.parametrize("name", ["qwen3", "padded_attention"])
def test_dynamic_lengths_no_recompile(name):
    fn = QWEN3 if name == "qwen3" else padded_attention
    compiled = torch.compile(fn, backend="q3n", dynamic=True if name == "qwen3" else None,
                             options=OPTIONS)
    counters.clear()
    with torch.no_grad():
        for seq_len in (5, 9, 14):
            args = _dynamic_case(name, seq_len)
            assert _rel_err(compiled(*args), fn(*args)) < 1e-4
    assert counters["stats"]["unique_graphs"] == 1
    (report,) = q3n_compile.reports()
    assert report["dynamic_symbols"]
    rewrites = _assert_rewritten(report, 2)
    if name == "qwen3":
        # Under dynamic=True Dynamo passes `self.scaling` as a 0-d tensor input; the capture marks
        # it a compile-time constant, so the pass reads it and freezes it.
        assert all(r["scale"] == 0.25 and not r["runtime_scale"] for r in rewrites)
        assert report["runtime"]["frozen_weights"]
        assert all(r["causal_from"] == "mask" and r["kv_unrepeated"] for r in rewrites)
        # Which blocks run is chosen at run time from the key length: the report gives the rule
        # as an expression of the graph's length symbol, once for the two identical layers.
        (blocks,) = report["passes"]["attention"]["detail"]["blocks"]
        assert blocks["layers"] == 2 and blocks["causal"] and blocks["head_dim"] == 16
        symbol = blocks["key_length"]
        assert symbol in report["dynamic_symbols"]
        assert f"{symbol} <= 64" in blocks["launch"]["bucket_expr"]
        assert blocks["launch"]["decode"]["when"].startswith("Sq <= 16")
    else:
        assert sorted(r["mask"] for r in rewrites) == ["additive", "none"]
        assert sorted(str(r["causal_from"]) for r in rewrites) == ["None", "flag"]


def test_runtime_scale_argument():
    """A scale passed as an argument becomes a graph input once it varies: applied to q."""
    def fn(q, k, v, scale):
        return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v

    q, k, v = _qkv()
    compiled = torch.compile(fn, backend="q3n", options=OPTIONS)
    with torch.no_grad():
        for scale in (0.3, 0.4, 0.5):
            assert _rel_err(compiled(q, k, v, scale), fn(q, k, v, scale)) < 1e-5
    last = q3n_compile.reports()[-1]
    (rw,) = _assert_rewritten(last, 1)
    assert rw["runtime_scale"] and rw["scale"] == 1.0
    assert not last["runtime"]["frozen_weights"]


# --------------------------------------------------------------------------------------------
# matching helpers
# --------------------------------------------------------------------------------------------


def _traced(fn, *args):
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn, tracing_mode="fake")(*args)
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    return gm, out[0] if isinstance(out, (tuple, list)) else out


def test_index_value_reads_masks_built_from_indices():
    from q3n_compile.passes.matching import Affine, index_value, trivially_true

    def hf_causal(x):  # transformers' sdpa_mask + eager_mask
        S = x.shape[0]
        keep = (torch.arange(S)[None, None, None, :] <= torch.arange(S)[None, None, :, None] + 0)
        keep = (torch.ones((), dtype=torch.bool) & keep).expand(2, -1, S, S)
        return torch.where(keep, torch.tensor(0.0), torch.finfo(torch.float32).min)

    gm, out = _traced(hf_causal, torch.empty(6))
    value = index_value(out, gm)
    assert value.kind == "float" and value.then == 0.0 and value.other == torch.finfo(torch.float32).min
    assert value.pred == {Affine.make({-1: 1, -2: -1})}

    def upper(x):  # strictly above the diagonal, sliced and unsqueezed
        S = x.shape[0]
        return torch.triu(torch.ones(S + 2, S + 2, dtype=torch.bool), diagonal=1)[:S, 1:S + 1][None]

    gm, out = _traced(upper, torch.empty(6))
    value = index_value(out, gm)
    # above[i, j] = (j + 1) - i >= 1, i.e. i - j <= 0 after the slice shifted j by one.
    assert value.kind == "bool" and value.pred == {Affine.make({-2: 1, -1: -1}, 0)}
    assert not trivially_true(Affine.make({-2: 1, -1: -1}, 0), (6, 6))
    assert trivially_true(Affine.make({-2: 1, -1: -1}, -5), (6, 6))

    gm, out = _traced(lambda m: torch.where(m, 0.0, -1.0), torch.ones(3, 3, dtype=torch.bool))
    assert index_value(out, gm) is None  # data-dependent: not an index-built mask


def _same_sequence(positions):
    """transformers' packed-sequence test: positions that step by one belong to one sequence."""
    first = positions[:, :1] - 1
    steps = torch.cat([first, positions], dim=-1)
    seq = torch.cumsum((steps[:, 1:] - steps[:, :-1]) != 1, dim=-1)
    q = torch.arange(positions.shape[1])[None, None, :, None]
    k = torch.arange(positions.shape[1])[None, None, None, :]
    b = torch.arange(1)[:, None, None, None]
    return seq[b, q] == seq[b, k]


def test_index_value_reads_transformers_packed_sequence_test():
    from q3n_compile.passes.matching import Affine, index_value

    gm, out = _traced(lambda x: _same_sequence(torch.arange(x.shape[0])[None] + 0), torch.empty(7))
    value = index_value(out, gm)
    assert value.kind == "bool" and value.pred == frozenset()  # true everywhere

    def causal_and_same(x):
        S = x.shape[0]
        keep = torch.arange(S)[None, None, None, :] <= torch.arange(S)[None, None, :, None]
        return keep & _same_sequence(torch.arange(S)[None])

    gm, out = _traced(causal_and_same, torch.empty(7))
    assert index_value(out, gm).pred == {Affine.make({-1: 1, -2: -1})}

    # Positions the caller gives (a packed batch) are data: no index value.
    gm, out = _traced(_same_sequence, torch.arange(7)[None])
    assert index_value(out, gm) is None

    def jump(x):  # a cat that does not continue one affine expression: steps of 2 at the start
        positions = torch.arange(x.shape[0])[None]
        steps = torch.cat([positions[:, :1] - 2, positions], dim=-1)
        return (steps[:, 1:] - steps[:, :-1]) != 1

    gm, out = _traced(jump, torch.empty(7))
    assert index_value(out, gm) is None

    def counting(x):  # cumsum of ones counts: index + 1
        return torch.cumsum(torch.ones(x.shape[0], dtype=torch.long), dim=0) == torch.arange(x.shape[0]) + 1

    gm, out = _traced(counting, torch.empty(5))
    assert index_value(out, gm).pred == frozenset()


def test_scalar_constant_rounds_to_the_graph_dtype():
    from q3n_compile.passes.matching import scalar_constant

    gm, out = _traced(lambda x: x / torch.full([], 96 ** 0.5, dtype=torch.bfloat16), torch.empty(2, dtype=torch.bfloat16))
    (div,) = [n for n in gm.graph.nodes if n.target == aten.div.Tensor]
    assert scalar_constant(div.args[1], gm) == 9.8125  # sqrt(96) as bfloat16 holds it
    assert scalar_constant(div.args[0], gm) is None
