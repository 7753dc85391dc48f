"""Calibration statistics of linear layers' inputs, and the compile-time quantization cache.

Statistics per distinct linear input (q, k and v share one): the input Hessian ``sum x x^T``
(float32, ``K x K``), the row count, the per-channel maximum ``|x|`` and up to ``max_rows`` rows
spread over the calibration data (for error figures and the SmoothQuant search). Memory: ``4 K^2``
bytes per distinct input plus the rows — fine for the sizes q3n tests, large for a whole 8B model
(see the quantize pass's docs; layer-by-layer calibration is future work).

Where statistics come from, in the order the quantize pass looks:

1. :func:`calibrate` ``(model, batches)``: runs the eager model on the user's batches with forward
   hooks on every ``nn.Linear`` and attaches the statistics to each linear's weight tensor (by its
   storage, shape and version counter, so an in-place change of the weight detaches them);
2. the example inputs, when the compiler hands their real values to the pass
   (``PassContext.real_inputs``): the captured graph is run on them with an FX interpreter that
   records each linear's input (:func:`collect_graph_stats`);
3. none: the pass quantizes without data (round-to-nearest with a clipping search) and says so.

The cache (:func:`cache_get`/:func:`cache_put`) keeps each layer's quantization result keyed by
the weight (storage, shape, dtype, version counter), the layer format, the calibration settings
and a fingerprint of the statistics, so recompiling (new shapes, a second ``torch.compile``) does
not redo GPTQ. Entries die with their weight; :func:`clear` empties both stores.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

_lock = threading.Lock()


class LayerStats:
    """Running statistics of one linear input of width K."""

    def __init__(self, k: int, max_rows: int = 512):
        self.k = k
        self.max_rows = max_rows
        self.n = 0
        self.h: Optional[torch.Tensor] = None
        self.absmax: Optional[torch.Tensor] = None
        self._rows: list[torch.Tensor] = []
        self._kept = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, self.k).to(torch.float32)
        if x2.shape[0] == 0:
            return
        if self.h is None:
            self.h = torch.zeros(self.k, self.k, dtype=torch.float32, device=x2.device)
            self.absmax = torch.zeros(self.k, dtype=torch.float32, device=x2.device)
        self.h.addmm_(x2.t(), x2)
        self.absmax = torch.maximum(self.absmax, x2.abs().amax(dim=0))
        self.n += x2.shape[0]
        room = self.max_rows - self._kept
        if room > 0:
            stride = max(1, x2.shape[0] // room)
            take = x2[::stride][:room].clone()
            self._rows.append(take)
            self._kept += take.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.h / max(self.n, 1)

    def samples(self) -> torch.Tensor:
        return torch.cat(self._rows) if self._rows else torch.zeros(0, self.k)

    def fingerprint(self) -> str:
        if self.h is None:
            return "empty"
        parts = (self.n, float(self.h.sum()), float(self.h.diagonal().sum()),
                 float(self.absmax.sum()), float(self.samples().sum()))
        return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()


def weight_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
            str(t.dtype), str(t.device))


# weight key -> (weakref to the weight, version, stats, module path)
_STATS: dict[tuple, tuple[Any, int, LayerStats, str]] = {}


def _batches_call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], *, max_rows: int = 512,
              call: Optional[Callable[[nn.Module, Any], Any]] = None) -> dict[str, dict]:
    """Run `model` eagerly on `batches` and attach input statistics to every ``nn.Linear``.

    A batch is a tuple of positional arguments, a dict of keyword arguments, or one tensor (or
    `call(model, batch)` says how to run it). Compile the model afterwards: the quantize pass
    finds the statistics through the linears' weights. Returns ``{module path: {"rows": n,
    "in_features": K}}``.
    """
    stats_by_input: dict[int, LayerStats] = {}
    per_module: dict[str, LayerStats] = {}
    modules = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    handles = []

    def hook_for(name: str, module: nn.Linear):
        def hook(mod, args, kwargs=None):
            x = args[0] if args else (kwargs or {}).get("input")
            if not isinstance(x, torch.Tensor):
                return
            # Linears fed the same tensor (q, k, v) share one set of statistics.
            st = stats_by_input.get(id(x))
            if st is None or st.k != module.in_features:
                st = per_module.get(name)
                if st is None:
                    st = LayerStats(module.in_features, max_rows)
                st.add(x)
                stats_by_input[id(x)] = st
            per_module[name] = st
        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(hook_for(name, module)))
    try:
        for batch in batches:
            stats_by_input.clear()  # ids are only meaningful within one forward
            (call or _batches_call)(model, batch)
    finally:
        for h in handles:
            h.remove()
    with _lock:
        for name, st in per_module.items():
            w = modules[name].weight
            _STATS[weight_key(w)] = (weakref.ref(w), w._version, st, name)
        _prune_locked()
    return {name: {"rows": st.n, "in_features": st.k} for name, st in per_module.items()}


def lookup_stats(weight: torch.Tensor) -> Optional[tuple[LayerStats, str]]:
    """(stats, module path) that :func:`calibrate` attached to `weight`, if still valid."""
    with _lock:
        entry = _STATS.get(weight_key(weight))
        if entry is None:
            return None
        ref, version, st, name = entry
        if ref() is None or weight._version != version:
            del _STATS[weight_key(weight)]
            return None
        return st, name


class _Collector(torch.fx.Interpreter):
    def __init__(self, gm, watch: dict):
        super().__init__(gm, garbage_collect_values=True)
        self.watch = watch

    def run_node(self, n):
        out = super().run_node(n)
        st = self.watch.get(n)
        if st is not None and isinstance(out, torch.Tensor):
            st.add(out)
        return out


@torch.no_grad()
def collect_graph_stats(gm: torch.fx.GraphModule, inputs_nodes: Iterable[torch.fx.Node],
                        inputs: list, max_rows: int = 512) -> dict[torch.fx.Node, LayerStats]:
    """Run `gm` on real `inputs`; statistics of the values of `inputs_nodes` (linear inputs)."""
    watch: dict[torch.fx.Node, LayerStats] = {}
    for node in inputs_nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and node not in watch:
            watch[node] = LayerStats(int(val.shape[-1]), max_rows)
    _Collector(gm, watch).run(*inputs)
    return watch


# ---------------------------------------------------------------------------------------------
# Cache of quantization results
# ---------------------------------------------------------------------------------------------

_CACHE: dict[tuple, tuple[Any, Any]] = {}
_counts = {"hits": 0, "misses": 0}
MAX_CACHE_ENTRIES = 4096


def cache_key(weight: torch.Tensor, *parts: Any) -> tuple:
    return (weight_key(weight), weight._version) + tuple(parts)


def cache_get(key: tuple) -> Any:
    with _lock:
        entry = _CACHE.get(key)
        if entry is None or entry[0]() is None:
            _counts["misses"] += 1
            return None
        _counts["hits"] += 1
        return entry[1]


def cache_put(key: tuple, weight: torch.Tensor, value: Any) -> None:
    with _lock:
        _CACHE[key] = (weakref.ref(weight), value)
        _prune_locked()


def _prune_locked() -> None:
    for k in [k for k, (ref, *_rest) in _CACHE.items() if ref() is None]:
        del _CACHE[k]
    for k in [k for k, (ref, *_rest) in _STATS.items() if ref() is None]:
        del _STATS[k]
    while len(_CACHE) > MAX_CACHE_ENTRIES:
        del _CACHE[next(iter(_CACHE))]


def cache_info() -> dict[str, int]:
    with _lock:
        return {"entries": len(_CACHE), **_counts}


def clear() -> None:
    """Forget every calibration statistic and cached quantization result."""
    with _lock:
        _CACHE.clear()
        _STATS.clear()
        _counts.update(hits=0, misses=0)
