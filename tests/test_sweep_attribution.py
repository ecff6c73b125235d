"""The attribution measure of a sweep (issue 19): How-to-Probe rows beside IIS, per checkpoint.

Real ``iis_fast.score`` and real probes/attributions on real Fashion-MNIST (120 train / 60 eval images, 28x28) with
tiny options, on small-CNN checkpoints. Asserted: the stored rows equal what the probing API gives for that
checkpoint alone; IIS rows already stored are not recomputed when the measure is added; a SIGKILL mid-sweep leaves
whole checkpoints only (IIS and attribution rows together) and a re-run completes them; a failing write stores
nothing of the checkpoint.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists() and \
        not os.environ.get("IIS_FAST_FASHION_MNIST"):
    pytest.skip("Fashion-MNIST idx files not installed", allow_module_level=True)

from iis_fast.errors import IISInputError  # noqa: E402
from iis_fast.sweeps import ResultStore, sweep  # noqa: E402
from iis_fast.sweeps.attribution import AttributionConfig, load_attribution, parse_measures  # noqa: E402

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from test_sweep import DATA, TINY, _make_ckpts  # noqa: E402

ATTR = dict(epochs=2, n_grids=2, hidden=16, batch_size=32)
ROWS_PER_CKPT = 2 * 2 + 3 * 2          # linear x (ixg, gradcam), bcos2 x (ixg, gradcam, bcos); CE and BCE


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> list[Path]:
    return _make_ckpts(tmp_path_factory.mktemp("ckpts"), 2)


def test_added_measure_keeps_iis_rows_and_equals_the_probing_api(tmp_path, ckpts):
    from iis_fast.data.sources import prepare_data
    from iis_fast.models import create_model, preprocessing_config
    from iis_fast.probing import attribution_quality, make_grids, probe

    kw = dict(arch="iis_smallcnn", out=tmp_path / "r.db", executor="inline", threads=1,
              cache_dir=str(tmp_path / "cache"), progress=False, **TINY)
    df_iis = sweep(ckpts, DATA, **kw)
    assert "attribution" not in df_iis.attrs
    df = sweep(ckpts, DATA, measures="iis,attribution", attribution=ATTR, **kw)
    with ResultStore(tmp_path / "r.db") as store:
        attempts = store.attempts()
    att = df.attrs["attribution"]
    assert df.attrs["sweep"]["scored"] == 2 and df["iis"].tolist() == df_iis["iis"].tolist()
    assert len(attempts[attempts["config_hash"].isin(df["config_hash"])]) == 2      # IIS not recomputed
    assert len(att) == 2 * ROWS_PER_CKPT and (att["status"] == "ok").all()
    assert att.groupby("checkpoint").size().tolist() == [ROWS_PER_CKPT] * 2

    # the same checkpoint alone, through the public probing API, on the sweep's data and grids
    torch.set_num_threads(1)
    backbone = create_model("iis_smallcnn", checkpoint=str(ckpts[1])).eval()
    train, ev = prepare_data(DATA, preprocessing_config(backbone), str(tmp_path / "cache")).loaders()
    cfg = AttributionConfig.from_options(ATTR)
    res = probe(backbone, train, ev, cfg.heads, cfg.losses, epochs=cfg.epochs,
                lr={"default": cfg.lr, "linear": cfg.lr_linear}, batch_size=cfg.batch_size, hidden=cfg.hidden,
                seed=cfg.seed)
    ex = torch.cat([b[0] for b in ev])
    ey = torch.cat([b[1] for b in ev])
    grids = make_grids(ex, ey, cfg.n_grids, cfg.grid_size, cfg.seed)      # no model: the same images for all
    mine = att[att["path"] == str(ckpts[1])]
    for (head, loss), rows in mine.groupby(["head", "loss"]):
        key = f"{head}/{loss}"
        q = attribution_quality(res.model_with_head(key), ex, ey, list(rows["method"]), grids=grids,
                                ig_steps=cfg.ig_steps)
        assert rows["accuracy"].iloc[0] == res.accuracies[key]
        for _, r in rows.iterrows():
            assert (r["gridpg"], r["entropy"], r["gini"]) == tuple(q.scores[r["method"]][m]
                                                                   for m in ("gridpg", "entropy", "gini"))

    # a third run computes nothing
    again = sweep(ckpts, DATA, measures="iis,attribution", attribution=ATTR, **kw)
    assert again.attrs["sweep"]["scored"] == 0 and again.attrs["sweep"]["already_stored"] == 2
    assert again.attrs["attribution"].drop(columns=["created_at"]).equals(att.drop(columns=["created_at"]))


def test_an_overwritten_checkpoint_keeps_its_old_attribution_rows_as_history(tmp_path):
    from iis_fast.features import file_sha256
    from iis_fast.models.smallcnn import SmallCNN
    paths = _make_ckpts(tmp_path / "ck", 2)
    kw = dict(arch="iis_smallcnn", out=tmp_path / "r.db", executor="inline", threads=1, progress=False,
              cache_dir=str(tmp_path / "cache"), measures="iis,attribution", attribution=ATTR, **TINY)
    old = sweep(paths, DATA, **kw).attrs["attribution"]
    torch.manual_seed(1234)
    torch.save({"state_dict": SmallCNN().state_dict(), "step": 10, "test_acc": 0.1}, paths[1])   # other weights
    df = sweep(paths, DATA, **kw)
    new = df.attrs["attribution"]
    assert df.attrs["sweep"]["scored"] == 1 and len(new) == 2 * ROWS_PER_CKPT
    mine = new["path"] == str(paths[1])
    assert (new[mine]["content_hash"] == file_sha256(paths[1])).all()
    assert new[~mine].drop(columns=["created_at"]).equals(old[old["path"] == str(paths[0])]
                                                         .drop(columns=["created_at"]))
    hist = load_attribution(tmp_path / "r.db", status=None, history=True)
    was = old[old["path"] == str(paths[1])].reset_index(drop=True)
    assert len(hist) == ROWS_PER_CKPT and hist["replaced_at"].notna().all()
    assert hist.drop(columns=["replaced_at"]).equals(was)         # the old rows, every column as it was
    assert not new[mine]["gridpg"].reset_index(drop=True).equals(was["gridpg"])
    again = sweep(paths, DATA, **kw)                               # nothing changed: nothing moves
    assert again.attrs["sweep"]["scored"] == 0
    assert len(load_attribution(tmp_path / "r.db", status=None, history=True)) == ROWS_PER_CKPT


_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from iis_fast.sweeps import sweep
    from test_sweep import counting_score, TINY
    from test_sweep_attribution import ATTR

    if __name__ == "__main__":          # the local executor spawns workers, which re-import this script
        sweep({ckdir!r}, {data!r}, arch="iis_smallcnn", out={db!r}, executor="local", workers=1, threads=1,
              cache_dir={cache!r}, score_fn=counting_score, progress=False, measures="iis,attribution",
              attribution=ATTR, **TINY)
""")


