"""Static INT8 quantization: accuracy on a real trained model (digits CNN, held-out split),
integer kernels in ORT, file size, opset handling, bad calibration data, nothing-to-quantize."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import FIXTURES, make_model, vi
from onnx import helper

import graphopt
from graphopt.errors import GraphoptError, InputSpecError

DIGITS = np.load(FIXTURES / "digits_test.npz")
CALIB = np.load(FIXTURES / "digits_calib.npz")["input"]


def _calib(n: int = 64) -> list[dict]:
    return [{"input": CALIB[i:i + 1]} for i in range(n)]


def _ort_graph(path: Path) -> onnx.GraphProto:
    """The graph ONNX Runtime runs for the model at ``path`` (after its own optimizer, which is
    where QDQ groups become QLinearConv/QGemm...)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(path.with_name(path.stem + "_ort.onnx"))
    so.log_severity_level = 4
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return onnx.load(so.optimized_model_filepath).graph


def _accuracy(path_or_model) -> float:
    pred = graphopt.run_ort(path_or_model, {"input": DIGITS["x"]})["logits"].argmax(1)
    return float((pred == DIGITS["y"]).mean())


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "entropy"])
def test_digits_cnn_int8_keeps_accuracy_and_shrinks(tmp_path: Path, example_path: Path, method: str) -> None:
    m = graphopt.load(example_path)
    graphopt.optimize(m)
    graphopt.save(m, tmp_path / "fp32.onnx")
    q = graphopt.get_pass("quantize-static", method=method)
    graphopt.run_passes(m, [q, "dce"], graphopt.PassContext(calibration=_calib()))
    graphopt.save(m, tmp_path / "int8.onnx")
    onnx.checker.check_model(str(tmp_path / "int8.onnx"), full_check=True)
    fp, i8 = _accuracy(tmp_path / "fp32.onnx"), _accuracy(tmp_path / "int8.onnx")
    assert fp > 0.98 and i8 >= fp - 0.01, (fp, i8)  # at most 1 point of top-1 lost
    ratio = (tmp_path / "int8.onnx").stat().st_size / (tmp_path / "fp32.onnx").stat().st_size
    assert ratio < 0.34, ratio  # tiny model: names and scales weigh in; weights themselves are 1/4
    w = [t for t in onnx.load(str(tmp_path / "int8.onnx")).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sum(np.prod(t.dims) for t in w) > 47_000
    assert q.report["quantized_nodes"] == 5 and q.report["int8_weights"] == 5


def test_ort_runs_integer_kernels(tmp_path: Path, example_path: Path) -> None:
    m = graphopt.load(example_path)
    graphopt.optimize(m)
    graphopt.run_passes(m, ["quantize-static", "dce"], graphopt.PassContext(calibration=_calib(16)))
    graphopt.save(m, tmp_path / "q.onnx")
    ops = [n.op_type for n in _ort_graph(tmp_path / "q.onnx").node]
    assert ops.count("QLinearConv") == 3 and ops.count("QGemm") == 2, ops
    assert "Conv" not in ops and "Relu" not in ops  # Relu folded into the integer conv


def test_opset_is_raised_for_per_channel_and_kept_per_tensor() -> None:
    w = np.random.default_rng(0).standard_normal((4, 2, 3, 3)).astype(np.float32)
    mp = make_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["y"])],
                    [vi("x", [1, 2, 6, 6])], [vi("y", [1, 4, 4, 4])], inits=[("w", w)], opset=11)
    cal = [{"x": np.random.default_rng(k).standard_normal((1, 2, 6, 6)).astype(np.float32)} for k in range(8)]
    m = graphopt.from_proto(mp)
    q = graphopt.get_pass("quantize-static")
    graphopt.run_passes(m, [q], graphopt.PassContext(calibration=cal))
    assert m.opset() == 13 and "raised from 11" in q.report["opset"]
    onnx.checker.check_model(graphopt.to_proto(m), full_check=True)
    c = graphopt.compare(graphopt.run_ort(mp, cal[0]), graphopt.run_ort(m, cal[0]), rtol=1, atol=1)
    assert c.cosine > 0.999
    m2 = graphopt.from_proto(mp)
    graphopt.run_passes(m2, [graphopt.get_pass("quantize-static", per_channel=False)], graphopt.PassContext(calibration=cal))
    assert m2.opset() == 11


def test_bad_calibration_and_nothing_to_quantize(example_path: Path) -> None:
    m = graphopt.load(example_path)
    q = graphopt.get_pass("quantize-static")
    for bad, msg in (([{"image": CALIB[:1]}], "names do not match"), ([], "empty"),
                     ([{"input": np.full((1, 1, 8, 8), np.nan, np.float32)}], "NaN"),
                     ([{"input": CALIB[:1, :, :4]}], "dim 2")):
        with pytest.raises(InputSpecError, match=msg):
            graphopt.run_passes(graphopt.load(example_path), [q], graphopt.PassContext(calibration=bad))
    with pytest.raises(GraphoptError, match="calibration data"):
        graphopt.run_passes(m, [q])
    relu = graphopt.from_proto(make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [vi("y", [2])]))
    with pytest.raises(GraphoptError, match="nothing to quantize"):
        graphopt.run_passes(relu, [q], graphopt.PassContext(calibration=[{"x": np.ones(2, np.float32)}]))


