"""Generate a real training trajectory to sweep: the small CNN trained on Fashion-MNIST on the CPU.

:func:`make_checkpoints` trains :class:`~iis_fast.models.smallcnn.SmallCNN` (timm name ``iis_smallcnn``) with
Adam and saves a checkpoint every ``every`` steps (step 0, the random initialisation, included), each as
``{"state_dict": ..., "step": int, "epoch": float, "test_acc": float}`` (readable by
:func:`iis_fast.models.load_checkpoint`), plus a manifest ``checkpoints.csv`` with columns
``model_name,path,step,epoch,test_acc,train_loss`` that ``iis-fast sweep`` accepts directly.
``test_acc`` of intermediate checkpoints is measured on a fixed stratified subset of the TEST split
(``eval_subset`` images); the final checkpoint is also measured on the full test split (``final_test_acc``).
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.smallcnn import FASHION_MNIST_MEAN, FASHION_MNIST_STD, SMALLCNN_NAME, SmallCNN

__all__ = ["TrainSummary", "make_checkpoints"]


@dataclass
class TrainSummary:
    """What :func:`make_checkpoints` produced."""

    out_dir: str
    manifest: str
    num_checkpoints: int
    steps: int
    epochs: float
    final_test_acc: float          # full TEST split (10,000 images)
    seconds: float


def _tensor_split(split: str, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    from ..data import load_fashion_mnist

    images, labels = load_fashion_mnist(split, root)
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).unsqueeze(1)
    x = (x - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    return x, torch.from_numpy(np.asarray(labels))


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch].expand(-1, 3, -1, -1)
        correct += int((model(xb).argmax(1) == y[i:i + batch]).sum())
    model.train(was)
    return correct / max(1, x.shape[0])


def make_checkpoints(out_dir: str | os.PathLike[str], *, epochs: float = 3.0, batch_size: int = 128,
                     num_checkpoints: int = 100, lr: float = 2e-3, seed: int = 0, eval_subset: int = 2000,
                     width: int = 24, threads: int | None = None, root: str | None = None,
                     progress: bool = True) -> TrainSummary:
    """Train the small CNN on Fashion-MNIST (CPU) and save ``num_checkpoints`` + 1 evenly spaced checkpoints.

    Args:
        out_dir: where ``step_XXXXXX.pt`` files and ``checkpoints.csv`` go (created).
        epochs: passes over the 60,000 TRAIN images (fractional allowed).
        batch_size: training batch; steps = ceil(epochs * 60000 / batch_size).
        num_checkpoints: checkpoints after step 0; one every ``steps // num_checkpoints`` steps, and the last step.
        lr: Adam learning rate (cosine-decayed to 0 over the run).
        seed: initialisation and shuffling seed.
        eval_subset: stratified TEST images used for each checkpoint's ``test_acc``.
        width: first-stage channels of :class:`SmallCNN` (the timm default is 24; other widths need
            ``create_model("iis_smallcnn", width=...)``).
        threads: torch CPU threads (default: keep torch's setting).
        root: Fashion-MNIST idx directory (default: the Debian path or $IIS_FAST_FASHION_MNIST).
        progress: show a tqdm bar.

    Returns:
        A :class:`TrainSummary`; ``summary.json`` in ``out_dir`` holds the same.
    """
    from tqdm.auto import tqdm

    from ..data import stratified_subset

    if threads:
        torch.set_num_threads(int(threads))
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x_tr, y_tr = _tensor_split("train", root)
    x_te, y_te = _tensor_split("test", root)
    sub = torch.from_numpy(stratified_subset(y_te.numpy(), min(eval_subset, len(y_te)), seed))
    x_ev, y_ev = x_te[sub], y_te[sub]

    model = SmallCNN(num_classes=10, width=width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(x_tr.shape[0] / batch_size)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    every = max(1, total // max(1, num_checkpoints))
    save_at = set(range(0, total + 1, every)) | {total}
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    loss_ema = float("nan")

    def save(step: int) -> None:
        acc = _accuracy(model, x_ev, y_ev)
        path = out / f"step_{step:06d}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save({"state_dict": model.state_dict(), "step": step, "epoch": step / steps_per_epoch,
                    "test_acc": acc}, tmp)
        os.replace(tmp, path)
        rows.append({"model_name": SMALLCNN_NAME, "path": path.name, "step": step,
                     "epoch": round(step / steps_per_epoch, 4), "test_acc": round(acc, 5),
                     "train_loss": round(loss_ema, 5) if loss_ema == loss_ema else ""})

    model.train()
    save(0)
    bar = tqdm(total=total, desc="training iis_smallcnn", unit="step", disable=not progress)
    step = 0
    while step < total:
        perm = torch.randperm(x_tr.shape[0], generator=gen)
        for i in range(0, x_tr.shape[0], batch_size):
            if step >= total:
                break
            idx = perm[i:i + batch_size]
            xb = x_tr[idx].expand(-1, 3, -1, -1)
            flip = torch.rand(xb.shape[0], generator=gen) < 0.5      # horizontal flip augmentation
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            loss = nn.functional.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_ema = float(loss) if loss_ema != loss_ema else 0.95 * loss_ema + 0.05 * float(loss)
            bar.update(1)
            if step in save_at:
                save(step)
                bar.set_postfix(loss=f"{loss_ema:.3f}", test_acc=f"{rows[-1]['test_acc']:.3f}")
    bar.close()
    final = _accuracy(model, x_te, y_te)
    manifest = out / "checkpoints.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = TrainSummary(out_dir=str(out), manifest=str(manifest), num_checkpoints=len(rows), steps=total,
                           epochs=total / steps_per_epoch, final_test_acc=final,
                           seconds=round(time.perf_counter() - t_start, 1))
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=1))
    return summary
