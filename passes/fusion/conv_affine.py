"""Fold constant per-channel Add/Mul after a Conv into its bias and weights.

Rules:
  * ``Add(Conv(x, W, b?), c)`` with c constant, broadcasting as one value per output channel
    (shape ``[C,1,..,1]``, ``[1,C,1,..,1]``, ``[1]`` or scalar) -> ``Conv(x, W, b + c)``;
  * ``Mul(Conv(x, W, b?), s)`` with s of the same per-channel form -> ``Conv(x, W*s, b*s)``;
  * ``Sub``/``Div`` by a constant are the same with ``-c`` and ``1/s``;
  * the same constants after an inference ``BatchNormalization`` fold into its scale and bias
    (pre-activation nets such as DenseNet write BN followed by a per-channel scale layer).

Refuses when the constant varies over spatial positions or the batch, when it would change
the output dtype, or when the Conv output has other readers. Exact up to fp32 rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import Const, Match, Opt, PatternPass, Rule, Var, op, register_pass


def per_channel(c: np.ndarray, c_out: int, rank: int) -> np.ndarray | None:
    """``c`` as a length-``c_out`` vector if it broadcasts as one value per channel (axis 1)."""
    if c.ndim == 0 or c.size == 1:
        return np.full(c_out, c.reshape(-1)[0], dtype=c.dtype)
    shape = list(c.shape)
    if len(shape) > rank:
        return None
    full = [1] * (rank - len(shape)) + shape
    if full[0] != 1 or any(d != 1 for d in full[2:]) or full[1] not in (1, c_out):
        return None
    return np.broadcast_to(c.reshape(-1), (c_out,)).copy()


def fold_affine(kind: str, bias: np.ndarray, c: np.ndarray) -> tuple[np.ndarray | float, np.ndarray]:
    """``(y * s + bias) kind c`` as ``y * s * f + bias'``: returns the factor f for the scale
    and the new bias (Add/Sub move the bias, Mul/Div scale both)."""
    if kind == "Add":
        return 1.0, bias + c
    if kind == "Sub":
        return 1.0, bias - c
    f = c if kind == "Mul" else 1.0 / c
    return f, bias * f


def _conv_rule(kind: str) -> Rule:
    pat = op(kind, op("Conv", Var("x"), Const("w"), Opt(Const("b")), name="conv"), Const("c"), name="post",
             commutative=kind in ("Add", "Mul"))

    def where(m: Match) -> bool | str:
        w, c = m.const("w"), m.const("c")
        if w.dtype.kind != "f" or c.dtype != w.dtype:
            return "weights and constant must share a float dtype"
        if kind in ("Sub", "Div") and m["post"].input(1) is not m["c"]:
            return "constant must be the right-hand operand"
        if per_channel(c, w.shape[0], w.ndim) is None:
            return f"constant of shape {list(c.shape)} is not one value per output channel"
        if kind == "Div" and np.any(per_channel(c, w.shape[0], w.ndim) == 0):
            return "division by zero"
        return True

    def rewrite(m: Match, b: Any) -> Any:
        conv = m["conv"]
        w = m.const("w")
        c = per_channel(m.const("c"), w.shape[0], w.ndim).astype(np.float64)
        bias = m.const("b").astype(np.float64) if "b" in m else np.zeros(w.shape[0])
        f, bias = fold_affine(kind, bias, c)
        wd = w.astype(np.float64) * np.reshape(f, (-1,) + (1,) * (w.ndim - 1))
        attrs = {k: conv.attr(k) for k in conv.attrs}
        return b.op("Conv", m["x"], b.const(wd.astype(w.dtype), "weight"), b.const(bias.astype(w.dtype), "bias"),
                    name=conv.name or None, **attrs)

    return Rule(f"conv-{kind.lower()}", pat, rewrite, where)


def _param(m: Match, k: str) -> np.ndarray:
    return m.const(k).astype(np.float64).reshape(-1)


def _bn_rule(kind: str) -> Rule:
    pat = op(kind, op("BatchNormalization", Var("x"), Const("s"), Const("b"), Const("mean"), Const("var"), name="bn"),
             Const("c"), name="post", commutative=kind in ("Add", "Mul"))

    def where(m: Match) -> bool | str:
        bn = m["bn"]
        if any(o.name and (o.num_uses or o.is_graph_output()) for o in bn.outputs[1:]) or bn.attr("training_mode", 0):
            return "BatchNormalization is in training mode"
        s, c = m.const("s"), m.const("c")
        x = m["x"]
        if s.dtype.kind != "f" or c.dtype != s.dtype or x.rank is None:
            return "parameters must share a float dtype and the input rank must be known"
        if kind in ("Sub", "Div") and m["post"].input(1) is not m["c"]:
            return "constant must be the right-hand operand"
        pc = per_channel(c, s.size, x.rank)
        if pc is None:
            return f"constant of shape {list(c.shape)} is not one value per channel"
        if kind == "Div" and np.any(pc == 0):
            return "division by zero"
        return True

    def rewrite(m: Match, b: Any) -> Any:
        bn = m["bn"]
        s, bias = _param(m, "s"), _param(m, "b")
        c = per_channel(m.const("c"), s.size, m["x"].rank).astype(np.float64)
        f, bias = fold_affine(kind, bias, c)
        s = s * f
        dt = m.const("s").dtype
        attrs = {k: bn.attr(k) for k in bn.attrs}
        return b.op("BatchNormalization", m["x"], b.const(s.astype(dt), "scale"), b.const(bias.astype(dt), "bias"),
                    m["mean"], m["var"], name=bn.name or None, **attrs)

    return Rule(f"bn-{kind.lower()}", pat, rewrite, where)


@register_pass
class FuseConvAffine(PatternPass):
    """Fold constant per-channel Add/Sub/Mul/Div after a Conv or BatchNormalization into it."""

    name = "fuse-conv-affine"

    def rules(self) -> list[Rule]:
        return [_conv_rule(k) for k in ("Add", "Sub", "Mul", "Div")] + [_bn_rule(k) for k in ("Add", "Sub", "Mul", "Div")]
