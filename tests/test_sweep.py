"""Sweeps (issue 5): checkpoint parsing, the store, resume after SIGKILL, failures, executors, report.

Everything runs the real ``iis_fast.score`` on real Fashion-MNIST with tiny options (M = 10 concepts, 2 sparsities,
1 lr, 2 epochs, 120 train / 60 eval images at 28x28) and tiny random-init small-CNN checkpoints.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists() and \
        not os.environ.get("IIS_FAST_FASHION_MNIST"):
    pytest.skip("Fashion-MNIST idx files not installed", allow_module_level=True)

from iis_fast.sweeps import ResultStore, parse_checkpoints, sweep  # noqa: E402
from iis_fast.sweeps.checkpoints import step_from_name  # noqa: E402
from iis_fast.models.smallcnn import SmallCNN  # noqa: E402

TESTS = Path(__file__).resolve().parent
DATA = "fashion-mnist:n_train=120,n_eval=60"
TINY = dict(num_concepts=10, sparsities=[0.0, 0.5], lrs=[0.01], epochs=2, images_per_class=2, batch_size=64,
            extract_batch_size=128)
MARKER_ENV = "IIS_SWEEP_TEST_MARKER"


def counting_score(model, loader, eval_loader=None, **kw):
    """iis_fast.score, logging 'start <ckpt>' / 'end <ckpt>' lines to $IIS_SWEEP_TEST_MARKER (any process)."""
    from iis_fast.score import score
    marker = os.environ.get(MARKER_ENV)
    ck = os.path.basename(str(kw.get("checkpoint")))
    if marker:
        with open(marker, "a") as f:
            f.write(f"start {ck}\n")
    delay = float(os.environ.get("IIS_SWEEP_TEST_DELAY", "0"))
    if delay:
        time.sleep(delay)
    r = score(model, loader, eval_loader, **kw)
    if marker:
        with open(marker, "a") as f:
            f.write(f"end {ck}\n")
    return r


def _make_ckpts(folder: Path, n: int, corrupt: tuple[int, ...] = ()) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        p = folder / f"step_{i * 10:06d}.pt"
        if i in corrupt:
            p.write_bytes(b"this is not a checkpoint")
        else:
            torch.save({"state_dict": SmallCNN().state_dict(), "step": i * 10, "test_acc": 0.1}, p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> list[Path]:
    return _make_ckpts(tmp_path_factory.mktemp("ckpts"), 4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def _numbers(df):
    """Result numbers that must agree across executors (timings and hosts excluded)."""
    out = {}
    for _, r in df.iterrows():
        j = json.loads(r["result_json"])
        out[os.path.basename(r["path"])] = (r["iis"], r["acc_std"], j["acc"], j["arr"], j["acc_per_lr"])
    return out


# ------------------------------------------------------------------------------------------------ parsing
def test_parse_checkpoints_paths_globs_folders_lists(tmp_path, ckpts):
    assert step_from_name("step_001200.pt") == 1200 and step_from_name("ckpt-7.pth") == 7
    assert step_from_name("model_epoch3.safetensors") == 3 and step_from_name("final.pt") is None
    folder = ckpts[0].parent
    by_folder = parse_checkpoints(folder, arch="iis_smallcnn")
    assert [s.step for s in by_folder] == [0, 10, 20, 30]
    by_glob = parse_checkpoints(str(folder / "step_*.pt"), arch="iis_smallcnn")
    assert [s.path for s in by_glob] == [s.path for s in by_folder]
    lst = tmp_path / "list.csv"
    lst.write_text(f"model_name,path,step,test_acc\niis_smallcnn,{ckpts[1]},5,0.5\n"
                   f"iis_smallcnn,{os.path.relpath(ckpts[2], tmp_path)},,0.7\n")
    specs = parse_checkpoints([lst, ckpts[1]], arch="iis_smallcnn")       # duplicate dropped
    assert [(s.step, s.meta.get("test_acc")) for s in specs] == [(5, "0.5"), (20, "0.7")]
    plain = tmp_path / "plain.txt"
    plain.write_text(f"# model,path\niis_smallcnn,{ckpts[3]}\n")
    assert parse_checkpoints(plain)[0].model == "iis_smallcnn"
    from iis_fast.errors import IISInputError
    with pytest.raises(IISInputError, match="arch"):
        parse_checkpoints(ckpts[0])
    with pytest.raises(IISInputError, match="does not exist"):
        parse_checkpoints(tmp_path / "nope.pt", arch="iis_smallcnn")


# -------------------------------------------------------- inline sweep, idempotence, failures, retry, export
def test_sweep_records_failures_skips_stored_and_retries(tmp_path, cache):
    paths = _make_ckpts(tmp_path / "ck", 3, corrupt=(1,))
    db = tmp_path / "r.db"
    marker = tmp_path / "marker.txt"
    os.environ[MARKER_ENV] = str(marker)
    try:
        df = sweep(paths, DATA, arch="iis_smallcnn", out=db, executor="inline", cache_dir=cache,
                   score_fn=counting_score, progress=False, **TINY)
        assert list(df["status"]) == ["ok", "failed", "ok"]
        bad = df.iloc[1]
        assert "CheckpointError" in bad["error"] and "step_000010.pt" in bad["error"] and np.isnan(bad["iis"])
        assert df.attrs["sweep"]["scored"] == 2 and df.attrs["sweep"]["failed"] == 1
        ok = df[df.status == "ok"]
        assert (ok["iis"] > 0).all() and {"acc@0", "arr@0.5", "t_extract", "t_train"} <= set(df.columns)
        calls = marker.read_text().split()
        # rerun: a no-op (no score call), same table
        df2 = sweep(paths, DATA, arch="iis_smallcnn", out=db, executor="inline", cache_dir=cache,
                    score_fn=counting_score, progress=False, **TINY)
        assert marker.read_text().split() == calls
        assert df2.attrs["sweep"]["already_stored"] == 3 and df2.attrs["sweep"]["scored"] == 0
        assert df2["iis"].equals(df["iis"])
        # repair the file; --retry-failed recomputes only it
        torch.save(SmallCNN().state_dict(), paths[1])
        df3 = sweep(paths, DATA, arch="iis_smallcnn", out=db, executor="inline", cache_dir=cache,
                    score_fn=counting_score, progress=False, retry_failed=True, **TINY)
        new = marker.read_text().split()[len(calls):]
        assert new == ["start", "step_000010.pt", "end", "step_000010.pt"]
        assert list(df3["status"]) == ["ok"] * 3
        # a different config is a new row set; the old rows stay
        sweep(paths[:1], DATA, arch="iis_smallcnn", out=db, executor="inline", cache_dir=cache,
              score_fn=counting_score, progress=False, **{**TINY, "seed": 1})
    finally:
        os.environ.pop(MARKER_ENV, None)
    with ResultStore(db) as store:
        assert store.count() == 4 and store.count("ok") == 4
        store.export(tmp_path / "r.csv")
        store.export(tmp_path / "r.parquet")
    import pandas as pd
    assert len(pd.read_csv(tmp_path / "r.csv")) == 4 and len(pd.read_parquet(tmp_path / "r.parquet")) == 4


# ------------------------------------------------------------------------------------ SIGKILL and resume
_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from iis_fast.sweeps import sweep
    from test_sweep import counting_score, TINY

    if __name__ == "__main__":          # the local executor spawns workers, which re-import this script
        sweep({ckdir!r}, {data!r}, arch="iis_smallcnn", out={db!r}, executor="local", workers=1, threads=1,
              cache_dir={cache!r}, score_fn=counting_score, progress=False, **TINY)
""")


