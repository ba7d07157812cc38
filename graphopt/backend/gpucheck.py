"""Checks of GPU builds that run without a GPU.

TVM's default GPU schedules (DLight) can produce kernels that are wrong only on the device: a
schedule may keep an intermediate in thread-private ("local") memory while one thread writes
an element and another thread reads it. Run serially the loop nest is still right, so TVM's own
CPU-side checks (and any CPU run of the same Relax module) pass, while the GPU computes garbage.
This is what broke ShuffleNet's CUDA build on an H100 (session-2 measurement in
``benchmarks/results/tvm_cuda_h100.json``): ``dlight.gpu.Reduction`` scheduled its group-4 1x1
convolutions with a local buffer written at ``[c * 14 + threadIdx.x]`` and read at
``[threadIdx.x * 12 + j]``.

Two checks, both used by graphopt's CUDA path and its tests:

* :func:`private_memory_hazards` reads the generated CUDA C: a thread-private array (a local
  array declared in a kernel, not ``__shared__``) whose index depends on ``threadIdx`` or
  ``blockIdx`` (directly or through a variable computed from them) is shared across threads in
  the schedule's intent and private in fact. Correct kernels index private arrays with loop
  counters only (TVM compacts each thread's region to start at zero).
* :func:`serialize_gpu_schedule` turns a GPU-scheduled module into one that runs on the CPU:
  thread-bound loops become serial loops and shared/warp buffers local ones. The result checks
  the schedule's index arithmetic, epilogues and reductions against ONNX Runtime; it cannot
  see races or thread-private sharing, which the first check covers.
"""

from __future__ import annotations

import re
from typing import Any

_KERNEL = re.compile(r'__global__\s+void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\s*\([^)]*\)\s*\{')
_LOCAL_ARRAY = re.compile(r'^\s*(?:alignas\(\d+\)\s+)?(?:float|double|half|int|int64_t|uint\w*|signed char|'
                          r'unsigned char|char|bool|__half|nv_bfloat16|\w+_t)\d*\s+(\w+)\[\d+\];', re.MULTILINE)
_INT_DEF = re.compile(r'\b(?:int|int64_t|long long|unsigned|uint)\s+(\w+)\s*=\s*([^;]+);')


def _closing(text: str, i: int, open_: str, close: str) -> int:
    """Index just past the ``close`` that balances an ``open_`` already read before ``i``."""
    depth = 1
    while depth and i < len(text):
        depth += (text[i] == open_) - (text[i] == close)
        i += 1
    return i


def kernel_bodies(cuda_source: str) -> dict[str, str]:
    """``{kernel name: body}`` for every ``__global__`` function defined in ``cuda_source``."""
    return {m.group(1): cuda_source[m.end():_closing(cuda_source, m.end(), "{", "}") - 1]
            for m in _KERNEL.finditer(cuda_source)}


def _subscripts(body: str, name: str) -> list[str]:
    """The subscript expressions of every ``name[...]`` in ``body``."""
    return [body[m.end():_closing(body, m.end(), "[", "]") - 1]
            for m in re.finditer(r"\b" + re.escape(name) + r"\[", body)]


def private_memory_hazards(cuda_source: str) -> dict[str, list[str]]:
    """``{kernel: [private arrays]}`` for kernels that index a thread-private array with a
    thread- or block-dependent subscript (see the module docstring). Empty when none does."""
    bad: dict[str, list[str]] = {}
    for kernel, body in kernel_bodies(cuda_source).items():
        local = [n for n in _LOCAL_ARRAY.findall(body) if not re.search(r"__shared__[^;\n]*\b" + n + r"\[", body)]
        if not local:
            continue
        tainted = {"threadIdx", "blockIdx"}
        for m in _INT_DEF.finditer(body):  # in program order: taint flows through definitions
            if any(re.search(r"\b" + re.escape(t) + r"\b", m.group(2)) for t in tainted):
                tainted.add(m.group(1))
        pattern = re.compile(r"\b(?:" + "|".join(re.escape(t) for t in tainted) + r")\b")
        hits = [n for n in local if any(pattern.search(s) for s in _subscripts(body, n))]
        if hits:
            bad[kernel] = hits
    return bad


def cuda_sources(module: Any) -> str:
    """The CUDA C of every CUDA module imported (at any depth) by a built TVM module."""
    parts: list[str] = []
    seen: set[int] = set()

    def walk(m: Any) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        try:
            kind = m.kind
        except Exception:  # noqa: BLE001
            kind = ""
        if kind == "cuda":
            try:
                parts.append(m.inspect_source("cuda"))
            except Exception:  # noqa: BLE001 - a CUDA module already compiled to a binary has no source
                pass
        for i in getattr(m, "imports", []) or []:
            walk(i)

    walk(getattr(module, "mod", module))
    return "\n".join(parts)


def kernel_function(kernel: str, functions: list[str]) -> str | None:
    """The PrimFunc a kernel came from: TVM names kernels ``<function>_kernel`` (plus a suffix
    when a function launches several)."""
    cands = [f for f in functions if kernel == f + "_kernel" or kernel.startswith(f + "_kernel")]
    return max(cands, key=len) if cands else None


def serialize_gpu_schedule(mod: Any) -> Any:
    """A copy of a GPU-scheduled IRModule whose PrimFuncs run on the CPU: every thread-bound
    loop becomes a serial loop and shared/warp buffers become local ones. Build it for an LLVM
    target and compare with ONNX Runtime to check a GPU schedule's logic without a GPU.

    Done on TVMScript text (TVM 0.27 exposes no Python statement mutator); the printer and
    parser round-trip scheduled PrimFuncs exactly.
    """
    import tvm
    from tvm import tirx

    out = tvm.IRModule()
    for gv, f in mod.functions_items():
        if isinstance(f, tirx.PrimFunc):
            text = re.sub(r'T\.thread_binding\(([^,()]+(?:\([^()]*\))?), thread="[^"]+"', r"T.serial(\1", f.script())
            text = re.sub(r'scope="(?:shared|shared\.dyn|warp)"', 'scope="local"', text)
            f = tvm.script.from_source(text)
        out[gv] = f
    return out


def run_on_cpu(compiled: Any, inputs: Any) -> list[Any]:
    """Run a CUDA :class:`~graphopt.backend.CompiledModel` built in this process on the CPU,
    through :func:`serialize_gpu_schedule`: its kernels' loop nests, serially. Slow (no
    parallelism, no vectorization); for checking GPU schedules against ONNX Runtime."""
    import tvm
    from tvm import relax

    from .vmvalues import flatten_outputs
    from .targets import resolve_target

    if compiled.ir_module is None:
        raise ValueError("run_on_cpu needs a model compiled in this process (its IRModule is not exported)")
    ex = relax.build(serialize_gpu_schedule(compiled.ir_module), target=resolve_target("host").tvm_target())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return flatten_outputs(vm["main"](*[tvm.runtime.tensor(a) for a in compiled.checked_inputs(inputs)]))
