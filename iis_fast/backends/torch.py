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

from .common import ADAM_BETAS, ADAM_EPS, LN_EPS, BestSnapshot, GridOutput, GridSpec, init_linear, train_epochs


class GridParams:
    """All trainable tensors of a grid, stacked per head, plus their Adam moments."""

    def __init__(self, in_dim: int, num_concepts: int, spec: GridSpec, device: torch.device | str = "cpu"):
        # With spec.seeds, the grids of every seed are stacked on the first axis, repeat major.
        n_s, n_lr, k = len(spec.sparsities), len(spec.lrs), spec.num_classes
        seeds = spec.grid_seeds()
        wps, bps, ws, bs = [], [], [], []
        for seed in seeds:
            wp, bp = init_linear(in_dim, k, seed, 0)
            wps.append(wp.t().contiguous().expand(n_lr, in_dim, k))
            bps.append(bp.expand(n_lr, k))
            inits = [init_linear(num_concepts, k, seed, 1 + si) for si in range(n_s)]    # [] for a probe-only grid
            ws += [w.t() for w, _ in inits for _ in range(n_lr)]
            bs += [b for _, b in inits for _ in range(n_lr)]
        self.wp = torch.cat(wps).clone().to(device)                                             # [R*L, D, K]
        self.bp = torch.cat(bps).clone().to(device)                                             # [R*L, K]
        self.w = torch.stack(ws).contiguous().to(device) if ws else torch.zeros(0, num_concepts, k, device=device)
        self.b = torch.stack(bs).to(device) if bs else torch.zeros(0, k, device=device)       # [R*H, M, K], [R*H, K]
        n_h = len(seeds) * n_s * n_lr
        self.gamma = torch.ones(n_h, num_concepts, device=device)                                # [R*H, M]
        self.beta = torch.zeros(n_h, num_concepts, device=device)
        self.kidx = torch.tensor([kk for _ in seeds for kk in spec.ks(num_concepts) for _ in range(n_lr)],
                                 device=device)
        self.lr_probe = torch.tensor([lr for _ in seeds for lr in spec.lrs], dtype=torch.float64)
        self.lr_head = torch.tensor([lr for _ in seeds for _ in spec.sparsities for lr in spec.lrs],
                                    dtype=torch.float64)
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
    """Logits of every probe [P,B,K] and every concept head [H,B,K] for one batch x: [B,D] seen by every head, or
    [R,B,D] with one batch per repeat (P and H are then R blocks of heads, block r seeing x[r])."""
    if x.dim() == 3:
        r, b, d = x.shape
        xp = x[:, None].expand(r, p["wp"].shape[0] // r, b, d).reshape(-1, b, d)
        ahat = normalized_projection(x.reshape(r * b, d), concepts).view(r, b, -1)
        ahat = ahat[:, None].expand(r, p["gamma"].shape[0] // r, b, ahat.shape[-1]).reshape(-1, b, ahat.shape[-1])
    else:
        b = x.shape[0]
        xp = x.expand(p["wp"].shape[0], b, x.shape[1])
        ahat = normalized_projection(x, concepts)[None]                          # [1, B, M]
    probe_logits = torch.baddbmm(p["bp"][:, None, :], xp, p["wp"])
    z = ahat * p["gamma"][:, None, :] + p["beta"][:, None, :]                  # [H, B, M]
    az = z.detach().abs()
    thr = az.sort(dim=-1).values.gather(-1, kidx.view(-1, 1, 1).expand(-1, b, 1))
    z = z * (az > thr)
    head_logits = torch.baddbmm(p["b"][:, None, :], z, p["w"])
    return probe_logits, head_logits


def stacked_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over heads of each head's mean cross-entropy: the gradient of each head is its own CE's. y: [B] for
    every head, or [R, B] for R equal blocks of heads."""
    h, b, k = logits.shape
    y = y.repeat(h) if y.dim() == 1 else y.repeat_interleave(h // y.shape[0], dim=0).reshape(-1)
    return F.cross_entropy(logits.reshape(h * b, k), y, reduction="sum") / b


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


@torch.no_grad()
def selected_correct(best: dict[str, torch.Tensor], kidx: torch.Tensor, concepts: torch.Tensor, x: torch.Tensor,
                     y: torch.Tensor, n_lr: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample correctness [P, N] and [H, N] on (x, y) of every probe and concept head of ``best`` (GridParams
    layout, e.g. :class:`~iis_fast.backends.common.BestSnapshot`'s), reshaped to [R, n_lr, N] and
    [R, n_s, n_lr, N]. Computed in torch: a fused backend's own counts may differ by a rare rounding flip."""
    device = best["wp"].device
    cp, ch = [], []
    for i in range(0, len(x), chunk):
        xb, yb = x[i:i + chunk].to(device).float(), y[i:i + chunk].to(device)
        lp, lh = grid_logits(xb, concepts.to(device).float(), best, kidx.to(device))
        cp.append((lp.argmax(-1) == yb).cpu())
        ch.append((lh.argmax(-1) == yb).cpu())
    cp, ch = torch.cat(cp, 1).numpy(), torch.cat(ch, 1).numpy()
    n_r = cp.shape[0] // n_lr
    return cp.reshape(n_r, n_lr, -1), ch.reshape(n_r, -1, n_lr, ch.shape[-1])


def finish_snapshot(out: GridOutput, snapshot: BestSnapshot, kidx: torch.Tensor, concepts: torch.Tensor,
                    eval_set: tuple[torch.Tensor, torch.Tensor], spec: GridSpec) -> GridOutput:
    """Fill ``out.correct_probe`` / ``correct_head`` (the last evaluation set) from a training's snapshot."""
    if snapshot.best is None:
        return out
    cp, ch = selected_correct(snapshot.best, kidx, concepts, eval_set[0], eval_set[1], len(spec.lrs))
    out.correct_probe, out.correct_head = (cp, ch) if spec.seeds is not None else (cp[0], ch[0])
    return out


def train_grid_torch(x: torch.Tensor, y: torch.Tensor, eval_sets: list[tuple[torch.Tensor, torch.Tensor]],
                     concepts: torch.Tensor, spec: GridSpec, progress=None) -> GridOutput:
    """Train the whole grid at once with autograd on stacked parameters."""
    if spec.assignment is not None:
        from .end2end import train_end2end_torch
        return train_end2end_torch(x, y, eval_sets, concepts, spec, progress)
    device = x.device
    concepts = concepts.float().to(device)
    params = GridParams(x.shape[1], concepts.shape[0], spec, device)

    def step(idx: torch.Tensor, lr_scale: float) -> None:       # idx [B], or [R, B] with spec.seeds
        leaves = {n: t.detach().requires_grad_(True) for n, t in params.tensors().items()}
        lp, lh = grid_logits(x[idx].float(), concepts, leaves, params.kidx)
        loss = stacked_cross_entropy(lp, y[idx]) + stacked_cross_entropy(lh, y[idx])
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        params.adam_step(grads, lr_scale)

    def evaluate(j: int):
        ex, ey = eval_sets[j]
        return grid_accuracy(ex, ey, concepts, params)

    snapshot = BestSnapshot(params.tensors)
    probe_acc, head_acc, timings = train_epochs(len(x), spec, len(eval_sets), step, evaluate, progress=progress,
                                                prepare_order=lambda o: o.to(device), snapshot=snapshot)
    out = GridOutput(probe_acc, head_acc, backend="torch", timings=timings)
    return finish_snapshot(out, snapshot, params.kidx, concepts, eval_sets[-1], spec)
