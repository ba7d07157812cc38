"""Liveness and peak activation memory of a node order.

Activations are node outputs and non-constant graph inputs; a value is live from its
definition until its last use (graph outputs stay live to the end). Constants are excluded -
including ``ConstantOfShape`` fills, which runtimes fold at load - they are resident whatever
the order. Values used inside a subgraph stay live until the node
owning the subgraph has run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from graphopt.analysis.cost import _nbytes
from graphopt.ir.core import Graph, Node, Value


@dataclass
class MemoryProfile:
    peak_bytes: int
    peak_at: str | None
    unknown_values: int
    timeline: list[int]


def peak_memory(
    graph: Graph,
    order: Sequence[Node] | None = None,
    *,
    sizes: Mapping[str, int] | None = None,
) -> MemoryProfile:
    """Peak bytes of live activations when nodes run in ``order`` (default: current order).

    ``sizes`` (bytes by value name) overrides the sizes read from static shapes, e.g. to
    evaluate orders with symbolic dims already substituted.
    """
    nodes = list(order) if order is not None else graph.nodes
    last: dict[int, int] = {}
    end = len(nodes)
    for k, n in enumerate(nodes):
        for v in list(n.inputs) + (n.outer_inputs() if n.attrs else []):
            if v is not None:
                last[id(v)] = k
    for o in graph.outputs:
        last[id(o)] = end
    unknown = 0
    live = 0
    timeline: list[int] = []
    frees: dict[int, int] = {}

    def alloc(v: Value, k: int) -> None:
        nonlocal live, unknown
        if sizes is not None:
            b = sizes.get(v.name, 0)
        else:
            b = 0 if v.fill_value() is not None else _nbytes(v)
        if b == 0 and v.name:
            unknown += 1
        live += b
        lu = last.get(id(v), k)
        frees[lu] = frees.get(lu, 0) + b

    for v in graph.inputs:
        if v.const is None:
            alloc(v, 0)
    peak, peak_at = live, None
    for k, n in enumerate(nodes):
        for o in n.outputs:
            if o.name:
                alloc(o, k)
        if live > peak:
            peak, peak_at = live, n.name or n.op_type
        timeline.append(live)
        live -= frees.pop(k, 0)
    return MemoryProfile(peak, peak_at, unknown, timeline)
