"""Structured channel pruning: remove whole output channels of Conv layers.

Channels are tracked through the graph as a *layout*: for every 4-D activation, which Conv
produced each channel and at which filter index. Layouts pass unchanged through channel-wise ops
(BatchNormalization, activations, pooling, GlobalAveragePool, spatial ReduceMean/Max with
keepdims, per-channel constant Add/Mul/Sub/Div, depthwise Conv) and are concatenated by
``Concat`` on the channel axis. Elementwise joins (residual Add/Sub/Mul/Max/Min/Sum) tie the
Convs meeting at the same channel positions into one *group*: they must all keep the same
filters. So residual stages (ResNet), concatenated branches (Inception, SqueezeNet's fire
modules) and dense blocks (DenseNet, where every layer reads the concatenation of all earlier
ones) are all pruned: a Conv's removed filters disappear from every tensor they reach, and each
op downstream drops the matching positions:

- the producer's filters and bias;
- BatchNormalization parameters, per-channel constants and depthwise filters (their ``group``
  shrinks with them) at those positions;
- the input channels of every Conv reading them, and the matching feature rows of a
  Gemm/MatMul reached through a flatten of a static [N, C, H, W] tensor or a spatial
  ReduceMean/ReduceMax without keepdims.

Grouped convolutions (ResNeXt, RegNet) are producers and readers too: their filters and input
channels come in ``group`` contiguous slices, so a group of channels made or read by a grouped
conv keeps the same number of filters in every slice (the best ones of each slice).

A group is left as it is, and listed in ``report["skipped"]`` with the reason, when its channels
reach a graph output, a graph input, a channel shuffle, a grouped conv reading a concatenation,
or any other op that must keep its channels aligned, or when channels are joined out of order.

Importance: ``l1`` (filter L1 norm) or ``activation`` (filter norm times the mean |activation|
of the channel on calibration data, Wanda-style). Recovery: with calibration data, each
reader Conv/Gemm is refit by least squares so that, on the calibration inputs, its output from
the kept channels matches its original output. Lossy.

``multiple_of=8`` (or 16) rounds every kept channel count to a multiple of the CPU kernels'
channel block: ONNX Runtime's NCHWc convolutions and int8 kernels work in blocks of 8/16
channels, and a partial block costs a whole one (measured on the digits ResNet: 12 of 24 kept
channels ran slower than 16).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from graphopt import GraphoptError, Graph, Node, Pass, PassContext, Value, register_pass
from graphopt.runtime import collect_values, load_calibration

from ..common import is_depthwise, reduce_axes

_STD = ("", "ai.onnx")
CHANNEL_WISE = frozenset({"Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
                          "Selu", "Softplus", "Gelu", "MaxPool", "AveragePool", "GlobalAveragePool",
                          "GlobalMaxPool", "BatchNormalization", "Identity", "Dropout", "LpPool", "PRelu"})
PER_CHANNEL_BINARY = frozenset({"Add", "Mul", "Sub", "Div"})
ELEMENTWISE_JOIN = frozenset({"Add", "Sub", "Mul", "Max", "Min", "Sum"})
SPATIAL_REDUCE = frozenset({"ReduceMean", "ReduceMax", "ReduceSum", "ReduceL2"})
Layout = tuple[np.ndarray, np.ndarray]  # per channel: (root id, filter index within the root)


def _channel_axis(arr: np.ndarray) -> int:
    """Axis of a per-channel constant broadcast against [N, C, H, W] (shape [C,1,1] or [1,C,1,1])."""
    return arr.ndim - 3


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


def _prunable_conv(n: Node) -> bool:
    """A Conv with constant filters (any ``group``): its filters can be cut, its inputs narrowed."""
    return n.op_type == "Conv" and n.input(1) is not None and n.input(1).const_value() is not None \
        and n.input(1).const_value().ndim >= 3 and (n.input(2) is None or n.input(2).const_value() is not None)


def _depthwise(n: Node, c: int) -> bool:
    """A depthwise Conv with one filter per channel (of ``c``) is channel-wise: its filters
    follow the channels."""
    return is_depthwise(n) and (n.attr("group", 1) or 1) == c == n.input(1).const_value().shape[0] \
        and (n.input(2) is None or n.input(2).const_value() is not None)


def _spatial_axes(n: Node) -> list[int] | None:
    """Reduced axes of a Reduce* op over a 4-D tensor, if they are all spatial (2 and 3)."""
    axes = reduce_axes(n)
    if not axes:
        return None
    axes = sorted(a % 4 for a in axes)
    return axes if set(axes) <= {2, 3} else None


def _desc(v: Value) -> str:
    p = v.producer
    return f"{p.op_type} {p.name!r}" if p is not None else f"graph input {v.name!r}"


class Group:
    """Convs whose filters must be pruned together, every activation carrying their channels
    (with its layout), the ops with per-channel parameters on those activations, and the readers
    whose input channels shrink."""

    def __init__(self) -> None:
        self.roots: list[int] = []
        self.producers: list[Node] = []
        self.values: list[Value] = []
        self.param_ops: list[tuple[Node, Value]] = []
        self.readers: list[tuple[Node, str, int, Value]] = []  # node, "conv"|"fc", rows per channel, source
        self.flattens: list[Node] = []
        self.layout: dict[int, Layout] = {}
        self.reason: str | None = None
        self.slices = 1  # kept filters are spread evenly over this many contiguous slices

    @property
    def key(self) -> frozenset[str]:
        return frozenset(p.name for p in self.producers)

    def keep_mask(self, v: Value, keep: np.ndarray) -> np.ndarray:
        """Positions of ``v``'s channels that stay when the group keeps filters ``keep``."""
        src, pos = self.layout[id(v)]
        return ~(np.isin(src, self.roots) & ~np.isin(pos, keep))


