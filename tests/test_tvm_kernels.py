"""TVM backend: default schedules for the kernel classes real models are made of, and the build's
report of kernels that kept naive loops.

Each case is a tiny model (builds take a few seconds each on 2 cores): it must compile, equal
ONNX Runtime, and leave no naive kernel; and a build known to be unscheduled must report its
naive kernels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model, vi
from onnx import helper

from graphopt.runtime import ort_session

tvm = pytest.importorskip("tvm", reason="the tvm extra is not installed")

from graphopt.backend import compile as tvm_compile
from graphopt.backend.schedules import is_naive, loop_kinds, naive_kernels


def _build_and_check(model: onnx.ModelProto, tmp_path: Path, feed: dict[str, np.ndarray], **kw):
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    cm = tvm_compile(str(path), build_cache=False, progress=False, **kw)
    ref = ort_session(str(path)).run(None, feed)
    got = cm.run(feed)
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
    return cm


def _reductions_model() -> onnx.ModelProto:
    """Row reductions as classifiers end: ReduceSum / ReduceMax / ReduceMean over the last axis,
    a Softmax and a LayerNorm written out (mean, centred square mean), 224 classes."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("ReduceMean", ["h"], ["mu"], axes=[-1], keepdims=1),
        helper.make_node("Sub", ["h", "mu"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]),
        helper.make_node("Div", ["d", "sd"], ["ln"]),
        helper.make_node("Softmax", ["ln"], ["p"], axis=-1),
        helper.make_node("ReduceMax", ["ln"], ["mx"], axes=[-1], keepdims=0),
        helper.make_node("ReduceSum", ["x", "ax"], ["sx"], keepdims=0),
    ]
    return make_model(nodes, [vi("x", [4, 256])], [vi("p", [4, 224]), vi("mx", [4]), vi("sx", [4])],
                      [("W", rng.standard_normal((256, 224)).astype(np.float32) * 0.1),
                       ("eps", np.array(1e-5, np.float32)), ("ax", np.array([-1]))], opset=13)


