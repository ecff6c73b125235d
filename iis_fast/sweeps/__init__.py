"""Sweeps: score hundreds of checkpoints resumably, on one machine or a cluster.

- :func:`sweep` (``checkpoints, data, *, arch, out, executor, workers, retry_failed, **score_options``) ->
  a pandas DataFrame, backed by an SQLite database (:class:`ResultStore`);
- :func:`make_report`: console/HTML table and PNG plots of a results database;
- :func:`make_checkpoints`: a real trajectory to sweep (the small Fashion-MNIST CNN ``iis_smallcnn``);
- :func:`load_attribution`: the rows of the ``attribution`` measure (``sweep(..., measures=("iis", "attribution"))``).

The package is ``iis_fast.sweeps``; ``iis_fast.sweep`` is the function.
"""
from __future__ import annotations

from .checkpoints import CheckpointSpec, parse_checkpoints
from ..data.sources import FashionMNISTData
from .runner import sweep
from .store import ResultStore

__all__ = ["sweep", "ResultStore", "CheckpointSpec", "parse_checkpoints", "FashionMNISTData", "make_report",
           "make_checkpoints", "correlations", "load_attribution"]


def __getattr__(name: str):  # lazy: matplotlib / training code only when used
    if name in ("make_report", "correlations"):
        from . import report
        return getattr(report, name)
    if name == "load_attribution":
        from .attribution import load_attribution
        return load_attribution
    if name == "make_checkpoints":
        from .make_checkpoints import make_checkpoints
        return make_checkpoints
    raise AttributeError(name)
