"""Conv + BatchNormalization fusion.

Rule: ``BatchNormalization(Conv(x, W, b?), scale, B, mean, var)`` in inference form, with W,
b and all BN parameters constant and the Conv output read only by the BN, becomes
``Conv(x, W', b')`` with ``W' = W * s`` per output channel, ``b' = (b - mean) * s + B`` and
``s = scale / sqrt(var + epsilon)``. Computed in float64, stored in the weights' dtype.

Refuses: training-mode BN (extra outputs used), non-float weights, shapes that do not line up.
Exact up to fp32 rounding.
"""

from __future__ import annotations

import numpy as np

from graphopt import Const, Match, Opt, PatternPass, Var, op, register_pass


def _outputs_unused(m: Match) -> bool | str:
    bn = m["bn"]
    for o in bn.outputs[1:]:
        if o.name and (o.num_uses or o.is_graph_output()):
            return "BatchNormalization is in training mode (extra outputs are used)"
    if bn.attr("training_mode", 0):
        return "BatchNormalization has training_mode=1"
    w = m.const("w")
    if w.dtype.kind != "f" or w.ndim < 3:
        return f"Conv weight must be float with rank >= 3, got {w.dtype} rank {w.ndim}"
    c_out = w.shape[0]
    for k in ("scale", "bias", "mean", "var"):
        if m.const(k).size != c_out:
            return f"BN {k} has {m.const(k).size} values for {c_out} output channels"
    if "b" in m and m.const("b").size != c_out:
        return "Conv bias does not match its output channels"
    return True


@register_pass
class FuseConvBatchNorm(PatternPass):
    """Fold an inference BatchNormalization into the preceding Conv's weights and bias."""

    name = "fuse-conv-bn"
    pattern = op(
        "BatchNormalization",
        op("Conv", Var("x"), Const("w"), Opt(Const("b")), name="conv"),
        Const("scale"), Const("bias"), Const("mean"), Const("var"),
        name="bn",
    )

    def where(self, m: Match) -> bool | str:
        return _outputs_unused(m)

    def rewrite(self, m: Match, b):  # noqa: ANN001, ANN201
        conv, bn = m["conv"], m["bn"]
        w = m.const("w")
        eps = float(bn.attr("epsilon", 1e-5))
        s = m.const("scale").astype(np.float64) / np.sqrt(m.const("var").astype(np.float64) + eps)
        bias0 = m.const("b").astype(np.float64) if "b" in m else np.zeros(w.shape[0])
        new_w = (w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
        new_b = ((bias0 - m.const("mean").astype(np.float64)) * s + m.const("bias").astype(np.float64)).astype(w.dtype)
        attrs = {k: conv.attr(k) for k in conv.attrs}
        y = b.op("Conv", m["x"], b.const(new_w, "weight"), b.const(new_b, "bias"), name=conv.name or None, **attrs)
        outs = [y] + [None] * (len(bn.outputs) - 1)
        return outs
