"""``unroll-loops``: Loop (constant trip count) and Scan (static length) unrolled into straight-line
ONNX, checked under ONNX Runtime against the original, and refused - unchanged, with the reason -
where the iteration count is not fixed. The TVM compile test skips without the ``tvm`` extra."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.runtime import ort_session

RNG = np.random.default_rng(0)
F = TensorProto.FLOAT


def _vi(name, shape, t=F):
    return helper.make_tensor_value_info(name, t, shape)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _unroll(proto, **opts):
    m = graphopt.from_proto(proto)
    p = graphopt.get_pass("unroll-loops", **opts)
    graphopt.run_passes(m, [p, "dce"])
    out = graphopt.to_proto(m)
    onnx.checker.check_model(out, full_check=True)
    return out, p


def _ops(proto):
    return [n.op_type for n in proto.graph.node]


def _loop_model(*, trips=4, cond_in_body="passthrough", opset=17):
    """y = x; repeat M times: y = y * W + i (W an outer initializer, i the iteration number);
    also a scan output of y at each step and of a body-local constant sum."""
    body_nodes = [
        helper.make_node("Cast", ["i"], ["i_f"], to=F),
        helper.make_node("MatMul", ["y_in", "W"], ["yw"]),  # W: outer scope
        helper.make_node("Add", ["yw", "i_f"], ["y_out"]),
        helper.make_node("Add", ["y_out", "bias"], ["scan1"]),  # bias: body initializer
    ]
    if cond_in_body == "passthrough":
        body_nodes.append(helper.make_node("Identity", ["c_in"], ["c_out"]))
    else:  # data-dependent: stop when the sum gets large
        body_nodes += [helper.make_node("ReduceSum", ["y_out"], ["s"], keepdims=0),
                       helper.make_node("Less", ["s", "lim"], ["c_out"])]
    body_inits = [numpy_helper.from_array(np.full((1, 3), 0.5, np.float32), "bias")]
    if cond_in_body != "passthrough":
        body_inits.append(numpy_helper.from_array(np.array(1e6, np.float32), "lim"))
    body = helper.make_graph(body_nodes, "body",
                             [_vi("i", [], TensorProto.INT64), _vi("c_in", [], TensorProto.BOOL), _vi("y_in", [1, 3])],
                             [_vi("c_out", [], TensorProto.BOOL), _vi("y_out", [1, 3]), _vi("scan1", [1, 3])],
                             body_inits)
    inits = [numpy_helper.from_array(np.array(trips, np.int64), "M"),
             numpy_helper.from_array(np.array(True), "c0"),
             numpy_helper.from_array((RNG.standard_normal((3, 3)) * 0.5).astype(np.float32), "W")]
    return _model([helper.make_node("Loop", ["M", "c0", "x"], ["y", "ys"], body=body, name="loop0")],
                  [_vi("x", [1, 3])], [_vi("y", [1, 3]), _vi("ys", [trips, 1, 3])], inits, opset=opset)


@pytest.mark.parametrize("opset", [11, 17])  # Unsqueeze's axes: attribute before 13, input after
def test_loop_with_constant_trip_count_unrolled_exactly(opset):
    proto = _loop_model(trips=4, opset=opset)
    out, p = _unroll(proto)
    assert p.report["unrolled"] == {"Loop": 1} and not p.report["left"]
    assert "Loop" not in _ops(out)
    assert _ops(out).count("MatMul") == 4  # the body once per iteration
    x = RNG.standard_normal((1, 3)).astype(np.float32)
    want = ort_session(proto).run(None, {"x": x})
    got = ort_session(out).run(None, {"x": x})
    for w, g in zip(want, got, strict=True):
        assert w.shape == g.shape
        np.testing.assert_array_equal(w, g)


def test_loop_that_may_exit_early_is_left_with_the_reason():
    proto = _loop_model(cond_in_body="computed")
    out, p = _unroll(proto)
    assert "Loop" in _ops(out)
    assert "may exit early" in p.report["left"]["loop0"]
    x = RNG.standard_normal((1, 3)).astype(np.float32)
    np.testing.assert_array_equal(ort_session(proto).run(None, {"x": x})[0], ort_session(out).run(None, {"x": x})[0])


def test_loop_over_max_iterations_is_left():
    out, p = _unroll(_loop_model(trips=6), max_iterations=5)
    assert "Loop" in _ops(out)
    assert "max_iterations=5" in p.report["left"]["loop0"]


def _scan_model(*, in_axis=1, in_dir=1, out_axis=0, out_dir=1, seq=5):
    """A running sum (state) over x's axis ``in_axis``, plus a scan output state*2 per step."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_out"]),
         helper.make_node("Mul", ["s_out", "two"], ["o_t"])],
        "body", [_vi("s_in", [2, 3]), _vi("x_t", [2, 3])], [_vi("s_out", [2, 3]), _vi("o_t", [2, 3])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    xshape = [2, 3]
    xshape.insert(in_axis, seq)
    oshape = [2, 3]
    oshape.insert(out_axis if out_axis >= 0 else 3 + out_axis, seq)
    node = helper.make_node("Scan", ["s0", "x"], ["s", "o"], body=body, num_scan_inputs=1, name="scan0",
                            scan_input_axes=[in_axis], scan_input_directions=[in_dir],
                            scan_output_axes=[out_axis], scan_output_directions=[out_dir])
    return _model([node], [_vi("s0", [2, 3]), _vi("x", xshape)], [_vi("s", [2, 3]), _vi("o", oshape)]), xshape


@pytest.mark.parametrize("in_axis,in_dir,out_axis,out_dir",
                         [(0, 0, 0, 0), (1, 1, 0, 1), (2, 0, -1, 1), (1, 0, 2, 0)])
def test_scan_unrolled_exactly(in_axis, in_dir, out_axis, out_dir):
    proto, xshape = _scan_model(in_axis=in_axis, in_dir=in_dir, out_axis=out_axis, out_dir=out_dir)
    out, p = _unroll(proto)
    assert p.report["unrolled"] == {"Scan": 1}
    assert "Scan" not in _ops(out) and _ops(out).count("Add") == 5
    feeds = {"s0": RNG.standard_normal((2, 3)).astype(np.float32), "x": RNG.standard_normal(xshape).astype(np.float32)}
    for w, g in zip(ort_session(proto).run(None, feeds), ort_session(out).run(None, feeds), strict=True):
        assert w.shape == g.shape
        np.testing.assert_array_equal(w, g)


def test_scan_with_unknown_length_is_left():
    proto, _ = _scan_model()
    proto.graph.input[1].type.tensor_type.shape.dim[1].dim_param = "T"
    out, p = _unroll(proto)
    assert "Scan" in _ops(out)
    assert "not static" in p.report["left"]["scan0"]


def test_compile_unrolls_loop_for_tvm():
    pytest.importorskip("tvm")
    from graphopt.backend import compile as tvm_compile

    proto = _loop_model(trips=3)
    cm = tvm_compile(graphopt.from_proto(proto), "host", progress=False, build_cache=False)
    x = RNG.standard_normal((1, 3)).astype(np.float32)
    want = ort_session(proto).run(None, {"x": x})
    got = cm.run({"x": x})
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_compile_names_a_loop_it_cannot_unroll():
    pytest.importorskip("tvm")
    from graphopt.backend import prepare
    from graphopt.errors import CompileError

    with pytest.raises(CompileError, match=r"loop0.*op Loop is not supported.*may exit early"):
        prepare(graphopt.from_proto(_loop_model(cond_in_body="computed")))
