"""Realistic corpus inputs and task metrics (benchmarks/corpus/data.py).

Each task must score high on its real inputs under fp32 ONNX Runtime and fall to chance when the
inputs are destroyed (pixels, samples or bytes shuffled): a metric that stays high on garbage, or
preprocessing that is wrong, fails here. Small models only (fetched into the corpus cache by pip).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # plain `pytest` (importlib mode) does not put the checkout on sys.path
    sys.path.insert(0, ROOT)

pytest.importorskip("PIL", reason="the corpus extra (pip install '.[corpus]') is not installed")
pytest.importorskip("sklearn", reason="the corpus extra (pip install '.[corpus]') is not installed")
pytest.importorskip("scipy", reason="the corpus extra (pip install '.[corpus]') is not installed")

import graphopt
from benchmarks.corpus import data as D
from benchmarks.corpus import fetch

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng): no speech for VAD")


def _runner(name: str):
    return D.ort_runner(fetch([name])[name])


def _destroyed(run, key: str, seed: int = 0):
    """A run function that shuffles the values of input ``key`` (all axes) before running."""
    rng = np.random.default_rng(seed)

    def go(feeds):
        f = dict(feeds)
        a = f[key]
        f[key] = rng.permutation(a.reshape(-1)).reshape(a.shape)
        return run(f)

    return go


# ------------------------------------------------------------------------------------------------
# metric helpers
# ------------------------------------------------------------------------------------------------
def test_edit_distance_and_char_accuracy() -> None:
    assert D.edit_distance("kitten", "sitting") == 3
    assert D.edit_distance("flaw", "lawn") == 2
    assert D.edit_distance("", "abc") == 3 and D.edit_distance("abc", "abc") == 0
    assert D.char_accuracy("abcd", "abcd") == 1.0
    assert D.char_accuracy("abxd", "abcd") == pytest.approx(0.75)
    assert D.char_accuracy("", "abcd") == 0.0


def test_box_f1_matches_one_to_one_at_iou_half() -> None:
    truth = [(0, 0, 10, 10, "a"), (20, 0, 30, 10, "a")]
    assert D.box_f1(truth, truth) == 1.0
    assert D.box_f1([(1, 1, 11, 11, "a")], truth) == pytest.approx(2 / 3)  # IoU 0.68: one match
    assert D.box_f1([(5, 5, 15, 15, "a")], truth) == 0.0                   # IoU 0.14: none
    assert D.box_f1([(0, 0, 10, 10, "b")], truth) == 0.0                   # wrong class
    assert D.box_f1([(0, 0, 10, 10, "b")], truth, classes=False) == pytest.approx(2 / 3)
    assert D.box_f1([(0, 0, 10, 10, "a")] * 2, truth[:1]) == pytest.approx(2 / 3)  # one-to-one
    assert D.box_f1([], []) == 1.0


# ------------------------------------------------------------------------------------------------
# scores: high on real inputs, chance on destroyed ones
# ------------------------------------------------------------------------------------------------
def test_line_orientation_high_then_chance() -> None:
    t, run = D.task("ppocr_cls"), _runner("ppocr_cls")
    good = t.evaluate(run, 24)
    assert good.metric == "accuracy" and good.score >= 0.9, good
    bad = t.evaluate(_destroyed(run, "x"), 24)
    assert bad.score <= 0.75, bad.score  # labels are balanced: chance is 0.5
    assert t.agreement(good, good) == 1.0 and t.agreement(good, bad) < 0.8


def test_recognizer_reads_rendered_lines() -> None:
    t, run = D.task("ppocrv3_rec"), _runner("ppocrv3_rec")
    feeds = t.eval_feeds(12)
    assert all(f["x"].shape[:3] == (1, 3, 48) and f["x"].shape[3] >= 320 for f in feeds)
    good = t.evaluate(run, 12)
    assert good.metric == "char_acc" and good.score >= 0.9, list(zip(good.predictions, t.truths(12)))
    assert good.extra["exact_line"] >= 0.5
    bad = t.evaluate(_destroyed(run, "x"), 12)
    assert bad.score < 0.3 and bad.extra["exact_line"] == 0.0, bad.predictions


def test_text_detector_finds_drawn_lines() -> None:
    t, run = D.task("ppocrv3_det"), _runner("ppocrv3_det")
    x = t.eval_feeds(2)[0]["x"]
    assert x.shape == (1, 3, 736, 960)  # rapidocr: short side to 736, sides multiples of 32
    good = t.evaluate(run, 2)
    assert good.score >= 0.8, good.extra
    bad = t.evaluate(_destroyed(run, "x"), 2)
    assert bad.score < 0.3, bad.extra
    assert t.agreement(good, good) == 1.0


def test_magika_top1_on_real_files_then_chance() -> None:
    t, run = D.task("magika_v3"), _runner("magika_v3")
    good = t.evaluate(run, 40)
    assert len(good.predictions) == 40 and good.score >= 0.85, good.extra
    assert len(set(t.truths(40))) >= 10  # many content types, not one
    bad = t.evaluate(_destroyed(run, "bytes"), 40)
    assert bad.score <= 0.4, bad.score


@needs_espeak
def test_vad_frame_accuracy_streamed_then_chance() -> None:
    t, run = D.task("silero_vad_16k_op15"), _runner("silero_vad_16k_op15")
    good = t.evaluate(run, 3)
    speech_share = float(np.mean(np.concatenate(t.truths(3))))
    assert 0.2 < speech_share < 0.8  # clips hold both speech and silence
    assert good.score >= 0.9 and good.extra["speech_recall"] >= 0.9, good.extra
    # the state must be carried: resetting it every window changes the decisions
    def stateless(feeds):
        return run({**feeds, "state": np.zeros_like(feeds["state"])})
    assert t.evaluate(stateless, 3).score < good.score
    # shuffled samples keep the energy but destroy speech: the score falls to about the non-speech share
    bad = t.evaluate(_destroyed(run, "input"), 3)
    assert bad.score < max(speech_share, 1 - speech_share) + 0.1 and bad.score < good.score - 0.2, bad.extra


# ------------------------------------------------------------------------------------------------
# splits and files
# ------------------------------------------------------------------------------------------------
def _same_feeds(a, b) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["ppocrv3_rec", "ppocr_cls", "magika_v3", "nudenet_320n", "logreg_iris"])
def test_splits_are_deterministic_and_disjoint(name: str) -> None:
    D.task.cache_clear()
    t1 = D.task(name)
    ev, cal = t1.eval_feeds(6), t1.calibration(6)
    D.task.cache_clear()
    t2 = D.task(name)  # a fresh task regenerates the same samples
    assert _same_feeds(ev, t2.eval_feeds(6)) and _same_feeds(cal, t2.calibration(6))
    key = next(iter(ev[0]))
    ev_bytes = {f[key].tobytes() for f in ev}
    assert len(ev_bytes) == len(ev)  # samples differ from each other
    assert not ev_bytes & {f[key].tobytes() for f in cal}  # and no calibration sample is an eval one


def test_finite_sets_split_without_overlap() -> None:
    t = D.task("magika_v3")
    ev = {t.files[i][0] for i in D._split_indices(t.name, len(t.files), "eval")}
    cal = {t.files[i][0] for i in D._split_indices(t.name, len(t.files), "calib")}
    assert ev and cal and not ev & cal and len(ev | cal) == len(t.files)


def test_write_inputs_round_trips_through_load_calibration(tmp_path: Path) -> None:
    # same shapes: one .npz, first axis = samples
    name = "ppocr_cls"
    feeds = D.task(name).calibration(5)
    D.write_inputs(feeds, tmp_path / "cls")
    assert (tmp_path / "cls.npz").is_file()
    model = graphopt.load(fetch([name])[name], check=False)
    back = graphopt.load_calibration(tmp_path / "cls.npz", model)
    assert _same_feeds(feeds, back)
    # varying widths: a directory of one .npz per sample
    name = "ppocrv3_rec"
    feeds = D.task(name).calibration(6)
    assert len({f["x"].shape for f in feeds}) > 1
    D.write_inputs(feeds, tmp_path / "rec")
    assert len(list((tmp_path / "rec").glob("*.npz"))) == 6
    back = graphopt.load_calibration(tmp_path / "rec", graphopt.load(fetch([name])[name], check=False))
    assert _same_feeds(feeds, back)


@needs_espeak
def test_vad_calibration_feeds_carry_the_stream_state(tmp_path: Path) -> None:
    name = "silero_vad_16k_op15"
    feeds = D.task(name).calibration(8)
    assert {tuple(f) for f in feeds} == {("input", "state", "sr")}
    assert all(f["input"].shape == (1, 576) and f["sr"].shape == () and int(f["sr"]) == 16000 for f in feeds)
    assert sum(bool(np.any(f["state"])) for f in feeds) >= 6  # not the zero state of a fresh stream
    D.write_inputs(feeds, tmp_path / "vad.npz")
    back = graphopt.load_calibration(tmp_path / "vad.npz", graphopt.load(fetch([name])[name], check=False))
    assert _same_feeds(feeds, back)


def test_unknown_task_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown corpus entry"):
        D.task("no_such_model")
