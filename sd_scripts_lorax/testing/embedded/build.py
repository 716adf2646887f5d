"""Build the embedded SOURCE/TARGET model pair and save them as fp16 diffusers folders.

    nice -n 10 python -m sd_scripts_lorax.testing.embedded.build --out assets/embedded [--seed 0] [--overwrite]

Steps (deterministic for a seed; single CPU thread so results do not depend on the core count):
1. VAE: autoencoder training on all three image distributions, then latent-scale calibration.
2. SOURCE: UNet + text encoder, DDPM epsilon loss, on the "base" distribution.
3. TARGET: a fine-tune of the SOURCE UNet on the "shifted" distribution ("painting" rendering,
   more objects). Its text encoder and VAE are the source's, bit for bit, as in many real
   fine-tunes (so the transfer's identical-weights path is exercised too).
Both are written as `<out>/source`, `<out>/target`, plus `<out>/build_report.json` with the figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ...errors import LoraxInputError, cli_errors
from ...families.model_configs import build_models
from ..tiny_tokenizer import write_tokenizer
from . import pretrain
from .compare import compare_unets

NOISE_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, clip_sample=False)


@dataclass
class BuildPlan:
    """The compute budget of a build (the defaults are what the committed pair was built with)."""

    vae_steps: int = 400
    vae_images: int = 1536          # a third from each distribution
    base_images: int = 2048
    shifted_images: int = 1024
    eval_images: int = 128           # held-out images for the before/after losses
    source_steps: int = 1500
    source_lr: float = 1e-3
    target_steps: int = 600
    target_lr: float = 1e-3
    weight_decay: float = 0.01
    batch: int = 16
    threads: int = 1

    @classmethod
    def quick(cls) -> "BuildPlan":
        """A seconds-long plan for smoke tests (the models learn little)."""
        return cls(vae_steps=10, vae_images=96, base_images=64, shifted_images=64, eval_images=16,
                   source_steps=10, target_steps=10, batch=8)


def build(out: str | Path, seed: int = 0, overwrite: bool = False, plan: BuildPlan | None = None,
          progress: bool = True) -> dict:
    """Train the pair and write `<out>/source`, `<out>/target`, `<out>/build_report.json`; returns the report."""
    plan = plan or BuildPlan()
    out = Path(out)
    for role in ("source", "target"):
        if (out / role).exists() and not overwrite:
            raise LoraxInputError(f"{out / role}: output exists (pass --overwrite to replace it)")
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        return _build(out, seed, plan, progress)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, seed: int, plan: BuildPlan, progress: bool) -> dict:
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    t0 = time.perf_counter()
    times: dict[str, float] = {}
    bar = _Progress() if progress else None
    torch.manual_seed(seed)
    models = build_models("sd1", "tiny", seed=seed)
    unet, te, vae = models.unet, models.text_encoders[0], models.vae
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(Path(tmp) / "tokenizer"))
    if len(tokenizer) != te.config.vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, text encoder {te.config.vocab_size}")
    scheduler = DDPMScheduler(**NOISE_SCHEDULE)

    # 1. data and VAE
    third = plan.vae_images // 3
    vae_imgs = torch.cat([pretrain.make_images(d, third, seed + k)[0]
                          for k, d in enumerate(("base", "shifted", "bluefire"))])
    base_x, base_c = pretrain.make_images("base", plan.base_images, seed + 10)
    shift_x, shift_c = pretrain.make_images("shifted", plan.shifted_images, seed + 11)
    base_ex, base_ec = pretrain.make_images("base", plan.eval_images, seed + 20)
    shift_ex, shift_ec = pretrain.make_images("shifted", plan.eval_images, seed + 21)
    times["data_s"] = time.perf_counter() - t0
    held_out = torch.cat([base_ex, shift_ex])
    vae_before = pretrain.vae_recon_mse(vae, held_out)
    vae_losses = pretrain.train_vae(vae, vae_imgs, plan.vae_steps, plan.batch, seed=seed, progress=bar)
    vae_after = pretrain.vae_recon_mse(vae, held_out)
    latent_gain = pretrain.calibrate_latent_scale(vae, vae_imgs)
    vae.requires_grad_(False)
    times["vae_s"] = time.perf_counter() - t0 - sum(times.values())

    def latents(x, captions):
        mean, std = pretrain.encode_latents(vae, x)
        return pretrain.LatentData(mean, std, pretrain.tokenize(tokenizer, captions), vae.config.scaling_factor)

    base, shifted = latents(base_x, base_c), latents(shift_x, shift_c)
    base_eval, shift_eval = latents(base_ex, base_ec), latents(shift_ex, shift_ec)
    scaled_std = float((base.mean * base.scaling).std())

    # 2. SOURCE
    src_before = pretrain.eval_denoise_loss(unet, te, base_eval, scheduler)
    src_losses = pretrain.train_denoiser(unet, te, base, scheduler, plan.source_steps, plan.batch,
                                         plan.source_lr, plan.weight_decay, train_te=True, seed=seed + 1,
                                         phase="source", progress=bar)
    src_after = pretrain.eval_denoise_loss(unet, te, base_eval, scheduler)
    src_on_shift = pretrain.eval_denoise_loss(unet, te, shift_eval, scheduler)
    times["source_s"] = time.perf_counter() - t0 - sum(times.values())

    # 3. TARGET: the source UNet fine-tuned; text encoder and VAE shared
    tgt_unet = copy.deepcopy(unet)
    tgt_losses = pretrain.train_denoiser(tgt_unet, te, shifted, scheduler, plan.target_steps, plan.batch,
                                         plan.target_lr, plan.weight_decay, train_te=False, seed=seed + 2,
                                         phase="target", progress=bar)
    tgt_on_shift = pretrain.eval_denoise_loss(tgt_unet, te, shift_eval, scheduler)
    tgt_on_base = pretrain.eval_denoise_loss(tgt_unet, te, base_eval, scheduler)
    times["target_s"] = time.perf_counter() - t0 - sum(times.values())
    if bar:
        bar.close()

    # fp16 is what is committed, so the comparison is made on fp16 weights
    for m in (unet, tgt_unet, te, vae):
        m.half()
    similarity = compare_unets(unet, tgt_unet, rank=8)
    for role, u in (("source", unet), ("target", tgt_unet)):
        _save_pipeline(out / role, u, te, vae, tokenizer)
    sizes = {role: _folder_bytes(out / role) for role in ("source", "target")}
    times["total_s"] = time.perf_counter() - t0

    def tail(xs):  # mean of the last 10 % of steps: the training loss at the end
        k = max(1, len(xs) // 10)
        return sum(xs[-k:]) / k

    report = {
        "seed": seed, "plan": asdict(plan), "times": {k: round(v, 1) for k, v in times.items()},
        "vae": {"recon_mse_before": vae_before, "recon_mse_after": vae_after,
                "train_mse_first": vae_losses[0], "train_mse_last10pct": tail(vae_losses),
                "latent_gain": latent_gain, "scaled_latent_std": scaled_std},
        "source": {"eval_loss_base_before": src_before, "eval_loss_base_after": src_after,
                   "eval_loss_shifted": src_on_shift, "train_loss_first": src_losses[0],
                   "train_loss_last10pct": tail(src_losses)},
        "target": {"eval_loss_shifted_before": src_on_shift, "eval_loss_shifted_after": tgt_on_shift,
                   "eval_loss_base_after": tgt_on_base, "train_loss_first": tgt_losses[0],
                   "train_loss_last10pct": tail(tgt_losses)},
        "similarity": similarity, "bytes": sizes,
    }
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _save_pipeline(dest: Path, unet, te, vae, tokenizer) -> None:
    """Write one fp16 diffusers folder; built beside `dest` and renamed so no half folder is left."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    # DDIM with SD1.5's betas: deterministic, usable with a handful of steps
    sampler = DDIMScheduler(**NOISE_SCHEDULE, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=sampler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # also the plain vocab.json/merges.txt pair, which every CLIPTokenizer version reads
        write_tokenizer(tmp / "tokenizer")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class _Progress:
    """One tqdm bar per phase, showing the running loss."""

    def __init__(self) -> None:
        self.phase, self.bar, self.avg = None, None, None

    def __call__(self, phase: str, step: int, total: int, loss: float) -> None:
        from tqdm import tqdm

        if phase != self.phase:
            self.close()
            self.phase, self.avg = phase, loss
            self.bar = tqdm(total=total, desc=phase, file=sys.stderr, mininterval=2.0)
        self.avg = 0.98 * self.avg + 0.02 * loss
        self.bar.update(1)
        if step % 20 == 0:
            self.bar.set_postfix(loss=f"{self.avg:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the embedded SOURCE/TARGET tiny model pair.")
    parser.add_argument("--out", required=True, help="folder that receives source/, target/, build_report.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace existing source/ and target/")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke build (models barely trained)")
    args = parser.parse_args(argv)
    with cli_errors():
        report = build(args.out, seed=args.seed, overwrite=args.overwrite,
                       plan=BuildPlan.quick() if args.quick else None)
        print(json.dumps({k: report[k] for k in ("times", "vae", "source", "target", "similarity", "bytes")},
                         indent=2))


if __name__ == "__main__":
    main()
