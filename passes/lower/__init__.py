"""Rewrites into standard ONNX ops that backends convert (used by the TVM compile path).

* ``lower-recurrent`` - LSTM/GRU/RNN unrolled over a static sequence length.
* ``explicit-conv-transpose`` - ConvTranspose ``auto_pad``/``output_shape`` as explicit pads.
* ``lower-integer`` - ONNX Runtime's integer ops (ConvInteger, QLinearConv, QLinearMatMul,
  DynamicQuantizeLSTM, ...) as standard float / QDQ ONNX.
* ``unroll-loops`` - Loop with a constant trip count and Scan over a static length, the body
  copied once per iteration.
* ``pad-group-widths`` - conv groups padded to whole vectors of output channels (run by the CPU
  compile with the target's vector width; in no pipeline).
* ``lower-one-hot`` - OneHot with a constant depth as Equal + Where (TVM's converter refuses
  tf2onnx's ``int32[1]`` depth and makes float64 outputs).

The ``lower-for-tvm`` pipeline runs integer ops first (the dequantized LSTM is then unrolled),
loops next (a recurrent op in a loop body is lowered with the rest), then the others and DCE.
"""

from __future__ import annotations

from graphopt import Pipeline, register_pipeline

from .conv_transpose import ExplicitConvTranspose
from .group_widths import PadGroupWidths
from .integer import LowerInteger
from .loops import UnrollLoops
from .one_hot import LowerOneHot
from .recurrent import LowerRecurrent


def lower_for_tvm_pipeline() -> Pipeline:
    """Integer ops, loops, recurrent ops and implicit ConvTranspose padding as standard ONNX."""
    from graphopt import get_pass

    return Pipeline([LowerInteger(), UnrollLoops(), LowerRecurrent(), ExplicitConvTranspose(), LowerOneHot(),
                     get_pass("dce")], name="lower-for-tvm")


register_pipeline("lower-for-tvm", lower_for_tvm_pipeline)

__all__ = ["ExplicitConvTranspose", "LowerInteger", "LowerOneHot", "LowerRecurrent", "PadGroupWidths", "UnrollLoops",
           "lower_for_tvm_pipeline"]
