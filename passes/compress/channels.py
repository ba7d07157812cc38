"""Structured channel pruning: remove whole output channels (filters, hidden units) of Conv,
ConvTranspose, Gemm, MatMul and LSTM layers, and everything downstream that reads them.

Channels are followed one by one (:class:`Channels`): every channel of every tensor the pass can
follow gets an id, and ids that must be kept or removed together are joined (union-find) into
*classes*. Ids flow unchanged through channel-wise ops (activations, HardSwish/HardSigmoid/Clip,
BatchNormalization, pooling, Pad and Resize that leave the channel axis alone, Reduce* over other
axes, per-channel constant Add/Mul/Sub/Div/Pow, depthwise Conv), move with Transpose, Squeeze and
Unsqueeze, are concatenated by Concat and cut by Split on the channel axis, and become H*W
consecutive features when the channel axis and the static axes after it are flattened (into a
Gemm, or a sequence for an LSTM). What joins ids:

- an elementwise op between tensors joins the ids at the same position (residual Adds, a
  squeeze-excite gate multiplying the channels it was computed from, FPN Adds after a Resize),
  whatever produced them - so a trunk made of a Concat of branches and an Add with a conv's
  output prunes position by position;
- a channel shuffle (Reshape [N, g, C/g, H, W], Transpose (0, 2, 1, 3, 4), Reshape back) joins
  the channel at one offset of every shuffle group: the shuffle stays a shuffle of the kept
  channels only if every group keeps the same offsets (whole columns of the shuffle go).

Grouped convolutions read and make channels in ``group`` slices that must keep equally many
(balance constraints; a bidirectional LSTM's directions likewise). Where a group has such
constraints, the classes to remove are chosen with scipy's MILP solver (least total importance,
each producer as close to the ratio as the slices allow); without scipy, the k-th best class of
every slice is joined instead.

A class is *frozen* (kept, with the reason in ``report["skipped"]`` for producers left whole and
``report["partial"]`` for producers that kept some channels for it) when it reaches a graph input
or output, or an op that needs its channels aligned (LRN, LayerNorm, Softmax, a Reshape into
attention heads, Shape...). Rewriting drops, for the removed classes: producers' filters/units
and biases, per-channel parameters, depthwise filters (their ``group`` shrinks), the readers'
input channels (slice by slice for grouped convs), Split sizes, shuffle and flatten shapes.

Importance: ``l1`` (filter L1 norm, normalized per producer) or ``activation`` (times the mean
|activation| of the channel on calibration data, Wanda-style). Recovery: with calibration data,
each Conv/Gemm/MatMul reader is refit by least squares so that, on the calibration inputs, its
output from the kept channels matches its original output. Lossy.

``multiple_of=8`` (or 16) rounds every kept channel count to a multiple of the CPU kernels'
channel block: ONNX Runtime's NCHWc convolutions and int8 kernels work in blocks of 8/16
channels, and a partial block costs a whole one (measured on the digits ResNet: 12 of 24 kept
channels ran slower than 16).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from graphopt import Graph, GraphoptError, Node, Pass, PassContext, Value, register_pass
from graphopt.runtime import collect_values, intermediate_session, load_calibration

from ..common import reduce_axes

log = logging.getLogger(__name__)

REFIT_ROWS = 20000  # most output positions (rows) one least-squares refit uses
MAX_COLLECTIONS = 16  # most calibration runs that collect refit inputs (one per batch of groups)
COLLECT_ELEMENTS = 5_000_000  # input elements of the samples one collection runs (2 pages of 3x736x960)

_STD = ("", "ai.onnx")
# elementwise on every element: the channels of the input are the channels of the output, any rank
ELEMENTWISE = frozenset({"Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
                         "Softplus", "Softsign", "Gelu", "Erf", "Mish", "Celu", "ThresholdedRelu", "Identity",
                         "Dropout", "Neg", "Abs", "Sqrt", "Exp", "Reciprocal", "Floor", "Ceil", "Round", "Sign"})
# spatial ops on [N, C, ...]: channel axis 1
SPATIAL = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Pow"})
REDUCE = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1"})
CHANNEL_WISE = ELEMENTWISE | SPATIAL | {"BatchNormalization", "Clip", "PRelu"}  # kept for importers


def _desc(v: Value) -> str:
    p = v.producer
    return f"{p.op_type} {p.name!r}" if p is not None else f"graph input {v.name!r}"


def _const_on_axis(arr: np.ndarray, rank: int, axis: int, c: int) -> int | None:
    """The axis of constant ``arr`` that runs along channel axis ``axis`` of a rank-``rank``
    tensor with ``c`` channels when ``arr`` broadcasts against it per channel; -1 for a scalar
    (nothing to slice); None when it is neither (it would mix channels or broadcast them)."""
    if arr.size == 1:
        return -1
    if arr.ndim > rank:
        return None
    shp = [1] * (rank - arr.ndim) + list(arr.shape)
    if shp[axis] != c or any(d != 1 for i, d in enumerate(shp) if i != axis):
        return None
    return axis - (rank - arr.ndim)


def _have_milp() -> bool:
    """scipy's MILP solver (HiGHS) is importable."""
    try:
        from scipy.optimize import milp  # noqa: F401
    except ImportError:
        return False
    return True


def _ints(v: Value | None) -> list[int] | None:
    arr = v.const_value() if v is not None else None
    return None if arr is None else [int(a) for a in np.ravel(arr)]


