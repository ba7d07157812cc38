"""Built-in passes on real models: numerically equivalent under ONNX Runtime, valid ONNX
(full checker), and they change what they must."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import backend_model_dirs, make_model, vi
from onnx import helper

import graphopt
from graphopt.runtime import compare, make_inputs


def _check_equivalent(orig: onnx.ModelProto, m: graphopt.Model, feeds: dict, rtol=1e-4, atol=1e-5) -> None:
    out = graphopt.to_proto(m)
    onnx.checker.check_model(out, full_check=True)
    c = compare(graphopt.run_ort(orig, feeds), graphopt.run_ort(out, feeds), rtol=rtol, atol=atol)
    assert c.ok, c.problems


def test_default_pipeline_on_example_cnn(example_path: Path) -> None:
    orig = onnx.load(str(example_path))
    m = graphopt.load(example_path)
    graphopt.optimize(m)
    ops = [n.op_type for n in m.graph]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 3
    x = np.load(Path(__file__).parent / "fixtures" / "digits_test.npz")
    feeds = {"input": x["x"][:64]}
    _check_equivalent(orig, m, feeds)
    # accuracy is unchanged on the held-out digits
    pred = graphopt.run_ort(m, {"input": x["x"]})["logits"].argmax(1)
    assert (pred == x["y"]).mean() > 0.98


def test_conv_bn_without_bias_and_training_mode_refusal() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    p = [rng.random(4).astype(np.float32) + 0.5 for _ in range(4)]
    mp = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                     helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], epsilon=1e-3, name="bn")],
                    [vi("x", ["n", 2, 6, 6])], [vi("y", ["n", 4, 4, 4])],
                    inits=[("w", w), ("s", p[0]), ("b", p[1]), ("m", p[2]), ("v", p[3])])
    m = graphopt.from_proto(mp)
    graphopt.run_passes(m, ["fuse-conv-bn", "dce"])
    assert [n.op_type for n in m.graph] == ["Conv"] and len(m.graph.nodes[0].inputs) == 3
    assert set(m.graph.initializers) == {n.name for n in m.graph.nodes[0].inputs[1:]}
    _check_equivalent(mp, m, make_inputs(m, {"x": [2, 2, 6, 6]}))
    # a Conv output read twice cannot be folded: the pass leaves it and says why
    mp2 = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                      helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn"),
                      helper.make_node("Relu", ["c"], ["z"], name="relu")],
                     [vi("x", [1, 2, 6, 6])], [vi("y", [1, 4, 4, 4]), vi("z", [1, 4, 4, 4])],
                     inits=[("w", w), ("s", p[0]), ("b", p[1]), ("m", p[2]), ("v", p[3])])
    m2 = graphopt.from_proto(mp2)
    ps = graphopt.get_pass("fuse-conv-bn")
    assert not graphopt.run_passes(m2, [ps])
    assert "cannot take the fusion" in ps.explain(m2.graph.nodes[1])


def test_identity_kept_when_it_separates_input_and_output() -> None:
    mp = make_model([helper.make_node("Identity", ["x"], ["y"], name="i"),
                     helper.make_node("Identity", ["x"], ["t"], name="j"), helper.make_node("Neg", ["t"], ["z"], name="n")],
                    [vi("x", [2])], [vi("y", [2]), vi("z", [2])])
    m = graphopt.from_proto(mp)
    graphopt.run_passes(m, "cleanup")
    assert [n.name for n in m.graph] == ["i", "n"]
    _check_equivalent(mp, m, {"x": np.array([1.0, -2.0], np.float32)})


def test_dce_removes_dead_nodes_initializers_and_functions() -> None:
    fn = helper.make_function("f", "Unused", ["a"], ["b"], [helper.make_node("Neg", ["a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    mp = make_model([helper.make_node("Relu", ["x"], ["y"], name="r"), helper.make_node("Add", ["x", "w"], ["dead"], name="d")],
                    [vi("x", [2])], [vi("y", [2])], inits=[("w", np.ones(2, np.float32))], functions=[fn])
    mp.opset_import.append(helper.make_opsetid("f", 1))
    m = graphopt.from_proto(mp)
    graphopt.run_passes(m, "dce")
    assert [n.name for n in m.graph] == ["r"] and not m.graph.initializers and not m.functions
    _check_equivalent(mp, m, {"x": np.array([1.0, -2.0], np.float32)})


def _run_any(mp: onnx.ModelProto, feeds: dict) -> dict:
    """ORT, or onnx's reference evaluator for opsets ORT 1.x no longer runs."""
    try:
        return graphopt.run_ort(mp, feeds)
    except graphopt.RuntimeBackendError:
        from onnx.reference import ReferenceEvaluator

        ref = ReferenceEvaluator(mp)
        return dict(zip(ref.output_names, ref.run(None, feeds), strict=True))


@pytest.mark.parametrize("d", [d for d in backend_model_dirs() if d.parent.name != "simple"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_default_pipeline_is_exact_on_backend_models(d: Path) -> None:
    path = d / "model.onnx"
    orig = onnx.load(str(path))
    m = graphopt.load(path)
    graphopt.optimize(m)
    m.verify()
    ds = sorted(d.glob("test_data_set_*"))[0]
    ins = [onnx.numpy_helper.to_array(onnx.load_tensor(str(p))) for p in sorted(ds.glob("input_*.pb"))]
    names = [i.name for i in orig.graph.input if i.name not in {t.name for t in orig.graph.initializer}]
    feeds = dict(zip(names, ins, strict=False))
    out = graphopt.to_proto(m)
    onnx.checker.check_model(out, full_check=True)
    c = compare(_run_any(orig, feeds), _run_any(out, feeds), rtol=1e-4, atol=1e-5)
    assert c.ok, c.problems
