"""Fused softmax cross-entropy forward + backward for the standard probes' logits (Liger-Kernel style).

The probes (docs/spec.md §1.4) are dense Linear(D -> K) layers: their GEMMs x·W and xᵀ·dlogits are cuBLAS's job
(torch.baddbmm / torch.bmm). What is left between the two GEMMs is the loss: one program takes BLOCK_R rows of
logits, computes the log-sum-exp over K in chunks (online max/sum), the per-row loss, and overwrites the logits
with their gradient (softmax − onehot)·scale in place, so the probe logits are read twice and written once and no
softmax tensor exists. Labels are shared by the L probes: row r of the [L·B, K] view uses y[r mod B].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FORCE_BLOCKS, interpreted, pow2


@triton.jit
def _ce_fwd_bwd_kernel(logits_ptr, y_ptr, loss_ptr, R, B, K, scale,
                       BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    yv = tl.load(y_ptr + rows % B, mask=rmask, other=0).to(tl.int32)
    base = logits_ptr + rows.to(tl.int64)[:, None] * K
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    ly = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        msk = rmask[:, None] & (kc < K)[None, :]
        lg = tl.load(base + kc[None, :], mask=msk, other=0.0).to(tl.float32)
        lg = tl.where((kc < K)[None, :], lg, float("-inf"))      # padded rows stay finite: no inf - inf
        m_new = tl.maximum(m_i, tl.max(lg, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(lg - m_new[:, None]), axis=1)
        m_i = m_new
        ly += tl.sum(tl.where(kc[None, :] == yv[:, None], lg, 0.0), axis=1)
    lse = m_i + tl.log(s_i)
    tl.store(loss_ptr + rows, lse - ly, mask=rmask)
    for k0 in range(0, K, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        msk = rmask[:, None] & (kc < K)[None, :]
        lg = tl.load(base + kc[None, :], mask=msk, other=0.0).to(tl.float32)
        g = (tl.exp(lg - lse[:, None]) - tl.where(kc[None, :] == yv[:, None], 1.0, 0.0)) * scale
        tl.store(base + kc[None, :], g, mask=msk)


def cross_entropy_fwd_bwd_(logits: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-row CE of `logits` [..., B, K] against y [B]; overwrites `logits` with scale·dCE/dlogits.

    Returns the per-row losses with the leading shape of `logits`. scale = 1/B gives the mean's gradient.
    """
    assert logits.is_contiguous() and logits.dtype == torch.float32
    k = logits.shape[-1]
    b = y.shape[0]
    r = logits.numel() // k
    assert r % b == 0
    loss = torch.empty(logits.shape[:-1], device=logits.device, dtype=torch.float32)
    if "cross_entropy" in FORCE_BLOCKS:
        block_r, block_k = FORCE_BLOCKS["cross_entropy"]
    elif interpreted(_ce_fwd_bwd_kernel):
        block_r, block_k = pow2(min(r, 256), 1), pow2(min(k, 1024), 1)
    else:
        block_r, block_k = 4, min(1024, pow2(k))
    _ce_fwd_bwd_kernel[(triton.cdiv(r, block_r),)](logits, y, loss, r, b, k, float(scale),
                                                   BLOCK_R=block_r, BLOCK_K=block_k)
    return loss


class FusedCrossEntropy(torch.autograd.Function):
    """Mean CE over rows of [..., B, K] logits (summed over leading axes), gradient computed in the forward."""

    @staticmethod
    def forward(ctx, logits, y):
        g = logits.detach().float().contiguous().clone()
        loss = cross_entropy_fwd_bwd_(g, y, 1.0 / y.shape[0])
        ctx.save_for_backward(g)
        return loss.sum() / y.shape[0]

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return g * grad_out, None
