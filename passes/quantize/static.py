"""Static post-training INT8 quantization in QDQ form (uint8 activations, int8 weights).

What it does:
  * picks the tensors to quantize: the activation inputs and outputs of Conv, Gemm and
    MatMul (after a Relu/Clip that is the only reader, which ORT folds into the integer op), and - so that runs of integer ops stay integer without Q/DQ "ping-pong" - the
    outputs of ops ONNX Runtime executes in int8 when their inputs are quantized (MaxPool,
    AveragePool, GlobalAveragePool, Relu, Clip, Concat, Add, Reshape, Flatten, Transpose,
    Squeeze, Unsqueeze, and Mul of two quantized values). Ops without integer kernels (Sigmoid,
    Softmax...) are not wrapped: they read the dequantized value;
  * keeps MobileNetV3-style nets integer: HardSigmoid of a quantized value becomes an integer
    Add whose saturating QuantizeLinear is the clip (see ``_int8_hard_sigmoids``), HardSwish is
    decomposed into ``x * HardSigmoid(x)`` for it, and spatial ``ReduceMean`` (squeeze-excite)
    becomes the equal ``GlobalAveragePool``, which ORT has in int8;
  * calibrates those tensors on the calibration data (``minmax``, ``percentile`` or ``mse``),
    with a progress bar;
  * inserts one QuantizeLinear -> DequantizeLinear pair per tensor (asymmetric uint8: the fast
    U8S8 path of ORT on x86; ``symmetric_activations=True`` gives int8 activations with zero
    point 0 instead), stores weights as int8 initializers (symmetric; per output channel
    for Conv and Gemm, per tensor for MatMul) behind a DequantizeLinear, and biases as int32 with
    scale = input scale * weight scale, zero point 0 - the form ORT turns into QLinearConv,
    QGemm and QLinearMatMul;
  * quantizes depthwise convolutions too (``skip_depthwise=True`` keeps them float): with the
    chain integer on both sides, ORT's int8 depthwise kernels win (MobileNetV2 at 224x224:
    0.56x of fp32 latency with them, 0.79x without);
  * raises the opset to 13 with onnx's version converter when per-channel weights need it (and
    says so), weights stored as ``Constant`` nodes and shared weights are handled.

Accuracy recovery without training: ``equalize=True`` runs cross-layer equalization first
(``equalize-cross-layer``), ``bias_correction=True`` removes the expected output shift of the
quantized weights using per-channel input means from the calibration data. With ``sensitivity=True`` each quantizable node is quantized alone and the
output error measured on calibration samples (``report["sensitivity"]``); with ``max_error``
(relative L2 error of the outputs, or the value of a user ``metric(ref, got)`` callback) the most
sensitive nodes stay in float until the error fits the budget (automatic mixed precision). The
report gives each quantized activation's SQNR in dB.

Refuses (raises) on a model with nothing quantizable, and on calibration data that does not
match the model (names, ranks, fixed dims, dtypes, NaN/Inf, empty). Inside If and Loop bodies
(nested too) the same selection runs, and the bodies' activations are calibrated like the main
graph's: the calibration session brings them out as extra If outputs (only the branch taken
contributes) or Loop scan outputs (every iteration contributes). Values a body reads from an
outer scope get their Q/DQ inside the body, so the outer graph is untouched
(``report["subgraph_quantized_nodes"]``). Scan bodies, and the ops in a body that this leaves
out, get weight-only int8 (``report["subgraph_weight_only"]``). Lossy: measure accuracy with the
report or your metric.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx

from graphopt import Graph, GraphoptError, Model, Node, Pass, PassContext, Value, register_pass
from graphopt.runtime import intermediate_session, load_calibration

from ..common import is_depthwise, reduce_axes
from .calibrate import METHODS, RangeObserver, int8_sym_params, int8_weight, uint8_params

log = logging.getLogger(__name__)

#: op -> (indices of activation inputs, index of the weight input or None, index of the bias)
QUANT_OPS: dict[str, tuple[tuple[int, ...], int | None, int | None]] = {
    "Conv": ((0,), 1, 2),
    "Gemm": ((0,), 1, 2),
    "MatMul": ((0, 1), 1, None),  # input 1 is a weight when constant, else a second activation
}
#: ops ORT runs in int8 when their input is quantized: their outputs get quantized too
INT8_FOLLOWERS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "Relu", "Clip", "Concat", "Add",
                            "Mul", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                            # QLinearSigmoid / QLinearLeakyRelu (SiLU = x * Sigmoid(x) stays integer
                            # with the Mul), and ops ORT runs on the uint8 data as they are
                            "Sigmoid", "LeakyRelu", "Resize", "Split", "Slice", "Gather"})
#: ops whose output ORT keeps integer only with the input's scale and zero point (it drops their
#: Q/DQ pair): their output range is the input's, as ORT's quantizer does too
SAME_PARAMS = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Resize", "Split",
                         "Slice", "Gather"})
_STD = ("", "ai.onnx")


def _float(v: Value | None) -> bool:
    return v is not None and v.dtype == onnx.TensorProto.FLOAT


def _activation_after(v: Value) -> Value | None:
    """The output of the Relu/Clip that is ``v``'s only reader, if so: quantizing there instead
    lets ORT fold the activation into the integer op before it (QLinearConv, QLinearAdd...)."""
    readers = v.consumers()
    if len(readers) == 1 and readers[0].op_type in ("Relu", "Clip") and not v.is_graph_output():
        return readers[0].output(0)
    return None


def _scalar_scale(n: Node) -> tuple[int, float] | None:
    """``(data input index, k)`` for ``Div(x, c)`` (k = 1/c) or ``Mul(x, c)`` (k = c) by a positive
    scalar constant: on a quantized ``x`` that is only a change of scale, free in int8."""
    if n.op_type not in ("Div", "Mul") or n.domain not in _STD or len(n.inputs) != 2:
        return None
    for i in ((0,) if n.op_type == "Div" else (0, 1)):
        c = n.input(1 - i).const_value() if n.input(1 - i) is not None else None
        if c is not None and c.size == 1 and c.dtype == np.float32 and np.isfinite(c).all() and float(c.ravel()[0]) > 0 \
                and n.input(i) is not None and not n.input(i).is_const():
            k = float(c.ravel()[0])
            return i, (1.0 / k if n.op_type == "Div" else k)
    return None


def _hard_sigmoid_params(n: Node) -> tuple[float, float] | None:
    """``(alpha, beta)`` of a HardSigmoid with a positive slope, else None."""
    if n.op_type != "HardSigmoid" or n.domain not in _STD:
        return None
    alpha, beta = float(n.attr("alpha", 0.2)), float(n.attr("beta", 0.5))
    return (alpha, beta) if alpha > 0 else None


def spatial_means_to_pooling(graph: Graph) -> int:
    """``ReduceMean`` over every spatial axis -> ``GlobalAveragePool`` (the same op, exactly;
    followed by ``Flatten`` for ``keepdims=0``), which ONNX Runtime runs in int8
    (QLinearGlobalAveragePool) while it has no integer ReduceMean: squeeze-excite blocks and
    classifier heads then stay integer."""
    count = 0
    for n in list(graph):
        if n.op_type != "ReduceMean" or n.domain not in _STD or not _float(n.input(0)) or n.input(0).shape is None:
            continue
        rank = len(n.input(0).shape)
        axes = reduce_axes(n)
        if rank < 4 or axes is None or sorted(a % rank for a in axes) != list(range(2, rank)):  # images only:
            # a transformer's [batch, tokens, hidden] mean would fit the form too, but is no pooling
            continue
        gap = graph.make_node("GlobalAveragePool", [n.input(0)], before=n, name=graph.fresh_name(n.name or "gap"))
        gap.output(0).dtype, gap.output(0).shape = n.output(0).dtype, list(n.input(0).shape[:2]) + [1] * (rank - 2)
        out = gap.output(0)
        if n.attr("keepdims", 1) == 0:  # [N, C, 1, 1] -> [N, C]
            flat = graph.make_node("Flatten", [out], {"axis": 1}, before=n, name=graph.fresh_name(n.name or "flatten"))
            out = flat.output(0)
            out.dtype, out.shape = n.output(0).dtype, n.output(0).shape
        graph.replace_all_uses_with(n.output(0), out)
        graph.remove(n)
        count += 1
    return count


def decompose_hard_swish(graph: Graph, quantized: set[str]) -> int:
    """``HardSwish(x)`` -> ``x * HardSigmoid(x, 1/6, 1/2)`` (its definition: exact) where ``x``
    is in ``quantized``, so the integer form of HardSigmoid and Mul below can take over."""
    count = 0
    for n in list(graph):
        x = n.input(0) if n.op_type == "HardSwish" and n.domain in _STD else None
        if x is None or x.name not in quantized:
            continue
        hs = graph.make_node("HardSigmoid", [x], {"alpha": 1.0 / 6.0, "beta": 0.5}, before=n,
                             name=graph.fresh_name((n.name or "hardswish") + "_hardsigmoid"))
        hs.output(0).dtype, hs.output(0).shape = x.dtype, x.shape
        mul = graph.make_node("Mul", [x, hs.output(0)], before=n, name=graph.fresh_name((n.name or "hardswish") + "_mul"))
        graph.replace_all_uses_with(n.output(0), mul.output(0))
        mul.output(0).dtype, mul.output(0).shape = x.dtype, x.shape
        graph.remove(n)
        count += 1
    return count


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
        "skip_depthwise": False,
        "max_error": None,
        "metric": None,
        "sensitivity": False,
        "eval_samples": 32,
        "sqnr": True,
        "equalize": False,
        "bias_correction": False,
        "exclude_op_types": (),
        "subgraph_weights": True,
        "symmetric_activations": False,
        "requantize": False,
        "by_latency": False,
        "latency_rounds": 10,
        "latency_regions": 8,
        "latency_margin": 0.02,
        "timer": None,
        "min_channel_sqnr": 5.0,
        "recurrent": "auto",
        "recurrent_margin": 0.05,
        "channel_check": True,
        "float_weights_int8": True,
        "channel_check_tolerance": 0.5,
        "channel_check_samples": 8,
        "rounding": "nearest",
        "rounding_iters": 300,
        "rounding_samples": 32,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["method"] not in METHODS:
            raise GraphoptError(f"unknown calibration method {self.options['method']!r}; choose from {METHODS}")
        from .rounding import ROUNDINGS

        if self.options["rounding"] not in ROUNDINGS:
            raise GraphoptError(f"unknown rounding {self.options['rounding']!r}; choose from {ROUNDINGS}")
        if self.options["recurrent"] not in ("auto", "dynamic", "weights", "float"):
            raise GraphoptError(f"recurrent={self.options['recurrent']!r}: choose from auto, dynamic, weights, float")
        self.report: dict[str, Any] = {}
        self._rounder: Any = None

    # -- selection ------------------------------------------------------------------------------
    def _targets(self, graph: Graph, only: set[str] | None = None) -> tuple[list[Node], list[Value]]:
        excl = set(self.options["exclude_nodes"])
        ops = set(self.options["op_types"]) - set(self.options["exclude_op_types"])
        quant_nodes = [n for n in graph if n.op_type in ops and n.op_type in QUANT_OPS and n.domain in _STD
                       and n.name not in excl and _float(n.input(0)) and (only is None or n.name in only)
                       and not (self.options["skip_depthwise"] and is_depthwise(n))]
        self.report["kept_float_depthwise"] = sum(1 for n in graph if is_depthwise(n)) \
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
            out = _activation_after(n.output(0)) or n.output(0)
            if _float(out):
                chosen[id(out)] = out
        # extend through ops that stay in int8 (in topological order) ...
        followers: list[tuple[Node, bool]] = []
        # values integer inside ORT without a Q/DQ of their own: HardSigmoid outputs (a fixed range,
        # see _int8_hard_sigmoids) and follower outputs quantized after the Relu/Clip reading them
        implicit: set[int] = set()
        for n in graph:
            if n.domain not in _STD or n.name in excl:
                continue
            if _hard_sigmoid_params(n) is not None and id(n.input(0)) in chosen and _float(n.output(0)):
                implicit.add(id(n.output(0)))
                continue
            sc = _scalar_scale(n)
            if sc is not None and id(n.input(sc[0])) in chosen and _float(n.output(0)):
                added = id(n.output(0)) not in chosen  # a scale change: folded into the Q/DQ (_fold_scales)
                chosen[id(n.output(0))] = n.output(0)
                followers.append((n, added))
                continue
            if n.op_type not in INT8_FOLLOWERS or (n.op_type == "Resize" and n.attr("mode", "nearest") != "nearest"):
                continue
            # the values it computes on (shapes, indices, scales and sizes are not data)
            data = [v for v in n.inputs if v is not None and not v.is_const() and v.dtype in (None, onnx.TensorProto.FLOAT)]
            if n.op_type == "Mul" and len(data) != 2:
                continue  # a Mul by a float constant has no integer kernel
            outs = [o for o in n.outputs if _float(o)]
            if data and outs and len(outs) == len(n.outputs) and all(id(v) in chosen or id(v) in implicit
                                                                     for v in data):
                out = outs[0]
                if len(outs) == 1 and n.op_type not in ("Relu", "Clip") and id(out) not in chosen \
                        and _activation_after(out) is not None:
                    implicit.add(id(out))  # Add -> Relu: a Q/DQ between them would only requantize
                    continue
                added = any(id(o) not in chosen for o in outs)  # else an integer op reads them anyway
                for o in outs:
                    chosen[id(o)] = o
                followers.append((n, added))
        # ... but only where an integer op reads the result: no Q/DQ "ping-pong" into float ops
        qset = set(quant_nodes)
        kept: set[Node] = set()
        for n, added in reversed(followers):
            readers = [r for o in n.outputs for r in o.consumers()]
            # data movement on values that are int8 anyway moves a quarter of the bytes, and the one
            # DequantizeLinear after it replaces those before it (detector heads: Concat -> Reshape)
            moves = n.op_type in SAME_PARAMS or n.op_type == "Concat"
            if not added or moves or any(r in qset or r in kept for r in readers):
                kept.add(n)
            else:
                for o in n.outputs:
                    chosen.pop(id(o), None)
        return quant_nodes, list(chosen.values())

    # -- main -----------------------------------------------------------------------------------
    def apply(self, model: Model, ctx: PassContext) -> bool:
        if ctx.calibration is None:
            raise GraphoptError("quantize-static needs calibration data (PassContext(calibration=...))")
        samples = load_calibration(ctx.calibration, model)[: self.options["max_samples"]]
        from .requantize import DequantizeInteger, describe_quantization, refuse_if_quantized

        if not self.options["requantize"]:
            refuse_if_quantized(model, "static quantization")
        elif describe_quantization(model)["quantized"]:
            self.report["quantized_before"] = describe_quantization(model)["summary"]
            deq = DequantizeInteger()
            deq.apply(model, ctx)
            self.report["dequantized"] = deq.report["dequantized"]
            if deq.report["left"]:
                self.report["left_integer"] = deq.report["left"]
        bodies = sum(1 for n in model.graph.all_nodes() if n.subgraphs())
        # the types inferred here (and by the opset converter) serve the quantizer: the model keeps
        # only the value_info it came with (ppocr_cls: 153 entries, 8 KB of a 220 KB int8 file)
        had_info = {v.name for g in model.graph.all_graphs() for v in g.value_info}
        opset = model.opset("") or 0
        ops = set(self.options["op_types"]) - set(self.options["exclude_op_types"])
        if not any(n.op_type in ops and n.domain in _STD for n in model.graph.all_nodes()):
            raise GraphoptError(f"nothing to quantize: no {'/'.join(sorted(ops)) or 'quantizable'} node in the model "
                                f"(its ops: {', '.join(sorted({n.op_type for n in model.graph.all_nodes()}))})")
        if self.options["per_channel"] and opset < 13:
            self._upgrade(model, 13)
            self.report["opset"] = f"raised from {opset} to 13 (per-channel DequantizeLinear)"
        from graphopt.analysis import infer_shapes

        if self.options["equalize"]:
            from .equalize import CrossLayerEqualization

            self.report["equalized"] = CrossLayerEqualization().apply(model, ctx)
        infer_shapes(model)  # dtypes decide what is quantizable
        graph = model.graph
        for g in graph.all_graphs():  # trials work on copies and find nodes by name
            for n in g:
                if not n.name:
                    n.name = g.fresh_name(n.op_type)
        self.report["pooled_reduce_means"] = spatial_means_to_pooling(graph)
        _, pre = self._targets(graph)
        self.report["decomposed_hardswish"] = decompose_hard_swish(graph, {v.name for v in pre})
        quant_nodes, tensors = self._targets(graph)
        bodies_plan: list[tuple[Graph, list[str]]] = []
        if self.options["subgraph_weights"]:
            for g in model.graph.all_graphs():
                parent = g.parent
                if g is graph or parent is None or parent.op_type not in ("If", "Loop"):
                    continue
                b_nodes, b_tensors = self._targets(g)
                if b_nodes:
                    bodies_plan.append((g, [n.name for n in b_nodes]))
                    have = {t.name for t in tensors}
                    tensors = tensors + [v for v in b_tensors if v.name not in have]
        if not quant_nodes and not bodies_plan:
            where = "the main graph or its If/Loop bodies" if bodies else "the model"
            raise GraphoptError(f"nothing to quantize: no {'/'.join(self.options['op_types'])} node with float "
                                f"inputs in {where}")
        ranges = self._calibrate(model, tensors, samples)
        names = self._channel_spread(quant_nodes, ranges)
        if self.options["channel_check"] and self.report["kept_float_channel_spread"]:
            names = self._admit_spread(model, quant_nodes, names, ranges, samples)
        if self.options["rounding"] != "nearest":  # learned rounding from the float model's activations
            self._learn_rounding(model, [n for n in quant_nodes if n.name in set(names)], samples)
        budget = self.options["max_error"]
        if budget is not None or self.options["sensitivity"]:
            chosen = self._mixed_precision(model, names, ranges, samples, budget)
        else:
            chosen = names
        if self.options["by_latency"] and chosen:
            chosen = self._by_latency(model, chosen, ranges, samples)
        n_weights, n_tensors, n_hs = self._rewrite(model, chosen, ranges)
        sub_nodes = 0
        for g, b_names in bodies_plan:
            w_b, t_b, hs_b = self._rewrite(model, b_names, ranges, graph=g)
            n_weights, n_tensors, n_hs = n_weights + w_b, n_tensors + t_b, n_hs + hs_b
            sub_nodes += len(b_names)
        self.report["subgraph_quantized_nodes"] = sub_nodes
        for g in model.graph.all_graphs():
            g.value_info = [v for v in g.value_info if v.name in had_info]
        self.report["int8_recurrent_weights"] = self._recurrent_weights(model, samples)
        if self.options["float_weights_int8"]:
            self.report["weight_only_int8"] = self._weight_only(model.graph, self.report["kept_float_channel_spread"])
        self.report["int8_hardsigmoid"] = n_hs
        self.report.update({
            "quantized_nodes": len(chosen),
            "kept_float": sorted(set(names) - set(chosen)) + self.report.get("kept_float_channel_spread", []),
            "quantized_tensors": n_tensors, "int8_weights": n_weights,
            "calibration_samples": len(samples), "method": self.options["method"], "float_subgraphs": bodies,
            "sqnr_db": self._sqnr(tensors, ranges, model, samples, chosen),
        })
        if bodies and self.options["subgraph_weights"]:
            self.report["subgraph_weight_only"] = self._subgraph_weights(model)
            log.info("quantize-static: %d weights inside If/Loop/Scan bodies stored as int8 (weight-only: "
                     "their activations cannot be calibrated from the outside)", self.report["subgraph_weight_only"])
        elif bodies:
            log.warning("quantize-static: %d If/Loop/Scan bodies stay in float", bodies)
        return True

    def _learn_rounding(self, model: Model, nodes: list[Node], samples: list[dict[str, np.ndarray]]) -> None:
        """AdaRound or GPTQ integer weights for ``nodes`` (see :mod:`.rounding`), from their inputs
        in the float model on the calibration samples; :meth:`_int8_weight` then writes them
        with round-to-nearest's scales."""
        from .rounding import LearnedRounding

        def nearest(n: Node, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return int8_weight(w, self._axis(n, n.input(1)) if self.options["per_channel"] else None)

        self._rounder = LearnedRounding(self.options["rounding"], iters=self.options["rounding_iters"])
        self._rounder.prepare(model, nodes, samples[: self.options["rounding_samples"]], nearest)
        self.report["rounding"] = self._rounder.report

    def _channel_spread(self, quant_nodes: list[Node], ranges: dict[str, tuple[float, float]]) -> list[str]:
        """Names of the quantizable nodes to quantize: all but those reading or writing a feature
        map whose narrow channels a per-tensor int8 step would wipe out.

        ORT's integer kernels take one scale per activation tensor. In BN-folded MobileNet-style
        backbones (PaddleOCR's recognizers: a 1x1 conv output spanning +-86 in one channel, +-3 in
        most) the tensor-wide SQNR of such a tensor stays above 30 dB while its narrow channels
        keep a few levels, and the depthwise convolution after it - whose folded per-channel
        weights are largest on exactly those channels - amplifies that noise: measured on
        ppocrv3_rec, a float depthwise conv turned a 35 dB input into an 11 dB output, and the
        int8 model lost 37 points of character accuracy. A node stays float when the
        ``10th percentile over channels of channel variance / (step**2/12)`` of one of its
        quantized activations (inputs, output) is below ``min_channel_sqnr`` dB
        (``report["kept_float_channel_spread"]``, worst value in ``report["channel_sqnr_db"]``).
        """
        limit = self.options["min_channel_sqnr"]
        names = [n.name for n in quant_nodes]
        self.report["kept_float_channel_spread"], self.report["channel_sqnr_db"] = [], {}
        if limit is None or not hasattr(self, "_observer"):
            return names
        params = int8_sym_params if self.options["symmetric_activations"] else uint8_params
        worst: dict[str, float] = {}
        for n in quant_nodes:
            acts = [n.input(i) for i in QUANT_OPS[n.op_type][0] if i < len(n.inputs)]
            out = _activation_after(n.output(0)) or n.output(0)
            for v in [*acts, out]:
                if v is None or v.name not in ranges:
                    continue
                db = self._observer.channel_sqnr(v.name, float(params(*ranges[v.name])[0]))
                if db is not None and db < worst.get(n.name, np.inf):
                    worst[n.name] = db
        low = {k: round(v, 1) for k, v in worst.items() if v < limit}
        if low:
            log.info("quantize-static: %d nodes stay float: a feature map they read or write has channels "
                     "too narrow for one per-tensor int8 step (channel SQNR below %.1f dB)", len(low), limit)
        self.report["kept_float_channel_spread"] = sorted(low)
        self.report["channel_sqnr_db"] = low
        return [k for k in names if k not in low]

    def _admit_spread(self, model: Model, quant_nodes: list[Node], names: list[str],
                      ranges: dict[str, tuple[float, float]], samples: list[dict[str, np.ndarray]]) -> list[str]:
        """Take the nodes :meth:`_channel_spread` kept float back into int8 when the measured
        output error says the narrow channels do not matter here: the channel rule is a cheap
        suspicion, the output error decides.

        Narrow-channel noise is harmful only where later layers amplify it (BN-folded depthwise
        convs in PaddleOCR's recognizers); elsewhere it averages away, and the rule then costs
        size and speed for nothing (ppocrv5_det: 32 of 62 convs float, 0.76x size, while
        all-int8 kept box agreement at 0.995). The two regimes are far apart in output error
        (relative L2 of the outputs, or ``metric``, on ``channel_check_samples`` calibration
        samples), measured here: all flagged nodes int8 against the rule's choice was 4.2x on
        ppocrv3_rec (where the rule recovers 37 points of character accuracy) and 1.9x on
        ppocrv5_rec, but 1.06x on ppocrv4_rec and 1.22x on ppocrv5_det. The flagged nodes go int8
        together when the error grows by at most ``channel_check_tolerance`` (0.5: a half); a
        partial choice is not tried (on ppocrv3_rec, two flagged convs at 1.24x already cost 19
        points of string agreement). ``report["channel_check"]`` gives both errors."""

        flagged = [n.name for n in quant_nodes if n.name in set(self.report["kept_float_channel_spread"])]
        evals = samples[: max(1, int(self.options["channel_check_samples"]))]
        saved = dict(self.report)
        trial = self._trials(model, ranges, evals)

        reference = trial(names)
        order = {n.name: k for k, n in enumerate(quant_nodes)}
        every = sorted(names + flagged, key=lambda k: order.get(k, 0))
        error = trial(every)
        admit = error <= reference * (1.0 + float(self.options["channel_check_tolerance"]))
        self.report.clear()
        self.report.update(saved)
        self.report["channel_check"] = {"error_rule": round(reference, 6), "error_all_int8": round(error, 6),
                                        "flagged": len(flagged), "admitted": bool(admit)}
        if not admit:
            return names
        log.info("quantize-static: the %d nodes flagged for narrow channels go int8 after all (output error "
                 "%.4g with them int8, %.4g with them float)", len(flagged), error, reference)
        self.report["kept_float_channel_spread"], self.report["channel_sqnr_db"] = [], {}
        return every

    @staticmethod
    def _recurrent_nodes(model: Model) -> list[Node]:
        """LSTM/GRU/RNN nodes (any graph) whose ``W`` and ``R`` are constant float 3-D tensors."""
        out = []
        for g in model.graph.all_graphs():
            for n in g:
                if n.op_type not in ("LSTM", "GRU", "RNN") or n.domain not in _STD:
                    continue
                ws = [n.input(i).const_value() if len(n.inputs) > i and n.input(i) is not None else None for i in (1, 2)]
                if all(w is not None and w.dtype == np.float32 and w.ndim == 3 for w in ws):
                    out.append(n)
        return out

    def _recurrent_form(self, model: Model, form: str) -> int:
        """Rewrite the recurrent nodes of ``model`` in ``form``; returns how many weights are int8.

        * ``"dynamic"`` (LSTM only): ONNX Runtime's contrib ``DynamicQuantizeLSTM``, int8 ``W``
          and ``R`` (symmetric, one scale per direction and gate row) transposed to its
          ``[directions, in, 4*hidden]`` layout; the gate matmuls run in integer with the input
          and state quantized at run time;
        * ``"weights"``: weight-only int8 behind a DequantizeLinear (per gate row where
          per-channel): compute stays float, and ORT dequantizes the weights on every run (it does
          not fold a DequantizeLinear);
        * ``"float"``: unchanged."""
        count = 0
        for n in self._recurrent_nodes(model) if form != "float" else []:
            g = n.graph
            if form == "dynamic":
                if n.op_type != "LSTM" or n.attr("layout", 0):
                    continue
                ins = list(n.inputs) + [None] * (8 - len(n.inputs))
                extra: list[Value] = []
                for i in (1, 2):
                    w = n.input(i).const_value().astype(np.float64)  # [D, 4H, in]
                    amax = np.abs(w).max(axis=2) if self.options["per_channel"] else np.abs(w).max(axis=(1, 2))
                    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)  # [D, 4H] or [D]
                    s3 = scale.reshape(scale.shape + (1,) * (3 - scale.ndim))
                    q = np.clip(np.round(w / s3), -127, 127).astype(np.int8)
                    base = g.fresh_name("rw")
                    ins[i] = g.add_initializer(base + "_q", np.ascontiguousarray(q.transpose(0, 2, 1)))
                    extra += [g.add_initializer(base + "_s", scale),
                              g.add_initializer(base + "_z", np.zeros(scale.shape, np.int8))]
                    count += 1
                attrs = {k: n.attr(k) for k in n.attrs if k != "layout"}
                new = g.make_node("DynamicQuantizeLSTM", ins[:8] + extra, attrs, domain="com.microsoft", before=n,
                                  name=g.fresh_name(n.name + "_int8"), num_outputs=len(n.outputs))
                for old, o in zip(n.outputs, new.outputs, strict=False):
                    if old is not None:
                        o.dtype, o.shape = old.dtype, old.shape
                        g.replace_all_uses_with(old, o)
                g.remove(n)
                model.opset_imports.setdefault("com.microsoft", 1)
                continue
            for i in (1, 2):
                axis = 1 if self.options["per_channel"] else None
                q, sc = int8_weight(n.input(i).const_value(), axis)
                n.set_input(i, self._dq_const(g, n, g.fresh_name("rw"), q, sc, np.zeros(sc.shape, np.int8), axis))
                count += 1
        return count

    def _recurrent_weights(self, model: Model, samples: list[dict[str, np.ndarray]]) -> int:
        """Int8 for LSTM/GRU/RNN weights, in the form that runs fastest on ONNX Runtime.

        ONNX has no integer recurrent op for a static quantizer, but a CRNN's recurrent weights are
        most of the file (ddddocr's LSTM: 16 of 54 MB). ``recurrent="auto"`` times the model with
        each form of :meth:`_recurrent_form` (``dynamic`` for LSTM, ``weights``, ``float``; one
        interleaved run, ``timer`` as for ``by_latency``, median of 3 runs) and keeps the fastest,
        the smaller file where they are within ``recurrent_margin`` (5%: on a sub-millisecond
        model one run's noise is larger than 2%). Measured on ddddocr_ocr (ORT, 2 threads, loaded
        machine): DynamicQuantizeLSTM 0.61x of fp32, float LSTM 0.71x, weight-only int8 0.95x
        (the DequantizeLinear of 16 MB on every run); on silero_vad_half (small LSTMs)
        DynamicQuantizeLSTM and float tie (0.75x, 0.80x; 5 interleaved runs), where one 10-round
        timing once chose float at twice the file size. ``"dynamic"``, ``"weights"`` or ``"float"``
        force a form. ``report["recurrent_form"]`` and ``report["recurrent_ms"]`` say what was
        chosen and why."""
        nodes = self._recurrent_nodes(model)
        if not nodes:
            return 0
        form = self.options["recurrent"]
        forms = ["dynamic", "weights", "float"] if any(n.op_type == "LSTM" and not n.attr("layout", 0) for n in nodes) \
            else ["weights", "float"]
        if form not in ("auto", *forms):
            raise GraphoptError(f"recurrent={form!r}: choose from auto, {', '.join(forms)} for this model's "
                                f"{', '.join(sorted({n.op_type for n in nodes}))} nodes")
        if form == "auto":
            timer = self.options["timer"] or self._default_timer
            variants = {}
            for f in forms:
                variants[f] = model.copy()
                self._recurrent_form(variants[f], f)
            runs = [timer(variants, samples[0]) for _ in range(3)]  # median of 3: small models are noisy
            t = {f: float(np.median([r[f] for r in runs])) for f in forms}
            best = min(t.values())
            margin = float(self.options["recurrent_margin"])
            form = next(f for f in forms if t[f] <= best * (1 + margin))  # forms are listed smallest file first
            self.report["recurrent_ms"] = {f: round(t[f], 4) for f in forms}
        self.report["recurrent_form"] = form
        log.info("quantize-static: %d recurrent nodes as %s", len(nodes), form)
        return self._recurrent_form(model, form)

    def _weight_only(self, graph: Graph, names: list[str]) -> int:
        """Weight-only int8 (DequantizeLinear of int8 weights, float compute) for the named nodes,
        those the narrow-channel rule keeps float: their trouble is one scale per activation
        tensor, not their weights, whose int8 copy per output channel is close (ppocrv5_rec: 4
        such convs held 0.33x of the file at 0.26x otherwise)."""
        keep, count = set(names), 0
        cache: dict[tuple[int, int | None], Value] = {}
        for n in list(graph):
            if n.name not in keep or n.op_type not in QUANT_OPS:
                continue
            w_idx = QUANT_OPS[n.op_type][1]
            w = n.input(w_idx) if w_idx is not None and len(n.inputs) > w_idx else None
            arr = w.const_value() if w is not None else None
            if arr is None or arr.dtype != np.float32 or arr.ndim < 2:
                continue
            before = len(cache)
            n.set_input(w_idx, self._int8_weight(graph, n, w, cache))
            count += len(cache) - before
        return count

    def _subgraph_weights(self, model: Model) -> int:
        """Weight-only int8 (DequantizeLinear of int8 weights) for Conv/Gemm/MatMul inside bodies."""
        count = 0
        for g in model.graph.all_graphs():
            if g is model.graph:
                continue
            cache: dict[tuple[int, int | None], Value] = {}
            for n in list(g):
                if n.op_type not in QUANT_OPS or n.domain not in _STD:
                    continue
                w_idx = QUANT_OPS[n.op_type][1]
                w = n.input(w_idx) if w_idx is not None else None
                arr = w.const_value() if w is not None else None
                if arr is None or arr.dtype != np.float32 or arr.ndim < 2:
                    continue
                before = len(cache)
                n.set_input(w_idx, self._int8_weight(g, n, w, cache))
                count += len(cache) - before
        return count

    # -- error, sensitivity, mixed precision ----------------------------------------------------
    def _error(self, ref: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]]) -> float:
        metric = self.options["metric"]
        if metric is not None:
            return float(metric(ref, got))
        errs = []
        for r, g in zip(ref, got, strict=True):
            for k in r:
                a, b = np.asarray(r[k], np.float64), np.asarray(g[k], np.float64)
                errs.append(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
        return float(np.mean(errs))

    def _trials(self, model: Model, ranges: dict[str, tuple[float, float]],
                samples: list[dict[str, np.ndarray]]) -> Any:
        """``trial(subset)``: the output error on ``samples`` of a copy of ``model`` with the layers
        in ``subset`` quantized (the float outputs computed once)."""
        from graphopt.runtime import ort_session

        base = model.copy()
        sess = ort_session(base)
        out_names = [o.name for o in sess.get_outputs()]
        ins = {i.name for i in sess.get_inputs()}

        def outputs(session: Any) -> list[dict[str, np.ndarray]]:
            return [dict(zip(out_names, session.run(None, {k: v for k, v in s.items() if k in ins}), strict=True))
                    for s in samples]

        ref = outputs(sess)

        def trial(subset: list[str]) -> float:
            m = base.copy()
            self._rewrite(m, subset, ranges)
            return self._error(ref, outputs(ort_session(m)))

        return trial

    def _mixed_precision(self, model: Model, names: list[str], ranges: dict[str, tuple[float, float]],
                         samples: list[dict[str, np.ndarray]], budget: float | None) -> list[str]:
        """Quantize one layer at a time to rank sensitivity; with a budget, keep the most
        sensitive layers in float until the output error fits."""

        evals = samples[: self.options["eval_samples"]]
        trial = self._trials(model, ranges, evals)

        from graphopt.progress import progress

        sens = {}
        with progress(total=len(names), desc="sensitivity (one layer int8 at a time)", unit="layer") as bar:
            for n in names:
                bar.set_postfix(n)
                sens[n] = trial([n])
                bar.update()
        self.report["sensitivity"] = dict(sorted(sens.items(), key=lambda kv: -kv[1]))
        chosen = list(names)
        err = trial(chosen)
        self.report["error_all_int8"] = err
        if budget is None:
            self.report["error"] = err
            return chosen
        with progress(total=len(names), desc=f"mixed precision (error <= {budget:g})", unit="layer") as bar:
            for n in sorted(names, key=lambda k: -sens[k]):
                if err <= budget:
                    break
                chosen.remove(n)
                bar.set_postfix(f"{n} to float")
                err = trial(chosen) if chosen else 0.0
                bar.update()
        self.report["error"] = err
        if err > budget:
            raise GraphoptError(f"cannot meet max_error={budget:g}: even with every layer in float the error is {err:g}")
        return chosen

    # -- latency-driven placement ----------------------------------------------------------------
    def _regions(self, graph: Graph, names: list[str], count: int) -> list[list[str]]:
        """The quantized nodes grouped into about ``count`` regions: the connected int8 stretches
        (nodes joined by a quantized tensor, through the integer followers between them), the
        largest split in topological order and the smallest merged with their neighbours."""
        _, tensors = self._targets(graph, only=set(names))
        order = {n.name: k for k, n in enumerate(graph)}
        parent: dict[str, str] = {n: n for n in names}

        def find(a: str) -> str:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        def link(a: str, b: str) -> None:
            parent.setdefault(a, a)
            parent.setdefault(b, b)
            parent[find(a)] = find(b)

        chosen = set(names)

        def integer(e: Node) -> bool:  # runs in int8 in the quantized model
            return e.graph is graph and bool(e.name) and (e.name in chosen or e.op_type in INT8_FOLLOWERS)

        for v in tensors:  # a quantized tensor joins its integer producer and integer readers
            ends = [e for e in ([v.producer] if v.producer is not None else []) + v.consumers() if integer(e)]
            for e in ends[1:]:
                link(ends[0].name, e.name)
        for n in graph:  # and a layer its fused activation
            if n.name in chosen:
                act = _activation_after(n.output(0))
                if act is not None and act.producer is not None and act.producer.name:
                    link(n.name, act.producer.name)
        groups: dict[str, list[str]] = {}
        for n in sorted(names, key=lambda k: order.get(k, 0)):
            groups.setdefault(find(n), []).append(n)
        regions = sorted(groups.values(), key=lambda r: order.get(r[0], 0))
        while len(regions) < count:
            big = max(range(len(regions)), key=lambda i: len(regions[i]))
            r = regions[big]
            if len(r) < 2:
                break
            regions[big: big + 1] = [r[: len(r) // 2], r[len(r) // 2:]]
        while len(regions) > count:  # merge the smallest adjacent pair
            i = min(range(len(regions) - 1), key=lambda k: len(regions[k]) + len(regions[k + 1]))
            regions[i: i + 2] = [regions[i] + regions[i + 1]]
        return regions

    def _default_timer(self, models: dict[str, Model], feed: dict[str, np.ndarray]) -> dict[str, float]:
        """Median ORT latency (ms; all graph optimizations, as deployed) of each model, timed
        interleaved and settled (:func:`graphopt.runtime.interleaved_latency`)."""
        from graphopt.runtime import interleaved_latency, ort_session

        sessions = {k: ort_session(m, optimize=True) for k, m in models.items()}
        return interleaved_latency(sessions, feed, rounds=self.options["latency_rounds"])

    def _by_latency(self, model: Model, names: list[str], ranges: dict[str, tuple[float, float]],
                    samples: list[dict[str, np.ndarray]]) -> list[str]:
        """Keep int8 only where it pays on ONNX Runtime: time the model all int8, all float and
        with each region taken back to float (one interleaved run), and keep in float every
        region whose float form made the model faster; then time that mix again beside all-int8,
        all-float and the two fastest single-region variants (a second interleaved run) and
        write the fastest of those.

        The timer is ``options["timer"]`` (``timer(models, feed) -> {name: ms}``; tests inject
        one) or ORT on the first calibration sample."""
        timer = self.options["timer"] or self._default_timer
        regions = self._regions(model.graph, names, int(self.options["latency_regions"]))
        saved = dict(self.report)
        base = model.copy()

        def variant(keep: list[str]) -> Model:
            m = base.copy()
            if keep:
                self._rewrite(m, keep, ranges)
            return m

        models = {"float": base.copy(), "int8": variant(names)}
        for k, r in enumerate(regions):
            drop = set(r)
            models[f"region{k}"] = variant([n for n in names if n not in drop])
        feed = samples[0]
        t = timer(models, feed)
        margin = float(self.options["latency_margin"])
        decisions, keep = [], list(names)
        for k, r in enumerate(regions):
            faster_in_float = t[f"region{k}"] < t["int8"] * (1 - margin)
            decisions.append({"region": k, "nodes": len(r), "first": r[0], "last": r[-1],
                              "ms_int8": round(t["int8"], 4), "ms_region_float": round(t[f"region{k}"], 4),
                              "kept": "float" if faster_in_float else "int8"})
            if faster_in_float:
                keep = [n for n in keep if n not in set(r)]
        final = {"int8": t["int8"], "float": t["float"]}
        chosen_variant = ""
        if len(keep) not in (0, len(names)):
            # a mix: the finalists - the mix, all-int8, all-float and the (up to 2) single regions
            # whose float form timed fastest - are timed again side by side in one run, so the
            # written model is the fastest of one comparison, not of two rounds taken apart
            keeps = {"mixed": keep}
            faster = sorted((t[f"region{k}"], k) for k in range(len(regions))
                            if t[f"region{k}"] < t["int8"] * (1 - margin))
            for _, k in faster[:2]:
                cand = [n for n in names if n not in set(regions[k])]
                if all(set(cand) != set(v) for v in keeps.values()):
                    keeps[f"region{k}"] = cand
            t2 = timer({"float": base.copy(), "int8": variant(names), **{k: variant(v) for k, v in keeps.items()}},
                       feed)
            final = {k: t2[k] for k in ("int8", "float", *keeps)}
            best = min(keeps, key=lambda k: t2[k])
            if t2[best] > min(t2["int8"], t2["float"]) * (1 - margin):  # no mix is the fastest
                keep = list(names) if t2["int8"] <= t2["float"] else []
            else:
                keep, chosen_variant = keeps[best], best
        elif not keep and t["int8"] < t["float"] * (1 - margin):
            keep = list(names)  # every region alone looked faster in float, the whole is not
        elif keep and t["float"] < t["int8"] * (1 - margin):
            keep = []  # each region alone pays (its boundary Q/DQ would cost more), but float throughout is faster
        self.report.clear()
        self.report.update(saved)
        self.report["latency_decisions"] = decisions
        self.report["latency_ms"] = {k: round(v, 4) for k, v in final.items()}
        self.report["latency_kept_float"] = sorted(set(names) - set(keep))
        self.report["latency_chosen"] = chosen_variant or ("int8" if len(keep) == len(names) else
                                                           "float" if not keep else "mixed")
        log.info("quantize-static: by latency, %d of %d quantizable nodes stay int8 (%d regions)",
                 len(keep), len(names), len(regions))
        return keep

    def _sqnr(self, tensors: list[Value], ranges: dict[str, tuple[float, float]], model: Model,
              samples: list[dict[str, np.ndarray]], chosen: list[str]) -> dict[str, float]:
        """Signal-to-quantization-noise ratio (dB) of each quantized activation on calibration data."""
        if not self.options["sqnr"]:
            return {}
        # the float producer outputs against their quantize-dequantize under the chosen
        # parameters, summed on the calibration samples while they streamed (:meth:`_sqnr_sample`);
        # names as calibrated (a quantized graph output has been renamed since)
        out: dict[str, float] = {}
        for n in ranges:
            sig, noise = getattr(self, "_sqnr_sums", {}).get(n, (0.0, 0.0))
            if noise > 0:
                out[n] = round(10 * np.log10(max(sig, 1e-30) / noise), 2)
        return out

    # -- rewriting ------------------------------------------------------------------------------
    def _rewrite(self, model: Model, node_names: list[str], ranges: dict[str, tuple[float, float]],
                 graph: Graph | None = None) -> tuple[int, int, int]:
        """Insert Q/DQ and int8 weights for the named quantizable nodes of ``graph`` (default:
        the main graph); returns counts (int8 weights, quantized tensors, integer HardSigmoids)."""
        graph = graph if graph is not None else model.graph
        if any(v is not None and v.dtype is None for n in graph if n.op_type in QUANT_OPS for v in n.inputs):
            from graphopt.analysis import infer_shapes

            infer_shapes(model)  # copies made for trials lose inferred types
        keep = set(node_names)
        if graph is not model.graph:  # a body reading an outer, already dequantized value: a local DQ
            for n in graph:  # copy, so ORT sees DQ -> op inside the body and fuses an integer kernel
                if n.name not in keep or n.op_type not in QUANT_OPS:
                    continue
                for i in QUANT_OPS[n.op_type][0]:
                    v = n.input(i)
                    dq = v.producer if v is not None else None
                    if dq is not None and dq.op_type == "DequantizeLinear" and dq.graph is not graph:
                        local = graph.make_node("DequantizeLinear", list(dq.inputs), dict(
                            (k, dq.attr(k)) for k in dq.attrs), before=n, name=graph.fresh_name(dq.name or "dq"))
                        local.output(0).dtype, local.output(0).shape = v.dtype, v.shape
                        n.set_input(i, local.output(0))
        quant_nodes, tensors = self._targets(graph, only=keep)
        tensors = [v for v in tensors if v.name in ranges]
        quantized = {v.name for v in tensors}
        ranges = dict(ranges)
        for n in graph:  # in topological order, so chains of them share one range
            sc = _scalar_scale(n)
            if sc is not None and n.input(sc[0]).name in quantized and n.output(0).name in quantized:
                lo, hi = ranges[n.input(sc[0]).name]
                ranges[n.output(0).name] = (lo * sc[1], hi * sc[1])
                continue
            x = n.input(0) if n.op_type in SAME_PARAMS and n.domain in _STD and n.inputs else None
            if x is not None and x.name in quantized:
                for o in n.outputs:
                    if o.name in quantized:
                        ranges[o.name] = ranges[x.name]
        params = int8_sym_params if self.options["symmetric_activations"] else uint8_params
        for v in tensors:
            self._insert_qdq(graph, v, *params(*ranges[v.name]))
        n_hs = self._int8_hard_sigmoids(graph)
        self._int8_add_constants(graph)
        self._fold_scales(graph)
        wcache: dict[tuple[int, int | None], Value] = {}
        n_weights = 0
        for n in quant_nodes:
            acts, w_idx, b_idx = QUANT_OPS[n.op_type]
            if w_idx is None:
                continue
            w = n.input(w_idx)
            if w is None or w.const_value() is None or w.const_value().dtype != np.float32:
                continue
            before = len(wcache)
            wdq = self._int8_weight(graph, n, w, wcache)
            n_weights += len(wcache) - before
            n.set_input(w_idx, wdq)
            if self.options["bias_correction"] and b_idx is not None:
                self._correct_bias(graph, n, w, wdq, b_idx)
            b = n.input(b_idx) if b_idx is not None else None
            x = n.input(acts[0])
            if b is not None and b.const_value() is not None and x is not None and x.producer is not None \
                    and x.producer.op_type == "DequantizeLinear":
                bscale, bq = self._int32_bias(graph, n, w, wdq, b.const_value(),
                                              float(x.producer.input(1).const_value()))
                if bscale.ndim == 0 or bq.shape == bscale.shape:
                    n.set_input(b_idx, self._dq_const(graph, n, graph.fresh_name("b"), bq, bscale, np.zeros(bscale.shape, np.int32),
                                                      0 if bscale.ndim else None))
        return n_weights, len(tensors), n_hs

    def _int32_bias(self, graph: Graph, n: Node, w: Value, wdq: Value, bias: np.ndarray, xs: float
                    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, int32 values)`` of ``n``'s bias at scale x_scale * w_scale, the form ORT's
        integer kernels take. A channel whose bias does not fit int32 there has weights tiny next to
        it (a near-zero BN gamma folded in): its weight scale is widened until the bias fits, which
        costs nothing visible; where the weight is shared that is not possible and the bias is
        clipped, with a warning."""
        lim = np.iinfo(np.int32).max

        def at_scale() -> tuple[np.ndarray, np.ndarray]:
            scale = (xs * wdq.producer.input(1).const_value().astype(np.float64)).astype(np.float32)
            return scale, np.round(bias.astype(np.float64) / np.maximum(scale, 1e-30))

        bscale, bq = at_scale()
        over = np.abs(bq) > lim
        if over.any() and bscale.ndim == 1 and bq.shape == bscale.shape and wdq.num_uses == 1:
            self._widen_weight_scales(graph, wdq, w, over, np.abs(bias) / (xs * lim / 2))
            bscale, bq = at_scale()
            over = np.abs(bq) > lim
        if over.any():
            log.warning("quantize-static: node %r: %d bias values exceed int32 at scale x_scale*w_scale and are "
                        "clipped (that output channel saturates)", n.name, int(over.sum()))
            self.report["bias_clipped"] = self.report.get("bias_clipped", 0) + int(over.sum())
        return bscale, np.clip(bq, -lim, lim).astype(np.int32)

    def _widen_weight_scales(self, graph: Graph, wdq: Value, w: Value, channels: np.ndarray,
                             min_scale: np.ndarray) -> None:
        """Raise the per-channel weight scale of ``channels`` to at least ``min_scale`` and
        requantize them (new initializers; the DequantizeLinear reads them)."""
        dq = wdq.producer
        axis = dq.attr("axis", 1)
        q = dq.input(0).const_value().copy()
        sc = dq.input(1).const_value().astype(np.float32).copy()
        wf = np.moveaxis(w.const_value().astype(np.float64), axis, 0)
        qm = np.moveaxis(q, axis, 0)
        for c in np.flatnonzero(channels):
            sc[c] = max(float(sc[c]), float(min_scale[c]))
            qm[c] = np.clip(np.round(wf[c] / sc[c]), -127, 127).astype(q.dtype)
        dq.set_input(0, graph.add_initializer(dq.input(0).name, np.moveaxis(qm, 0, axis)))
        dq.set_input(1, graph.add_initializer(dq.input(1).name, sc))
        self.report["widened_weight_scales"] = self.report.get("widened_weight_scales", 0) + int(channels.sum())

    def _fold_scales(self, graph: Graph) -> int:
        """``Q(DQ(q, s, z) * k, s*k, z)`` is ``q``: a Div/Mul by a positive scalar between two
        quantized values goes, the int8 data passes through and the DequantizeLinear after it
        carries the new scale (PaddlePaddle's HardSwish ends in ``/ 6``)."""
        count = 0
        for n in list(graph):
            sc = _scalar_scale(n)
            if sc is None:
                continue
            x, y = n.input(sc[0]), n.output(0)
            dq = x.producer
            readers = y.consumers()
            if dq is None or dq.op_type != "DequantizeLinear" or y.is_graph_output() or len(readers) != 1 \
                    or readers[0].op_type != "QuantizeLinear":
                continue
            q2 = readers[0]
            z_in = dq.input(2).const_value() if len(dq.inputs) > 2 and dq.input(2) is not None else np.uint8(0)
            z_out = q2.input(2).const_value() if len(q2.inputs) > 2 and q2.input(2) is not None else np.uint8(0)
            if z_in is None or z_out is None or np.asarray(z_in).dtype != np.asarray(z_out).dtype \
                    or int(np.asarray(z_in).ravel()[0]) != int(np.asarray(z_out).ravel()[0]) or np.size(z_in) != 1:
                continue
            graph.replace_all_uses_with(q2.output(0), dq.input(0))
            graph.remove(q2)
            graph.remove(n)
            count += 1
        self.report["folded_scales"] = self.report.get("folded_scales", 0) + count
        return count

    def _int8_add_constants(self, graph: Graph) -> int:
        """The float constant of an ``Add`` between quantized values (``DQ(x) + c -> [Relu/Clip] ->
        Q``: PaddlePaddle's HardSwish ``x * Clip(x + 3, 0, 6)``, biases added after a reshape) as
        ``DequantizeLinear`` of a uint8 copy, so ORT runs the Add as QLinearAdd (the Clip becomes
        the saturation of its output) instead of leaving int8 around it. A scalar is exact."""
        count = 0
        for n in list(graph):
            if n.op_type != "Add" or n.domain not in _STD or len(n.inputs) != 2:
                continue
            xs = [v for v in n.inputs if v is not None and v.producer is not None
                  and v.producer.op_type == "DequantizeLinear"]
            cs = [i for i, v in enumerate(n.inputs) if v is not None and _float(v) and v.const_value() is not None]
            if len(xs) != 1 or len(cs) != 1:
                continue
            out = _activation_after(n.output(0)) or n.output(0)
            if not any(c.op_type == "QuantizeLinear" for c in out.consumers()):
                continue
            c = n.input(cs[0]).const_value().astype(np.float64)
            lo, hi = min(float(c.min()), 0.0), max(float(c.max()), 0.0)
            scale, zp = uint8_params(lo, hi)
            q = np.clip(np.round(c / scale) + int(zp), 0, 255).astype(np.uint8)
            n.set_input(cs[0], self._dq_const(graph, n, graph.fresh_name("c"), q, np.asarray(scale, np.float32),
                                              np.asarray(zp, np.uint8), None))
            count += 1
        self.report["int8_add_constants"] = self.report.get("int8_add_constants", 0) + count
        return count

    def _int8_hard_sigmoids(self, graph: Graph) -> int:
        """Integer HardSigmoid for ONNX Runtime, which has no kernel for it (nor HardSwish).

        ``HardSigmoid(x) = clip(alpha*x + beta, 0, 1) = alpha * clip(x + beta/alpha, 0, 1/alpha)``.
        With ``x`` quantized, ``DQ(x) + DQ(beta/alpha)`` followed by a QuantizeLinear whose range
        is exactly [0, 1/alpha] (uint8, zero point 0) is an integer Add whose saturation *is* the
        clip; the DequantizeLinear after it uses scale alpha times smaller, which multiplies by
        alpha for free. ORT runs that as QLinearAdd, and the ``x * HardSigmoid(x)`` Mul after it
        (HardSwish, squeeze-excite gates) as QLinearMul, so MobileNetV3-style nets stay in int8
        instead of leaving it around every activation. Done where every reader of the
        HardSigmoid is a Mul whose output is quantized; the step of the result is 1/255.
        """
        count = 0
        consts: dict[tuple[float, float], tuple[Value, ...]] = {}
        for n in list(graph):
            ab = _hard_sigmoid_params(n)
            x = n.input(0) if ab is not None else None
            if x is None or x.producer is None or x.producer.op_type != "DequantizeLinear":
                continue
            readers = n.output(0).consumers()
            if not readers or not all(r.op_type == "Mul" and any(c.op_type == "QuantizeLinear"
                                                                  for c in r.output(0).consumers()) for r in readers):
                continue
            alpha, beta = ab
            k = beta / alpha
            base = graph.fresh_name("hsig")
            if ab not in consts:  # shared by every HardSigmoid with these parameters (ORT copies DQs)
                offset = self._dq_const(graph, n, base + "_offset", np.array(255 if k >= 0 else 0, np.uint8),
                                        np.array(abs(k) / 255 or 1.0, np.float32),
                                        np.array(0 if k >= 0 else 255, np.uint8), None)
                consts[ab] = (offset, graph.add_initializer(base + "_s", np.array(1.0 / alpha / 255.0, np.float32)),
                              graph.add_initializer(base + "_s_out", np.array(1.0 / 255.0, np.float32)),
                              graph.add_initializer(base + "_z", np.array(0, np.uint8)))
            offset, qs, dqs, z = consts[ab]
            add = graph.make_node("Add", [x, offset], before=n, name=graph.fresh_name(base + "_add"))
            q = graph.make_node("QuantizeLinear", [add.output(0), qs, z], before=n, name=graph.fresh_name(base + "_Q"))
            dq = graph.make_node("DequantizeLinear", [q.output(0), dqs, z], before=n, name=graph.fresh_name(base + "_DQ"))
            for v, dt in ((add.output(0), onnx.TensorProto.FLOAT), (q.output(0), onnx.TensorProto.UINT8),
                          (dq.output(0), onnx.TensorProto.FLOAT)):
                v.dtype, v.shape = dt, x.shape
            graph.replace_all_uses_with(n.output(0), dq.output(0))
            graph.remove(n)
            count += 1
        return count

    def _correct_bias(self, graph: Graph, n: Node, w: Value, wdq: Value, b_idx: int) -> None:
        """Subtract the expected output shift (W_q - W) . E[x] of the quantized weights, with
        E[x] per input channel measured on the calibration data (empirical bias correction)."""
        x = n.input(0)
        name = x.name if x is not None else None
        src = None
        if x is not None and x.producer is not None and x.producer.op_type == "DequantizeLinear":
            qn = x.producer.input(0).producer  # DequantizeLinear <- QuantizeLinear <- the float value
            if qn is not None and qn.op_type == "QuantizeLinear" and qn.input(0) is not None:
                src = qn.input(0).name
        key = next((k for k in (src, name) if k in self._chan_sum), None)
        if key is None:
            return
        if n.op_type == "Conv" and (n.attr("group", 1) or 1) != 1:
            return
        mean = self._chan_sum[key] / max(self._chan_n[key], 1)
        wf = w.const_value().astype(np.float64)
        q = wdq.producer.input(0).const_value().astype(np.float64)
        sc = wdq.producer.input(1).const_value().astype(np.float64)
        axis = wdq.producer.attr("axis")
        if sc.ndim:
            shape = [1] * q.ndim
            shape[axis if axis is not None else 0] = -1
            sc = sc.reshape(shape)
        delta = q * sc - wf
        if n.op_type == "Conv":
            if delta.shape[1] != mean.shape[0]:
                return
            shift = (delta * mean.reshape((1, -1) + (1,) * (delta.ndim - 2))).sum(axis=tuple(range(1, delta.ndim)))
        elif n.op_type == "Gemm":
            d = delta.T if n.attr("transB", 0) else delta  # [K, N]
            if d.shape[0] != mean.shape[0]:
                return
            shift = mean @ d
        else:
            return
        b = n.input(b_idx)
        base = b.const_value().astype(np.float64) if b is not None and b.const_value() is not None \
            else np.zeros(shift.shape)
        nb = graph.add_initializer((b.name if b is not None else n.name + "_bias") + "_corrected",
                                   (base - shift).astype(np.float32))
        n.set_input(b_idx, nb)
        self.report["bias_corrected"] = self.report.get("bias_corrected", 0) + 1

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
                                "use per_channel=False") from None
        new = from_proto(converted, base_dir=model.base_dir, check=False)
        model.graph, model.opset_imports, model.ir_version = new.graph, new.opset_imports, new.ir_version
        model.functions = new.functions

    def _calibrate(self, model: Model, tensors: list[Value], samples: list[dict[str, np.ndarray]]
                   ) -> dict[str, tuple[float, float]]:
        from graphopt.progress import progress

        names = [v.name for v in tensors]
        sess, outs = intermediate_session(model, names)
        inputs = {i.name for i in sess.get_inputs()}
        obs = RangeObserver()
        self._observer = obs
        self._chan_sum: dict[str, np.ndarray] = {}
        self._chan_n: dict[str, int] = {}
        self._sqnr_sums: dict[str, list[float]] = {}
        method = self.options["method"]
        passes = 2 if method != "minmax" else 1
        # Statistics are streamed: each sample's activations (every quantized tensor at once,
        # 340 MB for ppocrv3_det at 736x960) are folded into the observer and dropped before the
        # next sample runs, so memory is O(tensors), not O(samples x tensors). Keeping the float
        # activations of the SQNR samples instead took 7 GB on that model with 16 samples.
        for p in range(passes):
            desc = "calibrating" if p == 0 else "calibrating (histograms)"
            for s in progress(samples, desc=desc, unit="sample"):
                self._observe_sample(sess, outs, inputs, names, s, first=p == 0)
        # a value inside an If branch that no calibration sample took was never seen: it stays float
        ranges = {n: obs.range(n, method, self.options["percentile"]) for n in names if n in obs.lo}
        if self.options["sqnr"]:
            try:  # the ranges are final now (trials rewrite copies of them): one more streamed pass
                for s in progress(samples[: self.options["eval_samples"]], desc="calibrating (SQNR)", unit="sample"):
                    self._sqnr_sample(sess, outs, inputs, ranges, s)
            except Exception as e:  # noqa: BLE001 - a report field, never a failure
                log.debug("SQNR skipped: %s", e)
                self._sqnr_sums = {}
        return ranges

    def _observe_sample(self, sess: Any, outs: list[str], inputs: set[str], names: list[str],
                        s: dict[str, np.ndarray], first: bool) -> None:
        """Run one calibration sample and fold its activations into the statistics (min/max,
        moments and channel sums on the ``first`` pass, histograms on the second). The outputs
        die with this frame, before the next sample runs."""
        obs = self._observer
        res = dict(zip(outs, sess.run(None, {k: v for k, v in s.items() if k in inputs}), strict=True))
        for n in names:
            arr = res[n]
            if first and self.options["bias_correction"] and np.ndim(arr) >= 2:
                a = np.asarray(arr, np.float64)
                red = tuple(i for i in range(a.ndim) if i != (1 if a.ndim > 2 else a.ndim - 1))
                self._chan_sum[n] = self._chan_sum.get(n, 0) + a.sum(axis=red)
                self._chan_n[n] = self._chan_n.get(n, 0) + int(a.size // a.shape[1 if a.ndim > 2 else -1])
                del a
            if first:
                if not np.all(np.isfinite(arr)):
                    raise GraphoptError(f"activation {n!r} is not finite on the calibration data")
                obs.observe(n, arr)
            else:
                obs.observe_hist(n, arr)

    def _sqnr_sample(self, sess: Any, outs: list[str], inputs: set[str], ranges: dict[str, tuple[float, float]],
                     s: dict[str, np.ndarray]) -> None:
        """Add one sample's signal and quantization-noise energy of each calibrated activation
        (its float value against its quantize-dequantize under ``ranges``) to the SQNR sums."""
        res = dict(zip(outs, sess.run(None, {k: v for k, v in s.items() if k in inputs}), strict=True))
        for n, rng in ranges.items():
            if n not in res:
                continue
            arr = np.asarray(res[n])
            if self.options["symmetric_activations"]:
                scale, _ = int8_sym_params(*rng)
                fq = np.clip(np.round(arr / scale), -128, 127) * scale
            else:
                scale, zp = uint8_params(*rng)
                fq = (np.clip(np.round(arr / scale) + zp, 0, 255) - zp) * scale
            acc = self._sqnr_sums.setdefault(n, [0.0, 0.0])
            x = arr.astype(np.float64)
            acc[0] += float(np.sum(x ** 2))
            acc[1] += float(np.sum((x - fq) ** 2))

    @staticmethod
    def _insert_qdq(graph: Graph, v: Value, scale: np.float32, zp: np.uint8 | np.int8) -> Value:
        # short generated names ("q__12_s"...): exporters' value names run to 60+ characters,
        # and repeated over the Q, DQ, scale and zero point they outweighed the int8 weights of
        # small models (MobileNet-style at 64x64: 64 KB of names against 85 KB of tensors)
        base = graph.fresh_name("q")
        s = graph.add_initializer(base + "_s", np.array(scale, np.float32))
        z = graph.add_initializer(base + "_z", np.array(zp))
        where = {"after": v.producer} if v.producer is not None and v.producer.graph is graph else {}
        if not where:
            first = next(iter(graph), None)
            where = {"before": first} if first is not None else {}
        q = graph.make_node("QuantizeLinear", [v, s, z], name=graph.fresh_name(base + "_Q"),
                            output_names=[base + "_q"], **where)
        q.output(0).dtype = onnx.TensorProto.INT8 if np.asarray(zp).dtype == np.int8 else onnx.TensorProto.UINT8
        q.output(0).shape = v.shape
        dq = graph.make_node("DequantizeLinear", [q.output(0), s, z], name=graph.fresh_name(base + "_DQ"),
                             output_names=[base + "_dq"],
                             after=q)
        out = dq.output(0)
        out.dtype, out.shape = v.dtype, v.shape
        if v.graph is graph:
            graph.replace_all_uses_with(v, out)
        else:  # a body reading an outer value: only this body's readers switch to the DQ
            for node, i in v.uses:
                if node.graph is graph and node is not q:
                    node.set_input(i, out)
        q.set_input(0, v)  # the Q itself keeps reading the float value
        return out

    def _int8_weight(self, graph: Graph, n: Node, w: Value, cache: dict[tuple[int, int | None], Value]) -> Value:
        """``DequantizeLinear`` of the int8 (symmetric; per channel where enabled) copy of
        weight ``w`` read by ``n``; a weight shared by several nodes is quantized once."""
        axis = self._axis(n, w) if self.options["per_channel"] else None
        key = (id(w), axis)
        if key not in cache:
            q, sc = int8_weight(w.const_value(), axis)
            if self._rounder is not None:
                q = self._rounder.refine(n, w, q)
            cache[key] = self._dq_const(graph, n, graph.fresh_name("w"), q, sc, np.zeros(sc.shape, np.int8), axis)
        return cache[key]

    @staticmethod
    def _dq_const(graph: Graph, n: Node, base: str, q: np.ndarray, scale: np.ndarray, zp: np.ndarray,
                  axis: int | None) -> Value:
        qv = graph.add_initializer(base + "_q", q)
        sv = graph.add_initializer(base + "_s", np.asarray(scale, np.float32))
        # the zero point is optional and 0 by default: all-zero ones (symmetric weights, int32
        # biases) of convolutions are left out - per channel they cost 1-4 bytes per output
        # channel. (ORT fuses QLinearConv without them, but not QGemm: Gemm/MatMul keep them.)
        zv = graph.add_initializer(base + "_z", zp) if np.any(zp) or (n.op_type != "Conv" and q.dtype != np.int32) else None
        attrs = {"axis": axis} if axis is not None and np.ndim(scale) == 1 else {}
        dq = graph.make_node("DequantizeLinear", [qv, sv] + ([zv] if zv is not None else []), attrs,
                             name=graph.fresh_name(base + "_DQ"), output_names=[base + "_dq"], before=n)
        out = dq.output(0)
        out.dtype, out.shape = onnx.TensorProto.FLOAT, q.shape
        return out
