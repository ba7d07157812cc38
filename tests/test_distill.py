"""graphopt distill (PyTorch engine): the torch lowering reproduces ONNX Runtime, training lowers
the loss and moves the student towards the teacher, only the trained initializers change, a QDQ
student comes back as the same valid QDQ model, and unsupported ops are refused by name."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from graphopt.passes.distill.lower import TorchGraph

import graphopt
from graphopt.errors import UnsupportedModelError
from graphopt.runtime import run_ort
from graphopt.transform import PassContext, get_pass, get_pipeline, run_passes

torch.set_num_threads(1)


def _vi(name: str, shape: list, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _model(nodes: list, inputs: list, outputs: list, inits: dict[str, np.ndarray], opset: int = 13) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "t", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _torch_run(m: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tg = TorchGraph(m)
    with torch.no_grad():
        return {k: v.numpy() for k, v in tg({k: torch.from_numpy(v) for k, v in feed.items()}).items()}


def _assert_matches_ort(m: onnx.ModelProto, feed: dict[str, np.ndarray], rtol: float = 1e-5) -> None:
    ref = run_ort(m, feed)
    got = _torch_run(m, feed)
    assert set(ref) == set(got)
    for k, r in ref.items():
        assert got[k].shape == r.shape, k
        np.testing.assert_allclose(got[k], r, rtol=rtol, atol=rtol * max(1.0, float(np.abs(r).max())), err_msg=k)


def _rand(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def cnn(seed: int = 0) -> onnx.ModelProto:
    """A small CNN classifier: Conv-BN-Relu-MaxPool-Conv(pads asymmetric)-HardSwish-GAP-Reshape-Gemm-Softmax,
    with an int64 shape initializer and BN statistics that must stay as they are."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": _rand(rng, 8, 3, 3, 3), "b1": _rand(rng, 8), "bn_s": 1 + _rand(rng, 8, scale=0.1),
        "bn_b": _rand(rng, 8, scale=0.1), "bn_m": _rand(rng, 8, scale=0.1), "bn_v": 1 + np.abs(_rand(rng, 8, scale=0.1)),
        "w2": _rand(rng, 12, 8, 3, 3, scale=0.2), "b2": _rand(rng, 12), "shape": np.array([-1, 12], np.int64),
        "w3": _rand(rng, 5, 12), "b3": _rand(rng, 5),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[0, 0, 1, 1], name="conv2"),
        helper.make_node("HardSwish", ["c2"], ["h2"], name="hswish"),
        helper.make_node("GlobalAveragePool", ["h2"], ["g"], name="gap"),
        helper.make_node("Reshape", ["g", "shape"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1, name="fc"),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=-1, name="softmax"),
    ]
    m = _model(nodes, [_vi("x", ["N", 3, 8, 8])], [_vi("prob", ["N", 5])], inits, opset=14)
    m.metadata_props.add(key="labels", value="a,b,c,d,e")
    return m


def perturbed(m: onnx.ModelProto, amount: float = 0.4, seed: int = 1) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    rng = np.random.default_rng(seed)
    for t in out.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and t.name in ("w1", "b1", "w2", "b2", "w3", "b3"):
            t.CopyFrom(numpy_helper.from_array(
                (a + amount * a.std() * rng.standard_normal(a.shape)).astype(np.float32), t.name))
    return out


