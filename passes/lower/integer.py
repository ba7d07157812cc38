"""ONNX Runtime's integer ops rewritten into standard ONNX (float ops, QuantizeLinear /
DequantizeLinear), so backends without them (TVM's ONNX frontend) can import the model.

* ``ConvInteger(x_q, w_q, x_zp, w_zp)`` -> ``Cast(Round(Conv(float(x_q) - x_zp, w_q - w_zp)), int32)``:
  the same integer products, summed in float32 (exact while partial sums stay below 2^24 in
  magnitude; beyond that a rounding of the last bit is possible).
* ``QLinearConv`` / ``QLinearMatMul`` and the contrib ``QLinearAdd``, ``QLinearMul``,
  ``QLinearSigmoid``, ``QLinearLeakyRelu``, ``QLinearGlobalAveragePool``, ``QLinearConcat`` ->
  ``DequantizeLinear`` of each input, the float op, ``QuantizeLinear`` of the result (the QDQ
  form; constant weights are dequantized at compile time). The float op differs from ORT's
  integer kernel by float rounding, which can move a requantized value by one step.
* ``DynamicQuantizeLSTM`` -> a float ``LSTM`` with the dequantized weights (reusing
  ``dequantize-integer``), unrolled at once by ``lower-recurrent`` with the input sequence and
  each step's state quantized as ORT quantizes them (``DynamicQuantizeLinear -> DequantizeLinear``
  before each product). Where the sequence length is not static the float LSTM stays (outputs
  then differ from ORT's by that quantization noise). Not bit-exact even then: ORT sums the
  integer products exactly and scales once, the float products here round in another order, so
  a state sitting at a rounding boundary of the next step's quantization moves by one step
  (ddddocr_ocr_int8: 128 of 29696 quantized LSTM outputs one step off, 7.6e-3 on logits of
  range 33, under ORT alone; DynamicQuantizeLinear itself rounds half to even in TVM as in ORT).

``MatMulInteger`` and ``DynamicQuantizeLinear`` are standard ONNX that TVM converts: unchanged.
Anything else integer is left unchanged and listed in ``report['left']``.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, ClassVar

import numpy as np

from graphopt import Graph, Model, Node, Pass, PassContext, Value, register_pass

from ..quantize.requantize import DequantizeInteger
from .recurrent import LowerRecurrent

log = logging.getLogger(__name__)

#: contrib QLinear ops: float op, number of quantized inputs (x, scale, zp triples) before the
#: output (scale, zp)
_ELEMENTWISE = {"QLinearAdd": ("Add", 2), "QLinearMul": ("Mul", 2), "QLinearSigmoid": ("Sigmoid", 1),
                "QLinearLeakyRelu": ("LeakyRelu", 1), "QLinearGlobalAveragePool": ("GlobalAveragePool", 1)}


def _c(v: Value | None) -> np.ndarray | None:
    return v.const_value() if v is not None else None


@register_pass
class LowerInteger(Pass):
    """ORT integer ops (ConvInteger, QLinear*, DynamicQuantizeLSTM) as standard float/QDQ ONNX."""

    name = "lower-integer"
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.report: dict[str, Any] = {"lowered": Counter(), "left": {}}

    def apply(self, model: Model, ctx: PassContext) -> bool:
        before = {id(n) for n in model.graph.all_nodes() if n.op_type == "LSTM"}
        lstm = DequantizeInteger(ops=("DynamicQuantizeLSTM",))
        changed = lstm.apply(model, ctx)
        if lstm.report.get("dequantized"):
            self.report["lowered"].update(lstm.report["dequantized"])
            # unrolled right away, with ORT's run-time quantization of the inputs and states (a
            # length that is not static leaves the float LSTM: lower-recurrent names why)
            made = [n.name for n in model.graph.all_nodes() if n.op_type == "LSTM" and id(n) not in before]
            LowerRecurrent(quantize_inputs=tuple(made)).apply(model, ctx)
        return super().apply(model, ctx) or changed

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for n in list(graph):
            if n.graph is not graph:
                continue
            fn = {"ConvInteger": self._conv_integer, "QLinearConv": self._qlinear_conv,
                  "QLinearMatMul": self._qlinear_matmul, "QLinearConcat": self._qlinear_concat}.get(n.op_type)
            if fn is None and n.op_type in _ELEMENTWISE:
                fn = self._qlinear_elementwise
            if fn is None:
                continue
            why = fn(graph, n)
            if why:
                self.report["left"][n.name or n.op_type] = why
                log.info("lower-integer: node %r (%s) left as it is: %s", n.name, n.op_type, why)
                continue
            self.report["lowered"][n.op_type] += 1
            changed = True
        return changed

    # -- helpers ----------------------------------------------------------------------------
    def _node(self, graph: Graph, ref: Node, op: str, inputs: list[Value | None], **attrs: Any) -> Value:
        return graph.make_node(op, inputs, attrs, before=ref,
                               name=graph.fresh_name(f"{ref.name or ref.op_type}/{op}")).output(0)

    def _dq(self, graph: Graph, ref: Node, x: Value, scale: Value, zp: Value | None, axis: int = 1) -> Value:
        """Float value of a quantized one: a constant when everything is constant."""
        q, s = _c(x), _c(scale)
        z = _c(zp) if zp is not None else None
        if q is not None and s is not None and (zp is None or z is not None):
            shape = [1] * q.ndim
            if np.size(s) > 1:
                shape[axis] = -1
            w = q.astype(np.float64)
            if z is not None:
                w = w - np.asarray(z, np.float64).reshape(shape if np.size(z) > 1 else [1] * q.ndim)
            w = w * np.asarray(s, np.float64).reshape(shape if np.size(s) > 1 else [1] * q.ndim)
            return graph.add_initializer((x.name or "q") + "_float", w.astype(np.float32))
        # a run-time value (an activation) has one scale: per-tensor DequantizeLinear, opset 10+
        ins = [x, scale] + ([zp] if zp is not None else [])
        return graph.make_node("DequantizeLinear", ins, {}, before=ref,
                               name=graph.fresh_name(f"{ref.name or ref.op_type}/dq")).output(0)

    def _finish(self, graph: Graph, n: Node, y: Value) -> None:
        old = n.output(0)
        y.dtype, y.shape = old.dtype, old.shape
        graph.replace_all_uses_with(old, y)
        graph.remove(n)

    def _q(self, graph: Graph, n: Node, y: Value, scale: Value, zp: Value | None) -> None:
        out = self._node(graph, n, "QuantizeLinear", [y, scale] + ([zp] if zp is not None else []))
        self._finish(graph, n, out)

    # -- the ops ----------------------------------------------------------------------------
    def _conv_integer(self, graph: Graph, n: Node) -> str | None:
        x, w = n.input(0), n.input(1)
        xzp = n.input(2) if len(n.inputs) > 2 else None
        wzp = n.input(3) if len(n.inputs) > 3 else None
        wq = _c(w)
        if wq is None:
            return "the weight is computed at run time"
        wf = wq.astype(np.float64)
        if wzp is not None:
            z = _c(wzp)
            if z is None:
                return "the weight zero point is computed at run time"
            wf = wf - np.asarray(z, np.float64).reshape([-1] + [1] * (wq.ndim - 1) if np.size(z) > 1 else [1] * wq.ndim)
        xf = self._node(graph, n, "Cast", [x], to=1)
        if xzp is not None:
            xf = self._node(graph, n, "Sub", [xf, self._node(graph, n, "Cast", [xzp], to=1)])
        attrs = {k: n.attr(k) for k in n.attrs}
        conv = graph.make_node("Conv", [xf, graph.add_initializer((w.name or "w") + "_float", wf.astype(np.float32))],
                               attrs, before=n, name=graph.fresh_name((n.name or "conv") + "_float")).output(0)
        self._finish(graph, n, self._node(graph, n, "Cast", [self._node(graph, n, "Round", [conv])], to=6))
        return None

    def _qlinear_conv(self, graph: Graph, n: Node) -> str | None:
        ins = list(n.inputs) + [None] * (9 - len(n.inputs))
        x, xs, xz, w, ws, wz, ys, yz, b = ins[:9]
        if _c(w) is None:
            return "the weight is computed at run time"
        xf = self._dq(graph, n, x, xs, xz)
        wf = self._dq(graph, n, w, ws, wz, axis=0)
        conv_in = [xf, wf]
        if b is not None:
            bq, s1, s2 = _c(b), _c(xs), _c(ws)
            if bq is None or s1 is None or s2 is None:
                return "the bias or the scales are computed at run time"
            conv_in.append(graph.add_initializer((b.name or "b") + "_float",
                                                 (bq.astype(np.float64) * s1 * np.asarray(s2, np.float64).reshape(-1))
                                                 .astype(np.float32)))
        y = graph.make_node("Conv", conv_in, {k: n.attr(k) for k in n.attrs}, before=n,
                            name=graph.fresh_name((n.name or "conv") + "_float")).output(0)
        self._q(graph, n, y, ys, yz)
        return None

    def _qlinear_matmul(self, graph: Graph, n: Node) -> str | None:
        a, as_, az, b, bs, bz, ys, yz = n.inputs[:8]
        bq = _c(b)
        axis = 1 if bq is not None and bq.ndim == 2 else -1
        af = self._dq(graph, n, a, as_, az)
        bf = self._dq(graph, n, b, bs, bz, axis=axis)
        self._q(graph, n, self._node(graph, n, "MatMul", [af, bf]), ys, yz)
        return None

    def _qlinear_elementwise(self, graph: Graph, n: Node) -> str | None:
        op, k = _ELEMENTWISE[n.op_type]
        if n.op_type == "QLinearGlobalAveragePool" and n.attr("channels_last", 0):
            return "channels_last=1 has no standard ONNX form"
        ins = list(n.inputs)
        floats = [self._dq(graph, n, ins[3 * i], ins[3 * i + 1], ins[3 * i + 2]) for i in range(k)]
        ys, yz = ins[3 * k], ins[3 * k + 1] if len(ins) > 3 * k + 1 else None
        attrs = {"alpha": n.attr("alpha", 0.01)} if op == "LeakyRelu" else {}
        self._q(graph, n, self._node(graph, n, op, floats, **attrs), ys, yz)
        return None

    def _qlinear_concat(self, graph: Graph, n: Node) -> str | None:
        ins = list(n.inputs)
        ys, yz, rest = ins[0], ins[1], ins[2:]
        if len(rest) % 3:
            return "inputs are not (x, scale, zero point) triples"
        floats = [self._dq(graph, n, rest[i], rest[i + 1], rest[i + 2]) for i in range(0, len(rest), 3)]
        self._q(graph, n, self._node(graph, n, "Concat", floats, axis=int(n.attr("axis"))), ys, yz)
        return None
