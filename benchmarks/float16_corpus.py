"""float16 on every corpus model and on the onnx package's backend test models, next to
onnxconverter-common's ``float16.convert_float_to_float16`` and onnxsim 0.8's ``quantize_fp16``.

Tools (every one gets the same float32 corpus file):

* ``graphopt-weights``: ``float16-weights`` (weights float16 behind a Cast, compute float32);
* ``graphopt-fp16``: ``float16`` without data (model inputs/outputs float32, the conservative
  default list kept float32);
* ``graphopt-fp16-data``: ``float16`` with ``task(name).calibration(4)`` (values that overflow
  or underflow float16 on that data keep their nodes float32);
* ``onnxconverter-common``: ``convert_float_to_float16(model, keep_io_types=True)`` (its defaults
  otherwise: its own block list, clipping to +-10000);
* ``onnxsim``: ``onnxsim.quantize_fp16(model, keep_io_types=True)``.

Per model and tool: conversion failure, validity (``onnx.checker.check_model(full_check=True)``
and ONNX Runtime CPU loads and runs the eval split), file size ratio to float32, the task score on
``--n`` held-out samples (``benchmarks/corpus/data.py``) next to float32's, agreement of decoded
predictions with float32, and for graphopt the nodes kept float32 and why. For
``graphopt-weights`` also: how many Casts of constants are left in the graph ONNX Runtime runs
(``SessionOptions.optimized_model_filepath``, basic level: 0 means ORT folded every weight Cast
at load, so the kernels are float32's). ``--latency NAMES``: ORT CPU latency of the weight-only
and full float16 models relative to float32, interleaved and settled
(``graphopt.runtime.interleaved_timings``), median of paired ratios and half the IQR over
``--repeats`` runs.

Backend suite: every ``onnx/backend/test/data/{light,pytorch-converted,pytorch-operator,simple}/
*/model.onnx`` that ORT runs in float32 on its ``test_data_set_0`` inputs; per tool: converted,
valid (full check + ORT runs the test inputs), invalid, failed.

Run:  python -m benchmarks.float16_corpus [NAMES...] [--n 16] [--latency ppocrv4_rec,...] [--no-backend]
      [--only corpus|backend|tvm-cuda|latency]   (one part, merged into the saved results: processes can share
      the work; ``latency`` converts the --latency models itself)
The saved results came from:  --only corpus --n 8 --latency ... (over two processes, each with a share of
the models), --only backend, --only tvm-cuda, and
--only latency --latency ppocr_cls,ppocrv4_rec,ddddocr_ocr,magika_v3,silero_vad_16k_op15 --repeats 7.
Saves benchmarks/results/float16_corpus.json / float16_corpus.md
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import graphopt
from benchmarks.corpus import ENTRIES, fetch, model_path
from graphopt.progress import progress

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOOLS = ["graphopt-weights", "graphopt-fp16", "graphopt-fp16-data", "onnxconverter-common", "onnxsim"]


def _graphopt(kind: str, calibration: list[dict[str, np.ndarray]] | None = None
              ) -> Callable[[str], tuple[onnx.ModelProto, dict[str, Any]]]:
    def run(path: str) -> tuple[onnx.ModelProto, dict[str, Any]]:
        m = graphopt.load(path)
        p = graphopt.get_pass("float16-weights" if kind == "weights" else "float16")
        graphopt.run_passes(m, [p], graphopt.PassContext(calibration=calibration))
        return graphopt.to_proto(m), p.report
    return run


def _occ(path: str) -> tuple[onnx.ModelProto, dict[str, Any]]:
    from onnxconverter_common import float16

    return float16.convert_float_to_float16(onnx.load(path), keep_io_types=True), {}


def _onnxsim(path: str) -> tuple[onnx.ModelProto, dict[str, Any]]:
    import onnxsim

    return onnxsim.quantize_fp16(onnx.load(path), keep_io_types=True), {}


def _one_line(e: BaseException) -> str:
    return (f"{type(e).__name__}: " + " ".join(str(e).split()))[:240]


def _validate(mp: onnx.ModelProto, path: Path) -> str | None:
    """None when the model passes the full check and ORT loads it; else why not."""
    import onnxruntime as ort

    onnx.save(mp, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001
        return "checker: " + _one_line(e)
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        return "ORT load: " + _one_line(e)
    return None


def _weight_casts_left(path: Path) -> int:
    """Casts reading a constant in the graph ORT runs after its basic (constant-folding) level."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        mp = onnx.load(so.optimized_model_filepath)
    left = 0
    gs = [mp.graph]
    while gs:
        g = gs.pop()
        consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
        left += sum(1 for n in g.node if n.op_type == "Cast" and n.input and n.input[0] in consts)
        gs += [a.g for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    return left


def _kept_summary(rep: dict[str, Any]) -> dict[str, int]:
    kept = rep.get("kept") or rep.get("kept_float32") or {}
    c: collections.Counter[str] = collections.Counter()
    for why in kept.values():
        if why.startswith("conservative"):
            c["default list"] += 1
        elif "on the data" in why:
            c["data: " + ("overflow" if "reaches" in why else "underflow")] += 1
        elif "random probe inputs" in why:
            c["probe: overflow"] += 1
        elif why.startswith("schema"):
            c["no half type in schema"] += 1
        elif why.startswith("domain"):
            c["other domain"] += 1
        elif why.startswith("constant"):
            c["constant beyond range"] += 1
        else:
            c[why.split(":")[0][:40]] += 1
    return dict(c)


def _graphs(g: onnx.GraphProto):
    yield g
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            for sg in a.graphs:
                yield from _graphs(sg)


def size_parts(path: str) -> dict[str, Any]:
    """Where a model's bytes are: float32 tensors of >= 16 values (what float16 halves: initializers
    and tensor attributes, bodies included), other tensors (integer tables, tiny constants),
    per-node metadata (exporters' debug info: stack traces), and the rest of the graph (nodes,
    names, types). ``floor``: the size ratio when exactly the float32 weights halve."""
    mp = onnx.load(path)
    total = mp.ByteSize()
    f32 = other = meta = 0
    for g in _graphs(mp.graph):
        ts = list(g.initializer) + [a.t for node in g.node for a in node.attribute
                                    if a.type == onnx.AttributeProto.TENSOR]
        for t in ts:
            if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) >= 16:
                f32 += t.ByteSize()
            else:
                other += t.ByteSize()
        meta += sum(p.ByteSize() + 2 for node in g.node for p in node.metadata_props)
    return {"bytes": total, "float32_weights": f32 / total, "other_tensors": other / total,
            "node_metadata": meta / total, "graph": (total - f32 - other - meta) / total,
            "floor": round((total - f32 / 2) / total, 4)}


