"""Fashion-MNIST from the local idx files (Debian's ``dataset-fashion-mnist``), as eval-preprocessed tensors.

Nothing is downloaded. Files are looked up in ``root``, else ``$IIS_FAST_FASHION_MNIST``, else
``/usr/share/datasets/fashion-mnist``; each may be gzip-compressed (``*.gz``, preferred) or raw.

- :func:`load_fashion_mnist`: the raw split as numpy arrays (uint8 images [N, 28, 28], int64 labels [N]).
- :class:`FashionMNIST`: a ``torch.utils.data.Dataset`` of ``(float [3, H, W], int)`` under eval preprocessing
  (resize, centre crop, normalise; grey replicated to 3 channels), over an optional index subset, with a
  ``fingerprint`` for feature caches.
- :func:`fashion_mnist_loaders`: (train, eval) DataLoaders, eval from the TEST split, no shuffling.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..errors import DataFileError, IISInputError
from ..validation import image_hw, rgb_triple
from .sampling import stratified_subset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_ENV",
    "fashion_mnist_root",
    "load_fashion_mnist",
    "FashionMNIST",
    "fashion_mnist_loaders",
]

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "IIS_FAST_FASHION_MNIST"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_FINGERPRINT_VERSION = 1


def fashion_mnist_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the idx files: ``root``, else ``$IIS_FAST_FASHION_MNIST``, else the Debian path."""
    if root is None:
        root = os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_ROOT
    return Path(root)


