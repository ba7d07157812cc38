"""Pass infrastructure: passes, pipelines, the registry, the pass context and instruments.

A :class:`Pass` transforms a graph and says whether it changed anything. A :class:`Pipeline`
runs passes and nested pipelines in order, optionally repeating a group until nothing changes
(a fixpoint group). Cross-cutting concerns - timing, IR verification, numerical checks against
ONNX Runtime, snapshots, reports - are *instruments* attached to the :class:`PassContext`
(in the spirit of TVM's ``PassInstrument``), so passes stay small.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from graphopt.errors import GraphoptError, PassError
from graphopt.ir.core import Graph, Model

log = logging.getLogger(__name__)


def _first_line(doc: str | None) -> str:
    doc = inspect.cleandoc(doc or "")
    return doc.splitlines()[0] if doc else ""


class Pass:
    """Base class of a transformation.

    Subclasses set ``name`` (the registry key), write a docstring that states the rules the
    pass applies, declare their options with defaults in ``default_options``, and implement
    :meth:`run` for one graph. :meth:`apply` runs it on the main graph, every subgraph
    (innermost first) and every local function body; override :meth:`apply` for passes that
    need the whole model at once.
    """

    name: str = ""
    default_options: dict[str, Any] = {}
    #: run on If/Loop/Scan bodies and function bodies as well as the main graph
    recursive: bool = True

    def __init__(self, **options: Any) -> None:
        unknown = set(options) - set(self.default_options)
        if unknown:
            raise PassError(
                f"unknown option(s) {sorted(unknown)}; known: {sorted(self.default_options) or 'none'}",
                field=f"pass {self.name!r}",
            )
        self.options: dict[str, Any] = {**self.default_options, **options}
        self.model: Model | None = None

    @classmethod
    def summary(cls) -> str:
        """The docstring's first paragraph, on one line (what ``graphopt passes`` lists)."""
        doc = inspect.cleandoc(cls.__doc__ or "")
        return " ".join(doc.split("\n\n")[0].split()) if doc else ""

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        """Transform ``graph`` in place; return True if anything changed."""
        raise NotImplementedError

    def apply(self, model: Model, ctx: PassContext) -> bool:
        """Run on the model's graphs; return True if anything changed."""
        self.model = model
        graphs = list(model.all_graphs()) if self.recursive else [model.graph]
        changed = False
        for g in reversed(graphs):  # inner bodies first, then the graphs that contain them
            if self.run(g, ctx):
                changed = True
        return changed

    def __repr__(self) -> str:
        opts = {k: v for k, v in self.options.items() if self.default_options.get(k) != v}
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"


class FunctionPass(Pass):
    """A pass made from a plain function ``fn(graph, ctx) -> bool`` (see :func:`register_pass`)."""

    fn: Callable[[Graph, PassContext], bool]

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        return bool(type(self).fn(graph, ctx))


class Pipeline(Pass):
    """A sequence of passes and nested pipelines.

    With ``fixpoint=True`` the sequence repeats until a whole round changes nothing (or
    ``max_iterations`` rounds ran).
    """

    name = "pipeline"

    def __init__(
        self,
        passes: Sequence[Pass | str],
        *,
        fixpoint: bool = False,
        max_iterations: int = 10,
        name: str = "pipeline",
    ) -> None:
        super().__init__()
        self.name = name
        self.passes: list[Pass] = [get_pass(p) if isinstance(p, str) else p for p in passes]
        self.fixpoint = fixpoint
        self.max_iterations = max_iterations

    def apply(self, model: Model, ctx: PassContext) -> bool:
        changed_any = False
        for it in range(self.max_iterations if self.fixpoint else 1):
            changed = False
            for p in self.passes:
                if ctx.run_pass(p, model):
                    changed = True
            changed_any |= changed
            if not changed:
                break
            if self.fixpoint:
                log.debug("%s: round %d changed the model", self.name, it + 1)
        return changed_any

    def leaves(self) -> list[Pass]:
        out: list[Pass] = []
        for p in self.passes:
            out.extend(p.leaves() if isinstance(p, Pipeline) else [p])
        return out

    def __repr__(self) -> str:
        inner = ", ".join(map(repr, self.passes))
        return f"{self.name}[{inner}]" + ("*" if self.fixpoint else "")


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------
_PASSES: dict[str, type[Pass]] = {}
_PIPELINES: dict[str, tuple[Callable[..., Pipeline], str]] = {}
_loaded = False

