"""Collapse chains of layout ops.

Rules:
  * ``Transpose(Transpose(x, p1), p2)`` -> ``Transpose(x, p1∘p2)``, removed entirely when the
    composition is the identity;
  * ``Reshape(R(x), s)`` where R is Reshape/Flatten/Squeeze/Unsqueeze read only by it and s is
    a constant shape without 0 entries (so it never copies a dim of the intermediate) ->
    ``Reshape(x, s)``;
  * a Flatten/Squeeze/Unsqueeze/Reshape chain between two static shapes becomes one Reshape.

Exact (layout ops only move data).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import Const, Match, PatternPass, Rule, Var, op, register_pass

_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def _transposes() -> Rule:
    pat = op("Transpose", op("Transpose", Var("x"), name="t1"), name="t2")

    def rewrite(m: Match, b: Any) -> Any:
        p1, p2 = m["t1"].attr("perm"), m["t2"].attr("perm")
        if p1 is None or p2 is None:
            return None
        perm = [p1[i] for i in p2]
        if perm == list(range(len(perm))):
            return b.op("Identity", m["x"])
        return b.op("Transpose", m["x"], perm=perm, name=m["t2"].name or None)

    return Rule("transpose-transpose", pat, rewrite)


def _reshapes() -> Rule:
    pat = op("Reshape", op(_RESHAPES, Var("x"), variadic=True, name="inner"), Const("s"), name="outer")

    def where(m: Match) -> bool | str:
        s = m.const("s")
        if np.any(s == 0) and not m["outer"].attr("allowzero", 0):
            return "target shape copies a dim (0) from the intermediate"
        return True

    def rewrite(m: Match, b: Any) -> Any:
        return b.op("Reshape", m["x"], m["s"], name=m["outer"].name or None)

    return Rule("reshape-reshape", pat, rewrite, where)


def _static_chain() -> Rule:
    pat = op(_RESHAPES, op(_RESHAPES, Var("x"), variadic=True, name="inner"), variadic=True, name="outer")

    def where(m: Match) -> bool | str:
        if m["outer"].op_type == "Reshape" and m["outer"].input(1) is not None and m["outer"].input(1).is_const():
            return "handled by reshape-reshape"
        out = m["outer"].output(0).static_shape()
        if out is None or m["x"].static_shape() is None:
            return "shapes are not static"
        return True

    def rewrite(m: Match, b: Any) -> Any:
        out = m["outer"].output(0).static_shape()
        return b.op("Reshape", m["x"], b.const(np.array(out, np.int64), "shape"), name=m["outer"].name or None)

    return Rule("reshape-chain", pat, rewrite, where)


@register_pass
class FuseLayoutChains(PatternPass):
    """Compose consecutive Transposes and collapse Reshape/Flatten/Squeeze/Unsqueeze chains."""

    name = "fuse-layout"

    def rules(self) -> list[Rule]:
        return [_transposes(), _reshapes(), _static_chain()]
