"""The training loop on accelerate: one optimizer step per `gradient_accumulation_steps` batches,
saves and samples at kohya's intervals, resumable bit for bit (see dataset.py for why)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from .checkpoints import TrainState, epoch_name, save_state, save_weights_atomic, step_name
from .dataset import BucketedDataset, EpochView, collate_identity
from .loss import all_snr, diffusion_loss, make_noise_scheduler, sample_noise, sample_timesteps, target_for
from .models import TrainModels, encode_images, encode_text
from .network_setup import call_hook


@dataclass
class LoopSettings:
    max_train_steps: int
    num_epochs: int
    seed: int
    output_dir: Path
    output_name: str
    save_suffix: str = ".safetensors"
    save_dtype: torch.dtype | None = None
    save_every_n_steps: int | None = None
    save_every_n_epochs: int | None = None
    save_state: bool = False
    v_prediction: bool = False
    min_snr_gamma: float | None = None
    noise_offset: float | None = None
    clip_skip: int | None = None
    max_grad_norm: float = 1.0
    train_text_encoder: bool = True
    gradient_checkpointing: bool = False
    num_workers: int = 0
    progress: bool = True
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    lr_descriptions: list[str] = field(default_factory=list)
    state_identity: dict[str, str] = field(default_factory=dict)  # stored with saved states (checks.py)


def step_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """The RNG of one batch (noise, timesteps, VAE posterior), keyed by position: resume needs no replay."""
    return torch.Generator().manual_seed(hash((seed, epoch, batch)) & 0x7FFF_FFFF_FFFF_FFFF)


def compute_loss(models: TrainModels, batch, gen: torch.Generator, scheduler, snr: torch.Tensor,
                 s: LoopSettings, device: torch.device, weight_dtype: torch.dtype, accelerator) -> torch.Tensor:
    if batch.latents is not None:
        latents = batch.latents.to(device, weight_dtype)
    else:
        with torch.no_grad():
            latents = encode_images(models, batch.images.to(device, weight_dtype), gen).to(weight_dtype)
    noise = sample_noise(latents, s.noise_offset, gen)
    timesteps = sample_timesteps(latents.shape[0], gen).to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with accelerator.autocast():
        with torch.set_grad_enabled(s.train_text_encoder):
            cond = encode_text(models, batch.captions, device, s.clip_skip, batch.original_sizes,
                               batch.crop_top_lefts, batch.target_size)
        if s.gradient_checkpointing:
            # the frozen base must not cut the graph of checkpointed blocks
            noisy.requires_grad_(True)
            cond.hidden.requires_grad_(True)
        pred = models.unet(noisy, timesteps, **cond.unet_kwargs()).sample
    target = target_for(scheduler, latents, noise, timesteps, s.v_prediction)
    return diffusion_loss(pred, target, timesteps, batch.loss_weights, snr, s.min_snr_gamma, s.v_prediction)


def train_loop(accelerator, models: TrainModels, network, optimizer, lr_scheduler, data: BucketedDataset,
               s: LoopSettings, start: TrainState, metadata_at: Callable[[int, int], dict[str, str]],
               sample_fn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run to s.max_train_steps; returns {"final": path, "saved": [...], "losses": [...]}."""
    device = accelerator.device
    weight_dtype = next(models.unet.parameters()).dtype
    scheduler = make_noise_scheduler()
    snr = all_snr(scheduler)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    net = accelerator.unwrap_model(network)
    te_arg = models.network_text_encoder
    nproc, rank = accelerator.num_processes, accelerator.process_index
    saved: list[Path] = []
    losses: list[float] = []
    global_step = start.global_step
    bar = tqdm(total=s.max_train_steps, initial=global_step, desc="steps", smoothing=0,
               disable=not (s.progress and accelerator.is_local_main_process))
    s.output_dir.mkdir(parents=True, exist_ok=True)

    def save(stem: str, epoch: int, state_next: TrainState | None) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            path = s.output_dir / f"{stem}{s.save_suffix}"
            saved.append(save_weights_atomic(net, path, s.save_dtype, metadata_at(global_step, epoch)))
        if s.save_state and state_next is not None:
            save_state(accelerator, s.output_dir / f"{stem}-state", state_next, s.state_identity)

    recent: list[float] = []
    started = time.perf_counter()
    done = global_step >= s.max_train_steps
    epoch = start.epoch
    position, mine = start.batch, []
    while not done and epoch <= s.num_epochs:
        call_hook(net, "on_epoch_start", te_arg, models.unet)
        all_batches = data.batches(epoch)
        mine = list(range(len(all_batches)))[rank::nproc]
        first = start.batch if epoch == start.epoch else 0
        view = EpochView(data, epoch, mine[first:])
        loader = torch.utils.data.DataLoader(view, batch_size=None, shuffle=False, num_workers=s.num_workers,
                                             collate_fn=collate_identity)
        position = first
        for k, batch in enumerate(loader):
            batch_id = mine[first + k]
            call_hook(net, "on_step_start", te_arg, models.unet)
            with accelerator.accumulate(network):
                gen = step_generator(s.seed, epoch, batch_id)
                loss = compute_loss(models, batch, gen, scheduler, snr, s, device, weight_dtype, accelerator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    params = [p for p in net.get_trainable_params() if p.grad is not None]
                    if nproc > 1:  # kohya all-reduces by hand: the network's forward never runs, so DDP cannot
                        for p in params:
                            p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))
                    if s.max_grad_norm:
                        accelerator.clip_grad_norm_(params, s.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            position = first + k + 1
            value = float(loss.detach())
            recent = (recent + [value])[-50:]
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            losses.append(value)
            lrs = lr_scheduler.get_last_lr()
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", avg=f"{sum(recent) / len(recent):.4f}", lr=f"{lrs[0]:.2e}")
            logs = {"loss/current": value, "loss/average": sum(recent) / len(recent)}
            for i, lr in enumerate(lrs):
                logs[f"lr/{s.lr_descriptions[i] if i < len(s.lr_descriptions) else i}"] = lr
            accelerator.log(logs, step=global_step)
            finished_epoch = position >= len(mine)
            nxt = TrainState(epoch + 1, 0, global_step, s.seed) if finished_epoch else \
                TrainState(epoch, position, global_step, s.seed)
            if s.save_every_n_steps and global_step % s.save_every_n_steps == 0 and global_step < s.max_train_steps:
                save(step_name(s.output_name, global_step), epoch, nxt)
            if (sample_fn and s.sample_every_n_steps and not s.sample_every_n_epochs
                    and global_step % s.sample_every_n_steps == 0):
                sample_fn(f"{global_step:06d}")
            if global_step >= s.max_train_steps:
                done = True
                break
        if not done or position >= len(mine):
            if s.save_every_n_epochs and epoch % s.save_every_n_epochs == 0 and epoch < s.num_epochs and not done:
                save(epoch_name(s.output_name, epoch), epoch, TrainState(epoch + 1, 0, global_step, s.seed))
            if sample_fn and s.sample_every_n_epochs and epoch % s.sample_every_n_epochs == 0:
                sample_fn(f"e{epoch:06d}")
        if done:
            break
        epoch += 1
    bar.close()
    train_seconds = time.perf_counter() - started
    final_epoch = min(epoch, s.num_epochs)
    final_state = (TrainState(epoch + 1, 0, global_step, s.seed) if position >= len(mine)
                   else TrainState(epoch, position, global_step, s.seed))
    save(s.output_name, final_epoch, final_state)
    in_sync = True
    if nproc > 1:  # every rank must hold the same adapter: gradients were all-reduced each step
        flat = torch.cat([p.detach().float().flatten() for p in net.get_trainable_params()]).to(device)
        gathered = accelerator.gather(flat.unsqueeze(0))
        in_sync = bool((gathered == gathered[0]).all())
    return {"final": s.output_dir / f"{s.output_name}{s.save_suffix}", "saved": saved, "losses": losses,
            "global_step": global_step, "main": accelerator.is_main_process, "ranks_in_sync": in_sync,
            "num_processes": nproc, "train_seconds": train_seconds, "steps_run": global_step - start.global_step}
