"""Static post-training INT8 quantization in QDQ form (uint8 activations, int8 weights).

What it does:
  * picks the tensors to quantize: the activation inputs and outputs of Conv, Gemm and
    MatMul (after a Relu/Clip that is the only reader, which ORT folds into the integer op), and - so that runs of integer ops stay integer without Q/DQ "ping-pong" - the
    outputs of ops ONNX Runtime executes in int8 when their inputs are quantized (MaxPool,
    AveragePool, GlobalAveragePool, Relu, Clip, Concat, Add, Reshape, Flatten, Transpose,
    Squeeze, Unsqueeze). Ops without integer kernels (Sigmoid, HardSwish, Softmax...) are not
    wrapped: they read the dequantized value;
  * calibrates those tensors on the calibration data (``minmax``, ``percentile`` or ``mse``),
    with a progress bar;
  * inserts one QuantizeLinear -> DequantizeLinear pair per tensor (asymmetric uint8: the fast
    U8S8 path of ORT on x86), stores weights as int8 initializers (symmetric; per output channel
    for Conv and Gemm, per tensor for MatMul) behind a DequantizeLinear, and biases as int32 with
    scale = input scale * weight scale, zero point 0 - the form ORT turns into QLinearConv,
    QGemm and QLinearMatMul;
  * leaves depthwise convolutions in float by default (``skip_depthwise``): on x86, ORT's
    int8 depthwise kernels plus the Q/DQ around them measured slower than fp32;
  * raises the opset to 13 with onnx's version converter when per-channel weights need it (and
    says so), weights stored as ``Constant`` nodes and shared weights are handled.

Refuses (raises) on a model with nothing quantizable, and on calibration data that does not
match the model (names, ranks, fixed dims, dtypes, NaN/Inf, empty). Not yet: If/Loop bodies
(left in float and reported), dynamic quantization, entropy calibration, equalization, mixed
precision - see issue 4. Lossy: measure accuracy with the report or your metric.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx

from graphopt import GraphoptError, Graph, Model, Node, Pass, PassContext, Value, register_pass
from graphopt.runtime import intermediate_session, load_calibration

from .calibrate import METHODS, RangeObserver, int8_weight, uint8_params

log = logging.getLogger(__name__)

#: op -> (indices of activation inputs, index of the weight input or None, index of the bias)
QUANT_OPS: dict[str, tuple[tuple[int, ...], int | None, int | None]] = {
    "Conv": ((0,), 1, 2),
    "Gemm": ((0,), 1, 2),
    "MatMul": ((0, 1), 1, None),  # input 1 is a weight when constant, else a second activation
}
#: ops ORT runs in int8 when their input is quantized: their outputs get quantized too
INT8_FOLLOWERS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "Relu", "Clip", "Concat", "Add",
                            "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"})
_STD = ("", "ai.onnx")


def _float(v: Value | None) -> bool:
    return v is not None and v.dtype == onnx.TensorProto.FLOAT


@register_pass
class QuantizeStatic(Pass):
    """Static INT8 quantization (QDQ, U8S8) calibrated on ``ctx.calibration`` samples."""

    name = "quantize-static"
    recursive = False
    default_options = {
        "method": "minmax",
        "percentile": 99.99,
        "per_channel": True,
        "op_types": ("Conv", "Gemm", "MatMul"),
        "exclude_nodes": (),
        "max_samples": 256,
        "skip_depthwise": True,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["method"] not in METHODS:
            raise GraphoptError(f"unknown calibration method {self.options['method']!r}; choose from {METHODS}")
        self.report: dict[str, Any] = {}

    # -- selection ------------------------------------------------------------------------------
    def _targets(self, graph: Graph) -> tuple[list[Node], list[Value]]:
        excl = set(self.options["exclude_nodes"])
        ops = set(self.options["op_types"])
        quant_nodes = [n for n in graph if n.op_type in ops and n.op_type in QUANT_OPS and n.domain in _STD
                       and n.name not in excl and _float(n.input(0))
                       and not (self.options["skip_depthwise"] and self._depthwise(n))]
        self.report["kept_float_depthwise"] = sum(1 for n in graph if n.op_type == "Conv" and self._depthwise(n)) \
            if self.options["skip_depthwise"] else 0
        chosen: dict[int, Value] = {}
        for n in quant_nodes:
            acts, w, _ = QUANT_OPS[n.op_type]
            for i in acts:
                v = n.input(i)
                if v is not None and _float(v) and not v.is_const():
                    chosen[id(v)] = v
            if w is not None and (n.input(w) is None or not n.input(w).is_const()) and n.op_type != "MatMul":
                continue
            out = n.output(0)
            readers = out.consumers()
            if len(readers) == 1 and readers[0].op_type in ("Relu", "Clip") and not out.is_graph_output():
                out = readers[0].output(0)  # quantize after the activation: ORT fuses Conv+Relu+Q
            if _float(out):
                chosen[id(out)] = out
        # extend through ops that stay in int8 (in topological order)
        for n in graph:
            if n.op_type not in INT8_FOLLOWERS or n.domain not in _STD or n.name in excl:
                continue
            data = [v for v in n.inputs if v is not None and not v.is_const()]
            if data and all(id(v) in chosen for v in data) and _float(n.output(0)):
                chosen[id(n.output(0))] = n.output(0)
        return quant_nodes, list(chosen.values())

    # -- main -----------------------------------------------------------------------------------
    def apply(self, model: Model, ctx: PassContext) -> bool:
        if ctx.calibration is None:
            raise GraphoptError("quantize-static needs calibration data (PassContext(calibration=...) or "
                                "--calibration DATA)")
        samples = load_calibration(ctx.calibration, model)[: self.options["max_samples"]]
        bodies = sum(1 for n in model.graph.all_nodes() if n.subgraphs())
        opset = model.opset("") or 0
        if self.options["per_channel"] and opset < 13:
            self._upgrade(model, 13)
            self.report["opset"] = f"raised from {opset} to 13 (per-channel DequantizeLinear)"
        graph = model.graph
        quant_nodes, tensors = self._targets(graph)
        if not quant_nodes:
            raise GraphoptError(f"nothing to quantize: no {'/'.join(self.options['op_types'])} node with float "
                                "inputs in the main graph")
        ranges = self._calibrate(model, tensors, samples)
        params = {id(v): uint8_params(*ranges[v.name]) for v in tensors}
        dq_of: dict[int, Value] = {}
        for v in tensors:
            dq_of[id(v)] = self._insert_qdq(graph, v, *params[id(v)])
        wcache: dict[int, Value] = {}
        n_weights = 0
        for n in quant_nodes:
            acts, w_idx, b_idx = QUANT_OPS[n.op_type]
            if w_idx is None:
                continue
            w = n.input(w_idx)
            if w is None or w.const_value() is None or w.const_value().dtype != np.float32:
                continue
            axis = self._axis(n, w) if self.options["per_channel"] else None
            key = (id(w), axis)
            if hash(key) not in wcache:
                q, s = int8_weight(w.const_value(), axis)
                wcache[hash(key)] = self._dq_const(graph, n, w.name, q, s, np.zeros(s.shape, np.int8), axis)
                n_weights += 1
            wdq = wcache[hash(key)]
            n.set_input(w_idx, wdq)
            b = n.input(b_idx) if b_idx is not None else None
            x = n.input(acts[0])
            if b is not None and b.const_value() is not None and x is not None and x.producer is not None \
                    and x.producer.op_type == "DequantizeLinear":
                xs = float(x.producer.input(1).const_value())
                ws = wdq.producer.input(1).const_value().astype(np.float64)
                bscale = (xs * ws).astype(np.float32)
                bq = np.round(b.const_value().astype(np.float64) / np.maximum(bscale, 1e-30)).astype(np.int32)
                if bscale.ndim == 0 or bq.shape == bscale.shape:
                    n.set_input(b_idx, self._dq_const(graph, n, b.name, bq, bscale, np.zeros(bscale.shape, np.int32),
                                                      0 if bscale.ndim else None))
        self.report.update({
            "quantized_nodes": len(quant_nodes), "quantized_tensors": len(tensors), "int8_weights": n_weights,
            "calibration_samples": len(samples), "method": self.options["method"],
            "float_subgraphs": bodies,
        })
        if bodies:
            log.warning("quantize-static: %d If/Loop/Scan bodies stay in float (not supported yet)", bodies)
        return True

    @staticmethod
    def _depthwise(n: Node) -> bool:
        """Depthwise Conv (group == input channels > 1): ORT's int8 kernels lose to fp32 there."""
        if n.op_type != "Conv":
            return False
        g = n.attr("group", 1) or 1
        w = n.input(1)
        ws = w.const_value().shape if w is not None and w.const_value() is not None else None
        return g > 1 and ws is not None and ws[1] == 1

    @staticmethod
    def _axis(n: Node, w: Value) -> int | None:
        if n.op_type == "Conv":
            return 0
        if n.op_type == "Gemm":
            return 0 if n.attr("transB", 0) else 1
        return None

    def _upgrade(self, model: Model, version: int) -> None:
        from graphopt import from_proto, to_proto

        try:
            converted = onnx.version_converter.convert_version(to_proto(model), version)
        except Exception as e:  # noqa: BLE001
            raise GraphoptError(f"cannot raise the opset to {version} for per-channel weights ({e}); "
                                "use per_channel=False (--per-tensor)") from None
        new = from_proto(converted, base_dir=model.base_dir, check=False)
        model.graph, model.opset_imports, model.ir_version = new.graph, new.opset_imports, new.ir_version
        model.functions = new.functions

    def _calibrate(self, model: Model, tensors: list[Value], samples: list[dict[str, np.ndarray]]
                   ) -> dict[str, tuple[float, float]]:
        from tqdm import tqdm

        names = [v.name for v in tensors]
        sess, outs = intermediate_session(model, names)
        inputs = {i.name for i in sess.get_inputs()}
        obs = RangeObserver()
        method = self.options["method"]
        passes = 2 if method != "minmax" else 1
        for p in range(passes):
            desc = "calibrating" if p == 0 else "calibrating (histograms)"
            for s in tqdm(samples, desc=desc, unit="sample", leave=False,
                          disable=not __import__("sys").stderr.isatty()):
                res = dict(zip(outs, sess.run(None, {k: v for k, v in s.items() if k in inputs}), strict=True))
                for n in names:
                    arr = res[n]
                    if p == 0:
                        if not np.all(np.isfinite(arr)):
                            raise GraphoptError(f"activation {n!r} is not finite on the calibration data")
                        obs.observe(n, arr)
                    else:
                        obs.observe_hist(n, arr)
        return {n: obs.range(n, method, self.options["percentile"]) for n in names}

    @staticmethod
    def _insert_qdq(graph: Graph, v: Value, scale: np.float32, zp: np.uint8) -> Value:
        base = v.name
        s = graph.add_initializer(base + "_scale", np.array(scale, np.float32))
        z = graph.add_initializer(base + "_zero_point", np.array(zp, np.uint8))
        where = {"after": v.producer} if v.producer is not None and v.producer.graph is graph else {}
        if not where:
            first = next(iter(graph), None)
            where = {"before": first} if first is not None else {}
        q = graph.make_node("QuantizeLinear", [v, s, z], name=graph.fresh_name(base + "_QuantizeLinear"), **where)
        q.output(0).dtype, q.output(0).shape = onnx.TensorProto.UINT8, v.shape
        dq = graph.make_node("DequantizeLinear", [q.output(0), s, z], name=graph.fresh_name(base + "_DequantizeLinear"),
                             after=q)
        out = dq.output(0)
        out.dtype, out.shape = v.dtype, v.shape
        graph.replace_all_uses_with(v, out)
        q.set_input(0, v)  # the Q itself keeps reading the float value
        return out

    @staticmethod
    def _dq_const(graph: Graph, n: Node, base: str, q: np.ndarray, scale: np.ndarray, zp: np.ndarray,
                  axis: int | None) -> Value:
        qv = graph.add_initializer(base + "_quantized", q)
        sv = graph.add_initializer(base + "_scale", np.asarray(scale, np.float32))
        zv = graph.add_initializer(base + "_zero_point", zp)
        attrs = {"axis": axis} if axis is not None and np.ndim(scale) == 1 else {}
        dq = graph.make_node("DequantizeLinear", [qv, sv, zv], attrs, name=graph.fresh_name(base + "_DequantizeLinear"),
                             before=n)
        out = dq.output(0)
        out.dtype, out.shape = onnx.TensorProto.FLOAT, q.shape
        return out
