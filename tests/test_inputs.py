"""Dynamic dims (-1, 0, missing, empty, symbolic) and the user's own inputs (--inputs) in every command.

Exporters write "any size" in several ways: PaddlePaddle ``-1`` dim values, a dim with neither
value nor name, an empty or ``'?'`` name, a symbol like ``batch``, sometimes ``0``. graphopt must
treat them alike: concrete sizes come from ``--input-shape``, from ``--inputs`` data, or from a
default that is named in a warning; no cost comes out negative; random inputs respect what the
model needs where that is cheap to know, and when ONNX Runtime still fails on them the error says
to pass ``--inputs``.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model, vi
from onnx import TensorProto, helper

import graphopt
import graphopt.runtime as rt
from graphopt.analysis import infer_shapes, model_stats, node_cost
from graphopt.cli import main
from graphopt.errors import InputSpecError
from graphopt.runtime import (
    defaulted_dims,
    dynamic_axes,
    input_feeds,
    load_calibration,
    make_inputs,
    resolve_input_shapes,
    run_ort,
)

#: how exporters write "any size": batch dim, height, width
KINDS = {
    "minus1": (-1, -1, -1),     # PaddlePaddle
    "missing": (None, None, None),  # no dim_value, no dim_param (spox)
    "empty": ("", "?", "?"),    # empty / anonymous names ('?' twice is not one size)
    "symbol": ("n", "h", "w"),
    "zero": (0, 0, 0),          # the input feeds a Conv: it must hold data, so 0 cannot be a real size
}


@pytest.fixture(autouse=True)
def _fast_latency(monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize/compress time models for their tables; one unsettled round is enough here."""
    real = rt.interleaved_timings
    monkeypatch.setattr(rt, "interleaved_timings", lambda fns, rounds=30, settle_s=0.15: real(fns, 1, 0.0))


def _cnn(kind: str, *, value_info: bool = False) -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> MatMul -> Add on x[b, 3, h, w]."""
    b, h, w = KINDS[kind]
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
             helper.make_node("Flatten", ["g"], ["f"], name="flat", axis=1),
             helper.make_node("MatMul", ["f", "w2"], ["m"], name="fc"),
             helper.make_node("Add", ["m", "b2"], ["y"], name="add")]
    inits = [("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)),
             ("bias", rng.standard_normal(4).astype(np.float32)),
             ("w2", rng.standard_normal((4, 5)).astype(np.float32)),
             ("b2", rng.standard_normal(5).astype(np.float32))]
    mp = make_model(nodes, [vi("x", [b, 3, h, w])], [vi("y", [b, 5])], inits, opset=13)
    if value_info:  # PaddlePaddle also writes -1 into the shapes of intermediate values
        mp.graph.value_info.extend([vi("c", [-1, 4, -1, -1]), vi("r", [-1, 4, -1, -1]), vi("f", [-1, 4])])
    return mp


def _save(mp: onnx.ModelProto, path: Path) -> Path:
    onnx.save(mp, path)
    return path


def _static_flops(mp: onnx.ModelProto, shape: list[int]) -> int:
    """FLOPs of the same model declared with a fixed input shape (the reference for hints)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(mp)
    del fixed.graph.value_info[:]
    for d, x in zip(fixed.graph.input[0].type.tensor_type.shape.dim, shape, strict=True):
        d.dim_value = x
    fixed.graph.output[0].type.tensor_type.ClearField("shape")
    return model_stats(infer_shapes(graphopt.from_proto(fixed, check=False))).flops


def _dims_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "graphopt.dims" and r.levelno == logging.WARNING]


