"""Graph-matching helpers shared by q3n's passes over the post-AOT functional ATen graph.

What this module guarantees:

- Reading never changes the graph and never adds a shape guard: size questions go through
  :func:`known` (``statically_known_true``), which answers "not known" instead of specialising a
  symbolic size. A matcher that cannot prove a fact must treat it as false.
- :func:`add_node` is the one writer: it inserts a ``call_function`` node and gives it
  ``meta["val"]`` by running the op on the inputs' FakeTensors under the capture's fake mode.
- :func:`scalar_constant` reads a value that is the same everywhere and known at compile time
  (a Python number, ``scalar_tensor``, ``full([], v)``, a lifted 0-d constant, or a placeholder
  the capture marks constant), rounded to the dtype the graph holds it in; :class:`Constants`
  binds it to a graph and records which placeholders were read, for the pass to freeze.
- :func:`index_value` evaluates small tensors built only from indices (``arange``, comparisons,
  ``tril``/``triu``, ``ones``, ``where`` of constants, and view-like reshapes) into a symbolic
  description: an affine function of the element's index, or a conjunction of affine
  inequalities. It is exact for what it accepts and returns None for anything else (data-dependent
  masks such as padding). Passes use it to prove, e.g., that a mask is exactly causal.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._pytree import tree_map

aten = torch.ops.aten
prims = torch.ops.prims

# --------------------------------------------------------------------------------------------
# Nodes, arguments, sizes
# --------------------------------------------------------------------------------------------

VIEW_OPS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
# Ops that return their input's values unchanged (a copy or an alias).
SAME_VALUE_OPS = (aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default,
                  aten.detach.default, aten.contiguous.default)
CAST_OPS = (aten._to_copy.default, prims.convert_element_type.default)


def is_call(node: Any, *targets: Any) -> bool:
    """True if `node` is a call_function node of one of `targets` (overloads or packets)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return any(target is t or (packet is not None and packet is t) for t in targets)


def val(node: Any) -> Any:
    """The FakeTensor (or other value) a node holds in ``meta["val"]``; None for non-nodes."""
    return node.meta.get("val") if isinstance(node, Node) else None


