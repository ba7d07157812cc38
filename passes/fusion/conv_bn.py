"""Conv + BatchNormalization fusion.

Rule: ``BatchNormalization(Conv(x, W, b?), scale, B, mean, var)`` in inference form, with W,
b and all BN parameters constant, becomes ``Conv(x, W', b')`` with ``W' = W * s`` per output
channel, ``b' = (b - mean) * s + B`` and ``s = scale / sqrt(var + epsilon)``, computed in
float64 and stored in the weights' dtype. When one Conv feeds several such BNs (common after
CSE merged identical branches) each BN gets its own fused copy of the Conv - the same number of
convolutions, one BN fewer each. Weights stored as ``ConstantOfShape`` fills stay fills when the
fused weight is still uniform.

Refuses: training-mode BN (extra outputs used), a Conv output read by anything but fusable
BNs, non-float weights, parameter shapes that do not line up. Exact up to fp32 rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import Const, Match, Node, Opt, PatternPass, Var, op, register_pass


def _param(v: Any) -> np.ndarray | None:
    if v is None:
        return None
    arr = v.const_value()
    if arr is None and v.fill_value() is not None:
        shape, val = v.fill_value()
        arr = np.full(shape, val, dtype=val.dtype)
    return arr


def bn_fusable(bn: Node, channels: int) -> bool | str:
    """True if ``bn`` is an inference BatchNormalization with constant per-channel parameters."""
    if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
        return f"{bn.op_type} {bn.name!r} is not a BatchNormalization"
    for o in bn.outputs[1:]:
        if o.name and (o.num_uses or o.is_graph_output()):
            return "BatchNormalization is in training mode (extra outputs are used)"
    if bn.attr("training_mode", 0):
        return "BatchNormalization has training_mode=1"
    for k, v in zip(("scale", "bias", "mean", "var"), bn.inputs[1:5], strict=False):
        arr = _param(v)
        if arr is None:
            return f"BN {k} is not constant"
        if arr.size != channels:
            return f"BN {k} has {arr.size} values for {channels} output channels"
    return True


@register_pass
class FuseConvBatchNorm(PatternPass):
    """Fold an inference BatchNormalization into the preceding Conv's weights and bias."""

    name = "fuse-conv-bn"
    pattern = op(
        "BatchNormalization",
        op("Conv", Var("x"), Const("w"), Opt(Const("b")), name="conv", single_use=False),
        Const("scale"), Const("bias"), Const("mean"), Const("var"),
        name="bn",
    )

    def where(self, m: Match) -> bool | str:
        w = m.const("w")
        if w.dtype.kind != "f" or w.ndim < 3:
            return f"Conv weight must be float with rank >= 3, got {w.dtype} rank {w.ndim}"
        c_out = w.shape[0]
        if "b" in m and m.const("b").size != c_out:
            return "Conv bias does not match its output channels"
        y = m["conv"].output(0)
        if y.is_graph_output():
            return "the Conv output is also a graph output"
        for reader in y.consumers():
            ok = bn_fusable(reader, c_out)
            if ok is not True:
                return f"Conv output is also read by a node that cannot take the fusion: {ok}"
        return True

    def rewrite(self, m: Match, b):
        conv, bn = m["conv"], m["bn"]
        w = m.const("w")
        eps = float(bn.attr("epsilon", 1e-5))
        s = m.const("scale").astype(np.float64) / np.sqrt(m.const("var").astype(np.float64) + eps)
        bias0 = m.const("b").astype(np.float64) if "b" in m else np.zeros(w.shape[0])
        new_w = (w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
        new_b = ((bias0 - m.const("mean").astype(np.float64)) * s + m.const("bias").astype(np.float64)).astype(w.dtype)
        attrs = {k: conv.attr(k) for k in conv.attrs}
        y = b.op("Conv", m["x"], b.const(new_w, "weight"), b.const(new_b, "bias"), name=conv.name or None, **attrs)
        return [y] + [None] * (len(bn.outputs) - 1)
