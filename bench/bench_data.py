"""Images/s of the FFCV data path vs a torch DataLoader + PIL/torchvision, alone and feeding a backbone.

Same machine, same images, one run:

- ``fmnist``: Fashion-MNIST train images upscaled (PIL bilinear) to the model input (224) and stored raw in a
  ``.beton``; the DataLoader side reads the same 224x224 pixels from memory as PIL images.
- ``jpeg``: the same images upscaled to 256x256 and saved as JPEG files (class subfolders); FFCV gets them via
  :func:`write_image_folder` (JPEG storage), the DataLoader via torchvision ``ImageFolder``; both apply timm's
  eval crop (resize 256, centre crop 224, crop_pct 0.875).

Measured: the loader alone (median of ``--repeats`` epochs after one warm-up epoch, which for FFCV pays numba
compilation, reported separately), the backbone alone on tensors already in memory, and feature extraction end
to end with each loader (``forward_head(forward_features(x), pre_logits=True)``, no grad).

Usage::

    python bench/bench_data.py --n 512 --out bench/results/data.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def make_model(name: str) -> tuple[torch.nn.Module, str]:
    try:
        from iis_fast.models import create_model
        return create_model(name, pretrained=True), "iis_fast.models.create_model(pretrained=True)"
    except Exception as e:  # weights or registry not available: speed does not depend on the weights
        import timm
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=0).eval(), f"timm random weights ({e!r:.80})"


def time_loader(loader: Any, repeats: int) -> dict[str, float]:
    """One warm-up epoch, then ``repeats`` timed epochs; images/s of the median epoch."""
    t = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    warm = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        m = 0
        for x, y in loader:
            m += len(y)
        times.append(time.perf_counter() - t)
        assert m == n
    med = statistics.median(times)
    return {"images": n, "warmup_s": round(warm, 3), "epoch_s": [round(v, 3) for v in times],
            "images_per_s": round(n / med, 1)}


def time_e2e(embed: Callable[[torch.Tensor], torch.Tensor], loader: Any) -> dict[str, float]:
    t = time.perf_counter()
    n = 0
    for x, y in loader:
        f = embed(x)
        n += f.shape[0]
    dt = time.perf_counter() - t
    return {"images": n, "seconds": round(dt, 3), "images_per_s": round(n / dt, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="images per dataset")
    ap.add_argument("--model", default="mobilenetv2_100")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="FFCV threads and DataLoader worker processes")
    ap.add_argument("--repeats", type=int, default=3, help="timed loader-only epochs (median reported)")
    ap.add_argument("--out", default="bench/results/data.json")
    ap.add_argument("--workdir", default=None, help="where the .beton files and JPEGs go (default: a temp dir)")
    args = ap.parse_args()

    from PIL import Image

    from iis_fast.data.fashion_mnist import load_fashion_mnist
    from iis_fast.data.ffcv_loader import ffcv_loader
    from iis_fast.data.ffcv_writer import write_fashion_mnist, write_image_folder
    from iis_fast.data.torch_loader import torch_loader
    from iis_fast.validation import usable_cores

    cores = usable_cores()
    workers = min(args.workers, cores)
    torch.set_num_threads(min(2, cores))
    S, n = args.image_size, args.n
    model, weights = make_model(args.model)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean, std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))

    @torch.no_grad()
    def embed(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "command": " ".join(["python"] + sys.argv), "model": args.model, "weights": weights, "image_size": S,
        "n": n, "batch_size": args.batch_size, "workers": workers, "torch_threads": torch.get_num_threads(),
        "cores": cores, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "loadavg_start": loadavg(), "datasets": {},
    }
    images, labels = load_fashion_mnist("train")
    images, labels = images[:n], labels[:n]

    # ---- data preparation (not timed as part of the comparison; write time reported)
    t = time.perf_counter()
    beton_fm = work / "fmnist224_raw.beton"
    write_fashion_mnist("train", beton_fm, indices=np.arange(n), image_size=S, write_mode="raw",
                        num_workers=workers, progress=False)
    write_fm_s = time.perf_counter() - t
    up = [Image.fromarray(images[i]).resize((S, S), Image.BILINEAR) for i in range(n)]
    pil_ds = [(im, int(labels[i])) for i, im in enumerate(up)]
    folder = work / "jpeg_folder"
    big = int(round(S / 0.875))
    if not folder.exists():
        for i in range(n):
            d = folder / f"class_{int(labels[i])}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).resize((big, big), Image.BILINEAR).convert("RGB").save(d / f"{i:05d}.jpg",
                                                                                              quality=90)
    t = time.perf_counter()
    beton_jpg = work / "folder_jpeg.beton"
    write_image_folder(folder, beton_jpg, write_mode="jpeg", jpeg_quality=90, num_workers=workers, progress=False)
    write_jpg_s = time.perf_counter() - t

    setups = {
        "fmnist": dict(
            desc=f"Fashion-MNIST upscaled to {S}, raw .beton / in-memory PIL",
            ffcv=lambda: ffcv_loader(beton_fm, S, mean, std, batch_size=args.batch_size, num_workers=workers),
            torch=lambda: torch_loader(pil_ds, S, mean, std, batch_size=args.batch_size, num_workers=workers),
            write_s=write_fm_s, beton_bytes=beton_fm.stat().st_size),
        "jpeg": dict(
            desc=f"{n} JPEG files {big}x{big}, JPEG .beton / ImageFolder, crop_pct 0.875",
            ffcv=lambda: ffcv_loader(beton_jpg, S, mean, std, batch_size=args.batch_size, num_workers=workers,
                                     crop_pct=0.875),
            torch=lambda: torch_loader(folder, S, mean, std, batch_size=args.batch_size, num_workers=workers,
                                       crop_pct=0.875),
            write_s=write_jpg_s, beton_bytes=beton_jpg.stat().st_size),
    }

    # ---- model alone, on tensors already in memory (the FFCV batches: same memory format as end to end)
    first = ffcv_loader(beton_fm, S, mean, std, batch_size=args.batch_size, num_workers=workers)
    batches = [x for x, _ in first]
    embed(batches[0][:8])  # warm-up
    model_runs = []

    def model_only() -> dict[str, float]:
        t = time.perf_counter()
        m = 0
        for x in batches:
            m += embed(x).shape[0]
        dt = time.perf_counter() - t
        r = {"images": m, "seconds": round(dt, 3), "images_per_s": round(m / dt, 2)}
        model_runs.append(r)
        return r

    for key, s in setups.items():
        fl, tl = s["ffcv"](), s["torch"]()
        out = {"desc": s["desc"], "write_s": round(s["write_s"], 2), "beton_bytes": s["beton_bytes"]}
        out["ffcv_loader"] = time_loader(fl, args.repeats)
        out["torch_loader"] = time_loader(tl, args.repeats)
        before = model_runs[-1] if model_runs and key != next(iter(setups)) else model_only()
        out["ffcv_e2e"] = time_e2e(embed, fl)
        out["torch_e2e"] = time_e2e(embed, tl)
        after = model_only()
        # the machine is shared: compare each end-to-end run with the model-only runs right around it
        ref = (before["images_per_s"] + after["images_per_s"]) / 2
        out["model_only"] = {"images_per_s": round(ref, 2), "before": before, "after": after}
        out["loader_speedup"] = round(out["ffcv_loader"]["images_per_s"] / out["torch_loader"]["images_per_s"], 2)
        out["ffcv_e2e_vs_model"] = round(out["ffcv_e2e"]["images_per_s"] / ref, 3)
        out["torch_e2e_vs_model"] = round(out["torch_e2e"]["images_per_s"] / ref, 3)
        res["datasets"][key] = out
        del fl, tl
    res["model_only_runs"] = model_runs
    res["model_only_images_per_s"] = statistics.median(r["images_per_s"] for r in model_runs)
    res["loadavg_end"] = loadavg()
    res["targets"] = {"loader_speedup>=2": all(d["loader_speedup"] >= 2 for d in res["datasets"].values()),
                      "ffcv_e2e_vs_model>=0.9": all(d["ffcv_e2e_vs_model"] >= 0.9 for d in res["datasets"].values())}

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    print(f"\nwrote {args.out}")


def table(res: dict[str, Any]) -> str:
    lines = [f"model {res['model']} @ {res['image_size']}px, batch {res['batch_size']}, {res['workers']} loader "
             f"workers, {res['torch_threads']} torch threads, {res['cores']} cores; load avg "
             f"{res['loadavg_start']} -> {res['loadavg_end']}",
             "",
             "| dataset | FFCV loader img/s | DataLoader img/s | speed-up | model only img/s | FFCV end-to-end img/s "
             "(vs model) | DataLoader end-to-end img/s (vs model) | FFCV first epoch (compile) s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, d in res["datasets"].items():
        lines.append(
            f"| {key}: {d['desc']} | {d['ffcv_loader']['images_per_s']:.0f} | {d['torch_loader']['images_per_s']:.0f} | "
            f"{d['loader_speedup']:.1f}x | {d['model_only']['images_per_s']:.1f} | "
            f"{d['ffcv_e2e']['images_per_s']:.1f} ({d['ffcv_e2e_vs_model']:.0%}) | "
            f"{d['torch_e2e']['images_per_s']:.1f} ({d['torch_e2e_vs_model']:.0%}) | "
            f"{d['ffcv_loader']['warmup_s']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