def _data(n: int = 32, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# the lowering against ONNX Runtime
# ---------------------------------------------------------------------------------------------
def test_lowering_matches_ort_on_a_cnn() -> None:
    m = cnn()
    feed = {"x": np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    _assert_matches_ort(m, feed)
    tg = TorchGraph(m)
    # float weights are parameters; BN statistics and the shape stay fixed
    assert set(tg.param_names) == {"w1", "b1", "bn_s", "bn_b", "w2", "b2", "w3", "b3"}
    assert {"bn_m", "bn_v", "shape"} <= set(tg.fixed)


def test_lowering_matches_ort_on_shape_and_layout_ops() -> None:
    rng = np.random.default_rng(0)
    inits = {"wt": _rand(rng, 3, 4, 3, 3), "axes": np.array([0], np.int64), "starts": np.array([1, 0], np.int64),
             "ends": np.array([100, -1], np.int64), "sl_axes": np.array([2, 3], np.int64),
             "pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "split": np.array([2, 2], np.int64),
             "scales": np.array([1, 1, 2, 2], np.float32), "w_mm": _rand(rng, 5, 7), "clip_lo": np.array(-0.5, np.float32),
             "clip_hi": np.array(0.7, np.float32), "red_axes": np.array([1], np.int64), "idx": np.array([2, 0], np.int64)}
    nodes = [
        helper.make_node("ConvTranspose", ["x", "wt"], ["ct"], strides=[2, 2], pads=[1, 1, 0, 0], output_padding=[1, 1]),
        helper.make_node("Pad", ["ct", "pads"], ["pd"], mode="reflect"),
        helper.make_node("Slice", ["pd", "starts", "ends", "sl_axes"], ["sl"]),
        helper.make_node("AveragePool", ["sl"], ["ap"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 0]),
        helper.make_node("Resize", ["ap", "", "scales"], ["rs"], mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("Split", ["rs", "split"], ["s0", "s1"], axis=1),
        helper.make_node("Concat", ["s1", "s0"], ["cc"], axis=1),
        helper.make_node("LeakyRelu", ["cc"], ["lr"], alpha=0.1),
        helper.make_node("HardSigmoid", ["lr"], ["hs"], alpha=0.3, beta=0.4),
        helper.make_node("Clip", ["lr", "clip_lo", "clip_hi"], ["cl"]),
        helper.make_node("Add", ["hs", "cl"], ["ad"]),
        helper.make_node("Transpose", ["ad"], ["tr"], perm=[0, 2, 3, 1]),
        helper.make_node("Shape", ["tr"], ["shp"]),
        helper.make_node("Gather", ["shp", "idx"], ["g"]),
        helper.make_node("ReduceMean", ["tr"], ["rm"], axes=[1], keepdims=0),
        helper.make_node("Unsqueeze", ["rm", "axes"], ["us"]),
        helper.make_node("Squeeze", ["us", "axes"], ["sq"]),
        helper.make_node("Identity", ["sq"], ["sq2"]),
        helper.make_node("Flatten", ["sq2"], ["fl"], axis=2),
        helper.make_node("Sigmoid", ["fl"], ["sg"]),
        helper.make_node("Softmax", ["sg"], ["out"], axis=-1),
        helper.make_node("Cast", ["g"], ["gf"], to=TensorProto.FLOAT),
    ]
    m = _model(nodes, [_vi("x", [1, 3, 5, 6])], [_vi("out", ["a", "b"]), _vi("gf", ["c"])], inits)
    _assert_matches_ort(m, {"x": _rand(rng, 1, 3, 5, 6, scale=1.0)})


def test_lowering_softmax_before_opset_13_flattens_from_axis() -> None:
    nodes = [helper.make_node("Softmax", ["x"], ["y"], axis=1)]
    m = _model(nodes, [_vi("x", [2, 3, 4])], [_vi("y", [2, 3, 4])], {}, opset=11)
    _assert_matches_ort(m, {"x": _rand(np.random.default_rng(0), 2, 3, 4, scale=2.0)})


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_lowering_lstm_matches_ort(direction: str) -> None:
    rng = np.random.default_rng(0)
    d, h, i = (2 if direction == "bidirectional" else 1), 5, 4
    inits = {"W": _rand(rng, d, 4 * h, i), "R": _rand(rng, d, 4 * h, h), "B": _rand(rng, d, 8 * h)}
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y", "yh", "yc"], hidden_size=h, direction=direction)]
    m = _model(nodes, [_vi("x", [6, 2, i])], [_vi("y", ["t", "d", "n", "h"]), _vi("yh", ["d", "n", "h"]), _vi("yc", ["d", "n", "h"])], inits)
    _assert_matches_ort(m, {"x": _rand(rng, 6, 2, i, scale=1.0)})
    assert set(TorchGraph(m).param_names) == {"W", "R", "B"}


def test_lowering_matches_ort_on_a_corpus_model() -> None:
    from benchmarks.corpus import fetch, model_path

    fetch(["ppocr_cls"])  # 0.6 MB PaddleOCR line-orientation CNN: Constant-node weights, HardSigmoid, Clip...
    m = onnx.load(model_path("ppocr_cls"))
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 48, 192)).astype(np.float32)}
    _assert_matches_ort(m, feed, rtol=1e-4)
    assert len(TorchGraph(m).param_names) > 50  # its Constant-node conv weights are trainable


