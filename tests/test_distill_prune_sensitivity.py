"""prune-channels' per-layer sensitivity (the first step of pruning a model for distillation)
on a model with a dynamic input dim: the analysis runs at --input-shape, but every calibration
sample (text lines of several widths) must still run through each trial."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.runtime import run_ort
from graphopt.transform import PassContext


def _line_cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = {"w1": rng.standard_normal((8, 3, 3, 3)), "w2": rng.standard_normal((8, 8, 3, 3)) * 0.3,
         "w3": rng.standard_normal((4, 8, 1, 1)) * 0.3}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3")]
    g = helper.make_graph(nodes, "lines", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, "W"])],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_sensitivity_runs_samples_of_other_widths_than_the_input_shape() -> None:
    rng = np.random.default_rng(1)
    cal = [{"x": rng.standard_normal((1, 3, 8, w)).astype(np.float32)} for w in (16, 24, 16, 40)]
    m = graphopt.from_proto(_line_cnn())
    p = graphopt.get_pass("prune-channels", ratio=0.5, sensitivity=True)
    graphopt.run_passes(m, [p], PassContext(calibration=cal, input_shapes={"x": [1, 3, 8, 16]}))
    sens = p.report["sensitivity"]
    assert set(sens) == {"conv1", "conv2"} and all(e > 0 for e, _ in sens.values())
    out = graphopt.to_proto(m)
    onnx.checker.check_model(out, full_check=True)
    assert [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim][3] == "W"  # still dynamic
    ws = {t.name: list(t.dims) for t in out.graph.initializer}
    kept = [ws[n.input[1]][0] for n in out.graph.node if n.name in ("conv1", "conv2")]
    assert len(kept) == 2 and sum(kept) < 16  # channels were removed
    for s in cal:  # and the result runs every width
        assert run_ort(out, s)["y"].shape == (1, 4, 8, s["x"].shape[3])
