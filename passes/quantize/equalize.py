"""Cross-layer equalization (before quantization).

Rule: for ``Conv1 -> [Relu] -> Conv2`` where Conv1's output is read only by the Relu (or by
Conv2), Conv2 has group = 1, and both weights are constant, scale output channel i of Conv1
(weights and bias) by ``1/s_i`` and input channel i of Conv2 by ``s_i`` with
``s_i = sqrt(r1_i / r2_i)`` (r = max |weight| of the channel). Relu is positively homogeneous and
zero padding stays zero, so the float model computes exactly the same thing, but the two
layers' per-channel weight ranges are balanced - per-tensor int8 weights lose much less.
Repeated a few rounds so chains settle. Exact in float (up to rounding).
"""

from __future__ import annotations

import numpy as np

from graphopt import Graph, Node, Pass, PassContext, register_pass


def _pairs(graph: Graph) -> list[tuple[Node, Node, Node | None]]:
    out = []
    for c1 in graph:
        if c1.op_type != "Conv" or c1.domain not in ("", "ai.onnx") or (c1.attr("group", 1) or 1) != 1:
            continue
        y = c1.output(0)
        readers = y.consumers()
        if len(readers) != 1 or y.is_graph_output():
            continue
        mid = None
        nxt = readers[0]
        if nxt.op_type == "Relu":
            mid = nxt
            r2 = mid.output(0).consumers()
            if len(r2) != 1 or mid.output(0).is_graph_output():
                continue
            nxt = r2[0]
        if nxt.op_type != "Conv" or (nxt.attr("group", 1) or 1) != 1 or nxt.input(0) is not (mid or c1).output(0):
            continue
        w1, w2 = c1.input(1), nxt.input(1)
        if w1 is None or w2 is None or w1.const_value() is None or w2.const_value() is None:
            continue
        if len(w1.consumers()) != 1 or len(w2.consumers()) != 1:
            continue  # shared weights would change other layers
        out.append((c1, nxt, mid))
    return out


@register_pass
class CrossLayerEqualization(Pass):
    """Balance per-channel weight ranges of consecutive Conv layers (exact in float)."""

    name = "equalize-cross-layer"
    default_options = {"rounds": 4}

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for _ in range(self.options["rounds"]):
            for c1, c2, _mid in _pairs(graph):
                w1 = c1.input(1).const_value().astype(np.float64)
                w2 = c2.input(1).const_value().astype(np.float64)
                if w2.shape[1] != w1.shape[0]:
                    continue
                r1 = np.abs(w1).reshape(w1.shape[0], -1).max(1)
                r2 = np.abs(w2).transpose(1, 0, *range(2, w2.ndim)).reshape(w2.shape[1], -1).max(1)
                ok = (r1 > 0) & (r2 > 0)
                s = np.ones_like(r1)
                s[ok] = np.sqrt(r1[ok] / r2[ok])
                if np.allclose(s, 1.0, rtol=1e-3):
                    continue
                dt = c1.input(1).const_value().dtype
                c1.set_input(1, graph.add_initializer(c1.input(1).name + "_eq",
                                                      (w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))).astype(dt)))
                b = c1.input(2)
                if b is not None and b.const_value() is not None:
                    c1.set_input(2, graph.add_initializer(b.name + "_eq", (b.const_value() / s).astype(dt)))
                c2.set_input(1, graph.add_initializer(c2.input(1).name + "_eq",
                                                      (w2 * s.reshape((1, -1) + (1,) * (w2.ndim - 2))).astype(dt)))
                changed = True
        return changed
