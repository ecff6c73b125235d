"""The official element geometry (docs/spec.md §1.2, ``element_geometry="official"``).

The official extractors cut elements from the *full-resolution* source image and save them as JPEG files, which
its embedding script reads back under the model's evaluation preprocessing:

- patches: a 4 x 4 grid of ``int(W/4) x int(H/4)`` cells, each resized to 224 x 224 (PIL's default, bicubic);
- segments: SLIC (n_segments 10/20/30, compactness 10, sigma 1, skimage's 1-based labels) on the full image;
  candidate labels ``0 .. max-1`` (so label ``max`` never is one, and label 0 is empty); a candidate is kept when
  it covers more than 0.1 % of the image and overlaps every mask kept for an earlier setting by Jaccard <= 0.5,
  at most 5 per setting; the element is the masked image (grey 117 outside) cut at ``[min, max)`` of the mask's
  rows and columns, resized (bicubic) back to the source image's size;
- every element is stored as a JPEG (quality 75) and embedded after resizing its shorter side to 256/224 of the
  model's input size (bilinear, antialiased) and centre-cropping to the input size.

Functions here return elements in *extraction order* (cells row-major, segments in selection order), like
:mod:`iis_fast.concepts.elements`; :func:`iis_fast.concepts.elements.official_order` maps that to the official
file order.
"""
from __future__ import annotations

import io
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..errors import IISInputError
from .elements import ELEMENT_KINDS, ElementInfo, _as_label_array, _check_kinds, _check_out_size, _embed_batches, \
    _stats

OFFICIAL_PATCH_SIZE = 224      # the official patch extractor's fixed output size
OFFICIAL_GREY = 117.0          # the official segment background
JPEG_QUALITY = 75              # PIL's default, what the official extractors' ``.save(*.jpg)`` uses
RESIZE_RATIO = 256 / 224       # the official embedding: Resize(256) then CenterCrop(224)


