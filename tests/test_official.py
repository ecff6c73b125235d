"""The official preset (docs/spec.md §1.9) and the official element geometry, on a small image folder built here.

The expected selections are written out by hand from the official rules: ImageFolder order (sorted class folders,
sorted file names), patch files ``<image>_<i>.jpg`` read in string order, the first M of that order.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from iis_fast.concepts.official import (embed_official_elements, official_embedding_input, official_patches,
                                        official_segment_image, official_segment_masks, raw_source_images)
from iis_fast.config import IISConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32          # the "model input size" of these tests


def _colours(n: int, seed: int) -> np.ndarray:
    """n saturated, well separated colours (distinct directions in RGB)."""
    rng = np.random.default_rng(seed)
    hsv = np.stack([np.linspace(0, 1, n, endpoint=False), np.full(n, 0.9), np.full(n, 0.9)], 1)
    rng.shuffle(hsv)
    import colorsys
    return np.asarray([colorsys.hsv_to_rgb(*c) for c in hsv]) * 255


def _cell_image(colours: np.ndarray, cell: int = 12) -> np.ndarray:
    img = np.zeros((4 * cell, 4 * cell, 3), dtype=np.uint8)
    for k in range(16):
        i, j = divmod(k, 4)
        img[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell] = colours[k].round().astype(np.uint8)
    return img


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """b_cls and a_cls (so sorting matters), 3 images each named img1, img10, img2 (string order: 1, 10, 2)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("official_folder")
    colours = _colours(6 * 16, seed=0)
    cells = {}
    for ci, cls in enumerate(("b_cls", "a_cls")):
        (root / cls).mkdir()
        for ii, name in enumerate(("img1", "img10", "img2")):
            c = colours[(ci * 3 + ii) * 16:(ci * 3 + ii + 1) * 16]
            Image.fromarray(_cell_image(c)).save(root / cls / f"{name}.png")
            cells[(cls, name)] = c
    return root, cells


def _mean_colour(x: torch.Tensor) -> torch.Tensor:
    """An 'embedding' that identifies a flat-coloured element: its mean colour (rows unit-normalised later)."""
    return x.mean(dim=(2, 3))


def _loader(root):
    import torchvision
    from torchvision import transforms
    tf = transforms.Compose([transforms.Resize((SIZE, SIZE)), transforms.ToTensor()])
    ds = torchvision.datasets.ImageFolder(str(root), tf)
    return torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)


