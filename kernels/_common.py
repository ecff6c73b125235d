"""Small helpers every kernel file shares: block sizes and the interpreter check."""
from __future__ import annotations

import torch
import triton


# Tests set these to small blocks so that the interpreter also walks the chunk loops and partial blocks:
# "projection": (BLOCK_B, BLOCK_D); "sparse_head": (BLOCK_B, BLOCK_K); "cross_entropy": (BLOCK_R, BLOCK_K).
FORCE_BLOCKS: dict[str, tuple[int, int]] = {}


def interpreted(kernel) -> bool:
    """True when `kernel` was built under TRITON_INTERPRET=1 (numpy, one program at a time)."""
    return type(kernel).__name__ == "InterpretedFunction"


def pow2(n: int, lo: int = 16) -> int:
    """Next power of two >= n, and at least `lo` (tl.dot needs every dimension >= 16 on a GPU)."""
    return max(lo, triton.next_power_of_2(int(n)))


def dot_precision() -> str:
    """tl.dot input precision that mirrors torch's own fp32 matmul setting.

    torch.backends.cuda.matmul.allow_tf32 / torch.set_float32_matmul_precision("high") switch torch's cuBLAS
    GEMMs to TF32; the hand-written head GEMMs follow the same switch so that one knob decides for the whole
    step. The default ("highest") keeps full fp32 ("ieee").
    """
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"
