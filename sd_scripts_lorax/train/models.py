"""Loading the base model for training, and the two conditioning paths (SD1/2 and SDXL).

Models load from a diffusers folder (tokenizers from the folder, never from a hub), or from a
single-file checkpoint through `sd_scripts_lorax.families.ldm_convert` when that converter is installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraxInputError
from ..families import detect
from ..families.registry import FAMILIES


@dataclass
class TrainModels:
    family: str                          # "sd1" | "sd2" | "sdxl"
    unet: torch.nn.Module
    text_encoders: list[torch.nn.Module]  # [te] or [te1, te2]
    tokenizers: list[Any]
    vae: torch.nn.Module
    name: str                            # what ss_sd_model_name records

    @property
    def network_text_encoder(self) -> Any:
        """What a kohya network's create_network expects: one TE for SD1/2, [te1, te2] for SDXL."""
        return self.text_encoders if self.family == "sdxl" else self.text_encoders[0]

    @property
    def latent_scale(self) -> float:
        return FAMILIES[self.family].vae_scaling


def detect_family_of_folder(folder: Path) -> str:
    """The family of a diffusers folder (families.detect); unknown layouts are refused."""
    unet_cfg = folder / "unet" / "config.json"
    if not unet_cfg.is_file():
        raise LoraxInputError(f"{folder}: not a diffusers model folder (unet/config.json missing)")
    index = folder / "model_index.json"
    family = detect.diffusers_family(json.loads(index.read_text()) if index.is_file() else {},
                                     json.loads(unet_cfg.read_text()), (folder / "text_encoder_2").is_dir())
    if family is None:
        raise LoraxInputError(f"{folder}: unknown model family")
    return family


def _check_flags(family: str, path: Path, v2: bool, sdxl: bool) -> None:
    if sdxl and family != "sdxl":
        raise LoraxInputError(f"{path}: --sdxl given but the model is {family}")
    if v2 and family != "sd2":
        raise LoraxInputError(f"{path}: --v2 given but the model is {family}")
    if family == "sdxl" and v2:
        raise LoraxInputError(f"{path}: --v2 given but the model is SDXL")


def _load_folder(folder: Path) -> tuple[Any, list, list, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    # Always fp32: training keeps fp32 masters (mixed precision casts later), and an fp16 folder would
    # otherwise come back half in fp16 (transformers keeps the saved dtype) and half in fp32 (diffusers).
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
    tes, toks = [], []
    for sub, tok_sub, cls in (("text_encoder", "tokenizer", CLIPTextModel),
                              ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection)):
        if (folder / sub).is_dir():
            tes.append(cls.from_pretrained(folder, subfolder=sub, dtype=torch.float32))
            if not (folder / tok_sub).is_dir():
                raise LoraxInputError(f"{folder}: {tok_sub}/ missing (tokenizers are read from the model folder)")
            toks.append(CLIPTokenizer.from_pretrained(folder, subfolder=tok_sub))
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    return unet, tes, toks, vae


def full_size_tokenizers(family: str, cache_dir: str | None) -> list:
    """Real CLIP tokenizers for a full-size single file, from kohya's --tokenizer_cache_dir layout
    (`<dir>/<hub id with / -> _>/`) or the local Hugging Face cache (never downloaded: training must not
    stall on a hub request); a clear error when neither has them."""
    from transformers import CLIPTokenizer

    toks = []
    for hub_id, sub, pad in FAMILIES[family].tokenizers:
        local = Path(cache_dir) / hub_id.replace("/", "_") if cache_dir else None
        try:
            if local is not None and local.is_dir():
                tok = CLIPTokenizer.from_pretrained(local)
            else:
                tok = CLIPTokenizer.from_pretrained(hub_id, subfolder=sub, local_files_only=True)
            if len(tok.get_vocab()) <= 2:  # transformers 5 builds an empty tokenizer when the files are missing
                raise OSError("no vocabulary files")
        except (OSError, ValueError) as exc:
            where = f"{local} or " if local is not None else ""
            raise LoraxInputError(
                f"CLIP tokenizer {hub_id} for a {family} single file not found in {where}the Hugging Face cache "
                f"({type(exc).__name__}); save it once with CLIPTokenizer.save_pretrained into "
                f"--tokenizer_cache_dir/{hub_id.replace('/', '_')} or pass the model as a diffusers folder") from None
        if pad is not None:
            tok.pad_token = pad
        toks.append(tok)
    return toks


