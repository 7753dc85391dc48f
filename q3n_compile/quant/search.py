"""Per-layer precision search: the fewest weight bytes that keep every layer within an error budget.

:func:`search_precision` ``(model, batches, budget=0.02)``:

1. calibrates the model's linears on `batches` (:func:`~q3n_compile.quant.calibrate`);
2. for every linear (output heads and routers only if ``include_heads``), tries the candidate
   formats from the fewest bytes per weight to the most, quantizing each exactly as the quantize
   pass will (GPTQ, SmoothQuant, clipping search; results go to the same cache, so compiling with
   the chosen config right after does not quantize again), and keeps the first whose relative
   output error on the calibration rows is within `budget`; a layer no candidate satisfies stays
   in high precision (``weight_bits: 16``);
3. returns ``{"quant_config": {...}, "layers": [...], "weight_bytes_before": ..,
   "weight_bytes_after": ..}``. The config has one exact-path rule per linear, is accepted by the
   ``quant_config`` option as is, and is JSON (save it with ``json.dump``).

The budget is per layer (relative output error of that layer on its calibration inputs), not on
the model's output; layer errors compound through depth, so a model-level target needs a tighter
per-layer budget (a model-level search is future work).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional, Sequence

from torch import nn

from . import calibration as C
from .classify import classify_path
from .config import PROTECTED_CLASSES, parse_quant_config

# Candidate formats: (weight_bits, activation_bits, group_size); ordered by bytes per weight.
DEFAULT_CANDIDATES: tuple[tuple[int, int, int], ...] = (
    (3, 16, 32), (4, 16, 128), (4, 16, 32), (5, 16, 128), (6, 16, 128), (8, 16, -1))


def _bytes_per_weight(bits: int, group: int, k: int, symmetric: bool) -> float:
    g = k if group == -1 else group
    return bits / 8 + 2 / g + (0 if symmetric else 1 / g)


def search_precision(model: nn.Module, batches: Iterable[Any], *, budget: float = 0.02,
                     candidates: Sequence[tuple[int, int, int]] = DEFAULT_CANDIDATES,
                     include_heads: bool = False, calibration: Optional[dict] = None,
                     max_rows: int = 512) -> dict:
    """Choose a format per linear of `model` (see the module docstring)."""
    from ..passes.quantize import _resolve_act  # the pass's activation-format rule
    from .algorithms import quantize_layer

    settings = parse_quant_config({"calibration": calibration or {}}).calibration
    C.calibrate(model, batches, max_rows=max_rows)
    rules, layers = [], []
    before = after = 0
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        cls = classify_path(path)
        if cls in PROTECTED_CLASSES and not include_heads:
            continue
        found = C.lookup_stats(module.weight)
        if found is None:
            continue  # not reached by the calibration batches
        stats = found[0]
        w, b = module.weight, module.bias
        k = w.shape[1]
        tried = []
        options = []
        for bits, act_bits, group in candidates:
            if group != -1 and k % group:
                continue
            entry = {"weight_bits": bits, "activation_bits": act_bits, "group_size": group}
            fmt = parse_quant_config({"ffn_layers": entry}).classes["ffn"]
            options.append((_bytes_per_weight(bits, group, k, fmt.symmetric), entry, fmt))
        options.sort(key=lambda o: o[0])
        chosen = None
        for per_weight, entry, fmt in options:
            fmt = _resolve_act(fmt.for_k(k), w.device)
            key = C.cache_key(w, fmt, settings, stats.fingerprint(),
                              None if b is None else C.weight_key(b))
            result = C.cache_get(key)
            if result is None:
                result = quantize_layer(w, b, fmt, settings, stats)
                C.cache_put(key, w, result)
            err = result.info.get("rel_err")
            tried.append({"format": fmt.name, "rel_err": err})
            if err is not None and err <= budget:
                chosen = (entry, fmt, result)
                break
        size = w.numel() * w.element_size()
        before += size
        if chosen is None:
            rules.append({"match": path, "weight_bits": 16})
            after += size
            layers.append({"layer": path, "class": cls, "format": "high precision",
                           "tried": tried})
            continue
        entry, fmt, result = chosen
        rules.append({"match": path, **entry, **({"symmetric": fmt.symmetric})})
        packed = result.packed.nbytes + (0 if result.smooth is None else result.smooth.numel() * 4)
        after += packed
        layers.append({"layer": path, "class": cls, "format": fmt.name,
                       "rel_err": result.info.get("rel_err"), "bytes_before": size,
                       "bytes_after": packed, "tried": tried})
    config = {"rules": rules, "calibration": dataclasses.asdict(settings)}
    parse_quant_config(config)  # what we return is valid by construction; check anyway
    return {"quant_config": config, "layers": layers, "budget": budget,
            "weight_bytes_before": before, "weight_bytes_after": after}
