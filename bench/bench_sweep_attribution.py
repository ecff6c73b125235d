"""Benchmark and result: IIS and How-to-Probe attribution quality per checkpoint of the small-CNN trajectory.

    iis-fast make-checkpoints /tmp/iis_sweep/ckpts            # once (102 checkpoints, see bench/bench_sweep.py)
    OMP_NUM_THREADS=1 python bench/bench_sweep_attribution.py /tmp/iis_sweep/ckpts --db /tmp/iis_sweep/attr.db

One sweep with ``measures=("iis", "attribution")`` (local executor, 2 workers x 1 torch thread: on a loaded 2-core
machine one thread per worker is many times faster than two) into ``--db``; the sweep is resumable, so re-running
the command only recomputes the analysis. Then, from the database:

- cost per checkpoint, per stage, of IIS (model, extract, concepts, train) and of the attribution measure (model,
  spatial maps, probe training, attribution maps + metrics), means over checkpoints;
- per probe (head/loss) and method: GridPG against IIS, against acc_std and against the training step, one point
  per checkpoint, Spearman and Pearson with bootstrap 95% CIs (:func:`iis_fast.sweeps.report.correlations`);
- the figure ``docs/sweep_attribution.png`` (IIS and GridPG over training, :mod:`iis_fast.sweeps.report_attribution`).

Results go to ``bench/results/sweep_attribution.json``; ``render_markdown`` is the README section (via
bench/render_docs.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "sweep_attribution.json"
FIGURE = ROOT / "docs" / "sweep_attribution.png"
DATA = "fashion-mnist:n_train=1000,n_eval=500"
ATTRIBUTION = {"hidden": 64, "n_grids": 6}


def run_sweep(ckpt_dir: str, db: Path, every: int, workers: int) -> dict[str, Any]:
    """The sweep (a no-op for what ``db`` holds already); returns this run's counts and wall seconds."""
    from iis_fast.sweeps import parse_checkpoints, sweep

    specs = parse_checkpoints(ckpt_dir, arch="iis_smallcnn")[::every]
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    df = sweep(specs, DATA, out=db, executor="local", workers=workers, threads=1, cache_dir=str(db.parent / "cache"),
               progress=True, measures=("iis", "attribution"), attribution=ATTRIBUTION)
    st = df.attrs["sweep"]
    return {"checkpoints": len(specs), "scored": st["scored"], "failed": st["failed"],
            "wall_seconds": round(time.perf_counter() - t0, 1), "workers": workers, "threads_per_worker": 1,
            "load_average_before": [round(v, 2) for v in load0],
            "load_average_after": [round(v, 2) for v in os.getloadavg()]}


IIS_STAGES = ("t_model", "t_extract", "t_concepts", "t_train")
ATTR_STAGES = ("t_model", "t_extract", "t_train", "t_attribute")


def _git_rev() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "?"


def analyse(db: Path, runs: list[dict[str, Any]], n_boot: int) -> dict[str, Any]:
    """Cost per stage, correlations and the figure, all from the database."""
    import json as _json

    import torch

    from iis_fast.sweeps.attribution import load_attribution
    from iis_fast.sweeps.report import correlations, load_results
    from iis_fast.sweeps.report_attribution import attribution_correlations, merge_measures, plot_attribution_trajectory

    iis = load_results(db)
    att = load_attribution(db)
    merged = merge_measures(iis, att)
    per_ckpt = att.drop_duplicates("checkpoint")
    cost = {"iis": {s: round(float(iis[s].mean()), 3) for s in IIS_STAGES},
            "attribution": {s: round(float(per_ckpt[s].mean()), 3) for s in ATTR_STAGES}}
    cost["iis"]["total"] = round(float(iis["seconds"].mean()), 3)
    cost["attribution"]["total"] = round(float(per_ckpt["seconds"].mean()), 3)
    cfg = _json.loads(per_ckpt["config_json"].iloc[0])
    cfg.pop("grid_indices", None)
    n = len(iis)
    res = {
        "checkpoints": n, "attribution_checkpoints": int(per_ckpt.shape[0]),
        "steps": [int(iis["step"].min()), int(iis["step"].max())],
        "data": DATA, "attribution_config": cfg, "iis_library": str(iis["library"].iloc[0]),
        "cost_seconds_per_checkpoint": cost, "runs": runs,
        "iis_vs_acc_std": correlations(iis["acc_std"], iis["iis"], n_boot=n_boot),
        "iis_vs_step": correlations(iis["step"], iis["iis"], n_boot=n_boot),
        "correlations": attribution_correlations(merged, n_boot=n_boot),
        "accuracy_last": {f"{h}/{l}": float(d.sort_values("step")["accuracy"].iloc[-1])
                          for (h, l), d in att.groupby(["head", "loss"])},
        "iis_last": float(iis.sort_values("step")["iis"].iloc[-1]),
        "figure": str(FIGURE.relative_to(ROOT)),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "git": _git_rev(),
    }
    plot_attribution_trajectory(merged, FIGURE, title=f"small-CNN trajectory, {n} checkpoints: IIS beside GridPG")
    return res


def _verdict(c: dict[str, Any]) -> str:
    lo, hi = c["spearman_ci"]
    return "rises" if lo > 0 else "falls" if hi < 0 else "no relation"