def test_sigkill_mid_sweep_then_resume_loses_and_repeats_nothing(tmp_path, cache):
    n = 6
    _make_ckpts(tmp_path / "ck", n)
    db, marker = tmp_path / "r.db", tmp_path / "marker.txt"
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT.format(tests=str(TESTS), ckdir=str(tmp_path / "ck"), data=DATA, db=str(db),
                                     cache=cache))
    env = {**os.environ, MARKER_ENV: str(marker), "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "IIS_SWEEP_TEST_DELAY": "0.5"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    stored_at_kill = 0
    while time.time() < deadline:
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=5) as c:
                    stored_at_kill = c.execute("SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.OperationalError:
                stored_at_kill = 0
        if stored_at_kill >= 2 or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)              # the driver and its worker, mid-sweep
    proc.wait()
    time.sleep(0.5)
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows_before = {r[0] for r in c.execute("SELECT path FROM results")}
        for status, rj, iis in c.execute("SELECT status, result_json, iis FROM results"):
            assert status == "ok" and iis is not None and json.loads(rj)["iis"] == iis   # whole rows only
    assert 2 <= len(rows_before) < n
    before = marker.read_text().split("\n")

    # resume (same command)
    subprocess.run([sys.executable, str(script)], env=env, check=True, capture_output=True, timeout=600)
    with ResultStore(db) as store:
        df = store.dataframe()
        attempts = store.attempts()
    assert len(df) == n and (df["status"] == "ok").all()                       # nothing lost
    assert df["checkpoint"].is_unique                                          # nothing duplicated
    assert len(attempts) == n and attempts["checkpoint"].is_unique             # each stored exactly once
    lines = [ln for ln in marker.read_text().split("\n") if ln]
    starts = [ln.split()[1] for ln in lines if ln.startswith("start")]
    ends = [ln.split()[1] for ln in lines if ln.startswith("end")]
    finished_before = {ln.split()[1] for ln in before if ln.startswith("end")}
    stored_names = {os.path.basename(p) for p in rows_before}
    assert stored_names <= finished_before
    # nothing stored before the kill was scored again; only the one in flight (started, unstored) was repeated
    resumed_starts = starts[len([ln for ln in before if ln.startswith("start")]):]
    assert not set(resumed_starts) & stored_names
    repeated = {s for s in starts if starts.count(s) > 1}
    assert len(repeated) <= 1 and sorted(set(ends)) == sorted(os.path.basename(p) for p in df["path"])

    # a third run is a no-op
    n_lines = len(lines)
    subprocess.run([sys.executable, str(script)], env=env, check=True, capture_output=True, timeout=600)
    assert len([ln for ln in marker.read_text().split("\n") if ln]) == n_lines


