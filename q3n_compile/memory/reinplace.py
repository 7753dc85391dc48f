"""Write mutated graph inputs in place instead of through a full copy.

With ``keep_inference_input_mutations=True`` AOTAutograd leaves an input mutation in the graph
in functional form: ``new = index_copy(cache, 2, pos, k)`` … ``copy_(cache, new)``. Run as is, each
call allocates a whole new ``cache``, writes it, and copies it back: for a static KV cache that is
two full cache copies per decode step, to write one position.

:func:`reinplace_input_mutations` turns ``new = op(inp, …)`` followed by ``copy_(inp, new)`` into
``new = op_(inp, …)`` (the op's in-place overload, which returns ``inp``) and drops the ``copy_``.

What it guarantees: a pair is rewritten only when the result is unchanged, i.e. when

- ``inp`` is a graph input and ``op`` is one of :data:`INPLACE_OF` (ops whose in-place overload
  writes ``self`` and returns it with the same shape, strides and dtype as the functional result);
- ``copy_(inp, new)`` copies ``new`` whole (same shape and dtype, its result unused);
- nothing reads ``inp``'s old value after ``op`` runs: every other reader of ``inp``, and of any
  view of it, comes before ``op`` in the node order (the executors keep the order);
- ``new`` is not a graph output (an output must not alias an input).

Anything else is left as it was and counted with its reason.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

# Functional op → its in-place overload, for ops that write their first argument whole-shaped.
INPLACE_OF = {
    aten.index_copy.default: aten.index_copy_.default,
    aten.index_put.default: aten.index_put_.default,
    aten.scatter.src: aten.scatter_.src,
    aten.scatter.value: aten.scatter_.value,
    aten.add.Tensor: aten.add_.Tensor,
    aten.mul.Tensor: aten.mul_.Tensor,
}


def _returns_alias(node: Node) -> bool:
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return any(r.alias_info is not None for r in target._schema.returns)


def _readers_after(base: Node, position: dict[Node, int], limit: int, skip: set[Node]) -> bool:
    """Whether `base` or a view of it is read at or after position `limit` (other than `skip`)."""
    pending = [base]
    while pending:
        node = pending.pop()
        for user in node.users:
            if user in skip:
                continue
            if user.op == "output" or position[user] >= limit:
                return True
            if _returns_alias(user):
                pending.append(user)
    return False


def _reads_input_elsewhere(src: Node, dst: Node) -> bool:
    """Whether an argument of `src` other than the first is `dst` or a view of it: written in
    place, the op could read elements it has already overwritten."""
    def aliases_dst(node: Node) -> bool:
        while node is not dst:
            if not _returns_alias(node) or not node.args or not isinstance(node.args[0], Node):
                return False
            node = node.args[0]
        return True

    others: list[Node] = []
    torch.fx.map_arg((src.args[1:], src.kwargs), lambda n: others.append(n) or n)
    return any(aliases_dst(n) for n in others)


def _same_layout(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.stride() == b.stride())


def reinplace_input_mutations(gm: GraphModule) -> dict[str, Any]:
    """Rewrite the graph in place (see the module docstring); returns what it did, by reason."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    outputs: set[Node] = set()
    for node in nodes:
        if node.op == "output":
            torch.fx.map_arg(node.args, lambda n: outputs.add(n) or n)
    declined: Counter = Counter()
    rewritten: list[str] = []
    for copy in nodes:
        if copy.op != "call_function" or copy.target is not aten.copy_.default:
            continue
        dst, src = copy.args[0], copy.args[1]
        if not (isinstance(dst, Node) and dst.op == "placeholder" and isinstance(src, Node)):
            continue
        if src.op != "call_function" or src.target not in INPLACE_OF or src.args[0] is not dst:
            declined["the mutation's value is not an in-place-able op on the input itself"] += 1
            continue
        if copy.users:
            declined["the copy_'s result is used"] += 1
            continue
        if src in outputs:
            declined["the new value is also a graph output"] += 1
            continue
        if not _same_layout(src.meta.get("val"), dst.meta.get("val")):
            declined["the new value's shape, strides or dtype differ from the input's"] += 1
            continue
        if _reads_input_elsewhere(src, dst):
            declined["the op also reads the input through another argument"] += 1
            continue
        if _readers_after(dst, position, position[src], skip={src, copy}):
            declined["the input's old value is read after the mutation"] += 1
            continue
        src.target = INPLACE_OF[src.target]
        gm.graph.erase_node(copy)
        rewritten.append(dst.name)
    if rewritten:
        gm.recompile()
    return {"rewritten": len(rewritten), "inputs": rewritten, "declined": dict(declined)}
