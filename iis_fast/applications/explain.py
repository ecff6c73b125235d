"""Predictions one can look at (the IIS paper's second application; docs/applications.md).

A concept head at sparsity s predicts ``argmax_c  W[c]·z_kept + b[c]`` with ``z = LayerNorm(x·Cᵀ)`` and
``z_kept`` its entries above the (int(M*s)+1)-th smallest |z|. The logit of the predicted class is then a sum of
M terms ``W[pred, j] * z_kept[j]`` (weight x activation) plus a bias; the largest terms are the concepts the
prediction rests on, each an element image (patch or segment) of a training image.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from ..errors import IISInputError
from .kept_heads import KeptHeads


@dataclass
class Explanation:
    """One image's prediction by the concept head at ``sparsity`` and the concepts it rests on."""

    prediction: int
    probability: float
    sparsity: float
    logit: float                              # = sum(contribution over all concepts) + bias
    bias: float
    acc_s: float                              # the head's eval accuracy (the same head)
    acc_std: float                            # the standard probe's eval accuracy
    top: list[dict[str, Any]]                 # index, concept_class, weight, activation, contribution
    kept_concepts: int                        # nonzero activations at this sparsity
    label: int | None = None
    class_names: list[str] | None = None
    probe_prediction: int | None = None       # the standard probe's prediction, for comparison
    notes: list[str] = field(default_factory=list)

    def name(self, c: int | None) -> str:
        if c is None:
            return "?"
        return self.class_names[c] if self.class_names and 0 <= c < len(self.class_names) else str(c)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def report(self) -> str:
        """A few lines of text: the prediction, the accuracy cost of predicting this way, the top concepts."""
        lines = [f"concept head at s = {self.sparsity:g}: predicts {self.name(self.prediction)} "
                 f"(p = {self.probability:.3f})" + (f", true label {self.name(self.label)}" if self.label is not None
                                                     else "")
                 + (f"; the standard probe predicts {self.name(self.probe_prediction)}"
                    if self.probe_prediction is not None else ""),
                 f"this head's eval accuracy acc_s = {self.acc_s:.4f} against the standard probe's acc_std = "
                 f"{self.acc_std:.4f} (ARR {self.acc_s / self.acc_std if self.acc_std else float('nan'):.3f}); "
                 f"{self.kept_concepts} concepts active",
                 f"logit {self.logit:.3f} = bias {self.bias:.3f} + sum of weight x activation; the largest terms:"]
        for r in self.top:
            lines.append(f"  concept {r['index']:>4} (from a {self.name(r['concept_class'])} image): "
                         f"{r['weight']:+.3f} x {r['activation']:+.3f} = {r['contribution']:+.3f}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


@torch.no_grad()
def concept_contributions(heads: KeptHeads, features: torch.Tensor, sparsity: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For features [D] (one image): (logits [K], the kept activations z_kept [M], the weight matrix W [K, M]).

    ``W[pred] * z_kept`` are the per-concept terms of the predicted logit.
    """
    from ..backends.common import sparse_mask
    head = heads.module(sparsity)
    x = torch.as_tensor(features).float().reshape(1, -1)
    if x.shape[1] != heads.concepts.shape[1]:
        raise IISInputError(f"features have D = {x.shape[1]} but the heads' concepts have D = "
                            f"{heads.concepts.shape[1]}: explain with the model the heads were trained on")
    z = head.norm(x @ head.concepts.T)
    z_kept = (z * sparse_mask(z, head.k))[0]
    logits = head.fc(z_kept[None])[0]
    return logits, z_kept, head.fc.weight.detach()


def explain(model: Any, image: torch.Tensor, heads: KeptHeads, *, sparsity: float | None = None, top: int = 6,
            label: int | None = None, class_names: Sequence[str] | None = None, layer: str | None = None,
            image_mean: Any = None, image_std: Any = None, png: str | os.PathLike[str] | None = None,
            device: str = "cpu") -> Explanation:
    """Explain ``model``'s concept-head prediction for one image (docs/applications.md).

    Args:
        model: the backbone the heads were trained on (a ``torch.nn.Module`` or a timm model name).
        image: one image [3, H, W] (or [1, 3, H, W]) under the loader's preprocessing (normalised).
        heads: ``score(..., keep_heads=True).heads``, :meth:`IISResult.load_heads`, or a fine-tuning run's
            :func:`heads_from_finetune`.
        sparsity: which kept head (default: the largest kept sparsity whose ARR is at least 0.9).
        top: how many concepts to show. label / class_names: for the report and the picture.
        layer, image_mean, image_std: as :func:`iis_fast.score` (mean/std un-normalise the image for the PNG).
        png: write the picture here: the image, then each top concept's element image with its term.
    """
    from ..features import representation_fn
    from ..score import _preprocessing, _resolve_model
    if isinstance(model, str):
        from ..models import create_model
        net = create_model(model, pretrained=True)
    else:
        net, _ = _resolve_model(model, None)
    img = torch.as_tensor(image).float()
    if img.dim() == 3:
        img = img[None]
    if img.dim() != 4 or img.shape[0] != 1:
        raise IISInputError(f"image must be one [3, H, W] image, got shape {tuple(torch.as_tensor(image).shape)}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise IISInputError(f"top={top!r}: must be a positive integer")
    if sparsity is None:
        ok = [h.sparsity for h in heads.heads if heads.acc_std and h.acc / heads.acc_std >= 0.9]
        sparsity = max(ok) if ok else min(heads.sparsities)
    kept = heads.head_at(sparsity)
    embed = representation_fn(net.to(device).eval(), layer)
    x = embed(img.to(device)).float().cpu()[0]
    logits, z_kept, w = concept_contributions(heads, x, sparsity)
    pred = int(logits.argmax())
    terms = w[pred] * z_kept
    order = torch.argsort(terms, descending=True)[:min(top, len(terms))]
    labels = heads.concept_labels
    rows = [{"index": int(j), "concept_class": None if labels is None else int(labels[j]),
             "weight": float(w[pred, j]), "activation": float(z_kept[j]), "contribution": float(terms[j])}
            for j in order]
    probe_pred = int(heads.predict(x[None]).argmax())
    ex = Explanation(prediction=pred, probability=float(logits.softmax(-1)[pred]), sparsity=float(sparsity),
                     logit=float(logits[pred]), bias=float(logits[pred] - terms.sum()), acc_s=kept.acc,
                     acc_std=heads.acc_std, top=rows, kept_concepts=int((z_kept != 0).sum()), label=label,
                     class_names=list(class_names) if class_names is not None else None,
                     probe_prediction=probe_pred, notes=list(heads.notes))
    if png is not None:
        from .gallery import explanation_png
        pre = _preprocessing(net, image_mean, image_std, None)
        mean = torch.tensor(pre["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(pre["std"]).view(1, -1, 1, 1)
        explanation_png(ex, (img.cpu() * std + mean).clamp(0, 1)[0], heads, png)
    return ex


def heads_from_finetune(result: Any) -> KeptHeads:
    """The probe and concept head of a :func:`iis_fast.finetune` run as :class:`KeptHeads` (one sparsity), with
    their eval accuracies from the run's last epoch, for :func:`explain` and the concept gallery."""
    from .kept_heads import KeptHead, thumbnails
    h, last = result.head, result.history.epochs[-1]
    cfg = result.history.config
    kept = KeptHead(cfg["sparsity"], int(h.k), cfg["head_lr"], len(result.history.epochs),
                    float(last.get("eval_acc_concept", float("nan"))), h.norm.weight.detach().cpu().clone(),
                    h.norm.bias.detach().cpu().clone(), h.fc.weight.detach().cpu().clone(),
                    h.fc.bias.detach().cpu().clone())
    return KeptHeads(result.concepts.cpu(), result.probe.weight.detach().cpu().clone(),
                     result.probe.bias.detach().cpu().clone(), float(last.get("eval_acc_probe", float("nan"))),
                     [kept], int(h.fc.weight.shape[0]), "prototype", thumbnails(result.concept_images),
                     result.concept_labels.clone(), ["heads of a fine-tuning run (trained jointly with the backbone)"])
