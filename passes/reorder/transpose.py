"""Transpose sinking, so that transposes meet and cancel.

Rules (each only when, following single-reader chains of elementwise ops from the result, a
Transpose is reached within 8 steps - sinking is pointless otherwise, and this keeps the pass
from moving transposes around without gain):
  * ``f(Transpose(x, p))`` -> ``Transpose(f(x), p)`` for unary elementwise f (Relu, Sigmoid,
    Tanh, Neg, Abs, Exp, Log, Sqrt, Erf, Cast, Clip/LeakyRelu/HardSigmoid/HardSwish/Elu...);
  * ``g(Transpose(a, p), Transpose(b, p))`` -> ``Transpose(g(a, b), p)`` for binary elementwise
    g when both operands have the same rank: one Transpose fewer at once;
  * ``g(Transpose(a, p), c)`` with c constant -> ``Transpose(g(a, c'), p)``, c' being c
    brought to the same rank and permuted by the inverse of p.

  * ``Reduce*(Transpose(x, p), axes)`` -> the reduction over ``p[axes]`` of x, then the
    Transpose (with keepdims=0 the Transpose loses the reduced axes, or disappears);
  * reshape-like ops (Reshape, Flatten, Squeeze, Unsqueeze) sink the same way through unary
    elementwise ops when another reshape-like op lies below, so ``fuse-layout`` merges them.

Then ``fuse-layout`` composes the meeting transposes (and removes identity ones). Exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import Const, Match, PatternPass, Rule, Value, Var, op, register_pass

from ..common import reduce_axes

UNARY = ("Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Cast", "Clip", "LeakyRelu",
         "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus", "Reciprocal", "Floor", "Ceil", "Sign", "Not",
         "Identity", "Gelu")
BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu", "Equal", "Less", "Greater", "And", "Or", "Where")


def reaches_transpose(v: Value, depth: int = 8) -> bool:
    """True if a Transpose is reached from ``v`` through single-reader elementwise ops."""
    for _ in range(depth):
        cons = v.consumers()
        if len(cons) != 1 or v.is_graph_output():
            return False
        n = cons[0]
        if n.op_type == "Transpose":
            return True
        if n.op_type not in UNARY + BINARY or not n.outputs:
            return False
        v = n.output(0)
    return False


def _unary() -> Rule:
    pat = op(UNARY, op("Transpose", Var("x"), name="t"), variadic=True, name="f")

    def where(m: Match) -> bool | str:
        f = m["f"]
        if any(v is not None and not v.is_const() for v in f.inputs[1:]):
            return "extra operands are not constant"
        return reaches_transpose(f.output(0)) or "no Transpose below to cancel with"

    def rewrite(m: Match, b: Any) -> Any:
        f, t = m["f"], m["t"]
        y = b.op(f.op_type, m["x"], *f.inputs[1:], name=f.name or None, **{k: f.attr(k) for k in f.attrs})
        return b.op("Transpose", y, perm=t.attr("perm"), name=t.name or None)

    return Rule("sink-transpose-unary", pat, rewrite, where)


def _binary_both() -> Rule:
    pat = op(BINARY[:-1], op("Transpose", Var("a"), name="ta"), op("Transpose", Var("b"), name="tb"), name="g")

    def where(m: Match) -> bool | str:
        pa, pb = m["ta"].attr("perm"), m["tb"].attr("perm")
        if pa is None or pa != pb:
            return "the two transposes differ"
        if m["a"].rank is None or m["a"].rank != m["b"].rank:
            return "operands must have the same known rank"
        return True

    def rewrite(m: Match, b: Any) -> Any:
        g, t = m["g"], m["ta"]
        y = b.op(g.op_type, m["a"], m["b"], name=g.name or None, **{k: g.attr(k) for k in g.attrs})
        return b.op("Transpose", y, perm=t.attr("perm"), name=t.name or None)

    return Rule("sink-transpose-binary", pat, rewrite, where)


def _binary_const() -> Rule:
    pat = op(BINARY[:-1], op("Transpose", Var("a"), name="t"), Const("c"), name="g", commutative=True)

    def where(m: Match) -> bool | str:
        perm = m["t"].attr("perm")
        if perm is None or m.const("c").ndim > len(perm):
            return "constant has a higher rank than the transpose"
        g = m["g"]
        if g.op_type in ("Sub", "Div", "Pow") and g.input(0) is not m["t"].output(0):
            return "non-commutative op with the constant first"
        return reaches_transpose(g.output(0)) or "no Transpose below to cancel with"

    def rewrite(m: Match, b: Any) -> Any:
        g, t = m["g"], m["t"]
        perm = list(t.attr("perm"))
        c = m.const("c")
        c = c.reshape((1,) * (len(perm) - c.ndim) + c.shape)
        inv = list(np.argsort(perm))
        cp = np.transpose(c, inv)
        first_is_t = g.input(0) is t.output(0)
        ins = (m["a"], b.const(cp, "operand")) if first_is_t else (b.const(cp, "operand"), m["a"])
        y = b.op(g.op_type, *ins, name=g.name or None, **{k: g.attr(k) for k in g.attrs})
        return b.op("Transpose", y, perm=perm, name=t.name or None)

    return Rule("sink-transpose-const", pat, rewrite, where)


REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSumExp", "ReduceSumSquare")


def _reduce() -> Rule:
    pat = op(REDUCE, op("Transpose", Var("x"), name="t"), None, name="r")

    def where(m: Match) -> bool | str:
        r, perm = m["r"], m["t"].attr("perm")
        if perm is None or reduce_axes(r) is None or r.attr("noop_with_empty_axes", 0):
            return "axes and perm must be constant"
        if r.attr("keepdims", 1):
            return reaches_transpose(r.output(0)) or "no Transpose below to cancel with"
        return True  # keepdims=0: the transpose shrinks (or vanishes) - always a gain

    def rewrite(m: Match, b: Any) -> Any:
        r, t = m["r"], m["t"]
        perm = list(t.attr("perm"))
        rank = len(perm)
        axes = sorted(a % rank for a in reduce_axes(r))
        src_axes = sorted(perm[a] for a in axes)
        attrs = {k: r.attr(k) for k in r.attrs if k != "axes"}
        ins = [m["x"]]
        if r.attr("axes") is not None:
            attrs["axes"] = src_axes
        else:
            ins.append(b.const(np.array(src_axes, np.int64), "axes"))
        y = b.op(r.op_type, *ins, name=r.name or None, **attrs)
        if r.attr("keepdims", 1):
            return b.op("Transpose", y, perm=perm, name=t.name or None)
        kept = [p for i, p in enumerate(perm) if i not in axes]
        new_perm = [sorted(kept).index(p) for p in kept]
        if new_perm == list(range(len(new_perm))):
            return y
        return b.op("Transpose", y, perm=new_perm, name=t.name or None)

    return Rule("sink-transpose-reduce", pat, rewrite, where)


def reaches_reshape(v: Value, depth: int = 8) -> bool:
    """True if a Reshape is reached from ``v`` through single-reader unary elementwise ops."""
    for _ in range(depth):
        cons = v.consumers()
        if len(cons) != 1 or v.is_graph_output():
            return False
        n = cons[0]
        if n.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            return True
        if n.op_type not in UNARY or not n.outputs:
            return False
        v = n.output(0)
    return False


def _reshape_unary() -> Rule:
    pat = op(UNARY, op(("Reshape", "Flatten", "Squeeze", "Unsqueeze"), Var("x"), variadic=True, name="rs"),
             variadic=True, name="f")

    def where(m: Match) -> bool | str:
        f = m["f"]
        if any(v is not None and not v.is_const() for v in f.inputs[1:]):
            return "extra operands are not constant"
        if f.op_type in ("Clip", "PRelu") and any(v is not None and v.const_value() is not None
                                                   and np.asarray(v.const_value()).size > 1 for v in f.inputs[1:]):
            return "non-scalar operands depend on the layout"
        return reaches_reshape(f.output(0)) or "no reshape below to merge with"

    def rewrite(m: Match, b: Any) -> Any:
        f, rs = m["f"], m["rs"]
        y = b.op(f.op_type, m["x"], *f.inputs[1:], name=f.name or None, **{k: f.attr(k) for k in f.attrs})
        return b.op(rs.op_type, y, *rs.inputs[1:], name=rs.name or None, **{k: rs.attr(k) for k in rs.attrs})

    return Rule("sink-reshape-unary", pat, rewrite, where)


@register_pass
class SinkTransposes(PatternPass):
    """Push Transposes (and reshapes) down through elementwise ops and reductions to cancel them."""

    name = "sink-transposes"

    def rules(self) -> list[Rule]:
        return [_binary_both(), _unary(), _binary_const(), _reduce(), _reshape_unary()]
