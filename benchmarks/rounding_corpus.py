"""Learned rounding (AdaRound, GPTQ) and block-wise refit on real corpus models (issue 16, the
part without a training engine).

Rows per model: fp32; graphopt int8 (``quantize`` as the CLI runs it: default pipeline, then
``quantize-static``) with ``rounding`` = nearest / adaround / gptq - task metric on held-out
samples (``benchmarks/corpus/data.py``), agreement with fp32, and the seconds each quantization
took (on the loaded 2-core machine: indicative only). With ``--prune R``: structured pruning of
``R`` of the channels (``compress --prune R --structured``) with ``refit=layer`` (the
prune-channels pass's own per-layer least squares) against ``refit=block`` (then
``refit-blocks``: every layer refit in graph order to the teacher's block output).

Run:  python -m benchmarks.rounding_corpus [NAMES...] [--calib 32] [--eval 48] [--prune 0.3 --prune-models ppocrv3_rec]
Saves benchmarks/results/rounding_corpus.json / rounding_corpus.md (rows of earlier runs of
other models are kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

import graphopt
from benchmarks.corpus import fetch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _score(task: Any, model: Any, n_eval: int, ref: Any = None) -> tuple[dict[str, Any], Any]:
    """Task metric on the held-out split, and (against ``ref``, fp32's result) agreement of the
    decoded outputs and the relative L2 error of the raw first output."""
    from benchmarks.corpus.data import ort_runner

    proto = graphopt.to_proto(model) if not hasattr(model, "SerializeToString") else model
    run = ort_runner(proto, threads=2)
    res = task.evaluate(run, n_eval)
    res.raw = [np.asarray(run(f)[0], np.float64) for f in task.eval_feeds(n_eval)]
    row: dict[str, Any] = {"metric": res.metric, "score": round(res.score, 4)}
    row.update({k: round(v, 4) for k, v in res.extra.items() if isinstance(v, float)})
    if ref is not None:
        row["agreement"] = round(task.agreement(ref, res), 4)
        row["output_error"] = round(float(np.mean([np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)
                                                   for a, b in zip(ref.raw, res.raw, strict=True)])), 5)
    return row, res


def int8_rows(name: str, n_calib: int, n_eval: int, roundings: list[str]) -> list[dict[str, Any]]:
    from benchmarks.corpus.data import task
    from graphopt.transform import PassContext, get_pass, get_pipeline, run_passes

    t = task(name)
    base = graphopt.load(str(fetch([name])[name]), check=False)
    run_passes(base, get_pipeline("default"))
    calib = t.calibration(n_calib)
    fp, ref = _score(t, base, n_eval)
    rows = [{"model": name, "variant": "fp32", **fp}]
    for r in roundings:
        m = base.copy()
        q = get_pass("quantize-static", rounding=r, sqnr=False)
        t0 = time.perf_counter()
        run_passes(m, [q, get_pass("dce")], PassContext(calibration=calib))
        secs = time.perf_counter() - t0
        sc, _ = _score(t, m, n_eval, ref)
        rows.append({"model": name, "variant": f"int8 {r}", **sc, "seconds": round(secs, 1),
                     "rounding": q.report.get("rounding", {})})
        logging.getLogger("rounding_corpus").info("%s", rows[-1])
    return rows


def prune_rows(name: str, ratio: float, n_calib: int, n_eval: int, batch: int = 1) -> list[dict[str, Any]]:
    from benchmarks.corpus.data import task
    from graphopt.transform import PassContext, get_pass, get_pipeline, run_passes

    t = task(name)
    base = graphopt.load(str(fetch([name])[name]), check=False)
    run_passes(base, get_pipeline("default"))
    calib = t.calibration(n_calib)
    fp, ref = _score(t, base, n_eval)
    rows = [{"model": name, "variant": "fp32", **fp}]
    m = base.copy()
    t0 = time.perf_counter()
    pr = get_pass("prune-channels", ratio=ratio, recover=True)
    run_passes(m, [pr], PassContext(calibration=calib))
    secs = time.perf_counter() - t0
    sc, _ = _score(t, m, n_eval, ref)
    rows.append({"model": name, "variant": f"prune {ratio} structured, refit layer", **sc, "seconds": round(secs, 1)})
    t0 = time.perf_counter()
    rb = get_pass("refit-blocks", teacher=base, batch=batch)
    run_passes(m, [rb], PassContext(calibration=calib))
    secs2 = time.perf_counter() - t0
    sc, _ = _score(t, m, n_eval, ref)
    rows.append({"model": name, "variant": f"prune {ratio} structured, refit block (batch {batch})", **sc,
                 "seconds": round(secs + secs2, 1), "refit": rb.report})
    return rows


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    RESULTS.mkdir(exist_ok=True)
    jpath = RESULTS / "rounding_corpus.json"
    old = json.loads(jpath.read_text())["rows"] if jpath.exists() else []
    done = {(r["model"], r["variant"]) for r in rows}
    keep = [r for r in old if (r["model"], r["variant"]) not in done]
    allrows = keep + rows
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "calibration_samples": args.calib,
            "eval_samples": args.eval}
    jpath.write_text(json.dumps({"meta": meta, "rows": allrows}, indent=1, default=str) + "\n")
    lines = ["# Learned rounding and block refit on corpus models", "",
             (f"{args.calib} calibration samples, {args.eval} held-out samples (benchmarks/corpus/data.py), "
              f"{meta['date']}. Seconds: the quantize/compress pass on a loaded 2-core machine (indicative). "
              "Agreement: share of held-out samples whose decoded output matches fp32's."), "",
             ("| model | variant | metric | score | exact line | agreement with fp32 | output rel. error vs fp32 | "
              "seconds | layer output error vs nearest |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in allrows:
        ro = r.get("rounding") or {}
        lines.append(f"| {r['model']} | {r['variant']} | {r['metric']} | {r['score']:.4f} | "
                     f"{r.get('exact_line', '-')} | {r.get('agreement', '-')} | {r.get('output_error', '-')} | "
                     f"{r.get('seconds', '-')} | "
                     f"{ro.get('output_error_vs_nearest', '-')} |")
    (RESULTS / "rounding_corpus.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=["ppocrv3_rec", "ppocr_cls"])
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--eval", type=int, default=48)
    ap.add_argument("--roundings", default="nearest,adaround,gptq")
    ap.add_argument("--prune", type=float, default=0.0)
    ap.add_argument("--prune-models", default="ppocrv3_rec")
    ap.add_argument("--no-int8", action="store_true", help="only the pruning rows")
    ap.add_argument("--refit-batch", type=int, default=1, help="refit-blocks' layers per collection run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows: list[dict[str, Any]] = []
    for n in [] if args.no_int8 else args.names:
        rows += int8_rows(n, args.calib, args.eval, args.roundings.split(","))
        write(rows, args)
    if args.prune:
        for n in args.prune_models.split(","):
            rows += prune_rows(n, args.prune, args.calib, args.eval, args.refit_batch)
            write(rows, args)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
