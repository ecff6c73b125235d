"""end2end heads (docs/spec.md §1.2-1.3): every (s, lr) head learns its own assignment of elements to concepts.

A head owns, besides the concept head of §1.3 (γ, β, W, b), logits q [E, M] over the frozen element matrix E
[E, D] and a LayerNorm over M (γ_q, β_q). One step:

    ℓ = LN(q)·γ_q + β_q;  u = softmax(ℓ/τ + g);  A = one_hot(argmax u) (straight-through: gradient of u)
    P = Aᵀ·E (a segment sum);  C = P / max(‖P‖, 1e-12);  the head of §1.3 on a = x·Cᵀ.

The backward into q costs dA = E·dPᵀ, an [E x D] x [D x M] product per head and step. What this module shares
with every backend (so that the reference, torch and cpp trainers train the same heads): the initial q
(:func:`init_assignment`), the Gumbel noise of every training step and evaluation batch (:func:`gumbel_noise`),
the hard index (:func:`hard_index`) and the segment sum with its straight-through backward
(:class:`SegmentSumST`). The torch trainer of the grid (:func:`train_end2end_torch`) lives here too.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .common import INIT_STD, LN_EPS, GridOutput, GridSpec, train_epochs

NORM_EPS = 1e-12        # F.normalize's eps, as the official l2_normalize
TRAIN_STREAM = 0        # noise stream of the training steps; evaluation set j uses stream 1 + j
EVAL_COUNTER = 1_000_000    # evaluation noise counter = epoch * EVAL_COUNTER + batch


def _mix(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()[:8], "little") \
        & (2 ** 63 - 1)


def init_assignment(num_elements: int, num_concepts: int, seed: int, uid: int) -> torch.Tensor:
    """q [E, M] of head ``uid`` (the sparsity index: every lr of one sparsity starts alike): trunc-normal std 0.02."""
    g = torch.Generator().manual_seed(_mix(seed, 7, uid))
    q = torch.empty(num_elements, num_concepts)
    torch.nn.init.trunc_normal_(q, mean=0.0, std=INIT_STD, generator=g)
    return q


def gumbel_noise(num_elements: int, num_concepts: int, seed: int, stream: int, counter: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [E, M] as the official ``-log(Exponential(1))``, one draw per (seed, stream, counter).

    Training step t (1-based, counted over all epochs) uses (TRAIN_STREAM, t); evaluation batch b of evaluation
    set j after epoch e uses (1 + j, e * EVAL_COUNTER + b). Every head of a grid sees the same draw at a step.
    """
    g = torch.Generator().manual_seed(_mix(seed, stream, counter))
    e = torch.empty(num_elements, num_concepts).exponential_(generator=g)
    return e.clamp_min_(1e-30).log_().neg_()


def hard_index(soft: torch.Tensor) -> torch.Tensor:
    """The concept of every element: argmax over the last axis of the soft assignment (first maximum)."""
    return soft.argmax(dim=-1)


def assignment_logits(q: torch.Tensor, gq: torch.Tensor, bq: torch.Tensor) -> torch.Tensor:
    """ℓ = LayerNorm over M of q [H, E, M] with per-head affine gq, bq [H, M] (biased variance, eps 1e-5)."""
    var, mean = torch.var_mean(q, dim=-1, keepdim=True, correction=0)
    return (q - mean) * torch.rsqrt(var + LN_EPS) * gq[:, None, :] + bq[:, None, :]


class SegmentSumST(torch.autograd.Function):
    """P[h, m] = Σ_{e: index[h, e] = m} E[e] (the value of Aᵀ·E for a one-hot A); the gradient flows to the soft
    assignment as if A were it (straight-through): d soft = E · dPᵀ."""

    @staticmethod
    def forward(ctx, soft: torch.Tensor, index: torch.Tensor, elements: torch.Tensor) -> torch.Tensor:
        h, m, d = soft.shape[0], soft.shape[-1], elements.shape[1]
        p = elements.new_zeros(h, m, d)
        for i in range(h):
            p[i].index_add_(0, index[i], elements)
        ctx.save_for_backward(elements, index)
        return p

    @staticmethod
    def backward(ctx, dp: torch.Tensor):
        elements, index = ctx.saved_tensors
        h, m, d = dp.shape
        # one GEMM for every head: [E, D] x [D, H*M]
        ds = (elements @ dp.permute(2, 0, 1).reshape(d, h * m)).view(-1, h, m).permute(1, 0, 2)
        return stable_soft_grad(ds, index), None, None


