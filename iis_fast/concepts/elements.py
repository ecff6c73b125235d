"""Concept elements: patches and SLIC segments of concept-source images, and their embeddings (docs/spec.md §1.2).

Images are float tensors in [0, 1] of shape [N, 3, H, W] (un-normalised). Element images are
[E, 3, out_h, out_w] in [0, 1], resized to the model's input size with antialiased bilinear interpolation.

Element order is *kind-major*: all patches (image by image, row-major cells), then all segments (image by
image, setting by setting, label order). :func:`embed_concept_elements` streams images in chunks and keeps the
same order, so the result does not depend on the chunk size. :func:`official_order` gives the order of the
official code's element files (docs/spec.md §1.2), which "first" selections read.

Element images depend only on the source images and the geometry, never on the model, so a sweep that scores
many checkpoints of one run would rebuild the same images (SLIC and cropping) for each. ``embed_concept_elements(...,
cache=FeatureCache(...))`` stores them as an on-disk cache entry that every process and every later run reads
memory-mapped and only re-embeds; ``memo=True`` keeps them in a small per-process memo (:data:`ELEMENT_MEMO_BYTES`).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import IISInputError
from ..validation import image_hw, label_array, rgb_triple

ELEMENT_KINDS = ("patches", "segments")
ELEMENT_CHOICES = ("patches", "segments", "both")
GREY_117 = (117, 117, 117)

EmbedFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------- validation
def _check_images(images01: torch.Tensor, name: str = "images01") -> torch.Tensor:
    if not isinstance(images01, torch.Tensor):
        raise IISInputError(f"{name} must be a torch.Tensor of shape [N, 3, H, W] in [0, 1], got {type(images01)}")
    if images01.ndim != 4 or images01.shape[1] != 3:
        raise IISInputError(
            f"{name} has shape {tuple(images01.shape)}; expected [N, 3, H, W] (RGB, channels first)")
    if not images01.is_floating_point():
        raise IISInputError(f"{name} has dtype {images01.dtype}; convert to float in [0, 1] (e.g. uint8 / 255)")
    if images01.numel() and not torch.isfinite(images01).all():
        raise IISInputError(f"{name} contains NaN or Inf; pass finite pixel values in [0, 1]")
    return images01


def _check_out_size(out_size: Sequence[int] | int) -> tuple[int, int]:
    return image_hw(out_size, "out_size")


def _as_label_array(labels: Sequence[int] | np.ndarray | torch.Tensor, name: str = "labels") -> np.ndarray:
    return label_array(labels, name)


def _resize(images: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == out_size:
        return images.clamp(0.0, 1.0)
    out = F.interpolate(images, size=out_size, mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


# -------------------------------------------------------------------------------------------- source images
def concept_source_indices(labels: Sequence[int] | np.ndarray | torch.Tensor,
                           images_per_class: int = 10) -> np.ndarray:
    """Indices of the concept-source images: the first ``images_per_class`` of every class.

    ``labels`` are the TRAIN split's labels in the loader's (deterministic) order. The result is sorted
    ascending, i.e. in that same order; a class with fewer images contributes all it has.
    """
    arr = _as_label_array(labels)
    if int(images_per_class) < 1:
        raise IISInputError(f"images_per_class={images_per_class}: must be a positive integer")
    if arr.size == 0:
        raise IISInputError("labels is empty: concept-source images come from a non-empty TRAIN split")
    keep = np.zeros(arr.size, dtype=bool)
    for cls in np.unique(arr):
        keep[np.flatnonzero(arr == cls)[: int(images_per_class)]] = True
    return np.flatnonzero(keep)


# ------------------------------------------------------------------------------------------------- patches
def patch_elements_with_sources(images01: torch.Tensor, grid: int = 4,
                                out_size: Sequence[int] | int = (224, 224)) -> tuple[torch.Tensor, np.ndarray]:
    """Like :func:`patch_elements`, also returning the source-image index of every element."""
    images01 = _check_images(images01)
    size = _check_out_size(out_size)
    if int(grid) < 1:
        raise IISInputError(f"grid={grid}: must be a positive integer")
    n, _, h, w = images01.shape
    if h < grid or w < grid:
        raise IISInputError(f"images are {h}x{w}, too small for a {grid}x{grid} patch grid; lower grid")
    rows = [round(i * h / grid) for i in range(grid + 1)]
    cols = [round(j * w / grid) for j in range(grid + 1)]
    cells = []
    for i in range(grid):
        for j in range(grid):
            crop = images01[:, :, rows[i]:rows[i + 1], cols[j]:cols[j + 1]]
            cells.append(_resize(crop.float(), size))
    out = torch.stack(cells, dim=1).reshape(n * grid * grid, 3, *size) if n else images01.new_zeros(0, 3, *size)
    sources = np.repeat(np.arange(n), grid * grid)
    return out, sources


def patch_elements(images01: torch.Tensor, grid: int = 4,
                   out_size: Sequence[int] | int = (224, 224)) -> torch.Tensor:
    """A ``grid`` x ``grid`` grid of crops of every image (row-major), each resized to ``out_size``.

    Returns [N * grid**2, 3, out_h, out_w]; elements of image i are rows i*grid**2 .. (i+1)*grid**2 - 1.
    """
    return patch_elements_with_sources(images01, grid, out_size)[0]


# ------------------------------------------------------------------------------------------------ segments
def select_segment_masks(label_maps: Sequence[np.ndarray], max_per_setting: int = 5,
                         min_area_frac: float = 0.001, max_jaccard: float = 0.5) -> list[np.ndarray]:
    """Choose segment masks of one image from its SLIC label maps (one map per n_segments setting).

    For each setting in order, segments are visited in label order; a segment is kept when its mask covers
    more than ``min_area_frac`` of the image and its Jaccard overlap with every mask kept so far (any setting)
    is at most ``max_jaccard``; at most ``max_per_setting`` are kept per setting.
    """
    kept: list[np.ndarray] = []
    for seg in label_maps:
        seg = np.asarray(seg)
        n_kept = 0
        for lab in np.unique(seg):
            if n_kept >= max_per_setting:
                break
            mask = seg == lab
            if mask.mean() <= min_area_frac:
                continue
            if any(np.logical_and(mask, k).sum() / np.logical_or(mask, k).sum() > max_jaccard for k in kept):
                continue
            kept.append(mask)
            n_kept += 1
    return kept


def segment_crop(image01: torch.Tensor, mask: np.ndarray | torch.Tensor,
                 fill: Sequence[int] = GREY_117) -> torch.Tensor:
    """The bounding box of ``mask`` cut from ``image01`` [3, H, W], pixels outside the mask set to fill/255."""
    m = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
    if m.shape != image01.shape[-2:]:
        raise IISInputError(f"mask has shape {tuple(m.shape)}; it must match the image's {tuple(image01.shape[-2:])}")
    if not m.any():
        raise IISInputError("mask is empty: a segment needs at least one pixel")
    ys = torch.nonzero(m.any(dim=1)).flatten()
    xs = torch.nonzero(m.any(dim=0)).flatten()
    y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    grey = torch.tensor([float(v) / 255.0 for v in fill], dtype=image01.dtype).view(3, 1, 1)
    crop = image01[:, y0:y1, x0:x1]
    return torch.where(m[y0:y1, x0:x1].unsqueeze(0), crop, grey)


def slic_label_maps(image01: torch.Tensor, n_segments: Sequence[int] = (10, 20, 30),
                    compactness: float = 10, sigma: float = 1) -> list[np.ndarray]:
    """SLIC label maps (``skimage.segmentation.slic``, start_label=0) of one [3, H, W] image, one per setting."""
    from skimage.segmentation import slic

    hwc = image01.detach().cpu().permute(1, 2, 0).double().numpy()
    return [slic(hwc, n_segments=int(k), compactness=compactness, sigma=sigma, channel_axis=-1, start_label=0)
            for k in n_segments]


def segment_elements_with_sources(images01: torch.Tensor, out_size: Sequence[int] | int = (224, 224),
                                  n_segments: Sequence[int] = (10, 20, 30), compactness: float = 10,
                                  sigma: float = 1, max_per_setting: int = 5, min_area_frac: float = 0.001,
                                  max_jaccard: float = 0.5, fill: Sequence[int] = GREY_117,
                                  n_jobs: int = 1) -> tuple[torch.Tensor, np.ndarray]:
    """Like :func:`segment_elements`, also returning the source-image index of every element.

    ``n_jobs`` > 1 segments that many images at once in threads (SLIC releases the GIL); -1 = all cores.
    The result does not depend on ``n_jobs``.
    """
    images01 = _check_images(images01)
    size = _check_out_size(out_size)
    if len(tuple(fill)) != 3:
        raise IISInputError(f"fill={fill!r}: give one 0-255 grey level per RGB channel, e.g. (117, 117, 117)")
    if int(max_per_setting) < 1:
        raise IISInputError(f"max_per_setting={max_per_setting}: must be a positive integer")
    if not n_segments or any(int(k) < 1 for k in n_segments):
        raise IISInputError(f"n_segments={n_segments!r}: give one or more positive segment counts")
    def masks_of(img: torch.Tensor) -> list[np.ndarray]:
        maps = slic_label_maps(img, n_segments, compactness, sigma)
        return select_segment_masks(maps, int(max_per_setting), min_area_frac, max_jaccard)

    imgs = [images01[i].float() for i in range(images01.shape[0])]
    if int(n_jobs) == 1 or len(imgs) < 2:
        all_masks = [masks_of(img) for img in imgs]
    else:
        from joblib import Parallel, delayed

        all_masks = Parallel(n_jobs=int(n_jobs), prefer="threads")(delayed(masks_of)(img) for img in imgs)
    elements: list[torch.Tensor] = []
    sources: list[int] = []
    for i, (img, masks) in enumerate(zip(imgs, all_masks)):
        for mask in masks:
            elements.append(_resize(segment_crop(img, mask, fill).unsqueeze(0), size))
            sources.append(i)
    out = torch.cat(elements) if elements else images01.new_zeros(0, 3, *size, dtype=torch.float32)
    return out, np.asarray(sources, dtype=np.int64)


def segment_elements(images01: torch.Tensor, out_size: Sequence[int] | int = (224, 224),
                     n_segments: Sequence[int] = (10, 20, 30), compactness: float = 10, sigma: float = 1,
                     max_per_setting: int = 5, min_area_frac: float = 0.001, max_jaccard: float = 0.5,
                     fill: Sequence[int] = GREY_117, n_jobs: int = 1) -> torch.Tensor:
    """SLIC-segment elements of every image: masked bounding-box crops resized to ``out_size`` (docs/spec.md §1.2).

    See :func:`select_segment_masks` for which segments are kept. Use
    :func:`segment_elements_with_sources` to know which image each element came from.
    """
    return segment_elements_with_sources(images01, out_size, n_segments, compactness, sigma, max_per_setting,
                                         min_area_frac, max_jaccard, fill, n_jobs)[0]


# ------------------------------------------------------------------------------------------------ together
def parse_elements(elements: str | Sequence[str]) -> tuple[str, ...]:
    """The element kinds of ``elements``: ``"patches"``, ``"segments"``, ``"both"`` or a sequence of kinds."""
    if isinstance(elements, str):
        if elements not in ELEMENT_CHOICES:
            raise IISInputError(f"elements={elements!r}: choose one of {ELEMENT_CHOICES}")
        return ELEMENT_KINDS if elements == "both" else (elements,)
    return _check_kinds(elements)


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = ELEMENT_KINDS if kinds == "both" else (kinds,)
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in ELEMENT_KINDS]
    if not kinds or bad or len(set(kinds)) != len(kinds):
        raise IISInputError(f"kinds={kinds!r}: choose one or more distinct kinds of {ELEMENT_KINDS}")
    return kinds


def _elements_of_kind(kind: str, images01: torch.Tensor, out_size: tuple[int, int], grid: int,
                      segment_opts: dict) -> tuple[torch.Tensor, np.ndarray]:
    if kind == "patches":
        return patch_elements_with_sources(images01, grid, out_size)
    return segment_elements_with_sources(images01, out_size, **segment_opts)


def make_elements(images01: torch.Tensor, labels: Sequence[int] | np.ndarray | torch.Tensor,
                  kinds: Sequence[str] = ELEMENT_KINDS, out_size: Sequence[int] | int = (224, 224),
                  grid: int = 4, **segment_opts) -> tuple[torch.Tensor, torch.Tensor]:
    """All element images of ``images01`` and their class labels (inherited from the source image).

    Order is kind-major (all patches, then all segments). ``segment_opts`` go to :func:`segment_elements`.
    For many images prefer :func:`embed_concept_elements`, which never holds all element images at once.
    """
    images01 = _check_images(images01)
    lab = _as_label_array(labels)
    if lab.shape[0] != images01.shape[0]:
        raise IISInputError(f"labels has {lab.shape[0]} entries but images01 has {images01.shape[0]} images")
    size = _check_out_size(out_size)
    imgs, labs = [], []
    for kind in _check_kinds(kinds):
        el, src = _elements_of_kind(kind, images01, size, grid, segment_opts)
        imgs.append(el)
        labs.append(torch.as_tensor(lab[src], dtype=torch.long))
    return torch.cat(imgs), torch.cat(labs)


# ----------------------------------------------------------------------------------------------- order
@dataclass
class ElementInfo:
    """Where every element came from (arrays of length E, in the elements' row order).

    ``source``: index of its concept-source image (in the order the images were given); ``kind``: index into
    :data:`ELEMENT_KINDS`; ``position``: its rank among the elements of that kind of that image, in extraction
    order (row-major cells; segments in selection order); ``count``: how many elements of that kind that image has.
    """

    source: np.ndarray
    kind: np.ndarray
    position: np.ndarray
    count: np.ndarray

    @classmethod
    def from_sources(cls, sources_per_kind: Sequence[tuple[str, np.ndarray]]) -> "ElementInfo":
        """Build from (kind, source index of every element of that kind, in row order) blocks, kind-major."""
        src, knd, pos, cnt = [], [], [], []
        for kind, s in sources_per_kind:
            s = np.asarray(s, dtype=np.int64)
            p = np.zeros(len(s), dtype=np.int64)
            seen: dict[int, int] = {}
            for i, v in enumerate(s.tolist()):
                p[i] = seen.get(v, 0)
                seen[v] = p[i] + 1
            src.append(s)
            knd.append(np.full(len(s), ELEMENT_KINDS.index(kind), dtype=np.int64))
            pos.append(p)
            cnt.append(np.asarray([seen[v] for v in s.tolist()], dtype=np.int64))
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)
        return cls(cat(src), cat(knd), cat(pos), cat(cnt))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"src": self.source, "kind": self.kind, "pos": self.position, "count": self.count}


def official_order(labels: Sequence[int] | np.ndarray | torch.Tensor, info: ElementInfo) -> np.ndarray:
    """The permutation that puts elements in the official code's file order (docs/spec.md §1.2).

    The official embedding reads ``<class>/<image>_<i>.jpg`` files through ``ImageFolder``: class by class
    (ascending label), image by image (source order), and within an image the file names in string order
    (``_0, _1, _10, ..., _15, _2, ...``). Patch ``i`` is the i-th row-major cell; segment files are numbered in
    reverse selection order (the official extractor pops its list of masks). With both kinds, patches come first.
    """
    lab = _as_label_array(labels)
    if lab.shape[0] != info.source.shape[0]:
        raise IISInputError(f"labels has {lab.shape[0]} entries but the element info has {info.source.shape[0]}")
    seg = info.kind == ELEMENT_KINDS.index("segments")
    file_index = np.where(seg, info.count - 1 - info.position, info.position)
    keys = [(int(lab[e]), int(info.source[e]), int(info.kind[e]), f"{int(file_index[e])}.jpg")
            for e in range(lab.shape[0])]
    return np.asarray(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)


# ----------------------------------------------------------------------------------------------- memo
ELEMENT_MEMO_BYTES = 512 * 2**20   # element images kept per process (all keys together); larger sets stream
_ELEMENT_MEMO: "OrderedDict[str, tuple[list, int]]" = OrderedDict()   # key -> (chunks, bytes)


def _content_key(images01: torch.Tensor, lab: np.ndarray, kinds: tuple[str, ...], size: tuple[int, int],
                 grid: int, segment_opts: dict) -> str:
    """Content hash of everything the element images depend on: the source images' bytes, shape and dtype, their
    labels, the element kinds, the output size, the patch grid and the SLIC/selection options (``n_jobs`` does
    not change them; nothing in them is random, so no seed enters)."""
    h = hashlib.sha1()
    x = images01.detach().cpu().contiguous()
    h.update(str((tuple(x.shape), str(x.dtype), kinds, size, grid,
                  sorted((k, repr(v)) for k, v in segment_opts.items() if k != "n_jobs"))).encode())
    h.update(x.numpy().tobytes())
    h.update(np.ascontiguousarray(lab).tobytes())
    return h.hexdigest()


def _memo_key(images01: torch.Tensor, lab: np.ndarray, kinds: tuple[str, ...], size: tuple[int, int], grid: int,
              chunk_images: int, segment_opts: dict) -> str:
    """The memo's key: the content key and the chunking (the memo keeps element images per chunk)."""
    return f"{_content_key(images01, lab, kinds, size, grid, segment_opts)}|{chunk_images}"


def _memo_put(key: str, chunks: list, nbytes: int) -> None:
    """Keep ``chunks`` under ``key``, evicting the least recently used entries beyond the byte budget."""
    _ELEMENT_MEMO[key] = (chunks, nbytes)
    while len(_ELEMENT_MEMO) > 1 and sum(b for _, b in _ELEMENT_MEMO.values()) > ELEMENT_MEMO_BYTES:
        _ELEMENT_MEMO.popitem(last=False)


def clear_element_memo() -> None:
    """Forget every memoised element image (frees the memory)."""
    _ELEMENT_MEMO.clear()


# ------------------------------------------------------------------------------------------ on-disk entry
#: Version of the on-disk element-image entries; bump when the element images of a geometry change.
ELEMENT_IMAGES_VERSION = "element-images-v1"


def _stored_elements(cache, images01: torch.Tensor, lab: np.ndarray, kinds: tuple[str, ...],
                     size: tuple[int, int], grid: int, chunk_images: int, segment_opts: dict,
                     bar) -> dict[str, np.ndarray]:
    """The element images of ``images01`` from the cache entry ``cache`` holds for them, built and stored first
    when it has none (or only a corrupt one: the cache warns and this rebuilds it).

    Returns ``{kind: images [E_k, 3, h, w] float32 (memory-mapped), kind + "_src": source index [E_k]}``.
    """
    names = tuple(n for k in kinds for n in (k, f"{k}_src"))
    key = cache.key(ELEMENT_IMAGES_VERSION, _content_key(images01, lab, kinds, size, grid, segment_opts))
    hit = cache.get(key, required=names)
    if hit is not None:
        bar.update(images01.shape[0])
        return hit
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    srcs: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
    for start in range(0, images01.shape[0], chunk_images):
        imgs = images01[start:start + chunk_images]
        for kind in kinds:
            el, src = _elements_of_kind(kind, imgs, size, grid, segment_opts)
            parts[kind].append(el)
            srcs[kind].append(np.asarray(src, dtype=np.int64) + start)
        bar.update(imgs.shape[0])
    arrays: dict[str, np.ndarray] = {}
    for kind in kinds:
        arrays[kind] = torch.cat(parts.pop(kind)).float().numpy()     # one kind's pieces freed at a time
        arrays[f"{kind}_src"] = np.concatenate(srcs[kind])
    cache.put(key, arrays, {"kind": "element_images", "images": int(images01.shape[0]), "size": list(size)})
    return cache.get(key, required=names) or arrays


# ----------------------------------------------------------------------------------------------- embedding
def _stats(v: Sequence[float] | torch.Tensor, name: str) -> torch.Tensor:
    return torch.tensor(rgb_triple(v, name), dtype=torch.float32).reshape(1, 3, 1, 1)


def _embed_batches(embed_fn: EmbedFn, element_images01: torch.Tensor, mean_t: torch.Tensor, std_t: torch.Tensor,
                   batch_size: int, device: torch.device | str | None, bar) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for start in range(0, element_images01.shape[0], batch_size):
            batch = element_images01[start:start + batch_size].float()
            batch = (batch - mean_t) / std_t
            if device is not None:
                batch = batch.to(device)
            f = embed_fn(batch)
            if not isinstance(f, torch.Tensor) or f.ndim != 2 or f.shape[0] != batch.shape[0]:
                shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f)
                raise IISInputError(f"embed_fn returned {shape} for a batch of {batch.shape[0]}; it must return [B, D]")
            outs.append(F.normalize(f.detach().float(), dim=1).cpu())
            if bar is not None:
                bar.update(batch.shape[0])
    return torch.cat(outs) if outs else torch.zeros(0, 0)


