"""Concept elements and libraries (docs/spec.md §1.2), on small synthetic inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iis_fast.concepts import (
    build_library,
    cluster_library,
    concept_source_indices,
    cos_cubed_similarity,
    embed_concept_elements,
    embed_elements,
    ElementInfo,
    element_subset,
    end2end_elements,
    official_order,
    parse_elements,
    fit_text_projection,
    make_elements,
    patch_elements,
    prototype_library,
    segment_crop,
    segment_elements_with_sources,
    select_segment_masks,
    slic_label_maps,
    text_library,
)
from iis_fast.errors import IISInputError

GREY = 117 / 255


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cell_image(grid: int = 4, cell: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """One image whose grid cells have distinct flat colours; returns (image [3,H,W], colours [grid*grid,3])."""
    gen = torch.Generator().manual_seed(0)
    colours = torch.rand(grid * grid, 3, generator=gen)
    img = torch.zeros(3, grid * cell, grid * cell)
    for k in range(grid * grid):
        i, j = divmod(k, grid)
        img[:, i * cell:(i + 1) * cell, j * cell:(j + 1) * cell] = colours[k].view(3, 1, 1)
    return img, colours


def _three_region_image(size: int = 48) -> torch.Tensor:
    """Red background, a green centred square and a blue bar at the bottom: 3 flat colour regions."""
    img = torch.zeros(3, size, size)
    img[0] = 1.0
    img[:, size // 4: size // 2 + 4, size // 4: 3 * size // 4] = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)
    img[:, 3 * size // 4:, :] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)
    return img


def _blobs(n_per: int, centres: torch.Tensor, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k, d = centres.shape
    x = centres.repeat_interleave(n_per, dim=0) + noise * torch.randn(k * n_per, d, generator=gen)
    return x, torch.arange(k).repeat_interleave(n_per)


# ------------------------------------------------------------------------------------------------ elements
def test_concept_source_indices_first_per_class_in_order():
    labels = [2, 0, 2, 1, 0, 2, 0, 1, 2, 0]
    idx = concept_source_indices(labels, images_per_class=2)
    assert idx.tolist() == [0, 1, 2, 3, 4, 7]
    # a class with fewer images than asked gives what it has; order is the given order
    assert concept_source_indices(labels, images_per_class=3).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert concept_source_indices(torch.tensor(labels), 10).tolist() == list(range(10))
    with pytest.raises(IISInputError, match="images_per_class"):
        concept_source_indices(labels, images_per_class=0)


def test_patch_grid_geometry_row_major():
    img, colours = _cell_image()
    imgs = torch.stack([img, 1.0 - img])
    out = patch_elements(imgs, grid=4, out_size=(20, 20))
    assert out.shape == (2 * 16, 3, 20, 20)
    for k in range(16):
        expected = colours[k].view(3, 1, 1).expand(3, 20, 20)
        torch.testing.assert_close(out[k], expected, atol=1e-5, rtol=0)           # image 0, cell k
        torch.testing.assert_close(out[16 + k], 1.0 - expected, atol=1e-5, rtol=0)  # image 1, cell k
    assert out.min() >= 0 and out.max() <= 1


def test_select_segment_masks_area_jaccard_and_cap():
    h = w = 20
    a = np.zeros((h, w), dtype=np.int64)
    a[:, 10:] = 1
    a[0, 0] = 2                              # 1 pixel = 0.25% > 0.1% -> kept with min_area_frac=0.001
    b = a.copy()                             # identical map: every segment has Jaccard 1 -> all rejected
    c = np.zeros((h, w), dtype=np.int64)
    c[:, 12:] = 1                            # Jaccard with a's label 1 = 160/200 = 0.8 -> rejected
    c[:2, :2] = 2                            # 4 px; overlaps a's 1-px segment with Jaccard 1/4 -> kept
    kept = select_segment_masks([a, b, c], max_per_setting=5, min_area_frac=0.001, max_jaccard=0.5)
    areas = [int(m.sum()) for m in kept]
    assert areas == [199, 200, 1, 4]  # a: label 0 (199 px), 1, 2; b: none; c: only label 2
    # area rule: the 1-pixel segment goes when 0.25% is not above the threshold
    assert [int(m.sum()) for m in select_segment_masks([a], min_area_frac=0.0025)] == [199, 200]
    # cap per setting
    many = np.arange(h * w).reshape(h, w) // 40   # 10 labels of 40 px
    assert len(select_segment_masks([many], max_per_setting=5)) == 5


def test_segment_crop_fills_outside_mask_with_grey():
    img = torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(1))
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:6, 3] = True
    mask[5, 3:8] = True                        # an L: bounding box rows 2..5, cols 3..7
    crop = segment_crop(img, mask)
    assert crop.shape == (3, 4, 5)
    sub = torch.as_tensor(mask[2:6, 3:8])
    torch.testing.assert_close(crop[:, sub], img[:, 2:6, 3:8][:, sub])
    assert torch.allclose(crop[:, ~sub], torch.full_like(crop[:, ~sub], GREY))


def test_segment_elements_follow_rules_and_inherit_labels():
    base = _three_region_image(48)
    imgs = torch.stack([base, base.flip(-1)])
    out_size = (24, 28)
    n_seg = (3, 6, 9)
    elements, sources = segment_elements_with_sources(imgs, out_size=out_size, n_segments=n_seg)
    assert elements.shape[1:] == (3, *out_size)
    assert elements.min() >= 0 and elements.max() <= 1
    for i in range(2):
        maps = slic_label_maps(imgs[i], n_seg)
        kept = select_segment_masks(maps)
        assert int((sources == i).sum()) == len(kept) > 0
        assert len(kept) <= 5 * len(n_seg)
        for m in kept:
            assert m.mean() > 0.001
        for p in range(len(kept)):
            for q in range(p):
                inter = np.logical_and(kept[p], kept[q]).sum()
                assert inter / np.logical_or(kept[p], kept[q]).sum() <= 0.5
        # the element images are the grey-filled crops of those masks, resized
        first = segment_crop(imgs[i], kept[0]).unsqueeze(0)
        ref = F.interpolate(first, size=out_size, mode="bilinear", antialias=True, align_corners=False)
        torch.testing.assert_close(elements[sources == i][0], ref[0].clamp(0, 1))
    par, par_src = segment_elements_with_sources(imgs, out_size=out_size, n_segments=n_seg, n_jobs=2)
    assert torch.equal(par, elements) and np.array_equal(par_src, sources)
    # a repeated setting adds nothing (Jaccard 1 with the first setting's segments)
    once, _ = segment_elements_with_sources(imgs[:1], out_size=out_size, n_segments=(6,))
    twice, _ = segment_elements_with_sources(imgs[:1], out_size=out_size, n_segments=(6, 6))
    assert once.shape[0] == twice.shape[0]
    # segments that are not rectangles get the grey fill somewhere
    assert any(bool((e - GREY).abs().lt(1e-6).all(dim=0).any()) for e in elements)
    # labels inherit from the source image, kind-major order (patches first)
    el, lab = make_elements(imgs, [7, 3], kinds=("patches", "segments"), out_size=out_size,
                            n_segments=n_seg)
    assert el.shape[0] == 32 + elements.shape[0]
    assert lab[:32].tolist() == [7] * 16 + [3] * 16
    assert lab[32:].tolist() == [[7, 3][s] for s in sources]


def test_embed_elements_and_streaming_match():
    gen = torch.Generator().manual_seed(2)
    proj = torch.randn(3, 5, generator=gen)

    def embed_fn(batch: torch.Tensor) -> torch.Tensor:   # mean colour -> 5-D feature
        return batch.mean(dim=(2, 3)) @ proj + 0.1

    imgs = torch.rand(5, 3, 16, 16, generator=gen)
    labels = [0, 0, 1, 1, 2]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    el, lab = make_elements(imgs, labels, out_size=(16, 16), n_segments=(4, 8))
    feats = embed_elements(embed_fn, el, mean, std, batch_size=7, progress=False)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(feats, F.normalize(embed_fn((el - m) / s), dim=1))
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(len(feats)))
    for chunk in (1, 2, 5):  # streaming gives the same features and order, whatever the chunk size
        f2, l2 = embed_concept_elements(embed_fn, imgs, labels, (16, 16), mean, std, chunk_images=chunk,
                                        batch_size=3, progress=False, n_segments=(4, 8))
        torch.testing.assert_close(f2, feats, atol=1e-6, rtol=1e-5)
        assert torch.equal(l2, lab)
    chunks = [(imgs[:3], labels[:3]), (imgs[3:], labels[3:])]
    f3, l3 = embed_concept_elements(embed_fn, chunks, None, 16, mean, std, progress=False, n_segments=(4, 8))
    torch.testing.assert_close(f3, feats, atol=1e-6, rtol=1e-5)
    assert torch.equal(l3, lab)


def test_element_memo_rebuilds_nothing_for_a_second_model_and_gives_identical_features(monkeypatch):
    """Checkpoints of one run share their concept-source images: the element images (SLIC, crops) are built once
    per process and only re-embedded by the next model; sets over the memo's byte budget stream as before."""
    import iis_fast.concepts.elements as el_mod

    el_mod.clear_element_memo()
    built = []
    real = el_mod._elements_of_kind
    monkeypatch.setattr(el_mod, "_elements_of_kind", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    gen = torch.Generator().manual_seed(5)
    imgs, labels = torch.rand(6, 3, 16, 16, generator=gen), [0, 1, 2, 0, 1, 2]
    proj_a, proj_b = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    model_a = lambda b: b.mean(dim=(2, 3)) @ proj_a + 0.1  # noqa: E731  (two "checkpoints")
    model_b = lambda b: b.mean(dim=(2, 3)) @ proj_b - 0.2  # noqa: E731
    opts = dict(chunk_images=4, batch_size=5, progress=False, n_segments=(4, 8))
    plain_b = embed_concept_elements(model_b, imgs, labels, 16, (0.5,) * 3, (0.25,) * 3, **opts)
    n_plain = len(built)
    fa = embed_concept_elements(model_a, imgs, labels, 16, (0.5,) * 3, (0.25,) * 3, memo=True, **opts)
    assert len(built) == 2 * n_plain                              # first memo call builds (2 chunks x 2 kinds)
    fb = embed_concept_elements(model_b, imgs, labels, 16, (0.5,) * 3, (0.25,) * 3, memo=True, **opts)
    assert len(built) == 2 * n_plain                              # second model: nothing rebuilt
    assert torch.equal(fb[0], plain_b[0]) and torch.equal(fb[1], plain_b[1])
    assert not torch.equal(fa[0], fb[0])
    other = imgs.clone()
    other[0, 0, 0, 0] = 1.0 - other[0, 0, 0, 0]                   # another source image: another key
    embed_concept_elements(model_b, other, labels, 16, (0.5,) * 3, (0.25,) * 3, memo=True, **opts)
    assert len(built) == 3 * n_plain
    monkeypatch.setattr(el_mod, "ELEMENT_MEMO_BYTES", 1)          # over budget: streamed, nothing kept
    el_mod.clear_element_memo()
    embed_concept_elements(model_b, imgs, labels, 16, (0.5,) * 3, (0.25,) * 3, memo=True, **opts)
    embed_concept_elements(model_b, imgs, labels, 16, (0.5,) * 3, (0.25,) * 3, memo=True, **opts)
    assert len(built) == 5 * n_plain and not el_mod._ELEMENT_MEMO
    el_mod.clear_element_memo()


# ----------------------------------------------------------------------------------------------- libraries
def _toy_elements(n_classes: int = 4, per_class: int = 10, d: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(n_classes * per_class, d, generator=gen), dim=1)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return feats, labels


def test_prototype_stratified_balanced_and_seeded():
    feats, labels = _toy_elements(4, 10)
    c = prototype_library(feats, labels, num_concepts=10, seed=3)
    assert c.shape == (10, 8)
    torch.testing.assert_close(c.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(c, prototype_library(feats, labels, num_concepts=10, seed=3))
    assert not torch.equal(c, prototype_library(feats, labels, num_concepts=10, seed=4))
    # every row is one element; classes get floor/ceil of 10/4
    hit = (c @ feats.t()).argmax(dim=1)
    assert torch.allclose(feats[hit], c, atol=1e-6)
    per_class = torch.bincount(labels[hit], minlength=4)
    assert sorted(per_class.tolist()) == [2, 2, 3, 3] and len(set(hit.tolist())) == 10
    # an unbalanced class with few elements gives all it has; the rest is spread over the others
    lab2 = labels.clone()
    lab2[:9] = 1   # class 0 now has 1 element, class 1 has 19
    hit2 = (prototype_library(feats, lab2, 12, seed=0) @ feats.t()).argmax(dim=1)
    assert sorted(torch.unique(lab2[hit2], return_counts=True)[1].tolist()) == [1, 3, 4, 4]
    # "first" = the first M in order
    torch.testing.assert_close(prototype_library(feats, labels, 6, selection="first"), feats[:6])


def test_cluster_deterministic_unit_rows_recovers_blobs():
    centres = F.normalize(torch.eye(6)[:3] * 5 + 0.1, dim=1)
    x, _ = _blobs(15, centres, noise=0.02, seed=0)
    x = F.normalize(x, dim=1)
    c = cluster_library(x, num_concepts=3, seed=0)
    torch.testing.assert_close(c, cluster_library(x, num_concepts=3, seed=0))
    torch.testing.assert_close(c.norm(dim=1), torch.ones(3))
    cos = c @ centres.t()
    assert sorted(cos.argmax(dim=1).tolist()) == [0, 1, 2]
    assert cos.max(dim=1).values.min() > 0.99
    # subsampling cap still gives unit rows
    c2 = cluster_library(x, num_concepts=3, seed=1, max_elements=20)
    torch.testing.assert_close(c2.norm(dim=1), torch.ones(3))


def test_end2end_elements_are_the_cluster_subset_as_unit_rows():
    feats, labels = _toy_elements(4, 10)
    e = end2end_elements(feats * 3.0, num_concepts=5, seed=0, max_elements=12)
    assert e.shape == (12, 8)
    torch.testing.assert_close(e, F.normalize(feats[torch.as_tensor(element_subset(40, 12, "random", 0))], dim=1))
    order = np.arange(40)[::-1].copy()
    torch.testing.assert_close(end2end_elements(feats, 5, max_elements=12, subset="first", order=order),
                               F.normalize(feats[order[:12].copy()], dim=1))
    with pytest.raises(IISInputError, match="num_concepts=13"):
        end2end_elements(feats, 13, max_elements=12)


def test_element_subset_random_or_first_of_the_order():
    r = element_subset(100, 10, "random", seed=0)
    assert len(r) == 10 and np.all(np.diff(r) > 0) and np.array_equal(r, element_subset(100, 10, "random", 0))
    assert np.array_equal(element_subset(100, 10, "first"), np.arange(10))
    order = np.random.default_rng(1).permutation(100)
    assert np.array_equal(element_subset(100, 10, "first", order=order), order[:10])
    assert np.array_equal(element_subset(5, 10, "random"), np.arange(5))
    with pytest.raises(IISInputError, match="permutation"):
        element_subset(5, 3, "first", order=np.array([0, 0, 1, 2, 3]))
    with pytest.raises(IISInputError, match="element_subset='all'"):
        element_subset(5, 3, "all")


def test_official_order_is_the_file_order_of_the_official_embedding():
    """Hand-built: class by class, image by image, files <image>_<i>.jpg in string order; segment files are
    numbered in reverse selection order; with both kinds, patches first within an image."""
    # two images of class 1 (sources 0, 2), one of class 0 (source 1); image 0 has 12 patches and 3 segments
    src = [0] * 12 + [1] * 2 + [2] * 2 + [0] * 3 + [1] * 1
    kind = ["patches"] * 16 + ["segments"] * 4
    info = ElementInfo.from_sources([("patches", np.array(src[:16])), ("segments", np.array(src[16:]))])
    labels = np.array([1] * 12 + [0] * 2 + [1] * 2 + [1] * 3 + [0])
    order = official_order(labels, info)
    got = [(int(labels[e]), src[e], kind[e][0], int(info.position[e])) for e in order]
    expect = ([(0, 1, "p", 0), (0, 1, "p", 1), (0, 1, "s", 0)]
              + [(1, 0, "p", i) for i in (0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9)]
              + [(1, 0, "s", 2), (1, 0, "s", 1), (1, 0, "s", 0)]       # files _0, _1, _2 = selection 2, 1, 0
              + [(1, 2, "p", 0), (1, 2, "p", 1)])
    assert got == expect
    # prototype "first" reads that order: the first M elements are class 0's
    feats = F.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    first = prototype_library(feats, torch.as_tensor(labels), 3, selection="first", order=order)
    torch.testing.assert_close(first, feats[torch.as_tensor(order[:3])])


def test_parse_elements():
    assert parse_elements("both") == ("patches", "segments")
    assert parse_elements("segments") == ("segments",)
    assert parse_elements(["patches"]) == ("patches",)
    with pytest.raises(IISInputError, match="elements='boxes'"):
        parse_elements("boxes")


def test_text_projection_recovers_linear_map():
    gen = torch.Generator().manual_seed(0)
    n, d, t = 400, 6, 4
    x = F.normalize(torch.randn(n, d, generator=gen), dim=1)       # CLIP image feats = x (unit rows)
    w_true = F.normalize(torch.randn(t, d, generator=gen), dim=1)  # CLIP text feats = concept directions
    w, sim = fit_text_projection(3.0 * x, x, w_true, steps=300, lr=0.05, seed=0, return_similarity=True)
    assert w.shape == (t, d)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(t))
    assert (w * w_true).sum(dim=1).min() > 0.98
    assert sim.min() > 0.98
    torch.testing.assert_close(w, fit_text_projection(3.0 * x, x, w_true, steps=300, lr=0.05, seed=0))
    assert torch.allclose(cos_cubed_similarity(x @ w_true.t(), x @ w_true.t()), torch.ones(t))
    torch.testing.assert_close(build_library("text", x, concept_vectors=w), w)
    torch.testing.assert_close(text_library(w.t(), feature_dim=d), w)


def test_bad_inputs_raise_clear_errors():
    feats, labels = _toy_elements(2, 3)
    with pytest.raises(IISInputError, match=r"num_concepts=10 .*only 6 elements.*images_per_class"):
        build_library("prototype", feats, labels, num_concepts=10)
    with pytest.raises(IISInputError, match="num_concepts=7"):
        build_library("cluster", feats, labels, num_concepts=7)
    bad = feats.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(IISInputError, match="element_feats contains NaN"):
        build_library("prototype", bad, labels, num_concepts=2)
    with pytest.raises(IISInputError, match="element_feats has shape"):
        build_library("cluster", feats[0], labels, num_concepts=2)
    with pytest.raises(IISInputError, match="element_labels has 5 entries"):
        build_library("prototype", feats, labels[:5], num_concepts=2)
    with pytest.raises(IISInputError, match="kind='pca'"):
        build_library("pca", feats, labels)
    with pytest.raises(IISInputError, match="num_concepts=7"):
        build_library("end2end", feats, labels, num_concepts=7)
    with pytest.raises(IISInputError, match="concept_vectors"):
        build_library("text", feats, labels)
    with pytest.raises(IISInputError, match="selection="):
        prototype_library(feats, labels, 2, selection="random")
    with pytest.raises(IISInputError, match=r"images01 has shape \(2, 1, 8, 8\)"):
        patch_elements(torch.zeros(2, 1, 8, 8), out_size=(8, 8))
    with pytest.raises(IISInputError, match="labels has 1 entries"):
        make_elements(torch.zeros(2, 3, 8, 8), [0], out_size=8)
    with pytest.raises(IISInputError, match="kinds="):
        make_elements(torch.zeros(2, 3, 8, 8), [0, 1], kinds=("patches", "boxes"), out_size=8)
    with pytest.raises(IISInputError, match="clip_image_feats has 5 rows"):
        fit_text_projection(torch.zeros(4, 3), torch.zeros(5, 2), torch.zeros(3, 2))


def _clip_world(n: int, seed: int):
    """Backbone features x = A·(CLIP image features); 4 concepts aligned with image directions, 2 unrelated."""
    gen = torch.Generator().manual_seed(seed)
    k, d = 6, 10
    clip_img = F.normalize(torch.randn(n, k, generator=gen) + 2.0 * torch.eye(k)[torch.randint(0, 4, (n,),
                                                                                              generator=gen)], dim=1)
    a = torch.randn(d, k, generator=torch.Generator().manual_seed(99))
    text = torch.eye(k)                                   # concepts 4, 5: directions images barely use
    text[4:] = F.normalize(torch.tensor([[0.0, 0, 0, 0, 1, 1], [0.0, 0, 0, 0, 1, -1]]), dim=1)
    return clip_img @ a.t(), clip_img, text


def test_fit_text_concepts_filters_fits_and_standardises():
    from iis_fast.concepts import fit_text_concepts
    x, ci, text = _clip_world(400, 0)
    vx, vci, _ = _clip_world(200, 1)
    ci[:, 4:] *= 0.1                                      # concepts 4, 5: top-5 similarity far below 0.25
    vci[:, 4:] *= 0.1
    tc = fit_text_concepts(x, ci, text, vx, vci, steps=300, lr=0.05, val_every=25, seed=0)
    assert float(tc.clip_top5[4:].max()) <= 0.25 < float(tc.clip_top5[:4].min())
    assert tc.kept.tolist() == [0, 1, 2, 3] and (tc.similarity > 0.45).all()
    act = tc.activations(x)
    torch.testing.assert_close(act.mean(0), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(act.std(0), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(tc.library.norm(dim=1), torch.ones(4))
    assert 0 <= tc.best_step < 300
    # the official similarity is a distance the official loss maximises: its concepts point away from CLIP's
    off = fit_text_concepts(x, ci, text, vx, vci, steps=300, lr=0.05, val_every=25, seed=0, reproduce="official")
    assert (off.similarity > 0.45).all()
    corr = [float(torch.corrcoef(torch.stack([(x @ off.vectors.t())[:, j], ci[:, int(c)]]))[0, 1])
            for j, c in enumerate(off.kept)]
    assert max(corr) < 0 < min(float(torch.corrcoef(torch.stack([act[:, j], ci[:, j]]))[0, 1]) for j in range(4))
