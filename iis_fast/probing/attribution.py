"""Attribution maps for a backbone + probe head, all targets of an image from one forward where possible.

Methods (maps are ``[B, T, H, W]``: channels summed, input resolution, one per (image, target)):

- ``ixg``  Input×Gradient: one forward of the images (channels_last, so CPU convolutions take the oneDNN
  path), then one backward per target column over the whole batch, reusing the graph (vmap'ing the backward
  with ``is_grads_batched`` measured slower on CPU: it loops over cotangents inside the conv backward).
- ``gradcam`` Grad-CAM on the last conv block (the backbone's last spatial map F): the backbone runs once
  without a graph; the head's gradients for all T targets come from one batched backward through the head
  only. ``cam = ReLU(Σ_d mean_hw(∂y_t/∂F_d) F_d)``, bilinearly upsampled (align_corners=False).
- ``ig`` Integrated Gradients, baseline 0 (in normalised input space), ``steps`` midpoint-rule points: all
  steps of an image in one forward, then one backward per target.
- ``bcos`` B-cos contribution maps (B-cos heads only): per-position contributions ``W(F) F / (h w)`` of every
  class from one forward of the head, bilinearly upsampled. They sum (before upsampling) to logit - bias.
- LRP is not implemented (it needs per-layer rules and canonizers for the backbone; see docs/probing.md).

``batched=False`` computes the same maps one (image, target) pair at a time (one forward + backward each), as
the reference does; tests check both agree, and ``bench/bench_attribution.py`` times both.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IISInputError
from .heads import BcosProbe, explanation_mode
from .spatial import spatial_features

__all__ = ["METHODS", "ProbedModel", "TimmHead", "as_probed", "attribute", "frozen_eval"]

METHODS: tuple[str, ...] = ("ixg", "gradcam", "ig", "bcos")


class TimmHead(nn.Module):
    """A timm model's own classifier as a head on its feature map (``forward_head``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """Logits of the model's classifier."""
        return self.model.forward_head(fmap)


class ProbedModel(nn.Module):
    """A frozen backbone with a probe head: ``forward(x) = head(spatial_features(backbone, x))``."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last spatial map ``[B, D, h, w]`` (the Grad-CAM layer)."""
        return spatial_features(self.backbone, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]``."""
        return self.head(self.features(x))


def as_probed(model: nn.Module) -> ProbedModel:
    """``model`` as a :class:`ProbedModel`: itself, or a timm classifier split at ``forward_features``."""
    if isinstance(model, ProbedModel):
        return model
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return ProbedModel(model, TimmHead(model))
    raise IISInputError(f"model_with_head: expected a ProbedModel(backbone, head) or a timm classifier, got "
                        f"{type(model).__name__}; build one with iis_fast.probing.ProbedModel(backbone, head)")


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside the context (both restored afterwards)."""
    params = list(model.parameters())
    old_req = [p.requires_grad for p in params]
    old_train = [(m, m.training) for m in model.modules()]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, r in zip(params, old_req):
            p.requires_grad_(r)
        for m, t in old_train:
            m.train(t)


def _cotangents(targets: torch.Tensor, num_classes: int, dtype: torch.dtype, repeat: int = 1) -> torch.Tensor:
    """One-hot cotangents ``[T, B*repeat, C]`` selecting target t of each image."""
    go = F.one_hot(targets.t(), num_classes).to(dtype)               # [T, B, C]
    return go.repeat_interleave(repeat, dim=1) if repeat > 1 else go


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    b, t = maps.shape[:2]
    out = F.interpolate(maps.reshape(b * t, 1, *maps.shape[-2:]), size=size, mode="bilinear", align_corners=False)
    return out.reshape(b, t, *size)


