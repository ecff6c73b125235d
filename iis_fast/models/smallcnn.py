"""A small Fashion-MNIST CNN, registered in timm as ``iis_smallcnn`` so sweeps can name it.

Importing this module registers the architecture: afterwards ``timm.create_model("iis_smallcnn")`` and
``iis_fast.models.create_model("iis_smallcnn", checkpoint=path)`` build it. It follows timm's conventions:
``forward_features`` returns the last feature map [B, C, H, W]; ``forward_head(x, pre_logits=True)`` returns the
globally average-pooled vector [B, C], the representation IIS measures (docs/spec.md §1.1).

Input: 3-channel 28x28 images (Fashion-MNIST grey replicated, as :class:`iis_fast.data.FashionMNIST` yields),
normalised with the Fashion-MNIST mean/std recorded in ``pretrained_cfg``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["SmallCNN", "iis_smallcnn", "SMALLCNN_NAME", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD"]

SMALLCNN_NAME = "iis_smallcnn"
FASHION_MNIST_MEAN: tuple[float, float, float] = (0.2860, 0.2860, 0.2860)
FASHION_MNIST_STD: tuple[float, float, float] = (0.3530, 0.3530, 0.3530)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """conv24-pool-conv48-pool-conv96-conv96 -> global average pool (96-d) -> Linear(num_classes).

    Args:
        num_classes: classifier outputs (0: no classifier, ``forward`` returns the pooled features).
        in_chans: input channels (3: grey replicated, the engine's convention for concept images).
        width: channels of the first stage; later stages use 2x and 4x.
        drop_rate: dropout before the classifier during training.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 24, drop_rate: float = 0.0,
                 **_: Any) -> None:
        super().__init__()
        w = int(width)
        self.num_classes = int(num_classes)
        self.num_features = 4 * w
        self.drop_rate = float(drop_rate)
        self.features = nn.Sequential(
            _block(in_chans, w), nn.MaxPool2d(2),              # 28 -> 14
            _block(w, 2 * w), nn.MaxPool2d(2),                 # 14 -> 7
            _block(2 * w, 4 * w), _block(4 * w, 4 * w),
        )
        self.fc = nn.Linear(self.num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.pretrained_cfg: dict[str, Any] = {
            "architecture": SMALLCNN_NAME, "input_size": (3, 28, 28), "mean": FASHION_MNIST_MEAN,
            "std": FASHION_MNIST_STD, "crop_pct": 1.0, "interpolation": "bilinear", "num_classes": self.num_classes,
            "classifier": "fc", "first_conv": "features.0.0",
        }
        self.default_cfg = self.pretrained_cfg

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map [B, 4*width, 7, 7] (for 28x28 inputs)."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, then (unless ``pre_logits``) dropout and the classifier."""
        x = x.mean(dim=(2, 3))
        if pre_logits:
            return x
        if self.drop_rate > 0:
            x = nn.functional.dropout(x, self.drop_rate, self.training)
        return self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh classifier for ``num_classes`` (timm's API; 0 removes it)."""
        self.num_classes = int(num_classes)
        self.fc = nn.Linear(self.num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.pretrained_cfg["num_classes"] = self.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def iis_smallcnn(pretrained: bool = False, **kwargs: Any) -> SmallCNN:
    """timm entry point: ``timm.create_model("iis_smallcnn", num_classes=10)``. No pretrained weights exist."""
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    if pretrained:
        raise ValueError("iis_smallcnn has no pretrained weights; load a checkpoint (iis-fast make-checkpoints)")
    return SmallCNN(**kwargs)


def _register() -> None:
    import timm
    from timm.models import register_model

    if not timm.is_model(SMALLCNN_NAME):
        register_model(iis_smallcnn)


_register()