# ------------------------------------------------------------------------------------------------
# the library: what is dynamic, how it resolves, what data it accepts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_of_dynamic_dim_resolves_like_a_symbol(kind: str) -> None:
    m = graphopt.from_proto(_cnn(kind))
    assert dynamic_axes(m) == {"x": [0, 2, 3]}
    assert resolve_input_shapes(m) == {"x": (1, 3, 1, 1)}
    assert [(d.input, d.axis, d.value) for d in defaulted_dims(m)] == [("x", 0, 1), ("x", 2, 1), ("x", 3, 1)]
    assert resolve_input_shapes(m, {"x": [2, 3, 6, 7]}) == {"x": (2, 3, 6, 7)}
    assert defaulted_dims(m, {"x": [2, 3, 6, 7]}) == []
    with pytest.raises(InputSpecError, match="fixed dim 3"):
        resolve_input_shapes(m, {"x": [2, 4, 6, 7]})
    # data of any size in the dynamic dims is accepted, and ONNX Runtime runs it (a declared 0 too)
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 7)).astype(np.float32)
    feed = load_calibration([{"x": x}], m, what="--inputs")[0]
    y = run_ort(m, feed)["y"]
    assert y.shape == (2, 5) and np.all(np.isfinite(y))
    assert make_inputs(m, {"x": [2, 3, 6, 7]})["x"].shape == (2, 3, 6, 7)


def test_a_zero_dim_read_only_by_concat_is_a_real_zero() -> None:
    """A recurrent cache that starts empty: past[1, 0, 4] ++ new[1, 1, 4]."""
    m = graphopt.from_proto(make_model([helper.make_node("Concat", ["past", "new"], ["y"], name="cat", axis=1)],
                                       [vi("past", [1, 0, 4]), vi("new", [1, 1, 4])], [vi("y", [1, 1, 4])]))
    assert dynamic_axes(m) == {"past": [], "new": []}
    assert resolve_input_shapes(m) == {"past": (1, 0, 4), "new": (1, 1, 4)} and defaulted_dims(m) == []
    feeds = make_inputs(m)
    assert run_ort(m, feeds)["y"].shape == (1, 1, 4)


def test_negative_dims_never_give_negative_costs() -> None:
    """-1 in the declared shapes of intermediate values (PaddlePaddle) made FLOPs negative."""
    m = graphopt.from_proto(_cnn("minus1", value_info=True))
    st = model_stats(m)
    assert st.flops >= 0 and st.params > 0
    for n in m.graph:
        c = node_cost(n)
        assert min(c.flops, c.params, c.bytes_in, c.bytes_out) >= 0, n
    from graphopt.analysis import peak_memory

    assert peak_memory(m.graph).peak_bytes >= 0
    # with a hint the stale -1 shapes are inferred again: FLOPs as for a fixed-shape model
    mp = _cnn("minus1", value_info=True)
    fixed = graphopt.from_proto(mp)
    infer_shapes(fixed, resolve_input_shapes(fixed, {"x": [2, 3, 8, 8]}))
    st = model_stats(fixed)
    assert st.flops == _static_flops(mp, [2, 3, 8, 8]) > 0 and not st.unknown


def test_scalar_and_state_inputs_from_npz(tmp_path: Path) -> None:
    m = graphopt.from_proto(_audio())
    np.savez(tmp_path / "d.npz", x=np.ones((3, 1, 8), np.float32), state=np.zeros((3, 2, 1, 4), np.float32),
             sr=np.array(16000))  # a 0-d array serves every sample
    s = load_calibration(tmp_path / "d.npz", m, what="--inputs")
    assert len(s) == 3 and s[0]["sr"].shape == () and s[0]["sr"].dtype == np.int64
    assert s[0]["x"].shape == (1, 8) and s[0]["state"].shape == (2, 1, 4)
    assert len(load_calibration(tmp_path / "d", m)) == 3  # the name given to numpy.savez, without its .npz
    np.savez(tmp_path / "e.npz", x=np.ones((3, 8), np.float32), state=np.zeros((3, 2, 1, 4), np.float32),
             sr=np.full(3, 16000, np.int32))  # per-sample scalars; int32 data for an int64 input
    s = load_calibration(tmp_path / "e.npz", m, what="--inputs")
    assert s[2]["x"].shape == (1, 8) and s[2]["sr"].dtype == np.int64 and int(s[2]["sr"]) == 16000


