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
``[F/16, ..., K/4, 16, 4]``; :class:`ArmDotRule` tensorizes the inner 16x4 block as four
``sdot`` (:data:`SDOT_LOCAL_INTRIN`, one per 4 output channels, the 4 activations broadcast to
every lane) into a register tile of accumulators. On an aarch64 target without ``+dotprod`` the
QDQ model keeps its float kernels (int32 multiply-adds without a dot product are no faster).
"""

from __future__ import annotations

import contextlib
from typing import Any

from .int8 import K_BLOCK, OC_BLOCK, _domain, _plain_var_dim, _same_buffer, choose_int8_tile


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


class ArmDotRule:
    """Integer conv2d/matmul (int8 activations x int8 constant weights -> int32, the kernels
    :func:`graphopt.backend.int8.rewrite_qdq` makes with ``activations="int8"``) on an aarch64
    target with ``+dotprod``: the reduction's inner 16x4 block tensorized as four ``sdot``.

    The same plan as :class:`graphopt.backend.int8.Int8DotRule` (weight packed at compile time
    to ``[F/16, ..., K/4, 16, 4]``; a register tile of ``xi`` pixels/rows x ``fm`` 16-channel
    blocks; epilogue on write-back; parallel outer loop), with both operands int8: the weight is
    told apart from the activation as the layout-free (constant) parameter. Returns False for
    anything else, so other kernels go to the next rule of
    :data:`graphopt.backend.schedules.DEFAULT_RULES`.
    """

    name = "int8-arm-dot"

    def __init__(self, min_parallel_work: int = 1 << 19) -> None:
        self.min_parallel_work = min_parallel_work

    def apply(self, sch: Any, target: Any) -> bool:
        import math

        from tvm.s_tir.dlight.analysis import normalize_prim_func

        from .schedules import _inline_around, _schedule_root_copies, _uses_var, _write_back, vector_lanes

        if not has_arm_dot(target):
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
        if len(operands) != 2 or any(str(r.source.dtype) != "int8" for r in operands):
            return False
        func = sch.mod["main"]
        free = func.attrs.get("layout_free_buffers") if func.attrs is not None else None
        params = list(func.params)
        free_bufs = [params[int(i)] for i in (free or [])]
        b_hits = [r for r in operands if any(_same_buffer(func, p, r.source) for p in free_bufs)]
        if len(b_hits) != 1:
            return False
        b = b_hits[0]
        a = next(r for r in operands if r is not b)
        iters = main.iters
        if any(it.kind not in "SR" for it in iters):
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
        except TypeError:  # a symbolic extent
            return False
        f_dim, k_dim = _plain_var_dim(b.region, vec_it.var), _plain_var_dim(b.region, k_it.var)
        if f % OC_BLOCK or k % K_BLOCK or f_dim is None or k_dim is None or _uses_var(a, vec_it.var):
            return False
        others = [it for it in spatial if it is not vec_it]
        free_its = [it for it in others if int(it.dom) > 1 and not _uses_var(b, it.var)]
        block_it = free_its[-1] if free_its else None
        xi, fm = choose_int8_tile(int(block_it.dom) if block_it else 1, f // OC_BLOCK, registers=ARM_TILE_BLOCKS)

        # 1. producers inlined (a pad with a real border stays a stage), epilogue chain folded
        epilogue = _inline_around(sch, infos, infos.index(main))
        rv = main.block_rv
        # 2. the weight packed [F/16, <its other dims, K/4 in place of K>, 16, 4] at compile time
        b_idx = next(i for i, r in enumerate(sch.get(rv).reads) if r.source.same_as(b.source))
        nd = len(b.region)
        cache = sch.cache_read(rv, b_idx, "global")
        sch.annotate(cache, "meta_schedule.layout_rewrite_preproc", True)

        def pack(*ax: Any) -> tuple[Any, ...]:
            rest = [ax[d] // K_BLOCK if d == k_dim else ax[d] for d in range(nd) if d != f_dim]
            return (ax[f_dim] // OC_BLOCK, *rest, ax[f_dim] % OC_BLOCK, ax[k_dim] % K_BLOCK)

        sch.transform_layout(rv, ("read", b_idx), pack)
        # 3. register tile of accumulators, epilogue on write-back (only onto the same iteration
        # space: a sliced epilogue inlined into the padded write-back would write past its output)
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
        sch.tensorize(f_i, register_sdot_intrinsic())
        lanes = vector_lanes(target)
        for bl in [wb, init] + ([last_epi] if last_epi is not None and not epi_inlined else []):
            inner = sch.get_loops(bl)[-1]
            try:
                ext = int(sch.get(inner).extent)
            except TypeError:
                continue
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
