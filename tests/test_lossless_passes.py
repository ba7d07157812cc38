"""The lossless passes, rule by rule, on purpose-built models: each result is checked for
numerical equivalence under ONNX Runtime, full ONNX checker validity, and the structural
change the rule must make (node counts and kinds)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import DATA, make_model, vi
from onnx import TensorProto, helper

import graphopt
from graphopt.analysis import model_stats, peak_memory
from graphopt.runtime import compare, make_inputs

H = helper.make_node
R = np.random.default_rng(0)
MODELS = Path(__file__).resolve().parents[1] / "benchmarks" / "models"


def rnd(*shape, lo=-1.0, hi=1.0):
    return R.uniform(lo, hi, shape).astype(np.float32)


def optimize(mp: onnx.ModelProto, passes="default", shapes=None, rtol=1e-4, atol=1e-5, n=2) -> graphopt.Model:
    """Run passes; assert checker-valid, same inputs needed, outputs equal under ORT."""
    m = graphopt.from_proto(mp)
    feeds = [make_inputs(m, shapes, seed=k) for k in range(n)]
    graphopt.run_passes(m, passes if not isinstance(passes, str) else graphopt.get_pass(passes),
                        graphopt.PassContext(instruments=[graphopt.VerifyInstrument()]))
    out = graphopt.to_proto(m)
    onnx.checker.check_model(out, full_check=True)
    needed = {i.name for i in out.graph.input} - {t.name for t in out.graph.initializer}
    assert needed <= {i.name for i in mp.graph.input}, "the result asks for an input the original did not need"
    for f in feeds:
        c = compare(graphopt.run_ort(mp, f), graphopt.run_ort(out, f), rtol=rtol, atol=atol)
        assert c.ok, c.problems
    return m


def ops(m: graphopt.Model) -> list[str]:
    return [n.op_type for n in m.graph]


# -- folding -----------------------------------------------------------------------------------
def test_fold_constants_evaluates_with_ort_and_resolves_shape_chains() -> None:
    w = rnd(4, 8)
    mp = make_model([H("Transpose", ["w"], ["wt"], perm=[1, 0]),
                     H("Shape", ["x"], ["s"]), H("Gather", ["s", "one"], ["d1"], axis=0),
                     H("Unsqueeze", ["d1", "ax0"], ["d1u"]), H("Concat", ["m1", "d1u"], ["tgt"], axis=0),
                     H("Reshape", ["x", "tgt"], ["xr"]), H("MatMul", ["xr", "wt"], ["y"])],
                    [vi("x", ["batch", 8])], [vi("y", ["batch", 4])],
                    inits=[("w", w), ("one", np.array(1, np.int64)), ("ax0", np.array([0], np.int64)),
                           ("m1", np.array([-1], np.int64))])
    m = optimize(mp, graphopt.Pipeline(["fold-constants", "eliminate-noops", "dce"], fixpoint=True), {"x": [3, 8]})
    # Gather(Shape(x), 1) folds although dim 0 is symbolic; the Reshape becomes a no-op
    assert ops(m) == ["MatMul"]


def test_size_aware_folding_keeps_tiny_producers_and_says_why() -> None:
    mp = make_model([H("ConstantOfShape", ["shp"], ["big"], value=helper.make_tensor("v", 1, [1], [0.5])),
                     H("Tile", ["row", "reps"], ["tiled"]),
                     H("Add", ["x", "big"], ["a"]), H("Add", ["a", "tiled"], ["y"])],
                    [vi("x", [512, 1024])], [vi("y", [512, 1024])],
                    inits=[("shp", np.array([512, 1024], np.int64)), ("row", rnd(1, 1024)),
                           ("reps", np.array([512, 1], np.int64))])
    p = graphopt.get_pass("fold-constants")
    m = optimize(mp, [p, "dce"], n=1)
    assert "ConstantOfShape" in ops(m) and "Tile" in ops(m)
    assert sum(t.nbytes for t in (v.const for v in m.graph.initializers.values())) < 10_000
    assert any("Tile" in name and "bytes" in why for name, why in p.skipped)
    # asked explicitly, it folds everything
    m2 = optimize(mp, [graphopt.get_pass("fold-constants", fold_expanding=True), "dce"], n=1)
    assert ops(m2) == ["Add", "Add"]


def test_fill_propagation_keeps_fills_compact() -> None:
    mp = make_model([H("ConstantOfShape", ["shp"], ["f"], value=helper.make_tensor("v", 1, [1], [2.0])),
                     H("Reshape", ["f", "to"], ["fr"]), H("Mul", ["fr", "three"], ["f3"]),
                     H("Add", ["x", "f3"], ["y"])],
                    [vi("x", [1000, 600])], [vi("y", [1000, 600])],
                    inits=[("shp", np.array([600000], np.int64)), ("to", np.array([1000, 600], np.int64)),
                           ("three", np.array(3.0, np.float32))])
    m = optimize(mp, "default", n=1)
    assert ops(m).count("ConstantOfShape") == 1 and "Reshape" not in ops(m) and "Mul" not in ops(m)
    fill = [n for n in m.graph if n.op_type == "ConstantOfShape"][0].output(0).fill_value()
    assert fill[0] == (1000, 600) and float(fill[1]) == 6.0


def test_lift_initializer_inputs_of_ir3_models() -> None:
    mp = make_model([H("Conv", ["x", "w", "b"], ["c"], name="conv"),
                     H("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["y"], name="bn")],
                    [vi("x", [1, 2, 5, 5]), vi("w", [3, 2, 3, 3]), vi("b", [3]), vi("s", [3]), vi("bb", [3]),
                     vi("mu", [3]), vi("var", [3])], [vi("y", [1, 3, 3, 3])],
                    inits=[("w", rnd(3, 2, 3, 3)), ("b", rnd(3)), ("s", rnd(3, lo=0.5)), ("bb", rnd(3)),
                           ("mu", rnd(3)), ("var", rnd(3, lo=0.5, hi=2))], opset=9, ir_version=3)
    m = optimize(mp, "default")
    assert ops(m) == ["Conv"] and m.ir_version == 4 and [v.name for v in m.graph.inputs] == ["x"]
    # IR >= 4: an initializer listed as input is an overridable default - left alone
    mp.ir_version = 7
    m = optimize(mp, "default")
    assert "BatchNormalization" in ops(m) and len(m.graph.inputs) == 7


def test_inline_constant_if_and_outer_scope_in_bodies() -> None:
    then_g = helper.make_graph([H("Identity", ["x"], ["t0"]), H("Add", ["t0", "one"], ["t_out"])], "then", [],
                               [vi("t_out", [2])])
    else_g = helper.make_graph([H("Sub", ["x", "one"], ["e_out"])], "else", [], [vi("e_out", [2])])
    mp = make_model([H("If", ["cond"], ["r"], then_branch=then_g, else_branch=else_g), H("Neg", ["r"], ["y"])],
                    [vi("x", [2])], [vi("y", [2])],
                    inits=[("cond", np.array(True)), ("one", np.ones(2, np.float32))])
    m = optimize(mp, "default")
    assert ops(m) == ["Add", "Neg"]
    # with a runtime condition the If stays, and the Identity inside its body is removed
    mp2 = make_model([H("If", ["cond"], ["r"], then_branch=then_g, else_branch=else_g), H("Neg", ["r"], ["y"])],
                     [vi("x", [2]), vi("cond", [], TensorProto.BOOL)], [vi("y", [2])],
                     inits=[("one", np.ones(2, np.float32))])
    m2 = optimize(mp2, "default")
    body = [n for n in m2.graph if n.op_type == "If"][0].attr("then_branch")
    assert [n.op_type for n in body] == ["Add"]
    for c in (True, False):
        f = {"x": np.array([1.0, 2.0], np.float32), "cond": np.array(c)}
        assert np.allclose(graphopt.run_ort(mp2, f)["y"], graphopt.run_ort(m2, f)["y"])


def test_loop_body_with_outer_scope_is_optimized() -> None:
    body = helper.make_graph(
        [H("Identity", ["acc"], ["a0"]), H("Mul", ["a0", "one"], ["a1"]), H("Add", ["a1", "w"], ["acc_out"]),
         H("Identity", ["c"], ["c_out"])], "body",
        [vi("i", [], TensorProto.INT64), vi("c", [], TensorProto.BOOL), vi("acc", [2])],
        [vi("c_out", [], TensorProto.BOOL), vi("acc_out", [2])])
    mp = make_model([H("Loop", ["n", "", "x"], ["y"], body=body)], [vi("x", [2])], [vi("y", [2])],
                    inits=[("n", np.array(3, np.int64)), ("w", rnd(2)), ("one", np.ones(2, np.float32))])
    m = optimize(mp, "default")
    inner = [n.op_type for n in m.graph.nodes[0].attr("body")]
    assert inner == ["Add", "Identity"]  # the body's own output Identity must stay (input -> output)


# -- cleanup -----------------------------------------------------------------------------------
def test_cse_merges_duplicate_constants_and_chains() -> None:
    w = rnd(4)
    mp = make_model([H("Mul", ["x", "w1"], ["a"]), H("Mul", ["x", "w2"], ["b"]),
                     H("Relu", ["a"], ["ra"]), H("Relu", ["b"], ["rb"]), H("Add", ["ra", "rb"], ["y"])],
                    [vi("x", [4])], [vi("y", [4])], inits=[("w1", w), ("w2", w.copy())])
    m = optimize(mp, "cse")
    assert ops(m) == ["Mul", "Relu", "Add"] and len(m.graph.initializers) == 1


@pytest.mark.parametrize("case", ["cast", "transpose", "pad", "slice", "concat", "mul1", "add0", "expand", "tile",
                                  "reshape", "dropout", "identity"])
def test_noop_elimination(case: str) -> None:
    x = "x"
    inits: list = []
    if case == "cast":
        n = H("Cast", [x], ["t"], to=TensorProto.FLOAT)
    elif case == "transpose":
        n = H("Transpose", [x], ["t"], perm=[0, 1])
    elif case == "pad":
        n = H("Pad", [x, "p"], ["t"])
        inits = [("p", np.zeros(4, np.int64))]
    elif case == "slice":
        n = H("Slice", [x, "st", "en"], ["t"])
        inits = [("st", np.array([0], np.int64)), ("en", np.array([np.iinfo(np.int64).max], np.int64))]
    elif case == "concat":
        n = H("Concat", [x], ["t"], axis=0)
    elif case == "mul1":
        n = H("Mul", ["one", x], ["t"])
        inits = [("one", np.ones([1, 3], np.float32))]
    elif case == "add0":
        n = H("Add", [x, "zero"], ["t"])
        inits = [("zero", np.zeros([3], np.float32))]
    elif case == "expand":
        n = H("Expand", [x, "s"], ["t"])
        inits = [("s", np.array([1, 3], np.int64))]
    elif case == "tile":
        n = H("Tile", [x, "r"], ["t"])
        inits = [("r", np.array([1, 1], np.int64))]
    elif case == "reshape":
        n = H("Reshape", [x, "s"], ["t"])
        inits = [("s", np.array([0, -1], np.int64))]
    elif case == "dropout":
        n = H("Dropout", [x], ["t"])
    else:
        n = H("Identity", [x], ["t"])
    mp = make_model([n, H("Relu", ["t"], ["y"])], [vi("x", ["n", 3])], [vi("y", ["n", 3])], inits=inits)
    m = optimize(mp, "default", {"x": [2, 3]})
    assert ops(m) == ["Relu"], ops(m)


def test_mul_by_one_that_broadcasts_is_kept() -> None:
    mp = make_model([H("Mul", ["x", "one"], ["y"])], [vi("x", [3])], [vi("y", [2, 3])],
                    inits=[("one", np.ones([2, 3], np.float32))])
    m = optimize(mp, "default")
    assert ops(m) == ["Mul"]


# -- fusion ------------------------------------------------------------------------------------
def test_conv_affine_and_bn() -> None:
    mp = make_model([H("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), H("Mul", ["c", "s"], ["m"]),
                     H("Add", ["bias", "m"], ["a"]), H("Div", ["a", "d"], ["y"])],
                    [vi("x", ["n", 2, 5, 5])], [vi("y", ["n", 4, 5, 5])],
                    inits=[("w", rnd(4, 2, 3, 3)), ("s", rnd(1, 4, 1, 1, lo=0.5)), ("bias", rnd(4, 1, 1)),
                           ("d", np.array(2.0, np.float32))])
    m = optimize(mp, "default", {"x": [2, 2, 5, 5]})
    assert ops(m) == ["Conv"]
    spatial = make_model([H("Conv", ["x", "w"], ["c"]), H("Add", ["c", "b"], ["y"])], [vi("x", [1, 2, 5, 5])],
                         [vi("y", [1, 4, 3, 3])], inits=[("w", rnd(4, 2, 3, 3)), ("b", rnd(1, 1, 3, 3))])
    m = optimize(spatial, "default")
    assert ops(m) == ["Conv", "Add"]  # a spatially varying constant is not a bias
    why = graphopt.get_pass("fuse-conv-affine").explain([n for n in m.graph if n.op_type == "Add"][0])
    assert "not one value per output channel" in why


def test_matmul_add_to_gemm_and_gemm_bn() -> None:
    mp = make_model([H("MatMul", ["x", "w"], ["h"]), H("Add", ["h", "b"], ["a"]),
                     H("BatchNormalization", ["a", "s", "bb", "mu", "var"], ["y"])],
                    [vi("x", ["n", 6])], [vi("y", ["n", 5])],
                    inits=[("w", rnd(6, 5)), ("b", rnd(5)), ("s", rnd(5, lo=0.5)), ("bb", rnd(5)), ("mu", rnd(5)),
                           ("var", rnd(5, lo=0.5, hi=2))])
    m = optimize(mp, "default", {"x": [3, 6]})
    assert ops(m) == ["Gemm"]
    rank3 = make_model([H("MatMul", ["x", "w"], ["h"]), H("Add", ["h", "b"], ["y"])], [vi("x", [2, 3, 6])],
                       [vi("y", [2, 3, 5])], inits=[("w", rnd(6, 5)), ("b", rnd(5))])
    assert ops(optimize(rank3, "default")) == ["MatMul", "Add"]


def test_pad_into_conv_and_avgpool() -> None:
    mp = make_model([H("Pad", ["x", "p"], ["xp"]), H("Conv", ["xp", "w"], ["c"], pads=[0, 1, 0, 1]),
                     H("Pad", ["c", "p"], ["cp"]), H("AveragePool", ["cp"], ["y"], kernel_shape=[3, 3])],
                    [vi("x", [1, 2, 6, 6])], [vi("y", [1, 3, 6, 8])],
                    inits=[("p", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), ("w", rnd(3, 2, 3, 3))])
    m = optimize(mp, "default")
    assert ops(m) == ["Conv", "AveragePool"]
    assert m.graph.nodes[0].attr("pads") == [1, 2, 1, 2] and m.graph.nodes[1].attr("count_include_pad") == 1
    reflect = make_model([H("Pad", ["x", "p"], ["xp"], mode="reflect"), H("Conv", ["xp", "w"], ["y"])],
                         [vi("x", [1, 2, 6, 6])], [vi("y", [1, 3, 6, 6])],
                         inits=[("p", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), ("w", rnd(3, 2, 3, 3))])
    assert ops(optimize(reflect, "default")) == ["Pad", "Conv"]


def test_transpose_and_reshape_chains() -> None:
    mp = make_model([H("Transpose", ["x"], ["t1"], perm=[0, 2, 1]), H("Transpose", ["t1"], ["t2"], perm=[0, 2, 1]),
                     H("Relu", ["t2"], ["r"]), H("Transpose", ["r"], ["t3"], perm=[1, 0, 2]),
                     H("Transpose", ["t3"], ["t4"], perm=[0, 2, 1]), H("Flatten", ["t4"], ["f"], axis=1),
                     H("Reshape", ["f", "s"], ["y"])],
                    [vi("x", [2, 3, 4])], [vi("y", [4, 6])], inits=[("s", np.array([4, 6], np.int64))])
    m = optimize(mp, "default")
    assert ops(m) == ["Relu", "Transpose", "Reshape"]
    assert m.graph.nodes[1].attr("perm") == [1, 2, 0]


def _hardswish_model(opset: int) -> onnx.ModelProto:
    return make_model([H("Add", ["x", "three"], ["a"]), H("Clip", ["a", "zero", "six"], ["c"]),
                       H("Div", ["c", "six"], ["hs"]), H("Mul", ["x", "hs"], ["y"])],
                      [vi("x", [2, 8])], [vi("y", [2, 8])],
                      inits=[("three", np.array(3.0, np.float32)), ("zero", np.array(0.0, np.float32)),
                             ("six", np.array(6.0, np.float32))], opset=opset)


def test_hardsigmoid_and_hardswish() -> None:
    assert ops(optimize(_hardswish_model(14), "default")) == ["HardSwish"]
    assert ops(optimize(_hardswish_model(13), "default")) == ["HardSigmoid", "Mul"]  # no HardSwish before 14


def _gelu_model(opset: int, tanh: bool = False) -> onnx.ModelProto:
    if tanh:
        nodes = [H("Pow", ["x", "three"], ["p"]), H("Mul", ["p", "c"], ["pc"]), H("Add", ["x", "pc"], ["s"]),
                 H("Mul", ["s", "k"], ["sk"]), H("Tanh", ["sk"], ["t"]), H("Add", ["t", "one"], ["t1"]),
                 H("Mul", ["x", "half"], ["xh"]), H("Mul", ["xh", "t1"], ["y"])]
        inits = [("three", np.array(3.0, np.float32)), ("c", np.array(0.044715, np.float32)),
                 ("k", np.array(math.sqrt(2 / math.pi), np.float32)), ("one", np.array(1.0, np.float32)),
                 ("half", np.array(0.5, np.float32))]
    else:
        nodes = [H("Div", ["x", "r2"], ["d"]), H("Erf", ["d"], ["e"]), H("Add", ["e", "one"], ["e1"]),
                 H("Mul", ["x", "e1"], ["m"]), H("Mul", ["m", "half"], ["y"])]
        inits = [("r2", np.array(math.sqrt(2), np.float32)), ("one", np.array(1.0, np.float32)),
                 ("half", np.array(0.5, np.float32))]
    return make_model(nodes, [vi("x", [2, 16])], [vi("y", [2, 16])], inits=inits, opset=opset)


def test_gelu_forms() -> None:
    assert ops(optimize(_gelu_model(20), "default")) == ["Gelu"]
    g = optimize(_gelu_model(20, tanh=True), "default", atol=1e-4)
    assert ops(g) == ["Gelu"] and g.graph.nodes[0].attr("approximate") == "tanh"
    assert "Gelu" not in ops(optimize(_gelu_model(17), "default"))


def _layernorm_model(opset: int, affine: bool = True) -> onnx.ModelProto:
    axes_attr = {"axes": [-1]} if opset < 18 else {}
    ax_in = [] if opset < 18 else ["axes"]
    nodes = [H("ReduceMean", ["x"] + ax_in, ["mu"], **axes_attr), H("Sub", ["x", "mu"], ["d"]),
             H("Pow", ["d", "two"], ["sq"]), H("ReduceMean", ["sq"] + ax_in, ["var"], **axes_attr),
             H("Add", ["var", "eps"], ["ve"]), H("Sqrt", ["ve"], ["sd"]), H("Div", ["d", "sd"], ["n"])]
    inits = [("two", np.array(2.0, np.float32)), ("eps", np.array(1e-5, np.float32))]
    if opset >= 18:
        inits.append(("axes", np.array([-1], np.int64)))
    if affine:
        nodes += [H("Mul", ["n", "g"], ["ng"]), H("Add", ["ng", "b"], ["y"])]
        inits += [("g", rnd(16)), ("b", rnd(16))]
    else:
        nodes[-1] = H("Div", ["d", "sd"], ["y"])
    return make_model(nodes, [vi("x", [2, 5, 16])], [vi("y", [2, 5, 16])], inits=inits, opset=opset)


@pytest.mark.parametrize("opset,affine", [(17, True), (18, True), (17, False)])
def test_layernorm(opset: int, affine: bool) -> None:
    assert ops(optimize(_layernorm_model(opset, affine), "default", atol=1e-4)) == ["LayerNormalization"]


def test_layernorm_refused_before_opset_17() -> None:
    assert "LayerNormalization" not in ops(optimize(_layernorm_model(13), "default", atol=1e-4))


def test_softmax() -> None:
    mp = make_model([H("ReduceMax", ["x"], ["mx"], axes=[-1]), H("Sub", ["x", "mx"], ["s"]), H("Exp", ["s"], ["e"]),
                     H("ReduceSum", ["e", "ax"], ["sum"]), H("Div", ["e", "sum"], ["y"])],
                    [vi("x", [2, 3, 7])], [vi("y", [2, 3, 7])], inits=[("ax", np.array([-1], np.int64))], opset=13)
    assert ops(optimize(mp, "default")) == ["Softmax"]


# -- reordering --------------------------------------------------------------------------------
def test_activation_moves_after_maxpool_and_scalar_into_conv() -> None:
    mp = make_model([H("Mul", ["x", "s"], ["xs"]), H("Conv", ["xs", "w", "b"], ["c"]), H("Relu", ["c"], ["r"]),
                     H("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                     H("Add", ["p", "k"], ["a"]), H("Sigmoid", ["a"], ["sg"]),
                     H("MaxPool", ["sg"], ["y"], kernel_shape=[3, 3])],
                    [vi("x", [1, 2, 8, 8])], [vi("y", [1, 3, 1, 1])],
                    inits=[("s", np.array(0.5, np.float32)), ("w", rnd(3, 2, 3, 3)), ("b", rnd(3)),
                           ("k", rnd(3, 1, 1))])
    m = optimize(mp, "default")
    # the scalar Mul went into the weights; Relu stays after Conv (ORT fuses it there);
    # Sigmoid after an Add moves behind the pool
    assert ops(m) == ["Conv", "Relu", "MaxPool", "Add", "MaxPool", "Sigmoid"]
    relu = [n for n in m.graph if n.op_type == "Relu"][0]
    pool = relu.output(0).consumers()[0]
    assert "fuse the activation into the preceding Conv" in graphopt.get_pass("reorder-algebraic").explain(pool)


def test_memory_schedule_lowers_peak_and_is_never_worse() -> None:
    # two branches, each expanding then reducing; the input order keeps both big tensors alive
    mp = make_model([H("Tile", ["x", "rep"], ["a"]), H("Tile", ["x", "rep"], ["b0"]), H("Neg", ["b0"], ["b"]),
                     H("ReduceSum", ["a", "ax"], ["sa"]), H("ReduceSum", ["b", "ax"], ["sb"]),
                     H("Add", ["sa", "sb"], ["y"])],
                    [vi("x", [1000])], [vi("y", [1])],
                    inits=[("rep", np.array([200], np.int64)), ("ax", np.array([0], np.int64))])
    m = graphopt.from_proto(mp)
    from graphopt.analysis import infer_shapes

    before = peak_memory(infer_shapes(m.copy()).graph).peak_bytes
    p = graphopt.get_pass("schedule-memory")
    m = optimize(mp, [p])
    after = peak_memory(infer_shapes(m.copy()).graph).peak_bytes
    assert p.last is not None and p.last[1] < p.last[0] and after < before
    # on an already good order it does nothing
    assert not graphopt.run_passes(m, [graphopt.get_pass("schedule-memory")])


def test_memory_schedule_on_branchy_real_nets() -> None:
    for name in ("light_inception_v1", "light_densenet121"):
        m = graphopt.load(DATA / "light" / f"{name}.onnx")
        graphopt.run_passes(m, ["lift-initializer-inputs", "fold-constants", "dce"])
        p = graphopt.get_pass("schedule-memory")
        graphopt.run_passes(m, [p])
        before, after = p.last
        assert after <= before


# -- whole pipeline on exporter-style models ---------------------------------------------------
@pytest.mark.parametrize("path", sorted(MODELS.glob("*.onnx")), ids=lambda p: p.stem)
def test_default_pipeline_on_exported_models(path: Path) -> None:
    mp = onnx.load(str(path))
    m = optimize(mp, "default", {"input": [2] + [d.dim_value for d in mp.graph.input[0].type.tensor_type.shape.dim[1:]]},
                 atol=1e-4)
    before = model_stats(graphopt.from_proto(mp)).compute_nodes
    after = model_stats(m).compute_nodes
    assert after <= 0.62 * before, (before, after)
    assert "BatchNormalization" not in ops(m) and "Identity" not in ops(m)


@pytest.mark.parametrize("path", sorted((DATA / "light").glob("*.onnx")), ids=lambda p: p.stem)
def test_default_pipeline_on_light_models(path: Path) -> None:
    mp = onnx.load(str(path))
    m = optimize(mp, "default", n=1, atol=1e-4)
    assert model_stats(m).compute_nodes < model_stats(graphopt.from_proto(mp)).compute_nodes


def test_bn_followed_by_scale_layer_folds_into_bn() -> None:
    """DenseNet-style pre-activation: Concat -> BN -> Mul(per channel) -> Add(per channel) -> Relu."""
    mp = make_model([H("Concat", ["x", "x"], ["c"], axis=1),
                     H("BatchNormalization", ["c", "s", "b", "mu", "var"], ["bn"]),
                     H("Mul", ["bn", "g"], ["m"]), H("Add", ["m", "beta"], ["a"]), H("Relu", ["a"], ["y"])],
                    [vi("x", ["n", 3, 4, 4])], [vi("y", ["n", 6, 4, 4])],
                    inits=[("s", rnd(6, lo=0.5)), ("b", rnd(6)), ("mu", rnd(6)), ("var", rnd(6, lo=0.5, hi=2)),
                           ("g", rnd(6, 1, 1, lo=0.5)), ("beta", rnd(1, 6, 1, 1))])
    m = optimize(mp, "default", {"x": [2, 3, 4, 4]})
    assert ops(m) == ["Concat", "BatchNormalization", "Relu"]


def test_transposes_sink_through_elementwise_and_cancel() -> None:
    # NCHW->NHWC, elementwise work (with a per-channel constant in NHWC layout), back to NCHW
    mp = make_model([H("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]), H("Relu", ["t"], ["r"]),
                     H("Mul", ["r", "c"], ["m"]), H("Transpose", ["y0"], ["u"], perm=[0, 2, 3, 1]),
                     H("Add", ["m", "u"], ["s"]), H("Sigmoid", ["s"], ["g"]),
                     H("Transpose", ["g"], ["y"], perm=[0, 3, 1, 2])],
                    [vi("x", [1, 3, 4, 5]), vi("y0", [1, 3, 4, 5])], [vi("y", [1, 3, 4, 5])],
                    inits=[("c", rnd(3))])
    m = optimize(mp, "default")
    assert "Transpose" not in ops(m), ops(m)
    # a lone transpose with nothing to cancel against is left where it is
    lone = make_model([H("Transpose", ["x"], ["t"], perm=[0, 2, 1]), H("Relu", ["t"], ["y"])],
                      [vi("x", [1, 3, 4])], [vi("y", [1, 4, 3])])
    assert ops(optimize(lone, "default")) == ["Transpose", "Relu"]


def test_transpose_sinks_through_reduction_and_reshapes_merge() -> None:
    mp = make_model([H("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
                     H("ReduceMean", ["t"], ["r"], axes=[1, 2], keepdims=0),  # mean over H, W of NHWC
                     H("Reshape", ["x", "s1"], ["f"]), H("Relu", ["f"], ["fr"]), H("Reshape", ["fr", "s2"], ["y2"])],
                    [vi("x", [2, 3, 4, 5])], [vi("r", [2, 3]), vi("y2", [6, 20])],
                    inits=[("s1", np.array([2, 60], np.int64)), ("s2", np.array([6, 20], np.int64))])
    m = optimize(mp, "default")
    assert "Transpose" not in ops(m) and ops(m).count("Reshape") == 1, ops(m)
    red = [n for n in m.graph if n.op_type == "ReduceMean"][0]
    assert red.attr("axes") == [2, 3]


def test_transposes_sink_through_concat_split_and_pad() -> None:
    """NHWC islands around Concat, Pad and Split (the shape TF/Keras exports have): the transposes
    meet below them and cancel, exactly."""
    to_nhwc, to_nchw = [0, 2, 3, 1], [0, 3, 1, 2]
    mp = make_model([H("Transpose", ["a"], ["ta"], perm=to_nhwc), H("Transpose", ["b"], ["tb"], perm=to_nhwc),
                     H("Concat", ["ta", "tb"], ["c"], axis=-1),  # channels-last concat
                     H("Pad", ["c", "pads"], ["p"], mode="reflect"),  # pads given in NHWC order
                     H("Relu", ["p"], ["r"]), H("Transpose", ["r"], ["y"], perm=to_nchw),
                     H("Transpose", ["a"], ["ts"], perm=to_nhwc),
                     H("Split", ["ts", "sizes"], ["s0", "s1"], axis=3),
                     H("Transpose", ["s0"], ["y0"], perm=to_nchw), H("Sigmoid", ["s1"], ["g1"]),
                     H("Transpose", ["g1"], ["y1"], perm=to_nchw)],
                    [vi("a", [1, 3, 4, 5]), vi("b", [1, 2, 4, 5])],
                    [vi("y", [1, 5, 6, 8]), vi("y0", [1, 1, 4, 5]), vi("y1", [1, 2, 4, 5])],
                    inits=[("pads", np.array([0, 1, 2, 0, 0, 1, 1, 0], np.int64)),
                           ("sizes", np.array([1, 2], np.int64))], opset=13)
    m = optimize(mp, "default")
    assert "Transpose" not in ops(m), ops(m)
    pad = next(n for n in m.graph if n.op_type == "Pad")
    assert pad.input(1).const_value().tolist() == [0, 0, 1, 2, 0, 0, 1, 1]
    assert next(n for n in m.graph if n.op_type == "Concat").attr("axis") == 1
    # a Split whose outputs do not all meet a Transpose keeps its transpose
    keep = make_model([H("Transpose", ["a"], ["t"], perm=to_nhwc), H("Split", ["t", "sizes"], ["s0", "s1"], axis=3),
                       H("Transpose", ["s0"], ["y0"], perm=to_nchw)],
                      [vi("a", [1, 3, 4, 5])], [vi("y0", [1, 1, 4, 5]), vi("s1", [1, 4, 5, 2])],
                      inits=[("sizes", np.array([1, 2], np.int64))], opset=13)
    assert ops(optimize(keep, "default")).count("Transpose") == 2


def test_transpose_and_reshape_hoist_through_binary_ops() -> None:
    """Transpose(Add(Transpose(a), b)) undone by the outer one: the pair cancels and only b is
    transposed; the same for Reshape round trips around a Mul with a full-shape operand."""
    mp = make_model([H("Transpose", ["a"], ["ta"], perm=[0, 2, 3, 1]), H("Add", ["ta", "b"], ["s"]),
                     H("Transpose", ["s"], ["y"], perm=[0, 3, 1, 2]),
                     H("Reshape", ["a", "flat"], ["f"]), H("Mul", ["c", "f"], ["mf"]),
                     H("Reshape", ["mf", "back"], ["y2"])],
                    [vi("a", [1, 3, 4, 5]), vi("b", [1, 4, 5, 3]), vi("c", [1, 60])],
                    [vi("y", [1, 3, 4, 5]), vi("y2", [1, 3, 4, 5])],
                    inits=[("flat", np.array([1, 60], np.int64)), ("back", np.array([1, 3, 4, 5], np.int64))])
    m = optimize(mp, "default")
    assert ops(m).count("Transpose") == 1 and ops(m).count("Reshape") == 1, ops(m)
    mul = next(n for n in m.graph if n.op_type == "Mul")
    assert mul.input(1).name == "a" and mul.input(0).producer.op_type == "Reshape"  # order kept
    # broadcasting operand: no hoist (the reshape would not be exact)
    bc = make_model([H("Reshape", ["a", "flat"], ["f"]), H("Mul", ["f", "c"], ["mf"]),
                     H("Reshape", ["mf", "back"], ["y2"])],
                    [vi("a", [1, 3, 4, 5]), vi("c", [1, 1])], [vi("y2", [1, 3, 4, 5])],
                    inits=[("flat", np.array([1, 60], np.int64)), ("back", np.array([1, 3, 4, 5], np.int64))])
    assert ops(optimize(bc, "default")).count("Reshape") == 2


def test_scalar_at_gelu_tail_is_not_moved_into_weights() -> None:
    g = _gelu_model(17)
    mm = helper.make_node("MatMul", ["y", "w"], ["z"])
    g.graph.node.append(mm)
    g.graph.initializer.append(onnx.numpy_helper.from_array(rnd(16, 4), "w"))
    g.graph.output[0].CopyFrom(vi("z", [2, 4]))
    m = optimize(g, "default")
    assert ops(m).count("Mul") == 2 and ops(m)[-1] == "MatMul"  # the * 0.5 stays for ORT's BiasGelu fusion


def test_weights_as_constant_nodes_fold_and_fuse() -> None:
    """Exporters that write weights as Constant nodes (not initializers)."""
    def const(name, arr):
        return H("Constant", [], [name], value=onnx.numpy_helper.from_array(arr, name + "_t"))

    mp = make_model([const("w", rnd(4, 2, 3, 3)), const("s", rnd(4, lo=0.5)), const("b", rnd(4)), const("m", rnd(4)),
                     const("v", rnd(4, lo=0.5, hi=2)), H("Conv", ["x", "w"], ["c"]),
                     H("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])],
                    [vi("x", ["n", 2, 5, 5])], [vi("y", ["n", 4, 3, 3])])
    m = optimize(mp, "default", {"x": [2, 2, 5, 5]})
    assert ops(m) == ["Conv"]


@pytest.mark.parametrize("opset", [9, 11, 13, 15, 17, 19, 21])
def test_default_pipeline_across_opsets(opset: int) -> None:
    ax = {} if opset >= 13 else {"axes": [1]}
    nodes = [H("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             H("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["bn"]), H("Relu", ["bn"], ["r"]),
             H("Identity", ["r"], ["i"]), H("Shape", ["i"], ["sh"]), H("Gather", ["sh", "zero"], ["n0"], axis=0),
             H("Unsqueeze", ["n0"] + (["ax0"] if opset >= 13 else []), ["n0u"], **({} if opset >= 13 else {"axes": [0]})),
             H("Concat", ["n0u", "m1"], ["tgt"], axis=0), H("Reshape", ["i", "tgt"], ["f"]),
             H("MatMul", ["f", "fw"], ["mm"]), H("Add", ["mm", "fb"], ["y"])]
    _ = ax
    mp = make_model(nodes, [vi("x", ["n", 2, 4, 4])], [vi("y", ["n", 5])],
                    inits=[("w", rnd(3, 2, 3, 3)), ("b", rnd(3)), ("s", rnd(3, lo=0.5)), ("bb", rnd(3)), ("mu", rnd(3)),
                           ("var", rnd(3, lo=0.5, hi=2)), ("zero", np.array(0, np.int64)),
                           ("ax0", np.array([0], np.int64)), ("m1", np.array([-1], np.int64)),
                           ("fw", rnd(48, 5)), ("fb", rnd(5))], opset=opset)
    m = optimize(mp, "default", {"x": [2, 2, 4, 4]})
    assert ops(m) == ["Conv", "Relu", "Reshape", "Gemm"], ops(m)


def test_compact_names_keeps_interface_and_numbers(tmp_path: Path) -> None:
    from graphopt.cli import example_model_path

    src = example_model_path()
    m = graphopt.load(src)
    graphopt.run_passes(m, ["compact-names"])
    graphopt.save(m, tmp_path / "c.onnx")
    onnx.checker.check_model(str(tmp_path / "c.onnx"), full_check=True)
    out = onnx.load(str(tmp_path / "c.onnx"))
    assert [i.name for i in out.graph.input] == ["input"] and [o.name for o in out.graph.output] == ["logits"]
    assert all(len(n.name) <= 4 for n in out.graph.node)
    assert (tmp_path / "c.onnx").stat().st_size < src.stat().st_size
    x = make_inputs(m, {"input": [3, 1, 8, 8]})
    assert np.array_equal(graphopt.run_ort(src, x)["logits"], graphopt.run_ort(tmp_path / "c.onnx", x)["logits"])


# -- real-model shapes (issue 13): repeated names, dynamic dims, LSTM tails, detection heads ----
def _names(m: graphopt.Model) -> list[str]:
    return [n.name for g in m.graph.all_graphs() for n in g.iter_nodes() if n.name]


def test_repeated_node_names_survive_the_default_pipeline() -> None:
    # spox writes the same name on many nodes (legal ONNX); the IR's verifier wants them unique
    then = helper.make_graph([H("Constant", [], ["k"], name="anon", value=helper.make_tensor("v", 1, [1], [2.0])),
                              H("Mul", ["x", "k"], ["t_out"], name="anon")], "then", [], [vi("t_out", ["n", 4])])
    other = helper.make_graph([H("Neg", ["x"], ["e_out"], name="anon")], "else", [], [vi("e_out", ["n", 4])])
    # (ONNX Runtime accepts repeats among Constant nodes of a graph and across graphs, as spox writes them)
    mp = make_model([H("Constant", [], ["c1"], name="anon", value=helper.make_tensor("v", 1, [1], [1.0])),
                     H("Constant", [], ["c2"], name="anon", value=helper.make_tensor("v", 1, [1], [3.0])),
                     H("Add", ["c1", "c2"], ["c"]), H("Mul", ["x", "c"], ["a"]),
                     H("ReduceSum", ["flag"], ["s"], keepdims=0), H("Greater", ["s", "zero"], ["cond"]),
                     H("If", ["cond"], ["b"], name="anon__1", then_branch=then, else_branch=other),
                     H("Add", ["a", "b"], ["y"])],
                    [vi("x", ["n", 4]), vi("flag", [2])], [vi("y", ["n", 4])], inits=[("zero", np.float32(0))])
    onnx.checker.check_model(mp, full_check=True)  # the input is valid ONNX
    m0 = graphopt.from_proto(mp)
    names = _names(m0)
    assert len(names) == len(set(names)) and names.count("anon") == 1  # unique on import
    assert all(n == "anon" or n.startswith("anon__") for n in names)  # each derived from the original
    m = optimize(mp, "default", {"x": [3, 4], "flag": [2]})  # VerifyInstrument: no "used twice" after any pass
    assert len(_names(m)) == len(set(_names(m)))
    assert sum(n.op_type == "Constant" for g in m.graph.all_graphs() for n in g.iter_nodes()) <= 1


def test_reshape_target_with_one_unknown_entry_becomes_minus_one() -> None:
    # target = [dim 0 of another tensor, 2, 3]: a valid Reshape keeps the count, so -1 is exact
    mp = make_model([H("MatMul", ["x", "w"], ["h"]), H("Shape", ["z"], ["sz"]),
                     H("Gather", ["sz", "zero"], ["b"], axis=0), H("Unsqueeze", ["b", "ax0"], ["bu"]),
                     H("Concat", ["bu", "two", "three"], ["tgt"], axis=0), H("Reshape", ["h", "tgt"], ["r"]),
                     H("Add", ["r", "z3"], ["y"])],
                    [vi("x", ["n", 8]), vi("z", ["m", 4]), vi("z3", [1, 2, 3])], [vi("y", ["m", 2, 3])],
                    inits=[("w", rnd(8, 6)), ("zero", np.array(0, np.int64)), ("ax0", np.array([0], np.int64)),
                           ("two", np.array([2], np.int64)), ("three", np.array([3], np.int64))])
    m = optimize(mp, "default", {"x": [3, 8], "z": [3, 4], "z3": [1, 2, 3]})
    assert sorted(ops(m)) == ["Add", "MatMul", "Reshape"], ops(m)
    r = next(n for n in m.graph if n.op_type == "Reshape")
    assert r.input(1).const_value().tolist() == [-1, 2, 3]


def test_lstm_style_tail_collapses() -> None:
    # ddddocr's CRNN tail: Y [seq, 2, 1, H] -> Transpose(0,2,1,3) -> Reshape [0, 0, -1] -> Reshape [-1, 2H]
    # -> Gemm -> Reshape(Concat(Shape(.)[0], [1], [-1]))
    mp = make_model([H("Transpose", ["y4"], ["t"], perm=[0, 2, 1, 3]), H("Reshape", ["t", "s0"], ["h"]),
                     H("Shape", ["h"], ["sh"]), H("Gather", ["sh", "zero"], ["seq"], axis=0),
                     H("Unsqueeze", ["seq", "ax0"], ["sequ"]), H("Reshape", ["h", "s1"], ["h2"]),
                     H("Gemm", ["h2", "w", "b"], ["g"], transB=1),
                     H("Concat", ["sequ", "one", "m1"], ["tgt"], axis=0), H("Reshape", ["g", "tgt"], ["out"])],
                    [vi("y4", ["seq", 2, 1, 5])], [vi("out", ["seq", 1, 7])],
                    inits=[("s0", np.array([0, 0, -1], np.int64)), ("zero", np.array(0, np.int64)),
                           ("ax0", np.array([0], np.int64)), ("s1", np.array([-1, 10], np.int64)),
                           ("w", rnd(7, 10)), ("b", rnd(7)), ("one", np.array([1], np.int64)),
                           ("m1", np.array([-1], np.int64))])
    m = optimize(mp, "default", {"y4": [6, 2, 1, 5]})
    assert ops(m) == ["Reshape", "Gemm", "Reshape"], ops(m)  # no Transpose, no shape computation
    assert m.graph.nodes[-1].input(1).const_value().tolist() == [-1, 1, 7]


def test_paddle_minus_one_dims_are_not_sizes() -> None:
    # PaddlePaddle declares dynamic dims as -1; Shape of such a value must not fold to -1 entries
    # (that made a Reshape with two -1s, which neither the checker nor ONNX Runtime accepts)
    mp = make_model([H("Relu", ["x"], ["r"]), H("Shape", ["r"], ["s"]),
                     H("Slice", ["s", "st", "en", "ax"], ["nc"]), H("Concat", ["nc", "m1"], ["tgt"], axis=0),
                     H("Reshape", ["r", "tgt"], ["y"])],
                    [vi("x", [-1, 4, -1, -1])], [vi("y", [-1, 4, -1])],
                    inits=[("st", np.array([0], np.int64)), ("en", np.array([2], np.int64)),
                           ("ax", np.array([0], np.int64)), ("m1", np.array([-1], np.int64))], opset=13)
    m = graphopt.from_proto(mp)
    graphopt.run_passes(m, "default", graphopt.PassContext(instruments=[graphopt.VerifyInstrument()]))
    out = graphopt.to_proto(m)
    onnx.checker.check_model(out, full_check=True)
    x = {"x": rnd(2, 4, 3, 5)}
    assert compare(graphopt.run_ort(mp, x), graphopt.run_ort(out, x), rtol=0, atol=0).ok
    r = next(n for n in m.graph if n.op_type == "Reshape")
    assert r.input(1).const_value().tolist() == [0, 4, -1]  # the batch copied, not written as -1


def test_unit_transpose_next_to_reshape_becomes_a_reshape() -> None:
    mp = make_model([H("Transpose", ["x"], ["t"], perm=[0, 2, 1, 3]), H("Reshape", ["t", "s"], ["y"])],
                    [vi("x", ["s", 3, 1, 4])], [vi("y", ["s", 12])], inits=[("s", np.array([0, -1], np.int64))])
    m = optimize(mp, "default", {"x": [5, 3, 1, 4]})
    assert ops(m) == ["Reshape"]
    # a Transpose that really moves data stays
    mp2 = make_model([H("Transpose", ["x"], ["t"], perm=[0, 2, 1, 3]), H("Reshape", ["t", "s"], ["y"])],
                     [vi("x", ["s", 3, 2, 4])], [vi("y", ["s", 24])], inits=[("s", np.array([0, -1], np.int64))])
    assert ops(optimize(mp2, "default", {"x": [5, 3, 2, 4]})) == ["Transpose", "Reshape"]


def test_slices_of_disjoint_axes_merge() -> None:
    # YOLOv5's Focus: rows then columns, four ways, concatenated
    big = np.iinfo(np.int64).max
    i64 = lambda *v: np.array(v, np.int64)
    mp = make_model([H("Slice", ["x", "z", "e", "a2", "s2"], ["r0"]), H("Slice", ["x", "o", "e", "a2", "s2"], ["r1"]),
                     H("Slice", ["r0", "z", "e", "a3", "s2"], ["p00"]), H("Slice", ["r0", "o", "e", "a3", "s2"], ["p01"]),
                     H("Slice", ["r1", "z", "e", "a3", "s2"], ["p10"]), H("Slice", ["r1", "o", "e", "a3", "s2"], ["p11"]),
                     H("Concat", ["p00", "p10", "p01", "p11"], ["y"], axis=1)],
                    [vi("x", [1, 3, 8, 8])], [vi("y", [1, 12, 4, 4])],
                    inits=[("z", i64(0)), ("o", i64(1)), ("e", i64(big)), ("a2", i64(2)), ("a3", i64(3)), ("s2", i64(2))])
    m = optimize(mp, "default")
    assert ops(m).count("Slice") == 4 and all(n.input(0).name == "x" for n in m.graph if n.op_type == "Slice")
    # the same axis twice is not merged
    mp2 = make_model([H("Slice", ["x", "z", "e", "a2", "s2"], ["r0"]), H("Slice", ["r0", "o", "e", "a2", "s2"], ["y"])],
                     [vi("x", [1, 3, 8, 8])], [vi("y", [1, 3, 2, 8])],
                     inits=[("z", i64(0)), ("o", i64(1)), ("e", i64(big)), ("a2", i64(2)), ("s2", i64(2))])
    assert ops(optimize(mp2, "default")) == ["Slice", "Slice"]


def test_squeeze_unsqueeze_pairs_and_unit_reductions() -> None:
    # silero's tail: Unsqueeze(Squeeze(h, 0), 0) next to another reader of the Squeeze, and a
    # ReduceMean over an axis of size 1 followed by Unsqueeze
    mp = make_model([H("Squeeze", ["h", "ax0"], ["hs"]), H("Unsqueeze", ["hs", "ax0"], ["hu"]),
                     H("Concat", ["hu", "c"], ["state"], axis=0), H("Relu", ["hs"], ["r"]),
                     H("ReduceMean", ["r"], ["mean"], axes=[1], keepdims=0), H("Unsqueeze", ["mean", "ax1"], ["p"]),
                     H("ReduceMax", ["p"], ["y"], axes=[1], keepdims=1)],
                    [vi("h", [1, 3, 1]), vi("c", [1, 3, 1])], [vi("state", [2, 3, 1]), vi("y", [3, 1])],
                    inits=[("ax0", np.array([0], np.int64)), ("ax1", np.array([1], np.int64))], opset=17)
    m = optimize(mp, "default")
    assert sorted(ops(m)) == ["Concat", "Relu", "Squeeze"], ops(m)
    cat = next(n for n in m.graph if n.op_type == "Concat")
    assert cat.input(0).name == "h"
    # a reduction over a real axis stays
    mp2 = make_model([H("ReduceMean", ["x"], ["y"], axes=[1], keepdims=0)], [vi("x", [2, 3])], [vi("y", [2])], opset=17)
    assert ops(optimize(mp2, "default")) == ["ReduceMean"]


def test_stats_instrument_leaves_types_alone_and_final_row_is_fresh() -> None:
    # the CLI's per-pass statistics reuse inferred types between passes; the model must come out
    # as without the instrument (no annotations left behind), and the last row match a fresh count
    from graphopt.analysis import infer_shapes
    from graphopt.instruments import StatsInstrument

    nodes = [H("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             H("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["bn"]), H("Relu", ["bn"], ["r"]),
             H("Shape", ["r"], ["sh"]), H("Gather", ["sh", "zero"], ["n0"], axis=0),
             H("Unsqueeze", ["n0", "ax0"], ["n0u"]), H("Concat", ["n0u", "m1"], ["tgt"], axis=0),
             H("Reshape", ["r", "tgt"], ["f"]), H("MatMul", ["f", "fw"], ["mm"]), H("Add", ["mm", "fb"], ["y"])]
    mp = make_model(nodes, [vi("x", ["n", 2, 4, 4])], [vi("y", ["n", 5])],
                    inits=[("w", rnd(3, 2, 3, 3)), ("b", rnd(3)), ("s", rnd(3, lo=0.5)), ("bb", rnd(3)), ("mu", rnd(3)),
                           ("var", rnd(3, lo=0.5, hi=2)), ("zero", np.array(0, np.int64)),
                           ("ax0", np.array([0], np.int64)), ("m1", np.array([-1], np.int64)),
                           ("fw", rnd(48, 5)), ("fb", rnd(5))])
    plain, measured = graphopt.from_proto(mp), graphopt.from_proto(mp)
    graphopt.run_passes(plain, "default")
    stats = StatsInstrument({"x": [2, 2, 4, 4]})
    ctx = graphopt.PassContext(instruments=[stats])
    graphopt.run_passes(measured, "default", ctx)
    types = lambda m: [(o.name, o.dtype, o.shape) for n in m.graph for o in n.outputs]
    assert types(measured) == types(plain)
    fresh = graphopt.from_proto(graphopt.to_proto(measured))
    infer_shapes(fresh, {"x": [2, 2, 4, 4]})
    st = model_stats(fresh)
    last = ctx.records[-1]
    assert (last.nodes, last.params, last.flops) == (st.compute_nodes, st.params, st.flops)
    assert stats.initial.flops > last.flops > 0  # BatchNorm folded away
