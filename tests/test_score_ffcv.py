"""score() reads FFCV data: a .beton path, or an FFCV loader, gives the IIS of the same data as a DataLoader."""
import gc

import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("ffcv")

from iis_fast import DataFileError, score  # noqa: E402
from iis_fast.data.fashion_mnist import FashionMNIST, load_fashion_mnist  # noqa: E402
from iis_fast.data.sampling import stratified_subset  # noqa: E402
from iis_fast.data.ffcv_writer import write_fashion_mnist  # noqa: E402
from iis_fast.data.ffcv_loader import ffcv_loader  # noqa: E402
from iis_fast.models import preprocessing_config  # noqa: E402

SIZE = 28   # native Fashion-MNIST size: both paths see bit-identical pixels
OPTS = dict(num_concepts=20, images_per_class=2, epochs=2, batch_size=64, sparsities=(0.0, 0.9), progress=False,
            image_size=SIZE)


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    d = tmp_path_factory.mktemp("beton")
    _, ytr = load_fashion_mnist("train")
    _, yte = load_fashion_mnist("test")
    tr_idx, te_idx = stratified_subset(ytr, 200, seed=0), stratified_subset(yte, 100, seed=0)
    write_fashion_mnist("train", d / "train.beton", indices=tr_idx, image_size=SIZE, progress=False)
    write_fashion_mnist("test", d / "test.beton", indices=te_idx, image_size=SIZE, progress=False)
    return d, tr_idx, te_idx


def test_score_from_beton_paths_equals_dataloader(betons, pretrained_mobilenet, tmp_path):
    d, tr_idx, te_idx = betons
    pre = preprocessing_config(pretrained_mobilenet)
    r_ffcv = score(pretrained_mobilenet, str(d / "train.beton"), eval_loader=str(d / "test.beton"),
                   cache_dir=str(tmp_path / "a"), **OPTS)
    # the same images through the torch path (stored at the output size: raw pixels, identical normalisation)
    mk = lambda split, idx: DataLoader(FashionMNIST(split, image_size=SIZE, mean=pre["mean"], std=pre["std"],
                                                    indices=idx), batch_size=64)
    r_torch = score(pretrained_mobilenet, mk("train", tr_idx), eval_loader=mk("test", te_idx),
                    cache_dir=str(tmp_path / "b"), **OPTS)
    assert r_ffcv.n_train == 200 and r_ffcv.n_eval == 100 and r_ffcv.eval_split == "eval_loader"
    # raw storage at the output size, torchvision-exact normalisation: identical features, identical result
    assert r_ffcv.acc_std == r_torch.acc_std and r_ffcv.acc == r_torch.acc and r_ffcv.iis == r_torch.iis


def test_score_from_an_ffcv_loader_uses_its_fingerprint(betons, pretrained_mobilenet, tmp_path):
    d, _, _ = betons
    pre = preprocessing_config(pretrained_mobilenet)
    loader = ffcv_loader(d / "train.beton", SIZE, pre["mean"], pre["std"], batch_size=50)
    r1 = score(pretrained_mobilenet, loader, cache_dir=str(tmp_path), **OPTS)
    r2 = score(pretrained_mobilenet, loader, cache_dir=str(tmp_path), **OPTS)
    del loader
    gc.collect()        # release FFCV's numba objects here, not inside a later ast.parse (see score.py)
    assert r1.eval_split.startswith("holdout") and r1.n_train + r1.n_eval == 200
    assert r2.timings["extract_train"] == 0.0 and r2.iis == r1.iis


def test_score_names_a_corrupt_beton_before_any_work(tmp_path, pretrained_mobilenet):
    bad = tmp_path / "broken.beton"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(DataFileError, match="broken.beton"):
        score(pretrained_mobilenet, str(bad), **OPTS)


def test_beton_loaders_are_built_once_per_process_and_file_state(betons, pretrained_mobilenet, tmp_path):
    """A .beton path gives the process's one loader for (file, pipeline): a sweep worker pays FFCV's pipeline
    compilation once per split, not per checkpoint; a rewritten file gets a new loader."""
    from iis_fast.data.loaders import _HELD, resolve_loader
    d, _, _ = betons
    pre = preprocessing_config(pretrained_mobilenet)
    kw = dict(image_size=SIZE, mean=pre["mean"], std=pre["std"], batch_size=64, device="cpu")
    a = resolve_loader(str(d / "test.beton"), **kw)
    assert resolve_loader(d / "test.beton", **kw) is a
    first = [y for _, y in a]
    again = [y for _, y in a]                       # re-iterated: every sample once more, in order
    assert torch.equal(torch.cat(first), torch.cat(again)) and sum(len(y) for y in first) == 100
    assert resolve_loader(str(d / "test.beton"), **{**kw, "batch_size": 32}) is not a
    copy = tmp_path / "copy.beton"
    copy.write_bytes((d / "test.beton").read_bytes())
    b = resolve_loader(copy, **kw)
    copy.write_bytes((d / "test.beton").read_bytes())       # same bytes, new mtime: a new file state
    import os
    os.utime(copy, ns=(0, 10**9))
    assert resolve_loader(copy, **kw) is not b
    assert len(_HELD) >= 3


def test_a_process_that_scored_a_beton_exits_without_finalizer_noise(betons, tmp_path):
    import subprocess
    import sys
    d, _, _ = betons
    code = f"""
import iis_fast
from iis_fast.models import create_model
m = create_model("iis_smallcnn")
r = iis_fast.score(m, {str(d / 'train.beton')!r}, eval_loader={str(d / 'test.beton')!r}, cache_dir={str(tmp_path)!r},
                   num_concepts=20, images_per_class=2, epochs=1, sparsities=(0.0,), lrs=(0.1,), progress=False)
print("IIS", r.iis)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "IIS" in r.stdout
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr, r.stderr
