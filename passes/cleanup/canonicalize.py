"""Canonical forms that other tools (and graphopt's own fusions) handle better.

``sum-to-add``: ``Sum(a, b, ...)`` becomes a chain of binary ``Add`` nodes. Both broadcast the
same way (multidirectional), so the result is exact up to the order of float additions, which
the chain keeps left to right as ONNX Runtime's Sum kernel does. Exporters write residual
additions as 2-input Sum (the onnx package's light ResNet-50 does); ORT fuses Add but not Sum
into Conv, and TVM's Relax frontend turns Sum into broadcast_to + stack + sum (5-D tensors) that
its layout conversion cannot handle. By default only 2-input Sums are rewritten, which keeps the
node count; ``max_inputs`` raises that.
"""

from __future__ import annotations

from graphopt import Graph, Pass, PassContext, register_pass


@register_pass
class SumToAdd(Pass):
    """Rewrite ``Sum`` of 2..max_inputs inputs as a chain of ``Add``."""

    name = "sum-to-add"
    default_options = {"max_inputs": 2}

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        limit = int(self.options["max_inputs"])
        for node in list(graph.iter_nodes()):
            if node.op_type != "Sum" or node.domain not in ("", "ai.onnx"):
                continue
            ins = [v for v in node.inputs]
            if len(ins) < 2 or len(ins) > limit or any(v is None for v in ins):
                continue
            acc = ins[0]
            for i, v in enumerate(ins[1:], start=1):
                last = i == len(ins) - 1
                add = graph.make_node("Add", [acc, v], before=node,
                                      name=node.name if last and node.name else None)
                acc = add.output(0)
            out = node.output(0)
            acc.shape, acc.dtype = out.shape, out.dtype
            graph.replace_all_uses_with(out, acc)  # a graph output keeps its name
            graph.remove(node)
            changed = True
        return changed
