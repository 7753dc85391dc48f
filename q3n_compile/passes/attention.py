"""The `attention` pass: attention in the ATen graph → ``q3n::attention`` (tiled).

Candidates (counted in ``matched``):

- SDPA in every ATen form capture leaves: ``aten.scaled_dot_product_attention``,
  ``_scaled_dot_product_flash_attention_for_cpu`` (what CPU capture gives),
  ``_scaled_dot_product_flash_attention``, ``_efficient_attention``, ``_cudnn_attention``,
  ``_fused_attention_overrideable`` (CUDA/other devices) and ``_scaled_dot_product_attention_math``;
  SDPA's math decomposition (``_safe_softmax``) is attention written out, below;
- attention written out: a softmax (``_softmax``, ``_safe_softmax``) whose result feeds a batched
  matmul, i.e. ``softmax(scale · q @ kᵀ + mask) @ v`` as ATen spells ``torch.matmul`` on 4-D
  tensors (expand → view to 3-D → bmm → view back to 4-D).

What the pass guarantees:

- A candidate is rewritten only when every step is proven: the scores are ``q @ kᵀ`` of 4-D
  ``[B, H, S, D]`` tensors (any strides, so ``[B, S, H, D]`` inputs seen through a transpose are
  fine), scaled by constants (on the scores, on q or on k; numbers, 0-d constant tensors, or
  model attributes the capture marks constant, which are then frozen) or by a one-element value
  known only at run time (then applied to q before the kernel), masked at most once (additive, or
  ``masked_fill``/``where`` with -inf), soft-maxed over the last dim, passed through
  casts and identity dropout only, multiplied by ``v`` and viewed back to ``[B, H, Sq, Dv]``; no
  intermediate (scores, weights) is used anywhere else; and the kernel's ``supports`` accepts the
  arguments. Anything else is left as it was and counted in ``declined`` with its reason.
- K/V repeated for grouped-query attention (``repeat_kv``'s expand + reshape, or
  ``repeat_interleave``, which ATen spells the same) are fed to the kernel un-repeated.
- A mask proven to be exactly the top-left causal mask (built from ``arange`` comparisons,
  ``tril``/``triu`` of ones, ``where``, and transformers' packed-sequence test of positions it
  made itself: ``cat``, ``cumsum``, ``eq``/``ne``, indexing of a constant; see
  ``matching.index_value``) becomes ``is_causal=True``
  and is dropped; any other mask is passed as a bool or additive mask. ``detail`` says which.
- After the rewrites, dead nodes (the score matrix, softmax, repeated K/V copies, the mask's
  construction when it became ``is_causal``) are removed.
- The status is "applied" whenever the pass ran, also when it found nothing (0 matched).
- ``attention="sparse"``: the same matching and proofs, but each candidate becomes
  ``q3n::sparse_attention`` (block-sparse, lossy; ``kernels/attention_sparse.py``) with the config's
  ``sparse_keep``/``sparse_min_mass``, the graph id and a layer number (0, 1, ... in graph order)
  under which the op records its measured kept mass; ``detail["sparse"]`` lists the layers, the
  knobs, and when a layer runs dense instead (short inputs, or kept mass under the threshold,
  decided per call on the device).

Where the result may differ from eager beyond rounding (the kernel keeps scores in fp32 and rounds
once, so it is at least as accurate as eager bf16/fp16):

- rows whose every key is masked with -inf: ``_softmax`` gives NaN, the kernel 0 (as SDPA and
  ``_safe_softmax`` do);
- a proven-causal additive mask whose masked value is finite (HF uses ``finfo(dtype).min``) is
  treated as -inf: the weight eager leaves there, ``exp(min + s_j - max_i)``, is exactly 0 in fp32
  unless scores within a row differ by more than |min| - 104 (for fp16's min, 65400), and the
  diagonal is always kept, so no row is fully masked;
- ``masked_fill``/``where`` with a finite value v ≤ -1e30 becomes the additive mask v: equal to
  eager while |scores| < 1e22.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable, Optional

import torch
from torch.fx import GraphModule, Node

from .base import PassContext, PassStats
from .matching import (
    CAST_OPS, Constants, SAME_VALUE_OPS, VIEW_OPS, Affine, IndexEvaluator, Pred, add_node, bind_args,
    fake_mode_for, is_call, is_noop_slice, json_size, known_eq, negate, same_shape,
    tensor_val, trivially_true, val,
)

aten = torch.ops.aten

SOFTMAX_OPS = (aten._softmax.default, aten._safe_softmax.default, aten.softmax.int)
SDPA_FORMS = {
    aten.scaled_dot_product_attention.default: "sdpa",
    aten._scaled_dot_product_flash_attention_for_cpu.default: "sdpa_flash_cpu",
    aten._scaled_dot_product_flash_attention.default: "sdpa_flash",
    aten._scaled_dot_product_efficient_attention.default: "sdpa_efficient",
    aten._scaled_dot_product_cudnn_attention.default: "sdpa_cudnn",
    aten._scaled_dot_product_fused_attention_overrideable.default: "sdpa_overrideable",
    aten._scaled_dot_product_attention_math.default: "sdpa_math",
}
SPARSE_OP = "q3n::sparse_attention"
# An additive value at or below this removes a key as -inf does, given no row is fully masked
# (see the module docstring); -65504 is float16's most negative finite value.
NEG_LIKE = -65504.0
# A masked_fill/where value at or below this may be passed as an additive mask in any case.
FILL_AS_ADDITIVE = -1e30
_CAUSAL = Affine.make({-1: 1, -2: -1}, 0)  # key index - query index <= 0
_MATMUL_PREP = (aten.expand.default, *VIEW_OPS, *SAME_VALUE_OPS)


class Decline(Exception):
    """A candidate that is not rewritten; the message is the reason counted in the report."""


@dataclasses.dataclass
class Mask:
    """A mask as found: `kind` "additive" (added to the scores), "keep" (bool, True = keep) or
    "drop" (bool, True = masked); keep/drop masks replace scores with `fill`."""

    node: Node
    kind: str
    fill: float = -math.inf


@dataclasses.dataclass
class Match:
    """A candidate proven to be attention, before lowering."""

    form: str
    out: Node  # the value the kernel's result replaces
    q: Node
    k: Node  # [B, Hkv, Sk, D]; see `k_transposed`
    v: Node
    mask: Optional[Mask]
    scale: Optional[float]
    is_causal: bool
    k_transposed: bool = False  # `k` holds kᵀ [B, Hkv, D, Sk]; lowering transposes it back
    gqa_unrepeated: bool = False
    # Scale factors known only at run time, (node, "mul" | "div"); applied to q before the kernel.
    runtime_scale: list = dataclasses.field(default_factory=list)
    # Nodes the rewrite makes dead although FX calls them impure (SDPA and dropout are "seeded").
    owned: list = dataclasses.field(default_factory=list)


class _Builder:
    """Creates nodes before `before`; undoes them if the candidate is declined after all."""

    def __init__(self, gm: GraphModule, fake_mode: Any, before: Node):
        self.gm, self.fake_mode, self.before = gm, fake_mode, before
        self.created: list[Node] = []

    def call(self, target: Any, *args: Any, **kwargs: Any) -> Node:
        node = add_node(self.gm, self.fake_mode, target, args, kwargs, before=self.before,
                        meta_from=self.before)
        self.created.append(node)
        return node

    def rollback(self) -> None:
        for node in reversed(self.created):
            self.gm.graph.erase_node(node)
        self.created.clear()


def run(gm: GraphModule, ctx: PassContext) -> PassStats:
    # The kernel module imports Triton; imported here so a machine without it fails this pass
    # (rolled back, reported) rather than the whole backend.
    from ..kernels import attention as kernel

    stats = PassStats(status="applied")
    rewrites: list[dict[str, Any]] = []
    stats.detail = {"mode": ctx.config.attention, "rewrites": rewrites}
    sparse = None
    if ctx.config.attention == "sparse":
        from ..kernels import attention_sparse

        sparse = _Sparse(attention_sparse, ctx.config.sparse_keep, ctx.config.sparse_min_mass,
                         ctx.graph_id)
    env = _Env(gm, fake_mode_for(gm, ctx), Constants(gm, ctx.static_values), IndexEvaluator(gm),
               kernel.supports if sparse is None else sparse.supports, sparse)
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    owned: set[Node] = set()

    for node in list(gm.graph.nodes):
        form = _candidate_form(node)
        if form is None:
            continue
        env.const.used.clear()
        try:
            match = _match_sdpa(node, form) if form != "written_out" else _match_written(env.const, node)
            rewrites.append(_lower(env, match))
        except Decline as decline:
            stats.decline(str(decline))  # counts it as matched too
            continue
        stats.matched += 1
        stats.rewritten += 1
        if sparse is not None:
            sparse.layers += 1
        owned.update(match.owned)
        # A scale read from a model attribute/weight is now part of the graph: guard it.
        for name in sorted(env.const.used):
            ctx.freeze(placeholders[name])

    if rewrites:
        gm.graph.eliminate_dead_code(is_impure_node=lambda n: n not in owned and n.is_impure())
    stats.detail["causal_from_mask"] = sum(r["causal_from"] == "mask" for r in rewrites)
    stats.detail["causal_flag"] = sum(r["causal_from"] == "flag" for r in rewrites)
    stats.detail["masks_passed"] = sum(r["mask"] != "none" for r in rewrites)
    if sparse is not None:
        stats.detail["sparse"] = sparse.detail(rewrites)
    stats.detail["blocks"] = _blocks_that_run(gm, kernel)
    return stats


def _blocks_that_run(gm: GraphModule, kernel: Any) -> list[dict[str, Any]]:
    """The launch choice of each distinct ``q3n::attention`` in the graph, for the report.

    Blocks are chosen at run time from the actual key length (no recompile across lengths), so
    what can be said at compile time is the rule: the length buckets and their tiles as sympy
    expressions of the graph's key-length symbol, and the decode split rule.
    """
    from ..kernels import contract

    seen: dict[tuple, dict[str, Any]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.q3n.attention.default:
            continue
        q, k = node.args[0].meta.get("val"), node.args[1].meta.get("val")
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
            continue
        head_dim, causal = int(q.shape[-1]), bool(node.args[5]) if len(node.args) > 5 else False
        key_len = k.shape[2]
        symbol = str(key_len) if isinstance(key_len, torch.SymInt) else "Sk"
        if q.device.type == "cuda":
            arch = None  # the current CUDA device's
        else:
            arch = "interpreter" if contract.interpreter_enabled() else "reference"
        key = (head_dim, q.dtype, causal, symbol, q.device.type)
        if key not in seen:
            seen[key] = {"head_dim": head_dim, "dtype": str(q.dtype).replace("torch.", ""),
                         "causal": causal, "key_length": str(key_len), "layers": 0,
                         "launch": kernel.describe_blocks(head_dim, q.dtype, causal, arch, symbol=symbol)}
        seen[key]["layers"] += 1
    return list(seen.values())


@dataclasses.dataclass
class _Sparse:
    """Sparse mode's settings and its layer counter (a layer = one rewritten attention)."""

    module: Any  # q3n_compile.kernels.attention_sparse
    keep: float
    min_mass: float
    graph_id: int
    layers: int = 0

    def supports(self, q, k, v, mask, scale, is_causal) -> Optional[str]:
        return self.module.supports(q, k, v, mask, scale, is_causal, self.keep, self.min_mass)

    def detail(self, rewrites: list[dict[str, Any]]) -> dict[str, Any]:
        m = self.module
        return {
            "op": SPARSE_OP,
            "keep": self.keep,
            "min_mass": self.min_mass,
            "layers": [{"layer": r["layer"], "node": r["node"], "causal": r["causal"]}
                       for r in rewrites],
            "block": "64 query/key rows on CUDA, 16 on the CPU",
            "dense_when": (f"at run time: q_len <= {m.DECODE_MAX_Q} or fewer than "
                           f"{m.MIN_KEY_BLOCKS} key blocks (always); kept mass on ~"
                           f"{m.SAMPLED_ROWS} sampled rows per head < min_mass (decided on the "
                           "device, per call)"),
            "runtime_stats": "report['runtime']['sparse_attention'], filled once the graph ran",
        }


