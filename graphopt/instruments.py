"""Instruments: checks and measurements that run around every pass.

* :class:`TimingInstrument` - wall time per pass.
* :class:`VerifyInstrument` - IR invariants (and optionally ``onnx.checker``) after each pass;
  a pass that breaks the IR is named in the error.
* :class:`NumericCheckInstrument` - runs the model under ONNX Runtime after each pass that
  changed it and compares with the original outputs; raises naming the first pass whose
  outputs moved beyond tolerance (or only records errors with ``raise_on_mismatch=False``).
* :class:`SnapshotInstrument` - saves the model after each changing pass (to a directory, or
  keeps protos in memory).
* :class:`StatsInstrument` - nodes, params, bytes and FLOPs after each pass, for the report.
* :func:`bisect` - replays a pipeline keeping snapshots and binary-searches the first pass
  that changed the outputs beyond tolerance (log2(n) runtime evaluations).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.errors import NumericalMismatchError, VerificationError
from graphopt.ir.core import Model, Value
from graphopt.transform import Instrument, Pass, PassContext, PassRecord

log = logging.getLogger(__name__)


class TimingInstrument(Instrument):
    """Accumulates wall time per pass name (also recorded in each :class:`PassRecord`)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, changed: bool, record: PassRecord) -> None:
        self.times[p.name] = self.times.get(p.name, 0.0) + record.seconds


class ProgressInstrument(Instrument):
    """Progress over pass runs through :func:`graphopt.progress.progress`: a bar on a terminal,
    periodic lines otherwise, nothing when quiet or ``disable=True``."""

    def __init__(self, *, disable: bool | None = None, desc: str = "optimizing") -> None:
        self.disable = bool(disable)
        self.desc = desc
        self.bar: Any = None

    def enter(self, model: Model, ctx: PassContext) -> None:
        from graphopt.progress import progress

        self.bar = progress(desc=self.desc, unit="pass", disable=self.disable)

    def before_pass(self, p: Pass, model: Model, ctx: PassContext) -> None:
        if self.bar is not None:
            self.bar.set_postfix(p.name)

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, changed: bool, record: PassRecord) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def exit(self, model: Model, ctx: PassContext) -> None:
        if self.bar is not None:
            self.bar.close()


class VerifyInstrument(Instrument):
    """Verifies IR invariants after each pass; with ``checker=True`` also runs the ONNX checker
    (``full_check`` runs its shape inference too)."""

    def __init__(self, *, checker: bool = False, full_check: bool = False) -> None:
        self.checker = checker
        self.full_check = full_check

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, changed: bool, record: PassRecord) -> None:
        if not changed:
            return
        try:
            model.verify()
        except VerificationError as e:
            raise VerificationError(f"after pass {p.name!r}: {e}") from e
        if self.checker:
            from graphopt.onnx_io import to_proto

            try:
                onnx.checker.check_model(to_proto(model), full_check=self.full_check)
            except onnx.checker.ValidationError as e:
                raise VerificationError(f"after pass {p.name!r}: ONNX checker: {str(e).splitlines()[0]}") from e


class NumericCheckInstrument(Instrument):
    """Compares outputs with the original model under ONNX Runtime after every changing pass.

    Args:
        inputs: feeds to run; several feeds may be given as a list.
        rtol, atol, scale_rtol: tolerance (fp32 noise for lossless passes), as in
            :func:`graphopt.runtime.compare`: elementwise ``atol + rtol*|ref|``, or the worst error
            within ``scale_rtol`` (default ``3*rtol``) of the output's largest magnitude.
        raise_on_mismatch: raise :class:`NumericalMismatchError` naming the pass, or only record.
    """

    def __init__(
        self,
        inputs: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
        *,
        rtol: float = 1e-4,
        atol: float = 1e-5,
        scale_rtol: float | None = None,
        raise_on_mismatch: bool = True,
    ) -> None:
        self.feeds = [dict(inputs)] if isinstance(inputs, Mapping) else [dict(x) for x in inputs]
        self.rtol, self.atol, self.scale_rtol = rtol, atol, scale_rtol
        self.raise_on_mismatch = raise_on_mismatch
        self.reference: list[dict[str, np.ndarray]] = []
        self.errors: dict[str, float] = {}
        self.first_bad: str | None = None

    def enter(self, model: Model, ctx: PassContext) -> None:
        from graphopt.runtime import ort_session, run_ort

        sess = ort_session(model)
        self.reference = [run_ort(model, f, session=sess) for f in self.feeds]

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, changed: bool, record: PassRecord) -> None:
        if not changed:
            record.max_abs_error = self.errors.get("_last", 0.0)
            return
        from graphopt.runtime import compare, ort_session, run_ort

        try:
            sess = ort_session(model)
        except Exception as e:
            raise NumericalMismatchError(f"after pass {p.name!r} ONNX Runtime cannot load the model: {e}") from e
        worst = 0.0
        problems: list[str] = []
        for ref, feed in zip(self.reference, self.feeds, strict=True):
            got = run_ort(model, feed, session=sess)
            c = compare(ref, got, rtol=self.rtol, atol=self.atol, scale_rtol=self.scale_rtol)
            worst = max(worst, c.max_abs)
            problems += c.problems
        record.max_abs_error = worst
        self.errors[p.name] = max(self.errors.get(p.name, 0.0), worst)
        self.errors["_last"] = worst
        if problems:
            if self.first_bad is None:
                self.first_bad = p.name
            msg = f"pass {p.name!r} changed the outputs: {'; '.join(problems[:3])}"
            if self.raise_on_mismatch:
                raise NumericalMismatchError(msg)
            log.warning(msg)


