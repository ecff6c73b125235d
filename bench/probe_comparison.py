"""Small-scale How-to-Probe comparison: GridPG per (probe, loss, method) and accuracy on Fashion-MNIST grids.

    python bench/probe_comparison.py            # ~5-10 min on 2 busy CPU cores; same as `iis-fast probe`
    python bench/probe_comparison.py --quick    # ~2 min smoke version

Writes bench/results/probe_comparison.{json,md,png}. Sizes (defaults): ImageNet MobileNetV2 (installed
package weights), 64 px Fashion-MNIST cells (2x2 last-stage maps), 1000 train / 500 eval images, probes with
hidden width 512, 10 epochs, 6 grids of 3x3 (192 px) from 500 other test images, IG with 8 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from iis_fast.probing.compare import format_comparison, run_comparison  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kw = dict(n_train=300, n_eval=200, n_pool=300, epochs=4, hidden=64, n_grids=2) if args.quick else {}
    name = "probe_comparison_quick" if args.quick else "probe_comparison"
    os.makedirs(args.out, exist_ok=True)
    res = run_comparison(png=os.path.join(args.out, name + ".png"), **kw)
    table = format_comparison(res)
    print(table)
    print(json.dumps(res["timings"]))
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(table + "\n\n" + json.dumps(res["config"]) + "\n" + json.dumps(res["timings"]) + "\n")


if __name__ == "__main__":
    main()