def embed_elements(embed_fn: EmbedFn, element_images01: torch.Tensor, mean: Sequence[float] | torch.Tensor,
                   std: Sequence[float] | torch.Tensor, batch_size: int = 64, progress: bool = True,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Backbone features of element images: normalise with mean/std, ``embed_fn`` in batches, L2-normalise rows.

    ``embed_fn(batch [B,3,H,W]) -> [B, D]`` runs under ``torch.no_grad``; the batch is moved to ``device``
    when given. Returns float32 [E, D] on the CPU.
    """
    element_images01 = _check_images(element_images01, "element_images01")
    if int(batch_size) < 1:
        raise IISInputError(f"batch_size={batch_size}: must be a positive integer")
    from tqdm.auto import tqdm

    bar = tqdm(total=element_images01.shape[0], desc="embed elements", unit="el", disable=not progress)
    try:
        return _embed_batches(embed_fn, element_images01, _stats(mean, "mean"), _stats(std, "std"),
                              int(batch_size), device, bar)
    finally:
        bar.close()


def _image_chunks(images01, labels, chunk_images: int) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    if isinstance(images01, torch.Tensor):
        images01 = _check_images(images01)
        lab = _as_label_array(labels)
        if lab.shape[0] != images01.shape[0]:
            raise IISInputError(f"labels has {lab.shape[0]} entries but images01 has {images01.shape[0]} images")
        for start in range(0, images01.shape[0], chunk_images):
            yield images01[start:start + chunk_images], lab[start:start + chunk_images]
        return
    if labels is not None:
        raise IISInputError("labels must be None when images01 is an iterable of (images01, labels) chunks")
    for item in images01:
        try:
            imgs, lab = item
        except (TypeError, ValueError):
            raise IISInputError("images01 as an iterable must yield (images01 [n,3,H,W], labels [n]) pairs") from None
        imgs, lab = _check_images(imgs), _as_label_array(lab)
        if lab.shape[0] != imgs.shape[0]:
            raise IISInputError(f"a chunk has {lab.shape[0]} labels for {imgs.shape[0]} images")
        yield imgs, lab


class _KindBatcher:
    """Embeds element images of each kind in full batches of ``batch_size`` across chunk boundaries (a chunk's
    remainder waits for the next chunk's elements), keeping every kind's rows in arrival order."""

    def __init__(self, embed_fn: EmbedFn, kinds: tuple[str, ...], mean_t: torch.Tensor, std_t: torch.Tensor,
                 batch_size: int, device: torch.device | str | None):
        self.embed_fn, self.mean_t, self.std_t, self.batch_size, self.device = embed_fn, mean_t, std_t, batch_size, \
            device
        self.pending: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
        self.feats: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}

    def add(self, kind: str, images: torch.Tensor, last: bool = False) -> None:
        """Queue ``images`` of ``kind``; embed every full batch queued (everything when ``last``)."""
        if images.shape[0]:
            self.pending[kind].append(images)
        queued = sum(p.shape[0] for p in self.pending[kind])
        n = queued if last else queued // self.batch_size * self.batch_size
        if n == 0:
            return
        pend = self.pending[kind]
        block = pend[0] if len(pend) == 1 else torch.cat(pend)
        self.feats[kind].append(_embed_batches(self.embed_fn, block[:n], self.mean_t, self.std_t, self.batch_size,
                                               self.device, None))
        self.pending[kind] = [block[n:]] if n < block.shape[0] else []

    def result(self, kind: str) -> list[torch.Tensor]:
        """The features of every queued element of ``kind``, in order (embeds what is still queued)."""
        self.add(kind, torch.zeros(0), last=True)
        return self.feats[kind]


def embed_concept_elements(embed_fn: EmbedFn,
                           images01: torch.Tensor | Iterable[tuple[torch.Tensor, Sequence[int]]],
                           labels: Sequence[int] | np.ndarray | torch.Tensor | None,
                           out_size: Sequence[int] | int, mean: Sequence[float] | torch.Tensor,
                           std: Sequence[float] | torch.Tensor, kinds: Sequence[str] = ELEMENT_KINDS,
                           grid: int = 4, chunk_images: int = 8, batch_size: int = 64,
                           device: torch.device | str | None = None, progress: bool = True,
                           memo: bool = False, return_info: bool = False, cache=None, **segment_opts
                           ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, ElementInfo]:
    """Make and embed every element of the concept-source images, streaming so memory stays small.

    ``images01`` is either a tensor [N, 3, H, W] with ``labels`` [N], or an iterable of
    ``(images01_chunk, labels_chunk)`` pairs (then ``labels=None``). ``segment_opts`` (e.g. ``n_jobs=2``) go to
    :func:`segment_elements`. Elements are built for ``chunk_images`` source images at a time and embedded in
    batches of ``batch_size`` elements of one kind (a batch spans chunks, so every batch but each kind's last is
    full). Returns ``(element_feats [E, D] float32, L2-normalised rows; element_labels [E] long)`` in the same
    kind-major order as :func:`make_elements`.

    Element images depend only on the source images and the geometry, so they can be reused (tensor input only):

    - ``cache`` (an :class:`iis_fast.features.FeatureCache`): the element images are an entry of that on-disk cache,
      keyed by the source images' content, their labels, the kinds, ``out_size``, ``grid`` and the SLIC options;
      every later call, in any process, reads them memory-mapped and only embeds. A corrupt entry is reported by
      the cache and rebuilt. ``memo`` is not used then.
    - ``memo=True``: a per-process memo of the element images instead. Sets larger than
      :data:`ELEMENT_MEMO_BYTES` are streamed as without it.

    The result is identical either way. ``return_info=True`` adds the :class:`ElementInfo` of every row (for
    :func:`official_order`).
    """
    kinds = _check_kinds(kinds)
    size = _check_out_size(out_size)
    if int(chunk_images) < 1 or int(batch_size) < 1:
        raise IISInputError(f"chunk_images={chunk_images}, batch_size={batch_size}: both must be positive")
    mean_t, std_t = _stats(mean, "mean"), _stats(std, "std")
    from tqdm.auto import tqdm

    batcher = _KindBatcher(embed_fn, kinds, mean_t, std_t, int(batch_size), device)
    labs: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    srcs: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
    tensor_input = isinstance(images01, torch.Tensor)
    lab_all = None
    if tensor_input and (memo or cache is not None):
        images01 = _check_images(images01)
        lab_all = _as_label_array(labels)
        if lab_all.shape[0] != images01.shape[0]:
            raise IISInputError(f"labels has {lab_all.shape[0]} entries but images01 has {images01.shape[0]} images")
    bar = tqdm(desc="concept elements", unit="img", disable=not progress)
    try:
        if cache is not None and tensor_input:
            stored = _stored_elements(cache, images01, lab_all, kinds, size, int(grid), int(chunk_images),
                                      segment_opts, bar)
            block = max(int(batch_size), 512 // int(batch_size) * int(batch_size))  # memory-mapped, read per block
            for kind in kinds:
                el, src = stored[kind], np.asarray(stored[f"{kind}_src"], dtype=np.int64)
                for start in range(0, el.shape[0], block):
                    batcher.add(kind, torch.from_numpy(np.array(el[start:start + block], dtype=np.float32)))
                if src.size:
                    labs[kind].append(torch.as_tensor(lab_all[src], dtype=torch.long))
                    srcs[kind].append(src)
        else:
            _embed_streamed(batcher, images01, labels, lab_all, kinds, size, int(grid), int(chunk_images),
                            segment_opts, memo and tensor_input, labs, srcs, bar)
    finally:
        bar.close()
    all_feats = [f for k in kinds for f in batcher.result(k)]
    if not all_feats:
        raise IISInputError("no concept elements were produced: images01 is empty or every segment was rejected")
    out_feats, out_labels = torch.cat(all_feats), torch.cat([l for k in kinds for l in labs[k]])
    if not return_info:
        return out_feats, out_labels
    info = ElementInfo.from_sources([(k, np.concatenate(srcs[k])) for k in kinds if srcs[k]])
    return out_feats, out_labels, info


def _embed_streamed(batcher: _KindBatcher, images01, labels, lab_all, kinds: tuple[str, ...],
                    size: tuple[int, int], grid: int, chunk_images: int, segment_opts: dict, memo: bool,
                    labs: dict, srcs: dict, bar) -> None:
    """Build the element images chunk by chunk (or take them from the per-process memo) and queue them."""
    key = cached = None
    if memo:
        key = _memo_key(images01, lab_all, kinds, size, grid, chunk_images, segment_opts)
        if key in _ELEMENT_MEMO:
            _ELEMENT_MEMO.move_to_end(key)
            cached = _ELEMENT_MEMO[key][0]
    built: list | None = []             # per chunk: {kind: (element images, source index)}, for the memo
    built_bytes = 0
    offset = 0
    for c, (imgs, lab) in enumerate(_image_chunks(images01, labels, chunk_images)):
        per_kind = cached[c] if cached is not None else {
            kind: _elements_of_kind(kind, imgs, size, grid, segment_opts) for kind in kinds}
        if key is not None and cached is None and built is not None:
            built_bytes += sum(el.numel() * el.element_size() for el, _ in per_kind.values())
            if built_bytes <= ELEMENT_MEMO_BYTES:
                built.append(per_kind)
            else:                       # too large to keep: stream as without the memo
                built = None
        for kind in kinds:
            el, src = per_kind[kind]
            if el.shape[0]:
                batcher.add(kind, el)
                labs[kind].append(torch.as_tensor(lab[src], dtype=torch.long))
                srcs[kind].append(np.asarray(src, dtype=np.int64) + offset)
        offset += imgs.shape[0]
        bar.update(imgs.shape[0])
    if key is not None and cached is None and built is not None:
        _memo_put(key, built, built_bytes)
