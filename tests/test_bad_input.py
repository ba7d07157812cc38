"""Every kind of bad input gives a GraphoptError subclass naming the node or field; the CLI
prints one line, exits 2, writes no output and leaves the input untouched."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import ExternalDataError, InvalidModelError, ModelLoadError
from helpers import make_model, vi


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