def _library(cfg: IISConfig, root, tmp_path) -> torch.Tensor:
    from iis_fast.concepts.elements import concept_source_indices
    from iis_fast.concepts.pipeline import score_library
    from iis_fast.features import FeatureCache
    loader = _loader(root)
    images = torch.stack([loader.dataset[i][0] for i in range(len(loader.dataset))])
    labels = np.asarray(loader.dataset.targets)
    src = concept_source_indices(labels, cfg.images_per_class)
    train = {"src_images": images[src].numpy(), "src_labels": labels[src], "src_index": src}
    pre = {"input_size": (3, SIZE, SIZE), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    return score_library(cfg, FeatureCache(str(tmp_path)), "train-key", train, _mean_colour, pre, loader)


def _which(concepts: torch.Tensor, cells: dict) -> list[tuple[str, str, int]]:
    """The (class, image, cell) whose colour direction each concept row points at."""
    keys = [(cls, name, k) for (cls, name), c in cells.items() for k in range(16)]
    cols = torch.nn.functional.normalize(torch.tensor(np.concatenate(list(cells.values())), dtype=torch.float32), dim=1)
    sim = concepts @ cols.t()
    assert float(sim.max(dim=1).values.min()) > 0.995          # every concept is one cell's colour
    return [keys[int(i)] for i in sim.argmax(dim=1)]


def test_official_preset_sets_every_official_option_and_explicit_options_win():
    off = IISConfig(reproduce="official")
    assert (off.elements, off.element_geometry, off.prototype_selection, off.element_subset, off.end2end_eval) == \
        ("segments", "official", "first", "first", "stochastic")
    dflt = IISConfig()
    assert (dflt.elements, dflt.element_geometry, dflt.prototype_selection, dflt.element_subset,
            dflt.end2end_eval) == ("both", "crop", "stratified", "random", "argmax")
    mixed = IISConfig(reproduce="official", elements="patches")
    assert mixed.elements == "patches" and mixed.prototype_selection == "first"
    assert IISConfig.from_options(**off.to_dict()).to_dict() == off.to_dict()
    from iis_fast.errors import IISInputError
    with pytest.raises(IISInputError, match="reproduce='paper'"):
        IISConfig(reproduce="paper")


def test_official_prototype_pick_on_a_folder(folder, tmp_path):
    """--official with patches: the first M files of the official embedding order are concepts:
    a_cls (sorted first), its first image img1, files img1_0, img1_1, img1_10, img1_11, img1_12."""
    root, cells = folder
    cfg = IISConfig(reproduce="official", elements="patches", num_concepts=5, images_per_class=2)
    got = _which(_library(cfg, root, tmp_path), cells)
    assert got == [("a_cls", "img1", k) for k in (0, 1, 10, 11, 12)]
    # 20 concepts: all 16 of a_cls/img1 in file order, then a_cls/img10's files 0, 1, 10, 11 (img10 sorts second)
    cfg20 = IISConfig(reproduce="official", elements="patches", num_concepts=20, images_per_class=2)
    got20 = _which(_library(cfg20, root, tmp_path), cells)
    assert got20 == [("a_cls", "img1", k) for k in (0, 1, 10, 11, 12, 13, 14, 15, 2, 3, 4, 5, 6, 7, 8, 9)] + \
        [("a_cls", "img10", k) for k in (0, 1, 10, 11)]
    # the default pick is stratified: both classes, only the first 2 images of each (img1, img10)
    dflt = _which(_library(IISConfig(elements="patches", num_concepts=6, images_per_class=2), root, tmp_path), cells)
    assert {c for c, _, _ in dflt} == {"a_cls", "b_cls"} and {n for _, n, _ in dflt} <= {"img1", "img10"}


def test_official_cluster_subset_is_the_first_elements(folder, tmp_path):
    """element_subset='first' with max_elements=16: k-means sees only a_cls/img1's 16 patches."""
    root, cells = folder
    cfg = IISConfig(reproduce="official", library="cluster", elements="patches", num_concepts=16, max_elements=16,
                    images_per_class=2)
    got = _which(_library(cfg, root, tmp_path), cells)
    assert sorted(got) == sorted(("a_cls", "img1", k) for k in range(16))


def test_official_patch_geometry_on_the_full_resolution_image(folder):
    root, cells = folder
    raw = raw_source_images(_loader(root), [0])[0]             # a_cls/img1 at its full 48 x 48
    assert raw.shape == (48, 48, 3)
    patches = official_patches(raw)
    assert len(patches) == 16 and all(p.shape == (224, 224, 3) for p in patches)
    for k, p in enumerate(patches):                            # row-major cells of int(W/4) pixels
        np.testing.assert_allclose(p.reshape(-1, 3).mean(0), cells[("a_cls", "img1")][k].round(), atol=1.0)
    x = official_embedding_input(patches[0], SIZE)             # resize 256/224 of the input, centre crop
    assert x.shape == (3, SIZE, SIZE) and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    # a 50 x 30 image: cells of int(50/4) = 12 by int(30/4) = 7 pixels, the remainder unused
    img = np.zeros((30, 50, 3), dtype=np.uint8)
    img[:, 48:] = 255                                          # beyond 4 * 12 = 48: never in a patch
    assert max(int(p.max()) for p in official_patches(img)) == 0


def test_official_segment_cut_drops_the_last_row_and_column():
    from PIL import Image
    img = np.zeros((10, 12, 3), dtype=np.uint8)
    img[2:6, 3:8] = (200, 10, 10)
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:6, 3:8] = True                                      # rows 2..5, cols 3..7
    got = official_segment_image(img, mask)
    want = np.asarray(Image.fromarray(img[2:5, 3:7]).resize((12, 10), Image.BICUBIC))   # [min, max): 3 x 4
    np.testing.assert_array_equal(got, want)


def test_official_segment_candidates_never_include_the_last_label():
    from skimage.segmentation import slic
    rng = np.random.default_rng(0)
    img = (rng.random((40, 40, 3)) * 60).astype(np.uint8)
    img[:20, :20] += 150
    img[25:, 10:35] += 100
    masks = official_segment_masks(img)
    assert 1 <= len(masks) <= 15
    for k in (10, 20, 30):
        seg = slic(img, n_segments=k, compactness=10, sigma=1.0, channel_axis=-1, start_label=1)
        last = seg == seg.max()
        assert not any(np.array_equal(m, last) for m in masks)


def test_official_elements_embed_with_labels_and_order_info(folder):
    root, cells = folder
    raw = raw_source_images(_loader(root), [0, 3])
    feats, labels, info = embed_official_elements(_mean_colour, raw, [0, 1], SIZE, (0, 0, 0), (1, 1, 1),
                                                  kinds=("patches",), progress=False)
    assert feats.shape == (32, 3) and labels.tolist() == [0] * 16 + [1] * 16
    assert info.position.tolist() == list(range(16)) * 2 and info.count.tolist() == [16] * 32


def test_cli_official_flag_selects_the_preset():
    from iis_fast.cli import build_parser, score_options
    args = build_parser().parse_args(["demo", "--official", "--library", "end2end"])
    cfg = IISConfig.from_options(**score_options(args))
    assert cfg.reproduce == "official" and cfg.end2end_eval == "stochastic" and cfg.elements == "segments"
    args = build_parser().parse_args(["demo", "--official", "--elements", "both"])
    assert IISConfig.from_options(**score_options(args)).elements == "both"
    assert IISConfig.from_options(**score_options(build_parser().parse_args(["demo"]))).reproduce is None
