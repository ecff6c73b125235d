"""Concept libraries for the Inherent Interpretability Score (docs/spec.md §1.2).

Typical use: pick the concept-source images with :func:`concept_source_indices` (TRAIN split only), embed
their patch/segment elements with :func:`embed_concept_elements`, then :func:`build_library`.
"""
from __future__ import annotations

from .elements import (
    ELEMENT_CHOICES,
    ELEMENT_KINDS,
    GREY_117,
    ElementInfo,
    concept_source_indices,
    clear_element_memo,
    embed_concept_elements,
    embed_elements,
    make_elements,
    official_order,
    parse_elements,
    patch_elements,
    patch_elements_with_sources,
    segment_crop,
    segment_elements,
    segment_elements_with_sources,
    select_segment_masks,
    slic_label_maps,
)
from .official import embed_official_elements, raw_source_images
from .text import TextConcepts, fit_text_concepts, mean_cubic_distance
from .libraries import (
    ELEMENT_SUBSETS,
    LIBRARY_KINDS,
    build_library,
    cluster_library,
    cos_cubed_similarity,
    element_subset,
    end2end_elements,
    fit_text_projection,
    prototype_library,
    stratified_indices,
    text_library,
)

__all__ = [
    "ELEMENT_KINDS", "ELEMENT_CHOICES", "ELEMENT_SUBSETS", "GREY_117", "LIBRARY_KINDS", "ElementInfo",
    "official_order", "parse_elements", "element_subset", "embed_official_elements", "raw_source_images",
    "concept_source_indices", "patch_elements", "patch_elements_with_sources", "select_segment_masks",
    "segment_crop", "slic_label_maps", "segment_elements", "segment_elements_with_sources", "make_elements",
    "embed_elements", "embed_concept_elements", "clear_element_memo",
    "build_library", "prototype_library", "stratified_indices", "cluster_library", "end2end_elements",
    "fit_text_projection", "cos_cubed_similarity", "text_library", "TextConcepts", "fit_text_concepts",
    "mean_cubic_distance",
]