def _find_file(root: Path, stem: str) -> Path:
    for cand in (root / f"{stem}.gz", root / stem):
        if cand.is_file():
            return cand
    raise DataFileError(
        f"Fashion-MNIST file {str(root / (stem + '.gz'))!r} not found (nor uncompressed {stem!r}); "
        f"install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or point root= / "
        f"${FASHION_MNIST_ENV} at a directory holding {stem}.gz"
    )


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, stat_key: tuple[int, ...], magic: int) -> np.ndarray:
    del stat_key  # cache key only: a rewritten file is read again
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = Path(path).read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncation gives EOFError
        raise DataFileError(f"cannot read Fashion-MNIST file {path!r} (corrupt or truncated?): {e}") from e
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFileError(f"Fashion-MNIST file {path!r} is too short ({len(data)} bytes) for an idx header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataFileError(
            f"Fashion-MNIST file {path!r} has idx magic number 0x{found:08x}, expected 0x{magic:08x} "
            f"({'images' if ndim == 3 else 'labels'} file); wrong or corrupt file"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataFileError(
            f"Fashion-MNIST file {path!r} holds {len(data) - header} data bytes, its header {dims} says {expected}; "
            "the file is truncated or corrupt"
        )
    arr = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    arr.setflags(write=False)
    return arr


def _read_idx(path: Path, magic: int) -> np.ndarray:
    st = path.stat()
    return _read_idx_cached(str(path), (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), magic)


def _check_split(split: str) -> str:
    if split not in _PREFIX:
        raise IISInputError(f"split must be 'train' or 'test', got {split!r}")
    return split


def load_fashion_mnist(split: str, root: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one Fashion-MNIST split from its idx files.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: directory of the idx files (default: ``$IIS_FAST_FASHION_MNIST`` or the Debian path).

    Returns:
        ``(images, labels)``: uint8 ``[N, 28, 28]`` (read-only, shared by later calls) and int64 ``[N]`` in 0..9.

    Raises:
        DataFileError: a file is missing, truncated, not an idx file of the right kind, or the two disagree.
        IISInputError: ``split`` is not ``"train"``/``"test"``.
    """
    prefix = _PREFIX[_check_split(split)]
    base = fashion_mnist_root(root)
    img_path = _find_file(base, f"{prefix}-images-idx3-ubyte")
    lab_path = _find_file(base, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(img_path, _IMAGES_MAGIC)
    labels_u8 = _read_idx(lab_path, _LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataFileError(f"Fashion-MNIST file {str(img_path)!r} holds {images.shape[1:]} images, expected 28x28")
    if images.shape[0] != labels_u8.shape[0]:
        raise DataFileError(
            f"Fashion-MNIST files {str(img_path)!r} ({images.shape[0]} images) and {str(lab_path)!r} "
            f"({labels_u8.shape[0]} labels) disagree"
        )
    if labels_u8.size and int(labels_u8.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataFileError(f"Fashion-MNIST file {str(lab_path)!r} has label {int(labels_u8.max())} outside 0..9")
    return images, labels_u8.astype(np.int64)


class FashionMNIST(Dataset):
    """Fashion-MNIST under eval preprocessing: ``(float32 [3, H, W], int label)`` per item.

    Preprocessing (no augmentation): uint8 -> [0, 1]; resize the 28x28 image to ``image_size / crop_pct``
    (``interpolation``, antialiased when shrinking); centre crop to ``image_size``; grey -> 3 channels;
    ``(x - mean) / std``.

    Args:
        split: ``"train"`` or ``"test"``.
        image_size: output size, int or (H, W).
        mean, std: per-channel normalisation (3 values, or one for all).
        indices: positions in the split to expose, in this order (default: all).
        root: directory of the idx files (see :func:`load_fashion_mnist`).
        crop_pct: fraction of the resized image kept by the centre crop (1.0: no crop).
        interpolation: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.

    Attributes:
        fingerprint: hex digest of (split, indices, image_size, crop_pct, interpolation, mean, std); equal
            fingerprints mean identical tensors, so feature caches can key on it without hashing pixels.
        targets: int64 labels of the exposed items; ``indices``: their positions in the split.
    """

    classes = FASHION_MNIST_CLASSES
    num_classes = len(FASHION_MNIST_CLASSES)

    def __init__(
        self,
        split: str,
        image_size: int | Sequence[int] = 224,
        mean: float | Sequence[float] = (0.485, 0.456, 0.406),
        std: float | Sequence[float] = (0.229, 0.224, 0.225),
        indices: Sequence[int] | np.ndarray | None = None,
        root: str | os.PathLike[str] | None = None,
        crop_pct: float = 1.0,
        interpolation: str = "bilinear",
    ) -> None:
        self.split = _check_split(split)
        images, labels = load_fashion_mnist(split, root)
        if indices is None:
            idx = np.arange(images.shape[0], dtype=np.int64)
        else:
            idx = np.asarray(indices)
            if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
                raise IISInputError(f"indices must be a 1-D sequence of integers, got {idx.dtype} {idx.shape}")
            idx = idx.astype(np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= images.shape[0]):
                raise IISInputError(
                    f"indices must lie in 0..{images.shape[0] - 1} for the {split} split, "
                    f"got {int(idx.min())}..{int(idx.max())}"
                )
        if not 0 < float(crop_pct) <= 1:
            raise IISInputError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise IISInputError(f"interpolation must be 'bilinear', 'bicubic' or 'nearest', got {interpolation!r}")
        self.indices = idx
        self.image_size = image_hw(image_size)
        self.mean = rgb_triple(mean, "mean")
        self.std = rgb_triple(std, "std")
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation
        self._images = torch.from_numpy(np.ascontiguousarray(images[idx]))  # only the subset, [n, 28, 28] uint8
        self.targets = labels[idx]
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        desc = {
            "dataset": "fashion-mnist",
            "version": _FINGERPRINT_VERSION,
            "split": self.split,
            "n": int(self.indices.size),
            "indices_sha256": hashlib.sha256(self.indices.astype("<i8").tobytes()).hexdigest(),
            "image_size": list(self.image_size),
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]

    def __len__(self) -> int:
        return int(self.indices.size)

    def preprocess(self, images_u8: torch.Tensor) -> torch.Tensor:
        """Eval preprocessing of uint8 ``[B, 28, 28]`` images -> float32 ``[B, 3, H, W]``."""
        x = images_u8.to(torch.float32).div_(255.0).unsqueeze(1)
        h, w = self.image_size
        rh, rw = (max(h, round(h / self.crop_pct)), max(w, round(w / self.crop_pct)))
        if (rh, rw) != tuple(x.shape[-2:]):
            kw: dict[str, Any] = {}
            if self.interpolation != "nearest":
                kw = {"align_corners": False, "antialias": rh < x.shape[-2] or rw < x.shape[-1]}
            x = F.interpolate(x, size=(rh, rw), mode=self.interpolation, **kw)
            if self.interpolation == "bicubic":
                x = x.clamp_(0.0, 1.0)  # as a uint8 image pipeline would
        top, left = (rh - h) // 2, (rw - w) // 2
        x = x[:, :, top: top + h, left: left + w]
        return (x.expand(-1, 3, -1, -1) - self._mean_t) / self._std_t

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a FashionMNIST subset of {len(self)}")
        return self.preprocess(self._images[i: i + 1] if i >= 0 else self._images[i][None])[0], int(self.targets[i])

    def __getitems__(self, items: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """Batched fetch (used by DataLoader): one interpolate call per batch instead of one per image."""
        idx = torch.as_tensor(list(items), dtype=torch.long)
        x = self.preprocess(self._images[idx])
        return [(x[j], int(self.targets[int(i)])) for j, i in enumerate(idx)]

    def __repr__(self) -> str:
        return (f"FashionMNIST(split={self.split!r}, n={len(self)}, image_size={self.image_size}, "
                f"fingerprint={self.fingerprint!r})")


def fashion_mnist_loaders(
    n_train: int | None,
    n_eval: int | None,
    image_size: int | Sequence[int],
    mean: float | Sequence[float],
    std: float | Sequence[float],
    batch_size: int = 64,
    seed: int = 0,
    *,
    root: str | os.PathLike[str] | None = None,
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """(train, eval) DataLoaders of class-balanced Fashion-MNIST subsets under eval preprocessing.

    Train items come from the TRAIN split, eval items from the TEST split, each a :func:`stratified_subset`
    (``None``: the whole split) in ascending index order; no shuffling, so batches are deterministic. The
    datasets (with their ``fingerprint``) are ``loader.dataset``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise IISInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    loaders = []
    for split, n in (("train", n_train), ("test", n_eval)):
        idx = None if n is None else stratified_subset(load_fashion_mnist(split, root)[1], n, seed)
        ds = FashionMNIST(split, image_size, mean, std, indices=idx, root=root, crop_pct=crop_pct,
                          interpolation=interpolation)
        loaders.append(DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers))
    return loaders[0], loaders[1]
