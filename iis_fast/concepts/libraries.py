"""Concept libraries C [M, D] (rows L2-normalised) built from element features (docs/spec.md §1.2).

- prototype: M elements themselves (stratified per class, or the first M);
- cluster: k-means centres over up to ``max_elements`` elements;
- end2end: the element matrix from which every head learns its own hard assignment (:func:`end2end_elements`);
- text: concept vectors fitted Label-free-CBM style (see :func:`fit_text_projection`).

Every builder is deterministic for a given seed.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.sampling import stratified_indices
from ..errors import IISInputError
from ..validation import label_array

LIBRARY_KINDS = ("prototype", "cluster", "end2end", "text")


# ----------------------------------------------------------------------------------------------- validation
def _as_feats(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise IISInputError(f"{name} has shape {tuple(t.shape)}; expected a non-empty 2-D [rows, D] matrix")
    if not (t.is_floating_point()):
        raise IISInputError(f"{name} has dtype {t.dtype}; pass floating-point features")
    t = t.detach().float().cpu()
    if not torch.isfinite(t).all():
        raise IISInputError(f"{name} contains NaN or Inf; recompute the features (check the backbone / inputs)")
    return t


def _as_labels(y, n: int, name: str, other: str) -> torch.Tensor:
    return torch.from_numpy(label_array(y, name, n=n, other=other, integral_floats=False))


def _check_m(num_concepts: int, n_elements: int, kind: str) -> int:
    m = int(num_concepts)
    if m < 1:
        raise IISInputError(f"num_concepts={num_concepts}: must be a positive integer")
    if m > n_elements:
        raise IISInputError(
            f"num_concepts={m} but only {n_elements} elements exist for the {kind} library: num_concepts must be "
            f"<= {n_elements}; lower num_concepts or raise images_per_class (more concept-source images)")
    return m


def _normalise_rows(c: torch.Tensor) -> torch.Tensor:
    return F.normalize(c.float(), dim=1).contiguous()


ELEMENT_SUBSETS = ("random", "first")


def element_subset(n: int, max_elements: int | None, subset: str = "random", seed: int = 0,
                   order: np.ndarray | None = None) -> np.ndarray:
    """Rows of the at most ``max_elements`` elements that cluster and end2end use (docs/spec.md §1.2).

    ``"random"``: a seeded uniform choice, ascending. ``"first"``: the first ``max_elements`` of ``order`` (the
    official file order from :func:`iis_fast.concepts.official_order`; default: row order), in that order.
    """
    if subset not in ELEMENT_SUBSETS:
        raise IISInputError(f"element_subset={subset!r}: choose one of {ELEMENT_SUBSETS}")
    if max_elements is not None and int(max_elements) < 1:
        raise IISInputError(f"max_elements={max_elements}: must be a positive integer or None")
    if subset == "first":
        rows = np.arange(n) if order is None else _check_order(order, n)
        return rows if max_elements is None else rows[: int(max_elements)]
    if max_elements is None or n <= int(max_elements):
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, int(max_elements), replace=False))


def _check_order(order: np.ndarray, n: int) -> np.ndarray:
    o = np.asarray(order, dtype=np.int64)
    if o.shape != (n,) or not np.array_equal(np.sort(o), np.arange(n)):
        raise IISInputError(f"order must be a permutation of the {n} element rows")
    return o


# ------------------------------------------------------------------------------------------------ prototype


def prototype_library(element_feats: torch.Tensor, element_labels, num_concepts: int = 200, seed: int = 0,
                      selection: str = "stratified", order: np.ndarray | None = None) -> torch.Tensor:
    """M element features as concepts: ``"stratified"`` (even per-class seeded pick) or ``"first"`` (the first M
    of ``order``: pass :func:`iis_fast.concepts.official_order` for the official pick; default: row order)."""
    feats = _as_feats(element_feats, "element_feats")
    labels = _as_labels(element_labels, feats.shape[0], "element_labels", "element_feats")
    m = _check_m(num_concepts, feats.shape[0], "prototype")
    if selection == "first":
        idx = (np.arange(feats.shape[0]) if order is None else _check_order(order, feats.shape[0]))[:m]
    elif selection == "stratified":
        idx = stratified_indices(labels, m, seed)
    else:
        raise IISInputError(f"selection={selection!r}: choose 'stratified' or 'first'")
    return _normalise_rows(feats[torch.as_tensor(idx)])


# -------------------------------------------------------------------------------------------------- cluster
def cluster_library(element_feats: torch.Tensor, num_concepts: int = 200, seed: int = 0,
                    max_elements: int | None = 20000, n_init: int = 1, max_iter: int = 300, subset: str = "random",
                    order: np.ndarray | None = None) -> torch.Tensor:
    """k-means (k-means++ init, ``random_state=seed``, float32 as the official call) over the
    :func:`element_subset` of at most ``max_elements`` elements; C = unit centres."""
    from sklearn.cluster import KMeans

    feats = _as_feats(element_feats, "element_feats")
    idx = element_subset(feats.shape[0], max_elements, subset, seed, order)
    x = feats[torch.as_tensor(idx)]
    m = _check_m(num_concepts, x.shape[0], "cluster")
    km = KMeans(n_clusters=m, init="k-means++", n_init=n_init, max_iter=max_iter, random_state=seed)
    km.fit(x.numpy())
    centres = torch.from_numpy(km.cluster_centers_).float()
    norms = centres.norm(dim=1)
    for j in torch.nonzero(norms < 1e-8).flatten().tolist():   # a centre of cancelling points: use a member
        members = np.flatnonzero(km.labels_ == j)
        centres[j] = x[int(members[0])] if members.size else x[j]
    return _normalise_rows(centres)


# -------------------------------------------------------------------------------------------------- end2end
def end2end_elements(element_feats: torch.Tensor, num_concepts: int = 200, seed: int = 0,
                     max_elements: int | None = 20000, subset: str = "random",
                     order: np.ndarray | None = None) -> torch.Tensor:
    """The frozen element matrix E [E, D] (unit rows) from which every end2end head learns its own assignment.

    The end2end library is not one matrix: each (s, lr) head of the grid learns q [E, M] jointly with its
    classifier (docs/spec.md §1.2; :func:`iis_fast.score_features` with ``library="end2end"`` takes this E). The
    rows are the same ``max_elements`` subset as :func:`cluster_library` uses (``subset``, ``order``).
    """
    feats = _as_feats(element_feats, "element_feats")
    idx = element_subset(feats.shape[0], max_elements, subset, seed, order)
    e = feats[torch.as_tensor(idx)]
    _check_m(num_concepts, e.shape[0], "end2end")
    return _normalise_rows(e)


# ----------------------------------------------------------------------------------------------------- text
def cos_cubed_similarity(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-column (concept) cosine over samples of mean-centred, cubed ``pred`` and ``target`` [N, T] -> [T]."""
    p = (pred - pred.mean(dim=0, keepdim=True)) ** 3
    t = (target - target.mean(dim=0, keepdim=True)) ** 3
    p = p / p.norm(dim=0, keepdim=True).clamp_min(1e-12)
    t = t / t.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return (p * t).sum(dim=0)


