"""quantize-static placement decided by measurement: the narrow-channel rule checked against the
measured output error, and the form of recurrent weights (DynamicQuantizeLSTM, weight-only int8,
float) chosen by timing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model, vi
from onnx import helper

import graphopt
from graphopt.errors import GraphoptError


def _spread_then_depthwise(amplify: bool, seed: int = 0) -> tuple[onnx.ModelProto, list[dict]]:
    """Four 1x1 convs, a 1x1 conv with output channels spanning 3 decades, HardSwish, depthwise conv, 1x1 conv.
    ``amplify``: the depthwise weights are largest on the narrowest channels (what BN folding
    leaves in PaddleOCR's recognizers: their rounding noise reaches the output); otherwise they
    are even, and the narrow channels' noise stays negligible next to the wide ones."""
    rng = np.random.default_rng(seed)
    spread = np.logspace(-1.5, 1.5, 8).astype(np.float32)
    w1 = (rng.standard_normal((8, 3, 1, 1)) * spread[:, None, None, None]).astype(np.float32)
    w2 = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    if amplify:
        w2 = (w2 / spread[:, None, None, None]).astype(np.float32)
    w3 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    pre = []  # evenly spread 1x1 convs before it: int8 anyway, they set the reference error
    for k in range(4):
        w = (np.eye(3)[:, :, None, None] + 0.5 * rng.standard_normal((3, 3, 1, 1))).astype(np.float32)
        pre.append((f"w0{k}", w))
    mp = make_model([helper.make_node("Conv", [f"x0{k - 1}" if k else "x", f"w0{k}"], [f"x0{k}"], name=f"pw0{k}")
                     for k in range(4)] + [
                     helper.make_node("Conv", ["x03", "w1"], ["c"], name="pw1"),
                     helper.make_node("HardSwish", ["c"], ["h"], name="hs"),
                     helper.make_node("Conv", ["h", "w2"], ["d"], group=8, pads=[1, 1, 1, 1], name="dw"),
                     helper.make_node("Conv", ["d", "w3"], ["y"], name="pw2")],
                    [vi("x", [1, 3, 12, 12])], [vi("y", [1, 4, 12, 12])],
                    inits=pre + [("w1", w1), ("w2", w2), ("w3", w3)])
    cal = [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(24)]
    return mp, cal


def _rel_err(mp: onnx.ModelProto, m: graphopt.Model, cal: list[dict]) -> float:
    errs = []
    for f in cal[:16]:
        a = graphopt.run_ort(mp, f)["y"].astype(np.float64)
        b = graphopt.run_ort(m, f)["y"].astype(np.float64)
        errs.append(np.linalg.norm(a - b) / np.linalg.norm(a))
    return float(np.mean(errs))


def _quantize(mp: onnx.ModelProto, cal: list[dict], **opts) -> tuple[graphopt.Model, dict]:
    m = graphopt.from_proto(mp)
    q = graphopt.get_pass("quantize-static", **opts)
    graphopt.run_passes(m, [q, "dce"], graphopt.PassContext(calibration=cal))
    onnx.checker.check_model(graphopt.to_proto(m), full_check=True)
    return m, q.report


def test_flagged_narrow_channels_go_int8_when_the_output_error_allows() -> None:
    """Even depthwise weights: the rule flags pw1 and dw (and pw2, whose input keeps the spread),
    the measured error takes them back to int8 (every conv int8) and the output stays close."""
    mp, cal = _spread_then_depthwise(amplify=False)
    _, rule = _quantize(mp, cal, channel_check=False)
    flagged = set(rule["kept_float_channel_spread"])
    assert {"pw1", "dw"} <= flagged and rule["quantized_nodes"] == 7 - len(flagged)
    m, rep = _quantize(mp, cal)
    check = rep["channel_check"]
    assert check["admitted"] and check["flagged"] == len(flagged), check
    assert check["error_all_int8"] <= 1.5 * check["error_rule"], check
    assert rep["kept_float_channel_spread"] == [] and rep["kept_float"] == [] and rep["quantized_nodes"] == 7
    assert sum(n.op_type == "DequantizeLinear" and n.input(0).const_value() is not None
               and n.input(0).const_value().dtype == np.int8 for n in m.graph) == 7  # every weight int8
    assert _rel_err(mp, m, cal) < 0.08  # the rule's choice: 0.059


def test_flagged_narrow_channels_stay_float_when_they_reach_the_output() -> None:
    """Depthwise weights largest on the narrowest channels: int8 there multiplies the output error,
    so the check keeps the rule's choice."""
    mp, cal = _spread_then_depthwise(amplify=True)
    m, rep = _quantize(mp, cal)
    check = rep["channel_check"]
    assert not check["admitted"] and check["error_all_int8"] > 1.5 * check["error_rule"], check
    assert set(rep["kept_float_channel_spread"]) == {"pw1", "dw"} and rep["quantized_nodes"] == 5
    assert _rel_err(mp, m, cal) < 0.05
    # their weights are int8 all the same (weight-only: the trouble is the activation scale)
    assert rep["weight_only_int8"] == 2
    for name in ("pw1", "dw"):
        node = next(n for n in m.graph if n.name == name)
        dq = node.input(1).producer
        assert dq.op_type == "DequantizeLinear" and dq.input(0).const_value().dtype == np.int8
    dw = next(n for n in m.graph if n.name == "dw")
    assert dw.input(0).producer.op_type != "DequantizeLinear"  # float compute: its input is not quantized
    m2, rep2 = _quantize(mp, cal, float_weights_int8=False)
    assert "weight_only_int8" not in rep2
    assert next(n for n in m2.graph if n.name == "dw").input(1).const_value().dtype == np.float32


def _lstm_model(seed: int = 0, opset: int = 13) -> tuple[onnx.ModelProto, list[dict]]:
    rng = np.random.default_rng(seed)
    hid, inp = 32, 16
    mp = make_model([helper.make_node("MatMul", ["x", "w0"], ["h0"], name="proj"),
                     helper.make_node("LSTM", ["h0", "W", "R", "B"], ["y", "", ""], hidden_size=hid,
                                      direction="bidirectional", name="lstm")],
                    [vi("x", [6, 1, inp])], [vi("y", [6, 2, 1, hid])],
                    inits=[("w0", (rng.standard_normal((inp, inp)) * 0.3).astype(np.float32)),
                           ("W", (rng.standard_normal((2, 4 * hid, inp)) * 0.2).astype(np.float32)),
                           ("R", (rng.standard_normal((2, 4 * hid, hid)) * 0.2).astype(np.float32)),
                           ("B", (rng.standard_normal((2, 8 * hid)) * 0.1).astype(np.float32))], opset=opset)
    cal = [{"x": rng.standard_normal((6, 1, inp)).astype(np.float32)} for _ in range(16)]
    return mp, cal


def _check_lstm_output(mp: onnx.ModelProto, path: Path, cal: list[dict], tol: float = 0.05) -> None:
    for f in cal[:4]:
        ref, got = graphopt.run_ort(mp, f)["y"], graphopt.run_ort(path, f)["y"]
        assert np.linalg.norm(ref - got) / np.linalg.norm(ref) < tol


@pytest.mark.parametrize("per_channel", [True, False])
def test_lstm_as_dynamic_quantize_lstm(tmp_path: Path, per_channel: bool) -> None:
    """recurrent="dynamic": ORT's integer DynamicQuantizeLSTM with int8 W and R in its transposed
    layout: the file shrinks about 4x and the sequence output stays close."""
    mp, cal = _lstm_model()
    m, rep = _quantize(mp, cal, recurrent="dynamic", per_channel=per_channel)
    assert rep["recurrent_form"] == "dynamic" and rep["int8_recurrent_weights"] == 2
    assert [n.op_type for n in m.graph if "LSTM" in n.op_type] == ["DynamicQuantizeLSTM"]
    lstm = next(n for n in m.graph if n.op_type == "DynamicQuantizeLSTM")
    assert lstm.domain == "com.microsoft" and m.opset("com.microsoft") == 1
    assert lstm.input(1).const_value().dtype == np.int8 and lstm.input(1).const_value().shape == (2, 16, 128)
    assert lstm.input(2).const_value().shape == (2, 32, 128)
    assert lstm.input(8).const_value().shape == ((2, 128) if per_channel else (2,))
    graphopt.save(m, tmp_path / "q.onnx")
    assert (tmp_path / "q.onnx").stat().st_size < 0.35 * len(mp.SerializeToString())
    _check_lstm_output(mp, tmp_path / "q.onnx", cal)


def test_recurrent_form_is_chosen_by_timing(tmp_path: Path) -> None:
    """recurrent="auto": each form timed (an injected timer here), the fastest kept; forms within
    recurrent_margin (5%) of the fastest go to the smallest file."""
    mp, cal = _lstm_model()
    seen: list[set] = []

    def timer(times: dict[str, float]):
        def t(models: dict, feed: dict) -> dict[str, float]:
            if set(models) == {"dynamic", "weights", "float"}:
                seen.append(set(models))
                for k, mdl in models.items():  # each variant really is in its form
                    ops = {n.op_type for n in mdl.graph}
                    assert ("DynamicQuantizeLSTM" in ops) == (k == "dynamic") and ("LSTM" in ops) == (k != "dynamic")
                return times
            return {k: 1.0 for k in models}
        return t

    for times, want in (({"dynamic": 2.0, "weights": 3.0, "float": 1.0}, "float"),
                        ({"dynamic": 1.04, "weights": 3.0, "float": 1.0}, "dynamic"),  # within 5%: smaller file
                        ({"dynamic": 3.0, "weights": 1.0, "float": 1.01}, "weights")):
        m, rep = _quantize(mp, cal, timer=timer(times))
        assert rep["recurrent_form"] == want, (times, rep["recurrent_ms"])
        ops = [n.op_type for n in m.graph]
        assert ("DynamicQuantizeLSTM" in ops) == (want == "dynamic")
        lstm = next(n for n in m.graph if "LSTM" in n.op_type)
        w = lstm.input(1)
        assert (w.producer is not None and w.producer.op_type == "DequantizeLinear") == (want == "weights")
        if want == "float":
            assert w.const_value().dtype == np.float32 and rep["int8_recurrent_weights"] == 0
        graphopt.save(m, tmp_path / f"{want}.onnx")
        _check_lstm_output(mp, tmp_path / f"{want}.onnx", cal)
    assert len(seen) == 9  # three forms, timed three times per model (median)


def test_unknown_recurrent_form_is_refused() -> None:
    mp, cal = _lstm_model()
    with pytest.raises(GraphoptError, match="recurrent='int4'"):
        _quantize(mp, cal, recurrent="int4")


def test_value_info_is_what_the_model_came_with() -> None:
    """The types quantize-static infers for itself, and those the opset converter adds (11 -> 13
    for per-channel weights), are not written out: ppocr_cls's int8 file carried 153 such
    entries (8 KB of 220 KB). An entry the input had stays."""
    rng = np.random.default_rng(0)
    mp = make_model([helper.make_node("Conv", ["x", "w1"], ["c"], name="c1"),
                     helper.make_node("Relu", ["c"], ["r"], name="relu"),
                     helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")],
                    [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])],
                    inits=[("w1", rng.standard_normal((4, 3, 1, 1)).astype(np.float32)),
                           ("w2", rng.standard_normal((4, 4, 1, 1)).astype(np.float32))], opset=11)
    mp.graph.value_info.append(helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [1, 4, 8, 8]))
    assert len(onnx.version_converter.convert_version(mp, 13).graph.value_info) == 2  # the converter adds "r"
    cal = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    m, rep = _quantize(mp, cal)
    out = graphopt.to_proto(m)
    assert rep["opset"].startswith("raised from 11") and rep["quantized_nodes"] == 2
    assert [v.name for v in out.graph.value_info] == ["c"]
    for f in cal[:4]:
        ref, got = graphopt.run_ort(mp, f)["y"], graphopt.run_ort(out, f)["y"]
        assert np.linalg.norm(ref - got) / np.linalg.norm(ref) < 0.05
