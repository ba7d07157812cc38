"""Liveness and peak activation memory of a node order.

Activations are node outputs and non-constant graph inputs; a value is live from its
definition until its last use (graph outputs stay live to the end). Constants are excluded -
including ``ConstantOfShape`` fills, which runtimes fold at load - they are resident whatever
the order. Values used inside a subgraph stay live until the node
owning the subgraph has run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from graphopt.analysis.cost import _nbytes
from graphopt.ir.core import Graph, Node


@dataclass
class MemoryProfile:
    peak_bytes: int
    peak_at: str | None
    unknown_values: int
    timeline: list[int]


def peak_memory(graph: Graph, order: Sequence[Node] | None = None) -> MemoryProfile:
    """Peak bytes of live activations when nodes run in ``order`` (default: current order)."""
    nodes = list(order) if order is not None else graph.nodes
    pos = {id(n): k for k, n in enumerate(nodes)}
    last: dict[int, int] = {}
    vals: dict[int, object] = {}
    end = len(nodes)

    def touch(v: object, k: int) -> None:
        last[id(v)] = max(last.get(id(v), -1), k)
        vals[id(v)] = v

    for k, n in enumerate(nodes):
        for v in n.inputs:
            if v is not None:
                touch(v, k)
        if n.attrs:
            for v in n.outer_inputs():
                touch(v, k)
    for o in graph.outputs:
        touch(o, end)
    unknown = 0
    live = 0
    timeline: list[int] = []
    frees: dict[int, int] = {}
    sizes: dict[int, int] = {}

    def alloc(v: object, k: int) -> None:
        nonlocal live, unknown
        vid = id(v)
        if vid in sizes:
            return
        b = 0 if getattr(v, "fill_value", lambda: None)() is not None else _nbytes(v)  # type: ignore[arg-type]
        if b == 0 and getattr(v, "name", ""):
            unknown += 1
        sizes[vid] = b
        live += b
        lu = last.get(vid, k)
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
    _ = pos
    return MemoryProfile(peak, peak_at, unknown, timeline)
