"""The example sweep report in docs/example_report/: a short real training run, swept and reported as a user would.

    python bench/example_report.py      # a few minutes on 2 cores

In a temporary folder, with an empty feature cache, it runs the three commands of EXAMPLE (train the small
Fashion-MNIST CNN for half an epoch and save checkpoints along the way, sweep them, write the report into
docs/example_report/), then writes bench/results/example_report.json: the commands with their wall times and
the report's correlations, which ``bench/render_docs.py`` puts into docs/sweep.md.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT_DIR = ROOT / "docs" / "example_report"
sys.path.insert(0, str(ROOT / "bench"))

from bench_demo import git_rev  # noqa: E402

#: The commands, as a user types them (run from the temporary folder; REPORT is replaced by docs/example_report).
EXAMPLE = (
    "iis-fast make-checkpoints run --epochs 0.5 --num-checkpoints 12",
    "iis-fast sweep run/checkpoints.csv --data fashion-mnist:n_train=1000,n_eval=500 --repeats 3 --out example.db",
    "iis-fast report example.db --out-dir REPORT",
)


def main() -> None:
    from iis_fast.sweeps.report import correlations, iis_se, load_results

    commands = []
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="iis_example_") as tmp:
        env = {**os.environ, "IIS_FAST_CACHE": os.path.join(tmp, "cache")}
        shutil.rmtree(REPORT_DIR, ignore_errors=True)
        for cmd in EXAMPLE:
            argv = [a.replace("REPORT", str(REPORT_DIR)) for a in shlex.split(cmd)]
            argv = [sys.executable, "-m", "iis_fast", *argv[1:]]
            if argv[3] in ("make-checkpoints", "sweep"):
                argv.append("--no-progress")
            t = time.perf_counter()
            subprocess.run(argv, check=True, cwd=tmp, env=env)
            commands.append({"command": cmd.replace("REPORT", "docs/example_report"),
                             "wall_s": round(time.perf_counter() - t, 1)})
        df = load_results(os.path.join(tmp, "example.db"), status=None)
    ok = df[df["status"] == "ok"].sort_values("step")
    ends = {}
    for name, row in (("first", ok.iloc[0]), ("last", ok.iloc[-1])):
        ends[name] = {"step": int(row["step"]), "iis": float(row["iis"]), "acc_std": float(row["acc_std"]),
                      "test_acc": float(row["meta.test_acc"])}
    res = {"commands": commands, "checkpoints": len(df), "ok": len(ok), **ends,
           # as the report computes them: 2000 resamples, seed 0, each IIS drawn within its seed interval
           "correlation": correlations(ok["acc_std"], ok["iis"], y_se=iis_se(ok)),
           "correlation_step": correlations(ok["step"], ok["iis"], y_se=iis_se(ok)),
           "git": git_rev(), "machine": {"cpus": os.cpu_count()}, "loadavg": [load0, os.getloadavg()[0]],
           "files": sorted(p.name for p in REPORT_DIR.iterdir())}
    out = ROOT / "bench" / "results" / "example_report.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out} and {REPORT_DIR}")


if __name__ == "__main__":
    main()