def test_cli_quantize(tmp_path: Path, example_path: Path) -> None:
    out = tmp_path / "q.onnx"
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "quantize", str(example_path), "-o", str(out),
                        "--calibration", str(FIXTURES / "digits_calib.npz"), "--method", "percentile"],
                       cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "quantized_nodes" in r.stdout and "top-1 agreement" in r.stdout
    assert _accuracy(out) > 0.98
    small = tmp_path / "q_small.onnx"  # same quantization, short internal names: smaller, same outputs
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "quantize", str(example_path), "-o", str(small),
                        "--calibration", str(FIXTURES / "digits_calib.npz"), "--method", "percentile",
                        "--compact-names"], cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert small.stat().st_size < out.stat().st_size
    np.testing.assert_array_equal(graphopt.run_ort(small, {"input": DIGITS["x"][:64]})["logits"],
                                  graphopt.run_ort(out, {"input": DIGITS["x"][:64]})["logits"])
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=CALIB[:4])
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "quantize", str(example_path), "-o", str(tmp_path / "b.onnx"),
                        "--calibration", str(bad)], cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "b.onnx").exists()


def _outlier_model() -> tuple[onnx.ModelProto, list[dict]]:
    """Two MatMuls; the second one's input has rare huge outliers, so per-tensor uint8 ranges
    crush its ordinary values: it is the sensitive layer."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 16)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((16, 8)).astype(np.float32) * 0.3
    spike = np.zeros((1, 16), np.float32)
    spike[0, 3] = 500.0
    mp = make_model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                     helper.make_node("Add", ["h", "spike"], ["hs"], name="add"),
                     helper.make_node("MatMul", ["hs", "w2"], ["y"], name="mm2")],
                    [vi("x", [1, 16])], [vi("y", [1, 8])], inits=[("w1", w1), ("w2", w2), ("spike", spike)])
    cal = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(32)]
    return mp, cal


def test_sensitivity_and_mixed_precision_meet_the_budget() -> None:
    mp, cal = _outlier_model()
    m = graphopt.from_proto(mp)
    q = graphopt.get_pass("quantize-static", sensitivity=True)
    graphopt.run_passes(m, [q], graphopt.PassContext(calibration=cal))
    sens = q.report["sensitivity"]
    assert list(sens)[0] == "mm2" and sens["mm2"] > 3 * sens["mm1"]
    all_err = q.report["error_all_int8"]
    budget = all_err / 3
    m2 = graphopt.from_proto(mp)
    q2 = graphopt.get_pass("quantize-static", max_error=budget)
    graphopt.run_passes(m2, [q2], graphopt.PassContext(calibration=cal))
    assert q2.report["kept_float"] == ["mm2"] and q2.report["error"] <= budget
    ops = [n.op_type for n in m2.graph]
    assert ops.count("QuantizeLinear") >= 1 and "mm2" in [n.name for n in m2.graph if n.op_type == "MatMul"]
    # the kept-float layer reads a float value: no Q/DQ in front of mm2's outlier input
    mm2 = [n for n in m2.graph if n.name == "mm2"][0]
    assert mm2.input(0).producer.op_type == "Add"
    assert q2.report["sqnr_db"] and all(isinstance(v, float) for v in q2.report["sqnr_db"].values())
    # an impossible budget is reported, not silently ignored
    with pytest.raises(GraphoptError, match="cannot meet max_error"):
        graphopt.run_passes(graphopt.from_proto(mp), [graphopt.get_pass("quantize-static", max_error=-1.0)],
                            graphopt.PassContext(calibration=cal))


def test_user_metric_callback() -> None:
    mp, cal = _outlier_model()
    calls = []

    def metric(ref, got):
        calls.append(1)
        return max(float(np.abs(r["y"] - g["y"]).max()) for r, g in zip(ref, got, strict=True))

    q = graphopt.get_pass("quantize-static", max_error=1e9, metric=metric)
    graphopt.run_passes(graphopt.from_proto(mp), [q], graphopt.PassContext(calibration=cal))
    assert calls and q.report["kept_float"] == []


def test_report_gives_sqnr_per_tensor(example_path: Path) -> None:
    m = graphopt.load(example_path)
    graphopt.optimize(m)
    q = graphopt.get_pass("quantize-static")
    graphopt.run_passes(m, [q], graphopt.PassContext(calibration=_calib(16)))
    sq = q.report["sqnr_db"]
    assert len(sq) == q.report["quantized_tensors"] and all(15 < v < 60 for v in sq.values()), sq


MODELS = Path(__file__).resolve().parents[1] / "benchmarks" / "models"


@pytest.mark.parametrize("mode", ["dynamic", "weight-only"])
def test_dynamic_and_weight_only_on_transformer(tmp_path: Path, mode: str) -> None:
    src = MODELS / "encoder_op17.onnx"
    m = graphopt.load(src)
    graphopt.optimize(m)
    graphopt.save(m, tmp_path / "fp32.onnx")
    q = graphopt.get_pass("quantize-dynamic", mode=mode)
    graphopt.run_passes(m, [q, "dce"])
    graphopt.save(m, tmp_path / "q.onnx")
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    assert q.report["quantized_matmuls"] >= 9
    assert (tmp_path / "q.onnx").stat().st_size < 0.35 * (tmp_path / "fp32.onnx").stat().st_size
    x = {"input": np.random.default_rng(0).standard_normal((4, 12, 16)).astype(np.float32)}
    c = graphopt.compare(graphopt.run_ort(src, x), graphopt.run_ort(tmp_path / "q.onnx", x), rtol=1, atol=1)
    assert c.cosine > 0.999 and c.top1 == 1.0, (c.cosine, c.top1)
    if mode == "dynamic":
        ops = [n.op_type for n in _ort_graph(tmp_path / "q.onnx").node]
        assert "MatMulIntegerToFloat" in ops or "DynamicQuantizeMatMul" in ops, ops


def test_cli_dynamic_needs_no_calibration(tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "quantize", str(MODELS / "encoder_op17.onnx"), "-o",
                        str(out), "--dynamic"], cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "quantized_matmuls" in r.stdout
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "quantize", str(MODELS / "encoder_op17.onnx"), "-o",
                        str(tmp_path / "s.onnx")], cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--calibration" in r.stderr


def test_histogram_methods_clip_outliers() -> None:
    from graphopt.passes.quantize.calibrate import RangeObserver

    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000).astype(np.float32)
    x[:5] = 80.0  # a few outliers
    obs = RangeObserver()
    obs.observe("t", x)
    obs.observe_hist("t", x)
    lo, hi = obs.range("t", "minmax")
    assert hi == pytest.approx(80.0)
    for method in ("percentile", "entropy"):
        lo_m, hi_m = obs.range("t", method)
        assert 2.0 < hi_m < 20.0 and lo_m < -2.0, (method, lo_m, hi_m)

    def mse(a: float, b: float) -> float:
        s = (b - a) / 255
        q = np.clip(np.round((x - a) / s), 0, 255) * s + a
        return float(np.mean((q - x) ** 2))

    lo_m, hi_m = obs.range("t", "mse")
    assert lo <= lo_m <= 0 <= hi_m <= hi and mse(lo_m, hi_m) <= mse(lo, hi)



def _two_convs(seed: int = 0) -> tuple[onnx.ModelProto, list[dict]]:
    """Conv -> Relu -> Conv whose first layer has channel ranges spread over 4 decades, fed
    with a non-zero-mean input: per-tensor int8 weights suffer, CLE and bias correction help."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * np.logspace(-2, 2, 8, dtype=np.float32)[:, None, None, None]
    w2 = (rng.standard_normal((4, 8, 3, 3)) / np.logspace(-2, 2, 8)[None, :, None, None]).astype(np.float32)
    mp = make_model([helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1], name="c1"),
                     helper.make_node("Relu", ["c"], ["r"], name="relu"),
                     helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1], name="c2")],
                    [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 8, 8])],
                    inits=[("w1", w1), ("b1", (rng.standard_normal(8) * np.logspace(-2, 2, 8)).astype(np.float32)),
                           ("w2", w2)])
    cal = [{"x": (rng.standard_normal((1, 3, 8, 8)) + 2.0).astype(np.float32)} for _ in range(32)]
    return mp, cal


