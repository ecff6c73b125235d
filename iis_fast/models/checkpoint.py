"""Reading model checkpoints from disk and loading them into a module, with errors that say what is wrong.

Accepted files:

- a raw ``state_dict`` saved with :func:`torch.save` (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, any other suffix);
- a ``.safetensors`` file;
- a dict nesting the state dict under ``state_dict``, ``model_state_dict`` or ``model`` (training checkpoints,
  possibly nested several levels).

A ``module.`` (DistributedDataParallel) or ``_orig_mod.`` (``torch.compile``) key prefix is stripped.
Files are always read with ``torch.load(..., weights_only=True)``: no pickled code is ever executed.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["LoadReport", "read_state_dict", "load_checkpoint", "load_state_dict_checked"]

#: Keys under which training checkpoints nest the model's state dict, tried in this order.
NESTED_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model")
#: Key prefixes added by wrappers (DDP, torch.compile) that are stripped on load.
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
#: How many offending keys an error message lists before summarising the rest.
MAX_KEYS_SHOWN = 8


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_checkpoint` did: the file it read and the keys that did not match (``strict=False``)."""

    path: str
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]


def _show(keys: list[str] | tuple[str, ...]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    if len(keys) > MAX_KEYS_SHOWN:
        shown += f", ... ({len(keys) - MAX_KEYS_SHOWN} more)"
    return shown


def _unwrap(obj: object, where: str) -> dict[str, torch.Tensor]:
    """Descend through ``state_dict``/``model_state_dict``/``model`` nesting until a flat tensor dict is left."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"checkpoint {where} holds a {type(obj).__name__}, not a state dict (a dict of tensors); "
                "save it with torch.save(model.state_dict(), path)"
            )
        nested = next((k for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = obj[nested]
    assert isinstance(obj, Mapping)
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"checkpoint {where} is not a state dict: entries that are not tensors: {_show(bad)} "
            f"(a nested state dict is looked for under {', '.join(NESTED_KEYS)})"
        )
    if not obj:
        raise CheckpointError(f"checkpoint {where} holds an empty state dict")
    return dict(obj)


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` state dict on the CPU.

    Args:
        path: a ``torch.save`` file (raw or nested state dict) or a ``.safetensors`` file.

    Returns:
        The state dict, wrapper prefixes (``module.``, ``_orig_mod.``) stripped.

    Raises:
        CheckpointError: the file is missing, unreadable, corrupt or holds no state dict; the message names the file.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint file {str(p)!r} does not exist")
    if not p.is_file():
        raise CheckpointError(f"checkpoint path {str(p)!r} is not a file")
    where = repr(str(p))
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            obj: object = load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError / OSError
            raise CheckpointError(f"cannot read safetensors checkpoint {where}: {type(e).__name__}: {e}") from e
    else:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, garbage bytes, pickled objects weights_only refuses, ...
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(
                f"cannot read checkpoint {where} (is it a torch.save file or a .safetensors file, "
                f"and complete?): {type(e).__name__}: {msg}"
            ) from e
    return _strip_prefixes(_unwrap(obj, where))


def load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True, source: str = "state dict"
) -> LoadReport:
    """Load ``state_dict`` into ``model`` after checking names and shapes; raise :class:`CheckpointError` on mismatch.

    Shape mismatches are always an error. With ``strict=True`` missing and unexpected keys are errors too;
    with ``strict=False`` they are returned in the :class:`LoadReport`.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mis_shaped = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)})"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} mis-shaped: {_show(mis_shaped)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing: {_show(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_show(unexpected)}")
    if problems:
        hint = ""
        if any(("classifier" in m or "fc." in m or "head" in m) for m in mis_shaped):
            hint = " (a checkpoint with a different number of classes needs create_model(..., num_classes=K))"
        raise CheckpointError(
            f"checkpoint {source} does not match {type(model).__name__}: " + "; ".join(problems) + hint
        )
    result = model.load_state_dict(dict(state_dict), strict=strict)
    return LoadReport(path=source, missing_keys=tuple(result.missing_keys), unexpected_keys=tuple(result.unexpected_keys))


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], strict: bool = True) -> LoadReport:
    """Read ``path`` (see :func:`read_state_dict`) and load it into ``model`` in place.

    Args:
        model: the module to fill.
        path: checkpoint file.
        strict: if True, every model key must be in the file and every file key in the model.

    Returns:
        A :class:`LoadReport` listing missing / unexpected keys (empty when ``strict``).

    Raises:
        CheckpointError: unreadable file, or keys / shapes that do not match; the message names the file and
            lists (a few of) the offending keys.
    """
    sd = read_state_dict(path)
    return load_state_dict_checked(model, sd, strict=strict, source=repr(str(path)))
