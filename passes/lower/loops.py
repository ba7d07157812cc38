"""Loop and Scan unrolled into straight-line standard ONNX (the body copied once per iteration).

Why: TVM's Relax ONNX frontend converts neither ``Loop`` nor ``Scan``. Exporters write them for
fixed-count iterations (a ``for`` loop over a known range, a scan over a sequence whose length the
compile path fixes), and such a loop is just its body repeated: copying the body once per
iteration gives a graph every backend compiles, with the same arithmetic in the same order
(outputs are bitwise equal under ONNX Runtime).

What is covered:

* ``Loop`` whose trip count ``M`` is a constant, whose initial condition is absent or a constant
  true, and whose body hands the condition on unchanged (directly or through ``Identity``) or
  sets it to a constant true - so it runs exactly ``M`` times. Loop-carried values, scan outputs
  (stacked on a new axis 0) and body references to outer values are all handled.
* ``Scan`` (opset 9 and later) over inputs whose scan axis has a static length, with every
  ``scan_input_axes``/``scan_input_directions``/``scan_output_axes``/``scan_output_directions``.

A node it cannot unroll (a data-dependent trip count or early exit, a sequence length not known
statically, more iterations than ``max_iterations``, a body holding its own subgraphs) is left
unchanged, logged with the reason, and listed in the pass's ``report['left']`` (node name ->
reason).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from graphopt import Graph, Node, Value, register_pass

from .base import NodeLowering
from .base import Refuse as _Refuse


def _scalar_const(v: Value | None) -> Any:
    """The Python value of a constant one-element tensor, or None."""
    if v is None:
        return None
    c = v.const_value()
    if c is None or np.asarray(c).size != 1:
        return None
    return np.asarray(c).reshape(-1)[0].item()


def _passes_through(body: Graph, out: Value, inp: Value) -> bool:
    """Whether body output ``out`` is body input ``inp`` (possibly through Identity nodes)."""
    v: Value | None = out
    while v is not None:
        if v is inp:
            return True
        p = v.producer
        if p is None or p.op_type != "Identity" or p.graph is not body:
            return False
        v = p.input(0)
    return False


class _Inliner:
    """Copies a body graph's nodes into ``graph`` before ``ref``, once per call."""

    def __init__(self, graph: Graph, ref: Node, body: Graph, opset: int) -> None:
        self.g, self.ref, self.body, self.opset = graph, ref, body, opset
        self.base = ref.name or ref.op_type.lower()
        for n in body.iter_nodes():
            if n.subgraphs():
                raise _Refuse(f"its body holds a node with subgraphs ({n.op_type} {n.name!r})")
        # body initializers are the same every iteration: lift them once
        self.lifted: dict[int, Value] = {
            id(v): graph.add_initializer(f"{self.base}_{name}", v.const_value())
            for name, v in body.initializers.items() if not v.is_graph_input()
        }

    def const(self, a: np.ndarray, tag: str) -> Value:
        return self.g.add_initializer(f"{self.base}_{tag}", np.asarray(a))

    def one(self, op_type: str, inputs: list[Value | None], **attrs: Any) -> Value:
        n = self.g.make_node(op_type, inputs, attrs, before=self.ref,
                             name=self.g.fresh_name(f"{self.base}/{op_type}"))
        return n.output(0)

    def copy(self, bound: dict[int, Value], it: int) -> list[Value]:
        """One iteration: body inputs read ``bound`` (body input id -> value); returns the
        values of the body's outputs."""
        vmap: dict[int, Value] = dict(self.lifted)
        vmap.update(bound)

        def get(v: Value | None) -> Value | None:
            if v is None:
                return None
            return vmap.get(id(v), v)  # not in the body: an outer value, read as it is

        for n in self.body.iter_nodes():
            nn = self.g.make_node(n.op_type, [get(v) for v in n.inputs], None, num_outputs=len(n.outputs),
                                  domain=n.domain, before=self.ref,
                                  name=self.g.fresh_name(f"{self.base}/it{it}/{n.name or n.op_type}"))
            for k, a in n.attrs.items():
                nn.set_attr(k, a.value, a.type)
            for old, new in zip(n.outputs, nn.outputs, strict=True):
                if old.name == "":  # an omitted optional output stays omitted
                    new.name = ""
                new.dtype = old.dtype
                vmap[id(old)] = new
        return [get(v) for v in self.body.outputs]  # type: ignore[misc]

    def stack(self, parts: list[Value], axis: int) -> Value:
        """``parts`` (each without the axis) stacked along a new ``axis``."""
        if self.opset >= 13:
            ax = self.const(np.array([axis], np.int64), "axes")
            ups = [self.one("Unsqueeze", [p, ax]) for p in parts]
        else:  # Unsqueeze-1/11: axes are an attribute
            ups = [self.one("Unsqueeze", [p], axes=[axis]) for p in parts]
        return ups[0] if len(ups) == 1 else self.one("Concat", ups, axis=axis)  # type: ignore[arg-type]


