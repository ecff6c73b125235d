"""IIS with error bars (docs/spec.md §1.10): repeated grids, the evaluation-sample bootstrap, the selection check."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from iis_fast.backends import get_trainer, resolve_backend
from iis_fast.backends.common import GridSpec, repeat_seeds
from iis_fast.backends.reference import train_grid_reference
from iis_fast.errors import IISInputError
from iis_fast.score import score_features
from iis_fast.uncertainty import bootstrap_iis, iis_of, select

SPEC = dict(num_classes=10, sparsities=(0.0, 0.5, 0.9, 0.98), lrs=(1e-2, 1e-1), epochs=3, batch_size=256)
OPTS = dict(sparsities=SPEC["sparsities"], lrs=SPEC["lrs"], epochs=SPEC["epochs"], batch_size=SPEC["batch_size"],
            progress=False)
FUSED = [b for b in ("torch", "cpp") if resolve_backend(b).available("cpu")[0]]


def _data(real_features):
    tx, ty, ex, ey, c = real_features
    return tx, ty, ex, ey, c


def test_repeat_seeds_are_distinct_and_start_with_the_seed():
    s = repeat_seeds(7, 10)
    assert s[0] == 7 and len(set(s)) == 10 and s == repeat_seeds(7, 10)
    assert repeat_seeds(7, 1) == (7,)
    assert not set(repeat_seeds(7, 10)[1:]) & set(repeat_seeds(8, 10))     # nearby seeds share no grid


def test_options_are_validated_and_on_the_command_line():
    with pytest.raises(IISInputError, match="repeats"):
        score_features(torch.zeros(4, 2), [0, 1, 0, 1], torch.zeros(2, 2), [0, 1], torch.eye(2), repeats=0)
    from iis_fast.cli import build_parser
    args = build_parser().parse_args(["score", "mobilenetv2_100", "--data", "d", "--repeats", "5",
                                      "--bootstrap", "0", "--selection-check"])
    assert (args.repeats, args.bootstrap, args.selection_check) == (5, 0, True)


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_one_repeat_is_the_single_grid_number(real_features, backend):
    """repeats=1 reports exactly the IIS the official selection gives on the raw single-grid output (the trainer
    is called directly, bypassing the registry), i.e. the number scored before repeats existed."""
    tx, ty, ex, ey, c = _data(real_features)
    r = score_features(tx, ty, ex, ey, c, backend=backend, **OPTS)
    out = resolve_backend(backend).trainer(tx, ty, [(ex, ey)], c, GridSpec(**SPEC))
    best_p = out.probe_acc[0].argmax(-1)
    best_h = out.head_acc[0].argmax(-1)
    acc_std = np.take_along_axis(out.probe_acc[0], best_p[:, None], -1)[:, 0].max()
    acc = np.take_along_axis(out.head_acc[0], best_h[..., None], -1)[..., 0].max(1)
    assert r.acc_std == acc_std and r.acc == acc.tolist()
    assert r.iis == iis_of(SPEC["sparsities"], acc_std, acc)
    assert r.uncertainty["repeats"] == 1 and r.uncertainty["iis_repeats"] == [r.iis] and "iis_ci" not in r.uncertainty


@pytest.mark.parametrize("backend", FUSED)
def test_fused_repeats_equal_separate_grids_of_those_seeds(real_features, backend):
    """The fused R-grid pass trains, per repeat, the grid that the reference oracle trains alone with that seed
    (per-epoch accuracies within one evaluation sample), and the repeats really differ."""
    tx, ty, ex, ey, c = _data(real_features)
    seeds = repeat_seeds(0, 3)
    _, trainer = get_trainer(backend)
    fused = trainer(tx, ty, [(ex, ey)], c, GridSpec(**SPEC, seeds=seeds))
    assert fused.probe_acc.shape == (3, 1, 2, 3) and fused.head_acc.shape == (3, 1, 4, 2, 3)
    one = 1 / len(ey) + 1e-9
    for r, s in enumerate(seeds):
        ref = train_grid_reference(tx, ty, [(ex, ey)], c, GridSpec(**SPEC).single(s))
        assert np.abs(fused.probe_acc[r] - ref.probe_acc).max() <= one
        assert np.abs(fused.head_acc[r] - ref.head_acc).max() <= one
        # per-sample correctness of every head at its best epoch: the oracle's, up to float-level argmax flips
        assert (fused.correct_head[r] != ref.correct_head).mean() < 0.01
        assert (fused.correct_probe[r] != ref.correct_probe).mean() < 0.01
    assert len({fused.head_acc[r].tobytes() for r in range(3)}) == 3     # independent grids, different results
    if backend == "cpp":       # the first repeat is the single grid of the seed, bit for bit
        single = trainer(tx, ty, [(ex, ey)], c, GridSpec(**SPEC))
        assert np.array_equal(single.head_acc, fused.head_acc[0])
        assert np.array_equal(single.probe_acc, fused.probe_acc[0])


def test_repeated_score_mean_sd_and_interval(real_features):
    tx, ty, ex, ey, c = _data(real_features)
    backend = FUSED[-1]
    r = score_features(tx, ty, ex, ey, c, backend=backend, repeats=3, **OPTS)
    u = r.uncertainty
    per = [score_features(tx, ty, ex, ey, c, backend=backend, seed=s, **OPTS) for s in u["seeds"]]
    if backend == "cpp":        # repeat r is the grid of seed r, exactly
        assert u["iis_repeats"] == [p.iis for p in per] and u["acc_repeats"] == [p.acc for p in per]
    else:                       # torch's fused pass sums in another order: within one evaluation sample
        assert np.abs(np.subtract(u["acc_repeats"], [p.acc for p in per])).max() <= 1 / len(ey) + 1e-9
    assert r.iis == pytest.approx(np.mean(u["iis_repeats"]), abs=1e-15)
    assert u["iis_sd"] == pytest.approx(np.std(u["iis_repeats"], ddof=1))
    half = 4.302652729911275 * u["iis_sd"] / np.sqrt(3)                    # t(0.975, df=2)
    assert u["iis_ci"] == pytest.approx([r.iis - half, r.iis + half])
    assert len(u["acc_ci"][0]) == len(SPEC["sparsities"]) and len(u["arr_sd"]) == len(SPEC["sparsities"])
    assert r.acc == pytest.approx(np.mean(u["acc_repeats"], 0).tolist())
    assert r.to_dict()["uncertainty"] == u and type(r).from_json(r.to_json()).uncertainty == u


def test_bootstrap_is_the_resampled_iis_of_the_selected_heads(real_features):
    tx, ty, ex, ey, c = _data(real_features)
    r = score_features(tx, ty, ex, ey, c, backend="reference", bootstrap=2000, **OPTS)
    b = r.uncertainty["bootstrap"]
    assert b["recount_max_diff"] == 0.0                # the oracle's per-sample record is its accuracy, exactly
    assert b["iis"] == pytest.approx(r.iis, abs=1e-6) and b["iis_ci"][0] < r.iis < b["iis_ci"][1]
    # the same statistic by hand: resample the evaluation samples, recompute acc_std, acc_s and IIS
    out = train_grid_reference(tx, ty, [(ex, ey)], c, GridSpec(**SPEC))
    sel = select(out.probe_acc, out.head_acc)
    cp = out.correct_probe[sel.lr_p].astype(float)
    ch = out.correct_head[np.arange(len(sel.lr_h)), sel.lr_h].astype(float)
    idx = np.random.default_rng(1).integers(0, len(ey), (4000, len(ey)))
    manual = [iis_of(SPEC["sparsities"], cp[i].mean(), ch[:, i].mean(1)) for i in idx]
    assert b["iis_sd"] == pytest.approx(np.std(manual), rel=0.1)
    assert b["iis_ci"] == pytest.approx(np.percentile(manual, [2.5, 97.5]), abs=0.004)


def test_bootstrap_of_perfect_heads_is_a_point():
    cp = np.ones((2, 50), dtype=bool)
    ch = np.ones((2, 3, 50), dtype=bool)
    b = bootstrap_iis(cp, ch, [0.0, 0.5, 0.9], 200, 0.95, 0)
    assert b["iis"] == pytest.approx(0.9) and b["iis_ci"] == pytest.approx([0.9, 0.9]) and b["iis_sd"] < 1e-12


def test_selection_check_is_the_holdout_selection_score(real_features):
    """selection_check reports what selection='holdout' scores (same split, epoch and lr chosen on the held-out
    part), and the IIS the same training gets when the evaluation split picks epoch and lr instead."""
    tx, ty, ex, ey, c = _data(real_features)
    r = score_features(tx, ty, ex, ey, c, backend="cpp" if "cpp" in FUSED else "torch", selection_check=True,
                       **OPTS)
    h = score_features(tx, ty, ex, ey, c, backend=r.backend, selection="holdout", **OPTS)
    s = r.uncertainty["selection"]
    assert s["iis"] == h.iis and s["acc_std"] == h.acc_std
    assert h.uncertainty["selection"]["iis"] == h.iis
    assert s["iis_eval_selection"] == h.uncertainty["selection"]["iis_eval_selection"]
    assert s["optimism"] == pytest.approx(s["iis_eval_selection"] - s["iis"])


TRITON_CODE = r"""
import numpy as np, torch, torch.nn.functional as F
from iis_fast.backends.common import GridSpec, repeat_seeds
from iis_fast.backends.torch import train_grid_torch
from iis_fast.backends.triton import train_grid_triton
g = torch.Generator().manual_seed(0)
n, d, m, k = 256, 32, 20, 4
centers = torch.randn(k, d, generator=g) * 2
y = torch.randint(0, k, (n + 128,), generator=g)
x = centers[y] + 1.5 * torch.randn(n + 128, d, generator=g)
c = F.normalize(torch.randn(m, d, generator=g), dim=1)
spec = GridSpec(num_classes=4, sparsities=(0.0, 0.9), lrs=(1e-2, 1e-1), epochs=3, batch_size=128)
seeds = repeat_seeds(0, 2)
fused = train_grid_torch(x[:n], y[:n], [(x[n:], y[n:])], c, GridSpec(**{**spec.__dict__, "seeds": seeds}))
for r, s in enumerate(seeds):
    out = train_grid_triton(x[:n], y[:n], [(x[n:], y[n:])], c, spec.single(s))
    assert np.abs(out.head_acc - fused.head_acc[r]).max() <= 1 / 128 + 1e-12
    assert np.abs(out.probe_acc - fused.probe_acc[r]).max() <= 1 / 128 + 1e-12
    assert out.correct_head.shape == (2, 2, 128) and (out.correct_head != fused.correct_head[r]).mean() < 0.02
    best = out.head_acc[0].argmax(-1)
    acc = np.take_along_axis(out.head_acc[0], best[..., None], -1)[..., 0]
    assert np.abs(out.correct_head.mean(-1) - acc).max() <= 1 / 128 + 1e-12
