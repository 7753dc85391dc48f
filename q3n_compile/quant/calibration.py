"""Calibration statistics of linear layers' inputs, and the compile-time quantization cache.

Statistics per distinct linear input (q, k and v share one): the input Hessian ``sum x x^T``
(float32, ``K x K``), the row count, the per-channel maximum ``|x|`` and up to ``max_rows`` rows
spread over the calibration data (for error figures and the smoothing search). Memory: ``4 K^2``
bytes per distinct input plus the rows — fine for the sizes q3n tests, large for a whole 8B model
(see the quantize pass's docs; layer-by-layer calibration is future work).

Where statistics come from, in the order the quantize pass looks:

1. :func:`calibrate` ``(model, batches)``: runs the eager model on the user's batches with forward
   hooks on every ``nn.Linear`` and attaches the statistics to each linear's weight tensor (by its
   storage, shape and version counter, so an in-place change of the weight detaches them);
2. the example inputs: the backend keeps the first call's real inputs until the graph is compiled
   when the ``quant_config`` quantizes something (``calibration.example_inputs``, default true);
   the pass runs the graph on them with an FX interpreter that records each linear's input
   (:func:`collect_graph_stats`; inputs the graph writes in place, a KV cache, are given as
   copies, so the user's tensors are not touched). Those statistics are then attached to the
   weights as :func:`calibrate` attaches its own (:func:`attach_stats`), so every later compile of
   the same weights (a new shape, a decode graph after a prefill graph) quantizes them the same way,
   from the cache, instead of calibrating again on its own inputs. A layer whose example input has
   fewer than :data:`MIN_EXAMPLE_ROWS` rows (a single decode token) is not calibrated on it: GPTQ
   fitted to a handful of rows generalises worse than rounding to nearest;
3. none: the pass quantizes without data (round-to-nearest with a clipping search) and says so.

Example inputs are one batch the user did not choose for calibration: good enough to beat
round-to-nearest, no substitute for :func:`calibrate` on representative data.

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

from ..passes.matching import written_placeholders

_lock = threading.Lock()


# Fewer rows than this in a layer's example input: no calibration from it (see the docstring).
MIN_EXAMPLE_ROWS = 32


class LayerStats:
    """Running statistics of one linear input of width K; `source` says where the rows came from."""

    def __init__(self, k: int, max_rows: int = 512, source: str = "calibrate()"):
        self.k = k
        self.max_rows = max_rows
        self.source = source
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
        else:
            x2 = x2.to(self.h.device)  # statistics parked on the host (park()) keep growing there
        self.h.addmm_(x2.t(), x2)
        self.absmax = torch.maximum(self.absmax, x2.abs().amax(dim=0))
        self.n += x2.shape[0]
        room = self.max_rows - self._kept
        if room > 0:
            stride = max(1, x2.shape[0] // room)
            take = x2[::stride][:room].clone()
            self._rows.append(take)
            self._kept += take.shape[0]

    def park(self) -> "LayerStats":
        """Move the statistics to host memory. Attached statistics wait there for the next
        compile: a Hessian is 4 K^2 bytes (600 MB for K = 12288), about 3.2 GB for qwen3 "bench"
        with the design's config by that count; on an H200 that run's peak stood 4.5 GB above
        q3n's without quantization, and the excess carried into every later peak. Users of the statistics move them to the weight's device while they
        quantize one layer."""
        if self.h is not None:
            self.h = self.h.cpu()
            self.absmax = self.absmax.cpu()
        self._rows = [r.cpu() for r in self._rows]
        return self

    def hessian(self) -> torch.Tensor:
        return self.h / max(self.n, 1)

    def samples(self) -> torch.Tensor:
        return torch.cat(self._rows) if self._rows else torch.zeros(0, self.k)

    def rotated(self, b: int) -> "LayerStats":
        """The statistics of the rows ``x R`` (:func:`q3n_compile.kernels.hadamard.rotate_rows`):
        the Hessian ``R^T H R`` exactly, the kept rows rotated, the per-channel maxima those
        rows' (the maxima of every row are not recoverable from the unrotated ones: a lower
        bound where rows were dropped). On the Hessian's device."""
        from ..kernels.hadamard import rotate_hessian, rotate_rows
        out = LayerStats(self.k, self.max_rows, source=self.source)
        out.n = self.n
        if self.h is None:
            return out
        out.h = rotate_hessian(self.h, b)
        rows = [rotate_rows(r.to(self.h.device), b).to(torch.float32) for r in self._rows]
        out._rows = rows
        out._kept = self._kept
        kept = torch.cat(rows) if rows else torch.zeros(0, self.k, device=self.h.device)
        out.absmax = (kept.abs().amax(dim=0) if kept.shape[0] else
                      torch.zeros(self.k, dtype=torch.float32, device=self.h.device))
        return out

    def fingerprint(self) -> str:
        if self.h is None:
            return "empty"
        parts = (self.n, float(self.h.sum()), float(self.h.diagonal().sum()),
                 float(self.absmax.sum()), float(self.samples().sum()))
        return hashlib.blake2b(repr(parts).encode(), digest_size=8).hexdigest()


