"""Calibration: observe activation ranges on calibration data and choose quantization ranges.

* ``minmax``: the observed minimum and maximum.
* ``percentile``: clip to the given percentile of |x| (default 99.99), from a histogram.
* ``mse``: the clipping range that minimizes the expected squared quantization error
  (rounding noise inside the range, clipping error outside), searched over the histogram.
* ``entropy``: the clipping range whose 256-level quantized histogram has the least KL
  divergence from the observed one (outliers folded into the edge bins).

Histogram methods take two passes over the data: the first finds the range, the second fills a
fixed-range histogram (2048 bins).
"""

from __future__ import annotations

import numpy as np

METHODS = ("minmax", "percentile", "mse", "entropy")
BINS = 2048


class RangeObserver:
    """Running min/max and (second pass) a histogram of each observed tensor."""

    def __init__(self) -> None:
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}
        self.hist: dict[str, np.ndarray] = {}
        #: per-channel (axis 1) count, sum and sum of squares of 4-D (NCHW) tensors
        self.moments: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
        self._no_moments: set[str] = set()

    def observe(self, name: str, arr: np.ndarray) -> None:
        a = np.asarray(arr, dtype=np.float64)
        if a.size == 0:
            return
        lo, hi = float(a.min()), float(a.max())
        self.lo[name] = min(lo, self.lo.get(name, lo))
        self.hi[name] = max(hi, self.hi.get(name, hi))
        if a.ndim == 4 and name not in self._no_moments:
            n, s1, s2 = self.moments.get(name, (0, 0.0, 0.0))
            if n and np.shape(s1) != (a.shape[1],):  # axis 1 is not a channel axis (a time axis)
                self._no_moments.add(name)
                del self.moments[name]
                return
            self.moments[name] = (n + a.size // a.shape[1], s1 + a.sum(axis=(0, 2, 3)),
                                  s2 + np.square(a).sum(axis=(0, 2, 3)))

    def channel_sqnr(self, name: str, scale: float, q: float = 10.0) -> float | None:
        """The ``q``-th percentile over channels of each channel's SQNR in dB (its variance over
        the rounding noise ``scale**2 / 12`` of a per-tensor step ``scale``), or None for a
        tensor that is not 4-D. A feature map whose channels have very different ranges (BN-folded
        MobileNet layers: one channel spans +-80, most +-2) keeps a high tensor-wide SQNR while
        its narrow channels are rounded to a few levels; a depthwise convolution reading them
        (often with the largest per-channel weights on exactly those channels) passes that noise
        on undiluted. Constant channels (variance 0) carry no signal and are left out."""
        if name not in self.moments:
            return None
        n, s1, s2 = self.moments[name]
        var = np.maximum(s2 / max(n, 1) - np.square(s1 / max(n, 1)), 0.0)
        var = var[var > 1e-12 * max(float(var.max()), 1e-30)] if var.size else var
        if var.size == 0:
            return None
        return float(np.percentile(10 * np.log10(var / (scale ** 2 / 12.0)), q))

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
        if method == "entropy":
            return _entropy_range(h, edges, lo, hi)
        raise ValueError(f"unknown calibration method {method!r}; choose from {METHODS}")


def _mse_range(h: np.ndarray, centers: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """Least expected squared error (rounding noise inside, clipping outside): the upper and
    the lower end are each searched over 128 candidates down to 1% of their extent, in turn."""
    total = max(h.sum(), 1.0)

    def err(a: float, b: float) -> float:
        scale = (b - a) / 255 if b > a else 1.0
        inside = (centers >= a) & (centers <= b)
        e = (scale ** 2 / 12) * h[inside].sum()
        e += (h[centers < a] * (centers[centers < a] - a) ** 2).sum()
        e += (h[centers > b] * (centers[centers > b] - b) ** 2).sum()
        return float(e / total)

    a, b = min(lo, 0.0), max(hi, 0.0)
    grid = np.geomspace(1.0, 0.01, 128)
    for _ in range(2):
        b = min((max(hi, 0.0) * f for f in grid), key=lambda x: err(a, x))
        a = min((min(lo, 0.0) * f for f in grid), key=lambda x: err(x, b))
    return float(a), float(b)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q = q / q.sum()
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))))


def _entropy_range(h: np.ndarray, edges: np.ndarray, lo: float, hi: float, levels: int = 256
                   ) -> tuple[float, float]:
    """KL-divergence calibration: choose the clipping window whose 256-level quantized
    distribution is closest (KL) to the observed one, with outliers folded into the edge bins.

    The window is grown symmetrically around the bin holding 0, as in the classic TensorRT
    method, adapted to an asymmetric histogram.
    """
    n = len(h)
    zero = int(np.clip(np.searchsorted(edges, 0.0) - 1, 0, n - 1))
    best, best_win = np.inf, (0, n)
    for half in range(levels // 2, n + 1, max(1, n // 128)):
        a, b = max(zero - half, 0), min(zero + half, n)
        if b - a < levels:
            continue
        ref = h[a:b].astype(np.float64).copy()
        ref[0] += h[:a].sum()
        ref[-1] += h[b:].sum()
        if ref.sum() == 0:
            continue
        # quantize the window into `levels` buckets, spread each back over its non-empty bins
        chunks = np.array_split(np.arange(b - a), levels)
        q = np.zeros_like(ref)
        for c in chunks:
            nz = c[h[a:b][c] > 0]
            if len(nz):
                q[nz] = h[a:b][c].sum() / len(nz)
        d = _kl(ref, q + 1e-12 * (ref > 0))
        if d < best:
            best, best_win = d, (a, b)
        if a == 0 and b == n:
            break
    a, b = best_win
    return float(min(edges[a], 0.0)), float(max(edges[b], 0.0))


def uint8_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """Asymmetric uint8 scale and zero point covering [lo, hi] (which always includes 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zp = int(np.clip(round(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zp)


def int8_sym_params(lo: float, hi: float) -> tuple[np.float32, np.int8]:
    """Symmetric int8 activation parameters (zero point 0) covering [lo, hi]."""
    amax = max(abs(lo), abs(hi))
    return np.float32(amax / 127.0 if amax > 0 else 1.0), np.int8(0)


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

