"""The documentation cannot drift: every marked section of README.md and docs/*.md is what bench/render_docs.py
renders from bench/results/*.json, and every link in them points to a file (and heading) in the repository."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import render_docs  # noqa: E402

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _sections(text: str) -> list[str]:
    return [m.group(1) for m in render_docs.MARKER.finditer(text)]


def test_every_marked_section_matches_bench_results():
    """The check mode of the renderer: nothing to rewrite (a diff is printed for the section that drifted)."""
    stale = render_docs.stale_sections()
    assert not stale, "\n".join(stale.values()) + "\nrun: python bench/render_docs.py"


def test_results_are_rendered_where_the_docs_promise_them():
    """Each results file feeds its section, and the README carries exactly one results section: the demo."""
    where = {f.name: _sections(f.read_text()) for f in render_docs.doc_files()}
    assert where["README.md"] == ["demo", "score_summary", "finetune", "sweep_attribution"]
    assert where["applications.md"] == []          # it links to the README's finetune section
    assert where["kernels_cpu.md"] == ["bench_grid"]
    assert where["data.md"] == ["data"]
    assert where["sweep.md"] == ["example_report", "sweep"]
    assert where["probing.md"] == ["probe_comparison", "probe_summary", "attribution"]
    assert "gpu_check" in where["kernels_triton.md"]
    assert where["throughput.md"] == ["score_floor", "score_checkpoints", "data_share"]
    assert {s for names in where.values() for s in names} <= set(render_docs.SECTIONS)


def test_rendered_numbers_are_those_of_the_results_files():
    """Spot checks against the JSON, so a renderer cannot silently show another field."""
    grid = render_docs.load("grid.json")["regimes"]["small"]["backends"]["cpp"]
    assert f"| cpp | {grid['epochs']} | {grid['per_epoch_s']:.3f} |" in render_docs.render_bench_grid()
    demo = render_docs.load("demo.json")
    text = render_docs.render_demo()
    for row in demo["rows"]:
        assert re.search(rf"^{re.escape(row['model'])} +{row['acc_std']:.4f} +{row['iis']:.4f} ", text, re.M)
    probe = render_docs.load("probe_comparison.json")["rows"]
    ig_bce_wins = sum(by["bce"]["ig"]["gridpg"] >= by["ce"]["ig"]["gridpg"] for by in (
        {r["loss"]: r for r in probe if r["head"] == h} for h in {r["head"] for r in probe}))
    assert re.search(rf"^\| ig \| .* \| {ig_bce_wins} of 6 \|$", render_docs.render_probe_summary(), re.M)


def test_the_checkpoint_cost_summary_shows_the_measured_ratios():
    """The README's end-to-end / floor rows are those of score_floor.json and score_checkpoints.json."""
    text = render_docs.render_score_summary()
    default = render_docs._load_local("bench_score").DEFAULT_SETTING
    shown = [m["settings"][default] for m in render_docs.load("score_floor.json")["models"].values()]
    assert shown and all(f"**{s['end_to_end_over_floor']:.2f}x**" in text for s in shown)
    table = render_docs.load("score_checkpoints.json")
    last = table["pretrained"]["rows"][-1]
    assert f"**{last['end_to_end_over_floor']:.2f}x** | {last['extract_over_floor']:.2f}x" in text
    assert f"| {table['trajectory']['rows'][0]['step']} |" in render_docs.render_score_checkpoints()


def test_a_stale_number_is_detected_and_rewritten(tmp_path):
    readme = (ROOT / "README.md").read_text()
    acc = f"{render_docs.load('demo.json')['rows'][0]['acc_std']:.4f}"
    assert acc in readme
    doc = tmp_path / "README.md"
    doc.write_text(readme.replace(acc, "0.1234", 1))
    stale = render_docs.stale_sections([doc])
    assert list(stale) == [doc] and "0.1234" in stale[doc]
    assert render_docs.render_text(doc.read_text(), {}) == readme


def test_a_marker_without_a_renderer_is_an_error():
    with pytest.raises(KeyError, match="no renderer"):
        render_docs.render_text("<!-- typed_by_hand:begin -->\n| 42 |\n<!-- typed_by_hand:end -->\n", {})


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    out = set()
    for line in FENCE.sub("", md.read_text()).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower().replace("`", "")
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_links_point_into_the_repository():
    """No link leaves the repository (no ../shared/SPEC.md); every linked file and heading exists."""
    bad = []
    for md in render_docs.doc_files() + [ROOT / "CHANGELOG.md"]:
        for target in LINK.findall(FENCE.sub("", md.read_text())):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            if not dest.is_relative_to(ROOT) or not dest.exists():
                bad.append(f"{md.name}: {target} (no such file in the repository)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{md.name}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


def test_the_trajectory_result_shows_the_measured_correlations():
    """The README's IIS-beside-attribution rows are those of sweep_attribution.json."""
    r = render_docs.load("sweep_attribution.json")
    text = render_docs.render_sweep_attribution()
    for c in r["correlations"]:
        lo, hi = c["vs_iis"]["spearman_ci"]
        assert (f"| {c['head']}/{c['loss']} | {c['method']} | {c['gridpg_mean']:.3f} | "
                f"{r['accuracy_last'][c['head'] + '/' + c['loss']]:.3f} | {c['vs_iis']['spearman']:+.2f} "
                f"[{lo:+.2f}, {hi:+.2f}]") in text
