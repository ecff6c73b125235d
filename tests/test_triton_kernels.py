"""The Triton kernels (kernels/) against the torch path, run by the Triton interpreter on CPU tensors.

CI has no GPU: every kernel here is built with TRITON_INTERPRET=1 (triton decides compile vs interpret when a
kernel is *defined*, so the variable is set only around the import below and then restored: the rest of the
pytest session is unaffected). Shapes stay tiny because the interpreter runs numpy, one program at a time.
`FORCE_BLOCKS` shrinks the block sizes so that the interpreter also walks the chunk loops and partial blocks a
GPU launch would use. The tests marked `gpu` compile the real kernels in a fresh subprocess (no interpreter)
and are skipped without CUDA.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

# The interpreter works only if triton itself was first imported with TRITON_INTERPRET=1 (its own tl.* helpers
# are jit functions too). If something in this session imported triton before, the interpreter tests run in a
# fresh subprocess instead (test_interpreter_suite_in_subprocess).
IN_PROCESS = os.environ.get("TRITON_INTERPRET") == "1" or "triton" not in sys.modules
interp = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported before in compiled mode: "
                                                  "these run in test_interpreter_suite_in_subprocess")
if IN_PROCESS:
    _prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from iis_fast.kernels import _common, adam, cross_entropy, projection, sparse_head
        from iis_fast.backends.triton import _FlatGrid, train_grid_triton
    finally:                             # kernels built; the fixture below sets it again per test
        if _prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _prev

from iis_fast.config import DEFAULT_SPARSITIES                                    # noqa: E402
from iis_fast.backends.torch import (GridParams, grid_logits, normalized_projection,  # noqa: E402
                                    stacked_cross_entropy, train_grid_torch)
from iis_fast.backends.common import GridSpec, sparse_mask                             # noqa: E402
from iis_fast.backends import available_backends, resolve_backend                       # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    """Parts of triton look at TRITON_INTERPRET lazily (at the first launch): keep it on during these tests."""
    if IN_PROCESS:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 rows / 16 classes / 16 features: several programs, chunk loops and ragged edges."""
    monkeypatch.setitem(_common.FORCE_BLOCKS, "projection", (16, 16))
    monkeypatch.setitem(_common.FORCE_BLOCKS, "sparse_head", (16, 16))
    monkeypatch.setitem(_common.FORCE_BLOCKS, "cross_entropy", (16, 16))


