"""Cost model: FLOPs, parameters and bytes per node, and totals for a model.

FLOPs count multiply and add separately (a multiply-accumulate is 2 FLOPs). Nodes whose shapes
are unknown count 0 FLOPs and are listed in ``ModelStats.unknown``. Run
:func:`graphopt.analysis.infer_shapes` first for complete figures.

Control flow counts what one run executes, not every node written down: an ``If`` counts its
*larger* branch (which one runs depends on data, so FLOPs are an upper bound of one run); a
``Loop`` counts its body once per iteration when the trip count ``M`` is a constant, else one
iteration; a ``Scan`` counts its body once per element of its first scan input when that length
is static, else one iteration. Local function bodies count once each.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from graphopt.ir.core import Graph, Model, Node, Value
from graphopt.ir.tensor import np_dtype

_ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Relu", "LeakyRelu", "PRelu",
    "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Abs", "Neg", "Clip", "Elu", "Selu",
    "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Erf", "Gelu", "Where", "Equal", "Less",
    "Greater", "Not", "And", "Or", "Floor", "Ceil", "Round", "Sign", "Mod", "Celu", "Mish",
})
_REDUCE = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                     "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin",
                     "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
#: nodes that hold constants rather than compute (left out of compute-node counts)
CONSTANT_OPS = frozenset({"Constant"})


def _numel(v: Value | None) -> int | None:
    """Element count, or None when the shape is not fully known. A negative dim (PaddlePaddle
    writes ``-1`` for "any size") is unknown, not a size: it would make costs negative."""
    if v is None:
        return None
    s = v.static_shape()
    return None if s is None or any(d < 0 for d in s) else math.prod(s)


def _static(v: Value | None) -> tuple[int, ...] | None:
    """The shape of ``v`` when every dim is a known size (no symbols, no negative dims)."""
    s = v.static_shape() if v is not None else None
    return None if s is None or any(d < 0 for d in s) else s


def _nbytes(v: Value | None) -> int:
    n = _numel(v)
    if n is None or v is None or not v.dtype:
        return 0
    try:
        return n * np_dtype(v.dtype).itemsize
    except Exception:  # noqa: BLE001
        return 0


@dataclass
class NodeCost:
    flops: int = 0
    params: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    known: bool = True


def node_cost(node: Node) -> NodeCost:
    """FLOPs, constant parameters read, and activation bytes of one node."""
    c = NodeCost()
    ins = node.inputs
    for v in ins:
        if v is None:
            continue
        if v.is_const(allow_overridable=True):
            c.params += _numel(v) or 0
        else:
            c.bytes_in += _nbytes(v)
    for o in node.outputs:
        c.bytes_out += _nbytes(o)
    out = node.outputs[0] if node.outputs else None
    n_out = _numel(out)
    op = node.op_type
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = ins[1] if len(ins) > 1 else None
        ws = _static(w)
        if n_out is None or ws is None:
            c.known = False
            return c
        group = node.attr("group", 1) or 1
        _ = group  # weight shape already holds C_in / group
        k = math.prod(ws[1:])
        c.flops = 2 * n_out * k + (n_out if len(ins) > 2 and ins[2] is not None else 0)
    elif op == "ConvTranspose":
        x, w = ins[0], ins[1] if len(ins) > 1 else None
        nx, ws = _numel(x), _static(w)
        if nx is None or ws is None:
            c.known = False
            return c
        group = node.attr("group", 1) or 1
        c.flops = 2 * nx * (ws[1] * group // max(group, 1)) * math.prod(ws[2:])
    elif op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = ins[0]
        sa = _static(a)
        if n_out is None or sa is None or not sa:
            c.known = False
            return c
        c.flops = 2 * n_out * sa[-1]
    elif op == "Gemm":
        a = ins[0]
        sa = _static(a)
        if n_out is None or sa is None or len(sa) != 2:
            c.known = False
            return c
        k = sa[0] if node.attr("transA", 0) else sa[1]
        c.flops = 2 * n_out * k + (n_out if len(ins) > 2 and ins[2] is not None else 0)
    elif op in ("MaxPool", "AveragePool", "LpPool"):
        ks = node.attr("kernel_shape")
        if n_out is None or not ks or any(k < 0 for k in ks):
            c.known = False
            return c
        c.flops = n_out * math.prod(ks)
    elif op in _REDUCE:
        n_in = _numel(ins[0]) if ins else None
        if n_in is None:
            c.known = False
            return c
        c.flops = n_in
    elif op in ("BatchNormalization", "InstanceNormalization"):
        c.flops = 2 * (n_out or 0)
        c.known = n_out is not None
    elif op in ("LayerNormalization", "Softmax", "LogSoftmax"):
        c.flops = 5 * (n_out or 0)
        c.known = n_out is not None
    elif op in _ELEMENTWISE:
        c.flops = n_out or 0
        c.known = n_out is not None
    return c


@dataclass
class ModelStats:
    """Totals for a model (main graph and every subgraph)."""

    nodes: int = 0
    compute_nodes: int = 0
    params: int = 0
    weight_bytes: int = 0
    flops: int = 0
    ops: Counter = field(default_factory=Counter)
    unknown: list[str] = field(default_factory=list)
    subgraphs: int = 0


def is_constant_producer(node: Node) -> bool:
    """``Constant``, or ``ConstantOfShape`` of a constant shape: storage, not compute."""
    if node.op_type in CONSTANT_OPS:
        return True
    if node.op_type == "ConstantOfShape":
        s = node.input(0)
        return s is not None and s.is_const()
    return False


def model_stats(model: Model) -> ModelStats:
    """Node counts (all, and compute nodes as NOTES.md defines them), params, bytes, FLOPs."""
    st = ModelStats()
    seen: set[int] = set()
    for g in model.graph.all_graphs():
        if g is not model.graph:
            st.subgraphs += 1
        for v in g.initializers.values():
            if id(v) not in seen and v.const is not None:
                seen.add(id(v))
                st.params += v.const.size
                st.weight_bytes += v.const.nbytes
        for n in g.iter_nodes():
            st.nodes += 1
            st.ops[n.op_type if not n.domain else f"{n.domain}::{n.op_type}"] += 1
            if is_constant_producer(n):
                if n.op_type == "Constant":
                    arr = n.outputs[0].const_value() if n.outputs else None
                    if arr is not None and id(n) not in seen:
                        seen.add(id(n))
                        st.params += int(arr.size)
                        st.weight_bytes += int(arr.nbytes) if arr.dtype != object else 0
                continue
            st.compute_nodes += 1
            if not node_cost(n).known:
                st.unknown.append(n.name or n.op_type)
    st.flops = graph_flops(model.graph) + sum(graph_flops(f.graph) for f in model.functions.values())
    return st


def _iterations(node: Node) -> int:
    """How many times a Loop/Scan body runs, when the model says so statically; else 1."""
    if node.op_type == "Loop":
        m = node.input(0) if node.inputs else None
        arr = m.const_value() if m is not None and m.is_const() else None
        if arr is not None and np.size(arr) == 1:
            return max(int(np.ravel(arr)[0]), 0)
        return 1
    if node.op_type == "Scan":
        n_scan = node.attr("num_scan_inputs", 0) or 0
        body = node.subgraphs()[0] if node.subgraphs() else None
        if not n_scan or body is None:
            return 1
        first = len(body.inputs) - n_scan  # state inputs come first in the body
        x = node.inputs[first] if 0 <= first < len(node.inputs) else None
        axes = node.attr("scan_input_axes") or [0]
        s = _static(x)
        if s is not None and s:
            ax = int(axes[0]) % len(s)
            return int(s[ax])
    return 1


def graph_flops(graph: Graph) -> int:
    """FLOPs of one run of ``graph``, nested control flow included (see the module docstring:
    the larger If branch, Loop/Scan bodies times a static trip count, else once)."""
    total = 0
    for n in graph.iter_nodes():
        if is_constant_producer(n):
            continue
        total += node_cost(n).flops
        subs = n.subgraphs()
        if not subs:
            continue
        if n.op_type == "If":
            total += max(graph_flops(g) for g in subs)
        else:
            total += _iterations(n) * sum(graph_flops(g) for g in subs)
    return total


__all__ = ["ModelStats", "NodeCost", "graph_flops", "is_constant_producer", "model_stats", "node_cost"]