def corpus_model(name: str, n: int, tmp: Path) -> dict[str, Any]:
    from benchmarks.corpus.data import ort_runner, task

    t = task(name)
    src = str(model_path(name))
    size0 = Path(src).stat().st_size
    base = t.evaluate(ort_runner(src, threads=2), n)
    row: dict[str, Any] = {"model": name, "metric": base.metric, "fp32_score": base.score, "tools": {},
                           "size_parts": size_parts(src)}
    tools = {"graphopt-weights": _graphopt("weights"), "graphopt-fp16": _graphopt("fp16"),
             "graphopt-fp16-data": _graphopt("fp16", t.calibration(4)), "onnxconverter-common": _occ,
             "onnxsim": _onnxsim}
    for tool, fn in tools.items():
        r: dict[str, Any] = {}
        t0 = time.perf_counter()
        try:
            mp, rep = fn(src)
        except Exception as e:  # noqa: BLE001 - a tool's failure is a result
            row["tools"][tool] = {"status": "failed", "why": _one_line(e)}
            continue
        r["convert_s"] = round(time.perf_counter() - t0, 2)
        path = tmp / f"{name}.{tool}.onnx"
        why = _validate(mp, path)
        r["size_ratio"] = round(path.stat().st_size / size0, 4)
        if rep:
            kept = rep.get("kept") or rep.get("kept_float32") or {}
            r["kept_float32"] = kept
            r["kept_summary"] = _kept_summary(rep)
            if "casts_in_model" in rep:
                r["casts"] = rep["casts_in_model"]
        if why:
            r.update(status="invalid", why=why)
            row["tools"][tool] = r
            continue
        try:
            res = t.evaluate(ort_runner(str(path), threads=2), n)
        except Exception as e:  # noqa: BLE001
            r.update(status="invalid", why="ORT run: " + _one_line(e))
            row["tools"][tool] = r
            continue
        r.update(status="valid", score=res.score, agreement=t.agreement(base, res))
        if tool == "graphopt-weights":
            r["weight_casts_left_after_ort_load"] = _weight_casts_left(path)
        row["tools"][tool] = r
        logging.getLogger("float16_corpus").warning("%s %s %.0fs", name, tool, time.perf_counter() - t0)
    return row


