"""Mixed-precision quantization of linear layers: configuration, classification, calibration.

Public API:

- :func:`calibrate` ``(model, batches)`` — record the linears' input statistics on the user's
  calibration data before ``torch.compile``; the quantize pass then uses GPTQ and smoothing on
  them. Without it, the first compile calibrates each layer on its example inputs (the first
  call's real values; at least 32 rows per layer, once, reused by later compiles; turn off with
  ``quant_config["calibration"]["example_inputs"] = False``), else rounds to nearest with a
  clipping search. Representative data through :func:`calibrate` is better than one batch.
- :func:`parse_quant_config` / :func:`validate_quant_config` — the ``quant_config`` option.
- :func:`clear` — forget calibration statistics and cached quantization results.
- :func:`prune` — forget those of weights that no longer exist (a deleted model's), now rather
  than when the next entry is added.
- :func:`quantize_linear` — quantize one weight outside torch.compile (tests, experiments).
- :func:`search_precision` ``(model, batches, budget=0.02)`` — the fewest weight bytes per layer
  within a per-layer error budget; returns a ``quant_config`` the option accepts.
- :func:`release_quantized_weights` ``(model)`` (also ``q3n_compile.release_quantized_weights``) —
  after the compiled model's first call, free the high-precision weights q3n quantized.
"""

from .calibration import LayerStats, cache_info, calibrate
from .calibration import clear as _clear_calibration
from .config import LayerFormat, QuantConfig, parse_quant_config, validate_quant_config


def clear() -> None:
    """Forget every calibration statistic, cached quantization result and record of quantized
    weights (a weight released before this cannot be quantized again: reload it first)."""
    from . import release

    _clear_calibration()
    release.clear()


def prune() -> None:
    """Drop the statistics, cached results and records of weights that no longer exist."""
    from . import calibration, release

    calibration.prune()
    release.prune()


def __getattr__(name):
    # The algorithms import the kernels (and Triton): only when asked for.
    if name in ("LayerResult", "quantize_layer"):
        from . import algorithms
        return getattr(algorithms, name)
    if name == "release_quantized_weights":
        from .release import release_quantized_weights
        return release_quantized_weights
    if name == "search_precision":
        from .search import search_precision
        return search_precision
    raise AttributeError(name)


def quantize_linear(weight, bias=None, *, weight_bits=4, activation_bits=16, group_size=None,
                    symmetric=None, activation_format=None, activation_group_size=None,
                    rotation=None, inputs=None, method="gptq",
                    smoothquant="auto", clip_search=True, max_rows=512, refine=0):
    """Quantize one ``[N, K]`` weight, optionally calibrated on `inputs` (``[..., K]`` rows).

    Returns an :class:`~q3n_compile.quant.algorithms.LayerResult` (packed weight, smoothing vector,
    info with the relative output errors on `inputs`). ``activation_format`` "auto" means int8 here.
    ``rotation`` (32, 64, 128; None or 0: none, unlike ``quant_config``'s default for int8
    activations, since the caller runs the op and must pass the same): the result is ``W R``'s
    (run it with q3n::qlinear's ``rotation`` argument).
    """
    from .algorithms import quantize_layer
    entry = {"weight_bits": weight_bits, "activation_bits": activation_bits}
    if group_size is not None:
        entry["group_size"] = group_size
    if symmetric is not None:
        entry["symmetric"] = symmetric
    if activation_format is not None:
        entry["activation_format"] = activation_format
    if activation_group_size is not None:
        entry["activation_group_size"] = activation_group_size
    entry["rotation"] = rotation or 0
    qc = parse_quant_config({"ffn_layers": entry, "calibration": {
        "method": method, "smoothquant": smoothquant, "clip_search": clip_search,
        "max_rows": max_rows, "refine": refine}})
    fmt = qc.classes["ffn"].resolved(weight.shape[1], fp8=False)
    stats = None
    if inputs is not None:
        stats = LayerStats(weight.shape[1], max_rows)
        stats.add(inputs)
    return quantize_layer(weight, bias, fmt, qc.calibration, stats)


__all__ = ["LayerFormat", "LayerResult", "LayerStats", "QuantConfig", "cache_info", "calibrate",
           "clear", "parse_quant_config", "quantize_layer", "quantize_linear",
           "release_quantized_weights", "search_precision", "validate_quant_config"]
