"""Block-wise refit of a compressed model to its original (the teacher), without a training engine.

``prune-channels`` refits each reader of removed channels by least squares so that *its own*
output, from its kept input channels, matches the original's - on inputs collected once per
batch of pruned groups. Errors the refit cannot remove (layers it does not touch: depthwise
convolutions, the producers of the removed channels, layers downstream) then add up through the
network. ``refit-blocks`` runs after any compression (structured pruning, low-rank
factorization) and refits *every* Conv/Gemm/MatMul of the main graph, in graph order, to the
teacher's activation at the layer's **block output**, on the inputs the compressed model (the
student) really gives it:

* where the layer's output is added to another branch (a residual ``Add``), the target is the
  teacher's sum minus the student's other branch: the layer compensates the error of the skip
  path as well as its own;
* otherwise the target is the teacher's value of the layer's output (through an ``Add`` of a
  constant, e.g. a low-rank factor's bias), matched by name, or - for a value the compression
  created (the last factor of a low-rank layer) - by the readers it shares with a teacher value;
  where pruning removed output channels, the kept ones are found by correlation with the
  teacher's;
* where an activation with a flat side follows (Relu, Clip, HardSwish, HardSigmoid), the fit is
  to the activation's *output*: wherever the teacher is on a flat side, any value on that side
  is right, so the target there is the current prediction pushed onto that side (alternating
  projection, ``act_steps`` least squares with one Gram matrix) and the error that decides is
  the one after the activation.

Each layer solves a ridge least-squares problem for its weights and bias (per group for grouped
and depthwise convolutions) on a random sample of output positions (patches unfolded only
there), and keeps the new weights only if they lower the error on held-out positions. Inputs
are collected once per batch of ``batch`` layers (default 1: every layer sees the student with
all earlier refits applied; on ppocrv3_rec pruned 30%, batches of 8 - layers fitted to inputs
that earlier refits of their batch then changed - left char accuracy at 0.02, one layer at a
time brought it from 0.09 to 0.41, at twice the time). Lossy; needs calibration data (``PassContext(calibration=...)``) and the
teacher (``teacher=`` the model before compression, with the same graph input names).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from graphopt import GraphoptError, Model, Node, Pass, PassContext, Value, register_pass
from graphopt.runtime import intermediate_session, load_calibration

from ..quantize.rounding import Layer, conv_patches, layer_of, layer_progress

log = logging.getLogger(__name__)

_STD = ("", "ai.onnx")
MAX_ELEMENTS = 20_000_000  # rows x unknowns of one least-squares problem (160 MB in float64)


def _teacher_names(teacher: Model) -> tuple[set[str], dict[tuple[str, int], str], list[str]]:
    """The teacher's main-graph value names, the value each (reader node, input index) reads,
    and its graph output names in order."""
    g = teacher.graph
    names = {v.name for n in g for v in n.outputs if v is not None} | {v.name for v in g.inputs}
    reads = {(n.name, i): v.name for n in g for i, v in enumerate(n.inputs) if v is not None and n.name}
    return names, reads, [o.name for o in g.outputs]


def _match(v: Value, names: set[str], reads: dict[tuple[str, int], str], outs: list[str],
           student_outs: list[str]) -> str | None:
    """The teacher value that student value ``v`` stands for: the same name, else the value the
    same readers read (a value the compression made), else the same graph output position."""
    if v.name in names:
        return v.name
    cands = {reads.get((n.name, i)) for n, i in v.uses if n.name}
    if len(cands) == 1 and None not in cands:
        return cands.pop()
    if v.name in student_outs:
        k = student_outs.index(v.name)
        return outs[k] if k < len(outs) else None
    return None


def _values(model: Model, names: list[str], samples: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """Values ``names`` of ``model`` on every sample (one float64 array per sample: text lines
    and pages differ in size, so they are not concatenated)."""
    sess, outs = intermediate_session(model, names)
    ins = {i.name for i in sess.get_inputs()}
    acc: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for s in samples:
        res = dict(zip(outs, sess.run(None, {k: v for k, v in s.items() if k in ins}), strict=True))
        for k in names:
            acc[k].append(np.asarray(res[k], np.float64))
    return acc


def _channel_map(ys: np.ndarray, yt: np.ndarray) -> np.ndarray | None:
    """Indices of the teacher's channels (columns of ``yt``) that the student's columns ``ys``
    are: pruning keeps the channels it keeps in order, so this is the order-preserving
    assignment with the largest total correlation (a sequence alignment, by dynamic
    programming); None where even that match is poor (mean correlation below 0.5)."""
    cs, ct = ys.shape[1], yt.shape[1]
    if cs == ct:
        return np.arange(cs)
    if cs > ct:
        return None
    a = ys - ys.mean(0)
    b = yt - yt.mean(0)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    corr = (a.T @ b) / np.maximum(np.outer(na, nb), 1e-30)  # [cs, ct]
    # f[i, j]: best total for the first i student channels among the first j teacher channels
    f = np.full((cs + 1, ct + 1), -np.inf)
    f[0, :] = 0.0
    take = np.zeros((cs + 1, ct + 1), dtype=bool)
    for i in range(1, cs + 1):
        for j in range(i, ct - (cs - i) + 1):
            skip, match = f[i, j - 1], f[i - 1, j - 1] + corr[i - 1, j - 1]
            take[i, j] = match >= skip
            f[i, j] = match if take[i, j] else skip
    idx = np.zeros(cs, dtype=np.int64)
    i, j = cs, ct
    while i > 0:
        if take[i, j]:
            idx[i - 1] = j - 1
            i -= 1
        j -= 1
    if float(np.mean(corr[np.arange(cs), idx])) < 0.5:
        return None
    return idx


class _Act:
    """A piecewise-linear activation after a layer (the end of its block): ``__call__`` applies
    it, ``project(pred, t)`` moves ``pred`` to the nearest value the activation maps to the same
    output as the teacher's ``t`` (on a flat side: any value on that side; else ``t`` itself)."""

    def __init__(self, lo: float | None, hi: float | None, fn: Any) -> None:
        self.lo, self.hi, self.fn = lo, hi, fn

    def __call__(self, v: np.ndarray) -> np.ndarray:
        return self.fn(v)

    def project(self, pred: np.ndarray, t: np.ndarray) -> np.ndarray:
        z = t.copy()
        if self.lo is not None:
            low = t <= self.lo
            z[low] = np.minimum(pred[low], self.lo)
        if self.hi is not None:
            high = t >= self.hi
            z[high] = np.maximum(pred[high], self.hi)
        return z


