"""Small helpers shared by the built-in passes (public graphopt API only)."""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt import Node


def same_dim(a: Any, b: Any) -> bool:
    """Two dims are provably equal: equal ints, or the same named symbol (onnx's generated
    ``unk__N`` names are not trusted across values)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
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
