"""Kernel (2) and (4): every concept head of the grid, forward + cross-entropy, backward, and evaluation.

Head h (h = si * n_lr + li) maps the shared normalised projection â [B, M] to logits through
    z = â·γ_h + β_h  ->  keep |z| > t_h(row) (t = (k_h+1)-th smallest |z| of the row; ties at t dropped)
    ->  zm = z * keep  ->  logits = zm · W_h + b_h   (W_h [M, K])      (docs/spec.md §1.3)
and is trained with the mean softmax cross-entropy of its batch.

* ``_head_fwd_kernel`` (grid: row blocks x heads). One program holds BLOCK_B rows of â and all M concepts in
  registers, applies the head's affine, finds each row's threshold *exactly* by bisection on the fp32 bit
  pattern of |z| (non-negative floats order like their int32 bits, so 31 halvings of [0, +inf] with
  ``tl.sum(bits <= mid)`` counts land on the (k+1)-th smallest value itself: no sort, no top-k), masks, and
  streams W_h over K in BLOCK_K chunks with an online log-sum-exp. Only lse, the loss and the threshold leave
  the kernel (3 floats per row and head); z, the mask and the logits are never written.
  MODE 1 (evaluation) keeps a running first-index argmax instead and adds the number of correct rows of the
  block to the head's counter; MODE 2 writes the logits (tests and debugging only).
* ``_head_bwd_kernel`` (grid: K blocks x heads). One program owns a BLOCK_K slice of W_h (kept in registers)
  and walks over all rows of the batch: it recomputes z, the mask (from the saved threshold) and the logit
  slice, forms dlogits = (softmax − onehot)·scale from the saved lse, and accumulates dW_h[:, slice] = zmᵀ·dl
  and db_h[slice] in registers (no atomics, written once), and the slice's share of
  dzm = dl·W_h[:, slice]ᵀ reduced over rows into dγ_h = Σ dzm·keep·â, dβ_h = Σ dzm·keep (atomic add of M
  values per program). No dx: the concepts and features are fixed.

Gradients flow through kept entries only (the mask is a constant), as in the oracle.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FORCE_BLOCKS, dot_precision, interpreted, pow2

MODE_TRAIN, MODE_EVAL, MODE_LOGITS = 0, 1, 2


@triton.jit
def _affine_threshold_mask(ahat_ptr, gamma_ptr, beta_ptr, kidx_ptr, h, rows, cols, rmask, cmask, M,
                           BLOCK_B: tl.constexpr):
    """z = â·γ + β for the block, the exact per-row threshold t (fp32) and the kept z (0 elsewhere)."""
    a = tl.load(ahat_ptr + rows[:, None] * M + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    g = tl.load(gamma_ptr + h * M + cols, mask=cmask, other=0.0)
    be = tl.load(beta_ptr + h * M + cols, mask=cmask, other=0.0)
    z = a * g[None, :] + be[None, :]
    kk = tl.load(kidx_ptr + h)
    # |z| as int32 bits; padding columns get NaN bits, above every value the search can return
    bits = tl.where(cmask[None, :], tl.abs(z).to(tl.int32, bitcast=True), 0x7FFFFFFF)
    # invariant: count(bits <= lo) < k+1 <= count(bits <= hi); hi ends on the bits of the (k+1)-th smallest
    lo = tl.full([BLOCK_B], -1, tl.int32)
    hi = tl.full([BLOCK_B], 0x7F800000, tl.int32)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        cnt = tl.sum((bits <= mid[:, None]).to(tl.int32), axis=1)
        ge = cnt >= kk + 1
        hi = tl.where(ge, mid, hi)
        lo = tl.where(ge, lo, mid)
    keep = (bits > hi[:, None]) & cmask[None, :]
    zm = tl.where(keep, z, 0.0)
    return a, zm, hi.to(tl.float32, bitcast=True)


@triton.jit
def _head_fwd_kernel(ahat_ptr, gamma_ptr, beta_ptr, w_ptr, b_ptr, kidx_ptr, y_ptr,
                     thr_ptr, lse_ptr, loss_ptr, out_ptr,
                     B, M, K,
                     MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     PREC: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_M)
    rmask = rows < B
    cmask = cols < M
    a, zm, thr = _affine_threshold_mask(ahat_ptr, gamma_ptr, beta_ptr, kidx_ptr, h, rows, cols, rmask, cmask, M,
                                          BLOCK_B)
    yv = tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.int32)
    m_i = tl.full([BLOCK_B], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_B], dtype=tl.float32)
    ly = tl.zeros([BLOCK_B], dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_B], dtype=tl.int32)
    w_base = w_ptr + h.to(tl.int64) * M * K
    for k0 in range(0, K, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        kmask = kc < K
        wc = tl.load(w_base + cols[:, None] * K + kc[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        bc = tl.load(b_ptr + h * K + kc, mask=kmask, other=0.0)
        lg = tl.dot(zm, wc, input_precision=PREC) + bc[None, :]
        if MODE == 2:
            tl.store(out_ptr + (h.to(tl.int64) * B + rows[:, None]) * K + kc[None, :], lg,
                     mask=rmask[:, None] & kmask[None, :])
        lg = tl.where(kmask[None, :], lg, float("-inf"))
        cmax = tl.max(lg, axis=1)
        if MODE == 1:
            carg = tl.argmax(lg, axis=1).to(tl.int32) + k0      # first maximum of the chunk
            upd = cmax > m_i                                     # strictly: an earlier chunk wins ties
            best_idx = tl.where(upd, carg, best_idx)
            m_i = tl.where(upd, cmax, m_i)
        else:
            m_new = tl.maximum(m_i, cmax)
            s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(lg - m_new[:, None]), axis=1)
            m_i = m_new
            ly += tl.sum(tl.where(kc[None, :] == yv[:, None], lg, 0.0), axis=1)
    if MODE == 1:
        hit = ((best_idx == yv) & rmask).to(tl.int32)
        tl.atomic_add(out_ptr + h, tl.sum(hit, axis=0))
    elif MODE == 2:
        tl.store(thr_ptr + h * B + rows, thr, mask=rmask)
    else:
        lse = m_i + tl.log(s_i)
        tl.store(lse_ptr + h * B + rows, lse, mask=rmask)
        tl.store(loss_ptr + h * B + rows, lse - ly, mask=rmask)
        tl.store(thr_ptr + h * B + rows, thr, mask=rmask)


@triton.jit
def _head_bwd_kernel(ahat_ptr, gamma_ptr, beta_ptr, w_ptr, b_ptr, y_ptr, thr_ptr, lse_ptr, scale_ptr,
                     dgamma_ptr, dbeta_ptr, dw_ptr, db_ptr,
                     B, M, K,
                     BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    pid_k = tl.program_id(0)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK_M)
    cmask = cols < M
    kc = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = kc < K
    w_base = w_ptr + h.to(tl.int64) * M * K
    wc = tl.load(w_base + cols[:, None] * K + kc[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
    bc = tl.load(b_ptr + h * K + kc, mask=kmask, other=0.0)
    g = tl.load(gamma_ptr + h * M + cols, mask=cmask, other=0.0)
    be = tl.load(beta_ptr + h * M + cols, mask=cmask, other=0.0)
    scale = tl.load(scale_ptr + h)                    # d(total loss)/d(loss_h) / B: the mean's gradient
    dw = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_K], dtype=tl.float32)
    dg = tl.zeros([BLOCK_M], dtype=tl.float32)
    dbe = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        a = tl.load(ahat_ptr + rows[:, None] * M + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        z = a * g[None, :] + be[None, :]                # the forward kernel's expression, bit for bit
        t = tl.load(thr_ptr + h * B + rows, mask=rmask, other=float("inf"))
        keep = (tl.abs(z) > t[:, None]) & cmask[None, :] & rmask[:, None]
        zm = tl.where(keep, z, 0.0)
        lg = tl.dot(zm, wc, input_precision=PREC) + bc[None, :]
        lse = tl.load(lse_ptr + h * B + rows, mask=rmask, other=0.0)
        yv = tl.load(y_ptr + rows, mask=rmask, other=0).to(tl.int32)
        p = tl.exp(lg - lse[:, None])
        dl = (p - tl.where(kc[None, :] == yv[:, None], 1.0, 0.0)) * scale
        dl = tl.where(rmask[:, None] & kmask[None, :], dl, 0.0)
        dw += tl.dot(tl.trans(zm), dl, input_precision=PREC)
        dbias += tl.sum(dl, axis=0)
        dz = tl.dot(dl, tl.trans(wc), input_precision=PREC)
        dz = tl.where(keep, dz, 0.0)
        dg += tl.sum(dz * a, axis=0)
        dbe += tl.sum(dz, axis=0)
    tl.store(dw_ptr + h.to(tl.int64) * M * K + cols[:, None] * K + kc[None, :], dw,
             mask=cmask[:, None] & kmask[None, :])
    tl.store(db_ptr + h * K + kc, dbias, mask=kmask)
    tl.atomic_add(dgamma_ptr + h * M + cols, dg, mask=cmask)
    tl.atomic_add(dbeta_ptr + h * M + cols, dbe, mask=cmask)


def _blocks(kernel, b: int, m: int, k: int, prec: str, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_M, BLOCK_K, num_warps).

    GPU choices are not tuned on hardware (none was lent); they are the sm_90 configurations that ptxas compiles
    without register spills for M <= 256 (checked offline with `ptxas -v`): fp32 "ieee" dots need smaller tiles
    than TF32 ones. Larger M (BLOCK_M 512) gets the smallest tiles.
    """
    block_m = pow2(m)
    if "sparse_head" in FORCE_BLOCKS:
        return FORCE_BLOCKS["sparse_head"][0], block_m, FORCE_BLOCKS["sparse_head"][1], 4
    if interpreted(kernel):                 # numpy: few, large programs
        return pow2(min(b, 256)), block_m, pow2(min(k, 256)), 4
    if block_m <= 128:
        return (32, block_m, 64 if prec == "tf32" else 32, 8)
    if block_m <= 256:
        if backward:
            return (16, block_m, 32 if prec == "tf32" else 16, 8)
        return (32 if prec == "tf32" else 16, block_m, 32, 8)
    return (16, block_m, 16, 8)


