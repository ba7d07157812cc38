"""Helpers for tests and benchmarks: give models realistic random weights, compare logits.

The onnx package's light models (resnet50, squeezenet, shufflenet ...) store every weight as a
ConstantOfShape fill with one value, so their outputs do not depend on the input (NOTES.md).
:func:`randomize_weights` replaces those fills by random tensors scaled so activations keep a
sane range through deep nets:
He-normal convolution/Gemm weights and near-identity BatchNormalization parameters. Badly
scaled random weights make activations explode or vanish, and denormal floats then distort
timings by an order of magnitude.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir import Model, Value


def _role(v: Value) -> str:
    for node, idx in v.uses:
        if node.op_type == "BatchNormalization":
            return ("x", "bn_scale", "bn_bias", "bn_mean", "bn_var")[idx]
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and idx == 1:
            return "weight"
        if node.op_type in ("Conv", "Gemm", "ConvTranspose") and idx == 2:
            return "bias"
    return "other"


def random_tensor(shape: tuple[int, ...], role: str, rng: np.random.Generator) -> np.ndarray:
    """A float32 tensor of ``shape`` suited to a weight ``role`` (see module docs)."""
    shape = tuple(int(d) for d in shape)
    if role == "weight":
        fan = int(np.prod(shape[1:])) if len(shape) > 1 else max(shape[0], 1)
        return (rng.standard_normal(shape) * np.sqrt(2.0 / max(fan, 1))).astype(np.float32)
    if role == "bn_scale":
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if role == "bn_var":
        return (1.0 + 0.1 * np.abs(rng.standard_normal(shape))).astype(np.float32)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)


def randomize_weights(model: Model, *, seed: int = 0) -> Model:
    """Replace constant-fill weights (ConstantOfShape of a constant shape) by random
    initializers, in place, and return ``model``. Run the default pipeline afterwards to fold
    BatchNormalization into Conv."""
    import graphopt

    graphopt.run_passes(model, ["lift-initializer-inputs"])
    rng = np.random.default_rng(seed)
    g = model.graph
    for n in list(g):
        fill = n.output(0).fill_value() if n.op_type == "ConstantOfShape" else None
        if fill is None or np.dtype(fill[1].dtype).kind != "f":
            continue
        out = n.output(0)
        data = random_tensor(tuple(fill[0]), _role(out), rng)
        g.replace_all_uses_with(out, g.add_initializer(out.name + "_rand", data))
    graphopt.run_passes(model, ["dce"])
    return model


def logits_outputs(model: Model) -> Model:
    """Make every graph output that a Softmax produces the Softmax's input instead (the
    Softmax is dropped), in place, and return ``model``. With random weights a classifier's
    softmax saturates to one-hot outputs, which hide every numerical difference."""
    import graphopt

    g = model.graph
    for i, o in enumerate(list(g.outputs)):
        if o.producer is not None and o.producer.op_type == "Softmax":
            g.outputs[i] = o.producer.input(0)
    graphopt.run_passes(model, ["dce"])
    return model
