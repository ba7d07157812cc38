"""Numerics: input generation, shape hints, comparison metrics, calibration readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import make_model, vi
from onnx import TensorProto, helper

import graphopt
from graphopt.errors import InputSpecError
from graphopt.runtime import compare, load_calibration, make_inputs, parse_input_shapes, resolve_input_shapes


def _two_inputs() -> graphopt.Model:
    return graphopt.from_proto(make_model(
        [helper.make_node("Add", ["a", "b"], ["y"], name="add")],
        [vi("a", ["batch", 3, "h"]), vi("b", ["batch", 3, "h"])], [vi("y", ["batch", 3, "h"])]))


def test_symbolic_dims_resolve_consistently_from_hints() -> None:
    m = _two_inputs()
    shapes = resolve_input_shapes(m, parse_input_shapes(["a:4,3,7"]))
    assert shapes == {"a": (4, 3, 7), "b": (4, 3, 7)}
    assert resolve_input_shapes(m) == {"a": (1, 3, 1), "b": (1, 3, 1)}
    feeds = make_inputs(m, {"a": [2, 3, 5]})
    assert feeds["b"].shape == (2, 3, 5) and feeds["a"].dtype == np.float32
    out = graphopt.run_ort(m, feeds)["y"]
    assert np.allclose(out, feeds["a"] + feeds["b"])


@pytest.mark.parametrize("spec", ["a", "a:1,x", "zzz:1,3,4", "a:1,3", "a:2,4,5", ":1"])
def test_bad_shape_specs(spec: str) -> None:
    with pytest.raises(InputSpecError):
        resolve_input_shapes(_two_inputs(), parse_input_shapes([spec]))


def test_compare_metrics() -> None:
    ref = {"y": np.array([[0.1, 0.9, 0.0], [0.7, 0.2, 0.1]], np.float32)}
    same = compare(ref, {"y": ref["y"].copy()})
    assert same.ok and same.max_abs == 0 and same.cosine == pytest.approx(1.0) and same.top1 == 1.0
    off = {"y": ref["y"] + np.array([[0, 0, 1.0], [0, 0, 0]], np.float32)}
    c = compare(ref, off)
    assert not c.ok and c.max_abs == pytest.approx(1.0) and c.top1 == 0.5 and c.cosine < 1
    assert not compare(ref, {"y": ref["y"][:1]}).ok  # shape mismatch
    nan = {"y": np.array([np.nan, 1], np.float32)}
    assert compare(nan, {"y": np.array([np.nan, 1], np.float32)}).ok
    assert not compare(nan, {"y": np.array([0, 1], np.float32)}).ok


def _img_model() -> graphopt.Model:
    return graphopt.from_proto(make_model([helper.make_node("Relu", ["input"], ["y"], name="r")],
                                          [vi("input", ["n", 1, 8, 8])], [vi("y", ["n", 1, 8, 8])]))


def test_calibration_sources(tmp_path: Path) -> None:
    m = _img_model()
    x = np.random.default_rng(0).random((10, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    s = load_calibration(tmp_path / "calib.npz", m)
    assert len(s) == 10 and s[0]["input"].shape == (1, 1, 8, 8)
    d = tmp_path / "dir"
    d.mkdir()
    for k in range(3):
        np.savez(d / f"{k}.npz", input=x[k])
    assert len(load_calibration(d, m)) == 3
    it = load_calibration(({"input": x[k:k + 1]} for k in range(4)), m)
    assert len(it) == 4 and it[0]["input"].shape == (1, 1, 8, 8)
    # float64 data is cast to the model's float32
    assert load_calibration([{"input": x[:1].astype(np.float64)}], m)[0]["input"].dtype == np.float32


def test_calibration_errors(tmp_path: Path) -> None:
    m = _img_model()
    x = np.zeros((2, 1, 8, 8), np.float32)
    with pytest.raises(InputSpecError, match="empty"):
        load_calibration([], m)
    with pytest.raises(InputSpecError, match="names do not match"):
        load_calibration([{"image": x}], m)
    with pytest.raises(InputSpecError, match="dim 2"):
        load_calibration([{"input": np.zeros((1, 1, 9, 8), np.float32)}], m)
    with pytest.raises(InputSpecError, match="rank"):
        load_calibration([{"input": np.zeros((8,), np.float32)}], m)
    with pytest.raises(InputSpecError, match="dtype"):
        load_calibration([{"input": np.zeros((1, 1, 8, 8), np.bool_)}], m)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputSpecError, match="NaN"):
        load_calibration([{"input": bad}], m)
    with pytest.raises(InputSpecError, match="does not exist"):
        load_calibration(tmp_path / "nope.npz", m)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputSpecError, match="no .npz"):
        load_calibration(tmp_path / "empty", m)
    np.savez(tmp_path / "uneven.npz", input=x, other=np.zeros(3))
    with pytest.raises(InputSpecError, match="sample counts"):
        load_calibration(tmp_path / "uneven.npz", m)


def test_make_inputs_dtypes() -> None:
    mp = make_model([helper.make_node("Cast", ["i"], ["y"], to=TensorProto.FLOAT, name="c")],
                    [vi("i", [3], TensorProto.INT64)], [vi("y", [3])])
    feeds = make_inputs(graphopt.from_proto(mp))
    assert feeds["i"].dtype == np.int64 and feeds["i"].min() >= 0


def test_interleaved_latency_times_every_session() -> None:
    from graphopt.runtime import interleaved_latency, ort_session

    small = graphopt.from_proto(make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [8])], [vi("y", [8])]))
    big = graphopt.from_proto(make_model([helper.make_node("MatMul", ["x", "x"], ["y"])],
                                         [vi("x", [256, 256])], [vi("y", [256, 256])]))
    sessions = {"small": ort_session(small), "big": ort_session(big)}
    feeds_small = {"x": np.ones(8, np.float32)}
    lat = interleaved_latency({"small": sessions["small"]}, feeds_small, rounds=5)
    assert set(lat) == {"small"} and lat["small"] > 0
    x = np.ones((256, 256), np.float32)
    lat2 = interleaved_latency({"big": sessions["big"]}, {"x": x}, rounds=5)
    assert lat2["big"] > lat["small"]  # a 256^3 matmul takes longer than an 8-element Relu


def test_intermediate_session_brings_if_branch_outputs_out_intact() -> None:
    """A value that is already an If branch's output, brought out again for calibration, goes
    through an Identity: listed twice among the branch outputs, ORT returned a freed buffer for
    the If's own output on repeated runs (garbage, sometimes NaN: the quantizer's one flaky test)."""
    import onnx

    from graphopt.runtime import intermediate_session

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w_in"], ["t0"]), helper.make_node("Relu", ["t0"], ["t"])],
                               "then", [], [vi("t", [1, 8])], [onnx.numpy_helper.from_array(w, "w_in")])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [vi("e", [1, 8])])
    m = graphopt.from_proto(make_model(
        [helper.make_node("Identity", ["x0"], ["x"]),
         helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="if"),
         helper.make_node("Tanh", ["y"], ["z"])],
        [vi("x0", [1, 8]), vi("c", [], TensorProto.BOOL)], [vi("z", [1, 8])]))
    sess, outs = intermediate_session(m, ["t", "t0", "e", "y"])
    feeds = [{"x0": rng.standard_normal((1, 8)).astype(np.float32), "c": np.array(k % 2 == 0)} for k in range(6)]
    for _ in range(5):
        for f in feeds:
            got = dict(zip(outs, sess.run(None, f), strict=True))
            x = f["x0"]
            want = np.maximum(x @ w, 0) if f["c"] else -x
            np.testing.assert_allclose(got["y"], want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got["t" if f["c"] else "e"], want, rtol=1e-5, atol=1e-6)
            assert got["e" if f["c"] else "t"].size == 0  # the branch not taken contributes nothing
