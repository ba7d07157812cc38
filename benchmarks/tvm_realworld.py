"""graphopt's TVM builds of the real-model corpus against ONNX Runtime: compile, equal, speed, kernels.

Per corpus model (``benchmarks.corpus``), on realistic inputs (``benchmarks/corpus/data.py``):

- **compile**: ``graphopt.compile`` for this CPU, untuned (graphopt's default schedules), no build
  cache; the one-line refusal when graphopt refuses the model. Scalar inputs (silero's sample
  rate ``sr``) are pinned with ``const_inputs`` as the CLI's refusal tells a user to.
- **equal**: the build's outputs against ONNX Runtime's on every eval sample, with graphopt's
  lossless check (``graphopt.runtime.compare``, rtol 1e-4 elementwise or 3e-4 of the output's
  range); the worst error relative to the range is kept.
- **latency**: fair interleaved timing. Each round times one ORT run and one TVM run in
  alternating order; before its timed run each side runs untimed for ``--settle`` seconds so
  the other runtime's spinning worker threads have parked. The ratio is the median of the
  per-round ratios TVM/ORT; the spread is half the interquartile range of those ratios. ORT:
  ENABLE_ALL, 2 intra-op threads (this machine's cores).
- **kernels**: how many kernels kept naive loops (``CompileInfo.naive_kernels``: no parallel,
  vectorized or unrolled loop in a nest of >= 64 iterations, read from the scheduled TIR), the
  rules that scheduled the others, and the heaviest kernels of one run (timed through the Relax
  VM's instrument hook, with the rule that scheduled each).
- **compile time**: seconds of ``graphopt.compile`` (prepare, import+lower, schedule+build).

Each model runs in its own subprocess with a time limit (a model over it is reported as
skipped, with the limit). Results merge into the existing JSON by model unless ``--fresh``.

Run:  python -m benchmarks.tvm_realworld [--models a,b] [--timeout 300] [--rounds 15] [--fresh]
Writes benchmarks/results/tvm_realworld.json and tvm_realworld.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.runtime import interleaved_round_times, ort_bound_call

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parent


# ---------------------------------------------------------------------------------------------
# one model (runs in a subprocess)
# ---------------------------------------------------------------------------------------------

def _feeds(name: str, n: int) -> list[dict[str, np.ndarray]]:
    from benchmarks.corpus import data

    return data.task(name).eval_feeds(n)


def _model_inputs(path: Path) -> list[str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits]


def _conform(feed: dict[str, np.ndarray], like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feed`` with each array zero-padded (or cropped) at the end of each axis to the shape of
    ``like``'s: a build has static shapes, and text-line samples differ in width (PaddleOCR pads a
    batch's lines with zeros to one width the same way)."""
    out = {}
    for k, a in feed.items():
        want = like[k].shape
        if a.shape != want and a.ndim == len(want):
            a = a[tuple(slice(0, w) for w in want)]
            a = np.pad(a, [(0, w - d) for d, w in zip(a.shape, want, strict=True)])
        out[k] = a
    return out


def corpus_feeds(name: str, n_eval: int) -> tuple[Path, list[dict[str, np.ndarray]], dict[str, np.ndarray],
                                                  dict[str, list[int]]]:
    """Corpus model ``name`` (fetched) with ``n_eval`` realistic feeds shaped alike, its scalar
    inputs and the input shapes to compile for: ``(path, feeds, const, shapes)``.

    A build pins scalar inputs (silero's sample rate) to the first sample's value, so only the
    samples that feed that value are kept (silero's eval set mixes 16 kHz and 8 kHz windows)."""
    from benchmarks.corpus import fetch, model_path

    fetch([name])
    path = model_path(name)
    ins = _model_inputs(path)
    feeds = [{k: v for k, v in f.items() if k in ins} for f in _feeds(name, 4 * n_eval)]
    const = {k: v for k, v in feeds[0].items() if np.ndim(v) == 0}
    feeds = [f for f in feeds if all(np.array_equal(f[k], v) for k, v in const.items())][:n_eval]
    feeds = [_conform(f, feeds[0]) for f in feeds]
    shapes = {k: list(v.shape) for k, v in feeds[0].items() if k not in const}
    return path, feeds, const, shapes


