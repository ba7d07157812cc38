"""Small helpers shared by the built-in passes (public graphopt API only)."""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import Model, Node, PassContext
from graphopt.analysis import infer_shapes
from graphopt.ir import np_dtype
from graphopt.runtime import resolve_input_shapes


def same_dim(a: Any, b: Any) -> bool:
    """Two dims are provably equal: equal ints, or the same named symbol (onnx's generated
    ``unk__N`` names are not trusted across values; a negative int - PaddlePaddle's ``-1`` for
    "any size" - is unknown, not a size)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b and a >= 0
    return isinstance(a, str) and a == b and not a.startswith("unk__")


def reduce_axes(n: Node) -> list[int] | None:
    """Axes of a Reduce*/Squeeze/Unsqueeze node: the attribute (old opsets) or the constant
    second input (newer opsets); None when they are not constant."""
    axes = n.attr("axes")
    if axes is None and n.input(1) is not None:
        v = n.input(1).const_value()
        axes = None if v is None else [int(a) for a in np.ravel(v)]
    return None if axes is None else list(axes)


def is_depthwise(n: Node) -> bool:
    """A Conv with constant filters and one input channel per group (group > 1)."""
    if n.op_type != "Conv" or (n.attr("group", 1) or 1) <= 1 or n.input(1) is None:
        return False
    w = n.input(1).const_value()
    return w is not None and w.ndim >= 3 and w.shape[1] == 1


def activation_sizes(model: Model, ctx: PassContext) -> dict[str, int]:
    """Bytes of every activation of the main graph, from the shape annotations (inferred here if
    missing) with symbolic dims replaced by the context's input shapes (or 1). The sizes the
    memory passes (``schedule-memory``, ``tile-spatial``) measure peaks with."""
    g = model.graph
    if any(o.name and o.shape is None for n in g for o in n.outputs):
        infer_shapes(model)
    try:
        resolved = resolve_input_shapes(model, ctx.input_shapes)
    except Exception:  # noqa: BLE001
        resolved = {}
    symbols: dict[str, int] = {}
    for v in g.inputs:
        if v.name in resolved and v.shape is not None:
            for d, x in zip(v.shape, resolved[v.name], strict=False):
                if isinstance(d, str):
                    symbols[d] = x
    out: dict[str, int] = {}
    for v in list(g.inputs) + [o for n in g for o in n.outputs]:
        if v.shape is None or not v.dtype or any(d is None for d in v.shape):
            continue
        if v.fill_value() is not None:
            continue  # ConstantOfShape fills are folded by runtimes at load: resident, not activations
        n = 1
        for d in v.shape:
            n *= d if isinstance(d, int) else symbols.get(d, 1)
        try:
            out[v.name] = n * np_dtype(v.dtype).itemsize
        except Exception:  # noqa: BLE001
            pass
    return out
