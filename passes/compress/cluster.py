"""Weight clustering (k-means weight sharing) with palettized storage.

Rule: each constant weight of a Conv/Gemm/MatMul with at least ``min_size`` elements is
replaced by its nearest of ``clusters`` centroids found by 1-D k-means (per layer, or per
output channel with ``per_channel=True``). Centroid initialization: ``linear`` (evenly spaced
between min and max), ``kmeans++`` or ``density`` (at quantiles of the weight distribution).

Storage:
  * ``dense``: the weight keeps its float tensor, now with only k distinct values (compresses
    well with any general-purpose compressor);
  * ``palettized`` (default): the file stores the indices and a float codebook, decoded by
    standard ops - ``Cast(indices) -> Gather(codebook)`` (``GatherElements`` per channel) ->
    ``Reshape``. With at most 16 centroids two 4-bit indices share a byte, unpacked with
    ``BitShift``/``Mod`` and ``Concat`` (opset >= 11). Everything in the decoding is constant, so
    ONNX Runtime folds it once at session load: no runtime cost, a 4x (uint8) or 8x (4-bit)
    smaller weight in the file.

Refuses (leaves the layer, listed in ``report["skipped"]``): non-float or small weights, more
centroids than 256. Lossy: measure accuracy with your data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from graphopt import Graph, GraphoptError, Node, Pass, PassContext, Value, register_pass

_STD = ("", "ai.onnx")
_WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1, "ConvTranspose": 1}


def kmeans_1d(values: np.ndarray, k: int, init: str = "kmeans++", iterations: int = 25,
              seed: int = 0) -> np.ndarray:
    """Sorted centroids of 1-D k-means (Lloyd) on ``values`` (fitted on up to 200k samples)."""
    rng = np.random.default_rng(seed)
    v = np.asarray(values, np.float64).ravel()
    if v.size > 200_000:
        v = rng.choice(v, 200_000, replace=False)
    uniq = np.unique(v)
    if uniq.size <= k:
        return uniq
    if init == "linear":
        c = np.linspace(v.min(), v.max(), k)
    elif init == "density":
        c = np.quantile(v, (np.arange(k) + 0.5) / k)
    elif init == "kmeans++":
        c = [v[rng.integers(v.size)]]
        d2 = (v - c[0]) ** 2
        for _ in range(1, k):
            p = d2 / d2.sum() if d2.sum() > 0 else None
            c.append(v[rng.choice(v.size, p=p)])
            d2 = np.minimum(d2, (v - c[-1]) ** 2)
        c = np.array(c)
    else:
        raise GraphoptError(f"unknown centroid init {init!r}; use linear, kmeans++ or density")
    c = np.sort(c)
    for _ in range(iterations):
        idx = assign(v, c)
        sums = np.bincount(idx, weights=v, minlength=k)
        counts = np.bincount(idx, minlength=k)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        new = np.sort(new)
        if np.allclose(new, c, rtol=0, atol=1e-12):
            break
        c = new
    return c


def stack_books(books: list[np.ndarray]) -> np.ndarray:
    """Per-channel codebooks of different lengths as one [C, K] array (padded with the last
    value, which no index points to)."""
    width = max(len(b) for b in books)
    return np.stack([np.pad(b, (0, width - len(b)), mode="edge") for b in books])


def _palette(arr: np.ndarray, kmax: int) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """``(indices, codebook, per_channel)`` for an exact palette of at most ``kmax`` values -
    one for the tensor, else one per output channel (axis 0) - or None."""
    values, inverse = np.unique(arr, return_inverse=True)
    if len(values) <= kmax:
        return inverse.reshape(arr.shape), values, False
    if arr.ndim < 2:
        return None
    books, idxs = [], []
    for row in arr.reshape(arr.shape[0], -1):
        v, inv = np.unique(row, return_inverse=True)
        if len(v) > kmax:
            return None
        books.append(v)
        idxs.append(inv)
    return np.stack(idxs).reshape(arr.shape), stack_books(books), True


def assign(v: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest (sorted) centroid for every value."""
    mids = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(mids, np.asarray(v, np.float64).ravel()).astype(np.int64)


