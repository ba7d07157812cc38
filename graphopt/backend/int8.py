"""Integer INT8 kernels for QDQ models under TVM: int8 x int8 -> int32 conv2d and matmul with
requantization, and a default CPU schedule that uses the dot-product instructions (AVX-512 VNNI
``vpdpbusd``).

TVM's ONNX frontend imports a QDQ model (``graphopt quantize``: uint8 or int8 activations,
per-channel int8 weights) as ``dequantize -> float conv2d/matmul -> quantize``: it runs in float.
:func:`graphopt.backend.compiler.lower` rewrites it in Relax, in three steps:

1. :func:`elementwise_qdq`: per-tensor ``quantize``/``dequantize`` become the elementwise ops TVM
   legalizes them to (same arithmetic). Relax's layout conversion has no rule for the two ops, so
   in a channels-last build each one sat between two transposes; as elementwise ops they convert.
2. :func:`rewrite_qdq` (matmuls before the compiler pads matmul widths, convolutions after the
   layout conversion, in whatever layout they then have):
   ``conv2d(dequantize(xq, sx, zx), W)`` (``W`` the float constant the weight's
   DequantizeLinear folded into, ``W = wq * sw``) becomes

       acc = conv2d(pad(u8(xq), value=zx), wq, out_dtype=int32)       # integer, exact
       y   = float(acc - zx * sum(wq)) * (sx * sw)                     # requantization scale

   and the same for ``matmul`` (weights ``[K, N]``). ``u8`` shifts int8 activations by 128 (and
   their zero point with them) so every kernel is unsigned x signed, the operand order of
   ``vpdpbusd``. The spatial padding is explicit, with the zero point as the pad value, so padded
   pixels are real zeros and the zero-point correction is one constant per output channel.
   Input channels (K) are padded to a multiple of 4 and output channels (N) to a multiple of 16
   (zero weights; the extra outputs are sliced off) so the reduction is whole ``vpdpbusd``
   steps. Bias, activation and the next ``quantize`` stay as they are and Relax fuses them into
   the kernel's epilogue: one kernel reads uint8 and writes uint8.
3. :class:`Int8DotRule`, the first tiled rule of :data:`graphopt.backend.schedules.DEFAULT_RULES`,
   schedules those kernels: weights packed ``[N/16, ..., K/4, 16, 4]`` at compile time, a register
   tile of accumulators, the inner 16x4 block tensorized as one ``vpdpbusd``
   (:data:`VNNI_LOCAL_INTRIN`), the epilogue on write-back. On an aarch64 target with
   ``+dotprod`` the rewrite reads int8 activations (uint8 ones shifted by -128) and
   :class:`graphopt.backend.int8_arm.ArmDotRule` tensorizes the same block onto Arm ``sdot``;
   without either instruction the model keeps its float kernels.

How the int8 weights are found: graphopt's lossless pipeline folds each weight's
DequantizeLinear into a float constant before import. :func:`weight_table` reads the model before
that, computes each constant DequantizeLinear exactly as ONNX Runtime does (``float(wq - z) *
s``, one float32 rounding), and keys the integer weights by the bytes of that float result; the
rewrite looks every conv2d/matmul weight up by its bytes. A weight that is not found (changed by
a fusion, or not from a DequantizeLinear) keeps its float kernel (counted as ``float_kept``).

Exactness: the integer accumulation is exact on both sides; ORT requantizes ``(acc + bias_q) *
(sx*sw/sy)``, TVM ``((acc - zx*sum(w)) * (sx*sw) + bias) / sy``: the same real number through
different float32 roundings, so an output within a rounding error of a .5 tie can land one
quantization step away (tests/test_tvm_int8.py asserts at most one step, on at most 1% of the
outputs; on its nets none differ).

Grouped and depthwise convolutions become integer kernels too (``int8_grouped_conv2d``; exact like
ORT's integer ones), without ``vpdpbusd``, which sums 4 input channels of one output channel where
a depthwise conv has one: the float tiled rule schedules them (int32 lanes). Convs and matmuls
whose activation is not a per-tensor dequantize keep their float kernel (``float_kept``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.ir import Model

logger = logging.getLogger(__name__)

#: vpdpbusd: 16 int32 lanes, each the sum of 4 uint8 x int8 products
OC_BLOCK = 16
K_BLOCK = 4


@dataclass
class IntWeight:
    """A weight that a constant DequantizeLinear made: integer values, per-channel scales."""

    q: np.ndarray  # int8
    scale: np.ndarray  # float32, broadcastable against q along ``axis``
    axis: int


def _key(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha1(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()


def weight_table(model: Model) -> dict[str, IntWeight]:
    """Integer weights of ``model``'s constant DequantizeLinear nodes, keyed by the bytes of the
    float tensor each one computes (see the module docstring). Only int8 weights with zero
    zero points: the symmetric weights ``graphopt quantize`` and ORT's quantizer write."""
    table: dict[str, IntWeight] = {}
    for g in model.all_graphs():
        for n in g.iter_nodes():
            if n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx") or n.input(0) is None:
                continue
            q = n.input(0).const_value()
            s = n.input(1).const_value() if n.input(1) is not None else None
            z = n.input(2).const_value() if len(n.inputs) > 2 and n.input(2) is not None else None
            if q is None or s is None or q.dtype != np.int8 or q.ndim < 2 or s.dtype != np.float32:
                continue
            if z is not None and np.any(z != 0):
                continue
            axis = int(n.attr("axis", 1) or 0)
            axis = axis % q.ndim
            if s.ndim == 1 and s.size > 1:
                shape = [1] * q.ndim
                shape[axis] = s.size
                sb = s.reshape(shape)
            elif s.size == 1:
                sb = s.reshape([1] * q.ndim)
            else:
                continue
            w = q.astype(np.float32) * sb  # ORT: float(q - 0) * scale, one rounding
            table[_key(w.astype(np.float32))] = IntWeight(q, sb.astype(np.float32), axis)
    return table


