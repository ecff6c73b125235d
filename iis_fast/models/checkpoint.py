"""Reading model checkpoints from disk and loading them into a module, with errors that say what is wrong.

Accepted files: a ``torch.save`` file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, any other suffix) or a
``.safetensors`` file, holding the model's weights in any of the ways training code commonly saves them:

- a plain ``state_dict``;
- nested under a key (``state_dict``, ``model``, ``model_state_dict``, ``module``, ``net``, EMA copies such as
  ``state_dict_ema`` / ``model_ema`` / ``ema``, ...), possibly several levels deep;
- with key prefixes added by wrappers: ``module.`` (DistributedDataParallel), ``_orig_mod.`` (``torch.compile``),
  ``model.`` / ``net.`` (a PyTorch Lightning module holding the network as an attribute), in any combination.

:func:`find_state_dict` tries every (nested container, key prefix) reading of the file against the target
model's keys and takes the one that matches it exactly (the classifier aside: IIS reads the pre-logits
representation, see :func:`classifier_prefixes`). One exact match is used; what was stripped (a key prefix, or
a container other than ``state_dict``/``model``/``model_state_dict``, e.g. an EMA copy) is said in one line (a
:class:`CheckpointAdapted` warning); several are refused with the candidates listed, to be chosen with
``checkpoint_key=``; none is refused with the closest candidate's missing/unexpected keys. This search is
written here because timm's ``clean_state_dict`` strips only the DDP/``torch.compile`` prefixes, blind to the target
model (no Lightning ``model.``/``net.``, no nested containers); :func:`read_state_dict`, which has no target
model, uses it.

Files are always read with ``torch.load(..., weights_only=True)``: no pickled code is ever executed.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = [
    "LoadReport",
    "CheckpointAdapted",
    "StateDictCandidate",
    "read_checkpoint_file",
    "state_dict_candidates",
    "find_state_dict",
    "classifier_prefixes",
    "checkpoint_num_classes",
    "read_state_dict",
    "load_checkpoint",
    "load_state_dict_candidate",
    "load_state_dict_checked",
]

#: Keys under which training checkpoints nest state dicts (searched, with any other mapping-valued key).
NESTED_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "module", "net", "network",
                                "state_dict_ema", "model_ema", "ema", "ema_state_dict", "ema_model")
#: Containers that hold the model's own weights by convention: reading them needs no note.
PLAIN_CONTAINERS: tuple[str, ...] = ("", "state_dict", "model", "model_state_dict")
#: How many offending keys an error message lists before summarising the rest.
MAX_KEYS_SHOWN = 8
#: How deep nested containers and key prefixes are searched.
MAX_DEPTH = 4


class CheckpointAdapted(UserWarning):
    """A checkpoint was loaded after unwrapping it (nested key, stripped prefix) or with its classifier resized."""


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_checkpoint` did: the file it read, the keys that did not match (``strict=False``), and
    which reading of the file was used (``""`` for a plain state dict)."""

    path: str
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    adapted: str = ""


@dataclass(frozen=True)
class StateDictCandidate:
    """One way to read a checkpoint as a state dict: the nested ``container`` path and the key ``prefix`` stripped.

    ``name`` is what ``checkpoint_key=`` accepts: ``container`` alone (``"state_dict_ema"``) or
    ``container/prefix`` (``"state_dict/model."``); ``""`` is the file's top level with nothing stripped.
    """

    container: str
    prefix: str
    state_dict: dict[str, torch.Tensor]

    @property
    def name(self) -> str:
        return self.container + (f"/{self.prefix}" if self.prefix else "")

    def describe(self) -> str:
        parts = []
        if self.container:
            parts.append(f"the state dict nested under {self.container!r}")
        if self.prefix:
            parts.append(f"key prefix {self.prefix!r} stripped")
        return ", ".join(parts) or "a plain state dict"


def _show(keys: list[str] | tuple[str, ...]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:MAX_KEYS_SHOWN])
    if len(keys) > MAX_KEYS_SHOWN:
        shown += f", ... ({len(keys) - MAX_KEYS_SHOWN} more)"
    return shown


def read_checkpoint_file(path: str | os.PathLike[str]) -> Any:
    """The object stored in a checkpoint file (a ``torch.save`` file or ``.safetensors``), on the CPU.

    Raises:
        CheckpointError: the file is missing, unreadable, corrupt, or holds pickled code; the message names the file.
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
            return load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError / OSError
            raise CheckpointError(f"cannot read safetensors checkpoint {where}: {type(e).__name__}: {e}") from e
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, pickled objects weights_only refuses, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"cannot read checkpoint {where} (is it a torch.save file or a .safetensors file, "
            f"and complete?): {type(e).__name__}: {msg}"
        ) from e


def _tensor_dicts(obj: Any, path: str = "", depth: int = 0) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Every mapping in ``obj`` (itself included) whose tensor entries could be a state dict, with its key path."""
    if not isinstance(obj, Mapping) or depth > MAX_DEPTH:
        return []
    out = []
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors:
        out.append((path, tensors))
    for k, v in obj.items():
        if isinstance(k, str) and isinstance(v, Mapping):
            out.extend(_tensor_dicts(v, f"{path}/{k}" if path else k, depth + 1))
    return out


