"""float16 / bfloat16 conversion (issue 15): weight-only, full compute with the type-fix rules,
block list, keep-io, If/Loop bodies, the data-driven fallback, and the CLI on a corpus model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import make_model, vi
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import GraphoptError

F16, F32, BF16 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.BFLOAT16


def _convert(mp: onnx.ModelProto, name: str = "float16", calibration=None, **opts) -> tuple[onnx.ModelProto, dict]:
    m = graphopt.from_proto(mp)
    p = graphopt.get_pass(name, **opts)
    graphopt.run_passes(m, [p], graphopt.PassContext(calibration=calibration))
    out = graphopt.to_proto(m)
    onnx.checker.check_model(out, full_check=True)
    return out, p.report


def _run(mp: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 4
    s = ort.InferenceSession(mp.SerializeToString(), so, providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in s.get_inputs()}
    f = {k: (v.astype(np.float16) if types[k] == "tensor(float16)" else v) for k, v in feeds.items() if k in types}
    return s.run(None, f)


def _close(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray], tol: float = 1e-2) -> None:
    for x, y in zip(_run(a, feeds), _run(b, feeds), strict=True):
        assert np.asarray(y).dtype == np.asarray(x).dtype or np.asarray(y).dtype == np.float16
        np.testing.assert_allclose(np.asarray(y, np.float32), x, rtol=tol, atol=tol)


def _nodes(g: onnx.GraphProto) -> list[onnx.NodeProto]:
    out = []
    for n in g.node:
        out.append(n)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out += _nodes(a.g)
    return out


def _types(mp: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value (after onnx's inference), initializers included."""
    inf = onnx.shape_inference.infer_shapes(mp)
    t = {v.name: v.type.tensor_type.elem_type for v in list(inf.graph.value_info) + list(inf.graph.input)
         + list(inf.graph.output)}
    t.update({i.name: i.data_type for i in inf.graph.initializer})
    return t


def _mlp(rng: np.random.Generator, opset: int = 17) -> onnx.ModelProto:
    w1 = rng.standard_normal((8, 32)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((32, 4)).astype(np.float32) * 0.3
    return make_model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
                       helper.make_node("Relu", ["h"], ["r"], name="relu"),
                       helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")],
                      [vi("x", [2, 8])], [vi("y", [2, 4])], [("w1", w1), ("w2", w2)], opset=opset)


# -- weight-only --------------------------------------------------------------------------------
def test_weights_only_halves_weights_same_outputs_and_ort_folds_the_casts(rng, tmp_path):
    mp = _mlp(rng)
    out, rep = _convert(mp, "float16-weights")
    assert rep["weights_converted"] == 2
    assert {t.data_type for t in out.graph.initializer} == {F16}
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2 and all(n.attribute[0].i == F32 for n in casts)
    # compute is float32: same outputs as float32 weights rounded to float16
    ref = mp.__deepcopy__()
    for t in ref.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16).astype(np.float32), t.name))
    x = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    np.testing.assert_allclose(_run(out, x)[0], _run(ref, x)[0], rtol=1e-6, atol=1e-6)
    # ONNX Runtime folds the Casts of constants when it loads the model: its graph has none left
    path = tmp_path / "w.onnx"
    onnx.save(out, str(path))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    assert not [n for n in onnx.load(so.optimized_model_filepath).graph.node if n.op_type == "Cast"]


def test_weights_only_keeps_out_of_range_and_underflowing_weights(rng):
    big = rng.standard_normal((8, 32)).astype(np.float32)
    big[0, 0] = 1e6
    tiny = (rng.standard_normal((32, 4)) * 1e-7).astype(np.float32)
    mp = _mlp(rng)
    mp.graph.initializer[0].CopyFrom(numpy_helper.from_array(big, "w1"))
    mp.graph.initializer[1].CopyFrom(numpy_helper.from_array(tiny, "w2"))
    out, rep = _convert(mp, "float16-weights")
    assert rep["weights_converted"] == 0
    assert "range" in rep["kept_float32"]["w1"] and "underflow" in rep["kept_float32"]["w2"]
    assert {t.data_type for t in out.graph.initializer} == {F32}