def _check(ahat, gamma, beta, w, b, kidx):
    h, m = gamma.shape
    assert ahat.dim() == 2 and ahat.shape[1] == m and ahat.is_contiguous()
    assert beta.shape == (h, m) and w.shape[:2] == (h, m) and b.shape == (h, w.shape[2]) and kidx.shape == (h,)
    for t in (gamma, beta, w, b):
        assert t.dtype == torch.float32 and t.is_contiguous()
    return h, m, w.shape[2]


def head_forward(ahat, gamma, beta, w, b, kidx, y):
    """Train-mode forward of every head: (loss [H, B] per row, lse [H, B], threshold [H, B])."""
    h, m, k = _check(ahat, gamma, beta, w, b, kidx)
    bsz = ahat.shape[0]
    lse = torch.empty(h, bsz, device=ahat.device, dtype=torch.float32)
    loss = torch.empty_like(lse)
    thr = torch.empty_like(lse)
    prec = dot_precision()
    bb, bm, bk, nw = _blocks(_head_fwd_kernel, bsz, m, k, prec, backward=False)
    _head_fwd_kernel[(triton.cdiv(bsz, bb), h)](ahat, gamma, beta, w, b, kidx, y, thr, lse, loss, lse,
                                                bsz, m, k, MODE=MODE_TRAIN, BLOCK_B=bb, BLOCK_M=bm, BLOCK_K=bk,
                                                PREC=prec, num_warps=nw)
    return loss, lse, thr


