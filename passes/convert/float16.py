"""float16 / bfloat16 conversion: weight-only (``float16-weights``) and full compute (``float16``).

``float16-weights`` (the data-free, TFLite-style default): every float32 weight of at least
``min_elements`` values (initializers and ``Constant`` nodes, in every If/Loop/Scan body too) is
stored as float16 (or bfloat16) and read through ``Cast(to=float)``. Compute stays float32, the
file shrinks ~2x, and the outputs change only by the rounding of the weights. ONNX Runtime folds
these Casts of constants when it loads the model, so it runs the same float32 kernels as before.
A weight is left float32 (and named in the report) when it holds values beyond the half type's
range, or when rounding it costs more than ``max_weight_error`` relative L2 error (tiny values
that would underflow). Initializers that are also graph inputs (overridable defaults) keep their
type: changing it would change the model's interface.

``float16`` (``dtype`` float16 or bfloat16): activations too. Which inputs of a node share a type
and which must stay float32/int64 comes from ONNX's op schemas (``onnx.defs.get_schema`` at the
model's opset): every type variable bound to float32 by the node becomes the half type when the
schema allows it there; inputs of fixed type (Resize ``scales``, LayerNormalization's statistics
outputs, ...) and type variables that do not admit the half type keep float32 (a node with a
float32 type variable that cannot take the half type stays float32 entirely). Rules beyond the
schema:

  * constants read by converted nodes are converted (one copy per constant; Clip/Pad bounds,
    Range arguments, ... follow with their type variable); other values get one Cast per value
    and target type, shared by all readers;
  * ``Cast(to=float)`` becomes ``Cast(to=half)`` (except from integers: shape arithmetic stays
    exact in float32); ``ConstantOfShape``'s ``value`` and ``EyeLike``'s ``dtype`` follow their
    output's new type; ``Random*``/``Bernoulli`` stay float32 (ONNX Runtime's CPU provider has
    no float16 kernel for them; a ``*Like`` reading a half value gets it cast back, so its
    output type does not change);
  * ``Shape``/``Size`` read any type, so they never get a Cast; data-movement ops (Reshape,
    Transpose, Concat, Slice, Gather, ...) that read a float32 activation stay float32, so a
    float32 region keeps its reshapes and the Cast sits at the region's boundary;
  * If/Loop/Scan bodies are converted like graphs whose inputs and outputs keep their types
    (the control-flow node's interface is unchanged; a body reading an outer half value casts
    it only where a float32 node reads it);
  * with ``keep_io`` (default) the model's inputs and outputs stay float32 (a Cast at each
    end); without it they become the half type;
  * nodes of other domains (ai.onnx.ml, com.microsoft, ...) are left alone: they read and
    write float32, with Casts at their boundary;
  * a round trip ``Cast(half->float) -> Cast(float->half)`` is removed (it is exact), and a
    Cast to the type its input already has disappears, so regions do not ping-pong.

Safety: with calibration data (``PassContext.calibration``) the float32 model runs once per
sample and every float value of the main graph is checked: a value whose magnitude exceeds the
half type's largest finite value divided by ``overflow_margin`` (65504/2 by default for float16),
or whose rounding to the half type costs more than ``max_value_error`` relative L2 error
(underflow), keeps its producer and its readers in float32. Without data (and inside bodies,
which the data does not reach) a conservative list of ops stays float32 (``CONSERVATIVE``:
exponentials, powers, sums and means over many values, softmax, cumulative sums, Range), and
the float32 model runs once on random inputs (``probe``): values beyond the half type's range
divided by ``probe_margin`` (65504/4) keep their nodes float32 as with data. Overflow in real
models sits in ordinary MatMul/Add/Mul outputs whose scale comes from the weights, which no op
list can name but any input shows. Each node kept float32 is named in ``report["kept"]`` with
the reason. Lossy by nature: check the result with your task metric.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from graphopt import Graph, GraphoptError, Model, Node, Pass, PassContext, Value, get_pass, register_pass

log = logging.getLogger(__name__)

_STD = ("", "ai.onnx")
FLOAT = TensorProto.FLOAT
HALF_TYPES = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
_TSTR = {TensorProto.FLOAT16: "tensor(float16)", TensorProto.BFLOAT16: "tensor(bfloat16)"}
#: largest finite value of each half type
HALF_MAX = {TensorProto.FLOAT16: 65504.0, TensorProto.BFLOAT16: 3.3895314e38}
_INTEGER = {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8,
            TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL}

#: kept float32 without calibration data (and inside bodies): ops whose results overflow or
#: lose precision in half types on ordinary inputs
CONSERVATIVE = frozenset({
    "Exp", "Pow", "Log", "Softmax", "LogSoftmax", "CumSum", "Range",
    "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceProd",
    "ReduceMean",
})
#: ops that only move or select data: they run in the type of the activation they read
MOVEMENT = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Gather", "GatherElements",
    "GatherND", "Concat", "Split", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "Pad",
})
#: ops whose inputs are read whatever their type
_ANY_INPUT = frozenset({"Shape", "Size"})
_CONTROL = frozenset({"If", "Loop", "Scan", "SequenceMap"})
#: ops whose output type is set by a ``dtype`` attribute
_DTYPE_ATTR = frozenset({"EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                         "Bernoulli"})
#: kept float32 (their readers cast): ONNX Runtime's CPU provider cannot run them in float16
_RANDOM = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
                     "Multinomial"})


def np_half(dtype: int) -> np.dtype:
    """numpy dtype of a half type (ml_dtypes' bfloat16 for BFLOAT16)."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))


def _check_dtype(dtype: Any) -> int:
    if isinstance(dtype, str):
        dtype = {"float16": TensorProto.FLOAT16, "fp16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16,
                 "bf16": TensorProto.BFLOAT16}.get(dtype.lower(), dtype)
    if dtype not in HALF_TYPES:
        raise GraphoptError(f"unknown half type {dtype!r}; use 'float16' or 'bfloat16'")
    return int(dtype)


def rounding_error(x: np.ndarray, dtype: int) -> float:
    """Relative L2 error of storing ``x`` in ``dtype`` (0 for an all-zero tensor)."""
    x = np.asarray(x, np.float32)
    norm = float(np.linalg.norm(x.ravel().astype(np.float64)))
    if norm == 0.0 or not np.isfinite(norm):
        return 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        r = x.astype(np_half(dtype)).astype(np.float32)
    return float(np.linalg.norm((r.astype(np.float64) - x).ravel()) / norm)


def cast_allows(dtype: int, opset: int) -> bool:
    """Whether ``Cast`` reads ``dtype`` at ``opset``."""
    schema = onnx.defs.get_schema("Cast", opset, "")
    return any(_TSTR[dtype] in tc.allowed_type_strs for tc in schema.type_constraints if tc.type_param_str == "T1")


@register_pass
class Float16Weights(Pass):
    """Store float32 weights as float16/bfloat16 behind a Cast; compute stays float32 (half the file)."""

    name = "float16-weights"
    recursive = False
    default_options = {"dtype": "float16", "min_elements": 16, "max_weight_error": 1e-2}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.dtype = _check_dtype(self.options["dtype"])
        self.report: dict[str, Any] = {}

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        opset = (self.model.opset("") if self.model is not None else None) or 1
        if not cast_allows(self.dtype, opset):
            raise GraphoptError(f"{HALF_TYPES[self.dtype]} weights need Cast from {HALF_TYPES[self.dtype]}, which "
                                f"opset {opset} does not have (bfloat16 needs opset >= 13)")
        half = np_half(self.dtype)
        limit = HALF_MAX[self.dtype]
        done: list[str] = []
        kept: dict[str, str] = {}
        for g in list(graph.all_graphs()):
            for name, v in list(g.initializers.items()):
                if v.dtype != FLOAT or v.is_graph_input():
                    if v.dtype == FLOAT and v.is_graph_input():
                        kept[name] = "also a graph input (overridable default): its type is the interface"
                    continue
                w = v.const_value()
                if w is None or w.size < self.options["min_elements"]:
                    continue
                why = self._refuse(w, limit)
                if why:
                    kept[name] = why
                    continue
                hv = g.add_initializer("h", w.astype(half))  # short: the Cast's output keeps the name
                self._cast_in(g, v, hv, next(g.iter_nodes(), None))
                done.append(name)
            for n in list(g.iter_nodes()):
                if n.op_type != "Constant" or n.domain not in _STD or n.output(0).dtype not in (FLOAT, None):
                    continue
                w = n.output(0).const_value()
                if w is None or w.dtype != np.float32 or w.size < self.options["min_elements"]:
                    continue
                why = self._refuse(w, limit)
                if why:
                    kept[n.output(0).name] = why
                    continue
                hv = g.add_initializer("h", w.astype(half))
                self._cast_in(g, n.output(0), hv, n)
                g.remove(n)
                done.append(n.output(0).name)
        self.report = {"weights_converted": len(done), "kept_float32": kept, "dtype": HALF_TYPES[self.dtype]}
        return bool(done)

    def _refuse(self, w: np.ndarray, limit: float) -> str | None:
        if not np.all(np.isfinite(w)):
            return "holds inf/nan"
        m = float(np.max(np.abs(w))) if w.size else 0.0
        if m > limit:
            return f"values up to {m:.4g}, beyond {HALF_TYPES[self.dtype]}'s range"
        err = rounding_error(w, self.dtype)
        if err > self.options["max_weight_error"]:
            return f"rounding to {HALF_TYPES[self.dtype]} costs {err:.2g} relative error (underflow)"
        return None

    @staticmethod
    def _cast_in(g: Graph, old: Value, half: Value, before: Node | None) -> None:
        """Make every reader of ``old`` read ``Cast(half, to=float)``, which takes ``old``'s name.

        The half tensor and the Cast node get short names: a model has one of each per weight,
        and long exporter names repeated three times cost several percent of a small file."""
        kw: dict[str, Any] = {"before": before} if before is not None else {}
        c = g.make_node("Cast", [half], {"to": FLOAT}, name="", **kw)
        out = c.output(0)
        out.dtype, out.shape = FLOAT, old.shape
        g.replace_all_uses_with(old, out)
        if old.is_initializer():
            g.remove_initializer(old.name)
        name = old.name
        old.name = g.fresh_name(name + "_f32")
        out.name = name


class _Converter:
    """One run of the full conversion over a model (see the module docstring)."""

    def __init__(self, model: Model, dtype: int, keep_io: bool, block_ops: set[str], block_nodes: set[str],
                 flagged: dict[str, str], default_block: bool, data_checked: bool) -> None:
        self.model = model
        self.dtype = dtype
        self.tstr = _TSTR[dtype]
        self.half = np_half(dtype)
        self.keep_io = keep_io
        self.block_ops = block_ops
        self.block_nodes = block_nodes
        self.flagged = flagged  # value name -> reason (data-driven)
        self.default_block = default_block
        self.data_checked = data_checked
        self.orig: dict[int, int | None] = {}
        self.casts: dict[tuple[int, int, int], Value] = {}
        self.consts: dict[tuple[int, int], Value] = {}
        self.kept: dict[str, str] = {}
        self.converted = 0
        self.casts_added = 0
        self.consts_converted = 0
        self.other_domains: dict[str, int] = {}
        self.unschema: set[str] = set()

    # -- types --------------------------------------------------------------------------------
    def o(self, v: Value) -> int | None:
        """The type ``v`` had in the float32 model."""
        return self.orig.get(id(v), v.dtype)

    def record(self) -> None:
        for g in self.model.graph.all_graphs():
            for v in list(g.inputs) + list(g.initializers.values()):
                self.orig[id(v)] = v.dtype
            for n in g.iter_nodes():
                for v in n.outputs:
                    self.orig[id(v)] = v.dtype

    # -- rewriting helpers ----------------------------------------------------------------------
    def cast(self, g: Graph, v: Value, to: int, before: Node | None) -> Value:
        """``v`` as type ``to`` in graph ``g`` (one Cast per value, graph and type)."""
        key = (id(v), id(g), to)
        if key in self.casts:
            return self.casts[key]
        if v.is_const() and to in HALF_TYPES and v.dtype == FLOAT:
            return self.const(g, v)
        kw: dict[str, Any] = {"before": before} if before is not None else {}
        tag = "f32" if to == FLOAT else HALF_TYPES.get(to, str(to))
        c = g.make_node("Cast", [v], {"to": to}, name=g.fresh_name(f"{v.name}_to_{tag}"), **kw)
        out = c.output(0)
        out.dtype, out.shape = to, v.shape
        self.orig[id(out)] = to
        self.casts[key] = out
        self.casts_added += 1
        return out

    def const(self, g: Graph, v: Value) -> Value:
        """A half-type copy of the float32 constant ``v`` (one per constant)."""
        key = (id(v), self.dtype)
        if key not in self.consts:
            a = v.const_value()
            home = v.graph if v.graph is not None else g  # the scope that defines v sees every reader
            hv = home.add_initializer(v.name + "_" + HALF_TYPES[self.dtype], np.asarray(a).astype(self.half))
            self.orig[id(hv)] = self.dtype
            self.consts[key] = hv
            self.consts_converted += 1
        return self.consts[key]

    # -- node rules ---------------------------------------------------------------------------
    def _slots(self, schema: Any, n: Node) -> list[tuple[str, str, int, Value | None]]:
        out: list[tuple[str, str, int, Value | None]] = []
        var = onnx.defs.OpSchema.FormalParameterOption.Variadic
        for kind, formals, actuals in (("in", schema.inputs, n.inputs), ("out", schema.outputs, n.outputs)):
            for i, v in enumerate(actuals):
                if not formals:
                    break
                if i >= len(formals) and formals[-1].option != var:
                    break
                f = formals[min(i, len(formals) - 1)]
                out.append((f.type_str, kind, i, v if v is not None and v.name else None))
        return out

    def keep(self, g: Graph, n: Node, why: str | None) -> None:
        """Leave ``n`` in its original types: inputs that became half are cast back."""
        if why:
            self.kept[n.name or n.op_type] = why
        for i, v in enumerate(n.inputs):
            if v is None or not v.name:
                continue
            want = self.o(v)
            if v.dtype in HALF_TYPES and want == FLOAT:
                n.set_input(i, self.cast(g, v, FLOAT, n))

    def reason_to_keep(self, n: Node) -> str | None:
        if n.name and n.name in self.block_nodes:
            return "block list (node)"
        if n.op_type in self.block_ops:
            return "block list (op)"
        for v in n.outputs:
            if v.name in self.flagged:
                return f"{v.name}: {self.flagged[v.name]}"
        for v in n.inputs:
            if v is not None and v.name in self.flagged and not v.is_const():
                return f"reads {v.name}: {self.flagged[v.name]}"
        inside_body = n.graph is not None and n.graph.parent is not None
        if self.default_block and (not self.data_checked or inside_body) and n.op_type in CONSERVATIVE:
            return "conservative default list (no calibration data" + (" inside bodies)" if self.data_checked
                                                                         else ")")
        return None

    def node(self, g: Graph, n: Node, opset: int) -> None:
        if n.domain not in _STD:
            self.other_domains[n.domain] = self.other_domains.get(n.domain, 0) + 1
            self.keep(g, n, f"domain {n.domain!r} left alone")
            return
        op = n.op_type
        if op == "Constant" or op in _ANY_INPUT:
            return  # constants convert where they are read; Shape/Size read any type
        if op in _CONTROL:
            for sg in n.subgraphs():
                self.graph(sg, False)
            self.keep(g, n, None)
            return
        if op == "Cast":
            src = n.input(0)
            if n.attr("to") == FLOAT and src is not None and src.dtype not in _INTEGER and \
                    self.reason_to_keep(n) is None:
                n.set_attr("to", self.dtype)
                n.output(0).dtype = self.dtype
                self.converted += 1
            return
        why = self.reason_to_keep(n)
        if op in _RANDOM:
            why = why or "random generators stay float32 (ONNX Runtime's CPU provider has no float16 kernels for them)"
        if why:
            self.keep(g, n, why)
            return
        try:
            schema = onnx.defs.get_schema(op, opset, n.domain or "")
        except onnx.defs.SchemaError:
            self.unschema.add(op)
            self.keep(g, n, f"no ONNX schema for {op} at opset {opset}")
            return
        tvars = {tc.type_param_str: set(tc.allowed_type_strs) for tc in schema.type_constraints}
        if any(t.startswith(("seq(", "optional(")) for ts in tvars.values() for t in ts) and \
                not any(t.startswith("tensor(") for ts in tvars.values() for t in ts if "seq" not in t):
            self.keep(g, n, f"{op} works on sequences/optionals: left float32")
            return
        if op.startswith("Sequence") or op in ("SplitToSequence", "ConcatFromSequence", "Optional",
                                               "OptionalGetElement"):
            self.keep(g, n, f"{op} works on sequences/optionals: left float32")
            return
        slots = self._slots(schema, n)
        floats = {var for var, _, _, v in slots if var in tvars and v is not None and self.o(v) == FLOAT}
        if op == "ConstantOfShape" and self.o(n.output(0)) in (FLOAT, None):
            val = n.attr("value")
            if val is None or np.asarray(val.numpy()).dtype == np.float32:
                floats.add("T2")
        if not floats:
            self.keep(g, n, None)
            return
        bad = sorted(var for var in floats if self.tstr not in tvars[var])
        in_vars = {var for var, kind, _, v in slots if kind == "in" and v is not None}
        if bad and len(bad) < len(floats) and not in_vars.intersection(bad):
            # a type variable of outputs only (LayerNormalization's statistics U): it keeps float32
            # while the others take the half type, which the schema allows (they vary independently)
            floats -= set(bad)
            bad = []
        if bad:
            self.keep(g, n, f"schema: {op}-{schema.since_version} has no {HALF_TYPES[self.dtype]} for "
                            f"{', '.join(bad)}")
            return
        if op in MOVEMENT:  # follow the activation: stay float32 in a float32 region
            acts = [v for var, kind, _, v in slots if kind == "in" and var in floats and v is not None
                    and not v.is_const()]
            if acts and any(v.dtype == FLOAT for v in acts):
                self.keep(g, n, None)
                return
        limit = HALF_MAX[self.dtype]
        for var, kind, _, v in slots:
            if kind == "in" and var in floats and v is not None and v.dtype == FLOAT and v.is_const():
                a = v.const_value()
                if a is not None and a.size and float(np.max(np.abs(a))) > limit:
                    self.keep(g, n, f"constant {v.name} holds values beyond {HALF_MAX[self.dtype]:g}")
                    return
        for var, kind, i, v in slots:
            if kind == "in":
                if v is None:
                    continue
                if var in floats and self.o(v) in (FLOAT, None) and v.dtype == FLOAT:
                    n.set_input(i, self.cast(g, v, self.dtype, n))
                elif (var not in floats) and v.dtype in HALF_TYPES and self.o(v) == FLOAT:
                    n.set_input(i, self.cast(g, v, FLOAT, n))  # a fixed float32 input (Resize scales, ...)
            elif var in floats and v is not None and self.o(v) in (FLOAT, None):
                self.orig[id(v)] = FLOAT  # an unknown type sharing a float32 type variable is float32
                v.dtype = self.dtype
        if op == "ConstantOfShape":
            val = n.attr("value")
            arr = np.asarray(val.numpy()) if val is not None else np.zeros(1, np.float32)
            n.set_attr("value", arr.astype(self.half).reshape(1))
        elif op in _DTYPE_ATTR:
            n.set_attr("dtype", self.dtype)
        self.converted += 1

    # -- graphs ---------------------------------------------------------------------------------
    def graph(self, g: Graph, main: bool) -> None:
        opset = self.model.opset("") or 1
        if main and not self.keep_io:
            for v in g.inputs:
                if v.dtype == FLOAT and not v.is_initializer():
                    v.dtype = self.dtype
                    self.orig[id(v)] = self.dtype
        for n in list(g.iter_nodes()):
            self.node(g, n, opset)
        for k, v in enumerate(list(g.outputs)):
            want = self.o(v)
            if main and not self.keep_io and want == FLOAT:
                want = self.dtype
                if v.dtype == FLOAT:  # a float32 region reaches the output: cast it at the end
                    g.outputs[k] = self._renamed_cast(g, v, self.dtype)
                continue
            if v.dtype in HALF_TYPES and want == FLOAT:
                g.outputs[k] = self._renamed_cast(g, v, FLOAT)

    def _renamed_cast(self, g: Graph, v: Value, to: int) -> Value:
        """``Cast(v, to)`` as a graph output under ``v``'s name (``v`` gets a fresh one)."""
        name = v.name
        c = g.make_node("Cast", [v], {"to": to}, name=g.fresh_name(name + "_cast"))
        v.name = g.fresh_name(name + "_" + ("f32" if to in HALF_TYPES else HALF_TYPES[v.dtype]))
        out = c.output(0)
        out.name, out.dtype, out.shape = name, to, v.shape
        self.orig[id(out)] = to
        self.casts_added += 1
        return out


def fuse_casts(model: Model) -> int:
    """Remove Casts that do nothing: to the type their input has, and exact round trips
    ``Cast(x: half -> float) -> Cast(-> half)`` (the second reads ``x`` instead). Returns how
    many Casts were bypassed (dead ones are left for DCE)."""
    done = 0
    for g in model.graph.all_graphs():
        for n in list(g.iter_nodes()):
            if n.op_type != "Cast" or n.domain not in _STD:
                continue
            x, y, to = n.input(0), n.output(0), n.attr("to")
            if x is None:
                continue
            src: Value | None = None
            if x.dtype == to:
                src = x
            else:
                p = x.producer
                if p is not None and p.op_type == "Cast" and p.domain in _STD and p.input(0) is not None and \
                        p.input(0).dtype == to and to in HALF_TYPES and p.attr("to") == FLOAT:
                    src = p.input(0)
            if src is None or y.is_graph_output() and (src.is_graph_input() or src.is_graph_output() or
                                                       src.is_const()):
                continue
            if y.is_graph_output() and (src.producer is None or src.graph is not g):
                continue
            g.replace_all_uses_with(y, src)
            if not y.num_uses and not y.is_graph_output():
                g.remove(n)
            done += 1
    return done


_ERROR_SAMPLE = 1 << 16  # values per tensor and sample for the rounding-error estimate


def value_flags(model: Model, samples: list[dict[str, np.ndarray]], dtype: int, overflow_margin: float,
                max_value_error: float, source: str = "the data") -> dict[str, str]:
    """Float values of the main graph that the half type cannot hold on ``samples``:
    {value name: reason}. Runs the float32 model under ONNX Runtime once per sample.
    ``max_value_error=inf`` checks overflow only (``source`` names the samples in the reasons)."""
    from graphopt.progress import progress
    from graphopt.runtime import intermediate_session

    names = [o.name for n in model.graph.iter_nodes() for o in n.outputs
             if o.name and o.dtype == FLOAT and n.op_type != "Constant"]
    names += [v.name for v in model.graph.inputs if v.dtype == FLOAT and not v.is_initializer()]
    if not names or not samples:
        return {}
    sess, outs = intermediate_session(model, names)
    ins = {i.name for i in sess.get_inputs()}
    peak: dict[str, float] = {}
    err2: dict[str, float] = {}
    norm2: dict[str, float] = {}
    half = np_half(dtype)
    wanted = set(names)
    # one float32 run per sample with every value kept: seconds to minutes on a detector
    for s in progress(samples, desc=f"float16: value ranges on {source}", unit="sample"):
        res = sess.run(None, {k: v for k, v in s.items() if k in ins})
        for name, a in zip(outs, res, strict=True):
            if name not in wanted or not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.size:
                continue
            flat = a.reshape(-1)
            m = max(float(flat.max()), -float(flat.min()))  # no |a| temporary: activations can be 100s of MB
            if not np.isfinite(m):  # inf/nan in float32 already: judge the finite values
                flat = flat[np.isfinite(flat)]
                if not flat.size:
                    continue
                m = max(float(flat.max()), -float(flat.min()))
            peak[name] = max(peak.get(name, 0.0), m)
            if not np.isfinite(max_value_error):
                continue
            # the rounding error on an evenly strided subsample (large activations cost seconds otherwise)
            fin = flat[:: max(1, flat.size // _ERROR_SAMPLE)]
            fin = fin[np.isfinite(fin)]
            with np.errstate(over="ignore", invalid="ignore"):
                r = fin.astype(half).astype(np.float32)
            ok = np.isfinite(r)
            d = (r[ok].astype(np.float64) - fin[ok])
            # einsum, not a BLAS dot: right after an ORT run its spinning worker threads hold the
            # cores and a threaded BLAS dot waits on its own (3-5 ms per call instead of 0.1)
            err2[name] = err2.get(name, 0.0) + float(np.einsum("i,i->", d, d))
            f64 = fin.astype(np.float64)
            norm2[name] = norm2.get(name, 0.0) + float(np.einsum("i,i->", f64, f64))
    limit = HALF_MAX[dtype] / overflow_margin
    flags: dict[str, str] = {}
    for name, m in peak.items():
        if m > limit:
            flags[name] = f"reaches {m:.4g} on {source}, beyond {HALF_TYPES[dtype]}'s {HALF_MAX[dtype]:g}" + (
                f" / {overflow_margin:g}" if overflow_margin != 1 else "")
        elif np.isfinite(max_value_error) and norm2.get(name, 0.0) > 0 and (err2[name] / norm2[name]) ** 0.5 > max_value_error:
            flags[name] = (f"rounding to {HALF_TYPES[dtype]} costs {(err2[name] / norm2[name]) ** 0.5:.2g} "
                           "relative error on the data (underflow)")
    return flags


@register_pass
class Float16(Pass):
    """Full float16/bfloat16 compute; I/O kept float32 by default, block list, data-driven fallback."""

    name = "float16"
    recursive = False
    default_options = {"dtype": "float16", "keep_io": True, "block_ops": (), "block_nodes": (),
                       "default_block": True, "overflow_margin": 2.0, "max_value_error": None, "weights": True,
                       "probe": 1, "probe_margin": 4.0}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.dtype = _check_dtype(self.options["dtype"])
        self.report: dict[str, Any] = {}

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        from graphopt.analysis.shapes import infer_shapes

        model = self.model
        if model is None or graph is not model.graph:
            raise GraphoptError("float16 runs on a whole model")
        opset = model.opset("") or 1
        if self.dtype == TensorProto.BFLOAT16 and opset < 13:
            raise GraphoptError(f"bfloat16 compute needs opset >= 13 (its ops take bfloat16 from there on); "
                                f"this model has opset {opset}")
        for g in model.graph.all_graphs():
            if not g.is_sorted():
                g.toposort()
        infer_shapes(model)
        samples = list(ctx.calibration or [])
        max_err = self.options["max_value_error"]
        if max_err is None:
            max_err = 1e-3 if self.dtype == TensorProto.FLOAT16 else 1e-2
        flags = value_flags(model, samples, self.dtype, float(self.options["overflow_margin"]), float(max_err)) \
            if samples else {}
        probe: dict[str, Any] = {}
        probe_flags: dict[str, str] = {}
        if not samples and self.options["default_block"] and int(self.options["probe"] or 0) > 0:
            probe_flags, probe = self._probe(model, int(self.options["probe"]))
        conv = _Converter(model, self.dtype, bool(self.options["keep_io"]), set(self.options["block_ops"]),
                          set(self.options["block_nodes"]), {**flags, **probe_flags}, bool(self.options["default_block"]),
                          bool(samples))
        conv.record()
        conv.graph(model.graph, True)
        fused = fuse_casts(model)
        get_pass("dce").apply(model, ctx)
        stored = 0
        if self.options["weights"] and cast_allows(self.dtype, model.opset("") or 1):
            # weights of nodes kept float32: stored half, read through a Cast
            w = Float16Weights(dtype=HALF_TYPES[self.dtype])
            w.apply(model, ctx)
            stored = w.report["weights_converted"]
        self.report = {
            "dtype": HALF_TYPES[self.dtype], "converted_nodes": conv.converted, "kept": conv.kept,
            "constants_converted": conv.consts_converted, "casts_inserted": conv.casts_added,
            "casts_removed": fused,
            "casts_in_model": sum(1 for g in model.graph.all_graphs() for n in g.iter_nodes() if n.op_type == "Cast"),
            "keep_io": bool(self.options["keep_io"]),
            "data_flags": flags, "calibration_samples": len(samples), "probe": probe, "probe_flags": probe_flags,
            "other_domains": conv.other_domains, "float32_weights_stored_half": stored,
        }
        for name, why in conv.kept.items():
            log.info("float16: %s kept float32: %s", name, why)
        return conv.converted > 0 or conv.consts_converted > 0

    def _probe(self, model: Model, n: int) -> tuple[dict[str, str], dict[str, Any]]:
        """Without data: run the float32 model on ``n`` random feeds (graphopt.runtime.input_feeds:
        floats ~ N(0,1), small integers, defaulted dims grown until the model runs) and flag the
        values whose magnitude exceeds the half type's range divided by ``probe_margin``.

        Why a probe and not only an op list: the values that overflow in real models are
        ordinary MatMul/Add/Mul outputs whose size comes from the weights (magika v1's dense
        layers, trained in front of a LayerNorm that undoes their scale, reach 3.7e6). No op
        class can say which; one run on any input shows it, since the scale is in the weights.
        Random inputs say nothing about rounding error (underflow): that check needs real data.
        A model that does not run on random inputs is converted without the probe (said in the
        report)."""
        from graphopt.runtime import input_feeds

        quiet = logging.getLogger("graphopt.dims")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the defaulted dims warning is for the user's own checks
        try:
            feeds = input_feeds(model, count=n, seed=0, check=True)
            flags = value_flags(model, feeds, self.dtype, float(self.options["probe_margin"]), float("inf"),
                                source="random probe inputs")
        except Exception as e:  # noqa: BLE001 - random inputs cannot satisfy every model: convert without
            log.warning("float16: no probe run on random inputs (%s); only the default op list guards "
                        "against overflow: give calibration samples (PassContext.calibration)",
                        " ".join(str(e).split())[:200])
            return {}, {"samples": 0, "skipped": " ".join(str(e).split())[:300]}
        finally:
            quiet.setLevel(level)
        return flags, {"samples": len(feeds), "flagged": len(flags)}
