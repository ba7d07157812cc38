"""Weight pruning.

* ``mode="magnitude"``: zero the smallest-magnitude weights of Conv/Gemm/MatMul until
  ``sparsity`` of them is zero - over all layers together (``scope="global"``, the default: layers
  that matter less lose more) or layer by layer (``scope="layer"``).
* ``mode="n:m"`` (e.g. ``"2:4"``): in every group of m consecutive weights along the input
  dimension, keep the n largest (the pattern sparse tensor cores and some CPUs accelerate).

Zeros alone neither shrink the file nor speed up ONNX Runtime's dense kernels. Compose with
``cluster`` (zero becomes one centroid of the palette) or ``quantize-static`` for size, or use
structured pruning for speed. Layers below ``min_size`` elements are left and listed. Lossy.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from graphopt import Graph, GraphoptError, Pass, PassContext, register_pass

_STD = ("", "ai.onnx")


def _nm_mask(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep the n largest |w| in each group of m along ``axis`` (padding the last group)."""
    a = np.moveaxis(np.abs(w), axis, -1)
    k = a.shape[-1]
    pad = (-k) % m
    ap = np.concatenate([a, np.full(a.shape[:-1] + (pad,), -1.0)], axis=-1) if pad else a
    groups = ap.reshape(ap.shape[:-1] + (-1, m))
    order = np.argsort(-groups, axis=-1)
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    keep = keep.reshape(ap.shape)[..., :k]
    return np.moveaxis(keep, -1, axis)


@register_pass
class MagnitudePruning(Pass):
    """Unstructured magnitude pruning (global or per layer) or N:M sparsity of weights."""

    name = "prune"
    recursive = False
    default_options = {"sparsity": 0.5, "mode": "magnitude", "scope": "global", "min_size": 1024,
                       "op_types": ("Conv", "Gemm", "MatMul"), "exclude_nodes": ()}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        s = self.options["sparsity"]
        if not isinstance(s, int | float) or not 0 <= s < 1:
            raise GraphoptError(f"sparsity must be in [0, 1), got {s!r}")
        mode = self.options["mode"]
        if mode != "magnitude" and not re.fullmatch(r"\d+:\d+", str(mode)):
            raise GraphoptError(f"mode must be 'magnitude' or 'N:M' (e.g. '2:4'), got {mode!r}")
        if mode != "magnitude":
            n, m = (int(x) for x in str(mode).split(":"))
            if not 0 < n < m:
                raise GraphoptError(f"N:M needs 0 < N < M, got {mode}")
        if self.options["scope"] not in ("global", "layer"):
            raise GraphoptError("scope must be 'global' or 'layer'")
        self.report: dict[str, Any] = {}

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        layers = []
        skipped: dict[str, str] = {}
        for node in graph:
            if node.op_type not in self.options["op_types"] or node.domain not in _STD:
                continue
            if node.name in self.options["exclude_nodes"]:
                continue
            w = node.input(1)
            arr = w.const_value() if w is not None else None
            if arr is None or arr.dtype.kind != "f":
                skipped[node.name or node.op_type] = "weight is not a float constant"
                continue
            if arr.size < self.options["min_size"]:
                skipped[node.name or node.op_type] = f"weight has {arr.size} elements (< min_size)"
                continue
            layers.append((node, w, arr))
        if not layers:
            self.report = {"pruned": {}, "skipped": skipped}
            return False
        mode = str(self.options["mode"])
        masks = []
        if mode == "magnitude":
            s = self.options["sparsity"]
            if self.options["scope"] == "global":
                allw = np.concatenate([np.abs(a).ravel() for _, _, a in layers])
                thr = np.partition(allw, int(s * allw.size))[int(s * allw.size)] if s > 0 else -1
                masks = [np.abs(a) >= thr for _, _, a in layers]
            else:
                for _, _, a in layers:
                    k = int(s * a.size)
                    thr = np.partition(np.abs(a).ravel(), k)[k] if k > 0 else -1
                    masks.append(np.abs(a) >= thr)
        else:
            n, m = (int(x) for x in mode.split(":"))
            for node, _, a in layers:
                # the reduction (input) dimension: Conv axis 1, MatMul axis 0, Gemm 1 if transB else 0
                axis = 1 if node.op_type == "Conv" else (1 if node.op_type == "Gemm" and node.attr("transB", 0) else 0)
                masks.append(_nm_mask(a, n, m, axis))
        done = {}
        seen: dict[int, Any] = {}
        for (node, w, a), mask in zip(layers, masks, strict=True):
            if id(w) in seen:
                node.set_input(1, seen[id(w)])
                continue
            pruned = np.where(mask, a, 0).astype(a.dtype)
            nv = graph.add_initializer(w.name + "_pruned", pruned)
            node.set_input(1, nv)
            seen[id(w)] = nv
            done[node.name or node.op_type] = round(float(1 - mask.mean()), 4)
        total = sum(a.size for _, _, a in layers)
        zeros = sum(int((~mk).sum()) for mk in masks)
        self.report = {"pruned": done, "skipped": skipped, "sparsity": zeros / total if total else 0.0, "mode": mode}
        return True