def _rel_err(mp: onnx.ModelProto, m: graphopt.Model, cal: list[dict]) -> float:
    errs = []
    for f in cal[:16]:
        a = graphopt.run_ort(mp, f)["y"].astype(np.float64)
        b = graphopt.run_ort(m, f)["y"].astype(np.float64)
        errs.append(np.linalg.norm(a - b) / np.linalg.norm(a))
    return float(np.mean(errs))


def test_cross_layer_equalization_is_exact_and_helps_per_tensor_int8() -> None:
    mp, cal = _two_convs()
    eq = graphopt.from_proto(mp)
    assert graphopt.run_passes(eq, ["equalize-cross-layer"])
    c = graphopt.compare(graphopt.run_ort(mp, cal[0]), graphopt.run_ort(eq, cal[0]), rtol=1e-4, atol=1e-4)
    assert c.ok, c.problems  # exact in float
    # min_channel_sqnr=None: keep every conv int8, else the spread channels keep both convs float
    plain = graphopt.from_proto(mp)
    graphopt.run_passes(plain, [graphopt.get_pass("quantize-static", per_channel=False, min_channel_sqnr=None)],
                        graphopt.PassContext(calibration=cal))
    cle = graphopt.from_proto(mp)
    graphopt.run_passes(cle, [graphopt.get_pass("quantize-static", per_channel=False, equalize=True,
                                                min_channel_sqnr=None)],
                        graphopt.PassContext(calibration=cal))
    e_plain, e_cle = _rel_err(mp, plain, cal), _rel_err(mp, cle, cal)
    assert e_cle < 0.5 * e_plain, (e_plain, e_cle)


