"""Attribution maps for a backbone + probe head (docs/spec.md §2.2).

Maps are ``[B, T, H, W]``: channels summed, input resolution, one per (image, target). Each method is a class
over :class:`Attribution`, which owns the loop (input checks, frozen eval mode, chunks of images); a method
gives two paths with the same maps:

- ``batched``: all T targets of an image from one forward (the fast path);
- ``reference``: one (image, target) pair at a time, one forward + backward each, as the official code does.

Methods (the registry :data:`ATTRIBUTIONS`; defaults are the official evaluation code's):

- ``ixg`` :class:`InputXGradient`: one channels_last forward (on CPU the convolutions then take the oneDNN
  path), then one backward per target column over the whole batch, reusing the graph (vmap'ing the backward
  with ``is_grads_batched`` measured slower on CPU: it loops over cotangents inside the conv backward).
- ``gradcam`` :class:`GradCAM`: ``cam = Σ_d mean_hw(∂y_t/∂A_d) A_d`` on a layer's activations ``A``, bilinearly
  upsampled (align_corners=False). Official form (default): ``A`` is the output of the backbone's last
  convolution (:func:`last_conv`; for a ResNet the last bottleneck's ``conv3``, before its BatchNorm and the
  residual add) and no ReLU (the metrics clip after smoothing), as captum's ``LayerGradCam`` with
  ``relu_attributions=False``. ``layer="features", relu=True`` is the classic form on the backbone's final map
  (pytorch-grad-cam's on ``layer4[-1]``). The backbone runs once; all targets' gradients come from one batched
  backward from the logits to ``A`` only.
- ``ig`` :class:`IntegratedGradients`: baseline 0 (in normalised input space), 50 Gauss-Legendre nodes by default
  (captum's default), or the midpoint rule; the nodes of an image in forwards of up to 16, one backward per
  target each.
- ``bcos`` :class:`BcosContributions` (B-cos heads only): per-position contributions ``W(F) F / (h w)`` of every
  class from one forward of the head, bilinearly upsampled. They sum (before upsampling) to logit - bias.
- LRP is not implemented (it needs per-layer rules and canonizers for the backbone; see docs/probing.md).

Gradients through a B-cos head are plain gradients by default, as the official scripts compute them for a
standard backbone with a B-cos probe; ``explanation_mode=True`` detaches the head's dynamic scale factors.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IISInputError
from .heads import BcosProbe, explanation_mode
from .spatial import spatial_features

__all__ = [
    "ATTRIBUTIONS", "METHODS", "GRADCAM_LAYERS", "IG_METHODS", "Attribution", "InputXGradient", "GradCAM",
    "IntegratedGradients", "BcosContributions", "ProbedModel", "TimmHead", "as_probed", "attribute",
    "make_attribution", "frozen_eval", "last_conv", "ig_nodes",
]

GRADCAM_LAYERS: tuple[str, ...] = ("last_conv", "features")
IG_METHODS: tuple[str, ...] = ("gausslegendre", "riemann_middle")


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
        """The backbone's last spatial map ``[B, D, h, w]``."""
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
        for m, t in old_train:      # per module, not .train(t): that would recurse into children (a TimmHead
            m.training = t          # wraps the backbone again) and undo their own restored modes


# ---------------------------------------------------------------------------------------------- shared helpers

def _cotangents(targets: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot cotangents ``[T, B, C]`` selecting target t of each image."""
    return F.one_hot(targets.t(), num_classes).to(dtype)


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) upsampling of ``[B, T, h, w]`` maps to ``size``."""
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


def _head_mode(model: "ProbedModel", explain: bool) -> contextlib.AbstractContextManager:
    """B-cos explanation mode for the head when ``explain`` is set; plain gradients otherwise."""
    return explanation_mode(model.head) if explain else contextlib.nullcontext()


_SHORTCUT_NAMES = frozenset({"downsample", "shortcut", "skip"})
# backbone -> its resolved last convolution (None: use the final map), found once per backbone object
_LAST_CONV: "weakref.WeakKeyDictionary[nn.Module, nn.Module | None]" = weakref.WeakKeyDictionary()


def last_conv(backbone: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """The official Grad-CAM layer: the last ``nn.Conv2d`` the backbone runs for its final map, skipping
    convolutions on a residual shortcut (modules under ``downsample`` / ``shortcut`` / ``skip``).

    For a ResNet that is the last bottleneck's ``conv3`` (``conv2`` of a basic block), before its BatchNorm and
    the residual add, as the official code's ``layer4[-1].conv3``; for MobileNetV2 / EfficientNet ``conv_head``
    (before its BatchNorm + activation). The order is found by running ``x[:1]`` once with hooks. Token
    backbones (ViTs), whose last convolution is the patch embedding, and backbones without a convolution
    give ``None``: Grad-CAM then uses the final map (``layer="features"``). The result is remembered per
    backbone object.
    """
    if backbone in _LAST_CONV:
        return _LAST_CONV[backbone]
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: order.append(mod))
             for name, m in backbone.named_modules()
             if isinstance(m, nn.Conv2d) and not _SHORTCUT_NAMES.intersection(name.split("."))]
    try:
        with torch.no_grad():
            out: Any = backbone.forward_features(x[:1]) if hasattr(backbone, "forward_features") else backbone(x[:1])
    finally:
        for h in hooks:
            h.remove()
    if isinstance(out, (tuple, list)):
        out = out[0]
    found = order[-1] if order and isinstance(out, torch.Tensor) and out.dim() == 4 else None
    _LAST_CONV[backbone] = found
    return found


