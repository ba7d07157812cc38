"""Resolve shape computations that depend on dynamic dims.

Exporters write ``x.reshape(x.shape[0], -1)`` as ``Shape -> Gather -> Unsqueeze -> Concat ->
Reshape``. With a symbolic batch the shape is not constant, so folding cannot remove it, but
its value is known symbolically: entry 0 is "dim 0 of x". Rule: evaluate the shape operand of
a ``Reshape`` symbolically (through Shape, Gather, Slice, Unsqueeze, Squeeze, Concat, Cast,
Identity and constants); if every entry is either a constant (not 0) or "dim i of the data
input" at position i, replace it by a constant shape with 0 at those positions (ONNX's
"copy this dim", legal when ``allowzero`` is 0). When instead exactly one entry is unknown
(another tensor's dim, arithmetic on dims) and all others are positive constants, that entry
becomes -1 (a valid Reshape keeps the element count, so it can only be the count divided by the
other entries). With one unknown entry "dim a of y" next to a -1, where x is computed from y by
ops whose element count follows (layout ops, unary and broadcast-free binary elementwise ops,
(de)quantization, Gemm/MatMul with 2-D weights), count(x) / y[a] is a constant, so the -1 is a
constant too and the unknown entry becomes the -1 (a CRNN's ``reshape(seq, 1, -1)`` after its
classifier). The shape computation then dies. A Reshape output whose declared rank disagrees
with the now constant target (a stale export annotation) gets the target's rank.

Refuses: ``allowzero=1``, two or more unknown entries, an unknown entry next to a 0, a
constant 0.
Exact.
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from typing import Any

import numpy as np

from graphopt import Graph, Pass, PassContext, Value, register_pass

from ..common import same_dim

log = logging.getLogger(__name__)

Sym = list[Any]  # entries: int, ("dim", id(value), axis, symbol or None, value), or ("?",) (unknown)


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
        # a negative static dim (PaddlePaddle writes -1 for "any size") is as unknown as a symbol
        return [d if isinstance(d, int) and d >= 0 else ("dim", id(x), a, d if isinstance(d, str) else None, x)
                for a, d in ((a, x.shape[a]) for a in axes)]
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
                if i is None or i.shape != (1,):
                    return None
                s = [("?",)]  # one entry, value unknown (arithmetic on dims, a data value...)
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
            target = _constant_target(x, sym)
            if target is None:
                continue
            node.set_input(1, graph.add_initializer(s.name + "_const", np.array(target, np.int64)))
            changed = True
            y = node.output(0)
            if y.shape is not None and len(y.shape) != len(target):
                # the file declared a rank the Reshape cannot produce (a stale export annotation);
                # ONNX's inference now sees the constant target and would reject the model
                log.warning("%s: declared rank %d, but the Reshape makes rank %d: declaration corrected",
                            y.name, len(y.shape), len(target))
                y.shape = tuple(t if t > 0 else x.shape[i] if t == 0 and x.shape is not None and i < len(x.shape)
                                and not (isinstance(x.shape[i], int) and x.shape[i] < 0) else None
                                for i, t in enumerate(target))
        return changed


def _constant_target(x: Value, sym: Sym) -> list[int] | None:
    """A constant Reshape target equal to ``sym`` for input ``x``, or None.

    Entries that are "dim i of x" at position i become 0 (copy). Otherwise, when exactly one
    entry is unknown and every other one is a positive constant, that entry becomes -1: a valid
    Reshape keeps the element count, so the unknown entry can only be count / product(others).
    (Not combined with 0 entries: a copied dim of size 0 would make the -1 undecidable.)
    """
    target: list[int | None] = []
    for pos, e in enumerate(sym):
        if isinstance(e, int) and e != 0:
            target.append(e)
        elif isinstance(e, tuple) and len(e) == 5 and (
            (e[1] == id(x) and e[2] == pos)
            or (x.shape is not None and pos < len(x.shape) and same_dim(e[3], x.shape[pos]))
        ):
            target.append(0)
        else:
            target.append(None)
    unknown = target.count(None)
    if unknown == 0:
        return None if target.count(-1) > 1 else target  # type: ignore[return-value]
    if unknown == 1 and all(t is None or t > 0 for t in target):
        return [-1 if t is None else t for t in target]
    if unknown == 1 and target.count(-1) == 1 and all(t is None or t > 0 or t == -1 for t in target):
        # [dim a of y, consts..., -1]: the -1 is count(x) / (y[a] * consts); when count(x) / y[a]
        # is a known constant R (x computed from y by ops whose element count follows), the -1
        # is the constant R / consts and the unknown entry can be the -1 instead.
        e = sym[target.index(None)]
        if not (isinstance(e, tuple) and len(e) == 5):
            return None
        ratio = _count_ratio(x, e[4], e[2])
        known = math.prod(t for t in target if t is not None and t > 0)
        if ratio is None or ratio % known or ratio // known <= 0:
            return None
        k = int(ratio // known)
        return [-1 if t is None else k if t == -1 else t for t in target]
    return None


_SAME_COUNT = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast", "Relu",
                         "Sigmoid", "Tanh", "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Clip", "LeakyRelu",
                         "HardSigmoid", "HardSwish", "Elu", "Softmax", "LogSoftmax", "Gelu"})


_QUANT = frozenset({"DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"})


def _fits_into(small: Value, big: Value) -> bool:
    """``small`` broadcasts into ``big`` without growing it (static dims: 1 or equal)."""
    if small.shape is None or big.shape is None or len(small.shape) > len(big.shape):
        return False
    for d, e in zip(small.shape, big.shape[len(big.shape) - len(small.shape):], strict=True):
        if not (isinstance(d, int) and (d == 1 or (isinstance(e, int) and e == d))):
            return False
    return True


def _count_ratio(x: Value, y: Value, axis: int) -> Fraction | None:
    """``count(x) / y.shape[axis]`` as a constant when x is computed from y by a chain of ops
    whose element count follows from their input's (layout ops, unary elementwise ops,
    (de)quantization, binary elementwise ops whose other operand broadcasts in without growing
    it, and Gemm/MatMul/MatMulInteger with a 2-D weight, which swap the last dim k for n), and
    y's other dims are static; else None."""
    ratio = Fraction(1)
    cur = x
    for _ in range(32):
        if cur is y:
            if y.shape is None or axis >= len(y.shape):
                return None
            other = [d for i, d in enumerate(y.shape) if i != axis]
            if not all(isinstance(d, int) and d >= 0 for d in other):
                return None
            return ratio * math.prod(other)
        p = cur.producer
        if p is None or p.domain not in ("", "ai.onnx") or p.input(0) is None:
            return None
        if p.op_type in _SAME_COUNT or (p.op_type in _QUANT and cur is p.output(0)):
            cur = p.input(0)
            continue
        if p.op_type in ("Add", "Sub", "Mul", "Div") and p.input(1) is not None:
            a, b = p.input(0), p.input(1)
            cur = a if _fits_into(b, a) else b if _fits_into(a, b) else None
            if cur is None:
                return None
            continue
        if p.op_type in ("Gemm", "MatMul", "MatMulInteger"):
            a, w, out = p.input(0), p.input(1), p.output(0)
            if a.shape is None or w is None or w.shape is None or len(w.shape) != 2 or out.shape is None:
                return None
            if p.op_type == "Gemm" and len(a.shape) != 2:
                return None
            k = a.shape[0] if p.op_type == "Gemm" and p.attr("transA", 0) else a.shape[-1]
            n = out.shape[-1]
            if not (isinstance(k, int) and k > 0 and isinstance(n, int) and n >= 0):
                return None
            ratio *= Fraction(n, k)
            cur = a
            continue
        return None
    return None
