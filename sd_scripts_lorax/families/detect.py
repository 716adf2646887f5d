"""Which family a checkpoint or a LoRA file belongs to: the one place that decides.

Families are "sd1", "sd2" and "sdxl". A LoRA file whose names and widths cannot tell SD1 from SD2
(diffusers-style names, tiny widths, no metadata) is "sd1/sd2". Every function returns None where
its evidence says nothing; callers turn that into their own one-line error.
"""

from __future__ import annotations

from typing import Any, Mapping

from .registry import FAMILIES

SD1_OR_SD2 = "sd1/sd2"
EMA_PREFIX = "model_ema."

# kohya name prefixes that only SDXL files have (SAI-style UNet blocks, two text encoders)
_SDXL_NAMES = ("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_",
               "lora_unet_output_blocks_")
_SD12_NAMES = ("lora_te_", "lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_")
# text width (CLIP q_proj input, UNet cross-attention to_k input) -> family; 2048 is SDXL's
_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def single_file_family(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """SD1/SD2/SDXL from original-layout keys: text encoders first, UNet-only files by their UNet."""
    keys = [k for k in shapes if not k.startswith(EMA_PREFIX)]

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    if has("conditioner.") or has("cond_stage_model.") or not has("model.diffusion_model.input_blocks."):
        return None
    if has("model.diffusion_model.label_emb."):  # SDXL's text-time label embedding
        return "sdxl"
    return _by_proj_in(shapes, "model.diffusion_model.")


def diffusers_family(model_index: Mapping[str, Any], unet_config: Mapping[str, Any], has_text_encoder_2: bool,
                     shapes: Mapping[str, tuple[int, ...]] | None = None) -> str | None:
    """SD1/SD2/SDXL of a diffusers folder from model_index.json, its components and the UNet config;
    without a config, from the UNet's `proj_in` shapes (`unet/`-prefixed keys)."""
    if ("XL" in str(model_index.get("_class_name", "")) or has_text_encoder_2
            or unet_config.get("addition_embed_type") == "text_time"):
        return "sdxl"
    if unet_config:
        if unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024:
            return "sd2"
        return "sd1"
    return _by_proj_in(shapes or {}, "unet/")


def _by_proj_in(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> str | None:
    # SD2's transformer projections are Linear (2-D), SD1's are 1x1 convs
    proj_in = [s for k, s in shapes.items() if k.startswith(prefix) and k.endswith(".proj_in.weight")]
    if not proj_in:
        return None
    return "sd2" if len(proj_in[0]) == 2 else "sd1"


def lora_family(down_shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> tuple[str | None, str]:
    """`(family, evidence)` of a LoRA file from its module names -> `lora_down` shapes and metadata.

    kohya's metadata first, unless SDXL-only names contradict it (names say where the weights go);
    then those names; then the text width; else "sd1/sd2" by names, or None when nothing is known.
    """
    names = list(down_shapes)
    sdxl_names = any(n.startswith(_SDXL_NAMES) for n in names)
    for key in ("ss_base_model_version", "modelspec.architecture"):
        value = metadata.get(key, "")
        for fam in FAMILIES.values():
            if value.startswith(fam.metadata_prefixes) and (fam.sai_unet_names or not sdxl_names):
                return fam.name, key
    if sdxl_names:
        return "sdxl", "names"
    widths = [s[1] for n, s in down_shapes.items()
              if (n.startswith("lora_te_") and n.endswith("_q_proj"))
              or (n.startswith("lora_unet_") and n.endswith("_attn2_to_k"))]
    if widths and widths[0] in _WIDTHS:
        return _WIDTHS[widths[0]], "widths"
    if any(n.startswith(_SD12_NAMES) for n in names):
        return SD1_OR_SD2, "names"
    return None, "none"


def fits(lora_family_: str | None, checkpoint_family: str) -> bool:
    """Whether a LoRA of `lora_family_` (None: unknown, so not refused) belongs on a checkpoint."""
    if lora_family_ is None:
        return True
    if lora_family_ == SD1_OR_SD2:
        return checkpoint_family in ("sd1", "sd2")
    return lora_family_ == checkpoint_family
