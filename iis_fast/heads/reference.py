"""The oracle: one head at a time, written as literally as docs/spec.md §1.3-1.5 reads.

Slow on purpose and readable above all; every other backend is tested against it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import GridOutput, GridSpec, LN_EPS, epoch_orders, init_linear, sparse_mask


class ConceptHead(nn.Module):
    """a = x·Cᵀ -> LayerNorm(M) -> keep |z| > (k+1)-th smallest |z| (others 0, kept not shrunk) -> Linear(M->K)."""

    def __init__(self, concepts: torch.Tensor, num_classes: int, k: int, seed: int, uid: int):
        super().__init__()
        m = concepts.shape[0]
        self.register_buffer("concepts", concepts.float())
        self.k = k
        self.norm = nn.LayerNorm(m, eps=LN_EPS)
        self.fc = nn.Linear(m, num_classes)
        w, b = init_linear(m, num_classes, seed, uid)
        with torch.no_grad():
            self.fc.weight.copy_(w)
            self.fc.bias.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm(x @ self.concepts.T)
        z = z * sparse_mask(z, self.k)          # the mask is a constant: gradients flow through kept entries
        return self.fc(z)


def make_probe(in_dim: int, num_classes: int, seed: int) -> nn.Linear:
    """The standard probe Linear(D->K) (docs/spec.md §1.4)."""
    probe = nn.Linear(in_dim, num_classes)
    w, b = init_linear(in_dim, num_classes, seed, 0)
    with torch.no_grad():
        probe.weight.copy_(w)
        probe.bias.copy_(b)
    return probe


@torch.no_grad()
def accuracy(head: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> float:
    correct = 0
    for i in range(0, len(x), chunk):
        correct += (head(x[i:i + chunk].float()).argmax(-1) == y[i:i + chunk]).sum().item()
    return correct / len(x)


def train_head(head: nn.Module, x: torch.Tensor, y: torch.Tensor, eval_sets: list[tuple[torch.Tensor, torch.Tensor]],
               lr: float, spec: GridSpec) -> np.ndarray:
    """Adam (no weight decay), lr x0.99 per epoch, CE, shuffled batches; accuracy on each eval set per epoch."""
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=spec.lr_decay)
    acc = np.zeros((len(eval_sets), spec.epochs))
    for epoch, order in enumerate(epoch_orders(len(x), spec.epochs, spec.seed)):
        head.train()
        for i in range(0, len(x), spec.batch_size):
            idx = order[i:i + spec.batch_size]
            loss = F.cross_entropy(head(x[idx].float()), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        head.eval()
        for j, (ex, ey) in enumerate(eval_sets):
            acc[j, epoch] = accuracy(head, ex, ey)
    return acc


def train_grid_reference(x: torch.Tensor, y: torch.Tensor, eval_sets: list[tuple[torch.Tensor, torch.Tensor]],
                         concepts: torch.Tensor, spec: GridSpec, progress=None) -> GridOutput:
    """Train the probe and every concept head of the grid one after another (3 x (1 + 8) = 27 by default)."""
    n_sets, n_s, n_lr = len(eval_sets), len(spec.sparsities), len(spec.lrs)
    probe_acc = np.zeros((n_sets, n_lr, spec.epochs))
    head_acc = np.zeros((n_sets, n_s, n_lr, spec.epochs))
    ks = spec.ks(concepts.shape[0])
    for li, lr in enumerate(spec.lrs):
        torch.manual_seed(spec.seed)
        probe_acc[:, li] = train_head(make_probe(x.shape[1], spec.num_classes, spec.seed), x, y, eval_sets, lr, spec)
        if progress is not None:
            progress.update(spec.epochs)
        for si, k in enumerate(ks):
            head = ConceptHead(concepts, spec.num_classes, k, spec.seed, 1 + si)
            head_acc[:, si, li] = train_head(head, x, y, eval_sets, lr, spec)
            if progress is not None:
                progress.update(spec.epochs)
    return GridOutput(probe_acc, head_acc, backend="reference")