def test_unsupported_op_is_refused_by_name() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="ok"),
             helper.make_node("NonZero", ["r"], ["nz"], name="the_nonzero")]
    m = _model(nodes, [_vi("x", [3])], [_vi("nz", [1, "k"], TensorProto.INT64)], {})
    with pytest.raises(UnsupportedModelError, match=r"node 'the_nonzero': op NonZero is not supported"):
        TorchGraph(m)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def _rel_err(a: onnx.ModelProto | str, b: onnx.ModelProto | str, data: list[dict[str, np.ndarray]]) -> float:
    num = den = 0.0
    for f in data:
        ra, rb = run_ort(a, f)["prob"], run_ort(b, f)["prob"]
        num += float(np.sum((ra - rb) ** 2))
        den += float(np.sum(ra ** 2))
    return float(np.sqrt(num / den))


def _kl(teacher: onnx.ModelProto, student: onnx.ModelProto | str, data: list[dict[str, np.ndarray]]) -> float:
    """Mean KL(teacher || student) of the class probabilities (what the distillation minimizes at T=1)."""
    out = []
    for f in data:
        p, q = run_ort(teacher, f)["prob"], run_ort(student, f)["prob"]
        out.append(float(np.sum(p * (np.log(p) - np.log(q)))))
    return float(np.mean(out))


def test_distill_lowers_the_loss_and_writes_back_only_the_trained_weights() -> None:
    teacher = cnn()
    student_proto = perturbed(teacher)
    data, held_out = _data(64), _data(16, seed=9)
    student = graphopt.from_proto(student_proto)
    p = get_pass("distill", teacher=graphopt.from_proto(teacher), steps=100, lr=1e-2, temperature=1.0,
                 progress=False)
    run_passes(student, [p], PassContext(calibration=data))
    rep = p.result
    assert rep.steps == 100 and rep.losses == {"prob": "kl"}
    assert rep.loss_last < 0.3 * rep.loss_first
    out = graphopt.to_proto(student)
    onnx.checker.check_model(out, full_check=True)
    # closer to the teacher on samples it was not trained on (random inputs: a modest generalization)
    assert _kl(teacher, out, held_out) < 0.6 * _kl(teacher, student_proto, held_out)
    assert _rel_err(teacher, out, held_out) < 0.8 * _rel_err(teacher, student_proto, held_out)
    # the graph is the same: nodes, inputs, outputs, metadata; only float weights changed
    assert [(n.op_type, list(n.input), list(n.output), n.attribute) for n in out.graph.node] == \
        [(n.op_type, list(n.input), list(n.output), n.attribute) for n in student_proto.graph.node]
    assert [i.name for i in out.graph.input] == [i.name for i in student_proto.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in student_proto.graph.output]
    assert {p.key: p.value for p in out.metadata_props} == {"labels": "a,b,c,d,e"}
    old = {t.name: numpy_helper.to_array(t) for t in student_proto.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert old.keys() == new.keys()
    changed = {k for k in old if not np.array_equal(old[k], new[k])}
    assert changed == {"w1", "b1", "bn_s", "bn_b", "w2", "b2", "w3", "b3"}
    for k, a in old.items():
        assert a.dtype == new[k].dtype and a.shape == new[k].shape, k


def test_distill_labels_alone_learn_the_labels() -> None:
    """alpha=0: cross-entropy on the labels only (the teacher is not used): the student learns
    labels the teacher disagrees with."""
    teacher = cnn()
    data = _data(16)
    labels = np.arange(16) % 5
    student = graphopt.from_proto(perturbed(teacher))
    p = get_pass("distill", teacher=graphopt.from_proto(teacher), labels=labels, alpha=0.0, steps=150, lr=3e-2,
                 progress=False)
    run_passes(student, [p], PassContext(calibration=data))
    pred = [int(run_ort(student, f)["prob"].argmax()) for f in data]
    assert np.mean(np.array(pred) == labels) >= 0.9


def test_distill_unlabeled_samples_get_no_cross_entropy() -> None:
    """Label -1 marks a transfer-set sample without a label: the labeled ones are learned, the
    unlabeled ones add nothing to the label loss (with alpha=0 and no label at all, nothing moves)."""
    teacher = cnn()
    data = _data(16)
    labels = np.where(np.arange(16) < 8, np.arange(16) % 5, -1)
    student = graphopt.from_proto(perturbed(teacher))
    p = get_pass("distill", teacher=graphopt.from_proto(teacher), labels=labels, alpha=0.0, steps=150, lr=3e-2,
                 progress=False)
    run_passes(student, [p], PassContext(calibration=data))
    pred = np.array([int(run_ort(student, f)["prob"].argmax()) for f in data[:8]])
    assert np.mean(pred == labels[:8]) >= 0.9

    before = perturbed(teacher)
    student = graphopt.from_proto(before)
    p = get_pass("distill", teacher=graphopt.from_proto(teacher), labels=np.full(16, -1), alpha=0.0, steps=5,
                 lr=3e-2, progress=False)
    run_passes(student, [p], PassContext(calibration=data))
    after = {t.name: numpy_helper.to_array(t) for t in graphopt.to_proto(student).graph.initializer}
    for t in before.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), after[t.name])

    with pytest.raises(Exception, match=r"class indices in \[0, 5\) \(or -1: unlabeled\)"):
        run_passes(graphopt.from_proto(perturbed(teacher)),
                   [get_pass("distill", teacher=graphopt.from_proto(teacher), labels=np.full(16, -2), steps=1,
                             progress=False)], PassContext(calibration=data))


