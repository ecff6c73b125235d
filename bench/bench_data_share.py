"""Where FFCV starts to pay: the data path's share of one split's feature extraction, FFCV vs DataLoader.

``score()`` reads each split once. For a split of ``n`` Fashion-MNIST TRAIN images upscaled to ``S`` px, same run:

- DataLoader: the demo's own path (``iis_fast.data.fashion_mnist``: PIL upscale per item, 2 worker processes),
  one pass;
- FFCV: ``import ffcv`` (once per process), writing the raw ``.beton`` (once per dataset), the first pass over a
  new loader (numba pipeline compilation included: what a process pays once per split since loaders are held,
  see ``iis_fast.data.loaders``), and a second pass (steady state);
- the backbone floor: ``--model``'s representation forward alone over ``n`` images in the default extraction
  setting (measured on ``--floor-batches`` batches, scaled to ``n``).

Data share = loader time / (loader time + backbone floor): on a CPU the loader and the backbone share the cores,
so their times add. Written to ``bench/results/data_share.json``; ``bench/render_docs.py`` renders the table.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_data_share.py --sizes 3000:128 50000:224
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_pass(loader) -> tuple[float, int]:
    t = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["3000:128", "50000:224"], help="N:S pairs")
    ap.add_argument("--model", default="mobilenetv2_100")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--floor-batches", type=int, default=8)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default="bench/results/data_share.json")
    args = ap.parse_args()

    t = time.perf_counter()
    import ffcv  # noqa: F401
    import_ffcv_s = time.perf_counter() - t
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))
    from iis_fast.config import IISConfig
    from iis_fast.data.fashion_mnist import fashion_mnist_loaders
    from iis_fast.data.ffcv_writer import write_fashion_mnist
    from iis_fast.data.loaders import resolve_loader
    from iis_fast.features import representation_fn
    from iis_fast.models import create_model, preprocessing_config

    cfg = IISConfig()
    model = create_model(args.model, pretrained=True)
    pre = preprocessing_config(model)
    embed = representation_fn(model, dtype=cfg.extract_dtype, channels_last=cfg.channels_last)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_share_"))
    work.mkdir(parents=True, exist_ok=True)
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                       "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                             text=True).stdout.strip()},
           "command": "OMP_NUM_THREADS=2 .venv/bin/python bench/bench_data_share.py --sizes " + " ".join(args.sizes),
           "model": args.model, "extraction": f"{cfg.extract_dtype}, channels_last={cfg.channels_last}",
           "import_ffcv_s": import_ffcv_s, "sizes": []}
    for spec in args.sizes:
        n, size = (int(v) for v in spec.split(":"))
        row: dict = {"n": n, "image_size": size}
        x = torch.randn(args.batch_size, 3, size, size)
        embed(x[:2])
        t = time.perf_counter()
        for _ in range(args.floor_batches):
            embed(x)
        rate = args.floor_batches * args.batch_size / (time.perf_counter() - t)
        row["floor_images_per_s"] = rate
        row["floor_s"] = n / rate

        train, _ = fashion_mnist_loaders(n, 10, size, pre["mean"], pre["std"], batch_size=args.batch_size, seed=0,
                                         num_workers=args.workers)
        row["dataloader_s"], got = one_pass(train)
        assert got == n, (got, n)
        beton = work / f"fm_{n}_{size}.beton"
        t = time.perf_counter()
        idx = np.sort(np.asarray(train.dataset.indices)) if getattr(train.dataset, "indices", None) is not None \
            else np.arange(n)
        write_fashion_mnist("train", beton, indices=idx, image_size=size, write_mode="raw",
                            num_workers=args.workers, progress=False)
        row["ffcv_write_s"] = time.perf_counter() - t
        row["beton_bytes"] = beton.stat().st_size
        loader = resolve_loader(beton, image_size=size, mean=pre["mean"], std=pre["std"],
                                batch_size=args.batch_size, device="cpu", num_workers=args.workers)
        row["ffcv_first_pass_s"], _ = one_pass(loader)
        row["ffcv_steady_pass_s"], _ = one_pass(loader)
        for k in ("dataloader", "ffcv_first_pass", "ffcv_steady_pass"):
            row[f"{k}_share"] = row[f"{k}_s"] / (row[f"{k}_s"] + row["floor_s"])
        row["faster_at_this_size"] = "ffcv" if row["ffcv_first_pass_s"] + import_ffcv_s < row["dataloader_s"] \
            else "dataloader"
        out["sizes"].append(row)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        beton.unlink()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(render_markdown(out))


def render_markdown(res: dict) -> str:
    """The docs table of a ``data_share.json``."""
    m = res["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
             f"git {m['git']}. Model {res['model']} ({res['extraction']}); `import ffcv` took "
             f"{res['import_ffcv_s']:.1f} s once per process.", "", f"Command: `{res['command']}`", "",
             "| split | backbone floor s | DataLoader s (share) | FFCV first pass s (share) | FFCV steady pass s "
             "(share) | .beton write s | faster for one pass |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in res["sizes"]:
        lines.append(f"| {r['n']:,} images at {r['image_size']} px | {r['floor_s']:.1f} | "
                     f"{r['dataloader_s']:.1f} ({r['dataloader_share']:.0%}) | "
                     f"{r['ffcv_first_pass_s']:.1f} ({r['ffcv_first_pass_share']:.0%}) | "
                     f"{r['ffcv_steady_pass_s']:.1f} ({r['ffcv_steady_pass_share']:.0%}) | "
                     f"{r['ffcv_write_s']:.1f} | {r['faster_at_this_size']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
