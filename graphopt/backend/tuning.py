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

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

from graphopt.errors import CompileError

from .targets import TargetSpec, _first_line, host_cores

logger = logging.getLogger(__name__)


def _task_logger(workdir: Path, name: str) -> logging.Logger:
    """A logger writing MetaSchedule's per-task log to ``<cache>/logs/<task>.log``.

    (MetaSchedule's own per-task loggers rebuild logging config from the handlers already on its
    logger and fail when one has no name, as test runners' capture handlers do.)"""
    log = logging.getLogger(f"graphopt.tuning.{name[:100]}")
    log.propagate = False
    log.setLevel(logging.INFO)
    path = workdir / "logs" / f"{name[:100]}.log"
    if not any(getattr(h, "baseFilename", None) == str(path) for h in log.handlers):
        path.parent.mkdir(parents=True, exist_ok=True)
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(h)
    return log


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


def open_database(target: TargetSpec, cache_dir: str | os.PathLike[str] | None = None, *, create: bool = True,
                  best: bool = False) -> Any:
    """The persistent MetaSchedule JSON database of ``target`` (None if absent and not ``create``).

    ``best=True`` opens the compact copy holding only the best record per workload (written by
    :func:`compact_database` after each tuning run): TVM parses every record's trace when it
    opens a database, seconds for a full one, so compiles that only apply records use this.
    """
    from tvm.s_tir import meta_schedule as ms

    d = cache_path(target, cache_dir) / ("best" if best else "")
    if not create and not (d / "database_tuning_record.json").is_file():
        return None
    d.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(d), module_equality="structural")


def compact_database(database: Any, target: TargetSpec, cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """Rewrite ``<cache>/best`` with the fastest record of every workload in ``database``
    (atomically: a fresh directory renamed into place); return it opened."""
    import shutil
    import tempfile as _tf

    from tvm.s_tir import meta_schedule as ms

    root = cache_path(target, cache_dir)
    tmp = Path(_tf.mkdtemp(prefix=".best-", dir=root))
    out = ms.database.JSONDatabase(work_dir=str(tmp), module_equality="structural")
    best: dict[int, Any] = {}
    for rec in database.get_all_tuning_records():
        secs = [float(x) for x in (rec.run_secs or [])]
        if not secs:
            continue
        k = int(tvm_structural_hash(rec.workload.mod))
        mean = sum(secs) / len(secs)
        if k not in best or mean < best[k][0]:
            best[k] = (mean, rec)
    for _, rec in best.values():
        wl = out.commit_workload(rec.workload.mod)
        out.commit_tuning_record(ms.database.TuningRecord(rec.trace, wl, rec.run_secs, rec.target, rec.args_info))
    del out
    final = root / "best"
    old = root / f".old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return open_database(target, cache_dir, best=True)


def tvm_structural_hash(obj: Any) -> int:
    import tvm_ffi

    return int(tvm_ffi.structural_hash(obj))


def parse_rpc(spec: str) -> tuple[str, int, str]:
    """``host:port:key`` of a TVM RPC tracker."""
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2]:
        raise CompileError(f"bad rpc {spec!r}; expected TRACKER_HOST:PORT:DEVICE_KEY (e.g. 127.0.0.1:9190:board)")
    return parts[0], int(parts[1]), parts[2]


def register_intrinsics(device: str = "cpu") -> None:
    """Register only the tensor intrinsics a device can use.

    ``import tvm.s_tir.tensor_intrin`` registers every vendor's intrinsics, which takes about a
    minute on a small machine (40 s of it CUDA's), and MetaSchedule does it in the tuning
    process and again in every build worker, whose pool is restarted for each batch: with its
    30 s build timeout every candidate then fails. The package is marked imported with just the
    submodules this device needs.
    """
    import importlib
    import importlib.util
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    subs = ["cuda"] if device == "cuda" else ["x86", "arm_cpu"]
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None:
            return
        pkg = types.ModuleType(name)
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        pkg.__file__ = spec.origin
        pkg.__package__ = name
        sys.modules[name] = pkg
        import tvm.s_tir

        tvm.s_tir.tensor_intrin = pkg  # type: ignore[attr-defined]
    for sub in subs:
        importlib.import_module(f"{name}.{sub}")


