"""Interpretability-maximising fine-tuning (the IIS paper's first application; docs/applications.md).

The backbone f is trained so that its sparse concept interpretation also classifies:

    loss = CE(probe(f(x)), y) + lam * CE(head_s(f(x)), y)

with ``head_s`` the concept head of docs/spec.md §1.3 (a = f(x)·Cᵀ -> LayerNorm -> keep |z| above the
(int(M*s)+1)-th smallest -> Linear) at one sparsity s, and C the prototype concept library: M element images
(patches / segments of training images) embedded by the *current* f. Probe and head train jointly with f.

How the pieces fit:
- Only the last ``train_blocks`` blocks (or all of f) train. The frozen part before them (the "prefix") runs once
  over the data, in the extraction dtype, and its outputs are held in memory; every step runs only the trainable
  "tail". Fine-tuning all of f holds the images themselves.
- C is rebuilt from the current f at the start of every epoch (``concept_update="epoch"``, the default), every N
  steps (an int), or kept as built from the initial f (``"fixed"``). Between rebuilds C is a constant: the
  objective's gradient reaches f through f(x), not through C.
- lam weighs what reaches f. The probe and the head train at full weight on their own CE (so the control,
  lam = 0, still has a trained concept head whose accuracy can be reported); under Adam this differs from
  training them on the literal sum only by the epsilon.
- A checkpoint is written after every epoch (``checkpoint_dir/epoch_NNN.pt``); a run started again with the same
  arguments and directory resumes from the last one and ends in the same state as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IISInputError

CONCEPT_UPDATES = ("epoch", "fixed")
FINETUNE_LIBRARIES = ("prototype",)
CHECKPOINT_VERSION = 1


# ------------------------------------------------------------------------------------------------ the model
class _Tail(nn.Module):
    """The trainable part of the backbone: prefix output (or images) -> representation [B, D]."""

    def __init__(self, model: nn.Module, start: int | None, layer: str | None):
        super().__init__()
        self.model = model
        self.start = start          # first trainable block of model.blocks; None: the whole model
        self.layer = layer

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.start is None:
            return representation(m, self.layer)(h)
        h = m.blocks[self.start:](h)
        return m.forward_head(m.bn2(m.conv_head(h)), pre_logits=True).flatten(1)


def representation(model: nn.Module, layer: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> [B, D] representation, differentiable: the same choice as :func:`iis_fast.features.representation_fn`
    (``layer``'s pooled output; timm pre-logits; else the input of the final classifier Linear) without its
    inference mode."""
    from ..features import _find_classifier, _hooked, _pool
    if layer is not None:
        try:
            sub = model.get_submodule(layer)
        except AttributeError:
            raise IISInputError(f"layer={layer!r} is not a submodule of {type(model).__name__}") from None
        return _hooked(model, sub, lambda mod, inp, out: _pool(out, f"layer {layer!r}"), forward=True)
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return lambda x: model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)
    clf = _find_classifier(model)
    if clf is None:
        raise IISInputError(f"cannot find the representation of {type(model).__name__}: it is neither a timm model "
                            "nor has a final classifier Linear (fc/classifier/head); pass layer='<module name>'")
    return _hooked(model, clf, lambda mod, inp: inp[0].flatten(1), forward=False)


