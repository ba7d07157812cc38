"""Constant folding.

Rules:
  * a node of the standard ONNX domain whose inputs are all constant (initializers that are not
    overridable graph inputs, ``Constant`` outputs, or values folded earlier in the same run) is
    evaluated - by ONNX Runtime, so every op ORT can run folds, with onnx's reference evaluator
    as a fallback - and its outputs become initializers;
  * shape computations fold from inferred static shapes: ``Shape``/``Size`` of a value whose
    dims are known, and ``Gather``/``Slice`` of a ``Shape`` that pick only known dims even when
    other dims (a symbolic batch) are not;
  * a ``ConstantOfShape`` of a constant shape larger than ``fill_bytes`` (4 KiB) stays as it
    is - the compact form of a uniform tensor; layout ops, casts and scalar arithmetic applied
    to such fills fold into new fills, and fusion patterns read fills as constants;
  * size-aware: a result larger than ``max_bytes`` that is bigger than the constants it was
    computed from (ConstantOfShape, Tile, Expand, Range, broadcasting...) is *not*
    materialized unless ``fold_expanding=True``; the tiny producer stays, and the pass logs
    what it left and why (``self.skipped``).

Never folds: random ops, control flow (If is handled by ``inline-constant-if``), sequence
values, custom domains. Exact: results are what ORT computes for the same nodes.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from graphopt import Graph, Model, Node, Pass, PassContext, Value, register_pass
from graphopt.analysis import infer_shapes
from graphopt.ir import np_dtype
from graphopt.runtime import evaluate_nodes

log = logging.getLogger(__name__)

NONDETERMINISTIC = frozenset({
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
})
NEVER_FOLD = NONDETERMINISTIC | frozenset({
    "If", "Loop", "Scan", "SequenceMap", "Constant", "SequenceConstruct", "SequenceEmpty", "SequenceInsert",
    "SequenceErase", "SequenceAt", "SplitToSequence", "ConcatFromSequence", "SequenceLength", "Optional",
    "OptionalGetElement", "OptionalHasElement",
})
_STD = ("", "ai.onnx")


LAYOUT_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Expand", "Identity", "Tile"})
_UNARY = {"Neg": np.negative, "Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Abs": np.abs, "Exp": np.exp,
          "Relu": lambda a: np.maximum(a, 0)}
_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power,
           "Max": np.maximum, "Min": np.minimum}
FILL_OPS = LAYOUT_OPS | {"Cast"} | set(_UNARY) | set(_BINARY)


def _fill_apply(node: Node, scalars: list[Any]) -> Any:
    """The scalar value of ``node``'s output when its inputs are fills/uniform constants."""
    op = node.op_type
    x = scalars[0]
    if op in LAYOUT_OPS:
        return x
    if op == "Cast":
        return np.asarray(x).astype(np_dtype(node.attr("to")))
    with np.errstate(all="ignore"):
        if op in _UNARY:
            return _UNARY[op](np.asarray(x))
        if op in _BINARY and len(scalars) == 2 and scalars[1] is not None:
            a, b = np.asarray(x), np.asarray(scalars[1])
            if op == "Div" and a.dtype.kind in "iu":
                return None  # integer division semantics: leave it to ORT
            return _BINARY[op](a, b)
    return None


def _known(d: Any) -> bool:
    """A dim that is a size: an int >= 0 (PaddlePaddle's ``-1`` dim values mean "any size")."""
    return isinstance(d, int) and d >= 0


def _nbytes(a: Any) -> int:
    return int(a.nbytes) if isinstance(a, np.ndarray) and a.dtype != object else 0


