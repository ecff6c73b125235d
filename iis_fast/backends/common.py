"""What every trainer shares, so that all backends train the same heads from the same start (docs/spec.md §1.3-1.5).

A *grid* is the set of heads of docs/spec.md §1.5: for every lr, one standard probe (Linear D->K on x) and, for every sparsity s,
one concept head (a = x·Cᵀ -> LayerNorm(M) with affine -> keep |z| > (k+1)-th smallest |z| -> Linear M->K).
Backends differ only in how they compute; they share initialisation, batch order and learning-rate schedule.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..config import threshold_rank

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
LN_EPS = 1e-5
INIT_STD = 0.02


@dataclass
class AssignmentSpec:
    """end2end (docs/spec.md §1.2): every concept head learns its own assignment of E elements to M concepts.

    A grid with an assignment gets the element matrix E [E, D] (unit rows) where other grids get C [M, D].
    """

    num_concepts: int                   # M
    tau: float = 0.1                    # softmax(LN(q) / tau + gumbel), as the official code scales it
    stochastic_eval: bool = False       # official: fresh noise for every evaluation batch; default: argmax of LN(q)


@dataclass
class GridSpec:
    """The training recipe of one grid (docs/spec.md §1.5)."""

    num_classes: int
    sparsities: Sequence[float]
    lrs: Sequence[float]
    epochs: int = 30
    batch_size: int = 1024
    lr_decay: float = 0.99
    seed: int = 0
    assignment: AssignmentSpec | None = None    # end2end: per-head learned concepts (None: a fixed library)

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


def train_epochs(n: int, spec: GridSpec, n_sets: int, step: Callable[[Any, float], None],
                 evaluate: Callable[[int], tuple[Any, Any]], *, progress=None,
                 prepare_order: Callable[[torch.Tensor], Any] = lambda order: order,
                 sync: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The epoch loop every batched backend shares (docs/spec.md §1.5): shuffled batches, lr x lr_decay^epoch, then the
    accuracy of every head on every evaluation set after each epoch.

    Args:
        n: training rows.
        step: ``step(idx, lr_scale)`` trains every head of the grid on the rows ``idx`` (one batch).
        evaluate: ``evaluate(j)`` returns (probe accuracies ``[n_lr]``, head accuracies ``[n_s * n_lr]``, sparsity
            major) on evaluation set j.
        progress: optional, ``progress.update(heads)`` after each epoch (a tqdm bar counting head-epochs).
        prepare_order: applied once per epoch to the shuffled order before slicing batches (e.g. move it to the
            device, or to numpy).
        sync: called before reading the clock (``torch.cuda.synchronize`` on a GPU), so timings are honest.

    Returns:
        probe_acc ``[n_sets, n_lr, epochs]``, head_acc ``[n_sets, n_s, n_lr, epochs]`` and the seconds spent in
        training steps and in evaluation (``{"train": ..., "eval": ...}``).
    """
    n_s, n_lr = len(spec.sparsities), len(spec.lrs)
    probe_acc = np.zeros((n_sets, n_lr, spec.epochs))
    head_acc = np.zeros((n_sets, n_s, n_lr, spec.epochs))
    t_train = t_eval = 0.0
    for epoch, order in enumerate(epoch_orders(n, spec.epochs, spec.seed)):
        lr_scale = spec.lr_decay ** epoch
        t0 = time.perf_counter()
        order = prepare_order(order)
        for i in range(0, n, spec.batch_size):
            step(order[i:i + spec.batch_size], lr_scale)
        if sync is not None:
            sync()
        t1 = time.perf_counter()
        for j in range(n_sets):
            pa, ha = evaluate(j)
            probe_acc[j, :, epoch] = np.asarray(pa)
            head_acc[j, :, :, epoch] = np.asarray(ha).reshape(n_s, n_lr)
        if sync is not None:
            sync()
        t_train += t1 - t0
        t_eval += time.perf_counter() - t1
        if progress is not None:
            progress.update(n_lr * (1 + n_s))
    return probe_acc, head_acc, {"train": t_train, "eval": t_eval}


def sparse_mask(z: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the entries whose |z| is strictly greater than the (k+1)-th smallest |z| of their row."""
    az = z.abs()
    thr = az.kthvalue(k + 1, dim=-1, keepdim=True).values
    return az > thr


def best_epoch_choice(acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best epoch (first maximum) along the last axis, and the accuracy there."""
    best = acc.argmax(axis=-1)
    return best, np.take_along_axis(acc, best[..., None], axis=-1)[..., 0]
