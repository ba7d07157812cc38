"""Recognize decomposed activations and normalizations that exporters write out op by op.

Rules (each only where the model's opset has the fused op; the opset is never raised):
  * HardSigmoid: ``Clip(x*a + b, 0, 1)``; ``Clip(x + 3, 0, 6) / 6`` (or ``* 1/6``).
  * HardSwish (opset >= 14): ``x * HardSigmoid(x, 1/6, 1/2)``.
  * Gelu (opset >= 20): ``0.5 * x * (1 + erf(x / sqrt(2)))`` in either association, with the
    division written as a multiplication too; tanh form
    ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` -> ``Gelu(approximate="tanh")``.
  * LayerNormalization (opset >= 17): ``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)``
    over trailing axes, optionally ``* gamma + beta``; a constant Mul/Add after any
    LayerNormalization folds into its scale and bias.
  * Softmax: ``exp(x - max(x)) / sum(exp(x - max(x)))`` (and the form without the max) along
    one axis; before opset 13 only along the last axis, where the old 2-D semantics agree.

Every rule checks constants numerically (tolerance 1e-5 relative), axes, keepdims, and that
intermediate values are read only inside the pattern. Exact up to fp32 rounding.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from graphopt import Const, Match, Node, Opt, PatternPass, Rule, Var, op, register_pass
from graphopt.ir import np_dtype

from ..common import reduce_axes


def _close(arr: Any, want: float, rtol: float = 1e-4) -> bool:
    if arr is None:
        return False
    a = np.asarray(arr)
    return a.size == 1 and a.dtype.kind == "f" and abs(float(a.reshape(-1)[0]) - want) <= rtol * max(abs(want), 1e-6)


def _clip_bounds(n: Node) -> tuple[float | None, float | None]:
    lo, hi = n.attr("min"), n.attr("max")
    if n.input(1) is not None:
        v = n.input(1).const_value()
        lo = None if v is None else float(np.asarray(v).reshape(-1)[0])
    if n.input(2) is not None:
        v = n.input(2).const_value()
        hi = None if v is None else float(np.asarray(v).reshape(-1)[0])
    return lo, hi


def _internal_only(m: Match, *values: Any) -> bool:
    inside = set(map(id, m.nodes))
    return all(all(id(u) in inside for u, _ in v.uses) and not v.is_graph_output() for v in values)


# -- HardSigmoid / HardSwish -------------------------------------------------------------------
def _hardsigmoid_rules() -> list[Rule]:
    clip_affine = op("Clip", op("Add", op("Mul", Var("x"), Const("a"), commutative=True), Const("b"),
                                commutative=True), None, None, name="clip")

    def w1(m: Match) -> bool | str:
        lo, hi = _clip_bounds(m["clip"])
        return (lo == 0.0 and hi == 1.0) or "Clip bounds are not [0, 1]"

    def r1(m: Match, b: Any) -> Any:
        return b.op("HardSigmoid", m["x"], alpha=float(m.const("a").reshape(-1)[0]),
                    beta=float(m.const("b").reshape(-1)[0]))

    def scalar(m: Match, *ks: str) -> bool:
        return all(m.const(k).size == 1 for k in ks)

    relu6 = op("Clip", op("Add", Var("x"), Const("three"), commutative=True), None, None, name="clip")
    div6 = op("Div", relu6, Const("six"))
    mul6 = op("Mul", relu6, Const("sixth"), commutative=True)

    def w2(m: Match) -> bool | str:
        lo, hi = _clip_bounds(m["clip"])
        if lo != 0.0 or hi != 6.0:
            return "Clip bounds are not [0, 6]"
        if not _close(m.const("three"), 3.0):
            return "offset is not 3"
        if "six" in m and not _close(m.const("six"), 6.0):
            return "divisor is not 6"
        if "sixth" in m and not _close(m.const("sixth"), 1 / 6):
            return "factor is not 1/6"
        return True

    def r2(m: Match, b: Any) -> Any:
        return b.op("HardSigmoid", m["x"], alpha=1 / 6, beta=0.5)

    def w1s(m: Match) -> bool | str:
        return w1(m) if scalar(m, "a", "b") else "scale/offset are not scalars"

    return [Rule("hardsigmoid-affine", clip_affine, r1, w1s), Rule("hardsigmoid-relu6-div", div6, r2, w2),
            Rule("hardsigmoid-relu6-mul", mul6, r2, w2)]


def _hardswish_rule() -> Rule:
    pat = op("Mul", Var("x"), op("HardSigmoid", Var("x"), name="hs"), commutative=True)

    def where(m: Match) -> bool | str:
        hs = m["hs"]
        ok = abs(hs.attr("alpha", 0.2) - 1 / 6) < 1e-6 and abs(hs.attr("beta", 0.5) - 0.5) < 1e-6
        return ok or "HardSigmoid is not (1/6, 1/2)"

    return Rule("hardswish", pat, lambda m, b: b.op("HardSwish", m["x"]), where)


# -- Gelu --------------------------------------------------------------------------------------
def _gelu_rules() -> list[Rule]:
    scaled = [op("Div", Var("x"), Const("root2"), name="scale"),
              op("Mul", Var("x"), Const("inv_root2"), commutative=True, name="scale")]
    rules = []
    for k, sc in enumerate(scaled):
        onep = op("Add", op("Erf", sc), Const("one"), commutative=True)
        form_a = op("Mul", op("Mul", Var("x"), onep, commutative=True), Const("half"), commutative=True)
        form_b = op("Mul", op("Mul", Var("x"), Const("half"), commutative=True), onep, commutative=True)
        form_c = op("Mul", Var("x"), op("Mul", onep, Const("half"), commutative=True), commutative=True)

        def where(m: Match) -> bool | str:
            if "root2" in m and not _close(m.const("root2"), math.sqrt(2)):
                return "divisor is not sqrt(2)"
            if "inv_root2" in m and not _close(m.const("inv_root2"), 1 / math.sqrt(2)):
                return "factor is not 1/sqrt(2)"
            if not _close(m.const("one"), 1.0) or not _close(m.const("half"), 0.5):
                return "constants are not 1 and 0.5"
            return True

        for j, f in enumerate((form_a, form_b, form_c)):
            rules.append(Rule(f"gelu-erf-{k}{j}", f, lambda m, b: b.op("Gelu", m["x"]), where))
    cube = op("Pow", Var("x"), Const("three"))
    inner = op("Mul", op("Add", Var("x"), op("Mul", cube, Const("c044"), commutative=True), commutative=True),
               Const("k"), commutative=True)
    onep = op("Add", op("Tanh", inner), Const("one"), commutative=True)
    tanh_forms = [op("Mul", op("Mul", Var("x"), Const("half"), commutative=True), onep, commutative=True),
                  op("Mul", op("Mul", Var("x"), onep, commutative=True), Const("half"), commutative=True)]

    def wt(m: Match) -> bool | str:
        ok = (_close(m.const("three"), 3.0) and _close(m.const("c044"), 0.044715) and
              _close(m.const("k"), math.sqrt(2 / math.pi)) and _close(m.const("one"), 1.0) and
              _close(m.const("half"), 0.5))
        return ok or "constants are not those of the tanh approximation"

    for j, f in enumerate(tanh_forms):
        rules.append(Rule(f"gelu-tanh-{j}", f, lambda m, b: b.op("Gelu", m["x"], approximate="tanh"), wt))
    return rules


# -- LayerNormalization ------------------------------------------------------------------------
def _layernorm_rules() -> list[Rule]:
    def core() -> Any:
        d = op("Sub", Var("x"), op("ReduceMean", Var("x"), None, name="mean"), name="sub", single_use=False)
        sq = [op("Pow", Var("d2"), Const("two"), name="sq"), op("Mul", Var("d2"), Var("d3"), name="sq")]
        return d, sq

    rules = []
    d, sqs = core()
    for k, sq in enumerate(sqs):
        var = op("ReduceMean", sq, None, name="var")
        std = op("Sqrt", op("Add", var, Const("eps"), commutative=True))
        normed = op("Div", d, std, name="div")
        rules.append(Rule(f"layernorm-affine-{k}",
                          op("Add", op("Mul", normed, Const("gamma"), commutative=True), Const("beta"),
                             commutative=True), _ln_rewrite, _ln_where))
        rules.append(Rule(f"layernorm-{k}", normed, _ln_rewrite, _ln_where))
    return rules


def _ln_where(m: Match) -> bool | str:
    sub = m["sub"]
    d = sub.output(0)
    for key in ("d2", "d3"):
        if key in m and m[key] is not d:
            return "squared term is not the centered input"
    if "two" in m and not _close(m.const("two"), 2.0):
        return "exponent is not 2"
    if not _internal_only(m, d):
        return "the centered value is read outside the pattern"
    x = m["x"]
    if x.rank is None:
        return "input rank is unknown"
    a1, a2 = reduce_axes(m["mean"]), reduce_axes(m["var"])
    if a1 is None or a2 is None:
        return "reduction axes are not constant"
    r = x.rank
    n1, n2 = sorted(a % r for a in a1), sorted(a % r for a in a2)
    if n1 != n2 or n1 != list(range(n1[0], r)):
        return f"reductions over {a1} and {a2} are not the same trailing axes"
    if not m["mean"].attr("keepdims", 1) or not m["var"].attr("keepdims", 1):
        return "reductions must keep dims"
    eps = m.const("eps")
    if eps.size != 1:
        return "epsilon is not a scalar"
    tail = x.shape[n1[0]:]
    for k in ("gamma", "beta"):
        if k in m:
            c = m.const(k)
            if c.ndim > len(tail) or not all(isinstance(t, int) for t in tail):
                return f"{k} does not broadcast over the normalized axes only"
            try:
                np.broadcast_to(c, tail)
            except ValueError:
                return f"{k} of shape {list(c.shape)} does not match normalized shape {list(tail)}"
    if x.dtype is not None and x.dtype not in (1, 10, 11, 16):
        return "LayerNormalization needs a float input"
    return True


def _ln_rewrite(m: Match, b: Any) -> Any:
    x = m["x"]
    r = x.rank
    axis = min(a % r for a in reduce_axes(m["mean"]))
    tail = tuple(int(t) for t in x.shape[axis:]) if all(isinstance(t, int) for t in x.shape[axis:]) else None
    dt = np_dtype(x.dtype) if x.dtype else np.float32
    if "gamma" in m:
        gamma = np.broadcast_to(m.const("gamma"), tail).astype(dt)
    elif tail is not None:
        gamma = np.ones(tail, dt)
    else:
        return None
    beta = np.broadcast_to(m.const("beta"), tail).astype(dt) if "beta" in m else None
    ins = [x, b.const(gamma, "scale")] + ([b.const(beta, "bias")] if beta is not None else [])
    return b.op("LayerNormalization", *ins, axis=axis, epsilon=float(m.const("eps").reshape(-1)[0]))


def _ln_affine_rules() -> list[Rule]:
    """``LayerNormalization(x, s, b) * g`` -> scale ``s*g``, bias ``b*g``; ``+ beta`` -> bias ``b+beta``."""

    def where(m: Match) -> bool | str:
        ln = m["ln"]
        x = m["x"]
        if x.rank is None or len(ln.outputs) > 1 and any(o.name and o.num_uses for o in ln.outputs[1:]):
            return "LayerNormalization's extra outputs are used or the rank is unknown"
        tail = x.shape[ln.attr("axis", -1) % x.rank:]
        c = m.const("c")
        if not all(isinstance(t, int) for t in tail) or c.ndim > len(tail):
            return "the constant must broadcast over the normalized axes only"
        try:
            np.broadcast_to(c, tail)
        except ValueError:
            return "the constant does not broadcast to the normalized shape"
        return True

    def rewrite(m: Match, b: Any) -> Any:
        ln, x, kind = m["ln"], m["x"], m["post"].op_type
        tail = tuple(x.shape[ln.attr("axis", -1) % x.rank:])
        c = np.broadcast_to(m.const("c"), tail)
        scale = np.broadcast_to(m.const("s"), tail)
        bias = np.broadcast_to(m.const("bb"), tail) if "bb" in m else np.zeros(tail, scale.dtype)
        if kind == "Mul":
            scale, bias = scale * c, bias * c
        else:
            bias = bias + c
        attrs = {k: ln.attr(k) for k in ln.attrs}
        return b.op("LayerNormalization", x, b.const(scale.astype(m.const("s").dtype), "scale"),
                    b.const(bias.astype(m.const("s").dtype), "bias"), name=ln.name or None, **attrs)

    return [Rule(f"layernorm-{k.lower()}",
                 op(k, op("LayerNormalization", Var("x"), Const("s"), Opt(Const("bb")), name="ln"), Const("c"),
                    commutative=True, name="post"), rewrite, where) for k in ("Mul", "Add")]


# -- Softmax -----------------------------------------------------------------------------------
def _softmax_rules() -> list[Rule]:
    stable = op("Exp", op("Sub", Var("x"), op("ReduceMax", Var("x"), None, name="max")), name="exp",
                single_use=False)
    plain = op("Exp", Var("x"), name="exp", single_use=False)
    rules = []
    for k, e in enumerate((stable, plain)):
        pat = op("Div", e, op("ReduceSum", Var("e2"), None, name="sum"), name="div")
        rules.append(Rule(f"softmax-{k}", pat, _sm_rewrite, _sm_where))
    return rules


def _sm_where(m: Match) -> bool | str:
    e = m["exp"].output(0)
    if m["e2"] is not e:
        return "the sum is not over the same exponentials"
    if not _internal_only(m, e):
        return "the exponentials are read outside the pattern"
    x = m["x"]
    if x.rank is None:
        return "input rank is unknown"
    reds = [m["sum"]] + ([m["max"]] if "max" in m else [])
    axes = [reduce_axes(n) for n in reds]
    if any(a is None or len(a) != 1 for a in axes) or len({a[0] % x.rank for a in axes}) != 1:  # type: ignore[index]
        return "reductions are not over one common constant axis"
    if any(not n.attr("keepdims", 1) for n in reds):
        return "reductions must keep dims"
    return True


def _sm_rewrite(m: Match, b: Any) -> Any:
    return b.op("Softmax", m["x"], axis=reduce_axes(m["sum"])[0] % m["x"].rank)


@register_pass
class FuseActivations(PatternPass):
    """Fuse decomposed HardSigmoid, HardSwish, Gelu, LayerNormalization and Softmax."""

    name = "fuse-activations"

    def rules(self) -> list[Rule]:
        opset = (self.model.opset("") if self.model is not None else None) or 0
        rules = _hardsigmoid_rules() if opset >= 6 else []
        if opset >= 14:
            rules.append(_hardswish_rule())
        if opset >= 20:
            rules += _gelu_rules()
        if opset >= 17:
            rules += _layernorm_rules() + _ln_affine_rules()
        if opset >= 13:
            rules += _softmax_rules()
        else:
            rules += [Rule(r.name, r.pattern, r.rewrite, _last_axis_only(r.where)) for r in _softmax_rules()]
        return rules


def _last_axis_only(where: Any) -> Any:
    def w(m: Match) -> bool | str:
        v = where(m)
        if v is not True:
            return v
        return reduce_axes(m["sum"])[0] % m["x"].rank == m["x"].rank - 1 or "Softmax before opset 13 needs the last axis"

    return w