print("ok")
"""


def test_triton_grid_of_each_repeat_seed_under_the_interpreter():
    """Triton trains repeats one seed per call: each equals the torch fused pass's repeat of that seed (tiny shapes,
    TRITON_INTERPRET=1 in a fresh interpreter), with its per-sample record at the best epoch."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-c", TRITON_CODE], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def _rows_with_intervals(n: int, sd: float):
    """A synthetic trajectory whose results carry error bars (what repeats=5 and the bootstrap record)."""
    import json
    from iis_fast.result import IISResult
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        acc_std = 0.5 + 0.4 * i / n + rng.normal(0, 0.02)
        iis = 0.6 + 0.2 * i / n + rng.normal(0, 0.02)
        half = 2.776 * sd / np.sqrt(5)
        u = {"repeats": 5, "seeds": [0, 1, 2, 3, 4], "iis_repeats": [iis] * 5, "iis_sd": sd,
             "iis_ci": [iis - half, iis + half], "bootstrap": {"iis_ci": [iis - 0.03, iis + 0.02]},
             "selection": {"iis": iis - 0.01}}
        r = IISResult(iis=iis, acc_std=acc_std, sparsities=[0.0, 0.9], acc=[acc_std, acc_std * 0.8], arr=[1.0, 0.8],
                      lrs=[0.01], acc_std_per_lr=[acc_std], acc_per_lr=[[acc_std], [acc_std * 0.8]],
                      best_epoch_std=[1], best_epoch=[[1], [1]], num_concepts=10, library="prototype", seed=0,
                      backend="cpp", eval_split="eval", selection_split="eval", n_train=10, n_eval=10,
                      num_classes=10, feature_dim=8, uncertainty=u)
        rows.append({"checkpoint": f"m@/c/{i}.pt", "model": "m", "path": f"/c/step_{i}.pt", "step": i * 100,
                     "library": "prototype", "config_hash": "h", "status": "ok", "iis": r.iis, "acc_std": acc_std,
                     "config_json": "{}", "meta_json": json.dumps({}), "result_json": r.to_json()})
    return rows


