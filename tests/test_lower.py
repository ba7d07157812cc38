"""Rewrites into standard ONNX for backends (passes/lower): LSTM/GRU/RNN unrolling, explicit
ConvTranspose padding, ORT integer ops as float/QDQ, and the TVM compile path using them.

The rewrites are checked under ONNX Runtime (no TVM needed); the compile tests skip when the
``tvm`` extra is not installed.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.runtime import ort_session

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits, opset=14, extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, k) for k, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    m.ir_version = 8
    return m


def _run(proto, feeds):
    return ort_session(proto).run(None, feeds)


def _lower(proto, pass_name, **opts):
    m = graphopt.from_proto(proto)
    p = graphopt.get_pass(pass_name, **opts)
    graphopt.run_passes(m, [p])
    out = graphopt.to_proto(m)
    onnx.checker.check_model(out, full_check=True)
    return out, p


def _rnn_model(op, *, seq=5, batch=2, inp=3, hidden=4, direction="forward", layout=0, init=False, peep=False,
               bias=True, lens=False, opset=14, **attrs):
    dirs = 2 if direction == "bidirectional" else 1
    G = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    inits = {"W": RNG.standard_normal((dirs, G * hidden, inp)).astype(np.float32) * 0.5,
             "R": RNG.standard_normal((dirs, G * hidden, hidden)).astype(np.float32) * 0.5}
    names = ["X", "W", "R"]
    if bias:
        inits["B"] = RNG.standard_normal((dirs, 2 * G * hidden)).astype(np.float32) * 0.5
    names.append("B" if bias else "")
    if lens:
        inits["L"] = np.full(batch, seq, np.int32)
    names.append("L" if lens else "")
    xs = [seq, batch, inp] if layout == 0 else [batch, seq, inp]
    st = [dirs, batch, hidden] if layout == 0 else [batch, dirs, hidden]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, xs)]
    feeds = {"X": RNG.standard_normal(xs).astype(np.float32)}
    if init:
        names.append("H0")
        inputs.append(helper.make_tensor_value_info("H0", TensorProto.FLOAT, st))
        feeds["H0"] = RNG.standard_normal(st).astype(np.float32)
        if op == "LSTM":
            names.append("C0")
            inputs.append(helper.make_tensor_value_info("C0", TensorProto.FLOAT, st))
            feeds["C0"] = RNG.standard_normal(st).astype(np.float32)
    if peep:
        names += [""] * (7 - len(names)) + ["P"]
        inits["P"] = RNG.standard_normal((dirs, 3 * hidden)).astype(np.float32)
    nout = 3 if op == "LSTM" else 2
    outs = ["Y", "Y_h", "Y_c"][:nout]
    node = helper.make_node(op, names, outs, hidden_size=hidden, direction=direction,
                            **({"layout": layout} if layout else {}), **attrs)
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * (4 if o == "Y" else 3)) for o in outs]
    return _model([node], inputs, outputs, inits, opset=opset), feeds


RECURRENT_CASES = [
    ("LSTM", {}),
    ("LSTM", {"direction": "bidirectional", "init": True}),
    ("LSTM", {"direction": "reverse", "peep": True, "init": True}),
    ("LSTM", {"direction": "bidirectional", "layout": 1, "init": True, "peep": True}),
    ("LSTM", {"clip": 0.7, "bias": False, "lens": True}),
    ("LSTM", {"input_forget": 1, "init": True}),
    ("LSTM", {"activations": ["HardSigmoid", "LeakyRelu", "Softsign"], "activation_alpha": [0.3, 0.2],
              "activation_beta": [0.4]}),
    ("LSTM", {"seq": 1, "opset": 11}),
    ("GRU", {}),
    ("GRU", {"direction": "bidirectional", "init": True, "linear_before_reset": 1}),
    ("GRU", {"linear_before_reset": 1}),
    ("GRU", {"linear_before_reset": 1, "bias": False, "init": True}),
    ("GRU", {"bias": False, "direction": "reverse"}),
    ("GRU", {"layout": 1, "direction": "reverse", "init": True, "clip": 1.5}),
    ("GRU", {"activations": ["Sigmoid", "Relu", "Sigmoid", "Elu"], "direction": "bidirectional",
             "activation_alpha": [0.5]}),
    ("RNN", {}),
    ("RNN", {"direction": "bidirectional", "init": True, "layout": 1}),
    ("RNN", {"activations": ["Relu"], "clip": 2.0, "opset": 9}),
]


@pytest.mark.parametrize("op,kw", RECURRENT_CASES, ids=[f"{o}-{'-'.join(map(str, k))}" for o, k in RECURRENT_CASES])
def test_recurrent_lowering_matches_ort(op, kw):
    layout = kw.get("layout", 0)
    proto, feeds = _rnn_model(op, **{**kw, "layout": 0})
    ref = _run(proto, feeds)
    if layout:  # ORT runs only layout 0: the batch-first twin of the same model, fed transposed
        node = proto.graph.node[0]
        node.attribute.append(helper.make_attribute("layout", 1))
        for vi in proto.graph.input:
            d = vi.type.tensor_type.shape.dim
            d[0].dim_value, d[1].dim_value = d[1].dim_value, d[0].dim_value
        feeds = {k: v.swapaxes(0, 1).copy() for k, v in feeds.items()}
        ref = [r.transpose(2, 0, 1, 3) if r.ndim == 4 else r.swapaxes(0, 1) for r in ref]
    out, p = _lower(proto, "lower-recurrent")
    ops = {n.op_type for n in out.graph.node}
    assert op not in ops and "MatMul" in ops, ops
    assert p.report["lowered"] == {op: 1}
    got = _run(out, feeds)
    for r, g in zip(ref, got, strict=True):
        assert r.shape == g.shape
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_recurrent_only_used_outputs_built():
    proto, feeds = _rnn_model("LSTM", direction="bidirectional")
    del proto.graph.output[0]  # Y unused: only Y_h / Y_c are built
    proto.graph.output.pop()  # Y_c unused too
    ref = _run(proto, feeds)
    out, _ = _lower(proto, "lower-recurrent")
    np.testing.assert_allclose(_run(out, feeds)[0], ref[0], rtol=1e-5, atol=1e-5)
    assert not any(n.op_type == "Concat" and len(n.input) == 5 for n in out.graph.node)


@pytest.mark.parametrize("why,change", [
    ("sequence length", lambda m: m.graph.input[0].type.tensor_type.shape.dim[0].__setattr__("dim_param", "T")),
    ("sequence_lens", "lens"),
])
def test_recurrent_refuses_clearly(why, change, caplog):
    caplog.set_level("INFO")
    proto, _ = _rnn_model("LSTM", lens=True)
    if change == "lens":
        proto.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array([5, 3], np.int32), "L"))
    else:
        change(proto)
    out, p = _lower(proto, "lower-recurrent")
    assert [n.op_type for n in out.graph.node] == ["LSTM"]
    (reason,) = p.report["left"].values()
    assert why in reason
    assert why in caplog.text


# -- ConvTranspose ----------------------------------------------------------------------------

def _conv_transpose_model(attrs, cin=4, cout=6, k=(3, 3), group=1, hw=(5, 7), conv_first=True):
    W = RNG.standard_normal((cin, cout // group) + k).astype(np.float32)
    B = RNG.standard_normal(cout).astype(np.float32)
    W0 = RNG.standard_normal((cin, cin, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W0"], ["c"])] if conv_first else []
    nodes.append(helper.make_node("ConvTranspose", ["c" if conv_first else "x", "W", "B"], ["y"], **attrs))
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, *hw])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, None, None])], {"W": W, "B": B, "W0": W0}, opset=13)
    return m, {"x": RNG.standard_normal((1, cin, *hw)).astype(np.float32)}


CT_CASES = [
    ({"strides": [2, 2]}, {}),
    ({"strides": [2, 2], "pads": [1, 0, 0, 1]}, {}),
    ({"strides": [2, 3], "output_padding": [1, 2]}, {}),
    ({"strides": [2, 2], "dilations": [2, 1]}, {}),
    ({"strides": [2, 2], "group": 2}, {"group": 2}),
    ({"group": 4}, {"group": 4, "cout": 4}),
    ({"strides": [2, 2], "auto_pad": "SAME_UPPER"}, {}),
    ({"strides": [2, 2], "auto_pad": "SAME_LOWER"}, {}),
    ({"strides": [2, 2], "auto_pad": "VALID"}, {}),
    ({"strides": [2, 2], "output_shape": [10, 14]}, {}),
    ({"strides": [2, 2], "output_shape": [12, 16]}, {}),
    ({"strides": [3, 3], "output_shape": [13, 19], "auto_pad": "SAME_UPPER"}, {}),
    ({"strides": [2, 2], "output_padding": [1, 1], "dilations": [2, 2]}, {}),
    ({"strides": [2, 2], "kernel_shape": [2, 2]}, {"k": (2, 2), "cout": 1}),
]


@pytest.mark.parametrize("attrs,kw", CT_CASES, ids=[str(a) for a, _ in CT_CASES])
def test_explicit_conv_transpose_matches_ort(attrs, kw):
    proto, feeds = _conv_transpose_model(attrs, **kw)
    ref = _run(proto, feeds)[0]
    out, p = _lower(proto, "explicit-conv-transpose")
    ct = next(n for n in out.graph.node if n.op_type == "ConvTranspose")
    names = {a.name for a in ct.attribute}
    assert "auto_pad" not in names and "output_shape" not in names
    assert p.report["rewritten"] == int("auto_pad" in attrs or "output_shape" in attrs)
    got = _run(out, feeds)[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


# -- ORT integer ops ---------------------------------------------------------------------------

def _small_cnn(tmp_path):
    W1 = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    b1 = RNG.standard_normal(8).astype(np.float32) * 0.1
    W2 = RNG.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3
    M = RNG.standard_normal((4, 5)).astype(np.float32) * 0.3
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], strides=[2, 2]),
             helper.make_node("Add", ["c2", "c2"], ["a"]),
             helper.make_node("MatMul", ["a", "M"], ["y"])]
    inits = {"W1": W1, "b1": b1, "W2": W2, "M": M}
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 8])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 5])], inits, opset=13)
    p = tmp_path / "float.onnx"
    onnx.save(m, p)
    return p, {"x": RNG.standard_normal((1, 3, 6, 8)).astype(np.float32)}


def _calibration(feed):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{k: v + 0.1 * i for k, v in feed.items()} for i in range(4)])

        def get_next(self):
            return next(self.it, None)

    return Reader()


def test_conv_integer_lowered_to_float_conv_matches_ort(tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    src, feeds = _small_cnn(tmp_path)
    q = tmp_path / "dyn.onnx"
    quantize_dynamic(str(src), str(q), op_types_to_quantize=["Conv", "MatMul"])
    proto = onnx.load(q)
    assert {"ConvInteger", "DynamicQuantizeLinear"} <= {n.op_type for n in proto.graph.node}
    ref = _run(proto, feeds)[0]
    out, p = _lower(proto, "lower-integer")
    ops = {n.op_type for n in out.graph.node}
    assert "ConvInteger" not in ops and "Conv" in ops
    assert p.report["lowered"]["ConvInteger"] == 2
    np.testing.assert_allclose(_run(out, feeds)[0], ref, rtol=1e-6, atol=1e-6)  # the same integer sums


def test_qlinear_ops_lowered_to_qdq_match_ort(tmp_path):
    from onnxruntime.quantization import QuantFormat, quantize_static

    src, feeds = _small_cnn(tmp_path)
    q = tmp_path / "qop.onnx"
    quantize_static(str(src), str(q), _calibration(feeds), quant_format=QuantFormat.QOperator, per_channel=True)
    proto = onnx.load(q)
    qops = {n.op_type for n in proto.graph.node if n.op_type.startswith("QLinear")}
    assert {"QLinearConv", "QLinearMatMul", "QLinearAdd"} <= qops, qops
    ref = _run(proto, feeds)[0]
    out, p = _lower(proto, "lower-integer")
    assert not any(n.op_type.startswith("QLinear") for n in out.graph.node)
    assert set(p.report["lowered"]) == qops
    got = _run(out, feeds)[0]
    # float instead of integer arithmetic: a requantized value may move by one step
    step = float(np.abs(ref).max()) / 100
    assert np.abs(got - ref).max() <= 2 * step
    assert np.mean(np.isclose(got, ref, rtol=1e-5, atol=1e-6)) > 0.9


def test_dynamic_quantize_lstm_lowered(tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    proto, feeds = _rnn_model("LSTM", seq=4, batch=1, inp=8, hidden=16, direction="bidirectional")
    src, q = tmp_path / "lstm.onnx", tmp_path / "lstm_q.onnx"
    onnx.save(proto, src)
    quantize_dynamic(str(src), str(q), op_types_to_quantize=["LSTM"])
    qp = onnx.load(q)
    assert "DynamicQuantizeLSTM" in {n.op_type for n in qp.graph.node}
    ref = _run(qp, feeds)
    m = graphopt.from_proto(qp)
    graphopt.run_passes(m, [graphopt.get_pipeline("lower-for-tvm")])
    out = graphopt.to_proto(m)
    onnx.checker.check_model(out, full_check=True)
    assert {n.op_type for n in out.graph.node}.isdisjoint({"DynamicQuantizeLSTM", "LSTM"})
    # the products see the uint8 inputs/states ORT's integer LSTM sees: equal up to float rounding
    # (a float LSTM with the dequantized weights alone was 1e-2 off)
    for r, g in zip(ref, _run(out, feeds), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


# -- the TVM compile path ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tvm_compile():
    pytest.importorskip("tvm", reason="the tvm extra is not installed")
    from graphopt.backend import compile as c

    return lambda m, **kw: c(m, "host", progress=False, build_cache=False, **kw)


def test_conv_transpose_variants_compile_and_match_ort(tvm_compile):
    """Every form in one model (one TVM build): after NHWC convs, which ConvertLayout used to
    carry into conv2d_transpose (left un-legalized by TOPI)."""
    cin, hw = 4, (5, 7)
    W0 = RNG.standard_normal((cin, cin, 1, 1)).astype(np.float32)
    nodes, inits, outs = [helper.make_node("Conv", ["x", "W0"], ["c"])], {"W0": W0}, []
    for i, (attrs, kw) in enumerate(CT_CASES):
        cout, group, k = kw.get("cout", 6), kw.get("group", 1), kw.get("k", (3, 3))
        inits[f"W{i + 1}"] = RNG.standard_normal((cin, cout // group) + k).astype(np.float32)
        inits[f"B{i + 1}"] = RNG.standard_normal(cout).astype(np.float32)
        nodes.append(helper.make_node("ConvTranspose", ["c", f"W{i + 1}", f"B{i + 1}"], [f"y{i}"], **attrs))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, cout, None, None]))
    proto = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, *hw])], outs, inits,
                   opset=13)
    feeds = {"x": RNG.standard_normal((1, cin, *hw)).astype(np.float32)}
    ref = _run(proto, feeds)
    cm = tvm_compile(graphopt.from_proto(proto), optimize=False)
    assert cm.info.layout == "NHWC"
    for (attrs, _), r, g in zip(CT_CASES, ref, cm.run(feeds), strict=True):
        assert g.shape == r.shape, attrs
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4, err_msg=str(attrs))


def test_recurrent_and_integer_models_compile_and_match_ort(tvm_compile, tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    for op, kw in [("LSTM", {"direction": "bidirectional", "init": True, "peep": True}),
                   ("GRU", {"linear_before_reset": 1, "init": True}), ("RNN", {"direction": "reverse"})]:
        proto, feeds = _rnn_model(op, batch=1, **kw)
        ref = _run(proto, feeds)
        got = tvm_compile(graphopt.from_proto(proto)).run(feeds)
        for r, g in zip(ref, got, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=op)
    src, feeds = _small_cnn(tmp_path)
    q = tmp_path / "dyn.onnx"
    quantize_dynamic(str(src), str(q), op_types_to_quantize=["Conv", "MatMul"])
    ref = _run(onnx.load(q), feeds)[0]
    got = tvm_compile(str(q)).run(feeds)[0]
    step = float(np.abs(ref).max()) / 100  # DynamicQuantizeLinear rounding may differ by one step
    assert np.abs(got - ref).max() <= 2 * step
    assert np.mean(np.isclose(got, ref, rtol=1e-4, atol=1e-5)) > 0.9


def test_unsupported_op_named_before_tvm(tvm_compile, tmp_path):
    proto, _ = _rnn_model("LSTM", lens=True)
    proto.graph.initializer[-1].CopyFrom(numpy_helper.from_array(np.array([5, 3], np.int32), "L"))
    proto.graph.node[0].name = "the_lstm"
    from graphopt.errors import CompileError

    with pytest.raises(CompileError, match=r"op LSTM is not supported.*sequence_lens.*") as exc:
        tvm_compile(graphopt.from_proto(proto))
    assert "the_lstm" in str(exc.value)
    p = tmp_path / "m.onnx"
    onnx.save(proto, p)
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "compile", str(p), "-o", str(tmp_path / "m.so")],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: error:") and "the_lstm" in lines[0], r.stderr
    assert not (tmp_path / "m.so").exists()


def _if_on_input_model():
    """y = x * 2 if sr == 16000 else x + 1 (a streaming VAD's sample-rate switch, in small)."""
    then = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 4])],
                             [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    other = helper.make_graph([helper.make_node("Add", ["x", "one"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    nodes = [helper.make_node("Equal", ["sr", "k"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="rate_switch", then_branch=then, else_branch=other)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                          helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                  {"k": np.array(16000, np.int64)}, opset=13)


def test_data_dependent_if_compiles_to_relax_if(tvm_compile):
    """An If whose condition is computed from an input at run time is a Relax If in the build
    (was refused): both branches equal ONNX Runtime, with the input still an input."""
    proto = _if_on_input_model()
    x = RNG.standard_normal((1, 4)).astype(np.float32)
    cm = tvm_compile(graphopt.from_proto(proto))
    assert sorted(s.name for s in cm.inputs) == ["sr", "x"]
    for sr in (16000, 8000, 0):
        feed = {"x": x, "sr": np.array(sr, np.int64)}
        np.testing.assert_allclose(cm.run(feed)[0], _run(proto, feed)[0], rtol=1e-6)


def test_const_input_folds_data_dependent_if(tvm_compile, tmp_path):
    from graphopt.errors import CompileError

    proto = _if_on_input_model()
    x = RNG.standard_normal((1, 4)).astype(np.float32)
    for sr in (16000, 8000):
        ref = _run(proto, {"x": x, "sr": np.array(sr, np.int64)})[0]
        cm = tvm_compile(graphopt.from_proto(proto), const_inputs={"sr": sr})
        assert [s.name for s in cm.inputs] == ["x"]
        np.testing.assert_allclose(cm.run({"x": x})[0], ref, rtol=1e-6)
    with pytest.raises(CompileError, match="no input 'rate'"):
        tvm_compile(graphopt.from_proto(proto), const_inputs={"rate": 1})
    p = tmp_path / "if.onnx"
    onnx.save(proto, p)
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "compile", str(p), "-o", str(tmp_path / "m.so"),
                        "--const-input", "sr"], check=False, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "NAME=VALUE" in r.stderr, r.stderr


def test_unlegalized_relax_op_is_named(tvm_compile, monkeypatch):
    """Without the NCHW pin, TOPI cannot legalize conv2d_transpose after NHWC convs: the error
    names the operator and its layouts in one line (was: "CodeGenVM cannot emit this Relax operator").
    A grouped one: the CPU build turns ungrouped ConvTransposes into convolutions first."""
    from graphopt.backend import compiler
    from graphopt.errors import CompileError

    monkeypatch.setattr(compiler, "CPU_LAYOUTS", {"relax.nn.conv2d": ["NHWC", "HWIO"]})
    proto, _ = _conv_transpose_model({"strides": [2, 2], "group": 2}, group=2)
    with pytest.raises(CompileError, match=r"cannot lower relax.nn.conv2d_transpose \(data_layout=NHWC"):
        tvm_compile(graphopt.from_proto(proto))


def test_recurrent_weights_behind_dequantize_linear():
    """A QDQ model's LSTM reads int8 weights through DequantizeLinear: lowered with those values."""
    proto, feeds = _rnn_model("LSTM", direction="bidirectional", init=True)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    w = inits["W"]
    scale = (np.abs(w).max(axis=(0, 2)) / 127).astype(np.float32)  # per gate row (axis 1)
    wq = np.clip(np.round(w / scale[None, :, None]), -127, 127).astype(np.int8)
    del proto.graph.initializer[[t.name for t in proto.graph.initializer].index("W")]
    proto.graph.initializer.extend([numpy_helper.from_array(wq, "Wq"), numpy_helper.from_array(scale, "Ws"),
                                    numpy_helper.from_array(np.zeros(scale.shape, np.int8), "Wz")])
    proto.graph.node.insert(0, helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["W"], axis=1))
    ref = _run(proto, feeds)
    out, p = _lower(proto, "lower-recurrent")
    assert p.report["lowered"] == {"LSTM": 1}
    for r, g in zip(ref, _run(out, feeds), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
