"""The `norm_linear` pass: LayerNorm/RMSNorm → following linear(s) as q3n::norm_linear (γ/β folded).

What it finds, on the post-AOT functional ATen graph:

- norms: ``native_layer_norm`` / ``layer_norm`` (with or without weight and bias; output 0 only),
  ``rms_norm`` / ``_fused_rms_norm``, and RMSNorm written out as Hugging Face writes it
  (``x.to(float32)``; ``pow(x, 2)`` or ``x * x``; ``mean(-1, keepdim=True)``; ``+ eps`` with eps a
  number or a compile-time 0-d tensor (``dynamic=True``); ``rsqrt``, ``1/sqrt`` or ``/ sqrt``;
  ``x * that``). After the norm an affine tail is taken along: casts, one multiplication by a
  constant (``weight * x``, the zero-centred ``x * (1 + weight.float())`` of Qwen3-Next/Gemma,
  the cast before or after it) and one addition of a constant (a bias);
- consumers: linears that read the normalised tensor through views (rows kept), casts and
  copies: ``mm(x2d, W^T)`` / ``addmm(b, x2d, W^T)`` whose weight (and bias) are compile-time
  constants (parameters, buffers, graph constants, or expressions of them).

What it does: for each norm, its linears that ``quant_config`` does not quantize (grouped by output
dtype, at most
``kernels.norm_linear.MAX_OUTPUTS`` per call) become one ``q3n::norm_linear`` call on the norm's
input ``x``, with W' = W·diag(γ), b' = W·β + b and rowsum(W') (LayerNorm) computed once, here, from
the real weights (float64, row chunks; rounded once to the linear's dtype) and stored on the
GraphModule as buffers read through ``get_attr``; the source weights are frozen
(``ctx.freeze``). Siblings (q/k/v) get one output each (``splits``); a pair whose outputs meet in
``silu(gate) * up`` uses the ``silu_gate`` epilogue (the product is the op's output); a single
linear whose output is only added to another tensor of its shape takes that add as its
``residual`` epilogue. If anything else still reads the normalised tensor (BERT's post-norm
residual), the original norm stays for it and is computed once, as before.

Guarantees: no shape guard is added (sizes are compared with ``statically_known_true``;
new views use ``-1``); every created node has ``meta["val"]``, computed under ``ctx.fake_mode``;
a norm is rewritten only when ``kernels.norm_linear.supports`` accepts the call. What was found
but left is counted in ``declined`` by reason; norms that feed no linear (Qwen3's q_norm/k_norm)
are not candidates and are listed in ``detail["norms_without_linear"]``.

Statistics precision: ``quant_config["norm_layers"]["dtype"]`` is read. Every design of the
kernel accumulates the statistics in float32 (in the GEMM's loop, or in a statistics kernel that
reads x once; they are a few bytes per row either way, so a half-precision norm would save
nothing); a request for "float16"/"bfloat16" is therefore recorded in ``detail["norm_dtype"]`` as
not applied rather than emulated by rounding the statistics.

Which kernel design runs is decided per call by the number of rows (``kernels.norm_linear.
DISPATCH``), not here: one compiled graph serves decode and prefill; ``detail["dispatch"]`` copies
the table.

Quantization (composing with the quantize pass; this pass runs first). For each linear this pass
asks the quantize pass's own candidate test, classification and ``quant_config`` resolution
(:func:`_quantize_plan`) whether it will be quantized:

- linears ``quant_config`` leaves alone fuse as above (``q3n::norm_linear``); each call's op
  records their layer paths and classes (``meta["q3n_norm_linear"]["layers"]``), so the quantize
  pass reports them exactly as it reports unfused linears it leaves alone (e.g. an ``lm_head``);
- linears it quantizes are folded the same way (W' = W·diag(γ), b' = W·β + b, float64, rounded
  once to the linear's dtype) but not fused into a GEMM: this pass emits
  ``x_hat = q3n::normalize(x, eps, kind, dtype)`` (x read once, the statistics in float32, x_hat
  written once; one per norm and dtype, shared by the siblings) and, per linear, a float
  ``mm``/``addmm`` of x_hat with W' (buffers) marked ``meta["q3n_norm_quant"]`` (:func:
  `_rewrite_quantized`). The quantize pass owns everything after that: it takes the marked
  linears as candidates, quantizes W' with its formats, calibration (on x_hat: the rows the
  quantized linear really receives; :func:`~q3n_compile.quant.calibrate` statistics, recorded at
  the unfused linear's input γ·x_hat + β, are mapped to x_hat) and packing, reports each layer
  with its relative output error, and for quantized activations replaces ``normalize`` + the
  activation quantizer by one ``q3n::norm_act_quant`` (statistics, normalisation and the codes,
  per token or per token and channel group, in one pass over x) feeding ``q3n::qlinear_codes``. Weight-only formats keep
  ``normalize`` and run ``q3n::qlinear`` on x_hat.

So this pass counts the fusion (``matched``/``rewritten`` per norm; the call's entry says
``"quantized": True``), and the quantize pass counts the quantized layers. If quantize leaves a
marked linear (a format the layer cannot take, the pass rolled back), the graph is still exact:
the normalise kernel and a float linear on the folded weight. A weight already freed by
:func:`~q3n_compile.release_quantized_weights` is not folded (reason ``RELEASED_REASON``): the
quantize pass uses the packed form it made before. The quantize pass does not let
``release_quantized_weights`` free the weights folded here (the fold is redone from W on every
compile); it says so in its return value.

Memory: W' is a new tensor; the module still holds W, so each fused linear's weight exists twice
on the device (``detail["folded_bytes"]`` says how much a graph added). The graphs of one model
share their folds (cached weakly on the source parameter, under the sources' identities and
versions and a digest of gamma, beta and the biases; ``detail["fold_shared_bytes"]`` counts what
a graph took from another), so a prefill graph and a decode graph hold one W' between them. The folded weights of linears
left to quantize (``detail["folded_for_quantize_bytes"]``) are dropped by the quantize pass once
it has packed them.
"""