def _target_grads(logits: torch.Tensor, x: torch.Tensor, targets: torch.Tensor, repeat: int = 1) -> torch.Tensor:
    """Input gradients ``[T, N, ...]`` of target t of each image, from ONE forward (``logits`` of ``x``).

    One backward per target column over the whole batch, reusing the graph. (``is_grads_batched`` would vmap
    the backward, but on CPU its convolution backward falls back to one call per cotangent plus a
    concatenation, which measured ~2x slower than these T plain backward passes.)
    """
    tg = targets.repeat_interleave(repeat, dim=0) if repeat > 1 else targets         # [N, T]
    grads = []
    for t in range(tg.shape[1]):
        sel = logits.gather(1, tg[:, t:t + 1]).sum()
        grads.append(torch.autograd.grad(sel, x, retain_graph=t < tg.shape[1] - 1)[0])
    return torch.stack(grads)


def _ixg(model: ProbedModel, x: torch.Tensor, targets: torch.Tensor, batched: bool) -> torch.Tensor:
    if batched:
        # channels_last input: on CPU the convolutions then take the oneDNN path (~2-3x faster here)
        xg = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        with explanation_mode(model.head):
            logits = model(xg)
        g = _target_grads(logits, xg, targets)                                        # [T, B, 3, H, W]
        return (g * xg.detach()).sum(2).transpose(0, 1).contiguous()
    out = x.new_empty(x.shape[0], targets.shape[1], *x.shape[-2:])
    for b in range(x.shape[0]):
        for t in range(targets.shape[1]):
            xi = x[b:b + 1].detach().clone().requires_grad_(True)
            with explanation_mode(model.head):
                logit = model(xi)[0, targets[b, t]]
            g, = torch.autograd.grad(logit, xi)
            out[b, t] = (g * xi.detach()).sum(1)[0]
    return out


def _gradcam(model: ProbedModel, x: torch.Tensor, targets: torch.Tensor, batched: bool) -> torch.Tensor:
    size = (x.shape[-2], x.shape[-1])
    if batched:
        with torch.no_grad():
            fmap = model.features(x)
        fmap.requires_grad_(True)
        logits = model.head(fmap)
        g, = torch.autograd.grad(logits, fmap, _cotangents(targets, logits.shape[1], logits.dtype),
                                 is_grads_batched=True)                # [T, B, D, h, w]
        alpha = g.mean(dim=(3, 4))                                     # [T, B, D]
        cam = torch.einsum("tbd,bdhw->bthw", alpha, fmap.detach()).clamp_min(0.0)
        return _upsample(cam, size)
    out = x.new_empty(x.shape[0], targets.shape[1], *size)
    for b in range(x.shape[0]):
        for t in range(targets.shape[1]):
            fmap = model.features(x[b:b + 1]).detach().requires_grad_(True)
            logit = model.head(fmap)[0, targets[b, t]]
            g, = torch.autograd.grad(logit, fmap)
            cam = (g.mean(dim=(2, 3), keepdim=True) * fmap.detach()).sum(1, keepdim=True).clamp_min(0.0)
            out[b, t] = _upsample(cam, size)[0, 0]
    return out


def _ig(model: ProbedModel, x: torch.Tensor, targets: torch.Tensor, batched: bool, steps: int,
        baseline: torch.Tensor | None) -> torch.Tensor:
    base = torch.zeros_like(x) if baseline is None else baseline.expand_as(x).to(x)
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps   # midpoint rule
    out = x.new_empty(x.shape[0], targets.shape[1], *x.shape[-2:])
    for b in range(x.shape[0]):
        diff = (x[b] - base[b]).detach()
        if batched:
            xs = (base[b] + alphas.view(-1, 1, 1, 1) * diff).contiguous(memory_format=torch.channels_last)
            xs.requires_grad_(True)                                                # [m, 3, H, W]
            with explanation_mode(model.head):
                logits = model(xs)
            g = _target_grads(logits, xs, targets[b:b + 1], repeat=steps)                # [T, m, 3, H, W]
            out[b] = (g.mean(1) * diff).sum(1)
        else:
            for t in range(targets.shape[1]):
                acc = torch.zeros_like(diff)
                for a in alphas:
                    xi = (base[b] + a * diff).unsqueeze(0).requires_grad_(True)
                    with explanation_mode(model.head):
                        logit = model(xi)[0, targets[b, t]]
                    g, = torch.autograd.grad(logit, xi)
                    acc += g[0]
                out[b, t] = (acc / steps * diff).sum(0)
    return out