def split_backbone(model: nn.Module, train_blocks: int | None, layer: str | None = None
                   ) -> tuple[Callable[[torch.Tensor], torch.Tensor], _Tail, list[nn.Parameter]]:
    """(frozen prefix, trainable tail, the tail's parameters) for fine-tuning the last ``train_blocks`` blocks.

    ``train_blocks=None`` trains all of the model (the prefix is the identity). A number needs a timm
    EfficientNet-family model (``conv_stem, bn1, blocks, conv_head, bn2``: MobileNetV2, EfficientNet(-Lite),
    MobileNetV3), whose ``forward_features`` is exactly stem -> blocks -> head conv.
    """
    representation(model, layer)            # a model without a findable representation fails here, named
    if train_blocks is None:
        params = [p for p in model.parameters()]
        return (lambda x: x), _Tail(model, None, layer), params
    names = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")
    if layer is not None or not all(hasattr(model, n) for n in names) or not isinstance(model.blocks, nn.Sequential):
        raise IISInputError(f"train_blocks={train_blocks} needs a timm EfficientNet-family model (conv_stem, blocks, "
                            f"conv_head: mobilenetv2_*, efficientnet_*) and no layer=; {type(model).__name__} is "
                            "not one: pass train_blocks=None to fine-tune the whole model")
    n = len(model.blocks)
    if isinstance(train_blocks, bool) or not isinstance(train_blocks, int) or not 1 <= train_blocks <= n:
        raise IISInputError(f"train_blocks={train_blocks!r}: must be an integer in 1..{n} (the model has {n} "
                            "blocks) or None for the whole model")
    start = n - train_blocks

    def prefix(x: torch.Tensor) -> torch.Tensor:
        return model.blocks[:start](model.bn1(model.conv_stem(x)))
    params = [p for mod in (model.blocks[start:], model.conv_head, model.bn2) for p in mod.parameters()]
    return prefix, _Tail(model, start, None), params


# ------------------------------------------------------------------------------------------------ history
@dataclass
class FinetuneHistory:
    """What one fine-tuning run did: per epoch the loss terms and eval accuracies, and IIS before and after."""

    epochs: list[dict[str, float]] = field(default_factory=list)   # epoch, loss_probe, loss_concept, loss_total,
    #                                          eval_acc_probe, eval_acc_concept, concepts_rebuilt, seconds
    iis_before: dict[str, Any] | None = None    # IISResult.to_dict() of the model before (score_iis=True)
    iis_after: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    resumed_from_epoch: int = 0                 # epochs read back from a checkpoint (0: a fresh run)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FinetuneResult:
    """The fine-tuned model (same object as passed in), its probe and concept head, and the history."""

    model: nn.Module
    history: FinetuneHistory
    probe: nn.Linear
    head: nn.Module                    # iis_fast.backends.reference.ConceptHead at the run's sparsity
    concepts: torch.Tensor             # C [M, D] of the last rebuild
    concept_images: torch.Tensor       # the M element images [M, 3, h, w] in [0, 1]
    concept_labels: torch.Tensor       # [M] class of the image each element came from

    def __iter__(self):                # model, history = finetune(...)
        return iter((self.model, self.history))


