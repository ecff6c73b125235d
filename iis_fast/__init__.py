"""iis_fast: how interpretable is a pre-trained vision representation, measured fast.

Public API (see README.md):
- :func:`score` / :func:`score_features`: the Inherent Interpretability Score (IIS) of one model.
- :func:`sweep`: score many checkpoints, resumably.
- :func:`probe` / :func:`attribution_quality`: How-to-Probe probe variants and attribution metrics.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .config import IISConfig
from .errors import BackendUnavailable, CheckpointError, DataFileError, IISInputError

__all__ = ["IISConfig", "IISInputError", "CheckpointError", "DataFileError", "BackendUnavailable", "__version__"]
