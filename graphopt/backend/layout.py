"""Channels-last convolutions, one convolution at a time (when Relax's ConvertLayout cannot run).

graphopt's CPU schedules vectorize a convolution along its output channels, which needs them
innermost (NHWC / NWC activations, HWIO / WIO weights). Relax's ``ConvertLayout`` does that for
the whole graph and carries the layout through the ops between convolutions, but it is all or
nothing: one op whose layout rule fails (tf2onnx's ``permute_dims`` of a 3-D tensor before a
``Conv`` on an ``expand_dims`` view in magika: "Invalid SLayout: can't find S in source layout
ABC") aborts it, and every conv stayed NCHW with its output width of 1 as the only contiguous
axis (magika_v3: one conv took 420 ms, 98% of the model).

:func:`convs_to_channels_last` rewrites each NCHW/NCW convolution on its own: transpose in,
channels-last convolution, transpose out. The weight transpose folds at compile time; the
activation transposes are injective kernels that fuse with their neighbours.
"""

from __future__ import annotations

from typing import Any


def _mutator_class() -> Any:
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _ChannelsLast(PyExprMutator):  # type: ignore[misc]
        def __init__(self, mod: Any = None) -> None:
            super().__init__(mod)
            self.changed = 0

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            a, R = call.attrs, relax.op
            if call.op.name == "relax.nn.conv2d" and (a.data_layout, a.kernel_layout) == ("NCHW", "OIHW") \
                    and a.out_layout in ("NCHW", ""):
                x = R.permute_dims(call.args[0], [0, 2, 3, 1])
                w = R.permute_dims(call.args[1], [2, 3, 1, 0])
                y = R.nn.conv2d(x, w, a.strides, a.padding, a.dilation, a.groups, "NHWC", "HWIO", "NHWC",
                                a.out_dtype)
                self.changed += 1
                return R.permute_dims(y, [0, 3, 1, 2])
            if call.op.name == "relax.nn.conv1d" and (a.data_layout, a.kernel_layout) == ("NCW", "OIW") \
                    and a.out_layout in ("NCW", ""):
                x = R.permute_dims(call.args[0], [0, 2, 1])
                w = R.permute_dims(call.args[1], [2, 1, 0])
                y = R.nn.conv1d(x, w, a.strides, a.padding, a.dilation, a.groups, "NWC", "WIO", "NWC", a.out_dtype)
                self.changed += 1
                return R.permute_dims(y, [0, 2, 1])
            return call

    return _ChannelsLast


def convs_to_channels_last(mod: Any) -> tuple[Any, int]:
    """Rewrite every NCHW conv2d and NCW conv1d of ``mod``'s Relax functions as transpose ->
    NHWC/HWIO (NWC/WIO) conv -> transpose. Returns the new module and how many changed."""
    from tvm import relax

    m = _mutator_class()(mod)
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function):
            m.builder_.update_func(gv, m.visit_expr(f))
    return m.builder_.get(), m.changed


# -- ConvTranspose as a convolution (sub-pixel decomposition) -----------------------------------


