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

Then ``fuse-layout`` composes the meeting transposes (and removes identity ones). Exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import Const, Match, PatternPass, Rule, Value, Var, op, register_pass

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


@register_pass
class SinkTransposes(PatternPass):
    """Push Transposes down through elementwise ops until they meet another Transpose."""

    name = "sink-transposes"

    def rules(self) -> list[Rule]:
        return [_binary_both(), _unary(), _binary_const()]
