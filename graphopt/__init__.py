"""graphopt: a compiler-style graph optimizer for ONNX models.

Import a model with :func:`load`, transform it with passes (:func:`run_passes`,
:func:`optimize`), write it with :func:`save`. Write your own pass by subclassing
:class:`Pass` or :class:`PatternPass` and registering it with :func:`register_pass`.
"""

from __future__ import annotations

import importlib.util as _ilu
from pathlib import Path as _Path

from graphopt.errors import (
    CompileError,
    ExternalDataError,
    GraphoptError,
    InputSpecError,
    InvalidModelError,
    ModelLoadError,
    NumericalMismatchError,
    PassError,
    RuntimeBackendError,
    UnsupportedModelError,
    VerificationError,
)
from graphopt.gs import from_graphsurgeon, to_graphsurgeon
from graphopt.instruments import (
    BisectResult,
    NumericCheckInstrument,
    SnapshotInstrument,
    StatsInstrument,
    TimingInstrument,
    VerifyInstrument,
    bisect,
)
from graphopt.ir import Attr, Function, Graph, Model, Node, Tensor, Value
from graphopt.onnx_io import from_proto, load, save, to_proto
from graphopt.rewrite import (
    Builder,
    Const,
    Match,
    Opt,
    PatternPass,
    Rule,
    Var,
    apply_rules,
    explain,
    maybe,
    op,
)
from graphopt.runtime import compare, load_calibration, make_inputs, run_ort
from graphopt.transform import (
    Instrument,
    Pass,
    PassContext,
    PassRecord,
    Pipeline,
    get_pass,
    get_pipeline,
    list_passes,
    list_pipelines,
    register_pass,
    register_pipeline,
    run_passes,
)

__version__ = "0.1.0"

# In a source checkout without an install, ``graphopt.passes`` lives in the top-level
# ``passes/`` folder; make it importable under its installed name.
if _ilu.find_spec("graphopt.passes") is None:  # pragma: no cover - only in an uninstalled checkout
    _root = _Path(__file__).resolve().parent.parent
    if (_root / "passes" / "__init__.py").is_file() and (_root / "pyproject.toml").is_file():
        __path__.append(str(_root))


def optimize(
    model: Model,
    pipeline: str | Pass = "default",
    *,
    ctx: PassContext | None = None,
) -> Model:
    """Run a named pipeline (default: ``"default"``) or a pass on ``model`` in place; return it."""
    run_passes(model, get_pipeline(pipeline) if isinstance(pipeline, str) else pipeline, ctx)
    return model


def compile(model, target="host", **options):  # type: ignore[no-untyped-def]
    """Compile ``model`` with TVM for ``target``; see :func:`graphopt.backend.compile`."""
    from graphopt.backend import compile as _compile

    return _compile(model, target, **options)


__all__ = [
    "Attr", "BisectResult", "Builder", "CompileError", "Const", "ExternalDataError", "Function", "Graph", "GraphoptError",
    "InputSpecError", "Instrument", "InvalidModelError", "Match", "Model", "ModelLoadError", "Node",
    "NumericCheckInstrument", "NumericalMismatchError", "Opt", "Pass", "PassContext", "PassError",
    "PassRecord", "PatternPass", "Pipeline", "Rule", "RuntimeBackendError", "SnapshotInstrument",
    "StatsInstrument", "Tensor", "TimingInstrument", "UnsupportedModelError", "Value", "Var",
    "VerificationError", "VerifyInstrument", "apply_rules", "bisect", "compare", "compile", "explain", "from_graphsurgeon",
    "from_proto", "get_pass", "get_pipeline", "list_passes", "list_pipelines", "load", "load_calibration",
    "make_inputs", "maybe", "op", "optimize", "register_pass", "register_pipeline", "run_ort", "run_passes",
    "save", "to_graphsurgeon", "to_proto",
]
