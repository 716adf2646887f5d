"""Sample images during training: kohya's prompt-file options and a diffusers pipeline that runs on
the live (adapter-patched) UNet and text encoders."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoraxInputError
from .models import TrainModels

@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    scale: float = 7.5
    steps: int = 30


def parse_prompt_line(line: str, default_size: int = 512) -> SamplePrompt | None:
    """`a cat --n blurry --w 512 --h 768 --d 42 --l 7 --s 20` -> SamplePrompt; blank/# lines -> None."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    parts = re.split(r"\s--(?=[nwhdls]\s)", " " + line)
    prompt = parts[0].strip()
    kw: dict = {"width": default_size, "height": default_size}
    names = {"n": "negative", "w": "width", "h": "height", "d": "seed", "l": "scale", "s": "steps"}
    for part in parts[1:]:
        key, _, value = part.partition(" ")
        value = value.strip()
        try:
            kw[names[key]] = (value if key == "n" else float(value) if key == "l" else int(value))
        except ValueError:
            raise LoraxInputError(f"sample prompt {line!r}: --{key} {value!r} is not a number") from None
    return SamplePrompt(prompt, **kw)


def read_prompts(path: str | Path, default_size: int) -> list[SamplePrompt]:
    path = Path(path)
    if not path.is_file():
        raise LoraxInputError(f"{path}: sample_prompts file not found")
    if path.suffix.lower() != ".txt":
        raise LoraxInputError(f"{path}: only .txt sample prompt files are supported")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = [p for p in (parse_prompt_line(line, default_size) for line in lines) if p]
    if not prompts:
        raise LoraxInputError(f"{path}: no prompts")
    return prompts


def _scheduler(name: str):
    from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
           "ddpm": DDPMScheduler}[name]
    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if name in ("ddim", "ddpm"):
        kw["clip_sample"] = False
    return cls(**kw)


def build_pipeline(models: TrainModels, sampler: str, v_prediction: bool):
    """A diffusers pipeline sharing the training modules (so the adapter is live)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sched = _scheduler(sampler)
    if v_prediction:
        sched.register_to_config(prediction_type="v_prediction")
    if models.family == "sdxl":
        return StableDiffusionXLPipeline(vae=models.vae, text_encoder=models.text_encoders[0],
                                         text_encoder_2=models.text_encoders[1], tokenizer=models.tokenizers[0],
                                         tokenizer_2=models.tokenizers[1], unet=models.unet, scheduler=sched)
    return StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoders[0], tokenizer=models.tokenizers[0],
                                   unet=models.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@torch.no_grad()
def sample_images(models: TrainModels, prompts: list[SamplePrompt], out_dir: Path, name: str, suffix: str,
                  sampler: str, v_prediction: bool, device: torch.device, seed: int) -> list[Path]:
    """Generate one image per prompt into out_dir; RNG state of the caller is left untouched."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(models, sampler, v_prediction)
    pipe.set_progress_bar_config(disable=True)
    was_training = models.unet.training
    models.unet.eval()
    paths = []
    try:
        with torch.random.fork_rng(devices=[]):
            for i, p in enumerate(prompts):
                g = torch.Generator(device="cpu").manual_seed(p.seed if p.seed is not None else seed + i)
                image = pipe(p.prompt, negative_prompt=p.negative or None, width=p.width, height=p.height,
                             num_inference_steps=p.steps, guidance_scale=p.scale, generator=g).images[0]
                path = out_dir / f"{name}_{suffix}_{i:02d}.png"
                image.save(path)
                paths.append(path)
    finally:
        models.unet.train(was_training)
    return paths
