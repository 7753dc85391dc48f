"""The `quantize` pass: linears -> ``q3n::qlinear`` at the precision each layer was given.

Candidates (``matched``): every linear of the post-AOT graph whose weight is a compile-time
constant — ``mm(x, t(W))`` and ``addmm(b, x, t(W))`` with ``W`` a parameter/buffer —, the linears
the norm_linear pass folded a norm into and left to this pass (``meta["q3n_norm_quant"]``: see
"Composed with norm_linear" below), and the linears inside each ``q3n::norm_linear`` (those
``quant_config`` leaves alone: counted and reported as the unfused ones would be).

For each linear:

1. **Class** (:mod:`q3n_compile.quant.classify`): attention projection, feed-forward, output head,
   router — by module path, else by graph structure; the report says which.
2. **Format** (:mod:`q3n_compile.quant.config`): the first rule matching the module path, else
   the class entry (``ffn_layers`` / ``attn_layers``); heads and routers only by a rule that names
   them. 8-bit activations with ``activation_format: "auto"`` become fp8 e4m3 when the weight is
   on a GPU with fp8 tensor cores (sm_89+) and the weight codes fit e4m3 (<= 4 bits), int8
   otherwise. ``activation_group_size`` (per token unless set; 32/64/128 channels) becomes the
   ops' trailing ``act_group_size`` argument, given only where it is not per token; the report's
   entry carries it (``activation_group_size``, and ``act-g<size>`` in ``format``). A
   ``rotation`` (32, 64 or 128; left out, 32 for int8 activations where K allows, by
   :meth:`LayerFormat.resolved`) becomes q3n::qlinear's ``rotation`` argument after it (both
   then given):
   the weight is quantized as ``W R`` from the statistics of ``x R`` and the op quantizes
   ``x R`` (:mod:`q3n_compile.kernels.hadamard`); after a folded norm ``q3n::norm_act_quant``
   takes the same trailing arguments and quantizes ``x_hat R``.
3. **Checks**: a format the layer cannot take (a group size or rotation that does not divide K,
   an input dtype the kernel does not take) raises :class:`QuantizeConfigError` naming the layer and
   the fix under ``strict=True``; otherwise the layer stays in high precision and
   ``detail["kept_high_precision"]`` says why.
4. **Quantization** (:mod:`q3n_compile.quant.algorithms`), once per (weight, format, calibration)
   and cached across compiles: GPTQ from the layer's input Hessian (act-order, damping from the
   rows per input channel, kept only where it beats RTN+clip on held-out calibration rows), a
   smoothing vector for 8-bit activations, clipping search — when calibration data exist:
   statistics attached by :func:`q3n_compile.quant.calibrate`, else the example inputs of the
   first compile that reaches the layer (the backend keeps their real values until the graph is
   compiled; the
   graph is run on them once, on copies of the inputs it writes, and the statistics are attached to
   the weights, so later compiles — other shapes, a decode graph — reuse them and the cached
   result; layers whose example input has fewer than ``MIN_EXAMPLE_ROWS`` rows are not
   calibrated on it). Without either, weights are rounded to nearest with a data-free clipping
   search, and the report says so. Each layer's entry gives the seconds its quantization took at
   this compile (0 when cached); the ``progress`` option prints a line per layer on stderr
   (by default once the pass has run 5 s: :mod:`q3n_compile.progress`).
5. **Rewrite**: the packed weight, scales, zero points and smoothing vector become buffers of the
   GraphModule read by ``get_attr``; the linear becomes ``q3n::qlinear`` (bias passed through);
   the weight's placeholder is frozen (``ctx.freeze``): changing it later raises
   ``FrozenWeightChanged``.
6. **Siblings** (``quant_config["merge_siblings"]``, default true): rewritten linears on one
   input with one format and smoothing vector (q/k/v, gate/up) become one call on their
   concatenated packed weights, each output a slice (:mod:`.qlinear_siblings`);
   ``detail["siblings"]`` lists the groups and those left apart with why. Calibrated 8-bit
   siblings would each choose a smoothing vector: before step 4 a group's choice is made once
   (:func:`q3n_compile.quant.algorithms.choose_shared_smoothing`, cached) and taken by the
   members whose calibration error it raises by at most ``share_smoothing_within``
   (``"shared_smoothing"``: by all), so those merge too; each member's verdict is in its layer
   entry (``shared_smoothing``).

Memory: the compiled graph holds the packed weights; the high-precision weights stay in the
user's ``nn.Module`` (Dynamo passes them to every call) until
:func:`q3n_compile.release_quantized_weights` frees those that no compiled graph reads any more
(see :mod:`q3n_compile.quant.release`). ``detail`` reports ``weight_bytes_before`` (the quantized
layers' high-precision weights) and ``weight_bytes_after`` (their packed form: codes, scales, zero
points, smoothing vectors).

Composed with norm_linear (``norm_fusion=True``; norm_linear runs first and decides nothing
about formats). For a norm followed by linears ``quant_config`` quantizes, norm_linear folds γ/β
into them (W' = W·diag(γ), b' = W·β + b) and emits ``x_hat = q3n::normalize(x)`` followed by float
linears on W'. Here:

- each such linear is quantized like any other (class, format, checks, strict errors, the
  report's entry, which adds ``norm_fused``); its weight is W' (so γ is inside the quantized
  weight) and its calibration data are rows of x_hat, the input it really receives: the graph's
  x_hat on the example inputs, or :func:`q3n_compile.quant.calibrate`'s statistics (taken at the
  unfused linear's input h = γ·x_hat + β) mapped to x_hat (:func:`_normalised_stats`: exact
  without β; with β, from the kept rows). Results are cached and statistics attached under the
  source weight W and a digest of the fold, so recompiles reuse them;
- 16-bit activations: ``q3n::qlinear`` reads x_hat (one normalise pass over x, shared by the
  siblings);
- quantized activations: ``q3n::norm_act_quant(x)`` computes the statistics, x_hat and its
  codes (per token, or per token and channel group) in one pass over x (x_hat is never written)
  and ``q3n::qlinear_codes`` runs the qlinear kernels on them. Siblings whose activations are
  quantized alike (same format and activation groups, no SmoothQuant vector) share one call;
  a layer with its own SmoothQuant vector has its own codes, so its own call (each still one
  pass over x, where the unfused model quantized x_hat per layer anyway).
  ``detail["norm_fused"]`` counts the layers, the calls, and the ``normalize`` nodes left;
- the W'/b' buffers norm_linear made for the layers quantized here are dropped; the source W is
  not freed by :func:`q3n_compile.release_quantized_weights` (the fold is redone from it on every
  compile: its return value says so).

A linear kept in high precision here stays exact (``normalize`` and the float linear on W').
"""

