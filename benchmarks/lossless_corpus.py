"""graphopt's lossless default pipeline against onnxslim and onnxsim on the real-model corpus.

Per corpus model (``benchmarks/corpus``) and tool: compute nodes (NOTES.md's definition: Constant
nodes and ConstantOfShape of a constant shape do not count; nodes inside If/Loop/Scan do), tool
time, max abs error of every output against the original model under ONNX Runtime, and whether
the output passes ``onnx.checker.check_model(full_check=True)``.

Calls (each tool's recommended call, on the same in-memory ``ModelProto``):

* graphopt: ``graphopt.from_proto(mp)``, ``graphopt.optimize(m)`` (the ``default`` pipeline, as
  ``graphopt optimize IN -o OUT`` runs it), ``graphopt.to_proto(m)``;
* onnxslim: ``onnxslim.slim(mp)``;
* onnxsim: ``onnxsim.simplify(mp)`` (0.8.x: dynamic input dims need no argument any more, its
  docstring says; the model's own symbolic/-1 dims are left as they are, as for the others).

Timing: all tools run in this one process, each once untimed on the model first (warm-up: imports,
caches), then ``--repeats`` timed runs interleaved tool by tool (graphopt, onnxslim, onnxsim,
graphopt, ...); the table gives the median. A tool that raises is a failure of that tool (its error
is listed), never a win for another.

Inputs: ``benchmarks.corpus.data.task(name).eval_feeds(n)`` when that module exists, otherwise
random inputs with realistic shapes (see :func:`benchmarks.corpus.random_feeds`).

Command lines: on models of at least ``--cli-min-mb`` (10) MB, each tool's command line also runs in
a fresh process (``graphopt optimize IN -o OUT``, ``onnxslim IN OUT``, ``onnxsim IN OUT``),
interleaved, median wall and CPU seconds (see :func:`cli_times`).

Run:  python -m benchmarks.lossless_corpus [--only ddddocr_ocr,silero_vad] [--repeats 3] [--feeds 2]
Saves benchmarks/results/lossless_corpus.json and benchmarks/results/lossless_corpus.md
(``--only`` runs merge into the existing JSON by model name).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import graphopt
from benchmarks.corpus import random_feeds
from graphopt.progress import progress
from graphopt.runtime import ort_session

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
TOOLS = ["graphopt", "onnxslim", "onnxsim"]


# --------------------------------------------------------------------------------------------
# counting
# --------------------------------------------------------------------------------------------
def compute_nodes(mp: onnx.ModelProto) -> int:
    """Compute nodes of a model, subgraphs included (NOTES.md): ``Constant`` nodes and
    ``ConstantOfShape`` whose shape is an initializer or a ``Constant`` output do not count."""

    def walk(g: onnx.GraphProto, consts: set[str]) -> int:
        consts = consts | {t.name for t in g.initializer}
        consts |= {o for n in g.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx") for o in n.output}
        k = 0
        for n in g.node:
            if n.domain in ("", "ai.onnx") and (
                n.op_type == "Constant" or (n.op_type == "ConstantOfShape" and n.input[0] in consts)
            ):
                pass
            else:
                k += 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    k += walk(a.g, consts)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    k += sum(walk(s, consts) for s in a.graphs)
        return k

    return walk(mp.graph, set())


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def eval_feeds(name: str, mp: onnx.ModelProto, n: int) -> tuple[list[dict[str, np.ndarray]], str]:
    """The corpus' realistic inputs when ``benchmarks.corpus.data`` exists, else fallback ones."""
    try:
        data = importlib.import_module("benchmarks.corpus.data")
        return list(data.task(name).eval_feeds(n)), "corpus data"
    except Exception:  # noqa: BLE001 - module not there yet, or no generator for this model
        return random_feeds(name, n), "random, realistic shapes"


# --------------------------------------------------------------------------------------------
# tools
# --------------------------------------------------------------------------------------------
def run_graphopt(mp: onnx.ModelProto, base_dir: Path) -> onnx.ModelProto:
    m = graphopt.from_proto(mp, base_dir=base_dir)
    graphopt.optimize(m)
    return graphopt.to_proto(m)


