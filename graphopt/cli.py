"""The ``graphopt`` command line.

Commands: ``inspect``, ``optimize``, ``quantize``, ``convert``, ``compress``, ``distill``, ``compile``, ``bench``,
``passes``, ``verify``. User errors print one line
(``graphopt: error: ...``) and exit with code 2; a failed numerical verification exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from graphopt.data import example_model_path
from graphopt.errors import CheckerError, GraphoptError, NumericalMismatchError
from graphopt.progress import progress

log = logging.getLogger("graphopt")

_NO_CHECK_HELP = ("go on with a model that fails onnx's full check (refused by default; graphopt's own import "
                  "rules still apply, and the result may be as broken as the input)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(2, f"graphopt: error: {message} (see `{self.prog} --help`)\n")




def _count(least: int) -> Any:
    """An argparse type: an integer >= ``least`` (bad values are one-line errors, exit 2)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < least:
            raise argparse.ArgumentTypeError(f"{v} is below {least}")
        return v
    return parse


def _nonneg(text: str) -> float:
    """An argparse type: a float >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return v


def _fraction(low: float, high: float, *, low_open: bool = True, high_open: bool = False) -> Any:
    """An argparse type: a float in the interval from ``low`` to ``high`` (open where said)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"{text} is not in {'(' if low_open else '['}{low:g}, {high:g}"
                                             f"{')' if high_open else ']'}")
        return v
    return parse


def _int_range(low: int, high: int) -> Any:
    """An argparse type: an integer from ``low`` to ``high``."""
    def parse(text: str) -> int:
        v = _count(low)(text)
        if v > high:
            raise argparse.ArgumentTypeError(f"{v} is above {high}")
        return v
    return parse


def _n_of_m(text: str) -> str:
    """An argparse type: ``N:M`` sparsity with 0 < N < M (e.g. 2:4)."""
    n, sep, m = text.partition(":")
    try:
        ok = bool(sep) and 0 < int(n) < int(m)
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r} is not N:M with 0 < N < M (e.g. 2:4)")
    return text


def _shape_spec(text: str) -> str:
    """An argparse type: ``NAME:D1,D2,...`` (the syntax; names and ranks are checked against the model)."""
    from graphopt.runtime import parse_input_shapes

    try:
        parse_input_shapes([text])
    except GraphoptError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("bad input shape ")) from None
    return text


def _load(path: str, check: bool = True, shapes: Sequence[str] | None = None) -> Any:
    """Load a model; ``shapes`` (``--input-shape`` specs) must name its inputs with their ranks."""
    from graphopt.onnx_io import load

    model = load(path, check=check)
    if shapes:
        from graphopt.runtime import parse_input_shapes, resolve_input_shapes

        resolve_input_shapes(model, parse_input_shapes(shapes))  # unknown name, wrong rank, fixed dim changed
    return model


def cmd_inspect(args: argparse.Namespace) -> int:
    from graphopt.analysis import infer_shapes, model_stats, peak_memory
    from graphopt.ir.tensor import dtype_name
    from graphopt.report import human, table

    model = _load(args.model, check=not args.no_check, shapes=args.input_shape)
    m = model.copy()
    from graphopt.runtime import parse_input_shapes, resolve_input_shapes

    hints = parse_input_shapes(args.input_shape)
    try:  # dynamic dims resolved from --input-shape (or 1, with a warning) so FLOPs and memory are concrete;
        # sizes static inference leaves open (a Pad whose pads are computed) are read from one ORT run
        infer_shapes(m, resolve_input_shapes(m, hints, warn=True), probe=True)
    except GraphoptError as e:
        if hints:
            raise
        log.warning("FLOPs and memory left partly unknown: %s", e)
        infer_shapes(m)
    st = model_stats(m)
    size = Path(args.model).stat().st_size
    if args.json:
        import json

        print(json.dumps({
            "ir_version": model.ir_version, "opset_imports": model.opset_imports,
            "inputs": [{"name": v.name, "dtype": dtype_name(v.dtype), "shape": list(v.shape or [])}
                       for v in model.graph.inputs if v.const is None],
            "outputs": [{"name": v.name, "dtype": dtype_name(v.dtype), "shape": list(v.shape or [])}
                        for v in model.graph.outputs],
            "nodes": st.nodes, "compute_nodes": st.compute_nodes, "params": st.params, "flops": st.flops,
            "ops": dict(st.ops), "subgraphs": st.subgraphs, "functions": len(model.functions),
            "file_bytes": size,
        }, indent=2))
        return 0
    opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in model.opset_imports.items())
    print(f"model     {args.model}  ({human(size, 'B')})")
    print(f"producer  {model.producer_name} {model.producer_version}".rstrip())
    print(f"ir        {model.ir_version}    opsets: {opsets}")
    print(f"nodes     {st.nodes} ({st.compute_nodes} compute)   params {human(st.params)} "
          f"({human(st.weight_bytes, 'B')})   FLOPs {human(st.flops)}"
          + (f"  ({len(st.unknown)} nodes of unknown cost)" if st.unknown else ""))
    print(f"subgraphs {st.subgraphs}   local functions {len(model.functions)}")
    mem = peak_memory(m.graph)
    print(f"peak activation memory {human(mem.peak_bytes, 'B')}" + (f" at {mem.peak_at}" if mem.peak_at else ""))

    def shp(v: Any) -> str:
        return "?" if v.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in v.shape) + "]"

    print()
    rows = [["input", v.name, dtype_name(v.dtype), shp(v)] for v in m.graph.inputs if v.const is None]
    rows += [["output", v.name, dtype_name(v.dtype), shp(v)] for v in m.graph.outputs]
    print(table(["", "name", "dtype", "shape"], rows))
    print()
    print(table(["op", "count"], [[k, c] for k, c in st.ops.most_common()]))
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    import textwrap

    from graphopt.transform import list_passes, list_pipelines

    def listing(head: str, items: dict[str, str]) -> None:
        w = max(len(head), *(len(k) for k in items)) + 2
        print(f"{head:<{w}}description")
        for k, text in items.items():  # whole summaries, wrapped under their column
            print(textwrap.fill(text, 100, initial_indent=f"{k:<{w}}", subsequent_indent=" " * w))

    listing("pass", {k: v.summary() for k, v in list_passes().items()})
    print()
    listing("pipeline", dict(list_pipelines()))
    return 0


def _feeds(model: Any, args: argparse.Namespace, n: int | None) -> list[dict[str, Any]]:
    """Feeds for checks: ``--inputs`` samples (the first ``n``), else ``n`` random ones the model
    runs on (dims left open named in a warning; a model ORT cannot run on random data is an
    error that says to pass ``--inputs``)."""
    from graphopt.runtime import input_feeds, parse_input_shapes

    return input_feeds(model, hints=parse_input_shapes(getattr(args, "input_shape", None)),
                       data=getattr(args, "inputs", None), count=n, seed=getattr(args, "seed", 0) or 0,
                       what="--inputs")


def _shapes_of(feed: dict[str, Any]) -> dict[str, list[int]]:
    return {k: list(np.shape(v)) for k, v in feed.items()}


