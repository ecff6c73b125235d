"""A user's own training run, end to end, as a user would walk it: a 10-class image folder, a tiny timm model
trained for a few steps, checkpoints saved the ways common training loops save them, then `iis-fast sweep`
with --arch and `iis-fast report` in fresh processes."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ARCH = "test_resnet"
K = 10


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-m", "iis_fast", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, f"iis-fast {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fmnist_train) -> Path:
    """imgs/train (12 per class) and imgs/val (5 per class) PNG folders of real Fashion-MNIST images, and a
    run/ folder of three checkpoints of a 10-class test_resnet trained on imgs/train."""
    from iis_fast.data.fashion_mnist import FASHION_MNIST_CLASSES
    from iis_fast.models import create_model

    root = tmp_path_factory.mktemp("own_run")
    images, labels = fmnist_train
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 5)):
        for c in range(K):
            d = root / "imgs" / split / FASHION_MNIST_CLASSES[c].replace("/", "-")
            d.mkdir(parents=True)
            pick = rng.choice(np.flatnonzero(labels == c), n, replace=False)
            for i in pick:
                Image.fromarray(images[i]).save(d / f"{i}.png")

    # a few training steps, as a user's own loop would take them
    import torchvision
    from torchvision import transforms as T
    ds = torchvision.datasets.ImageFolder(str(root / "imgs" / "train"), transform=T.Compose([
        T.Grayscale(3), T.Resize(64), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]))
    torch.manual_seed(0)
    model = create_model(ARCH, num_classes=K).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(ds, batch_size=40, shuffle=True)
    run = root / "run"
    run.mkdir()
    saves = {
        2: lambda sd: (run / "step_2.pth", sd),                                                  # plain state_dict
        4: lambda sd: (run / "step_4.ckpt", {"state_dict": {f"model.{k}": v for k, v in sd.items()},  # Lightning
                                            "epoch": 1, "global_step": 4, "optimizer_states": []}),
        6: lambda sd: (run / "step_6.pt", {"model": {f"module.{k}": v for k, v in sd.items()},   # DDP
                                          "optimizer": opt.state_dict(), "step": 6}),
    }
    step = 0
    while step < 6:
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step in saves:
                path, obj = saves[step]({k: v.detach().clone() for k, v in model.state_dict().items()})
                torch.save(obj, path)
            if step == 6:
                break
    return root


def test_sweep_and_report_own_k_class_checkpoints(run_dir) -> None:
    small = ["--epochs", "5", "--num-concepts", "20", "--images-per-class", "2", "--lrs", "0.01",
             "--sparsities", "0,0.5,0.9", "--cache-dir", str(run_dir / "cache"), "--no-progress"]
    r = _run("sweep", "run", "--arch", ARCH, "--data", "imgs/train", "--eval-data", "imgs/val",
             "--out", "r18.db", "--executor", "inline", *small, cwd=run_dir)
    assert "3 ok / 3 rows in r18.db" in r.stdout, r.stdout + r.stderr
    # what was unwrapped is said, one line per wrapped checkpoint
    assert "step_4.ckpt" in r.stderr and "'model.' stripped" in r.stderr, r.stderr
    assert "step_6.pt" in r.stderr and "'module.' stripped" in r.stderr, r.stderr
    notes = [ln for ln in r.stderr.splitlines() if "CheckpointAdapted" in ln]
    assert len(notes) == 2 and all(ln.startswith("iis-fast: CheckpointAdapted: checkpoint ") for ln in notes), notes
    with sqlite3.connect(run_dir / "r18.db") as db:
        rows = db.execute("SELECT path, status, step, iis, acc_std, n_train, n_eval FROM results ORDER BY step").fetchall()
    assert [Path(p).name for p, *_ in rows] == ["step_2.pth", "step_4.ckpt", "step_6.pt"]
    assert all(s == "ok" for _, s, *_ in rows) and [st for _, _, st, *_ in rows] == [2, 4, 6]
    for _, _, _, iis, acc_std, n_train, n_eval in rows:
        assert 1 / K < acc_std <= 1 and np.isfinite(iis) and iis > 0 and n_train == 120 and n_eval == 50
    rep = _run("report", "r18.db", "--out-dir", "report", "--n-boot", "50", cwd=run_dir)
    assert (run_dir / "report" / "report.html").stat().st_size > 1000
    assert (run_dir / "report" / "trajectory.png").is_file()
    assert "step_6.pt" in rep.stdout or "ok" in rep.stdout

    # one checkpoint through `iis-fast score`, the same data spec: the stored row's IIS again (features cached)
    s = _run("score", ARCH, "--checkpoint", "run/step_4.ckpt", "--data", "imgs/train", "--eval-data", "imgs/val",
             "--json", "s4.json", *small, cwd=run_dir)
    import json
    got = json.loads((run_dir / "s4.json").read_text())
    assert got["num_classes"] == K and got["n_train"] == 120
    assert got["iis"] == pytest.approx(rows[1][3], abs=1e-9)