def stable_soft_grad(ds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``ds`` minus its value at the row's chosen concept: the same gradient through the softmax (its backward
    ignores a constant per row), but the chosen concept's term, s·(g − ⟨s, g⟩) with s ≈ 1, is then computed
    without cancelling two nearly equal numbers. Without it that term is rounding noise, which Adam amplifies to
    full-size steps, so two correct implementations drift apart within a few epochs."""
    return ds - ds.gather(-1, index.unsqueeze(-1))


def unit_rows(p: torch.Tensor) -> torch.Tensor:
    """F.normalize over the last axis (a zero row stays zero; its gradient is scaled by 1/1e-12 like torch's)."""
    return p / p.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def train_concepts(q: torch.Tensor, gq: torch.Tensor, bq: torch.Tensor, elements: torch.Tensor,
                   noise: torch.Tensor, tau: float) -> torch.Tensor:
    """C [H, M, D] of every head for one training step (differentiable in q, gq, bq)."""
    soft = torch.softmax(assignment_logits(q, gq, bq) / tau + noise, dim=-1)
    index = hard_index(soft.detach())
    return unit_rows(SegmentSumST.apply(soft, index, elements))


@torch.no_grad()
def eval_concepts(q: torch.Tensor, gq: torch.Tensor, bq: torch.Tensor, elements: torch.Tensor,
                  noise: torch.Tensor | None, tau: float) -> torch.Tensor:
    """C [H, M, D] for evaluation: argmax of ℓ (noise None), or of softmax(ℓ/τ + noise) (official, stochastic)."""
    ell = assignment_logits(q, gq, bq)
    index = hard_index(ell) if noise is None else hard_index(torch.softmax(ell / tau + noise, dim=-1))
    h, m, d = q.shape[0], q.shape[-1], elements.shape[1]
    p = elements.new_zeros(h, m, d)
    for i in range(h):
        p[i].index_add_(0, index[i], elements)
    return unit_rows(p)


def head_projection(x: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """ahat [H, B, M] = LayerNorm over M (no affine) of x [B, D] · C_hᵀ for every head."""
    a = torch.matmul(x, concepts.transpose(1, 2))
    var, mean = torch.var_mean(a, dim=-1, keepdim=True, correction=0)
    return (a - mean) * torch.rsqrt(var + LN_EPS)


class AssignParams:
    """q [H, E, M], γ_q, β_q [H, M] of every head (head h = si * n_lr + li) and their Adam moments."""

    NAMES = ("q", "gq", "bq")

    def __init__(self, num_elements: int, spec: GridSpec, device: torch.device | str = "cpu"):
        m = spec.assignment.num_concepts
        n_s, n_lr = len(spec.sparsities), len(spec.lrs)
        inits = [init_assignment(num_elements, m, spec.seed, si) for si in range(n_s)]
        self.q = torch.stack([q for q in inits for _ in range(n_lr)]).to(device) if inits \
            else torch.zeros(0, num_elements, m, device=device)
        self.gq = torch.ones(n_s * n_lr, m, device=device)
        self.bq = torch.zeros(n_s * n_lr, m, device=device)
        self.lr = torch.tensor([lr for _ in spec.sparsities for lr in spec.lrs], dtype=torch.float64)
        self.moments = {n: (torch.zeros_like(t), torch.zeros_like(t)) for n, t in self.tensors().items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"q": self.q, "gq": self.gq, "bq": self.bq}

    def adam_step(self, grads: dict[str, torch.Tensor], step: int, lr_scale: float) -> None:
        from .torch import adam_step_
        adam_step_(self.tensors(), self.moments, grads, {n: self.lr for n in self.NAMES}, step, lr_scale)


def evaluate_end2end(x: torch.Tensor, y: torch.Tensor, elements: torch.Tensor, assign: AssignParams,
                     spec: GridSpec, set_index: int, epoch: int,
                     counts: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[np.ndarray, np.ndarray]],
                     chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy of every probe [L] and head [H] on (x, y), the library of every head as §1.2 says.

    ``counts(x_rows, y_rows, concepts [H, M, D])`` returns the correct counts (probes, heads) of those rows with
    those concepts. Argmax evaluation builds each head's C once; stochastic evaluation draws noise for every batch
    of ``spec.batch_size`` rows (the official loop) and rebuilds C for it.
    """
    a = spec.assignment
    n = len(x)
    q, gq, bq = assign.q, assign.gq, assign.bq
    total_p = total_h = 0
    if not a.stochastic_eval:
        c = eval_concepts(q, gq, bq, elements, None, a.tau)
        for i in range(0, n, chunk):
            cp, ch = counts(x[i:i + chunk], y[i:i + chunk], c)
            total_p, total_h = total_p + cp, total_h + ch
    else:
        for b, i in enumerate(range(0, n, spec.batch_size)):
            noise = gumbel_noise(q.shape[1], q.shape[2], spec.seed, 1 + set_index, epoch * EVAL_COUNTER + b)
            c = eval_concepts(q, gq, bq, elements, noise.to(q.device), a.tau)
            cp, ch = counts(x[i:i + spec.batch_size], y[i:i + spec.batch_size], c)
            total_p, total_h = total_p + cp, total_h + ch
    return np.asarray(total_p) / n, np.asarray(total_h) / n


def train_end2end_torch(x: torch.Tensor, y: torch.Tensor, eval_sets: list[tuple[torch.Tensor, torch.Tensor]],
                        elements: torch.Tensor, spec: GridSpec, progress=None) -> GridOutput:
    """The whole end2end grid at once with autograd: probes as usual, every head with its own C_h per step."""
    from .torch import GridParams, stacked_cross_entropy

    device = x.device
    a = spec.assignment
    elements = F.normalize(elements.float(), dim=1).to(device)
    params = GridParams(x.shape[1], a.num_concepts, spec, device)
    assign = AssignParams(elements.shape[0], spec, device)
    e, m = elements.shape[0], a.num_concepts
    kidx = params.kidx

    def logits(xb: torch.Tensor, p: dict[str, torch.Tensor], concepts: torch.Tensor):
        n_lr, b = p["wp"].shape[0], xb.shape[0]
        probe = torch.baddbmm(p["bp"][:, None, :], xb.expand(n_lr, b, xb.shape[1]), p["wp"])
        z = head_projection(xb, concepts) * p["gamma"][:, None, :] + p["beta"][:, None, :]
        az = z.detach().abs()
        thr = az.sort(dim=-1).values.gather(-1, kidx.view(-1, 1, 1).expand(-1, b, 1))
        return probe, torch.baddbmm(p["b"][:, None, :], z * (az > thr), p["w"])

    def step(idx: torch.Tensor, lr_scale: float) -> None:
        t = params.step + 1
        leaves = {n: v.detach().requires_grad_(True) for n, v in {**params.tensors(), **assign.tensors()}.items()}
        noise = gumbel_noise(e, m, spec.seed, TRAIN_STREAM, t).to(device)
        c = train_concepts(leaves["q"], leaves["gq"], leaves["bq"], elements, noise, a.tau)
        lp, lh = logits(x[idx].float(), leaves, c)
        loss = stacked_cross_entropy(lp, y[idx]) + stacked_cross_entropy(lh, y[idx])
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        params.adam_step({n: grads[n] for n in params.tensors()}, lr_scale)
        assign.adam_step({n: grads[n] for n in AssignParams.NAMES}, params.step, lr_scale)

    calls = [0] * len(eval_sets)

    @torch.no_grad()
    def counts(xb: torch.Tensor, yb: torch.Tensor, concepts: torch.Tensor):
        lp, lh = logits(xb.float(), params.tensors(), concepts)
        return (lp.argmax(-1) == yb).sum(-1).cpu().numpy(), (lh.argmax(-1) == yb).sum(-1).cpu().numpy()

    def evaluate(j: int):
        ex, ey = eval_sets[j]
        calls[j] += 1
        return evaluate_end2end(ex, ey, elements, assign, spec, j, calls[j] - 1, counts)

    probe_acc, head_acc, timings = train_epochs(len(x), spec, len(eval_sets), step, evaluate, progress=progress,
                                                prepare_order=lambda o: o.to(device))
    return GridOutput(probe_acc, head_acc, backend="torch", timings=timings)
