"""What every trainer shares, so that all backends train the same heads from the same start (docs/spec.md §1.3-1.5).

A *grid* is the set of heads of docs/spec.md §1.5: for every lr, one standard probe (Linear D->K on x) and, for every sparsity s,
one concept head (a = x·Cᵀ -> LayerNorm(M) with affine -> keep |z| > (k+1)-th smallest |z| -> Linear M->K).
Backends differ only in how they compute; they share initialisation, batch order and learning-rate schedule.
"""
from __future__ import annotations

import dataclasses
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
    #: Repeats: train one grid per seed (own init and batch order, same features); None: the one grid of ``seed``.
    #: A trainer given seeds returns every array of :class:`GridOutput` with a leading repeat axis.
    seeds: tuple[int, ...] | None = None

    def grid_seeds(self) -> tuple[int, ...]:
        """The seed of every grid this spec trains: ``seeds``, or ``(seed,)`` for a single grid."""
        return tuple(self.seeds) if self.seeds is not None else (int(self.seed),)

    def single(self, seed: int) -> "GridSpec":
        """The one-grid spec of ``seed`` (what repeat ``seed`` of a repeated spec trains)."""
        return dataclasses.replace(self, seed=int(seed), seeds=None)

    def ks(self, num_concepts: int) -> list[int]:
        """Threshold rank k = int(M*s) per sparsity."""
        return [threshold_rank(num_concepts, s) for s in self.sparsities]


@dataclass
class GridOutput:
    """Top-1 accuracy of every head after every epoch, on every evaluation set.

    probe_acc: [n_sets, n_lr, epochs]; head_acc: [n_sets, n_sparsity, n_lr, epochs]. correct_probe [n_lr, N] and
    correct_head [n_sparsity, n_lr, N]: per-sample correctness on the LAST evaluation set of every head at its best
    epoch on the FIRST set (first maximum), for the evaluation-sample bootstrap; None where a backend cannot tell.
    With ``GridSpec.seeds``, every array has a leading repeat axis.
    """

    probe_acc: np.ndarray
    head_acc: np.ndarray
    backend: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    correct_probe: np.ndarray | None = None
    correct_head: np.ndarray | None = None


def repeat_seeds(seed: int, repeats: int) -> tuple[int, ...]:
    """The grid seeds of ``repeats`` independent grids: ``seed`` first (so one repeat is today's grid), then seeds
    drawn from numpy's SeedSequence of (seed, r), so the repeats of nearby seeds do not share grids."""
    seeds = [int(seed)] + [int(np.random.SeedSequence((int(seed), r)).generate_state(1, np.uint32)[0])
                           for r in range(1, int(repeats))]
    if len(set(seeds)) != len(seeds):           # 2^-32 per pair; never train two copies of one grid silently
        raise RuntimeError(f"repeat seeds of seed {seed} collide: {seeds}")
    return tuple(seeds)


def stack_outputs(outputs: Sequence[GridOutput], backend: str) -> GridOutput:
    """One repeated :class:`GridOutput` (leading repeat axis) from the single-grid outputs of its repeats."""
    def stacked(name: str):
        arrays = [getattr(o, name) for o in outputs]
        return None if any(a is None for a in arrays) else np.stack(arrays)
    timings: dict[str, float] = {}
    for o in outputs:
        for k, v in o.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    return GridOutput(stacked("probe_acc"), stacked("head_acc"), backend=backend, timings=timings,
                      correct_probe=stacked("correct_probe"), correct_head=stacked("correct_head"))


class BestSnapshot:
    """Every head's parameters at its best epoch so far on evaluation set 0 (first maximum), in GridParams layout
    (probes: the first axis of wp, bp; concept heads: the first axis of w, b, gamma, beta).

    The fused backends count correct predictions in their kernels; this keeps what is needed to recompute, after
    training, the per-sample correctness of the selected heads (:func:`iis_fast.backends.torch.selected_correct`).
    """

    PROBE = ("wp", "bp")

    def __init__(self, params: Callable[[], dict[str, torch.Tensor]]):
        self.params = params
        self.best: dict[str, torch.Tensor] | None = None
        self.acc_p: np.ndarray | None = None
        self.acc_h: np.ndarray | None = None

    def update(self, acc_p: np.ndarray, acc_h: np.ndarray) -> None:
        """After an epoch: take the heads whose set-0 accuracy beats their best so far (strictly)."""
        cur = self.params()
        acc_p, acc_h = np.asarray(acc_p, dtype=float).reshape(-1), np.asarray(acc_h, dtype=float).reshape(-1)
        if self.best is None:
            self.best = {n: t.detach().clone() for n, t in cur.items()}
            self.acc_p, self.acc_h = acc_p.copy(), acc_h.copy()
            return
        up_p, up_h = acc_p > self.acc_p, acc_h > self.acc_h
        for n, t in cur.items():
            up = up_p if n in self.PROBE else up_h
            if up.any():
                rows = torch.from_numpy(np.flatnonzero(up)).to(t.device)
                self.best[n][rows] = t.detach()[rows].to(self.best[n].dtype)
        self.acc_p, self.acc_h = np.maximum(self.acc_p, acc_p), np.maximum(self.acc_h, acc_h)


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


