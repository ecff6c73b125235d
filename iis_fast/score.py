"""`score_features`: IIS from precomputed features and a concept matrix (docs/spec.md §1.3-1.6). The engine's core."""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from .config import IISConfig
from .data.sampling import stratified_split
from .errors import IISInputError
from .backends.common import AssignmentSpec, GridSpec, repeat_seeds
from .backends import get_trainer
from .result import IISResult, chance_warning, iis_from_curve, warn_all  # noqa: F401 (tests import it here)
from .uncertainty import summarize
from .validation import tensor_from_numpy, as_concepts, as_features, as_labels, check_classes, check_device, \
    check_images_per_class, expect_channels, infer_num_classes, input_channels


def library_versions() -> dict[str, str]:
    import platform
    from . import __version__
    out = {"iis_fast": __version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    try:
        import timm
        out["timm"] = timm.__version__
    except ImportError:
        pass
    return out


def score_features(train_x: Any, train_y: Any, eval_x: Any, eval_y: Any, concepts: Any,
                   num_classes: int | None = None, **options: Any) -> IISResult:
    """IIS of a representation given its features and a concept library.

    Args:
        train_x, train_y: training features [N, D] and integer labels [N].
        eval_x, eval_y: evaluation features [N_e, D] and labels [N_e].
        concepts: concept matrix C [M, D] (rows are L2-normalised here if they are not). With
            ``library="end2end"``: the element matrix E [E, D] (e.g. :func:`iis_fast.concepts.end2end_elements`),
            from which every head learns its own ``num_concepts`` concepts (docs/spec.md §1.2).
        num_classes: K (default: 1 + the largest label seen).
        **options: any :class:`IISConfig` field (sparsities, lrs, epochs, batch_size, seed, backend, device, ...),
            and ``keep_heads=True``: keep the reported probe and concept heads in ``result.heads``
            (:class:`iis_fast.applications.kept_heads.KeptHeads`; docs/applications.md).
    Returns:
        An :class:`IISResult` with iis, acc_std, acc per sparsity, the ARR curve and per-lr results.
    """
    stats = options.pop("_timings", {})
    meta = options.pop("_meta", {})
    keep_heads = bool(options.pop("keep_heads", False))
    cfg = IISConfig.from_options(**options)
    t0 = time.perf_counter()
    train_x = as_features(train_x, "train_x")
    eval_x = as_features(eval_x, "eval_x")
    if eval_x.shape[1] != train_x.shape[1]:
        raise IISInputError(f"eval_x has D = {eval_x.shape[1]} but train_x has D = {train_x.shape[1]}")
    train_y = as_labels(train_y, train_x.shape[0], "train_y", num_classes)
    eval_y = as_labels(eval_y, eval_x.shape[0], "eval_y", num_classes)
    k = infer_num_classes(train_y, eval_y, num_classes)
    check_classes(train_y, eval_y, k)
    c = as_concepts(concepts, train_x.shape[1])
    c = torch.nn.functional.normalize(c, dim=1)
    assignment = None
    if cfg.library == "end2end":            # c is the element matrix E; each head learns its own C (§1.2)
        m = cfg.num_concepts
        if c.shape[0] < m:
            raise IISInputError(f"end2end needs at least num_concepts={m} elements, got {c.shape[0]}")
        assignment = AssignmentSpec(m, stochastic_eval=cfg.end2end_eval == "stochastic")
    else:
        m = c.shape[0]
    cfg.num_concepts = m
    cfg.validate()

    device = check_device(cfg.device)
    store = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.dtype]
    x_tr, y_tr = train_x, train_y
    if cfg.selection == "holdout":
        keep, sel = stratified_split(train_y.numpy(), cfg.selection_fraction, cfg.seed)
        eval_sets = [(train_x[sel], train_y[sel]), (eval_x, eval_y)]
        x_tr, y_tr = train_x[keep], train_y[keep]
        selection_split = f"holdout({cfg.selection_fraction:g} of train, stratified, seed {cfg.seed})"
    else:
        eval_sets = [(eval_x, eval_y)]
        selection_split = "eval"
    to = lambda t: t.to(device=device, dtype=store) if t.is_floating_point() else t.to(device)
    x_tr, y_tr = to(x_tr), to(y_tr)
    eval_sets = [(to(a), to(b)) for a, b in eval_sets]

    spec = GridSpec(num_classes=k, sparsities=cfg.sparsities, lrs=cfg.lrs, epochs=cfg.epochs,
                    batch_size=cfg.batch_size, lr_decay=cfg.lr_decay, seed=cfg.seed, assignment=assignment,
                    seeds=repeat_seeds(cfg.seed, cfg.repeats) if cfg.repeats > 1 else None)
    backend, trainer = get_trainer(cfg.backend, cfg.device, end2end=assignment is not None)
    stats["validate"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        n_heads = cfg.repeats * len(cfg.lrs) * (1 + len(cfg.sparsities))
        bar = tqdm(total=cfg.epochs * n_heads, unit="head-epoch", desc=f"training {n_heads} heads [{backend}]",
                   leave=False)
    try:
        out = trainer(x_tr, y_tr, eval_sets, c.to(device), spec, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    stats["train"] = time.perf_counter() - t1

    check = None
    if cfg.selection_check and cfg.selection == "eval":    # the same grids on TRAIN minus a held-out part
        t1 = time.perf_counter()
        keep, sel = stratified_split(train_y.numpy(), cfg.selection_fraction, cfg.seed)
        check = trainer(to(train_x[keep]), to(train_y[keep]), [(to(train_x[sel]), to(train_y[sel])), eval_sets[-1]],
                        c.to(device), spec)
        stats["train_selection_check"] = time.perf_counter() - t1

    # best epoch and lr chosen on the selection set (index 0), reported on the eval set (last index), per grid;
    # the per-lr fields are the first grid's (seed), the headline numbers the mean over the grids
    t1 = time.perf_counter()
    uncertainty, sels = summarize(out, check, spec, cfg)
    stats["uncertainty"] = time.perf_counter() - t1
    best_p, best_h, rep_p, rep_h = sels[0].best_p, sels[0].best_h, sels[0].rep_p, sels[0].rep_h
    acc_std = float(np.mean(uncertainty["acc_std_repeats"]))
    acc = [float(v) for v in np.mean(uncertainty["acc_repeats"], axis=0)]
    arr = [float(v) for v in np.mean(uncertainty["arr_repeats"], axis=0)]
    iis = float(np.mean(uncertainty["iis_repeats"]))
    notes = [w for w in (chance_warning(acc_std, iis, eval_y.numpy(), k),) if w]
    warn_all(notes)
    result = IISResult(
        iis=iis, acc_std=acc_std, sparsities=list(cfg.sparsities), acc=acc, arr=arr,
        lrs=list(cfg.lrs), acc_std_per_lr=[float(v) for v in rep_p], acc_per_lr=rep_h.tolist(),
        best_epoch_std=best_p.tolist(), best_epoch=best_h.tolist(), num_concepts=m, library=meta.get("library", cfg.library),
        seed=cfg.seed, backend=backend, eval_split=meta.get("eval_split", "eval"), selection_split=selection_split,
        n_train=int(x_tr.shape[0]), n_eval=int(eval_x.shape[0]), num_classes=k, feature_dim=int(train_x.shape[1]),
        config=cfg.to_dict(), versions=library_versions(), timings={k_: round(v, 4) for k_, v in stats.items()},
        model=meta.get("model", ""), warnings=notes, uncertainty=uncertainty,
    )
    if keep_heads:          # the reported heads themselves, trained again (iis_fast.applications.kept_heads)
        from .applications.kept_heads import keep_trained_heads
        result.heads = keep_trained_heads(x_tr, y_tr, eval_sets, c, spec, sels[0], cfg.library)
    return result


def _resolve_model(model: Any, checkpoint: str | None, checkpoint_key: str | None = None,
                   model_kwargs: dict[str, Any] | None = None) -> tuple[torch.nn.Module, str]:
    if isinstance(model, torch.nn.Module):
        if checkpoint is not None:
            from .models import load_checkpoint
            load_checkpoint(model, checkpoint, checkpoint_key=checkpoint_key)
        return model, type(model).__name__ + (f"@{checkpoint}" if checkpoint else "")
    if isinstance(model, str):
        from .models import create_model
        net = create_model(model, checkpoint=checkpoint, checkpoint_key=checkpoint_key, **(model_kwargs or {}))
        return net, model + (f"@{checkpoint}" if checkpoint else "")
    raise IISInputError(f"model must be a torch.nn.Module or a timm model name, got {type(model).__name__}")


def _preprocessing(model: torch.nn.Module, image_mean, image_std, image_size) -> dict[str, Any]:
    from .models import preprocessing_config
    from .validation import image_hw, rgb_triple
    pre = dict(preprocessing_config(model))
    if image_mean is not None:
        pre["mean"] = rgb_triple(image_mean, "mean")
    if image_std is not None:
        pre["std"] = rgb_triple(image_std, "std")
    if image_size is not None:
        pre["input_size"] = (3, *image_hw(image_size))
    return pre


def score(model: Any, loader: Any, eval_loader: Any = None, *, checkpoint: str | None = None,
          checkpoint_key: str | None = None, model_kwargs: dict[str, Any] | None = None,
          layer: str | None = None, image_mean: Any = None, image_std: Any = None, image_size: Any = None,
          concept_vectors: Any = None, **options: Any) -> IISResult:
    """Inherent Interpretability Score of one model (docs/spec.md §1), from images to score.

    Args:
        model: a ``torch.nn.Module`` (timm models use their pre-logits vector, torchvision-style models the input
            of their classifier) or a timm model name; with ``checkpoint`` a ``state_dict``/.pth/.safetensors path.
        loader: (images, labels) batches of the TRAIN split under eval preprocessing (a torch DataLoader, an FFCV
            loader, any iterable), or a data spec: a ``.beton`` path, an image folder (``folder/<class>/<img>``)
            or ``"fashion-mnist[:n_train=N,n_eval=N,seed=S]"`` (whose TEST subset is the evaluation data).
            Concept-source images come from here only.
        eval_loader: the evaluation split (a loader, or a ``.beton``/folder matching ``loader``). Without it, a
            deterministic stratified part of ``loader`` (``eval_fraction``, never a concept-source image) is held
            out, and ``result.eval_split`` says so.
        checkpoint: weights to load (plain, nested or prefixed state dicts; see
            :func:`iis_fast.models.load_checkpoint`). For a model name, the classifier is sized from it.
        checkpoint_key: which state dict of the checkpoint to use when several fit (e.g. ``"state_dict_ema"``).
        model_kwargs: ``timm.create_model`` keywords for a model name (e.g. ``{"num_classes": 10}`` when the
            checkpoint's classifier cannot tell).
        layer: name of a submodule whose (pooled) output is the representation instead.
        image_mean, image_std, image_size: the loader's normalisation (default: the model's preprocessing config);
            used to un-normalise concept-source images and to build loaders from .beton files.
        concept_vectors: [M, D] text concept vectors for ``library="text"``.
        **options: :class:`IISConfig` fields (library, num_concepts, sparsities, lrs, epochs, seed, backend, ...);
            ``keep_heads=True`` keeps the trained heads and the concepts' element images (``result.heads``).
    """
    keep_heads = bool(options.pop("keep_heads", False))
    cfg = IISConfig.from_options(**options)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if loader is None or isinstance(loader, (bytes, bytearray)) or not (
            isinstance(loader, (str, os.PathLike)) or hasattr(loader, "__iter__")):
        raise IISInputError(f"loader must be an iterable of (images, labels) batches or a data spec (.beton file, "
                            f"image folder, 'fashion-mnist'), got {type(loader).__name__}")
    check_device(cfg.device)
    net, model_name = _resolve_model(model, checkpoint, checkpoint_key, model_kwargs)
    net = net.to(cfg.device).eval()
    pre = _preprocessing(net, image_mean, image_std, image_size)
    from .data.sources import resolve_data
    from .features import FeatureCache, data_fingerprint, default_cache_dir, extract, model_fingerprint, \
        representation_fn
    loader, eval_loader = resolve_data(loader, eval_loader, pre, cache_dir=cfg.cache_dir or default_cache_dir(),
                                       batch_size=cfg.extract_batch_size, device=cfg.device)
    embed = representation_fn(net, layer, dtype=cfg.extract_dtype, channels_last=cfg.channels_last,
                              compile=cfg.compile, fold_bn=cfg.fold_bn)
    extraction = (f"{cfg.extract_dtype}|cl={int(cfg.channels_last)}|compile={int(cfg.compile)}"
                  + ("|fold" if cfg.fold_bn else ""))
    embed = expect_channels(embed, input_channels(net), model_name)
    cache = FeatureCache(cfg.cache_dir)
    mfp = model_fingerprint(net, layer)
    timings["model"] = time.perf_counter() - t

    def features_of(split_loader: Any, name: str, keep: int) -> tuple[Any, Any]:
        t0 = time.perf_counter()
        # the kept concept-source images are part of the entry: another images_per_class is another entry
        key = cache.key("features", mfp, data_fingerprint(split_loader), extraction, f"keep={keep}")
        needed = ("x", "y", "src_images", "src_labels", "src_index") if keep else ("x", "y")
        hit = cache.get(key, required=needed)
        timings[f"fingerprint_{name}"] = time.perf_counter() - t0
        if hit is not None:
            timings[f"extract_{name}"] = 0.0
            return key, hit
        t0 = time.perf_counter()
        ex = extract(embed, split_loader, cfg.device, keep_per_class=keep, progress=cfg.progress,
                     desc=f"features [{name}]")
        as_features(ex.x, f"features of the {name} split")        # never cache NaN/inf features
        arrays = {"x": ex.x, "y": ex.y}
        if keep:
            arrays.update(src_images=ex.source_images.numpy(), src_labels=ex.source_labels.numpy(),
                          src_index=ex.source_index)
        cache.put(key, arrays, {"model": model_name, "split": name})
        timings[f"extract_{name}"] = time.perf_counter() - t0
        return key, cache.get(key, required=needed) or arrays

    train_key, train = features_of(loader, "train", cfg.images_per_class)
    x_all, y_all = train["x"], train["y"]
    if cfg.library != "text":
        check_images_per_class(np.asarray(y_all), cfg.images_per_class)
    if eval_loader is not None:
        _, ev = features_of(eval_loader, "eval", 0)
        tr_idx = np.arange(len(y_all))
        ev_x, ev_y = ev["x"], ev["y"]
        eval_split = "eval_loader"
    else:
        tr_idx, ev_idx = stratified_split(np.asarray(y_all), cfg.eval_fraction, cfg.seed,
                                          protect=np.asarray(train["src_index"]))
        ev_x, ev_y = x_all[ev_idx], y_all[ev_idx]
        eval_split = f"holdout({cfg.eval_fraction:g} of loader, stratified, seed {cfg.seed})"

    train_x, train_y = np.asarray(x_all)[tr_idx], np.asarray(y_all)[tr_idx]
    t0 = time.perf_counter()
    concepts = _concept_library(cfg, cache, train_key, train, embed, pre, loader, concept_vectors)
    timings["concepts"] = time.perf_counter() - t0
    opts = cfg.to_dict()
    r = score_features(train_x, train_y, np.asarray(ev_x), np.asarray(ev_y),
                       concepts, _timings=timings, keep_heads=keep_heads,
                       _meta={"library": cfg.library, "eval_split": eval_split, "model": model_name}, **opts)
    if keep_heads:          # the element image of each concept, for iis_fast.explain
        from .applications.kept_heads import attach_concept_images
        attach_concept_images(r.heads, cfg, train, pre)
    return r


def _concept_library(cfg: IISConfig, cache: Any, train_key: str, train: dict[str, Any], embed: Any,
                     pre: dict[str, Any], loader: Any, concept_vectors: Any) -> torch.Tensor:
    """The library of ``cfg.library`` from the TRAIN concept-source images (docs/spec.md §1.2; for end2end the
    element matrix E); see :func:`iis_fast.concepts.pipeline.score_library`."""
    from .concepts.pipeline import score_library
    return score_library(cfg, cache, train_key, train, embed, pre, loader, concept_vectors)
