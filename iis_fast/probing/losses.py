"""Probe losses (docs/spec.md §2.1): softmax cross-entropy, and binary cross-entropy against targets
``clamp(labels, min=off)`` for one-hot (single-label) or multi-hot (multi-label) labels.

The official off value: ``1/C`` for single-label probing (``UniformOffLabelsBCEWithLogitsLoss``) and for B-cos heads
in multi-label probing; 0 (plain multi-hot BCE, ``BcosBinaryCrossEntropyLoss``) for linear and MLP heads in
multi-label probing (:func:`official_bce_off`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import IISInputError

__all__ = ["LOSS_NAMES", "bce_targets", "bce_loss", "ce_loss", "get_loss", "official_bce_off", "is_multilabel"]

LOSS_NAMES: tuple[str, ...] = ("ce", "bce")


def is_multilabel(labels: torch.Tensor) -> bool:
    """True for multi-hot labels ``[N, C]``, False for class ids ``[N]``."""
    return labels.dim() == 2


def official_bce_off(head: str, num_classes: int, multilabel: bool) -> float:
    """The off-target value of the official BCE for a head name: ``1/C``, except 0 for linear / MLP heads on
    multi-label data."""
    return 0.0 if multilabel and not str(head).startswith("bcos") else 1.0 / num_classes


def bce_targets(labels: torch.Tensor, num_classes: int, off: float | None = None) -> torch.Tensor:
    """BCE targets ``clamp(y, min=off)``: ``y`` the one-hot of class ids ``[N]`` or multi-hot labels ``[N, C]``
    (1 for a present class, ``off`` (default ``1/C``) for every other)."""
    if num_classes < 1:
        raise IISInputError(f"num_classes must be positive, got {num_classes}")
    off = 1.0 / num_classes if off is None else float(off)
    if not 0.0 <= off < 1.0:
        raise IISInputError(f"the BCE off value must lie in [0, 1), got {off}")
    if is_multilabel(labels):
        if labels.shape[1] != num_classes:
            raise IISInputError(f"multi-hot labels must be [N, {num_classes}], got {tuple(labels.shape)}")
        return labels.float().clamp(min=off)
    return F.one_hot(labels.long(), num_classes).float().clamp(min=off)


def bce_loss(logits: torch.Tensor, labels: torch.Tensor, off: float | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits against :func:`bce_targets`, averaged over batch x classes."""
    return F.binary_cross_entropy_with_logits(logits, bce_targets(labels, logits.shape[1], off), reduction="mean")


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy averaged over the batch (class ids only)."""
    if is_multilabel(labels):
        raise IISInputError("losses: 'ce' needs one class per image; multi-label probing uses 'bce'")
    return F.cross_entropy(logits, labels.long())


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The loss function called ``name`` (``ce`` or ``bce``)."""
    try:
        return {"ce": ce_loss, "bce": bce_loss}[name]
    except KeyError:
        raise IISInputError(f"losses: unknown loss {name!r}; use 'ce' or 'bce'") from None
