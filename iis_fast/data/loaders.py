"""Turn whatever a user passes as data into an iterable of ``(images, labels)`` batches."""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DataFileError, IISInputError

__all__ = ["resolve_loader", "held_ffcv_loader", "release_ffcv_loaders"]

#: FFCV loaders of this process, by file state and pipeline: a new FFCV loader compiles its numba pipeline on its
#: first epoch (1.5-2 s), and dropping one makes numba's finalizers print tracebacks. So a process builds one loader
#: per (file, pipeline) and re-iterates it: a sweep worker pays the compile once per split, not per checkpoint.
_HELD: dict[tuple, Any] = {}


def resolve_loader(
    data: Any,
    *,
    image_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    device: str | torch.device,
    num_workers: int | None = None,
    crop_pct: float = 1.0,
    num_classes: int | None = None,
) -> Iterable[Any]:
    """An iterable of ``(images float [B, 3, H, W] normalised, labels int64 [B])`` batches for ``data``.

    - a path (``str``/``PathLike``) to a file: an FFCV ``.beton`` -> :func:`~iis_fast.data.ffcv_loader.ffcv_loader`
      (validated first; eval preprocessing with ``image_size``, ``crop_pct``, ``mean``, ``std``; sequential order,
      every sample once, on ``device``);
    - a path to a directory: an image folder (``folder/<class>/<image>``) ->
      :func:`~iis_fast.data.torch_loader.torch_loader` with the same preprocessing;
    - an FFCV ``Loader``, a torch ``DataLoader``, an :class:`~iis_fast.data.ffcv_loader.FFCVImageLoader` or any
      other iterable: returned as is (the caller's preprocessing is trusted; note that a raw FFCV ``Loader``
      reuses its batch buffers, so clone a batch you keep beyond the next iteration).

    ``crop_pct`` defaults to 1.0 (the whole stored image is resized to ``image_size``), right for files stored at
    the model's input size; pass the model's ``crop_pct`` (timm: usually 0.875) for full-size photos.

    Raises:
        DataFileError: a missing path, or a file that is not a valid ``.beton``.
        IISInputError: ``data`` is not iterable.
    """
    if isinstance(data, (str, os.PathLike)):
        p = Path(os.fspath(data)).expanduser()
        if p.is_dir():
            from .torch_loader import torch_loader
            return torch_loader(p, image_size, mean, std, batch_size=batch_size,
                                num_workers=0 if num_workers is None else num_workers, crop_pct=crop_pct)
        if not p.exists():
            raise DataFileError(f"data file {str(p)!r}: no such file or directory (expected an FFCV .beton file "
                                "or an image folder)")
        return held_ffcv_loader(p, image_size=image_size, mean=mean, std=std, batch_size=batch_size,
                                num_workers=num_workers, device=device, crop_pct=crop_pct, num_classes=num_classes)
    if isinstance(data, (bytes, bytearray)) or not hasattr(data, "__iter__"):
        raise IISInputError(f"data must be a .beton path, an image folder, or an iterable of (images, labels) "
                            f"batches (FFCV Loader, torch DataLoader, ...), got {type(data).__name__}")
    return data


def held_ffcv_loader(path: Path, *, image_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                     batch_size: int, num_workers: int | None, device: str | torch.device, crop_pct: float,
                     num_classes: int | None) -> Any:
    """The process's sequential eval FFCV loader for ``path`` with this pipeline, built on first use (see _HELD).

    Keyed by the file's absolute path, size and mtime, so a rewritten file gets a new loader.
    """
    from .ffcv_loader import ffcv_loader
    st = path.stat()
    size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (int(image_size),)
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, size, tuple(float(v) for v in mean),
           tuple(float(v) for v in std), int(batch_size), num_workers, str(device), float(crop_pct), num_classes)
    if key not in _HELD:
        _HELD[key] = ffcv_loader(path, image_size, mean, std, batch_size=batch_size, num_workers=num_workers,
                                 device=device, order="sequential", drop_last=False, crop_pct=crop_pct,
                                 num_classes=num_classes)
    return _HELD[key]


def release_ffcv_loaders() -> int:
    """Drop every held FFCV loader (frees their buffers); returns how many there were."""
    n = len(_HELD)
    _HELD.clear()
    return n
