"""How much IIS would move (docs/spec.md §1.10): the best-epoch and best-lr selection of one grid, and the three
error bars around it.

- *seeds*: R independent grids (own head initialisation and batch order; same features, concepts and splits),
  summarised by mean, standard deviation and a Student-t confidence interval of the mean, for IIS and per sparsity;
- *evaluation samples*: a bootstrap over the evaluation split of the selected heads' per-sample correctness (the
  heads, epochs and lrs stay fixed; nothing is retrained);
- *selection*: the IIS when epoch and lr are chosen on a held-out part of TRAIN instead of the reported split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .backends.common import best_epoch_choice


@dataclass
class Selection:
    """One grid's choice: best epoch on the selection set, lr with the best selection accuracy at its best epoch,
    and the reported set's accuracies there (docs/spec.md §1.5)."""

    best_p: np.ndarray          # [L] best epoch of every probe
    best_h: np.ndarray          # [S, L] best epoch of every concept head
    rep_p: np.ndarray           # [L] reported accuracy of every probe at its best epoch
    rep_h: np.ndarray           # [S, L]
    lr_p: int                   # index of the chosen probe lr
    lr_h: np.ndarray            # [S] index of the chosen lr per sparsity

    @property
    def acc_std(self) -> float:
        return float(self.rep_p[self.lr_p])

    @property
    def acc(self) -> list[float]:
        return [float(v) for v in self.rep_h[np.arange(len(self.lr_h)), self.lr_h]]


def select(probe_acc: np.ndarray, head_acc: np.ndarray, sel: int = 0, rep: int = -1) -> Selection:
    """Epoch (first maximum) and lr (first maximum at the best epoch) chosen on evaluation set ``sel``, accuracies
    read on set ``rep``. probe_acc [n_sets, L, epochs], head_acc [n_sets, S, L, epochs]. With sel == rep this is
    the official choice: acc_s = max over lr of the best-epoch accuracy."""
    best_p, sel_p = best_epoch_choice(probe_acc[sel])
    best_h, sel_h = best_epoch_choice(head_acc[sel])
    rep_p = np.take_along_axis(probe_acc[rep], best_p[:, None], -1)[:, 0]
    rep_h = np.take_along_axis(head_acc[rep], best_h[..., None], -1)[..., 0]
    return Selection(best_p, best_h, rep_p, rep_h, int(sel_p.argmax()), sel_h.argmax(axis=1))


def iis_of(sparsities: Sequence[float], acc_std: float, acc: Sequence[float]) -> float:
    """IIS of one grid's accuracies (docs/spec.md §1.6)."""
    from .result import iis_from_curve
    return iis_from_curve(sparsities, [a / acc_std if acc_std > 0 else 0.0 for a in acc])