def tensor_val(node: Any) -> Optional[torch.Tensor]:
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def bind_args(node: Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in (OpOverload targets only)."""
    schema = node.target._schema
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            bound[arg.name] = None
    return bound


def known(cond: Any) -> bool:
    """True only if `cond` (bool or SymBool) holds for every value of its symbols; adds no guard."""
    if isinstance(cond, bool):
        return cond
    return statically_known_true(cond)


def known_eq(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return known(a == b)


def same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(known_eq(x, y) for x, y in zip(a, b))


def json_size(x: Any) -> Any:
    """A size for a report: an int, or the symbolic expression as text."""
    return x if isinstance(x, int) else str(x)


def only_user(node: Node) -> Optional[Node]:
    """The single user of `node`, or None if it has none or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def skip(node: Any, ops: Iterable[Any]) -> Any:
    """Follow argument 0 backwards while the node is a call of one of `ops`."""
    ops = tuple(ops)
    while is_call(node, *ops):
        node = node.args[0]
    return node


def is_noop_slice(node: Node) -> bool:
    """``slice(x, dim, 0, end>=size, 1)``: a view equal to its input."""
    if not is_call(node, aten.slice.Tensor):
        return False
    a = bind_args(node)
    src = tensor_val(node.args[0])
    if src is None:
        return False
    size = src.shape[a["dim"]]
    start = a["start"] if a["start"] is not None else 0
    end = a["end"]
    # Slicing "to the end" is spelt with end = sys.maxsize, which a symbolic size is not known to be
    # below (its range is unbounded).
    to_end = end is None or (isinstance(end, int) and end >= 2**62) or known(end >= size)
    return start == 0 and a["step"] == 1 and to_end


# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------


def round_to(value: float, dtype: Optional[torch.dtype]) -> float:
    """`value` as the graph holds it in `dtype` (e.g. sqrt(96) in bfloat16 is 9.8125)."""
    if dtype is None or not dtype.is_floating_point:
        return value
    return float(torch.tensor(value, dtype=torch.float64).to(dtype).item())


def get_attr_value(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def scalar_constant(x: Any, gm: Optional[GraphModule],
                    static_values: Optional[dict[str, torch.Tensor]] = None,
                    used: Optional[set[str]] = None) -> Optional[float]:
    """The compile-time value of a scalar or of a tensor holding one value everywhere, else None.

    Tensors count when they have exactly one element; the value is rounded to the tensor's dtype,
    which is what the graph computes with. Placeholders count when `static_values` (the capture's
    compile-time constants: weights, and float attributes Dynamo passes as 0-d tensors under
    dynamic shapes) holds them; their names are added to `used`, for the pass to freeze.
    """
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)):
        return float(x)
    if not isinstance(x, Node):
        return None
    v = tensor_val(x)
    if v is None or not known_eq(v.numel(), 1):
        return None
    if x.op == "placeholder":
        real = (static_values or {}).get(x.name)
        if not isinstance(real, torch.Tensor) or real.numel() != 1:
            return None
        if used is not None:
            used.add(x.name)
        return float(real.reshape(()).item())
    if x.op == "get_attr" and gm is not None:
        real = get_attr_value(gm, x.target)
        if isinstance(real, torch.Tensor) and real.numel() == 1:
            return float(real.reshape(()).item())
        return None
    if is_call(x, aten.scalar_tensor, aten.full.default):
        fill = x.args[0] if is_call(x, aten.scalar_tensor) else x.args[1]
        # A symbolic fill (a node) is known only at run time.
        return round_to(float(fill), v.dtype) if isinstance(fill, (int, float, bool)) else None
    if is_call(x, *SAME_VALUE_OPS, *VIEW_OPS, aten.expand.default, aten.unsqueeze.default,
               aten.squeeze.dim, aten.squeeze.default):
        return scalar_constant(x.args[0], gm, static_values, used)
    if is_call(x, *CAST_OPS):
        inner = scalar_constant(x.args[0], gm, static_values, used)
        return None if inner is None else round_to(inner, v.dtype)
    return None


class Constants:
    """:func:`scalar_constant` bound to a graph and its compile-time constants.

    `used` collects the placeholders read since it was last cleared: a pass that folds their
    values into the graph freezes them (``PassContext.freeze``).
    """

    def __init__(self, gm: GraphModule, static_values: Optional[dict[str, torch.Tensor]] = None):
        self.gm, self.static_values = gm, static_values or {}
        self.used: set[str] = set()

    def __call__(self, x: Any) -> Optional[float]:
        return scalar_constant(x, self.gm, self.static_values, self.used)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def written_placeholders(gm: GraphModule) -> set[int]:
    """Positions of the placeholders some op of `gm` writes in place (directly or via a view)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    position = {n: i for i, n in enumerate(placeholders)}
    written: set[int] = set()
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        for i, arg in enumerate(target._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            # Follow views back to what they view: writing a view writes its base.
            for _ in range(16):
                if not isinstance(value, torch.fx.Node) or value.op != "call_function":
                    break
                base_op = value.target
                if not (isinstance(base_op, torch._ops.OpOverload) and base_op.is_view):
                    break
                value = value.args[0]
            if isinstance(value, torch.fx.Node) and value in position:
                written.add(position[value])
    return written


def fake_mode_for(gm: GraphModule, ctx: Any = None):
    """The fake mode the graph's FakeTensors belong to (the capture's), for new nodes' values."""
    mode = getattr(ctx, "fake_mode", None) if ctx is not None else None
    if mode is not None:
        return mode
    from torch._guards import detect_fake_mode

    return detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])