def fit_text_projection(image_feats: torch.Tensor, clip_image_feats: torch.Tensor, clip_text_feats: torch.Tensor,
                        steps: int = 1000, lr: float = 1e-3, seed: int = 0, batch_size: int = 50000,
                        return_similarity: bool = False, device: torch.device | str | None = None,
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Concept vectors W [T, D] fitted Label-free-CBM style (bias-free projection D -> T).

    Target S = unit(clip_image_feats) · unit(clip_text_feats)ᵀ [N, T]; prediction P = image_feats · Wᵀ.
    Adam minimises -mean over concepts of :func:`cos_cubed_similarity`(P, S) for ``steps`` steps on seeded
    random batches of ``batch_size`` rows (all rows when N <= batch_size). Returns W with unit rows, plus the
    per-concept similarity on all rows when ``return_similarity`` (LF-CBM drops concepts below a cutoff).
    ``device`` runs the fit there; the seeded initialisation and batches are drawn on the CPU.
    """
    x = _as_feats(image_feats, "image_feats")
    ci = _as_feats(clip_image_feats, "clip_image_feats")
    ct = _as_feats(clip_text_feats, "clip_text_feats")
    if ci.shape[0] != x.shape[0]:
        raise IISInputError(f"clip_image_feats has {ci.shape[0]} rows but image_feats has {x.shape[0]}; "
                            "give CLIP features of the same images in the same order")
    if ci.shape[1] != ct.shape[1]:
        raise IISInputError(f"clip_image_feats has width {ci.shape[1]} but clip_text_feats {ct.shape[1]}; "
                            "both must come from the same CLIP model")
    if x.shape[0] < 2:
        raise IISInputError("image_feats needs at least 2 rows (similarities are mean-centred over samples)")
    if int(steps) < 1 or int(batch_size) < 2 or not lr > 0:
        raise IISInputError(f"steps={steps}, batch_size={batch_size}, lr={lr}: steps >= 1, batch_size >= 2, lr > 0")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    target = (F.normalize(ci, dim=1) @ F.normalize(ct, dim=1).t()).to(dev)
    x = x.to(dev)
    gen = torch.Generator().manual_seed(int(seed))
    w = torch.nn.Parameter((torch.randn(ct.shape[0], x.shape[1], generator=gen) / math.sqrt(x.shape[1])).to(dev))
    opt = torch.optim.Adam([w], lr=lr)
    n, bs = x.shape[0], min(int(batch_size), x.shape[0])
    for _ in range(int(steps)):
        b = torch.randperm(n, generator=gen)[:bs].to(dev) if bs < n else slice(None)
        loss = -cos_cubed_similarity(x[b] @ w.t(), target[b]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    w_out = _normalise_rows(w.detach())
    if not return_similarity:
        return w_out.cpu()
    with torch.no_grad():
        sim = cos_cubed_similarity(x @ w_out.t(), target)
    return w_out.cpu(), sim.cpu()


def text_library(text_concept_vectors: torch.Tensor, feature_dim: int | None = None) -> torch.Tensor:
    """Concept vectors [M, D] (e.g. from :func:`fit_text_projection`) as a library: rows L2-normalised.

    Pass ``feature_dim`` (the backbone's D) to check the vectors fit; a [D, M] matrix is transposed when that
    is the only way it fits.
    """
    c = _as_feats(text_concept_vectors, "text_concept_vectors")
    if feature_dim is not None and c.shape[1] != int(feature_dim):
        if c.shape[0] == int(feature_dim):
            c = c.t()
        else:
            raise IISInputError(f"text_concept_vectors has shape {tuple(c.shape)}; expected [M, {feature_dim}] "
                                "(one row per concept, width = the backbone's feature size)")
    if (c.norm(dim=1) < 1e-12).any():
        raise IISInputError("text_concept_vectors has an all-zero row; drop that concept")
    return _normalise_rows(c)


# ------------------------------------------------------------------------------------------------- dispatch
def build_library(kind: str, element_feats: torch.Tensor | None, element_labels=None, num_concepts: int = 200,
                  seed: int = 0, **opts) -> torch.Tensor:
    """Build a concept library C [M, D] (unit rows) of ``kind`` in ``LIBRARY_KINDS``.

    Options by kind: prototype ``selection, order``; cluster ``max_elements, n_init, max_iter, subset, order``;
    end2end ``max_elements, subset, order`` (returns the element matrix E of :func:`end2end_elements`, not C); text
    ``concept_vectors`` (required, e.g. from :func:`fit_text_projection`; element_feats may be None).
    """
    if kind == "prototype":
        return prototype_library(element_feats, element_labels, num_concepts, seed, **opts)
    if kind == "cluster":
        if element_labels is not None:
            _as_labels(element_labels, _as_feats(element_feats, "element_feats").shape[0],
                       "element_labels", "element_feats")
        return cluster_library(element_feats, num_concepts, seed, **opts)
    if kind == "end2end":
        return end2end_elements(element_feats, num_concepts, seed, **opts)
    if kind == "text":
        if "concept_vectors" not in opts:
            raise IISInputError("the text library needs concept_vectors=[M, D]; fit them with "
                                "iis_fast.concepts.fit_text_projection from CLIP image/text features")
        dim = None if element_feats is None else _as_feats(element_feats, "element_feats").shape[1]
        return text_library(opts["concept_vectors"], feature_dim=opts.get("feature_dim", dim))
    raise IISInputError(f"kind={kind!r}: choose one of {LIBRARY_KINDS}")
