"""Analyses: shape inference completion, cost model, liveness, networkx views."""

from __future__ import annotations

import numpy as np
from helpers import make_model, vi
from onnx import helper

import graphopt
from graphopt.analysis import dominators, infer_shapes, model_stats, node_cost, peak_memory, to_networkx


def test_shape_inference_completes_exporter_reshape_chain(example_path) -> None:
    m = graphopt.load(example_path)
    reshape = [n for n in m.graph if n.op_type == "Reshape"][0]
    infer_shapes(m, {"input": [5, 1, 8, 8]})
    assert reshape.output(0).shape == (5, 512)  # onnx alone leaves this unknown
    assert m.graph.outputs[0].shape == (5, 10)
    assert all(o.static_shape() is not None for n in m.graph for o in n.outputs)


def test_shape_rules_for_unknown_custom_op() -> None:
    mp = make_model([helper.make_node("Relu", ["x"], ["a"], name="r"),
                     helper.make_node("Mystery", ["a"], ["b"], domain="acme", name="m"),
                     helper.make_node("Add", ["a", "x"], ["y"], name="add")],
                    [vi("x", [2, 3])], [vi("y", [2, 3])])
    mp.opset_import.append(helper.make_opsetid("acme", 1))
    m = graphopt.from_proto(mp)
    infer_shapes(m)
    assert m.graph.nodes[0].output(0).shape == (2, 3)
    assert m.graph.nodes[1].output(0).shape is None  # unknown op: left unknown, not guessed


def test_shape_probe_fills_what_static_inference_cannot() -> None:
    # NonZero's output length depends on data: static inference cannot know it
    mp = make_model([helper.make_node("NonZero", ["x"], ["nz"], name="nz"),
                     helper.make_node("Transpose", ["nz"], ["y"], name="t")],
                    [vi("x", [4])], [vi("y", None, 7)])
    m = graphopt.from_proto(mp, check=False)
    infer_shapes(m)
    assert m.graph.nodes[0].output(0).static_shape() is None
    infer_shapes(m, probe=True)
    assert m.graph.nodes[0].output(0).static_shape() is not None


def test_cost_model_conv_and_gemm_flops() -> None:
    w = np.zeros((16, 3, 3, 3), np.float32)
    mp = make_model([helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                     helper.make_node("Flatten", ["c"], ["f"], name="fl"),
                     helper.make_node("Gemm", ["f", "g", "gb"], ["y"], transB=1, name="gemm")],
                    [vi("x", [1, 3, 8, 8])], [vi("y", [1, 10])],
                    inits=[("w", w), ("b", np.zeros(16, np.float32)), ("g", np.zeros((10, 1024), np.float32)),
                           ("gb", np.zeros(10, np.float32))])
    m = graphopt.from_proto(mp)
    infer_shapes(m)
    conv, _, gemm = m.graph.nodes
    out = 16 * 8 * 8
    assert node_cost(conv).flops == 2 * out * 27 + out
    assert node_cost(conv).params == 16 * 27 + 16
    assert node_cost(gemm).flops == 2 * 10 * 1024 + 10
    st = model_stats(m)
    assert st.params == w.size + 16 + 10240 + 10 and st.compute_nodes == 3 and not st.unknown


def test_peak_memory_depends_on_order() -> None:
    # x -> a (big) -> small ; x -> b (big) -> small2 ; concat small, small2
    nodes = [helper.make_node("Tile", ["x", "rep"], ["a"], name="ta"),
             helper.make_node("Tile", ["x", "rep"], ["b"], name="tb"),
             helper.make_node("ReduceSum", ["a"], ["sa"], keepdims=0, name="ra"),
             helper.make_node("ReduceSum", ["b"], ["sb"], keepdims=0, name="rb"),
             helper.make_node("Add", ["sa", "sb"], ["y"], name="add")]
    mp = make_model(nodes, [vi("x", [1000])], [vi("y", [])], inits=[("rep", np.array([100], np.int64))])
    m = graphopt.from_proto(mp)
    infer_shapes(m)
    ta, tb, ra, rb, add = m.graph.nodes
    bad = peak_memory(m.graph, [ta, tb, ra, rb, add]).peak_bytes
    good = peak_memory(m.graph, [ta, ra, tb, rb, add]).peak_bytes
    assert bad >= 2 * 400_000 and good < bad * 0.6


def test_networkx_view_and_dominators() -> None:
    mp = make_model([helper.make_node("Relu", ["x"], ["a"], name="r"), helper.make_node("Neg", ["a"], ["b"], name="n1"),
                     helper.make_node("Abs", ["a"], ["c"], name="n2"), helper.make_node("Add", ["b", "c"], ["y"], name="add")],
                    [vi("x", [2])], [vi("y", [2])])
    m = graphopt.from_proto(mp)
    g = to_networkx(m.graph)
    r, n1, n2, add = m.graph.nodes
    assert g.number_of_nodes() == 4 and g.number_of_edges() == 4
    assert g.has_edge(r, n1) and g.has_edge(n2, add)
    idom = dominators(m.graph)
    assert idom[add] is r and idom[n1] is r