def subpixel_weight(w: Any, stride: tuple[int, int]) -> Any:
    """The convolution weight (OIHW) equivalent to a transposed-convolution weight ``w`` (IOHW,
    one group) of ``stride``: output channel ``(a * sw + b) * O + o`` computes output phase
    ``(a, b)`` (rows ``= a mod sh``, columns ``= b mod sw``) of channel ``o``; its ``Qh x Qw``
    taps (``Q = ceil(k / s)``) are the transposed kernel's taps of that phase, flipped."""
    import numpy as np

    c, o, kh, kw = w.shape
    sh, sw = stride
    qh, qw = -(-kh // sh), -(-kw // sw)
    out = np.zeros((sh * sw * o, c, qh, qw), w.dtype)
    for a in range(sh):
        for b in range(sw):
            for i in range(qh):
                for j in range(qw):
                    y, x = sh * (qh - 1 - i) + a, sw * (qw - 1 - j) + b
                    if y < kh and x < kw:
                        out[(a * sw + b) * o:(a * sw + b + 1) * o, :, i, j] = w[:, :, y, x].T
    return out


def _subpixel_class() -> Any:
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _SubPixel(PyExprMutator):  # type: ignore[misc]
        def __init__(self, mod: Any = None) -> None:
            super().__init__(mod)
            self.changed = 0
            self.skipped: list[str] = []

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.nn.conv2d_transpose":
                return call
            why = _subpixel_refusal(call)
            if why:
                self.skipped.append(why)
                return call
            return self._rewrite(call)

        def _rewrite(self, call: Any) -> Any:
            R = relax.op
            a = call.attrs
            x, wc = call.args
            w = wc.value.numpy()
            n, _, h, wd = (int(d) for d in x.ty.shape.values)
            _, o, kh, kw = w.shape
            sh, sw = (int(s) for s in a.strides)
            pt, pl, pb, pr = (int(p) for p in a.padding)
            oph, opw = (int(p) for p in a.output_padding)
            qh, qw = -(-kh // sh), -(-kw // sw)
            wn = relax.const(subpixel_weight(w, (sh, sw)), str(wc.ty.dtype))
            # phase (a, b) of the transposed conv's full output at (m, m') is a correlation of x
            # (padded by Q - 1) with the phase's flipped taps
            z = R.nn.conv2d(x, wn, 1, (qh - 1, qw - 1, qh - 1, qw - 1), 1, 1, "NCHW", "OIHW", "NCHW",
                            a.out_dtype if a.out_dtype else None)
            hz, wz = h + qh - 1, wd + qw - 1
            z = R.reshape(z, (n, sh, sw, o, hz, wz))
            z = R.permute_dims(z, [0, 3, 4, 1, 5, 2])
            y = R.reshape(z, (n, o, hz * sh, wz * sw))
            # crop the padding; output_padding past the full output's end is zeros
            ho, wo = (h - 1) * sh + kh - pt - pb + oph, (wd - 1) * sw + kw - pl - pr + opw
            eh, ew = max(0, pt + ho - hz * sh), max(0, pl + wo - wz * sw)
            if eh or ew:
                y = R.nn.pad(y, [0, 0, 0, 0, 0, eh, 0, ew])
            if (pt, pl, ho, wo) != (0, 0, hz * sh + eh, wz * sw + ew):
                y = R.strided_slice(y, [2, 3], [pt, pl], [pt + ho, pl + wo])
            self.changed += 1
            return y

    return _SubPixel


def _subpixel_refusal(call: Any) -> str:
    """Why a ``conv2d_transpose`` call cannot become a sub-pixel convolution ("" if it can)."""
    import tvm

    a = call.attrs
    x, w = call.args
    shape = getattr(x.ty, "shape", None)
    if not isinstance(w, tvm.ir.expr.Constant):
        return "its weight is not a constant"
    if shape is None or not all(isinstance(getattr(d, "value", None), int) for d in shape.values):
        return "its input shape is not static"
    if (a.data_layout, a.kernel_layout) != ("NCHW", "IOHW") or a.out_layout not in ("NCHW", ""):
        return f"layout {a.data_layout}/{a.kernel_layout}"
    if int(a.groups) != 1:
        return f"groups={int(a.groups)}"
    if any(int(d) != 1 for d in a.dilation):
        return "dilation"
    return ""


def conv_transpose_to_conv(mod: Any) -> tuple[Any, int, list[str]]:
    """Rewrite each 2-D transposed convolution of ``mod`` (constant weight, one group, no
    dilation, static shapes) as a convolution computing all ``sh x sw`` output phases as
    channels, then a depth-to-space (reshape, transpose, reshape) and a crop of the padding.

    Why: TOPI's ``conv2d_transpose`` is a scatter written as a gather over a zero-dilated input
    (most multiply-adds hit inserted zeros) in NCHW only; the default schedules tile it poorly
    (PaddleOCR's text detectors spent 23-34% of their time in one 2x2/stride-2 ConvTranspose,
    1.8-2.3x ONNX Runtime overall). As a convolution it goes channels-last with the others and
    takes the tiled rule; a 2x2/stride-2 one becomes a 1x1 convolution (a matmul). The sums are
    the same products in another order: the result equals the transposed convolution's to
    rounding. Returns the module, how many changed, and why others were left as they were.
    """
    from tvm import relax

    m = _subpixel_class()(mod)
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function):
            m.builder_.update_func(gv, m.visit_expr(f))
    return m.builder_.get(), m.changed, m.skipped


# -- whole vectors for matmuls of odd width ------------------------------------------------------


def _const_array(expr: Any, lookup: Any) -> Any:
    """The numpy value of ``expr`` when it is a constant or a transpose of one (a Gemm's transB
    weight), else None."""
    import tvm

    if isinstance(expr, tvm.relax.Var):
        expr = lookup(expr)
    if isinstance(expr, tvm.ir.expr.Constant) and hasattr(expr.value, "numpy"):
        return expr.value.numpy()
    if isinstance(expr, tvm.relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.permute_dims":
        inner = expr.args[0]
        if isinstance(inner, tvm.relax.Var):
            inner = lookup(inner)
        if isinstance(inner, tvm.ir.expr.Constant) and hasattr(inner.value, "numpy"):
            a = inner.value.numpy()
            axes = [int(x) for x in expr.attrs.axes] if expr.attrs.axes is not None else None
            return a.transpose(axes)
    return None


def padded_width(n: int, lanes: int, max_growth: float = 1.25) -> int:
    """The width a matmul's ``n`` output columns get: ``n`` when quarter vectors (4 lanes)
    already divide it, else the next multiple of a full, half or 4-lane vector within
    ``max_growth`` (the smallest that is), else ``n``."""
    if n % 4 == 0:
        return n
    for v in (lanes, lanes // 2, 4):
        p = -(-n // v) * v
        if v >= 4 and p <= max_growth * n:
            return p
    return n


def _pad_matmul_class() -> Any:
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _PadMatmul(PyExprMutator):  # type: ignore[misc]
        def __init__(self, mod: Any = None, lanes: int = 16) -> None:
            super().__init__(mod)
            self.lanes = lanes
            self.changed: list[tuple[int, int]] = []

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or call.op.name != "relax.matmul":
                return call
            x, w = call.args
            shape = getattr(w.ty, "shape", None)
            xdim = getattr(x.ty, "ndim", -1)
            if shape is None or xdim < 1 or not all(isinstance(getattr(d, "value", None), int) for d in shape.values):
                return call
            wshape = [int(d) for d in shape.values]
            if len(wshape) < 2:
                return call
            n = wshape[-1]
            padded = padded_width(n, self.lanes)
            if padded == n:
                return call
            const = _const_array(w, self.lookup_binding)
            if const is not None:
                wp = np.zeros((*const.shape[:-1], padded), const.dtype)
                wp[..., :n] = const
                w_new = relax.const(wp, str(wp.dtype))
            else:  # an activation (attention's keys): padded at run time, a small copy
                w_new = relax.op.nn.pad(w, [0, 0] * (len(wshape) - 1) + [0, padded - n])
            out_dtype = call.attrs.out_dtype if call.attrs.out_dtype else None
            y = relax.op.matmul(x, w_new, out_dtype=out_dtype)
            out_ndim = len(wshape) - 1 if xdim == 1 else max(xdim, len(wshape))
            self.changed.append((n, padded))
            return relax.op.strided_slice(y, [out_ndim - 1], [0], [n])

    return _PadMatmul


def pad_matmul_widths(mod: Any, lanes: int) -> tuple[Any, list[tuple[int, int]]]:
    """Give matmuls whose ``N`` output columns no 4-lane vector divides whole vectors: the right
    operand gets zero columns up to :func:`padded_width` (at compile time for a constant weight,
    a Gemm's transposed one included; a small run-time pad for an activation such as
    attention's keys) and the product is sliced back to ``N`` columns. Exact (the extra columns
    are never read).

    Why: the tiled rule vectorizes the output's columns and needs a vector width that divides
    them; PaddleOCR's CTC heads (6625 and 18385 classes) had none and fell to the fallback rule
    (39-42% of the recognizers' time), ddddocr's 8210-class head got 2-lane tiles, and SVTR's
    attention matmuls (45 and 15 wide) fell to the fallback rule. Returns the module and
    ``(N, padded N)`` per matmul changed.
    """
    from tvm import relax

    m = _pad_matmul_class()(mod, lanes)
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function):
            m.builder_.update_func(gv, m.visit_expr(f))
    return m.builder_.get(), m.changed


# -- one copy of each constant ------------------------------------------------------------------


def _dedupe_class() -> Any:
    import hashlib

    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _Dedupe(PyExprMutator):  # type: ignore[misc]
        def __init__(self, mod: Any = None, min_bytes: int = 4096) -> None:
            super().__init__(mod)
            self.min_bytes = min_bytes
            self.seen: dict[tuple[str, tuple[int, ...], str], Any] = {}
            self.saved = 0

        def visit_generic_const_(self, c: Any) -> Any:
            if not hasattr(c.value, "numpy"):
                return c
            a = c.value.numpy()
            if a.nbytes < self.min_bytes:
                return c
            key = (str(a.dtype), a.shape, hashlib.sha256(a.tobytes()).hexdigest())
            first = self.seen.setdefault(key, c)
            if first is not c:
                self.saved += a.nbytes
            return first

    return _Dedupe


def dedupe_constants(mod: Any, min_bytes: int = 4096) -> tuple[Any, int]:
    """Make equal constants (of at least ``min_bytes``) of ``mod``'s Relax functions one object,
    so the build stores, and the kernels read, one copy. Returns the module and the bytes saved.

    Why: an unrolled LSTM gives every time step its own copy of the recurrent weights
    (ddddocr's recognizer: 20 steps x 2 directions x 4 MB = 160 MB of copies), and each step's
    matmul streamed its own copy from memory instead of finding the shared one in cache. The
    weight packing's constant folding makes one packed copy per call again, so this runs after
    it too.
    """
    from tvm import relax

    m = _dedupe_class()(mod, min_bytes)
    for gv, f in mod.functions_items():
        if isinstance(f, relax.Function):
            m.builder_.update_func(gv, m.visit_expr(f))
    return m.builder_.get(), m.saved


# -- fast math (default) --------------------------------------------------------------------------


def fast_math(mod: Any) -> Any:
    """float32 ``exp``, ``erf``, ``tanh``, softmax and ``sigmoid`` as TOPI's vectorizable
    polynomial approximations (``fast_exp``, ``fast_erf``, ``fast_tanh``, ``fast_softmax``;
    ``sigmoid`` as ``1 / (1 + fast_exp(-x))``). On by default in :func:`graphopt.backend.compile`.

    Why: TVM's LLVM code calls scalar ``expf`` per element even in a vectorized loop (SiLU on
    [1, 64, 160, 160]: 8 ms against ONNX Runtime's 0.5 ms), which left the YOLO-style detectors
    at ~1.5x ORT. ONNX Runtime's own CPU kernels are such approximations too (its ``Tanh`` is the
    same rational polynomial, bit for bit).

    Accuracy, measured against float64 over [-100, 100] and magnitudes down to 1e-45
    (tests/test_tvm_kernels.py): exp <= 2e-7 relative where the result is a normal float,
    sigmoid <= 4e-7, tanh <= 1e-5 (ORT's), erf <= 3e-6; softmax as exact. Edges: ``fast_exp``
    overflows to inf from x > 88.376 (exact: 88.72) and flushes results under 2^-126 (x < -87.34)
    to 0 where exact exp returns subnormals; ``fast_erf`` returns 0 for subnormal inputs. NaN
    stays NaN and +-inf give the exact limits (``fast_erf`` alone would map NaN to 1: guarded
    here). Only float32 calls are rewritten: TOPI evaluates ``fast_erf``'s polynomial in the
    input's type, too coarse in float16.

    Runs after the layout conversion (which would wrap the TE kernels in transposes back to
    NCHW). Replaces Relax's ``FastMathTransform`` for the float32 restriction and the NaN guard.
    """
    import tvm
    from tvm import relax, topi

    from .int8 import fast_sigmoid

    def _erf(x: Any) -> Any:  # NaN in, NaN out (the clamp to [-4, 4] makes fast_erf(NaN) 1)
        return topi.where(topi.isnan(x), x, topi.fast_erf(x))

    unary = {"relax.exp": (topi.fast_exp, "fast_exp"), "relax.tanh": (topi.fast_tanh, "fast_tanh"),
             "relax.erf": (_erf, "fast_erf")}

    @relax.expr_functor.mutator
    class _Fast(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:  # TVM's visitor name
            call = super().visit_call_(call)
            if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op) or not call.args:
                return call
            name = call.op.name
            dtype = str(getattr(getattr(call.args[0], "ty", None), "dtype", ""))  # the argument's tensor type
            if name not in unary and name != "relax.nn.softmax" or dtype != "float32":
                return call
            if name == "relax.nn.softmax":
                return self.builder_.call_te(topi.nn.fast_softmax, call.args[0], call.attrs.axis,
                                             primfunc_name_hint="fast_softmax")
            fn, hint = unary[name]
            return self.builder_.call_te(fn, call.args[0], primfunc_name_hint=hint)

    mod = fast_sigmoid(mod)
    rw = _Fast(mod)  # the builder holds the module: the TE kernels' PrimFuncs are added to it
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    return rw.builder_.get()
