"""Representations (docs/spec.md §1.1): which vector of a backbone is "the feature", its extraction, and the disk cache.

Features are computed once per (model weights, layer, data, preprocessing) and stored as .npy files that later
runs memory-map, so a second score of the same checkpoint never runs the backbone.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from .errors import IISInputError

EmbedFn = Callable[[torch.Tensor], torch.Tensor]


def _pool(out: Any, where: str) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise IISInputError(f"{where} returned {type(out).__name__}, not a tensor")
    if out.dim() == 4:                      # [B, C, H, W] -> global average pool
        return out.mean(dim=(2, 3))
    if out.dim() == 3:                      # [B, T, D] tokens -> CLS token
        return out[:, 0]
    return out.flatten(1)


def _find_classifier(model: nn.Module) -> nn.Module | None:
    """The final Linear of a torchvision-style model (its input is the penultimate representation)."""
    for name in ("fc", "classifier", "head", "heads", "last_linear"):
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Linear):
            return mod
        if isinstance(mod, nn.Module):
            linears = [m for m in mod.modules() if isinstance(m, nn.Linear)]
            if linears:
                return linears[-1]
    return None


def representation_fn(model: nn.Module, layer: str | None = None) -> EmbedFn:
    """A function images -> [B, D] representation of `model` (in eval mode, no grad).

    - `layer` given: the (pooled) output of that named submodule;
    - timm models: ``forward_head(forward_features(x), pre_logits=True)``;
    - torchvision-style models: the input of the final classifier Linear.
    """
    model.eval()
    if layer is not None:
        try:
            sub = model.get_submodule(layer)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n][-8:]
            raise IISInputError(f"layer={layer!r} is not a submodule of {type(model).__name__}; "
                                f"the last few are {names}") from None
        return _hooked(model, sub, lambda mod, inp, out: _pool(out, f"layer {layer!r}"), forward=True)
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        @torch.no_grad()
        def timm_embed(x: torch.Tensor) -> torch.Tensor:
            return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)
        return timm_embed
    clf = _find_classifier(model)
    if clf is None:
        raise IISInputError(f"cannot find the representation of {type(model).__name__}: it is neither a timm model "
                            "nor has a final classifier Linear (fc/classifier/head); pass layer='<module name>'")
    return _hooked(model, clf, lambda mod, inp: inp[0].flatten(1), forward=False)


def _hooked(model: nn.Module, sub: nn.Module, grab: Callable, forward: bool) -> EmbedFn:
    @torch.no_grad()
    def embed(x: torch.Tensor) -> torch.Tensor:
        box: list[torch.Tensor] = []
        if forward:
            h = sub.register_forward_hook(lambda m, i, o: box.append(grab(m, i, o)))
        else:
            h = sub.register_forward_pre_hook(lambda m, i: box.append(grab(m, i)))
        try:
            model(x)
        finally:
            h.remove()
        return box[0]
    return embed


def model_fingerprint(model: nn.Module, layer: str | None = None) -> str:
    """Hash of the architecture, every parameter/buffer and the layer: equal weights give equal keys."""
    h = hashlib.sha256(type(model).__name__.encode())
    h.update(str(layer).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()[:32]


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        batch = (batch.get("image", batch.get("images")), batch.get("label", batch.get("labels")))
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise IISInputError("the loader must yield (images, labels) batches; got "
                            f"{type(batch).__name__}")
    images, labels = batch[0], batch[1]
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise IISInputError(f"loader images must be a [B, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise IISInputError(f"loader batch has {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def data_fingerprint(loader: Iterable) -> str:
    """A key for the data a loader yields: its own `fingerprint` if it has one, else a hash of what it yields."""
    for obj in (loader, getattr(loader, "dataset", None)):
        fp = getattr(obj, "fingerprint", None)
        if isinstance(fp, str) and fp:
            return fp
    ds = getattr(loader, "dataset", None)
    h = hashlib.sha256()
    if isinstance(ds, torch.utils.data.TensorDataset):
        for t in ds.tensors:
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return "tensors-" + h.hexdigest()[:32]
    n = 0
    for batch in loader:
        images, labels = _split_batch(batch)
        h.update(images.detach().cpu().float().contiguous().numpy().tobytes())
        h.update(labels.cpu().numpy().astype(np.int64).tobytes())
        n += len(labels)
    return f"stream{n}-" + h.hexdigest()[:32]


@dataclass
class Extracted:
    """Features of one split and the concept-source images kept while streaming."""

    x: np.ndarray                     # [N, D] float32 (possibly memory-mapped)
    y: np.ndarray                     # [N] int64
    source_images: torch.Tensor | None = None   # first `keep_per_class` images of each class, as the loader gave them
    source_labels: torch.Tensor | None = None
    source_index: np.ndarray | None = None      # their sample indices


def extract(embed: EmbedFn, loader: Iterable, device: str = "cpu", keep_per_class: int = 0,
            progress: bool = True, desc: str = "extracting features") -> Extracted:
    """Run the backbone over every batch of `loader`; keep the first `keep_per_class` images of each class."""
    from tqdm.auto import tqdm
    xs, ys, kept, kept_y, kept_i = [], [], [], [], []
    seen: dict[int, int] = {}
    n = 0
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, total=total, desc=desc, unit="batch", disable=not progress, leave=False):
        images, labels = _split_batch(batch)
        feats = embed(images.to(device, non_blocking=True).float())
        if feats.dim() != 2 or feats.shape[0] != images.shape[0]:
            raise IISInputError(f"the representation has shape {tuple(feats.shape)} for a batch of {images.shape[0]}")
        xs.append(feats.float().cpu().numpy())
        ys.append(labels.cpu().numpy().astype(np.int64))
        if keep_per_class:
            for j, c in enumerate(ys[-1].tolist()):
                if seen.get(c, 0) < keep_per_class:
                    seen[c] = seen.get(c, 0) + 1
                    kept.append(images[j].detach().cpu().clone())
                    kept_y.append(c)
                    kept_i.append(n + j)
        n += len(labels)
    if n == 0:
        raise IISInputError("the loader yielded no samples (an empty loader or dataset)")
    out = Extracted(np.concatenate(xs), np.concatenate(ys))
    if keep_per_class:
        out.source_images = torch.stack(kept)
        out.source_labels = torch.tensor(kept_y)
        out.source_index = np.asarray(kept_i)
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("IIS_FAST_CACHE", Path.home() / ".cache" / "iis_fast"))


class FeatureCache:
    """A directory of entries {key}/{name}.npy + meta.json, written atomically, read memory-mapped."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    @staticmethod
    def key(*parts: str) -> str:
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:40]

    def get(self, key: str) -> dict[str, Any] | None:
        d = self.root / key
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            arrays = {n: np.load(d / f"{n}.npy", mmap_mode="r") for n in meta["arrays"]}
        except (OSError, ValueError, KeyError):
            return None                       # an unreadable entry is a miss; it will be rewritten
        return {"meta": meta.get("info", {}), **arrays}

    def put(self, key: str, arrays: dict[str, np.ndarray], info: dict[str, Any] | None = None) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            for n, a in arrays.items():
                np.save(tmp / f"{n}.npy", np.ascontiguousarray(a))
            (tmp / "meta.json").write_text(json.dumps({"arrays": list(arrays), "info": info or {}}))
            final = self.root / key
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)            # readers see either nothing or a complete entry
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
