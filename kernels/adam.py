"""Kernel (3): one Adam update over every parameter of the grid, with a learning rate per head.

The grid's tensors (probes wp [L,D,K], bp [L,K]; heads w [H,M,K], b [H,K], γ [H,M], β [H,M]) live as views of
one flat fp32 buffer (likewise their gradients and both moments), each segment padded to a whole number of
BLOCKs. A small per-block table gives the block's segment start, the number of elements per head in that segment
(the product of the trailing dims) and where its heads' step sizes start in a step-size table
(lr·decay^epoch / (1 − β1^t), precomputed in float64 on the host exactly as the torch path does). One launch
updates everything: m ← lerp(m, g, 1−β1), v ← β2·v + (1−β2)·g², p ← p − step·m / (√v / √(1−β2^t) + ε),
which is torch.optim.Adam (no weight decay, no amsgrad).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import interpreted

BLOCK = 1024


@triton.jit
def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, seg_start_ptr, seg_inner_ptr, seg_lr0_ptr, seg_nh_ptr, step_ptr,
                 beta1, beta2, inv_bc2_sqrt, eps, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = tl.load(seg_start_ptr + pid)
    inner = tl.load(seg_inner_ptr + pid)
    lr0 = tl.load(seg_lr0_ptr + pid)
    nh = tl.load(seg_nh_ptr + pid)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    head = tl.minimum((offs - start) // inner, nh - 1)       # padding past the segment reuses the last head
    step = tl.load(step_ptr + lr0 + head)
    p = tl.load(p_ptr + offs)
    g = tl.load(g_ptr + offs)
    m = tl.load(m_ptr + offs)
    v = tl.load(v_ptr + offs)
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * (g * g)
    denom = tl.sqrt(v) * inv_bc2_sqrt + eps
    p = p - (m * step) / denom
    tl.store(p_ptr + offs, p)
    tl.store(m_ptr + offs, m)
    tl.store(v_ptr + offs, v)


class FlatAdam:
    """Flat storage for named stacked tensors (+ grads and Adam moments) and the one-launch update.

    `shapes`: name -> shape (first axis = head); `lr_group`: name -> index of its lr table
    (each table holds one lr per head of that tensor's first axis).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], lr_group: dict[str, int], n_groups_heads: list[int],
                 device, betas=(0.9, 0.999), eps=1e-8):
        self.betas, self.eps, self.step = betas, eps, 0
        self.group_offset = [sum(n_groups_heads[:i]) for i in range(len(n_groups_heads))]
        self.n_lr_total = sum(n_groups_heads)
        offsets, starts, inners, lr0s, nhs = {}, [], [], [], []
        off = 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            nb = max(1, -(-n // BLOCK))
            offsets[name] = (off, shape)
            starts += [off] * nb
            inners += [max(1, n // shape[0])] * nb
            lr0s += [self.group_offset[lr_group[name]]] * nb
            nhs += [shape[0]] * nb
            off += nb * BLOCK
        self.numel, self.offsets = off, offsets
        i64 = dict(device=device, dtype=torch.int64)
        self.seg_start = torch.tensor(starts, **i64)
        self.seg_inner = torch.tensor(inners, **i64)
        self.seg_lr0 = torch.tensor(lr0s, **i64)
        self.seg_nh = torch.tensor(nhs, **i64)
        f32 = dict(device=device, dtype=torch.float32)
        self.p, self.g = torch.zeros(off, **f32), torch.zeros(off, **f32)
        self.m, self.v = torch.zeros(off, **f32), torch.zeros(off, **f32)

    def view(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        off, shape = self.offsets[name]
        return buf[off:off + math.prod(shape)].view(shape)

    def update(self, lrs: torch.Tensor, lr_scale: float) -> None:
        """One Adam step; `lrs` float64 [n_lr_total]: every lr table concatenated, before the decay factor."""
        b1, b2 = self.betas
        self.step += 1
        bc1 = 1 - b1 ** self.step
        bc2_sqrt = math.sqrt(1 - b2 ** self.step)
        step = (lrs.double() * lr_scale / bc1).to(torch.float32).to(self.p.device)
        grid = (self.numel // BLOCK,)
        _adam_kernel[grid](self.p, self.g, self.m, self.v, self.seg_start, self.seg_inner, self.seg_lr0,
                           self.seg_nh, step, b1, b2, 1.0 / bc2_sqrt, self.eps, BLOCK=BLOCK)
