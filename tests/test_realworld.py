"""The correctness part of the corpus matrix (benchmarks/realworld.py) on a CI-sized subset.

Four small corpus models from four exporters (paddle2onnx with -1 dims, a PyTorch VAD with compute in
If branches and an sr scalar, a tf2onnx byte classifier, an onnxmltools model of ai.onnx.ml ops only)
through ``inspect``, ``optimize --verify``, ``verify``, static ``quantize`` and ``compress``, each run
through the real CLI in a subprocess on the model's realistic inputs. Every cell has one exact
expectation: ``ok`` (exit 0, output passes onnx's full check, runs in ORT; optimize equal to the
original; quantize within the matrix's error bound) or a clean refusal whose line matches a pattern.
Cells that fail today because a fix from issue 13 has not landed are ``xfail(strict=True)``: when the
fix lands the test flips to XPASS and fails, and the mark must be removed.

Downloads go through ``benchmarks.corpus.fetch`` (cached under ~/.cache/graphopt/corpus).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from benchmarks import realworld as rw

MODELS = ("ppocr_cls", "silero_vad_16k_op15", "magika_v1", "logreg_iris")
COMMANDS = ("inspect", "optimize", "verify", "quantize", "compress")

# what each cell must be once issue 13 is done: "ok", or ("refused", pattern the refusal line matches).
# logreg_iris compress is "ok": clustering finds no float weight tensor to share (the coefficients are
# LinearClassifier attributes) and writes the model back unchanged in value, which is right.
ONLY_ML = ("refused", r"(LinearClassifier|Normalizer|ZipMap|ai\.onnx\.ml)")
EXPECT: dict[tuple[str, str], str | tuple[str, str]] = {
    **{(m, c): "ok" for m in MODELS for c in COMMANDS},
    # nothing a graphopt quantizer or compressor can touch: say so, naming the ops
    ("logreg_iris", "quantize"): ONLY_ML,
}

# cells failing now for want of a fix another issue-13 task is making (strict: they flip when it lands)
PENDING: dict[tuple[str, str], str] = {}


def _params() -> list:
    out = []
    for m in MODELS:
        for c in COMMANDS:
            marks = [pytest.mark.xfail(strict=True, reason=PENDING[(m, c)])] if (m, c) in PENDING else []
            out.append(pytest.param(m, c, marks=marks, id=f"{m}-{c}"))
    return out


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory):
    """One prepared model (fetched, realistic inputs written, reference outputs) per name, shared."""
    made: dict[str, rw.Ctx] = {}

    def get(name: str) -> rw.Ctx:
        if name not in made:
            made[name] = rw.prepare(name, tmp_path_factory.mktemp("realworld"), timeout=150, n_calib=4, n_eval=2)
        return made[name]

    return get


@pytest.mark.parametrize("model,command", _params())
def test_matrix_cell(context, model: str, command: str) -> None:
    cell = rw.run_cell(context(model), command)
    want = EXPECT[(model, command)]
    info = f"{' '.join(cell.argv)}\n-> {cell.text}\nstderr: {cell.stderr_tail[-800:]}"
    if want == "ok":
        assert cell.status == "ok", info
    else:
        status, pattern = want
        assert cell.status == status, info
        assert re.search(pattern, cell.text), info
        assert cell.text.count("\n") == 0


# ------------------------------------------------------------------------------------------------
# the harness itself: each class of result is told apart (so an "ok" above means something)
# ------------------------------------------------------------------------------------------------
WORDS = {"Conv", "/stem/conv", "x", "LSTM"}


def test_classify_traceback_is_failure() -> None:
    c = rw.classify_error(1, "Traceback (most recent call last):\n  File ...\nKeyError: 'x'\n", WORDS, 1.0)
    assert c.status == "failure" and "KeyError" in c.text


def test_classify_clean_named_refusal() -> None:
    c = rw.classify_error(2, "graphopt: error: node '/stem/conv': op LSTM is not supported\n", WORDS, 1.0)
    assert c.status == "refused" and "/stem/conv" in c.text


def test_classify_unclear_refusal_is_failure() -> None:
    c = rw.classify_error(2, "graphopt: error: something went wrong\n", WORDS, 1.0)
    assert c.status == "failure" and "unclear" in c.text
    wrapped = "graphopt: error: pass 'prune-channels': pass failed: ValueError: node '/stem/conv' shapes\n"
    assert rw.classify_error(2, wrapped, WORDS, 1.0).text.startswith("FAIL: crash reported as an error")
    assert rw.cause("FAIL: dims of 'x' (1, 3) at /tmp/a/b.onnx: 12 MFLOPs") == rw.cause(
        "FAIL: dims of 'y' (1, 7) at /tmp/c.onnx: 9 MFLOPs")


def test_classify_runtime_noise_and_refused_inputs_are_failures() -> None:
    noisy = "\x1b[1;31m2026 [E:onnxruntime:, x.cc:1] boom\x1b[m\ngraphopt: error: node '/stem/conv' failed\n"
    assert rw.classify_error(2, noisy, WORDS, 1.0).status == "failure"
    bad = "graphopt: error: calibration sample 0, input 'x': dim 0 is 1 but the model fixes it to -1\n"
    assert "rejects valid inputs" in rw.classify_error(2, bad, WORDS, 1.0).text
    assert rw.classify_error(None, "", WORDS, 99.0).text.startswith("FAIL: timeout")


def _tiny(path: Path, scale: float) -> Path:
    """y = x * scale, 1x4 float."""
    g = helper.make_graph([helper.make_node("Mul", ["x", "s"], ["y"], name="mul")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor("s", TensorProto.FLOAT, [], [scale])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(m, path)
    return path


def test_check_output_catches_wrong_numbers_and_invalid_files(tmp_path: Path) -> None:
    src, same, off = _tiny(tmp_path / "a.onnx", 2.0), _tiny(tmp_path / "b.onnx", 2.0), _tiny(tmp_path / "c.onnx", 2.001)
    feeds = [{"x": np.arange(4, dtype=np.float32)[None]}]
    inputs = rw.Inputs(feeds, feeds, tmp_path, tmp_path, "test")
    ref = rw._run_ort(src, feeds)
    assert rw.check_output("lossless", src, same, inputs, ref).status == "ok"
    assert "wrong numbers" in rw.check_output("lossless", src, off, inputs, ref).text
    broken = tmp_path / "d.onnx"
    broken.write_bytes(b"not a model")
    assert "invalid output" in rw.check_output("lossless", src, broken, inputs, ref).text


def test_cli_runs_and_writes_tables(tmp_path: Path) -> None:
    """The script end to end on the smallest model and the cheapest command."""
    out = tmp_path / "rw"
    r = subprocess.run([sys.executable, "-m", "benchmarks.realworld", "--models", "logreg_iris", "--commands",
                        "inspect", "--out", str(out), "--fresh"], capture_output=True, text=True, timeout=300, check=False,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.with_suffix(".json").read_text())
    cell = res["models"]["logreg_iris"]["cells"]["inspect"]
    assert cell["status"] == "ok" and cell["argv"][:2] == ["graphopt", "inspect"]
    assert "| logreg_iris | onnxmltools |" in out.with_suffix(".md").read_text()
