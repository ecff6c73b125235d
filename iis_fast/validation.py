"""Checks on what users pass in. Each error names the argument at fault and what to do about it."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .errors import IISInputError

#: Largest number of classes accepted: above it the heads alone would not fit in memory (a label of 2**40 once
#: asked for 8.8 TB). ImageNet-21k has 21,841 classes.
MAX_CLASSES = 100_000
#: Without ``num_classes``, K = max label + 1 may exceed the number of distinct labels (a subset of a larger label
#: space) up to this factor, and always up to :data:`AUTO_CLASSES_FLOOR`; beyond that the labels are refused.
AUTO_CLASSES_FACTOR = 16
AUTO_CLASSES_FLOOR = 1024


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
    if y.numel() and int(y.max()) >= MAX_CLASSES:
        raise IISInputError(f"{name} has label {int(y.max())}, above the largest supported class index "
                            f"{MAX_CLASSES - 1}: labels must be class indices 0..K-1")
    if num_classes is not None and (y >= num_classes).any():
        raise IISInputError(f"{name} has label {y.max().item()} but there are only {num_classes} classes "
                            f"(labels must be in 0..{num_classes - 1}); pass num_classes= or fix the labels")
    return y


def infer_num_classes(train_y: torch.Tensor, eval_y: torch.Tensor, num_classes: int | None) -> int:
    """K: ``num_classes`` when given (at most :data:`MAX_CLASSES`), else 1 + the largest label, refused when that is
    far above the number of distinct labels (a stray huge label would size every head by it)."""
    if num_classes is not None:
        if isinstance(num_classes, bool) or int(num_classes) != num_classes or not 1 <= num_classes <= MAX_CLASSES:
            raise IISInputError(f"num_classes={num_classes!r}: must be a whole number in 2..{MAX_CLASSES}")
        return int(num_classes)
    top = int(max(train_y.max(), eval_y.max()).item()) + 1
    distinct = int(torch.unique(torch.cat([train_y, eval_y])).numel())
    bound = max(AUTO_CLASSES_FLOOR, AUTO_CLASSES_FACTOR * distinct)
    if top > bound:
        raise IISInputError(f"the largest label is {top - 1} but only {distinct} distinct labels occur: K = {top} "
                            f"classes would be sized from one label (limit {bound} without num_classes); relabel to "
                            "0..K-1, or pass num_classes= if the labels really index that many classes")
    return top


def check_classes(train_y: torch.Tensor, eval_y: torch.Tensor, num_classes: int, eval_name: str = "eval_y") -> None:
    """At least 2 classes; every class with training samples is evaluated, and every evaluated class is trained."""
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
    only_eval = (torch.bincount(eval_y, minlength=num_classes) > 0) & (present_train == 0)
    if only_eval.any():
        cls = only_eval.nonzero().flatten().tolist()
        raise IISInputError(f"class(es) {cls[:10]} occur in {eval_name} but have no training samples: no head can "
                            "learn to predict them, so every accuracy would be capped without notice; drop those "
                            "evaluation samples or add training samples of those classes")


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


def check_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine, else IISInputError naming it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise IISInputError(f"device={device!r} is not a torch device: use 'cpu', 'cuda', 'cuda:1', 'mps', ...") \
            from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise IISInputError(f"device={device!r} but no CUDA GPU is usable here (torch {torch.__version__}, CUDA "
                                f"build {torch.version.cuda or 'none'}): use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise IISInputError(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return dev
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise IISInputError(f"device={device!r}: no {dev.type} device is available here; use device='cpu'")
    return dev


def input_channels(model: torch.nn.Module) -> int | None:
    """Channels the model's first convolution reads (None when it has none, e.g. an MLP)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            return int(m.in_channels)
    return None


def expect_channels(embed: Callable[[torch.Tensor], torch.Tensor], channels: int | None, what: str
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``embed``, refusing batches whose channel count is not ``channels`` with a named error (not the
    convolution's RuntimeError deep inside the backbone)."""
    if channels is None:
        return embed

    def checked(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[1] != channels:
            hint = " (grey images: repeat the channel, images.expand(-1, 3, -1, -1))" if x.shape[1] == 1 else ""
            raise IISInputError(f"the loader yields {x.shape[1]}-channel images but {what} reads {channels}-channel "
                                f"input{hint}")
        return embed(x)
    return checked


def check_images_per_class(labels: np.ndarray, images_per_class: int) -> None:
    """Every class must have ``images_per_class`` training images to give as concept sources."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).reshape(-1))
    present = np.flatnonzero(counts)
    short = present[counts[present] < images_per_class]
    if short.size:
        raise IISInputError(f"images_per_class={images_per_class} but class(es) {short[:10].tolist()} have fewer "
                            f"training images (the smallest has {int(counts[present].min())}): lower "
                            "images_per_class or give more training data")
