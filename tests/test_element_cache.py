"""Concept element images as an on-disk cache entry, and element embedding in full batches (issue 13).

Real Fashion-MNIST concept-source images, the real SLIC settings, and a real (small, seeded) CNN backbone: the cache and
the batching do not depend on which backbone embeds, and this one keeps the tests to seconds.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import iis_fast.concepts.elements as el_mod
import iis_fast.features as features_mod
from iis_fast.concepts import clear_element_memo, embed_concept_elements, embed_elements, make_elements
from iis_fast.errors import IISWarning
from iis_fast.features import FeatureCache, representation_fn

SIZE = 28

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sources(fmnist_train):
    """The first image of every class (10 concept-source images, 28 px, RGB in [0, 1]) and their labels."""
    images, labels = fmnist_train
    idx = np.asarray([int(np.flatnonzero(labels == c)[0]) for c in range(10)])
    x = torch.from_numpy(images[idx]).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(labels[idx]).long()


@pytest.fixture(scope="module")
def embed():
    from iis_fast.models import create_model
    torch.manual_seed(0)
    return representation_fn(create_model("iis_smallcnn"))


@pytest.fixture
def builds(monkeypatch):
    """Every element-image build (one per chunk and kind), counted."""
    calls: list[str] = []
    real = el_mod._elements_of_kind
    monkeypatch.setattr(el_mod, "_elements_of_kind", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    return calls


def _fresh_process_state() -> None:
    """What a new process starts without: the element memo and the cache's per-process checksum record."""
    clear_element_memo()
    features_mod._VERIFIED.clear()


def _run(embed, sources, cache, **kw):
    x, y = sources
    return embed_concept_elements(embed, x, y, SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), cache=cache,
                                  chunk_images=4, batch_size=64, progress=False, return_info=True, **kw)


def _entry(cache: FeatureCache):
    entries = [m.parent for m in cache.root.glob("*/meta.json")
               if json.loads(m.read_text())["info"].get("kind") == "element_images"]
    assert len(entries) == 1
    return entries[0]


def _same(a, b) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for name, arr in a[2].arrays().items():
        np.testing.assert_array_equal(arr, b[2].arrays()[name])


def test_a_fresh_process_reads_the_element_entry_and_gets_identical_concepts(tmp_path, embed, sources, builds):
    _fresh_process_state()
    plain = _run(embed, sources, None)                      # no cache: built and embedded as it streams
    n_plain = len(builds)
    assert n_plain == 3 * 2                                 # 3 chunks of <= 4 images x 2 kinds
    first = _run(embed, sources, FeatureCache(tmp_path))
    assert len(builds) == 2 * n_plain
    entry = _entry(FeatureCache(tmp_path))
    stored = np.load(entry / "segments.npy", mmap_mode="r")
    assert stored.shape[1:] == (3, SIZE, SIZE) and stored.dtype == np.float32
    _fresh_process_state()
    again = _run(embed, sources, FeatureCache(tmp_path))    # "a later run": nothing rebuilt
    assert len(builds) == 2 * n_plain
    _same(first, plain)
    _same(again, plain)
    assert plain[0].shape[0] == plain[1].shape[0] == stored.shape[0] + np.load(entry / "patches.npy").shape[0]


def test_the_key_covers_what_the_elements_depend_on(tmp_path, embed, sources, builds):
    _fresh_process_state()
    cache = FeatureCache(tmp_path)
    x, y = sources
    _run(embed, sources, cache)
    n = len(builds)
    _run(embed, sources, cache, n_segments=(10, 20))                    # other SLIC settings
    other = x.clone()
    other[0, :, 0, 0] = 1.0 - other[0, :, 0, 0]                         # another source image's content
    _run(embed, (other, y), cache)
    assert len(builds) == 3 * n
    x2, y2 = sources
    embed_concept_elements(embed, x2, y2, SIZE + 4, (0.5,) * 3, (0.25,) * 3, cache=cache, chunk_images=4,
                           progress=False)                               # another element image size
    assert len(builds) == 4 * n
    _run(embed, sources, cache, n_jobs=1)                               # n_jobs does not change the images
    assert len(builds) == 4 * n


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_a_damaged_entry_is_reported_and_rebuilt_to_the_identical_result(tmp_path, embed, sources, builds, damage):
    _fresh_process_state()
    first = _run(embed, sources, FeatureCache(tmp_path))
    n = len(builds)
    path = _entry(FeatureCache(tmp_path)) / "segments.npy"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:                                                   # same size: only the checksum can tell
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 0x55]) + data[-99:])
    _fresh_process_state()
    with pytest.warns(IISWarning, match="recomputing"):
        rebuilt = _run(embed, sources, FeatureCache(tmp_path))
    assert len(builds) == 2 * n
    _same(rebuilt, first)
    _fresh_process_state()
    _same(_run(embed, sources, FeatureCache(tmp_path)), first)    # the rebuilt entry is good: read, not rebuilt
    assert len(builds) == 2 * n


def test_elements_are_embedded_in_full_batches_and_match_one_at_a_time(embed, sources):
    """A batch spans chunks, so every batch of a kind but its last has batch_size rows; the features equal the
    one-element-at-a-time embedding up to float tolerance."""
    x, y = sources
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    seen: list[int] = []

    def counting(b: torch.Tensor) -> torch.Tensor:
        seen.append(b.shape[0])
        return embed(b)

    _fresh_process_state()
    feats, labels = embed_concept_elements(counting, x, y, SIZE, mean, std, chunk_images=3, batch_size=48,
                                           progress=False)
    images, ref_labels = make_elements(x, y, out_size=SIZE)
    ref = embed_elements(embed, images, mean, std, batch_size=1, progress=False)
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(feats, ref, atol=2e-5, rtol=1e-4)
    n_patches = 16 * x.shape[0]
    n_segments = feats.shape[0] - n_patches
    expected = [48] * (n_patches // 48) + [n_patches % 48] + [48] * (n_segments // 48) + [n_segments % 48]
    assert sorted(seen) == sorted(b for b in expected if b)     # the kinds' batches interleave as chunks arrive
