"""Eval-mode BatchNorm folded into the convolution that feeds it, for feature extraction.

An eval-mode BatchNorm is an affine map per channel, so ``bn(conv(x))`` equals one convolution with rescaled
weights and a bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``). On a CPU the separate BatchNorm pass is a large
share of a mobile backbone's time (MobileNetV2 at 224 px: 1.7x more images/s folded, docs/throughput.md).

Pairs are found from the data flow of one real forward pass (a BatchNorm whose input *is* a convolution's output,
that output reaching no other module), never from module names or order; the folded copy is then checked against
the original on the same images in float32 and discarded if they differ beyond float rounding. The caller's model
is never modified. timm's and torch.fx's own fusers do not serve here: timm has none for these families, and
``torch.fx`` fusion needs a traceable model and matches ``BatchNorm2d`` exactly, not timm's ``BatchNormAct2d``.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fold_batchnorm", "FOLD_RTOL"]

#: Largest difference allowed between folded and original representations, relative to their largest magnitude.
FOLD_RTOL = 1e-3


def _foldable_bn(bn: nn.Module) -> bool:
    from timm.layers.norm_act import BatchNormAct2d
    return (type(bn) in (nn.BatchNorm2d, BatchNormAct2d) and bn.running_mean is not None
            and bn.running_var is not None)


def _after_fold(bn: nn.Module) -> nn.Module:
    """What remains of a BatchNorm once its affine map is in the convolution: timm's fused activation, or nothing."""
    from timm.layers.norm_act import BatchNormAct2d
    return nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity()


def _pairs(model: nn.Module, run: Callable[[nn.Module], torch.Tensor]
           ) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """(conv name, bn name) pairs in which the BatchNorm's input is the convolution's output and nothing else
    (no other module) reads that output, as seen in one forward pass; and that pass's output."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, torch.Tensor]] = {}     # id(output) -> (conv name, output kept alive)
    readers: dict[int, list[str]] = {}
    hooks = []

    def conv_out(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (names[mod], out)

    def any_in(mod: nn.Module, inp: tuple) -> None:
        for t in inp:
            if isinstance(t, torch.Tensor) and id(t) in produced:
                readers.setdefault(id(t), []).append(names[mod])

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_out))
        hooks.append(m.register_forward_pre_hook(any_in))
    try:
        with torch.no_grad():
            out = run(model)
    finally:
        for h in hooks:
            h.remove()
    modules = dict(model.named_modules())
    pairs = []
    for key, (conv, _) in produced.items():
        r = readers.get(key, [])
        if len(r) == 1 and _foldable_bn(modules[r[0]]):
            pairs.append((conv, r[0]))
    return pairs, out


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def fold_batchnorm(model: nn.Module, run: Callable[[nn.Module], torch.Tensor]) -> tuple[nn.Module, int, str]:
    """A copy of ``model`` (eval mode) with every eval-mode BatchNorm that only a convolution feeds folded into it.

    ``run(m)`` computes the representation of some real images with ``m`` in float32 (a few images suffice); it
    finds the pairs and checks the copy. Returns ``(model, n_folded, note)``: the folded copy, or ``model`` itself
    when nothing folds or the check fails (``note`` then says why; empty otherwise).
    """
    model.eval()
    pairs, want = _pairs(model, run)
    if not pairs:
        return model, 0, ""
    folded = copy.deepcopy(model).eval()
    for conv, bn in pairs:
        c, b = folded.get_submodule(conv), folded.get_submodule(bn)
        _set(folded, conv, fuse_conv_bn_eval(c, b))
        _set(folded, bn, _after_fold(b))
    with torch.no_grad():
        want, got = want.float(), run(folded).float()
    scale = float(want.abs().max()) if want.numel() else 0.0
    diff = float((want - got).abs().max()) if want.numel() else 0.0
    if not torch.isfinite(got).all() or diff > FOLD_RTOL * max(scale, 1.0):
        return model, 0, (f"BatchNorm folding changed the representation by {diff:.3g} (largest value {scale:.3g}); "
                          "extracting with the model as it is")
    return folded, len(pairs), ""