@register_pass
class UnrollLoops(NodeLowering):
    """``Loop`` with a constant trip count and ``Scan`` over a static length, unrolled.

    Options: ``ops`` (which of Loop, Scan to unroll), ``max_iterations`` (refuse longer loops:
    the unrolled graph grows linearly with the count). The input shapes must be fixed first for
    Scan (the compile path does).
    """

    name = "unroll-loops"
    done_key = "unrolled"
    default_options: ClassVar[dict[str, Any]] = {"ops": ("Loop", "Scan"), "max_iterations": 1024}

    def lower_node(self, graph: Graph, n: Node, opset: int) -> None:
        if n.op_type == "Loop":
            self._loop(graph, n, opset)
        elif opset < 9:
            raise _Refuse(f"Scan-8 (opset {opset}) has a batch axis and sequence lengths; only Scan-9+ is unrolled")
        else:
            self._scan(graph, n, opset)

    def _count_ok(self, count: int) -> None:
        if count < 1:
            raise _Refuse(f"it runs {count} times (zero-trip loops are left to the runtime)")
        if count > self.options["max_iterations"]:
            raise _Refuse(f"{count} iterations is over max_iterations={self.options['max_iterations']}")

    def _finish(self, graph: Graph, n: Node, results: list[Value]) -> None:
        for old, new in zip(n.outputs, results, strict=True):
            if old.name == "" or new is None:
                continue
            if new.dtype is None:
                new.dtype = old.dtype
            if new.shape is None and old.shape is not None:
                new.shape = old.shape
            graph.replace_all_uses_with(old, new)
        graph.remove(n, safe=False)

    # -- Loop ---------------------------------------------------------------------------------
    def _loop(self, graph: Graph, n: Node, opset: int) -> None:
        body: Graph = n.attr("body")
        m = _scalar_const(n.input(0))
        if m is None:
            raise _Refuse("its trip count M is absent or computed at run time")
        cond0 = n.input(1) if len(n.inputs) > 1 else None
        if cond0 is not None and _scalar_const(cond0) is not True:
            raise _Refuse("its initial condition is computed at run time")
        nv = len(n.inputs) - 2
        if len(body.inputs) != nv + 2 or len(body.outputs) < nv + 1:
            raise _Refuse(f"its body has {len(body.inputs)} inputs / {len(body.outputs)} outputs for {nv} loop-carried values")
        cond_out = body.outputs[0]
        if not (_passes_through(body, cond_out, body.inputs[1]) or _scalar_const(cond_out) is True):
            raise _Refuse("its body computes the condition (it may exit early)")
        self._count_ok(int(m))
        inl = _Inliner(graph, n, body, opset)
        state: list[Value | None] = [n.input(2 + i) for i in range(nv)]
        scans: list[list[Value]] = [[] for _ in range(len(body.outputs) - 1 - nv)]
        true = inl.const(np.array(True), "cond")
        for it in range(int(m)):
            bound = {id(body.inputs[0]): inl.const(np.array(it, np.int64), f"iter{it}"),
                     id(body.inputs[1]): true}
            for i, v in enumerate(state):
                if v is None:
                    raise _Refuse(f"loop-carried value {i} has no initial value")
                bound[id(body.inputs[2 + i])] = v
            outs = inl.copy(bound, it)
            state = outs[1:1 + nv]
            for k, v in enumerate(outs[1 + nv:]):
                scans[k].append(v)
        self._finish(graph, n, [*state, *(inl.stack(s, 0) for s in scans)])  # type: ignore[list-item]

    # -- Scan ---------------------------------------------------------------------------------
    def _scan(self, graph: Graph, n: Node, opset: int) -> None:
        body: Graph = n.attr("body")
        ns = int(n.attr("num_scan_inputs"))
        nstate = len(n.inputs) - ns
        in_axes = list(n.attr("scan_input_axes") or [0] * ns)
        in_dirs = list(n.attr("scan_input_directions") or [0] * ns)
        nout = len(body.outputs) - nstate
        out_axes = list(n.attr("scan_output_axes") or [0] * nout)
        out_dirs = list(n.attr("scan_output_directions") or [0] * nout)
        lengths = set()
        xs = [n.input(nstate + j) for j in range(ns)]
        for j, x in enumerate(xs):
            if x is None or x.shape is None:
                raise _Refuse(f"scan input {j}'s shape is unknown; fix the input shapes first")
            ax = in_axes[j] % len(x.shape)
            in_axes[j] = ax
            if not isinstance(x.shape[ax], int):
                raise _Refuse(f"scan input {j}'s length ({x.shape[ax]!r}) is not static; fix the input shapes first")
            lengths.add(x.shape[ax])
        if len(lengths) != 1:
            raise _Refuse(f"scan inputs have different lengths {sorted(lengths)}")
        steps = lengths.pop()
        self._count_ok(steps)
        inl = _Inliner(graph, n, body, opset)
        state: list[Value | None] = [n.input(i) for i in range(nstate)]
        per: list[list[Value]] = [[] for _ in range(nout)]
        for t in range(steps):
            bound: dict[int, Value] = {}
            for i, v in enumerate(state):
                if v is None:
                    raise _Refuse(f"state variable {i} has no initial value")
                bound[id(body.inputs[i])] = v
            for j, x in enumerate(xs):
                pos = steps - 1 - t if in_dirs[j] else t
                bound[id(body.inputs[nstate + j])] = inl.one(
                    "Gather", [x, inl.const(np.array(pos, np.int64), f"t{pos}")], axis=in_axes[j])
            outs = inl.copy(bound, t)
            state = outs[:nstate]
            for k, v in enumerate(outs[nstate:]):
                per[k].append(v)
        stacked = []
        for k, parts in enumerate(per):
            if out_dirs[k]:
                parts = parts[::-1]
            axis = out_axes[k]
            if axis < 0:
                rank = body.outputs[nstate + k].rank
                if rank is None:
                    raise _Refuse(f"scan output {k} has a negative axis and an unknown rank")
                axis += rank + 1
            stacked.append(inl.stack(parts, axis))
        self._finish(graph, n, [*state, *stacked])  # type: ignore[list-item]
