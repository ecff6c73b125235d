"""Sweeps: score hundreds of checkpoints resumably, on one machine or a cluster (issue 5).

- :func:`sweep` (``checkpoints, data, *, arch, out, executor, workers, retry_failed, **score_options``) ->
  a pandas DataFrame, backed by an SQLite database (:class:`ResultStore`);
- :func:`make_report`: console/HTML table and PNG plots of a results database;
- :func:`make_checkpoints`: a real trajectory to sweep (the small Fashion-MNIST CNN ``iis_smallcnn``).

Importing this package registers ``iis_smallcnn`` in timm.
"""
from __future__ import annotations

from . import smallcnn as smallcnn  # noqa: F401  (registers iis_smallcnn in timm)
from .checkpoints import CheckpointSpec, parse_checkpoints
from .data import FashionMNISTData
from .runner import sweep
from .store import ResultStore

__all__ = ["sweep", "ResultStore", "CheckpointSpec", "parse_checkpoints", "FashionMNISTData", "make_report",
           "make_checkpoints", "correlations"]


def __getattr__(name: str):  # lazy: matplotlib / training code only when used
    if name in ("make_report", "correlations"):
        from . import report
        return getattr(report, name)
    if name == "make_checkpoints":
        from .make_checkpoints import make_checkpoints
        return make_checkpoints
    raise AttributeError(name)


class _CallableModule(__import__("types").ModuleType):
    """Importing ``iis_fast.sweep.<sub>`` rebinds ``iis_fast.sweep`` to this package, shadowing the lazily exported
    function; making the package callable keeps ``iis_fast.sweep(...)`` working either way."""

    def __call__(self, *args, **kwargs):
        return sweep(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
