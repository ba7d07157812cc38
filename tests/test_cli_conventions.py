"""Command-line conventions (issue 17): --version, --example on every command that takes a model
(with the example's bundled calibration set), bad option values and bad --input-shape rejected
in one line with exit 2 on every command, no directory made for -o, a quiet exit on a closed pipe,
--plugin / GRAPHOPT_PLUGINS / entry points for user passes, library errors in terms of arguments,
missing optional extras named with their install command."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import graphopt
from graphopt import cli
from graphopt.data import example_calibration_path, example_model_path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(example_model_path())


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """cli.main, with argparse's SystemExit turned into a return code."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = int(e.code or 0)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("graphopt: error:"), err
    return lines[0]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    p = cli.build_parser()
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


# -- --version ------------------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _run(["--version"], capsys)
    assert rc == 0 and out.strip() == f"graphopt {metadata.version('graphopt')}"


# -- --example ------------------------------------------------------------------------------------

_MODEL_COMMANDS = ["inspect", "optimize", "quantize", "compress", "convert", "verify", "compile", "bench"]


def test_every_command_that_takes_a_model_has_example() -> None:
    subs = _subparsers()
    takes_model = {k for k, sp in subs.items() if any(a.dest in ("model", "a") for a in sp._actions)}
    # distill takes a student, a teacher and training data: no one bundled model makes sense there
    assert takes_model - {"distill"} == set(_MODEL_COMMANDS)
    for name in _MODEL_COMMANDS:
        assert any("--example" in a.option_strings for a in subs[name]._actions), name


@pytest.mark.parametrize("cmd", _MODEL_COMMANDS)
def test_example_resolves_to_the_bundled_model(cmd: str, tmp_path: Path) -> None:
    """main() turns --example into the bundled model for every command; a model given as well is
    an error; neither is an error. (compile and bench run for real in their own tests.)"""
    extra = {"optimize": ["-o", "o.onnx"], "quantize": ["-o", "o.onnx"], "compress": ["-o", "o.onnx"],
             "convert": ["-o", "o.onnx", "--fp16"], "compile": ["-o", "o.so"]}.get(cmd, [])
    p = cli.build_parser()
    args = p.parse_args([cmd, "--example", *(["other.onnx"] if cmd == "verify" else []), *extra])
    cli._use_example(args)
    assert (args.a if cmd == "verify" else args.model) == EXAMPLE
    if cmd == "verify":
        assert args.b == "other.onnx"
    if cmd in ("quantize", "compress"):
        assert args.calibration == str(example_calibration_path())
    both = p.parse_args([cmd, "--example", "m.onnx", *(["n.onnx"] if cmd == "verify" else []), *extra])
    with pytest.raises(graphopt.GraphoptError):
        cli._use_example(both)
    neither = p.parse_args([cmd, *extra])
    with pytest.raises(graphopt.GraphoptError, match="give"):
        cli._use_example(neither)


def test_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(["inspect", "--example", "--json"], capsys)
    assert rc == 0 and json.loads(out)["inputs"][0]["name"] == "input", err
    rc, out, err = _run(["verify", "--example", EXAMPLE, "--samples", "1"], capsys)
    assert rc == 0 and "agree" in out, err
    rc, out, err = _run(["convert", "--example", "--fp16", "--weights-only", "-o", str(tmp_path / "h.onnx")], capsys)
    assert rc == 0 and (tmp_path / "h.onnx").exists(), err


def test_example_calibration_set_is_real_digits() -> None:
    """The bundled set: 64 training images of the digits the example model was trained on, in the
    layout --calibration reads; the model classifies them (they are not noise)."""
    data = np.load(example_calibration_path())
    assert list(data.files) == ["input"]
    x = data["input"]
    assert x.shape == (64, 1, 8, 8) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    fixture = np.load(ROOT / "tests" / "fixtures" / "digits_calib.npz")["input"]
    assert np.array_equal(x, fixture[:64])  # what tests/fixtures/train_digits.py writes
    logits = graphopt.run_ort(graphopt.load(EXAMPLE), {"input": x})
    pred = np.argmax(next(iter(logits.values())), axis=1)
    assert len(set(pred.tolist())) == 10  # every class is there
    assert float(np.mean(np.max(_softmax(next(iter(logits.values()))), axis=1))) > 0.9  # and confidently seen
    cal = graphopt.load_calibration(str(example_calibration_path()), graphopt.load(EXAMPLE))
    assert len(cal) == 64


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_quantize_and_compress_example_calibrate_on_bundled_images(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    q = tmp_path / "q.onnx"
    rc, out, err = _run(["-q", "quantize", "--example", "-o", str(q)], capsys)
    assert rc == 0, err
    assert "calibration_samples" in out and " 64" in out.split("calibration_samples", 1)[1].splitlines()[0], out
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(q).graph.node)
    c = tmp_path / "c.onnx"
    rc, out, err = _run(["-q", "compress", "--example", "--prune", "0.25", "--structured", "-o", str(c)], capsys)
    assert rc == 0, err
    assert "no --calibration or --inputs" not in err and "random inputs" not in err, err  # it had real samples
    assert c.exists()


