"""Running models and comparing numbers.

* :func:`run_ort` runs an IR model (or proto, or file) under ONNX Runtime.
* :func:`make_inputs` generates inputs for any signature; symbolic dims are resolved from
  user hints (``--input-shape name:1,3,224,224``) or default to 1.
* :func:`compare` measures max abs/rel error, cosine similarity and top-1 agreement.
* :func:`load_calibration` reads calibration samples from a ``.npz`` (one array per input,
  first axis = samples), a directory of ``.npz`` files (one sample each), or any iterable of
  ``{name: array}`` dicts, and validates them against the model's inputs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.errors import GraphoptError, InputSpecError, RuntimeBackendError
from graphopt.ir.core import Model, Value
from graphopt.ir.tensor import dtype_name, np_dtype

log = logging.getLogger(__name__)
#: warnings about dims no hint fixed (the CLI holds them back until a command succeeds, so an
#: error stays one line)
dims_log = logging.getLogger("graphopt.dims")


def model_inputs(model: Model) -> list[Value]:
    """Inputs a caller must (or may) feed: graph inputs without an initializer default."""
    return [v for v in model.graph.inputs if v.const is None]


def parse_input_shapes(specs: Iterable[str] | None) -> dict[str, list[int]]:
    """Parse ``name:1,3,224,224`` strings (the CLI's ``--input-shape``) into a dict."""
    out: dict[str, list[int]] = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition(":")
        if not sep or not name:
            raise InputSpecError(f"bad input shape {spec!r}; expected NAME:D1,D2,... (e.g. input:1,3,224,224)")
        try:
            shape = [int(d) for d in dims.split(",")] if dims.strip() else []
        except ValueError:
            raise InputSpecError(f"bad input shape {spec!r}: dimensions must be integers") from None
        if any(d < 0 for d in shape):
            raise InputSpecError(f"bad input shape {spec!r}: a dimension is negative; give the concrete size "
                                 "to use (e.g. 1 for a batch)")
        out[name] = shape
    return out


#: dim_param names exporters write for "unknown": each such dim stands alone (two '?' dims of a
#: PaddlePaddle export are not the same size), unlike a real symbol such as 'batch'
_ANONYMOUS_DIMS = frozenset({"", "?"})
#: ops that take an empty tensor as a legitimate value (a recurrent cache that starts empty): a
#: declared 0 dim of an input read only by these is a real zero, not an unknown size
_EMPTY_OK_OPS = frozenset({"Concat", "Shape", "Size", "Identity", "ConcatFromSequence"})


def is_dynamic_dim(d: Any) -> bool:
    """Whether a declared dim leaves the size open: a symbol (``'batch'``, also ``''``), a missing
    dim (``None``), or a negative value (PaddlePaddle writes ``-1``). A declared ``0`` is decided
    per input by :func:`dynamic_axes`."""
    return d is None or isinstance(d, str) or (isinstance(d, int) and d < 0)


def _zero_is_dynamic(v: Value) -> bool:
    """A declared 0 dim of input ``v`` means "unknown" unless every reader takes empty tensors."""
    readers = v.consumers()
    return bool(readers) and any(n.op_type not in _EMPTY_OK_OPS for n in readers)


def dynamic_axes(model: Model) -> dict[str, list[int]]:
    """Per model input, the axes whose size the model leaves open (see :func:`is_dynamic_dim`;
    a declared 0 counts where the input must hold data)."""
    out: dict[str, list[int]] = {}
    for v in model_inputs(model):
        if v.shape is None:
            out[v.name] = []
            continue
        zero_dyn = any(d == 0 for d in v.shape) and _zero_is_dynamic(v)
        out[v.name] = [ax for ax, d in enumerate(v.shape) if is_dynamic_dim(d) or (d == 0 and zero_dyn)]
    return out


def _dim_text(d: Any) -> str:
    return "?" if d is None else repr(d) if isinstance(d, str) else str(d)


@dataclass
class DefaultedDim:
    """A dynamic dim no hint or data fixed: which input and axis, what the model declares, the size used."""

    input: str
    axis: int
    declared: Any
    value: int


def _resolve(
    model: Model,
    hints: Mapping[str, Sequence[int]] | None,
    default_dim: int,
    defaults: Mapping[tuple[str, int], int] | None,
) -> tuple[dict[str, tuple[int, ...]], list[DefaultedDim]]:
    hints = dict(hints or {})
    defaults = dict(defaults or {})
    inputs = model_inputs(model)
    names = {v.name for v in inputs}
    unknown = set(hints) - names
    if unknown:
        raise InputSpecError(f"input_shapes names unknown input(s) {sorted(unknown)}; inputs are {sorted(names)}")
    dyn = dynamic_axes(model)
    sym: dict[str, int] = {}
    for v in inputs:
        if v.name in hints and v.shape is not None:
            h = [int(x) for x in hints[v.name]]
            if len(h) != len(v.shape):
                raise InputSpecError(
                    f"input {v.name!r} has rank {len(v.shape)} but input_shapes gives {len(h)} dims"
                )
            for ax, (d, x) in enumerate(zip(v.shape, h, strict=True)):
                if x < 0:
                    raise InputSpecError(f"input_shapes for {v.name!r}: dim {ax} is negative ({x})")
                if ax not in dyn[v.name]:
                    if d != x:
                        raise InputSpecError(f"input {v.name!r} has fixed dim {d} at axis {ax} but input_shapes "
                                             f"gives {x}")
                elif isinstance(d, str) and d not in _ANONYMOUS_DIMS:
                    sym[d] = x
    out: dict[str, tuple[int, ...]] = {}
    defaulted: list[DefaultedDim] = []
    for v in inputs:
        if v.name in hints:
            out[v.name] = tuple(int(x) for x in hints[v.name])
            continue
        if v.shape is None:
            raise InputSpecError(f"input {v.name!r} has unknown rank; give input_shapes={{{v.name!r}: [D1, D2, ...]}} "
                                 "or real samples (data=...)")
        dims: list[int] = []
        for ax, d in enumerate(v.shape):
            if ax not in dyn[v.name]:
                dims.append(int(d))  # type: ignore[arg-type]
                continue
            named = isinstance(d, str) and d not in _ANONYMOUS_DIMS
            if named and d in sym:
                dims.append(sym[d])
                continue
            x = int(defaults.get((v.name, ax), default_dim))
            if named:
                sym[d] = x
            dims.append(x)
            defaulted.append(DefaultedDim(v.name, ax, d, x))
        out[v.name] = tuple(dims)
    return out, defaulted


def resolve_input_shapes(
    model: Model,
    hints: Mapping[str, Sequence[int]] | None = None,
    *,
    default_dim: int = 1,
    defaults: Mapping[tuple[str, int], int] | None = None,
    warn: bool = False,
) -> dict[str, tuple[int, ...]]:
    """A concrete shape for every model input, from its declared shape and the user's hints.

    Dynamic dims (symbols, missing dims, ``-1``, and ``0`` on an input that must hold data; see
    :func:`dynamic_axes`) take the hint's size; hints may not change a fixed dim. A symbolic dim
    named the same in several inputs (e.g. ``batch``) resolves consistently. Dims left open take
    ``defaults[(input, axis)]`` or ``default_dim``; with ``warn`` each input with such dims gets
    one warning naming them and the size used (FLOPs and checks at a guessed size mislead).
    """
    out, defaulted = _resolve(model, hints, default_dim, defaults)
    if warn:
        warn_defaulted(model, defaulted)
    return out


def defaulted_dims(
    model: Model,
    hints: Mapping[str, Sequence[int]] | None = None,
    *,
    default_dim: int = 1,
    defaults: Mapping[tuple[str, int], int] | None = None,
) -> list[DefaultedDim]:
    """The dynamic dims that :func:`resolve_input_shapes` would fill with a default, not a hint."""
    return _resolve(model, hints, default_dim, defaults)[1]


def warn_defaulted(model: Model, defaulted: Sequence[DefaultedDim]) -> None:
    """Log one warning per input with defaulted dims: which dims, what the model declares, the size used."""
    by_input: dict[str, list[DefaultedDim]] = {}
    for d in defaulted:
        by_input.setdefault(d.input, []).append(d)
    shapes = {v.name: v.shape for v in model_inputs(model)}
    for name, dims in by_input.items():
        declared = shapes.get(name) or ()
        used = {d.axis for d in dims}
        example = ",".join("N" if ax in used else str(x) for ax, x in enumerate(declared))
        dims_log.warning(
            "input %r %s: dynamic dim(s) %s set to %s; give input_shapes={%r: [%s]} or real samples (data=...) "
            "for the real sizes",
            name, "[" + ", ".join(_dim_text(x) for x in declared) + "]",
            ", ".join(f"{d.axis} ({_dim_text(d.declared)})" for d in dims),
            ", ".join(str(d.value) for d in dims), name, example.replace(",", ", "))


def _compared_constants(v: Value) -> list[Any]:
    """Constants an input is tested against with ``Equal`` (e.g. a sample rate: ``sr == 16000``)."""
    found = []
    for n in v.consumers():
        if n.op_type != "Equal":
            continue
        for other in n.inputs:
            if other is not None and other is not v:
                c = other.const_value()
                if c is not None and c.size >= 1:
                    found.append(np.ravel(c)[0])
    return found


#: Random inputs larger than this are refused with the input's name (a huge declared dim).
_MAX_RANDOM_INPUT_BYTES = 4 << 30


def make_inputs(
    model: Model,
    shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    seed: int = 0,
    defaults: Mapping[tuple[str, int], int] | None = None,
    warn: bool = False,
) -> dict[str, np.ndarray]:
    """Random inputs for every model input (floats ~ N(0,1); ints in [0, 4); bools random).

    An integer input the model compares with ``Equal`` against a constant (a sample-rate switch
    ``sr == 16000``) gets that constant, so the branch the model is built for runs. Dims are
    resolved as :func:`resolve_input_shapes` does (``defaults``, ``warn``)."""
    rng = np.random.default_rng(seed)
    resolved = resolve_input_shapes(model, shapes, defaults=defaults, warn=warn)
    out: dict[str, np.ndarray] = {}
    for v in model_inputs(model):
        shp = resolved[v.name]
        if v.type_proto is not None and not v.type_proto.HasField("tensor_type"):
            raise InputSpecError(f"input {v.name!r} is not a tensor (sequence/map); give inputs explicitly")
        if v.dtype is None:
            raise InputSpecError(f"input {v.name!r} has no element type")
        dt = np_dtype(v.dtype)
        nbytes = int(np.prod([int(d) for d in shp], dtype=object)) * dt.itemsize
        if nbytes > _MAX_RANDOM_INPUT_BYTES:  # a huge declared dim: say which, before numpy fails to allocate
            raise InputSpecError(f"input {v.name!r} of shape {list(shp)} would take {nbytes / 2**30:.3g} GiB of random "
                                 f"data; give input_shapes={{{v.name!r}: [D1, D2, ...]}} or real samples (data=...)")
        arr = random_array(shp, dt, rng)
        if dt.kind in "iu":
            wanted = _compared_constants(v)
            if wanted:
                arr = np.full(shp, wanted[0], dtype=dt)
        out[v.name] = arr
    return out


def random_array(shape: Sequence[int], dtype: Any, rng: np.random.Generator) -> np.ndarray:
    """A random input array: floats ~ N(0,1); ints in [0, 4); bools random; strings "a"."""
    dt = np.dtype(dtype)
    shape = tuple(shape)
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    if dt.kind in "iu":
        return rng.integers(0, 4, size=shape).astype(dt)
    if dt.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dt.kind in "OSU":
        return np.full(shape, "a", dtype=object)
    return np.zeros(shape, dtype=dt)


def _as_proto(model: Model | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    from graphopt.onnx_io import to_proto

    return to_proto(model)


def ort_session(
    model: Model | onnx.ModelProto | str | os.PathLike[str],
    *,
    optimize: bool = False,
    threads: int | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    arena: bool = True,
) -> Any:
    """An ``onnxruntime.InferenceSession``. ``optimize=False`` disables ORT's graph optimizations,
    so numbers reflect the model as written (what graphopt's checks want).

    ``arena=False`` turns off ORT's CPU memory arena and memory-pattern planning: buffers go
    back to the system after each run instead of staying reserved for the session's lifetime.
    Sessions that return every intermediate tensor (calibration: no buffer can be reused, so
    the arena grows to the sum of all activations, hundreds of MB for a detector at 960x960)
    want it off; it does not change any computed value."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not arena:
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 4  # ORT's own error lines duplicate the exception graphopt reports in one line
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    try:
        if isinstance(model, str | os.PathLike):
            sess = ort.InferenceSession(str(model), so, providers=list(providers))
            if not any(d == 0 for i in sess.get_inputs() for d in (i.shape or ())):
                return sess
            from graphopt.onnx_io import load

            model = load(model, check=False)  # a declared 0 dim that means "any size": see below
        mp = _as_proto(model)
        if isinstance(model, onnx.ModelProto) and any(
                d.HasField("dim_value") and d.dim_value == 0 for i in mp.graph.input for d in i.type.tensor_type.shape.dim):
            from graphopt.onnx_io import from_proto

            model = from_proto(mp, check=False)
        if isinstance(model, Model):
            mp = _open_zero_dims(model, mp)
        if mp.ByteSize() > 1_900_000_000:
            with tempfile.TemporaryDirectory() as d:
                from graphopt.onnx_io import from_proto, save

                p = Path(d) / "m.onnx"
                save(model if isinstance(model, Model) else from_proto(mp, check=False), p, external_data=True)
                return ort.InferenceSession(str(p), so, providers=list(providers))
        return ort.InferenceSession(mp.SerializeToString(), so, providers=list(providers))
    except GraphoptError:
        raise
    except Exception as e:  # noqa: BLE001 - ORT raises many exception types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeBackendError(f"ONNX Runtime cannot load the model: {msg[:400]}") from None


def _open_zero_dims(model: Model, mp: onnx.ModelProto) -> onnx.ModelProto:
    """``mp`` with every declared 0 dim that :func:`dynamic_axes` reads as "unknown" written as a
    symbol: ONNX Runtime takes a declared 0 literally and refuses any other size."""
    dyn = dynamic_axes(model)
    fix = {(v.name, ax) for v in model_inputs(model) if v.shape is not None
           for ax in dyn[v.name] if v.shape[ax] == 0}
    if not fix:
        return mp
    out = onnx.ModelProto()
    out.CopyFrom(mp)
    for i in out.graph.input:
        for ax, d in enumerate(i.type.tensor_type.shape.dim):
            if (i.name, ax) in fix:
                d.dim_param = f"{i.name}_dim{ax}"
    return out


def run_ort(
    model: Model | onnx.ModelProto | str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray],
    *,
    optimize: bool = False,
    session: Any = None,
) -> dict[str, np.ndarray]:
    """Run under ONNX Runtime (CPU) and return ``{output name: array}``."""
    sess = session or ort_session(model, optimize=optimize)
    names = [o.name for o in sess.get_outputs()]
    feed_names = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in inputs.items() if k in feed_names}
    try:
        res = sess.run(names, feed)
    except Exception as e:  # noqa: BLE001
        raise RuntimeBackendError(f"ONNX Runtime failed to run the model: {_one_line(e)}") from None
    return dict(zip(names, res, strict=True))


def class_like(a: np.ndarray) -> bool:
    """Whether an output's last axis holds class scores, so that its arg-max is a prediction:
    probabilities over that axis (a softmax classifier, or a recognizer's per-step softmax), or
    ``[N, C]`` logits that are not unit-norm rows (those are embeddings). Maps (a detector's
    ``[N, 1, H, W]`` probabilities) and embeddings have no meaningful top-1."""
    if a.ndim == 0 or a.shape[-1] < 2 or not a.size:
        return False
    if np.all(a >= -1e-6) and np.allclose(a.sum(-1), 1.0, atol=1e-3):
        return True
    return a.ndim == 2 and not np.allclose(np.linalg.norm(a, axis=-1), 1.0, atol=1e-3)


@dataclass
class Comparison:
    """Agreement of two sets of outputs. ``ok`` says whether they agree within tolerance."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    cosine: float = 1.0
    top1: float | None = None
    ok: bool = True
    per_output: dict[str, dict[str, float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def compare(
    ref: Mapping[str, Any],
    got: Mapping[str, Any],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    scale_rtol: float | None = None,
) -> Comparison:
    """Compare outputs by name (or by position when the names differ).

    ``ok`` holds when every output matches in shape and dtype (NaNs must match) and, per output,
    either ``|got - ref| <= atol + rtol * |ref|`` everywhere (elementwise), or
    ``max|got - ref| <= scale_rtol * max|ref|`` (judged relative to the output's range).

    Why the second, scale-aware test: in deep float32 models a lossless rewrite (folding a
    BatchNorm into a conv, reordering a sum) changes rounding by about one ulp per layer, and
    that noise grows through the network in proportion to the output's magnitude, not to each
    element's. Elements near zero in an output whose range is ~10 then fail the elementwise test
    although ONNX Runtime's own graph optimizations (ORT_ENABLE_ALL vs ORT_DISABLE_ALL) move the
    same elements by as much (measured on ppocrv5_rec: graphopt 1.3e-4, ORT 2.9e-5, a one-ulp
    nudge of the input 2.2e-5, on a softmax of range 1). A real bug (a BatchNorm folded with the
    wrong epsilon, a wrong scale) moves outputs by ~1e-3 of their range or more and still fails.

    ``scale_rtol=None`` means ``3 * rtol`` (3e-4 at the default rtol), so ``rtol=0, atol=0`` stays
    an exact comparison; pass ``scale_rtol=0`` for the elementwise test alone. top-1 agreement is
    reported for outputs whose last axis looks like class scores.
    """
    if scale_rtol is None:
        scale_rtol = 3 * rtol
    c = Comparison()
    keys_r, keys_g = list(ref), list(got)
    if set(keys_r) == set(keys_g):
        pairs = [(k, k) for k in keys_r]
    elif len(keys_r) == len(keys_g):
        pairs = list(zip(keys_r, keys_g, strict=True))
    else:
        c.ok = False
        c.problems.append(f"output count differs: {len(keys_r)} vs {len(keys_g)}")
        return c
    top1s: list[float] = []
    for kr, kg in pairs:
        a, b = ref[kr], got[kg]
        if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray):
            same = _equal_nested(a, b)
            c.per_output[kr] = {"max_abs": 0.0 if same else float("inf")}
            if not same:
                c.ok = False
                c.problems.append(f"{kr}: non-tensor outputs differ")
            continue
        if a.shape != b.shape:
            c.ok = False
            c.problems.append(f"{kr}: shape {a.shape} vs {b.shape}")
            continue
        if a.dtype != b.dtype:
            c.ok = False
            c.problems.append(f"{kr}: dtype {a.dtype} vs {b.dtype}")
            continue
        if a.dtype.kind in "OSUb" or a.size == 0:
            same = bool(np.array_equal(a, b))
            c.per_output[kr] = {"max_abs": 0.0 if same else float("inf")}
            if not same:
                c.ok = False
                c.problems.append(f"{kr}: values differ")
            continue
        af, bf = np.atleast_1d(a.astype(np.float64)), np.atleast_1d(b.astype(np.float64))
        nan_a, nan_b = np.isnan(af), np.isnan(bf)
        if not np.array_equal(nan_a, nan_b):
            c.ok = False
            c.problems.append(f"{kr}: NaN positions differ")
        mask = ~(nan_a | nan_b)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(af - bf)
            diff[~mask] = 0
            inf_same = np.isinf(af) & (af == bf)
            diff[inf_same] = 0
            max_abs = float(diff.max()) if diff.size else 0.0
            rel = diff / np.maximum(np.abs(af), 1e-12)
            rel[~mask | inf_same] = 0
            max_rel = float(rel.max()) if rel.size else 0.0
            fa, fb = af[mask & ~inf_same].ravel(), bf[mask & ~inf_same].ravel()
            na, nb = np.linalg.norm(fa), np.linalg.norm(fb)
            cos = float(np.dot(fa, fb) / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
            bad = diff > atol + rtol * np.abs(af)
            finite = np.abs(af[mask & np.isfinite(af)])
            scale = float(finite.max()) if finite.size else 0.0
        if bool(bad.any()) and not max_abs <= scale_rtol * scale:
            c.ok = False
            c.problems.append(f"{kr}: max abs error {max_abs:.3g} beyond atol={atol:g}, rtol={rtol:g} "
                              f"and beyond scale_rtol={scale_rtol:g} x max|ref| {scale:.3g}")
        po = {"max_abs": max_abs, "max_rel": max_rel, "cosine": cos}
        if a.dtype.kind == "f" and class_like(a):
            t = float(np.mean(np.argmax(a.reshape(-1, a.shape[-1]), -1) == np.argmax(b.reshape(-1, b.shape[-1]), -1)))
            po["top1"] = t
            top1s.append(t)
        c.per_output[kr] = po
        c.max_abs = max(c.max_abs, max_abs)
        c.max_rel = max(c.max_rel, max_rel)
        c.cosine = min(c.cosine, cos)
    c.top1 = min(top1s) if top1s else None
    return c


def _equal_nested(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_equal_nested(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and np.allclose(a, b, equal_nan=True)
    return bool(a == b)


# ---------------------------------------------------------------------------------------------
# calibration data
# ---------------------------------------------------------------------------------------------
def _samples_from_npz(path: Path, what: str) -> list[dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise InputSpecError(f"cannot read {what} file {str(path)!r}: {_one_line(e)}") from None
    if not arrays:
        raise InputSpecError(f"{what} file {str(path)!r} holds no arrays")
    # first axis = samples; a 0-d array (a scalar input such as a sample rate) serves every sample
    counts = {k: a.shape[0] for k, a in arrays.items() if a.ndim}
    n = set(counts.values())
    if len(n) > 1:
        raise InputSpecError(f"{what} arrays in {str(path)!r} have different sample counts (first axis): {counts}")
    total = n.pop() if n else 1
    return [{k: (a[i] if a.ndim else a) for k, a in arrays.items()} for i in range(total)]


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:400]


def load_calibration(
    source: str | os.PathLike[str] | Iterable[Mapping[str, np.ndarray]],
    model: Model | None = None,
    *,
    batch_axis: bool = True,
    check_finite: bool = True,
    what: str = "calibration",
) -> list[dict[str, np.ndarray]]:
    """Calibration (or any input) samples as a list of ``{input name: array}`` feeds.

    ``source`` is a ``.npz`` file (one array per input, first axis = samples; a 0-d array, e.g.
    a scalar sample rate, serves every sample), a directory of ``.npz`` files (each one sample,
    arrays shaped like the input), or an iterable of dicts. With ``model`` given, names, ranks,
    fixed dims and dtypes are checked against its inputs (dynamic dims, ``-1`` included, take
    any size) and each sample gets a leading batch axis of 1 where the input expects one
    (``batch_axis=True``). Empty data, unknown names, NaN or Inf raise :class:`InputSpecError`;
    its one-line message starts with ``what`` (e.g. ``--inputs``) so the user knows which data.
    """
    samples: list[dict[str, np.ndarray]]
    if isinstance(source, str | os.PathLike):
        p = Path(source)
        if not p.exists() and p.suffix != ".npz" and p.with_name(p.name + ".npz").is_file():
            p = p.with_name(p.name + ".npz")  # as numpy.savez names what it writes
        if p.is_dir():
            files = sorted(p.glob("*.npz"))
            if not files:
                raise InputSpecError(f"{what} directory {str(p)!r} has no .npz files")
            samples = []
            for f in files:
                try:
                    with np.load(f, allow_pickle=False) as z:
                        samples.append({k: z[k] for k in z.files})
                except Exception as e:  # noqa: BLE001
                    raise InputSpecError(f"cannot read {what} file {str(f)!r}: {_one_line(e)}") from None
            batch_axis_given = False
        elif p.is_file():
            samples = _samples_from_npz(p, what)
            batch_axis_given = True
        else:
            raise InputSpecError(f"{what} data {str(p)!r} does not exist")
    else:
        samples = [dict(s) for s in source]
        batch_axis_given = False
    if not samples:
        raise InputSpecError(f"{what} data is empty")
    if model is None:
        return samples
    inputs = {v.name: v for v in model_inputs(model)}
    dyn = dynamic_axes(model)
    out = []
    for k, s in enumerate(samples):
        missing = set(inputs) - set(s)
        extra = set(s) - set(inputs)
        if missing or extra:
            raise InputSpecError(
                f"{what} sample {k}: names do not match the model inputs "
                f"(missing {sorted(missing)}, unknown {sorted(extra)}; the model's inputs are {sorted(inputs)})"
            )
        feed = {}
        for name, arr in s.items():
            v = inputs[name]
            arr = np.asarray(arr)
            want = np_dtype(v.dtype) if v.dtype else arr.dtype
            if arr.dtype != want:
                if arr.dtype.kind == want.kind or (arr.dtype.kind in "iu" and want.kind in "iu"):
                    arr = arr.astype(want)
                else:
                    raise InputSpecError(
                        f"{what} sample {k}, input {name!r}: dtype {arr.dtype} but the model expects "
                        f"{dtype_name(v.dtype)}"
                    )
            if v.shape is not None:
                if batch_axis and batch_axis_given and arr.ndim == len(v.shape) - 1 or not batch_axis_given and arr.ndim == len(v.shape) - 1:
                    arr = arr[None]
                if arr.ndim != len(v.shape):
                    raise InputSpecError(
                        f"{what} sample {k}, input {name!r}: rank {arr.ndim} (shape {list(arr.shape)}) but the "
                        f"model expects rank {len(v.shape)} [{', '.join(_dim_text(d) for d in v.shape)}]"
                    )
                for ax, (d, x) in enumerate(zip(v.shape, arr.shape, strict=True)):
                    if ax not in dyn[name] and d != x:
                        raise InputSpecError(
                            f"{what} sample {k}, input {name!r}: dim {ax} is {x} but the model fixes it to {d}"
                        )
            if check_finite and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise InputSpecError(f"{what} sample {k}, input {name!r} contains NaN or Inf")
            feed[name] = arr
        out.append(feed)
    return out


def _dims_to_try(defaulted: Sequence[DefaultedDim]) -> list[dict[tuple[str, int], int]]:
    """Larger sizes to try for defaulted dims when the model fails at size 1: every non-batch
    dim together, then one input's dims at a time (a state input's batch axis must stay 1)."""
    grow = [d for d in defaulted if not (d.axis == 0 or (isinstance(d.declared, str) and "batch" in d.declared.lower()))]
    if not grow:
        return []
    groups = [grow] + ([[d for d in grow if d.input == name] for name in dict.fromkeys(d.input for d in grow)]
                       if len({d.input for d in grow}) > 1 else [])
    return [{(d.input, d.axis): size for d in g} for g in groups for size in (32, 64, 256, 512, 1024)]


def input_feeds(
    model: Model,
    *,
    hints: Mapping[str, Sequence[int]] | None = None,
    data: str | os.PathLike[str] | Iterable[Mapping[str, np.ndarray]] | None = None,
    count: int | None = None,
    seed: int = 0,
    check: bool = True,
    what: str = "data",
) -> list[dict[str, np.ndarray]]:
    """Feeds for checking a model: the user's samples, or random ones that the model runs on.

    With ``data`` (a ``.npz``, a directory of ``.npz`` or an iterable of dicts), its samples
    (the first ``count``), validated by :func:`load_calibration`. Otherwise ``count`` (default
    1) random feeds from :func:`make_inputs` with ``hints``; dims left open are named in a
    warning. With ``check``, the model is run once under ONNX Runtime on the first feed; when
    it fails and dims were defaulted, larger sizes are tried for them (a 1-sample audio window
    or a 1x1 image is too small for many models). If it still fails, :class:`InputSpecError`
    says to pass real data with ``--inputs`` (random values cannot satisfy every model).
    """
    if data is not None:
        feeds = load_calibration(data, model, what=what)
        feeds = feeds[:count] if count else feeds
        if check:
            try:
                run_ort(model, feeds[0])
            except RuntimeBackendError as e:
                raise InputSpecError(f"{what} sample 0: {e}") from None
        return feeds
    n = count or 1
    defaulted = defaulted_dims(model, hints)
    feeds = [make_inputs(model, hints, seed=seed + k) for k in range(n)]
    if check:
        sess = ort_session(model)
        first_error = _try_run(sess, feeds[0])
        if first_error is not None:
            for defaults in _dims_to_try(defaulted):
                trial = make_inputs(model, hints, seed=seed, defaults=defaults)
                if _try_run(sess, trial) is None:
                    log.info("model runs with defaulted dims set to %s", defaults)
                    defaulted = defaulted_dims(model, hints, defaults=defaults)
                    feeds = [trial] + [make_inputs(model, hints, seed=seed + k, defaults=defaults) for k in range(1, n)]
                    first_error = None
                    break
        if first_error is not None:
            hint = (" or input_shapes with the real sizes of its dynamic dims" if defaulted else "")
            raise InputSpecError(f"ONNX Runtime fails on random inputs ({first_error}); pass real samples "
                                 f"(data=...){hint}")
    warn_defaulted(model, defaulted)
    return feeds


def _try_run(sess: Any, feed: Mapping[str, np.ndarray]) -> str | None:
    """None when ``sess`` runs on ``feed``, else the first line of ORT's error."""
    names = {i.name for i in sess.get_inputs()}
    try:
        sess.run(None, {k: v for k, v in feed.items() if k in names})
    except Exception as e:  # noqa: BLE001 - ORT raises many exception types
        return _one_line(e)
    return None


# ---------------------------------------------------------------------------------------------
# evaluating parts of a graph (constant folding)
# ---------------------------------------------------------------------------------------------
def evaluate_nodes(
    model: Model,
    nodes: Sequence[Any],
    known: Mapping[Value, np.ndarray],
) -> tuple[dict[Value, Any], dict[Any, str]]:
    """Evaluate ``nodes`` (in order) given the data of every value they read from outside.

    Runs them as one small model under ONNX Runtime; if ORT refuses (old opsets, unsupported
    ops) falls back to onnx's reference evaluator, and then to evaluating node by node, so one
    failing node does not stop the rest. Returns ``(values, failures)``: the data of every
    output it could compute (sequence outputs as lists) and, per node that failed, the reason.
    """
    from graphopt.onnx_io import _Exporter

    ex = _Exporter(keep_external=False)
    known_by_name = {v.name: (v, a) for v, a in known.items()}

    def build(sub: Sequence[Any], feeds: Mapping[str, tuple[Value, np.ndarray]]) -> onnx.ModelProto:
        g = onnx.GraphProto()
        g.name = "fold"
        produced = {o.name for n in sub for o in n.outputs if o.name}
        needed: set[str] = set()
        for n in sub:
            for v in n.inputs:
                if v is not None and v.name not in produced:
                    needed.add(v.name)
            g.node.append(ex.node(n))
        for name in sorted(needed):
            _, arr = feeds[name]
            from onnx import numpy_helper

            if isinstance(arr, list):
                raise RuntimeBackendError(f"sequence input {name!r} cannot be fed as a constant")
            g.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
        for n in sub:
            for o in n.outputs:
                if o.name:
                    g.output.add().name = o.name
        mp = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid(d, v)
                                                      for d, v in model.opset_imports.items()])
        mp.ir_version = max(model.ir_version, 4)
        for f in model.functions.values():
            mp.functions.append(ex.function(f))
        return mp

    def run(mp: onnx.ModelProto) -> dict[str, Any]:
        names = [o.name for o in mp.graph.output]
        try:
            sess = ort_session(mp)
            return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {}), strict=True))
        except Exception:  # noqa: BLE001 - fall back to the reference implementation
            from onnx.reference import ReferenceEvaluator

            with np.errstate(all="ignore"):
                res = ReferenceEvaluator(mp).run(None, {})
            return dict(zip(names, res, strict=True))

    values: dict[Value, Any] = {}
    failures: dict[Any, str] = {}
    if not nodes:
        return values, failures
    by_name = {o.name: o for n in nodes for o in n.outputs if o.name}
    try:
        out = run(build(nodes, known_by_name))
        for name, arr in out.items():
            values[by_name[name]] = arr
        return values, failures
    except Exception:  # noqa: BLE001 - retry node by node to isolate what fails
        log.debug("batched evaluation failed; evaluating node by node")
    feeds = dict(known_by_name)
    for n in nodes:
        if any(v is not None and v.name not in feeds for v in n.inputs):
            failures[n] = "an input could not be computed"
            continue
        try:
            out = run(build([n], feeds))
        except Exception as e:  # noqa: BLE001
            failures[n] = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            continue
        for name, arr in out.items():
            values[by_name[name]] = arr
            feeds[name] = (by_name[name], arr)
    return values, failures


def intermediate_session(model: Model, names: Sequence[str]) -> tuple[Any, list[str]]:
    """An ORT session of ``model`` that also returns the values ``names``, for calibration and
    per-layer analysis. Returns the session and, in the session's output order, the name each
    output stands for.

    Values inside If/Loop bodies are brought out too: an If gets an extra output (the branch
    that does not compute the value returns an empty tensor, which observers skip), a Loop an
    extra scan output (the value of every iteration, stacked).
    """
    from graphopt.onnx_io import to_proto

    mp = to_proto(model)
    have = {o.name for o in mp.graph.output}
    main = {o for n in mp.graph.node for o in n.output} | {i.name for i in mp.graph.input} | \
        {t.name for t in mp.graph.initializer}
    nested = [n for n in names if n not in main]
    alias: dict[str, str] = {}
    if nested:
        dtypes = {v.name: v.dtype for g in model.graph.all_graphs()
                  for v in list(g.inputs) + [o for n in g.iter_nodes() for o in n.outputs] if v.dtype is not None}
        # fresh names come from the model's own scope (the proto has exactly the model's names)
        alias = {out: want for want, out in _expose(mp.graph, set(nested), dtypes, model.graph.fresh_name).items()}
    visible = main | set(alias)
    for n in list(names) + list(alias):
        if n not in have and n in visible:
            mp.graph.output.add().name = n
            have.add(n)
    sess = ort_session(mp, arena=False)  # every value an output: an arena would keep them all reserved
    return sess, [alias.get(o.name, o.name) for o in sess.get_outputs()]


def _expose(gp: onnx.GraphProto, wanted: set[str], dtypes: Mapping[str, int], fresh: Callable[[str], str]
            ) -> dict[str, str]:
    """Bring values of ``gp``'s nested If/Loop bodies out as outputs of the nodes holding them;
    returns {wanted value: its name in ``gp``}."""
    from onnx import helper

    found: dict[str, str] = {}

    def hits_in(g: onnx.GraphProto) -> dict[str, str]:  # wanted values made in g or in its bodies
        made = {o for n in g.node for o in n.output} | {i.name for i in g.input}
        hits = {w: w for w in wanted - set(found) if w in made}
        hits.update(_expose(g, wanted - set(found) - set(hits), dtypes, fresh))
        return hits

    def add_output(g: onnx.GraphProto, inner: str, name: str, et: int) -> None:
        # through an Identity: a value that is already an output of ``g``, listed twice among
        # the outputs, makes ORT return a freed buffer (garbage) for the node's own output
        out = fresh(name)
        g.node.append(helper.make_node("Identity", [inner], [out]))
        g.output.append(helper.make_tensor_value_info(out, et, None))

    for node in gp.node:
        graphs = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
        if node.op_type == "If" and {"then_branch", "else_branch"} <= set(graphs):
            pairs = [(graphs["then_branch"], graphs["else_branch"]), (graphs["else_branch"], graphs["then_branch"])]
            for branch, other in pairs:
                for w, inner in hits_in(branch).items():
                    et = dtypes.get(w, onnx.TensorProto.FLOAT)
                    add_output(branch, inner, w + "__out", et)
                    empty = fresh(w + "__empty")
                    other.node.append(helper.make_node("Constant", [], [empty], value=helper.make_tensor(
                        empty, et, [0], [])))
                    other.output.append(helper.make_tensor_value_info(empty, et, None))
                    found[w] = fresh(w + "__if")
                    node.output.append(found[w])
        elif node.op_type == "Loop" and "body" in graphs:
            for w, inner in hits_in(graphs["body"]).items():  # a scan output: every iteration's value
                add_output(graphs["body"], inner, w + "__scan", dtypes.get(w, onnx.TensorProto.FLOAT))
                found[w] = fresh(w + "__loop")
                node.output.append(found[w])
    return found


def collect_values(model: Model, names: Sequence[str], samples: Sequence[Mapping[str, np.ndarray]]
                   ) -> dict[str, np.ndarray]:
    """Values ``names`` of the main graph on every sample, concatenated along axis 0 (float64).

    For data-aware passes (pruning recovery, activation-aware low-rank) that need the
    activations a layer sees on calibration data.
    """
    sess, outs = intermediate_session(model, list(names))
    ins = {i.name for i in sess.get_inputs()}
    acc: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for s in samples:
        res = dict(zip(outs, sess.run(None, {k: v for k, v in s.items() if k in ins}), strict=True))
        for k in names:
            acc[k].append(res[k])  # as computed (float32: half of float64) until concatenated
        del res  # the outputs not asked for go before the next sample runs
    out: dict[str, np.ndarray] = {}
    for k in list(acc):  # one value at a time: its parts go as soon as it is concatenated
        parts = acc.pop(k)
        if parts:
            out[k] = np.concatenate(parts, dtype=np.float64, casting="unsafe")
        del parts
    return out


def interleaved_latency(sessions: Mapping[str, Any], feed: Mapping[str, np.ndarray], rounds: int = 30
                        ) -> dict[str, float]:
    """Median latency in ms of each ORT session on ``feed``.

    One warm-up run each, then ``rounds`` rounds that run every session once in turn, so noise
    from a shared machine hits all of them alike: compare the ratios, not the absolute times.
    """
    feeds = {k: {i.name: feed[i.name] for i in s.get_inputs() if i.name in feed} for k, s in sessions.items()}
    return interleaved_timings({k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()}, rounds)


def ort_bound_call(sess: Any, feed: Mapping[str, np.ndarray]) -> Callable[[], Any]:
    """ONNX Runtime's lowest-overhead call on ``feed``, for timing: inputs bound once as
    OrtValues, outputs left to ORT (IO binding). A TVM build timed on tensors converted once is
    timed the same way, so neither side pays numpy conversions in the timed loop (on a 0.1 ms
    Silero VAD these are a fifth of ``sess.run``'s time)."""
    import onnxruntime as ort

    binding = sess.io_binding()
    for k, v in feed.items():
        binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)))
    for o in sess.get_outputs():
        binding.bind_output(o.name)
    try:  # (twice: the second run is the first that checks the outputs bound by the first)
        sess.run_with_iobinding(binding)
        sess.run_with_iobinding(binding)
    except Exception:  # noqa: BLE001 - e.g. an output whose declared rank is wrong ("Invalid rank for
        # output": ddddocr_ocr_int8 declares [1, N], makes [T, 1, N]); sess.run only warns about it
        return lambda: sess.run(None, dict(feed))
    return lambda: sess.run_with_iobinding(binding)


