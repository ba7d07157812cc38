"""The HTML form of a :class:`graphopt.report.Report`: one self-contained file with SVG plots.

No network, no JavaScript, no plotting library: the plots are SVG written here (a few bar charts
and scatter plots do not need matplotlib, and the file then opens anywhere, offline). Plots:

- per pass (or compile stage): compute nodes, parameters, size, FLOPs, latency, output error and
  time after each pass, one horizontal bar chart per figure the report has;
- per layer: SQNR (dB, lowest first) or sensitivity, or the share of a layer kept by pruning, one
  bar per layer coloured by its precision (int8 / float32 / float16) or by what was done to it;
- trade-offs: size vs latency and latency vs output error, the model before and after and every
  candidate the command measured;
- kernels by schedule (compile).

Every plotted datum is an SVG element with ``data-*`` attributes (``class="bar"`` /
``class="point"``), and the report itself is embedded as JSON
(``<script type="application/json" id="graphopt-report">``), so a test or a script can read the
page back.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from graphopt.report import (
    Report,
    _candidate_rows,
    _counter_value,
    _layer_table,
    _pass_table_rows,
    _shapes,
    _sorted_layers,
    _verification_rows,
    human,
    summary_rows,
)

#: colours (colour-blind safe, Okabe-Ito) by precision / role
COLORS = {"int8": "#0072B2", "uint8": "#0072B2", "float32": "#E69F00", "float16": "#009E73",
          "bfloat16": "#CC79A7", "before": "#7f7f7f", "after": "#D55E00", "candidate": "#56B4E9",
          "changed": "#0072B2", "unchanged": "#bdbdbd", "bar": "#0072B2", None: "#999999"}
FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif"
MAX_LAYERS = 60


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _byte_scale(hi: float) -> tuple[float, str]:
    """The binary unit an axis of byte values up to ``hi`` is labelled in."""
    for k, u in enumerate(("B", "KiB", "MiB", "GiB")):
        if hi < 1024 ** (k + 1) or u == "GiB":
            return float(1024 ** k), u
    return 1.0, "B"


def _ticks(hi: float, lo: float = 0.0, unit: str = "") -> list[float]:
    """Round ticks; for bytes, round in the axis's binary unit (0, 100, 200 KiB, not 97.66 KiB)."""
    if unit != "B":
        return _nice_ticks(hi, lo)
    scale, _ = _byte_scale(max(abs(hi), abs(lo)))
    return [t * scale for t in _nice_ticks(hi / scale, lo / scale)]


