"""Diffusion training math: noise schedule, noising, targets, min-SNR weights, the loss. No I/O."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def make_noise_scheduler() -> DDPMScheduler:
    """The scheduler kohya trains with (SD1/2 and SDXL alike)."""
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, clip_sample=False)


def all_snr(scheduler: DDPMScheduler) -> torch.Tensor:
    """SNR_t = alpha_bar_t / (1 - alpha_bar_t) for every training timestep."""
    ac = scheduler.alphas_cumprod.double()
    return (ac / (1.0 - ac)).float()


def min_snr_weights(snr_t: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Per-sample min-SNR-gamma weights: eps min(SNR, g)/SNR; v min(SNR, g)/(SNR + 1)."""
    clipped = torch.minimum(snr_t, torch.full_like(snr_t, gamma))
    return clipped / (snr_t + 1.0) if v_prediction else clipped / snr_t


def sample_noise(latents: torch.Tensor, noise_offset: float | None, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise, plus `noise_offset * N(0, 1)` per (sample, channel) when asked."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, dtype=torch.float32)
        noise = noise + noise_offset * offset.to(latents.device, latents.dtype)
    return noise


def sample_timesteps(batch: int, generator: torch.Generator, num_timesteps: int = 1000) -> torch.Tensor:
    return torch.randint(0, num_timesteps, (batch,), generator=generator, dtype=torch.long)


def target_for(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               v_prediction: bool) -> torch.Tensor:
    return scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, loss_weights: torch.Tensor,
                   snr: torch.Tensor, min_snr_gamma: float | None, v_prediction: bool) -> torch.Tensor:
    """kohya's order: per-element MSE in fp32 -> mean over non-batch dims -> x loss_weights
    -> x min-SNR weights -> batch mean."""
    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, loss.ndim))) * loss_weights.to(loss.device)
    if min_snr_gamma:
        loss = loss * min_snr_weights(snr.to(loss.device)[timesteps.to(loss.device)], min_snr_gamma, v_prediction)
    return loss.mean()
