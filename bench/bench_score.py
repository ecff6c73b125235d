"""One checkpoint's end-to-end ``score()`` next to its backbone floor, per stage and per extraction setting.

For each extraction setting (fp32 NCHW = the plain path; fp32 channels-last; bf16 channels-last; bf16 channels-last
with BatchNorm folded into the convolutions, the default on this CPU) the same run:

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
    "fp32 NCHW (plain)": dict(extract_dtype="float32", channels_last=False, fold_bn=False),
    "fp32 channels-last": dict(extract_dtype="float32", channels_last=True, fold_bn=False),
    "bf16 channels-last": dict(extract_dtype="bfloat16", channels_last=True, fold_bn=False),
    "bf16 channels-last, BN folded": dict(extract_dtype="bfloat16", channels_last=True, fold_bn=True),
}
#: score()'s default extraction on this CPU (native bf16): the summary's demo rows use it.
DEFAULT_SETTING = "bf16 channels-last, BN folded"


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
    embed = representation_fn(model, dtype=setting["extract_dtype"], channels_last=setting["channels_last"],
                              fold_bn=setting["fold_bn"])
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
    kw = dict(image_size=args.image_size, progress=False, cache_dir=cache, extract_batch_size=args.batch,
              backend="auto", **setting)
    r = score(model, train, eval_loader=ev, **kw)                 # the timed checkpoint: one grid, as by default
    wall = time.perf_counter() - t0
    # the IIS change between settings, told from seed noise: the mean of R grids on the now cached features
    mean = score(model, train, eval_loader=ev, repeats=args.iis_repeats, **kw) if args.iis_repeats > 1 else r
    n_el = 0
    root = FeatureCache(cache).root
    for meta in root.glob("*/meta.json"):
        info = json.loads(meta.read_text()).get("info", {})
        if info.get("kind") == "elements":
            n_el = int(np.load(meta.parent / "labels.npy", mmap_mode="r").shape[0])
    t = r.timings
    return {"wall_s": wall, "iis": mean.iis, "iis_sd": mean.uncertainty.get("iis_sd"), "repeats": args.iis_repeats,
            "iis_one_grid": r.iis,
            "acc_std": r.acc_std, "acc": r.acc, "n_elements": n_el,
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
    ap.add_argument("--floor-batches", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--repeats", type=int, default=2, help="floor passes per batch size (the best is kept)")
    ap.add_argument("--iis-repeats", type=int, default=1, help="score()'s repeats: IIS as the mean of this many "
                    "grids, so that the IIS change between settings can be told from the grids' seed noise")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--out", default="bench/results/score_floor.json")
    ap.add_argument("--trajectory", default=None, help="per-checkpoint table instead: the folder of "
                    "`iis-fast make-checkpoints` (scored with --n-train/--n-eval)")
    ap.add_argument("--every", type=int, default=5, help="with --trajectory: every k-th checkpoint")
    ap.add_argument("--native-model", default=None, help="per-checkpoint table: also this pretrained model at its "
                    "native input size")
    ap.add_argument("--native-n-train", type=int, default=600)
    ap.add_argument("--native-n-eval", type=int, default=300)
    ap.add_argument("--native-images-per-class", type=int, default=10)
    ap.add_argument("--table-out", default="bench/results/score_checkpoints.json")
    args = ap.parse_args()
    if args.trajectory or args.native_model:
        return main_table(args)

    import iis_fast.models as M
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                             text=True).stdout.strip()},
           "command": "OMP_NUM_THREADS=2 .venv/bin/python bench/bench_score.py " + " ".join(
               f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
               for k, v in vars(args).items() if k not in ("out", "settings", "trajectory", "every", "table_out")
               and not k.startswith("native")) + ("" if args.settings == list(SETTINGS) else
                                                  " --settings " + " ".join(f'"{s}"' for s in args.settings)),
           "args": vars(args), "matmul_gflops": {"start": matmul_gflops()}, "models": {},
           "loadavg": [os.getloadavg()[0]]}
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
        plain = res["settings"].get("fp32 NCHW (plain)")          # absent when only some settings were run
        base = plain["iis"] if plain else None
        for label, r in res["settings"].items():
            n_img = args.n_train + args.n_eval + r["n_elements"]
            r["images_embedded"] = n_img
            r["floor_s"] = n_img / best_rate
            r["floor_same_setting_s"] = n_img / max(res["floor"][label].values())
            r["end_to_end_over_floor"] = r["wall_s"] / r["floor_s"]
            r["iis_change_vs_plain"] = r["iis"] - base if base is not None else None
        out["models"][name] = res
    out["matmul_gflops"]["end"] = matmul_gflops()
    out["loadavg"].append(os.getloadavg()[0])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(render_markdown(out))


def _machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True).stdout.strip()}


def main_table(args) -> None:
    """The per-checkpoint tables (trajectory and/or pretrained backbone at its native size) -> ``--table-out``."""
    cmd = "OMP_NUM_THREADS=2 .venv/bin/python bench/bench_score.py"
    if args.trajectory:
        cmd += f" --trajectory CKPTS --every {args.every} --n-train {args.n_train} --n-eval {args.n_eval}"
    if args.native_model:
        cmd += (f" --native-model {args.native_model} --native-n-train {args.native_n_train} "
                f"--native-n-eval {args.native_n_eval} --native-images-per-class {args.native_images_per_class}")
    cmd += f" --floor-images {args.floor_images}"
    table = Path(args.table_out)       # a part not measured in this run keeps its earlier measurement
    out = {**(json.loads(table.read_text()) if table.exists() else {}), "machine": _machine()}
    for part, build, wanted in (("pretrained", pretrained_table, args.native_model),
                                ("trajectory", trajectory_table, args.trajectory)):
        if wanted:
            load0 = os.getloadavg()[0]
            out[part] = build(args)
            out[part]["measured"] = {"command": cmd, "git": out["machine"]["git"],
                                     "loadavg": [load0, os.getloadavg()[0]]}
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(json.dumps(out, indent=1))
    print(render_checkpoints_markdown(out))


def iis_of(r: dict) -> str:
    """How the table's IIS was computed: one grid, or the mean of R grids with their standard deviation."""
    s = next(iter(r["settings"].values()))
    return f" (mean of {s['repeats']} grids ± sd)" if s.get("repeats", 1) > 1 else ""


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
                  f"| images embedded | IIS{iis_of(r)} | IIS change vs plain |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label, s in r["settings"].items():
            lines.append(f"| {label} | {s['wall_s']:.1f} | {s['floor_s']:.1f} | {s['end_to_end_over_floor']:.2f}x "
                         f"| {s['extract_s']:.1f} | {s['concepts_s']:.1f} | {s['train_s']:.1f} "
                         f"| {s['images_embedded']} | {s['iis']:.4f}"
                         + (f" ± {s['iis_sd']:.4f}" if s.get("iis_sd") is not None else "") + " | "
                         + (f"{s['iis_change_vs_plain']:+.4f} |" if s["iis_change_vs_plain"] is not None
                            else "not run |"))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------ the per-checkpoint table
