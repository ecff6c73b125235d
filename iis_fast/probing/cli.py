"""``iis-fast probe``: train linear / MLP / B-cos probes on a frozen pretrained backbone and score the
attribution maps they give (GridPG on Fashion-MNIST grids). Registered by ``iis_fast.cli``."""
from __future__ import annotations

import argparse
import json
from typing import Any

from ..cli import add_progress_option

__all__ = ["register", "cmd_probe"]

_DESCRIPTION = """\
How to Probe (docs/spec.md §2), small and offline. On one frozen pretrained backbone, extract the last-stage spatial
maps of a Fashion-MNIST subset once, train every requested probe at once (linear; MLP with 2 or 3 layers;
B-cos with 1-3 layers; each with softmax CE and/or BCE with targets clamp(one_hot, 1/C)), report each probe's
test accuracy, then build 3x3 grids of distinct-class test images that the probes classify correctly with
p >= 0.95 and report, per probe and attribution method, the GridPG score: the share of the positive
(smoothed) attribution that falls in the target's cell (1/9 = no localisation, 1 = perfect).

Methods: ixg (Input x Gradient), gradcam (Grad-CAM; official form: the backbone's last convolution, no ReLU),
ig (Integrated Gradients, Gauss-Legendre), bcos (B-cos contribution maps, B-cos probes only). All targets of an
image are explained from one forward. Heads: also linear_nobias, mlp2_nobias, mlp3_nobias (bias-free probes).
Defaults take ~10 minutes on 2 CPU cores; --quick takes ~2."""


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``probe`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "probe", help="train probe variants on a frozen backbone and score their attributions (GridPG)",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mobilenetv2_100",
                   help="timm model name; ImageNet weights from installed packages for mobilenetv2_100 and "
                        "efficientnet_lite0 (default: mobilenetv2_100)")
    p.add_argument("--checkpoint", help="state_dict / .pth / .safetensors for --model instead of packaged weights")
    p.add_argument("--heads", type=_csv, default=["linear", "mlp2", "mlp3", "bcos1", "bcos2", "bcos3"],
                   help="comma-separated probes (default: linear,mlp2,mlp3,bcos1,bcos2,bcos3)")
    p.add_argument("--losses", type=_csv, default=["ce", "bce"], help="comma-separated: ce, bce (default both)")
    p.add_argument("--methods", type=_csv, default=["ixg", "gradcam", "ig", "bcos"],
                   help="comma-separated attribution methods (default ixg,gradcam,ig,bcos)")
    p.add_argument("--image-size", type=int, default=64, help="cell resolution in px (grids are 3x this; default 64)")
    p.add_argument("--n-train", type=int, default=1000, help="train images, stratified from TRAIN (default 1000)")
    p.add_argument("--n-eval", type=int, default=500, help="accuracy images, stratified from TEST (default 500)")
    p.add_argument("--n-pool", type=int, default=500, help="other TEST images the grids are built from (500)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the MLP / B-cos probes (1e-3)")
    p.add_argument("--lr-linear", type=float, default=3e-2, help="learning rate of the linear probe (3e-2)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--hidden", type=int, default=512, help="hidden width of MLP/B-cos probes (paper: 2048)")
    p.add_argument("--grid-size", type=int, default=3)
    p.add_argument("--n-grids", type=int, default=6, help="grid images per probe (9 maps each)")
    p.add_argument("--threshold", type=float, default=0.95, help="min softmax probability for grid images")
    p.add_argument("--ig-steps", type=int, default=8, help="Integrated Gradients steps (official: 50; default 8)")
    p.add_argument("--ig-method", default="gausslegendre", choices=("gausslegendre", "riemann_middle"),
                   help="Integrated Gradients nodes (default gausslegendre, as the official code)")
    p.add_argument("--gradcam-layer", default="last_conv",
                   help="Grad-CAM layer: last_conv (official), features (the final map) or a backbone module name")
    p.add_argument("--gradcam-relu", action="store_true",
                   help="clip Grad-CAM maps at 0 before upsampling (classic Grad-CAM; the official code does not)")
    p.add_argument("--explanation-mode", action="store_true",
                   help="B-cos explanation mode for the gradients of B-cos heads (official: plain gradients)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: 300/200/300 images, 4 epochs, hidden 64, 2 grids")
    p.add_argument("--png", default="probe_attributions.png",
                   help="write the figure of one grid image's maps per probe here ('' to skip)")
    p.add_argument("--json", help="also write the full results as JSON here")
    add_progress_option(p)
    p.set_defaults(func=cmd_probe)
    return p


def cmd_probe(args: argparse.Namespace) -> int:
    """Run the comparison and print the table (markdown)."""
    import torch

    from .compare import format_comparison, run_comparison
    if args.threads:
        torch.set_num_threads(args.threads)
    kw: dict[str, Any] = dict(
        image_size=args.image_size, n_train=args.n_train, n_eval=args.n_eval, n_pool=args.n_pool, heads=args.heads,
        losses=args.losses, methods=args.methods, epochs=args.epochs, lr=args.lr, lr_linear=args.lr_linear,
        batch_size=args.batch_size, hidden=args.hidden, grid_size=args.grid_size, n_grids=args.n_grids,
        threshold=args.threshold, ig_steps=args.ig_steps, ig_method=args.ig_method, gradcam_layer=args.gradcam_layer,
        gradcam_relu=args.gradcam_relu, explanation_mode=args.explanation_mode, seed=args.seed,
        checkpoint=args.checkpoint,
        png=args.png or None, progress=not args.no_progress)
    if args.quick:
        kw.update(n_train=300, n_eval=200, n_pool=300, epochs=4, hidden=64, n_grids=2)
    res = run_comparison(args.model, **kw)
    print(format_comparison(res))
    t = res["timings"]
    print(f"\nfeatures {t['features_s']:.1f}s, training {t['train_s']:.1f}s, attribution {t['attribution_s']:.1f}s; "
          f"grids {'shared by all probes' if res['shared_grids'] else 'per probe'}"
          + (f"; figure: {res['png']}" if res.get("png") else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0
