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


class End2EndHead(nn.Module):
    """The official ``End2End_IP`` head, literally (docs/spec.md §1.2): its own q [E, M] -> LayerNorm ->
    ``gumbel_softmax(LN(q)/tau, tau=1, hard=True)`` -> C = normalize(Aᵀ·E) -> the concept head of §1.3.

    ``noise`` is the Gumbel draw [E, M] of the next forward (set by the training loop); None evaluates with the
    argmax of LN(q) instead.
    """

    def __init__(self, elements: torch.Tensor, num_concepts: int, num_classes: int, k: int, seed: int, si: int,
                 tau: float):
        super().__init__()
        from .end2end import init_assignment
        m = num_concepts
        self.register_buffer("elements", F.normalize(elements.float(), dim=-1))
        self.q = nn.Parameter(init_assignment(elements.shape[0], m, seed, si))
        self.q_norm = nn.LayerNorm(m, eps=LN_EPS)
        self.head = ConceptHead(torch.zeros(m, elements.shape[1]), num_classes, k, seed, 1 + si)
        self.tau = tau
        self.noise: torch.Tensor | None = None

    def assignment(self) -> torch.Tensor:
        ell = self.q_norm(self.q)
        if self.noise is None:
            return F.one_hot(ell.argmax(-1), ell.shape[-1]).float()
        y_soft = (ell / self.tau + self.noise).softmax(-1)
        index = y_soft.max(-1, keepdim=True)[1]
        if y_soft.requires_grad:        # the same gradient, computed stably (iis_fast.backends.end2end.stable_soft_grad)
            y_soft.register_hook(lambda g: g - g.gather(-1, index))
        y_hard = torch.zeros_like(ell).scatter_(-1, index, 1.0)
        return y_hard - y_soft.detach() + y_soft

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        concepts = F.normalize(self.assignment().T.matmul(self.elements), p=2, dim=-1)
        z = self.head.norm(x @ concepts.T)
        z = z * sparse_mask(z, self.head.k)
        return self.head.fc(z)


def train_end2end_head(head: End2EndHead, x: torch.Tensor, y: torch.Tensor,
                       eval_sets: list[tuple[torch.Tensor, torch.Tensor]], lr: float, spec: GridSpec) -> np.ndarray:
    """:func:`train_head` for an end2end head: a fresh noise draw per step; evaluation by argmax, or (official,
    ``spec.assignment.stochastic_eval``) a fresh draw per evaluation batch of ``spec.batch_size`` rows."""
    from .end2end import EVAL_COUNTER, TRAIN_STREAM, gumbel_noise
    e, m = head.q.shape
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=spec.lr_decay)
    acc = np.zeros((len(eval_sets), spec.epochs))
    t = 0
    for epoch, order in enumerate(epoch_orders(len(x), spec.epochs, spec.seed)):
        head.train()
        for i in range(0, len(x), spec.batch_size):
            t += 1
            head.noise = gumbel_noise(e, m, spec.seed, TRAIN_STREAM, t)
            idx = order[i:i + spec.batch_size]
            loss = F.cross_entropy(head(x[idx].float()), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        head.eval()
        for j, (ex, ey) in enumerate(eval_sets):
            if not spec.assignment.stochastic_eval:
                head.noise = None
                acc[j, epoch] = accuracy(head, ex, ey)
                continue
            correct = 0
            for b, i in enumerate(range(0, len(ex), spec.batch_size)):
                head.noise = gumbel_noise(e, m, spec.seed, 1 + j, epoch * EVAL_COUNTER + b)
                correct += accuracy(head, ex[i:i + spec.batch_size], ey[i:i + spec.batch_size]) * \
                    len(ex[i:i + spec.batch_size])
            acc[j, epoch] = correct / len(ex)
    return acc


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
               lr: float, spec: GridSpec) -> tuple[np.ndarray, np.ndarray]:
    """Adam (no weight decay), lr x0.99 per epoch, CE, shuffled batches; accuracy on each eval set per epoch, and
    the per-sample correctness on the last eval set at the best epoch on the first (first maximum)."""
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=spec.lr_decay)
    acc = np.zeros((len(eval_sets), spec.epochs))
    best = None
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
        if epoch == 0 or acc[0, epoch] > acc[0, :epoch].max():
            best = correct(head, *eval_sets[-1])
    return acc, best


@torch.no_grad()
def correct(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-sample correctness [N] of a head's argmax prediction."""
    return (head(x.float()).argmax(-1) == y).cpu().numpy()


def train_grid_reference(x: torch.Tensor, y: torch.Tensor, eval_sets: list[tuple[torch.Tensor, torch.Tensor]],
                         concepts: torch.Tensor, spec: GridSpec, progress=None) -> GridOutput:
    """Train the probe and every concept head of the grid one after another (3 x (1 + 8) = 27 by default).
    One grid per call: the registry runs repeats (``spec.seeds``) as one call per seed."""
    n_sets, n_s, n_lr = len(eval_sets), len(spec.sparsities), len(spec.lrs)
    probe_acc = np.zeros((n_sets, n_lr, spec.epochs))
    head_acc = np.zeros((n_sets, n_s, n_lr, spec.epochs))
    n_eval = len(eval_sets[-1][1])
    correct_p = np.zeros((n_lr, n_eval), dtype=bool)
    correct_h = np.zeros((n_s, n_lr, n_eval), dtype=bool)
    a = spec.assignment
    ks = spec.ks(concepts.shape[0] if a is None else a.num_concepts)
    for li, lr in enumerate(spec.lrs):
        torch.manual_seed(spec.seed)
        probe_acc[:, li], correct_p[li] = train_head(make_probe(x.shape[1], spec.num_classes, spec.seed), x, y,
                                                     eval_sets, lr, spec)
        if progress is not None:
            progress.update(spec.epochs)
        for si, k in enumerate(ks):
            if a is None:
                head = ConceptHead(concepts, spec.num_classes, k, spec.seed, 1 + si)
                head_acc[:, si, li], correct_h[si, li] = train_head(head, x, y, eval_sets, lr, spec)
            else:       # concepts holds the element matrix E: the head learns its own assignment
                head = End2EndHead(concepts, a.num_concepts, spec.num_classes, k, spec.seed, si, a.tau)
                head_acc[:, si, li] = train_end2end_head(head, x, y, eval_sets, lr, spec)
            if progress is not None:
                progress.update(spec.epochs)
    if a is not None:       # end2end: no per-sample record (its evaluation may draw noise per batch)
        return GridOutput(probe_acc, head_acc, backend="reference")
    return GridOutput(probe_acc, head_acc, backend="reference", correct_probe=correct_p, correct_head=correct_h)