from __future__ import annotations

import hashlib
import operator
import weakref
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from .base import PassContext, PassStats
from .matching import CAST_OPS, SAME_VALUE_OPS, VIEW_OPS, add_node, bind_args, is_call, known_eq

aten = torch.ops.aten

_ARITH = (aten.add, aten.sub, aten.mul, aten.div, aten.rsub, aten.neg, aten.reciprocal)
_CONST_VIEWS = (aten.t, aten.transpose, aten.permute, aten.unsqueeze, aten.squeeze, aten.expand,
                aten.view, aten._unsafe_view, aten.reshape)
_HALF_REQUESTS = ("float16", "fp16", "half", "bfloat16", "bf16")
# Rows of a weight folded at a time: bounds the float64 temporaries (8192 x K x 8 bytes).
_FOLD_CHUNK = 8192


class _Decline(Exception):
    """A candidate that cannot be rewritten; the message is the reason counted in the report."""


# ------------------------------------------------------------------------------------------------
# Compile-time constants
# ------------------------------------------------------------------------------------------------


class _Constants:
    """Evaluates nodes built only from parameters, buffers, graph constants and numbers.

    Returns the real value (a tensor, or a Python number) or None; remembers which placeholders
    each value came from, so a fold can freeze exactly those.
    """

    def __init__(self, gm: GraphModule, ctx: PassContext):
        self.gm, self.ctx = gm, ctx
        self.memo: dict[Node, Any] = {}
        self.sources: dict[Node, set[Node]] = {}

    def __call__(self, x: Any) -> Any:
        if isinstance(x, (bool, int, float)) or x is None:
            return x
        if not isinstance(x, Node):
            return None
        if x not in self.memo:
            self.memo[x] = self._eval(x)
        return self.memo[x]

    def placeholders(self, x: Any) -> set[Node]:
        return self.sources.get(x, set()) if isinstance(x, Node) else set()

    def _eval(self, node: Node) -> Any:
        if node.op == "placeholder":
            value = self.ctx.static_values.get(node.name)
            if value is not None:
                self.sources[node] = {node}
            return value
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part, None)
            return obj if isinstance(obj, torch.Tensor) else None
        if node.op != "call_function":
            return None
        ok = is_call(node, *CAST_OPS, *SAME_VALUE_OPS, *_ARITH, *_CONST_VIEWS)
        if not ok:
            return None
        values: dict[Node, Any] = {}
        for arg in node.all_input_nodes:
            v = self(arg)
            if v is None or not isinstance(v, (torch.Tensor, int, float)):
                return None
            values[arg] = v
        sources = set().union(*(self.placeholders(a) for a in node.all_input_nodes))
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: values[a])
        try:
            value = node.target(*args, **kwargs)
        except Exception:  # e.g. a view whose size is symbolic
            return None
        self.sources[node] = sources
        return value


# ------------------------------------------------------------------------------------------------
# Recognising norms
# ------------------------------------------------------------------------------------------------


class _Norm:
    def __init__(self, kind: str, form: str, x: Node, out: Node, anchor: Node):
        self.kind, self.form, self.x, self.out, self.anchor = kind, form, x, out, anchor
        self.eps: Optional[float] = None
        self.gamma: list[Any] = []  # constant nodes/values multiplied in, in order
        self.beta: list[Any] = []   # constant nodes/values added after the multiplications
        self.decline: Optional[str] = None


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, Node) else None


def _is_float_cast(node: Node) -> bool:
    if not is_call(node, *CAST_OPS):
        return False
    src, out = _val(node.args[0]), _val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    if is_call(node, aten._to_copy) and set(node.kwargs) - {"dtype", "layout", "device", "memory_format"}:
        return False
    return src.dtype.is_floating_point and out.dtype.is_floating_point and src.device == out.device


def _widens(node: Node) -> bool:
    """A cast that loses nothing: half -> float32, anything -> float64, or no change."""
    if not _is_float_cast(node):
        return False
    src, dst = _val(node.args[0]).dtype, _val(node).dtype
    return src == dst or dst == torch.float64 or (
        dst == torch.float32 and src in (torch.float16, torch.bfloat16))


def _strip_widening(node: Any) -> Any:
    while isinstance(node, Node) and _widens(node):
        node = node.args[0]
    return node


def _last_dim_only(dims: Any, rank: int) -> bool:
    if not isinstance(dims, (list, tuple)) or len(dims) != 1 or not isinstance(dims[0], int):
        return False
    return dims[0] in (-1, rank - 1)


def _eps_value(arg: Any, consts: _Constants) -> Optional[float]:
    v = consts(arg)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.reshape(()).item())
    return None


