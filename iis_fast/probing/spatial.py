"""Spatial feature maps of a backbone's last stage, extracted once and cached (in memory, optionally on disk).

Probes act on ``[B, D, h, w]`` maps, so for timm models the map is ``model.forward_features(x)`` (CNNs); token
outputs ``[B, N, D]`` of ViT-style models become ``[B, D, h, w]`` after dropping the prefix (CLS) tokens.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import IISInputError

__all__ = ["SpatialMaps", "spatial_features", "extract_spatial", "model_digest"]


def spatial_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last-stage spatial map ``[B, D, h, w]`` of ``model`` for images ``x`` (gradients flow if enabled).

    timm models: ``forward_features``; a 3-D token output ``[B, N, D]`` is reshaped to a square grid after
    dropping ``model.num_prefix_tokens`` tokens. Other modules: their output, which must be 4-D.
    """
    out: Any = model.forward_features(x) if hasattr(model, "forward_features") else model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise IISInputError(f"model: forward_features returned {type(out).__name__}, not a tensor")
    if out.dim() == 3:
        tokens = out[:, int(getattr(model, "num_prefix_tokens", 0)):]
        side = int(round(math.sqrt(tokens.shape[1])))
        if side * side != tokens.shape[1]:
            raise IISInputError(f"model: cannot arrange {tokens.shape[1]} patch tokens in a square grid")
        return tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side)
    if out.dim() != 4:
        raise IISInputError(f"model: the last stage must be a [B, D, h, w] map (or ViT tokens), got {tuple(out.shape)}")
    return out


@dataclass
class SpatialMaps:
    """Cached last-stage maps of a dataset: ``maps`` float32 ``[N, D, h, w]`` and ``labels``: class ids int64 ``[N]``
    or, for multi-label data, multi-hot float32 ``[N, C]``."""

    maps: torch.Tensor
    labels: torch.Tensor
    seconds: float = 0.0
    source: str = "computed"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.maps.dim() != 4:
            raise IISInputError(f"maps must be [N, D, h, w], got {tuple(self.maps.shape)}")
        if self.labels.dim() not in (1, 2) or self.labels.shape[0] != self.maps.shape[0]:
            raise IISInputError(f"labels must be [N] class ids or [N, C] multi-hot with N = {self.maps.shape[0]}, got "
                                f"{tuple(self.labels.shape)}")
        if self.labels.dim() == 2 and not ((self.labels == 0) | (self.labels == 1)).all():
            raise IISInputError("multi-hot labels [N, C] must be 0 or 1")
        if not torch.isfinite(self.maps).all():
            raise IISInputError("maps contain NaN or inf; check the backbone and the input preprocessing")

    def __len__(self) -> int:
        return int(self.maps.shape[0])


def model_digest(model: nn.Module) -> str:
    """A short hash of the model class and all its weights and buffers (for cache keys)."""
    h = hashlib.sha1(type(model).__name__.encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def extract_spatial(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
                    cache_dir: str | os.PathLike[str] | None = None, progress: bool = False) -> SpatialMaps:
    """Run the frozen backbone once over ``loader`` (``(images, labels)`` batches) and keep the spatial maps.

    Labels are class ids ``[B]`` or multi-hot ``[B, C]`` (multi-label data).

    With ``cache_dir`` and a dataset that has a ``fingerprint`` (e.g. :class:`iis_fast.data.FashionMNIST`), the
    maps are stored as ``<cache_dir>/spatial-<model digest>-<fingerprint>.pt`` and read back on later calls.
    """
    path: Path | None = None
    fp = getattr(getattr(loader, "dataset", None), "fingerprint", None)
    if cache_dir is not None and fp:
        path = Path(cache_dir) / f"spatial-{model_digest(model)}-{fp}.pt"
        if path.is_file():
            d = torch.load(path, map_location="cpu")
            return SpatialMaps(d["maps"], d["labels"], 0.0, source=str(path))
    was_training = model.training
    model.eval().to(device)
    t0 = time.perf_counter()
    maps, labels = [], []
    it = loader
    if progress:
        from tqdm import tqdm
        it = tqdm(loader, desc="spatial features", leave=False)
    for batch in it:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise IISInputError("loader must yield (images, labels) batches")
        x, y = batch[0], batch[1]
        maps.append(spatial_features(model, x.to(device)).float().cpu())
        y = torch.as_tensor(y)
        labels.append((y.float() if y.dim() == 2 else y.long()).cpu())
    model.train(was_training)
    if not maps:
        raise IISInputError("loader is empty: it yielded no batches")
    out = SpatialMaps(torch.cat(maps), torch.cat(labels), time.perf_counter() - t0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"maps": out.maps, "labels": out.labels}, tmp)
        os.replace(tmp, path)
    return out