# ------------------------------------------------------------------------------------------------ executors
@pytest.fixture(scope="module")
def local_result(tmp_path_factory, ckpts):
    d = tmp_path_factory.mktemp("local")
    return sweep(ckpts, DATA, arch="iis_smallcnn", out=d / "r.db", executor="local", workers=2, threads=1,
                 cache_dir=str(d / "cache"), progress=False, **TINY)


# each executor gets its own feature cache, so every one of them extracts, builds concepts and trains itself
def test_local_pool_matches_inline(tmp_path, ckpts, local_result):
    inline = sweep(ckpts, DATA, arch="iis_smallcnn", out=tmp_path / "r.db", executor="inline", threads=1,
                   cache_dir=str(tmp_path / "cache"), progress=False, **TINY)
    assert (local_result["status"] == "ok").all()
    assert _numbers(inline) == _numbers(local_result)


def test_ray_executor_matches_local(tmp_path, ckpts, local_result):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)     # a real local Ray instance
    try:
        df = sweep(ckpts, DATA, arch="iis_smallcnn", out=tmp_path / "r.db", executor="ray", workers=2,
                   threads=1, chunk_size=2, cache_dir=str(tmp_path / "cache"), progress=False, **TINY)
    finally:
        ray.shutdown()
    assert (df["status"] == "ok").all() and len(df) == len(ckpts)
    assert _numbers(df) == _numbers(local_result)


def test_submitit_local_executor_matches_local(tmp_path, ckpts, local_result):
    pytest.importorskip("submitit")
    df = sweep(ckpts, DATA, arch="iis_smallcnn", out=tmp_path / "r.db", executor="slurm", workers=2, threads=1,
               cache_dir=str(tmp_path / "cache"), progress=False,
               executor_options={"cluster": "local", "folder": str(tmp_path / "sub"), "poll_s": 0.2}, **TINY)
    assert (df["status"] == "ok").all() and len(df) == len(ckpts)
    assert _numbers(df) == _numbers(local_result)
    assert len(list((tmp_path / "sub" / "spill").glob("*.pkl"))) == len(ckpts)   # preemption-resume spill files


# ------------------------------------------------------------------------------------------------- report
def _fake_rows(n: int, seed: int = 0):
    """Rows of a synthetic trajectory: acc_std rises with step, IIS = noisy function of it."""
    from iis_fast.result import IISResult, iis_from_curve
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        acc_std = 0.5 + 0.4 * i / n + rng.normal(0, 0.02)
        s = [0.0, 0.5, 0.9]
        arr = [1.0, 0.95 - 0.1 * rng.random(), 0.6 + 0.3 * i / n + rng.normal(0, 0.05)]
        r = IISResult(iis=iis_from_curve(s, arr), acc_std=acc_std, sparsities=s, acc=[a * acc_std for a in arr],
                      arr=arr, lrs=[0.01], acc_std_per_lr=[acc_std], acc_per_lr=[[a * acc_std] for a in arr],
                      best_epoch_std=[1], best_epoch=[[1]] * 3, num_concepts=10, library="prototype", seed=0,
                      backend="torch", eval_split="eval", selection_split="eval", n_train=10, n_eval=10,
                      num_classes=10, feature_dim=8)
        rows.append({"checkpoint": f"m@/c/{i}.pt", "model": "m", "path": f"/c/step_{i}.pt", "step": i * 100,
                     "library": "prototype", "config_hash": "h", "status": "ok", "iis": r.iis, "acc_std": acc_std,
                     "config_json": "{}", "meta_json": json.dumps({"test_acc": acc_std + 0.01}),
                     "result_json": r.to_json()})
    return rows


