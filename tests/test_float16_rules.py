"""float16 type-fix rules on purpose-built models, beyond tests/test_float16.py: the data-free probe
(overflow that comes from the weights), constants beyond the half range, LayerNormalization's
float32 statistics, Scan bodies, *Like random generators, region boundaries without ping-pong, and
the CUDA build of a float16 model through graphopt's TVM backend (no GPU needed)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import make_model, vi
from onnx import TensorProto, helper
from test_float16 import _close, _convert, _nodes, _run, _types

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def _amplifier(rng: np.random.Generator) -> onnx.ModelProto:
    """x @ W (gain ~4e4: values ~1e5, beyond float16) -> ReLU -> / 1e5: what a layer trained in front
    of a normalization looks like (magika v1's dense layers reach 3.7e6). No op here is on any list."""
    w = (rng.standard_normal((16, 8)) * 1e4).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["h"], name="big_mm"),
                       helper.make_node("Relu", ["h"], ["r"], name="relu"),
                       helper.make_node("Mul", ["r", "k"], ["s"], name="down"),
                       helper.make_node("Tanh", ["s"], ["y"], name="tanh")],
                      [vi("x", [4, 16])], [vi("y", [4, 8])], [("w", w), ("k", np.array(1e-5, np.float32))])


def test_probe_keeps_weight_driven_overflow_float32_without_data(rng):
    mp = _amplifier(rng)
    x = {"x": rng.standard_normal((4, 16)).astype(np.float32)}
    blind, rep0 = _convert(mp, probe=0)
    assert _types(blind)["h"] == F16 and rep0["probe"] == {}
    out, rep = _convert(mp)  # the default: probe on one random feed
    assert rep["probe"] == {"samples": 1, "flagged": len(rep["probe_flags"])} and rep["probe"]["flagged"] >= 2
    assert "random probe inputs" in rep["probe_flags"]["h"] and rep["data_flags"] == {}
    # the flagged values' producers and readers stay float32; the region ends where values are small
    assert {"big_mm", "relu", "down"} <= set(rep["kept"]) and "tanh" not in rep["kept"]
    t = _types(out)
    tanh = next(n for n in out.graph.node if n.op_type == "Tanh")
    assert t["h"] == F32 and t["r"] == F32 and t["s"] == F32 and t[tanh.input[0]] == F16
    _close(mp, out, x)
    # the probe does not replace data: with calibration samples it is not run
    _, rep2 = _convert(mp, calibration=[x])
    assert rep2["probe"] == {} and rep2["probe_flags"] == {} and "on the data" in rep2["data_flags"]["h"]
    # --no-default-block converts everything (no list, no probe)
    _, rep3 = _convert(mp, default_block=False)
    assert rep3["probe"] == {} and not rep3["kept"]


