"""Loss math against independent hand computations: schedule, SNR, min-SNR weights, targets, offset."""

from __future__ import annotations

import math

import torch

from sd_scripts_lorax.train.loss import (all_snr, diffusion_loss, make_noise_scheduler, min_snr_weights,
                                         sample_noise, target_for)


def _alpha_bar(t: int) -> float:
    """scaled_linear betas 0.00085 -> 0.012 over 1000 steps, computed by hand in float64."""
    b0, b1 = math.sqrt(0.00085), math.sqrt(0.012)
    prod = 1.0
    for i in range(t + 1):
        beta = (b0 + (b1 - b0) * i / 999) ** 2
        prod *= 1 - beta
    return prod


def test_schedule_and_snr_match_hand_computation():
    sched = make_noise_scheduler()
    assert sched.config.clip_sample is False and sched.config.num_train_timesteps == 1000
    snr = all_snr(sched)
    for t in (0, 10, 500, 999):
        ab = _alpha_bar(t)
        assert math.isclose(float(snr[t]), ab / (1 - ab), rel_tol=2e-4)


def test_min_snr_weights_eps_and_v():
    snr = torch.tensor([0.1, 1.0, 5.0, 20.0, 400.0])
    g = 5.0
    eps = [min(s, g) / s for s in snr.tolist()]
    v = [min(s, g) / (s + 1) for s in snr.tolist()]
    assert torch.allclose(min_snr_weights(snr, g, False), torch.tensor(eps))
    assert torch.allclose(min_snr_weights(snr, g, True), torch.tensor(v))
    # hand values: eps weight 1 below gamma, gamma/snr above; v weight snr/(snr+1) below
    assert min_snr_weights(torch.tensor([20.0]), 5.0, False).item() == 0.25
    assert math.isclose(min_snr_weights(torch.tensor([1.0]), 5.0, True).item(), 0.5)


def test_loss_weighting_per_sample():
    sched = make_noise_scheduler()
    snr = all_snr(sched)
    t = torch.tensor([10, 900])
    pred = torch.zeros(2, 4, 8, 8)
    target = torch.ones(2, 4, 8, 8) * torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)  # per-sample MSE 1 and 4
    lw = torch.tensor([1.0, 0.5])
    plain = diffusion_loss(pred, target, t, lw, snr, None, False)
    assert math.isclose(plain.item(), (1 * 1.0 + 4 * 0.5) / 2, rel_tol=1e-6)
    s = snr[t].tolist()
    w_eps = [min(x, 5) / x for x in s]
    got = diffusion_loss(pred, target, t, lw, snr, 5.0, False).item()
    assert math.isclose(got, (1 * w_eps[0] + 2 * w_eps[1]) / 2, rel_tol=1e-5)
    w_v = [min(x, 5) / (x + 1) for x in s]
    got_v = diffusion_loss(pred, target, t, lw, snr, 5.0, True).item()
    assert math.isclose(got_v, (1 * w_v[0] + 2 * w_v[1]) / 2, rel_tol=1e-5)


def test_v_target_and_noise_offset():
    sched = make_noise_scheduler()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 400, 999])
    ab = torch.tensor([_alpha_bar(int(i)) for i in t]).view(3, 1, 1, 1).float()
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    assert torch.allclose(target_for(sched, x0, eps, t, True), v, atol=1e-4)
    assert torch.equal(target_for(sched, x0, eps, t, False), eps)
    a = sample_noise(x0, None, torch.Generator().manual_seed(1))
    b = sample_noise(x0, 0.1, torch.Generator().manual_seed(1))
    diff = b - a  # the offset is constant over each (sample, channel) plane
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff))
    assert diff.abs().max() > 0
