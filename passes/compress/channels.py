"""Structured channel pruning: remove whole output channels of Conv layers.

A prunable unit is a Conv (group = 1, constant weights) whose output reaches its readers only
through channel-preserving ops - BatchNormalization (constant parameters), elementwise
activations, pooling, GlobalAveragePool, per-channel constant Add/Mul/Sub/Div - and whose
readers are Convs with group = 1 (input 0) or, after a flatten of a static [N, C, H, W] tensor,
Gemm/MatMul layers. Everything in the unit is rewritten consistently: the producer's filters and
bias, BN parameters, per-channel constants, and the readers' input channels (or the matching
feature rows after a flatten).

Residual ``Add``, ``Concat``, channel shuffles (Reshape/Transpose), depthwise/grouped readers and
graph outputs end a unit without qualifying: those convolutions are left as they are and listed
in ``report["skipped"]`` (their channels must stay aligned with other branches).

Importance: ``l1`` (filter L1 norm) or ``activation`` (filter norm times the mean |activation|
of the channel on calibration data, Wanda-style). Recovery: with calibration data, each
reader Conv/Gemm is refit by least squares so that, on the calibration inputs, its output from
the kept channels matches its original output. Lossy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from graphopt import GraphoptError, Graph, Node, Pass, PassContext, Value, register_pass
from graphopt.runtime import intermediate_session, load_calibration

_STD = ("", "ai.onnx")
CHANNEL_WISE = frozenset({"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
                          "Selu", "Softplus", "Gelu", "MaxPool", "AveragePool", "GlobalAveragePool",
                          "GlobalMaxPool", "BatchNormalization", "Identity", "Dropout"})
PER_CHANNEL_BINARY = frozenset({"Add", "Mul", "Sub", "Div"})


def _per_channel_const(n: Node, c: int) -> int | None:
    """Index of the constant operand if ``n`` is x (op) per-channel-or-scalar constant."""
    for k in (0, 1):
        v = n.input(k)
        arr = v.const_value() if v is not None else None
        if arr is None:
            continue
        if arr.size == 1:
            return k
        shp = [1] * (4 - arr.ndim) + list(arr.shape) if arr.ndim <= 4 else None
        if shp is not None and shp[0] == 1 and shp[1] == c and all(d == 1 for d in shp[2:]):
            return k
    return None


class Unit:
    """One prunable producer and everything that must change with its channels."""

    def __init__(self, producer: Node) -> None:
        self.producer = producer
        self.chain: list[Node] = []
        self.readers: list[tuple[Node, str, int]] = []  # (node, kind "conv"|"fc", spatial size)
        self.end: Value = producer.output(0)


def find_unit(p: Node) -> Unit | str:
    """The unit rooted at Conv ``p``, or the reason it is not prunable."""
    if p.op_type != "Conv" or p.domain not in _STD or (p.attr("group", 1) or 1) != 1:
        return "not a group-1 Conv"
    w = p.input(1).const_value() if p.input(1) is not None else None
    if w is None:
        return "weights are not constant"
    c = w.shape[0]
    u = Unit(p)
    v = p.output(0)
    while True:
        if v.is_graph_output():
            return "its output is a graph output"
        readers = v.consumers()
        if len(readers) == 1 and (readers[0].op_type in CHANNEL_WISE or (
                readers[0].op_type in PER_CHANNEL_BINARY and _per_channel_const(readers[0], c) is not None)):
            n = readers[0]
            if n.op_type == "BatchNormalization" and any(i is None or i.const_value() is None for i in n.inputs[1:5]):
                return "BatchNormalization parameters are not constant"
            if n.op_type == "Clip" and any(i is not None and not i.is_const() for i in n.inputs[1:]):
                return "Clip bounds are not constant"
            u.chain.append(n)
            v = n.output(0)
            continue
        break
    u.end = v
    for r in readers:
        if r.op_type == "Conv" and (r.attr("group", 1) or 1) == 1 and r.input(0) is v and \
                r.input(1) is not None and r.input(1).const_value() is not None:
            u.readers.append((r, "conv", 1))
            continue
        if r.op_type in ("Flatten", "Reshape") and v.shape is not None and len(v.shape) == 4 \
                and all(isinstance(d, int) for d in v.shape[1:]):
            o = r.output(0)
            _, c_, h_, w_ = v.shape
            if o.shape is None or len(o.shape) != 2 or o.shape[1] != c_ * h_ * w_ or len(o.consumers()) != 1:
                return f"{r.op_type} after the unit is not a plain flatten"
            if r.op_type == "Reshape":
                tgt = r.input(1).const_value() if r.input(1) is not None else None
                if tgt is None or int(np.ravel(tgt)[-1]) != -1:
                    return "the flattening Reshape has a fixed target shape"
            fc = o.consumers()[0]
            ok = fc.op_type in ("Gemm", "MatMul") and fc.input(0) is o and fc.input(1) is not None \
                and fc.input(1).const_value() is not None and not fc.attr("transA", 0)
            if not ok:
                return "the flattened tensor is not read by a Gemm/MatMul with constant weights"
            u.readers.append((fc, "fc", h_ * w_))
            u.chain.append(r)
            continue
        return f"read by {r.op_type} {r.name!r}, which must keep its channels aligned"
    if not u.readers:
        return "no reader whose input channels can shrink"
    return u


def _im2col(x: np.ndarray, node: Node) -> np.ndarray:
    """Patches of NCHW ``x`` for a 2-D Conv with ``node``'s attributes: [N*H'*W', C*kh*kw]."""
    kh, kw = node.input(1).const_value().shape[2:]
    pads = node.attr("pads") or [0, 0, 0, 0]
    st = node.attr("strides") or [1, 1]
    dil = node.attr("dilations") or [1, 1]
    if dil != [1, 1]:
        raise ValueError("dilated conv")
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::st[0], ::st[1]]  # N,C,H',W',kh,kw
    n, c, h, w = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * kh * kw)