def paired_timing(fns: dict[str, Any], rounds: int, settle_s: float) -> dict[str, Any]:
    """Interleaved, settled timing of two callables ``{"ort": f, "tvm": g}``: per-round times
    (order alternating every round), the medians, and the median and half-IQR of the per-round
    ratio tvm/ort."""
    times = interleaved_round_times(fns, rounds, settle_s, order="alternate")
    ratios = np.array(times["tvm"]) / np.array(times["ort"])
    q1, q3 = np.percentile(ratios, [25, 75])
    return {"ort_ms": float(np.median(times["ort"]) * 1e3), "tvm_ms": float(np.median(times["tvm"]) * 1e3),
            "ratio": float(np.median(ratios)), "spread": float((q3 - q1) / 2), "rounds": rounds}


def kernel_profile(cm: Any, feed: dict[str, np.ndarray], runs: int = 3, top: int = 5) -> list[dict[str, Any]]:
    """The ``top`` heaviest calls of one run (ms, averaged over ``runs``), with the rule that
    scheduled each kernel; timed through the Relax VM's instrument hook (a few microseconds of
    Python per call are included).

    The profile runs on a VM of its own, so the timed VM never carries an instrument: a no-op one
    left set still calls into Python around every call (about 5 us each; it once made the
    1-thread TVM times of the small models, timed after the profile, 2-4x too slow)."""
    from tvm import relax

    vm = relax.VirtualMachine(cm.module, cm._device())
    args = cm._arguments(feed)
    acc: dict[str, float] = Counter()
    start: dict[str, float] = {}

    def instrument(func: Any, sym: str, before: bool, ret: Any, *a: Any) -> int:
        if before:
            start[sym] = time.perf_counter()
        else:
            acc[sym] += time.perf_counter() - start.pop(sym, time.perf_counter())
        return 0

    vm["main"](*args)
    vm.set_instrument(instrument)
    for _ in range(runs):
        vm["main"](*args)
    total = sum(acc.values()) or 1.0
    rows = sorted(acc.items(), key=lambda kv: -kv[1])[:top]
    return [{"kernel": k, "ms": v / runs * 1e3, "share": v / total,
             "rule": cm.info.schedules.get(k, cm.info.schedules.get(k.removesuffix("_prepacked"), "vm" if k.startswith("vm.") else "?"))}
            for k, v in rows]


def run_one(name: str, rounds: int, settle_s: float, n_eval: int, fast_math: bool = True) -> dict[str, Any]:
    import graphopt
    from graphopt.backend import compile as tvm_compile
    from graphopt.errors import GraphoptError
    from graphopt.runtime import compare, ort_session

    res: dict[str, Any] = {"model": name}
    path, feeds, const, shapes = corpus_feeds(name, n_eval)
    res["inputs"] = {k: list(v.shape) for k, v in feeds[0].items()}
    res["const_inputs"] = {k: np.asarray(v).tolist() for k, v in const.items()}
    t0 = time.perf_counter()
    try:
        cm = tvm_compile(str(path), input_shapes=shapes, const_inputs=const or None, build_cache=False,
                         progress=False, fast_math=fast_math)
    except GraphoptError as exc:
        res.update(compile="refused", error=str(exc).splitlines()[0], compile_s=time.perf_counter() - t0)
        return res
    res["compile_s"] = time.perf_counter() - t0
    res["compile"] = "ok"
    res["times"] = cm.info.times
    res["layout"] = cm.info.layout
    res["rules"] = dict(Counter(cm.info.schedules.values()))
    res["kernels"] = len(cm.info.schedules)
    res["naive_kernels"] = list(cm.info.naive_kernels)
    res["fallback_kernels"] = sorted(k for k, v in cm.info.schedules.items() if v in ("fallback", "naive"))
    # outputs against ORT on every eval sample
    sess = ort_session(str(path), optimize=True, threads=2)
    out_names = [o.name for o in sess.get_outputs()]
    worst, ok, problems = 0.0, True, []
    for f in feeds:
        ref = dict(zip(out_names, sess.run(None, f), strict=True))
        got = dict(zip(out_names, cm.run(f), strict=True))
        c = compare(ref, got)
        ok &= c.ok
        problems += c.problems[:1]
        for k in out_names:
            a = np.asarray(ref[k], np.float64)
            b = np.asarray(got[k], np.float64)
            if a.shape == b.shape and a.size:
                worst = max(worst, float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-12)))
    res["equal"] = bool(ok)
    res["max_err_of_range"] = worst
    res["samples"] = len(feeds)
    if problems:
        res["problems"] = problems[:2]
    feed = feeds[0]
    tvm_args = cm._arguments({k: v for k, v in feed.items() if k not in const})
    vm = cm.vm()["main"]
    res["timing"] = paired_timing({"ort": ort_bound_call(sess, feed), "tvm": lambda: vm(*tvm_args)}, rounds,
                                  settle_s)
    res["top_kernels"] = kernel_profile(cm, {k: v for k, v in feed.items() if k not in const})
    # one thread each: on a loaded machine a parallel kernel waits for its slowest worker (TVM
    # splits parallel loops statically; a descheduled worker holds up every parallel kernel,
    # while ORT's calling thread takes over unclaimed work), so this column shows the kernels'
    # quality with that effect removed
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, 1)
    sess1 = ort_session(str(path), optimize=True, threads=1)
    res["timing_1t"] = paired_timing({"ort": ort_bound_call(sess1, feed), "tvm": lambda: vm(*tvm_args)}, rounds,
                                     settle_s)
    del graphopt
    return res


