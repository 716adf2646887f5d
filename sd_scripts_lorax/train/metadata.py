"""kohya's ss_* and modelspec.* metadata for the files the trainer saves (all values strings)."""

from __future__ import annotations

import datetime
import json
import random
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

from ..families import registry

MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")


def file_hashes(path: Path) -> tuple[str, str] | None:
    """(legacy A1111 hash, full sha256) of the model, as the checkpoint reader computes them in one pass
    (a diffusers folder: of its UNet weights); None when the path is not a readable checkpoint."""
    from ..formats.checkpoint import Checkpoint
    from ..errors import LoraxInputError

    try:
        with Checkpoint.open(path) as ckpt:
            hashes = ckpt.hashes()
    except LoraxInputError:
        return None
    return hashes.legacy, hashes.sha256


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def base_metadata(args: Mapping[str, Any], family: str, run: Mapping[str, Any]) -> dict[str, str]:
    """Everything known before training; `run` holds counts and derived values (steps, images, ...)."""
    v_param = bool(args.get("v_parameterization"))
    base_version = registry.family(family).metadata_version(v_param)
    model_path = Path(args["pretrained_model_name_or_path"])
    md: dict[str, Any] = {
        "ss_session_id": random.randint(0, 2**32),
        "ss_training_started_at": time.time(),
        "ss_output_name": args.get("output_name"),
        "ss_learning_rate": args.get("learning_rate"),
        "ss_text_encoder_lr": args.get("text_encoder_lr"),
        "ss_unet_lr": args.get("unet_lr"),
        "ss_num_train_images": run.get("num_train_images"),
        "ss_num_reg_images": run.get("num_reg_images"),
        "ss_num_batches_per_epoch": run.get("num_batches_per_epoch"),
        "ss_num_epochs": run.get("num_epochs"),
        "ss_gradient_checkpointing": args.get("gradient_checkpointing"),
        "ss_gradient_accumulation_steps": args.get("gradient_accumulation_steps"),
        "ss_max_train_steps": run.get("max_train_steps"),
        "ss_lr_warmup_steps": args.get("lr_warmup_steps"),
        "ss_lr_scheduler": args.get("lr_scheduler"),
        "ss_network_module": args.get("network_module"),
        "ss_network_dim": args.get("network_dim"),
        "ss_network_alpha": args.get("network_alpha"),
        "ss_network_dropout": args.get("network_dropout"),
        "ss_mixed_precision": args.get("mixed_precision"),
        "ss_full_fp16": args.get("full_fp16"),
        "ss_v2": family == "sd2",
        "ss_base_model_version": base_version,
        "ss_clip_skip": args.get("clip_skip"),
        "ss_max_token_length": None,
        "ss_cache_latents": args.get("cache_latents") or args.get("cache_latents_to_disk"),
        "ss_seed": run.get("seed"),
        "ss_lowram": False,
        "ss_noise_offset": args.get("noise_offset"),
        "ss_min_snr_gamma": args.get("min_snr_gamma"),
        "ss_max_grad_norm": args.get("max_grad_norm"),
        "ss_optimizer": run.get("optimizer"),
        "ss_training_comment": args.get("training_comment"),
        "ss_sd_scripts_commit_hash": _git_commit(),
        "ss_prior_loss_weight": args.get("prior_loss_weight"),
        "ss_caption_dropout_rate": args.get("caption_dropout_rate"),
        "ss_sd_model_name": model_path.name,
        "ss_vae_name": Path(args["vae"]).name if args.get("vae") else None,
        "ss_datasets": json.dumps(run.get("datasets", [])),
        "ss_tag_frequency": json.dumps(run.get("tag_frequency", {})),
        "ss_dataset_dirs": json.dumps(run.get("dataset_dirs", {})),
        "ss_batch_size_per_device": run.get("batch_size"),
        "ss_total_batch_size": run.get("total_batch_size"),
        "ss_resolution": run.get("resolution"),
    }
    if args.get("network_args"):
        md["ss_network_args"] = json.dumps(run.get("network_kwargs", {}))
    hashes = file_hashes(model_path)
    if hashes:
        md["ss_sd_model_hash"], md["ss_new_sd_model_hash"] = hashes
    md = {k: str(v) for k, v in md.items()}
    if args.get("no_metadata"):
        md = {k: v for k, v in md.items() if k in MINIMUM_KEYS}
    return md


def modelspec(args: Mapping[str, Any], family: str, resolution: tuple[int, int]) -> dict[str, str]:
    """The modelspec.* keys kohya writes for a LoRA."""
    v_param = bool(args.get("v_parameterization"))
    title = args.get("output_name") or f"LoRA@{datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}"
    md = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": registry.family(family).metadata_architecture(v_param),
        "modelspec.implementation": registry.family(family).implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if v_param else "epsilon",
        "modelspec.implementation_version": f"sd-scripts-lorax/{_git_commit()}",
    }
    if args.get("clip_skip"):
        md["modelspec.encoder_layer"] = str(args["clip_skip"])
    return md


def at_save(base: Mapping[str, str], spec: Mapping[str, str], step: int, epoch: int) -> dict[str, str]:
    """The metadata handed to the network's save_weights for one file: base + save-time keys + modelspec
    (networks.lora_x's save_weights adds the lorax.* keys from it)."""
    md = dict(base)
    if "ss_session_id" in md or len(md) > len(MINIMUM_KEYS):
        md.update(ss_training_finished_at=str(time.time()), ss_steps=str(step), ss_epoch=str(epoch))
    md.update(spec)
    return md