# --------------------------------------------------------------------------------------------
# Finding candidates
# --------------------------------------------------------------------------------------------


def _candidate_form(node: Node) -> Optional[str]:
    if node.op != "call_function":
        return None
    if node.target in SDPA_FORMS:
        return SDPA_FORMS[node.target] if node.users else None
    if node.target in SOFTMAX_OPS and _feeds_matmul(node):
        return "written_out"
    return None


def _feeds_matmul(node: Node, depth: int = 0, seen: Optional[set] = None) -> bool:
    """Does the softmax result reach a matmul through casts, dropout and reshapes? (any users)"""
    seen = set() if seen is None else seen  # a DAG: without it shared nodes are walked again
    if depth > 12 or node in seen:
        return False
    seen.add(node)
    for user in node.users:
        if is_call(user, aten.bmm.default, aten.mm.default):
            return True
        if (is_call(user, *CAST_OPS, *_MATMUL_PREP, aten.native_dropout.default,
                    aten.dropout.default) or user.target is operator.getitem) \
                and _feeds_matmul(user, depth + 1, seen):
            return True
    return False


# --------------------------------------------------------------------------------------------
# SDPA forms
# --------------------------------------------------------------------------------------------


def _match_sdpa(node: Node, form: str) -> Match:
    b = bind_args(node)
    q, k, v = b["query"], b["key"], b["value"]
    mask = b.get("attn_mask", b.get("attn_bias"))
    dropout_p = b.get("dropout_p", 0.0)
    if dropout_p != 0:
        raise Decline(f"SDPA dropout_p={dropout_p} != 0 (SDPA applies dropout even in eval)")
    if b.get("dropout_mask") is not None:
        raise Decline("SDPA math form with a dropout mask")
    qv, kv = tensor_val(q), tensor_val(k)
    if qv is None or kv is None or qv.dim() != 4 or kv.dim() != 4:
        raise Decline("SDPA inputs are not 4-D [B, H, S, D]")
    if form == "sdpa" and not b.get("enable_gqa", False) and not known_eq(qv.shape[1], kv.shape[1]):
        raise Decline("SDPA with differing head counts and enable_gqa=False")
    if isinstance(node.meta.get("val"), (tuple, list)):
        # Tuple-returning forms: only the attention output itself may be used.
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users):
            raise Decline("SDPA's logsumexp or other auxiliary outputs are used")
        if len(node.users) != 1:
            raise Decline("SDPA output read by several getitem nodes")
        out = next(iter(node.users))
    else:
        out = node
    m = None
    if isinstance(mask, Node):
        mv = tensor_val(mask)
        m = Mask(mask, "keep" if mv is not None and mv.dtype == torch.bool else "additive")
    scale = b.get("scale")
    return Match(form=form, out=out, q=q, k=k, v=v, mask=m,
                 scale=None if scale is None else float(scale), is_causal=bool(b["is_causal"]),
                 owned=[node])


