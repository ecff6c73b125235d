"""Probe heads (docs/spec.md §2.1) acting at every spatial position of a frozen backbone's last feature map.

Every head maps a feature map ``[B, D, h, w]`` to per-position logits ``[B, C, h, w]`` with 1x1 convolutions and
returns their mean over positions plus a fixed logit bias (0 for heads with biases, ``-ln(C - 1)`` for bias-free
ones, so that an all-zero output gives sigmoid probability 1/C):

- :class:`LinearProbe`: one 1x1 conv (for this head, averaging per-position logits equals pooling first);
- :class:`MLPProbe`: 2 or 3 layers, hidden 2048, BatchNorm + ReLU between layers, no BN after the last;
- both also bias-free (``bias=False``: the convolutions have no bias; the BatchNorms keep theirs, as the
  official ``with_bias=False`` heads);
- :class:`BcosProbe`: 1 to 3 B-cos layers (B = 2), bias-free uncentred BatchNorm between layers, no ReLU;
  :meth:`BcosProbe.contributions` gives the exact per-position contribution maps.

:func:`make_head` builds one from a name (``linear``, ``mlp2``, ``mlp3``, ``bcos1``, ``bcos2``, ``bcos3``, and
``linear_nobias``, ``mlp2_nobias``, ``mlp3_nobias`` for the bias-free linear and MLP heads).
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IISInputError

__all__ = [
    "HEAD_NAMES",
    "SpatialHead",
    "LinearProbe",
    "MLPProbe",
    "BcosConv2d",
    "UncentredBatchNorm2d",
    "BcosProbe",
    "make_head",
    "explanation_mode",
]

HEAD_NAMES: tuple[str, ...] = ("linear", "mlp2", "mlp3", "bcos1", "bcos2", "bcos3")


def _check_map(fmap: torch.Tensor, in_channels: int) -> None:
    if fmap.dim() != 4 or fmap.shape[1] != in_channels:
        raise IISInputError(
            f"feature map must be [B, {in_channels}, h, w] (the backbone's last stage), got {tuple(fmap.shape)}")


class SpatialHead(nn.Module):
    """Base class: ``forward(fmap) = spatial_logits(fmap).mean((2, 3)) + logit_bias``."""

    in_channels: int
    num_classes: int
    logit_bias: float = 0.0

    def spatial_logits(self, fmap: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Per-position logits ``[B, C, h, w]`` (without the constant ``logit_bias``)."""
        raise NotImplementedError

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]``: the per-position logits averaged over positions, plus ``logit_bias``."""
        _check_map(fmap, self.in_channels)
        out = self.spatial_logits(fmap).mean(dim=(2, 3))
        return out + self.logit_bias if self.logit_bias else out


def _logit_bias(bias: bool, num_classes: int, logit_bias: float | None) -> float:
    """The fixed logit bias: ``logit_bias`` if given, else 0 with biases and ``-ln(C - 1)`` without."""
    if logit_bias is not None:
        return float(logit_bias)
    if bias:
        return 0.0
    if num_classes < 2:
        raise IISInputError(f"num_classes must be >= 2 for a bias-free head (logit bias -ln(C-1)), got {num_classes}")
    return float(-math.log(num_classes - 1))


class LinearProbe(SpatialHead):
    """A linear probe as a 1x1 conv (weight ``[C, D, 1, 1]``, bias ``[C]``), logits averaged over positions.

    With ``bias=False`` the conv has no bias and the logits get the fixed ``logit_bias`` (default ``-ln(C - 1)``).
    """

    def __init__(self, in_channels: int, num_classes: int, bias: bool = True, logit_bias: float | None = None) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.bias = int(in_channels), int(num_classes), bool(bias)
        self.logit_bias = _logit_bias(self.bias, self.num_classes, logit_bias)
        self.fc = nn.Conv2d(self.in_channels, self.num_classes, kernel_size=1, bias=self.bias)

    def spatial_logits(self, fmap: torch.Tensor) -> torch.Tensor:
        """Per-position logits ``W x(i, j) + b``."""
        return self.fc(fmap)


class MLPProbe(SpatialHead):
    """An MLP probe of ``layers`` 1x1 convs: ``conv -> BN -> ReLU -> ... -> conv`` (no BN after the last).

    With ``bias=False`` the convs have no bias (the BatchNorms keep their affine β) and the logits get the fixed
    ``logit_bias`` (default ``-ln(C - 1)``).
    """

    def __init__(self, in_channels: int, num_classes: int, layers: int = 2, hidden: int = 2048, bias: bool = True,
                 logit_bias: float | None = None) -> None:
        super().__init__()
        if layers < 2:
            raise IISInputError(f"layers must be >= 2 for an MLP probe (use LinearProbe for 1), got {layers}")
        self.in_channels, self.num_classes, self.layers, self.hidden = int(in_channels), int(num_classes), layers, hidden
        self.bias = bool(bias)
        self.logit_bias = _logit_bias(self.bias, self.num_classes, logit_bias)
        mods: list[nn.Module] = []
        c = self.in_channels
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, hidden, kernel_size=1, bias=self.bias), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
            c = hidden
        mods.append(nn.Conv2d(c, self.num_classes, kernel_size=1, bias=self.bias))
        self.net = nn.Sequential(*mods)

    def spatial_logits(self, fmap: torch.Tensor) -> torch.Tensor:
        """Per-position MLP logits."""
        return self.net(fmap)


class BcosConv2d(nn.Module):
    """A 1x1 B-cos convolution: ``out = |cos(x, w)|^(B-1) * (ŵ · x)`` with unit-norm weights ``ŵ``, no bias.

    ``cos`` uses the per-position input norm ``sqrt(Σ_c x_c² + 1e-6)`` (as B-cos v2). With ``detach`` set
    (explanation mode) the dynamic factor ``|cos|^(B-1)`` is treated as a constant, so the layer is exactly the
    dynamic linear map ``W(x) x`` and ``x * d out / d x`` summed over channels equals ``out``.
    """

    def __init__(self, in_channels: int, out_channels: int, b: float = 2.0) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.b = int(in_channels), int(out_channels), float(b)
        self.weight = nn.Parameter(torch.empty(self.out_channels, self.in_channels, 1, 1))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.detach = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``|cos|^(B-1) * (ŵ · x)`` at every position."""
        w = self.weight / self.weight.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        out = F.conv2d(x, w)
        if self.b == 1:
            return out
        norm = (x.pow(2).sum(dim=1, keepdim=True) + 1e-6).sqrt()
        scale = out.abs() / norm if self.b == 2 else ((out / norm).abs() + 1e-6).pow(self.b - 1)
        return (scale.detach() if self.detach else scale) * out


