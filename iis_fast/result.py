"""The result of one IIS measurement (docs/spec.md §1.6) and the score itself."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np


def iis_from_curve(sparsities: Sequence[float], arr: Sequence[float]) -> float:
    """Trapezoid area under ARR(s) over the sorted grid, not normalised by the grid's range (docs/spec.md §1.6)."""
    order = np.argsort(np.asarray(sparsities, dtype=np.float64))
    s = np.asarray(sparsities, dtype=np.float64)[order]
    a = np.asarray(arr, dtype=np.float64)[order]
    return float(np.sum((s[1:] - s[:-1]) * (a[1:] + a[:-1]) / 2.0))


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
        return (f"IISResult({name}IIS={self.iis:.4f}, acc_std={self.acc_std:.4f}, library={self.library}, "
                f"M={self.num_concepts}, backend={self.backend}, n_train={self.n_train}, n_eval={self.n_eval}, "
                f"ARR=[{curve}], {t:.1f}s)")
