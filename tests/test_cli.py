"""The command line: inspect, optimize (with report), passes, verify."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from helpers import make_model, vi
from onnx import helper


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=300)


def test_optimize_example_with_report(tmp_path: Path) -> None:
    out, rep = tmp_path / "o.onnx", tmp_path / "r.md"
    r = run("optimize", "--example", "-o", str(out), "--verify", "2", "--report", str(rep))
    assert r.returncode == 0, r.stderr
    assert "fuse-conv-bn" in r.stdout and "verified on 2" in r.stdout
    onnx.checker.check_model(str(out), full_check=True)
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(out)).graph.node) == 0
    text = rep.read_text()
    assert "| fuse-conv-bn" in text and "compute nodes" in text
    rj = tmp_path / "r.json"
    assert run("optimize", "--example", "-o", str(tmp_path / "o2.onnx"), "--report", str(rj)).returncode == 0
    data = json.loads(rj.read_text())
    assert data["schema"] == "graphopt.report/1" and data["passes"][0]["nodes_before"] == 19
    assert data["before"]["nodes"] == 19 and data["after"]["nodes"] == 11


def test_inspect_text_and_json(example_path: Path) -> None:
    r = run("inspect", str(example_path))
    assert r.returncode == 0 and "BatchNormalization" in r.stdout and "opsets: ai.onnx 13" in r.stdout
    r = run("inspect", str(example_path), "--json", "--input-shape", "input:4,1,8,8")
    d = json.loads(r.stdout)
    assert d["compute_nodes"] == 19 and d["params"] == 47850 + 4  # weights + 4 scalar Constant nodes and d["flops"] > 4 * 900_000
    assert d["inputs"][0]["shape"] == ["batch", 1, 8, 8]


def test_passes_lists_registry() -> None:
    r = run("passes")
    assert r.returncode == 0 and "dce" in r.stdout and "default" in r.stdout
    # whole first paragraphs, wrapped (a docstring's first line used to be cut mid-sentence)
    text = " ".join(r.stdout.split())
    assert "turn a Transpose of size-1 axes next to a reshape into a Reshape" in text
    assert max(len(line) for line in r.stdout.splitlines()) <= 100


def test_passes_flag_and_verify_command(tmp_path: Path) -> None:
    mp = make_model([helper.make_node("Identity", ["x"], ["a"], name="i"), helper.make_node("Relu", ["a"], ["y"], name="r")],
                    [vi("x", ["n", 4])], [vi("y", ["n", 4])])
    src = tmp_path / "m.onnx"
    onnx.save(mp, src)
    out = tmp_path / "o.onnx"
    r = run("optimize", str(src), "-o", str(out), "--passes", "eliminate-identity,dce", "--input-shape", "x:3,4")
    assert r.returncode == 0, r.stderr
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Relu"]
    r = run("verify", str(src), str(out), "--input-shape", "x:3,4")
    assert r.returncode == 0 and "agree" in r.stdout
    bad = make_model([helper.make_node("Neg", ["x"], ["y"], name="n")], [vi("x", ["n", 4])], [vi("y", ["n", 4])])
    onnx.save(bad, tmp_path / "bad.onnx")
    r = run("verify", str(src), str(tmp_path / "bad.onnx"))
    assert r.returncode == 1 and "MISMATCH" in r.stdout


def test_external_data_flag(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    assert run("optimize", "--example", "-o", str(out), "--external-data").returncode == 0
    assert (tmp_path / "o.onnx.data").stat().st_size > 100_000
    x = np.zeros((1, 1, 8, 8), np.float32)
    import graphopt

    assert graphopt.run_ort(out, {"input": x})["logits"].shape == (1, 10)
