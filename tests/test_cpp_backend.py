"""The fused C++ backend (iis_fast._C, csrc/) against the torch path and the one-head-at-a-time reference.

Tolerances (float32, different summation orders):
* per step, from identical parameters and identical ahat: logits and every gradient within 1e-4 of the largest
  value of that array (relative to its max-abs), kept counts exactly equal;
* parameters after an Adam step: within 2e-4 absolute for all but 0.01% of entries, and every entry within
  2 x the largest lr: where a gradient is ~1e-8 (float noise around 0), Adam's g/(|g|+eps) turns a rounding
  difference into a visible step (seen: 1 entry of 177,600);
* full grid vs reference: every per-epoch accuracy of every head within 2 eval samples (argmax flips and
  near-ties at the threshold), and IIS within 0.005.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from iis_fast.config import DEFAULT_SPARSITIES
from iis_fast.errors import IISInputError
from iis_fast.backends.torch import GridParams, normalized_projection, stacked_cross_entropy, train_grid_torch
from iis_fast.backends.common import GridSpec, best_epoch_choice, sparse_mask
from iis_fast.backends.reference import train_grid_reference
from iis_fast.backends import available_backends, resolve_backend

cb = pytest.importorskip("iis_fast.backends.cpp")
if cb._C is None:
    pytest.skip(f"C++ extension not built: {cb._IMPORT_ERROR}", allow_module_level=True)

LRS = (1e-3, 1e-2, 1e-1)


def _spec(k, **kw):
    return GridSpec(num_classes=k, sparsities=DEFAULT_SPARSITIES, lrs=LRS, **kw)


def _torch_step(params: dict, ahat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, kidx: torch.Tensor):
    """Logits and grads of every head from the given parameters (GridParams layout) and a given ahat batch."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in params.items()}
    lp = torch.baddbmm(leaves["bp"][:, None, :], x.expand(leaves["wp"].shape[0], *x.shape), leaves["wp"])
    z = ahat[None] * leaves["gamma"][:, None, :] + leaves["beta"][:, None, :]
    mask = torch.stack([sparse_mask(z[h].detach(), int(k)) for h, k in enumerate(kidx)])
    lh = torch.baddbmm(leaves["b"][:, None, :], z * mask, leaves["w"])
    loss = stacked_cross_entropy(lp, y) + stacked_cross_entropy(lh, y)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    return lp.detach(), lh.detach(), grads, mask.sum(-1)


def _close(a, b, rel=1e-4, name=""):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.abs(b).max(), 1e-12)
    err = np.abs(a - b).max() / scale
    assert err <= rel, f"{name}: max |diff| / max |ref| = {err:.2e} > {rel:.0e}"


def _grid_against_torch(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor, k: int, mode: int, steps: int = 3,
                        batch: int = 96, seed: int = 0):
    spec = _spec(k)
    n, d = x.shape
    p = GridParams(d, c.shape[0], spec)
    g = cb.CppGrid(d, c.shape[0], spec, p)
    g.grid.mode = mode
    g.grid.row_block = 40                      # several row blocks per batch, and a partial one
    ahat_t = normalized_projection(x, c)
    xs, ys, ahat = x.numpy(), y.numpy().astype(np.int64), np.ascontiguousarray(ahat_t.numpy())
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randperm(n, generator=gen)[:batch]
        lp, lh, grads, kept = _torch_step(p.tensors(), ahat_t[idx], x[idx], y[idx], p.kidx)
        out = cb.grid_step(g, xs, ahat, ys, idx.numpy(), lr_scale=0.99 ** step)
        assert np.array_equal(out["kept"], kept.numpy())
        _close(out["probe_logits"], lp, name="probe logits")
        _close(out["head_logits"], lh, name="head logits")
        for cname, tname in [("dwp", "wp"), ("dbp", "bp"), ("dw", "w"), ("db", "b"), ("dgamma", "gamma"),
                             ("dbeta", "beta")]:
            _close(out[cname], grads[tname], name=f"step {step} grad {tname}")
        p.adam_step(grads, 0.99 ** step)
        for name, t in g.tensors().items():
            diff = np.abs(t.numpy() - p.tensors()[name].numpy())
            assert (diff > 2e-4).mean() <= 1e-4, f"step {step} param {name}: {(diff > 2e-4).sum()} entries off"
            assert diff.max() <= 2 * max(LRS), f"step {step} param {name}: max diff {diff.max()}"
        # continue both from the C++ parameters so that the next step compares gradients, not drift
        for name, t in g.tensors().items():
            p.tensors()[name].copy_(t)
    assert g.grid.t == p.step == steps


