"""Top-r eigenpairs of a weight's smaller Gram matrix at small rank, from a float32 Gram and eigensolver
certified in float64 (the CPU "gram" method's fast path, docs/design.md §2).

Why: at the ranks kohya users train, the float64 Gram (syrk) and its eigensolver (dsyevr) are the
whole cost of a network's bases, about 10 s of every first launch on SD1.5. The Gram is twice as fast
in float32 and the eigensolver about 1.7x, and the float32 subspace is ~1e-6 off, far inside the
1e-4 the "gram" method promises. But float32 rounding alone guarantees nothing where singular values
are close, so the float32 result is only a start:

- the top k = r + p eigenvectors of the float32 Gram (ssyrk and ssyevr through `lapack`, GIL released;
  ARPACK's Lanczos was 3x faster on one thread but no faster on two workers: GIL and memory bandwidth);
- a float64 Rayleigh-Ritz step of W^T W on their span (two products with W in float64), certified
  by `block_certificate` to the warm start's limits (projector error <= 5e-5 and singular values
  <= 5e-6 s_max, half the "gram" tolerances), with one more float64 subspace step if it misses;
- no probe: the eigenvalues the block misses are bounded by Weyl's inequality from the float32
  eigenvalues and an estimate of the float32 Gram's rounding error (`_outside_bound`).

`None` when anything fails; the caller then runs the float64 Gram. So accepted results meet the
"gram" tolerances against the exact SVD, and the fallback costs one float32 attempt (about half the
float64 path) only where the spectrum is nearly degenerate at r.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .lapack import gram_upper, top_eigh
from .ritz import PROJECTOR_TOL, SINGULAR_TOL, orth, ritz

_MAX_FRACTION = 20       # tried while k = r + p <= m / 20 (above, the float64 steps cost what float32
_MIN_DIM = 512           # saves); below 512 the float64 path costs milliseconds
_F64_STEPS = 2
_SLAB = 256              # rows of the long side per float64 slab (~2.6 MB at m = 1280)
_EIGH32_ERR = 1e-5       # relative eigenvalue error allowed for the float32 eigensolver (~m ulps)


def oversample(r: int, m: int, big: int) -> int:
    """Extra block columns p for rank r of an (m, big) weight. The block's last eigenvalue bounds what
    it misses, so more columns widen the certified gap; on tall/wide layers (big >= 4 m), whose top
    spectrum is flatter and whose cost is the Gram itself, 24 columns cost little; elsewhere 8."""
    return max(24 if big >= 4 * m else 8, r // 4)


def mixed_pays(m: int, big: int, r: int) -> bool:
    """Whether the float32 start is tried for rank r of an (m, big) weight (m the small side)."""
    return m >= _MIN_DIM and 0 < r and (r + oversample(r, m, big)) * _MAX_FRACTION <= m


def top_eigh_mixed(w32: Tensor, r: int, small_side_is_u: bool) -> tuple[Tensor, Tensor, Tensor] | None:
    """Top-r eigenpairs (descending) of the smaller Gram matrix of one float32 (out, n) CPU weight, and
    the other side's unnormalised factor (W^T U or W V), all float64; None unless certified."""
    m, big = min(w32.shape), max(w32.shape)
    k = min(m - 1, r + oversample(r, m, big))
    w32 = w32.contiguous()
    g = gram_upper(w32.numpy(), small_side_is_u)
    lower = torch.from_numpy(g.T)                     # C view of the Fortran array: the lower triangle valid
    g32 = (lower.tril() + lower.tril(-1).T).to(torch.float64)   # before top_eigh overwrites g
    lam32, x32 = top_eigh(g, k)                       # ascending
    if not np.isfinite(lam32).all() or not np.isfinite(x32).all():
        return None
    x = orth(torch.from_numpy(np.ascontiguousarray(x32[:, ::-1])).to(torch.float64))
    outside = None
    for _ in range(_F64_STEPS):
        y, z = gram_products(w32, x, small_side_is_u)
        if outside is None:
            outside = _outside_bound(lam32, z - g32 @ x)
        theta, c, resid = ritz(y, z, x)
        proj, sing = block_certificate(theta, resid, x, z, r, outside)
        if proj <= PROJECTOR_TOL and sing <= SINGULAR_TOL:
            return (x @ c[:, :r]).contiguous(), theta[:r].contiguous(), (y @ c[:, :r]).contiguous()
        x = orth(z @ c)       # a subspace step: the residual shrinks, the same certificate again
    return None