def _grid(d=24, m=20, k=40, sparsities=(0.0, 0.5, 0.9), lrs=(1e-3, 1e-2), seed=0):
    """GridParams moved away from their init so that γ, β, b are not trivial."""
    spec = GridSpec(num_classes=k, sparsities=sparsities, lrs=lrs)
    p = GridParams(d, m, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p.gamma.copy_(torch.rand(p.gamma.shape, generator=g) + 0.5)
        p.beta.copy_(torch.randn(p.beta.shape, generator=g) * 0.2)
        p.w.copy_(torch.randn(p.w.shape, generator=g) * 0.3)
        p.b.copy_(torch.randn(p.b.shape, generator=g) * 0.1)
        p.wp.copy_(torch.randn(p.wp.shape, generator=g) * 0.3)
    return spec, p


def _data(b=50, d=24, m=20, k=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g) * 2 + 0.3
    c = F.normalize(torch.randn(m, d, generator=g), dim=1)
    y = torch.randint(0, k, (b,), generator=g)
    return x, c, y


# --- kernel (1): projection + LayerNorm statistics ---------------------------------------------------------------

@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_projection_layernorm_matches_torch(small_blocks, dtype):
    x, c, _ = _data(b=50, d=40, m=20)
    x = x.to(dtype)                      # reduced-precision storage, fp32 compute: compare on the stored values
    ahat, mean, rstd = projection.projection_layernorm(x, c)
    a = x.float() @ c.T
    var, mu = torch.var_mean(a, dim=-1, correction=0)
    torch.testing.assert_close(ahat, normalized_projection(x.float(), c), **TOL)
    torch.testing.assert_close(mean, mu, **TOL)
    torch.testing.assert_close(rstd, torch.rsqrt(var + 1e-5), **TOL)


# --- threshold and mask: exact, ties dropped ---------------------------------------------------------------------

def _kept(z: torch.Tensor, ks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's kept z per head (W = identity, so logits are the masked z) and its thresholds."""
    b, m = z.shape
    h = len(ks)
    gamma, beta = torch.ones(h, m), torch.zeros(h, m)
    w = torch.eye(m).expand(h, m, m).contiguous()
    bias = torch.zeros(h, m)
    kidx = torch.tensor(ks)
    return sparse_head.head_logits(z.contiguous(), gamma, beta, w, bias, kidx, return_threshold=True)


@interp
def test_threshold_and_kept_counts_m200_equal_spec():
    z = torch.randn(6, 200, generator=torch.Generator().manual_seed(0))
    ks = [int(200 * s) for s in DEFAULT_SPARSITIES]
    zm, thr = _kept(z, ks)
    counts = [sorted(set((zm[h] != 0).sum(1).tolist())) for h in range(len(ks))]
    assert counts == [[199], [179], [139], [99], [59], [19], [9], [3]]
    for h, k in enumerate(ks):
        assert torch.equal(zm[h] != 0, sparse_mask(z, k))
        assert torch.equal(zm[h], z * sparse_mask(z, k))                        # kept values are not shrunk
        assert torch.equal(thr[h], z.abs().kthvalue(k + 1, dim=1).values)       # the threshold itself, exactly


@interp
def test_ties_at_threshold_are_all_dropped():
    rows = torch.tensor([
        [0.5, -0.5, 0.5, 2.0, -3.0, 0.1, 0.7, -0.7, 0.7, 0.7, 1e-30, -2.0, 2.0, 0.0, 0.0, 5.0],
        [1.0] * 16,                                                              # all tied: nothing survives
        [0.0] * 8 + [-1.5] * 8,
        [3.0, -3.0] * 4 + [1e-38, -1e-38, 4e-45, -4e-45] * 2,                    # subnormals order like the rest
    ])
    ks = list(range(16))                                  # one head per k, all in one launch
    zm, thr = _kept(rows, ks)
    for k in ks:
        ref = sparse_mask(rows, k)
        assert torch.equal(zm[k] != 0, ref & (rows != 0)), k
        assert torch.equal(zm[k], rows * ref), k
        assert torch.equal(thr[k], rows.abs().kthvalue(k + 1, dim=1).values), k
    # row 0 sorted by |z|: 0, 0, 1e-30, 0.1, 0.5 x3, 0.7 x4, 2 x3, 3, 5. At k = 4, 5, 6 the threshold is 0.5 and all
    # three 0.5 entries go (9 kept); at k = 7..10 all four 0.7 go (5 kept); the all-equal row keeps nothing.
    for k in (4, 5, 6):
        assert (zm[k, 0, [0, 1, 2]] == 0).all() and (zm[k, 0] != 0).sum() == 9
    for k in (7, 8, 9, 10):
        assert (zm[k, 0] != 0).sum() == 5
    assert (zm[:, 1] == 0).all()


@interp
def test_mask_from_affine_ties_between_heads():
    """γ = 0 makes every z of a row equal to β: a constant β drops everything, distinct β keep the top |β|."""
    ahat = torch.randn(5, 20, generator=torch.Generator().manual_seed(3))
    gamma = torch.zeros(2, 20)
    beta = torch.stack([torch.full((20,), 0.3), torch.linspace(-1, 1, 20)])
    w = torch.eye(20).expand(2, 20, 20).contiguous()
    zm = sparse_head.head_logits(ahat, gamma, beta, w, torch.zeros(2, 20), torch.tensor([0, 15]))
    assert (zm[0] == 0).all()
    ref = sparse_mask(beta[1].expand(5, 20), 15)
    assert torch.equal(zm[1] != 0, ref) and ref.sum().item() == 5 * 4


# --- kernel (2): head forward + CE + backward ------------------------------------------------------------------

@interp
def test_head_logits_loss_and_gradients_match_autograd(small_blocks):
    d, m, k = 24, 20, 40
    spec, p = _grid(d, m, k, sparsities=(0.0, 0.5, 0.9), lrs=(1e-3,))
    x, c, y = _data(b=50, d=d, m=m, k=k)
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in p.tensors().items()}
    _, lh = grid_logits(x, c, leaves, p.kidx)
    per_head = F.cross_entropy(lh.reshape(-1, k), y.repeat(lh.shape[0]), reduction="none").view(lh.shape[0], -1)
    weights = torch.linspace(0.5, 2.0, lh.shape[0])                     # a non-uniform upstream gradient
    (weights * per_head.mean(1)).sum().backward()

    ahat, _, _ = projection.projection_layernorm(x, c)
    logits = sparse_head.head_logits(ahat, p.gamma, p.beta, p.w, p.b, p.kidx)
    torch.testing.assert_close(logits, lh.detach(), **TOL)
    loss, lse, _ = sparse_head.head_forward(ahat, p.gamma, p.beta, p.w, p.b, p.kidx, y)
    torch.testing.assert_close(loss, per_head.detach(), **TOL)
    torch.testing.assert_close(lse, torch.logsumexp(lh.detach(), -1), **TOL)

    mine = {n: getattr(p, n).detach().clone().requires_grad_(True) for n in ("gamma", "beta", "w", "b")}
    out = sparse_head.sparse_heads_cross_entropy(ahat, mine["gamma"], mine["beta"], mine["w"], mine["b"], p.kidx, y)
    torch.testing.assert_close(out, per_head.detach().mean(1), **TOL)
    (weights * out).sum().backward()
    for n in mine:
        torch.testing.assert_close(mine[n].grad, leaves[n].grad, atol=1e-6, rtol=1e-5, msg=n)
    # only concepts kept in some row receive gradient (the mask is a constant)
    assert (mine["beta"].grad[-1] != 0).sum() < m


@interp
def test_head_eval_counts_first_argmax_across_k_chunks(small_blocks):
    d, m, k = 24, 20, 40
    spec, p = _grid(d, m, k, sparsities=(0.0, 0.9), lrs=(1e-3,))
    with torch.no_grad():                       # classes j and j+16 tie exactly: the first index must win
        p.w[:, :, 16:32] = p.w[:, :, 0:16]
        p.b[:, 16:32] = p.b[:, 0:16]
    x, c, _ = _data(b=40, d=d, m=m, k=k)
    _, lh = grid_logits(x, c, p.tensors(), p.kidx)
    ahat, _, _ = projection.projection_layernorm(x, c)
    for y in (lh.argmax(-1)[0], lh.argmax(-1)[0] + 16, torch.randint(0, k, (40,))):
        y = y.clamp(max=k - 1)
        got = sparse_head.head_eval_correct(ahat, p.gamma, p.beta, p.w, p.b, p.kidx, y)
        assert got.tolist() == (lh.argmax(-1) == y).sum(-1).tolist()


@interp
def test_probe_cross_entropy_fused_fwd_bwd(small_blocks):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 50, 40, generator=g) * 4
    y = torch.randint(0, 40, (50,), generator=g)
    ref = logits.clone().requires_grad_(True)
    loss_ref = stacked_cross_entropy(ref, y)
    loss_ref.backward()
    buf = logits.clone()
    per_row = cross_entropy.cross_entropy_fwd_bwd_(buf, y, 1.0 / 50)
    torch.testing.assert_close(per_row.sum() / 50, loss_ref.detach(), **TOL)
    torch.testing.assert_close(buf, ref.grad, atol=1e-7, rtol=1e-5)
    auto = logits.clone().requires_grad_(True)
    cross_entropy.FusedCrossEntropy.apply(auto, y).backward()
    torch.testing.assert_close(auto.grad, ref.grad, atol=1e-7, rtol=1e-5)


