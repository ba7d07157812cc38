"""Memory-aware scheduling.

Rule: reorder the main graph's nodes topologically so that peak live activation memory is
low - greedily run, among the ready nodes, the one that frees the most and allocates the
least; two tie-breaks are tried (input order, and depth-first: the most recently readied node)
and the better schedule wins. ``self.bound`` is a lower bound no order can beat (the largest
single node's inputs plus outputs), to tell "no gain possible" from "heuristic missed". The new order is kept only if its peak (from
``graphopt.analysis.peak_memory`` with sizes from static shapes; symbolic dims resolved from
the context's input shapes or 1) is strictly lower than the input order's, so the result is
never worse. Before/after peaks are logged and kept in ``self.last``. Exact (only order changes).
"""

from __future__ import annotations

import heapq
import logging
from typing import Any

from graphopt import Graph, Node, Pass, PassContext, Value, register_pass
from graphopt.analysis import peak_memory

from ..common import activation_sizes

log = logging.getLogger(__name__)


def greedy_order(graph: Graph, size: dict[str, int], *, lifo: bool = False) -> list[Node]:
    """Greedy list schedule: run the ready node with the smallest (allocated - freed) bytes;
    ties go to input order, or with ``lifo`` to the most recently readied node (depth-first,
    which finishes one branch before starting the next)."""
    nodes = graph.nodes
    index = {n: k for k, n in enumerate(nodes)}

    def deps(n: Node) -> list[Value]:
        vs = [v for v in n.inputs if v is not None]
        if n.attrs:
            vs += n.outer_inputs()
        return vs

    preds: dict[Node, set[Node]] = {}
    consumers: dict[Value, set[Node]] = {}
    for n in nodes:
        ps = set()
        for v in deps(n):
            if v.producer is not None and v.producer.graph is graph:
                ps.add(v.producer)
            if not v.is_const(allow_overridable=True):
                consumers.setdefault(v, set()).add(n)
        preds[n] = ps
    remaining = {v: len(c) for v, c in consumers.items()}
    outputs = {id(o) for o in graph.outputs}
    waiting = {n: len(preds[n]) for n in nodes}
    succs: dict[Node, list[Node]] = {n: [] for n in nodes}
    for n, ps in preds.items():
        for p in ps:
            succs[p].append(n)

    def delta(n: Node) -> int:
        alloc = sum(size.get(o.name, 0) for o in n.outputs if o.name)
        freed = 0
        for v in set(deps(n)):
            if remaining.get(v) == 1 and id(v) not in outputs and not v.is_const(allow_overridable=True):
                freed += size.get(v.name, 0)
        return alloc - freed

    heap: list[tuple[int, int, int, int]] = []
    version: dict[Node, int] = {}
    clock = [0]

    def push(n: Node) -> None:
        version[n] = version.get(n, 0) + 1
        clock[0] += 1
        heapq.heappush(heap, (delta(n), -clock[0] if lifo else index[n], index[n], version[n]))

    for n in nodes:
        if waiting[n] == 0:
            push(n)
    order: list[Node] = []
    done: set[Node] = set()
    while heap:
        d, _tie, k, ver = heapq.heappop(heap)
        n = nodes[k]
        if n in done or version[n] != ver:
            continue
        order.append(n)
        done.add(n)
        for v in set(deps(n)):
            if v in remaining:
                remaining[v] -= 1
                if remaining[v] == 1:
                    for c in consumers[v]:
                        if c not in done and waiting[c] == 0:
                            push(c)
        for s in succs[n]:
            waiting[s] -= 1
            if waiting[s] == 0:
                push(s)
    return order


@register_pass
class MemoryAwareSchedule(Pass):
    """Reorder nodes to lower peak activation memory (kept only if strictly lower)."""

    name = "schedule-memory"
    recursive = False

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.last: tuple[int, int] | None = None
        self.bound: int | None = None

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        if len(graph) < 3 or self.model is None:
            return False
        size = activation_sizes(self.model, ctx)
        before_order = graph.nodes
        before = peak_memory(graph, before_order, sizes=size).peak_bytes
        after, order = before, before_order
        for lifo in (False, True):
            cand = greedy_order(graph, size, lifo=lifo)
            if len(cand) == len(before_order):
                peak = peak_memory(graph, cand, sizes=size).peak_bytes
                if peak < after:
                    after, order = peak, cand
        self.last = (before, after)
        self.bound = lower_bound(graph, size)
        if after >= before:
            return False
        graph.reorder(order)
        log.info("schedule-memory: peak activation memory %d -> %d bytes", before, after)
        return True


def lower_bound(graph: Graph, size: dict[str, int], *, max_nodes: int = 2000) -> int:
    """A peak no topological order can beat.

    At node n, its inputs and outputs are live, and so is every value whose producer is an
    ancestor of n and one of whose readers is a descendant of n - in every order it is made
    before n and read after it. Reachability is kept as Python-int bitsets (O(n^2/64));
    graphs above ``max_nodes`` get the plain per-node bound.
    """
    nodes = graph.nodes
    idx = {n: k for k, n in enumerate(nodes)}

    def deps(n: Node) -> list[Value]:
        vs = [v for v in n.inputs if v is not None]
        return vs + (n.outer_inputs() if n.attrs else [])

    def local(n: Node) -> int:
        vs = {v.name for v in deps(n) if not v.is_const(allow_overridable=True)}
        vs |= {o.name for o in n.outputs if o.name}
        return sum(size.get(v, 0) for v in vs)

    if len(nodes) > max_nodes:
        return max((local(n) for n in nodes), default=0)
    anc = [0] * len(nodes)
    for k, n in enumerate(nodes):
        a = 0
        for v in deps(n):
            p = v.producer
            if p is not None and p in idx:
                j = idx[p]
                a |= anc[j] | (1 << j)
        anc[k] = a
    desc = [0] * len(nodes)
    for k in range(len(nodes) - 1, -1, -1):
        n = nodes[k]
        d = 0
        for o in n.outputs:
            for c in o.consumers():
                if c in idx:
                    j = idx[c]
                    d |= desc[j] | (1 << j)
        desc[k] = d
    # values that cross: producer index -> (size, readers bitmask)
    crossing = []
    for k, n in enumerate(nodes):
        for o in n.outputs:
            b = size.get(o.name, 0) if o.name else 0
            if b:
                readers = 0
                for c in o.consumers():
                    if c in idx:
                        readers |= 1 << idx[c]
                crossing.append((k, b, readers, o.name))
    best = 0
    for k, n in enumerate(nodes):
        mine = {v.name for v in deps(n)} | {o.name for o in n.outputs}
        total = local(n)
        for pk, b, readers, name in crossing:
            if name not in mine and (anc[k] >> pk) & 1 and readers & desc[k]:
                total += b
        best = max(best, total)
    return best
