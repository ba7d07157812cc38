"""Models that are already quantized: what is integer, what is float, and back to float.

ONNX Runtime's dynamic quantizer writes ``DynamicQuantizeLinear -> ConvInteger/MatMulInteger ->
Cast -> Mul(x_scale * w_scale)`` (the bias quantized at run time by ``Div/Floor/Cast`` and added
to the int32 result) and the contrib op ``DynamicQuantizeLSTM``; QDQ models carry
``DequantizeLinear`` of int8 weights and ``QuantizeLinear -> DequantizeLinear`` pairs on
activations. Such a model has nothing left for a float quantizer to find, so:

* :func:`describe_quantization` says which ops run in integer, which stay float, and how many
  parameters are stored as int8 (and as float);
* the ``dequantize-integer`` pass turns those forms back into float ops (``Conv``, ``MatMul``,
  ``LSTM``) with weights ``(w_q - w_zp) * w_scale`` - exactly the values the integer model
  multiplied with - so the static quantizer can quantize the model again with calibration data
  (``quantize-static`` with ``requantize=True``, ``graphopt quantize --requantize``).
  A form it does not recognise stays as it is and is named in its report.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np

from graphopt import Graph, GraphoptError, Model, Node, Pass, PassContext, Value, register_pass
from graphopt.analysis.quantized import INTEGER_COMPUTE

log = logging.getLogger(__name__)

#: ops that move values between float and integer
CONVERSION = frozenset({"DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"})
_INT8 = (np.int8, np.uint8)
_STRUCTURAL = frozenset({"Constant", "Identity", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Reshape",
                         "Cast", "ConstantOfShape", "Slice", "Transpose", "Flatten"})


def _constants(model: Model) -> list[np.ndarray]:
    out = []
    for g in model.graph.all_graphs():
        seen: set[int] = set()
        for v in g.initializers.values():
            a = v.const_value()
            if a is not None:
                out.append(a)
                seen.add(id(v))
        for n in g:
            if n.op_type == "Constant" and id(n.output(0)) not in seen:
                a = n.output(0).const_value()
                if a is not None:
                    out.append(a)
    return out


def describe_quantization(model: Model) -> dict[str, Any]:
    """What of ``model`` is integer and what is float.

    Returns ``integer_ops`` and ``conversion_ops`` (op -> count), ``float_ops`` (the other compute
    ops), ``int8_params`` / ``float_params`` (elements of int8/uint8 and floating-point constants)
    and a one-paragraph ``summary``. ``quantized`` is True when any integer or conversion op is
    present.
    """
    ops = Counter(n.op_type for n in model.graph.all_nodes())
    integer = {k: c for k, c in ops.items() if k in INTEGER_COMPUTE}
    conv = {k: c for k, c in ops.items() if k in CONVERSION}
    flt = {k: c for k, c in ops.most_common() if k not in INTEGER_COMPUTE and k not in CONVERSION
           and k not in _STRUCTURAL and k not in ("If", "Loop", "Scan")}
    consts = _constants(model)
    i8 = sum(a.size for a in consts if a.dtype in _INT8)
    f = sum(a.size for a in consts if a.dtype.kind == "f")
    total = max(i8 + f, 1)

    def ops_text(d: dict[str, int]) -> str:
        return ", ".join(f"{c} {k}" for k, c in sorted(d.items(), key=lambda kv: -kv[1])) or "none"

    summary = (f"integer: {ops_text(integer)}; conversions: {ops_text(conv)}; float: {ops_text(flt)}; "
               f"parameters: {i8:,} int8 ({100 * i8 / total:.1f}%), {f:,} float")
    return {"quantized": bool(integer or conv), "integer_ops": integer, "conversion_ops": conv, "float_ops": flt,
            "int8_params": int(i8), "float_params": int(f), "summary": summary}


def refuse_if_quantized(model: Model, what: str) -> None:
    """Raise a :class:`GraphoptError` that describes the model's quantization, if it has any."""
    d = describe_quantization(model)
    if d["quantized"]:
        raise GraphoptError(f"the model is already quantized ({d['summary']}); {what} would find nothing float to "
                            "quantize: give requantize=True to dequantize its integer weights and "
                            "quantize it again statically with calibration data")


def _const(v: Value | None) -> np.ndarray | None:
    return v.const_value() if v is not None else None


def _only_reader(v: Value) -> Node | None:
    r = v.consumers()
    return r[0] if len(r) == 1 and not v.is_graph_output() else None