def test_bias_correction_reduces_systematic_error() -> None:
    mp, cal = _two_convs(1)  # min_channel_sqnr=None: both convs int8 (their channel ranges are spread)
    plain = graphopt.from_proto(mp)
    graphopt.run_passes(plain, [graphopt.get_pass("quantize-static", per_channel=False, min_channel_sqnr=None)],
                        graphopt.PassContext(calibration=cal))
    bc = graphopt.from_proto(mp)
    q = graphopt.get_pass("quantize-static", per_channel=False, bias_correction=True, min_channel_sqnr=None)
    graphopt.run_passes(bc, [q], graphopt.PassContext(calibration=cal))
    assert q.report.get("bias_corrected") == 2
    assert _rel_err(mp, bc, cal) < _rel_err(mp, plain, cal)


TRANSFORMER = FIXTURES / "digits_transformer.onnx"


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_trained_transformer_int8_accuracy(tmp_path: Path, kind: str) -> None:
    """A transformer-like model trained on the digits (rows as tokens): <= 1 point lost."""
    fp = _accuracy(TRANSFORMER)
    assert fp > 0.94
    m = graphopt.load(TRANSFORMER)
    graphopt.optimize(m)
    if kind == "static":
        p = graphopt.get_pass("quantize-static", method="percentile")
        graphopt.run_passes(m, [p, "dce"], graphopt.PassContext(calibration=_calib()))
    else:
        p = graphopt.get_pass("quantize-dynamic")
        graphopt.run_passes(m, [p, "dce"])
    graphopt.save(m, tmp_path / "q.onnx")
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    acc = _accuracy(tmp_path / "q.onnx")
    assert acc >= fp - 0.01, (fp, acc)
    # every projection weight (the bulk of the parameters) is stored as int8
    q = onnx.load(str(tmp_path / "q.onnx"))
    int8 = sum(int(np.prod(t.dims)) for t in q.graph.initializer if t.data_type == onnx.TensorProto.INT8)
    fl = sum(int(np.prod(t.dims)) for t in q.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert int8 > 8000 and int8 > 4 * fl, (int8, fl)


def test_if_and_loop_bodies_are_calibrated_and_quantized(tmp_path: Path) -> None:
    """Activations inside If branches and a Loop body are calibrated (brought out of the bodies
    by the calibration session) and get Q/DQ there, including a body reading an outer value;
    the outputs stay close to float on both branches, and ORT fuses the bodies to integer ops."""
    rng = np.random.default_rng(0)
    w, w2 = rng.standard_normal((8, 8)).astype(np.float32), rng.standard_normal((8, 8)).astype(np.float32) * 0.3
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w_in"], ["t0"], name="then_mm"),
                                helper.make_node("Relu", ["t0"], ["t"])], "then", [], [vi("t", [1, 8])],
                               [onnx.numpy_helper.from_array(w, "w_in")])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [vi("e", [1, 8])])
    body = helper.make_graph([helper.make_node("MatMul", ["h", "w_loop"], ["h1"], name="loop_mm"),
                              helper.make_node("Tanh", ["h1"], ["h2"]), helper.make_node("Identity", ["cond"], ["co"])],
                             "body", [vi("i", [], onnx.TensorProto.INT64), vi("cond", [], onnx.TensorProto.BOOL),
                                      vi("h", [1, 8])],
                             [vi("co", [], onnx.TensorProto.BOOL), vi("h2", [1, 8])],
                             [onnx.numpy_helper.from_array(w2, "w_loop")])
    mp = make_model([helper.make_node("MatMul", ["x0", "w0"], ["x"], name="outer_mm"),
                     helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="if"),
                     helper.make_node("Loop", ["n", "", "y"], ["z"], body=body, name="loop")],
                    [vi("x0", [1, 8]), vi("c", [], onnx.TensorProto.BOOL), vi("n", [], onnx.TensorProto.INT64)],
                    [vi("z", [1, 8])], inits=[("w0", rng.standard_normal((8, 8)).astype(np.float32))])
    cal = [{"x0": rng.standard_normal((1, 8)).astype(np.float32), "c": np.array(k % 2 == 0),
            "n": np.array(3, np.int64)} for k in range(16)]
    m = graphopt.from_proto(mp)
    q = graphopt.get_pass("quantize-static")
    graphopt.run_passes(m, [q, "dce"], graphopt.PassContext(calibration=cal))
    assert q.report["subgraph_quantized_nodes"] == 2 and q.report["quantized_nodes"] == 1
    if_node = next(n for n in m.graph if n.op_type == "If")
    then_ops = [n.op_type for n in if_node.attr("then_branch")]
    # x is quantized in the main graph (outer_mm's output); the branch dequantizes it locally
    assert then_ops.count("DequantizeLinear") == 3 and then_ops.count("QuantizeLinear") == 1, then_ops
    loop_ops = [n.op_type for n in next(n for n in m.graph if n.op_type == "Loop").attr("body")]
    assert loop_ops.count("QuantizeLinear") >= 1 and loop_ops.count("DequantizeLinear") >= 2, loop_ops
    # the outer graph's own readers of x are not rewired into the body's Q/DQ
    assert all(n.graph is m.graph for n in m.graph)
    graphopt.save(m, tmp_path / "q.onnx")
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    for c in (True, False):
        f = {"x0": cal[1]["x0"], "c": np.array(c), "n": np.array(3, np.int64)}
        assert graphopt.compare(graphopt.run_ort(mp, f), graphopt.run_ort(tmp_path / "q.onnx", f),
                                rtol=1, atol=1).cosine > 0.995
    def all_ops(g: onnx.GraphProto) -> list[str]:
        out = []
        for n in g.node:
            out.append(n.op_type)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    out += all_ops(a.g)
        return out

    assert all_ops(_ort_graph(tmp_path / "q.onnx")).count("QLinearMatMul") >= 2