def build_candidate(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule build function for the worker processes (TVM's default, minus the
    minute-long import of every vendor's tensor intrinsics)."""
    register_intrinsics("cuda" if target.kind.name == "cuda" else "cpu")
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from .lut import tir_pipeline

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    # the pipeline the final build uses (byte-table reads as permutes), so candidates are timed
    # as they will run
    return tvm_build(mod, target=target, pipeline=tir_pipeline(target))


def _pool_threads(n: int) -> None:
    """Runner-worker initializer: TVM's thread pool of ``n`` workers, so candidates are timed
    with the thread count the build is for (the target's ``num-cores``)."""
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, n)


def measure_threads(target: TargetSpec) -> int | None:
    """Threads a local measurement should use for ``target``: its ``num-cores`` where that is
    fewer than this machine's cores (None: TVM's pool as it is, every core)."""
    n = target.config.get("num-cores") if target.device == "cpu" else None
    return int(n) if isinstance(n, int) and 0 < n < host_cores() else None


def _default_candidates(func: Any, tgt: Any, variants: int) -> list[Any]:
    """graphopt's default schedule of ``func`` and up to ``variants`` other settings of the rule
    that made it (:func:`~graphopt.backend.schedules.tuner_variants`), as distinct schedules."""
    from tvm import s_tir

    from .schedules import default_schedule, tuner_variants

    sch, name = default_schedule(func, tgt)
    if sch is None:
        return []
    out, seen = [sch], {tvm_structural_hash(sch.mod)}
    for rule in tuner_variants(name or "")[:variants]:
        cand = s_tir.Schedule(func)
        try:
            if not rule.apply(cand, tgt):
                continue
        except Exception as exc:  # noqa: BLE001 - a variant that does not apply is skipped
            logger.debug("variant %s of %s does not apply: %s", vars(rule), name, _first_line(exc))
            continue
        h = tvm_structural_hash(cand.mod)
        if h not in seen:
            seen.add(h)
            out.append(cand)
    return out


def _measure_defaults(task: Any, tgt: Any, builder: Any, runner: Any, variants: int = 0) -> list[tuple[Any, Any, Any]]:
    """Measure graphopt's default schedule of ``task`` and ``variants`` other settings of its rule;
    returns ``(trace, run_secs, args_info)`` per schedule that built and ran (to be committed as
    tuning records, so the database's best is never worse than the untuned build)."""
    from tvm.s_tir import meta_schedule as ms

    mod = task.dispatched[0]
    try:
        cands = _default_candidates(mod["main"], tgt, variants)
        if not cands:
            return []
        # each candidate's own arguments: a different register tile packs the weight differently
        infos = [ms.arg_info.ArgInfo.from_entry_func(c.mod, remove_preproc=True) for c in cands]
        built = builder.build([ms.builder.BuilderInput(c.mod, tgt) for c in cands])
        ok = [(c, i, b) for c, i, b in zip(cands, infos, built, strict=True) if not b.error_msg]
        device = "cuda" if tgt.kind.name == "cuda" else "cpu"
        futures = runner.run([ms.runner.RunnerInput(b.artifact_path, device_type=device, args_info=i)
                              for _, i, b in ok])
        out = []
        for (c, info, _), fut in zip(ok, futures, strict=True):
            res = fut.result()
            if not res.error_msg and res.run_secs:
                out.append((c.trace, res.run_secs, info))
        return out
    except Exception as exc:  # noqa: BLE001 - the baseline is an optimization, never a failure
        logger.debug("baseline for %s not recorded: %s", task.task_name, _first_line(exc))
        return []


def _commit_records(task: Any, tgt: Any, database: Any, records: list[tuple[Any, Any, Any]]) -> None:
    from tvm.s_tir import meta_schedule as ms

    if not records:
        return
    workload = database.commit_workload(task.dispatched[0])
    for trace, secs, args_info in records:
        database.commit_tuning_record(ms.database.TuningRecord(trace, workload, secs, tgt, args_info))


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
    variants: int = 8,
) -> tuple[Any, dict[str, Any]]:
    """Tune the TIR functions of a lowered Relax module; return (database, report).

    Each planned task first has graphopt's default schedule and up to ``variants`` other settings
    of its rule measured (seconds per task); MetaSchedule's search then gets the rest of the
    budget, and the database keeps whichever was fastest. The measured defaults are committed
    after the task's search (the evolutionary search seeds itself from a workload's records and
    cannot mutate traces from outside its own design space)."""
    from tvm.s_tir import meta_schedule as ms

    if trials < 0 or (minutes is not None and minutes <= 0):
        raise CompileError("trials must be >= 0 and minutes > 0")
    if target.is_cross and rpc is None:
        raise CompileError(f"tuning for {target.name} needs a device to measure on: give rpc='TRACKER:PORT:KEY'")
    tgt = target.tvm_target()
    # what is cached is read from the compact copy (fast); the full database only when tuning
    database = open_database(target, cache_dir, best=True, create=False) or open_database(target, cache_dir)
    workdir = cache_path(target, cache_dir)
    tasks = ms.relax_integration.extract_tasks(mod, tgt)
    tasks = [t for t in tasks if not t.mod.attrs.get("tirx.is_scheduled", False)]
    flops = {id(t): _task_flops(t) for t in tasks}
    ranked = sorted((t for t in tasks if flops[id(t)] > 0), key=lambda t: flops[id(t)], reverse=True)
    # Winograd's transforms keep graphopt's schedule: MetaSchedule's candidates for them leave the
    # coefficient selects unfolded, and each took up to a minute to build (squeezenet's input
    # transform held a 30-minute budget for 16 minutes); they are memory-bound copies with
    # arithmetic, which its search does not improve. Their default is measured and committed; the
    # budget is planned over the other tasks.
    from .winograd import is_transform

    transform_ids = {id(t) for t in ranked if is_transform(t.dispatched[0]["main"])}
    transforms = [t for t in ranked if id(t) in transform_ids]
    ranked = [t for t in ranked if id(t) not in transform_ids]
    # The plan depends on the budget and the model only, so compiling again with the same
    # budget finds every planned task in the cache and measures nothing.
    report: dict[str, Any] = {"tasks": len(ranked) + len(transforms), "cached": 0, "tuned": [], "skipped": [],
                              "cache_dir": str(workdir), "trials": 0, "variant_records": 0, "not_searched": []}
    if trials:
        per_task = max(min_trials, trials // max(1, len(ranked)))
        n_fit = max(1, trials // per_task)
        plan, report["skipped"] = ranked[:n_fit], [t.task_name for t in ranked[n_fit:]]
    else:
        plan = ranked
        per_task = max(min_trials, min(64, int((minutes or 1) * 60 / max(1, len(ranked)) / 3.0)))
    plan = plan + transforms
    in_cache = [_tuned(database, t) for t in plan]
    report["cached"] = sum(in_cache)
    plan = [t for t, hit in zip(plan, in_cache, strict=True) if not hit]
    if not plan:
        logger.info("tuning: every planned task is in the cache %s", workdir)
        return database, report
    database = open_database(target, cache_dir)
    register_intrinsics(target.device)  # only now: it costs seconds
    deadline = time.monotonic() + minutes * 60 if minutes else None
    threads = measure_threads(target) if rpc is None else None  # (a remote device runs its own pool)
    if threads is not None:
        logger.info("tuning: candidates measured with %d thread(s) (the target's num-cores)", threads)
        report["threads"] = threads
    runner: Any = ms.runner.LocalRunner(
        timeout_sec=60, initializer=functools.partial(_pool_threads, threads) if threads is not None else None)
    if rpc is not None:
        host, port, key = parse_rpc(rpc)
        runner = ms.runner.RPCRunner(
            rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                           session_timeout_sec=60),
            max_workers=1,
        )
    builder = ms.builder.LocalBuilder(f_build=build_candidate, timeout_sec=120, max_workers=host_cores())
    try:
        import xgboost  # noqa: F401

        cost_model = "xgb"
    except ImportError:
        cost_model = "random"
    from graphopt.progress import progress as _progress

    # graphopt's own candidates first: a few builds per task, and often the best record
    pending: dict[int, list[tuple[Any, Any, Any]]] = {}
    bar = _progress(total=len(plan), desc="tuning (graphopt's schedules)", unit="task", disable=not progress)
    try:
        for task in plan:
            if deadline is not None and time.monotonic() > deadline:
                break
            pending[id(task)] = _measure_defaults(task, tgt, builder, runner, variants)
            report["variant_records"] += len(pending[id(task)])  # graphopt's default and variants measured
            bar.update(1)
    finally:
        bar.close()
    for task in [t for t in plan if id(t) in transform_ids]:  # graphopt's schedule, not searched
        plan.remove(task)
        if pending.get(id(task)):
            _commit_records(task, tgt, database, pending.pop(id(task)))
            report["not_searched"].append(task.task_name)
            report["tuned"].append(task.task_name)
        else:  # not measured (the deadline, or its build failed): the default schedule at compile time
            report["skipped"].append(task.task_name)
    bar = _progress(total=len(plan), desc="tuning (MetaSchedule)", unit="task", disable=not progress)
    spent = 0.0
    done_trials = 0
    try:
        for i, task in enumerate(plan):
            if deadline is not None:
                left = deadline - time.monotonic()
                # trials that fit in the time left (a task's search runs to its trial count: the
                # deadline is kept by planning, with a margin for the estimate)
                fit = 0.9 * left / max(spent / done_trials, 0.05) if done_trials else float(per_task)
                if left <= 0 or fit < min_trials:
                    for t in plan[i:]:  # no search time left: graphopt's measured candidates stand
                        if pending.get(id(t)):
                            _commit_records(t, tgt, database, pending.pop(id(t)))
                            report["tuned"].append(t.task_name)
                        else:
                            report["skipped"].append(t.task_name)
                    break
                if done_trials:
                    per_task = int(max(min_trials, min(256, fit / (len(plan) - i))))
            # a search population in proportion to the trials: the default (512 candidates,
            # 4 genetic rounds) costs ~30 s per task before the first measurement here
            strategy = ms.search_strategy.EvolutionarySearch(
                population_size=max(64, min(512, 8 * per_task)), init_min_unmeasured=min(50, 4 * per_task),
                genetic_num_iters=2 if per_task < 64 else 4)
            ctxs = [ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
                                   search_strategy=strategy, task_name=task.task_name,
                                   logger=_task_logger(workdir, task.task_name), rand_state=seed,
                                   num_threads=host_cores()).clone()]
            weights = [float(task.weight)]
            t0 = time.monotonic()
            bar.set_postfix(f"{task.task_name[:24]}, {per_task} trials")
            try:
                ms.tune.tune_tasks(
                    tasks=ctxs, task_weights=weights, work_dir=str(workdir), max_trials_global=per_task,
                    max_trials_per_task=per_task, num_trials_per_iter=min(64, per_task), builder=builder, runner=runner,
                    database=database, cost_model=cost_model, task_scheduler="round-robin",
                )
            except Exception as exc:  # noqa: BLE001 - a failing task keeps its default schedule
                logger.warning("tuning %s failed (%s); it keeps the default schedule", task.task_name, _first_line(exc))
                _commit_records(task, tgt, database, pending.pop(id(task), []))
                report["skipped"].append(task.task_name)
                bar.update(1)
                continue
            # after the search (the evolutionary search seeds itself from database records and
            # cannot mutate a trace from outside its design space), so the best record is the
            # faster of the tuned and the default schedule
            _commit_records(task, tgt, database, pending.pop(id(task), []))
            spent += time.monotonic() - t0
            done_trials += per_task
            report["tuned"].append(task.task_name)
            report["trials"] += per_task
            bar.update(1)
    except KeyboardInterrupt:  # (the measured defaults of tasks not searched yet are measured again next time)
        # the task being searched may have MetaSchedule's records already, and counts as cached
        # next time: its measured defaults go in too, or its best could stay a poor early candidate
        for t in plan:
            if pending.get(id(t)) and _tuned(database, t):
                _commit_records(t, tgt, database, pending.pop(id(t)))
        logger.warning("tuning interrupted; %d finished tasks are saved in %s", len(report["tuned"]), workdir)
        compact_database(database, target, cache_dir)
        raise
    finally:
        bar.close()
    report["seconds"] = spent
    return compact_database(database, target, cache_dir), report
