"""Print the README's real-model tables from the corpus benchmarks' results files.

The README's figures are not typed by hand: they come from ``benchmarks/results/*.json`` written by
``benchmarks.realworld``, ``benchmarks.lossless_corpus``, ``benchmarks.int8_corpus`` and
``benchmarks.float16_corpus``. Run ``python -m benchmarks.readme_tables`` and paste its output
between the README's ``<!-- corpus-tables -->`` markers (or pass ``--write`` to do that).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from benchmarks.corpus import ENTRIES

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = ["inspect", "optimize", "verify", "quantize", "quantize-dyn", "compress", "compile", "bench"]


def _load(name: str) -> Any:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def matrix_table() -> str:
    rw = _load("realworld")
    lo = {r["model"]: r for r in (_load("lossless_corpus") or [])}
    if rw is None:
        return ""
    totals = {"ok": 0, "refused": 0, "failure": 0}
    rows = ["| model | exporter | task | cells ok / refused / failed | compute nodes: original → graphopt "
            "(onnxslim, onnxsim) |", "|---|---|---|---|---|"]
    for e in ENTRIES:
        m = rw["models"].get(e.name)
        if m is None:
            continue
        st = [m["cells"][c]["status"] for c in COMMANDS if c in m["cells"]]
        n = {k: sum(s == k for s in st) for k in totals}
        for k in totals:
            totals[k] += n[k]
        def which(status: str) -> list[str]:
            return [c for c in COMMANDS if c in m["cells"] and m["cells"][c]["status"] == status]
        notes = [f"{s}: {', '.join(which(s))}" for s in ("refused", "failure") if which(s)]
        cells = f"{n['ok']} / {n['refused']} / {n['failure']}" + (f" ({'; '.join(notes)})" if notes else "")
        nodes = "-"
        if e.name in lo:
            r = lo[e.name]
            t = r["tools"]

            def peer(k: str) -> str:
                return str(t[k]["nodes"]) if t[k].get("ok") else "fails"
            nodes = f"{r['nodes']} → **{t['graphopt']['nodes']}** ({peer('onnxslim')}, {peer('onnxsim')})"
        rows.append(f"| {e.name} | {e.exporter} | {e.kind} | {cells} | {nodes} |")
    rows.append(f"| **all** | | | **{totals['ok']} / {totals['refused']} / {totals['failure']}** | |")
    return "\n".join(rows)


def int8_table() -> str:
    d = _load("int8_corpus")
    if d is None:
        return ""
    rows = ["| model | metric (agreement with fp32) | size graphopt (ORT) | latency vs fp32 graphopt (ORT) | "
            "agreement graphopt (ORT) |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        g, o = r.get("graphopt", {}), r.get("ort", {})
        if "size_ratio" not in g:
            continue
        lat = (f"{_f(g.get('latency_ratio'))} ±{_f(g.get('latency_spread'))} "
               f"({_f(o.get('latency_ratio'))} ±{_f(o.get('latency_spread'))})")
        rows.append(f"| {r['model']} | {g.get('metric', '').replace(' agreement', '')} | "
                    f"{_f(g.get('size_ratio'))}x ({_f(o.get('size_ratio'))}x) | {lat} | "
                    f"{_f(g.get('agreement'))} ({_f(o.get('agreement'))}) |")
    return "\n".join(rows)


def float16_summary() -> str:
    d = _load("float16_corpus")
    if d is None:
        return ""
    tools = ["graphopt-weights", "graphopt-fp16", "onnxconverter-common", "onnxsim"]
    out = ["| tool | valid corpus models | valid onnx test models | median size | task score changed |",
           "|---|---:|---:|---:|---|"]
    for t in tools:
        rs = [r["tools"].get(t, {}) for r in d["corpus"]]
        valid = [r for r in rs if r.get("status") == "valid"]
        sizes = sorted(r["size_ratio"] for r in valid if r.get("size_ratio"))
        med = sizes[len(sizes) // 2] if sizes else float("nan")
        changed = [f"{row['model']} {r['score'] - row['fp32_score']:+.2f}" for row, r in zip(d["corpus"], rs, strict=True)
                   if r.get("status") == "valid" and isinstance(r.get("score"), float)
                   and not math.isnan(r["score"]) and abs(r["score"] - row["fp32_score"]) > 0.001]
        bc = d.get("backend", {}).get("counts", {}).get(t, {})
        back = f"{bc.get('valid', '-')}/{d.get('backend', {}).get('models', '-')}" if bc else "-"
        out.append(f"| {t} | {len(valid)}/{len(rs)} | {back} | {_f(med)}x | {', '.join(changed) or 'none'} |")
    return "\n".join(out)


def render() -> str:
    parts = ["### Every command on every corpus model (`python -m benchmarks.realworld`)", "", matrix_table(), "",
             "### INT8 next to ONNX Runtime's `quantize_static` (`python -m benchmarks.int8_corpus`)", "",
             int8_table(), "", "### float16 (`python -m benchmarks.float16_corpus`)", "", float16_summary()]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.readme_tables")
    ap.add_argument("--write", action="store_true", help="replace the README's corpus-tables block")
    a = ap.parse_args(argv)
    text = render()
    if a.write:
        src = README.read_text()
        new, n = re.subn(r"(<!-- corpus-tables -->\n).*?(<!-- /corpus-tables -->)",
                         lambda m: m.group(1) + text + "\n" + m.group(2), src, flags=re.DOTALL)
        if n != 1:
            raise SystemExit("README.md has no <!-- corpus-tables --> ... <!-- /corpus-tables --> block")
        README.write_text(new)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
