"""``iis-fast finetune`` and ``iis-fast explain`` (docs/applications.md). Registered by ``iis_fast.cli``."""
from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register", "cmd_finetune", "cmd_explain"]


def _update(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def register(subparsers: Any) -> None:
    """Add the ``finetune`` and ``explain`` subcommands to an ``argparse`` subparsers object."""
    from ..cli import add_data_options, add_progress_option
    from ..config import PRESET_CHOICES
    f = subparsers.add_parser(
        "finetune", help="fine-tune a backbone so that its sparse concept interpretation classifies (IIS paper)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="loss = CE(probe(f(x)), y) + lam * CE(head_s(f(x)), y): the backbone f (all of it, or its last "
                    "--train-blocks blocks), a linear probe and a concept head at sparsity s train together; the "
                    "prototype concepts are re-embedded by the current f every epoch (--concept-update). IIS is "
                    "scored before and after. Checkpoints after every epoch; a rerun resumes.",
        epilog="example:\n  iis-fast finetune mobilenetv2_100 --data fashion-mnist:n_train=1000,n_eval=1000 "
               "--image-size 64 --lam 1 --epochs 2 --lr 1e-3 --train-blocks 2 --out ft.pt --json ft.json")
    f.add_argument("model", help="timm model name (packaged ImageNet weights where they exist)")
    f.add_argument("--checkpoint", help="weights to start from instead of the packaged ones")
    add_data_options(f)
    f.add_argument("--lam", type=float, required=True, help="weight of the concept head's loss (0: plain fine-tuning)")
    f.add_argument("--sparsity", type=float, default=0.1, help="s of the concept head (default 0.1, as the paper)")
    f.add_argument("--num-concepts", type=int, default=200)
    f.add_argument("--epochs", type=int, default=1)
    f.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the backbone (default 1e-4)")
    f.add_argument("--head-lr", type=float, default=1e-3, help="of the probe and the concept head (default 1e-3)")
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--train-blocks", type=int, default=None, help="fine-tune only the last N blocks (default: all)")
    f.add_argument("--concept-update", type=_update, default="epoch", help="epoch (default), fixed, or N steps")
    f.add_argument("--images-per-class", type=int, default=10)
    f.add_argument("--elements", default="both", choices=PRESET_CHOICES["elements"])
    f.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--device", default="auto", help="auto (CUDA where a GPU exists), cpu, cuda, ...")
    f.add_argument("--checkpoint-dir", help="write epoch_NNN.pt after each epoch here; a rerun resumes from the last")
    f.add_argument("--no-resume", action="store_true", help="start afresh even if --checkpoint-dir holds a run")
    f.add_argument("--no-iis", action="store_true", help="skip IIS before/after")
    f.add_argument("--out", help="write the fine-tuned model's state_dict here (.pt)")
    f.add_argument("--json", help="write the history (loss terms, eval accuracy, IIS before/after) here")
    add_progress_option(f)
    f.set_defaults(func=cmd_finetune)

    e = subparsers.add_parser(
        "explain", help="a concept head's prediction for one image and the concepts it rests on, as a PNG",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Scores the model with keep_heads (or reads --heads), then explains evaluation image --index: "
                    "the prediction of the concept head at --sparsity, its top concepts by weight x activation, "
                    "each shown as its element image (--png), and the whole concept library by class (--gallery).",
        epilog="example:\n  iis-fast explain mobilenetv2_100 --data fashion-mnist:n_train=2000,n_eval=1000 "
               "--image-size 64 --index 3 --sparsity 0.9 --png ex.png --gallery concepts.png")
    e.add_argument("model", help="timm model name")
    e.add_argument("--checkpoint", help="weights to load")
    add_data_options(e)
    e.add_argument("--heads", help="heads file from --save-heads (skips scoring)")
    e.add_argument("--save-heads", help="write the kept heads here (.safetensors)")
    e.add_argument("--index", type=int, default=0, help="which evaluation image (default 0)")
    e.add_argument("--sparsity", type=float, default=None,
                   help="which head (default: the sparsest whose ARR >= 0.9)")
    e.add_argument("--top", type=int, default=6, help="concepts to show (default 6)")
    e.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
    e.add_argument("--png", required=True, help="the explanation picture")
    e.add_argument("--gallery", help="also draw the concept library, grouped by class, here")
    e.add_argument("--json", help="write the explanation here")
    add_progress_option(e)
    e.set_defaults(func=cmd_explain)


def _model(name: str, checkpoint: str | None) -> Any:
    from ..models import create_model, list_models
    return create_model(name, checkpoint=checkpoint, pretrained=name in list_models(pretrained=True))


def _loaders(net: Any, args: argparse.Namespace) -> tuple[Any, Any]:
    from ..data.sources import resolve_data
    from ..features import default_cache_dir
    from ..score import _preprocessing
    pre = _preprocessing(net, None, None, args.image_size)
    return resolve_data(args.data, args.eval_data, pre, cache_dir=default_cache_dir(), batch_size=64, device="cpu")


def cmd_finetune(args: argparse.Namespace) -> int:
    import torch
    from .finetune import check_finetune_args, finetune
    check_finetune_args(args.lam, args.sparsity, args.num_concepts, "prototype", args.epochs, args.lr,
                        args.concept_update)           # before the model and the data are read
    net = _model(args.model, args.checkpoint)
    train, ev = _loaders(net, args)
    r = finetune(net, train, ev, lam=args.lam, sparsity=args.sparsity, num_concepts=args.num_concepts,
                 epochs=args.epochs, lr=args.lr, head_lr=args.head_lr, batch_size=args.batch_size,
                 train_blocks=args.train_blocks, concept_update=args.concept_update,
                 images_per_class=args.images_per_class, elements=args.elements, seed=args.seed, device=args.device,
                 checkpoint_dir=args.checkpoint_dir, resume=not args.no_resume, score_iis=not args.no_iis,
                 score_options={"image_size": args.image_size, "elements": args.elements,
                                "images_per_class": args.images_per_class}, image_size=args.image_size,
                 progress=not args.no_progress)
    h = r.history
    for row in h.epochs:
        print(f"epoch {row['epoch']}: loss {row['loss_total']:.4f} (probe {row['loss_probe']:.4f}, concept "
              f"{row['loss_concept']:.4f})" + (f", eval acc probe {row['eval_acc_probe']:.4f}, concept head "
                                               f"{row['eval_acc_concept']:.4f}" if "eval_acc_probe" in row else ""))
    if h.iis_before and h.iis_after:
        print(f"IIS {h.iis_before['iis']:.4f} -> {h.iis_after['iis']:.4f}; acc_std {h.iis_before['acc_std']:.4f} -> "
              f"{h.iis_after['acc_std']:.4f}")
    if args.out:
        torch.save(r.model.state_dict(), args.out)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(h.to_dict(), fh, indent=1)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from ..score import score
    from .explain import explain
    from .gallery import concept_gallery
    from .kept_heads import KeptHeads
    net = _model(args.model, args.checkpoint)
    train, ev = _loaders(net, args)
    if args.heads:
        heads = KeptHeads.load(args.heads)
    else:
        r = score(net, train, eval_loader=ev, keep_heads=True, image_size=args.image_size,
                  progress=not args.no_progress)
        heads = r.heads
        if args.save_heads:
            heads.save(args.save_heads)
    image, label = _nth(ev if ev is not None else train, args.index)
    names = None
    if str(args.data).startswith("fashion-mnist"):
        from ..data.fashion_mnist import FASHION_MNIST_CLASSES
        names = list(FASHION_MNIST_CLASSES)
    ex = explain(net, image, heads, sparsity=args.sparsity, top=args.top, label=label, class_names=names,
                 png=args.png)
    print(ex.report())
    if args.gallery:
        concept_gallery(heads, args.gallery, class_names=names)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(ex.to_dict(), fh, indent=1)
    return 0


def _nth(loader: Any, index: int) -> tuple[Any, int]:
    from ..errors import IISInputError
    from ..features import _split_batch
    seen = 0
    for batch in loader:
        images, labels = _split_batch(batch)
        if index < seen + len(labels):
            return images[index - seen], int(labels[index - seen])
        seen += len(labels)
    raise IISInputError(f"--index {index}: the evaluation data has {seen} images")