def _square_base(node: Any) -> Any:
    """x for ``pow(x, 2)`` or ``x * x``, else None."""
    if is_call(node, aten.pow) and len(node.args) > 1 and node.args[1] == 2:
        return node.args[0]
    if is_call(node, aten.mul) and len(node.args) > 1 and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _match_rms_written_out(mean: Node, consts: _Constants) -> Optional[_Norm]:
    """mean(x^2) + eps → rsqrt → x * r (and the 1/sqrt and / sqrt spellings)."""
    if not is_call(mean, aten.mean):
        return None
    sq = _square_base(mean.args[0])
    if sq is None or len(mean.users) != 1:
        return None
    add = next(iter(mean.users))
    if not is_call(add, aten.add) or len(add.users) != 1:
        return None
    if bind_args(add).get("alpha", 1) != 1:
        return None
    eps_arg = add.args[1] if add.args[0] is mean else add.args[0]
    inv = next(iter(add.users))
    scaled: Optional[Node] = None
    if is_call(inv, aten.rsqrt) or (is_call(inv, aten.pow) and inv.args[1] == -0.5):
        if len(inv.users) == 1 and is_call(next(iter(inv.users)), aten.mul):
            scaled = next(iter(inv.users))
            other = scaled.args[0] if scaled.args[1] is inv else scaled.args[1]
    elif is_call(inv, aten.sqrt) and len(inv.users) == 1:
        nxt = next(iter(inv.users))
        if is_call(nxt, aten.reciprocal) and len(nxt.users) == 1 and is_call(next(iter(nxt.users)), aten.mul):
            scaled = next(iter(nxt.users))
            other = scaled.args[0] if scaled.args[1] is nxt else scaled.args[1]
        elif is_call(nxt, aten.div) and nxt.args[1] is inv:
            scaled, other = nxt, nxt.args[0]
    if scaled is None:
        return None
    base = _strip_widening(sq)
    if _strip_widening(other) is not base or not isinstance(base, Node):
        return None
    norm = _Norm("rmsnorm", "rmsnorm written out", base, scaled, mean)
    xval = _val(base)
    dims = mean.args[1] if len(mean.args) > 1 else None
    keepdim = bind_args(mean).get("keepdim", False)
    if not isinstance(xval, torch.Tensor) or not _last_dim_only(dims, xval.dim()) or not keepdim:
        norm.decline = "normalised dim is not the last"
        return norm
    norm.eps = _eps_value(eps_arg, consts)
    if norm.eps is None:
        norm.decline = "eps is not a constant"
    return norm


def _getitem_users(node: Node) -> dict[int, Node]:
    return {u.args[1]: u for u in node.users if u.target is operator.getitem}


def _match_norm_op(node: Node, consts: _Constants) -> Optional[_Norm]:
    if is_call(node, aten.native_layer_norm, aten.layer_norm):
        kind, form = "layernorm", "layer_norm"
        b = bind_args(node)
        x, shape, w, beta, eps = b["input"], b["normalized_shape"], b["weight"], b["bias"], b["eps"]
    elif is_call(node, aten.rms_norm) or (
            hasattr(aten, "_fused_rms_norm") and is_call(node, aten._fused_rms_norm)):
        kind, form = "rmsnorm", "rms_norm"
        b = bind_args(node)
        x, shape, w, beta, eps = b["input"], b["normalized_shape"], b["weight"], None, b["eps"]
    else:
        return None
    multi = is_call(node, aten.native_layer_norm) or (
        hasattr(aten, "_fused_rms_norm") and is_call(node, aten._fused_rms_norm))
    if multi:
        items = _getitem_users(node)
        if 0 not in items:
            return None
        out = items[0]
    else:
        out = node
    base = _strip_widening(x)
    norm = _Norm(kind, form, base, out, node)
    if multi and set(_getitem_users(node)) - {0}:
        norm.decline = "the norm's mean/rstd outputs are used"
        return norm
    xval = _val(x)
    if not isinstance(xval, torch.Tensor) or len(shape) != 1 or not known_eq(xval.shape[-1], shape[0]):
        norm.decline = "normalised dims are not just the last"
        return norm
    if eps is None:  # rms_norm's default
        eps = torch.finfo(xval.dtype).eps
    norm.eps = _eps_value(eps, consts)
    if norm.eps is None:
        norm.decline = "eps is not a constant"
        return norm
    if w is not None:
        norm.gamma.append(w)
    if beta is not None:
        norm.beta.append(beta)
    return norm


