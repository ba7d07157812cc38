"""MatMul/Gemm fusions.

Rules:
  * ``Add(MatMul(a, B), c)`` -> ``Gemm(a, B, c)`` when a has rank 2, B is a constant 2-D
    matrix and c (constant) broadcasts to the ``[M, N]`` result as ``[N]``, ``[1, N]``,
    ``[M, N]`` or a scalar (Gemm's unidirectional broadcast). Higher ranks stay MatMul+Add.
  * ``BatchNormalization(Gemm(a, B, c))`` (inference, 2-D, constant B/c and BN parameters)
    -> ``Gemm(a, B', c')`` with the BN scale folded into B's output columns.

Refuses: non-float data, transposed-A Gemm with alpha != 1 when folding BN, shapes it cannot
prove. Exact up to fp32 rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import Const, Match, Opt, PatternPass, Rule, Var, op, register_pass


def _matmul_add() -> Rule:
    pat = op("Add", op("MatMul", Var("a", rank=2), Const("B"), name="mm"), Const("c"), commutative=True, name="add")

    def where(m: Match) -> bool | str:
        B, c = m.const("B"), m.const("c")
        if B.ndim != 2:
            return f"B has rank {B.ndim}, Gemm needs 2"
        if B.dtype.kind != "f" or c.dtype != B.dtype:
            return "Gemm needs matching float dtypes"
        a = m["a"]
        M = a.shape[0] if a.shape is not None else None
        n = B.shape[1]
        ok = c.ndim <= 2 and (c.size == 1 or c.shape in ((n,), (1, n)) or (c.ndim == 2 and c.shape[1] == n and
                                                                            isinstance(M, int) and c.shape[0] in (1, M)))
        return ok or f"bias of shape {list(c.shape)} does not broadcast to [M, {n}] as Gemm allows"

    def rewrite(m: Match, b: Any) -> Any:
        return b.op("Gemm", m["a"], m["B"], m["c"], name=m["mm"].name or None)

    return Rule("matmul-add-to-gemm", pat, rewrite, where)


def _gemm_bn() -> Rule:
    pat = op("BatchNormalization",
             op(("Gemm", "MatMul"), Var("a", rank=2), Const("B"), Opt(Const("c")), name="gemm"),
             Const("scale"), Const("bias"), Const("mean"), Const("var"), name="bn")

    def where(m: Match) -> bool | str:
        bn, g = m["bn"], m["gemm"]
        if any(o.name and (o.num_uses or o.is_graph_output()) for o in bn.outputs[1:]) or bn.attr("training_mode", 0):
            return "BatchNormalization is in training mode"
        B = m.const("B")
        if B.ndim != 2 or B.dtype.kind != "f":
            return "B must be a float matrix"
        n = B.shape[0] if g.attr("transB", 0) else B.shape[1]
        if any(m.const(k).size != n for k in ("scale", "bias", "mean", "var")):
            return "BN parameters do not match the output features"
        if "c" in m and m.const("c").size not in (1, n):
            return "bias must be per output feature"
        return True

    def rewrite(m: Match, b: Any) -> Any:
        g, bn = m["gemm"], m["bn"]
        B = m.const("B").astype(np.float64)
        transB = g.attr("transB", 0) if g.op_type == "Gemm" else 0
        alpha = g.attr("alpha", 1.0) if g.op_type == "Gemm" else 1.0
        beta = g.attr("beta", 1.0) if g.op_type == "Gemm" else 1.0
        n = B.shape[0] if transB else B.shape[1]
        s = m.const("scale").astype(np.float64) / np.sqrt(m.const("var").astype(np.float64) + bn.attr("epsilon", 1e-5))
        c = np.broadcast_to(m.const("c").astype(np.float64).reshape(-1), (n,)) * beta if "c" in m else np.zeros(n)
        B2 = (B * s[:, None] if transB else B * s[None, :]) * alpha
        c2 = (c - m.const("mean")) * s + m.const("bias")
        dt = m.const("B").dtype
        return [b.op("Gemm", m["a"], b.const(B2.astype(dt), "weight"), b.const(c2.astype(dt), "bias"),
                     transA=g.attr("transA", 0) if g.op_type == "Gemm" else 0, transB=transB,
                     name=g.name or None)] + [None] * (len(bn.outputs) - 1)

    return Rule("gemm-bn", pat, rewrite, where)


@register_pass
class FuseGemm(PatternPass):
    """MatMul+Add into Gemm (rank 2), and BatchNormalization after Gemm/MatMul into its weights."""

    name = "fuse-gemm"

    def rules(self) -> list[Rule]:
        return [_gemm_bn(), _matmul_add()]