def _stage_row(r, n_train: int, n_eval: int, n_el: int, rate: float) -> dict:
    """One checkpoint's stages next to their backbone floors (images of the stage / the floor's images/s)."""
    t = r.timings
    row = {"wall_s": None, "iis": r.iis, "acc_std": r.acc_std, "n_elements": n_el,
           "extract_s": t.get("extract_train", 0) + t.get("extract_eval", 0) + t.get("fingerprint_train", 0)
           + t.get("fingerprint_eval", 0),
           "concepts_s": t.get("concepts", 0), "train_s": t.get("train", 0) + t.get("validate", 0),
           "model_s": t.get("model", 0), "floor_images_per_s": rate,
           "extract_floor_s": (n_train + n_eval) / rate, "concepts_floor_s": n_el / rate}
    row["floor_s"] = row["extract_floor_s"] + row["concepts_floor_s"]
    return row


def _fastest_rate(model, size: int, batches: list[int], n_images: int, repeats: int) -> tuple[float, str, int]:
    """The fastest (images/s, setting, batch) of the representation forward over the settings and batches."""
    best = (0.0, "", 0)
    for label in ("fp32 channels-last", "bf16 channels-last", DEFAULT_SETTING):
        for b in batches:
            rate = floor_rate(model, size, SETTINGS[label], b, n_images, repeats)
            best = max(best, (rate, label, b))
    return best


def _elements_in(cache_dir: str) -> int:
    from iis_fast.features import FeatureCache
    for meta in FeatureCache(cache_dir).root.glob("*/meta.json"):
        if json.loads(meta.read_text()).get("info", {}).get("kind") == "elements":
            return int(np.load(meta.parent / "labels.npy", mmap_mode="r").shape[0])
    return 0


