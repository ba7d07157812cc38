"""Lowerings for TVM found by the real-model matrix: OneHot (magika_v1) and ORT's
DynamicQuantizeLinear rounding (ddddocr_ocr_int8).

ONNX Runtime equivalence always runs; the TVM parts skip when the ``tvm`` extra is missing and
compile only tiny models.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.runtime import ort_session


def _ort(model, feed):
    proto = graphopt.to_proto(model) if isinstance(model, graphopt.Model) else model
    return ort_session(proto).run(None, feed)


def _one_hot_model(idx_type: int, depth: np.ndarray, values: np.ndarray, axis: int, rank: int, opset: int = 13):
    shape = [3, 4][:rank] if rank <= 2 else [2, 3, 4]
    x = helper.make_tensor_value_info("x", idx_type, shape)
    out_shape = list(shape)
    out_shape.insert(axis % (len(shape) + 1), int(np.ravel(depth)[0]))
    y = helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(values.dtype), out_shape)
    inits = [onnx.numpy_helper.from_array(depth, "depth"), onnx.numpy_helper.from_array(values, "values")]
    node = helper.make_node("OneHot", ["x", "depth", "values"], ["y"], axis=axis, name="oh")
    g = helper.make_graph([node], "oh", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _run_lower_one_hot(proto):
    import passes.lower  # noqa: F401 - registers the passes

    m = graphopt.from_proto(proto)
    p = graphopt.get_pass("lower-one-hot")
    graphopt.run_passes(m, [p], graphopt.PassContext())
    return m, p


ONE_HOT_CASES = [
    # (indices dtype, depth, values, axis, rank, opset): tf2onnx's int32[1] depth, float indices and
    # depth, a negative axis, opset 11 (Unsqueeze axes as an attribute)
    (TensorProto.INT32, np.array([7], np.int32), np.array([0, 1], np.float32), -1, 2, 13),
    (TensorProto.INT64, np.array(5, np.int64), np.array([-2, 3], np.float32), 0, 2, 13),
    (TensorProto.FLOAT, np.array([6.7], np.float32), np.array([0, 1], np.float32), 1, 2, 13),
    (TensorProto.INT64, np.array(4, np.int64), np.array([0, 9], np.int64), -2, 3, 13),
    (TensorProto.INT32, np.array([5], np.int32), np.array([0, 1], np.float32), 1, 2, 11),
]


@pytest.mark.parametrize("case", ONE_HOT_CASES, ids=lambda c: f"axis{c[3]}-rank{c[4]}-{c[1].dtype}-opset{c[5]}")
def test_lower_one_hot_exact_under_ort(case) -> None:
    idx_type, depth, values, axis, rank, opset = case
    proto = _one_hot_model(idx_type, depth, values, axis, rank, opset)
    shape = [3, 4][:rank] if rank <= 2 else [2, 3, 4]
    rng = np.random.default_rng(0)
    d = int(np.ravel(depth)[0])
    # in range, negative (wrapped), out of range both ways; float indices also get fractions
    raw = rng.integers(-d - 2, d + 2, size=shape)
    x = raw.astype(helper.tensor_dtype_to_np_dtype(idx_type))
    if idx_type == TensorProto.FLOAT:
        x[0, :3] += np.array([0.5, -0.5, 0.9], np.float32)  # ORT truncates, then wraps negatives
    m, p = _run_lower_one_hot(proto)
    assert p.report["rewritten"] == 1 and not p.report["left"]
    assert not any(n.op_type == "OneHot" for n in m.graph)
    out = graphopt.to_proto(m)
    onnx.checker.check_model(out, full_check=True)
    ref, got = _ort(proto, {"x": x})[0], _ort(out, {"x": x})[0]
    assert got.dtype == ref.dtype and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


def test_lower_one_hot_leaves_runtime_depth() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.INT64, [3])
    dep = helper.make_tensor_value_info("depth", TensorProto.INT64, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, "d"])
    vals = onnx.numpy_helper.from_array(np.array([0, 1], np.float32), "values")
    g = helper.make_graph([helper.make_node("OneHot", ["x", "depth", "values"], ["y"], name="oh")], "g",
                          [x, dep], [y], [vals])
    m, p = _run_lower_one_hot(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    assert p.report["rewritten"] == 0 and "run time" in p.report["left"]["oh"]
    assert [n.op_type for n in m.graph] == ["OneHot"]


def test_tvm_compiles_tf2onnx_one_hot() -> None:
    pytest.importorskip("tvm", reason="the tvm extra is not installed")
    from graphopt.backend import compile as tvm_compile

    # tf2onnx's form (magika_v1): int32 indices, depth int32[1], float32 values, then a float32 op
    # (TVM's own converter fails on the depth, and makes float64 that the Add refuses). Indices
    # come in as int32: a float->int Cast fused into this kernel makes TVM's build take minutes.
    x = helper.make_tensor_value_info("x", TensorProto.INT32, [2, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 7])
    inits = [onnx.numpy_helper.from_array(np.array([7], np.int32), "depth"),
             onnx.numpy_helper.from_array(np.array([0, 1], np.float32), "values"),
             onnx.numpy_helper.from_array(np.arange(7, dtype=np.float32), "w")]
    nodes = [helper.make_node("OneHot", ["x", "depth", "values"], ["oh"], axis=-1, name="oh"),
             helper.make_node("Add", ["oh", "w"], ["y"])]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    feed = {"x": np.array([[0, 1, 6, 3, -2], [5, 4, 4, -7, 9]], np.int32)}
    from graphopt.backend.compiler import import_relax
    from graphopt.errors import CompileError

    with pytest.raises(CompileError, match="one_hot"):  # what the compile path met before lower-one-hot
        import_relax(graphopt.from_proto(proto))
    compiled = tvm_compile(graphopt.from_proto(proto), "host", progress=False)
    np.testing.assert_array_equal(compiled.run(feed)[0], _ort(proto, feed)[0])


def test_cli_frontend_failure_prints_one_line(tmp_path) -> None:
    """TVM's frontend prints to stdout and its C++ destructors warn on stderr after a failed
    conversion; the CLI keeps its own error line the only output."""
    import subprocess
    import sys

    pytest.importorskip("tvm", reason="the tvm extra is not installed")
    x = helper.make_tensor_value_info("x", TensorProto.INT64, [3])
    dep = helper.make_tensor_value_info("depth", TensorProto.INT64, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, "d"])
    vals = onnx.numpy_helper.from_array(np.array([0, 1], np.float32), "values")
    g = helper.make_graph([helper.make_node("OneHot", ["x", "depth", "values"], ["y"], name="oh")], "g",
                          [x, dep], [y], [vals])
    src = tmp_path / "rt.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), src)
    out = tmp_path / "rt.so"
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "compile", "-q", "-o", str(out), str(src)], check=False,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: ") and "constant depth" in lines[0], r.stderr
    assert not out.exists()


# -- DynamicQuantizeLinear: TVM rounds as ORT does -------------------------------------------------


def _dql_model(n: int):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])
    outs = [helper.make_tensor_value_info("y", TensorProto.UINT8, [n]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("z", TensorProto.UINT8, [])]
    g = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])], "g", [x], outs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_tvm_dynamic_quantize_rounds_half_to_even() -> None:
    """ORT rounds x/scale and the zero point half to even; TVM's converter (relax quantize, round)
    must too. Scale 1 makes every x.5 an exact tie (half away from zero would give 1, 3, 5, 101,
    255 and a zero point of 3)."""
    pytest.importorskip("tvm", reason="the tvm extra is not installed")
    from graphopt.backend import compile as tvm_compile

    proto = _dql_model(8)
    compiled = tvm_compile(graphopt.from_proto(proto), "host", progress=False)
    for xv in ([0.5, 1.5, 2.5, 3.5, 100.5, 253.5, 254.5, 255.0],   # min 0, max 255: scale 1, zp 0
               [-2.5, 0.5, 1.5, 2.5, 10.5, 100.5, 200.0, 252.5]):  # scale 1, zero point 2.5 -> 2
        feed = {"x": np.array(xv, np.float32)}
        ref, got = _ort(proto, feed), compiled.run(feed)
        for r, g in zip(ref, got, strict=True):
            np.testing.assert_array_equal(np.asarray(g), r)
    rng = np.random.default_rng(0)
    proto = _dql_model(4096)
    compiled = tvm_compile(graphopt.from_proto(proto), "host", progress=False)
    for _ in range(20):
        feed = {"x": (rng.standard_normal(4096) * rng.uniform(0.01, 10) + rng.uniform(-3, 3)).astype(np.float32)}
        for r, g in zip(_ort(proto, feed), compiled.run(feed), strict=True):
            np.testing.assert_array_equal(np.asarray(g), r)