def latency(name: str, tmp: Path, rounds: int, repeats: int) -> dict[str, Any]:
    """ORT CPU latency of weight-only and full float16 relative to float32 (2 threads)."""
    from benchmarks.corpus.data import task
    from graphopt.runtime import interleaved_timings, ort_session

    feed = task(name).eval_feeds(1)[0]
    for kind in ("weights", "fp16"):  # --only latency: convert here (no corpus run made the files)
        path = tmp / f"{name}.graphopt-{kind}.onnx"
        if not path.exists():
            onnx.save(_graphopt(kind)(str(model_path(name)))[0], str(path))
    # "fp32 again": a second session of the same float32 file, timed like the others: its ratio
    # is the noise floor of the comparison on this machine
    paths = {"fp32": str(model_path(name)), "fp32 again": str(model_path(name)),
             "weights": str(tmp / f"{name}.graphopt-weights.onnx"), "fp16": str(tmp / f"{name}.graphopt-fp16.onnx")}
    sess = {k: ort_session(p, optimize=True, threads=2) for k, p in paths.items() if Path(p).exists()}
    fns = {}
    for k, s in sess.items():
        f = {i.name: feed[i.name] for i in s.get_inputs() if i.name in feed}
        fns[k] = (lambda s=s, f=f: s.run(None, f))
    ratios: dict[str, list[float]] = {k: [] for k in fns if k != "fp32"}
    ms: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        t = interleaved_timings(fns, rounds)
        for k in fns:
            ms[k].append(t[k])
        for k, v in ratios.items():
            v.append(t[k] / t["fp32"])
    out: dict[str, Any] = {"model": name, "ms_fp32": round(statistics.median(ms["fp32"]), 3), "repeats": repeats}
    for k, v in ratios.items():
        q = np.percentile(v, [25, 75])
        out[f"ratio_{k}"] = round(statistics.median(v), 3)
        out[f"spread_{k}"] = round(float(q[1] - q[0]) / 2, 3)
    return out