@register_pass
class ConstantFolding(Pass):
    """Evaluate nodes whose inputs are all constant (and static shape computations)."""

    name = "fold-constants"
    default_options = {"max_bytes": 1 << 20, "fold_expanding": False, "fill_bytes": 4096}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.skipped: list[tuple[str, str]] = []
        self.failed: list[tuple[str, str]] = []

    def apply(self, model: Model, ctx: PassContext) -> bool:
        self.skipped, self.failed = [], []
        # shape inference is the expensive part on big graphs: redo it only when some value
        # is untyped (new values from rewrites usually carry the type they replace)
        stamp = ctx.options.get("_shapes_fixed")
        untyped = any(o.name and (o.dtype is None or o.shape is None or any(
                          d is None or (isinstance(d, str) and d.startswith("unk__")) for d in o.shape))
                      for g in model.all_graphs() for n in g for o in n.outputs)
        if untyped or (ctx.input_shapes and stamp is not model):
            infer_shapes(model, ctx.input_shapes or None)
            if ctx.input_shapes:
                ctx.options["_shapes_fixed"] = model
        changed = super().apply(model, ctx)
        for name, why in self.skipped:
            log.info("fold-constants left %s: %s", name, why)
        for name, why in self.failed:
            log.info("fold-constants could not evaluate %s: %s", name, why)
        return changed

    # -- shape computations ---------------------------------------------------------------------
    @staticmethod
    def _shape_value(node: Node, known: dict[Value, Any]) -> np.ndarray | None:
        op = node.op_type
        if op in ("Shape", "Size"):
            x = node.input(0)
            if x is None or x.shape is None:
                return None
            dims = list(x.shape)
            if op == "Size":
                return np.array(int(np.prod(dims)), np.int64) if all(_known(d) for d in dims) else None
            start, end = node.attr("start", 0), node.attr("end", None)
            sel = dims[start:end]
            return np.array(sel, np.int64) if all(_known(d) for d in sel) else None
        if op in ("Gather", "Slice"):
            src = node.input(0)
            sh = src.producer if src is not None else None
            if sh is None or sh.op_type != "Shape" or sh.domain not in _STD:
                return None
            x = sh.input(0)
            if x is None or x.shape is None:
                return None
            dims = list(x.shape)[sh.attr("start", 0):sh.attr("end", None)]
            idx = np.arange(len(dims))
            if op == "Gather":
                ind = known.get(node.input(1)) if node.input(1) is not None else None
                if ind is None or node.attr("axis", 0) != 0:
                    return None
                pick = np.take(idx, np.asarray(ind, np.int64))
            else:
                args = [known.get(v) if v is not None else None for v in node.inputs[1:]]
                if len(args) < 2 or args[0] is None or args[1] is None:
                    return None
                if len(args) > 2 and args[2] is not None and list(np.ravel(args[2])) not in ([0], [-1]):
                    return None
                step = int(np.ravel(args[3])[0]) if len(args) > 3 and args[3] is not None else 1
                pick = idx[int(np.ravel(args[0])[0]):int(np.ravel(args[1])[0]):step]
            chosen = [dims[int(i)] for i in np.ravel(pick)]
            if not all(_known(d) for d in chosen):
                return None
            return np.array(chosen, np.int64).reshape(np.shape(pick))
        return None

    # -- fills --------------------------------------------------------------------------------
    def _fills(self, graph: Graph) -> bool:
        """Fold layout ops, casts and scalar arithmetic on ``ConstantOfShape`` fills into new
        fills: the result stays a tiny producer instead of a large initializer."""
        changed = False
        for node in graph:
            if node.domain not in _STD or node.op_type not in FILL_OPS or not node.outputs:
                continue
            out = node.output(0)
            shape = out.static_shape()
            if shape is None or not out.dtype or len([o for o in node.outputs if o.name]) != 1:
                continue
            scalars = []
            has_fill = False
            for k, v in enumerate(node.inputs):
                if v is None:
                    scalars.append(None)
                    continue
                f = v.fill_value()
                if f is not None:
                    has_fill = True
                    scalars.append(f[1])
                    continue
                arr = v.const_value()
                if arr is None:
                    break
                arr = np.asarray(arr)
                if k > 0 and node.op_type in LAYOUT_OPS:
                    scalars.append(arr)  # shape/perm arguments
                elif arr.size and np.all(arr == arr.reshape(-1)[0]):
                    scalars.append(arr.reshape(-1)[0])
                else:
                    break
            else:
                if not has_fill or node.input(0) is None:
                    continue
                val = _fill_apply(node, scalars)
                if val is None:
                    continue
                val = np.asarray(val).astype(np_dtype(out.dtype)).reshape(1)
                shp = graph.add_initializer(out.name + "_shape", np.array(shape, np.int64))
                c = graph.make_node("ConstantOfShape", [shp], {"value": val}, before=node,
                                    name=graph.fresh_name((node.name or node.op_type) + "_fill"))
                c.output(0).dtype, c.output(0).shape = out.dtype, shape
                if out.is_graph_output():
                    continue
                graph.replace_all_uses_with(out, c.output(0))
                graph.remove(node)
                changed = True
        return changed

    # -- main -----------------------------------------------------------------------------------
    def run(self, graph: Graph, ctx: PassContext) -> bool:
        filled = self._fills(graph)
        return self._fold(graph, ctx) or filled

    def _fold(self, graph: Graph, ctx: PassContext) -> bool:
        known: dict[Value, Any] = {}  # value -> data, for constants read by candidates
        direct: dict[Node, np.ndarray] = {}  # shape computations folded without evaluation
        batch: list[Node] = []
        in_batch: set[Node] = set()

        def const(v: Value | None) -> bool:
            if v is None:
                return True
            if v in known:
                return True
            if v.producer in in_batch:
                return True
            arr = v.const_value()
            if arr is None:
                return False
            known[v] = arr
            return True

        for node in graph:
            if node.domain not in _STD or node.op_type in NEVER_FOLD or node.subgraphs():
                continue
            if node.op_type in ("Shape", "Size", "Gather", "Slice"):
                for v in node.inputs[1:]:
                    const(v)
                sv = self._shape_value(node, known)
                if sv is not None:
                    direct[node] = sv
                    known[node.output(0)] = sv
                    continue
            if not node.inputs or not all(const(v) for v in node.inputs):
                continue
            if node.op_type == "ConstantOfShape" and not self.options["fold_expanding"]:
                fill = node.output(0).fill_value()
                if fill is not None and int(np.prod(fill[0])) * fill[1].itemsize > self.options["fill_bytes"]:
                    continue  # a fill is the compact form: keep it (fusions see through fills)
            if any(not o.name for o in node.outputs[:1]):
                continue
            if not self.options["fold_expanding"] and self._too_big_static(node, known):
                continue
            batch.append(node)
            in_batch.add(node)

        if not batch and not direct:
            return False
        feeds = {v: a for v, a in known.items() if v.producer not in in_batch}
        values, failures = evaluate_nodes(self.model, batch, feeds) if batch else ({}, {})
        for n, why in failures.items():
            self.failed.append((n.name or n.op_type, why))
        for n, arr in direct.items():
            values[n.output(0)] = arr
        folded = {n for n in batch if all(o in values or not o.name for o in n.outputs)} | set(direct)
        # decide what to materialize: values read by nodes that stay, or graph outputs
        while True:
            frontier = self._frontier(graph, folded)
            rejected = [v for v in frontier if self._reject(v, values)]
            if not rejected:
                break
            for v in rejected:
                folded.discard(v.producer)
                self.skipped.append((v.producer.name or v.producer.op_type,
                                     f"result {v.name!r} is {_nbytes(values[v])} bytes, larger than its inputs "
                                     f"and max_bytes={self.options['max_bytes']} (fold_expanding=False)"))
        frontier = self._frontier(graph, folded)
        if not frontier:
            return False
        changed = False
        for v in frontier:
            arr = values[v]
            if not isinstance(arr, np.ndarray):
                continue
            arr = np.asarray(arr)
            if v.dtype is not None and v.dtype != 0:
                try:
                    arr = arr.astype(np_dtype(v.dtype), copy=False)
                except Exception:  # noqa: BLE001
                    pass
            if v.is_graph_output() and self._constant_holds(arr):
                c = graph.make_node("Constant", [], {"value": arr}, name=graph.fresh_name(v.name + "_const"),
                                    before=v.producer)
                new = c.output(0)
            elif v.is_graph_output():  # Constant cannot hold this type at the model's opset: Identity of a weight
                c = graph.make_node("Identity", [graph.add_initializer(v.name + "_value", arr)],
                                    name=graph.fresh_name(v.name + "_const"), before=v.producer)
                new = c.output(0)
            else:
                new = graph.add_initializer(v.name, arr)
            new.dtype, new.shape = v.dtype if v.dtype else new.dtype, tuple(arr.shape)
            graph.replace_all_uses_with(v, new)
            changed = True
        for n in reversed(graph.nodes):
            if n in folded and not any(o.num_uses or o.is_graph_output() for o in n.outputs):
                graph.remove(n)
                changed = True
        return changed

    def _constant_holds(self, arr: np.ndarray) -> bool:
        """Whether a ``Constant`` node may hold ``arr`` at the model's opset: below opset 9,
        ``Constant`` (version 1) takes float16, float and double tensors only."""
        opset = self.model.opset("") if self.model is not None else None
        return opset is None or opset >= 9 or arr.dtype in (np.float16, np.float32, np.float64)

    def _too_big_static(self, node: Node, known: dict[Value, Any]) -> bool:
        """Skip evaluating expanding ops whose static output is already known to be too big."""
        total = 0
        for o in node.outputs:
            s = o.static_shape()
            if s is None or not o.dtype:
                return False
            try:
                total += int(np.prod(s)) * np_dtype(o.dtype).itemsize
            except Exception:  # noqa: BLE001
                return False
        ins = sum(_nbytes(known.get(v)) for v in node.inputs if v is not None)
        if total > self.options["max_bytes"] and total > ins:
            self.skipped.append((node.name or node.op_type,
                                 f"output would be {total} bytes from {ins} bytes of inputs "
                                 f"(max_bytes={self.options['max_bytes']}, fold_expanding=False)"))
            return True
        return False

    def _reject(self, v: Value, values: dict[Value, Any]) -> bool:
        if self.options["fold_expanding"]:
            return False
        arr = values.get(v)
        size = _nbytes(arr)
        if size <= self.options["max_bytes"]:
            return False
        n = v.producer
        ins = sum(_nbytes(values.get(i) if i in values else (i.const_value() if i is not None else None))
                  for i in n.inputs if i is not None)
        return size > ins

    @staticmethod
    def _frontier(graph: Graph, folded: set[Node]) -> list[Value]:
        out = []
        for n in folded:
            for o in n.outputs:
                if not o.name:
                    continue
                if o.is_graph_output() or any(u not in folded for u, _ in o.uses):
                    out.append(o)
        return out