def ab_one(name: str, rounds: int, settle_s: float, n_eval: int) -> dict[str, Any]:
    """The fast-math build against the exact one (``fast_math=False``) of the same model, both
    TVM, 1 thread, timed interleaved and settled like :func:`paired_timing` (ratio fast/exact),
    each build's outputs checked against ONNX Runtime's. A run of a single sitting: the two
    builds see the same machine load, which comparing two table runs taken at different times
    does not give."""
    import tvm

    from graphopt.backend import compile as tvm_compile
    from graphopt.errors import GraphoptError
    from graphopt.runtime import compare, ort_session

    path, feeds, const, shapes = corpus_feeds(name, n_eval)
    res: dict[str, Any] = {"model": name}
    builds = {}
    try:
        for label, fm in (("exact", False), ("fast", True)):
            builds[label] = tvm_compile(str(path), input_shapes=shapes, const_inputs=const or None, build_cache=False,
                                        progress=False, fast_math=fm)
    except GraphoptError as exc:
        res.update(compile="refused", error=str(exc).splitlines()[0])
        return res
    res["compile"] = "ok"
    sess = ort_session(str(path), optimize=True, threads=1)
    out_names = [o.name for o in sess.get_outputs()]
    for label, cm in builds.items():
        worst, ok = 0.0, True
        for f in feeds:
            ref = dict(zip(out_names, sess.run(None, f), strict=True))
            got = dict(zip(out_names, cm.run(f), strict=True))
            ok &= compare(ref, got).ok
            for k in out_names:
                a, b = np.asarray(ref[k], np.float64), np.asarray(got[k], np.float64)
                if a.shape == b.shape and a.size:
                    worst = max(worst, float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-12)))
        res[f"equal_{label}"], res[f"err_{label}"] = bool(ok), worst
    res["fast_kernels"] = sorted(k for k in builds["fast"].info.schedules if "fast_" in k)
    tvm.get_global_func("runtime.config_threadpool")(1, 1)
    feed = {k: v for k, v in feeds[0].items() if k not in const}
    calls = {}
    for label, cm in builds.items():
        a, vm = cm._arguments(feed), cm.vm()["main"]
        calls[label] = lambda vm=vm, a=a: vm(*a)
    t = paired_timing({"ort": calls["exact"], "tvm": calls["fast"]}, rounds, settle_s)
    res["ab_1t"] = {"exact_ms": t["ort_ms"], "fast_ms": t["tvm_ms"], "ratio": t["ratio"], "spread": t["spread"],
                    "rounds": rounds}
    return res


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------

