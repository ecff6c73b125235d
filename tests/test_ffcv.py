"""FFCV data path on real data (Fashion-MNIST from the local idx files), both ways, against the torch DataLoader path.

Costs to know: `import ffcv` takes ~10 s (numba), and every new FFCV loader compiles its pipeline on its first
epoch (~3-5 s), so the files and loaders are written/built once per module and shared.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")
# numba's dispatcher finaliser raises a harmless KeyError at GC for FFCV's compiled imdecode; not our code.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

from iis_fast.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from iis_fast.data.beton import validate_beton  # noqa: E402
from iis_fast.data.ffcv_writer import (  # noqa: E402
    write_arrays,
    write_dataset,
    write_fashion_mnist,
    write_image_folder,
)
from iis_fast.data.ffcv_loader import FFCVImageLoader, ffcv_loader, normalize_lut  # noqa: E402
from iis_fast.data.loaders import resolve_loader  # noqa: E402
from iis_fast.data.torch_loader import torch_loader  # noqa: E402
from iis_fast.errors import DataFileError, IISInputError  # noqa: E402

N = 200          # Fashion-MNIST test images used
S = 32           # model input side
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# FFCV loaders are kept alive for the whole process: when one is garbage-collected, numba's finaliser for FFCV's
# imdecode raises (and prints) a KeyError, and on CPython 3.11.7 a GC landing inside ast.parse (pytest plugins
# parse at session end) then fails with "SystemError: AST constructor recursion depth mismatch".
_ALIVE: list = []


def keep(loader):
    _ALIVE.append(loader)
    return loader


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ffcv")


@pytest.fixture(scope="module")
def fm() -> tuple[np.ndarray, np.ndarray]:
    """N Fashion-MNIST test images upscaled to S x S (PIL bilinear), uint8 [N, S, S], and labels."""
    from PIL import Image
    images, labels = load_fashion_mnist("test")
    up = np.stack([np.asarray(Image.fromarray(images[i]).resize((S, S), Image.BILINEAR)) for i in range(N)])
    return up, labels[:N].copy()


@pytest.fixture(scope="module")
def raw_beton(work: Path) -> Path:
    p = work / "fm_raw.beton"
    info = write_fashion_mnist("test", p, indices=np.arange(N), image_size=S, write_mode="raw", progress=False)
    assert info.num_samples == N and info.n_raw == N and info.num_classes == 10
    return p


@pytest.fixture(scope="module")
def jpeg_beton(work: Path) -> Path:
    p = work / "fm_jpeg.beton"
    info = write_fashion_mnist("test", p, indices=np.arange(N), image_size=S, write_mode="jpeg",
                               jpeg_quality=90, progress=False)
    assert info.n_jpeg == N
    return p


@pytest.fixture(scope="module")
def raw_loader(raw_beton: Path) -> FFCVImageLoader:
    return keep(ffcv_loader(raw_beton, S, MEAN, STD, batch_size=64, num_workers=2))


@pytest.fixture(scope="module")
def jpeg_folder(work: Path) -> Path:
    """60 real JPEG files, 40x40 RGB (Fashion-MNIST train images upscaled and tinted), 3 classes in subfolders."""
    from PIL import Image
    images, labels = load_fashion_mnist("train")
    root = work / "folder"
    for c, name in enumerate(("bag", "coat", "sandal")):
        (root / name).mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(labels == (8, 4, 5)[c])[:20]):
            g = np.asarray(Image.fromarray(images[i]).resize((40, 40), Image.BILINEAR))
            rgb = np.stack([g, (g * 0.7).astype(np.uint8), 255 - g], axis=-1)
            Image.fromarray(rgb).save(root / name / f"{k:03d}.jpg", quality=92)
    return root


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=0).eval()


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x, y) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


def pil_dataset(images: np.ndarray, labels: np.ndarray) -> list:
    from PIL import Image
    return [(Image.fromarray(images[i]), int(labels[i])) for i in range(len(labels))]


# ------------------------------------------------------------------------------------------- both ways, exact


def test_raw_beton_equals_dataloader_exactly(raw_loader, fm, model):
    images, labels = fm
    assert len(raw_loader) == 4 and raw_loader.num_samples == N            # 64+64+64+8: nothing dropped
    batches = list(raw_loader)
    assert [len(y) for _, y in batches] == [64, 64, 64, 8]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert x.shape == (N, 3, S, S) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)
    # batches are clones: a second epoch does not overwrite what the first yielded
    first = batches[0][0].clone()
    for _ in raw_loader:
        pass
    assert torch.equal(batches[0][0], first)
    xt, yt = collect(torch_loader(pil_dataset(images, labels), S, MEAN, STD, batch_size=64))
    assert torch.equal(y, torch.from_numpy(labels)) and torch.equal(yt, y)
    assert torch.equal(x, xt)                                               # bit-identical pixels
    fx, ft = features(model, x.contiguous()), features(model, xt.contiguous())
    assert fx.shape == (N, 512) and torch.equal(fx, ft)                     # bit-identical features
    assert torch.allclose(features(model, x), ft, rtol=1e-4, atol=1e-5)     # channels-last kernels: ~equal


def test_lut_matches_torchvision_normalize():
    from torchvision import transforms as T
    v = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, 16, 16).permute(1, 2, 0).numpy()
    ref = T.Normalize(MEAN, STD)(T.ToTensor()(v))                             # [3, 16, 16]
    lut = torch.from_numpy(normalize_lut(MEAN, STD))                          # [256, 3]
    assert torch.equal(ref.permute(1, 2, 0).reshape(256, 3), lut)


def test_arrays_and_fashion_mnist_writers_write_the_same_file(work, fm, raw_beton):
    images, labels = fm
    a = work / "arr_hw.beton"
    write_arrays(images, labels, a, progress=False, page_size=1 << 21)                # grey [N, H, W]
    b = work / "arr_chw.beton"
    rgb = np.repeat(images[:, None], 3, axis=1)                                       # [N, 3, H, W]
    write_arrays(rgb, labels, b, progress=False, page_size=1 << 21, num_workers=1)
    assert a.read_bytes() == raw_beton.read_bytes() == b.read_bytes()
    info = validate_beton(a, num_classes=10)
    assert (info.num_samples, info.max_height, info.max_width, info.n_raw) == (N, S, S, N)


# ----------------------------------------------------------------------------------- both ways, tolerance


def test_jpeg_beton_close_to_dataloader(jpeg_beton, fm, model):
    images, labels = fm
    x, y = collect(keep(ffcv_loader(jpeg_beton, S, MEAN, STD, batch_size=100, num_workers=1)))
    xt, _ = collect(torch_loader(pil_dataset(images, labels), S, MEAN, STD, batch_size=100))
    assert torch.equal(y, torch.from_numpy(labels))
    err = ((x - xt) * torch.tensor(STD).view(1, 3, 1, 1)).abs()             # in [0, 1] pixel units
    assert 0 < err.mean() < 0.02 and err.max() < 0.5
    cos = torch.nn.functional.cosine_similarity(features(model, x), features(model, xt))
    assert cos.min() > 0.98, cos.min()


def test_image_folder_crop_semantics_and_resize(jpeg_folder, work, model):
    """Stored 40x40; crop_pct 0.8 -> the centred 32x32 in both paths (exact); crop_pct 1 -> 40->32 resize (close)."""
    info = write_image_folder(jpeg_folder, work / "folder_raw.beton", write_mode="raw", progress=False,
                              page_size=1 << 21)
    assert info.classes == ("bag", "coat", "sandal") and info.num_samples == 60 and info.num_classes == 3
    loader = keep(ffcv_loader(work / "folder_raw.beton", S, MEAN, STD, batch_size=60, num_workers=2, crop_pct=0.8))
    x, y = collect(loader)
    xt, yt = collect(torch_loader(jpeg_folder, S, MEAN, STD, batch_size=60, crop_pct=0.8))
    assert torch.equal(y, yt) and torch.equal(y, torch.arange(3).repeat_interleave(20))
    assert torch.equal(x, xt)
    # JPEG storage re-encodes; the whole image is resized 40 -> 32 (INTER_AREA vs PIL bilinear): close, not equal
    write_image_folder(jpeg_folder, work / "folder_jpg.beton", write_mode="jpeg", jpeg_quality=95,
                       progress=False, page_size=1 << 21)
    xj, yj = collect(keep(ffcv_loader(work / "folder_jpg.beton", S, MEAN, STD, batch_size=60, num_workers=2)))
    xr, _ = collect(torch_loader(jpeg_folder, S, MEAN, STD, batch_size=60, crop_pct=1.0))
    assert torch.equal(yj, y)
    err = ((xj - xr) * torch.tensor(STD).view(1, 3, 1, 1)).abs()
    assert err.mean() < 0.03
    cos = torch.nn.functional.cosine_similarity(features(model, xj), features(model, xr))
    assert cos.min() > 0.97, cos.min()


def test_fingerprint_and_len(raw_loader, raw_beton):
    fp = raw_loader.fingerprint
    assert isinstance(fp, str) and len(fp) == 32
    assert raw_loader._fingerprint() == fp
    import dataclasses
    other = dataclasses.replace(raw_loader.info, mtime_ns=raw_loader.info.mtime_ns + 1)
    saved = raw_loader.info
    try:
        raw_loader.info = other
        assert raw_loader._fingerprint() != fp                                # a rewritten file is new data
    finally:
        raw_loader.info = saved
    raw_loader.crop_pct = 0.9
    try:
        assert raw_loader._fingerprint() != fp
    finally:
        raw_loader.crop_pct = 1.0


def test_resolve_loader(raw_beton, raw_loader, jpeg_folder):
    kw = dict(image_size=(S, S), mean=MEAN, std=STD, batch_size=64, device="cpu")
    got = keep(resolve_loader(str(raw_beton), **kw))
    assert isinstance(got, FFCVImageLoader) and got.fingerprint == raw_loader.fingerprint and len(got) == 4
    assert resolve_loader(raw_loader, **kw) is raw_loader
    assert resolve_loader(raw_loader.ffcv, **kw) is raw_loader.ffcv                    # a raw FFCV Loader
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 3, S, S), torch.zeros(4)))
    assert resolve_loader(dl, **kw) is dl
    assert isinstance(resolve_loader(jpeg_folder, **kw), torch.utils.data.DataLoader)
    with pytest.raises(IISInputError, match="iterable"):
        resolve_loader(42, **kw)
    with pytest.raises(DataFileError, match="nope.beton"):
        resolve_loader(raw_beton.parent / "nope.beton", **kw)


def test_workers_never_above_cores(raw_beton):
    with pytest.warns(UserWarning, match="usable cores"):
        lo = keep(ffcv_loader(raw_beton, S, MEAN, STD, num_workers=10_000))
    assert lo.num_workers <= (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        keep(ffcv_loader(raw_beton, S, MEAN, STD, num_workers=2))
        assert torch.get_num_threads() == 1      # FFCV's Loader sets torch's threads too; ffcv_loader undoes it
    finally:
        torch.set_num_threads(prev)
    with pytest.raises(IISInputError, match="square"):
        ffcv_loader(raw_beton, (S, S + 1), MEAN, STD)


# --------------------------------------------------------------------------------------------- bad inputs


def _raises_data_error(path: Path, match: str, **kw) -> None:
    t = time.perf_counter()
    with pytest.raises(DataFileError) as e:
        ffcv_loader(path, S, MEAN, STD, **kw)          # raised at construction: before any numba compilation
    assert str(path) in str(e.value) and e.match(match), str(e.value)
    assert time.perf_counter() - t < 20


def test_missing_file(work):
    _raises_data_error(work / "missing.beton", "no such file")


def test_truncated_files(work, raw_beton, jpeg_beton):
    data = raw_beton.read_bytes()
    for name, cut in (("head.beton", 10), ("half.beton", len(data) // 2), ("tail.beton", len(data) - 7)):
        (work / name).write_bytes(data[:cut])
        _raises_data_error(work / name, "truncated")
    # a JPEG record overwritten with zeros (a corrupt data region, same size)
    info = validate_beton(jpeg_beton)
    j = bytearray(jpeg_beton.read_bytes())
    from ffcv.reader import Reader
    ptr = int(Reader(str(jpeg_beton)).metadata["f0"]["data_ptr"][5])
    j[ptr:ptr + 16] = bytes(16)
    (work / "zeroed.beton").write_bytes(bytes(j))
    _raises_data_error(work / "zeroed.beton", "sample 5.*JPEG")
    assert info.num_samples == N


def test_garbage_bytes(work):
    rng = np.random.default_rng(0)
    (work / "garbage.beton").write_bytes(rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    _raises_data_error(work / "garbage.beton", "not an FFCV|corrupt")
    (work / "empty.beton").write_bytes(b"")
    _raises_data_error(work / "empty.beton", "truncated")
    _raises_data_error(work, "not a regular file")


def _ffcv_write(path: Path, fields: dict, samples: list) -> None:
    """A file written by FFCV's own DatasetWriter (not ours), to feed the validator what other tools produce."""
    from ffcv.writer import DatasetWriter
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(samples)


