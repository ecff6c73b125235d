"""BatchNorm folding for extraction (iis_fast/models/fold.py): the folded copy computes the same representation,
pairs come from the data flow, a fold that would change the numbers is refused, the caller's model is untouched."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("timm")

from iis_fast.errors import IISWarning  # noqa: E402
from iis_fast.features import _raw_fn, representation_fn  # noqa: E402
from iis_fast.models import create_model  # noqa: E402
from iis_fast.models.fold import fold_batchnorm  # noqa: E402


def _with_running_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so a wrong fold cannot go unseen."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _fold(model: nn.Module, x: torch.Tensor, layer: str | None = None):
    return fold_batchnorm(model, lambda m: _raw_fn(m, layer, False)(x))


@pytest.mark.parametrize("name, pairs", [("mobilenetv2_100", 52), ("efficientnet_lite0", 49), ("resnet18", 20)])
def test_folded_copy_computes_the_representation_and_leaves_the_model_alone(name, pairs):
    model = create_model(name, pretrained=True) if name == "mobilenetv2_100" else \
        _with_running_stats(create_model(name))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    x = torch.randn(6, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    folded, n, note = _fold(model, x[:3])
    assert n == pairs and note == "" and folded is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        want, got = _raw_fn(model, None, False)(x), _raw_fn(folded, None, False)(x)
    assert float((want - got).abs().max()) <= 1e-4 * float(want.abs().max())
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # through representation_fn, with the dtype and memory format of score()'s default
    plain = representation_fn(model, dtype="bfloat16", channels_last=True)(x)
    fast = representation_fn(model, dtype="bfloat16", channels_last=True, fold_bn=True)(x)
    assert torch.nn.functional.cosine_similarity(plain, fast).min() > 0.99


def test_torchvision_model_and_a_named_layer_fold_too():
    tv = pytest.importorskip("torchvision")
    model = _with_running_stats(tv.models.resnet18(num_classes=10))
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for layer in (None, "layer3"):
        folded, n, note = _fold(model, x, layer)
        assert n == 20 and note == ""             # the hooked layer's forward runs the whole model
        want = representation_fn(model, layer)(x)
        got = representation_fn(model, layer, fold_bn=True)(x)
        assert float((want - got).abs().max()) <= 1e-4 * float(want.abs().max())


class _SkipAroundBN(nn.Module):
    """conv's output goes into the BatchNorm *and* into a functional sum, which no module hook sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean((2, 3))


class _TwoReaders(nn.Module):
    """conv's output read by two modules: not a pair."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.other = nn.Conv2d(8, 8, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) * self.other(y)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean((2, 3))


def test_a_fold_that_would_change_the_numbers_is_refused_with_a_warning():
    model = _with_running_stats(_SkipAroundBN())
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    folded, n, note = _fold(model, x)
    assert folded is model and n == 0 and "BatchNorm folding changed the representation" in note
    with pytest.warns(IISWarning, match="extracting with the model as it is"):
        got = representation_fn(model, fold_bn=True)(x)
    assert torch.equal(got, representation_fn(model)(x))


def test_a_convolution_read_by_two_modules_is_not_folded():
    model = _with_running_stats(_TwoReaders())
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    folded, n, note = _fold(model, x)
    assert folded is model and n == 0 and note == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(representation_fn(model, fold_bn=True)(x), representation_fn(model)(x))