def test_packaging_ships_the_calibration_set() -> None:
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["graphopt.data"]
    assert any(Path(example_calibration_path().name).match(g) for g in cfg)


# -- bad option values ----------------------------------------------------------------------------

_BAD = [
    ("optimize", ["--example", "-o", "{o}", "--verify", "-3"], "--verify"),
    ("optimize", ["--example", "-o", "{o}", "--rtol", "nan"], "--rtol"),
    ("optimize", ["--example", "-o", "{o}", "--atol", "-1"], "--atol"),
    ("optimize", ["--example", "-o", "{o}", "--scale-rtol", "x"], "--scale-rtol"),
    ("quantize", ["--example", "-o", "{o}", "--max-error", "-0.1"], "--max-error"),
    ("quantize", ["--example", "-o", "{o}", "--method", "median"], "--method"),
    ("compress", ["--example", "-o", "{o}", "--prune", "1.5"], "--prune"),
    ("compress", ["--example", "-o", "{o}", "--prune", "0"], "--prune"),
    ("compress", ["--example", "-o", "{o}", "--nm", "4:2"], "--nm"),
    ("compress", ["--example", "-o", "{o}", "--nm", "two"], "--nm"),
    ("compress", ["--example", "-o", "{o}", "--cluster", "1"], "--cluster"),
    ("compress", ["--example", "-o", "{o}", "--cluster", "300"], "--cluster"),
    ("compress", ["--example", "-o", "{o}", "--lowrank", "0"], "--lowrank"),
    ("compress", ["--example", "-o", "{o}", "--lowrank", "1.1"], "--lowrank"),
    ("compress", ["--example", "-o", "{o}", "--lowrank-flops", "1"], "--lowrank-flops"),
    ("compress", ["--example", "-o", "{o}", "--channel-multiple", "0"], "--channel-multiple"),
    ("compress", ["--example", "-o", "{o}", "--importance", "random"], "--importance"),
    ("compress", ["--example", "-o", "{o}", "--cluster-init", "x"], "--cluster-init"),
    ("compress", ["--example", "-o", "{o}", "--lowrank-conv", "x"], "--lowrank-conv"),
    ("convert", ["--example", "-o", "{o}", "--fp16", "--bf16"], "--bf16"),
    ("verify", ["--example", "{m}", "--samples", "0"], "--samples"),
    ("verify", ["--example", "{m}", "--rtol", "-1"], "--rtol"),
    ("compile", ["--example", "-o", "{so}", "--trials", "-1"], "--trials"),
    ("compile", ["--example", "-o", "{so}", "--minutes", "-5"], "--minutes"),
    ("bench", ["--example", "--rounds", "0"], "--rounds"),
    ("bench", ["--example", "--threads", "-2"], "--threads"),
    ("bench", ["--example", "--seed", "-1"], "--seed"),
    ("distill", ["s.onnx", "-o", "{o}", "--teacher", "t.onnx", "--data", "d.npz", "--seed", "-1"], "--seed"),
    ("distill", ["s.onnx", "-o", "{o}", "--teacher", "t.onnx", "--data", "d.npz", "--batch", "0"], "--batch"),
]


@pytest.mark.parametrize("cmd, args, word", _BAD, ids=[f"{c}{a[-2]}={a[-1]}" for c, a, _ in _BAD])
def test_bad_option_values(tmp_path: Path, capsys: pytest.CaptureFixture[str], cmd: str, args: list[str],
                           word: str) -> None:
    if cmd not in _subparsers():
        pytest.skip(f"no {cmd} command in this checkout")
    argv = [cmd, *(a.format(o=tmp_path / "o.onnx", so=tmp_path / "o.so", m=EXAMPLE) for a in args)]
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and word in _one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_every_numeric_option_is_validated() -> None:
    """The audit, kept: no subcommand option parses with a bare int/float (which accept -3, nan, 0)."""
    for name, sp in _subparsers().items():
        for a in sp._actions:
            assert a.type not in (int, float), f"{name} {a.option_strings} uses a bare {a.type.__name__}"


