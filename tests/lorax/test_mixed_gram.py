"""The CPU "gram" method's mixed-precision path (float32 Gram + eigensolver, certified in float64)
against a dense float64 SVD, its fallback where the spectrum is degenerate at r, and its pieces."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sd_scripts_lorax.lorax import bases as bases_mod
from sd_scripts_lorax.lorax import mixed_gram, top_bases
from sd_scripts_lorax.lorax.lapack import gram_upper, serial_blas, top_eigh


def spectrum_matrix(out: int, n: int, s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = min(out, n)
    u = torch.linalg.qr(torch.randn(out, m, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))[0]
    return ((u * s) @ v.T).to(torch.float32)


def flat(out: int, n: int, seed: int = 0) -> torch.Tensor:
    """Like a freshly initialised layer: uniform entries, a flat (Marchenko-Pastur) spectrum."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(out, n, generator=g) * 2 - 1) / math.sqrt(n)


def proj_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a @ a.T - b @ b.T).norm() / math.sqrt(a.shape[1]))


def mixed(w: torch.Tensor, r: int):
    with serial_blas():
        return mixed_gram.top_eigh_mixed(w, r, w.shape[0] <= w.shape[1])


def float64_only(monkeypatch, w: torch.Tensor, r: int):
    with monkeypatch.context() as mp:
        mp.setattr(bases_mod, "mixed_pays", lambda m, big, r: False)
        return top_bases(w, r, "gram")


@pytest.mark.parametrize("shape", [(512, 1536), (1536, 512), (768, 768)])
@pytest.mark.parametrize("spectrum", ["decaying", "flat"])
def test_mixed_path_is_taken_and_meets_the_gram_tolerances(shape, spectrum):
    out, n = shape
    m = min(shape)
    w = spectrum_matrix(out, n, torch.logspace(0, -3, m, dtype=torch.float64), seed=1) if spectrum == "decaying" \
        else flat(out, n, seed=1)
    r = 8
    assert mixed_gram.mixed_pays(m, max(shape), r)
    assert mixed(w, r) is not None, "the certificate should hold away from degeneracy"
    b = top_bases(w, r, "gram")
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    assert proj_err(b.u, u[:, :r]) < 1e-4 and proj_err(b.v, vh[:r].T) < 1e-4
    assert float((b.s.double() - s[:r]).abs().max() / s[0]) < 1e-5
    eye = torch.eye(r, dtype=torch.float64)
    assert torch.allclose(b.u.double().T @ b.u.double(), eye, atol=1e-6)
    assert torch.allclose(b.v.double().T @ b.v.double(), eye, atol=1e-6)
    assert torch.equal(top_bases(w, r, "gram").u, b.u)        # deterministic


def test_degenerate_at_r_falls_back_to_the_float64_bits(monkeypatch):
    """Singular values r and r+1 equal: no subspace to certify; the float64 path's exact bits come back."""
    s = torch.logspace(0, -2, 600, dtype=torch.float64)
    s[7] = s[8] = s[7]
    w = spectrum_matrix(600, 900, s, seed=2)
    assert mixed(w, 8) is None
    assert torch.equal(top_bases(w, 8, "gram").v, float64_only(monkeypatch, w, 8).v)


def test_mixed_and_float64_paths_agree(monkeypatch):
    w = spectrum_matrix(640, 2560, torch.logspace(0, -3, 640, dtype=torch.float64), seed=3)
    a, b = top_bases(w, 16, "gram"), float64_only(monkeypatch, w, 16)
    assert proj_err(a.u, b.u) < 1e-4 and proj_err(a.v, b.v) < 1e-4
    assert float((a.s - b.s).abs().max() / b.s[0]) < 1e-5


def test_mixed_pays_rules():
    assert mixed_gram.mixed_pays(1280, 1280, 4) and mixed_gram.mixed_pays(1280, 1280, 32)
    assert not mixed_gram.mixed_pays(1280, 1280, 64)   # k = 80 > 1280 / 20: the float64 steps cost too much
    assert mixed_gram.mixed_pays(1280, 10240, 32) and not mixed_gram.mixed_pays(1280, 10240, 48)  # p = 24
    assert not mixed_gram.mixed_pays(320, 320, 4)      # small: the float64 path takes milliseconds
    assert not mixed_gram.mixed_pays(1280, 1280, 0)


@pytest.mark.parametrize("make", [lambda: flat(512, 2048, seed=4),
                                  lambda: spectrum_matrix(512, 2048, torch.logspace(0, -3, 512), seed=4)])
def test_outside_bound_covers_the_float32_rounding(make):
    """The rounding-error estimate behind the Weyl bound exceeds the true ||G - G32||_2."""
    a = make().numpy()
    with serial_blas():
        g32 = gram_upper(np.ascontiguousarray(a), True)
        g64 = gram_upper(np.ascontiguousarray(a.astype(np.float64)), True)
        lam, x = top_eigh(g32.copy(order="F"), 16)
    sym = lambda g: np.triu(g) + np.triu(g, 1).T  # noqa: E731
    e = sym(g64) - sym(g32).astype(np.float64)
    bound = mixed_gram._outside_bound(lam, torch.from_numpy(e @ x.astype(np.float64)))
    assert bound - float(lam[0]) >= np.linalg.norm(e, 2)


def test_float32_lapack_routines_match_numpy():
    a = flat(200, 300, seed=5).numpy()
    with serial_blas():
        g = gram_upper(np.ascontiguousarray(a), False)
        assert g.dtype == np.float32
        dense = a.T.astype(np.float64) @ a.astype(np.float64)
        assert np.allclose(np.triu(g), np.triu(dense), atol=1e-5 * np.abs(dense).max())
        lam, x = top_eigh(g, 5)
    ref = np.linalg.eigvalsh(dense)[-5:]
    assert lam.dtype == np.float32 and np.allclose(lam, ref, rtol=1e-5)
    assert np.allclose(np.abs(x.T.astype(np.float64) @ dense @ x) - np.diag(ref), 0, atol=1e-4 * ref[-1])