# ------------------------------------------------------------------------------------------------ checks
def check_finetune_args(lam: Any, sparsity: Any, num_concepts: Any, library: str, epochs: Any, lr: Any,
                        concept_update: Any) -> None:
    """The bad-input checks that need no data (docs/applications.md): a named IISInputError each."""
    def number(name: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise IISInputError(f"{name}={v!r}: must be a finite number")
        return float(v)
    if number("lam", lam) < 0:
        raise IISInputError(f"lam={lam}: must be >= 0 (0 is plain fine-tuning, the control; the paper's lam > 0 "
                            "adds the concept head's loss)")
    if not 0.0 <= number("sparsity", sparsity) < 1.0:
        raise IISInputError(f"sparsity={sparsity} is outside [0, 1): the concept head keeps |z| above the "
                            "int(M*s)+1-th smallest, so s must satisfy 0 <= s < 1 (the paper uses 0.1)")
    if isinstance(num_concepts, bool) or not isinstance(num_concepts, int) or num_concepts < 2:
        raise IISInputError(f"num_concepts={num_concepts!r}: must be an integer >= 2")
    if library not in FINETUNE_LIBRARIES:
        raise IISInputError(f"library={library!r}: fine-tuning supports {FINETUNE_LIBRARIES} (concepts that stay the "
                            "same element images when C is rebuilt from the current backbone)")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise IISInputError(f"epochs={epochs!r}: must be a positive integer")
    if number("lr", lr) <= 0:
        raise IISInputError(f"lr={lr}: must be positive")
    if concept_update not in CONCEPT_UPDATES and not (
            isinstance(concept_update, int) and not isinstance(concept_update, bool) and concept_update >= 1):
        raise IISInputError(f"concept_update={concept_update!r}: choose 'epoch', 'fixed' or a positive number of steps")


def _check_labels(train_y: np.ndarray, eval_y: np.ndarray | None, num_classes: int | None) -> int:
    k = int(max(train_y.max(), -1 if eval_y is None else eval_y.max())) + 1
    k = max(k, num_classes or 0)
    counts = np.bincount(train_y, minlength=k)
    missing = np.flatnonzero(counts == 0).tolist()
    if missing:
        raise IISInputError(f"train_loader has no samples of class(es) {missing[:10]} of 0..{k - 1}: every class needs "
                            "training samples (the probe and the concept head could never predict it)")
    if k < 2:
        raise IISInputError("train_loader holds a single class: need at least 2 classes")
    if eval_y is not None:
        missing = np.flatnonzero(np.bincount(eval_y, minlength=k) == 0).tolist()
        if missing:
            raise IISInputError(f"eval_loader has no samples of class(es) {missing[:10]}: its accuracy would not "
                                "cover every class; give an eval set with every class")
    return k


# ------------------------------------------------------------------------------------------------ checkpoints
def _fingerprint(cfg: dict[str, Any]) -> str:
    keep = {k: v for k, v in cfg.items() if k not in ("epochs", "progress", "checkpoint_dir", "device")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _last_checkpoint(directory: Path) -> Path | None:
    files = sorted(directory.glob("epoch_*.pt"))
    return files[-1] if files else None


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)                  # a kill mid-write never leaves a truncated checkpoint


# ------------------------------------------------------------------------------------------------ the run
def finetune(model: Any, train_loader: Any, eval_loader: Any = None, *, lam: float, sparsity: float = 0.1,
             num_concepts: int = 200, library: str = "prototype", epochs: int = 1, lr: float = 1e-4,
             head_lr: float = 1e-3, batch_size: int = 64, train_blocks: int | None = None,
             concept_update: str | int = "epoch", images_per_class: int = 10, elements: str = "both",
             seed: int = 0, device: str = "auto", extract_dtype: str = "auto", layer: str | None = None,
             image_mean: Any = None, image_std: Any = None, image_size: Any = None,
             checkpoint_dir: str | os.PathLike[str] | None = None,
             resume: bool = True, cache_dir: str | os.PathLike[str] | None = None, score_iis: bool = True,
             score_options: dict[str, Any] | None = None, progress: bool = True) -> FinetuneResult:
    """Fine-tune ``model`` so that its sparse concept interpretation classifies (docs/applications.md).

    Args:
        model: a ``torch.nn.Module`` (changed in place) or a timm model name (built with its packaged weights).
        train_loader: (images, labels) batches of the TRAIN split under eval preprocessing (read once; the
            frozen prefix's outputs are held in memory) or a data spec as :func:`iis_fast.score` takes.
            Concept-source images (``images_per_class`` per class) come from here.
        eval_loader: (images, labels) of the evaluation split: accuracy after each epoch and IIS before/after.
        lam: weight of the concept head's CE in what reaches the backbone (>= 0; 0 = plain fine-tuning).
        sparsity: s of the concept head, in [0, 1) (paper: 0.1). num_concepts: M. library: "prototype".
        epochs, lr: backbone epochs and Adam learning rate; head_lr: Adam learning rate of probe and head.
        batch_size: training batch (batches are a seeded shuffle of the held data, the same for every lam).
        train_blocks: fine-tune the last n blocks (EfficientNet-family timm models) or None for all of it.
        concept_update: "epoch" (rebuild C from the current backbone before every epoch), "fixed" (C of the
            initial backbone throughout) or N (rebuild every N steps).
        images_per_class, elements: concept-source images per class; "patches", "segments" or "both".
        seed: probe/head initialisation, batch order and the prototype pick.
        device: "auto" (CUDA where a GPU exists, else CPU), "cpu", "cuda", ...
        image_mean, image_std, image_size: the loader's preprocessing (default: the model's config), as
            :func:`iis_fast.score` takes them.
        extract_dtype: compute dtype of the frozen prefix ("auto" as :func:`iis_fast.score`); the tail trains fp32.
        cache_dir: feature cache of the frozen prefix's outputs and of the IIS scores (None: the default).
        checkpoint_dir: write ``epoch_NNN.pt`` after each epoch; with ``resume`` a rerun continues from the last.
        score_iis: with an eval_loader, :func:`iis_fast.score` the model before and after (``score_options`` go
            to it; default seed = ``seed``, progress as here).
    Returns:
        :class:`FinetuneResult`: ``model, history = finetune(...)`` unpacks; also the probe, head and concepts.
    Raises:
        IISInputError: lam < 0, sparsity outside [0, 1), a model without a findable representation, a loader
            with a class missing, ... before any training.
    """
    from ..backends.reference import ConceptHead
    from ..backends.common import init_linear
    from ..concepts import make_elements, parse_elements, stratified_indices
    from ..config import threshold_rank
    from ..features import EXTRACT_DTYPES, resolve_extract_dtype
    from ..score import _preprocessing, _resolve_model
    from ..validation import check_device

    check_finetune_args(lam, sparsity, num_concepts, library, epochs, lr, concept_update)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = check_device(device)
    kinds = parse_elements(elements)
    if isinstance(model, str):
        from ..models import create_model
        net, model_name = create_model(model, pretrained=True), model
    else:
        net, model_name = _resolve_model(model, None)
    net = net.to(dev)
    prefix, tail, params = split_backbone(net, train_blocks, layer)
    pre = _preprocessing(net, image_mean, image_std, image_size)
    if isinstance(train_loader, (str, os.PathLike)):
        from ..data.sources import resolve_data
        from ..features import default_cache_dir
        train_loader, eval_loader = resolve_data(train_loader, eval_loader, pre, cache_dir=default_cache_dir(),
                                                 batch_size=batch_size, device=str(dev))
    amp = EXTRACT_DTYPES[resolve_extract_dtype(extract_dtype, dev)]
    cfg = dict(model=model_name, lam=float(lam), sparsity=float(sparsity), num_concepts=num_concepts,
               library=library, epochs=epochs, lr=float(lr), head_lr=float(head_lr), batch_size=batch_size,
               train_blocks=train_blocks, concept_update=concept_update, images_per_class=images_per_class,
               elements=elements, seed=seed, extract_dtype=str(amp).replace("torch.", ""), layer=layer,
               device=str(dev))

    # ---- the frozen prefix, once over the data (eval mode, no gradient)
    shape: list[tuple[int, ...]] = []

    def run_prefix(x: torch.Tensor) -> torch.Tensor:
        net.eval()
        with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp != torch.float32):
            h = prefix(x.to(dev).float()).float()
        shape[:] = [tuple(h.shape[1:])]
        return h.flatten(1).clone()

    t0 = time.perf_counter()
    tr = _prefix_pass(net, train_loader, run_prefix, shape, cfg, images_per_class, str(dev), progress, "train",
                      cache_dir)
    h_train = torch.from_numpy(np.array(tr.x, dtype=np.float32)).view(-1, *shape[0])
    y_train = torch.from_numpy(np.array(tr.y, dtype=np.int64))
    ev = None
    if eval_loader is not None:
        ev = _prefix_pass(net, eval_loader, run_prefix, shape, cfg, 0, str(dev), progress, "eval", cache_dir)
    k_cls = _check_labels(np.asarray(tr.y), None if ev is None else np.asarray(ev.y), None)
    h_eval = None if ev is None else torch.from_numpy(np.array(ev.x, dtype=np.float32)).view(-1, *shape[0])
    y_eval = None if ev is None else torch.from_numpy(np.array(ev.y, dtype=np.int64))

    # ---- concept elements: fixed images; C = their representation under the current backbone
    mean = torch.tensor(pre["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"]).view(1, -1, 1, 1)
    src01 = (torch.from_numpy(np.array(tr.source_images, dtype=np.float32)) * std + mean).clamp(0, 1)
    if src01.shape[1] == 1:
        src01 = src01.expand(-1, 3, -1, -1)
    el_images, el_labels = make_elements(src01, np.asarray(tr.source_labels), kinds=kinds,
                                         out_size=tuple(src01.shape[-2:]))
    if num_concepts > el_images.shape[0]:
        raise IISInputError(f"num_concepts={num_concepts} but only {el_images.shape[0]} concept elements exist: "
                            "lower num_concepts or raise images_per_class")
    pick = torch.as_tensor(stratified_indices(el_labels, num_concepts, seed))
    c_images, c_labels = el_images[pick], el_labels[pick]
    h_concepts = torch.cat([run_prefix(((c_images[i:i + 256] - mean) / std))
                            for i in range(0, len(pick), 256)]).view(-1, *shape[0])
    t_prefix = time.perf_counter() - t0

    def build_concepts() -> torch.Tensor:
        was = tail.training
        tail.eval()
        with torch.no_grad():
            c = torch.cat([tail(h_concepts[i:i + 256].to(dev)) for i in range(0, len(h_concepts), 256)])
        tail.train(was)
        return F.normalize(c.float(), dim=1)

    def evaluate() -> tuple[float, float]:
        tail.eval()
        correct_p = correct_c = 0
        with torch.no_grad():
            for i in range(0, len(h_eval), 256):
                z = tail(h_eval[i:i + 256].to(dev))
                yb = y_eval[i:i + 256].to(dev)
                correct_p += int((probe(z).argmax(-1) == yb).sum())
                correct_c += int((head(z).argmax(-1) == yb).sum())
        return correct_p / len(h_eval), correct_c / len(h_eval)

    # ---- IIS before (the untouched model), then the trainable state
    hist = FinetuneHistory(config=cfg)
    sopts = {"seed": seed, "progress": progress, "cache_dir": None if cache_dir is None else str(cache_dir),
             "image_size": image_size, **(score_options or {})}
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    fp = _fingerprint(cfg)
    start_epoch = 0
    state = None
    if ckdir is not None:
        ckdir.mkdir(parents=True, exist_ok=True)
        last = _last_checkpoint(ckdir) if resume else None
        if last is not None:
            state = torch.load(last, map_location="cpu", weights_only=False)
            if state.get("fingerprint") != fp:
                raise IISInputError(f"checkpoint_dir {str(ckdir)!r} holds a run with other settings "
                                    f"({state.get('config')}); use another directory or resume=False")
    if state is None and score_iis and eval_loader is not None:
        hist.iis_before = _score(net, train_loader, eval_loader, layer, pre, sopts)

    for p in net.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    d = tail(h_train[:2].to(dev)).shape[1]
    probe = nn.Linear(d, k_cls).to(dev)
    w, b = init_linear(d, k_cls, seed, 0)
    with torch.no_grad():
        probe.weight.copy_(w)
        probe.bias.copy_(b)
    head = ConceptHead(build_concepts(), k_cls, threshold_rank(num_concepts, sparsity), seed, 1).to(dev)
    opt = torch.optim.Adam([{"params": params, "lr": lr},
                            {"params": list(probe.parameters()) + list(head.parameters()), "lr": head_lr}])
    if state is not None:
        net.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        hist = FinetuneHistory(**state["history"])
        hist.resumed_from_epoch = start_epoch = int(state["epoch"])
    cfg["prefix_seconds"] = round(t_prefix, 3)

    from tqdm.auto import tqdm
    n = len(h_train)
    steps_per_epoch = math.ceil(n / batch_size)
    bar = tqdm(total=(epochs - start_epoch) * steps_per_epoch, unit="step", disable=not progress,
               desc=f"fine-tuning lam={lam:g} s={sparsity:g}", leave=False)
    try:
        for epoch in range(start_epoch, epochs):
            t_ep = time.perf_counter()
            rebuilt = 0
            if concept_update == "epoch" and epoch > 0:
                head.concepts.copy_(build_concepts())
                rebuilt += 1
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            sums = np.zeros(2)
            tail.train()
            for step, i in enumerate(range(0, n, batch_size)):
                global_step = epoch * steps_per_epoch + step
                if isinstance(concept_update, int) and global_step > 0 and global_step % concept_update == 0:
                    head.concepts.copy_(build_concepts())
                    rebuilt += 1
                idx = order[i:i + batch_size]
                loss_p, loss_c = objective_terms(tail, probe, head, h_train[idx].to(dev), y_train[idx].to(dev),
                                                 lam)
                opt.zero_grad(set_to_none=True)
                (loss_p + loss_c).backward()
                opt.step()
                sums += [loss_p.item() * len(idx), loss_c.item() * len(idx)]
                bar.update(1)
            row = {"epoch": epoch + 1, "loss_probe": sums[0] / n, "loss_concept": sums[1] / n,
                   "loss_total": (sums[0] + lam * sums[1]) / n, "concepts_rebuilt": rebuilt}
            if h_eval is not None:
                row["eval_acc_probe"], row["eval_acc_concept"] = evaluate()
            row["seconds"] = round(time.perf_counter() - t_ep, 3)
            hist.epochs.append(row)
            if ckdir is not None:
                _save(ckdir / f"epoch_{epoch + 1:03d}.pt",
                      {"version": CHECKPOINT_VERSION, "fingerprint": fp, "config": cfg, "epoch": epoch + 1,
                       "model": net.state_dict(), "probe": probe.state_dict(), "head": head.state_dict(),
                       "optimizer": opt.state_dict(), "history": hist.to_dict()})
    finally:
        bar.close()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(True)
    if score_iis and eval_loader is not None:
        hist.iis_after = _score(net, train_loader, eval_loader, layer, pre, sopts)
    return FinetuneResult(net, hist, probe, head, head.concepts.detach().clone(), c_images, c_labels)


