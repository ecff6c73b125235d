"""Checks on what users pass in. Each error names the argument at fault and what to do about it."""
from __future__ import annotations

import math
import os
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
    """A 1-D int64 label tensor of length n with values in [0, num_classes) (the rule: :func:`label_array`)."""
    return tensor_from_numpy(label_array(y, name, n=n, num_classes=num_classes))


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


# ------------------------------------------------------------------------------------------- shared rules
# Each rule below is written once; callers in data/, models/, concepts/ use them (see docs/data.md).


def usable_cores() -> int:
    """CPU cores this process may run on (affinity-aware: a container or ``taskset`` limit counts)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def rgb_triple(v: Any, what: str) -> tuple[float, float, float]:
    """Per-RGB-channel values (``mean``/``std``): one number for all channels, or three; all finite, and positive
    when ``what == "std"``. Accepts numbers, sequences and tensors."""
    try:
        t = tuple(float(x) for x in torch.as_tensor(v, dtype=torch.float64).flatten().tolist())
    except (TypeError, ValueError, RuntimeError):
        t = ()
    if len(t) == 1:
        t = t * 3
    if len(t) != 3 or not all(math.isfinite(x) for x in t):
        raise IISInputError(f"{what} must be 3 finite numbers (one per RGB channel), got {v!r}")
    if what == "std" and min(t) <= 0:
        raise IISInputError(f"std must be positive in every RGB channel, got {v!r}")
    return t  # type: ignore[return-value]


def image_hw(size: Any, what: str = "image_size") -> tuple[int, int]:
    """An image size given as one int S (a square) or as ``(H, W)``, as positive ``(H, W)``."""
    try:
        if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
            hw = (int(size), int(size))
        else:
            hw = tuple(int(v) for v in size)
    except (TypeError, ValueError):
        hw = ()
    if len(hw) != 2 or min(hw) < 1:
        raise IISInputError(f"{what} must be a positive int or (height, width), got {size!r}")
    return hw  # type: ignore[return-value]


def square_side(size: Any, what: str = "image_size") -> int:
    """:func:`image_hw` for square-only consumers (FFCV's centre crop): the side S of ``S`` or ``(S, S)``."""
    h, w = image_hw(size, what)
    if h != w:
        raise IISInputError(f"{what} must be a positive int or a square (S, S), got {size!r} "
                            "(FFCV's centre crop is square)")
    return h


def label_bound(num_classes: int | None) -> int:
    """The exclusive upper bound of a class index: ``num_classes`` when given (capped at :data:`MAX_CLASSES`)."""
    return MAX_CLASSES if num_classes is None else min(int(num_classes), MAX_CLASSES)


def label_array(y: Any, name: str = "labels", *, n: int | None = None, other: str = "the features",
                num_classes: int | None = None, integral_floats: bool = True) -> np.ndarray:
    """1-D int64 class indices (numpy): the one label rule of the package.

    Args:
        y: labels (numpy, torch, a sequence).
        name: the argument's name, for the error.
        n: the required length (one label per row of ``other``).
        num_classes: labels must be below it (and always below :data:`MAX_CLASSES`), and never negative.
        integral_floats: accept floats that hold whole numbers (labels read from a CSV); False refuses every
            non-integer dtype (the variant the library builders and the C++ grid use).

    Raises:
        IISInputError: wrong shape or length, a non-integer dtype, a negative or too large label.
    """
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    a = np.asarray(y)
    if a.ndim != 1:
        raise IISInputError(f"{name} has shape {a.shape}; expected a 1-D vector of integer class ids")
    if n is not None and a.shape[0] != n:
        raise IISInputError(f"{name} has {a.shape[0]} entries but {other} has {n} rows; they must match "
                            f"(one label per sample, shape [{n}])")
    if a.size and a.dtype.kind not in "iu":
        whole = a.dtype.kind == "f" and bool(np.isfinite(a).all()) and bool((a == np.round(a)).all())
        if not (integral_floats and whole):
            raise IISInputError(f"{name} has dtype {a.dtype}: expected integer labels (class ids 0..K-1)")
    a = a.astype(np.int64, copy=False)
    if a.size and int(a.min()) < 0:
        raise IISInputError(f"{name} has negative labels (min {int(a.min())}): labels must be 0..K-1")
    if a.size and int(a.max()) >= MAX_CLASSES:
        raise IISInputError(f"{name} has label {int(a.max())}, above the largest supported class index "
                            f"{MAX_CLASSES - 1}: labels must be class indices 0..K-1")
    if num_classes is not None and a.size and int(a.max()) >= num_classes:
        raise IISInputError(f"{name} has label {int(a.max())} but there are only {num_classes} classes (labels "
                            f"must lie in [0, {num_classes})); pass num_classes= or fix the labels")
    return a