def test_probe_skipped_with_a_reason_when_random_inputs_do_not_run(rng):
    # a sequence input: no random feed for it; the conversion goes on without the probe, and says so
    seq = helper.make_tensor_sequence_value_info("s", F32, [2, 3])
    mp = make_model([helper.make_node("SequenceAt", ["s", "i0"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
                    [seq], [vi("y", [2, 3])], [("i0", np.array(0, np.int64))])
    out, rep = _convert(mp)
    assert rep["probe"]["samples"] == 0 and "'s'" in rep["probe"]["skipped"]
    assert _types(out)["y"] == F32


def test_constant_beyond_half_range_keeps_its_reader_float32(rng):
    mp = make_model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                     helper.make_node("Mul", ["r", "big"], ["m"], name="mul_big"),
                     helper.make_node("Mul", ["m", "small"], ["y"], name="mul_small")],
                    [vi("x", [2, 4])], [vi("y", [2, 4])],
                    [("big", np.array(1e6, np.float32)), ("small", np.array(1e-6, np.float32))])
    out, rep = _convert(mp, probe=0)
    assert "beyond 65504" in rep["kept"]["mul_big"] and "mul_small" not in rep["kept"]
    t = _types(out)
    assert t["big"] == F32 and t["r"] == F16
    _close(mp, out, {"x": rng.standard_normal((2, 4)).astype(np.float32)})


def test_layernorm_computes_half_with_float32_statistics(rng):
    g, b = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    mp = make_model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y", "mean", "inv"], axis=-1,
                                      name="ln")],
                    [vi("x", [3, 8])], [vi("y", [3, 8]), vi("mean", [3, 1]), vi("inv", [3, 1])],
                    [("g", g), ("b", b)], opset=17)
    out, rep = _convert(mp)
    t = _types(out)
    ln = next(n for n in out.graph.node if n.op_type == "LayerNormalization")
    # U (the statistics) has no float16 at opset 17: it stays float32 while T (the data) is float16
    assert t[ln.input[0]] == F16 and t[ln.output[0]] == F16 and t[ln.output[1]] == F32 and t[ln.output[2]] == F32
    assert "ln" not in rep["kept"]
    _close(mp, out, {"x": rng.standard_normal((3, 8)).astype(np.float32)})


def test_scan_body_converted_interface_keeps_type(rng):
    w = (rng.standard_normal((4, 4)) * 0.3).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["s_in", "w"], ["m"]), helper.make_node("Add", ["m", "xt"], ["a"]),
         helper.make_node("Tanh", ["a"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["yt"])],
        "body", [vi("s_in", [1, 4]), vi("xt", [1, 4])], [vi("s_out", [1, 4]), vi("yt", [1, 4])])
    mp = make_model([helper.make_node("Scan", ["s0", "xs"], ["s_last", "ys"], body=body, num_scan_inputs=1)],
                    [vi("s0", [1, 4]), vi("xs", [5, 1, 4])], [vi("s_last", [1, 4]), vi("ys", [5, 1, 4])],
                    [("w", w)])
    out, rep = _convert(mp)
    scan = next(n for n in out.graph.node if n.op_type == "Scan")
    g = scan.attribute[0].g
    assert all(v.type.tensor_type.elem_type == F32 for v in list(g.input) + list(g.output))
    inner = {n.op_type for n in g.node}
    assert "Cast" in inner and any(t.data_type == F16 for t in list(g.initializer) + list(out.graph.initializer))
    assert rep["converted_nodes"] >= 3
    _close(mp, out, {"s0": rng.standard_normal((1, 4)).astype(np.float32),
                     "xs": rng.standard_normal((5, 1, 4)).astype(np.float32)})


def test_random_like_reading_a_half_value_reads_it_cast_back(rng):
    mp = make_model([helper.make_node("Relu", ["x"], ["r"]),
                     helper.make_node("RandomNormalLike", ["r"], ["n"], name="rnl"),
                     helper.make_node("Mul", ["n", "zero"], ["z"]),
                     helper.make_node("Add", ["r", "z"], ["y"])],
                    [vi("x", [2, 3])], [vi("y", [2, 3])], [("zero", np.zeros((), np.float32))])
    out, rep = _convert(mp)
    t = _types(out)
    rnl = next(n for n in out.graph.node if n.op_type == "RandomNormalLike")
    assert t[rnl.input[0]] == F32 and t[rnl.output[0]] == F32 and "random" in rep["kept"]["rnl"]
    assert t["r"] == F16
    _close(mp, out, {"x": rng.standard_normal((2, 3)).astype(np.float32)})