def _find_layer(backbone: nn.Module, name: str) -> nn.Module:
    mods = dict(backbone.named_modules())
    if name not in mods:
        convs = [n for n, m in mods.items() if isinstance(m, nn.Conv2d)][-3:]
        raise IISInputError(f"gradcam_layer: the backbone has no module {name!r}; use 'last_conv', 'features' or a "
                            f"module name such as {', '.join(repr(c) for c in convs) or 'layer4.2.conv3'}")
    return mods[name]


@contextlib.contextmanager
def _capture(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the context, each output of ``layer`` is replaced by a detached leaf that requires grad (collected
    in the yielded list), so a forward builds a graph from that layer's activations to the logits only."""
    acts: list[torch.Tensor] = []

    def hook(mod: nn.Module, inp: Any, out: Any) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise IISInputError(f"gradcam_layer: {type(mod).__name__} returns {type(out).__name__}, not a tensor")
        a = out.detach().requires_grad_(True)
        acts.append(a)
        return a

    h = layer.register_forward_hook(hook)
    try:
        yield acts
    finally:
        h.remove()


def _layer_forward(model: "ProbedModel", x: torch.Tensor, layer: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, logits)``: activations ``A`` ``[B, D, h, w]`` of ``layer`` (None: the backbone's final map) as a leaf
    that requires grad, and the logits computed from it."""
    if layer is None:
        with torch.no_grad():
            a = model.features(x)
        a.requires_grad_(True)
        return a, model.head(a)
    with torch.enable_grad(), _capture(layer) as acts:
        logits = model(x)
    if len(acts) != 1:
        raise IISInputError(f"gradcam_layer: the layer ran {len(acts)} times in one forward; pick a module that "
                            "runs once")
    if acts[0].dim() != 4:
        raise IISInputError(f"gradcam_layer: Grad-CAM needs a [B, D, h, w] activation, the layer gives "
                            f"{tuple(acts[0].shape)}")
    return acts[0], logits


def ig_nodes(steps: int, method: str = "gausslegendre") -> tuple[torch.Tensor, torch.Tensor]:
    """Integration nodes ``alphas`` in (0, 1) and weights (summing to 1) of ``steps`` points, float64.

    ``gausslegendre``: Gauss-Legendre nodes rescaled from [-1, 1] (captum's default); ``riemann_middle``: the
    midpoint rule ``(i + 0.5) / steps`` with weights ``1 / steps``.
    """
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(int(steps))
        return torch.from_numpy(0.5 * (nodes + 1.0)), torch.from_numpy(0.5 * weights)
    if method == "riemann_middle":
        return (torch.arange(steps, dtype=torch.float64) + 0.5) / steps, torch.full((steps,), 1.0 / steps,
                                                                                 dtype=torch.float64)
    raise IISInputError(f"ig_method: use one of {', '.join(IG_METHODS)}, got {method!r}")


# ---------------------------------------------------------------------------------------------- the methods

class Attribution:
    """Base of the attribution methods: checks the inputs, runs the model frozen in eval mode, and loops over
    chunks of images; subclasses give the maps of one chunk by :meth:`batched` and :meth:`reference`.

    Call an instance as ``method(model_with_head, images, targets, batched=True, chunk=8)``.
    """

    name: ClassVar[str] = ""

    def batched(self, model: ProbedModel, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, T, H, W]`` of all targets of each image, sharing the forward pass."""
        raise NotImplementedError

    def reference(self, model: ProbedModel, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The same maps, one (image, target) pair at a time."""
        raise NotImplementedError

    def prepare(self, model: ProbedModel, x: torch.Tensor) -> None:
        """Per-call set-up on the whole input before the chunks (e.g. resolving a layer); a no-op by default."""

    def __call__(self, model_with_head: nn.Module, images: torch.Tensor, targets: torch.Tensor | Sequence, *,
                 batched: bool = True, chunk: int = 8) -> torch.Tensor:
        """Attribution maps ``[B, T, H, W]`` of ``images`` ``[B, 3, H, W]`` for ``targets`` ``[B]`` or ``[B, T]``."""
        model = as_probed(model_with_head)
        x = torch.as_tensor(images)
        if x.dim() != 4:
            raise IISInputError(f"images must be [B, C, H, W], got {tuple(x.shape)}")
        tg = torch.as_tensor(targets, dtype=torch.long, device=x.device)
        if tg.dim() == 1:
            tg = tg.unsqueeze(1)
        if tg.dim() != 2 or tg.shape[0] != x.shape[0]:
            raise IISInputError(f"targets must be [B] or [B, T] with B = {x.shape[0]}, got {tuple(tg.shape)}")
        step = max(1, int(chunk)) if batched else x.shape[0]
        run = self.batched if batched else self.reference
        outs = []
        with frozen_eval(model):
            self.prepare(model, x)
            for s in range(0, x.shape[0], step):
                outs.append(run(model, x[s:s + step], tg[s:s + step]))
        return torch.cat(outs).detach()


ATTRIBUTIONS: dict[str, type[Attribution]] = {}


def _register(cls: type[Attribution]) -> type[Attribution]:
    ATTRIBUTIONS[cls.name] = cls
    return cls


@_register
class InputXGradient(Attribution):
    """Input×Gradient ``Σ_channels x ⊙ ∂y_t/∂x``."""

    name = "ixg"

    def __init__(self, explanation_mode: bool = False) -> None:
        self.explanation_mode = bool(explanation_mode)

    def batched(self, model: ProbedModel, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # channels_last input: on CPU the convolutions then take the oneDNN path (~2-3x faster here)
        xg = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        with _head_mode(model, self.explanation_mode):
            logits = model(xg)
        g = _target_grads(logits, xg, targets)                                        # [T, B, 3, H, W]
        return (g * xg.detach()).sum(2).transpose(0, 1).contiguous()

    def reference(self, model: ProbedModel, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0], targets.shape[1], *x.shape[-2:])
        for b in range(x.shape[0]):
            for t in range(targets.shape[1]):
                xi = x[b:b + 1].detach().clone().requires_grad_(True)
                with _head_mode(model, self.explanation_mode):
                    logit = model(xi)[0, targets[b, t]]
                g, = torch.autograd.grad(logit, xi)
                out[b, t] = (g * xi.detach()).sum(1)[0]
        return out


@_register
class GradCAM(Attribution):
    """Grad-CAM: ``Σ_d mean_hw(∂y_t/∂A_d) A_d`` on ``layer``'s activations ``A``, bilinearly upsampled.

    Args:
        layer: ``"last_conv"`` (official, :func:`last_conv`), ``"features"`` (the backbone's final map), a
            module name inside the backbone (e.g. ``"layer4.2.conv3"``) or an ``nn.Module``.
        relu: clip the map at 0 before upsampling (the classic Grad-CAM); the official code does not.
        explanation_mode: B-cos explanation mode for the head's gradients.
    """

    name = "gradcam"

    def __init__(self, layer: str | nn.Module = "last_conv", relu: bool = False,
                 explanation_mode: bool = False) -> None:
        if not isinstance(layer, (str, nn.Module)):
            raise IISInputError(f"gradcam_layer: expected 'last_conv', 'features', a module name or a module, "
                                f"got {type(layer).__name__}")
        self.layer, self.relu, self.explanation_mode = layer, bool(relu), bool(explanation_mode)
        self._module: nn.Module | None = None

    def prepare(self, model: ProbedModel, x: torch.Tensor) -> None:
        """Resolve ``layer`` to a module of the backbone (None: the final map)."""
        if isinstance(self.layer, nn.Module):
            self._module = self.layer
        elif self.layer == "features":
            self._module = None
        elif self.layer == "last_conv":
            self._module = last_conv(model.backbone, x)
        else:
            self._module = _find_layer(model.backbone, self.layer)

    def _cam(self, grads: torch.Tensor, acts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``grads`` ``[T, B, D, h, w]``, ``acts`` ``[B, D, h, w]`` -> upsampled maps ``[B, T, H, W]``."""
        cam = torch.einsum("tbd,bdhw->bthw", grads.mean(dim=(3, 4)), acts)
        return _upsample(cam.clamp_min(0.0) if self.relu else cam, size)

    def batched(self, model: ProbedModel, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with _head_mode(model, self.explanation_mode):
            acts, logits = _layer_forward(model, x, self._module)
        g, = torch.autograd.grad(logits, acts, _cotangents(targets, logits.shape[1], logits.dtype),
                                 is_grads_batched=True)                # [T, B, D, h, w]
        return self._cam(g, acts.detach(), (x.shape[-2], x.shape[-1]))

    def reference(self, model: ProbedModel, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0], targets.shape[1], *x.shape[-2:])
        for b in range(x.shape[0]):
            for t in range(targets.shape[1]):
                with _head_mode(model, self.explanation_mode):
                    acts, logits = _layer_forward(model, x[b:b + 1], self._module)
                g, = torch.autograd.grad(logits[0, targets[b, t]], acts)
                out[b, t] = self._cam(g[None], acts.detach(), (x.shape[-2], x.shape[-1]))[0, 0]
        return out


@_register
class IntegratedGradients(Attribution):
    """Integrated Gradients ``Σ_channels (x - x0) ⊙ Σ_i w_i ∂y_t/∂x (x0 + α_i (x - x0))``.

    Args:
        steps: number of nodes (official: 50). method: ``gausslegendre`` (official) or ``riemann_middle``.
        baseline: ``x0`` (default zeros, in normalised input space). explanation_mode: as :class:`GradCAM`.
        internal_batch_size: nodes per forward pass of the batched path (bounds memory; the official EPG script
            passes 16 to captum, which splits the nodes the same way).
    """

    name = "ig"

    def __init__(self, steps: int = 50, method: str = "gausslegendre", baseline: torch.Tensor | None = None,
                 explanation_mode: bool = False, internal_batch_size: int = 16) -> None:
        if isinstance(steps, bool) or int(steps) < 1:
            raise IISInputError(f"ig_steps must be >= 1, got {steps}")
        if int(internal_batch_size) < 1:
            raise IISInputError(f"internal_batch_size must be >= 1, got {internal_batch_size}")
        self.steps, self.method, self.baseline = int(steps), method, baseline
        self.internal_batch_size = int(internal_batch_size)
        self.alphas, self.weights = ig_nodes(self.steps, method)
        self.explanation_mode = bool(explanation_mode)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x) if self.baseline is None else self.baseline.expand_as(x).to(x)

    def batched(self, model: ProbedModel, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        base = self._base(x)
        alphas, w = self.alphas.to(x), self.weights.to(x)
        out = x.new_empty(x.shape[0], targets.shape[1], *x.shape[-2:])
        for b in range(x.shape[0]):
            diff = (x[b] - base[b]).detach()
            acc = x.new_zeros(targets.shape[1], *x.shape[1:])                         # [T, 3, H, W]
            for s in range(0, self.steps, self.internal_batch_size):
                a = alphas[s:s + self.internal_batch_size]
                xs = (base[b] + a.view(-1, 1, 1, 1) * diff).contiguous(memory_format=torch.channels_last)
                xs.requires_grad_(True)                                                # [m, 3, H, W]
                with _head_mode(model, self.explanation_mode):
                    logits = model(xs)
                g = _target_grads(logits, xs, targets[b:b + 1], repeat=len(a))        # [T, m, 3, H, W]
                acc += torch.einsum("tmchw,m->tchw", g, w[s:s + self.internal_batch_size])
            out[b] = (acc * diff).sum(1)
        return out

    def reference(self, model: ProbedModel, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        base = self._base(x)
        out = x.new_empty(x.shape[0], targets.shape[1], *x.shape[-2:])
        for b in range(x.shape[0]):
            diff = (x[b] - base[b]).detach()
            for t in range(targets.shape[1]):
                acc = torch.zeros_like(diff)
                for a, w in zip(self.alphas.tolist(), self.weights.tolist()):
                    xi = (base[b] + a * diff).unsqueeze(0).requires_grad_(True)
                    with _head_mode(model, self.explanation_mode):
                        logit = model(xi)[0, targets[b, t]]
                    g, = torch.autograd.grad(logit, xi)
                    acc += w * g[0]
                out[b, t] = (acc * diff).sum(0)
        return out


@_register
class BcosContributions(Attribution):
    """B-cos contribution maps of a B-cos head: ``W(F) F / (h w)`` per class and position, upsampled."""

    name = "bcos"

    def prepare(self, model: ProbedModel, x: torch.Tensor) -> None:
        """Check that the head is a B-cos head."""
        if not isinstance(model.head, BcosProbe):
            raise IISInputError(f"methods: 'bcos' contribution maps need a B-cos head, got {type(model.head).__name__}")

    def batched(self, model: ProbedModel, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            contrib = model.head.contributions(model.features(x))             # [B, C, h, w]
        sel = contrib.gather(1, targets.view(*targets.shape, 1, 1).expand(-1, -1, *contrib.shape[-2:]))
        return _upsample(sel, (x.shape[-2], x.shape[-1]))

    def reference(self, model: ProbedModel, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        head = model.head
        out = x.new_empty(x.shape[0], targets.shape[1], *x.shape[-2:])
        for b in range(x.shape[0]):
            for t in range(targets.shape[1]):
                with torch.no_grad():
                    f = model.features(x[b:b + 1])                          # one forward per target
                f.requires_grad_(True)
                with head.explanation_mode():
                    logit = head(f)[0, targets[b, t]]
                g, = torch.autograd.grad(logit, f)                         # dynamic linear weights
                out[b, t] = _upsample((g * f.detach()).sum(1, keepdim=True), (x.shape[-2], x.shape[-1]))[0, 0]
        return out


METHODS: tuple[str, ...] = tuple(ATTRIBUTIONS)


def make_attribution(method: str, *, ig_steps: int = 50, ig_method: str = "gausslegendre",
                     ig_baseline: torch.Tensor | None = None, gradcam_layer: str | nn.Module = "last_conv",
                     gradcam_relu: bool = False, explanation_mode: bool = False) -> Attribution:
    """The :class:`Attribution` called ``method``, given the options that apply to it (others are ignored)."""
    if method not in ATTRIBUTIONS:
        raise IISInputError(f"methods: unknown method {method!r}; use one of {', '.join(METHODS)} "
                            "(LRP is not implemented)")
    if method == "ixg":
        return InputXGradient(explanation_mode)
    if method == "gradcam":
        return GradCAM(gradcam_layer, gradcam_relu, explanation_mode)
    if method == "ig":
        return IntegratedGradients(ig_steps, ig_method, ig_baseline, explanation_mode)
    return BcosContributions()


def attribute(model_with_head: nn.Module, images: torch.Tensor, targets: torch.Tensor | Sequence, method: str,
              *, batched: bool = True, ig_steps: int = 50, ig_method: str = "gausslegendre",
              ig_baseline: torch.Tensor | None = None, gradcam_layer: str | nn.Module = "last_conv",
              gradcam_relu: bool = False, explanation_mode: bool = False, chunk: int = 8) -> torch.Tensor:
    """Attribution maps ``[B, T, H, W]`` of ``images`` ``[B, 3, H, W]`` for ``targets`` ``[B, T]`` (class ids).

    Args:
        model_with_head: a :class:`ProbedModel` or a timm classifier (see :func:`as_probed`).
        images: preprocessed (normalised) input images.
        targets: per image, the T target classes (a 1-D ``[B]`` tensor means one target per image).
        method: ``ixg``, ``gradcam``, ``ig`` or ``bcos`` (B-cos heads only).
        batched: all targets of an image from one forward (default); False: one target at a time.
        ig_steps, ig_method, ig_baseline: Integrated Gradients nodes (official: 50, ``gausslegendre``; or
            ``riemann_middle``) and baseline (default zeros).
        gradcam_layer, gradcam_relu: Grad-CAM layer (official ``last_conv``; ``features`` = the final map; or a
            backbone module name / module) and whether to clip before upsampling (official: no).
        explanation_mode: B-cos explanation mode for the gradient methods (official: plain gradients).
        chunk: images per batched call (bounds memory: a batched backward holds T cotangents per image).
    """
    attr = make_attribution(method, ig_steps=ig_steps, ig_method=ig_method, ig_baseline=ig_baseline,
                            gradcam_layer=gradcam_layer, gradcam_relu=gradcam_relu,
                            explanation_mode=explanation_mode)
    return attr(model_with_head, images, targets, batched=batched, chunk=chunk)