# --------------------------------------------------------------------------------------------
# Attention written out
# --------------------------------------------------------------------------------------------


def _match_written(const: Constants, softmax: Node) -> Match:
    scores = softmax.args[0]
    sv = tensor_val(scores)
    if sv is None or sv.dim() != 4:
        raise Decline("scores are not 4-D [B, H, Sq, Sk]")
    if softmax.args[1] % 4 != 3:
        raise Decline("softmax is not over the last dim")
    bmm2, chain = _probs_to_matmul(softmax)
    out = _single_user(bmm2, "the '@ v' product is used more than once")
    if not is_call(out, *VIEW_OPS) or tensor_val(out).dim() != 4:
        raise Decline("the '@ v' product is not viewed back to 4-D")
    p_full, _ = _bmm_operand(bmm2.args[0], "attention weights")
    v_full, v_base = _bmm_operand(bmm2.args[1], "v")

    scores_view, scale, runtime, mask = _walk_scores(const, scores)
    bmm1 = scores_view.args[0]
    q_full, q_base = _bmm_operand(bmm1.args[0], "q")
    kt_full, kt_base = _bmm_operand(bmm1.args[1], "kᵀ")

    B, H, Sq, Sk = tensor_val(scores_view).shape
    for what, node in (("q", q_full), ("kᵀ", kt_full), ("attention weights", p_full), ("v", v_full),
                       ("output", out)):
        if not same_shape(tensor_val(node).shape[:2], (B, H)):
            raise Decline(f"{what} does not have the scores' batch and head dims")
    if not same_shape(tensor_val(p_full).shape, (B, H, Sq, Sk)):
        raise Decline("attention weights change shape between softmax and '@ v'")
    if not same_shape(tensor_val(q_base).shape, tensor_val(q_full).shape):
        raise Decline("q is broadcast in the matmul")
    for what, base, full in (("k", kt_base, kt_full), ("v", v_base, v_full)):
        bs, fs = tensor_val(base).shape, tensor_val(full).shape
        # Broadcasting one kv head over all heads (multi-query attention) is what the kernel does.
        if not (same_shape(bs, fs) or (same_shape((bs[0], *bs[2:]), (fs[0], *fs[2:]))
                                       and known_eq(bs[1], 1))):
            raise Decline(f"{what} is broadcast over the batch in the matmul")

    q, q_scale = _peel_scale(const, q_base)
    k, k_scale, k_transposed = _peel_key(const, kt_base)
    scale *= q_scale * k_scale
    v = v_base
    unrepeated = False
    if not k_transposed:
        (k_src, k_groups), (v_src, v_groups) = _unrepeat(k), _unrepeat(v)
        if k_groups > 1 and k_groups == v_groups and same_shape(tensor_val(k_src).shape[:3],
                                                                tensor_val(v_src).shape[:3]):
            k, v, unrepeated = k_src, v_src, True

    qv, kv, vv, ov = (tensor_val(n) for n in (q, k, v, out))
    kshape = kv.shape if not k_transposed else (*kv.shape[:2], kv.shape[3], kv.shape[2])
    ok = (same_shape(qv.shape, (B, H, Sq, qv.shape[3])) and known_eq(kshape[0], B)
          and known_eq(kshape[2], Sk) and known_eq(kshape[3], qv.shape[3])
          and same_shape(vv.shape[:3], kshape[:3])
          and same_shape(ov.shape, (B, H, Sq, vv.shape[3])))
    if not ok:
        raise Decline("q, k, v and scores shapes do not line up")
    if ov.dtype != qv.dtype:
        raise Decline(f"output dtype {ov.dtype} differs from q's {qv.dtype}")
    return Match(form="written_out", out=out, q=q, k=k, v=v, mask=mask, scale=scale,
                 is_causal=False, k_transposed=k_transposed, gqa_unrepeated=unrepeated,
                 runtime_scale=runtime, owned=chain)