def test_blocked_node_gets_exactly_two_boundary_casts_and_no_cast_chain(rng):
    w = [(rng.standard_normal((8, 8)) * 0.3).astype(np.float32) for _ in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"], name="mm0"),
             helper.make_node("Relu", ["a"], ["ra"], name="relu0"),
             helper.make_node("Sigmoid", ["ra"], ["sa"], name="sig"),  # blocked: a float32 island
             helper.make_node("Transpose", ["sa"], ["ta"], name="tr"),  # movement: follows the float32 region
             helper.make_node("MatMul", ["ta", "w1"], ["b"], name="mm1"),
             helper.make_node("MatMul", ["b", "w2"], ["y"], name="mm2")]
    mp = make_model(nodes, [vi("x", [8, 8])], [vi("y", [8, 8])], [(f"w{i}", a) for i, a in enumerate(w)])
    out, _ = _convert(mp, block_nodes=("sig",))
    t = _types(out)
    assert t["ra"] == F16 and t["sa"] == F32 and t["ta"] == F32 and t["b"] == F16
    casts = [n for n in _nodes(out.graph) if n.op_type == "Cast"]
    # x -> half, ra -> float (into the island), ta -> half (out of it), y -> float: four, no more
    assert len(casts) == 4
    produced_by_cast = {c.output[0] for c in casts}
    assert not any(c.input[0] in produced_by_cast for c in casts)
    _close(mp, out, {"x": rng.standard_normal((8, 8)).astype(np.float32)})


def test_cuda_preset_builds_half_kernels_from_a_float16_model():
    """graphopt's TVM backend, target cuda (sm_90), builds the float16 digits CNN without a GPU:
    the Relax module computes in float16 and the generated CUDA C has half arithmetic."""
    pytest.importorskip("tvm")
    import re

    import graphopt
    from graphopt.backend import compile as tvm_compile
    from graphopt.backend.gpucheck import cuda_sources
    from graphopt.cli import example_model_path

    m = graphopt.load(example_model_path())
    p = graphopt.get_pass("float16")
    graphopt.run_passes(m, [p])
    assert p.report["converted_nodes"] > 5
    try:
        cm = tvm_compile(m, "cuda:sm_90", input_shapes={"input": [1, 1, 8, 8]}, progress=False)
    except Exception as e:  # only the missing toolkit is a reason to skip
        if "nvcc" in str(e):
            pytest.skip(f"no CUDA toolkit: {e}")
        raise
    src = cuda_sources(cm.module)
    src = src if isinstance(src, str) else "\n".join(src)
    assert "__global__" in src
    assert len(re.findall(r"\bhalf\d?\b|__half", src)) > 50  # kernels compute in half
    # the float32 model's build has none: the half code comes from the conversion
    cm32 = tvm_compile(graphopt.load(example_model_path()), "cuda:sm_90", input_shapes={"input": [1, 1, 8, 8]},
                       progress=False)
    src32 = cuda_sources(cm32.module)
    src32 = src32 if isinstance(src32, str) else "\n".join(src32)
    assert not re.findall(r"\bhalf\d?\b|__half", src32)


def test_half_model_runs_identically_across_ort_sessions(rng):
    """The probe (one ORT run) leaves the model it inspects untouched: the same conversion twice
    gives the same bytes."""
    mp = _amplifier(rng)
    a, _ = _convert(mp)
    b, _ = _convert(mp)
    assert a.SerializeToString() == b.SerializeToString()
    x = {"x": rng.standard_normal((4, 16)).astype(np.float32)}
    np.testing.assert_array_equal(_run(a, x)[0], _run(b, x)[0])


