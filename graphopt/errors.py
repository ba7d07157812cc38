"""Errors raised by graphopt.

Every error a user can cause (a bad file, a malformed model, a bad option) is a
:class:`GraphoptError`; the CLI prints its message on one line and exits with code 2.
Errors carry the offending node or field so that the message points at the problem.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Base class of every error graphopt raises for bad input or an impossible request."""

    def __init__(self, message: str, *, node: str | None = None, field: str | None = None) -> None:
        self.node = node
        self.field = field
        where = []
        if node is not None:
            where.append(f"node {node!r}")
        if field is not None:
            where.append(field)
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class ModelLoadError(GraphoptError):
    """The file could not be read as an ONNX model (missing, a directory, empty, not protobuf)."""


class ExternalDataError(ModelLoadError):
    """External tensor data is missing, truncated or points outside the model's directory."""


class InvalidModelError(GraphoptError):
    """The model parsed but breaks ONNX rules (undefined value, duplicate name, cycle, ...)."""


class CheckerError(InvalidModelError):
    """onnx's full check (``onnx.checker.check_model(m, full_check=True)``) refuses the model.

    The message is the checker's first line and the node it names; the CLI adds how to go on
    anyway (``--no-check``), for models that ONNX Runtime runs although the checker objects."""


class UnsupportedModelError(GraphoptError):
    """The model is valid ONNX but uses something graphopt cannot handle."""


class VerificationError(InvalidModelError):
    """An IR invariant does not hold (raised by :meth:`graphopt.ir.Graph.verify`)."""


class PassError(GraphoptError):
    """A pass was misconfigured, unknown, or broke the IR."""


class NumericalMismatchError(GraphoptError):
    """Outputs of a transformed model differ from the original beyond tolerance."""


class InputSpecError(GraphoptError):
    """User-provided inputs, shapes or calibration data do not match the model."""


class RuntimeBackendError(GraphoptError):
    """A runtime (ONNX Runtime, TVM) refused to load or run the model."""


class CompileError(GraphoptError):
    """A model cannot be compiled for the requested target (unsupported op, unknown target,
    missing toolchain, dynamic shape without a hint)."""


#: optional extra (``pip install "graphopt[EXTRA]"``) that provides each optional top-level module
EXTRAS = {"tvm": "tvm", "tvm_ffi": "tvm", "xgboost": "tvm", "psutil": "tvm", "cloudpickle": "tvm", "onnxsim": "bench", "onnxslim": "bench",
          "onnxoptimizer": "bench", "onnxconverter_common": "bench", "PIL": "corpus", "sklearn": "corpus"}


class MissingExtraError(GraphoptError):
    """An optional dependency is not installed; the message names the exact install command."""

    def __init__(self, module: str, what: str | None = None, extra: str | None = None) -> None:
        self.module = module
        self.extra = extra or EXTRAS.get(module.split(".")[0], "")
        how = f'pip install "graphopt[{self.extra}]"' if self.extra else f"pip install {module.split('.')[0]}"
        super().__init__(f"{what or module.split('.')[0]} needs {module.split('.')[0]!r}, which is not installed: {how}")


def require_extra(module: str, what: str | None = None, extra: str | None = None) -> object:
    """Import and return ``module``; if it is missing, raise :class:`MissingExtraError` naming the
    ``pip install "graphopt[EXTRA]"`` command that provides it (``what``: the feature that needs it)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] != module.split(".")[0]:
            raise  # the module is there but broken: not a missing extra
        raise MissingExtraError(module, what, extra) from None
