"""The result of one IIS measurement (docs/spec.md §1.6) and the score itself."""
from __future__ import annotations

import json
import warnings as _warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np


def iis_from_curve(sparsities: Sequence[float], arr: Sequence[float]) -> float:
    """Trapezoid area under ARR(s) over the sorted grid, not normalised by the grid's range (docs/spec.md §1.6)."""
    order = np.argsort(np.asarray(sparsities, dtype=np.float64))
    s = np.asarray(sparsities, dtype=np.float64)[order]
    a = np.asarray(arr, dtype=np.float64)[order]
    return float(np.sum((s[1:] - s[:-1]) * (a[1:] + a[:-1]) / 2.0))


#: acc_std within this many accuracy points of chance level makes IIS meaningless (see :func:`chance_warning`).
CHANCE_MARGIN = 0.05


def chance_warning(acc_std: float, iis: float, eval_labels: np.ndarray, num_classes: int) -> str | None:
    """The warning for a standard probe at chance level, or None.

    Chance is the better of uniform guessing (1/K) and always answering the eval set's majority class. A probe
    within :data:`CHANCE_MARGIN` of it learned nothing (constant features, a diverged learning rate, too few
    epochs): every sparse head is then just as bad, every ARR is about 1 and IIS is the width of the sparsity
    grid, whatever the representation.
    """
    counts = np.bincount(np.asarray(eval_labels, dtype=np.int64).reshape(-1), minlength=num_classes)
    chance = max(1.0 / num_classes, float(counts.max()) / max(1, int(counts.sum())))
    if acc_std > chance + CHANCE_MARGIN:
        return None
    return (f"acc_std = {acc_std:.4f} is at chance level ({chance:.4f} for {num_classes} classes, margin "
            f"{CHANCE_MARGIN:g}): the standard probe learned nothing (constant or degenerate features, a diverged "
            f"learning rate, too few epochs), so every ARR is about 1 and IIS = {iis:.4f} does not measure "
            "interpretability")


def warn_all(messages: Sequence[str], stacklevel: int = 3) -> None:
    """Emit each message as an :class:`~iis_fast.errors.IISWarning`."""
    from .errors import IISWarning
    for m in messages:
        _warnings.warn(m, IISWarning, stacklevel=stacklevel)


@dataclass
class IISResult:
    """Everything one IIS run reports: the score, its ingredients, the config and where time went."""

    iis: float
    acc_std: float
    sparsities: list[float]
    acc: list[float]                      # acc_s per sparsity (max over lr of best-epoch accuracy)
    arr: list[float]                      # acc_s / acc_std
    lrs: list[float]
    acc_std_per_lr: list[float]           # best-epoch probe accuracy per lr
    acc_per_lr: list[list[float]]         # [sparsity][lr] best-epoch accuracy
    best_epoch_std: list[int]             # per lr (0-based)
    best_epoch: list[list[int]]           # [sparsity][lr]
    num_concepts: int
    library: str
    seed: int
    backend: str
    eval_split: str                       # where the reported accuracies were measured
    selection_split: str                  # where the best epoch was chosen
    n_train: int
    n_eval: int
    num_classes: int
    feature_dim: int
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    model: str = ""
    warnings: list[str] = field(default_factory=list)   # why the numbers may not mean what they seem (empty: none)
    # error bars (docs/spec.md §1.10, iis_fast.uncertainty): per-repeat values and, with repeats >= 2, their sd and
    # interval ("iis_sd", "iis_ci", per sparsity "acc_ci", "arr_ci"); "bootstrap" (evaluation samples) and
    # "selection" (epoch and lr chosen on a held-out part of TRAIN) when computed
    uncertainty: dict[str, Any] = field(default_factory=dict)
    # score(..., keep_heads=True): the trained probe and concept heads (iis_fast.applications.kept_heads.KeptHeads);
    # not part of to_dict / JSON: save_heads / load_heads write and read them
    heads: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, heads=None))
        d.pop("heads")
        return d

    def save_heads(self, path: str) -> None:
        """Write the kept heads (``keep_heads=True``) to a ``.safetensors`` file."""
        from .errors import IISInputError
        if self.heads is None:
            raise IISInputError("this result kept no heads: score with keep_heads=True")
        self.heads.save(path)

    @staticmethod
    def load_heads(path: str) -> Any:
        """The :class:`~iis_fast.applications.kept_heads.KeptHeads` of a file written by :meth:`save_heads`."""
        from .applications.kept_heads import KeptHeads
        return KeptHeads.load(path)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IISResult":
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "IISResult":
        return cls.from_dict(json.loads(s))

    def __repr__(self) -> str:
        curve = ", ".join(f"{s:g}:{a:.3f}" for s, a in zip(self.sparsities, self.arr))
        t = sum(self.timings.values())
        name = f"{self.model} " if self.model else ""
        u = self.uncertainty or {}
        bars = "".join([f" ±{(u['iis_ci'][1] - u['iis_ci'][0]) / 2:.4f} (R={u['repeats']})" if "iis_ci" in u else "",
                        " bootstrap [{:.4f}, {:.4f}]".format(*u["bootstrap"]["iis_ci"]) if "bootstrap" in u else "",
                        f" held-out selection {u['selection']['iis']:.4f}" if "selection" in u else ""])
        return (f"IISResult({name}IIS={self.iis:.4f}{bars}, acc_std={self.acc_std:.4f}, library={self.library}, "
                f"M={self.num_concepts}, backend={self.backend}, n_train={self.n_train}, n_eval={self.n_eval}, "
                f"ARR=[{curve}], {t:.1f}s)" + "".join(f"\nWARNING: {w}" for w in self.warnings))
