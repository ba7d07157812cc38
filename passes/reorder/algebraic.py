"""Algebraic reorderings that shrink work.

Rules:
  * ``MaxPool(f(x))`` -> ``f(MaxPool(x))`` for a monotonic non-decreasing elementwise f
    (Relu, LeakyRelu with alpha >= 0, Sigmoid, Tanh, Clip, HardSigmoid with alpha >= 0,
    Elu, Softplus, HardSwish excluded - it is not monotonic): max commutes with f, and f then
    runs on the pooled, smaller tensor. Also for GlobalMaxPool. Only when MaxPool's indices
    output is unused and f's output is read only by the pool, and not when f follows a
    Conv/Gemm/MatMul: runtimes fuse the activation into those (measured: moving it made ORT
    slower on squeezenet and vgg), so there the reorder would cost more than it saves.
  * ``Conv(x * s, W, b)`` / ``MatMul(x * s, W)`` / ``Gemm(x * s, B, C)`` with a scalar constant
    s and constant weights -> the same op on x with ``W * s`` (division by s likewise): the
    activation-sized multiply disappears into the weights - except at the end of a decomposed
    Gelu (``x * (1 + erf(..)) * 0.5``), which ORT fuses only when it sees the whole pattern.

Exact up to fp32 rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import Const, Match, Opt, PatternPass, Rule, Var, op, register_pass

#: producers that ORT (and most runtimes) fuse a following activation into
FUSED_INTO = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "QLinearConv"})
MONOTONIC = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "Elu", "Softplus")


def _pool_rule(pool: str) -> Rule:
    pat = op(pool, op(MONOTONIC, Var("x"), variadic=True, name="act"), name="pool")

    def where(m: Match) -> bool | str:
        act, p = m["act"], m["pool"]
        if len(p.outputs) > 1 and (p.output(1).num_uses or p.output(1).is_graph_output()):
            return "MaxPool indices are used"
        if act.op_type in ("LeakyRelu", "HardSigmoid", "Elu") and act.attr("alpha", 0.01) < 0:
            return "activation is not monotonic non-decreasing (alpha < 0)"
        if act.op_type == "Clip" and any(v is not None and not v.is_const() for v in act.inputs[1:]):
            return "Clip bounds are not constant"
        src = act.input(0).producer if act.input(0) is not None else None
        if src is not None and src.op_type in FUSED_INTO:
            return f"runtimes fuse the activation into the preceding {src.op_type}; moving it would cost more"
        return True

    def rewrite(m: Match, b: Any) -> Any:
        act, p = m["act"], m["pool"]
        pattrs = {k: p.attr(k) for k in p.attrs}
        pooled = b.op(pool, m["x"], name=p.name or None, **pattrs)
        aattrs = {k: act.attr(k) for k in act.attrs}
        y = b.op(act.op_type, pooled, *act.inputs[1:], name=act.name or None, **aattrs)
        return [y] + [None] * (len(p.outputs) - 1)

    return Rule(f"{pool.lower()}-after-activation", pat, rewrite, where)


def _gelu_tail(v: Any) -> bool:
    """True if ``v`` is ``x * (1 + erf(..))`` or ``x * (1 + tanh(..))``: the body of a
    decomposed Gelu, whose trailing ``* 0.5`` runtimes need to see to fuse it."""
    p = v.producer if v is not None else None
    if p is None or p.op_type != "Mul":
        return False
    for i in p.inputs:
        q = i.producer if i is not None else None
        if q is not None and q.op_type == "Add":
            for j in q.inputs:
                r = j.producer if j is not None else None
                if r is not None and r.op_type in ("Erf", "Tanh"):
                    return True
    return False


def _scalar_rule(kind: str, scale_op: str) -> Rule:
    mul = op(scale_op, Var("x"), Const("s"), commutative=scale_op == "Mul", name="scale")
    if kind == "Conv":
        pat = op("Conv", mul, Const("w"), Opt(Var("b")), name="main")
    elif kind == "MatMul":
        pat = op("MatMul", mul, Const("w"), name="main")
    else:
        pat = op("Gemm", mul, Const("w"), Opt(Var("b")), name="main")

    def where(m: Match) -> bool | str:
        s, w = m.const("s"), m.const("w")
        if s.size != 1 or s.dtype != w.dtype or w.dtype.kind != "f":
            return "scale must be a float scalar of the weights' dtype"
        if scale_op == "Div" and m["scale"].input(1) is not m["s"]:
            return "divisor must be the constant"
        if scale_op == "Div" and float(s.reshape(-1)[0]) == 0:
            return "division by zero"
        x = m["x"]
        if x.shape is not None and m["scale"].output(0).shape is not None and x.shape != m["scale"].output(0).shape:
            return "the scalar broadcasts the input to a larger shape"
        if _gelu_tail(x):
            return "the scale ends a decomposed Gelu that runtimes fuse (BiasGelu); moving it would cost more"
        return True

    def rewrite(m: Match, b: Any) -> Any:
        s = float(m.const("s").reshape(-1)[0])
        f = s if scale_op == "Mul" else 1.0 / s
        w = m.const("w")
        main = m["main"]
        attrs = {k: main.attr(k) for k in main.attrs}
        ins = [m["x"], b.const((w.astype(np.float64) * f).astype(w.dtype), "weight")] + list(main.inputs[2:])
        return b.op(kind, *ins, name=main.name or None, **attrs)

    return Rule(f"scalar-{scale_op.lower()}-into-{kind.lower()}", pat, rewrite, where)


@register_pass
class AlgebraicReorder(PatternPass):
    """Move monotonic activations after MaxPool; fold scalar input scales into weights."""

    name = "reorder-algebraic"

    def rules(self) -> list[Rule]:
        rules = [_pool_rule("MaxPool"), _pool_rule("GlobalMaxPool")]
        for k in ("Conv", "MatMul", "Gemm"):
            for s in ("Mul", "Div"):
                rules.append(_scalar_rule(k, s))
        return rules