def _const_array(e: Any) -> np.ndarray | None:
    from tvm.ir.expr import GenericConst

    if isinstance(e, GenericConst):
        try:
            return e.value.numpy()
        except Exception:  # noqa: BLE001 - not a tensor constant
            return None
    return None


def _scalar(e: Any) -> float | int | None:
    a = _const_array(e)
    if a is None or a.size != 1:
        return None
    return a.reshape(()).item()


def rewrite_qdq(mod: Any, table: Mapping[str, IntWeight], kinds: tuple[str, ...] = ("conv2d", "matmul"),
                *, grouped: bool = True, activations: str = "uint8") -> tuple[Any, dict[str, int]]:
    """Rewrite ``dequantize -> conv2d/matmul`` with known int8 weights into integer kernels (see
    the module docstring). Returns the module and counts (``int8_conv2d``, ``int8_matmul``,
    ``float_kept``: conv2d/matmul on dequantized activations left float). ``activations``: the
    dtype the kernels read, activations of the other one shifted by 128 (``uint8`` for x86
    ``vpdpbusd``; ``int8`` for Arm ``sdot``, :mod:`graphopt.backend.int8_arm`).

    Runs after :func:`elementwise_qdq` and Relax's layout conversion (so the dequantize is the
    elementwise chain ``float(int32(xq) - z) * s``, and a conv2d may be NHWC/HWIO with its weight
    behind a ``permute_dims``): the integer kernel is emitted in the conv's own layout, and the
    bias, activation and requantization that follow fuse into its epilogue. ``kinds`` picks
    what to rewrite: the compiler rewrites matmuls before its own matmul padding (which would
    change their weights) and convolutions after the layout conversion.
    """
    import tvm
    from tvm import relax

    counts = {"int8_conv2d": 0, "int8_grouped_conv2d": 0, "int8_matmul": 0, "float_kept": 0}
    if not table:
        return mod, counts
    ops = {k: tvm.ir.Op.get("relax." + k) for k in ("nn.conv2d", "matmul", "multiply", "astype", "subtract",
                                                      "permute_dims")}

    def is_call(e: Any, op: str) -> bool:
        return isinstance(e, relax.Call) and e.op.same_as(ops[op])

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def _bound(self, x: Any, op: str) -> Any:
            if not isinstance(x, relax.Var):
                return None
            b = self.lookup_binding(x)
            return b if is_call(b, op) else None

        def _activation(self, x: Any) -> tuple[Any, float, int, str] | None:
            """(quantized tensor, scale, zero point, dtype) of a per-tensor dequantize, written
            ``multiply(astype(subtract(astype(xq, int32), z), float32), s)``, possibly behind a
            ``permute_dims`` (layout conversion puts one before a channels-last conv whose input
            chain stayed NCHW: the model's input); the permutation is then applied to ``xq``."""
            perm = self._bound(x, "permute_dims")
            if perm is not None:
                got = self._activation(perm.args[0])
                if got is None or perm.attrs.axes is None:
                    return None
                xq = self.builder_.emit(relax.op.permute_dims(got[0], [int(a) for a in perm.attrs.axes]))
                return (xq, *got[1:])
            mul = self._bound(x, "multiply")
            if mul is None:
                return None
            sx = _scalar(mul.args[1])
            c2 = self._bound(mul.args[0], "astype")
            sub = self._bound(c2.args[0], "subtract") if c2 is not None else None
            c1 = self._bound(sub.args[0], "astype") if sub is not None else None
            if sx is None or c1 is None or str(c1.attrs.dtype) != "int32":
                return None
            zx = _scalar(sub.args[1])
            xq = c1.args[0]
            dt = str(xq.ty.dtype) if hasattr(xq.ty, "dtype") else ""
            if zx is None or dt not in ("uint8", "int8"):
                return None
            return xq, float(sx), int(zx), dt

        def _weight(self, w: Any) -> tuple[np.ndarray, list[int]] | None:
            """The float constant behind a weight (and the permutation applied to it)."""
            axes: list[int] | None = None
            if isinstance(w, relax.Var):
                b = self.lookup_binding(w)
                if is_call(b, "permute_dims"):
                    axes = [int(a) for a in b.attrs.axes] if b.attrs.axes is not None else None
                    w = b.args[0]
            elif is_call(w, "permute_dims"):
                axes = [int(a) for a in w.attrs.axes] if w.attrs.axes is not None else None
                w = w.args[0]
            a = _const_array(w)
            if a is None or a.dtype != np.float32:
                return None
            return a, (axes if axes is not None else list(range(a.ndim)))

        def _unsigned(self, xq: Any, z: int, dt: str) -> tuple[Any, int]:
            if dt == activations:
                return xq, z
            shift = 128 if activations == "uint8" else -128  # int8 -> uint8 (x86), uint8 -> int8 (Arm)
            x16 = self.builder_.emit(relax.op.astype(xq, "int16"))
            x16 = self.builder_.emit(relax.op.add(x16, relax.const(shift, "int16")))
            return self.builder_.emit(relax.op.astype(x16, activations)), z + shift

        def visit_call_(self, call: Any) -> Any:
            if ("conv2d" in kinds and is_call(call, "nn.conv2d")) or ("matmul" in kinds and is_call(call, "matmul")):
                new = self._try(call)
                if new is not None:
                    return new
            return super().visit_call_(call)

        def _try(self, call: Any) -> Any:
            act = self._activation(call.args[0])
            wt = self._weight(call.args[1])
            if act is None or wt is None:
                return None
            iw = table.get(_key(wt[0]))
            if iw is None:
                counts["float_kept"] += 1
                return None
            if is_call(call, "nn.conv2d"):
                return self._conv(call, *act, iw, wt[1])
            return self._matmul(call, *act, iw, wt[1])

        def _conv(self, call: Any, xq: Any, sx: float, zx: int, dt: str, iw: IntWeight, perm: list[int]) -> Any:
            a = call.attrs
            dl, kl = str(a.data_layout), str(a.kernel_layout)
            groups = int(a.groups)
            if (dl not in ("NCHW", "NHWC") or iw.q.ndim != 4 or iw.axis != 0 or len(xq.ty.shape) != 4
                    or str(a.out_layout) not in ("", dl) or (groups > 1 and not grouped)
                    or "".join("OIHW"[p] for p in perm) != kl):  # the permutation made the kernel layout
                counts["float_kept"] += 1
                return None
            q = iw.q
            oc, ic = q.shape[:2]
            if groups == 1:
                ocp, icp = -(-oc // OC_BLOCK) * OC_BLOCK, -(-ic // K_BLOCK) * K_BLOCK
            else:  # grouped/depthwise: integer too (exact like ORT's), no vpdpbusd, no channel padding
                ocp, icp = oc, ic
            qp = np.zeros((ocp, icp) + q.shape[2:], np.int8)
            qp[:oc, :ic] = q
            xu, zu = self._unsigned(xq, zx, dt)
            t, l, b, r = (int(p) for p in a.padding)
            c_axis = dl.index("C")
            widths = [0] * 8
            widths[2 * c_axis + 1] = icp - ic
            widths[2 * dl.index("H"):2 * dl.index("H") + 2] = [t, b]
            widths[2 * dl.index("W"):2 * dl.index("W") + 2] = [l, r]
            if any(widths):  # explicit, with the zero point: padded pixels are real zeros
                xu = self.builder_.emit(relax.op.nn.pad(xu, widths, pad_value=float(zu)))
            acc = self.builder_.emit(relax.op.nn.conv2d(
                xu, relax.const(np.ascontiguousarray(qp.transpose(perm))), strides=[int(s) for s in a.strides],
                padding=[0, 0, 0, 0], dilation=[int(d) for d in a.dilation], groups=groups, data_layout=dl,
                kernel_layout=kl, out_layout=dl, out_dtype="int32"))
            cshape = [1, 1, 1, 1]
            cshape[c_axis] = ocp
            corr = (zu * qp.astype(np.int64).sum(axis=(1, 2, 3))).astype(np.int32).reshape(cshape)
            acc = self.builder_.emit(relax.op.subtract(acc, relax.const(corr)))
            if ocp != oc:
                acc = self.builder_.emit(relax.op.strided_slice(acc, [c_axis], [0], [oc]))
            scale = (np.float32(sx) * iw.scale.reshape(-1)).astype(np.float32)
            if scale.size == 1:
                scale = np.repeat(scale, oc)
            cshape[c_axis] = oc
            f = self.builder_.emit(relax.op.astype(acc, "float32"))
            counts["int8_conv2d" if groups == 1 else "int8_grouped_conv2d"] += 1
            return relax.op.multiply(f, relax.const(scale.reshape(cshape)))

        def _matmul(self, call: Any, xq: Any, sx: float, zx: int, dt: str, iw: IntWeight, perm: list[int]) -> Any:
            q = iw.q
            if q.ndim != 2 or perm != [0, 1] or not (iw.scale.size == 1 or iw.axis == 1):
                counts["float_kept"] += 1
                return None
            k, n = q.shape
            kp, np_ = -(-k // K_BLOCK) * K_BLOCK, -(-n // OC_BLOCK) * OC_BLOCK
            qp = np.zeros((kp, np_), np.int8)
            qp[:k, :n] = q
            xu, zu = self._unsigned(xq, zx, dt)
            rank = len(xq.ty.shape)
            if kp != k:
                xu = self.builder_.emit(relax.op.nn.pad(xu, [0, 0] * (rank - 1) + [0, kp - k], pad_value=float(zu)))
            acc = self.builder_.emit(relax.op.matmul(xu, relax.const(qp), out_dtype="int32"))
            corr = (zu * qp.astype(np.int64).sum(axis=0)).astype(np.int32)
            acc = self.builder_.emit(relax.op.subtract(acc, relax.const(corr)))
            if np_ != n:
                acc = self.builder_.emit(relax.op.strided_slice(acc, [rank - 1], [0], [n]))
            scale = (np.float32(sx) * iw.scale.reshape(-1)).astype(np.float32)
            if scale.size == 1:
                scale = np.repeat(scale, n)
            f = self.builder_.emit(relax.op.astype(acc, "float32"))
            counts["int8_matmul"] += 1
            return relax.op.multiply(f, relax.const(scale))

    rw = _Rewriter()
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = rw.visit_expr(func)
    if counts["int8_conv2d"] or counts["int8_grouped_conv2d"] or counts["int8_matmul"]:
        mod = relax.transform.DeadCodeElimination()(mod)
    logger.info("int8 kernels: %d conv2d, %d grouped conv2d, %d matmul (%d kept float)", counts["int8_conv2d"],
                counts["int8_grouped_conv2d"], counts["int8_matmul"], counts["float_kept"])
    return mod, counts


def elementwise_qdq(mod: Any) -> Any:
    """Per-tensor ``quantize``/``dequantize`` written as the elementwise ops TVM legalizes them
    to (``clip(round(x / s) + z)``, ``float(q - z) * s``: the same arithmetic, so the same
    values).

    Why: Relax's layout conversion has no rule for them, so in a channels-last build every one
    sat between two transposes (NHWC -> NCHW -> NHWC), and the requantizing ``quantize`` could not
    fuse into the integer kernel's epilogue: the kernel wrote float32 and a second kernel
    transposed, quantized and transposed back.
    """
    import tvm
    from tvm import relax

    op_q = tvm.ir.Op.get("relax.quantize")
    op_dq = tvm.ir.Op.get("relax.dequantize")

    @relax.expr_functor.mutator
    class _Elementwise(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call, relax.Call) or not (call.op.same_as(op_q) or call.op.same_as(op_dq)):
                return call
            x, s, z = call.args
            sv, zv = _scalar(s), _scalar(z)
            if sv is None or zv is None or str(call.attrs.out_dtype) not in ("uint8", "int8", "float32"):
                return call
            if call.op.same_as(op_q):
                dt = str(call.attrs.out_dtype)
                if str(x.ty.dtype) != "float32" or dt not in ("uint8", "int8"):
                    return call
                lo, hi = (0, 255) if dt == "uint8" else (-128, 127)
                y = self.builder_.emit(relax.op.divide(x, relax.const(np.float32(sv))))
                y = self.builder_.emit(relax.op.round(y))
                y = self.builder_.emit(relax.op.add(y, relax.const(np.float32(zv))))
                # (maximum/minimum, not clip: layout conversion has a rule for binary ops only)
                y = self.builder_.emit(relax.op.maximum(y, relax.const(np.float32(lo))))
                y = self.builder_.emit(relax.op.minimum(y, relax.const(np.float32(hi))))
                return relax.op.astype(y, dt)
            if str(call.attrs.out_dtype) != "float32" or str(x.ty.dtype) not in ("uint8", "int8"):
                return call
            y = self.builder_.emit(relax.op.astype(x, "int32"))
            y = self.builder_.emit(relax.op.subtract(y, relax.const(np.int32(zv))))
            y = self.builder_.emit(relax.op.astype(y, "float32"))
            return relax.op.multiply(y, relax.const(np.float32(sv)))

    ew = _Elementwise()
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = ew.visit_expr(func)
    return mod


# -- the default schedule: VNNI dot products ----------------------------------------------------


def has_vnni(target: Any) -> bool:
    """Does the LLVM target have AVX-512 VNNI (``vpdpbusd``)?"""
    try:
        from tvm.target import codegen

        return bool(codegen.target_has_features("avx512vnni", target))
    except Exception:  # noqa: BLE001 - not an x86 LLVM target
        return False


def choose_int8_tile(p: int, f_vectors: int, registers: int = 24) -> tuple[int, int]:
    """``(xi, fm)``: rows of the blocked spatial axis times 16-lane output vectors held in
    registers. Maximizes dot products per load, ``xi*fm / (xi + fm)``, within ``registers``
    accumulators (AVX-512 has 32: the rest hold the weight vectors and the broadcast); ``xi``
    divides ``p`` and ``fm`` divides ``f_vectors``, so no tile needs a predicate."""
    best = (-1.0, 1, 1)
    for fm in (d for d in range(1, min(f_vectors, 4) + 1) if f_vectors % d == 0):
        for xi in (d for d in range(1, min(p, 16) + 1) if p % d == 0):
            if xi * fm > registers:
                continue
            score = xi * fm / (xi + fm)
            if score > best[0]:
                best = (score, xi, fm)
    return best[1], best[2]


def _plain_var_dim(region: Any, var: Any) -> int | None:
    """The dimension of a buffer access indexed by exactly ``var`` (and only that one)."""
    from tvm import tirx

    hits = [d for d, r in enumerate(region) if isinstance(r.min, tirx.Var) and r.min.same_as(var)]
    return hits[0] if len(hits) == 1 else None


class Int8DotRule:
    """Integer conv2d/matmul (uint8 activations x int8 constant weights -> int32, the kernels
    :func:`rewrite_qdq` makes) with the inner reduction tensorized as AVX-512 VNNI ``vpdpbusd``
    (TVM's ``dot_16x4_vnni`` intrinsic: 16 output channels, 4 input channels per instruction).

    The weight is packed at compile time to ``[F/16, ..., K/4, 16, 4]`` (constant-folded by
    Relax, as the float rule packs its panels), so each instruction reads 64 contiguous bytes.
    Accumulators form a register tile of ``xi`` output pixels (or matmul rows) times ``fm``
    16-lane vectors; the epilogue (zero-point correction, rescale, bias, activation, requantize)
    runs on the tile when it is written back, and the outer tile loops run in parallel.
    Applies to nothing else (returns False): other kernels go to the next rule. (A rule of
    :data:`graphopt.backend.schedules.DEFAULT_RULES` by its interface, ``name`` and ``apply``.)
    """

    name = "int8-vnni"

    def __init__(self, min_parallel_work: int = 1 << 19) -> None:
        self.min_parallel_work = min_parallel_work

    def apply(self, sch: Any, target: Any) -> bool:
        import math

        from tvm.s_tir.dlight.analysis import normalize_prim_func

        from .schedules import (
            _inline_around,
            _schedule_root_copies,
            _uses_var,
            _write_back,
            vector_lanes,
        )

        if not has_vnni(target):
            return False
        infos = normalize_prim_func(sch)
        if infos is None:
            return False
        reductions = [b for b in infos if b.is_reduction()]
        if len(reductions) != 1:
            return False
        main = reductions[0]
        if not all(b.is_injective() for b in infos if b is not main):
            return False
        block = sch.get(main.block_rv)
        if len(block.writes) != 1 or str(block.writes[0].source.dtype) != "int32":
            return False
        out = block.writes[0]
        operands = [r for r in block.reads if not r.source.same_as(out.source)]
        a = [r for r in operands if str(r.source.dtype) == "uint8"]
        b = [r for r in operands if str(r.source.dtype) == "int8"]
        if len(operands) != 2 or len(a) != 1 or len(b) != 1:
            return False
        a, b = a[0], b[0]
        func = sch.mod["main"]
        free = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
        params = list(func.params)
        b_param = next((int(i) for i in (free or []) if _same_buffer(func, params[int(i)], b.source)), None)
        iters = main.iters
        if b_param is None or any(it.kind not in "SR" for it in iters):
            return False
        spatial = [it for it in iters if it.kind == "S"]
        reduce = [it for it in iters if it.kind == "R"]
        last = out.region[-1].min
        vec_it = next((it for it in spatial if it.var.same_as(last)), None)
        k_it = next((it for it in reduce if a.region[-1].min.same_as(it.var)), None)
        if vec_it is None or k_it is None or any(not isinstance(it.dom, int) and it.dom is None for it in iters):
            return False
        try:
            f, k = int(vec_it.dom), int(k_it.dom)
        except TypeError:
            return False
        f_dim, k_dim = _plain_var_dim(b.region, vec_it.var), _plain_var_dim(b.region, k_it.var)
        if f % OC_BLOCK or k % K_BLOCK or f_dim is None or k_dim is None:
            return False
        if any(_uses_var(a, vec_it.var) for _ in [0]):  # the activation must not depend on the output channel
            return False
        others = [it for it in spatial if it is not vec_it]
        free_its = [it for it in others if int(it.dom) > 1 and not _uses_var(b, it.var)]
        block_it = free_its[-1] if free_its else None
        xi, fm = choose_int8_tile(int(block_it.dom) if block_it else 1, f // OC_BLOCK)

        # 1. producers inlined (copies; a pad with a real border stays a stage), epilogue chain folded
        epilogue = _inline_around(sch, infos, infos.index(main))
        rv = main.block_rv
        # 2. the weight packed [F/16, <its other dims, K/4 in place of K>, 16, 4]
        b_idx = next(i for i, r in enumerate(sch.get(rv).reads) if r.source.same_as(b.source))
        nd = len(b.region)
        cache = sch.cache_read(rv, b_idx, "global")
        sch.annotate(cache, "meta_schedule.layout_rewrite_preproc", True)

        def pack(*ax: Any) -> tuple[Any, ...]:
            rest = [ax[d] // K_BLOCK if d == k_dim else ax[d] for d in range(nd) if d != f_dim]
            return (ax[f_dim] // OC_BLOCK, *rest, ax[f_dim] % OC_BLOCK, ax[k_dim] % K_BLOCK)

        sch.transform_layout(rv, ("read", b_idx), pack)
        # 3. register tile accumulators, epilogue on write-back
        # (only onto the same iteration space: a sliced epilogue - output channels padded to 16 -
        # inlined into the full-width write-back would write past its output)
        wb, last_epi, epi_inlined = _write_back(sch, rv, epilogue,
                                                lambda epi, w: _domain(sch, epi) == _domain(sch, w))
        loops = sch.get_loops(rv)
        by_it = {id(it): lp for it, lp in zip(iters, loops, strict=True)}
        f_o, f_m, f_i = sch.split(by_it[id(vec_it)], [None, fm, OC_BLOCK])
        outer, p_i = [f_o], None
        for it in others:
            lp = by_it[id(it)]
            if it is block_it:
                x_o, p_i = sch.split(lp, [None, xi])
                outer.append(x_o)
            else:
                outer.append(lp)
        k_o, k_i = sch.split(by_it[id(k_it)], [None, K_BLOCK])
        red = [by_it[id(it)] if it is not k_it else k_o for it in reduce]
        sch.reorder(*outer, *red, *([p_i] if p_i is not None else []), f_m, f_i, k_i)
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if math.prod(int(it.dom) for it in iters) >= self.min_parallel_work:
            sch.parallel(fused)
        sch.reverse_compute_at(wb, fused, preserve_unit_loops=True)
        if last_epi is not None and not epi_inlined:
            sch.reverse_compute_at(last_epi, fused, preserve_unit_loops=True)
        init = sch.decompose_reduction(rv, red[0])
        if p_i is not None and xi > 1:
            sch.unroll(p_i)
        if fm > 1:
            sch.unroll(f_m)
        sch.tensorize(f_i, _register_intrinsic())
        lanes = vector_lanes(target)
        for bl in [wb, init] + ([last_epi] if last_epi is not None and not epi_inlined else []):
            inner = sch.get_loops(bl)[-1]
            ext = sch.get(inner).extent
            try:
                ext = int(ext)
            except TypeError:
                continue
            # the widest vector dividing the row (a sliced epilogue of 24 channels: 8 lanes; left
            # scalar, its requantize and fast_exp per element cost more than the convolution)
            vw = next((v for v in (OC_BLOCK, OC_BLOCK // 2, OC_BLOCK // 4) if ext % v == 0), 0)
            if vw:
                if ext > vw:
                    _, inner = sch.split(inner, [None, vw])
                sch.vectorize(inner)
        main_loop = sch.get(fused)

        def in_main_nest(bl: Any) -> bool:  # the kernel and the stages computed at its loops
            bl_loops = sch.get_loops(bl)
            return not bl_loops or sch.get(bl_loops[0]).same_as(main_loop)

        _schedule_root_copies(sch, lanes, in_main_nest)  # stages left at the root (a real pad)
        return True


def _same_buffer(func: Any, param: Any, buf: Any) -> bool:
    """Is ``buf`` the buffer of PrimFunc parameter ``param``?"""
    if param.same_as(buf):
        return True
    try:
        return bool(func.buffer_map[param].same_as(buf))
    except Exception:  # noqa: BLE001 - no buffer for this param
        return False


#: the VNNI dot product with the accumulators in a ``local`` (register) tile
VNNI_LOCAL_INTRIN = "graphopt_dot_16x4_u8i8i32_vnni_local"


def _register_intrinsic() -> str:
    """Register (once) ``C[16] += sum_k A[k] * B[:, k]`` (uint8 ``A[4]``, int8 ``B[16, 4]``, int32
    ``C`` in local scope) implemented by one ``vpdpbusd``. TVM ships this intrinsic for global
    accumulators only; the register tile needs it for local ones."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    try:
        TensorIntrin.get(VNNI_LOCAL_INTRIN)
        return VNNI_LOCAL_INTRIN
    except Exception:  # noqa: BLE001 - not registered yet
        pass

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (16,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i, k in T.grid(16, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (16,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            four = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")  # 4 activations, one lane
            # (LLVM 20 declares the byte operands as <64 x i8>; TVM's own intrinsic passes
            # <16 x i32> and fails LLVM's verifier with this wheel)
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(four, 16), dtype="int8x64"),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    TensorIntrin.register(VNNI_LOCAL_INTRIN, desc, impl)
    return VNNI_LOCAL_INTRIN


def _domain(sch: Any, block: Any) -> list[int]:
    """The sorted extents (>1) of a block's iterators: equal for blocks over the same space."""
    out = []
    for iv in sch.get(block).iter_vars:
        try:
            e = int(iv.dom.extent)
        except TypeError:
            return [-1]
        if e > 1:
            out.append(e)
    return sorted(out)


def fast_sigmoid(mod: Any) -> Any:
    """``sigmoid(x)`` as ``1 / (1 + fast_exp(-x))`` (TOPI's polynomial ``fast_exp``, about 1e-6
    relative error, vectorizable), for QDQ models whose activations are requantized anyway.

    Why: LLVM turns TVM's ``exp`` on a vector into one ``expf`` call per lane, so a SiLU epilogue
    (YOLO-style detectors: every conv is followed by ``x * sigmoid(x)``) cost more than the int8
    convolution it follows; ONNX Runtime's own logistic is a vectorized approximation too. Runs
    after the layout conversion (the ``fast_exp`` call is a TIR function, which has no layout rule).
    """
    import tvm
    from tvm import relax, topi

    op_sig = tvm.ir.Op.get("relax.sigmoid")

    @relax.expr_functor.mutator
    class _Sigmoid(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:  # noqa: N802 - TVM's visitor name
            call = super().visit_call_(call)
            if not isinstance(call, relax.Call) or not call.op.same_as(op_sig) or str(call.ty.dtype) != "float32":
                return call
            e = self.builder_.call_te(topi.fast_exp, self.builder_.emit(relax.op.negative(call.args[0])),
                                      primfunc_name_hint="fast_exp")
            d = self.builder_.emit(relax.op.add(relax.const(np.float32(1)), e))
            return relax.op.divide(relax.const(np.float32(1)), d)

    rw = _Sigmoid(mod)  # the builder holds the module: fast_exp's PrimFuncs are added to it
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    return rw.builder_.get()