def _tick_label(v: float, unit: str, hi: float) -> str:
    if unit == "B":
        scale, u = _byte_scale(hi)
        return f"{v / scale:g} {u}" if v else "0"
    if unit == "count" and abs(hi) >= 1000:
        k = min(int(math.log10(abs(hi)) // 3), 4)
        return f"{v / 1000 ** k:g}{' KMGT'[k]}" if v else "0"
    return _fmt_num(v, unit)


def _nice_ticks(hi: float, lo: float = 0.0, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not math.isfinite(hi) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 0.999:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt_num(v: float, unit: str = "") -> str:
    if unit == "B":
        return human(v, "B")
    if unit == "count":
        return human(v)
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return human(v)
    if abs(v) >= 10:
        return f"{v:.0f}"
    if abs(v) >= 0.001:
        return f"{v:.3g}"
    return f"{v:.1e}"


def _text(x: float, y: float, s: str, *, size: int = 11, anchor: str = "start", weight: str = "normal",
          fill: str = "#222", rotate: float | None = None, cls: str = "") -> str:
    tr = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate else ""
    c = f' class="{cls}"' if cls else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" font-weight="{weight}" '
            f'fill="{fill}"{tr}{c}>{_e(s)}</text>')


def _svg_open(kind: str, chart_id: str, width: int, height: int, title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart {kind}" id="{_e(chart_id)}" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}" style="{FONT}">')


def _truncate(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n // 2 - 1] + "…" + s[-(n - n // 2):]


def hbar_chart(title: str, labels: Sequence[str], values: Sequence[float | None], *, xlabel: str,
               colors: Sequence[str] | None = None, unit: str = "", legend: Sequence[tuple[str, str]] = (),
               chart_id: str = "", width: int = 520, origin: float | None = None) -> str:
    """A horizontal bar chart as an ``<svg>`` string: one bar per label (missing values drawn
    as a gap with '-'), value printed at the bar's end, x axis with round ticks. ``origin``
    (default 0, or the smallest value when bars go negative) is where the bars start."""
    vals = [None if v is None or not math.isfinite(v) else float(v) for v in values]
    present = [v for v in vals if v is not None]
    lo = min([0.0, *present]) if origin is None else origin
    hi = max([lo + 1e-12, *present])
    ticks = _ticks(hi, lo, unit)
    lo, hi = ticks[0], ticks[-1]
    label_w = min(250, 12 + 5.8 * max([len(s) for s in labels] + [4]))
    top, bar_h, gap = 44 + (18 if legend else 0), 14, 5
    plot_w = width - label_w - 60
    height = top + len(labels) * (bar_h + gap) + 46
    sx = (lambda v: label_w + (v - lo) / (hi - lo) * plot_w)
    out = [_svg_open("bar-chart", chart_id, width, height, title),
           _text(width / 2, 18, title, size=13, anchor="middle", weight="bold", cls="chart-title")]
    if legend:
        x = label_w
        for name, col in legend:
            out.append(f'<rect x="{x:.1f}" y="30" width="10" height="10" fill="{col}"/>')
            out.append(_text(x + 14, 39, name, size=11, cls="legend"))
            x += 22 + 6.5 * len(name)
    axis_y = top + len(labels) * (bar_h + gap)
    for t in ticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{axis_y}" stroke="#e5e5e5"/>')
        out.append(_text(x, axis_y + 14, _tick_label(t, unit, hi), size=10, anchor="middle", fill="#555"))
    out.append(f'<line x1="{sx(lo):.1f}" y1="{top - 4}" x2="{sx(lo):.1f}" y2="{axis_y}" stroke="#444"/>')
    out.append(f'<line x1="{label_w}" y1="{axis_y}" x2="{label_w + plot_w}" y2="{axis_y}" stroke="#444"/>')
    out.append(_text(label_w + plot_w / 2, axis_y + 34, xlabel, size=11, anchor="middle", cls="axis-label"))
    base = sx(max(lo, 0.0)) if lo < 0 < hi else sx(lo)
    for i, (lab, v) in enumerate(zip(labels, vals, strict=True)):
        y = top + i * (bar_h + gap)
        out.append(_text(label_w - 6, y + bar_h - 3, _truncate(lab, 42), size=10, anchor="end"))
        if v is None:
            out.append(_text(base + 4, y + bar_h - 3, "-", size=10, fill="#888"))
            continue
        x0, x1 = sorted((base, sx(v)))
        col = colors[i] if colors else COLORS["bar"]
        out.append(f'<rect class="bar" x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 1.0):.1f}" height="{bar_h}" '
                   f'fill="{col}" data-label="{_e(lab)}" data-value="{v:.6g}"><title>{_e(lab)}: '
                   f'{_e(_fmt_num(v, unit))}</title></rect>')
        tx = x1 + 4 if x1 + 60 < label_w + plot_w + 56 else x1 - 4
        out.append(_text(tx, y + bar_h - 3, _fmt_num(v, unit), size=10,
                         anchor="start" if tx > x1 else "end", fill="#333" if tx > x1 else "#fff"))
    out.append("</svg>")
    return "\n".join(out)


def scatter_chart(title: str, points: Sequence[dict[str, Any]], *, xlabel: str, ylabel: str, xunit: str = "",
                  yunit: str = "", chart_id: str = "", width: int = 520, height: int = 340) -> str:
    """A scatter plot as an ``<svg>`` string. Each point: ``x``, ``y``, ``label``, ``kind``
    (before / after / candidate) and ``chosen``; axes start at zero (ratios read honestly)."""
    pts = [p for p in points if p.get("x") is not None and p.get("y") is not None
           and math.isfinite(p["x"]) and math.isfinite(p["y"])]
    left, right, top, bottom = 70, 34, 52, 50
    pw, ph = width - left - right, height - top - bottom
    xt = _ticks(max([p["x"] for p in pts] + [1e-12]) * 1.08, 0.0, xunit)
    yt = _ticks(max([p["y"] for p in pts] + [1e-12]) * 1.12, 0.0, yunit)
    sx = (lambda v: left + (v - xt[0]) / (xt[-1] - xt[0]) * pw)
    sy = (lambda v: top + ph - (v - yt[0]) / (yt[-1] - yt[0]) * ph)
    out = [_svg_open("scatter-chart", chart_id, width, height, title),
           _text(width / 2, 18, title, size=13, anchor="middle", weight="bold", cls="chart-title")]
    x: float = left
    names = (("teacher", "before"), ("student (written)", "after"), ("student before", "candidate")) \
        if chart_id.startswith("distill") else (("before", "before"), ("after (written)", "after"), ("candidate", "candidate"))
    for name, kind in names:
        if any(p["kind"] == kind for p in pts):
            out.append(f'<circle cx="{x + 5}" cy="35" r="5" fill="{COLORS[kind]}"/>')
            out.append(_text(x + 14, 39, name, size=11, cls="legend"))
            x += 24 + 6.5 * len(name)
    for t in xt:
        out.append(f'<line x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{top + ph}" stroke="#eee"/>')
        out.append(_text(sx(t), top + ph + 14, _tick_label(t, xunit, xt[-1]), size=10, anchor="middle", fill="#555"))
    for t in yt:
        out.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + pw}" y2="{sy(t):.1f}" stroke="#eee"/>')
        out.append(_text(left - 5, sy(t) + 3, _tick_label(t, yunit, yt[-1]), size=10, anchor="end", fill="#555"))
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    out.append(_text(left + pw / 2, height - 10, xlabel, size=11, anchor="middle", cls="axis-label"))
    out.append(_text(16, top + ph / 2, ylabel, size=11, anchor="middle", rotate=-90, cls="axis-label"))
    # candidates drawn under before/after; labels: before/after first, the others moved up or
    # down, alternately, until they clear the labels already placed
    order = sorted(range(len(pts)), key=lambda i: {"candidate": 0, "before": 1, "after": 2}[pts[i]["kind"]])
    label_y: dict[int, float] = {}
    spans: list[tuple[float, float, float]] = []  # x0, x1, y of the labels placed

    def span(i: int) -> tuple[float, float]:  # the x extent of point i's label (about 6 px a character)
        cx, w = sx(pts[i]["x"]), 6.0 * min(len(pts[i]["label"]), 28)
        return (cx - 8 - w, cx - 8) if cx > left + pw * 0.7 else (cx + 8, cx + 8 + w)

    for i in sorted(order, key=lambda i: {"candidate": 2, "before": 0, "after": 1}[pts[i]["kind"]]):
        cy = sy(pts[i]["y"])
        x0, x1 = span(i)
        for k in range(16):
            ly = cy - 8 + (1 if k % 2 else -1) * 12 * ((k + 1) // 2)
            clear = not any(abs(ly - y) < 11 and x0 < b and a < x1 for a, b, y in spans)
            if clear and top + 8 < ly < top + ph + 4:
                break
        spans.append((x0, x1, ly))
        label_y[i] = ly
    for i in order:
        p = pts[i]
        cx, cy = sx(p["x"]), sy(p["y"])
        r = 6 if p["kind"] != "candidate" else 4.5
        ring = ' stroke="#000" stroke-width="2"' if p.get("chosen") else ' stroke="#fff" stroke-width="1"'
        out.append(f'<circle class="point" cx="{cx:.1f}" cy="{cy:.1f}" r="{r}" fill="{COLORS[p["kind"]]}"{ring} '
                   f'data-label="{_e(p["label"])}" data-kind="{p["kind"]}" data-x="{p["x"]:.6g}" '
                   f'data-y="{p["y"]:.6g}"><title>{_e(p["label"])}: {_e(_fmt_num(p["x"], xunit))}, '
                   f'{_e(_fmt_num(p["y"], yunit))}</title></circle>')
        ly = label_y[i]
        anchor = "end" if cx > left + pw * 0.7 else "start"
        out.append(_text(cx + (-8 if anchor == "end" else 8), ly, _truncate(p["label"], 28), size=10, anchor=anchor,
                         fill="#333"))
    out.append("</svg>")
    return "\n".join(out)


# -- the report's plots ---------------------------------------------------------------------------

_PASS_METRICS: list[tuple[str, str, str, str, Callable[[Any], float | None]]] = [
    ("nodes_after", "Compute nodes after each pass", "compute nodes", "count", lambda p: p.nodes_after),
    ("params_after", "Parameters after each pass", "parameters", "count", lambda p: p.params_after),
    ("size_bytes_after", "Size after each pass", "size", "B", lambda p: p.size_bytes_after),
    ("flops_after", "FLOPs after each pass", "FLOPs", "count", lambda p: p.flops_after),
    ("latency_ms_after", "ORT latency after each pass", "latency (ms)", "", lambda p: p.latency_ms_after),
    ("output_rel_error", "Output error each pass added", "relative L2 error vs the stage before", "",
     lambda p: p.output_rel_error),
    ("seconds", "Time per pass", "seconds", "", lambda p: p.seconds),
]


def pass_charts(r: Report) -> list[str]:
    """One bar chart per per-pass figure the report holds: the input model first, then the
    passes that changed the model (a pipeline's passes that changed nothing are left out of
    the plots; the table lists them)."""
    if not r.passes:
        return []
    charts = []
    stage = "stage" if r.command == "compile" else "pass"
    shown = [p for k, p in enumerate(r.passes) if p.changed is not False or k == len(r.passes) - 1]
    hidden = len(r.passes) - len(shown)
    for key, title, xlabel, unit, get in _PASS_METRICS:
        vals = [get(p) for p in shown]
        if all(v is None for v in vals) or (key != "seconds" and all(not v for v in vals)):
            continue
        labels = [p.name for p in shown]
        colors = [COLORS["changed"] if p.changed is not False else COLORS["unchanged"] for p in shown]
        legend: list[tuple[str, str]] = []
        if key.endswith("_after"):  # the input model first, so each bar reads against it
            first = getattr(r.passes[0], key.replace("_after", "_before"))
            if first is not None:
                labels, vals, colors = ["(input)", *labels], [first, *vals], [COLORS["before"], *colors]
                legend = [("input", COLORS["before"]), (f"after the {stage}", COLORS["changed"])]
        title = title.replace("pass", stage)
        if hidden:
            title += f" ({hidden} without change not shown)"
        charts.append(hbar_chart(title, labels, vals, xlabel=xlabel, unit=unit, colors=colors, legend=legend,
                                 chart_id=f"pass-{key}"))
    return charts


def layer_chart(r: Report) -> str | None:
    """Per-layer bars: SQNR (dB) where measured, else sensitivity, else the share of the layer
    kept by compression; worst first, at most ``MAX_LAYERS``, coloured by precision."""
    layers = _sorted_layers(r.layers)
    for key, label, unit in (("sqnr_db", "SQNR of the layer's output (dB, higher is better)", ""),
                             ("sensitivity", "output error with only this layer changed", ""),
                             ("kept_fraction", "share of the layer kept", "")):
        rows = [x for x in layers if getattr(x, key) is not None]
        if rows:
            break
    else:
        return None
    shown = rows[:MAX_LAYERS]
    title = {"sqnr_db": "Per-layer SQNR, lowest first", "sensitivity": "Per-layer sensitivity, highest first",
             "kept_fraction": "Per-layer share kept"}[key]
    if len(rows) > len(shown):
        title += f" ({len(shown)} of {len(rows)})"
    if key == "kept_fraction":
        kinds = [x.source or "" for x in shown]
        palette = dict(zip(sorted(set(kinds)), ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00"], strict=False))
        colors = [palette.get(k, "#999") for k in kinds]
        legend = list(palette.items())
    else:
        colors = [COLORS.get(x.precision, "#999") for x in shown]
        legend = [(p, COLORS.get(p, "#999")) for p in dict.fromkeys(x.precision for x in shown) if p]
    return hbar_chart(title, [x.name for x in shown], [getattr(x, key) for x in shown], xlabel=label, unit=unit,
                      colors=colors, legend=legend, chart_id=f"layers-{key}", width=560)


def tradeoff_points(r: Report) -> list[dict[str, Any]]:
    """The before / after / candidate points of the trade-off plots (size, latency, error)."""
    v = r.verification
    err_after = v.output_rel_error if v is not None else None
    if r.command == "distill":  # the reference is the teacher: the candidates are the points
        return [{"label": c.name, "kind": "after" if c.chosen else "before" if c.name == "teacher" else "candidate",
                 "size": c.size_bytes, "latency": c.latency_ms, "error": c.error, "chosen": c.chosen}
                for c in r.candidates]
    pts = [{"label": "before", "kind": "before", "size": r.before.size_bytes,
            "latency": r.latency.before_ms if r.latency else None, "error": 0.0, "chosen": False},
           {"label": "after", "kind": "after", "size": r.after.size_bytes,
            "latency": r.latency.after_ms if r.latency else None, "error": err_after, "chosen": not r.candidates}]
    for c in r.candidates:
        pts.append({"label": c.name, "kind": "candidate", "size": c.size_bytes, "latency": c.latency_ms,
                    "error": c.error, "chosen": c.chosen})
    return pts


def tradeoff_charts(r: Report) -> list[str]:
    """Size vs latency, and latency (or size) vs output error, for every point that has both."""
    pts = tradeoff_points(r)
    err_label = "output error (relative L2)"
    charts = []

    def xy(xk: str, yk: str) -> list[dict[str, Any]]:
        out = [{**p, "x": p[xk], "y": p[yk]} for p in pts if p[xk] is not None and p[yk] is not None]
        if any(p["kind"] == "after" for p in out):  # the chosen candidate is the written model: one point
            out = [p for p in out if not (p["kind"] == "candidate" and p["chosen"])]
        return out

    pre = "distill-" if r.command == "distill" else ""
    a = xy("size", "latency")
    if len(a) >= 2:
        charts.append(scatter_chart("Size vs latency", a, xlabel="size", ylabel="latency (ms)", xunit="B",
                                    chart_id=f"{pre}tradeoff-size-latency"))
    b = xy("latency", "error")
    if len(b) >= 2:
        charts.append(scatter_chart("Latency vs output error", b, xlabel="latency (ms)", ylabel=err_label,
                                    chart_id=f"{pre}tradeoff-latency-error"))
    elif len(c := xy("size", "error")) >= 2:
        charts.append(scatter_chart("Size vs output error", c, xlabel="size", ylabel=err_label, xunit="B",
                                    chart_id=f"{pre}tradeoff-size-error"))
    return charts


def line_chart(title: str, ys: Sequence[float], *, xlabel: str, ylabel: str, chart_id: str = "",
               width: int = 520, height: int = 300) -> str:
    """A line over ``ys`` (x = 1..n), y axis from zero; every vertex is a ``class="point"``
    element (small, drawn only where there are few) so the page can be read back."""
    left, right, top, bottom = 70, 24, 40, 50
    pw, ph = width - left - right, height - top - bottom
    n = max(len(ys), 2)
    yt = _nice_ticks(max([*ys, 1e-12]) * 1.05, min([0.0, *ys]))
    sx = (lambda i: left + i / (n - 1) * pw)
    sy = (lambda v: top + ph - (v - yt[0]) / (yt[-1] - yt[0]) * ph)
    out = [_svg_open("line-chart", chart_id, width, height, title),
           _text(width / 2, 18, title, size=13, anchor="middle", weight="bold", cls="chart-title")]
    for t in yt:
        out.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + pw}" y2="{sy(t):.1f}" stroke="#eee"/>')
        out.append(_text(left - 5, sy(t) + 3, _fmt_num(t), size=10, anchor="end", fill="#555"))
    for t in _nice_ticks(float(n), 1.0):
        if 1 <= t <= n:
            out.append(_text(sx(t - 1), top + ph + 14, f"{t:g}", size=10, anchor="middle", fill="#555"))
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    pts = " ".join(f"{sx(i):.1f},{sy(v):.1f}" for i, v in enumerate(ys))
    out.append(f'<polyline points="{pts}" fill="none" stroke="{COLORS["bar"]}" stroke-width="1.5"/>')
    for i, v in enumerate(ys):
        out.append(f'<circle class="point" cx="{sx(i):.1f}" cy="{sy(v):.1f}" r="{2 if len(ys) <= 60 else 0}" '
                   f'fill="{COLORS["bar"]}" data-x="{i + 1}" data-y="{v:.6g}"/>')
    out.append(_text(left + pw / 2, height - 10, xlabel, size=11, anchor="middle", cls="axis-label"))
    out.append(_text(16, top + ph / 2, ylabel, size=11, anchor="middle", rotate=-90, cls="axis-label"))
    out.append("</svg>")
    return "\n".join(out)


def candidate_chart(r: Report) -> str | None:
    """Every candidate's latency (or, without latencies, its output error) as bars, the one
    written in the 'after' colour: the candidates a scatter cannot place (no size or error)."""
    for key, label in (("latency_ms", "latency (ms)"), ("error", "output error (relative L2)")):
        if sum(getattr(c, key) is not None for c in r.candidates) >= 2:
            break
    else:
        return None
    rows = [c for c in r.candidates if getattr(c, key) is not None]
    return hbar_chart(f"Candidates: {label.split(' (')[0]}", [c.name for c in rows], [getattr(c, key) for c in rows],
                      xlabel=label, colors=[COLORS["after"] if c.chosen else COLORS["candidate"] for c in rows],
                      legend=[("written", COLORS["after"]), ("tried", COLORS["candidate"])], chart_id=f"candidates-{key}")


def kernel_chart(r: Report) -> str | None:
    if not r.kernels:
        return None
    counts: dict[str, int] = {}
    for k in r.kernels:
        counts[k.schedule] = counts.get(k.schedule, 0) + 1
    names = sorted(counts, key=lambda k: -counts[k])
    return hbar_chart("Kernels by schedule", names, [counts[k] for k in names], xlabel="kernels", unit="count",
                      chart_id="kernels")


# -- the page -------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:24px auto;max-width:1180px;
color:#222;padding:0 16px;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:13px;margin-bottom:12px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:130px}
.card .v{font-size:20px;font-weight:600}.card .k{font-size:12px;color:#666}
.plots{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.plots svg{border:1px solid #eee;border-radius:4px;background:#fff}
table{border-collapse:collapse;font-size:12.5px;margin:4px 0 8px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f5f5f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
details{margin:6px 0}summary{cursor:pointer;color:#0057a0}
.note{font-size:13px;color:#444}
"""


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    def cell(c: Any) -> str:
        s = str(c)
        num = s.replace(".", "", 1).replace("-", "", 1).replace("e", "", 1).replace("x", "").strip().isdigit()
        return f'<td class="n">{_e(s)}</td>' if num else f"<td>{_e(s)}</td>"
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cards(r: Report) -> str:
    cards = []
    b, a = r.before, r.after
    if b.size_bytes and a.size_bytes is not None:
        cards.append((f"{human(b.size_bytes, 'B')} → {human(a.size_bytes, 'B')}", f"size ({a.size_bytes / b.size_bytes:.2f}x)"))
    if b.nodes and a.nodes is not None:
        cards.append((f"{b.nodes} → {a.nodes}", "compute nodes"))
    if r.latency:
        cards.append((f"{r.latency.before_ms:.3g} → {r.latency.after_ms:.3g} ms",
                      f"latency ({r.latency.ratio:.2f}x, {r.latency.runtime_after})"))
    v = r.verification
    if v is not None and v.max_abs_error is not None:
        plural = "s" if v.samples != 1 else ""
        cards.append((f"{v.max_abs_error:.3g}", f"max abs error ({v.samples} sample{plural}, {v.data})"))
    if v is not None and v.top1_agreement is not None:
        cards.append((f"{v.top1_agreement:.3f}", "top-1 agreement"))
    n_int8 = sum(x.precision == "int8" for x in r.layers)
    if n_int8:
        cards.append((f"{n_int8} / {len(r.layers)}", "layers in int8"))
    if r.seconds is not None:
        cards.append((f"{r.seconds:.1f} s", f"{r.command} time"))
    return '<div class="cards">' + "".join(f'<div class="card"><div class="v">{_e(v)}</div><div class="k">{_e(k)}'
                                          f"</div></div>" for v, k in cards) + "</div>"


def render_html(r: Report) -> str:
    """The whole page (see the module docstring)."""
    head = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>graphopt {_e(r.command)} report</title><style>{_CSS}</style></head><body>")
    meta = (f'<div class="meta">{_e(r.input or "")} → {_e(r.output or "")} · graphopt {_e(r.graphopt_version)} · '
            f"schema {_e(r.schema)}</div>")
    parts = [head,
             f"<h1>graphopt {_e(r.command)}</h1>", meta]
    if r.input_shapes:
        parts.append(f'<div class="meta">input shapes: {_e(_shapes(r))}</div>')
    parts.append(_cards(r))
    # one flow of plots, two to a row: trade-offs, candidates and layers, passes or stages, curves
    lc, cc, kc = layer_chart(r), candidate_chart(r), kernel_chart(r)
    plots = [*tradeoff_charts(r), *([cc] if cc else []), *([lc] if lc else []), *pass_charts(r), *([kc] if kc else []),
             *[line_chart(f"{k} per step", v, xlabel="step", ylabel=k, chart_id=f"series-{k}")
               for k, v in r.series.items() if v]]
    if plots:
        parts += ['<h2>Plots</h2><div class="plots">', *plots, "</div>"]
    parts.append("<h2>Tables</h2>")
    rows = summary_rows(r)
    if rows:
        parts.append(_html_table(["", "before", "after", "ratio"], rows))
    if r.verification:
        parts.append(_html_table(["output check", "value"], _verification_rows(r.verification)))
    if r.passes:
        parts.append(_html_table(*_pass_table_rows(r)))
    if r.candidates:
        parts.append(_html_table(*_candidate_rows(r)))
    if r.layers:
        h, lrows = _layer_table(r, None)
        parts.append(f"<details{' open' if len(lrows) <= 20 else ''}><summary>layers ({len(lrows)})</summary>"
                     + _html_table(h, lrows) + "</details>")
    if r.counters:
        parts.append("<details><summary>counters</summary>" + _html_table(
            ["", "value"], [[k, _counter_value(v)] for k, v in r.counters.items()]) + "</details>")
    if r.settings:
        parts.append("<details><summary>settings</summary>" + _html_table(
            ["option", "value"], [[k, json.dumps(v) if not isinstance(v, str) else v] for k, v in r.settings.items()])
            + "</details>")
    if r.before.ops or r.after.ops:
        ops = sorted(set(r.before.ops) | set(r.after.ops),
                     key=lambda k: -(r.before.ops.get(k, 0) + r.after.ops.get(k, 0)))
        parts.append("<details><summary>ops</summary>" + _html_table(
            ["op", "before", "after"], [[k, r.before.ops.get(k, 0), r.after.ops.get(k, 0)] for k in ops]) + "</details>")
    for n in r.notes:
        parts.append(f'<p class="note">{_e(n)}</p>')
    data = json.dumps(r.to_dict(), allow_nan=False).replace("</", "<\\/")
    parts.append(f'<script type="application/json" id="graphopt-report">{data}</script>')
    parts.append("</body></html>\n")
    return "\n".join(parts)
