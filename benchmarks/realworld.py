"""The corpus matrix: every graphopt CLI command on every real-model corpus entry, as a user runs it.

Each cell runs the real ``graphopt`` command line in a subprocess (exit code, stdout and stderr
captured, with a timeout) and is classified:

- **ok**: exit 0 and the output is valid: ``onnx.checker.check_model(full_check=True)`` passes, ONNX
  Runtime loads it and runs it on the model's realistic inputs, and for lossless commands
  (``optimize``) the outputs equal the original's (rtol 1e-4, atol 1e-4).
  Lossy commands must give finite outputs of the original's shapes; static/dynamic INT8 must stay
  within a relative L2 error of 0.5 of the float outputs (beyond that it is "wrong numbers").
- **refused**: exit 2 with one clean ``graphopt: error:`` line that names a node, an op type or an
  input/output of the model (the cell shows that line).
- **failure**: a traceback, wrong numbers, an invalid output, a timeout, noise before the error line,
  or an exit 2 whose message names nothing in the model.

Commands (columns): ``inspect``, ``optimize`` (``--verify`` on the realistic inputs), ``verify`` (the
model against itself on the realistic inputs), ``quantize`` (static, realistic calibration data),
``quantize-dyn`` (``--dynamic``), ``compress`` (``--prune 0.5 --structured`` on CNNs, ``--lowrank 0.95``
on MatMul/Gemm models, ``--cluster 16`` otherwise), ``compile`` (TVM, host) and ``bench`` (ORT vs the
compiled library).

Realistic inputs come from ``benchmarks/corpus/data.py`` (``task(name).calibration(n)``,
``task(name).eval_feeds(n)``, ``write_inputs(feeds, path)``) when it exists, else from a fallback here
that makes random inputs of realistic shapes and ranges (images 1x3xHxW with H, W multiples of 32 in
480..640, text lines 1x3x48x320, 512 audio samples with ``sr=16000`` and a zero state, byte models'
values in [0, 256], ...). Commands get ``--inputs DIR`` where their ``--help`` offers it, else
``--input-shape`` for every input that has a non-fixed dim.

Run:  python -m benchmarks.realworld [--models a,b] [--commands inspect,optimize,...] [--timeout S]
      [--jobs N] [--fresh]
Writes benchmarks/results/realworld.json (per-cell details: command line, seconds, stderr tail) and
benchmarks/results/realworld.md (one row per model, one column per command). Without ``--fresh``, the
cells run now replace those of the same model and command in the existing JSON (each cell carries
the time it ran), so a subset can be rerun.

Other tables about the same corpus (``lossless_corpus.json``: node counts against onnxslim/onnxsim;
``int8_corpus.json``: INT8 against ORT's quantizer) are merged into the markdown as extra columns
when they exist and give a short per-model ``cell`` string (see :func:`extra_columns`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks import corpus

log = logging.getLogger("graphopt.realworld")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent
COMMANDS: tuple[str, ...] = ("inspect", "optimize", "verify", "quantize", "quantize-dyn", "compress",
                             "compile", "bench")
EXTRA_TABLES = {"lossless": RESULTS / "lossless_corpus.json", "int8": RESULTS / "int8_corpus.json"}
LOSSLESS_RTOL, LOSSLESS_ATOL = 1e-4, 1e-4  # float reassociation across ~100 layers reaches 1e-5
INT8_MAX_REL_ERR = 0.5
N_CALIB, N_EVAL = 8, 3
# TVM untuned builds of the larger detectors take minutes on 2 shared cores
TIMEOUT_FACTOR = {"compile": 2.0}


# ----------------------------------------------------------------------------------------------
# realistic inputs

def _data_module() -> Any | None:
    """``benchmarks.corpus.data`` when it exists and offers the expected API, else None."""
    if not (HERE / "corpus" / "data.py").exists():
        return None
    try:
        from benchmarks.corpus import data  # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001 - a half-written module: fall back, and say so
        log.warning("benchmarks/corpus/data.py does not import (%s); using random realistic inputs", e)
        return None
    return data if hasattr(data, "task") and hasattr(data, "write_inputs") else None


def _write_dir(feeds: Sequence[dict[str, np.ndarray]], path: Path) -> None:
    """One ``.npz`` per sample, arrays shaped exactly like the model inputs."""
    path.mkdir(parents=True, exist_ok=True)
    for k, f in enumerate(feeds):
        np.savez(path / f"sample_{k:03d}.npz", **f)  # type: ignore[arg-type]


def _written(path: Path) -> Path:
    """What ``write_inputs`` made of ``path``: the directory itself, or ``path.npz``."""
    if path.is_dir():
        return path
    npz = path.with_name(path.name + ".npz")
    if npz.exists():
        return npz
    raise FileNotFoundError(f"write_inputs wrote neither {path} nor {npz}")


@dataclass
class Inputs:
    """Realistic inputs of one model, as feeds and as files the CLI reads."""

    calib: list[dict[str, np.ndarray]]
    eval: list[dict[str, np.ndarray]]
    calib_path: Path
    eval_path: Path
    source: str

    def shape_args(self, model: onnx.ModelProto) -> list[str]:
        """``--input-shape`` for every input whose declared shape is not fully fixed."""
        out = []
        for v in model.graph.input:
            if v.name not in self.eval[0]:
                continue
            dims = v.type.tensor_type.shape.dim
            shp = self.eval[0][v.name].shape
            fixed = len(dims) == len(shp) and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims)
            if shp and not fixed:
                out += ["--input-shape", f"{v.name}:{','.join(str(int(d)) for d in shp)}"]
        return out


def make_inputs(name: str, workdir: Path, n_calib: int = N_CALIB, n_eval: int = N_EVAL) -> Inputs:
    """Calibration and evaluation feeds for ``name``, written under ``workdir``."""
    data = _data_module()
    calib_path, eval_path = workdir / "calib", workdir / "eval"
    if data is not None:
        try:
            t = data.task(name)
            calib, ev = list(t.calibration(n_calib)), list(t.eval_feeds(n_eval))
            data.write_inputs(calib, calib_path)
            data.write_inputs(ev, eval_path)
            return Inputs(calib, ev, _written(calib_path), _written(eval_path), "benchmarks/corpus/data.py")
        except Exception as e:  # noqa: BLE001
            log.warning("%s: data.py failed (%s: %s); using random realistic inputs", name, type(e).__name__, e)
            shutil.rmtree(calib_path, ignore_errors=True)
            shutil.rmtree(eval_path, ignore_errors=True)
            for p in (calib_path, eval_path):
                p.with_name(p.name + ".npz").unlink(missing_ok=True)
    calib, ev = corpus.random_feeds(name, n_calib, seed=1), corpus.random_feeds(name, n_eval, seed=2)
    _write_dir(calib, calib_path)
    _write_dir(ev, eval_path)
    return Inputs(calib, ev, calib_path, eval_path, "fallback (random, realistic shapes)")


# ----------------------------------------------------------------------------------------------
# running and classifying cells

@dataclass
class Cell:
    """One (model, command) result."""

    status: str                  # ok | refused | failure | skipped
    text: str                    # the short table cell
    argv: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rc: int | None = None
    stderr_tail: str = ""
    stdout_tail: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    when: str = ""


_HELP: dict[str, str] = {}
# where the CLI runs from: the working tree (default) or a `git archive` snapshot (--snapshot REV)
_CLI_CWD: Path = ROOT
_CLI_ENV: dict[str, str] = {}


def use_snapshot(rev: str, into: Path) -> str:
    """Run the CLI from ``git archive REV`` extracted under ``into`` (a consistent, committed state
    while others edit the working tree). Returns the full commit id."""
    global _CLI_CWD, _CLI_ENV
    commit = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    dst = into / f"snapshot-{commit[:10]}"
    if not dst.exists():
        dst.mkdir(parents=True)
        arch = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dst)], input=arch.stdout, check=True)
    _CLI_CWD, _CLI_ENV = dst, {"PYTHONPATH": str(dst)}
    _HELP.clear()
    return commit
_NOISE = re.compile(r"\[[EWIV]:onnxruntime|\x1b\[")


def cli_help(command: str) -> str:
    """``graphopt COMMAND --help`` (cached): which options this checkout offers."""
    if command not in _HELP:
        r = subprocess.run([sys.executable, "-m", "graphopt.cli", command, "--help"], cwd=_CLI_CWD,
                           env=dict(os.environ, **_CLI_ENV), capture_output=True, text=True, timeout=120,
                           check=False)
        _HELP[command] = r.stdout
    return _HELP[command]


def has_option(command: str, option: str) -> bool:
    return re.search(rf"(^|\s){re.escape(option)}(\s|$|,|=)", cli_help(command), re.MULTILINE) is not None


def run_cli(args: Sequence[str], timeout: float, cwd: Path | None = None) -> tuple[int | None, str, str, float]:
    """Run ``graphopt ARGS`` in its own process group, in ``cwd`` (default: where the CLI's code is);
    on timeout kill that group. rc None = timeout."""
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONWARNINGS="ignore", **_CLI_ENV)
    argv = [sys.executable, "-m", "graphopt.cli", *args]
    t0 = time.perf_counter()
    if _STOP.is_set():
        raise RuntimeError("stopped")
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                         env=env, cwd=cwd or _CLI_CWD, start_new_session=True)
    _RUNNING.add(p)
    try:
        out, err = p.communicate(timeout=timeout)
        rc: int | None = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        rc = None
    finally:
        _RUNNING.discard(p)
    return rc, out, err, time.perf_counter() - t0


_RUNNING: set[subprocess.Popen] = set()
_STOP = threading.Event()


def _stop_children(signum: int, frame: Any) -> None:
    """On SIGTERM/SIGINT: end the CLI process groups this script started, then exit."""
    _STOP.set()
    for p in list(_RUNNING):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)


def model_names(m: onnx.ModelProto) -> set[str]:
    """Op types, node names and value names of inputs/outputs, in every graph and subgraph."""
    names: set[str] = set()
    for g in corpus.all_graphs(m.graph):
        names.update(v.name for v in [*g.input, *g.output])
        names.update(n.op_type for n in g.node)
        names.update(n.name for n in g.node if n.name)
    return names


def _tail(s: str, n: int = 1200) -> str:
    return s[-n:] if len(s) > n else s


def _last_line(s: str) -> str:
    lines = [x.strip() for x in s.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def classify_error(rc: int | None, stderr: str, model_words: set[str], seconds: float) -> Cell:
    """A cell for a run that did not exit 0: refused (clean, named) or failure (with its cause)."""
    if rc is None:
        return Cell("failure", f"FAIL: timeout after {seconds:.0f} s")
    if "Traceback (most recent call last)" in stderr:
        return Cell("failure", f"FAIL: traceback {_last_line(stderr)[:160]}")
    lines = [x for x in stderr.splitlines() if x.strip()]
    err_lines = [x for x in lines if x.startswith("graphopt: error:")]
    if rc == 1:
        return Cell("failure", f"FAIL: exit 1 {_last_line(stderr)[:160]}")
    if rc != 2:
        return Cell("failure", f"FAIL: exit {rc} {_last_line(stderr)[:160]}")
    if len(err_lines) != 1:
        return Cell("failure", f"FAIL: exit 2 without one error line: {_last_line(stderr)[:160]}")
    msg = err_lines[0][len("graphopt: error:"):].strip()
    noise = [x for x in lines if _NOISE.search(x)]
    if noise:
        return Cell("failure", f"FAIL: runtime log noise before the error: {msg[:140]}")
    if "pass failed:" in msg or "frontend failed:" in msg:  # an internal exception wrapped, not a decision
        return Cell("failure", f"FAIL: crash reported as an error: {msg[:150]}")
    if "(see `graphopt" in msg:  # argparse: this script (or the CLI) used an option that does not exist
        return Cell("failure", f"FAIL: usage error {msg[:160]}")
    quoted = {w.strip("'\"`") for w in re.findall(r"'[^']+'|\"[^\"]+\"|`[^`]+`", msg)}
    words = {w for w in re.findall(r"[\w./:\-]+", msg) if len(w) > 1} | quoted
    if re.search(r"calibration sample \d|--input-shape gives|fixe[sd] (it to|dim)|calibration data .* does not exist"
                 r"|--inputs .*(does not|cannot|must)", msg):
        # the harness's inputs run in ONNX Runtime on the original model: refusing them is a bug
        return Cell("failure", f"FAIL: rejects valid inputs: {msg[:150]}")
    if not words & model_words:
        return Cell("failure", f"FAIL: unclear refusal: {msg[:160]}")
    return Cell("refused", f"refused: {msg[:160]}")


def _run_ort(path: Path, feeds: Sequence[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return [dict(zip(names, sess.run(names, {k: v for k, v in f.items() if k in wanted}), strict=True))
            for f in feeds]


def _rel_err(ref: list[dict[str, Any]], got: list[dict[str, Any]]) -> tuple[float, list[str]]:
    """Relative L2 error over all float outputs; problems (shape, non-finite) listed."""
    num = den = 0.0
    problems: list[str] = []
    for r, g in zip(ref, got, strict=True):
        gv = list(g.values()) if set(g) != set(r) else [g[k] for k in r]
        for (k, a), b in zip(r.items(), gv, strict=False):
            if not isinstance(a, np.ndarray):
                continue
            if not isinstance(b, np.ndarray) or a.shape != b.shape:
                problems.append(f"{k}: shape {getattr(a, 'shape', None)} vs {getattr(b, 'shape', None)}")
                continue
            if a.dtype.kind != "f":
                continue
            if not np.all(np.isfinite(b)):
                problems.append(f"{k}: non-finite values")
                continue
            num += float(np.sum((a.astype(np.float64) - b.astype(np.float64)) ** 2))
            den += float(np.sum(a.astype(np.float64) ** 2))
    return (float(np.sqrt(num / den)) if den else 0.0), sorted(set(problems))


def _params(m: onnx.ModelProto) -> int:
    """Stored weight elements: initializers and Constant tensors, subgraphs included."""
    total = 0
    for g in corpus.all_graphs(m.graph):
        total += sum(int(np.prod(t.dims)) for t in g.initializer)
        total += sum(int(np.prod(a.t.dims)) for n in g.node if n.op_type == "Constant"
                     for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)
    return total


_INT_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv",
            "QLinearMatMul", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "MatMulIntegerToFloat"}


def _int_ops(m: onnx.ModelProto) -> int:
    """Nodes that quantize or compute in integers, subgraphs included."""
    return sum(n for op, n in _op_counts(m).items() if op in _INT_OPS)


def _count_nodes(m: onnx.ModelProto) -> int:
    return sum(n.op_type != "Constant" for g in corpus.all_graphs(m.graph) for n in g.node)


def _fits(m: onnx.ModelProto, feed: dict[str, np.ndarray]) -> bool:
    """Whether ``feed`` matches the fixed dims the model declares for its inputs."""
    for v in m.graph.input:
        if v.name not in feed or not v.type.tensor_type.HasField("shape"):
            continue
        dims, shp = v.type.tensor_type.shape.dim, feed[v.name].shape
        if len(dims) != len(shp):
            return False
        if any(d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != x for d, x in zip(dims, shp, strict=True)):
            return False
    return True


PRUNE_TARGET = 0.65  # issue 13: --prune 0.5 --structured leaves every CNN at <= 0.65x of its parameters


def _prune_cell(details: dict[str, Any], err: float) -> Cell:
    r = details["params_ratio"]
    if r > PRUNE_TARGET:
        return Cell("failure", f"FAIL: --prune 0.5 --structured kept {r:.2f}x params (target ≤ {PRUNE_TARGET}x)",
                    details=details)
    return Cell("ok", f"ok {r:.2f}x params, err {err:.2f}", details=details)


def check_output(kind: str, src: Path, out: Path, inputs: Inputs, ref: list[dict[str, Any]]) -> Cell:
    """Validate the file a command wrote: checker, ORT load/run, numbers. ``kind``: lossless|int8|lossy."""
    from graphopt.runtime import compare

    if not out.exists():
        return Cell("failure", "FAIL: exit 0 but no output file")
    try:
        m = onnx.load(str(out))
        onnx.checker.check_model(m, full_check=True)
    except Exception as e:  # noqa: BLE001
        return Cell("failure", f"FAIL: invalid output (onnx checker): {_last_line(str(e))[:140]}")
    # an output specialized to fixed shapes (optimize/quantize with --input-shape) is checked on the
    # realistic samples of those shapes only
    idx = [k for k, f in enumerate(inputs.eval) if _fits(m, f)]
    if not idx:
        return Cell("failure", "FAIL: the output's fixed input shapes fit none of the realistic inputs")
    feeds, ref = [inputs.eval[k] for k in idx], [ref[k] for k in idx]
    try:
        got = _run_ort(out, feeds)
    except Exception as e:  # noqa: BLE001
        return Cell("failure", f"FAIL: output does not run in ORT: {_last_line(str(e))[:140]}")
    orig = onnx.load(str(src))
    size = out.stat().st_size / max(1, src.stat().st_size)
    details: dict[str, Any] = {"size_ratio": round(size, 4), "nodes": [_count_nodes(orig), _count_nodes(m)],
                               "params_ratio": round(_params(m) / max(1, _params(orig)), 4),
                               "checked_samples": f"{len(idx)} of {len(inputs.eval)}"}
    if kind == "lossless":
        worst = 0.0
        for r, g in zip(ref, got, strict=True):
            c = compare(r, g, rtol=LOSSLESS_RTOL, atol=LOSSLESS_ATOL)
            worst = max(worst, c.max_abs)
            if not c.ok:
                details["max_abs"] = c.max_abs
                return Cell("failure", f"FAIL: wrong numbers (max abs diff {c.max_abs:.3g}; "
                                       f"{'; '.join(c.problems)[:100]})", details=details)
        details["max_abs"] = worst
        a, b = details["nodes"]
        return Cell("ok", f"ok {a}→{b} nodes", details=details)
    err, problems = _rel_err(ref, got)
    details["rel_err"] = round(err, 5)
    if problems:
        return Cell("failure", f"FAIL: wrong numbers ({'; '.join(problems)[:120]})", details=details)
    if kind in ("int8", "int8dyn"):
        q_before, q_after = _int_ops(orig), _int_ops(m)
        details["integer_ops"] = [q_before, q_after]
        if err > INT8_MAX_REL_ERR:
            return Cell("failure", f"FAIL: wrong numbers (rel err {err:.2f}, size {size:.2f}x)", details=details)
        if q_after <= q_before:
            if kind == "int8":
                return Cell("failure", "FAIL: exit 0 but nothing quantized", details=details)
            return Cell("ok", "ok, nothing quantized", details=details)
    if kind == "prune":
        return _prune_cell(details, err)
    return Cell("ok", f"ok {size:.2f}x size, err {err:.3f}", details=details)


def _op_counts(m: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for g in corpus.all_graphs(m.graph) for n in g.node))


def compress_args(m: onnx.ModelProto) -> tuple[list[str], str]:
    """Which compression applies: structured pruning on CNNs, low rank on MatMul/Gemm models, else clustering."""
    ops = _op_counts(m)
    convs = ops.get("Conv", 0) + ops.get("ConvInteger", 0)
    mms = ops.get("MatMul", 0) + ops.get("Gemm", 0) + ops.get("MatMulInteger", 0)
    if convs and convs >= mms:
        return ["--prune", "0.5", "--structured"], "prune"
    if mms:
        return ["--lowrank", "0.95"], "lossy"
    return ["--cluster", "16"], "lossy"


@dataclass
class Ctx:
    """What every command of one model needs."""

    name: str
    src: Path
    model: onnx.ModelProto
    words: set[str]
    inputs: Inputs
    ref: list[dict[str, Any]]
    work: Path
    timeout: float


def _inputs_args(ctx: Ctx, command: str, *, with_shapes: bool = True) -> list[str]:
    if has_option(command, "--inputs"):
        return ["--inputs", str(ctx.inputs.eval_path)]
    return ctx.inputs.shape_args(ctx.model) if with_shapes and has_option(command, "--input-shape") else []


def _argv(ctx: Ctx, command: str) -> tuple[list[str], str, Path | None]:
    """(CLI arguments, output check kind, output path) for one command."""
    s = str(ctx.src)
    if command == "inspect":
        return ["inspect", s, "--json"], "inspect", None
    if command == "optimize":
        out = ctx.work / "optimized.onnx"
        return ["optimize", s, "-o", str(out), "--verify", str(len(ctx.inputs.eval)), *_inputs_args(ctx, "optimize")], "lossless", out
    if command == "verify":
        return ["verify", s, s, "--samples", str(len(ctx.inputs.eval)), *_inputs_args(ctx, "verify")], "verify", None
    if command == "quantize":
        out = ctx.work / "int8.onnx"
        return ["quantize", s, "-o", str(out), "--calibration", str(ctx.inputs.calib_path)], "int8", out
    if command == "quantize-dyn":
        out = ctx.work / "dyn.onnx"
        return ["quantize", s, "-o", str(out), "--dynamic", *_inputs_args(ctx, "quantize", with_shapes=False)], \
            "int8dyn", out
    if command == "compress":
        out = ctx.work / "compressed.onnx"
        extra, kind = compress_args(ctx.model)
        calib = ["--calibration", str(ctx.inputs.calib_path)] if kind == "prune" else []
        return ["compress", s, "-o", str(out), *extra, *calib, *_inputs_args(ctx, "compress", with_shapes=False)], \
            kind, out
    if command == "compile":
        out = ctx.work / "model.so"
        # scalar inputs (silero's sample rate) pinned as a user would after compile's refusal suggests it
        pins = [x for k, v in ctx.inputs.eval[0].items() if v.ndim == 0 and has_option("compile", "--const-input")
                for x in ("--const-input", f"{k}={v.item()}")]
        return ["compile", s, "-o", str(out), "-q", "--no-build-cache", *pins, *_inputs_args(ctx, "compile")], \
            "compile", out
    if command == "bench":
        return ["bench", s, "--compiled", str(ctx.work / "model.so"), "--rounds", "5",
                *_inputs_args(ctx, "bench")], "bench", None
    raise ValueError(f"unknown command {command!r}")


def _negative_numbers(x: Any, path: str = "") -> list[str]:
    if isinstance(x, dict):
        return [p for k, v in x.items() for p in _negative_numbers(v, f"{path}.{k}")]
    if isinstance(x, list):
        if path.endswith((".shape", "dims")):
            return []  # -1 in a declared shape is the model's, not an analysis result
        return [p for i, v in enumerate(x) for p in _negative_numbers(v, f"{path}[{i}]")]
    if isinstance(x, int | float) and not isinstance(x, bool) and x < 0:
        return [f"{path.lstrip('.')}={x}"]
    return []


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:g} "


def _dynamic_inputs(m: onnx.ModelProto) -> list[str]:
    """Inputs with a dim that is not a positive number (symbolic, missing, -1 or 0)."""
    inits = {i.name for i in m.graph.initializer}
    return [v.name for v in m.graph.input if v.name not in inits
            and any(not (d.HasField("dim_value") and d.dim_value > 0) for d in v.type.tensor_type.shape.dim)]


def run_cell(ctx: Ctx, command: str) -> Cell:
    """Run one command on one model through the CLI and classify the result."""
    args, kind, out = _argv(ctx, command)
    if command == "bench" and not (ctx.work / "model.so").exists():
        return Cell("skipped", "- (no build)", argv=["graphopt", *args])
    cwd = ctx.work / "cwd"  # an empty working directory, as a user's: nothing may be left in it
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir()
    rc, stdout, stderr, secs = run_cli(args, ctx.timeout * TIMEOUT_FACTOR.get(command, 1.0), cwd=cwd)
    left = sorted(p.name for p in cwd.iterdir())
    base = {"argv": ["graphopt", *args], "seconds": round(secs, 2), "rc": rc, "stderr_tail": _tail(stderr),
            "stdout_tail": _tail(stdout, 600)}
    if rc != 0:
        cell = classify_error(rc, stderr if stderr.strip() else stdout, ctx.words, secs)
        if out is not None and out.exists():
            cell.details["left_behind"] = str(out.name)
            if cell.status == "refused":
                cell = Cell("failure", f"FAIL: output written after the error: {cell.text}")
    elif "Traceback (most recent call last)" in stderr:
        cell = Cell("failure", f"FAIL: exit 0 after a traceback {_last_line(stderr)[:140]}")
    elif kind == "inspect":
        try:
            info = json.loads(stdout)
        except json.JSONDecodeError:
            cell = Cell("failure", "FAIL: inspect --json printed no JSON")
        else:
            neg = _negative_numbers(info)
            cell = Cell("failure", f"FAIL: negative figures {', '.join(neg[:3])}") if neg else Cell("ok", "ok")
            flops = info.get("flops") if isinstance(info, dict) else None
            warns = [x for x in stderr.splitlines() if x.startswith("WARNING")]
            cell.details["warnings"] = warns[:5]
            if cell.status == "ok" and isinstance(flops, int | float):
                cell.text = f"ok {_human(flops)}FLOPs"
            if cell.status == "ok" and flops == 0 and set(_op_counts(ctx.model)) & {"Conv", "MatMul", "Gemm", "LSTM"}:
                cell = Cell("failure", "FAIL: 0 FLOPs for a model with Conv/MatMul/LSTM (in If bodies?)",
                            details=cell.details)
            dyn = _dynamic_inputs(ctx.model)
            if cell.status == "ok" and dyn and not warns:
                cell = Cell("failure", f"FAIL: dims of {', '.join(dyn[:3])} defaulted without a warning "
                                       f"({_human(flops or 0)}FLOPs)", details=cell.details)
    elif kind == "verify":
        cell = Cell("ok", "ok")
    elif kind == "compile":
        cell = Cell("ok", f"ok {secs:.0f} s") if out and out.exists() and out.stat().st_size > 0 else \
            Cell("failure", "FAIL: exit 0 but no library written")
    elif kind == "bench":
        m = re.findall(r"TVM.*?\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|?\s*$", stdout, re.MULTILINE) or \
            re.findall(r"TVM.*?\s([\d.]+)\s+([\d.]+)\s*$", stdout, re.MULTILINE)
        cell = Cell("ok", f"ok TVM {float(m[-1][1]):.2f}x ORT" if m else "ok")
        if m:
            cell.details["tvm_over_ort"] = float(m[-1][1])
    else:
        assert out is not None
        try:
            cell = check_output(kind, ctx.src, out, ctx.inputs, ctx.ref)
        except Exception as e:  # noqa: BLE001 - a check that breaks is a failure of the output, reported
            cell = Cell("failure", f"FAIL: output check raised {type(e).__name__}: {str(e)[:120]}")
    if left:
        cell.details["left_in_cwd"] = left
        if cell.status != "failure":
            cell = Cell("failure", f"FAIL: left {len(left)} file(s) in the working directory: {', '.join(left[:2])}",
                        details=cell.details)
    for k, v in base.items():
        setattr(cell, k, v)
    cell.when = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return cell


def prepare(name: str, workroot: Path, timeout: float, n_calib: int = N_CALIB, n_eval: int = N_EVAL) -> Ctx:
    """Fetch the model, make its inputs and the reference outputs of the original."""
    src = corpus.fetch([name])[name]
    work = workroot / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = onnx.load(str(src))
    inputs = make_inputs(name, work, n_calib, n_eval)
    ref = _run_ort(src, inputs.eval)
    return Ctx(name, src, model, model_names(model), inputs, ref, work, timeout)


def run_model(name: str, commands: Sequence[str], workroot: Path, timeout: float,
              on_cell: Callable[[str, str, Cell], None] | None = None, keep: bool = False,
              n_calib: int = N_CALIB, n_eval: int = N_EVAL) -> dict[str, Cell]:
    """Every requested command on one model, in order (``bench`` uses ``compile``'s library)."""
    ctx = prepare(name, workroot, timeout, n_calib, n_eval)
    if on_cell:
        on_cell(name, "", Cell("skipped", "", details={
            "inputs_source": ctx.inputs.source,
            "eval_shapes": {k: list(v.shape) for k, v in ctx.inputs.eval[0].items()},
            "n_calib": len(ctx.inputs.calib), "n_eval": len(ctx.inputs.eval)}))
    cells: dict[str, Cell] = {}
    try:
        for c in COMMANDS:
            if c not in commands:
                continue
            if c == "bench" and "compile" not in commands:  # build once, as a user would, then bench it
                run_cell(ctx, "compile")
            cells[c] = run_cell(ctx, c)
            log.info("%-20s %-12s %-8s %6.1fs  %s", name, c, cells[c].status, cells[c].seconds, cells[c].text)
            if on_cell:
                on_cell(name, c, cells[c])
    finally:
        if not keep:
            shutil.rmtree(ctx.work, ignore_errors=True)
    return cells


# ----------------------------------------------------------------------------------------------
# tables

def extra_columns() -> dict[str, dict[str, str]]:
    """Per-model cells from the other corpus tables, where they exist.

    A table merges when its JSON has ``{"models": {name: {...}}}``, ``{"rows": [{"model": name, ...}]}``
    or a list of such rows; a row's ``cell`` string is used when it has one, else :func:`_summarize`
    reads the fields those scripts write (nodes per tool; INT8 size/agreement against ORT).
    """
    cols: dict[str, dict[str, str]] = {}
    for col, path in EXTRA_TABLES.items():
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        rows = (data.get("models") or data.get("rows")) if isinstance(data, dict) else data
        found: dict[str, str] = {}
        if isinstance(rows, dict):
            rows = [{"model": k, **v} for k, v in rows.items() if isinstance(v, dict)]
        for r in rows if isinstance(rows, list) else []:
            if isinstance(r, dict) and "model" in r:
                text = r.get("cell") or _summarize(col, r)
                if text:
                    found[str(r["model"])] = str(text)
        if found:
            cols[col] = found
    return cols


def cause(text: str) -> str:
    """A cell's text with the model-specific parts (numbers, quoted names, paths) blanked, for grouping."""
    t = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
    t = re.sub(r"/\S+", "/…", t)
    t = re.sub(r"\(\d+(,\s*\d+)*\)", "(…)", t)
    t = re.sub(r"-?\d+(\.\d+)?", "N", t)
    return t[:110]


def _summarize(col: str, r: dict[str, Any]) -> str:
    """A short cell from a row of lossless_corpus.json (nodes per tool) or int8_corpus.json (vs ORT)."""
    try:
        if col == "lossless" and isinstance(r.get("tools"), dict):
            t = r["tools"]
            g = t.get("graphopt", {})
            bad = "" if g.get("ok", True) else " (!)"
            peers = ", ".join(f"{k.replace('onnx', '')} {v['nodes']}" for k, v in t.items()
                              if k != "graphopt" and isinstance(v, dict) and "nodes" in v)
            return f"{g.get('nodes', '?')}{bad} ({peers})"
        if col == "int8" and isinstance(r.get("graphopt"), dict):
            if "error" in r["graphopt"]:
                return f"error: {r['graphopt']['error'][:60]}"
            g, o = r["graphopt"], r.get("ort", {})
            lat = f", latency g/ORT {r['graphopt_vs_ort']:.2f}" if r.get("graphopt_vs_ort") else ""
            return (f"{g.get('size_ratio', float('nan')):.2f}x agree {g.get('agreement', float('nan')):.2f} "
                    f"(ORT {o.get('size_ratio', float('nan')):.2f}x {o.get('agreement', float('nan')):.2f}){lat}")
    except (KeyError, TypeError, ValueError):
        return ""
    return ""


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(res: dict[str, Any]) -> str:
    cmds = [c for c in COMMANDS if any(c in m.get("cells", {}) for m in res["models"].values())]
    extra = extra_columns()
    titles = {"lossless": "compute nodes: graphopt (onnxslim, onnxsim)", "int8": "INT8 size, agreement (ORT's)"}
    head = ["model", "exporter", *cmds, *(titles.get(c, c) for c in extra)]
    meta = (f"Generated {res['generated']}, graphopt {res.get('commit', '?')}; inputs: {res.get('inputs', '?')}; "
            f"CLI `--inputs`: {'yes' if res.get('cli_inputs') else 'no (--input-shape from the realistic inputs)'}; "
            f"timeout {res.get('timeout')} s per cell (compile {TIMEOUT_FACTOR['compile']:g}x). "
            "Machine: 2 shared cores, loaded by other work (seconds are not speed figures).")
    legend = ("ok = exit 0 and the output passes onnx's full check, loads in ORT and runs on the realistic inputs "
              f"(optimize: equal to the original, rtol {LOSSLESS_RTOL:g} atol {LOSSLESS_ATOL:g}; quantize: relative "
              f"L2 error ≤ {INT8_MAX_REL_ERR}); refused = exit 2 with one clean line naming a node/op/input; "
              "FAIL = anything else. `x size` = file size vs the original, `err` = relative L2 output error.")
    lines = ["# graphopt on the real-model corpus: every command, as a user runs it", "", meta, "", legend, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    counts: dict[str, int] = {}
    for name in [e.name for e in corpus.ENTRIES if e.name in res["models"]]:
        m = res["models"][name]
        row = [name, m.get("exporter", "")]
        for c in cmds:
            cell = m["cells"].get(c)
            row.append(_md_escape(cell["text"]) if cell else "")
            if cell:
                counts[cell["status"]] = counts.get(cell["status"], 0) + 1
        row += [_md_escape(extra[col].get(name, "")) for col in extra]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Cells: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("ok", "refused", "failure", "skipped")),
              "", "## Failures and refusals grouped by cause", ""]
    groups: dict[str, list[str]] = {}
    for name in [e.name for e in corpus.ENTRIES if e.name in res["models"]]:
        for c in cmds:
            cell = res["models"][name]["cells"].get(c)
            if cell and cell["status"] in ("failure", "refused"):
                groups.setdefault(cause(cell["text"]), []).append(f"{name}/{c}")
    for key, where in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"- {len(where)} x `{_md_escape(key)}`: {', '.join(where)}")
    lines += ["", "## Each failure and refusal (stderr's last line)", ""]
    for name in [e.name for e in corpus.ENTRIES if e.name in res["models"]]:
        for c in cmds:
            cell = res["models"][name]["cells"].get(c)
            if cell and cell["status"] in ("failure", "refused"):
                last = _last_line(cell["stderr_tail"])
                lines.append(f"- **{name} / {c}** ({cell['status']}, {cell['seconds']} s): "
                             f"`{' '.join(cell['argv'][1:2] + cell['argv'][3:])}` -> "
                             f"{_md_escape(last[:300] if last and cell['rc'] else cell['text'])}")
    return "\n".join(lines) + "\n"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
    except Exception:  # noqa: BLE001
        return "?"


