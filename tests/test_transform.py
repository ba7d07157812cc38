"""Pass infrastructure: passes, pipelines with fixpoint groups, registry and plugins, the
pass context's analysis cache, and instruments (verify, numeric check, snapshots, bisect)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model, vi
from onnx import helper

import graphopt
from graphopt import (
    Graph,
    NumericalMismatchError,
    NumericCheckInstrument,
    Pass,
    PassContext,
    PassError,
    Pipeline,
    SnapshotInstrument,
    StatsInstrument,
    VerificationError,
    VerifyInstrument,
    bisect,
    register_pass,
    run_passes,
    transform,
)


def _ids(n: int) -> graphopt.Model:
    nodes, prev = [], "x"
    for k in range(n):
        nodes.append(helper.make_node("Identity", [prev], [f"i{k}"], name=f"id{k}"))
        prev = f"i{k}"
    nodes.append(helper.make_node("Relu", [prev], ["y"], name="relu"))
    return graphopt.from_proto(make_model(nodes, [vi("x", [3])], [vi("y", [3])]))


class RemoveOneIdentity(Pass):
    """Removes a single Identity per run (to exercise fixpoint iteration)."""

    name = "remove-one-identity"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        for n in graph:
            if n.op_type == "Identity":
                graph.replace_all_uses_with(n.output(0), n.input(0))
                graph.remove(n)
                return True
        return False


class BreakNumbers(Pass):
    """Turns Relu into Neg: a deliberately wrong pass."""

    name = "break-numbers"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for n in graph:
            if n.op_type == "Relu":
                n.op_type = "Neg"
                changed = True
        return changed


class BreakIR(Pass):
    """Leaves a dangling use: a deliberately broken pass."""

    name = "break-ir"

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        n = graph.nodes[-1]
        n._inputs[0] = graph.fresh_value = graphopt.Value("ghost")  # bypasses the mutation API
        return True


def test_fixpoint_pipeline_runs_until_nothing_changes() -> None:
    m = _ids(5)
    ctx = PassContext()
    assert run_passes(m, Pipeline([RemoveOneIdentity()], fixpoint=True, max_iterations=20), ctx)
    assert [n.op_type for n in m.graph] == ["Relu"]
    assert sum(r.changed for r in ctx.records) == 5 and len(ctx.records) == 6
    m = _ids(5)
    run_passes(m, Pipeline([RemoveOneIdentity()]))  # not fixpoint: one round
    assert len(m.graph) == 5


def test_nested_pipelines_and_names() -> None:
    m = _ids(3)
    inner = Pipeline([RemoveOneIdentity()], fixpoint=True, name="inner")
    outer = Pipeline([inner, "dce"], name="outer")
    assert [p.name for p in outer.leaves()] == ["remove-one-identity", "dce"]
    run_passes(m, outer)
    assert len(m.graph) == 1


def test_registry_options_and_errors() -> None:
    assert {"dce", "eliminate-identity", "fuse-conv-bn"} <= set(graphopt.list_passes())
    with pytest.raises(PassError, match="did you mean"):
        graphopt.get_pass("dcee")
    with pytest.raises(PassError, match="unknown option"):
        graphopt.get_pass("dce", bogus=1)

    @register_pass
    def drop_relu(graph: Graph, ctx: PassContext) -> bool:
        """Replace Relu by its input (test only)."""
        changed = False
        for n in graph:
            if n.op_type == "Relu" and not n.output(0).is_graph_output():
                graph.replace_all_uses_with(n.output(0), n.input(0))
                graph.remove(n)
                changed = True
        return changed

    p = graphopt.get_pass("drop-relu")
    assert p.summary() == "Replace Relu by its input (test only)."


def test_entry_point_plugins_are_loaded(monkeypatch) -> None:
    class PluginPass(Pass):
        """A pass from a plugin package."""

        name = "my-plugin-pass"

        def run(self, graph: Graph, ctx: PassContext) -> bool:
            return False

    class EP:
        name = "my-plugin-pass"
        value = "plugin:PluginPass"

        def load(self):
            return PluginPass

    real = metadata.entry_points
    monkeypatch.setattr(transform.metadata, "entry_points",
                        lambda group=None, **kw: [EP()] if group == transform.ENTRY_POINT_GROUP else real(group=group))
    monkeypatch.setattr(transform, "_loaded", False)
    assert "my-plugin-pass" in graphopt.list_passes()


def test_pass_runs_inside_subgraphs() -> None:
    body = helper.make_graph([helper.make_node("Identity", ["x"], ["t"], name="in_id"),
                              helper.make_node("Relu", ["t"], ["o"], name="in_relu")], "then", [], [vi("o", [2])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["o2"], name="neg")], "else", [], [vi("o2", [2])])
    mp = make_model([helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other, name="if")],
                    [vi("c", [], 9), vi("x", [2])], [vi("y", [2])])
    m = graphopt.from_proto(mp)
    run_passes(m, "eliminate-identity", PassContext(instruments=[VerifyInstrument(checker=True, full_check=True)]))
    assert [n.op_type for n in m.graph.nodes[0].attr("then_branch")] == ["Relu"]
    x = np.array([-1.0, 2.0], np.float32)
    for c in (True, False):
        feed = {"c": np.array(c), "x": x}
        assert np.array_equal(graphopt.run_ort(m, feed)["y"], graphopt.run_ort(mp, feed)["y"])


def test_verify_instrument_names_the_pass_that_broke_the_ir() -> None:
    m = _ids(2)
    with pytest.raises(VerificationError, match="break-ir"):
        run_passes(m, [RemoveOneIdentity(), BreakIR()], PassContext(instruments=[VerifyInstrument()]))


def test_numeric_check_names_the_pass_that_changed_outputs() -> None:
    m = _ids(2)
    feed = {"x": np.array([-1.0, 0.5, 2.0], np.float32)}
    ctx = PassContext(instruments=[NumericCheckInstrument(feed)])
    with pytest.raises(NumericalMismatchError, match="break-numbers"):
        run_passes(m, [RemoveOneIdentity(), BreakNumbers(), "dce"], ctx)
    assert ctx.records[0].max_abs_error == 0.0
    m = _ids(2)
    ins = NumericCheckInstrument(feed, raise_on_mismatch=False)
    run_passes(m, [RemoveOneIdentity(), BreakNumbers()], PassContext(instruments=[ins]))
    assert ins.first_bad == "break-numbers" and ins.errors["break-numbers"] == pytest.approx(4.0)


def test_bisect_finds_first_bad_pass_with_log_evaluations() -> None:
    m = _ids(12)
    feed = {"x": np.array([-1.0, 0.5, 2.0], np.float32)}
    passes = [RemoveOneIdentity() for _ in range(9)] + [BreakNumbers()] + [RemoveOneIdentity() for _ in range(3)]
    res = bisect(m, passes, feed)
    assert res.culprit == "break-numbers" and res.index == 9
    assert res.evaluations <= 5  # 13 changing passes: ceil(log2(13)) + 1
    assert len(m.graph) == 13  # the input model is untouched
    ok = bisect(_ids(3), [RemoveOneIdentity()], feed)
    assert ok.culprit is None and ok.max_abs_error == 0


def test_snapshots_to_directory(tmp_path: Path) -> None:
    m = _ids(2)
    run_passes(m, Pipeline([RemoveOneIdentity()], fixpoint=True), PassContext(instruments=[SnapshotInstrument(tmp_path)]))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00_input.onnx", "01_remove-one-identity.onnx", "02_remove-one-identity.onnx"]
    assert len(onnx.load(str(tmp_path / files[1])).graph.node) == 2


def test_analysis_cache_invalidated_on_change() -> None:
    m = _ids(3)
    calls = []

    def count_nodes(g: Graph) -> int:
        calls.append(1)
        return len(g)

    class Probe(Pass):
        name = "probe"

        def run(self, graph: Graph, ctx: PassContext) -> bool:
            self.seen = ctx.analysis(count_nodes, graph)
            return False

    ctx = PassContext()
    p1, p2, p3 = Probe(), Probe(), Probe()
    run_passes(m, [p1, p2, RemoveOneIdentity(), p3], ctx)
    assert (p1.seen, p2.seen, p3.seen) == (4, 4, 3)
    assert len(calls) == 2  # cached for p2, recomputed after the change


def test_stats_instrument_records_per_pass(example_path) -> None:
    m = graphopt.load(example_path)
    st = StatsInstrument({"input": [1, 1, 8, 8]})
    ctx = PassContext(instruments=[st])
    run_passes(m, "default", ctx)
    assert st.initial.nodes == 19 and st.initial.flops > 900_000
    fused = [r for r in ctx.records if r.name == "fuse-conv-bn"][0]
    k = ctx.records.index(fused)
    before = ctx.records[k - 1]
    assert fused.changed and fused.nodes == before.nodes - 3 and fused.params < before.params
    assert fused.flops < before.flops
    assert ctx.records[-1].nodes == 11
