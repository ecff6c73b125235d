"""How-to-Probe (docs/spec.md §2): metrics against hand-computed values, losses, heads, B-cos completeness, batched vs
one-target-at-a-time attributions, and probe() + attribution_quality() on real Fashion-MNIST features."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from iis_fast.errors import IISInputError
from iis_fast.probing import (
    BcosProbe, LinearProbe, ProbedModel, attribute, attribution_quality, bce_loss, bce_targets, energy_pointing_game,
    entropy, gini, grid_pointing_game, make_grids, make_head, probe, smooth,
)
from iis_fast.probing.metrics import boxes_to_mask, gaussian_smooth, mean_filter5, positive



pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- metrics, hand-computed

def test_mean_filter_border_always_divides_by_25():
    s = mean_filter5(torch.ones(6, 6))
    assert s[0, 0].item() == pytest.approx(9 / 25)     # 3x3 of the window inside the map, still /25
    assert s[0, 2].item() == pytest.approx(15 / 25)    # 3 rows x 5 cols inside
    assert s[1, 1].item() == pytest.approx(16 / 25)
    assert s[2, 2].item() == pytest.approx(1.0)
    assert s[5, 5].item() == pytest.approx(9 / 25)


def _map() -> torch.Tensor:
    """4x4 map: +25 at (0,0), -50 at (3,3). Smoothed: +1 on rows/cols 0..2, -2 on rows/cols 1..3.
    P = max(S, 0) is 1 on exactly (0,0), (0,1), (0,2), (1,0), (2,0)."""
    a = torch.zeros(4, 4)
    a[0, 0], a[3, 3] = 25.0, -50.0
    return a


def test_smooth_then_clip():
    p = positive(_map())
    expect = torch.zeros(4, 4)
    for i, j in [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0)]:
        expect[i, j] = 1.0
    torch.testing.assert_close(p, expect)
    # clipping first would keep the +25 pixel's full spread (9 pixels of 1): not what the metric does
    assert int((mean_filter5(_map().clamp_min(0)) > 0).sum()) == 9
    a = torch.zeros(5, 5)
    a[2, 2], a[2, 3] = 2.0, -1.0
    assert positive(a)[2, 2].item() == pytest.approx(1 / 25)   # (2 - 1) / 25, not 2 / 25


def test_gridpg_hand_computed():
    maps = _map().expand(4, 4, 4)
    got = grid_pointing_game(maps, torch.arange(4), grid_size=2)
    torch.testing.assert_close(got, torch.tensor([3 / 5, 1 / 5, 1 / 5, 0.0]))
    # without the negative pixel: 9 smoothed pixels of 1, 4 / 2 / 2 / 1 of them per cell
    a = torch.zeros(4, 4)
    a[0, 0] = 25.0
    torch.testing.assert_close(grid_pointing_game(a.expand(4, 4, 4), torch.arange(4), 2),
                               torch.tensor([4 / 9, 2 / 9, 2 / 9, 1 / 9]))
    assert grid_pointing_game(torch.zeros(1, 4, 4), torch.tensor([0]), 2).item() == 0.0  # +1e-12: no NaN


def test_epg_entropy_gini_hand_computed():
    mask = boxes_to_mask([(0, 0, 2, 1)], 4, 4)             # x in [0, 2), y in [0, 1): (0,0), (0,1)
    assert int(mask.sum()) == 2 and mask[0, 0] and mask[0, 1]
    assert energy_pointing_game(_map(), mask).item() == pytest.approx(2 / 5)
    assert entropy(_map()).item() == pytest.approx(math.log2(5), abs=1e-6)   # uniform over 5 pixels
    assert entropy(torch.zeros(4, 4)).item() == 0.0
    assert gini(_map()).item() == pytest.approx(15 / 16)   # max(A, 0): one 25 among 16 pixels, unsmoothed
    assert gini(torch.tensor([[1.0, 2.0], [3.0, 4.0]])).item() == pytest.approx(0.25)
    assert gini(torch.ones(3, 3)).item() == pytest.approx(0.0, abs=1e-7)
    assert gini(torch.zeros(3, 3)).item() == 0.0


def test_ixg_uses_gaussian_129_reflect():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    a = torch.randn(140, 140)
    ref = tvf.gaussian_blur(a[None], kernel_size=[129, 129], sigma=[32.25, 32.25])[0]
    torch.testing.assert_close(smooth(a, "ixg"), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(smooth(a, "gradcam"), mean_filter5(a))
    small = gaussian_smooth(torch.full((2, 9, 9), 3.0))    # pad 64 > 9: repeated reflection, still constant
    torch.testing.assert_close(small, torch.full((2, 9, 9), 3.0))


def test_smoothing_follows_the_official_scripts():
    """GridPG/EPG: Gaussian for ixg and ig, mean filter otherwise; entropy: the mean filter for every method."""
    from iis_fast.probing import smoothing_for
    assert [smoothing_for(m, "gridpg") for m in ("ixg", "ig", "gradcam", "bcos")] == ["gaussian"] * 2 + ["mean5"] * 2
    assert [smoothing_for(m, "epg") for m in ("ixg", "ig", "gradcam")] == ["gaussian", "gaussian", "mean5"]
    assert {smoothing_for(m, "entropy") for m in ("ixg", "ig", "gradcam", "bcos")} == {"mean5"}
    torch.manual_seed(0)
    a = torch.randn(2, 70, 70)
    cells = torch.tensor([0, 3])
    gauss, mean5 = gaussian_smooth(a).clamp_min(0), mean_filter5(a).clamp_min(0)
    for method, p in (("ixg", gauss), ("ig", gauss), ("gradcam", mean5)):
        want = torch.stack([p[0, :35, :35].sum(), p[1, 35:, 35:].sum()]) / (p.sum((1, 2)) + 1e-12)
        torch.testing.assert_close(grid_pointing_game(a, cells, 2, method), want)
    torch.testing.assert_close(grid_pointing_game(a, cells, 2, "ixg", smoothing="mean5"),
                               grid_pointing_game(a, cells, 2, "gradcam"))
    q = mean5.flatten(1) / mean5.flatten(1).sum(1, keepdim=True)
    want = -(q * torch.log2(torch.where(q > 0, q, torch.ones_like(q)))).sum(1)
    torch.testing.assert_close(entropy(a), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(entropy(a, smoothing="gaussian"), want)
    with pytest.raises(IISInputError, match="smoothing"):
        entropy(a, smoothing="box")


# ---------------------------------------------------------------- losses and heads

def test_bce_targets_and_loss():
    t = bce_targets(torch.tensor([2, 0]), 4)
    torch.testing.assert_close(t, torch.tensor([[0.25, 0.25, 1.0, 0.25], [1.0, 0.25, 0.25, 0.25]]))
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 0.0, -0.5, 3.0]])
    p = torch.sigmoid(logits)
    manual = -(t * p.log() + (1 - t) * (1 - p).log()).mean()   # averaged over batch x classes
    assert bce_loss(logits, torch.tensor([2, 0])).item() == pytest.approx(manual.item(), rel=1e-6)


def test_linear_head_per_position_equals_pooling_first():
    torch.manual_seed(0)
    head = LinearProbe(16, 5)
    f = torch.randn(3, 16, 4, 3)
    pooled = nn.functional.linear(f.mean((2, 3)), head.fc.weight.flatten(1), head.fc.bias)
    torch.testing.assert_close(head(f), pooled, atol=1e-6, rtol=1e-5)
    mlp = make_head("mlp2", 16, 5, hidden=8).eval()
    assert not torch.allclose(mlp(f), mlp(f.mean((2, 3), keepdim=True)), atol=1e-4)  # MLPs need the map


def test_bce_multi_hot_targets_and_official_off_values():
    from iis_fast.probing.losses import official_bce_off
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(bce_targets(y, 4), torch.tensor([[1.0, 0.25, 1.0, 0.25], [0.25, 0.25, 0.25, 1.0]]))
    torch.testing.assert_close(bce_targets(y, 4, off=0.0), y)
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 0.0, -0.5, 3.0]])
    p = torch.sigmoid(logits)
    manual = -(y * p.log() + (1 - y) * (1 - p).log()).mean()          # plain multi-hot BCE
    assert bce_loss(logits, y, off=0.0).item() == pytest.approx(manual.item(), rel=1e-6)
    # official: 1/C for single-label probing and for B-cos heads; 0 for linear / MLP heads on multi-label data
    assert official_bce_off("linear", 20, False) == official_bce_off("bcos2", 20, True) == pytest.approx(0.05)
    assert official_bce_off("mlp2_nobias", 20, True) == official_bce_off("linear", 20, True) == 0.0
    with pytest.raises(IISInputError, match="ce"):
        from iis_fast.probing import ce_loss
        ce_loss(logits, y)


@pytest.mark.parametrize("name, layers", [("linear_nobias", 1), ("mlp2_nobias", 2), ("mlp3_nobias", 3)])
def test_bias_free_heads(name, layers):
    """No conv biases (BatchNorm keeps its beta, as the official with_bias=False heads), logit bias -ln(C-1):
    an all-zero feature map gives logits -ln(C-1), i.e. sigmoid probability 1/C for every class."""
    torch.manual_seed(0)
    head = make_head(name, 8, 5, hidden=6).eval()
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == layers and all(m.bias is None for m in convs)
    assert head.logit_bias == pytest.approx(-math.log(4))
    if layers == 1:
        torch.testing.assert_close(head(torch.zeros(2, 8, 3, 3)), torch.full((2, 5), -math.log(4)))
        torch.testing.assert_close(torch.sigmoid(head(torch.zeros(1, 8, 1, 1))), torch.full((1, 5), 0.2))
    f = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(head(f), head.spatial_logits(f).mean((2, 3)) - math.log(4))
    assert make_head(name, 8, 5, hidden=6, logit_bias=0.0).logit_bias == 0.0
    assert make_head(name.removesuffix("_nobias"), 8, 5, hidden=6).logit_bias == 0.0    # biased heads: none
    with pytest.raises(IISInputError, match="B-cos"):
        make_head("bcos2_nobias", 8, 5)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_bcos_completeness(layers):
    torch.manual_seed(layers)
    head = BcosProbe(12, 6, layers=layers, hidden=10)
    assert head.logit_bias == pytest.approx(-math.log(5))
    f = torch.randn(5, 12, 3, 3).abs()
    head.train()
    head(f)
    head.eval()
    logits = head(f)
    contrib = head.contributions(f)                          # [B, C, h, w], from one forward
    torch.testing.assert_close(contrib.sum((2, 3)), logits - head.logit_bias, atol=1e-5, rtol=1e-5)
    # explanation mode: input x dynamic-linear weights (the gradient with detached scales), summed over channels
    fg = f.clone().requires_grad_(True)
    with head.explanation_mode():
        out = head(fg)
    for c in range(6):
        g, = torch.autograd.grad(out[1, c], fg, retain_graph=True)
        torch.testing.assert_close((g * f).sum(1)[1], contrib[1, c], atol=1e-6, rtol=1e-4)
        assert (g * f).sum().item() == pytest.approx((logits[1, c] - head.logit_bias).item(), rel=1e-4, abs=1e-6)
    # outside explanation mode the gradient differs (dynamic scales are not constant)
    g_plain, = torch.autograd.grad(head(fg)[1, 0], fg)
    assert not torch.allclose(g_plain * f, g * f)


# ---------------------------------------------------------------- batched == one target at a time

class TinyNet(nn.Module):
    """A 2-stage CNN with a timm-style forward_features (stride 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("head_name", ["linear", "mlp2", "bcos2"])
def test_batched_attributions_equal_one_target_at_a_time(head_name):
    torch.manual_seed(1)
    bb = TinyNet().eval()
    head = make_head(head_name, 16, 5, hidden=12)
    head.train()
    head(torch.randn(8, 16, 4, 4).abs())                     # non-trivial BN statistics
    model = ProbedModel(bb, head).eval()
    x = torch.randn(2, 3, 16, 16)
    targets = torch.tensor([[0, 3, 4], [2, 1, 0]])
    methods = ["ixg", "gradcam", "ig"] + (["bcos"] if head_name.startswith("bcos") else [])
    for m in methods:
        a = attribute(model, x, targets, m, ig_steps=5)
        b = attribute(model, x, targets, m, ig_steps=5, batched=False)
        assert a.shape == (2, 3, 16, 16)
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=f"{head_name} {m}")
    assert all(p.requires_grad for p in model.parameters())  # frozen only inside attribute()
    if not head_name.startswith("bcos"):
        with pytest.raises(IISInputError, match="B-cos head"):
            attribute(model, x, targets, "bcos")