def test_row_reductions_softmax_layernorm_scheduled_and_equal(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    cm = _build_and_check(_reductions_model(), tmp_path, {"x": x})
    rules = set(cm.info.schedules.values())
    assert cm.info.naive_kernels == [], cm.info.schedules
    assert not rules & {"naive", "fallback"}, cm.info.schedules
    assert "row-reduction" in rules or "dlight-reduction" in rules, cm.info.schedules


def test_conv1d_goes_channels_last_and_small_kernels_stay_serial(tmp_path: Path) -> None:
    """A 1-D conv stack like silero's: the convs are NWC with WIO weights (vectorized along
    output channels), and a kernel of ~50k multiply-adds does not wake the thread pool (in
    silero a parallel 49k-MAC conv took 0.97 ms, 100x ONNX Runtime's whole model)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1], strides=[2]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1], strides=[2]),
             helper.make_node("Relu", ["c2"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 128, 8])], [vi("y", [1, 64, 2])],
                   [("W1", rng.standard_normal((128, 128, 3)).astype(np.float32) * 0.1),
                    ("B1", rng.standard_normal(128).astype(np.float32)),
                    ("W2", rng.standard_normal((64, 128, 3)).astype(np.float32) * 0.1)], opset=13)
    x = rng.standard_normal((1, 128, 8)).astype(np.float32)
    cm = _build_and_check(m, tmp_path, {"x": x})
    assert cm.info.layout == "NHWC"
    assert cm.info.naive_kernels == []
    convs = {k: v for k, v in cm.info.schedules.items() if "conv1d" in k}
    assert convs and set(convs.values()) == {"tiled-reduction"}, cm.info.schedules
    mod = cm.ir_module
    for gv, f in mod.functions_items():
        if "conv1d" in gv.name_hint and isinstance(f, tvm.tirx.PrimFunc):
            k = loop_kinds(f)
            assert k["vectorized"] and not k["parallel"], (gv.name_hint, k)


def test_convs_go_channels_last_one_by_one_when_convert_layout_fails(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Relax's ConvertLayout is all or nothing (on magika one op's layout rule aborted it and
    its 1-D conv stayed NCHW with width 1 innermost: 98% of the model's time). When it fails,
    each conv goes channels-last on its own and is still vectorized."""
    from tvm import relax

    def failing(*a, **k):
        def run(mod):
            raise tvm.error.TVMError("Invalid SLayout: can't find S in source layout ABC")
        return run

    monkeypatch.setattr(relax.transform, "ConvertLayout", failing)
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Unsqueeze", ["x", "ax3"], ["u"]),
             helper.make_node("Transpose", ["u"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("Conv", ["t", "W", "B"], ["c"]),
             helper.make_node("Squeeze", ["c", "ax3"], ["s"]),
             helper.make_node("Relu", ["s"], ["r"]),
             helper.make_node("ReduceMax", ["r"], ["y"], axes=[2], keepdims=0)]
    m = make_model(nodes, [vi("x", [1, 40, 32])], [vi("y", [1, 32])],
                   [("W", rng.standard_normal((32, 32, 5, 1)).astype(np.float32)),
                    ("B", rng.standard_normal(32).astype(np.float32)), ("ax3", np.array([3]))], opset=13)
    cm = _build_and_check(m, tmp_path, {"x": rng.standard_normal((1, 40, 32)).astype(np.float32)})
    assert cm.info.layout == "NHWC (per conv)"
    conv = [v for k, v in cm.info.schedules.items() if "conv2d" in k]
    assert conv == ["tiled-reduction"], cm.info.schedules
    assert cm.info.naive_kernels == []


def test_naive_kernel_count_reads_the_scheduled_tir(tmp_path: Path) -> None:
    """The build reports kernels that kept naive loops: all of an unscheduled build's big
    kernels, none of the default-scheduled one's."""
    m = _reductions_model()
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    naive = tvm_compile(str(path), build_cache=False, progress=False, default_schedules=False)
    assert len(naive.info.naive_kernels) >= 3, naive.info.naive_kernels
    assert naive.info.naive_kernels == naive_kernels(naive.ir_module)
    scheduled = tvm_compile(str(path), build_cache=False, progress=False)
    assert scheduled.info.naive_kernels == []
    # per function: the unscheduled matmul is naive, a scheduled one is not
    mm = next(gv for gv, _ in naive.ir_module.functions_items() if "matmul" in gv.name_hint)
    assert is_naive(naive.ir_module[mm])
    assert loop_kinds(naive.ir_module[mm])["iterations"] >= 4 * 224 * 256
    assert not any(is_naive(f) for gv, f in scheduled.ir_module.functions_items()
                   if isinstance(f, tvm.tirx.PrimFunc))


def test_naive_kernels_recorded_in_the_sidecar(tmp_path: Path) -> None:
    from graphopt.backend import load_compiled

    path = tmp_path / "m.onnx"
    onnx.save(_reductions_model(), path)
    cm = tvm_compile(str(path), build_cache=False, progress=False, default_schedules=False)
    cm.export(tmp_path / "m.so")
    assert load_compiled(tmp_path / "m.so").info.naive_kernels == cm.info.naive_kernels != []


def test_odd_width_small_kernel_is_reported_naive(tmp_path: Path) -> None:
    """A small elementwise kernel with no whole vectors along its contiguous axis (257 wide, the
    width of a byte one-hot) stays scalar and under the parallel threshold: the build reports it
    as naive rather than hiding it."""
    nodes = [helper.make_node("Mul", ["x", "x"], ["m"]), helper.make_node("Add", ["m", "x"], ["y"])]
    m = make_model(nodes, [vi("x", [3, 257])], [vi("y", [3, 257])], opset=13)
    x = np.random.default_rng(0).standard_normal((3, 257)).astype(np.float32)
    cm = _build_and_check(m, tmp_path, {"x": x})
    assert len(cm.info.naive_kernels) == 1, (cm.info.schedules, cm.info.naive_kernels)


def test_matmul_with_odd_width_is_not_a_row_reduction(tmp_path: Path) -> None:
    """A matmul whose output width has no vector divisor (a 6625-class CTC head in small: 25)
    must not get the row-reduction schedule (it vectorized the reduction and gathered weights
    with a stride: 6.6x ONNX Runtime on ppocrv5_rec)."""
    rng = np.random.default_rng(0)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])],
                   [vi("x", [1, 8, 64])], [vi("y", [1, 8, 25])],
                   [("W", rng.standard_normal((64, 25)).astype(np.float32)),
                    ("B", rng.standard_normal(25).astype(np.float32))], opset=13)
    cm = _build_and_check(m, tmp_path, {"x": rng.standard_normal((1, 8, 64)).astype(np.float32)})
    assert not {"row-reduction", "dlight-reduction"} & set(cm.info.schedules.values()), cm.info.schedules
