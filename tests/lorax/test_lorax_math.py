"""LoRA-X math against independent dense computations (torch.linalg.svd in float64, explicit matrices)."""

from __future__ import annotations

import math

import pytest
import torch

from sd_scripts_lorax.lorax import (Bases, d_from_factors, delta_from_factors, delta_norm, energy_in_subspace,
                                    factors_fit, flatten_weight, lorax_factors, module_similarity, project_factors,
                                    subspace_similarity, top_bases, top_bases_batched)
from sd_scripts_lorax.lorax.bases import choose_method


def decaying(out: int, n: int, seed: int = 0, gap_at: int | None = None, dtype=torch.float32) -> torch.Tensor:
    """A matrix with a realistic, smoothly decaying spectrum (1 .. 1e-3), optionally a gap (x0.4) at gap_at."""
    g = torch.Generator().manual_seed(seed)
    m = min(out, n)
    u = torch.linalg.qr(torch.randn(out, m, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -3, m, dtype=torch.float64)
    if gap_at is not None:
        s[gap_at:] *= 0.4
    return ((u * s) @ v.T).to(dtype)


def dense_reference(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(flatten_weight(w).to(torch.float64), full_matrices=False)
    return u[:, :r], s[:r], vh[:r].T


def proj_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    return float((a @ a.T - b @ b.T).norm() / math.sqrt(a.shape[1]))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------- bases

SHAPES = [(64, 64), (48, 160), (160, 48), (40, 16, 3, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["exact", "gram"])
def test_bases_match_dense_svd(shape, method):
    out, n = shape[0], math.prod(shape[1:])
    w = decaying(out, n, seed=1).reshape(shape)
    r = 12
    b = top_bases(w, r, method)
    u, s, v = dense_reference(w, r)
    assert b.u.shape == (out, r) and b.s.shape == (r,) and b.v.shape == (n, r)
    assert b.u.dtype == b.s.dtype == b.v.dtype == torch.float32
    assert proj_err(b.u, u) < 1e-4 and proj_err(b.v, v) < 1e-4
    assert float((b.s.double() - s).abs().max() / s[0]) < 1e-5
    # orthonormal, and the triplets reproduce W's rank-r part
    eye = torch.eye(r, dtype=torch.float64)
    assert torch.allclose(b.u.double().T @ b.u.double(), eye, atol=1e-5)
    assert torch.allclose(b.v.double().T @ b.v.double(), eye, atol=1e-5)
    assert rel((b.u * b.s) @ b.v.T, (u * s) @ v.T) < 1e-5


@pytest.mark.parametrize("shape", [(320, 320), (256, 1024), (1024, 256)])
def test_gram_tolerance_on_realistic_spectra(shape):
    w = decaying(*shape, seed=2)
    for r in (32, min(shape) // 2, min(shape)):  # partial MRRR (r <= m/4), full syevd above
        b = top_bases(w, r, "gram")
        u, s, v = dense_reference(w, r)
        if r < min(shape):
            assert proj_err(b.u, u) < 1e-4 and proj_err(b.v, v) < 1e-4
        assert float((b.s.double() - s).abs().max() / s[0]) < 1e-5


@pytest.mark.parametrize("shape", [(320, 320), (200, 900), (900, 200)])
def test_randomized_tolerance_with_gap(shape):
    r = 24
    w = decaying(*shape, seed=3, gap_at=r)
    b = top_bases(w, r, "randomized")
    u, s, v = dense_reference(w, r)
    assert proj_err(b.u, u) < 1e-3 and proj_err(b.v, v) < 1e-3
    assert float((b.s.double() - s).abs().max() / s[0]) < 1e-4


def test_randomized_is_deterministic_and_orthonormal_without_gap():
    w = decaying(300, 500, seed=4)
    a, b = top_bases(w, 16, "randomized"), top_bases(w, 16, "randomized")
    assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)
    assert torch.allclose(a.u.T @ a.u, torch.eye(16), atol=1e-5)
    # no gap: still a good subspace (phi near 1), just not to 1e-3
    u, _, _ = dense_reference(w, 16)
    assert subspace_similarity(a.u, u.float()) > 0.95


@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
def test_sign_convention_and_flip_invariance(method):
    w = decaying(80, 120, seed=5, gap_at=8)
    b = top_bases(w, 8, method)
    idx = b.u.abs().argmax(dim=0)
    assert (b.u[idx, torch.arange(8)] > 0).all()
    # the same matrix built from sign-flipped triplets gives the same bases
    b2 = top_bases(w.clone(), 8, method)
    assert torch.equal(b.u, b2.u) and torch.equal(b.v, b2.v)
    # methods agree column by column (not only as subspaces) thanks to the convention
    e = top_bases(w, 8, "exact")
    assert torch.allclose(b.u, e.u, atol=1e-4) and torch.allclose(b.v, e.v, atol=1e-4)


def test_rank_clamped_and_full_rank():
    w = decaying(10, 30, seed=6)
    for method in ("exact", "gram", "randomized"):
        b = top_bases(w, 50, method)
        assert b.rank == 10
        assert rel((b.u * b.s) @ b.v.T, w) < 1e-5


@pytest.mark.parametrize("method", ["exact", "gram", "randomized", "auto"])
@pytest.mark.parametrize("shape", [(8, 20), (20, 8), (6, 2, 3, 3)])
def test_zero_matrix_gives_orthonormal_bases(method, shape):
    b = top_bases(torch.zeros(shape), 4, method)
    assert torch.isfinite(b.u).all() and torch.isfinite(b.v).all()
    assert torch.equal(b.s, torch.zeros(4))
    assert torch.allclose(b.u.T @ b.u, torch.eye(4), atol=1e-6)
    assert torch.allclose(b.v.T @ b.v, torch.eye(4), atol=1e-6)


def test_rank_deficient_matrix_completes_basis():
    w = decaying(30, 40, seed=7)[:, :3] @ torch.randn(3, 40)  # rank 3
    b = top_bases(w, 6, "gram")
    assert torch.allclose(b.u.T @ b.u, torch.eye(6), atol=1e-5)
    assert torch.allclose(b.v.T @ b.v, torch.eye(6), atol=1e-5)
    assert float(b.s[3:].max()) < 1e-4 * float(b.s[0])


def test_bad_inputs():
    w = torch.randn(8, 8)
    for rank in (0, -1, 1.5):
        with pytest.raises(ValueError, match="rank"):
            top_bases(w, rank)
    bad = w.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        top_bases(bad, 2)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="Inf"):
        top_bases(bad, 2)
    with pytest.raises(ValueError, match="method"):
        top_bases(w, 2, "nope")
    with pytest.raises(ValueError):
        top_bases(torch.randn(8), 2)


def test_low_precision_inputs_upcast():
    w = decaying(64, 96, seed=8)
    for dt in (torch.float16, torch.bfloat16):
        b = top_bases(w.to(dt), 8, "gram")
        u, s, _ = dense_reference(w.to(dt).float(), 8)
        assert b.u.dtype == torch.float32
        assert proj_err(b.u, u) < 1e-4


@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
def test_batched_equals_single(method):
    ws = torch.stack([decaying(40, 72, seed=s, gap_at=6) for s in range(3)])
    bb = top_bases_batched(ws, 6, method)
    assert bb.u.shape == (3, 40, 6) and bb.s.shape == (3, 6) and bb.v.shape == (3, 72, 6)
    for i in range(3):
        single = top_bases(ws[i], 6, method)
        assert torch.allclose(bb[i].u, single.u, atol=1e-5) and torch.allclose(bb[i].s, single.s, atol=1e-6)
    conv = torch.randn(2, 12, 4, 3, 3)
    bc = top_bases_batched(conv, 5, method)
    assert bc.v.shape == (2, 36, 5)


def test_auto_choice():
    assert choose_method(320, 2880, 32) == "gram"
    assert choose_method(1280, 11520, 320) == "gram"
    assert choose_method(5000, 6000, 64) == "randomized"
    assert choose_method(5000, 6000, 2000) == "exact"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_matches_cpu():
    w = decaying(128, 256, seed=9, gap_at=16)
    for method in ("exact", "gram", "randomized"):
        c = top_bases(w, 16, method)
        g = top_bases(w.cuda(), 16, method)
        assert g.u.device.type == "cuda"
        assert proj_err(g.u.cpu(), c.u) < 1e-4


# ---------------------------------------------------------------- factors

def random_factors(out: int, cin: int, k: int, conv: tuple[int, int] | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if conv is None:
        return torch.randn(out, k, generator=g), torch.randn(k, cin, generator=g)
    return torch.randn(out, k, 1, 1, generator=g), torch.randn(k, cin, *conv, generator=g)


@pytest.mark.parametrize("conv", [None, (1, 1), (3, 3)])
def test_delta_from_factors_dense(conv):
    up, down = random_factors(20, 6, 4, conv)
    dw = delta_from_factors(up, down, scale=0.5)
    expect = 0.5 * up.reshape(20, 4).double() @ down.reshape(4, -1).double()
    assert dw.shape == ((20, 6) if conv is None else (20, 6, *conv))
    assert rel(flatten_weight(dw), expect) < 1e-6
    with pytest.raises(ValueError, match="rank mismatch"):
        delta_from_factors(up, down[:3])


@pytest.mark.parametrize("conv", [None, (1, 1), (3, 3)])
def test_delta_norm_is_the_dense_norm(conv):
    up, down = random_factors(20, 6, 4, conv, seed=11)
    want = float(torch.linalg.norm(-0.5 * flatten_weight(up).double() @ flatten_weight(down).double()))
    assert delta_norm(up, down, -0.5) == pytest.approx(want, rel=1e-12)
    assert delta_norm(torch.zeros_like(up), down) == 0.0
    with pytest.raises(ValueError, match="rank mismatch"):
        delta_norm(up, down[:3])


def test_delta_norm_in_float32_agrees_with_float64_dense():
    """The transfer report's norms use float32 Gram products: fp16 factors of SD sizes, up to r = 320."""
    g = torch.Generator().manual_seed(0)
    for out_dim, n, r in ((320, 768, 32), (1280, 2880, 320), (64, 64, 4)):
        up, down = torch.randn(out_dim, r, generator=g).half(), torch.randn(r, n, generator=g).half()
        want = float(torch.linalg.norm(0.5 * up.double() @ down.double()))
        assert delta_norm(up, down, 0.5, dtype=torch.float32) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("conv", [None, (1, 1), (3, 3)])
def test_d_from_factors_matches_dense_diag(conv):
    up, down = random_factors(24, 8, 5, conv, seed=1)
    n = 8 * (1 if conv is None else conv[0] * conv[1])
    b = top_bases(decaying(24, n, seed=2).reshape(24, 8, *(conv or ())), 7)
    d = d_from_factors(b.u, b.v, up, down, scale=0.25)
    dense = 0.25 * flatten_weight(up).double() @ flatten_weight(down).double()
    expect = torch.diagonal(b.u.double().T @ dense @ b.v.double())
    assert d.shape == (7,)
    assert rel(d, expect) < 1e-5
    # recovers d exactly from a LoRA-X adapter, and is sign-invariant per pair
    d0 = torch.linspace(-1, 1, 7)
    up_x, down_x = lorax_factors(b, d0, (24, 8, *(conv or (1, 1))) if conv else None)
    assert rel(d_from_factors(b.u, b.v, up_x, down_x), d0) < 1e-5
    flipped = Bases(-b.u, b.s, -b.v)
    assert rel(d_from_factors(flipped.u, flipped.v, up, down, 0.25), expect) < 1e-5


@pytest.mark.parametrize("conv", [None, (1, 1), (3, 3)])
def test_project_factors_is_eq3(conv):
    up, down = random_factors(30, 10, 6, conv, seed=3)
    shape = (30, 10, *(conv or ()))
    bt = top_bases(decaying(30, math.prod(shape[1:]), seed=4).reshape(shape), 8)
    up_t, down_t = project_factors(up, down, bt.u, bt.v, scale=2.0)
    assert up_t.shape == ((30, 8) if conv is None else (30, 8, 1, 1))
    assert down_t.shape == ((8, 10) if conv is None else (8, 10, *conv))
    u, v = bt.u.double(), bt.v.double()
    dw = 2.0 * flatten_weight(up).double() @ flatten_weight(down).double()
    expect = u @ u.T @ dw @ v @ v.T
    got = flatten_weight(delta_from_factors(up_t, down_t))
    assert rel(got, expect) < 1e-5
    # the result lies in the target subspace: projecting again changes nothing (transfer is idempotent)
    up_tt, down_tt = project_factors(up_t, down_t, bt.u, bt.v)
    assert rel(flatten_weight(delta_from_factors(up_tt, down_tt)), got) < 1e-5


@pytest.mark.parametrize("conv", [None, (3, 3)])
def test_energy_in_subspace_dense(conv):
    up, down = random_factors(26, 9, 4, conv, seed=5)
    shape = (26, 9, *(conv or ()))
    b = top_bases(decaying(26, math.prod(shape[1:]), seed=6).reshape(shape), 6)
    u, v = b.u.double(), b.v.double()
    dw = flatten_weight(up).double() @ flatten_weight(down).double()
    expect = float((u @ u.T @ dw @ v @ v.T).norm() / dw.norm())
    got = energy_in_subspace(up, down, b.u, b.v, scale=3.0)
    assert 0 < expect < 1
    assert abs(got - expect) / expect < 1e-6
    # a LoRA-X adapter of these bases has all its energy inside
    up_x, down_x = lorax_factors(b, torch.randn(6), shape if conv else None)
    assert abs(energy_in_subspace(up_x, down_x, b.u, b.v) - 1.0) < 1e-6
    assert energy_in_subspace(torch.zeros_like(up), down, b.u, b.v) == 1.0


def test_lorax_factors_shapes_and_value():
    w = decaying(16, 4 * 9, seed=7).reshape(16, 4, 3, 3)
    b = top_bases(w, 5)
    d = torch.arange(5, dtype=torch.float32)
    up, down = lorax_factors(b, d, w.shape)
    assert up.shape == (16, 5, 1, 1) and down.shape == (5, 4, 3, 3)
    expect = b.u.double() @ torch.diag(d.double()) @ b.v.double().T
    assert rel(flatten_weight(delta_from_factors(up, down)), expect) < 1e-6
    with pytest.raises(ValueError):
        lorax_factors(b, torch.zeros(4))
    with pytest.raises(ValueError):
        lorax_factors(b, d, (16, 4, 1, 1))


def test_conv_delta_acts_like_conv():
    """A 3x3 LoRA as conv(down) then 1x1 conv(up) equals one conv with delta_from_factors."""
    up, down = random_factors(7, 3, 2, (3, 3), seed=8)
    x = torch.randn(1, 3, 9, 9)
    two_step = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, padding=1), up)
    one_step = torch.nn.functional.conv2d(x, delta_from_factors(up, down), padding=1)
    assert rel(one_step, two_step) < 1e-5


# ---------------------------------------------------------------- similarity

def test_similarity_identical_random_orthogonal_and_signs():
    g = torch.Generator().manual_seed(0)
    n, r = 400, 8
    q = torch.linalg.qr(torch.randn(n, 3 * r, generator=g))[0]
    a, b, c = q[:, :r], q[:, r:2 * r], q[:, 2 * r:]
    assert abs(subspace_similarity(a, a) - 1.0) < 1e-6
    assert subspace_similarity(a, b) < 1e-10
    assert abs(subspace_similarity(a, a * torch.tensor([1.0, -1] * (r // 2))) - 1.0) < 1e-6
    # random subspaces: expectation r / n
    vals = [subspace_similarity(a, torch.linalg.qr(torch.randn(n, r, generator=g))[0]) for _ in range(20)]
    mean = sum(vals) / len(vals)
    assert 0.5 * r / n < mean < 1.5 * r / n
    # different r: divides by the smaller one, so a subset is 1
    assert abs(subspace_similarity(q[:, :4], a) - 1.0) < 1e-6
    # rotation inside the span does not change it
    rot = torch.linalg.qr(torch.randn(r, r, generator=g))[0]
    assert abs(subspace_similarity(a, a @ rot) - 1.0) < 1e-5
    assert abs(subspace_similarity(a, c) - 0.0) < 1e-10
    with pytest.raises(ValueError):
        subspace_similarity(a, torch.randn(n + 1, r))


def test_module_similarity_dense():
    w = decaying(60, 90, seed=1)
    b = top_bases(w, 10)
    s = module_similarity(b, top_bases(w.clone(), 10, "exact"))
    assert abs(s.phi - 1.0) < 1e-5
    w2 = w + 0.05 * torch.randn(60, 90, generator=torch.Generator().manual_seed(2)) / 90 ** 0.5
    b2 = top_bases(w2, 10)
    s2 = module_similarity(b, b2)
    expect_u = float((b.u.double().T @ b2.u.double()).norm() ** 2 / 10)
    expect_v = float((b.v.double().T @ b2.v.double()).norm() ** 2 / 10)
    assert abs(s2.phi_u - expect_u) < 1e-9 and abs(s2.phi_v - expect_v) < 1e-9
    assert s2.phi == min(s2.phi_u, s2.phi_v) and abs(s2.phi - min(expect_u, expect_v)) < 1e-9 and s2.phi < 1.0


def test_serial_lapack_restores_threads_and_keeps_results():
    from sd_scripts_lorax.lorax.bases import serial_lapack

    w = decaying(96, 80, seed=5)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        b = top_bases(w, 8, "gram")
        assert torch.get_num_threads() == 2  # restored after the eigh/QR ran on one thread
        with pytest.raises(RuntimeError):
            with serial_lapack(w):
                assert torch.get_num_threads() == 1
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 2  # restored on errors too
    finally:
        torch.set_num_threads(before)
    u, s, v = dense_reference(w, 8)
    assert proj_err(b.u, u) < 1e-4 and proj_err(b.v, v) < 1e-4


def test_bases_from_worker_threads_equal_serial_and_blas_limit_is_restored():
    """Callers compute several weights side by side (one torch thread each): same bits as one by one,
    and scipy's BLAS gets its own thread count back when the last worker leaves."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    from sd_scripts_lorax.lorax.lapack import serial_blas

    ws = [decaying(160, 120 + 8 * i, seed=10 + i) for i in range(6)]
    serial = [top_bases(w, 12, "gram") for w in ws]
    before = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(3) as pool:
            side_by_side = list(pool.map(lambda w: top_bases(w, 12, "gram"), ws))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(serial, side_by_side):
        assert torch.equal(a.u, b.u) and torch.equal(a.s, b.s) and torch.equal(a.v, b.v)
    with serial_blas():
        inside = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
        assert set(inside.values()) <= {1}
    after = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    assert after == before


# ---------------------------------------------------------------- bases from a claimed subspace (LoRA-X down)


def test_claimed_top_subspace_is_accepted_at_storage_precision():
    from sd_scripts_lorax.lorax.bases import bases_from_claimed_v

    for shape, dtype in (((96, 80), torch.float16), ((40, 16, 3, 3), torch.bfloat16), ((64, 160), torch.float32)):
        out, n = shape[0], math.prod(shape[1:])
        w = decaying(out, n, seed=7).reshape(shape)
        r = 10
        u, s, v = dense_reference(w, r)
        stored_v = v.to(dtype).float()  # what a LoRA-X file holds (down = V^T), rounded
        b = bases_from_claimed_v(w, stored_v)
        assert b is not None, (shape, dtype)
        assert b.u.shape == (out, r) and b.v.shape == (n, r) and b.s.shape == (r,)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert proj_err(b.u, u) < tol and proj_err(b.v, v) < tol
        assert float((b.s.double() - s).abs().max() / s[0]) < tol
        # phi against another subspace agrees with the one from exact bases
        other = top_bases(decaying(out, n, seed=8).reshape(shape) * 0.2 + w, r)
        want = module_similarity(Bases(u.float(), s.float(), v.float()), other).phi
        assert abs(module_similarity(b, other).phi - want) < (1e-6 if dtype == torch.float32 else 5e-3)


def test_claimed_subspace_checks_refuse_wrong_claims():
    from sd_scripts_lorax.lorax.bases import bases_from_claimed_v

    w = decaying(96, 80, seed=9)
    u, s, v = torch.linalg.svd(w.double(), full_matrices=False)
    r = 8
    g = torch.Generator().manual_seed(0)
    # an invariant subspace, but not the top one: only the deflated probe can tell
    assert bases_from_claimed_v(w, vh_rows(v, slice(r, 2 * r))) is None
    # one top direction swapped for the (r+1)-th: invariant, energy slightly short
    idx = list(range(r - 1)) + [r]
    assert bases_from_claimed_v(w, vh_rows(v, idx)) is None
    # a random orthonormal down (a plain LoRA), and a non-orthonormal one
    assert bases_from_claimed_v(w, torch.linalg.qr(torch.randn(80, r, generator=g))[0]) is None
    assert bases_from_claimed_v(w, vh_rows(v, slice(0, r)) * 1.5) is None
    # the top subspace of a drifted weight (a file trained on another checkpoint)
    drifted = w + 0.05 * w.norm() * decaying(96, 80, seed=10) / decaying(96, 80, seed=10).norm()
    assert bases_from_claimed_v(w, dense_reference(drifted, r)[2].float()) is None
    # shapes that do not fit, and full rank (nothing to claim)
    assert bases_from_claimed_v(w, torch.zeros(81, r)) is None
    assert bases_from_claimed_v(w, vh_rows(v, slice(0, 80))) is None
    assert bases_from_claimed_v(w, vh_rows(v, slice(0, r))) is not None


def vh_rows(vh: torch.Tensor, idx) -> torch.Tensor:
    """Rows `idx` of V^T as an (n, k) float32 V."""
    return vh[idx].T.float().contiguous()


def test_factors_fit_rules():
    assert factors_fit((640, 4), (4, 320), (640, 320))                  # Linear
    assert factors_fit((640, 4, 1, 1), (4, 320, 1, 1), (640, 320))      # 1x1-conv LoRA on a Linear (SD2 proj_in)
    assert factors_fit((640, 4), (4, 320), (640, 320, 1, 1))            # Linear LoRA on a 1x1 conv
    assert factors_fit((640, 4, 1, 1), (4, 320, 3, 3), (640, 320, 3, 3))
    assert not factors_fit((640, 4), (4, 320), (640, 320, 3, 3))        # pointwise LoRA on a 3x3 conv
    assert not factors_fit((640, 4), (4, 321), (640, 320))
    assert not factors_fit((641, 4), (4, 320), (640, 320))
    assert not factors_fit((640, 5), (4, 320), (640, 320))
