"""``iis-fast report``: a results database as a table (console, HTML) and PNG plots.

Plots (``out_dir``):

- ``iis_vs_acc.png``: IIS against acc_std, one point per checkpoint (coloured by training step when known),
  titled with the Spearman and Pearson correlations and their bootstrap 95% confidence intervals, with each
  point's IIS interval as an error bar when the sweep scored with error bars (docs/spec.md §1.10);
- ``arr_curves.png``: ARR(s) = acc_s / acc_std against sparsity s, one curve per checkpoint (coloured by step);
- ``trajectory.png`` (checkpoints with a step only): IIS (with its interval), acc_std and, when the checkpoints
  carry it, the model's own test accuracy against the training step.
"""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

__all__ = ["correlations", "bootstrap_ci", "load_results", "make_report", "Report"]


def _pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson r of [..., n] arrays (nan where a row is constant)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    den = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(-1) / np.where(den > 0, den, 1), np.nan)


def bootstrap_ci(x: Sequence[float], y: Sequence[float], method: str = "spearman", n_boot: int = 2000,
                 ci: float = 0.95, seed: int = 0, y_se: Sequence[float] | None = None) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a correlation (pairs resampled with replacement).

    With ``y_se`` (each y's standard error, e.g. a checkpoint's IIS over its repeated grids: sd / sqrt(R)), every
    resampled y is also drawn within its own uncertainty, y + N(0, se²), so the interval carries the measurement
    noise of each point as well as the choice of points. Resamples where a variable is constant are dropped.
    Returns (nan, nan) for fewer than 3 pairs.
    Written here rather than with ``scipy.stats.bootstrap``: scipy returns a nan interval as soon as one resample
    is degenerate, which a sweep of a handful of checkpoints hits routinely.
    """
    from scipy.stats import rankdata

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = x.shape[0]
    if n < 3:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(int(n_boot), n))
    bx, by = x[idx], y[idx]
    if y_se is not None:
        by = by + rng.standard_normal(by.shape) * np.nan_to_num(np.asarray(y_se, dtype=np.float64))[idx]
    if method == "spearman":
        bx, by = rankdata(bx, axis=1), rankdata(by, axis=1)
    elif method != "pearson":
        raise ValueError(f"method={method!r}: choose 'spearman' or 'pearson'")
    r = _pearson(bx, by)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return float("nan"), float("nan")
    a = (1 - ci) / 2
    return float(np.quantile(r, a)), float(np.quantile(r, 1 - a))


def correlations(x: Sequence[float], y: Sequence[float], n_boot: int = 2000, ci: float = 0.95,
                 seed: int = 0, y_se: Sequence[float] | None = None) -> dict[str, Any]:
    """Spearman and Pearson correlation of x and y with p-values (scipy) and bootstrap CIs (``y_se``: see
    :func:`bootstrap_ci`).

    Returns ``{n, spearman, spearman_p, spearman_ci, pearson, pearson_p, pearson_ci}`` (nan when n < 3 or a
    variable is constant). Non-finite pairs are dropped first.
    """
    from scipy.stats import pearsonr, spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if y_se is not None:
        y_se = np.asarray(y_se, dtype=np.float64)[keep]
    out: dict[str, Any] = {"n": int(x.size)}
    const = x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0
    for name, fn in (("spearman", spearmanr), ("pearson", pearsonr)):
        if const:
            out[name], out[f"{name}_p"], out[f"{name}_ci"] = float("nan"), float("nan"), (float("nan"), float("nan"))
            continue
        res = fn(x, y)
        out[name] = float(res[0])
        out[f"{name}_p"] = float(res[1])
        out[f"{name}_ci"] = bootstrap_ci(x, y, name, n_boot, ci, seed, y_se)
    return out


def load_results(db: str | os.PathLike[str], status: str | None = "ok") -> pd.DataFrame:
    """The expanded results table of a sweep database (only rows with ``status``, unless None)."""
    from .store import ResultStore

    with ResultStore(db, create=False) as store:         # a missing path is an error, not a new empty database
        df = store.dataframe()
    if status is not None and not df.empty:
        df = df[df["status"] == status].reset_index(drop=True)
    return df


def _fmt_corr(c: dict[str, Any]) -> str:
    def one(name: str, sym: str) -> str:
        lo, hi = c[f"{name}_ci"]
        return f"{sym} = {c[name]:.3f} [{lo:.3f}, {hi:.3f}]"
    return f"{one('spearman', 'Spearman ρ')}, {one('pearson', 'Pearson r')} (95% bootstrap CI, n = {c['n']})"


@dataclass
class Report:
    """What :func:`make_report` wrote and found."""

    table: pd.DataFrame
    text: str                                             # the console table and correlation lines
    files: dict[str, str] = field(default_factory=dict)   # name -> path (html, pngs, csv)
    correlation: dict[str, dict[str, Any]] = field(default_factory=dict)  # per library: IIS vs acc_std
    correlation_step: dict[str, dict[str, Any]] = field(default_factory=dict)  # per library: IIS vs step
    attribution: list[dict[str, Any]] = field(default_factory=list)  # GridPG vs IIS/acc_std/step (report_attribution)


TABLE_COLUMNS = ("step", "model", "library", "iis", "iis_lo", "iis_hi", "iis_boot_lo", "iis_boot_hi", "iis_holdout",
                 "acc_std", "meta.test_acc", "seconds", "path")


def iis_se(d: pd.DataFrame) -> np.ndarray | None:
    """Each checkpoint's standard error of IIS over its repeated grids (sd / sqrt(R); 0 for a single grid), or None
    when no row has repeats. The training-noise part only: the evaluation bootstrap's noise is shared by
    checkpoints scored on the same images, so it is not drawn independently per point."""
    if "iis_sd" not in d.columns or d["iis_sd"].isna().all():
        return None
    return (d["iis_sd"].fillna(0.0) / np.sqrt(d["repeats"].fillna(1.0).clip(lower=1.0))).to_numpy(dtype=float)


def iis_bars(d: pd.DataFrame) -> tuple[np.ndarray, str] | None:
    """Error bars of IIS, [2, n] distances below and above: the seed interval where the rows have one, else the
    evaluation bootstrap's; None without either. With the interval's name for the legend."""
    for lo, hi, name in (("iis_lo", "iis_hi", "seed interval"),
                         ("iis_boot_lo", "iis_boot_hi", "evaluation bootstrap")):
        if lo in d.columns and d[lo].notna().any():
            bars = np.vstack([d["iis"] - d[lo], d[hi] - d["iis"]]).astype(float)
            return np.nan_to_num(bars.clip(min=0.0)), name
    return None


def _short(df: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in TABLE_COLUMNS if c in df.columns]
    t = df[cols].copy()
    if "path" in t:
        t["path"] = t["path"].map(lambda p: os.path.basename(str(p)))
    return t


def make_report(db: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None, n_boot: int = 2000,
                seed: int = 0, max_rows: int | None = 40) -> Report:
    """Write ``report.html``, ``results.csv`` and the PNG plots of a sweep database to ``out_dir``.

    Args:
        db: the sweep's SQLite file.
        out_dir: output folder (default: ``<db stem>_report`` next to the database).
        n_boot: bootstrap resamples for the correlation confidence intervals.
        seed: bootstrap seed.
        max_rows: rows shown in the console table (all go to the HTML and CSV).
    """
    import matplotlib
    matplotlib.use("Agg")

    db = Path(db)
    out = Path(out_dir) if out_dir is not None else db.with_name(db.stem + "_report")
    all_rows = load_results(db, status=None)
    out.mkdir(parents=True, exist_ok=True)
    ok = all_rows[all_rows["status"] == "ok"].reset_index(drop=True) if not all_rows.empty else all_rows
    failed = all_rows[all_rows["status"] == "failed"] if not all_rows.empty else all_rows
    rep = Report(table=ok, text="")
    lines = [f"{db}: {len(ok)} ok, {len(failed)} failed"]
    if not ok.empty:
        all_rows.to_csv(out / "results.csv", index=False)
        rep.files["csv"] = str(out / "results.csv")
        lines.append(_short(ok).to_string(index=False, max_rows=max_rows, float_format=lambda v: f"{v:.4f}"))
        has_step = bool(ok["step"].notna().all() and ok["step"].nunique() > 1)
        libs = list(dict.fromkeys(ok["library"]))
        for lib in libs:
            d = ok[ok["library"] == lib]
            rep.correlation[lib] = correlations(d["acc_std"], d["iis"], n_boot=n_boot, seed=seed, y_se=iis_se(d))
            lines.append(f"[{lib}] IIS vs acc_std: {_fmt_corr(rep.correlation[lib])}")
            if has_step:
                rep.correlation_step[lib] = correlations(d["step"], d["iis"], n_boot=n_boot, seed=seed,
                                                         y_se=iis_se(d))
                lines.append(f"[{lib}] IIS vs training step: {_fmt_corr(rep.correlation_step[lib])}")
        rep.files["iis_vs_acc"] = _plot_iis_vs_acc(ok, libs, has_step, rep.correlation, out / "iis_vs_acc.png")
        rep.files["arr_curves"] = _plot_arr_curves(ok, libs, has_step, out / "arr_curves.png")
        if has_step:
            rep.files["trajectory"] = _plot_trajectory(ok, libs, rep.correlation_step, out / "trajectory.png")
        from .report_attribution import attribution_report     # a sweep with the attribution measure
        att_lines, att_files, rep.attribution = attribution_report(db, ok, out, n_boot, seed)
        lines += att_lines
        rep.files.update(att_files)
    lines += _problem_lines(ok, failed)
    rep.text = "\n".join(lines)
    (out / "report.html").write_text(_html(db, ok, failed, rep))
    rep.files["html"] = str(out / "report.html")
    return rep


def _panels(n: int, width: float = 6.2) -> tuple[Any, Any]:
    """A figure with one panel per library."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, n, figsize=(width * n, 5), squeeze=False)
    return fig, axes[0]


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _plot_iis_vs_acc(ok: pd.DataFrame, libs: list[str], has_step: bool, corr: dict[str, dict[str, Any]],
                     path: Path) -> str:
    """IIS against acc_std, one point per checkpoint, coloured by step, titled with the correlations."""
    fig, axes = _panels(len(libs))
    for ax, lib in zip(axes, libs):
        d, c = ok[ok["library"] == lib], corr[lib]
        bars = iis_bars(d)
        if bars is not None:
            ax.errorbar(d["acc_std"], d["iis"], yerr=bars[0], fmt="none", ecolor="grey", elinewidth=0.8, capsize=2,
                        zorder=1, label=f"IIS {bars[1]}")
            ax.legend(loc="lower right", fontsize=8)
        sc = ax.scatter(d["acc_std"], d["iis"], c=d["step"] if has_step else "tab:blue", cmap="viridis",
                        s=22, edgecolor="k", linewidth=0.3, zorder=2)
        if has_step:
            fig.colorbar(sc, ax=ax, label="training step")
        ax.set_xlabel("acc_std (linear probe accuracy on the representation)")
        ax.set_ylabel("IIS")
        ax.set_title(f"{lib}: Spearman ρ={c['spearman']:.2f} [{c['spearman_ci'][0]:.2f}, {c['spearman_ci'][1]:.2f}]\n"
                     f"Pearson r={c['pearson']:.2f} [{c['pearson_ci'][0]:.2f}, {c['pearson_ci'][1]:.2f}], n={c['n']}",
                     fontsize=10)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_arr_curves(ok: pd.DataFrame, libs: list[str], has_step: bool, path: Path) -> str:
    """ARR(s) = acc_s / acc_std against sparsity, one curve per checkpoint, coloured by step."""
    import matplotlib
    fig, axes = _panels(len(libs))
    cmap = matplotlib.colormaps["viridis"]
    for ax, lib in zip(axes, libs):
        d = ok[ok["library"] == lib]
        steps = d["step"].to_numpy(dtype=float) if has_step else np.arange(len(d), dtype=float)
        norm = matplotlib.colors.Normalize(vmin=np.nanmin(steps), vmax=max(np.nanmax(steps), np.nanmin(steps) + 1))
        for rj, st in zip(d["result_json"], steps):
            r = json.loads(rj)
            order = np.argsort(r["sparsities"])
            ax.plot(np.asarray(r["sparsities"])[order], np.asarray(r["arr"])[order], color=cmap(norm(st)),
                    alpha=0.7, lw=1, marker="o", ms=2)
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax,
                     label="training step" if has_step else "checkpoint #")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("sparsity s")
        ax.set_ylabel("ARR(s) = acc_s / acc_std")
        ax.set_title(f"{lib}: accuracy retention vs sparsity ({len(d)} checkpoints)", fontsize=10)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_trajectory(ok: pd.DataFrame, libs: list[str], corr_step: dict[str, dict[str, Any]], path: Path) -> str:
    """IIS, acc_std and (when the checkpoints carry it) the model's own test accuracy against training step."""
    fig, axes = _panels(len(libs), width=6.8)
    for ax, lib in zip(axes, libs):
        d = ok[ok["library"] == lib].sort_values("step")
        ax.plot(d["step"], d["iis"], color="tab:red", marker="o", ms=3, lw=1.2, label="IIS")
        bars = iis_bars(d)
        if bars is not None:
            ax.errorbar(d["step"], d["iis"], yerr=bars[0], fmt="none", ecolor="tab:red", elinewidth=0.8, capsize=2,
                        alpha=0.6, label=f"IIS {bars[1]}")
        ax.set_xlabel("training step")
        ax.set_ylabel("IIS", color="tab:red")
        ax2 = ax.twinx()
        ax2.plot(d["step"], d["acc_std"], color="tab:blue", marker="s", ms=3, lw=1.2, label="acc_std (probe)")
        if "meta.test_acc" in d and d["meta.test_acc"].notna().any():
            ax2.plot(d["step"], d["meta.test_acc"], color="tab:green", lw=1.2, ls="--", label="model test accuracy")
        ax2.set_ylabel("accuracy", color="tab:blue")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=9)
        cs = corr_step.get(lib)
        ax.set_title(f"{lib}: IIS and accuracy over training"
                     + (f" (Spearman ρ(IIS, step)={cs['spearman']:.2f})" if cs else ""), fontsize=10)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _problem_lines(ok: pd.DataFrame, failed: pd.DataFrame) -> list[str]:
    """Console lines for rows with warnings (e.g. acc_std at chance: that row's IIS measures nothing) and
    failed rows, one line each."""
    lines: list[str] = []
    warned = ok[ok["warnings"].fillna("").astype(str) != ""] if "warnings" in ok.columns else ok.iloc[:0]
    if not warned.empty:
        lines.append(f"warnings ({len(warned)}):")
        lines += [f"  {os.path.basename(str(p))}: {str(w).splitlines()[0]}"
                  for p, w in zip(warned["path"], warned["warnings"])]
    if not failed.empty:
        lines.append(f"failed ({len(failed)}):")
        lines += [f"  {os.path.basename(str(p))}: {str(e).splitlines()[0] if e else ''}"
                  for p, e in zip(failed["path"], failed["error"])]
    return lines


