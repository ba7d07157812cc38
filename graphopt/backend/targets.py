"""Compilation targets: presets, host detection and user-given TVM target dicts.

TVM 0.27 takes targets as dicts (NOTES.md: string forms like ``"llvm -mcpu=x"`` are refused and
``"mcpu": "native"`` silently builds generic code). A :class:`TargetSpec` records the TVM target
dict plus what the exporter needs: the device kind and, for cross builds, the C compiler.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

from graphopt.errors import CompileError

X86_LEVELS = ("x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4")
AARCH64_CC = "aarch64-linux-gnu-gcc"


@dataclass
class TargetSpec:
    """A resolved target: ``config`` is the TVM target dict; ``device`` is "cpu" or "cuda"."""

    name: str
    config: dict[str, Any]
    device: str = "cpu"
    cross_compiler: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_cross(self) -> bool:
        """True when the code cannot run on this machine (another ISA)."""
        return self.cross_compiler is not None

    def tvm_target(self) -> Any:
        """The ``tvm.target.Target`` (imports TVM)."""
        import tvm

        try:
            return tvm.target.Target(self.config)
        except Exception as exc:  # noqa: BLE001 - TVM's own message is the useful part
            raise CompileError(f"TVM rejects target {self.name!r}: {_first_line(exc)}", field="target") from None

    def key(self) -> str:
        """A stable string naming this target (tuning-cache directory name)."""
        blob = json.dumps(self.config, sort_keys=True)
        import hashlib

        return f"{self.config.get('kind', 'target')}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def host_cores() -> int:
    """Physical cores available to this process (TVM's thread pool size)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001 - psutil is optional outside the tvm extra
        n = None
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n or avail, avail))


def resolve_target(spec: str | dict[str, Any] | TargetSpec = "host") -> TargetSpec:
    """Turn a preset name, a JSON string or a TVM target dict into a :class:`TargetSpec`.

    Presets: ``host`` (this CPU, detected), ``x86-64``, ``x86-64-v2``, ``x86-64-v3``,
    ``x86-64-v4`` (portable x86 levels), ``aarch64`` (64-bit Arm Linux, cross-compiled),
    ``aarch64-dotprod`` (the same with the Armv8.2 dot-product instructions that QDQ models'
    integer kernels use: Cortex-A55/A76 and later, Neoverse, Graviton2+, Raspberry Pi 5),
    ``cuda`` / ``cuda:sm_80`` / ``cuda:sm_90`` (NVIDIA GPU of that architecture; default sm_80).
    """
    if isinstance(spec, TargetSpec):
        return spec
    if isinstance(spec, dict):
        return _from_dict(dict(spec), name=spec.get("kind", "custom"))
    if not isinstance(spec, str) or not spec.strip():
        raise CompileError(f"bad target {spec!r}", field="target")
    s = spec.strip()
    if s.startswith("{"):
        try:
            cfg = json.loads(s)
        except json.JSONDecodeError as exc:
            raise CompileError(f"target JSON does not parse: {exc.msg}", field="target") from None
        if not isinstance(cfg, dict):
            raise CompileError("target JSON must be an object such as {\"kind\": \"llvm\"}", field="target")
        return _from_dict(cfg, name=cfg.get("kind", "custom"))
    low = s.lower()
    if low == "host":
        from tvm.target import codegen

        cfg = {"kind": "llvm", "mtriple": codegen.llvm_get_system_triple(), "mcpu": codegen.llvm_get_system_cpu(),
               "num-cores": host_cores()}
        return TargetSpec("host", cfg)
    if low in X86_LEVELS:
        return TargetSpec(low, {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": low, "num-cores": host_cores()})
    if low in ("aarch64", "arm64"):
        cfg = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4}
        return TargetSpec("aarch64", cfg, cross_compiler=AARCH64_CC)
    if low in ("aarch64-dotprod", "arm64-dotprod"):
        cfg = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"], "num-cores": 4}
        return TargetSpec("aarch64-dotprod", cfg, cross_compiler=AARCH64_CC)
    if low == "cuda" or low.startswith("cuda:"):
        arch = low.split(":", 1)[1] if ":" in low else "sm_80"
        if not arch.startswith("sm_") or not arch[3:].isdigit():
            raise CompileError(f"bad CUDA architecture {arch!r}; use e.g. cuda:sm_80 or cuda:sm_90", field="target")
        # limits every NVIDIA GPU since Kepler has (48 KiB is the static shared-memory limit);
        # without them TVM warns and assumes the same
        return _from_dict({"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152,
                           "max_threads_per_block": 1024, "thread_warp_size": 32}, name=f"cuda:{arch}")
    raise CompileError(
        f"unknown target {spec!r}; use host, {', '.join(X86_LEVELS)}, aarch64, aarch64-dotprod, cuda[:sm_XX] "
        "or a TVM target dict/JSON such as '{\"kind\": \"llvm\", \"mcpu\": \"znver4\"}'",
        field="target",
    )


def _from_dict(cfg: dict[str, Any], name: str) -> TargetSpec:
    kind = cfg.get("kind")
    if kind not in ("llvm", "cuda", "c"):
        raise CompileError(f"unsupported target kind {kind!r} (llvm, cuda or c)", field="target")
    if kind == "cuda":
        cfg.setdefault("host", {"kind": "llvm"})
        return TargetSpec(name, cfg, device="cuda")
    triple = str(cfg.get("mtriple", ""))
    cross = None
    if triple and not triple.startswith("x86_64") and triple.split("-")[0] in ("aarch64", "arm64"):
        cross = AARCH64_CC
    return TargetSpec(name, cfg, cross_compiler=cross)


def check_toolchain(target: TargetSpec, *, for_export: bool = True) -> None:
    """Raise a one-line :class:`CompileError` when the tools a target needs are missing."""
    if target.device == "cuda":
        if shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
            raise CompileError("target cuda needs NVIDIA's nvcc (CUDA toolkit) on PATH to build; none found",
                               field="target")
    if for_export and target.cross_compiler and shutil.which(target.cross_compiler) is None:
        raise CompileError(
            f"target {target.name} needs the cross compiler {target.cross_compiler} to write a shared library "
            "(Debian: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross); or export a .tar instead",
            field="target",
        )