def _broadcasts_to_last(value: Any, k: int) -> bool:
    """A constant that varies at most along the last dim of a [..., k] tensor."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        return False
    shape = list(value.shape)
    return all(s == 1 for s in shape[:-1]) and (not shape or shape[-1] in (1, k))


def _take_affine_tail(norm: _Norm, consts: _Constants, k: int) -> None:
    """Extend `norm.out` over casts, one constant multiplication and one constant addition."""
    cur = norm.out
    took_mul = took_add = False
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if _is_float_cast(user):
            cur = user
            continue
        if is_call(user, aten.mul) and not took_mul and not took_add and len(user.args) == 2:
            other = user.args[1] if user.args[0] is cur else user.args[0]
            if other is not cur and _broadcasts_to_last(consts(other), k):
                norm.gamma.append(other)
                took_mul = True
                cur = user
                continue
        if (is_call(user, aten.add) and not took_add and len(user.args) == 2
                and bind_args(user).get("alpha", 1) == 1):
            other = user.args[1] if user.args[0] is cur else user.args[0]
            if other is not cur and _broadcasts_to_last(consts(other), k):
                norm.beta.append(other)
                took_add = True
                cur = user
                continue
        break
    norm.out = cur


def _is_anchor(node: Node) -> bool:
    return is_call(node, aten.native_layer_norm, aten.layer_norm, aten.rms_norm, aten.mean) or (
        hasattr(aten, "_fused_rms_norm") and is_call(node, aten._fused_rms_norm))


def _match(node: Node, consts: _Constants) -> Optional[_Norm]:
    """The norm anchored at `node` (its norm op, or the mean of a written-out RMSNorm)."""
    norm = _match_norm_op(node, consts) or _match_rms_written_out(node, consts)
    if norm is None or not isinstance(_val(norm.x), torch.Tensor):
        return None
    if norm.decline is None:
        k = _val(norm.x).shape[-1]
        for g in norm.gamma + norm.beta:
            if not _broadcasts_to_last(consts(g), k):
                norm.decline = ("norm weight is not a constant" if g in norm.gamma
                                else "norm bias is not a constant")
                break
    if norm.decline is None:
        _take_affine_tail(norm, consts, _val(norm.x).shape[-1])
    return norm


# ------------------------------------------------------------------------------------------------
# Consumers
# ------------------------------------------------------------------------------------------------


class _Linear:
    def __init__(self, node: Node, mat1: Node, mat2: Any, bias: Any):
        self.node, self.mat1, self.mat2, self.bias = node, mat1, mat2, bias
        self.n = _val(node).shape[-1]
        self.dtype = _val(node).dtype


def _passes_rows(node: Node, k: int) -> bool:
    """A user that hands on the same rows of K values: copies, float casts, row-keeping views."""
    if is_call(node, *SAME_VALUE_OPS) or _is_float_cast(node):
        return True
    if is_call(node, *VIEW_OPS):
        out = _val(node)
        return isinstance(out, torch.Tensor) and out.dim() >= 1 and known_eq(out.shape[-1], k)
    return False


def _consumers(norm: _Norm, k: int, order: dict[Node, int]) -> tuple[list[_Linear], list[Node], set[Node]]:
    """Linears reading the normalised tensor (in graph order), the other readers, and the
    pass-through nodes."""
    linears: list[_Linear] = []
    others: list[Node] = []
    through: set[Node] = set()
    stack = [norm.out]
    while stack:
        cur = stack.pop()
        for user in cur.users:
            if _passes_rows(user, k):
                if user not in through:
                    through.add(user)
                    stack.append(user)
                continue
            two_d = isinstance(_val(cur), torch.Tensor) and _val(cur).dim() == 2
            if is_call(user, aten.mm) and user.args[0] is cur and user.args[1] is not cur and two_d:
                linears.append(_Linear(user, cur, user.args[1], None))
            elif is_call(user, aten.addmm) and user.args[1] is cur and user.args[2] is not cur and two_d:
                linears.append(_Linear(user, cur, user.args[2], user.args[0]))
            else:
                others.append(user)
    linears.sort(key=lambda lin: order[lin.node])
    return linears, others, through


def _linear_reason(lin: _Linear, consts: _Constants, k: int) -> Optional[str]:
    if is_call(lin.node, aten.addmm):
        b = bind_args(lin.node)
        if b.get("beta", 1) != 1 or b.get("alpha", 1) != 1:
            return "addmm with beta/alpha != 1"
    w = consts(lin.mat2)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or tuple(w.shape) != (k, lin.n):
        return "linear weight is not a constant"
    if lin.bias is not None:
        b = consts(lin.bias)
        if not isinstance(b, torch.Tensor) or not b.dtype.is_floating_point or (
                b.numel() not in (1, lin.n) or any(s != 1 for s in b.shape[:-1])):
            return "linear bias is not a constant"
    return None


RELEASED_REASON = ("linear weight was freed by release_quantized_weights(): it cannot be folded "
                   "(the quantize pass uses the packed form made before)")


def _released_reason(lin: _Linear, consts: _Constants, ctx: PassContext) -> Optional[str]:
    try:
        from ..quant.release import is_released
    except Exception:  # the quantize pass's modules changed or are absent
        return None
    for ph in consts.placeholders(lin.mat2) | consts.placeholders(lin.bias):
        value = ctx.static_values.get(ph.name)
        if value is not None and is_released(value):
            return RELEASED_REASON
    return None


def _single_user(node: Node) -> Optional[Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _through_views(node: Node) -> Node:
    """Follow single-user views from a linear's output to what its consumer reads."""
    while True:
        user = _single_user(node)
        if user is None or not is_call(user, *VIEW_OPS) or user.args[0] is not node:
            return node
        node = user


def _silu_node(t: Node) -> Optional[Node]:
    """The node computing silu(t), if that is t's only use: aten.silu(t) or t * sigmoid(t)."""
    users = list(t.users)
    if len(users) == 1 and is_call(users[0], aten.silu):
        return users[0]
    if len(users) == 2:
        sig = next((u for u in users if is_call(u, aten.sigmoid)), None)
        mul = next((u for u in users if is_call(u, aten.mul)), None)
        if sig is not None and mul is not None and _single_user(sig) is mul and set(mul.args) == {t, sig}:
            return mul
    return None


def _same_shape(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim()
            and all(known_eq(x, y) for x, y in zip(a.shape, b.shape)))


def _silu_gate(gate: _Linear, up: _Linear) -> Optional[Node]:
    """The `silu(gate) * up` node when the two linears meet only there."""
    tg, tu = _through_views(gate.node), _through_views(up.node)
    silu = _silu_node(tg)
    if silu is None or gate.n != up.n:
        return None
    prod = _single_user(silu)
    if prod is None or not is_call(prod, aten.mul) or set(prod.args) != {silu, tu}:
        return None
    if _single_user(tu) is not prod or tg is tu:
        return None
    if not (_same_shape(_val(prod), _val(tg)) and _same_shape(_val(tg), _val(tu))):
        return None
    if _val(prod).dtype != gate.dtype:
        return None
    return prod


def _residual_add(lin: _Linear, order: dict[Node, int]) -> Optional[tuple[Node, Node]]:
    """(add node, residual) when the linear's output is only added to a same-shaped tensor."""
    t = _through_views(lin.node)
    add = _single_user(t)
    if add is None or not is_call(add, aten.add) or len(add.args) != 2 or add.kwargs:
        return None
    if add.target is not aten.add.Tensor:
        return None
    other = add.args[1] if add.args[0] is t else add.args[0]
    if not isinstance(other, Node) or other is t:
        return None
    ov, tv, av = _val(other), _val(t), _val(add)
    if not (_same_shape(ov, tv) and _same_shape(av, tv)) or av.dtype != tv.dtype:
        return None
    if not ov.dtype.is_floating_point or order.get(other, 1 << 60) >= order[lin.node]:
        return None
    return add, other


# ------------------------------------------------------------------------------------------------
# Folding and rewriting
# ------------------------------------------------------------------------------------------------