def _html(db: Path, ok: pd.DataFrame, failed: pd.DataFrame, rep: Report) -> str:
    """report.html: the correlations, the plots, the table and the failures."""
    parts = [f"<html><head><meta charset='utf-8'><title>IIS sweep report: {html.escape(db.name)}</title>"
             "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right} img{max-width:100%}</style></head><body>",
             f"<h1>IIS sweep: {html.escape(str(db))}</h1><p>{len(ok)} ok, {len(failed)} failed</p>"]
    for lib, c in rep.correlation.items():
        parts.append(f"<p><b>{html.escape(lib)}</b>, IIS vs acc_std: {html.escape(_fmt_corr(c))}</p>")
    for lib, c in rep.correlation_step.items():
        parts.append(f"<p><b>{html.escape(lib)}</b>, IIS vs training step: {html.escape(_fmt_corr(c))}</p>")
    for key in ("iis_vs_acc", "arr_curves", "trajectory", "trajectory_attribution", "gridpg_vs_iis"):
        if key in rep.files:
            parts.append(f"<p><img src='{Path(rep.files[key]).name}'></p>")
    from .report_attribution import attribution_html
    parts.append(attribution_html(rep.attribution))
    if not ok.empty:
        parts.append(_short(ok).to_html(index=False, float_format=lambda v: f"{v:.4f}"))
    if not failed.empty:
        parts.append("<h2>Failed</h2>" + failed[["path", "library", "error"]].to_html(index=False))
    parts.append("</body></html>")
    return "\n".join(parts)
