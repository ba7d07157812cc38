"""Patch-based inference: compute the memory-heaviest stretch of a CNN in horizontal bands.

At batch 1 the peak activation memory of a CNN sits where its tensors are largest, usually at
full resolution near the input (inception's stem: a 64x112x112 conv output and its Relu,
6.1 MiB) or in an early dense block. No topological order lowers it (``schedule-memory``
proves that with its lower bound); computing that stretch in bands of rows does, because the
full-resolution tensors then never exist at once - only one band's, plus the band outputs.

Rule: a *region* is a run of nodes between two points of the node order where exactly one
4-D activation is live (its entry and its exit), every node of which is row-local: Conv and
MaxPool/AveragePool (2-D, explicit or VALID pads, no MaxPool indices), per-pixel ops (Relu and
the other unary activations, BatchNormalization, LRN, Dropout/Identity), Add/Mul/Sub/Div/Max/
Min/Sum of region values or of constants constant along the rows, and channel Concat. For
``B`` bands of the exit's rows, the rows each region value must supply are propagated
backwards (a Conv or pool with kernel ``k``, stride ``s``, dilation ``d`` and top pad ``p``
needs input rows ``[o0*s - p, (o1-1)*s - p + (k-1)*d + 1)``); each band slices the entry's
rows, recomputes the region on them (pads kept only at the image's real borders; a value read
by two consumers that need different rows is sliced for each), and a Concat along the rows
joins the bands. Weights are shared between bands, not copied. Exact: every output pixel is
computed by the same window as before (fp32 noise only, from the runtime's choice of conv
algorithm for the band's size).

The pass finds the node at the peak, tries the regions around it (widened by up to
``max_widen`` live points on each side) with each band count in ``bands``, keeps the
cheapest (fewest bands, then fewest nodes) whose peak is within ``slack`` of the lowest found,
only if the model's peak drops by at least ``min_gain``, and repeats for the new peak up to
``max_rounds`` times. Halo rows are computed twice; ``self.report`` gives the peaks, the
regions and the extra FLOPs. Opt-in (``graphopt optimize --pipeline memory``): it
adds nodes and some compute, a trade for memory-bound targets.
"""

from __future__ import annotations

import logging
from itertools import accumulate
from typing import Any

import numpy as np

from graphopt import Graph, Node, Pass, PassContext, Value, register_pass
from graphopt.analysis import model_stats, peak_memory
from graphopt.ir import np_dtype

from ..common import activation_sizes

log = logging.getLogger(__name__)

POINTWISE = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu",
                       "Softplus", "Softsign", "Mish", "Gelu", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal",
                       "Erf", "Identity", "Dropout", "BatchNormalization", "LRN", "PRelu", "Cast", "Floor", "Ceil",
                       "Round", "Sign", "ThresholdedRelu", "Celu"})
BINARY = frozenset({"Add", "Mul", "Sub", "Div", "Max", "Min", "Sum", "Pow"})
WINDOWED = frozenset({"Conv", "MaxPool", "AveragePool"})


def _shape4(v: Value | None) -> tuple[Any, ...] | None:
    """A 4-D shape whose channels, rows and columns are known; the batch may be symbolic
    (exporters' dynamic batch), and bands never depend on it."""
    s = v.shape if v is not None else None
    if s is None or len(s) != 4 or not all(isinstance(d, int) for d in s[1:]):
        return None
    return tuple(s)


def _resident(v: Value) -> bool:
    """A constant: an initializer, or a ConstantOfShape fill (runtimes fold it at load)."""
    return v.is_const() or v.fill_value() is not None


def _rows_constant(v: Value) -> bool:
    """A constant operand broadcast along the rows (its H axis, counted from the right, is 1)."""
    c = v.const_value()
    shape = c.shape if c is not None else (v.fill_value()[0] if v.fill_value() is not None else None)
    if shape is None:
        return False
    return len(shape) < 2 or shape[-2] == 1


Axis = tuple[int, int, int, int]  # kernel, stride, dilation, begin pad


