"""The smoothing vector of layers with quantized activations: the noise-model optimum
(:func:`q3n_compile.quant.algorithms.noise_model_smoothing`, the default) and its per-layer choice."""

import pytest
import torch

from q3n_compile import quant
from q3n_compile.kernels import qlinear as Q
from q3n_compile.quant import algorithms as A
from q3n_compile.quant.config import LayerFormat, parse_quant_config


def _layer(seed, K=256, N=96, rows=2048, outliers=4):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K ** 0.5 * 3 + torch.eye(K)  # correlated channels
    x = torch.randn(rows, K, generator=g) @ mix
    x[:, :outliers] *= 25  # a few channels much larger than the rest, as in LLM activations
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = 0.1 * torch.randn(N, generator=g)
    return x, w, b


def _held_out_err(res, x, w, b):
    pw = res.packed
    y = Q.reference(x, pw.qweight, pw.scales, pw.zeros, b, res.smooth, pw.bits, pw.group_size,
                    pw.in_features, "int8")
    return A.relative_error(y, x @ w.t() + b)


def _quantize(w, b, x, fmt: dict, **calibration):
    # Unrotated (the error above runs the op without a rotation).
    qc = parse_quant_config({"ffn_layers": dict(fmt, activation_format="int8", rotation=0),
                             "calibration": {"method": "rtn", **calibration}})
    stats = quant.LayerStats(w.shape[1])
    stats.add(x)
    return A.quantize_layer(w, b, qc.classes["ffn"].for_k(w.shape[1]), qc.calibration, stats)


