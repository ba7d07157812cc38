"""networkx views of a graph, for graph algorithms (dominators, reachability, scheduling)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from graphopt.ir.core import Graph, Node

if TYPE_CHECKING:  # networkx is imported when a view is asked for, not with graphopt
    import networkx as nx


def to_networkx(graph: Graph, *, include_io: bool = False) -> nx.MultiDiGraph:
    """A ``MultiDiGraph`` whose nodes are :class:`Node` objects and whose edges carry the
    :class:`~graphopt.ir.Value` they stand for (``data['value']``, ``data['index']``).

    With ``include_io=True`` graph inputs and outputs appear as string nodes ``"input:NAME"``
    and ``"output:NAME"``. Reads from inside subgraphs count as edges to the owning node.
    """
    import networkx as nx

    g = nx.MultiDiGraph()
    for n in graph.iter_nodes():
        g.add_node(n, op_type=n.op_type, name=n.name)
    for n in graph.iter_nodes():
        deps = [(v, i) for i, v in enumerate(n.inputs) if v is not None]
        if n.attrs:
            deps += [(v, -1) for v in n.outer_inputs()]
        for v, i in deps:
            p = v.producer
            if p is not None and p.graph is graph:
                g.add_edge(p, n, value=v, index=i)
            elif include_io and v.is_graph_input() and v.graph is graph:
                g.add_edge(f"input:{v.name}", n, value=v, index=i)
    if include_io:
        for o in graph.outputs:
            if o.producer is not None and o.producer.graph is graph:
                g.add_edge(o.producer, f"output:{o.name}", value=o, index=0)
    return g


def dominators(graph: Graph) -> dict[Node, Node]:
    """Immediate dominator of each node reachable from the graph inputs (a virtual source)."""
    import networkx as nx

    g = nx.DiGraph(to_networkx(graph))
    src = "__source__"
    g.add_node(src)
    for n in graph.iter_nodes():
        if g.in_degree(n) == 0:
            g.add_edge(src, n)
    idom = nx.immediate_dominators(g, src)
    return {k: v for k, v in idom.items() if k != src and v != src and isinstance(k, Node)}
