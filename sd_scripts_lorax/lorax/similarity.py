"""Subspace similarity of two weights' bases (docs/design.md §2)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .bases import Bases


class Similarity(NamedTuple):
    """phi_u, phi_v in [0, 1] and the module score phi = min(phi_u, phi_v)."""

    phi_u: float
    phi_v: float
    phi: float


def subspace_similarity(a: Tensor, b: Tensor) -> float:
    """||A^T B||_F^2 / r for orthonormal columns A (n, ra), B (n, rb); r = min(ra, rb).

    1 = one span contains the other, ~r/n for random subspaces, 0 = orthogonal; sign-invariant.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"subspace_similarity: bases of shapes {tuple(a.shape)} and {tuple(b.shape)} do not match")
    r = min(a.shape[1], b.shape[1])
    if r == 0:
        raise ValueError("subspace_similarity: empty bases")
    # float64: the value is a sum of r^2 squares and is compared against thresholds near 1.
    m = a.to(torch.float64).transpose(0, 1) @ b.to(device=a.device, dtype=torch.float64)
    return min(1.0, max(0.0, float((m * m).sum()) / r))


def module_similarity(src: Bases, tgt: Bases) -> Similarity:
    """phi_u, phi_v and phi = min of the two for a source and a target module's bases."""
    phi_u = subspace_similarity(src.u, tgt.u)
    phi_v = subspace_similarity(src.v, tgt.v)
    return Similarity(phi_u, phi_v, min(phi_u, phi_v))
