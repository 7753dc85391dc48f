"""Per-layer precision search: the fewest weight bytes that keep every layer within an error budget.

:func:`search_precision` ``(model, batches, budget=0.02)``:

1. calibrates the model's linears on `batches` (:func:`~q3n_compile.quant.calibrate`);
2. for every linear (output heads and routers only if ``include_heads``), tries the candidate
   formats from the fewest bytes per weight to the most, quantizing each exactly as the quantize
   pass will (GPTQ, smoothing, clipping search; results go to the same cache, so compiling with
   the chosen config right after does not quantize again), and keeps the first whose relative
   output error on the calibration rows is within `budget`; a layer no candidate satisfies stays
   in high precision (``weight_bits: 16``);
3. returns ``{"quant_config": {...}, "layers": [...], "weight_bytes_before": ..,
   "weight_bytes_after": ..}``. The config has one exact-path rule per linear, is accepted by the
   ``quant_config`` option as is, and is JSON (save it with ``json.dump``).

The command line: ``q3n quant-search --model bert --budget 0.05 --out cfg.json`` (see
``q3n quant-search --help``) prints :func:`format_table` and saves the ``quant_config``.

The budget is per layer (relative output error of that layer on its calibration inputs), not on
the model's output; layer errors compound through depth, so a model-level target needs a tighter
per-layer budget (a model-level search is future work).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Sequence

from torch import nn

from . import calibration as C
from .classify import classify_path
from .config import PROTECTED_CLASSES, parse_quant_config

# Candidate formats: (weight_bits, activation_bits, group_size[, activation_group_size]), group 0
# = automatic (128, else the largest of 64/32 dividing K, else per channel), -1 = per channel;
# activation group -1 (or left out) = per token; tried by bytes per weight.
DEFAULT_CANDIDATES: tuple[tuple[int, int, int], ...] = (
    (3, 16, 32), (4, 16, 0), (4, 16, 32), (5, 16, 0), (6, 16, 0), (8, 16, -1))


def _bytes_per_weight(bits: int, group: int, k: int, symmetric: bool) -> float:
    g = k if group == -1 else group
    return bits / 8 + 2 / g + (0 if symmetric else 1 / g)


def search_precision(model: nn.Module, batches: Iterable[Any], *, budget: float = 0.02,
                     candidates: Sequence[tuple[int, int, int]] = DEFAULT_CANDIDATES,
                     include_heads: bool = False, calibration: Optional[dict] = None,
                     max_rows: int = 512,
                     progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Choose a format per linear of `model` (see the module docstring).

    `progress`, if given, is called after each layer with its entry (plus ``"index"`` and
    ``"total"``): the search quantizes every layer up to ``len(candidates)`` times.
    """
    from ..passes.quantize import _resolve  # the pass's activation-format and rotation rule
    from .algorithms import quantize_layer

    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1:
        raise ValueError(f"q3n search_precision: budget {budget!r} is not a relative error in "
                         "(0, 1). Fix: give e.g. 0.02 (each layer's output within 2% of high "
                         "precision, relative L2 norm, on the calibration inputs)")
    settings = parse_quant_config({"calibration": calibration or {}}).calibration
    C.calibrate(model, batches, max_rows=max_rows)
    linears = [(path, module) for path, module in model.named_modules()
               if isinstance(module, nn.Linear)
               and (include_heads or classify_path(path) not in PROTECTED_CLASSES)]
    rules, layers = [], []
    before = after = 0
    for index, (path, module) in enumerate(linears):
        cls = classify_path(path)
        found = C.lookup_stats(module.weight)
        if found is None:
            if progress:
                progress({"layer": path, "class": cls, "format": "not reached",
                          "index": index, "total": len(linears)})
            continue  # not reached by the calibration batches
        stats = found[0]
        w, b = module.weight, module.bias
        k = w.shape[1]
        tried = []
        options, seen = [], set()
        for bits, act_bits, group, *act_group in candidates:
            if group > 0 and k % group:
                continue  # an explicit group must divide K
            entry = {"weight_bits": bits, "activation_bits": act_bits}
            if group:
                entry["group_size"] = group
            if act_group and act_group[0] != -1:
                # The rule names its activation groups (left out: per token, the default).
                entry["activation_group_size"] = act_group[0]
            fmt = parse_quant_config({"ffn_layers": entry}).classes["ffn"].for_k(k)
            entry["group_size"] = fmt.group_size  # the rule names the group it was measured with
            if fmt in seen:
                continue
            seen.add(fmt)
            options.append((_bytes_per_weight(bits, fmt.group_size, k, fmt.symmetric), entry, fmt))
        options.sort(key=lambda o: o[0])
        chosen = None
        for per_weight, entry, fmt in options:
            fmt = _resolve(fmt, k, w.device)
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
            layer = {"layer": path, "class": cls, "format": "high precision", "weight_bits": 16,
                     "rel_err": None, "bytes_before": size, "bytes_after": size, "tried": tried}
        else:
            entry, fmt, result = chosen
            rules.append({"match": path, **entry, **({"symmetric": fmt.symmetric})})
            packed = result.packed.nbytes + (0 if result.smooth is None
                                             else result.smooth.numel() * 4)
            after += packed
            layer = {"layer": path, "class": cls, "format": fmt.name,
                     "weight_bits": fmt.weight_bits, "rel_err": result.info.get("rel_err"),
                     "bytes_before": size, "bytes_after": packed, "tried": tried}
        layers.append(layer)
        if progress:
            progress({**layer, "index": index, "total": len(linears)})
    config = {"rules": rules, "calibration": dataclasses.asdict(settings)}
    parse_quant_config(config)  # what we return is valid by construction; check anyway
    return {"quant_config": config, "layers": layers, "budget": budget,
            "weight_bytes_before": before, "weight_bytes_after": after}


def format_table(result: dict) -> str:
    """The search's choice per layer: format, relative error on the calibration rows, bytes."""
    rows = [("layer", "class", "bits", "format", "rel err", "bytes before", "bytes after")]
    for e in result["layers"]:
        err = "-" if e.get("rel_err") is None else f"{e['rel_err']:.4f}"
        rows.append((e["layer"], e.get("class") or "-", str(e["weight_bits"]), e["format"], err,
                     f"{e['bytes_before']:,}", f"{e['bytes_after']:,}"))
    b, a = result["weight_bytes_before"], result["weight_bytes_after"]
    rows.append(("total", "", "", f"budget {result['budget']:g} per layer", "",
                 f"{b:,}", f"{a:,} ({a / b:.1%})" if b else f"{a:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        cells = [c.ljust(w) if j < 4 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0 or i == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
