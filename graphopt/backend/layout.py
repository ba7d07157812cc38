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
