"""Collapse chains of layout ops.

Rules:
  * ``Transpose(Transpose(x, p1), p2)`` -> ``Transpose(x, p1∘p2)``, removed entirely when the
    composition is the identity;
  * ``Reshape(R(x), s)`` where R is Reshape/Flatten/Squeeze/Unsqueeze read only by it and s is
    a constant shape -> ``Reshape(x, s')``, s' being s with each 0 (copy the intermediate's
    dim) kept where R is a Reshape that copied that dim from x too, or replaced by the
    intermediate's static size (refused when it has neither);
  * a Flatten/Squeeze/Unsqueeze/Reshape chain between two static shapes becomes one Reshape;
  * a Transpose that only moves axes of static size 1 (the element order is unchanged) next to a
    reshape-like op becomes a Reshape (constant target: -1 for the one symbolic dim, or 0 for
    symbolic dims that stay in place), so the reshape chain collapses;
  * ``Slice(Slice(x))`` with constant parameters on disjoint axes (opset 10+) -> one Slice of x
    (YOLOv5's Focus layer slices rows, then columns); the inner Slice goes when its last
    reader is merged;
  * ``Unsqueeze(Squeeze(x, a), a)`` and ``Squeeze(Unsqueeze(x, a), a)`` -> x (the inner node may
    have other readers);
  * ReduceMean/Max/Min/Sum/Prod over axes of static size 1 -> x (keepdims=1) or
    ``Squeeze(x, axes)`` (keepdims=0).

Exact (layout ops only move data).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import Const, Match, Node, Opt, PatternPass, Rule, Value, Var, op, register_pass

from ..common import reduce_axes

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

    def merged(m: Match) -> np.ndarray | None:
        """The outer target with each 0 ("copy the intermediate's dim i") made to read x: kept
        where the inner Reshape copied dim i from x too, else the intermediate's static size."""
        s = np.array(np.ravel(m.const("s")), np.int64)
        if not np.any(s == 0) or m["outer"].attr("allowzero", 0):
            return s
        inner, mid = m["inner"], m["inner"].output(0)
        t = inner.input(1).const_value() if inner.op_type == "Reshape" and inner.input(1) is not None else None
        t = None if t is None or inner.attr("allowzero", 0) else np.ravel(t)
        for i in np.flatnonzero(s == 0):
            if t is not None and i < len(t) and t[i] == 0:
                continue  # the inner Reshape copied dim i from x: the 0 copies the same size
            d = mid.shape[i] if mid.shape is not None and i < len(mid.shape) else None
            if not (isinstance(d, int) and d > 0):
                return None
            s[i] = d
        return s

    def where(m: Match) -> bool | str:
        return True if merged(m) is not None else "target shape copies a dim (0) of the intermediate that x lacks"

    def rewrite(m: Match, b: Any) -> Any:
        s = merged(m)
        shape = m["s"] if np.array_equal(s, np.ravel(m.const("s"))) else b.const(s, "shape")
        return b.op("Reshape", m["x"], shape, name=m["outer"].name or None)

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


def _unit_transpose_target(t: Node) -> list[int] | str:
    """The constant Reshape target equal to Transpose ``t``, or why there is none. A Transpose
    that only moves axes of size 1 keeps the order of the elements: it is a Reshape."""
    x, perm = t.input(0), t.attr("perm")
    if x is None or x.shape is None or perm is None or len(perm) != len(x.shape):
        return "input rank or perm unknown"
    moved = [p for p in perm if x.shape[p] != 1]
    if moved != sorted(moved):
        return "moves an axis that is not statically 1"
    dims = [x.shape[p] for p in perm]
    unknown = [j for j, d in enumerate(dims) if not (isinstance(d, int) and d > 0)]
    if all(perm[j] == j for j in unknown):  # 0 copies them: exact even for empty tensors
        return [0 if j in unknown else int(d) for j, d in enumerate(dims)]  # type: ignore[arg-type]
    if len(unknown) == 1:
        return [-1 if j in unknown else int(d) for j, d in enumerate(dims)]  # type: ignore[arg-type]
    return "more than one symbolic dim, one of them changes place"


def _unit_transpose() -> Rule:
    pat = op("Transpose", Var("x"), name="t")

    def where(m: Match) -> bool | str:
        t = m["t"]
        src = m["x"].producer
        near = (src is not None and src.op_type in _RESHAPES) or any(
            c.op_type in _RESHAPES for c in t.output(0).consumers())
        if not near:
            return "no reshape next to it to merge with (kept for transpose sinking)"
        target = _unit_transpose_target(t)
        return target if isinstance(target, str) else True

    def rewrite(m: Match, b: Any) -> Any:
        target = _unit_transpose_target(m["t"])
        return b.op("Reshape", m["x"], b.const(np.array(target, np.int64), "shape"), name=m["t"].name or None)

    return Rule("unit-transpose-as-reshape", pat, rewrite, where)


