"""Backbones: timm models by name, local pretrained weights from installed packages, checkpoint loading.

Public API:

- :func:`create_model` (``name, checkpoint=None, pretrained=False, **timm_kwargs``) -> ``nn.Module`` (eval mode)
- :func:`list_models`, :func:`register_pretrained` / :class:`PretrainedSource`
- :func:`load_checkpoint` / :func:`read_state_dict`
- :func:`preprocessing_config` -> ``{input_size, mean, std, crop_pct, interpolation}``
- :func:`torchvision_mobilenet_v2`: torchvision's MobileNetV2 with the packaged ImageNet weights
"""
from __future__ import annotations

from .checkpoint import LoadReport, load_checkpoint, read_state_dict
from .registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PretrainedSource,
    create_model,
    list_models,
    load_pretrained_state_dict,
    preprocessing_config,
    pretrained_source,
    pretrained_weight_path,
    register_pretrained,
    unregister_pretrained,
)
from . import efficientnet_lite as efficientnet_lite  # noqa: E402  (registers local weights)
from . import mobilenetv2 as mobilenetv2  # noqa: E402  (registers local weights)
from . import smallcnn as smallcnn  # noqa: E402  (registers iis_smallcnn in timm)
from .efficientnet_lite import efficientnet_lite_pytorch_to_timm
from .mobilenetv2 import mobilenet_v2_torchvision_state_dict, torchvision_mobilenet_v2, torchvision_mobilenetv2_to_timm

__all__ = [
    "create_model",
    "list_models",
    "register_pretrained",
    "unregister_pretrained",
    "PretrainedSource",
    "pretrained_source",
    "pretrained_weight_path",
    "load_pretrained_state_dict",
    "load_checkpoint",
    "read_state_dict",
    "LoadReport",
    "preprocessing_config",
    "torchvision_mobilenet_v2",
    "mobilenet_v2_torchvision_state_dict",
    "torchvision_mobilenetv2_to_timm",
    "efficientnet_lite_pytorch_to_timm",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