def add_node(gm: GraphModule, fake_mode: Any, target: Callable, args: Sequence[Any],
             kwargs: Optional[dict[str, Any]] = None, *, before: Node,
             meta_from: Optional[Node] = None) -> Node:
    """Insert ``target(*args, **kwargs)`` before `before`, with ``meta["val"]`` fake-propagated.

    `meta_from` lends its stack trace and module stack to the new node, so dumps still show
    which source line the value came from.
    """
    if fake_mode is None:
        raise RuntimeError("the graph has no fake mode to compute new nodes' values in")
    kwargs = dict(kwargs or {})
    fake_args, fake_kwargs = tree_map(lambda a: a.meta["val"] if isinstance(a, Node) else a,
                                      (tuple(args), kwargs))
    with fake_mode:
        value = target(*fake_args, **fake_kwargs)
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, tuple(args), kwargs)
    node.meta["val"] = value
    if meta_from is not None:
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "seq_nr"):
            if key in meta_from.meta:
                node.meta[key] = meta_from.meta[key]
    return node


# --------------------------------------------------------------------------------------------
# Index algebra: tensors built from indices only
# --------------------------------------------------------------------------------------------
#
# Dimensions are numbered from the right (-1 is the last), so broadcasting lines them up without
# renumbering. A term on a dimension whose size is 1 is folded into the constant (its index is
# always 0), which is what makes broadcasting exact.


@dataclasses.dataclass(frozen=True)
class Affine:
    """``const + sum(coef * index[dim])`` over dims numbered from the right."""

    terms: tuple[tuple[int, int], ...]  # sorted (dim, coef), coef != 0
    const: Any = 0  # int or SymInt

    @staticmethod
    def make(terms: dict[int, int], const: Any = 0) -> "Affine":
        return Affine(tuple(sorted((d, c) for d, c in terms.items() if c != 0)), const)

    def coefs(self) -> dict[int, int]:
        return dict(self.terms)

    def plus(self, other: "Affine", sign: int = 1) -> "Affine":
        terms = self.coefs()
        for d, c in other.terms:
            terms[d] = terms.get(d, 0) + sign * c
        return Affine.make(terms, self.const + sign * other.const)

    def shift(self, dim: int, offset: Any) -> "Affine":
        """index[dim] := index[dim] + offset."""
        c = self.coefs().get(dim, 0)
        return Affine(self.terms, self.const + c * offset) if c else self

    def substitute(self, dim: int, value: Any) -> "Affine":
        """index[dim] := value (a number or SymInt)."""
        terms = self.coefs()
        c = terms.pop(dim, 0)
        return Affine.make(terms, self.const + c * value if c else self.const)

    def renumber(self, mapping: dict[int, int]) -> Optional["Affine"]:
        if any(d not in mapping for d, _ in self.terms):
            return None
        return Affine.make({mapping[d]: c for d, c in self.terms}, self.const)


# A predicate is a conjunction of constraints ``affine <= 0``; the empty set is True.
Pred = frozenset


def negate(pred: Pred) -> Optional[Pred]:
    if len(pred) == 0:
        return Pred({Affine((), 1)})  # False
    if len(pred) != 1:
        return None  # a disjunction: outside this algebra
    (a,) = pred
    # Over integers, not (a <= 0)  <=>  a >= 1  <=>  1 - a <= 0.
    return Pred({Affine.make({d: -c for d, c in a.terms}, 1 - a.const)})


@dataclasses.dataclass(frozen=True)
class IndexValue:
    """What an index-built tensor holds at each index.

    kind "int": ``affine``; kind "bool": ``pred``; kind "float": ``then`` where ``pred`` holds,
    else ``other`` (a constant is ``pred`` = True).
    """

    kind: str
    affine: Optional[Affine] = None
    pred: Optional[Pred] = None
    then: Optional[float] = None
    other: Optional[float] = None

    def map(self, fn: Callable[[Affine], Optional[Affine]]) -> Optional["IndexValue"]:
        if self.kind == "int":
            a = fn(self.affine)
            return None if a is None else dataclasses.replace(self, affine=a)
        new = [fn(a) for a in self.pred]
        if any(a is None for a in new):
            return None
        return dataclasses.replace(self, pred=Pred(new))