from __future__ import annotations

import dataclasses
import operator
import time
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from ..kernels import norm_linear as _NL  # noqa: F401 - registers q3n::normalize
from ..kernels import packing as P
from ..kernels import qlinear as QL
from ..progress import Progress
from ..quant import calibration as C
from ..quant import release as R
from ..quant.classify import StructureClassifier, _q3n_op, classify, module_path
from ..quant.config import SHARED_SMOOTHING, LayerFormat, QuantConfig, parse_quant_config
from . import qlinear_siblings as SIB
from .base import PassContext, PassStats
from .matching import add_node, fake_mode_for

aten = torch.ops.aten
# No longer given (the passes compose, see the module docstring); kept for code that imports it.
NORM_LINEAR_REASON = "fused into norm_linear: quantizing fused linears is not built yet"
# A linear norm_linear fused (q3n::norm_linear) although quant_config gives it a format: only when
# norm_linear could not consult quant_config (its detail["quantize_check"] says why).
FUSED_UNQUANTIZED_REASON = ("fused into q3n::norm_linear unquantized (norm_linear could not "
                            "consult quant_config: see its detail['quantize_check'])")


class QuantizeConfigError(ValueError):
    """A layer cannot take the format quant_config gave it (strict=True); says which and how to fix."""


@dataclasses.dataclass
class Candidate:
    node: Node
    x: Node
    weight_ph: Optional[Node]  # None for a folded linear (its weight is a get_attr buffer)
    bias: Optional[Node]
    path: str
    layer_class: Optional[str] = None
    classified_by: str = "none"
    folded: Optional[dict] = None  # node.meta["q3n_norm_quant"] of a linear norm_linear folded


def _weight(gm: GraphModule, ctx: PassContext, cand: Candidate) -> torch.Tensor:
    """The weight the layer multiplies by: the parameter, or W' = W·diag(γ) for a folded one."""
    if cand.folded is not None:
        return getattr(gm, cand.folded["weight"])
    return ctx.static_values[cand.weight_ph.name]


def _source(gm: GraphModule, ctx: PassContext, cand: Candidate) -> torch.Tensor:
    """The tensor the caches, calibration statistics and release records are keyed on: the
    user's weight (for a folded layer, the W that W' was folded from)."""
    if cand.folded is not None:
        return ctx.static_values[cand.folded["source_weight"]]
    return ctx.static_values[cand.weight_ph.name]


def _normalise_source(x: Node) -> Optional[Node]:
    """The ``q3n::normalize`` node a folded linear's input comes from (through a view)."""
    while isinstance(x, Node) and x.op == "call_function" and x.target in (
            aten.view.default, aten._unsafe_view.default, aten.reshape.default):
        x = x.args[0]
    if isinstance(x, Node) and x.op == "call_function" and x.target is getattr(
            torch.ops.q3n, "normalize").default:
        return x
    return None


