"""``attribution_quality``: attribution maps of a model with a probe head, scored by the metrics of docs/spec.md
§2.3."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import IISInputError
from .attribution import METHODS, as_probed, make_attribution
from .grids import GridSet, make_grids
from .heads import BcosProbe
from .metrics import boxes_to_mask, energy_pointing_game, entropy, gini, grid_pointing_game

__all__ = ["METRICS", "AttributionQuality", "attribution_quality"]

METRICS: tuple[str, ...] = ("gridpg", "epg", "entropy", "gini")


@dataclass
class AttributionQuality:
    """Scores of :func:`attribution_quality`.

    Attributes:
        scores: ``{method: {metric: mean over maps}}``.
        per_map: ``{method: {metric: tensor}}``, ``[N, T]``: T = g*g on grids; with boxes, T = the most classes
            explained on one image (1 for single-label boxes), NaN where an image has fewer.
        maps_per_s: ``{method: maps per second}`` of the attribution step.
        grids: the :class:`GridSet` used (None in box mode).
        maps: ``{method: [N, T, H, W]}`` when ``return_maps`` was set.
    """

    scores: dict[str, dict[str, float]]
    per_map: dict[str, dict[str, torch.Tensor]]
    maps_per_s: dict[str, float]
    grids: GridSet | None = None
    maps: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready scores and speeds."""
        return {"scores": self.scores, "maps_per_s": self.maps_per_s}


def attribution_quality(model_with_head: nn.Module, images: torch.Tensor, labels: torch.Tensor | Sequence[int],
                        methods: str | Sequence[str] = ("ixg", "gradcam", "ig"),
                        metrics: str | Sequence[str] = ("gridpg", "entropy", "gini"), *, grid_size: int = 3,
                        n_grids: int = 8, seed: int = 0, threshold: float = 0.95, grids: GridSet | None = None,
                        boxes: Sequence[Sequence[Sequence[float]] | Mapping[int, Sequence[Sequence[float]]]] | None = None,
                        ig_steps: int = 50,
                        ig_method: str = "gausslegendre", gradcam_layer: str | nn.Module = "last_conv",
                        gradcam_relu: bool = False, explanation_mode: bool = False, smoothing: str | None = None,
                        batched: bool = True, return_maps: bool = False) -> AttributionQuality:
    """Attribution maps for each method and their quality metrics.

    Grid mode (default): ``images``/``labels`` are a pool of single preprocessed images; ``n_grids`` g x g grids
    of distinct classes that the model classifies correctly with p >= ``threshold`` are built (seeded; or pass
    ``grids`` to reuse one :class:`GridSet` across probes). Every cell's class is a target, all targets of a
    grid come from one forward; metrics ``gridpg``, ``entropy``, ``gini``.

    Box mode (``boxes`` given, one entry per image; metrics ``epg``, ``entropy``, ``gini``): an entry is a list of
    ``(x0, y0, x1, y1)`` boxes, and the image is explained for its label; or, for multi-label images, a mapping
    ``{class: boxes}``, and the image is explained for every class in it, each scored against its own boxes (the
    official VOC / COCO EPG; ``labels`` is then not used for that image). Scores average the explained maps.

    Methods: ``ixg``, ``gradcam``, ``ig``, ``bcos`` (B-cos heads only; asking for it on another head raises).
    See :mod:`iis_fast.probing.attribution`. ``batched=False`` computes one target at a time (same maps).
    The defaults are the official code's: IG with 50 Gauss-Legendre nodes (``ig_steps``, ``ig_method``),
    Grad-CAM on the last convolution without ReLU (``gradcam_layer``, ``gradcam_relu``), plain gradients
    through B-cos heads (``explanation_mode``), and each metric's official smoothing (``smoothing`` =
    ``"gaussian"`` or ``"mean5"`` forces one for GridPG, EPG and entropy).
    """
    meths = [methods] if isinstance(methods, str) else list(methods)
    mets = [metrics] if isinstance(metrics, str) else list(metrics)
    for m in meths:
        if m not in METHODS:
            raise IISInputError(f"methods: unknown method {m!r}; use {', '.join(METHODS)} (LRP is not implemented)")
    for m in mets:
        if m not in METRICS:
            raise IISInputError(f"metrics: unknown metric {m!r}; use {', '.join(METRICS)}")
    model = as_probed(model_with_head)
    if "bcos" in meths and not isinstance(model.head, BcosProbe):
        raise IISInputError("methods: 'bcos' contribution maps need a B-cos head (bcos1/2/3); drop it for this probe")
    x = torch.as_tensor(images)
    y = torch.as_tensor(labels).long()
    if boxes is None:
        if "epg" in mets:
            raise IISInputError("metrics: 'epg' needs boxes= (one list of (x0, y0, x1, y1) per image)")
        gs = grids if grids is not None else make_grids(x, y, n_grids, grid_size, seed, models=model,
                                                         threshold=threshold)
        inputs, targets, g = gs.images, gs.cell_labels, gs.grid_size
    else:
        if "gridpg" in mets:
            raise IISInputError("metrics: 'gridpg' is computed on grids; leave boxes=None for it")
        if len(boxes) != x.shape[0]:
            raise IISInputError(f"boxes must have one entry per image ({x.shape[0]}), got {len(boxes)}")
        gs, inputs, g = None, x, 0
        targets, masks, valid = _box_targets(boxes, y, x.shape[-2], x.shape[-1])
    scores: dict[str, dict[str, float]] = {}
    per_map: dict[str, dict[str, torch.Tensor]] = {}
    speed: dict[str, float] = {}
    kept: dict[str, torch.Tensor] = {}
    for meth in meths:
        t0 = time.perf_counter()
        attr = make_attribution(meth, ig_steps=ig_steps, ig_method=ig_method, gradcam_layer=gradcam_layer,
                                gradcam_relu=gradcam_relu, explanation_mode=explanation_mode)
        a = attr(model, inputs, targets, batched=batched)
        speed[meth] = a.shape[0] * a.shape[1] / max(time.perf_counter() - t0, 1e-9)
        vals: dict[str, torch.Tensor] = {}
        for met in mets:
            if met == "gridpg":
                vals[met] = grid_pointing_game(a, torch.arange(g * g).expand(a.shape[0], -1), g, meth, smoothing)
            elif met == "epg":
                vals[met] = energy_pointing_game(a, masks, meth, smoothing)
            elif met == "entropy":
                vals[met] = entropy(a, smoothing)
            else:
                vals[met] = gini(a)
        if boxes is not None:       # padded targets of images with fewer classes: computed, then dropped
            vals = {k: v.float().masked_fill(~valid, float("nan")) for k, v in vals.items()}
        per_map[meth] = vals
        scores[meth] = {k: float(v.float().nanmean()) for k, v in vals.items()}
        if return_maps:
            kept[meth] = a
    return AttributionQuality(scores, per_map, speed, gs, kept)


