"""Fashion-MNIST from Debian's dataset-fashion-mnist idx files (real data; synthetic idx files only for errors)."""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iis_fast.data import FashionMNIST, fashion_mnist_loaders, load_fashion_mnist, stratified_subset
from iis_fast.data.fashion_mnist import DEFAULT_FASHION_MNIST_ROOT, FASHION_MNIST_ENV
from iis_fast.errors import DataFileError, IISInputError

ROOT = Path(os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_ROOT)
pytestmark = pytest.mark.skipif(
    not (ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST idx files not installed (apt-get install dataset-fashion-mnist)",
)


def _write_idx(path: Path, arr: np.ndarray, magic: int, compress: bool = True) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def test_splits_shapes_counts() -> None:
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = load_fashion_mnist(split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert labels.min() == 0 and labels.max() == 9
        assert np.bincount(labels).tolist() == [n // 10] * 10
        assert not images.flags.writeable  # cached arrays cannot be corrupted by a caller


def test_pixels_match_raw_file() -> None:
    with gzip.open(ROOT / "t10k-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    with gzip.open(ROOT / "t10k-labels-idx1-ubyte.gz", "rb") as f:
        raw_labels = f.read()
    images, labels = load_fashion_mnist("test")
    for i, (r, c) in [(0, (14, 14)), (1, (10, 3)), (9999, (20, 27))]:
        assert images[i, r, c] == raw[16 + i * 784 + r * 28 + c]
        assert labels[i] == raw_labels[8 + i]
    assert labels[0] == 9  # the first test image is an ankle boot


def test_dataset_identity_preprocessing_is_raw_pixels() -> None:
    images, labels = load_fashion_mnist("test")
    ds = FashionMNIST("test", image_size=28, mean=0.0, std=1.0, indices=[5, 0, 77])
    x, y = ds[0]
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    assert y == labels[5]
    expected = torch.from_numpy(images[5].astype(np.float32) / 255)
    for ch in range(3):
        assert torch.equal(x[ch], expected)
    assert ds[-1][1] == labels[77]
    assert ds.targets.tolist() == labels[[5, 0, 77]].tolist()


def test_dataset_resize_crop_normalise() -> None:
    images, _ = load_fashion_mnist("test")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ref = torch.from_numpy(images[3].astype(np.float32) / 255)[None, None]
    # upsampling
    ds = FashionMNIST("test", image_size=56, mean=mean, std=std, indices=[3])
    up = F.interpolate(ref, size=(56, 56), mode="bilinear", align_corners=False)[0, 0]
    for ch in range(3):
        torch.testing.assert_close(ds[0][0][ch], (up - mean[ch]) / std[ch])
    # centre crop without resizing: 24 / (24/28) = 28
    ds = FashionMNIST("test", image_size=24, mean=0, std=1, indices=[3], crop_pct=24 / 28)
    assert torch.equal(ds[0][0][0], ref[0, 0, 2:26, 2:26])
    # downsampling and a non-square size; batched fetch equals single fetch
    ds = FashionMNIST("test", image_size=(16, 20), mean=mean, std=std, indices=[3, 4, 5])
    batch = ds.__getitems__([0, 2])
    assert batch[0][0].shape == (3, 16, 20)
    torch.testing.assert_close(batch[1][0], ds[2][0])


def test_stratified_subset_balance_determinism() -> None:
    _, labels = load_fashion_mnist("train")
    a = stratified_subset(labels, 103, seed=0)
    assert a.dtype == np.int64 and a.shape == (103,) and np.all(np.diff(a) > 0)
    assert np.bincount(labels[a], minlength=10).tolist() == [11, 11, 11] + [10] * 7
    assert np.array_equal(a, stratified_subset(labels, 103, seed=0))
    assert not np.array_equal(a, stratified_subset(labels, 103, seed=1))
    # nested: a larger subset with the same seed contains the smaller one
    assert set(stratified_subset(labels, 50, seed=0)) <= set(stratified_subset(labels, 500, seed=0))
    # unbalanced classes: a short class gives all it has, the others fill up
    y = np.array([0] * 2 + [1] * 10 + [2] * 10)
    counts = np.bincount(y[stratified_subset(y, 12, seed=3)]).tolist()
    assert counts == [2, 5, 5]
    assert stratified_subset(y, 22, seed=3).tolist() == list(range(22))
    for bad in (0, 23, 2.5):
        with pytest.raises(IISInputError, match="n must be"):
            stratified_subset(y, bad, seed=0)


def test_fingerprint() -> None:
    base = FashionMNIST("test", image_size=32, mean=0.5, std=0.5, indices=[1, 2, 3])
    same = FashionMNIST("test", image_size=32, mean=(0.5, 0.5, 0.5), std=[0.5] * 3, indices=np.array([1, 2, 3]))
    assert isinstance(base.fingerprint, str) and base.fingerprint == same.fingerprint
    others = [
        FashionMNIST("test", image_size=48, mean=0.5, std=0.5, indices=[1, 2, 3]),
        FashionMNIST("test", image_size=32, mean=0.5, std=0.5, indices=[1, 2, 4]),
        FashionMNIST("test", image_size=32, mean=0.5, std=0.5, indices=[3, 2, 1]),
        FashionMNIST("test", image_size=32, mean=0.4, std=0.5, indices=[1, 2, 3]),
        FashionMNIST("test", image_size=32, mean=0.5, std=0.6, indices=[1, 2, 3]),
        FashionMNIST("train", image_size=32, mean=0.5, std=0.5, indices=[1, 2, 3]),
        FashionMNIST("test", image_size=32, mean=0.5, std=0.5, indices=[1, 2, 3], crop_pct=0.875),
    ]
    fps = {o.fingerprint for o in others}
    assert len(fps) == len(others) and base.fingerprint not in fps


def test_loaders() -> None:
    train, ev = fashion_mnist_loaders(40, 30, image_size=32, mean=0.5, std=0.5, batch_size=16, seed=0)
    assert train.dataset.split == "train" and ev.dataset.split == "test"
    assert len(train.dataset) == 40 and len(ev.dataset) == 30
    xb, yb = next(iter(train))
    assert xb.shape == (16, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    ys = torch.cat([y for _, y in ev]).numpy()
    assert np.bincount(ys, minlength=10).tolist() == [3] * 10
    # eval items are the TEST split's images at the stratified indices, in order
    test_images, _ = load_fashion_mnist("test")
    idx = ev.dataset.indices
    assert np.array_equal(idx, stratified_subset(load_fashion_mnist("test")[1], 30, seed=0))
    first = next(iter(ev))[0][0, 0]
    expected = F.interpolate(torch.from_numpy(test_images[idx[0]] / 255.0).float()[None, None], size=(32, 32),
                             mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(first, (expected - 0.5) / 0.5)
    # deterministic: the same call gives the same batches
    train2, _ = fashion_mnist_loaders(40, 30, image_size=32, mean=0.5, std=0.5, batch_size=16, seed=0)
    assert train2.dataset.fingerprint == train.dataset.fingerprint
    assert torch.equal(next(iter(train2))[0], xb)


def test_bad_arguments() -> None:
    with pytest.raises(IISInputError, match="split"):
        load_fashion_mnist("val")
    with pytest.raises(IISInputError, match="indices"):
        FashionMNIST("test", 28, 0, 1, indices=[10000])
    with pytest.raises(IISInputError, match="std"):
        FashionMNIST("test", 28, 0, 0, indices=[0])


@pytest.fixture()
def tiny_root(tmp_path) -> Path:
    """A valid 20-image idx set in a temporary directory (the loader must not care that it is small)."""
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)), 0x803)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10, 0x801)
    return tmp_path


def test_env_var_and_uncompressed(tiny_root, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tiny_root))
    images, labels = load_fashion_mnist("test")
    assert images.shape == (20, 28, 28) and labels.tolist() == list(range(10)) * 2
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_idx(raw / "t10k-images-idx3-ubyte", images, 0x803, compress=False)
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels, 0x801, compress=False)
    images2, _ = load_fashion_mnist("test", root=raw)
    assert np.array_equal(images, images2)