def test_weights_only_bfloat16_needs_opset_13(rng):
    _convert(_mlp(rng, opset=13), "float16-weights", dtype="bfloat16")
    with pytest.raises(GraphoptError, match="opset"):
        _convert(_mlp(rng, opset=12), "float16-weights", dtype="bfloat16")


# -- full float16: the type-fix rules ---------------------------------------------------------------
def test_full_mlp_keep_io_and_no_keep_io(rng):
    mp = _mlp(rng)
    x = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    out, rep = _convert(mp)
    t = _types(out)
    assert t["x"] == F32 and t["y"] == F32 and t["r"] == F16 and rep["converted_nodes"] == 3
    assert sum(n.op_type == "Cast" for n in out.graph.node) == 2  # one at each end, nothing in between
    _close(mp, out, x)
    out2, _ = _convert(mp, keep_io=False)
    t2 = _types(out2)
    assert t2["x"] == F16 and t2["y"] == F16
    assert not [n for n in out2.graph.node if n.op_type == "Cast"]
    _close(mp, out2, x)


def test_resize_scales_stay_float32_also_when_computed(rng):
    scales = np.array([1, 1, 2, 2], np.float32)
    mp = make_model([helper.make_node("Relu", ["x"], ["r"]),
                     helper.make_node("Mul", ["s0", "one"], ["s"], name="scale_mul"),  # computed scales
                     helper.make_node("Resize", ["r", "", "s"], ["y1"], mode="linear"),
                     helper.make_node("Resize", ["r", "", "s0"], ["y2"], mode="nearest")],
                    [vi("x", [1, 2, 4, 4])], [vi("y1", [1, 2, 8, 8]), vi("y2", [1, 2, 8, 8])],
                    [("s0", scales), ("one", np.ones(4, np.float32))])
    out, _ = _convert(mp, default_block=False)
    t = _types(out)
    for n in out.graph.node:
        if n.op_type == "Resize":
            assert t[n.input[0]] == F16 and t[n.input[2]] == F32, n
    _close(mp, out, {"x": rng.standard_normal((1, 2, 4, 4)).astype(np.float32)})


def test_cast_to_float_follows_but_int_to_float_stays_exact(rng):
    mp = make_model([helper.make_node("Cast", ["x"], ["c"], to=F32, name="cast_f"),
                     helper.make_node("Relu", ["c"], ["r"]),
                     helper.make_node("Shape", ["x"], ["shp"]),
                     helper.make_node("Cast", ["shp"], ["shpf"], to=F32, name="cast_shape"),
                     helper.make_node("ReduceMax", ["shpf"], ["m"], keepdims=0),
                     helper.make_node("Mul", ["r", "m"], ["y"])],
                    [vi("x", [2, 3])], [vi("y", [2, 3])])
    out, _ = _convert(mp)
    casts = {n.name: n for n in out.graph.node if n.op_type == "Cast"}
    # Cast(to=float) became the boundary Cast to float16 itself: no second Cast reads x
    assert helper.get_attribute_value(casts["cast_f"].attribute[0]) == F16
    assert [n.name for n in out.graph.node if n.op_type == "Cast" and n.input[0] == "x"] == ["cast_f"]
    assert helper.get_attribute_value(casts["cast_shape"].attribute[0]) == F32
    _close(mp, out, {"x": rng.standard_normal((2, 3)).astype(np.float32)})


