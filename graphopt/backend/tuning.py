"""MetaSchedule auto-tuning with a budget, a persistent per-target cache, and remote measurement.

How the budget is spent (NOTES.md: a task MetaSchedule leaves untuned keeps naive loops, and
tuning costs seconds per trial on small machines):

- tasks are ordered by weighted FLOPs, heaviest first; tasks already in the cache are skipped;
- ``trials=N`` gives every remaining task ``N / tasks`` trials (at least ``min_trials``); if N
  cannot cover them all, the heaviest tasks get the trials and the rest keep graphopt's default
  schedules (never naive loops), and the report says which;
- ``minutes=M`` tunes tasks in that order, each with a per-task trial count adjusted from the
  measured seconds per trial, until the deadline;
- each task is tuned in its own MetaSchedule run against the same JSON database, so every
  finished task is on disk at once: an interrupted run (Ctrl-C, a crash) keeps its progress.

The database lives in ``<cache>/<target key>/`` where the cache is ``cache_dir``, else
``$GRAPHOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/graphopt/tvm`` (``~/.cache/graphopt/tvm``).
Records are keyed by the TIR workload, so another model with the same layers reuses them.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from graphopt.errors import CompileError

from .targets import TargetSpec, _first_line, host_cores

logger = logging.getLogger(__name__)


def default_cache_root() -> Path:
    """Root of graphopt's TVM tuning cache."""
    env = os.environ.get("GRAPHOPT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "graphopt" / "tvm"


def cache_path(target: TargetSpec, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The database directory for ``target``."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    return root / target.key()


def open_database(target: TargetSpec, cache_dir: str | os.PathLike[str] | None = None, *, create: bool = True) -> Any:
    """The persistent MetaSchedule JSON database of ``target`` (None if absent and not ``create``)."""
    from tvm.s_tir import meta_schedule as ms

    d = cache_path(target, cache_dir)
    if not create and not (d / "database_tuning_record.json").is_file():
        return None
    d.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(d), module_equality="structural")


def parse_rpc(spec: str) -> tuple[str, int, str]:
    """``host:port:key`` of a TVM RPC tracker."""
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2]:
        raise CompileError(f"bad --rpc {spec!r}; expected TRACKER_HOST:PORT:DEVICE_KEY (e.g. 127.0.0.1:9190:board)")
    return parts[0], int(parts[1]), parts[2]


def _task_flops(task: Any) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0])) * int(task.weight)
    except Exception:  # noqa: BLE001 - unknown flops: treat as light
        return 0.0


def _tuned(database: Any, task: Any) -> bool:
    mod = task.dispatched[0]
    if not database.has_workload(mod):
        return False
    return bool(database.get_top_k(database.commit_workload(mod), 1))


def tune(
    mod: Any,
    target: TargetSpec,
    *,
    trials: int = 0,
    minutes: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    rpc: str | None = None,
    min_trials: int = 8,
    progress: bool = True,
    seed: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """Tune the TIR functions of a lowered Relax module; return (database, report)."""
    from tvm.s_tir import meta_schedule as ms

    if trials < 0 or (minutes is not None and minutes <= 0):
        raise CompileError("--trials must be >= 0 and --minutes > 0")
    if target.is_cross and rpc is None:
        raise CompileError(f"tuning for {target.name} needs a device to measure on: give --rpc TRACKER:PORT:KEY")
    tgt = target.tvm_target()
    database = open_database(target, cache_dir)
    workdir = cache_path(target, cache_dir)
    tasks = ms.relax_integration.extract_tasks(mod, tgt)
    tasks = [t for t in tasks if not t.mod.attrs.get("tirx.is_scheduled", False)]
    ranked = sorted(tasks, key=_task_flops, reverse=True)
    in_cache = [_tuned(database, t) for t in ranked]
    todo = [t for t, hit in zip(ranked, in_cache, strict=True) if not hit and _task_flops(t) > 0]
    cached = sum(in_cache)
    report: dict[str, Any] = {"tasks": len(ranked), "cached": cached, "tuned": [], "skipped": [],
                              "cache_dir": str(workdir), "trials": 0}
    if not todo:
        logger.info("tuning: all %d tasks found in the cache %s", len(ranked), workdir)
        return database, report
    deadline = time.monotonic() + minutes * 60 if minutes else None
    if trials:
        per_task = max(min_trials, trials // len(todo))
        n_fit = max(1, trials // per_task)
        plan = todo[:n_fit]
        report["skipped"] = [t.task_name for t in todo[n_fit:]]
    else:
        plan = todo
        per_task = max(min_trials, min(64, int((minutes or 1) * 60 / max(1, len(todo)) / 3.0)))
    runner: Any = "local"
    if rpc is not None:
        host, port, key = parse_rpc(rpc)
        runner = ms.runner.RPCRunner(
            rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                           session_timeout_sec=60),
            max_workers=1,
        )
    try:
        import xgboost  # noqa: F401

        cost_model = "xgb"
    except ImportError:
        cost_model = "random"
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan), desc="tuning", unit="task")
    spent = 0.0
    done_trials = 0
    try:
        for i, task in enumerate(plan):
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    report["skipped"] += [t.task_name for t in plan[i:]]
                    break
                if done_trials:
                    sec_per_trial = spent / done_trials
                    remaining = len(plan) - i
                    per_task = int(max(min_trials, min(256, left / remaining / max(sec_per_trial, 0.05))))
            ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                [task], work_dir=str(workdir), num_threads=host_cores(), seed=seed)
            t0 = time.monotonic()
            try:
                ms.tune.tune_tasks(
                    tasks=ctxs, task_weights=weights, work_dir=str(workdir), max_trials_global=per_task,
                    max_trials_per_task=per_task, num_trials_per_iter=min(64, per_task), runner=runner,
                    database=database, cost_model=cost_model, task_scheduler="round-robin",
                )
            except Exception as exc:  # noqa: BLE001 - a failing task keeps its default schedule
                logger.warning("tuning %s failed (%s); it keeps the default schedule", task.task_name, _first_line(exc))
                report["skipped"].append(task.task_name)
                continue
            spent += time.monotonic() - t0
            done_trials += per_task
            report["tuned"].append(task.task_name)
            report["trials"] += per_task
            if bar is not None:
                bar.update(1)
                bar.set_postfix(task=task.task_name[:24], trials=per_task)
    except KeyboardInterrupt:
        logger.warning("tuning interrupted; %d finished tasks are saved in %s", len(report["tuned"]), workdir)
        raise
    finally:
        if bar is not None:
            bar.close()
    report["seconds"] = spent
    return database, report