def _activation(v: Value) -> _Act | None:
    """The activation that is ``v``'s only reader, where it has a flat side the refit can use:
    Relu, Clip with constant bounds, HardSwish, HardSigmoid."""
    readers = v.consumers()
    if len(readers) != 1 or v.is_graph_output() or readers[0].domain not in _STD:
        return None
    a = readers[0]
    if a.op_type == "Relu":
        return _Act(0.0, None, lambda x: np.maximum(x, 0.0))
    if a.op_type == "Clip":
        def bound(i: int, name: str) -> float | None:
            c = a.input(i).const_value() if len(a.inputs) > i and a.input(i) is not None else None
            if c is not None:
                return float(np.ravel(c)[0])
            return None if a.attr(name) is None or len(a.inputs) > i else float(a.attr(name))
        lo, hi = bound(1, "min"), bound(2, "max")
        if (len(a.inputs) > 1 and a.input(1) is not None and lo is None) or \
                (len(a.inputs) > 2 and a.input(2) is not None and hi is None):
            return None  # computed bounds
        return _Act(lo, hi, lambda x: np.clip(x, lo if lo is not None else -np.inf, hi if hi is not None else np.inf))
    if a.op_type == "HardSwish":
        return _Act(-3.0, None, lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0))
    if a.op_type == "HardSigmoid":
        al, be = float(a.attr("alpha", 0.2)), float(a.attr("beta", 0.5))
        if al <= 0:
            return None
        return _Act(-be / al, (1.0 - be) / al, lambda x: np.clip(al * x + be, 0.0, 1.0))
    return None


