"""lorax/warm_bases.py: warm-started target bases against the exact ones, on drifted fixtures."""

from __future__ import annotations

import math

import pytest
import torch

from sd_scripts_lorax.lorax import top_bases
from sd_scripts_lorax.lorax import warm_bases as wb
from sd_scripts_lorax.testing.fixture_math import decaying_matrix, drift_tensor


def _proj_dist(a: torch.Tensor, b: torch.Tensor) -> float:
    """||P_a - P_b||_F / sqrt(r), computed as sqrt(2) ||(I - P_a) b||_F / sqrt(r) in float64 on
    re-orthonormalised columns (the r - ||a^T b||^2 form loses everything below ~1e-4 to rounding)."""
    a = torch.linalg.qr(a.double())[0]
    b = torch.linalg.qr(b.double())[0]
    return math.sqrt(2.0) * float(torch.linalg.norm(b - a @ (a.T @ b))) / math.sqrt(a.shape[1])


def _pair(out: int, n: int, drift: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fp16 "source" with a decaying spectrum and its drifted "fine-tune" (bench_transfer's recipe)."""
    g = torch.Generator().manual_seed(seed)
    src = decaying_matrix(out, n, g).half()
    return src, drift_tensor(src, drift, f"w{out}x{n}", seed + 1)


def _assert_like_exact(b, w: torch.Tensor, r: int) -> None:
    exact = top_bases(w, r, "exact")
    gram = top_bases(w, r, "gram")
    assert b.u.dtype == b.s.dtype == b.v.dtype == torch.float32
    assert b.u.shape == exact.u.shape and b.v.shape == exact.v.shape and b.s.shape == exact.s.shape
    for ref in (exact, gram):   # the tolerances stated in lorax/bases.py
        assert _proj_dist(b.u, ref.u) < 1e-4
        assert _proj_dist(b.v, ref.v) < 1e-4
        assert float((b.s - ref.s).abs().max()) < 1e-5 * float(ref.s[0])
    # sign convention: the largest-|.| entry of every u column is positive, v flipped with it
    pivots = b.u.gather(0, b.u.abs().argmax(dim=0, keepdim=True))
    assert bool((pivots > 0).all())
    w2 = w.reshape(w.shape[0], -1).double()
    assert torch.allclose(w2 @ b.v.double(), b.u.double() * b.s.double(), atol=1e-4 * float(b.s[0]))


@pytest.mark.parametrize("drift", [0.01, 0.05, 0.2])
def test_warm_start_matches_exact_on_drifted_fixtures(drift):
    src, tgt = _pair(192, 160, drift)
    r = 12
    v_src = top_bases(src, r).v.half().float()      # what a LoRA-X file stores: V^T in fp16
    b = wb.warm_top_bases(tgt, r, v_src)
    assert b is not None, f"drift {drift}: the certificate should hold"
    _assert_like_exact(b, tgt.float(), r)


def test_columns_match_exact_where_the_spectrum_is_separated():
    """With well-separated singular values each column is unique: warm and exact agree column by column."""
    g = torch.Generator().manual_seed(3)
    out, n, r = 96, 80, 8
    u = torch.linalg.qr(torch.randn(out, n, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    s = 0.8 ** torch.arange(n, dtype=torch.float32)
    w = (u * s) @ v.T
    start = torch.linalg.qr(v[:, :r] + 0.05 * torch.randn(n, r, generator=g))[0]
    b = wb.warm_top_bases(w, r, start)
    assert b is not None
    ex = top_bases(w, r, "exact")
    assert torch.allclose(b.u, ex.u, atol=1e-4) and torch.allclose(b.v, ex.v, atol=1e-4)
    assert torch.allclose(b.s, ex.s, rtol=1e-5)


def test_conv_weight_and_short_start():
    """4-D weights are flattened like top_bases; a start with fewer columns than r is topped up."""
    g = torch.Generator().manual_seed(5)
    w = decaying_matrix(48, 16 * 9, g).reshape(48, 16, 3, 3)
    r = 6
    start = top_bases(w, r).v[:, :3]
    b = wb.warm_top_bases(w, r, start)
    assert b is not None
    _assert_like_exact(b, w, r)


def test_deterministic():
    src, tgt = _pair(128, 128, 0.05, seed=7)
    v = top_bases(src, 8).v
    a, b = wb.warm_top_bases(tgt, 8, v), wb.warm_top_bases(tgt, 8, v)
    assert a is not None and b is not None
    assert torch.equal(a.u, b.u) and torch.equal(a.s, b.s) and torch.equal(a.v, b.v)


def test_unrelated_start_still_converges_or_falls_back():
    """A start from another checkpoint costs iterations; the result is exact or None, never wrong."""
    src, _ = _pair(128, 96, 0.0, seed=11)
    other, _ = _pair(128, 96, 0.0, seed=12)
    r = 8
    b = wb.warm_top_bases(src, r, top_bases(other, r).v)
    if b is not None:
        _assert_like_exact(b, src.float(), r)


def test_falls_back_when_it_cannot_certify():
    """A nearly flat spectrum (gaps ~1e-4 s_max everywhere) gives subspace iteration nothing to converge
    on: the certificate fails, warm_top_bases gives None and bases_warm_or_exact the exact path's bits."""
    g = torch.Generator().manual_seed(13)
    out, n, r = 160, 128, 16
    u = torch.linalg.qr(torch.randn(out, n, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    s = 1.0 - 1e-4 * torch.arange(n, dtype=torch.float32)
    w = (u * s) @ v.T
    start = torch.linalg.qr(torch.randn(n, r, generator=g))[0]
    assert wb.warm_top_bases(w, r, start) is None
    b, warm = wb.bases_warm_or_exact(w, r, start)
    assert not warm
    exact = top_bases(w, r)
    assert torch.equal(b.u, exact.u) and torch.equal(b.v, exact.v) and torch.equal(b.s, exact.s)


def test_bad_inputs_give_none():
    w = torch.randn(32, 24)
    v = torch.linalg.qr(torch.randn(24, 4))[0]
    assert wb.warm_top_bases(w, 24, torch.linalg.qr(torch.randn(24, 24))[0]) is None   # full rank
    assert wb.warm_top_bases(w, 4, torch.randn(20, 4)) is None                          # wrong n
    assert wb.warm_top_bases(torch.randn(32), 4, v) is None                             # not a matrix
    bad = w.clone()
    bad[0, 0] = float("nan")
    assert wb.warm_top_bases(bad, 4, v) is None
    assert wb.warm_top_bases(w, 4, torch.full((24, 4), float("inf"))) is None


def test_certificate_bounds():
    """The bound is 0 for exact eigenpairs, grows with the residual, and is inf without a gap."""
    theta = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    zero = torch.zeros(4, dtype=torch.float64)
    assert wb.certificate(theta, zero, 2) == (0.0, 0.0)
    proj, sing = wb.certificate(theta, torch.full((4,), 1e-6, dtype=torch.float64), 2)
    # lambda_3 <= 1 + 1e-6: gaps 3 and 1; sqrt(2 (1e-12/9 + 1e-12/1) / 2)
    assert proj == pytest.approx(math.sqrt(1e-12 / 9 + 1e-12), rel=1e-4)
    assert sing == pytest.approx(1e-6 / math.sqrt(2.0) / 2.0, rel=1e-6)
    # a flat spectrum: only the documented gap (1e-3 s_max) is assumed, so residuals near it fail
    flat = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert wb.certificate(flat, torch.full((4,), 1e-3, dtype=torch.float64), 2)[0] > 1.0
    assert wb.certificate(flat, torch.full((4,), 1e-2, dtype=torch.float64), 2)[0] == math.inf


def test_warm_start_pays_only_where_measured():
    assert wb.warm_start_pays(1280, 1280, 32)
    assert not wb.warm_start_pays(1280, 1280, 320)       # k = 960: the dense eigensolver is cheaper
    assert not wb.warm_start_pays(10240, 1280, 32)       # tall: syrk is cheap next to the block steps
    assert not wb.warm_start_pays(320, 320, 32)          # small: the eigensolver is cheap
    assert not wb.warm_start_pays(1280, 1280, 1280)
    b, warm = wb.bases_warm_or_exact(torch.randn(40, 30), 4, torch.linalg.qr(torch.randn(30, 4))[0])
    assert not warm                                      # not worth it: the exact path
