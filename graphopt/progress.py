"""Progress for long steps: one bar per step on a terminal, plain periodic lines elsewhere.

Every step that can take more than a couple of seconds (calibration, sensitivity searches,
pruning refits, compile stages, tuning, benchmark warm-up, verification loops) reports through
:func:`progress`, so the command line, library users and passes behave the same way:

* on a terminal (``sys.stderr.isatty()``): a tqdm bar with the count, rate and ETA, cleared when
  the step ends;
* elsewhere (a log file, CI, a pipe): a plain line on the ``graphopt.progress`` logger at INFO
  level every :data:`INTERVAL` seconds (``GRAPHOPT_PROGRESS_INTERVAL``, default 10) and one when
  a step that printed lines ends; short steps print nothing. The ``graphopt`` command shows these
  lines; a library user sees them once logging is configured for INFO;
* nothing at all when quiet: :func:`set_quiet` (the CLI's ``--quiet``) or ``GRAPHOPT_QUIET=1``.

Example (a pass's per-layer search)::

    from graphopt.progress import progress

    for name in progress(layers, desc="sensitivity", unit="layer"):
        ...

    with progress(total=len(stages), desc="compiling", unit="stage") as bar:
        for stage in stages:
            bar.set_postfix(stage.name)
            stage.run()
            bar.update()
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("graphopt.progress")

_quiet: bool | None = None  # None: follow GRAPHOPT_QUIET


def set_quiet(quiet: bool | None) -> None:
    """Silence every progress bar and progress line (``None``: follow ``GRAPHOPT_QUIET`` again)."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    """Whether progress is silenced (:func:`set_quiet`, else ``GRAPHOPT_QUIET`` set to a true value)."""
    if _quiet is not None:
        return _quiet
    return os.environ.get("GRAPHOPT_QUIET", "").strip().lower() not in ("", "0", "false", "no")


def interval() -> float:
    """Seconds between two plain progress lines when stderr is not a terminal."""
    try:
        return max(0.0, float(os.environ.get("GRAPHOPT_PROGRESS_INTERVAL", "10")))
    except ValueError:
        return 10.0


def _fmt_seconds(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Progress(Generic[T]):
    """One step's progress; see :func:`progress`. Iterate over it (when made from an iterable)
    or call :meth:`update`; use it as a context manager (or call :meth:`close`) to end it."""

    def __init__(self, iterable: Iterable[T] | None, total: int | None, desc: str, unit: str,
                 disable: bool = False) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.lines = 0  # plain lines printed (a closing line follows only then)
        self.bar: Any = None
        self.mode = "off" if disable or is_quiet() else "bar" if _isatty(sys.stderr) else "lines"
        if self.mode == "bar":
            from tqdm import tqdm

            # a terminal that reports no width (some CI ptys) would get an empty bar: assume COLUMNS or 80
            sized = _columns(sys.stderr) > 0
            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=sized,
                            ncols=None if sized else shutil.get_terminal_size().columns)

    def __iter__(self) -> Iterator[T]:
        if self.iterable is None:
            raise TypeError("this progress was made without an iterable; call update()")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> Progress[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "lines":
            now = time.monotonic()
            if now - self.last >= interval():
                self.last = now
                self.lines += 1
                log.info("%s", self._line(now))

    def set_postfix(self, text: str) -> None:
        """What the step is doing now (a layer or stage name), shown after the bar."""
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        """End the step: clear the bar, or print a closing line if periodic lines were printed."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "lines" and self.lines:
            self.postfix = ""
            log.info("%s done in %s", self._line(time.monotonic(), eta=False), _fmt_seconds(time.monotonic() - self.start))
        self.mode = "off"

    def _line(self, now: float, eta: bool = True) -> str:
        elapsed = now - self.start
        text = f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        if eta:
            text += f", {_fmt_seconds(elapsed)} elapsed"
            if self.total and self.n:
                text += f", ETA {_fmt_seconds(elapsed / self.n * max(self.total - self.n, 0))}"
        return text + (f" [{self.postfix}]" if self.postfix else "")


def _columns(stream: Any) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str,
             unit: str = "it", disable: bool = False) -> Progress[T]:
    """Progress of one long step over ``iterable`` (or ``total`` units counted by
    :meth:`Progress.update`): a tqdm bar with count and ETA on a terminal, a plain INFO line on
    the ``graphopt.progress`` logger every :func:`interval` seconds otherwise, nothing when
    quiet (:func:`set_quiet`, ``GRAPHOPT_QUIET``) or ``disable`` (a caller's own switch)."""
    return Progress(iterable, total, desc, unit, disable)


__all__ = ["Progress", "interval", "is_quiet", "progress", "set_quiet"]