@register_pass
class ChannelPruning(Pass):
    """Remove the least important output channels of Conv layers and rewrite every dependent op."""

    name = "prune-channels"
    recursive = False
    default_options = {"ratio": 0.5, "importance": "l1", "recover": True, "min_channels": 4,
                       "exclude_nodes": (), "max_samples": 256}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        r = self.options["ratio"]
        if not isinstance(r, int | float) or not 0 < r < 1:
            raise GraphoptError(f"ratio must be in (0, 1), got {r!r}")
        if self.options["importance"] not in ("l1", "activation"):
            raise GraphoptError("importance must be 'l1' or 'activation'")
        self.report: dict[str, Any] = {}

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        from graphopt.analysis import infer_shapes

        assert self.model is not None
        infer_shapes(self.model, ctx.input_shapes or None)
        units: list[Unit] = []
        skipped: dict[str, str] = {}
        for n in graph:
            if n.op_type != "Conv" or n.name in self.options["exclude_nodes"]:
                continue
            u = find_unit(n)
            if isinstance(u, str):
                skipped[n.name or n.op_type] = u
            else:
                units.append(u)
        if not units:
            self.report = {"pruned": {}, "skipped": skipped}
            return False
        have_data = ctx.calibration is not None
        if self.options["importance"] == "activation" and not have_data:
            raise GraphoptError("importance='activation' needs calibration data")
        acts: dict[str, np.ndarray] = {}
        targets: dict[str, np.ndarray] = {}
        if have_data:
            names = sorted({u.end.name for u in units} | {r.output(0).name for u in units for r, _, _ in u.readers})
            acts = self._collect(names, ctx)
            targets = {r.output(0).name: acts[r.output(0).name] for u in units for r, _, _ in u.readers}
        keep: dict[int, np.ndarray] = {}
        for u in units:
            w = u.producer.input(1).const_value()
            c = w.shape[0]
            n_keep = max(self.options["min_channels"], int(round(c * (1 - self.options["ratio"]))))
            if n_keep >= c:
                skipped[u.producer.name or "Conv"] = "too few channels to prune"
                continue
            score = np.abs(w).reshape(c, -1).sum(1)
            if self.options["importance"] == "activation" and u.end.name in acts:
                a = acts[u.end.name]
                score = score * np.abs(a).mean(axis=tuple(i for i in range(a.ndim) if i != 1))
            keep[id(u)] = np.sort(np.argsort(-score)[:n_keep])
        done = {}
        recover = have_data and self.options["recover"]
        for u in units:
            if id(u) not in keep:
                continue
            k = keep[id(u)]
            total = u.producer.input(1).const_value().shape[0]
            # progressive recovery: the readers' inputs as the model computes them *now*
            # (upstream units already pruned), their outputs as the original model computed them
            cur = self._collect([r.input(0).name for r, _, _ in u.readers], ctx) if recover else {}
            self._apply(graph, u, k, cur, targets if recover else {})
            done[u.producer.name or "Conv"] = f"{len(k)}/{total}"
        for u in units:  # shapes along the units changed: forget them, re-infer later
            for n in [u.producer] + u.chain:
                for o in n.outputs:
                    o.shape = None
        infer_shapes(self.model, ctx.input_shapes or None)
        self.report = {"pruned": done, "skipped": skipped, "recovered": bool(acts) and self.options["recover"]}
        return bool(done)

    def _collect(self, names: list[str], ctx: PassContext) -> dict[str, np.ndarray]:
        assert self.model is not None
        samples = load_calibration(ctx.calibration, self.model)[: self.options["max_samples"]]
        sess, outs = intermediate_session(self.model, names)
        ins = {i.name for i in sess.get_inputs()}
        acc: dict[str, list[np.ndarray]] = {k: [] for k in names}
        for s in samples:
            res = dict(zip(outs, sess.run(None, {k: v for k, v in s.items() if k in ins}), strict=True))
            for k in names:
                acc[k].append(np.asarray(res[k], np.float64))
        return {k: np.concatenate(v) for k, v in acc.items()}

    def _apply(self, graph: Graph, u: Unit, k: np.ndarray, cur: dict[str, np.ndarray],
               targets: dict[str, np.ndarray]) -> None:
        p = u.producer

        def const(v: Value, arr: np.ndarray, tag: str) -> Value:
            return graph.add_initializer(v.name + tag, arr.astype(v.const_value().dtype))

        w = p.input(1).const_value()
        p.set_input(1, const(p.input(1), w[k], "_pruned"))
        if p.input(2) is not None and p.input(2).const_value() is not None:
            p.set_input(2, const(p.input(2), p.input(2).const_value()[k], "_pruned"))
        c = w.shape[0]
        for n in u.chain:
            if n.op_type == "BatchNormalization":
                for i in range(1, 5):
                    n.set_input(i, const(n.input(i), n.input(i).const_value()[k], "_pruned"))
            elif n.op_type in PER_CHANNEL_BINARY:
                ci = _per_channel_const(n, c)
                arr = n.input(ci).const_value()
                if arr.size > 1:
                    shp = arr.shape
                    new_shape = list(shp)
                    new_shape[len(shp) - 3 if len(shp) >= 3 else 0] = len(k)
                    n.set_input(ci, const(n.input(ci), arr.reshape(-1)[k].reshape(new_shape), "_pruned"))
        for r, kind, hw in u.readers:
            wr = r.input(1).const_value().astype(np.float64)
            x = cur.get(r.input(0).name)
            y = targets.get(r.output(0).name)
            bias = r.input(2).const_value() if r.input(2) is not None and r.input(2).const_value() is not None else None
            if kind == "conv":
                new = wr[:, k]
                if x is not None and y is not None:
                    yb = y - (bias.reshape(1, -1, 1, 1) if bias is not None else 0)
                    new = self._refit_conv(r, x, k, wr, yb)
            else:
                rows = (k[:, None] * hw + np.arange(hw)[None, :]).reshape(-1)
                trans = r.op_type == "Gemm" and r.attr("transB", 0)
                new = wr[:, rows] if trans else wr[rows]
                if x is not None and y is not None:
                    yb = y - (bias.reshape(1, -1) if bias is not None else 0)
                    new = self._refit_fc(x, rows, yb, wr, trans)
            r.set_input(1, graph.add_initializer(r.input(1).name + "_pruned", new.astype(np.float32)))

    @staticmethod
    def _refit_conv(r: Node, x: np.ndarray, k: np.ndarray, w: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Least squares: the kept input channels (as computed now) reproduce the original
        bias-free output ``y`` of this conv."""
        try:
            part = _im2col(x[:, k], r)
        except ValueError:
            return w[:, k]
        o = w.shape[0]
        yr = y.transpose(0, 2, 3, 1).reshape(-1, o)
        if len(part) != len(yr):
            return w[:, k]
        if len(part) > 20000:  # a row sample is plenty for a well-posed least squares
            pick = np.random.default_rng(0).choice(len(part), 20000, replace=False)
            part, yr = part[pick], yr[pick]
        w0 = w[:, k].reshape(o, -1).T  # [C'*kh*kw, O]
        return _ridge(part, yr, w0).T.reshape((o, len(k)) + w.shape[2:])

    @staticmethod
    def _refit_fc(x: np.ndarray, rows: np.ndarray, y: np.ndarray, w: np.ndarray, trans: bool) -> np.ndarray:
        xf = x.reshape(x.shape[0], -1)[:, rows]
        w0 = (w.T if trans else w)[rows]  # [K', N]
        sol = _ridge(xf, y.reshape(y.shape[0], -1), w0)
        return sol.T if trans else sol


def _ridge(x: np.ndarray, y: np.ndarray, w0: np.ndarray, strength: float = 1e-2) -> np.ndarray:
    """argmin ||x W - y||^2 + lam ||W - w0||^2: least squares pulled towards the original
    weights, so a layer refit on few calibration samples does not overfit them."""
    xtx = x.T @ x
    lam = strength * np.trace(xtx) / max(xtx.shape[0], 1) + 1e-12
    return np.linalg.solve(xtx + lam * np.eye(xtx.shape[0]), x.T @ y + lam * w0)