_SHAPE_CMDS = {
    "inspect": [], "optimize": ["-o", "{o}"], "quantize": ["-o", "{o}", "--dynamic"],
    "compress": ["-o", "{o}", "--cluster", "4"], "convert": ["-o", "{o}", "--fp16"], "verify": ["{m}"],
    "compile": ["-o", "{so}"], "bench": [],
}


@pytest.mark.parametrize("spec, word", [("nosuch:1,1,8,8", "unknown input"), ("input:1,8,8", "rank 4"),
                                        ("input:1;2", "must be integers"), ("input", "expected NAME:D1"),
                                        ("input:1,2,8,8", "fixed dim 1")])
@pytest.mark.parametrize("cmd", list(_SHAPE_CMDS))
def test_bad_input_shape_on_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str], cmd: str,
                                          spec: str, word: str) -> None:
    if cmd in ("compile", "bench"):
        pytest.importorskip("tvm")
    rest = [a.format(o=tmp_path / "o.onnx", so=tmp_path / "o.so", m=EXAMPLE) for a in _SHAPE_CMDS[cmd]]
    rc, _, err = _run([cmd, "--example", *rest, "--input-shape", spec], capsys)
    line = _one_error_line(err)
    assert rc == 2 and word in line and "--input-shape" in line, line
    assert list(tmp_path.iterdir()) == []


def test_input_shape_help_says_what_it_does() -> None:
    for name, sp in _subparsers().items():
        for a in sp._actions:
            if "--input-shape" in a.option_strings:
                assert ";" in (a.help or ""), name  # the common text, then what it does for this command
    (opt,) = [a for a in _subparsers()["optimize"]._actions if "--input-shape" in a.option_strings]
    assert "FIXED" in opt.help


def test_optimize_input_shape_is_stated_and_fixed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "o.onnx"
    rc, out, err = _run(["-q", "optimize", "--example", "-o", str(out_path), "--input-shape", "input:3,1,8,8"],
                        capsys)
    assert rc == 0, err
    dims = [d.dim_value for d in onnx.load(out_path).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, 1, 8, 8]
    assert "input shapes FIXED by --input-shape: input [3, 1, 8, 8]" in out, out


# -- -o into a missing directory ------------------------------------------------------------------

_WRITERS = {
    "optimize": ["--example"], "quantize": ["--example", "--dynamic"], "compress": ["--example", "--cluster", "4"],
    "convert": ["--example", "--fp16"], "compile": ["--example", "--input-shape", "input:1,1,8,8"],
}


@pytest.mark.parametrize("cmd", list(_WRITERS))
def test_output_into_a_missing_directory_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    cmd: str) -> None:
    target = tmp_path / "missing" / "sub" / ("o.so" if cmd == "compile" else "o.onnx")
    rc, _, err = _run([cmd, *_WRITERS[cmd], "-o", str(target)], capsys)
    assert rc == 2 and "does not exist" in _one_error_line(err)
    assert list(tmp_path.iterdir()) == []


