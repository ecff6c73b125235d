"""`backend="torch"`: every probe and concept head of the grid trained in one pass over the features.

Same semantics as :mod:`iis_fast.backends.reference` (same init, batch order, Adam, lr schedule); the concept heads
share a = x·Cᵀ and its LayerNorm statistics, and differ only in (γ, β, W, b), threshold rank and lr.
Head h = si * n_lr + li holds sparsity si at learning rate li.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .common import ADAM_BETAS, ADAM_EPS, LN_EPS, GridOutput, GridSpec, init_linear, train_epochs


class GridParams:
    """All trainable tensors of a grid, stacked per head, plus their Adam moments."""

    def __init__(self, in_dim: int, num_concepts: int, spec: GridSpec, device: torch.device | str = "cpu"):
        n_s, n_lr, k = len(spec.sparsities), len(spec.lrs), spec.num_classes
        wp, bp = init_linear(in_dim, k, spec.seed, 0)
        self.wp = wp.t().contiguous().expand(n_lr, in_dim, k).clone().to(device)      # [L, D, K]
        self.bp = bp.expand(n_lr, k).clone().to(device)                                 # [L, K]
        inits = [init_linear(num_concepts, k, spec.seed, 1 + si) for si in range(n_s)]    # [] for a probe-only grid
        self.w = torch.stack([w.t() for w, _ in inits for _ in range(n_lr)]).contiguous().to(device) \
            if inits else torch.zeros(0, num_concepts, k, device=device)                          # [H, M, K]
        self.b = torch.stack([b for _, b in inits for _ in range(n_lr)]).to(device) \
            if inits else torch.zeros(0, k, device=device)                                        # [H, K]
        self.gamma = torch.ones(n_s * n_lr, num_concepts, device=device)                         # [H, M]
        self.beta = torch.zeros(n_s * n_lr, num_concepts, device=device)
        self.kidx = torch.tensor([kk for kk in spec.ks(num_concepts) for _ in range(n_lr)], device=device)
        self.lr_probe = torch.tensor(list(spec.lrs), dtype=torch.float64)
        self.lr_head = torch.tensor([lr for _ in spec.sparsities for lr in spec.lrs], dtype=torch.float64)
        self.step = 0
        self.moments = {name: (torch.zeros_like(t), torch.zeros_like(t)) for name, t in self.tensors().items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"wp": self.wp, "bp": self.bp, "w": self.w, "b": self.b, "gamma": self.gamma, "beta": self.beta}

    @torch.no_grad()
    def adam_step(self, grads: dict[str, torch.Tensor], lr_scale: float) -> None:
        """torch.optim.Adam's update (no weight decay), with a learning rate per head (first axis)."""
        self.step += 1
        lrs = {n: self.lr_probe if n in ("wp", "bp") else self.lr_head for n in self.moments}
        adam_step_(self.tensors(), self.moments, grads, lrs, self.step, lr_scale)


@torch.no_grad()
def adam_step_(params: dict[str, torch.Tensor], moments: dict[str, tuple[torch.Tensor, torch.Tensor]],
               grads: dict[str, torch.Tensor], lrs: dict[str, torch.Tensor], step: int, lr_scale: float) -> None:
    """torch.optim.Adam's update (no weight decay) of every tensor in place, with a learning rate per head.

    ``lrs[name]`` (float64) holds one learning rate per entry of the tensor's first axis; ``step`` is the update's
    1-based count (bias correction).
    """
    b1, b2 = ADAM_BETAS
    bc1 = 1 - b1 ** step
    bc2_sqrt = math.sqrt(1 - b2 ** step)
    for name, p in params.items():
        g = grads[name]
        m, v = moments[name]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        step_size = (lrs[name] * lr_scale / bc1).to(p.dtype).to(p.device).view(-1, *([1] * (p.dim() - 1)))
        denom = (v.sqrt() / bc2_sqrt).add_(ADAM_EPS)
        p.addcdiv_(m * step_size, denom, value=-1.0)


def normalized_projection(x: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine) of a = x·Cᵀ over the M concepts: the part every concept head shares."""
    a = x @ concepts.T
    var, mean = torch.var_mean(a, dim=-1, keepdim=True, correction=0)
    return (a - mean) * torch.rsqrt(var + LN_EPS)


def grid_logits(x: torch.Tensor, concepts: torch.Tensor, p: dict[str, torch.Tensor], kidx: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of every probe [L,B,K] and every concept head [H,B,K] for one batch x [B,D]."""
    n_lr, b = p["wp"].shape[0], x.shape[0]
    probe_logits = torch.baddbmm(p["bp"][:, None, :], x.expand(n_lr, b, x.shape[1]), p["wp"])
    ahat = normalized_projection(x, concepts)                                   # [B, M]
    z = ahat[None] * p["gamma"][:, None, :] + p["beta"][:, None, :]            # [H, B, M]
    az = z.detach().abs()
    thr = az.sort(dim=-1).values.gather(-1, kidx.view(-1, 1, 1).expand(-1, b, 1))
    z = z * (az > thr)
    head_logits = torch.baddbmm(p["b"][:, None, :], z, p["w"])
    return probe_logits, head_logits


def stacked_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over heads of each head's mean cross-entropy: the gradient of each head is its own CE's."""
    h, b, k = logits.shape
    return F.cross_entropy(logits.reshape(h * b, k), y.repeat(h), reduction="sum") / b


@torch.no_grad()
def grid_accuracy(x: torch.Tensor, y: torch.Tensor, concepts: torch.Tensor, params: GridParams,
                  chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    correct_p = torch.zeros(params.wp.shape[0], dtype=torch.long, device=x.device)
    correct_h = torch.zeros(params.w.shape[0], dtype=torch.long, device=x.device)
    for i in range(0, len(x), chunk):
        xb, yb = x[i:i + chunk].float(), y[i:i + chunk]
        lp, lh = grid_logits(xb, concepts, params.tensors(), params.kidx)
        correct_p += (lp.argmax(-1) == yb).sum(-1)
        correct_h += (lh.argmax(-1) == yb).sum(-1)
    return correct_p.cpu().numpy() / len(x), correct_h.cpu().numpy() / len(x)


def train_grid_torch(x: torch.Tensor, y: torch.Tensor, eval_sets: list[tuple[torch.Tensor, torch.Tensor]],
                     concepts: torch.Tensor, spec: GridSpec, progress=None) -> GridOutput:
    """Train the whole grid at once with autograd on stacked parameters."""
    if spec.assignment is not None:
        from .end2end import train_end2end_torch
        return train_end2end_torch(x, y, eval_sets, concepts, spec, progress)
    device = x.device
    concepts = concepts.float().to(device)
    params = GridParams(x.shape[1], concepts.shape[0], spec, device)

    def step(idx: torch.Tensor, lr_scale: float) -> None:
        leaves = {n: t.detach().requires_grad_(True) for n, t in params.tensors().items()}
        lp, lh = grid_logits(x[idx].float(), concepts, leaves, params.kidx)
        loss = stacked_cross_entropy(lp, y[idx]) + stacked_cross_entropy(lh, y[idx])
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        params.adam_step(grads, lr_scale)

    def evaluate(j: int):
        ex, ey = eval_sets[j]
        return grid_accuracy(ex, ey, concepts, params)

    probe_acc, head_acc, timings = train_epochs(len(x), spec, len(eval_sets), step, evaluate, progress=progress,
                                                prepare_order=lambda o: o.to(device))
    return GridOutput(probe_acc, head_acc, backend="torch", timings=timings)
