"""No-op elimination.

Rules:
  * ``Identity(x)`` is replaced by ``x``;
  * ``Dropout(x)`` in inference form (no ``training_mode`` input, or a constant false one) whose
    mask output is unused is replaced by ``x``.

Refuses (leaves the node) when the node's output is a graph output and its input is a graph
input or another graph output: ONNX graphs cannot alias an input to an output or list one value
as two outputs, so the Identity is needed there. Exact.
"""

from __future__ import annotations

import numpy as np

from graphopt import Graph, Node, Pass, PassContext, register_pass


def _removable(graph: Graph, node: Node) -> bool:
    src = node.input(0)
    out = node.output(0)
    if src is None:
        return False
    if out.is_graph_output():
        if src.is_graph_input() or src.is_graph_output() or src.producer is None:
            return False
        if src.graph is not graph:  # an outer-scope value cannot become this graph's output name
            return False
    return True


@register_pass
class EliminateIdentity(Pass):
    """Remove Identity nodes and inference-mode Dropout."""

    name = "eliminate-identity"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for node in graph.iter_nodes():
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Identity":
                pass
            elif node.op_type == "Dropout":
                if len(node.outputs) > 1 and (node.output(1).num_uses or node.output(1).is_graph_output()):
                    continue
                tm = node.input(2)
                if tm is not None:
                    val = tm.const_value()
                    if val is None or bool(np.asarray(val).any()):
                        continue
            else:
                continue
            if not _removable(graph, node):
                continue
            graph.replace_all_uses_with(node.output(0), node.input(0))
            graph.remove(node)
            changed = True
        return changed
