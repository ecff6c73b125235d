"""IIS per concept library, default and official mode, on the demo data; and the time of one end2end grid per backend.

    .venv/bin/python bench/bench_libraries.py                 # measure -> bench/results/libraries.json, render
    .venv/bin/python bench/bench_libraries.py --render-only   # re-render docs/spec.md §4 from the JSON

The demo data: MobileNetV2 (ImageNet weights), 2,000 Fashion-MNIST TRAIN / 1,000 TEST images at 128 px, the full
grid (M = 200, 8 sparsities x 3 lrs, 30 epochs). Rows:

- each library (prototype, cluster, end2end) in default mode and with ``reproduce="official"`` (docs/spec.md §1.9);
- single switches of the departures table (docs/spec.md §3), each alone on top of the defaults;
- the end2end grid (default mode) on every CPU backend: the seconds of grid training (features and elements come
  from the cache), with the FLOPs of its GEMMs and the seconds the same GEMMs take alone, which is how close the
  fused path gets to its floor.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "libraries.json"
DOC = ROOT / "docs" / "spec.md"
MODEL = "mobilenetv2_100"

#: (row name, library, options on top of the defaults)
RUNS: list[tuple[str, str, dict]] = [
    ("prototype", "prototype", {}),
    ("prototype official", "prototype", {"reproduce": "official"}),
    ("cluster", "cluster", {}),
    ("cluster official", "cluster", {"reproduce": "official"}),
    ("end2end", "end2end", {}),
    ("end2end official", "end2end", {"reproduce": "official"}),
    ("prototype elements=segments", "prototype", {"elements": "segments"}),
    ("prototype geometry=official", "prototype", {"element_geometry": "official"}),
    ("prototype selection=first", "prototype", {"prototype_selection": "first"}),
    ("end2end end2end_eval=stochastic", "end2end", {"end2end_eval": "stochastic"}),
]
END2END_BACKENDS = ("cpp", "torch", "reference")


def _demo(library: str, **options) -> tuple[dict, float]:
    from iis_fast.demo import run_demo
    (_, r, seconds), = run_demo(models=(MODEL,), progress=False, library=library, **options)
    return r.to_dict(), seconds


def end2end_gemm_floor(n_elements: int, dim: int, num_concepts: int, heads: int, batch: int, steps: int,
                       repeats: int = 3) -> dict:
    """FLOPs of the GEMMs an end2end grid cannot avoid and the seconds torch takes for them alone.

    Per step and head: x_b·C_hᵀ (forward), its two backward products (dC = daᵀ·x_b; dx is not needed) and the
    element-side backward dA = E·dPᵀ, an [E x D] x [D x M] product (done for all heads as one [E x D] x [D x H·M]).
    """
    g = torch.Generator().manual_seed(0)
    e = torch.randn(n_elements, dim, generator=g)
    x = torch.randn(batch, dim, generator=g)
    c = torch.randn(heads, num_concepts, dim, generator=g)
    dp = torch.randn(dim, heads * num_concepts, generator=g)
    da = torch.randn(heads, batch, num_concepts, generator=g)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(x, c.transpose(1, 2))
        torch.matmul(da.transpose(1, 2), x)
        e @ dp
        best = min(best, time.perf_counter() - t)
    flops_elem = 2.0 * n_elements * dim * num_concepts
    flops_x = 2 * 2.0 * batch * dim * num_concepts
    return {"flops_per_head_step_element_backward": flops_elem, "flops_per_head_step_x_side": flops_x,
            "flops_per_step": heads * (flops_elem + flops_x), "gemm_seconds_per_step": best,
            "gemm_seconds_grid": best * steps, "steps": steps}


def measure(out: Path = OUT) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    res: dict = {"model": MODEL, "data": "fashion-mnist demo (2000 train / 1000 test, 128 px)",
                 "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
                 "rows": [], "end2end_backends": []}
    for name, library, opts in RUNS:
        r, seconds = _demo(library, **opts)
        res["rows"].append({"row": name, "library": library, "options": opts, "iis": r["iis"],
                            "acc_std": r["acc_std"], "acc": r["acc"], "num_concepts": r["num_concepts"],
                            "backend": r["backend"], "seconds": seconds, "train_seconds": r["timings"].get("train"),
                            "config": r["config"]})
        print(f"{name:<36} IIS {r['iis']:.4f}  acc_std {r['acc_std']:.4f}  {seconds:.0f} s", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
    for backend in END2END_BACKENDS:
        r, seconds = _demo("end2end", backend=backend)
        res["end2end_backends"].append({"backend": backend, "iis": r["iis"], "train_seconds": r["timings"]["train"],
                                        "seconds": seconds})
        print(f"end2end [{backend}] IIS {r['iis']:.4f} grid {r['timings']['train']:.1f} s", flush=True)
        out.write_text(json.dumps(res, indent=1))
    # the GEMM floor of that grid: E elements, D = 1280, M = 200, 24 heads, batch 1024, 2 steps x 30 epochs
    from iis_fast.concepts.pipeline import ELEMENTS_CACHE_VERSION  # noqa: F401  (the same elements as the rows)
    e2e = next(r for r in res["rows"] if r["row"] == "end2end")
    n_el = min(e2e["config"]["max_elements"], _element_count())
    res["end2end_gemm_floor"] = end2end_gemm_floor(n_el, 1280, 200, 24, 1024, steps=2 * 30)
    res["end2end_gemm_floor"]["elements"] = n_el
    out.write_text(json.dumps(res, indent=1))
    return res


def _element_count() -> int:
    """Elements of the default library (patches and segments of the 100 concept-source images)."""
    from iis_fast.concepts import embed_concept_elements
    from iis_fast.data.fashion_mnist import fashion_mnist_loaders
    from iis_fast.features import extract
    train, _ = fashion_mnist_loaders(2000, 1000, 128, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), batch_size=100)
    ex = extract(lambda b: b.mean(dim=(2, 3)), train, "cpu", keep_per_class=10, progress=False)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    images01 = (ex.source_images * std + mean).clamp(0, 1)
    feats, _ = embed_concept_elements(lambda b: b.mean(dim=(2, 3)), images01, ex.source_labels, 128,
                                      (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), progress=False, n_jobs=-1,
                                      memo=True)
    return int(feats.shape[0])


def element_counts() -> dict:
    """Concept elements of the demo's 100 concept-source images: default (patches + segments of the preprocessed
    crop) and official (segments of the full-resolution 28 x 28 images)."""
    from iis_fast.concepts.elements import concept_source_indices
    from iis_fast.concepts.official import official_segment_masks
    from iis_fast.data.fashion_mnist import load_fashion_mnist
    from iis_fast.data.sampling import stratified_subset
    images, labels = load_fashion_mnist("train")
    idx = stratified_subset(labels, 2000, 0)
    src = concept_source_indices(labels[idx], 10)
    return {"default": _element_count(), "official": sum(len(official_segment_masks(images[idx][i])) for i in src)}


def render(res: dict) -> str:
    """docs/spec.md §4: IIS per library and mode, the single-switch rows, the end2end grid per backend."""
    rows = {r["row"]: r for r in res["rows"]}
    lines = ["| library | IIS default | IIS official | Δ official − default | acc_std |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for lib in ("prototype", "cluster", "end2end"):
        if lib in rows and f"{lib} official" in rows:
            d, o = rows[lib], rows[f"{lib} official"]
            lines.append(f"| {lib} | {d['iis']:.4f} | {o['iis']:.4f} | {o['iis'] - d['iis']:+.4f} | "
                         f"{d['acc_std']:.4f} |")
    lines += ["", "Single switches on top of the defaults (§3):", "",
              "| row | IIS | Δ vs the default of its library |", "| --- | ---: | ---: |"]
    for r in res["rows"]:
        if r["options"] and "reproduce" not in r["options"]:
            base = rows.get(r["library"])
            delta = f"{r['iis'] - base['iis']:+.4f}" if base else "—"
            lines.append(f"| {r['library']} {r['row'].split(' ', 1)[1]} | {r['iis']:.4f} | {delta} |")
    counts = res.get("element_counts")
    if counts and "end2end official" in rows and "end2end end2end_eval=stochastic" in rows:
        lines += ["", f"On the default elements, stochastic evaluation alone moves end2end's IIS by "
                  f"{rows['end2end end2end_eval=stochastic']['iis'] - rows['end2end']['iis']:+.4f}; the official row "
                  f"also learns from another element set: {counts['official']} segments of the 28-pixel source "
                  f"images (default: {counts['default']} patches and segments), about "
                  f"{counts['official'] / 200:.1f} per concept."]
    if res.get("end2end_backends"):
        lines += ["", "One end2end grid (24 heads each learning its own assignment, 30 epochs), seconds of grid "
                  f"training on {res['machine']['cpus']} CPU cores, shared with other jobs while measured (compare the "
                  "backends with each other, not with other tables):", "",
                  "| backend | grid seconds | IIS |", "| --- | ---: | ---: |"]
        for b in res["end2end_backends"]:
            lines.append(f"| {b['backend']} | {b['train_seconds']:.1f} | {b['iis']:.4f} |")
        f = res.get("end2end_gemm_floor")
        if f:
            cpp = next((b for b in res["end2end_backends"] if b["backend"] == "cpp"), None)
            lines += ["", f"E = {f['elements']} elements: the element-side backward costs "
                      f"{f['flops_per_head_step_element_backward'] / 1e9:.2f} GFLOP per head and step, the "
                      f"x-side products {f['flops_per_head_step_x_side'] / 1e9:.2f} GFLOP; the grid's GEMMs alone "
                      f"({f['flops_per_step'] / 1e9:.1f} GFLOP per step, {f['steps']} steps) take "
                      f"{f['gemm_seconds_grid']:.1f} s here"
                      + (f": {f['gemm_seconds_grid'] / cpp['train_seconds']:.0%} of the cpp grid's "
                         f"{cpp['train_seconds']:.0f} s, which is as close as the fused path gets to that floor (the "
                         "rest: per-head segment sums, softmax, LayerNorm and Adam over the [E x M] logits of every "
                         "head, the head kernels, evaluation)." if cpp else ".")]
    return "\n".join(lines)


def update_doc(res: dict, doc: Path = DOC) -> None:
    text = doc.read_text()
    block = "<!-- libraries:begin -->\n" + render(res) + "\n<!-- libraries:end -->"
    new, n = re.subn(r"<!-- libraries:begin -->.*?<!-- libraries:end -->", lambda _: block, text, flags=re.S)
    if n != 1:
        sys.exit(f"{doc}: no <!-- libraries:begin/end --> block")
    doc.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--render-only", action="store_true", help="re-render docs/spec.md from the JSON")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    res = json.loads(args.out.read_text()) if args.render_only else measure(args.out)
    if "element_counts" not in res:
        res["element_counts"] = element_counts()
        args.out.write_text(json.dumps(res, indent=1))
    update_doc(res)
    print(render(res))


if __name__ == "__main__":
    main()
