"""Weight quantization: round-to-nearest, clipping search, GPTQ, smoothing; per-layer driver.

All functions work on a weight ``W`` ``[N, K]`` (out, in) and produce the packed format of
:mod:`q3n_compile.kernels.packing`: codes ``q`` in ``[0, 2^b)``, scales ``s`` and zero points ``z``
per (group of K, output channel), ``W ≈ (q - z) * s``.

- **Scales** are rounded to what will be stored (float16 when representable as a normal float16,
  else float32) *before* codes are chosen, so the codes are optimal for the stored scales.
- **RTN**: symmetric ``s = r * max|w| / (2^(b-1) - 1)``, ``z = 2^(b-1)``; asymmetric
  ``s = r * (max(w, 0) - min(w, 0)) / (2^b - 1)``, ``z = round(-r * min(w, 0) / s)``;
  ``q = clamp(round(w / s) + z, 0, 2^b - 1)``; ``r = 1`` without clipping.
- **Clipping search**: per (output channel, group), ``r`` from a grid in [0.5, 1] minimising
  ``sum_k d_k (w_k - w^_k)^2``, where ``d`` is the diagonal of the input Hessian (activation-aware)
  or all ones (no calibration data).
- **GPTQ** (Frantar et al., 2022): columns are quantized in order of decreasing ``H_kk``
  (act-order), each column's rounding error spread over the not-yet-quantized columns through
  the inverse Hessian ``H = E[x x^T]``, dampened by ``damp * mean(diag H)`` (:func:`damping`:
  "auto" scales it with K / rows, strong when rows are few), in blocks of 128 columns with lazy
  updates. Groups stay contiguous ranges of K; a group's parameters are chosen (with the clipping
  search) when the first of its columns is reached, from the weights as updated so far. On a
  GPU the column loop between those points runs as one kernel
  (:mod:`q3n_compile.kernels.gptq_columns`, the torch loop's results bit for bit): the loop of
  ~12 torch ops a column was about 55 of the 81 s of qwen3 "bench"'s calibrated W8A8 quantize
  pass (H200, session 33).
- **Refinement** (``calibration.refine``, off by default): coordinate-descent sweeps over GPTQ's
  codes on GPTQ's damped objective (:mod:`q3n_compile.quant.refine`), scales and zero points
  kept; the held-out check below judges GPTQ with its sweeps.
- **Held-out check**: with few calibration rows (all of them kept as samples) GPTQ and RTN+clip
  are both fitted on half the rows and compared on the other half; GPTQ is used only if it wins
  there (:func:`_gptq_generalises`). Fitted and judged on the same rows, GPTQ always looks better,
  but on 32-128 rows of a small random model it generalised worse than RTN+clip.
- **Smoothing**, for quantized activations: a per-input-channel ``t``; the layer computes
  ``(x / t) (W t)^T``: the weights absorb ``t`` and the kernel multiplies ``x`` by ``1/t`` before
  quantizing it (the ``smooth`` vector of ``q3n::qlinear``). By default ``t`` minimises a noise
  model of the activation and weight rounding errors on the calibration rows
  (:func:`noise_model_smoothing`), and is kept if its RTN+clip error on those rows is below no
  smoothing's. ``alpha: "search"``: SmoothQuant's rule (Xiao et al., 2022)
  ``t_k = max|x_k|^α / max_n|W_nk|^(1-α)`` with α searched over :data:`SMOOTH_ALPHAS`
  (including none) by the same error; a number: that α. The search over α picked, on MiniLM,
  alphas that won on the calibration rows and lost on held-out sentences (feed-forward out
  0.0139 against 0.0119 on one layer); the noise model fits ``t`` to expectations rather than
  to the rows' exact rounding, and generalised better on every layer class.
- :func:`quantize_layer` runs the above for one layer and measures, on the calibration rows, the
  relative output error ``||y_q - y|| / ||y||`` of the result and of plain RTN (the baseline).

Measured on MiniLM's layers (real weights, the design's W4A8 feed-forward / W6A12 attention;
calibrated on 16 sentences, 281 rows; relative output error on 16 other sentences), RMS over the 6
layers, feed-forward in / out and attention q / o: plain RTN 0.083 / 0.052 and 0.020 / 0.026;
GPTQ as first built (damping 0.01, natural order) 0.066 / 0.043 but 0.021 / 0.030, *worse* than
RTN on attention; act-order with "auto" damping 0.052 / 0.036 and 0.016 / 0.022.

Where the error comes from (MiniLM, ``bench/eval_minilm_quant.py --breakdown --diagnose``): in
the design config, the 4-bit feed-forward weights (fc1 and fc2 about equally, every layer about
the same); the 8-bit activations and the W6A12 attention are an order of magnitude smaller.
Feed-forward W4A16 g128 alone reaches Spearman 0.985 calibrated on the calibration sentences and
0.995 calibrated on the evaluation sentences themselves: with 16 calibration sentences (~280
rows for widths 384 and 1536) GPTQ's Hessian is the limit, and damping, Hessian shrinkage,
scale refits by least squares (-1% held-out error), 2-D clipping, bias correction and a
pushed-forward fc1 prior for fc2's Hessian each moved held-out errors by at most a few percent.
W8A8 is bound by its 8-bit per-token activations (float weights with them alone: 0.9989);
per-group activation scales (``activation_group_size``) with per-group weights lift it (see
``bench/RESULTS.md``). Every error figure, and the smoothing's noise model, uses the layer's
activation groups.

Guarantees: deterministic (no random draws; ties broken by position); the packed result is what
was optimised (scales rounded to their stored dtype before codes are chosen); the error figures
are measured with the op's own activation quantization.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from ..kernels import packing as P
from ..kernels import qlinear_i8 as I8
from ..kernels.gptq_columns import gptq_columns
from ..kernels.hadamard import rotate_rows
from ..kernels.qlinear import ACT_QMAX, fake_quantize_activations
from .config import PER_CHANNEL, PER_TOKEN, CalibrationSettings, LayerFormat

CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 ... 0.5
SMOOTH_ALPHAS = (None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # alpha "search"; None: no smoothing
NOISE_MODEL = "noise-model"  # the smoothing of :func:`noise_model_smoothing`
SMOOTH_CANDIDATES = (None, NOISE_MODEL)  # the default (alpha null)
SMOOTH_STEPS = 100  # Adam steps of the noise-model smoothing (converged by ~50 on MiniLM)
SMOOTH_LR = 0.1  # on log t
GPTQ_BLOCK = 128


def _fp16_normal(s: torch.Tensor) -> torch.Tensor:
    f = torch.finfo(torch.float16)
    return (s >= f.tiny) & (s <= f.max)


def store_scales(s: torch.Tensor) -> torch.Tensor:
    """Scales as they will be stored (float16 where it holds them as normal numbers), in float32."""
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(_fp16_normal(s), s.to(torch.float16).to(torch.float32), s)


def group_params(w: torch.Tensor, bits: int, symmetric: bool, ratio=1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [N], zero [N]) for the columns `w` [N, C] of one group; `ratio` scalar or [N]."""
    qmax = (1 << bits) - 1
    if symmetric:
        amax = w.abs().amax(dim=1) * ratio
        scale = store_scales(amax / ((1 << (bits - 1)) - 1))
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        wmax = w.amax(dim=1).clamp(min=0) * ratio
        wmin = w.amin(dim=1).clamp(max=0) * ratio
        scale = store_scales((wmax - wmin) / qmax)
        zero = torch.round(-wmin / scale).clamp(0, qmax)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
                   ) -> torch.Tensor:
    """Codes (float, integer-valued) of `w` [N, C] (or [N]) for per-row scale/zero [N]."""
    if w.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