def _t_interval(values: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, standard deviation (ddof 1) and the Student-t interval of the mean along axis 0."""
    from scipy import stats
    mean, sd = values.mean(0), values.std(0, ddof=1)
    half = stats.t.ppf(0.5 + level / 2, df=len(values) - 1) * sd / np.sqrt(len(values))
    return mean, sd, mean - half, mean + half


def seed_summary(seeds: Sequence[int], sparsities: Sequence[float], sels: Sequence[Selection],
                 level: float) -> dict[str, Any]:
    """Per-repeat IIS, acc_std, acc_s and ARR_s, and (R >= 2) their mean, sd and t-interval over the repeats."""
    acc_std = np.array([s.acc_std for s in sels])
    acc = np.array([s.acc for s in sels])                                         # [R, S]
    arr = np.where(acc_std[:, None] > 0, acc / np.where(acc_std > 0, acc_std, 1)[:, None], 0.0)
    iis = np.array([iis_of(sparsities, s.acc_std, s.acc) for s in sels])
    out: dict[str, Any] = {"repeats": len(sels), "seeds": [int(s) for s in seeds], "level": level,
                           "iis_repeats": iis.tolist(), "acc_std_repeats": acc_std.tolist(),
                           "acc_repeats": acc.tolist(), "arr_repeats": arr.tolist()}
    if len(sels) >= 2:
        for name, v in (("iis", iis), ("acc_std", acc_std), ("acc", acc), ("arr", arr)):
            _, sd, lo, hi = _t_interval(v, level)
            out[f"{name}_sd"] = sd.tolist()
            out[f"{name}_ci"] = [lo.tolist(), hi.tolist()]
    return out


def bootstrap_iis(correct_p: np.ndarray, correct_h: np.ndarray, sparsities: Sequence[float], resamples: int,
                  level: float, seed: int) -> dict[str, Any]:
    """Percentile bootstrap over evaluation samples of the mean IIS of R grids.

    correct_p [R, N] and correct_h [R, S, N]: per-sample correctness of each grid's selected probe and concept
    heads. Every resample draws N samples with replacement, the same draw for every head and repeat (the heads
    were evaluated on the same samples), and recomputes acc_std, acc_s, ARR and IIS; selection stays fixed.
    """
    from scipy import stats
    r, s, n = correct_h.shape
    data = tuple(np.asarray(c, dtype=np.float32) for c in (*correct_p, *correct_h.reshape(r * s, n)))
    s_arr = np.asarray(sparsities, dtype=np.float64)
    order = np.argsort(s_arr)
    widths = np.diff(s_arr[order])

    def statistic(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        means = np.stack([x.mean(axis=axis) for x in samples]).astype(np.float64)   # [R + R*S, batch...]
        p = means[:r]
        h = means[r:].reshape(r, s, *means.shape[1:])[:, order]
        arr = h / np.where(p > 0, p, np.inf)[:, None]
        iis = (widths.reshape(1, -1, *([1] * (arr.ndim - 2))) * (arr[:, 1:] + arr[:, :-1]) / 2).sum(1) \
            if s > 1 else np.zeros_like(arr[:, 0])
        return iis.mean(0)

    batch = max(1, int(2e7 // max(1, len(data) * n)))       # ~80 MB of resampled float32 at a time
    res = stats.bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=resamples,
                          confidence_level=level, method="percentile", batch=batch,
                          random_state=np.random.default_rng(seed))
    point = float(statistic(*[d[None] for d in data])[0])
    return {"resamples": int(resamples), "level": level, "n_eval": int(n), "iis": point,
            "iis_sd": float(res.standard_error),
            "iis_ci": [float(res.confidence_interval.low), float(res.confidence_interval.high)]}


def selected_correct(correct_p: np.ndarray, correct_h: np.ndarray, sels: Sequence[Selection]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The selected heads' rows of a repeated output's per-sample correctness: [R, N] and [R, S, N]."""
    cp = np.stack([correct_p[r, s.lr_p] for r, s in enumerate(sels)])
    ch = np.stack([correct_h[r, np.arange(len(s.lr_h)), s.lr_h] for r, s in enumerate(sels)])
    return cp, ch


def holdout_summary(sparsities: Sequence[float], probe_acc: np.ndarray, head_acc: np.ndarray,
                    fraction: float) -> dict[str, Any]:
    """A training on TRAIN minus a held-out part, evaluated on [held-out, eval] (leading repeat axis): the IIS with
    epoch and lr chosen on the held-out part, and, from the same training, chosen on the evaluation split."""
    hold = [select(p, h, sel=0, rep=-1) for p, h in zip(probe_acc, head_acc)]
    peek = [select(p, h, sel=-1, rep=-1) for p, h in zip(probe_acc, head_acc)]
    iis_h = [iis_of(sparsities, s.acc_std, s.acc) for s in hold]
    iis_e = [iis_of(sparsities, s.acc_std, s.acc) for s in peek]
    return {"fraction": fraction, "iis": float(np.mean(iis_h)), "iis_repeats": iis_h,
            "acc_std": float(np.mean([s.acc_std for s in hold])),
            "acc": np.mean([s.acc for s in hold], axis=0).tolist(),
            "iis_eval_selection": float(np.mean(iis_e)), "iis_eval_selection_repeats": iis_e,
            "optimism": float(np.mean(iis_e) - np.mean(iis_h))}


def summarize(out: Any, check: Any, spec: Any, cfg: Any) -> tuple[dict[str, Any], list[Selection]]:
    """Every grid's selection and the ``IISResult.uncertainty`` record of a training (``out``, a
    :class:`~iis_fast.backends.common.GridOutput`) and of its optional selection check (``check``: the same grids
    trained on TRAIN minus a held-out part, evaluated on [held-out, eval])."""
    def repeated(a: np.ndarray | None) -> np.ndarray | None:     # every array with its leading repeat axis
        return a if a is None or spec.seeds is not None else a[None]
    pa, ha = repeated(out.probe_acc), repeated(out.head_acc)
    sels = [select(p, h) for p, h in zip(pa, ha)]
    unc = seed_summary(spec.grid_seeds(), cfg.sparsities, sels, cfg.confidence)
    cp, ch = repeated(out.correct_probe), repeated(out.correct_head)
    if cfg.bootstrap and cp is not None and ch is not None:
        sp, sh = selected_correct(cp, ch, sels)
        boot = bootstrap_iis(sp, sh, cfg.sparsities, cfg.bootstrap, cfg.confidence, cfg.seed)
        # the fused backends count in their kernels, the per-sample record is recomputed in torch: say how far apart
        boot["recount_max_diff"] = float(max(np.abs(sp.mean(-1) - unc["acc_std_repeats"]).max(),
                                             np.abs(sh.mean(-1) - np.asarray(unc["acc_repeats"])).max()))
        unc["bootstrap"] = boot
    if cfg.selection == "holdout":
        unc["selection"] = holdout_summary(cfg.sparsities, pa, ha, cfg.selection_fraction)
    elif check is not None:
        unc["selection"] = holdout_summary(cfg.sparsities, repeated(check.probe_acc), repeated(check.head_acc),
                                           cfg.selection_fraction)
    return unc, sels
