"""ORT's dynamic quantization (``DynamicQuantizeLinear -> ConvInteger/MatMulInteger``,
``DynamicQuantizeLSTM``) lowered by ``lower-integer`` into the integer products TVM compiles:
bit-exact with ONNX Runtime, no float -> int32 ``Cast`` left (TVM's wrap-around emulation of it
took minutes to build per conv epilogue), ``MatMulInteger`` in its uint8 x int8 form, and under
TVM an integer uint8 x int8 -> int32 kernel (``graphopt.backend.intmatmul``).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.runtime import ort_session

RNG = np.random.default_rng(7)


def _run(proto, feeds):
    return ort_session(proto).run(None, feeds)


def _lower(proto, *passes):
    m = graphopt.from_proto(proto)
    graphopt.run_passes(m, list(passes) or [graphopt.get_pipeline("lower-for-tvm")])
    out = graphopt.to_proto(m)
    onnx.checker.check_model(out, full_check=True)
    return out


def _float_to_int_casts(proto: onnx.ModelProto) -> list[str]:
    """Casts from a float tensor to an integer type (TVM's frontend emulates ONNX's wrap-around for
    these over the whole tensor: slow to build and to run)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    types.update({i.name: i.data_type for i in proto.graph.initializer})
    ints = (TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8, TensorProto.INT8)
    return [nd.name or nd.output[0] for nd in proto.graph.node if nd.op_type == "Cast" and
            nd.attribute[0].i in ints and types.get(nd.input[0]) == TensorProto.FLOAT]


