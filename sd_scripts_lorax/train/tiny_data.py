"""The embedded tiny model and dataset that configs/tiny_lorax.toml trains on, built on first use.

A path whose folder name is one of EMBEDDED (e.g. `.cache/tiny-sd1-lorax`) and that does not exist
is built deterministically there: the tiny SD1 model from `model_configs` + `tiny_tokenizer`
(through `fixtures.write_fixture` when that module is installed), and the "blue fire" style images
from `embedded.write_style_dataset` (kohya folder layout, `10_bluefire/*.png` + `.txt`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

TINY_MODEL = "tiny-sd1-lorax"
TINY_SDXL_MODEL = "tiny-sdxl-lorax"
TINY_DATA = "tiny-bluefire"


def write_tiny_model(out: Path, family: str = "sd1", seed: int = 0) -> Path:
    """A diffusers folder (model_index.json, unet, text_encoder(s), tokenizer(s), vae, scheduler)."""
    try:
        from ..testing.fixtures import write_fixture
    except ImportError:
        write_fixture = None
    if write_fixture is not None:
        write_fixture(family, "diffusers", "tiny", seed, out, overwrite=True)
        return out
    from diffusers import DDIMScheduler

    from ..families.model_configs import build_models
    from ..testing.tiny_tokenizer import write_tokenizer

    models = build_models(family, "tiny", seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    models.unet.save_pretrained(out / "unet")
    models.vae.save_pretrained(out / "vae")
    te_names = ["text_encoder", "text_encoder_2"]
    tok_names = ["tokenizer", "tokenizer_2"]
    for i, te in enumerate(models.text_encoders):
        te.save_pretrained(out / te_names[i])
        write_tokenizer(out / tok_names[i])
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False).save_pretrained(out / "scheduler")
    sdxl = family == "sdxl"
    index = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    if sdxl:
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def write_tiny_dataset(out: Path, seed: int = 0) -> Path:
    """24 64x64 PNGs with captions in `out/10_bluefire/`."""
    from ..testing.embedded import write_style_dataset

    write_style_dataset(out, seed=seed, split="train", per_concept=4)
    return out


BUILDERS: dict[str, Callable[[Path], Path]] = {
    TINY_MODEL: lambda p: write_tiny_model(p, "sd1"),
    TINY_SDXL_MODEL: lambda p: write_tiny_model(p, "sdxl"),
    TINY_DATA: write_tiny_dataset,
}


def ensure_embedded(path: str | Path) -> bool:
    """Build `path` (or the embedded folder it lies in) if it is an embedded one that is missing.

    Built in a temporary sibling folder and renamed, so an interrupted build leaves nothing behind.
    Returns True when something was built.
    """
    path = Path(path)
    for folder in [path, *path.parents]:
        if folder.name in BUILDERS:
            break
    else:
        return False
    if folder.exists():
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        BUILDERS[folder.name](tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process built it first
            if not folder.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True
