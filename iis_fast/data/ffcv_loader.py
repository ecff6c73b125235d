"""Eval-preprocessed ``(images, labels)`` batches from an FFCV ``.beton`` file (the torch DataLoader equivalent is
:mod:`iis_fast.data.torch_loader`, which needs neither FFCV nor numba).

FFCV pipeline (CPU)::

    CenterCropRGBImageDecoder((S, S), ratio=crop_pct) -> ToTensor          (uint8 NHWC, FFCV's reused buffer)
    then, per batch, one numba pass: uint8 -> float32 through a [256, 3] lookup table into a *fresh* tensor
    (channels-last [B, 3, S, S]); this normalises right after the decoder and replaces a separate clone.

FFCV pipeline (GPU, ``device="cuda..."``)::

    CenterCropRGBImageDecoder -> ToTensor -> ToDevice(non_blocking) -> ToTorchImage   ... then normalised on the
    GPU with torch ops (uint8 crosses the bus: 4x less than float32), which also makes a fresh tensor.

Crop semantics. FFCV's ``CenterCropRGBImageDecoder(output_size, ratio)`` cuts the centred square of side
``int(ratio * min(H, W))`` from the stored image and resizes it (OpenCV ``INTER_AREA``) to ``output_size``. timm's
eval transform resizes the short side to ``floor(S / crop_pct)`` and cuts the centred ``S x S``: in source
pixels that is the centred square of side ``~crop_pct * min(H, W)``. So ``ratio = crop_pct`` gives the same
region (up to a pixel of rounding); the interpolation differs (INTER_AREA vs PIL bilinear/bicubic), so FFCV and
torchvision images agree within interpolation tolerance, and exactly when the stored image already has the output
size and ``crop_pct = 1`` (crop and resize are then the identity in both). Only square outputs are supported
(FFCV's centre crop is square).

Normalisation uses a lookup table computed with the same float32 torch ops as torchvision's
``ToTensor(); Normalize(mean, std)``, so for identical uint8 pixels the two paths give bit-identical tensors.

Pitfalls handled here:
- FFCV's ``NormalizeImage`` placed after ``ToTensor`` hangs the CPU loader: we do not use it on CPU; the
  table pass above runs on the decoder's uint8 output.
- FFCV reuses its output buffers (a ring of ``batches_ahead`` + a few): every yielded batch is fresh memory (the
  table pass on CPU, the GPU normalisation, ``clone()`` for labels), so batches kept by the caller stay valid.
- A fresh float batch is mostly page faults: ``torch.empty`` + first touch ~0.4 ms per 224px image, a clone the
  same. We fuse normalise + copy in one pass into a numpy-allocated (transparent-huge-page) array: ~0.25 ms of CPU
  per image for the whole loader on raw 224px files.
- numba threads = ``num_workers``, never above the usable core count. FFCV's ``Loader`` also calls
  ``torch.set_num_threads(num_workers)`` (``Compiler.set_num_threads``); we restore torch's thread count.
- FFCV compiles its pipeline with ``fastmath=True``; our normalisation is a separate kernel without fastmath,
  which is what keeps it bit-identical to torchvision.
- When an FFCV loader is garbage-collected, numba's dispatcher finaliser for FFCV's ``imdecode`` raises a
  ``KeyError`` that is printed as "Exception ignored" (harmless). On CPython 3.11.7, if that GC happens inside
  ``ast.parse`` it corrupts the parser's recursion counter ("SystemError: AST constructor recursion depth
  mismatch") - seen at pytest's session end; keep loaders alive for the process if that bites.
- The first epoch pays numba compilation (seconds); later epochs and later loaders over the same pipeline do not.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from numba import njit, prange

from ..errors import IISInputError
from ..validation import rgb_triple, square_side, usable_cores
from .beton import BetonInfo, ffcv_module, validate_beton

__all__ = ["FFCVImageLoader", "ffcv_loader", "normalize_lut", "normalize_batch"]

_FINGERPRINT_VERSION = 1


def normalize_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 ``[256, 3]``: ``(v / 255 - mean[c]) / std[c]`` computed exactly as torchvision's ToTensor+Normalize."""
    m = torch.as_tensor(mean, dtype=torch.float32)
    s = torch.as_tensor(std, dtype=torch.float32)
    v = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255)
    return ((v[:, None] - m[None, :]) / s[None, :]).contiguous().numpy()


@njit(parallel=True, nogil=True, cache=True)
def _lut_nhwc(src, lut, dst):  # type: ignore[no-untyped-def]  # src uint8 [B, P, 3] -> dst float32 [B, P, 3]
    for i in prange(src.shape[0]):
        for p in range(src.shape[1]):
            dst[i, p, 0] = lut[src[i, p, 0], 0]
            dst[i, p, 1] = lut[src[i, p, 1], 1]
            dst[i, p, 2] = lut[src[i, p, 2], 2]