# -- a closed pipe --------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["inspect", "--example"], ["passes"]])
def test_closed_pipe_is_a_quiet_exit(argv: list[str]) -> None:
    """The reader goes away before graphopt writes (``graphopt inspect M | head -0``): exit 0 and
    nothing on stderr (no "Broken pipe", no "Exception ignored")."""
    p = subprocess.Popen([sys.executable, "-m", "graphopt.cli", "-q", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()
    err = p.stderr.read().decode()
    rc = p.wait(timeout=120)
    assert rc == 0 and "Broken pipe" not in err and "Exception" not in err, (rc, err)
    assert "graphopt: error" not in err


def test_head_one(tmp_path: Path) -> None:
    r = subprocess.run(f"{sys.executable} -m graphopt.cli -q inspect --example | head -1", shell=True,
                       capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert r.stdout.startswith("model ") and r.stdout.count("\n") == 1
    assert "Broken pipe" not in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- plugins --------------------------------------------------------------------------------------

_PLUGIN = textwrap.dedent('''
    from graphopt import Pass, register_pass

    @register_pass
    class RenameGraph(Pass):
        """Sets the graph's name (a pass only a plugin provides)."""

        name = "{name}"

        def run(self, graph, ctx):
            changed = graph.name != "{name}-was-here"
            graph.name = "{name}-was-here"
            return changed
''')


def _plugin(tmp_path: Path, module: str, name: str) -> Path:
    (tmp_path / f"{module}.py").write_text(_PLUGIN.format(name=name))
    return tmp_path


def _optimize_with(tmp_path: Path, pass_name: str, *extra: str, env: dict[str, str] | None = None
                   ) -> subprocess.CompletedProcess[str]:
    out = tmp_path / f"{pass_name}.onnx"
    return subprocess.run([sys.executable, "-m", "graphopt.cli", "-q", *extra, "optimize", "--example", "-o", str(out),
                           "--passes", f"{pass_name},dce"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=180, check=False)


def _graph_name(path: Path) -> str:
    return onnx.load(path).graph.name


def test_plugin_flag_and_env(tmp_path: Path) -> None:
    _plugin(tmp_path, "my_passes_a", "rename-a")
    _plugin(tmp_path, "my_passes_b", "rename-b")
    pp = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    # without the plugin the pass is unknown
    r = _optimize_with(tmp_path, "rename-a", env=pp)
    assert r.returncode == 2 and "unknown pass 'rename-a'" in r.stderr, r.stderr
    r = _optimize_with(tmp_path, "rename-a", "--plugin", "my_passes_a", env=pp)
    assert r.returncode == 0, r.stderr
    assert _graph_name(tmp_path / "rename-a.onnx") == "rename-a-was-here"
    r = _optimize_with(tmp_path, "rename-b", env={**pp, "GRAPHOPT_PLUGINS": f"my_passes_a{os.pathsep}my_passes_b"})
    assert r.returncode == 0, r.stderr
    assert _graph_name(tmp_path / "rename-b.onnx") == "rename-b-was-here"
    # a file path works too, and after the command name
    (tmp_path / "rename-a.onnx").unlink()
    out = tmp_path / "rename-a.onnx"
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "-q", "optimize", "--example", "-o", str(out),
                        "--passes", "rename-a", "--plugin", str(tmp_path / "my_passes_a.py")],
                       capture_output=True, text=True, cwd=ROOT, timeout=180, check=False)
    assert r.returncode == 0 and _graph_name(out) == "rename-a-was-here", r.stderr


def test_unimportable_plugin_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('boom')\n")
    pp = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    for extra, env, word in [(["--plugin", "no_such_module_xyz"], {}, "no_such_module_xyz"),
                             ([], {"GRAPHOPT_PLUGINS": "no_such_module_xyz"}, "no_such_module_xyz"),
                             (["--plugin", "broken_plugin"], pp, "RuntimeError: boom")]:
        r = _optimize_with(tmp_path, "dce", *extra, env=env)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("graphopt: error: cannot import plugin"), \
            r.stderr
        assert word in lines[0]
        assert not (tmp_path / "dce.onnx").exists()


def test_entry_point_plugin(tmp_path: Path) -> None:
    """The packaging form: a distribution declaring ``[project.entry-points."graphopt.passes"]``;
    here an installed distribution's metadata written by hand (what pip writes) on PYTHONPATH."""
    _plugin(tmp_path, "acme_passes", "acme-rename")
    dist = tmp_path / "acme_passes-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-passes\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[graphopt.passes]\nacme-rename = acme_passes:RenameGraph\n"
                                           "acme-module = acme_more\n")  # the module form: decorators register
    _plugin(tmp_path, "acme_more", "acme-more")
    pp = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = _optimize_with(tmp_path, "acme-rename", env=pp)
    assert r.returncode == 0, r.stderr
    assert _graph_name(tmp_path / "acme-rename.onnx") == "acme-rename-was-here"
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "passes"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, **pp}, timeout=120, check=False)
    assert "acme-rename" in r.stdout and "acme-more" in r.stdout


# -- library errors speak of arguments; the CLI of flags --------------------------------------------


def _dynamic_rank_model(tmp_path: Path) -> Path:
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    p = tmp_path / "norank.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), p)
    return p


