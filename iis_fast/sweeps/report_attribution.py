"""The report's attribution part: GridPG of the sweep's probes against IIS, acc_std and training step.

For a database swept with ``measures=("iis", "attribution")``, :func:`attribution_report` adds to the report:

- the correlations, one point per checkpoint, per probe (head/loss) x attribution method: GridPG against IIS,
  against acc_std and (checkpoints with a step) against the step; Spearman and Pearson with bootstrap 95% CIs
  (:func:`iis_fast.sweeps.report.correlations`);
- ``gridpg_vs_iis.png``: GridPG against IIS (top row) and against acc_std (bottom row), one column per method;
- ``trajectory_attribution.png`` (checkpoints with a step): IIS and acc_std over training beside GridPG over
  training, one panel per method, one line per probe.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["merge_measures", "attribution_correlations", "attribution_report", "attribution_html", "plot_gridpg_vs_iis",
           "plot_attribution_trajectory"]

#: Line style per probe head and colour per loss in the plots.
_COLOURS = {"ce": "tab:blue", "bce": "tab:orange"}


def merge_measures(iis: pd.DataFrame, attribution: pd.DataFrame) -> pd.DataFrame:
    """One row per checkpoint x IIS library x probe x method: the attribution row with its checkpoint's ``iis``,
    ``acc_std`` (and ``iis_lo``/``iis_hi`` where the IIS rows carry them), ok rows only."""
    if iis.empty or attribution.empty:
        return pd.DataFrame()
    keep = [c for c in ("checkpoint", "library", "iis", "acc_std", "iis_lo", "iis_hi", "meta.test_acc")
            if c in iis.columns]
    a = attribution[attribution["status"] == "ok"]
    return a.merge(iis[iis["status"] == "ok"][keep], on="checkpoint", how="inner")


def attribution_correlations(merged: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Per IIS library x probe x method: ``{library, head, loss, method, n, gridpg_mean, vs_iis, vs_acc_std,
    vs_step}`` (each a :func:`~iis_fast.sweeps.report.correlations` dict; ``vs_step`` only with steps)."""
    from .report import correlations
    out: list[dict[str, Any]] = []
    if merged.empty:
        return out
    for (lib, head, loss, meth), d in merged.groupby(["library", "head", "loss", "method"], sort=True):
        rec: dict[str, Any] = {"library": lib, "head": head, "loss": loss, "method": meth, "n": len(d),
                               "gridpg_mean": float(d["gridpg"].mean()),
                               "vs_iis": correlations(d["iis"], d["gridpg"], n_boot=n_boot, seed=seed),
                               "vs_acc_std": correlations(d["acc_std"], d["gridpg"], n_boot=n_boot, seed=seed)}
        if d["step"].notna().all() and d["step"].nunique() > 1:
            rec["vs_step"] = correlations(d["step"], d["gridpg"], n_boot=n_boot, seed=seed)
        out.append(rec)
    return out


def _methods(merged: pd.DataFrame) -> list[str]:
    order = ["ixg", "gradcam", "ig", "bcos"]
    have = set(merged["method"])
    return [m for m in order if m in have] + sorted(have - set(order))


def _probe_style(head: str, loss: str) -> dict[str, Any]:
    return {"color": _COLOURS.get(loss, "tab:gray"), "ls": "-" if head.startswith("bcos") else "--"}


def plot_gridpg_vs_iis(merged: pd.DataFrame, path: str | Path) -> str:
    """GridPG against IIS (top) and acc_std (bottom), one column per method, one colour/marker per probe."""
    from .report import _save
    import matplotlib.pyplot as plt
    lib = merged["library"].iloc[0]
    d0 = merged[merged["library"] == lib]
    meths = _methods(d0)
    fig, axes = plt.subplots(2, len(meths), figsize=(4.4 * len(meths), 8), squeeze=False)
    for j, m in enumerate(meths):
        for (head, loss), d in d0[d0["method"] == m].groupby(["head", "loss"]):
            st = _probe_style(head, loss)
            mk = "o" if head.startswith("bcos") else "^"
            for i, x in enumerate(("iis", "acc_std")):
                axes[i, j].scatter(d[x], d["gridpg"], s=12, marker=mk, color=st["color"], alpha=0.7,
                                   label=f"{head}/{loss}")
        for i, x in enumerate(("IIS", "acc_std")):
            axes[i, j].set_xlabel(x)
            axes[i, j].set_ylabel(f"GridPG ({m})")
            axes[i, j].grid(alpha=0.3)
        axes[0, j].set_title(f"{m}", fontsize=10)
        axes[0, j].legend(fontsize=8)
    return _save(fig, Path(path))


