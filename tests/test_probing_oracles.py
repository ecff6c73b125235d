"""How to Probe against independent implementations: attribution maps against captum and pytorch-grad-cam on
the real pretrained ImageNet MobileNetV2 (and timm ResNets for the Grad-CAM layer rule), and the metrics
against the official evaluation scripts' formulas, transcribed here line by line.

captum and grad-cam are test oracles (the ``dev`` extra); the module is skipped where they are not installed.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from iis_fast.probing import attribute, energy_pointing_game, entropy, grid_pointing_game
from iis_fast.probing.attribution import last_conv
from iis_fast.probing.metrics import boxes_to_mask

captum_attr = pytest.importorskip("captum.attr")
pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fmnist_images(pretrained_mobilenet):
    """Two Fashion-MNIST test images at 64 px under the MobileNetV2's preprocessing, and their top-2 ImageNet
    classes as targets ``[2, 2]``."""
    from iis_fast.data.fashion_mnist import FashionMNIST
    from iis_fast.models import preprocessing_config
    pre = preprocessing_config(pretrained_mobilenet)
    ds = FashionMNIST("test", 64, pre["mean"], pre["std"], indices=[0, 1])
    x = torch.stack([ds[0][0], ds[1][0]])
    with torch.no_grad():
        targets = pretrained_mobilenet.eval()(x).topk(2, dim=1).indices
    return x, targets


def _close(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal up to float32 rounding relative to the map's scale."""
    theirs = theirs.detach()
    scale = float(theirs.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, theirs, rtol=rel, atol=rel * scale)


# Gradients of a ReLU network jump where a unit crosses its kink, and the batched paths run channels_last inputs
# (oneDNN kernels), whose float rounding differs from contiguous inputs' and can move a unit across a kink
# (measured here: one ReLU6 unit, 0.5 % of the map's L2 norm). So each path is compared with captum run on the
# same memory layout: exact agreement, not a loose tolerance.

def test_ixg_equals_captum(pretrained_mobilenet, fmnist_images):
    x, targets = fmnist_images
    ixg = captum_attr.InputXGradient(pretrained_mobilenet)
    ours = attribute(pretrained_mobilenet, x, targets, "ixg")
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for t in range(2):                                   # one forward of the batch, one backward per column
        _close(ours[:, t], ixg.attribute(x_cl, target=targets[:, t].tolist()).sum(1))
    one = attribute(pretrained_mobilenet, x, targets, "ixg", batched=False)
    for b in range(2):
        for t in range(2):
            _close(one[b, t], ixg.attribute(x[b:b + 1], target=int(targets[b, t])).sum(1)[0])


def test_ig_equals_captum_50_gauss_legendre(pretrained_mobilenet, fmnist_images):
    """The official IG: captum's defaults (50 steps, Gauss-Legendre, zero baseline) are ours too, and so is the
    official EPG script's internal_batch_size=16 (the nodes run in forwards of 16)."""
    x, targets = fmnist_images
    ig = captum_attr.IntegratedGradients(pretrained_mobilenet)
    ours = attribute(pretrained_mobilenet, x[:1], targets[:1], "ig")
    x_cl = x[:1].contiguous(memory_format=torch.channels_last)
    for t in range(2):
        ref = ig.attribute(x_cl, target=int(targets[0, t]), internal_batch_size=16)  # n_steps=50, gausslegendre
        _close(ours[0, t], ref.sum(1)[0])
    one = attribute(pretrained_mobilenet, x[:1], targets[:1, :1], "ig", ig_steps=8, ig_method="riemann_middle",
                    batched=False)
    ref = ig.attribute(x[:1], target=int(targets[0, 0]), n_steps=8, method="riemann_middle",
                       internal_batch_size=1).sum(1)[0]
    _close(one[0, 0], ref)


def test_gradcam_official_equals_captum_layer_gradcam(pretrained_mobilenet, fmnist_images):
    """Official Grad-CAM: LayerGradCam on the last convolution (MobileNetV2: conv_head, before its BN + ReLU6),
    relu_attributions=False, bilinear upsampling; batched and one-target-at-a-time paths alike."""
    x, targets = fmnist_images
    m = pretrained_mobilenet.eval()
    assert last_conv(m, x) is m.conv_head
    ours = attribute(m, x, targets, "gradcam")
    ours_ref = attribute(m, x, targets, "gradcam", batched=False)
    gc = captum_attr.LayerGradCam(m, m.conv_head)
    for b in range(2):
        for t in range(2):
            cam = gc.attribute(x[b:b + 1], target=int(targets[b, t]), relu_attributions=False)
            ref = captum_attr.LayerAttribution.interpolate(cam, (64, 64), interpolate_mode="bilinear")[0, 0]
            _close(ours[b, t], ref)
            _close(ours_ref[b, t], ref)


