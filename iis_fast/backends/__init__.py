"""The one dispatch point for grid training backends.

Callers ask :func:`get_trainer` for a name (or "auto") and never branch on which backend ran. A backend
registers a trainer ``fn(x, y, eval_sets, concepts, spec, progress=None) -> GridOutput`` with an availability
check and a speed rank; "auto" picks the fastest available one for the device. A backend that trains repeated
grids (``GridSpec.seeds``) in one fused pass says so (``repeats=True``); for the others, and for end2end grids,
:func:`get_trainer`'s trainer runs one call per seed and stacks the outputs, so every caller sees one interface.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import BackendUnavailable, IISInputError


@dataclass
class Backend:
    name: str
    trainer: Callable
    available: Callable[[str], tuple[bool, str]]   # device -> (ok, reason if not)
    rank: int                                       # lower is faster; "auto" takes the lowest available
    end2end: bool = False                           # trains end2end grids (per-head concepts, docs/spec.md §1.2)
    repeats: bool = False                           # trains GridSpec.seeds (fixed-library grids) in one fused pass


_REGISTRY: dict[str, Backend] = {}
_LOADED = False


def register_backend(name: str, trainer: Callable, available: Callable[[str], tuple[bool, str]], rank: int,
                     end2end: bool = False, repeats: bool = False) -> None:
    _REGISTRY[name] = Backend(name, trainer, available, rank, end2end, repeats)


def _load_builtin() -> None:
    # A flag, not "is the registry empty": a fused backend imported directly registers itself first.
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from .reference import train_grid_reference
    from .torch import train_grid_torch
    register_backend("reference", train_grid_reference, lambda device: (True, ""), rank=100, end2end=True)
    register_backend("torch", train_grid_torch, lambda device: (True, ""), rank=50, end2end=True, repeats=True)
    # Fused backends register themselves from their own modules if they import.
    for mod in ("iis_fast.backends.cpp", "iis_fast.backends.triton"):
        try:
            __import__(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def available_backends(device: str = "cpu") -> dict[str, str]:
    """Every registered backend with '' if it can run on `device`, else the reason it cannot."""
    _load_builtin()
    out = {}
    for b in sorted(_REGISTRY.values(), key=lambda b: b.rank):
        ok, why = b.available(device)
        out[b.name] = "" if ok else why
    return out


def resolve_backend(name: str, device: str = "cpu", end2end: bool = False) -> Backend:
    """The backend `name` ("auto": the fastest available for `device`), or a clear error. With ``end2end``, only
    backends that train end2end grids qualify."""
    _load_builtin()
    if name == "auto":
        for b in sorted(_REGISTRY.values(), key=lambda b: b.rank):
            if b.available(device)[0] and (b.end2end or not end2end):
                return b
        raise BackendUnavailable(f"no backend can run {'an end2end grid ' if end2end else ''}on device {device!r}")
    if name not in _REGISTRY:
        raise IISInputError(f"backend={name!r}: known backends are {sorted(_REGISTRY)} (or 'auto')")
    b = _REGISTRY[name]
    if end2end and not b.end2end:
        raise BackendUnavailable(f"backend {name!r} does not train end2end grids (every head learning its own "
                                 f"concepts); use one of {sorted(n for n, x in _REGISTRY.items() if x.end2end)}")
    ok, why = b.available(device)
    if not ok:
        raise BackendUnavailable(f"backend {name!r} cannot run on {device!r}: {why}")
    return b


def get_trainer(name: str, device: str = "cpu", end2end: bool = False) -> tuple[str, Callable]:
    """The backend's name and its trainer, which accepts repeated specs (``GridSpec.seeds``) whatever the backend."""
    b = resolve_backend(name, device, end2end)

    def trainer(x, y, eval_sets, concepts, spec, progress=None):
        if spec.seeds is None or (b.repeats and spec.assignment is None):
            return b.trainer(x, y, eval_sets, concepts, spec, progress=progress)
        from .common import stack_outputs
        return stack_outputs([b.trainer(x, y, eval_sets, concepts, spec.single(s), progress=progress)
                              for s in spec.seeds], b.name)
    return b.name, trainer