ENTRY_POINT_GROUP = "graphopt.passes"


def register_pass(obj: Any = None, *, name: str | None = None) -> Any:
    """Register a :class:`Pass` subclass (or a function ``fn(graph, ctx) -> bool``) by name.

    Usable as ``@register_pass``, ``@register_pass(name="x")`` or ``register_pass(MyPass)``.
    A function's docstring becomes the pass's doc; its name (underscores to dashes) the key.
    """

    def do(o: Any) -> Any:
        if inspect.isclass(o) and issubclass(o, Pass):
            cls = o
            key = name or cls.name or cls.__name__
            cls.name = key
        elif callable(o):
            key = name or o.__name__.replace("_", "-")
            cls = type(
                "FunctionPass_" + o.__name__,
                (FunctionPass,),
                {"fn": staticmethod(o), "name": key, "__doc__": o.__doc__, "__module__": o.__module__},
            )
        else:
            raise TypeError("register_pass expects a Pass subclass or a function")
        prev = _PASSES.get(key)
        if prev is not None and prev.__qualname__ != cls.__qualname__:
            log.warning("pass %r re-registered (%s replaces %s)", key, cls.__qualname__, prev.__qualname__)
        _PASSES[key] = cls
        return o if not inspect.isclass(o) else cls

    if obj is None:
        return do
    return do(obj)


def register_pipeline(name: str, factory: Callable[..., Pipeline], doc: str = "") -> None:
    """Register a named pipeline (``graphopt optimize --pipeline NAME``)."""
    _PIPELINES[name] = (factory, doc or _first_line(factory.__doc__))


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import graphopt.passes  # noqa: F401  (built-in passes register on import)

    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break graphopt
            log.warning("plugin %s (%s) failed to load: %s", ep.name, ep.value, e)
            continue
        if inspect.isclass(obj) and issubclass(obj, Pass):
            register_pass(obj, name=obj.name or ep.name)


def list_passes() -> dict[str, type[Pass]]:
    """All registered passes (built-ins and entry-point plugins), by name."""
    _load_plugins()
    return dict(sorted(_PASSES.items()))


def list_pipelines() -> dict[str, str]:
    _load_plugins()
    return {k: v[1] for k, v in sorted(_PIPELINES.items())}


