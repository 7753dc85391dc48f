"""Sibling quantized linears as one GEMM: the quantize pass's last step.

Siblings are ``q3n::qlinear`` calls on the same activations ``x`` (or ``q3n::qlinear_codes`` calls
on the same codes and scales, after a fused norm) with the same format, the same weight layout and
the same smoothing vector: a Llama/Qwen block's q/k/v projections, or its gate/up pair. Their
packed weights, scales, zero points and biases are concatenated along N and the group becomes
one call whose output columns are sliced back (``aten.slice`` views, no copy). The graph then
quantizes x once instead of once per sibling, and runs one GEMM where it ran three (on GQA models
the k/v projections are narrow weights, 1024 x 4096 on qwen3 "bench", where a tile of their own
fills few SMs).

What this module guarantees:

- **The same values, per column.** A member's columns of the merged call are computed from the
  same activation codes (x and the smoothing vector are shared) and the member's own weight codes,
  scales and zero points, so they equal the separate call's up to the order of the GEMM's fp32
  sums (the kernel's K split and tile may differ for the wider N).
- **One copy of the packed weight.** Each member's cached quantization result (the quantize
  cache and the release registry hold it) is rebound to views of the merged tensors, so the
  process holds the packed bytes once. A later compile of the same siblings (another shape, a
  decode graph) finds the views consecutive in one base and reuses the base; a compile that does
  not merge them gets contiguous copies (:func:`contiguous_buffers`).
- **Nothing merged silently wrong.** A group is merged only where ``q3n::qlinear``'s
  ``supports`` takes the merged call; biases must be compile-time constants (a missing bias is
  zeros in the merged one). Groups on one input that stay apart are reported with the reason
  (different formats, different smoothing vectors — with the member that kept its own and its
  calibration errors, where the group's choice was offered — a bias computed in the graph).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from ..kernels import packing as P
from ..kernels import qlinear as QL
from .matching import VIEW_OPS, add_node, is_call

aten = torch.ops.aten


@dataclasses.dataclass
class Member:
    """One rewritten linear, as the quantize pass made it."""

    node: Node  # q3n::qlinear or q3n::qlinear_codes
    layer: str
    fmt: Any  # LayerFormat (hashable)
    result: Any  # the cached LayerResult whose packed tensors may become views
    pw: P.PackedWeight  # the packed weight on the graph's device
    smooth: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]  # the bias's value; None without a bias
    bias_static: bool  # False: the bias is computed in the graph (such a member stays apart)
    bias_placeholder: Optional[Node]  # a parameter placeholder folded into the merged bias
    entry: Optional[dict] = None  # the layer's report entry: gets "merged" when merged


def _op_args(node: Node) -> tuple[int, int]:
    """(index of qweight, number of leading activation arguments) in the op's arguments."""
    if node.target is torch.ops.q3n.qlinear.default:
        return 1, 1
    return 2, 2  # qlinear_codes: (codes, scales, qweight, ...)


def input_key(node: Node) -> tuple:
    """What identifies the tensor `node` is: each linear of the captured graph reshapes the
    block's input for itself (``view(x, [M, K])``), so views of one root with one shape and
    stride are one tensor (a view keeps the storage offset)."""
    root = node
    while is_call(root, *VIEW_OPS):
        root = root.args[0]
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return (node,)
    return (root, str(tuple(val.shape)), str(tuple(val.stride())), str(val.dtype))


def contiguous_buffers(gm: GraphModule, fake_mode: Any, prefix: str) -> int:
    """Copies to contiguous tensors the buffers named `prefix`... that the graph reads and that
    are views of a merged weight (a layer an earlier compile merged, left as its own call in
    this one: the kernels read packed tensors as contiguous). Returns how many."""
    copied = 0
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not str(node.target).startswith(prefix):
            continue
        value = getattr(gm, node.target)
        if isinstance(value, torch.Tensor) and not value.is_contiguous():
            value = value.contiguous()
            gm.register_buffer(node.target, value)
            node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
            copied += 1
    return copied


def _n_dim(qweight: torch.Tensor) -> int:
    """The dimension of N in a packed tensor of this layout (K-major int8: rows; planes: columns)."""
    return 0 if P.is_kmajor8(qweight) else 1