def backend_suite(tmp: Path) -> dict[str, Any]:
    import onnxruntime as ort
    from onnx import numpy_helper

    root = Path(onnx.__file__).parent / "backend" / "test" / "data"
    counts = {t: collections.Counter() for t in ["graphopt-weights", "graphopt-fp16", "onnxconverter-common",
                                                  "onnxsim"]}
    problems: dict[str, dict[str, str]] = {t: {} for t in counts}
    tools = {"graphopt-weights": _graphopt("weights"), "graphopt-fp16": _graphopt("fp16"),
             "onnxconverter-common": _occ, "onnxsim": _onnxsim}
    considered = 0
    for sub in ("light", "pytorch-converted", "pytorch-operator", "simple"):
        # light/ holds NAME.onnx files (outputs do not depend on the input: random inputs serve)
        entries = sorted((root / sub).glob("*.onnx")) if sub == "light" else \
            [d / "model.onnx" for d in sorted((root / sub).iterdir())]
        for mpath in entries:
            mdir = mpath.parent
            ds = mdir / "test_data_set_0"
            if not mpath.exists() or (sub != "light" and not ds.exists()):
                continue
            try:
                so = ort.SessionOptions()
                so.log_severity_level = 4
                s = ort.InferenceSession(str(mpath), so, providers=["CPUExecutionProvider"])
                names = [i.name for i in s.get_inputs()]
                feeds = {i.name: np.random.default_rng(0).standard_normal(i.shape).astype(np.float32)
                         for i in s.get_inputs()} if sub == "light" else {}
                for k, f in enumerate(sorted(ds.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
                                      if sub != "light" else []):
                    t = onnx.TensorProto()
                    t.ParseFromString(f.read_bytes())
                    feeds[names[k]] = numpy_helper.to_array(t)
                s.run(None, feeds)
            except Exception as e:  # noqa: BLE001 - ORT cannot run it in float32: not part of the suite
                logging.getLogger("float16_corpus").info("%s/%s left out: %s", sub, mpath.parent.name, _one_line(e))
                continue
            considered += 1
            key = f"{sub}/{mpath.stem if sub == 'light' else mdir.name}"
            for tool, fn in tools.items():
                try:
                    out, _ = fn(str(mpath))
                except Exception as e:  # noqa: BLE001
                    counts[tool]["failed"] += 1
                    problems[tool][key] = "failed: " + _one_line(e)
                    continue
                path = tmp / "suite.onnx"
                why = _validate(out, path)
                if why is None:
                    try:
                        so = ort.SessionOptions()
                        so.log_severity_level = 4
                        s2 = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                        types = {i.name: i.type for i in s2.get_inputs()}
                        f2 = {k: (v.astype(np.float16) if types.get(k) == "tensor(float16)" else v)
                              for k, v in feeds.items() if k in types}
                        s2.run(None, f2)
                    except Exception as e:  # noqa: BLE001
                        why = "ORT run: " + _one_line(e)
                if why:
                    counts[tool]["invalid"] += 1
                    problems[tool][key] = why
                else:
                    counts[tool]["valid"] += 1
    return {"models": considered, "counts": {k: dict(v) for k, v in counts.items()}, "problems": problems}


def tvm_cuda(arch: str = "sm_90") -> list[dict[str, Any]]:
    """Full float16 models built for CUDA by graphopt's TVM backend and checked without a GPU:
    the kernels' CUDA C computes in half (counted), has no private-memory hazards, and run
    serially on the CPU it matches the float32 model under ORT (max relative error)."""
    import re
    import sys

    from graphopt.backend import compile as tvm_compile
    from graphopt.backend.gpucheck import cuda_sources, private_memory_hazards, run_on_cpu
    from graphopt.runtime import ort_session
    from graphopt.testing import logits_outputs, randomize_weights

    sys.path.insert(0, str(HERE.parent / "tests"))
    from helpers import light_models

    models = {"digits_cnn": (graphopt.load(Path(graphopt.__file__).parent / "data" / "tinycnn.onnx"),
                             {"input": [1, 1, 8, 8]})}
    p = next(x for x in light_models() if "squeezenet" in str(x))
    models["squeezenet (random weights)"] = (logits_outputs(graphopt.optimize(randomize_weights(graphopt.load(p)))),
                                             None)
    rows = []
    for name, (m32, shapes) in models.items():
        m = m32.copy()
        graphopt.run_passes(m, [graphopt.get_pass("float16")])
        t0 = time.perf_counter()
        try:
            cm = tvm_compile(m, f"cuda:{arch}", input_shapes=shapes, progress=False)
        except Exception as e:  # noqa: BLE001 - a failed build is a result
            last = [x for x in str(e).splitlines() if x.strip()][-1:] or [""]
            rows.append({"model": name, "arch": arch, "error": f"{type(e).__name__}: {last[0].strip()[:300]}"})
            print(rows[-1], flush=True)
            continue
        built = time.perf_counter() - t0
        src = cuda_sources(cm.module)
        src = src if isinstance(src, str) else "\n".join(src)
        row = {"model": name, "arch": arch, "build_s": round(built, 1),
               "half_tokens_in_cuda": len(re.findall(r"\bhalf\d?\b|__half", src)),
               "hazards": len(private_memory_hazards(src))}
        feed = {i.name: np.random.default_rng(0).standard_normal(i.shape).astype(i.dtype) for i in cm.inputs}
        try:  # the kernels run serially on the CPU (graphopt.backend.gpucheck)
            got = np.asarray(run_on_cpu(cm, feed)[0], np.float32)
        except Exception as e:  # noqa: BLE001
            last = [x for x in str(e).splitlines() if x.strip()][-1:] or [""]
            row["cpu_check_error"] = f"{type(e).__name__}: {last[0].strip()[:300]}"
            rows.append(row)
            print(rows[-1], flush=True)
            continue
        names = [v.name for v in m32.graph.inputs if v.const is None]
        ref = ort_session(m32, optimize=True).run(None, {n: feed[i.name] for n, i in zip(names, cm.inputs,
                                                                                           strict=True)})[0]
        row["max_rel_err_vs_fp32_ort"] = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12))
        rows.append(row)
        print(rows[-1], flush=True)
    return rows