# --- kernel (3): Adam with per-head lr over all stacked params ---------------------------------------------------

@interp
def test_flat_adam_equals_gridparams_adam_step():
    spec, ref = _grid(d=12, m=20, k=40, lrs=(1e-3, 1e-2, 1e-1))
    _, mine = _grid(d=12, m=20, k=40, lrs=(1e-3, 1e-2, 1e-1))
    flat = _FlatGrid(mine, adam.FlatAdam)
    assert flat.opt.numel // adam.BLOCK > 1                   # several blocks, segments of different heads
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        grads = {n: torch.randn(t.shape, generator=g) * 10 ** (step - 2) for n, t in ref.tensors().items()}
        lr_scale = 0.99 ** step
        ref.adam_step(grads, lr_scale)
        for n, t in grads.items():
            flat.grads[n].copy_(t)
        flat.opt.update(flat.lrs, lr_scale)
    for n, t in ref.tensors().items():
        torch.testing.assert_close(getattr(mine, n), t, atol=1e-7, rtol=1e-6, msg=n)
        torch.testing.assert_close(mine.moments[n][1], ref.moments[n][1], atol=1e-12, rtol=1e-5, msg=n)
    assert flat.opt.p.data_ptr() == mine.wp.data_ptr()       # the params are views of the flat buffer


