"""PNG pictures of concept explanations (docs/applications.md): one prediction and its top concepts
(:func:`explanation_png`), and the whole concept library grouped by class (:func:`concept_gallery`)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import IISInputError
from .kept_heads import KeptHeads


def _plt() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _hwc(img: torch.Tensor) -> np.ndarray:
    """[3, h, w] uint8 or [0, 1] float -> [h, w, 3] for imshow."""
    a = img.detach().cpu()
    a = a.float() / 255.0 if a.dtype == torch.uint8 else a.float().clamp(0, 1)
    return a.permute(1, 2, 0).numpy()


def explanation_png(ex: Any, image01: torch.Tensor, heads: KeptHeads, path: str | os.PathLike[str]) -> None:
    """The image with its prediction, then each top concept's element image captioned with weight x activation."""
    plt = _plt()
    n = len(ex.top)
    fig, axes = plt.subplots(1, n + 1, figsize=(1.9 * (n + 1), 2.6))
    axes = np.atleast_1d(axes)
    axes[0].imshow(_hwc(image01))
    axes[0].set_title(f"predicted: {ex.name(ex.prediction)}\np = {ex.probability:.2f}"
                      + (f"; true: {ex.name(ex.label)}" if ex.label is not None else ""), fontsize=8)
    for ax, r in zip(axes[1:], ex.top):
        if heads.concept_images is not None:
            ax.imshow(_hwc(heads.concept_images[r["index"]]))
        else:
            ax.text(0.5, 0.5, f"concept {r['index']}\n(no element image)", ha="center", va="center", fontsize=8)
        ax.set_title(f"#{r['index']} ({ex.name(r['concept_class'])})\n{r['weight']:+.2f} x {r['activation']:+.2f}"
                     f" = {r['contribution']:+.2f}", fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"concept head at s = {ex.sparsity:g}: acc_s {ex.acc_s:.3f} vs acc_std {ex.acc_std:.3f}; "
                 f"logit {ex.logit:.2f} = bias {ex.bias:+.2f} + sum of weight x activation ({ex.kept_concepts} "
                 "concepts active)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def concept_gallery(heads: KeptHeads, path: str | os.PathLike[str], class_names: Sequence[str] | None = None,
                    per_row: int | None = None) -> None:
    """Every concept's element image, one row (or block of rows) per class of its source image, as a PNG.

    Args:
        heads: kept heads with element images (``score(..., keep_heads=True)`` with the prototype library, or
            :func:`iis_fast.applications.heads_from_finetune`).
        class_names: names for the row labels. per_row: images per row (default: the largest class's count,
            at most 25).
    """
    if heads.concept_images is None or heads.concept_labels is None:
        raise IISInputError("these heads carry no element images (" + "; ".join(heads.notes or ["none kept"])
                            + "): the gallery needs the prototype library")
    labels = heads.concept_labels.numpy()
    classes = sorted(set(labels.tolist()))
    groups = [np.flatnonzero(labels == c) for c in classes]
    per_row = per_row or min(25, max(len(g) for g in groups))
    rows = [(c, g[i:i + per_row]) for c, g in zip(classes, groups) for i in range(0, len(g), per_row)]
    plt = _plt()
    fig, axes = plt.subplots(len(rows), per_row, figsize=(0.7 * per_row + 1.2, 0.75 * len(rows) + 0.5),
                             squeeze=False)
    for r, (c, idx) in enumerate(rows):
        for j in range(per_row):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j < len(idx):
                ax.imshow(_hwc(heads.concept_images[idx[j]]))
        name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"{len(labels)} concepts ({heads.library} library), grouped by the class of their source image",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