def _name(c: dict[str, Any]) -> str:
    return f"{c['head']}/{c['loss']} {c['method']}"


def _cell(c: dict[str, Any]) -> str:
    lo, hi = c["spearman_ci"]
    return f"{c['spearman']:+.2f} [{lo:+.2f}, {hi:+.2f}] {_verdict(c)}"


def render_markdown(r: dict[str, Any]) -> str:
    """The README section: cost per checkpoint, what GridPG does with IIS, acc_std and step, the figure."""
    cfg, cost = r["attribution_config"], r["cost_seconds_per_checkpoint"]
    corr = r["correlations"]
    ci, ca = cost["iis"], cost["attribution"]
    wall = sum(x["wall_seconds"] for x in r["runs"])
    lines = [
        f"`python bench/bench_sweep_attribution.py CKPTS --db attr.db`: one `sweep(..., measures=(\"iis\", "
        f"\"attribution\"))` over the {r['checkpoints']} checkpoints of the small-CNN trajectory (steps "
        f"{r['steps'][0]}..{r['steps'][1]}; {r['data']}; IIS with the {r['iis_library']} library), probes "
        f"{', '.join(cfg['heads'])} x {', '.join(cfg['losses'])} (hidden {cfg['hidden']}, {cfg['epochs']} epochs), "
        f"methods {', '.join(cfg['methods'])}, {cfg['n_grids']} {cfg['grid_size']}x{cfg['grid_size']} grids drawn "
        f"once for all checkpoints. Cost per checkpoint (mean, 1 torch thread per worker, git {r['git']}): IIS "
        f"{ci['total']:.1f} s (model {ci['t_model']:.2f}, features {ci['t_extract']:.2f}, concepts "
        f"{ci['t_concepts']:.2f}, heads {ci['t_train']:.2f}); attribution {ca['total']:.1f} s (model "
        f"{ca['t_model']:.2f}, spatial maps {ca['t_extract']:.2f}, probe training {ca['t_train']:.2f}, attribution "
        f"maps and metrics {ca['t_attribute']:.2f}), i.e. {ca['total'] / ci['total']:.1f}x IIS; the whole sweep "
        f"took {wall / 60:.0f} min with {r['runs'][0]['workers']} workers on a shared 2-core machine.",
        "",
        "Spearman ρ of GridPG, one point per checkpoint, with its 95% bootstrap CI; \"rises\"/\"falls\" when "
        "the CI excludes 0, else \"no relation\". For reference, IIS against acc_std: "
        f"ρ = {_cell(r['iis_vs_acc_std'])}; IIS against step: ρ = {_cell(r['iis_vs_step'])}.",
        "",
        "| probe | method | mean GridPG | last-step accuracy | GridPG vs IIS | GridPG vs acc_std | GridPG vs step |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in corr:
        key = f"{c['head']}/{c['loss']}"
        lines.append(f"| {key} | {c['method']} | {c['gridpg_mean']:.3f} | {r['accuracy_last'][key]:.3f} | "
                     f"{_cell(c['vs_iis'])} | {_cell(c['vs_acc_std'])} | {_cell(c['vs_step'])} |")
    lines.append("")
    summary = []
    for what, label in (("vs_iis", "IIS"), ("vs_acc_std", "acc_std"), ("vs_step", "the training step")):
        rises = [c for c in corr if _verdict(c[what]) == "rises"]
        falls = [c for c in corr if _verdict(c[what]) == "falls"]
        summary.append(f"with {label} GridPG rises for {len(rises)} of {len(corr)} probe/method pairs"
                       + (f" ({', '.join(_name(c) for c in rises)})" if rises else "")
                       + (f" and falls for {len(falls)} ({', '.join(_name(c) for c in falls)})" if falls else ""))
    lines.append("By the numbers: " + "; ".join(summary) + ".")
    for field, values in (("head", cfg["heads"]), ("loss", cfg["losses"])):
        parts = []
        for v in values:
            sub = [c for c in corr if c[field] == v and c["method"] != "bcos"]
            k = sum(_verdict(c["vs_iis"]) == "rises" for c in sub)
            mean = sum(c["gridpg_mean"] for c in sub) / max(1, len(sub))
            parts.append(f"{v}: mean GridPG {mean:.3f} over ixg/gradcam, rises with IIS in {k} of {len(sub)}")
        lines.append(f"By {field} (methods all probes share): " + "; ".join(parts) + ".")
    lines += ["", f"![IIS beside GridPG over training]({r['figure']})"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt_dir")
    ap.add_argument("--db", required=True, help="the sweep's results database (kept; re-runs resume it)")
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--n-boot", type=int, default=2000)
    a = ap.parse_args()
    db = Path(a.db)
    db.parent.mkdir(parents=True, exist_ok=True)
    runs_file = db.with_suffix(".runs.json")
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else []
    run = run_sweep(a.ckpt_dir, db, a.every, a.workers)
    if run["scored"] or run["failed"]:
        runs.append(run)
        runs_file.write_text(json.dumps(runs, indent=1))
    if "analyse" in globals():
        res = analyse(db, runs, a.n_boot)   # noqa: F821 - defined below
        RESULTS.write_text(json.dumps(res, indent=1))
        print(render_markdown(res))         # noqa: F821
    return 0


if __name__ == "__main__":
    sys.exit(main())