def test_constant_of_shape_clip_pad_take_the_half_type_range_keeps_float32(rng):
    mp = make_model([helper.make_node("Shape", ["x"], ["shp"]),
                     helper.make_node("ConstantOfShape", ["shp"], ["c"],
                                      value=numpy_helper.from_array(np.array([0.5], np.float32))),
                     helper.make_node("Range", ["r0", "r1", "r2"], ["rg"]),
                     helper.make_node("Add", ["x", "c"], ["a"]),
                     helper.make_node("Add", ["a", "rg"], ["b"]),
                     helper.make_node("Clip", ["b", "lo", "hi"], ["cl"]),
                     helper.make_node("Pad", ["cl", "pads", "pv"], ["y"], mode="constant")],
                    [vi("x", [2, 4])], [vi("y", [2, 6])],
                    [("r0", np.array(0, np.float32)), ("r1", np.array(4, np.float32)),
                     ("r2", np.array(1, np.float32)), ("lo", np.array(-1, np.float32)),
                     ("hi", np.array(3, np.float32)), ("pads", np.array([0, 1, 0, 1], np.int64)),
                     ("pv", np.array(7, np.float32))])
    out, rep = _convert(mp, default_block=False)
    t = _types(out)
    for n in out.graph.node:
        if n.op_type in ("Clip", "Pad"):  # bounds and pad value follow the data's type variable
            assert all(t[i] == F16 for i in n.input[:3] if i and i != "pads"), n
        if n.op_type == "Range":  # Range has no float16 in its schema: stays float32, the Add casts
            assert all(t[i] == F32 for i in n.input)
        if n.op_type == "ConstantOfShape":
            assert n.attribute[0].t.data_type == F16
    assert any("schema: Range" in why for why in rep["kept"].values())
    _close(mp, out, {"x": rng.standard_normal((2, 4)).astype(np.float32)})


def test_eyelike_dtype_follows_random_stays_float32(rng):
    mp = make_model([helper.make_node("EyeLike", ["x"], ["e"], dtype=F32),
                     helper.make_node("RandomUniform", [], ["ru"], dtype=F32, shape=[3, 3]),
                     helper.make_node("Mul", ["ru", "zero"], ["z"]),
                     helper.make_node("Add", ["x", "e"], ["a"]),
                     helper.make_node("Add", ["a", "z"], ["y"])],
                    [vi("x", [3, 3])], [vi("y", [3, 3])], [("zero", np.zeros((), np.float32))])
    out, _ = _convert(mp)
    dt = {n.op_type: helper.get_attribute_value(next(a for a in n.attribute if a.name == "dtype"))
          for n in out.graph.node if n.op_type in ("EyeLike", "RandomUniform")}
    assert dt == {"EyeLike": F16, "RandomUniform": F32}  # ORT's CPU provider has no float16 RandomUniform
    t = _types(out)
    mul = next(n for n in out.graph.node if n.op_type == "Mul")
    assert t[mul.input[0]] == F16  # read through a Cast
    _close(mp, out, {"x": rng.standard_normal((3, 3)).astype(np.float32)})


# -- bodies ---------------------------------------------------------------------------------------
def test_if_branches_converted_with_typed_outputs(rng):
    w = rng.standard_normal((4, 4)).astype(np.float32)
    then = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t1"]), helper.make_node("Relu", ["t1"], ["t"])],
                             "then", [], [vi("t", [2, 4])])
    els = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [vi("e", [2, 4])])
    mp = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els)],
                    [vi("c", [], TensorProto.BOOL), vi("x", [2, 4])], [vi("y", [2, 4])], [("w", w)])
    out, rep = _convert(mp)
    body = [n for n in _nodes(out.graph) if n.op_type == "MatMul"]
    assert body and rep["converted_nodes"] >= 3
    br = {a.name: a.g for a in out.graph.node[-1].attribute} if out.graph.node[-1].op_type == "If" else \
        {a.name: a.g for n in out.graph.node if n.op_type == "If" for a in n.attribute}
    for g in br.values():
        assert g.output[0].type.tensor_type.elem_type == F32
    assert any(t.data_type == F16 for t in out.graph.initializer)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    for c in (True, False):
        _close(mp, out, {"c": np.array(c), "x": x})


