"""Does interpretability-maximising fine-tuning raise IIS and accuracy? (the IIS paper's first application)

One command reruns it (docs/applications.md#the-experiment):

    nice -n 5 .venv/bin/python bench/bench_finetune.py      # -> bench/results/finetune.json + finetune.png

ImageNet MobileNetV2 (the packaged weights) on a fixed class-balanced Fashion-MNIST subset, fine-tuned with
:func:`iis_fast.finetune` in three arms that share every seed: lam = 0 (plain fine-tuning, the control), lam > 0
with C rebuilt every epoch (the default), lam > 0 with C fixed. Each seed sets the probe/head initialisation, the
batch order, the prototype pick and the IIS grid's seed; the data subset is the same for all. IIS before and after
comes from :func:`iis_fast.score` on the same train/eval images. Sized for 2 shared CPU cores (~20-25 min): small
images, few epochs, only the last blocks trained; the sizes are recorded in the results file.

The results file is written after every run; a rerun with the same settings skips the runs it already holds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "finetune.json"
PNG = ROOT / "bench" / "results" / "finetune.png"


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def arms(lam: float) -> dict[str, dict[str, Any]]:
    return {"control (lam=0)": {"lam": 0.0, "concept_update": "epoch"},
            f"lam={lam:g}, C rebuilt every epoch": {"lam": lam, "concept_update": "epoch"},
            f"lam={lam:g}, C fixed": {"lam": lam, "concept_update": "fixed"}}


def run_one(settings: dict[str, Any], arm: dict[str, Any], seed: int) -> dict[str, Any]:
    import torch
    from iis_fast.applications import finetune
    from iis_fast.data.fashion_mnist import fashion_mnist_loaders
    from iis_fast.models import create_model, preprocessing_config
    torch.manual_seed(seed)
    model = create_model(settings["model"], pretrained=True)
    pre = preprocessing_config(model)
    train, ev = fashion_mnist_loaders(settings["n_train"], settings["n_eval"], settings["image_size"], pre["mean"],
                                      pre["std"], batch_size=100, seed=settings["data_seed"])
    t = time.perf_counter()
    r = finetune(model, train, ev, lam=arm["lam"], concept_update=arm["concept_update"], seed=seed,
                 sparsity=settings["sparsity"], num_concepts=settings["num_concepts"], epochs=settings["epochs"],
                 lr=settings["lr"], batch_size=settings["batch_size"], train_blocks=settings["train_blocks"],
                 elements=settings["elements"], images_per_class=settings["images_per_class"], progress=False,
                 score_options={"image_size": settings["image_size"], "elements": settings["elements"],
                                "images_per_class": settings["images_per_class"], "progress": False})
    h = r.history
    last = h.epochs[-1]
    return {"seed": seed, **arm, "seconds": round(time.perf_counter() - t, 1),
            "iis_before": h.iis_before["iis"], "iis_after": h.iis_after["iis"],
            "acc_std_before": h.iis_before["acc_std"], "acc_std_after": h.iis_after["acc_std"],
            "acc_s_before": dict(zip(map(str, h.iis_before["sparsities"]), h.iis_before["acc"])),
            "acc_s_after": dict(zip(map(str, h.iis_after["sparsities"]), h.iis_after["acc"])),
            "eval_acc_probe": last["eval_acc_probe"], "eval_acc_concept": last["eval_acc_concept"],
            "epochs": h.epochs}


def summarise(runs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        rs = [r for r in runs if r["arm"] == name]
        if not rs:
            continue
        row: dict[str, Any] = {"arm": name, "n": len(rs)}
        for f in ("acc_std_before", "acc_std_after", "iis_before", "iis_after", "eval_acc_probe",
                  "eval_acc_concept"):
            v = np.array([r[f] for r in rs])
            row[f] = [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]
        d = np.array([r["iis_after"] - r["iis_before"] for r in rs])
        row["iis_change"] = [float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0]
        rows.append(row)
    return rows


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["arm"] for r in results["summary"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (before, after, title) in zip(axes, (("iis_before", "iis_after", "IIS"),
                                                 ("acc_std_before", "acc_std_after", "test accuracy (linear probe)"))):
        for i, name in enumerate(names):
            rs = [r for r in results["runs"] if r["arm"] == name]
            for r in rs:
                ax.plot([0, 1], [r[before], r[after]], color=f"C{i}", alpha=0.35, lw=1)
            mb, ma = np.mean([r[before] for r in rs]), np.mean([r[after] for r in rs])
            sa = np.std([r[after] for r in rs], ddof=1) if len(rs) > 1 else 0.0
            ax.errorbar([1 + 0.03 * (i - 1)], [ma], yerr=[sa], color=f"C{i}", marker="o", capsize=3, label=name)
            ax.plot([0, 1], [mb, ma], color=f"C{i}", lw=2)
        ax.set_xticks([0, 1], ["pretrained", "fine-tuned"])
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    s = results["settings"]
    fig.suptitle(f"MobileNetV2 on Fashion-MNIST ({s['n_train']} train / {s['n_eval']} test, {s['image_size']} px, "
                 f"{s['epochs']} epochs, last {s['train_blocks']} blocks), {len(results['seeds'])} seeds; "
                 "thin lines: one seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _verdict(arm: str, rs: list[dict[str, Any]], control: dict[int, dict[str, Any]]) -> str:
    """Whether each paired difference's 95% t-interval excludes 0 (else: no difference measured)."""
    from scipy import stats
    out = []
    for f, what in (("acc_std_after", "test accuracy"), ("iis_after", "IIS")):
        d = np.array([r[f] - control[r["seed"]][f] for r in rs])
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("inf")
        t = stats.t.ppf(0.975, len(d) - 1) if len(d) > 1 else float("inf")
        word = ("higher" if d.mean() > 0 else "lower") if abs(d.mean()) > t * se else "no measured difference"
        out.append(f"{what} {word}")
    return f"{arm} against the control: " + ", ".join(out) + " (95% t-interval of the paired mean)"


