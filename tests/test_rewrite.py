"""Pattern rewriting: the pattern language, the greedy driver, explanations, and the README's
custom fusion pass (executed verbatim from README.md)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from helpers import make_model, vi
from onnx import TensorProto, helper

import graphopt
from graphopt import Const, Opt, Rule, Var, apply_rules, explain, maybe, op
from graphopt.runtime import compare, make_inputs

README = Path(__file__).resolve().parents[1] / "README.md"


def _mul_chain(n: int, reverse: bool = False) -> onnx.ModelProto:
    nodes, inits, prev = [], [], "x"
    for k in range(n):
        ins = [f"c{k}", prev] if reverse and k % 2 else [prev, f"c{k}"]
        nodes.append(helper.make_node("Mul", ins, [f"m{k}"], name=f"mul{k}"))
        inits.append((f"c{k}", np.full([3], 1.0 + 0.001 * k, np.float32)))
        prev = f"m{k}"
    nodes.append(helper.make_node("Relu", [prev], ["y"], name="relu"))
    return make_model(nodes, [vi("x", ["n", 3])], [vi("y", ["n", 3])], inits=inits)


FOLD = Rule(
    "fold-mul",
    op("Mul", op("Mul", Var("x"), Const("a"), commutative=True), Const("b"), commutative=True),
    lambda m, b: b.op("Mul", m["x"], b.const(m.const("a") * m.const("b"))),
)


def test_driver_reaches_fixpoint_on_long_chain() -> None:
    mp = _mul_chain(400, reverse=True)
    m = graphopt.from_proto(mp)
    n = apply_rules(m.graph, [FOLD])
    assert n == 399
    assert [x.op_type for x in m.graph] == ["Mul", "Relu"]
    assert len(m.graph.initializers) == 1  # consumed constants were dropped with their nodes
    m.verify()
    feed = make_inputs(m, {"x": [2, 3]})
    c = compare(graphopt.run_ort(mp, feed), graphopt.run_ort(m, feed), rtol=1e-5)
    assert c.ok, c.problems


def test_single_use_is_required_for_inner_nodes_and_explained() -> None:
    mp = make_model([helper.make_node("Mul", ["x", "a"], ["t"], name="inner"),
                     helper.make_node("Mul", ["t", "b"], ["y"], name="outer"),
                     helper.make_node("Neg", ["t"], ["z"], name="other")],
                    [vi("x", [3])], [vi("y", [3]), vi("z", [3])],
                    inits=[("a", np.ones(3, np.float32)), ("b", np.ones(3, np.float32))])
    m = graphopt.from_proto(mp)
    outer = m.graph.nodes[1]
    why = explain(FOLD, outer)
    assert "2 readers" in why and "single use" in why
    assert apply_rules(m.graph, [FOLD]) == 0
    assert "expected Mul, got" in explain(FOLD, m.graph.nodes[2]) or "root: expected Mul" in explain(FOLD, m.graph.nodes[2])


def test_explain_non_constant_and_veto() -> None:
    mp = make_model([helper.make_node("Mul", ["x", "a"], ["t"], name="inner"),
                     helper.make_node("Mul", ["t", "b"], ["y"], name="outer")],
                    [vi("x", [3]), vi("b", [3])], [vi("y", [3])], inits=[("a", np.ones(3, np.float32))])
    m = graphopt.from_proto(mp)
    why = explain(FOLD, m.graph.nodes[1])
    assert "'b' must be constant" in why and "graph input" in why
    vetoed = Rule("veto", FOLD.pattern, FOLD.rewrite, where=lambda mm: "too risky")
    mp2 = _mul_chain(2)
    m2 = graphopt.from_proto(mp2)
    assert "refused: too risky" in explain(vetoed, m2.graph.nodes[1])
    assert apply_rules(m2.graph, [vetoed]) == 0


def test_optional_input_maybe_node_attr_and_dtype_predicates() -> None:
    pat = op("Relu", maybe(op("Cast", Var("x", dtype=TensorProto.FLOAT), attrs={"to": TensorProto.FLOAT})))
    mp = make_model([helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT, name="cast"),
                     helper.make_node("Relu", ["c"], ["y"], name="r1"),
                     helper.make_node("Relu", ["x"], ["z"], name="r2")],
                    [vi("x", [3])], [vi("y", [3]), vi("z", [3])])
    m = graphopt.from_proto(mp)
    r1, r2 = m.graph.nodes[1], m.graph.nodes[2]
    m1 = graphopt.rewrite.match(pat, r1)
    assert m1 is not None and m1["x"] is m.graph.inputs[0] and len(m1.nodes) == 2
    m2 = graphopt.rewrite.match(pat, r2)
    assert m2 is not None and m2["x"] is m.graph.inputs[0] and len(m2.nodes) == 1
    bad_attr = op("Relu", op("Cast", Var("x"), attrs={"to": TensorProto.INT64}))
    assert "attribute to=1" in explain(bad_attr, r1)
    opt = op("Conv", Var("x"), Const("w"), Opt(Const("b")))
    conv = make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], [vi("x", [1, 1, 3, 3])],
                      [vi("y", [1, 1, 3, 3])], inits=[("w", np.ones((1, 1, 1, 1), np.float32))])
    cm = graphopt.from_proto(conv)
    mm = graphopt.rewrite.match(opt, cm.graph.nodes[0])
    assert mm is not None and "b" not in mm
    ranked = op("Relu", Var("x", rank=2))
    assert "rank 1, needs 2" in explain(ranked, r2)


def test_declined_rewrite_rolls_back() -> None:
    mp = _mul_chain(3)
    m = graphopt.from_proto(mp)

    def decline(mm, b):
        b.op("Neg", mm["x"])  # builds something, then declines
        b.const(np.zeros(1, np.float32))

    before = graphopt.to_proto(m).SerializeToString()
    assert apply_rules(m.graph, [Rule("decline", FOLD.pattern, decline)]) == 0
    assert graphopt.to_proto(m).SerializeToString() == before


def _readme_block(tag: str) -> str:
    text = README.read_text()
    mt = re.search(rf"<!-- {tag} -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert mt, f"README has no block tagged {tag}"
    return mt.group(1)


def test_readme_custom_fusion_pass_runs_verbatim(tmp_path: Path) -> None:
    code = _readme_block("example:custom-pass")
    assert len(code.strip().splitlines()) <= 20
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - the README's own example
    mp = _mul_chain(6, reverse=True)
    src = tmp_path / "chain.onnx"
    onnx.save(mp, src)
    m = graphopt.load(src)
    graphopt.run_passes(m, ["fold-mul-chain", "dce"])
    assert [n.op_type for n in m.graph] == ["Mul", "Relu"]
    out = tmp_path / "out.onnx"
    graphopt.save(m, out)
    onnx.checker.check_model(str(out), full_check=True)
    feed = make_inputs(m, {"x": [4, 3]})
    assert compare(graphopt.run_ort(src, feed), graphopt.run_ort(out, feed), rtol=1e-5).ok


def test_pattern_pass_explain_on_real_model(example_path) -> None:
    m = graphopt.load(example_path)
    p = graphopt.get_pass("fuse-conv-bn")
    bns = [n for n in m.graph if n.op_type == "BatchNormalization"]
    assert all(p.explain(n) == "fuse-conv-bn: matches" for n in bns)
    relu = [n for n in m.graph if n.op_type == "Relu"][0]
    assert "expected BatchNormalization" in p.explain(relu)
