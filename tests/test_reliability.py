"""Issue 16: never a wrong number in silence. Each case below once returned a wrong number, crashed with a foreign
error, or silently changed what was computed; each test pins the named error, the warning or the recomputation.

Real data throughout: MobileNetV2 features of Fashion-MNIST (conftest's ``real_features``), the pretrained
backbone on Fashion-MNIST images, real cache entries, real sweep databases and real CLI processes.
"""
from __future__ import annotations

import json
import os
import re
import stat
import time
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from iis_fast import IISInputError
from iis_fast.errors import IISWarning
from iis_fast.features import FeatureCache
from iis_fast.result import CHANCE_MARGIN, IISResult
from iis_fast.score import score, score_features

TINY = dict(epochs=3, batch_size=64, sparsities=(0.0, 0.5, 0.9), lrs=(0.01, 0.1), progress=False)


def _feats(real_features):
    tx, ty, ex, ey, c = real_features
    return dict(train_x=tx.clone(), train_y=ty.clone(), eval_x=ex.clone(), eval_y=ey.clone(), concepts=c[:40])


# ---------------------------------------------------------------------------------- degenerate training options
@pytest.mark.parametrize("opts, msg", [
    (dict(lrs=(float("inf"),)), "positive and finite"),
    (dict(lrs=(0.01, float("nan"))), "positive and finite"),
    (dict(lr_decay=0.0), r"lr_decay=0.0: must be in \(0, 1\]"),
    (dict(lr_decay=-0.5), "lr_decay=-0.5"),
    (dict(lr_decay=float("nan")), "lr_decay=nan"),
    (dict(lr_decay=1.5), "lr_decay=1.5"),
    (dict(epochs=2.5), "epochs=2.5: must be a whole number"),
    (dict(batch_size=31.5), "batch_size=31.5: must be a whole number"),
    (dict(epochs=True), "epochs=True"),
    (dict(device="gpu"), "device='gpu' is not a torch device"),
])
def test_degenerate_training_options_are_refused_by_name(real_features, opts, msg):
    with pytest.raises(IISInputError, match=msg):
        score_features(**_feats(real_features), **{**TINY, **opts})


def test_whole_float_options_are_read_as_integers(real_features):
    r = score_features(**_feats(real_features), **{**TINY, "epochs": 3.0, "batch_size": 64.0})
    assert r.config["epochs"] == 3 and isinstance(r.config["epochs"], int)
    assert r.iis == score_features(**_feats(real_features), **TINY).iis


# ------------------------------------------------------------------------------------ chance-level acc_std
def test_probe_at_chance_level_warns_and_says_so_in_the_result(real_features):
    a = _feats(real_features)
    a["train_x"] = torch.ones_like(a["train_x"])       # constant features: no probe can beat chance
    a["eval_x"] = torch.ones_like(a["eval_x"])
    with pytest.warns(IISWarning, match="chance level"):
        r = score_features(**a, **TINY)
    chance = np.bincount(a["eval_y"].numpy()).max() / len(a["eval_y"])
    assert r.acc_std <= chance + CHANCE_MARGIN
    assert len(r.warnings) == 1 and "chance level" in r.warnings[0] and "IIS = " in r.warnings[0]
    assert "WARNING: acc_std" in repr(r)
    assert IISResult.from_json(r.to_json()).warnings == r.warnings
    # a real representation is far above chance: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", IISWarning)
        ok = score_features(**_feats(real_features), **TINY)
    assert ok.acc_std > 0.5 and ok.warnings == []


def test_results_without_a_warnings_field_still_load(real_features):
    d = score_features(**_feats(real_features), **TINY).to_dict()
    del d["warnings"]                                  # JSON written before the field existed
    assert IISResult.from_dict(d).warnings == []


# --------------------------------------------------------------------------------------------- labels
def test_huge_labels_are_refused_before_any_allocation(real_features):
    a = _feats(real_features)
    a["train_y"][0] = 2 ** 40
    with pytest.raises(IISInputError, match="label 1099511627776, above the largest supported class index"):
        score_features(**a, **TINY)
    a = _feats(real_features)
    a["eval_y"][3] = 50_000                            # under the hard bound, but K would come from one stray label
    with pytest.raises(IISInputError, match=r"largest label is 50000 but only 11 distinct labels"):
        score_features(**a, **TINY)


