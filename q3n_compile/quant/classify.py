"""Which linears of an ATen graph are attention projections and which are feed-forward.

Two sources, in this order:

1. **Module path** (``node.meta["nn_module_stack"]``, which Dynamo records and AOTAutograd keeps on
   the ``mm``/``addmm`` of every ``nn.Linear``). The path is normalised to the ``named_modules``
   spelling (``L['self'].layers.0.mlp.up_proj`` -> ``layers.0.mlp.up_proj``). Then: an output head
   (``lm_head``, ``embed_out``, ``score``, ``classifier``) is ``"head"``; a router of a mixture of
   experts (``gate``/``router`` directly under a feed-forward module) is ``"router"``; otherwise the
   nearest enclosing module whose name says attention (contains ``attn``/``attention``) or
   feed-forward (``mlp``, ``ffn``, ``feed_forward``, ``intermediate``, ``experts``, ...) decides;
   otherwise the layer's own name (``q_proj``, ``c_attn``, ``query``... / ``gate_proj``,
   ``down_proj``, ``fc1``...).
2. **Graph structure**, when the names say nothing (renamed modules, graphs without module
   stacks): a linear whose output reaches an attention product (``q3n::attention``, SDPA, or a
   batched matmul next to a softmax) is an attention projection (q, k, v, fused qkv); one whose
   output reaches an activation (gelu, silu, relu, tanh, sigmoid...) or a product with an
   activation's output is feed-forward (gate, up, fc); then, looking at the linear's input: coming
   from an attention product is the output projection, from an activation or a gating product is
   feed-forward (down). Walks never pass another linear, a softmax or a normalisation, and are
   bounded, so they stay inside one block.

Guarantee: classification only reads the graph.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Optional

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

HEAD_LEAVES = {"lm_head", "embed_out", "score", "classifier", "output_projection"}
ROUTER_LEAVES = {"gate", "router", "w_gate"}
ATTN_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query", "key",
               "value", "query_key_value", "wqkv", "w_pack", "out_proj", "q_a_proj", "q_b_proj",
               "kv_a_proj_with_mqa", "kv_b_proj", "in_proj"}
FFN_LEAVES = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "w1",
              "w2", "w3", "dense_h_to_4h", "dense_4h_to_h", "wi", "wi_0", "wi_1", "intermediate"}
FFN_SEGMENTS = {"mlp", "ffn", "feed_forward", "feedforward", "intermediate", "experts", "expert",
                "shared_expert", "shared_experts", "moe", "block_sparse_moe"}

_ROOT = re.compile(r"^L\[['\"][^'\"]+['\"]\]\.?")
_MODULES = re.compile(r"\._modules\[['\"]([^'\"]+)['\"]\]")
_GETATTR = re.compile(r"getattr\(([^,()]+), ['\"]([^'\"]+)['\"]\)")
_INDEX = re.compile(r"\[(\d+)\]")


def normalise_path(raw: str) -> str:
    """Dynamo's module source name -> the ``named_modules()`` path ("" for the root module)."""
    s = raw
    for _ in range(8):  # getattr(getattr(L['self'].layers, '0'), 'mlp') nests
        s2 = _GETATTR.sub(r"\1.\2", s)
        if s2 == s:
            break
        s = s2
    s = _MODULES.sub(r".\1", s)
    s = _INDEX.sub(r".\1", s)
    s = _ROOT.sub("", s)
    return s.strip(".")


