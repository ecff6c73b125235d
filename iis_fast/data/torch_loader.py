"""The torch ``DataLoader`` + PIL/torchvision path: eval-preprocessed ``(images, labels)`` batches from an image folder or a
map-style dataset, the equivalent of :func:`iis_fast.data.ffcv_loader.ffcv_loader` without FFCV or numba (nothing
here imports them; tests/test_ffcv.py checks it in a fresh interpreter).

Preprocessing is timm's eval transform (``timm.data.create_transform``): resize the short side to
``floor(S / crop_pct)``, centre crop ``S``, ``ToTensor``, ``Normalize(mean, std)``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataFileError, IISInputError
from ..validation import rgb_triple, square_side, usable_cores

__all__ = ["eval_transform", "torch_loader"]

_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


class _EvalTransformDataset(torch.utils.data.Dataset):
    """Wraps a map-style dataset of ``(PIL image or uint8 array, label)`` with an eval transform."""

    def __init__(self, base: Any, transform: Any) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image
        image, label = self.base[i][:2]
        if not isinstance(image, Image.Image):
            a = np.asarray(image)
            if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
                a = a.transpose(1, 2, 0)
            image = Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a)
        return self.transform(image.convert("RGB")), int(label)


def eval_transform(image_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                   crop_pct: float = 1.0, interpolation: str = "bilinear") -> Any:
    """timm's eval transform: Resize(floor(S / crop_pct)), CenterCrop(S), ToTensor, Normalize(mean, std).

    Arguments are checked here first, so a bad one is a named :class:`IISInputError` rather than timm's assert.
    """
    from timm.data import create_transform
    S = square_side(image_size)
    if not 0 < float(crop_pct) <= 1:
        raise IISInputError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    if interpolation not in _INTERPOLATIONS:
        raise IISInputError(f"interpolation must be one of {list(_INTERPOLATIONS)}, got {interpolation!r}")
    return create_transform(S, is_training=False, interpolation=interpolation, mean=rgb_triple(mean, "mean"),
                            std=rgb_triple(std, "std"), crop_pct=float(crop_pct), crop_mode="center")


def torch_loader(
    dataset_or_folder: Any,
    image_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 64,
    num_workers: int = 0,
    *,
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
    shuffle: bool = False,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """The torch DataLoader + PIL/torchvision equivalent of :func:`ffcv_loader` (for comparison and fallback).

    Args:
        dataset_or_folder: an image folder path (``folder/<class>/<image>``, torchvision ``ImageFolder``: sorted
            classes, images converted to RGB) or a map-style dataset of ``(PIL image or uint8 array, label)``.
        image_size, mean, std, crop_pct: as in :func:`ffcv_loader`.
        interpolation: resize filter (``"bilinear"``, ``"bicubic"``, ``"nearest"``).
        batch_size, num_workers, shuffle, drop_last: DataLoader arguments (workers clamped to the core count).

    Returns:
        A ``DataLoader`` yielding ``(float32 [B, 3, S, S], int64 [B])``.
    """
    tf = eval_transform(image_size, mean, std, crop_pct, interpolation)
    if isinstance(dataset_or_folder, (str, os.PathLike)):
        from torchvision.datasets import ImageFolder
        folder = Path(os.fspath(dataset_or_folder))
        if not folder.is_dir():
            raise DataFileError(f"image folder {str(folder)!r} does not exist or is not a directory")
        ds: Any = ImageFolder(str(folder), transform=tf)
    elif hasattr(dataset_or_folder, "__getitem__") and hasattr(dataset_or_folder, "__len__"):
        ds = _EvalTransformDataset(dataset_or_folder, tf)
    else:
        raise IISInputError(f"dataset_or_folder must be a folder path or a map-style dataset, "
                            f"got {type(dataset_or_folder).__name__}")
    workers = max(0, min(int(num_workers), usable_cores()))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       drop_last=drop_last, persistent_workers=workers > 0)
