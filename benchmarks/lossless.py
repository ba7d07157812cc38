"""graphopt's default pipeline side by side with onnxsim, onnxslim, onnxoptimizer and ONNX
Runtime's offline basic optimization, in one run, on the same models.

Per model and tool: compute nodes (NOTES.md's definition: Constant nodes and ConstantOfShape of
a constant shape do not count; nodes inside If/Loop/Scan do), file size, tool wall time, ORT
latency of the output (ENABLE_ALL, 2 threads, interleaved rounds, median), output agreement
with the original under ORT, and failures (the tool raised, or its output does not load/run).

Run:  python benchmarks/lossless.py [--rounds 30] [--only light,torch]
Saves benchmarks/results/lossless.json and benchmarks/results/lossless.md.
Needs:  pip install onnxsim onnxslim onnxoptimizer
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import onnx

import graphopt
from graphopt.analysis import model_stats
from graphopt.runtime import compare, interleaved_latency, make_inputs, ort_session

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
DATA = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data"
TOOLS = ["graphopt", "onnxslim", "onnxsim", "onnxoptimizer", "ort-basic"]


def models(only: set[str] | None) -> list[tuple[str, str, Path]]:
    out: list[tuple[str, str, Path]] = []
    groups = {
        "light": sorted(DATA.glob("light/*.onnx")),
        "torch": sorted(HERE.glob("models/*.onnx")) + [Path(graphopt.__file__).parent / "data" / "tinycnn.onnx"],
        "backend": [Path(p) / "model.onnx" for s in ("pytorch-converted", "pytorch-operator", "simple")
                    for p in sorted(glob.glob(str(DATA / s / "*")))],
    }
    for g, paths in groups.items():
        if only and g not in only:
            continue
        for p in paths:
            name = p.stem if g != "backend" else p.parent.name
            out.append((g, name, p))
    return out


def run_tool(tool: str, path: Path, workdir: Path) -> onnx.ModelProto:
    mp = onnx.load(str(path))
    if tool == "graphopt":
        m = graphopt.from_proto(mp, base_dir=path.parent, check=False)
        graphopt.optimize(m)
        return graphopt.to_proto(m)
    if tool == "onnxslim":
        import onnxslim

        return onnxslim.slim(mp)
    if tool == "onnxsim":
        import onnxsim

        res, ok = onnxsim.simplify(mp)
        if not ok:
            raise RuntimeError("onnxsim's own check failed")
        return res
    if tool == "onnxoptimizer":
        import onnxoptimizer

        return onnxoptimizer.optimize(mp, onnxoptimizer.get_fuse_and_elimination_passes())
    if tool == "ort-basic":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.log_severity_level = 4
        out = workdir / "ort_basic.onnx"
        so.optimized_model_filepath = str(out)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return onnx.load(str(out))
    raise ValueError(tool)


def count(mp: onnx.ModelProto) -> int:
    return model_stats(graphopt.from_proto(mp, check=False)).compute_nodes


def geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30, help="interleaved latency rounds")
    ap.add_argument("--only", default="", help="comma list of groups: light,torch,backend")
    ap.add_argument("--latency-min-nodes", type=int, default=20, help="measure latency for models this big")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    results = []
    for group, name, path in models(only):
        orig = onnx.load(str(path))
        try:
            ref_sess = ort_session(orig, optimize=True, threads=2)
        except Exception:  # noqa: BLE001 - ORT has no kernels for this opset: nothing to compare
            continue
        m0 = graphopt.from_proto(orig, base_dir=path.parent, check=False)
        try:
            feeds = make_inputs(m0)
            names = {i.name for i in ref_sess.get_inputs()}
            feeds = {k: v for k, v in feeds.items() if k in names}
            ref = dict(zip([o.name for o in ref_sess.get_outputs()], ref_sess.run(None, feeds), strict=True))
        except Exception:  # noqa: BLE001 - sequence inputs etc.
            continue
        row: dict[str, Any] = {"group": group, "model": name, "nodes": count(orig), "bytes": orig.ByteSize(),
                               "tools": {}}
        sessions = {"original": ref_sess}
        with tempfile.TemporaryDirectory() as d:
            for tool in TOOLS:
                rec: dict[str, Any] = {}
                t0 = time.perf_counter()
                try:
                    out = run_tool(tool, path, Path(d))
                    rec["seconds"] = time.perf_counter() - t0
                    rec["nodes"] = count(out)
                    rec["bytes"] = out.ByteSize()
                    s = ort_session(out, optimize=True, threads=2)
                    got = dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds), strict=True))
                    c = compare(ref, got, rtol=1e-3, atol=1e-4)
                    rec["max_abs"] = c.max_abs
                    rec["ok"] = c.ok
                    if not c.ok:
                        rec["error"] = "mismatch: " + "; ".join(c.problems)[:200]
                    sessions[tool] = s
                except Exception as e:  # noqa: BLE001 - a tool failing is a result, not a crash
                    rec.setdefault("seconds", time.perf_counter() - t0)
                    rec["ok"] = False
                    rec["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
                row["tools"][tool] = rec
        if row["nodes"] >= args.latency_min_nodes:
            row["latency_ms"] = interleaved_latency(sessions, feeds, args.rounds)
        results.append(row)
        g = row["tools"]
        print(f"{group:8s} {name:45s} {row['nodes']:5d} -> " +
              "  ".join(f"{t}={g[t].get('nodes', 'FAIL')}" for t in TOOLS), flush=True)
    report(results)


def report(results: list[dict[str, Any]]) -> None:
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "lossless.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = []
    hdr = "| model | nodes | " + " | ".join(TOOLS) + " |"
    lines += ["### Compute nodes after each tool (fewer is better; FAIL = raised, broken or mismatched output)", "",
              hdr, "|---|---:|" + "---:|" * len(TOOLS)]
    for r in results:
        if r["group"] == "backend":
            continue
        cells = []
        for t in TOOLS:
            rec = r["tools"][t]
            cells.append(str(rec["nodes"]) if rec.get("ok") else "FAIL")
        lines.append(f"| {r['model']} | {r['nodes']} | " + " | ".join(cells) + " |")
    lines += ["", "### Summary over all models (geo-mean over the models every tool handled)", "",
              "| tool | models | failures | geo-mean node ratio (all tools ok) | nodes vs onnxslim (geo-mean, both ok)"
              " | <= onnxslim nodes | total tool time (s) | geo-mean ORT latency vs original |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    common = [r for r in results if all(r["tools"][t].get("ok") for t in TOOLS) and r["nodes"] > 0]
    for t in TOOLS:
        recs = [(r, r["tools"][t]) for r in results]
        fails = [r["model"] for r, x in recs if not x.get("ok")]
        ratios = [r["tools"][t]["nodes"] / r["nodes"] for r in common]
        le = sum(1 for r, x in recs if x.get("ok") and r["tools"]["onnxslim"].get("ok")
                 and x["nodes"] <= r["tools"]["onnxslim"]["nodes"])
        both = sum(1 for r, x in recs if x.get("ok") and r["tools"]["onnxslim"].get("ok"))
        tot = sum(x.get("seconds", 0.0) for _, x in recs)
        lat = [r["latency_ms"][t] / r["latency_ms"]["original"] for r, x in recs
               if "latency_ms" in r and t in r["latency_ms"]]
        pair = [x["nodes"] / r["tools"]["onnxslim"]["nodes"] for r, x in recs
                if x.get("ok") and r["tools"]["onnxslim"].get("ok") and r["tools"]["onnxslim"]["nodes"] > 0]
        lines.append(f"| {t} | {len(recs)} | {len(fails)} | {geomean(ratios):.3f} | {geomean(pair):.3f} | {le}/{both} "
                     f"| {tot:.2f} | {geomean(lat):.3f} |")
    lat_rows = [r for r in results if "latency_ms" in r and r["group"] != "backend"]
    if lat_rows:
        lines += ["", "### ORT latency (ms, ENABLE_ALL, 2 threads, median of interleaved rounds)", "",
                  "| model | original | " + " | ".join(TOOLS) + " |", "|---|---:|" + "---:|" * len(TOOLS)]
        for r in lat_rows:
            lines.append(f"| {r['model']} | {r['latency_ms']['original']:.3f} | " +
                         " | ".join(f"{r['latency_ms'][t]:.3f}" if t in r["latency_ms"] else "FAIL" for t in TOOLS)
                         + " |")
    fails = [(r["model"], t, r["tools"][t]["error"]) for r in results for t in TOOLS if not r["tools"][t].get("ok")]
    if fails:
        lines += ["", "### Failures", ""] + [f"- {m} / {t}: {e}" for m, t, e in fails]
    text = "\n".join(lines) + "\n"
    (out_dir / "lossless.md").write_text(text)
    print()
    print(text)


if __name__ == "__main__":
    sys.exit(main())