def _bcos(model: ProbedModel, x: torch.Tensor, targets: torch.Tensor, batched: bool) -> torch.Tensor:
    head = model.head
    if not isinstance(head, BcosProbe):
        raise IISInputError(f"methods: 'bcos' contribution maps need a B-cos head, got {type(head).__name__}")
    size = (x.shape[-2], x.shape[-1])
    if batched:
        with torch.no_grad():
            contrib = head.contributions(model.features(x))             # [B, C, h, w]
        sel = contrib.gather(1, targets.view(*targets.shape, 1, 1).expand(-1, -1, *contrib.shape[-2:]))
        return _upsample(sel, size)
    out = x.new_empty(x.shape[0], targets.shape[1], *size)
    for b in range(x.shape[0]):
        for t in range(targets.shape[1]):
            with torch.no_grad():
                f = model.features(x[b:b + 1])                          # one forward per target
            f.requires_grad_(True)
            with head.explanation_mode():
                logit = head(f)[0, targets[b, t]]
            g, = torch.autograd.grad(logit, f)                         # dynamic linear weights
            out[b, t] = _upsample((g * f.detach()).sum(1, keepdim=True), size)[0, 0]
    return out


def attribute(model_with_head: nn.Module, images: torch.Tensor, targets: torch.Tensor | Sequence, method: str,
              *, batched: bool = True, ig_steps: int = 20, ig_baseline: torch.Tensor | None = None,
              chunk: int = 8) -> torch.Tensor:
    """Attribution maps ``[B, T, H, W]`` of ``images`` ``[B, 3, H, W]`` for ``targets`` ``[B, T]`` (class ids).

    Args:
        model_with_head: a :class:`ProbedModel` or a timm classifier (see :func:`as_probed`).
        images: preprocessed (normalised) input images.
        targets: per image, the T target classes (a 1-D ``[B]`` tensor means one target per image).
        method: ``ixg``, ``gradcam``, ``ig`` or ``bcos`` (B-cos heads only).
        batched: all targets of an image from one forward (default); False: one target at a time.
        ig_steps: Integrated Gradients steps (midpoint rule); ig_baseline: its baseline (default zeros).
        chunk: images per batched call (bounds memory: a batched backward holds T cotangents per image).

    For B-cos heads, gradient methods run in explanation mode (dynamic scale factors detached).
    """
    if method not in METHODS:
        raise IISInputError(f"methods: unknown method {method!r}; use one of {', '.join(METHODS)} "
                            "(LRP is not implemented)")
    model = as_probed(model_with_head)
    x = torch.as_tensor(images)
    if x.dim() != 4:
        raise IISInputError(f"images must be [B, C, H, W], got {tuple(x.shape)}")
    tg = torch.as_tensor(targets, dtype=torch.long, device=x.device)
    if tg.dim() == 1:
        tg = tg.unsqueeze(1)
    if tg.dim() != 2 or tg.shape[0] != x.shape[0]:
        raise IISInputError(f"targets must be [B] or [B, T] with B = {x.shape[0]}, got {tuple(tg.shape)}")
    if int(ig_steps) < 1:
        raise IISInputError(f"ig_steps must be >= 1, got {ig_steps}")
    outs = []
    with frozen_eval(model):
        for s in range(0, x.shape[0], max(1, chunk) if batched else x.shape[0]):
            xb, tb = x[s:s + chunk] if batched else x, tg[s:s + chunk] if batched else tg
            if method == "ixg":
                outs.append(_ixg(model, xb, tb, batched))
            elif method == "gradcam":
                outs.append(_gradcam(model, xb, tb, batched))
            elif method == "ig":
                outs.append(_ig(model, xb, tb, batched, int(ig_steps), ig_baseline))
            else:
                outs.append(_bcos(model, xb, tb, batched))
    return torch.cat(outs).detach()
