"""Lowering of an ONNX graph to a PyTorch module that runs it op by op with torch functions.

:class:`TorchGraph` executes the main graph of an ONNX model (float or QDQ) node by node with
``torch`` / ``torch.nn.functional`` calls, so PyTorch's autograd differentiates it: the float
weights (initializers or ``Constant``-node tensors read as weights) are ``nn.Parameter`` s, the
rest (shapes, scales, zero points, BatchNorm statistics, indices) fixed tensors. For a QDQ model
the integer weights behind a ``DequantizeLinear`` become float parameters run through fake
quantization with a straight-through estimator (their scales and zero points stay fixed), and
:meth:`TorchGraph.trained_arrays` quantizes them back to the initializer's integer type.

Ops the lowering covers are listed in :data:`SUPPORTED_OPS`; any other op (and any op outside the
default ONNX domain, or a node with a subgraph such as ``If``) is refused at construction with a
:class:`~graphopt.errors.UnsupportedModelError` naming the node and the op. The module is for
training: the numbers match ONNX Runtime's to float32 rounding on the covered ops (tests check
this), not bit for bit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from graphopt.errors import UnsupportedModelError

log = logging.getLogger("graphopt.distill")

Tensor = torch.Tensor
_Handler = Callable[["_Ctx", list[Any]], list[Any]]
_OPS: dict[str, _Handler] = {}

# which input slots of an op read a float tensor that is a weight (trainable); a float constant
# read anywhere else (Resize scales, Clip bounds, BatchNorm statistics, Q/DQ scales...) stays fixed
_WEIGHT_SLOTS: dict[str, set[int] | None] = {
    "Conv": {1, 2}, "ConvTranspose": {1, 2}, "Gemm": {0, 1, 2}, "MatMul": {0, 1}, "Add": {0, 1}, "Sub": {0, 1},
    "Mul": {0, 1}, "Div": {0, 1}, "BatchNormalization": {1, 2}, "LSTM": {1, 2, 3, 5, 6}, "GRU": {1, 2, 3, 5},
    "PRelu": {1}, "LayerNormalization": {1, 2}, "InstanceNormalization": {1, 2}, "Concat": None,
}
# a weight stored behind a Cast (float16 weights: graphopt convert --weights-only) is trainable when
# what the Cast makes is read as a weight


def _op(*names: str) -> Callable[[_Handler], _Handler]:
    def reg(fn: _Handler) -> _Handler:
        for n in names:
            _OPS[n] = fn
        return fn
    return reg


class _Ctx:
    """What a handler sees of its node: attributes, opset, name."""

    __slots__ = ("attrs", "name", "node", "op", "opset", "outputs")

    def __init__(self, node: onnx.NodeProto, opset: int) -> None:
        self.node, self.op, self.opset = node, node.op_type, opset
        self.name = node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"
        self.outputs = len(node.output)
        self.attrs: dict[str, Any] = {}
        for a in node.attribute:
            v = helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode()
            elif isinstance(v, onnx.TensorProto):
                v = numpy_helper.to_array(v)
            self.attrs[a.name] = v

    def a(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def refuse(self, why: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"node {self.name!r} ({self.op}): {why}; the torch lowering of graphopt "
                                     f"distill cannot run it")


def _ints(t: Any) -> list[int]:
    if t is None:
        return []
    if isinstance(t, Tensor):
        return [int(x) for x in t.reshape(-1).tolist()]
    return [int(x) for x in np.asarray(t).reshape(-1)]


# ---------------------------------------------------------------------------------------------
# elementwise
# ---------------------------------------------------------------------------------------------
def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> _Handler:
    return lambda c, x: [fn(x[0], x[1])]


_op("Add")(_binary(torch.add))
_op("Sub")(_binary(torch.sub))
_op("Mul")(_binary(torch.mul))
_op("Pow")(lambda c, x: [torch.pow(x[0], x[1]).to(x[0].dtype)])
_op("Equal")(_binary(torch.eq))
_op("Less")(_binary(torch.lt))
_op("LessOrEqual")(_binary(torch.le))
_op("Greater")(_binary(torch.gt))
_op("GreaterOrEqual")(_binary(torch.ge))
_op("And")(_binary(torch.logical_and))
_op("Or")(_binary(torch.logical_or))
_op("Xor")(_binary(torch.logical_xor))


@_op("Div")
def _div(c: _Ctx, x: list[Any]) -> list[Any]:
    if not x[0].is_floating_point():
        return [torch.div(x[0], x[1], rounding_mode="trunc")]
    return [x[0] / x[1]]


@_op("Mod")
def _mod(c: _Ctx, x: list[Any]) -> list[Any]:
    return [torch.fmod(x[0], x[1]) if c.a("fmod", 0) else torch.remainder(x[0], x[1])]


def _unary(fn: Callable[[Tensor], Tensor]) -> _Handler:
    return lambda c, x: [fn(x[0])]


for _name, _fn in {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log,
    "Sqrt": torch.sqrt, "Abs": torch.abs, "Neg": torch.neg, "Reciprocal": torch.reciprocal, "Erf": torch.erf,
    "Floor": torch.floor, "Ceil": torch.ceil, "Sin": torch.sin, "Cos": torch.cos, "Not": torch.logical_not,
    "Softsign": F.softsign, "Sign": torch.sign, "Round": torch.round,
}.items():
    _op(_name)(_unary(_fn))
_op("Identity", "Dropout")(lambda c, x: [x[0]] + ([torch.ones_like(x[0], dtype=torch.bool)] if c.outputs > 1 else []))
_op("Softplus")(lambda c, x: [F.softplus(x[0])])
_op("LeakyRelu")(lambda c, x: [F.leaky_relu(x[0], c.a("alpha", 0.01))])
_op("Elu")(lambda c, x: [F.elu(x[0], c.a("alpha", 1.0))])
_op("Selu")(lambda c, x: [c.a("gamma", 1.0507009873554805) * torch.where(
    x[0] > 0, x[0], c.a("alpha", 1.6732631921768188) * (torch.exp(x[0]) - 1))])
_op("HardSigmoid")(lambda c, x: [torch.clamp(c.a("alpha", 0.2) * x[0] + c.a("beta", 0.5), 0, 1)])
_op("HardSwish")(lambda c, x: [x[0] * torch.clamp(x[0] / 6 + 0.5, 0, 1)])
_op("PRelu")(lambda c, x: [torch.where(x[0] >= 0, x[0], x[0] * x[1])])
_op("Gelu")(lambda c, x: [F.gelu(x[0], approximate="tanh" if c.a("approximate", "none") == "tanh" else "none")])
_op("Where")(lambda c, x: [torch.where(x[0].bool(), x[1], x[2])])


@_op("Max", "Min", "Sum", "Mean")
def _variadic(c: _Ctx, x: list[Any]) -> list[Any]:
    out = x[0]
    for y in x[1:]:
        out = {"Max": torch.maximum, "Min": torch.minimum}.get(c.op, torch.add)(out, y)
    return [out / len(x) if c.op == "Mean" else out]


@_op("Clip")
def _clip(c: _Ctx, x: list[Any]) -> list[Any]:
    if c.opset < 11:
        lo, hi = c.a("min"), c.a("max")
    else:
        lo = x[1] if len(x) > 1 and x[1] is not None else None
        hi = x[2] if len(x) > 2 and x[2] is not None else None
    out = x[0]
    if lo is not None:
        out = torch.maximum(out, torch.as_tensor(lo, dtype=out.dtype))
    if hi is not None:
        out = torch.minimum(out, torch.as_tensor(hi, dtype=out.dtype))
    return [out]


@_op("Cast")
def _cast(c: _Ctx, x: list[Any]) -> list[Any]:
    return [x[0].to(_torch_dtype(c.a("to")))]


@_op("CastLike")
def _cast_like(c: _Ctx, x: list[Any]) -> list[Any]:
    return [x[0].to(x[1].dtype)]


def _torch_dtype(onnx_type: int) -> torch.dtype:
    np_t = helper.tensor_dtype_to_np_dtype(onnx_type)
    return torch.from_numpy(np.zeros(1, np_t)).dtype


# ---------------------------------------------------------------------------------------------
# linear algebra, convolution, normalization, pooling
# ---------------------------------------------------------------------------------------------
@_op("MatMul")
def _matmul(c: _Ctx, x: list[Any]) -> list[Any]:
    return [torch.matmul(x[0], x[1])]


@_op("Gemm")
def _gemm(c: _Ctx, x: list[Any]) -> list[Any]:
    a = x[0].t() if c.a("transA", 0) else x[0]
    b = x[1].t() if c.a("transB", 0) else x[1]
    out = c.a("alpha", 1.0) * (a @ b)
    if len(x) > 2 and x[2] is not None:
        out = out + c.a("beta", 1.0) * x[2]
    return [out]


def _conv_pads(c: _Ctx, spatial_in: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int]) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] with auto_pad resolved."""
    n = len(kernel)
    auto = c.a("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        return list(c.a("pads", [0] * 2 * n))
    if auto == "VALID":
        return [0] * 2 * n
    pads_b, pads_e = [], []
    for i in range(n):
        out = math.ceil(spatial_in[i] / strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial_in[i])
        small, big = total // 2, total - total // 2
        pads_b.append(big if auto == "SAME_LOWER" else small)
        pads_e.append(small if auto == "SAME_LOWER" else big)
    return pads_b + pads_e


def _pad_spatial(x: Tensor, pads: Sequence[int], value: float = 0.0) -> Tensor:
    """Apply ONNX spatial pads [b..., e...] (negative = crop) to an N, C, *spatial tensor."""
    n = len(pads) // 2
    if not any(pads):
        return x
    torch_pads: list[int] = []
    for i in reversed(range(n)):
        torch_pads += [pads[i], pads[i + n]]
    return F.pad(x, torch_pads, value=value)


@_op("Conv")
def _conv(c: _Ctx, x: list[Any]) -> list[Any]:
    inp, w = x[0], x[1]
    b = x[2] if len(x) > 2 else None
    n = w.dim() - 2
    if n not in (1, 2, 3):
        raise c.refuse(f"{n}-D convolution")
    kernel = c.a("kernel_shape") or list(w.shape[2:])
    strides = c.a("strides", [1] * n)
    dil = c.a("dilations", [1] * n)
    pads = _conv_pads(c, list(inp.shape[2:]), kernel, strides, dil)
    sym = pads[:n] == pads[n:]
    if not sym:
        inp = _pad_spatial(inp, pads)
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return [fn(inp, w, b, stride=strides, padding=pads[:n] if sym else 0, dilation=dil, groups=c.a("group", 1))]


@_op("ConvTranspose")
def _conv_transpose(c: _Ctx, x: list[Any]) -> list[Any]:
    inp, w = x[0], x[1]
    b = x[2] if len(x) > 2 else None
    n = w.dim() - 2
    if n not in (1, 2, 3):
        raise c.refuse(f"{n}-D transposed convolution")
    if c.a("output_shape") is not None or c.a("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise c.refuse("output_shape / auto_pad on ConvTranspose (give explicit pads)")
    strides = c.a("strides", [1] * n)
    dil = c.a("dilations", [1] * n)
    pads = list(c.a("pads", [0] * 2 * n))
    outpad = list(c.a("output_padding", [0] * n))
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    y = fn(inp, w, b, stride=strides, padding=0, output_padding=outpad, groups=c.a("group", 1), dilation=dil)
    return [_pad_spatial(y, [-p for p in pads]) if any(pads) else y]


@_op("BatchNormalization")
def _batch_norm(c: _Ctx, x: list[Any]) -> list[Any]:
    if c.a("training_mode", 0):
        raise c.refuse("training_mode=1")
    y = F.batch_norm(x[0], x[3].detach(), x[4].detach(), x[1], x[2], training=False, eps=c.a("epsilon", 1e-5))
    return [y] + [x[3], x[4]][: c.outputs - 1]


@_op("InstanceNormalization")
def _instance_norm(c: _Ctx, x: list[Any]) -> list[Any]:
    return [F.instance_norm(x[0], weight=x[1], bias=x[2], eps=c.a("epsilon", 1e-5))]


@_op("LayerNormalization")
def _layer_norm(c: _Ctx, x: list[Any]) -> list[Any]:
    if c.outputs > 1:
        raise c.refuse("LayerNormalization's mean / inv-std outputs")
    axis = c.a("axis", -1) % x[0].dim()
    shape = list(x[0].shape[axis:])
    w = x[1].expand(shape) if x[1].shape != tuple(shape) else x[1]
    b = x[2] if len(x) > 2 and x[2] is not None else None
    if b is not None and b.shape != tuple(shape):
        b = b.expand(shape)
    return [F.layer_norm(x[0], shape, w, b, eps=c.a("epsilon", 1e-5))]


def _pool_args(c: _Ctx, x: Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = list(c.a("kernel_shape"))
    n = len(kernel)
    strides = list(c.a("strides", [1] * n))
    dil = list(c.a("dilations", [1] * n))
    pads = _conv_pads(c, list(x.shape[2:]), kernel, strides, dil)
    return kernel, strides, dil, pads


@_op("MaxPool")
def _max_pool(c: _Ctx, x: list[Any]) -> list[Any]:
    if c.outputs > 1:
        raise c.refuse("MaxPool's Indices output")
    kernel, strides, dil, pads = _pool_args(c, x[0])
    n = len(kernel)
    if c.a("storage_order", 0):
        raise c.refuse("storage_order=1")
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    sym = pads[:n] == pads[n:] and all(p <= k // 2 for p, k in zip(pads[:n], kernel, strict=True))
    inp = x[0] if sym else _pad_spatial(x[0], pads, value=-math.inf)
    return [fn(inp, kernel, strides, pads[:n] if sym else 0, dil, ceil_mode=bool(c.a("ceil_mode", 0)))]


@_op("AveragePool")
def _avg_pool(c: _Ctx, x: list[Any]) -> list[Any]:
    kernel, strides, dil, pads = _pool_args(c, x[0])
    n = len(kernel)
    if any(d != 1 for d in dil):
        raise c.refuse("dilated AveragePool")
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    ceil = bool(c.a("ceil_mode", 0))
    include = bool(c.a("count_include_pad", 0))
    if not any(pads):
        return [fn(x[0], kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)]
    sym = pads[:n] == pads[n:] and all(p <= k // 2 for p, k in zip(pads[:n], kernel, strict=True))
    if sym and not ceil:
        return [fn(x[0], kernel, strides, pads[:n], ceil_mode=ceil, count_include_pad=include)]
    padded = _pad_spatial(x[0], pads)
    s = fn(padded, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)
    if include:
        return [s]
    ones = _pad_spatial(torch.ones_like(x[0][:1, :1]), pads)
    return [s / fn(ones, kernel, strides, 0, ceil_mode=ceil, count_include_pad=True)]


_op("GlobalAveragePool")(lambda c, x: [x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)])
_op("GlobalMaxPool")(lambda c, x: [x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True)])


@_op("Softmax", "LogSoftmax")
def _softmax(c: _Ctx, x: list[Any]) -> list[Any]:
    fn = torch.softmax if c.op == "Softmax" else torch.log_softmax
    if c.opset >= 13:
        return [fn(x[0], c.a("axis", -1))]
    axis = c.a("axis", 1) % x[0].dim()  # before opset 13: over the flattened dims from axis on
    shape = x[0].shape
    flat = x[0].reshape(int(np.prod(shape[:axis], dtype=np.int64)), -1)
    return [fn(flat, -1).reshape(shape)]


# ---------------------------------------------------------------------------------------------
# reductions
# ---------------------------------------------------------------------------------------------
@_op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare")
def _reduce(c: _Ctx, x: list[Any]) -> list[Any]:
    axes_from_input = c.opset >= 18 or (c.op == "ReduceSum" and c.opset >= 13)
    axes = _ints(x[1]) if axes_from_input and len(x) > 1 and x[1] is not None else list(c.a("axes", []) or [])
    keep = bool(c.a("keepdims", 1))
    t = x[0]
    if not axes:
        if c.a("noop_with_empty_axes", 0):
            return [t]
        axes = list(range(t.dim()))
    axes = [a % t.dim() for a in axes]
    if c.op == "ReduceMean":
        return [t.mean(dim=axes, keepdim=keep)]
    if c.op == "ReduceSum":
        return [t.sum(dim=axes, keepdim=keep)]
    if c.op == "ReduceSumSquare":
        return [(t * t).sum(dim=axes, keepdim=keep)]
    if c.op == "ReduceL2":
        return [torch.sqrt((t * t).sum(dim=axes, keepdim=keep))]
    if c.op == "ReduceMax":
        return [t.amax(dim=axes, keepdim=keep)]
    if c.op == "ReduceMin":
        return [t.amin(dim=axes, keepdim=keep)]
    out = t
    for a in sorted(axes, reverse=True):
        out = out.prod(dim=a, keepdim=keep)
    return [out]


@_op("ArgMax", "ArgMin")
def _argmax(c: _Ctx, x: list[Any]) -> list[Any]:
    if c.a("select_last_index", 0):
        raise c.refuse("select_last_index=1")
    fn = torch.argmax if c.op == "ArgMax" else torch.argmin
    return [fn(x[0], dim=c.a("axis", 0), keepdim=bool(c.a("keepdims", 1)))]


# ---------------------------------------------------------------------------------------------
# shape manipulation
# ---------------------------------------------------------------------------------------------
@_op("Shape")
def _shape(c: _Ctx, x: list[Any]) -> list[Any]:
    s = list(x[0].shape)
    start, end = c.a("start", 0), c.a("end")
    return [torch.tensor(s[start:end] if end is not None else s[start:], dtype=torch.int64)]


_op("Size")(lambda c, x: [torch.tensor(x[0].numel(), dtype=torch.int64)])


@_op("Reshape")
def _reshape(c: _Ctx, x: list[Any]) -> list[Any]:
    shape = _ints(x[1]) if c.opset >= 5 else list(c.a("shape"))
    if not c.a("allowzero", 0):
        shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x[0].reshape(shape)]


@_op("Flatten")
def _flatten(c: _Ctx, x: list[Any]) -> list[Any]:
    axis = c.a("axis", 1) % (x[0].dim() + 1) if x[0].dim() else 0
    lead = int(np.prod(x[0].shape[:axis], dtype=np.int64))
    return [x[0].reshape(lead, -1)]


@_op("Transpose")
def _transpose(c: _Ctx, x: list[Any]) -> list[Any]:
    perm = c.a("perm") or list(reversed(range(x[0].dim())))
    return [x[0].permute(*perm)]


@_op("Squeeze")
def _squeeze(c: _Ctx, x: list[Any]) -> list[Any]:
    axes = _ints(x[1]) if c.opset >= 13 and len(x) > 1 and x[1] is not None else list(c.a("axes", []) or [])
    t = x[0]
    if not axes:
        return [t.squeeze()]
    for a in sorted((a % t.dim() for a in axes), reverse=True):
        t = t.squeeze(a)
    return [t]


@_op("Unsqueeze")
def _unsqueeze(c: _Ctx, x: list[Any]) -> list[Any]:
    axes = _ints(x[1]) if c.opset >= 13 else list(c.a("axes"))
    t = x[0]
    rank = t.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        t = t.unsqueeze(a)
    return [t]


@_op("Concat")
def _concat(c: _Ctx, x: list[Any]) -> list[Any]:
    parts = [t for t in x if t is not None and not (t.dim() == 1 and t.shape[0] == 0 and x[0].dim() != 1)]
    dtype = parts[0].dtype
    for p in parts[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return [torch.cat([p.to(dtype) for p in parts], dim=c.a("axis"))]


@_op("Slice")
def _slice(c: _Ctx, x: list[Any]) -> list[Any]:
    t = x[0]
    if c.opset < 10:
        starts, ends = list(c.a("starts")), list(c.a("ends"))
        axes = list(c.a("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(x[1]), _ints(x[2])
        axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    for st, en, ax, sp in zip(starts, ends, axes, steps, strict=True):
        ax %= t.dim()
        d = t.shape[ax]
        if sp > 0:
            st = min(max(st + d if st < 0 else st, 0), d)
            en = min(max(en + d if en < 0 else en, 0), d)
            t = t.narrow(ax, st, max(en - st, 0)) if sp == 1 else t.narrow(ax, st, max(en - st, 0))[
                (slice(None),) * ax + (slice(None, None, sp),)]
        else:
            st = min(max(st + d if st < 0 else st, -1), d - 1)
            en = min(max(en + d if en < 0 else en, -1), d - 1)
            idx = torch.arange(st, en, sp, dtype=torch.long)
            t = t.index_select(ax, idx)
    return [t]


@_op("Split")
def _split(c: _Ctx, x: list[Any]) -> list[Any]:
    axis = c.a("axis", 0)
    d = x[0].shape[axis]
    if c.opset >= 13 and len(x) > 1 and x[1] is not None:
        sizes = _ints(x[1])
    elif c.a("split") is not None:
        sizes = list(c.a("split"))
    else:
        k = c.a("num_outputs", c.outputs)
        each = -(-d // k)
        sizes = [min(each, d - i * each) for i in range(k)]
    return list(torch.split(x[0], sizes, dim=axis))


@_op("Gather")
def _gather(c: _Ctx, x: list[Any]) -> list[Any]:
    t, idx = x[0], x[1].long()
    axis = c.a("axis", 0) % t.dim()
    idx = torch.where(idx < 0, idx + t.shape[axis], idx)
    out = t.index_select(axis, idx.reshape(-1))
    return [out.reshape((*t.shape[:axis], *idx.shape, *t.shape[axis + 1:]))]


@_op("GatherElements")
def _gather_elements(c: _Ctx, x: list[Any]) -> list[Any]:
    axis = c.a("axis", 0) % x[0].dim()
    idx = x[1].long()
    idx = torch.where(idx < 0, idx + x[0].shape[axis], idx)
    return [torch.gather(x[0], axis, idx)]


@_op("Expand")
def _expand(c: _Ctx, x: list[Any]) -> list[Any]:
    shape = torch.broadcast_shapes(tuple(x[0].shape), tuple(_ints(x[1])))
    return [x[0].expand(shape)]


@_op("Tile")
def _tile(c: _Ctx, x: list[Any]) -> list[Any]:
    return [x[0].repeat(*_ints(x[1]))]


@_op("ConstantOfShape")
def _constant_of_shape(c: _Ctx, x: list[Any]) -> list[Any]:
    v = c.a("value")
    arr = np.zeros(1, np.float32) if v is None else np.asarray(v).reshape(-1)
    return [torch.full(_ints(x[0]), float(arr[0]) if arr.dtype.kind == "f" else int(arr[0]),
                       dtype=torch.from_numpy(np.array(arr)).dtype)]


@_op("Range")
def _range(c: _Ctx, x: list[Any]) -> list[Any]:
    return [torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype)]


@_op("Pad")
def _pad(c: _Ctx, x: list[Any]) -> list[Any]:
    mode = c.a("mode", "constant")
    t = x[0]
    if c.opset < 11:
        pads, value = list(c.a("pads")), float(c.a("value", 0.0))
    else:
        pads = _ints(x[1])
        value = float(x[2].reshape(-1)[0].item()) if len(x) > 2 and x[2] is not None and x[2].numel() else 0.0
        if len(x) > 3 and x[3] is not None:  # opset 18: pads only on these axes
            axes = [a % t.dim() for a in _ints(x[3])]
            full = [0] * (2 * t.dim())
            for i, a in enumerate(axes):
                full[a], full[a + t.dim()] = pads[i], pads[i + len(axes)]
            pads = full
    r = t.dim()
    torch_pads: list[int] = []
    for i in reversed(range(r)):
        torch_pads += [pads[i], pads[i + r]]
    # torch pads only trailing dims for reflect/replicate: drop the leading all-zero pairs
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    if mode == "constant":
        return [F.pad(t, torch_pads, value=value)]
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise c.refuse(f"Pad mode {mode!r}")
    lead = t.dim() - len(torch_pads) // 2
    if lead < 1:  # torch wants a batch dim in front of the padded dims
        return [F.pad(t.unsqueeze(0), torch_pads, mode=torch_mode).squeeze(0)]
    return [F.pad(t, torch_pads, mode=torch_mode)]


@_op("Resize", "Upsample")
def _resize(c: _Ctx, x: list[Any]) -> list[Any]:
    t = x[0]
    mode = c.a("mode", "nearest")
    if c.op == "Upsample" or c.opset < 11:
        scales_t, sizes_t = (x[1] if len(x) > 1 else None), None
        coord, nearest = "asymmetric", "floor"
    else:
        scales_t = x[2] if len(x) > 2 and x[2] is not None and x[2].numel() else None
        sizes_t = x[3] if len(x) > 3 and x[3] is not None and x[3].numel() else None
        coord = c.a("coordinate_transformation_mode", "half_pixel")
        nearest = c.a("nearest_mode", "round_prefer_floor")
    if c.a("axes") is not None or c.a("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise c.refuse("Resize with axes / keep_aspect_ratio_policy")
    if sizes_t is not None:
        size = _ints(sizes_t)
        scales = [o / i for o, i in zip(size, t.shape, strict=True)]
    else:
        scales = [float(s) for s in scales_t.reshape(-1).tolist()]
        size = [math.floor(d * s) for d, s in zip(t.shape, scales, strict=True)]
    if size[:2] != list(t.shape[:2]):
        raise c.refuse("Resize over the batch or channel axis")
    spatial = size[2:]
    integer_up = all(float(s).is_integer() and s >= 1 for s in scales[2:])
    if mode == "nearest":
        if coord == "asymmetric" and nearest == "floor" or integer_up and coord in (
                "asymmetric", "half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn") and nearest in (
                "floor", "round_prefer_floor", "round_prefer_ceil"):
            return [F.interpolate(t, size=spatial, mode="nearest")]
        raise c.refuse(f"nearest Resize with coordinate_transformation_mode={coord}, nearest_mode={nearest} at "
                       f"scales {scales[2:]}")
    if mode == "linear" and t.dim() in (3, 4, 5):
        torch_mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[t.dim()]
        if coord == "align_corners":
            return [F.interpolate(t, size=spatial, mode=torch_mode, align_corners=True)]
        if coord in ("half_pixel", "pytorch_half_pixel") and all(s > 1 for s in spatial):
            return [F.interpolate(t, size=spatial, mode=torch_mode, align_corners=False)]
    raise c.refuse(f"Resize mode={mode}, coordinate_transformation_mode={coord}")


@_op("Constant")
def _constant(c: _Ctx, x: list[Any]) -> list[Any]:  # evaluated once at construction (see TorchGraph)
    raise AssertionError("Constant nodes are folded at construction")


# ---------------------------------------------------------------------------------------------
# quantization (fake quant, straight-through)
# ---------------------------------------------------------------------------------------------
_INT_RANGE = {torch.int8: (-128, 127), torch.uint8: (0, 255), torch.int32: (-(2 ** 31), 2 ** 31 - 1),
              torch.int16: (-(2 ** 15), 2 ** 15 - 1), torch.uint16: (0, 2 ** 16 - 1)}


def _axis_view(p: Tensor, x: Tensor, axis: int) -> Tensor:
    """A per-axis scale / zero point shaped to broadcast against ``x`` along ``axis``."""
    if p.dim() == 0 or p.numel() == 1 and x.dim() == 0:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis % x.dim()] = p.numel()
    return p.reshape(shape)


def _round_ste(v: Tensor) -> Tensor:
    return v + (torch.round(v) - v).detach()


def fake_quant(w: Tensor, scale: Tensor, zero: Tensor | None, lo: int, hi: int, axis: int = 1) -> Tensor:
    """``DequantizeLinear(QuantizeLinear(w))`` onto the integers ``lo..hi``, with the rounding
    passed straight through for the gradient (clamped values get none), as quantization-aware
    training does."""
    s = _axis_view(scale, w, axis)
    z = _axis_view(zero.to(w.dtype), w, axis) if zero is not None else torch.zeros((), dtype=w.dtype)
    q = torch.clamp(_round_ste(w / s) + z, lo, hi)
    return (q - z) * s


@_op("QuantizeLinear")
def _quantize_linear(c: _Ctx, x: list[Any]) -> list[Any]:
    # integer values kept in float (the gradient goes through; DequantizeLinear reads them back)
    qtype = x[2].dtype if len(x) > 2 and x[2] is not None else _torch_dtype(c.a("output_dtype", 2) or 2)
    if qtype not in _INT_RANGE:
        raise c.refuse(f"QuantizeLinear to {qtype}")
    lo, hi = _INT_RANGE[qtype]
    axis = c.a("axis", 1)
    s = _axis_view(x[1], x[0], axis)
    z = _axis_view(x[2].to(x[0].dtype), x[0], axis) if len(x) > 2 and x[2] is not None else 0.0
    return [torch.clamp(_round_ste(x[0] / s) + z, lo, hi)]


@_op("DequantizeLinear")
def _dequantize_linear(c: _Ctx, x: list[Any]) -> list[Any]:
    v = x[0].to(x[1].dtype)
    axis = c.a("axis", 1)
    s = _axis_view(x[1], v, axis)
    z = _axis_view(x[2].to(v.dtype), v, axis) if len(x) > 2 and x[2] is not None else 0.0
    return [(v - z) * s]


# ---------------------------------------------------------------------------------------------
# recurrent
# ---------------------------------------------------------------------------------------------
@_op("LSTM")
def _lstm(c: _Ctx, x: list[Any]) -> list[Any]:
    acts = [a.lower() if isinstance(a, str) else a.decode().lower() for a in (c.a("activations") or [])]
    if acts and any(a != d for a, d in zip(acts, ["sigmoid", "tanh", "tanh"] * 2, strict=False)):
        raise c.refuse(f"LSTM activations {acts}")
    if c.a("clip") is not None or c.a("input_forget", 0):
        raise c.refuse("LSTM clip / input_forget")
    if len(x) > 7 and x[7] is not None:
        raise c.refuse("LSTM peepholes")
    layout = c.a("layout", 0)
    xs = x[0].transpose(0, 1) if layout else x[0]  # [T, N, I]
    w, r = x[1], x[2]
    dirs, hidden = w.shape[0], w.shape[1] // 4
    seq_len, batch = xs.shape[0], xs.shape[1]
    b = x[3] if len(x) > 3 and x[3] is not None else torch.zeros(dirs, 8 * hidden, dtype=xs.dtype)
    if len(x) > 4 and x[4] is not None and bool((x[4] != seq_len).any()):
        raise c.refuse("LSTM sequence_lens shorter than the sequence")
    h0 = x[5] if len(x) > 5 and x[5] is not None else torch.zeros(dirs, batch, hidden, dtype=xs.dtype)
    c0 = x[6] if len(x) > 6 and x[6] is not None else torch.zeros(dirs, batch, hidden, dtype=xs.dtype)
    if layout:
        h0, c0 = h0.transpose(0, 1), c0.transpose(0, 1)
    direction = c.a("direction", "forward")
    ys, hs, cs = [], [], []
    for d in range(dirs):
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        pre = torch.matmul(xs, w[d].t()) + b[d, : 4 * hidden] + b[d, 4 * hidden:]  # [T, N, 4H]
        h, cell = h0[d], c0[d]
        out: list[Tensor] = [None] * seq_len  # type: ignore[list-item]
        steps = range(seq_len - 1, -1, -1) if reverse else range(seq_len)
        for t in steps:
            g = pre[t] + h @ r[d].t()
            i, o, f, cc = g.chunk(4, dim=-1)  # ONNX gate order: input, output, forget, cell
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(cc)
            h = torch.sigmoid(o) * torch.tanh(cell)
            out[t] = h
        ys.append(torch.stack(out))  # [T, N, H]
        hs.append(h)
        cs.append(cell)
    y = torch.stack(ys, dim=1)  # [T, dirs, N, H]
    yh, yc = torch.stack(hs), torch.stack(cs)
    if layout:
        y, yh, yc = y.permute(2, 0, 1, 3), yh.transpose(0, 1), yc.transpose(0, 1)
    return [y, yh, yc][: c.outputs]


SUPPORTED_OPS: tuple[str, ...] = tuple(sorted(_OPS))


# ---------------------------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------------------------
def _key(i: int) -> str:
    return f"w{i}"


class TorchGraph(torch.nn.Module):
    """An ONNX model's main graph as a differentiable PyTorch module.

    Args:
        model: the model (``onnx.ModelProto``; external data already loaded).
        trainable: which float constants become parameters: ``"weights"`` (default: float
            initializers / ``Constant`` tensors of more than one element read only as weights:
            Conv/Gemm/MatMul operands, biases, BatchNorm scale and shift, Add/Mul operands,
            LSTM weights), or an explicit collection of names.
        qat: integer initializers read only by ``DequantizeLinear`` (a QDQ model's weights and
            biases) become float parameters trained through fake quantization.

    Raises:
        UnsupportedModelError: a node whose op (or domain, or subgraph) the lowering does not cover.
    """

    def __init__(self, model: onnx.ModelProto, *, trainable: str | Iterable[str] = "weights",
                 qat: bool = True) -> None:
        super().__init__()
        g = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.constant_nodes: dict[str, str] = {}  # value name -> Constant node name
        self.nodes: list[tuple[_Ctx, _Handler]] = []
        for n in g.node:
            ctx = _Ctx(n, self.opset)
            if n.domain not in ("", "ai.onnx"):
                raise ctx.refuse(f"op domain {n.domain!r}")
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
                raise ctx.refuse("nodes with subgraphs (If/Loop/Scan)")
            if n.op_type == "Constant":
                consts[n.output[0]] = self._constant_value(ctx)
                self.constant_nodes[n.output[0]] = n.name
                continue
            fn = _OPS.get(n.op_type)
            if fn is None:
                raise UnsupportedModelError(
                    f"node {ctx.name!r}: op {n.op_type} is not supported by the torch lowering of graphopt distill "
                    f"(it covers {', '.join(SUPPORTED_OPS)})")
            self.nodes.append((ctx, fn))
        self.inputs = [i.name for i in g.input if i.name not in consts]
        self.outputs = [o.name for o in g.output]
        uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for n in g.node:
            for k, name in enumerate(n.input):
                if name:
                    uses.setdefault(name, []).append((n, k))

        def read_as_weight(name: str, depth: int = 0) -> bool:
            u = uses.get(name, [])
            return bool(u) and name not in outputs and all(
                read_as_weight(n.output[0], depth + 1) if n.op_type == "Cast" and depth < 2 else
                ((s := _WEIGHT_SLOTS.get(n.op_type, set())) is None or k in s) for n, k in u)

        outputs = set(self.outputs)
        names = set(trainable) if not isinstance(trainable, str) else None
        self.param_names: list[str] = []
        self.qat_params: dict[str, tuple[Any, ...]] = {}  # name -> (np dtype, scale, zero, axis)
        params: list[torch.nn.Parameter] = []
        self.fixed: dict[str, Tensor] = {}
        dq_of = {n.input[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
        for name, arr in consts.items():
            u = uses.get(name, [])
            if arr.dtype.kind == "f" and (name in names if names is not None else (
                    arr.size > 1 and read_as_weight(name))):
                self.param_names.append(name)
                params.append(torch.nn.Parameter(torch.from_numpy(np.array(arr, np.float32))))
            elif (qat and arr.dtype.kind in "iu" and arr.size > 1 and u and name in dq_of and all(
                    n.op_type == "DequantizeLinear" and k == 0 for n, k in u) and (names is None or name in names)
                  and name not in outputs):
                dq = dq_of[name]
                scale = consts.get(dq.input[1])
                zero = consts.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
                if scale is None or (len(dq.input) > 2 and dq.input[2] and zero is None):
                    self.fixed[name] = torch.from_numpy(np.array(arr))
                    continue
                axis = next((helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"), 1)
                axis = axis % max(arr.ndim, 1)
                zero_arr = zero if zero is not None else np.zeros((), arr.dtype)
                w = (arr.astype(np.float64) - _np_axis(zero_arr, arr, axis)) * _np_axis(scale, arr, axis)
                info = np.iinfo(arr.dtype)  # a symmetric int8 quantizer's -127..127 stays so
                lo = info.min + 1 if arr.dtype == np.int8 and arr.size and arr.min() > info.min else info.min
                self.qat_params[name] = (arr.dtype, scale, zero_arr, axis, lo, info.max)
                self.param_names.append(name)
                params.append(torch.nn.Parameter(torch.from_numpy(np.asarray(w, np.float32))))
            else:
                self.fixed[name] = torch.from_numpy(np.array(arr)) if arr.dtype != object else arr
        self.weights = torch.nn.ParameterList(params)
        self._index = {n: i for i, n in enumerate(self.param_names)}
        self._dtypes = {n: consts[n].dtype for n in self.param_names}
        self._qat_tensors = {n: (torch.from_numpy(np.array(s, np.float32)), torch.from_numpy(np.array(z)), ax, lo, hi)
                             for n, (_, s, z, ax, lo, hi) in self.qat_params.items()}

    @staticmethod
    def _constant_value(ctx: _Ctx) -> np.ndarray:
        for key, v in ctx.attrs.items():
            if key == "value":
                return np.asarray(v)
            if key in ("value_float", "value_floats"):
                return np.asarray(v, np.float32)
            if key in ("value_int", "value_ints"):
                return np.asarray(v, np.int64)
        raise ctx.refuse("Constant without a dense tensor value")

    def _weight(self, name: str) -> Tensor:
        p = self.weights[self._index[name]]
        if name in self._qat_tensors:
            scale, zero, axis, lo, hi = self._qat_tensors[name]
            q = fake_quant(p, scale, zero, lo, hi, axis)
            # DequantizeLinear reads integer values: hand it (q / s + z) so its own arithmetic gives q
            s = _axis_view(scale, p, axis)
            z = _axis_view(zero.to(p.dtype), p, axis)
            return q / s + z
        dt = self._dtypes[name]
        return p if dt == np.float32 else p.to(torch.from_numpy(np.zeros(1, dt)).dtype)

    def forward(self, feeds: Mapping[str, Tensor], capture: Sequence[str] = ()) -> dict[str, Tensor]:
        """Run the graph on ``feeds`` (input name -> tensor); return the outputs and any
        intermediate values named in ``capture``."""
        env: dict[str, Any] = dict(self.fixed)
        for n in self.param_names:
            env[n] = self._weight(n)
        for k in self.inputs:
            if k not in feeds:
                raise UnsupportedModelError(f"input {k!r} missing from the feed")
            v = feeds[k]
            env[k] = v if isinstance(v, Tensor) else torch.from_numpy(np.asarray(v))
        for ctx, fn in self.nodes:
            args = [env[i] if i else None for i in ctx.node.input]
            try:
                outs = fn(ctx, args)
            except UnsupportedModelError:
                raise
            except (RuntimeError, ValueError, IndexError, TypeError) as e:
                raise UnsupportedModelError(f"node {ctx.name!r} ({ctx.op}) failed in the torch lowering: "
                                            f"{str(e).splitlines()[0][:300]}") from None
            for name, v in zip(ctx.node.output, outs, strict=False):
                if name:
                    env[name] = v
        want = list(dict.fromkeys([*self.outputs, *capture]))
        missing = [k for k in want if k not in env]
        if missing:
            raise UnsupportedModelError(f"values {missing} are not computed by the main graph")
        return {k: env[k] for k in want}

    def trained_arrays(self) -> dict[str, np.ndarray]:
        """Every parameter as a numpy array of its initializer's dtype and shape (QAT weights
        quantized with their fixed scale and zero point)."""
        out = {}
        with torch.no_grad():
            for n in self.param_names:
                p = self.weights[self._index[n]].detach().to(torch.float64).numpy()
                if n in self.qat_params:
                    dt, scale, zero, axis, lo, hi = self.qat_params[n]
                    q = np.round(p / _np_axis(scale, p, axis)) + _np_axis(zero, p, axis).astype(np.float64)
                    out[n] = np.clip(q, lo, hi).astype(dt)
                else:
                    out[n] = p.astype(self._dtypes[n])
        return out


def _np_axis(p: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    p = np.asarray(p)
    if p.ndim == 0 or x.ndim == 0:
        return p.reshape(())
    shape = [1] * x.ndim
    shape[axis % x.ndim] = p.size
    return p.reshape(shape)
