"""graphopt's IR: :class:`Model`, :class:`Graph`, :class:`Node`, :class:`Value`, :class:`Tensor`."""

from graphopt.ir.core import Attr, Function, Graph, Model, Node, Value, constant_node_value
from graphopt.ir.tensor import Tensor, dtype_name, np_dtype, onnx_dtype

__all__ = [
    "Attr", "Function", "Graph", "Model", "Node", "Tensor", "Value",
    "constant_node_value", "dtype_name", "np_dtype", "onnx_dtype",
]
