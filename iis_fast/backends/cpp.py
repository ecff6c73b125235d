"""`backend="cpp"`: the whole grid trained by the fused C++ kernels (csrc/, built per CPU level; see cpu_level.py).

Same semantics as :func:`iis_fast.backends.torch.train_grid_torch` — same initial parameters (built by
:class:`GridParams`), same batch order (:func:`~iis_fast.backends.common.train_epochs`), same Adam arithmetic and lr schedule — so the
accuracies match up to float rounding (a different summation order can flip a rare argmax or a rare near-tie at
the threshold). Differences in *how*:

* ahat = LayerNorm(x·Cᵀ) does not depend on any trainable parameter, so it is computed once per split (train and
  every eval set) instead of once per batch;
* one C++ call per batch trains every probe (one GEMM for all lrs) and every concept head (one thread per head:
  affine, per-row threshold by selection, mask, dense GEMM or sparse gather of W's rows by k, softmax-CE,
  backward, Adam) without leaving intermediates outside per-thread scratch;
* one C++ call per eval set and epoch gives the correct counts of every head.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..errors import IISInputError
from ..validation import label_array
from .torch import GridParams, finish_snapshot
from .common import BestSnapshot, GridOutput, GridSpec, train_epochs
from . import register_backend

from .cpu_level import load_extension

#: The kernel build for this CPU (None if not built), its level ("avx2" or "base"), and why it is missing.
_C, CPU_LEVEL, _IMPORT_ERROR = load_extension()


def available(device: str = "cpu") -> tuple[bool, str]:
    if _C is None:
        return False, _IMPORT_ERROR
    if not str(device).startswith("cpu"):
        return False, "the cpp backend runs on the CPU only"
    return True, ""


def _features(x, name: str, dim: int | None = None) -> np.ndarray:
    """A C-contiguous float32 numpy view (zero-copy for a contiguous float32 CPU tensor) of a 2-D feature matrix."""
    if isinstance(x, torch.Tensor):
        if x.is_cuda:
            raise IISInputError(f"{name}: the cpp backend needs CPU tensors, got one on {x.device}")
        x = x.detach()
        if not x.is_floating_point():
            raise IISInputError(f"{name}: expected floating-point features, got dtype {x.dtype}")
        x = x.float().contiguous().numpy()
    else:
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise IISInputError(f"{name}: expected floating-point features, got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise IISInputError(f"{name}: expected a 2-D [N, D] array, got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise IISInputError(f"{name}: expected {dim} features per row, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise IISInputError(f"{name}: no rows")
    if not np.isfinite(x).all():
        raise IISInputError(f"{name}: contains NaN or inf")
    return x


def _labels(y, n: int, num_classes: int, name: str) -> np.ndarray:
    """Contiguous int64 labels for the kernels, by the package's one label rule (no float labels here)."""
    return np.ascontiguousarray(label_array(y, name, n=n, num_classes=num_classes, integral_floats=False))


def project(x: np.ndarray, concepts: np.ndarray) -> np.ndarray:
    """ahat = LayerNorm(x·Cᵀ) (no affine), [N, M] float32: what every concept head shares."""
    out = np.empty((x.shape[0], concepts.shape[0]), dtype=np.float32)
    _C.project(x, concepts, out)
    return out


