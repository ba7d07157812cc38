"""Files shipped with graphopt: the example model used by ``--example`` and the README."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

EXAMPLE_MODEL = "tinycnn.onnx"


def example_model_path() -> Path:
    """Path of the small CNN shipped inside the package: a digits classifier trained on
    scikit-learn's 8x8 handwritten digits and exported by ``torch.onnx`` (input ``input``,
    shape ``[batch, 1, 8, 8]``)."""
    return Path(str(resources.files("graphopt.data") / EXAMPLE_MODEL))
