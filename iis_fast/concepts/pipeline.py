"""From the cached TRAIN concept-source images to the library :func:`iis_fast.score` trains on (docs/spec.md §1.2).

One function, :func:`score_library`, so that ``score`` stays a thin driver: it embeds the elements of the kinds
and geometry the config asks for (their features cached on disk per model, data and geometry; for the crop
geometry their images too, per source images and geometry, shared by every model), orders them the official way
where a "first" selection reads them, and builds the library. For ``library="end2end"`` it returns the element
matrix E, from which every head of the grid learns its own assignment.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import IISInputError
from .elements import ElementInfo, embed_concept_elements, official_order, parse_elements
from .libraries import build_library
from .official import embed_official_elements, raw_source_images

#: Version of the cached element entries; bump when the element images of a geometry change.
ELEMENTS_CACHE_VERSION = "elements-v2"
_ELEMENT_ARRAYS = ("feats", "labels", "src", "kind", "pos", "count")


def _cached(cache: Any, key: str) -> dict[str, Any] | None:
    hit = cache.get(key)
    if hit is None or any(name not in hit for name in _ELEMENT_ARRAYS):
        return None
    return hit


#: Input pixels per element batch on a CPU. With BatchNorm folded, MobileNetV2 and EfficientNet-Lite0 ran fastest
#: at 32 images at 128 px and 8-32 at 224 px in interleaved measurements (docs/throughput.md): small batches keep the
#: activations in cache.
CPU_BATCH_PIXELS = 2 ** 19


def element_batch(size: tuple[int, ...], device: str | torch.device) -> int:
    """``element_batch_size=0`` (auto): on a CPU the largest power of two whose batch holds at most
    ``CPU_BATCH_PIXELS`` input pixels (8 to 256 images); on a GPU 256."""
    if torch.device(device).type != "cpu":
        return 256
    n = max(1, CPU_BATCH_PIXELS // max(1, int(np.prod(size))))
    return int(min(256, max(8, 2 ** int(np.log2(n)))))


def score_library(cfg: Any, cache: Any, train_key: str, train: dict[str, Any], embed: Any, pre: dict[str, Any],
                  loader: Any, concept_vectors: Any = None) -> torch.Tensor:
    """The concept library C [M, D] of ``cfg.library`` (for end2end: the element matrix E [E, D]).

    Args:
        cfg: the run's :class:`iis_fast.config.IISConfig`.
        cache: the :class:`iis_fast.features.FeatureCache`; ``train_key`` the TRAIN features' entry.
        train: that entry's arrays (``src_images``, ``src_labels``, ``src_index``: the concept-source images).
        embed: the representation function; ``pre`` the model's preprocessing (input_size, mean, std).
        loader: the TRAIN loader, read again only for ``element_geometry="official"`` (full-resolution images).
        concept_vectors: [M, D] text concept vectors for ``library="text"``.
    """
    from ..validation import tensor_from_numpy
    if cfg.library == "text":
        if concept_vectors is None:
            raise IISInputError("library='text' needs concept_vectors=[M, D] (e.g. from "
                                "iis_fast.concepts.fit_text_concepts with your CLIP features)")
        return build_library("text", None, concept_vectors=torch.as_tensor(concept_vectors))
    kinds = parse_elements(cfg.elements)
    size = tuple(pre["input_size"][1:])
    batch = cfg.element_batch_size or element_batch(size, cfg.device)
    key = cache.key(ELEMENTS_CACHE_VERSION, train_key, cfg.element_geometry, ",".join(kinds),
                    str(cfg.images_per_class), str(tuple(pre["input_size"])), str(pre["mean"]), str(pre["std"]))
    hit = _cached(cache, key)
    if hit is None:
        if cfg.element_geometry == "official":
            raw = raw_source_images(loader, np.asarray(train["src_index"]).tolist())
            if raw is None:
                raise IISInputError(
                    "element_geometry='official' cuts elements from the full-resolution source images, which this "
                    "loader cannot give back (supported: image folders, the bundled Fashion-MNIST, datasets with "
                    "raw_image(i)); pass element_geometry='crop' to cut them from the preprocessed images")
            feats, labels, info = embed_official_elements(
                embed, raw, np.asarray(train["src_labels"]), size, pre["mean"], pre["std"], kinds=kinds,
                batch_size=batch, device=cfg.device, progress=cfg.progress, n_jobs=2)
        else:
            mean = torch.tensor(pre["mean"]).view(1, -1, 1, 1)
            std = torch.tensor(pre["std"]).view(1, -1, 1, 1)
            images01 = (tensor_from_numpy(train["src_images"]) * std + mean).clamp(0, 1)
            if images01.shape[1] == 1:
                images01 = images01.expand(-1, 3, -1, -1)
            feats, labels, info = embed_concept_elements(
                embed, images01, tensor_from_numpy(train["src_labels"]), out_size=size, mean=pre["mean"],
                std=pre["std"], kinds=kinds, batch_size=batch, device=cfg.device,
                progress=cfg.progress, n_jobs=-1, chunk_images=32, cache=cache, return_info=True)
        arrays = {"feats": feats.numpy(), "labels": labels.numpy(), **info.arrays()}
        cache.put(key, arrays, {"kind": "elements", "geometry": cfg.element_geometry})
        hit = _cached(cache, key) or arrays
    feats = tensor_from_numpy(hit["feats"])
    labels = tensor_from_numpy(hit["labels"])
    if cfg.num_concepts > feats.shape[0]:
        raise IISInputError(f"num_concepts={cfg.num_concepts} but only {feats.shape[0]} concept elements exist: "
                            "lower num_concepts or raise images_per_class")
    info = ElementInfo(*(np.asarray(hit[n]) for n in ("src", "kind", "pos", "count")))
    order = official_order(np.asarray(hit["labels"]), info)
    opts: dict[str, Any] = {}
    if cfg.library == "prototype":
        opts.update(selection=cfg.prototype_selection, order=order)
    if cfg.library in ("cluster", "end2end"):
        opts.update(max_elements=cfg.max_elements, subset=cfg.element_subset, order=order)
    return build_library(cfg.library, feats, labels, cfg.num_concepts, cfg.seed, **opts)
