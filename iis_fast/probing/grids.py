"""GridPG grids (docs/spec.md §2.3): g x g tilings of distinct-class images that every given model classifies
correctly and confidently (softmax probability of the label >= 0.95), seeded."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import IISInputError
from .attribution import as_probed, frozen_eval

__all__ = ["GridSet", "confident_mask", "make_grids", "tile"]


@dataclass
class GridSet:
    """Grid images and what is in each cell.

    Attributes:
        images: ``[N, 3, g*h, g*w]`` grid images.
        cell_labels: ``[N, g*g]`` class in each cell, row-major (distinct within a grid).
        source_indices: ``[N, g*g]`` index of each cell's image in the pool passed to :func:`make_grids`.
        grid_size: g.
    """

    images: torch.Tensor
    cell_labels: torch.Tensor
    source_indices: torch.Tensor
    grid_size: int

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def cells(self) -> torch.Tensor:
        """``[N, g*g]`` the target cell of each map when the targets are ``cell_labels`` (0..g*g-1 per row)."""
        return torch.arange(self.grid_size ** 2).expand(len(self), -1).clone()


@torch.no_grad()
def confident_mask(models: nn.Module | Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor,
                   threshold: float = 0.95, batch_size: int = 128) -> torch.Tensor:
    """Bool ``[N]``: images every model classifies correctly with softmax probability >= ``threshold``."""
    ms = [models] if isinstance(models, nn.Module) else list(models)
    ok = torch.ones(images.shape[0], dtype=torch.bool)
    y = torch.as_tensor(labels).long()
    for m in ms:
        pm = as_probed(m)
        with frozen_eval(pm):
            probs = torch.cat([pm(images[i:i + batch_size]).softmax(-1) for i in range(0, images.shape[0], batch_size)])
        ok &= (probs.argmax(-1) == y) & (probs.gather(1, y[:, None])[:, 0] >= threshold)
    return ok


def tile(cells: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Tile ``[g*g, 3, h, w]`` images row-major into one ``[3, g*h, g*w]`` image."""
    g = grid_size
    c, h, w = cells.shape[1:]
    return cells.view(g, g, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, g * h, g * w)


def make_grids(images: torch.Tensor, labels: torch.Tensor | Sequence[int], n_grids: int, grid_size: int = 3,
               seed: int = 0, models: nn.Module | Sequence[nn.Module] | None = None,
               threshold: float = 0.95) -> GridSet:
    """Build ``n_grids`` grids of ``grid_size`` x ``grid_size`` images of distinct classes.

    Candidates are the images that every model in ``models`` classifies correctly with probability >=
    ``threshold`` (all images when ``models`` is None). For each grid, g*g distinct classes are drawn at random
    (``numpy.random.default_rng(seed)``), then one candidate image of each, placed in random cells.

    Raises:
        IISInputError: fewer than g*g classes have a confident candidate.
    """
    x = torch.as_tensor(images)
    y = torch.as_tensor(labels).long()
    if x.dim() != 4 or y.shape != (x.shape[0],):
        raise IISInputError(f"images must be [N, 3, h, w] and labels [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    if grid_size < 1 or n_grids < 1:
        raise IISInputError(f"grid_size and n_grids must be >= 1, got {grid_size}, {n_grids}")
    ok = confident_mask(models, x, y, threshold) if models is not None else torch.ones(len(y), dtype=torch.bool)
    cand = {int(c): np.flatnonzero((ok & (y == c)).numpy()) for c in torch.unique(y[ok]).tolist()}
    k = grid_size * grid_size
    if len(cand) < k:
        raise IISInputError(
            f"a {grid_size}x{grid_size} grid needs {k} classes with a confidently (p >= {threshold}) and correctly "
            f"classified image; only {len(cand)} classes have one among {len(y)} images ({int(ok.sum())} "
            "confident). Pass more images, a smaller grid_size or a lower threshold")
    rng = np.random.default_rng(seed)
    classes = np.array(sorted(cand))
    src = np.empty((n_grids, k), dtype=np.int64)
    for n in range(n_grids):
        for j, c in enumerate(rng.choice(classes, size=k, replace=False)):
            src[n, j] = rng.choice(cand[int(c)])
    src_t = torch.from_numpy(src)
    grid_images = torch.stack([tile(x[s], grid_size) for s in src_t])
    return GridSet(grid_images, y[src_t], src_t, grid_size)