def find_groups(graph: Graph) -> list[Group]:
    """Channel groups of the main graph, by propagating channel layouts in topological order."""
    parent: list[int] = []
    root_len: list[int] = []
    root_conv: list[Node | None] = []
    bad: dict[int, str] = {}
    layout: dict[int, Layout] = {}
    vals: dict[int, Value] = {}
    through: dict[int, str] = {}  # node id -> role of its data inputs ("pass", "param", "concat")
    slices: dict[int, set[int]] = {}  # root -> group counts of grouped convs making or reading it
    why_not: dict[int, str] = {}

    def new_root(c: int, conv: Node | None = None, why: str | None = None) -> int:
        r = len(parent)
        parent.append(r)
        root_len.append(c)
        root_conv.append(conv)
        if why:
            bad[r] = why
        return r

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def set_layout(v: Value, lay: Layout) -> None:
        layout[id(v)] = lay
        vals[id(v)] = v

    def lay(v: Value | None) -> Layout | None:
        if v is None or v.is_const() or v.shape is None or len(v.shape) != 4:
            return None
        if id(v) not in layout:
            c = v.shape[1]
            if not isinstance(c, int):
                return None
            r = new_root(c, why=f"joined with {_desc(v)}, whose channels graphopt cannot change")
            set_layout(v, (np.full(c, r), np.arange(c)))
        return layout[id(v)]

    def mark(src: np.ndarray, why: str) -> None:
        for r in np.unique(src):
            bad.setdefault(find(int(r)), why)

    def join(a: Layout, b: Layout, node: Node) -> None:
        pairs = np.unique(np.stack([a[0], b[0]]), axis=1)
        for ra, rb in pairs.T:
            x, y = find(int(ra)), find(int(rb))
            if x != y:
                parent[x] = y
                if x in bad:
                    bad.setdefault(y, bad[x])
        if (a[1] != b[1]).any() or len({root_len[int(r)] for r in np.unique(np.concatenate([a[0], b[0]]))}) > 1:
            mark(a[0], f"{node.op_type} {node.name!r} joins channels out of order")

    for n in graph:
        if n.domain not in _STD or not n.outputs or n.output(0).shape is None or len(n.output(0).shape) != 4:
            continue
        out, op = n.output(0), n.op_type
        x = lay(n.input(0)) if n.inputs else None
        if x is not None and op == "Conv" and _depthwise(n, len(x[0])):
            set_layout(out, x)
            through[id(n)] = "param"
        elif _prunable_conv(n) and x is not None:
            c = n.input(1).const_value().shape[0]
            r = new_root(c, conv=n)
            if (n.attr("group", 1) or 1) > 1:  # a grouped conv's filters come in `group` slices
                slices.setdefault(r, set()).add(int(n.attr("group")))
            set_layout(out, (np.full(c, r), np.arange(c)))
        elif x is not None and (op in CHANNEL_WISE or (op in SPATIAL_REDUCE and n.attr("keepdims", 1)
                                                       and _spatial_axes(n))):
            if op == "BatchNormalization" and any(i is None or i.const_value() is None for i in n.inputs[1:5]):
                why_not[id(n)] = "its parameters are not constant"
            elif op == "Clip" and any(i is not None and not i.is_const() for i in n.inputs[1:]):
                why_not[id(n)] = "its bounds are not constant"
            elif op == "PRelu" and (n.input(1).const_value() is None or n.input(1).const_value().size != 1):
                why_not[id(n)] = "its slope is per channel"
            else:
                set_layout(out, x)
                through[id(n)] = "param" if op == "BatchNormalization" else "pass"
        elif op in PER_CHANNEL_BINARY | ELEMENTWISE_JOIN:
            data = [v for v in n.inputs if v is not None and not v.is_const()]
            consts = [v for v in n.inputs if v is not None and v.is_const()]
            lays = [lay(v) for v in data]
            c = out.shape[1]
            if not data or any(v is None for v in lays) or not isinstance(c, int):
                continue
            if any(len(v[0]) != c for v in lays):
                for v in lays:
                    mark(v[0], f"{op} {n.name!r} broadcasts over channels")
                continue
            if consts and (op not in PER_CHANNEL_BINARY or len(data) != 1 or _per_channel_const(n, c) is None):
                mark(lays[0][0], f"{op} {n.name!r} has a constant that is not per channel")
                continue
            for other in lays[1:]:
                join(lays[0], other, n)
            set_layout(out, lays[0])
            through[id(n)] = "param" if consts and consts[0].const_value().size > 1 else "pass"
        elif op == "Concat" and (n.attr("axis", 0) or 0) % 4 == 1:
            lays = [lay(v) for v in n.inputs]
            if all(v is not None for v in lays):
                set_layout(out, (np.concatenate([v[0] for v in lays]), np.concatenate([v[1] for v in lays])))
                through[id(n)] = "concat"

    readers: dict[int, list[tuple[Node, str, int, Value]]] = {}
    params: dict[int, list[tuple[Node, Value]]] = {}
    flattens: dict[int, list[Node]] = {}
    for vid, v in vals.items():
        src = layout[vid][0]
        if v.is_graph_output() or v.producer is None:
            mark(src, "reaches a graph input or output")
            continue
        for r in v.consumers():
            role = through.get(id(r))
            if role is not None:
                if role == "param":
                    params.setdefault(vid, []).append((r, v))
                continue
            if _prunable_conv(r) and r.input(0) is v:
                grp = int(r.attr("group", 1) or 1)
                if grp > 1:  # input slices of a grouped reader must shrink alike: one root, in order
                    src_v, pos_v = layout[vid]
                    if len(np.unique(src_v)) != 1 or (pos_v != np.arange(len(pos_v))).any():
                        mark(src_v, f"grouped Conv {r.name!r} reads channels of several Convs")
                        continue
                    slices.setdefault(int(src_v[0]), set()).add(grp)
                readers.setdefault(vid, []).append((r, "conv", 1, v))
                continue
            fc = _flatten_reader(r, v)
            if fc is not None:
                readers.setdefault(vid, []).append((fc[0], "fc", fc[1], v))
                flattens.setdefault(vid, []).append(r)
                continue
            extra = f" ({why_not[id(r)]})" if id(r) in why_not else ""
            mark(src, f"read by {r.op_type} {r.name!r}, which must keep its channels aligned{extra}")
    groups: dict[int, Group] = {}
    for r in range(len(parent)):
        g = groups.setdefault(find(r), Group())
        g.roots.append(r)
        if root_conv[r] is not None:
            g.producers.append(root_conv[r])
    for r, g in groups.items():  # the class root's reason first, else any member's
        g.reason = bad.get(r) or next((bad[x] for x in g.roots if x in bad), None)
        need = set().union(*(slices.get(x, set()) for x in g.roots))
        if len(need) > 1 and g.reason is None:
            g.reason = f"grouped convs with different group counts {sorted(need)} share these channels"
        g.slices = max(need) if need else 1
    for vid, v in vals.items():
        for cls in {find(int(r)) for r in np.unique(layout[vid][0])}:
            g = groups[cls]
            g.values.append(v)
            g.layout[vid] = layout[vid]
            g.readers.extend(readers.get(vid, []))
            g.param_ops.extend(params.get(vid, []))
            g.flattens.extend(flattens.get(vid, []))
    out_groups = []
    for g in groups.values():
        if not g.producers:
            continue
        if not g.readers and not g.reason:
            g.reason = "no reader whose input channels can shrink"
        out_groups.append(g)
    return out_groups