# ------------------------------------------------------------------------------------------------
# every command on every kind of dynamic dim
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_commands_on_dynamic_dims(kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                  capsys: pytest.CaptureFixture) -> None:
    mp = _cnn(kind, value_info=kind == "minus1")
    src = _save(mp, tmp_path / "m.onnx")
    caplog.set_level(logging.WARNING)

    assert main(["inspect", str(src), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["flops"] == _static_flops(mp, [1, 3, 1, 1]) > 0 and d["params"] > 0
    (msg,) = _dims_warnings(caplog)  # one line for the one input, naming its dims and the size used
    assert "'x'" in msg and "0 (" in msg and "2 (" in msg and "3 (" in msg and "set to 1, 1, 1" in msg
    assert "--input-shape x:N,3,N,N" in msg

    caplog.clear()
    assert main(["inspect", str(src), "--json", "--input-shape", "x:2,3,6,7"]) == 0
    assert json.loads(capsys.readouterr().out)["flops"] == _static_flops(mp, [2, 3, 6, 7])
    assert _dims_warnings(caplog) == []

    caplog.clear()
    assert main(["verify", str(src), str(src)]) == 0
    assert "agree on 3 random" in capsys.readouterr().out and len(_dims_warnings(caplog)) == 1

    out = tmp_path / "o.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--verify", "2"]) == 0
    onnx.checker.check_model(str(out), full_check=True)
    assert main(["verify", str(src), str(out), "--input-shape", "x:2,3,5,9"]) == 0
    # a hint for the dynamic dims is taken (and fixes the optimized model to it)
    fixed = tmp_path / "fixed.onnx"
    assert main(["optimize", str(src), "-o", str(fixed), "--verify", "1", "--input-shape", "x:2,3,6,7"]) == 0
    assert "verified on 1 random input(s)" in capsys.readouterr().out

    x = np.random.default_rng(2).standard_normal((4, 2, 3, 6, 5)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    caplog.clear()
    assert main(["verify", str(src), str(out), "--inputs", str(tmp_path / "in.npz")]) == 0
    assert "agree on 4 --inputs sample(s)" in capsys.readouterr().out and _dims_warnings(caplog) == []

    assert main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--inputs", str(tmp_path / "in.npz")]) == 0
    assert re.search(r"samples +\d+ \(inputs\)", capsys.readouterr().out)
    assert main(["quantize", str(src), "-o", str(tmp_path / "qd.onnx"), "--dynamic"]) == 0
    assert main(["compress", str(src), "-o", str(tmp_path / "c.onnx"), "--cluster", "4"]) == 0
    for f in ("q.onnx", "qd.onnx", "c.onnx"):
        onnx.checker.check_model(str(tmp_path / f), full_check=True)
        assert run_ort(tmp_path / f, {"x": x[0]})["y"].shape == (2, 5)


@pytest.mark.parametrize("kind", ["minus1", "zero"])
def test_compile_and_bench_on_dynamic_dims(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("tvm")
    src = _save(_cnn(kind), tmp_path / "m.onnx")
    so = tmp_path / "m.so"
    assert main(["compile", str(src), "-o", str(so), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    # it names the dims to give, with a number for each, and never suggests -1 or 0
    assert "--input-shape x:N,3,N,N" in err and "x:-1" not in err and "x:0" not in err, err
    assert main(["compile", str(src), "-o", str(so), "-q", "--input-shape", "x:1,3,8,8"]) == 0
    assert main(["bench", str(src), "--compiled", str(so), "--rounds", "1"]) == 0
    assert "ok" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# --inputs through every command, a scalar input and a recurrent state included
# ------------------------------------------------------------------------------------------------
def _audio() -> onnx.ModelProto:
    """A streaming-audio-like signature: x[batch, 8], state[2, batch, 4], sr: int64 scalar.
    y = (x @ W) * (sr / 16000) + state[0]; new_state = state + y."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Cast", ["sr"], ["srf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["srf", "inv"], ["scale"], name="norm"),
             helper.make_node("Mul", ["h", "scale"], ["hs"], name="mul"),
             helper.make_node("Gather", ["state", "zero"], ["s0"], name="first", axis=0),
             helper.make_node("Add", ["hs", "s0"], ["y"], name="add"),
             helper.make_node("Add", ["state", "y"], ["new_state"], name="upd")]
    inits = [("w", rng.standard_normal((8, 4)).astype(np.float32)), ("inv", np.array(1 / 16000, np.float32)),
             ("zero", np.array(0, np.int64))]
    return make_model(nodes, [vi("x", ["batch", 8]), vi("state", [2, "batch", 4]), vi("sr", [], TensorProto.INT64)],
                      [vi("y", ["batch", 4]), vi("new_state", [2, "batch", 4])], inits, opset=13)


def _audio_data(path: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(4)
    np.savez(path, x=rng.standard_normal((n, 1, 8)).astype(np.float32),
             state=rng.standard_normal((n, 2, 1, 4)).astype(np.float32), sr=np.full(n, 16000, np.int64))
    return path


def test_inputs_through_every_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _save(_audio(), tmp_path / "a.onnx")
    data = str(_audio_data(tmp_path / "in.npz"))
    assert main(["verify", str(src), str(src), "--inputs", data]) == 0
    assert "agree on 3 --inputs sample(s)" in capsys.readouterr().out
    assert main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--verify", "2", "--inputs", data]) == 0
    assert "verified on 2 --inputs sample(s)" in capsys.readouterr().out
    assert main(["optimize", str(src), "-o", str(tmp_path / "o2.onnx"), "--inputs", data]) == 0
    assert "verified on 3 --inputs sample(s)" in capsys.readouterr().out
    # static: --inputs is the calibration data; dynamic: the checks run on it
    assert main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--inputs", data]) == 0
    assert re.search(r"samples +\d+ \(inputs\)", capsys.readouterr().out)
    assert main(["quantize", str(src), "-o", str(tmp_path / "qd.onnx"), "--dynamic", "--inputs", data]) == 0
    assert re.search(r"samples +\d+ \(inputs\)", capsys.readouterr().out)
    assert main(["compress", str(src), "-o", str(tmp_path / "c.onnx"), "--cluster", "4", "--inputs", data]) == 0
    for f in ("o.onnx", "o2.onnx", "q.onnx", "qd.onnx", "c.onnx"):
        onnx.checker.check_model(str(tmp_path / f), full_check=True)
    feed = load_calibration(data, graphopt.load(src))[0]
    assert np.allclose(run_ort(tmp_path / "o.onnx", feed)["new_state"], run_ort(src, feed)["new_state"], atol=1e-6)


def test_inputs_directory_of_samples_of_different_sizes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One .npz per sample (text lines of different widths, audio windows of different lengths)."""
    src = _save(_cnn("minus1", value_info=True), tmp_path / "m.onnx")
    d = tmp_path / "lines"
    d.mkdir()
    rng = np.random.default_rng(7)
    for k, width in enumerate((40, 97, 160)):  # without the batch axis: it is added
        np.savez(d / f"{k}.npz", x=rng.standard_normal((3, 48, width)).astype(np.float32))
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--inputs", str(d)]) == 0
    assert "verified on 3 --inputs sample(s)" in capsys.readouterr().out
    a = _save(_audio(), tmp_path / "a.onnx")
    d = tmp_path / "windows"
    d.mkdir()
    for k, n in enumerate((5, 2)):  # batch 5 and batch 2, the state's batch axis with them; sr a 0-d array
        np.savez(d / f"{k}.npz", x=rng.standard_normal((n, 8)).astype(np.float32),
                 state=np.zeros((2, n, 4), np.float32), sr=np.array(16000, np.int64))
    assert main(["verify", str(a), str(a), "--inputs", str(d)]) == 0
    assert "agree on 2 --inputs sample(s)" in capsys.readouterr().out


def test_inputs_give_compile_and_bench_their_shapes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("tvm")
    src = _save(_audio(), tmp_path / "a.onnx")
    data = str(_audio_data(tmp_path / "in.npz"))
    so = tmp_path / "a.so"
    assert main(["compile", str(src), "-o", str(so), "-q", "--inputs", data]) == 0  # no --input-shape needed
    meta = json.loads((tmp_path / "a.so.json").read_text())
    assert {i["name"]: i["shape"] for i in meta["inputs"]} == {"x": [1, 8], "state": [2, 1, 4], "sr": []}
    capsys.readouterr()
    assert main(["bench", str(src), "--compiled", str(so), "--inputs", data, "--rounds", "1"]) == 0
    assert "(ok)" in capsys.readouterr().out
    assert main(["bench", str(src), "--inputs", data, "--rounds", "1"]) == 0


BAD = {
    "name": lambda n: {"x": np.ones((n, 8), np.float32), "stat": np.zeros((n, 2, 1, 4), np.float32),
                       "sr": np.full(n, 16000)},
    "dtype": lambda n: {"x": np.ones((n, 8), np.float32), "state": np.zeros((n, 2, 1, 4), np.float32),
                        "sr": np.full(n, 16000.0)},
    "rank": lambda n: {"x": np.ones((n, 1, 1, 8), np.float32), "state": np.zeros((n, 2, 1, 4), np.float32),
                       "sr": np.full(n, 16000)},
}
COMMANDS = {
    "verify": ["verify", "{m}", "{m}"],
    "optimize": ["optimize", "{m}", "-o", "{o}", "--verify", "1"],
    "quantize": ["quantize", "{m}", "-o", "{o}"],
    "quantize-dynamic": ["quantize", "{m}", "-o", "{o}", "--dynamic"],
    "compress": ["compress", "{m}", "-o", "{o}", "--cluster", "4"],
    "compile": ["compile", "{m}", "-o", "{so}", "-q"],
    "bench": ["bench", "{m}", "--rounds", "1"],
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_inputs_exit_2_one_line_nothing_written(bad: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _save(_audio(), tmp_path / "a.onnx")
    data = tmp_path / "bad.npz"
    np.savez(data, **BAD[bad](2))
    want = {"name": "names do not match", "dtype": "dtype float64", "rank": "rank 3"}[bad]
    for cmd, argv in COMMANDS.items():
        out = tmp_path / "out"
        out.mkdir()
        args = [a.format(m=src, o=out / "o.onnx", so=out / "o.so") for a in argv] + ["--inputs", str(data)]
        assert main(args) == 2, cmd
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("graphopt: error: --inputs sample 0") and want in err[0], (cmd, err)
        assert list(out.iterdir()) == [], cmd
        out.rmdir()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], check=False, cwd=tempfile.gettempdir(),
                          capture_output=True, text=True, timeout=300)


def test_bad_inputs_file_in_a_real_process(tmp_path: Path) -> None:
    src = _save(_audio(), tmp_path / "a.onnx")
    np.savez(tmp_path / "bad.npz", **BAD["dtype"](2))
    out = tmp_path / "o.onnx"
    r = _run("optimize", str(src), "-o", str(out), "--verify", "1", "--inputs", str(tmp_path / "bad.npz"))
    assert r.returncode == 2 and r.stdout == "" and not out.exists()
    assert r.stderr.strip().count("\n") == 0 and "input 'sr': dtype float64" in r.stderr, r.stderr
    r = _run("verify", str(src), str(src), "--inputs", str(tmp_path / "missing.npz"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr


# ------------------------------------------------------------------------------------------------
# random inputs that respect the model, and a clear error when they cannot
# ------------------------------------------------------------------------------------------------
def _sample_rate_switch() -> onnx.ModelProto:
    """If sr == 16000: y = x as [batch, 1, 4], else a Reshape that cannot run (the 8 kHz branch needs
    other sizes)."""
    then_g = helper.make_graph([helper.make_node("Reshape", ["x", "ok_shape"], ["t"], name="keep")], "then", [],
                               [vi("t", ["a", "b", "c"])])
    else_g = helper.make_graph([helper.make_node("Reshape", ["x", "bad_shape"], ["e"], name="bad")], "else", [],
                               [vi("e", ["a", "b", "c"])])
    nodes = [helper.make_node("Equal", ["sr", "k16"], ["is16"], name="eq"),
             helper.make_node("If", ["is16"], ["y"], name="switch", then_branch=then_g, else_branch=else_g)]
    inits = [("k16", np.array(16000, np.int64)), ("bad_shape", np.array([7, 7, 7], np.int64)),
             ("ok_shape", np.array([0, 1, 4], np.int64))]
    return make_model(nodes, [vi("x", ["batch", 4]), vi("sr", [], TensorProto.INT64)], [vi("y", ["a", "b", "c"])],
                      inits, opset=13)


def _needs_length() -> onnx.ModelProto:
    """A 64-tap Conv without padding: the input must be at least 64 samples long."""
    w = np.random.default_rng(5).standard_normal((2, 1, 64)).astype(np.float32)
    return make_model([helper.make_node("Conv", ["x", "w"], ["y"], name="fir")], [vi("x", [1, 1, "samples"])],
                      [vi("y", [1, 2, None])], [("w", w)], opset=13)


def _needs_data() -> onnx.ModelProto:
    """Indices into a 1-row table: random indices in [0, 4) are out of range."""
    table = np.arange(3, dtype=np.float32).reshape(1, 3)
    return make_model([helper.make_node("Gather", ["table", "idx"], ["y"], name="lookup", axis=0)],
                      [vi("idx", [16], TensorProto.INT64)], [vi("y", [16, 3])], [("table", table)], opset=13)


def test_random_inputs_take_the_compared_constant(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    m = graphopt.from_proto(_sample_rate_switch())
    assert int(make_inputs(m)["sr"]) == 16000
    src = _save(_sample_rate_switch(), tmp_path / "s.onnx")
    assert main(["verify", str(src), str(src)]) == 0
    assert main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--verify", "2"]) == 0


def test_random_inputs_grow_a_dim_the_model_cannot_run_at_1(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                           capsys: pytest.CaptureFixture) -> None:
    m = graphopt.from_proto(_needs_length())
    feeds = input_feeds(m, count=2)
    assert [f["x"].shape for f in feeds] == [(1, 1, 64)] * 2
    src = _save(_needs_length(), tmp_path / "f.onnx")
    caplog.set_level(logging.WARNING)
    caplog.clear()
    assert main(["verify", str(src), str(src)]) == 0
    (msg,) = _dims_warnings(caplog)
    assert "'x'" in msg and "2 ('samples') set to 64" in msg
    caplog.clear()
    capsys.readouterr()
    assert main(["inspect", str(src), "--json"]) == 0  # at the default 1 the Conv has no valid output
    assert json.loads(capsys.readouterr().out)["flops"] >= 0


def test_ort_failing_on_random_inputs_says_pass_inputs(tmp_path: Path) -> None:
    src = _save(_needs_data(), tmp_path / "g.onnx")
    out = tmp_path / "o.onnx"
    for args in (["verify", str(src), str(src)], ["optimize", str(src), "-o", str(out), "--verify", "1"],
                 ["quantize", str(src), "-o", str(out), "--dynamic"]):
        r = _run(*args)
        assert r.returncode == 2 and not out.exists(), (args, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and "ONNX Runtime fails on random inputs" in r.stderr
        assert "pass --inputs" in r.stderr, r.stderr
    np.savez(tmp_path / "idx.npz", idx=np.zeros((2, 16), np.int64))
    r = _run("verify", str(src), str(src), "--inputs", str(tmp_path / "idx.npz"))
    assert r.returncode == 0 and "agree on 2 --inputs sample(s)" in r.stdout, r.stderr
    r = _run("optimize", str(src), "-o", str(out), "--verify", "1", "--inputs", str(tmp_path / "idx.npz"))
    assert r.returncode == 0 and out.exists(), r.stderr


# ------------------------------------------------------------------------------------------------
# a real model: silero VAD (sr scalar, recurrent state, 'batch'/'sequence' dims)
# ------------------------------------------------------------------------------------------------
def test_silero_vad_with_inputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from benchmarks.corpus import fetch

    src = fetch(["silero_vad_16k_op15"])["silero_vad_16k_op15"]
    t = np.arange(512) / 16000
    rng = np.random.default_rng(6)
    audio = [0.3 * np.sin(2 * np.pi * f * t) + 0.01 * rng.standard_normal(512) for f in (220, 440, 880)]
    data = tmp_path / "vad.npz"  # 3 windows of 512 samples, zero state, sr = 16000 (int64 scalar)
    np.savez(data, input=np.stack(audio).astype(np.float32)[:, None, :],
             state=np.zeros((3, 2, 1, 128), np.float32), sr=np.array(16000, np.int64))
    assert main(["verify", str(src), str(src), "--inputs", str(data)]) == 0
    assert "agree on 3 --inputs sample(s)" in capsys.readouterr().out
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--verify", "3", "--inputs", str(data)]) == 0
    assert "verified on 3 --inputs sample(s)" in capsys.readouterr().out
    feeds = load_calibration(data, graphopt.load(src))
    for f in feeds:
        a, b = run_ort(src, f), run_ort(out, f)
        assert all(np.allclose(a[k], b[k], atol=1e-4) for k in a)
    # without data graphopt finds a window length the model runs at (1 sample is too short for its STFT)
    assert main(["verify", str(src), str(out), "--samples", "1"]) == 0
