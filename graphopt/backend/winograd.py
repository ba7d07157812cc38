"""Winograd convolutions: 3x3, stride-1 channels-last convolutions as transform, batched matmul,
transform (CPU).

Why: the 3x3 convolutions are half the multiply-adds of the light CNNs (SqueezeNet's expand
convs), and a direct convolution cannot beat ONNX Runtime's MLAS kernels by much: both run near
one core's peak of fused multiply-adds. Winograd's minimal filtering F(m x m, 3 x 3) computes an
``m x m`` output tile from an ``(m + 2) x (m + 2)`` input tile with ``(m + 2)^2`` multiplies per
channel pair instead of ``9 m^2``: 2.25x fewer for m = 2, 4x for m = 4. ORT's float convolutions
do not use it.

The rewrite (Relax, after the layout conversion, weights constant):

1. the weight transform ``U = G w G^T`` is computed here, in numpy, once: ``[a*a, CI, CO]``;
2. the input transform ``V = B^T d B`` of every input tile: a TE kernel ``[a*a, N, TH, TW, CI]``;
3. ``M = V @ U``: a batched matmul ``[a*a, N*TH*TW, CI] x [a*a, CI, CO]`` (reshapes of the
   transforms' tensors: views, no copies), which the tiled-reduction rule schedules like any
   other;
4. the output transform ``Y = A^T M A``: a TE kernel writing ``[N, H, W, CO]``; the convolution's
   bias and activation fuse into it.

The transforms are written with every coefficient a constant of the expression, selected by the
alpha (input) or output-phase (output) indices; :class:`graphopt.backend.schedules.WinogradRule`
unrolls those loops so the selection folds away and the channel loop is vectorized.

Accuracy: the products are the same sums, reassociated through the transforms; F(2, 3)'s
coefficients are 0, +-1 and 1/2 (exact in float), F(4, 3)'s grow to 8 and 1/24, worth a few ulps
more (about 6e-6 of the output's range after 12 layers of 64 channels, against 6e-7 direct). Both
stay well inside graphopt's lossless check against ORT on the corpus. An infinite input value
makes its whole output tile NaN (the transforms subtract it from itself) where the direct
convolution gives inf in the outputs it touches.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: name prefixes of the transform kernels (PrimFuncs and their blocks)
INPUT_TRANSFORM = "winograd_input"
OUTPUT_TRANSFORM = "winograd_output"
#: the block annotation holding the transform's output tile m
TILE_ATTR = "graphopt.winograd_tile"

# Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2015): F(2, 3) on the points
# 0, 1, -1; F(4, 3) on 0, 1, -1, 2, -2 (both with the point at infinity).
_MATRICES: dict[int, tuple[list[list[float]], list[list[float]], list[list[float]]]] = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
         [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
         [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}


def matrices(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(B^T, G, A^T)`` of F(m, 3) (float64): ``y = A^T [(G g) * (B^T d)]`` is the correlation
    of the ``m + 2`` inputs ``d`` with the 3 taps ``g``."""
    if m not in _MATRICES:
        raise ValueError(f"Winograd F({m}, 3) is not available (2 or 4)")
    bt, g, at = _MATRICES[m]
    return np.array(bt, np.float64), np.array(g, np.float64), np.array(at, np.float64)


def transform_weight(w: np.ndarray, m: int) -> np.ndarray:
    """``U[a * alpha + b, ci, co] = (G w[:, :, ci, co] G^T)[a, b]`` for an HWIO 3x3 weight."""
    _, g, _ = matrices(m)
    u = np.einsum("ak,klio,bl->abio", g, w.astype(np.float64), g)
    alpha = g.shape[0]
    return u.reshape(alpha * alpha, w.shape[2], w.shape[3]).astype(w.dtype)


def _combination(coeffs: list[tuple[float, Any]]) -> Any:
    """``sum(c * x)`` with the +-1 coefficients as plain adds and subtracts."""
    from tvm import tirx

    expr = None
    for c, x in coeffs:
        if c == 1:
            term, neg = x, False
        elif c == -1:
            term, neg = x, True
        else:
            term, neg = x * tirx.const(abs(c), x.dtype), c < 0
        if expr is None:
            expr = -term if neg else term
        else:
            expr = expr - term if neg else expr + term
    return expr


def _select(index: Any, branches: list[Any]) -> Any:
    """``branches[index]`` as a chain of selects on a loop index (folded once it is unrolled)."""
    from tvm import tirx

    expr = branches[-1]
    for k in range(len(branches) - 2, -1, -1):
        expr = tirx.Select(index == k, branches[k], expr)
    return expr


