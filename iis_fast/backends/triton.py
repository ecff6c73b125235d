"""`backend="triton"`: the grid's hot loop in fused Triton kernels (see docs/kernels_triton.md).

Same semantics as the torch path (:func:`iis_fast.backends.torch.train_grid_torch`): the same `GridParams`
initialisation, batch order (`train_epochs`), per-head Adam and lr schedule, so the two agree to float tolerance.
Per step:
  probes  : logits = baddbmm(bp, x, wp) (cuBLAS) -> fused CE fwd+bwd in place (kernels.cross_entropy)
            -> dwp = xᵀ·dlogits, dbp = Σ dlogits (cuBLAS / torch)
  heads   : â = LayerNorm(x·Cᵀ) (kernels.projection) -> every head's affine, exact threshold, mask, GEMM and CE
            (kernels.sparse_head forward) -> dγ, dβ, dW, db (kernels.sparse_head backward)
  update  : one Adam launch over all parameters with a learning rate per head (kernels.adam)
and per epoch the evaluation of every head (argmax accuracy) with the same projection and head kernels.

Availability: a CUDA device with triton importable. The kernels also run under TRITON_INTERPRET=1 on CPU
tensors (that is how CI tests them); the registry never offers that slow path to "auto".
"""
from __future__ import annotations

import importlib.util
import time

import numpy as np
import torch

from ..errors import BackendUnavailable
from .torch import GridParams, finish_snapshot
from .common import ADAM_BETAS, ADAM_EPS, BestSnapshot, GridOutput, GridSpec, train_epochs
from . import _load_builtin, register_backend

EVAL_CHUNK = 4096


def triton_available(device) -> tuple[bool, str]:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        return False, f"unknown device {device!r}: {e}"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if dev.type != "cuda":
        return False, "triton needs a CUDA device"
    if not torch.cuda.is_available():
        return False, "CUDA is not available in this torch build or machine"
    return True, ""


def _kernels():
    """Import the kernels only when they are used: triton decides compile vs interpret at definition time."""
    from iis_fast.kernels import adam, cross_entropy, projection, sparse_head
    return adam, cross_entropy, projection, sparse_head


class _FlatGrid:
    """GridParams whose tensors, gradients and Adam moments are views of one flat buffer each (one Adam launch)."""

    NAMES = ("wp", "bp", "w", "b", "gamma", "beta")

    def __init__(self, params: GridParams, flat_adam_cls):
        tensors = params.tensors()
        n_lr, n_h = params.wp.shape[0], params.w.shape[0]
        groups = {"wp": 0, "bp": 0, "w": 1, "b": 1, "gamma": 1, "beta": 1}
        self.opt = flat_adam_cls({n: tuple(tensors[n].shape) for n in self.NAMES}, groups, [n_lr, n_h],
                                 params.wp.device, betas=ADAM_BETAS, eps=ADAM_EPS)
        for n in self.NAMES:
            view = self.opt.view(self.opt.p, n)
            view.copy_(tensors[n])
            setattr(params, n, view)
        params.moments = {n: (self.opt.view(self.opt.m, n), self.opt.view(self.opt.v, n)) for n in self.NAMES}
        self.grads = {n: self.opt.view(self.opt.g, n) for n in self.NAMES}
        self.lrs = torch.cat([params.lr_probe, params.lr_head])      # float64, probes first (group 0)
        self.params = params


def _interpreting() -> bool:
    from iis_fast.kernels._common import interpreted
    return interpreted(_kernels()[2]._projection_ln_kernel)


