"""What every trainer shares, so that all backends train the same heads from the same start (SPEC §1.3-1.5).

A *grid* is the SPEC's set of heads: for every lr, one standard probe (Linear D->K on x) and, for every sparsity s,
one concept head (a = x·Cᵀ -> LayerNorm(M) with affine -> keep |z| > (k+1)-th smallest |z| -> Linear M->K).
Backends differ only in how they compute; they share initialisation, batch order and learning-rate schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from ..config import threshold_rank

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
LN_EPS = 1e-5
INIT_STD = 0.02


@dataclass
class GridSpec:
    """The training recipe of one grid (SPEC §1.5)."""

    num_classes: int
    sparsities: Sequence[float]
    lrs: Sequence[float]
    epochs: int = 30
    batch_size: int = 1024
    lr_decay: float = 0.99
    seed: int = 0

    def ks(self, num_concepts: int) -> list[int]:
        """Threshold rank k = int(M*s) per sparsity."""
        return [threshold_rank(num_concepts, s) for s in self.sparsities]


@dataclass
class GridOutput:
    """Top-1 accuracy of every head after every epoch, on every evaluation set.

    probe_acc: [n_sets, n_lr, epochs]; head_acc: [n_sets, n_sparsity, n_lr, epochs].
    """

    probe_acc: np.ndarray
    head_acc: np.ndarray
    backend: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def init_linear(in_dim: int, out_dim: int, seed: int, uid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights trunc-normal(std 0.02) and zero bias of head `uid`, in nn.Linear layout ([out, in], [out]).

    The same (seed, uid) gives the same tensors in every backend; uid 0 is the standard probe, 1+j the head of
    the j-th sparsity (every lr of one head starts from the same weights).
    """
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(uid))
    w = torch.empty(out_dim, in_dim)
    torch.nn.init.trunc_normal_(w, mean=0.0, std=INIT_STD, generator=g)
    return w, torch.zeros(out_dim)


def epoch_orders(n: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    """The shuffled sample order of each epoch; every head of a grid sees the same batches."""
    g = torch.Generator().manual_seed(int(seed))
    for _ in range(epochs):
        yield torch.randperm(n, generator=g)


def sparse_mask(z: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the entries whose |z| is strictly greater than the (k+1)-th smallest |z| of their row."""
    az = z.abs()
    thr = az.kthvalue(k + 1, dim=-1, keepdim=True).values
    return az > thr


def best_epoch_choice(acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best epoch (first maximum) along the last axis, and the accuracy there."""
    best = acc.argmax(axis=-1)
    return best, np.take_along_axis(acc, best[..., None], axis=-1)[..., 0]
