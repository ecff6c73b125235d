"""pytest-benchmark cases: one IIS grid per backend on the same synthetic features, same session.

Run: python -m pytest bench/test_bench_grid.py --benchmark-enable --benchmark-group-by=param:regime
(not part of the test suite: `testpaths` is tests/). Shapes are the issue's regimes scaled down in N and epochs
so a case takes seconds; bench/bench_grid.py is the full-size script. Each case records the FLOPs the run needs
(kept entries only) in extra_info, so GFLOP/s = needed / mean time.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from bench_grid import make_data, needed_flops  # noqa: E402

from iis_fast.config import DEFAULT_LRS, DEFAULT_SPARSITIES  # noqa: E402
from iis_fast.backends.common import GridSpec  # noqa: E402
from iis_fast.backends import available_backends, resolve_backend  # noqa: E402

REGIMES = {"small": dict(n=4096, n_eval=1024, k=10), "large": dict(n=2048, n_eval=512, k=1000)}
EPOCHS = 2
BACKENDS = [b for b, why in available_backends("cpu").items() if not why]


@pytest.fixture(scope="module", params=list(REGIMES))
def regime(request):
    r = REGIMES[request.param]
    return request.param, r, make_data(r["n"], r["n_eval"], r["k"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grid(benchmark, regime, backend):
    name, r, (x, y, ex, ey, c) = regime
    spec = GridSpec(num_classes=r["k"], sparsities=DEFAULT_SPARSITIES, lrs=DEFAULT_LRS, epochs=EPOCHS)
    trainer = resolve_backend(backend, "cpu").trainer
    rounds = 1 if backend == "reference" else 3
    out = benchmark.pedantic(trainer, args=(x, y, [(ex, ey)], c, spec), rounds=rounds, iterations=1)
    flops = needed_flops(r["n"], r["n_eval"], r["k"], EPOCHS)["run"]
    benchmark.extra_info.update(regime=name, needed_gflop=flops / 1e9)
    assert out.head_acc.shape == (1, len(DEFAULT_SPARSITIES), len(DEFAULT_LRS), EPOCHS)
