"""Train many probes at once on one frozen backbone's cached spatial maps (docs/spec.md §2.1).

The backbone runs once per split (:func:`~iis_fast.probing.spatial.extract_spatial`); then every
(head, loss) probe sees the same shuffled mini-batches of maps, and one backward of the summed losses updates
them all (their parameters are disjoint and Adam is per-parameter, so this equals training each alone with
the same batches).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import IISInputError
from .attribution import ProbedModel
from .heads import HEAD_NAMES, make_head
from .losses import LOSS_NAMES, get_loss, is_multilabel, official_bce_off
from .spatial import SpatialMaps, extract_spatial

__all__ = ["ProbeResult", "probe", "probe_maps", "probe_key", "mean_average_precision"]


def probe_key(head: str, loss: str) -> str:
    """The name of a probe in results: ``"<head>/<loss>"``, e.g. ``"bcos2/bce"``."""
    return f"{head}/{loss}"


@dataclass
class ProbeResult:
    """What :func:`probe` returns.

    Attributes:
        accuracies: eval score per probe key ``"head/loss"`` (after the last epoch; no epoch selection): top-1
            accuracy, or for multi-label data the mean average precision (``metric``).
        train_accuracies: the same score on the training maps (last epoch, eval mode).
        heads: the trained heads (eval mode) per probe key.
        history: per probe, the mean training loss of each epoch.
        num_classes, feature_shape: C and the ``(D, h, w)`` of the training maps.
        config: the training settings; timings: seconds for feature extraction and training.
        backbone: the frozen backbone (when :func:`probe` got one), for :meth:`model_with_head`.
    """

    accuracies: dict[str, float]
    train_accuracies: dict[str, float]
    heads: dict[str, nn.Module]
    history: dict[str, list[float]]
    num_classes: int
    feature_shape: tuple[int, int, int]
    config: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    backbone: nn.Module | None = None
    metric: str = "top1"

    def model_with_head(self, key: str, backbone: nn.Module | None = None) -> ProbedModel:
        """The backbone with the probe ``key`` (e.g. ``"linear/ce"``) on top, for attribution."""
        bb = backbone if backbone is not None else self.backbone
        if bb is None:
            raise IISInputError("backbone: this result has no backbone (probe_maps); pass backbone=")
        if key not in self.heads:
            raise IISInputError(f"key: no probe {key!r}; have {', '.join(self.heads)}")
        return ProbedModel(bb, self.heads[key])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no weights)."""
        return {"accuracies": self.accuracies, "train_accuracies": self.train_accuracies, "history": self.history,
                "num_classes": self.num_classes, "feature_shape": list(self.feature_shape), "config": self.config,
                "timings": self.timings, "metric": self.metric}

    def table(self) -> str:
        """A plain-text table: probe, train score, eval score (top-1 accuracy, or mAP for multi-label data)."""
        what = "acc" if self.metric == "top1" else "mAP"
        rows = [f"{'probe':<18} {'train ' + what:>9} {'eval ' + what:>9}"]
        for k in self.accuracies:
            rows.append(f"{k:<18} {self.train_accuracies.get(k, float('nan')):>9.4f} {self.accuracies[k]:>9.4f}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes with at least one positive of the average precision of ``scores`` ``[N, C]`` against
    multi-hot ``labels`` ``[N, C]`` (scikit-learn's ``average_precision_score``, the VOC/COCO probing metric)."""
    from sklearn.metrics import average_precision_score
    y, sc = labels.cpu().numpy() > 0.5, scores.detach().float().cpu().numpy()
    aps = [average_precision_score(y[:, c], sc[:, c]) for c in range(y.shape[1]) if y[:, c].any()]
    return float(sum(aps) / len(aps)) if aps else float("nan")


@torch.no_grad()
def _accuracy(heads: dict[str, nn.Module], maps: torch.Tensor, labels: torch.Tensor,
              batch_size: int) -> dict[str, float]:
    """Top-1 accuracy per head, or mAP for multi-hot ``labels``."""
    for h in heads.values():
        h.eval()
    if is_multilabel(labels):
        return {k: mean_average_precision(torch.cat([h(maps[s:s + batch_size])
                                                     for s in range(0, maps.shape[0], batch_size)]), labels)
                for k, h in heads.items()}
    correct = {k: 0 for k in heads}
    for s in range(0, maps.shape[0], batch_size):
        xb, yb = maps[s:s + batch_size], labels[s:s + batch_size]
        for k, h in heads.items():
            correct[k] += int((h(xb).argmax(-1) == yb).sum())
    return {k: c / max(1, maps.shape[0]) for k, c in correct.items()}


def _as_list(v: str | Sequence[str], what: str, allowed: Sequence[str] | None = None) -> list[str]:
    items = [s.strip() for s in v.split(",")] if isinstance(v, str) else [str(s) for s in v]
    items = [s for s in items if s]
    if not items:
        raise IISInputError(f"{what} must name at least one of {', '.join(allowed or [])}")
    if len(set(items)) != len(items):
        raise IISInputError(f"{what} has duplicates: {items}")
    return items


def probe_maps(train: SpatialMaps, eval: SpatialMaps | None = None, heads: str | Sequence[str] = HEAD_NAMES,
               losses: str | Sequence[str] = LOSS_NAMES, *, epochs: int = 10,
               lr: float | Mapping[str, float] = 1e-3, batch_size: int = 256, hidden: int = 2048,
               num_classes: int | None = None, logit_bias: float | None = None, bce_off: float | None = None,
               seed: int = 0, device: str | torch.device = "cpu", progress: bool = False) -> ProbeResult:
    """Train every (head, loss) probe on cached maps; see :func:`probe` for the arguments."""
    head_names = _as_list(heads, "heads", HEAD_NAMES)
    loss_names = _as_list(losses, "losses", LOSS_NAMES)
    loss_fns = {n: get_loss(n) for n in loss_names}
    multilabel = is_multilabel(train.labels)
    if multilabel and "ce" in loss_names:
        raise IISInputError("losses: 'ce' needs one class per image; multi-label probing uses 'bce' only")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise IISInputError(f"epochs must be a positive integer, got {epochs!r}")
    lr_map = dict(lr) if isinstance(lr, Mapping) else {}
    base_lr = lr_map.pop("default", 1e-3) if isinstance(lr, Mapping) else lr
    for v in [base_lr, *lr_map.values()]:
        if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise IISInputError(f"lr must be a positive number or a {{head: lr}} mapping, got {lr!r}")
    if batch_size < 2:
        raise IISInputError(f"batch_size must be >= 2 (BatchNorm in the MLP/B-cos heads), got {batch_size}")
    if len(train) < 2:
        raise IISInputError(f"loader must give at least 2 training images, got {len(train)}")
    if multilabel:
        c = int(train.labels.shape[1])
        if (num_classes is not None and int(num_classes) != c) or c < 2:
            raise IISInputError(f"multi-hot labels have {c} columns; num_classes={num_classes} must match and be >= 2")
    else:
        c = int(num_classes) if num_classes is not None else int(train.labels.max()) + 1
        if c < 2 or int(train.labels.min()) < 0 or int(train.labels.max()) >= c:
            raise IISInputError(f"labels must lie in 0..num_classes-1 with num_classes >= 2; got labels "
                                f"{int(train.labels.min())}..{int(train.labels.max())}, num_classes={c}")
    if eval is not None and is_multilabel(eval.labels) != multilabel:
        raise IISInputError("train and eval labels must both be class ids [N] or both multi-hot [N, C]")
    d = train.maps.shape[1]
    torch.manual_seed(seed)
    probes = nn.ModuleDict()
    for hn in head_names:
        for ln in loss_names:
            probes[probe_key(hn, ln).replace("/", "__")] = make_head(hn, d, c, hidden=hidden, logit_bias=logit_bias)
    probes.to(device)
    keys = {k: k.replace("__", "/") for k in probes}
    offs = {k: (official_bce_off(keys[k].split("/")[0], c, multilabel) if bce_off is None else float(bce_off))
            for k in probes}

    def lr_of(hn: str) -> float:   # a bias-free head takes its biased sibling's rate unless named itself
        return float(lr_map.get(hn, lr_map.get(hn.removesuffix("_nobias"), base_lr)))

    opt = torch.optim.Adam([{"params": h.parameters(), "lr": lr_of(keys[k].split("/")[0])}
                            for k, h in probes.items()])
    steps_per_epoch = math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    maps, labels = train.maps.to(device), train.labels.to(device)
    gen = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {keys[k]: [] for k in probes}
    t0 = time.perf_counter()
    ep_iter: Iterable[int] = range(epochs)
    if progress:
        from tqdm import tqdm
        ep_iter = tqdm(ep_iter, desc=f"training {len(probes)} probes", leave=False)
    for _ in ep_iter:
        probes.train()
        perm = torch.randperm(len(train), generator=gen).to(device)
        sums = {k: 0.0 for k in probes}
        n_batches = 0
        for s in range(0, len(train), batch_size):
            idx = perm[s:s + batch_size]
            if idx.numel() < 2:   # BatchNorm cannot train on one sample
                continue
            xb, yb = maps[idx], labels[idx]
            total = 0.0
            for k, h in probes.items():
                ln = keys[k].split("/")[1]
                l = loss_fns[ln](h(xb), yb, offs[k]) if ln == "bce" else loss_fns[ln](h(xb), yb)
                sums[k] += float(l.detach())
                total = total + l
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            n_batches += 1
        for k in probes:
            history[keys[k]].append(sums[k] / max(1, n_batches))
    t_train = time.perf_counter() - t0
    heads_out = {keys[k]: h.eval() for k, h in probes.items()}
    train_acc = _accuracy(heads_out, maps, labels, 1024)
    acc = _accuracy(heads_out, eval.maps.to(device), eval.labels.to(device), 1024) if eval is not None else {}
    cfg = {"heads": head_names, "losses": loss_names, "epochs": epochs,
           "lr": {hn: lr_of(hn) for hn in head_names}, "batch_size": batch_size,
           "hidden": hidden, "seed": seed, "optimizer": "Adam (no weight decay), cosine lr per step",
           "n_train": len(train), "n_eval": len(eval) if eval is not None else 0,
           "multilabel": multilabel, "logit_bias": logit_bias,
           "bce_off": {keys[k]: offs[k] for k in probes if keys[k].endswith("/bce")}}
    return ProbeResult(acc, train_acc, heads_out, history, c, tuple(train.maps.shape[1:]), cfg,  # type: ignore[arg-type]
                       {"train_s": t_train, "features_s": train.seconds + (eval.seconds if eval else 0.0)},
                       metric="mAP" if multilabel else "top1")


def probe(model: nn.Module, loader: Iterable | SpatialMaps, eval_loader: Iterable | SpatialMaps | None = None,
          heads: str | Sequence[str] = HEAD_NAMES, losses: str | Sequence[str] = LOSS_NAMES, *, epochs: int = 10,
          lr: float | Mapping[str, float] = 1e-3, batch_size: int = 256, hidden: int = 2048,
          num_classes: int | None = None, logit_bias: float | None = None, bce_off: float | None = None,
          seed: int = 0, device: str | torch.device = "cpu", cache_dir: str | None = None,
          progress: bool = False) -> ProbeResult:
    """Train a set of probes at once on one frozen backbone and report each one's accuracy.

    The backbone's last-stage spatial maps are extracted once per split (and cached on disk with
    ``cache_dir``); every (head, loss) probe is then trained on the same cached maps with Adam (no weight
    decay, cosine learning-rate decay per step), ``epochs`` passes in shuffled mini-batches.

    Multi-label data (labels multi-hot ``[B, C]``, e.g. VOC / COCO) trains with ``bce`` only and reports the mean
    average precision instead of top-1 accuracy.

    Args:
        model: the frozen backbone (a timm model: its ``forward_features`` map is used).
        loader: TRAIN ``(images, labels)`` batches (labels: class ids ``[B]`` or multi-hot ``[B, C]``), or
            precomputed :class:`SpatialMaps`.
        eval_loader: evaluation batches (or maps); without it ``accuracies`` is empty.
        heads: names from ``linear, mlp2, mlp3, bcos1, bcos2, bcos3`` and the bias-free ``linear_nobias,
            mlp2_nobias, mlp3_nobias`` (list or comma-separated string).
        losses: ``ce`` and/or ``bce`` (BCE targets ``clamp(y, min=off)`` of the one-hot / multi-hot labels ``y``).
        epochs, lr, batch_size: the training recipe; ``lr`` may be a mapping ``{head name: lr}`` (key
            ``"default"`` for the rest), e.g. a larger rate for the linear head (``linear_nobias`` takes the
            ``linear`` rate unless it has its own key).
        hidden: width of the MLP/B-cos hidden layers (2048, as the paper).
        num_classes: C (default: max train label + 1, or the width of multi-hot labels).
        logit_bias: the fixed logit bias of bias-free and B-cos heads (default ``-ln(C - 1)``).
        bce_off: the BCE off-target value (default: the official one, ``1/C``, and 0 for linear / MLP heads on
            multi-label data; see :func:`~iis_fast.probing.losses.official_bce_off`).
        seed: head init and shuffling.

    Returns:
        :class:`ProbeResult`, with accuracies and trained heads keyed ``"head/loss"``.
    """
    def maps_of(src: Iterable | SpatialMaps) -> SpatialMaps:
        return src if isinstance(src, SpatialMaps) else extract_spatial(model, src, device, cache_dir, progress)

    train = maps_of(loader)
    ev = maps_of(eval_loader) if eval_loader is not None else None
    res = probe_maps(train, ev, heads, losses, epochs=epochs, lr=lr, batch_size=batch_size, hidden=hidden,
                     num_classes=num_classes, logit_bias=logit_bias, bce_off=bce_off, seed=seed, device=device,
                     progress=progress)
    res.backbone = model
    return res