class UncentredBatchNorm2d(nn.BatchNorm2d):
    """Bias-free uncentred BatchNorm: ``x / sqrt(var + eps) * γ`` (the mean is NOT subtracted, no β).

    ``var`` is the batch variance (training) or the running variance (eval), as B-cos v2's
    ``NoBias(BatchNormUncentered2d)``. In eval mode it is a per-channel linear scaling, so it keeps B-cos
    heads dynamic linear (no bias terms anywhere).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True)
        self.bias = None  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Divide by the (batch or running) standard deviation, times γ."""
        if self.training:
            var = x.var(dim=(0, 2, 3), unbiased=False)
            with torch.no_grad():
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * var.detach())
                self.num_batches_tracked.add_(1)
        else:
            var = self.running_var
        return x / (var + self.eps).sqrt().view(1, -1, 1, 1) * self.weight.view(1, -1, 1, 1)


class BcosProbe(SpatialHead):
    """A B-cos probe: ``layers`` B-cos 1x1 convs (B = 2), uncentred bias-free BN between, no ReLU.

    Logits are the per-position outputs averaged over positions plus ``logit_bias = -ln(C - 1)`` (so an
    all-zero output gives sigmoid probability 1/C). The head is dynamic linear: :meth:`contributions` returns,
    per class and position, ``W(x(i, j)) x(i, j) / (h w)``, which sums to ``logit - logit_bias`` exactly.
    """

    def __init__(self, in_channels: int, num_classes: int, layers: int = 1, hidden: int = 2048, b: float = 2.0,
                 logit_bias: float | None = None) -> None:
        super().__init__()
        if not 1 <= layers:
            raise IISInputError(f"layers must be >= 1 for a B-cos probe, got {layers}")
        if num_classes < 2:
            raise IISInputError(f"num_classes must be >= 2 for a B-cos probe (logit bias -ln(C-1)), got {num_classes}")
        self.in_channels, self.num_classes, self.layers, self.hidden = int(in_channels), int(num_classes), layers, hidden
        self.logit_bias = float(-math.log(num_classes - 1) if logit_bias is None else logit_bias)
        mods: list[nn.Module] = []
        c = self.in_channels
        for _ in range(layers - 1):
            mods += [BcosConv2d(c, hidden, b=b), UncentredBatchNorm2d(hidden)]
            c = hidden
        mods.append(BcosConv2d(c, self.num_classes, b=b))
        self.net = nn.Sequential(*mods)

    def spatial_logits(self, fmap: torch.Tensor) -> torch.Tensor:
        """Per-position B-cos outputs (no bias)."""
        return self.net(fmap)

    @contextlib.contextmanager
    def explanation_mode(self) -> Iterator["BcosProbe"]:
        """Within the context, the dynamic scale factors are detached (gradients = dynamic linear weights)."""
        convs = [m for m in self.modules() if isinstance(m, BcosConv2d)]
        old = [m.detach for m in convs]
        for m in convs:
            m.detach = True
        try:
            yield self
        finally:
            for m, o in zip(convs, old):
                m.detach = o

    def contributions(self, fmap: torch.Tensor) -> torch.Tensor:
        """Contribution maps ``[B, C, h, w]`` for every class from one forward: summed over (h, w) they give
        ``logit - logit_bias``. (In eval mode; the forward values do not depend on detaching.)"""
        _check_map(fmap, self.in_channels)
        with self.explanation_mode():
            out = self.spatial_logits(fmap)
        return out / (out.shape[-2] * out.shape[-1])


