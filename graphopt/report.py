"""Reports: one typed model for what every command did, written as JSON, markdown or HTML.

Every command that changes a model (``optimize``, ``quantize``, ``compress``, ``convert``,
``compile``, ``distill``) describes its run with one :class:`Report`: the model before and after,
a row per pass (or compile stage), the comparison of outputs, a row per layer where a command
decides layer by layer (quantize, compress, convert), the candidates it tried, latency where it
was measured, and the input shapes the figures were measured at. Numbers stay numbers: the JSON
(schema ``graphopt.report/1``, JSON Schema shipped as ``graphopt/data/report.schema.json``) holds
ints and floats, never formatted strings; formatting happens only when a report is rendered as a
table (console, markdown) or plotted (HTML, :mod:`graphopt.report_html`).

Why one model: the same facts used to be formatted by each command into ``[label, "text"]`` rows,
so JSON reports held strings and empty sections, and the console printed dict reprs. Commands now
fill a :class:`Report`; :meth:`Report.write` picks the format from the file suffix.

Plain-text helpers (:func:`human`, :func:`table`, :func:`write_atomic`) are used by other commands
(``inspect``, ``passes``, ``verify``, ``bench``) too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.errors import GraphoptError
from graphopt.transform import PassRecord

#: the ``schema`` field of every JSON report; bumped when a field changes meaning or goes away
SCHEMA_ID = "graphopt.report/1"
#: the formats :meth:`Report.write` writes, by file suffix
FORMATS = {".json": "json", ".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html"}


# -- plain-text helpers -------------------------------------------------------------------------


def human(n: float | None, unit: str = "") -> str:
    """1234567 -> '1.23M' (bytes: '1.18 MiB')."""
    if n is None:
        return "-"
    if unit == "B":
        for u in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or u == "TiB":
                return f"{n:.0f} {u}" if u == "B" else f"{n:.2f} {u}"
            n /= 1024
    for u in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or u == "T":
            return f"{n:.0f}{u}" if u == "" else f"{n:.2f}{u}"
        n /= 1000
    return str(n)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, markdown: bool = False) -> str:
    """Align ``rows`` under ``headers`` (numbers right-aligned); markdown pipe table if asked."""
    cells = [[str(c) for c in r] for r in rows]
    if markdown:
        cells = [[c.replace("|", "\\|") for c in r] for r in cells]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_isnum(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def fmt(r: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    lines = [fmt(list(headers))]
    if markdown:
        lines.append("|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2))
                                     for w, num in zip(widths, numeric, strict=True)) + "|")
    else:
        lines.append("  ".join("-" * w for w in widths))
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def _isnum(s: str) -> bool:
    s = s.strip().rstrip("%KMGTx").replace(",", "").replace(" MiB", "").replace(" KiB", "").replace(" B", "")
    if s in ("-", ""):
        return True
    try:
        float(s)
        return True
    except ValueError:
        return False


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory (never a half
    file). The directory must exist: graphopt does not create directories for its outputs."""
    p = Path(path)
    if not p.parent.is_dir():
        raise GraphoptError(f"cannot write {str(p)!r}: directory {str(p.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".graphopt-", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def report_format(path: str | os.PathLike[str]) -> str:
    """``json``, ``markdown`` or ``html`` from the suffix of ``path``; anything else is an error
    (checked before a command does any work, so a typo costs nothing)."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise GraphoptError(f"report {str(path)!r}: unknown format {suffix or '(no suffix)'!r}; "
                            "end the name in .json, .md or .html")
    return FORMATS[suffix]


def check_report_path(path: str | os.PathLike[str]) -> str:
    """:func:`report_format`, and the directory must exist (checked before any work)."""
    fmt = report_format(path)
    parent = Path(path).parent
    if not parent.is_dir():
        raise GraphoptError(f"report {str(path)!r}: directory {str(parent)!r} does not exist")
    if Path(path).is_dir():
        raise GraphoptError(f"report {str(path)!r} is a directory")
    return fmt


# -- the report model ---------------------------------------------------------------------------


@dataclass
class ModelSummary:
    """One model's size: compute nodes (``Constant`` producers left out), parameters, the file's
    bytes (or the library's, for compile), FLOPs at the report's input shapes, op counts."""

    path: str | None = None
    nodes: int | None = None
    params: int | None = None
    size_bytes: int | None = None
    flops: int | None = None
    ops: dict[str, int] = field(default_factory=dict)


@dataclass
class PassRow:
    """One pass (or compile stage): the model after it against the model before it. ``seconds``
    is the pass's own time; ``output_rel_error`` is the relative L2 error of the outputs against
    the stage before it and ``top1_agreement`` the share of samples whose arg-max did not move."""

    name: str
    changed: bool | None = None
    seconds: float | None = None
    nodes_before: int | None = None
    nodes_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    size_bytes_before: int | None = None
    size_bytes_after: int | None = None
    flops_before: int | None = None
    flops_after: int | None = None
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    max_abs_error: float | None = None
    output_rel_error: float | None = None
    top1_agreement: float | None = None


@dataclass
class Verification:
    """The written model's outputs against the input model's on ``samples`` samples of ``data``
    (``random``, ``inputs``, ``calibration``). ``output_rel_error``: mean over samples and
    outputs of ``||after - before|| / ||before||`` (the quantizer's own error measure, so it
    compares with the candidates'). ``passed`` is set where a tolerance was checked."""

    samples: int
    data: str
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    output_rel_error: float | None = None
    min_cosine: float | None = None
    top1_agreement: float | None = None
    nonfinite_values: int | None = None
    passed: bool | None = None
    atol: float | None = None
    rtol: float | None = None


@dataclass
class LayerRow:
    """One layer (node) a command decided about: its ``precision`` afterwards (int8, float32,
    float16, ...), ``reason`` when it was left out, the SQNR of its activation (dB, calibration
    data), ``sensitivity`` (output error with only this layer quantized/pruned), and for
    compression what changed (``change``) and the fraction of the layer kept."""

    name: str
    op_type: str | None = None
    precision: str | None = None
    reason: str | None = None
    sqnr_db: float | None = None
    channel_sqnr_db: float | None = None
    sensitivity: float | None = None
    change: str | None = None
    kept_fraction: float | None = None
    source: str | None = None


@dataclass
class Candidate:
    """One variant a command measured while choosing (a by-latency placement, a compression
    stage, a distillation student): size, latency, output error; ``chosen`` marks the one written."""

    name: str
    size_bytes: int | None = None
    latency_ms: float | None = None
    error: float | None = None
    accuracy: float | None = None
    chosen: bool = False
    note: str | None = None


@dataclass
class Latency:
    """Median latency before and after, measured interleaved (``rounds`` rounds) on one sample.
    Machines are shared and noisy: read the ratio, not the absolute times."""

    before_ms: float
    after_ms: float
    runtime_before: str = "onnxruntime"
    runtime_after: str = "onnxruntime"
    rounds: int | None = None
    threads: int | None = None

    @property
    def ratio(self) -> float:
        return self.after_ms / self.before_ms if self.before_ms else math.nan


@dataclass
class Kernel:
    """A compiled kernel and the schedule it got (``default``, ``tuned``, ``naive``, ...)."""

    name: str
    schedule: str


@dataclass
class Report:
    """What one command did; see the module docstring and docs/reports.md.

    ``input_shapes``: the concrete shapes the figures were measured at (name -> dims);
    ``shapes_fixed`` says whether the written model has them fixed (``--input-shape`` on
    optimize, always for compile). ``series``: named curves (a distillation's loss per step),
    plotted as lines in HTML. ``counters``: the passes' own numbers, flattened
    (``quantize-static.quantized_nodes``), zeros and empty values left out. ``settings``: the
    options the command ran with."""

    command: str
    input: str | None = None
    output: str | None = None
    seconds: float | None = None
    input_shapes: dict[str, list[int | str]] = field(default_factory=dict)
    shapes_fixed: bool = False
    before: ModelSummary = field(default_factory=ModelSummary)
    after: ModelSummary = field(default_factory=ModelSummary)
    passes: list[PassRow] = field(default_factory=list)
    verification: Verification | None = None
    layers: list[LayerRow] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    latency: Latency | None = None
    kernels: list[Kernel] = field(default_factory=list)
    series: dict[str, list[float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    schema: str = SCHEMA_ID
    graphopt_version: str = ""

    def __post_init__(self) -> None:
        if not self.graphopt_version:
            import graphopt

            self.graphopt_version = graphopt.__version__

    # -- building ---------------------------------------------------------------------------
    def add_counters(self, prefix: str, report: Mapping[str, Any], skip: Iterable[str] = ()) -> None:
        """Add a pass's ``report`` dict as flat counters ``prefix.key`` (nested dicts of numbers
        become ``prefix.key.sub``; lists and name->text maps become their length; zero, empty,
        and None values are left out, so the console shows what happened, not what did not)."""
        skip = set(skip)
        for k, v in report.items():
            if k in skip:
                continue
            key = f"{prefix}.{k}" if prefix else str(k)
            for kk, vv in _flatten(key, v):
                if vv not in (None, 0, 0.0, "", False) and not (isinstance(vv, float) and math.isnan(vv)):
                    self.counters[kk] = vv

    # -- output -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; field order as declared, ``schema`` first."""
        d = _clean(dataclasses.asdict(self))
        d = {"schema": d.pop("schema"), **d}
        if self.latency is not None:
            d["latency"]["ratio"] = _num(self.latency.ratio)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def to_markdown(self) -> str:
        return _markdown(self)

    def to_html(self) -> str:
        from graphopt.report_html import render_html

        return render_html(self)

    def console(self) -> str:
        """The terminal form: short tables of what changed, no zero counters, no dict reprs."""
        return _console(self)

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write as JSON, markdown or HTML by the suffix of ``path`` (atomically)."""
        fmt = report_format(path)
        text = self.to_json() if fmt == "json" else self.to_markdown() if fmt == "markdown" else self.to_html()
        write_atomic(path, text)


def _flatten(key: str, v: Any) -> list[tuple[str, Any]]:
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy scalar
        v = v.item()
    if isinstance(v, bool | int | float | str) or v is None:
        return [(key, v)]
    if isinstance(v, Mapping):
        if all(isinstance(x, bool | int | float) or hasattr(x, "item") for x in v.values()) and len(v) <= 24:
            out: list[tuple[str, Any]] = []
            for kk, vv in v.items():
                out += _flatten(f"{key}.{kk}", vv)
            return out
        return [(key, len(v))]
    if isinstance(v, list | tuple | set | frozenset):
        return [(key, len(v))]
    return [(key, str(v))]


def _num(x: Any) -> Any:
    if x is None:
        return None
    if hasattr(x, "item"):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _clean(obj: Any) -> Any:
    """numpy scalars to Python numbers, NaN/inf to null, tuples to lists (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, bool | int | float | str) or obj is None:
        return obj
    return str(obj)


def load_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``graphopt.report/1`` as shipped in the package."""
    return json.loads((Path(__file__).parent / "data" / "report.schema.json").read_text())


def report_from_dict(d: Mapping[str, Any]) -> Report:
    """A :class:`Report` from its JSON form (``json.load`` of a written report)."""
    if d.get("schema") != SCHEMA_ID:
        raise GraphoptError(f"not a {SCHEMA_ID} report (schema {d.get('schema')!r})")
    d = dict(d)
    lat = d.pop("latency", None)
    if lat is not None:
        lat = Latency(**{k: v for k, v in lat.items() if k != "ratio"})
    ver = d.pop("verification", None)
    return Report(
        **{k: v for k, v in d.items() if k not in ("before", "after", "passes", "layers", "candidates", "kernels")},
        before=ModelSummary(**d["before"]), after=ModelSummary(**d["after"]),
        passes=[PassRow(**r) for r in d.get("passes", [])], layers=[LayerRow(**r) for r in d.get("layers", [])],
        candidates=[Candidate(**r) for r in d.get("candidates", [])], kernels=[Kernel(**r) for r in d.get("kernels", [])],
        verification=Verification(**ver) if ver else None, latency=lat)


# -- filling a report from graphopt objects ---------------------------------------------------


class OutputCheck:
    """Accumulates output comparisons sample by sample into a :class:`Verification`.

    ``add(ref, got)`` takes two ``{output name: array}`` dicts (the input model's and the written
    model's on one sample); float outputs count, integer/bool ones are compared as float64;
    non-finite values where the reference is finite are counted, not averaged. Top-1 agreement
    counts only class-like outputs (:func:`graphopt.runtime.class_like`)."""

    def __init__(self, data: str, *, atol: float | None = None, rtol: float | None = None) -> None:
        self.data, self.atol, self.rtol = data, atol, rtol
        self.samples, self.max_abs, self.max_rel, self.cos = 0, 0.0, 0.0, 1.0
        self.rel: list[float] = []
        self.top1: list[float] = []
        self.nonfinite = 0
        self.passed: bool | None = None

    def add(self, ref: Mapping[str, Any], got: Mapping[str, Any], ok: bool | None = None) -> None:
        import numpy as np

        from graphopt.runtime import class_like

        self.samples += 1
        for k, a in ref.items():
            if k not in got:
                continue
            a0, b0 = np.asarray(a), np.asarray(got[k])
            if a0.dtype.kind not in "biuf" or b0.dtype.kind not in "biuf" or a0.shape != b0.shape:
                continue  # sequences and maps (ZipMap's list of dicts), strings: not numbers to compare
            floating = a0.dtype.kind == "f"
            a64, b64 = a0.astype(np.float64), b0.astype(np.float64)
            fin = np.isfinite(b64) | ~np.isfinite(a64)
            self.nonfinite += int((~fin).sum())
            a64, b64 = np.where(fin, a64, 0.0), np.where(fin, b64, 0.0)
            d = np.abs(a64 - b64)
            if d.size:
                self.max_abs = max(self.max_abs, float(d.max()))
                self.max_rel = max(self.max_rel, float((d / np.maximum(np.abs(a64), 1e-12)).max()))
            na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
            self.rel.append(float(np.linalg.norm(a64 - b64)) / max(na, 1e-12))
            if na > 0 and nb > 0:
                self.cos = min(self.cos, float(np.dot(a64.ravel(), b64.ravel())) / (na * nb))
            if floating and class_like(a64):
                self.top1.append(float(np.mean(np.argmax(a64, -1) == np.argmax(b64, -1))))
        if ok is not None:
            self.passed = ok if self.passed is None else (self.passed and ok)

    def result(self) -> Verification:
        import numpy as np

        return Verification(samples=self.samples, data=self.data, max_abs_error=self.max_abs,
                            max_rel_error=self.max_rel, output_rel_error=float(np.mean(self.rel)) if self.rel else None,
                            min_cosine=self.cos, top1_agreement=float(np.mean(self.top1)) if self.top1 else None,
                            nonfinite_values=self.nonfinite, passed=self.passed, atol=self.atol, rtol=self.rtol)


def summarize_model(model: Any, path: str | os.PathLike[str] | None = None,
                    input_shapes: Mapping[str, Sequence[int]] | None = None) -> ModelSummary:
    """A :class:`ModelSummary` of ``model`` (a :class:`graphopt.Model`, or a path): FLOPs at
    ``input_shapes`` where given (shape inference on a copy; the model is not changed)."""
    from graphopt.analysis import infer_shapes, model_stats
    from graphopt.ir import Model

    if not isinstance(model, Model):
        from graphopt.onnx_io import load

        path = path or model
        model = load(str(model), check=False)
    if input_shapes:
        from graphopt.runtime import resolve_input_shapes

        model = model.copy()
        try:
            infer_shapes(model, resolve_input_shapes(model, dict(input_shapes)))
        except GraphoptError:
            pass
    st = model_stats(model)
    size = Path(path).stat().st_size if path is not None and Path(path).exists() else None
    return ModelSummary(path=None if path is None else str(path), nodes=st.compute_nodes, params=st.params,
                        size_bytes=size if size is not None else st.weight_bytes, flops=st.flops or None,
                        ops=dict(st.ops.most_common()))


def pass_rows(records: Sequence[PassRecord], initial: PassRecord | None = None) -> list[PassRow]:
    """Rows from the :class:`~graphopt.transform.PassRecord` list of ``run_passes`` (with
    :class:`~graphopt.instruments.StatsInstrument`): each against the record before it."""
    rows = []
    prev = initial
    for r in records:
        rows.append(PassRow(
            name=r.name, changed=r.changed, seconds=r.seconds,
            nodes_before=prev.nodes if prev else None, nodes_after=r.nodes,
            params_before=prev.params if prev else None, params_after=r.params,
            size_bytes_before=prev.bytes if prev else None, size_bytes_after=r.bytes,
            flops_before=prev.flops if prev else None, flops_after=r.flops or None,
            max_abs_error=r.max_abs_error))
        prev = r
    return rows


def quantize_layers(model: Any, report: Mapping[str, Any], options: Mapping[str, Any] | None = None) -> list[LayerRow]:
    """Per-layer rows of a static quantization: every node of the quantizable op types in the
    model *before* quantization (``model``), int8 or float32 and, for a float one, why
    (excluded, depthwise, narrow channels, sensitivity budget, latency), with the SQNR (dB) of
    its output activation and its sensitivity where ``report`` (the pass's) has them."""
    options = dict(options or {})
    op_types = set(options.get("op_types") or ("Conv", "Gemm", "MatMul"))
    excluded = set(options.get("exclude_nodes") or ())
    excluded_ops = set(options.get("exclude_op_types") or ())
    sqnr = report.get("sqnr_db") or {}
    sens = report.get("sensitivity") or {}
    channel = report.get("channel_sqnr_db") or {}
    spread = set(report.get("kept_float_channel_spread") or ())
    latency = set(report.get("latency_kept_float") or ())
    kept = set(report.get("kept_float") or ())
    rows = []
    for n in model.graph:
        if n.op_type not in op_types | excluded_ops or n.domain not in ("", "ai.onnx"):
            continue
        name = n.name or n.op_type
        out = n.output(0)
        db = None
        for v in [out, *[c.output(0) for c in out.consumers() if c.op_type in ("Relu", "Clip", "LeakyRelu")]]:
            if v is not None and v.name in sqnr:
                db = sqnr[v.name]
        reason = None
        if n.name in excluded:
            reason = "excluded (--exclude-nodes)"
        elif n.op_type in excluded_ops or n.op_type not in op_types:
            reason = "excluded op type"
        elif n.name in spread:
            reason = f"narrow channels (channel SQNR {channel.get(n.name, float('nan')):.1f} dB)"
        elif n.name in latency:
            reason = "faster in float (--by-latency)"
        elif n.name in kept:
            reason = "over the error budget (--max-error)"
        elif db is None and n.name not in sens:
            w = n.input(1) if len(n.inputs) > 1 else None
            if n.op_type == "Conv" and n.attr("group", 1) > 1 and options.get("skip_depthwise", True):
                reason = "depthwise (no int8 gain)"
            elif w is None or (n.op_type != "MatMul" and not w.is_const()):
                reason = "weights not constant"
            else:
                reason = "not quantized"
        rows.append(LayerRow(name=name, op_type=n.op_type, precision="float32" if reason else "int8", reason=reason,
                             sqnr_db=_num(db), channel_sqnr_db=_num(channel.get(n.name)),
                             sensitivity=_num(sens.get(n.name)), source="quantize-static"))
    return rows


def quantize_candidates(report: Mapping[str, Any]) -> list[Candidate]:
    """The variants a static quantization measured while choosing: with ``by_latency`` the
    model all float, all int8, each region taken back to float and the mix (latency, ms; the
    finalists as timed side by side in the second round); with
    ``max_error``/``sensitivity`` all int8 against the chosen subset (output error, relative L2).
    The one written has ``chosen`` set."""
    out: list[Candidate] = []
    lat = report.get("latency_ms") or {}
    n_int8 = int(report.get("quantized_nodes") or 0)
    err_all, err = report.get("error_all_int8"), report.get("error")
    if lat:
        kept = report.get("latency_kept_float") or []
        final = report.get("latency_chosen") or (
            "float" if n_int8 == 0 else "mixed" if kept and "mixed" in lat else "int8")
        out.append(Candidate("all float", latency_ms=_num(lat.get("float")), error=0.0, chosen=final == "float"))
        out.append(Candidate("all int8", latency_ms=_num(lat.get("int8")), error=_num(err_all),
                             chosen=final == "int8"))
        if "mixed" in lat:
            n_mixed = len(kept) if final == "mixed" else None
            out.append(Candidate("mixed" + (f" ({n_mixed} float)" if n_mixed is not None else ""),
                                 latency_ms=_num(lat["mixed"]), error=_num(err) if final == "mixed" else None,
                                 chosen=final == "mixed", note="every region that paid in float, together"))
        for d in report.get("latency_decisions") or []:
            key = f"region{d['region']}"
            finalist = key in lat
            note = (f"{d['nodes']} nodes {d['first']} .. {d['last']}: kept {d['kept']} (all int8 in the same "
                    f"timing round: {d['ms_int8']:.4g} ms)")
            if finalist:  # timed again beside the others: that figure is the comparable one
                note += f"; first round {d['ms_region_float']:.4g} ms, finalist round shown"
            out.append(Candidate(f"region {d['region']} float",
                                 latency_ms=_num(lat[key] if finalist else d.get("ms_region_float")),
                                 error=_num(err) if final == key else None, chosen=final == key, note=note))
    elif err_all is not None:
        kept = report.get("kept_float") or []
        out.append(Candidate("all int8", error=_num(err_all), chosen=not kept))
        if kept:
            out.append(Candidate(f"{len(kept)} layers float", error=_num(err), chosen=True,
                                 note="the most sensitive layers kept float until the error fit --max-error"))
    return out


def float16_layers(report: Mapping[str, Any], dtype: str) -> list[LayerRow]:
    """Per-layer rows of a float16/bfloat16 conversion: every node kept float32 and why."""
    kept = report.get("kept") or report.get("kept_float32") or {}
    return [LayerRow(name=k, precision="float32", reason=str(why), source=f"convert-{dtype}") for k, why in kept.items()]


def compress_layers(name: str, report: Mapping[str, Any]) -> list[LayerRow]:
    """Per-layer rows of a compression pass's report: pruned channels (``12/16``), sparsity,
    ranks, cluster counts, and the layers it skipped with the reason."""
    rows: list[LayerRow] = []
    sens = report.get("sensitivity") or {}
    for k, v in (report.get("pruned") or {}).items():
        frac = None
        if isinstance(v, str) and "/" in v:
            a, b = v.split("/", 1)
            frac = int(a) / int(b) if b.strip().isdigit() and int(b) else None
            change = f"{v} channels kept"
        else:
            frac, change = 1 - float(v), f"sparsity {float(v):.2f}"
        s = sens.get(k)
        rows.append(LayerRow(name=k, change=change, kept_fraction=frac, source=name,
                             sensitivity=_num(s[0] if isinstance(s, list | tuple) else s)))
    for key in ("factored", "conv_factored"):
        for k, r in (report.get(key) or {}).items():
            rows.append(LayerRow(name=k, change=f"rank {r if not isinstance(r, list | tuple) else '/'.join(map(str, r))}",
                                 source=name))
    for k, c in (report.get("clustered") or {}).items():
        rows.append(LayerRow(name=k, change=f"{c} clusters", source=name))
    for k, why in (report.get("skipped") or {}).items():
        rows.append(LayerRow(name=k, reason=str(why), kept_fraction=1.0, source=name))
    return rows


def distill_report(student: Any, output: str, result: Any, *, teacher: Any = None,
                   written: str | os.PathLike[str] | None = None, check: OutputCheck | None = None,
                   input_shapes: Mapping[str, Sequence[int]] | None = None, seconds: float | None = None,
                   settings: Mapping[str, Any] | None = None) -> Report:
    """The report of a distillation run.

    ``student``: the model before training (path or :class:`graphopt.Model`); ``output``: the
    written path (``written``: where it is now, if staged elsewhere); ``result``: the pass's
    ``DistillReport`` (steps, seconds, loss_first/last, trained, quantized, error and agreement
    with the teacher before/after, ``curve``); ``teacher``: path or model, for its size;
    ``check``: the written model against the teacher under ONNX Runtime. The candidates are the
    teacher, the student before and after (error = relative L2 against the teacher, accuracy =
    top-1 agreement with it), so the HTML plots them side by side; the loss curve is a series."""
    shapes = dict(input_shapes or {})
    path = student if isinstance(student, str | os.PathLike) else None
    r = Report("distill", input=None if path is None else str(path), output=output, seconds=seconds,
               input_shapes={k: list(v) for k, v in shapes.items()},
               before=summarize_model(student, path, shapes),
               after=summarize_model(written or output, written or output, shapes),
               settings=dict(settings or {}))
    r.after.path = output
    r.passes = [PassRow("distill", changed=bool(getattr(result, "steps", 0)), seconds=_num(getattr(result, "seconds", None)),
                        nodes_before=r.before.nodes, nodes_after=r.after.nodes, params_before=r.before.params,
                        params_after=r.after.params, size_bytes_before=r.before.size_bytes,
                        size_bytes_after=r.after.size_bytes,
                        output_rel_error=_num(getattr(result, "error_after", None)),
                        top1_agreement=_num(getattr(result, "agreement_after", None)))]
    if teacher is not None:
        t = summarize_model(teacher, teacher if isinstance(teacher, str | os.PathLike) else None, shapes)
        r.candidates.append(Candidate("teacher", size_bytes=t.size_bytes, error=0.0, accuracy=1.0))
    r.candidates += [
        Candidate("student before", size_bytes=r.before.size_bytes, error=_num(getattr(result, "error_before", None)),
                  accuracy=_num(getattr(result, "agreement_before", None))),
        Candidate("student after", size_bytes=r.after.size_bytes, error=_num(getattr(result, "error_after", None)),
                  accuracy=_num(getattr(result, "agreement_after", None)), chosen=True)]
    for k in ("steps", "trained", "quantized", "loss_first", "loss_last", "batched"):
        v = getattr(result, k, None)
        if v not in (None, 0, False) and not (isinstance(v, float) and not math.isfinite(v)):
            r.counters[k] = v
    for k, v in (getattr(result, "losses", None) or {}).items():
        r.counters[f"loss.{k}"] = str(v)
    curve = [float(x) for x in (getattr(result, "curve", None) or []) if math.isfinite(float(x))]
    if curve:
        r.series["loss"] = curve
    if check is not None:
        r.verification = check.result()
    return r


_STAGES = {"prepare_s": "prepare (lossless passes)", "import_lower_s": "import + lower (Relax)",
           "tune_s": "tune (MetaSchedule)", "schedule_build_s": "schedule + build", "load_cached_s": "load cached build"}


def compile_report(model: Any, compiled: Any, output: str, *, library: str | os.PathLike[str] | None = None,
                   seconds: float | None = None, measure: bool = True, rounds: int = 10,
                   data: Sequence[Mapping[str, Any]] | None = None) -> Report:
    """The report of a TVM compile: the ONNX model before (a path or :class:`graphopt.Model`),
    the library after (its file size), the compile stages with their times, the kernels and
    their schedules, the fixed input shapes, and, where the build runs on this machine
    (``measure``), its outputs and latency against ONNX Runtime on one sample (``data[0]``,
    or random inputs at the compiled shapes), timed interleaved for ``rounds`` rounds."""
    import numpy as np

    from graphopt.ir import Model

    path = None if isinstance(model, Model) else str(model)
    if path is not None:
        from graphopt.onnx_io import load

        model = load(path, check=False)
    info = compiled.info
    shapes = {i.name: [int(d) for d in i.shape] for i in compiled.inputs}
    lib = Path(library or output)
    r = Report("compile", input=path, output=output, seconds=seconds, input_shapes=dict(shapes), shapes_fixed=True,
               before=summarize_model(model, path, shapes),
               after=ModelSummary(path=output, size_bytes=lib.stat().st_size if lib.is_file() else None),
               passes=[PassRow(_STAGES.get(k, k), seconds=float(v)) for k, v in info.times.items()],
               kernels=[Kernel(k, v) for k, v in sorted(info.schedules.items())],
               settings={"target": compiled.target.name, "layout": info.layout})
    r.add_counters("tuning", info.tuning, skip=("cache_dir", "tuned", "skipped"))
    if info.tuning:
        r.counters["tuning.tasks_tuned"] = len(info.tuning.get("tuned", []))
        r.counters["tuning.tasks_left_default"] = len(info.tuning.get("skipped", []))
    r.add_counters("rewrites", info.rewrites)
    if info.from_build_cache:
        r.counters["from_build_cache"] = True
    if info.const_inputs:
        r.settings["const_inputs"] = json.dumps(info.const_inputs)
    runs_here = compiled.target.device == "cpu" and not compiled.target.is_cross
    if measure and runs_here:
        from graphopt.runtime import input_feeds, interleaved_timings, ort_session

        try:
            feed = dict(data[0]) if data else input_feeds(model, hints=shapes, seed=0)[0]
            for k, v in (info.const_inputs or {}).items():  # compiled in: the ONNX model still takes them
                dt = next((np.asarray(x).dtype for x in feed.values()), np.float32)
                feed.setdefault(k, np.asarray(v, dtype=dt))
            run = compiled
            if lib.is_file() and lib.suffix == ".so":  # time the exported library, as it will be run (a fresh build in this
                from graphopt.backend import load_compiled  # process measured up to 10x slower here)

                run = load_compiled(lib)
            sess = ort_session(model, optimize=True, threads=2)
            names = [o.name for o in sess.get_outputs()]
            ins = {i.name for i in sess.get_inputs()}
            ort_feed = {k: v for k, v in feed.items() if k in ins}
            ref = dict(zip(names, sess.run(None, ort_feed), strict=True))
            got = dict(zip(names, run.run(feed), strict=False))
            check = OutputCheck("inputs" if data else "random")
            check.add(ref, got)
            r.verification = check.result()
            fn, args = run.vm()["main"], run._arguments(feed)
            lat = interleaved_timings({"ort": lambda: sess.run(None, ort_feed), "tvm": lambda: fn(*args)}, rounds)
            r.latency = Latency(lat["ort"], lat["tvm"], runtime_before="onnxruntime",
                                runtime_after=f"TVM {compiled.target.name}", rounds=rounds, threads=2)
        except Exception as exc:  # noqa: BLE001 - the library is written; the report says what it could not measure
            r.notes.append(f"outputs and latency not measured: {str(exc).splitlines()[0][:200]}")
    elif measure:
        r.notes.append(f"built for {compiled.target.name}: outputs and latency are not measured on this machine")
    return r


# -- rendering as text --------------------------------------------------------------------------


def _f(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return f" ({b / a:.2f}x)" if a and b is not None else ""


def _arrow(a: Any, b: Any, fmt: Any = str) -> str:
    if a is None and b is None:
        return "-"
    return f"{'-' if a is None else fmt(a)} -> {'-' if b is None else fmt(b)}"


def summary_rows(r: Report) -> list[list[str]]:
    """[what, before, after, after/before] for the model-size figures and latency."""
    rows = []
    b, a = r.before, r.after
    for label, x, y, fmt in (("compute nodes", b.nodes, a.nodes, str), ("params", b.params, a.params, human),
                             ("size", b.size_bytes, a.size_bytes, lambda v: human(v, "B")),
                             ("FLOPs", b.flops, a.flops, human)):
        if x is not None or y is not None:
            rows.append([label, "-" if x is None else fmt(x), "-" if y is None else fmt(y),
                         f"{y / x:.2f}x" if x and y is not None else "-"])
    if r.latency:
        la = r.latency
        rows.append([f"latency ms ({la.runtime_before}" + (f" -> {la.runtime_after}" if la.runtime_after !=
                                                            la.runtime_before else "") + ")",
                     f"{la.before_ms:.3f}", f"{la.after_ms:.3f}", f"{la.ratio:.2f}x"])
    return rows


PASS_HEADERS = ("pass", "changed", "nodes", "params", "size", "FLOPs", "time (ms)", "max abs err")


def _pass_table_rows(r: Report, changed_only: bool = False) -> tuple[list[str], list[list[str]]]:
    """Columns that hold something, for the report's pass rows (``changed_only``: the passes
    that changed the model, and the last row)."""
    cols: list[tuple[str, Any]] = [
        ("pass", lambda p: p.name),
        ("changed", lambda p: "" if p.changed is None else ("yes" if p.changed else "no")),
        ("nodes", lambda p: _arrow(p.nodes_before, p.nodes_after) if p.nodes_after is not None else None),
        ("params", lambda p: f"{human(p.params_after)}{_ratio(p.params_before, p.params_after)}"
         if p.params_after is not None else None),
        ("size", lambda p: f"{human(p.size_bytes_after, 'B')}{_ratio(p.size_bytes_before, p.size_bytes_after)}"
         if p.size_bytes_after is not None else None),
        ("FLOPs", lambda p: f"{human(p.flops_after)}{_ratio(p.flops_before, p.flops_after)}"
         if p.flops_after is not None else None),
        ("ORT latency ms", lambda p: f"{p.latency_ms_after:.3f}{_ratio(p.latency_ms_before, p.latency_ms_after)}"
         if p.latency_ms_after is not None else None),
        ("time (ms)", lambda p: None if p.seconds is None else f"{p.seconds * 1e3:.1f}"),
        ("max abs err", lambda p: None if p.max_abs_error is None else f"{p.max_abs_error:.2e}"),
        ("output error (rel. L2)", lambda p: None if p.output_rel_error is None else f"{p.output_rel_error:.4f}"),
        ("top-1 agreement", lambda p: None if p.top1_agreement is None else f"{p.top1_agreement:.3f}"),
    ]
    used = [(h, f) for h, f in cols if any(f(p) not in (None, "") for p in r.passes) or h == "pass"]
    passes = [p for k, p in enumerate(r.passes) if not changed_only or p.changed is not False
              or k == len(r.passes) - 1]
    rows = [[("-" if (v := f(p)) is None else v) for _, f in used] for p in passes]
    # compress compares ratio-carrying cells: '-' where a stage has no figure
    return [h for h, _ in used], rows


def _layer_table(r: Report, limit: int | None) -> tuple[list[str], list[list[str]]]:
    cols: list[tuple[str, Any]] = [
        ("layer", lambda x: x.name), ("op", lambda x: x.op_type), ("pass", lambda x: x.source),
        ("precision", lambda x: x.precision), ("SQNR dB", lambda x: None if x.sqnr_db is None else f"{x.sqnr_db:.1f}"),
        ("sensitivity", lambda x: None if x.sensitivity is None else f"{x.sensitivity:.3g}"),
        ("change", lambda x: x.change), ("why kept", lambda x: x.reason),
    ]
    layers = _sorted_layers(r.layers)
    if limit is not None:
        layers = layers[:limit]
    used = [(h, f) for h, f in cols if any(f(x) not in (None, "") for x in layers)]
    if len({x.source for x in r.layers}) <= 1:
        used = [(h, f) for h, f in used if h != "pass"]
    return [h for h, _ in used], [[(f(x) or "") for _, f in used] for x in layers]


def _sorted_layers(layers: Sequence[LayerRow]) -> list[LayerRow]:
    """Worst first: lowest SQNR, then highest sensitivity, then kept float; stable otherwise."""
    def key(x: LayerRow) -> tuple[float, float]:
        return (x.sqnr_db if x.sqnr_db is not None else math.inf,
                -(x.sensitivity if x.sensitivity is not None else -math.inf))
    if any(x.sqnr_db is not None or x.sensitivity is not None for x in layers):
        return sorted(layers, key=key)
    return list(layers)


def _verification_rows(v: Verification) -> list[list[str]]:
    rows = [["samples", f"{v.samples} ({v.data})"]]
    for label, x, spec in (("max abs error", v.max_abs_error, ".4g"),
                           ("output error (rel. L2)", v.output_rel_error, ".4g"),
                           ("min cosine", v.min_cosine, ".5f"), ("top-1 agreement", v.top1_agreement, ".4f")):
        if x is not None:
            rows.append([label, format(x, spec)])
    if v.nonfinite_values:
        rows.append(["non-finite output values", str(v.nonfinite_values)])
    if v.passed is not None:
        rows.append(["result", ("ok" if v.passed else "MISMATCH")
                     + (f" (atol={v.atol:g}, rtol={v.rtol:g})" if v.atol is not None and v.rtol is not None else "")])
    return rows


def _candidate_rows(r: Report) -> tuple[list[str], list[list[str]]]:
    headers = ["candidate", "size", "latency ms", "error", "accuracy", "chosen", "note"]
    rows = [[c.name, human(c.size_bytes, "B") if c.size_bytes is not None else "-", _f(c.latency_ms, ".3f"),
             _f(c.error, ".4g"), _f(c.accuracy, ".4f"), "yes" if c.chosen else "", c.note or ""] for c in r.candidates]
    keep = [i for i, h in enumerate(headers) if i == 0 or any(row[i] not in ("-", "") for row in rows)]
    return [headers[i] for i in keep], [[row[i] for i in keep] for row in rows]


def _shapes(r: Report) -> str:
    s = ", ".join(f"{k}: [{','.join(map(str, v))}]" for k, v in r.input_shapes.items())
    return s + (" (fixed in the output)" if r.shapes_fixed else " (measured at; the output keeps its own)")


def _counter_value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _console(r: Report, layer_limit: int = 8) -> str:
    out = []
    rows = summary_rows(r)
    if rows:
        out.append(table(["", "before", "after", "ratio"], rows))
    if r.passes:
        h, rows = _pass_table_rows(r, changed_only=True)
        hidden = len(r.passes) - len(rows)
        out.append(table(h, rows) + (f"\n({hidden} pass{'es' if hidden != 1 else ''} that changed nothing not shown)" if hidden else ""))
    if r.counters:
        out.append(table(["", "value"], [[k, _counter_value(v)] for k, v in r.counters.items()]))
    if r.candidates:
        out.append(table(*_candidate_rows(r)))
    if r.layers:
        h, rows = _layer_table(r, layer_limit)
        n_int8 = sum(x.precision == "int8" for x in r.layers)
        title = f"layers ({len(r.layers)}" + (f", {n_int8} int8" if n_int8 else "") + \
            (f"; the {layer_limit} worst shown, --report FILE lists all" if len(r.layers) > layer_limit else "") + ")"
        out.append(title + "\n" + table(h, rows))
    if r.kernels:
        counts: dict[str, int] = {}
        for k in r.kernels:
            counts[k.schedule] = counts.get(k.schedule, 0) + 1
        out.append("kernels: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])))
    if r.verification:
        out.append(table(["output check", "value"], _verification_rows(r.verification)))
    if r.input_shapes:
        out.append("input shapes: " + _shapes(r))
    out += r.notes
    return "\n\n".join(out)


def _markdown(r: Report) -> str:
    lines = [f"# graphopt {r.command} report", ""]
    meta = [["input", r.input or "-"], ["output", r.output or "-"]]
    if r.seconds is not None:
        meta.append(["time", f"{r.seconds:.2f} s"])
    if r.input_shapes:
        meta.append(["input shapes", _shapes(r)])
    meta += [[k, json.dumps(v) if not isinstance(v, str) else v] for k, v in r.settings.items()]
    lines += [table(["", "value"], meta, markdown=True), ""]
    rows = summary_rows(r)
    if rows:
        lines += ["## Model", "", table(["", "before", "after", "ratio"], rows, markdown=True), ""]
    if r.passes:
        h, rows = _pass_table_rows(r)
        lines += ["## Per pass" + (" (each against the stage before it)" if r.command == "compress" else ""), "",
                  table(h, rows, markdown=True), ""]
    if r.verification:
        lines += ["## Output check", "", table(["", "value"], _verification_rows(r.verification), markdown=True), ""]
    if r.candidates:
        lines += ["## Candidates", "", table(*_candidate_rows(r), markdown=True), ""]
    if r.layers:
        h, rows = _layer_table(r, None)
        lines += ["## Layers", "", table(h, rows, markdown=True), ""]
    if r.kernels:
        counts: dict[str, int] = {}
        for k in r.kernels:
            counts[k.schedule] = counts.get(k.schedule, 0) + 1
        lines += ["## Kernels", "", table(["schedule", "kernels"], sorted(counts.items()), markdown=True), ""]
    if r.counters:
        lines += ["## Counters", "", table(["", "value"], [[k, _counter_value(v)] for k, v in r.counters.items()],
                                           markdown=True), ""]
    if r.before.ops or r.after.ops:
        ops = sorted(set(r.before.ops) | set(r.after.ops), key=lambda k: -(r.before.ops.get(k, 0) + r.after.ops.get(k, 0)))
        lines += ["## Ops", "", table(["op", "before", "after"], [[k, r.before.ops.get(k, 0), r.after.ops.get(k, 0)]
                                                                  for k in ops], markdown=True), ""]
    if r.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in r.notes] + [""]
    return "\n".join(lines)
