"""Attribution-quality metrics (docs/spec.md §2.3), on maps ``A`` with channels already summed, at
input resolution.

Order: smooth, then clip: ``S = smooth(A)``, ``P = max(S, 0)``. The smoothing follows the official evaluation
scripts (:func:`smoothing_for`):

- GridPG and EPG: a Gaussian (kernel 129, sigma 32.25, reflect padding; normalised to sum 1 as torchvision's
  ``gaussian_blur``; on maps smaller than 65 px the reflection is repeated, as ``numpy.pad(mode="reflect")``,
  where torchvision would raise) for the pixel-level gradient maps, Input×Gradient and Integrated Gradients;
  a 5x5 mean filter with zero padding that always divides by 25 (also at the border) for every other method.
  (The official GridPG script evaluates no IG maps; we use its EPG script's Gaussian for them.)
- entropy: always the 5x5 mean filter, for every method (Input×Gradient included).
- Gini: no smoothing.

Metrics:

- GridPG: P inside the target's cell / (P everywhere + 1e-12).
- EPG: P inside the target's boxes / (P everywhere + 1e-12).
- entropy (complexity): ``-Σ p log2 p`` with ``p = P / ΣP`` (``0 log 0 = 0``; an all-zero P gives 0).
- Gini (compactness) of ``max(A, 0)``, unsmoothed: ``Σ_i (2i - n - 1) v_(i) / (n Σ v)`` over ascending
  values (0 for an all-zero map). The official code adds 1e-7 to every value and 1e-10 inside the log; we do
  not.

Every smoothed metric takes ``smoothing=`` (``"gaussian"`` or ``"mean5"``) to override the rule.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import IISInputError

__all__ = [
    "GAUSSIAN_KERNEL",
    "GAUSSIAN_SIGMA",
    "SMOOTHINGS",
    "smoothing_for",
    "smooth",
    "positive",
    "mean_filter5",
    "gaussian_smooth",
    "grid_cell_masks",
    "grid_pointing_game",
    "energy_pointing_game",
    "boxes_to_mask",
    "entropy",
    "gini",
]

GAUSSIAN_KERNEL = 129
GAUSSIAN_SIGMA = 32.25
SMOOTHINGS: tuple[str, ...] = ("gaussian", "mean5")

# The official scripts smooth pixel-level gradient maps with the Gaussian for the localisation metrics only.
_GAUSSIAN_FOR: dict[str, frozenset[str]] = {"gridpg": frozenset({"ixg", "ig"}), "epg": frozenset({"ixg", "ig"}),
                                            "entropy": frozenset()}


def _as_maps(a: torch.Tensor, what: str = "maps") -> tuple[torch.Tensor, tuple[int, ...]]:
    a = torch.as_tensor(a)
    if a.dim() < 2:
        raise IISInputError(f"{what} must be [..., H, W] attribution maps (channels summed), got {tuple(a.shape)}")
    if not a.is_floating_point():
        a = a.float()
    lead = tuple(a.shape[:-2])
    return a.reshape(-1, 1, a.shape[-2], a.shape[-1]), lead


def mean_filter5(maps: torch.Tensor) -> torch.Tensor:
    """5x5 mean filter, zero padding 2, always divided by 25 (``avg_pool2d(5, 1, 2, count_include_pad=True)``)."""
    a, lead = _as_maps(maps)
    out = F.avg_pool2d(a, kernel_size=5, stride=1, padding=2, count_include_pad=True)
    return out.reshape(*lead, *out.shape[-2:])


@functools.lru_cache(maxsize=8)
def _gauss1d(ksize: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    half = (ksize - 1) * 0.5
    x = torch.linspace(-half, half, steps=ksize, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def _reflect_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-n axis reflect-padded by ``pad`` on both sides (numpy 'reflect', any pad width)."""
    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def gaussian_smooth(maps: torch.Tensor, ksize: int = GAUSSIAN_KERNEL, sigma: float = GAUSSIAN_SIGMA) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (torchvision ``gaussian_blur`` semantics)."""
    a, lead = _as_maps(maps)
    h, w = a.shape[-2:]
    k = _gauss1d(int(ksize), float(sigma), a.dtype).to(a.device)
    pad = ksize // 2
    a = a.index_select(-2, _reflect_index(h, pad, a.device)).index_select(-1, _reflect_index(w, pad, a.device))
    a = F.conv2d(a, k.view(1, 1, -1, 1))
    a = F.conv2d(a, k.view(1, 1, 1, -1))
    return a.reshape(*lead, h, w)


def smoothing_for(method: str = "", metric: str = "gridpg") -> str:
    """The official smoothing of ``method``'s maps for ``metric``: ``"gaussian"`` or ``"mean5"``.

    GridPG / EPG: the Gaussian for ``ixg`` and ``ig``, the 5x5 mean filter otherwise; entropy: always the mean
    filter.
    """
    if metric not in _GAUSSIAN_FOR:
        raise IISInputError(f"metric: smoothing is defined for {', '.join(_GAUSSIAN_FOR)}, got {metric!r}")
    return "gaussian" if method in _GAUSSIAN_FOR[metric] else "mean5"


def smooth(maps: torch.Tensor, method: str = "", metric: str = "gridpg", smoothing: str | None = None) -> torch.Tensor:
    """``maps`` smoothed as the official code does for ``method`` and ``metric`` (:func:`smoothing_for`), or
    with ``smoothing`` (``"gaussian"`` or ``"mean5"``) when given."""
    kind = smoothing_for(method, metric) if smoothing is None else smoothing
    if kind not in SMOOTHINGS:
        raise IISInputError(f"smoothing: use one of {', '.join(SMOOTHINGS)}, got {smoothing!r}")
    return gaussian_smooth(maps) if kind == "gaussian" else mean_filter5(maps)


def positive(maps: torch.Tensor, method: str = "", metric: str = "gridpg",
             smoothing: str | None = None) -> torch.Tensor:
    """``P = max(smooth(A), 0)``: smooth first, then clip."""
    return smooth(maps, method, metric, smoothing).clamp_min(0.0)


def grid_cell_masks(height: int, width: int, grid_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean masks ``[g*g, H, W]`` of the cells of a g x g grid, row-major; cell side ``H // g`` (as reference)."""
    ch, cw = height // grid_size, width // grid_size
    m = torch.zeros(grid_size * grid_size, height, width, dtype=torch.bool, device=device)
    for k in range(grid_size * grid_size):
        i, j = divmod(k, grid_size)
        m[k, i * ch:(i + 1) * ch, j * cw:(j + 1) * cw] = True
    return m