def _load_single_file(path: Path, tokenizer_cache_dir: str | None = None) -> tuple[str, Any, list, list, Any]:
    """An LDM/SAI single file: family from the keys, architecture from model_configs (tiny for the
    project's own fixtures, full size otherwise), weights through ldm_convert's plans."""
    import tempfile

    from transformers import CLIPTokenizer

    from ..families import ldm_convert
    from ..formats.checkpoint import Checkpoint
    from ..formats.safetensors_header import read_header
    from ..families.model_configs import build_models
    from ..testing.tiny_tokenizer import write_tokenizer

    with Checkpoint.open(path) as ck:  # LoraxInputError on corrupt files and unknown families
        family = ck.family
        size = "full"
        fixture = read_header(path).metadata.get("lorax.fixture") if path.suffix == ".safetensors" else None
        if fixture:
            size = json.loads(fixture).get("size", "full")
        full_toks = full_size_tokenizers(family, tokenizer_cache_dir) if size == "full" else None
        models = build_models(family, size)
        parts = {"unet": models.unet, "vae": models.vae, "text_encoder": models.text_encoders[0]}
        if family == "sdxl":
            parts["text_encoder_2"] = models.text_encoders[1]
        prefix = {c: any(k.startswith("text_model.") for k in m.state_dict())
                  for c, m in parts.items() if c.startswith("text_encoder")}
        plan = ldm_convert.from_single_file(family, {k: ck.shape(k) for k in ck.keys()}, prefix)
        state: dict[str, dict[str, torch.Tensor]] = {c: {} for c in parts}
        for key, tensor in ldm_convert.run_plan(plan, ck.tensor):
            component, _, inner = key.partition("/")
            state[component][inner] = tensor.float()
    for component, module in parts.items():
        missing, unexpected = module.load_state_dict(state[component], strict=False)
        missing = [k for k in missing if "position_ids" not in k]
        if missing or unexpected:
            raise LoraxInputError(f"{path}: {component} does not match the {family} {size} layout "
                                  f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
    toks = full_toks or []
    if full_toks is None:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(len(models.text_encoders)):
                toks.append(CLIPTokenizer.from_pretrained(write_tokenizer(Path(tmp) / f"tok{i}")))
    return family, models.unet, models.text_encoders, toks, models.vae


def load_vae(path: Path) -> Any:
    from diffusers import AutoencoderKL

    if path.is_dir():
        sub = "vae" if (path / "vae").is_dir() else None
        return AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=torch.float32)
    raise LoraxInputError(f"{path}: --vae must be a diffusers folder (single-file VAEs are not supported)")


def load_models(path: str, vae: str | None = None, v2: bool = False, sdxl: bool = False,
                tokenizer_cache_dir: str | None = None) -> TrainModels:
    """Load UNet, text encoder(s), tokenizer(s) and VAE in fp32 on CPU, all frozen."""
    p = Path(path)
    if not p.exists():
        raise LoraxInputError(f"{p}: pretrained_model_name_or_path not found (hub ids are not downloaded)")
    if p.is_dir():
        family = detect_family_of_folder(p)
        unet, tes, toks, vae_model = _load_folder(p)
    else:
        family, unet, tes, toks, vae_model = _load_single_file(p, tokenizer_cache_dir)
    _check_flags(family, p, v2, sdxl)
    expected = 2 if family == "sdxl" else 1
    if len(tes) != expected:
        raise LoraxInputError(f"{p}: {family} needs {expected} text encoder(s), found {len(tes)}")
    if vae:
        vae_model = load_vae(Path(vae))
    for m in [unet, *tes, vae_model]:
        m.requires_grad_(False)
        m.eval()
    return TrainModels(family, unet, tes, toks, vae_model, p.name)


@dataclass
class Conditioning:
    hidden: torch.Tensor               # (B, 77, cross_attention_dim)
    pooled: torch.Tensor | None = None  # SDXL: TE2's projected pooled output
    time_ids: torch.Tensor | None = None  # SDXL: (B, 6)

    def unet_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kw


def _tokenize(tokenizer: Any, captions: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def _final_norm(te: torch.nn.Module) -> torch.nn.Module:
    # transformers 5 CLIPTextModel has no text_model submodule; older ones do
    return getattr(te, "text_model", te).final_layer_norm


def encode_text(models: TrainModels, captions: list[str], device: torch.device, clip_skip: int | None = None,
                original_sizes: list[tuple[int, int]] | None = None,
                crop_top_lefts: list[tuple[int, int]] | None = None,
                target_size: tuple[int, int] | None = None) -> Conditioning:
    """SD1/2: last hidden state (or the clip_skip-th last, through the final layer norm).
    SDXL: hidden_states[-2] of both encoders concatenated; TE2's projected pooled output; and
    time_ids = (original h, w, crop top, left, target h, w) per sample."""
    if models.family != "sdxl":
        te = models.text_encoders[0]
        out = te(_tokenize(models.tokenizers[0], captions, device), output_hidden_states=True)
        if clip_skip and clip_skip > 1:
            return Conditioning(_final_norm(te)(out.hidden_states[-clip_skip]))
        return Conditioning(out.last_hidden_state)
    te1, te2 = models.text_encoders
    h1 = te1(_tokenize(models.tokenizers[0], captions, device), output_hidden_states=True).hidden_states[-2]
    out2 = te2(_tokenize(models.tokenizers[1], captions, device), output_hidden_states=True)
    hidden = torch.cat([h1, out2.hidden_states[-2].to(h1.dtype)], dim=-1)
    b = len(captions)
    sizes = original_sizes or [target_size] * b
    crops = crop_top_lefts or [(0, 0)] * b
    time_ids = torch.tensor([[*sizes[i], *crops[i], *target_size] for i in range(b)], dtype=hidden.dtype,
                            device=device)
    return Conditioning(hidden, out2.text_embeds, time_ids)


def encode_images(models: TrainModels, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """VAE latents, sampled from the posterior with `generator`, times kohya's scale; NaN -> 0."""
    vae = models.vae
    dist = vae.encode(images.to(next(vae.parameters()).dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(dist.mean)
    latents = dist.mean + dist.std * noise
    return torch.nan_to_num(latents.float(), 0.0) * models.latent_scale