def test_qat_distill_exports_the_same_valid_qdq_model() -> None:
    teacher = graphopt.from_proto(cnn())
    student = graphopt.from_proto(perturbed(cnn(), amount=0.3))
    data = _data(32)
    run_passes(student, get_pipeline("default"))  # BatchNorm folded, as graphopt quantize does
    run_passes(student, [get_pass("quantize-static"), get_pass("dce")], PassContext(calibration=data))
    q_proto = graphopt.to_proto(student)
    assert sum(n.op_type == "DequantizeLinear" for n in q_proto.graph.node) >= 6
    tg = TorchGraph(q_proto)
    assert tg.qat_params  # the int8 weights (and int32 biases) train through fake quantization
    p = get_pass("distill", teacher=teacher, steps=80, lr=3e-3, progress=False)
    run_passes(student, [p], PassContext(calibration=data))
    out = graphopt.to_proto(student)
    onnx.checker.check_model(out, full_check=True)
    assert [(n.op_type, list(n.input), list(n.output)) for n in out.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in q_proto.graph.node]
    old = {t.name: numpy_helper.to_array(t) for t in q_proto.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    changed = {k for k in old if not np.array_equal(old[k], new[k])}
    assert set(tg.qat_params) == set(tg.param_names)  # every weight is int8 (biases int32)
    assert changed == set(tg.param_names)  # scales, zero points, activations' Q/DQ untouched
    for k in changed:
        assert new[k].dtype == old[k].dtype and new[k].dtype in (np.int8, np.int32)
        if new[k].dtype == np.int8:
            assert new[k].min() >= -127 and new[k].max() <= 127  # the quantizer's symmetric range kept
    t_proto = graphopt.to_proto(teacher)
    held_out = _data(16, seed=9)
    assert _kl(t_proto, out, held_out) < 0.6 * _kl(t_proto, q_proto, held_out)
    # the torch module's fake quantization is what ONNX Runtime runs from the written model
    feed = held_out[0]
    np.testing.assert_allclose(_torch_run(out, feed)["prob"], run_ort(out, feed)["prob"], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def test_cli_distill(tmp_path, capsys) -> None:
    from graphopt.cli import main

    teacher, student = tmp_path / "t.onnx", tmp_path / "s.onnx"
    onnx.save(cnn(), teacher)
    onnx.save(perturbed(cnn()), student)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.concatenate([f["x"] for f in _data(16)]))
    out = tmp_path / "o.onnx"
    rc = main(["distill", str(student), "-o", str(out), "--teacher", str(teacher), "--data", str(data),
               "--steps", "30", "--lr", "1e-2", "--threads", "1", "--match", "auto"])
    assert rc == 0 and out.exists()
    text = capsys.readouterr().out
    assert "loss (first 10 / last 10 steps)" in text and "matched features" in text
    assert _rel_err(str(teacher), str(out), _data(8, 5)) < _rel_err(str(teacher), str(student), _data(8, 5))
    # bad input: one line, exit 2, nothing written
    bad = tmp_path / "bad.onnx"
    labels = tmp_path / "l.npy"
    np.save(labels, np.zeros(3, np.int64))
    for argv, msg in [(["--steps", "5", "--minutes", "1"], "--steps or --minutes"),
                      (["--labels", str(labels)], "3 labels for 16 --data samples"),
                      (["--match", "nope=c2"], "'nope' is not a tensor of the teacher")]:
        rc = main(["distill", str(student), "-o", str(bad), "--teacher", str(teacher), "--data", str(data), *argv])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and err.count("\n") == 1, err
        assert not bad.exists()
        assert not list(tmp_path.glob(".graphopt-*"))


def test_cli_distill_checks_on_held_out_inputs(tmp_path, capsys, caplog) -> None:
    """Without --inputs the check runs on the training data and says so; with --inputs it runs on
    those held-out samples (the report's output check names its data)."""
    import json

    from graphopt.cli import main

    teacher, student = tmp_path / "t.onnx", tmp_path / "s.onnx"
    onnx.save(cnn(), teacher)
    onnx.save(perturbed(cnn()), student)
    data, held = tmp_path / "d.npz", tmp_path / "h.npz"
    np.savez(data, x=np.concatenate([f["x"] for f in _data(8)]))
    np.savez(held, x=np.concatenate([f["x"] for f in _data(5, 7)]))
    base = ["distill", str(student), "--teacher", str(teacher), "--data", str(data), "--steps", "3", "--threads", "1"]
    with caplog.at_level("WARNING", logger="graphopt"):
        assert main([*base, "-o", str(tmp_path / "a.onnx"), "--report", str(tmp_path / "a.json")]) == 0
    assert "in-sample" in caplog.text
    assert json.loads((tmp_path / "a.json").read_text())["verification"]["data"] == "data"
    caplog.clear()
    with caplog.at_level("WARNING", logger="graphopt"):
        assert main([*base, "-o", str(tmp_path / "b.onnx"), "--inputs", str(held), "--report", str(tmp_path / "b.json")]) == 0
    assert "in-sample" not in caplog.text
    v = json.loads((tmp_path / "b.json").read_text())["verification"]
    assert v["data"] == "inputs" and v["samples"] == 5


def test_distill_snapshots_the_weights_along_the_way(tmp_path) -> None:
    """snapshot= gets, every snapshot_minutes, a copy of the student with the weights trained so far
    (the same graph; the student itself is only written at the end), and its time is not training time."""
    import time

    teacher = cnn()
    student_proto = perturbed(teacher)
    student = graphopt.from_proto(student_proto)
    snaps: list[tuple[int, float, onnx.ModelProto]] = []

    def snap(m: graphopt.Model, step: int, seconds: float) -> None:
        snaps.append((step, seconds, graphopt.to_proto(m)))
        time.sleep(0.3)  # a slow scorer: must not eat the training budget

    p = get_pass("distill", teacher=graphopt.from_proto(teacher), minutes=0.02, lr=1e-2, temperature=1.0,
                 progress=False, snapshot_minutes=0.004, snapshot=snap)
    t0 = time.monotonic()
    run_passes(student, [p], PassContext(calibration=_data(16)))
    assert time.monotonic() - t0 > 1.2 + 0.3 * len(snaps) - 0.1  # 1.2 s of training, snapshots on top
    assert 2 <= len(snaps) <= 5 and p.result.seconds >= 1.2
    steps = [s for s, _, _ in snaps]
    assert steps == sorted(steps) and steps[0] > 0 and steps[-1] < p.result.steps
    assert all(0.24 * (i + 1) <= sec < 0.24 * (i + 1) + 0.2 for i, (_, sec, _) in enumerate(snaps))
    final = graphopt.to_proto(student)
    w = [{t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in
         (student_proto, *[m for _, _, m in snaps], final)]
    for a, b in itertools.pairwise(w):
        assert not np.array_equal(a["w1"], b["w1"])  # each snapshot has the weights of its time
    for _, _, m in snaps:
        onnx.checker.check_model(m, full_check=True)
        assert [n.op_type for n in m.graph.node] == [n.op_type for n in student_proto.graph.node]


def test_cli_distill_snapshot_every(tmp_path) -> None:
    from graphopt.cli import main

    teacher, student = tmp_path / "t.onnx", tmp_path / "s.onnx"
    onnx.save(cnn(), teacher)
    onnx.save(perturbed(cnn()), student)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.concatenate([f["x"] for f in _data(16)]))
    out = tmp_path / "o.onnx"
    assert main(["distill", str(student), "-o", str(out), "--teacher", str(teacher), "--data", str(data),
                 "--minutes", "0.02", "--snapshot-every", "0.005", "--threads", "1", "-q"]) == 0
    snaps = sorted(tmp_path.glob("o.t*s.onnx"))
    assert out.exists() and 1 <= len(snaps) <= 4, snaps
    for s in snaps:
        onnx.checker.check_model(str(s), full_check=True)


# ---------------------------------------------------------------------------------------------
# sequence-level (CTC) distillation of a per-frame [N, T, C] recognizer output
# ---------------------------------------------------------------------------------------------
def frame_model(seed: int = 0, blank_bias: float = 1.0, frames: int = 16, feats: int = 6,
                classes: int = 6) -> onnx.ModelProto:
    """A tiny CTC 'recognizer': x [N, T, F] -> MatMul-Add-Relu-MatMul-Add -> Softmax over C per
    frame ([N, T, C] probabilities, blank 0 raised by ``blank_bias``)."""
    rng = np.random.default_rng(seed)
    b3 = _rand(rng, classes)
    b3[0] += blank_bias
    inits = {"w1": _rand(rng, feats, 12, scale=0.8), "b1": _rand(rng, 12, scale=0.2),
             "w3": _rand(rng, 12, classes, scale=0.8), "b3": b3}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "w3"], ["z0"]),
             helper.make_node("Add", ["z0", "b3"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=-1)]
    return _model(nodes, [_vi("x", ["N", frames, feats])], [_vi("prob", ["N", frames, classes])], inits)


