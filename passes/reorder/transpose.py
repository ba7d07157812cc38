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
  * ``Concat(Transpose(a, p), Transpose(b, p), ..., axis=k)`` -> ``Transpose(Concat(a, b, ...,
    axis=p[k]), p)``: n transposes become one;
  * ``Split(Transpose(x, p), axis=k)`` -> ``Split(x, axis=p[k])`` with the Transpose on each
    output, when every output reaches a Transpose to cancel with;
  * ``Pad(Transpose(x, p), pads)`` -> ``Transpose(Pad(x, pads permuted by p), p)`` (constant
    pads, no ``axes`` input);
  * reshape-like ops (Reshape, Flatten, Squeeze, Unsqueeze) sink the same way through unary
    elementwise ops when another reshape-like op lies below, so ``fuse-layout`` merges them.

Hoisting, for a binary op whose other operand has no transpose (or reshape) to sink with:
  * ``Transpose(g(Transpose(a, p), b), q)`` with q undoing p -> ``g(a, Transpose(b, q))``: the
    pair cancels and only b is transposed (same rank operands);
  * ``Reshape(g(Reshape(a), b))`` back to a's static shape, b of g's full output shape ->
    ``g(a, Reshape(b, shape(a)))`` (a constant b folds).

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
        if n.op_type not in UNARY + BINARY + ("Pad",) or not n.outputs:
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


def _rebuild_binary(b: Any, g: Any, inner: Any, a: Value, other: Value) -> Value:
    """Binary op ``g`` again, reading ``a`` where it read ``inner``'s output and ``other`` for
    its other operand, in the original operand order (Sub, Div, Pow care)."""
    ins = (a, other) if g.input(0) is inner.output(0) else (other, a)
    return b.op(g.op_type, *ins, name=g.name or None, **{k: g.attr(k) for k in g.attrs})


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
        y = _rebuild_binary(b, g, t, m["a"], b.const(cp, "operand"))
        return b.op("Transpose", y, perm=perm, name=t.name or None)

    return Rule("sink-transpose-const", pat, rewrite, where)


def _concat() -> Rule:
    pat = op("Concat", op("Transpose", Var("x"), name="t", single_use=False), variadic=True, name="c")

    def where(m: Match) -> bool | str:
        perm = m["t"].attr("perm")
        prods = [v.producer if v is not None else None for v in m["c"].inputs]
        if perm is None or len(prods) < 2:
            return "needs two or more transposed inputs"
        if any(p is None or p.op_type != "Transpose" or p.attr("perm") != perm for p in prods):
            return "every input must be a Transpose with the same perm"
        if all(p.output(0).num_uses == 1 for p in prods):
            return True  # n transposes become one
        return reaches_transpose(m["c"].output(0)) or "shared input transposes and no Transpose below"

    def rewrite(m: Match, b: Any) -> Any:
        c, perm = m["c"], list(m["t"].attr("perm"))
        ins = [v.producer.input(0) for v in c.inputs]
        y = b.op("Concat", *ins, axis=perm[c.attr("axis") % len(perm)], name=c.name or None)
        return b.op("Transpose", y, perm=perm, name=m["t"].name or None)

    return Rule("sink-transpose-concat", pat, rewrite, where)


def _split() -> Rule:
    pat = op("Split", op("Transpose", Var("x"), name="t", single_use=False), variadic=True, name="s")

    def where(m: Match) -> bool | str:
        if m["t"].attr("perm") is None:
            return "perm must be known"
        if not all(o.has_no_uses() or reaches_transpose(o) for o in m["s"].outputs):
            return "not every output reaches a Transpose to cancel with"
        return True

    def rewrite(m: Match, b: Any) -> Any:
        sp, perm = m["s"], list(m["t"].attr("perm"))
        attrs = {k: sp.attr(k) for k in sp.attrs if k != "axis"}
        outs = b.op("Split", m["x"], *sp.inputs[1:], num_outputs=len(sp.outputs), name=sp.name or None,
                    axis=perm[(sp.attr("axis", 0) or 0) % len(perm)], **attrs)
        outs = outs if isinstance(outs, list | tuple) else [outs]
        return [b.op("Transpose", o, perm=perm) for o in outs]

    return Rule("sink-transpose-split", pat, rewrite, where)


