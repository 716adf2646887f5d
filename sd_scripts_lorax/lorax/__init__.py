"""Pure tensor math of LoRA-X: bases, factors, similarity (no I/O)."""

from .bases import METHOD_VERSION, METHODS, Bases, choose_method, top_bases, top_bases_batched
from .factors import (d_from_factors, delta_from_factors, delta_norm, energy_in_subspace, factors_fit,
                      flatten_weight, lorax_factors, project_factors)
from .similarity import Similarity, module_similarity, subspace_similarity

__all__ = [
    "METHOD_VERSION", "METHODS", "Bases", "choose_method", "top_bases", "top_bases_batched",
    "d_from_factors", "delta_from_factors", "delta_norm", "energy_in_subspace", "factors_fit", "flatten_weight",
    "lorax_factors",
    "project_factors", "Similarity", "module_similarity", "subspace_similarity",
]