def test_class_only_in_eval_is_refused(real_features):
    a = _feats(real_features)
    keep = a["train_y"] != 7
    a["train_x"], a["train_y"] = a["train_x"][keep], a["train_y"][keep]
    with pytest.raises(IISInputError, match=r"class\(es\) \[7\] occur in eval_y but have no training samples"):
        score_features(**a, **TINY)


# ---------------------------------------------------------------------------------------- devices
def test_devices_that_do_not_exist_are_named(real_features):
    for dev in ("cuda:99", "mps") + (() if torch.cuda.is_available() else ("cuda",)):
        with pytest.raises(IISInputError, match=f"device='{dev}'"):
            score_features(**_feats(real_features), **{**TINY, "device": dev})


# ------------------------------------------------------------------------------------- score(): images
@pytest.fixture(scope="module")
def fm_images(fmnist_train, pretrained_mobilenet):
    """300 Fashion-MNIST train images (30 per class) at 48 px for MobileNetV2: (grey [N, 1], normalised rgb, y)."""
    from iis_fast.data.sampling import stratified_subset
    from iis_fast.models import preprocessing_config
    images, labels = fmnist_train
    idx = stratified_subset(labels, 300, seed=1)
    pre = preprocessing_config(pretrained_mobilenet)
    x = torch.nn.functional.interpolate(torch.from_numpy(images[idx]).float().div(255).unsqueeze(1), size=48,
                                        mode="bilinear", antialias=True)
    mean, std = torch.tensor(pre["mean"]).view(1, 3, 1, 1), torch.tensor(pre["std"]).view(1, 3, 1, 1)
    rgb = (x.expand(-1, 3, -1, -1) - mean) / std
    return x.contiguous(), rgb.contiguous(), torch.from_numpy(labels[idx])


SCORE = dict(num_concepts=20, images_per_class=2, epochs=2, batch_size=32, sparsities=(0.0, 0.9), progress=False,
             image_size=48)


def test_one_channel_images_for_a_three_channel_model(fm_images, pretrained_mobilenet, tmp_path):
    grey, _, y = fm_images
    with pytest.raises(IISInputError, match="1-channel images but .* reads 3-channel input"):
        score(pretrained_mobilenet, DataLoader(TensorDataset(grey, y), batch_size=100), cache_dir=str(tmp_path),
              **SCORE)


def test_images_per_class_above_a_class_size(fm_images, pretrained_mobilenet, tmp_path):
    _, rgb, y = fm_images
    msg = r"images_per_class=31 but class\(es\) \[0, 1, .*\] have fewer training images \(the smallest has 30\)"
    with pytest.raises(IISInputError, match=msg):
        score(pretrained_mobilenet, DataLoader(TensorDataset(rgb, y), batch_size=100), cache_dir=str(tmp_path),
              **{**SCORE, "images_per_class": 31})


