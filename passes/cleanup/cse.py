"""Common subexpression elimination.

Rules:
  * two initializers (or ``Constant`` nodes) with the same dtype, shape and bytes become one;
  * two nodes with the same op, domain, attributes and the very same inputs compute the same
    thing: the later one's outputs are replaced by the earlier one's (one pass in topological
    order, so whole duplicated chains collapse).

Refuses: random ops, nodes with subgraphs, overridable initializers (graph inputs), and a
duplicate whose output is a graph output while the kept one is too (both names must stay).
Exact.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from graphopt import Graph, Node, Pass, PassContext, Value, register_pass

from .constant_folding import NONDETERMINISTIC


def _attr_key(node: Node) -> tuple:
    items = []
    for k in sorted(node.attrs):
        a = node.attrs[k]
        p = a.proto
        if p is not None:
            items.append((k, p.SerializeToString(deterministic=True)))
        else:
            v = a.value
            if hasattr(v, "numpy"):
                arr = v.numpy()
                v = (arr.dtype.str, arr.shape, hashlib.sha1(np.require(arr, requirements="C").tobytes()).hexdigest())
            items.append((k, repr(v)))
    return tuple(items)


def _data_key(arr: np.ndarray) -> tuple[Any, ...] | None:
    if arr.dtype == object:
        return None
    return (arr.dtype.str, arr.shape, hashlib.sha1(np.require(arr, requirements="C").tobytes()).hexdigest())


@register_pass
class CommonSubexpressionElimination(Pass):
    """Merge duplicate constants and nodes that compute the same value from the same inputs."""

    name = "cse"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = self._constants(graph)
        seen: dict[tuple, Node] = {}
        for node in graph:
            if node.op_type in NONDETERMINISTIC or node.subgraphs() or not node.outputs:
                continue
            if node.op_type == "Constant":
                continue
            key = (node.domain, node.op_type, node.overload, tuple(id(v) if v is not None else None for v in node.inputs),
                   _attr_key(node), len(node.outputs))
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            if any(o.is_graph_output() for o in node.outputs):
                continue  # its name is part of the interface; keep it
            if any(o.name and not f.name for o, f in zip(node.outputs, first.outputs, strict=True)):
                continue  # the first omitted an output this one produces
            for o, f in zip(node.outputs, first.outputs, strict=True):
                if o.name:
                    graph.replace_all_uses_with(o, f)
            graph.remove(node)
            changed = True
        return changed

    @staticmethod
    def _constants(graph: Graph) -> bool:
        changed = False
        by_key: dict[tuple, Value] = {}
        cands: list[Value] = [v for v in graph.initializers.values() if not v.is_graph_input()]
        cands += [n.output(0) for n in graph if n.op_type == "Constant" and n.outputs]
        # Hash only constants that could have a twin: same dtype, shape and sampled elements.
        # (Hashing every weight on every fixpoint round cost a second on a 50 MB model.)
        arrays: list[tuple[Value, np.ndarray, tuple]] = []
        groups: dict[tuple, int] = {}
        for v in cands:
            arr = v.const_value()
            if arr is None or arr.size > (1 << 26):
                continue
            arr = np.asarray(arr)
            if arr.dtype == object:
                continue
            flat = arr.reshape(-1)
            pre = (arr.dtype.str, arr.shape, flat[:16].tobytes(), flat[-16:].tobytes())
            arrays.append((v, arr, pre))
            groups[pre] = groups.get(pre, 0) + 1
        for v, arr, pre in arrays:
            key = _data_key(arr) if groups[pre] > 1 else pre
            if key is None:
                continue
            first = by_key.get(key)
            if first is None:
                by_key[key] = v
                continue
            if v.is_graph_output():
                continue
            graph.replace_all_uses_with(v, first)
            if v.producer is not None:
                graph.remove(v.producer)
            elif v.name in graph.initializers:
                graph.remove_initializer(v.name)
            changed = True
        return changed