def input_transform(x: Any, m: int, pads: tuple[int, int, int, int]) -> Any:
    """TE: ``V[a * alpha + b, n, th, tw, c]`` of the NHWC input ``x``: tile (th, tw) read at
    rows ``th * m - pad_top + i`` and columns ``tw * m - pad_left + j`` (zero outside)."""
    from tvm import te, topi

    bt, _, _ = matrices(m)
    alpha = m + 2
    n, h, w, c = (int(d) for d in x.shape)
    pt, pl, pb, pr = pads
    oh, ow = h + pt + pb - 2, w + pl + pr - 2
    th_n, tw_n = -(-oh // m), -(-ow // m)
    # padded so that every tile is whole: rows up to th_n * m + 2
    xp = topi.nn.pad(x, [0, pt, pl, 0], [0, th_n * m + 2 - h - pt, tw_n * m + 2 - w - pl, 0],
                     name=f"{INPUT_TRANSFORM}_pad")

    def f(ab: Any, b_: Any, th: Any, tw: Any, ch: Any) -> Any:
        rows = []
        for a in range(alpha):
            cols = []
            for b in range(alpha):
                terms = [(bt[a, i] * bt[b, j], xp[b_, th * m + i, tw * m + j, ch])
                         for i in range(alpha) for j in range(alpha) if bt[a, i] != 0 and bt[b, j] != 0]
                cols.append(_combination(terms))
            rows.append(cols)
        return _select(ab, [rows[k // alpha][k % alpha] for k in range(alpha * alpha)])

    return te.compute((alpha * alpha, n, th_n, tw_n, c), f, name=INPUT_TRANSFORM, attrs={TILE_ATTR: m})


def output_transform(mm: Any, m: int, shape: tuple[int, int, int, int]) -> Any:
    """TE: ``Y[n, h, w, co]`` (NHWC, ``shape``) from the batched product ``M[a * alpha + b, n, th,
    tw, co]``."""
    from tvm import te

    _, _, at = matrices(m)
    alpha = m + 2
    n, oh, ow, co = shape

    def f(b_: Any, y: Any, x: Any, ch: Any) -> Any:
        phases = []
        for i in range(m):
            for j in range(m):
                terms = [(at[i, a] * at[j, b], mm[a * alpha + b, b_, y // m, x // m, ch])
                         for a in range(alpha) for b in range(alpha) if at[i, a] != 0 and at[j, b] != 0]
                phases.append(_combination(terms))
        return _select((y % m) * m + x % m, phases)

    return te.compute((n, oh, ow, co), f, name=OUTPUT_TRANSFORM, attrs={TILE_ATTR: m})


def is_transform(func: Any) -> bool:
    """Is the PrimFunc ``func`` (fused or not) a Winograd input or output transform?"""
    import tvm_ffi
    from tvm import s_tir

    found: list[Any] = []

    def visit(block: Any) -> None:
        if TILE_ATTR in block.annotations:
            found.append(block)

    tvm_ffi.structural_walk(func.body, (s_tir.SBlock, visit), order="post")
    return bool(found)


def _eligible(call: Any) -> str:
    """Why a ``conv2d`` call is not a Winograd candidate ("" if it is)."""
    a = call.attrs
    x, w = call.args
    xs, ws = getattr(x.ty, "shape", None), getattr(w.ty, "shape", None)
    if not hasattr(xs, "values") or not hasattr(ws, "values"):  # unknown, or a shape variable
        return "dynamic shape"
    if not all(isinstance(getattr(d, "value", None), int) for d in [*xs.values, *ws.values]):
        return "dynamic shape"
    if (a.data_layout, a.kernel_layout) != ("NHWC", "HWIO") or a.out_layout not in ("NHWC", ""):
        return "layout"
    if str(x.ty.dtype) != "float32" or (a.out_dtype and str(a.out_dtype) not in ("float32", "", "void")):
        return "dtype"
    if int(a.groups) != 1 or any(int(s) != 1 for s in a.strides) or any(int(d) != 1 for d in a.dilation):
        return "groups/stride/dilation"
    if [int(d) for d in ws.values[:2]] != [3, 3]:
        return "kernel size"
    return ""


def choose_tile(n: int, oh: int, ow: int, ci: int, co: int, min_tiles: int = 16) -> int:
    """The output tile m for a 3x3 convolution (0: keep it direct).

    F(4, 3) wherever the batched matmul has at least ``min_tiles`` rows (tiles): on SqueezeNet's
    expand convolutions (16-64 input channels, 13x13 to 55x55 outputs) it measured 0.47-0.78x of
    ONNX Runtime's direct convolution on one core, F(2, 3) 0.67-1.20x, even at 13x13 where
    F(4, 3)'s 16 tiles cover 51% more than the output. Its transformed weight is 4x the direct
    one (36 / 9) and is read once per call: with fewer tiles to reuse it (a 7x7 map), F(2, 3)
    (16 / 9), and below that the direct convolution. With few channels the batched matmul is too
    short to pay for moving the transformed tiles through memory."""
    if ci < 8 or co < 16:
        return 0
    for m in (4, 2):
        if min(oh, ow) >= m and n * -(-oh // m) * -(-ow // m) >= min_tiles:
            return m
    return 0


def _mutator_class() -> Any:
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from .layout import _const_array

    @mutator
    class _Winograd(PyExprMutator):  # type: ignore[misc]
        def __init__(self, mod: Any = None, tile: int | None = None) -> None:
            super().__init__(mod)
            self.tile = tile
            self.changed: list[tuple[tuple[int, ...], int]] = []
            self.skipped: list[str] = []

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d":
                return call
            why = _eligible(call)
            if why:
                if why not in ("layout", "kernel size", "groups/stride/dilation"):  # not 3x3 stride-1 convs at all
                    self.skipped.append(why)
                return call
            w = _const_array(call.args[1], self.lookup_binding)
            if w is None:
                return call
            if np.array_equal(w, np.round(w)):
                # an integer convolution emulated in float (ORT's ConvInteger lowered; its sums are
                # exact in float32): Winograd's fractional coefficients would round them
                self.skipped.append("integer-valued weight")
                return call
            x = call.args[0]
            n, h, wd, ci = (int(d) for d in x.ty.shape.values)
            co = int(w.shape[3])
            pt, pl, pb, pr = (int(p) for p in call.attrs.padding)
            oh, ow = h + pt + pb - 2, wd + pl + pr - 2
            m = self.tile if self.tile is not None else choose_tile(n, oh, ow, ci, co)
            if not m:
                return call
            u = transform_weight(np.asarray(w, np.float32), m)
            u = relax.const(u, "float32")
            bb = self.builder_
            v = bb.emit(bb.call_te(input_transform, x, m, (pt, pl, pb, pr), primfunc_name_hint=INPUT_TRANSFORM))
            alpha2 = (m + 2) ** 2
            v = bb.emit(relax.op.reshape(v, (alpha2, -1, ci)))  # a view: tiles as the matmul's rows
            prod = bb.emit(relax.op.matmul(v, u))
            prod = bb.emit(relax.op.reshape(prod, (alpha2, n, -(-oh // m), -(-ow // m), co)))
            self.changed.append(((n, h, wd, ci, co), m))
            return bb.call_te(output_transform, prod, m, (n, oh, ow, co), primfunc_name_hint=OUTPUT_TRANSFORM)

    return _Winograd


def winograd_convs(mod: Any, tile: int | None = None) -> tuple[Any, list[tuple[tuple[int, ...], int]]]:
    """Rewrite the eligible 3x3 convolutions of ``mod`` (channels-last, stride 1, one group,
    constant weight, static shapes, float32) as Winograd F(m x m, 3 x 3); ``tile`` forces m
    (2 or 4; None: :func:`choose_tile`). Returns the module and ((N, H, W, CI, CO), m) per
    rewritten convolution."""
    from tvm import relax

    rw = _mutator_class()(mod, tile)
    for gv, f in list(mod.functions_items()):
        if isinstance(f, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(f))
    if rw.skipped:
        logger.info("%d 3x3 convolutions left direct: %s", len(rw.skipped), ", ".join(sorted(set(rw.skipped))))
    return rw.builder_.get(), rw.changed


def mark_transforms() -> Any:
    """A module pass, run between ``AnnotateTIROpPattern`` and ``FuseOps``: the transforms are
    out-elementwise-fusable, as a convolution is, not injective. The output transform takes the
    bias and activation after it but not a following concat (its loops are the transform's own),
    and is not pulled into the batched matmul before it; the reshape after the input transform
    stays a reshape (a view) instead of being fused into it."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="graphopt.MarkWinogradTransforms")
    def _mark(mod: Any, _ctx: Any) -> Any:
        for gv, f in list(mod.functions_items()):
            if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith((INPUT_TRANSFORM, OUTPUT_TRANSFORM)):
                mod[gv] = f.with_attr("op_pattern", 4)  # kOutEWiseFusable
        return mod

    return _mark
