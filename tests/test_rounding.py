"""Learned rounding of int8 weights (AdaRound, GPTQ) from the float model's activations: the
unfolded conv patches are the conv's real inputs, both roundings beat round-to-nearest on a
layer's output on held-out inputs, the QDQ model keeps the quantizer's scales and layout and
stays close to fp32 under ONNX Runtime, and the CLI option."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graphopt.passes.quantize.calibrate import int8_weight
from graphopt.passes.quantize.rounding import adaround, conv_patches, gptq, input_rows, layer_of, nearest
from helpers import FIXTURES, make_model, vi
from onnx import helper

import graphopt

CALIB = np.load(FIXTURES / "digits_calib.npz")["input"]
DIGITS = np.load(FIXTURES / "digits_test.npz")


def _conv_model(w: np.ndarray, attrs: dict, shape: list[int]) -> onnx.ModelProto:
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    return make_model([node], [vi("x", shape)], [vi("y", ["n", "o", "h", "w"])], [("w", w)], opset=17)


def _run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _layer(m: onnx.ModelProto):
    return layer_of(next(iter(graphopt.from_proto(m).graph)))


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]},
    {"strides": [2, 1], "dilations": [1, 2], "pads": [0, 2, 1, 0]},
    {"group": 2, "auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"group": 4, "pads": [1, 1, 1, 1]},  # depthwise
])
def test_conv_patches_are_the_convs_inputs(attrs: dict) -> None:
    rng = np.random.default_rng(0)
    g = attrs.get("group", 1)
    w = rng.standard_normal((4, 4 // g, 3, 3)).astype(np.float32)
    m = _conv_model(w, attrs, [2, 4, 9, 11])
    x = rng.standard_normal((2, 4, 9, 11)).astype(np.float32)
    y = _run(m, x)
    lay = _layer(m)
    rows, pos = conv_patches(x.astype(np.float64), lay, 40, rng, positions=True)
    assert rows.shape[:2] == (g, 40)
    want = y[(pos[0], slice(None), *pos[1:])]  # [rows, O]
    got = np.matmul(rows, np.swapaxes(lay.to_rows(w.astype(np.float64)), 1, 2))  # [g, rows, O/g]
    np.testing.assert_allclose(got.transpose(1, 0, 2).reshape(40, -1), want, rtol=1e-4, atol=1e-4)


def _error(m_w: np.ndarray, wq: np.ndarray, attrs: dict, x: np.ndarray) -> float:
    ref = _run(_conv_model(m_w, attrs, list(x.shape)), x)
    got = _run(_conv_model(wq.astype(np.float32), attrs, list(x.shape)), x)
    return float(np.sum((ref - got) ** 2))


@pytest.mark.parametrize("method", ["adaround", "gptq"])
def test_learned_rounding_beats_nearest_on_a_layer(method: str) -> None:
    """Inputs with correlated channels (as real feature maps have): the output error of the
    learned integer weights, on held-out inputs run through ONNX Runtime, is clearly below
    round-to-nearest's with the same scales."""
    rng = np.random.default_rng(1)
    attrs = {"pads": [1, 1, 1, 1]}
    mix = rng.standard_normal((8, 8)) * 0.7 + np.eye(8)

    def inputs(n: int) -> np.ndarray:
        z = rng.standard_normal((n, 8, 10, 10))
        z = np.einsum("nchw,dc->ndhw", z, mix)
        return (z + 0.5).astype(np.float32)  # a non-zero mean, as after an activation

    w = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)
    lay = _layer(_conv_model(w, attrs, [1, 8, 10, 10]))
    calib = inputs(16)
    rows = input_rows(calib, lay, 4096, rng)
    h = np.matmul(np.swapaxes(rows, 1, 2), rows)
    q0, sc = int8_weight(w, 0)
    wr = lay.to_rows(w.astype(np.float64))
    s = lay.scale_rows(sc, wr.shape[1])
    q = adaround(wr, s, h) if method == "adaround" else gptq(wr, s, h)
    if method == "adaround":  # each weight rounds down or up (GPTQ's compensation may move it further)
        assert np.abs(q - lay.to_rows(q0.astype(np.float64))).max() <= 1
    assert np.abs(q).max() <= 127
    assert np.array_equal(nearest(wr, s), lay.to_rows(q0.astype(np.float64)))
    held_out = inputs(8)
    e_near = _error(w, q0 * sc.reshape(-1, 1, 1, 1), attrs, held_out)
    e_learn = _error(w, lay.from_rows(q * s[..., None]), attrs, held_out)
    assert e_learn < 0.8 * e_near, (e_learn, e_near)


