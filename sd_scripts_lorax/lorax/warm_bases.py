"""Top-r bases of a weight warm-started from a related weight's right subspace (docs/design.md §2).

A transfer's target is a relative of its source, and a LoRA-X input carries the source's V (its
`lora_down` rows). `warm_top_bases(w, rank, v_start)` runs a block subspace iteration on W^T W from
that V, reaches the target's top-r subspace in a few products with W, takes the exact rotation and
singular values by a Rayleigh-Ritz step, and certifies the result by its residuals; `None` when the
certificate fails (the caller then runs the exact method, `top_bases`). `bases_warm_or_exact` does both.

Algorithm (deterministic: fixed-seed extra columns):
- block X = orth([V_start, G]) of k = r + p columns, p = max(16, 2r) (G Gaussian, fixed seed): the
  extra columns catch directions the start misses and set the convergence rate (s_{k+1}/s_r)^2 per step;
- float32 steps X <- orth(W^T W X) with a Rayleigh-Ritz step each (the Ritz residuals come free from
  the two products), until the float32 residuals stop improving or `_MAX_ITERS`;
- one or two float64 steps with the float64 Rayleigh-Ritz result and residuals
  rho_i = ||W^T W v_i - theta_i v_i|| (theta_i = s_i^2, v_i the Ritz vectors): float32 products leave a
  residual floor of ~1e-7 s_max^2, too high to certify small singular values; float64 does not;
- a fixed-seed probe (a few power steps deflated against the block) must find no direction with more
  energy than theta_r outside it, i.e. the block holds the TOP subspace.

Certificate (what "accepted" guarantees; the same statement as the "gram" tolerance of `bases`):
with lambda_{r+1} bounded by min(theta_{r+1} + rho_{r+1}, (sqrt(theta_r + rho_r) - 1e-3 sqrt(theta_1))^2)
(the first term when the block has converged past r, the second whenever the spectrum has the
documented gap s_r - s_{r+1} > 1e-3 s_max), each Ritz vector's part outside the true top-r subspace is
at most rho_i / (theta_i - lambda_{r+1}) (an eigenvector-residual bound), so
    ||P_warm - P_true||_F / sqrt(r) <= sqrt(2 sum_i (rho_i / (theta_i - lambda_{r+1}))^2 / r) <= PROJECTOR_TOL
and |s_i - s_i,true| <= rho_i / sqrt(theta_i) <= SINGULAR_TOL * s_max. The limits are half the
gram-vs-exact tolerances of `bases` (1e-4, 1e-5), so accepted warm bases agree with gram and exact
bases within those tolerances whenever the spectrum is not degenerate at r. Where it is degenerate
(no gap at r), no method promises a projector tolerance (float32 SVD and float64 Gram already differ
there); the certificate then still bounds the residuals, i.e. the bases are exact for a weight within
~rho / s_max of W.

When it pays (`warm_start_pays`): each block step costs ~4 out n k flops, and certifying to the
tolerances below takes ~5 float32 steps and one float64 step even from a good start (a start 0.05
off in projector distance, rank 32, is 3-4 steps ahead of a random one, not more). The Gram method
costs m^2 max(out, n) (syrk) plus an m x m eigensolver (m = min(out, n)). Measured, the warm start
wins only on wide square layers at small rank (1280 x 1280 at rank 32: 1.3x) and loses elsewhere;
at rank 320 (k = 960 > m/2 of a 1280 layer) it cannot win. A start that is far off (another
checkpoint) only costs iterations: the certificate decides, and failure falls back.

Same sign convention and outputs as `bases.top_bases`: float32 u (out, r), s (r,), v (n, r) on w's
device, the largest-|.| entry of each u column positive.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..formats.finite import all_finite
from .bases import Bases, _fix_signs, _orthonormal_factor, top_bases
from .ritz import PROJECTOR_TOL, SINGULAR_TOL, certificate, gaussian, orth, outside_energy, ritz

# SVD-cache method tag of warm-started bases (see transfer.engine._Engine.target_bases)
CACHE_METHOD = "warm-v1"

_MAX_ITERS = 10          # float32 steps
_F64_STEPS = 2           # float64 steps (certify after each)
_PAY_FRACTION = 8        # warm start only while k = r + p <= m / 8 ...
_PAY_MIN_DIM = 1024      # ... on square-ish layers at least this wide (see warm_start_pays)


def oversample(r: int) -> int:
    """Extra block columns p for rank r (k = r + p)."""
    return max(16, 2 * r)


def warm_start_pays(out: int, n: int, rank: int) -> bool:
    """Whether the warm start is expected to beat the exact method for an (out, n) weight at `rank`.

    Measured against "gram" on drifted SD1.5 layer shapes (benchmarks/bench_bases.py --warm): the
    block steps cost ~4 out n k each, the Gram method m^2 max(out, n) (syrk) plus an m x m
    eigensolver; only the eigensolver's m^3 leaves room, so the warm start wins only on wide square
    layers (1280 x 1280 at rank 32: 1.3x) and loses on tall/wide ones (syrk is cheap next to the
    steps) and on small ones (the eigensolver is cheap).
    """
    m, big = min(out, n), max(out, n)
    r = min(rank, m)
    return (0 < r < m and m >= _PAY_MIN_DIM and big * 4 <= m * 5
            and (r + oversample(r)) * _PAY_FRACTION <= m)


def warm_top_bases(w: Tensor, rank: int, v_start: Tensor) -> Bases | None:
    """Top-r bases of `w` (2-D or 4-D) from a start `v_start` (n, c) near its top right subspace, or None.

    None when the certificate (module docstring) fails, when the shapes do not fit, when r is the full
    rank, or when the input is not finite; callers then use `top_bases`. Does not check whether the
    warm start pays (`warm_start_pays`): it is correct at any rank, just slower where k is large.
    """
    if w.dim() not in (2, 4) or v_start.dim() != 2 or not w.is_floating_point():
        return None
    w32 = w.reshape(w.shape[0], -1).to(torch.float32)
    out, n = w32.shape
    m = min(out, n)
    r = min(int(rank), m)
    if r <= 0 or r >= m or v_start.shape[0] != n or not all_finite(w32):
        return None
    start = v_start[:, :r].to(device=w32.device, dtype=torch.float32)
    if not all_finite(start):
        return None
    k = min(m, r + oversample(r))
    if k <= r:
        return None
    x = orth(torch.cat([start, gaussian(n, k - start.shape[1], w32.device)], dim=1))

    best, stalled = math.inf, 0
    for _ in range(_MAX_ITERS):
        y = w32 @ x
        z = w32.T @ y
        theta, c, resid = ritz(y, z, x)
        proj, _ = certificate(theta, resid, r)
        x = orth((z.to(torch.float64) @ c).to(torch.float32))
        # float32 residuals carry the products' rounding: once they meet the tolerance with room, or
        # stop improving (the float32 floor), the float64 steps take over and decide
        if proj <= 0.25 * PROJECTOR_TOL:
            break
        stalled = stalled + 1 if proj >= best else 0
        best = min(best, proj)
        if stalled >= 2:
            break

    w64 = w32.to(torch.float64)
    x64 = x.to(torch.float64)
    for _ in range(_F64_STEPS):
        y = w64 @ x64
        z = w64.T @ y
        theta, c, resid = ritz(y, z, x64)
        proj, sing = certificate(theta, resid, r)
        if proj <= PROJECTOR_TOL and sing <= SINGULAR_TOL:
            break
        x64 = orth(z @ c)
    else:
        return None
    block = x64 @ c
    v = block[:, :r]
    if outside_energy(w32, block.to(torch.float32)) > float(theta[r - 1]):
        return None           # a direction outside the block beats the r-th: the block is not the top
    s = theta[:r].sqrt()
    u = _orthonormal_factor(y @ c[:, :r], s)
    u, v = _fix_signs(u, v)
    return Bases(u.to(torch.float32).contiguous(), s.to(torch.float32).contiguous(), v.to(torch.float32).contiguous())


def bases_warm_or_exact(w: Tensor, rank: int, v_start: Tensor | None) -> tuple[Bases, bool]:
    """(bases, warm): the warm-started bases where a start is given, the warm start pays and its
    certificate holds; otherwise `top_bases(w, rank)` (the exact path), warm = False."""
    if v_start is not None and w.dim() in (2, 4):
        out, n = w.shape[0], math.prod(w.shape[1:])
        if warm_start_pays(out, n, rank):
            b = warm_top_bases(w, rank, v_start)
            if b is not None:
                return b, True
    return top_bases(w, rank), False