def search_params(w: torch.Tensor, bits: int, symmetric: bool, d: Optional[torch.Tensor],
                  clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Group parameters minimising the (diag-Hessian weighted) squared rounding error."""
    if not clip:
        return group_params(w, bits, symmetric)
    weight = torch.ones(w.shape[1], device=w.device, dtype=w.dtype) if d is None else d
    # Every ratio at once ([R, N, C]): one pass of vector ops instead of a loop of 11.
    ratios = torch.tensor(CLIP_RATIOS, dtype=w.dtype, device=w.device)[:, None]
    s, z = group_params(w, bits, symmetric, ratios)  # [R, N]
    q = torch.clamp(torch.round(w[None] / s[..., None]) + z[..., None], 0, (1 << bits) - 1)
    err = (((q - z[..., None]) * s[..., None] - w[None]) ** 2 * weight).sum(dim=-1)  # [R, N]
    # First minimum: ties go to the larger ratio, as the loop this replaces did.
    best = err.argmin(dim=0, keepdim=True)
    return s.gather(0, best)[0], z.gather(0, best)[0]


@dataclasses.dataclass
class QuantizedWeight:
    codes: torch.Tensor  # [N, K] float, integer-valued
    scales: torch.Tensor  # [n_groups, N] float32 (values as stored)
    zeros: torch.Tensor  # [n_groups, N] float, integer-valued

    def dequantize(self, group_size: int) -> torch.Tensor:
        k = self.codes.shape[1]
        g = P.group_index(k, group_size, self.codes.device)
        return (self.codes - self.zeros.t()[:, g]) * self.scales.t()[:, g]

    def pack(self, fmt: LayerFormat) -> P.PackedWeight:
        """The packed weight in the layout its kernels read: K-major int8 for the format the
        i8 path computes (W8A8 per channel and per token: ``qlinear_i8``), else bit planes."""
        scales = self.scales.to(P.scale_dtype_for(self.scales))
        zeros = None if fmt.symmetric else self.zeros.to(torch.uint8)
        packed = P.pack(self.codes.to(torch.int64), scales, zeros, fmt.weight_bits,
                        fmt.group_size)
        act = "none" if fmt.activation_bits == 16 else fmt.activation_format
        if I8.eligible(fmt.weight_bits, fmt.group_size, fmt.symmetric, act,
                       fmt.activation_group_size) is None:
            return P.to_kmajor8(packed)
        return packed


def _groups(k: int, group_size: int) -> list[tuple[int, int]]:
    g = k if group_size == PER_CHANNEL else group_size
    return [(i, min(i + g, k)) for i in range(0, k, g)]


def quantize_rtn(w: torch.Tensor, fmt: LayerFormat, d: Optional[torch.Tensor] = None,
                 clip: bool = False) -> QuantizedWeight:
    """Round-to-nearest, optionally with the clipping search (weighted by `d`)."""
    n, k = w.shape
    codes = torch.empty_like(w)
    scales, zeros = [], []
    for a, b in _groups(k, fmt.group_size):
        s, z = search_params(w[:, a:b], fmt.weight_bits, fmt.symmetric,
                             None if d is None else d[a:b], clip)
        codes[:, a:b] = quantize_codes(w[:, a:b], s, z, fmt.weight_bits)
        scales.append(s)
        zeros.append(z)
    return QuantizedWeight(codes, torch.stack(scales), torch.stack(zeros))


class HessianError(RuntimeError):
    pass


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after damping; float64 for robustness."""
    h = h.to(torch.float64)
    diag = torch.diagonal(h)
    mean = float(diag.mean()) if diag.numel() else 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(4):
        lam = damp * (10 ** attempt) * (mean if mean > 0 else 1.0)
        try:
            chol = torch.linalg.cholesky(h + lam * eye)
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True).to(torch.float32)
        except RuntimeError:
            continue
    raise HessianError("the input Hessian is not positive definite even with 1000x damping")


