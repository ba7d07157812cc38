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