def weight_key(t: torch.Tensor) -> tuple:
    """A weight's identity for the caches: its storage and view. A weight whose storage
    :func:`~q3n_compile.quant.release_quantized_weights` freed keeps the key it had before."""
    released = getattr(t, "_q3n_released_key", None)
    if released is not None:
        return released
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
    # id(input) -> (weak reference to the input, its statistics). The weak reference is checked:
    # an id is only an address, and once a forward frees a linear's input (q/k/v's normed hidden
    # state) a later tensor (the attention output fed to o_proj) can be allocated at the same
    # address. Matching on the id alone made o_proj or lm_head share q/k/v's statistics at random,
    # depending on the allocator: the run-to-run variation of qwen3's calibrated error.
    stats_by_input: dict[int, tuple[Any, LayerStats]] = {}
    per_module: dict[str, LayerStats] = {}
    modules = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    handles = []

    def hook_for(name: str, module: nn.Linear):
        def hook(mod, args, kwargs=None):
            x = args[0] if args else (kwargs or {}).get("input")
            if not isinstance(x, torch.Tensor):
                return
            # Linears fed the same tensor (q, k, v) share one set of statistics (one Hessian).
            seen = stats_by_input.get(id(x))
            st = seen[1] if seen is not None and seen[0]() is x else None
            if st is None or st.k != module.in_features:
                st = per_module.get(name)
                if st is None:
                    st = LayerStats(module.in_features, max_rows)
                st.add(x)
                stats_by_input[id(x)] = (weakref.ref(x), st)
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
    for name, st in per_module.items():
        attach_stats(modules[name].weight, st, name)
    return {name: {"rows": st.n, "in_features": st.k} for name, st in per_module.items()}


def attach_stats(weight: torch.Tensor, stats: LayerStats, name: str) -> None:
    """Attach `stats` to `weight` (replacing earlier ones) until the weight changes or dies.
    The statistics are parked in host memory (:meth:`LayerStats.park`)."""
    stats.park()
    with _lock:
        _STATS[weight_key(weight)] = (weakref.ref(weight), weight._version, stats, name)
        _prune_locked()


def drop_stats(keys: Iterable[tuple]) -> None:
    """Forget the statistics attached to the weights with these keys (their Hessians' memory)."""
    with _lock:
        for key in keys:
            _STATS.pop(key, None)


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
    """Run `gm` on real `inputs`; statistics of the values of `inputs_nodes` (linear inputs).

    Inputs the graph writes in place are passed as copies: calibrating must not change them.
    """
    watch: dict[torch.fx.Node, LayerStats] = {}
    for node in inputs_nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and node not in watch:
            watch[node] = LayerStats(int(val.shape[-1]), max_rows, source="example inputs")
    written = written_placeholders(gm)
    args = [a.clone() if i in written and isinstance(a, torch.Tensor) else a
            for i, a in enumerate(inputs)]
    _Collector(gm, watch).run(*args)
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


def prune() -> None:
    """Drop the statistics and cached results of weights that no longer exist (a deleted model's):
    entries are otherwise dropped lazily, when the next entry is added."""
    with _lock:
        _prune_locked()


def cache_info() -> dict[str, int]:
    with _lock:
        return {"entries": len(_CACHE), **_counts}


def clear() -> None:
    """Forget every calibration statistic and cached quantization result."""
    with _lock:
        _CACHE.clear()
        _STATS.clear()
        _counts.update(hits=0, misses=0)
