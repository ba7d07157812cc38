"""Every kind of bad input gives a GraphoptError subclass naming the node or field; the CLI
prints one line, exits 2, writes no output and leaves the input untouched."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model, vi
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import ExternalDataError, InvalidModelError, ModelLoadError


def _small() -> onnx.ModelProto:
    return make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", [2])], [vi("y", [2])])


def _save_raw(path: Path, mp: onnx.ModelProto) -> Path:
    path.write_bytes(mp.SerializeToString())
    return path


def _ext_model(tmp: Path, location: str, n: int = 16) -> Path:
    w = numpy_helper.from_array(np.arange(n, dtype=np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(4 * n))):
        e = w.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"], name="add")], "g",
                          [vi("x", [n])], [vi("y", [n])], [w])
    mp = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return _save_raw(tmp / "m.onnx", mp)


def bad_models(tmp: Path) -> dict[str, tuple[Path, type, str]]:
    """name -> (path, expected error class, text the message must contain)."""
    cases: dict[str, tuple[Path, type, str]] = {}
    p = tmp / "text.onnx"
    p.write_text("this is not a model\n")
    cases["non-onnx"] = (p, ModelLoadError, "not")
    good = _small().SerializeToString()
    p = tmp / "trunc.onnx"
    p.write_bytes(good[: len(good) // 2])
    cases["truncated"] = (p, ModelLoadError, "trunc.onnx")
    p = tmp / "empty.onnx"
    p.write_bytes(b"")
    cases["empty"] = (p, ModelLoadError, "empty")
    d = tmp / "adir.onnx"
    d.mkdir()
    cases["directory"] = (d, ModelLoadError, "directory")
    cases["missing"] = (tmp / "nope.onnx", ModelLoadError, "no such file")
    # fails the checker: a Conv attribute of the wrong type
    mp = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", [2])], [vi("y", [2])])
    mp.graph.node[0].attribute.append(helper.make_attribute("bogus", 1))
    mp.opset_import[0].version = 99999
    cases["checker"] = (_save_raw(tmp / "checker.onnx", mp), InvalidModelError, "checker")
    mp = make_model([helper.make_node("Foo", ["x"], ["y"], name="foo_node", domain="com.unknown")],
                    [vi("x", [2])], [vi("y", [2])])
    cases["unknown-domain"] = (_save_raw(tmp / "dom.onnx", mp), InvalidModelError, "foo_node")
    mp = make_model([helper.make_node("Relu", ["b"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["b"], name="n2"),
                     helper.make_node("Relu", ["x"], ["y"], name="n3")], [vi("x", [2])], [vi("y", [2])])
    cases["cycle"] = (_save_raw(tmp / "cycle.onnx", mp), InvalidModelError, "cycle")
    mp = make_model([helper.make_node("Relu", ["x"], ["y"], name="n1"), helper.make_node("Neg", ["x"], ["y"], name="n2")],
                    [vi("x", [2])], [vi("y", [2])])
    cases["duplicate-name"] = (_save_raw(tmp / "dup.onnx", mp), InvalidModelError, "'y'")
    mp = make_model([helper.make_node("Add", ["x", "ghost"], ["y"], name="adder")], [vi("x", [2])], [vi("y", [2])])
    cases["undefined-value"] = (_save_raw(tmp / "undef.onnx", mp), InvalidModelError, "adder")
    for name, loc in (("ext-absolute", "/etc/passwd"), ("ext-dotdot", "../secret.bin")):
        sub = tmp / name
        sub.mkdir()
        (tmp / "secret.bin").write_bytes(b"\0" * 64)
        cases[name] = (_ext_model(sub, loc), ExternalDataError, "'w'")
    sub = tmp / "ext-symlink"
    sub.mkdir()
    (tmp / "outside.bin").write_bytes(b"\0" * 64)
    os.symlink(tmp / "outside.bin", sub / "w.bin")
    cases["ext-symlink"] = (_ext_model(sub, "w.bin"), ExternalDataError, "outside")
    sub = tmp / "ext-missing"
    sub.mkdir()
    cases["ext-missing"] = (_ext_model(sub, "w.bin"), ExternalDataError, "missing")
    sub = tmp / "ext-short"
    sub.mkdir()
    (sub / "w.bin").write_bytes(b"\0" * 10)
    cases["ext-truncated"] = (_ext_model(sub, "w.bin"), ExternalDataError, "truncated")
    # a tensor that claims 4 elements but holds no data
    t = TensorProto()
    t.name, t.data_type = "w", TensorProto.FLOAT
    t.dims.extend([4])
    mp = make_model([helper.make_node("Add", ["x", "w"], ["y"], name="add")], [vi("x", [4])], [vi("y", [4])])
    mp.graph.initializer.append(t)
    cases["zero-size-tensor"] = (_save_raw(tmp / "zero.onnx", mp), InvalidModelError, "'w'")
    return cases


CASES = ["non-onnx", "truncated", "empty", "directory", "missing", "checker", "unknown-domain", "cycle",
         "duplicate-name", "undefined-value", "ext-absolute", "ext-dotdot", "ext-symlink", "ext-missing",
         "ext-truncated", "zero-size-tensor"]


@pytest.mark.parametrize("case", CASES)
def test_load_raises_named_error(tmp_path: Path, case: str) -> None:
    path, err, text = bad_models(tmp_path)[case]
    with pytest.raises(err) as ei:
        graphopt.load(path)
    assert isinstance(ei.value, graphopt.GraphoptError)
    assert text.lower() in str(ei.value).lower(), str(ei.value)


def _digest(p: Path) -> str | None:
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


@pytest.mark.parametrize("case", CASES)
def test_cli_one_line_exit_2_no_output(tmp_path: Path, case: str) -> None:
    path, _, _ = bad_models(tmp_path)[case]
    before = _digest(path)
    out = tmp_path / "out" / "o.onnx"
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", str(path), "-o", str(out)],
                       cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("graphopt: error:"), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists()
    assert _digest(path) == before


def test_cycle_error_names_nodes(tmp_path: Path) -> None:
    path, _, _ = bad_models(tmp_path)["cycle"]
    with pytest.raises(InvalidModelError) as ei:
        graphopt.load(path)
    assert "'n1'" in str(ei.value) and "'n2'" in str(ei.value)


def test_real_zero_element_tensor_round_trips(tmp_path: Path) -> None:
    """A tensor whose dims contain 0 is legal and must survive."""
    mp = make_model([helper.make_node("Concat", ["x", "e"], ["y"], axis=0, name="cat")],
                    [vi("x", [2])], [vi("y", [2])], inits=[("e", np.zeros([0], np.float32))])
    p = _save_raw(tmp_path / "z.onnx", mp)
    m = graphopt.load(p)
    assert m.graph.initializers["e"].const.shape == (0,)
    graphopt.save(m, tmp_path / "z2.onnx")
    x = np.array([1.0, 2.0], np.float32)
    assert np.array_equal(graphopt.run_ort(tmp_path / "z2.onnx", {"x": x})["y"], x)


def test_unsorted_graph_is_sorted_not_rejected(tmp_path: Path) -> None:
    mp = make_model([helper.make_node("Neg", ["a"], ["y"], name="second"), helper.make_node("Relu", ["x"], ["a"], name="first")],
                    [vi("x", [2])], [vi("y", [2])])
    m = graphopt.load(_save_raw(tmp_path / "u.onnx", mp))
    assert [n.name for n in m.graph] == ["first", "second"]


def test_cli_refuses_to_overwrite_input(tmp_path: Path) -> None:
    p = _save_raw(tmp_path / "m.onnx", _small())
    before = _digest(p)
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "optimize", str(p), "-o", str(p)],
                       cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "input" in r.stderr and _digest(p) == before


def test_cli_bad_options_exit_2(tmp_path: Path) -> None:
    p = _save_raw(tmp_path / "m.onnx", _small())
    for args in (["optimize", str(p), "-o", str(tmp_path / "o.onnx"), "--passes", "no-such-pass"],
                 ["optimize", str(p), "-o", str(tmp_path / "o.onnx"), "--input-shape", "x:a,b"],
                 ["optimize", str(p), "-o", str(tmp_path / "o.onnx"), "--input-shape", "nope:1"],
                 ["optimize", str(p)],
                 ["frobnicate"]):
        r = subprocess.run([sys.executable, "-m", "graphopt.cli", *args], cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (args, r.stderr)
        assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
        assert not (tmp_path / "o.onnx").exists()


# ---------------------------------------------------------------------------------------------
# issue 13: classes seen when fuzzing the CLI with mutated models (see tests/test_fuzz.py)
# ---------------------------------------------------------------------------------------------
def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], cwd=cwd or tempfile.gettempdir(),
                          capture_output=True, text=True, timeout=300, check=False)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("graphopt: error:"), r.stderr
    assert "Traceback" not in r.stderr and "\x1b[" not in r.stderr  # no traceback, no ORT colour codes
    return lines[0]


def _tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def _unknown_elem_type(tmp: Path) -> Path:
    mp = _small()
    mp.graph.output[0].type.tensor_type.elem_type = 99
    return _save_raw(tmp / "elem99.onnx", mp)


def _utf8_name(tmp: Path) -> Path:
    mp = make_model([helper.make_node("Relu", ["x"], ["hidden"], name="relu"),
                     helper.make_node("Neg", ["hidden"], ["y"], name="neg")], [vi("x", [2])], [vi("y", [2])])
    data = mp.SerializeToString().replace(b"hidden", b"\xff\xfe\xc0\xc0\xc0\xc0")  # same length: still protobuf
    p = tmp / "utf8.onnx"
    p.write_bytes(data)
    return p


def _fails_full_check_only(tmp: Path) -> Path:
    """Passes onnx's structural check, fails strict shape inference (an output declared [2, 7]
    that Relu of a [2, 5] input cannot produce); ONNX Runtime still runs it."""
    mp = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", [2, 5])], [vi("y", [2, 7])])
    onnx.checker.check_model(mp)  # the old, structural check let it through
    return _save_raw(tmp / "fullcheck.onnx", mp)


def test_unknown_elem_type_is_named(tmp_path: Path) -> None:
    p = _unknown_elem_type(tmp_path)
    for check in (True, False):
        with pytest.raises(InvalidModelError, match=r"'y'.*element type 99"):
            graphopt.load(p, check=check)
    mp = _small()
    mp.graph.initializer.append(numpy_helper.from_array(np.zeros(2, np.float32), "w"))
    mp.graph.initializer[0].data_type = 1000
    with pytest.raises(InvalidModelError, match=r"initializer 'w'.*element type 1000"):
        graphopt.load(_save_raw(tmp_path / "w1000.onnx", mp), check=False)


def test_invalid_utf8_name_is_refused_even_unchecked(tmp_path: Path) -> None:
    p = _utf8_name(tmp_path)
    for check in (True, False):
        with pytest.raises(InvalidModelError, match="not valid UTF-8") as ei:
            graphopt.load(p, check=check)
        assert "relu" in str(ei.value) or "neg" in str(ei.value)
    line = _one_error_line(_cli("optimize", str(p), "-o", str(tmp_path / "o.onnx"), "--no-check"))
    assert "UTF-8" in line and not (tmp_path / "o.onnx").exists()


def test_full_check_refuses_with_checker_message_and_no_check_goes_on(tmp_path: Path) -> None:
    p = _fails_full_check_only(tmp_path)
    with pytest.raises(graphopt.errors.CheckerError) as ei:
        graphopt.load(p)
    msg = str(ei.value)
    assert "ONNX checker" in msg and "relu" in msg and "\n" not in msg
    out = tmp_path / "o.onnx"
    line = _one_error_line(_cli("optimize", str(p), "-o", str(out)))
    assert "ONNX checker" in line and "--no-check" in line and not out.exists()
    for cmd in (["inspect", str(p)], ["verify", str(p), str(p)], ["quantize", str(p), "-o", str(out), "--dynamic"]):
        assert "ONNX checker" in _one_error_line(_cli(*cmd))
    r = _cli("optimize", str(p), "-o", str(out), "--no-check")
    assert r.returncode == 0, r.stderr
    assert out.exists()


def test_models_no_runtime_loads_are_refused(tmp_path: Path) -> None:
    """What onnx's checker lets through but ONNX Runtime refuses: an opset that does not exist,
    a graph without outputs."""
    mp = _small()
    mp.opset_import[0].version = 1_000_000
    with pytest.raises(graphopt.errors.CheckerError, match="opset 1000000"):
        graphopt.load(_save_raw(tmp_path / "opset.onnx", mp))
    mp = _small()
    del mp.graph.output[:]
    with pytest.raises(graphopt.errors.CheckerError, match="no outputs"):
        graphopt.load(_save_raw(tmp_path / "noout.onnx", mp))


def test_huge_declared_dim_is_named_not_allocated(tmp_path: Path) -> None:
    mp = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", [2 ** 40, 4])], [vi("y", [2 ** 40, 4])])
    p = _save_raw(tmp_path / "huge.onnx", mp)
    line = _one_error_line(_cli("verify", str(p), str(p)))
    assert "'x'" in line and "GiB" in line


def test_ort_log_lines_are_silenced(tmp_path: Path) -> None:
    """A model ONNX Runtime fails to run (a Reshape to a size the data does not have): its own
    coloured log line used to come before graphopt's one line."""
    mp = make_model([helper.make_node("Reshape", ["x", "s"], ["y"], name="rs")],
                    [vi("x", [2, 3]), vi("s", [2], TensorProto.INT64)], [vi("y", [None, None])])
    p = _save_raw(tmp_path / "rs.onnx", mp)
    line = _one_error_line(_cli("verify", str(p), str(p), "--samples", "1"))
    assert "rs" in line  # the node ORT names