def _run_subprocess(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="graphopt-tvmrw-") as d:
        out = Path(d) / "r.json"
        cmd = [sys.executable, "-m", "benchmarks.tvm_realworld", "--one", name, "--json-out", str(out),
               "--rounds", str(args.rounds), "--settle", str(args.settle), "--samples", str(args.samples)] + \
            ([] if args.fast_math else ["--no-fast-math"]) + (["--ab"] if args.ab else [])
        t0 = time.perf_counter()
        limit = int(args.cpu_limit)

        def cpu_limit() -> None:  # CPU seconds, not wall: on a shared machine wall time says little
            import resource

            resource.setrlimit(resource.RLIMIT_CPU, (limit, limit + 5))

        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout, check=False,
                               env={**os.environ, "GRAPHOPT_NO_BUILD_CACHE": "1"}, preexec_fn=cpu_limit)
        except subprocess.TimeoutExpired:
            return {"model": name, "compile": "skipped", "error": f"over the {args.timeout:.0f} s wall-clock limit per "
                    "model (compile, checks and timing together)", "wall_s": time.perf_counter() - t0}
        if p.returncode in (-24, -9) and not out.exists():  # SIGXCPU / SIGKILL from the CPU limit
            return {"model": name, "compile": "skipped", "error": f"over the {limit} CPU-second limit per model "
                    "(compile, checks and timing together)", "wall_s": time.perf_counter() - t0}
        if p.returncode != 0 or not out.exists():
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["(no output)"]
            return {"model": name, "compile": "failure", "error": tail[0][:300], "wall_s": time.perf_counter() - t0}
        r = json.loads(out.read_text())
        r["wall_s"] = time.perf_counter() - t0
        return r


def _fmt_ratio(t: dict[str, Any]) -> str:
    return f"{t['ratio']:.2f}x ±{t['spread']:.2f}"


