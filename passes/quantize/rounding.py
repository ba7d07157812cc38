"""Learned rounding of int8 weights from the original model's activations (no training engine).

Round-to-nearest minimizes the error of each weight on its own; what matters is the error of
the layer's *output* on real inputs, ``||W x - W_q x||^2`` summed over the calibration data. For a
linear layer that is the quadratic form ``tr(D H D^T)`` in the rounding error ``D = W_q - W``,
with ``H = sum x x^T`` the Gram matrix of the layer's inputs - so everything below needs only
``H``, collected once from the float (teacher) model on the calibration samples:

* ``adaround`` (Nagel et al., 2020): each weight rounds down or up, ``W_q = s * (floor(W/s) +
  h(V))`` with the rectified sigmoid ``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``;
  ``V`` is optimized (Adam, numpy, analytic gradient) on ``tr(D H D^T)`` plus a regularizer
  ``1 - |2h - 1|^beta`` that pushes every ``h`` to 0 or 1, ``beta`` annealed from 20 to 2;
* ``gptq`` (Frantar et al., 2022): columns are quantized one at a time in order of decreasing
  ``H_ii`` and the rounding error of each is spread over the columns not yet quantized through
  the Cholesky factor of ``H^-1`` (the optimal least-squares compensation), in blocks of 128.

Both keep the quantizer's scales (per output channel, symmetric, [-127, 127]), so biases, scales
and the QDQ layout stay exactly as round-to-nearest writes them; only the int8 values change.
A layer whose learned rounding is not better than nearest on its own objective keeps nearest.

Inputs: Conv (any rank, groups, strides, dilations, pads and auto_pad; the Gram of the unfolded
input patches at a random sample of output positions per calibration sample), Gemm
(``transA=0``) and MatMul with a constant 2-D weight (rows of the input's last axis).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt import Model, Node

log = logging.getLogger(__name__)

ROUNDINGS = ("nearest", "adaround", "gptq")
QMAX = 127  # the quantizer's symmetric int8 weights use [-127, 127]
ZETA, GAMMA = 1.1, -0.1  # rectified sigmoid stretch (AdaRound)
GRAM_BUDGET = 400 * 2 ** 20  # bytes of Gram matrices one collection run holds
MAX_D = 4608  # most inputs per output (C/groups * kernel) a layer may have: a 9216-wide Gram is 680 MB
ADAROUND_BUDGET = 1.5e11  # most multiply-adds AdaRound may spend on one layer (groups * rows * d^2 * iters)


# -- layer layout -------------------------------------------------------------------------------
@dataclass
class Layer:
    """How a quantizable node's weight maps to ``[groups, rows, d]`` (rows: output channels of
    a group; d: the inputs one output reads) and its input to rows of length ``d``."""

    node: str
    op: str
    x: str                 # name of the (float) input value
    shape: tuple[int, ...]  # the weight's shape
    groups: int
    attrs: dict[str, Any]

    @property
    def d(self) -> int:
        if self.op == "Conv":
            return int(np.prod(self.shape[1:]))
        if self.op == "Gemm" and self.attrs.get("transB"):
            return self.shape[1]
        return self.shape[0]

    def gram_bytes(self) -> int:
        return self.groups * self.d * self.d * 8

    def to_rows(self, w: np.ndarray) -> np.ndarray:
        if self.op == "Conv":
            return w.reshape(self.groups, w.shape[0] // self.groups, -1)
        if self.op == "Gemm" and self.attrs.get("transB"):
            return w[None]
        return w.T[None]

    def from_rows(self, r: np.ndarray) -> np.ndarray:
        if self.op == "Conv":
            return r.reshape(self.shape)
        if self.op == "Gemm" and self.attrs.get("transB"):
            return r[0]
        return r[0].T

    def scale_rows(self, sc: np.ndarray, n_rows: int) -> np.ndarray:
        """The quantizer's scale (per output channel, or one) as ``[groups, rows]``."""
        sc = np.asarray(sc, np.float64)
        if sc.ndim == 0 or sc.size == 1:
            return np.full((self.groups, n_rows), float(sc.ravel()[0]))
        return sc.reshape(self.groups, n_rows)


