"""Weight quantization: round-to-nearest, clipping search, GPTQ, SmoothQuant; per-layer driver.

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
- **GPTQ** (Frantar et al., 2022): columns are quantized in order; each column's rounding error is
  spread over the not-yet-quantized columns through the inverse Hessian ``H = E[x x^T]``
  (dampened by ``damp * mean(diag H)``), in blocks of 128 columns with lazy updates. Group
  parameters are chosen (with the clipping search) when the group's first column is reached, from
  the weights as updated so far.
- **SmoothQuant** (Xiao et al., 2022), for quantized activations: per input channel
  ``t_k = max|x_k|^α / max_n|W_nk|^(1-α)``; the layer computes ``(x / t) (W t)^T``: the weights
  absorb ``t`` and the kernel multiplies ``x`` by ``1/t`` before quantizing it (the ``smooth``
  vector of ``q3n::qlinear``). α is searched per layer (including "no smoothing") unless given.
- :func:`quantize_layer` runs the above for one layer and measures, on the calibration rows, the
  relative output error ``||y_q - y|| / ||y||`` of the result and of plain RTN (the baseline).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..kernels import packing as P
from ..kernels.qlinear import fake_quantize_activations
from .config import CalibrationSettings, LayerFormat, PER_CHANNEL

CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 ... 0.5
SMOOTH_ALPHAS = (None, 0.25, 0.5, 0.75)  # None: no smoothing
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
    best_err = best_s = best_z = None
    for r in CLIP_RATIOS:
        s, z = group_params(w, bits, symmetric, r)
        q = quantize_codes(w, s, z, bits)
        err = (((q - z[:, None]) * s[:, None] - w) ** 2 * weight[None, :]).sum(dim=1)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


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
        scales = self.scales.to(P.scale_dtype_for(self.scales))
        zeros = None if fmt.symmetric else self.zeros.to(torch.uint8)
        return P.pack(self.codes.to(torch.int64), scales, zeros, fmt.weight_bits, fmt.group_size)


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


def gptq(w: torch.Tensor, h: torch.Tensor, fmt: LayerFormat, damp: float = 0.01,
         clip: bool = True) -> QuantizedWeight:
    """GPTQ with static groups chosen on the fly; `h` is E[x x^T] [K, K]."""
    w = w.clone().to(torch.float32)
    h = h.clone().to(torch.float32)
    n, k = w.shape
    bits, sym, gs = fmt.weight_bits, fmt.symmetric, fmt.group_size
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    d_all = torch.diagonal(h).clone()
    hinv = _inverse_hessian_factor(h, damp)
    codes = torch.zeros_like(w)
    n_groups = 1 if gs == PER_CHANNEL else k // gs
    scales = torch.zeros(n_groups, n, device=w.device)
    zeros = torch.zeros(n_groups, n, device=w.device)
    if gs == PER_CHANNEL:
        s, z = search_params(w, bits, sym, d_all, clip)
        scales[0], zeros[0] = s, z
    for i1 in range(0, k, GPTQ_BLOCK):
        i2 = min(i1 + GPTQ_BLOCK, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if gs != PER_CHANNEL and col % gs == 0:
                # Groups never straddle a block: 128 is a multiple of every group size.
                s, z = search_params(w1[:, i:i + gs], bits, sym, d_all[col:col + gs], clip)
                scales[col // gs], zeros[col // gs] = s, z
            g = 0 if gs == PER_CHANNEL else col // gs
            s, z = scales[g], zeros[g]
            wc = w1[:, i]
            q = quantize_codes(wc, s, z, bits)
            codes[:, col] = q
            e = (wc - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return QuantizedWeight(codes, scales, zeros)


def smooth_factors(act_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel t (weights become W * t, activations x / t)."""
    a = act_absmax.to(torch.float32).clamp(min=1e-5)
    wmax = w.abs().amax(dim=0).clamp(min=1e-5)
    t = (a ** alpha / wmax ** (1 - alpha)).clamp(1e-4, 1e4)
    return torch.where(act_absmax > 0, t, torch.ones_like(t))


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
    a = fake_quantize_activations(x, _act_format(fmt), smooth)
    y = a @ qw.dequantize(fmt.group_size).t()
    return y + bias if bias is not None else y


def quantize_layer(weight: torch.Tensor, bias: Optional[torch.Tensor], fmt: LayerFormat,
                   settings: CalibrationSettings, stats=None) -> LayerResult:
    """Quantize one linear (``fmt.activation_format`` already resolved, not "auto").

    `stats` (:class:`~q3n_compile.quant.calibration.LayerStats` or None) gives the input Hessian,
    per-channel activation maxima and calibration rows. Without it: RTN with a data-free clipping
    search, and no error figures.
    """
    w = weight.detach().to(torch.float32)
    b = None if bias is None else bias.detach().to(torch.float32)
    act = _act_format(fmt)
    info: dict = {"calibration_rows": 0}
    if stats is None or stats.n == 0:
        qw = quantize_rtn(w, fmt, None, settings.clip_search)
        info["method"] = "rtn" + ("+clip" if settings.clip_search else "")
        info["note"] = "no calibration data: error figures need layer inputs"
        return LayerResult(qw.pack(fmt), None, info)

    x = stats.samples().to(w.device, torch.float32)
    h = stats.hessian().to(w.device, torch.float32)
    y_ref = x @ w.t() + (b if b is not None else 0)
    info["calibration_rows"] = int(stats.n)
    info["error_rows"] = int(x.shape[0])

    rtn = quantize_rtn(w, fmt)
    info["rtn_rel_err"] = relative_error(_simulate(x, rtn, fmt, None, b), y_ref)

    # SmoothQuant: pick alpha (or none) by the error of a cheap RTN+clip quantization.
    alphas: tuple = (None,)
    use_sq = settings.smoothquant is True or (settings.smoothquant == "auto"
                                              and fmt.activation_bits == 8)
    if act != "none" and use_sq:
        alphas = (settings.alpha,) if settings.alpha is not None else SMOOTH_ALPHAS
    best = None
    for alpha in alphas:
        if alpha is None:
            t = None
            w_s, h_s, smooth = w, h, None
        else:
            t = smooth_factors(stats.absmax.to(w.device), w, alpha)
            w_s = w * t[None, :]
            h_s = h / (t[:, None] * t[None, :])
            smooth = (1.0 / t).to(torch.float32)
        d = torch.diagonal(h_s)
        cand = quantize_rtn(w_s, fmt, d, settings.clip_search)
        err = relative_error(_simulate(x, cand, fmt, smooth, b), y_ref)
        if best is None or err < best[0]:
            best = (err, alpha, w_s, h_s, smooth, cand)
    err, alpha, w_s, h_s, smooth, qw = best
    method = "rtn" + ("+clip" if settings.clip_search else "")
    if settings.method == "gptq":
        try:
            g = gptq(w_s, h_s, fmt, settings.damp, settings.clip_search)
            g_err = relative_error(_simulate(x, g, fmt, smooth, b), y_ref)
            if g_err <= err:
                qw, err = g, g_err
                method = "gptq" + ("+clip" if settings.clip_search else "")
            else:
                info["note"] = (f"gptq error {g_err:.4g} above rtn+clip {err:.4g} on the "
                                "calibration rows: kept rtn+clip")
        except HessianError as exc:
            info["note"] = f"gptq skipped: {exc}"
    if alpha is not None:
        method += f"+smoothquant(alpha={alpha})"
    info["method"] = method
    info["rel_err"] = err
    return LayerResult(qw.pack(fmt), smooth, info)

