"""Declared negative dims (PaddlePaddle writes "any size" as dim_value -1).

ONNX Runtime reads a declared -1 as unknown, but onnx's shape inference and full check read it
literally: after ``resolve-reshape`` turned Flatten's shape computation into ``Reshape(x, [0, -1])``
onnx computed 0 columns for the Gemm behind it, and the CLI refused to write the result. graphopt
now writes such dims as symbolic or unknown dims, which onnx and ORT both read as
"any size": a symbol ``<input>_dim<axis>`` on the main graph's inputs (onnx's inference carries it to
the outputs), an unknown dim elsewhere. These tests run the tinycnn with -1 on each dim through optimize, quantize and compress,
check the written models with onnx's full check and ORT at two sizes of the dynamic dim where the
model allows it, and check that a normal model's round trip keeps its bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphopt
from graphopt.cli import main

TINY = Path(graphopt.__file__).parent / "data" / "tinycnn.onnx"


def _variant(tmp_path: Path, axes: tuple[int, ...], value: int = -1) -> Path:
    m = onnx.load(TINY)
    for a in axes:
        m.graph.input[0].type.tensor_type.shape.dim[a].dim_value = value
    p = tmp_path / f"in_{'_'.join(map(str, axes))}.onnx"
    onnx.save(m, p)
    return p


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x})[0]


def _no_negative_dims(m: onnx.ModelProto) -> bool:
    vis = list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info)
    return all(not (d.HasField("dim_value") and d.dim_value < 0) for vi in vis for d in vi.type.tensor_type.shape.dim)


def _check_equivalent(src: Path, out: Path, batches: tuple[int, ...], atol: float) -> None:
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    assert _no_negative_dims(m)
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, 1, 8, 8)).astype(np.float32)
        np.testing.assert_allclose(_run(out, x), _run(src, x), atol=atol, rtol=0)


@pytest.mark.parametrize("axes", [(0,), (2,), (3,), (2, 3), (0, 2, 3)])
def test_optimize_with_negative_dims(tmp_path: Path, axes: tuple[int, ...]) -> None:
    src = _variant(tmp_path, axes)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "-o", str(out)]) == 0
    _check_equivalent(src, out, (1, 3), 1e-5)
    # the dynamic dims stay dynamic, named after the input and axis
    shape = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    for a in axes:
        assert shape[a] == f"input_dim{a}"
    out2 = tmp_path / "out2.onnx"
    assert main(["optimize", str(src), "-o", str(out2), "--verify", "2", "--input-shape", "input:1,1,8,8"]) == 0
    _check_equivalent(src, out2, (1,), 1e-5)
    if axes == (0,):  # random inputs can only be made without hints where the model runs at any size
        out3 = tmp_path / "out3.onnx"
        assert main(["optimize", str(src), "-o", str(out3), "--verify", "2"]) == 0
        _check_equivalent(src, out3, (1, 3), 1e-5)


@pytest.mark.parametrize("axes", [(0,), (2, 3)])
def test_quantize_with_negative_dims(tmp_path: Path, axes: tuple[int, ...]) -> None:
    src = _variant(tmp_path, axes)
    cal = tmp_path / "cal.npz"
    np.savez(cal, input=np.random.default_rng(1).random((4, 1, 1, 8, 8), dtype=np.float32))
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(src), "-o", str(out), "--calibration", str(cal)]) == 0
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    assert _no_negative_dims(m)
    assert any(n.op_type in ("QuantizeLinear", "QLinearConv", "ConvInteger") for n in m.graph.node)
    x = np.random.default_rng(2).random((3, 1, 8, 8), dtype=np.float32)
    ref, got = _run(src, x), _run(out, x)
    assert got.shape == ref.shape
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 2 / 3


def test_compress_with_negative_dims(tmp_path: Path) -> None:
    src = _variant(tmp_path, (0, 2))
    out = tmp_path / "c.onnx"
    assert main(["compress", str(src), "-o", str(out), "--prune", "0.3", "--structured",
                 "--input-shape", "input:2,1,8,8"]) == 0
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    assert _no_negative_dims(m)
    assert _run(out, np.zeros((2, 1, 8, 8), np.float32)).shape == (2, 10)
    # smaller than the input: something was pruned
    assert out.stat().st_size < src.stat().st_size


def test_negative_dims_written_as_symbols_by_plain_round_trip(tmp_path: Path) -> None:
    src = _variant(tmp_path, (0, 2))
    out = tmp_path / "rt.onnx"
    graphopt.save(graphopt.load(src), out)
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["input_dim0", 1, "input_dim2", 8]


def test_load_check_reads_negative_dims_as_unknown(tmp_path: Path) -> None:
    """A Paddle-style model with -1 on its input and a Reshape to [0, -1] (ORT loads it; onnx's
    full check alone reads 0 columns for the Gemm) is accepted and optimized."""
    src = _variant(tmp_path, (2,))
    mid = tmp_path / "mid.onnx"
    assert main(["optimize", str(src), "-o", str(mid)]) == 0
    m = onnx.load(mid)
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = -1
    with pytest.raises(onnx.shape_inference.InferenceError, match="512 and 0"):
        onnx.checker.check_model(m, full_check=True)
    bad = tmp_path / "paddle_like.onnx"
    onnx.save(m, bad)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(bad), "-o", str(out)]) == 0
    _check_equivalent(bad, out, (1, 2), 1e-5)


def test_normal_model_round_trip_keeps_bytes(tmp_path: Path) -> None:
    out = tmp_path / "rt.onnx"
    graphopt.save(graphopt.load(TINY), out)
    assert out.read_bytes() == onnx.load(TINY).SerializeToString()


def test_zero_dim_is_literal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A declared 0 is a size for ORT too (it refuses any other), so it is kept; a model ORT
    cannot load because of it is refused in one line, nothing written."""
    src = _variant(tmp_path, (2,), value=0)
    out = tmp_path / "z.onnx"
    assert main(["optimize", str(src), "-o", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("graphopt: error:") and "Runtime" in err[-1]


def test_paddle_ppocr_cls(tmp_path: Path) -> None:
    from benchmarks.corpus import fetch
    from benchmarks.corpus.data import task

    src = fetch(["ppocr_cls"])["ppocr_cls"]
    assert not _no_negative_dims(onnx.load(src))  # -1 batch, as paddle2onnx writes it
    feeds = task("ppocr_cls").eval_feeds(4)
    npz = tmp_path / "feeds.npz"
    name = next(iter(feeds[0]))
    np.savez(npz, **{name: np.stack([f[name] for f in feeds])})
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--verify", "2", "--inputs", str(npz)]) == 0
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    assert _no_negative_dims(m)
    sym = m.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert sym == f"{name}_dim0"
    assert m.graph.output[0].type.tensor_type.shape.dim[0].dim_param == sym  # the batch, carried through
    s0 = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    s1 = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for b in (1, 3):  # the batch is dynamic: two sizes
        x = np.concatenate([feeds[i % 4][name] for i in range(b)])
        np.testing.assert_allclose(s1.run(None, {name: x})[0], s0.run(None, {name: x})[0], atol=1e-4, rtol=0)
