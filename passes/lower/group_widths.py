"""Convolutions given whole vectors of output channels per group (the TVM CPU compile runs it).

Why: graphopt's default TVM schedules vectorize output channels, and a vector must stay inside
one group (its lanes share one input channel). ShuffleNet's 34-wide groups got 2-lane tiles
(16-lane once padded to 48: ShuffleNet's untuned build went from 4.1x to 2.0x of ORT), and
SqueezeNet's 1000-class conv got 8-lane ones (1008 channels: 16 lanes). Zero filters pad each
group's outputs to a multiple of the vector width and a Split (plus a Concat for several groups)
drops the padding again: exact, the padded filters' outputs are never read.

The compile path runs it with the target's vector width (``lanes``); it is target-specific, so
it is in no default pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

from graphopt import Graph, Node, Pass, PassContext, register_pass


def _const_weight_convs(graph: Graph) -> Iterator[tuple[Node, int, np.ndarray | None]]:
    """(node, group, constant weight or None) for every standard Conv of ``graph`` (a snapshot:
    the caller may rewrite them)."""
    for n in list(graph):
        if n.op_type == "Conv" and n.domain in ("", "ai.onnx"):
            yield n, int(n.attr("group", 1) or 1), (n.input(1).const_value() if n.input(1) is not None else None)


@register_pass
class PadGroupWidths(Pass):
    """Pad each conv group's output channels to whole vectors of ``lanes`` (zero filters, split
    off again). Applied where the vectors gained outweigh the padded work by ``min_gain``, with at
    most ``max_growth`` more work. ``report['padded_convs']`` counts the convs changed."""

    name = "pad-group-widths"
    recursive = False
    default_options: ClassVar[dict[str, Any]] = {"lanes": 16, "max_growth": 1.5, "min_gain": 1.2}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.report: dict[str, Any] = {"padded_convs": 0}

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        from graphopt.backend.schedules import vector_width  # the width the register tiles use (no TVM import)

        lanes = int(self.options["lanes"])
        max_growth, min_gain = float(self.options["max_growth"]), float(self.options["min_gain"])
        opset = (self.model.opset("") if self.model is not None else None) or 1
        changed = 0
        for n, groups, w in _const_weight_convs(graph):
            if lanes < 2 or w is None or w.ndim != 4 or w.shape[0] % groups or (groups > 1 and w.shape[1] == 1):
                continue  # depthwise (one input channel per group) is channel-wise: nothing to pad
            width = w.shape[0] // groups
            padded = -(-width // lanes) * lanes
            if width % lanes == 0 or padded > max_growth * width:
                continue
            if (width / max(vector_width(width, lanes), 1)) / (padded / lanes) < min_gain:  # vectors per group
                continue
            bias = n.input(2).const_value() if len(n.inputs) > 2 and n.input(2) is not None else None
            if len(n.inputs) > 2 and n.input(2) is not None and bias is None:
                continue
            wp = np.zeros((groups * padded,) + w.shape[1:], w.dtype)
            bp = np.zeros(groups * padded, w.dtype)
            for k in range(groups):
                wp[k * padded:k * padded + width] = w[k * width:(k + 1) * width]
                if bias is not None:
                    bp[k * padded:k * padded + width] = bias[k * width:(k + 1) * width]
            base = n.name or "conv"
            ins = [n.input(0), graph.add_initializer(base + "_wpad", wp)]
            if bias is not None:
                ins.append(graph.add_initializer(base + "_bpad", bp))
            conv = graph.make_node("Conv", ins, {k: n.attr(k) for k in n.attrs}, before=n,
                                   name=graph.fresh_name(base + "_padded"))
            # one Split into [width, padding] per group keeps every opset (and TVM's converter) happy
            sizes = [width, padded - width] * groups
            if opset < 13:  # Split-2/11: sizes are an attribute
                split = graph.make_node("Split", [conv.output(0)], {"axis": 1, "split": sizes},
                                        num_outputs=len(sizes), before=n, name=graph.fresh_name(base + "_unpad"))
            else:
                sv = graph.add_initializer(graph.fresh_name(base + "_sizes"), np.array(sizes, np.int64))
                split = graph.make_node("Split", [conv.output(0), sv], {"axis": 1}, num_outputs=len(sizes), before=n,
                                        name=graph.fresh_name(base + "_unpad"))
            parts = [split.output(2 * k) for k in range(groups)]
            out = parts[0] if groups == 1 else graph.make_node("Concat", parts, {"axis": 1}, before=n,
                                                              name=graph.fresh_name(base + "_groups")).output(0)
            out.dtype, out.shape = n.output(0).dtype, n.output(0).shape
            graph.replace_all_uses_with(n.output(0), out)
            graph.remove(n)
            changed += 1
        self.report["padded_convs"] += changed
        return bool(changed)