@register_pass
class WeightClustering(Pass):
    """k-means weight sharing with palettized (uint8 / packed 4-bit) storage."""

    name = "cluster"
    recursive = False
    default_options = {"clusters": 16, "init": "kmeans++", "per_channel": False, "storage": "palettized",
                       "min_size": 1024, "op_types": ("Conv", "Gemm", "MatMul"), "exclude_nodes": ()}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        k = self.options["clusters"]
        if not isinstance(k, int) or not 2 <= k <= 256:
            raise GraphoptError(f"clusters must be an integer in [2, 256], got {k!r}")
        if self.options["storage"] not in ("palettized", "dense"):
            raise GraphoptError("storage must be 'palettized' or 'dense'")
        self.report: dict[str, Any] = {}

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        opset = (self.model.opset("") if self.model is not None else 0) or 0
        k = self.options["clusters"]
        pack4 = k <= 16 and self.options["storage"] == "palettized" and opset >= 11
        done: dict[str, int] = {}
        skipped: dict[str, str] = {}
        seen: dict[int, Value] = {}
        bytes_before = bytes_after = 0
        from graphopt.progress import progress

        for n in progress(list(graph), desc="cluster (k-means per weight)", unit="node"):
            if n.op_type not in self.options["op_types"] or n.domain not in _STD or n.name in self.options["exclude_nodes"]:
                continue
            wi = _WEIGHT_INPUT.get(n.op_type)
            w = n.input(wi) if wi is not None else None
            arr = w.const_value() if w is not None else None
            label = n.name or n.op_type
            if arr is None or arr.dtype != np.float32:
                skipped[label] = "weight is not a float constant"
                continue
            if arr.size < self.options["min_size"]:
                skipped[label] = f"weight has {arr.size} elements (< min_size {self.options['min_size']})"
                continue
            if id(w) in seen:
                n.set_input(wi, seen[id(w)])
                continue
            per_channel = self.options["per_channel"] and arr.ndim >= 2
            if per_channel:
                rows = arr.reshape(arr.shape[0], -1)
                books = [kmeans_1d(r, k, self.options["init"]) for r in rows]
                book = stack_books(books)
                idx = np.stack([assign(r, b) for r, b in zip(rows, books, strict=True)]).reshape(arr.shape)
            else:
                book = kmeans_1d(arr, k, self.options["init"])
                idx = assign(arr, book).reshape(arr.shape)
            bytes_before += arr.nbytes
            if self.options["storage"] == "dense":
                vals = (np.take_along_axis(book, idx.reshape(arr.shape[0], -1), axis=1).reshape(arr.shape)
                        if per_channel else book[idx])
                new = graph.add_initializer(w.name + "_clustered", vals.astype(np.float32))
                bytes_after += arr.nbytes
            else:
                new = self._palettized(graph, n, w.name, idx, book.astype(np.float32), per_channel, pack4)
                bytes_after += (idx.size + 1) // 2 if pack4 else idx.size
                bytes_after += book.astype(np.float32).nbytes
            new.dtype, new.shape = onnx.TensorProto.FLOAT, tuple(arr.shape)
            n.set_input(wi, new)
            seen[id(w)] = new
            done[label] = int(book.shape[-1])
        self.report = {"clustered": done, "skipped": skipped, "weight_bytes_before": bytes_before,
                       "weight_bytes_after": bytes_after, "index_bits": 4 if pack4 else 8,
                       "storage": self.options["storage"]}
        return bool(done)

    @staticmethod
    def _palettized(graph: Graph, n: Node, base: str, idx: np.ndarray, book: np.ndarray, per_channel: bool,
                    pack4: bool) -> Value:
        shape = idx.shape
        flat = idx.reshape(shape[0], -1) if per_channel else idx.reshape(-1)

        def node(op: str, ins: list[Any], attrs: dict[str, Any] | None = None) -> Value:
            nd = graph.make_node(op, ins, attrs, before=n, name=graph.fresh_name(f"{base}_{op}"))
            return nd.output(0)

        if pack4:
            u = flat.astype(np.uint8)
            last = u.shape[-1]
            if last % 2:
                u = np.concatenate([u, np.zeros(u.shape[:-1] + (1,), np.uint8)], axis=-1)
            hi, lo = u[..., 0::2], u[..., 1::2]
            packed = graph.add_initializer(base + "_idx4", (hi << 4 | lo).astype(np.uint8))
            four = graph.add_initializer(base + "_four", np.array(4, np.uint8))
            sixteen = graph.add_initializer(base + "_sixteen", np.array(16, np.uint8))
            high = node("BitShift", [packed, four], {"direction": "RIGHT"})
            low = node("Mod", [packed, sixteen])
            # (..., n) -> (..., n, 1) by Reshape, which reads the same at every opset (Unsqueeze moved
            # its axes from an attribute to an input at opset 13)
            col = graph.add_initializer(base + "_col", np.array(list(hi.shape) + [1], np.int64))
            both = node("Concat", [node("Reshape", [high, col]), node("Reshape", [low, col])], {"axis": -1})
            inter = node("Reshape", [both, graph.add_initializer(base + "_inter",
                                                                  np.array(list(u.shape[:-1]) + [-1], np.int64))])
            if last % 2:
                starts = graph.add_initializer(base + "_s0", np.array([0], np.int64))
                ends = graph.add_initializer(base + "_e0", np.array([last], np.int64))
                axes = graph.add_initializer(base + "_a0", np.array([-1], np.int64))
                inter = node("Slice", [inter, starts, ends, axes])
            indices = node("Cast", [inter], {"to": onnx.TensorProto.INT64})
        else:
            raw = graph.add_initializer(base + "_idx8", flat.astype(np.uint8))
            indices = node("Cast", [raw], {"to": onnx.TensorProto.INT64})
        codebook = graph.add_initializer(base + "_codebook", book)
        if per_channel:
            vals = node("GatherElements", [codebook, indices], {"axis": 1})
        else:
            vals = node("Gather", [codebook, indices], {"axis": 0})
        return node("Reshape", [vals, graph.add_initializer(base + "_shape", np.array(shape, np.int64))])