@torch.no_grad()
def grid_accuracy_triton(x, y, concepts, params: GridParams, chunk: int = EVAL_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 accuracy of every probe [L] and concept head [H] on (x, y), heads through the fused eval kernel."""
    _, _, projection, sparse_head = _kernels()
    device = params.w.device
    correct_p = torch.zeros(params.wp.shape[0], dtype=torch.long, device=device)
    correct_h = torch.zeros(params.w.shape[0], dtype=torch.int32, device=device)
    n_lr = params.wp.shape[0]
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk].to(device)
        yb = y[i:i + chunk].to(device)
        lp = torch.baddbmm(params.bp[:, None, :], xb.float().expand(n_lr, *xb.shape), params.wp)
        correct_p += (lp.argmax(-1) == yb).sum(-1)
        ahat, _, _ = projection.projection_layernorm(xb, concepts)
        sparse_head.head_eval_correct(ahat, params.gamma, params.beta, params.w, params.b, params.kidx, yb,
                                      correct_h)
    return correct_p.cpu().numpy() / len(x), correct_h.cpu().numpy().astype(np.int64) / len(x)


def train_grid_triton(x: torch.Tensor, y: torch.Tensor, eval_sets: list[tuple[torch.Tensor, torch.Tensor]],
                      concepts: torch.Tensor, spec: GridSpec, progress=None) -> GridOutput:
    """Train every probe and concept head of the grid with the fused kernels (x: fp32, fp16 or bf16). One grid per
    call: the registry runs repeats (``spec.seeds``) as one call per seed, since the head kernels take one shared
    projection per batch and repeats see different batches."""
    device = x.device
    if device.type != "cuda" and not _interpreting():
        raise BackendUnavailable("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 for tests)")
    adam, cross_entropy, projection, sparse_head = _kernels()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_start = time.perf_counter()
    concepts = concepts.float().to(device).contiguous()
    y = y.to(device)
    n_s, n_lr = len(spec.sparsities), len(spec.lrs)
    n_h = n_s * n_lr
    params = GridParams(x.shape[1], concepts.shape[0], spec, device)
    flat = _FlatGrid(params, adam.FlatAdam)
    g = flat.grads
    scales = {}

    def step(idx: torch.Tensor, lr_scale: float) -> None:
        xb, yb = x[idx], y[idx]
        b = len(idx)
        xf = xb.float()
        # standard probes: cuBLAS GEMMs around the fused cross-entropy
        lp = torch.baddbmm(params.bp[:, None, :], xf.expand(n_lr, b, xf.shape[1]), params.wp)
        cross_entropy.cross_entropy_fwd_bwd_(lp, yb, 1.0 / b)
        torch.bmm(xf.t().expand(n_lr, xf.shape[1], b), lp, out=g["wp"])
        torch.sum(lp, dim=1, out=g["bp"])
        # concept heads: shared projection, then every head forward and backward
        ahat, _, _ = projection.projection_layernorm(xb, concepts)
        _, lse, thr = sparse_head.head_forward(ahat, params.gamma, params.beta, params.w, params.b, params.kidx, yb)
        if b not in scales:
            scales[b] = torch.full((n_h,), 1.0 / b, device=device)
        g["gamma"].zero_()
        g["beta"].zero_()
        sparse_head.head_backward(ahat, params.gamma, params.beta, params.w, params.b, yb, thr, lse, scales[b],
                                  g["gamma"], g["beta"], g["w"], g["b"])
        flat.opt.update(flat.lrs, lr_scale)

    def evaluate(j: int):
        ex, ey = eval_sets[j]
        return grid_accuracy_triton(ex, ey, concepts, params)

    snapshot = BestSnapshot(params.tensors)
    probe_acc, head_acc, timings = train_epochs(len(x), spec, len(eval_sets), step, evaluate, progress=progress,
                                                prepare_order=lambda o: o.to(device), sync=sync, snapshot=snapshot)
    out = finish_snapshot(GridOutput(probe_acc, head_acc, backend="triton", timings=timings), snapshot,
                          params.kidx, concepts, eval_sets[-1], spec)
    timings["total"] = time.perf_counter() - t_start
    return out


# Load the built-in backends first: _load_builtin() runs once per process, so a
# direct `import iis_fast.backends.triton` registering "triton" alone would hide "torch" and "reference".
_load_builtin()
register_backend("triton", train_grid_triton, triton_available, rank=5)
