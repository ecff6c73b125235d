"""Checks on what users pass in. Each error names the argument at fault and what to do about it."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import IISInputError


def tensor_from_numpy(a: Any) -> torch.Tensor:
    """Zero-copy where numpy allows it; read-only arrays (memory-mapped cache entries) are copied once."""
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def as_features(x: Any, name: str) -> torch.Tensor:
    """A 2-D finite float tensor [N, D] (numpy arrays and memmaps accepted)."""
    if isinstance(x, np.ndarray):
        x = tensor_from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise IISInputError(f"{name} must be a torch.Tensor or numpy array of shape [N, D], got {type(x).__name__}")
    if x.dim() != 2:
        raise IISInputError(f"{name} must have shape [N, D], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise IISInputError(f"{name} is empty (0 samples): the loader or split produced no data")
    if not x.is_floating_point():
        x = x.float()
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.any(dim=1).nonzero().flatten()
        raise IISInputError(f"{name} contains NaN or inf in {len(rows)} sample(s) (first at row {rows[0].item()}): "
                            "check the backbone's outputs or drop those samples")
    return x


def as_labels(y: Any, n: int, name: str, num_classes: int | None = None) -> torch.Tensor:
    """A 1-D int64 label tensor of length n with values in [0, num_classes)."""
    if isinstance(y, np.ndarray):
        y = tensor_from_numpy(y)
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.dim() != 1 or y.shape[0] != n:
        raise IISInputError(f"{name} must have shape [{n}] (one label per sample), got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        if y.is_floating_point() and torch.isfinite(y).all() and (y == y.round()).all():
            y = y.long()
        else:
            raise IISInputError(f"{name} must hold integer class indices, got dtype {y.dtype} with non-integer values")
    y = y.long()
    if (y < 0).any():
        raise IISInputError(f"{name} has negative labels (min {y.min().item()}): labels must be 0..K-1")
    if num_classes is not None and (y >= num_classes).any():
        raise IISInputError(f"{name} has label {y.max().item()} but there are only {num_classes} classes "
                            f"(labels must be in 0..{num_classes - 1}); pass num_classes= or fix the labels")
    return y


def check_classes(train_y: torch.Tensor, eval_y: torch.Tensor, num_classes: int, eval_name: str = "eval_y") -> None:
    if num_classes < 2:
        raise IISInputError(f"need at least 2 classes to classify, got {num_classes}")
    present_train = torch.bincount(train_y, minlength=num_classes)
    if (present_train == 0).sum() == num_classes - 1:
        raise IISInputError("train labels hold a single class: need at least 2 classes")
    missing = (torch.bincount(eval_y, minlength=num_classes) == 0) & (present_train > 0)
    if missing.any():
        cls = missing.nonzero().flatten().tolist()
        raise IISInputError(f"class(es) {cls[:10]} have training samples but no evaluation samples in {eval_name}: "
                            "give an eval set that covers every class (or lower eval_fraction's rounding by using more data)")


def as_concepts(c: Any, dim: int) -> torch.Tensor:
    if isinstance(c, np.ndarray):
        c = tensor_from_numpy(c)
    if not isinstance(c, torch.Tensor) or c.dim() != 2:
        raise IISInputError(f"concepts must be a 2-D [M, D] tensor, got {getattr(c, 'shape', type(c).__name__)}")
    if c.shape[1] != dim:
        raise IISInputError(f"concepts have width {c.shape[1]} but the features have D = {dim}: the concept library "
                            "must be embedded by the same backbone (same representation) as the features")
    if c.shape[0] < 2:
        raise IISInputError(f"concepts must hold at least 2 rows, got {c.shape[0]}")
    c = c.float()
    if not torch.isfinite(c).all():
        raise IISInputError("concepts contain NaN or inf")
    if (c.norm(dim=1) == 0).any():
        raise IISInputError("concepts contain an all-zero row: every concept needs a direction")
    return c