def _flatten_reader(r: Node, v: Value) -> tuple[Node, int] | None:
    """(Gemm/MatMul, rows per channel) if ``r`` flattens static [N, C, H, W] ``v`` (Flatten,
    Reshape to [N, -1], or a spatial ReduceMean/Max without keepdims) straight into a
    Gemm/MatMul with constant weights."""
    if v.shape is None or not all(isinstance(d, int) for d in v.shape[1:]):
        return None
    _, c_, h_, w_ = v.shape
    o = r.output(0) if r.outputs else None
    fc = o.consumers()[0] if o is not None and len(o.consumers()) == 1 and not o.is_graph_output() else None
    if fc is None or fc.op_type not in ("Gemm", "MatMul") or fc.input(0) is not o or fc.attr("transA", 0) \
            or fc.input(1) is None or fc.input(1).const_value() is None or fc.input(1).const_value().ndim != 2:
        return None
    if r.op_type in SPATIAL_REDUCE and not r.attr("keepdims", 1) and _spatial_axes(r) == [2, 3] \
            and r.input(0) is v:
        return fc, 1
    tgt = r.input(1).const_value() if r.op_type == "Reshape" and r.input(1) is not None else None
    if r.op_type in ("Flatten", "Reshape") and r.input(0) is v and o.shape is not None and len(o.shape) == 2 \
            and o.shape[1] == c_ * h_ * w_ \
            and (r.op_type == "Flatten" and (r.attr("axis", 1) or 1) == 1
                 or (tgt is not None and tgt.size == 2 and int(np.ravel(tgt)[-1]) in (-1, c_ * h_ * w_))):
        return fc, h_ * w_
    return None


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
                       "exclude_nodes": (), "max_samples": 256, "sensitivity": False, "multiple_of": 1}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        r = self.options["ratio"]
        if not isinstance(r, int | float) or not 0 < r < 1:
            raise GraphoptError(f"ratio must be in (0, 1), got {r!r}")
        if self.options["importance"] not in ("l1", "activation"):
            raise GraphoptError("importance must be 'l1' or 'activation'")
        q = self.options["multiple_of"]
        if not isinstance(q, int) or q < 1:
            raise GraphoptError(f"multiple_of must be a positive integer, got {q!r}")
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
            names = sorted({p.output(0).name for g in groups for p in g.producers}
                           | {r.output(0).name for g in groups for r, _, _, _ in g.readers})
            acts = self._collect(names, ctx)
            targets = {r.output(0).name: acts[r.output(0).name] for g in groups for r, _, _, _ in g.readers}
        recover = have_data and self.options["recover"]
        self._out_keep: dict[Node, np.ndarray] = {}
        self._touched: list[Value] = []
        ratios = {id(g): self.options["ratio"] for g in groups}
        if self.options["sensitivity"]:
            if not have_data:
                raise GraphoptError("sensitivity=True needs calibration data")
            ratios = self._spread(groups, ctx)
        # channels to keep, ranked on the original model for every group before any rewrite
        plan: list[tuple[frozenset[str], np.ndarray, int]] = []
        for g in groups:
            keep, c, why = self._keep(g, ratios[id(g)], acts)
            if keep is None:
                for p in g.producers:
                    skipped[p.name or "Conv"] = why
                continue
            plan.append((g.key, keep, c))
        done = {}
        for key, k, c in plan:
            # the layouts change as groups are pruned (concatenations shrink): find them again
            g = next((h for h in find_groups(graph) if h.key == key), None)
            if g is None or g.reason:
                for name in key:
                    skipped[name] = g.reason if g is not None else "its channel group changed while pruning"
                continue
            # progressive recovery: the readers' inputs as the model computes them *now*
            # (earlier groups already pruned), their outputs as the original model computed them
            cur = self._collect(sorted({r.input(0).name for r, _, _, _ in g.readers}), ctx) if recover else {}
            self._apply(graph, g, k, cur, targets if recover else {})
            for p in g.producers:
                done[p.name or "Conv"] = f"{len(k)}/{c}"
        for v in self._touched:  # shapes of pruned activations changed: forget them, re-infer
            if not v.is_graph_output() and not v.is_graph_input():
                v.shape = None
        infer_shapes(self.model, ctx.input_shapes or None)
        self.report = {**{k: v for k, v in self.report.items() if k == "sensitivity"},
                       "pruned": done, "skipped": skipped, "recovered": recover,
                       "groups": sum(1 for g in groups if any((p.name or "Conv") in done for p in g.producers)),
                       "concat_groups": sum(1 for g in groups if any((p.name or "Conv") in done for p in g.producers)
                                            and any(v.producer is not None and v.producer.op_type == "Concat"
                                                    for v in g.values)),
                       "multi_producer_groups": sum(1 for g in groups if len(g.producers) > 1
                                                    and any((p.name or "Conv") in done for p in g.producers))}
        return bool(done)

    def _keep(self, g: Group, ratio: float, acts: dict[str, np.ndarray]) -> tuple[np.ndarray | None, int, str]:
        """The filters group ``g`` keeps at ``ratio`` (sorted), its channel count, and why not
        when it cannot be pruned. Importance: summed normalized filter L1 norms of the
        producers, times the mean |activation| per channel with ``importance='activation'``."""
        ws = [p.input(1).const_value() for p in g.producers]
        c = ws[0].shape[0]
        if any(w.shape[0] != c for w in ws):
            return None, c, "producers disagree on the channel count"
        n_keep = max(self.options["min_channels"], int(round(c * (1 - ratio))))
        q = int(np.lcm(self.options["multiple_of"], g.slices))
        if q > 1:  # SIMD blocks of channels (a partial block costs a whole one) / conv groups
            n_keep = max(q, int(round(n_keep / q)) * q)
        if n_keep >= c:
            return None, c, "too few channels to prune"
        score = np.zeros(c)
        for p, w in zip(g.producers, ws, strict=True):
            norm = np.abs(w).reshape(c, -1).sum(1)
            norm = norm / max(norm.max(), 1e-12)
            a = acts.get(p.output(0).name)
            if self.options["importance"] == "activation" and a is not None:
                norm = norm * np.abs(a).mean(axis=tuple(i for i in range(a.ndim) if i != 1))
            score += norm
        if g.slices > 1:  # grouped convs: the same number of filters from every slice
            per, size = n_keep // g.slices, c // g.slices
            keep = np.concatenate([j * size + np.argsort(-score[j * size:(j + 1) * size])[:per]
                                   for j in range(g.slices)])
        else:
            keep = np.argsort(-score)[:n_keep]
        return np.sort(keep), c, ""

    def _spread(self, groups: list[Group], ctx: PassContext) -> dict[int, float]:
        """Per-group ratios: prune each group alone (on a copy) at the target ratio, measure the
        relative output error on calibration data, and give less sensitive groups more pruning -
        ratios proportional to 1/sqrt(error), scaled so their channel-weighted mean is the target."""
        from graphopt.analysis import infer_shapes
        from graphopt.runtime import ort_session

        assert self.model is not None
        samples = load_calibration(ctx.calibration, self.model)[:16]
        sess = ort_session(self.model)
        ins = {i.name for i in sess.get_inputs()}
        ref = [sess.run(None, {k: v for k, v in s.items() if k in ins}) for s in samples]
        target = self.options["ratio"]
        sens: dict[int, float] = {}
        for g in groups:
            trial = self.model.copy()
            infer_shapes(trial, ctx.input_shapes or None)
            tg = next((h for h in find_groups(trial.graph) if h.key == g.key and not h.reason), None)
            k = self._keep(tg, target, {})[0] if tg is not None else None
            if k is None:
                sens[id(g)] = 1.0
                continue
            self._out_keep, self._touched = {}, []
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
        """Keep filters ``k`` of the group's producers and drop the matching positions downstream."""
        def const(v: Value, arr: np.ndarray, tag: str = "_pruned") -> Value:
            return graph.add_initializer(v.name + tag, arr.astype(v.const_value().dtype))

        for p in g.producers:
            self._out_keep[p] = k  # readers refit later compare against these channels only
            p.set_input(1, const(p.input(1), p.input(1).const_value()[k]))
            if p.input(2) is not None and p.input(2).const_value() is not None:
                p.set_input(2, const(p.input(2), p.input(2).const_value()[k]))
        for n, v in g.param_ops:
            m = g.keep_mask(v, k)
            if m.all():
                continue
            if n.op_type == "BatchNormalization":
                for i in range(1, 5):
                    n.set_input(i, const(n.input(i), n.input(i).const_value()[m]))
            elif n.op_type == "Conv":  # depthwise: one filter per channel, and as many groups
                n.set_input(1, const(n.input(1), n.input(1).const_value()[m]))
                if n.input(2) is not None:
                    n.set_input(2, const(n.input(2), n.input(2).const_value()[m]))
                n.set_attr("group", int(m.sum()))
            else:
                ci = _per_channel_const(n, len(m))
                arr = n.input(ci).const_value() if ci is not None else None
                if arr is not None and arr.size > 1:
                    n.set_input(ci, const(n.input(ci), np.compress(m, arr, axis=_channel_axis(arr))))
        for r, kind, hw, src in g.readers:
            m = g.keep_mask(src, k)
            if m.all():
                continue
            keep = np.flatnonzero(m)
            wr = r.input(1).const_value().astype(np.float64)
            x = cur.get(r.input(0).name)
            y = targets.get(r.output(0).name)
            if y is not None and r in self._out_keep:
                y = y[:, self._out_keep[r]]  # this reader's own outputs were already cut
            bias = r.input(2).const_value() if r.input(2) is not None and r.input(2).const_value() is not None else None
            grp = int(r.attr("group", 1) or 1) if kind == "conv" else 1
            if grp > 1:  # each group of filters reads its own slice of the input channels
                o_per, i_per = wr.shape[0] // grp, wr.shape[1]
                new = np.concatenate([wr[j * o_per:(j + 1) * o_per][:, m[j * i_per:(j + 1) * i_per]]
                                      for j in range(grp)])
            elif kind == "conv":
                new = wr[:, keep]
                if x is not None and y is not None and x.shape[1] == len(m):
                    yb = y - (bias.reshape(1, -1, 1, 1) if bias is not None else 0)
                    new = self._refit_conv(r, x, keep, wr, yb)
            else:
                rows = (keep[:, None] * hw + np.arange(hw)[None, :]).reshape(-1)
                trans = r.op_type == "Gemm" and r.attr("transB", 0)
                new = wr[:, rows] if trans else wr[rows]
                if x is not None and y is not None:
                    yb = y - (bias.reshape(1, -1) if bias is not None else 0)
                    new = self._refit_fc(x, rows, yb, wr, trans)
            r.set_input(1, const(r.input(1), new))
        for f in g.flattens:  # a Reshape to a static [N, C*H*W] gets the new feature count
            tgt = f.input(1).const_value() if f.op_type == "Reshape" else None
            if tgt is not None and int(tgt[-1]) != -1:
                _, c_, h_, w_ = f.input(0).shape
                new_t = np.array(tgt, dtype=np.int64)
                new_t[-1] = int(g.keep_mask(f.input(0), k).sum()) * h_ * w_
                f.set_input(1, graph.add_initializer(f.input(1).name + "_pruned", new_t))
        self._touched.extend(g.values)
        self._touched.extend(f.output(0) for f in g.flattens)

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
