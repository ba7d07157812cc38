"""TVM integer INT8 kernels for QDQ models (graphopt.backend.int8).

A QDQ model from graphopt's static quantizer must compile into int8 x int8 -> int32 conv2d and
matmul kernels (int32 accumulation in the built TIR; AVX-512 VNNI ``vpdpbusd`` in the machine
code where the CPU has it) and match ONNX Runtime's integer result.

The bound asserted against ORT: every output element within ONE quantization step, and at most
1% of them one step away. Why not bit-exact: both sides accumulate in int32 exactly, but ORT
requantizes ``(acc + bias_q) * (sx*sw/sy)`` while TVM computes ``(acc - zx*sum(w)) * (sx*sw) +
bias`` and divides by ``sy`` - the same real number through different float32 roundings, so an
output within a rounding error of a .5 tie can round the other way (and the depthwise conv,
which stays float under TVM, sums dequantized products in float). A wrong zero point, scale,
padding value or weight layout moves most elements by many steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model, vi

import graphopt
from graphopt.runtime import ort_session

tvm = pytest.importorskip("tvm", reason="the tvm extra is not installed")

from graphopt.backend import compile as tvm_compile
from graphopt.backend.int8 import has_vnni, weight_table
from graphopt.backend.lut import has_vbmi
from graphopt.backend.targets import resolve_target

needs_vnni = pytest.mark.skipif(not has_vnni(resolve_target("host").tvm_target()),
                                reason="integer kernels are built for CPUs with AVX-512 VNNI only")


def _conv_net(rng: np.random.Generator) -> onnx.ModelProto:
    """3 input channels (padded to 4 for vpdpbusd), 20 and 24 output channels (padded to 32),
    stride 2, zero padding (the zero point pads), a depthwise conv, a 1x1 conv."""
    from onnx import helper

    w = {
        "W1": rng.standard_normal((20, 3, 3, 3)).astype(np.float32) * 0.3,
        "B1": rng.standard_normal(20).astype(np.float32) * 0.1,
        "W2": rng.standard_normal((32, 20, 3, 3)).astype(np.float32) * 0.1,
        "B2": rng.standard_normal(32).astype(np.float32) * 0.1,
        "W3": rng.standard_normal((32, 1, 3, 3)).astype(np.float32) * 0.3,
        "W4": rng.standard_normal((24, 32, 1, 1)).astype(np.float32) * 0.2,
        "B4": rng.standard_normal(24).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "W3"], ["c3"], pads=[1, 1, 1, 1], group=32),
        helper.make_node("Conv", ["c3", "W4", "B4"], ["y"]),
    ]
    return make_model(nodes, [vi("x", [1, 3, 20, 20])], [vi("y", [1, 24, 10, 10])], list(w.items()), opset=13)


def _mlp(rng: np.random.Generator) -> onnx.ModelProto:
    """MatMul + bias + Relu, MatMul: K 60 and 40, N 40 and 33 (padded to 48), rows 2x8 (3-d)."""
    from onnx import helper

    w = {"W1": rng.standard_normal((60, 40)).astype(np.float32) * 0.2,
         "B1": rng.standard_normal(40).astype(np.float32) * 0.1,
         "W2": rng.standard_normal((40, 33)).astype(np.float32) * 0.2}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "B1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    return make_model(nodes, [vi("x", [2, 8, 60])], [vi("y", [2, 8, 33])], list(w.items()), opset=13)


def _quantized(model: onnx.ModelProto, tmp_path: Path, rng: np.random.Generator, **options) -> tuple[Path, list]:
    src = tmp_path / "fp32.onnx"
    onnx.save(model, src)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(10)]
    m = graphopt.load(src)
    graphopt.run_passes(m, [graphopt.get_pass("quantize-static", **options), "dce"],
                        graphopt.PassContext(calibration=feeds[:8]))
    dst = tmp_path / "int8.onnx"
    graphopt.save(m, dst)
    onnx.checker.check_model(onnx.load(dst), full_check=True)
    return dst, feeds[8:]


def _output_step(path: Path) -> float:
    """The quantization step of the model's output (it comes from a DequantizeLinear)."""
    m = onnx.load(path)
    out = m.graph.output[0].name
    dq = next(n for n in m.graph.node if n.output[0] == out)
    assert dq.op_type == "DequantizeLinear"
    init = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    return float(init[dq.input[1]])


