"""Dead-code elimination.

Rules:
  * a node none of whose outputs is read (by any node, in any nested subgraph, or as a graph
    output) is removed; removal cascades backwards in one reverse sweep;
  * an initializer nobody reads is removed, unless it is also a graph input (an old-style
    overridable default: removing it would change the model's interface);
  * a model-local function no node calls (directly or through other functions) is removed.

Graph inputs and outputs are never changed. Exact: outputs are bit-identical.
"""

from __future__ import annotations

from graphopt import Graph, Model, Pass, PassContext, register_pass


@register_pass
class DeadCodeElimination(Pass):
    """Remove nodes, initializers and local functions whose results nobody uses."""

    name = "dce"

    def apply(self, model: Model, ctx: PassContext) -> bool:
        changed = super().apply(model, ctx)
        return self._drop_functions(model) or changed

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for node in graph.reversed_nodes():
            if any(o.num_uses or o.is_graph_output() for o in node.outputs):
                continue
            graph.remove(node)
            changed = True
        for name, v in list(graph.initializers.items()):
            if v.num_uses == 0 and not v.is_graph_output() and not v.is_graph_input():
                graph.remove_initializer(name)
                changed = True
        return changed

    @staticmethod
    def _drop_functions(model: Model) -> bool:
        if not model.functions:
            return False
        called: set[tuple[str, str]] = set()
        stack = [model.graph]
        seen_f: set[tuple[str, str]] = set()
        while stack:
            g = stack.pop()
            for n in g.all_nodes():
                key = (n.domain, n.op_type)
                called.add(key)
                for f in model.functions.values():
                    if (f.domain, f.name) == key and key not in seen_f:
                        seen_f.add(key)
                        stack.append(f.graph)
        dead = [k for k, f in model.functions.items() if (f.domain, f.name) not in called]
        for k in dead:
            del model.functions[k]
        return bool(dead)
