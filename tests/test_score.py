"""score_features / score: results, the ARR/IIS arithmetic, caching, representations and bad input."""
import json

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from iis_fast import IISInputError
from iis_fast.features import representation_fn
from iis_fast.result import IISResult, iis_from_curve
from iis_fast.data.sampling import stratified_split
from iis_fast.score import score, score_features

FAST = dict(epochs=3, batch_size=64, progress=False)


def toy(n=400, d=12, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, k, generator=g)
    x = torch.randn(n, d, generator=g)
    return x, (x @ w).argmax(1)


def test_result_fields_are_consistent_and_round_trip(real_features):
    tx, ty, ex, ey, c = real_features
    r = score_features(tx, ty, ex, ey, c, **FAST)
    assert r.num_concepts == 200 and r.feature_dim == 1280 and r.num_classes == 10
    assert r.acc_std == max(r.acc_std_per_lr)
    assert r.acc == [max(row) for row in r.acc_per_lr]
    assert r.arr == pytest.approx([a / r.acc_std for a in r.acc])
    assert r.iis == pytest.approx(iis_from_curve(r.sparsities, r.arr))
    assert 0.2 < r.iis < 1.2 and r.acc_std > 0.6
    back = IISResult.from_json(r.to_json())
    assert back == r and json.loads(r.to_json())["config"]["lrs"] == [1e-3, 1e-2, 1e-1]
    assert "IIS=" in repr(r) and "acc_std=" in repr(r)
    assert set(r.timings) >= {"train"} and r.versions["torch"] == torch.__version__


def test_reference_and_torch_backends_give_the_same_iis(real_features):
    """The stated tolerance between the oracle and the fast path: |dIIS| <= 0.005 (observed: equal)."""
    tx, ty, ex, ey, c = real_features
    a = score_features(tx, ty, ex, ey, c, backend="reference", sparsities=(0.0, 0.5, 0.98), **FAST)
    b = score_features(tx, ty, ex, ey, c, backend="torch", sparsities=(0.0, 0.5, 0.98), **FAST)
    assert abs(a.iis - b.iis) <= 0.005 and abs(a.acc_std - b.acc_std) <= 1 / len(ey) + 1e-9
    assert (a.backend, b.backend) == ("reference", "torch")


def test_same_seed_same_result_and_holdout_selection(real_features):
    tx, ty, ex, ey, c = real_features
    a = score_features(tx, ty, ex, ey, c, seed=1, **FAST)
    b = score_features(tx, ty, ex, ey, c, seed=1, **FAST)
    assert a.iis == b.iis and a.acc == b.acc
    h = score_features(tx, ty, ex, ey, c, selection="holdout", **FAST)
    assert h.selection_split.startswith("holdout")
    assert h.n_train == len(stratified_split(ty.numpy(), 0.1, 0)[0]) and 530 <= h.n_train <= 550


def test_stratified_split_is_balanced_deterministic_and_protects():
    y = np.repeat(np.arange(4), 25)
    keep, held = stratified_split(y, 0.2, seed=3, protect=np.array([0, 1, 2]))
    assert np.bincount(y[held]).tolist() == [5, 5, 5, 5]
    assert not set(held) & {0, 1, 2} and len(keep) + len(held) == 100
    keep2, held2 = stratified_split(y, 0.2, seed=3, protect=np.array([0, 1, 2]))
    assert (held == held2).all()


@pytest.mark.parametrize("mutate, msg", [
    (lambda a: a.update(train_y=a["train_y"].float() + 0.5), "integer"),
    (lambda a: a.update(train_y=torch.full_like(a["train_y"], 7)), "label 7"),
    (lambda a: a.update(train_y=-a["train_y"] - 1), "negative"),
    (lambda a: a["train_x"].__setitem__((5, 2), float("nan")), "NaN"),
    (lambda a: a.update(train_x=a["train_x"][:0], train_y=a["train_y"][:0]), "empty"),
    (lambda a: a.update(concepts=torch.randn(8, 5)), "width 5"),
    (lambda a: a.update(train_x=a["train_x"][:, None]), "shape"),
    (lambda a: a.update(train_y=a["train_y"][:-1]), "one label per sample"),
    (lambda a: a.update(eval_y=torch.zeros_like(a["eval_y"])), "no evaluation samples"),
    (lambda a: a.update(train_y=torch.zeros_like(a["train_y"]), eval_y=torch.zeros_like(a["eval_y"])), "2 classes"),
])
def test_bad_input_is_named(mutate, msg):
    x, y = toy()
    args = dict(train_x=x.clone(), train_y=y.clone(), eval_x=x[:90].clone(), eval_y=y[:90].clone(),
                concepts=torch.randn(8, 12))
    mutate(args)
    with pytest.raises(IISInputError, match=msg):
        score_features(num_classes=3 if msg == "label 7" else None, **args, **FAST)