def test_correlations_match_scipy_and_ci_covers():
    from scipy.stats import pearsonr, spearmanr
    from iis_fast.sweeps.report import correlations
    rng = np.random.default_rng(1)
    x = rng.normal(size=60)
    y = 0.6 * x + rng.normal(size=60)
    c = correlations(x, y, n_boot=1000)
    assert c["n"] == 60
    assert c["spearman"] == pytest.approx(spearmanr(x, y)[0], abs=1e-12)
    assert c["spearman_p"] == pytest.approx(spearmanr(x, y)[1], rel=1e-9)
    assert c["pearson"] == pytest.approx(pearsonr(x, y)[0], abs=1e-12)
    for k in ("spearman", "pearson"):
        lo, hi = c[f"{k}_ci"]
        assert lo < c[k] < hi and hi - lo < 0.6
    perfect = correlations(np.arange(10), np.arange(10) ** 3, n_boot=200)
    assert perfect["spearman"] == pytest.approx(1.0) and perfect["spearman_ci"] == (1.0, 1.0)
    assert np.isnan(correlations([1, 2], [3, 4])["pearson"])
    assert np.isnan(correlations([1, 1, 1, 1], [1, 2, 3, 4])["spearman"])


def test_report_writes_table_html_and_pngs(tmp_path):
    from scipy.stats import spearmanr
    from iis_fast.sweeps.report import make_report
    db = tmp_path / "r.db"
    rows = _fake_rows(25)
    with ResultStore(db) as store:
        for r in rows:
            store.write_checkpoint([r])
        store.write_checkpoint([{**rows[0], "checkpoint": "m@/c/bad.pt", "path": "/c/bad.pt", "status": "failed",
                                 "iis": None, "result_json": None, "error": "CheckpointError: corrupt"}])
    rep = make_report(db, tmp_path / "rep", n_boot=300)
    for key in ("iis_vs_acc", "arr_curves", "trajectory", "html", "csv"):
        assert Path(rep.files[key]).stat().st_size > 1000, key
    iis = [r["iis"] for r in rows]
    acc = [r["acc_std"] for r in rows]
    assert rep.correlation["prototype"]["spearman"] == pytest.approx(spearmanr(acc, iis)[0])
    assert rep.correlation_step["prototype"]["spearman"] == pytest.approx(spearmanr(range(25), iis)[0])
    assert "Spearman" in rep.text and "bad.pt: CheckpointError: corrupt" in rep.text
    html = Path(rep.files["html"]).read_text()
    assert "iis_vs_acc.png" in html and "<table" in html


def test_cli_help_and_report(tmp_path, capsys):
    from iis_fast.sweeps.cli import main
    for cmd in ("sweep", "report", "make-checkpoints"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "usage" in capsys.readouterr().out
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        for r in _fake_rows(5):
            store.write_checkpoint([r])
    assert main(["report", str(db), "--n-boot", "50", "--out-dir", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "iis_vs_acc.png").exists()


def test_store_rolls_back_a_checkpoint_that_fails_mid_write(tmp_path):
    db = tmp_path / "r.db"
    good, bad = _fake_rows(2)
    bad = {**bad, "status": "ok", "iis": None}          # violates the CHECK: an ok row needs its numbers
    with ResultStore(db) as store:
        with pytest.raises(sqlite3.IntegrityError):
            store.write_checkpoint([good, bad])
        assert store.count() == 0 and len(store.attempts()) == 0   # all or nothing per checkpoint
        store.write_checkpoint([good])
        assert store.count() == 1


def test_config_fields_added_later_keep_old_rows_at_their_defaults():
    """A database written before repeats/bootstrap/confidence/selection_check existed keeps its rows: at their
    defaults those fields leave the config hash unchanged; any other value is another setting."""
    from iis_fast.config import IISConfig
    from iis_fast.sweeps.store import config_hash
    new = IISConfig(progress=False).to_dict()
    old = {k: v for k, v in new.items() if k not in ("repeats", "bootstrap", "confidence", "selection_check")}
    assert config_hash(new, "d") == config_hash(old, "d")
    for change in ({"repeats": 5}, {"bootstrap": 0}, {"confidence": 0.9}, {"selection_check": True}):
        assert config_hash({**new, **change}, "d") != config_hash(new, "d"), change