def _check_against_ort(cm, path: Path, feeds: list) -> None:
    step = _output_step(path)
    sess = ort_session(str(path))
    for f in feeds:
        ref = sess.run(None, f)[0]
        got = cm.run(f)[0]
        steps = np.abs(got.astype(np.float64) - ref) / step
        assert steps.max() <= 1.0 + 1e-3, f"{steps.max():.2f} quantization steps from ORT's integer result"
        assert np.mean(steps > 0.5) <= 0.01, f"{np.mean(steps > 0.5):.1%} of the outputs differ from ORT by a step"


def _vector_extents(func) -> list[int]:  # type: ignore[no-untyped-def]
    """Extents of the loops of ``func`` marked vectorized."""
    import tvm_ffi

    out: list[int] = []

    def visit(loop) -> None:  # type: ignore[no-untyped-def]
        if int(loop.kind) == int(tvm.tirx.ForKind.VECTORIZED):
            out.append(int(loop.extent))

    tvm_ffi.structural_walk(func.body, (tvm.tirx.For, visit), order="pre")
    return out


def _int8_kernels(cm) -> list[str]:
    """The integer kernels of a build: PrimFuncs whose reduction accumulates int32 from uint8
    and int8 operands (read from the built TIR, not from the rule names)."""
    from tvm import tirx

    out = []
    for gv, f in cm.ir_module.functions_items():
        if not isinstance(f, tirx.PrimFunc):
            continue
        text = f.script()
        if '"int32"' in text and '"uint8"' in text and '"int8"' in text and "T.Cast(\"float32\"" in text \
                and ("vpdpbusd" in text or 'T.Cast("int32", param' in text):
            out.append(gv.name_hint)
    return out


@needs_vnni
@pytest.mark.parametrize("symmetric", [False, True], ids=["u8s8", "s8s8"])
def test_qdq_conv_net_runs_integer_kernels_and_matches_ort(tmp_path: Path, symmetric: bool) -> None:
    rng = np.random.default_rng(0)
    path, feeds = _quantized(_conv_net(rng), tmp_path, rng, symmetric_activations=symmetric)
    cm = tvm_compile(str(path), build_cache=False, progress=False)
    # the three dense convs run on vpdpbusd; the depthwise one is integer too (no dot product)
    assert cm.info.rewrites.get("int8_conv2d") == 3, cm.info.rewrites
    assert cm.info.rewrites.get("int8_grouped_conv2d") == 1, cm.info.rewrites
    assert "float_kept" not in cm.info.rewrites
    assert len(_int8_kernels(cm)) == 4, sorted(cm.info.schedules)
    assert sum(v == "int8-vnni" for v in cm.info.schedules.values()) == 3, cm.info.schedules
    asm = cm.module.mod.imports[0].inspect_source("asm")
    assert "vpdpbusd" in asm
    assert not cm.info.naive_kernels
    _check_against_ort(cm, path, feeds)