def test_loop_body_converted_state_keeps_type(rng):
    w = (rng.standard_normal((4, 4)) * 0.3).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["v_in", "w"], ["m"]), helper.make_node("Add", ["m", "x"], ["a"]),
         helper.make_node("Tanh", ["a"], ["v_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("v_in", [2, 4])],
        [vi("cond_out", [], TensorProto.BOOL), vi("v_out", [2, 4])])
    mp = make_model([helper.make_node("Loop", ["n", "", "v0"], ["y"], body=body)],
                    [vi("x", [2, 4]), vi("v0", [2, 4])], [vi("y", [2, 4])], [("w", w), ("n", np.array(3, np.int64))])
    out, _ = _convert(mp)
    loop = next(n for n in out.graph.node if n.op_type == "Loop")
    g = loop.attribute[0].g
    assert g.output[1].type.tensor_type.elem_type == F32 and g.input[2].type.tensor_type.elem_type == F32
    assert any(n.op_type == "Cast" and n.attribute[0].i == F16 for n in g.node)
    _close(mp, out, {"x": rng.standard_normal((2, 4)).astype(np.float32),
                     "v0": rng.standard_normal((2, 4)).astype(np.float32)})


# -- block list, default list, data --------------------------------------------------------------
def test_block_ops_and_nodes_stay_float32(rng):
    mp = _mlp(rng)
    out, rep = _convert(mp, block_ops=("Relu",))
    t = _types(out)
    assert t["r"] == F32 and t["h"] == F16 and "block list (op)" in rep["kept"]["relu"]
    out2, rep2 = _convert(mp, block_nodes=("mm2",))
    t2 = _types(out2)
    assert t2["y"] == F32 and t2["r"] == F16 and rep2["kept"]["mm2"] == "block list (node)"
    cast_w2 = next(n for n in out2.graph.node if n.op_type == "Cast" and n.output[0] == "w2")  # stored half
    assert {t.data_type for t in out2.graph.initializer if t.name == cast_w2.input[0]} == {F16}
    x = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    _close(mp, out, x)
    _close(mp, out2, x)


def test_softmax_and_reductions_on_the_default_list(rng):
    mp = make_model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Softmax", ["r"], ["s"], name="sm"),
                     helper.make_node("ReduceSum", ["s"], ["y"], keepdims=0, name="rs")],
                    [vi("x", [2, 8])], [vi("y", [])])
    out, rep = _convert(mp)
    assert set(rep["kept"]) == {"sm", "rs"} and _types(out)["r"] == F16
    _close(mp, out, {"x": rng.standard_normal((2, 8)).astype(np.float32)})


def _overflow_model() -> onnx.ModelProto:
    """x*1000*100/100/1000: x in [0, 1] reaches 1e5 in the middle (beyond float16's 65504)."""
    return make_model([helper.make_node("Mul", ["x", "k1"], ["a"], name="up1"),
                       helper.make_node("Mul", ["a", "k2"], ["b"], name="up2"),
                       helper.make_node("Div", ["b", "k2"], ["c"], name="down2"),
                       helper.make_node("Div", ["c", "k1"], ["y"], name="down1")],
                      [vi("x", [4, 8])], [vi("y", [4, 8])],
                      [("k1", np.array(1000, np.float32)), ("k2", np.array(100, np.float32))])


def test_data_driven_fallback_keeps_overflowing_nodes(rng):
    mp = _overflow_model()
    x = {"x": rng.uniform(0.5, 1.0, (4, 8)).astype(np.float32)}
    blind, _ = _convert(mp, probe=0)
    # without data nor probe the 1e5 value is typed float16 (beyond its 65504: inf on a device that
    # computes in float16; ORT's CPU provider may run float16 Mul/Div through float32 kernels, so its
    # outputs alone would not show it)
    assert _types(blind)["b"] == F16
    calib = [{"x": rng.uniform(0, 1, (4, 8)).astype(np.float32)} for _ in range(3)]
    out, rep = _convert(mp, calibration=calib)
    assert "b" in rep["data_flags"] and "reaches" in rep["data_flags"]["b"]
    assert "up2" in rep["kept"] and "down2" in rep["kept"] and "up1" not in rep["kept"]
    assert _types(out)["b"] == F32 and _types(out)["a"] == F16
    _close(mp, out, x)


