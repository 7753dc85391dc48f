"""The `quantize` pass: linears -> ``q3n::qlinear`` at the precision each layer was given.

Candidates (``matched``): every linear of the post-AOT graph whose weight is a compile-time
constant — ``mm(x, t(W))`` and ``addmm(b, x, t(W))`` with ``W`` a parameter/buffer — and every
``q3n::norm_linear`` the norm_linear pass made (a linear fused with the norm before it).

For each linear:

1. **Class** (:mod:`q3n_compile.quant.classify`): attention projection, feed-forward, output head,
   router — by module path, else by graph structure; the report says which.
2. **Format** (:mod:`q3n_compile.quant.config`): the first rule matching the module path, else
   the class entry (``ffn_layers`` / ``attn_layers``); heads and routers only by a rule that names
   them. 8-bit activations with ``activation_format: "auto"`` become fp8 e4m3 when the weight is
   on a GPU with fp8 tensor cores (sm_89+) and the weight codes fit e4m3 (<= 4 bits), int8
   otherwise.
3. **Checks**: a format the layer cannot take (a group size that does not divide K, an input
   dtype the kernel does not take) raises :class:`QuantizeConfigError` naming the layer and the fix
   under ``strict=True``; otherwise the layer stays in high precision and
   ``detail["kept_high_precision"]`` says why.
4. **Quantization** (:mod:`q3n_compile.quant.algorithms`), once per (weight, format, calibration)
   and cached across compiles: GPTQ from the layer's input Hessian (act-order, damping from the
   rows per input channel, kept only where it beats RTN+clip on held-out calibration rows),
   SmoothQuant for 8-bit activations, clipping search — when calibration data exist: statistics
   attached by :func:`q3n_compile.quant.calibrate`, else the example inputs of the first compile
   that reaches the layer (the backend keeps their real values until the graph is compiled; the
   graph is run on them once, on copies of the inputs it writes, and the statistics are attached to
   the weights, so later compiles — other shapes, a decode graph — reuse them and the cached
   result; layers whose example input has fewer than ``MIN_EXAMPLE_ROWS`` rows are not
   calibrated on it). Without either, weights are rounded to nearest with a data-free clipping
   search, and the report says so.
5. **Rewrite**: the packed weight, scales, zero points and smoothing vector become buffers of the
   GraphModule read by ``get_attr``; the linear becomes ``q3n::qlinear`` (bias passed through);
   the weight's placeholder is frozen (``ctx.freeze``): changing it later raises
   ``FrozenWeightChanged``.

Memory: the compiled graph holds the packed weights; the high-precision weights stay in the
user's ``nn.Module`` (Dynamo passes them to every call) until
:func:`q3n_compile.release_quantized_weights` frees those that no compiled graph reads any more
(see :mod:`q3n_compile.quant.release`). ``detail`` reports ``weight_bytes_before`` (the quantized
layers' high-precision weights) and ``weight_bytes_after`` (their packed form: codes, scales, zero
points, smoothing vectors).

The q3n::norm_linear candidates are declined for now ("fused into norm_linear: quantizing fused
linears is not built yet"): composing the two is the next step (see the issue).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from ..kernels import qlinear as QL
from ..quant import calibration as C
from ..quant import release as R
from ..quant.classify import StructureClassifier, _q3n_op, classify, module_path
from ..quant.config import LayerFormat, QuantConfig, parse_quant_config
from .base import PassContext, PassStats
from .matching import add_node, fake_mode_for

aten = torch.ops.aten
NORM_LINEAR_REASON = "fused into norm_linear: quantizing fused linears is not built yet"


class QuantizeConfigError(ValueError):
    """A layer cannot take the format quant_config gave it (strict=True); says which and how to fix."""


@dataclasses.dataclass
class Candidate:
    node: Node
    x: Node
    weight_ph: Node
    bias: Optional[Node]
    path: str
    layer_class: Optional[str] = None
    classified_by: str = "none"


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


def _resolve_act(fmt: LayerFormat, device: torch.device) -> LayerFormat:
    if fmt.activation_bits != 8 or fmt.activation_format != "auto":
        return fmt
    fp8 = QL.fp8_supported(device) and QL._codes_fit_fp8(fmt.weight_bits, fmt.symmetric)
    return dataclasses.replace(fmt, activation_format="fp8" if fp8 else "int8")


def _problem(fmt: LayerFormat, x_val: torch.Tensor, k: int) -> Optional[tuple[str, str]]:
    """(problem, fix) if the layer cannot take `fmt`, else None."""
    if fmt.group_size != -1 and k % fmt.group_size:
        divisors = [g for g in (32, 64, 128) if k % g == 0]
        fix = (f"use group_size {' or '.join(map(str, divisors))}, or -1 for per-channel scales"
               if divisors else "use group_size -1 (per-channel scales)")
        return f"group_size {fmt.group_size} does not divide in_features {k}", fix
    if x_val.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return (f"input dtype {str(x_val.dtype).replace('torch.', '')} is not supported",
                "run the model in float16, bfloat16 or float32")
    reason = QL.format_supported(fmt.weight_bits, fmt.group_size, fmt.symmetric,
                                 "none" if fmt.activation_bits == 16 else fmt.activation_format)
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
            keep(module_path(node) or f"<{node.name}>", None, NORM_LINEAR_REASON)
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
        weight = ctx.static_values[cand.weight_ph.name]
        k = int(weight.shape[1])
        fmt = _resolve_act(fmt.for_k(k), weight.device)
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
    for cand, fmt, _ in todo:
        found = C.lookup_stats(ctx.static_values[cand.weight_ph.name])
        if found is not None:
            layer_stats[cand.node] = (found[0], found[0].source)
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
            C.attach_stats(ctx.static_values[cand.weight_ph.name], st, cand.path)
        if too_few and example_note is None:
            example_note = (f"{len(too_few)} layer(s) saw fewer than {C.MIN_EXAMPLE_ROWS} rows in "
                            "the example inputs (too few to calibrate on)")

    # 4. Quantize (cached) and rewrite.
    packed_nodes: dict[tuple, tuple[Node, ...]] = {}
    bytes_before = bytes_after = 0
    sources: dict[str, int] = {}
    hits = misses = 0
    for index, (cand, fmt, decided_by) in enumerate(todo):
        weight = ctx.static_values[cand.weight_ph.name]
        bias_val = None
        if cand.bias is not None and cand.bias.op == "placeholder":
            bias_val = ctx.static_values.get(cand.bias.name)
        st, source = layer_stats.get(cand.node, (None, "none"))
        bias_key = None if bias_val is None else C.weight_key(bias_val)
        result_key = (fmt, settings, bias_key)
        key = C.cache_key(weight, fmt, settings, st.fingerprint() if st else None, bias_key)
        result = None if R.is_released(weight) else C.cache_get(key)
        if R.is_released(weight):
            # Freed by release_quantized_weights(): only what was packed before can be used.
            result = R.released_result(weight, result_key)
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
        else:
            from ..quant.algorithms import quantize_layer

            misses += 1
            result = quantize_layer(weight, bias_val, fmt, settings, st)
            C.cache_put(key, weight, result)
        pw = result.packed.to(weight.device)
        act = "none" if fmt.activation_bits == 16 else fmt.activation_format
        x_val = cand.x.meta["val"]
        smooth = result.smooth.to(weight.device) if result.smooth is not None else None
        reason = QL.supports(x_val, pw.qweight, pw.scales, pw.zeros,
                             cand.bias.meta["val"] if cand.bias is not None else None, smooth,
                             pw.bits, pw.group_size, pw.in_features, act)
        if reason is not None:
            msg = f"layer {cand.path!r}: q3n::qlinear does not take it: {reason}"
            if ctx.config.strict:
                raise QuantizeConfigError(f"q3n quantize: {msg}")
            keep(cand.path, cand.layer_class, msg, category="kernel does not support the call")
            continue

        pkey = (cand.weight_ph.name, fmt, id(result))
        if pkey not in packed_nodes:
            prefix = f"_q3n_qlinear{index}"
            tensors = {"qweight": pw.qweight, "scales": pw.scales, "zeros": pw.zeros, "smooth": smooth}
            packed_nodes[pkey] = tuple(
                None if t is None else _register(gm, fake_mode, f"{prefix}_{name}", t, cand.node)
                for name, t in tensors.items())
            bytes_after += pw.nbytes + (smooth.numel() * 4 if smooth is not None else 0)
            bytes_before += weight.numel() * weight.element_size()
        qw_n, s_n, z_n, sm_n = packed_nodes[pkey]
        new = add_node(gm, fake_mode, torch.ops.q3n.qlinear.default,
                       (cand.x, qw_n, s_n, z_n, cand.bias, sm_n, pw.bits, pw.group_size,
                        pw.in_features, act), before=cand.node, meta_from=cand.node)
        new.meta["q3n_qlinear"] = {"layer": cand.path, "format": fmt.name}
        cand.node.replace_all_uses_with(new)
        wt = cand.node.args[2] if cand.node.target is aten.addmm.default else cand.node.args[1]
        gm.graph.erase_node(cand.node)
        if isinstance(wt, Node) and not wt.users:
            gm.graph.erase_node(wt)
        ctx.freeze(cand.weight_ph)
        R.note_quantized(weight, cand.path, result_key, result)
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
            "bytes_before": int(weight.numel() * weight.element_size()),
            "bytes_after": int(pw.nbytes + (smooth.numel() * 4 if smooth is not None else 0)),
            "method": info.get("method"),
            "rel_err": _round(info.get("rel_err")),
            "rtn_rel_err": _round(info.get("rtn_rel_err")),
            "calibration": source,
            "calibration_rows": int(info.get("calibration_rows", 0)),
            "cached": cached,
            **({"damp": info["damp"]} if "damp" in info else {}),
            # GPTQ against RTN+clip on held-out calibration rows, when there were few rows.
            **({"validation": info["validation"]} if "validation" in info else {}),
            **({"note": info["note"]} if "note" in info else {}),
        })
    gm.graph.eliminate_dead_code()
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
        "norm_layers": (None if qc.norm_layers is None else {
            **dict(qc.norm_layers),
            "status": "not applied by quantize: norms are computed by the norm_linear pass "
                      "(see its detail)"}),
    }
    return stats


def _category(decided_by: str) -> str:
    if decided_by.endswith("says skip"):
        return "a rule says skip"
    if "unless a rule names them" in decided_by:
        return decided_by
    if decided_by.startswith("no ") and decided_by.endswith(" entry"):
        return "no entry for the layer's class"
    return decided_by