def cmd_optimize(args: argparse.Namespace) -> int:
    from graphopt.analysis import model_stats
    from graphopt.instruments import NumericCheckInstrument, ProgressInstrument, StatsInstrument, VerifyInstrument
    from graphopt.onnx_io import save
    from graphopt.report import ModelSummary, OutputCheck, Report, human, pass_rows
    from graphopt.runtime import compare, parse_input_shapes, run_ort
    from graphopt.transform import PassContext, Pipeline, get_pass, get_pipeline, run_passes

    src = args.model  # main() put the bundled model here for --example
    out = Path(args.output)
    if Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
        raise GraphoptError("the output path is the input file; graphopt never overwrites its input")
    if out.is_dir():
        raise GraphoptError(f"output path {str(out)!r} is a directory")
    if args.passes and args.pipeline:
        raise GraphoptError("give --pipeline or --passes, not both")
    shapes = parse_input_shapes(args.input_shape)
    model = _load(src, check=not args.no_check, shapes=args.input_shape)
    if shapes:
        from graphopt.runtime import resolve_input_shapes

        resolve_input_shapes(model, shapes)  # reject unknown names / wrong ranks before any work
    if args.passes:
        pipeline = Pipeline([get_pass(p.strip()) for p in args.passes.split(",") if p.strip()], name="passes")
    else:
        pipeline = get_pipeline(args.pipeline or "default")
    feeds: list[dict[str, Any]] = []
    original = None
    if args.inputs and not args.verify:
        args.verify = -1  # --inputs alone: verify on every sample
    if args.verify:
        feeds = _feeds(model, args, args.verify if args.verify > 0 else None)
    else:
        from graphopt.runtime import resolve_input_shapes

        try:  # the report's FLOPs use these sizes: name the guessed ones
            resolve_input_shapes(model, shapes, warn=True)
        except GraphoptError:
            pass
    # FLOPs at the sizes verified on (the user's data, or the sizes the model ran at)
    stats = StatsInstrument({**_shapes_of(feeds[0]), **shapes} if feeds else shapes)
    instruments: list[Any] = [VerifyInstrument(), stats, ProgressInstrument()]
    if args.verify:
        instruments.append(NumericCheckInstrument(feeds, rtol=args.rtol, atol=args.atol,
                                                      scale_rtol=args.scale_rtol))
        original = model.copy()
    ctx = PassContext(instruments=instruments, input_shapes=shapes)
    ops_before = dict(model_stats(model).ops.most_common())
    t0 = time.perf_counter()
    run_passes(model, pipeline, ctx)
    elapsed = time.perf_counter() - t0
    save(model, _target(args, out), external_data=True if args.external_data else None)
    before = stats.initial
    final = ctx.records[-1] if ctx.records else before
    err = None
    check = OutputCheck("inputs" if args.inputs else "random", atol=args.atol, rtol=args.rtol)
    if args.verify and original is not None:
        for f in progress(feeds, desc="checking the written model", unit="sample"):
            ref, got = run_ort(original, f), run_ort(str(_target(args, out)), f)
            c = compare(ref, got, rtol=args.rtol, atol=args.atol, scale_rtol=args.scale_rtol)
            check.add(ref, got, ok=c.ok)
            if not c.ok:
                raise NumericalMismatchError("saved model disagrees with the input: " + "; ".join(c.problems[:3]))
        err = check.max_abs
    assert before is not None and final is not None
    size_in = Path(src).stat().st_size if Path(src).is_file() else before.bytes
    size_out = _target(args, out).stat().st_size if _target(args, out).is_file() else final.bytes
    report = Report(
        "optimize", input=src, output=str(out), seconds=elapsed, settings={"pipeline": repr(pipeline)},
        input_shapes={k: list(v) for k, v in ({**_shapes_of(feeds[0]), **shapes} if feeds else shapes).items()},
        shapes_fixed=bool(shapes),
        before=ModelSummary(path=src, nodes=before.nodes, params=before.params, size_bytes=size_in,
                            flops=before.flops or None, ops=ops_before),
        after=ModelSummary(path=str(out), nodes=final.nodes, params=final.params, size_bytes=size_out,
                           flops=final.flops or None, ops=dict(model_stats(model).ops.most_common())),
        passes=pass_rows(ctx.records, before), verification=check.result() if err is not None else None)
    if shapes:
        report.notes.append("the written model's inputs have the --input-shape shapes: "
                            + ", ".join(f"{k}: {list(v)}" for k, v in shapes.items()))
    print(report.console())
    kind = "--inputs sample(s)" if args.inputs else "random input(s)"
    print(f"\n{src} -> {out}: compute nodes {before.nodes} -> {final.nodes}, "
          f"size {human(size_in, 'B')} -> {human(size_out, 'B')}, {elapsed:.2f}s"
          + (f", verified on {len(feeds)} {kind} (max abs err {err:.2e})" if err is not None else "")
          + ("; input shapes FIXED by --input-shape: " + ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
             if shapes else ""))
    _write_report(report, args.report)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from graphopt.report import table
    from graphopt.runtime import compare, run_ort

    a = _load(args.a, check=not args.no_check, shapes=args.input_shape)
    b = _load(args.b, check=not args.no_check)
    ia = sorted(v.name for v in a.graph.inputs if v.const is None)
    ib = sorted(v.name for v in b.graph.inputs if v.const is None)
    if not set(ib) <= set(ia):
        raise GraphoptError(f"{args.b} needs inputs {sorted(set(ib) - set(ia))} that {args.a} does not have")
    rows = []
    ok = True
    feeds = _feeds(a, args, args.samples if args.samples or args.inputs else 3)
    for k, feed in enumerate(progress(feeds, desc="comparing", unit="sample")):
        c = compare(run_ort(a, feed), run_ort(b, feed), rtol=args.rtol, atol=args.atol, scale_rtol=args.scale_rtol)
        ok &= c.ok
        rows.append([k, f"{c.max_abs:.3e}", f"{c.max_rel:.3e}", f"{c.cosine:.6f}",
                     "-" if c.top1 is None else f"{c.top1:.3f}", "ok" if c.ok else "MISMATCH"])
    print(table(["sample", "max abs", "max rel", "cosine", "top-1 agree", "result"], rows))
    if not ok:
        print(f"graphopt: outputs differ beyond atol={args.atol:g}, rtol={args.rtol:g}, "
              f"scale_rtol={_scale_rtol(args):g}", file=sys.stderr)
        return 1
    print(f"outputs agree on {len(feeds)} {'--inputs' if args.inputs else 'random'} sample(s) "
          f"(atol={args.atol:g}, rtol={args.rtol:g}, scale_rtol={_scale_rtol(args):g})")
    return 0


_SCALE_RTOL_HELP = ("an output also passes when its worst error is within SCALE_RTOL x its largest |value| "
                    "(float32 rounding grows with the output's range; default 3 x RTOL, 0 = elementwise only)")


def _scale_rtol(args: argparse.Namespace) -> float:
    return 3 * args.rtol if args.scale_rtol is None else args.scale_rtol


def _latency_pair(a: str, b: str, feed: dict[str, Any], rounds: int = 20) -> tuple[float, float]:
    """Median ORT latency (ms) of two models, interleaved, ENABLE_ALL, 2 threads."""
    from graphopt.runtime import interleaved_latency, ort_session

    lat = interleaved_latency({"a": ort_session(a, optimize=True, threads=2),
                               "b": ort_session(b, optimize=True, threads=2)}, feed, rounds)
    return lat["a"], lat["b"]


