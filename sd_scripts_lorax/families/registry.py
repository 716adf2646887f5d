"""The facts of each model family that the rest of the code looks up, in one table.

Adding a family (SD3, Flux, ...) starts here: a `Family` entry, its detection rules in
`detect.py`, its architecture in `model_configs.py` and its key layouts in `naming.py`/`ldm_convert.py`.
Nothing outside `families/` needs to spell a family's metadata strings.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One model family: kohya's metadata strings, text encoders, VAE and defaults."""

    name: str                               # "sd1" | "sd2" | "sdxl"
    text_encoder_parts: tuple[str, ...]     # kohya prefixes after "lora_": ("te",) or ("te1", "te2")
    base_model_version: tuple[str, str]     # ss_base_model_version: (epsilon, v-prediction)
    architecture: tuple[str, str]           # modelspec.architecture of a LoRA: (epsilon, v-prediction)
    implementation: str                     # modelspec.implementation of a LoRA, as kohya writes it
    resolution: tuple[int, int]             # kohya's default training resolution: (epsilon, v-prediction)
    vae_scaling: float                      # latents = VAE mean * this
    # prefixes of ss_base_model_version / modelspec.architecture values that name this family
    metadata_prefixes: tuple[str, ...]
    # the CLIP tokenizers kohya asks for by hub id (never downloaded here): (hub id, subfolder, pad token)
    tokenizers: tuple[tuple[str, str | None, str | None], ...]

    @property
    def sai_unet_names(self) -> bool:
        """kohya names this family's UNet modules SAI-style (input_blocks...), not diffusers-style."""
        return len(self.text_encoder_parts) == 2

    def metadata_version(self, v_parameterization: bool = False) -> str:
        return self.base_model_version[bool(v_parameterization)]

    def metadata_architecture(self, v_parameterization: bool = False) -> str:
        return self.architecture[bool(v_parameterization)]

    def default_resolution(self, v_parameterization: bool = False) -> int:
        return self.resolution[bool(v_parameterization)]


_CLIP_L = ("openai/clip-vit-large-patch14", None, None)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd1", ("te",), ("sd_v1", "sd_v1_v"), ("stable-diffusion-v1/lora", "stable-diffusion-v1/lora"),
           "diffusers", (512, 512), 0.18215, ("sd_v1", "stable-diffusion-v1"), (_CLIP_L,)),
    Family("sd2", ("te",), ("sd_v2", "sd_v2_v"),
           ("stable-diffusion-v2-512/lora", "stable-diffusion-v2-768-v/lora"), "diffusers", (512, 768), 0.18215,
           ("sd_v2", "stable-diffusion-v2"), (("stabilityai/stable-diffusion-2", "tokenizer", None),)),
    Family("sdxl", ("te1", "te2"), ("sdxl_base_v1-0", "sdxl_base_v1-0"),
           ("stable-diffusion-xl-v1-base/lora", "stable-diffusion-xl-v1-base/lora"),
           "https://github.com/Stability-AI/generative-models", (1024, 1024), 0.13025,
           ("sdxl", "stable-diffusion-xl"), (_CLIP_L, ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", None, "!"))),
)}


def family(name: str) -> Family:
    """The family called `name`; ValueError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; expected one of {', '.join(FAMILIES)}") from None
