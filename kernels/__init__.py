"""Triton kernels for the IIS grid's hot loop (docs/spec.md §1.3-1.5); see docs/kernels_triton.md.

projection      : a = x·Cᵀ fused with LayerNorm statistics -> â [B, M]
sparse_head     : every concept head: affine, exact per-row threshold, mask, W GEMM, softmax CE; its backward
                  (dγ, dβ, dW, db); and the evaluation (argmax accuracy per head) fused likewise
cross_entropy   : fused softmax CE forward+backward for the dense probes' logits
adam            : one Adam launch over all stacked parameters with a learning rate per head

Import this package only where triton works (a CUDA device, or TRITON_INTERPRET=1 set *before* the import:
triton decides between compiling and interpreting when a kernel is defined).
"""
from .adam import FlatAdam
from .cross_entropy import FusedCrossEntropy, cross_entropy_fwd_bwd_
from .projection import projection_layernorm
from .sparse_head import (SparseHeadsCrossEntropy, head_backward, head_eval_correct, head_forward, head_logits,
                          sparse_heads_cross_entropy)

__all__ = ["FlatAdam", "FusedCrossEntropy", "cross_entropy_fwd_bwd_", "projection_layernorm",
           "SparseHeadsCrossEntropy", "head_backward", "head_eval_correct", "head_forward", "head_logits",
           "sparse_heads_cross_entropy"]
