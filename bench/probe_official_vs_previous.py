"""Effect of the official How-to-Probe attribution forms against iis_fast's previous defaults, on the same grids.

    python bench/probe_official_vs_previous.py          # ~10 min on 2 busy CPU cores

Probes (linear, mlp2, bcos2 x ce, bce) are trained as in bench/probe_comparison.py (ImageNet MobileNetV2,
Fashion-MNIST at 64 px, 1000 train images, hidden 512, 10 epochs); one set of 3x3 grids (192 px) of test images
that every probe classifies correctly is shared by all probes. Per probe, on the same maps:

- Grad-CAM GridPG / entropy: official (last convolution = conv_head before its BN + ReLU6, no ReLU) vs previous
  (the final map, ReLU before upsampling);
- IG GridPG: official (50 Gauss-Legendre nodes, Gaussian smoothing) vs previous (20 midpoint nodes, 5x5 mean
  filter), on ``--ig-grids`` grids;
- IxG entropy: official (5x5 mean filter) vs previous (Gaussian);
- B-cos heads, IxG GridPG: plain gradients (official) vs explanation mode (previous).

Writes bench/results/probe_official_vs_previous.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from iis_fast.probing import attribute, entropy, grid_pointing_game, make_grids, probe  # noqa: E402


def render_markdown(results: dict) -> str:
    """The comparison as Markdown (rendered into docs/spec.md by bench/render_docs.py)."""
    c = results["config"]
    f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"ImageNet {c['model']}, Fashion-MNIST at {c['image_size']} px, {c['n_train']} training images, hidden "
             f"width {c['hidden']}, {c['epochs']} epochs, seed {c['seed']}; the same {c['n_grids']} grids of 3x3 "
             f"({c['grid_image_size']} px, images every probe classifies correctly) for every probe and form, i.e. "
             f"{c['maps_per_probe']} maps per probe (IG: {c['ig_grids'] * 9} maps). Official → previous default "
             "(`bench/probe_official_vs_previous.py`, `bench/results/probe_official_vs_previous.json`):", "",
             "| probe | accuracy | Grad-CAM GridPG | Grad-CAM entropy | IxG entropy | IG GridPG | IxG GridPG, plain → "
             "explanation mode |", "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        g, x, ig = r["gradcam"], r["ixg"], r.get("ig")
        lines.append(
            f"| {r['probe']} | {r['accuracy']:.3f} | {f(g['gridpg_official'])} → {f(g['gridpg_previous'])} | "
            f"{g['entropy_official']:.2f} → {g['entropy_previous']:.2f} | {x['entropy_official']:.2f} → "
            f"{x['entropy_previous']:.2f} | "
            + (f"{f(ig['gridpg_official'])} → {f(ig['gridpg_previous'])}" if ig else "–") + " | "
            + (f"{f(x['gridpg'])} → {f(x['gridpg_explanation_mode'])}" if "gridpg_explanation_mode" in x else "–")
            + " |")
    igs = [r["ig"] for r in results["rows"] if "ig" in r]
    if igs:
        lines += ["", "IG, official → previous, split into its two changes: 50 Gauss-Legendre nodes instead of 20 midpoint "
                  "nodes move the maps by at most "
                  f"{max(i['max_rel_diff_50gl_vs_20mid'] for i in igs):.1%} of their largest value; with the mean filter "
                  "instead of the Gaussian the official maps would score GridPG "
                  + ", ".join(f"{r['probe']} {r['ig']['gridpg_50gl_mean5']:.3f}" for r in results["rows"] if "ig" in r)
                  + "."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-grids", type=int, default=6)
    ap.add_argument("--ig-grids", type=int, default=2, help="grids for the (slow) IG comparison")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "probe_official_vs_previous.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from iis_fast.data.fashion_mnist import FashionMNIST, load_fashion_mnist
    from iis_fast.data.sampling import stratified_subset
    from iis_fast.models import create_model, preprocessing_config

    t0 = time.perf_counter()
    backbone = create_model("mobilenetv2_100", pretrained=True)
    pre = preprocessing_config(backbone)
    _, test_labels = load_fashion_mnist("test")
    _, train_labels = load_fashion_mnist("train")
    tr_idx, te_idx = stratified_subset(train_labels, 1000, 0), stratified_subset(test_labels, 1000, 0)
    mk = lambda split, ii: torch.utils.data.DataLoader(  # noqa: E731
        FashionMNIST(split, 64, pre["mean"], pre["std"], indices=ii), batch_size=100)
    res = probe(backbone, mk("train", tr_idx), mk("test", te_idx[:500]), heads=("linear", "mlp2", "bcos2"),
                losses=("ce", "bce"), epochs=10, lr={"linear": 3e-2, "default": 1e-3}, batch_size=128, hidden=512,
                seed=0)
    batches = list(mk("test", te_idx[500:]))
    px, py = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    models = {k: res.model_with_head(k) for k in res.heads}
    grids = make_grids(px, py, args.n_grids, 3, 0, models=list(models.values()), threshold=0.0)
    x, tg = grids.images, grids.cell_labels
    cells = grids.cells
    mean = lambda v: float(v.float().mean())  # noqa: E731
    rows = []
    for k, m in models.items():
        row: dict = {"probe": k, "accuracy": res.accuracies[k]}
        off = attribute(m, x, tg, "gradcam")
        old = attribute(m, x, tg, "gradcam", gradcam_layer="features", gradcam_relu=True)
        row["gradcam"] = {"gridpg_official": mean(grid_pointing_game(off, cells, 3, "gradcam")),
                          "gridpg_previous": mean(grid_pointing_game(old, cells, 3, "gradcam")),
                          "entropy_official": mean(entropy(off)), "entropy_previous": mean(entropy(old))}
        ixg = attribute(m, x, tg, "ixg")
        row["ixg"] = {"gridpg": mean(grid_pointing_game(ixg, cells, 3, "ixg")),
                      "entropy_official": mean(entropy(ixg)),
                      "entropy_previous": mean(entropy(ixg, smoothing="gaussian"))}
        if k.startswith("bcos"):
            ixg_x = attribute(m, x, tg, "ixg", explanation_mode=True)
            row["ixg"]["gridpg_explanation_mode"] = mean(grid_pointing_game(ixg_x, cells, 3, "ixg"))
        n = args.ig_grids
        if n and (k.endswith("/bce") or k == "linear/ce"):
            ig_off = attribute(m, x[:n], tg[:n], "ig")
            ig_old = attribute(m, x[:n], tg[:n], "ig", ig_steps=20, ig_method="riemann_middle")
            row["ig"] = {"grids": n,
                         "gridpg_official": mean(grid_pointing_game(ig_off, cells[:n], 3, "ig")),
                         "gridpg_previous": mean(grid_pointing_game(ig_old, cells[:n], 3, "ig", smoothing="mean5")),
                         "gridpg_50gl_mean5": mean(grid_pointing_game(ig_off, cells[:n], 3, "ig", smoothing="mean5")),
                         "max_rel_diff_50gl_vs_20mid": float((ig_off - ig_old).abs().amax((2, 3)).div(
                             ig_off.abs().amax((2, 3))).max())}
        rows.append(row)
        print(json.dumps(row))
    out = {"rows": rows,
           "config": {"model": "mobilenetv2_100", "image_size": 64, "grid_image_size": 192, "n_grids": args.n_grids,
                      "maps_per_probe": args.n_grids * 9, "ig_grids": args.ig_grids, "grid_threshold": 0.0,
                      "n_train": 1000, "n_eval": 500, "epochs": 10, "hidden": 512, "seed": 0,
                      "torch_threads": torch.get_num_threads()},
           "seconds": time.perf_counter() - t0}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{out['seconds']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
