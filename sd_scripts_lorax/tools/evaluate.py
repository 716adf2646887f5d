"""How well an adapter does on a base model: the metrics of `make demo` and benchmarks/reproduce.py.

- `load_variant(model_dir, lora)`: a diffusers folder with an optional kohya LoRA(-X) file folded in
  through our own network (`create_network_from_weights` + `merge_to` with the file's weights, which
  adds `multiplier * up @ down * alpha/r` exactly, for LoRA-X and plain LoRA files alike). One
  function for every variant, so "copied as is" really is the source update added to the target.
- `make_eval_set`: a fixed set of (latent, noise, timestep, caption) quadruples from held-out images.
- `noise_predictions`, `denoising_loss`: the epsilon-prediction loss on that fixed set.
- `improvement_share`, `change_cosine`, `change_relative_mse`: comparisons with a reference adapter.

Only paths the caller passes are read; nothing is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..network.lorax_network import create_network_from_weights


@dataclass
class Variant:
    """A base model with (or without) an adapter merged into its weights, in float32, eval mode."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    vae: torch.nn.Module
    lora: Path | None


def load_variant(model_dir: str | Path, lora: str | Path | None = None, multiplier: float = 1.0) -> Variant:
    """Load a diffusers SD1/2 folder in float32 and merge `lora` (if given) into its weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer


    model_dir = Path(model_dir)
    # float32 whatever the folder stores: transformers 5 would otherwise keep an fp16 text encoder
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=torch.float32)
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=torch.float32)
    tok = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    for m in (unet, te, vae):
        m.requires_grad_(False)
        m.eval()
    if lora is not None:
        net, weights = create_network_from_weights(multiplier, lora, vae, te, unet, for_inference=True)
        net.merge_to(te, unet, weights)
    return Variant(unet, te, tok, vae, Path(lora) if lora is not None else None)


@dataclass
class EvalSet:
    """Fixed inputs of the denoising loss: the same for every variant, so losses are comparable."""

    latents: torch.Tensor    # (N, C, h, w), already times the VAE scaling factor
    noise: torch.Tensor      # (N, C, h, w)
    timesteps: torch.Tensor  # (N,) int64
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def spread_timesteps(n: int, num_train_timesteps: int = 1000, repeats: int = 1) -> torch.Tensor:
    """`repeats` timesteps per item, evenly spaced over the schedule and interleaved across items."""
    k = n * repeats
    t = ((torch.arange(k, dtype=torch.float64) + 0.5) * num_train_timesteps / k).long()
    # item i gets timesteps i, i+n, i+2n, ... of the sorted list: every item sees low and high noise
    return t.reshape(repeats, n).t().reshape(-1) if repeats > 1 else t


@torch.no_grad()
def make_eval_set(vae: torch.nn.Module, images: torch.Tensor, captions: Sequence[str], seed: int = 0,
                  repeats: int = 4, num_train_timesteps: int = 1000) -> EvalSet:
    """Encode held-out `images` (N, 3, H, W in [-1, 1]) with the posterior mean; each image is used
    `repeats` times with fixed Gaussian noise and evenly spread timesteps."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    lat = vae.encode(images.float()).latent_dist.mean * vae.config.scaling_factor
    lat = lat.repeat_interleave(repeats, dim=0)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(lat.shape, generator=gen)
    t = spread_timesteps(len(images), num_train_timesteps, repeats)
    caps = [c for c in captions for _ in range(repeats)]
    return EvalSet(lat, noise, t, caps)


def _scheduler_alphas(num_train_timesteps: int = 1000) -> torch.Tensor:
    """alphas_cumprod of SD1's training schedule (scaled_linear 0.00085 .. 0.012)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@torch.no_grad()
def encode_captions(variant: Variant, captions: Sequence[str]) -> torch.Tensor:
    """The text encoder's last hidden state for each caption (SD1 conditioning)."""
    tok = variant.tokenizer
    ids = tok(list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return variant.text_encoder(ids)[0]


@torch.no_grad()
def noise_predictions(variant: Variant, data: EvalSet, batch: int = 64) -> torch.Tensor:
    """The UNet's epsilon prediction for every item of `data` (N, C, h, w), float32."""
    ac = _scheduler_alphas().float()
    cond = encode_captions(variant, data.captions)
    out = []
    for i in range(0, len(data), batch):
        sl = slice(i, i + batch)
        a = ac[data.timesteps[sl]].view(-1, 1, 1, 1)
        noisy = a.sqrt() * data.latents[sl] + (1 - a).sqrt() * data.noise[sl]
        out.append(variant.unet(noisy, data.timesteps[sl], cond[sl]).sample.float())
    return torch.cat(out)


def denoising_loss(pred: torch.Tensor, data: EvalSet) -> float:
    """Mean squared error between predicted and true noise (lower is better)."""
    return float(F.mse_loss(pred.double(), data.noise.double()))


def improvement_share(loss: float, none_loss: float, ref_loss: float) -> float:
    """(none - loss) / (none - ref): 0 = no better than no adapter, 1 = as good as the reference."""
    gain = none_loss - ref_loss
    if gain == 0:
        return math.nan
    return (none_loss - loss) / gain


def change_cosine(pred: torch.Tensor, none_pred: torch.Tensor, ref_pred: torch.Tensor) -> float:
    """Cosine between this variant's and the reference's change of the noise prediction vs no adapter."""
    a = (pred.double() - none_pred.double()).flatten()
    b = (ref_pred.double() - none_pred.double()).flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def change_relative_mse(pred: torch.Tensor, none_pred: torch.Tensor, ref_pred: torch.Tensor) -> float:
    """||change - ref change||^2 / ||ref change||^2 (0 = the reference's change exactly; 1 = no change)."""
    a = pred.double() - none_pred.double()
    b = ref_pred.double() - none_pred.double()
    den = float(b.square().sum())
    return float((a - b).square().sum()) / den if den > 0 else math.nan


@dataclass
class Row:
    """One variant's figures."""

    name: str
    loss: float
    share: float
    cosine: float
    rel_mse: float


def compare(preds: dict[str, torch.Tensor], data: EvalSet, none: str, reference: str) -> list[Row]:
    """Rows for every prediction set, measured against the `none` (no adapter) and `reference` sets."""
    losses = {k: denoising_loss(p, data) for k, p in preds.items()}
    rows = []
    for k, p in preds.items():
        rows.append(Row(k, losses[k], improvement_share(losses[k], losses[none], losses[reference]),
                        change_cosine(p, preds[none], preds[reference]),
                        change_relative_mse(p, preds[none], preds[reference])))
    return rows