def _frame_data(n: int, seed: int, frames: int = 16, feats: int = 6) -> list[dict[str, np.ndarray]]:
    """Inputs in runs of 1-3 equal frames (a glyph spans several frames, as in a text line)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        runs = np.repeat(rng.standard_normal((frames, feats)), rng.integers(1, 4, frames), axis=0)[:frames]
        out.append({"x": (runs + 0.1 * rng.standard_normal(runs.shape))[None].astype(np.float32)})
    return out


def _decode(p: np.ndarray, blank: int = 0) -> list[list[int]]:
    """Greedy CTC decode per sample, written independently of the library's."""
    return [[k for k, _ in itertools.groupby(row.argmax(-1).tolist()) if k != blank] for row in p]


def _ctc_and_match(teacher: onnx.ModelProto, student: Any, data: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """(mean CTC loss of the student on the teacher's greedy transcripts, share of samples whose
    greedy transcripts are equal)."""
    losses, same = [], []
    for f in data:
        p, q = run_ort(teacher, f)["prob"], run_ort(student, f)["prob"]
        tgt = _decode(p)[0]
        lp = torch.log(torch.from_numpy(q).clamp_min(1e-12)).transpose(0, 1)
        losses.append(float(torch.nn.functional.ctc_loss(lp, torch.tensor([tgt], dtype=torch.long).reshape(1, -1),
                                                         torch.tensor([q.shape[1]]), torch.tensor([len(tgt)]))))
        same.append(_decode(q) == _decode(p))
    return float(np.mean(losses)), float(np.mean(same))


def test_greedy_ctc_targets_collapse_repeats_and_drop_blanks() -> None:
    from graphopt.passes.distill.train import greedy_ctc_targets

    def onehot(seqs: list[list[int]], c: int = 4) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor(seqs), c).float() * 0.9 + 0.025

    # "a a _ a b b" -> a a b; no blank at all -> collapse only; all blank -> empty
    tg, lens = greedy_ctc_targets(onehot([[1, 1, 0, 1, 2, 2], [3, 1, 1, 2, 3, 3], [0, 0, 0, 0, 0, 0]]))
    assert lens.tolist() == [3, 4, 0]
    assert tg.tolist() == [1, 1, 2, 3, 1, 2, 3]
    tg, lens = greedy_ctc_targets(onehot([[1, 1, 0, 3, 3, 3]]), blank=3)
    assert lens.tolist() == [2] and tg.tolist() == [1, 0]