@needs_vnni
def test_qdq_matmul_runs_integer_kernels_and_matches_ort(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path, feeds = _quantized(_mlp(rng), tmp_path, rng)
    cm = tvm_compile(str(path), build_cache=False, progress=False)
    assert cm.info.rewrites.get("int8_matmul") == 2, cm.info.rewrites
    assert len(_int8_kernels(cm)) == 2, sorted(cm.info.schedules)
    assert sum(v == "int8-vnni" for v in cm.info.schedules.values()) == 2, cm.info.schedules
    _check_against_ort(cm, path, feeds)


def test_integer_kernels_can_be_turned_off(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path, feeds = _quantized(_mlp(rng), tmp_path, rng)
    cm = tvm_compile(str(path), build_cache=False, progress=False, int8_kernels=False)
    assert not any(k.startswith("int8") for k in cm.info.rewrites)
    assert not _int8_kernels(cm)
    ref = ort_session(str(path)).run(None, feeds[0])[0]
    step = _output_step(path)
    assert np.abs(cm.run(feeds[0])[0] - ref).max() <= step * 1.001  # the float path: also within a step


def test_weight_table_keys_weights_by_their_dequantized_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    path, _ = _quantized(_mlp(rng), tmp_path, rng)
    m = graphopt.load(path)
    table = weight_table(m)
    assert len(table) == 2
    for iw in table.values():
        assert iw.q.dtype == np.int8 and iw.scale.dtype == np.float32
    # a float model has none (nothing is rewritten)
    assert weight_table(graphopt.load(tmp_path / "fp32.onnx")) == {}


@needs_vnni
def test_silu_epilogue_is_vectorized_and_matches_ort(tmp_path: Path) -> None:
    """YOLO-style conv + x*sigmoid(x): the sigmoid runs on TOPI's fast_exp in the int8 kernel's
    epilogue (LLVM made one scalar expf call per lane of TVM's exp: the epilogue cost more than
    the convolution), and the requantized result stays within one step of ORT's."""
    from onnx import helper

    rng = np.random.default_rng(4)
    w = {"W1": rng.standard_normal((32, 16, 3, 3)).astype(np.float32) * 0.1,
         "B1": rng.standard_normal(32).astype(np.float32) * 0.1,
         "W2": rng.standard_normal((16, 32, 1, 1)).astype(np.float32) * 0.2}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["m"]),
             helper.make_node("Conv", ["m", "W2"], ["y"])]
    model = make_model(nodes, [vi("x", [1, 16, 12, 12])], [vi("y", [1, 16, 12, 12])], list(w.items()), opset=13)
    path, feeds = _quantized(model, tmp_path, rng)
    cm = tvm_compile(str(path), build_cache=False, progress=False)
    assert cm.info.rewrites.get("int8_conv2d") == 2, cm.info.rewrites
    asm = cm.module.mod.imports[0].inspect_source("asm")
    assert "vpdpbusd" in asm and "expf" not in asm
    if has_vbmi(resolve_target("host").tvm_target()):  # the table read as byte permutes, not a gather
        assert "vpermt2b" in asm or "vpermi2b" in asm
    # the write-back reading the table is vectorized across the conv's 32 channels (one permute
    # reads 64 lanes), not in 16-lane pieces
    fused = [f for gv, f in cm.ir_module.functions_items() if "graphopt_lookup" in gv.name_hint]
    assert fused and all(32 in _vector_extents(f) for f in fused), [_vector_extents(f) for f in fused]
    _check_against_ort(cm, path, feeds)


@needs_vnni
def test_conv_whose_weight_dequantize_stays_unfolded_is_integer(tmp_path: Path) -> None:
    """A weight over the constant folder's size limit (1 MB as float) keeps its DequantizeLinear
    through the lossless pipeline, so TVM imports ``dequantize(int8 constant)`` rather than a float
    constant: the conv must still become an integer kernel (it stayed float, uncounted, on the
    detectors' widest convs: 5 of ddddocr_det's 83), with the integer weights read from the op."""
    from onnx import helper

    rng = np.random.default_rng(5)
    w = {"W1": rng.standard_normal((576, 64, 3, 3)).astype(np.float32) * 0.05,  # 1.3 MB as float
         "B1": rng.standard_normal(576).astype(np.float32) * 0.1,
         "W2": rng.standard_normal((16, 576, 1, 1)).astype(np.float32) * 0.05}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Conv", ["r", "W2"], ["y"])]
    model = make_model(nodes, [vi("x", [1, 64, 8, 8])], [vi("y", [1, 16, 4, 4])], list(w.items()), opset=13)
    path, feeds = _quantized(model, tmp_path, rng)
    cm = tvm_compile(str(path), build_cache=False, progress=False)
    assert cm.info.rewrites.get("int8_conv2d") == 2, cm.info.rewrites
    assert "float_kept" not in cm.info.rewrites, cm.info.rewrites
    assert len(_int8_kernels(cm)) == 2, sorted(cm.info.schedules)
    _check_against_ort(cm, path, feeds)