def _md(res: dict[str, Any]) -> str:
    lines = ["# float16 on the real-model corpus", "",
             (f"Generated by `python -m benchmarks.float16_corpus` ({res['date']}; n={res['n']} eval samples per "
             "model; 2 shared cores, loaded machine)."), "",
             ("Per tool: size ratio to float32 / task score (float32's in the first column) / agreement of decoded "
             "predictions with float32. `invalid` = fails onnx's full check or ONNX Runtime CPU cannot load/run it; "
             "`failed` = the converter raised."), ""]
    hdr = ["model", "metric", "fp32"] + TOOLS
    lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for row in res["corpus"]:
        cells = [row["model"], row["metric"], f"{row['fp32_score']:.3f}"]
        for tool in TOOLS:
            r = row["tools"].get(tool, {})
            if r.get("status") == "valid":
                cells.append(f"{r['size_ratio']:.2f}x / {r['score']:.3f} / {r['agreement']:.2f}")
            elif r:
                cells.append(f"**{r['status']}**")
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", ("`nudenet_320n` has no labels: its metric is the box F1 against float32's own detections, so "
                   "its float32 score is undefined (nan) and the agreement column is the measure."), ""]
    deltas = [(abs(r["tools"]["graphopt-weights"]["score"] - row["fp32_score"]), row["model"])
              for row in res["corpus"] for r in [row] if r["tools"].get("graphopt-weights", {}).get("status") == "valid"
              and row["fp32_score"] == row["fp32_score"]]
    if deltas:
        worst = max(deltas)
        lines += [(f"Weight-only task score vs float32: largest difference {100 * worst[0]:.2f} points "
                   f"({worst[1]}) over {len(deltas)} models with labels; {sum(d < 0.001 for d, _ in deltas)} within "
                   "0.1 point."), ""]
    lines += ["", "## Counts", ""]
    for tool in TOOLS:
        st = collections.Counter(row["tools"].get(tool, {}).get("status", "-") for row in res["corpus"])
        lines.append(f"- {tool}: " + ", ".join(f"{k} {v}" for k, v in sorted(st.items())))
    lines += ["", "## Where graphopt kept float32 (full float16), and why", "",
              "| model | without data | with calibration data (4 samples) | Casts (no data) |", "|---|---|---|---|"]
    for row in res["corpus"]:
        a, b = row["tools"].get("graphopt-fp16", {}), row["tools"].get("graphopt-fp16-data", {})
        fmt = (lambda r: ", ".join(f"{k}: {v}" for k, v in r.get("kept_summary", {}).items()) or "none")
        lines.append(f"| {row['model']} | {fmt(a)} | {fmt(b)} | {a.get('casts', '')} |")
    lines += ["", "## Size: what float16 cannot halve", "",
              ("Shares of the float32 file: float32 tensors of >= 16 values (halved), other tensors (integer tables, "
               "tiny constants), per-node metadata (exporter debug info such as PyTorch stack traces) and the rest "
               "of the graph (nodes, names, types). `floor` = size when exactly the float32 weights halve; "
               "graphopt's weight-only ratio next to it (the difference is graphopt's own overhead: Cast nodes)."), "",
              "| model | MB | float32 weights | other tensors | node metadata | graph | floor | graphopt-weights |",
              "|---|---|---|---|---|---|---|---|"]
    for row in res["corpus"]:
        sp = row.get("size_parts")
        if not sp:
            continue
        w = row["tools"].get("graphopt-weights", {}).get("size_ratio")
        lines.append(f"| {row['model']} | {sp['bytes'] / 1e6:.2f} | {100 * sp['float32_weights']:.1f}% | "
                     f"{100 * sp['other_tensors']:.1f}% | {100 * sp['node_metadata']:.1f}% | {100 * sp['graph']:.1f}% | "
                     f"{sp['floor']:.3f}x | {w:.3f}x |" if w is not None else f"| {row['model']} | | | | | | | |")
    lines += ["", "Weight-only: Casts of constants left in the graph ONNX Runtime runs (basic optimization level): "
              + ", ".join(f"{row['model']} {row['tools']['graphopt-weights'].get('weight_casts_left_after_ort_load')}"
                          for row in res["corpus"] if row["tools"].get("graphopt-weights", {}).get("status") == "valid"),
              ""]
    bad = [(row["model"], tool, r.get("why", "")) for row in res["corpus"] for tool, r in row["tools"].items()
           if r.get("status") in ("invalid", "failed")]
    if bad:
        lines += ["## Failures and invalid outputs", ""] + [f"- {m} / {t}: {w}" for m, t, w in bad] + [""]
    if res.get("latency"):
        lines += ["## ONNX Runtime CPU latency relative to float32 (2 threads, interleaved, settled)", "",
                  ("Median of paired ratios ± half the IQR over the repeats. `fp32 again` is a second session of the "
                   "same float32 file timed the same way: the noise floor on this (loaded) machine."), "",
                  "| model | fp32 ms | fp32 again | weight-only | full fp16 | repeats |", "|---|---|---|---|---|---|"]
        for r in res["latency"]:
            again = (f"{r['ratio_fp32 again']} ± {r['spread_fp32 again']}" if "ratio_fp32 again" in r else "")
            lines.append(f"| {r['model']} | {r['ms_fp32']} | {again} | {r.get('ratio_weights')} ± "
                         f"{r.get('spread_weights')} | {r.get('ratio_fp16')} ± {r.get('spread_fp16')} | "
                         f"{r.get('repeats', '')} |")
        lines.append("")
    if res.get("tvm_cuda"):
        lines += ["## Full float16 built for CUDA by graphopt's TVM backend (checked without a GPU)", "",
                  ("| model | arch | build s | `half` in the CUDA C | private-memory hazards | serial CPU run vs "
                  "float32 ORT (max rel. error) |"), "|---|---|---|---|---|---|"]
        for r in res["tvm_cuda"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['arch']} | build failed: {r['error'][:200]} | | | |")
                continue
            err = (f"{r['max_rel_err_vs_fp32_ort']:.1e}" if "max_rel_err_vs_fp32_ort" in r
                   else f"check failed in TVM: {r.get('cpu_check_error', '')[:160]}")
            lines.append(f"| {r['model']} | {r['arch']} | {r['build_s']} | {r['half_tokens_in_cuda']} | {r['hazards']} "
                         f"| {err} |")
        lines.append("")
    if res.get("backend"):
        b = res["backend"]
        lines += [f"## onnx backend test models ({b['models']} that ORT runs in float32)", "",
                  "| tool | valid | invalid | failed |", "|---|---|---|---|"]
        for tool, c in b["counts"].items():
            lines.append(f"| {tool} | {c.get('valid', 0)} | {c.get('invalid', 0)} | {c.get('failed', 0)} |")
        lines.append("")
        for tool, probs in b["problems"].items():
            if probs:
                lines.append(f"- {tool}: " + "; ".join(f"{k}: {v[:120]}" for k, v in list(probs.items())[:6])
                             + (f"; ... ({len(probs)} in all)" if len(probs) > 6 else ""))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*")
    ap.add_argument("--n", type=int, default=16, help="eval samples per model")
    ap.add_argument("--latency", default="ppocrv4_rec,ddddocr_ocr,ppocrv4_det",
                    help="comma list of models to time ('' for none)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-backend", action="store_true")
    ap.add_argument("--only", choices=["corpus", "backend", "tvm-cuda", "latency"],
                    help="run one part and merge it into the saved results (two processes can share the work)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    logging.disable(logging.INFO)
    logging.getLogger("graphopt").setLevel(logging.ERROR)
    names = args.names or [e.name for e in ENTRIES]
    fetch(names)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "n": args.n, "corpus": [],
                           "latency": [], "backend": None, "tvm_cuda": None}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in progress(names if args.only in (None, "corpus") else [], desc="float16 corpus", unit="model"):
            t0 = time.perf_counter()
            row = corpus_model(name, args.n, tmp)
            res["corpus"].append(row)
            print(name, {k: (v.get("status"), v.get("size_ratio"), v.get("score"), v.get("agreement"))
                         for k, v in row["tools"].items()}, f"{time.perf_counter() - t0:.0f}s", flush=True)
            if args.only == "corpus" and not args.no_save:  # each model as it is done (shared work)
                save(json.loads(json.dumps(res, default=str)), "corpus")
        for name in [x for x in args.latency.split(",") if x and x in names
                     and args.only in (None, "corpus", "latency")]:
            res["latency"].append(latency(name, tmp, args.rounds, args.repeats))
            print(res["latency"][-1], flush=True)
        if args.only == "tvm-cuda":
            res["tvm_cuda"] = tvm_cuda()
        if not args.no_backend and args.only not in ("corpus", "tvm-cuda", "latency"):
            res["backend"] = backend_suite(tmp)
            print(res["backend"]["counts"], flush=True)
    if not args.no_save:
        save(json.loads(json.dumps(res, default=str)), args.only)


def save(res: dict[str, Any], only: str | None) -> None:
    """Write the results; with ``only``, merge into the saved ones (corpus rows and timings by
    model), under a lock, so several processes can share the work."""
    import fcntl

    RESULTS.mkdir(exist_ok=True)
    old = RESULTS / "float16_corpus.json"
    with open(Path(tempfile.gettempdir()) / "graphopt_float16_corpus.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if only and old.exists():
            prev = json.loads(old.read_text())
            order = [e.name for e in ENTRIES]
            for key in ("corpus", "latency"):
                mine = {r["model"]: r for r in res.get(key) or []}
                rows = {r["model"]: r for r in prev.get(key) or []}
                rows.update(mine)
                res[key] = sorted(rows.values(), key=lambda r: order.index(r["model"]) if r["model"] in order else 99)
            for key in ("backend", "tvm_cuda"):
                if not res.get(key):
                    res[key] = prev.get(key)
            if only != "corpus":
                res["n"] = prev.get("n", res["n"])
        old.write_text(json.dumps(res, indent=1, default=str))
        (RESULTS / "float16_corpus.md").write_text(_md(res))


if __name__ == "__main__":
    main()