def _normalised_stats(st: "C.LayerStats", folded: dict) -> Optional["C.LayerStats"]:
    """Statistics of x_hat from those of h = γ·x_hat + β (what calibrate() recorded at the
    linear's input in the unfused model), or None if γ has a zero.

    Without β the map is exact: H' = H / (γ γ^T), max|x_hat| = max|h| / |γ|, the kept rows
    divided by γ, the same row count. With β the Hessian needs the inputs' mean, which is not
    recorded: the statistics are rebuilt from the kept rows alone, (rows - β) / γ (exact for
    those rows; ``calibration_rows`` then counts them).
    """
    gamma, beta = folded["gamma"], folded["beta"]
    rows = st.samples()
    if st.n == 0 or st.h is None or rows.shape[0] == 0:
        return None
    dev = st.h.device
    g = (torch.ones(st.k, dtype=torch.float64, device=dev) if gamma is None
         else gamma.to(dev, torch.float64))
    if bool((g == 0).any()):
        return None
    b = None if beta is None or not bool(beta.any()) else beta.to(dev, torch.float64)
    out = C.LayerStats(st.k, st.max_rows, source=st.source)
    xr = rows.to(dev, torch.float64)
    out.add(((xr if b is None else xr - b) / g).to(torch.float32))
    if b is None:
        out.h = (st.h.to(torch.float64) / (g[:, None] * g[None, :])).to(torch.float32)
        out.absmax = (st.absmax.to(torch.float64) / g.abs()).to(torch.float32)
        out.n = st.n
    return out


def _weight_placeholder(wt: Any) -> Optional[Node]:
    """W from ``t(W)`` / ``permute(W, [1, 0])`` / ``transpose(W, 0, 1)`` with W a placeholder."""
    if not isinstance(wt, Node) or wt.op != "call_function":
        return None
    if wt.target is aten.t.default:
        src = wt.args[0]
    elif wt.target is aten.permute.default and list(wt.args[1]) == [1, 0]:
        src = wt.args[0]
    elif wt.target is aten.transpose.int and sorted(a % 2 for a in wt.args[1:3]) == [0, 1]:
        src = wt.args[0]
    else:
        return None
    return src if isinstance(src, Node) and src.op == "placeholder" else None


def _linear_parts(node: Node) -> Optional[tuple[Node, Node, Optional[Node]]]:
    """(x, W placeholder, bias) of a linear ``mm``/``addmm`` node, else None."""
    if node.op != "call_function":
        return None
    if node.target is aten.mm.default:
        x, wt = node.args[:2]
        bias = None
    elif node.target is aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) > 3:
            return None
        bias, x, wt = node.args[:3]
        bv = bias.meta.get("val") if isinstance(bias, Node) else None
        if not isinstance(bv, torch.Tensor) or bv.dim() != 1:
            return None
    else:
        return None
    w = _weight_placeholder(wt)
    if w is None or not isinstance(x, Node):
        return None
    return x, w, bias


def _resolve(fmt: LayerFormat, k: int, device: torch.device) -> LayerFormat:
    """`fmt` for a layer of in_features `k` on `device` (:meth:`LayerFormat.resolved`): "auto"
    8-bit activations are fp8 where the GPU has fp8 tensor cores and the weight's codes fit e4m3."""
    fp8 = QL.fp8_supported(device) and QL._codes_fit_fp8(fmt.weight_bits, fmt.symmetric)
    return fmt.resolved(k, fp8)


def _problem(fmt: LayerFormat, x_val: torch.Tensor, k: int) -> Optional[tuple[str, str]]:
    """(problem, fix) if the layer cannot take `fmt`, else None."""
    if fmt.group_size != -1 and k % fmt.group_size:
        divisors = [g for g in (32, 64, 128) if k % g == 0]
        fix = (f"use group_size {' or '.join(map(str, divisors))}, or -1 for per-channel scales"
               if divisors else "use group_size -1 (per-channel scales)")
        return f"group_size {fmt.group_size} does not divide in_features {k}", fix
    if fmt.rotation and k % fmt.rotation:
        return (f"rotation {fmt.rotation} needs in_features a multiple of {fmt.rotation}, "
                f"got {k}", "drop 'rotation' for this layer (a rule matching it)")
    if x_val.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return (f"input dtype {str(x_val.dtype).replace('torch.', '')} is not supported",
                "run the model in float16, bfloat16 or float32")
    reason = QL.format_supported(fmt.weight_bits, fmt.group_size, fmt.symmetric,
                                 "none" if fmt.activation_bits == 16 else fmt.activation_format,
                                 fmt.activation_group_size)
    if reason:
        return reason, "choose a supported format (see quant_config's documentation)"
    return None


def _real_inputs(ctx: PassContext) -> Optional[list]:
    inputs = getattr(ctx, "real_inputs", None)
    return list(inputs) if inputs else None