def grid_pointing_game(maps: torch.Tensor, cells: torch.Tensor | Sequence[int], grid_size: int,
                       method: str = "", smoothing: str | None = None) -> torch.Tensor:
    """GridPG score per map: positive smoothed attribution inside the target's cell over the total.

    Args:
        maps: ``[..., H, W]`` raw attribution maps (channels summed) of grid images.
        cells: the target cell (row-major index in ``0..g*g-1``) of each map, shape ``maps.shape[:-2]``.
        grid_size: g.
        method: the attribution method (selects the smoothing, see :func:`smoothing_for`).
        smoothing: ``"gaussian"`` or ``"mean5"`` instead of the official choice for ``method``.
    """
    p = positive(maps, method, "gridpg", smoothing)
    cells_t = torch.as_tensor(cells, dtype=torch.long, device=p.device)
    if tuple(cells_t.shape) != tuple(p.shape[:-2]):
        raise IISInputError(f"cells must have shape {tuple(p.shape[:-2])} (one per map), got {tuple(cells_t.shape)}")
    if cells_t.numel() and (cells_t.min() < 0 or cells_t.max() >= grid_size * grid_size):
        raise IISInputError(f"cells must lie in 0..{grid_size * grid_size - 1}")
    masks = grid_cell_masks(p.shape[-2], p.shape[-1], grid_size, p.device)[cells_t]
    return (p * masks).sum(dim=(-2, -1)) / (p.sum(dim=(-2, -1)) + 1e-12)


def boxes_to_mask(boxes: Sequence[Sequence[float]], height: int, width: int) -> torch.Tensor:
    """Union of boxes ``(x0, y0, x1, y1)`` in pixels, half-open ``[x0, x1) x [y0, y1)``, as a bool ``[H, W]``."""
    m = torch.zeros(height, width, dtype=torch.bool)
    for b in boxes:
        if len(b) != 4:
            raise IISInputError(f"boxes must be (x0, y0, x1, y1) tuples, got {b!r}")
        x0, y0, x1, y1 = (int(round(float(v))) for v in b)
        m[max(y0, 0):max(min(y1, height), 0), max(x0, 0):max(min(x1, width), 0)] = True
    return m


def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor, method: str = "",
                         smoothing: str | None = None) -> torch.Tensor:
    """EPG per map: positive smoothed attribution inside the boolean ``masks`` (boxes) over the total.

    ``method`` selects the smoothing (:func:`smoothing_for`); ``smoothing`` overrides it.
    """
    p = positive(maps, method, "epg", smoothing)
    masks = torch.as_tensor(masks, dtype=torch.bool, device=p.device)
    if masks.shape[-2:] != p.shape[-2:]:
        raise IISInputError(f"masks must be [..., {p.shape[-2]}, {p.shape[-1]}] like the maps, got {tuple(masks.shape)}")
    return (p * masks).sum(dim=(-2, -1)) / (p.sum(dim=(-2, -1)) + 1e-12)


def entropy(maps: torch.Tensor, smoothing: str | None = None) -> torch.Tensor:
    """Complexity: Shannon entropy in bits of ``P / ΣP`` per map (``0 log 0 = 0``; all-zero P gives 0).

    ``P`` uses the 5x5 mean filter for every method, as the official code (``smoothing`` overrides it).
    """
    p = positive(maps, "", "entropy", smoothing).flatten(-2).double()
    q = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    return -(torch.where(q > 0, q * torch.log2(q.clamp_min(1e-300)), torch.zeros_like(q))).sum(-1).float()


def gini(maps: torch.Tensor) -> torch.Tensor:
    """Compactness: Gini index of ``max(A, 0)`` per map (unsmoothed); 0 for an all-zero map, -> 1 for one pixel."""
    a, lead = _as_maps(maps)
    v = a.flatten(1).double().clamp_min(0.0).sort(dim=1).values
    n = v.shape[1]
    i = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    s = v.sum(dim=1)
    g = ((2 * i - n - 1) * v).sum(dim=1) / (n * s).clamp_min(1e-300)
    return torch.where(s > 0, g, torch.zeros_like(g)).float().reshape(lead)