def test_library_errors_name_arguments_cli_names_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from graphopt.runtime import input_feeds, make_inputs, resolve_input_shapes

    m = graphopt.load(_dynamic_rank_model(tmp_path), check=False)  # onnx's checker wants a shape
    with pytest.raises(graphopt.GraphoptError) as e:
        make_inputs(m)
    assert "input_shapes={'x': [D1, D2, ...]}" in str(e.value) and "--" not in str(e.value)
    ex = graphopt.load(EXAMPLE)
    for hints in ({"nosuch": [1]}, {"input": [1, 8, 8]}):
        with pytest.raises(graphopt.GraphoptError) as e:
            resolve_input_shapes(ex, hints)
        assert "input_shapes" in str(e.value) and "--" not in str(e.value)
    bad = tmp_path / "bad.npz"
    np.savez(bad, nosuch=np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(graphopt.GraphoptError) as e:
        input_feeds(ex, data=str(bad))
    assert str(e.value).startswith("data") and "--" not in str(e.value), e.value
    rc, _, err = _run(["verify", "--example", EXAMPLE, "--inputs", str(bad)], capsys)
    assert rc == 2 and _one_error_line(err).startswith("graphopt: error: --inputs"), err
    # the CLI says the same in its flags
    rc, _, err = _run(["verify", str(tmp_path / "norank.onnx"), str(tmp_path / "norank.onnx"), "--no-check"], capsys)
    line = _one_error_line(err)
    assert rc == 2 and "--input-shape x:D1,D2,..." in line and "input_shapes" not in line, line


def test_no_cli_flags_in_library_messages() -> None:
    """Messages raised (or logged) by graphopt's library modules name arguments, not CLI flags."""
    import ast
    import re

    flag = re.compile(r"(?<![\w-])--[a-z][a-z-]+")
    bad = []
    skip = {ROOT / "graphopt" / "cli.py"}
    for path in sorted([*(ROOT / "graphopt").rglob("*.py"), *(ROOT / "passes").rglob("*.py")]):
        if path in skip:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.arguments):  # a default that ends up in a message (what="--inputs")
                for d in [*node.defaults, *node.kw_defaults]:
                    if isinstance(d, ast.Constant) and isinstance(d.value, str) and flag.search(d.value):
                        bad.append(f"{path.relative_to(ROOT)}:{d.lineno}: default {d.value!r}")
            calls = []
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                calls.append(node.exc)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("warning", "error", "info"):
                calls.append(node)
            for call in calls:
                for arg in call.args[:1]:
                    text = "".join(v.value for v in ast.walk(arg) if isinstance(v, ast.Constant)
                                   and isinstance(v.value, str))
                    if flag.search(text):
                        bad.append(f"{path.relative_to(ROOT)}:{call.lineno}: {text[:90]}")
    assert bad == [], "\n".join(bad)


# -- missing optional extras ------------------------------------------------------------------------


def _without(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in modules:
            monkeypatch.delitem(sys.modules, name)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # import m -> ModuleNotFoundError


@pytest.mark.parametrize("argv", [["bench", "--example", "--compiled", "{d}/x.so"],
                                  ["bench", "--example", "--input-shape", "input:1,1,8,8"],
                                  ["compile", "--example", "-o", "{d}/x.so", "--input-shape", "input:1,1,8,8"]])
def test_missing_tvm_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    (tmp_path / "x.so").write_bytes(b"")
    (tmp_path / "x.so.json").write_text("{}")
    _without(monkeypatch, "tvm", "tvm_ffi")
    rc, _, err = _run(["-q", *(a.format(d=tmp_path) for a in argv)], capsys)
    line = _one_error_line(err)
    assert rc == 2 and 'pip install "graphopt[tvm]"' in line, line


def test_missing_extra_safety_net(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Any optional module imported without the library's own check still gives the command."""
    def boom(args: Any) -> int:
        import onnxsim  # noqa: F401

        return 0

    _without(monkeypatch, "onnxsim")
    real = cli.build_parser

    def parser() -> argparse.ArgumentParser:
        p = real()
        (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        sub.choices["passes"].set_defaults(fn=boom)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    rc, _, err = _run(["passes"], capsys)
    assert rc == 2 and 'pip install "graphopt[bench]"' in _one_error_line(err)


def test_require_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from graphopt.errors import MissingExtraError, require_extra

    assert require_extra("numpy") is np
    _without(monkeypatch, "PIL")
    with pytest.raises(MissingExtraError, match=r'the corpus data needs .PIL., which is not installed: '
                                                r'pip install "graphopt\[corpus\]"'):
        require_extra("PIL", "the corpus data")


def test_compile_example_needs_no_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`compile --example` builds the bundled model at batch 1 (its batch dim is dynamic; for any
    other model a dynamic dim is refused until --input-shape or --inputs fixes it)."""
    pytest.importorskip("tvm")
    rc, out, err = _run(["compile", "--example", "-o", str(tmp_path / "ex.so")], capsys)
    assert rc == 0 and (tmp_path / "ex.so").stat().st_size > 0, err
