"""Short names for internal values and nodes.

Rule: every node and every value of the main graph that is not a graph input or output gets a
short generated name (``n12``, ``t3f``); graph inputs and outputs keep theirs, so the model's
interface is unchanged. Values read inside subgraphs are renamed with them (references are by
object). Names are metadata to ONNX Runtime, but in a small quantized or palettized model they
can take a third of the file. Exact.
"""

from __future__ import annotations

from graphopt import Graph, Pass, PassContext, register_pass


def _b36(k: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        k, r = divmod(k, 36)
        out = digits[r] + out
        if k == 0:
            return out


@register_pass
class CompactNames(Pass):
    """Give internal values and nodes short names (the interface keeps its names)."""

    name = "compact-names"
    recursive = False

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        keep = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
        used = set(keep)
        k = 0

        def fresh(prefix: str) -> str:
            nonlocal k
            while True:
                name = prefix + _b36(k)
                k += 1
                if name not in used:
                    used.add(name)
                    return name

        changed = False
        inits = {}
        for name, v in graph.initializers.items():
            if name not in keep:
                v.name = fresh("w")
                changed = True
            inits[v.name] = v
        graph.initializers.clear()
        graph.initializers.update(inits)
        for n in graph:
            n.name = fresh("n")
            for o in n.outputs:
                if o.name and o.name not in keep and not o.is_graph_output():
                    o.name = fresh("t")
            changed = True
        graph.value_info = []  # names changed: drop stale value_info entries
        return changed