def _whole_checkpoints(db: Path) -> tuple[set[str], set[str]]:
    """(checkpoints with an IIS row, checkpoints with all their attribution rows); asserts no partial one."""
    with sqlite3.connect(db, timeout=10) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        iis = {r[0] for r in c.execute("SELECT checkpoint FROM results WHERE status = 'ok'")}
        counts = dict(c.execute("SELECT checkpoint, COUNT(*) FROM attribution WHERE status = 'ok' "
                                "GROUP BY checkpoint").fetchall())
    assert set(counts.values()) <= {ROWS_PER_CKPT}, counts
    return iis, set(counts)


def test_sigkill_mid_checkpoint_leaves_whole_checkpoints_and_resume_completes(tmp_path):
    n = 4
    _make_ckpts(tmp_path / "ck", n)
    db = tmp_path / "r.db"
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(tests=str(TESTS), ckdir=str(tmp_path / "ck"), data=DATA, db=str(db),
                                     cache=str(tmp_path / "cache")))
    env = {**os.environ, "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline, stored = time.time() + 300, 0
    while time.time() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(db, timeout=5) as c:
                stored = c.execute("SELECT COUNT(DISTINCT checkpoint) FROM attribution").fetchone()[0]
        except sqlite3.OperationalError:
            stored = 0
        if stored >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    time.sleep(1.0)                                       # into the next checkpoint's IIS or attribution
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    iis, attr = _whole_checkpoints(db)
    assert iis == attr and 1 <= len(iis) < n              # a checkpoint has both measures' rows or none

    subprocess.run([sys.executable, str(script)], env=env, check=True, capture_output=True, timeout=600)
    iis2, attr2 = _whole_checkpoints(db)
    assert len(iis2) == n and iis2 == attr2
    with ResultStore(db) as store:
        attempts = store.attempts()
        df = store.dataframe()
    per_ckpt = attempts.groupby(["checkpoint", "config_hash"]).size()
    assert (per_ckpt == 1).all() and len(per_ckpt) == 2 * n   # each measure of each checkpoint stored once
    assert set(load_attribution(db)["checkpoint"]) == set(df["checkpoint"])


def test_a_failing_write_stores_nothing_of_the_checkpoint(tmp_path):
    iis_row = {"checkpoint": "c", "model": "m", "path": "p", "step": 0, "library": "prototype", "config_hash": "h",
               "status": "ok", "iis": 0.5, "acc_std": 0.8, "result_json": "{}", "config_json": "{}"}
    bad = {"measure": "attribution", "checkpoint": "c", "config_hash": "a", "head": "linear", "loss": "ce",
           "method": "ixg", "status": "ok", "accuracy": 0.8, "gridpg": None, "config_json": "{}"}
    with ResultStore(tmp_path / "r.db") as store:
        with pytest.raises(sqlite3.IntegrityError):
            store.write_checkpoint([iis_row, bad])         # an ok attribution row needs its GridPG
        assert store.count() == 0 and len(load_attribution(store, status=None)) == 0
        assert len(store.attempts()) == 0
        store.write_checkpoint([iis_row, {**bad, "gridpg": 0.3}])
        assert store.count() == 1 and load_attribution(store)["gridpg"].tolist() == [0.3]


def test_options_are_checked():
    assert parse_measures("iis, attribution") == ("iis", "attribution")
    for bad in ("", "iis,gridpg"):
        with pytest.raises(IISInputError, match="measures"):
            parse_measures(bad)
    assert AttributionConfig.from_options({"heads": "linear,bcos1"}).heads == ("linear", "bcos1")
    for opts, what in (({"heads": "conv"}, "heads"), ({"methods": ["lrp"]}, "methods"), ({"epochs": 0}, "epochs"),
                       ({"n_grid": 2}, "n_grids")):
        with pytest.raises(IISInputError, match=what):
            AttributionConfig.from_options(opts)


def test_report_correlates_gridpg_with_iis_acc_and_step(tmp_path):
    """The report's attribution part on a synthetic trajectory: its numbers are correlations() of the rows."""
    import numpy as np

    from iis_fast.sweeps import make_report
    from iis_fast.sweeps.report import correlations
    from test_sweep import _fake_rows

    db, rng = tmp_path / "r.db", np.random.default_rng(1)
    with ResultStore(db) as store:
        for r in _fake_rows(8):
            att = [{"measure": "attribution", "checkpoint": r["checkpoint"], "path": r["path"], "step": r["step"],
                    "config_hash": "a", "head": head, "loss": "bce", "method": "gradcam", "status": "ok",
                    "accuracy": r["acc_std"], "gridpg": float(rng.random()), "config_json": "{}"}
                   for head in ("linear", "bcos2")]
            store.write_checkpoint([r, *att])
    rep = make_report(db, tmp_path / "out", n_boot=200)
    assert {"gridpg_vs_iis", "trajectory_attribution"} <= set(rep.files)
    assert all(Path(rep.files[k]).stat().st_size > 0 for k in ("gridpg_vs_iis", "trajectory_attribution"))
    rows = load_attribution(db).merge(rep.table[["checkpoint", "iis", "acc_std"]], on="checkpoint")
    assert [(c["head"], c["method"]) for c in rep.attribution] == [("bcos2", "gradcam"), ("linear", "gradcam")]
    for c in rep.attribution:
        d = rows[rows["head"] == c["head"]]
        assert c["vs_iis"] == correlations(d["iis"], d["gridpg"], n_boot=200)
        assert c["vs_acc_std"] == correlations(d["acc_std"], d["gridpg"], n_boot=200)
        assert c["vs_step"] == correlations(d["step"], d["gridpg"], n_boot=200)
    assert "GridPG per probe and method" in rep.text and "Attribution quality" in (tmp_path / "out" /
                                                                                   "report.html").read_text()


def test_command_line_options_reach_the_measure():
    import argparse

    from iis_fast.sweeps.cli import _attribution_options, register

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    a = p.parse_args(["sweep", "ck/", "--measure", "iis,attribution", "--probe-heads", "linear", "--probe-methods",
                      "gradcam,ig", "--grids", "4", "--probe-hidden", "32"])
    assert a.measure == "iis,attribution"
    opts = _attribution_options(a)
    assert opts == {"heads": "linear", "methods": "gradcam,ig", "n_grids": 4, "hidden": 32}
    cfg = AttributionConfig.from_options(opts)
    assert (cfg.heads, cfg.methods, cfg.n_grids, cfg.losses) == (("linear",), ("gradcam", "ig"), 4, ("ce", "bce"))
    assert _attribution_options(p.parse_args(["sweep", "ck/"])) == {}