def _box_targets(boxes: Sequence[Any], labels: torch.Tensor, height: int,
                 width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets ``[N, T]``, box masks ``[N, T, H, W]`` and which entries are real ``[N, T]`` for box mode.

    An entry of ``boxes`` that is a mapping ``{class: boxes}`` gives one target per class (in class order); a list
    of boxes gives the image's label. Images with fewer than T classes repeat their first one (marked not real).
    """
    per_image: list[list[tuple[int, Any]]] = []
    for i, b in enumerate(boxes):
        if isinstance(b, Mapping):
            if not b:
                raise IISInputError(f"boxes[{i}] is an empty mapping; give at least one class with its boxes")
            per_image.append([(int(c), bx) for c, bx in sorted(b.items())])
        elif labels.dim() != 1:
            raise IISInputError(f"boxes[{i}]: with multi-hot labels give each image's boxes as {{class: boxes}}")
        else:
            per_image.append([(int(labels[i]), b)])
    n, t = len(per_image), max(len(p) for p in per_image)
    targets = torch.zeros(n, t, dtype=torch.long)
    masks = torch.zeros(n, t, height, width, dtype=torch.bool)
    valid = torch.zeros(n, t, dtype=torch.bool)
    for i, p in enumerate(per_image):
        targets[i] = p[0][0]
        for j, (c, bx) in enumerate(p):
            targets[i, j], masks[i, j], valid[i, j] = c, boxes_to_mask(bx, height, width), True
    return targets, masks, valid
