"""Helpers shared by the weight converters."""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["timm_block_names", "rename_bn", "check_all_used"]


def timm_block_names(model: nn.Module) -> list[str]:
    """The timm EfficientNet-family blocks in execution order, as ``"blocks.<stage>.<index>"``."""
    seen: dict[tuple[int, int], None] = {}
    for k in model.state_dict():
        m = re.match(r"blocks\.(\d+)\.(\d+)\.", k)
        if m:
            seen.setdefault((int(m.group(1)), int(m.group(2))), None)
    return [f"blocks.{s}.{b}" for s, b in sorted(seen)]


_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def rename_bn(src: str, dst: str, raw: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """Copy the BatchNorm (or conv, when only ``weight``/``bias`` exist) tensors under prefix ``src`` to ``dst``."""
    for suf in _BN_SUFFIXES:
        k = f"{src}.{suf}"
        if k in raw:
            out[f"{dst}.{suf}"] = raw[k]


def check_all_used(raw: dict[str, torch.Tensor], out: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`CheckpointError` when the conversion dropped or invented tensors (a mapping bug or a wrong file)."""
    n_raw = sum(1 for _ in raw)
    if len(out) != n_raw:
        used = {id(v) for v in out.values()}
        unused = [k for k, v in raw.items() if id(v) not in used]
        raise CheckpointError(
            f"{what}: converted {len(out)} of {n_raw} tensors; not mapped: {unused[:8]}"
        )
