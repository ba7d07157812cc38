"""Import -> export with no passes reproduces every model of the onnx package's test data.

For each model: the exported proto is byte-identical to the original, passes the full ONNX
checker, and - run under ONNX Runtime, or onnx's reference evaluator where ORT 1.x no longer
supports the model's opset - reproduces the stored expected outputs.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import backend_model_dirs, light_models
from onnx import numpy_helper

import graphopt
from graphopt.runtime import compare, make_inputs


def _read_set(d: Path) -> tuple[list[np.ndarray | list], list[np.ndarray | list]]:
    def read(p: str):
        # inputs/outputs may be tensors or sequences
        data = Path(p).read_bytes()
        t = onnx.TensorProto()
        t.ParseFromString(data)
        if t.data_type != 0 or t.dims:
            return numpy_helper.to_array(t)
        s = onnx.SequenceProto()
        s.ParseFromString(data)
        return numpy_helper.to_list(s)

    ins = [read(p) for p in sorted(glob.glob(str(d / "input_*.pb")), key=lambda x: int(x.split("_")[-1][:-3]))]
    outs = [read(p) for p in sorted(glob.glob(str(d / "output_*.pb")), key=lambda x: int(x.split("_")[-1][:-3]))]
    return ins, outs


def _run(mp: onnx.ModelProto, feed: dict) -> list | None:
    """Outputs under ORT, else onnx's reference evaluator; None if neither can run the op set
    (Gradient of ai.onnx.preview.training: then byte identity is the whole check)."""
    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 4
        sess = ort.InferenceSession(mp.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return sess.run(None, feed)
    except Exception:  # noqa: BLE001 - ORT 1.2x dropped kernels for opset < 7: use the reference
        from onnx.reference import ReferenceEvaluator

        try:
            return list(ReferenceEvaluator(mp).run(None, feed))
        except NotImplementedError:
            return None


def _check_outputs(got: list, expected: list, rtol=1e-3, atol=1e-4) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        if isinstance(e, list):
            assert len(g) == len(e)
            for a, b in zip(g, e, strict=True):
                np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
        elif e.dtype.kind in "OSU":
            assert np.array_equal(np.asarray(g).astype(str), e.astype(str))
        else:
            np.testing.assert_allclose(np.asarray(g), e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("d", backend_model_dirs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_backend_model_round_trip(d: Path) -> None:
    orig = onnx.load(str(d / "model.onnx"))
    model = graphopt.load(d / "model.onnx")
    model.verify()
    out = graphopt.to_proto(model)
    assert out.SerializeToString() == orig.SerializeToString(), "round trip is not byte-identical"
    onnx.checker.check_model(out, full_check=True)
    for ds in sorted(d.glob("test_data_set_*")):
        ins, expected = _read_set(ds)
        names = [i.name for i in out.graph.input if i.name not in {t.name for t in out.graph.initializer}]
        feed = dict(zip(names, ins, strict=False))
        if any(isinstance(v, list) for v in feed.values()):
            pytest.skip("sequence inputs are fed by the reference runner only")
        got = _run(out, feed)
        if got is None:
            assert _run(orig, feed) is None  # the original cannot run either
            continue
        _check_outputs(got, expected)


@pytest.mark.parametrize("path", light_models(), ids=lambda p: p.stem)
def test_light_model_round_trip(path: Path) -> None:
    orig = onnx.load(str(path))
    model = graphopt.load(path)
    out = graphopt.to_proto(model)
    assert out.SerializeToString() == orig.SerializeToString()
    onnx.checker.check_model(out, full_check=True)
    expected = numpy_helper.to_array(onnx.load_tensor(str(path).replace(".onnx", "_output_0.pb")))
    # weights are ConstantOfShape of one value: outputs do not depend on the input (NOTES.md)
    feed = make_inputs(model)
    got = _run(out, feed)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5)


def test_round_trip_through_file_is_identical(tmp_path: Path, example_path: Path) -> None:
    m = graphopt.load(example_path)
    graphopt.save(m, tmp_path / "rt.onnx")
    assert (tmp_path / "rt.onnx").read_bytes() == example_path.read_bytes()
    feed = make_inputs(m, {"input": [4, 1, 8, 8]})
    assert compare(graphopt.run_ort(example_path, feed), graphopt.run_ort(tmp_path / "rt.onnx", feed)).max_abs == 0
