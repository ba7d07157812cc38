"""Resolve shape computations that depend on dynamic dims.

Exporters write ``x.reshape(x.shape[0], -1)`` as ``Shape -> Gather -> Unsqueeze -> Concat ->
Reshape``. With a symbolic batch the shape is not constant, so folding cannot remove it, but
its value is known symbolically: entry 0 is "dim 0 of x". Rule: evaluate the shape operand of
a ``Reshape`` symbolically (through Shape, Gather, Slice, Unsqueeze, Squeeze, Concat, Cast,
Identity and constants); if every entry is either a constant (not 0) or "dim i of the data
input" at position i, replace it by a constant shape with 0 at those positions (ONNX's
"copy this dim", legal when ``allowzero`` is 0). The shape computation then dies.

Refuses: ``allowzero=1``, entries that are other dims or arithmetic on dims, a constant 0.
Exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import Graph, Pass, PassContext, Value, register_pass

from ..common import same_dim

Sym = list[Any]  # entries: int, or ("dim", id(value), axis, symbol or None)


def symbolic_shape(v: Value | None, depth: int = 0) -> Sym | None:
    """The entries of a 1-D int tensor ``v`` as ints or ``("dim", id(x), axis)`` references."""
    if v is None or depth > 16:
        return None
    c = v.const_value()
    if c is not None:
        arr = np.asarray(c)
        if arr.dtype.kind not in "iu" or arr.ndim > 1:
            return None
        return [int(a) for a in arr.reshape(-1)]
    n = v.producer
    if n is None or n.domain not in ("", "ai.onnx"):
        return None
    op = n.op_type
    if op == "Shape":
        x = n.input(0)
        if x is None or x.shape is None:
            return None
        r = len(x.shape)
        start, end = n.attr("start", 0), n.attr("end", None)
        axes = list(range(r))[start:end]
        return [x.shape[a] if isinstance(x.shape[a], int) else ("dim", id(x), a, x.shape[a]) for a in axes]
    if op in ("Identity",) or (op == "Cast" and n.attr("to") in (6, 7)):
        return symbolic_shape(n.input(0), depth + 1)
    if op in ("Unsqueeze", "Squeeze"):
        # scalar <-> [1]: entries are unchanged for the 0-D/1-D cases shape code uses
        src = symbolic_shape(n.input(0), depth + 1)
        return src if src is not None and len(src) <= 1 else None
    if op == "Concat":
        out: Sym = []
        for i in n.inputs:
            s = symbolic_shape(i, depth + 1)
            if s is None:
                return None
            out += s
        return out
    if op == "Gather":
        src = symbolic_shape(n.input(0), depth + 1)
        idx = n.input(1).const_value() if n.input(1) is not None else None
        if src is None or idx is None or n.attr("axis", 0) != 0:
            return None
        return [src[int(i)] for i in np.ravel(idx)]
    if op == "Slice":
        src = symbolic_shape(n.input(0), depth + 1)
        args = [i.const_value() if i is not None else None for i in n.inputs[1:]]
        if src is None or len(args) < 2 or args[0] is None or args[1] is None:
            return None
        if len(args) > 2 and n.input(3) is not None and (args[2] is None or list(np.ravel(args[2])) not in ([0], [-1])):
            return None
        step = int(np.ravel(args[3])[0]) if len(args) > 3 and args[3] is not None else 1
        return src[int(np.ravel(args[0])[0]):int(np.ravel(args[1])[0]):step]
    return None


@register_pass
class ResolveDynamicReshape(Pass):
    """Give Reshapes whose target copies the input's own dims a constant shape (0 = copy)."""

    name = "resolve-reshape"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for node in graph:
            if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or node.attr("allowzero", 0):
                continue
            x, s = node.input(0), node.input(1)
            if x is None or s is None or s.is_const():
                continue
            sym = symbolic_shape(s)
            if sym is None:
                continue
            target = []
            for pos, e in enumerate(sym):
                if isinstance(e, int) and e != 0:
                    target.append(e)
                elif isinstance(e, tuple) and (
                    (e[1] == id(x) and e[2] == pos)
                    or (x.shape is not None and pos < len(x.shape) and same_dim(e[3], x.shape[pos]))
                ):
                    target.append(0)
                else:
                    break
            else:
                if target.count(-1) > 1:
                    continue
                node.set_input(1, graph.add_initializer(s.name + "_const", np.array(target, np.int64)))
                changed = True
        return changed