def objective_terms(tail: nn.Module, probe: nn.Module, head: nn.Module, h: torch.Tensor, y: torch.Tensor,
                    lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE of the probe, CE of the concept head) on one batch; ``loss_p + loss_c`` backpropagates
    CE_p + lam * CE_c into the backbone, and each CE at full weight into its own head (module docstring)."""
    z = tail(h)
    loss_p = F.cross_entropy(probe(z), y)
    z_c = z.detach() + lam * (z - z.detach())       # value z; gradient into the backbone scaled by lam
    loss_c = F.cross_entropy(head(z_c), y)
    return loss_p, loss_c


def _prefix_pass(net: nn.Module, loader: Any, run_prefix: Callable, shape: list, cfg: dict[str, Any], keep: int,
                 device: str, progress: bool, name: str, cache_dir: Any = None) -> Any:
    """The frozen prefix's outputs over ``loader`` (and ``keep`` concept-source images per class), from the
    feature cache when the same weights already ran over the same data (e.g. the same backbone at another lam)."""
    from types import SimpleNamespace
    from ..features import FeatureCache, data_fingerprint, extract, model_fingerprint
    cache = FeatureCache(cache_dir)
    key = cache.key("finetune-prefix-v1", model_fingerprint(net, cfg["layer"]), str(cfg["train_blocks"]),
                    data_fingerprint(loader), cfg["extract_dtype"], f"keep={keep}")
    needed = ("x", "y", "shape") + (("source_images", "source_labels") if keep else ())
    hit = cache.get(key, required=needed)
    if hit is not None:
        shape[:] = [tuple(int(v) for v in np.asarray(hit["shape"]))]
        return SimpleNamespace(**hit)
    ex = extract(run_prefix, loader, device, keep_per_class=keep, progress=progress, desc=f"frozen prefix [{name}]")
    arrays = {"x": ex.x, "y": ex.y, "shape": np.asarray(shape[0], dtype=np.int64)}
    if keep:
        arrays.update(source_images=ex.source_images.numpy(), source_labels=ex.source_labels.numpy())
    cache.put(key, arrays, {"kind": "finetune-prefix", "split": name})
    return SimpleNamespace(**arrays)


def _score(net: nn.Module, train_loader: Any, eval_loader: Any, layer: str | None, pre: dict[str, Any],
           options: dict[str, Any]) -> dict[str, Any]:
    from ..score import score
    was = [p.requires_grad for p in net.parameters()]
    r = score(net, train_loader, eval_loader=eval_loader, layer=layer, image_mean=pre["mean"], image_std=pre["std"],
              **options)
    for p, g in zip(net.parameters(), was):
        p.requires_grad_(g)
    return r.to_dict()
