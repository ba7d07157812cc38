"""Files shipped with graphopt: the example model used by ``--example`` and the README, and
calibration images for it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

EXAMPLE_MODEL = "tinycnn.onnx"
EXAMPLE_CALIBRATION = "example_calibration.npz"


def example_model_path() -> Path:
    """Path of the small CNN shipped inside the package: a digits classifier trained on
    scikit-learn's 8x8 handwritten digits and exported by ``torch.onnx`` (input ``input``,
    shape ``[batch, 1, 8, 8]``)."""
    return Path(str(resources.files("graphopt.data") / EXAMPLE_MODEL))


def example_calibration_path() -> Path:
    """Path of the example model's calibration set: 64 real images from the digits training
    split the model was trained on (every class present), as ``input`` ``[64, 1, 8, 8]`` float32
    in [0, 1] - the layout ``--calibration`` and :func:`graphopt.load_calibration` read. Written by
    ``tests/fixtures/train_digits.py`` (the first 64 of ``tests/fixtures/digits_calib.npz``);
    ``quantize --example`` and ``compress --example`` use it when given no data."""
    return Path(str(resources.files("graphopt.data") / EXAMPLE_CALIBRATION))
