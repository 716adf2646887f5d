"""Top-r singular bases of a base weight (docs/design.md §2).

Three interchangeable ways to get the same bases, all returning float32 on the input's device with
one fixed sign convention (the largest-|.| entry of every `u` column is positive, the matching `v`
column flipped with it), so the same weights always give the same bases:

- "exact": `torch.linalg.svd(full_matrices=False)` in float32. The reference.
- "gram": eigen-decomposition of the smaller Gram matrix (W W^T or W^T W) in float64, then the
  other factor by one matmul, orthonormalised by a QR (which also completes the basis where
  singular values are zero). On the CPU only the r wanted eigenpairs are computed (LAPACK's MRRR
  through scipy), so the cost falls with r; at small rank (r + p <= m / 20, m >= 512) a float32 Gram
  and eigensolver give a start that a float64 Rayleigh-Ritz step must certify to half the tolerances
  below (`mixed_gram`), else the float64 path runs. Tolerance vs "exact": the projectors U U^T and V V^T agree to
  ||P_gram - P_exact||_F / sqrt(r) < 1e-4 and singular values to 1e-5 relative (of s_max) whenever
  the spectrum is not degenerate at r (s_r - s_{r+1} > 1e-3 s_max); the float64 Gram matrix keeps
  singular values down to ~1e-7 s_max, which float32 SVD itself does not beat.
- "randomized": subspace (block power) iteration with oversampling (k = r + max(10, r/2)) and
  `power_iters` (4) re-orthonormalised power iterations from a fixed-seed test matrix, so it is
  deterministic. The products with W run in float32, the small problems in float64. Tolerance vs
  "exact": when the spectrum has a gap at r (s_{r+1} / s_r <= 0.5) the projectors agree to
  ||P_rand - P_exact||_F / sqrt(r) < 1e-3 and the top-r singular values to 1e-4 relative. Without a
  gap the subspace is only approximate (that is what "randomized" means); "auto" never picks it
  where gram is affordable.
- "auto": "gram" when min(out, n) <= 4096 (every SD1/SD2/SDXL layer), otherwise "randomized" when
  r <= min(out, n) / 8, otherwise "exact".

Degenerate input: rank <= 0 and NaN/Inf raise ValueError; a zero (or rank-deficient) matrix gives
valid orthonormal bases with zero singular values, never NaN.

Threads: the CPU factorizations (eigh, QR) run on one thread (`serial_lapack`, `serial_blas`); on a
shared 2-core machine MKL's threaded eigh is 10-100x slower than its serial one. torch's GEMMs keep
every thread; callers that want more throughput run several weights side by side instead (the
functions here are safe to call from several threads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..formats.finite import all_finite
from .lapack import gram_upper, serial_blas, top_eigh
from .mixed_gram import mixed_pays, top_eigh_mixed
from .ritz import serial_lapack  # noqa: F401 (re-exported: callers import it from here)

METHODS = ("auto", "exact", "gram", "randomized")
# Part of the SVD cache key: bump when the numbers a method returns change.
METHOD_VERSION = "bases-v3"

_GRAM_MAX_DIM = 4096
_RANDOMIZED_MAX_FRACTION = 8
_POWER_ITERS = 4
_SEED = 20250124


@dataclass(frozen=True)
class Bases:
    """Top-r singular triplets: W ~ u diag(s) v^T; u (out, r), s (r,), v (n, r), float32.

    Batched results carry a leading batch dimension on all three.
    """

    u: Tensor
    s: Tensor
    v: Tensor

    @property
    def rank(self) -> int:
        """Number of singular triplets kept."""
        return int(self.s.shape[-1])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Bases":
        """The same bases on another device / dtype."""
        return Bases(self.u.to(device=device, dtype=dtype), self.s.to(device=device, dtype=dtype),
                     self.v.to(device=device, dtype=dtype))

    def __getitem__(self, i: int) -> "Bases":
        """Item `i` of a batched result."""
        return Bases(self.u[i], self.s[i], self.v[i])


def choose_method(out: int, n: int, rank: int) -> str:
    """The method "auto" picks for an (out, n) matrix at this rank."""
    m = min(out, n)
    if m <= _GRAM_MAX_DIM:
        return "gram"
    if min(rank, m) * _RANDOMIZED_MAX_FRACTION <= m:
        return "randomized"
    return "exact"


def top_bases(w: Tensor, rank: int, method: str = "auto") -> Bases:
    """Top-r bases of one weight: 2-D (out, in) or 4-D (out, in, kh, kw), any float dtype.

    Returns `Bases(u (out, r), s (r,), v (in*kh*kw, r))` in float32 on w's device,
    r = min(rank, out, in*kh*kw). See the module docstring for methods and tolerances.
    """
    if w.dim() not in (2, 4):
        raise ValueError(f"top_bases: expected a 2-D or 4-D weight, got shape {tuple(w.shape)}")
    return top_bases_batched(w.reshape(1, w.shape[0], -1), rank, method)[0]


def top_bases_batched(ws: Tensor, rank: int, method: str = "auto") -> Bases:
    """Top-r bases of a stack of same-shape weights: (B, out, n) or (B, out, in, kh, kw).

    Returns Bases with u (B, out, r), s (B, r), v (B, n, r); same rules as `top_bases`.
    """
    if ws.dim() not in (3, 5):
        raise ValueError(f"top_bases_batched: expected (B, out, n) or (B, out, in, kh, kw), got {tuple(ws.shape)}")
    rank = _check_rank(rank)
    if not ws.is_floating_point():
        raise ValueError(f"top_bases: expected a floating-point weight, got {ws.dtype}")
    w = ws.reshape(ws.shape[0], ws.shape[1], -1).to(torch.float32)
    _check_finite(w)
    batch, out, n = w.shape
    r = min(rank, out, n)
    if method == "auto":
        method = choose_method(out, n, r)
    if method == "exact":
        u, s, v = _exact(w, r)
    elif method == "gram":
        u, s, v = _gram(w, r)
    elif method == "randomized":
        u, s, v = _randomized(w, r)
    else:
        raise ValueError(f"top_bases: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    u, v = _fix_signs(u, v)
    return Bases(u.to(torch.float32).contiguous(), s.to(torch.float32).contiguous(), v.to(torch.float32).contiguous())


def _check_rank(rank: int) -> int:
    if isinstance(rank, bool) or int(rank) != rank or rank <= 0:
        raise ValueError(f"top_bases: rank must be a positive integer, got {rank!r}")
    return int(rank)


def _check_finite(w: Tensor) -> None:
    if all_finite(w):
        return
    what = "NaN" if torch.isnan(w).any() else "Inf"
    raise ValueError(f"top_bases: weight of shape {tuple(w.shape[1:])} contains {what}")


def _exact(w: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[..., :r], s[..., :r], vh[..., :r, :].transpose(-2, -1)


def _orthonormal_factor(wt_x: Tensor, s: Tensor) -> Tensor:
    """Orthonormal columns spanning wt_x's columns, in order: each column normalised, or a QR where
    that is unsafe.

    wt_x = W^T U (or W V) has orthogonal columns of norms s (float64); their inner products are off by
    ~1e-16 s_max^2, so normalised columns are orthonormal to ~1e-16 (s_max / s_i)^2: used when every
    s_i >= 1e-4 s_max (error <= 1e-8, and no QR to pay). Otherwise a QR (R's diagonal made positive,
    the same normalisation) completes the columns where s is zero instead of dividing by it.
    """
    s_max = s.amax(dim=-1, keepdim=True)
    if bool((s_max > 0).all()) and bool((s >= 1e-4 * s_max).all()):
        return wt_x / torch.linalg.vector_norm(wt_x, dim=-2, keepdim=True)
    with serial_lapack(wt_x):
        q, rr = torch.linalg.qr(wt_x)
    diag = torch.diagonal(rr, dim1=-2, dim2=-1)
    sign = torch.where(diag < 0, -1.0, 1.0).to(q.dtype)
    return q * sign.unsqueeze(-2)


def _gram(w: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    out, n = w.shape[-2:]
    small_side_is_u = out <= n
    if w.device.type == "cpu":
        evecs, evals, other = _top_eigh_cpu(w, r, small_side_is_u)
    else:
        w64 = w.to(torch.float64)
        wt = w64.transpose(-2, -1)
        gram = w64 @ wt if small_side_is_u else wt @ w64
        evals, evecs = torch.linalg.eigh(gram)  # ascending
        evals, evecs = evals.flip(-1)[..., :r], evecs.flip(-1)[..., :r]
        other = wt @ evecs if small_side_is_u else w64 @ evecs
    s = evals.clamp_min(0).sqrt()
    factor = _orthonormal_factor(other, s)
    return (evecs, s, factor) if small_side_is_u else (factor, s, evecs)


def _top_eigh_cpu(w: Tensor, r: int, small_side_is_u: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r eigenpairs (descending) of the smaller Gram matrix of each float32 (out, n) matrix, and
    the other side's unnormalised factor (W^T U or W V), all float64.

    LAPACK through scipy's library (`lapack.py`, GIL released), one thread. At small rank
    (`mixed_gram.mixed_pays`) a float32 Gram and eigensolver, certified by a float64 Rayleigh-Ritz
    step (`mixed_gram`; its products give the other factor too); otherwise, or where its certificate
    fails, the float64 Gram by syrk (half the flops of a matmul) on the transposed view (no copy),
    then only the r wanted eigenpairs by MRRR (dsyevr), which skips the full back-transformation:
    1.5-4x faster than torch's full syevd for the ranks LoRA uses.
    """
    vecs, vals, others = [], [], []
    m, big = min(w.shape[-2:]), max(w.shape[-2:])
    with serial_blas():
        for a32 in w:                               # (out, n)
            got = top_eigh_mixed(a32, r, small_side_is_u) if mixed_pays(m, big, r) else None
            if got is None:
                a64 = a32.to(torch.float64)
                lam, x = top_eigh(gram_upper(a64.numpy(), small_side_is_u), r)
                x = torch.from_numpy(x[:, ::-1].copy())
                got = x, torch.from_numpy(lam[::-1].copy()), (a64.T @ x if small_side_is_u else a64 @ x)
            vecs.append(got[0])
            vals.append(got[1])
            others.append(got[2])
    return torch.stack(vecs), torch.stack(vals), torch.stack(others)


