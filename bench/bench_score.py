"""One checkpoint's end-to-end ``score()`` next to its backbone floor, per stage and per extraction setting.

For each extraction setting (fp32 NCHW = the plain path; fp32 channels-last; bf16 channels-last) the same run:

1. ``score()`` from a cold feature cache on the demo data (Fashion-MNIST, ``--n-train`` TRAIN / ``--n-eval`` TEST
   images at ``--image-size`` px, the full default grid): wall time, per-stage time, IIS and acc_std;
2. the **backbone floor**: the same model's forward alone (no loader, no hooks beyond the representation) over
   exactly as many images as ``score()`` embeds (train + eval + concept elements), in the fastest setting and batch
   size measured in this run. Throughput is measured on ``--floor-images`` images (best of ``--repeats``) and
   scaled to the image count;
3. the model's FLOPs per image (``torch.utils.flop_counter``) against the machine's fp32 matmul throughput
   measured in the same run, for how close the floor itself is to the hardware.

Settings are interleaved; the IIS change of each setting against fp32 NCHW is what decides the defaults
(docs/throughput.md). Writes ``bench/results/score_floor.json``; ``bench/render_docs.py`` renders it.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_score.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SETTINGS = {
    "fp32 NCHW (plain)": dict(extract_dtype="float32", channels_last=False),
    "fp32 channels-last": dict(extract_dtype="float32", channels_last=True),
    "bf16 channels-last": dict(extract_dtype="bfloat16", channels_last=True),
}


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def model_gflops(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, 3, size, size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.forward_head(model.forward_features(x), pre_logits=True)
    return fc.get_total_flops() / 1e9


def floor_rate(model: torch.nn.Module, size: int, setting: dict, batch: int, n_images: int, repeats: int) -> float:
    """Images/s of the representation forward alone, best of ``repeats`` passes over ``n_images`` images."""
    from iis_fast.features import representation_fn
    embed = representation_fn(model, dtype=setting["extract_dtype"], channels_last=setting["channels_last"])
    x = torch.randn(batch, 3, size, size)
    embed(x[:2])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(max(1, n_images // batch)):
            embed(x)
        best = min(best, time.perf_counter() - t)
    model.to(memory_format=torch.contiguous_format)
    return max(1, n_images // batch) * batch / best


def run_score(name: str, setting: dict, args, cache: str) -> dict:
    from iis_fast.data.fashion_mnist import fashion_mnist_loaders
    from iis_fast.features import FeatureCache
    from iis_fast.models import create_model, preprocessing_config
    from iis_fast.score import score
    t0 = time.perf_counter()
    model = create_model(name, pretrained=True)
    pre = preprocessing_config(model)
    train, ev = fashion_mnist_loaders(args.n_train, args.n_eval, args.image_size, pre["mean"], pre["std"],
                                      batch_size=100, seed=0)
    r = score(model, train, eval_loader=ev, image_size=args.image_size, progress=False, cache_dir=cache,
              extract_batch_size=args.batch, backend="auto", **setting)
    wall = time.perf_counter() - t0
    n_el = 0
    root = FeatureCache(cache).root
    for meta in root.glob("*/meta.json"):
        info = json.loads(meta.read_text()).get("info", {})
        if info.get("kind") == "elements":
            n_el = int(np.load(meta.parent / "labels.npy", mmap_mode="r").shape[0])
    t = r.timings
    return {"wall_s": wall, "iis": r.iis, "acc_std": r.acc_std, "acc": r.acc, "n_elements": n_el,
            "extract_s": t.get("extract_train", 0) + t.get("extract_eval", 0),
            "fingerprint_s": t.get("fingerprint_train", 0) + t.get("fingerprint_eval", 0),
            "concepts_s": t.get("concepts", 0), "train_s": t.get("train", 0), "model_s": t.get("model", 0),
            "timings": t, "backend": r.backend}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mobilenetv2_100"])
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64, help="extraction batch size of score()")
    ap.add_argument("--floor-images", type=int, default=512)
    ap.add_argument("--floor-batches", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--out", default="bench/results/score_floor.json")
    args = ap.parse_args()

    import iis_fast.models as M
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                             text=True).stdout.strip()},
           "command": "OMP_NUM_THREADS=2 .venv/bin/python bench/bench_score.py " + " ".join(
               f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
               for k, v in vars(args).items() if k not in ("out", "settings", "models")),
           "args": vars(args), "matmul_gflops": {"start": matmul_gflops()}, "models": {}}
    for name in args.models:
        model = M.create_model(name, pretrained=True).eval()
        res: dict = {"gflops_per_image": model_gflops(model, args.image_size), "settings": {}, "floor": {}}
        for label in args.settings:                                  # interleaved: floor, then score, per setting
            setting = SETTINGS[label]
            rates = {b: floor_rate(model, args.image_size, setting, b, args.floor_images, args.repeats)
                     for b in args.floor_batches}
            res["floor"][label] = {str(b): r for b, r in rates.items()}
            with tempfile.TemporaryDirectory() as cache:
                res["settings"][label] = run_score(name, setting, args, cache)
            print(label, {k: round(v, 4) if isinstance(v, float) else v for k, v in res["settings"][label].items()
                          if k not in ("timings", "acc")}, "floor img/s", {b: round(r, 1) for b, r in rates.items()},
                  flush=True)
        best_label, best_b, best_rate = max(((lbl, b, r) for lbl, d in res["floor"].items() for b, r in d.items()),
                                            key=lambda t: t[2])
        res["fastest"] = {"setting": best_label, "batch": int(best_b), "images_per_s": best_rate}
        base = res["settings"][args.settings[0]]["iis"]
        for label, r in res["settings"].items():
            n_img = args.n_train + args.n_eval + r["n_elements"]
            r["images_embedded"] = n_img
            r["floor_s"] = n_img / best_rate
            r["floor_same_setting_s"] = n_img / max(res["floor"][label].values())
            r["end_to_end_over_floor"] = r["wall_s"] / r["floor_s"]
            r["iis_change_vs_plain"] = r["iis"] - base
        out["models"][name] = res
    out["matmul_gflops"]["end"] = matmul_gflops()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(render_markdown(out))


def render_markdown(res: dict) -> str:
    """The README/docs table of a ``score_floor.json``."""
    m = res["machine"]
    bar = max(res["matmul_gflops"].values())
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, git "
             f"{m['git']}; fp32 matmul {bar:.0f} GFLOP/s (best of start/end of the run).", "",
             f"Command: `{res['command']}`", ""]
    for name, r in res["models"].items():
        f = r["fastest"]
        lines += [f"**{name}** ({r['gflops_per_image']:.2f} GFLOP per image at {res['args']['image_size']} px). "
                  f"Floor = its forward alone over the images score() embeds, fastest measured setting "
                  f"({f['setting']}, batch {f['batch']}: {f['images_per_s']:.0f} img/s = "
                  f"{f['images_per_s'] * r['gflops_per_image']:.0f} GFLOP/s, "
                  f"{100 * f['images_per_s'] * r['gflops_per_image'] / bar:.0f}% of matmul).", "",
                  "| extraction | end-to-end s | floor s | end-to-end / floor | extract s | concepts s | heads s "
                  "| images embedded | IIS | IIS change vs plain |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label, s in r["settings"].items():
            lines.append(f"| {label} | {s['wall_s']:.1f} | {s['floor_s']:.1f} | {s['end_to_end_over_floor']:.2f}x "
                         f"| {s['extract_s']:.1f} | {s['concepts_s']:.1f} | {s['train_s']:.1f} "
                         f"| {s['images_embedded']} | {s['iis']:.4f} | {s['iis_change_vs_plain']:+.4f} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    main()
