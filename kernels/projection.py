"""Kernel (1): the shared projection a = x·Cᵀ fused with the LayerNorm statistics over the M concepts.

Every concept head of the grid starts from the same normalised projection â = (a − mean(a)) / sqrt(var(a) + eps)
(docs/spec.md §1.3 LayerNorm without its affine; the affine is per head and lives in the head kernel). One program owns
BLOCK_B rows and *all* M concepts (padded to a power of two), accumulates x·Cᵀ over D in fp32 and computes mean
and variance in the epilogue, so `a` itself is never written to memory: only â [B, M] (read by all heads) and
the two statistics per row leave the kernel. x may be stored as fp32, fp16 or bf16; it is cast to fp32 on load.
There is no backward: the concepts C are fixed and the grid needs no dx.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import FORCE_BLOCKS, dot_precision, interpreted, pow2

LN_EPS = 1e-5


@triton.jit
def _projection_ln_kernel(x_ptr, c_ptr, ahat_ptr, mean_ptr, rstd_ptr,
                          B, D, M, stride_x, eps,
                          BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          PREC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_M)
    rmask = rows < B
    cmask = cols < M
    acc = tl.zeros([BLOCK_B, BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        xb = tl.load(x_ptr + rows[:, None] * stride_x + dd[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        ct = tl.load(c_ptr + cols[None, :] * D + dd[:, None],
                     mask=cmask[None, :] & dmask[:, None], other=0.0).to(tl.float32)   # Cᵀ chunk [BLOCK_D, BLOCK_M]
        acc += tl.dot(xb, ct, input_precision=PREC)
    mean = tl.sum(acc, axis=1) / M                      # padded columns are exactly 0 in acc
    diff = tl.where(cmask[None, :], acc - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / M
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(ahat_ptr + rows[:, None] * M + cols[None, :], diff * rstd[:, None],
             mask=rmask[:, None] & cmask[None, :])
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


def _blocks(b: int, d: int, m: int, prec: str) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_D, BLOCK_M). GPU values untuned; sm_90 compiles them without spills for M <= 256."""
    block_m = pow2(m)
    if "projection" in FORCE_BLOCKS:
        return (*FORCE_BLOCKS["projection"], block_m)
    if interpreted(_projection_ln_kernel):
        return pow2(min(b, 256)), pow2(min(d, 512)), block_m
    return (32 if prec == "tf32" and block_m <= 256 else 16), 32, block_m


def projection_layernorm(x: torch.Tensor, concepts: torch.Tensor, eps: float = LN_EPS,
                         out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """â = LayerNorm(x·Cᵀ) without affine, in fp32, with the row mean and 1/std: ([B, M], [B], [B])."""
    assert x.dim() == 2 and concepts.dim() == 2 and x.shape[1] == concepts.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    concepts = concepts.contiguous()
    b, d = x.shape
    m = concepts.shape[0]
    ahat = out if out is not None else torch.empty(b, m, device=x.device, dtype=torch.float32)
    mean = torch.empty(b, device=x.device, dtype=torch.float32)
    rstd = torch.empty(b, device=x.device, dtype=torch.float32)
    if b == 0:
        return ahat, mean, rstd
    prec = dot_precision()
    block_b, block_d, block_m = _blocks(b, d, m, prec)
    grid = (triton.cdiv(b, block_b),)
    _projection_ln_kernel[grid](x, concepts, ahat, mean, rstd, b, d, m, x.stride(0), eps,
                                BLOCK_B=block_b, BLOCK_D=block_d, BLOCK_M=block_m, PREC=prec, num_warps=8)
    return ahat, mean, rstd
