"""Fold a zero Pad into the following Conv or AveragePool.

Rule: ``Conv(Pad(x, pads, mode=constant, value=0))`` where the pad touches only spatial axes
becomes ``Conv(x)`` with the pads added to the Conv's own (``auto_pad`` must be NOTSET).
``AveragePool`` takes it when it has no pads of its own or already counts padding
(``count_include_pad=1``, which zero padding needs to stay exact).

Refuses: non-constant pads, reflect/edge modes, non-zero values, padding of batch/channel
axes, negative pads, a Pad output with other readers, MaxPool (its implicit padding is -inf).
Exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import Match, PatternPass, Rule, Var, op, register_pass


def _pads(m: Match) -> list[int] | None:
    pad = m["pad"]
    pads = pad.attr("pads")
    if pads is None:
        v = pad.input(1)
        arr = v.const_value() if v is not None else None
        if arr is None:
            return None
        pads = [int(p) for p in np.ravel(arr)]
    if (pad.attr("mode", "constant") or "constant") != "constant":
        return None
    val = pad.attr("value", 0.0)
    cv = pad.input(2)
    if cv is not None:
        arr = cv.const_value()
        if arr is None or np.any(np.asarray(arr) != 0):
            return None
    elif val not in (0, 0.0, None):
        return None
    axes = pad.input(3)
    if axes is not None:
        return None
    return list(pads)


def _rule(kind: str) -> Rule:
    pat = op(kind, op("Pad", Var("x"), variadic=True, name="pad"), variadic=True, name="consumer")

    def where(m: Match) -> bool | str:
        pads = _pads(m)
        if pads is None:
            return "Pad must be constant-mode zero padding with constant pads"
        r = len(pads) // 2
        if any(p < 0 for p in pads) or pads[0] or pads[1] or pads[r] or pads[r + 1]:
            return "Pad touches batch/channel axes or is negative"
        c = m["consumer"]
        if c.attr("auto_pad", "NOTSET") not in ("NOTSET", None, ""):
            return "consumer uses auto_pad"
        if kind == "AveragePool":
            own = c.attr("pads")
            if own and any(own) and not c.attr("count_include_pad", 0):
                return "AveragePool excludes its own padding from the average"
        return True

    def rewrite(m: Match, b: Any) -> Any:
        c = m["consumer"]
        pads = _pads(m)
        r = len(pads) // 2
        spatial = pads[2:r] + pads[r + 2:]
        own = c.attr("pads") or [0] * len(spatial)
        attrs = {k: c.attr(k) for k in c.attrs}
        attrs["pads"] = [int(a) + int(p) for a, p in zip(own, spatial, strict=True)]
        if kind == "AveragePool":
            attrs["count_include_pad"] = 1
        ins = [m["x"]] + list(c.inputs[1:])
        outs = b.op(kind, *ins, name=c.name or None, num_outputs=len(c.outputs), **attrs)
        return outs if len(c.outputs) > 1 else [outs]

    return Rule(f"pad-{kind.lower()}", pat, rewrite, where)


@register_pass
class FusePadIntoConv(PatternPass):
    """Fold a zero Pad into the pads of the following Conv or AveragePool."""

    name = "fuse-pad"

    def rules(self) -> list[Rule]:
        return [_rule("Conv"), _rule("AveragePool")]
