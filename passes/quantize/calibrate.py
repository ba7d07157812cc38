"""Calibration: observe activation ranges on calibration data and choose quantization ranges.

* ``minmax``: the observed minimum and maximum.
* ``percentile``: clip to the given percentile of |x| (default 99.99), from a histogram.
* ``mse``: the clipping range that minimizes the expected squared quantization error
  (rounding noise inside the range, clipping error outside), searched over the histogram.

Histogram methods take two passes over the data: the first finds the range, the second fills a
fixed-range histogram (2048 bins).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

METHODS = ("minmax", "percentile", "mse")
BINS = 2048


class RangeObserver:
    """Running min/max and (second pass) a histogram of each observed tensor."""

    def __init__(self) -> None:
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}
        self.hist: dict[str, np.ndarray] = {}

    def observe(self, name: str, arr: np.ndarray) -> None:
        a = np.asarray(arr, dtype=np.float64)
        if a.size == 0:
            return
        lo, hi = float(a.min()), float(a.max())
        self.lo[name] = min(lo, self.lo.get(name, lo))
        self.hi[name] = max(hi, self.hi.get(name, hi))

    def observe_hist(self, name: str, arr: np.ndarray) -> None:
        lo, hi = self.lo[name], self.hi[name]
        if hi <= lo:
            return
        h, _ = np.histogram(np.asarray(arr, dtype=np.float64), bins=BINS, range=(lo, hi))
        self.hist[name] = self.hist.get(name, 0) + h

    def range(self, name: str, method: str, percentile: float = 99.99) -> tuple[float, float]:
        lo, hi = self.lo[name], self.hi[name]
        if method == "minmax" or name not in self.hist:
            return lo, hi
        h = self.hist[name].astype(np.float64)
        edges = np.linspace(lo, hi, BINS + 1)
        centers = (edges[:-1] + edges[1:]) / 2
        if method == "percentile":
            cdf = np.cumsum(h) / h.sum()
            q = (100.0 - percentile) / 100.0 / 2
            i_lo = int(np.searchsorted(cdf, q))
            i_hi = int(np.searchsorted(cdf, 1 - q))
            return float(min(edges[i_lo], 0.0)), float(max(edges[min(i_hi + 1, BINS)], 0.0))
        if method == "mse":
            return _mse_range(h, centers, lo, hi)
        raise ValueError(f"unknown calibration method {method!r}; choose from {METHODS}")


def _mse_range(h: np.ndarray, centers: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """Shrink [lo, hi] towards 0 in 64 steps; keep the range with least expected error."""
    best, best_range = np.inf, (lo, hi)
    total = h.sum()
    for f in np.linspace(1.0, 0.2, 64):
        a, b = min(lo * f, 0.0), max(hi * f, 0.0)
        scale = (b - a) / 255 if b > a else 1.0
        inside = (centers >= a) & (centers <= b)
        err = (scale ** 2 / 12) * h[inside].sum()
        err += (h[centers < a] * (centers[centers < a] - a) ** 2).sum()
        err += (h[centers > b] * (centers[centers > b] - b) ** 2).sum()
        err /= total
        if err < best:
            best, best_range = err, (a, b)
    return best_range


def uint8_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """Asymmetric uint8 scale and zero point covering [lo, hi] (which always includes 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zp = int(np.clip(round(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zp)


def int8_weight(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of a weight, per channel along ``axis`` or per tensor."""
    w = np.asarray(w, dtype=np.float64)
    if axis is None:
        amax = np.abs(w).max()
        scale = np.array(amax / 127.0 if amax > 0 else 1.0, dtype=np.float32)
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        return q, scale
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=red)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def collect(names: list[str], batches: Iterable[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """Group arrays by name (helper for tests)."""
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for b in batches:
        for n in names:
            out[n].append(b[n])
    return out