class SnapshotInstrument(Instrument):
    """Keeps the model after each changing pass: ``NN_<pass>.onnx`` files in ``directory``,
    or in memory (``self.snapshots``, list of ``(pass name, ModelProto)``) when no directory."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.snapshots: list[tuple[str, onnx.ModelProto]] = []
        self._k = 0

    def enter(self, model: Model, ctx: PassContext) -> None:
        self._save("input", model)

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, changed: bool, record: PassRecord) -> None:
        if changed:
            self._save(p.name, model)

    def _save(self, name: str, model: Model) -> None:
        from graphopt.onnx_io import save, to_proto

        if self.directory is None:
            self.snapshots.append((name, to_proto(model)))
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            save(model, self.directory / f"{self._k:02d}_{name}.onnx")
        self._k += 1


def _all_values(model: Model) -> Iterator[Value]:
    for g in model.all_graphs():
        yield from g.inputs
        yield from g.initializers.values()
        for n in g.iter_nodes():
            yield from n.outputs


class StatsInstrument(Instrument):
    """Fills nodes, params, bytes and FLOPs of each :class:`PassRecord`. The model is left as
    the passes made it: shapes inferred for the FLOPs are taken off again afterwards.

    Lossless passes never change the shape of a value that survives them, so the types inferred
    at one measurement are put back on the surviving values at the next; graphopt's own rules
    type the new ones, and onnx's whole-model inference runs again only when the compute nodes
    left with outputs not fully known, or what they read, differ from what the last full
    inference left (see :meth:`_open`)."""

    def __init__(self, input_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        self.input_shapes = dict(input_shapes or {})
        self.initial: PassRecord | None = None
        self._last: tuple[int, int, int, int] | None = None
        self._types: dict[int, tuple[Value, Any, Any]] = {}  # id -> (value, dtype, shape) last inferred
        self._unknown: frozenset = frozenset()  # what the last full inference left open (see _open)

    def _measure(self, model: Model) -> tuple[int, int, int, int]:
        """Stats of ``model`` as it stands. Shapes are inferred on the model itself and every
        value's type is put back afterwards (copying a model with 50 MB of weights after every
        pass cost more than the passes); the size is the serialized size with large initializers
        counted by their payload instead of serializing them."""
        from graphopt.analysis import infer_shapes, model_stats
        from graphopt.analysis.shapes import propagate_shapes
        from graphopt.onnx_io import to_proto
        from graphopt.runtime import resolve_input_shapes

        values = list(_all_values(model))
        saved = [(v, v.dtype, v.shape, v.type_proto, v._type_sig) for v in values]
        try:
            for v in values:
                known = self._types.get(id(v))
                if known is not None and known[0] is v:
                    v.dtype, v.shape = known[1], known[2]
            propagate_shapes(model)
            if not self._types or self._open(model) != self._unknown:
                try:
                    shapes = resolve_input_shapes(model, self.input_shapes)
                except Exception:  # noqa: BLE001 - stats are best effort when inputs are unusual
                    shapes = None
                infer_shapes(model, shapes)
                self._unknown = self._open(model)
            self._types = {id(v): (v, v.dtype, v.shape) for v in values if v.dtype is not None or v.shape is not None}
            st = model_stats(model)
        finally:
            for v, dt, shp, tp, sig in saved:
                v.dtype, v.shape, v.type_proto, v._type_sig = dt, shp, tp, sig
        stub = 4096
        size = to_proto(model, keep_external=True, _stub_over=stub).ByteSize()
        for g in model.all_graphs():
            for v in g.initializers.values():
                if v.const is not None and v.const.size > stub:
                    n = v.const.nbytes  # the raw_data field: tag, length varint, payload
                    size += 1 + (n.bit_length() + 6) // 7 + n
        return st.compute_nodes, st.params, size, st.flops

    @staticmethod
    def _open(model: Model) -> frozenset:
        """The compute nodes with an output not fully known, each with what it reads (identity
        and type of its inputs): when this is what the last full inference left, nothing it
        could build on has changed, so running it again would learn nothing."""
        from graphopt.analysis.cost import is_constant_producer

        return frozenset(
            (id(n), tuple((id(v), v.dtype, v.shape) for v in n.inputs if v is not None))
            for g in model.all_graphs() for n in g.iter_nodes() if not is_constant_producer(n)
            and any(o.name and (o.dtype is None or o.shape is None
                                or not all(type(d) is int and d >= 0 for d in o.shape)) for o in n.outputs))

    def enter(self, model: Model, ctx: PassContext) -> None:
        self._last = self._measure(model)
        self.initial = PassRecord("(input)", False, 0.0, *self._last)

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, changed: bool, record: PassRecord) -> None:
        if changed or self._last is None:
            self._last = self._measure(model)
        record.nodes, record.params, record.bytes, record.flops = self._last

    def exit(self, model: Model, ctx: PassContext) -> None:
        # the result's FLOPs from a fresh inference, as the input's were (rows in between reuse
        # earlier inferences, which can know a few more or fewer dims than a fresh one)
        if ctx.records and self._last is not None:
            self._types, self._unknown = {}, frozenset()
            self._last = self._measure(model)
            last = ctx.records[-1]
            last.nodes, last.params, last.bytes, last.flops = self._last


@dataclass
class BisectResult:
    """Outcome of :func:`bisect`: the first pass whose output broke tolerance, if any."""

    culprit: str | None
    index: int | None
    max_abs_error: float
    evaluations: int
    passes: list[str]


def bisect(
    model: Model,
    passes: Pass | Sequence[Pass | str],
    inputs: Mapping[str, np.ndarray],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    scale_rtol: float | None = None,
) -> BisectResult:
    """Find the first pass that moved the outputs beyond tolerance (as judged by
    :func:`graphopt.runtime.compare` with ``rtol``, ``atol``, ``scale_rtol``).

    The pipeline is applied to a copy of ``model`` while keeping a snapshot after each changing
    pass; snapshots are then evaluated by binary search, so only about log2(n) ONNX Runtime runs
    are needed. Assumes, as any bisection does, that once the outputs are off they stay off.
    """
    from graphopt.runtime import compare, run_ort
    from graphopt.transform import run_passes

    work = model.copy()
    snap = SnapshotInstrument()
    ctx = PassContext(instruments=[snap])
    run_passes(work, passes, ctx)
    ref = run_ort(model, inputs)
    names = [n for n, _ in snap.snapshots[1:]]
    protos = [p for _, p in snap.snapshots[1:]]
    evals = 0
    cache: dict[int, tuple[bool, float]] = {}

    def bad(k: int) -> tuple[bool, float]:
        nonlocal evals
        if k not in cache:
            evals += 1
            c = compare(ref, run_ort(protos[k], inputs), rtol=rtol, atol=atol, scale_rtol=scale_rtol)
            cache[k] = (not c.ok, c.max_abs)
        return cache[k]

    if not protos or not bad(len(protos) - 1)[0]:
        err = bad(len(protos) - 1)[1] if protos else 0.0
        return BisectResult(None, None, err, evals, names)
    lo, hi = 0, len(protos) - 1  # invariant: hi is bad
    while lo < hi:
        mid = (lo + hi) // 2
        if bad(mid)[0]:
            hi = mid
        else:
            lo = mid + 1
    return BisectResult(names[hi], hi, bad(hi)[1], evals, names)


__all__ = [
    "BisectResult", "NumericCheckInstrument", "ProgressInstrument", "SnapshotInstrument", "StatsInstrument",
    "TimingInstrument", "VerifyInstrument", "bisect",
]