def _register(gm: GraphModule, fake_mode, name: str, value: torch.Tensor, before: Node) -> Node:
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
    return node


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None else float(f"{x:.5g}")


def run(gm: GraphModule, ctx: PassContext) -> PassStats:
    stats = PassStats()
    qc: QuantConfig = parse_quant_config(ctx.config.quant_config or {})
    fake_mode = fake_mode_for(gm, ctx)
    structure = StructureClassifier(gm)
    kept: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []

    def keep(path: str, cls: Optional[str], reason: str, category: Optional[str] = None) -> None:
        stats.decline(category or reason)
        kept.append({"layer": path, "class": cls, "reason": reason})

    # 1. Candidates and their classes (read-only: the whole graph as captured).
    candidates: list[Candidate] = []
    for node in list(gm.graph.nodes):
        if _q3n_op(node, "norm_linear"):
            # Linears norm_linear fused unquantized: quant_config leaves them alone; reported as
            # the unfused linears would be.
            for layer in (node.meta.get("q3n_norm_linear") or {}).get("layers", []):
                fmt, decided_by = qc.resolve(layer["layer"], layer["class"])
                if fmt is None:
                    keep(layer["layer"], layer["class"], decided_by, category=_category(decided_by))
                else:
                    keep(layer["layer"], layer["class"], FUSED_UNQUANTIZED_REASON)
            continue
        folded = node.meta.get("q3n_norm_quant") if node.op == "call_function" and node.target in (
            aten.mm.default, aten.addmm.default) else None
        if folded is not None:
            x, bias = (node.args[0], None) if node.target is aten.mm.default else node.args[1::-1]
            candidates.append(Candidate(node, x, None, bias, folded["layer"], folded["class"],
                                        folded["classified_by"], folded))
            continue
        parts = _linear_parts(node)
        if parts is None:
            continue
        x, w_ph, bias = parts
        path = module_path(node)
        if w_ph.name not in ctx.static_values:
            keep(path or f"<{node.name}>", None,
                 "weight is a graph input, not a parameter (not a compile-time constant)")
            continue
        cls, how, _ = classify(node, x, structure)
        candidates.append(Candidate(node, x, w_ph, bias, path or f"<{node.name}>", cls, how))

    # 2. Formats and checks.
    todo: list[tuple[Candidate, LayerFormat, str]] = []
    for cand in candidates:
        fmt, decided_by = qc.resolve(cand.path, cand.layer_class)
        if fmt is None:
            keep(cand.path, cand.layer_class, decided_by,
                 category=_category(decided_by))
            continue
        weight = _weight(gm, ctx, cand)
        k = int(weight.shape[1])
        fmt = _resolve(fmt, k, weight.device)
        problem = _problem(fmt, cand.x.meta["val"], k)
        if problem is not None:
            what, fix = problem
            msg = (f"layer {cand.path!r} ({cand.layer_class or 'unclassified'}, "
                   f"{weight.shape[0]}x{k}, format {fmt.name} from {decided_by}): {what}. Fix: {fix}")
            if ctx.config.strict:
                raise QuantizeConfigError(f"q3n quantize: {msg}")
            keep(cand.path, cand.layer_class, f"cannot be honoured, kept in high precision: {msg}",
                 category="format cannot be honoured (see kept_high_precision)")
            continue
        todo.append((cand, fmt, decided_by))

    # 3. Calibration statistics: calibrate()'s, or those an earlier compile took from its example
    # inputs (both attached to the weight), else this compile's example inputs.
    settings = qc.calibration
    layer_stats: dict[Node, tuple[Any, str]] = {}
    need_graph: list[Candidate] = []
    mapped: dict[tuple, Any] = {}  # (id of calibrate()'s statistics, fold) -> x_hat statistics
    for cand, fmt, _ in todo:
        found = C.lookup_stats(_source(gm, ctx, cand))
        st = None if found is None else found[0]
        # Statistics of a folded layer's x_hat carry the fold they were taken under.
        of_fold = getattr(st, "q3n_normalised", None)
        if st is not None and cand.folded is not None:
            if of_fold is None:  # siblings (q/k/v) share one mapping, as they share st
                mkey = (id(st), cand.folded["fold"])
                if mkey not in mapped:
                    mapped[mkey] = _normalised_stats(st, cand.folded)
                st = mapped[mkey]
            elif of_fold != cand.folded["fold"]:
                st = None
        elif of_fold is not None:
            st = None  # x_hat statistics of a fused compile: not this linear's input
        if st is not None:
            layer_stats[cand.node] = (st, st.source)
        else:
            need_graph.append(cand)
    real = _real_inputs(ctx)
    too_few: dict[str, int] = {}
    example_note = None
    released = any(R.is_released(t) for t in ctx.static_values.values())
    if need_graph and not settings.example_inputs:
        example_note = "calibration.example_inputs is false"
    elif need_graph and released:
        # The graph cannot run: it still reads weights whose storage was freed.
        example_note = "the graph reads weights freed by release_quantized_weights()"
    elif need_graph and real is None:
        example_note = "the example inputs' real values were not available to this compile"
    elif need_graph:
        try:
            collected = C.collect_graph_stats(gm, [c.x for c in need_graph], real,
                                              settings.max_rows)
        except Exception as err:  # noqa: BLE001 - calibration is optional; quantizing goes on
            collected = {}
            example_note = (f"running the graph on the example inputs failed "
                            f"({type(err).__name__}: {err})")
        for cand in need_graph:
            st = collected.get(cand.x)
            if st is None or st.n < C.MIN_EXAMPLE_ROWS:
                too_few[cand.path] = 0 if st is None else int(st.n)
                continue
            layer_stats[cand.node] = (st, "example inputs")
            # Attached to the weight: later compiles (other shapes, a decode graph) find these
            # statistics and the cached result, so every graph uses the same quantized weight.
            if cand.folded is not None:
                st.q3n_normalised = cand.folded["fold"]  # rows of x_hat, under this fold
            C.attach_stats(_source(gm, ctx, cand), st, cand.path)
        if too_few and example_note is None:
            example_note = (f"{len(too_few)} layer(s) saw fewer than {C.MIN_EXAMPLE_ROWS} rows in "
                            "the example inputs (too few to calibrate on)")

    # 3b. One smoothing choice per sibling group (siblings with 8-bit activations would each
    # choose their own vector and stay apart): offered to each member (merge_siblings true:
    # adopted within calibration.share_smoothing_within of its own choice's error) or imposed
    # ("shared_smoothing").
    shared = (_shared_smoothing(gm, ctx, todo, layer_stats, settings,
                                None if qc.merge_siblings == SHARED_SMOOTHING
                                else settings.share_smoothing_within)
              if qc.merge_siblings else {})

    # 4. Quantize (cached) and rewrite.
    packed_nodes: dict[tuple, tuple[Node, ...]] = {}
    bytes_before = bytes_after = 0
    sources: dict[str, int] = {}
    hits = misses = 0
    norm_groups: dict[tuple, tuple[Node, Node]] = {}
    folded_done: list[dict] = []
    members: list[SIB.Member] = []
    progress = Progress("quantize", len(todo), ctx.config.progress)
    for index, (cand, fmt, decided_by) in enumerate(todo):
        weight = _weight(gm, ctx, cand)
        source_weight = _source(gm, ctx, cand)
        bias_val = _bias_value(gm, ctx, cand)
        st, source = layer_stats.get(cand.node, (None, "none"))
        if cand.folded is None:
            bias_key = None if bias_val is None else C.weight_key(bias_val)
        else:
            # W' and b' are made anew by every compile: key on what they are folded from.
            src_bias = cand.folded["source_bias"]
            bias_key = ("norm_fold", cand.folded["fold"],
                        None if src_bias is None else C.weight_key(ctx.static_values[src_bias]))
        share, offer = shared.get(cand.node, (None, None))
        share_key = () if share is None else (("shared-smoothing", share[1]),)
        result_key = (fmt, settings, bias_key) + share_key
        # The same layer's result under this merge_siblings setting, whatever its group chose:
        # release drops the statistics the group's choice is made from, so a later compile of a
        # released weight finds its result by this key.
        mode_key = (fmt, settings, bias_key, ("merge_siblings", qc.merge_siblings))
        key = C.cache_key(source_weight, fmt, settings, st.fingerprint() if st else None, bias_key,
                          *share_key)
        result = None if R.is_released(weight) else C.cache_get(key)
        if R.is_released(weight):
            # Freed by release_quantized_weights(): only what was packed before can be used.
            result = R.released_result(weight, mode_key) or R.released_result(weight, result_key)
            source = "released weight: packed before"
            if result is None:
                raise QuantizeConfigError(
                    f"q3n quantize: layer {cand.path!r}: its weight was freed by "
                    f"release_quantized_weights() and was never quantized as {fmt.name} with "
                    "these calibration settings. Fix: reload the weights (model.load_state_dict) "
                    "and compile again (torch._dynamo.reset()), or use the quant_config the "
                    "weights were released under")
        sources[source] = sources.get(source, 0) + 1
        cached = result is not None
        if cached:
            hits += 1
        seconds = 0.0
        if not cached:
            from ..quant.algorithms import quantize_layer

            misses += 1
            started = time.perf_counter()
            result = quantize_layer(weight, bias_val, fmt, settings, st,
                                    **({} if share is None else {"shared_smoothing": share[0]}))
            seconds = time.perf_counter() - started
            C.cache_put(key, source_weight, result)
        progress.step(f"{cand.path} ({fmt.name}: " + (
            "cached" if cached else result.info.get("method") or "quantized") + ")")
        # A result an earlier compile merged with its siblings views the merged tensors: kept as
        # views here (the merge below finds their base again); copied only if left apart.
        pw = result.packed.to(weight.device)
        act = "none" if fmt.activation_bits == 16 else fmt.activation_format
        x_val = cand.x.meta["val"]
        smooth = result.smooth.to(weight.device) if result.smooth is not None else None
        act_group = fmt.activation_group_size
        # The ops' act_group_size argument, only where it is not the per-token default (so a
        # per-token graph is the one it always was).
        act_group_arg = () if act_group == QL.PER_TOKEN else (act_group,)
        # qlinear's rotation argument after it, likewise only where there is one.
        rot_args = (act_group, fmt.rotation) if fmt.rotation else act_group_arg
        reason = QL.supports(x_val, pw.qweight, pw.scales, pw.zeros,
                             cand.bias.meta["val"] if cand.bias is not None else None, smooth,
                             pw.bits, pw.group_size, pw.in_features, act, act_group, fmt.rotation)
        if reason is not None:
            msg = f"layer {cand.path!r}: q3n::qlinear does not take it: {reason}"
            if ctx.config.strict:
                raise QuantizeConfigError(f"q3n quantize: {msg}")
            keep(cand.path, cand.layer_class, msg, category="kernel does not support the call")
            continue

        pkey = (cand.folded["weight"] if cand.folded else cand.weight_ph.name, fmt, id(result))
        if pkey not in packed_nodes:
            prefix = f"_q3n_qlinear{index}"
            tensors = {"qweight": pw.qweight, "scales": pw.scales, "zeros": pw.zeros, "smooth": smooth}
            packed_nodes[pkey] = tuple(
                None if t is None else _register(gm, fake_mode, f"{prefix}_{name}", t, cand.node)
                for name, t in tensors.items())
            bytes_after += pw.nbytes + (smooth.numel() * 4 if smooth is not None else 0)
            bytes_before += weight.numel() * weight.element_size()
        qw_n, s_n, z_n, sm_n = packed_nodes[pkey]
        norm_src = _normalise_source(cand.x) if cand.folded is not None else None
        fused_act = None
        if norm_src is not None and act != "none":
            nx, eps, kind = norm_src.args[0], norm_src.args[1], norm_src.args[2]
            if QL.supports_norm_act_quant(nx.meta["val"], eps, kind, act, smooth,
                                          act_group, fmt.rotation) is None:
                # One pass over x for the statistics and the codes, shared by the siblings that
                # quantize x_hat alike (same format, activation groups, rotation and smoothing
                # vector).
                gkey = (norm_src, act, act_group, fmt.rotation,
                        None if smooth is None else pkey)
                if gkey not in norm_groups:
                    q = add_node(gm, fake_mode, torch.ops.q3n.norm_act_quant.default,
                                 (nx, eps, kind, act, sm_n, *rot_args), before=cand.node,
                                 meta_from=norm_src)
                    items = []
                    for i in range(2):
                        with gm.graph.inserting_before(cand.node):
                            item = gm.graph.call_function(operator.getitem, (q, i))
                        item.meta["val"] = q.meta["val"][i]
                        items.append(item)
                    norm_groups[gkey] = tuple(items)
                fused_act = norm_groups[gkey]
        if fused_act is not None:
            new = add_node(gm, fake_mode, torch.ops.q3n.qlinear_codes.default,
                           (*fused_act, qw_n, s_n, z_n, cand.bias, pw.bits, pw.group_size,
                            pw.in_features, act, cand.x.meta["val"].dtype, *act_group_arg),
                           before=cand.node, meta_from=cand.node)
        else:
            new = add_node(gm, fake_mode, torch.ops.q3n.qlinear.default,
                           (cand.x, qw_n, s_n, z_n, cand.bias, sm_n, pw.bits, pw.group_size,
                            pw.in_features, act, *rot_args), before=cand.node,
                           meta_from=cand.node)
        new.meta["q3n_qlinear"] = {"layer": cand.path, "format": fmt.name}
        cand.node.replace_all_uses_with(new)
        wt = cand.node.args[2] if cand.node.target is aten.addmm.default else cand.node.args[1]
        gm.graph.erase_node(cand.node)
        if isinstance(wt, Node) and not wt.users:
            gm.graph.erase_node(wt)
        if cand.folded is None:
            ctx.freeze(cand.weight_ph)
        else:
            folded_done.append(cand.folded)
            # The fold is redone from W on every compile (a new shape, a decode graph), so W is
            # not freed by release_quantized_weights(); it says why.
            R.note_read(source_weight, "norm_linear folds it with its norm's weight (the fold "
                                       "is redone on every compile)")
        R.note_quantized(source_weight, cand.path, result_key, result)
        R.note_quantized(source_weight, cand.path, mode_key, result)
        stats.matched += 1
        stats.rewritten += 1
        info = result.info
        layers.append({
            "layer": cand.path,
            "class": cand.layer_class,
            "classified_by": cand.classified_by,
            "decided_by": decided_by,
            "format": fmt.name,
            **fmt.as_dict(),
            "shape": [int(weight.shape[0]), int(weight.shape[1])],
            # The packed weight's layout (kernels/packing.py): K-major int8 for W8A8 per channel
            # and token (the i8 path), else bit planes.
            "weight_layout": "k-major int8" if P.is_kmajor8(pw.qweight) else "bit planes",
            "bytes_before": int(weight.numel() * weight.element_size()),
            "bytes_after": int(pw.nbytes + (smooth.numel() * 4 if smooth is not None else 0)),
            "method": info.get("method"),
            "rel_err": _round(info.get("rel_err")),
            "rtn_rel_err": _round(info.get("rtn_rel_err")),
            "calibration": source,
            "calibration_rows": int(info.get("calibration_rows", 0)),
            "cached": cached,
            # Time spent quantizing this layer at this compile (0 when cached).
            "seconds": round(seconds, 3),
            **({"damp": info["damp"]} if "damp" in info else {}),
            # GPTQ against RTN+clip on held-out calibration rows, when there were few rows.
            **({"validation": info["validation"]} if "validation" in info else {}),
            # calibration.refine: GPTQ's error, the error after the sweeps (calibration rows),
            # the sweeps, codes changed and GPTQ's damped objective before/after.
            **({"refine": info["refine"]} if "refine" in info else {}),
            # merge_siblings true: the calibration error (RTN+clip) under the group's
            # smoothing choice against the layer's own choice's, and whether it took the group's.
            **({"shared_smoothing": offer} if offer is not None else {}),
            **({"note": info["note"]} if "note" in info else {}),
            **({"norm_fused": {
                "norm": cand.folded["norm"],
                "activations": ("q3n::norm_act_quant" if fused_act is not None else
                                "q3n::normalize" + (" + qlinear's quantizer" if act != "none"
                                                    else ""))}}
               if cand.folded is not None else {}),
        })
        bias_ph = cand.bias if cand.bias is not None and cand.bias.op == "placeholder" else None
        members.append(SIB.Member(
            new, cand.path, fmt, result, pw, smooth, bias_val,
            bias_static=cand.bias is None or bias_val is not None,
            bias_placeholder=bias_ph if bias_val is not None else None, entry=layers[-1]))
    siblings = None
    if qc.merge_siblings:
        siblings = SIB.merge(
            gm, fake_mode, members,
            register=lambda name, value, before: _register(gm, fake_mode, name, value, before),
            freeze=ctx.freeze)
    gm.graph.eliminate_dead_code()
    # W' and b' buffers norm_linear folded for layers quantized here: nothing reads them now.
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for folded in folded_done:
        for name in (folded["weight"], folded["bias"]):
            if name is not None and name not in targets and hasattr(gm, name):
                delattr(gm, name)
    # Per-layer packed buffers a merged sibling call replaced.
    for name in [b for b, _ in gm.named_buffers() if b.startswith("_q3n_qlinear")]:
        if name not in targets:
            delattr(gm, name)
    SIB.contiguous_buffers(gm, fake_mode, "_q3n_qlinear")
    # Weights this graph still reads in high precision must not be freed by
    # release_quantized_weights() (a layer kept, a tied embedding, a norm's scale...).
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.users and node.name in ctx.static_values:
            value = ctx.static_values[node.name]
            if R.is_released(value):
                users = ", ".join(sorted({str(u.target) for u in node.users}))
                raise QuantizeConfigError(
                    f"q3n quantize: graph input {node.name} is a weight freed by "
                    f"release_quantized_weights(), but this graph still reads it ({users}). "
                    "Fix: reload the weights (model.load_state_dict) and compile again")
            R.note_read(value, f"graph {ctx.graph_id}")

    errs = [entry["rel_err"] for entry in layers if entry["rel_err"] is not None]
    stats.detail = {
        "layers": layers,
        "kept_high_precision": kept,
        "weight_bytes_before": int(bytes_before),
        "weight_bytes_after": int(bytes_after),
        "weight_bytes_note": (
            "before: high-precision bytes of the quantized layers' weights; after: their packed "
            "form held by the compiled graph. The eager weights stay in the nn.Module (and are "
            "passed to every call) until q3n_compile.release_quantized_weights(model) frees them."),
        "mean_rel_err": _round(sum(errs) / len(errs)) if errs else None,
        "max_rel_err": _round(max(errs)) if errs else None,
        "calibration": {"sources": sources, "settings": settings.as_dict(),
                        "note": None if "none" not in sources else (
                            "layers without calibration data were rounded to nearest with a "
                            "data-free clipping search"
                            + (f" ({example_note})" if example_note else "")
                            + "; call q3n_compile.quant.calibrate(model, batches) before "
                            "compiling for GPTQ/SmoothQuant")},
        "cache": {"hits": hits, "misses": misses},
        # Sibling linears run as one GEMM (passes/qlinear_siblings.py); None when
        # quant_config's merge_siblings is false.
        "siblings": siblings,
        # Linears whose norm norm_linear folded into them (γ/β in the quantized weights).
        "norm_fused": {
            "layers": sum("norm_fused" in e for e in layers),
            "norm_act_quant_calls": len(norm_groups),
            "normalize_kept": sum(1 for n in gm.graph.nodes if n.op == "call_function"
                                  and n.target is torch.ops.q3n.normalize.default),
        },
        "norm_layers": (None if qc.norm_layers is None else {
            **dict(qc.norm_layers),
            "status": "not applied by quantize: norms are computed by the norm_linear pass "
                      "(see its detail)"}),
    }
    return stats