def layer_of(n: Node) -> Layer | None:
    """The :class:`Layer` of a Conv/Gemm/MatMul node with a constant float weight, or None
    (a second activation, ``transA``, a weight of rank other than the op needs)."""
    w = n.input(1) if len(n.inputs) > 1 else None
    arr = w.const_value() if w is not None else None
    x = n.input(0)
    if arr is None or x is None or arr.dtype != np.float32:
        return None
    if n.op_type == "Conv" and arr.ndim >= 3:
        g = int(n.attr("group", 1) or 1)
        if arr.shape[0] % g:
            return None
        attrs = {k: n.attr(k) for k in ("strides", "pads", "dilations", "auto_pad")}
        return Layer(n.name, "Conv", x.name, tuple(arr.shape), g, attrs)
    if n.op_type == "Gemm" and arr.ndim == 2 and not n.attr("transA", 0):
        return Layer(n.name, "Gemm", x.name, tuple(arr.shape), 1, {"transB": int(n.attr("transB", 0) or 0)})
    if n.op_type == "MatMul" and arr.ndim == 2:
        return Layer(n.name, "MatMul", x.name, tuple(arr.shape), 1, {})
    return None


def conv_patches(x: np.ndarray, layer: Layer, max_rows: int, rng: np.random.Generator,
                 positions: bool = False) -> Any:
    """Unfolded input patches of a Conv at up to ``max_rows`` random output positions:
    ``[groups, rows, C/groups * prod(kernel)]``, in the weight's flattening order (channel, then
    kernel offsets). Only the sampled patches are built (a page-sized input unfolds to GBs).
    With ``positions=True`` also the output positions (index arrays: batch, then each spatial
    axis), to read the layer's output at the same places."""
    kernel = layer.shape[2:]
    nd = len(kernel)
    spatial = x.shape[2:]
    if len(spatial) != nd:
        raise ValueError(f"input rank {x.ndim} does not match a {nd}-D kernel")
    a = layer.attrs
    strides = list(a.get("strides") or [1] * nd)
    dil = list(a.get("dilations") or [1] * nd)
    auto = a.get("auto_pad")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dil, strict=True)]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(nd):
            out = -(-spatial[i] // strides[i])
            total = max((out - 1) * strides[i] + span[i] - spatial[i], 0)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            begin.append(lo)
            end.append(total - lo)
    elif auto == "VALID":
        begin, end = [0] * nd, [0] * nd
    else:
        pads = list(a.get("pads") or [0] * (2 * nd))
        begin, end = pads[:nd], pads[nd:]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(b, e) for b, e in zip(begin, end, strict=True)])
    outs = [(xp.shape[2 + i] - span[i]) // strides[i] + 1 for i in range(nd)]
    total = x.shape[0] * int(np.prod(outs))
    if total <= 0:
        empty = np.zeros((layer.groups, 0, layer.d))
        return (empty, tuple(np.zeros(0, np.int64) for _ in range(nd + 1))) if positions else empty
    pick = rng.choice(total, size=min(max_rows, total), replace=False) if total > max_rows else np.arange(total)
    pos = np.unravel_index(pick, (x.shape[0], *outs))
    offs = np.unravel_index(np.arange(int(np.prod(kernel))), kernel)
    idx = [pos[0][:, None]] + [pos[1 + i][:, None] * strides[i] + offs[i][None, :] * dil[i] for i in range(nd)]
    # advanced indices around the channel slice: result [rows, K, C]
    patches = xp[(idx[0], slice(None), *idx[1:])]
    rows, k, c = patches.shape
    g = layer.groups
    out = patches.reshape(rows, k, g, c // g).transpose(2, 0, 3, 1).reshape(g, rows, (c // g) * k)
    return (out, pos) if positions else out


def input_rows(x: np.ndarray, layer: Layer, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """``[groups, rows, d]`` rows of the layer's input (sampled to at most ``max_rows``)."""
    if layer.op == "Conv":
        return conv_patches(np.asarray(x, np.float64), layer, max_rows, rng)
    r = np.asarray(x, np.float64).reshape(-1, layer.d)
    if len(r) > max_rows:
        r = r[rng.choice(len(r), size=max_rows, replace=False)]
    return r[None]


# -- objectives and the two roundings -----------------------------------------------------------
def output_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray) -> float:
    """``sum_g tr(D_g H_g D_g^T)``: the squared output error of ``wq`` against ``w`` over the
    inputs whose Gram matrices are ``h`` (``[groups, rows, d]`` weights, ``[groups, d, d]``)."""
    d = wq - w
    return float(np.einsum("grd,gde,gre->", d, h, d, optimize=True))


def nearest(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    return np.clip(np.round(w / s[..., None]), -QMAX, QMAX)


def adaround(w: np.ndarray, s: np.ndarray, h: np.ndarray, iters: int = 300, lam: float = 3.0,
             lr: float = 0.05, warmup: float = 0.2) -> np.ndarray:
    """AdaRound on the quadratic objective: integer weights ``[groups, rows, d]`` (floats
    holding integers) for weights ``w`` at scales ``s`` ``[groups, rows]`` and Grams ``h``.

    The reconstruction term is normalized by round-to-nearest's error, so ``lam`` (the weight of
    the rounding regularizer, per weight on average) means the same for every layer."""
    sw = s[..., None]
    t = w / sw
    fl = np.floor(t)
    rest = np.clip(t - fl, 1e-4, 1 - 1e-4)
    # initialize so that h(V) equals the fractional part: the soft weights start at w exactly
    p = np.clip((rest - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
    v = np.log(p / (1 - p))
    e0 = max(output_error(w, nearest(w, s) * sw, h), 1e-30)
    n_w = w.size
    m1, m2 = np.zeros_like(v), np.zeros_like(v)
    b1, b2 = 0.9, 0.999
    start = int(iters * warmup)
    for it in range(iters):
        sig = 1.0 / (1.0 + np.exp(-v))
        hv = np.clip(sig * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
        q = np.clip(fl + hv, -QMAX, QMAX)
        d = (q - t) * sw  # soft weights minus float weights
        grad_q = 2.0 * np.matmul(d, h) / e0 * sw  # d loss / d q (per integer step)
        inside = (hv > 0) & (hv < 1) & (fl + hv > -QMAX) & (fl + hv < QMAX)
        grad_h = grad_q
        if it >= start:
            frac = (it - start) / max(iters - start, 1)
            beta = 20.0 + (2.0 - 20.0) * frac
            u = 2.0 * hv - 1.0
            grad_h = grad_h - lam * beta * np.abs(u) ** (beta - 1) * np.sign(u) * 2.0 / n_w  # mean per weight
        g = grad_h * inside * (ZETA - GAMMA) * sig * (1 - sig)
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b2 * m2 + (1 - b2) * g * g
        v -= lr * (m1 / (1 - b1 ** (it + 1))) / (np.sqrt(m2 / (1 - b2 ** (it + 1))) + 1e-8)
    return np.clip(fl + (v >= 0), -QMAX, QMAX)


def gptq(w: np.ndarray, s: np.ndarray, h: np.ndarray, damp: float = 0.01, block: int = 128) -> np.ndarray:
    """GPTQ error-compensated rounding: integer weights ``[groups, rows, d]`` for ``w`` at the
    fixed scales ``s`` with Grams ``h`` (columns in order of decreasing ``H_ii``, the Cholesky
    factor of the damped ``H^-1``, lazy updates in blocks of ``block`` columns)."""
    g, r, dim = w.shape
    h = h.copy()
    diag = np.einsum("gii->gi", h)
    dead = diag <= 0
    diag[dead] = 1.0  # inputs that are always zero: their weights round to nearest, nothing to spread
    ii = np.arange(dim)
    h[:, ii, ii] = diag + damp * np.mean(diag, axis=1, keepdims=True)
    perm = np.argsort(-diag, axis=1, kind="stable")
    wp = np.take_along_axis(w, perm[:, None, :], axis=2).copy()
    hp = np.take_along_axis(np.take_along_axis(h, perm[:, :, None], axis=1), perm[:, None, :], axis=2)
    try:
        u = np.swapaxes(np.linalg.cholesky(np.linalg.inv(hp)), 1, 2)  # upper: H^-1 = U^T U
    except np.linalg.LinAlgError:
        return nearest(w, s)
    qp = np.zeros_like(wp)
    for b0 in range(0, dim, block):
        b1 = min(b0 + block, dim)
        err = np.zeros((g, r, b1 - b0))
        for i in range(b0, b1):
            col = wp[:, :, i]
            qi = np.clip(np.round(col / s), -QMAX, QMAX)
            qp[:, :, i] = qi
            e = (col - qi * s) / u[:, i, i][:, None]
            err[:, :, i - b0] = e
            if i + 1 < b1:
                wp[:, :, i + 1:b1] -= e[:, :, None] * u[:, i, i + 1:b1][:, None, :]
        if b1 < dim:
            wp[:, :, b1:] -= np.matmul(err, u[:, b0:b1, b1:])
    out = np.empty_like(qp)
    np.put_along_axis(out, perm[:, None, :].repeat(r, axis=1), qp, axis=2)
    return out


# -- collection and the per-layer loop ----------------------------------------------------------
def _digest(arr: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(arr).tobytes(), digest_size=16).hexdigest()


def layer_progress(total: int, desc: str) -> Any:
    """A progress bar over ``total`` layers: graphopt's own (a bar on a terminal, INFO lines in
    logs) where this version has it, else tqdm on a terminal."""
    try:
        from graphopt.progress import progress
    except ImportError:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="layer", leave=False, disable=not sys.stderr.isatty())
    return progress(total=total, desc=desc, unit="layer")


class LearnedRounding:
    """Integer weights chosen by AdaRound or GPTQ for the quantizable nodes of a float model,
    from its own activations on the calibration samples (see the module doc).

    Build it on the float model before the Q/DQ rewrite, call :meth:`prepare`, then
    :meth:`refine` for each weight as the quantizer makes it (the scales must be the ones
    :meth:`prepare` saw: those of ``int8_weight``)."""

    def __init__(self, method: str, *, iters: int = 300, lam: float = 3.0, rows_per_sample: int = 512,
                 max_rows: int = 16384, seed: int = 0) -> None:
        if method not in ROUNDINGS:
            raise ValueError(f"unknown rounding {method!r}; choose from {ROUNDINGS}")
        self.method, self.iters, self.lam = method, iters, lam
        self.rows_per_sample, self.max_rows, self.seed = rows_per_sample, max_rows, seed
        #: (node, weight name) -> (int8 weight, digest of the float weight it was learned for)
        self.results: dict[tuple[str, str | None], tuple[np.ndarray, str]] = {}
        self.report: dict[str, Any] = {}
        self._applied: set[tuple[str, str | None]] = set()

    def prepare(self, model: Model, nodes: list[Node], samples: list[dict[str, np.ndarray]],
                scale_of: Any) -> None:
        """Collect each layer's input Gram on ``samples`` (from ``model``, the float teacher)
        and choose its integer weights. ``scale_of(node, weight array) -> (q, scale)`` is the
        quantizer's own round-to-nearest (it gives the scales to keep)."""
        from graphopt.runtime import intermediate_session

        layers, too_large = [], []
        for n in nodes:
            lay = layer_of(n)
            if lay is None:
                continue
            rows = int(np.prod(lay.shape)) // lay.d
            if lay.d > MAX_D or (self.method == "adaround" and rows * lay.d * self.iters * lay.d > ADAROUND_BUDGET):
                too_large.append(lay.node)  # round-to-nearest: its Gram (or AdaRound on it) costs too much
            else:
                layers.append((n, lay))
        # one collection per batch of layers whose Grams fit the budget
        batches: list[list[tuple[Node, Layer]]] = []
        size = 0
        for item in layers:
            b = item[1].gram_bytes()
            if not batches or size + b > GRAM_BUDGET:
                batches.append([])
                size = 0
            batches[-1].append(item)
            size += b
        rng = np.random.default_rng(self.seed)
        e_near = e_new = 0.0
        kept_nearest = improved = 0
        per_sample = max(1, min(self.rows_per_sample, self.max_rows // max(len(samples), 1)))
        bar = layer_progress(len(layers), f"rounding ({self.method})")
        for batch in batches:
            names = sorted({lay.x for _, lay in batch})
            sess, outs = intermediate_session(model, names)
            ins = {i.name for i in sess.get_inputs()}
            grams: dict[str, np.ndarray] = {}
            for s in samples:
                res = dict(zip(outs, sess.run(None, {k: v for k, v in s.items() if k in ins}), strict=True))
                for _n, lay in batch:
                    x = res.get(lay.x)
                    if x is None or np.size(x) == 0:
                        continue
                    try:
                        rows = input_rows(x, lay, per_sample, rng)
                    except ValueError as e:
                        log.info("rounding: %s keeps round-to-nearest: %s", lay.node, e)
                        continue
                    gm = np.matmul(np.swapaxes(rows, 1, 2), rows)
                    grams[lay.node] = grams.get(lay.node, 0) + gm
            for n, lay in batch:
                bar.update(1)
                h = grams.pop(lay.node, None)
                if h is None:
                    continue
                wf = n.input(1).const_value().astype(np.float64)
                q0, sc = scale_of(n, n.input(1).const_value())
                w = lay.to_rows(wf)
                s = lay.scale_rows(sc, w.shape[1])
                h = h / max(float(np.mean(np.einsum("gii->gi", h))), 1e-30)  # scale-free
                if self.method == "adaround":
                    qi = adaround(w, s, h, iters=self.iters, lam=self.lam)
                else:
                    qi = gptq(w, s, h)
                qn = lay.to_rows(np.asarray(q0, np.float64))
                en, el = output_error(w, qn * s[..., None], h), output_error(w, qi * s[..., None], h)
                if not np.all(np.isfinite(qi)) or el >= en:
                    qi, el = qn, en
                    kept_nearest += 1
                else:
                    improved += 1
                e_near += en
                e_new += el
                self.results[(lay.node, n.input(1).name)] = (lay.from_rows(qi).astype(np.int8),
                                                             _digest(n.input(1).const_value()))
        bar.close()
        if too_large:
            log.info("rounding (%s): %d layers too large keep round-to-nearest: %s", self.method, len(too_large),
                     ", ".join(too_large[:5]) + (" ..." if len(too_large) > 5 else ""))
        self.report = {"method": self.method, "layers": len(self.results), "improved": improved,
                       "kept_nearest": kept_nearest, "too_large": len(too_large),
                       "output_error_vs_nearest": round(e_new / e_near, 4) if e_near > 0 else 1.0}
        log.info("rounding (%s): %d layers, output error %.3f of round-to-nearest's (%d kept nearest)",
                 self.method, len(self.results), self.report["output_error_vs_nearest"], kept_nearest)

    def refine(self, n: Node, w: Any, q: np.ndarray) -> np.ndarray:
        """The learned integer weights of node ``n`` reading weight ``w`` (a Value), or
        round-to-nearest's ``q`` where there are none (or where ``w`` is not the weight they were
        learned for: a node of the same name inside a body)."""
        got = self.results.get((n.name, getattr(w, "name", None)))
        arr = w.const_value() if hasattr(w, "const_value") else None
        if got is None or got[0].shape != q.shape or arr is None or _digest(arr) != got[1]:
            return q
        self._applied.add((n.name, getattr(w, "name", None)))
        self.report["applied"] = len(self._applied)  # layers whose learned weights were written
        return got[0].astype(q.dtype)
