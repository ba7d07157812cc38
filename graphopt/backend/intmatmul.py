"""Integer matmuls as uint8 x int8 -> int32 kernels (the operands of the CPU's dot products).

TVM's ONNX frontend converts ``MatMulInteger(a, b)`` into ``matmul(astype(a, int32),
astype(b, int32))``: an int32 x int32 product whose constant weight is widened to four bytes a
value. ORT's dynamically quantized models (``DynamicQuantizeLinear -> MatMulInteger``, and the
integer products graphopt's ``lower-integer`` writes for ``DynamicQuantizeLSTM``) read uint8
activations and int8 weights, so :func:`native_integer_matmuls` rewrites that form back into
``matmul(a_u8, b_i8, out_dtype=int32)`` - the same exact integer sums - with the weight's rows
padded to a multiple of 4 and its columns to a multiple of 16 (zero weights; the extra columns are
sliced off). :class:`graphopt.backend.int8.Int8DotRule` then schedules it with ``vpdpbusd``
where the CPU has VNNI (the float tiled rule takes it elsewhere: still integer).

On ddddocr_ocr_int8 this is the classifier's 1024 x 8210 weight (8.4 MB read per run instead of
33.6 MB) and the unrolled LSTM's two 512 x 2048 weights per direction, read once a step.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: vpdpbusd: 16 int32 lanes, each the sum of 4 uint8 x int8 products
_N_BLOCK = 16
_K_BLOCK = 4


def native_integer_matmuls(mod: Any) -> tuple[Any, int]:
    """Rewrite ``matmul(astype(a_u8, int32), astype(b, int32))`` with a constant ``b`` whose values
    fit int8 (2-D, ``[K, N]``) into ``matmul(a_u8, b_i8, out_dtype=int32)``, padded to whole
    dot-product blocks. Returns the module and the number rewritten."""
    import tvm
    from tvm import relax

    from .int8 import _const_array

    op_mm, op_cast = tvm.ir.Op.get("relax.matmul"), tvm.ir.Op.get("relax.astype")
    count = [0]

    def is_call(e: Any, op: Any) -> bool:
        return isinstance(e, relax.Call) and e.op.same_as(op)

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def _bound(self, x: Any) -> Any:
            return self.lookup_binding(x) if isinstance(x, relax.Var) else x

        def _widened(self, x: Any) -> Any:
            """``y`` where ``x`` is ``astype(y, int32)``."""
            b = self._bound(x)
            if is_call(b, op_cast) and str(b.attrs.dtype) == "int32":
                return b.args[0]
            return None

        def _weight(self, x: Any) -> np.ndarray | None:
            """The constant int8 matrix behind ``x`` (an int32 constant, or an int8 one widened)."""
            inner = self._widened(x)
            a = _const_array(self._bound(inner) if inner is not None else self._bound(x))
            if a is None or a.ndim != 2 or a.dtype.kind not in "iu" or a.size == 0:
                return None
            if a.min() < -128 or a.max() > 127:
                return None
            return a.astype(np.int8)

        def visit_call_(self, call: Any) -> Any:
            if not is_call(call, op_mm) or str(call.attrs.out_dtype) not in ("int32", "void", ""):
                return super().visit_call_(call)
            a = self._widened(call.args[0])
            w = self._weight(call.args[1])
            if a is None or w is None or str(getattr(a.ty, "dtype", "")) != "uint8":
                return super().visit_call_(call)
            k, n = w.shape
            kp, np_ = -(-k // _K_BLOCK) * _K_BLOCK, -(-n // _N_BLOCK) * _N_BLOCK
            wp = np.zeros((kp, np_), np.int8)
            wp[:k, :n] = w
            a = self.visit_expr(a)
            rank = len(a.ty.shape)
            if kp != k:  # zero weight rows: the padded activations add nothing
                a = self.builder_.emit(relax.op.nn.pad(a, [0, 0] * (rank - 1) + [0, kp - k], pad_value=0.0))
            acc = relax.op.matmul(a, relax.const(wp), out_dtype="int32")
            if np_ != n:
                acc = relax.op.strided_slice(self.builder_.emit(acc), [rank - 1], [0], [n])
            count[0] += 1
            return acc

    rw = _Rewriter()
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = rw.visit_expr(func)
    if count[0]:
        mod = relax.transform.DeadCodeElimination()(mod)
        logger.info("%d integer matmuls as uint8 x int8 -> int32 kernels", count[0])
    return mod, count[0]