def _vector(values: list[Any], consts: _Constants, k: int, device: torch.device,
            start: float) -> Optional[torch.Tensor]:
    """The product (start=1) or sum (start=0) of constants broadcast to [k], in float64."""
    if not values:
        return None
    out = torch.full((k,), start, dtype=torch.float64, device=device)
    for v in values:
        real = consts(v)
        t = torch.as_tensor(real, dtype=torch.float64, device=device) if not isinstance(
            real, torch.Tensor) else real.to(device=device, dtype=torch.float64)
        t = t.reshape(-1).expand(k) if t.numel() in (0, 1) else t.reshape(k)
        out = out * t if start == 1.0 else out + t
    return out


def _fold(lins: list[_Linear], gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
          consts: _Constants, kind: str, k: int, dtype: torch.dtype):
    """(W' [N, K] in `dtype`, b' [N] fp32 or None, rowsum(W') [N] fp32 or None)."""
    mats = [consts(lin.mat2) for lin in lins]
    device = mats[0].device
    n_total = sum(lin.n for lin in lins)
    w_out = torch.empty((n_total, k), dtype=dtype, device=device)
    rowsum = torch.empty(n_total, dtype=torch.float64, device=device)
    has_bias = beta is not None or any(lin.bias is not None for lin in lins)
    bias = torch.zeros(n_total, dtype=torch.float64, device=device) if has_bias else None
    row = 0
    for lin, mat in zip(lins, mats):
        w = mat.t()  # [N_i, K]
        for start in range(0, lin.n, _FOLD_CHUNK):
            stop = min(lin.n, start + _FOLD_CHUNK)
            chunk = w[start:stop].to(torch.float64)
            if beta is not None:
                bias[row + start: row + stop] += chunk @ beta
            if gamma is not None:
                chunk = chunk * gamma
            rounded = chunk.to(dtype)
            w_out[row + start: row + stop] = rounded
            rowsum[row + start: row + stop] = rounded.to(torch.float64).sum(1)
        if lin.bias is not None:
            b = consts(lin.bias)
            bias[row: row + lin.n] += b.to(device=device, dtype=torch.float64).reshape(-1).expand(lin.n)
        row += lin.n
    return (w_out, None if bias is None else bias.float(),
            rowsum.float() if kind == "layernorm" else None)


# The folds of one model's graphs (its prefill graph, its decode graph, the recompiles for new
# shapes) are shared: before, each graph registered a W' of its own, so the fused linears'
# weights existed once in the module and once per graph (qwen3 "bench", prefill + decode under
# CUDA graphs, three graphs: peak memory +60%, s25run8). A fold is cached on the parameter its
# first matrix views, under the identities and versions of the matrices' source parameters and
# the digest of everything else it reads (gamma, beta, the biases, kind, dtype); the cache holds
# the folds weakly, so a fold lives as long as some compiled graph holds it.
_FOLDS_ATTR = "_q3n_norm_linear_folds"


class _FoldCache(dict):
    """The folds cached on a parameter. It holds weak references, which cannot be pickled, so it
    pickles (``torch.save(model)``) and deep-copies as an empty plain dict: a copy or a
    reloaded model folds anew."""

    def __reduce__(self):
        return (dict, ())

    def __deepcopy__(self, memo):
        return {}


def _digest(values: list[Any]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for v in values:
        if isinstance(v, torch.Tensor):
            h.update(f"{v.dtype}{tuple(v.shape)}".encode())
            h.update(v.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                     .numpy().tobytes() if v.numel() else b"")
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


def _fold_source(mat: Any, sources: set[Node], ctx: PassContext) -> Optional[torch.Tensor]:
    """The parameter (a placeholder's static value) whose storage `mat` views, or None."""
    if not isinstance(mat, torch.Tensor):
        return None
    for node in sources:
        value = ctx.static_values.get(node.name)
        if (isinstance(value, torch.Tensor) and value.device == mat.device
                and value.untyped_storage().data_ptr() == mat.untyped_storage().data_ptr()):
            return value
    return None


def _shared_fold(lins: list[_Linear], gamma: Optional[torch.Tensor],
                 beta: Optional[torch.Tensor], consts: _Constants, kind: str, k: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor],
                                              Optional[torch.Tensor], bool]:
    """:func:`_fold`'s (W', b', rowsum), and whether another graph of the model made them (then
    they are the same tensors). Uncached where a matrix is not a view of a parameter."""
    mats = [consts(lin.mat2) for lin in lins]
    owners = [_fold_source(m, consts.placeholders(lin.mat2), consts.ctx)
              for m, lin in zip(mats, lins)]
    if any(o is None for o in owners):
        return (*_fold(lins, gamma, beta, consts, kind, k, dtype), False)
    key = (kind, str(dtype), k,
           tuple((m.untyped_storage().data_ptr(), m.storage_offset(), tuple(m.shape),
                  tuple(m.stride()), str(m.dtype), str(m.device), o._version)
                 for m, o in zip(mats, owners)),
           _digest([gamma, beta] + [consts(lin.bias) for lin in lins]))
    cache = getattr(owners[0], _FOLDS_ATTR, None)
    if not isinstance(cache, _FoldCache):  # none yet, or the empty dict a copy or load left
        cache = _FoldCache()
        setattr(owners[0], _FOLDS_ATTR, cache)
    for stale in [key_ for key_, (refs, _) in cache.items() if any(r() is None for r in refs)]:
        del cache[stale]
    hit = cache.get(key)
    if hit is not None:
        return (*(None if r is None else r() for r in hit[1]), True)
    w, b, rs = _fold(lins, gamma, beta, consts, kind, k, dtype)
    # The owners' liveness guards the storage addresses in the key (a freed parameter's address
    # may come back as another's).
    refs = [weakref.ref(o) for o in owners] + [weakref.ref(w)] + [
        weakref.ref(t) for t in (b, rs) if t is not None]
    cache[key] = (refs, tuple(None if t is None else weakref.ref(t) for t in (w, b, rs)))
    return w, b, rs, False