def _bias_value(gm: GraphModule, ctx: PassContext, cand: Candidate) -> Optional[torch.Tensor]:
    """The bias's value where it is a compile-time constant; None without a bias or where the
    graph computes it."""
    if cand.bias is not None and cand.bias.op == "placeholder":
        return ctx.static_values.get(cand.bias.name)
    if cand.bias is not None and cand.bias.op == "get_attr":
        return getattr(gm, cand.bias.target)
    return None


def _shared_smoothing(gm: GraphModule, ctx: PassContext, todo: list, layer_stats: dict,
                      settings, within: Optional[float]) -> dict:
    """``{linear node: ((t or None, digest) or None, verdict or None)}`` for the linears of
    sibling groups (one input, one format that chooses a smoothing vector, calibration
    statistics): the choice :func:`q3n_compile.quant.algorithms.choose_shared_smoothing` made
    for the group (cached), for the members that take it (all of them where `within` is None),
    and each member's verdict where it was a choice to take or leave."""
    import hashlib

    from ..quant.algorithms import _smoothing_alphas, choose_shared_smoothing

    groups: dict[tuple, list[Candidate]] = {}
    for cand, fmt, _ in todo:
        if cand.node in layer_stats and _smoothing_alphas(fmt, settings) != (None,):
            groups.setdefault((SIB.input_key(cand.x), fmt), []).append(cand)
    out: dict = {}
    groups = {k: v for k, v in groups.items() if len(v) >= 2}
    # Before the per-layer loop's lines: a group's choice runs the noise model once per member
    # and once per round on the concatenated weight (seconds on 4096-wide layers).
    progress = Progress("quantize: sibling smoothing", len(groups), ctx.config.progress)
    for (_, fmt), cands in groups.items():
        st = layer_stats[cands[0].node][0]  # siblings read one input: the same rows
        sources = [_source(gm, ctx, c) for c in cands]
        biases = [_bias_value(gm, ctx, c) for c in cands]
        if any(c.bias is not None and b is None for c, b in zip(cands, biases)):
            progress.step(f"{cands[0].path}...: a bias computed in the graph")
            continue  # they will not merge anyway
        key = C.cache_key(sources[0], "shared-smoothing", fmt, settings, st.fingerprint(), within,
                          tuple(C.weight_key(w) + (w._version,) for w in sources[1:]),
                          tuple(None if b is None else C.weight_key(b) for b in biases),
                          tuple(c.folded["fold"] if c.folded else None for c in cands))
        found = C.cache_get(key)
        if found is None:
            weights = [_weight(gm, ctx, c) for c in cands]
            if any(R.is_released(w) for w in weights):
                progress.step(f"{cands[0].path}...: released weights")
                continue  # each layer's own result (packed before) is what is left
            t, adopted, info = choose_shared_smoothing(weights, biases, fmt, settings, st,
                                                       within)
            digest = "none" if t is None else hashlib.blake2b(
                t.detach().cpu().numpy().tobytes(), digest_size=8).hexdigest()
            found = (t, digest, adopted, info.get("members"))
            C.cache_put(key, sources[0], found)
        t, digest, adopted, verdicts = found
        for i, c in enumerate(cands):
            out[c.node] = ((t, digest) if adopted[i] else None,
                           None if verdicts is None else verdicts[i])
        progress.step(f"{', '.join(c.path for c in cands)}: {sum(adopted)} took the group's choice")
    return out


def _category(decided_by: str) -> str:
    if decided_by.endswith("says skip"):
        return "a rule says skip"
    if "unless a rule names them" in decided_by:
        return decided_by
    if decided_by.startswith("no ") and decided_by.endswith(" entry"):
        return "no entry for the layer's class"
    return decided_by
