"""``sweep()``: score many checkpoints into a results database, resumably and idempotently."""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import pandas as pd

from ..config import SWEEP_EXTRACT_BATCH_SIZE, IISConfig
from ..errors import IISInputError
from .checkpoints import CheckpointSpec, parse_checkpoints
from ..data.sources import DataRef, prepare_data
from .executors import Task, default_workers, failed_rows, get_executor
from .store import LEASE_SECONDS, ResultStore, config_hash
from ..validation import check_device

__all__ = ["sweep", "STAGES"]

#: Per-stage timing columns: backbone build + checkpoint load, feature extraction (train + eval),
#: concept library (elements + library), head training (the 1 + len(sparsities) x len(lrs) grid).
STAGES: tuple[str, ...] = ("t_model", "t_extract", "t_concepts", "t_train")


def _score_fn_name(score_fn: Callable[..., Any] | str | None) -> str | None:
    if score_fn is None or isinstance(score_fn, str):
        return score_fn
    mod, name = getattr(score_fn, "__module__", None), getattr(score_fn, "__qualname__", "")
    if not mod or "<" in name or mod == "__main__":
        raise IISInputError("score_fn must be an importable module-level function (or a 'module:function' string) "
                            "so worker processes can load it")
    return f"{mod}:{name}"


def _preprocessing_of(model_name: str) -> dict[str, Any]:
    from ..models import create_model, preprocessing_config
    import iis_fast.models  # noqa: F401  (registers iis_smallcnn in timm in this process)
    return preprocessing_config(create_model(model_name))


def sweep(checkpoints: Any, data: Any = "fashion-mnist", *, arch: str | None = None,
          out: str | os.PathLike[str] = "results.db", executor: str = "local", workers: int | None = None,
          retry_failed: bool = False, eval_data: Any = None, chunk_size: int | None = None,
          threads: int | None = None, num_gpus: float = 0, executor_options: dict[str, Any] | None = None,
          score_fn: Callable[..., Any] | str | None = None, progress: bool = True,
          measures: str | Sequence[str] = ("iis",), attribution: Any = None,
          **score_options: Any) -> pd.DataFrame:
    """Score every checkpoint (x library) into the SQLite database ``out`` and return the results table.

    Re-running skips every (checkpoint, library, config) already stored: it is resumable after a crash or a
    SIGKILL (at most the checkpoints in flight are lost; a row is never half-written) and a no-op when complete.
    A checkpoint file overwritten since its row was stored (another SHA-256) is scored again; the old row moves to
    the ``results_history`` table. Sweeps sharing one database lease each checkpoint before scoring it, so a
    second sweep skips what the first is computing (see :mod:`iis_fast.sweeps.store`).

    Args:
        checkpoints: paths, globs, folders, or ``.csv``/``.txt`` lists of ``model_name,path[,step,...]``
            (see :func:`~iis_fast.sweeps.checkpoints.parse_checkpoints`).
        data: ``"fashion-mnist[:n_train=2000,n_eval=1000,seed=0]"`` (decoded and preprocessed once per
            preprocessing, shared by all workers), a ``.beton`` path, an image folder, or a
            ``(train_loader, eval_loader)`` pair.
        arch: timm model name for checkpoints that do not name theirs (e.g. ``"resnet18"``, ``"iis_smallcnn"``).
            Each checkpoint's number of classes is read from its classifier.
        out: the results database (created if missing).
        executor: ``"local"`` (a process pool), ``"inline"`` (in this process), ``"ray"``, or ``"slurm"``
            (submitit; ``executor_options={"cluster": "local"}`` runs its jobs as local processes).
        workers: parallel workers (local pool size, Ray CPUs when starting Ray, submitit job count);
            default: this machine's cores.
        retry_failed: also recompute checkpoints stored as failed.
        eval_data: evaluation ``.beton`` / image folder of the same kind as ``data`` (else score() holds out
            part of it).
        chunk_size: checkpoints per Ray task / submitit job (default 1 for Ray, ``n / workers`` for submitit).
        threads: torch threads per worker (default: cores // workers).
        num_gpus: GPUs each Ray task / Slurm job asks for (use with ``device="cuda"``).
        executor_options: extra executor arguments: Ray ``address``; submitit ``folder``, ``cluster``,
            ``parameters`` (passed to ``update_parameters``).
        score_fn: a replacement for :func:`iis_fast.score` (module-level, importable); for tests/instrumentation.
        progress: show the overall progress bar and the per-stage timing summary.
        measures: ``"iis"`` and/or ``"attribution"`` (or ``"iis,attribution"``): with ``attribution``, each
            checkpoint also gets How-to-Probe attribution rows (probes trained on its spatial maps, GridPG,
            entropy, Gini per probe x loss x method on grids chosen once per sweep), stored in the ``attribution``
            table in the checkpoint's transaction; see :mod:`iis_fast.sweeps.attribution`.
        attribution: :class:`~iis_fast.sweeps.attribution.AttributionConfig` or a mapping of its fields.
        **score_options: :class:`~iis_fast.config.IISConfig` options; ``library`` may be a list (one row per
            library); ``checkpoint_key`` and ``model_kwargs`` as in :func:`iis_fast.score`.

    Returns:
        One row per requested (checkpoint, library) under this config, stored earlier or now: ``status``,
        ``iis``, ``acc_std``, ``acc@s``/``arr@s`` per sparsity, ``step``, stage timings, ``error``, ``result_json``.
        ``df.attrs["sweep"]`` holds this run's counts and per-stage seconds; with the attribution measure,
        ``df.attrs["attribution"]`` holds its rows for these checkpoints (also :func:`load_attribution`).
    """
    t_start = time.perf_counter()
    store = ResultStore(out)        # a directory, a non-SQLite file or someone else's database fails here, first
    try:
        return _sweep(store, t_start, checkpoints, data, arch=arch, out=out, executor=executor, workers=workers,
                      retry_failed=retry_failed, eval_data=eval_data, chunk_size=chunk_size, threads=threads,
                      num_gpus=num_gpus, executor_options=executor_options, score_fn=score_fn, progress=progress,
                      measures=measures, attribution=attribution, **score_options)
    finally:
        store.close()


