"""How to Probe (docs/spec.md §2): probe variants on a frozen backbone and the quality of their attributions.

- :func:`probe`: train linear / MLP / B-cos probes with CE and/or BCE at once on cached spatial maps.
- :func:`attribution_quality`: Input×Gradient, Grad-CAM, Integrated Gradients and B-cos contribution maps,
  all targets of an image from one forward, scored by GridPG / EPG / entropy / Gini.
"""
from __future__ import annotations

from .attribution import (
    ATTRIBUTIONS, METHODS, Attribution, BcosContributions, GradCAM, InputXGradient, IntegratedGradients, ProbedModel,
    as_probed, attribute, last_conv, make_attribution,
)
from .grids import GridSet, make_grids
from .heads import HEAD_NAMES, BcosProbe, LinearProbe, MLPProbe, make_head
from .losses import LOSS_NAMES, bce_loss, bce_targets, ce_loss
from .metrics import energy_pointing_game, entropy, gini, grid_pointing_game, smooth, smoothing_for
from .quality import METRICS, AttributionQuality, attribution_quality
from .spatial import SpatialMaps, extract_spatial, spatial_features
from .train import ProbeResult, probe, probe_maps

__all__ = [
    "probe", "probe_maps", "ProbeResult", "attribution_quality", "AttributionQuality", "attribute", "ProbedModel",
    "as_probed", "make_grids", "GridSet", "make_head", "LinearProbe", "MLPProbe", "BcosProbe", "HEAD_NAMES",
    "LOSS_NAMES", "METHODS", "METRICS", "bce_loss", "bce_targets", "ce_loss", "grid_pointing_game",
    "energy_pointing_game", "entropy", "gini", "smooth", "smoothing_for", "SpatialMaps", "extract_spatial",
    "spatial_features", "ATTRIBUTIONS", "Attribution", "InputXGradient", "GradCAM", "IntegratedGradients",
    "BcosContributions", "make_attribution", "last_conv",
]
