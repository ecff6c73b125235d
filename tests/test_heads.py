"""The grid trainers: the concept head of docs/spec.md §1.3 and agreement of every backend with the oracle."""
import numpy as np
import pytest
import torch

from iis_fast.config import DEFAULT_SPARSITIES, kept_count
from iis_fast.backends.torch import GridParams, grid_logits, train_grid_torch
from iis_fast.backends.common import GridSpec, init_linear, sparse_mask
from iis_fast.backends.reference import ConceptHead, make_probe, train_grid_reference
from iis_fast.result import iis_from_curve


def test_masks_keep_spec_counts_for_m200():
    z = torch.randn(64, 200, generator=torch.Generator().manual_seed(0))
    counts = [int(sparse_mask(z, int(200 * s)).sum(1).unique().item()) for s in DEFAULT_SPARSITIES]
    assert counts == [199, 179, 139, 99, 59, 19, 9, 3]
    assert [kept_count(200, s) for s in DEFAULT_SPARSITIES] == counts


def test_mask_drops_every_entry_tied_at_threshold():
    z = torch.tensor([[0.5, -0.5, 0.5, 2.0, -3.0, 0.1]])
    # k=1: the 2nd smallest |z| is 0.5; all three 0.5 entries are dropped (strictly greater is kept)
    assert sparse_mask(z, 1).tolist() == [[False, False, False, True, True, False]]


def test_kept_values_are_not_shrunk_and_gradients_only_through_kept():
    torch.manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(10, 6), dim=1)
    head = ConceptHead(c, 3, k=7, seed=0, uid=1)
    x = torch.randn(4, 6)
    z = head.norm(x @ c.T)
    mask = sparse_mask(z, 7)
    expected = (z * mask) @ head.fc.weight.T + head.fc.bias
    torch.testing.assert_close(head(x), expected)
    head(x).sum().backward()
    # d logits / d beta is nonzero only on concepts kept in at least one row
    kept_any = mask.any(0)
    assert (head.norm.bias.grad[~kept_any] == 0).all() and (head.norm.bias.grad[kept_any] != 0).all()


def test_init_is_trunc_normal_002_and_shared_across_backends():
    w, b = init_linear(200, 1000, seed=3, uid=2)
    assert abs(w.std().item() - 0.02) < 0.001 and (b == 0).all() and w.abs().max() <= 2.0
    torch.testing.assert_close(make_probe(200, 1000, seed=3).weight.detach(), init_linear(200, 1000, 3, 0)[0])


def test_batched_logits_equal_one_head_modules():
    torch.manual_seed(1)
    d, m, k = 16, 20, 4
    spec = GridSpec(num_classes=k, sparsities=(0.0, 0.5, 0.9), lrs=(1e-3, 1e-2))
    c = torch.nn.functional.normalize(torch.randn(m, d), dim=1)
    p = GridParams(d, m, spec)
    with torch.no_grad():   # make the heads differ from their init
        p.gamma.uniform_(0.5, 1.5)
        p.beta.normal_(0, 0.1)
    x = torch.randn(9, d)
    lp, lh = grid_logits(x, c, p.tensors(), p.kidx)
    for si, kk in enumerate(spec.ks(m)):
        for li in range(2):
            h = si * 2 + li
            mod = ConceptHead(c, k, kk, spec.seed, 1 + si)
            with torch.no_grad():
                mod.norm.weight.copy_(p.gamma[h]); mod.norm.bias.copy_(p.beta[h])
                mod.fc.weight.copy_(p.w[h].T); mod.fc.bias.copy_(p.b[h])
            torch.testing.assert_close(lh[h], mod(x), atol=1e-5, rtol=1e-5)
    probe = make_probe(d, k, spec.seed)
    torch.testing.assert_close(lp[0], probe(x), atol=1e-5, rtol=1e-5)


def test_iis_trapezoid_known_values():
    grid = list(DEFAULT_SPARSITIES)
    assert iis_from_curve(grid, [1.0] * 8) == pytest.approx(0.98)
    # linear ARR 1 - s integrates to s - s^2/2 over [0, 0.98] exactly under the trapezoid rule
    assert iis_from_curve(grid, [1 - s for s in grid]) == pytest.approx(0.98 - 0.98 ** 2 / 2)
    # order of the grid does not matter; values above 1 are not clipped
    assert iis_from_curve(grid[::-1], [1.2] * 8) == pytest.approx(1.2 * 0.98)


def test_torch_backend_equals_reference_on_real_features(real_features):
    """Same init, batch order and Adam: per-epoch accuracies of all 27 heads agree (tolerance: 1 sample)."""
    tx, ty, ex, ey, c = real_features
    spec = GridSpec(num_classes=10, sparsities=DEFAULT_SPARSITIES, lrs=(1e-3, 1e-2, 1e-1), epochs=4, batch_size=256)
    ref = train_grid_reference(tx, ty, [(ex, ey)], c, spec)
    fast = train_grid_torch(tx, ty, [(ex, ey)], c, spec)
    one_sample = 1.0 / len(ey) + 1e-9
    assert np.abs(ref.probe_acc - fast.probe_acc).max() <= one_sample
    assert np.abs(ref.head_acc - fast.head_acc).max() <= one_sample
    assert ref.probe_acc[0, :, -1].max() > 0.6        # a real representation: far above 10% chance