def test_no_loader_and_missing_device_are_named(pretrained_mobilenet, tmp_path):
    with pytest.raises(IISInputError, match="loader must be an iterable"):
        score(pretrained_mobilenet, None, cache_dir=str(tmp_path), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(IISInputError, match="no CUDA GPU"):
            score(pretrained_mobilenet, "fashion-mnist", cache_dir=str(tmp_path), device="cuda", progress=False)


# ------------------------------------------------------------------------------------- the feature cache
@pytest.fixture()
def entry(tmp_path):
    """A real cache entry: MobileNetV2-sized features and labels (200 rows)."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((200, 1280)).astype(np.float32), np.arange(200) % 10
    cache = FeatureCache(tmp_path / "cache")
    cache.put("k", {"x": x, "y": y}, {"split": "train"})
    return cache, cache.root / "k", x, y


def _miss_with_warning(cache, match, **kw):
    with pytest.warns(IISWarning, match=match):
        assert cache.get("k", **kw) is None


def test_cache_round_trip_records_checksums_and_rows(entry):
    cache, d, x, y = entry
    got = cache.get("k")
    assert np.array_equal(got["x"], x) and np.array_equal(got["y"], y) and got["meta"] == {"split": "train"}
    files = json.loads((d / "meta.json").read_text())["files"]
    assert files["x"]["shape"] == [200, 1280] and files["y"]["shape"] == [200] and len(files["x"]["sha256"]) == 64


def test_cache_flipped_bytes_are_detected_and_recomputed(entry):
    cache, d, x, y = entry
    b = bytearray((d / "x.npy").read_bytes())
    b[5000] ^= 0xFF
    (d / "x.npy").write_bytes(bytes(b))
    _miss_with_warning(FeatureCache(cache.root), "x.npy whose bytes no longer match the checksum")
    cache.put("k", {"x": x, "y": y})                    # the recomputation replaces the bad entry
    assert np.array_equal(cache.get("k")["x"], x)


def test_cache_zeroed_array_and_short_labels_are_detected(entry):
    cache, d, x, y = entry
    np.save(d / "x.npy", np.zeros_like(x))              # same size, same shape: only the checksum tells
    _miss_with_warning(cache, "x.npy whose bytes no longer match")
    cache.put("k", {"x": x, "y": y})
    np.save(d / "y.npy", y[:-5])                        # 195 labels for 200 rows
    _miss_with_warning(cache, "y.npy of 1688 bytes, but 1728 were written")


def test_cache_zero_byte_missing_array_and_file_entry_recompute(entry):
    cache, d, x, y = entry
    (d / "x.npy").write_bytes(b"")
    _miss_with_warning(cache, "x.npy of 0 bytes")        # was: EOFError
    cache.put("k", {"x": x, "y": y})
    meta = json.loads((d / "meta.json").read_text())
    meta["files"]["src_index"] = meta["files"]["y"]
    (d / "meta.json").write_text(json.dumps(meta))
    _miss_with_warning(cache, "lists src_index.npy, which is missing")
    cache.put("k", {"x": x, "y": y})
    _miss_with_warning(cache, r"lacks the array\(s\) \['src_index'\]", required=("x", "y", "src_index"))
    import shutil
    shutil.rmtree(d)
    d.write_text("not an entry")
    _miss_with_warning(cache, "is not a directory")
    cache.put("k", {"x": x, "y": y})                    # was: NotADirectoryError
    assert d.is_dir() and np.array_equal(cache.get("k")["y"], y)
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".")]     # nothing left aside


def test_cache_verifies_checksums_once_per_process_or_always(entry, monkeypatch):
    import iis_fast.features as features
    cache, d, x, y = entry
    hashed = []
    real = features.file_sha256
    monkeypatch.setattr(features, "file_sha256", lambda p: hashed.append(os.path.basename(p)) or real(p))
    cache.get("k")
    FeatureCache(cache.root).get("k")
    assert hashed == []                                 # hashed when written; this process trusts it since
    FeatureCache(cache.root, verify="always").get("k")
    assert sorted(hashed) == ["x.npy", "y.npy"]
    with open(d / "x.npy", "r+b") as f:                 # an in-place change: same size, inode, even mtime
        f.seek(4000)
        f.write(b"\x00\x01\x02\x03")
    st = os.stat(d / "x.npy")
    os.utime(d / "x.npy", ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.warns(IISWarning, match="checksum"):    # its ctime moved: verified again, even in "once" mode
        assert cache.get("k") is None


def test_cache_entries_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        cache = FeatureCache(tmp_path / "c")
        cache.put("k", {"x": np.zeros(3)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(cache.root / "k").st_mode) == 0o755       # was 0o700 (mkdtemp)
    assert stat.S_IMODE(os.stat(cache.root / "k" / "x.npy").st_mode) == 0o644


def test_score_recomputes_a_corrupted_feature_cache(fm_images, pretrained_mobilenet, tmp_path):
    _, rgb, y = fm_images
    loader = DataLoader(TensorDataset(rgb, y), batch_size=100)
    r1 = score(pretrained_mobilenet, loader, cache_dir=str(tmp_path), **SCORE)
    entries = [p for p in tmp_path.iterdir() if (p / "x.npy").exists()]
    assert len(entries) == 1
    x = entries[0] / "x.npy"
    np.save(x, np.zeros_like(np.load(x)))               # features replaced by zeros: IIS would change silently
    with pytest.warns(IISWarning, match="x.npy whose bytes no longer match"):
        r2 = score(pretrained_mobilenet, loader, cache_dir=str(tmp_path), **SCORE)
    assert r2.iis == r1.iis and r2.acc_std == r1.acc_std and r2.timings["extract_train"] > 0


# ------------------------------------------------------------------------------------------ .beton checksum
@pytest.fixture(scope="module")
def fm_raw_beton(tmp_path_factory, fmnist_train):
    pytest.importorskip("ffcv")
    from iis_fast.data.ffcv_writer import write_arrays
    images, labels = fmnist_train
    path = tmp_path_factory.mktemp("beton") / "fm.beton"
    info = write_arrays(images[:100], labels[:100], path, progress=False, page_size=1 << 21, num_workers=1)
    return path, info


def _pixel_offset(path, sample: int) -> int:
    from ffcv.reader import Reader
    return int(Reader(str(path)).metadata["f0"]["data_ptr"][sample])


def test_beton_data_corruption_is_caught_by_its_checksum(fm_raw_beton, tmp_path):
    from iis_fast.data.beton import validate_beton
    from iis_fast.data.ffcv_loader import ffcv_loader
    from iis_fast.errors import DataFileError
    path, info = fm_raw_beton
    assert info.checksum is not None and len(info.checksum) == 64
    data = bytearray(path.read_bytes())
    at = _pixel_offset(path, 7) + 100
    data[at] ^= 0x40                                   # one pixel of sample 7: structurally still a valid file
    bad = tmp_path / "copied.beton"                    # the checksum is inside the file: it survives a copy
    bad.write_bytes(bytes(data))
    assert validate_beton(bad, verify_checksum="never").num_samples == 100      # what validation saw before
    with pytest.raises(DataFileError, match="do not match the SHA-256 stored in it"):
        validate_beton(bad)
    with pytest.raises(DataFileError, match="SHA-256"):
        ffcv_loader(bad, 28, (0.5,) * 3, (0.5,) * 3)    # what score() builds from a .beton path
    data[at] ^= 0x40
    bad.write_bytes(bytes(data))                       # restored: valid again (the file changed, so re-verified)
    assert validate_beton(bad).checksum == info.checksum


def test_beton_checksum_keeps_the_file_readable_by_ffcv(fm_raw_beton, fmnist_train):
    from ffcv.reader import Reader
    path, _ = fm_raw_beton
    r = Reader(str(path))
    assert r.num_samples == 100 and list(r.handlers) == ["image", "label"]
    assert np.array_equal(r.metadata["f1"], fmnist_train[1][:100])


def test_beton_huge_labels_are_refused_at_write_time(tmp_path, fmnist_train):
    pytest.importorskip("ffcv")
    from iis_fast.data.ffcv_writer import write_arrays
    from iis_fast.errors import DataFileError
    images, labels = fmnist_train
    lab = labels[:20].astype(np.int64)
    lab[3] = 2 ** 40
    with pytest.raises(DataFileError, match="label 1099511627776, out of range"):
        write_arrays(images[:20], lab, tmp_path / "huge.beton", progress=False)
    assert not (tmp_path / "huge.beton").exists()


# ---------------------------------------------------------------------------------------------- data specs
@pytest.mark.parametrize("spec, msg", [
    ("fashion-mnist:n_train=0", "n_train=0: must be a positive whole number"),   # was: all 60,000 images
    ("fashion-mnist:n_eval=-5", "n_eval=-5"),
    ("fashion-mnist:n_train=70000", "n_train=70000, but its TRAIN split has 60000 images"),   # was: capped
    ("fashion-mnist:n_eval=10001", "n_eval=10001, but its TEST split has 10000 images"),
])
def test_fashion_mnist_sizes_are_checked_by_name(spec, msg, tmp_path):
    from iis_fast.data.sources import prepare_data
    pre = {"input_size": (3, 28, 28), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    with pytest.raises(IISInputError, match=msg):
        prepare_data(spec, pre, tmp_path)
    assert not (tmp_path / "sweep-data").exists() or not any((tmp_path / "sweep-data").iterdir())


# ------------------------------------------------------------------------------------------------ sweeps
SWEEP_DATA = "fashion-mnist:n_train=120,n_eval=60"
SWEEP_TINY = dict(num_concepts=10, sparsities=[0.0, 0.5], lrs=[0.01], epochs=2, images_per_class=2, batch_size=64,
                  extract_batch_size=128)


def _smallcnn_ckpts(folder, n, seeds=None):
    from iis_fast.models.smallcnn import SmallCNN
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        torch.manual_seed((seeds or list(range(n)))[i])
        p = folder / f"step_{i * 10:06d}.pt"
        torch.save({"state_dict": SmallCNN().state_dict()}, p)
        paths.append(p)
    return paths


def _row(df, path):
    return df[df["path"] == str(path.resolve())].iloc[0]


def test_sweep_rescores_an_overwritten_checkpoint_and_keeps_the_old_row_as_history(tmp_path):
    from iis_fast.features import file_sha256
    from iis_fast.models.smallcnn import SmallCNN
    from iis_fast.sweeps import ResultStore, sweep
    paths = _smallcnn_ckpts(tmp_path / "ck", 2)
    kw = dict(arch="iis_smallcnn", out=tmp_path / "r.db", executor="inline", cache_dir=str(tmp_path / "cache"),
              progress=False, **SWEEP_TINY)
    df1 = sweep(paths, SWEEP_DATA, **kw)
    assert _row(df1, paths[1])["content_hash"] == file_sha256(paths[1])
    torch.manual_seed(1234)
    torch.save({"state_dict": SmallCNN().state_dict()}, paths[1])          # other weights, same path and size
    df2 = sweep(paths, SWEEP_DATA, **kw)
    assert df2.attrs["sweep"]["scored"] == 1 and df2.attrs["sweep"]["changed"] == 1   # was: skipped, old IIS kept
    assert _row(df2, paths[0])["iis"] == _row(df1, paths[0])["iis"]
    new, old = _row(df2, paths[1]), _row(df1, paths[1])
    assert new["content_hash"] == file_sha256(paths[1]) != old["content_hash"] and new["iis"] != old["iis"]
    with ResultStore(tmp_path / "r.db") as store:
        hist = store.history()
        assert len(hist) == 1 and hist["iis"][0] == old["iis"] and hist["content_hash"][0] == old["content_hash"]
        assert store.count() == 2
    paths[1].write_bytes(paths[1].read_bytes())         # same bytes written again: new mtime, same content
    df3 = sweep(paths, SWEEP_DATA, **kw)
    assert df3.attrs["sweep"]["scored"] == 0 and df3["iis"].tolist() == df2["iis"].tolist()


def test_database_from_before_content_hashes_resumes_and_still_sees_changed_files(tmp_path):
    import sqlite3
    import time
    from iis_fast.sweeps import ResultStore, sweep
    paths = _smallcnn_ckpts(tmp_path / "ck", 2)
    db = tmp_path / "r.db"
    kw = dict(arch="iis_smallcnn", out=db, executor="inline", cache_dir=str(tmp_path / "cache"), progress=False,
              **SWEEP_TINY)
    sweep(paths, SWEEP_DATA, **kw)
    with sqlite3.connect(db) as c:                      # back to schema 1: no hashes, no history, no leases
        for col in ("content_hash", "warnings"):
            c.execute(f"ALTER TABLE results DROP COLUMN {col}")
        c.execute("ALTER TABLE attempts DROP COLUMN content_hash")
        for t in ("results_history", "file_hashes", "leases"):
            c.execute(f"DROP TABLE {t}")
    time.sleep(1.1)                                     # rows are timed to the second
    paths[1].write_bytes(paths[1].read_bytes())         # touched after its row: it may have changed
    df = sweep(paths, SWEEP_DATA, **kw)
    assert df.attrs["sweep"]["scored"] == 1 and df["content_hash"].notna().all()
    with ResultStore(db) as store:
        assert store.count() == 2 and len(store.history()) == 1


def test_leases_let_one_driver_score_what_another_is_computing(tmp_path):
    import subprocess
    import sys
    from iis_fast.sweeps import ResultStore
    db = tmp_path / "r.db"
    keys = [("m@/c/a.pt", "prototype", "h1")]
    with ResultStore(db) as a, ResultStore(db) as b:
        assert a.claim(keys, "sha-a") and not b.claim(keys, "sha-a")        # a live lease is respected
        assert a.claim(keys, "sha-a")                                      # its owner may claim again
        a.write_checkpoint([{"checkpoint": keys[0][0], "model": "m", "path": "/c/a.pt", "library": "prototype",
                             "config_hash": "h1", "status": "failed", "error": "x", "config_json": "{}",
                             "content_hash": "sha-a"}])
        assert a.leases().empty                                            # writing the row ends the lease
        assert not b.claim(keys, "sha-a")                                  # stored meanwhile: nothing to do
        assert b.claim(keys, "sha-a", retry_failed=True)                   # ... unless retrying failures
        b.release_leases()
        assert a.claim(keys, "sha-b", seconds=-1)                          # an expired lease ...
        assert b.claim(keys, "sha-b")                                      # ... is taken over
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        b.conn.execute("UPDATE leases SET owner = ?, expires_at = 1e12", (f"{a.owner.split(':')[0]}:{dead}:x",))
        assert a.claim(keys, "sha-b")                                      # a dead process's lease too


@pytest.mark.parametrize("text", ["model_name;path;step\niis_smallcnn;{p};10\n",
                                  "model_name\tpath\tstep\niis_smallcnn\t{p}\t10\n"])
def test_checkpoint_lists_separated_by_semicolons_or_tabs_are_read_by_name(tmp_path, text):
    from iis_fast.sweeps import parse_checkpoints
    p = _smallcnn_ckpts(tmp_path / "ck", 1)[0]
    lst = tmp_path / "list.csv"
    lst.write_text(text.format(p=p))
    specs = parse_checkpoints(lst)                      # was: the header became a checkpoint path
    assert [(s.model, s.path, s.step) for s in specs] == [("iis_smallcnn", str(p.resolve()), 10)]
    lst.write_text(f"model_name,path\niis_smallcnn,{p},extra\n")
    with pytest.raises(IISInputError, match="does not split into the first row's columns"):
        parse_checkpoints(lst)


def test_results_database_paths_are_checked(tmp_path):
    from iis_fast.sweeps import ResultStore
    from iis_fast.sweeps.report import make_report
    with pytest.raises(IISInputError, match="does not exist"):
        make_report(tmp_path / "missing.db")            # was: an empty database created, an empty report
    assert not (tmp_path / "missing.db").exists() and not (tmp_path / "missing_report").exists()
    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    with pytest.raises(IISInputError, match="not an iis-fast results database"):
        ResultStore(tmp_path / "notes.txt")
    with pytest.raises(IISInputError, match="is a directory"):
        ResultStore(tmp_path)
    import sqlite3
    with sqlite3.connect(tmp_path / "other.db") as c:
        c.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(IISInputError, match=r"an SQLite database, but not an iis-fast results database.*users"):
        ResultStore(tmp_path / "other.db")


def test_sweep_records_warnings_in_its_table(tmp_path):
    """A random-init CNN probed for 2 epochs is at chance level, and a corrupt cache entry recomputed during a
    sweep: both are written in that row's warnings column (and the report lists them)."""
    from iis_fast.sweeps import sweep
    from iis_fast.sweeps.report import make_report
    paths = _smallcnn_ckpts(tmp_path / "ck", 1)
    cache = tmp_path / "cache"
    kw = dict(arch="iis_smallcnn", executor="inline", cache_dir=str(cache), progress=False, **SWEEP_TINY)
    df = sweep(paths, SWEEP_DATA, out=tmp_path / "a.db", **kw)      # warnings go to the table, not the console
    assert df.attrs["sweep"]["warned"] == 1
    assert df["acc_std"][0] <= 0.1 + CHANCE_MARGIN and df["warnings"][0].startswith("acc_std = 0.1000 is at chance")
    assert "warnings (1):" in make_report(tmp_path / "a.db", n_boot=20).text
    x = next(p for p in cache.iterdir() if (p / "x.npy").exists()) / "x.npy"
    np.save(x, np.zeros_like(np.load(x)))
    df2 = sweep(paths, SWEEP_DATA, out=tmp_path / "b.db", **kw)
    notes = df2["warnings"][0].split("\n")
    assert len(notes) == 2 and "x.npy whose bytes no longer match" in notes[1] and df2["iis"][0] == df["iis"][0]


# ------------------------------------------------------------------------------------------------ the CLI
def _cli(capsys, *argv):
    from iis_fast.cli import main
    try:
        code = main(list(argv))                         # the console script exits with what main returns
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "CheckpointAdapted" not in ln]
    assert len(lines) == 1 and lines[0].startswith("iis-fast: error: "), err     # one line, no traceback
    return code, lines[0]


