"""One training run from the effective config: check inputs, load, build, train, save.

This is the only place that reads the flat config dict; everything below it gets typed arguments.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import LoraxInputError
from ..families import registry
from ..formats.precision import PRECISION_DTYPES, precision_dtype
from .checkpoints import TrainState, load_state
from .checks import check_run, run_identity, tidy_output_dir
from .data_config import datasets_from_args
from .dataset import BucketedDataset, load_image
from .loop import LoopSettings, train_loop
from .metadata import at_save, base_metadata, modelspec
from .models import TrainModels, encode_images, load_models
from .network_setup import create_network, import_network_module, network_kwargs, optimizer_groups
from .optim import check_optimizer_name, make_optimizer, make_scheduler, optimizer_description, quiet_bitsandbytes, \
    warmup_steps
from .tiny_data import ensure_embedded

def check_device(device: str, mixed_precision: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise LoraxInputError("--device cuda was asked but CUDA is not available on this machine (use --device cpu)")
    if device == "cpu" and mixed_precision == "fp16":
        raise LoraxInputError("--mixed_precision fp16 needs --device cuda; on CPU use bf16 or no")


def default_resolution(family: str, v_param: bool) -> int:
    return registry.family(family).default_resolution(v_param)


def make_accelerator(device: str, mixed_precision: str, grad_accum: int, logging_dir: str | None,
                     log_with: str | None):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one global state per process; a second run in the same process (tests, notebooks)
    # with another mixed_precision would be refused, so each run starts from a fresh one
    AcceleratorState._reset_state()
    log = log_with or ("tensorboard" if logging_dir else None)
    return Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum,
                       log_with=log, project_dir=logging_dir)


def cache_latents(models: TrainModels, data: BucketedDataset, to_disk: bool, seed: int, device: torch.device,
                  dtype: torch.dtype, chunk: int = 8) -> None:
    """Encode every (image, flip) once, in chunks of one bucket; with to_disk, reuse/write
    `<image>.npz` next to the image (kohya's place)."""
    todo: dict[tuple[int, int], list[tuple[int, bool]]] = {}
    for i, item in enumerate(data.items):
        flips = [False, True] if item.subset.flip_aug else [False]
        npz = item.path.with_suffix(".npz")
        if to_disk and npz.is_file():
            z = np.load(npz)
            if tuple(z["reso"]) == item.bucket:
                data.latent_cache[(i, False)] = torch.from_numpy(z["latents"])
                if "latents_flipped" in z:
                    data.latent_cache[(i, True)] = torch.from_numpy(z["latents_flipped"])
        todo.setdefault(item.bucket, []).extend((i, f) for f in flips if (i, f) not in data.latent_cache)
    for keys in todo.values():
        for k in range(0, len(keys), chunk):
            part = keys[k:k + chunk]
            imgs = torch.stack([load_image(data.items[i], f)[0] for i, f in part]).to(device, dtype)
            gen = torch.Generator().manual_seed(seed * 1009 + part[0][0] * 2 + int(part[0][1]))
            with torch.no_grad():
                lat = encode_images(models, imgs, gen).cpu()
            for (i, f), z in zip(part, lat):
                data.latent_cache[(i, f)] = z.clone()
    if to_disk:
        for i, item in enumerate(data.items):
            arrays = {"latents": data.latent_cache[(i, False)].numpy(), "reso": np.array(item.bucket)}
            if (i, True) in data.latent_cache:
                arrays["latents_flipped"] = data.latent_cache[(i, True)].numpy()
            np.savez(item.path.with_suffix(".npz"), **arrays)


def run_training(args: Mapping[str, Any]) -> dict[str, Any]:
    """Train as configured; returns the loop's result (final file path, saved files, losses)."""
    args = dict(args)
    check_device(args["device"], args["mixed_precision"])
    if not args.get("pretrained_model_name_or_path"):
        raise LoraxInputError("--pretrained_model_name_or_path is required")
    if not args.get("output_dir"):
        raise LoraxInputError("--output_dir is required")
    if args["network_train_unet_only"] and args["network_train_text_encoder_only"]:
        raise LoraxInputError("network_train_unet_only and network_train_text_encoder_only exclude each other")
    check_optimizer_name(args["optimizer_type"])
    check_run(args)  # numbers, dataset TOML, output folder, --resume state: all before the model loads
    quiet_bitsandbytes(args["optimizer_type"])
    if args["progress"] == "off":  # also the libraries' loading bars, so stderr holds only what matters
        import diffusers.utils.logging as d_log
        import transformers.utils.logging as t_log
        d_log.disable_progress_bar()
        t_log.disable_progress_bar()
    for key in ("pretrained_model_name_or_path", "train_data_dir"):
        if args.get(key):
            ensure_embedded(args[key])
    if args.get("num_cpu_threads_per_process"):
        torch.set_num_threads(args["num_cpu_threads_per_process"])
    seed = args["seed"] if args.get("seed") is not None else random.randint(0, 2**31 - 1)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

    accelerator = make_accelerator(args["device"], args["mixed_precision"], args["gradient_accumulation_steps"],
                                   args.get("logging_dir"), args.get("log_with"))
    if accelerator.is_main_process:
        tidy_output_dir(Path(args["output_dir"]), args.get("output_name") or "last")
    with accelerator.main_process_first():
        models = load_models(args["pretrained_model_name_or_path"], args.get("vae"), args["v2"], args["sdxl"],
                             args.get("tokenizer_cache_dir"))
    v_param = bool(args["v_parameterization"])
    reso_default = default_resolution(models.family, v_param)
    if args.get("dataset_config"):
        from .config import read_toml
        for ds in read_toml(args["dataset_config"]).get("datasets", []):
            for ss in ds.get("subsets", []):
                if isinstance(ss.get("image_dir"), str):
                    ensure_embedded(Path(args["dataset_config"]).parent / ss["image_dir"])
    specs = datasets_from_args(args, reso_default)
    data = BucketedDataset(specs, seed, args["prior_loss_weight"])

    train_unet = not args["network_train_text_encoder_only"]
    train_te = not args["network_train_unet_only"]
    module = import_network_module(args["network_module"])
    net_kwargs = network_kwargs(args.get("network_args"), args.get("network_dropout"))
    network = create_network(module, models, args.get("network_dim"), args.get("network_alpha"),
                             args.get("network_dropout"), net_kwargs, args.get("network_weights"), train_unet, train_te)

    if args["gradient_checkpointing"]:
        models.unet.enable_gradient_checkpointing()
        models.unet.train()  # diffusers checkpoints only in train mode
        if train_te:
            for te in models.text_encoders:
                te.gradient_checkpointing_enable()
                te.train()
        if hasattr(network, "enable_gradient_checkpointing"):
            network.enable_gradient_checkpointing()

    groups, descs = optimizer_groups(network, args.get("text_encoder_lr"), args.get("unet_lr"), args["learning_rate"])
    optimizer = make_optimizer(args["optimizer_type"], groups, args["learning_rate"], args.get("optimizer_args"))

    nproc = accelerator.num_processes
    batches_per_epoch = math.ceil(len(data) / nproc)
    updates_per_epoch = math.ceil(batches_per_epoch / args["gradient_accumulation_steps"])
    max_steps = args["max_train_steps"]
    if args.get("max_train_epochs"):
        max_steps = args["max_train_epochs"] * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    warmup = warmup_steps(args["lr_warmup_steps"], max_steps)
    lr_scheduler = make_scheduler(args["lr_scheduler"], optimizer, warmup * nproc, max_steps * nproc,
                                  args["lr_scheduler_num_cycles"], args["lr_scheduler_power"])

    weight_dtype = PRECISION_DTYPES[args["mixed_precision"]]
    device = accelerator.device
    for m in [models.vae, models.unet, *models.text_encoders]:
        # frozen weights in the autocast dtype (kohya); fp32 stays as loaded
        m.to(device) if weight_dtype == torch.float32 else m.to(device, weight_dtype)
    if args["full_fp16"] or args["full_bf16"]:
        network.to(torch.float16 if args["full_fp16"] else torch.bfloat16)
    network.to(device)

    if args["cache_latents"] or args["cache_latents_to_disk"]:
        with accelerator.main_process_first():
            cache_latents(models, data, args["cache_latents_to_disk"], seed, device, weight_dtype)

    # No DDP wrapper for the network: kohya-style training never calls its forward, so DDP could never
    # sync; the loop all-reduces gradients by hand. Registered all the same, for save_state/load_state.
    network = accelerator.prepare_model(network, evaluation_mode=True)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    net = accelerator.unwrap_model(network)
    net.prepare_grad_etc(models.network_text_encoder, models.unet)

    start = TrainState(epoch=1, batch=0, global_step=0, seed=seed)
    if args.get("resume"):
        start = load_state(accelerator, Path(args["resume"]))
        seed = start.seed
        data.seed = seed

    if accelerator.is_main_process and args.get("logging_dir"):
        accelerator.init_trackers((args.get("log_prefix") or "") + "network_train")

    resolution = specs[0].buckets.resolution
    run_info = {
        "num_train_images": data.num_train_images, "num_reg_images": data.num_reg_images,
        "num_batches_per_epoch": batches_per_epoch, "num_epochs": num_epochs, "max_train_steps": max_steps,
        "seed": seed, "optimizer": optimizer_description(optimizer.optimizer if hasattr(optimizer, "optimizer")
                                                          else optimizer, args.get("optimizer_args")),
        "tag_frequency": data.tag_frequency(), "network_kwargs": net_kwargs,
        "datasets": [{"batch_size_per_device": sp.batch_size, "resolution": list(sp.buckets.resolution),
                      "enable_bucket": sp.buckets.enable, "subsets": [
                          {"image_dir": ss.image_dir.name, "num_repeats": ss.num_repeats, "is_reg": ss.is_reg,
                           "class_tokens": ss.class_tokens} for ss in sp.subsets]} for sp in specs],
        "dataset_dirs": {ss.image_dir.name: {"n_repeats": ss.num_repeats} for sp in specs for ss in sp.subsets},
        "batch_size": specs[0].batch_size, "total_batch_size": specs[0].batch_size * nproc *
        args["gradient_accumulation_steps"], "resolution": f"({resolution[0]}, {resolution[1]})",
    }
    base_md = base_metadata(args, models.family, run_info)
    spec_md = modelspec(args, models.family, resolution)
    # no lorax.* keys here: networks.lora_x's save_weights adds them from the ss_* source-model keys, the same
    # way under kohya's trainer (formats.lora_file.lorax_metadata); other network modules get none

    output_name = args.get("output_name") or "last"
    sample_fn = None
    if args.get("sample_prompts"):
        from .sampling import read_prompts, sample_images
        prompts = read_prompts(args["sample_prompts"], resolution[0])

        def sample_fn(suffix: str) -> None:
            if accelerator.is_main_process:
                sample_images(models, prompts, Path(args["output_dir"]) / "sample", output_name, suffix,
                              args["sample_sampler"], v_param, device, seed)

    settings = LoopSettings(
        max_train_steps=max_steps, num_epochs=num_epochs, seed=seed, output_dir=Path(args["output_dir"]),
        output_name=output_name, save_suffix="." + args["save_model_as"],
        save_dtype=precision_dtype(args.get("save_precision")), save_every_n_steps=args.get("save_every_n_steps"),
        save_every_n_epochs=args.get("save_every_n_epochs"), save_state=args["save_state"], v_prediction=v_param,
        min_snr_gamma=args.get("min_snr_gamma"), noise_offset=args.get("noise_offset"),
        clip_skip=args.get("clip_skip"), max_grad_norm=args["max_grad_norm"], train_text_encoder=train_te,
        gradient_checkpointing=args["gradient_checkpointing"], num_workers=args["max_data_loader_n_workers"],
        progress=args["progress"] != "off", sample_every_n_steps=args.get("sample_every_n_steps"),
        sample_every_n_epochs=args.get("sample_every_n_epochs"), lr_descriptions=descs,
        state_identity=run_identity(args))
    try:
        result = train_loop(accelerator, models, network, optimizer, lr_scheduler, data, settings, start,
                            lambda step, epoch: at_save(base_md, spec_md, step, epoch), sample_fn)
    finally:
        accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            accelerator.wait_for_everyone()
            torch.distributed.destroy_process_group()  # else gloo ranks can hang at interpreter exit
    result["family"] = models.family
    return result
