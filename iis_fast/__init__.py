"""iis_fast: how interpretable is a pre-trained vision representation, measured fast.

Public API (see README.md):
- :func:`score` / :func:`score_features`: the Inherent Interpretability Score (IIS) of one model (docs/spec.md §1).
- :func:`sweep`: score many checkpoints, resumably, into a SQLite database.
- :func:`probe` / :func:`attribution_quality`: How-to-Probe probe variants and attribution metrics (docs/spec.md §2).
- :func:`finetune` / :func:`explain` / :func:`concept_gallery`: the IIS paper's applications (docs/applications.md).
"""
from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

from .config import IISConfig
from .errors import BackendUnavailable, CheckpointError, DataFileError, IISInputError
from .result import IISResult
from .score import score, score_features

# Heavier parts (pandas, Ray, matplotlib) load on first use.
_LAZY = {"sweep": "iis_fast.sweeps", "probe": "iis_fast.probing", "attribution_quality": "iis_fast.probing",
         "finetune": "iis_fast.applications", "explain": "iis_fast.applications",
         "concept_gallery": "iis_fast.applications"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'iis_fast' has no attribute {name!r}")


__all__ = ["score", "score_features", "sweep", "probe", "attribution_quality", "finetune", "explain",
           "concept_gallery", "IISResult", "IISConfig",
           "IISInputError", "CheckpointError", "DataFileError", "BackendUnavailable", "__version__"]