# --- the whole trainer -------------------------------------------------------------------------------------------

def _tiny_problem():
    g = torch.Generator().manual_seed(0)
    n, d, m, k = 256, 32, 20, 4
    centers = torch.randn(k, d, generator=g)
    y = torch.randint(0, k, (n + 128,), generator=g)
    x = centers[y] + 1.5 * torch.randn(n + 128, d, generator=g)
    c = F.normalize(torch.randn(m, d, generator=g), dim=1)
    return x[:n], y[:n], [(x[n:], y[n:]), (x[:64], y[:64])], c


@interp
def test_tiny_grid_same_per_epoch_accuracies_as_torch():
    """N=256, D=32, M=20, K=4, 2 sparsities x 2 lrs, 3 epochs of 2 batches (128): every per-epoch accuracy of
    every probe and head on both eval sets equals the torch path's. Tolerance: an entry may differ by one eval
    sample (a float-level argmax flip), and at most 2 entries of the 36 may differ at all."""
    x, y, evs, c = _tiny_problem()
    spec = GridSpec(num_classes=4, sparsities=(0.0, 0.9), lrs=(1e-2, 1e-1), epochs=3, batch_size=128)
    ref = train_grid_torch(x, y, evs, c, spec)
    out = train_grid_triton(x, y, evs, c, spec)
    assert out.backend == "triton" and out.head_acc.shape == ref.head_acc.shape
    for got, want in ((out.probe_acc, ref.probe_acc), (out.head_acc, ref.head_acc)):
        diff = np.abs(got - want)
        assert diff.max() <= 1 / 64 + 1e-12
    n_diff = (out.probe_acc != ref.probe_acc).sum() + (out.head_acc != ref.head_acc).sum()
    assert n_diff <= 2
    assert ref.head_acc[0, 0].max() > 0.5                   # the heads actually learned something


@interp
def test_trainer_accepts_half_precision_features():
    x, y, evs, c = _tiny_problem()
    spec = GridSpec(num_classes=4, sparsities=(0.5,), lrs=(1e-1,), epochs=1, batch_size=128)
    xh = x.to(torch.bfloat16)
    ref = train_grid_torch(xh.float(), y, [(e.to(torch.bfloat16).float(), ey) for e, ey in evs[:1]], c, spec)
    out = train_grid_triton(xh, y, [(e.to(torch.bfloat16), ey) for e, ey in evs[:1]], c, spec)
    assert np.abs(out.head_acc - ref.head_acc).max() <= 1 / 128 + 1e-12
    assert np.abs(out.probe_acc - ref.probe_acc).max() <= 1 / 128 + 1e-12


