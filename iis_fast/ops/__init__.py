"""The one dispatch point for grid training backends.

Callers ask :func:`get_trainer` for a name (or "auto") and never branch on which backend ran. A backend
registers a trainer ``fn(x, y, eval_sets, concepts, spec, progress=None) -> GridOutput`` with an availability
check and a speed rank; "auto" picks the fastest available one for the device.
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


_REGISTRY: dict[str, Backend] = {}
_LOADED = False


def register_backend(name: str, trainer: Callable, available: Callable[[str], tuple[bool, str]], rank: int) -> None:
    _REGISTRY[name] = Backend(name, trainer, available, rank)


def _load_builtin() -> None:
    # A flag, not "is the registry empty": a fused backend imported directly registers itself first.
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from ..heads.reference import train_grid_reference
    from ..heads.batched import train_grid_torch
    register_backend("reference", train_grid_reference, lambda device: (True, ""), rank=100)
    register_backend("torch", train_grid_torch, lambda device: (True, ""), rank=50)
    # Fused backends register themselves from their own modules if they import.
    for mod in ("iis_fast.ops.cpp_backend", "iis_fast.ops.triton_backend"):
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


def resolve_backend(name: str, device: str = "cpu") -> Backend:
    """The backend `name` ("auto": the fastest available for `device`), or a clear error."""
    _load_builtin()
    if name == "auto":
        for b in sorted(_REGISTRY.values(), key=lambda b: b.rank):
            if b.available(device)[0]:
                return b
        raise BackendUnavailable(f"no backend can run on device {device!r}")
    if name not in _REGISTRY:
        raise IISInputError(f"backend={name!r}: known backends are {sorted(_REGISTRY)} (or 'auto')")
    b = _REGISTRY[name]
    ok, why = b.available(device)
    if not ok:
        raise BackendUnavailable(f"backend {name!r} cannot run on {device!r}: {why}")
    return b


def get_trainer(name: str, device: str = "cpu") -> tuple[str, Callable]:
    b = resolve_backend(name, device)
    return b.name, b.trainer