def test_sweep_table_and_report_carry_the_intervals(tmp_path):
    from pathlib import Path
    from iis_fast.sweeps.report import correlations, make_report
    from iis_fast.sweeps.store import ResultStore
    rows = _rows_with_intervals(15, sd=0.05)
    with ResultStore(tmp_path / "r.db") as store:
        for r in rows:
            store.write_checkpoint([r])
        df = store.dataframe()
    u = [__import__("json").loads(r["result_json"])["uncertainty"] for r in rows]
    assert df["iis_lo"].tolist() == [x["iis_ci"][0] for x in u]
    assert df["iis_hi"].tolist() == [x["iis_ci"][1] for x in u]
    assert df["iis_boot_lo"].tolist() == [x["bootstrap"]["iis_ci"][0] for x in u]
    assert df["iis_holdout"].tolist() == [x["selection"]["iis"] for x in u] and (df["repeats"] == 5).all()
    rep = make_report(tmp_path / "r.db", tmp_path / "rep", n_boot=500)
    assert "iis_lo" in rep.text and "iis_boot_hi" in rep.text
    for key in ("iis_vs_acc", "trajectory"):
        assert Path(rep.files[key]).stat().st_size > 1000
    # the correlation's bootstrap draws each IIS within its own interval: wider than the points-only interval
    plain = correlations(df["acc_std"], df["iis"], n_boot=500)
    c = rep.correlation["prototype"]
    assert c["spearman"] == plain["spearman"]
    assert c["spearman_ci"][1] - c["spearman_ci"][0] > plain["spearman_ci"][1] - plain["spearman_ci"][0]


def test_interval_columns_of_a_real_result(real_features):
    import pandas as pd
    from iis_fast.sweeps.store import expand_results
    tx, ty, ex, ey, c = _data(real_features)
    r = score_features(tx, ty, ex, ey, c, backend=FUSED[-1], repeats=2, **OPTS)
    df = expand_results(pd.DataFrame({"result_json": [r.to_json()], "meta_json": [""]}))
    assert df.loc[0, "iis_lo"] == r.uncertainty["iis_ci"][0] and df.loc[0, "iis_sd"] == r.uncertainty["iis_sd"]
    assert df.loc[0, "iis_boot_hi"] == r.uncertainty["bootstrap"]["iis_ci"][1] and df.loc[0, "repeats"] == 2