@pytest.mark.parametrize("mode", [-1, 0, 1], ids=["auto", "all-sparse", "all-dense"])
@pytest.mark.parametrize("k", [3, 37])
def test_step_matches_torch_random_features(mode, k):
    torch.manual_seed(k)
    x, c = torch.randn(300, 24), torch.randn(200, 24)
    y = torch.randint(0, k, (300,))
    _grid_against_torch(x, y, c, k, mode)


@pytest.mark.parametrize("k,m", [(2, 45), (8, 200), (9, 61), (16, 200), (1, 2), (3, 7), (12, 2)])
@pytest.mark.parametrize("narrow", [True, False], ids=["narrow", "general"])
def test_step_matches_torch_narrow_and_general_kernels(k, m, narrow):
    """K <= 16 takes the register-resident kernels of csrc/narrow.h (M not a multiple of 8 included); the
    general GEMM/CSR path must give the same steps when switched on instead."""
    torch.manual_seed(100 + k + m)
    x, c = torch.randn(250, 20), torch.randn(m, 20)
    y = torch.randint(0, k, (250,))
    spec = _spec(k)
    p = GridParams(20, m, spec)
    g = cb.CppGrid(20, m, spec, p)
    g.grid.narrow = narrow
    ahat_t = normalized_projection(x, c)
    ahat = np.ascontiguousarray(ahat_t.numpy())
    idx = torch.randperm(250)[:200]
    lp, lh, grads, kept = _torch_step(p.tensors(), ahat_t[idx], x[idx], y[idx], p.kidx)
    out = cb.grid_step(g, x.numpy(), ahat, y.numpy().astype(np.int64), idx.numpy())
    assert np.array_equal(out["kept"], kept.numpy())
    _close(out["head_logits"], lh, name="head logits")
    for cname, tname in [("dw", "w"), ("db", "b"), ("dgamma", "gamma"), ("dbeta", "beta"), ("dwp", "wp")]:
        _close(out[cname], grads[tname], name=f"grad {tname}")
    acc_p, acc_h = g.evaluate(x.numpy(), ahat, y.numpy().astype(np.int64))
    g.grid.narrow = not narrow
    acc_p2, acc_h2 = g.evaluate(x.numpy(), ahat, y.numpy().astype(np.int64))
    assert np.array_equal(acc_p, acc_p2)
    assert np.abs(acc_h - acc_h2).max() <= 1.0 / 250 + 1e-12       # a rare argmax flip from summation order


def test_selection_window_misses_fall_back_exactly():
    """Row scales jumping by 100x defeat the one-pass window around the previous row's threshold (and ties are
    frequent): the kept sets must still be exactly |z| > the (k+1)-th smallest |z|, for every sparsity."""
    spec = _spec(5)
    d, m, b = 8, 200, 120
    p = GridParams(d, m, spec)
    g = cb.CppGrid(d, m, spec, p)
    rng = np.random.default_rng(3)
    ahat = rng.standard_normal((b, m)) * (10.0 ** (np.arange(b) % 5 - 2))[:, None]
    ahat[::7] = np.round(ahat[::7])                                   # heavy ties on some rows
    ahat = ahat.astype(np.float32)
    out = cb.grid_step(g, rng.standard_normal((b, d)).astype(np.float32), ahat,
                       rng.integers(0, 5, b).astype(np.int64), np.arange(b))
    kept = out["kept"].reshape(len(spec.sparsities), len(LRS), b)
    az = np.abs(ahat)
    for si, k in enumerate(spec.ks(m)):
        thr = np.sort(az, 1)[:, k]
        assert np.array_equal(kept[si, 0], (az > thr[:, None]).sum(1)), f"s={spec.sparsities[si]}"


def _fmnist(n_train=400, n_eval=200):
    try:
        from iis_fast.data.fashion_mnist import load_fashion_mnist
        images, labels = load_fashion_mnist("test")
    except Exception as e:  # pragma: no cover - data package not installed
        pytest.skip(f"Fashion-MNIST not available: {e}")
    x = torch.from_numpy(images[: n_train + n_eval + 200].reshape(-1, 784).copy()).float().div(255)
    y = torch.from_numpy(labels[: n_train + n_eval + 200].astype(np.int64))
    c = torch.nn.functional.normalize(x[n_train + n_eval:], dim=1)          # 200 prototype concepts
    return x[:n_train], y[:n_train], x[n_train:n_train + n_eval], y[n_train:n_train + n_eval], c


@pytest.mark.parametrize("mode", [-1, 0, 1], ids=["auto", "all-sparse", "all-dense"])
def test_step_matches_torch_real_pixels(mode):
    """Fashion-MNIST pixels (D=784, many exact zeros and repeated values) with prototype concepts."""
    x, y, _, _, c = _fmnist()
    _grid_against_torch(x, y, c, 10, mode, steps=3, batch=128)


