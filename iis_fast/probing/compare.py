"""A small, reproducible version of the How-to-Probe comparison (GridPG per probe, loss and method).

A pretrained backbone (default ImageNet MobileNetV2 from the installed package), Fashion-MNIST at low
resolution: probes trained at once on cached maps of a stratified TRAIN subset, accuracy on a stratified TEST
subset, and 3x3 grids built from other TEST images.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import IISInputError
from .grids import make_grids
from .heads import HEAD_NAMES
from .losses import LOSS_NAMES
from .attribution import attribute
from .grids import GridSet
from .metrics import grid_pointing_game
from .quality import attribution_quality
from .train import probe

__all__ = ["run_comparison", "format_comparison"]


def run_comparison(model: str = "mobilenetv2_100", *, image_size: int = 64, n_train: int = 1000, n_eval: int = 500,
                   n_pool: int = 500, heads: Sequence[str] = HEAD_NAMES, losses: Sequence[str] = LOSS_NAMES,
                   methods: Sequence[str] = ("ixg", "gradcam", "ig", "bcos"), epochs: int = 10, lr: float = 1e-3,
                   batch_size: int = 128, hidden: int = 512, grid_size: int = 3, n_grids: int = 6,
                   threshold: float = 0.95, ig_steps: int = 8, ig_method: str = "gausslegendre",
                   gradcam_layer: str = "last_conv", gradcam_relu: bool = False, explanation_mode: bool = False,
                   seed: int = 0, png: str | None = None,
                   lr_linear: float | None = 3e-2, png_grid: int = 0, png_cell: int = 4,
                   checkpoint: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Train every (head, loss) probe on one pretrained backbone and score its attributions on shared grids.

    Grids are built once from ``n_pool`` TEST images (disjoint from the ``n_eval`` accuracy images) that every
    probe classifies correctly with p >= ``threshold``; if fewer than g*g classes qualify, each probe gets its
    own grids from the images it classifies confidently (``"shared_grids": False``), and a probe with fewer
    than g*g confident classes uses its correctly classified images (its row's ``grid_threshold`` is 0).
    ``bcos`` runs for B-cos heads only. The figure (``png``) shows one grid for all probes: the shared grid
    ``png_grid``, else a grid of images every probe classifies correctly. ``ig_method``, ``gradcam_layer``,
    ``gradcam_relu`` and ``explanation_mode`` are passed to :func:`~iis_fast.probing.attribute` (defaults: the
    official forms; ``ig_steps`` is 8 here, not the official 50, to keep the run short).

    Returns:
        ``{"rows": [{probe, head, loss, accuracy, <method>: {gridpg, entropy, gini}}], "config", "timings",
        "shared_grids"}``; with ``png``, the figure of grid ``png_grid``, target cell ``png_cell``.
    """
    from ..data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST, load_fashion_mnist
    from ..data.sampling import stratified_subset
    from ..models import create_model, preprocessing_config

    t_all = time.perf_counter()
    backbone = create_model(model, checkpoint=checkpoint) if checkpoint else create_model(model, pretrained=True)
    pre = preprocessing_config(backbone)
    _, test_labels = load_fashion_mnist("test")
    idx = stratified_subset(test_labels, n_eval + n_pool, seed)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(idx)
    ev_idx, pool_idx = np.sort(idx[:n_eval]), np.sort(idx[n_eval:])
    _, train_labels = load_fashion_mnist("train")
    tr_idx = stratified_subset(train_labels, n_train, seed)
    mk = lambda split, ii: FashionMNIST(split, image_size, pre["mean"], pre["std"], indices=ii)  # noqa: E731
    loader = lambda ds: torch.utils.data.DataLoader(ds, batch_size=100, shuffle=False)  # noqa: E731
    lrs = {"default": lr, **({"linear": lr_linear} if lr_linear else {})}
    res = probe(backbone, loader(mk("train", tr_idx)), loader(mk("test", ev_idx)), heads=heads, losses=losses,
                epochs=epochs, lr=lrs, batch_size=batch_size, hidden=hidden, seed=seed, progress=progress)
    pool = mk("test", pool_idx)
    batches = list(loader(pool))
    px, py = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    models = {k: res.model_with_head(k) for k in res.heads}
    t0 = time.perf_counter()
    try:
        grids = make_grids(px, py, n_grids, grid_size, seed, models=list(models.values()), threshold=threshold)
        shared = True
    except IISInputError:
        grids, shared = None, False
    rows, maps_for_png, png_scores = [], {}, {}
    png_grid_image, png_label = None, 0
    for k, m in models.items():
        meths = [x for x in methods if x != "bcos" or k.startswith("bcos")]
        th = threshold
        opts = dict(ig_steps=ig_steps, ig_method=ig_method, gradcam_layer=gradcam_layer, gradcam_relu=gradcam_relu,
                    explanation_mode=explanation_mode)
        kw = dict(methods=meths, grid_size=grid_size, n_grids=n_grids, seed=seed, **opts)
        try:
            q = attribution_quality(m, px, py, grids=grids, threshold=th, **kw)
        except IISInputError:   # this probe has < g*g confident classes: fall back to correctly classified
            th = 0.0
            q = attribution_quality(m, px, py, grids=grids, threshold=th, **kw)
        row: dict[str, Any] = {"probe": k, "head": k.split("/")[0], "loss": k.split("/")[1],
                               "accuracy": res.accuracies[k], "grid_threshold": th,
                               **{mm: q.scores[mm] for mm in meths}, "maps_per_s": q.maps_per_s}
        rows.append(row)
        if png is not None:
            if png_grid_image is None:   # one grid for the figure: the shared one, else one all probes get right
                disp = grids if grids is not None else _display_grid(px, py, grid_size, seed, list(models.values()))
                png_grid_image = disp.images[png_grid if grids is not None else 0]
                png_label = int(disp.cell_labels[png_grid if grids is not None else 0, png_cell])
            tg = torch.tensor([[png_label]])
            maps_for_png[k] = {mm: attribute(m, png_grid_image[None], tg, mm, **opts)[0, 0]
                               for mm in meths}
            png_scores[k] = {mm: float(grid_pointing_game(a, torch.tensor(png_cell), grid_size, mm))
                             for mm, a in maps_for_png[k].items()}
    t_attr = time.perf_counter() - t0
    out: dict[str, Any] = {
        "rows": rows, "shared_grids": shared,
        "config": {"model": model, "image_size": image_size, "grid_image_size": image_size * grid_size,
                   "n_train": n_train, "n_eval": n_eval, "n_pool": n_pool, "epochs": epochs, "lr": res.config["lr"],
                   "batch_size": batch_size, "hidden": hidden, "grid_size": grid_size, "n_grids": n_grids,
                   "threshold": threshold, "ig_steps": ig_steps, "ig_method": ig_method,
                   "gradcam_layer": gradcam_layer, "gradcam_relu": gradcam_relu,
                   "explanation_mode": explanation_mode, "seed": seed, "methods": list(methods),
                   "feature_shape": list(res.feature_shape), "torch_threads": torch.get_num_threads()},
        "timings": {"features_s": res.timings["features_s"], "train_s": res.timings["train_s"],
                    "attribution_s": t_attr, "total_s": time.perf_counter() - t_all},
    }
    if png is not None:
        from .plots import plot_attributions
        label = png_label
        out["png"] = plot_attributions(
            png_grid_image, maps_for_png, png, mean=pre["mean"], std=pre["std"], cell=png_cell,
            grid_size=grid_size, target_name=FASHION_MNIST_CLASSES[label], scores=png_scores,
            title=f"{model}, Fashion-MNIST {grid_size}x{grid_size} grid ({image_size} px cells)")
    return out


def _display_grid(x: torch.Tensor, y: torch.Tensor, g: int, seed: int, models: list) -> GridSet:
    try:
        return make_grids(x, y, 1, g, seed, models=models, threshold=0.0)
    except IISInputError:
        return make_grids(x, y, 1, g, seed, models=None)


def format_comparison(result: dict[str, Any]) -> str:
    """A markdown table: head, loss, accuracy, the grid confidence threshold, GridPG per method."""
    methods = result["config"]["methods"]
    head = "| head | loss | accuracy | grids p>= | " + " | ".join(f"GridPG {m}" for m in methods) + " |"
    lines = [head, "|" + "---|" * (4 + len(methods))]
    for r in result["rows"]:
        cells = [f"{r[m]['gridpg']:.3f}" if m in r else "–" for m in methods]
        lines.append(f"| {r['head']} | {r['loss']} | {r['accuracy']:.3f} | {r['grid_threshold']:g} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)