def _joined(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The tensors concatenated along `dim`, or their common base where they already are
    consecutive views of it (a member result rebound by an earlier merge)."""
    base = parts[0]._base
    if base is not None and all(p._base is base for p in parts) and base.dim() == parts[0].dim():
        offset = 0
        for p in parts:
            want = base.narrow(dim, offset, p.shape[dim])
            if (p.data_ptr(), p.stride(), p.shape) != (want.data_ptr(), want.stride(), want.shape):
                break
            offset += p.shape[dim]
        else:
            if offset == base.shape[dim]:
                return base
    return torch.cat(parts, dim=dim)


def _merged_packed(members: list[Member]) -> P.PackedWeight:
    pws = [m.pw for m in members]
    dim = _n_dim(pws[0].qweight)
    scale_dtype = torch.float32 if any(p.scales.dtype == torch.float32 for p in pws) else (
        pws[0].scales.dtype)
    qweight = _joined([p.qweight for p in pws], dim)
    # Scales in one dtype: float16 values are exact in float32, so upcasting changes no product.
    scales = _joined([p.scales.to(scale_dtype) for p in pws], 1)
    zeros = None if pws[0].zeros is None else _joined([p.zeros for p in pws], 1)
    return dataclasses.replace(pws[0], qweight=qweight, scales=scales, zeros=zeros,
                               out_features=sum(p.out_features for p in pws))


def _rebind(members: list[Member], merged: P.PackedWeight) -> None:
    """Each member's cached result now views the merged tensors (one copy of the bytes)."""
    dim = _n_dim(merged.qweight)
    start = 0
    for m in members:
        n = m.pw.out_features
        cached = m.result.packed
        if cached.qweight is not m.pw.qweight:
            start += n  # the cache holds it on another device: not the graph's copy
            continue
        view = lambda t, d, old: old if t is None or t.dtype != old.dtype else t.narrow(d, start, n)  # noqa: E731
        m.result.packed = dataclasses.replace(
            cached, qweight=view(merged.qweight, dim, cached.qweight),
            scales=view(merged.scales, 1, cached.scales),
            zeros=None if cached.zeros is None else view(merged.zeros, 1, cached.zeros))
        start += n


def _merged_bias(members: list[Member], dtype: torch.dtype, device) -> Optional[torch.Tensor]:
    if all(m.bias is None for m in members):
        return None
    parts = [m.bias.to(dtype) if m.bias is not None else
             torch.zeros(m.pw.out_features, dtype=dtype, device=device) for m in members]
    return torch.cat([p.to(device) for p in parts])


def _apart_reason(a: Member, b: Member) -> Optional[str]:
    """Why `b` cannot join `a`'s GEMM (same input), or None."""
    if a.fmt != b.fmt:
        return f"different formats ({a.fmt.name} and {b.fmt.name})"
    if a.pw.qweight.dtype != b.pw.qweight.dtype or (a.pw.zeros is None) != (b.pw.zeros is None):
        return "different weight layouts"
    if (a.smooth is None) != (b.smooth is None) or (
            a.smooth is not None and not torch.equal(a.smooth, b.smooth)):
        why = "different smoothing vectors (each quantizes x its own way)"
        for m in (a, b):
            offer = (m.entry or {}).get("shared_smoothing")
            if offer is None or offer["adopted"]:
                continue
            ratio = offer["rel_err"] / max(offer["own_rel_err"], 1e-30)
            if ratio > 1 + offer["within"]:
                why += (f"; {m.layer} kept its own: the group's raised its calibration error "
                        f"{ratio:.3g}x, more than share_smoothing_within allows "
                        f"({1 + offer['within']:.3g}x)")
            else:
                why += f"; {m.layer} kept its own: no sibling took the group's"
        return why
    return None


def merge(gm: GraphModule, fake_mode: Any, members: list[Member], register, freeze
          ) -> dict[str, Any]:
    """Merge the sibling groups among `members` (in graph order). `register(name, tensor,
    before)` makes a ``get_attr`` buffer node; `freeze(placeholder)` records a parameter folded
    into the graph. Returns the report: ``groups`` (each merged group's layers and the merged
    call's N), ``calls_saved`` and ``apart`` (siblings on one input left as separate calls, why)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_input: dict[tuple, list[Member]] = {}
    for m in sorted(members, key=lambda m: order[m.node]):
        first, n_inputs = _op_args(m.node)
        key = (m.node.target,) + tuple(input_key(a) for a in m.node.args[:n_inputs])
        by_input.setdefault(key, []).append(m)
    groups, apart = [], []
    for same_input in by_input.values():
        if len(same_input) < 2:
            continue
        pending = list(same_input)
        while pending:
            head, rest = pending[0], pending[1:]
            group, pending = [head], []
            for m in rest:
                why = _apart_reason(head, m)
                if why is None and not (m.bias_static and head.bias_static):
                    why = "a bias computed in the graph"
                if why is None:
                    group.append(m)
                else:
                    pending.append(m)
                    apart.append({"layers": [head.layer, m.layer], "reason": why})
            if len(group) > 1:
                made = _merge_group(gm, fake_mode, group, register, freeze)
                if isinstance(made, str):
                    apart.append({"layers": [m.layer for m in group], "reason": made})
                else:
                    groups.append(made)
    return {"groups": groups,
            "calls_saved": sum(len(g["layers"]) - 1 for g in groups),
            "apart": apart}


def _merge_group(gm: GraphModule, fake_mode: Any, group: list[Member], register, freeze):
    """One call for `group` (graph order); its report entry, or why it was left apart."""
    first = group[0].node
    qi, n_inputs = _op_args(first)
    x_val = first.args[0].meta["val"]
    out_dtype = first.meta["val"].dtype
    device = group[0].pw.qweight.device
    merged = _merged_packed(group)
    bias = _merged_bias(group, out_dtype, device)
    fake = lambda t: None if t is None else fake_mode.from_tensor(t, static_shapes=True)  # noqa: E731
    if first.target is torch.ops.q3n.qlinear.default:
        smooth = group[0].smooth
        reason = QL.supports(x_val, fake(merged.qweight), fake(merged.scales), fake(merged.zeros),
                             fake(bias), fake(smooth), merged.bits, merged.group_size,
                             merged.in_features, first.args[9], *first.args[10:])
    else:
        reason = QL.supports_codes(x_val, first.args[1].meta["val"], fake(merged.qweight),
                                   fake(merged.scales), fake(merged.zeros), fake(bias),
                                   merged.bits, merged.group_size, merged.in_features,
                                   first.args[9], first.args[10], *first.args[11:])
    if reason is not None:
        return f"{first.target.name()} does not take the merged call: {reason}"
    tag = "_q3n_siblings_" + first.name
    qw_n = register(f"{tag}_qweight", merged.qweight, first)
    s_n = register(f"{tag}_scales", merged.scales, first)
    z_n = None if merged.zeros is None else register(f"{tag}_zeros", merged.zeros, first)
    b_n = None if bias is None else register(f"{tag}_bias", bias, first)
    args = list(first.args)
    args[qi:qi + 4] = [qw_n, s_n, z_n, b_n]
    new = add_node(gm, fake_mode, first.target, tuple(args), before=first, meta_from=first)
    layers = [m.layer for m in group]
    new.meta["q3n_qlinear"] = {"layer": "+".join(layers),
                               "format": first.meta.get("q3n_qlinear", {}).get("format"),
                               "siblings": layers}
    dim = new.meta["val"].dim() - 1
    start = 0
    columns = []
    for m in group:
        n = m.pw.out_features
        part = add_node(gm, fake_mode, aten.slice.Tensor, (new, dim, start, start + n),
                        before=m.node, meta_from=m.node)
        m.node.replace_all_uses_with(part)
        gm.graph.erase_node(m.node)
        if m.bias_placeholder is not None:
            freeze(m.bias_placeholder)
        columns.append([start, start + n])
        if m.entry is not None:
            m.entry["merged"] = {"call": "+".join(layers), "columns": [start, start + n]}
        start += n
    _rebind(group, merged)
    return {"layers": layers, "columns": columns, "out_features": start,
            "format": new.meta["q3n_qlinear"]["format"]}