def _check_raw(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
        raise IISInputError(f"a raw source image must be uint8 [H, W] or [H, W, 3], got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a[:, :, :3])


def official_patches(image: np.ndarray, grid: int = 4) -> list[np.ndarray]:
    """The official patch extractor on one uint8 [H, W, 3] image: ``grid**2`` uint8 224 x 224 x 3 cells, row-major."""
    from PIL import Image

    img = Image.fromarray(_check_raw(image))
    width, height = img.size
    w, h = int(width / grid), int(height / grid)
    if w < 1 or h < 1:
        raise IISInputError(f"a {width}x{height} image is too small for a {grid}x{grid} patch grid")
    boxes = [(j * w, i * h, (j + 1) * w, (i + 1) * h) for i in range(grid) for j in range(grid)]
    return [np.asarray(img.crop(b).resize((OFFICIAL_PATCH_SIZE, OFFICIAL_PATCH_SIZE), Image.BICUBIC))
            for b in boxes]


def official_segment_masks(image: np.ndarray, n_segments: Sequence[int] = (10, 20, 30), compactness: float = 10,
                           sigma: float = 1.0, max_per_setting: int = 5) -> list[np.ndarray]:
    """The masks the official segment extractor keeps, in selection order (see the module docstring)."""
    from skimage.segmentation import slic

    img = _check_raw(image)
    kept: list[np.ndarray] = []
    for k in n_segments:
        seg = slic(img, n_segments=int(k), compactness=compactness, sigma=sigma, channel_axis=-1, start_label=1)
        new: list[np.ndarray] = []
        for s in range(int(seg.max())):
            mask = seg == s
            if not mask.mean() > 0.001:
                continue
            if any(np.logical_and(mask, m).sum() / np.logical_or(mask, m).sum() > 0.5 for m in kept):
                continue
            new.append(mask)
            if len(new) >= max_per_setting:
                break
        kept.extend(new)
    return kept


def official_segment_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The official element of one mask: grey outside the mask, cut at [min, max) of its rows and columns,
    resized (bicubic) to the image's size. A mask one pixel thin (an empty official cut, on which the official
    code fails) is cut inclusively instead."""
    from PIL import Image

    img = _check_raw(image)
    m = np.asarray(mask, dtype=bool)
    patch = np.where(m[:, :, None], img.astype(np.float64), OFFICIAL_GREY)
    ys, xs = np.nonzero(m)
    h1, h2, w1, w2 = ys.min(), ys.max(), xs.min(), xs.max()
    if h2 == h1 or w2 == w1:
        h2, w2 = h2 + 1, w2 + 1
    piece = Image.fromarray(patch[h1:h2, w1:w2].astype(np.uint8))
    return np.asarray(piece.resize((img.shape[1], img.shape[0]), Image.BICUBIC))


def official_segments(image: np.ndarray, **slic_opts: Any) -> list[np.ndarray]:
    """The official segment elements of one uint8 image (uint8 arrays of the image's size), selection order."""
    return [official_segment_image(image, m) for m in official_segment_masks(image, **slic_opts)]


def jpeg_roundtrip(element: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """The element as the official embedding reads it back: saved as JPEG (PIL defaults), decoded to RGB."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(element).convert("RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def official_embedding_input(element: np.ndarray, out_size: Sequence[int] | int) -> torch.Tensor:
    """The official evaluation preprocessing of one uint8 element, without the normalisation: resize the shorter
    side to 256/224 of the input size (bilinear, antialiased, on uint8 as torchvision does), centre crop to the
    input size. Returns float [3, h, w] in [0, 1]."""
    import torchvision.transforms.functional as TF

    h, w = _check_out_size(out_size)
    t = torch.from_numpy(np.array(element, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    t = TF.resize(t, int(round(min(h, w) * RESIZE_RATIO)), interpolation=TF.InterpolationMode.BILINEAR,
                  antialias=True)
    t = TF.center_crop(t, [h, w])
    return t.float().div_(255.0)


def official_element_images(image: np.ndarray, kind: str, out_size: Sequence[int] | int) -> torch.Tensor:
    """Every official element of one kind of one raw image, as embedding inputs [n, 3, h, w] in [0, 1]."""
    if kind == "patches":
        pieces = official_patches(image)
    elif kind == "segments":
        pieces = official_segments(image)
    else:
        raise IISInputError(f"kind={kind!r}: choose one of {ELEMENT_KINDS}")
    h, w = _check_out_size(out_size)
    if not pieces:
        return torch.zeros(0, 3, h, w)
    return torch.stack([official_embedding_input(jpeg_roundtrip(p), (h, w)) for p in pieces])


def embed_official_elements(embed_fn: Callable[[torch.Tensor], torch.Tensor], raw_images: Sequence[np.ndarray],
                            labels: Sequence[int] | np.ndarray | torch.Tensor, out_size: Sequence[int] | int,
                            mean: Sequence[float], std: Sequence[float], kinds: Sequence[str] = ELEMENT_KINDS,
                            batch_size: int = 64, device: torch.device | str | None = None,
                            progress: bool = True, n_jobs: int = 1
                            ) -> tuple[torch.Tensor, torch.Tensor, ElementInfo]:
    """Make (official geometry) and embed the elements of raw uint8 source images, one image at a time.

    Returns ``(element_feats [E, D] float32 unit rows, element_labels [E], ElementInfo)`` kind-major, like
    :func:`iis_fast.concepts.embed_concept_elements`. ``n_jobs`` > 1 builds that many images at once in threads.
    """
    kinds = _check_kinds(kinds)
    size = _check_out_size(out_size)
    lab = _as_label_array(labels)
    if lab.shape[0] != len(raw_images):
        raise IISInputError(f"labels has {lab.shape[0]} entries but {len(raw_images)} raw images were given")
    mean_t, std_t = _stats(mean, "mean"), _stats(std, "std")
    from tqdm.auto import tqdm

    def build(i: int) -> dict[str, torch.Tensor]:
        return {k: official_element_images(raw_images[i], k, size) for k in kinds}

    feats: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    srcs: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
    bar = tqdm(total=len(raw_images), desc="official elements", unit="img", disable=not progress)
    try:
        step = max(1, int(n_jobs)) * 4
        for start in range(0, len(raw_images), step):
            ids = list(range(start, min(start + step, len(raw_images))))
            if int(n_jobs) > 1:
                from joblib import Parallel, delayed
                built = Parallel(n_jobs=int(n_jobs), prefer="threads")(delayed(build)(i) for i in ids)
            else:
                built = [build(i) for i in ids]
            for i, per_kind in zip(ids, built):
                for k in kinds:
                    el = per_kind[k]
                    if el.shape[0]:
                        feats[k].append(_embed_batches(embed_fn, el, mean_t, std_t, int(batch_size), device, None))
                        srcs[k].append(np.full(el.shape[0], i, dtype=np.int64))
                bar.update(1)
    finally:
        bar.close()
    if not any(feats[k] for k in kinds):
        raise IISInputError("no concept elements were produced from the raw source images")
    src_per_kind = [(k, np.concatenate(srcs[k])) for k in kinds if srcs[k]]
    info = ElementInfo.from_sources(src_per_kind)
    out_feats = torch.cat([f for k in kinds for f in feats[k]])
    return out_feats, torch.as_tensor(lab[info.source], dtype=torch.long), info


def raw_source_images(loader: Any, indices: Iterable[int]) -> list[np.ndarray] | None:
    """The full-resolution uint8 [H, W, 3] images at sample ``indices`` of ``loader``'s dataset, or None when the
    loader cannot give them (then only ``element_geometry="crop"`` is possible).

    Understood: a dataset with a ``raw_image(i)`` method (returning uint8 [H, W] or [H, W, 3]); the bundled
    Fashion-MNIST dataset (its 28 x 28 images, grey replicated to RGB); ``torchvision.datasets.ImageFolder`` and
    anything else with ``samples`` of (path, label) (files read with PIL, converted to RGB).
    """
    ds = getattr(loader, "dataset", None)
    if ds is None:
        return None
    idx = [int(i) for i in indices]
    if callable(getattr(ds, "raw_image", None)):
        return [_check_raw(ds.raw_image(i)) for i in idx]
    from ..data.fashion_mnist import FashionMNIST, load_fashion_mnist
    if isinstance(ds, FashionMNIST):
        images = load_fashion_mnist(ds.split, getattr(ds, "root", None))[0]
        return [_check_raw(images[int(ds.indices[i])]) for i in idx]
    samples = getattr(ds, "samples", None)
    if isinstance(samples, (list, tuple)) and samples and isinstance(samples[0], (list, tuple)):
        from PIL import Image
        return [np.asarray(Image.open(samples[i][0]).convert("RGB")) for i in idx]
    return None
