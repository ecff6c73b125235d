"""Class-stratified index sampling: the three rules the package uses, each written once and named.

They differ on purpose (each result is pinned by tests and feeds published numbers), so they are three functions,
not one with flags:

- :func:`stratified_subset` (data subsets: Fashion-MNIST splits, probe pools): ``n`` indices, quota ``n // K``
  per class with the remainder to the first classes in label order, spilled to other classes when one runs out;
  nested in ``n`` for a seed; returned sorted.
- :func:`stratified_indices` (the prototype concept library, docs/spec.md §1.2): ``num`` items, quota
  ``num // K`` per class, the remainder handed out one at a time in a seeded random class order; returned grouped
  by class.
- :func:`stratified_split` (score()'s held-out evaluation and selection parts): per class ``round(fraction * n_c)``
  held out (at least 1 of a class of 2 or more), never a protected index; returns (kept, held out).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import IISInputError

__all__ = ["stratified_subset", "stratified_indices", "stratified_split"]


def stratified_subset(labels: Sequence[int] | np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` indices into ``labels``, as class-balanced as possible, drawn at random with ``seed``; sorted.

    Each class gets ``n // K`` (the first ``n % K`` classes in label order one more); a class with too few
    samples gives all it has and the rest is spread over the others. Deterministic for a given
    ``(labels, n, seed)``, and nested: for the same seed, a smaller ``n`` picks a subset of a larger one's
    per-class picks.

    Raises:
        IISInputError: ``n`` is not in ``1..len(labels)`` or ``labels`` is not 1-D.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise IISInputError(f"labels must be 1-D, got shape {y.shape}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= int(n) <= y.shape[0]:
        raise IISInputError(f"n must be an integer in 1..{y.shape[0]} (the number of labels), got {n!r}")
    n = int(n)
    classes, counts = np.unique(y, return_counts=True)
    quota = np.zeros_like(counts)
    remaining = n
    while remaining > 0:
        open_ = np.flatnonzero(quota < counts)
        share, extra = divmod(remaining, open_.size)
        for j, c in enumerate(open_):
            give = min(share + (1 if j < extra else 0), int(counts[c] - quota[c]))
            quota[c] += give
            remaining -= give
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picks)).astype(np.int64)


def stratified_indices(labels: torch.Tensor | np.ndarray, num: int, seed: int = 0) -> np.ndarray:
    """Indices of ``num`` items spread evenly over classes (deterministic for ``seed``).

    Every class gets min(its size, floor(num / #classes)); the leftover picks go one at a time to classes that
    still have items, visiting classes in a seeded random order. Within a class the items are a seeded random
    choice. The result is grouped by class (ascending class id), ascending within a class.
    """
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if num > lab.shape[0]:
        raise IISInputError(f"cannot pick {num} items from {lab.shape[0]}; lower num_concepts")
    rng = np.random.default_rng(seed)
    classes = np.unique(lab)
    members = [np.flatnonzero(lab == c) for c in classes]
    counts = np.array([len(m) for m in members])
    quotas = np.minimum(counts, num // len(classes))
    remaining = num - int(quotas.sum())
    order = rng.permutation(len(classes))
    while remaining > 0:
        for ci in order:
            if remaining == 0:
                break
            if quotas[ci] < counts[ci]:
                quotas[ci] += 1
                remaining -= 1
    picks = [np.sort(rng.choice(m, int(q), replace=False)) for m, q in zip(members, quotas)]
    return np.concatenate(picks).astype(np.int64)


def stratified_split(labels: np.ndarray, fraction: float, seed: int, protect: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: (kept indices, held-out indices), both sorted.

    Each class gives round(fraction * n_c) samples (at least 1 when it has 2 or more) chosen with `seed`;
    indices in `protect` (e.g. concept-source images) are never held out.
    """
    rng = np.random.default_rng(seed)
    protected = np.zeros(len(labels), dtype=bool)
    if protect is not None:
        protected[protect] = True
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero((labels == c) & ~protected)
        n_c = int((labels == c).sum())
        take = min(len(idx), max(1 if n_c >= 2 else 0, int(round(fraction * n_c))))
        if take:
            held.append(np.sort(rng.choice(idx, size=take, replace=False)))
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), held_idx)
    return keep, held_idx