def reclassify(out_json: Path, out_md: Path) -> int:
    """Re-derive every non-zero-exit cell from its stored exit code and stderr with the current rules."""
    res = json.loads(out_json.read_text())
    for name, m in res["models"].items():
        words = model_names(onnx.load(str(corpus.model_path(name)), load_external_data=False))
        for cell in m["cells"].values():
            if cell["rc"] == 0 and "--structured" in cell["argv"] and "params_ratio" in cell["details"]:
                new = _prune_cell(cell["details"], cell["details"].get("rel_err", 0.0))
                cell["status"], cell["text"] = new.status, new.text
            text = cell["stderr_tail"] if cell["stderr_tail"].strip() else cell["stdout_tail"]
            if cell["status"] in ("failure", "refused") and cell["rc"] not in (0,) and text.strip():
                new = classify_error(cell["rc"], text, words, cell["seconds"])
                cell["status"], cell["text"] = new.status, new.text
    out_json.write_text(json.dumps(res, indent=1, default=str))
    out_md.write_text(render_markdown(res))
    return 0


def merge(out_json: Path, out_md: Path, others: Sequence[Path]) -> int:
    """Cells of ``others`` replace those of the same model and command in ``out_json``."""
    res = json.loads(out_json.read_text())
    for p in others:
        extra = json.loads(p.read_text())
        for name, m in extra["models"].items():
            mine = res["models"].setdefault(name, {k: v for k, v in m.items() if k != "cells"} | {"cells": {}})
            mine["cells"].update(m["cells"])
            if "inputs" in m:
                mine["inputs"] = m["inputs"]
        res.setdefault("merged", []).append({"from": extra.get("rerun", str(p)), "generated": extra.get("generated")})
    out_json.write_text(json.dumps(res, indent=1, default=str))
    out_md.write_text(render_markdown(res))
    return 0


