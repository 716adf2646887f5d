"""Training loops for the embedded model pair (tensors in, tensors out; no file I/O).

The VAE is trained as an autoencoder (L1 + MSE reconstruction, small KL), then its latent scale is
calibrated so that `scaling_factor * latent` has unit standard deviation (how SD's 0.18215 was
chosen; here the VAE is reparametrised to fit the fixed SD1 factor). The UNet (and, for the
source, the text encoder) is trained with the standard DDPM epsilon-prediction loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .concepts import sample_scene
from .render import render_scene

Progress = Callable[[str, int, int, float], None]  # (phase, step, total, loss)


def make_images(distribution: str, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n rendered scenes of `distribution` as a (n, 3, 64, 64) tensor in [-1, 1], and their captions."""
    rng = np.random.default_rng([seed, 0x5CE])
    scenes = [sample_scene(rng, distribution) for _ in range(n)]
    return to_tensor([render_scene(s) for s in scenes]), [s.caption() for s in scenes]


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def _lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


# ---------------------------------------------------------------- VAE

def train_vae(vae, images: torch.Tensor, steps: int, batch: int = 16, lr: float = 1e-3,
              kl_weight: float = 1e-6, seed: int = 0, progress: Progress | None = None) -> list[float]:
    """Train `vae` in place on `images`; returns the reconstruction loss (MSE) of each step."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # latent sampling inside diffusers uses the global generator
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_at(s, steps, 30))
    vae.train()
    losses = []
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        mse = F.mse_loss(rec, x)
        loss = mse + F.l1_loss(rec, x) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(mse.item())
        if progress:
            progress("vae", step, steps, losses[-1])
    vae.eval()
    return losses


@torch.no_grad()
def vae_recon_mse(vae, images: torch.Tensor, batch: int = 64) -> float:
    """Mean squared reconstruction error through the latent mean (images in [-1, 1])."""
    err = 0.0
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        err += float(F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x, reduction="sum"))
    return err / images.numel()


@torch.no_grad()
def calibrate_latent_scale(vae, images: torch.Tensor) -> float:
    """Rescale the latent space so that `scaling_factor * latent` has unit std; returns the factor c.

    z -> c z is exact: quant_conv's mean rows and bias are multiplied by c (log-variance bias + 2 ln c)
    and post_quant_conv's weight is divided by c, so decode(c z) == old decode(z).
    """
    mean, _ = encode_latents(vae, images)
    c = 1.0 / (float(mean.std()) * vae.config.scaling_factor)
    lc = vae.config.latent_channels
    qc, pq = vae.quant_conv, vae.post_quant_conv
    qc.weight[:lc] *= c
    qc.bias[:lc] *= c
    qc.bias[lc:] += 2 * math.log(c)
    pq.weight /= c
    return c


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of each image (unscaled latents)."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(images[i:i + batch]).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------- diffusion

@dataclass
class LatentData:
    """Cached VAE posteriors and token ids of one image set."""

    mean: torch.Tensor   # (N, 4, 8, 8), unscaled
    std: torch.Tensor
    ids: torch.Tensor    # (N, 77)
    scaling: float

    def __len__(self) -> int:
        return len(self.ids)

    def sample(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        eps = torch.randn(self.mean[idx].shape, generator=gen)
        return (self.mean[idx] + self.std[idx] * eps) * self.scaling


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _eps_loss(unet, te, latents, ids, noise, t, scheduler) -> torch.Tensor:
    noisy = scheduler.add_noise(latents, noise, t)
    cond = te(ids)[0]
    return F.mse_loss(unet(noisy, t, cond).sample.float(), noise.float())


def train_denoiser(unet, te, data: LatentData, scheduler, steps: int, batch: int = 16, lr: float = 1e-3,
                   weight_decay: float = 0.01, train_te: bool = True, seed: int = 0,
                   phase: str = "unet", progress: Progress | None = None) -> list[float]:
    """Train `unet` (and `te` if train_te) in place with the DDPM epsilon loss; returns per-step losses."""
    gen = torch.Generator().manual_seed(seed)
    params = list(unet.parameters()) + (list(te.parameters()) if train_te else [])
    te.requires_grad_(train_te)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_at(s, steps, max(1, steps // 20)))
    unet.train()
    te.train(train_te)
    n_t = scheduler.config.num_train_timesteps
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        lat = data.sample(idx, gen)
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, n_t, (batch,), generator=gen)
        loss = _eps_loss(unet, te, lat, data.ids[idx], noise, t, scheduler)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress:
            progress(phase, step, steps, losses[-1])
    unet.eval()
    te.eval()
    te.requires_grad_(True)
    return losses


@torch.no_grad()
def eval_denoise_loss(unet, te, data: LatentData, scheduler, seed: int = 1234, batch: int = 64) -> float:
    """The epsilon loss on `data` with fixed noise and evenly spread timesteps (comparable across models)."""
    gen = torch.Generator().manual_seed(seed)
    n_t = scheduler.config.num_train_timesteps
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        idx = torch.arange(i, min(i + batch, len(data)))
        lat = data.sample(idx, gen)
        noise = torch.randn(lat.shape, generator=gen)
        t = (torch.arange(len(idx)) * 997 + i * 131) % n_t  # spread over the whole schedule
        total += float(_eps_loss(unet, te, lat, data.ids[idx], noise, t, scheduler)) * len(idx)
        count += len(idx)
    return total / count