def test_missing_label_field_and_labels_out_of_range(work, fm, raw_beton):
    from ffcv.fields import IntField, RGBImageField
    img = np.repeat(fm[0][:8, :, :, None], 3, axis=3)
    _ffcv_write(work / "nolabel.beton", {"image": RGBImageField()}, [(img[i],) for i in range(8)])
    _raises_data_error(work / "nolabel.beton", "no integer label field")
    _ffcv_write(work / "neg.beton", {"image": RGBImageField(), "label": IntField()},
                [(img[i], -1 if i == 3 else 0) for i in range(8)])
    _raises_data_error(work / "neg.beton", "negative label -1 \\(sample 3\\)")
    _raises_data_error(raw_beton, "label 9 .*num_classes=5", num_classes=5)
    # at write time: a label out of range, naming the output file and the sample
    with pytest.raises(DataFileError, match="out12.beton.*array image 2 has label 12"):
        write_arrays(fm[0][:4], np.array([0, 1, 12, 3]), work / "out12.beton", num_classes=10, progress=False)
    assert not (work / "out12.beton").exists()


def test_mixed_channel_counts_at_write_time(work, fm, jpeg_folder):
    grey = list(fm[0][:6])
    mixed = grey[:3] + [np.repeat(g[:, :, None], 3, axis=2) for g in grey[3:]]
    with pytest.raises(DataFileError, match="mixed.beton.*mixed channel counts"):
        write_arrays(mixed, np.zeros(6, dtype=np.int64), work / "mixed.beton", progress=False)
    # a dataset finds out only while writing: the write aborts and leaves nothing
    with pytest.raises(DataFileError, match="mixed_ds.beton.*dataset item 3 has 3 channel"):
        write_dataset([(m, 0) for m in mixed], work / "mixed_ds.beton", num_workers=1, progress=False)
    assert not list(work.glob("mixed*"))
    # an image folder: the offending file is named, before anything is written
    from PIL import Image
    odd = jpeg_folder.parent / "folder_mixed"
    import shutil
    shutil.copytree(jpeg_folder, odd)
    Image.fromarray(grey[0]).save(odd / "coat" / "zz_grey.png")
    with pytest.raises(DataFileError, match="zz_grey.png.*1 channel"):
        write_image_folder(odd, work / "mixed_folder.beton", progress=False)
    info = write_image_folder(odd, work / "mixed_folder.beton", mixed_channels="convert", progress=False,
                              page_size=1 << 21)
    assert info.num_samples == 61