def _scale_factors(v: Value, x_scale: Value) -> tuple[int, np.ndarray] | None:
    """``v`` as a product of ``x_scale`` (counted) and constants (multiplied): (count, const)."""
    if v is x_scale:
        return 1, np.array(1.0, np.float64)
    c = _const(v)
    if c is not None:
        return 0, c.astype(np.float64)
    p = v.producer
    if p is None or p.op_type != "Mul":
        return None
    a, b = _scale_factors(p.input(0), x_scale), _scale_factors(p.input(1), x_scale)
    if a is None or b is None:
        return None
    return a[0] + b[0], a[1] * b[1]


def _integer_tail(y: Value, x_scale: Value) -> tuple[Value, np.ndarray, Value | None] | None:
    """Follow an int32 result through ``[Add(bias_q)] -> Cast(float) -> Mul ... `` to the float
    value it becomes; returns (that value, the weight scale, the int32 bias value or None)."""
    bias = None
    nxt = _only_reader(y)
    if nxt is not None and nxt.op_type == "Add":
        bias = nxt.input(1) if nxt.input(0) is y else nxt.input(0)
        y = nxt.output(0)
        nxt = _only_reader(y)
    if nxt is None or nxt.op_type != "Cast":
        return None
    v = nxt.output(0)
    count, w_scale = 0, np.array(1.0, np.float64)
    while count < 1:
        m = _only_reader(v)
        if m is None or m.op_type != "Mul":
            return None
        other = m.input(1) if m.input(0) is v else m.input(0)
        f = _scale_factors(other, x_scale)
        if f is None:
            return None
        count, w_scale = count + f[0], w_scale * f[1]
        v = m.output(0)
    return (v, w_scale, bias) if count == 1 else None


def _float_bias(bias_q: Value) -> np.ndarray | None:
    """The float bias behind ORT's run-time bias quantization ``Reshape(Cast(Floor(Div(b, s))))``."""
    v = bias_q
    for _ in range(6):
        p = v.producer
        if p is None:
            return None
        if p.op_type == "Div":
            return _const(p.input(0))
        if p.op_type not in ("Reshape", "Cast", "Floor", "Round", "Identity"):
            return None
        v = p.input(0)
    return None


def _dequantized(q: np.ndarray, zp: np.ndarray | None, scale: np.ndarray, axis: int) -> np.ndarray:
    w = q.astype(np.float64)
    shape = [1] * w.ndim
    if np.ndim(scale) == 1 and np.size(scale) > 1:
        shape[axis] = -1
    if zp is not None:
        w = w - np.asarray(zp, np.float64).reshape(shape if np.size(zp) > 1 else [1] * w.ndim)
    return (w * np.asarray(scale, np.float64).reshape(shape if np.size(scale) > 1 else [1] * w.ndim)).astype(np.float32)


