"""Text concepts with the official filtering around user-supplied CLIP vectors (docs/spec.md §1.2, text).

iis_fast ships no CLIP: the caller gives CLIP image features of the training and validation images and CLIP text
features of the candidate concepts, plus the backbone's features of the same images. :func:`fit_text_concepts`
then follows the official ``IP_Text_training.py``:

1. drop concepts whose mean top-5 CLIP image-text similarity over the training images is <= ``clip_cutoff`` (0.25);
2. fit a bias-free projection W [T x D] (``nn.Linear`` initialisation) by Adam (lr 1e-3) on batches of
   min(``batch_size`` = 50,000, N) random training rows, for at most ``steps`` (1,000); every ``val_every`` (50)
   steps and at the last, the validation loss decides: the first check that does not improve stops the fit, and
   the best weights are kept;
3. keep concepts whose validation similarity is > ``interpretability_cutoff`` (0.45);
4. standardise the concept activations W·x with their training mean and (unbiased) standard deviation.

The similarity: ``"cos_cubed"`` (default) is Label-free CBM's cosine of mean-centred, cubed activations, maximised.
``"mean_cubic"`` is what the official code uses: the squared distance between the mean-centred, unit-norm columns,
negated as the loss, so that the fit pushes W·x *away* from the CLIP similarities and the cutoff keeps concepts
whose distance exceeds 0.45 (``reproduce="official"`` selects it; see docs/spec.md §3).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import IISInputError
from .libraries import _as_feats, cos_cubed_similarity

SIMILARITIES = ("cos_cubed", "mean_cubic")


def mean_cubic_distance(clip_feats: torch.Tensor, target_feats: torch.Tensor) -> torch.Tensor:
    """The official ``similarity.mean_cubic_loss``: per column, Σ (unit centred target − unit centred clip)²."""
    c = clip_feats - clip_feats.mean(dim=0, keepdim=True)
    t = target_feats - target_feats.mean(dim=0, keepdim=True)
    c = c / c.norm(dim=0, keepdim=True)
    t = t / t.norm(dim=0, keepdim=True)
    return ((t - c) ** 2).sum(dim=0)


def _similarity(name: str, clip_feats: torch.Tensor, outs: torch.Tensor) -> torch.Tensor:
    if name == "mean_cubic":
        return mean_cubic_distance(clip_feats, outs)
    return cos_cubed_similarity(outs, clip_feats)


@dataclass
class TextConcepts:
    """What :func:`fit_text_concepts` kept (T_kept concepts)."""

    vectors: torch.Tensor       # W [T_kept, D], the projection's rows (not normalised)
    kept: np.ndarray            # [T_kept] indices of the kept concepts among the candidates
    clip_top5: torch.Tensor     # [T] mean top-5 CLIP similarity of every candidate over the training images
    similarity: torch.Tensor    # [T_kept] validation similarity of the kept concepts (the chosen measure)
    mean: torch.Tensor          # [T_kept] training mean of W·x
    std: torch.Tensor           # [T_kept] training standard deviation of W·x (unbiased)
    best_step: int              # the projection step whose weights were kept

    @property
    def library(self) -> torch.Tensor:
        """The concept library C [T_kept, D]: unit rows of W (the IIS head of docs/spec.md §1.3 takes it)."""
        return F.normalize(self.vectors, dim=1)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """The standardised concept activations (W·x − mean) / std of backbone features x [N, D]."""
        return (torch.as_tensor(x).float() @ self.vectors.t() - self.mean) / self.std


def fit_text_concepts(image_feats, clip_image_feats, clip_text_feats, val_image_feats, val_clip_image_feats, *,
                      clip_cutoff: float = 0.25, interpretability_cutoff: float = 0.45, steps: int = 1000,
                      lr: float = 1e-3, batch_size: int = 50000, val_every: int = 50, similarity: str | None = None,
                      reproduce: str | None = None, seed: int = 0) -> TextConcepts:
    """Filter and fit text concepts as the official code does (see the module docstring).

    Args:
        image_feats, val_image_feats: backbone features [N, D] / [N_val, D] of the training / validation images.
        clip_image_feats, val_clip_image_feats: CLIP image features of the same images, same order.
        clip_text_feats: CLIP text features [T, C] of the candidate concepts.
        similarity: ``"cos_cubed"`` or ``"mean_cubic"``; None: ``"mean_cubic"`` with ``reproduce="official"``,
            else ``"cos_cubed"``.
        seed: seeds the initialisation and the batches.
    """
    if reproduce not in (None, "official"):
        raise IISInputError(f"reproduce={reproduce!r}: choose None or 'official'")
    sim_name = similarity or ("mean_cubic" if reproduce == "official" else "cos_cubed")
    if sim_name not in SIMILARITIES:
        raise IISInputError(f"similarity={sim_name!r}: choose one of {SIMILARITIES}")
    x, vx = _as_feats(image_feats, "image_feats"), _as_feats(val_image_feats, "val_image_feats")
    ci, vci = _as_feats(clip_image_feats, "clip_image_feats"), _as_feats(val_clip_image_feats, "val_clip_image_feats")
    ct = _as_feats(clip_text_feats, "clip_text_feats")
    if ci.shape[0] != x.shape[0] or vci.shape[0] != vx.shape[0]:
        raise IISInputError("clip image features must have one row per image of image_feats / val_image_feats "
                            f"(got {ci.shape[0]} vs {x.shape[0]} and {vci.shape[0]} vs {vx.shape[0]})")
    if vx.shape[1] != x.shape[1] or ci.shape[1] != ct.shape[1] or vci.shape[1] != ct.shape[1]:
        raise IISInputError("backbone features must share D, and CLIP image and text features their width")
    if x.shape[0] < 5 or vx.shape[0] < 2:
        raise IISInputError("need at least 5 training and 2 validation images (top-5 similarities, centring)")
    if int(steps) < 1 or int(val_every) < 1 or not lr > 0 or int(batch_size) < 2:
        raise IISInputError(f"steps={steps}, val_every={val_every}, lr={lr}, batch_size={batch_size}: must be positive")

    clip = F.normalize(ci, dim=1) @ F.normalize(ct, dim=1).t()                       # [N, T]
    top5 = clip.topk(5, dim=0).values.mean(dim=0)
    keep1 = torch.nonzero(top5 > clip_cutoff).flatten()
    if keep1.numel() == 0:
        raise IISInputError(f"no concept has a mean top-5 CLIP similarity above clip_cutoff={clip_cutoff}")
    clip = clip[:, keep1]
    val_clip = (F.normalize(vci, dim=1) @ F.normalize(ct, dim=1).t())[:, keep1]

    gen = torch.Generator().manual_seed(int(seed))
    w = torch.empty(keep1.numel(), x.shape[1])
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)                 # nn.Linear's initialisation
    w = torch.nn.Parameter(w)
    opt = torch.optim.Adam([w], lr=lr)
    rng = random.Random(int(seed))
    bs = min(int(batch_size), x.shape[0])
    best_loss, best_step, best_w = float("inf"), 0, w.detach().clone()
    for i in range(int(steps)):
        batch = torch.as_tensor(rng.sample(range(x.shape[0]), k=bs))
        loss = -_similarity(sim_name, clip[batch], x[batch] @ w.t()).mean()
        loss.backward()
        opt.step()
        if i % int(val_every) == 0 or i == int(steps) - 1:
            with torch.no_grad():
                val_loss = float(-_similarity(sim_name, val_clip, vx @ w.t()).mean())
            if i == 0 or val_loss < best_loss:
                best_loss, best_step, best_w = val_loss, i, w.detach().clone()
            else:                                                                    # stop when it stops improving
                break
        opt.zero_grad()
    with torch.no_grad():
        sim = _similarity(sim_name, val_clip, vx @ best_w.t())
    keep2 = torch.nonzero(sim > interpretability_cutoff).flatten()
    if keep2.numel() == 0:
        raise IISInputError(f"no concept kept a validation similarity above interpretability_cutoff="
                            f"{interpretability_cutoff}")
    vectors = best_w[keep2]
    act = x @ vectors.t()
    return TextConcepts(vectors=vectors, kept=keep1[keep2].numpy(), clip_top5=top5, similarity=sim[keep2],
                        mean=act.mean(dim=0), std=act.std(dim=0), best_step=best_step)