class Channels:
    """Channel analysis of a main graph: every channel of every tensor the pass can follow gets
    an id; ids that must be kept or removed together are joined (union-find) into *classes*.

    What joins ids: an elementwise op between tensors (the same position in each), a channel
    shuffle (the channel at one offset in every shuffle group: the shuffle stays a shuffle only if
    every group keeps the same offsets), and balance: a grouped conv's filters and input channels
    come in ``group`` slices that must keep equally many. What freezes a class (it is kept): it
    reaches a graph input or output, or an op that needs its channels aligned (LRN, LayerNorm, a
    Reshape into a sequence, a Transpose...), each with its reason."""

    def __init__(self, graph: Graph) -> None:
        self.parent: list[int] = []
        self.owner: list[int] = []  # producer index of each id, -1 if none
        self.reason: dict[int, str] = {}  # id -> why its class must stay
        self.layout: dict[int, np.ndarray] = {}  # id(value) -> ids along its channel axis
        self.axis: dict[int, int] = {}  # id(value) -> channel axis
        self.rank: dict[int, int] = {}
        self.vals: dict[int, Value] = {}
        self.handled: set[tuple[int, int]] = set()  # (id(node), input index) whose channels are followed
        self.producers: list[tuple[Node, str, Value]] = []  # conv|convT|gemm|matmul
        self.params: dict[int, list[tuple[Node, str, int]]] = {}  # value -> (node, bn|inorm|dw|const, input)
        self.readers: dict[int, list[tuple[Node, str]]] = {}  # value -> (node, conv|convT|gemm|matmul)
        self.shuffles: dict[int, list[tuple[Node, Node, Node, int]]] = {}  # value -> (reshape, transpose, reshape, g)
        self.splits: dict[int, list[Node]] = {}
        self.slices: dict[int, list[tuple[Node, int, int, int]]] = {}  # value -> (Slice on its channel axis, start, end, entry)
        self.flattens: dict[int, list[tuple[Node, int, int]]] = {}  # value -> (Reshape with an explicit size, rows per channel, axis)
        self.balance: list[tuple[np.ndarray, int]] = []
        self.inlined: list[tuple[Node, Graph]] = []  # If nodes followed through the branch they take here
        self.guessed: list[Value] = []  # values given shapes for the analysis only (forgotten after it)
        self.if_src: dict[int, int] = {}  # id(If output) -> id(the outer value its followed branch passes on)
        self.unit_reshapes: set[int] = set()
        self.minimum: list[tuple[np.ndarray, int]] = []  # ids of which at least n must stay (split parts)
        self.why_not: dict[int, str] = {}
        self.score = np.zeros(0)
        self._build(graph)
        self.dead: dict[int, np.ndarray | None] = {}  # id(value) -> what each channel is once its producer is gone
        self.dead_approx: set[int] = set()  # values whose dead constants hold inside only (a padded depthwise conv)
        self._dead_values(graph)
        for vid, rs in self.readers.items():  # a nonzero constant a reader cannot fold: keep those channels
            d = self.dead.get(vid)
            for r, kind in rs:
                if d is not None and kind in ("convT", "matmul", "lstm") and np.any(d):
                    nz = np.flatnonzero(d)
                    self.freeze(self.layout[vid][nz], f"read by {r.op_type} {r.name!r} as a nonzero constant "
                                f"({float(d[nz[0]]):.3g}) once removed, which it cannot fold into a bias")

    # -- union-find ------------------------------------------------------------------------------
    def new_ids(self, c: int, owner: int = -1, why: str | None = None) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + c))
        self.owner.extend([owner] * c)
        ids = np.arange(start, start + c)
        if why:
            for i in ids:
                self.reason[int(i)] = why
        return ids

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def classes(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(int(i)) for i in ids), dtype=np.int64, count=len(ids))

    def union(self, a: int, b: int) -> bool:
        x, y = self.find(a), self.find(b)
        if x == y:
            return False
        self.parent[x] = y
        return True

    def freeze(self, ids: np.ndarray, why: str) -> None:
        for i in ids:
            self.reason.setdefault(int(i), why)

    # -- layouts ---------------------------------------------------------------------------------
    def set(self, v: Value, ids: np.ndarray, axis: int) -> None:
        self.layout[id(v)], self.axis[id(v)], self.vals[id(v)] = ids, axis, v
        self.rank[id(v)] = len(v.shape)  # kept: shapes are forgotten while pruning

    def lay(self, v: Value | None, axis: int | None = None) -> tuple[np.ndarray, int] | None:
        """The channel ids and axis of ``v``; a value the analysis did not follow gets frozen ids
        (its producer's channels cannot change), so whatever joins it is kept."""
        if v is None or v.is_const() or v.shape is None or len(v.shape) < 2:
            return None
        if id(v) not in self.layout:
            rank = len(v.shape)
            ax = axis if axis is not None else self.hint.get(id(v), 1 if rank == 4 else rank - 1)
            c = v.shape[ax]
            if not isinstance(c, int) or c < 1:
                return None
            why = "reaches a graph input" if v.producer is None else \
                f"joined with {_desc(v)}, whose channels graphopt cannot change"
            self.set(v, self.new_ids(c, why=why), ax)
        return self.layout[id(v)], self.axis[id(v)]

    def _produce(self, n: Node, kind: str, out: Value, c: int, axis: int) -> np.ndarray:
        ids = self.new_ids(c, owner=len(self.producers))
        self.producers.append((n, kind, out))
        self.set(out, ids, axis)
        return ids

    def _read(self, n: Node, kind: str) -> None:
        self.handled.add((id(n), 0))
        self.readers.setdefault(id(n.input(0)), []).append((n, kind))

    def _param(self, v: Value, n: Node, kind: str, idx: int = 0) -> None:
        self.params.setdefault(id(v), []).append((n, kind, idx))

    # -- the graph walk --------------------------------------------------------------------------
    def _build(self, graph: Graph) -> None:
        # the channel axis of a rank-3 tensor is ambiguous ([N, C, T] for a 1-D conv, [N, T, C] for
        # a sequence): a value that reaches a Conv's input through channel-wise ops is [N, C, T]
        self.hint: dict[int, int] = {}
        for n in reversed(list(graph)):
            if n.op_type in ("Conv", "ConvTranspose") and n.inputs and n.input(0) is not None:
                self.hint[id(n.input(0))] = 1
            elif (n.op_type in CHANNEL_WISE or n.op_type in ELEMENTWISE_BINARY or n.op_type in ("Pad", "Resize", "Slice")) \
                    and n.outputs and n.output(0) is not None and id(n.output(0)) in self.hint:
                for v in n.inputs:
                    if v is not None and not v.is_const() and v.shape is not None \
                            and n.output(0).shape is not None and len(v.shape) == len(n.output(0).shape):
                        self.hint.setdefault(id(v), self.hint[id(n.output(0))])
        done: set[int] = set()
        for n in graph:
            if id(n) in done or n.domain not in _STD or not n.outputs or n.output(0) is None:
                continue
            out = n.output(0)
            if n.op_type == "If":
                self._if(n, done)
                continue
            if out.shape is None and not self._guess_shape(n):
                continue
            op = n.op_type
            if op in ("Conv", "ConvTranspose"):
                self._conv(n, out)
            elif op in ("Gemm", "MatMul"):
                self._fc(n, out)
            elif op in ELEMENTWISE or op in SPATIAL or op in ("BatchNormalization", "InstanceNormalization", "Clip",
                                                             "PRelu", "Pad", "Resize", "Upsample") or op in REDUCE:
                self._unary(n, out)
            elif op in ELEMENTWISE_BINARY:
                self._binary(n, out)
            elif op == "Concat":
                self._concat(n, out)
            elif op == "Split":
                self._split(n)
            elif op == "Slice":
                self._slice(n, out)
            elif op == "Gather":
                self._gather(n, out)
            elif op in ("Flatten", "Reshape"):
                if not self._shuffle(n, done) and not self._unit_reshape(n, out):
                    self._flatten(n, out)
            elif op in ("Transpose", "Squeeze", "Unsqueeze"):
                self._move(n, out)
            elif op == "LSTM":
                self._lstm(n, done)
            elif op == "Shape":
                self._shape(n)
        passed = {id(o) for _, b in self.inlined for o in b.outputs}
        for vid, v in self.vals.items():
            ids = self.layout[vid]
            if v.is_graph_output() and vid not in passed:
                self.freeze(ids, f"reaches the graph output {v.name!r}")
            for r, k in v.uses:
                if (id(r), k) not in self.handled:
                    extra = f" ({self.why_not[id(r)]})" if id(r) in self.why_not else ""
                    self.freeze(ids, f"read by {r.op_type} {r.name!r}, which must keep its channels aligned{extra}")

    def _dead_values(self, graph: Graph) -> None:
        """For every followed value, the constant each channel holds when the filter that made
        it is removed (its producer outputs zero there), or None where that is not one constant
        per channel. Zero right after a producer; a learnable scalar bias Add after an
        activation (PaddleOCR's detectors) makes it that scalar, which the next layer still
        reads: :meth:`apply` folds it into that layer's bias."""
        dead = self.dead
        prod = {id(out) for _, _, out in self.producers}

        def vec(v: Value | None, c: int, rank: int, ax: int) -> np.ndarray | None:
            if v is None:
                return None
            if v.is_const():
                arr = v.const_value()
                k = _const_on_axis(arr, rank, ax, c)
                if k is None or not np.issubdtype(arr.dtype, np.floating):
                    return None
                return np.full(c, float(arr.ravel()[0])) if k < 0 else arr.reshape(-1).astype(np.float64)
            d = dead.get(id(v))  # None too for a map broadcast over the channels: not constant per channel
            return d if d is not None and len(d) == c else None

        for n in graph:
            for o in n.outputs:
                if o is None or id(o) not in self.layout:
                    continue
                c, ax, rank = len(self.layout[id(o)]), self.axis[id(o)], self.rank[id(o)]
                if id(o) in prod:
                    dead[id(o)] = np.zeros(c)
                    continue
                try:
                    dead[id(o)] = self._dead_of(n, o, c, ax, rank, vec)
                except (ValueError, TypeError, IndexError, FloatingPointError):
                    dead[id(o)] = None
                if any(v is not None and id(v) in self.dead_approx for v in n.inputs):
                    self.dead_approx.add(id(o))

    def _dead_of(self, n: Node, o: Value, c: int, ax: int, rank: int, vec: Any) -> np.ndarray | None:
        op = n.op_type
        if op == "If":
            return self.dead.get(self.if_src.get(id(o), -1))
        if op == "Reshape" and id(n) in self.unit_reshapes:
            return self.dead.get(id(n.input(0)))
        x = self.dead.get(id(n.input(0))) if n.inputs and n.input(0) is not None else None
        if op in ELEMENTWISE_BINARY:
            ops = [vec(v, c, rank, ax) for v in n.inputs if v is not None]
            if any(a is None for a in ops):
                return None
            fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Max": np.maximum,
                  "Min": np.minimum, "Pow": np.power, "Sum": np.add}[op]
            acc = ops[0]
            for a in ops[1:]:
                acc = fn(acc, a)
            return acc if np.all(np.isfinite(acc)) else None
        if op == "Concat":
            parts = [self.dead.get(id(v)) for v in n.inputs]
            return None if any(p is None for p in parts) else np.concatenate(parts)
        if op == "Split":
            if x is None:
                return None
            start = 0
            for out in n.outputs:
                k = len(self.layout[id(out)]) if out is not None and id(out) in self.layout else None
                if out is o:
                    return x[start:start + c]
                if k is None:
                    return None
                start += k
            return None
        if x is None:
            return None
        if op == "Slice":
            cut = next(((a, b) for sl, a, b, _ in self.slices.get(id(n.input(0)), []) if sl is n), None)
            return x[cut[0]:cut[1]] if cut is not None else x
        if op == "Gather":
            return x
        if not x.any() and len(x) == c and (op in ("Relu", "LeakyRelu", "HardSwish", "Tanh", "Identity", "Dropout",
                                                  "Neg", "Abs", "Elu", "Selu", "Gelu", "Erf", "Mish", "Softsign",
                                                  "Sqrt", "Sign", "Floor", "Ceil", "Round", "PRelu", "Resize",
                                                  "Upsample", "Pad", "Transpose", "Squeeze", "Unsqueeze")
                                            or op in SPATIAL or op in REDUCE):
            return x
        if op in ("Flatten", "Reshape"):
            if id(n) in [id(r1) for sh in self.shuffles.values() for r1, _, _, _ in sh] or len(x) == c:
                return None
            return np.repeat(x, c // len(x)) if not x.any() and c % len(x) == 0 else None
        if len(x) != c:
            return None
        table = {"Relu": lambda a: np.maximum(a, 0), "Sigmoid": lambda a: 1 / (1 + np.exp(-a)),
                 "Tanh": np.tanh, "Identity": lambda a: a, "Dropout": lambda a: a, "Neg": np.negative, "Abs": np.abs,
                 "HardSigmoid": lambda a: np.clip((n.attr("alpha", 0.2) or 0.2) * a + (n.attr("beta", 0.5) or 0.5), 0, 1),
                 "HardSwish": lambda a: a * np.clip(a / 6 + 0.5, 0, 1),
                 "LeakyRelu": lambda a: np.where(a >= 0, a, (n.attr("alpha", 0.01) or 0.01) * a),
                 "Exp": np.exp, "Reciprocal": lambda a: 1 / a}
        if op in table:
            return table[op](x)
        if op == "Clip":
            lo = n.input(1).const_value() if len(n.inputs) > 1 and n.input(1) is not None else n.attr("min")
            hi = n.input(2).const_value() if len(n.inputs) > 2 and n.input(2) is not None else n.attr("max")
            return np.clip(x, -np.inf if lo is None else float(np.ravel(lo)[0]), np.inf if hi is None else float(np.ravel(hi)[0]))
        if op == "BatchNormalization":
            sc, b, mu, var = (n.input(i).const_value().astype(np.float64) for i in range(1, 5))
            return (x - mu) / np.sqrt(var + (n.attr("epsilon", 1e-5) or 1e-5)) * sc + b
        if op in ("Transpose", "Squeeze", "Unsqueeze", "Resize", "Upsample", "GlobalAveragePool", "GlobalMaxPool",
                  "ReduceMean", "ReduceMax", "ReduceMin"):
            return x  # a constant channel stays that constant
        if op == "MaxPool":
            return x  # its padding is -inf: never seen
        if op == "AveragePool":
            pads = n.attr("pads") or []
            return x if not any(pads) or not n.attr("count_include_pad", 0) else None
        if op == "Conv":  # depthwise: the filters follow the channels
            w = n.input(1).const_value().astype(np.float64)
            b = n.input(2).const_value().astype(np.float64) if len(n.inputs) > 2 and n.input(2) is not None else 0.0
            if x.any() and (any(n.attr("pads") or []) or n.attr("auto_pad") not in (None, "NOTSET", "VALID")):
                self.dead_approx.add(id(o))  # the constant is not seen where it pads: the inside value
            return x * w.reshape(len(w), -1).sum(1) + b
        return None

    def _static(self, v: Value | None, depth: int = 0) -> np.ndarray | None:
        """The value of ``v`` when it is computed from constants and static dims only (a rank
        or a dim read by Shape/Size, compared, negated): silero VAD's decoder switches on the
        last dim of the encoder's output. None where it depends on data or unknown dims."""
        if v is None or depth > 12:
            return None
        c = v.const_value()
        if c is not None:
            return np.asarray(c)
        n = v.producer
        if n is None or n.domain not in _STD:
            return None
        op = n.op_type
        if op == "Shape":
            shp = n.input(0).shape
            if shp is None or not all(isinstance(d, int) for d in shp):
                return None
            return np.array(shp, np.int64)[n.attr("start", 0) or 0:n.attr("end")]
        if op == "Size":
            a = self._static(n.input(0), depth + 1)
            if a is not None:
                return np.array(a.size, np.int64)
            shp = n.input(0).shape
            return np.array(int(np.prod(shp)), np.int64) if shp is not None and all(isinstance(d, int) for d in shp) \
                else None
        ins = [self._static(i, depth + 1) if i is not None else None for i in n.inputs]
        if any(a is None for a in ins):
            return None
        try:
            if op == "Gather":
                return np.take(ins[0], ins[1], axis=n.attr("axis", 0) or 0)
            if op in ("Equal", "Greater", "Less", "And", "Or", "Add", "Sub", "Mul"):
                fn = {"Equal": np.equal, "Greater": np.greater, "Less": np.less, "And": np.logical_and,
                      "Or": np.logical_or, "Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op]
                return np.asarray(fn(ins[0], ins[1]))
            if op == "Not":
                return np.logical_not(ins[0])
            if op in ("Identity", "Cast"):
                return ins[0]
            if op in ("Squeeze", "Unsqueeze", "Reshape"):
                return ins[0].reshape(-1) if ins[0].size == 1 and op != "Reshape" else None
        except (ValueError, IndexError, TypeError):
            return None
        return None

    def _guess_shape(self, n: Node) -> bool:
        """Shapes inference left unknown after a followed If (its branches differ in rank): for
        the analysis, channel-wise ops and Squeeze/Unsqueeze with constant axes get them from
        their input, as at the analysed dims. Forgotten afterwards (``guessed``)."""
        x = n.input(0) if n.inputs else None
        o = n.output(0)
        if x is None or x.shape is None or len(n.outputs) != 1 or id(x) not in self.layout:
            return False
        shp = list(x.shape)
        if n.op_type in ELEMENTWISE:
            new = shp
        elif n.op_type in ("Squeeze", "Unsqueeze"):
            axes = reduce_axes(n)
            if axes is None:
                return False
            if n.op_type == "Squeeze":
                axes = [a % len(shp) for a in axes]
                if any(shp[a] != 1 for a in axes):
                    return False
                new = [d for i, d in enumerate(shp) if i not in axes]
            else:
                rank = len(shp) + len(axes)
                axes = sorted(a % rank for a in axes)
                it = iter(shp)
                new = [1 if i in axes else next(it) for i in range(rank)]
        else:
            return False
        o.shape = new
        self.guessed.append(o)
        return True

    def _if(self, n: Node, done: set[int]) -> None:
        """An If whose condition is static here (it tests a dim or a rank: silero VAD's decoder
        squeezes the encoder's last axis only when it is 1) and whose branches only pass outer
        values on (Identity, Squeeze, Unsqueeze with constant axes): the channels follow the
        branch taken at these dims into the If's outputs. Nothing in either branch holds a channel
        count, so the pruned model takes the other branch exactly where the original did."""
        cond = self._static(n.input(0)) if n.inputs else None
        if cond is None or cond.size != 1:
            return
        branches = [n.attr("then_branch"), n.attr("else_branch")]
        if any(b is None or any(m.op_type not in ("Identity", "Squeeze", "Unsqueeze", "Constant")
                                or m.domain not in _STD for m in b) for b in branches):
            return
        b = branches[0 if bool(cond.reshape(-1)[0]) else 1]
        other = branches[1 if b is branches[0] else 0]
        for m in other:  # it reads outer values only to pass them on: no channel count in it
            for k, v in enumerate(m.inputs):
                if v is not None and v.graph is not other:
                    self.handled.add((id(m), k))
        for m in b:
            if m.output(0) is not None and m.output(0).shape is None:
                self._guess_shape(m)
            if m.op_type == "Identity" and m.output(0).shape is not None:
                self._unary(m, m.output(0))
            elif m.op_type in ("Squeeze", "Unsqueeze") and m.output(0).shape is not None:
                self._move(m, m.output(0))
        self.inlined.append((n, b))
        for o, bo in zip(n.outputs, b.outputs, strict=False):
            if o is None or id(bo) not in self.layout or bo.shape is None:
                continue
            if o.shape is None:
                o.shape = list(bo.shape)
                self.guessed.append(o)
            if list(o.shape) != list(bo.shape):
                continue
            self.set(o, self.layout[id(bo)], self.axis[id(bo)])
            src = bo
            while src.producer is not None and src.producer.graph is b and src.producer.inputs:
                src = src.producer.input(0)
            self.if_src[id(o)] = id(src)  # what its channels hold: the outer value's, moved

    def _shape(self, n: Node) -> None:
        """A Shape whose every use is a Gather of constant dims other than the channel axis (a
        decoder reading the batch or time size, as silero VAD's does) does not see the channel
        count: it does not hold the channels."""
        x = self.lay(n.input(0))
        if x is None or n.attr("start") is not None or n.attr("end") is not None:
            return
        rank = len(n.input(0).shape)
        for r, k in n.output(0).uses:
            idx = _ints(r.input(1)) if r.op_type == "Gather" and k == 0 and len(r.inputs) > 1 else None
            if r.op_type == "Size" and k == 0:
                continue  # the rank (silero's decoder tests it), not the channel count
            if idx is None or (r.attr("axis", 0) or 0) != 0 or x[1] in [i % rank for i in idx]:
                self.why_not[id(n)] = "its channel count is read"
                return
        self.handled.add((id(n), 0))

    def _conv(self, n: Node, out: Value) -> None:
        w = n.input(1).const_value() if n.input(1) is not None else None
        b = n.input(2)
        if w is None or w.ndim < 3 or (b is not None and b.const_value() is None):
            self.why_not[id(n)] = "its weights are not constant"
            return
        x = self.lay(n.input(0), 1)
        g = int(n.attr("group", 1) or 1)
        if x is None or x[1] != 1:
            # input channels not followed (a waveform unsqueezed into [N, 1, T] whose T the walk
            # took for channels): its own filters can still go, its input stays whole
            if n.op_type == "Conv" and g == 1 and out.shape is not None and len(out.shape) == w.ndim:
                self._produce(n, "conv", out, w.shape[0], 1)
            return
        c = len(x[0])
        if n.op_type == "ConvTranspose":
            if g != 1 or w.shape[0] != c:
                self.why_not[id(n)] = "grouped ConvTranspose"
                return
            self._read(n, "convT")
            self._produce(n, "convT", out, w.shape[1], 1)
            return
        if g > 1 and w.shape[1] == 1 and g == c == w.shape[0]:  # depthwise: filters follow the channels
            self.handled.add((id(n), 0))
            self._param(n.input(0), n, "dw")
            self.set(out, x[0], 1)
            return
        if w.shape[1] * g != c:
            return
        self._read(n, "conv")
        ids = self._produce(n, "conv", out, w.shape[0], 1)
        if g > 1:  # a grouped conv reads and makes its channels in `group` slices: equal counts in each
            self.balance += [(x[0], g), (ids, g)]

    def _fc(self, n: Node, out: Value) -> None:
        a, bv = n.input(0), n.input(1)
        b = bv.const_value() if bv is not None else None
        if b is None or b.ndim != 2 or a is None or a.shape is None or len(a.shape) < 2:
            return
        if n.op_type == "Gemm":
            cb = n.input(2).const_value() if n.input(2) is not None else None
            if n.attr("transA", 0) or len(a.shape) != 2 or (n.input(2) is not None and cb is None) \
                    or (cb is not None and cb.size > 1 and _const_on_axis(cb, 2, 1, out.shape[1]) is None):
                return
            trans = bool(n.attr("transB", 0))
            k, f = (b.shape[1], b.shape[0]) if trans else b.shape
        else:
            k, f = b.shape
        x = self.lay(a, len(a.shape) - 1)
        if x is None or x[1] != len(a.shape) - 1 or len(x[0]) != k:
            return
        kind = "gemm" if n.op_type == "Gemm" else "matmul"
        self._read(n, kind)
        self._produce(n, kind, out, f, len(out.shape) - 1)

    def _unary(self, n: Node, out: Value) -> None:
        op = n.op_type
        x = self.lay(n.input(0)) if n.inputs else None
        if x is None:
            return
        ids, ax = x
        rank = len(n.input(0).shape)
        new_ax = ax
        if op in SPATIAL and ax != 1:
            return
        if op in ("BatchNormalization", "InstanceNormalization"):
            last = 5 if op == "BatchNormalization" else 3
            if ax != 1 or any(i is None or i.const_value() is None for i in n.inputs[1:last]):
                self.why_not[id(n)] = "its parameters are not constant"
                return
            self._param(n.input(0), n, "bn" if op == "BatchNormalization" else "inorm")
        elif op == "Clip":
            if any(i is not None and not i.is_const() for i in n.inputs[1:]):
                self.why_not[id(n)] = "its bounds are not constant"
                return
        elif op == "PRelu":
            s = n.input(1).const_value()
            k = _const_on_axis(s, rank, ax, len(ids)) if s is not None else None
            if k is None:
                self.why_not[id(n)] = "its slope is not constant per channel"
                return
            if k >= 0:
                self._param(n.input(0), n, "const", 1)
        elif op == "Pad":
            pads = n.attr("pads") if n.input(1) is None else _ints(n.input(1))
            axes = _ints(n.input(3)) if len(n.inputs) > 3 and n.input(3) is not None else list(range(rank))
            if pads is None or axes is None or len(n.inputs) > 3 and n.input(3) is not None and not n.input(3).is_const():
                self.why_not[id(n)] = "its pads are not constant"
                return
            axes = [a % rank for a in axes]
            if ax in axes and (pads[axes.index(ax)] or pads[len(axes) + axes.index(ax)]):
                self.why_not[id(n)] = "it pads the channel axis"
                return
        elif op in ("Resize", "Upsample"):
            sc = n.input(2 if op == "Resize" else 1)
            scales = sc.const_value() if sc is not None else None
            sizes = n.input(3) if op == "Resize" and len(n.inputs) > 3 else None
            if sizes is not None or scales is None or scales.size != rank or scales[ax] != 1 \
                    or op == "Resize" and n.attr("axes") is not None:
                self.why_not[id(n)] = "its scales are not constant, or it sets sizes or the channel count"
                return
        elif op in REDUCE:
            axes = [a % rank for a in (reduce_axes(n) or [])]
            if not axes or ax in axes:
                self.why_not[id(n)] = "it reduces over the channel axis"
                return
            if not (n.attr("keepdims", 1) if n.attr("keepdims") is not None else 1):
                new_ax = ax - sum(1 for a in axes if a < ax)
        self.handled.add((id(n), 0))
        self.set(out, ids, new_ax)

    def _binary(self, n: Node, out: Value) -> None:
        rank = len(out.shape)
        data, consts = [], []
        for k, v in enumerate(n.inputs):
            if v is None:
                continue
            (consts if v.is_const() else data).append((k, v))
        if not data:
            return
        first = next(((k, v) for k, v in data if id(v) in self.layout
                      and len(v.shape) - self.axis[id(v)] <= rank
                      and out.shape[rank - len(v.shape) + self.axis[id(v)]] == len(self.layout[id(v)])), None)
        if first is None:
            return
        ids0, ax0 = self.layout[id(first[1])], self.axis[id(first[1])]
        neg = ax0 - len(first[1].shape)  # the channel axis counted from the right, as broadcasting aligns it
        c = len(ids0)
        if -neg > rank or out.shape[rank + neg] != c:
            return
        joined = []
        for k, v in data:
            if v.shape is None or len(v.shape) < -neg:
                return
            if v.shape[len(v.shape) + neg] == 1 and c > 1:
                continue  # broadcast over the channels (a spatial map): its own channel is not touched
            x = self.lay(v, len(v.shape) + neg)
            if x is None or x[1] - len(v.shape) != neg or len(x[0]) != c:
                return
            joined.append((k, v, x[0]))
        for k, v in consts:
            arr = v.const_value()
            if _const_on_axis(arr, rank, rank + neg, c) is None:
                return
        ids0 = joined[0][2]
        for _, _, ids in joined[1:]:
            for a, b in zip(ids0, ids, strict=True):
                self.union(int(a), int(b))
        for k, v, _ in joined:
            self.handled.add((id(n), k))
        for k, v in consts:
            if v.const_value().size > 1:
                self._param(joined[0][1], n, "const", k)
        self.set(out, ids0, rank + neg)

    def _concat(self, n: Node, out: Value) -> None:
        rank = len(out.shape)
        axis = (n.attr("axis", 0) or 0) % rank
        lays = [self.lay(v, axis) for v in n.inputs]
        if not lays or any(x is None or x[1] != axis for x in lays):
            return
        for k in range(len(n.inputs)):
            self.handled.add((id(n), k))
        self.set(out, np.concatenate([x[0] for x in lays]), axis)

    def _split(self, n: Node) -> None:
        x = self.lay(n.input(0))
        if x is None:
            return
        ids, ax = x
        rank = len(n.input(0).shape)
        if (n.attr("axis", 0) or 0) % rank != ax:
            return
        sizes = n.attr("split") or (_ints(n.input(1)) if len(n.inputs) > 1 and n.input(1) is not None else None)
        if sizes is None:
            if len(n.inputs) > 1 and n.input(1) is not None or len(ids) % len(n.outputs):
                return
            sizes = [len(ids) // len(n.outputs)] * len(n.outputs)
        if sum(sizes) != len(ids) or len(sizes) != len(n.outputs):
            return
        self.handled.add((id(n), 0))
        self.splits.setdefault(id(n.input(0)), []).append(n)
        start = 0
        for o, s in zip(n.outputs, sizes, strict=True):
            part = ids[start:start + s]
            start += s
            if o is not None:
                self.set(o, part, ax)
                self.minimum.append((part, 1))

    @staticmethod
    def _slice_args(n: Node) -> tuple[list[int], list[int], list[int], list[int]] | None:
        """(starts, ends, axes, steps) of a Slice when all are constant (inputs, or attributes
        before opset 10), else None. Bounds an exporter computed from shapes are constant here
        once the default pipeline has folded them at the model's (or ``--input-shape``'s) dims."""
        if n.attr("starts") is not None:
            starts, ends = list(n.attr("starts")), list(n.attr("ends") or [])
            axes = n.attr("axes")
            return starts, ends, list(axes) if axes is not None else list(range(len(starts))), [1] * len(starts)
        if len(n.inputs) < 3:
            return None
        starts, ends = _ints(n.input(1)), _ints(n.input(2))
        if starts is None or ends is None:
            return None

        def opt(i: int, default: list[int]) -> list[int] | None:
            return default if len(n.inputs) <= i or n.input(i) is None else _ints(n.input(i))

        axes, steps = opt(3, list(range(len(starts)))), opt(4, [1] * len(starts))
        if axes is None or steps is None or not len(starts) == len(ends) == len(axes) == len(steps):
            return None
        return starts, ends, axes, steps

    def _slice(self, n: Node, out: Value) -> None:
        """A Slice with constant bounds: along other axes the channels pass; along the channel
        axis (step 1) it keeps channels [start, end) - an STFT conv's real and imaginary halves,
        say - and its bounds are rewritten to the kept channels when some go (each part keeps one)."""
        x = self.lay(n.input(0))
        if x is None:
            return
        ids, ax = x
        args = self._slice_args(n)
        if args is None:
            self.why_not[id(n)] = "its bounds are not constant"
            return
        starts, ends, axes, steps = args
        rank = len(n.input(0).shape)
        axes = [a % rank for a in axes]
        if len(out.shape) != rank:
            return
        if ax not in axes:
            if out.shape[ax] != len(ids):
                return
            self.handled.add((id(n), 0))
            self.set(out, ids, ax)
            return
        k = axes.index(ax)
        if steps[k] != 1:
            self.why_not[id(n)] = "it slices the channel axis with a step"
            return
        s, e, _ = slice(starts[k], ends[k]).indices(len(ids))
        if e <= s or out.shape[ax] != e - s:
            return
        part = ids[s:e]
        self.handled.add((id(n), 0))
        self.slices.setdefault(id(n.input(0)), []).append((n, s, e, k))
        self.set(out, part, ax)
        self.minimum.append((part, 1))

    def _gather(self, n: Node, out: Value) -> None:
        """A Gather of constant indices along another axis than the channels' (the last frame of
        a sequence, as silero VAD's decoder takes it): the channels pass, their axis moves when
        the indices add or remove axes before it."""
        x = self.lay(n.input(0)) if len(n.inputs) > 1 else None
        idx = n.input(1).const_value() if x is not None and n.input(1) is not None else None
        if x is None or idx is None:
            return
        ids, ax = x
        rank = len(n.input(0).shape)
        g = (n.attr("axis", 0) or 0) % rank
        if g == ax:
            self.why_not[id(n)] = "it gathers along the channel axis"
            return
        new_ax = ax if ax < g else ax - 1 + idx.ndim
        if len(out.shape) != rank - 1 + idx.ndim or out.shape[new_ax] != len(ids):
            return
        self.handled.add((id(n), 0))
        self.set(out, ids, new_ax)

    def _unit_reshape(self, n: Node, out: Value) -> bool:
        """A Reshape that only inserts or removes size-1 axes ([1, C, 1] -> [1, 1, C]: an
        Unsqueeze/Squeeze written as a Reshape) moves the channel axis; its target's explicit
        channel count is rewritten when channels go."""
        if n.op_type != "Reshape" or len(n.inputs) < 2:
            return False
        x = self.lay(n.input(0))
        tgt = _ints(n.input(1))
        v = n.input(0)
        if x is None or tgt is None or 0 in tgt or len(x[0]) == 1 or len(tgt) != len(out.shape):
            return False
        ids, ax = x
        a, b = list(v.shape), list(out.shape)
        big_a = [i for i, d in enumerate(a) if d != 1]
        big_b = [i for i, d in enumerate(b) if d != 1]
        if [a[i] for i in big_a] != [b[i] for i in big_b] or ax not in big_a \
                or any(not isinstance(a[i], int) for i in big_a):
            return False
        new_ax = big_b[big_a.index(ax)]
        if tgt[new_ax] != len(ids):
            return False
        self.flattens.setdefault(id(v), []).append((n, 1, new_ax))
        self.unit_reshapes.add(id(n))
        self.handled.add((id(n), 0))
        self.set(out, ids, new_ax)
        return True

    def _shuffle(self, n: Node, done: set[int]) -> bool:
        """Reshape [N, C, H, W] -> [N, g, C/g, H, W], Transpose (0, 2, 1, 3, 4), Reshape back to
        [N, C, H, W]: a channel shuffle. Output channel j*g + r is input channel r*C/g + j."""
        x = self.lay(n.input(0)) if n.op_type == "Reshape" else None
        o = n.output(0)
        if x is None or x[1] != 1 or len(n.input(0).shape) != 4 or len(o.shape) != 5 or len(o.uses) != 1:
            return False
        t = o.uses[0][0]
        if t.op_type != "Transpose" or list(t.attr("perm") or []) != [0, 2, 1, 3, 4] or len(t.output(0).uses) != 1:
            return False
        r2 = t.output(0).uses[0][0]
        ids = x[0]
        c = len(ids)
        g = o.shape[1]
        if r2.op_type != "Reshape" or r2.output(0).shape is None or len(r2.output(0).shape) != 4 \
                or not isinstance(g, int) or g < 1 or c % g or r2.output(0).shape[1] != c \
                or _ints(n.input(1)) is None or _ints(r2.input(1)) is None:
            return False
        grid = ids.reshape(g, c // g)
        for j in range(c // g):  # the same offset in every group: kept or removed together
            for r in range(1, g):
                self.union(int(grid[0, j]), int(grid[r, j]))
        self.handled.add((id(n), 0))
        done.update({id(t), id(r2)})
        self.shuffles.setdefault(id(n.input(0)), []).append((n, t, r2, g))
        self.set(r2.output(0), grid.T.reshape(-1), 1)
        return True

    def _flatten(self, n: Node, out: Value) -> None:
        """The channel axis and the static axes after it merged into one (a Flatten of
        [N, C, H, W] to [N, C*H*W], a Reshape of [T, N, C, H] to [T, N, C*H]): each channel
        becomes H*W... consecutive features of the merged axis."""
        x = self.lay(n.input(0))
        v = n.input(0)
        if x is None:
            return
        ax = x[1]
        tail = v.shape[ax + 1:]
        if len(out.shape) != ax + 1 or not all(isinstance(d, int) for d in tail) \
                or list(v.shape[:ax]) != list(out.shape[:ax]) or out.shape[ax] != len(x[0]) * int(np.prod(tail)):
            return
        hw = int(np.prod(tail))
        if n.op_type == "Flatten":
            if (n.attr("axis", 1) or 1) != ax or ax != 1:
                return
        else:
            tgt = _ints(n.input(1))
            if tgt is None or len(tgt) != ax + 1 or any(t == -1 for t in tgt[:ax]):
                return
            if tgt[ax] not in (-1, 0):
                self.flattens.setdefault(id(v), []).append((n, hw, ax))
        self.handled.add((id(n), 0))
        self.set(out, np.repeat(x[0], hw), ax)

    def _move(self, n: Node, out: Value) -> None:
        """Transpose / Squeeze / Unsqueeze that keep the channel axis whole: it moves."""
        x = self.lay(n.input(0))
        if x is None:
            return
        ids, ax = x
        rank = len(n.input(0).shape)
        if n.op_type == "Transpose":
            perm = list(n.attr("perm") or range(rank - 1, -1, -1))
            new_ax = perm.index(ax)
        else:
            axes = reduce_axes(n)
            if axes is None:
                return
            if n.op_type == "Squeeze":
                axes = [a % rank for a in axes]
                if ax in axes:
                    return
                new_ax = ax - sum(1 for a in axes if a < ax)
            else:
                axes = sorted(a % len(out.shape) for a in axes)
                kept = [i for i in range(len(out.shape)) if i not in axes]
                new_ax = kept[ax]
        if out.shape[new_ax] != len(ids):
            return
        self.handled.add((id(n), 0))
        self.set(out, ids, new_ax)

    def _lstm(self, n: Node, done: set[int]) -> None:
        """An LSTM reads its input features (W's columns) and makes its hidden units: with a
        constant W/R/B (and zero or constant initial states, no peepholes) and a Y read only by
        a Reshape of [T, D, 1, H] to [T, D*H] or [T, 1, D*H], its units are channels of that
        Reshape (direction-major); both directions keep as many."""
        w = n.input(1).const_value() if n.input(1) is not None else None
        r = n.input(2).const_value() if len(n.inputs) > 2 and n.input(2) is not None else None
        if w is None or r is None or (n.attr("layout", 0) or 0) != 0:
            self.why_not[id(n)] = "its weights are not constant (or layout=1)"
            return
        x = self.lay(n.input(0), 2)
        if x is None or x[1] != 2 or len(x[0]) != w.shape[2]:
            return
        self.handled.add((id(n), 0))
        self.readers.setdefault(id(n.input(0)), []).append((n, "lstm"))
        d, h = w.shape[0], r.shape[2]
        extra = [n.input(i) if len(n.inputs) > i else None for i in range(3, 8)]  # B, seq_lens, h0, c0, P
        if any(v is not None and v.const_value() is None for i, v in enumerate(extra) if i != 1) \
                or extra[4] is not None or any(o is not None and o.uses for o in n.outputs[1:]):
            return
        y = n.output(0)
        if y is None or y.shape is None or len(y.uses) != 1 or y.is_graph_output():
            return
        rs = y.uses[0][0]
        o = rs.output(0)
        tgt = _ints(rs.input(1)) if rs.op_type == "Reshape" else None
        if tgt is None or o.shape is None or list(y.shape[1:]) != [d, 1, h] or len(o.shape) not in (2, 3) \
                or o.shape[-1] != d * h or (len(o.shape) == 3 and o.shape[1] != 1) or tgt[-1] not in (-1, 0, d * h):
            return
        ids = self.new_ids(d * h, owner=len(self.producers))
        self.producers.append((n, "lstm", o))
        self.set(o, ids, len(o.shape) - 1)
        if tgt[-1] == d * h:
            self.flattens.setdefault(id(o), []).append((rs, 0, len(o.shape) - 1))  # 0: the new width itself
        done.add(id(rs))
        if d > 1:
            self.balance.append((ids, d))

    # -- importance, balance, groups ----------------------------------------------------------------
    def finish(self, importance: str = "l1", acts: dict[str, np.ndarray] | None = None) -> None:
        """Score every id (its filter's L1 norm, normalized per producer, times the mean |activation|
        with ``importance='activation'``), then join ids until every balance holds."""
        self.score = np.zeros(len(self.parent))
        for i, (p, kind, out) in enumerate(self.producers):
            w = p.input(1).const_value()
            if kind == "conv":
                norm = np.abs(w).reshape(w.shape[0], -1).sum(1)
            elif kind == "convT":
                norm = np.abs(w).sum(axis=tuple(a for a in range(w.ndim) if a != 1))
            elif kind == "lstm":  # a unit: its rows of the four gates in W and R
                d = w.shape[0]
                h = w.shape[1] // 4
                rr = p.input(2).const_value()
                norm = (np.abs(w).reshape(d, 4, h, -1).sum(axis=(1, 3)) + np.abs(rr).reshape(d, 4, h, -1).sum(axis=(1, 3))
                        ).reshape(-1)
            elif kind == "gemm" and p.attr("transB", 0):
                norm = np.abs(w).sum(1)
            else:
                norm = np.abs(w).sum(0)
            norm = norm / max(float(norm.max()), 1e-12)
            a = (acts or {}).get(out.name)
            if importance == "activation" and a is not None:
                ax = self.axis[id(out)]
                norm = norm * np.abs(a).mean(axis=tuple(k for k in range(a.ndim) if k != ax))
            self.score[self.layout[id(out)]] = norm
        if not _have_milp():  # scipy's MILP solver balances grouped convs' slices by count; else join ids
            self._balance()

    def class_scores(self) -> dict[int, float]:
        out: dict[int, float] = {}
        for i in range(len(self.parent)):
            r = self.find(i)
            out[r] = out.get(r, 0.0) + float(self.score[i])
        return out

    def _balance(self) -> None:
        """Join ids until in every balance (a grouped conv's ``group`` slices) each class has as
        many channels in one slice as in every other: then any choice of classes keeps the
        slices equal. Where each class holds one channel of one slice, the k-th best class of
        every slice is joined (each slice keeps its best); otherwise the same offset of every slice."""
        changed = True
        while changed:
            changed = False
            scores = None
            for ids, g in self.balance:
                cls = self.classes(ids).reshape(g, -1)
                uniq, inv = np.unique(cls, return_inverse=True)
                cnt = np.zeros((len(uniq), g), dtype=np.int64)
                np.add.at(cnt, (inv.reshape(g, -1), np.arange(g)[:, None].repeat(cls.shape[1], 1)), 1)
                if (cnt == cnt[:, :1]).all():
                    continue
                if scores is None:
                    scores = self.class_scores()
                if cnt.max() == 1 and ((cnt > 0).sum(1) == 1).all():
                    order = [sorted(row, key=lambda c: -scores.get(int(c), 0.0)) for row in cls]
                    for rank in range(cls.shape[1]):
                        for r in range(1, g):
                            changed |= self.union(int(order[0][rank]), int(order[r][rank]))
                else:
                    for j in range(cls.shape[1]):
                        for r in range(1, g):
                            changed |= self.union(int(cls[0, j]), int(cls[r, j]))
                scores = None

    def groups(self) -> list[dict[str, Any]]:
        """Producers whose channels share classes, with their classes: each is pruned as one."""
        n = len(self.producers)
        parent = list(range(n))

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        members: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            members.setdefault(self.find(i), []).append(i)
        owners_of: dict[int, dict[int, int]] = {}
        for c, ids in members.items():
            own: dict[int, int] = {}
            for i in ids:
                if self.owner[i] >= 0:
                    own[self.owner[i]] = own.get(self.owner[i], 0) + 1
            owners_of[c] = own
            ps = list(own)
            for p in ps[1:]:
                x, y = find(ps[0]), find(p)
                if x != y:
                    parent[x] = y
        for ids, _ in self.balance:  # a grouped conv's slices tie every producer whose channels it reads
            ps = sorted({o for c in set(self.classes(ids).tolist()) for o in owners_of[c]})
            for p in ps[1:]:
                x, y = find(ps[0]), find(p)
                if x != y:
                    parent[x] = y
        out: dict[int, dict[str, Any]] = {}
        for p in range(n):
            g = out.setdefault(find(p), {"producers": [], "classes": [], "frozen": {}})
            g["producers"].append(p)
        for c, own in owners_of.items():
            if not own:
                continue
            g = out[find(next(iter(own)))]
            g["classes"].append(c)
            why = next((self.reason[i] for i in members[c] if i in self.reason), None)
            if why is not None:
                g["frozen"][c] = why
        for g in out.values():
            g["owners"] = {c: owners_of[c] for c in g["classes"]}
            g["size"] = {c: len(members[c]) for c in g["classes"]}
        order = {id(p): i for i, (p, _, _) in enumerate(self.producers)}
        return sorted(out.values(), key=lambda g: min(order[id(self.producers[p][0])] for p in g["producers"]))

    def choose(self, g: dict[str, Any], ratio: float, min_channels: int, multiple_of: int) -> tuple[list[int], str]:
        """Classes of group ``g`` to remove for ``ratio`` of its widest producer's channels,
        least important per channel first, keeping ``min_channels`` filters in every producer
        and a channel in every Split part; and why nothing, when nothing."""
        widths = {p: len(self.layout[id(self.producers[p][2])]) for p in g["producers"]}
        c = max(widths.values())
        keep_n = max(min_channels, round(c * (1 - ratio)))
        if multiple_of > 1:
            keep_n = max(multiple_of, round(keep_n / multiple_of) * multiple_of)
        target = c - keep_n
        free = [k for k in g["classes"] if k not in g["frozen"]]
        if not free:
            return [], next(iter(g["frozen"].values()))
        if target <= 0:
            return [], "too few channels to prune"
        scores = self.class_scores()
        fs = set(free)
        balance = [(self.classes(ids).reshape(n, -1), n) for ids, n in self.balance]
        balance = [(cl, n) for cl, n in balance if fs.intersection(np.unique(cl).tolist())]
        uniform = all(set(g["owners"][k]) == set(widths) and set(g["owners"][k].values()) == {1} for k in free) \
            and len(set(widths.values())) == 1
        if (balance or not uniform) and _have_milp():  # slices to balance, or producers sharing some channels
            return self._solve(g, free, scores, balance, widths, ratio, min_channels, multiple_of)
        cost = {k: max(g["owners"][k].values()) for k in free}
        kept = dict(widths)
        floor = {p: min(min_channels, widths[p]) for p in widths}
        parts = [(self.classes(ids), n) for ids, n in self.minimum]
        part_kept = [len(ids) for ids, _ in self.minimum]
        drop: list[int] = []
        dropped = 0
        # least important per filter first: a class of several producers' filters (a residual
        # position) is ranked by their mean importance, not their sum
        for k in sorted(free, key=lambda k: scores.get(k, 0.0) / sum(g["owners"][k].values())):
            if dropped + cost[k] / 2 > target:
                continue
            if any(kept[p] - n < floor[p] for p, n in g["owners"][k].items()):
                continue
            hits = [int((cl == k).sum()) for cl, _ in parts]
            if any(part_kept[i] - h < parts[i][1] for i, h in enumerate(hits) if h):
                continue
            for p, n in g["owners"][k].items():
                kept[p] -= n
            for i, h in enumerate(hits):
                part_kept[i] -= h
            drop.append(k)
            dropped += cost[k]
        if not drop:
            why = next(iter(g["frozen"].values()), None) if g["frozen"] else None
            return [], why or "too few channels to prune"
        return drop, ""

    def _solve(self, g: dict[str, Any], free: list[int], scores: dict[int, float],
               balance: list[tuple[np.ndarray, int]], widths: dict[int, int], ratio: float, min_channels: int,
               multiple_of: int) -> tuple[list[int], str]:
        """Grouped convs: choose the classes to remove with scipy's MILP solver (HiGHS) - least
        total importance, each producer losing as close to ``ratio`` of its filters as the
        slices allow (a window around the target, widened until feasible), every slice of every grouped conv keeping
        as many channels as the others, ``min_channels`` filters and a channel per Split part."""
        from scipy.optimize import Bounds, LinearConstraint, milp

        col = {k: i for i, k in enumerate(free)}
        nv = len(free)
        rows, lo, hi = [], [], []
        for cl, n in balance:  # kept count of slice s equals slice 0's: removed counts too
            cnt = np.zeros((n, nv))
            for s in range(n):
                for c in cl[s]:
                    if int(c) in col:
                        cnt[s, col[int(c)]] += 1
            for s in range(1, n):
                rows.append(cnt[s] - cnt[0])
                lo.append(0)
                hi.append(0)
        for ids, least in self.minimum:
            cl = self.classes(ids)
            a = np.zeros(nv)
            for c in cl:
                if int(c) in col:
                    a[col[int(c)]] += 1
            if a.any():
                rows.append(a)
                lo.append(0)
                hi.append(len(ids) - least)
        own = np.zeros((len(widths), nv))
        prods = list(widths)
        for k in free:
            for p, m in g["owners"][k].items():
                own[prods.index(p), col[k]] = m
        score = np.array([scores.get(k, 0.0) for k in free]) + 1e-9
        want = []
        for p in prods:
            keep = max(min_channels, round(widths[p] * (1 - ratio)))
            if multiple_of > 1:
                keep = max(multiple_of, round(keep / multiple_of) * multiple_of)
            want.append(max(0, widths[p] - keep))
        top = [widths[p] - min(min_channels, widths[p]) for p in prods]
        a = np.array(rows + list(own))
        # as close to the target as the slices allow: widen a window around it until feasible
        for f in (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5):
            d = [int(np.ceil(f * widths[p])) for p in prods]
            lo_p = [min(max(1 if w else 0, w - e), t) for w, e, t in zip(want, d, top, strict=True)]
            hi_p = [min(w + e, t) for w, e, t in zip(want, d, top, strict=True)]
            if not any(hi_p):
                break
            res = milp(score, constraints=LinearConstraint(a, np.array(lo + lo_p), np.array(hi + hi_p)),
                       integrality=np.ones(nv), bounds=Bounds(0, 1), options={"time_limit": 30})
            if res.x is not None:
                drop = [k for k in free if res.x[col[k]] > 0.5]
                if drop:
                    return drop, ""
        return [], "no choice of channels keeps every grouped conv's slices equal"

    # -- rewriting ---------------------------------------------------------------------------------
    def changes(self, drop: list[int]) -> list[tuple[Value, np.ndarray, np.ndarray]]:
        """(value, mask over its current channels, new alive mask over its original channels) for
        every followed value that loses channels when classes ``drop`` go."""
        if not drop:
            return []
        d = np.asarray(sorted(drop))
        self.alive = getattr(self, "alive", {})
        out = []
        for vid, v in self.vals.items():
            dm = np.isin(self.classes(self.layout[vid]), d)
            if not dm.any():
                continue
            alive = self.alive.get(vid, np.ones(len(dm), dtype=bool))
            new = alive & ~dm
            rel = new[alive]
            if not rel.all():
                out.append((v, rel, new))
        return out

    def readers_of(self, changes: list[tuple[Value, np.ndarray, np.ndarray]]) -> list[Node]:
        return [r for v, _, _ in changes for r, _ in self.readers.get(id(v), [])]

    def apply(self, graph: Graph, changes: list[tuple[Value, np.ndarray, np.ndarray]],
              cur: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> list[Value]:
        """Drop the channels of ``changes`` everywhere: producers' filters, per-channel
        parameters, readers' input channels (refit by least squares where ``cur``/``targets``
        hold calibration activations), Split sizes, shuffle and flatten shapes. Returns the
        values whose shapes changed."""
        def const(v: Value, arr: np.ndarray) -> Value:
            return graph.add_initializer(v.name + "_pruned", arr.astype(v.const_value().dtype))

        def cut(n: Node, i: int, m: np.ndarray, axis: int) -> None:
            v = n.input(i)
            if v is not None and v.const_value() is not None and v.const_value().size > 1:
                n.set_input(i, const(v, np.compress(m, v.const_value(), axis=axis)))

        prod = {id(out): (p, kind) for p, kind, out in self.producers}
        touched: list[Value] = []
        prev: dict[int, np.ndarray] = {}
        for v, _, new in changes:
            prev[id(v)] = self.alive.get(id(v), np.ones(len(new), dtype=bool))
            self.alive[id(v)] = new
        for v, rel, _ in changes:  # producers first: a reader's refit compares against its kept outputs
            touched.append(v)
            if id(v) in prod and prod[id(v)][1] == "lstm":
                self._cut_lstm(graph, prod[id(v)][0], rel, const)
                touched.append(prod[id(v)][0].output(0))
            elif id(v) in prod:
                p, kind = prod[id(v)]
                axis = {"conv": 0, "convT": 1, "matmul": 1}.get(kind, 0 if p.attr("transB", 0) else 1)
                cut(p, 1, rel, axis)
                if p.input(2) is not None:
                    b = p.input(2).const_value()
                    cut(p, 2, rel, b.ndim - 1)
        for v, rel, _ in changes:
            rank, ax = self.rank[id(v)], self.axis[id(v)]
            for n, kind, idx in self.params.get(id(v), []):
                if kind == "bn":
                    for i in range(1, 5):
                        cut(n, i, rel, 0)
                elif kind == "inorm":
                    cut(n, 1, rel, 0)
                    cut(n, 2, rel, 0)
                elif kind == "dw":
                    cut(n, 1, rel, 0)
                    cut(n, 2, rel, 0)
                    n.set_attr("group", int(rel.sum()))
                else:
                    arr = n.input(idx).const_value()
                    k = _const_on_axis(arr, rank, ax, len(rel))
                    if k is not None and k >= 0:
                        n.set_input(idx, const(n.input(idx), np.compress(rel, arr, axis=k)))
            d = self.dead.get(id(v))
            gone = d[np.flatnonzero(prev[id(v)])[~rel]] if d is not None else None
            self.approx_in = id(v) in self.dead_approx
            snap = getattr(self, "snap", {}).get(id(v))
            x = cur.get(v.name)
            if x is not None and snap is not None and x.shape[self.axis[id(v)]] == snap.sum() != len(rel):
                # collected before an earlier group of this batch cut this value: its channels as now
                cur[v.name] = np.compress(prev[id(v)][snap], x, axis=self.axis[id(v)])
            for r, kind in self.readers.get(id(v), []):
                self._cut_reader(graph, r, kind, rel, cur, targets, const, gone)
            for n in self.splits.get(id(v), []):
                sizes = [int(self.alive.get(id(o), np.ones(len(self.layout[id(o)]), bool)).sum()) for o in n.outputs]
                if n.attr("split") is not None:
                    n.set_attr("split", sizes)
                else:
                    n.set_input(1, graph.add_initializer(n.name + "_split_pruned", np.array(sizes, dtype=np.int64)))
            for n, s0, e0, k in self.slices.get(id(v), []):  # bounds over the kept channels
                alive = self.alive[id(v)]
                bounds = (int(alive[:s0].sum()), int(alive[:e0].sum()))
                if n.attr("starts") is not None:
                    for name, b in zip(("starts", "ends"), bounds, strict=True):
                        vals = list(n.attr(name))
                        vals[k] = b
                        n.set_attr(name, vals)
                else:
                    for i, b in zip((1, 2), bounds, strict=True):
                        arr = np.array(n.input(i).const_value()).reshape(-1).copy()
                        arr[k] = b
                        n.set_input(i, graph.add_initializer(n.input(i).name + "_pruned", arr))
                touched.append(n.output(0))
            for r1, t, r2, g in self.shuffles.get(id(v), []):
                c = int(rel.sum())
                t1, t2 = np.array(_ints(r1.input(1)), dtype=np.int64), np.array(_ints(r2.input(1)), dtype=np.int64)
                if t1[2] > 0:
                    t1[2] = c // g
                if t2[1] > 0:
                    t2[1] = c
                r1.set_input(1, graph.add_initializer(r1.input(1).name + "_pruned", t1))
                r2.set_input(1, graph.add_initializer(r2.input(1).name + "_pruned", t2))
                touched += [r1.output(0), t.output(0)]
            for f, hw, fax in self.flattens.get(id(v), []):
                t = np.array(_ints(f.input(1)), dtype=np.int64)
                t[fax] = int(rel.sum()) * (hw or 1)
                f.set_input(1, graph.add_initializer(f.input(1).name + "_pruned", t))
        return touched

    def _cut_lstm(self, graph: Graph, n: Node, rel: np.ndarray, const: Any) -> None:
        """Keep the LSTM units ``rel`` (direction-major, equally many per direction): their rows
        of every gate in W, R, B, their columns of R and their initial states."""
        w = n.input(1).const_value()
        d, h = w.shape[0], n.input(2).const_value().shape[2]
        keep = rel.reshape(d, h)
        k = int(keep[0].sum())

        def gates(arr: np.ndarray, blocks: int) -> np.ndarray:  # [D, blocks*H, ...] -> kept units of each block
            return np.stack([arr[j].reshape((blocks, h) + arr.shape[2:])[:, keep[j]].reshape((blocks * k,) + arr.shape[2:])
                             for j in range(d)])

        n.set_input(1, const(n.input(1), gates(w, 4)))
        r = gates(n.input(2).const_value(), 4)
        n.set_input(2, const(n.input(2), np.stack([r[j][:, keep[j]] for j in range(d)])))
        if len(n.inputs) > 3 and n.input(3) is not None:
            n.set_input(3, const(n.input(3), gates(n.input(3).const_value(), 8)))
        for i in (5, 6):  # initial_h, initial_c: [D, B, H]
            if len(n.inputs) > i and n.input(i) is not None:
                s0 = n.input(i).const_value()
                n.set_input(i, const(n.input(i), np.stack([s0[j][:, keep[j]] for j in range(d)])))
        n.set_attr("hidden_size", k)

    def _fold(self, graph: Graph, r: Node, kind: str, rel: np.ndarray, gone: np.ndarray | None) -> None:
        """The removed input channels of reader ``r`` are not zero but the constants ``gone``
        (a bias Add after their activation): add what they contributed to ``r``'s bias. Exact for
        a Conv without padding and for Gemm; where the Conv pads, the constant is not seen at the
        border positions, so there it is exact inside and approximate at the borders (reported)."""
        name = _name(r)
        self.folded = getattr(self, "folded", {})
        if gone is None:
            self.folded[name] = "not folded: the removed channels are not one constant each"
            return
        if not np.any(gone):
            return
        wr = r.input(1).const_value()
        idx = np.flatnonzero(~rel)
        w64 = wr.astype(np.float64)
        if kind == "conv":
            o = wr.shape[0]
            grp = int(r.attr("group", 1) or 1)
            o_per, i_per = o // grp, wr.shape[1]
            sums = w64.reshape(o, i_per, -1).sum(2)  # [O, C/g]: each filter's kernel sum per input channel
            contrib = np.zeros(o)
            for val, i in zip(gone, idx, strict=True):
                j = i // i_per
                contrib[j * o_per:(j + 1) * o_per] += val * sums[j * o_per:(j + 1) * o_per, i % i_per]
            pads = r.attr("pads") or []
            approx = any(pads) or r.attr("auto_pad") not in (None, "NOTSET", b"NOTSET", "VALID", b"VALID") \
                or getattr(self, "approx_in", False)
        elif kind == "gemm":
            trans = bool(r.attr("transB", 0))
            o = wr.shape[0] if trans else wr.shape[1]
            contrib = gone @ (w64[:, idx].T if trans else w64[idx])
            approx = getattr(self, "approx_in", False)
        else:
            self.folded[name] = f"not folded ({kind}): the removed channels read as constants {float(np.abs(gone).max()):.3g}"
            return
        b = r.input(2).const_value() if len(r.inputs) > 2 and r.input(2) is not None else None
        base = np.zeros(o) if b is None else np.broadcast_to(b.astype(np.float64).reshape(-1), (o,))
        nb = graph.add_initializer((r.input(2).name if b is not None else name) + "_folded",
                                   (base + contrib).astype(wr.dtype if b is None else b.dtype))
        if len(r.inputs) > 2:
            r.set_input(2, nb)
        else:
            r.append_input(nb)
        self.folded[name] = "folded into the bias" + (" (approximate at the padded borders)" if approx else "")

    def _cut_reader(self, graph: Graph, r: Node, kind: str, rel: np.ndarray, cur: dict[str, np.ndarray],
                    targets: dict[str, np.ndarray], const: Any, gone: np.ndarray | None = None) -> None:
        self._fold(graph, r, kind, rel, gone)
        wr = r.input(1).const_value()
        keep = np.flatnonzero(rel)
        x = cur.get(r.input(0).name)
        y = targets.get(r.output(0).name)
        out = r.output(0)
        if y is not None and id(out) in self.alive:  # this reader's own outputs were cut: compare those
            y = np.compress(self.alive[id(out)], y, axis=self.axis[id(out)])
        bias = r.input(2).const_value() if len(r.inputs) > 2 and r.input(2) is not None else None
        if kind == "conv":
            grp = int(r.attr("group", 1) or 1)
            if grp > 1:  # each group of filters reads its own slice of the input channels
                o_per, i_per = wr.shape[0] // grp, wr.shape[1]
                new = np.concatenate([wr[j * o_per:(j + 1) * o_per][:, rel[j * i_per:(j + 1) * i_per]]
                                      for j in range(grp)])
            else:
                new = wr[:, keep]
                if x is not None and y is not None and x.shape[1] == len(rel) and y.shape[1] == wr.shape[0]:
                    yb = y - (bias.reshape((1, -1) + (1,) * (y.ndim - 2)) if bias is not None else 0)
                    new = _safe_refit(r, new, ChannelPruning._refit_conv, r, x, keep, wr.astype(np.float64), yb)
        elif kind == "convT":
            new = wr[keep]
        elif kind == "lstm":
            new = wr[:, :, keep]
            x0 = targets.get(r.input(0).name)  # the original input: W x is linear in it, refit W alone
            if x is not None and x0 is not None and x.shape[-1] == len(rel) and x0.shape[-1] == wr.shape[2] \
                    and x.shape[:-1] == x0.shape[:-1]:
                xr, x0r = x.reshape(-1, len(rel)), x0.reshape(-1, wr.shape[2]).astype(np.float64)
                new = np.stack([_safe_refit(r, new[d], ChannelPruning._refit_fc, xr, keep,
                                            x0r @ wr[d].astype(np.float64).T, wr[d].astype(np.float64), True)
                                for d in range(wr.shape[0])])
        else:
            trans = kind == "gemm" and bool(r.attr("transB", 0))
            new = wr[:, keep] if trans else wr[keep]
            if x is not None and y is not None and x.ndim == 2 and y.ndim == 2 and x.shape[1] == len(rel) \
                    and y.shape[1] == (wr.shape[0] if trans else wr.shape[1]):
                yb = y - (bias.reshape(1, -1) if bias is not None and bias.size > 1 else (bias if bias is not None else 0))
                new = _safe_refit(r, new, ChannelPruning._refit_fc, x, keep, yb, wr.astype(np.float64), trans)
        r.set_input(1, const(r.input(1), new))


def _safe_refit(r: Node, fallback: np.ndarray, fn: Any, *args: Any) -> np.ndarray:
    """``fn(*args)``, or the plainly cut weights ``fallback`` (logged) where the refit cannot
    handle this layer's shapes: recovery is best effort, pruning must not fail over it."""
    try:
        out = fn(*args)
    except (ValueError, np.linalg.LinAlgError) as e:
        log.info("prune-channels: %s not refit: %s", _name(r), e)
        return fallback
    if out.shape != fallback.shape or not np.all(np.isfinite(out)):
        log.info("prune-channels: %s not refit: the solution has the wrong shape or is not finite", _name(r))
        return fallback
    return out


def _im2col(x: np.ndarray, node: Node, rows: np.ndarray | None = None) -> np.ndarray:
    """Patches of ``x`` ([N, C, *spatial], any number of spatial axes: 1-D, 2-D, 3-D convs) for a
    Conv with ``node``'s attributes: [N*prod(out spatial), C*prod(kernel)]. ``rows`` (indices into
    those output positions) picks a subsample without materializing every patch."""
    ks = tuple(node.input(1).const_value().shape[2:])
    nd = len(ks)
    if x.ndim != nd + 2:
        raise ValueError("input rank does not match the kernel")
    pads = list(node.attr("pads") or [0] * (2 * nd))
    st = list(node.attr("strides") or [1] * nd)
    dil = list(node.attr("dilations") or [1] * nd)
    if any(d != 1 for d in dil) or node.attr("auto_pad") not in (None, "NOTSET", b"NOTSET"):
        raise ValueError("dilated or auto-padded conv")
    xp = np.pad(x, ((0, 0), (0, 0)) + tuple((pads[i], pads[nd + i]) for i in range(nd)))
    win = sliding_window_view(xp, ks, axis=tuple(range(2, 2 + nd)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in st)]  # N, C, *out, *k
    n, c = win.shape[:2]
    out = win.shape[2:2 + nd]
    win = win.transpose((0,) + tuple(range(2, 2 + nd)) + (1,) + tuple(range(2 + nd, 2 + 2 * nd)))  # N, *out, C, *k
    flat = win.reshape((n * int(np.prod(out)), c) + ks) if rows is None else None
    if rows is None:
        return flat.reshape(len(flat), -1)
    idx = np.unravel_index(rows, (n,) + tuple(out))
    return win[idx].reshape(len(rows), -1)


def _name(n: Node) -> str:
    return n.name or n.op_type


@register_pass
class ChannelPruning(Pass):
    """Remove the least important output channels of Conv/ConvTranspose/Gemm/MatMul layers and
    rewrite every dependent op."""

    name = "prune-channels"
    recursive = True  # bodies too, each on its own: see apply()
    default_options = {"ratio": 0.5, "importance": "l1", "recover": True, "min_channels": 4,
                       "exclude_nodes": (), "max_samples": 256, "sensitivity": False, "multiple_of": 1}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        r = self.options["ratio"]
        if not isinstance(r, int | float) or not 0 < r < 1:
            raise GraphoptError(f"ratio must be in (0, 1), got {r!r}")
        if self.options["importance"] not in ("l1", "activation"):
            raise GraphoptError("importance must be 'l1' or 'activation'")
        q = self.options["multiple_of"]
        if not isinstance(q, int) or q < 1:
            raise GraphoptError(f"multiple_of must be a positive integer, got {q!r}")
        self.report: dict[str, Any] = {}

    def apply(self, model: Any, ctx: PassContext) -> bool:
        """Prune the main graph, then every If/Loop/Scan body on its own: a body's channels are
        coupled only inside it (its inputs, outputs and the outer values it reads stay whole), so
        each body is one more graph to analyse. An If branch's values are brought out of the If
        for calibration (:func:`graphopt.runtime.intermediate_session`; the samples that take the
        other branch give none), so its layers are scored and refit on data like the main
        graph's (streaming VAD models keep every conv in branches on the sample rate). Loop/Scan
        bodies see a value once per iteration, stacked: their layers are chosen by weight L1 and
        not refit; the report says which. The reports of all graphs are merged."""
        self.model = model
        changed = self.run(model.graph, ctx)
        total = dict(self.report)
        kept = dict(getattr(self, "kept", {}))
        bodies = [g for g in model.all_graphs() if g is not model.graph]
        branches = {id(n.attr(k)) for g0 in model.all_graphs() for n in g0 if n.op_type == "If" and n.domain in _STD
                    for k in ("then_branch", "else_branch")}
        body_pruned: list[str] = []
        body_l1: list[str] = []
        for g in bodies:
            if not any(n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM") for n in g):
                continue  # nothing to prune in it (shape-testing branches): no analysis, no shape inference
            self._body = True
            self._branch = id(g) in branches
            try:
                if self.run(g, ctx):
                    changed = True
                    body_pruned += list(self.report.get("pruned", {}))
                    if not self.report.get("recovered"):
                        body_l1 += list(self.report.get("pruned", {}))
            finally:
                self._body = self._branch = False
            for k in ("pruned", "skipped", "partial", "folded"):
                if self.report.get(k):
                    total.setdefault(k, {}).update(self.report[k])
            for k in ("groups", "concat_groups", "multi_producer_groups"):
                if self.report.get(k):
                    total[k] = total.get(k, 0) + self.report[k]
            kept.update(getattr(self, "kept", {}))
        if body_pruned:
            total["in_subgraphs"] = f"{len(body_pruned)} layers in If/Loop/Scan bodies" + (
                f" ({len(body_l1)} of them chosen by L1 importance and not refit)" if body_l1 else " (refit)")
        self.report, self.kept = total, kept
        return changed

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        from graphopt.analysis import infer_shapes

        assert self.model is not None
        body = getattr(self, "_body", False) or graph is not self.model.graph
        # graph outputs never lose channels (they are frozen); keep their declared shapes where
        # inference at concrete input shapes cannot reproduce them
        # (of every graph: inference at concrete dims reaches the main graph and all bodies)
        declared = [(o, o.shape) for g in self.model.all_graphs() for o in g.outputs]
        declared_in = [(i, i.shape) for g in self.model.all_graphs() for i in g.inputs]
        shapes = ctx.input_shapes or self._calibration_shapes(ctx, graph)
        sym: dict[int, Any] = {}
        if shapes:
            # ONNX inference at concrete dims can lose what it keeps at symbolic ones (a reflect Pad
            # with computed pads made silero's STFT conv shapeless): those keep the symbolic shape
            infer_shapes(self.model, None)
            sym = {id(o): o.shape for g in self.model.all_graphs() for n in g for o in n.outputs if o is not None}
            infer_shapes(self.model, shapes)
            for g in self.model.all_graphs():
                for n in g:
                    for o in n.outputs:
                        if o is not None and o.shape is None and sym.get(id(o)) is not None:
                            o.shape = sym[id(o)]
        else:
            infer_shapes(self.model, None)
        # If branches: their values come out of the If for calibration (see apply)
        have_data = ctx.calibration is not None and (not body or getattr(self, "_branch", False))
        if self.options["importance"] == "activation" and ctx.calibration is None:
            raise GraphoptError("importance='activation' needs calibration data")
        if self.options["sensitivity"] and ctx.calibration is None:
            raise GraphoptError("sensitivity=True needs calibration data")
        recover = have_data and self.options["recover"]
        an = Channels(graph)
        for v in an.guessed:
            v.shape = None
        if shapes:  # the analysis needed concrete dims; the model keeps its own (dynamic) ones, as they were
            for g in self.model.all_graphs():
                for n in g:
                    for o in n.outputs:
                        if o is not None:
                            o.shape = sym.get(id(o))
            for v, shape in declared_in + declared:
                v.shape = shape
        acts: dict[str, np.ndarray] = {}
        if have_data and (recover or self.options["importance"] == "activation"):
            names = {out.name for _, _, out in an.producers} | {r.output(0).name for rs in an.readers.values()
                                                               for r, _ in rs}
            names |= {r.input(0).name for rs in an.readers.values() for r, k in rs if k == "lstm"}
            acts = self._collect(sorted(names), ctx)
            if body and not acts:  # no calibration sample takes this branch: L1, not refit
                have_data = recover = False
        an.finish(self.options["importance"] if have_data else "l1", acts)
        groups = an.groups()
        excl = set(self.options["exclude_nodes"])
        ratios = self._spread(groups, ctx) if self.options["sensitivity"] and not body else [self.options["ratio"]] * len(groups)
        skipped: dict[str, str] = {}
        partial: dict[str, str] = {}
        plans = []
        for g, ratio in zip(groups, ratios, strict=True):
            prods = [an.producers[p][0] for p in g["producers"]]
            if any(p.name in excl for p in prods):
                for p in prods:
                    skipped[_name(p)] = "excluded"
                continue
            drop, why = an.choose(g, ratio, self.options["min_channels"], self.options["multiple_of"])
            if not drop:
                for p in prods:
                    skipped[_name(p)] = why
                continue
            plans.append((g, drop))
            for k, why in g["frozen"].items():  # channels of a pruned group that had to stay
                for p, n in g["owners"][k].items():
                    name = _name(an.producers[p][0])
                    kept, reason = partial.get(name, (0, why))
                    partial[name] = (kept + n, reason)
        if not plans:
            for o, shape in declared:
                if o.shape is None:
                    o.shape = shape
            self.report = {"pruned": {}, "skipped": skipped}
            return False
        touched: list[Value] = []
        concat_groups = 0
        # refit inputs are collected once per batch of groups (groups in graph order), not once per
        # group: an ONNX Runtime session and a full run per group took minutes on 736x960 detectors.
        # A reader refit in a batch sees its input as it was before the batch (upstream groups of
        # the same batch not yet applied): their error is compensated by the next batch's refits.
        # ddddocr_det (ResNet DBNet, 4 pages), in-sample output error: 0.20 one run per group (75 s),
        # 0.26 with 16 batches (41 s), 1.23 with 6 - deep residual nets need the finer batches.
        order = {id(n): i for i, n in enumerate(graph)}
        plans.sort(key=lambda gd: min(order.get(id(an.producers[p][0]), 0) for p in gd[0]["producers"]))
        nb = min(len(plans), MAX_COLLECTIONS) if recover else 1
        batches = [list(b) for b in np.array_split(np.arange(len(plans)), nb)]
        from graphopt.progress import progress

        for batch in progress(batches, desc="prune-channels (refit)" if recover else "prune-channels",
                              unit="batch"):
            cur: dict[str, np.ndarray] = {}
            if recover:
                chs = [an.changes(plans[i][1]) for i in batch]
                # every group of the batch cuts against the state after the groups before it:
                # changes() of later ones depend on alive masks, so they are recomputed below
                names = sorted({r.input(0).name for ch in chs for r in an.readers_of(ch)})
                cur = self._collect(names, ctx)
                an.snap = {vid: an.alive.get(vid, np.ones(len(an.layout[vid]), dtype=bool)).copy()
                           for vid, v in an.vals.items() if v.name in cur}
            for i in batch:
                ch = an.changes(plans[i][1])
                changed = an.apply(graph, ch, cur, acts if recover else {})
                for v in changed:  # stale shapes would make ONNX Runtime refuse the next collection
                    if recover and not v.is_graph_output() and not v.is_graph_input():
                        v.shape = None
                touched += changed
                concat_groups += any(v.producer is not None and v.producer.op_type == "Concat" for v, _, _ in ch)
        done = {}
        self.kept: dict[str, np.ndarray] = {}  # producer name -> indices of the filters it kept
        for g, _ in plans:
            for p in g["producers"]:
                n, _, out = an.producers[p]
                total = len(an.layout[id(out)])
                alive = an.alive.get(id(out), np.ones(total, dtype=bool))
                done[_name(n)] = f"{int(alive.sum())}/{total}"
                self.kept[_name(n)] = np.flatnonzero(alive)
        for v in touched:  # shapes of pruned activations changed: forget them, re-infer
            if not v.is_graph_output() and not v.is_graph_input():
                v.shape = None
        infer_shapes(self.model, None)
        for o, shape in declared:
            if o.shape is None:
                o.shape = shape
        gone = {id(v) for v in touched}
        for n, _ in an.inlined:  # a followed If whose channels went: its branches' declared outputs
            if any(o is not None and id(o) in gone for o in n.outputs):  # say the old count; keep ranks only
                for b in (n.attr("then_branch"), n.attr("else_branch")):
                    for o in b.outputs:
                        if o.shape is not None:
                            o.shape = [None] * len(o.shape)
        widths = {_name(n): len(an.layout[id(out)]) for n, _, out in an.producers}
        self.report = {**{k: v for k, v in self.report.items() if k == "sensitivity"},
                       "pruned": done, "skipped": skipped, "recovered": recover, "groups": len(plans),
                       "partial": {k: f"{n} of {widths[k]} channels kept: {why}" for k, (n, why) in partial.items()},
                       "concat_groups": concat_groups,
                       **({"folded": dict(an.folded)} if getattr(an, "folded", None) else {}),
                       "multi_producer_groups": sum(1 for g, _ in plans if len(g["producers"]) > 1)}
        for k, why in skipped.items():
            log.info("prune-channels: %s left whole: %s", k, why)
        return True

    def _calibration_shapes(self, ctx: PassContext, graph: Graph) -> dict[str, list[int]] | None:
        """Without ``--input-shape``, the dims of the first calibration sample: the analysis
        follows channels at the dims the model is used at (a YOLO neck's Resize, a decoder that
        tests the encoder's last dim); the model keeps its own dynamic dims. For an If branch,
        the first sample (of each input shape) that takes it: silero VAD's 8 kHz branch is
        analysed at 8 kHz windows, not at the 16 kHz ones that take the other branch."""
        if ctx.calibration is None or self.model is None:
            return None
        try:
            samples = load_calibration(ctx.calibration, self.model)
        except GraphoptError:
            return None
        names = {v.name for v in self.model.graph.inputs}
        firsts: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}
        for smp in samples:
            firsts.setdefault(tuple(sorted((k, np.shape(v)) for k, v in smp.items() if k in names)), smp)
        if not firsts:
            return None
        pick = next(iter(firsts.values()))
        probe = next((o.name for n in graph for o in n.outputs if o is not None and n.op_type != "Constant"), None)
        if len(firsts) > 1 and getattr(self, "_branch", False) and probe is not None:
            try:
                sess, outs = intermediate_session(self.model, [probe])
                feed_names = {i.name for i in sess.get_inputs()}
                for smp in firsts.values():
                    res = dict(zip(outs, sess.run(None, {k: v for k, v in smp.items() if k in feed_names}),
                                   strict=True))
                    if np.size(res.get(probe, [])):
                        pick = smp
                        break
            except Exception as e:  # noqa: BLE001 - a probe that ORT cannot run: the first sample's dims
                log.info("prune-channels: branch probe failed: %s", e)
        return {k: list(np.shape(v)) for k, v in pick.items() if k in names} or None

    def _spread(self, groups: list[dict[str, Any]], ctx: PassContext) -> list[float]:
        """Per-group ratios: prune each group alone (on a copy) at the target ratio, measure the
        relative output error on calibration data, and give less sensitive groups more pruning -
        ratios proportional to 1/sqrt(error), scaled so their channel-weighted mean is the target."""
        from graphopt.analysis import infer_shapes
        from graphopt.runtime import ort_session

        assert self.model is not None
        samples = load_calibration(ctx.calibration, self.model)[:16]
        sess = ort_session(self.model)
        ins = {i.name for i in sess.get_inputs()}
        ref = [sess.run(None, {k: v for k, v in s.items() if k in ins}) for s in samples]
        target = self.options["ratio"]
        declared_in = [v.shape for v in self.model.graph.inputs]
        sens: list[float] = []
        chans: list[int] = []
        keys: list[str] = []
        from graphopt.progress import progress

        for gi in progress(range(len(groups)), desc="prune-channels (sensitivity)", unit="group"):
            trial = self.model.copy()
            infer_shapes(trial, ctx.input_shapes or None)
            an = Channels(trial.graph)
            an.finish()
            tg = an.groups()[gi]
            prods = [an.producers[p] for p in tg["producers"]]
            keys.append(", ".join(_name(p) for p, _, _ in prods))
            chans.append(max(len(an.layout[id(out)]) for _, _, out in prods))
            drop, _ = an.choose(tg, target, self.options["min_channels"], self.options["multiple_of"])
            if not drop:
                sens.append(0.0)  # nothing to prune here: not a candidate
                continue
            for v in an.apply(trial.graph, an.changes(drop), {}, {}):
                if not v.is_graph_output() and not v.is_graph_input():
                    v.shape = None
            infer_shapes(trial, ctx.input_shapes or None)
            # the trial runs every sample: its inputs keep the model's own (dynamic) dims, not the
            # concrete ones the analysis used (lines of several widths)
            for v, shape in zip(trial.graph.inputs, declared_in, strict=True):
                v.shape = shape
            if ctx.input_shapes:  # and no value keeps a dim of that shape (ORT would hold samples to it)
                for n in trial.graph:
                    for o in n.outputs:
                        if o is not None and not o.is_graph_output():
                            o.shape = None
            ts = ort_session(trial)
            errs = []
            for s, r in zip(samples, ref, strict=True):
                got = ts.run(None, {k2: v for k2, v in s.items() if k2 in ins})
                errs.append(float(np.mean([np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)
                                           for a, b in zip(r, got, strict=True)])))
            sens.append(max(float(np.mean(errs)), 1e-9))
        live = [i for i, e in enumerate(sens) if e > 0]
        raw = {i: 1 / np.sqrt(sens[i]) for i in live}
        scale = target * sum(chans[i] for i in live) / max(sum(raw[i] * chans[i] for i in live), 1e-12)
        ratios = [float(np.clip(raw[i] * scale, 0.05, 0.9)) if i in raw else target for i in range(len(sens))]
        self.report["sensitivity"] = {keys[i]: (round(sens[i], 4), round(ratios[i], 3)) for i in live}
        return ratios

    def _collect(self, names: list[str], ctx: PassContext) -> dict[str, np.ndarray]:
        assert self.model is not None
        if not names:
            return {}
        samples = load_calibration(ctx.calibration, self.model)[: self.options["max_samples"]]
        # samples of other shapes (text lines of other widths) cannot be stacked: those of one shape
        # (the first one's in the main graph)
        by_shape: dict[tuple[Any, ...], list[dict[str, np.ndarray]]] = {}
        for smp in samples:
            by_shape.setdefault(tuple(sorted((k, np.shape(v)) for k, v in smp.items())), []).append(smp)
        sets = list(by_shape.values())
        if not getattr(self, "_body", False):
            return collect_values(self.model, names, self._cap(sets[0]))
        # values of an If branch: the samples that take the other branch give empty tensors, and
        # a branch may be taken at one input shape only (silero VAD's 8 kHz windows are shorter):
        # the largest set of samples of one shape that reaches the branch
        sess, outs = intermediate_session(self.model, names)
        feed_names = {i.name for i in sess.get_inputs()}
        for group in sorted(sets, key=len, reverse=True):
            acc: dict[str, list[np.ndarray]] = {k: [] for k in names}
            for smp in self._cap(group):
                res = dict(zip(outs, sess.run(None, {k: v for k, v in smp.items() if k in feed_names}), strict=True))
                for k in names:
                    if k in res and np.size(res[k]):
                        acc[k].append(np.asarray(res[k], np.float64))
            if any(acc.values()):
                return {k: np.concatenate(v) for k, v in acc.items() if v}
        return {}

    @staticmethod
    def _cap(samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Large inputs (a 736x960 page): a refit uses at most REFIT_ROWS positions per layer,
        which one or two such samples already hold many times over; more only cost time and memory."""
        size = max(sum(int(np.prod(np.shape(v))) for v in samples[0].values()), 1)
        return samples[:max(1, COLLECT_ELEMENTS // size)]

    @staticmethod
    def _refit_conv(r: Node, x: np.ndarray, k: np.ndarray, w: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Least squares: the kept input channels (as computed now) reproduce the original
        bias-free output ``y`` of this conv ([N, O, *spatial], any spatial rank). At most
        ``REFIT_ROWS`` output positions (a fixed random sample) enter the fit: a well-posed least
        squares needs a few times more rows than unknowns, not every pixel of a 736x960 map."""
        o = w.shape[0]
        if y.ndim != w.ndim or x.ndim != w.ndim:
            return w[:, k]
        yr = np.moveaxis(y, 1, -1).reshape(-1, o)
        rows = None
        most = min(REFIT_ROWS, max(2048, 8 * len(k) * int(np.prod(w.shape[2:]))))  # ~8 rows per unknown
        if len(yr) > most:
            rows = np.sort(np.random.default_rng(0).choice(len(yr), most, replace=False))
            yr = yr[rows]
        try:
            part = _im2col(x[:, k], r, rows)
        except ValueError:
            return w[:, k]
        if len(part) != len(yr):
            return w[:, k]
        w0 = w[:, k].reshape(o, -1).T  # [C'*prod(kernel), O]
        return _ridge(part.astype(np.float64), yr.astype(np.float64), w0).T.reshape((o, len(k)) + w.shape[2:])

    @staticmethod
    def _refit_fc(x: np.ndarray, rows: np.ndarray, y: np.ndarray, w: np.ndarray, trans: bool) -> np.ndarray:
        xf = x.reshape(x.shape[0], -1)[:, rows]
        w0 = (w.T if trans else w)[rows]  # [K', N]
        sol = _ridge(xf, y.reshape(y.shape[0], -1), w0)
        return sol.T if trans else sol


def _ridge(x: np.ndarray, y: np.ndarray, w0: np.ndarray, strength: float = 1e-2) -> np.ndarray:
    """argmin ||x W - y||^2 + lam ||W - w0||^2: least squares pulled towards the original
    weights, so a layer refit on few calibration samples does not overfit them."""
    xtx = x.T @ x
    lam = strength * np.trace(xtx) / max(xtx.shape[0], 1) + 1e-12
    return np.linalg.solve(xtx + lam * np.eye(xtx.shape[0]), x.T @ y + lam * w0)