def test_existing_half_weights_do_not_ping_pong(rng):
    w = rng.standard_normal((8, 4)).astype(np.float16)
    mp = make_model([helper.make_node("Cast", ["w16"], ["w"], to=F32), helper.make_node("MatMul", ["x", "w"], ["y"])],
                    [vi("x", [2, 8])], [vi("y", [2, 4])], [("w16", w)])
    out, _ = _convert(mp)
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2 and not any(c.input[0] == "w16" for c in casts)  # only the I/O casts
    _close(mp, out, {"x": rng.standard_normal((2, 8)).astype(np.float32)})


def test_bfloat16_full_is_valid_and_refuses_old_opsets(rng):
    out, rep = _convert(_mlp(rng), dtype="bfloat16")
    assert _types(out)["r"] == BF16 and rep["converted_nodes"] == 3
    with pytest.raises(GraphoptError, match="opset"):
        _convert(_mlp(rng, opset=12), dtype="bfloat16")


def test_other_domains_left_alone():
    mp = make_model([helper.make_node("Relu", ["x"], ["r"]),
                     helper.make_node("Normalizer", ["r"], ["y"], domain="ai.onnx.ml", norm="L2", name="norm")],
                    [vi("x", [2, 3])], [vi("y", [2, 3])])
    mp.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    out, rep = _convert(mp)
    assert rep["other_domains"] == {"ai.onnx.ml": 1} and "domain" in rep["kept"]["norm"]
    _close(mp, out, {"x": np.arange(6, dtype=np.float32).reshape(2, 3)})


# -- CLI --------------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], capture_output=True, text=True, check=False)


def test_cli_errors_are_one_line_and_write_nothing(rng, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_mlp(rng), str(src))
    for extra in (["--fp16", "--weights-only", "--block-ops", "Relu"], ["--fp16", "--block-nodes", "nope"],
                  ["--fp16", "--bf16"], []):
        r = _cli("convert", str(src), "-o", str(tmp_path / "o.onnx"), *extra)
        assert r.returncode == 2 and r.stderr.startswith("graphopt: error:") and "Traceback" not in r.stderr
        assert not (tmp_path / "o.onnx").exists()


def test_cli_corpus_model_end_to_end(tmp_path):
    pytest.importorskip("PIL", reason="the corpus extra (pip install '.[corpus]') is not installed")
    from benchmarks.corpus import fetch, model_path
    from benchmarks.corpus.data import ort_runner, task, write_inputs

    fetch(["ppocr_cls"])
    src = model_path("ppocr_cls")
    t = task("ppocr_cls")
    write_inputs(t.calibration(4), tmp_path / "calib.npz")
    base = t.evaluate(ort_runner(src), 8)
    for extra, ratio in ((["--weights-only"], 0.6), ([], 0.55), (["--inputs", str(tmp_path / "calib.npz")], 0.55)):
        out = tmp_path / f"o{len(extra)}.onnx"
        r = _cli("convert", str(src), "-o", str(out), "--fp16", *extra)
        assert r.returncode == 0, r.stderr
        assert "size" in r.stdout and out.stat().st_size < ratio * src.stat().st_size
        onnx.checker.check_model(str(out), full_check=True)
        res = t.evaluate(ort_runner(out), 8)
        assert t.agreement(base, res) == 1.0 and abs(res.score - base.score) <= 0.001
    assert src.stat().st_size == Path(model_path("ppocr_cls")).stat().st_size