def interleaved_timings(fns: Mapping[str, Callable[[], Any]], rounds: int = 30, settle_s: float = 0.15
                        ) -> dict[str, float]:
    """Median latency in ms of each callable: one warm-up call each, then ``rounds`` rounds that
    call every one in turn (noise on a shared machine hits them alike).

    Each turn first calls the callable, untimed, for ``settle_s`` seconds (at least once).
    Runtimes keep their worker threads spinning for a while after a run (ONNX Runtime and TVM
    both do), and on a machine with few cores those threads steal the next callable's cores:
    measured here, a 0.02 ms TVM model took 16 ms right after an ORT run. The settle time lets
    them park, so every timed call sees the machine as a deployment running only that model.
    It must outlast ORT's spin phase: on Skylake-family CPUs, where ``pause`` takes ~140 cycles,
    that phase lasts tens of milliseconds. With 20 ms of settling, a 4.2 ms ResNet-18 measured
    8.5 ms, and its int8 build 6.8 ms instead of 2.6 ms; 100 ms or more matches each model
    timed alone.
    """
    import statistics

    times = interleaved_round_times(fns, rounds, settle_s)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def interleaved_round_times(fns: Mapping[str, Callable[[], Any]], rounds: int = 30, settle_s: float = 0.15,
                            order: str = "fixed") -> dict[str, list[float]]:
    """The per-round times (seconds) behind :func:`interleaved_timings`: one warm-up call each,
    then ``rounds`` rounds calling every one in turn, each settled ``settle_s`` first. ``order``:
    ``fixed`` (as given), ``rotate`` (start one later every round) or ``alternate`` (reversed
    every other round) - benchmarks use the last two to spread order effects evenly."""
    import time

    from graphopt.progress import progress

    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    with progress(total=rounds, desc=f"timing {', '.join(names)}", unit="round") as bar:
        bar.set_postfix("warm-up")
        for f in fns.values():
            f()
        bar.set_postfix("")
        for r in range(rounds):
            turn = names
            if order == "rotate":
                turn = names[r % len(names):] + names[:r % len(names)]
            elif order == "alternate" and r % 2:
                turn = names[::-1]
            for k in turn:
                f = fns[k]
                t0 = time.perf_counter()
                f()
                while time.perf_counter() - t0 < settle_s:
                    f()
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
            bar.update()
    return times