@register_pass
class Palettize(Pass):
    """Store weight constants with few distinct values as indices + codebook (lossless).

    Rule: a constant read as a weight - input 1 of Conv/Gemm/MatMul, or input 0 of a
    DequantizeLinear (int8/uint8 weights after quantization) - with at most ``max_values``
    distinct values (in the whole tensor, or in every output channel: per-channel int8 scales
    give each channel its own palette) and at least ``min_size`` elements is replaced by the same palettized
    decoding as ``cluster`` uses (4-bit packed indices up to 16 values, uint8 up to 256). The
    values are exactly the original ones. Run after ``cluster`` + ``quantize-static`` so the int8
    weights keep the small palette in the file.
    """

    name = "palettize"
    recursive = False
    default_options = {"max_values": 16, "min_size": 1024}

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        opset = (self.model.opset("") if self.model is not None else 0) or 0
        if opset < 11:
            return False
        done = 0
        seen: dict[int, Value] = {}
        for n in list(graph):
            if n.domain not in _STD:
                continue
            if n.op_type == "DequantizeLinear":
                wi = 0
            elif n.op_type in _WEIGHT_INPUT:
                wi = _WEIGHT_INPUT[n.op_type]
            else:
                continue
            w = n.input(wi)
            if w is None or w.const is None or w.is_graph_input():
                continue
            if id(w) in seen:
                n.set_input(wi, seen[id(w)])
                continue
            arr = w.const_value()
            if arr is None or arr.size < self.options["min_size"] or arr.dtype.kind not in "fiu":
                continue
            pal = _palette(arr, min(self.options["max_values"], 256))
            if pal is None:
                continue
            idx, book, per_channel = pal
            new = WeightClustering._palettized(graph, n, w.name, idx, book.astype(arr.dtype), per_channel,
                                               book.shape[-1] <= 16)
            new.dtype = int(onnx.helper.np_dtype_to_tensor_dtype(arr.dtype))
            new.shape = tuple(arr.shape)
            n.set_input(wi, new)
            seen[id(w)] = new
            done += 1
        self.report = {"palettized": done}
        return done > 0
