"""Attribution maps/s per method: batched (all targets of an image from one forward) vs one target at a time.

    python bench/bench_attribution.py                      # 3x3 grids of 32 px cells (96 px) and 64 px (192 px)
    python bench/bench_attribution.py --cells 64 --grids 2

Backbone: ImageNet MobileNetV2 (timm ``mobilenetv2_100``), a linear probe (and a 2-layer B-cos probe for the
``bcos`` method) on its last stage; every grid image is explained for its 9 cell classes. Both paths compute
the same maps (checked here too). Writes bench/results/attribution.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from iis_fast.probing import ProbedModel, attribute, make_head  # noqa: E402
from iis_fast.probing.attribution import frozen_eval  # noqa: E402


def _time(fn, repeats: int) -> float:
    fn()                                    # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, nargs="+", default=[32, 64], help="cell side(s) in px (grid = 3 x cell)")
    ap.add_argument("--grids", type=int, default=2, help="grid images per measurement (9 targets each)")
    ap.add_argument("--methods", nargs="+", default=["ixg", "gradcam", "ig", "bcos"])
    ap.add_argument("--ig-steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (best is kept) after one warm-up")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "attribution.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from iis_fast.models import create_model
    backbone = create_model("mobilenetv2_100", pretrained=True)
    d = backbone.num_features
    heads = {"linear": make_head("linear", d, 10).eval(), "bcos2": make_head("bcos2", d, 10, hidden=512).eval()}
    rows = []
    for cell in args.cells:
        x = torch.randn(args.grids, 3, 3 * cell, 3 * cell)
        targets = torch.stack([torch.randperm(10)[:9] for _ in range(args.grids)])
        for m in args.methods:
            model = ProbedModel(backbone, heads["bcos2" if m == "bcos" else "linear"])
            n_maps = targets.numel()
            out: dict = {}
            tb = _time(lambda: out.__setitem__("b", attribute(model, x, targets, m, ig_steps=args.ig_steps)),
                       args.repeats)
            to = _time(lambda: out.__setitem__("o", attribute(model, x, targets, m, ig_steps=args.ig_steps,
                                                              batched=False)), max(1, args.repeats - 1))
            err = float((out["b"] - out["o"]).abs().max() / out["o"].abs().max().clamp_min(1e-30))
            row = {"method": m, "grid_px": 3 * cell, "maps": n_maps, "batched_maps_per_s": n_maps / tb,
                   "one_at_a_time_maps_per_s": n_maps / to, "speedup": to / tb, "max_rel_diff": err,
                   "head": "bcos2" if m == "bcos" else "linear"}
            if m == "ixg":
                # What batching cannot share: every target needs its own backward through the backbone (a
                # distinct vector-Jacobian product). Time the batched path's forward alone; the rest of the batched
                # time is the T backward passes, and one-at-a-time / that is the speed-up even a free forward gives.
                xg = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
                with frozen_eval(model):                    # as attribute() runs it: no parameter gradients
                    tf = _time(lambda: model(xg), args.repeats)
                row["batched_forward_s"], row["batched_backward_s"] = tf, max(tb - tf, 1e-9)
                row["bound_if_forward_free"] = to / row["batched_backward_s"]
            rows.append(row)
            print(f"{m:<8} {3 * cell:>4}px  batched {row['batched_maps_per_s']:8.2f} maps/s   one-at-a-time "
                  f"{row['one_at_a_time_maps_per_s']:8.2f} maps/s   x{row['speedup']:.1f}   (rel diff {err:.1e})"
                  + (f"   backward passes {100 * row['batched_backward_s'] / tb:.0f}% of batched time, bound with a "
                     f"free forward x{row['bound_if_forward_free']:.1f}" if m == "ixg" else ""), flush=True)
    res = {"rows": rows, "config": {**vars(args), "backbone": "mobilenetv2_100 (ImageNet, timm)", "targets": 9},
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0]}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