def grid_orders(n: int, spec: GridSpec) -> Iterator[torch.Tensor]:
    """Each epoch's order: [n] for one grid (``epoch_orders`` of ``seed``), [R, n] with ``spec.seeds`` (row r is
    the order of grid r's own seed, so repeat r sees the batches a single grid of that seed sees)."""
    if spec.seeds is None:
        yield from epoch_orders(n, spec.epochs, spec.seed)
        return
    for orders in zip(*(epoch_orders(n, spec.epochs, s) for s in spec.seeds)):
        yield torch.stack(orders)


def train_epochs(n: int, spec: GridSpec, n_sets: int, step: Callable[[Any, float], None],
                 evaluate: Callable[[int], tuple[Any, Any]], *, progress=None,
                 prepare_order: Callable[[torch.Tensor], Any] = lambda order: order,
                 sync: Callable[[], None] | None = None, snapshot: BestSnapshot | None = None
                 ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The epoch loop every batched backend shares (docs/spec.md §1.5): shuffled batches, lr x lr_decay^epoch, then the
    accuracy of every head on every evaluation set after each epoch.

    Args:
        n: training rows.
        step: ``step(idx, lr_scale)`` trains every head of the grid on the rows ``idx`` (one batch; with
            ``spec.seeds``, idx is [R, batch]: row r for the heads of repeat r).
        evaluate: ``evaluate(j)`` returns (probe accuracies ``[n_lr]``, head accuracies ``[n_s * n_lr]``, sparsity
            major) on evaluation set j; with ``spec.seeds``, ``[R * n_lr]`` and ``[R * n_s * n_lr]``, repeat major.
        progress: optional, ``progress.update(heads)`` after each epoch (a tqdm bar counting head-epochs).
        prepare_order: applied once per epoch to the shuffled order before slicing batches (e.g. move it to the
            device, or to numpy).
        sync: called before reading the clock (``torch.cuda.synchronize`` on a GPU), so timings are honest.
        snapshot: optional, updated with the set-0 accuracies after every epoch (keeps the best-epoch heads).

    Returns:
        probe_acc ``[n_sets, n_lr, epochs]``, head_acc ``[n_sets, n_s, n_lr, epochs]`` (with ``spec.seeds``: a
        leading repeat axis) and the seconds spent in training steps and in evaluation (``{"train", "eval"}``).
    """
    n_s, n_lr, n_r = len(spec.sparsities), len(spec.lrs), len(spec.grid_seeds())
    probe_acc = np.zeros((n_r, n_sets, n_lr, spec.epochs))
    head_acc = np.zeros((n_r, n_sets, n_s, n_lr, spec.epochs))
    t_train = t_eval = 0.0
    for epoch, order in enumerate(grid_orders(n, spec)):
        lr_scale = spec.lr_decay ** epoch
        t0 = time.perf_counter()
        order = prepare_order(order)
        for i in range(0, n, spec.batch_size):
            step(order[..., i:i + spec.batch_size], lr_scale)
        if sync is not None:
            sync()
        t1 = time.perf_counter()
        for j in range(n_sets):
            pa, ha = evaluate(j)
            probe_acc[:, j, :, epoch] = np.asarray(pa).reshape(n_r, n_lr)
            head_acc[:, j, :, :, epoch] = np.asarray(ha).reshape(n_r, n_s, n_lr)
            if j == 0 and snapshot is not None:
                snapshot.update(pa, ha)
        if sync is not None:
            sync()
        t_train += t1 - t0
        t_eval += time.perf_counter() - t1
        if progress is not None:
            progress.update(n_r * n_lr * (1 + n_s))
    if spec.seeds is None:
        probe_acc, head_acc = probe_acc[0], head_acc[0]
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