def _prefixes(keys: list[str]) -> list[str]:
    """Candidate prefixes: "" and every leading chain of up to MAX_DEPTH dotted segments that some key has."""
    found = {""}
    for k in keys:
        parts = k.split(".")
        for d in range(1, min(MAX_DEPTH, len(parts) - 1) + 1):
            found.add(".".join(parts[:d]) + ".")
    return sorted(found, key=lambda p: (p.count("."), p))


def state_dict_candidates(obj: Any, where: str = "checkpoint") -> list[StateDictCandidate]:
    """All (nested container, stripped prefix) readings of a loaded checkpoint object, in a stable order.

    Raises:
        CheckpointError: ``obj`` holds no tensors at all (not a state dict).
    """
    dicts = _tensor_dicts(obj)
    if not dicts:
        what = type(obj).__name__ if not isinstance(obj, Mapping) else "a dict without tensors"
        raise CheckpointError(
            f"checkpoint {where} holds {what}, not a state dict (a dict of tensors); "
            "save it with torch.save(model.state_dict(), path)"
        )
    out = []
    for container, sd in dicts:
        for prefix in _prefixes(list(sd)):
            stripped = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            out.append(StateDictCandidate(container, prefix, stripped))
    return out


def classifier_prefixes(model: nn.Module) -> list[str]:
    """Module names of ``model``'s classifier: timm's ``pretrained_cfg["classifier"]``, else the final Linear of a
    torchvision-style model (``fc``, ``classifier``, ``head``, ...). Empty when none is found."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if names:
        names = [names] if isinstance(names, str) else list(names)
        modules = dict(model.named_modules())
        return [n for n in names if n in modules]
    last = ""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    top = last.split(".")[0] if last else ""
    return [last] if top in ("fc", "classifier", "head", "heads", "last_linear") else []


def _is_classifier_key(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _mismatch(own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], cls: list[str]
              ) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) keys of ``sd`` against ``own``, the classifier's keys left out."""
    missing = [k for k in own if k not in sd and not _is_classifier_key(k, cls)]
    unexpected = [k for k in sd if k not in own and not _is_classifier_key(k, cls)]
    mis_shaped = [k for k in own if k in sd and not _is_classifier_key(k, cls)
                  and tuple(sd[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, mis_shaped


def find_state_dict(obj: Any, model: nn.Module, *, key: str | None = None, where: str = "checkpoint",
                    strict: bool = True) -> StateDictCandidate:
    """The reading of a loaded checkpoint that matches ``model`` (see the module docstring).

    Args:
        obj: what :func:`read_checkpoint_file` returned.
        model: the target module (its ``state_dict`` keys and shapes; may live on the ``meta`` device).
        key: choose a candidate by name (``"state_dict_ema"``, ``"state_dict/model."``) when several match.
        where: how to name the file in messages.
        strict: False: without an exact match, take the candidate sharing the most keys (the caller reports the
            difference).

    Raises:
        CheckpointError: no candidate matches, several do (listing them), or ``key`` names none.
    """
    cands = state_dict_candidates(obj, where)
    own = model.state_dict()
    cls = classifier_prefixes(model)
    if key is not None:
        chosen = [c for c in cands if c.name == key or (c.container == key and not c.prefix)]
        if not chosen:
            names = sorted({c.container for c in cands} - {""})
            raise CheckpointError(f"checkpoint {where} has no state dict {key!r}; nested state dicts: "
                                  f"{', '.join(names) or 'none (a plain state dict)'}")
        cands = chosen
    exact = [c for c in cands if not any(_mismatch(own, c.state_dict, cls))
             and any(k in c.state_dict for k in own)]
    if len(exact) > 1 and key is None:
        # several readings fit: harmless only if they hold the very same weights
        first = exact[0].state_dict
        if not all(c.state_dict.keys() == first.keys() and all(torch.equal(v, first[k]) for k, v in
                                                                 c.state_dict.items()) for c in exact[1:]):
            raise CheckpointError(
                f"checkpoint {where} holds {len(exact)} state dicts that all fit {type(model).__name__}: "
                + "; ".join(f"{c.name!r} ({c.describe()})" for c in exact)
                + ". Choose one with checkpoint_key= (CLI: --checkpoint-key NAME)"
            )
    if exact:
        return exact[0]
    if not strict:
        return max(cands, key=lambda c: sum(k in own for k in c.state_dict))
    # the closest candidate explains the failure
    best = min(cands, key=lambda c: sum(len(m) for m in _mismatch(own, c.state_dict, cls)))
    return best


def checkpoint_num_classes(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> int | None:
    """K of the classifier stored in ``state_dict`` (rows of its final weight), or None if it holds no classifier."""
    for p in classifier_prefixes(model):
        w = state_dict.get(f"{p}.weight")
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            return int(w.shape[0])
    return None


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` state dict on the CPU, without a target model.

    The state dict is the file's top level or the one nested under ``state_dict``, ``model_state_dict`` or
    ``model``; ``module.`` and ``_orig_mod.`` wrapper prefixes are stripped (timm's ``clean_state_dict``). To load into a model,
    prefer :func:`load_checkpoint`, which matches any wrapping against the model's keys.

    Raises:
        CheckpointError: the file is missing, unreadable, corrupt or holds no state dict; the message names the file.
    """
    where = repr(str(path))
    obj = read_checkpoint_file(path)
    for _ in range(MAX_DEPTH):
        if not isinstance(obj, Mapping):
            break
        nested = next((k for k in ("state_dict", "model_state_dict", "model") if isinstance(obj.get(k), Mapping)),
                      None)
        if nested is None:
            break
        obj = obj[nested]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {where} holds a {type(obj).__name__}, not a state dict (a dict of "
                              "tensors); save it with torch.save(model.state_dict(), path)")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint {where} is not a state dict: entries that are not tensors: {_show(bad)}")
    if not obj:
        raise CheckpointError(f"checkpoint {where} holds an empty state dict")
    from timm.models import clean_state_dict
    return clean_state_dict(dict(obj))


def load_state_dict_checked(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True, source: str = "state dict",
    ignore: list[str] | tuple[str, ...] = (),
) -> LoadReport:
    """Load ``state_dict`` into ``model`` after checking names and shapes; raise :class:`CheckpointError` on mismatch.

    Shape mismatches are always an error. With ``strict=True`` missing and unexpected keys are errors too;
    with ``strict=False`` they are returned in the :class:`LoadReport`. Keys under the module names in
    ``ignore`` (a classifier the checkpoint does not hold) are neither required nor loaded.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not _is_classifier_key(k, list(ignore))]
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
        cls = classifier_prefixes(model)
        hint = ""
        if mis_shaped and all(_is_classifier_key(m.split(" ")[0], cls) for m in mis_shaped):
            hint = " (the checkpoint's classifier has another number of classes: leave num_classes unset to " \
                   "take it from the checkpoint)"
        raise CheckpointError(
            f"checkpoint {source} does not match {type(model).__name__}: " + "; ".join(problems) + hint
        )
    result = model.load_state_dict(dict(state_dict), strict=False)
    missing_left = tuple(k for k in result.missing_keys if not _is_classifier_key(k, list(ignore)))
    return LoadReport(path=source, missing_keys=missing_left, unexpected_keys=tuple(result.unexpected_keys))


def load_state_dict_candidate(model: nn.Module, cand: StateDictCandidate, *, strict: bool = True,
                              where: str = "checkpoint") -> LoadReport:
    """Load a :class:`StateDictCandidate` (from :func:`find_state_dict`) into ``model``, saying in one
    :class:`CheckpointAdapted` warning how the file was read when it was not a plain state dict."""
    cls = classifier_prefixes(model)
    absent = [p for p in cls if not any(_is_classifier_key(k, [p]) for k in cand.state_dict)]
    report = load_state_dict_checked(model, cand.state_dict, strict=strict, source=where, ignore=absent)
    notes = []
    if cand.prefix or cand.container not in PLAIN_CONTAINERS:
        notes.append(f"read {cand.describe()}")
    if absent:
        notes.append(f"it holds no classifier ({', '.join(absent)}), left as initialised (IIS does not use it)")
    if notes:
        warnings.warn(f"checkpoint {where}: " + "; ".join(notes), CheckpointAdapted, stacklevel=3)
    return LoadReport(report.path, report.missing_keys, report.unexpected_keys, cand.name)


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], strict: bool = True, *,
                    checkpoint_key: str | None = None) -> LoadReport:
    """Read ``path`` and load the state dict in it that matches ``model`` (see the module docstring), in place.

    Args:
        model: the module to fill.
        path: checkpoint file.
        strict: if True, every model key must be in the file and every file key in the model; a classifier
            absent from the file is the one exception (left as it is, with a :class:`CheckpointAdapted` warning).
            A model with timm's ``reset_classifier`` gets the checkpoint's number of classes first.
        checkpoint_key: which nested state dict to use when several fit (``"state_dict_ema"``,
            ``"state_dict/model."``).

    Returns:
        A :class:`LoadReport` listing missing / unexpected keys (empty when ``strict``) and how the file was read.

    Raises:
        CheckpointError: unreadable file, ambiguous or no matching state dict, or keys / shapes that do not match;
            the message names the file and lists (a few of) the offending keys.
    """
    where = repr(str(path))
    cand = find_state_dict(read_checkpoint_file(path), model, key=checkpoint_key, where=where, strict=strict)
    k = checkpoint_num_classes(cand.state_dict, model)
    if k is not None and k != checkpoint_num_classes(model.state_dict(), model) and hasattr(model, "reset_classifier"):
        model.reset_classifier(k)        # timm models: a K-class checkpoint gets a K-class classifier
    return load_state_dict_candidate(model, cand, strict=strict, where=where)