AUTO_DAMP_PER_WIDTH = 0.2  # "auto" damping: 0.2 * K / rows ...
AUTO_DAMP_RANGE = (0.01, 1.0)  # ... clamped to this range


def damping(setting, k: int, rows: int) -> float:
    """GPTQ's damping (a fraction of ``mean(diag H)``) for a layer of width `k` and `rows` rows.

    "auto": ``0.2 K / rows`` in [0.01, 1]. A Hessian estimated from few rows per input channel
    is noisy (singular below K rows), and GPTQ then moves rounding error into directions the
    calibration rows barely excited but other inputs do; damping pulls H toward a multiple of the
    identity (plain rounding) in proportion. Measured on MiniLM's feed-forward layers (281
    calibration rows, K 384 and 1536, errors on held-out sentences): 0.01 gave 0.054 relative
    output error at 4 bits, 0.3-1.0 gave 0.044; the best damping followed K / rows across 100-281
    rows. With plenty of rows (the usual 128 x 2048 tokens for K 4096) it is the classic 0.01.
    """
    if setting != "auto":
        return float(setting)
    lo, hi = AUTO_DAMP_RANGE
    return min(hi, max(lo, AUTO_DAMP_PER_WIDTH * k / max(rows, 1)))


def gptq(w: torch.Tensor, h: torch.Tensor, fmt: LayerFormat, damp: float = 0.01,
         clip: bool = True, act_order: bool = False) -> QuantizedWeight:
    """GPTQ; `h` is E[x x^T] [K, K].

    ``act_order``: columns are quantized by decreasing ``H_kk`` (the channels whose errors cost
    most go first, while the most columns remain to absorb their error); groups stay contiguous
    ranges of K (the packed layout), and a group's parameters are chosen when the first of its
    columns is reached, from the weights as updated so far. ``damp`` is a fraction of
    ``mean(diag H)`` added to the diagonal (see :func:`damping`).
    """
    w = w.clone().to(torch.float32)
    h = h.clone().to(torch.float32)
    n, k = w.shape
    bits, sym, gs = fmt.weight_bits, fmt.symmetric, fmt.group_size
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    d_all = torch.diagonal(h).clone()
    if act_order:
        perm = torch.argsort(d_all, descending=True, stable=True)
    else:
        perm = torch.arange(k, device=w.device)
    inv = torch.argsort(perm)
    wp = w[:, perm]
    hinv = _inverse_hessian_factor(h[perm][:, perm], damp)
    g_size = k if gs == PER_CHANNEL else gs
    n_groups = k // g_size
    group_of = (perm // g_size).tolist()  # group of the column at each permuted position
    codes = torch.zeros_like(wp)
    scales = torch.zeros(n_groups, n, device=w.device)
    zeros = torch.zeros(n_groups, n, device=w.device)
    ready = [False] * n_groups
    group_dev = torch.tensor(group_of, dtype=torch.int32, device=w.device)
    for i1 in range(0, k, GPTQ_BLOCK):
        i2 = min(i1 + GPTQ_BLOCK, k)
        w1 = wp[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        i = 0
        while i < i2 - i1:
            g = group_of[i1 + i]
            if not ready[g]:
                # The group's columns as updated so far (none of them is quantized yet): inside
                # this block from w1; beyond it, wp minus this block's pending (lazy) updates.
                cols = torch.arange(g * g_size, (g + 1) * g_size, device=w.device)
                pos = inv[cols]
                inside = pos < i2
                cur = torch.empty(n, cols.numel(), device=w.device)
                cur[:, inside] = w1[:, pos[inside] - i1]
                out = pos[~inside]
                if out.numel():
                    cur[:, ~inside] = wp[:, out] - err1[:, :i] @ hinv[i1:i1 + i][:, out]
                scales[g], zeros[g] = search_params(cur, bits, sym, d_all[cols], clip)
                ready[g] = True
            # The columns up to the next group still without parameters, in one go.
            j = i + 1
            while j < i2 - i1 and ready[group_of[i1 + j]]:
                j += 1
            gptq_columns(w1, err1, codes[:, i1:i2], hinv1, scales, zeros, group_of[i1:i2],
                         group_dev[i1:i2], i, j, bits)
            i = j
        wp[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return QuantizedWeight(codes[:, inv], scales, zeros)


def smooth_factors(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel t (weights become W * t, activations x / t)."""
    a = act_absmax.to(torch.float32).clamp(min=1e-5)
    wmax = w.abs().amax(dim=0).clamp(min=1e-5)
    t = (a ** alpha / wmax ** (1 - alpha)).clamp(1e-4, 1e4)
    return torch.where(act_absmax > 0, t, torch.ones_like(t))


def _weight_noise_scale(fmt: LayerFormat) -> float:
    """Levels per unit of range: the weight step is ``range / levels`` (asymmetric: max - min
    with zero in range; symmetric: max|w|)."""
    bits = fmt.weight_bits
    return float((1 << (bits - 1)) - 1) if fmt.symmetric else float((1 << bits) - 1)


def noise_model_smoothing(x: torch.Tensor, w: torch.Tensor, fmt: LayerFormat,
                          steps: int = SMOOTH_STEPS, lr: float = SMOOTH_LR) -> torch.Tensor:
    """Per-input-channel t (weights W * t, activations x / t) minimising a model of the layer's
    output error from rounding both, on calibration rows `x` [M, K]; `w` [N, K].

    The model: rounding to a step ``d`` adds independent noise of variance ``d^2 / 12``.

    - activations (per-token dynamic, int8/int12: step ``D_m = max_k |x_mk / t_k| / Q``): every
      element of token m gets ``D_m^2 / 12``, which reaches the output through ``W_:k t_k``:
      ``E_act = mean_m D_m^2 / 12 * sum_k t_k^2 ||W_:k||^2``; with per-group activation scales
      (``activation_group_size``) the step ``D_mA`` is per token and channel group A, and
      ``E_act = mean_m sum_A D_mA^2 / 12 * sum_{k in A} t_k^2 ||W_:k||^2``. fp8 rounds
      relatively (its error scales with each element, not the row maximum), which t does not
      change: no term;
    - weights (step ``d_nG = range_G(W_n: t) / levels`` per output row n and group G of the
      format, levels ``2^b - 1`` asymmetric, ``2^(b-1) - 1`` symmetric): each weight gets
      ``d_nG^2 / 12``, which reaches the output through ``x_k / t_k``:
      ``E_w = sum_n sum_G d_nG^2 / 12 * sum_{k in G} E[x_k^2] / t_k^2``.

    Minimised over ``log t`` by Adam (`steps`, `lr`) from t = 1 (no smoothing); the result is
    scaled to geometric mean 1 (both terms are invariant to a common factor). SmoothQuant's
    ``t = max|x|^a / max|W|^(1-a)`` balances the two ranges by a rule; this balances the two
    errors: it raises the channels whose rounding errors cost most (large E[x^2], as AWQ's
    activation-aware scaling does for weight-only error) and flattens the activation outliers
    that set each token's step. Deterministic (no random draws). Measured on MiniLM, in
    :func:`quantize_layer` (GPTQ after it), relative output error on the held-out sentences of
    both folds, RMS over layers, SmoothQuant's alpha searched per layer -> this: W8A8 q/k/v
    0.0097 -> 0.0093, o 0.0125 -> 0.0121, fc1 0.0081 -> 0.0078, fc2 0.0130 -> 0.0112; W4A8 fc1
    0.0510 -> 0.0497, fc2 0.0362 -> 0.0310; W6A12 q/k/v 0.0175 -> 0.0170, o 0.0223 -> 0.0211.

    The gradient is the model's own, written out (:class:`_NoiseModel`): each step scales the
    weight, takes each row's group extremes and where they are, and sums the rows'
    contributions at those places (a handful of passes over the weight, ~15 ops) instead of
    autograd's graph of the same loss, which on a GPU ran ~2.4 ms a step (0.25 s a layer; H200,
    session 33). Where several elements tie for a maximum, the gradient goes to one of them
    (autograd shares it among them): a difference only at exact ties. Sums run in a fixed order
    (no atomic adds), so the result is the same on every run.
    """
    model = _NoiseModel(x, w, fmt)
    with torch.inference_mode(False), torch.no_grad():
        logt = torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)
        logt.grad = torch.zeros_like(logt)
        opt = torch.optim.Adam([logt], lr=lr)
        for _ in range(steps):
            t = logt.exp()
            logt.grad.copy_(model.grad(t) * t)  # d/dlog t = t d/dt
            opt.step()
        t = logt.exp()
        t = t / t.log().mean().exp()
        t = torch.where(torch.isfinite(t) & (t > 0), t, torch.ones_like(t))
    return t.clone()  # in the caller's mode


class _NoiseModel:
    """The noise model of :func:`noise_model_smoothing` for one layer: :meth:`loss` (torch ops,
    differentiable: the definition) and :meth:`grad`, its gradient in t written out. Built once
    per layer: the weight's magnitudes (or values, with zero points) grouped as the format
    groups them, E[x^2], |x| and the columns' energies."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor, fmt: LayerFormat):
        with torch.inference_mode(False):
            x = x.detach().to(torch.float32).clone()
            w = w.detach().to(torch.float32).clone()
        n, k = w.shape
        self.k = k
        self.g = k if fmt.group_size == PER_CHANNEL else fmt.group_size
        self.ng = k // self.g
        self.symmetric = fmt.symmetric
        self.levels = _weight_noise_scale(fmt)
        act = _act_format(fmt)
        self.qa = ACT_QMAX.get(act) if act in ("int8", "int12") else None
        self.ag = fmt.activation_group_size
        # Symmetric steps see |W| only; with zero points the signed range matters.
        self.wg = (w.abs() if fmt.symmetric else w).reshape(n, self.ng, self.g)
        self.col_energy = (w * w).sum(dim=0)  # ||W_:k||^2
        self.x_energy = (x * x).mean(dim=0)  # E[x_k^2]
        self.ax = x.abs()

    def loss(self, t: torch.Tensor) -> torch.Tensor:
        ws = self.wg * t.reshape(self.ng, self.g)
        if self.symmetric:
            step = ws.amax(dim=-1) / self.levels
        else:
            step = (ws.amax(dim=-1).clamp(min=0) - ws.amin(dim=-1).clamp(max=0)) / self.levels
        loss = (step * step * (self.x_energy / (t * t)).reshape(self.ng, self.g).sum(-1)).sum()
        loss = loss / 12
        if self.qa is not None:
            loss = loss + _activation_noise(self.ax / t, self.col_energy * t * t, self.qa,
                                            self.ag)
        return loss

    def grad(self, t: torch.Tensor) -> torch.Tensor:
        """d loss / d t [K] (float32)."""
        tg = t.reshape(self.ng, self.g)
        ws = self.wg * tg  # [N, groups, g]
        c_g = (self.x_energy / (t * t)).reshape(self.ng, self.g).sum(-1)  # [groups]
        hi, i_hi = ws.max(dim=-1)
        if self.symmetric:
            step = hi / self.levels
        else:
            lo, i_lo = ws.min(dim=-1)
            step = (hi.clamp(min=0) - lo.clamp(max=0)) / self.levels
        # The loss is sum_nG step^2 c_G / 12: through c_G (every k of the group) ...
        s2 = (step * step).sum(dim=0)  # [groups]
        grad = (s2[:, None] * (-2.0 * self.x_energy.reshape(self.ng, self.g) / tg ** 3)
                ).reshape(-1) / 12
        # ... and through each step, whose extremes move with their own channel's t:
        # d(|w| t)/dt = |w| = (value at the extreme) / t.
        d_step = 2.0 * step * c_g[None, :] / 12 / self.levels  # d loss / d (range) [N, groups]
        at = torch.zeros_like(ws)  # each row's contribution at its extreme, then summed
        hi_t = tg.expand_as(ws).gather(-1, i_hi[..., None])
        if self.symmetric:
            at.scatter_(-1, i_hi[..., None], (d_step * hi)[..., None] / hi_t)
        else:
            lo_t = tg.expand_as(ws).gather(-1, i_lo[..., None])
            at.scatter_(-1, i_hi[..., None], (d_step * (hi > 0) * hi)[..., None] / hi_t)
            # Where one element is both extremes (a group of one column) the two add.
            at.scatter_add_(-1, i_lo[..., None], (-d_step * (lo < 0) * lo)[..., None] / lo_t)
        grad = grad + at.sum(dim=0).reshape(-1)
        if self.qa is not None:
            grad += self._activation_grad(t)
        return grad

    def _activation_grad(self, t: torch.Tensor) -> torch.Tensor:
        """d/dt of :func:`_activation_noise` (|x| / t, energies t^2 ||W_:k||^2)."""
        m, k = self.ax.shape
        energy = self.col_energy * t * t
        if self.ag == PER_TOKEN:
            y, idx = (self.ax / t).max(dim=1)
            d = y / self.qa  # [M]
            total = energy.sum()
            grad = (d * d).mean() / 12 * 2.0 * self.col_energy * t
            # d D_m / d t_k at its maximum: -D_m / t_k.
            at = torch.zeros_like(self.ax).scatter_(
                1, idx[:, None], (-(2.0 * d / m / 12 * total) * d / t[idx])[:, None])
            return grad + at.sum(dim=0)
        g = self.ag
        n_groups = -(-k // g)
        pad = n_groups * g - k
        tp = torch.nn.functional.pad(t, (0, pad), value=1.0)
        y, idx = torch.nn.functional.pad(self.ax / t, (0, pad)).reshape(m, n_groups, g).max(-1)
        step = y / self.qa  # [M, groups]
        group_energy = torch.nn.functional.pad(energy, (0, pad)).reshape(n_groups, g).sum(-1)
        s2 = (step * step).mean(dim=0) / 12  # [groups]
        grad = s2.repeat_interleave(g)[:k] * 2.0 * self.col_energy * t
        d_step = 2.0 * step * group_energy[None, :] / m / 12
        t_at = tp.reshape(n_groups, g).expand(m, n_groups, g).gather(-1, idx[..., None])
        at = torch.zeros(m, n_groups, g, dtype=t.dtype, device=t.device).scatter_(
            -1, idx[..., None], (-d_step * step)[..., None] / t_at)
        return grad + at.sum(dim=0).reshape(-1)[:k]


def _activation_noise(ax: torch.Tensor, energy: torch.Tensor, qmax: float,
                      act_group_size: int) -> torch.Tensor:
    """The noise model's activation term: ``mean_m sum_A D_mA^2 / 12 * energy_A`` for |x'| `ax`
    [M, K], per-channel output energies `energy` [K] and steps ``D_mA = max_{k in A} ax / qmax``
    over the row (per token) or over each channel group A (the last one partial)."""
    if act_group_size == PER_TOKEN:  # the per-token formula as it always was (bit for bit)
        d_tok = ax.amax(dim=1) / qmax
        return (d_tok * d_tok).mean() / 12 * energy.sum()
    m, k = ax.shape
    g = act_group_size
    n_groups = -(-k // g)
    pad = n_groups * g - k
    step = torch.nn.functional.pad(ax, (0, pad)).reshape(m, n_groups, g).amax(dim=-1) / qmax
    group_energy = torch.nn.functional.pad(energy, (0, pad)).reshape(n_groups, g).sum(dim=-1)
    return (step * step * group_energy).sum(dim=1).mean() / 12


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    den = float(ref.double().norm())
    return float((y.double() - ref.double()).norm()) / den if den > 0 else 0.0


@dataclasses.dataclass
class LayerResult:
    packed: P.PackedWeight
    smooth: Optional[torch.Tensor]  # float32 [K] multiplier of x, or None
    info: dict


def _act_format(fmt: LayerFormat) -> str:
    return "none" if fmt.activation_bits == 16 else fmt.activation_format


def _simulate(x: torch.Tensor, qw: QuantizedWeight, fmt: LayerFormat, smooth, bias) -> torch.Tensor:
    """The op's output for rows `x` (float32), with weights dequantised in float32."""
    a = fake_quantize_activations(x, _act_format(fmt), smooth, fmt.activation_group_size)
    y = a @ qw.dequantize(fmt.group_size).t()
    return y + bias if bias is not None else y


MIN_VALIDATION_ROWS = 16  # per half: fewer and the held-out comparison is noise


def gptq_refined(w: torch.Tensor, h: torch.Tensor, fmt: LayerFormat, damp: float,
                 settings: CalibrationSettings, info: Optional[dict] = None
                 ) -> tuple[QuantizedWeight, QuantizedWeight]:
    """(result, GPTQ's result): GPTQ with the settings' clipping search and act-order, then
    ``settings.refine`` coordinate-descent sweeps over its codes on the same damped objective
    (:func:`q3n_compile.quant.refine.refine_codes`; the result is GPTQ's when 0). `info`
    receives the refinement's figures."""
    from .refine import refine_codes

    g = gptq(w, h, fmt, damp, settings.clip_search, settings.act_order)
    if not settings.refine:
        return g, g
    codes = refine_codes(w, h, g.codes, g.scales, g.zeros, fmt.weight_bits, fmt.group_size,
                         damp, settings.refine, info)
    return QuantizedWeight(codes, g.scales, g.zeros), g


def _gptq_generalises(x: torch.Tensor, w_s: torch.Tensor, smooth: Optional[torch.Tensor],
                      b: Optional[torch.Tensor], fmt: LayerFormat, settings: CalibrationSettings,
                      n_rows: int, info: dict) -> tuple[bool, Optional[str]]:
    """Whether GPTQ beats RTN+clip on rows it did not see; (decision, why) — why is None when no
    held-out check was possible (then the caller compares on the calibration rows).

    When every calibration row was kept (few rows: the regime where GPTQ can overfit), both are
    fitted on the even rows and compared on the odd ones. With fewer rows per input channel than
    GPTQ needs (random-weight models with isotropic inputs need thousands; real models, whose
    activations have few dominant directions, far fewer), RTN+clip wins there and is kept.
    """
    if x.shape[0] != n_rows or n_rows < 2 * MIN_VALIDATION_ROWS:
        return True, None
    xs = x if smooth is None else x * smooth[None, :]  # the rows as the smoothed weight sees them
    fit, held = xs[0::2], xs[1::2]
    h_fit = fit.t() @ fit / fit.shape[0]
    y_held = held @ w_s.t() + (b if b is not None else 0)
    # Rows already smoothed: simulate without the smoothing vector.
    g, _ = gptq_refined(w_s, h_fit, fmt, damping(settings.damp, w_s.shape[1], fit.shape[0]),
                        settings)
    r = quantize_rtn(w_s, fmt, torch.diagonal(h_fit), settings.clip_search)
    e_g = relative_error(_simulate(held, g, fmt, None, b), y_held)
    e_r = relative_error(_simulate(held, r, fmt, None, b), y_held)
    info["validation"] = {"rows": int(held.shape[0]), "gptq_rel_err": float(f"{e_g:.5g}"),
                          "rtn_rel_err": float(f"{e_r:.5g}")}
    if e_g < e_r:
        return True, "gptq beat rtn+clip on held-out calibration rows"
    return False, (f"kept rtn+clip: fitted on half the {n_rows} calibration rows, gptq's error on "
                   f"the other half was {e_g:.4g} against rtn+clip's {e_r:.4g} (too few rows for "
                   "this layer's width)")


def _smoothing_alphas(fmt: LayerFormat, settings: CalibrationSettings) -> tuple:
    """The smoothing candidates a layer of `fmt` chooses among (None: no smoothing)."""
    use_sq = settings.smoothquant is True or (settings.smoothquant == "auto"
                                              and fmt.activation_bits == 8)
    if _act_format(fmt) == "none" or not use_sq:
        return (None,)
    return {None: SMOOTH_CANDIDATES, "search": SMOOTH_ALPHAS}.get(settings.alpha,
                                                                  (settings.alpha,))


def _calibration_tensors(w, b, stats):
    x = stats.samples().to(w.device, torch.float32)
    h = stats.hessian().to(w.device, torch.float32)
    return x, h, x @ w.t() + (b if b is not None else 0)


def _best_smoothing(w, b, x, h, y_ref, fmt, settings, stats, alphas, info) -> tuple:
    """(err, alpha, w_s, h_s, smooth, RTN+clip weight) of the candidate with the lowest error
    on the calibration rows; an alpha that is a tensor is a given multiplier t of W's columns."""
    best = None
    for alpha in alphas:
        if alpha is None:
            w_s, h_s, smooth = w, h, None
        else:
            if isinstance(alpha, torch.Tensor):
                t = alpha.to(w.device, torch.float32)
            elif alpha == NOISE_MODEL:
                t = noise_model_smoothing(x, w, fmt)
            else:
                t = smooth_factors(stats.absmax.to(w.device), w, alpha)
            w_s = w * t[None, :]
            h_s = h / (t[:, None] * t[None, :])
            smooth = (1.0 / t).to(torch.float32)
        d = torch.diagonal(h_s)
        cand = quantize_rtn(w_s, fmt, d, settings.clip_search)
        err = relative_error(_simulate(x, cand, fmt, smooth, b), y_ref)
        if len(alphas) > 1:
            info.setdefault("smoothing_rel_err", {})[
                "none" if alpha is None else str(alpha)] = float(f"{err:.5g}")
        if best is None or err < best[0]:
            best = (err, alpha, w_s, h_s, smooth, cand)
    return best


def _group_smoothing(weights: list[torch.Tensor], biases: list[Optional[torch.Tensor]],
                     x: torch.Tensor, h: torch.Tensor, fmt: LayerFormat,
                     settings: CalibrationSettings, stats, alphas: tuple
                     ) -> tuple[Any, Optional[torch.Tensor], dict]:
    """(alpha, t or None, info) of the usual choice made for the concatenated weight of
    `weights` (float32), the candidates judged by the error of all their outputs together."""
    w = torch.cat(weights)
    dev = w.device
    b = None
    if any(bi is not None for bi in biases):
        b = torch.cat([bi if bi is not None else torch.zeros(wt.shape[0], device=dev)
                       for wt, bi in zip(weights, biases)])
    y_ref = x @ w.t() + (b if b is not None else 0)
    # Each member's rows scaled to unit output energy on the calibration rows: the noise model
    # and the candidates' error then weigh every layer's relative error alike (row scales
    # commute with t, which scales columns), not the layer with the largest outputs.
    scale = torch.cat([torch.full((wt.shape[0],), 1.0 / max(float(y.norm()), 1e-30), device=dev)
                       for wt, y in zip(weights, y_ref.split([wt.shape[0] for wt in weights],
                                                             dim=1))])
    w, y_ref = w * scale[:, None], y_ref * scale[None, :]
    b = None if b is None else b * scale
    info: dict = {}
    _, alpha, _, _, smooth, _ = _best_smoothing(w, b, x, h, y_ref, fmt, settings, stats, alphas,
                                                info)
    return alpha, (None if smooth is None else (1.0 / smooth).to(torch.float32)), info


def choose_shared_smoothing(weights: list[torch.Tensor], biases: list[Optional[torch.Tensor]],
                            fmt: LayerFormat, settings: CalibrationSettings, stats,
                            within: Optional[float] = None
                            ) -> tuple[Optional[torch.Tensor], list[bool], dict]:
    """One smoothing choice for sibling linears that read the same input (q/k/v, gate/up), so
    they quantize x alike and can run as one GEMM: the layer's usual choice made for their
    concatenated weight (each member's outputs weighed alike).

    Returns (t, adopted, info): t multiplies W's columns (x is divided by it), None for no
    smoothing; ``adopted[i]`` says whether member i takes it. `within` None: every member does.
    A number: member i takes it only if its calibration error under t (RTN+clip, as a layer's
    candidates are compared) is at most ``1 + within`` times its own choice's; the choice is
    made again without the member it suits least until it suits all that are left, and with
    fewer than two left none takes it (sharing gains nothing without a partner).
    ``info["members"][i]`` gives each member's two errors (under the last choice it was judged
    by) and its verdict.
    """
    ws = [_rotated_weight(wt.detach().to(torch.float32), fmt) for wt in weights]
    stats = _rotated_stats(stats, fmt)
    dev = ws[0].device
    bs = [None if bi is None else bi.detach().to(dev, torch.float32) for bi in biases]
    alphas = _smoothing_alphas(fmt, settings)
    if stats is None or stats.n == 0 or alphas == (None,):
        return None, [False] * len(ws), {}
    x = stats.samples().to(dev, torch.float32)
    h = stats.hessian().to(dev, torch.float32)
    if within is None:
        alpha, t, info = _group_smoothing(ws, bs, x, h, fmt, settings, stats, alphas)
        info["alpha"] = None if alpha is None else str(alpha)
        return t, [True] * len(ws), info

    y_refs = [x @ w.t() + (b if b is not None else 0) for w, b in zip(ws, bs)]

    def error(i: int, candidates: tuple) -> float:
        return _best_smoothing(ws[i], bs[i], x, h, y_refs[i], fmt, settings, stats, candidates,
                               {})[0]

    own = [error(i, alphas) for i in range(len(ws))]
    members = list(range(len(ws)))
    verdicts: dict[int, dict] = {}
    t, alpha = None, None
    while len(members) >= 2:
        alpha, t, _ = _group_smoothing([ws[i] for i in members], [bs[i] for i in members], x, h,
                                       fmt, settings, stats, alphas)
        ratios = {}
        for i in members:
            e = error(i, (t,) if t is not None else (None,))
            ratios[i] = e / max(own[i], 1e-30)
            verdicts[i] = {"rel_err": float(f"{e:.5g}"), "own_rel_err": float(f"{own[i]:.5g}"),
                           "within": within}
        worst = max(members, key=lambda i: ratios[i])
        if ratios[worst] <= 1.0 + within:
            break
        members = [i for i in members if i != worst]  # the choice is made again without it
    adopted = [i in members and len(members) >= 2 for i in range(len(ws))]
    for i, v in verdicts.items():
        v["adopted"] = adopted[i]
    info = {"alpha": None if alpha is None else str(alpha),
            "members": [verdicts.get(i) for i in range(len(ws))]}
    return (t if any(adopted) else None), adopted, info


def _rotated_weight(w: torch.Tensor, fmt: LayerFormat) -> torch.Tensor:
    """``W R`` (float32) for a format with a rotation (the weight the op's rotated activations
    meet), else w."""
    return rotate_rows(w, fmt.rotation).to(torch.float32) if fmt.rotation else w


def _rotated_stats(stats, fmt: LayerFormat):
    """The statistics of the rows ``x R`` for a format with a rotation, else `stats`."""
    if not fmt.rotation or stats is None or stats.n == 0:
        return stats
    return stats.rotated(fmt.rotation)


def quantize_layer(weight: torch.Tensor, bias: Optional[torch.Tensor], fmt: LayerFormat,
                   settings: CalibrationSettings, stats=None, shared_smoothing: Any = False
                   ) -> LayerResult:
    """Quantize one linear (`fmt` resolved for it: :meth:`LayerFormat.resolved`, so no "auto"
    activation format or rotation is left).

    `stats` (:class:`~q3n_compile.quant.calibration.LayerStats` or None) gives the input Hessian,
    per-channel activation maxima and calibration rows. Without it: RTN with a data-free clipping
    search, and no error figures. `shared_smoothing`: False (the default) lets the layer choose
    its smoothing; a tensor t (or None) is the choice :func:`choose_shared_smoothing` made for
    its siblings, used as it is.

    A format with a rotation quantizes ``W R`` from the statistics of ``x R`` (the op's rotated
    activations meet it): every search, error figure and smoothing vector is in the rotated
    basis, where the outputs are the layer's own.
    """
    if fmt.rotation < 0:
        raise ValueError(f"format {fmt.name}: its automatic rotation is not resolved for a layer; "
                         "call LayerFormat.resolved(in_features, fp8) first")
    w = _rotated_weight(weight.detach().to(torch.float32), fmt)
    stats = _rotated_stats(stats, fmt)
    b = None if bias is None else bias.detach().to(torch.float32)
    info: dict = {"calibration_rows": 0}
    if stats is None or stats.n == 0:
        qw = quantize_rtn(w, fmt, None, settings.clip_search)
        info["method"] = "rtn" + ("+clip" if settings.clip_search else "")
        info["note"] = "no calibration data: error figures need layer inputs"
        return LayerResult(qw.pack(fmt), None, info)

    x, h, y_ref = _calibration_tensors(w, b, stats)
    info["calibration_rows"] = int(stats.n)
    info["error_rows"] = int(x.shape[0])

    rtn = quantize_rtn(w, fmt)
    info["rtn_rel_err"] = relative_error(_simulate(x, rtn, fmt, None, b), y_ref)

    # Smoothing (quantized activations only: the kernel applies the vector while quantizing x):
    # the noise-model optimum or none (alpha null), SmoothQuant's rule over a grid of alphas or
    # none ("search"), or one given alpha; candidates are compared by the error of a cheap
    # RTN+clip quantization on the calibration rows, so with none among them the choice never
    # does worse there than no smoothing.
    if shared_smoothing is False:
        alphas = _smoothing_alphas(fmt, settings)
    else:
        alphas = (shared_smoothing,)
    err, alpha, w_s, h_s, smooth, qw = _best_smoothing(w, b, x, h, y_ref, fmt, settings, stats,
                                                      alphas, info)
    method = "rtn" + ("+clip" if settings.clip_search else "")
    if settings.method == "gptq":
        try:
            use_gptq, why = _gptq_generalises(x, w_s, smooth, b, fmt, settings, stats.n, info)
            if use_gptq:
                damp = damping(settings.damp, w.shape[1], stats.n)
                info["damp"] = round(damp, 4)
                refined: dict = {}
                g, plain = gptq_refined(w_s, h_s, fmt, damp, settings, refined)
                g_err = relative_error(_simulate(x, g, fmt, smooth, b), y_ref)
                if refined:
                    # The layer's error before the sweeps (GPTQ alone, same scales) and after.
                    refined["gptq_rel_err"] = float(
                        f"{relative_error(_simulate(x, plain, fmt, smooth, b), y_ref):.5g}")
                    refined["rel_err"] = float(f"{g_err:.5g}")
                    info["refine"] = refined
                if why is not None or g_err <= err:
                    qw, err = g, g_err
                    method = "gptq" + ("+clip" if settings.clip_search else "")
                    if refined:
                        method += f"+cd{refined['sweeps']}"
                else:
                    info["note"] = (f"gptq error {g_err:.4g} above rtn+clip {err:.4g} on the "
                                    "calibration rows: kept rtn+clip")
            else:
                info["note"] = why
        except HessianError as exc:
            info["note"] = f"gptq skipped: {exc}"
    if isinstance(alpha, torch.Tensor):
        method += "+smooth(shared with siblings)"
    elif alpha == NOISE_MODEL:
        method += "+smooth(noise-model)"
    elif alpha is not None:
        method += f"+smoothquant(alpha={alpha})"
    info["method"] = method
    info["rel_err"] = err
    return LayerResult(qw.pack(fmt), smooth, info)