def test_missing_and_corrupt_files(tiny_root) -> None:
    with pytest.raises(DataFileError, match="train-images-idx3-ubyte.gz.*not found"):
        load_fashion_mnist("train", root=tiny_root)
    img = tiny_root / "t10k-images-idx3-ubyte.gz"
    lab = tiny_root / "t10k-labels-idx1-ubyte.gz"
    good_img, good_lab = img.read_bytes(), lab.read_bytes()
    # truncated gzip stream
    img.write_bytes(good_img[: len(good_img) // 2])
    with pytest.raises(DataFileError, match="t10k-images-idx3-ubyte.gz"):
        load_fashion_mnist("test", root=tiny_root)
    # not gzip at all
    img.write_bytes(b"definitely not a gzip file")
    with pytest.raises(DataFileError, match="t10k-images-idx3-ubyte.gz"):
        load_fashion_mnist("test", root=tiny_root)
    # labels file where the images file should be: wrong magic number
    img.write_bytes(good_lab)
    with pytest.raises(DataFileError, match="t10k-images-idx3-ubyte.gz.*magic number 0x00000801"):
        load_fashion_mnist("test", root=tiny_root)
    # valid gzip, header promises more data than there is
    _write_idx(img, np.zeros((20, 28, 28)), 0x803)
    with gzip.open(img, "rb") as f:
        payload = f.read()
    with gzip.open(img, "wb") as f:
        f.write(payload[:-100])
    with pytest.raises(DataFileError, match="truncated or corrupt"):
        load_fashion_mnist("test", root=tiny_root)
    # images and labels that disagree in count
    _write_idx(img, np.zeros((19, 28, 28)), 0x803)
    with pytest.raises(DataFileError, match="disagree"):
        load_fashion_mnist("test", root=tiny_root)
    # a label outside 0..9
    _write_idx(img, np.zeros((20, 28, 28)), 0x803)
    _write_idx(lab, np.full(20, 12), 0x801)
    with pytest.raises(DataFileError, match="label 12"):
        load_fashion_mnist("test", root=tiny_root)
    shutil.rmtree(tiny_root)
