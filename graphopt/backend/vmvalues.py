"""Values the Relax VM returns, as numpy arrays (shared by the compiler and the GPU-free check,
which is why it lives below both)."""

from __future__ import annotations

from typing import Any

import numpy as np


def flatten_outputs(res: Any, host: bool = False) -> list[np.ndarray]:
    """A VM result (a tensor, or nested tuples of them) as a flat list of numpy arrays, each a
    copy the caller owns.

    ``host``: the tensors are in CPU memory, so each is read through DLPack and copied by numpy
    (about 1 us, against 10-20 us of Python in ``Tensor.numpy()``: a fifth of a 0.1 ms model's
    call); a dtype DLPack cannot carry falls back to ``numpy()``."""
    if hasattr(res, "numpy"):
        if host:
            try:
                return [np.from_dlpack(res).copy()]
            except (BufferError, TypeError, ValueError, RuntimeError):
                pass
        return [res.numpy()]
    out: list[np.ndarray] = []
    for r in res:
        out.extend(flatten_outputs(r, host))
    return out
