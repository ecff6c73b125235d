"""Two real processes on one feature cache, one results database, and one sweep (issue 16).

Before: two writers of the same cache key crashed (``OSError: Directory not empty`` / ``FileNotFoundError`` from
deleting then renaming, ~37 in 2,500 writes each), and two sweeps on one database both computed every checkpoint.
The workers treat an IISWarning as an error: a reader must never see a partial entry as a corrupt one.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
N_PUTS, N_KEYS = 800, 4       # puts per process, cycling over a few keys both processes write and read back


def _arrays(i: int) -> dict[str, np.ndarray]:
    """What both writers compute for key i: the same bytes, as two runs of one feature extraction would."""
    rng = np.random.default_rng(i)
    return {"x": rng.standard_normal((64, 32)).astype(np.float32), "y": np.arange(64) % 10}


def _cache_worker(root: str, barrier, out) -> None:
    import warnings

    from iis_fast.errors import IISWarning
    from iis_fast.features import FeatureCache
    warnings.simplefilter("error", IISWarning)          # seeing a corrupt or partial entry fails the worker
    cache = FeatureCache(root)
    errors: list[str] = []
    barrier.wait()
    for n in range(N_PUTS):
        i = n % N_KEYS
        key = f"k{i:05d}"
        try:
            a = _arrays(i)
            cache.put(key, a)
            got = cache.get(key, required=("x", "y"))
            if got is None or not (np.array_equal(got["x"], a["x"]) and np.array_equal(got["y"], a["y"])):
                errors.append(f"{key}: read back {None if got is None else 'other data'}")
        except Exception as e:                          # noqa: BLE001 - reported to the parent
            errors.append(f"{key}: {type(e).__name__}: {e}")
    out.put(errors)


def _two_processes(target, *args) -> list[list]:
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results


def test_two_processes_writing_the_same_cache_keys(tmp_path):
    t = time.perf_counter()
    results = _two_processes(_cache_worker, str(tmp_path))
    assert results == [[], []], [r[:5] for r in results]
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert entries == [f"k{i:05d}" for i in range(N_KEYS)]          # no temporary or set-aside leftovers
    assert time.perf_counter() - t < 60


def _store_worker(db: str, keys: list[str], barrier, out) -> None:
    from iis_fast.sweeps import ResultStore
    store = ResultStore(db, timeout=30)
    order = list(keys)
    np.random.default_rng(os.getpid()).shuffle(order)
    mine, errors = [], []
    barrier.wait()
    for k in order:
        try:
            if store.claim([(k, "prototype", "h")], "sha"):
                store.write_checkpoint([{"checkpoint": k, "model": "m", "path": k, "library": "prototype",
                                         "config_hash": "h", "status": "failed", "error": "e", "config_json": "{}",
                                         "content_hash": "sha"}])
                mine.append(k)
        except Exception as e:                          # noqa: BLE001 - reported to the parent
            errors.append(f"{k}: {type(e).__name__}: {e}")
    store.close()
    out.put((mine, errors))


def test_two_processes_claiming_and_writing_one_results_database(tmp_path):
    from iis_fast.sweeps import ResultStore
    keys = [f"m@/c/{i}.pt" for i in range(300)]
    db = str(tmp_path / "r.db")
    ResultStore(db).close()
    t = time.perf_counter()
    (a, ea), (b, eb) = _two_processes(_store_worker, db, keys)
    assert ea == [] and eb == []
    assert sorted(a + b) == sorted(keys) and not set(a) & set(b)     # every row written once, by one of them
    with ResultStore(db) as store:
        att = store.attempts()
        assert store.count() == len(keys) and len(att) == len(keys) and att["checkpoint"].is_unique
        assert store.leases().empty
    assert time.perf_counter() - t < 60


_DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from iis_fast.sweeps import sweep
    from test_sweep import counting_score, TINY

    df = sweep({ckdir!r}, "fashion-mnist:n_train=120,n_eval=60", arch="iis_smallcnn", out={db!r}, executor="inline",
               cache_dir={cache!r}, score_fn=counting_score, progress=False, **TINY)
    print("claimed_elsewhere", df.attrs["sweep"]["claimed_elsewhere"], "scored", df.attrs["sweep"]["scored"])
""")


@pytest.mark.slow            # two drivers importing torch and scoring: ~20 s on an idle 2-core machine
def test_two_sweeps_on_one_database_share_the_checkpoints(tmp_path):
    pytest.importorskip("timm")
    import torch

    from iis_fast.models.smallcnn import SmallCNN
    from iis_fast.sweeps import ResultStore
    n = 3
    (tmp_path / "ck").mkdir()
    for i in range(n):
        torch.manual_seed(i)
        torch.save(SmallCNN().state_dict(), tmp_path / "ck" / f"step_{i:06d}.pt")
    db, marker, cache = tmp_path / "r.db", tmp_path / "marker.txt", tmp_path / "cache"
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER.format(tests=str(TESTS), ckdir=str(tmp_path / "ck"), db=str(db), cache=str(cache)))
    env = {**os.environ, "IIS_SWEEP_TEST_MARKER": str(marker), "IIS_SWEEP_TEST_DELAY": "1.0"}
    procs = [subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    starts = [ln.split()[1] for ln in marker.read_text().splitlines() if ln.startswith("start")]
    assert sorted(starts) == [f"step_{i:06d}.pt" for i in range(n)]          # each computed once (was: twice)
    skipped = sum(int(o[0].split()[1]) for o in outs)
    assert skipped >= 1                                  # the second driver skipped what the first computed
    with ResultStore(db) as store:
        assert store.count("ok") == n and store.leases().empty