@contextlib.contextmanager
def explanation_mode(head: nn.Module) -> Iterator[nn.Module]:
    """B-cos explanation mode for ``head`` if it is a :class:`BcosProbe`; a no-op otherwise."""
    if isinstance(head, BcosProbe):
        with head.explanation_mode():
            yield head
    else:
        yield head


def make_head(name: str, in_channels: int, num_classes: int, hidden: int = 2048,
              logit_bias: float | None = None) -> SpatialHead:
    """Build a head by name: ``linear``, ``mlp2``/``mlp3``, ``bcos1``/``bcos2``/``bcos3`` (any depth >= 1 for
    ``bcosN``, >= 2 for ``mlpN``); the suffix ``_nobias`` gives a bias-free linear / MLP head (``linear_nobias``,
    ``mlp2_nobias``). ``hidden`` is the width of hidden layers (default 2048, as the paper). ``logit_bias``
    overrides the fixed logit bias of bias-free and B-cos heads (default ``-ln(C - 1)``)."""
    m = re.fullmatch(r"(linear|mlp|bcos)(\d*)(_nobias)?", str(name))
    if m is None:
        raise IISInputError(f"heads: unknown head {name!r}; use linear, mlp2, mlp3, bcos1, bcos2 or bcos3, or "
                            "linear_nobias, mlp2_nobias, mlp3_nobias")
    kind, depth, bias = m.group(1), int(m.group(2) or 1), m.group(3) is None
    if in_channels < 1 or num_classes < 2:
        raise IISInputError(f"in_channels must be >= 1 and num_classes >= 2, got {in_channels}, {num_classes}")
    lb = None if bias else logit_bias
    if kind == "linear":
        if depth != 1:
            raise IISInputError(f"heads: {name!r}: a linear head has one layer; use mlp{depth} for a deeper one")
        return LinearProbe(in_channels, num_classes, bias=bias, logit_bias=lb)
    if kind == "mlp":
        if depth < 2:
            raise IISInputError(f"heads: {name!r}: an MLP head needs >= 2 layers (mlp2, mlp3)")
        return MLPProbe(in_channels, num_classes, layers=depth, hidden=hidden, bias=bias, logit_bias=lb)
    if not bias:
        raise IISInputError(f"heads: {name!r}: B-cos heads have no biases already; use bcos{depth}")
    return BcosProbe(in_channels, num_classes, layers=depth, hidden=hidden, logit_bias=logit_bias)
