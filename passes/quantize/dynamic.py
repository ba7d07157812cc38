"""Dynamic and weight-only INT8 quantization for MatMul/Gemm-heavy (transformer-like) models.

No calibration data: activation ranges are computed at run time.

Rules, for ``MatMul(x, B)`` with a constant float 2-D B (and ``Gemm`` with alpha = 1,
transA = 0, which is rewritten as MatMul + Add first):
  * ``mode="dynamic"``: ``DynamicQuantizeLinear(x) -> MatMulInteger(x_q, B_q, x_zp, 0) ->
    Cast(float) -> Mul(x_scale * B_scale)``. B is int8, per output column (``per_channel``) or
    per tensor. ONNX Runtime fuses this into ``MatMulIntegerToFloat``;
  * ``mode="weight-only"``: ``MatMul(x, DequantizeLinear(B_q))``. The file shrinks ~4x; compute
    stays float. This is the faster form where integer kernels do not pay off (small batches,
    small matrices).

Refuses: non-constant or non-2-D B, non-float data, Gemm with transA or alpha != 1. Lossy
(rounding of weights, and of activations in dynamic mode).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx

from graphopt import Graph, GraphoptError, Model, Node, Pass, PassContext, register_pass

from .calibrate import int8_weight

log = logging.getLogger(__name__)

_STD = ("", "ai.onnx")


@register_pass
class QuantizeDynamic(Pass):
    """Dynamic (or weight-only) INT8 quantization of MatMul/Gemm weights; no calibration."""

    name = "quantize-dynamic"
    default_options = {"mode": "dynamic", "per_channel": True, "exclude_nodes": (), "min_weight_elements": 1,
                       "requantize": False}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["mode"] not in ("dynamic", "weight-only"):
            raise GraphoptError(f"unknown mode {self.options['mode']!r}; use 'dynamic' or 'weight-only'")
        self.report: dict[str, Any] = {}

    def apply(self, model: Model, ctx: PassContext) -> bool:
        """Refuse what cannot be quantized (checked on the whole model first), then rewrite the
        main graph and every If/Loop/Scan body (not local functions: they hold no initializers)."""
        from .requantize import DequantizeInteger, refuse_if_quantized

        self.model = model
        if not self.options["requantize"]:  # an already-quantized model: say what it is
            refuse_if_quantized(model, "dynamic quantization")
        self._refuse_nothing_to_quantize()  # what the model is (nothing to quantize) before what it lacks
        if (model.opset("") or 0) < 11:
            raise GraphoptError("quantize-dynamic needs opset >= 11 (DynamicQuantizeLinear)")
        DequantizeInteger().apply(model, ctx)  # undo integer ops on request (a no-op on a float model)
        self.model = model
        self._done = 0
        changed = False
        for g in reversed(list(model.graph.all_graphs())):  # bodies first, as Pass.apply does
            changed |= self.run(g, ctx)
        self.report = {"quantized_matmuls": self._done, "mode": self.options["mode"]}
        return changed

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        excl = set(self.options["exclude_nodes"])
        done = 0
        cache: dict[int, tuple[str, Any, Any, Any]] = {}
        for n in graph:
            if n.domain not in _STD or n.name in excl:
                continue
            if n.op_type == "Gemm":
                n = self._gemm_to_matmul(graph, n)
                if n is None:
                    continue
            if n.op_type != "MatMul":
                continue
            b = n.input(1)
            w = b.const_value() if b is not None else None
            x = n.input(0)
            if w is None or w.ndim != 2 or w.dtype != np.float32 or x is None or x.dtype not in (None, 1):
                continue
            if w.size < self.options["min_weight_elements"]:
                continue
            axis = 1 if self.options["per_channel"] else None
            if id(b) not in cache:
                q, s = int8_weight(w, axis)
                tag = graph.fresh_name("w")  # short names: see QuantizeStatic._insert_qdq
                qv = graph.add_initializer(tag + "_q", q)
                sv = graph.add_initializer(tag + "_s", np.asarray(s, np.float32))
                zv = graph.add_initializer(tag + "_z", np.zeros(np.shape(s), np.int8))
                cache[id(b)] = (tag, qv, sv, zv)
            tag, qv, sv, zv = cache[id(b)]
            out = n.output(0)
            if self.options["mode"] == "weight-only":
                attrs = {"axis": 1} if axis is not None else {}
                dq = graph.make_node("DequantizeLinear", [qv, sv, zv], attrs, before=n,
                                     name=graph.fresh_name(tag + "_DQ"))
                dq.output(0).dtype = onnx.TensorProto.FLOAT
                n.set_input(1, dq.output(0))
            else:
                dql = graph.make_node("DynamicQuantizeLinear", [x], num_outputs=3, before=n,
                                      name=graph.fresh_name(tag + "_DQL"))
                xq, xs, xz = dql.outputs
                mmi = graph.make_node("MatMulInteger", [xq, qv, xz, zv], before=n,
                                      name=graph.fresh_name(tag + "_MMI"))
                cast = graph.make_node("Cast", [mmi.output(0)], {"to": onnx.TensorProto.FLOAT}, before=n,
                                       name=graph.fresh_name(tag + "_cast"))
                scale = graph.make_node("Mul", [xs, sv], before=n, name=graph.fresh_name(tag + "_smul"))
                y = graph.make_node("Mul", [cast.output(0), scale.output(0)], before=n,
                                    name=graph.fresh_name(tag + "_mul"))
                y.output(0).dtype, y.output(0).shape = out.dtype, out.shape
                graph.replace_all_uses_with(out, y.output(0))
                graph.remove(n)
            done += 1
        left = [(n, self._why_not(n)) for n in graph if n.op_type in ("MatMul", "Gemm") and n.domain in _STD]
        left = [(n, why) for n, why in left if why and why != "excluded" and "min_weight_elements" not in why]
        if left:
            log.warning("quantize-dynamic left %d MatMul/Gemm float in graph %r: %s", len(left), graph.name,
                        "; ".join(f"{n.name!r} ({why})" for n, why in left[:5]) + ("; ..." if len(left) > 5 else ""))
        self._done = getattr(self, "_done", 0) + done
        self.report = {"quantized_matmuls": self._done, "mode": self.options["mode"]}
        return done > 0

    def _refuse_nothing_to_quantize(self) -> None:
        """Refuse a model with no MatMul/Gemm (integer MatMuls count under ``requantize``, which
        turns them back into MatMul): the same "nothing to quantize" static quantization says."""
        assert self.model is not None
        nodes = list(self.model.graph.all_nodes())
        wanted = {"MatMul", "Gemm"} | ({"MatMulInteger", "QLinearMatMul"} if self.options["requantize"] else set())
        mm = [n for n in nodes if n.op_type in wanted and n.domain in _STD]
        if mm and not self.options["requantize"] and all(self._why_not(n) for n in mm):
            # MatMuls whose weights are all computed (e.g. read from Loop-carried values): nothing
            # this pass can rewrite, which must not pass as a silent success
            shown = "; ".join(f"node {n.name!r}: {self._why_not(n)}" for n in mm[:3])
            raise GraphoptError(f"nothing to quantize: none of the model's {len(mm)} MatMul/Gemm nodes has a "
                                f"constant 2-D float32 weight ({shown}{'; ...' if len(mm) > 3 else ''})")
        if mm:
            return
        ops = sorted({n.op_type for n in nodes})
        hint = "; Conv is quantized by static quantization (quantize-static)" if "Conv" in ops else ""
        raise GraphoptError("nothing to quantize: dynamic quantization rewrites MatMul/Gemm weights and the model "
                            f"has no MatMul/Gemm node (its ops: {', '.join(ops) or 'none'}){hint}")

    def _why_not(self, n: Node) -> str | None:
        """Why dynamic quantization leaves this MatMul/Gemm float (None: it can rewrite it)."""
        if n.name in set(self.options["exclude_nodes"]):
            return "excluded"
        if n.op_type == "Gemm" and (n.attr("transA", 0) or n.attr("alpha", 1.0) != 1.0 or n.attr("beta", 1.0) != 1.0):
            return "Gemm with transA/alpha/beta"
        b, x = n.input(1), n.input(0)
        w = b.const_value() if b is not None else None
        if w is None:
            return f"its weight {b.name if b is not None else ''!r} is computed at run time, not a constant"
        if w.ndim != 2 or w.dtype != np.float32:
            return f"its weight is {w.dtype} with {w.ndim} dims (2-D float32 is quantized)"
        if x is None or x.dtype not in (None, 1):
            return "its input is not float32"
        if w.size < self.options["min_weight_elements"]:
            return f"its weight has {w.size} elements (< min_weight_elements)"
        return None

    @staticmethod
    def _gemm_to_matmul(graph: Graph, n: Node) -> Node | None:
        if n.attr("transA", 0) or n.attr("alpha", 1.0) != 1.0 or n.attr("beta", 1.0) != 1.0:
            return None
        b = n.input(1)
        w = b.const_value() if b is not None else None
        if w is None or w.ndim != 2:
            return None
        if n.attr("transB", 0):
            b = graph.add_initializer(b.name + "_T", np.ascontiguousarray(w.T))
        mm = graph.make_node("MatMul", [n.input(0), b], before=n, name=graph.fresh_name(n.name + "_MatMul"))
        out = mm.output(0)
        c = n.input(2)
        if c is not None:
            add = graph.make_node("Add", [out, c], before=n, name=graph.fresh_name(n.name + "_Add"))
            out = add.output(0)
        out.dtype, out.shape = n.output(0).dtype, n.output(0).shape
        graph.replace_all_uses_with(n.output(0), out)
        graph.remove(n)
        return mm