def _slice_args(n: Node) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Constant (starts, ends, axes, steps) of an opset-10+ Slice, axes made non-negative."""
    vals = [n.input(i).const_value() if n.input(i) is not None else None for i in range(1, 5)]
    if any(v is None for v in vals[:2]) or (n.input(3) is not None and vals[2] is None) \
            or (n.input(4) is not None and vals[3] is None):
        return None
    starts, ends = np.ravel(vals[0]).astype(np.int64), np.ravel(vals[1]).astype(np.int64)
    axes = np.ravel(vals[2]).astype(np.int64) if vals[2] is not None else np.arange(len(starts), dtype=np.int64)
    steps = np.ravel(vals[3]).astype(np.int64) if vals[3] is not None else np.ones(len(starts), np.int64)
    if np.any(axes < 0):
        x = n.input(0)
        if x is None or x.shape is None:
            return None
        axes = np.where(axes < 0, axes + len(x.shape), axes)
    return starts, ends, axes, steps


def _slices() -> Rule:
    pat = op("Slice", op("Slice", Var("x"), None, None, Opt(None), Opt(None), name="inner", single_use=False),
             None, None, Opt(None), Opt(None), name="outer")

    def where(m: Match) -> bool | str:
        a, b = _slice_args(m["inner"]), _slice_args(m["outer"])
        if a is None or b is None:
            return "slice parameters are not constant"
        if set(a[2].tolist()) & set(b[2].tolist()):
            return "the slices cut the same axis"
        return True

    def rewrite(m: Match, b: Any) -> Any:
        a, c = _slice_args(m["inner"]), _slice_args(m["outer"])
        assert a is not None and c is not None
        args = [b.const(np.concatenate([u, v]), k) for u, v, k in zip(a, c, ("starts", "ends", "axes", "steps"),
                                                                       strict=True)]
        return b.op("Slice", m["x"], *args, name=m["outer"].name or None)

    return Rule("slice-slice", pat, rewrite, where)


def _aliasable(out: Value, new: Value) -> bool:
    """Can ``new`` stand for ``out``? Not when ``out`` is a graph output and ``new`` is a graph
    input, another output or an outer value (ONNX cannot alias those)."""
    if not out.is_graph_output():
        return True
    return not (new.is_graph_input() or new.is_graph_output() or new.producer is None
                or new.graph is not out.graph)


def _norm_axes(axes: list[int] | None, rank: int | None) -> list[int] | None:
    if axes is None or (rank is None and any(a < 0 for a in axes)):
        return None
    return sorted(a + rank if a < 0 else a for a in axes)  # type: ignore[operator]


def _squeeze_pairs() -> list[Rule]:
    """``Unsqueeze(Squeeze(x, a), a)`` and ``Squeeze(Unsqueeze(x, a), a)`` are x."""
    rules = []
    for outer, inner in (("Unsqueeze", "Squeeze"), ("Squeeze", "Unsqueeze")):
        pat = op(outer, op(inner, Var("x"), Opt(None), name="inner", single_use=False), Opt(None), name="outer")

        def where(m: Match) -> bool | str:
            x = m["x"]
            rank = None if x.shape is None else len(x.shape)
            if rank is not None and m["inner"].op_type == "Unsqueeze":
                a = reduce_axes(m["inner"])
                rank = None if a is None else rank + len(a)
            a_in, a_out = reduce_axes(m["inner"]), reduce_axes(m["outer"])
            if not a_in or _norm_axes(a_in, rank) is None or _norm_axes(a_in, rank) != _norm_axes(a_out, rank):
                return "axes differ or are unknown"
            return _aliasable(m["outer"].output(0), x) or "would alias a graph output"

        rules.append(Rule(f"{outer.lower()}-{inner.lower()}", pat, lambda m, b: m["x"], where))
    return rules


_UNIT_REDUCE = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd")


def _unit_reduce(opset: int) -> Rule:
    """A Mean/Max/Min/Sum/Prod reduction over axes of static size 1 moves no value: it is x
    (keepdims=1) or ``Squeeze(x, axes)`` (keepdims=0)."""
    pat = op(_UNIT_REDUCE, Var("x"), Opt(None), name="r")

    def axes_of(m: Match) -> list[int] | None:
        x = m["x"]
        a = _norm_axes(reduce_axes(m["r"]), None if x.shape is None else len(x.shape))
        if not a or x.shape is None or any(a_ >= len(x.shape) or x.shape[a_] != 1 for a_ in a):
            return None
        return a

    def where(m: Match) -> bool | str:
        if axes_of(m) is None:
            return "reduced axes are not all of static size 1"
        if m["r"].attr("keepdims", 1) and not _aliasable(m["r"].output(0), m["x"]):
            return "would alias a graph output"
        return True

    def rewrite(m: Match, b: Any) -> Any:
        r, axes = m["r"], axes_of(m)
        if r.attr("keepdims", 1):
            return m["x"]
        if opset >= 13:
            return b.op("Squeeze", m["x"], b.const(np.array(axes, np.int64), "axes"), name=r.name or None)
        return b.op("Squeeze", m["x"], axes=axes, name=r.name or None)

    return Rule("reduce-unit-axes", pat, rewrite, where)


@register_pass
class FuseLayoutChains(PatternPass):
    """Compose consecutive Transposes, collapse Reshape/Flatten/Squeeze/Unsqueeze chains, turn a
    Transpose of size-1 axes next to a reshape into a Reshape, merge Slices of disjoint axes,
    cancel Squeeze/Unsqueeze pairs and drop reductions over size-1 axes."""

    name = "fuse-layout"

    def rules(self) -> list[Rule]:
        opset = (self.model.opset("") if self.model is not None else None) or 0
        return [_transposes(), _reshapes(), _static_chain(), _unit_transpose(), _slices(), *_squeeze_pairs(),
                _unit_reduce(opset)]
