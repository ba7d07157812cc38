"""Integer INT8 kernels on aarch64: the QDQ conv2d/matmul kernels of :mod:`graphopt.backend.int8`
on the Armv8.2 dot-product instruction ``sdot`` (``FEAT_DotProd``: Cortex-A55/A76 and later,
Neoverse N1/V1, Graviton2+, Apple M1+, Raspberry Pi 5; not Cortex-A53/A72).

``sdot v.4s, a.16b, b.16b`` adds to each of 4 int32 lanes the sum of 4 int8 x int8 products. The
weights are int8 (``graphopt quantize`` and ORT write symmetric int8 weights), so the activations
must be int8 too: :func:`graphopt.backend.int8.rewrite_qdq` with ``activations="int8"`` shifts
uint8 activations by -128 (and their zero point with them, the mirror of the x86 path's +128
shift for ``vpdpbusd``, which wants unsigned activations). The correction ``zx * sum(w)`` the
rewrite already subtracts per output channel then carries the ``-128 * sum(w)`` term:

    sum((x - 128) * w) - (zx - 128) * sum(w) == sum((x - zx) * w)        (exact in int32)

``udot`` (uint8 x uint8) would need the weights shifted as well, and a second correction term
that depends on the activations; ``sdot`` needs neither.

The rewrite is the x86 one (channels padded to 16 output x 4 input, zero point as the pad
value, requantization fused into the epilogue), so the weights are packed the same way,
``[F/16, ..., K/4, 16, 4]``, and the same schedule rule, :class:`graphopt.backend.int8.Int8DotRule`
with :data:`ARM_SDOT` (what differs from x86: the target test, int8 activations, the intrinsic,
the tile size), tensorizes the inner 16x4 block as four ``sdot`` (:data:`SDOT_LOCAL_INTRIN`, one
per 4 output channels, the 4 activations broadcast to every lane) into a register tile of
accumulators. On an aarch64 target without ``+dotprod`` the
QDQ model keeps its float kernels (int32 multiply-adds without a dot product are no faster).
"""

from __future__ import annotations

import contextlib
from typing import Any

from .int8 import DotInstruction

#: the sdot 16x4 block with the accumulators in a ``local`` (register) tile
SDOT_LOCAL_INTRIN = "graphopt_dot_16x4_i8i8i32_sdot_local"
#: 16-lane accumulator blocks in the register tile: 4 blocks = 16 of NEON's 32 vector registers,
#: leaving room for the weight vectors of one reduction step and the broadcast activations
ARM_TILE_BLOCKS = 4


def is_aarch64(target: Any) -> bool:
    """Is ``target`` an LLVM target for 64-bit Arm?"""
    try:
        if str(target.kind.name) != "llvm":
            return False
        triple = str(target.attrs.get("mtriple", "") or "")
    except Exception:  # noqa: BLE001 - not a tvm.target.Target
        return False
    return triple.split("-")[0] in ("aarch64", "arm64")


def has_arm_dot(target: Any) -> bool:
    """Does the aarch64 LLVM target have the dot-product instructions (``+dotprod``, or an
    ``mcpu`` that implies them)?"""
    if not is_aarch64(target):
        return False
    try:
        from tvm.target import codegen

        return bool(codegen.target_has_features("dotprod", target))
    except Exception:  # noqa: BLE001 - LLVM without the AArch64 backend
        return False


def int8_activation_dtype(target: Any) -> str | None:
    """The activation dtype of the integer kernels for ``target`` (what
    :func:`graphopt.backend.int8.rewrite_qdq` takes as ``activations``): ``"uint8"`` for
    AVX-512 VNNI, ``"int8"`` for Arm ``sdot``; None where the CPU has no integer dot product
    (the QDQ model keeps its float kernels)."""
    from .int8 import has_vnni

    if has_vnni(target):
        return "uint8"
    if has_arm_dot(target):
        return "int8"
    return None


def register_sdot_intrinsic() -> str:
    """Register (once) ``C[16] += sum_k A[k] * B[:, k]`` (int8 ``A[4]``, int8 ``B[16, 4]``,
    int32 ``C`` in local scope) as four ``sdot`` (LLVM's ``llvm.aarch64.neon.sdot``), each on 4
    output channels with the 4 activations broadcast to all lanes. TVM's own ``sdot`` intrinsic
    (``tvm.s_tir.tensor_intrin.arm_cpu``) covers 4 channels with global accumulators only; the
    register tile needs local ones, and 16 channels match the x86 rewrite's padding and packing."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    with contextlib.suppress(Exception):  # registered already (the lookup raises when not)
        TensorIntrin.get(SDOT_LOCAL_INTRIN)
        return SDOT_LOCAL_INTRIN

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
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
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (16, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (16,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            four = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")  # 4 activations, one lane
            for j in T.unroll(4):  # 4 output channels per sdot
                C[T.ramp(j * 4, 1, 4)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                    C.vload([j * 4], dtype="int32x4"),
                    T.reinterpret(T.broadcast(four, 4), dtype="int8x16"),
                    B.vload([j * 4, 0], dtype="int8x16"),
                    dtype="int32x4",
                )

    TensorIntrin.register(SDOT_LOCAL_INTRIN, desc, impl)
    return SDOT_LOCAL_INTRIN


#: Arm ``sdot`` (int8 activations x int8 weights) for :class:`graphopt.backend.int8.Int8DotRule`:
#: a ``local`` (register) tile of at most :data:`ARM_TILE_BLOCKS` 16-lane accumulator blocks
ARM_SDOT = DotInstruction("int8-arm-dot", "int8", has_arm_dot, register_sdot_intrinsic, ARM_TILE_BLOCKS)
