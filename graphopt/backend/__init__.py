"""Compile models for hardware targets with Apache TVM (Relax + MetaSchedule).

``graphopt.compile(model, target="host", trials=0)`` returns a :class:`CompiledModel` with
``run``, ``benchmark`` and ``export``; :func:`load_compiled` loads an exported library back.
TVM is imported lazily: ``import graphopt`` never pays for it.
"""

from __future__ import annotations

from .compiler import CompiledModel, CompileInfo, IOSpec, compile, example_inputs, load_compiled, prepare
from .targets import TargetSpec, resolve_target

__all__ = ["CompileInfo", "CompiledModel", "IOSpec", "TargetSpec", "compile", "example_inputs", "load_compiled",
           "prepare", "resolve_target"]
