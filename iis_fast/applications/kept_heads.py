"""The trained heads of an IIS run, kept (``score(..., keep_heads=True)``), saved and loaded (docs/applications.md).

The grid backends report accuracies only. For each sparsity, the head that IIS reports (the lr with the best
eval accuracy, at its selected epoch) is trained again with the reference trainer
(:mod:`iis_fast.backends.reference`): the same initialisation, batch order and learning-rate schedule, stopped
after the selected epoch. With ``backend="reference"`` that is the very head of the grid; with a fused backend it
is the same recipe, so its accuracy (kept as ``acc``) can differ from ``IISResult.acc`` by the backends' float
differences (docs/backends.md). The standard probe is kept the same way.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import IISInputError

#: Longest side of the element images kept for display (explain / concept gallery).
THUMBNAIL = 96


@dataclass
class KeptHead:
    """One concept head: LayerNorm(M) affine, Linear(M->K), its threshold rank k and where it was selected."""

    sparsity: float
    k: int
    lr: float
    epochs: int                     # trained for this many epochs (the selected epoch + 1)
    acc: float                      # its accuracy on the eval set, measured after training it again
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    fc_weight: torch.Tensor         # [K, M]
    fc_bias: torch.Tensor


@dataclass
class KeptHeads:
    """The concept matrix, the standard probe and one concept head per sparsity of an IIS run."""

    concepts: torch.Tensor                      # C [M, D], unit rows
    probe_weight: torch.Tensor                  # [K, D]
    probe_bias: torch.Tensor
    acc_std: float                              # the kept probe's eval accuracy
    heads: list[KeptHead]
    num_classes: int
    library: str = "prototype"
    concept_images: torch.Tensor | None = None  # uint8 [M, 3, h, w] element images (None: not recoverable)
    concept_labels: torch.Tensor | None = None  # [M] class of each element's source image
    notes: list[str] = field(default_factory=list)

    @property
    def sparsities(self) -> list[float]:
        return [h.sparsity for h in self.heads]

    def head_at(self, sparsity: float) -> KeptHead:
        """The kept head of ``sparsity`` (IISInputError naming the kept ones otherwise)."""
        for h in self.heads:
            if abs(h.sparsity - float(sparsity)) < 1e-9:
                return h
        raise IISInputError(f"no kept head at sparsity {sparsity}: the kept sparsities are {self.sparsities}")

    def module(self, sparsity: float) -> nn.Module:
        """The head of ``sparsity`` as :class:`iis_fast.backends.reference.ConceptHead` (features -> logits)."""
        from ..backends.reference import ConceptHead
        h = self.head_at(sparsity)
        m = ConceptHead(self.concepts, self.num_classes, h.k, 0, 1)
        with torch.no_grad():
            m.norm.weight.copy_(h.norm_weight)
            m.norm.bias.copy_(h.norm_bias)
            m.fc.weight.copy_(h.fc_weight)
            m.fc.bias.copy_(h.fc_bias)
        return m.eval()

    def probe(self) -> nn.Linear:
        p = nn.Linear(self.probe_weight.shape[1], self.num_classes)
        with torch.no_grad():
            p.weight.copy_(self.probe_weight)
            p.bias.copy_(self.probe_bias)
        return p.eval()

    @torch.no_grad()
    def predict(self, features: torch.Tensor, sparsity: float | None = None) -> torch.Tensor:
        """Logits [N, K] of the concept head at ``sparsity`` (None: the standard probe) for features [N, D]."""
        x = torch.as_tensor(features).float()
        return (self.probe() if sparsity is None else self.module(sparsity))(x)

    # ------------------------------------------------------------------ save / load (safetensors + JSON header)
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write every tensor to a ``.safetensors`` file, the rest in its metadata."""
        from safetensors.torch import save_file
        tensors = {"concepts": self.concepts, "probe_weight": self.probe_weight, "probe_bias": self.probe_bias}
        meta_heads = []
        for i, h in enumerate(self.heads):
            for name in ("norm_weight", "norm_bias", "fc_weight", "fc_bias"):
                tensors[f"head{i}.{name}"] = getattr(h, name)
            meta_heads.append({f: getattr(h, f) for f in ("sparsity", "k", "lr", "epochs", "acc")})
        if self.concept_images is not None:
            tensors["concept_images"] = self.concept_images
            tensors["concept_labels"] = self.concept_labels
        meta = {"acc_std": self.acc_std, "num_classes": self.num_classes, "library": self.library,
                "notes": self.notes, "heads": meta_heads, "format": "iis_fast.KeptHeads/1"}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"iis_fast": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "KeptHeads":
        """Read a file written by :meth:`save` (IISInputError when it is not one)."""
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("iis_fast", "null") or "null")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, RuntimeError) as e:
            raise IISInputError(f"{str(path)!r} is not a readable heads file ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != "iis_fast.KeptHeads/1":
            raise IISInputError(f"{str(path)!r} holds no iis_fast heads (written by KeptHeads.save / "
                                "IISResult.save_heads)")
        heads = [KeptHead(**h, **{n: tensors[f"head{i}.{n}"] for n in ("norm_weight", "norm_bias", "fc_weight",
                                                                       "fc_bias")})
                 for i, h in enumerate(meta["heads"])]
        return cls(tensors["concepts"], tensors["probe_weight"], tensors["probe_bias"], meta["acc_std"], heads,
                   meta["num_classes"], meta["library"], tensors.get("concept_images"), tensors.get("concept_labels"),
                   meta["notes"])


def keep_trained_heads(x: torch.Tensor, y: torch.Tensor, eval_sets: list[tuple[torch.Tensor, torch.Tensor]],
                       concepts: torch.Tensor, spec: Any, selection: Any, library: str) -> KeptHeads:
    """Train again, with the reference trainer, the probe and the concept head per sparsity that the result reports.

    ``selection``: the first grid's :class:`iis_fast.uncertainty.Selection` (lr and best epoch of the probe and of
    every head, chosen on the selection split, which is the reported split unless ``selection="holdout"``).
    """
    from ..backends.reference import ConceptHead, accuracy, make_probe, train_head
    if spec.assignment is not None:
        raise IISInputError("keep_heads=True needs a fixed concept library (prototype, cluster, text): every end2end "
                            "head learns its own concepts")
    if getattr(spec, "seeds", None) is not None:     # repeats: the first grid's heads (the per-lr fields' grid)
        spec = spec.single(spec.grid_seeds()[0])
    x, y = x.float().cpu(), y.cpu()
    sets = [(a.float().cpu(), b.cpu()) for a, b in eval_sets]
    c = concepts.float().cpu()
    li = int(selection.lr_p)
    torch.manual_seed(spec.seed)
    probe = make_probe(x.shape[1], spec.num_classes, spec.seed)
    train_head(probe, x, y, sets, spec.lrs[li], dataclasses.replace(spec, epochs=int(selection.best_p[li]) + 1))
    acc_std = accuracy(probe.eval(), *sets[-1])
    kept = []
    for si, (s, k) in enumerate(zip(spec.sparsities, spec.ks(c.shape[0]))):
        lj = int(selection.lr_h[si])
        ep = int(selection.best_h[si, lj]) + 1
        head = ConceptHead(c, spec.num_classes, k, spec.seed, 1 + si)
        train_head(head, x, y, sets, spec.lrs[lj], dataclasses.replace(spec, epochs=ep))
        head.eval()
        kept.append(KeptHead(float(s), int(k), float(spec.lrs[lj]), ep, accuracy(head, *sets[-1]),
                             head.norm.weight.detach().clone(), head.norm.bias.detach().clone(),
                             head.fc.weight.detach().clone(), head.fc.bias.detach().clone()))
    return KeptHeads(c, probe.weight.detach().clone(), probe.bias.detach().clone(), acc_std, kept,
                     spec.num_classes, library)


def thumbnails(images01: torch.Tensor, side: int = THUMBNAIL) -> torch.Tensor:
    """uint8 [N, 3, h, w] display copies of [N, 3, H, W] images in [0, 1], longest side at most ``side``."""
    import torch.nn.functional as F
    h, w = images01.shape[-2:]
    scale = min(1.0, side / max(h, w))
    if scale < 1.0:
        images01 = F.interpolate(images01.float(), size=(max(1, round(h * scale)), max(1, round(w * scale))),
                                 mode="bilinear", align_corners=False, antialias=True)
    return (images01.clamp(0, 1) * 255).round().to(torch.uint8)


def attach_concept_images(heads: KeptHeads, cfg: Any, train: dict[str, Any], pre: dict[str, Any]) -> None:
    """Fill ``heads.concept_images`` with the element image of each concept, where it can be recovered.

    A prototype concept is one element's embedding: with the default geometry (``element_geometry="crop"``) and
    the stratified pick, the elements are remade from the cached concept-source images in the order the library
    was built from (kind-major, as :func:`iis_fast.concepts.make_elements`) and the same rows are picked. Other
    libraries have no single element per concept; a note says so.
    """
    from ..concepts import make_elements, parse_elements, stratified_indices
    from ..validation import tensor_from_numpy
    if cfg.library != "prototype" or cfg.element_geometry != "crop" or cfg.prototype_selection != "stratified":
        heads.notes.append(f"no element images: library={cfg.library}, element_geometry={cfg.element_geometry}, "
                           f"prototype_selection={cfg.prototype_selection} (images are kept for the default "
                           "prototype library only)")
        return
    mean = torch.tensor(pre["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"]).view(1, -1, 1, 1)
    images01 = (tensor_from_numpy(train["src_images"]).float() * std + mean).clamp(0, 1)
    if images01.shape[1] == 1:
        images01 = images01.expand(-1, 3, -1, -1)
    size = tuple(pre["input_size"][1:])
    el, labels = make_elements(images01, np.asarray(train["src_labels"]), kinds=parse_elements(cfg.elements),
                               out_size=size)
    pick = torch.as_tensor(stratified_indices(labels, heads.concepts.shape[0], cfg.seed))
    heads.concept_images = thumbnails(el[pick])
    heads.concept_labels = labels[pick].clone()
