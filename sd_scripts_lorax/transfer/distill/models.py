"""The models a distillation runs: one checkpoint's UNet, text encoder(s) and sampling scheduler.

Loading goes through the trainer's loader (`train.models.load_models`: diffusers folders and single
files of every family, fp32, frozen), so whatever the trainer can train on, distill can run on. The
sampling scheduler is the checkpoint's own (a diffusers folder's `scheduler/`), else SD's standard
DDIM schedule (scaled_linear 0.00085 .. 0.012, 1000 steps), which single-file SD1/2/SDXL checkpoints use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import LoraxInputError, first_line

SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


@dataclass
class Loaded:
    """What the distillation needs of one checkpoint."""

    models: Any                  # train.models.TrainModels (unet, text_encoders, tokenizers, family)
    scheduler: Any               # a diffusers DDIMScheduler
    device: torch.device

    @property
    def unet(self) -> nn.Module:
        return self.models.unet

    def layers(self, names) -> dict[str, nn.Module]:
        """Live layers by kohya module name (SDXL files' diffusers-style aliases too)."""
        from ...network.lorax_network import find_targets

        ranks = {n: 1 for n in names}
        out: dict[str, nn.Module] = {}
        for t in find_targets(self.models.network_text_encoder, self.models.unet, 1, 1, ranks=ranks):
            out[t.lora_name] = t.base
            if t.alias:
                out[t.alias] = t.base
        return out

    def latent_shape(self) -> tuple[int, int, int]:
        cfg = self.models.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return int(cfg.in_channels), int(size), int(size)

    def encode(self, prompts: list[str]):
        """Conditioning of `prompts` (train.models.encode_text: SD1/2 hidden states; SDXL + pooled, time ids);
        differentiable, so trained text-encoder modules get gradients."""
        from ...train.models import encode_text

        _, h, w = self.latent_shape()
        factor = 8  # the VAE's downsampling in every supported family
        return encode_text(self.models, prompts, self.device, target_size=(h * factor, w * factor))

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The UNet's raw prediction (epsilon, or v for v-prediction checkpoints: matched alike)."""
        return self.models.unet(x, t, **cond.unet_kwargs()).sample


def _scheduler(path: Path):
    from diffusers import DDIMScheduler

    if path.is_dir() and (path / "scheduler").is_dir():
        try:
            return DDIMScheduler.from_pretrained(path, subfolder="scheduler")
        except (OSError, ValueError) as exc:
            raise LoraxInputError(f"{path}: cannot read its scheduler ({first_line(exc)})") from None
    return DDIMScheduler(**SD_SCHEDULE)


def load(path: str | Path, device: torch.device, role: str) -> Loaded:
    """Load a checkpoint for the distillation; one line naming the file when it cannot be used."""
    from ...train.models import load_models

    path = Path(path)
    if path.is_dir() and (path / "unet").is_dir() and not (path / "text_encoder").is_dir():
        raise LoraxInputError(f"{path}: the {role} model has no text encoder (text_encoder/ missing); "
                              f"--method distill needs it to condition the UNet on prompts")
    try:
        models = load_models(str(path))
    except LoraxInputError as exc:
        raise LoraxInputError(f"{role} model: {exc}") from None
    models.unet.to(device)
    for te in models.text_encoders:
        te.to(device)
    models.vae = None  # never used: latents come from the teacher, not from images
    return Loaded(models, _scheduler(path), device)


def merge_adapter(loaded: Loaded, lora_path: str | Path) -> None:
    """Fold a kohya LoRA(-X) file into the loaded weights exactly (the teacher: source + its adapter)."""
    from ...network.lorax_network import create_network_from_weights

    m = loaded.models
    net, weights = create_network_from_weights(1.0, lora_path, None, m.network_text_encoder, m.unet,
                                               for_inference=True)
    net.merge_to(m.network_text_encoder, m.unet, weights)