@pytest.mark.parametrize(("loss", "blank_bias", "ctc_factor"), [("ctc", 1.0, 0.5), ("framekl", 2.0, 0.7)])
def test_sequence_losses_lower_the_ctc_loss_and_match_the_teachers_transcripts(loss: str, blank_bias: float,
                                                                               ctc_factor: float) -> None:
    """``ctc`` (CTC on the teacher's greedy transcripts + KL) and ``framekl`` (per-frame KL weighted
    by the teacher's non-blank mass; its teacher mostly blank, as a text line's): the loss falls,
    the CTC loss on the teacher's transcripts falls on held-out inputs (framekl: 2.37 -> 1.33 when
    written), the training inputs' transcripts (16 frames: 4-10 labels) are read exactly far more
    often, and the graph is unchanged."""
    teacher = frame_model(blank_bias=blank_bias)
    student_proto = perturbed(teacher, amount=0.4)
    data, held_out = _frame_data(64, seed=0), _frame_data(24, seed=5)
    ctc_before, _ = _ctc_and_match(teacher, student_proto, held_out)
    _, same_before = _ctc_and_match(teacher, student_proto, data)
    student = graphopt.from_proto(student_proto)
    p = get_pass("distill", teacher=graphopt.from_proto(teacher), losses={"prob": loss}, steps=200, lr=1e-2,
                 temperature=1.0, progress=False)
    run_passes(student, [p], PassContext(calibration=data))
    rep = p.result
    assert rep.losses == {"prob": loss} and rep.loss_last < 0.5 * rep.loss_first
    out = graphopt.to_proto(student)
    onnx.checker.check_model(out, full_check=True)
    ctc_after, _ = _ctc_and_match(teacher, out, held_out)
    assert ctc_after < ctc_factor * ctc_before
    _, same_after = _ctc_and_match(teacher, out, data)
    assert same_after > same_before + 0.2
    assert [(n.op_type, list(n.input), list(n.output)) for n in out.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in student_proto.graph.node]