def head_backward(ahat, gamma, beta, w, b, y, thr, lse, scale, dgamma, dbeta, dw, db):
    """Gradients of Σ_h scale_h·Σ_rows CE_h(row) into dγ, dβ (accumulated: zero them first), dW, db (written).

    With scale_h = 1/B this is the gradient of each head's mean cross-entropy.
    """
    h, m, k = gamma.shape[0], gamma.shape[1], w.shape[2]
    bsz = ahat.shape[0]
    prec = dot_precision()
    bb, bm, bk, nw = _blocks(_head_bwd_kernel, bsz, m, k, prec, backward=True)
    _head_bwd_kernel[(triton.cdiv(k, bk), h)](ahat, gamma, beta, w, b, y, thr, lse, scale, dgamma, dbeta, dw, db,
                                              bsz, m, k, BLOCK_B=bb, BLOCK_M=bm, BLOCK_K=bk, PREC=prec,
                                              num_warps=nw)


def head_eval_correct(ahat, gamma, beta, w, b, kidx, y, correct: torch.Tensor | None = None) -> torch.Tensor:
    """Number of rows whose first-index argmax equals y, per head (int32 [H], added to `correct` if given)."""
    h, m, k = _check(ahat, gamma, beta, w, b, kidx)
    bsz = ahat.shape[0]
    if correct is None:
        correct = torch.zeros(h, device=ahat.device, dtype=torch.int32)
    prec = dot_precision()
    bb, bm, bk, nw = _blocks(_head_fwd_kernel, bsz, m, k, prec, backward=False)
    _head_fwd_kernel[(triton.cdiv(bsz, bb), h)](ahat, gamma, beta, w, b, kidx, y, correct, correct, correct, correct,
                                                bsz, m, k, MODE=MODE_EVAL, BLOCK_B=bb, BLOCK_M=bm, BLOCK_K=bk,
                                                PREC=prec, num_warps=nw)
    return correct