def _window(n: Node) -> tuple[Axis, Axis] | None:
    """(rows, columns) of a 2-D Conv/pool window, each (kernel, stride, dilation, begin pad),
    or None when it is not 2-D or its pads are implicit (SAME_*)."""
    if n.op_type == "Conv":
        w = _shape4(n.input(1))
        if w is None:
            return None
        ks = w[2:]
    else:
        ks = n.attr("kernel_shape")
        if not ks or len(ks) != 2:
            return None
    auto = n.attr("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "VALID"):
        return None
    pads = list(n.attr("pads") or [0, 0, 0, 0]) if auto == "NOTSET" else [0, 0, 0, 0]
    strides = list(n.attr("strides") or [1, 1])
    dil = list(n.attr("dilations") or [1, 1])
    if len(pads) != 4 or len(strides) != 2 or len(dil) != 2:
        return None
    return tuple((int(ks[a]), int(strides[a]), int(dil[a]), int(pads[a])) for a in (0, 1))  # type: ignore[return-value]


def _span(o0: int, o1: int, axis: Axis) -> tuple[int, int]:
    """Input positions ``[start, end)`` (unclipped: may reach into the pads) that outputs
    ``[o0, o1)`` of a window along ``axis`` read."""
    k, s, d, p = axis
    return o0 * s - p, (o1 - 1) * s - p + (k - 1) * d + 1


def _tileable(n: Node, region_values: set[int]) -> str | None:
    """Why ``n`` cannot be computed band by band, or None if it can."""
    if n.domain not in ("", "ai.onnx") or n.subgraphs():
        return "not a standard op"
    outs = [o for o in n.outputs if o.name]
    if len(outs) != 1 or _shape4(outs[0]) is None:
        if not (n.op_type in ("Dropout", "BatchNormalization") and _shape4(n.output(0)) is not None
                and all(o.num_uses == 0 and not o.is_graph_output() for o in n.outputs[1:])):
            return "needs one 4-D output of known shape"
    acts = [v for v in n.inputs if v is not None and not _resident(v)]
    if any(id(v) not in region_values for v in acts):
        return "reads an activation from outside the region"
    op = n.op_type
    if op in WINDOWED:
        if _window(n) is None:
            return "not a 2-D window with explicit pads"
        if op == "Conv" and (len(acts) != 1 or acts[0] is not n.input(0)):
            return "weights are not constant"
        if op == "AveragePool" and n.attr("ceil_mode", 0) and n.attr("count_include_pad", 0):
            return "ceil_mode with count_include_pad"
        return None
    if op in POINTWISE:
        if len(acts) != 1 or acts[0] is not n.input(0) or (op == "PRelu" and not _rows_constant(n.input(1))):
            return "per-pixel op with parameters that are activations or vary along the rows"
        return None
    if op in BINARY:
        consts = [v for v in n.inputs if v is not None and _resident(v)]
        if not all(_rows_constant(c) for c in consts):
            return "constant operand varies along the rows"
        shapes = {_shape4(v) for v in acts}
        return None if len(shapes) == 1 and acts else "operands of different shapes"
    if op == "Concat":
        axis = int(n.attr("axis", 0))
        return None if axis in (1, -3) and acts and len(acts) == len([v for v in n.inputs if v is not None]) \
            else "concatenates along rows or columns"
    return f"{op} is not row-local"


def _cuts(graph: Graph, order: list[Node]) -> list[tuple[int, Value]]:
    """Points of ``order`` (after node k; k = -1 before the first) where exactly one non-constant
    value is live, and it is a 4-D activation of known shape."""
    last: dict[int, int] = {}
    for k, n in enumerate(order):
        for v in list(n.inputs) + (n.outer_inputs() if n.attrs else []):
            if v is not None and not _resident(v):
                last[id(v)] = k
    for o in graph.outputs:
        last[id(o)] = len(order)
    live: dict[int, Value] = {id(v): v for v in graph.inputs if v.const is None and id(v) in last}
    cuts = []
    if len(live) == 1 and _shape4(next(iter(live.values()))) is not None:
        cuts.append((-1, next(iter(live.values()))))
    for k, n in enumerate(order):
        for o in n.outputs:
            if o.name and id(o) in last and not _resident(o):
                live[id(o)] = o
        for key in [key for key in live if last[key] <= k]:
            del live[key]
        if len(live) == 1:
            (v,) = live.values()
            if _shape4(v) is not None and v.producer is n:
                cuts.append((k, v))
    return cuts


def _compute_nodes(nodes: list[Node]) -> list[Node]:
    """``nodes`` without the producers of constants (ConstantOfShape weights stay where they are)."""
    return [n for n in nodes if not all(_resident(o) for o in n.outputs if o.name)]


def _row_bytes(v: Value, sizes: dict[str, int] | None = None) -> int:
    """Bytes of one row of ``v``: from ``sizes`` (symbolic dims resolved, as schedule-memory
    sizes values) when given, else from the shape with a symbolic batch counted as 1."""
    shape = _shape4(v)
    if sizes is not None and v.name in sizes:
        return sizes[v.name] // shape[2]
    n = 1
    for d in shape:
        n *= d if isinstance(d, int) else 1
    return n // shape[2] * np_dtype(v.dtype).itemsize


Key = tuple[Any, ...]


class _Facts:
    """Memoized per-value and per-node facts for planning (the search plans thousands of times)."""

    def __init__(self, sizes: dict[str, int] | None = None) -> None:
        self.sizes = sizes
        self._memo: dict[tuple[str, int], Any] = {}

    def _get(self, kind: str, obj: Any, fn: Any) -> Any:
        key = (kind, id(obj))
        if key not in self._memo:
            self._memo[key] = fn(obj)
        return self._memo[key]

    def rows(self, v: Value) -> int:
        return self._get("rows", v, lambda x: _shape4(x)[2])

    def row_bytes(self, v: Value) -> int:
        return self._get("row_bytes", v, lambda x: _row_bytes(x, self.sizes))

    def resident(self, v: Value) -> bool:
        return self._get("resident", v, _resident)

    def window(self, n: Node) -> tuple[Axis, Axis] | None:
        return self._get("window", n, lambda x: _window(x) if x.op_type in WINDOWED else None)


def plan_bands(nodes: list[Node], entry: Value, exit_: Value, bands: int, facts: _Facts | None = None
               ) -> list[tuple[str, Any, list[Key], Key, int]]:
    """The steps that compute ``nodes`` (a region from ``entry`` to ``exit_``, in topological
    order) in ``bands`` bands of ``exit_``'s rows: ``(kind, what, input keys, output key,
    output bytes)`` with kind "slice" (what: (start, end) rows), "node" (what: (node, output
    rows)) or "join". Keys name band values; ``("entry",)`` is the entry, ``("joined",)`` the
    result. Planning only: :func:`tile_region` emits the steps, the search measures them."""
    f = facts or _Facts()
    h_out = f.rows(exit_)
    bounds = [round(b * h_out / bands) for b in range(bands + 1)]
    steps: list[tuple[str, Any, list[Key], Key, int]] = []
    finals: list[Key] = []
    sliced: set[Key] = set()
    for b in range(bands):
        need: dict[int, tuple[int, int]] = {id(exit_): (bounds[b], bounds[b + 1])}
        req: dict[tuple[int, int], tuple[int, int]] = {}  # (node index, input index) -> rows read
        for ni in range(len(nodes) - 1, -1, -1):
            n = nodes[ni]
            if id(n.output(0)) not in need:
                continue
            o0, o1 = need[id(n.output(0))]
            win = f.window(n)
            for ii, v in enumerate(n.inputs):
                if v is None or f.resident(v):
                    continue
                if win is not None:
                    lo, hi = _span(o0, o1, win[0])
                    lo, hi = max(0, lo), min(f.rows(v), hi)
                else:
                    lo, hi = o0, o1
                req[(ni, ii)] = (lo, hi)
                prev = need.get(id(v))
                need[id(v)] = (lo, hi) if prev is None else (min(prev[0], lo), max(prev[1], hi))
        have: dict[int, tuple[Key, tuple[int, int]]] = {}
        e0, e1 = need[id(entry)]
        if (e0, e1) == (0, f.rows(entry)):
            have[id(entry)] = (("entry",), (e0, e1))
        else:
            key = (b, id(entry), e0, e1)
            steps.append(("slice", (e0, e1), [("entry",)], key, (e1 - e0) * f.row_bytes(entry)))
            have[id(entry)] = (key, (e0, e1))
        for ni, n in enumerate(nodes):
            out = n.output(0)
            if id(out) not in need:
                continue
            o0, o1 = need[id(out)]
            ins: list[Key] = []
            for ii, v in enumerate(n.inputs):
                if v is None or f.resident(v):
                    continue
                key, (c0, c1) = have[id(v)]
                lo, hi = req[(ni, ii)]
                if (lo, hi) != (c0, c1):
                    sk = (b, id(v), lo, hi)
                    if sk not in sliced:
                        sliced.add(sk)
                        steps.append(("slice", (lo - c0, hi - c0), [key], sk, (hi - lo) * f.row_bytes(v)))
                    key = sk
                ins.append(key)
            okey = (b, id(out), o0, o1)
            steps.append(("node", (n, o0, o1), ins, okey, (o1 - o0) * f.row_bytes(out)))
            have[id(out)] = (okey, (o0, o1))
        finals.append(have[id(exit_)][0])
    steps.append(("join", None, finals, ("joined",), h_out * f.row_bytes(exit_)))
    return steps


def planned_peak(steps: list[tuple[str, Any, list[Key], Key, int]], entry_bytes: int) -> int:
    """Peak live bytes while the planned steps run (the entry live until its last reader)."""
    last: dict[Key, int] = {}
    for k, (_, _, ins, _, _) in enumerate(steps):
        for key in ins:
            last[key] = k
    live, peak, frees = entry_bytes, entry_bytes, {last.get(("entry",), -1): entry_bytes}
    for k, (_, _, _, out, nbytes) in enumerate(steps):
        live += nbytes
        peak = max(peak, live)
        dies = last.get(out, len(steps))
        frees[dies] = frees.get(dies, 0) + nbytes
        live -= frees.pop(k, 0)
    return peak


def tile_region(graph: Graph, nodes: list[Node], entry: Value, exit_: Value, bands: int, opset: int) -> Value:
    """Replace ``nodes`` (a region from ``entry`` to ``exit_``, in topological order) by their
    band-by-band computation (:func:`plan_bands`) joined by a Concat along the rows. Returns
    the joined value, which takes ``exit_``'s place."""
    order = graph.nodes
    k = order.index(nodes[-1])
    anchor = order[k + 1] if k + 1 < len(order) else None
    vals: dict[Key, Value] = {("entry",): entry}
    tag = graph.fresh_name("band")
    ints: dict[int, Value] = {}

    def const(x: int) -> Value:  # one int64 initializer per distinct slice bound
        if x not in ints:
            ints[x] = graph.add_initializer(f"{tag}_{x}", np.array([x], np.int64))
        return ints[x]

    for kind, what, ins, out, _ in plan_bands(nodes, entry, exit_, bands):
        if kind == "slice":
            src = vals[ins[0]]
            start, end = what
            if opset >= 10:
                args = [src, const(start), const(end), const(2)]
                node = graph.make_node("Slice", args, name=graph.fresh_name(f"{tag}_slice"), before=anchor)
            else:
                node = graph.make_node("Slice", [src], {"starts": [start], "ends": [end], "axes": [2]},
                                       name=graph.fresh_name(f"{tag}_slice"), before=anchor)
            ref = src
            rows = end - start
        elif kind == "node":
            n, o0, o1 = what
            it = iter(ins)
            args = [v if v is None or _resident(v) else vals[next(it)] for v in n.inputs]
            attrs = {a: n.attr(a) for a in n.attrs}
            if n.op_type in WINDOWED:
                # pads only where the band's windows reach past the input; the end pads give
                # exactly the band's rows and the original columns, so ceil_mode goes
                rows_axis, cols_axis = _window(n)
                _, h_in, w_in = _shape4(n.input(0))[1:]
                top, bottom = _span(o0, o1, rows_axis)
                left, right = _span(0, _shape4(n.output(0))[3], cols_axis)
                attrs["pads"] = [max(0, -top), max(0, -left), max(0, bottom - h_in), max(0, right - w_in)]
                attrs.pop("auto_pad", None)
                attrs.pop("ceil_mode", None)
            node = graph.make_node(n.op_type, args, attrs, domain=n.domain,
                                   name=graph.fresh_name(f"{n.name or n.op_type}_{tag}"), before=anchor)
            ref = n.output(0)
            rows = o1 - o0
        else:
            node = graph.make_node("Concat", [vals[i] for i in ins], {"axis": 2}, name=graph.fresh_name(f"{tag}_join"),
                                   before=anchor)
            ref = exit_
            rows = _shape4(exit_)[2]
        shape = list(_shape4(ref))
        shape[2] = rows
        node.output(0).shape, node.output(0).dtype = tuple(shape), ref.dtype
        vals[out] = node.output(0)
    joined = vals[("joined",)]
    graph.replace_all_uses_with(exit_, joined)
    for n in reversed(nodes):
        graph.remove(n, safe=False)
    return joined


@register_pass
class SpatialTiling(Pass):
    """Compute the peak-memory stretch of a CNN in bands of rows (patch-based inference)."""

    name = "tile-spatial"
    recursive = False
    default_options = {"bands": (2, 3, 4, 6, 8), "max_widen": 16, "min_gain": 0.05, "max_rounds": 4, "slack": 0.1}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.report: dict[str, Any] = {}
        self.why = ""
        self._sizes: dict[str, int] = {}

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        model = self.model
        if model is None or len(graph) < 3:
            return False
        opset = model.opset("")
        self._sizes = activation_sizes(model, ctx)  # infers shapes if needed; symbols from ctx, or 1
        start = peak_memory(graph, sizes=self._sizes).peak_bytes
        flops0 = model_stats(model).flops
        regions: list[dict[str, Any]] = []
        current = start
        for _ in range(int(self.options["max_rounds"])):
            best = self._best_tiling(graph, current)
            if best is None:
                break
            peak, nodes, entry, exit_, bands, desc = best
            tile_region(graph, nodes, entry, exit_, bands, opset)
            regions.append({**desc, "bands": bands, "peak_after": peak})
            log.info("tile-spatial: %s in %d bands: peak %d -> %d bytes", desc["region"], bands, current, peak)
            current = peak
            self._sizes = activation_sizes(model, ctx)
        if not regions:
            log.info("tile-spatial: nothing banded (%s)", self.why)
        self.report = {"peak_before": start, "peak_after": current, "regions": regions,
                       "why_not": "" if regions else self.why,
                       "flops_before": flops0, "extra_flops": (model_stats(model).flops - flops0) if regions else 0}
        return bool(regions)

    def _best_tiling(self, graph: Graph, current: int
                     ) -> tuple[int, list[Node], Value, Value, int, dict[str, Any]] | None:
        """The cheapest banding of a region around the peak that lowers it enough, as
        (peak, region nodes, entry, exit, bands, description); None (and ``self.why``) if none."""
        order = graph.nodes
        prof = peak_memory(graph, order, sizes=self._sizes)
        names = [n.name or n.op_type for n in order]
        if prof.peak_at not in names:
            return None
        p = names.index(prof.peak_at)
        cuts = _cuts(graph, order)
        left = [c for c, (k, _) in enumerate(cuts) if k < p]
        right = [c for c, (k, _) in enumerate(cuts) if k >= p]
        if not left or not right:
            self.why = f"no point before and after the peak at {prof.peak_at} where a single 4-D tensor is live"
            return None
        self.why = f"no band count lowers the peak at {prof.peak_at} by {self.options['min_gain']:.0%}"
        found: list[tuple[int, list[Node], Value, Value, int, dict[str, Any]]] = []
        widen = int(self.options["max_widen"])
        facts = _Facts(self._sizes)
        # liveness outside a region is unchanged (its ends are single-value cuts)
        before_max = [0, *accumulate(prof.timeline, max)]  # before_max[x]: max of timeline[:x]
        after_max = [*accumulate(reversed(prof.timeline), max)][::-1] + [0]  # max of timeline[x:]
        for i in range(left[-1], max(left[-1] - widen, 0) - 1, -1):
            for j in range(right[0], min(right[0] + widen, len(cuts) - 1) + 1):
                (ka, entry), (kb, exit_) = cuts[i], cuts[j]
                nodes = _compute_nodes(order[ka + 1:kb + 1])
                vals = {id(entry)} | {id(o) for n in nodes for o in n.outputs}
                bad = next(((n, w) for n in nodes if (w := _tileable(n, vals))), None)
                if bad is not None:
                    if (i, j) == (left[-1], right[0]):
                        self.why = f"{bad[0].name or bad[0].op_type}: {bad[1]}"
                    break  # a wider region holds the same node
                outside = max(before_max[ka + 1], after_max[kb + 1])
                for bands in self.options["bands"]:
                    if bands > facts.rows(exit_):
                        continue
                    peak = max(outside, planned_peak(plan_bands(nodes, entry, exit_, bands, facts),
                                                     facts.rows(entry) * facts.row_bytes(entry)))
                    if peak < current * (1 - float(self.options["min_gain"])):
                        desc = {"region": f"{nodes[0].name or nodes[0].op_type} .. {nodes[-1].name or nodes[-1].op_type}",
                                "nodes": len(nodes)}
                        found.append((peak, nodes, entry, exit_, bands, desc))
        if not found:
            return None
        # the cheapest candidate (fewest bands, then fewest nodes) within ``slack`` of the lowest
        # peak: every band adds nodes and halo rows, and small convs run slower
        low = min(f[0] for f in found)
        ok = [f for f in found if f[0] <= low * (1 + float(self.options["slack"]))]
        return min(ok, key=lambda f: (f[4], f[5]["nodes"], f[0]))