def test_registry_offers_triton_only_on_cuda():
    assert available_backends("cpu")["triton"] == "triton needs a CUDA device"
    assert resolve_backend("auto", "cpu").name != "triton"
    if not torch.cuda.is_available():
        assert available_backends("cuda")["triton"] != ""


@pytest.mark.skipif(IN_PROCESS, reason="the interpreter tests ran in this process")
def test_interpreter_suite_in_subprocess():
    """triton was imported in compiled mode before this module: run the interpreter tests in a fresh process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "not gpu",
                        os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=900, cwd=root)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]


def test_kernels_compile_for_sm90_without_register_spills():
    """No GPU needed: compile every kernel, with the block sizes its launcher picks for M=200, K=1000 in fp32 and
    TF32, through triton's real GPU pipeline (TTIR -> PTX -> cubin for sm_90, the H100) and ask the bundled
    ptxas whether any register spills. Catches compiled-mode errors the interpreter cannot see."""
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton's bundled ptxas is not installed")
    assert _run_compiled(_OFFLINE_COMPILE).strip().endswith("ok")


_OFFLINE_COMPILE = """
import os, subprocess, tempfile, time
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from iis_fast.kernels import adam, cross_entropy, projection, sparse_head
target = GPUTarget("cuda", 90, 32)
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
F, I64, I32 = "*fp32", "*i64", "*i32"
def check(fn, sig, consts, warps):
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target, options={"num_warps": warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    assert r.returncode == 0, r.stderr
    line = [l for l in r.stderr.splitlines() if "spill" in l][0]
    assert " 0 bytes spill stores" in line, (fn.__name__, consts, line)
m, k = 200, 1000
head = dict(ahat_ptr=F, gamma_ptr=F, beta_ptr=F, w_ptr=F, b_ptr=F, kidx_ptr=I64, y_ptr=I64, thr_ptr=F, lse_ptr=F,
            loss_ptr=F, out_ptr=F, B="i32", M="i32", K="i32", MODE="constexpr", BLOCK_B="constexpr",
            BLOCK_M="constexpr", BLOCK_K="constexpr", PREC="constexpr")
bwd = dict(ahat_ptr=F, gamma_ptr=F, beta_ptr=F, w_ptr=F, b_ptr=F, y_ptr=I64, thr_ptr=F, lse_ptr=F, scale_ptr=F,
           dgamma_ptr=F, dbeta_ptr=F, dw_ptr=F, db_ptr=F, B="i32", M="i32", K="i32", BLOCK_B="constexpr",
           BLOCK_M="constexpr", BLOCK_K="constexpr", PREC="constexpr")
t0 = time.time()
for prec in ("ieee", "tf32"):
    for mode in (0, 1):
        bb, bm, bk, nw = sparse_head._blocks(sparse_head._head_fwd_kernel, 1024, m, k, prec, backward=False)
        sig = dict(head, **({n: I32 for n in ("thr_ptr", "lse_ptr", "loss_ptr", "out_ptr")} if mode == 1 else {}))
        check(sparse_head._head_fwd_kernel, sig, dict(MODE=mode, BLOCK_B=bb, BLOCK_M=bm, BLOCK_K=bk, PREC=prec), nw)
    bb, bm, bk, nw = sparse_head._blocks(sparse_head._head_bwd_kernel, 1024, m, k, prec, backward=True)
    check(sparse_head._head_bwd_kernel, bwd, dict(BLOCK_B=bb, BLOCK_M=bm, BLOCK_K=bk, PREC=prec), nw)
    check(projection._projection_ln_kernel,
          dict(x_ptr="*bf16", c_ptr=F, ahat_ptr=F, mean_ptr=F, rstd_ptr=F, B="i32", D="i32", M="i32",
               stride_x="i32", eps="fp32", BLOCK_B="constexpr", BLOCK_D="constexpr", BLOCK_M="constexpr",
               PREC="constexpr"), dict(zip(('BLOCK_B', 'BLOCK_D', 'BLOCK_M'), projection._blocks(1024, 2048, m, prec)), PREC=prec), 8)
check(cross_entropy._ce_fwd_bwd_kernel, dict(logits_ptr=F, y_ptr=I64, loss_ptr=F, R="i32", B="i32", K="i32",
      scale="fp32", BLOCK_R="constexpr", BLOCK_K="constexpr"), dict(BLOCK_R=4, BLOCK_K=1024), 4)
check(adam._adam_kernel, dict(p_ptr=F, g_ptr=F, m_ptr=F, v_ptr=F, seg_start_ptr=I64, seg_inner_ptr=I64,
      seg_lr0_ptr=I64, seg_nh_ptr=I64, step_ptr=F, beta1="fp32", beta2="fp32", inv_bc2_sqrt="fp32", eps="fp32",
      BLOCK="constexpr"), dict(BLOCK=1024), 4)
print("ok")
"""


# --- GPU only: the compiled kernels ------------------------------------------------------------------------------

def _run_compiled(code: str, timeout: int = 600) -> str:
    """Run `code` in a fresh interpreter without TRITON_INTERPRET, so the kernels compile for the GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
def test_gpu_compiled_grid_matches_torch_fp32_and_bf16():
    _run_compiled("""
        import numpy as np, torch, torch.nn.functional as F
        from iis_fast.backends.torch import train_grid_torch
        from iis_fast.backends.common import GridSpec
        from iis_fast.backends.triton import train_grid_triton
        torch.backends.cuda.matmul.allow_tf32 = False
        g = torch.Generator().manual_seed(0)
        n, d, m, k = 8192, 256, 200, 10
        centers = torch.randn(k, d, generator=g)
        y = torch.randint(0, k, (n + 2048,), generator=g)
        x = (centers[y] + 3 * torch.randn(n + 2048, d, generator=g)).cuda()
        y = y.cuda()
        c = F.normalize(torch.randn(m, d, generator=g), dim=1).cuda()
        spec = GridSpec(num_classes=k, sparsities=(0.0, 0.5, 0.9, 0.98), lrs=(1e-3, 1e-1), epochs=3)
        ev = [(x[n:], y[n:])]
        ref = train_grid_torch(x[:n], y[:n], ev, c, spec)
        out = train_grid_triton(x[:n], y[:n], ev, c, spec)
        assert np.abs(out.head_acc - ref.head_acc).max() <= 5 / 2048, (out.head_acc, ref.head_acc)
        assert np.abs(out.probe_acc - ref.probe_acc).max() <= 5 / 2048
        xb = x.to(torch.bfloat16)
        out16 = train_grid_triton(xb[:n], y[:n], [(xb[n:], y[n:])], c, spec)
        assert np.abs(out16.head_acc - ref.head_acc).max() <= 0.02, (out16.head_acc, ref.head_acc)
        print("ok")
    """)


@pytest.mark.gpu
@gpu
def test_gpu_speed_smoke_faster_than_torch_path():
    out = _run_compiled("""
        import time, torch
        from iis_fast.backends.torch import train_grid_torch
        from iis_fast.backends.common import GridSpec
        from iis_fast.backends.triton import train_grid_triton
        n, d, m, k = 20000, 1280, 200, 1000
        x = torch.randn(n, d, device="cuda"); y = torch.randint(0, k, (n,), device="cuda")
        c = torch.nn.functional.normalize(torch.randn(m, d, device="cuda"), dim=1)
        spec = GridSpec(num_classes=k, sparsities=(0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98),
                        lrs=(1e-3, 1e-2, 1e-1), epochs=2)
        ev = [(x[:2000], y[:2000])]
        train_grid_triton(x[:2048], y[:2048], ev, c, spec)          # compile
        t = {}
        for name, fn in (("triton", train_grid_triton), ("torch", train_grid_torch)):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            fn(x, y, ev, c, spec); torch.cuda.synchronize(); t[name] = time.perf_counter() - t0
        print(t)
        assert t["triton"] < t["torch"], t
    """)
    print(out)