def _digits(path_or_model) -> tuple[float, np.ndarray]:
    s = ort.InferenceSession(path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString(),
                             providers=["CPUExecutionProvider"])
    out = s.run(None, {"input": DIGITS["x"]})[0]
    return float(np.mean(out.argmax(1) == DIGITS["y"])), out


def _weights(m: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per quantized node: (int8 weight, its scale), found through the DequantizeLinear it reads."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    dq = {n.output[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    out = {}
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in dq:
            d = dq[n.input[1]]
            if inits.get(d.input[0]) is not None and inits[d.input[0]].dtype == np.int8:
                out[n.name] = (inits[d.input[0]], inits[d.input[1]])
    return out


@pytest.mark.parametrize("method", ["adaround", "gptq"])
def test_quantized_model_keeps_scales_and_stays_close(tmp_path: Path, example_path: Path, method: str) -> None:
    """The digits CNN (a real trained model): learned rounding changes int8 values only (AdaRound
    by one step at most), keeps every scale, the model is valid (full check), its output
    error against fp32 on held-out digits is below round-to-nearest's, and accuracy holds."""
    from graphopt.transform import PassContext, get_pass, get_pipeline, run_passes

    calib = [{"input": CALIB[i:i + 1]} for i in range(32)]
    base = graphopt.load(str(example_path))
    run_passes(base, get_pipeline("default"))
    outs = {}
    for r in ("nearest", method):
        m = base.copy()
        q = get_pass("quantize-static", rounding=r, sqnr=False)
        run_passes(m, [q, get_pass("dce")], PassContext(calibration=calib))
        p = tmp_path / f"{r}.onnx"
        graphopt.save(m, p)
        onnx.checker.check_model(onnx.load(str(p)), full_check=True)
        outs[r] = (onnx.load(str(p)), q.report)
    near, learn = _weights(outs["nearest"][0]), _weights(outs[method][0])
    assert near.keys() == learn.keys() and len(near) >= 3
    changed = 0
    for k, (q0, s0) in near.items():
        q1, s1 = learn[k]
        assert np.array_equal(s0, s1) and q0.shape == q1.shape
        if method == "adaround":
            assert np.abs(q0.astype(int) - q1.astype(int)).max() <= 1
        changed += int(np.sum(q0 != q1))
    assert changed > 0
    rep = outs[method][1]["rounding"]
    assert rep["method"] == method and rep["layers"] == len(near) and rep["output_error_vs_nearest"] < 1.0
    assert rep["applied"] == rep["layers"]  # every learned layer was written
    acc_fp, ref = _digits(str(example_path))
    _, got_n = _digits(outs["nearest"][0])
    acc_l, got_l = _digits(outs[method][0])
    err_n, err_l = np.linalg.norm(got_n - ref) / np.linalg.norm(ref), np.linalg.norm(got_l - ref) / np.linalg.norm(ref)
    assert err_l < err_n, (err_l, err_n)
    assert err_l < 0.05 and acc_l >= acc_fp - 0.01, (err_l, acc_l, acc_fp)


def test_cli_rounding_option(tmp_path: Path, example_path: Path) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=CALIB[:16])
    got = {}
    for r in ("nearest", "gptq"):
        out = tmp_path / f"{r}.onnx"
        res = subprocess.run([sys.executable, "-m", "graphopt.cli", "quantize", str(example_path), "-o", str(out),
                              "--calibration", str(calib), "--rounding", r], capture_output=True, text=True, timeout=300, check=False)
        assert res.returncode == 0, res.stderr
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
        got[r] = _weights(onnx.load(str(out)))
    assert got["nearest"].keys() == got["gptq"].keys()
    assert all(np.array_equal(got["nearest"][k][1], got["gptq"][k][1]) for k in got["nearest"])  # same scales
    assert any(not np.array_equal(got["nearest"][k][0], got["gptq"][k][0]) for k in got["nearest"])  # other ints
    bad = subprocess.run([sys.executable, "-m", "graphopt.cli", "quantize", str(example_path), "-o",
                          str(tmp_path / "bad.onnx"), "--calibration", str(calib), "--rounding", "stochastic"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and not (tmp_path / "bad.onnx").exists()


def test_unknown_rounding_is_refused() -> None:
    from graphopt.errors import GraphoptError
    from graphopt.transform import get_pass

    with pytest.raises(GraphoptError, match="rounding"):
        get_pass("quantize-static", rounding="up")