@register_pass
class LiftInitializerInputs(Pass):
    """Turn initializers that IR < 4 forced into the graph inputs into plain constants.

    Before IR version 4 every initializer had to be listed as a graph input, so such inputs are
    not a request to override the weights. Lifting them lets folding and fusion see the weights
    as constants; the model's IR version becomes 4 (the first that allows it). Models of IR >= 4
    keep initializer inputs: there they are deliberate overridable defaults.
    """

    name = "lift-initializer-inputs"
    recursive = False

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        model = self.model
        if model is None or model.ir_version >= 4:
            return False
        keep = [v for v in graph.inputs if v.const is None]
        if len(keep) == len(graph.inputs):
            return False
        graph.inputs[:] = keep
        model.ir_version = 4
        return True


@register_pass
class InlineConstantIf(Pass):
    """Replace an ``If`` whose condition is constant by the nodes of the branch it takes.

    The branch's nodes move into the enclosing graph (names stay unique: the model shares one
    namespace); its outputs replace the If's outputs. Exact.
    """

    name = "inline-constant-if"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for node in graph:
            if node.op_type != "If" or node.domain not in _STD:
                continue
            cond = node.input(0).const_value() if node.input(0) is not None else None
            if cond is None or np.asarray(cond).size != 1:
                continue
            branch: Graph = node.attr("then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch")
            if branch.initializers or branch.inputs:
                # move branch-local initializers up as well
                for name, v in list(branch.initializers.items()):
                    data = v.const
                    new = graph.add_initializer(name, data)
                    branch.replace_all_uses_with(v, new, replace_graph_outputs=True)
            outs = list(branch.outputs)
            moved = [branch.detach(n) for n in branch.nodes]
            graph.insert_before(node, moved)
            for old, new in zip(node.outputs, outs, strict=True):
                graph.replace_all_uses_with(old, new)
            graph.remove(node)
            changed = True
        return changed
