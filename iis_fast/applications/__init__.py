"""The IIS paper's two applications (docs/applications.md): interpretability-maximising fine-tuning
(:func:`finetune`) and predictions one can look at (:func:`explain`, :func:`concept_gallery`)."""
from __future__ import annotations

from .explain import Explanation, concept_contributions, explain, heads_from_finetune
from .finetune import FinetuneHistory, FinetuneResult, finetune
from .gallery import concept_gallery, explanation_png
from .kept_heads import KeptHead, KeptHeads

__all__ = ["finetune", "FinetuneResult", "FinetuneHistory", "explain", "Explanation", "concept_contributions",
           "heads_from_finetune", "concept_gallery", "explanation_png", "KeptHeads", "KeptHead"]