@njit(parallel=True, nogil=True, cache=True)
def _lut_nchw(src, lut, dst):  # type: ignore[no-untyped-def]  # src uint8 [B, P, 3] -> dst float32 [B, 3, P]
    for i in prange(src.shape[0]):
        for p in range(src.shape[1]):
            dst[i, 0, p] = lut[src[i, p, 0], 0]
            dst[i, 1, p] = lut[src[i, p, 1], 1]
            dst[i, 2, p] = lut[src[i, p, 2], 2]


def normalize_batch(images_u8: torch.Tensor, lut: np.ndarray, channels_last: bool = True) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` (CPU) -> a fresh float32 ``[B, 3, H, W]`` through ``lut`` (see :func:`normalize_lut`).

    One pass that both normalises and copies out of FFCV's reused buffer (no separate clone). The output is
    allocated by numpy, which madvises large blocks for transparent huge pages: first-touch page faults of a fresh
    38 MB batch cost ~0.1 ms per 224px image that way instead of ~0.4 ms with ``torch.empty``.
    """
    B, H, W, C = images_u8.shape
    src = images_u8.numpy().reshape(B, H * W, C)
    if channels_last:
        out = np.empty((B, H, W, 3), dtype=np.float32)
        _lut_nhwc(src, lut, out.reshape(B, H * W, 3))
        return torch.from_numpy(out).permute(0, 3, 1, 2)
    out = np.empty((B, 3, H, W), dtype=np.float32)
    _lut_nchw(src, lut, out.reshape(B, 3, H * W))
    return torch.from_numpy(out)


_ORDERS = ("sequential", "random", "quasi_random")


class FFCVImageLoader:
    """Iterable of ``(images float32 [B, 3, S, S] normalised, labels int64 [B])`` from a ``.beton`` file.

    Build it with :func:`ffcv_loader`. ``len(loader)`` is the number of **batches** (as for a torch DataLoader);
    ``loader.num_samples`` the number of samples one epoch yields. ``loader.ffcv`` is the underlying
    ``ffcv.loader.Loader``; ``loader.info`` the file's :class:`BetonInfo`.

    Attributes:
        fingerprint: hex digest of (absolute path, file size, mtime, image size, crop_pct, mean, std, order, seed,
            drop_last, decoder); equal fingerprints mean identical batches, so feature caches can key on it.
    """

    def __init__(self, path: str | os.PathLike[str], image_size: int | Sequence[int], mean: Sequence[float],
                 std: Sequence[float], *, batch_size: int, num_workers: int, device: str | torch.device,
                 order: str, drop_last: bool, channels_last: bool, crop_pct: float, num_classes: int | None,
                 seed: int, batches_ahead: int) -> None:
        ffcv_module()
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise IISInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not 0 < float(crop_pct) <= 1:
            raise IISInputError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        order_key = str(getattr(order, "name", order)).lower()
        if order_key not in _ORDERS:
            raise IISInputError(f"order must be one of {_ORDERS}, got {order!r}")
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise IISInputError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise IISInputError(f"device={device!r} but CUDA is not available")
        # Fail on a bad file before any numba compilation.
        self.info: BetonInfo = validate_beton(path, num_classes=num_classes)
        self.path = self.info.path
        self.image_size = square_side(image_size)
        self.mean, self.std = rgb_triple(mean, "mean"), rgb_triple(std, "std")
        self.crop_pct = float(crop_pct)
        self.batch_size = int(batch_size)
        self.order, self.seed = order_key, int(seed)
        self.drop_last, self.channels_last = bool(drop_last), bool(channels_last)
        cores = usable_cores()
        if num_workers < 1:
            raise IISInputError(f"num_workers must be a positive integer, got {num_workers!r}")
        if num_workers > cores:
            warnings.warn(f"num_workers={num_workers} exceeds the {cores} usable cores; using {cores}", stacklevel=3)
        self.num_workers = min(int(num_workers), cores)

        S = self.image_size
        decoder = CenterCropRGBImageDecoder((S, S), ratio=self.crop_pct)
        if self.device.type == "cpu":
            image_pipe = [decoder, ToTensor()]  # uint8 NHWC; normalised (and copied out) in __iter__
        else:
            image_pipe = [decoder, ToTensor(), ToDevice(self.device, non_blocking=True),
                          ToTorchImage(channels_last=True)]
        label_pipe = [IntDecoder(), ToTensor(), Squeeze(1)]
        if self.device.type == "cuda":
            label_pipe.append(ToDevice(self.device, non_blocking=True))
        self._lut = np.ascontiguousarray(normalize_lut(self.mean, self.std))
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        torch_threads = torch.get_num_threads()  # FFCV's Compiler.set_num_threads also sets torch's: undo that
        self.ffcv = Loader(
            self.path, batch_size=self.batch_size, num_workers=self.num_workers,
            order={"sequential": OrderOption.SEQUENTIAL, "random": OrderOption.RANDOM,
                   "quasi_random": OrderOption.QUASI_RANDOM}[order_key],
            seed=self.seed, drop_last=self.drop_last, batches_ahead=batches_ahead,
            pipelines={self.info.image_field: image_pipe, self.info.label_field: label_pipe},
        )
        torch.set_num_threads(torch_threads)
        # Fields other than image/label are decoded by FFCV's default pipeline and dropped here.
        self._out_index = self._field_order()
        n = self.info.num_samples
        self.num_samples = (n // self.batch_size) * self.batch_size if self.drop_last else n
        self.fingerprint = self._fingerprint()

    def _field_order(self) -> tuple[int, int]:
        names = list(self.ffcv.reader.handlers)
        return names.index(self.info.image_field), names.index(self.info.label_field)

    def _fingerprint(self) -> str:
        desc = {
            "kind": "ffcv-beton", "version": _FINGERPRINT_VERSION, "path": self.path, "size": self.info.size,
            "mtime_ns": self.info.mtime_ns, "image_size": self.image_size, "crop_pct": self.crop_pct,
            "mean": list(self.mean), "std": list(self.std), "order": self.order,
            "seed": self.seed if self.order != "sequential" else None, "drop_last": self.drop_last,
            "decoder": "CenterCropRGBImageDecoder/INTER_AREA+lut-normalize",
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]

    def __len__(self) -> int:
        """Number of batches per epoch."""
        return len(self.ffcv)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        ii, li = self._out_index
        for batch in self.ffcv:
            images, labels = batch[ii], batch[li]
            if self.device.type == "cpu":   # FFCV reuses the buffer behind `images`: this writes a fresh tensor
                images = normalize_batch(images, self._lut, self.channels_last)
            else:
                images = images.float().div_(255).sub_(self._mean_t).div_(self._std_t)  # a fresh tensor
                images = images.contiguous(memory_format=fmt)
            yield images, labels.clone().long().view(-1)

    def __repr__(self) -> str:
        return (f"FFCVImageLoader({self.path!r}, n={self.num_samples}, image_size={self.image_size}, "
                f"crop_pct={self.crop_pct}, batch_size={self.batch_size}, workers={self.num_workers}, "
                f"device={str(self.device)!r})")


def ffcv_loader(
    path: str | os.PathLike[str],
    image_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | torch.device = "cpu",
    order: str = "sequential",
    drop_last: bool = False,
    channels_last: bool = True,
    *,
    crop_pct: float = 1.0,
    num_classes: int | None = None,
    seed: int = 0,
    batches_ahead: int = 3,
) -> FFCVImageLoader:
    """A loader of eval-preprocessed ``(images, labels)`` batches from an FFCV ``.beton`` file.

    Preprocessing: centre square of side ``crop_pct * min(H, W)`` resized (INTER_AREA) to ``image_size`` (=
    timm's "resize short side to ``S / crop_pct``, centre crop ``S``", see the module docstring), uint8 -> [0, 1],
    ``(x - mean) / std``; no augmentation. The file is validated first (:func:`validate_beton`), so a bad file
    fails before numba compiles anything.

    Args:
        path: the ``.beton`` file (fields ``image``: RGBImageField, ``label``: IntField).
        image_size: output side S (int or ``(S, S)``).
        mean, std: per-channel normalisation, in [0, 1] units (e.g. ImageNet ``(0.485, 0.456, 0.406)``).
        batch_size: samples per batch.
        num_workers: numba decoding threads (default: the usable core count; clamped to it, with a warning).
        device: ``"cpu"`` or ``"cuda[:i]"`` (GPU: uint8 is copied with ``ToDevice`` and normalised there).
        order: ``"sequential"`` (default; every sample once, in file order), ``"random"`` or ``"quasi_random"``.
        drop_last: drop a short last batch (default False: every sample is counted once).
        channels_last: yield channels-last memory format (the shape is always ``[B, 3, S, S]``).
        crop_pct: timm's crop fraction (1.0: no crop, the whole image is resized).
        num_classes: if given, labels are checked to be below it.
        seed: order seed for the random orders.
        batches_ahead: FFCV prefetch depth.

    Returns:
        An :class:`FFCVImageLoader`: iterate it for ``(float32 [B, 3, S, S], int64 [B])``; ``len()`` is in batches;
        ``.fingerprint`` keys feature caches.

    Raises:
        DataFileError: missing/truncated/corrupt file, missing label field, labels out of range.
        IISInputError: bad arguments.
    """
    return FFCVImageLoader(path, image_size, mean, std, batch_size=batch_size,
                           num_workers=usable_cores() if num_workers is None else num_workers, device=device,
                           order=order, drop_last=drop_last, channels_last=channels_last, crop_pct=crop_pct,
                           num_classes=num_classes, seed=seed, batches_ahead=batches_ahead)