def _test_matrix(batch: int, n: int, k: int, device: torch.device) -> Tensor:
    # Fixed seed, drawn on the CPU: the same weights give the same bases on every device.
    gen = torch.Generator(device="cpu").manual_seed(_SEED)
    return torch.randn(batch, n, k, generator=gen, dtype=torch.float32).to(device)


def _randomized(w: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    out, n = w.shape[-2:]
    m = min(out, n)
    k = min(m, r + max(10, r // 2))
    # Work on the wide orientation so the test matrix lives on the long side.
    a = w if out <= n else w.transpose(-2, -1)
    wt = a.transpose(-2, -1)
    q = torch.linalg.qr(a @ _test_matrix(a.shape[0], a.shape[-1], k, a.device))[0]
    for _ in range(_POWER_ITERS):
        z = torch.linalg.qr(wt @ q)[0]
        q = torch.linalg.qr(a @ z)[0]
    b = (q.transpose(-2, -1) @ a).to(torch.float64)  # (k, long side)
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    left = q.to(torch.float64) @ ub[..., :r]
    right = vh[..., :r, :].transpose(-2, -1)
    s = s[..., :r]
    return (left, s, right) if out <= n else (right, s, left)


def _fix_signs(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each (u_i, v_i) pair so that the largest-|.| entry of u_i is positive."""
    idx = u.abs().argmax(dim=-2, keepdim=True)
    pivot = torch.gather(u, -2, idx)
    sign = torch.where(pivot < 0, -1.0, 1.0).to(u.dtype)
    return u * sign, v * sign.to(v.dtype)



# A LoRA-X file stores V^T in fp16/bf16/fp32: its rounding (residual ~2e-4 fp16, ~1.5e-3 bf16) must pass;
# a claim further off (another checkpoint's subspace, residual 1.5e-2 at 5% full-rank drift) must not.
CLAIMED_RESIDUAL_TOL = 3e-3
_PROBE_COLUMNS = 8
_PROBE_ITERS = 3


def bases_from_claimed_v(w: Tensor, v_claimed: Tensor, tol: float = CLAIMED_RESIDUAL_TOL) -> Bases | None:
    """Top-r bases of `w` from a claimed top-r right subspace (a LoRA-X `down`, transposed), or None.

    No SVD of `w`: a Rayleigh-Ritz step on span(v_claimed) (two products with r columns and an r x r
    eigh). Accepted only if (1) v_claimed is orthonormal to `CLAIMED_RESIDUAL_TOL`, (2) the span is
    invariant under W^T W to that tolerance (||W^T W V - V L||_F <= tol ||L||_F), and (3) a
    fixed-seed random probe deflated against it (block power steps, then Rayleigh-Ritz) finds no direction with more
    energy than the smallest Ritz value, i.e. it is the TOP invariant subspace. The result is as
    accurate as the claim (about the storage rounding of `down`): good for similarities phi, not a
    replacement for `top_bases` where a projection needs 1e-4 (the transfer uses it only for phi).
    So the products with W run in float32 (their rounding, ~1e-6, is far below the tolerance and the
    claim's own rounding); only the r x r problems are float64. `tol` replaces CLAIMED_RESIDUAL_TOL for
    callers that accept only a float32 claim (the network module, resuming from its own file).
    """
    if w.dim() not in (2, 4) or v_claimed.dim() != 2:
        return None
    w32 = w.reshape(w.shape[0], -1).to(torch.float32)
    out, n = w32.shape
    r = v_claimed.shape[1]
    if v_claimed.shape[0] != n or not 0 < r < min(out, n):
        return None
    v = v_claimed.to(device=w32.device, dtype=torch.float32)
    if not all_finite(v) or not all_finite(w32):
        return None
    gram_v = (v.T @ v).to(torch.float64)
    if float((gram_v - torch.eye(r, dtype=torch.float64, device=v.device)).abs().max()) > tol:
        return None
    # orthonormalise by Cholesky-QR: v is orthonormal to 3e-3 already, so one pass is exact to rounding
    # and costs a triangular solve instead of a Householder QR
    with serial_lapack(v):
        chol = torch.linalg.cholesky(gram_v)
        v = torch.linalg.solve_triangular(chol.to(torch.float32), v.T, upper=False).T.contiguous()
    y = w32 @ v                      # (out, r): the one product with all r columns
    with serial_lapack(v):
        lam, c = torch.linalg.eigh((y.T @ y).to(torch.float64))   # ascending Ritz values of W^T W on span(V)
    lam, c = lam.flip(-1), c.flip(-1)
    if float(lam[-1]) <= 1e-12 * max(float(lam[0]), 1e-300):
        return None                  # (nearly) rank-deficient on the span: let top_bases decide
    vr = v @ c.to(torch.float32)
    # invariance residual R = (I - V V^T) W^T W V, sketched with thin products instead of a second full
    # one: E||R G||_F^2 = k ||R||_F^2 for a Gaussian r x k G. A claim from another checkpoint (residual
    # >= 5x the tolerance) passes only if the sketch underestimates 5x: probability ~1e-9 at k = 8; a
    # rounding-only claim (15x below it) never fails
    x = v @ _test_matrix(1, r, _PROBE_COLUMNS, w32.device)[0]
    wx = w32.T @ (w32 @ x)
    resid = float(torch.linalg.norm(wx - v @ (v.T @ wx))) / math.sqrt(_PROBE_COLUMNS)
    if resid > tol * float(torch.linalg.norm(lam)):
        return None
    probe = _test_matrix(1, n, _PROBE_COLUMNS, w32.device)[0]
    for _ in range(_PROBE_ITERS):
        probe = probe - vr @ (vr.T @ probe)
        with serial_lapack(probe):
            probe = torch.linalg.qr(probe)[0]
        probe = w32.T @ (w32 @ probe)
    probe = probe - vr @ (vr.T @ probe)
    with serial_lapack(probe):
        probe = torch.linalg.qr(probe)[0]
        wp = (w32 @ probe).to(torch.float64)
        # block Rayleigh-Ritz: a lower bound of the largest eigenvalue of W^T W outside the span
        top_rest = float(torch.linalg.eigvalsh(wp.T @ wp)[-1])
    if top_rest > float(lam[-1]):
        return None                  # some direction outside the span beats the claimed r-th one
    s = lam.sqrt()
    u = (y @ c.to(torch.float32)) / s.to(torch.float32)
    u, vr = _fix_signs(u, vr)
    return Bases(u.contiguous(), s.to(torch.float32).contiguous(), vr.contiguous())