def test_exclude_op_types() -> None:
    mp, cal = _outlier_model()
    m = graphopt.from_proto(mp)
    q = graphopt.get_pass("quantize-static", exclude_op_types=("MatMul",), op_types=("MatMul", "Conv"))
    with pytest.raises(GraphoptError, match="nothing to quantize"):
        graphopt.run_passes(m, [q], graphopt.PassContext(calibration=cal))


def test_symmetric_activations(tmp_path: Path, example_path: Path) -> None:
    m = graphopt.load(example_path)
    graphopt.optimize(m)
    q = graphopt.get_pass("quantize-static", symmetric_activations=True)
    graphopt.run_passes(m, [q, "dce"], graphopt.PassContext(calibration=_calib()))
    graphopt.save(m, tmp_path / "s8.onnx")
    onnx.checker.check_model(str(tmp_path / "s8.onnx"), full_check=True)
    mp = onnx.load(str(tmp_path / "s8.onnx"))
    zp_names = {n.input[2] for n in mp.graph.node if n.op_type == "QuantizeLinear"}
    zps = [t for t in mp.graph.initializer if t.name in zp_names]
    assert zps and all(t.data_type == onnx.TensorProto.INT8 for t in zps)
    assert _accuracy(tmp_path / "s8.onnx") >= 0.985