def module_path(node: Node) -> Optional[str]:
    """The path of the module that made `node` (its innermost nn_module_stack entry), or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    raw = list(stack.values())[-1]
    raw = raw[0] if isinstance(raw, (tuple, list)) else raw
    return normalise_path(str(raw))


def classify_path(path: Optional[str]) -> Optional[str]:
    """"attn" | "ffn" | "head" | "router" | None (the path says nothing)."""
    if not path:
        return None
    parts = [p.lower() for p in path.split(".")]
    leaf, parents = parts[-1], parts[:-1]
    if leaf in HEAD_LEAVES:
        return "head"
    if leaf in ROUTER_LEAVES and parents and _segment_class(parents[-1]) == "ffn":
        return "router"
    for seg in reversed(parents):
        cls = _segment_class(seg)
        if cls:
            return cls
    if leaf in ATTN_LEAVES:
        return "attn"
    if leaf in FFN_LEAVES:
        return "ffn"
    return None


def _segment_class(seg: str) -> Optional[str]:
    if "attn" in seg or "attention" in seg:
        return "attn"
    if seg in FFN_SEGMENTS or "mlp" in seg or "ffn" in seg or "expert" in seg:
        return "ffn"
    return None


# ---------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------

ACTIVATIONS = {
    aten.gelu.default, aten.silu.default, aten.relu.default, aten.sigmoid.default,
    aten.tanh.default, aten.elu.default, aten.leaky_relu.default, aten.hardswish.default,
    aten.mish.default, aten.softplus.default, aten.hardtanh.default, aten.gelu_.default,
}
SOFTMAX = {aten._softmax.default, aten._safe_softmax.default, aten.softmax.int}
SDPA = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_attention_math.default,
}
# Ops a walk does not cross: other linears, normalisations, reductions.
_STOP = {
    aten.mm.default, aten.addmm.default, aten.mean.dim, aten.var_mean.correction,
    aten.var.correction, aten.native_layer_norm.default, aten.rsqrt.default, aten.sum.dim_IntList,
    aten.embedding.default,
} | SOFTMAX
# Ops between a score matrix and its softmax, or a softmax and its product with v.
_SCORE_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.view.default,
              aten._unsafe_view.default, aten._to_copy.default, aten.masked_fill.Scalar,
              aten.masked_fill.Tensor, aten.where.self, aten.expand.default, aten.clone.default,
              aten.native_dropout.default, aten.alias.default}
try:
    _SCORE_OPS.add(torch.ops.prims.convert_element_type.default)
except AttributeError:  # pragma: no cover
    pass
MAX_WALK = 48


def _q3n_op(node: Node, name: str) -> bool:
    t = node.target
    return (node.op == "call_function" and isinstance(t, torch._ops.OpOverload)
            and t.namespace == "q3n" and name in t._opname)


def is_linear_like(node: Node) -> bool:
    return (node.op == "call_function" and node.target in (aten.mm.default, aten.addmm.default)
            ) or _q3n_op(node, "qlinear") or _q3n_op(node, "norm_linear")


class StructureClassifier:
    """Classifies linears of one graph by what their output reaches and where their input comes from."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.attention_nodes = self._attention_nodes()

    def _attention_nodes(self) -> set[Node]:
        found = set()
        for node in self.gm.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in SDPA or _q3n_op(node, "attention"):
                found.add(node)
            elif node.target in (aten.bmm.default, aten.matmul.default):
                if self._near_softmax(node, forward=True) or any(
                        self._near_softmax(a, forward=False) for a in node.args
                        if isinstance(a, Node)):
                    found.add(node)
        return found

    def _near_softmax(self, start: Node, forward: bool, hops: int = 5) -> bool:
        frontier, seen = [start], {start}
        for _ in range(hops):
            nxt = []
            for n in frontier:
                neigh = list(n.users) if forward else [a for a in n.all_input_nodes]
                for m in neigh:
                    if m in seen or m.op != "call_function":
                        continue
                    seen.add(m)
                    if m.target in SOFTMAX:
                        return True
                    if m.target in _SCORE_OPS or m.target == torch.ops.aten.detach.default:
                        nxt.append(m)
            frontier = nxt
        return False

    def _is_activation(self, node: Node) -> bool:
        return node.op == "call_function" and node.target in ACTIVATIONS

    def _is_gating(self, node: Node) -> bool:
        """A product one of whose operands is an activation's output (up_proj * act(gate))."""
        if node.op != "call_function" or node.target is not aten.mul.Tensor:
            return False
        for a in node.args:
            if isinstance(a, Node):
                inner = a
                for _ in range(3):
                    if self._is_activation(inner):
                        return True
                    if inner.op == "call_function" and inner.target in (
                            aten._to_copy.default, aten.view.default, aten.clone.default) and \
                            isinstance(inner.args[0], Node):
                        inner = inner.args[0]
                    else:
                        break
        return False

    def _walk(self, start: Node, forward: bool) -> Optional[str]:
        queue, seen = deque([start]), {start}
        visited = 0
        while queue and visited < MAX_WALK:
            node = queue.popleft()
            visited += 1
            neigh = list(node.users) if forward else list(node.all_input_nodes)
            for m in neigh:
                if m in seen:
                    continue
                seen.add(m)
                if m.op != "call_function":
                    continue
                if m in self.attention_nodes:
                    return "attn"
                if self._is_activation(m) or self._is_gating(m):
                    return "ffn"
                if is_linear_like(m) or m.target in _STOP or m.target in (
                        aten.bmm.default, aten.matmul.default):
                    continue
                queue.append(m)
        return None

    def classify(self, linear: Node, x: Node) -> Optional[str]:
        """Class of the linear `linear` whose input activation is `x`; None if undecided."""
        found = self._walk(linear, forward=True)
        if found is None and x is not None:
            found = self._walk(x, forward=False)
        return found


def classify(node: Node, x: Optional[Node], structure: StructureClassifier
             ) -> tuple[Optional[str], str, Optional[str]]:
    """(class, "path" | "structure" | "none", module path) for a linear node."""
    path = module_path(node)
    cls = classify_path(path)
    if cls is not None:
        return cls, "path", path
    cls = structure.classify(node, x)
    return cls, ("structure" if cls else "none"), path
