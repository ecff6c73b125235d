"""Time `iis-fast demo` as a new user runs it, from an empty feature cache, and keep what it prints.

    python bench/bench_demo.py               # ~3 min on 2 cores; writes bench/results/demo.json
    python bench/bench_demo.py --reference   # then also `iis-fast demo --backend reference` on the cached features

The demo runs with error bars (``--args``, default ``--repeats 5 --selection-check``: five grids per model, the
evaluation bootstrap, and the IIS with epoch and lr chosen on a held-out part of TRAIN; docs/spec.md §1.10), so the
README's table shows IIS with its intervals. The reference run is one grid (R = 1): the oracle's number.

The demo runs in a fresh process with ``IIS_FAST_CACHE`` pointing at an empty temporary folder, so the wall time
includes interpreter start-up, imports, feature extraction and concept elements: everything after setup.
``bench/render_docs.py`` turns the JSON into the README's results table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_grid import cpu_name  # noqa: E402


def git_rev() -> str:
    """The checked-out commit, with ``-dirty`` when tracked files differ from it."""
    return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def run_demo(args: list[str], cache: str) -> dict:
    """Run ``iis-fast demo ARGS --json ...`` in a fresh process; its rows, wall time and load average."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "demo.json")
        argv = [sys.executable, "-m", "iis_fast", "demo", *args, "--no-progress", "--json", out]
        load0 = os.getloadavg()[0]
        t = time.perf_counter()
        subprocess.run(argv, check=True, cwd=ROOT, env={**os.environ, "IIS_FAST_CACHE": cache})
        wall = time.perf_counter() - t
        rows = json.loads(Path(out).read_text())
    return {"command": " ".join(["iis-fast", "demo", *args]), "wall_s": round(wall, 1),
            "loadavg": [load0, os.getloadavg()[0]], "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", action="store_true",
                    help="also run the demo with --backend reference (features cached by the first run)")
    ap.add_argument("--args", default="--repeats 5 --selection-check",
                    help="options of the timed `iis-fast demo` run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "demo.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="iis_demo_cache_") as cache:
        res = run_demo(args.args.split(), cache)
        res.update(git=git_rev(), machine={"cpu": cpu_name(), "cpus": os.cpu_count()}, cache="empty at start")
        if args.reference:
            res["reference"] = run_demo(["--backend", "reference"], cache)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}: {res['wall_s']:.0f} s wall")


if __name__ == "__main__":
    main()
