"""No-op elimination.

Rules:
  * ``Identity(x)`` is replaced by ``x``;
  * ``Dropout(x)`` in inference form (no ``training_mode`` input, or a constant false one) whose
    mask output is unused is replaced by ``x``.

Refuses (leaves the node) when the node's output is a graph output and its input is a graph
input or another graph output: ONNX graphs cannot alias an input to an output or list one value
as two outputs, so the Identity is needed there. Exact.
"""

from __future__ import annotations

import numpy as np

from graphopt import Graph, Node, Pass, PassContext, Value, register_pass
from graphopt.ir import np_dtype

from ..common import same_dim


def _removable(graph: Graph, src: Value | None, out: Value) -> bool:
    """Can readers of ``out`` read ``src`` instead? Not when ``out`` is a graph output and
    ``src`` is an input, another output or an outer-scope value (ONNX cannot alias those)."""
    if src is None:
        return False
    if out.is_graph_output():
        if src.is_graph_input() or src.is_graph_output() or src.producer is None:
            return False
        if src.graph is not graph:  # an outer-scope value cannot become this graph's output name
            return False
    return True


@register_pass
class EliminateIdentity(Pass):
    """Remove Identity nodes and inference-mode Dropout."""

    name = "eliminate-identity"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for node in graph.iter_nodes():
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Identity":
                pass
            elif node.op_type == "Dropout":
                if len(node.outputs) > 1 and (node.output(1).num_uses or node.output(1).is_graph_output()):
                    continue
                tm = node.input(2)
                if tm is not None:
                    val = tm.const_value()
                    if val is None or bool(np.asarray(val).any()):
                        continue
            else:
                continue
            if not _removable(graph, node.input(0), node.output(0)):
                continue
            graph.replace_all_uses_with(node.output(0), node.input(0))
            graph.remove(node)
            changed = True
        return changed


def _same_shape(a: Value | None, b: Value | None) -> bool:
    """Provably the same shape: equal static dims or the same named symbols."""
    if a is None or b is None or a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    return all(same_dim(x, y) for x, y in zip(a.shape, b.shape, strict=True))


def _broadcast_is_noop(x: Value, c: np.ndarray) -> bool:
    """x op c keeps x's shape and dtype (c broadcasts into x without growing it)."""
    if x.shape is None or c.ndim > len(x.shape):
        return False
    for xd, cd in zip(x.shape[len(x.shape) - c.ndim:], c.shape, strict=True):
        if cd != 1 and not (isinstance(xd, int) and xd == cd):
            return False
    return True


_INT64_MAX = np.iinfo(np.int64).max


def _noop_reason(node: Node) -> bool:
    """True when ``node`` returns its first input unchanged (same values, shape and dtype)."""
    op = node.op_type
    x = node.input(0)
    if x is None or len([o for o in node.outputs if o.name and (o.num_uses or o.is_graph_output())]) > 1:
        return False
    out = node.output(0)
    if op == "Cast":
        return x.dtype is not None and node.attr("to") == x.dtype
    if op == "Transpose":
        perm = node.attr("perm")
        return perm is not None and list(perm) == list(range(len(perm)))
    if op in ("Concat", "Sum", "Max", "Min", "Mean"):
        return len([v for v in node.inputs if v is not None]) == 1
    if op == "Split":
        return len(node.outputs) == 1
    if op in ("Pad",):
        pads = node.attr("pads")
        if pads is None and node.input(1) is not None:
            p = node.input(1).const_value()
            pads = None if p is None else list(np.ravel(p))
        return pads is not None and all(int(p) == 0 for p in pads)
    if op == "Tile":
        r = node.input(1).const_value() if node.input(1) is not None else None
        return r is not None and bool(np.all(np.asarray(r) == 1))
    if op in ("Reshape", "Expand", "Flatten", "Squeeze", "Unsqueeze"):
        return _same_shape(x, out)
    if op == "Slice":
        if _same_shape(x, out):
            return True
        starts = node.input(1).const_value() if node.input(1) is not None else None
        ends = node.input(2).const_value() if node.input(2) is not None else None
        steps = node.input(4).const_value() if node.input(4) is not None else None
        if starts is None or ends is None or (node.input(4) is not None and steps is None):
            return False
        return bool(np.all(np.asarray(starts) == 0) and np.all(np.asarray(ends) >= _INT64_MAX // 2)
                    and (steps is None or np.all(np.asarray(steps) == 1)))
    if op in ("Mul", "Div", "Add", "Sub", "Pow"):
        c = node.input(1).const_value() if node.input(1) is not None else None
        operand = x
        if c is None and op in ("Mul", "Add"):
            c = x.const_value()
            operand = node.input(1)
        if c is None or operand is None or operand.dtype is None:
            return False
        c = np.asarray(c)
        if np_dtype(operand.dtype) != c.dtype:
            return False
        neutral = {"Mul": 1, "Div": 1, "Pow": 1, "Add": 0, "Sub": 0}[op]
        return bool(np.all(c == neutral)) and _broadcast_is_noop(operand, c)
    return False


@register_pass
class EliminateNoOps(Pass):
    """Remove ops that return their input unchanged.

    Rules: Cast to the same type; Transpose with identity perm; Pad of zeros; Slice over the
    full range; single-input Concat/Sum/Max/Min/Mean; one-output Split; Tile by ones;
    Reshape/Expand/Flatten/Squeeze/Unsqueeze whose output shape equals the input shape;
    Mul/Div/Pow by 1 and Add/Sub of 0 when the constant neither broadcasts the input to a
    larger shape nor changes its dtype. Same graph-output refusal as ``eliminate-identity``.
    Exact.
    """

    name = "eliminate-noops"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for node in graph:
            if node.domain not in ("", "ai.onnx") or not node.outputs:
                continue
            if not _noop_reason(node):
                continue
            src = node.input(0)
            if node.op_type in ("Mul", "Add") and src is not None and src.is_const() and node.input(1) is not None \
                    and not node.input(1).is_const():
                src = node.input(1)
            out = node.output(0)
            if not _removable(graph, src, out):
                continue
            graph.replace_all_uses_with(out, src)
            if not any(o.num_uses or o.is_graph_output() for o in node.outputs):
                graph.remove(node)
            changed = True
        return changed
