"""Values the Relax VM returns, as numpy arrays (shared by the compiler and the GPU-free check,
which is why it lives below both)."""

from __future__ import annotations

from typing import Any

import numpy as np


def flatten_outputs(res: Any) -> list[np.ndarray]:
    """A VM result (a tensor, or nested tuples of them) as a flat list of numpy arrays."""
    if hasattr(res, "numpy"):
        return [res.numpy()]
    out: list[np.ndarray] = []
    for r in res:
        out.extend(flatten_outputs(r))
    return out