def test_body_reads_an_outer_half_value_in_both_types(rng):
    """An If branch reads a value the main graph now computes in float16: a converted body node
    reads it as is, a blocked one through a Cast made inside the branch (the outer scope has no
    float32 copy); the branch outputs keep float32, so the If's interface is unchanged."""
    then = helper.make_graph([helper.make_node("Neg", ["r"], ["n"], name="neg"),
                              helper.make_node("Sigmoid", ["r"], ["s"], name="sig_in_branch"),
                              helper.make_node("Add", ["n", "s"], ["t"], name="add_in_branch")],
                             "then", [], [vi("t", [2, 4])])
    els = helper.make_graph([helper.make_node("Identity", ["r"], ["e"])], "else", [], [vi("e", [2, 4])])
    mp = make_model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                     helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els, name="if")],
                    [vi("c", [], TensorProto.BOOL), vi("x", [2, 4])], [vi("y", [2, 4])])
    out, rep = _convert(mp, block_ops=("Sigmoid",))
    t = _types(out)
    assert t["r"] == F16 and rep["kept"]["sig_in_branch"] == "block list (op)"
    iff = next(n for n in out.graph.node if n.op_type == "If")
    br = {a.name: a.g for a in iff.attribute}
    sig = next(n for n in br["then_branch"].node if n.op_type == "Sigmoid")
    cast = next(n for n in br["then_branch"].node if n.output[0] == sig.input[0])
    assert cast.op_type == "Cast" and cast.input[0] == "r" and cast.attribute[0].i == F32
    neg = next(n for n in br["then_branch"].node if n.op_type == "Neg")
    assert neg.input[0] == "r"  # no Cast: Neg computes in float16
    assert all(g.output[0].type.tensor_type.elem_type == F32 for g in br.values())
    x = rng.standard_normal((2, 4)).astype(np.float32)
    for c in (True, False):
        _close(mp, out, {"c": np.array(c), "x": x})


# -- corpus models (small, cached downloads) -------------------------------------------------------
def test_magika_v1_full_float16_without_data_keeps_its_score():
    """magika v1's dense layers reach 3.7e6 (weights up to 97 in front of LayerNorms): without the
    probe its data-free float16 version gets every file type wrong; with it, float32's score."""
    import graphopt
    from benchmarks.corpus import fetch, model_path
    from benchmarks.corpus.data import ort_runner, task

    fetch(["magika_v1"])
    t = task("magika_v1")
    base = t.evaluate(ort_runner(model_path("magika_v1")), 8)
    scores = {}
    for probe in (0, 1):
        m = graphopt.load(model_path("magika_v1"))
        p = graphopt.get_pass("float16", probe=probe)
        graphopt.run_passes(m, [p])
        mp = graphopt.to_proto(m)
        onnx.checker.check_model(mp, full_check=True)
        res = t.evaluate(ort_runner(mp), 8)
        scores[probe] = (res.score, t.agreement(base, res), p.report)
    assert scores[0][0] < base.score - 0.5  # the failure the probe exists for
    score, agreement, rep = scores[1]
    assert score == base.score and agreement == 1.0
    assert any("random probe inputs" in why for why in rep["kept"].values())
    assert rep["converted_nodes"] > 30  # the rest of the model still computes in float16


def test_weight_only_size_is_the_floor_on_a_small_paddle_model(tmp_path):
    """ppocr_cls (0.56 MB, 7% of it graph): the float16 weights plus their Casts cost no more than
    the float32 weights' half; the file is at the floor the graph sets, not above it."""
    pytest.importorskip("PIL", reason="the corpus extra (pip install '.[corpus]') is not installed")
    import graphopt
    from benchmarks.corpus import fetch, model_path

    fetch(["ppocr_cls"])
    src = model_path("ppocr_cls")
    mp = onnx.load(str(src))
    f32 = sum(a.t.ByteSize() for n in mp.graph.node for a in n.attribute
              if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F32 and int(np.prod(a.t.dims)) >= 16)
    f32 += sum(t.ByteSize() for t in mp.graph.initializer if t.data_type == F32 and int(np.prod(t.dims)) >= 16)
    total = mp.ByteSize()
    floor = (total - f32 / 2) / total
    m = graphopt.load(src)
    graphopt.run_passes(m, [graphopt.get_pass("float16-weights")])
    graphopt.save(m, tmp_path / "w.onnx")
    ratio = (tmp_path / "w.onnx").stat().st_size / src.stat().st_size
    assert 0.53 < floor < 0.55 and ratio <= floor + 0.002, (ratio, floor)
