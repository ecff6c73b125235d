"""``sweep()``: score many checkpoints into a results database, resumably and idempotently."""
from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from ..config import IISConfig
from ..errors import IISInputError
from .checkpoints import CheckpointSpec, parse_checkpoints
from ..data.sources import DataRef, prepare_data
from .executors import Task, default_workers, failed_rows, get_executor
from .store import ResultStore, config_hash

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
          **score_options: Any) -> pd.DataFrame:
    """Score every checkpoint (x library) into the SQLite database ``out`` and return the results table.

    Re-running skips every (checkpoint, library, config) already stored: it is resumable after a crash or a
    SIGKILL (at most the checkpoints in flight are lost; a row is never half-written) and a no-op when complete.

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
        **score_options: :class:`~iis_fast.config.IISConfig` options; ``library`` may be a list (one row per
            library); ``checkpoint_key`` and ``model_kwargs`` as in :func:`iis_fast.score`.

    Returns:
        One row per requested (checkpoint, library) under this config, stored earlier or now: ``status``,
        ``iis``, ``acc_std``, ``acc@s``/``arr@s`` per sparsity, ``step``, stage timings, ``error``, ``result_json``.
        ``df.attrs["sweep"]`` holds this run's counts and per-stage seconds.
    """
    t_start = time.perf_counter()
    specs = parse_checkpoints(checkpoints, arch)
    run = get_executor(executor)
    libraries = score_options.pop("library", "prototype")
    libraries = [libraries] if isinstance(libraries, str) else list(libraries)
    score_options.pop("progress", None)
    score_options.setdefault("extract_batch_size", 256)     # does not change results; 64 wastes CPU on small nets
    # how checkpoints are read: part of each row's settings (an EMA copy is another model), absent when unset so
    # rows stored without them keep their identity
    model_opts = {k: score_options.pop(k) for k in ("checkpoint_key", "model_kwargs") if score_options.get(k)}
    configs = [{**IISConfig.from_options(library=lib, progress=False, **score_options).to_dict(), **model_opts}
               for lib in libraries]
    from ..features import default_cache_dir
    cache_dir = score_options.get("cache_dir") or str(default_cache_dir())
    n_workers = 1 if executor == "inline" else int(workers or default_workers())
    threads = threads or max(1, default_workers() // n_workers)

    # data: prepared once per distinct preprocessing of the swept architectures
    t0 = time.perf_counter()
    data_refs: dict[str, DataRef | Exception] = {}
    by_pre: dict[str, DataRef] = {}
    for model_name in sorted({s.model for s in specs}):
        try:
            pre = _preprocessing_of(model_name)
            pk = repr(sorted(pre.items()))
            if pk not in by_pre:
                by_pre[pk] = prepare_data(data, pre, cache_dir, eval_data)
            data_refs[model_name] = by_pre[pk]
        except IISInputError as e:       # an unknown model name fails its checkpoints, not the sweep
            data_refs[model_name] = e
    t_data = time.perf_counter() - t0

    store = ResultStore(out)
    done = store.done_keys(retry_failed=retry_failed)
    requested: list[tuple[str, str, str]] = []
    tasks: list[Task] = []
    unrunnable: list[tuple[Task, str]] = []
    fn_name = _score_fn_name(score_fn)
    for spec in specs:
        ref = data_refs[spec.model]
        key = ref.key if isinstance(ref, DataRef) else "unresolved"
        todo = []
        for cfg in configs:
            h = config_hash(cfg, key)
            requested.append((spec.key, cfg["library"], h))
            if (spec.key, cfg["library"], h) not in done:
                todo.append((h, cfg))
        if not todo:
            continue
        if isinstance(ref, Exception):
            dummy = Task(spec, todo, DataRef("none", key))
            unrunnable.append((dummy, f"{type(ref).__name__}: {ref}"))
        else:
            tasks.append(Task(spec, todo, ref, fn_name, threads))

    already = len(specs) - len(tasks) - len(unrunnable)
    stats: dict[str, Any] = {"checkpoints": len(specs), "already_stored": already, "scored": 0, "failed": 0,
                             "data_seconds": round(t_data, 3), **{s: 0.0 for s in STAGES}, "score_seconds": 0.0}
    for t, err in unrunnable:
        store.write_checkpoint(failed_rows(t, err))
        stats["failed"] += 1

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(tasks), unit="ckpt", desc=f"sweep [{executor} x{n_workers}]", file=sys.stderr,
                   dynamic_ncols=True)
        bar.set_postfix_str(f"done 0 failed 0 remaining {len(tasks)} (skipped {already} stored)")
    opts: dict[str, Any] = dict(workers=n_workers, num_gpus=num_gpus, **(executor_options or {}))
    if chunk_size:
        opts["chunk_size"] = chunk_size
    finished = 0
    try:
        for task, rows in run(tasks, **opts):
            store.write_checkpoint(rows)                        # one transaction per checkpoint
            finished += 1
            ok = all(r["status"] == "ok" for r in rows)
            stats["scored" if ok else "failed"] += 1
            for r in rows:
                for s in STAGES:
                    stats[s] += float(r.get(s) or 0.0)
                stats["score_seconds"] += float(r.get("seconds") or 0.0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"done {stats['scored']} failed {stats['failed']} remaining "
                                    f"{len(tasks) - finished} (skipped {already} stored)")
    finally:
        if bar is not None:
            bar.close()
    stats["wall_seconds"] = round(time.perf_counter() - t_start, 3)
    for k in (*STAGES, "score_seconds"):
        stats[k] = round(stats[k], 3)
    if progress:
        n = max(1, stats["scored"] + stats["failed"])
        stages = ", ".join(f"{s[2:]} {stats[s]:.1f}s ({stats[s] / n:.2f}s/ckpt)" for s in STAGES)
        print(f"sweep: {stats['scored']} scored, {stats['failed']} failed, {already} already stored, "
              f"{stats['wall_seconds']:.1f}s wall; data prep {t_data:.1f}s; stages (summed over workers): {stages}",
              file=sys.stderr)
    df = store.dataframe(keys=requested)
    store.close()
    df.attrs["sweep"] = stats
    return df
