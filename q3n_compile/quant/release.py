"""Releasing the high-precision weights of quantized linears: :func:`release_quantized_weights`.

After ``torch.compile(model, backend="q3n", options={"quant_config": ...})`` has run once, the
compiled graphs hold the packed weights, but the user's ``nn.Module`` still holds every original
weight (Dynamo passes them to each call as graph inputs), so memory goes *up* by the packed bytes.
``q3n_compile.release_quantized_weights(model)`` frees the storage of each weight that q3n
quantized and no compiled graph reads any more, keeping the ``nn.Parameter`` objects with their
shape, dtype, device and strides (Dynamo's guards look at those, so nothing recompiles): the
weight bytes drop to the packed bytes. It also drops the calibration statistics of those layers
(input Hessians, 4 K^2 bytes each, often larger than the weight).

What is guaranteed, and what is not:

- Released: a weight that q3n quantized in at least one compiled graph and that no graph the
  quantize pass has seen still reads in high precision (a weight tied to an embedding, a layer a
  rule kept, a linear another graph did not quantize are kept, and the return value says why).
- Recompiles (a new shape, a decode graph) keep working for the formats already computed: the
  quantize pass takes the packed weights it made before; the example-input calibration is
  skipped in graphs that read released weights. A compile that needs a released weight's values
  (another ``quant_config``, a layer this config keeps in high precision, ``verify=True``) cannot
  be served: the quantize pass reports the layer and the fix (reload the weights, compile again),
  and the call fails on the missing storage.
- The eager model can no longer run the released layers (PyTorch raises on the empty storage);
  ``model.load_state_dict(...)`` (or reloading the checkpoint) restores them; then compile again
  (``torch._dynamo.reset()``).
- Not detected: a function compiled without ``quant_config`` (or by another backend) that reads
  the same weights: it fails on the empty storage once they are released.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Any, Optional

import torch
from torch import nn

from . import calibration as C

_lock = threading.Lock()


@dataclasses.dataclass
class _Entry:
    ref: Any  # weakref to the weight as the compiler saw it
    layers: set
    results: dict  # (format, settings, bias key) -> LayerResult, the packed forms made for it
    read_by: set  # why a compiled graph still reads it in high precision ("" if never)
    released: bool = False


# weight key (the storage before release) -> entry
_QUANTIZED: dict[tuple, _Entry] = {}


def _entry(weight: torch.Tensor) -> _Entry:
    key = C.weight_key(weight)
    entry = _QUANTIZED.get(key)
    if entry is None or entry.ref() is None:
        entry = _Entry(weakref.ref(weight), set(), {}, set())
        _QUANTIZED[key] = entry
    return entry


def note_quantized(weight: torch.Tensor, layer: str, result_key: tuple, result: Any) -> None:
    """The quantize pass replaced `layer`'s use of `weight` by `result` (packed)."""
    with _lock:
        e = _entry(weight)
        e.layers.add(layer)
        e.results[result_key] = result


def note_read(weight: torch.Tensor, why: str) -> None:
    """A compiled graph reads `weight` in high precision (so it must not be released)."""
    with _lock:
        _entry(weight).read_by.add(why)


def is_released(weight: torch.Tensor) -> bool:
    return bool(getattr(weight, "_q3n_released_key", None))


def released_result(weight: torch.Tensor, result_key: tuple) -> Optional[Any]:
    """The packed form made for a released `weight` under `result_key`, or None."""
    with _lock:
        e = _QUANTIZED.get(C.weight_key(weight))
        return None if e is None else e.results.get(result_key)


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


@torch.no_grad()
def release_quantized_weights(model: nn.Module) -> dict[str, Any]:
    """Free the high-precision weights of `model` that q3n quantized (see the module docstring).

    Call it after the compiled model has run once (compilation happens on the first call).
    Returns ``{"released": [parameter names], "kept": {name: why}, "bytes_released": n}``.
    """
    released, kept = [], {}
    freed = 0
    seen: set[int] = set()
    sharing: dict[int, list] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if _storage_bytes(p):
            sharing.setdefault(p.untyped_storage().data_ptr(), []).append((name, p))
    with _lock:
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            key = C.weight_key(p)
            e = _QUANTIZED.get(key)
            if e is None or e.ref() is None or not e.layers:
                continue
            if e.released or is_released(p):
                continue
            if e.read_by:
                kept[name] = "a compiled graph still reads it: " + "; ".join(sorted(e.read_by))
                continue
            # Another parameter object viewing this storage (a tied weight the graphs may read
            # under its own name) would lose its values too: kept.
            others = [n for n, q in sharing.get(p.untyped_storage().data_ptr(), []) if q is not p]
            if others:
                kept[name] = f"its storage is shared with {', '.join(others)}"
                continue
            freed += _storage_bytes(p)
            # The key the caches know this weight by, before its storage (and data_ptr) goes.
            p._q3n_released_key = key
            ref = e.ref()
            if ref is not None and ref is not p:
                ref._q3n_released_key = key
            p.untyped_storage().resize_(0)
            e.released = True
            released.append(name)
    C.drop_stats([k for k, e in _QUANTIZED.items() if e.released])
    return {"released": released, "kept": kept, "bytes_released": int(freed)}


def prune() -> None:
    """Drop the records (and packed forms) of weights that no longer exist."""
    with _lock:
        for key in [k for k, e in _QUANTIZED.items() if e.ref() is None]:
            del _QUANTIZED[key]


def clear() -> None:
    with _lock:
        _QUANTIZED.clear()