def head_logits(ahat, gamma, beta, w, b, kidx, return_threshold: bool = False):
    """Logits [H, B, K] of every head (and the thresholds [H, B]); for tests, training never writes them."""
    h, m, k = _check(ahat, gamma, beta, w, b, kidx)
    bsz = ahat.shape[0]
    out = torch.empty(h, bsz, k, device=ahat.device, dtype=torch.float32)
    dummy = torch.empty(h, bsz, device=ahat.device, dtype=torch.float32)
    y = torch.zeros(bsz, device=ahat.device, dtype=torch.int64)
    prec = dot_precision()
    bb, bm, bk, nw = _blocks(_head_fwd_kernel, bsz, m, k, prec, backward=False)
    _head_fwd_kernel[(triton.cdiv(bsz, bb), h)](ahat, gamma, beta, w, b, kidx, y, dummy, dummy, dummy, out,
                                                bsz, m, k, MODE=MODE_LOGITS, BLOCK_B=bb, BLOCK_M=bm, BLOCK_K=bk,
                                                PREC=prec, num_warps=nw)
    return (out, dummy) if return_threshold else out


class SparseHeadsCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of every head [H] as an autograd op over (γ, β, W, b); â, k and y are constants."""

    @staticmethod
    def forward(ctx, ahat, gamma, beta, w, b, kidx, y):
        ahat, gamma, beta, w, b = (t.contiguous() for t in (ahat, gamma, beta, w, b))
        loss, lse, thr = head_forward(ahat, gamma, beta, w, b, kidx, y)
        ctx.save_for_backward(ahat, gamma, beta, w, b, y, thr, lse)
        return loss.mean(dim=1)

    @staticmethod
    def backward(ctx, grad_loss):
        ahat, gamma, beta, w, b, y, thr, lse = ctx.saved_tensors
        scale = (grad_loss.float() / ahat.shape[0]).contiguous()
        dgamma, dbeta = torch.zeros_like(gamma), torch.zeros_like(beta)
        dw, db = torch.empty_like(w), torch.empty_like(b)
        head_backward(ahat, gamma, beta, w, b, y, thr, lse, scale, dgamma, dbeta, dw, db)
        return None, dgamma, dbeta, dw, db, None, None


def sparse_heads_cross_entropy(ahat, gamma, beta, w, b, kidx, y) -> torch.Tensor:
    return SparseHeadsCrossEntropy.apply(ahat, gamma, beta, w, b, kidx, y)