def _register(gm: GraphModule, fake_mode: Any, tensor: torch.Tensor, stem: str, before: Node) -> Node:
    i = 0
    while hasattr(gm, f"{stem}_{i}"):
        i += 1
    name = f"{stem}_{i}"
    gm.register_buffer(name, tensor)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
    return node


def _module_name(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    for prefix in ("L['self'].", "L['self']", "self."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path or node.name


def _erase_dead(gm: GraphModule, seeds: list[Node]) -> None:
    """Erase `seeds` and, transitively, the inputs the rewrite left without users."""
    stack = list(seeds)
    while stack:
        node = stack.pop()
        if getattr(node, "_erased", False) or node.op != "call_function" or node.users:
            continue
        if node.is_impure():
            continue
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        stack.extend(inputs)


def _norm_dtype(ctx: PassContext) -> dict[str, Any]:
    qc = ctx.config.quant_config or {}
    layer = qc.get("norm_layers") if isinstance(qc, dict) or hasattr(qc, "get") else None
    requested = layer.get("dtype") if hasattr(layer, "get") else None
    info: dict[str, Any] = {"requested": requested, "applied": "float32"}
    if requested in (None, "float32", "fp32"):
        return info
    if requested in _HALF_REQUESTS:
        info["note"] = ("statistics are accumulated in float32 by every kernel design (a few "
                        "bytes per row: half precision would save nothing)")
    else:
        info["note"] = f"unknown norm dtype {requested!r}; statistics stay float32"
    return info


def _rewrite_group(gm: GraphModule, ctx: PassContext, fake_mode: Any, norm: _Norm,
                   lins: list[_Linear], consts: _Constants, gamma, beta, k: int,
                   order: dict[Node, int], infos: Optional[dict[Node, dict]] = None
                   ) -> dict[str, Any]:
    """Replace `lins` (one dtype, at most MAX_OUTPUTS) by one q3n::norm_linear call."""
    xval = _val(norm.x)
    lead = list(xval.shape[:-1])
    dtype = lins[0].dtype
    epilogue, residual, final = "none", None, None
    if len(lins) == 2:
        for gate, up in ((lins[0], lins[1]), (lins[1], lins[0])):
            prod = _silu_gate(gate, up)
            if prod is not None and _lead_ok(_val(prod), lead):
                epilogue, lins, final = "silu_gate", [gate, up], prod
                break
    if len(lins) == 1 and epilogue == "none":
        found = _residual_add(lins[0], order)
        if found is not None and _lead_ok(_val(found[0]), lead):
            final, residual = found
    splits = [lin.n for lin in lins] if epilogue == "none" and len(lins) > 1 else None

    w, b, rs, shared = _shared_fold(lins, gamma, beta, consts, norm.kind, k, dtype)
    reason = _kernel().supports(xval, w, b, rs, norm.eps, norm.kind, _val(residual), epilogue, splits)
    if reason is not None:
        raise _Decline(reason)
    replaced = [final] if final is not None else [lin.node for lin in lins]
    first = min(replaced, key=lambda n: order[n])
    w_node = _register(gm, fake_mode, w, "_q3n_norm_linear_weight", first)
    b_node = None if b is None else _register(gm, fake_mode, b, "_q3n_norm_linear_bias", first)
    rs_node = None if rs is None else _register(gm, fake_mode, rs, "_q3n_norm_linear_rowsum", first)
    op = add_node(gm, fake_mode, torch.ops.q3n.norm_linear.default,
                  (norm.x, w_node, b_node, rs_node, float(norm.eps), norm.kind, residual,
                   epilogue, splits), before=first, meta_from=lins[0].node)
    op.meta["q3n_norm_linear"] = {
        "norm": _module_name(norm.anchor), "linears": [_module_name(lin.node) for lin in lins],
        "kind": norm.kind, "epilogue": epilogue, "residual": residual is not None,
        # What the quantize pass reports for these linears (quant_config leaves them alone).
        "layers": [{key: infos[lin.node][key] for key in ("layer", "class", "classified_by")}
                   for lin in lins if infos and lin.node in infos],
    }
    seeds = []
    targets = [final] if final is not None else [lin.node for lin in lins]
    for i, target in enumerate(targets):
        with gm.graph.inserting_before(target):
            item = gm.graph.call_function(operator.getitem, (op, i))
        item.meta["val"] = op.meta["val"][i]
        new = item
        if not _lead_ok(_val(target), lead):  # a 2-D linear output of a >2-D input: flatten
            new = add_node(gm, fake_mode, aten.view.default, (item, [-1, _val(target).shape[-1]]),
                           before=target, meta_from=target)
        target.replace_all_uses_with(new)
        seeds.append(target)
    for placeholder in set().union(*(consts.placeholders(v) for v in
                                     [lin.mat2 for lin in lins] + [lin.bias for lin in lins]
                                     + norm.gamma + norm.beta)):
        ctx.freeze(placeholder)
    for lin in lins:
        seeds.append(lin.node)
    _erase_dead(gm, seeds)
    return {
        "linears": [_module_name(lin.node) for lin in lins],
        "N": [lin.n for lin in lins],
        "epilogue": epilogue,
        "residual": residual is not None,
        "dtype": str(dtype).replace("torch.", ""),
        # Bytes this graph added; a fold another graph of the model made adds none.
        "folded_bytes": 0 if shared else _nbytes(w, b, rs),
        "fold_shared_bytes": _nbytes(w, b, rs) if shared else 0,
    }


def _nbytes(*tensors: Optional[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _lead_ok(val: Any, lead: list[Any]) -> bool:
    """`val` is [*lead, n]: the op's output can stand for it without a view."""
    return isinstance(val, torch.Tensor) and val.dim() == len(lead) + 1 and all(
        known_eq(a, b) for a, b in zip(val.shape[:-1], lead))


def _quantize_plan(gm: GraphModule, ctx: PassContext, detail: dict[str, Any]):
    """A function ``(linear) -> dict or None``: what the quantize pass will make of that linear.

    None when the quantize pass would not see it as a candidate (no ``quant_config``, a weight
    that is not ``t(parameter)``); else ``{"layer", "class", "classified_by", "quantize",
    "weight", "bias"}`` with ``quantize`` True when ``quant_config`` gives the layer a format
    (then this pass folds the norm into it and leaves it to quantize: see :func:`_rewrite_quantized`)
    and ``weight``/``bias`` the placeholders of its parameters. Uses the quantize pass's own
    candidate test, classification and config resolution, on the graph as this pass found it; if
    they cannot be used, nothing is planned for quantization and ``detail["quantize_check"]`` says
    why (the linears then fuse as unquantized ones and the quantize pass reports them).
    """
    if not ctx.config.quant_config:
        return lambda lin: None
    try:
        from ..quant.classify import StructureClassifier, classify, module_path
        from ..quant.config import parse_quant_config
        from .quantize import _linear_parts

        qc = parse_quant_config(ctx.config.quant_config)
        structure = StructureClassifier(gm)
    except Exception as err:  # the quantize pass's modules changed or are absent
        detail["quantize_check"] = f"not applied: {type(err).__name__}: {err}"
        return lambda lin: None

    def plan(lin: _Linear) -> Optional[dict[str, Any]]:
        parts = _linear_parts(lin.node)
        if parts is None or parts[1].name not in ctx.static_values:
            return None
        x, w_ph, bias = parts
        try:
            cls, how, _ = classify(lin.node, x, structure)
            path = module_path(lin.node) or f"<{lin.node.name}>"
            fmt, _ = qc.resolve(path, cls)
        except Exception:
            return None
        return {"layer": path, "class": cls, "classified_by": how, "quantize": fmt is not None,
                "weight": w_ph, "bias": bias}

    return plan


def _fold_digest(gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor], kind: str) -> str:
    """Identifies the fold (kind, gamma, beta values): the quantize pass keys its cache on the
    source weight and this."""
    h = hashlib.blake2b(kind.encode(), digest_size=8)
    for v in (gamma, beta):
        h.update(b"-" if v is None else v.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _rewrite_quantized(gm: GraphModule, ctx: PassContext, fake_mode: Any, norm: _Norm,
                       qlins: list[tuple[_Linear, dict[str, Any]]], consts: _Constants, gamma,
                       beta, k: int, order: dict[Node, int]) -> dict[str, Any]:
    """Fold the norm into linears quant_config quantizes (one dtype) and leave them to quantize.

    Emits ``x_hat = q3n::normalize(x, eps, kind, dtype)`` (one per norm and dtype, shared by the
    siblings) and, per linear, ``mm(x_hat2d, t(W'))`` / ``addmm(b', x_hat2d, t(W'))`` with
    W' = W·diag(γ) and b' = W·β + b folded here as for the fused op (float64, rounded once to the
    linear's dtype) and stored as buffers. Each new linear carries ``meta["q3n_norm_quant"]``: the
    quantize pass takes it as a candidate, quantizes W' (calibrated on x_hat, the rows it really
    receives), and for quantized activations replaces ``normalize`` + the activation quantizer
    by one ``q3n::norm_act_quant``. If quantize leaves it (a format that cannot be honoured, the
    pass disabled or rolled back), the graph is still exact: the normalise kernel, then a float
    linear on the folded weight.
    """
    dtype = qlins[0][0].dtype
    xval = _val(norm.x)
    reason = _kernel().supports_normalize(xval, norm.eps, norm.kind, dtype)
    if reason is not None:
        raise _Decline(reason)
    first = min((lin.node for lin, _ in qlins), key=lambda n: order[n])
    xh = add_node(gm, fake_mode, torch.ops.q3n.normalize.default,
                  (norm.x, float(norm.eps), norm.kind, dtype), before=first,
                  meta_from=norm.anchor)
    x2 = xh if xval.dim() == 2 else add_node(gm, fake_mode, aten.view.default, (xh, [-1, k]),
                                             before=first, meta_from=norm.anchor)
    digest = _fold_digest(gamma, beta, norm.kind)
    folded = 0
    names = []
    for lin, info in qlins:
        w, b, _ = _fold([lin], gamma, beta, consts, "rmsnorm", k, dtype)
        b = None if b is None else b.to(dtype)
        w_node = _register(gm, fake_mode, w, "_q3n_norm_quant_weight", first)
        b_node = None if b is None else _register(gm, fake_mode, b, "_q3n_norm_quant_bias", first)
        wt = add_node(gm, fake_mode, aten.t.default, (w_node,), before=lin.node,
                      meta_from=lin.node)
        if b_node is None:
            new = add_node(gm, fake_mode, aten.mm.default, (x2, wt), before=lin.node,
                           meta_from=lin.node)
        else:
            new = add_node(gm, fake_mode, aten.addmm.default, (b_node, x2, wt), before=lin.node,
                           meta_from=lin.node)
        new.meta["q3n_norm_quant"] = {
            "layer": info["layer"], "class": info["class"],
            "classified_by": info["classified_by"], "norm": _module_name(norm.anchor),
            "kind": norm.kind, "eps": float(norm.eps), "fold": digest,
            "weight": w_node.target, "bias": None if b_node is None else b_node.target,
            "source_weight": info["weight"].name,
            "source_bias": info["bias"].name if isinstance(info["bias"], Node) else None,
            "gamma": gamma, "beta": beta,
        }
        lin.node.replace_all_uses_with(new)
        folded += w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())
        names.append(_module_name(lin.node))
    for placeholder in set().union(*(consts.placeholders(v) for v in
                                     [lin.mat2 for lin, _ in qlins] + [lin.bias for lin, _ in qlins]
                                     + norm.gamma + norm.beta)):
        ctx.freeze(placeholder)
    _erase_dead(gm, [lin.node for lin, _ in qlins])
    return {
        "linears": names,
        "N": [lin.n for lin, _ in qlins],
        "quantized": True,
        "emitted": "q3n::normalize + float linears on the folded weights, for quantize",
        "dtype": str(dtype).replace("torch.", ""),
        "folded_bytes": folded,
    }


def _kernel():
    """kernels.norm_linear (imported on first use: it needs Triton, the pipeline does not)."""
    from ..kernels import norm_linear

    return norm_linear


def run(gm: GraphModule, ctx: PassContext) -> PassStats:
    try:
        K = _kernel()
    except Exception as err:  # no Triton on this machine
        return PassStats(status="skipped", detail={"reason": f"kernel unavailable: {err}"})
    stats = PassStats()
    fake_mode = ctx.fake_mode
    consts = _Constants(gm, ctx)
    fusions: list[dict[str, Any]] = []
    without_linear: list[str] = []
    unfused_linears: dict[str, int] = {}
    folded = shared = 0
    found = 0
    extra: dict[str, Any] = {}
    plan = _quantize_plan(gm, ctx, extra)
    folded_for_quantize = 0
    # Norms are matched one at a time, in graph order, each after the previous rewrite: a rewrite
    # may replace a node a later norm reads (a residual add taken into the epilogue).
    for anchor in [n for n in gm.graph.nodes if _is_anchor(n)]:
        if getattr(anchor, "_erased", False):
            continue
        norm = _match(anchor, consts)
        if norm is None:
            continue
        found += 1
        k = _val(norm.x).shape[-1]
        linears, others, _ = _consumers(norm, k, {n: j for j, n in enumerate(gm.graph.nodes)})
        if not linears:
            without_linear.append(_module_name(norm.anchor))
            continue
        if norm.decline is not None:
            stats.decline(norm.decline)
            continue
        if fake_mode is None:
            stats.decline("no fake mode to give new nodes their values")
            continue
        if not isinstance(k, int):
            stats.decline("normalised size is symbolic")
            continue
        good, reasons = [], []
        to_quantize: list[tuple[_Linear, dict[str, Any]]] = []
        infos: dict[Node, dict[str, Any]] = {}
        for lin in linears:
            why = _linear_reason(lin, consts, k) or _released_reason(lin, consts, ctx)
            info = plan(lin) if why is None else None
            if info is not None:
                infos[lin.node] = info
            if info is not None and info["quantize"]:
                to_quantize.append((lin, info))
            elif why is None:
                good.append(lin)
            else:
                reasons.append(why)
                unfused_linears[why] = unfused_linears.get(why, 0) + 1
        if not good and not to_quantize:
            stats.decline(reasons[0])
            continue
        device = consts((good or [lin for lin, _ in to_quantize])[0].mat2).device
        gamma = _vector(norm.gamma, consts, k, device, 1.0)
        beta = _vector(norm.beta, consts, k, device, 0.0)
        groups: dict[torch.dtype, list[_Linear]] = {}
        for lin in good:
            groups.setdefault(lin.dtype, []).append(lin)
        entries, first_decline = [], None
        for lins in groups.values():
            for i in range(0, len(lins), K.MAX_OUTPUTS):
                chunk = lins[i: i + K.MAX_OUTPUTS]
                order = {n: j for j, n in enumerate(gm.graph.nodes)}
                try:
                    entries.append(_rewrite_group(gm, ctx, fake_mode, norm, chunk, consts, gamma,
                                                  beta, k, order, infos))
                except _Decline as why:
                    first_decline = first_decline or str(why)
                    unfused_linears[str(why)] = unfused_linears.get(str(why), 0) + len(chunk)
        qgroups: dict[torch.dtype, list[tuple[_Linear, dict[str, Any]]]] = {}
        for lin, info in to_quantize:
            qgroups.setdefault(lin.dtype, []).append((lin, info))
        for qlins in qgroups.values():
            order = {n: j for j, n in enumerate(gm.graph.nodes)}
            try:
                entry = _rewrite_quantized(gm, ctx, fake_mode, norm, qlins, consts, gamma, beta,
                                           k, order)
            except _Decline as why:
                first_decline = first_decline or str(why)
                unfused_linears[str(why)] = unfused_linears.get(str(why), 0) + len(qlins)
                continue
            folded_for_quantize += entry.pop("folded_bytes")
            entries.append(entry)
        if not entries:
            stats.decline(first_decline)
            continue
        stats.matched += 1
        stats.rewritten += 1
        _erase_dead(gm, [norm.out])
        kept_for: list[str] = []
        if not getattr(norm.out, "_erased", False):
            left, others, _ = _consumers(norm, k, {n: j for j, n in enumerate(gm.graph.nodes)})
            kept_for = sorted({_describe(u) for u in others + [lin.node for lin in left]})
        folded += sum(e.pop("folded_bytes", 0) for e in entries)
        shared += sum(e.pop("fold_shared_bytes", 0) for e in entries)
        fusions.append({
            "norm": _module_name(norm.anchor),
            "kind": norm.kind,
            "form": norm.form,
            "eps": norm.eps,
            "calls": entries,
            "norm_kept_for": kept_for,
        })
    stats.detail = {
        "fusions": fusions,
        "norms_found": found,
        "norms_without_linear": without_linear,
        "linears_left_unfused": unfused_linears,
        "folded_bytes": folded,
        # The folds this graph shares with another graph of the model (no bytes added).
        "fold_shared_bytes": shared,
        # W' and b' of the linears left to quantize: the quantize pass replaces them by packed
        # weights and drops them (what it keeps in high precision stays).
        "folded_for_quantize_bytes": folded_for_quantize,
        "norm_dtype": _norm_dtype(ctx),
        "dispatch": [{"max_rows": top, "design": design} for top, design in K.DISPATCH],
        **extra,
    }
    return stats


def _describe(node: Node) -> str:
    target = node.target
    return str(target).replace("aten.", "") if node.op == "call_function" else node.op

