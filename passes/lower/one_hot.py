"""OneHot with a constant ``depth`` written as ``Where(Equal(Unsqueeze(indices), range), on, off)``.

Why: TVM 0.27's ONNX frontend mis-converts OneHot in two ways. It reads ``depth`` with
``.numpy().tolist()``, so the rank-1 one-element form ONNX allows (tf2onnx writes ``int32[1]``,
e.g. magika_v1) reaches ``relax.op.one_hot`` as a list ("Mismatched type on argument #3"); and it
passes on/off as Python floats, so the result is float64 whatever the ``values`` dtype (the next
MatMul then fails: "Binary operators must have the same datatype").

The rewrite follows ONNX Runtime's kernel exactly: ``depth`` is read as its one element converted
to int64 (a float is truncated); float indices are truncated to int64 first; negative indices get ``depth`` added; an
output element is ``on`` where the (adjusted) index equals its position along ``axis`` (an index
out of range is all ``off``).
``on``/``off`` are ``values[1]``/``values[0]`` with the dtype of ``values``.

Nodes whose ``depth`` is computed at run time, or is not positive, or whose ``axis`` is not the
last one while the indices' rank is unknown, are left unchanged and listed in ``report['left']``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import onnx

from graphopt import Graph, Node, Pass, PassContext, Value, register_pass

log = logging.getLogger(__name__)


@register_pass
class LowerOneHot(Pass):
    """OneHot (constant depth) as Equal + Where, exact under ONNX Runtime."""

    name = "lower-one-hot"
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.report: dict[str, Any] = {"rewritten": 0, "left": {}}

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        opset = (self.model.opset("") if self.model is not None else None) or 13
        for n in list(graph):
            if n.op_type != "OneHot" or n.domain not in ("", "ai.onnx") or n.graph is not graph:
                continue
            why = self._lower(graph, n, opset)
            if why:
                self.report["left"][n.name or "OneHot"] = why
                log.info("lower-one-hot: node %r left as it is: %s", n.name, why)
                continue
            self.report["rewritten"] += 1
            changed = True
        return changed

    def _lower(self, graph: Graph, n: Node, opset: int) -> str | None:
        idx, d, vals = n.input(0), n.input(1), n.input(2)
        if idx is None or d is None or vals is None:
            return "an input is missing"
        depth_arr = d.const_value()
        if depth_arr is None:
            return "depth is computed at run time (TVM needs a constant depth)"
        if depth_arr.size != 1:
            return f"depth has {depth_arr.size} elements (ONNX requires exactly one)"
        raw = depth_arr.reshape(()).item()
        depth = int(np.trunc(raw)) if isinstance(raw, float) else int(raw)  # ORT: static_cast<int64_t>
        if depth <= 0:
            return f"depth {depth} is not positive"
        idx_dt = _np_dtype(idx)
        if idx_dt is None:
            return "the indices' dtype is unknown"
        rank = idx.rank
        axis = int(n.attr("axis", -1))
        if axis != -1 and rank is None:
            return f"axis {axis} with indices of unknown rank"
        out_rank = (rank + 1) if rank is not None else None
        if out_rank is not None:
            if not -out_rank <= axis < out_rank:
                return f"axis {axis} out of range for indices of rank {rank}"
            axis %= out_rank
        # after the new axis, the indices have (out_rank - 1 - axis) dims: the range broadcasts over them
        trailing = 0 if axis == -1 or out_rank is None else out_rank - 1 - axis
        base = n.name or "one_hot"
        if idx_dt.kind == "f":  # ORT truncates float indices to int64 first (Cast does the same)
            idx = graph.make_node("Cast", [idx], {"to": onnx.TensorProto.INT64}, before=n,
                                  name=graph.fresh_name(base + "_int")).output(0)
            idx_dt = np.dtype(np.int64)
        positions = graph.add_initializer(base + "_positions",
                                          np.arange(depth, dtype=idx_dt).reshape([depth] + [1] * trailing))
        zero = graph.add_initializer(base + "_zero", np.array(0, dtype=idx_dt))
        dep = graph.add_initializer(base + "_depth", np.array(depth, dtype=idx_dt))
        mk = graph.make_node
        neg = mk("Less", [idx, zero], before=n, name=graph.fresh_name(base + "_neg")).output(0)
        shifted = mk("Add", [idx, dep], before=n, name=graph.fresh_name(base + "_wrap")).output(0)
        adj = mk("Where", [neg, shifted, idx], before=n, name=graph.fresh_name(base + "_adj")).output(0)
        ax = axis if axis != -1 else -1
        if opset >= 13:
            axes = graph.add_initializer(base + "_axes", np.array([ax], dtype=np.int64))
            unsq = mk("Unsqueeze", [adj, axes], before=n, name=graph.fresh_name(base + "_unsq"))
        else:
            unsq = mk("Unsqueeze", [adj], {"axes": [ax]}, before=n, name=graph.fresh_name(base + "_unsq"))
        hit = mk("Equal", [unsq.output(0), positions], before=n, name=graph.fresh_name(base + "_eq")).output(0)
        v = vals.const_value()
        if v is not None and v.size == 2:
            off = graph.add_initializer(base + "_off", v.reshape(-1)[0])
            on = graph.add_initializer(base + "_on", v.reshape(-1)[1])
        else:
            on = mk("Gather", [vals, graph.add_initializer(base + "_i1", np.array(1, np.int64))], {"axis": 0},
                    before=n, name=graph.fresh_name(base + "_on")).output(0)
            off = mk("Gather", [vals, graph.add_initializer(base + "_i0", np.array(0, np.int64))], {"axis": 0},
                     before=n, name=graph.fresh_name(base + "_off")).output(0)
        out = mk("Where", [hit, on, off], before=n, name=graph.fresh_name(base))
        out.output(0).dtype, out.output(0).shape = n.output(0).dtype, n.output(0).shape
        graph.replace_all_uses_with(n.output(0), out.output(0))
        graph.remove(n)
        return None


def _np_dtype(v: Value) -> np.dtype | None:
    from onnx.helper import tensor_dtype_to_np_dtype

    if v.dtype is None or v.dtype == 0:
        c = v.const_value(allow_overridable=True)
        return c.dtype if c is not None else None
    try:
        return np.dtype(tensor_dtype_to_np_dtype(v.dtype))
    except (KeyError, TypeError, ValueError):
        return None
