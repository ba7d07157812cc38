"""ONNX Runtime vs TVM builds from graphopt, side by side, one run (CPU, batch 1).

(Named tvm_compile.py, not tvm.py: a script named tvm.py shadows the ``tvm`` package for every
script run from this folder.)

Columns per model: ONNX Runtime (ENABLE_ALL) latency; TVM untuned (TVM's own unscheduled
kernels, ``--naive``); graphopt's default schedules (no tuning); MetaSchedule-tuned builds at the
given budgets (graphopt defaults are the baseline records, so a tuned build is never worse than the
untuned one as the tuner measures it); tuning time; achieved GFLOP/s, also as a fraction of the
machine's measured single-precision peak (numpy's SGEMM on a large matrix, all cores: a practical
peak, below the data sheet's).

Timing: every side is called the same way, with its inputs converted once outside the loop (ORT
through IO binding, ``tvm_realworld.ort_bound_call``; TVM on its pre-converted tensors), on a real
photo (scikit-learn's china.jpg, resized and ImageNet-normalized; the digits net gets a real digit).
Rounds are interleaved and settled (each side runs untimed ``--settle`` s before its timed call,
so the other runtime's spinning threads have parked), starting one side later each round; a
ratio is the median of the per-round ratios build/ORT, with half their IQR as the spread. Two
tables: 2 threads (ORT intra-op 2, TVM's default pool) and 1 thread (ORT intra-op 1, TVM's pool
set to 1 worker). On a loaded shared machine the 1-thread one is the one to read: a parallel
kernel waits for its slowest worker, which a busy core holds up, and the two runtimes suffer from
that differently. The untuned builds use an empty tuning cache, so records tuned for another
model never leak into them.

Run (needs the tvm extra):
  python -m benchmarks.tvm_compile                                   # defaults + naive, all models
  python -m benchmarks.tvm_compile --models squeezenet shufflenet --no-naive \
      --tune squeezenet:30 --tune shufflenet:30 --cache DIR --out tvm_tuned_s4   # + tuned builds (minutes)
Writes benchmarks/results/<out>.json and <out>.md (default tvm). With ``--cache DIR`` a rerun
reapplies the tuning records in seconds (re-timing without tuning again).
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
from graphopt.runtime import interleaved_round_times, ort_session
from graphopt.testing import randomize_weights

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))  # benchmarks.* when run as a script

from benchmarks.tvm_realworld import ort_bound_call


def models(only: list[str] | None = None) -> dict[str, tuple[graphopt.Model, dict[str, list[int]] | None]]:
    from helpers import light_models

    out = {}
    if not only or "digits_cnn" in only:
        out["digits_cnn"] = (graphopt.load(Path(graphopt.__file__).parent / "data" / "tinycnn.onnx"),
                             {"input": [1, 1, 8, 8]})
    for name in ("squeezenet", "shufflenet", "resnet50"):
        if only and name not in only:
            continue
        m = randomize_weights(graphopt.load(next(p for p in light_models() if name in str(p))))
        graphopt.optimize(m)
        out[name] = (m, None)
    return out


def realistic_feed(name: str, inputs: list) -> dict[str, np.ndarray]:  # type: ignore[type-arg]
    """A natural input per model: scikit-learn's china.jpg center-cropped, resized to the input's
    size and ImageNet-normalized (RGB, CHW) for the image nets; a real 8x8 digit (graphopt's
    example calibration set) for the digits net."""
    from benchmarks.corpus.data import _norm_imagenet, _resize, _sample_photos

    feed = {}
    for i in inputs:
        shape = tuple(i.shape)
        if name == "digits_cnn":
            x = np.load(Path(graphopt.__file__).parent / "data" / "example_calibration.npz")["input"][:1]
        else:
            img = _sample_photos()[0]
            h, w = img.shape[:2]
            side = min(h, w)
            img = img[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
            x = _norm_imagenet(_resize(img, shape[3], shape[2]), bgr=False)[None]
        feed[i.name] = np.ascontiguousarray(x.reshape(shape).astype(i.dtype))
    return feed


def ratio_stats(times: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    """Per build: median ms, and the median and half-IQR of its per-round ratio to ``base``."""
    out = {}
    b = np.array(times[base])
    for k, v in times.items():
        r = np.array(v) / b
        q1, q3 = np.percentile(r, [25, 75])
        out[k] = {"ms": round(float(np.median(v)) * 1e3, 3), "ratio": round(float(np.median(r)), 3),
                  "spread": round(float(q3 - q1) / 2, 3)}
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


def _tvm_call(b, feed):  # type: ignore[no-untyped-def]
    fn, fargs = b.vm()["main"], b._arguments(feed)
    return lambda: fn(*fargs)


def _time(info: dict, builds: dict, sess, feed: dict, rounds: int, settle: float, tag: str) -> None:  # type: ignore[no-untyped-def]
    """Interleaved, settled rounds of ORT (IO binding) and every build; per build the median ms and
    the median (± half-IQR) of its per-round ratio to ORT, under keys suffixed ``_{tag}``."""
    fns = {"ort": ort_bound_call(sess, feed)}
    fns.update({k: _tvm_call(b, feed) for k, b in builds.items()})
    st = ratio_stats(interleaved_round_times(fns, rounds, settle, order="rotate"), "ort")
    for k, v in st.items():
        info[f"{k}_ms_{tag}"] = v["ms"]
        if k != "ort":
            info[f"{k}_vs_ort_{tag}"] = v["ratio"]
            info[f"{k}_vs_ort_{tag}_spread"] = v["spread"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--tune", action="append", default=[], metavar="MODEL:MINUTES")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--settle", type=float, default=0.15, help="seconds each side runs untimed before its timed call")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--cache", default=None, help="tuning cache (default: a fresh temporary one)")
    ap.add_argument("--apply-only", action="store_true", help="the tuned builds apply the records already in "
                    "--cache (an earlier --tune run) without tuning: re-timing in seconds (MINUTES only labels them)")
    ap.add_argument("--tune-threads", type=int, default=None, metavar="N",
                    help="tune for N threads (compile(threads=N): candidates measured with N threads, records kept "
                    "apart); default: every core")
    ap.add_argument("--out", default="tvm", help="results/<out>.json and .md (default: tvm)")
    args = ap.parse_args()
    if args.apply_only and not args.cache:
        ap.error("--apply-only needs the --cache of an earlier --tune run")
    budgets: dict[str, float] = {}
    for spec in args.tune:
        name, _, minutes = spec.partition(":")
        budgets[name] = float(minutes)
    import os

    load_before = os.getloadavg()
    peak = sgemm_peak()
    print(f"machine SGEMM peak (numpy, all cores): {peak:.0f} GFLOP/s")
    cache = args.cache or tempfile.mkdtemp(prefix="graphopt-tvm-bench-")
    empty = tempfile.mkdtemp(prefix="graphopt-tvm-untuned-")  # no tuning records: untuned builds stay untuned
    rows = []
    later: list[tuple[dict, object, dict]] = []  # (info, model, builds): the 1-thread timing, after every model
    for name, (m, shapes) in models(args.models).items():
        if args.models and name not in args.models:
            continue
        flops = model_stats(infer_shapes(m.copy(), shapes or {})).flops
        builds: dict[str, object] = {}
        info: dict[str, object] = {"model": name, "gflop": flops / 1e9}
        t = time.perf_counter()
        builds["graphopt"] = tvm_compile(m, "host", input_shapes=shapes, progress=False, cache_dir=empty)
        info["compile_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()  # the same compile again: the build cache
        again = tvm_compile(m, "host", input_shapes=shapes, progress=False, cache_dir=empty)
        info["recompile_s"] = round(time.perf_counter() - t, 1)
        info["recompile_cached"] = again.info.from_build_cache
        if not args.no_naive:
            builds["naive"] = tvm_compile(m, "host", input_shapes=shapes, default_schedules=False, progress=False,
                                          cache_dir=empty)
        if name in budgets and args.apply_only:
            t = time.perf_counter()
            tuned = tvm_compile(m, "host", input_shapes=shapes, cache_dir=cache, build_cache=False, progress=False,
                                threads=args.tune_threads)
            builds["tuned"] = tuned
            info["tune_minutes"] = budgets[name]
            info["tuned_apply_s"] = round(time.perf_counter() - t, 1)
            n_tuned = sum(1 for v in tuned.info.schedules.values() if v == "tuned")
            info["tuned_tasks"] = f"{n_tuned} kernels from records"
            info["tuned_rules"] = {r: sum(1 for v in tuned.info.schedules.values() if v == r)
                                   for r in sorted(set(tuned.info.schedules.values()))}
        elif name in budgets:
            t = time.perf_counter()
            tuned = tvm_compile(m, "host", input_shapes=shapes, minutes=budgets[name], cache_dir=cache,
                                threads=args.tune_threads)
            builds["tuned"] = tuned
            info["tune_minutes"] = budgets[name]
            info["tune_s"] = round(time.perf_counter() - t, 1)
            info["tuned_tasks"] = f"{len(tuned.info.tuning.get('tuned', []))}/{tuned.info.tuning.get('tasks')} tasks"
            info["tuning_cached_tasks"] = tuned.info.tuning.get("cached", 0)  # > 0: a rerun on an earlier --cache
            info["tuning_trials"] = tuned.info.tuning.get("trials", 0)
            info["tuning_skipped"] = len(tuned.info.tuning.get("skipped", []))
            info["tuned_rules"] = {r: sum(1 for v in tuned.info.schedules.values() if v == r)
                                   for r in sorted(set(tuned.info.schedules.values()))}
            # the same compile again (the tuning cache): only when the budget covered every task; a
            # ``minutes`` budget plans every task, so one the deadline left untuned would be tuned now,
            # for the whole budget again
            if not info["tuning_skipped"]:
                t = time.perf_counter()
                again = tvm_compile(m, "host", input_shapes=shapes, minutes=budgets[name], cache_dir=cache,
                                    progress=False, threads=args.tune_threads)
                info["tuned_recompile_s"] = round(time.perf_counter() - t, 1)
                info["tuned_recompile_cached"] = again.info.from_build_cache
        cm = builds["graphopt"]
        feed = realistic_feed(name, cm.inputs)
        sess = ort_session(m, optimize=True, threads=2)
        ref = sess.run(None, feed)[0]
        for k, b in builds.items():
            got = b.run(feed)[0]
            info[f"{k}_max_rel_err"] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
        rounds = args.rounds if args.no_naive else max(3, args.rounds // 4) if flops > 1e9 else args.rounds
        info["rounds"] = rounds
        _time(info, builds, sess, feed, rounds, args.settle, "2t")
        later.append((info, m, builds))
        rows.append(info)
        print(json.dumps(info))
    # 1 thread each, after every model (TVM's pool is set once for the process): ORT intra-op 1
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, 1)
    for info, m, builds in later:
        feed = realistic_feed(info["model"], builds["graphopt"].inputs)
        _time(info, builds, ort_session(m, optimize=True, threads=1), feed, info["rounds"], args.settle, "1t")
        if "tuned" in builds:  # tuned against untuned directly, 1 thread
            fns = {k: _tvm_call(builds[k], feed) for k in ("graphopt", "tuned")}
            st = ratio_stats(interleaved_round_times(fns, info["rounds"], args.settle, order="alternate"), "graphopt")
            info["tuned_vs_graphopt_1t"] = st["tuned"]["ratio"]
            info["tuned_vs_graphopt_1t_spread"] = st["tuned"]["spread"]
        print(json.dumps(info))
    for info in rows:
        for tag in ("2t", "1t"):
            best = min(v for k, v in info.items() if k.endswith(f"_ms_{tag}") and not k.startswith(("naive", "ort")))
            info[f"best_gflops_{tag}"] = round(info["gflop"] / (best / 1e3), 1)
            info[f"ort_gflops_{tag}"] = round(info["gflop"] / (info[f"ort_ms_{tag}"] / 1e3), 1)
            info[f"graphopt_gflops_{tag}"] = round(info["gflop"] / (info[f"graphopt_ms_{tag}"] / 1e3), 1)
    import datetime as _dt
    import platform

    out = {"peak_gflops": round(peak, 1), "generated": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "command": " ".join(sys.argv[1:]), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "load_before": load_before, "load_after": os.getloadavg(), "settle_s": args.settle, "rows": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{args.out}.json").write_text(json.dumps(out, indent=1))

    def cell(r: dict, k: str, tag: str) -> str:
        if f"{k}_ms_{tag}" not in r:
            return "-"
        return f"{r[f'{k}_ms_{tag}']} ms = **{r[f'{k}_vs_ort_{tag}']:.2f}x** ±{r[f'{k}_vs_ort_{tag}_spread']:.2f}"

    text = [f"# ONNX Runtime vs graphopt's TVM builds (CPU, batch 1, {out['machine']})", "",
            (f"Generated {out['generated']}: `python -m benchmarks.tvm_compile {out['command']}`. The machine was "
            f"shared with other work (load average {load_before[0]:.1f} before, {out['load_after'][0]:.1f} after): "
            "compare ratios, not milliseconds. Each ratio is the median of the per-round ratios build/ORT, ± half "
            f"their IQR; rounds interleaved, each side settled {args.settle * 1e3:.0f} ms before its timed call. ORT "
            "through IO binding (inputs bound once), TVM on pre-converted tensors; input a real photo, "
            "ImageNet-normalized. Read the 1-thread table: on a loaded 2-core machine the 2-thread timings "
            f"measure the load more than the kernels. SGEMM peak (numpy, all cores) {peak:.0f} GFLOP/s."), ""]
    for tag, label in (("1t", "1 thread (ORT intra-op 1, TVM pool 1 worker)"),
                       ("2t", "2 threads (ORT intra-op 2, TVM's default pool)")):
        text += [f"## {label}", "",
                 ("| model | GFLOP | ORT ms | TVM naive | graphopt defaults | tuned (budget) | tuned / defaults | "
                  "GFLOP/s defaults / tuned / ORT |"), "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            tuned = cell(r, "tuned", tag)
            if tuned != "-":
                tuned += (f" ({r['tune_minutes']:g} min, {r['tuned_tasks']}"
                          f"{f', tuned for {args.tune_threads} thread(s)' if args.tune_threads else ''})")
            tvg = (f"{r['tuned_vs_graphopt_1t']:.2f}x ±{r['tuned_vs_graphopt_1t_spread']:.2f}"
                   if tag == "1t" and "tuned_vs_graphopt_1t" in r else "-")
            tg = round(r["gflop"] / (r[f"tuned_ms_{tag}"] / 1e3), 1) if f"tuned_ms_{tag}" in r else "-"
            text.append(f"| {r['model']} | {r['gflop']:.2f} | {r[f'ort_ms_{tag}']} | {cell(r, 'naive', tag)} | "
                        f"{cell(r, 'graphopt', tag)} | {tuned} | {tvg} | {r[f'graphopt_gflops_{tag}']} / {tg} / "
                        f"{r[f'ort_gflops_{tag}']} |")
        text.append("")
    text += ["## Builds", "", ("| model | compile / again (s) | tuning time | tuning trials | tasks tuned / cached / "
                               "left default | max rel err vs ORT (defaults / tuned) |"), "|---|---|---|---|---|---|"]
    for r in rows:
        tune = (f"{r['tune_s']} s | {r['tuning_trials']} | {r['tuned_tasks']} / {r['tuning_cached_tasks']} / "
                f"{r['tuning_skipped']}") if "tune_s" in r else \
            f"(records applied from --cache in {r['tuned_apply_s']} s: {r['tuned_tasks']}) | - | -" \
            if "tuned_apply_s" in r else "- | - | -"
        text.append(f"| {r['model']} | {r['compile_s']} / {r['recompile_s']}"
                    f"{' (cached build)' if r['recompile_cached'] else ''} | {tune} | "
                    f"{r['graphopt_max_rel_err']:.1e} / {r.get('tuned_max_rel_err', float('nan')):.1e} |")
    (HERE / "results" / f"{args.out}.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))

if __name__ == "__main__":
    main()