def _single_user(node: Node, reason: str) -> Node:
    if len(node.users) != 1:
        raise Decline(reason)
    return next(iter(node.users))


def _probs_to_matmul(softmax: Node) -> tuple[Node, list[Node]]:
    """Follow the softmax result to the bmm it feeds; every step must be its only use.

    Returns the bmm and the nodes on the way.
    """
    node = softmax
    chain = [softmax]
    while True:
        user = _single_user(node, "attention weights are used outside the attention (e.g. returned)")
        if is_call(user, aten.bmm.default):
            if user.args[0] is not node:
                raise Decline("attention weights are the right operand of the matmul")
            return user, chain
        if is_call(user, *CAST_OPS, *_MATMUL_PREP):
            node = user
        elif is_call(user, aten.native_dropout.default, aten.dropout.default):
            b = bind_args(user)
            if b["p"] != 0 and b["train"] is not False:
                raise Decline(f"dropout p={b['p']} in training mode")
            node = user
            if is_call(user, aten.native_dropout.default):
                if any(u.target is not operator.getitem or u.args[1] != 0 for u in user.users):
                    raise Decline("dropout mask is used")
                chain.append(user)
                node = _single_user(user, "attention weights are used outside the attention")
        else:
            raise Decline(f"attention weights go through {_name(user)} before '@ v'")
        chain.append(node)