def plot_attribution_trajectory(merged: pd.DataFrame, path: str | Path, title: str | None = None) -> str:
    """IIS and acc_std over training (first panel; IIS error band when the rows carry ``iis_lo``/``iis_hi``), then
    GridPG over training, one panel per method, one line per probe (solid B-cos, dashed linear; colour = loss)."""
    from .report import _save
    import matplotlib.pyplot as plt
    lib = merged["library"].iloc[0]
    d0 = merged[merged["library"] == lib]
    meths = _methods(d0)
    fig, axes = plt.subplots(1, 1 + len(meths), figsize=(4.3 * (1 + len(meths)), 4.2), squeeze=False)
    axes = axes[0]
    per_ckpt = d0.drop_duplicates("checkpoint").sort_values("step")
    ax = axes[0]
    ax.plot(per_ckpt["step"], per_ckpt["iis"], color="tab:red", lw=1.3, label="IIS")
    if {"iis_lo", "iis_hi"} <= set(per_ckpt.columns) and per_ckpt["iis_lo"].notna().any():
        ax.fill_between(per_ckpt["step"], per_ckpt["iis_lo"], per_ckpt["iis_hi"], color="tab:red", alpha=0.2)
    ax.plot(per_ckpt["step"], per_ckpt["acc_std"], color="tab:blue", lw=1.3, label="acc_std (linear probe)")
    if "meta.test_acc" in per_ckpt and per_ckpt["meta.test_acc"].notna().any():
        ax.plot(per_ckpt["step"], per_ckpt["meta.test_acc"], color="tab:green", lw=1, ls=":",
                label="model test accuracy")
    ax.set_xlabel("training step")
    ax.set_title(f"IIS ({lib}) and accuracy", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for ax, m in zip(axes[1:], meths):
        for (head, loss), d in d0[d0["method"] == m].groupby(["head", "loss"]):
            d = d.sort_values("step")
            ax.plot(d["step"], d["gridpg"], lw=1.1, label=f"{head}/{loss}", **_probe_style(head, loss))
        ax.axhline(1 / 9, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("training step")
        ax.set_ylabel("GridPG")
        ax.set_title(f"GridPG, {m} (dotted: 1/9, no localisation)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, Path(path))


def _fmt(c: dict[str, Any]) -> str:
    lo, hi = c["spearman_ci"]
    return f"ρ = {c['spearman']:.2f} [{lo:.2f}, {hi:.2f}], r = {c['pearson']:.2f}"


def attribution_report(db: str | Path, iis_ok: pd.DataFrame, out: Path, n_boot: int = 2000,
                       seed: int = 0) -> tuple[list[str], dict[str, str], list[dict[str, Any]]]:
    """Console lines, written plots and correlations of the attribution rows of ``db`` (nothing when it has
    none)."""
    from .attribution import load_attribution
    merged = merge_measures(iis_ok, load_attribution(db))
    if merged.empty:
        return [], {}, []
    corr = attribution_correlations(merged, n_boot=n_boot, seed=seed)
    lines = ["GridPG per probe and method (Spearman ρ [95% bootstrap CI], Pearson r; one point per checkpoint):"]
    for c in corr:
        parts = [f"vs IIS {_fmt(c['vs_iis'])}", f"vs acc_std {_fmt(c['vs_acc_std'])}"]
        if "vs_step" in c:
            parts.append(f"vs step {_fmt(c['vs_step'])}")
        lines.append(f"  [{c['library']}] {c['head']}/{c['loss']} {c['method']}: mean {c['gridpg_mean']:.3f}; "
                     + "; ".join(parts))
    files = {"gridpg_vs_iis": plot_gridpg_vs_iis(merged, out / "gridpg_vs_iis.png")}
    if merged["step"].notna().all() and merged["step"].nunique() > 1:
        files["trajectory_attribution"] = plot_attribution_trajectory(merged, out / "trajectory_attribution.png")
    return lines, files, corr


def attribution_html(corr: list[dict[str, Any]]) -> str:
    """report.html's table of the correlations of :func:`attribution_correlations` (empty without rows)."""
    import html
    if not corr:
        return ""
    head = ("<h2>Attribution quality (GridPG) against IIS, acc_std and step</h2><table><tr><th>library</th>"
            "<th>probe</th><th>method</th><th>n</th><th>mean GridPG</th><th>vs IIS</th><th>vs acc_std</th>"
            "<th>vs step</th></tr>")
    rows = [f"<tr><td>{html.escape(str(c['library']))}</td><td>{html.escape(c['head'] + '/' + c['loss'])}</td>"
            f"<td>{html.escape(c['method'])}</td><td>{c['n']}</td><td>{c['gridpg_mean']:.3f}</td>"
            + "".join(f"<td>{html.escape(_fmt(c[k])) if k in c else '–'}</td>"
                      for k in ("vs_iis", "vs_acc_std", "vs_step")) + "</tr>" for c in corr]
    return head + "".join(rows) + "</table>"
