"""The torch DataLoader path: no FFCV/numba import, and timm's eval transform equal to torchvision's by hand."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import torch
from PIL import Image

from iis_fast.data.fashion_mnist import load_fashion_mnist
from iis_fast.data.torch_loader import eval_transform, torch_loader

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _folder(root, n_per_class: int = 3):
    images, labels = load_fashion_mnist("test")
    for c in (0, 1):
        (root / f"class{c}").mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(labels == c)[:n_per_class]):
            Image.fromarray(images[i]).convert("RGB").save(root / f"class{c}" / f"{j}.png")
    return root


def test_image_folder_path_imports_neither_ffcv_nor_numba(tmp_path):
    folder = _folder(tmp_path / "imgs")
    code = textwrap.dedent(f"""
        import sys
        from iis_fast.data import resolve_loader
        loader = resolve_loader({str(folder)!r}, image_size=32, mean={MEAN}, std={STD}, batch_size=4,
                                device="cpu")
        x, y = next(iter(loader))
        assert tuple(x.shape) == (4, 3, 32, 32) and y.tolist() == [0, 0, 0, 1], (x.shape, y)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("ffcv", "numba"))
        assert not bad, bad
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_timm_eval_transform_matches_torchvision_by_hand(tmp_path):
    """create_transform builds Resize(floor(S / crop_pct)) + CenterCrop + ToTensor + Normalize: same bits."""
    from torchvision import transforms as T
    images, _ = load_fashion_mnist("test")
    for crop_pct, interp, mode in ((1.0, "bilinear", T.InterpolationMode.BILINEAR),
                                   (0.875, "bicubic", T.InterpolationMode.BICUBIC)):
        ref = T.Compose([T.Resize(int(np.floor(40 / crop_pct)), interpolation=mode), T.CenterCrop(40),
                         T.ToTensor(), T.Normalize(MEAN, STD)])
        ours = eval_transform(40, MEAN, STD, crop_pct, interp)
        for i in range(5):
            im = Image.fromarray(images[i]).convert("RGB").resize((37, 45))
            assert torch.equal(ours(im), ref(im))
    batch = next(iter(torch_loader(_folder(tmp_path / "f", 2), 28, MEAN, STD, batch_size=4)))
    assert batch[0].dtype == torch.float32 and batch[1].tolist() == [0, 0, 1, 1]