def test_nothing_written_after_a_late_error(tmp_path: Path) -> None:
    """The model is staged and moved into place only when the command succeeded: a failure
    after the model was written (here the report path is a directory) leaves nothing; an output
    directory that does not exist is refused, not created."""
    from graphopt.cli import example_model_path

    src = example_model_path()
    rep = tmp_path / "report.md"
    rep.mkdir()
    out = tmp_path / "o.onnx"
    _one_error_line(_cli("optimize", str(src), "-o", str(out), "--report", str(rep)))
    assert _tree(tmp_path) == ["report.md"]
    line = _one_error_line(_cli("optimize", str(src), "-o", str(tmp_path / "new" / "sub" / "o.onnx")))
    assert "does not exist" in line
    assert not (tmp_path / "new").exists()


def test_quantize_writes_nothing_when_ort_refuses_the_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize used to save its result before ONNX Runtime loaded it."""
    import graphopt.runtime as rt
    from graphopt import cli
    from graphopt.errors import RuntimeBackendError

    real = rt.run_ort

    def refuse_output(model, inputs, **kw):
        if isinstance(model, str) and model.endswith("q.onnx"):
            raise RuntimeBackendError("ONNX Runtime cannot load the model: (simulated)")
        return real(model, inputs, **kw)

    real_session = rt.ort_session

    def refuse_session(model, *a, **kw):
        if isinstance(model, str) and model.endswith("q.onnx"):
            raise RuntimeBackendError("ONNX Runtime cannot load the model: (simulated)")
        return real_session(model, *a, **kw)

    monkeypatch.setattr(rt, "run_ort", refuse_output)
    monkeypatch.setattr(rt, "ort_session", refuse_session)  # the output check opens sessions once
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc = cli.main(["quantize", str(cli.example_model_path()), "-o", str(out_dir / "q.onnx"), "--dynamic"])
    assert rc == 2
    assert _tree(out_dir) == []


def test_success_leaves_only_the_output(tmp_path: Path) -> None:
    from graphopt.cli import example_model_path

    src = example_model_path()
    r = _cli("optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--external-data")
    assert r.returncode == 0, r.stderr
    assert _tree(tmp_path) == ["o.onnx", "o.onnx.data"]
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    ref = graphopt.run_ort(str(src), {"input": x})
    got = graphopt.run_ort(str(tmp_path / "o.onnx"), {"input": x})
    assert all(np.allclose(ref[k], got[k], rtol=1e-4, atol=1e-5) for k in ref)


def test_folding_below_opset_9_writes_no_bool_constant(tmp_path: Path) -> None:
    """Constant (version 1, below opset 9) holds only float tensors: a folded bool or int64
    graph output must not become one. The result passes the full check and computes the same."""
    nodes = [helper.make_node("Greater", ["c1", "c2"], ["mask"], name="greater"),
             helper.make_node("Cast", ["mask"], ["maskf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "maskf"], ["y"], name="mul"),
             helper.make_node("Shape", ["c1"], ["shape"], name="shape")]
    mp = make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3]), vi("mask", [2, 3], TensorProto.BOOL),
                                                vi("shape", [2], TensorProto.INT64)],
                    inits=[("c1", np.array([[1, -2, 3], [0, 5, -1]], np.float32)), ("c2", np.zeros((2, 3), np.float32))],
                    opset=8, ir_version=4)
    onnx.checker.check_model(mp, full_check=True)
    m = graphopt.from_proto(mp)
    graphopt.run_passes(m, ["fold-constants"])
    assert not any(n.op_type in ("Greater", "Shape", "Cast") for n in m.graph)  # it did fold
    out = graphopt.to_proto(m)
    onnx.checker.check_model(out, full_check=True)
    assert not any(n.op_type == "Constant" and n.attribute[0].t.data_type not in (1, 10, 11) for n in out.graph.node)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ref, got = graphopt.run_ort(mp, {"x": x}), graphopt.run_ort(out, {"x": x})
    assert all(np.array_equal(ref[k], got[k]) for k in ref)