@pytest.mark.parametrize("fmt,gain", [
    ({"weight_bits": 8, "activation_bits": 8, "group_size": -1}, 0.4),  # measured 0.31x
    ({"weight_bits": 4, "activation_bits": 8, "group_size": 128}, 0.9),  # measured 0.83x
])
def test_chosen_smoothing_never_worse_than_none_and_beats_the_alpha_search(fmt, gain):
    x, w, b = _layer(2)
    fit, held = x[:1024], x[1024:]
    res = _quantize(w, b, fit, fmt)
    errs = res.info["smoothing_rel_err"]  # RTN+clip error of each candidate, calibration rows
    assert set(errs) == {"none", A.NOISE_MODEL}
    # The per-layer choice is the lower calibration error, so never above no smoothing there.
    assert res.info["rel_err"] <= errs["none"] * (1 + 1e-4)
    assert "smooth(noise-model)" in res.info["method"] and res.smooth is not None
    # On rows it did not see: well below no smoothing, and no worse than SmoothQuant's rule with
    # its alpha searched per layer (the previous default).
    plain = _quantize(w, b, fit, fmt, smoothquant=False)
    search = _quantize(w, b, fit, fmt, alpha="search")
    assert "smoothquant(alpha=" in search.info["method"]
    assert set(search.info["smoothing_rel_err"]) == {"none", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8"}
    e_res, e_plain, e_search = (_held_out_err(r, held, w, b) for r in (res, plain, search))
    assert e_res < gain * e_plain, (e_res, e_plain)
    assert e_res <= 1.02 * e_search, (e_res, e_search)


def test_none_is_kept_when_smoothing_does_not_help():
    # Flat activations, no outliers: whatever the noise model finds must not beat "none" by
    # much, and the choice is whichever is lower on the calibration rows.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 128, generator=g)
    w = torch.randn(64, 128, generator=g) / 128 ** 0.5
    res = _quantize(w, None, x, {"weight_bits": 8, "activation_bits": 8, "group_size": -1})
    errs = res.info["smoothing_rel_err"]
    assert res.info["rel_err"] == pytest.approx(min(errs.values()), rel=1e-4)
    assert errs[A.NOISE_MODEL] > 0.8 * errs["none"]
    if errs["none"] <= errs[A.NOISE_MODEL]:
        assert res.smooth is None and "smooth" not in res.info["method"]


# (weight bits, group, symmetric, activation format, activation group, K): per channel and
# per group, with and without zero points, int8 / int12 / fp8 (no activation term), activation
# groups with a partial last group (K 96 = 64 + 32).
GRAD_CASES = [(8, -1, True, "int8", -1, 128), (4, 32, False, "int8", -1, 128),
              (6, 32, False, "int12", -1, 96), (4, 32, True, "fp8", -1, 96),
              (8, 32, False, "int8", 64, 96), (4, 32, True, "int8", 32, 128)]


@pytest.mark.parametrize("bits,group,sym,act,act_group,K", GRAD_CASES)
def test_noise_model_gradient_is_the_loss_gradient(bits, group, sym, act, act_group, K):
    """The written-out gradient the smoothing search descends equals autograd's gradient of the
    model's loss (its definition), at t = 1 and at a random t (no ties in random data)."""
    x, w, _ = _layer(11, K=K, N=40, rows=300)
    fmt = LayerFormat(bits, 8 if act != "int12" else 12, group, sym, act, act_group)
    model = A._NoiseModel(x, w, fmt)
    gen = torch.Generator().manual_seed(K + bits)
    for t in (torch.ones(K, dtype=torch.float64),
              torch.exp(torch.randn(K, generator=gen, dtype=torch.float64) * 0.5)):
        model64 = A._NoiseModel(x.double(), w.double(), fmt)
        for name in ("wg", "col_energy", "x_energy", "ax"):  # the definition in float64
            setattr(model64, name, getattr(model64, name).double())
        leaf = t.clone().requires_grad_(True)
        with torch.enable_grad():
            want, = torch.autograd.grad(model64.loss(leaf), leaf)
        got = model.grad(t.float())
        assert got.shape == (K,) and got.dtype == torch.float32
        assert torch.allclose(got.double(), want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
        assert float(want.abs().max()) > 0


def test_noise_model_flattens_activation_outliers_and_is_deterministic():
    x, w, _ = _layer(4, K=128, N=64, rows=512)
    fmt = LayerFormat(8, 8, -1, True, "int8")
    t = A.noise_model_smoothing(x, w, fmt)
    assert torch.equal(t, A.noise_model_smoothing(x, w, fmt))  # no random draws
    # Compiles run under no_grad or inference_mode (and calibration rows may be inference
    # tensors): the same vector.
    with torch.inference_mode():
        assert torch.equal(t, A.noise_model_smoothing(x.clone(), w.clone(), fmt))
    assert t.shape == (128,) and torch.all(t > 0)
    assert float(t.log().mean()) == pytest.approx(0.0, abs=1e-5)  # geometric mean 1
    # x / t: the outlier channels (25x) are divided by far more than the others...
    assert float(t[:4].min()) > 3 * float(t[4:].median())
    # ... and the modelled error is what it minimised: the activation range per token shrinks.
    ratio = lambda v: float((v.abs().amax(1) / v.pow(2).mean(1).sqrt()).median())  # noqa: E731
    assert ratio(x / t) < 0.75 * ratio(x)  # measured 5.4 against 8.4


def test_noise_model_favours_high_energy_channels_for_weight_error():
    # 12-bit activations: their rounding is negligible, so the vector serves the weights (as
    # AWQ's activation-aware scaling): channels with more input energy get larger weights (t > 1)
    # and smaller rounding error relative to their contribution.
    g = torch.Generator().manual_seed(5)
    k = 256
    energy = torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)]
    x = torch.randn(1024, k, generator=g) * energy
    w = torch.randn(96, k, generator=g) / k ** 0.5
    fmt = LayerFormat(4, 12, 128, False, "int12")
    t = A.noise_model_smoothing(x[:512], w, fmt)
    corr = torch.corrcoef(torch.stack([t.log(), energy.log()]))[0, 1]
    assert corr > 0.7, corr  # measured 0.83
    held, fit_h = x[512:], x[:512].t() @ x[:512] / 512
    plain = A.quantize_rtn(w, fmt, torch.diagonal(fit_h), True)
    smoothed = A.quantize_rtn(w * t, fmt, torch.diagonal(fit_h) / t ** 2, True)
    e_plain = A.relative_error(A._simulate(held, plain, fmt, None, None), held @ w.t())
    e_smooth = A.relative_error(A._simulate(held, smoothed, fmt, 1 / t, None), held @ w.t())
    assert e_smooth < 0.95 * e_plain, (e_smooth, e_plain)  # measured 0.91x


def test_alpha_setting_is_validated():
    assert parse_quant_config({"calibration": {"alpha": "search"}}).calibration.alpha == "search"
    assert parse_quant_config({"calibration": {"alpha": 0.5}}).calibration.alpha == 0.5
    assert parse_quant_config({}).calibration.alpha is None
    with pytest.raises(Exception, match="'search'"):
        parse_quant_config({"calibration": {"alpha": "max"}})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", [LayerFormat(8, 8, -1, True, "int8"),
                                 LayerFormat(4, 8, 128, False, "int8", 128)])
def test_gpu_noise_model_is_deterministic_and_matches_the_cpu(fmt):
    """On a GPU the search gives the same vector on every run (its sums avoid atomic adds), and
    the CPU's optimum: the same modelled error, and every channel within 1% (the two devices
    sum in different orders, and 100 Adam steps carry that on: 0.14% at most in s33run5, where
    a step of the search moves log t by up to 0.1)."""
    x, w, _ = _layer(6, K=1024, N=512, rows=512)
    t = A.noise_model_smoothing(x.cuda(), w.cuda(), fmt)
    assert torch.equal(t, A.noise_model_smoothing(x.cuda(), w.cuda(), fmt))
    cpu = A.noise_model_smoothing(x, w, fmt)
    model = A._NoiseModel(x, w, fmt)
    assert float(model.loss(t.cpu())) == pytest.approx(float(model.loss(cpu)), rel=1e-4)
    assert float((t.cpu() / cpu).log().abs().max()) < 1e-2
