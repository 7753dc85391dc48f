"""GPTQ, SmoothQuant and the clipping search on synthetic layers; calibration statistics; the cache."""

import pytest
import torch
from torch import nn

from q3n_compile import quant
from q3n_compile.kernels import qlinear as Q
from q3n_compile.quant import algorithms as A
from q3n_compile.quant import calibration as C
from q3n_compile.quant.config import LayerFormat


def _layer(seed, K=256, N=96, rows=2048, outliers=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K ** 0.5 * 3 + torch.eye(K)  # correlated channels
    x = torch.randn(rows, K, generator=g) @ mix
    if outliers:
        x[:, :outliers] *= 25  # a few channels much larger than the rest, as in LLM activations
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = 0.1 * torch.randn(N, generator=g)
    return x, w, b


def _output_err(res, x, w, b, act):
    pw = res.packed
    y = Q.reference(x, pw.qweight, pw.scales, pw.zeros, b, res.smooth, pw.bits, pw.group_size,
                    pw.in_features, act)
    return A.relative_error(y, x @ w.t() + b)


@pytest.mark.parametrize("bits,group", [(4, 128), (3, 32), (4, -1)])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits, group):
    x, w, b = _layer(1)
    kw = dict(weight_bits=bits, group_size=group, inputs=x[:1024])
    rtn = quant.quantize_linear(w, b, method="rtn", clip_search=False, **kw)
    gptq = quant.quantize_linear(w, b, method="gptq", clip_search=False, **kw)
    full = quant.quantize_linear(w, b, **kw)
    held_out = x[1024:]  # errors on rows GPTQ did not see
    e_rtn, e_gptq, e_full = (_output_err(r, held_out, w, b, "none") for r in (rtn, gptq, full))
    assert gptq.info["method"] == "gptq"
    assert e_gptq < 0.85 * e_rtn, (e_gptq, e_rtn)  # measured: 0.72-0.76x
    assert e_full <= e_gptq * 1.05
    # The report's figures are the same measurement on the calibration rows.
    assert full.info["rel_err"] < full.info["rtn_rel_err"]
    assert abs(full.info["rtn_rel_err"] - _output_err(rtn, x[:1024][::2], w, b, "none")) < 0.02


def test_smoothquant_reduces_8bit_activation_error_with_outlier_channels():
    x, w, b = _layer(2, outliers=4)
    kw = dict(weight_bits=8, activation_bits=8, group_size=-1, activation_format="int8",
              inputs=x[:1024], method="rtn")
    plain = quant.quantize_linear(w, b, smoothquant=False, **kw)
    smooth = quant.quantize_linear(w, b, smoothquant=True, **kw)
    assert plain.smooth is None and smooth.smooth is not None
    assert "smooth" in smooth.info["method"]  # the noise-model vector (test_quant_smoothing.py)
    e_plain = _output_err(plain, x[1024:], w, b, "int8")
    e_smooth = _output_err(smooth, x[1024:], w, b, "int8")
    assert e_smooth < 0.7 * e_plain, (e_smooth, e_plain)
    # The smoothing vector is 1/t and the weights absorb t: without quantization nothing changes.
    t = 1.0 / smooth.smooth
    assert torch.all(t > 0)


def test_clip_search_without_data_reduces_weight_error():
    _, w, _ = _layer(3)
    w[:, 5] *= 8  # a few large weights stretch the plain min/max range
    fmt = LayerFormat(3, 16, 32, False, "none")
    plain = A.quantize_rtn(w, fmt)
    clipped = A.quantize_rtn(w, fmt, clip=True)
    err = lambda q: ((q.dequantize(32) - w) ** 2).sum().item()  # noqa: E731
    assert err(clipped) < err(plain)


def test_scales_are_stored_as_float16_unless_out_of_range():
    s = torch.tensor([0.1, 1e-3, 3e-6, 7e4, 0.0])
    stored = A.store_scales(s)
    assert stored[0] == torch.tensor(0.1).half().float()
    assert stored[2] == s[2] and stored[3] == s[3]  # subnormal / too large in fp16: kept fp32
    assert stored[4] == 1.0
    _, w, _ = _layer(4, K=64, N=8)
    res = quant.quantize_linear(w * 1e-6, weight_bits=4)
    assert res.packed.scales.dtype == torch.float32
    assert quant.quantize_linear(w, weight_bits=4).packed.scales.dtype == torch.float16


