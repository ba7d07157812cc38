"""Bad option values are one-line errors (exit 2) on every command, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from graphopt import cli


@pytest.mark.parametrize("args, word", [
    (["optimize", "--example", "-o", "{o}", "--verify", "-3"], "--verify"),
    (["optimize", "--example", "-o", "{o}", "--verify", "x"], "--verify"),
    (["optimize", "--example", "-o", "{o}", "--atol", "-1"], "--atol"),
    (["optimize", "--example", "-o", "{o}", "--rtol", "nan"], "--rtol"),
    (["verify", "{m}", "{m}", "--samples", "0"], "--samples"),
    (["bench", "{m}", "--rounds", "0"], "--rounds"),
    (["bench", "{m}", "--threads", "-2"], "--threads"),
    (["compile", "{m}", "-o", "{o}", "--minutes", "-5"], "--minutes"),
    (["optimize", "--example", "-o", "{d}/missing/sub/o.onnx"], "does not exist"),
])
def test_bad_option_values_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               args: list[str], word: str) -> None:
    m = str(cli.example_model_path())
    argv = [a.format(o=tmp_path / "o.onnx", m=m, d=tmp_path) for a in args]
    with pytest.raises(SystemExit) as e:
        rc = cli.main(argv)
        raise SystemExit(rc)
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("graphopt: error:") and word in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_compress_refuses_an_already_quantized_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Pruning or clustering needs float weights; an integer model gets a clear refusal with the way out."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.UINT8, [4, 2, 3, 3], np.arange(72, dtype=np.uint8).tolist())
    g = helper.make_graph(
        [helper.make_node("ConvInteger", ["x", "w"], ["y"], name="conv"),
         helper.make_node("Cast", ["y"], ["z"], to=TensorProto.FLOAT, name="cast")],
        "q", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 6, 6])], [w])
    src = tmp_path / "int.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), src)
    rc = cli.main(["compress", str(src), "-o", str(tmp_path / "o.onnx"), "--prune", "0.5", "--structured"])
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "already quantized (1 ConvInteger)" in err[0] and "dequantize-integer" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int.onnx"]