@register_pass
class RefitBlocks(Pass):
    """Refit every Conv/Gemm/MatMul, in graph order, to the teacher's block output (see the
    module doc): ``--refit block`` of ``graphopt compress``."""

    name = "refit-blocks"
    recursive = False
    default_options = {
        "teacher": None,
        "max_samples": 16,
        "batch": 1,
        "max_rows": 16384,
        "ridge": 1e-4,
        "holdout": 0.2,
        "act_steps": 4,
        "seed": 0,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.report: dict[str, Any] = {}

    def apply(self, model: Model, ctx: PassContext) -> bool:
        teacher = self.options["teacher"]
        if teacher is None:
            raise GraphoptError("refit-blocks needs the original model (teacher=...)")
        if ctx.calibration is None:
            raise GraphoptError("refit-blocks needs calibration data (PassContext(calibration=...))")
        samples = load_calibration(ctx.calibration, model)[: self.options["max_samples"]]
        t_names, t_reads, t_outs = _teacher_names(teacher)
        s_outs = [o.name for o in model.graph.outputs]
        # node, layout, teacher value, student skip branch, constant added, activation after
        plan: list[tuple[Node, Layer, str, str | None, Any, Any]] = []
        for n in model.graph:
            if n.op_type not in ("Conv", "Gemm", "MatMul") or n.domain not in _STD:
                continue
            lay = layer_of(n)
            if lay is None:
                continue
            y = n.output(0)
            readers = y.consumers()
            target, skip, const = None, None, None
            if len(readers) == 1 and readers[0].op_type == "Add" and not y.is_graph_output():
                add = readers[0]
                other = add.input(1) if add.input(0) is y else add.input(0)
                t = _match(add.output(0), t_names, t_reads, t_outs, s_outs) if other is not None else None
                if t is not None and other.const_value() is not None:
                    target, const = t, other.const_value()  # a bias added after the product
                elif t is not None and other.producer is not None and other.dtype in (None, 1):
                    target, skip = t, other.name  # a residual sum
            if target is None:
                target = _match(y, t_names, t_reads, t_outs, s_outs)
            if target is None:
                continue
            end = readers[0].output(0) if (skip is not None or const is not None) else y
            plan.append((n, lay, target, skip, const, _activation(end)))
        self.report = {"layers": len(plan), "refit": 0, "kept": 0, "residual_targets": 0, "no_channel_match": 0}
        if not plan or not samples:
            return False
        rng = np.random.default_rng(self.options["seed"])
        before = after = 0.0
        bar = layer_progress(len(plan), "refit blocks")
        changed = False
        for b0 in range(0, len(plan), self.options["batch"]):
            batch = plan[b0: b0 + self.options["batch"]]
            s_vals = _values(model, sorted({v for n, lay, _, sk, _, _ in batch
                                            for v in (lay.x, n.output(0).name, sk) if v}), samples)
            t_vals = _values(teacher, sorted({t for _, _, t, _, _, _ in batch}), samples)
            for n, lay, target, skip, const, act in batch:
                bar.update(1)
                lay = layer_of(n)  # the weight as it is now
                if lay is None:
                    continue
                y_t = t_vals[target]
                if skip is not None and any(a.shape != b.shape for a, b in zip(s_vals[skip], y_t, strict=True)):
                    continue  # the residual's channels were pruned in the student: no common target
                c = const if const is not None else 0.0
                offset = [a + c for a in s_vals[skip]] if skip else [c] * len(y_t)
                res = self._refit(n, lay, s_vals[lay.x], s_vals[n.output(0).name], y_t, offset, act, rng)
                if res is None:
                    continue
                e0, e1, w_new, b_new = res
                before += e0
                if w_new is None:
                    after += e0
                    self.report["kept"] += 1
                    continue
                after += e1
                g = n.graph
                n.set_input(1, g.add_initializer(g.fresh_name(n.input(1).name + "_refit"), w_new.astype(np.float32)))
                if b_new is not None:
                    bv = g.add_initializer(g.fresh_name((n.input(2).name if len(n.inputs) > 2 and n.input(2) is not None
                                                         else n.name + "_bias") + "_refit"), b_new.astype(np.float32))
                    if len(n.inputs) > 2:
                        n.set_input(2, bv)
                    else:
                        n.append_input(bv)
                self.report["refit"] += 1
                self.report["residual_targets"] += int(skip is not None)
                changed = True
        bar.close()
        self.report["heldout_error_after_vs_before"] = round(after / before, 4) if before > 0 else 1.0
        log.info("refit-blocks: %d of %d layers refit to the teacher's block outputs (held-out error %.3f of before)",
                 self.report["refit"], len(plan), self.report["heldout_error_after_vs_before"])
        return changed

    def _refit(self, n: Node, lay: Layer, xs: list[np.ndarray], yss: list[np.ndarray], yts: list[np.ndarray],
               offsets: list[Any], act: Any, rng: np.random.Generator
               ) -> tuple[float, float, np.ndarray | None, np.ndarray | None] | None:
        """Least squares of ``n``'s weights and bias from its inputs ``x`` so that its output
        plus ``offset`` (the student's skip branch and added constant), through ``act``, matches
        the teacher's value ``y_t`` (before the activation, in the teacher's channels) through
        ``act``; ``y_s`` is the student's current output (for the channel match). Returns
        (held-out block-output error before, after, new weight or None when not better, new bias)."""
        w = n.input(1).const_value().astype(np.float64)
        b_in = n.input(2).const_value() if len(n.inputs) > 2 and n.input(2) is not None else None
        if len(n.inputs) > 2 and n.input(2) is not None and b_in is None:
            return None  # a computed bias
        has_bias = n.op_type in ("Conv", "Gemm")
        if n.op_type == "Gemm" and (float(n.attr("alpha", 1.0)) != 1.0 or float(n.attr("beta", 1.0)) != 1.0):
            return None
        d = lay.d
        most = int(min(self.options["max_rows"], max(8192, 32 * (d + 1)), MAX_ELEMENTS // max(d + 1, 1)))
        per = max(1, most // max(len(xs), 1))
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for x, y_s, y_t, offset in zip(xs, yss, yts, offsets, strict=True):  # samples may differ in size
            if y_s.ndim != x.ndim or y_t.ndim != x.ndim or y_s.shape[0] != y_t.shape[0]:
                return None
            if lay.op == "Conv":
                try:
                    rows, pos = conv_patches(x, lay, per, rng, positions=True)
                except ValueError:
                    return None
                idx = (pos[0], slice(None), *pos[1:])
                if y_s.shape[2:] != y_t.shape[2:]:
                    return None
                ys, yt = y_s[idx], y_t[idx]  # [M, C]
                off = np.broadcast_to(offset, y_t.shape)[idx] if np.ndim(offset) else np.full(yt.shape, float(offset))
            else:
                xr = x.reshape(-1, d)
                if y_s.size // y_s.shape[-1] != len(xr) or y_t.size // y_t.shape[-1] != len(xr):
                    return None
                pick = rng.choice(len(xr), size=min(per, len(xr)), replace=False)
                rows = xr[pick][None]
                ys, yt = y_s.reshape(len(xr), -1)[pick], y_t.reshape(len(xr), -1)[pick]
                off = np.broadcast_to(offset, y_t.shape).reshape(len(xr), -1)[pick]
            parts.append((rows, ys, yt, off))
        rows = np.concatenate([p[0] for p in parts], axis=1)
        ys, yt, off = (np.concatenate([p[k] for p in parts]) for k in (1, 2, 3))
        if rows.shape[1] < 16:
            return None
        cmap = _channel_map(ys, yt)
        if cmap is None:
            self.report["no_channel_match"] += 1
            return None
        if off.shape[1] != yt.shape[1]:
            return None
        yt, off = yt[:, cmap], off[:, cmap]
        g, m = lay.groups, rows.shape[1]
        wr = lay.to_rows(w)  # [g, r, d]
        r = wr.shape[1]
        bias = np.zeros(g * r) if b_in is None else np.broadcast_to(np.asarray(b_in, np.float64).reshape(-1), (g * r,))
        bias = bias.reshape(g, r)
        def grouped(a: np.ndarray) -> np.ndarray:  # [M, g*r] -> [g, M, r]
            return a.reshape(m, g, r).transpose(1, 0, 2)

        t_pre, off = grouped(yt), grouped(off)  # teacher's value before the activation; what is added
        t_out = act(t_pre) if act is not None else t_pre  # the teacher's block output
        xa = np.concatenate([rows, np.ones((g, m, 1))], axis=2) if has_bias else rows
        hold = rng.random(m) < self.options["holdout"]
        fit = ~hold
        if hold.sum() < 4 or fit.sum() < xa.shape[2]:
            return None
        xf = xa[:, fit]
        gram = np.matmul(np.swapaxes(xf, 1, 2), xf)
        diag = np.einsum("gii->gi", gram)
        lam = self.options["ridge"] * np.maximum(diag.mean(1), 1e-12)
        gram[:, np.arange(xa.shape[2]), np.arange(xa.shape[2])] += lam[:, None]
        cur = np.concatenate([np.swapaxes(wr, 1, 2), bias[:, None, :]], axis=1) if has_bias else np.swapaxes(wr, 1, 2)
        # where the activation is flat (a ReLU's negative side, a clip's saturation) any value on
        # that side gives the teacher's output: the target there is the current prediction pushed
        # onto that side (alternating projection; each step a least squares with the same Gram)
        sol = cur
        try:
            for _ in range(self.options["act_steps"] if act is not None else 1):
                z = t_pre[:, fit]
                if act is not None:
                    z = act.project(np.matmul(xf, sol) + off[:, fit], t_pre[:, fit])
                sol = np.linalg.solve(gram, np.matmul(np.swapaxes(xf, 1, 2), z - off[:, fit]))  # [g, d(+1), r]
        except np.linalg.LinAlgError:
            return None

        def err(coef: np.ndarray) -> float:
            pred = np.matmul(xa[:, hold], coef) + off[:, hold]
            return float(np.sum(((act(pred) if act is not None else pred) - t_out[:, hold]) ** 2))

        e0, e1 = err(cur), err(sol)
        if not np.all(np.isfinite(sol)) or e1 >= e0:
            return e0, e1, None, None
        new_w = np.swapaxes(sol[:, :d], 1, 2)  # [g, r, d]
        new_b = sol[:, d].reshape(-1) if has_bias else None
        return e0, e1, lay.from_rows(new_w), new_b
