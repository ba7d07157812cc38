"""Compile models for hardware targets with Apache TVM (Relax + MetaSchedule).

``graphopt.compile(model, target="host", trials=0)`` returns a :class:`CompiledModel` with
``run``, ``benchmark`` and ``export``; :func:`load_compiled` loads an exported library back.
TVM is imported lazily: ``import graphopt`` never pays for it.

Threads: TVM's CPU runtime sizes its thread pool to half the hardware threads on x86 (it
assumes two hyperthreads per core), which on a 2-vCPU machine is one thread. Importing this
package sets ``TVM_NUM_THREADS`` to the physical cores available to the process
(:func:`host_cores`), unless the variable is already set. TVM reads it when its thread pool starts, so
this must happen before TVM first runs a parallel kernel in the process. Measured: SqueezeNet
went from 10.5 to 5.8 ms. ``TVM_BIND_THREADS`` defaults to 0 for the same reason: see below.
"""

from __future__ import annotations

import os as _os

from .targets import host_cores as _host_cores

_os.environ.setdefault("TVM_NUM_THREADS", str(_host_cores()))
# and TVM pins its workers to cores, which on a shared machine (another runtime's threads, other
# processes) can leave a worker waiting behind whatever runs on its core: a 0.02 ms model took
# 5.7 ms in 2 of 3 runs next to ONNX Runtime here, never unpinned. graphopt leaves placement to the OS.
_os.environ.setdefault("TVM_BIND_THREADS", "0")

from .compiler import CompiledModel, CompileInfo, IOSpec, compile, example_inputs, load_compiled, prepare
from .targets import TargetSpec, resolve_target

__all__ = ["CompileInfo", "CompiledModel", "IOSpec", "TargetSpec", "compile", "example_inputs", "load_compiled",
           "prepare", "resolve_target"]