def test_projection_matches_torch():
    x, c = _fmnist()[0], _fmnist()[4]
    ref = normalized_projection(x, c).numpy()
    got = cb.project(x.numpy(), c.numpy())
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)


def test_selection_is_exact_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 260))
        a = rng.standard_normal((4, n)).astype(np.float32)
        if trial % 3 == 0:
            a = np.round(a * 2).astype(np.float32)                 # heavy ties, zeros, signs
        if trial % 7 == 0:
            a[:] = -0.25                                            # all tied
        for r in {1, 2, n // 2 + 1, n - 1, n}:
            if 1 <= r <= n:
                assert np.array_equal(cb._C.kth_rows(a, r), np.sort(np.abs(a), 1)[:, r - 1])


def test_kept_counts_m200_and_ties_drop_every_tied_entry():
    spec = _spec(4)
    d, m, b = 16, 200, 64
    p = GridParams(d, m, spec)
    g = cb.CppGrid(d, m, spec, p)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, d)).astype(np.float32)
    y = rng.integers(0, 4, b).astype(np.int64)
    ahat = rng.standard_normal((b, m)).astype(np.float32)
    ahat[b // 2:] = np.round(ahat[b // 2:] * 3) / 3                 # half the rows: many ties at the threshold
    ahat[-1] = 0.5                                                  # a constant row: every entry tied
    ahat[-2, :150] = -1.0                                           # 150 tied magnitudes
    ahat = ahat.astype(np.float32)
    out = cb.grid_step(g, x, ahat, y, np.arange(b))
    kept = out["kept"].reshape(len(spec.sparsities), len(LRS), b)
    assert (kept[:, :, : b // 2] == np.array([199, 179, 139, 99, 59, 19, 9, 3])[:, None, None]).all()
    # at init gamma=1, beta=0: z = ahat; expected kept = #{|z| > (k+1)-th smallest |z|}
    az = np.abs(ahat)
    for si, k in enumerate(spec.ks(m)):
        thr = np.sort(az, 1)[:, k]
        assert np.array_equal(kept[si, 0], (az > thr[:, None]).sum(1))
    assert (kept[:, :, -1] == 0).all()                              # all tied: nothing survives
    _, lh, _, kept_t = _torch_step(p.tensors(), torch.from_numpy(ahat), torch.from_numpy(x), torch.from_numpy(y),
                                   p.kidx)
    assert np.array_equal(out["kept"], kept_t.numpy())
    _close(out["head_logits"], lh, name="head logits with ties")


def _iis(out):
    from iis_fast.score import iis_from_curve
    _, acc_std = best_epoch_choice(out.probe_acc[0])
    _, acc_s = best_epoch_choice(out.head_acc[0])
    return iis_from_curve(DEFAULT_SPARSITIES, list(acc_s.max(-1) / acc_std.max()))


def test_full_grid_matches_reference_and_torch():
    """27 heads, 3 epochs on Fashion-MNIST pixels: accuracies per head and epoch as the reference's."""
    x, y, ex, ey, c = _fmnist(n_train=360, n_eval=200)
    spec = _spec(10, epochs=3, batch_size=128)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # tiny ops: one thread is faster, and immune to a busy machine's barriers
    try:
        ref = train_grid_reference(x, y, [(ex, ey)], c, spec)
        fast = train_grid_torch(x, y, [(ex, ey)], c, spec)
    finally:
        torch.set_num_threads(threads)
    got = cb.train_grid_cpp(x, y, [(ex, ey)], c, spec)
    tol = 2.0 / len(ey) + 1e-9
    print("max |cpp - reference| probe/heads:", np.abs(got.probe_acc - ref.probe_acc).max(),
          np.abs(got.head_acc - ref.head_acc).max(), "IIS", _iis(got), _iis(ref))
    for other in (ref, fast):
        assert np.abs(got.probe_acc - other.probe_acc).max() <= tol
        assert np.abs(got.head_acc - other.head_acc).max() <= tol
    assert abs(_iis(got) - _iis(ref)) <= 0.005
    assert got.probe_acc[0, :, -1].max() > 0.6
    assert got.backend == "cpp" and got.timings["train"] > 0


def test_registry_auto_picks_cpp_on_cpu():
    assert available_backends("cpu")["cpp"] == ""
    assert resolve_backend("cpp", "cpu").name == "cpp"
    assert resolve_backend("auto", "cpu").rank <= resolve_backend("cpp", "cpu").rank
    ok, why = cb.available("cuda")
    assert not ok and "CPU" in why


def test_bad_input_raises_clear_errors():
    spec = _spec(3)
    d, m, n = 8, 20, 30
    g = cb.CppGrid(d, m, spec)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    ahat = rng.standard_normal((n, m)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int64)
    idx = np.arange(10, dtype=np.int64)
    step = g.grid.step
    with pytest.raises(ValueError, match="x: expected dtype float32"):
        step(x.astype(np.float64), ahat, y, idx, 1.0)
    with pytest.raises(ValueError, match="x: dim 1"):
        step(x[:, :5].copy(), ahat, y, idx, 1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        step(np.asfortranarray(x), ahat, y, idx, 1.0)
    with pytest.raises(ValueError, match="ahat: dim 0"):
        step(x, ahat[:5].copy(), y, idx, 1.0)
    with pytest.raises(ValueError, match="y: expected dtype int64"):
        step(x, ahat, y.astype(np.int32), idx, 1.0)
    with pytest.raises(ValueError, match="out of range"):
        step(x, ahat, y, np.array([0, n], dtype=np.int64), 1.0)
    with pytest.raises(ValueError, match="label out of range"):
        step(x, ahat, np.full(n, 3, dtype=np.int64), idx, 1.0)
    with pytest.raises(ValueError, match="empty batch"):
        step(x, ahat, y, idx[:0], 1.0)
    with pytest.raises(ValueError, match="2 dims"):
        g.grid.evaluate(x[0].copy(), ahat, y)
    with pytest.raises(ValueError):
        cb._C.project(x, np.ones((m, d + 1), np.float32), np.empty((n, m), np.float32))
    with pytest.raises(ValueError, match="r must be"):
        cb._C.kth_rows(ahat, 0)
    assert g.grid.t == 0                                            # nothing ran
    tx, ty, tc = torch.from_numpy(x), torch.from_numpy(y), torch.randn(m, d)
    with pytest.raises(IISInputError, match="NaN"):
        cb.train_grid_cpp(torch.full((n, d), float("nan")), ty, [(tx, ty)], tc, spec)
    with pytest.raises(IISInputError, match="labels must lie"):
        cb.train_grid_cpp(tx, ty + 5, [(tx, ty)], tc, spec)
    with pytest.raises(IISInputError, match="features per row"):
        cb.train_grid_cpp(tx, ty, [(tx[:, :4], ty)], tc, spec)
    with pytest.raises(IISInputError, match="integer labels"):
        cb.train_grid_cpp(tx, ty.float(), [(tx, ty)], tc, spec)


def test_cpu_level_dispatch_and_scalar_fallback_agree():
    """The baseline build (what a CPU without AVX2 runs) is picked when forced, and trains the same grid as the
    vectorised build: every per-epoch accuracy within 2 eval samples, IIS within 0.005."""
    import json
    import subprocess
    import sys

    from iis_fast.backends import cpu_level
    assert cpu_level.supported_levels()[-1] == "base" and cb.CPU_LEVEL in cpu_level.supported_levels()
    code = """
import json, sys, torch
torch.manual_seed(0)
from iis_fast.backends import cpp as cb
from iis_fast.backends.common import GridSpec
g = torch.Generator().manual_seed(1)
x = torch.randn(600, 48, generator=g); y = torch.randint(0, 5, (600,), generator=g)
x[torch.arange(600), y] += 2.0
c = torch.nn.functional.normalize(torch.randn(40, 48, generator=g), dim=1)
spec = GridSpec(num_classes=5, sparsities=(0.0, 0.5, 0.9), lrs=(1e-2, 1e-1), epochs=3, batch_size=128)
out = cb.train_grid_cpp(x[:400], y[:400], [(x[400:], y[400:])], c, spec)
print(json.dumps({"level": cb.CPU_LEVEL, "module": cb._C.__name__, "heads": out.head_acc.tolist(),
                  "probes": out.probe_acc.tolist()}))
"""
    runs = {}
    for level in ("base", cpu_level.supported_levels()[0]):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**__import__("os").environ, "IIS_FAST_CPU_LEVEL": level, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr
        runs[level] = json.loads(r.stdout.strip().splitlines()[-1])
        assert runs[level]["level"] == level and runs[level]["module"] == f"iis_fast._C_{level}"
    a, b = runs.values()
    assert np.abs(np.array(a["heads"]) - np.array(b["heads"])).max() <= 2 / 200 + 1e-9
    assert np.abs(np.array(a["probes"]) - np.array(b["probes"])).max() <= 2 / 200 + 1e-9
    with pytest.raises(ValueError, match="IIS_FAST_CPU_LEVEL='sse9'"):
        import os
        os.environ["IIS_FAST_CPU_LEVEL"] = "sse9"
        try:
            cpu_level.load_extension()
        finally:
            del os.environ["IIS_FAST_CPU_LEVEL"]
