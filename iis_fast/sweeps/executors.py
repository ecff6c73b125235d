"""Where a sweep's checkpoints are scored: in the driver, a local process pool, Ray tasks, or Slurm via submitit.

Every executor is a generator ``run(tasks) -> (task, rows)`` yielding results as they finish; the driver (and only
the driver) writes them to the store. Workers never raise: a checkpoint that fails comes back as ``failed`` rows
with the error text; a worker that dies (killed, out of memory) makes its tasks come back failed the same way.

The local executors (``inline``, ``local``) take a ``claim(task) -> bool`` callable and ask it right before
dispatching each checkpoint, so concurrent sweeps on one database share the work instead of doubling it.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import signal
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .checkpoints import CheckpointSpec
from ..data.sources import DataRef

__all__ = ["Task", "run_task", "EXECUTORS", "get_executor", "default_workers"]

MAX_ERROR_CHARS = 4000


@dataclass
class Task:
    """One checkpoint and the (config hash, score options) settings it still needs."""

    spec: CheckpointSpec
    configs: list[tuple[str, dict[str, Any]]]
    data: DataRef
    score_fn: str | None = None           # "module:function" with iis_fast.score's signature (default: it)
    threads: int | None = None            # torch CPU threads for this task's process
    content_hash: str | None = None       # SHA-256 of the checkpoint file when the sweep started
    attribution: tuple[str, dict[str, Any]] | None = None   # (config hash, config) of the attribution measure

    @property
    def id(self) -> str:
        blob = json.dumps([self.spec.key, [h for h, _ in self.configs], self.content_hash]
                          + ([self.attribution[0]] if self.attribution else []))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


def default_workers() -> int:
    """Process-pool size for this machine: its usable CPU cores."""
    from ..validation import usable_cores
    return usable_cores()


# ------------------------------------------------------------------------------------------------- the worker
_LOADERS: dict[str, tuple[Any, Any]] = {}


def _resolve_score_fn(name: str | None) -> Callable[..., Any]:
    if not name:
        from ..score import score
        return score
    mod, _, attr = name.partition(":")
    return getattr(importlib.import_module(mod), attr)


def _error_text(e: BaseException) -> str:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    head = f"{type(e).__name__}: {e}"
    return (head + "\n" + "".join(tb[-3:]))[:MAX_ERROR_CHARS]


def _stage_times(timings: dict[str, float]) -> dict[str, float]:
    t = timings or {}
    return {
        "t_model": float(t.get("model", 0.0)),
        "t_extract": float(sum(v for k, v in t.items() if k.startswith(("extract_", "fingerprint_")))),
        "t_concepts": float(t.get("concepts", 0.0)),
        "t_train": float(t.get("train", 0.0) + t.get("validate", 0.0)),
    }


def run_task(task: Task) -> list[dict[str, Any]]:
    """Score one checkpoint under each of its settings; never raises (failures become ``failed`` rows)."""
    import iis_fast.models  # noqa: F401  (registers iis_smallcnn in timm in this process)

    if task.threads:
        import torch
        torch.set_num_threads(int(task.threads))
    spec = task.spec
    rows: list[dict[str, Any]] = []
    try:
        fn = _resolve_score_fn(task.score_fn)
        cache_key = task.data.key + "|" + str(task.data.arrays.folder if task.data.arrays else "")
        if cache_key not in _LOADERS:
            _LOADERS[cache_key] = task.data.loaders()
        train, ev = _LOADERS[cache_key]
        setup_error = None
    except Exception as e:                               # noqa: BLE001 - reported per row
        setup_error = e
    for h, opts in task.configs:
        base = {"checkpoint": spec.key, "model": spec.model, "path": spec.path, "step": spec.step,
                "library": opts.get("library", "prototype"), "config_hash": h, "content_hash": task.content_hash,
                "config_json": json.dumps(opts, sort_keys=True, default=str),
                "meta_json": json.dumps(spec.meta, sort_keys=True), "started_at": time.time()}
        t0 = time.perf_counter()
        try:
            if setup_error is not None:
                raise setup_error
            r, notes = _scored_with_warnings(fn, spec.model, train, ev, checkpoint=spec.path, **opts)
            rows.append({**base, "status": "ok", "iis": float(r.iis), "acc_std": float(r.acc_std), "warnings": notes,
                         "acc_last": float(r.acc[-1]) if r.acc else None, "num_concepts": r.num_concepts,
                         "n_train": r.n_train, "n_eval": r.n_eval, "feature_dim": r.feature_dim,
                         "backend": r.backend, "result_json": r.to_json(), **_stage_times(r.timings),
                         "seconds": time.perf_counter() - t0, "finished_at": time.time()})
        except Exception as e:                           # noqa: BLE001 - a failing checkpoint must not stop a sweep
            rows.append({**base, "status": "failed", "error": _error_text(e),
                         "seconds": time.perf_counter() - t0, "finished_at": time.time()})
    if task.attribution is not None:                     # the attribution measure (sweeps/attribution.py)
        from .attribution import attribution_rows, failed_attribution_rows
        if setup_error is not None:
            rows += failed_attribution_rows(task, _error_text(setup_error))
        else:
            rows += attribution_rows(spec, train, ev, *task.attribution, content_hash=task.content_hash)
    return rows


def _scored_with_warnings(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
    """``fn(*args, **kwargs)`` and its warnings for the results table: the result's own (e.g. acc_std at chance
    level) and any :class:`~iis_fast.errors.IISWarning` raised meanwhile (e.g. a corrupt cache entry recomputed).
    Other warnings are shown as usual."""
    from ..errors import IISWarning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IISWarning)
        r = fn(*args, **kwargs)
    notes = list(getattr(r, "warnings", None) or [])
    for w in caught:
        if issubclass(w.category, IISWarning):
            notes.append(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return r, list(dict.fromkeys(notes))


def failed_rows(task: Task, error: str) -> list[dict[str, Any]]:
    """Rows recording that ``task`` could not be run at all (its worker died, the job failed)."""
    from .attribution import failed_attribution_rows
    spec = task.spec
    return [{"checkpoint": spec.key, "model": spec.model, "path": spec.path, "step": spec.step,
             "library": opts.get("library", "prototype"), "config_hash": h, "status": "failed",
             "content_hash": task.content_hash,
             "error": error[:MAX_ERROR_CHARS], "config_json": json.dumps(opts, sort_keys=True, default=str),
             "meta_json": json.dumps(spec.meta, sort_keys=True)} for h, opts in task.configs] + (
        failed_attribution_rows(task, error) if task.attribution is not None else [])


def _run_chunk(tasks: Sequence[Task]) -> list[list[dict[str, Any]]]:
    return [run_task(t) for t in tasks]


def _chunks(tasks: Sequence[Task], size: int) -> list[list[Task]]:
    size = max(1, int(size))
    return [list(tasks[i:i + size]) for i in range(0, len(tasks), size)]


Result = Iterator[tuple[Task, list[dict[str, Any]]]]


# ----------------------------------------------------------------------------------------------- executors
Claim = Callable[[Task], bool]


def run_inline(tasks: Sequence[Task], claim: Claim | None = None, **_: Any) -> Result:
    """Score every checkpoint in the driver process, one after another (no isolation; for debugging)."""
    for t in tasks:
        if claim is None or claim(t):
            yield t, run_task(t)


def _init_worker(threads: int | None) -> None:
    # Ctrl-C reaches the whole process group: the driver stops the pool; workers must not print tracebacks
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads:
        import torch
        torch.set_num_threads(int(threads))
    from ..errors import one_line_warnings
    one_line_warnings()
    import iis_fast.models  # noqa: F401  (registers iis_smallcnn in timm in this process)


def _stop(pool: Any) -> None:
    """Terminate a process pool's workers now (an interrupted sweep must not wait for their checkpoints)."""
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def _submit_ignoring_sigint(pool: Any, task: Task) -> Any:
    """``pool.submit(run_task, task)`` with SIGINT ignored while it runs: a spawn pool starts its workers inside
    the first submit, and a child started while SIGINT is ignored keeps ignoring it (CPython leaves a SIGINT the
    parent changed alone), so a Ctrl-C during a worker's start-up (seconds of imports) prints no traceback there.
    The driver's handler is back as soon as the processes exist."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return pool.submit(run_task, task)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return pool.submit(run_task, task)
    finally:
        signal.signal(signal.SIGINT, old)


def run_local(tasks: Sequence[Task], workers: int | None = None, claim: Claim | None = None, **_: Any) -> Result:
    """A pool of ``workers`` spawned processes, one checkpoint per task, at most 2 per worker queued at once.

    A worker that dies takes down the pool: the tasks in flight are reported failed (``--retry-failed``
    retries them) and a fresh pool continues with the rest. Interrupting the driver (Ctrl-C) terminates the
    workers at once.
    """
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    workers = workers or default_workers()
    threads = tasks[0].threads if tasks else None
    todo = list(tasks)[::-1]
    ctx = mp.get_context("spawn")
    while todo:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,))
        inflight: dict[Any, Task] = {}
        broken = False
        try:
            while todo or inflight:
                while todo and len(inflight) < 2 * workers:
                    t = todo.pop()
                    if claim is None or claim(t):
                        inflight[_submit_ignoring_sigint(pool, t)] = t
                if not inflight:
                    break
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for fut in done:
                    t = inflight.pop(fut)
                    try:
                        yield t, fut.result()
                    except BrokenProcessPool as e:
                        broken = True
                        yield t, failed_rows(t, f"WorkerDied: the worker process died while scoring ({e})")
                if broken:
                    for fut, t in inflight.items():
                        yield t, failed_rows(t, "WorkerDied: a worker process of the pool died while this was queued")
                    inflight.clear()
                    break
        except BaseException:                            # KeyboardInterrupt, or the consumer stopped early
            _stop(pool)
            raise
        finally:
            pool.shutdown(wait=not broken, cancel_futures=True)


def run_ray(tasks: Sequence[Task], workers: int | None = None, chunk_size: int = 1, num_gpus: float = 0.0,
            address: str | None = None, **_: Any) -> Result:
    """Ray tasks, one per chunk of ``chunk_size`` checkpoints, each asking for ``num_gpus`` GPUs and its threads' CPUs.

    Connects to a running Ray (``address``, or an already initialised one) or starts a local instance with
    ``workers`` CPUs (stopped again at the end). Results come back to the driver, which writes them.
    """
    import ray

    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            kw["address"] = address
        else:
            kw["num_cpus"] = workers or default_workers()
        ray.init(**kw)
        started = True
    try:
        cpus = float(tasks[0].threads or 1) if tasks else 1.0
        remote = ray.remote(_run_chunk).options(num_cpus=cpus, num_gpus=float(num_gpus), max_retries=0)
        pending = {remote.remote(c): c for c in _chunks(tasks, chunk_size)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            chunk = pending.pop(done[0])
            try:
                results = ray.get(done[0])
            except Exception as e:                       # noqa: BLE001 - RayTaskError, WorkerCrashedError, ...
                results = [failed_rows(t, f"RayError: {type(e).__name__}: {e}") for t in chunk]
            for t, rows in zip(chunk, results):
                yield t, rows
    finally:
        if started:
            ray.shutdown()


class _ChunkJob:
    """A submitit job scoring a chunk; results of finished checkpoints are spilled to disk so a preempted,
    requeued job skips them. Only the driver writes the database."""

    def __init__(self, spill_dir: str) -> None:
        self.spill_dir = spill_dir

    def __call__(self, tasks: Sequence[Task]) -> list[list[dict[str, Any]]]:
        out = []
        for t in tasks:
            spill = Path(self.spill_dir) / f"{t.id}.pkl"
            if spill.is_file():
                out.append(pickle.loads(spill.read_bytes()))
                continue
            rows = run_task(t)
            tmp = spill.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps(rows))
            os.replace(tmp, spill)
            out.append(rows)
        return out

    def checkpoint(self, tasks: Sequence[Task]) -> Any:
        """Called by submitit on preemption/timeout: requeue the same chunk (spilled results are reused)."""
        import submitit
        return submitit.helpers.DelayedSubmission(self, tasks)


def run_submitit(tasks: Sequence[Task], workers: int | None = None, chunk_size: int | None = None,
                 folder: str | os.PathLike[str] = "submitit_logs", cluster: str | None = None,
                 num_gpus: int = 0, parameters: dict[str, Any] | None = None, poll_s: float = 0.5,
                 **_: Any) -> Result:
    """Slurm array jobs via submitit (``cluster=None`` auto-detects Slurm; ``"local"`` runs subprocesses here).

    Checkpoints are split into chunks (default: ``workers`` chunks); each array job scores one chunk and returns
    its rows to the driver. ``parameters`` go to ``executor.update_parameters`` (``timeout_min``,
    ``slurm_partition``, ``mem_gb``, ...). A preempted job is requeued and skips checkpoints it already finished.
    """
    import submitit

    if not tasks:
        return
    workers = workers or default_workers()
    size = chunk_size or -(-len(tasks) // workers)
    chunks = _chunks(tasks, size)
    folder = Path(folder)
    spill = folder / "spill"
    spill.mkdir(parents=True, exist_ok=True)
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict[str, Any] = {"timeout_min": 24 * 60, "cpus_per_task": int(tasks[0].threads or 1),
                              "name": "iis-sweep", "slurm_array_parallelism": workers}
    if num_gpus:
        params["gpus_per_node"] = int(num_gpus)
    params.update(parameters or {})
    ex.update_parameters(**params)
    jobs = ex.map_array(_ChunkJob(str(spill)), chunks)
    pending = list(zip(jobs, chunks))
    while pending:
        still = []
        for job, chunk in pending:
            if not job.done():
                still.append((job, chunk))
                continue
            try:
                results = job.result()
            except Exception as e:                       # noqa: BLE001 - failed job: its checkpoints fail
                msg = str(e).strip().splitlines()
                results = [failed_rows(t, f"JobFailed: job {job.job_id}: {msg[-1] if msg else type(e).__name__}")
                           for t in chunk]
            for t, rows in zip(chunk, results):
                yield t, rows
        pending = still
        if pending:
            time.sleep(poll_s)


EXECUTORS: dict[str, Callable[..., Result]] = {
    "inline": run_inline,
    "local": run_local,
    "ray": run_ray,
    "slurm": run_submitit,
    "submitit": run_submitit,
}


def get_executor(name: str) -> Callable[..., Result]:
    """The executor called ``name`` (inline, local, ray, slurm/submitit)."""
    from ..errors import IISInputError
    try:
        return EXECUTORS[name]
    except KeyError:
        raise IISInputError(f"executor={name!r}: choose one of {sorted(EXECUTORS)}") from None
