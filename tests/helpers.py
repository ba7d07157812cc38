"""Shared fixtures: the onnx package's test models and small model builders."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

DATA = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data"
FIXTURES = Path(__file__).parent / "fixtures"


def backend_model_dirs() -> list[Path]:
    """Every model directory under simple/, pytorch-converted/, pytorch-operator/."""
    out: list[Path] = []
    for sub in ("simple", "pytorch-converted", "pytorch-operator"):
        out += [Path(p) for p in sorted(glob.glob(str(DATA / sub / "*"))) if os.path.isfile(Path(p) / "model.onnx")]
    return out


def light_models() -> list[Path]:
    return [Path(p) for p in sorted(glob.glob(str(DATA / "light" / "*.onnx")))]


def make_model(nodes, inputs, outputs, inits=(), opset=17, ir_version=None, **kw) -> onnx.ModelProto:
    g = helper.make_graph(nodes, kw.pop("name", "g"), inputs, outputs,
                          [numpy_helper.from_array(np.asarray(a), n) for n, a in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], **kw)
    if ir_version is not None:
        m.ir_version = ir_version
    return m


def vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def example_path() -> Path:
    from graphopt.cli import example_model_path

    return example_model_path()
