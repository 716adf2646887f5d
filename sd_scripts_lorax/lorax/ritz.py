"""Rayleigh-Ritz pieces shared by the bases that start from an approximate top subspace and
certify the result instead of trusting it (`warm_bases`: a related weight's V; `mixed_gram`: a float32
eigensolve): the Ritz pairs of W^T W on a block, and for the warm start its residual certificate and a
probe for directions the block misses (see warm_bases' docstring for what that certificate guarantees;
mixed_gram has its own, with a bound on what the block misses).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

# Half the gram-vs-exact tolerances stated in `bases` (projector 1e-4, singular values 1e-5 of s_max).
PROJECTOR_TOL = 5e-5
SINGULAR_TOL = 5e-6
# The documented non-degeneracy condition of `bases`: s_r - s_{r+1} > GAP_FLOOR * s_max.
GAP_FLOOR = 1e-3

_PROBE_COLUMNS = 8
_PROBE_ITERS = 2
_SEED = 20250125


@contextmanager
def serial_lapack(w: Tensor) -> Iterator[None]:
    """Run the enclosed CPU factorizations (eigh, QR, small SVDs) on one thread, then restore.

    MKL's multi-threaded eigh/QR synchronise at every panel; on a busy 2-core machine each barrier
    waits for a descheduled thread and they run 10-100x slower than on one thread (eigh of a
    640 x 640 float64 matrix: 14 s on 2 threads, 0.09 s on 1, measured here). GEMMs keep all threads.
    """
    if w.device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gaussian(rows: int, cols: int, device: torch.device, salt: int = 0) -> Tensor:
    """A fixed-seed Gaussian block (drawn on the CPU, so every device gets the same numbers)."""
    gen = torch.Generator(device="cpu").manual_seed(_SEED + salt)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32).to(device)


def orth(x: Tensor) -> Tensor:
    """Orthonormal columns spanning x (a QR on one LAPACK thread)."""
    with serial_lapack(x):
        return torch.linalg.qr(x)[0]


def ritz(y: Tensor, z: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rayleigh-Ritz of W^T W on span(x) from y = W x, z = W^T y: (theta desc, C, residual norms), float64."""
    h = (y.T @ y).to(torch.float64)
    with serial_lapack(h):
        theta, c = torch.linalg.eigh(h)
    theta, c = theta.flip(0).clamp_min(0), c.flip(1)
    z64, x64 = z.to(torch.float64), x.to(torch.float64)
    resid = torch.linalg.vector_norm(z64 @ c - (x64 @ c) * theta, dim=0)
    return theta, c, resid


def certificate(theta: Tensor, resid: Tensor, r: int) -> tuple[float, float]:
    """(projector bound, singular-value bound / s_max) of the top-r Ritz pairs; inf when no gap is
    certified. theta (k,) descending Ritz values of W^T W (k > r), resid (k,) their residual norms."""
    t = theta.to(torch.float64)
    rho = resid.to(torch.float64)
    s_max = math.sqrt(max(float(t[0]), 0.0))
    if s_max == 0.0 or float(t[r - 1]) <= 0.0:
        return math.inf, math.inf
    by_block = float(t[r] + rho[r])
    by_gap = (math.sqrt(float(t[r - 1] + rho[r - 1])) - GAP_FLOOR * s_max) ** 2
    lam_next = min(by_block, by_gap) if math.sqrt(float(t[r - 1] + rho[r - 1])) > GAP_FLOOR * s_max else by_block
    delta = t[:r] - lam_next
    if float(delta.min()) <= 0.0:
        return math.inf, math.inf
    proj = math.sqrt(2.0 * float(((rho[:r] / delta) ** 2).sum()) / r)
    sing = float((rho[:r] / t[:r].sqrt()).max()) / s_max
    return proj, sing


def outside_energy(w: Tensor, basis: Tensor) -> float:
    """A lower bound of the largest eigenvalue of W^T W outside span(basis): fixed-seed block power steps
    deflated against it, then Rayleigh-Ritz (as `bases.bases_from_claimed_v` does)."""
    probe = gaussian(w.shape[1], _PROBE_COLUMNS, w.device, salt=1).to(w.dtype)
    for _ in range(_PROBE_ITERS):
        probe = orth(probe - basis @ (basis.T @ probe))
        probe = w.T @ (w @ probe)
    probe = orth(probe - basis @ (basis.T @ probe))
    wp = (w @ probe).to(torch.float64)
    with serial_lapack(wp):
        return float(torch.linalg.eigvalsh(wp.T @ wp)[-1])