@needs_vnni
@pytest.mark.parametrize("symmetric", [False, True], ids=["u8", "s8"])
def test_quantized_silu_becomes_a_lookup_fused_into_the_conv(tmp_path: Path, symmetric: bool) -> None:
    """A QDQ SiLU after a conv (dequantize -> sigmoid -> quantize -> dequantize -> mul ->
    quantize) is a function of the conv's requantized output alone: it must become one
    256-entry table read inside the conv's kernel (no exp, no separate lookup kernel), with
    every output within one step of ORT's integer result (uint8 and int8 activations: the int8
    table is indexed from -128)."""
    from onnx import helper

    rng = np.random.default_rng(6)
    w = {"W1": rng.standard_normal((32, 8, 3, 3)).astype(np.float32) * 0.2,
         "B1": rng.standard_normal(32).astype(np.float32) * 0.1,
         "W2": rng.standard_normal((24, 32, 1, 1)).astype(np.float32) * 0.2}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["s"]), helper.make_node("Mul", ["c", "s"], ["m"]),
             helper.make_node("Conv", ["m", "W2"], ["c2"]), helper.make_node("Relu", ["c2"], ["y"])]
    model = make_model(nodes, [vi("x", [1, 8, 12, 12])], [vi("y", [1, 24, 12, 12])], list(w.items()), opset=13)
    path, feeds = _quantized(model, tmp_path, rng, symmetric_activations=symmetric)
    cm = tvm_compile(str(path), build_cache=False, progress=False)
    assert cm.info.rewrites.get("int8_conv2d") == 2, cm.info.rewrites
    assert cm.info.rewrites.get("lookup_tables", 0) >= 1, cm.info.rewrites  # the SiLU; the Relu stays arithmetic
    names = [gv.name_hint for gv, f in cm.ir_module.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert any("conv2d" in n and "graphopt_lookup" in n for n in names), names  # fused into the conv
    assert not any(n.startswith("graphopt_lookup") for n in names), names  # no kernel of its own
    asm = cm.module.mod.imports[0].inspect_source("asm")
    assert "vpdpbusd" in asm and "expf" not in asm
    if has_vbmi(resolve_target("host").tvm_target()):  # the table read as byte permutes, not a gather
        assert "vpermt2b" in asm or "vpermi2b" in asm
    # the write-back reading the table is vectorized across the conv's 32 channels (one permute
    # reads 64 lanes), not in 16-lane pieces
    fused = [f for gv, f in cm.ir_module.functions_items() if "graphopt_lookup" in gv.name_hint]
    assert fused and all(32 in _vector_extents(f) for f in fused), [_vector_extents(f) for f in fused]
    _check_against_ort(cm, path, feeds)


def test_lookup_tables_leave_requantizing_chains_arithmetic() -> None:
    """Only chains with a non-affine op become tables: a requantization (affine, rounding,
    clipping) vectorizes as arithmetic, a gather from a table does not."""
    from tvm import relax

    from graphopt.backend.int8 import elementwise_qdq, lookup_tables

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 64), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            d = bb.emit(relax.op.dequantize(x, relax.const(0.05, "float32"), relax.const(10, "uint8")))
            s = bb.emit(relax.op.sigmoid(d))
            q1 = bb.emit(relax.op.quantize(s, relax.const(1 / 255, "float32"), relax.const(0, "uint8"),
                                           out_dtype="uint8"))
            q2 = bb.emit(relax.op.quantize(d, relax.const(0.1, "float32"), relax.const(3, "uint8"),
                                           out_dtype="uint8"))
            out = bb.emit_output(relax.Tuple([q1, q2]))
        bb.emit_func_output(out)
    mod = elementwise_qdq(bb.get())
    mod, n = lookup_tables(mod)
    assert n == 1  # the sigmoid's quantize; the requantization q2 stays arithmetic
    ex = relax.build(mod, tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xs = np.arange(256, dtype=np.uint8).reshape(4, 64)
    for row in xs:
        got1, got2 = (o.numpy() for o in vm["main"](tvm.runtime.tensor(row[None], tvm.cpu())))
        deq = (row.astype(np.float32) - np.float32(10)) * np.float32(0.05)
        want1 = np.clip(np.round((np.float32(1) / (np.float32(1) + np.exp(-deq))) / np.float32(1 / 255)), 0, 255)
        want2 = np.clip(np.round(deq / np.float32(0.1)) + 3, 0, 255)
        np.testing.assert_array_equal(got1[0], want1.astype(np.uint8))
        np.testing.assert_array_equal(got2[0], want2.astype(np.uint8))


@needs_vnni
def test_quantized_concat_reshape_split_move_uint8(tmp_path: Path) -> None:
    """A detector head (two convs concatenated, reshaped, transposed and split again) between
    quantize/dequantize pairs: the quantize is sunk below the data movement, so the concat,
    reshape, transpose and split move uint8 (no float32 kernel among them, none computing a
    rounding), and every output stays within one step of ORT's integer result."""
    from onnx import helper

    rng = np.random.default_rng(7)
    w = {"W1": rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2,
         "W2": rng.standard_normal((8, 8, 1, 1)).astype(np.float32) * 0.3,
         "W3": rng.standard_normal((16, 24, 1, 1)).astype(np.float32) * 0.2,
         "shape": np.array([1, 24, 64], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "W2"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("Conv", ["c", "W3"], ["d"]),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
             helper.make_node("Split", ["t"], ["s1", "s2"], axis=2, split=[16, 8]),
             helper.make_node("Relu", ["s1"], ["y1"]), helper.make_node("Relu", ["d"], ["y2"])]
    model = make_model(nodes, [vi("x", [1, 8, 8, 8])], [vi("y1", [1, 64, 16]), vi("y2", [1, 16, 8, 8])],
                       list(w.items()), opset=11)
    path, feeds = _quantized(model, tmp_path, rng)
    cm = tvm_compile(str(path), build_cache=False, progress=False)
    assert cm.info.rewrites.get("quantize_sunk", 0) >= 1, cm.info.rewrites
    from tvm import tirx

    for gv, f in cm.ir_module.functions_items():
        if isinstance(f, tirx.PrimFunc) and ("concat" in gv.name_hint or "split" in gv.name_hint):
            text = f.script()
            assert '"float32"' not in text and "nearbyint" not in text, gv.name_hint  # a uint8 copy
    sess = ort_session(str(path))
    m = onnx.load(path)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    steps = {n.output[0]: float(init[n.input[1]]) for n in m.graph.node
             if n.op_type == "DequantizeLinear" and n.output[0] in ("y1", "y2")}
    for f in feeds:
        for ref, got, name in zip(sess.run(None, f), cm.run(f), ("y1", "y2"), strict=True):
            step = steps.get(name, float(np.abs(ref).max()) / 255)
            d = np.abs(got.astype(np.float64) - ref) / step
            assert d.max() <= 1.0 + 1e-3 and np.mean(d > 0.5) <= 0.01, (name, d.max())


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("lanes", [16, 32, 64])
def test_byte_table_reads_become_permutes_and_read_every_entry(dtype: str, lanes: int) -> None:
    """A vectorized read of a 256-entry byte table (the quantized SiLU/sigmoid/HardSwish in a conv
    epilogue) is rewritten into two ``vpermi2b`` and a blend on AVX-512 VBMI: the machine code
    has the permutes and no byte gathers, and on a VBMI host every one of the 256 entries reads
    back as numpy's ``table[idx]``, for each vector width. Without VBMI the read is left alone."""
    from tvm import te
    from tvm.s_tir import Schedule

    from graphopt.backend.lut import register_pipeline

    n = 512
    idx = te.placeholder((n,), "uint8", name="idx")
    table = te.placeholder((256,), dtype, name="table")
    out = te.compute((n,), lambda i: table[idx[i].astype("int32")], name="out")
    sch = Schedule(te.create_prim_func([idx, table, out]))
    _, inner = sch.split(sch.get_loops(sch.get_sblock("out"))[0], [None, lanes])
    sch.vectorize(inner)
    mod = sch.mod.with_attr("global_symbol", "main") if hasattr(sch.mod, "with_attr") else sch.mod
    znver4 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})
    skylake = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"})
    assert has_vbmi(znver4) and not has_vbmi(skylake)
    asm = tvm.tirx.build(mod, target=znver4, pipeline=register_pipeline()).inspect_source("asm")
    plain = tvm.tirx.build(mod, target=skylake, pipeline=register_pipeline()).inspect_source("asm")
    assert "vpermt2b" in asm or "vpermi2b" in asm
    assert "vpinsrb" not in asm and "movzbl" not in asm  # no lane-by-lane byte loads
    assert "vpermt2b" not in plain and "vpermi2b" not in plain
    host = resolve_target("host").tvm_target()
    if not has_vbmi(host):
        pytest.skip("the host has no AVX-512 VBMI: the permutes are not run")
    rng = np.random.default_rng(lanes)
    t = rng.integers(-128 if dtype == "int8" else 0, 128 if dtype == "int8" else 256, 256).astype(dtype)
    i = np.concatenate([np.arange(256), rng.integers(0, 256, n - 256)]).astype(np.uint8)
    rng.shuffle(i)
    lib = tvm.tirx.build(mod, target=host, pipeline=register_pipeline())
    got = tvm.runtime.tensor(np.zeros(n, dtype))
    lib(tvm.runtime.tensor(i), tvm.runtime.tensor(t), got)
    np.testing.assert_array_equal(got.numpy(), t[i])