def gram_products(w32: Tensor, x: Tensor, small_side_is_u: bool) -> tuple[Tensor, Tensor]:
    """(y, z) = (b x, b^T b x) in float64 for the float32 weight's long-side matrix b (W^T when the
    Gram is W W^T, else W; x (m, k) float64 on the short side).

    In slabs of the long side, each converted to float64 on the fly: one pass over the float32
    weight with both products on a cache-resident slab, instead of a float64 copy of the whole weight
    read twice (these products are memory-bound; 1.5x faster measured on 10240 x 1280)."""
    big = max(w32.shape)
    z = torch.zeros(x.shape, dtype=torch.float64)
    ys = []
    for i in range(0, big, _SLAB):
        slab = (w32[:, i:i + _SLAB].T if small_side_is_u else w32[i:i + _SLAB]).to(torch.float64)
        y = slab @ x
        z.addmm_(slab.T, y)
        ys.append(y)
    return torch.cat(ys), z


def block_certificate(theta: Tensor, resid: Tensor, x: Tensor, z: Tensor, r: int,
                      outside: float) -> tuple[float, float]:
    """(projector bound, singular-value bound / s_max) of the top-r Ritz pairs of G on span(x), for a
    block x (m, k) whose complement holds no eigenvalue of G above `outside`.

    z = G x (float64), theta (k,) the Ritz values (descending), resid their residual norms. With P the
    projector on span(x) and R = (I - P) G x:
    - the true top-r subspace V lies within ||R|| / (lambda_r - outside) of span(x) (Davis-Kahan on
      the off-diagonal block; lambda_r >= theta_r by interlacing);
    - the Ritz vectors lie within sqrt(1 + ||R||^2 / delta^2) times that of V, delta = theta_r -
      theta_{r+1} (Knyazev's bound for Ritz vectors).
    The gap that matters is theta_r - outside, not the (tiny, on flat spectra) theta_r - theta_{r+1}
    that `ritz.certificate` must use without a bound on the complement. Singular values: each Ritz
    value is within its residual of an eigenvalue, as there.
    """
    t = theta.to(torch.float64)
    s_max = math.sqrt(max(float(t[0]), 0.0))
    gap_out, gap_in = float(t[r - 1]) - outside, float(t[r - 1] - t[r])
    if s_max == 0.0 or gap_out <= 0.0 or gap_in <= 0.0:
        return math.inf, math.inf
    r_norm = float(torch.linalg.matrix_norm(z - x @ (x.T @ z), ord=2))
    sin_v = r_norm / gap_out
    sin_ritz = sin_v * math.sqrt(1.0 + (r_norm / gap_in) ** 2)
    if sin_ritz >= 1.0:
        return math.inf, math.inf
    sing = float((resid[:r].to(torch.float64) / t[:r].sqrt()).max()) / s_max
    return math.sqrt(2.0) * sin_ritz, sing


def _outside_bound(lam32: np.ndarray, e_x: Tensor) -> float:
    """A bound on the eigenvalues of G whose eigenvectors the block (the float32 top k) misses.

    Weyl: each is at most lam_k(G32) + ||G - G32||_2. The rounding error E = G - G32 behaves like a
    random symmetric matrix, whose norm is about twice |E x| for a unit x (1.9-2.5x measured on flat
    and decaying spectra, SD shapes), so 8 max_i |E x_i| over the block's columns leaves 4x room. The
    float32 eigensolver's own error (a few ulps of lam_max) is added on top.
    """
    e_norm = 8.0 * float(torch.linalg.vector_norm(e_x, dim=0).max())
    return float(lam32[0]) + e_norm + _EIGH32_ERR * float(lam32[-1])
