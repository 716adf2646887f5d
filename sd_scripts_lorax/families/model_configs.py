"""Architecture configs for SD1.x, SD2.x and SDXL, full size and tiny, and a builder for them.

Full-size configs are the published architectures (facts: channel widths, depths, heads), so that
models built on the `meta` device have exactly the real module names and shapes. Tiny configs keep
the same block structure (number of levels, layers per block, which levels have attention, linear
or 1x1-conv projections, SDXL's text-time conditioning), so every name that exists in the real model
exists in the tiny one, with small widths.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from ..testing.tiny_tokenizer import vocab_size as tiny_vocab_size
from . import registry

FAMILIES = tuple(registry.FAMILIES)
SIZES = ("tiny", "full")

# ---------------------------------------------------------------- UNet

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

_UNET = {
    ("sd1", "full"): dict(
        sample_size=64, in_channels=4, out_channels=4, down_block_types=_SD_DOWN, up_block_types=_SD_UP,
        block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=32, use_linear_projection=False,
    ),
    ("sd2", "full"): dict(
        sample_size=96, in_channels=4, out_channels=4, down_block_types=_SD_DOWN, up_block_types=_SD_UP,
        block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=1024,
        attention_head_dim=[5, 10, 20, 20], norm_num_groups=32, use_linear_projection=True,
        upcast_attention=True,
    ),
    ("sdxl", "full"): dict(
        sample_size=128, in_channels=4, out_channels=4,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[320, 640, 1280], layers_per_block=2, cross_attention_dim=2048,
        transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], norm_num_groups=32,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    ("sd1", "tiny"): dict(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=_SD_DOWN, up_block_types=_SD_UP,
        block_out_channels=[32, 64, 64, 64], layers_per_block=2, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8, use_linear_projection=False,
    ),
    ("sd2", "tiny"): dict(
        sample_size=8, in_channels=4, out_channels=4, down_block_types=_SD_DOWN, up_block_types=_SD_UP,
        block_out_channels=[32, 64, 64, 64], layers_per_block=2, cross_attention_dim=48,
        attention_head_dim=[2, 4, 4, 4], norm_num_groups=8, use_linear_projection=True,
    ),
    ("sdxl", "tiny"): dict(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        block_out_channels=[32, 64, 64], layers_per_block=2, cross_attention_dim=64,
        transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 4], norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled TE2 output + 6 size/crop embeddings
    ),
}

# ---------------------------------------------------------------- text encoders (transformers CLIPTextConfig kwargs)

_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               hidden_act="quick_gelu", projection_dim=768)
_OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu", projection_dim=512)
_OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      hidden_act="gelu", projection_dim=1280)


def _tiny_clip(hidden: int, act: str) -> dict:
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, hidden_act=act, projection_dim=hidden)


# (family, size) -> list of text-encoder configs, in kohya's order (te, or te1 then te2)
_TEXT = {
    ("sd1", "full"): [_CLIP_L],
    ("sd2", "full"): [_OPENCLIP_H],
    ("sdxl", "full"): [_CLIP_L, _OPENCLIP_BIGG],
    ("sd1", "tiny"): [_tiny_clip(32, "quick_gelu")],
    ("sd2", "tiny"): [_tiny_clip(48, "gelu")],
    ("sdxl", "tiny"): [_tiny_clip(32, "quick_gelu"), _tiny_clip(32, "gelu")],
}

# ---------------------------------------------------------------- VAE (diffusers AutoencoderKL kwargs)

_VAE = {
    "full": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                 layers_per_block=2, norm_num_groups=32, sample_size=512),
    "tiny": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32, 32, 32],
                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                 layers_per_block=1, norm_num_groups=8, sample_size=64),
}

# kohya's latent scaling factors (SD1/2 and SDXL VAEs)
TEXT_MAX_LENGTH = 77


def unet_config(family: str, size: str = "tiny") -> dict[str, Any]:
    _check(family, size)
    return copy.deepcopy(_UNET[(family, size)])


def text_encoder_configs(family: str, size: str = "tiny", vocab_size: int | None = None) -> list[dict[str, Any]]:
    """CLIPTextConfig kwargs; tiny models default to the vocabulary of `tiny_tokenizer`."""
    _check(family, size)
    if vocab_size is None:
        vocab_size = 49408 if size == "full" else tiny_vocab_size()
    out = []
    for cfg in _TEXT[(family, size)]:
        cfg = dict(cfg, vocab_size=vocab_size, max_position_embeddings=TEXT_MAX_LENGTH,
                   bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
        out.append(cfg)
    return out


def vae_config(family: str, size: str = "tiny") -> dict[str, Any]:
    _check(family, size)
    cfg = copy.deepcopy(_VAE[size])
    cfg["scaling_factor"] = registry.FAMILIES[family].vae_scaling
    if family == "sdxl" and size == "full":
        cfg["sample_size"] = 1024
    return cfg


def _check(family: str, size: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")


@dataclass
class Models:
    """The parts of one Stable Diffusion model, as diffusers/transformers modules."""

    family: str
    unet: torch.nn.Module
    text_encoders: list[torch.nn.Module]  # [te] for SD1/2, [te1, te2] for SDXL
    vae: torch.nn.Module | None


def build_models(family: str, size: str = "tiny", seed: int = 0, device: str | torch.device = "cpu",
                 vocab_size: int | None = None, with_vae: bool = True) -> Models:
    """Build randomly initialised models from the configs (`device="meta"` for names and shapes only).

    SDXL's second text encoder is a CLIPTextModelWithProjection (its pooled, projected output
    conditions the UNet), as in diffusers' SDXL pipelines.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(family, size))
        tes = []
        for i, cfg in enumerate(text_encoder_configs(family, size, vocab_size)):
            cls = CLIPTextModelWithProjection if (family == "sdxl" and i == 1) else CLIPTextModel
            tes.append(cls(CLIPTextConfig(**cfg)))
        vae = AutoencoderKL(**vae_config(family, size)) if with_vae else None
    for m in [unet, *tes, *([vae] if vae is not None else [])]:
        m.eval()
    return Models(family=family, unet=unet, text_encoders=tes, vae=vae)