def _pad() -> Rule:
    pat = op("Pad", op("Transpose", Var("x"), name="t", single_use=False), variadic=True, name="pd")

    def where(m: Match) -> bool | str:
        pd, perm = m["pd"], m["t"].attr("perm")
        if perm is None:
            return "perm must be known"
        if len(pd.inputs) > 3 and pd.input(3) is not None:
            return "Pad with an axes input"
        pads = pd.attr("pads") if pd.attr("pads") is not None else (
            pd.input(1).const_value() if len(pd.inputs) > 1 and pd.input(1) is not None else None)
        if pads is None or len(np.ravel(pads)) != 2 * len(perm):
            return "pads must be constant"
        return reaches_transpose(pd.output(0)) or "no Transpose below to cancel with"

    def rewrite(m: Match, b: Any) -> Any:
        pd, perm = m["pd"], list(m["t"].attr("perm"))
        r = len(perm)
        old = np.ravel(pd.attr("pads") if pd.attr("pads") is not None else pd.input(1).const_value()).astype(np.int64)
        new = np.zeros_like(old)
        for i in range(r):  # output axis i of the Transpose is axis perm[i] of x
            new[perm[i]], new[r + perm[i]] = old[i], old[r + i]
        attrs = {k: pd.attr(k) for k in pd.attrs if k != "pads"}
        if pd.attr("pads") is not None:
            y = b.op("Pad", m["x"], pads=[int(v) for v in new], name=pd.name or None, **attrs)
        else:
            y = b.op("Pad", m["x"], b.const(new, "pads"), *pd.inputs[2:], name=pd.name or None, **attrs)
        return b.op("Transpose", y, perm=perm, name=m["t"].name or None)

    return Rule("sink-transpose-pad", pat, rewrite, where)


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


def _hoist_transpose() -> Rule:
    pat = op("Transpose", op(BINARY[:-1], op("Transpose", Var("a"), name="t1"), Var("b"), name="g",
                             commutative=True), name="t2")

    def where(m: Match) -> bool | str:
        p, q = m["t1"].attr("perm"), m["t2"].attr("perm")
        if p is None or q is None or [p[i] for i in q] != list(range(len(p))):
            return "the outer Transpose does not undo the inner one"
        b = m["b"]
        if b.is_const():
            return "constant operand: sinking handles it"
        if b.rank is None or b.rank != len(p):
            return "the other operand must have the same known rank"
        if b.producer is not None and b.producer.op_type == "Transpose":
            return "both operands transposed: sinking handles it"
        return True

    def rewrite(m: Match, b: Any) -> Any:
        g = m["g"]
        bt = b.op("Transpose", m["b"], perm=list(m["t2"].attr("perm")))
        return _rebuild_binary(b, g, m["t1"], m["a"], bt)

    return Rule("hoist-transpose-binary", pat, rewrite, where)


def _hoist_reshape() -> Rule:
    pat = op("Reshape", op(BINARY[:-1], op("Reshape", Var("a"), None, name="r1"), Var("b"), name="g",
                           commutative=True), None, name="r2")

    def where(m: Match) -> bool | str:
        a, bv, g, r2 = m["a"], m["b"], m["g"], m["r2"]
        sa, sb, sg, so = a.static_shape(), bv.static_shape(), g.output(0).static_shape(), r2.output(0).static_shape()
        if sa is None or sb is None or sg is None or so is None:
            return "static shapes needed"
        if tuple(so) != tuple(sa):
            return "the outer Reshape does not restore the inner one's input shape"
        if tuple(sb) != tuple(sg):
            return "the other operand broadcasts"
        if bv.producer is not None and bv.producer.op_type == "Reshape":
            return "both operands reshaped: sinking handles it"
        return True

    def rewrite(m: Match, b: Any) -> Any:
        g = m["g"]
        shape = b.const(np.array(m["a"].static_shape(), np.int64), "shape")
        br = b.op("Reshape", m["b"], shape)
        return _rebuild_binary(b, g, m["r1"], m["a"], br)

    return Rule("hoist-reshape-binary", pat, rewrite, where)


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
        return [_binary_both(), _unary(), _binary_const(), _reduce(), _concat(), _split(), _pad(), _reshape_unary(),
                _hoist_transpose(), _hoist_reshape()]