def _bmm_operand(node: Node, what: str) -> tuple[Node, Node]:
    """For a bmm operand ``view(clone?(expand?(x)), [B*H, M, N])``: (the 4-D full value, x)."""
    if not is_call(node, *VIEW_OPS):
        raise Decline(f"{what} is not a 4-D tensor flattened for bmm")
    src = node.args[0]
    if is_call(src, aten.clone.default):
        src = src.args[0]
    full = src
    base = src.args[0] if is_call(src, aten.expand.default) else src
    fv, nv = tensor_val(full), tensor_val(node)
    if fv is None or fv.dim() != 4 or tensor_val(base) is None or tensor_val(base).dim() != 4:
        raise Decline(f"{what} is not 4-D")
    if not (known_eq(nv.shape[0], fv.shape[0] * fv.shape[1]) and same_shape(nv.shape[1:], fv.shape[2:])):
        raise Decline(f"{what} is not flattened over its batch and head dims")
    return full, base


def _walk_scores(const: Constants, node: Node) -> tuple[Node, float, list, Optional[Mask]]:
    """From the softmax input back to ``view(bmm(q, kᵀ))``.

    Returns that view, the constant scale, the runtime scale factors ``(node, "mul"|"div")`` (a
    Python float attribute becomes a 0-d graph input under ``dynamic=True``) and the mask.
    """
    scale = 1.0
    after_mask = 1.0  # the part of `scale` applied after the mask
    runtime: list[tuple[Node, str]] = []
    runtime_after_mask = False  # a runtime factor seen before (i.e. applied after) any mask
    mask: Optional[Mask] = None
    while True:
        if len(node.users) != 1:
            raise Decline("attention scores are used outside the attention")
        if is_call(node, *VIEW_OPS) and is_call(node.args[0], aten.bmm.default):
            if len(node.args[0].users) != 1:
                raise Decline("attention scores are used outside the attention")
            if mask is not None and runtime_after_mask:
                raise Decline("a mask is scaled by a runtime value")
            return node, scale, runtime, _scaled_mask(mask, after_mask)
        if is_call(node, *CAST_OPS, *SAME_VALUE_OPS):
            node = node.args[0]
        elif is_call(node, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            if is_call(node, aten.div.Tensor) and node.kwargs.get("rounding_mode") is not None:
                raise Decline("scores divided with a rounding mode")
            div = is_call(node, aten.div)
            x, c = _split_constant(const, node, allow_left=not div)
            if c is None:
                x, factor = _runtime_factor(node, allow_left=not div)
                runtime.append((factor, "div" if div else "mul"))
                runtime_after_mask = runtime_after_mask or mask is None
            elif c == 0:
                raise Decline("scores scaled by 0")
            else:
                c = 1.0 / c if div else c
                scale *= c
                if mask is None:
                    after_mask *= c
            node = x
        elif is_call(node, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
            node, mask = _additive(const, node, mask)
        elif is_call(node, aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            fill = const(node.args[2])
            if fill is None:
                raise Decline("masked_fill value is not a compile-time constant")
            mask = _one_mask(mask, Mask(node.args[1], "drop", fill))
            node = node.args[0]
        elif is_call(node, aten.where):
            node, mask = _where(const, node, mask)
        else:
            raise Decline(f"scores go through {_name(node)} before the softmax")


def _split_constant(const: Constants, node: Node, allow_left: bool) -> tuple[Node, Optional[float]]:
    """(the tensor operand, the value of the constant operand or None) of a binary op."""
    a, b = node.args[0], node.args[1]
    cb = const(b)
    if cb is not None and isinstance(a, Node) and const(a) is None:
        return a, cb
    ca = const(a) if allow_left else None
    if ca is not None and isinstance(b, Node):
        return b, ca
    return a, None


def _runtime_factor(node: Node, allow_left: bool) -> tuple[Node, Node]:
    """(scores operand, factor) of a product with a one-element value known only at run time."""
    a, b = node.args[0], node.args[1]
    for x, f in ((a, b), (b, a)) if allow_left else ((a, b),):
        if not isinstance(f, Node) or not _from_scores(x) or _from_scores(f):
            continue
        fv = val(f)
        if isinstance(fv, (torch.SymFloat, torch.SymInt)):
            return x, f
        if isinstance(fv, torch.Tensor) and fv.dim() == 0 and fv.dtype.is_floating_point:
            return x, f
    raise Decline("scores scaled by a tensor that is not a scalar")


def _one_mask(old: Optional[Mask], new: Mask) -> Mask:
    if old is not None:
        raise Decline("more than one mask")
    return new


def _additive(const: Constants, node: Node, mask: Optional[Mask]) -> tuple[Node, Optional[Mask]]:
    if node.kwargs.get("alpha", 1) != 1 or (len(node.args) > 2 and node.args[2] != 1):
        raise Decline("mask added with alpha != 1")
    a, b = node.args[0], node.args[1]
    for x, other in ((a, b), (b, a)):
        if isinstance(x, Node) and const(other) is not None:
            return x, mask  # a constant shift: softmax does not change
    if is_call(node, aten.sub):
        raise Decline("a tensor is subtracted from the scores")
    sides = [x for x in (a, b) if isinstance(x, Node) and _from_scores(x)]
    if len(sides) != 1:
        raise Decline("cannot tell the scores from the mask in an add")
    x = sides[0]
    m = b if x is a else a
    mv, xv, ov = tensor_val(m), tensor_val(x), tensor_val(node)
    if mv is None or mv.dim() > 4 or not same_shape(ov.shape, xv.shape):
        raise Decline("the mask broadcasts the scores to a larger shape")
    return x, _one_mask(mask, Mask(m, "additive"))


def _where(const: Constants, node: Node, mask: Optional[Mask]) -> tuple[Node, Optional[Mask]]:
    if len(node.args) != 3:
        raise Decline("scores go through where() with one argument")
    cond, a, b = node.args
    ca, cb = const(a), const(b)
    if isinstance(a, Node) and cb is not None and _from_scores(a):
        x, m = a, Mask(cond, "keep", cb)
    elif isinstance(b, Node) and ca is not None and _from_scores(b):
        x, m = b, Mask(cond, "drop", ca)
    else:
        raise Decline("where() on the scores with a non-constant other branch")
    if not same_shape(tensor_val(node).shape, tensor_val(x).shape):
        raise Decline("the mask broadcasts the scores to a larger shape")
    return x, _one_mask(mask, m)


def _scaled_mask(mask: Optional[Mask], after: float) -> Optional[Mask]:
    """A mask with a scale applied after it: -inf stays -inf, an additive mask would change."""
    if mask is None or after == 1.0:
        return mask
    if mask.kind == "additive":
        raise Decline("an additive mask is scaled after it is added")
    if after < 0:
        raise Decline("a mask is scaled by a negative factor")
    return dataclasses.replace(mask, fill=mask.fill * after)


def _from_scores(node: Node, depth: int = 0, seen: Optional[set] = None) -> bool:
    """Does `node` come from a q @ kᵀ bmm through the elementwise steps scores may take?"""
    seen = set() if seen is None else seen
    if depth > 12 or not isinstance(node, Node) or node in seen:
        return False
    seen.add(node)
    if is_call(node, *VIEW_OPS) and is_call(node.args[0], aten.bmm.default):
        return True
    if is_call(node, *CAST_OPS, *SAME_VALUE_OPS, aten.mul, aten.div, aten.add, aten.sub,
               aten.masked_fill, aten.where):
        return any(_from_scores(x, depth + 1, seen) for x in node.args if isinstance(x, Node))
    return False


def _peel_scale(const: Constants, node: Node) -> tuple[Node, float]:
    """Strip constant multipliers/divisors (and clones) off an operand: (tensor, factor)."""
    factor = 1.0
    while True:
        if is_call(node, *SAME_VALUE_OPS):
            node = node.args[0]
            continue
        if is_call(node, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            x, c = _split_constant(const, node, allow_left=not is_call(node, aten.div))
            if c is not None and c != 0 and tensor_val(x) is not None and \
                    same_shape(tensor_val(x).shape, tensor_val(node).shape) and \
                    tensor_val(x).dtype == tensor_val(node).dtype and \
                    (is_call(node, aten.mul) or node.kwargs.get("rounding_mode") is None):
                factor *= 1.0 / c if is_call(node, aten.div) else c
                node = x
                continue
        return node, factor


def _peel_key(const: Constants, kt: Node) -> tuple[Node, float, bool]:
    """From kᵀ [B, H, D, Sk] to k [B, H, Sk, D]: (node, scale found on the way, still transposed)."""
    kt, factor = _peel_scale(const, kt)
    if is_call(kt, aten.transpose.int) and {kt.args[1] % 4, kt.args[2] % 4} == {2, 3}:
        k, more = _peel_scale(const, kt.args[0])
        return k, factor * more, False
    if is_call(kt, aten.permute.default):
        perm = [d % 4 for d in kt.args[1]]
        if perm[:2] == [0, 1] and perm[2:] == [3, 2]:
            k, more = _peel_scale(const, kt.args[0])
            return k, factor * more, False
    return kt, factor, True


def _unrepeat(node: Node) -> tuple[Node, int]:
    """``reshape(expand(x[:, :, None], [B, Hkv, g, S, D]), [B, Hkv*g, S, D])`` → (x, g).

    This is HF's ``repeat_kv`` and how ATen spells ``repeat_interleave(g, dim=1)``: head h of
    the result is head h // g of x, which is the kernel's grouped-query rule.
    """
    if not is_call(node, *VIEW_OPS):
        return node, 1
    src = node.args[0]
    if is_call(src, aten.clone.default):
        src = src.args[0]
    if not is_call(src, aten.expand.default):
        return node, 1
    unsq = src.args[0]
    while is_call(unsq, aten.slice.Tensor) and is_noop_slice(unsq):
        unsq = unsq.args[0]
    if not is_call(unsq, aten.unsqueeze.default) or unsq.args[1] % 5 != 2:
        return node, 1
    x = unsq.args[0]
    while is_call(x, aten.slice.Tensor) and is_noop_slice(x):
        x = x.args[0]
    xv, ev, ov = tensor_val(x), tensor_val(src), tensor_val(node)
    if xv is None or xv.dim() != 4 or ev.dim() != 5:
        return node, 1
    groups = ev.shape[2]
    if not isinstance(groups, int):
        return node, 1
    fine = (same_shape(ev.shape, (xv.shape[0], xv.shape[1], groups, xv.shape[2], xv.shape[3]))
            and same_shape(ov.shape, (xv.shape[0], xv.shape[1] * groups, xv.shape[2], xv.shape[3])))
    return (x, groups) if fine else (node, 1)


def _name(node: Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    return getattr(target, "__name__", str(target))


# --------------------------------------------------------------------------------------------
# Masks and lowering
# --------------------------------------------------------------------------------------------


def _keep_pred(mask: Mask, evaluator: IndexEvaluator) -> Optional[Pred]:
    """Where the mask keeps a key, as a predicate on (query, key) indices; None if not index-built."""
    value = evaluator(mask.node)
    if value is None:
        return None
    if mask.kind == "additive":
        if value.kind != "float":
            return None
        neg_like = lambda x: x <= NEG_LIKE  # noqa: E731 (includes -inf)
        if value.then == 0.0 and neg_like(value.other):
            return value.pred
        if neg_like(value.then) and value.other == 0.0:
            return negate(value.pred)
        return None
    if value.kind != "bool" or mask.fill > NEG_LIKE:
        return None
    return value.pred if mask.kind == "keep" else negate(value.pred)


def _is_causal_mask(mask: Mask, evaluator: IndexEvaluator, scores_shape: Any) -> bool:
    keep = _keep_pred(mask, evaluator)
    if keep is None:
        return False
    left = [c for c in keep if not trivially_true(c, scores_shape)]
    return (len(left) == 1 and left[0].terms == _CAUSAL.terms
            and known_eq(left[0].const, 0))


def _lower_mask(mask: Optional[Mask], builder: _Builder, const: Constants
                ) -> tuple[Optional[Node], str]:
    """The mask argument for the kernel and its kind ("none", "bool", "additive")."""
    if mask is None:
        return None, "none"
    node = mask.node
    if mask.kind == "additive":
        # where(keep, 0, -inf) is the bool mask `keep`, read without materialising floats.
        if is_call(node, aten.where) and const(node.args[1]) == 0.0 \
                and const(node.args[2]) == -math.inf \
                and tensor_val(node.args[0]).dtype == torch.bool:
            return node.args[0], "bool"
        return node, "additive"
    if tensor_val(node).dtype != torch.bool:
        raise Decline("masked_fill/where condition is not bool")
    if mask.fill == -math.inf:
        if mask.kind == "keep":
            return node, "bool"
        if is_call(node, aten.bitwise_not.default, aten.logical_not.default):
            return node.args[0], "bool"
        return builder.call(aten.bitwise_not.default, node), "bool"
    if mask.fill <= FILL_AS_ADDITIVE:
        then, other = (0.0, mask.fill) if mask.kind == "keep" else (mask.fill, 0.0)
        return builder.call(aten.where.Scalar, node, then, other), "additive"
    raise Decline(f"masked value {mask.fill} is neither -inf nor <= {FILL_AS_ADDITIVE}")


@dataclasses.dataclass
class _Env:
    """What lowering needs besides the match."""

    gm: GraphModule
    fake_mode: Any
    const: Constants
    evaluator: IndexEvaluator
    supports: Callable[..., Optional[str]]  # the kernel's `supports`
    sparse: Optional[_Sparse] = None  # set in attention="sparse" mode


def _lower(env: _Env, match: Match) -> dict[str, Any]:
    builder = _Builder(env.gm, env.fake_mode, before=match.out)
    try:
        return _lower_with(env, builder, match)
    except Decline:
        builder.rollback()
        raise


def _lower_with(env: _Env, builder: _Builder, match: Match) -> dict[str, Any]:
    k = match.k
    if match.k_transposed:
        k = builder.call(aten.transpose.int, k, -2, -1)
    q = match.q
    for factor, op in match.runtime_scale:
        q = builder.call(aten.mul.Tensor if op == "mul" else aten.div.Tensor, q, factor)
    qv = tensor_val(q)
    if qv.dtype != tensor_val(match.q).dtype or not same_shape(qv.shape, tensor_val(match.q).shape):
        raise Decline("a runtime scale changes q's dtype or shape")
    scores_shape = (qv.shape[0], qv.shape[1], qv.shape[2], tensor_val(k).shape[2])
    causal_from = "flag" if match.is_causal else None
    mask = match.mask
    if mask is not None and _is_causal_mask(mask, env.evaluator, scores_shape):
        mask, causal_from = None, causal_from or "mask"
    mask_node, mask_kind = _lower_mask(mask, builder, env.const)
    is_causal = causal_from is not None

    reason = env.supports(qv, tensor_val(k), tensor_val(match.v), tensor_val(mask_node), match.scale,
                      is_causal)
    if reason is not None:
        raise Decline(f"kernel: {reason}")
    sparse = env.sparse
    want = tensor_val(match.out)
    # The kernel can store [B, S, H, D] itself: where the replaced value was laid out so, or
    # where it is only ever transposed to that and copied (`.transpose(1, 2).contiguous()`).
    copies = _transposed_copies(match.out) if sparse is None else None
    bshd_out = sparse is None and (_laid_out_bshd(want) or copies is not None)
    if sparse is None:
        result = builder.call(torch.ops.q3n.attention.default, q, k, match.v, mask_node,
                              match.scale, is_causal, bshd_out)
    else:
        result = builder.call(torch.ops.q3n.sparse_attention.default, q, k, match.v, mask_node,
                              match.scale, is_causal, sparse.keep, sparse.min_mass,
                              sparse.graph_id, sparse.layers)
    if copies is not None:
        # Each copy held exactly the kernel's [B, S, H, D] result; the transposes before them
        # and the replaced value go dead.
        for copy in copies:
            copy.replace_all_uses_with(result)
    else:
        if bshd_out:
            # The kernel stored [B, S, H, D]; its transpose is the replaced value, strides too.
            result = builder.call(aten.transpose.int, result, 1, 2)
        else:
            result = _match_layout(builder, result, want)
        match.out.replace_all_uses_with(result)
    kv = tensor_val(k)
    extra = {} if sparse is None else {"op": SPARSE_OP, "layer": sparse.layers}
    return {
        "node": result.name,
        "replaced": match.out.name,
        "form": match.form,
        "causal": is_causal,
        "causal_from": causal_from,
        "mask": mask_kind,
        "gqa_groups": json_size(qv.shape[1] // kv.shape[1]),
        "kv_unrepeated": match.gqa_unrepeated,
        "head_dim": json_size(qv.shape[3]),
        "dtype": str(qv.dtype).replace("torch.", ""),
        "scale": match.scale,
        "runtime_scale": bool(match.runtime_scale),
        "out_layout": "bshd" if bshd_out else "bhsd",
        **extra,
    }


def _strides_match(strides: Any, want: torch.Tensor) -> bool:
    """Whether `strides` address `want`'s elements as its own strides do (size-1 dims aside)."""
    return all(known_eq(s, w) or known_eq(n, 1)
               for s, w, n in zip(strides, want.stride(), want.shape))


def _swaps_heads_and_rows(node: Node) -> bool:
    """Whether `node` is [B, H, S, D] -> [B, S, H, D] by transpose(1, 2) or permute(0, 2, 1, 3)."""
    if is_call(node, aten.transpose.int):
        return sorted(d % 4 for d in node.args[1:3]) == [1, 2]
    if is_call(node, aten.permute.default):
        return [d % 4 for d in node.args[1]] == [0, 2, 1, 3]
    return False


def _transposed_copies(out: Node) -> Optional[list[Node]]:
    """The contiguous copies of `out`'s [B, S, H, D] transpose, when those copies are all that
    reads `out` (``attn.transpose(1, 2).contiguous()``, as every model here writes it); else
    None. The kernel's ``bshd_out`` result then stands for each copy."""
    copies: list[Node] = []
    if not out.users:
        return None
    for t in out.users:
        if not _swaps_heads_and_rows(t) or not t.users:
            return None
        for c in t.users:
            if not (is_call(c, aten.clone.default)
                    and c.kwargs.get("memory_format") == torch.contiguous_format):
                return None
            copies.append(c)
    return copies


def _laid_out_bshd(want: torch.Tensor) -> bool:
    """True when the replaced [B, H, S, D] value is stored as [B, S, H, D] (CUDA SDPA's fused
    forms) and not also contiguous (one head or one query row): the kernel then stores that
    layout itself instead of its result being copied into it."""
    if want.dim() != 4:
        return False
    B, H, S, D = want.shape
    return (_strides_match((S * H * D, D, H * D, 1), want)
            and not _strides_match((H * S * D, S * D, D, 1), want))


def _match_layout(builder: _Builder, node: Node, want: torch.Tensor) -> Node:
    """Give an op's contiguous result the strides the replaced value had, by a copy where they
    differ (the sparse op, which has no ``bshd_out``; the dense op stores that layout itself).

    Views after the replaced value were traced against its strides; the fused CUDA SDPA forms
    return [B, H, S, D] laid out as [B, S, H, D].
    """
    got = tensor_val(node)
    if _strides_match(got.stride(), want):
        return node
    B, H, S, D = want.shape
    if _strides_match((S * H * D, D, H * D, 1), want):
        t = builder.call(aten.transpose.int, node, 1, 2)
        c = builder.call(aten.clone.default, t, memory_format=torch.contiguous_format)
        return builder.call(aten.transpose.int, c, 1, 2)
    raise Decline("the replaced value's memory layout cannot be reproduced")
