"""ONNX Runtime vs TVM builds from graphopt, side by side, one run (CPU, batch 1).

(Named tvm_compile.py, not tvm.py: a script named tvm.py shadows the ``tvm`` package for every
script run from this folder.)

Columns per model: ONNX Runtime (ENABLE_ALL, 2 threads) latency; TVM untuned (TVM's own
unscheduled kernels, ``--naive``); graphopt's default schedules (no tuning); MetaSchedule-tuned
builds at the given budgets (graphopt defaults are the baseline records, so a tuned build is never
worse than the untuned one as the tuner measures it); tuning time; achieved GFLOP/s, also as a
fraction of the machine's measured single-precision peak (numpy's SGEMM on a large matrix, all
cores: a practical peak, below the data sheet's). All latencies are medians of interleaved
rounds (each round runs every build once), so compare ratios.

Run (needs the tvm extra):
  python benchmarks/tvm_compile.py                                   # defaults + naive, all models
  python benchmarks/tvm_compile.py --tune digits_cnn:3 --tune squeezenet:15   # + tuned builds (minutes)
Writes benchmarks/results/tvm.json and tvm.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import graphopt
from graphopt.analysis import infer_shapes, model_stats
from graphopt.backend import compile as tvm_compile
from graphopt.runtime import interleaved_timings, ort_session
from graphopt.testing import randomize_weights

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def models() -> dict[str, tuple[graphopt.Model, dict[str, list[int]] | None]]:
    from helpers import light_models

    out = {"digits_cnn": (graphopt.load(Path(graphopt.__file__).parent / "data" / "tinycnn.onnx"),
                          {"input": [1, 1, 8, 8]})}
    for name in ("squeezenet", "shufflenet", "resnet50"):
        m = randomize_weights(graphopt.load(next(p for p in light_models() if name in str(p))))
        graphopt.optimize(m)
        out[name] = (m, None)
    return out


def sgemm_peak(n: int = 2048, reps: int = 5) -> float:
    """Measured single-precision GFLOP/s of numpy's matmul (the BLAS numpy ships with)."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--tune", action="append", default=[], metavar="MODEL:MINUTES")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--cache", default=None, help="tuning cache (default: a fresh temporary one)")
    ap.add_argument("--out", default="tvm", help="results/<out>.json and .md (default: tvm)")
    args = ap.parse_args()
    budgets: dict[str, float] = {}
    for spec in args.tune:
        name, _, minutes = spec.partition(":")
        budgets[name] = float(minutes)
    peak = sgemm_peak()
    print(f"machine SGEMM peak (numpy, all cores): {peak:.0f} GFLOP/s")
    cache = args.cache or tempfile.mkdtemp(prefix="graphopt-tvm-bench-")
    rows = []
    for name, (m, shapes) in models().items():
        if args.models and name not in args.models:
            continue
        flops = model_stats(infer_shapes(m.copy(), shapes or {})).flops
        builds: dict[str, object] = {}
        info: dict[str, object] = {"model": name, "gflop": flops / 1e9}
        t = time.perf_counter()
        builds["graphopt"] = tvm_compile(m, "host", input_shapes=shapes, progress=False, cache_dir=cache)
        info["compile_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()  # the same compile again: the build cache
        again = tvm_compile(m, "host", input_shapes=shapes, progress=False, cache_dir=cache)
        info["recompile_s"] = round(time.perf_counter() - t, 1)
        info["recompile_cached"] = again.info.from_build_cache
        if not args.no_naive:
            builds["naive"] = tvm_compile(m, "host", input_shapes=shapes, default_schedules=False, progress=False,
                                          cache_dir=cache)
        if name in budgets:
            t = time.perf_counter()
            tuned = tvm_compile(m, "host", input_shapes=shapes, minutes=budgets[name], cache_dir=cache)
            builds["tuned"] = tuned
            info["tune_minutes"] = budgets[name]
            info["tune_s"] = round(time.perf_counter() - t, 1)
            info["tuned_tasks"] = f"{len(tuned.info.tuning.get('tuned', []))}/{tuned.info.tuning.get('tasks')}"
            t = time.perf_counter()
            again = tvm_compile(m, "host", input_shapes=shapes, minutes=budgets[name], cache_dir=cache, progress=False)
            info["tuned_recompile_s"] = round(time.perf_counter() - t, 1)
            info["tuned_recompile_cached"] = again.info.from_build_cache
        cm = builds["graphopt"]
        feed = {i.name: np.random.default_rng(0).standard_normal(i.shape).astype(i.dtype) for i in cm.inputs}
        sess = ort_session(m, optimize=True, threads=2)
        ref = sess.run(None, feed)[0]
        fns = {"ort": lambda sess=sess, feed=feed: sess.run(None, feed)}
        for k, b in builds.items():
            got = b.run(feed)[0]
            info[f"{k}_max_rel_err"] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
            fn, fargs = b.vm()["main"], b._arguments(feed)
            fns[k] = lambda f=fn, a=fargs: f(*a)
        rounds = args.rounds if args.no_naive else max(3, args.rounds // 4) if flops > 1e9 else args.rounds
        med = interleaved_timings(fns, rounds)
        for k, v in med.items():
            info[f"{k}_ms"] = round(v, 3)
            if k != "ort":
                info[f"{k}_vs_ort"] = round(v / med["ort"], 2)
        best = min(v for k, v in med.items() if k not in ("naive", "ort"))
        info["best_gflops"] = round(flops / (best / 1e3) / 1e9, 1)
        info["ort_gflops"] = round(flops / (med["ort"] / 1e3) / 1e9, 1)
        info["graphopt_pct_peak"] = round(100 * flops / (med["graphopt"] / 1e3) / 1e9 / peak, 1)
        rows.append(info)
        print(json.dumps(info))
    out = {"peak_gflops": round(peak, 1), "rows": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{args.out}.json").write_text(json.dumps(out, indent=1))
    lines = ["| model | GFLOP | ORT ms | TVM untuned (naive) | graphopt defaults | tuned (budget) | "
             "tuning time | GFLOP/s graphopt (% of peak) | GFLOP/s ORT | compile / again (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tuned = f"{r['tuned_ms']} ms = **{r['tuned_vs_ort']}x** ({r['tune_minutes']} min, {r['tuned_tasks']} tasks)" \
            if "tuned_ms" in r else "-"
        naive = f"{r['naive_ms']} ms = {r['naive_vs_ort']}x" if "naive_ms" in r else "-"
        g_gflops = round(r["gflop"] / (r["graphopt_ms"] / 1e3), 1)
        lines.append(f"| {r['model']} | {r['gflop']:.2f} | {r['ort_ms']} | {naive} | {r['graphopt_ms']} ms = "
                     f"**{r['graphopt_vs_ort']}x** | {tuned} | {r.get('tune_s', '-')} s | {g_gflops} "
                     f"({r['graphopt_pct_peak']}%) | {r['ort_gflops']} | {r['compile_s']} / {r['recompile_s']} "
                     f"{'(cached build)' if r['recompile_cached'] else ''} |")
    table = "\n".join(lines)
    (HERE / "results" / f"{args.out}.md").write_text(f"SGEMM peak {peak:.0f} GFLOP/s\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
