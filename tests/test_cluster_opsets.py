"""Palettized clustering writes decoding ops that are valid at the model's own opset (a Paddle
classifier at opset 11 got an opset-13 Unsqueeze with an axes input, which ORT refused)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_model, vi
from onnx import helper

import graphopt


@pytest.mark.parametrize("opset", [11, 12, 13, 17])
@pytest.mark.parametrize("cols", [72, 75])  # an odd row length pads the packed nibbles
def test_palettized_cluster_valid_at_the_models_opset(tmp_path: Path, opset: int, cols: int) -> None:
    rng = np.random.default_rng(opset)
    w = rng.standard_normal((cols, 40)).astype(np.float32)
    mp = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", [2, cols])],
                    [vi("y", [2, 40])], inits=[("w", w)], opset=opset)
    dense, pal = graphopt.from_proto(mp), graphopt.from_proto(mp)
    graphopt.run_passes(dense, [graphopt.get_pass("cluster", clusters=16, min_size=64, storage="dense"), "dce"])
    p = graphopt.get_pass("cluster", clusters=16, min_size=64)
    graphopt.run_passes(pal, [p, "dce"])
    assert p.report["index_bits"] == 4 and p.report["clustered"]
    graphopt.save(pal, tmp_path / "pal.onnx")
    saved = onnx.load(tmp_path / "pal.onnx")
    onnx.checker.check_model(saved, full_check=True)
    assert saved.opset_import[0].version == opset
    x = {"x": rng.standard_normal((2, cols)).astype(np.float32)}
    # palettized storage decodes to exactly the dense clustered weights
    np.testing.assert_array_equal(graphopt.run_ort(tmp_path / "pal.onnx", x)["y"], graphopt.run_ort(dense, x)["y"])