class _Heartbeat:
    """Renews this driver's leases every ``LEASE_SECONDS / 4`` from a thread (own SQLite connection)."""

    def __init__(self, path: str | os.PathLike[str], owner: str) -> None:
        self.path, self.owner = path, owner
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="iis-sweep-leases", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        store = ResultStore(self.path)
        store.owner = self.owner
        try:
            while not self.stop.wait(LEASE_SECONDS / 4):
                store.renew_leases()
        finally:
            store.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def _unchanged_since(path: str, created_at: str) -> bool:
    """A row stored before content hashes existed still describes ``path`` if the file is older than the row.

    ``created_at`` is truncated to the second, so a file written earlier in the row's own second is older."""
    from .store import created_epoch
    try:
        return os.stat(path).st_mtime < created_epoch(created_at) + 1.0
    except (OSError, ValueError):
        return False


def _sweep(store: ResultStore, t_start: float, checkpoints: Any, data: Any, *, arch: str | None, out: Any,
           executor: str, workers: int | None, retry_failed: bool, eval_data: Any, chunk_size: int | None,
           threads: int | None, num_gpus: float, executor_options: dict[str, Any] | None,
           score_fn: Callable[..., Any] | str | None, progress: bool, measures: Any = ("iis",),
           attribution: Any = None, **score_options: Any) -> pd.DataFrame:
    from . import attribution as attr_measure
    measures = attr_measure.parse_measures(measures)
    attr_cfg = attr_measure.AttributionConfig.from_options(attribution) if "attribution" in measures else None
    specs = parse_checkpoints(checkpoints, arch)
    run = get_executor(executor)
    configs = _row_configs(score_options)
    if executor in ("local", "inline"):                 # the device must exist here; Ray/Slurm workers have theirs
        check_device(configs[0]["device"])
    from ..features import default_cache_dir
    cache_dir = score_options.get("cache_dir") or str(default_cache_dir())
    n_workers = 1 if executor == "inline" else int(workers or default_workers())
    threads = threads or max(1, default_workers() // n_workers)

    t0 = time.perf_counter()
    data_refs = _prepare_data_refs(specs, data, eval_data, cache_dir)
    t_data = time.perf_counter() - t0
    attr_configs = attr_measure.configs_per_data(data_refs, attr_cfg, configs[0]) if attr_cfg else {}
    plan = _plan(store, specs, configs if "iis" in measures else [], data_refs, retry_failed,
                 _score_fn_name(score_fn), threads, attr_configs)
    tasks = plan.tasks
    already = len(specs) - len(tasks) - len(plan.unrunnable)
    stats: dict[str, Any] = {"checkpoints": len(specs), "already_stored": already, "scored": 0, "failed": 0,
                             "changed": plan.changed, "claimed_elsewhere": 0, "warned": 0,
                             "data_seconds": round(t_data, 3), **{s: 0.0 for s in STAGES}, "score_seconds": 0.0}
    for t, err in plan.unrunnable:
        store.write_checkpoint(failed_rows(t, err))
        stats["failed"] += 1

    bar = _Bar(progress, len(tasks), already, f"sweep [{executor} x{n_workers}]")

    def claim(task: Task) -> bool:
        """Lease the task's rows; a task another live sweep is computing (or just stored) is skipped."""
        keys = [(task.spec.key, c.get("library", "prototype"), h) for h, c in task.configs]
        if task.attribution is not None:
            keys.append((task.spec.key, attr_measure.LEASE_LIBRARY, task.attribution[0]))
        ok = store.claim(keys, task.content_hash, retry_failed=retry_failed)
        if not ok:
            stats["claimed_elsewhere"] += 1
            bar.step(stats)
        return ok

    opts: dict[str, Any] = dict(workers=n_workers, num_gpus=num_gpus, **(executor_options or {}))
    if chunk_size:
        opts["chunk_size"] = chunk_size
    if executor in ("local", "inline"):
        opts["claim"] = claim                             # claimed one by one, right before each is dispatched
    else:
        tasks = [t for t in tasks if claim(t)]            # batch executors submit everything at once
    heartbeat = _Heartbeat(out, store.owner)
    results = run(tasks, **opts)
    try:
        for task, rows in results:
            store.write_checkpoint(rows)                        # one transaction per checkpoint
            _count(stats, rows)
            bar.step(stats)
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()                                       # stops a pool's workers when interrupted
        heartbeat.close()
        store.release_leases()
        bar.close()
    stats["wall_seconds"] = round(time.perf_counter() - t_start, 3)
    for k in (*STAGES, "score_seconds", "attribution_seconds"):
        if k in stats:
            stats[k] = round(stats[k], 3)
    if progress:
        print(_summary(stats), file=sys.stderr)
    df = store.dataframe(keys=plan.requested)
    df.attrs["sweep"] = stats
    if attr_cfg is not None:
        df.attrs["attribution"] = attr_measure.load_attribution(store, keys=plan.attribution_requested, status=None)
    return df


def _row_configs(score_options: dict[str, Any]) -> list[dict[str, Any]]:
    """One stored config per requested library: the IISConfig as a dict, plus how checkpoints are read."""
    libraries = score_options.pop("library", "prototype")
    libraries = [libraries] if isinstance(libraries, str) else list(libraries)
    score_options.pop("progress", None)
    score_options.setdefault("extract_batch_size", SWEEP_EXTRACT_BATCH_SIZE)
    # how checkpoints are read: part of each row's settings (an EMA copy is another model), absent when unset so
    # rows stored without them keep their identity
    model_opts = {k: score_options.pop(k) for k in ("checkpoint_key", "model_kwargs") if score_options.get(k)}
    return [{**IISConfig.from_options(library=lib, progress=False, **score_options).to_dict(), **model_opts}
            for lib in libraries]


def _prepare_data_refs(specs: Sequence[CheckpointSpec], data: Any, eval_data: Any,
                       cache_dir: str) -> dict[str, DataRef | Exception]:
    """The prepared data of each swept architecture, prepared once per distinct preprocessing; an unknown model
    name maps to its error (it fails its checkpoints, not the sweep)."""
    data_refs: dict[str, DataRef | Exception] = {}
    by_pre: dict[str, DataRef] = {}
    for model_name in sorted({s.model for s in specs}):
        try:
            pre = _preprocessing_of(model_name)
            pk = repr(sorted(pre.items()))
            if pk not in by_pre:
                by_pre[pk] = prepare_data(data, pre, cache_dir, eval_data)
            data_refs[model_name] = by_pre[pk]
        except IISInputError as e:
            data_refs[model_name] = e
    return data_refs


class _Plan(NamedTuple):
    tasks: list[Task]                       # checkpoints with rows to compute
    unrunnable: list[tuple[Task, str]]      # checkpoints whose model cannot be built, with the error
    requested: list[tuple[str, str, str]]   # every (checkpoint, library, config hash) the result table shows
    changed: int                            # rows re-scored because the checkpoint file changed
    attribution_requested: list[tuple[str, str]] | None = None   # (checkpoint, config hash) of attribution rows


def _plan(store: ResultStore, specs: Sequence[CheckpointSpec], configs: list[dict[str, Any]],
          data_refs: dict[str, DataRef | Exception], retry_failed: bool, fn_name: str | None,
          threads: int, attribution: dict[str, tuple[str, dict[str, Any]]] | None = None) -> _Plan:
    """Which (checkpoint, config) rows need computing: not stored, failed with ``retry_failed``, or stored for
    an earlier version of the file; the same for the attribution measure's rows (``attribution``: its (config
    hash, config) per data key)."""
    from .attribution import stored as stored_attribution
    stored = store.stored()
    stored_attr = stored_attribution(store.conn) if attribution else {}
    plan = _Plan([], [], [], 0, [])
    changed = 0
    for spec in specs:
        ref = data_refs[spec.model]
        key = ref.key if isinstance(ref, DataRef) else "unresolved"
        content = store.content_hash(spec.path)
        todo = []
        for cfg in configs:
            h = config_hash(cfg, key)
            k3 = (spec.key, cfg["library"], h)
            plan.requested.append(k3)
            row = stored.get(k3)
            if row is not None and row.content_hash is None and _unchanged_since(spec.path, row.created_at):
                store.adopt_content_hash(k3, content)
                row = row._replace(content_hash=content)
            if row is None or (row.status == "failed" and retry_failed):
                todo.append((h, cfg))
            elif row.content_hash != content:            # the file was overwritten: score the new weights
                todo.append((h, cfg))
                changed += 1
        attr = (attribution or {}).get(key)
        if attr is not None:
            plan.attribution_requested.append((spec.key, attr[0]))
            st = stored_attr.get((spec.key, attr[0]))
            if not (st is None or (st[0] == "failed" and retry_failed) or st[1] != content):
                attr = None                               # stored for this file version
        if not todo and attr is None:
            continue
        if isinstance(ref, Exception):
            dummy = Task(spec, todo, DataRef("none", key), content_hash=content)
            plan.unrunnable.append((dummy, f"{type(ref).__name__}: {ref}"))
        else:
            plan.tasks.append(Task(spec, todo, ref, fn_name, threads, content_hash=content, attribution=attr))
    return plan._replace(changed=changed)


def _count(stats: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Add one finished checkpoint's rows to the run's counts and stage seconds."""
    ok = all(r["status"] == "ok" for r in rows)
    stats["scored" if ok else "failed"] += 1
    stats["warned"] += sum(1 for r in rows if r.get("warnings"))
    attribution = [r for r in rows if r.get("measure") == "attribution"]
    if attribution:                                       # stage seconds are per checkpoint, on every row
        stats["attribution_seconds"] = stats.get("attribution_seconds", 0.0) + float(attribution[0].get("seconds") or 0)
    rows = [r for r in rows if r.get("measure") != "attribution"]
    for r in rows:
        for s in STAGES:
            stats[s] += float(r.get(s) or 0.0)
        stats["score_seconds"] += float(r.get("seconds") or 0.0)


class _Bar:
    """The sweep's progress bar (stderr), or nothing when ``progress`` is off."""

    def __init__(self, progress: bool, total: int, already: int, desc: str) -> None:
        self.total, self.already, self.bar = total, already, None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, unit="ckpt", desc=desc, file=sys.stderr, dynamic_ncols=True)
            self.bar.set_postfix_str(f"done 0 failed 0 remaining {total} (skipped {already} stored)")

    def step(self, stats: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)              # a checkpoint finished, or found claimed by another sweep
            self.bar.set_postfix_str(f"done {stats['scored']} failed {stats['failed']} remaining "
                                     f"{self.total - self.bar.n} "
                                     f"(skipped {self.already} stored)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _summary(stats: dict[str, Any]) -> str:
    """The one-line account a sweep prints at its end."""
    n = max(1, stats["scored"] + stats["failed"])
    stages = ", ".join(f"{s[2:]} {stats[s]:.1f}s ({stats[s] / n:.2f}s/ckpt)" for s in STAGES)
    extra = "".join([f", {stats['changed']} row(s) re-scored because the file changed" if stats["changed"] else "",
                     f", {stats['warned']} row(s) with warnings (see the warnings column)" if stats["warned"] else "",
                     f", {stats['claimed_elsewhere']} being scored by another sweep"
                     if stats["claimed_elsewhere"] else ""])
    return (f"sweep: {stats['scored']} scored, {stats['failed']} failed, {stats['already_stored']} already stored"
            f"{extra}, {stats['wall_seconds']:.1f}s wall; data prep {stats['data_seconds']:.1f}s; stages (summed over "
            f"workers): {stages}"
            + (f"; attribution measure {stats['attribution_seconds']:.1f}s ({stats['attribution_seconds'] / n:.2f}s/ckpt)"
               if stats.get("attribution_seconds") else ""))