def _dirty() -> bool:
    try:
        return bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=20, check=False).stdout.strip())
    except Exception:  # noqa: BLE001
        return False


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.realworld", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma list of corpus names (default: all)")
    ap.add_argument("--commands", help=f"comma list from {','.join(COMMANDS)} (default: all)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per cell (compile gets 2x)")
    ap.add_argument("--jobs", type=int, default=1, help="models run at the same time")
    ap.add_argument("--calib", type=int, default=N_CALIB, help="calibration samples per model")
    ap.add_argument("--eval", type=int, default=N_EVAL, help="evaluation samples per model")
    ap.add_argument("--fresh", action="store_true", help="drop earlier cells instead of merging into them")
    ap.add_argument("--keep", action="store_true", help="keep the work directories (outputs, inputs)")
    ap.add_argument("--workdir", default=None, help="where outputs go (default: a temporary directory)")
    ap.add_argument("--out", default=str(RESULTS / "realworld"), help="results path stem (.json and .md)")
    ap.add_argument("--reclassify", action="store_true", help="only re-derive the error cells of the existing "
                    "JSON from their stored exit code and stderr (after a change of the rules), run nothing")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="only merge the cells of other result files "
                    "(runs made side by side with --out elsewhere) into this one, run nothing")
    ap.add_argument("--snapshot", metavar="REV", help="run the CLI of a committed revision (git archive REV) "
                    "instead of the working tree")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, _stop_children)
    signal.signal(signal.SIGINT, _stop_children)
    names = a.models.split(",") if a.models else [e.name for e in corpus.ENTRIES]
    unknown = [n for n in names if n not in corpus.BY_NAME]
    cmds = a.commands.split(",") if a.commands else list(COMMANDS)
    bad = [c for c in cmds if c not in COMMANDS]
    if unknown or bad:
        ap.error(f"unknown models {unknown} or commands {bad}")
    out_json, out_md = Path(a.out).with_suffix(".json"), Path(a.out).with_suffix(".md")
    if a.reclassify:
        return reclassify(out_json, out_md)
    if a.merge:
        return merge(out_json, out_md, [Path(x) for x in a.merge])
    workroot = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="graphopt-realworld-"))
    code = f"working tree at {_git_commit()}" + (" (with uncommitted changes)" if _dirty() else "")
    if a.snapshot:
        code = f"commit {use_snapshot(a.snapshot, workroot)[:10]} (git archive)"
    res: dict[str, Any] = {"models": {}}
    if out_json.exists() and not a.fresh:
        res = json.loads(out_json.read_text())
    res.update({"generated": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "commit": code, "timeout": a.timeout,
                "inputs": "benchmarks/corpus/data.py" if _data_module() else "fallback (random, realistic shapes)",
                "cli_inputs": has_option("optimize", "--inputs"),
                "rerun": f"python -m benchmarks.realworld{' --snapshot ' + a.snapshot if a.snapshot else ''}"
                         f"{' --models ' + a.models if a.models else ''}{' --commands ' + a.commands if a.commands else ''}"
                         f" --timeout {a.timeout:g} --calib {a.calib} --eval {a.eval} --jobs {a.jobs}"})
    lock = threading.Lock()

    def save() -> None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str))
        os.replace(tmp, out_json)
        tmp = out_md.with_suffix(".md.tmp")
        tmp.write_text(render_markdown(res))
        os.replace(tmp, out_md)

    def on_cell(name: str, c: str, cell: Cell) -> None:
        if _STOP.is_set():  # a cell cut short by the stop is no result
            return
        with lock:
            e = corpus.BY_NAME[name]
            m = res["models"].setdefault(name, {"exporter": e.exporter, "kind": e.kind, "cells": {}})
            if not c:  # the model's inputs, before its cells
                m["inputs"] = cell.details
                return
            m["cells"][c] = {**asdict(cell), "code": code}
            save()


    def one(name: str) -> None:
        try:
            run_model(name, cmds, workroot, a.timeout, on_cell, keep=a.keep, n_calib=a.calib, n_eval=a.eval)
        except Exception as e:  # noqa: BLE001 - the matrix goes on; the model's row says why
            log.error("%s: could not prepare (%s: %s)", name, type(e).__name__, e)
            for c in cmds:
                on_cell(name, c, Cell("failure", f"FAIL: harness {type(e).__name__}: {str(e)[:120]}"))

    try:
        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
            list(pool.map(one, names))
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(workroot, ignore_errors=True)
        with lock:
            save()
    print(out_md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