def run_onnxslim(mp: onnx.ModelProto, base_dir: Path) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(mp)


def run_onnxsim(mp: onnx.ModelProto, base_dir: Path) -> onnx.ModelProto:
    import onnxsim

    out, ok = onnxsim.simplify(mp)
    if not ok:
        raise RuntimeError("onnxsim reports its own check failed")
    return out


RUNNERS: dict[str, Callable[[onnx.ModelProto, Path], onnx.ModelProto]] = {
    "graphopt": run_graphopt, "onnxslim": run_onnxslim, "onnxsim": run_onnxsim,
}


def _err(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _run_outputs(mp: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    s = ort_session(mp, optimize=False)
    names = {i.name for i in s.get_inputs()}
    return [s.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]


#: lossless tolerance: fp32 reassociation noise, |got - ref| <= ATOL + RTOL * max|ref| per output.
#: (ONNX Runtime's own graph optimizations move the PaddleOCR models' outputs by 1.6e-5..3.2e-5
#: on outputs of magnitude 1: the "ORT floor" column measures that per model.)
ATOL, RTOL = 1e-5, 2e-4


def _max_error(ref: list[list[Any]], got: list[list[Any]]) -> tuple[float, str]:
    """Max abs error over every output of every sample, and what is wrong ("" when within
    tolerance). Non-tensor outputs (ZipMap's lists of dicts) must be equal."""
    err = 0.0
    for rs, gs in zip(ref, got, strict=True):
        if len(rs) != len(gs):
            return err, f"{len(gs)} outputs instead of {len(rs)}"
        for k, (r, g) in enumerate(zip(rs, gs, strict=True)):
            if not isinstance(r, np.ndarray):
                if r != g:
                    return err, f"output {k} (not a tensor) differs"
                continue
            if r.shape != g.shape or r.dtype != g.dtype:
                return err, f"output {k} is {g.dtype}{list(g.shape)}, original {r.dtype}{list(r.shape)}"
            if r.dtype.kind not in "fc":
                if not np.array_equal(r, g):
                    return err, f"integer/bool output {k} differs"
                continue
            if not np.array_equal(np.isnan(r), np.isnan(g)):
                return err, f"output {k}: NaNs differ"
            d = np.nan_to_num(np.abs(r.astype(np.float64) - g.astype(np.float64)))
            e = float(d.max(initial=0.0))
            err = max(err, e)
            scale = float(np.nan_to_num(np.abs(r.astype(np.float64))).max(initial=0.0))
            if e > ATOL + RTOL * scale:
                return err, f"output {k}: max abs error {e:.3g} (output magnitude {scale:.3g})"
    return err, ""


def bench_model(name: str, path: Path, repeats: int, n_feeds: int) -> dict[str, Any]:
    mp = onnx.load(str(path))
    feeds, source = eval_feeds(name, mp, n_feeds)
    row: dict[str, Any] = {"model": name, "mb": round(path.stat().st_size / 2**20, 2),
                           "nodes": compute_nodes(mp), "feeds": source, "tools": {}}
    ref = _run_outputs(mp, feeds)
    try:  # the noise floor: ONNX Runtime's own graph optimizations against the model as written
        s = ort_session(mp, optimize=True)
        names = {i.name for i in s.get_inputs()}
        row["ort_floor"], _ = _max_error(ref, [s.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds])
    except Exception:  # noqa: BLE001
        row["ort_floor"] = None
    outs: dict[str, onnx.ModelProto] = {}
    times: dict[str, list[float]] = {t: [] for t in TOOLS}
    for rnd in range(repeats + 1):  # round 0 = warm-up, untimed (timed only with --repeats 0)
        for t in TOOLS:
            rec = row["tools"].setdefault(t, {})
            if "error" in rec:
                continue
            t0 = time.perf_counter()
            try:
                out = RUNNERS[t](mp, path.parent)
            except Exception as e:  # noqa: BLE001 - a tool failing is a result
                rec["error"] = _err(e)
                continue
            dt = time.perf_counter() - t0
            if rnd or repeats == 0:
                times[t].append(dt)
            outs[t] = out
    for t in TOOLS:
        rec = row["tools"][t]
        if "error" in rec:
            rec["ok"] = False
            continue
        out = outs[t]
        rec["seconds"] = statistics.median(times[t])
        rec["seconds_all"] = [round(x, 3) for x in times[t]]
        rec["nodes"] = compute_nodes(out)
        try:
            onnx.checker.check_model(out, full_check=True)
            rec["checker"] = True
        except Exception as e:  # noqa: BLE001
            rec["checker"] = False
            rec["checker_error"] = _err(e)
        try:
            got = _run_outputs(out, feeds)
            err, bad = _max_error(ref, got)
            rec["max_abs"] = err
            rec["ok"] = not bad and rec["checker"]
            if bad:
                rec["error"] = f"mismatch: {bad}"
        except Exception as e:  # noqa: BLE001 - does not load or run: broken output
            rec["ok"] = False
            rec["error"] = "output does not run: " + _err(e)
    return row


CLI = {
    "graphopt": lambda src, dst: [sys.executable, "-m", "graphopt.cli", "optimize", src, "-o", dst],
    "onnxslim": lambda src, dst: [str(Path(sys.executable).parent / "onnxslim"), src, dst],
    "onnxsim": lambda src, dst: [str(Path(sys.executable).parent / "onnxsim"), src, dst],
}


def cli_times(path: Path, repeats: int) -> dict[str, dict[str, Any]]:
    """Each tool's command line in a fresh process (imports, reading and writing the file
    included), ``repeats`` rounds interleaved tool by tool: median wall seconds and median CPU
    seconds (user + system of the child: less sensitive to other work on a shared machine)."""
    import resource
    import subprocess
    import tempfile

    out: dict[str, dict[str, Any]] = {t: {"wall": [], "cpu": []} for t in TOOLS}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(repeats):
            for t in TOOLS:
                if "error" in out[t]:
                    continue
                dst = str(Path(d) / f"{t}.onnx")
                r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                p = subprocess.run(CLI[t](str(path), dst), capture_output=True, text=True)
                wall = time.perf_counter() - t0
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                if p.returncode != 0:
                    out[t]["error"] = (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1][:200]
                    continue
                out[t]["wall"].append(wall)
                out[t]["cpu"].append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
    return {t: ({"error": v["error"]} if "error" in v else
                {"wall": statistics.median(v["wall"]), "cpu": statistics.median(v["cpu"]),
                 "wall_all": [round(x, 2) for x in v["wall"]], "cpu_all": [round(x, 2) for x in v["cpu"]]})
            for t, v in out.items()}


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        "### Lossless default pipeline on the real-model corpus",
        "",
        "Compute nodes (NOTES.md: no Constant / constant-shape ConstantOfShape; If/Loop bodies counted), "
        "tool seconds (median of timed runs after one untimed warm-up, tools interleaved in one process, "
        "proto in -> proto out; noisy shared 2-core machine), max abs error of all outputs vs the original "
        "under ONNX Runtime (no ORT graph optimizations; ORT floor = ORT's own optimizations vs none; a "
        f"result is broken when it does not run, changes a shape or errs by more than {ATOL:g} + {RTOL:g} x the "
        "output's magnitude), checker = onnx full check. FAIL = the tool raised (error below). Calls: `graphopt.optimize` (default pipeline), `onnxslim.slim(m)`, "
        "`onnxsim.simplify(m)` (0.8.x, no input-shape arguments: dynamic dims are accepted as they are).",
        "",
        "| model | MB | nodes | graphopt | onnxslim | onnxsim | s graphopt | s onnxslim | s onnxsim "
        "| max abs err graphopt | onnxslim | onnxsim | ORT floor | checker | <= both |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|",
    ]

    def cell(rec: dict[str, Any], key: str, fmt: str) -> str:
        if "nodes" not in rec:
            return "FAIL"
        v = rec.get(key)
        return "-" if v is None else format(v, fmt)

    for r in rows:
        g, sl, ss = (r["tools"][t] for t in TOOLS)
        peers = [x["nodes"] for x in (sl, ss) if "nodes" in x]
        le = "yes" if "nodes" in g and g.get("ok") and all(g["nodes"] <= p for p in peers) else "NO"
        lines.append(
            f"| {r['model']} | {r['mb']} | {r['nodes']} | {cell(g, 'nodes', 'd')} | {cell(sl, 'nodes', 'd')} "
            f"| {cell(ss, 'nodes', 'd')} | {cell(g, 'seconds', '.2f')} | {cell(sl, 'seconds', '.2f')} "
            f"| {cell(ss, 'seconds', '.2f')} | {cell(g, 'max_abs', '.2g')} | {cell(sl, 'max_abs', '.2g')} "
            f"| {cell(ss, 'max_abs', '.2g')} | {'-' if r.get('ort_floor') is None else format(r['ort_floor'], '.2g')} | "
            f"{'ok' if g.get('checker') else 'NO'} | {le} |"
        )
    big = [r for r in rows if "cli" in r]
    if big:
        lines += ["", "Command-line tool time (fresh process per run: imports, reading and writing the file "
                  "included; median of interleaved runs; CPU = user+system seconds of the process, less "
                  "sensitive to the other work on this shared machine than wall time). Commands: "
                  "`graphopt optimize IN -o OUT`, `onnxslim IN OUT`, `onnxsim IN OUT`.", "",
                  "| model | MB | wall graphopt | wall onnxslim | wall onnxsim | CPU graphopt | CPU onnxslim "
                  "| CPU onnxsim | graphopt/onnxslim (CPU) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in big:
            c = r["cli"]

            def f(t: str, k: str) -> str:
                return f"{c[t][k]:.2f}" if k in c[t] else "FAIL"

            ratio = (f"{c['graphopt']['cpu'] / c['onnxslim']['cpu']:.2f}"
                     if "cpu" in c["graphopt"] and "cpu" in c["onnxslim"] else "-")
            lines.append(f"| {r['model']} | {r['mb']} | {f('graphopt', 'wall')} | {f('onnxslim', 'wall')} | "
                         f"{f('onnxsim', 'wall')} | {f('graphopt', 'cpu')} | {f('onnxslim', 'cpu')} | "
                         f"{f('onnxsim', 'cpu')} | {ratio} |")
    notes = []
    for r in rows:
        for t, v in r.get("cli", {}).items():
            if "error" in v:
                notes.append(f"- {r['model']} / {t} command line: {v['error']}")
        for t in TOOLS:
            rec = r["tools"][t]
            if rec.get("error"):
                notes.append(f"- {r['model']} / {t}: {rec['error']}")
            if rec.get("checker_error"):
                notes.append(f"- {r['model']} / {t} checker: {rec['checker_error']}")
    if notes:
        lines += ["", "Failures and notes:", ""] + notes
    sources = sorted({r["feeds"] for r in rows})
    lines += ["", f"Inputs: {', '.join(sources)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.corpus import ENTRIES, fetch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma list of corpus model names")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per tool (median reported)")
    ap.add_argument("--feeds", type=int, default=2, help="input samples per model for the error check")
    ap.add_argument("--cli-min-mb", type=float, default=10.0,
                    help="also time the command-line tools (fresh processes) on models at least this big")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or [e.name for e in ENTRIES]
    paths = fetch(names)
    OUT.mkdir(exist_ok=True)
    jpath = OUT / "lossless_corpus.json"
    old = {r["model"]: r for r in json.loads(jpath.read_text())} if jpath.exists() and args.only else {}
    for name in progress(names, desc="lossless corpus", unit="model"):
        row = bench_model(name, Path(paths[name]), args.repeats, args.feeds)
        if row["mb"] >= args.cli_min_mb:
            row["cli"] = cli_times(Path(paths[name]), max(args.repeats, 1))
        old[name] = row
        g = row["tools"]
        print(f"{name:22s} {row['nodes']:5d} -> " + "  ".join(
            f"{t}={g[t].get('nodes', 'FAIL')}/{g[t].get('seconds', float('nan')):.2f}s" for t in TOOLS)
            + f"  err={g['graphopt'].get('max_abs')}", flush=True)
    order = [e.name for e in ENTRIES]
    rows = sorted(old.values(), key=lambda r: order.index(r["model"]) if r["model"] in order else 99)
    jpath.write_text(json.dumps(rows, indent=1) + "\n")
    text = report(rows)
    (OUT / "lossless_corpus.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