class CppGrid:
    """All parameters and Adam moments of a grid as numpy arrays updated in place by :class:`iis_fast._C.Grid`.

    Layouts follow :class:`GridParams` except the probes: wp is stored [D, L*K] (probe l in columns l*K..) so
    that one GEMM serves every lr.
    """

    NAMES = ("wp", "bp", "w", "b", "gamma", "beta")

    def __init__(self, in_dim: int, num_concepts: int, spec: GridSpec, params: GridParams | None = None):
        if _C is None:
            raise RuntimeError(_IMPORT_ERROR)
        p = params if params is not None else GridParams(in_dim, num_concepts, spec, "cpu")
        self.spec = spec
        self.L, self.D, self.K = p.wp.shape
        self.params = {n: self._to_c(n, t) for n, t in p.tensors().items()}
        self.moments = {}
        for n, (m, v) in p.moments.items():
            self.moments["m_" + n] = self._to_c(n, m)
            self.moments["v_" + n] = self._to_c(n, v)
        ks = np.ascontiguousarray(p.kidx.cpu().numpy(), dtype=np.int64)
        self.grid_ks = ks
        self.grid = _C.Grid(self.params, self.moments, ks,
                            np.ascontiguousarray(p.lr_probe.numpy(), dtype=np.float64),
                            np.ascontiguousarray(p.lr_head.numpy(), dtype=np.float64))
        self.grid.t = p.step

    def _to_c(self, name: str, t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu().float()
        if name == "wp":
            t = t.permute(1, 0, 2).reshape(t.shape[1], -1)
        elif name == "bp":
            t = t.reshape(-1)
        return np.ascontiguousarray(t.numpy().copy())

    def _from_c(self, name: str, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a.copy())
        if name == "wp":
            t = t.reshape(self.D, self.L, self.K).permute(1, 0, 2).contiguous()
        elif name == "bp":
            t = t.reshape(self.L, self.K)
        return t

    def tensors(self) -> dict[str, torch.Tensor]:
        """The current parameters in :class:`GridParams` layout (copies)."""
        return {n: self._from_c(n, self.params[n]) for n in self.NAMES}

    def step(self, x: np.ndarray, ahat: np.ndarray, y: np.ndarray, idx: np.ndarray, lr_scale: float,
             debug: bool = False) -> dict | None:
        """One Adam step of every head on rows idx. With debug=True, returns the step's logits, gradients (before
        the update), losses and kept counts, with probe arrays in GridParams layout (dwp [L,D,K], ...)."""
        out = {} if debug else None
        self.grid.step(x, ahat, y, np.ascontiguousarray(idx, dtype=np.int64), float(lr_scale), out)
        if debug:
            nb, L, K, D = len(idx), self.L, self.K, self.D
            out["probe_logits"] = out["probe_logits"].reshape(nb, L, K).transpose(1, 0, 2)
            out["dwp"] = out["dwp"].reshape(D, L, K).transpose(1, 0, 2)
            out["dbp"] = out["dbp"].reshape(L, K)
        return out

    def evaluate(self, x: np.ndarray, ahat: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-1 accuracy of every probe [L] and concept head [H]."""
        cp, ch = self.grid.evaluate(x, ahat, y)
        return cp / len(y), ch / len(y)


def grid_step(grid: CppGrid, x, ahat, y, idx, lr_scale: float = 1.0) -> dict:
    """Step-level entry point for tests: one fused step, returning logits and gradients (see CppGrid.step)."""
    return grid.step(x, ahat, y, idx, lr_scale, debug=True)


def train_grid_cpp(x: torch.Tensor, y: torch.Tensor, eval_sets: list[tuple[torch.Tensor, torch.Tensor]],
                   concepts: torch.Tensor, spec: GridSpec, progress=None) -> GridOutput:
    """Train the whole grid with the fused C++ kernels (same result as backend='torch' up to float rounding)."""
    if spec.assignment is not None:
        return train_end2end_cpp(x, y, eval_sets, concepts, spec, progress)
    t0 = time.perf_counter()
    xs = _features(x, "x")
    n, d = xs.shape
    cs = _features(concepts, "concepts", d)
    ys = _labels(y, n, spec.num_classes, "y")
    evals = []
    for j, (ex, ey) in enumerate(eval_sets):
        exs = _features(ex, f"eval_sets[{j}] x", d)
        evals.append((exs, _labels(ey, len(exs), spec.num_classes, f"eval_sets[{j}] y")))
    t1 = time.perf_counter()
    ahat = project(xs, cs)
    ahat_e = [project(ex, cs) for ex, _ in evals]
    t2 = time.perf_counter()
    # Repeats: one C++ grid per seed, stepped in the same pass over batches and sharing the projections above
    # (they depend on no trainable parameter); each grid gets its own rows of the [R, B] batch.
    grids = [CppGrid(d, cs.shape[0], spec.single(seed)) for seed in spec.grid_seeds()]

    def step(idx: np.ndarray, lr_scale: float) -> None:
        if idx.ndim == 1:
            grids[0].grid.step(xs, ahat, ys, idx, lr_scale, None)
            return
        for g, rows in zip(grids, idx):
            g.grid.step(xs, ahat, ys, np.ascontiguousarray(rows), lr_scale, None)

    def evaluate(j: int):
        (ex, ey), ae = evals[j], ahat_e[j]
        accs = [g.evaluate(ex, ae, ey) for g in grids]
        return np.concatenate([a for a, _ in accs]), np.concatenate([h for _, h in accs])

    def params() -> dict[str, torch.Tensor]:
        tensors = [g.tensors() for g in grids]
        return {n: torch.cat([t[n] for t in tensors]) for n in CppGrid.NAMES}

    snapshot = BestSnapshot(params)
    probe_acc, head_acc, timings = train_epochs(n, spec, len(evals), step, evaluate, progress=progress,
                                                prepare_order=lambda o: o.numpy(), snapshot=snapshot)
    t3 = time.perf_counter()
    kidx = torch.from_numpy(np.tile(grids[0].grid_ks, len(grids)))
    out = GridOutput(probe_acc, head_acc, backend="cpp", timings=timings)
    finish_snapshot(out, snapshot, kidx, torch.from_numpy(cs), (torch.from_numpy(evals[-1][0]),
                                                                torch.from_numpy(evals[-1][1])), spec)
    timings.update(prepare=t1 - t0, project=t2 - t1, bootstrap_eval=time.perf_counter() - t3,
                   total=time.perf_counter() - t0)
    return out


def train_end2end_cpp(x: torch.Tensor, y: torch.Tensor, eval_sets: list[tuple[torch.Tensor, torch.Tensor]],
                      elements: torch.Tensor, spec: GridSpec, progress=None) -> GridOutput:
    """The end2end grid (docs/spec.md §1.2): every head's C_h and its projection in torch, the probes and heads in
    the fused C++ step fed per-head projections, and the backward into q through torch's autograd from the
    kernel's d loss / d ahat.

    Per step and head: the segment sum C_h, ahat_h = LN(x_b·C_hᵀ) [nb, M] (torch), the head step (C++: affine,
    threshold, mask, GEMM, CE, backward, Adam, and d ahat_h), then autograd from ahat_h back to q_h, whose
    element-side product E·dPᵀ is one [E x D] x [D x H·M] GEMM for the whole grid; Adam on q, γ_q, β_q (torch).
    """
    from .end2end import (TRAIN_STREAM, AssignParams, evaluate_end2end, gumbel_noise, head_projection,
                                 train_concepts)
    t0 = time.perf_counter()
    a = spec.assignment
    xs = _features(x, "x")
    n, d = xs.shape
    es = torch.from_numpy(_features(elements, "elements", d))
    es = torch.nn.functional.normalize(es, dim=1)
    ys = _labels(y, n, spec.num_classes, "y")
    evals = []
    for j, (ex, ey) in enumerate(eval_sets):
        exs = _features(ex, f"eval_sets[{j}] x", d)
        evals.append((exs, _labels(ey, len(exs), spec.num_classes, f"eval_sets[{j}] y")))
    g = CppGrid(d, a.num_concepts, spec)
    assign = AssignParams(es.shape[0], spec)
    xt = torch.from_numpy(xs)
    e, m, h = es.shape[0], a.num_concepts, assign.q.shape[0]
    t_assign = [0.0, 0.0]   # seconds in the torch forward (C_h, projections) and backward into q

    def step(idx: np.ndarray, lr_scale: float) -> None:
        t1 = time.perf_counter()
        leaves = {k: v.detach().requires_grad_(True) for k, v in assign.tensors().items()}
        noise = gumbel_noise(e, m, spec.seed, TRAIN_STREAM, g.grid.t + 1)
        c = train_concepts(leaves["q"], leaves["gq"], leaves["bq"], es, noise, a.tau)
        ahat = head_projection(xt[torch.from_numpy(idx)], c)                          # [H, nb, M]
        ahat_np = np.ascontiguousarray(ahat.detach().numpy())
        dahat = np.empty_like(ahat_np)
        t2 = time.perf_counter()
        g.grid.step(xs, ahat_np, ys, idx, lr_scale, None, dahat)
        t3 = time.perf_counter()
        grads = torch.autograd.grad(ahat, list(leaves.values()), grad_outputs=torch.from_numpy(dahat))
        assign.adam_step(dict(zip(leaves, grads)), g.grid.t, lr_scale)
        t_assign[0] += t2 - t1
        t_assign[1] += time.perf_counter() - t3

    calls = [0] * len(evals)

    def counts(xb: torch.Tensor, yb: torch.Tensor, concepts: torch.Tensor):
        ahat = np.ascontiguousarray(head_projection(xb, concepts).numpy())
        cp, ch = g.grid.evaluate(xb.numpy(), ahat, yb.numpy())
        return cp, ch

    def evaluate(j: int):
        ex, ey = evals[j]
        calls[j] += 1
        return evaluate_end2end(torch.from_numpy(ex), torch.from_numpy(ey), es, assign, spec, j, calls[j] - 1,
                                counts, chunk=2048)

    probe_acc, head_acc, timings = train_epochs(n, spec, len(evals), step, evaluate, progress=progress,
                                                prepare_order=lambda o: o.numpy())
    timings.update(assign_forward=t_assign[0], assign_backward=t_assign[1], total=time.perf_counter() - t0,
                   heads=float(h), elements=float(e))
    return GridOutput(probe_acc, head_acc, backend="cpp", timings=timings)


register_backend("cpp", train_grid_cpp, available, rank=10, end2end=True, repeats=True)