def test_rounding_vectorizable_only_in_kernels_reading_a_table() -> None:
    """``nearbyint`` (round half to even, every requantization) becomes LLVM's vectorizable
    intrinsic in a kernel that reads a byte table, so TVM vectorizes the epilogue and its table
    read becomes permutes; a kernel without a table keeps TVM's op (LLVM vectorizes that loop
    itself). Both round halves to even."""
    from tvm import te

    from graphopt.backend.lut import register_pipeline, rounding_pass

    x = te.placeholder((64,), "float32", name="x")
    table = te.placeholder((256,), "uint8", name="table")
    q = lambda i: te.min(te.max(tvm.tirx.nearbyint(x[i] * 10.0) + 128.0, 0.0), 255.0).astype("uint8")
    with_table = te.create_prim_func([x, table, te.compute((64,), lambda i: table[q(i).astype("int32")], name="y")])
    plain = te.create_prim_func([x, te.compute((64,), q, name="y")])
    znver4 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})
    mod = tvm.tirx.transform.BindTarget(znver4)(tvm.IRModule({"with_table": with_table, "plain": plain}))
    mod = rounding_pass()(mod)
    assert "llvm.nearbyint" in mod["with_table"].script() and "T.nearbyint" not in mod["with_table"].script()
    assert "T.nearbyint" in mod["plain"].script()
    skylake = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"})
    unchanged = rounding_pass()(tvm.tirx.transform.BindTarget(skylake)(tvm.IRModule({"with_table": with_table})))
    assert "T.nearbyint" in unchanged["with_table"].script()  # no byte permute there: left alone
    lib = tvm.tirx.build(tvm.IRModule({"main": with_table.with_attr("global_symbol", "main")}),
                         target=resolve_target("host").tvm_target(), pipeline=register_pipeline())
    xs = np.array([0.05, 0.15, 0.25, -0.05, -0.15, 0.26] * 10 + [0.0] * 4, np.float32)
    t = np.arange(256, dtype=np.uint8)[::-1].copy()
    got = tvm.runtime.tensor(np.zeros(64, np.uint8))
    lib(tvm.runtime.tensor(xs), tvm.runtime.tensor(t), got)
    want = t[np.clip(np.round(xs * np.float32(10.0)) + 128, 0, 255).astype(np.int64)]
    np.testing.assert_array_equal(got.numpy(), want)