def get_pass(name: str, **options: Any) -> Pass:
    """Instantiate a registered pass (or a named pipeline) by name."""
    _load_plugins()
    if name in _PASSES:
        return _PASSES[name](**options)
    if name in _PIPELINES:
        return _PIPELINES[name][0](**options)
    close = difflib.get_close_matches(name, list(_PASSES) + list(_PIPELINES), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run `graphopt passes` for the list"
    raise PassError(f"unknown pass {name!r}{hint}")


def get_pipeline(name: str, **options: Any) -> Pipeline:
    _load_plugins()
    if name not in _PIPELINES:
        close = difflib.get_close_matches(name, list(_PIPELINES), n=3)
        raise PassError(f"unknown pipeline {name!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                         f"; known: {', '.join(sorted(_PIPELINES))}"))
    return _PIPELINES[name][0](**options)


# ---------------------------------------------------------------------------------------------
# context and instruments
# ---------------------------------------------------------------------------------------------
class Instrument:
    """Hooks around every (leaf) pass run. Override what you need."""

    def enter(self, model: Model, ctx: PassContext) -> None:
        """Called once before the first pass."""

    def before_pass(self, p: Pass, model: Model, ctx: PassContext) -> None:
        """Called before each pass."""

    def after_pass(self, p: Pass, model: Model, ctx: PassContext, changed: bool, record: PassRecord) -> None:
        """Called after each pass with its record (time, changed...), which it may extend."""

    def exit(self, model: Model, ctx: PassContext) -> None:
        """Called once after the last pass."""


@dataclass
class PassRecord:
    """What one pass run did (one row of the per-pass report)."""

    name: str
    changed: bool = False
    seconds: float = 0.0
    nodes: int | None = None
    params: int | None = None
    bytes: int | None = None
    flops: int | None = None
    max_abs_error: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class PassContext:
    """State shared by the passes of one run.

    Attributes:
        options: global options passes may read (e.g. ``allow_contrib``, size limits).
        calibration: calibration samples (list of input dicts) for data-aware passes.
        input_shapes: user hints resolving symbolic input dims.
        instruments: :class:`Instrument` objects called around every pass.
        records: one :class:`PassRecord` per leaf pass run.
    """

    def __init__(
        self,
        *,
        options: dict[str, Any] | None = None,
        instruments: Iterable[Instrument] = (),
        calibration: Any = None,
        input_shapes: dict[str, Sequence[int]] | None = None,
        progress: bool = False,
    ) -> None:
        self.options: dict[str, Any] = dict(options or {})
        self.instruments: list[Instrument] = list(instruments)
        self.calibration = calibration
        self.input_shapes = dict(input_shapes or {})
        self.records: list[PassRecord] = []
        self.progress = progress
        self.model: Model | None = None
        self._cache: dict[tuple[Any, int], Any] = {}

    # -- analyses -------------------------------------------------------------------------------
    def analysis(self, fn: Callable[..., Any], target: Any, *args: Any) -> Any:
        """Result of ``fn(target, *args)``, cached until a pass reports a change."""
        key = (fn, id(target), *args)
        if key not in self._cache:
            self._cache[key] = fn(target, *args)
        return self._cache[key]

    def invalidate(self) -> None:
        """Drop every cached analysis (done automatically when a pass changed the model)."""
        self._cache.clear()

    # -- running --------------------------------------------------------------------------------
    def run_pass(self, p: Pass, model: Model) -> bool:
        """Run one pass (pipelines recurse) with the instruments around it."""
        if isinstance(p, Pipeline):
            return p.apply(model, self)
        for ins in self.instruments:
            ins.before_pass(p, model, self)
        t0 = time.perf_counter()
        try:
            changed = bool(p.apply(model, self))
        except GraphoptError:
            raise  # user-facing errors keep their class and message
        except Exception as e:
            raise PassError(f"pass failed: {type(e).__name__}: {e}", field=f"pass {p.name!r}") from e
        rec = PassRecord(p.name, changed, time.perf_counter() - t0)
        if changed:
            self.invalidate()
        self.records.append(rec)
        for ins in self.instruments:
            ins.after_pass(p, model, self, changed, rec)
        log.debug("pass %s: changed=%s in %.3fs", p.name, changed, rec.seconds)
        return changed


def run_passes(
    model: Model,
    passes: Pass | Sequence[Pass | str] | str,
    ctx: PassContext | None = None,
) -> bool:
    """Apply ``passes`` (a pass, a pipeline, a name, or a list of them) to ``model`` in place.

    Returns True if anything changed. The context's instruments see every leaf pass.
    """
    ctx = ctx or PassContext()
    if isinstance(passes, str):
        pipeline: Pass = get_pass(passes)
    elif isinstance(passes, Pass):
        pipeline = passes
    else:
        pipeline = Pipeline(list(passes))
    ctx.model = model
    for ins in ctx.instruments:
        ins.enter(model, ctx)
    try:
        changed = ctx.run_pass(pipeline, model)
    finally:
        for ins in ctx.instruments:
            ins.exit(model, ctx)
    return changed
