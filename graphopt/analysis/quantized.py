"""Which ops of a model already compute in integers (ONNX and ONNX Runtime contrib ops).

Shared by the commands that must not treat such a model as float (``compress``) and by the
quantizer's description of already-quantized models (``passes/quantize/requantize.py``).
"""

from __future__ import annotations

from collections import Counter

from graphopt.ir.core import Model

#: ops whose arithmetic is integer (ONNX and ONNX Runtime contrib ops)
INTEGER_COMPUTE = frozenset({
    "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLSTM", "QGemm",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "QLinearAdd", "QLinearMul",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "QEmbedLayerNormalization", "QOrderedMatMul",
})


def integer_ops(model: Model) -> Counter[str]:
    """Count of integer-arithmetic ops in every graph of ``model`` (bodies and functions included)."""
    return Counter(n.op_type for g in model.all_graphs() for n in g if n.op_type in INTEGER_COMPUTE)
