"""Low-rank factorization of MatMul/Gemm weights.

Rule: ``MatMul(x, W)`` with constant W of shape [K, N] (``Gemm`` with alpha = beta = 1 and
transA = 0 likewise, using its transB) becomes ``MatMul(MatMul(x, A), B)`` with A = U_r S_r
[K, r] and B = V_r^T [r, N] from the SVD of W; the bias stays on the second product.

The rank r is chosen per layer:
  * ``energy`` (default 0.9): the smallest r keeping that fraction of the squared singular values;
  * ``flops`` (a fraction): the largest r whose two products cost at most that fraction of K*N;
  * ``max_error`` with calibration data: the smallest r whose layer output error
    ||X W - X A B|| / ||X W|| on the calibration inputs X is at most the budget.

``activation_aware=True`` (with calibration data) factorizes in the metric of the layer's real
inputs: with C = X^T X = L L^T, the SVD of L^T W gives A = L^{-T} U_r S_r, B = V_r^T, which
minimizes ||X W - X A B|| instead of ||W - A B|| (whitened SVD).

Conv layers (``conv=True``): Tucker-2 - a 1x1 conv to r_i channels, the kxk core conv
(r_i -> r_o, the original stride/pads/dilations) and a 1x1 conv back to O channels with the
bias; ranks from each mode's energy (or the FLOPs budget). Exact at full rank.
``conv="spatial"`` separates each kxk Conv (k > 1 in both directions) into a kx1 conv to r
channels followed by a 1xk conv back to O channels (the vertical stride, pads and dilation go to
the first, the horizontal ones to the second): the SVD of W arranged as [I*kh, O*kw], exact at
full rank r = min(I*kh, O*kw), with r from the energy or the FLOPs budget.

Applied only where it cuts FLOPs: r (K + N) < K N (times ``min_gain``). Layers that do not
qualify are left as they are and listed in ``report["skipped"]``. Lossy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import Graph, GraphoptError, Node, Pass, PassContext, register_pass
from graphopt.runtime import collect_values, load_calibration

_STD = ("", "ai.onnx")


def _weight(n: Node) -> tuple[np.ndarray, bool] | None:
    """[K, N] weight of a MatMul/Gemm and whether it came transposed (Gemm transB)."""
    if n.op_type == "MatMul":
        w = n.input(1).const_value() if n.input(1) is not None else None
        return (w, False) if w is not None and w.ndim == 2 and w.dtype == np.float32 else None
    if n.op_type == "Gemm":
        if n.attr("transA", 0) or n.attr("alpha", 1.0) != 1.0 or n.attr("beta", 1.0) != 1.0:
            return None
        w = n.input(1).const_value() if n.input(1) is not None else None
        if w is None or w.ndim != 2 or w.dtype != np.float32:
            return None
        return (w.T, True) if n.attr("transB", 0) else (w, False)
    return None


@register_pass
class LowRankFactorization(Pass):
    """Factor MatMul/Gemm weights into two thinner products where it cuts FLOPs."""

    name = "lowrank"
    recursive = False
    default_options = {"energy": 0.9, "flops": None, "max_error": None, "activation_aware": False,
                       "min_gain": 0.9, "min_size": 1024, "exclude_nodes": (), "conv": True}
    #: ``conv``: True or "tucker" (Tucker-2), "spatial" (kx1 then 1xk), False (MatMul/Gemm only)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        e, f = self.options["energy"], self.options["flops"]
        if e is not None and not 0 < e <= 1:
            raise GraphoptError(f"energy must be in (0, 1], got {e}")
        if f is not None and not 0 < f < 1:
            raise GraphoptError(f"flops must be in (0, 1), got {f}")
        me = self.options["max_error"]
        if me is not None and me <= 0:
            raise GraphoptError(f"max_error must be > 0, got {me}")
        if self.options["conv"] not in (True, False, "tucker", "spatial"):
            raise GraphoptError(f"conv must be True, False, 'tucker' or 'spatial', got {self.options['conv']!r}")
        self.report: dict[str, Any] = {}

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        excl = set(self.options["exclude_nodes"])
        cands = [n for n in graph if n.op_type in ("MatMul", "Gemm") and n.domain in _STD and n.name not in excl
                 and _weight(n) is not None]
        need_data = self.options["activation_aware"] or self.options["max_error"] is not None
        xs: dict[str, np.ndarray] = {}
        if need_data:
            if ctx.calibration is None:
                raise GraphoptError("activation-aware or error-budget low-rank needs calibration data")
            xs = self._inputs(cands, ctx)
        skipped: dict[str, str] = {}
        done: dict[str, int] = {}
        flops_before = flops_after = 0
        for n in cands:
            w, transposed = _weight(n)  # type: ignore[misc]
            k, m = w.shape
            flops_before += k * m
            if w.size < self.options["min_size"]:
                skipped[n.name or n.op_type] = f"weight {k}x{m} is too small to factor"
                flops_after += k * m
                continue
            x = xs.get(n.input(0).name) if need_data else None
            a, b = self._factor(w.astype(np.float64), x)
            r = a.shape[1]
            if r * (k + m) >= self.options["min_gain"] * k * m:
                skipped[n.name or n.op_type] = f"rank {r} of {min(k, m)} would not cut FLOPs"
                flops_after += k * m
                continue
            av = graph.add_initializer((n.name or "w") + "_lr_a", a.astype(np.float32))
            bv = graph.add_initializer((n.name or "w") + "_lr_b", b.astype(np.float32))
            first = graph.make_node("MatMul", [n.input(0), av], before=n, name=graph.fresh_name((n.name or "mm") + "_lr1"))
            second = graph.make_node("MatMul", [first.output(0), bv], before=n,
                                     name=graph.fresh_name((n.name or "mm") + "_lr2"))
            out = second.output(0)
            if n.op_type == "Gemm" and n.input(2) is not None:
                add = graph.make_node("Add", [out, n.input(2)], before=n, name=graph.fresh_name((n.name or "mm") + "_bias"))
                out = add.output(0)
            out.dtype, out.shape = n.output(0).dtype, n.output(0).shape
            graph.replace_all_uses_with(n.output(0), out)
            graph.remove(n)
            done[n.name or n.op_type] = r
            flops_after += r * (k + m)
        conv = self.options["conv"]
        conv_done = self._spatial(graph, skipped) if conv == "spatial" else self._tucker(graph, skipped) if conv else {}
        self.report = {"factored": done, "conv_factored": conv_done, "skipped": skipped,
                       "matmul_flops_ratio": (flops_after / flops_before) if flops_before else 1.0}
        return bool(done or conv_done)

    def _tucker(self, graph: Graph, skipped: dict[str, str]) -> dict[str, tuple[int, int]]:
        """Tucker-2 for Conv: 1x1 (I -> r_i), the kxk core (r_i -> r_o, original stride/pads),
        1x1 (r_o -> O, with the bias). Ranks from the energy of each mode's singular values
        (or the FLOPs budget); only where the three convs cost less than the original."""
        done = {}
        excl = set(self.options["exclude_nodes"])
        from graphopt.progress import progress

        for n in progress(list(graph), desc="lowrank (conv factorization)", unit="node"):
            if n.op_type != "Conv" or n.domain not in _STD or n.name in excl or (n.attr("group", 1) or 1) != 1:
                continue
            w = n.input(1).const_value() if n.input(1) is not None else None
            if w is None or w.ndim != 4 or w.dtype != np.float32 or w.shape[2] * w.shape[3] == 1:
                continue
            if w.size < self.options["min_size"]:
                continue
            o, i, kh, kw = w.shape
            wd = w.astype(np.float64)
            u0, s0, _ = np.linalg.svd(wd.reshape(o, -1), full_matrices=False)
            u1, s1, _ = np.linalg.svd(wd.transpose(1, 0, 2, 3).reshape(i, -1), full_matrices=False)
            if self.options["flops"] is not None:
                f = self.options["flops"]
                r_o = max(1, int(o * np.sqrt(f)))
                r_i = max(1, int(i * np.sqrt(f)))
            else:
                e = self.options["energy"] if self.options["energy"] is not None else 0.9
                r_o = int(np.searchsorted(np.cumsum(s0 ** 2) / np.sum(s0 ** 2), e) + 1)
                r_i = int(np.searchsorted(np.cumsum(s1 ** 2) / np.sum(s1 ** 2), e) + 1)
            r_o, r_i = min(r_o, o), min(r_i, i)
            cost = i * r_i + r_i * r_o * kh * kw + r_o * o  # per output pixel (1x1 at input res ~ same)
            if cost >= self.options["min_gain"] * o * i * kh * kw:
                skipped[n.name or "Conv"] = f"Tucker ranks ({r_i}, {r_o}) would not cut FLOPs"
                continue
            uo, ui = u0[:, :r_o], u1[:, :r_i]
            core = np.einsum("oikl,or,is->rskl", wd, uo, ui)  # [r_o, r_i, kh, kw]
            first = graph.add_initializer((n.name or "conv") + "_t1", ui.T.reshape(r_i, i, 1, 1).astype(np.float32))
            mid = graph.add_initializer((n.name or "conv") + "_t2", core.astype(np.float32))
            last = graph.add_initializer((n.name or "conv") + "_t3", uo.reshape(o, r_o, 1, 1).astype(np.float32))
            attrs = {k: n.attr(k) for k in n.attrs if k not in ("kernel_shape",)}
            c1 = graph.make_node("Conv", [n.input(0), first], before=n, name=graph.fresh_name((n.name or "conv") + "_t1"))
            c2 = graph.make_node("Conv", [c1.output(0), mid], attrs, before=n,
                                 name=graph.fresh_name((n.name or "conv") + "_t2"))
            ins = [c2.output(0), last] + ([n.input(2)] if n.input(2) is not None else [])
            c3 = graph.make_node("Conv", ins, before=n, name=graph.fresh_name((n.name or "conv") + "_t3"))
            c3.output(0).dtype, c3.output(0).shape = n.output(0).dtype, n.output(0).shape
            graph.replace_all_uses_with(n.output(0), c3.output(0))
            graph.remove(n)
            done[n.name or "Conv"] = (r_i, r_o)
        return done

    def _spatial(self, graph: Graph, skipped: dict[str, str]) -> dict[str, int]:
        """kxk Conv -> kx1 (I -> r) then 1xk (r -> O): W[o, i, a, b] = sum_r V[r, i, a] H[o, r, b]."""
        done: dict[str, int] = {}
        excl = set(self.options["exclude_nodes"])
        from graphopt.progress import progress

        for n in progress(list(graph), desc="lowrank (conv factorization)", unit="node"):
            if n.op_type != "Conv" or n.domain not in _STD or n.name in excl or (n.attr("group", 1) or 1) != 1:
                continue
            w = n.input(1).const_value() if n.input(1) is not None else None
            if w is None or w.ndim != 4 or w.dtype != np.float32 or min(w.shape[2:]) < 2 \
                    or w.size < self.options["min_size"] or isinstance(n.attr("auto_pad"), str) \
                    and n.attr("auto_pad") not in ("NOTSET", ""):
                continue
            o, i, kh, kw = w.shape
            sh, sw = n.attr("strides") or [1, 1]
            dh, dw = n.attr("dilations") or [1, 1]
            pt, pl, pb, pr = n.attr("pads") or [0, 0, 0, 0]
            u, s, vt = np.linalg.svd(w.astype(np.float64).transpose(1, 2, 0, 3).reshape(i * kh, o * kw),
                                     full_matrices=False)
            per_r = i * kh * sw + o * kw  # MACs per output pixel and separable rank (the kx1 runs at sw x width)
            if self.options["flops"] is not None:
                r = max(1, int(self.options["flops"] * o * i * kh * kw / per_r))
            else:
                e = self.options["energy"] if self.options["energy"] is not None else 0.9
                r = int(np.searchsorted(np.cumsum(s ** 2) / max(np.sum(s ** 2), 1e-30), e) + 1)
            r = min(r, len(s))
            if r * per_r >= self.options["min_gain"] * o * i * kh * kw:
                skipped[n.name or "Conv"] = f"separable rank {r} would not cut FLOPs"
                continue
            root = np.sqrt(s[:r])
            vert = (u[:, :r] * root).reshape(i, kh, r).transpose(2, 0, 1)[..., None]  # [r, I, kh, 1]
            horiz = (root[:, None] * vt[:r]).reshape(r, o, kw).transpose(1, 0, 2)[:, :, None, :]  # [O, r, 1, kw]
            name = n.name or "conv"
            c1 = graph.make_node("Conv", [n.input(0), graph.add_initializer(name + "_v", vert.astype(np.float32))],
                                 {"strides": [sh, 1], "pads": [pt, 0, pb, 0], "dilations": [dh, 1]},
                                 before=n, name=graph.fresh_name(name + "_v"))
            ins = [c1.output(0), graph.add_initializer(name + "_h", horiz.astype(np.float32))]
            ins += [n.input(2)] if n.input(2) is not None else []
            c2 = graph.make_node("Conv", ins, {"strides": [1, sw], "pads": [0, pl, 0, pr], "dilations": [1, dw]},
                                 before=n, name=graph.fresh_name(name + "_h"))
            c2.output(0).dtype, c2.output(0).shape = n.output(0).dtype, n.output(0).shape
            graph.replace_all_uses_with(n.output(0), c2.output(0))
            graph.remove(n)
            done[n.name or "Conv"] = r
        return done

    # -- choosing the rank ----------------------------------------------------------------------
    def _factor(self, w: np.ndarray, x: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        k, m = w.shape
        if self.options["activation_aware"] and x is not None:
            c = x.T @ x / max(len(x), 1) + 1e-6 * np.eye(k)
            lower = np.linalg.cholesky(c)
            u, s, vt = np.linalg.svd(lower.T @ w, full_matrices=False)
            back = np.linalg.solve(lower.T, np.eye(k))  # L^{-T}
        else:
            u, s, vt = np.linalg.svd(w, full_matrices=False)
            back = None
        r = self._rank(s, k, m, u, vt, back, w, x)
        a = (u[:, :r] * s[:r])
        if back is not None:
            a = back @ a
        return a, vt[:r]

    def _rank(self, s: np.ndarray, k: int, m: int, u: np.ndarray, vt: np.ndarray, back: np.ndarray | None,
              w: np.ndarray, x: np.ndarray | None) -> int:
        full = len(s)
        if self.options["max_error"] is not None and x is not None:
            ref = x @ w
            norm = max(np.linalg.norm(ref), 1e-12)
            for r in range(1, full + 1):
                a = u[:, :r] * s[:r]
                if back is not None:
                    a = back @ a
                if np.linalg.norm(ref - (x @ a) @ vt[:r]) / norm <= self.options["max_error"]:
                    return r
            return full
        if self.options["flops"] is not None:
            return max(1, min(full, int(self.options["flops"] * k * m / (k + m))))
        energy = np.cumsum(s ** 2) / max(np.sum(s ** 2), 1e-30)
        return int(min(full, np.searchsorted(energy, self.options["energy"]) + 1))

    def _inputs(self, nodes: list[Node], ctx: PassContext) -> dict[str, np.ndarray]:
        """Rows of every candidate's input on the calibration data (last axis = features)."""
        assert self.model is not None
        samples = load_calibration(ctx.calibration, self.model)[:64]
        values = collect_values(self.model, sorted({n.input(0).name for n in nodes}), samples)
        return {k: a.reshape(-1, a.shape[-1]) for k, a in values.items()}