def test_ig_completeness_on_linear_model():
    """For a model linear in its input, IG with baseline 0 sums to logit(x) - logit(0), for every target."""
    torch.manual_seed(0)

    class Lin(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 1, bias=False)

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    model = ProbedModel(Lin(), LinearProbe(6, 4))
    x = torch.randn(2, 3, 8, 8)
    a = attribute(model, x, torch.tensor([[0, 1, 2, 3]] * 2), "ig", ig_steps=3)
    with torch.no_grad():
        want = model(x) - model(torch.zeros_like(x))
    torch.testing.assert_close(a.sum((2, 3)), want, atol=1e-5, rtol=1e-4)
    from iis_fast.probing import IntegratedGradients
    chunked = IntegratedGradients(5, internal_batch_size=2)(model, x, torch.tensor([[0, 3]] * 2))   # 3 forwards
    torch.testing.assert_close(chunked, attribute(model, x, torch.tensor([[0, 3]] * 2), "ig", ig_steps=5))


def test_ig_nodes_integrate_polynomials():
    """Gauss-Legendre with n nodes on [0, 1] is exact for degree < 2n (captum's nodes: 0.5 (x + 1), 0.5 w)."""
    from iis_fast.probing.attribution import ig_nodes
    a, w = ig_nodes(50)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12) and 0 < float(a.min()) and float(a.max()) < 1
    a, w = ig_nodes(4)
    for k in range(8):
        assert float((w * a ** k).sum()) == pytest.approx(1 / (k + 1), rel=1e-12)
    a, w = ig_nodes(4, "riemann_middle")
    torch.testing.assert_close(a, torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64))
    torch.testing.assert_close(w, torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(IISInputError, match="ig_method"):
        ig_nodes(4, "trapezoid")


def test_gradcam_layers_and_relu_by_hand():
    """Official default: the last conv (TinyNet: body.3, before its ReLU), no clipping; 'features': the final map.
    Both against Σ_d mean(∂y/∂A_d) A_d computed by hand, then bilinear upsampling."""
    from iis_fast.probing.attribution import last_conv
    torch.manual_seed(2)
    bb = TinyNet().eval()
    model = ProbedModel(bb, make_head("linear", 16, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    assert last_conv(bb, x) is bb.body[3]
    pre = bb.body[:4](x).detach().requires_grad_(True)        # conv output, before the ReLU
    g, = torch.autograd.grad(model.head(torch.relu(pre))[0, 2], pre)
    cam = (g.mean((2, 3), keepdim=True) * pre.detach()).sum(1, keepdim=True)
    up = lambda c: nn.functional.interpolate(c, size=(16, 16), mode="bilinear", align_corners=False)[0, 0]  # noqa: E731
    torch.testing.assert_close(attribute(model, x, [2], "gradcam")[0, 0], up(cam), atol=1e-6, rtol=1e-5)
    assert (cam < 0).any()                                     # the official form keeps negative values
    torch.testing.assert_close(attribute(model, x, [2], "gradcam", gradcam_relu=True)[0, 0], up(cam.clamp_min(0)),
                               atol=1e-6, rtol=1e-5)
    f = bb.forward_features(x).detach().requires_grad_(True)
    g, = torch.autograd.grad(model.head(f)[0, 2], f)
    classic = (g.mean((2, 3), keepdim=True) * f.detach()).sum(1, keepdim=True).clamp_min(0)
    got = attribute(model, x, [2], "gradcam", gradcam_layer="features", gradcam_relu=True)[0, 0]
    torch.testing.assert_close(got, up(classic), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attribute(model, x, [2], "gradcam", gradcam_layer="body.3"),
                               attribute(model, x, [2], "gradcam"))
    with pytest.raises(IISInputError, match="gradcam_layer"):
        attribute(model, x, [2], "gradcam", gradcam_layer="layer4.2.conv3")


def test_attribute_restores_modes_of_a_timm_classifier():
    """attribute() on a bare timm classifier (wrapped as backbone + its own head) leaves every module's train/eval
    mode and requires_grad as it found them."""
    timm = pytest.importorskip("timm")
    m = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    m.eval()
    m.layer1.train()
    before = {n: mod.training for n, mod in m.named_modules()}
    attribute(m, torch.randn(1, 3, 32, 32), [1], "ixg")
    assert {n: mod.training for n, mod in m.named_modules()} == before
    assert all(p.requires_grad for p in m.parameters())


# ---------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def fmnist_64(pretrained_mobilenet):
    from iis_fast.data.fashion_mnist import fashion_mnist_loaders
    from iis_fast.models import preprocessing_config
    pre = preprocessing_config(pretrained_mobilenet)
    return fashion_mnist_loaders(400, 300, 64, pre["mean"], pre["std"], batch_size=100, seed=0)


@pytest.fixture(scope="module")
def probed(pretrained_mobilenet, fmnist_64):
    torch.manual_seed(0)
    train, ev = fmnist_64
    return probe(pretrained_mobilenet, train, ev, heads=("linear", "mlp2", "mlp3", "bcos1", "bcos2", "bcos3"),
                 losses=("ce", "bce"), epochs=10, lr=1e-3, batch_size=50, hidden=128, seed=0)


def test_probe_real_fashion_mnist_above_chance(probed):
    assert probed.feature_shape == (1280, 2, 2)              # MobileNetV2's last stage at 64 px
    assert set(probed.accuracies) == {f"{h}/{l}" for h in ("linear", "mlp2", "mlp3", "bcos1", "bcos2", "bcos3")
                                      for l in ("ce", "bce")}
    for k, acc in probed.accuracies.items():
        assert acc > 0.4, f"{k}: eval accuracy {acc:.3f} not above chance (0.1)"
    for k, hist in probed.history.items():
        assert hist[-1] < hist[0], f"{k}: training loss did not decrease {hist}"


def test_attribution_quality_real_grids(probed, fmnist_64):
    _, ev = fmnist_64
    x = torch.cat([b[0] for b in ev])
    y = torch.cat([b[1] for b in ev])
    lin, bc = probed.model_with_head("linear/ce"), probed.model_with_head("bcos2/bce")
    grids = make_grids(x, y, n_grids=2, grid_size=3, seed=0, models=[lin, bc], threshold=0.8)
    assert grids.images.shape == (2, 3, 192, 192)
    for row in grids.cell_labels:
        assert len(set(row.tolist())) == 9                   # distinct classes
    again = make_grids(x, y, n_grids=2, grid_size=3, seed=0, models=[lin, bc], threshold=0.8)
    assert torch.equal(again.source_indices, grids.source_indices)   # seeded
    q = attribution_quality(bc, x, y, methods=("gradcam", "bcos"), grids=grids)
    for m in ("gradcam", "bcos"):
        s = q.scores[m]
        assert 0.0 <= s["gridpg"] <= 1.0 and s["entropy"] > 0 and 0 <= s["gini"] <= 1
        assert q.per_map[m]["gridpg"].shape == (2, 9)
    assert q.scores["bcos"]["gridpg"] > 1 / 9                # better than uniform over 9 cells
    with pytest.raises(IISInputError, match="B-cos head"):
        attribution_quality(lin, x, y, methods=("bcos",), grids=grids)


def test_multilabel_probing_learns_and_reports_map(pretrained_mobilenet):
    """Multi-hot labels: BCE only, official off values per head, mAP as scikit-learn's. Real features: MobileNetV2
    maps of pairs of Fashion-MNIST test images of different classes side by side, labelled with both classes."""
    from iis_fast.data.fashion_mnist import FashionMNIST
    from iis_fast.models import preprocessing_config
    from iis_fast.probing.spatial import SpatialMaps, extract_spatial
    from iis_fast.probing.train import mean_average_precision, probe_maps
    pre = preprocessing_config(pretrained_mobilenet)
    ds = FashionMNIST("test", 48, pre["mean"], pre["std"], indices=range(640))
    x = torch.stack([ds[i][0] for i in range(640)])
    y = torch.as_tensor(ds.targets)
    a, b = torch.arange(0, 640, 2), torch.arange(1, 640, 2)
    keep = y[a] != y[b]
    a, b = a[keep], b[keep]
    pairs = torch.cat([x[a], x[b]], dim=3)                                # [N, 3, 48, 96]
    hot = torch.nn.functional.one_hot(y[a], 10) + torch.nn.functional.one_hot(y[b], 10)
    loader = [(pairs[i:i + 100], hot[i:i + 100]) for i in range(0, len(pairs), 100)]
    maps = extract_spatial(pretrained_mobilenet, loader)
    assert maps.labels.dtype == torch.float32 and maps.labels.shape == (len(pairs), 10)
    n = len(maps) * 2 // 3
    tr, ev = SpatialMaps(maps.maps[:n], maps.labels[:n]), SpatialMaps(maps.maps[n:], maps.labels[n:])
    torch.manual_seed(0)
    r = probe_maps(tr, ev, heads="linear,mlp2_nobias,bcos1", losses="bce", epochs=20, hidden=64, batch_size=50,
                   lr={"linear": 3e-2, "default": 1e-3})
    assert r.metric == "mAP" and r.num_classes == 10
    assert r.config["bce_off"] == {"linear/bce": 0.0, "mlp2_nobias/bce": 0.0, "bcos1/bce": 0.1}
    for k, v in r.accuracies.items():                                    # chance: ~0.2 (2 of 10 classes present)
        assert v > 0.55, f"{k}: eval mAP {v:.3f}"
    with torch.no_grad():
        scores = r.heads["linear/bce"](ev.maps)
    assert r.accuracies["linear/bce"] == pytest.approx(mean_average_precision(scores, ev.labels))
    # average precision by hand: scores 0.9 (pos), 0.8 (neg), 0.7 (pos) -> (1/1 + 2/3) / 2
    assert mean_average_precision(torch.tensor([[0.9], [0.8], [0.7]]), torch.tensor([[1.0], [0.0], [1.0]])) == \
        pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(IISInputError, match="multi-label"):
        probe_maps(tr, ev, heads="linear", losses="ce,bce", epochs=1)
    with pytest.raises(IISInputError, match="0 or 1"):
        SpatialMaps(tr.maps, tr.labels * 2)


# ---------------------------------------------------------------- API surface

def test_box_mode_epg_and_errors():
    torch.manual_seed(0)
    model = ProbedModel(TinyNet().eval(), make_head("linear", 16, 3))
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2])
    q = attribution_quality(model, x, y, methods=("ixg", "gradcam"), metrics=("epg", "entropy", "gini"),
                            boxes=[[(0, 0, 8, 8)], [(4, 4, 16, 16)], [(0, 0, 16, 16)]])
    assert q.per_map["gradcam"]["epg"].shape == (3, 1)
    for m in ("ixg", "gradcam"):       # the box is the whole image: 1, or 0 when no attribution is positive
        v = q.per_map[m]["epg"][2].item()
        assert v == pytest.approx(1.0) or v == 0.0
    # multi-label images: {class: boxes} explains every class against its own boxes (official VOC/COCO EPG)
    multi = [{0: [(0, 0, 8, 8)], 2: [(8, 8, 16, 16)]}, {1: [(4, 4, 16, 16)]}, [(0, 0, 16, 8)]]
    qm = attribution_quality(model, x, y, methods=("gradcam",), metrics=("epg", "entropy"), boxes=multi)
    epg = qm.per_map["gradcam"]["epg"]
    assert epg.shape == (3, 2) and torch.isnan(epg[1:, 1]).all() and not torch.isnan(epg[0]).any()
    for i, (c, bx) in enumerate([(0, [(0, 0, 8, 8)]), (2, [(8, 8, 16, 16)])]):     # image 0, one class at a time
        one = attribution_quality(model, x[:1], torch.tensor([c]), methods=("gradcam",), metrics=("epg",),
                                  boxes=[bx])
        assert epg[0, i].item() == pytest.approx(one.per_map["gradcam"]["epg"][0, 0].item(), abs=1e-6)
    assert qm.scores["gradcam"]["epg"] == pytest.approx(float(epg[~torch.isnan(epg)].mean()))
    with pytest.raises(IISInputError, match="class: boxes"):
        attribution_quality(model, x, torch.eye(3), metrics=("epg",), boxes=[[(0, 0, 8, 8)]] * 3)
    with pytest.raises(IISInputError, match="epg"):
        attribution_quality(model, x, y, metrics=("epg",))
    with pytest.raises(IISInputError, match="unknown method"):
        attribute(model, x, y, "lrp")
    with pytest.raises(IISInputError, match="heads"):
        make_head("mlp1", 16, 3)


def test_cli_register_and_lr_mapping():
    import argparse

    from iis_fast.probing.cli import register
    from iis_fast.probing.spatial import SpatialMaps
    from iis_fast.probing.train import probe_maps
    parser = argparse.ArgumentParser(prog="iis-fast")
    sub = parser.add_subparsers()
    p = register(sub)
    assert "GridPG" in p.description
    args = parser.parse_args(["probe", "--heads", "linear,bcos2", "--losses", "bce", "--quick"])
    assert args.heads == ["linear", "bcos2"] and args.losses == ["bce"] and args.quick
    assert (args.gradcam_layer, args.gradcam_relu, args.ig_method, args.explanation_mode) == \
        ("last_conv", False, "gausslegendre", False)                  # the official forms by default
    args = parser.parse_args(["probe", "--gradcam-layer", "features", "--gradcam-relu", "--ig-method",
                              "riemann_middle", "--explanation-mode"])
    assert (args.gradcam_layer, args.gradcam_relu, args.ig_method, args.explanation_mode) == \
        ("features", True, "riemann_middle", True)
    maps = SpatialMaps(torch.randn(20, 4, 2, 2), torch.arange(20) % 2)
    r = probe_maps(maps, maps, heads="linear,mlp2", losses="ce", epochs=1, hidden=4, batch_size=8,
                   lr={"linear": 1e-2, "default": 1e-4})
    assert r.config["lr"] == {"linear": 1e-2, "mlp2": 1e-4}
    with pytest.raises(IISInputError, match="lr"):
        probe_maps(maps, maps, heads="linear", losses="ce", lr=-1.0)
