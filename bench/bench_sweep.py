"""Benchmark: score the generated small-CNN trajectory end to end; checkpoints/hour per stage, 1 and 2 workers.

    iis-fast make-checkpoints /tmp/iis_sweep/ckpts            # once (102 checkpoints, ~90% test accuracy)
    python bench/bench_sweep.py /tmp/iis_sweep/ckpts --workers 1 2            # full: every checkpoint
    python bench/bench_sweep.py /tmp/iis_sweep/ckpts --every 5 --workers 2    # reduced: every 5th checkpoint

Each run starts from an empty database and an empty feature cache, so every stage is really computed.
Score options are the docs/spec.md defaults (M = 200 prototype concepts, 8 sparsities x 3 lrs, 30 epochs, batch 1024) on
Fashion-MNIST subsets (default 2000 TRAIN / 1000 TEST images, 28x28). Per stage, checkpoints/hour is what one
worker would sustain doing only that stage (3600 / mean stage seconds); ``total`` is the measured wall-clock
throughput of the whole sweep. Results go to ``bench/results/sweep_w<workers>[_<tag>].json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


def run(ckpt_dir: str, workers: int, every: int, limit: int | None, n_train: int, n_eval: int, tag: str,
        extra: dict) -> dict:
    import torch

    from iis_fast.sweeps import parse_checkpoints, sweep

    specs = parse_checkpoints(ckpt_dir, arch="iis_smallcnn")[::every]
    if limit:
        specs = specs[:limit]
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    df = sweep(specs, f"fashion-mnist:n_train={n_train},n_eval={n_eval}", out=work / "r.db", executor="local",
               workers=workers, cache_dir=str(work / "cache"), progress=True, **extra)
    wall = time.perf_counter() - t0
    st = df.attrs["sweep"]
    n = len(df)
    per = {s: st[f"t_{s}"] / n for s in ("model", "extract", "concepts", "train")}
    out = {
        "checkpoints": n, "ok": int((df["status"] == "ok").sum()), "workers": workers, "every": every,
        "threads_per_worker": max(1, (os.cpu_count() or 1) // workers),
        "data": {"n_train": n_train, "n_eval": n_eval, "image_size": 28},
        "score_options": {"library": "prototype", "num_concepts": 200, "sparsities": 8, "lrs": 3, "epochs": 30,
                          **extra},
        "wall_seconds": round(wall, 1), "data_prep_seconds": st["data_seconds"],
        "seconds_per_checkpoint": {k: round(v, 2) for k, v in per.items()},
        "checkpoints_per_hour": {**{k: round(3600 / v, 1) if v > 0 else None for k, v in per.items()},
                                 "total": round(3600 * n / wall, 1)},
        "projected_minutes_for_100": round(100 * wall / n / 60, 1),
        "load_average_before": [round(v, 2) for v in load0], "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "backend": str(df["backend"].iloc[0]) if n else None,
        "iis_mean": float(df["iis"].mean()), "acc_std_mean": float(df["acc_std"].mean()),
        "db": str(work / "r.db"),
    }
    res = Path(__file__).resolve().parent / "results" / f"sweep_w{workers}{('_' + tag) if tag else ''}.json"
    res.parent.mkdir(parents=True, exist_ok=True)
    res.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    shutil.rmtree(work / "cache", ignore_errors=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt_dir", help="folder from `iis-fast make-checkpoints` (with checkpoints.csv)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--every", type=int, default=1, help="score every k-th checkpoint (reduced runs)")
    p.add_argument("--limit", type=int, default=None, help="at most this many checkpoints")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--tag", default="", help="suffix of the results file name")
    a = p.parse_args()
    for w in a.workers:
        run(a.ckpt_dir, w, a.every, a.limit, a.n_train, a.n_eval, a.tag, {})
    return 0


if __name__ == "__main__":
    sys.exit(main())