@register_pass
class DequantizeInteger(Pass):
    """Integer ops of an already-quantized model back to float ops (for requantization)."""

    name = "dequantize-integer"
    #: ``ops``: the integer forms to undo. ``DynamicQuantizeLSTM`` is not among them by default: no
    #: static int8 LSTM exists in ONNX, so requantizing keeps ORT's integer LSTM (and its int8
    #: weights) rather than a float one four times larger
    default_options = {"ops": ("ConvInteger", "MatMulInteger", "DequantizeLinear")}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.report: dict[str, Any] = {"dequantized": Counter(), "left": Counter()}

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for n in list(graph):
            if n.graph is not graph:
                continue  # removed by an earlier rewrite
            fn = {"ConvInteger": self._conv_or_matmul, "MatMulInteger": self._conv_or_matmul,
                  "DynamicQuantizeLSTM": self._lstm, "DequantizeLinear": self._dequantize_linear}.get(n.op_type)
            if fn is None or n.op_type not in self.options["ops"]:
                if n.op_type in INTEGER_COMPUTE:
                    self.report["left"][n.op_type] += 1
                continue
            if fn(graph, n):
                self.report["dequantized"][n.op_type] += 1
                changed = True
            elif n.op_type != "DequantizeLinear":
                self.report["left"][n.op_type] += 1
                log.warning("dequantize-integer: node %r (%s): form not recognised, left integer", n.name, n.op_type)
        return changed

    def _conv_or_matmul(self, graph: Graph, n: Node) -> bool:
        aq, wq = n.input(0), n.input(1)
        dql = aq.producer if aq is not None else None
        w = _const(wq)
        if dql is None or dql.op_type != "DynamicQuantizeLinear" or aq is not dql.output(0) or w is None:
            return False
        azp = n.input(2)
        if azp is not None and azp is not dql.output(2):
            return False
        tail = _integer_tail(n.output(0), dql.output(1))
        if tail is None:
            return False
        out, w_scale, bias_q = tail
        conv = n.op_type == "ConvInteger"
        axis = 0 if conv else 1
        wf = _dequantized(w, _const(n.input(3)), w_scale, axis)
        inputs = [dql.input(0), graph.add_initializer((wq.name or "w") + "_float", wf)]
        if bias_q is not None:
            b = _float_bias(bias_q)
            if b is None or not conv:
                return False
            inputs.append(graph.add_initializer((wq.name or "w") + "_bias", np.asarray(b, np.float32).reshape(-1)))
        if conv and bias_q is None:  # ORT's newer form adds the float bias after the scale Mul
            add = _only_reader(out)
            other = (add.input(1) if add.input(0) is out else add.input(0)) if add is not None and \
                add.op_type == "Add" else None
            b = _const(other)
            ch = 1 - (w.ndim - b.ndim) if b is not None else -1  # b's axis that meets the channels
            if b is not None and 0 <= ch < b.ndim and b.shape[ch] == w.shape[0] and b.size == w.shape[0]:
                inputs.append(graph.add_initializer((wq.name or "w") + "_bias", b.astype(np.float32).reshape(-1)))
                out = add.output(0)
        attrs = {k: n.attr(k) for k in n.attrs} if conv else {}
        new = graph.make_node("Conv" if conv else "MatMul", inputs, attrs, before=n,
                              name=graph.fresh_name((n.name or n.op_type) + "_float"))
        new.output(0).dtype, new.output(0).shape = out.dtype, out.shape
        graph.replace_all_uses_with(out, new.output(0))
        return True

    def _lstm(self, graph: Graph, n: Node) -> bool:
        if n.domain != "com.microsoft" or len(n.inputs) < 12:
            return False
        ws = [_const(n.input(i)) for i in (1, 8, 9, 2, 10, 11)]
        if any(a is None for a in ws):
            return False
        wq, wsc, wzp, rq, rsc, rzp = ws

        def back(q: np.ndarray, sc: np.ndarray, zp: np.ndarray) -> np.ndarray:
            d = q.shape[0]  # [dirs, in, 4H]: scale/zp per direction ([dirs]) or per channel ([dirs, 4H])
            s = np.asarray(sc, np.float64).reshape(d, 1, -1)
            z = np.asarray(zp, np.float64).reshape(d, 1, -1)
            return ((q.astype(np.float64) - z) * s).transpose(0, 2, 1).astype(np.float32)

        w = graph.add_initializer((n.input(1).name or "W") + "_float", back(wq, wsc, wzp))
        r = graph.add_initializer((n.input(2).name or "R") + "_float", back(rq, rsc, rzp))
        ins = [n.input(0), w, r] + [n.input(i) for i in range(3, 8)]
        while ins and ins[-1] is None:
            ins.pop()
        new = graph.make_node("LSTM", ins, {k: n.attr(k) for k in n.attrs}, num_outputs=len(n.outputs), before=n,
                              name=graph.fresh_name((n.name or "lstm") + "_float"))
        for old, o in zip(n.outputs, new.outputs, strict=True):
            o.dtype, o.shape = old.dtype, old.shape
            graph.replace_all_uses_with(old, o)
        return True

    def _dequantize_linear(self, graph: Graph, n: Node) -> bool:
        """A constant int8 weight behind a DequantizeLinear becomes the float constant; an
        activation's QuantizeLinear -> DequantizeLinear pair becomes the float value itself."""
        q = _const(n.input(0))
        if q is not None:
            sc, zp = _const(n.input(1)), _const(n.input(2)) if len(n.inputs) > 2 else None
            if sc is None or (n.input(2) is not None and zp is None):
                return False
            axis = n.attr("axis", 1)
            wf = _dequantized(q, zp, sc, axis % max(q.ndim, 1))
            graph.replace_all_uses_with(n.output(0), graph.add_initializer((n.input(0).name or "w") + "_float", wf))
            return True
        p = n.input(0).producer if n.input(0) is not None else None
        if p is not None and p.op_type == "QuantizeLinear" and p.input(0) is not None:
            graph.replace_all_uses_with(n.output(0), p.input(0))
            return True
        return False

    def apply(self, model: Model, ctx: PassContext) -> bool:
        before = describe_quantization(model)["summary"]
        changed = super().apply(model, ctx)
        if changed:
            from graphopt.transform import get_pass, run_passes

            run_passes(model, [get_pass("dce")])
        self.report = {"before": before, "dequantized": dict(self.report["dequantized"]),
                       "left": dict(self.report["left"])}
        return changed
