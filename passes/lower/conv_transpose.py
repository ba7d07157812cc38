"""ConvTranspose's implicit padding (``auto_pad``, ``output_shape``) written as explicit ``pads``
and ``output_padding``.

Why: TVM's ONNX frontend ignores ``output_shape`` (its build then returns the wrong shape), and
backends differ on which side SAME_UPPER pads. ONNX Runtime's rule, which this pass writes out:
with ``total = stride*(in-1) + output_padding + (k-1)*dilation + 1 - target`` (target:
``output_shape``, or ``in*stride`` for SAME_*), a non-negative total is split with the odd
element at the end for SAME_UPPER and at the start otherwise; a negative total (the target is
larger) becomes extra ``output_padding``. Exact: the arithmetic is unchanged.

Needs the input's spatial dims to be static (the compile path fixes input shapes); nodes that
do not have them are left unchanged and listed in ``report['left']``.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from graphopt import Graph, Model, Pass, PassContext, register_pass
from graphopt.analysis import infer_shapes

log = logging.getLogger(__name__)


@register_pass
class ExplicitConvTranspose(Pass):
    """ConvTranspose auto_pad / output_shape resolved into explicit pads and output_padding."""

    name = "explicit-conv-transpose"
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.report: dict[str, Any] = {"rewritten": 0, "left": {}}

    def apply(self, model: Model, ctx: PassContext) -> bool:
        if any(n.op_type == "ConvTranspose" and n.input(0) is not None and n.input(0).shape is None
               for n in model.graph.all_nodes()):
            infer_shapes(model)  # the pads depend on the input's spatial size
        return super().apply(model, ctx)

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        changed = False
        for n in list(graph):
            if n.op_type != "ConvTranspose" or n.domain not in ("", "ai.onnx"):
                continue
            auto_pad = n.attr("auto_pad", "NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
            out_shape = n.attr("output_shape")
            if auto_pad in ("NOTSET", "") and out_shape is None:
                continue
            x, w = n.input(0), n.input(1)
            wshape = w.shape if w is not None else None
            spatial = x.shape[2:] if x is not None and x.shape is not None else None
            if spatial is None or not all(isinstance(d, int) and d > 0 for d in spatial):
                self._left(n, f"input spatial dims {spatial} are not static")
                continue
            nd = len(spatial)
            kernel = n.attr("kernel_shape") or (list(wshape[2:]) if wshape is not None else None)
            if kernel is None or not all(isinstance(k, int) for k in kernel):
                self._left(n, "kernel shape unknown")
                continue
            strides = list(n.attr("strides") or [1] * nd)
            dil = list(n.attr("dilations") or [1] * nd)
            opad = list(n.attr("output_padding") or [0] * nd)
            if auto_pad == "VALID" and out_shape is None:
                pads = [0] * (2 * nd)
            else:
                if out_shape is not None:
                    target = list(out_shape)[-nd:]
                elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                    target = [s * i for s, i in zip(strides, spatial, strict=True)]
                else:
                    base = list(n.attr("pads") or [0] * (2 * nd))
                    target = None
                pads = [0] * (2 * nd)
                if target is not None:
                    for i in range(nd):
                        total = strides[i] * (spatial[i] - 1) + opad[i] + (kernel[i] - 1) * dil[i] + 1 - target[i]
                        if total < 0:
                            opad[i] -= total
                            continue
                        small, big = total // 2, total - total // 2
                        pads[i], pads[nd + i] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
                else:
                    pads = base
            attrs = {k: n.attr(k) for k in n.attrs if k not in ("auto_pad", "output_shape", "pads", "output_padding")}
            attrs["pads"] = pads
            if any(opad):
                attrs["output_padding"] = opad
            new = graph.make_node("ConvTranspose", list(n.inputs), attrs, before=n,
                                  name=graph.fresh_name(n.name or "conv_transpose"))
            new.output(0).dtype, new.output(0).shape = n.output(0).dtype, n.output(0).shape
            graph.replace_all_uses_with(n.output(0), new.output(0))
            graph.remove(n)
            self.report["rewritten"] += 1
            changed = True
        return changed

    def _left(self, n: Any, why: str) -> None:
        self.report["left"][n.name or "ConvTranspose"] = why
        log.info("explicit-conv-transpose: node %r left as it is: %s", n.name, why)
