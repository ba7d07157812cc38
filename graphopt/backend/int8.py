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
   tile of accumulators, the inner 16x4 block tensorized as one ``vpdpbusd`` (:data:`VNNI_DOT`:
   :data:`VNNI_TILE_INTRIN`), the epilogue on write-back. On an aarch64 target with ``+dotprod``
   the rewrite reads int8 activations (uint8 ones shifted by -128) and the same rule with
   :data:`graphopt.backend.int8_arm.ARM_SDOT` tensorizes the block onto Arm ``sdot``; without
   either instruction the model keeps its float kernels.

How the int8 weights are found: graphopt's lossless pipeline folds each weight's
DequantizeLinear into a float constant before import. :func:`weight_table` reads the model before
that, computes each constant DequantizeLinear exactly as ONNX Runtime does (``float(wq - z) *
s``, one float32 rounding), and keys the integer weights by the bytes of that float result; the
rewrite looks every conv2d/matmul weight up by its bytes. Weights over the constant folder's size
limit (1 MB as float) keep their DequantizeLinear through the pipeline and reach TVM as
``dequantize(int8 constant)``: those integer weights are read from the op itself. A weight that is
not found (changed by a fusion, or not from a DequantizeLinear) keeps its float kernel (counted as
``float_kept``).

Quantized elementwise chains (the SiLU after every conv of a YOLO-style detector: ``dequantize ->
sigmoid -> quantize -> dequantize -> mul -> quantize``) are functions of one uint8/int8 tensor:
:func:`lookup_tables` turns each into a 256-entry table read inside the conv's epilogue (counted
as ``lookup_tables``), where the float chain cost 2-3x the convolution on narrow 1x1 convs.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.ir import Model

logger = logging.getLogger(__name__)

#: vpdpbusd: 16 int32 lanes, each the sum of 4 uint8 x int8 products
OC_BLOCK = 16
K_BLOCK = 4
#: accumulator vectors per register tile: 15 x 64 bytes stays under TVM's 1 KiB stack-allocation limit
_TILE_ACCUMULATORS = 15


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


def _dequantized_weight(call: Any) -> IntWeight | None:
    """The integer weight of ``dequantize(int8 constant, scale constant, zero point 0)``: a
    per-tensor scale or one per channel along the op's axis (what ``weight_table`` accepts)."""
    q, s, z = (_const_array(a) for a in call.args[:3])
    if q is None or s is None or q.dtype != np.int8 or q.ndim < 2 or s.dtype != np.float32:
        return None
    if z is not None and np.any(z != 0):
        return None
    axis = int(call.attrs.axis) % q.ndim
    if s.size == 1:
        return IntWeight(q, s.reshape([1] * q.ndim).astype(np.float32), axis)
    if s.ndim != 1 or s.size != q.shape[axis]:
        return None
    shape = [1] * q.ndim
    shape[axis] = s.size
    return IntWeight(q, s.reshape(shape).astype(np.float32), axis)


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
                                                      "permute_dims", "dequantize")}

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

        def _weight(self, w: Any) -> tuple[np.ndarray | IntWeight, list[int]] | None:
            """The constant behind a weight (and the permutation applied to it): a float constant
            (looked up in ``table``), or an int8 constant still behind a ``dequantize`` (the
            lossless pipeline leaves large weights' DequantizeLinear unfolded rather than write a
            float copy: there the integer weight is read directly, no lookup)."""
            axes: list[int] | None = None
            if isinstance(w, relax.Var):
                b = self.lookup_binding(w)
                if is_call(b, "permute_dims"):
                    axes = [int(a) for a in b.attrs.axes] if b.attrs.axes is not None else None
                    w = b.args[0]
            elif is_call(w, "permute_dims"):
                axes = [int(a) for a in w.attrs.axes] if w.attrs.axes is not None else None
                w = w.args[0]
            if isinstance(w, relax.Var) and is_call(self.lookup_binding(w), "dequantize"):
                w = self.lookup_binding(w)
            iw = _dequantized_weight(w) if is_call(w, "dequantize") else None
            if iw is not None:
                return iw, (axes if axes is not None else list(range(iw.q.ndim)))
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
            if act is None:
                return None
            wt = self._weight(call.args[1])
            if wt is None:  # a quantized activation, a weight that is not a constant: stays float
                counts["float_kept"] += 1
                return None
            iw = wt[0] if isinstance(wt[0], IntWeight) else table.get(_key(wt[0]))
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