# ---------------------------------------------------------------------------------------- atomic writes


class _Exploding:
    def __init__(self, images: np.ndarray, at: int, delay: float = 0.0) -> None:
        self.images, self.at, self.delay = images, at, delay

    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, i: int):
        if self.delay:
            time.sleep(self.delay)
        if i == self.at:
            raise RuntimeError(f"boom at {i}")
        return self.images[i % len(self.images)], i % 10


def test_write_that_raises_leaves_nothing(work, fm):
    out = work / "boom" / "x.beton"
    with pytest.raises(RuntimeError, match="boom at 150"):
        write_dataset(_Exploding(fm[0], 150), out, num_workers=2, progress=False)
    assert not out.exists() and list(out.parent.iterdir()) == []


def _slow_write(path: str, images: np.ndarray) -> None:
    write_dataset(_Exploding(images, -1, delay=0.002), path, num_workers=1, progress=False, page_size=1 << 21)


def test_killed_write_leaves_no_file_at_the_path(work, fm):
    out = work / "killed" / "x.beton"
    out.parent.mkdir()
    proc = mp.get_context("fork").Process(target=_slow_write, args=(str(out), fm[0]))
    proc.start()
    deadline = time.time() + 30
    while not list(out.parent.glob("x.beton.tmp-*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert not out.exists()
    tmp = list(out.parent.glob("x.beton.tmp-*"))
    assert len(tmp) == 1
    with pytest.raises(DataFileError, match="incomplete|truncated"):       # and the leftover never validates
        validate_beton(tmp[0])
