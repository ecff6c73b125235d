"""Probe losses (docs/spec.md §2.1): softmax cross-entropy, and BCE with targets ``clamp(one_hot, min=1/C)``."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import IISInputError

__all__ = ["LOSS_NAMES", "bce_targets", "bce_loss", "ce_loss", "get_loss"]

LOSS_NAMES: tuple[str, ...] = ("ce", "bce")


def bce_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """BCE targets ``clamp(one_hot(labels), min=1/C)``: 1 for the label, ``1/C`` for every other class."""
    if num_classes < 1:
        raise IISInputError(f"num_classes must be positive, got {num_classes}")
    return F.one_hot(labels.long(), num_classes).float().clamp(min=1.0 / num_classes)


def bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits against :func:`bce_targets`, averaged over batch x classes."""
    return F.binary_cross_entropy_with_logits(logits, bce_targets(labels, logits.shape[1]), reduction="mean")


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy averaged over the batch."""
    return F.cross_entropy(logits, labels.long())


def get_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function called ``name`` (``ce`` or ``bce``)."""
    try:
        return {"ce": ce_loss, "bce": bce_loss}[name]
    except KeyError:
        raise IISInputError(f"losses: unknown loss {name!r}; use 'ce' or 'bce'") from None
