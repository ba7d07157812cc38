"""ONNX Runtime's integer ops rewritten into standard ONNX (float ops, QuantizeLinear /
DequantizeLinear), so backends without them (TVM's ONNX frontend) can import the model.

* ``ConvInteger(x_q, w_q, x_zp, w_zp)`` -> ``Cast(Conv(float(x_q) - x_zp, w_q - w_zp), int32)``: the
  same integer products, summed in float32 (exact while partial sums stay below 2^24 in
  magnitude; beyond that a rounding of the last bit is possible; the sum is an integer either
  way, so no ``Round`` is needed).
  ORT's dynamic quantizer follows each with ``Add(acc, Cast(Floor(b / scale), int32))`` (older
  versions) and ``Cast(float)``; those int32 round trips are taken out (the accumulator and the
  bias stay float, the same integers). Why: TVM's ONNX frontend converts a float -> int32
  ``Cast`` into ONNX's wrap-around emulation (int64 modulo, NaN/inf selects) over the whole
  activation; on ddddocr_ocr_int8 each of the conv epilogues made of it took about 165 s to build
  (841 s in all) and they were the slowest elementwise kernels of the run.
* ``MatMulInteger`` with a uint8 ``A`` and a constant ``B`` -> :func:`integer_matmul`:
  ``MatMulInteger(A, B8)`` with ``B`` shifted into int8 per column and no zero points (uint8 x
  int8, the operands of the CPU's dot products, which the TVM backend compiles as an integer
  kernel: :mod:`graphopt.backend.intmatmul`; its frontend made an int32 x int32 matmul of
  ``MatMulInteger`` with a four-times-larger weight), plus int32 corrections for the zero points
  and the shift: the same int32 sums as ORT's, bit for bit.
* ``QLinearConv`` / ``QLinearMatMul`` and the contrib ``QLinearAdd``, ``QLinearMul``,
  ``QLinearSigmoid``, ``QLinearLeakyRelu``, ``QLinearGlobalAveragePool``, ``QLinearConcat`` ->
  ``DequantizeLinear`` of each input, the float op, ``QuantizeLinear`` of the result (the QDQ
  form; constant weights are dequantized at compile time). The float op differs from ORT's
  integer kernel by float rounding, which can move a requantized value by one step.
* ``DynamicQuantizeLSTM`` -> a float ``LSTM`` with the dequantized weights (reusing
  ``dequantize-integer``), unrolled at once by ``lower-recurrent`` with ORT's integer products:
  the input sequence (once) and each step's state go through ``DynamicQuantizeLinear`` and
  :func:`integer_matmul` with the int8 weights, scaled once by ``x_scale * w_scale`` as ORT
  scales its int32 sums: the products are ORT's exactly (with ``Tanh`` the lowered
  ddddocr_ocr_int8 equalled ORT bit for bit under ORT; float products of dequantized values had
  put 128 of 29696 quantized LSTM outputs one step off). The gates' tanh is written
  ``2 * sigmoid(2x) - 1`` (see ``lower-recurrent``: fast-math builds), which differs from ORT's
  tanh by ~1e-7, enough to move a state sitting on a rounding boundary by one step (2.4e-4 of
  the logits' range under ORT, 2.0e-4 under TVM). Where the sequence length is not static the
  float LSTM stays (outputs then differ from ORT's by the quantization noise).

``DynamicQuantizeLinear`` is standard ONNX that TVM converts: unchanged.
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


def integer_matmul(graph: Graph, ref: Node, xq: Value, zx: Value | None, w: np.ndarray, wz: np.ndarray | None,
                   opset: int, cache: dict[tuple[int, int], tuple[Value, ...]] | None = None) -> Value | None:
    """``float(sum_k (xq - zx) * (w - wz))`` for a run-time uint8 ``xq`` (``[..., K]``, scalar zero
    point ``zx``) and a constant integer ``w`` (``[K, N]``, zero point ``wz``: none, scalar or per
    column), made before ``ref``. None when some column of ``w - wz`` spans more than 255 values.
    ``cache`` (shared by the calls of one unrolled op): the constants made for ``(w, wz)`` are
    reused, not added again per step.

    Written as ``MatMulInteger(xq, w8)`` with an int8 ``w8`` and no zero points - uint8 x int8 ->
    int32, the operands of the CPU's dot-product instructions, which the TVM backend compiles as
    an integer kernel - plus int32 corrections, cast to float once at the end (the int32 sum is
    ORT's, exactly). ``w - wz = w8 + c`` with one shift ``c`` per column (0 where the column fits
    int8; uint8 weights: ``w - 128``), so ``sum (xq - zx)(w8 + c) = xq @ w8 + c * sum_k xq -
    zx * (sum_k w8 + K * c)``.
    """
    key = (id(w), id(wz))
    made = cache.get(key) if cache is not None else None
    d = w.astype(np.int64)
    if wz is not None:
        d = d - np.asarray(wz, np.int64).reshape(1, -1 if np.size(wz) > 1 else 1)
    lo, hi = d.min(axis=0), d.max(axis=0)
    if np.any(hi - lo > 255):
        return None
    c = np.where((lo >= -128) & (hi <= 127), 0, hi - 127)
    w8 = (d - c).astype(np.int8)
    K = d.shape[0]
    base = ref.name or ref.op_type

    def op(op_type: str, inputs: list[Value | None], **attrs: Any) -> Value:
        return graph.make_node(op_type, inputs, attrs, before=ref, name=graph.fresh_name(f"{base}/{op_type}")).output(0)

    if made is None:
        made = (graph.add_initializer(f"{base}_w8", w8), graph.add_initializer(f"{base}_shift", c.astype(np.int32)),
                graph.add_initializer(f"{base}_zsum", (w8.astype(np.int64).sum(axis=0) + K * c).astype(np.int32)))
        if cache is not None:
            cache[key] = made
    acc = op("MatMulInteger", [xq, made[0]])
    if np.any(c):  # c * (row sums of xq)
        xi = op("Cast", [xq], to=6)
        if opset >= 13:
            rs = op("ReduceSum", [xi, graph.add_initializer(f"{base}_axes", np.array([-1], np.int64))], keepdims=1)
        else:
            rs = op("ReduceSum", [xi], axes=[-1], keepdims=1)
        acc = op("Add", [acc, op("Mul", [rs, made[1]])])
    if zx is not None:
        acc = op("Sub", [acc, op("Mul", [op("Cast", [zx], to=6), made[2]])])
    return op("Cast", [acc], to=1)


def _native_matmul_integer(n: Node) -> bool:
    """Is ``n`` already the form :func:`integer_matmul` writes (no zero points, constant int8 B)?"""
    b = _c(n.input(1)) if len(n.inputs) > 1 else None
    return all(i is None for i in n.inputs[2:]) and b is not None and b.dtype == np.int8


def _lstm_integer_weights(n: Node) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """``{"W": (q, scale, zero point), "R": ...}`` of a ``DynamicQuantizeLSTM`` (``q`` as ORT stores
    it, ``[dirs, K, 4H]``; scale and zero point ``[dirs]`` or ``[dirs, 4H]``), or None when any is
    computed at run time."""
    if len(n.inputs) < 12:
        return None
    got = [_c(n.input(i)) for i in (1, 8, 9, 2, 10, 11)]
    if any(a is None for a in got):
        return None
    return {"W": (got[0], got[1], got[2]), "R": (got[3], got[4], got[5])}


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
        # each DynamicQuantizeLSTM's integer weights, by the value it reads (its float LSTM reads it too)
        ints: dict[int, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None] = {}
        for n in model.graph.all_nodes():
            if n.op_type == "DynamicQuantizeLSTM" and n.input(0) is not None:
                ints[id(n.input(0))] = None if id(n.input(0)) in ints else _lstm_integer_weights(n)
        lstm = DequantizeInteger(ops=("DynamicQuantizeLSTM",))
        changed = lstm.apply(model, ctx)
        if lstm.report.get("dequantized"):
            self.report["lowered"].update(lstm.report["dequantized"])
            # unrolled right away, with ORT's run-time quantization of the inputs and states and
            # its integer products (a length that is not static leaves the float LSTM:
            # lower-recurrent names why)
            made = [n for n in model.graph.all_nodes() if n.op_type == "LSTM" and id(n) not in before]
            weights = {n.name: ints[id(n.input(0))] for n in made if ints.get(id(n.input(0))) is not None}
            LowerRecurrent(quantize_inputs=tuple(n.name for n in made), integer_weights=weights).apply(model, ctx)
        return super().apply(model, ctx) or changed

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for n in list(graph):
            if n.graph is not graph:
                continue
            fn = {"ConvInteger": self._conv_integer, "MatMulInteger": self._matmul_integer,
                  "QLinearConv": self._qlinear_conv,
                  "QLinearMatMul": self._qlinear_matmul, "QLinearConcat": self._qlinear_concat}.get(n.op_type)
            if fn is None and n.op_type in _ELEMENTWISE:
                fn = self._qlinear_elementwise
            if fn is None or (n.op_type == "MatMulInteger" and _native_matmul_integer(n)):
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
    def _integer_operand(self, graph: Graph, n: Node, v: Value, zp: Value | None) -> Value:
        """``float(v) - float(zp)``: a run-time integer operand as exact float integers.

        (Computing it in float from a ``DynamicQuantizeLinear``'s input instead, ``min(max(round(x /
        scale) + zp, 0), 255) - zp``, made ddddocr_ocr_int8 slower under TVM, 1.30x -> 1.72x of ORT:
        the frontend converts ONNX ``Max``/``Min`` as stacked reductions, and the conv epilogues
        stopped fusing.)
        """
        f = self._node(graph, n, "Cast", [v], to=1)
        return self._node(graph, n, "Sub", [f, self._node(graph, n, "Cast", [zp], to=1)]) if zp is not None else f

    @staticmethod
    def _integer_weight(w: Value, wzp: Value | None, axis: int) -> np.ndarray | str:
        """``w - wzp`` of a constant integer weight as float32 (exact integers), or why not."""
        wq = _c(w)
        if wq is None:
            return "the weight is computed at run time"
        wf = wq.astype(np.float64)
        if wzp is not None:
            z = _c(wzp)
            if z is None:
                return "the weight zero point is computed at run time"
            shape = [1] * wq.ndim
            if np.size(z) > 1:
                shape[axis] = -1
            wf = wf - np.asarray(z, np.float64).reshape(shape)
        return wf.astype(np.float32)

    def _conv_integer(self, graph: Graph, n: Node) -> str | None:
        x, w = n.input(0), n.input(1)
        xzp = n.input(2) if len(n.inputs) > 2 else None
        wzp = n.input(3) if len(n.inputs) > 3 else None
        wf = self._integer_weight(w, wzp, 0)
        if isinstance(wf, str):
            return wf
        xf = self._integer_operand(graph, n, x, xzp)
        attrs = {k: n.attr(k) for k in n.attrs}
        conv = graph.make_node("Conv", [xf, graph.add_initializer((w.name or "w") + "_float", wf)],
                               attrs, before=n, name=graph.fresh_name((n.name or "conv") + "_float")).output(0)
        self._integer_result(graph, n, conv)
        return None

    def _matmul_integer(self, graph: Graph, n: Node) -> str | None:
        a, b = n.input(0), n.input(1)
        azp = n.input(2) if len(n.inputs) > 2 else None
        bzp = n.input(3) if len(n.inputs) > 3 else None
        bq = _c(b)
        if bq is None or bq.ndim != 2:
            return "B is not a constant matrix"
        bz = _c(bzp) if bzp is not None else None
        if bzp is not None and bz is None:
            return "B's zero point is computed at run time"
        dql = a.producer if a is not None else None
        dynamic = dql is not None and dql.op_type == "DynamicQuantizeLinear"  # uint8, one scalar zero point
        if a is None or (a.dtype != 2 and not dynamic):
            return "A is not uint8"  # (uint8: the operand of the CPU's u8 x s8 dot products)
        if azp is not None and not (dynamic and azp is dql.output(2)) and \
                (azp.shape is None or any(d != 1 for d in azp.shape)):
            return "A's zero point is not a scalar (per-row zero points are not lowered)"
        opset = (self.model.opset("") if self.model is not None else None) or 13
        acc = integer_matmul(graph, n, a, azp, bq, bz, opset)
        if acc is None:
            return "a column of B - zero point spans more than 255 values"
        self._integer_result(graph, n, acc)
        return None

    def _integer_result(self, graph: Graph, n: Node, acc: Value) -> None:
        """Replace ``n``'s int32 output by ``Cast(acc, int32)``, and read the int32 round trips
        that follow as float: ``Cast(float)`` of it becomes ``acc``, and ``Add(it, Cast(z, int32))``
        read only through ``Cast(float)`` becomes ``Add(acc, z)`` (``z`` float: ORT's
        ``Floor(b / scale)`` bias). The same integers while they stay below 2^24 (the bias is an
        integer-valued float either way)."""
        old = n.output(0)
        acc.dtype, acc.shape = 1, old.shape
        acc_i = self._node(graph, n, "Cast", [acc], to=6)
        acc_i.dtype, acc_i.shape = old.dtype, old.shape
        graph.replace_all_uses_with(old, acc_i)
        graph.remove(n)
        for c in list(acc_i.consumers()):
            if c.op_type == "Cast" and c.attr("to") == 1:
                graph.replace_all_uses_with(c.output(0), acc)
                graph.remove(c)
                continue
            if c.op_type != "Add" or len(c.inputs) != 2:
                continue
            other = c.input(1) if c.input(0) is acc_i else c.input(0)
            casts = c.output(0).consumers()
            if c.output(0).is_graph_output() or not casts or any(k.op_type != "Cast" or k.attr("to") != 1
                                                                  for k in casts):
                continue
            bias = self._float_source(graph, c, other)
            if bias is None:
                continue
            s = graph.make_node("Add", [acc, bias], {}, before=c,
                                name=graph.fresh_name(f"{c.name or 'add'}/float")).output(0)
            s.dtype, s.shape = 1, c.output(0).shape
            for k in casts:
                graph.replace_all_uses_with(k.output(0), s)
                graph.remove(k)
            graph.remove(c)

    def _float_source(self, graph: Graph, ref: Node, v: Value | None) -> Value | None:
        """The float value an int32 ``v`` was cast from (``Cast(z, int32)`` of a float ``z``, possibly
        behind Reshape/Unsqueeze/Squeeze, which are then applied to ``z``), or None."""
        p = v.producer if v is not None else None
        if p is None:
            return None
        if p.op_type == "Cast":
            z = p.input(0)
            return z if p.attr("to") == 6 and z is not None and z.dtype == 1 else None
        if p.op_type in ("Reshape", "Unsqueeze", "Squeeze") and p.input(0) is not None:
            z = self._float_source(graph, ref, p.input(0))
            if z is None:
                return None
            return graph.make_node(p.op_type, [z, *p.inputs[1:]], {k: p.attr(k) for k in p.attrs}, before=ref,
                                   name=graph.fresh_name(f"{p.name or p.op_type}/float")).output(0)
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