def test_gradcam_classic_equals_pytorch_grad_cam(pretrained_mobilenet, fmnist_images):
    """Classic Grad-CAM (layer="features", relu=True) on the final map is pytorch-grad-cam's GradCAM on the module
    that produces it (bn2: BN + ReLU6), which also min-max normalises each map."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    x, targets = fmnist_images
    m = pretrained_mobilenet.eval()
    ours = attribute(m, x, targets, "gradcam", gradcam_layer="features", gradcam_relu=True)
    with GradCAM(m, target_layers=[m.bn2]) as cam:
        for t in range(2):
            ref = cam(x, targets=[ClassifierOutputTarget(int(c)) for c in targets[:, t]])      # [B, H, W] in [0, 1]
            o = ours[:, t]
            lo = o.flatten(1).min(1).values.view(-1, 1, 1)
            norm = (o - lo) / (o.flatten(1).max(1).values.view(-1, 1, 1) - lo)
            torch.testing.assert_close(norm, torch.from_numpy(ref), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name, block_conv", [("resnet26", "conv3"), ("test_resnet", "conv2")])
def test_gradcam_last_conv_on_resnets_is_the_official_layer(name, block_conv):
    """On ResNets the rule picks the last block's last main-branch conv (bottleneck conv3; basic-block conv2, not
    the shortcut's conv, which runs after it), and the maps equal captum's LayerGradCam on that module."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=5, zero_init_last=False).eval()
    x = torch.randn(1, 3, 64, 64)
    layer = getattr(m.layer4[-1], block_conv)
    assert last_conv(m, x) is layer
    ours = attribute(m, x, torch.tensor([[0, 3]]), "gradcam")
    gc = captum_attr.LayerGradCam(m, layer)
    for t, c in enumerate((0, 3)):
        ref = captum_attr.LayerAttribution.interpolate(gc.attribute(x, target=c), (64, 64),
                                                       interpolate_mode="bilinear")[0, 0]
        _close(ours[0, t], ref)
    assert (ours < 0).any()                          # no ReLU: negative evidence stays in the map
    named = attribute(m, x, torch.tensor([[0, 3]]), "gradcam", gradcam_layer=f"layer4.{len(m.layer4) - 1}.{block_conv}")
    torch.testing.assert_close(named, ours)


# ---------------------------------------------------------------- metrics: the official formulas, transcribed

def _official_smooth(a: np.ndarray, k: int | None) -> np.ndarray:
    from torchvision.transforms import GaussianBlur
    t = torch.from_numpy(a)
    if k is None:
        t = torch.nn.functional.avg_pool2d(t.unsqueeze(0), 5, padding=2, stride=1)[0]
    else:
        t = GaussianBlur(k, sigma=k / 4)(t.unsqueeze(0))[0]
    s = t.numpy()
    s[s < 0] = 0
    return s


def _official_pg(a: np.ndarray, index: int, map_size: int, k: int | None = None) -> float:
    """eval_gridpg_compactness_complexity.py: get_pg_val."""
    s = _official_smooth(a.copy(), k)
    i, j = index // map_size, index % map_size
    f = a.shape[0] // map_size
    return float(np.sum(s[i * f:(i + 1) * f, j * f:(j + 1) * f]) / (np.sum(s) + 1e-12))


def _official_entropy(a: np.ndarray) -> float:
    """get_shannon_entropy, called without k for every method."""
    s = _official_smooth(a.copy(), None)
    s = s / (np.sum(s) + 1e-10)
    return float(-np.sum(s * np.log2(s + 1e-10)))


def _official_epg(a: np.ndarray, boxes: list, k: int | None = None) -> float:
    """eval_voc_epg.py: get_epg_val, without its final round(., 2)."""
    s = _official_smooth(a.copy(), k)
    mask = np.zeros(a.shape)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = 1.0
    return float(np.sum(s * mask) / (np.sum(s) + 1e-12))


def test_metrics_equal_the_official_formulas(pretrained_mobilenet, fmnist_images):
    """GridPG: Gaussian(129) for IxG (and IG), mean filter otherwise; entropy: the mean filter for every method;
    EPG: Gaussian for IxG and IG, mean filter for Grad-CAM. On real maps of a 2x2 grid of test images."""
    from iis_fast.probing.grids import tile
    x, _ = fmnist_images
    m = pretrained_mobilenet.eval()
    grid = tile(torch.cat([x, x.flip(0)]), 2)[None]                       # [1, 3, 128, 128]
    with torch.no_grad():
        tg = m(grid).topk(4, dim=1).indices
    for method, k in (("ixg", 129), ("ig", 129), ("gradcam", None)):
        a = attribute(m, grid, tg, method, ig_steps=4)[0]                  # [4, 128, 128]
        got = grid_pointing_game(a, torch.arange(4), 2, method)
        want = torch.tensor([_official_pg(a[c].numpy(), c, 2, k) for c in range(4)])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(entropy(a), torch.tensor([_official_entropy(a[c].numpy()) for c in range(4)]),
                                   atol=1e-5, rtol=1e-5)
        boxes = [(10, 20, 70, 90), (64, 0, 128, 40)]
        epg = energy_pointing_game(a, boxes_to_mask(boxes, 128, 128).expand(4, -1, -1), method)
        torch.testing.assert_close(epg, torch.tensor([_official_epg(a[c].numpy(), boxes, k) for c in range(4)]),
                                   atol=1e-5, rtol=1e-4)