@pytest.mark.parametrize("opts, msg", [
    (dict(sparsities=(0.0, 1.0)), r"outside \[0, 1\)"), (dict(sparsities=(-0.1,)), "outside"),
    (dict(lrs=()), "learning rate"), (dict(backend="gpu9"), "backend"), (dict(bogus=1), "unknown option"),
])
def test_bad_options_are_named(opts, msg):
    x, y = toy()
    with pytest.raises(IISInputError, match=msg):
        score_features(x, y, x, y, torch.randn(8, 12), **{**FAST, **opts})


def test_representation_of_timm_torchvision_and_named_layer(pretrained_mobilenet):
    x = torch.randn(2, 3, 64, 64)
    timm_feat = representation_fn(pretrained_mobilenet)(x)
    assert timm_feat.shape == (2, 1280)
    # the representation is the classifier's input: the classifier applied to it gives the model's logits
    torch.testing.assert_close(pretrained_mobilenet.get_classifier()(timm_feat), pretrained_mobilenet(x))
    tv = torchvision.models.resnet18(num_classes=7).eval()
    f = representation_fn(tv)(x)
    torch.testing.assert_close(tv.fc(f), tv(x))
    pooled = representation_fn(tv, layer="layer3")(x)
    assert pooled.shape == (2, 256)
    with pytest.raises(IISInputError, match="not a submodule"):
        representation_fn(tv, layer="layer9")


@pytest.fixture(scope="module")
def fm_loaders(fmnist_train, pretrained_mobilenet):
    from iis_fast.data.sampling import stratified_subset
    from iis_fast.models import preprocessing_config
    images, labels = fmnist_train
    idx = stratified_subset(labels, 300, seed=1)
    pre = preprocessing_config(pretrained_mobilenet)
    x = torch.from_numpy(images[idx]).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    x = torch.nn.functional.interpolate(x, size=48, mode="bilinear", antialias=True)
    x = (x - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(1, 3, 1, 1)
    return DataLoader(TensorDataset(x.contiguous(), torch.from_numpy(labels[idx])), batch_size=100)


class CountingNet(torch.nn.Module):
    """A real pretrained backbone that counts its forward calls."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0
        self.fc = net.get_classifier()

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_score_end_to_end_caches_features_and_concepts(fm_loaders, pretrained_mobilenet, tmp_path):
    net = CountingNet(pretrained_mobilenet)
    opts = dict(num_concepts=40, images_per_class=2, epochs=3, batch_size=32, sparsities=(0.0, 0.9), cache_dir=str(tmp_path),
                progress=False, image_size=48)
    r1 = score(net, fm_loaders, **opts)
    calls = net.calls
    assert calls > 0 and r1.eval_split.startswith("holdout") and r1.n_train + r1.n_eval == 300
    assert r1.acc_std > 0.3
    r2 = score(net, fm_loaders, **opts)
    assert net.calls == calls, "a second score of the same weights and data must not run the backbone"
    assert r2.iis == r1.iis and r2.timings["extract_train"] == 0.0
    # a changed weight is a different checkpoint: the cache misses
    with torch.no_grad():
        next(net.parameters()).add_(0.01)
    score(net, fm_loaders, **opts)
    assert net.calls > calls


def test_score_with_eval_loader_and_cluster_library(fm_loaders, pretrained_mobilenet, tmp_path):
    r = score(pretrained_mobilenet, fm_loaders, eval_loader=fm_loaders, library="cluster", num_concepts=30,
              images_per_class=2, epochs=2, sparsities=(0.0, 0.5), cache_dir=str(tmp_path), progress=False,
              image_size=48)
    assert r.eval_split == "eval_loader" and r.library == "cluster" and r.n_eval == 300


def test_score_rejects_empty_loader_and_bad_batches(pretrained_mobilenet, tmp_path):
    empty = DataLoader(TensorDataset(torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(IISInputError, match="no samples"):
        score(pretrained_mobilenet, empty, cache_dir=str(tmp_path), progress=False)
    with pytest.raises(IISInputError, match=r"\(images, labels\)"):
        score(pretrained_mobilenet, [torch.zeros(2, 3, 8, 8)], cache_dir=str(tmp_path), progress=False)
    with pytest.raises(IISInputError, match="model must be"):
        score(42, empty, progress=False)