def constant_value(x: float, dtype: torch.dtype) -> IndexValue:
    if dtype == torch.bool:
        return IndexValue("bool", pred=Pred() if x else negate(Pred()))
    if dtype.is_floating_point:
        return IndexValue("float", pred=Pred(), then=x, other=x)
    return IndexValue("int", affine=Affine((), int(x)))


def trivially_true(constraint: Affine, sizes: Sequence[Any]) -> bool:
    """True if ``constraint <= 0`` holds for every index of a tensor of `sizes` (right-aligned)."""
    bound = constraint.const
    for d, c in constraint.terms:
        if -d > len(sizes):
            return False
        if c > 0:
            bound = bound + c * (sizes[d] - 1)
    return known(bound <= 0)


_CMP = {  # a OP b as "x <= 0"
    "le": lambda a, b: a.plus(b, -1),
    "lt": lambda a, b: a.plus(b, -1).plus(Affine((), 1)),
    "ge": lambda a, b: b.plus(a, -1),
    "gt": lambda a, b: b.plus(a, -1).plus(Affine((), 1)),
}


class IndexEvaluator:
    """Evaluates nodes into :class:`IndexValue` (memoised); None when outside the algebra."""

    MAX_DEPTH = 64

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.memo: dict[Node, Optional[IndexValue]] = {}

    def __call__(self, node: Any, depth: int = 0) -> Optional[IndexValue]:
        if not isinstance(node, Node):
            return None
        if node not in self.memo:
            self.memo[node] = None if depth > self.MAX_DEPTH else self._eval(node, depth + 1)
        return self.memo[node]

    # -- helpers ----------------------------------------------------------------------------

    def _operand(self, x: Any, depth: int) -> Optional[IndexValue]:
        if isinstance(x, bool):
            return IndexValue("bool", pred=Pred() if x else negate(Pred()))
        if isinstance(x, int) or isinstance(x, torch.SymInt):
            return IndexValue("int", affine=Affine((), x))
        if isinstance(x, float):
            return IndexValue("float", pred=Pred(), then=x, other=x)
        return self(x, depth)

    @staticmethod
    def _fold_unit_dims(value: IndexValue, shape: Sequence[Any]) -> Optional[IndexValue]:
        rank = len(shape)

        def fold(a: Affine) -> Optional[Affine]:
            for d, _ in a.terms:
                if -d > rank:
                    return None
                if known_eq(shape[d], 1):
                    a = a.substitute(d, 0)
            return a

        return value.map(fold)

    @staticmethod
    def _nonunit_dims(shape: Sequence[Any]) -> list[int]:
        # A symbolic size is never 1: Dynamo specialises sizes 0 and 1.
        return [p - len(shape) for p, s in enumerate(shape) if not known_eq(s, 1)]

    # -- evaluation -------------------------------------------------------------------------

    def _eval(self, node: Node, depth: int) -> Optional[IndexValue]:
        out = tensor_val(node)
        if out is None or node.op not in ("call_function", "get_attr"):
            return None
        if is_call(node, aten.full.default):
            fill = node.args[1]
            if isinstance(fill, (int, float, bool)):
                return constant_value(round_to(float(fill), out.dtype), out.dtype)
            return None
        if node.op == "get_attr" or is_call(node, aten.scalar_tensor, aten.lift_fresh_copy.default):
            c = scalar_constant(node, self.gm)
            return None if c is None else constant_value(c, out.dtype)
        result = self._eval_op(node, out, depth)
        return None if result is None else self._fold_unit_dims(result, out.shape)

    def _eval_op(self, node: Node, out: torch.Tensor, depth: int) -> Optional[IndexValue]:
        a = node.args
        if is_call(node, aten.arange):
            b = bind_args(node)
            start = b.get("start", 0)
            step = b.get("step", 1)
            if out.dtype.is_floating_point or out.dtype == torch.bool or step != 1:
                return None
            if not isinstance(start, (int, torch.SymInt)) or isinstance(start, bool):
                return None
            return IndexValue("int", affine=Affine(((-1, 1),), start))
        if is_call(node, aten.ones, aten.new_ones, aten.ones_like):
            return constant_value(1, out.dtype)
        if is_call(node, aten.zeros, aten.new_zeros, aten.zeros_like):
            return constant_value(0, out.dtype)
        if is_call(node, aten.full_like, aten.new_full):
            c = scalar_constant(a[1], self.gm)
            return None if c is None else constant_value(c, out.dtype)
        if is_call(node, aten.add, aten.sub):
            return self._add(node, out, depth)
        if is_call(node, aten.eq, aten.ne):
            return self._equal(node, depth)
        if is_call(node, aten.cat.default):
            return self._cat(node, out, depth)
        if is_call(node, aten.cumsum.default):
            return self._cumsum(node, out, depth)
        if is_call(node, aten.index.Tensor):
            # x[i0, i1, ...] of an x that holds one value everywhere holds that value (the index
            # tensors only say where to read: transformers' packed-sequence test of its masks).
            x = self(a[0], depth)
            if x is None or not self._is_constant(x):
                return None
            if any(i is not None and self(i, depth) is None for i in a[1]):
                return None
            return x
        for name, fn in _CMP.items():
            if is_call(node, getattr(aten, name)):
                x, y = self._operand(a[0], depth), self._operand(a[1], depth)
                if x is None or y is None or x.kind != "int" or y.kind != "int":
                    return None
                return IndexValue("bool", pred=Pred({fn(x.affine, y.affine)}))
        if is_call(node, aten.bitwise_and, aten.logical_and) or (
                is_call(node, aten.mul) and out.dtype == torch.bool):
            x, y = self._operand(a[0], depth), self._operand(a[1], depth)
            if x is None or y is None or x.kind != "bool" or y.kind != "bool":
                return None
            return IndexValue("bool", pred=x.pred | y.pred)
        if is_call(node, aten.bitwise_not, aten.logical_not):
            x = self(a[0], depth)
            if x is None or x.kind != "bool":
                return None
            p = negate(x.pred)
            return None if p is None else IndexValue("bool", pred=p)
        if is_call(node, aten.tril, aten.triu):
            return self._tri(node, depth)
        if is_call(node, aten.where) and len(a) == 3:
            return self._select(a[0], a[1], a[2], out, depth)
        if is_call(node, aten.masked_fill):
            cond = self(a[1], depth)
            x, fill = self(a[0], depth), self._operand(a[2], depth)
            if x is None or fill is None or x.kind != "float" or fill.kind != "float":
                return None
            if x.then != x.other or fill.then != fill.other or cond is None or cond.kind != "bool":
                return None
            return IndexValue("float", pred=cond.pred, then=round_to(fill.then, out.dtype),
                              other=x.then)
        if is_call(node, *CAST_OPS):
            return self._cast(self(a[0], depth), out.dtype)
        if is_call(node, *SAME_VALUE_OPS):
            return self(a[0], depth)
        if is_call(node, aten.expand.default):
            return self(a[0], depth)  # new dims on the left; size-1 dims were already folded
        if is_call(node, *VIEW_OPS, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default,
                   aten.squeeze.dims):
            return self._reshape(node, out, depth)
        if is_call(node, aten.permute.default, aten.transpose.int):
            return self._permute(node, out, depth)
        if is_call(node, aten.slice.Tensor):
            return self._slice(node, depth)
        if is_call(node, aten.select.int):
            return self._select_index(node, depth)
        return None

    def _add(self, node: Node, out: torch.Tensor, depth: int) -> Optional[IndexValue]:
        b = bind_args(node)
        if b.get("alpha", 1) != 1:
            return None
        x, y = self._operand(node.args[0], depth), self._operand(node.args[1], depth)
        if x is None or y is None or x.kind != "int" or y.kind != "int":
            return None
        sign = -1 if is_call(node, aten.sub) else 1
        return IndexValue("int", affine=x.affine.plus(y.affine, sign))

    @staticmethod
    def _is_constant(x: IndexValue) -> bool:
        if x.kind == "int":
            return not x.affine.terms
        if x.kind == "bool":
            return len(x.pred) == 0 or all(not c.terms for c in x.pred)
        return len(x.pred) == 0 or x.then == x.other

    def _equal(self, node: Node, depth: int) -> Optional[IndexValue]:
        """a == b / a != b of integer index values: a conjunction for ==; for != only where the
        difference is a constant (a disjunction otherwise, outside the algebra)."""
        x, y = self._operand(node.args[0], depth), self._operand(node.args[1], depth)
        if x is None or y is None or x.kind != "int" or y.kind != "int":
            return None
        diff = x.affine.plus(y.affine, -1)
        if not diff.terms:
            if known_eq(diff.const, 0):
                same = True
            elif known(diff.const != 0):
                same = False
            else:
                return None
            return constant_value(same if is_call(node, aten.eq) else not same, torch.bool)
        if is_call(node, aten.ne):
            return None
        return IndexValue("bool", pred=Pred({diff, y.affine.plus(x.affine, -1)}))

    def _cat(self, node: Node, out: torch.Tensor, depth: int) -> Optional[IndexValue]:
        """cat of integer pieces that continue one affine expression along the cat dim (as
        transformers' ``cat([positions[:, :1] - 1, positions])`` does): that expression."""
        pieces = node.args[0]
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % out.dim()
        d = dim - out.dim()
        offset, whole, checks = 0, None, []
        for piece in pieces:
            pv, val = tensor_val(piece), self(piece, depth)
            if pv is None or val is None or val.kind != "int" or pv.dim() != out.dim():
                return None
            size = pv.shape[dim]
            if known_eq(size, 1):
                checks.append((offset, val.affine))  # one index: compared with `whole` below
            else:
                # In the output, this piece's index j is its own index j - offset.
                shifted = val.affine.shift(d, -offset)
                if whole is None:
                    whole = shifted
                elif not _same_affine(whole, shifted):
                    return None
            offset = offset + size
        if whole is None:
            return None
        for at, value in checks:
            if not _same_affine(whole.substitute(d, at), value.substitute(d, 0)):
                return None
        return IndexValue("int", affine=whole)

    def _cumsum(self, node: Node, out: torch.Tensor, depth: int) -> Optional[IndexValue]:
        """cumsum of a constant c along a dim: c * (index + 1)."""
        x = self(node.args[0], depth)
        if x is None or not self._is_constant(x) or out.dtype.is_floating_point or out.dtype == torch.bool:
            return None
        if x.kind == "bool":
            if not all(isinstance(con.const, int) for con in x.pred):
                return None
            c = int(all(con.const <= 0 for con in x.pred))
        elif x.kind == "int":
            c = x.affine.const
        else:
            return None
        if not isinstance(c, int):
            return None
        d = node.args[1] % out.dim() - out.dim()
        return IndexValue("int", affine=Affine.make({d: c}, c))

    def _tri(self, node: Node, depth: int) -> Optional[IndexValue]:
        x = self(node.args[0], depth)
        b = bind_args(node)
        diag = b["diagonal"]
        if x is None or x.kind == "int" or not isinstance(diag, int):
            return None
        # tril keeps j - i <= diag; triu keeps j - i >= diag (i = dim -2, j = dim -1).
        if is_call(node, aten.tril):
            keep = Affine.make({-1: 1, -2: -1}, -diag)
        else:
            keep = Affine.make({-1: -1, -2: 1}, diag)
        if x.kind == "bool":
            return IndexValue("bool", pred=x.pred | {keep})
        if x.then != x.other:
            return None
        return IndexValue("float", pred=Pred({keep}), then=x.then, other=0.0)

    def _select(self, cond_arg: Any, then_arg: Any, other_arg: Any, out: torch.Tensor,
                depth: int) -> Optional[IndexValue]:
        cond = self(cond_arg, depth)
        x, y = self._operand(then_arg, depth), self._operand(other_arg, depth)
        if cond is None or x is None or y is None or cond.kind != "bool":
            return None
        if not out.dtype.is_floating_point or x.kind != "float" or y.kind != "float":
            return None
        if x.then != x.other or y.then != y.other:
            return None
        return IndexValue("float", pred=cond.pred, then=round_to(x.then, out.dtype),
                          other=round_to(y.then, out.dtype))

    @staticmethod
    def _cast(x: Optional[IndexValue], dtype: torch.dtype) -> Optional[IndexValue]:
        if x is None:
            return None
        if x.kind == "float" and dtype.is_floating_point:
            return dataclasses.replace(x, then=round_to(x.then, dtype), other=round_to(x.other, dtype))
        if x.kind == "bool" and dtype == torch.bool:
            return x
        if x.kind == "bool" and dtype.is_floating_point:
            return IndexValue("float", pred=x.pred, then=1.0, other=0.0)
        if x.kind == "int" and not dtype.is_floating_point and dtype != torch.bool:
            return x
        return None

    def _reshape(self, node: Node, out: torch.Tensor, depth: int) -> Optional[IndexValue]:
        x = self(node.args[0], depth)
        src = tensor_val(node.args[0])
        if x is None or src is None:
            return None
        # Only reshapes that insert or remove size-1 dims: the other dims keep their order.
        before, after = self._nonunit_dims(src.shape), self._nonunit_dims(out.shape)
        if len(before) != len(after):
            return None
        if not all(known_eq(src.shape[b], out.shape[a]) for b, a in zip(before, after)):
            return None
        mapping = dict(zip(before, after))
        return x.map(lambda aff: aff.renumber(mapping))

    def _permute(self, node: Node, out: torch.Tensor, depth: int) -> Optional[IndexValue]:
        x = self(node.args[0], depth)
        if x is None:
            return None
        rank = out.dim()
        if is_call(node, aten.transpose.int):
            d0, d1 = node.args[1] % rank, node.args[2] % rank
            order = list(range(rank))
            order[d0], order[d1] = order[d1], order[d0]
        else:
            order = [d % rank for d in node.args[1]]
        mapping = {src - rank: dst - rank for dst, src in enumerate(order)}
        return x.map(lambda aff: aff.renumber(mapping))

    def _slice(self, node: Node, depth: int) -> Optional[IndexValue]:
        x = self(node.args[0], depth)
        src = tensor_val(node.args[0])
        b = bind_args(node)
        if x is None or src is None or b["step"] != 1:
            return None
        rank = src.dim()
        dim = b["dim"] % rank
        start = b["start"] if b["start"] is not None else 0
        if isinstance(start, int) and start < 0:
            start = src.shape[dim] + start
        if isinstance(start, int) and not known(start <= src.shape[dim]):
            return None
        # index_in = index_out + start on that dim.
        d = dim - rank
        return x.map(lambda aff: aff.shift(d, start))

    def _select_index(self, node: Node, depth: int) -> Optional[IndexValue]:
        x = self(node.args[0], depth)
        src = tensor_val(node.args[0])
        if x is None or src is None:
            return None
        rank = src.dim()
        dim, index = node.args[1] % rank, node.args[2]
        if isinstance(index, int) and index < 0:
            index = src.shape[dim] + index
        d = dim - rank
        # Dims left of the removed one move one step to the right.
        mapping = {p - rank: (p - rank + 1 if p < dim else p - rank) for p in range(rank) if p != dim}
        return x.map(lambda aff: aff.substitute(d, index).renumber(mapping))


def _same_affine(a: Affine, b: Affine) -> bool:
    return a.terms == b.terms and bool(known_eq(a.const, b.const))


def index_value(node: Node, gm: GraphModule) -> Optional[IndexValue]:
    """:class:`IndexValue` of `node`, or None if it is not built from indices alone."""
    return IndexEvaluator(gm)(node)


__all__ = [
    "Affine", "CAST_OPS", "Constants", "IndexEvaluator", "IndexValue", "Pred", "SAME_VALUE_OPS", "VIEW_OPS",
    "add_node", "bind_args", "fake_mode_for", "index_value", "is_call", "is_noop_slice", "json_size",
    "known", "known_eq", "negate", "only_user", "round_to", "same_shape", "scalar_constant", "skip",
    "tensor_val", "trivially_true", "val", "written_placeholders",
]
