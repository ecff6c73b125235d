"""Shared fixtures: real data (Debian's Fashion-MNIST) and real pretrained features, computed once per session."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny ops: a second thread gains nothing, and on a shared, loaded 2-core
    runner its barriers made such tests ~10x slower. Use with ``pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fmnist_train():
    from iis_fast.data.fashion_mnist import load_fashion_mnist
    return load_fashion_mnist("train")


@pytest.fixture(scope="session")
def pretrained_mobilenet():
    from iis_fast.models import create_model
    return create_model("mobilenetv2_100", pretrained=True)


@pytest.fixture(scope="session")
def real_features(fmnist_train, pretrained_mobilenet):
    """ImageNet MobileNetV2 features (D=1280) of 600 train + 300 eval Fashion-MNIST images at 64 px, and a
    200-concept prototype library from other train images. Returns (train_x, train_y, eval_x, eval_y, C)."""
    from iis_fast.data.sampling import stratified_subset
    from iis_fast.features import representation_fn
    from iis_fast.models import preprocessing_config
    images, labels = fmnist_train
    idx = stratified_subset(labels, 1100, seed=0)
    pre = preprocessing_config(pretrained_mobilenet)
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1)
    x = torch.from_numpy(images[idx]).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    x = (torch.nn.functional.interpolate(x, size=64, mode="bilinear", antialias=True) - mean) / std
    embed = representation_fn(pretrained_mobilenet)
    feats = torch.cat([embed(x[i:i + 100]) for i in range(0, len(x), 100)])
    y = torch.from_numpy(labels[idx])
    rng = np.random.default_rng(0)
    perm = torch.from_numpy(rng.permutation(len(idx)))
    tr, ev, co = perm[:600], perm[600:900], perm[900:1100]
    c = torch.nn.functional.normalize(feats[co], dim=1)
    return feats[tr], y[tr], feats[ev], y[ev], c