def _dynamic_matmul(w: np.ndarray, wz: np.ndarray | int, *, k: int, rows: int = 6, bias: bool = True,
                    opset: int = 13) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """ORT's dynamic-quantizer form: DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(scales) -> Add."""
    n = w.shape[1]
    inits = {"w": w, "wz": np.asarray(wz, w.dtype), "ws": np.array(0.02, np.float32),
             "b": RNG.standard_normal(n).astype(np.float32)}
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "ws"], ["s"]),
             helper.make_node("Mul", ["accf", "s"], ["y0"])]
    nodes.append(helper.make_node("Add", ["y0", "b"], ["y"]) if bias else helper.make_node("Identity", ["y0"], ["y"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
                          [numpy_helper.from_array(a, name) for name, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m, {"x": (RNG.standard_normal((rows, k)) * 3).astype(np.float32)}


def _uint8_weight(k: int, n: int, zp: int) -> np.ndarray:
    """Asymmetric uint8 weights as ORT's quantizer writes them: the extremes 0 and 255 in every
    column, so ``w - zp`` leaves int8 in each column (the per-column shift path)."""
    w = RNG.integers(0, 256, (k, n)).astype(np.uint8)
    w[0], w[1] = 0, 255
    assert np.any(w.astype(int) - zp > 127)
    return w


@pytest.mark.parametrize("case", ["uint8-asymmetric", "int8-per-column-zp", "int8-symmetric"])
def test_matmul_integer_lowered_exactly(case):
    k, n = 37, 21
    if case == "uint8-asymmetric":
        w, wz = _uint8_weight(k, n, 119), 119
    elif case == "int8-per-column-zp":
        wz = RNG.integers(-20, 20, n).astype(np.int8)
        w = np.clip(RNG.integers(-128, 128, (k, n)), -128 + 20, 127 - 20).astype(np.int8)
    else:
        w, wz = RNG.integers(-127, 128, (k, n)).astype(np.int8), 0
    proto, feeds = _dynamic_matmul(w, wz, k=k, opset=11 if case == "int8-symmetric" else 13)
    ref = _run(proto, feeds)[0]
    out = _lower(proto)
    mms = [nd for nd in out.graph.node if nd.op_type == "MatMulInteger"]
    assert len(mms) == 1 and len(mms[0].input) == 2  # no zero points: uint8 x int8 as is
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert inits[mms[0].input[1]].dtype == np.int8
    assert not _float_to_int_casts(out)
    again = _lower(out, graphopt.get_pass("lower-integer"))  # its own output is final: left as it is
    assert [nd.op_type for nd in again.graph.node] == [nd.op_type for nd in out.graph.node]
    np.testing.assert_array_equal(_run(out, feeds)[0], ref)  # the same int32 sums, one rounding


def _small_cnn_dynamic(tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    W1 = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    b1 = RNG.standard_normal(8).astype(np.float32) * 0.1
    W2 = RNG.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3
    b2 = RNG.standard_normal(4).astype(np.float32) * 0.1
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c1"], ["s1"]), helper.make_node("Mul", ["c1", "s1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2", "b2"], ["y"], strides=[2, 2])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 4])],
                          [numpy_helper.from_array(a, k) for k, a in
                           {"W1": W1, "b1": b1, "W2": W2, "b2": b2}.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    src, q = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(m, src)
    quantize_dynamic(str(src), str(q), op_types_to_quantize=["Conv"])
    return onnx.load(q), {"x": RNG.standard_normal((1, 3, 6, 8)).astype(np.float32)}


def _old_quantizer_conv() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The form older ORT dynamic quantizers wrote (ddddocr_ocr_int8): uint8 weights with a zero
    point, and the bias quantized at run time, ``Cast(Floor(b / (xs * ws)), int32)``, added to the
    int32 accumulator before ``Cast(float)``."""
    w = RNG.integers(0, 256, (6, 3, 3, 3)).astype(np.uint8)
    inits = {"w": w, "wz": np.array(121, np.uint8), "ws": np.array(0.01, np.float32),
             "b": RNG.standard_normal(6).astype(np.float32), "shape": np.array([1, -1, 1, 1], np.int64)}
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("Mul", ["xs", "ws"], ["s"]),
             helper.make_node("Div", ["b", "s"], ["bd"]), helper.make_node("Floor", ["bd"], ["bf"]),
             helper.make_node("Cast", ["bf"], ["bq"], to=TensorProto.INT32),
             helper.make_node("ConvInteger", ["xq", "w", "xz", "wz"], ["acc"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["bq", "shape"], ["bq4"]),
             helper.make_node("Add", ["acc", "bq4"], ["accb"]),
             helper.make_node("Cast", ["accb"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["accf", "s"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 7, 9])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 7, 9])],
                          [numpy_helper.from_array(a, k) for k, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)])
    m.ir_version = 7
    # element types known, as the compile path's lossless passes leave them (an unknown one keeps
    # the int32 round trip: correct, only slower under TVM)
    return onnx.shape_inference.infer_shapes(m), {"x": RNG.standard_normal((1, 3, 7, 9)).astype(np.float32)}


@pytest.mark.parametrize("form", ["old-quantizer", "quantize_dynamic"])
def test_conv_integer_has_no_int32_round_trip(form, tmp_path):
    """ConvInteger -> [Add(Cast(Floor(b / s), int32))] -> Cast(float) reads as a float Conv (+ Add):
    no float -> int32 Cast is left, and the outputs are ORT's exactly."""
    proto, feeds = _old_quantizer_conv() if form == "old-quantizer" else _small_cnn_dynamic(tmp_path)
    ref = _run(proto, feeds)[0]
    out = _lower(proto)
    ops = [nd.op_type for nd in out.graph.node]
    assert "ConvInteger" not in ops and "Conv" in ops
    assert not _float_to_int_casts(out)
    np.testing.assert_array_equal(_run(out, feeds)[0], ref)


def _dynamic_lstm(tmp_path, seq=5, hidden=16, inp=8):
    from onnxruntime.quantization import quantize_dynamic

    dirs, G = 2, 4
    inits = {"W": RNG.standard_normal((dirs, G * hidden, inp)).astype(np.float32) * 0.5,
             "R": RNG.standard_normal((dirs, G * hidden, hidden)).astype(np.float32) * 0.5,
             "B": RNG.standard_normal((dirs, 2 * G * hidden)).astype(np.float32) * 0.5}
    node = helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y", "Yh"], hidden_size=hidden, direction="bidirectional")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [seq, 1, inp])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [seq, dirs, 1, hidden]),
                           helper.make_tensor_value_info("Yh", TensorProto.FLOAT, [dirs, 1, hidden])],
                          [numpy_helper.from_array(a, k) for k, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    src, q = tmp_path / "lstm.onnx", tmp_path / "lstm_q.onnx"
    onnx.save(m, src)
    quantize_dynamic(str(src), str(q), op_types_to_quantize=["LSTM"])
    qp = onnx.load(q)
    assert "DynamicQuantizeLSTM" in {nd.op_type for nd in qp.graph.node}
    return qp, {"X": RNG.standard_normal((seq, 1, inp)).astype(np.float32)}


def test_dynamic_quantize_lstm_products_are_integer(tmp_path):
    """Each product is MatMulInteger of the uint8 input/state with the int8 weight (ORT's own sums):
    the unrolled LSTM equals ORT's DynamicQuantizeLSTM to float rounding of the gates (a float
    product of dequantized values moved states across quantization steps)."""
    qp, feeds = _dynamic_lstm(tmp_path)
    ref = _run(qp, feeds)
    out = _lower(qp)
    ops = [nd.op_type for nd in out.graph.node]
    assert "DynamicQuantizeLSTM" not in ops and "LSTM" not in ops
    # input projection once per direction, recurrent product per step after the first: 2 + 2 * 4
    assert ops.count("MatMulInteger") == 10 and "MatMul" not in ops and "DequantizeLinear" not in ops
    assert not _float_to_int_casts(out)
    # tanh as 2 * sigmoid(2x) - 1: the state is quantized again every step, and TVM's fast_tanh
    # (1e-5 off) moved it across rounding steps (ddddocr_ocr_int8: 3.4e-4 of the range off ORT)
    assert "Tanh" not in ops
    for r, g in zip(ref, _run(out, feeds), strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-6)


# -- under TVM ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tvm_compile():
    pytest.importorskip("tvm", reason="the tvm extra is not installed")
    from graphopt.backend import compile as c

    return lambda m, **kw: c(m, "host", progress=False, build_cache=False, **kw)


def test_integer_matmul_compiles_to_uint8_int8_kernel(tvm_compile):
    """TVM's frontend widens MatMulInteger to int32 x int32; the backend makes it uint8 x int8 ->
    int32 again (VNNI where the CPU has it): exact, so the outputs are ORT's bit for bit."""
    from graphopt.backend.int8 import has_vnni

    k, n = 36, 40  # padded to 36 x 48 for the dot-product blocks, sliced back
    proto, feeds = _dynamic_matmul(_uint8_weight(k, n, 119), 119, k=k, rows=8)
    ref = _run(proto, feeds)[0]
    cm = tvm_compile(graphopt.from_proto(proto))
    assert cm.info.rewrites.get("integer_matmul") == 1
    if has_vnni(cm.target.tvm_target()):
        assert "int8-vnni" in cm.info.schedules.values()
    np.testing.assert_allclose(cm.run(feeds)[0], ref, rtol=1e-6, atol=1e-6)


def test_dynamic_quantize_lstm_compiles_and_matches_ort(tvm_compile, tmp_path):
    qp, feeds = _dynamic_lstm(tmp_path, seq=4)
    ref = _run(qp, feeds)
    cm = tvm_compile(graphopt.from_proto(qp))
    assert cm.info.rewrites.get("integer_matmul", 0) >= 2
    for r, g in zip(ref, cm.run(feeds), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
