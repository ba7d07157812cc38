"""IR invariants: use-def chains kept by the mutation API, verify(), toposort, subgraphs."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_model, vi
from onnx import helper

import graphopt
from graphopt import Graph, Model, Node, VerificationError
from graphopt.errors import InvalidModelError


def _chain() -> Model:
    mp = make_model([helper.make_node("Relu", ["x"], ["a"], name="r"), helper.make_node("Neg", ["a"], ["b"], name="n"),
                     helper.make_node("Add", ["a", "b"], ["y"], name="add")], [vi("x", [4])], [vi("y", [4])])
    return graphopt.from_proto(mp)


def test_use_def_chains_follow_mutations() -> None:
    m = _chain()
    g = m.graph
    r, n, add = g.nodes
    a = r.output(0)
    assert a.producer is r and {(u.name, i) for u, i in a.uses} == {("n", 0), ("add", 0)}
    sig = g.make_node("Sigmoid", [g.inputs[0]], name="sig", before=r)
    g.replace_all_uses_with(a, sig.output(0))
    assert a.num_uses == 0 and sig.output(0).num_uses == 2
    assert n.input(0) is sig.output(0) and add.input(0) is sig.output(0)
    g.remove(r)
    assert g.inputs[0].consumers() == [sig]
    g.verify()
    with pytest.raises(ValueError):
        g.remove(sig)  # still used
    x = np.arange(4, dtype=np.float32) - 2
    y = graphopt.run_ort(m, {"x": x})["y"]
    s = 1 / (1 + np.exp(-x))
    assert np.allclose(y, s - s)


def test_insert_after_and_order() -> None:
    m = _chain()
    g = m.graph
    r = g.nodes[0]
    new = Node("Identity", [r.output(0)], 1, name="id1")
    g.insert_after(r, new)
    assert [n.name for n in g] == ["r", "id1", "n", "add"]
    assert new.output(0).name and new.output(0).graph is g
    assert len(g) == 4


def test_replace_graph_output_keeps_interface_name() -> None:
    m = _chain()
    g = m.graph
    add = g.nodes[2]
    neg = g.make_node("Neg", [add.output(0)], name="tail")
    g.replace_all_uses_with(add.output(0), neg.output(0))
    assert add.output(0).num_uses == 0  # the Neg's own use was rewired too, so fix it back
    neg.set_input(0, add.output(0))
    assert g.outputs[0] is neg.output(0) and g.outputs[0].name == "y"
    g.verify()


def test_verify_catches_broken_invariants() -> None:
    m = _chain()
    g = m.graph
    g.nodes[1].output(0).name = "a"  # duplicate name
    with pytest.raises(VerificationError, match="more than once"):
        g.verify()
    m = _chain()
    g = m.graph
    r, n, add = g.nodes
    g.reorder([n, r, add])  # use before definition
    with pytest.raises(VerificationError, match="not defined before"):
        g.verify()
    g.toposort()
    assert [x.name for x in g] == ["r", "n", "add"]
    g.verify()
    m = _chain()
    m.graph.nodes[1]._inputs[0] = None  # a use list that no longer matches (stale use)
    with pytest.raises(VerificationError, match="stale"):
        m.graph.verify()


def test_toposort_reports_cycle() -> None:
    m = _chain()
    g = m.graph
    r, n, add = g.nodes
    r.set_input(0, n.output(0))
    with pytest.raises(InvalidModelError, match="cycle"):
        g.toposort()


def test_fresh_names_never_collide() -> None:
    m = _chain()
    names = {m.graph.fresh_name("a") for _ in range(5)}
    assert len(names) == 5 and "a" not in names and "x" not in names


def test_subgraph_outer_scope_uses_and_removal() -> None:
    body = helper.make_graph([helper.make_node("Add", ["x", "w"], ["o"], name="inner")], "then", [], [vi("o", [2])])
    other = helper.make_graph([helper.make_node("Sub", ["x", "w"], ["o2"], name="inner2")], "else", [], [vi("o2", [2])])
    mp = make_model([helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other, name="if")],
                    [vi("c", [], 9), vi("x", [2])], [vi("y", [2])], inits=[("w", np.ones(2, np.float32))])
    m = graphopt.from_proto(mp)
    g = m.graph
    ifn = g.nodes[0]
    x = g.inputs[1]
    w = g.initializers["w"]
    assert len(x.uses) == 2 and {u.name for u, _ in w.uses} == {"inner", "inner2"}
    assert {v.name for v in ifn.outer_inputs()} == {"x", "w"}
    sub = ifn.attr("then_branch")
    assert sub.parent is ifn and sub.root is g
    assert list(g.all_nodes())[0] is ifn and len(list(g.all_nodes())) == 3
    m.verify()
    # removing the If drops the inner uses of outer values
    g.outputs.clear()
    g.remove(ifn)
    assert x.num_uses == 0 and w.num_uses == 0


def test_build_model_from_scratch_runs() -> None:
    g = Graph("scratch")
    x = g.add_input("x", np.float32, ["n", 3])
    w = g.add_initializer("w", np.full((3, 2), 0.5, np.float32))
    y = g.make_node("MatMul", [x, w], name="mm").output(0)
    y.dtype, y.shape = 1, ("n", 2)
    g.outputs.append(y)
    m = Model(g, ir_version=9, opset_imports={"": 17})
    m.verify()
    out = graphopt.run_ort(m, {"x": np.ones((2, 3), np.float32)})
    assert np.allclose(out[y.name], 1.5)


def test_model_copy_is_deep_and_exact() -> None:
    """Model.copy: same serialized model, independent graph objects, subgraph reads of outer values
    rebound to the copy's values, constant data not shared mutably, name scope kept."""
    body = helper.make_graph([helper.make_node("Add", ["x", "w"], ["o"], name="inner")], "then", [], [vi("o", [2])])
    other = helper.make_graph([helper.make_node("Sub", ["x", "w"], ["o2"], name="inner2")], "else", [], [vi("o2", [2])])
    mp = make_model([helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other, name="if")],
                    [vi("c", [], 9), vi("x", [2])], [vi("y", [2])], inits=[("w", np.ones(2, np.float32))])
    m = graphopt.from_proto(mp)
    m.graph.add_initializer("extra", np.arange(3, dtype=np.float32))  # in-memory data
    c = m.copy()
    c.verify()
    ser = lambda mm: graphopt.to_proto(mm).SerializeToString(deterministic=True)  # noqa: E731
    assert ser(c) == ser(m)
    ifc = c.graph.nodes[0]
    assert ifc is not m.graph.nodes[0] and ifc.attr("then_branch").parent is ifc
    xc, wc = c.graph.inputs[1], c.graph.initializers["w"]
    assert {u.name for u, _ in wc.uses} == {"inner", "inner2"} and len(xc.uses) == 2
    assert m.graph.initializers["w"].num_uses == 2  # the original's uses are its own
    c.graph.initializers["extra"].const_value()[0] = 42.0
    assert m.graph.initializers["extra"].const_value()[0] == 0.0
    assert c.graph.fresh_name("extra") != "extra"  # names taken in the original stay taken
    c.graph.outputs.clear()
    c.graph.remove(ifc)
    assert len(m.graph) == 1 and m.graph.inputs[1].num_uses == 2
