"""PNG of one grid image's attribution maps, one row per probe, one column per method."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch

__all__ = ["plot_attributions"]


def plot_attributions(grid_image: torch.Tensor, maps: Mapping[str, Mapping[str, torch.Tensor]],
                      path: str | os.PathLike[str], *, mean: Sequence[float] = (0.485, 0.456, 0.406),
                      std: Sequence[float] = (0.229, 0.224, 0.225), cell: int | None = None, grid_size: int = 3,
                      target_name: str | None = None, scores: Mapping[str, Mapping[str, float]] | None = None,
                      title: str | None = None) -> str:
    """Save a figure: column 0 the grid image (target cell outlined), then one column per method; one row per probe.

    Args:
        grid_image: normalised ``[3, H, W]`` input (un-normalised with ``mean``/``std`` for display).
        maps: ``{probe: {method: [H, W] raw attribution map}}``; a missing method leaves an empty panel.
        path: output PNG path. cell/grid_size: the target's cell, outlined in every panel.
        scores: optional ``{probe: {method: GridPG of this map}}`` shown in panel titles.

    Maps are drawn with a symmetric blue-white-red scale at the 99.5th percentile of |A| (red: positive).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    probes = list(maps)
    methods: list[str] = []
    for p in probes:
        for m in maps[p]:
            if m not in methods:
                methods.append(m)
    img = (grid_image.detach().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1))
    img = img.clamp(0, 1).permute(1, 2, 0).numpy()
    h, w = img.shape[:2]
    ncol = 1 + len(methods)
    fig, axes = plt.subplots(len(probes), ncol, figsize=(1.9 * ncol, 1.9 * len(probes) + 0.6), squeeze=False)

    def outline(ax) -> None:
        if cell is None:
            return
        i, j = divmod(cell, grid_size)
        ch, cw = h // grid_size, w // grid_size
        ax.add_patch(patches.Rectangle((j * cw - 0.5, i * ch - 0.5), cw, ch, fill=False, edgecolor="lime", lw=1.2))

    for r, p in enumerate(probes):
        ax = axes[r, 0]
        ax.imshow(img)
        outline(ax)
        ax.set_ylabel(p, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
            ax.set_title("image" + (f"\ntarget: {target_name}" if target_name else ""), fontsize=8)
        for c, m in enumerate(methods, start=1):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            a = maps[p].get(m)
            if a is None:
                ax.set_title(m if r == 0 else "", fontsize=7)
                ax.axis("off")
                continue
            a = a.detach().cpu().float()
            v = float(torch.quantile(a.abs().flatten(), 0.995)) or 1e-12
            ax.imshow(a.numpy(), cmap="bwr", vmin=-v, vmax=v)
            outline(ax)
            t = m if r == 0 else ""
            if scores and p in scores and m in scores[p]:
                t = (t + "\n" if t else "") + f"GridPG {scores[p][m]:.2f}"
            ax.set_title(t, fontsize=7)
    fig_h = 1.9 * len(probes) + 0.6
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig_h) if title else None)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)