def _mobilenetv3_block(opset: int) -> tuple[onnx.ModelProto, list[dict]]:
    """Conv -> hard-swish -> depthwise conv -> hard-swish -> squeeze-excite (ReduceMean, two 1x1
    convs, HardSigmoid gate, Mul) -> 1x1 conv, as torch exports MobileNetV3: hard-swish as the
    HardSwish op at opset >= 14, as HardSigmoid * x below."""
    rng = np.random.default_rng(3)
    inits = [("w1", rng.standard_normal((16, 8, 1, 1)).astype(np.float32) * 0.4),
             ("b1", rng.standard_normal(16).astype(np.float32) * 0.1),
             ("wd", rng.standard_normal((16, 1, 3, 3)).astype(np.float32) * 0.4),
             ("bd", rng.standard_normal(16).astype(np.float32) * 0.1),
             ("ws1", rng.standard_normal((4, 16, 1, 1)).astype(np.float32) * 0.4),
             ("ws2", rng.standard_normal((16, 4, 1, 1)).astype(np.float32) * 0.4),
             ("w3", rng.standard_normal((8, 16, 1, 1)).astype(np.float32) * 0.3)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"])]

    def hswish(x: str, y: str) -> None:
        if opset >= 14:
            nodes.append(helper.make_node("HardSwish", [x], [y]))
        else:
            nodes.extend([helper.make_node("HardSigmoid", [x], [y + "_g"], alpha=1 / 6, beta=0.5),
                          helper.make_node("Mul", [x, y + "_g"], [y])])

    hswish("c1", "h1")
    nodes.append(helper.make_node("Conv", ["h1", "wd", "bd"], ["d"], group=16, pads=[1, 1, 1, 1]))
    hswish("d", "h2")
    if opset >= 18:
        inits.append(("axes", np.array([2, 3], np.int64)))
        nodes.append(helper.make_node("ReduceMean", ["h2", "axes"], ["m"], keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceMean", ["h2"], ["m"], axes=[2, 3], keepdims=1))
    nodes += [helper.make_node("Conv", ["m", "ws1"], ["s1"]), helper.make_node("Relu", ["s1"], ["s1r"]),
              helper.make_node("Conv", ["s1r", "ws2"], ["s2"]),
              helper.make_node("HardSigmoid", ["s2"], ["gate"], alpha=0.2, beta=0.5),
              helper.make_node("Mul", ["h2", "gate"], ["se"]), helper.make_node("Conv", ["se", "w3"], ["y"])]
    mp = make_model(nodes, [vi("x", [1, 8, 12, 12])], [vi("y", [1, 8, 12, 12])], inits, opset=opset)
    cal = [{"x": rng.standard_normal((1, 8, 12, 12)).astype(np.float32)} for _ in range(16)]
    return mp, cal


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_hard_swish_and_squeeze_excite_stay_integer(tmp_path: Path, opset: int) -> None:
    """ORT has no integer HardSigmoid/HardSwish or ReduceMean: graphopt rewrites them into forms
    it runs as QLinearAdd / QLinearMul / QLinearGlobalAveragePool, so a MobileNetV3 block is
    integer from the first QuantizeLinear to the last DequantizeLinear."""
    mp, cal = _mobilenetv3_block(opset)
    m = graphopt.from_proto(mp)
    q = graphopt.get_pass("quantize-static")
    graphopt.run_passes(m, [q, "dce"], graphopt.PassContext(calibration=cal))
    graphopt.save(m, tmp_path / "q.onnx")
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    assert q.report["int8_hardsigmoid"] == 3 and q.report["pooled_reduce_means"] == 1
    assert q.report["decomposed_hardswish"] == (2 if opset >= 14 else 0)
    ops = [n.op_type for n in _ort_graph(tmp_path / "q.onnx").node]
    assert ops.count("QLinearConv") == 5, ops  # the depthwise conv too
    assert ops.count("QLinearMul") == 3 and ops.count("QLinearAdd") == 3 and "QLinearGlobalAveragePool" in ops, ops
    float_ops = {"Conv", "HardSigmoid", "HardSwish", "Mul", "Add", "ReduceMean", "GlobalAveragePool"}
    assert not float_ops & set(ops), ops
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1, ops
    ref = graphopt.run_ort(mp, cal[0])["y"]
    got = graphopt.run_ort(tmp_path / "q.onnx", cal[0])["y"]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.06


def test_residual_block_and_mean_head_stay_integer(tmp_path: Path) -> None:
    """Add -> Relu is quantized after the Relu only (ORT then runs QLinearAdd; a Q/DQ between them
    would requantize), and a ReduceMean head without keepdims becomes GlobalAveragePool +
    Flatten (QLinearGlobalAveragePool): the whole net is integer."""
    rng = np.random.default_rng(5)
    inits = [("w0", rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3),
             ("w1", rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2),
             ("w2", rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2),
             ("fc", rng.standard_normal((10, 8)).astype(np.float32) * 0.3), ("fcb", np.zeros(10, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1] * 4), helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1] * 4), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1] * 4), helper.make_node("Add", ["c2", "r0"], ["a"]),
             helper.make_node("Relu", ["a"], ["r2"]),
             helper.make_node("ReduceMean", ["r2"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Gemm", ["m", "fc", "fcb"], ["y"], transB=1)]
    mp = make_model(nodes, [vi("x", [1, 3, 16, 16])], [vi("y", [1, 10])], inits, opset=13)
    cal = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(16)]
    m = graphopt.from_proto(mp)
    q = graphopt.get_pass("quantize-static")
    graphopt.run_passes(m, [q, "dce"], graphopt.PassContext(calibration=cal))
    graphopt.save(m, tmp_path / "q.onnx")
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    assert q.report["pooled_reduce_means"] == 1
    ops = [n.op_type for n in _ort_graph(tmp_path / "q.onnx").node]
    assert ops.count("QLinearConv") == 3 and ops.count("QLinearAdd") == 1 and "QGemm" in ops, ops
    assert "QLinearGlobalAveragePool" in ops and not {"Add", "Relu", "ReduceMean", "Gemm"} & set(ops), ops
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1, ops
    for c in cal[:4]:
        ref, got = graphopt.run_ort(mp, c)["y"], graphopt.run_ort(tmp_path / "q.onnx", c)["y"]
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05


def test_bias_that_overflows_int32_widens_its_channel_scale() -> None:
    """A channel whose weights are tiny next to its bias (a near-zero BN gamma folded in) would
    need an int32 bias beyond range at scale x_scale * w_scale: its weight scale is widened so
    the bias fits, instead of wrapping around."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
    w[2] *= 1e-9
    b = np.array([0.1, -0.2, 5.0, 0.3], np.float32)
    mp = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1] * 4)], [vi("x", [1, 3, 8, 8])],
                    [vi("y", [1, 4, 8, 8])], [("w", w), ("b", b)], opset=13)
    cal = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    m = graphopt.from_proto(mp)
    q = graphopt.get_pass("quantize-static")
    graphopt.run_passes(m, [q, "dce"], graphopt.PassContext(calibration=cal))
    assert q.report["widened_weight_scales"] == 1 and "bias_clipped" not in q.report
    onnx.checker.check_model(graphopt.to_proto(m), full_check=True)
    ref, got = graphopt.run_ort(mp, cal[0])["y"], graphopt.run_ort(m, cal[0])["y"]
    np.testing.assert_allclose(got[0, 2], ref[0, 2], atol=0.05)  # the tiny channel: its bias, not garbage
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.03


def _silu_hardswish_net(kind: str) -> tuple[onnx.ModelProto, list[dict]]:
    """Conv -> activation -> (MaxPool, nearest Resize) -> two convs reading it. ``kind``:
    "silu" (x * Sigmoid(x), YOLO detectors) or "paddle_hardswish" (x * Clip(x + 3, 0, 6) / 6,
    PaddlePaddle's export of HardSwish)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1], name="conv1")]
    if kind == "silu":
        nodes += [helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["a"])]
    else:
        nodes += [helper.make_node("Add", ["c", "three"], ["c3"]), helper.make_node("Clip", ["c3", "zero", "six"], ["cl"]),
                  helper.make_node("Mul", ["c", "cl"], ["m"]), helper.make_node("Div", ["m", "six"], ["a"])]
    nodes += [helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("Resize", ["p", "", "scales"], ["u"], mode="nearest"),
              helper.make_node("Conv", ["u", "w2"], ["y1"], pads=[1, 1, 1, 1], name="conv2"),
              helper.make_node("Conv", ["u", "w3"], ["y2"], name="conv3")]
    mp = make_model(nodes, [vi("x", [1, 3, 16, 16])], [vi("y1", [1, 8, 16, 16]), vi("y2", [1, 4, 16, 16])],
                    inits=[("w1", (rng.standard_normal((8, 3, 3, 3)) * 0.5).astype(np.float32)),
                           ("b1", (rng.standard_normal(8) * 0.3).astype(np.float32)),
                           ("w2", (rng.standard_normal((8, 8, 3, 3)) * 0.2).astype(np.float32)),
                           ("w3", (rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32)),
                           ("three", np.array(3.0, np.float32)), ("zero", np.array(0.0, np.float32)),
                           ("six", np.array(6.0, np.float32)),
                           ("scales", np.array([1, 1, 2, 2], np.float32))], opset=13)
    return mp, [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(16)]


@pytest.mark.parametrize("kind", ["silu", "paddle_hardswish"])
def test_detector_activations_and_resampling_stay_integer(tmp_path: Path, kind: str) -> None:
    """SiLU (QLinearSigmoid + QLinearMul), PaddlePaddle's HardSwish (the +3 constant quantized so
    the Add is QLinearAdd and the Clip its saturation; the / 6 folded into the scale), MaxPool and
    nearest Resize (their input's scale and zero point, so ORT runs them on uint8): ORT's graph has
    no float op left between the convolutions - where ORT's own quantizer leaves Div in float."""
    mp, cal = _silu_hardswish_net(kind)
    m = graphopt.from_proto(mp)
    q = graphopt.get_pass("quantize-static")
    graphopt.run_passes(m, [q, "dce"], graphopt.PassContext(calibration=cal))
    path = tmp_path / "q.onnx"
    graphopt.save(m, path)
    onnx.checker.check_model(str(path), full_check=True)
    ops = [n.op_type for n in _ort_graph(path).node]
    assert ops.count("QLinearConv") == 3, ops
    floats = {"Sigmoid", "Mul", "Add", "Clip", "Div", "MaxPool"} & set(ops)
    assert not floats, ops
    assert ops.count("DequantizeLinear") == 2 and ops.count("QuantizeLinear") == 1, ops  # in once, out twice
    if kind == "silu":
        assert "QLinearSigmoid" in ops and "QLinearMul" in ops
    else:
        assert "QLinearAdd" in ops and q.report["folded_scales"] == 1 and q.report["int8_add_constants"] == 1
    for f in cal[:4]:
        ref, got = graphopt.run_ort(mp, f), graphopt.run_ort(path, f)
        for k in ref:
            assert np.linalg.norm(ref[k] - got[k]) / np.linalg.norm(ref[k]) < 0.05, k


def test_recurrent_weights_are_stored_int8(tmp_path: Path) -> None:
    """A CRNN-like net (MatMul -> LSTM): the MatMul is quantized statically, the LSTM's W and R
    are stored as int8 behind a DequantizeLinear (no static int8 LSTM exists), so the file
    shrinks about 4x while the sequence output stays close."""
    rng = np.random.default_rng(0)
    hid, inp = 32, 16
    mp = make_model([helper.make_node("MatMul", ["x", "w0"], ["h0"], name="proj"),
                     helper.make_node("LSTM", ["h0", "W", "R", "B"], ["y", "", ""], hidden_size=hid,
                                      direction="bidirectional", name="lstm")],
                    [vi("x", [6, 1, inp])], [vi("y", [6, 2, 1, hid])],
                    inits=[("w0", (rng.standard_normal((inp, inp)) * 0.3).astype(np.float32)),
                           ("W", (rng.standard_normal((2, 4 * hid, inp)) * 0.2).astype(np.float32)),
                           ("R", (rng.standard_normal((2, 4 * hid, hid)) * 0.2).astype(np.float32)),
                           ("B", (rng.standard_normal((2, 8 * hid)) * 0.1).astype(np.float32))], opset=13)
    cal = [{"x": rng.standard_normal((6, 1, inp)).astype(np.float32)} for _ in range(16)]
    m = graphopt.from_proto(mp)
    q = graphopt.get_pass("quantize-static", recurrent="weights")  # "auto" picks by timing: see test_quantize_placement
    graphopt.run_passes(m, [q, "dce"], graphopt.PassContext(calibration=cal))
    assert q.report["int8_recurrent_weights"] == 2 and q.report["quantized_nodes"] == 1
    lstm = next(n for n in m.graph if n.op_type == "LSTM")
    for i in (1, 2):
        dq = lstm.input(i).producer
        assert dq.op_type == "DequantizeLinear" and dq.input(0).const_value().dtype == np.int8
    graphopt.save(m, tmp_path / "q.onnx")
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    assert (tmp_path / "q.onnx").stat().st_size < 0.35 * len(mp.SerializeToString())
    for f in cal[:4]:
        ref, got = graphopt.run_ort(mp, f)["y"], graphopt.run_ort(tmp_path / "q.onnx", f)["y"]
        assert np.linalg.norm(ref - got) / np.linalg.norm(ref) < 0.05


def _narrow_channels_into_depthwise(seed: int = 0) -> tuple[onnx.ModelProto, list[dict]]:
    """What BN folding leaves in MobileNetV3-style OCR recognizers (ppocrv3_rec lost 37 points
    of character accuracy to it): a 1x1 conv whose output channels span 3 decades of range,
    HardSwish (not scale-equivariant: cross-layer equalization cannot move the spread), then a
    depthwise conv whose per-channel weights are largest on the narrowest channels."""
    rng = np.random.default_rng(seed)
    spread = np.logspace(-1.5, 1.5, 8).astype(np.float32)
    w1 = (rng.standard_normal((8, 3, 1, 1)) * spread[:, None, None, None]).astype(np.float32)
    w2 = (rng.standard_normal((8, 1, 3, 3)) / spread[:, None, None, None]).astype(np.float32)
    w3 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    mp = make_model([helper.make_node("Conv", ["x", "w1"], ["c"], name="pw1"),
                     helper.make_node("HardSwish", ["c"], ["h"], name="hs"),
                     helper.make_node("Conv", ["h", "w2"], ["d"], group=8, pads=[1, 1, 1, 1], name="dw"),
                     helper.make_node("Conv", ["d", "w3"], ["y"], name="pw2")],
                    [vi("x", [1, 3, 12, 12])], [vi("y", [1, 4, 12, 12])],
                    inits=[("w1", w1), ("w2", w2), ("w3", w3)])
    cal = [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(24)]
    return mp, cal


def test_narrow_channels_before_a_depthwise_conv_stay_float() -> None:
    mp, cal = _narrow_channels_into_depthwise()
    errs, reports = {}, {}
    for limit in (None, 5.0):
        m = graphopt.from_proto(mp)
        q = graphopt.get_pass("quantize-static", min_channel_sqnr=limit)
        graphopt.run_passes(m, [q], graphopt.PassContext(calibration=cal))
        onnx.checker.check_model(graphopt.to_proto(m), full_check=True)
        errs[limit], reports[limit] = _rel_err(mp, m, cal), q.report
    assert errs[None] > 0.2, errs  # the failure: per-tensor int8 rounds the narrow channels away
    assert errs[5.0] < 0.05, errs
    assert reports[None]["kept_float_channel_spread"] == []
    assert set(reports[5.0]["kept_float_channel_spread"]) == {"pw1", "dw"}
    assert all(v < 5.0 for v in reports[5.0]["channel_sqnr_db"].values())
    assert reports[5.0]["quantized_nodes"] == 1  # the last 1x1 conv, reading a well-spread map, stays int8
    assert set(reports[5.0]["kept_float"]) == {"pw1", "dw"}


def test_dynamic_refuses_matmuls_whose_weights_are_loop_carried(tmp_path) -> None:
    """A MatMul inside a Loop body whose weight enters as a Loop-carried value (paddle2onnx writes
    such models) cannot be rewritten: quantize --dynamic refuses, naming the node and the reason,
    instead of writing the float model with exit 0. With a constant weight it quantizes."""
    from onnx import TensorProto, numpy_helper

    from graphopt.cli import main

    def model(const_weight: bool) -> onnx.ModelProto:
        w_in = "w_const" if const_weight else "w_in"
        body = helper.make_graph(
            [helper.make_node("MatMul", ["h_in", w_in], ["h_out"], name="body_mm"),
             helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_id"),
             helper.make_node("Identity", ["w_in"], ["w_out"], name="w_id")],
            "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 16]),
             helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [16, 16])],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 16]),
             helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [16, 16])],
            initializer=[numpy_helper.from_array(np.eye(16, dtype=np.float32) * 0.5, "w_const")] if const_weight else [])
        rng = np.random.default_rng(0)
        g = helper.make_graph(
            [helper.make_node("Loop", ["trips", "cond", "x", "w"], ["h", "w_final"], body=body, name="loop")],
            "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
            [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 16])],
            initializer=[numpy_helper.from_array(np.array(3, np.int64), "trips"),
                         numpy_helper.from_array(np.array(True), "cond"),
                         numpy_helper.from_array(rng.normal(size=(16, 16)).astype(np.float32) * 0.3, "w")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    src, out = tmp_path / "loop.onnx", tmp_path / "q.onnx"
    onnx.save(model(False), src)
    assert main(["quantize", str(src), "-o", str(out), "--dynamic"]) == 2
    assert not out.exists()
    src2 = tmp_path / "loop_const.onnx"
    onnx.save(model(True), src2)
    assert main(["quantize", str(src2), "-o", str(out), "--dynamic"]) == 0
    ops = {n.op_type for g in [onnx.load(str(out)).graph] for n in g.node[0].attribute[0].g.node}
    assert "MatMulInteger" in ops