def test_packed_result_is_what_was_optimised():
    x, w, b = _layer(5, K=128, N=40)
    res = quant.quantize_linear(w, b, weight_bits=5, group_size=64, inputs=x[:256])
    pw = res.packed
    assert pw.bits == 5 and pw.group_size == 64 and pw.zeros is not None
    y = Q.reference(x[:256], pw.qweight, pw.scales, pw.zeros, b, None, 5, 64, 128, "none")
    assert abs(A.relative_error(y, x[:256] @ w.t() + b) - res.info["rel_err"]) < 0.02


def test_no_calibration_data_means_rtn_with_clip_and_no_error_figures():
    _, w, _ = _layer(6, K=64, N=16)
    res = quant.quantize_linear(w, weight_bits=4)
    assert res.info["method"] == "rtn+clip" and "rel_err" not in res.info
    assert "no calibration data" in res.info["note"]


def test_gptq_survives_a_singular_hessian():
    x, w, b = _layer(7, K=64, N=16, rows=8)  # 8 rows: H has rank 8 < 64
    x[:, 3] = 0  # and a dead channel
    res = quant.quantize_linear(w, b, weight_bits=4, group_size=32, inputs=x)
    assert res.info["method"].startswith(("gptq", "rtn"))
    assert torch.isfinite(res.packed.scales.float()).all()


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 8)
        self.b = nn.Linear(16, 8)  # same input as a: statistics shared
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        return self.c(self.a(x) + self.b(x))


def test_calibrate_attaches_statistics_to_weights():
    C.clear()
    torch.manual_seed(0)
    model = _Two()
    batches = [torch.randn(3, 5, 16) for _ in range(2)] + [(torch.randn(4, 16),)]
    summary = quant.calibrate(model, batches)
    assert summary == {"a": {"rows": 34, "in_features": 16}, "b": {"rows": 34, "in_features": 16},
                       "c": {"rows": 34, "in_features": 8}}
    st_a, name = C.lookup_stats(model.a.weight)
    st_b, _ = C.lookup_stats(model.b.weight)
    assert name == "a" and st_a is st_b
    xs = torch.cat([b.reshape(-1, 16) if isinstance(b, torch.Tensor) else b[0] for b in batches])
    torch.testing.assert_close(st_a.hessian(), xs.t() @ xs / 34, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st_a.absmax, xs.abs().amax(0))
    with torch.no_grad():
        model.a.weight.mul_(2)  # an in-place change detaches the statistics
    assert C.lookup_stats(model.a.weight) is None
    assert C.lookup_stats(model.c.weight) is not None
    C.clear()
    assert C.lookup_stats(model.c.weight) is None


class _Reuse(nn.Module):
    """b's input is a fresh temporary made right after a's input died: CPython hands the new
    tensor object the freed one's address, so the two inputs have the same id()."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        y = self.a(x * 2)  # the temporary x * 2 dies when a returns
        return self.b(y + 1)


def test_calibrate_does_not_share_statistics_through_a_reused_id():
    # The cause of qwen3's run-to-run variation (o_proj and lm_head took q/k/v's statistics
    # whenever the allocator reused an address): matching inputs by id() alone shared a's
    # statistics with b here on every run.
    C.clear()
    torch.manual_seed(0)
    model = _Reuse()
    batches = [torch.randn(3, 8) for _ in range(2)]
    quant.calibrate(model, batches)
    st_a, st_b = C.lookup_stats(model.a.weight)[0], C.lookup_stats(model.b.weight)[0]
    assert st_a is not st_b
    with torch.no_grad():
        xb = torch.cat([model.a(x * 2) + 1 for x in batches])
    torch.testing.assert_close(st_b.hessian(), xb.t() @ xb / 6, rtol=1e-5, atol=1e-6)
    C.clear()


def test_cache_is_keyed_by_weight_version_and_dies_with_the_weight():
    C.clear()
    w = torch.randn(8, 32)
    key = C.cache_key(w, "fmt")
    assert C.cache_get(key) is None
    C.cache_put(key, w, "result")
    assert C.cache_get(C.cache_key(w, "fmt")) == "result"
    w.add_(1)
    assert C.cache_get(C.cache_key(w, "fmt")) is None  # new version, new key
    info = C.cache_info()
    assert info["hits"] == 1 and info["entries"] == 1
    del w
    C.cache_put(("other",), torch.randn(1), "x")  # pruning drops entries whose weight is gone
    assert C.cache_info()["entries"] == 1
    C.clear()