def _pm(v: list[float], digits: int = 4) -> str:
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"


def render_markdown(results: dict[str, Any]) -> str:
    """The table and the plot link that bench/render_docs.py puts in README.md and docs/applications.md."""
    s = results["settings"]
    lines = [f"`nice -n 5 python bench/bench_finetune.py`: {s['model']} (ImageNet weights) on Fashion-MNIST, "
             f"{s['n_train']} train / {s['n_eval']} test images at {s['image_size']} px, the last "
             f"{s['train_blocks']} blocks fine-tuned for {s['epochs']} epochs (Adam lr {s['lr']:g}, batch "
             f"{s['batch_size']}), concept head at s = {s['sparsity']:g} with M = {s['num_concepts']} prototype "
             f"concepts ({s['elements']}); IIS with the same images and elements; mean ± std over seeds "
             f"{', '.join(map(str, results['seeds']))}.", "",
             "| arm | n | test acc before | test acc after | IIS before | IIS after | IIS change | "
             "concept-head acc (s=%g) |" % s["sparsity"],
             "|---|---|---|---|---|---|---|---|"]
    for r in results["summary"]:
        lines.append(f"| {r['arm']} | {r['n']} | {_pm(r['acc_std_before'])} | {_pm(r['acc_std_after'])} | "
                     f"{_pm(r['iis_before'])} | {_pm(r['iis_after'])} | {r['iis_change'][0]:+.4f} ± "
                     f"{r['iis_change'][1]:.4f} | {_pm(r['eval_acc_concept'])} |")
    control = {r["seed"]: r for r in results["runs"] if r["lam"] == 0}
    paired = [r for r in results["summary"] if r["arm"] != next(iter(control.values()), {}).get("arm")]
    if control and paired:
        lines += ["", "The same seeds, lam > 0 minus the control (paired by seed):", "",
                  "| arm | pairs | test acc after | IIS after | concept-head acc |", "|---|---|---|---|---|"]
        for row in paired:
            rs = [r for r in results["runs"] if r["arm"] == row["arm"] and r["seed"] in control]
            cells = []
            for f in ("acc_std_after", "iis_after", "eval_acc_concept"):
                d = np.array([r[f] - control[r["seed"]][f] for r in rs])
                cells.append(f"{d.mean():+.4f} ± {d.std(ddof=1) if len(d) > 1 else 0.0:.4f}")
            lines.append(f"| {row['arm']} | {len(rs)} | " + " | ".join(cells) + " |")
        lines += ["", "Read as: " + "; ".join(_verdict(row["arm"], [
            r for r in results["runs"] if r["arm"] == row["arm"] and r["seed"] in control], control)
            for row in paired) + "."]
    m = results["machine"]
    lines += ["", "Test accuracy is the IIS grid's standard probe (acc_std) on the test images, before and after. "
              f"Measured on {m['cpu']} ({m['threads']} threads"
              + (f", load average {m['load_average_start']:.1f} -> {m['load_average_end']:.1f}"
                 if "load_average_end" in m else "")
              + f"), git {results['git']}, {results['total_seconds'] / 60:.1f} min in all.", "",
              "![IIS and test accuracy before and after fine-tuning, per arm](bench/results/finetune.png)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-blocks", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.1)
    p.add_argument("--num-concepts", type=int, default=200)
    p.add_argument("--images-per-class", type=int, default=10)
    p.add_argument("--elements", default="patches")
    p.add_argument("--arms", nargs="+", default=None, help="arm names (default: all three)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--png", default=str(PNG))
    a = p.parse_args(argv)
    import torch
    settings = {"model": "mobilenetv2_100", "n_train": a.n_train, "n_eval": a.n_eval, "image_size": a.image_size,
                "epochs": a.epochs, "train_blocks": a.train_blocks, "lr": a.lr, "batch_size": a.batch_size,
                "sparsity": a.sparsity, "num_concepts": a.num_concepts, "images_per_class": a.images_per_class,
                "elements": a.elements, "lam": a.lam, "data_seed": 0}
    all_arms = arms(a.lam)
    names = a.arms or list(all_arms)
    out = Path(a.out)
    results: dict[str, Any] = {"settings": settings, "seeds": a.seeds, "runs": [], "total_seconds": 0.0}
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("settings") == settings:
            results["runs"] = old["runs"]
            results["total_seconds"] = old.get("total_seconds", 0.0)
    results.update(git=_git(), machine={"cpu": _cpu_name(), "threads": torch.get_num_threads(),
                                        "torch": torch.__version__, "load_average_start": os.getloadavg()[0]})
    for seed in a.seeds:                     # seed-major: a cut-short run still has every arm at the first seeds
        for name in names:
            if any(r["arm"] == name and r["seed"] == seed for r in results["runs"]):
                continue
            t = time.perf_counter()
            row = {"arm": name, **run_one(settings, all_arms[name], seed)}
            results["runs"].append(row)
            results["total_seconds"] += time.perf_counter() - t
            results["summary"] = summarise(results["runs"], names)
            out.write_text(json.dumps(results, indent=1))
            print(f"{name:<34} seed {seed}: IIS {row['iis_before']:.4f} -> {row['iis_after']:.4f}, acc_std "
                  f"{row['acc_std_before']:.4f} -> {row['acc_std_after']:.4f}, concept-head acc "
                  f"{row['eval_acc_concept']:.4f} ({row['seconds']:.0f} s)", flush=True)
    results["summary"] = summarise(results["runs"], names)
    results["machine"]["load_average_end"] = os.getloadavg()[0]
    out.write_text(json.dumps(results, indent=1))
    plot(results, Path(a.png))
    print(render_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