def write_markdown(res: dict[str, Any], path: Path) -> None:
    rows = [res["models"].get(k, {"model": k, "compile": "not run", "error": "(the run was stopped before it)"})
            for k in res["order"]]
    ok = [r for r in rows if r.get("compile") == "ok"]
    ratios = [r["timing"]["ratio"] for r in ok if "timing" in r]
    geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if ratios else float("nan")
    r1 = [r["timing_1t"]["ratio"] for r in ok if "timing_1t" in r]
    geo1 = math.exp(sum(math.log(x) for x in r1) / len(r1)) if r1 else float("nan")
    lines = [
        "# graphopt's TVM builds of the real-model corpus vs ONNX Runtime (CPU, untuned)",
        "",
        (f"Generated {res['generated']}, `python -m benchmarks.tvm_realworld` ({res.get('command', '')}). "
        f"Machine: {res.get('machine', '')}, shared with other work while this ran (load average "
        f"{res.get('load_before', [0])[0]:.0f} before, {res.get('load_after', [0])[0]:.0f} after), so latencies are noisy: "
        "compare the ratios and their spread (half the IQR of the per-round ratios, rounds interleaved and "
         f"alternating, each side settled {res.get('settle_s', 0.15) * 1e3:.0f} ms before its timed run)."),
        "",
        ("equal = outputs of every eval sample within graphopt's lossless check of ONNX Runtime's (rtol 1e-4 "
        "elementwise, or 3e-4 of the output's range); err = worst |TVM - ORT| / max|ORT|. naive = kernels with no "
        "parallel, vectorized or unrolled loop in a nest of >= 64 iterations (read from the scheduled TIR); "
         "fallback = kernels only the fallback rule took (outer loops parallel, inner loops plain)."),
        "",
        ("| model | compile | equal (err) | ORT ms | TVM ms | TVM/ORT 2 threads | TVM/ORT 1 thread | naive | fallback | "
         "kernels (rules) | compile s | heaviest kernel |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["model"]
        if r.get("compile") != "ok":
            lines.append(f"| {name} | {r.get('compile')}: {r.get('error', '')[:160]} | | | | | | | | | "
                         f"{r.get('compile_s', r.get('wall_s', 0)):.0f} | |")
            continue
        t = r.get("timing", {})
        rules = ", ".join(f"{k} {v}" for k, v in sorted(r.get("rules", {}).items(), key=lambda kv: -kv[1]))
        top = r.get("top_kernels") or [{}]
        top0 = next((k for k in top if k.get("rule") != "vm"), top[0])
        heavy = f"{top0.get('kernel', '')[:48]} ({top0.get('rule', '')}, {100 * top0.get('share', 0):.0f}%)"
        eq = f"{'yes' if r.get('equal') else 'NO'} ({r.get('max_err_of_range', 0):.1e})"
        lines.append(f"| {name} | ok | {eq} | {t.get('ort_ms', 0):.3f} | {t.get('tvm_ms', 0):.3f} | "
                     f"{_fmt_ratio(t) if t else ''} | {_fmt_ratio(r['timing_1t']) if r.get('timing_1t') else ''} | "
                     f"{len(r.get('naive_kernels', []))} | "
                     f"{len(r.get('fallback_kernels', []))} | {r.get('kernels', 0)} ({rules}) | "
                     f"{r.get('compile_s', 0):.0f} | {heavy} |")
    n_ok = len(ok)
    n_not = sum(1 for r in rows if r.get("compile") == "not run")
    rows = [r for r in rows if r.get("compile") != "not run"]
    within = sum(1 for x in ratios if x <= 1.5)
    naive = sum(len(r.get("naive_kernels", [])) for r in ok)
    lines += [
        "",
        (f"Compiled: {n_ok} of {len(rows)} models run ({n_not} not run). Equal to ORT: {sum(1 for r in ok if r.get('equal'))} of {n_ok}. "
         f"Untuned TVM/ORT, 2 threads: geomean {geo:.2f}x over {len(ratios)} models, {within} of {len(ratios)} at or "
         f"under 1.5x; 1 thread: geomean {geo1:.2f}x over {len(r1)} models, "
         f"{sum(1 for x in r1 if x <= 1.5)} at or under 1.5x. "
         f"Naive kernels in all builds: {naive}."),
    ]
    notes = res.get("notes") or []
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    path.write_text("\n".join(lines) + "\n")


def write_ab_markdown(res: dict[str, Any], path: Path) -> None:
    """The ``--ab`` table: fast-math build / exact build per model (1 thread, one sitting)."""
    rows = [res["models"][k] for k in res["order"] if k in res["models"]]
    lines = [
        "# graphopt's TVM builds: fast_math (the default) against the exact build (fast_math=False)",
        "",
        (f"Generated {res['generated']}, `python -m benchmarks.tvm_realworld --ab` ({res.get('command', '')}). "
         f"Machine: {res.get('machine', '')}, shared with other work while this ran (load average "
         f"{res.get('load_before', [0])[0]:.0f} before, {res.get('load_after', [0])[0]:.0f} after). Both builds "
         "of a model are compiled in one process and timed interleaved with 1 thread (alternating order, each "
         "settled first); ratio = median of the per-round ratios fast/exact, ± half their IQR. equal = every eval "
         "sample within graphopt's lossless check of ONNX Runtime's outputs; err = worst |TVM - ORT| / max|ORT|."),
        "",
        "| model | equal exact (err) | equal fast (err) | exact ms | fast ms | fast/exact 1 thread | fast-math kernels |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("compile") != "ok":
            lines.append(f"| {r['model']} | {r.get('compile')}: {r.get('error', '')[:120]} | | | | | |")
            continue
        t = r["ab_1t"]
        lines.append(f"| {r['model']} | {'yes' if r['equal_exact'] else 'NO'} ({r['err_exact']:.1e}) | "
                     f"{'yes' if r['equal_fast'] else 'NO'} ({r['err_fast']:.1e}) | {t['exact_ms']:.3f} | "
                     f"{t['fast_ms']:.3f} | {_fmt_ratio(t)} | {len(r.get('fast_kernels', []))} |")
    notes = res.get("notes") or []
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma list (default: the whole corpus)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="wall-clock seconds per model, all steps")
    ap.add_argument("--cpu-limit", type=float, default=180.0, help="CPU seconds per model, all steps (a model over "
                    "it is reported as skipped)")
    ap.add_argument("--jobs", type=int, default=1, help="models run at once (each in its own process)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--settle", type=float, default=0.15)
    ap.add_argument("--samples", type=int, default=3, help="eval samples checked against ORT")
    ap.add_argument("--fresh", action="store_true", help="drop earlier results instead of merging")
    ap.add_argument("--fast-math", action=argparse.BooleanOptionalAction, default=True,
                    help="build with fast_math (graphopt's default: vectorized exp/erf/tanh/softmax/sigmoid "
                    "polynomials); --no-fast-math builds the exact calls (write to another --out)")
    ap.add_argument("--ab", action="store_true", help="per model, the fast-math build against the exact one "
                    "(both TVM, 1 thread, interleaved in one sitting: ratio fast/exact) instead of the ORT table; "
                    "writes results/OUT.json/.md (give --out)")
    ap.add_argument("--out", default="tvm_realworld")
    ap.add_argument("--merge", metavar="NAME", help="merge results/NAME.json (a run with another --out) into the "
                    "results and rewrite the markdown; runs nothing")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        import logging

        logging.basicConfig(level=logging.WARNING)
        r = ab_one(args.one, args.rounds, args.settle, args.samples) if args.ab else \
            run_one(args.one, args.rounds, args.settle, args.samples, fast_math=args.fast_math)
        Path(args.json_out).write_text(json.dumps(r, indent=1, default=str))
        return 0
    from benchmarks.corpus import ENTRIES

    if args.merge:
        jpath = RESULTS / f"{args.out}.json"
        res = json.loads(jpath.read_text())
        other = json.loads((RESULTS / f"{args.merge}.json").read_text())
        res["models"].update(other["models"])
        res.setdefault("notes", []).append(f"{', '.join(sorted(other['models']))}: run {other.get('generated', '')} "
                                           f"({other.get('command', '')}; load average "
                                           f"{other.get('load_before', [0])[0]:.0f}/{other.get('load_after', [0])[0]:.0f})")
        jpath.write_text(json.dumps(res, indent=1, default=str))
        write_markdown(res, RESULTS / f"{args.out}.md")
        return 0
    names = [e.name for e in ENTRIES]
    if args.models:
        want = args.models.split(",")
        unknown = sorted(set(want) - set(names))
        if unknown:
            ap.error(f"unknown models {unknown}")
        names = [n for n in names if n in want]
    # smallest models first: a run cut short still covers the most models
    from benchmarks.corpus import model_path

    names.sort(key=lambda n: model_path(n).stat().st_size if model_path(n).exists() else 0)
    RESULTS.mkdir(exist_ok=True)
    jpath = RESULTS / f"{args.out}.json"
    res: dict[str, Any] = {"models": {}}
    if jpath.exists() and not args.fresh:
        res = json.loads(jpath.read_text())
    import platform

    from tqdm import tqdm

    res["order"] = [e.name for e in ENTRIES]
    res["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    res["settle_s"] = args.settle
    res["command"] = " ".join(["--models " + args.models] if args.models else []) + \
        f" --cpu-limit {args.cpu_limit:g} --jobs {args.jobs} --rounds {args.rounds} --samples {args.samples}" + \
        ("" if args.fast_math else " --no-fast-math") + (" --ab" if args.ab else "")
    res["load_before"] = os.getloadavg()
    from concurrent.futures import ThreadPoolExecutor, as_completed

    bar = tqdm(total=len(names), desc="tvm corpus", unit="model")
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(_run_subprocess, name, args): name for name in names}
        for fut in as_completed(futures):
            name = futures[fut]
            r = fut.result()
            r["ran"] = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
            res["models"][name] = r
            jpath.write_text(json.dumps(res, indent=1, default=str))
            t = r.get("timing", r.get("ab_1t", {}))
            bar.update()
            tqdm.write(f"{name}: {r.get('compile')} {r.get('error', '')[:100]} "
                       f"{_fmt_ratio(t) if t else ''} naive {len(r.get('naive_kernels', []))} "
                       f"compile {r.get('compile_s', 0):.0f} s")
    bar.close()
    res["generated"] = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    res["load_after"] = os.getloadavg()
    jpath.write_text(json.dumps(res, indent=1, default=str))
    (write_ab_markdown if args.ab else write_markdown)(res, RESULTS / f"{args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
