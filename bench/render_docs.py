"""Rewrite every marked section of README.md and docs/*.md from the measurements in bench/results/*.json.

A marked section is the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``; NAME picks one of the
renderers in :data:`SECTIONS`, which builds the section's Markdown from a results file. So every benchmark number
in the documentation is typed once, by the script that measured it, and a re-run benchmark updates the docs:

    python bench/render_docs.py            # rewrite every marked section
    python bench/render_docs.py --check    # change nothing; exit 1 and show the difference if a section is stale

``tests/test_render_docs.py`` runs the check, so the docs cannot drift from bench/results. A marker whose NAME has
no renderer is an error: add the renderer here rather than typing numbers by hand.

Which script writes which file:

- ``bench_grid``: ``bench/bench_grid.py`` -> ``grid.json`` (IIS grid per backend);
- ``data``: ``bench/bench_data.py`` -> ``data.json`` (FFCV vs DataLoader);
- ``sweep``: ``bench/bench_sweep.py`` -> ``sweep_w{1,2}_full102.json`` (102-checkpoint sweep);
- ``example_report``: ``bench/example_report.py`` -> ``example_report.json`` (and ``docs/example_report/``);
- ``attribution``: ``bench/bench_attribution.py`` -> ``attribution.json``, ``attribution_threads2.json``;
- ``probe_comparison`` / ``probe_summary``: ``bench/probe_comparison.py`` -> ``probe_comparison.json``;
- ``demo``: ``bench/bench_demo.py`` -> ``demo.json`` (``iis-fast demo`` from an empty cache);
- ``gpu_check``: ``bench/gpu_check.sh`` (``bench/gpu_check.py``) -> ``gpu_check.json``;
- ``score_floor``: ``bench/bench_score.py`` -> ``score_floor.json`` (score() against its backbone floor);
- ``score_checkpoints`` / ``score_summary``: ``bench/bench_score.py --trajectory ... --native-model ...`` ->
  ``score_checkpoints.json`` (the same per checkpoint; the README's summary also reads ``score_floor.json``);
- ``data_share``: ``bench/bench_data_share.py`` -> ``data_share.json`` (FFCV vs DataLoader share of extraction);
- ``libraries``: ``bench/bench_libraries.py`` -> ``libraries.json`` (IIS per concept library);
- ``finetune``: ``bench/bench_finetune.py`` -> ``finetune.json`` (+ ``finetune.png``; interpretability-
  maximising fine-tuning against plain fine-tuning, rendered into the README);
- ``repeats``: ``bench/bench_repeats.py`` -> ``repeats.json`` (what error bars on IIS cost, and the spread of IIS);
- ``probe_defaults``: ``bench/probe_official_vs_previous.py`` -> ``probe_official_vs_previous.json`` (How to Probe:
  official attribution forms against iis_fast's earlier defaults);
- ``sweep_attribution``: ``bench/bench_sweep_attribution.py`` -> ``sweep_attribution.json`` (IIS and GridPG per
  checkpoint of the small-CNN trajectory and the cost of each per stage; rendered into the README).

The last five are rendered by their script's own ``render_markdown(results: dict) -> str`` (see
:func:`_rendered_by`); while the script or its results file is missing, the section says "not yet measured".
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

#: ``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->``; NAME is lower-case letters, digits and ``_``.
MARKER = re.compile(r"<!-- ([a-z0-9_]+):begin -->\n(.*?)<!-- \1:end -->", re.S)


def load(name: str) -> dict[str, Any]:
    """A results file of bench/results (FileNotFoundError names the file)."""
    return json.loads((RESULTS / name).read_text())


def _load_local(module: str) -> Any:
    """Import bench/<module>.py by path (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(module, ROOT / "bench" / f"{module}.py")
    if spec is None or spec.loader is None:
        raise ImportError(module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _minutes(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


# --------------------------------------------------------------------------------------------------- sections


def render_bench_grid() -> str:
    """The IIS grid per backend: s/epoch, needed GFLOP/s, % of the run's fp32 matmul, time relative to cpp."""
    res = load("grid.json")
    peak = res.get("matmul_peak_gflops", max(res["matmul_gflops"].values()))
    lines = [f"Machine: {res['machine']['cpu']}, {res['machine']['logical_cpus']} logical CPUs, "
             f"{res['machine']['threads']} threads, torch {res['machine']['torch']}, git {res['git']}. "
             f"fp32 matmul (1024x1280x3000) in the same run, best of start and end: "
             + ", ".join(f"{k} {v:.1f}" for k, v in res["matmul_gflops"].items())
             + f" GFLOP/s; **{peak:.1f} GFLOP/s** is the bar for % of matmul.",
             "", f"Command: `{res['command']}`", "",
             f"Each backend timed {max(r.get('repeats', 1) for r in res['regimes'].values())} time(s), "
             "interleaved; the fastest repeat is shown.", "",
             "| regime | backend | epochs timed | s / epoch | 30 epochs (extrapolated) | needed GFLOP/s | % of matmul "
             "| time / cpp's | load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for regime, r in res["regimes"].items():
        label = f"{regime} (N={r['N']:,}, K={r['K']})"
        for name, b in r["backends"].items():
            if "error" in b:
                lines.append(f"| {label} | {name} | failed: {b['error']} | | | | | | |")
                continue
            ratio = r.get("speedup_of_cpp", {}).get(name)
            lines.append(f"| {label} | {name} | {b['epochs']} | {b['per_epoch_s']:.3f} | "
                         f"{b['extrapolated_30_epochs_s']:.1f} s | {b['gflops']:.1f} | {b['pct_matmul']:.1f}% | "
                         f"{'' if ratio is None else f'{ratio:.1f}x'} | {b['loadavg_1min'][0]:.1f}->"
                         f"{b['loadavg_1min'][1]:.1f} |")
    return "\n".join(lines)


def render_data() -> str:
    """FFCV loader vs torch DataLoader, alone and feeding the backbone, with the model-only runs around them."""
    res = load("data.json")
    lines = [f"{res['model']} (`{res['weights']}`) at {res['image_size']} px, batch {res['batch_size']}, "
             f"{res['workers']} FFCV threads / {res['workers']} DataLoader workers, {res['torch_threads']} torch "
             f"threads, {res['n']} Fashion-MNIST TRAIN images per dataset, {res['cores']} cores, torch "
             f"{res['torch']}; load average {res['loadavg_start'][0]:.2f} -> {res['loadavg_end'][0]:.2f} during "
             f"the run. Loader columns: median of the timed epochs after a warm-up epoch. End-to-end columns: "
             f"features of every image, and in brackets that rate as a share of the model-only run just before / "
             f"just after it (the backbone on images already in memory).",
             "", f"Command: `{res['command']}`", "",
             "| dataset | FFCV loader img/s | DataLoader img/s | speed-up | model only img/s (before / after) "
             "| FFCV end-to-end img/s | DataLoader end-to-end img/s | FFCV first epoch (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for d in res["datasets"].values():
        mo = d["model_only"]
        before, after = mo["before"]["images_per_s"], mo["after"]["images_per_s"]

        def e2e(key: str) -> str:
            v = d[key]["images_per_s"]
            return f"{v:.1f} ({100 * v / before:.0f}% / {100 * v / after:.0f}%)"
        lines.append(f"| {d['desc']} | {d['ffcv_loader']['images_per_s']:.0f} | {d['torch_loader']['images_per_s']:.0f} "
                     f"| **{d['loader_speedup']:.1f}x** | {before:.1f} / {after:.1f} | {e2e('ffcv_e2e')} "
                     f"| {e2e('torch_e2e')} | {d['ffcv_loader']['warmup_s']:.1f} |")
    return "\n".join(lines)


def render_sweep() -> str:
    """The 102-checkpoint sweep with 2 and 1 workers: checkpoints/hour per stage and wall time."""
    runs = [(w, load(f"sweep_w{w}_full102.json")) for w in (2, 1)]
    r0 = runs[0][1]
    so, data = r0["score_options"], r0["data"]
    lines = [f"{r0['checkpoints']} checkpoints, {data['n_train']} TRAIN / {data['n_eval']} TEST Fashion-MNIST images "
             f"at {data['image_size']}x{data['image_size']}, M = {so['num_concepts']} {so['library']} concepts, "
             f"{so['sparsities']} sparsities x {so['lrs']} lrs, {so['epochs']} epochs, `{r0['backend']}` backend, "
             f"{r0['machine']['cpus']} cores, torch {r0['machine']['torch']}. Per stage: checkpoints/hour of one "
             "worker doing only that stage (mean seconds per checkpoint in brackets); *total*: the measured "
             "wall-clock throughput.", "",
             "| command | ok | workers x threads | extract | concepts | training | total | wall | mean IIS | load avg before -> after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for w, r in runs:
        cph, sec = r["checkpoints_per_hour"], r["seconds_per_checkpoint"]

        def stage(k: str) -> str:
            return f"{cph[k]:.0f}/h ({sec[k]:.1f} s)"
        lines.append(f"| `python bench/bench_sweep.py CKPTS --workers {w} --tag full102` | {r['ok']}/{r['checkpoints']} "
                     f"| {r['workers']} x {r['threads_per_worker']} | {stage('extract')} | {stage('concepts')} "
                     f"| {stage('train')} | **{cph['total']:.0f}/h** | **{_minutes(r['wall_seconds'])}** "
                     f"| {r['iis_mean']:.4f} | {r['load_average_before'][0]:.1f} -> {r['load_average_after'][0]:.1f} |")
    return "\n".join(lines)


def render_example_report() -> str:
    """The committed example sweep (docs/example_report/): the commands, their times, the correlations."""
    res = load("example_report.json")
    width = max(len(c["command"]) for c in res["commands"])
    lines = ["```bash"] + [f"{c['command']:<{width}}  # {_minutes(c['wall_s'])}" for c in res["commands"]] + ["```", ""]
    first, last = res["first"], res["last"]
    lines.append(f"{res['ok']} of {res['checkpoints']} checkpoints scored (steps {first['step']}..{last['step']}; "
                 f"the model's own test accuracy {first['test_acc']:.3f} -> {last['test_acc']:.3f}). IIS "
                 f"{first['iis']:.3f} -> {last['iis']:.3f}, acc_std {first['acc_std']:.3f} -> {last['acc_std']:.3f}. "
                 f"Measured on {res['machine']['cpus']} cores (load average {res['loadavg'][0]:.1f} -> "
                 f"{res['loadavg'][1]:.1f}), git {res['git']}.")
    lines.append("")
    for label, c in (("IIS vs acc_std", res["correlation"]), ("IIS vs training step", res["correlation_step"])):
        lines.append(f"- {label}: Spearman ρ = {c['spearman']:.2f} [{c['spearman_ci'][0]:.2f}, {c['spearman_ci'][1]:.2f}], "
                     f"Pearson r = {c['pearson']:.2f} [{c['pearson_ci'][0]:.2f}, {c['pearson_ci'][1]:.2f}] "
                     f"(95% bootstrap CIs, n = {c['n']})")
    return "\n".join(lines)


def _attribution_rows(res: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["method"], r["grid_px"]): r for r in res["rows"]}


def render_attribution() -> str:
    """Attribution maps/s, batched vs one target at a time, with the Input×Gradient bound; the 2-thread re-run."""
    res = load("attribution.json")
    cfg, m = res["config"], res["machine"]
    lines = [f"{cfg['backbone']}, {cfg['grids']} grid images x {cfg['targets']} targets per measurement, best of "
             f"{cfg['repeats']} after a warm-up, IG with {cfg['ig_steps']} steps, {m['threads']} torch thread(s), "
             f"{m['cpu_count']} cores, torch {m['torch']}, load average {m['load_avg_1min']:.1f} at the end. "
             f"Largest relative difference between the two paths' maps: "
             f"{max(r['max_rel_diff'] for r in res['rows']):.1e}.", "",
             "| method | grid | batched maps/s | one target at a time maps/s | speed-up | backward share of batched time "
             "| bound with a free forward |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        head = "bcos2" if r["method"] == "bcos" else r.get("head", "linear")
        share = bound = ""
        if "batched_backward_s" in r:
            total = r["batched_forward_s"] + r["batched_backward_s"]
            share = f"{100 * r['batched_backward_s'] / total:.0f}%"
            bound = f"x{r['bound_if_forward_free']:.1f}"
        lines.append(f"| {r['method']} ({head} head) | {r['grid_px']} px | {r['batched_maps_per_s']:.1f} "
                     f"| {r['one_at_a_time_maps_per_s']:.1f} | x{r['speedup']:.1f} | {share} | {bound} |")
    t2 = load("attribution_threads2.json")
    rows2 = _attribution_rows(t2)
    parts = []
    for method in dict.fromkeys(r["method"] for r in t2["rows"]):
        px = sorted(p for (mm, p) in rows2 if mm == method)
        sp = " / ".join(f"x{rows2[(method, p)]['speedup']:.1f}" for p in px)
        bd = [rows2[(method, p)].get("bound_if_forward_free") for p in px]
        parts.append(f"{method} {sp} ({' / '.join(f'{p} px' for p in px)})"
                     + (f", bound with a free forward {' / '.join(f'x{b:.1f}' for b in bd)}" if all(bd) else ""))
    lines += ["", f"With {t2['machine']['threads']} torch threads (`python bench/bench_attribution.py --threads "
                  f"{t2['machine']['threads']} --methods {' '.join(dict.fromkeys(r['method'] for r in t2['rows']))}`, "
                  f"`bench/results/attribution_threads2.json`): " + "; ".join(parts) + "."]
    return "\n".join(lines)


def render_probe_comparison() -> str:
    """The How-to-Probe comparison table (GridPG per probe and method) with the run's sizes and times."""
    from iis_fast.probing.compare import format_comparison

    res = load("probe_comparison.json")
    c, t = res["config"], res["timings"]
    lrs = c["lr"]
    others = sorted({v for k, v in lrs.items() if k != "linear"})
    maps = c["n_grids"] * c["grid_size"] ** 2
    lines = [f"ImageNet {c['model']} at {c['image_size']} px (last-stage maps {'x'.join(map(str, c['feature_shape']))}), "
             f"{c['n_train']} stratified TRAIN images, accuracy on {c['n_eval']} stratified TEST images, probes with "
             f"hidden width {c['hidden']}, {c['epochs']} epochs, batch {c['batch_size']}, Adam lr "
             f"{', '.join(f'{v:g}' for v in others)} (linear probe {lrs['linear']:g}), seed {c['seed']}; "
             f"{c['n_grids']} grids of {c['grid_size']}x{c['grid_size']} ({c['grid_image_size']} px) per probe from "
             f"{c['n_pool']} other TEST images, i.e. {maps} maps per cell of the table; IG with {c['ig_steps']} steps. "
             f"Time with {c['torch_threads']} torch thread(s): features {t['features_s']:.1f} s, training all "
             f"{len(res['rows'])} probes {t['train_s']:.1f} s, attributions {t['attribution_s']:.0f} s "
             f"(total {_minutes(t['total_s'])}). Grids shared by all probes: {'yes' if res['shared_grids'] else 'no'}.",
             "", format_comparison(res)]
    return "\n".join(lines)


def render_probe_summary() -> str:
    """The comparison by probe family: GridPG ranges of B-cos vs linear/MLP probes, and BCE vs CE per method."""
    res = load("probe_comparison.json")
    methods = [m for m in res["config"]["methods"] if m != "bcos"]
    rows = res["rows"]
    bcos = [r for r in rows if r["head"].startswith("bcos")]
    std = [r for r in rows if not r["head"].startswith("bcos")]
    heads = list(dict.fromkeys(r["head"] for r in rows))
    by = {(r["head"], r["loss"]): r for r in rows}

    def rng(rs: list[dict[str, Any]], m: str) -> str:
        v = [r[m]["gridpg"] for r in rs if m in r]
        return f"{min(v):.3f}-{max(v):.3f}"
    lines = ["| method | GridPG, linear/MLP probes | GridPG, B-cos probes | heads where BCE >= CE |",
             "|---|---|---|---|"]
    for m in methods:
        pairs = [(by[(h, "bce")][m]["gridpg"], by[(h, "ce")][m]["gridpg"]) for h in heads
                 if (h, "bce") in by and (h, "ce") in by]
        lines.append(f"| {m} | {rng(std, m)} | {rng(bcos, m)} | {sum(b >= c for b, c in pairs)} of {len(pairs)} |")
    if "bcos" in res["config"]["methods"]:
        lines.append(f"| bcos (contribution maps) | – | {rng(bcos, 'bcos')} | "
                     f"{sum(by[(h, 'bce')]['bcos']['gridpg'] >= by[(h, 'ce')]['bcos']['gridpg'] for h in heads if h.startswith('bcos'))}"
                     f" of {sum(h.startswith('bcos') for h in heads)} |")
    acc = [r["accuracy"] for r in rows]
    lines += ["", f"Probe accuracies: {min(acc):.3f}-{max(acc):.3f}."]
    return "\n".join(lines)


def render_demo() -> str:
    """What `iis-fast demo` prints, as measured from an empty feature cache, and the reference backend's IIS."""
    from iis_fast.demo import format_table
    from iis_fast.result import IISResult

    res = load("demo.json")

    def table(rows: list[dict[str, Any]]) -> str:
        return format_table([(r["model"], IISResult.from_dict({k: v for k, v in r.items() if k != "seconds"}),
                              r["seconds"]) for r in rows])
    m = res["machine"]
    lines = ["```", f"$ {res['command']}", table(res["rows"]), "```", "",
             f"Measured on {m['cpu']} ({m['cpus']} cores, load average {res['loadavg'][0]:.1f} -> "
             f"{res['loadavg'][1]:.1f}), git {res['git']}: **{_minutes(res['wall_s'])}** for the whole command "
             f"from an empty feature cache, setup excluded."]
    rows = [r for r in res["rows"] if (r.get("uncertainty") or {}).get("repeats", 1) > 1]
    if rows:
        u0 = rows[0]["uncertainty"]
        first = ", ".join(f"{r['model']} {r['uncertainty']['iis_repeats'][0]:.4f}" for r in rows)
        lines.append(f"IIS is the mean of {u0['repeats']} grids (seeds); ±seeds: half-width of its "
                     f"{100 * u0['level']:.0f}% interval; eval bootstrap: the evaluation-sample interval; held-out sel.: "
                     f"epoch and lr chosen on 10% of TRAIN ([spec.md §1.10](docs/spec.md#110-error-bars)). The first "
                     f"grid alone (seed 0, what `--repeats 1` reports): {first}.")
    ref = res.get("reference")
    if ref:
        iis = ", ".join(f"{r['model']} {r['iis']:.4f}" for r in ref["rows"])
        lines.append(f"`{ref['command']}` (the one-head-at-a-time oracle, same cached features) gives IIS {iis}.")
    return "\n".join(lines)


def _rendered_by(script: str, results: str, command: str, function: str = "render_markdown") -> str:
    """The Markdown that ``bench/<script>.py``'s own ``function(results: dict) -> str`` makes of
    ``bench/results/<results>``, or a note that it has not been measured yet while either file is missing."""
    if not ((ROOT / "bench" / f"{script}.py").exists() and (RESULTS / results).exists()):
        return f"Not yet measured: `bench/results/{results}` does not exist. `{command}` writes it."
    return getattr(_load_local(script), function)(load(results)).strip()


def render_gpu_check() -> str:
    """The GPU measurements (bench/gpu_check.py's own Markdown), or a note that none exist yet."""
    if not (RESULTS / "gpu_check.json").exists():
        return ("Not yet measured on a GPU: `bench/results/gpu_check.json` does not exist. "
                "`bash bench/gpu_check.sh` on a CUDA machine writes it.")
    return _rendered_by("gpu_check", "gpu_check.json", "bash bench/gpu_check.sh")


def render_score_floor() -> str:
    """One checkpoint's score() against its backbone floor per extraction setting (bench/bench_score.py's Markdown)."""
    return _rendered_by("bench_score", "score_floor.json", "OMP_NUM_THREADS=2 python bench/bench_score.py")


def render_finetune() -> str:
    """lam = 0 against lam > 0 fine-tuning: accuracy and IIS before/after (bench/bench_finetune.py's Markdown)."""
    return _rendered_by("bench_finetune", "finetune.json", "nice -n 5 python bench/bench_finetune.py")


def render_score_checkpoints() -> str:
    """Per checkpoint: score() against its backbone floor, for the small-CNN trajectory and a pretrained backbone at
    its native size (bench/bench_score.py's Markdown)."""
    return _rendered_by("bench_score", "score_checkpoints.json",
                        "OMP_NUM_THREADS=2 python bench/bench_score.py --trajectory CKPTS --native-model NAME",
                        "render_checkpoints_markdown")


def render_score_summary() -> str:
    """The README's end-to-end / floor per stage: demo models, trajectory, 224 px backbone (bench/bench_score.py)."""
    if not ((RESULTS / "score_floor.json").exists() and (RESULTS / "score_checkpoints.json").exists()):
        return "Not yet measured: `python bench/bench_score.py` (with and without `--trajectory`) writes it."
    return _load_local("bench_score").render_summary_markdown(load("score_floor.json"),
                                                              load("score_checkpoints.json")).strip()


def render_repeats() -> str:
    """R = 1, 5, 10 grids per model: cost per grid and per checkpoint, the spread of IIS (bench/bench_repeats.py)."""
    return _rendered_by("bench_repeats", "repeats.json", "OMP_NUM_THREADS=2 python bench/bench_repeats.py")


def render_data_share() -> str:
    """The data path's share of one split's extraction, FFCV vs DataLoader (bench/bench_data_share.py's Markdown)."""
    return _rendered_by("bench_data_share", "data_share.json",
                        "OMP_NUM_THREADS=2 python bench/bench_data_share.py")


def render_libraries() -> str:
    """IIS per concept library, default and official settings (bench/bench_libraries.py's Markdown)."""
    return _rendered_by("bench_libraries", "libraries.json", "python bench/bench_libraries.py", "render")


def render_sweep_attribution() -> str:
    """The README's trajectory result: IIS and attribution quality per checkpoint (bench/bench_sweep_attribution.py)."""
    return _rendered_by("bench_sweep_attribution", "sweep_attribution.json",
                        "OMP_NUM_THREADS=1 python bench/bench_sweep_attribution.py CKPTS --db attr.db")


def render_probe_defaults() -> str:
    """How to Probe's official attribution forms against the earlier defaults (the bench script's Markdown)."""
    return _rendered_by("probe_official_vs_previous", "probe_official_vs_previous.json",
                        "python bench/probe_official_vs_previous.py")


#: Section name -> renderer (Markdown without the markers).
SECTIONS: dict[str, Callable[[], str]] = {
    "bench_grid": render_bench_grid,
    "data": render_data,
    "sweep": render_sweep,
    "example_report": render_example_report,
    "attribution": render_attribution,
    "probe_comparison": render_probe_comparison,
    "probe_summary": render_probe_summary,
    "demo": render_demo,
    "gpu_check": render_gpu_check,
    "score_floor": render_score_floor,
    "score_checkpoints": render_score_checkpoints,
    "score_summary": render_score_summary,
    "data_share": render_data_share,
    "libraries": render_libraries,
    "finetune": render_finetune,
    "probe_defaults": render_probe_defaults,
    "repeats": render_repeats,
    "sweep_attribution": render_sweep_attribution,
}


# --------------------------------------------------------------------------------------------------- driver


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/*.md, the files whose marked sections are rendered."""
    return [root / "README.md"] + sorted((root / "docs").glob("*.md"))


def render_text(text: str, cache: dict[str, str], where: str = "") -> str:
    """``text`` with every marked section replaced by its renderer's output (rendered once per run, in ``cache``).

    Raises:
        KeyError: a marker names no renderer.
    """
    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in SECTIONS:
            raise KeyError(f"{where}: section <!-- {name}:begin --> has no renderer in bench/render_docs.py "
                           f"(known: {', '.join(SECTIONS)})")
        if name not in cache:
            cache[name] = SECTIONS[name]().rstrip("\n")
        return f"<!-- {name}:begin -->\n{cache[name]}\n<!-- {name}:end -->"
    return MARKER.sub(sub, text)


def _name(f: Path) -> str:
    return str(f.relative_to(ROOT)) if f.is_relative_to(ROOT) else str(f)


def stale_sections(files: list[Path] | None = None) -> dict[Path, str]:
    """{file: unified diff} for every file whose marked sections differ from what the results give."""
    cache: dict[str, str] = {}
    out = {}
    for f in files if files is not None else doc_files():
        old = f.read_text()
        new = render_text(old, cache, _name(f))
        if new != old:
            out[f] = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), _name(f),
                                                  _name(f) + " (rendered)"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 (with a diff) if any marked section differs from bench/results")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    stale = stale_sections()
    if args.check:
        for diff in stale.values():
            print(diff)
        if stale:
            print(f"stale: {', '.join(_name(f) for f in stale)}; run python bench/render_docs.py",
                  file=sys.stderr)
        return 1 if stale else 0
    cache: dict[str, str] = {}
    for f in stale:
        f.write_text(render_text(f.read_text(), cache))
        print(f"rewrote {_name(f)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