def cmd_quantize(args: argparse.Namespace) -> int:
    from graphopt.instruments import StatsInstrument
    from graphopt.onnx_io import save
    from graphopt.report import (
        Latency,
        OutputCheck,
        Report,
        pass_rows,
        quantize_candidates,
        quantize_layers,
        summarize_model,
    )
    from graphopt.runtime import load_calibration, ort_session, run_ort
    from graphopt.transform import PassContext, get_pass, get_pipeline, run_passes

    out = Path(args.output)
    if Path(args.model).exists() and out.exists() and out.resolve() == Path(args.model).resolve():
        raise GraphoptError("the output path is the input file; graphopt never overwrites its input")
    model = _load(args.model, check=not args.no_check, shapes=args.input_shape)
    checks = _feeds(model, args, None) if args.inputs else None  # the user's samples, validated before any work
    if args.dynamic or args.weight_only:
        if args.calibration:
            samples = load_calibration(args.calibration, model)
        else:
            samples = checks or _feeds(model, args, 4)  # only to report the error
    else:
        if not (args.calibration or args.inputs):
            raise GraphoptError("static quantization needs --calibration DATA or --inputs DATA "
                                "(or use --dynamic / --weight-only)")
        samples = load_calibration(args.calibration, model) if args.calibration else checks
    checks = checks or samples
    original = model.copy()
    t0 = time.perf_counter()
    shapes = _shapes_of(checks[0])
    stats = StatsInstrument(shapes)  # one per-pass row for every pass below (ctx.records)
    ctx = PassContext(calibration=samples, instruments=[stats])
    deq = get_pass("dequantize-integer")
    if args.requantize:  # integer ops back to float first, so the lossless pipeline sees float ops
        run_passes(model, [deq], ctx)
    initial = stats.initial
    if not args.no_optimize:
        run_passes(model, get_pipeline("default"), ctx)
        initial = initial or stats.initial
    if args.dynamic or args.weight_only:
        q = get_pass("quantize-dynamic", mode="weight-only" if args.weight_only else "dynamic",
                     per_channel=not args.per_tensor, requantize=args.requantize,
                     exclude_nodes=tuple(args.exclude_nodes.split(",")) if args.exclude_nodes else ())
    else:
        q = get_pass("quantize-static", method=args.method, per_channel=not args.per_tensor,
                     op_types=tuple(args.op_types.split(",")) if args.op_types else ("Conv", "Gemm", "MatMul"),
                     exclude_nodes=tuple(args.exclude_nodes.split(",")) if args.exclude_nodes else (),
                     exclude_op_types=tuple(args.exclude_ops.split(",")) if args.exclude_ops else (),
                     max_error=args.max_error, sensitivity=args.sensitivity, equalize=args.equalize,
                     bias_correction=args.bias_correction, symmetric_activations=args.symmetric,
                     requantize=args.requantize, by_latency=args.by_latency, rounding=args.rounding)
    float_model = model.copy() if args.report or not (args.dynamic or args.weight_only) else None
    run_passes(model, [q, get_pass("dce")], ctx)
    initial = initial or stats.initial
    if args.compact_names:
        run_passes(model, [get_pass("compact-names")], ctx)
    save(model, _target(args, out))  # main() moves it into place once everything below succeeded
    data = "inputs" if args.inputs else "calibration" if args.calibration else "random"
    check = OutputCheck(data)
    ref_sess, q_sess = ort_session(original), ort_session(str(_target(args, out)))  # one each, not one per sample
    for s in progress(checks[: min(len(checks), 32)], desc="checking the quantized model", unit="sample"):
        check.add(run_ort(None, s, session=ref_sess), run_ort(None, s, session=q_sess))  # type: ignore[arg-type]
    del ref_sess, q_sess
    lat = _latency_pair(args.model, str(_target(args, out)), checks[0])
    report = Report("quantize", input=args.model, output=str(out), seconds=time.perf_counter() - t0,
                    input_shapes={k: list(v) for k, v in shapes.items()},
                    before=summarize_model(original, args.model, shapes),
                    after=summarize_model(model, _target(args, out), shapes),
                    passes=pass_rows(ctx.records, initial),
                    verification=check.result(), latency=Latency(lat[0], lat[1], rounds=20, threads=2),
                    settings={k: getattr(args, k) for k in ("method", "per_tensor", "dynamic", "weight_only",
                                                            "max_error", "by_latency", "equalize", "requantize")
                              if getattr(args, k, None) not in (None, False)})
    report.after.path = str(out)
    if args.requantize:
        report.add_counters("input", getattr(deq, "report", {}), skip=("before",))
    layer_keys = ("sqnr_db", "sensitivity", "latency_decisions", "latency_ms", "latency_kept_float", "kept_float",
                  "kept_float_channel_spread", "channel_sqnr_db", "error", "error_all_int8")
    report.add_counters("", q.report, skip=layer_keys)
    if float_model is not None and q.name == "quantize-static":
        report.layers = quantize_layers(float_model, q.report, q.options)
    report.candidates = quantize_candidates(q.report)
    for c in report.candidates:  # the one written: its error is the output check's
        if c.chosen and c.error is None:
            c.error = report.verification.output_rel_error if report.verification else None
    if data == "calibration":
        report.notes.append("the output check ran on the calibration samples (in-sample); give --inputs with "
                            "held-out samples for an out-of-sample figure")
    _show_report(report, args.report)
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from graphopt.analysis.quantized import integer_ops
    from graphopt.onnx_io import save
    from graphopt.report import (
        Candidate,
        Latency,
        OutputCheck,
        Report,
        compress_layers,
        quantize_layers,
        summarize_model,
    )
    from graphopt.runtime import load_calibration, parse_input_shapes
    from graphopt.transform import PassContext, get_pass, get_pipeline, run_passes

    if not (args.cluster or args.lowrank or args.lowrank_flops or args.int8 or args.prune or args.nm):
        raise GraphoptError("nothing to do: give --prune R, --nm N:M, --cluster K, --lowrank ENERGY, "
                            "--lowrank-flops F and/or --int8")
    out = Path(args.output)
    if Path(args.model).exists() and out.exists() and out.resolve() == Path(args.model).resolve():
        raise GraphoptError("the output path is the input file; graphopt never overwrites its input")
    model = _load(args.model, check=not args.no_check, shapes=args.input_shape)
    integer = integer_ops(model)
    if integer:
        ops = ", ".join(f"{c} {k}" for k, c in integer.most_common())
        raise GraphoptError(f"the model is already quantized ({ops}): compress works on float weights; turn it back "
                            f"to float first (graphopt optimize IN -o float.onnx --passes dequantize-integer,dce), "
                            f"compress that, and add --int8 to quantize the result again")
    checks = _feeds(model, args, None) if args.inputs else None  # the user's samples, validated before any work
    calib = load_calibration(args.calibration, model) if args.calibration else checks
    if args.int8 and calib is None:
        raise GraphoptError("--int8 needs --calibration DATA or --inputs DATA")
    feeds = (checks or calib or [])[:16] or _feeds(model, args, 4)
    held = 0  # calibration samples kept out of the refit, for the output check
    if checks is None and calib is not None and len(calib) >= 4:
        # no --inputs: check on calibration samples the refit did not see. Checked on the samples it
        # was fit to, ppocr_cls read 0.0003 error and top-1 agreement 1.000 where held-out text
        # lines agreed 0.33 (a least-squares refit on 8 samples reproduces those 8)
        held = max(1, min(16, len(calib) // 4))
        calib, feeds = calib[:-held], calib[-held:]
    if calib is None and checks is None:
        logging.getLogger("graphopt.dims").warning(
            "no --calibration or --inputs: pruned layers are not refit, and the table's error and agreement are "
            "measured on random inputs, which says little about the task; give real samples")
    t_start = time.perf_counter()
    shapes = _shapes_of(feeds[0])
    summary_in = summarize_model(model, args.model, shapes)
    run_passes(model, get_pipeline("default"))
    passes: list[Any] = []
    reports: list[tuple[str, Any]] = []
    if args.prune and args.structured:
        pr = get_pass("prune-channels", ratio=args.prune, importance=args.importance, recover=calib is not None,
                      sensitivity=bool(args.sensitivity and calib is not None), multiple_of=args.channel_multiple)
        passes.append(pr)
        reports.append(("prune-channels", pr))
    elif args.prune or args.nm:
        pr = get_pass("prune", sparsity=args.prune or 0.5, mode=args.nm or "magnitude")
        passes.append(pr)
        reports.append(("prune", pr))
    if args.lowrank or args.lowrank_flops:
        lr = get_pass("lowrank", energy=args.lowrank if args.lowrank else None, flops=args.lowrank_flops,
                      activation_aware=args.activation_aware,
                      conv={"tucker": True, "spatial": "spatial", "none": False}[args.lowrank_conv])
        passes.append(lr)
        reports.append(("lowrank", lr))
    if args.refit == "block" and passes:  # every layer refit to the original's block outputs (refit-blocks)
        if calib is None:
            raise GraphoptError("--refit block needs --calibration DATA or --inputs DATA")
        rb = get_pass("refit-blocks", teacher=model.copy())
        passes.append(rb)
        reports.append(("refit-blocks", rb))
    # after structured pruning the refit filters differ in scale channel to channel: per-tensor
    # centroids cost 3-5 points there, per-channel ones about 1 (digits ResNet)
    per_channel = bool(args.per_channel or (args.prune and args.structured))
    if args.cluster:
        cl = get_pass("cluster", clusters=args.cluster, init=args.cluster_init, per_channel=per_channel,
                      storage="dense" if (args.dense or args.int8) else "palettized")
        passes.append(cl)
        reports.append(("cluster", cl))
    if args.int8:
        # clustered weights: per-tensor clusters get per-tensor int8 scales, per-channel clusters
        # per-channel ones, so the palette survives either way
        q = get_pass("quantize-static", per_channel=not (args.cluster and not per_channel))
        passes.append(q)
        reports.append(("int8", q))
        if args.cluster and args.cluster <= 256:
            pal = get_pass("palettize", max_values=args.cluster)
            passes.append(pal)  # keep the cluster palette in the int8 weights: indices + int8 codebook
            reports.append(("palettize", pal))
    # --input-shape: concrete dims for passes that follow shapes (prune-channels through a YOLO neck)
    ctx = PassContext(calibration=calib, input_shapes=parse_input_shapes(args.input_shape) or None)
    report = Report("compress", input=args.model, output=str(out), input_shapes={k: list(v) for k, v in shapes.items()},
                    before=summary_in, settings={k: getattr(args, k) for k in (
                        "prune", "structured", "nm", "cluster", "lowrank", "lowrank_flops", "int8", "per_channel")
                        if getattr(args, k, None) not in (None, False)})
    data = "inputs" if args.inputs else ("held-out calibration" if held else "calibration") if args.calibration \
        else "random"
    with tempfile.TemporaryDirectory(prefix="graphopt-compress-") as tmp:
        prev = _stage(model, Path(tmp) / "stage0.onnx", feeds)
        first = prev
        for i, p in enumerate(passes):
            pre = model.copy() if p.name == "quantize-static" else None  # its per-layer rows name the float model
            t0 = time.perf_counter()
            run_passes(model, [p], ctx)
            seconds = time.perf_counter() - t0
            cur = _stage(model, Path(tmp) / f"stage{i + 1}.onnx", feeds)
            report.passes.append(_stage_row(p.name, prev, cur, feeds[0], seconds=seconds))
            err = OutputCheck(data)
            for a, b in zip(first.outputs, cur.outputs, strict=True):
                err.add(a, b)
            report.candidates.append(Candidate(f"after {p.name}", size_bytes=cur.size,
                                               latency_ms=report.passes[-1].latency_ms_after,
                                               error=err.result().output_rel_error, chosen=i == len(passes) - 1))
            report.layers += quantize_layers(pre, p.report, p.options) if pre is not None else \
                compress_layers(p.name, p.report)
            prev = cur
        run_passes(model, [get_pass("dce"), get_pass("compact-names")])
        save(model, _target(args, out))
        final = _stage(model, _target(args, out), feeds, write=False)
        total = _stage_row("total (written file)", first, final, feeds[0], seconds=time.perf_counter() - t_start)
        report.passes.append(total)
    check = OutputCheck(data)
    for a, b in zip(first.outputs, final.outputs, strict=True):  # the lossless pipeline's model vs the file
        check.add(a, b)
    report.verification = check.result()
    report.after = summarize_model(model, _target(args, out), shapes)
    report.after.path = str(out)
    if total.latency_ms_before and total.latency_ms_after:
        report.latency = Latency(total.latency_ms_before, total.latency_ms_after, rounds=15, threads=2)
    report.candidates.insert(0, Candidate("lossless pipeline", size_bytes=first.size, latency_ms=total.latency_ms_before,
                                          error=0.0))
    for name, p in reports:
        report.add_counters(name, p.report, skip=("sqnr_db", "sensitivity", "pruned", "factored", "conv_factored",
                                                  "clustered", "skipped", "kept_float", "channel_sqnr_db",
                                                  "kept_float_channel_spread", "partial"))
    report.seconds = time.perf_counter() - t_start
    _show_report(report, args.report)
    return 0


class _Stage:
    """A snapshot of the model between compression passes: its file and what it measures."""

    def __init__(self, path: Path, size: int, params: int, flops: int, outputs: list[dict[str, np.ndarray]]) -> None:
        self.path, self.size, self.params, self.flops, self.outputs = path, size, params, flops, outputs
        self.nodes: int | None = None


def _stage(model: Any, path: Path, feeds: list[dict[str, Any]], write: bool = True) -> _Stage:
    from graphopt.analysis import infer_shapes, model_stats
    from graphopt.onnx_io import save
    from graphopt.runtime import model_inputs, ort_session, resolve_input_shapes, run_ort
    from graphopt.transform import run_passes

    snap = model.copy()
    run_passes(snap, ["dce"])  # what the file would hold
    if write:
        save(snap, path)
    # FLOPs at the sizes the checks run at (the user's data, or the sizes the random feeds got)
    names = {v.name for v in model_inputs(snap)}
    infer_shapes(snap, resolve_input_shapes(snap, {k: np.shape(v) for k, v in feeds[0].items() if k in names}))
    st = model_stats(snap)
    sess = ort_session(str(path))
    outs = [run_ort(str(path), f, session=sess) for f in feeds]
    stage = _Stage(path, path.stat().st_size, st.params, st.flops, outs)
    stage.nodes = st.compute_nodes
    return stage


def _stage_row(name: str, a: _Stage, b: _Stage, feed: dict[str, Any], seconds: float | None = None) -> Any:
    """One report row: the pass's result and what it changed against the stage before it."""
    from graphopt.report import PassRow
    from graphopt.runtime import class_like

    pairs = [(list(oa.values()), list(ob.values())) for oa, ob in zip(a.outputs, b.outputs, strict=True)]
    f64 = [([np.asarray(x, np.float64) for x in oa], [np.asarray(y, np.float64) for y in ob])  # bool/int outputs too
           for oa, ob in pairs if all(np.asarray(x).dtype.kind in "biuf" for x in [*oa, *ob])]
    num = sum(float(np.sum((x - y) ** 2)) for oa, ob in f64 for x, y in zip(oa, ob, strict=True))
    den = sum(float(np.sum(x ** 2)) for oa, _ in f64 for x in oa)
    agree = [float(np.mean(np.argmax(oa[0], -1) == np.argmax(ob[0], -1)))
             for oa, ob in pairs if np.asarray(oa[0]).dtype.kind == "f" and class_like(np.asarray(oa[0]))]
    la = lb = None
    try:
        la, lb = _latency_pair(str(a.path), str(b.path), feed, rounds=15)
    except Exception:  # noqa: BLE001 - latency is informative; a model ORT cannot time still reports
        pass

    return PassRow(name, seconds=seconds, nodes_before=a.nodes, nodes_after=b.nodes, params_before=a.params,
                   params_after=b.params, size_bytes_before=a.size, size_bytes_after=b.size, flops_before=a.flops,
                   flops_after=b.flops, latency_ms_before=la, latency_ms_after=lb,
                   output_rel_error=float(np.sqrt(num / den)) if den else None,
                   top1_agreement=float(np.mean(agree)) if agree else None)


def cmd_compile(args: argparse.Namespace) -> int:
    from graphopt.backend import compile as tvm_compile
    from graphopt.runtime import parse_input_shapes

    if args.trials and args.minutes:
        raise GraphoptError("give --trials or --minutes, not both")
    out = Path(args.output)
    if out.suffix not in (".so", ".tar"):
        raise GraphoptError(f"-o {args.output!r}: the output must end in .so (shared library) or .tar")
    src = args.model  # main() put the bundled model here for --example
    hints = parse_input_shapes(args.input_shape)
    if getattr(args, "example", False) and not hints and not args.inputs:
        hints = {"input": [1, 1, 8, 8]}  # the bundled digits CNN at batch 1 (its batch dim is dynamic)
        log.warning("--example: compiling the bundled model at input:1,1,8,8 (batch 1); give --input-shape "
                    "input:N,1,8,8 for another batch")
    if hints and not args.no_check:  # names and ranks checked here (TVM would name a dynamic dim instead)
        _load(src, check=False, shapes=args.input_shape)
    if args.inputs:  # shapes from the user's data (--input-shape still wins where both are given)
        from graphopt.runtime import load_calibration

        hints = {**_shapes_of(load_calibration(args.inputs, _load(src, check=False), what="--inputs")[0]), **hints}
    if args.no_check:  # compile loads (and checks) a path itself
        src = _load(src, check=False, shapes=args.input_shape)
    t0 = time.perf_counter()
    consts = {}
    for item in args.const_input:  # NAME=VALUE (a number, or comma-separated numbers)
        name, eq, text = item.partition("=")
        try:
            vals = [float(x) for x in text.split(",")] if eq and text else None
        except ValueError:
            vals = None
        if not name or vals is None:
            raise GraphoptError(f"--const-input {item!r}: expected NAME=VALUE (e.g. sr=16000)")
        consts[name] = vals[0] if len(vals) == 1 else vals
        hints.pop(name, None)
    cm = tvm_compile(src, args.target, input_shapes=hints, trials=args.trials or 0,
                     minutes=args.minutes, cache_dir=args.cache, rpc=args.rpc,
                     default_schedules=not args.naive, progress=not args.quiet, build_cache=not args.no_build_cache,
                     const_inputs=consts or None, int8_kernels=not args.no_int8_kernels,
                     fast_math=not args.no_fast_math, winograd=not args.no_winograd, threads=args.threads)
    cm.export(_target(args, out))
    counts: dict[str, int] = {}
    for v in cm.info.schedules.values():
        counts[v] = counts.get(v, 0) + 1
    sched = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    tuning = cm.info.tuning
    extra = ""
    if tuning:
        extra = (f"; tuned {len(tuning.get('tuned', []))} task(s) with {tuning.get('trials', 0)} trials, "
                 f"{tuning.get('cached', 0)} from cache {tuning.get('cache_dir')}")
        if tuning.get("skipped"):
            extra += f", {len(tuning['skipped'])} kept default schedules"
    if cm.info.from_build_cache:
        extra += "; the same build was in the cache (--no-build-cache rebuilds)"
    for_threads = f" ({args.threads} thread(s): run with TVM_NUM_THREADS={args.threads})" if args.threads else ""
    print(f"wrote {out} (+ {out.name}.json) for {cm.target.name}{for_threads} in {time.perf_counter() - t0:.1f} s: "
          f"kernels: {sched}{extra}")
    if args.report:  # also measures the build against ONNX Runtime where it runs here
        from graphopt.report import compile_report

        report = compile_report(args.model, cm, str(out), library=_target(args, out),
                                seconds=time.perf_counter() - t0,
                                data=load_calibration(args.inputs, _load(args.model, check=False), what="--inputs")[:1]
                                if args.inputs else None)
        _show_report(report, args.report)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """ONNX Runtime vs a TVM build of the same model on the same inputs, interleaved."""
    from graphopt.backend import compile as tvm_compile
    from graphopt.backend import load_compiled
    from graphopt.report import table
    from graphopt.runtime import (
        compare,
        input_feeds,
        interleaved_round_times,
        load_calibration,
        model_inputs,
        ort_bound_call,
        ort_session,
        parse_input_shapes,
    )

    m = _load(args.model, check=not args.no_check, shapes=args.input_shape)
    hints = parse_input_shapes(args.input_shape)
    data = load_calibration(args.inputs, m, what="--inputs") if args.inputs else None
    if data:  # shapes from the user's data (--input-shape still wins where both are given)
        hints = {**_shapes_of(data[0]), **hints}
    if args.compiled:
        cm = load_compiled(args.compiled)
    else:
        cm = tvm_compile(m, "host", input_shapes=hints, progress=not args.quiet)  # an implicit compile takes minutes
    if data:
        feed = data[0]
    else:  # random data at the compiled shapes that the model runs on (e.g. a sample-rate input's value)
        names = {v.name for v in model_inputs(m)}
        feed = input_feeds(m, hints={s.name: list(s.shape) for s in cm.inputs if s.name in names},
                           seed=args.seed)[0]
    sess = ort_session(m, optimize=True, threads=args.threads)
    ref = sess.run(None, feed)
    got = cm.run(feed)
    names = [o.name for o in sess.get_outputs()]
    c = compare(dict(zip(names, ref, strict=True)), dict(zip(names, got, strict=False)), rtol=1e-3, atol=1e-4)
    fn, args_tvm = cm.vm()["main"], cm._arguments(feed)
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    pool = None
    if cm.target.device == "cpu":  # TVM's pool with as many threads as ORT's (it is process-wide)
        import tvm

        pool = tvm.get_global_func("runtime.config_threadpool")
        pool(1, args.threads)
    try:
        # like for like: ORT on inputs bound once, TVM on tensors converted once (no numpy conversions timed)
        times = interleaved_round_times({"ort": ort_bound_call(sess, feed), "tvm": lambda: fn(*args_tvm)}, args.rounds)
    finally:
        if pool is not None:
            pool(1, 0)  # back to TVM's default (every core, or TVM_NUM_THREADS)
    mo, mt = (float(np.median(times[k])) * 1e3 for k in ("ort", "tvm"))
    ratios = np.asarray(times["tvm"]) / np.asarray(times["ort"])
    q1, q3 = np.percentile(ratios, [25, 75])
    print(table(["runtime", "median ms", "ratio vs ORT (median of rounds, ± half IQR)"],
                [[f"onnxruntime (ENABLE_ALL, {threads})", f"{mo:.3f}", "1.00"],
                 [f"TVM {cm.target.name}, {threads}" + (f" ({args.compiled})" if args.compiled else " (untuned)"),
                  f"{mt:.3f}", f"{np.median(ratios):.2f} ±{(q3 - q1) / 2:.2f}"]]))
    print(f"outputs: max abs diff {c.max_abs:.2e}, cosine {c.cosine:.6f} ({'ok' if c.ok else 'MISMATCH'})")
    return 0 if c.ok else 1


def _half_feed(path: str, feed: dict[str, Any]) -> dict[str, Any]:
    """``feed`` with each array cast to the type the model at ``path`` declares for it (a model
    converted with --no-keep-io takes float16/bfloat16 inputs)."""
    import onnx

    from graphopt.ir.tensor import np_dtype

    types = {i.name: i.type.tensor_type.elem_type for i in onnx.load(path, load_external_data=False).graph.input}
    return {k: (np.asarray(v).astype(np_dtype(types[k])) if types.get(k) and np.asarray(v).dtype.kind == "f" else v)
            for k, v in feed.items()}


def cmd_convert(args: argparse.Namespace) -> int:
    """float16/bfloat16 conversion: weight-only (--weights-only) or full compute; the result is
    compared with the input under ONNX Runtime on --inputs samples (or random ones)."""
    from graphopt.onnx_io import save
    from graphopt.report import OutputCheck, PassRow, Report, float16_layers, summarize_model
    from graphopt.runtime import run_ort
    from graphopt.transform import PassContext, get_pass, run_passes

    dtype = "bfloat16" if args.bf16 else "float16"
    split = (lambda s: tuple(x for x in (s or "").split(",") if x))
    if args.weights_only and (args.block_ops or args.block_nodes or args.keep_io is False):
        raise GraphoptError("--block-ops, --block-nodes and --no-keep-io apply to full conversion; --weights-only "
                            "keeps every node and the model's inputs/outputs float32")
    model = _load(args.model, check=not args.no_check, shapes=args.input_shape)
    samples = _feeds(model, args, None) if args.inputs else None  # validated before any work
    original = model.copy()
    if args.weights_only:
        p = get_pass("float16-weights", dtype=dtype)
    else:
        p = get_pass("float16", dtype=dtype, keep_io=args.keep_io is not False, block_ops=split(args.block_ops),
                     block_nodes=split(args.block_nodes), default_block=not args.no_default_block)
        names = {n.name for g in model.graph.all_graphs() for n in g.iter_nodes()}
        missing = [n for n in split(args.block_nodes) if n not in names]
        if missing:
            raise GraphoptError(f"--block-nodes: no node named {missing[0]!r} in the model")
    shapes = _shapes_of((samples or _feeds(original, args, 1))[0])
    summary_in = summarize_model(original, args.model, shapes)
    t0 = time.perf_counter()
    run_passes(model, [p], PassContext(calibration=samples))
    seconds = time.perf_counter() - t0
    target = _target(args, Path(args.output))
    save(model, target)
    rep = p.report
    report = Report("convert", input=args.model, output=args.output, input_shapes={k: list(v) for k, v in shapes.items()},
                    before=summary_in, after=summarize_model(model, target, shapes),
                    passes=[PassRow(p.name, changed=True, seconds=seconds)],
                    settings={"dtype": dtype, "weights_only": bool(args.weights_only),
                              "keep_io": args.keep_io is not False})
    report.after.path = args.output
    report.add_counters("", rep, skip=("kept", "kept_float32", "dtype", "keep_io"))
    report.layers = float16_layers(rep, dtype)
    if not args.weights_only:
        if rep["kept"]:
            report.counters["nodes_kept_float32"] = len(rep["kept"])
        report.counters["model_inputs_outputs"] = "float32 (--keep-io)" if rep["keep_io"] else dtype
    checks = samples or _feeds(original, args, 2)
    check = OutputCheck("inputs" if args.inputs else "random")
    ran = True
    for s in progress(checks[: min(len(checks), 16)], desc="checking the converted model", unit="sample"):
        try:
            got = run_ort(str(target), _half_feed(str(target), s))
        except GraphoptError as e:
            if dtype == "bfloat16":  # ORT's CPU provider has few bfloat16 kernels: a model for GPUs/TVM
                report.notes.append(f"ONNX Runtime (CPU) cannot run it: {str(e)[:160]}")
                ran = False
                break
            raise GraphoptError(f"internal error: ONNX Runtime cannot run the converted model, nothing written "
                                f"({e})") from None
        check.add(run_ort(original, s), {k: np.asarray(v, np.float32) if np.asarray(v).dtype.kind == "f" else v
                                         for k, v in got.items()})
    if ran:
        report.verification = check.result()
        if check.nonfinite:  # float16 overflow: inf/nan where float32 is finite (max/cosine skip them)
            report.notes.append(f"{check.nonfinite} non-finite output values (values beyond float16's range: pass "
                                "--inputs so the nodes that overflow stay float32)")
    report.seconds = time.perf_counter() - t0
    _show_report(report, args.report)
    return 0


def _write_report(report: Any, path: str | None) -> None:
    """Write ``--report`` (format by suffix) and say where."""
    if path:
        report.write(path)
        print(f"report written to {path}")


def _show_report(report: Any, path: str | None) -> None:
    """The report on the console, then written to ``--report`` if given."""
    print(report.console())
    _write_report(report, path)


def _labels(path: str, n: int) -> np.ndarray:
    """Integer labels, one per --data sample: .npy, .npz (its one array, or 'labels'), or text (one per line)."""
    p = Path(path)
    if not p.is_file():
        raise GraphoptError(f"--labels file {path!r} does not exist")
    try:
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                key = "labels" if "labels" in z.files else (z.files[0] if len(z.files) == 1 else None)
                if key is None:
                    raise GraphoptError(f"--labels {path!r} holds several arrays ({z.files}); name one 'labels'")
                arr = z[key]
        else:
            arr = np.loadtxt(p, dtype=np.int64, ndmin=1)
    except GraphoptError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy's many read errors
        raise GraphoptError(f"cannot read --labels {path!r}: {str(e).splitlines()[0][:200]}") from None
    arr = np.asarray(arr)
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise GraphoptError(f"--labels {path!r}: class indices must be integers (got {arr.dtype})")
    if arr.shape[0] != n:
        raise GraphoptError(f"--labels {path!r} has {arr.shape[0]} labels for {n} --data samples")
    return arr.astype(np.int64)


def _pairs(text: str | None, what: str) -> list[tuple[str, str]]:
    out = []
    for item in (text or "").split(","):
        if item.strip():
            a, sep, b = item.partition("=")
            if not sep or not a.strip() or not b.strip():
                raise GraphoptError(f"{what}: {item!r} is not NAME=VALUE")
            out.append((a.strip(), b.strip()))
    return out


def cmd_distill(args: argparse.Namespace) -> int:
    from graphopt.onnx_io import save
    from graphopt.report import table
    from graphopt.runtime import compare, load_calibration, ort_session, run_ort
    from graphopt.transform import PassContext, get_pass, run_passes

    if args.steps is not None and args.minutes is not None:
        raise GraphoptError("give --steps or --minutes, not both")
    if args.alpha > 1:
        raise GraphoptError(f"--alpha {args.alpha} is above 1")
    out = Path(args.output)
    for src in (args.model, args.teacher):
        if Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
            raise GraphoptError("the output path is an input file; graphopt never overwrites its input")
    try:
        import torch
    except ImportError:
        raise GraphoptError('graphopt distill needs PyTorch (CPU): pip install "graphopt[distill]" '
                            '(see README: Distillation)') from None
    if args.threads:
        torch.set_num_threads(args.threads)
    student = _load(args.model, check=not args.no_check)
    teacher = _load(args.teacher, check=not args.no_check)
    s_data = load_calibration(args.data, student, what="--data")
    t_data = load_calibration(args.data, teacher, what="--data (teacher)")
    data = [{**t, **s} for s, t in zip(s_data, t_data, strict=True)]
    labels = _labels(args.labels, len(data)) if args.labels else None
    match: Any = None
    if args.match == "auto":
        match = "auto"
    elif args.match:
        match = _pairs(args.match, "--match")
    losses = dict(_pairs(args.loss, "--loss"))
    snapshot = None
    if args.snapshot_every:
        def snapshot(m: Any, step: int, seconds: float) -> None:  # OUT.t00600s.onnx: the weights after 600 s
            path = out.with_name(f"{out.stem}.t{round(seconds):05d}s{out.suffix}")
            save(m, path)
            log.info("snapshot after %d steps (%.0f s): %s", step, seconds, path)
    p = get_pass("distill", teacher=teacher, labels=labels, temperature=args.temperature, alpha=args.alpha,
                 steps=args.steps, minutes=args.minutes, lr=args.lr, batch=args.batch, match=match,
                 feature_weight=args.feature_weight, losses=losses, seed=args.seed,
                 snapshot_minutes=args.snapshot_every, snapshot=snapshot)
    run_passes(student, [p], PassContext(calibration=data))
    save(student, _target(args, out))  # main() checks it and moves it into place
    # the written file against the teacher, both under ONNX Runtime
    sess_t, sess_s = ort_session(teacher), ort_session(str(_target(args, out)))
    worst_cos, top1 = 1.0, []
    from graphopt.report import OutputCheck, distill_report

    # the report's figures: the written model against the teacher, on held-out samples when given
    if args.inputs:
        s_eval = load_calibration(args.inputs, student, what="--inputs")
        t_eval = load_calibration(args.inputs, teacher, what="--inputs (teacher)")
        check = OutputCheck("inputs")
    else:
        s_eval, t_eval = s_data, t_data
        check = OutputCheck("data")
        log.warning("the check below ran on the training samples (--data, in-sample): a student can fit them "
                    "and lose on others; give --inputs with held-out samples to measure it")
    for s, t in zip(s_eval[:16], t_eval[:16], strict=True):
        ref, got = run_ort(teacher, t, session=sess_t), run_ort(None, s, session=sess_s)  # type: ignore[arg-type]
        check.add(ref, got)
        c = compare(ref, got, rtol=1e9, atol=1e9)
        worst_cos = min(worst_cos, c.cosine)
        if c.top1 is not None:
            top1.append(c.top1)
    rows = [*p.report["rows"], ["written model vs teacher (ORT, min cosine)", f"{worst_cos:.5f}"]]
    if top1:
        rows.append(["written model vs teacher (ORT, top-1 agreement)", f"{np.mean(top1):.4f}"])
    print(table(["", "value"], rows))
    if args.report:
        report = distill_report(args.model, str(out), getattr(p, "result", None), teacher=args.teacher,
                                written=_target(args, out), check=check, input_shapes=_shapes_of(s_data[0]),
                                settings={k: getattr(args, k) for k in ("steps", "minutes", "lr", "batch", "temperature",
                                                                        "alpha") if getattr(args, k) is not None})
        _write_report(report, args.report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphopt", description="Compiler-style graph optimizer for ONNX models.")
    p.add_argument("--version", action="version", version=f"graphopt {_version()}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help=_QUIET_HELP)
    p.add_argument("--plugin", action="append", default=[], dest="plugins", metavar="MODULE", help=_PLUGIN_HELP)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    shape_effect = {  # what the shape does to each command's result (said in --help)
        "inspect": "; FLOPs and memory are counted at it",
        "optimize": "; the written model has these shapes FIXED (its inputs are declared with them and shape "
                    "computations fold); the summary says so",
        "quantize": "; the checks run at it (the written model keeps its dynamic dims)",
        "compress": "; passes that follow shapes use it (the written model keeps its dynamic dims)",
        "convert": "; the checks run at it (the written model keeps its dynamic dims)",
        "verify": "; the random samples have it",
        "compile": "; the library is compiled for exactly these shapes",
        "bench": "; the model is compiled and timed at it",
    }

    def shape_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,...", type=_shape_spec,
                        help="concrete shape for an input with dynamic dims (symbols, -1, missing; repeatable)"
                        + shape_effect.get(sp.prog.rsplit(" ", 1)[-1], ""))

    def example_arg(sp: argparse.ArgumentParser, extra: str = "") -> None:
        sp.add_argument("--example", action="store_true",
                        help="use the small digits CNN bundled with graphopt as the model" + extra)

    def inputs_arg(sp: argparse.ArgumentParser, extra: str = "") -> None:
        sp.add_argument("--inputs", metavar="FILE.npz|DIR",
                        help="your own input samples: a .npz with one array per input (first axis = samples; "
                             "a 0-d array serves every sample) or a directory of one .npz per sample" + extra)

    sp = sub.add_parser("inspect", help="summarize a model: opsets, inputs/outputs, ops, params, FLOPs")
    sp.add_argument("model", nargs="?")
    example_arg(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--no-check", action="store_true", help=_NO_CHECK_HELP)
    shape_arg(sp)
    sp.set_defaults(fn=cmd_inspect)

    sp = sub.add_parser("optimize", help="apply a pipeline or passes and write the result")
    sp.add_argument("model", nargs="?", help="input ONNX file")
    sp.add_argument("-o", "--output", required=True, help="output ONNX file (written atomically)")
    sp.add_argument("--example", action="store_true", help="use the small CNN bundled with graphopt as input")
    sp.add_argument("--pipeline", help="named pipeline (see `graphopt passes`; default: default)")
    sp.add_argument("--passes", help="comma-separated pass names, run in order")
    sp.add_argument("--verify", type=_count(0), default=0, metavar="N",
                    help="check outputs against the input model on N random inputs (or the first N --inputs "
                         "samples) after every pass")
    sp.add_argument("--rtol", type=_nonneg, default=1e-4)
    sp.add_argument("--atol", type=_nonneg, default=1e-5)
    sp.add_argument("--scale-rtol", type=_nonneg, default=None, help=_SCALE_RTOL_HELP)
    sp.add_argument("--report", metavar="FILE", help="write a report (.html with plots, .json or .md): per-pass nodes, params, size, time and error")
    sp.add_argument("--external-data", action="store_true", help="store tensors >= 1 KiB in OUTPUT.data")
    sp.add_argument("--no-check", action="store_true", help=_NO_CHECK_HELP)
    shape_arg(sp)
    inputs_arg(sp, "; verification uses them instead of random inputs (all of them without --verify N)")
    sp.set_defaults(fn=cmd_optimize)

    sp = sub.add_parser("quantize", help="static INT8 quantization (QDQ, uint8 activations, int8 weights)")
    sp.add_argument("model", nargs="?")
    example_arg(sp, " (calibrated on its bundled images unless --calibration/--inputs is given)")
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--calibration",
                    help=".npz (one array per input, first axis = samples) or a directory of .npz samples "
                         "(required for static quantization)")
    sp.add_argument("--dynamic", action="store_true",
                    help="dynamic quantization of MatMul/Gemm weights (no calibration; transformer-like models)")
    sp.add_argument("--weight-only", action="store_true", help="int8 weights, float compute (smallest change)")
    sp.add_argument("--method", default="minmax", choices=["minmax", "percentile", "mse", "entropy"])
    sp.add_argument("--per-tensor", action="store_true", help="per-tensor weights (no opset raise)")
    sp.add_argument("--op-types", help="comma list of ops to quantize (default Conv,Gemm,MatMul)")
    sp.add_argument("--exclude-nodes", help="comma list of node names to keep in float")
    sp.add_argument("--exclude-ops", help="comma list of op types to keep in float")
    sp.add_argument("--symmetric", action="store_true",
                    help="symmetric int8 activations (S8S8; default asymmetric uint8, ORT's fast path on x86)")
    sp.add_argument("--max-error", type=_nonneg, help="keep the most sensitive layers in float until the relative "
                    "L2 output error on calibration data is at most this (automatic mixed precision)")
    sp.add_argument("--sensitivity", action="store_true", help="report per-layer sensitivity (one layer at a time)")
    sp.add_argument("--equalize", action="store_true", help="cross-layer equalization before quantizing")
    sp.add_argument("--bias-correction", action="store_true",
                    help="correct biases for the expected shift of quantized weights")
    sp.add_argument("--rounding", default="nearest", choices=["nearest", "adaround", "gptq"],
                    help="how int8 weights are rounded: to nearest, or learned per layer from the float model's "
                         "activations on the calibration data (AdaRound, GPTQ; same scales, lower layer output error)")
    sp.add_argument("--requantize", action="store_true",
                    help="for an already-quantized model: dequantize its integer weights (ConvInteger, "
                         "MatMulInteger, DynamicQuantizeLSTM, QDQ) and quantize it again")
    sp.add_argument("--by-latency", action="store_true",
                    help="time the model under ONNX Runtime with each int8 region taken back to float and keep "
                         "float where that is faster (reported per region)")
    sp.add_argument("--no-optimize", action="store_true", help="skip the lossless default pipeline first")
    sp.add_argument("--compact-names", action="store_true",
                    help="short names for internal values and nodes (inputs/outputs keep theirs): smaller files")
    sp.add_argument("--report", metavar="FILE", help="write a report (.html with plots, .json or .md): per-layer SQNR, int8/float and why, candidates tried")
    sp.add_argument("--no-check", action="store_true", help=_NO_CHECK_HELP)
    shape_arg(sp)
    inputs_arg(sp, "; the error and latency checks run on them, and static quantization calibrates on them "
                   "where --calibration is not given")
    sp.set_defaults(fn=cmd_quantize)

    sp = sub.add_parser("compress", help="low-rank factorization, weight clustering (and INT8) for smaller models")
    sp.add_argument("model", nargs="?")
    example_arg(sp, " (calibrated on its bundled images unless --calibration/--inputs is given)")
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--prune", type=_fraction(0, 1, high_open=True), metavar="R", help="prune this fraction of weights (or of channels "
                    "with --structured)")
    sp.add_argument("--structured", action="store_true", help="remove whole Conv output channels (real speedup); "
                    "with --calibration the next layers are refit by least squares")
    sp.add_argument("--importance", default="l1", choices=["l1", "activation"], help="channel importance")
    sp.add_argument("--sensitivity", action="store_true",
                    help="with --structured and --calibration: spread the ratio by per-layer sensitivity")
    sp.add_argument("--nm", type=_n_of_m, metavar="N:M", help="N:M sparsity, e.g. 2:4")
    sp.add_argument("--channel-multiple", type=_count(1), default=1, metavar="Q",
                    help="with --structured: keep a multiple of Q channels per layer (8 or 16 suit CPU kernels)")
    sp.add_argument("--cluster", type=_int_range(2, 256), metavar="K", help="k-means weight sharing with K centroids (2..256)")
    sp.add_argument("--cluster-init", default="kmeans++", choices=["kmeans++", "linear", "density"])
    sp.add_argument("--per-channel", action="store_true", help="one codebook per output channel")
    sp.add_argument("--dense", action="store_true", help="keep clustered weights dense (default: palettized)")
    sp.add_argument("--lowrank", type=_fraction(0, 1), metavar="ENERGY", help="SVD rank keeping this energy fraction (0..1]")
    sp.add_argument("--lowrank-flops", type=_fraction(0, 1, high_open=True), metavar="F", help="SVD rank by FLOPs budget fraction (0..1)")
    sp.add_argument("--activation-aware", action="store_true", help="whitened SVD on calibration inputs")
    sp.add_argument("--lowrank-conv", default="tucker", choices=["tucker", "spatial", "none"],
                    help="how --lowrank factors Conv layers: Tucker-2 (1x1, kxk, 1x1), spatial separation "
                    "(kx1 then 1xk), or not at all (default: tucker)")
    sp.add_argument("--refit", default="layer", choices=["layer", "block"],
                    help="recovery with --calibration: 'layer' refits each pruned reader to its own original "
                         "output; 'block' then refits every layer, in graph order, to the original model's block "
                         "outputs (residual sums, kept channels) on the compressed model's own inputs")
    sp.add_argument("--int8", action="store_true", help="static INT8 afterwards (needs --calibration)")
    sp.add_argument("--calibration", help=".npz or directory of .npz samples")
    sp.add_argument("--report", metavar="FILE", help="write a report (.html with plots, .json or .md): per-pass and per-layer figures")
    sp.add_argument("--no-check", action="store_true", help=_NO_CHECK_HELP)
    shape_arg(sp)
    inputs_arg(sp, "; the per-pass checks run on them, and they serve as calibration where --calibration is "
                   "not given")
    sp.set_defaults(fn=cmd_compress)

    sp = sub.add_parser("compile", help="compile with TVM for a CPU/GPU target and export a library",
                        description="Compile a model with Apache TVM (Relax). The lossless pipeline runs first; "
                        "kernels get graphopt's default schedules, or MetaSchedule-tuned ones with --trials/--minutes "
                        "(cached per target, so compiling again is fast).")
    sp.add_argument("model", nargs="?")
    sp.add_argument("-o", "--output", required=True, help="OUT.so (shared library) or OUT.tar (object files)")
    sp.add_argument("--target", default="host",
                    help="host (this CPU), x86-64[-v2|-v3|-v4], aarch64[-dotprod] (cross), cuda[:sm_80|:sm_90], or a TVM "
                    "target as JSON (default: host)")
    sp.add_argument("--trials", type=_count(0), help="MetaSchedule tuning budget in measured candidates")
    sp.add_argument("--minutes", type=_nonneg, help="MetaSchedule tuning budget in minutes")
    sp.add_argument("--cache", metavar="DIR", help="tuning database root (default: ~/.cache/graphopt/tvm)")
    sp.add_argument("--rpc", metavar="HOST:PORT:KEY", help="measure on devices registered with a TVM RPC tracker")
    sp.add_argument("--threads", type=_count(1), help="CPU cores the model will run on, if not all of this machine's: "
                    "tuning (--minutes/--trials) measures candidates with that many threads and keeps their records "
                    "apart (without tuning the build is the same); run the library with TVM_NUM_THREADS set to the "
                    "same")
    sp.add_argument("--naive", action="store_true", help="no default schedules (TVM's plain loops; for comparison)")
    sp.add_argument("--no-int8-kernels", action="store_true", help="run a QDQ model's convs and matmuls in float "
                    "(dequantize, float kernel, quantize) instead of int8 x int8 -> int32 kernels (VNNI where the CPU "
                    "has it)")
    sp.add_argument("--no-fast-math", action="store_true", help="exact exp/erf/tanh/softmax/sigmoid (TVM's scalar "
                    "calls) instead of the default vectorized polynomials (float32 error <= 1e-5 relative, like ONNX "
                    "Runtime's own kernels)")
    sp.add_argument("--no-winograd", action="store_true", help="3x3 stride-1 convolutions as direct "
                    "convolutions instead of the default Winograd F(4x4, 3x3) (F(2x2, 3x3) on small maps) on CPU targets")
    sp.add_argument("--no-build-cache", action="store_true",
                    help="build again even if the cache holds this exact build (same model, target, options, records)")
    sp.add_argument("--example", action="store_true", help="compile the bundled example CNN")
    sp.add_argument("--no-check", action="store_true", help=_NO_CHECK_HELP)
    sp.add_argument("--report", metavar="FILE", help="write a report (.json, .md or .html): stages, kernels, and "
                    "outputs and latency against ONNX Runtime where the build runs here")
    sp.add_argument("--const-input", action="append", default=[], metavar="NAME=VALUE",
                    help="compile an input as a constant (e.g. sr=16000: If branches on it fold away; the "
                         "library no longer takes it; repeatable)")
    shape_arg(sp)
    inputs_arg(sp, "; input shapes are taken from the first sample")
    sp.set_defaults(fn=cmd_compile)

    sp = sub.add_parser("bench", help="ONNX Runtime vs a TVM build of the model, same inputs, interleaved")
    sp.add_argument("model", nargs="?")
    example_arg(sp)
    sp.add_argument("--compiled", metavar="OUT.so", help="a library from `graphopt compile` (default: compile now)")
    sp.add_argument("--rounds", type=_count(1), default=30)
    sp.add_argument("--threads", type=_count(1), default=2,
                    help="threads of both runtimes: ONNX Runtime's intra-op threads and TVM's thread pool")
    sp.add_argument("--seed", type=_count(0), default=0, help="seed of the random inputs")
    sp.add_argument("--no-check", action="store_true", help=_NO_CHECK_HELP)
    shape_arg(sp)
    inputs_arg(sp, "; the first sample is timed and compared (and fixes the shapes compiled for)")
    sp.set_defaults(fn=cmd_bench)

    sp = sub.add_parser("passes", help="list registered passes and pipelines")
    sp.set_defaults(fn=cmd_passes)

    sp = sub.add_parser("verify", help="compare two models' outputs on random inputs (or your own: --inputs)")
    sp.add_argument("a", nargs="?")
    sp.add_argument("b", nargs="?")
    example_arg(sp, " as the first model: `graphopt verify --example OTHER.onnx`")
    sp.add_argument("--samples", type=_count(1), default=None,
                    help="random samples to compare (default 3), or the first N of --inputs (default all)")
    sp.add_argument("--rtol", type=_nonneg, default=1e-4)
    sp.add_argument("--atol", type=_nonneg, default=1e-5)
    sp.add_argument("--scale-rtol", type=_nonneg, default=None, help=_SCALE_RTOL_HELP)
    sp.add_argument("--no-check", action="store_true", help=_NO_CHECK_HELP)
    shape_arg(sp)
    inputs_arg(sp)
    sp.set_defaults(fn=cmd_verify)

    sp = sub.add_parser("convert", help="float16/bfloat16: weights only (half the file) or full compute",
                        description="Convert a float32 model to float16 or bfloat16. --weights-only stores weights "
                        "in the half type behind Casts (compute stays float32; ONNX Runtime folds the Casts at load). "
                        "Otherwise activations too, with the model's inputs/outputs kept float32 (--keep-io), a "
                        "conservative list of ops kept float32 (exp, pow, large reductions, softmax...) or, with "
                        "--inputs, the nodes whose values overflow or underflow the half type on that data.")
    sp.add_argument("model", nargs="?")
    example_arg(sp)
    sp.add_argument("-o", "--output", required=True)
    half = sp.add_mutually_exclusive_group(required=True)
    half.add_argument("--fp16", action="store_true", help="convert to float16")
    half.add_argument("--bf16", action="store_true", help="convert to bfloat16 (needs opset >= 13)")
    sp.add_argument("--weights-only", action="store_true",
                    help="store weights in the half type behind a Cast; compute stays float32")
    sp.add_argument("--keep-io", action=argparse.BooleanOptionalAction, default=None,
                    help="keep the model's inputs and outputs float32 (default: yes)")
    sp.add_argument("--block-ops", metavar="A,B", help="op types kept float32")
    sp.add_argument("--block-nodes", metavar="N1,N2", help="node names kept float32")
    sp.add_argument("--no-default-block", action="store_true",
                    help="without --inputs, convert the conservative default list too (exp, pow, reductions...)")
    sp.add_argument("--report", metavar="FILE", help="write a report (.html with plots, .json or .md) naming every node kept float32 and why")
    sp.add_argument("--no-check", action="store_true", help=_NO_CHECK_HELP)
    shape_arg(sp)
    inputs_arg(sp, "; values beyond the half type's range or that lose precision on them keep their nodes "
                   "float32, and the error check runs on them")
    sp.set_defaults(fn=cmd_convert)
    sp = sub.add_parser("distill", help="train a (pruned, quantized or smaller) model to match a teacher (needs PyTorch)",
                        description="Knowledge distillation: the student's float weights (a QDQ student's int8 weights, "
                        "through fake quantization) are trained with PyTorch to reproduce the teacher's outputs on "
                        "--data: KL at --temperature for class-like outputs, MSE for maps, cross-entropy on --labels; "
                        "only the weights change. Needs pip install \"graphopt[distill]\"; see docs/distillation.md.")
    sp.add_argument("model", metavar="STUDENT")
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--teacher", required=True, help="the reference model (run by ONNX Runtime)")
    sp.add_argument("--data", required=True, metavar="FILE.npz|DIR",
                    help="training inputs, as --inputs takes them (unlabeled; the teacher labels them)")
    sp.add_argument("--labels", metavar="FILE", help="a class index per --data sample (.npy, .npz or text; -1: unlabeled, "
                    "teacher only): adds cross-entropy on the first class-like output")
    sp.add_argument("--temperature", type=_nonneg, default=4.0, help="softening temperature for KL (default 4)")
    sp.add_argument("--alpha", type=_nonneg, default=0.5,
                    help="with --labels: weight of distillation vs cross-entropy, 0..1 (0: labels alone; default 0.5)")
    sp.add_argument("--steps", type=_count(0), help="training steps (default 300)")
    sp.add_argument("--minutes", type=_nonneg, help="train for this long instead of --steps")
    sp.add_argument("--lr", type=_nonneg, default=1e-3,
                    help="Adam step relative to each weight tensor's RMS, cosine-decayed (default 1e-3: 0.1%%)")
    sp.add_argument("--batch", type=_count(1), default=8, help="samples per step (default 8)")
    sp.add_argument("--match", metavar="auto|T=S,...",
                    help="also match intermediate tensors (teacher name = student name), or auto: same name and shape")
    sp.add_argument("--feature-weight", type=_nonneg, default=1.0, help="weight of --match's feature loss")
    sp.add_argument("--loss", metavar="OUTPUT=kl|mse|cosine|ctc[:BLANK]|framekl[:BLANK],...",
                    help="loss per output instead of the automatic one; ctc: a CTC recognizer's [N, T, C] output "
                    "trained on the teacher's greedy transcripts (CTC, blank 0 unless ctc:BLANK) + per-frame KL, 0.5/0.5; "
                    "framekl: per-frame KL with each frame weighted by the teacher's non-blank probability")
    sp.add_argument("--threads", type=_count(1), help="PyTorch threads (default: its own; 1 is faster on a busy machine)")
    sp.add_argument("--seed", type=_count(0), default=0)
    sp.add_argument("--no-check", action="store_true", help=_NO_CHECK_HELP)
    sp.add_argument("--inputs", metavar="FILE.npz|DIR", help="held-out samples (not in --data) the written model is "
                    "checked against the teacher on (default: the training samples, with a warning)")
    sp.add_argument("--report", metavar="FILE", help="write a report (.json, .md or .html): the student before and "
                    "after against the teacher, the loss curve")
    sp.add_argument("--snapshot-every", type=_nonneg, metavar="MINUTES", help="also save the weights so far every "
                    "MINUTES of training, as OUT.t<seconds>s.onnx next to OUT (to score a long run over time)")
    sp.set_defaults(fn=cmd_distill)
    for sp in sub.choices.values():  # global options also after the command (graphopt inspect -q M)
        sp.add_argument("-q", "--quiet", action="store_true", dest="quiet_sub", help=_QUIET_HELP)
        sp.add_argument("--plugin", action="append", default=[], dest="plugins_sub", metavar="MODULE",
                        help=_PLUGIN_HELP)
    return p


_QUIET_HELP = "no progress bars or progress lines (also GRAPHOPT_QUIET=1)"
_PLUGIN_HELP = ("import MODULE (a module name, or a .py file) before the pipeline is built, so the passes it "
                "registers can be used; repeatable; also GRAPHOPT_PLUGINS=mod1,mod2")


def _version() -> str:
    """The installed distribution's version (the package's own when it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version("graphopt")
    except metadata.PackageNotFoundError:
        import graphopt

        return graphopt.__version__


class _StagedOutput:
    """A command's output, written where nothing sees it until the command has succeeded.

    The command writes into a private directory next to the final path, under the final file
    name (so an external-data file keeps the name the model refers to); :meth:`commit` checks
    the model (onnx's full check; ONNX Runtime loads it if it loads the input) and renames every
    file into place, the model last;
    :meth:`discard` removes the directory. An error at any point leaves nothing behind; a
    missing output directory is an error (nothing is created for ``-o``).
    """

    def __init__(self, final: Path, inputs: Sequence[str | None]) -> None:
        self.final = final
        self.source = next((s for s in inputs if s), None)
        for src in inputs:
            if src and final.exists() and Path(src).exists() and final.samefile(src):
                raise GraphoptError("the output path is the input file; graphopt never overwrites its input")
        if final.is_dir():
            raise GraphoptError(f"output path {str(final)!r} is a directory")
        self.created: list[Path] = []
        parent = final.absolute().parent
        if not parent.is_dir():  # like cp and mv: an output directory is the user's to make
            raise GraphoptError(f"output directory {str(final.parent)!r} does not exist")
        self.dir: Path | None = Path(tempfile.mkdtemp(prefix=".graphopt-", dir=parent))
        self.path = self.dir / final.name

    def commit(self, check: bool) -> None:
        if self.dir is None:
            return
        if check and self.path.suffix == ".onnx" and self.path.exists():
            self._vouch()
        files = sorted(self.dir.iterdir(), key=lambda f: f.name == self.final.name)  # the model last
        for f in files:
            os.replace(f, self.final.parent / f.name)
        self.created = []

    def _vouch(self) -> None:
        """Refuse to write a result that fails onnx's full check, or that ONNX Runtime refuses
        although it loads the input (a model with ops ORT lacks may be meant for another runtime)."""
        import onnx

        from graphopt.onnx_io import _checker_message

        try:
            onnx.checker.check_model(str(self.path), full_check=True)
        except Exception as e:  # noqa: BLE001 - ValidationError, InferenceError
            refused = _ort_refusal(self.source)
            if refused:  # the input passed onnx's check but its declared shapes contradict its graph
                raise GraphoptError(f"the input model is inconsistent: it passes onnx's check but ONNX Runtime "
                                    f"refuses it: {refused}") from None
            raise GraphoptError(f"internal error: the result fails onnx's full check, nothing written "
                                f"({_checker_message(e)})") from None
        why = _ort_refusal(self.path)
        if why and not _ort_refusal(self.source):
            raise GraphoptError(f"internal error: ONNX Runtime loads the input but refuses the result, nothing "
                                f"written ({why})")

    def discard(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        for p in reversed(self.created):
            with contextlib.suppress(OSError):
                p.rmdir()
        self.created = []


def _ort_refusal(path: str | Path | None) -> str | None:
    """Why ONNX Runtime, at its default settings (graph optimizations on, as users run it),
    refuses to load the model at ``path``; None if it loads (or there is no path)."""
    if path is None:
        return None
    from graphopt.runtime import ort_session

    try:
        ort_session(str(path), optimize=True)
    except GraphoptError as e:
        return str(e).removeprefix("ONNX Runtime cannot load the model: ").removeprefix(
            "[ONNXRuntimeError] : 1 : FAIL : ")[:300]
    return None


def _target(args: argparse.Namespace, out: Path) -> Path:
    """Where a command writes ``out``: main()'s staging path (moved into place on success)."""
    staged = getattr(args, "staged", None)
    return staged.path if staged is not None else out


def _quiet_onnxruntime() -> None:
    """ONNX Runtime logs its errors in colour on stderr before raising them; the CLI reports
    each in one line of its own, so its logger only speaks for fatal errors."""
    try:
        import onnxruntime as ort
    except ImportError:
        return
    ort.set_default_logger_severity(4)


_FLAG_WORDS: list[tuple[str, Any]] = [  # the library's argument names -> this CLI's flags
    (r"input_shapes=\{'([^']*)': \[([^\]]*)\]\}", lambda m: f"--input-shape {m[1]}:{m[2].replace(', ', ',')}"),
    (r"\binput_shapes\b", "--input-shape"),
    (r"\bbad input shape\b", "bad --input-shape"),
    (r"real samples \(data=\.\.\.\)", "--inputs FILE.npz|DIR with real samples"),
    (r"const_inputs=\{'([^']*)': ([^}]*)\}", lambda m: f"--const-input {m[1]}={m[2]}"),
    (r"const_inputs\[('[^']*')\]", r"--const-input \1"),
    (r"\bconst_inputs\b", "--const-input"),
    (r"\bbad rpc\b", "bad --rpc"), (r"\brpc='([^']*)'", r"--rpc \1"), (r"^rpc measures", "--rpc measures"),
    (r"give trials or minutes", "give --trials or --minutes"),
    (r"\bgive requantize=True\b", "give --requantize"), (r"\buse per_channel=False\b", "use --per-tensor"),
    (r"\(quantize-static\)$", "(without --dynamic)"),
    (r"\(PassContext\(calibration=\.\.\.\)\)", "(--calibration)"),
    (r"^losses= names", "--loss names"), (r"^match='auto':", "--match auto:"), (r"^match:", "--match:"),
    (r": lower lr$", ": lower --lr"),
]


def _cli_words(message: str) -> str:
    """A library message in the CLI's words: ``input_shapes={'x': [1, 3]}`` becomes
    ``--input-shape x:1,3`` and so on (the library speaks of its arguments, the CLI of its flags)."""
    import re

    for pattern, repl in _FLAG_WORDS:
        message = re.sub(pattern, repl, message)
    return message


class _PipeSafe:
    """``sys.stdout`` for a command: once the reader has gone (``graphopt inspect m | head -1``)
    further output is dropped (the descriptor is pointed at /dev/null, so the interpreter's last
    flush is quiet too) and the command finishes normally: no "Broken pipe" error, exit 0."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return int(self.stream.write(text) or 0)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self.gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # not a real descriptor (a test's capture)
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _load_plugins(modules: Sequence[str]) -> None:
    """Import the modules named by ``--plugin`` and ``GRAPHOPT_PLUGINS`` (separated by commas or
    ``os.pathsep``) before any pipeline is built, so the passes they register are known. A name
    ending in ``.py`` is imported from that file. One that cannot be imported is an error."""
    import importlib
    import importlib.util
    import re

    names = [*modules, *(x for x in re.split(rf"[,{re.escape(os.pathsep)}]", os.environ.get("GRAPHOPT_PLUGINS", ""))
                         if x.strip())]
    for name in (n.strip() for n in names):
        try:
            if name.endswith(".py"):
                spec = importlib.util.spec_from_file_location(Path(name).stem, name)
                if spec is None or spec.loader is None or not Path(name).is_file():
                    raise ImportError(f"no such file: {name}")
                mod = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = mod
                spec.loader.exec_module(mod)
            else:
                importlib.import_module(name)
        except GraphoptError:
            raise
        except Exception as e:  # noqa: BLE001 - ImportError, or whatever the module raised at import
            why = f"{type(e).__name__}: {e}" if not isinstance(e, ImportError) else str(e)
            raise GraphoptError(f"cannot import plugin {name!r} ({why.splitlines()[0] if why else type(e).__name__})"
                                ) from None


def _use_example(args: argparse.Namespace) -> None:
    """``--example``: the bundled digits CNN is the input model (for ``verify``, the first of the
    two), and ``quantize``/``compress`` calibrate on its bundled images unless given data."""
    if not hasattr(args, "example"):
        return
    key = "a" if args.command == "verify" else "model"
    if args.example:
        if args.command == "verify":
            if args.b is not None:
                raise GraphoptError("verify --example takes one model to compare with the bundled one, not two")
            args.a, args.b = str(example_model_path()), args.a
        elif getattr(args, key) is not None:
            raise GraphoptError("give either an input model or --example, not both")
        else:
            setattr(args, key, str(example_model_path()))
        if args.command in ("quantize", "compress") and not (args.calibration or args.inputs):
            from graphopt.data import example_calibration_path

            args.calibration = str(example_calibration_path())
            log.info("calibrating on the example's bundled images (%s)", args.calibration)
    if getattr(args, key) is None or (args.command == "verify" and args.b is None):
        what = "two models to compare (or --example and one)" if args.command == "verify" else \
            "an input model (or --example for the bundled one)"
        raise GraphoptError(f"give {what}")


def main(argv: Sequence[str] | None = None) -> int:
    from graphopt.progress import set_quiet

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    args.quiet = bool(args.quiet or getattr(args, "quiet_sub", False))
    set_quiet(True if args.quiet else None)  # None: GRAPHOPT_QUIET still silences
    progress_log = logging.getLogger("graphopt.progress")
    progress_level = progress_log.level
    if not args.quiet and not args.verbose:  # plain progress lines where stderr is not a terminal
        progress_log.setLevel(logging.INFO)
    args.staged = None
    held = _HeldWarnings("graphopt.dims")  # defaulted-dims warnings: shown on success, an error stays one line
    stdout = sys.stdout
    sys.stdout = _PipeSafe(stdout)  # type: ignore[assignment]  # a reader that stops early (| head) ends quietly
    try:
        _load_plugins([*args.plugins, *getattr(args, "plugins_sub", [])])
        _use_example(args)
        if args.command != "passes":
            _quiet_onnxruntime()
        if getattr(args, "output", None):
            args.staged = _StagedOutput(Path(args.output), [getattr(args, "model", None)])
        report = Path(args.report) if getattr(args, "report", None) else None
        if report is not None:  # .json / .md / .html into an existing directory: checked before any work
            from graphopt.report import check_report_path

            check_report_path(report)
        new_report = report is not None and not report.exists()
        rc = int(args.fn(args))
        if rc == 0 and args.staged is not None:
            try:
                args.staged.commit(check=not getattr(args, "no_check", False))
            except GraphoptError:
                if new_report and report is not None:  # the report of a model that is not written
                    report.unlink(missing_ok=True)
                raise
        held.ok = rc == 0
        return rc
    except NumericalMismatchError as e:
        print(f"graphopt: verification failed: {e}", file=sys.stderr)
        return 1
    except CheckerError as e:
        print(f"graphopt: error: {e} (--no-check goes on anyway)", file=sys.stderr)
        return 2
    except GraphoptError as e:
        print(f"graphopt: error: {_cli_words(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of our output went away: not an error of the command
        return 0
    except ModuleNotFoundError as e:  # an optional extra that is not installed: the command to install it
        from graphopt.errors import EXTRAS, MissingExtraError

        if (e.name or "").split(".")[0] not in EXTRAS:
            raise
        print(f"graphopt: error: {MissingExtraError(e.name or '', f'graphopt {args.command}')}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"graphopt: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except MemoryError as e:  # numpy's allocation errors name the shape
        print(f"graphopt: error: out of memory: {str(e).splitlines()[0] if str(e) else 'allocation failed'}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.staged is not None:
            args.staged.discard()
        held.close()
        sys.stdout.flush()
        sys.stdout = stdout
        set_quiet(None)
        progress_log.setLevel(progress_level)


class _HeldWarnings(logging.Handler):
    """Holds a logger's records until the command ends; :meth:`close` passes them on (once
    each) when ``ok`` was set, so a failing command still prints its one error line alone."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.ok = False
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(name)
        self.propagate = self.logger.propagate
        self.logger.addHandler(self)
        self.logger.propagate = False

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def close(self) -> None:
        self.logger.removeHandler(self)
        self.logger.propagate = self.propagate
        seen: set[str] = set()
        for r in self.records if self.ok else ():
            if r.getMessage() not in seen:
                seen.add(r.getMessage())
                r.msg, r.args = _cli_words(r.getMessage()), None  # the library's argument names as flags
                log.handle(r)
        self.records = []
        super().close()


if __name__ == "__main__":
    sys.exit(main())