@pytest.mark.parametrize("blank_bias", [60.0, -60.0])
def test_ctc_distill_with_all_blank_or_blank_free_teacher_transcripts(blank_bias: float) -> None:
    """A teacher that reads nothing (every frame blank: empty targets) or never emits a blank
    (targets as long as the collapsed frames): the loss stays finite and falls; a student of
    the all-blank teacher learns to read nothing."""
    teacher = frame_model(blank_bias=blank_bias)
    data = _frame_data(24, seed=0)
    t_best = np.concatenate([run_ort(teacher, f)["prob"].argmax(-1) for f in data])
    assert (t_best == 0).all() if blank_bias > 0 else (t_best != 0).all()
    student_proto = perturbed(frame_model(seed=3), amount=0.0)  # another tiny model: a real gap
    student = graphopt.from_proto(student_proto)
    p = get_pass("distill", teacher=graphopt.from_proto(teacher), losses={"prob": "ctc"}, steps=120, lr=3e-2,
                 temperature=1.0, progress=False)
    run_passes(student, [p], PassContext(calibration=data))
    rep = p.result
    assert np.isfinite(rep.curve).all() and rep.loss_last < 0.5 * rep.loss_first
    ctc_before, same_before = _ctc_and_match(teacher, student_proto, data)
    ctc_after, same_after = _ctc_and_match(teacher, student, data)
    assert ctc_after < ctc_before and same_after >= same_before
    if blank_bias > 0:
        assert same_after == 1.0


def test_ctc_loss_needs_per_frame_scores_and_a_valid_blank() -> None:
    teacher = frame_model()
    data = _frame_data(4, seed=0)
    for spec, msg in [("ctc:6", r"blank index below C"), ("ctc:x", r"integer >= 0"), ("kl:1", r"unknown loss")]:
        with pytest.raises(Exception, match=msg):
            run_passes(graphopt.from_proto(perturbed(teacher)),
                       [get_pass("distill", teacher=graphopt.from_proto(teacher), losses={"prob": spec}, steps=1,
                                 progress=False)], PassContext(calibration=data))
    with pytest.raises(Exception, match=r"needs \[N, T, C\] per-frame scores"):
        run_passes(graphopt.from_proto(perturbed(cnn())),
                   [get_pass("distill", teacher=graphopt.from_proto(cnn()), losses={"prob": "ctc"}, steps=1,
                             progress=False)], PassContext(calibration=_data(4)))


def test_cli_distill_loss_ctc(tmp_path, capsys) -> None:
    from graphopt.cli import main

    teacher, student = tmp_path / "t.onnx", tmp_path / "s.onnx"
    onnx.save(frame_model(), teacher)
    onnx.save(perturbed(frame_model(), amount=0.4), student)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.concatenate([f["x"] for f in _frame_data(16, seed=0)]))
    out = tmp_path / "o.onnx"
    rc = main(["distill", str(student), "-o", str(out), "--teacher", str(teacher), "--data", str(data),
               "--steps", "20", "--lr", "1e-2", "--threads", "1", "--loss", "prob=ctc"])
    assert rc == 0 and out.exists()
    assert "prob: ctc" in capsys.readouterr().out
    bad = tmp_path / "bad.onnx"
    for spec, msg in [("prob=ctc:6", "blank index below C"), ("prob=ctc:-1", "integer >= 0")]:
        rc = main(["distill", str(student), "-o", str(bad), "--teacher", str(teacher), "--data", str(data),
                   "--steps", "2", "--loss", spec])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and err.count("\n") == 1, err
        assert not bad.exists()


# ---------------------------------------------------------------------------------------------
# framekl: per-frame KL of a CTC output, frames weighted by the teacher's non-blank probability
# ---------------------------------------------------------------------------------------------
def _objective_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, blank: int = 0,
                    floor: float = 0.1) -> float:
    from graphopt.passes.distill.train import DistillConfig, _Objective

    obj = _Objective({"prob": kind}, {"prob": True}, DistillConfig(temperature=1.0, blank_floor=floor), None,
                     {"prob": 1.0}, [], {})
    obj.blanks = {"prob": blank}
    return float(obj({"prob": student}, {"prob": teacher}, None))