def _score_checkpoint(model, loaders, size: int, cache_dir: str, args, n_train: int, n_eval: int,
                      batches: list[int], **options) -> dict:
    """score() one model from ``cache_dir`` (features of this model absent; element images possibly there), then
    its floor in the same breath."""
    from iis_fast.score import score
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = score(model, loaders[0], eval_loader=loaders[1], image_size=size, progress=False, cache_dir=cache_dir,
              backend="auto", **options)
    wall = time.perf_counter() - t0
    rate, label, b = _fastest_rate(model, size, batches, args.floor_images, 1)
    n_el = _elements_in(cache_dir)
    row = _stage_row(r, n_train, n_eval, n_el, rate)
    row.update(wall_s=wall, floor_setting=label, floor_batch=b, end_to_end_over_floor=wall / row["floor_s"],
               extract_over_floor=row["extract_s"] / row["extract_floor_s"],
               concepts_over_floor=row["concepts_s"] / row["concepts_floor_s"],
               loadavg=[load0, os.getloadavg()[0]])
    return row


def _drop_features(cache_dir: str) -> None:
    """Keep only the element-image entries of ``cache_dir``: what a new checkpoint of the same data finds there."""
    import shutil
    from iis_fast.features import FeatureCache
    for meta in FeatureCache(cache_dir).root.glob("*/meta.json"):
        if json.loads(meta.read_text()).get("info", {}).get("kind") != "element_images":
            shutil.rmtree(meta.parent)


def trajectory_table(args) -> dict:
    """Every ``--every``-th checkpoint of the small-CNN trajectory, scored one after another from one cache (as a
    sweep worker does: the first builds the element images, the rest read them), each with its own floor."""
    import iis_fast.models as M
    from iis_fast.data.fashion_mnist import fashion_mnist_loaders
    from iis_fast.sweeps import parse_checkpoints
    specs = parse_checkpoints(args.trajectory, arch="iis_smallcnn")
    picked = specs[::args.every]
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for spec in picked:
            model = M.create_model(spec.model, checkpoint=spec.path).eval()
            pre = M.preprocessing_config(model)
            size = int(pre["input_size"][-1])
            loaders = fashion_mnist_loaders(args.n_train, args.n_eval, size, pre["mean"], pre["std"],
                                            batch_size=100, seed=0)
            row = _score_checkpoint(model, loaders, size, cache, args, args.n_train, args.n_eval, [256, 1024])
            row.update(step=spec.step, test_acc=float(spec.meta.get("test_acc", "nan")), image_size=size)
            rows.append(row)
            print("trajectory step", spec.step, {k: round(v, 3) if isinstance(v, float) else v
                                                 for k, v in row.items() if k != "loadavg"}, flush=True)
    return {"model": picked[0].model if picked else None, "checkpoints": len(specs), "every": args.every,
            "n_train": args.n_train, "n_eval": args.n_eval, "rows": rows}