@dataclass(frozen=True)
class DotInstruction:
    """What :class:`Int8DotRule` needs to know of one CPU's int8 dot-product instruction: the
    rule is the same on every ISA (weight packing, register tile, epilogue, parallel loop), only
    these differ.

    ``activation_dtype`` is the activation operand's dtype (the weight is always int8): what
    :func:`rewrite_qdq` was told to make for this target. ``block`` is the ``(output channels,
    input channels)`` block one tensor intrinsic computes, the padding of :func:`rewrite_qdq`.
    ``accumulators`` bounds the register tile (16-lane accumulator blocks). ``tile_scope`` is the
    scope the accumulator tile is moved to (None: the intrinsic's own)."""

    rule_name: str
    activation_dtype: str
    #: does the target have the instruction
    applies_to: Callable[[Any], bool]
    #: registers (once) the ``block`` tensor intrinsic and returns its name
    register_intrinsic: Callable[[], str]
    accumulators: int
    tile_scope: str | None = None
    block: tuple[int, int] = (OC_BLOCK, K_BLOCK)


class Int8DotRule:
    """Integer conv2d/matmul (activations x int8 constant weights -> int32, the kernels
    :func:`rewrite_qdq` makes) with the inner reduction tensorized as one CPU's dot-product
    instruction, described by a :class:`DotInstruction`: :data:`VNNI_DOT` (the default; AVX-512
    VNNI ``vpdpbusd``, uint8 activations) or :data:`graphopt.backend.int8_arm.ARM_SDOT` (Arm
    ``sdot``, int8 activations), each a block of 16 output channels x 4 input channels.

    The weight is packed at compile time to ``[F/16, ..., K/4, 16, 4]`` (constant-folded by
    Relax, as the float rule packs its panels), so each block reads 64 contiguous bytes. The
    weight is told apart from the activation as the int8 layout-free (constant) parameter.
    Accumulators form a register tile of ``xi`` output pixels (or matmul rows) times ``fm``
    16-lane vectors; the epilogue (zero-point correction, rescale, bias, activation, requantize)
    runs on the tile when it is written back, and the outer tile loops run in parallel.
    Applies to nothing else (returns False): other kernels go to the next rule. (A rule of
    :data:`graphopt.backend.schedules.DEFAULT_RULES` by its interface, ``name`` and ``apply``;
    ``name`` is the instruction's ``rule_name``.)
    """

    def __init__(self, isa: DotInstruction | None = None, min_parallel_work: int = 1 << 19) -> None:
        self.isa = isa if isa is not None else VNNI_DOT
        self.name = self.isa.rule_name
        self.min_parallel_work = min_parallel_work

    def apply(self, sch: Any, target: Any) -> bool:
        import math

        from tvm.s_tir.dlight.analysis import normalize_prim_func

        from .schedules import (
            _inline_around,
            _schedule_root_copies,
            _uses_var,
            _write_back,
            table_write_width,
            vector_lanes,
        )

        isa = self.isa
        oc_block, k_block = isa.block
        if not isa.applies_to(target):
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
        if len(operands) != 2:
            return False
        # the weight: the one int8 operand that is a layout-free (constant) parameter
        func = sch.mod["main"]
        free = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
        params = list(func.params)
        free_bufs = [params[int(i)] for i in (free or [])]
        b_hits = [r for r in operands
                  if str(r.source.dtype) == "int8" and any(_same_buffer(func, p, r.source) for p in free_bufs)]
        if len(b_hits) != 1:
            return False
        b = b_hits[0]
        a = next(r for r in operands if r is not b)
        iters = main.iters
        if str(a.source.dtype) != isa.activation_dtype or any(it.kind not in "SR" for it in iters):
            return False
        spatial = [it for it in iters if it.kind == "S"]
        reduce = [it for it in iters if it.kind == "R"]
        last = out.region[-1].min
        vec_it = next((it for it in spatial if it.var.same_as(last)), None)
        k_it = next((it for it in reduce if a.region[-1].min.same_as(it.var)), None)
        if vec_it is None or k_it is None:
            return False
        try:
            f, k = int(vec_it.dom), int(k_it.dom)
            doms = [int(it.dom) for it in iters]
        except TypeError:  # a symbolic (or unknown) extent
            return False
        f_dim, k_dim = _plain_var_dim(b.region, vec_it.var), _plain_var_dim(b.region, k_it.var)
        if f % oc_block or k % k_block or f_dim is None or k_dim is None:
            return False
        if _uses_var(a, vec_it.var):  # the activation must not depend on the output channel
            return False
        others = [it for it in spatial if it is not vec_it]
        free_its = [it for it in others if int(it.dom) > 1 and not _uses_var(b, it.var)]
        block_it = free_its[-1] if free_its else None
        xi, fm = choose_int8_tile(int(block_it.dom) if block_it else 1, f // oc_block, registers=isa.accumulators)

        # 1. producers inlined (copies; a pad with a real border stays a stage), epilogue chain folded
        epilogue = _inline_around(sch, infos, infos.index(main))
        rv = main.block_rv
        # 2. the weight packed [F/16, <its other dims, K/4 in place of K>, 16, 4]
        b_idx = next(i for i, r in enumerate(sch.get(rv).reads) if r.source.same_as(b.source))
        nd = len(b.region)
        cache = sch.cache_read(rv, b_idx, "global")
        sch.annotate(cache, "meta_schedule.layout_rewrite_preproc", True)

        def pack(*ax: Any) -> tuple[Any, ...]:
            rest = [ax[d] // k_block if d == k_dim else ax[d] for d in range(nd) if d != f_dim]
            return (ax[f_dim] // oc_block, *rest, ax[f_dim] % oc_block, ax[k_dim] % k_block)

        sch.transform_layout(rv, ("read", b_idx), pack)
        # 3. register tile accumulators, epilogue on write-back
        # (only onto the same iteration space: a sliced epilogue - output channels padded to 16 -
        # inlined into the full-width write-back would write past its output)
        wb, last_epi, epi_inlined = _write_back(sch, rv, epilogue,
                                                lambda epi, w: _domain(sch, epi) == _domain(sch, w))
        if isa.tile_scope is not None:  # VNNI: a stack tile, not a workspace allocation (see _register_intrinsic)
            sch.set_scope(rv, 0, isa.tile_scope)
        loops = sch.get_loops(rv)
        by_it = {id(it): lp for it, lp in zip(iters, loops, strict=True)}
        f_o, f_m, f_i = sch.split(by_it[id(vec_it)], [None, fm, oc_block])
        outer, p_i = [f_o], None
        for it in others:
            lp = by_it[id(it)]
            if it is block_it:
                x_o, p_i = sch.split(lp, [None, xi])
                outer.append(x_o)
            else:
                outer.append(lp)
        k_o, k_i = sch.split(by_it[id(k_it)], [None, k_block])
        red = [by_it[id(it)] if it is not k_it else k_o for it in reduce]
        sch.reorder(*outer, *red, *([p_i] if p_i is not None else []), f_m, f_i, k_i)
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if math.prod(doms) >= self.min_parallel_work:
            sch.parallel(fused)
        sch.reverse_compute_at(wb, fused, preserve_unit_loops=True)
        if last_epi is not None and not epi_inlined:
            sch.reverse_compute_at(last_epi, fused, preserve_unit_loops=True)
        init = sch.decompose_reduction(rv, red[0])
        if p_i is not None and xi > 1:
            sch.unroll(p_i)
        if fm > 1:
            sch.unroll(f_m)
        sch.tensorize(f_i, isa.register_intrinsic())
        lanes = vector_lanes(target)
        for bl in [wb, init] + ([last_epi] if last_epi is not None and not epi_inlined else []):
            inner = sch.get_loops(bl)[-1]
            try:
                ext = int(sch.get(inner).extent)
            except TypeError:
                continue
            # the widest vector dividing the row (a sliced epilogue of 24 channels: 8 lanes; left
            # scalar, its requantize and fast_exp per element cost more than the convolution)
            vw = table_write_width(sch, bl, ext, target) or next(
                (v for v in (oc_block, oc_block // 2, oc_block // 4) if ext % v == 0), 0)
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


#: the VNNI dot product accumulating into a tile of the kernel's own (``global`` scope: see
#: :func:`_register_intrinsic`)
VNNI_TILE_INTRIN = "graphopt_dot_16x4_u8i8i32_vnni_tile"


def _register_intrinsic() -> str:
    """Register (once) ``C[16] += sum_k A[k] * B[:, k]`` (uint8 ``A[4]``, int8 ``B[16, 4]``, int32
    ``C``) implemented by one ``vpdpbusd``.

    The accumulator tile is a ``global``-scope buffer allocated inside the kernel's parallel
    loop: TVM (0.27) puts a small constant-size ``global`` allocation on the stack, where LLVM
    keeps it in registers, but lowers every ``local`` one to a ``TVMBackendAllocWorkspace`` /
    ``FreeWorkspace`` call pair per outer iteration (measured: a 1x1 conv over 52x52x96 made
    2,700 such calls per run, a third of its time). For the same reason the four activations
    are broadcast in one expression, not through a temporary (a 4-byte local buffer)."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    try:
        TensorIntrin.get(VNNI_TILE_INTRIN)
        return VNNI_TILE_INTRIN
    except Exception:  # noqa: BLE001 - not registered yet
        logger.debug("registering the tensor intrinsic %s", VNNI_TILE_INTRIN)

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (16,), "int32", offset_factor=1)
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
        C = T.match_buffer(c, (16,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            # (LLVM 20 declares the byte operands as <64 x i8>; TVM's own intrinsic passes
            # <16 x i32> and fails LLVM's verifier with this wheel)
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16),
                              dtype="int8x64"),
                B.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    TensorIntrin.register(VNNI_TILE_INTRIN, desc, impl)
    return VNNI_TILE_INTRIN


#: AVX-512 VNNI: ``vpdpbusd`` (uint8 activations x int8 weights) into a ``global``-scope tile of at
#: most 15 accumulators (960 bytes): TVM puts a tile under 1 KiB on the stack (registers, for LLVM),
#: a larger one in a workspace allocated and freed per tile (a 40x40x64 3x3 conv: 0.34 ms with 20
#: accumulators, 0.32 ms with 8; a 1x1 conv over 80x80x32: 0.18 vs 0.14 ms)
VNNI_DOT = DotInstruction("int8-vnni", "uint8", has_vnni, _register_intrinsic, _TILE_ACCUMULATORS,
                          tile_scope="global")


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
        def visit_call_(self, call: Any) -> Any:
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


# -- quantized elementwise chains as 256-entry lookup tables ---------------------------------------

#: elementwise Relax ops a lookup table can evaluate (numpy, float32 arithmetic like TVM's)
_LUT_UNARY: dict[str, Any] = {
    "relax.sigmoid": lambda x: np.float32(1) / (np.float32(1) + np.exp(-x)),
    "relax.exp": np.exp, "relax.tanh": np.tanh, "relax.negative": np.negative, "relax.sqrt": np.sqrt,
    "relax.log": np.log, "relax.abs": np.abs, "relax.floor": np.floor, "relax.ceil": np.ceil,
    "relax.round": np.round,  # half to even, as TVM's nearbyint and ONNX's QuantizeLinear
    "relax.nn.relu": lambda x: np.maximum(x, x.dtype.type(0)),
}
_LUT_BINARY: dict[str, Any] = {
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
    "relax.divide": np.divide, "relax.maximum": np.maximum, "relax.minimum": np.minimum,
}
#: what makes a table worth it (a chain of requantizing affine ops stays arithmetic: it vectorizes)
_LUT_EXPENSIVE = {"relax.sigmoid", "relax.exp", "relax.tanh", "relax.log", "relax.sqrt", "relax.nn.leakyrelu"}
#: name of the lookup kernels (:func:`mark_lookups_elementwise` finds them by it)
LOOKUP_PRIMFUNC = "graphopt_lookup"


def lookup_tables(mod: Any) -> tuple[Any, int]:
    """Quantized elementwise chains as 256-entry lookup tables: a uint8/int8 tensor computed by
    elementwise ops from ONE other quantized tensor ``xq`` (and scalar constants) is a function
    of ``xq``'s 256 values, evaluated here once (numpy, float32 like TVM) and read back per
    element as ``table[xq]``.

    Why: a QDQ model's SiLU (``x * sigmoid(x)``, every conv of a YOLO-style detector) is
    ``dequantize -> sigmoid -> quantize -> dequantize -> multiply -> quantize`` after the conv's
    own requantization, fused into the conv's epilogue: an exp, three divisions and three
    roundings per output element, which cost 2-3x the integer convolution on the detectors'
    narrow 1x1 convs (ONNX Runtime's QLinearSigmoid is a table too). Chains with nothing but
    requantizing affine ops stay arithmetic (they vectorize; a table lookup does not). The
    table is computed from the exact sigmoid, so it is at least as close to the model's QDQ
    arithmetic as the fused float epilogue it replaces. Returns the module and the number of
    tables. Run after the integer rewrites (the table's input is then the conv's requantized
    output) and before :func:`fast_sigmoid`.
    """
    from tvm import relax

    count = 0
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function):
            continue
        plans = _lookup_plans(func)
        if not plans:
            continue
        rw = _lookup_mutator(mod, plans)
        rw.builder_.update_func(gv, rw.visit_expr(func))
        mod = rw.builder_.get()
        count += len(plans)
    if count:
        mod = relax.transform.DeadCodeElimination()(mod)
        logger.info("%d quantized elementwise chains as lookup tables", count)
    return mod, count


def _lookup_mutator(mod: Any, plans: list[tuple[Any, Any, np.ndarray]]) -> Any:
    """A mutator replacing each plan's call by ``table[x]`` (a TE kernel named
    :data:`LOOKUP_PRIMFUNC`; int8 inputs index from -128)."""
    from tvm import relax, te

    def lookup(x: Any, table: Any, offset: int) -> Any:
        return te.compute(x.shape, lambda *i: table[x(*i).astype("int32") + offset], name="lookup")

    @relax.expr_functor.mutator
    class _Lookup(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            plan = next((p for p in plans if p[0].same_as(call)), None)
            if plan is None:
                return super().visit_call_(call)
            _, root, table = plan
            offset = 128 if str(root.ty.dtype) == "int8" else 0
            return self.builder_.call_te(lookup, self.visit_expr(root), relax.const(table), offset,
                                         primfunc_name_hint=LOOKUP_PRIMFUNC)

    return _Lookup(mod)


def _lookup_plans(func: Any) -> list[tuple[Any, Any, np.ndarray]]:
    """(the call that writes a quantized tensor, the quantized tensor it is a function of, its
    256-entry table) for each chain :func:`lookup_tables` replaces."""
    from tvm import relax

    bindings: dict[Any, Any] = {}
    order: list[Any] = []
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                bindings[b.var] = b.value
                order.append(b.var)

    def dtype(v: Any) -> str:
        return str(getattr(v.ty, "dtype", ""))

    def shape(v: Any) -> tuple[int, ...] | None:
        try:
            return tuple(int(d) for d in v.ty.shape)
        except Exception:  # noqa: BLE001 - symbolic or unknown shape
            return None

    def op_name(val: Any) -> str | None:
        if isinstance(val, relax.Call) and hasattr(val.op, "name"):
            return str(val.op.name)
        return None

    def tensor_args(val: Any) -> list[Any] | None:
        """The call's non-constant arguments, or None where one is not a plain tensor var
        or a constant is not a scalar."""
        name = op_name(val)
        if name not in _LUT_UNARY and name not in _LUT_BINARY and name not in ("relax.astype", "relax.nn.leakyrelu"):
            return None
        args = list(val.args)[:1] if name == "relax.astype" else list(val.args)
        out = []
        for a in args:
            c = _const_array(a)
            if c is not None:
                if c.size != 1:
                    return None
                continue
            if not isinstance(a, relax.Var):
                return None
            out.append(a)
        return out

    memo: dict[Any, Any] = {}

    def root(v: Any) -> Any:
        """The one quantized tensor ``v`` is an elementwise function of (None: not such)."""
        if v in memo:
            return memo[v]
        memo[v] = None
        val = bindings.get(v)
        args = tensor_args(val) if val is not None else None
        res = None
        if args and shape(v) is not None and all(shape(a) == shape(v) for a in args):
            roots = set()
            for a in args:
                ra = root(a)
                if ra is None and dtype(a) in ("uint8", "int8"):
                    ra = a  # a quantized tensor computed otherwise (a conv's output): the root
                if ra is None:
                    roots = set()
                    break
                roots.add(ra)
            if len(roots) == 1:
                res = roots.pop()
        memo[v] = res
        return res

    def expensive(v: Any, r: Any, seen: set) -> bool:
        if v.same_as(r) or v in seen:
            return False
        seen.add(v)
        val = bindings[v]
        args = tensor_args(val) or []
        if op_name(val) in _LUT_EXPENSIVE or len(args) > 1:
            return True
        return any(expensive(a, r, seen) for a in args)

    def evaluate(v: Any, r: Any, x: np.ndarray, cache: dict) -> np.ndarray:
        if v.same_as(r):
            return x
        if v in cache:
            return cache[v]
        val = bindings[v]
        name = op_name(val)
        vals = []
        for a in (list(val.args)[:1] if name == "relax.astype" else list(val.args)):
            c = _const_array(a)
            vals.append(c.reshape(()) if c is not None else evaluate(a, r, x, cache))
        with np.errstate(all="ignore"):
            if name == "relax.astype":
                to = np.dtype(str(val.attrs.dtype))
                y = vals[0]
                if to.kind in "iu" and y.dtype.kind == "f":
                    info = np.iinfo(to)
                    if not np.all(np.isfinite(y)) or y.min() < info.min or y.max() > info.max:
                        raise ValueError("out-of-range float to integer cast")
                    y = np.trunc(y)
                out = y.astype(to)
            elif name == "relax.nn.leakyrelu":
                y = vals[0]
                out = np.where(y >= 0, y, y * y.dtype.type(float(val.attrs.alpha)))
            elif name in _LUT_UNARY:
                out = _LUT_UNARY[name](vals[0])
            else:
                if name == "relax.divide" and vals[0].dtype.kind != "f":
                    raise ValueError("integer division")
                out = _LUT_BINARY[name](vals[0], vals[1])
        out = np.asarray(out).astype(dtype(v))  # the dtype Relax gives the op's result
        cache[v] = out
        return out

    plans = []
    for v in order:
        if dtype(v) not in ("uint8", "int8"):
            continue
        r = root(v)
        if r is None or r.same_as(v) or dtype(r) not in ("uint8", "int8") or not expensive(v, r, set()):
            continue
        x = np.arange(256, dtype=np.int64) - (128 if dtype(r) == "int8" else 0)
        try:
            table = evaluate(v, r, x.astype(dtype(r)), {})
        except (ValueError, KeyError, TypeError):
            continue
        plans.append((bindings[v], r, np.ascontiguousarray(table.reshape(256))))
    return plans


def mark_lookups_elementwise() -> Any:
    """A module pass, run between ``AnnotateTIROpPattern`` and ``FuseOps``: the lookup kernels of
    :func:`lookup_tables` are elementwise in their index (``out[i] = table[x[i]]``), but TVM's
    pattern analysis calls any indirect read injective, and an injective op does not fuse into a
    convolution's epilogue (it would be a separate kernel: one more pass over memory)."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="graphopt.MarkLookupsElementwise")
    def _mark(mod: Any, _ctx: Any) -> Any:
        for gv, f in list(mod.functions_items()):
            if isinstance(f, tirx.PrimFunc) and gv.name_hint.startswith(LOOKUP_PRIMFUNC):
                mod[gv] = f.with_attr("op_pattern", 0)  # kElemWise
        return mod

    return _mark


# -- quantize sunk through data movement ------------------------------------------------------------

#: ops that only move elements (a quantize, elementwise, commutes with them)
_MOVES = ("relax.permute_dims", "relax.reshape", "relax.concat", "relax.split", "relax.strided_slice",
          "relax.squeeze", "relax.expand_dims", "relax.flatten")


def sink_quantize(mod: Any) -> tuple[Any, int]:
    """``quantize(move(dequantize(a)))`` as ``move(a)`` where the two share their quantization
    parameters (else as ``move(requantize(a))``), for ``move`` any chain of concat, split,
    reshape, transpose and slice: the data moves as uint8/int8, not float.

    Exact: quantize is elementwise, so it commutes with ops that only move elements
    (``quantize(concat(x, y)) == concat(quantize(x), quantize(y))``), and ``quantize(dequantize(a))``
    is ``a`` itself when the parameters match (checked on all 256 values).

    Why: in a QDQ model every concat/reshape/transpose sits between a dequantize and a quantize;
    TVM fused the dequantize into the producer (which then wrote float32, 4 bytes an element) and
    computed the concat in float with a requantization per element: a detector's head (concat of
    three scales, reshape, transpose, split) cost 1.3 ms where ONNX Runtime's QLinearConcat and
    uint8 copies cost 0.5. Returns the module and the number of quantizes sunk.
    """
    from tvm import relax

    count = 0
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function):
            continue
        bindings: dict[Any, Any] = {}
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    bindings[b.var] = b.value
        matcher = _QDQMatcher(bindings)
        done = [0]
        rw = _sink_mutator(mod, bindings, matcher, done)
        rw.builder_.update_func(gv, rw.visit_expr(func))
        mod = rw.builder_.get()
        count += done[0]
    if count:
        mod = relax.transform.DeadCodeElimination()(mod)
        logger.info("%d quantizes sunk through data movement (uint8 concat/reshape/transpose/split)", count)
    return mod, count


def _sink_mutator(mod: Any, bindings: Mapping[Any, Any], matcher: _QDQMatcher, done: list[int]) -> Any:
    """The mutator of :func:`sink_quantize` for one function (``done[0]`` counts the quantizes sunk)."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Sink(relax.PyExprMutator):
        def __init__(self, mod: Any) -> None:
            super().__init__(mod)
            self.memo: dict[tuple, Any] = {}

        def visit_call_(self, call: Any) -> Any:
            q = matcher.quantize(call)
            if q is None:
                return super().visit_call_(call)
            v, params = q
            if not matcher.reaches_dequantize(v):
                return super().visit_call_(call)
            done[0] += 1
            return self.sink(v, params)

        def requantize(self, x: Any, params: tuple) -> Any:
            s, z, dt = params
            lo, hi = (0, 255) if dt == "uint8" else (-128, 127)
            y = self.builder_.emit(relax.op.divide(x, relax.const(np.float32(s))))
            y = self.builder_.emit(relax.op.round(y))
            y = self.builder_.emit(relax.op.add(y, relax.const(np.float32(z))))
            y = self.builder_.emit(relax.op.maximum(y, relax.const(np.float32(lo))))
            y = self.builder_.emit(relax.op.minimum(y, relax.const(np.float32(hi))))
            return self.builder_.emit(relax.op.astype(y, dt))

        def sink(self, v: Any, params: tuple) -> Any:
            """An expression equal to ``quantize(v)`` with ``params``, moved below the data
            movement that produced ``v``."""
            key = (v, params)
            if key in self.memo:
                return self.memo[key]
            val = bindings.get(v) if isinstance(v, relax.Var) else v
            dq = matcher.dequantize(v) if isinstance(v, relax.Var) else None
            name = str(val.op.name) if isinstance(val, relax.Call) and hasattr(val.op, "name") else None
            if dq is not None:
                a, sa, za = dq
                a_new = self.visit_expr(a)
                if _roundtrip_identity(str(a.ty.dtype), sa, za, params):
                    out = a_new
                else:
                    out = self.requantize(self.visit_expr(v), params)
            elif isinstance(val, relax.TupleGetItem) and isinstance(val.tuple_value, relax.Var) \
                    and _op_name(bindings.get(val.tuple_value)) == "relax.split":
                out = self.builder_.emit(relax.TupleGetItem(self.sink(val.tuple_value, params), val.index))
            elif name == "relax.concat" and isinstance(val.args[0], relax.Tuple):
                parts = [self.sink(x, params) for x in val.args[0].fields]
                out = self.builder_.emit(relax.Call(val.op, [relax.Tuple(parts)], val.attrs))
            elif name in _MOVES and name != "relax.concat":
                out = self.builder_.emit(relax.Call(val.op, [self.sink(val.args[0], params), *val.args[1:]],
                                                    val.attrs, val.ty_args))
            else:
                out = self.requantize(self.visit_expr(v), params)
            self.memo[key] = out
            return out

    return _Sink(mod)


def _op_name(val: Any) -> str | None:
    return str(val.op.name) if val is not None and hasattr(val, "op") and hasattr(val.op, "name") else None


def _roundtrip_identity(dtype: str, sa: float, za: int, params: tuple) -> bool:
    """Is ``quantize(dequantize(a))`` (float32, as TVM computes it) ``a`` for every value?"""
    s, z, dt = params
    if dt != dtype:
        return False
    x = np.arange(256) - (128 if dtype == "int8" else 0)
    y = (x - za).astype(np.float32) * np.float32(sa)
    lo, hi = (0, 255) if dt == "uint8" else (-128, 127)
    q = np.clip(np.round(y / np.float32(s)) + np.float32(z), lo, hi)
    return bool(np.array_equal(q, x))


class _QDQMatcher:
    """Reads the elementwise quantize/dequantize chains :func:`elementwise_qdq` writes, through a
    function's bindings."""

    def __init__(self, bindings: Mapping[Any, Any]) -> None:
        self.b = bindings

    def _call(self, v: Any, name: str) -> Any:
        val = self.b.get(v) if not hasattr(v, "op") else v
        return val if _op_name(val) == name else None

    def quantize(self, call: Any) -> tuple[Any, tuple] | None:
        """``astype(minimum(maximum(round(v / s) + z, lo), hi), u8/i8)`` -> (v, (s, z, dtype))."""
        if _op_name(call) != "relax.astype" or str(call.attrs.dtype) not in ("uint8", "int8"):
            return None
        dt = str(call.attrs.dtype)
        mn = self._call(call.args[0], "relax.minimum")
        mx = self._call(mn.args[0], "relax.maximum") if mn is not None else None
        ad = self._call(mx.args[0], "relax.add") if mx is not None else None
        rd = self._call(ad.args[0], "relax.round") if ad is not None else None
        dv = self._call(rd.args[0], "relax.divide") if rd is not None else None
        if dv is None:
            return None
        lo, hi = (0, 255) if dt == "uint8" else (-128, 127)
        s, z = _scalar(dv.args[1]), _scalar(ad.args[1])
        if s is None or z is None or _scalar(mx.args[1]) != lo or _scalar(mn.args[1]) != hi:
            return None
        if str(getattr(dv.args[0].ty, "dtype", "")) != "float32":
            return None
        return dv.args[0], (float(s), int(z), dt)

    def dequantize(self, v: Any) -> tuple[Any, float, int] | None:
        """``multiply(astype(subtract(astype(a, int32), z), float32), s)`` -> (a, s, z)."""
        mul = self._call(v, "relax.multiply")
        c2 = self._call(mul.args[0], "relax.astype") if mul is not None else None
        sub = self._call(c2.args[0], "relax.subtract") if c2 is not None else None
        c1 = self._call(sub.args[0], "relax.astype") if sub is not None else None
        if c1 is None or str(c1.attrs.dtype) != "int32" or str(c2.attrs.dtype) != "float32":
            return None
        s, z = _scalar(mul.args[1]), _scalar(sub.args[1])
        a = c1.args[0]
        if s is None or z is None or str(getattr(a.ty, "dtype", "")) not in ("uint8", "int8"):
            return None
        return a, float(s), int(z)

    def reaches_dequantize(self, v: Any, depth: int = 0) -> bool:
        """Is ``v`` a data movement (at least one op) of dequantized tensors?"""
        from tvm import relax

        val = self.b.get(v)
        if isinstance(val, relax.TupleGetItem):
            return depth < 16 and _op_name(self.b.get(val.tuple_value)) == "relax.split" \
                and self.reaches_dequantize(val.tuple_value, depth + 1)
        name = _op_name(val)
        if name not in _MOVES or depth >= 16:
            return depth > 0 and self.dequantize(v) is not None
        if name == "relax.concat":
            fields = getattr(val.args[0], "fields", None)
            return fields is not None and all(self.reaches_dequantize(x, depth + 1) for x in fields)
        return self.reaches_dequantize(val.args[0], depth + 1)