def test_framekl_weights_frames_by_the_teachers_non_blank_probability() -> None:
    from graphopt.passes.distill.train import blank_frame_weights

    sure_blank, sure_a = [0.98, 0.01, 0.01], [0.02, 0.96, 0.02]
    teacher = torch.tensor([[sure_blank, sure_blank, sure_a, sure_blank]])
    w = blank_frame_weights(teacher, blank=0, floor=0.1, probs=True)
    assert torch.allclose(w, torch.tensor([[0.118, 0.118, 0.982, 0.118]]))
    # logits give the same weights as their softmax; another blank index, other weights
    assert torch.allclose(blank_frame_weights(torch.log(teacher), 0, 0.1, probs=False), w, atol=1e-6)
    assert torch.allclose(blank_frame_weights(teacher, 2, 0.1, probs=True), torch.tensor([[0.991, 0.991, 0.982, 0.991]]))
    assert torch.allclose(blank_frame_weights(teacher, 0, 1.0, probs=True), torch.ones(1, 4))  # floor 1: plain KL

    def kl_frames(s: torch.Tensor) -> np.ndarray:  # per-frame KL(teacher || student), independently
        p, q = teacher.double().numpy()[0], s.double().numpy()[0]
        return np.sum(p * (np.log(p) - np.log(q)), -1)

    wrong_on_blank = teacher.clone()
    wrong_on_blank[0, 0] = torch.tensor([0.3, 0.4, 0.3])
    wrong_on_char = teacher.clone()
    wrong_on_char[0, 2] = torch.tensor([0.5, 0.3, 0.2])
    wn = w.double().numpy()[0]
    for s in (wrong_on_blank, wrong_on_char):
        k = kl_frames(s)
        assert _objective_loss("framekl", s, teacher) == pytest.approx(np.sum(wn * k) / np.sum(wn), rel=1e-4)
        assert _objective_loss("kl", s, teacher) == pytest.approx(np.mean(k), rel=1e-4)
        assert _objective_loss("framekl", s, teacher, floor=1.0) == pytest.approx(np.mean(k), rel=1e-4)
    # an error on a sure-blank frame weighs less than under the plain per-frame mean, one on the
    # character's frame more
    assert _objective_loss("framekl", wrong_on_blank, teacher) < 0.5 * _objective_loss("kl", wrong_on_blank, teacher)
    assert _objective_loss("framekl", wrong_on_char, teacher) > 2 * _objective_loss("kl", wrong_on_char, teacher)
    assert _objective_loss("framekl", teacher, teacher) == pytest.approx(0.0, abs=1e-6)


def test_framekl_needs_a_valid_blank_and_floor(tmp_path, capsys) -> None:
    from graphopt.cli import main

    teacher = frame_model()
    data = _frame_data(4, seed=0)
    for spec, floor, msg in [("framekl:6", 0.1, r"blank index below C"), ("framekl:x", 0.1, r"integer >= 0"),
                             ("framekl", 1.5, r"blank_floor must be in \[0, 1\]")]:
        with pytest.raises(Exception, match=msg):
            run_passes(graphopt.from_proto(perturbed(teacher)),
                       [get_pass("distill", teacher=graphopt.from_proto(teacher), losses={"prob": spec}, steps=1,
                                 blank_floor=floor, progress=False)], PassContext(calibration=data))
    t, s = tmp_path / "t.onnx", tmp_path / "s.onnx"
    onnx.save(teacher, t)
    onnx.save(perturbed(teacher, amount=0.4), s)
    d = tmp_path / "d.npz"
    np.savez(d, x=np.concatenate([f["x"] for f in _frame_data(16, seed=0)]))
    out = tmp_path / "o.onnx"
    assert main(["distill", str(s), "-o", str(out), "--teacher", str(t), "--data", str(d), "--steps", "10",
                 "--lr", "1e-2", "--threads", "1", "--loss", "prob=framekl:0"]) == 0
    assert "prob: framekl" in capsys.readouterr().out
    bad = tmp_path / "bad.onnx"
    rc = main(["distill", str(s), "-o", str(bad), "--teacher", str(t), "--data", str(d), "--steps", "2",
               "--loss", "prob=framekl:6"])
    err = capsys.readouterr().err
    assert rc == 2 and "blank index below C" in err and err.count("\n") == 1, err
    assert not bad.exists()