def pretrained_table(args) -> dict:
    """A pretrained backbone at its native input size: from a cold cache, then as a later checkpoint of the same
    data would run (a cache holding only the element images)."""
    import iis_fast.models as M
    from iis_fast.data.fashion_mnist import fashion_mnist_loaders
    model = M.create_model(args.native_model, pretrained=True).eval()
    pre = M.preprocessing_config(model)
    size = int(pre["input_size"][-1])
    loaders = fashion_mnist_loaders(args.native_n_train, args.native_n_eval, size, pre["mean"], pre["std"],
                                    batch_size=100, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold cache", "element images cached"):
            if rows:
                _drop_features(cache)
            row = _score_checkpoint(model, loaders, size, cache, args, args.native_n_train, args.native_n_eval,
                                    [8, 16, 32, 64], images_per_class=args.native_images_per_class)
            row.update(run=label, image_size=size)
            rows.append(row)
            print(args.native_model, label, {k: round(v, 3) if isinstance(v, float) else v
                                             for k, v in row.items() if k != "loadavg"}, flush=True)
    return {"model": args.native_model, "image_size": size, "gflops_per_image": model_gflops(model, size),
            "n_train": args.native_n_train, "n_eval": args.native_n_eval,
            "images_per_class": args.native_images_per_class, "rows": rows}


def render_checkpoints_markdown(res: dict) -> str:
    """The docs' per-checkpoint tables of a ``score_checkpoints.json``."""
    m = res["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']} (a shared "
             "machine: each row's floor is measured right after its score(), so the ratios hold).", ""]

    def measured(part: dict) -> list[str]:
        w = part["measured"]
        return [f"Measured at git {w['git']}, load average {w['loadavg'][0]:.1f} at the start, {w['loadavg'][1]:.1f} "
                f"at the end: `{w['command']}`", ""]
    head = ("| end-to-end s | floor s | **end-to-end / floor** | extract s (/ floor) | concepts s (/ floor) | heads s "
            "| elements | IIS |")
    rule = "|---:|---:|---:|---:|---:|---:|---:|---:|"

    def cells(r: dict) -> str:
        return (f"| {r['wall_s']:.1f} | {r['floor_s']:.2f} | **{r['end_to_end_over_floor']:.2f}x** "
                f"| {r['extract_s']:.2f} ({r['extract_over_floor']:.1f}x) "
                f"| {r['concepts_s']:.2f} ({r['concepts_over_floor']:.1f}x) | {r['train_s']:.2f} "
                f"| {r['n_elements']} | {r['iis']:.4f} |")
    t = res.get("trajectory")
    if t:
        r0 = t["rows"][0]
        lines += [f"**{t['model']} trajectory**: every {t['every']}th of its {t['checkpoints']} checkpoints "
                  f"({len(t['rows'])} scored), {t['n_train']} TRAIN / {t['n_eval']} TEST Fashion-MNIST images at "
                  f"{r0['image_size']} px, one cache as in a sweep worker (the first checkpoint builds the element "
                  f"images, the others read them). Floor: {r0['floor_setting']}, batch {r0['floor_batch']}.", "",
                  *measured(t), "| step | test acc " + head, "|---:|---:" + rule]
        lines += [f"| {r['step']} | {r['test_acc']:.3f} " + cells(r) for r in t["rows"]]
        median, _ = trajectory_median(t)
        lines += ["", f"Median end-to-end / floor after the first checkpoint: "
                      f"{median['end_to_end_over_floor']:.2f}x.", ""]
    p = res.get("pretrained")
    if p:
        r0 = p["rows"][0]
        lines += [f"**{p['model']} at its native {p['image_size']} px** ({p['gflops_per_image']:.2f} GFLOP per "
                  f"image), {p['n_train']} TRAIN / {p['n_eval']} TEST Fashion-MNIST images, {p['images_per_class']} "
                  f"concept-source images per class. Floor: "
                  f"{r0['floor_setting']}, batch {r0['floor_batch']} ({r0['floor_images_per_s']:.0f} img/s).", "",
                  *measured(p), "| run " + head, "|---" + rule]
        lines += [f"| {r['run']} " + cells(r) for r in p["rows"]]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def trajectory_median(t: dict) -> tuple[dict, int]:
    """The trajectory row with the median end-to-end / floor after the first checkpoint (which alone builds the
    element images), and how many rows that median is over."""
    rows = sorted(t["rows"][1:] or t["rows"], key=lambda r: r["end_to_end_over_floor"])
    return rows[len(rows) // 2], len(rows)


def render_summary_markdown(floor: dict, table: dict) -> str:
    """The README's summary: end-to-end / floor per stage for the demo models (default extraction), the
    trajectory (median after its first checkpoint) and the pretrained backbone at 224 px (element images cached)."""
    lines = ["| checkpoint | images at px | end-to-end s | floor s | **end-to-end / floor** | extract / floor "
             "| concepts / floor |", "|---|---|---:|---:|---:|---:|---:|"]
    default = DEFAULT_SETTING
    for name, r in floor["models"].items():
        s = r["settings"].get(default)
        if not s:
            continue
        n_el = s["n_elements"]
        rate = r["fastest"]["images_per_s"]
        n_tv = s["images_embedded"] - n_el
        lines.append(f"| {name}, demo data ({default}) | {s['images_embedded']} at {floor['args']['image_size']} "
                     f"| {s['wall_s']:.1f} | {s['floor_s']:.1f} | **{s['end_to_end_over_floor']:.2f}x** "
                     f"| {s['extract_s'] / (n_tv / rate):.2f}x | {s['concepts_s'] / (n_el / rate):.2f}x |")
    t = table.get("trajectory")
    if t and t["rows"]:
        r, n = trajectory_median(t)
        lines.append(f"| {t['model']} trajectory, median of {n} checkpoints (step {r['step']}) "
                     f"| {t['n_train'] + t['n_eval'] + r['n_elements']} at {r['image_size']} | {r['wall_s']:.1f} "
                     f"| {r['floor_s']:.2f} | **{r['end_to_end_over_floor']:.2f}x** | {r['extract_over_floor']:.2f}x "
                     f"| {r['concepts_over_floor']:.2f}x |")
    p = table.get("pretrained")
    if p and p["rows"]:
        r = p["rows"][-1]
        lines.append(f"| {p['model']} pretrained, {r['run']} | {p['n_train'] + p['n_eval'] + r['n_elements']} at "
                     f"{p['image_size']} | {r['wall_s']:.1f} | {r['floor_s']:.1f} "
                     f"| **{r['end_to_end_over_floor']:.2f}x** | {r['extract_over_floor']:.2f}x "
                     f"| {r['concepts_over_floor']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
