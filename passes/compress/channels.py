"""Structured channel pruning: remove whole output channels of Conv layers.

Channels are pruned per *group*: the activations joined by channel-wise ops and by elementwise
Add/Sub/Mul/Max/Min (residual connections) must keep the same channels, so every Conv producing
one of them drops the same output channels, and every reader drops the matching input channels.
A group with a single producer is the classic Conv -> BN -> Relu -> Conv unit:

A prunable unit is a Conv (group = 1, constant weights) whose output reaches its readers only
through channel-preserving ops - BatchNormalization (constant parameters), elementwise
activations, pooling, GlobalAveragePool, per-channel constant Add/Mul/Sub/Div - and whose
readers are Convs with group = 1 (input 0) or, after a flatten of a static [N, C, H, W] tensor,
Gemm/MatMul layers. Everything in the unit is rewritten consistently: the producer's filters and
bias, BN parameters, per-channel constants, and the readers' input channels (or the matching
feature rows after a flatten).

``Concat``, channel shuffles (Reshape/Transpose), depthwise/grouped readers, graph inputs and
graph outputs make a group unprunable: its convolutions are left as they are and listed in
``report["skipped"]`` (their channels must stay aligned with something graphopt cannot change).

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
from graphopt.runtime import collect_values, load_calibration

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


ELEMENTWISE_JOIN = frozenset({"Add", "Sub", "Mul", "Max", "Min", "Sum"})


class Group:
    """Values that must keep the same channels (joined by channel-wise ops and residual adds),
    the Convs producing them, the ops carrying per-channel parameters, and the readers."""

    def __init__(self) -> None:
        self.values: list[Value] = []
        self.producers: list[Node] = []
        self.param_ops: list[Node] = []
        self.readers: list[tuple[Node, str, int]] = []
        self.flattens: list[Node] = []
        self.reason: str | None = None


def find_groups(graph: Graph) -> list[Group]:
    """Channel groups of the main graph (union-find over 4-D activation values)."""
    parent: dict[int, int] = {}
    vals: dict[int, Value] = {}

    def find(a: int) -> int:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: Value, b: Value) -> None:
        vals[id(a)], vals[id(b)] = a, b
        ra, rb = find(id(a)), find(id(b))
        if ra != rb:
            parent[ra] = rb

    def four_d(v: Value | None) -> bool:
        return v is not None and v.shape is not None and len(v.shape) == 4 and not v.is_const()

    for n in graph:
        if n.domain not in _STD or not n.outputs:
            continue
        out = n.output(0)
        if not four_d(out):
            continue
        if n.op_type == "Conv" and (n.attr("group", 1) or 1) == 1 and n.input(1) is not None \
                and n.input(1).const_value() is not None:
            vals[id(out)] = out
            find(id(out))
        elif n.op_type in CHANNEL_WISE and four_d(n.input(0)):
            union(n.input(0), out)
        elif n.op_type in PER_CHANNEL_BINARY | ELEMENTWISE_JOIN:
            data = [v for v in n.inputs if v is not None and not v.is_const()]
            if data and all(four_d(v) for v in data):
                for v in data:
                    union(v, out)
    groups: dict[int, Group] = {}
    for vid, v in vals.items():
        groups.setdefault(find(vid), Group()).values.append(v)
    out_groups = []
    for g in groups.values():
        members = {id(v) for v in g.values}
        for v in g.values:
            p = v.producer
            if v.is_graph_output() or p is None:
                g.reason = "reaches a graph input or output"
                break
            if p.op_type == "Conv" and (p.attr("group", 1) or 1) == 1 and p.input(1).const_value() is not None:
                g.producers.append(p)
            elif p.op_type == "BatchNormalization" and any(i is None or i.const_value() is None for i in p.inputs[1:5]):
                g.reason = "BatchNormalization parameters are not constant"
            elif p.op_type == "BatchNormalization" or (p.op_type in PER_CHANNEL_BINARY and any(
                    i is not None and i.const_value() is not None and i.const_value().size > 1 for i in p.inputs)):
                g.param_ops.append(p)
            elif p.op_type == "Clip" and any(i is not None and not i.is_const() for i in p.inputs[1:]):
                g.reason = "Clip bounds are not constant"
            for r in v.consumers():
                if all(id(o) in members for o in r.outputs if o.name) and r.op_type not in ("Conv",):
                    continue  # an op inside the group
                if r.op_type == "Conv" and (r.attr("group", 1) or 1) == 1 and r.input(0) is v \
                        and r.input(1) is not None and r.input(1).const_value() is not None:
                    g.readers.append((r, "conv", 1))
                    continue
                if r.op_type in ("Flatten", "Reshape") and v.shape is not None and \
                        all(isinstance(d, int) for d in v.shape[1:]):
                    o = r.output(0)
                    _, c_, h_, w_ = v.shape
                    tgt = r.input(1).const_value() if r.op_type == "Reshape" and r.input(1) is not None else None
                    fc = o.consumers()[0] if len(o.consumers()) == 1 else None
                    if o.shape is not None and len(o.shape) == 2 and o.shape[1] == c_ * h_ * w_ and fc is not None \
                            and fc.op_type in ("Gemm", "MatMul") and fc.input(0) is o and not fc.attr("transA", 0) \
                            and fc.input(1) is not None and fc.input(1).const_value() is not None \
                            and (r.op_type == "Flatten" or (tgt is not None and int(np.ravel(tgt)[-1]) == -1)):
                        g.readers.append((fc, "fc", h_ * w_))
                        g.flattens.append(r)
                        continue
                g.reason = f"read by {r.op_type} {r.name!r}, which must keep its channels aligned"
            if g.reason:
                break
        if not g.producers and not g.reason:
            g.reason = "no Conv produces these channels"
        if not g.readers and not g.reason:
            g.reason = "no reader whose input channels can shrink"
        out_groups.append(g)
    return out_groups


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
                       "exclude_nodes": (), "max_samples": 256, "sensitivity": False}

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
        excl = set(self.options["exclude_nodes"])
        order = {n: i for i, n in enumerate(graph)}
        groups = []
        skipped: dict[str, str] = {}
        for g in find_groups(graph):
            names = ", ".join(sorted(p.name or "Conv" for p in g.producers)) or (g.values[0].name if g.values else "?")
            if g.reason:
                for p in g.producers or []:
                    skipped[p.name or "Conv"] = g.reason
                if not g.producers:
                    continue
                continue
            if any(p.name in excl for p in g.producers):
                skipped[names] = "excluded"
                continue
            groups.append(g)
        groups.sort(key=lambda g: min(order[p] for p in g.producers))
        if not groups:
            self.report = {"pruned": {}, "skipped": skipped}
            return False
        have_data = ctx.calibration is not None
        if self.options["importance"] == "activation" and not have_data:
            raise GraphoptError("importance='activation' needs calibration data")
        acts: dict[str, np.ndarray] = {}
        targets: dict[str, np.ndarray] = {}
        if have_data:
            names = sorted({g.values[0].name for g in groups} | {r.output(0).name for g in groups for r, _, _ in g.readers})
            acts = self._collect(names, ctx)
            targets = {r.output(0).name: acts[r.output(0).name] for g in groups for r, _, _ in g.readers}
        recover = have_data and self.options["recover"]
        self._out_keep: dict[Node, np.ndarray] = {}
        ratios = {id(g): self.options["ratio"] for g in groups}
        if self.options["sensitivity"]:
            if not have_data:
                raise GraphoptError("sensitivity=True needs calibration data")
            ratios = self._spread(groups, ctx)
        # channels to keep, ranked on the original model for every group before any rewrite
        plan: list[tuple[Group, np.ndarray, int]] = []
        for g in groups:
            ws = [p.input(1).const_value() for p in g.producers]
            c = ws[0].shape[0]
            if any(w.shape[0] != c for w in ws):
                skipped[", ".join(p.name for p in g.producers)] = "producers disagree on the channel count"
                continue
            n_keep = max(self.options["min_channels"], int(round(c * (1 - ratios[id(g)]))))
            if n_keep >= c:
                for p in g.producers:
                    skipped[p.name or "Conv"] = "too few channels to prune"
                continue
            score = sum(np.abs(w).reshape(c, -1).sum(1) / max(np.abs(w).reshape(c, -1).sum(1).max(), 1e-12)
                        for w in ws)
            if self.options["importance"] == "activation" and g.values[0].name in acts:
                a = acts[g.values[0].name]
                score = score * np.abs(a).mean(axis=tuple(i for i in range(a.ndim) if i != 1))
            plan.append((g, np.sort(np.argsort(-score)[:n_keep]), c))
        done = {}
        for g, k, c in plan:
            # progressive recovery: the readers' inputs as the model computes them *now*
            # (earlier groups already pruned), their outputs as the original model computed them
            cur = self._collect([r.input(0).name for r, _, _ in g.readers], ctx) if recover else {}
            self._apply(graph, g, k, cur, targets if recover else {})
            for p in g.producers:
                done[p.name or "Conv"] = f"{len(k)}/{c}"
        for g in groups:  # shapes in the groups changed: forget them, re-infer
            for v in g.values:
                v.shape = None
            for f in g.flattens:
                f.output(0).shape = None
        infer_shapes(self.model, ctx.input_shapes or None)
        self.report = {**{k: v for k, v in self.report.items() if k == "sensitivity"},
                       "pruned": done, "skipped": skipped, "recovered": recover,
                       "groups": sum(1 for g in groups if any((p.name or "Conv") in done for p in g.producers)),
                       "multi_producer_groups": sum(1 for g in groups if len(g.producers) > 1
                                                    and any((p.name or "Conv") in done for p in g.producers))}
        return bool(done)

    def _spread(self, groups: list[Group], ctx: PassContext) -> dict[int, float]:
        """Per-group ratios: prune each group alone (on a copy) at the target ratio, measure the
        relative output error on calibration data, and give less sensitive groups more pruning -
        ratios proportional to 1/sqrt(error), scaled so their channel-weighted mean is the target."""
        from graphopt.runtime import ort_session

        assert self.model is not None
        samples = load_calibration(ctx.calibration, self.model)[:16]
        sess = ort_session(self.model)
        ins = {i.name for i in sess.get_inputs()}
        ref = [sess.run(None, {k: v for k, v in s.items() if k in ins}) for s in samples]
        target = self.options["ratio"]
        sens: dict[int, float] = {}
        for g in groups:
            names = {p.name for p in g.producers}
            trial = self.model.copy()
            from graphopt.analysis import infer_shapes

            infer_shapes(trial, ctx.input_shapes or None)
            tg = next((h for h in find_groups(trial.graph) if {p.name for p in h.producers} == names
                       and not h.reason), None)
            if tg is None:
                sens[id(g)] = 1.0
                continue
            w = tg.producers[0].input(1).const_value()
            c = w.shape[0]
            k = np.sort(np.argsort(-np.abs(w).reshape(c, -1).sum(1))[:max(self.options["min_channels"],
                                                                             int(round(c * (1 - target))))])
            self._out_keep = {}
            self._apply(trial.graph, tg, k, {}, {})
            ts = ort_session(trial)
            errs = []
            for s, r in zip(samples, ref, strict=True):
                got = ts.run(None, {k2: v for k2, v in s.items() if k2 in ins})
                errs.append(float(np.mean([np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)
                                           for a, b in zip(r, got, strict=True)])))
            sens[id(g)] = max(float(np.mean(errs)), 1e-9)
        raw = {gid: 1 / np.sqrt(e) for gid, e in sens.items()}
        chans = {id(g): g.producers[0].input(1).const_value().shape[0] for g in groups}
        scale = target * sum(chans.values()) / sum(raw[i] * chans[i] for i in raw)
        ratios = {i: float(np.clip(raw[i] * scale, 0.05, 0.9)) for i in raw}
        self.report["sensitivity"] = {", ".join(p.name for p in g.producers): (round(sens[id(g)], 4),
                                                                               round(ratios[id(g)], 3))
                                      for g in groups}
        self._out_keep = {}
        return ratios

    def _collect(self, names: list[str], ctx: PassContext) -> dict[str, np.ndarray]:
        assert self.model is not None
        samples = load_calibration(ctx.calibration, self.model)[: self.options["max_samples"]]
        return collect_values(self.model, names, samples)

    def _apply(self, graph: Graph, g: Group, k: np.ndarray, cur: dict[str, np.ndarray],
               targets: dict[str, np.ndarray]) -> None:
        def const(v: Value, arr: np.ndarray, tag: str) -> Value:
            return graph.add_initializer(v.name + tag, arr.astype(v.const_value().dtype))

        c = g.producers[0].input(1).const_value().shape[0]
        for p in g.producers:
            self._out_keep[p] = k  # readers refit later compare against these channels only
            p.set_input(1, const(p.input(1), p.input(1).const_value()[k], "_pruned"))
            if p.input(2) is not None and p.input(2).const_value() is not None:
                p.set_input(2, const(p.input(2), p.input(2).const_value()[k], "_pruned"))
        for n in g.param_ops:
            if n.op_type == "BatchNormalization":
                for i in range(1, 5):
                    n.set_input(i, const(n.input(i), n.input(i).const_value()[k], "_pruned"))
            else:
                ci = _per_channel_const(n, c)
                if ci is None:
                    continue
                arr = n.input(ci).const_value()
                if arr.size > 1:
                    new_shape = list(arr.shape)
                    new_shape[len(arr.shape) - 3 if len(arr.shape) >= 3 else 0] = len(k)
                    n.set_input(ci, const(n.input(ci), arr.reshape(-1)[k].reshape(new_shape), "_pruned"))
        for r, kind, hw in g.readers:
            wr = r.input(1).const_value().astype(np.float64)
            x = cur.get(r.input(0).name)
            y = targets.get(r.output(0).name)
            if y is not None and r in self._out_keep:
                y = y[:, self._out_keep[r]]  # this reader's own outputs were already cut
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