def test_cli_refuses_bad_input_before_computing(tmp_path, capsys):
    fm = "fashion-mnist:n_train=100,n_eval=50"
    cases = [
        (["score", "mobilenetv2_100", "--data", fm, "--json", str(tmp_path)], "--json .* is a directory"),
        (["score", "mobilenetv2_100", "--data", fm, "--json", str(tmp_path / "no" / "r.json")], "does not exist"),
        (["score", "mobilenetv2_100", "--data", "fashion-mnist:n_train=1e3"], "n_train='1e3' is not an integer"),
        (["score", "mobilenetv2_100", "--data", "fashion-mnist:seed=-1"], "seed=-1"),
        (["score", "mobilenetv2_100", "--data", str(tmp_path / "nope.beton")], "does not exist"),
        (["score", "mobilenetv2_100", "--data", str(tmp_path)], "no class sub-folders"),
        (["score", "mobilenetv2_100", "--data", fm, "--device", "cuda:99"], "device='cuda:99'"),
        (["score", "mobilenetv2_100", "--data", fm, "--device", "gpu"], "not a torch device"),
        (["report", str(tmp_path / "missing.db")], "does not exist"),
        (["report", str(tmp_path)], "is a directory"),
        (["sweep", str(tmp_path), "--arch", "iis_smallcnn", "--export", str(tmp_path / "r.xlsx")],
         r"\.csv or \.parquet"),
        (["sweep", str(tmp_path), "--arch", "iis_smallcnn", "--executor", "slurm", "--slurm", "{partition: gpu}"],
         "--slurm is not valid JSON"),
        (["sweep", str(tmp_path), "--arch", "iis_smallcnn", "--out", str(tmp_path)], "is a directory"),
    ]
    if not torch.cuda.is_available():
        cases += [(["score", "mobilenetv2_100", "--data", fm, "--device", "cuda"], "no CUDA GPU"),
                  (["score", "mobilenetv2_100", "--data", fm, "--backend", "triton"], "triton")]
    for argv, msg in cases:
        code, line = _cli(capsys, *argv)
        assert code == 2 and re.search(msg, line), (argv, line)
    assert not (tmp_path / "missing.db").exists()


