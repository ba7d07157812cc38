"""Winograd convolutions on CPU (graphopt.backend.winograd): the transform matrices, the rewrite of
3x3 stride-1 convolutions, and the transform kernels' schedules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model, vi
from onnx import helper

from graphopt.backend.winograd import choose_tile, matrices, transform_weight
from graphopt.runtime import ort_session


@pytest.mark.parametrize("m", [2, 4])
def test_matrices_compute_the_correlation(m: int) -> None:
    """A^T [(G g) * (B^T d)] is the valid correlation of d (m + 2 values) with g (3 taps), in 1-D
    and, through the weight transform, in 2-D."""
    rng = np.random.default_rng(m)
    bt, g, at = matrices(m)
    for _ in range(20):
        d, k = rng.standard_normal(m + 2), rng.standard_normal(3)
        np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), np.correlate(d, k, "valid"), rtol=1e-12, atol=1e-12)
    d2, w = rng.standard_normal((m + 2, m + 2)), rng.standard_normal((3, 3, 1, 1))
    u = transform_weight(w, m).reshape(m + 2, m + 2)
    y = at @ (u * (bt @ d2 @ bt.T)) @ at.T
    ref = np.array([[np.sum(d2[i:i + 3, j:j + 3] * w[:, :, 0, 0]) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="F\\(3, 3\\)"):
        matrices(3)


def test_tile_choice() -> None:
    """F(4, 3) where the matmul gets at least 16 tiles, F(2, 3) where only its smaller tiles make 16,
    direct for few channels or tiny maps."""
    assert choose_tile(1, 55, 55, 16, 64) == 4
    assert choose_tile(1, 13, 13, 64, 256) == 4  # 4 x 4 tiles of 4 x 4
    assert choose_tile(1, 7, 7, 512, 512) == 2  # ResNet's last stage: 4 x 4 tiles of 2 x 2
    assert choose_tile(4, 7, 7, 512, 512) == 4  # batch 4: 16 tiles of 4 x 4
    assert choose_tile(1, 3, 8, 32, 32) == 0
    assert choose_tile(2, 3, 8, 32, 32) == 2
    assert choose_tile(1, 55, 55, 3, 64) == 0  # an RGB stem
    assert choose_tile(1, 55, 55, 64, 8) == 0


tvm = pytest.importorskip("tvm", reason="the tvm extra is not installed")

from graphopt.backend import compile as tvm_compile


def _model(rng: np.random.Generator) -> onnx.ModelProto:
    """Batch 2, a non-square odd-sized input: a 3x3 conv with bias and ReLU (padding 1, F(4, 3)), a
    3x3 conv on asymmetric pads (F(4, 3), ragged last tiles), a 3x3 conv whose 3-wide output
    takes F(2, 3); a strided and a grouped 3x3 conv stay direct."""
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[0, 1, 2, 0]),
             helper.make_node("Conv", ["c2", "W3"], ["c3"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c3", "W4"], ["c4"], group=2, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c4", "W5", "B5"], ["y"], pads=[1, 0, 1, 0])]
    return make_model(nodes, [vi("x", [2, 16, 13, 11])], [vi("y", [2, 32, 7, 3])],
                      [("W1", w(32, 16, 3, 3)), ("B1", w(32)), ("W2", w(32, 32, 3, 3)), ("W3", w(32, 32, 3, 3)),
                       ("W4", w(32, 16, 3, 3)), ("W5", w(32, 32, 3, 3)), ("B5", w(32))], opset=13)


def test_winograd_build_equals_ort_and_direct(tmp_path: Path) -> None:
    """The eligible convolutions (stride 1, one group) become transform, batched matmul,
    transform; the build equals ONNX Runtime and the direct build, every transform kernel takes the
    Winograd schedule, and none is naive."""
    rng = np.random.default_rng(0)
    model = _model(rng)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = rng.standard_normal((2, 16, 13, 11)).astype(np.float32)
    ref = ort_session(str(path)).run(None, {"x": x})[0]
    assert ref.shape == (2, 32, 7, 3)
    wino = tvm_compile(str(path), build_cache=False, progress=False)
    direct = tvm_compile(str(path), build_cache=False, progress=False, winograd=False)
    assert wino.info.rewrites.get("winograd_convs") == 3
    assert "winograd_convs" not in direct.info.rewrites
    transforms = {k: v for k, v in wino.info.schedules.items() if "winograd" in k}
    assert len(transforms) >= 5 and set(transforms.values()) == {"winograd"}, wino.info.schedules
    assert not any("winograd" in k for k in direct.info.schedules)
    assert wino.info.naive_kernels == []
    scale = float(np.abs(ref).max())
    for cm in (wino, direct):
        got = cm.run({"x": x})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=3e-5 * scale)


def test_transform_kernels_fold_their_selects_and_vectorize(tmp_path: Path) -> None:
    """The transforms pick each coefficient set by alpha / output-phase index; the schedule cuts
    those loops into one piece per index, so TVM's lowering (its passes in its order: vectorize,
    then unroll) folds every select away, and the channel loop is vector code. An unroll
    annotation alone left every copy with the whole chain of selects on a broadcast condition."""
    from tvm import s_tir, tirx

    from graphopt.backend.targets import resolve_target

    rng = np.random.default_rng(1)
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W0"], ["a"]),
             helper.make_node("Conv", ["a", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, [vi("x", [1, 16, 17, 17])], [vi("y", [1, 32, 17, 17])],
                       [("W0", w(16, 16, 1, 1)), ("W", w(32, 16, 3, 3)), ("B", w(32))], opset=13)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    cm = tvm_compile(str(path), build_cache=False, progress=False)
    x = rng.standard_normal((1, 16, 17, 17)).astype(np.float32)
    np.testing.assert_allclose(cm.run({"x": x})[0], ort_session(str(path)).run(None, {"x": x})[0],
                               rtol=1e-4, atol=1e-4)
    funcs = {gv.name_hint: f for gv, f in cm.ir_module.functions_items()
             if isinstance(f, tirx.PrimFunc) and "winograd" in gv.name_hint}
    assert any("input" in k for k in funcs) and any("output" in k for k in funcs), sorted(funcs)
    passes = [s_tir.transform.CanonicalizeLoop(), s_tir.transform.LowerInitBlock(),
              s_tir.transform.PlanAndUpdateBufferAllocationLocation(), s_tir.transform.ConvertBlocksToOpaque(),
              s_tir.transform.CompactBufferAllocation(), s_tir.transform.LowerMatchBuffer(),
              s_tir.transform.StmtSimplify(), s_tir.transform.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(),
              tirx.transform.VectorizeLoop(True), tirx.transform.UnrollLoop(), tirx.transform.StmtSimplify()]
    for name, f in funcs.items():
        mod = tvm.IRModule({"main": f.with_attr("global_symbol", "main")})
        with resolve_target("host").tvm_target():
            low = tvm.ir.transform.Sequential(passes)(mod)["main"].script()
        assert "T.Select" not in low, name
        assert "T.Ramp" in low, name


def test_cli_compile_no_winograd_keeps_direct_convs(tmp_path: Path) -> None:
    """``graphopt compile`` builds Winograd convolutions by default; ``--no-winograd`` keeps the
    direct ones (the sidecar lists the kernels and the rewrite count)."""
    import json

    from graphopt.cli import main

    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])]
    path = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, [vi("x", [1, 16, 8, 8])], [vi("y", [1, 16, 8, 8])],
                         [("W", (rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32))], opset=13), path)
    info = {}
    for flag in ([], ["--no-winograd"]):
        out = tmp_path / f"m{len(flag)}.so"
        assert main(["compile", str(path), "-o", str(out), "-q", "--no-build-cache", *flag]) == 0
        info[bool(flag)] = json.loads(Path(f"{out}.json").read_text())["info"]
    assert info[False]["rewrites"].get("winograd_convs") == 1, info[False]
    assert "winograd" in " ".join(info[False]["schedules"]) and "conv2d" not in " ".join(info[False]["schedules"])
    assert "winograd_convs" not in info[True]["rewrites"] and "conv2d" in " ".join(info[True]["schedules"])


def test_tuning_keeps_graphopt_schedule_for_the_transforms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MetaSchedule's search is not run on the transforms (its candidates leave the selects
    unfolded and took up to a minute each to build: squeezenet's input transform held a 30-minute
    budget for 16 minutes); their measured default schedule is their record, and the matmul is
    searched as usual."""
    from tvm.s_tir import meta_schedule as ms

    from graphopt.backend.winograd import is_transform

    searched: list[str] = []

    def record(**kw):  # type: ignore[no-untyped-def]
        searched.extend(ctx.task_name for ctx in kw["tasks"])
        assert not any(is_transform(ctx.mod["main"]) for ctx in kw["tasks"])

    monkeypatch.setattr(ms.tune, "tune_tasks", record)
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "W0"], ["a"]), helper.make_node("Conv", ["a", "W"], ["y"], pads=[1, 1, 1, 1])]
    path = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, [vi("x", [1, 16, 16, 16])], [vi("y", [1, 16, 16, 16])],
                         [("W0", (rng.standard_normal((16, 16, 1, 1)) * 0.2).astype(np.float32)),
                          ("W", (rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32))], opset=13), path)
    cm = tvm_compile(str(path), trials=64, cache_dir=tmp_path / "cache", progress=False, build_cache=False)
    rep = cm.info.tuning
    assert len(rep["not_searched"]) == 2 and all("winograd" in n for n in rep["not_searched"]), rep
    assert any("matmul" in n for n in searched), searched
    assert not any("winograd" in n for n in searched), searched
    # the transforms run the records of graphopt's schedule
    assert all(cm.info.schedules[k] == "tuned" for k in cm.info.schedules if "winograd" in k), cm.info.schedules
    x = rng.standard_normal((1, 16, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(cm.run({"x": x})[0], ort_session(str(path)).run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_integer_valued_convolution_stays_direct(tmp_path: Path) -> None:
    """A conv whose weight is all integers is an integer conv emulated in float (ORT's ConvInteger,
    lowered): its sums are exact in float32, and Winograd's fractional coefficients would round
    them (ddddocr_ocr_int8 lost equality with ORT, 3.4e-2). It stays direct; the float conv after it
    does not."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "Wi"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "Wf"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", [1, 16, 16, 16])], [vi("y", [1, 16, 16, 16])],
                       [("Wi", rng.integers(-127, 128, (16, 16, 3, 3)).astype(np.float32)),
                        ("Wf", (rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32))], opset=13)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    cm = tvm_compile(str(path), build_cache=False, progress=False)
    assert cm.info.rewrites.get("winograd_convs") == 1, cm.info.rewrites
    x = rng.integers(0, 256, (1, 16, 16, 16)).astype(np.float32)
    a = ort_session(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(cm.run({"x": x})[0], a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))


def test_channels_without_whole_vectors_are_vectorized(tmp_path: Path) -> None:
    """18 output channels (no whole 4-, 8- or 16-wide vector) on a small map: the transforms'
    channel loop is one vector of its own width, so no kernel keeps naive loops (it did: the
    output transform was neither parallel, vectorized nor unrolled)."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", [1, 10, 20, 20])], [vi("y", [1, 18, 20, 20])],
                       [("W", (rng.standard_normal((18, 10, 3, 3)) * 0.2).astype(np.float32)),
                        ("B", rng.standard_normal(18).astype(np.float32))], opset=13)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    cm = tvm_compile(str(path), build_cache=False, progress=False)
    assert cm.info.rewrites.get("winograd_convs") == 1, cm.info.rewrites
    assert cm.info.naive_kernels == [], cm.info.naive_kernels
    x = rng.standard_normal((1, 10, 20, 20)).astype(np.float32)
    np.testing.assert_allclose(cm.run({"x": x})[0], ort_session(str(path)).run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)