def test_cli_sweep_on_a_non_database_and_a_sweep_where_everything_failed(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("these are my notes\n" * 50)
    bad = tmp_path / "ck" / "step_000010.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    common = ["sweep", str(bad.parent), "--arch", "iis_smallcnn", "--data", SWEEP_DATA, "--executor", "inline",
              "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--num-concepts", "10", "--epochs", "1",
              "--images-per-class", "2"]
    code, line = _cli(capsys, *common, "--out", str(notes))
    assert code == 2 and "not an iis-fast results database" in line
    assert notes.read_text() == "these are my notes\n" * 50                  # left untouched
    code, line = _cli(capsys, *common, "--out", str(tmp_path / "r.db"))
    assert code == 1 and "every checkpoint failed (1 rows" in line and "CheckpointError" in line   # was: exit 0


def _wait_for(pred, timeout=240.0):
    import time
    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_cli_interrupted_exits_130_with_one_line(tmp_path):
    import signal
    import subprocess
    import sys
    paths = _smallcnn_ckpts(tmp_path / "ck", 3)
    db = tmp_path / "r.db"
    cmd = [sys.executable, "-m", "iis_fast.cli", "sweep", str(paths[0].parent), "--arch", "iis_smallcnn", "--data",
           "fashion-mnist:n_train=2000,n_eval=1000", "--executor", "local", "--workers", "1", "--no-progress",
           "--out", str(db), "--cache-dir", str(tmp_path / "cache"), "--num-concepts", "50", "--epochs", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        import sqlite3

        def leased():
            try:
                with sqlite3.connect(db, timeout=1) as c:
                    return c.execute("SELECT COUNT(*) FROM leases").fetchone()[0] > 0
            except sqlite3.Error:
                return False
        assert _wait_for(leased), proc.communicate(timeout=60)
        time.sleep(3)                                    # the worker is importing / scoring
        os.killpg(proc.pid, signal.SIGINT)               # Ctrl-C: the whole process group
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["iis-fast: error: interrupted"], err
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0     # released for the next sweep
