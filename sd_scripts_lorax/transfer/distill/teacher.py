"""Synthetic training sets of the distillation: sampled latents, noised, with a model's predictions.

No image is used. A model (the teacher: source + its adapter; or the target alone, for the identity
set) samples latents for prompts with its own scheduler (DDIM, classifier-free guidance). Each latent
is noised at `draws` stratified timesteps with fixed noise, and the model's prediction is recorded
for the prompt and, when `uncond` is set, for the empty prompt too (the classifier-free branch a
sampler also runs). Everything is seeded: the same inputs and settings give the same set.

Sets are cached in the cache folder under `distill/<key>.safetensors`, the key a hash of everything
that decides them (model files' identity, the LoRA file's identity, prompts, settings); a changed
input is a new key, and a corrupt or foreign entry is recomputed, never an error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ...formats.atomic import atomic_write
from .options import HELD_OUT_EVERY

SET_VERSION = "distill-set v1"


@dataclass(frozen=True)
class SetSpec:
    """What decides a set (its cache key), besides the model and adapter files."""

    prompts: tuple[str, ...]
    samples: int          # latents sampled
    draws: int            # noised copies of each latent
    sample_steps: int
    guidance: float
    uncond: bool          # also record the empty-prompt branch
    seed: int
    precision: str


@dataclass
class MatchSet:
    """Items (x_t, t, prompt) with the model's prediction y; `group` = the latent each came from."""

    x: torch.Tensor        # (M, C, h, w) noised latents
    t: torch.Tensor        # (M,) int64 timesteps
    p: torch.Tensor        # (M,) int64 index into `prompts`
    y: torch.Tensor        # (M, C, h, w) the model's prediction
    group: torch.Tensor    # (M,) int64 latent index
    prompts: list[str]     # prompts[p]; "" is the unconditional branch

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def split(self, every: int = HELD_OUT_EVERY) -> tuple["MatchSet", "MatchSet"]:
        """(train, held-out): every `every`-th latent (and all its items) is held out, at least one."""
        n = int(self.group.max()) + 1 if len(self) else 0
        if n < 2:  # nothing to hold out: the held-out figures are then in-sample
            return self, self
        held = (self.group % every) == (every - 1)
        if not bool(held.any()):  # fewer than `every` latents: hold out the last one
            held = self.group == (n - 1)
        return self.subset(~held), self.subset(held)

    def subset(self, mask: torch.Tensor) -> "MatchSet":
        return MatchSet(self.x[mask], self.t[mask], self.p[mask], self.y[mask], self.group[mask], self.prompts)


def cache_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps({"v": SET_VERSION, **identity}, sort_keys=True).encode()).hexdigest()[:32]


def _cache_path(cache_dir: Path | None, key: str) -> Path | None:
    return None if cache_dir is None else cache_dir / "distill" / f"{key}.safetensors"


def load_cached(cache_dir: Path | None, key: str) -> MatchSet | None:
    from safetensors import safe_open

    path = _cache_path(cache_dir, key)
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            parts = {k: f.get_tensor(k) for k in ("x", "t", "p", "y", "group")}
        prompts = json.loads(meta["prompts"])
    except Exception:  # a corrupt or foreign entry costs a recomputation, never an error
        return None
    m = parts["t"].shape[0]
    if any(v.shape[0] != m for v in parts.values()) or parts["x"].shape != parts["y"].shape:
        return None
    return MatchSet(prompts=prompts, **parts)


def store(cache_dir: Path | None, key: str, s: MatchSet) -> None:
    from safetensors.torch import save_file

    path = _cache_path(cache_dir, key)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            save_file({"x": s.x.contiguous(), "t": s.t, "p": s.p, "y": s.y.contiguous(), "group": s.group},
                      str(tmp), metadata={"key": key, "prompts": json.dumps(s.prompts)})
    except OSError:
        pass  # a failed cache write only costs time next run


def _cat_cond(conds):
    from ...train.models import Conditioning

    first = conds[0]
    return Conditioning(torch.cat([c.hidden for c in conds]),
                        None if first.pooled is None else torch.cat([c.pooled for c in conds]),
                        None if first.time_ids is None else torch.cat([c.time_ids for c in conds]))


def _autocast(device: torch.device, precision: str):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def sample_latents(model, prompts: Sequence[str], spec: SetSpec, gen: torch.Generator,
                   batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """`spec.samples` latents, prompt i % len(prompts) each, by the model's scheduler with guidance."""
    sched = model.scheduler
    shape = model.latent_shape()
    idx = torch.arange(spec.samples) % len(prompts)
    cond_all = model.encode(list(prompts))
    uncond = model.encode([""])
    out = []
    for i in range(0, spec.samples, batch):
        sel = idx[i:i + batch]
        b = len(sel)
        x = torch.randn((b, *shape), generator=gen).to(model.device) * sched.init_noise_sigma
        cond = _cat_cond([_pick(uncond, torch.zeros(b, dtype=torch.long)), _pick(cond_all, sel)])
        sched.set_timesteps(spec.sample_steps, device=model.device)
        for t in sched.timesteps:
            xin = sched.scale_model_input(torch.cat([x, x]), t)
            with _autocast(model.device, spec.precision):
                e = model.eps(xin, t.expand(2 * b), cond).float()
            e_u, e_c = e.chunk(2)
            x = sched.step(e_u + spec.guidance * (e_c - e_u), t, x).prev_sample
        out.append(x.float().cpu())
    return torch.cat(out), idx


def _pick(cond, sel: torch.Tensor):
    from ...train.models import Conditioning

    sel = sel.to(cond.hidden.device)
    return Conditioning(cond.hidden[sel], None if cond.pooled is None else cond.pooled[sel],
                        None if cond.time_ids is None else cond.time_ids[sel])


def noised_items(latents: torch.Tensor, prompt_idx: torch.Tensor, n_prompts: int, spec: SetSpec, scheduler,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, prompt index, group): `draws` stratified timesteps per latent; the empty prompt
    (index n_prompts) on a second copy of each when `spec.uncond`."""
    n = latents.shape[0]
    total = int(scheduler.config.num_train_timesteps)
    k = spec.draws
    # stratified: draw j of a latent falls in the j-th of k equal slices of the schedule
    u = torch.rand((n, k), generator=gen, dtype=torch.float64)
    t = ((torch.arange(k, dtype=torch.float64) + u) * total / k).long().clamp_(0, total - 1).reshape(-1)
    x0 = latents.repeat_interleave(k, dim=0)
    noise = torch.randn(x0.shape, generator=gen)
    xt = scheduler.add_noise(x0, noise, t)
    group = torch.arange(n).repeat_interleave(k)
    p = prompt_idx.repeat_interleave(k)
    if spec.uncond:
        xt, t, group = torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([group, group])
        p = torch.cat([p, torch.full_like(p, n_prompts)])
    return xt, t, p, group


@torch.no_grad()
def predictions(model, x: torch.Tensor, t: torch.Tensor, p: torch.Tensor, prompts: Sequence[str],
                precision: str, batch: int = 32) -> torch.Tensor:
    """The model's prediction for every item (float32, CPU)."""
    cond_all = model.encode(list(prompts))
    out = []
    for i in range(0, x.shape[0], batch):
        sl = slice(i, i + batch)
        with _autocast(model.device, precision):
            out.append(model.eps(x[sl].to(model.device), t[sl].to(model.device), _pick(cond_all, p[sl])).float().cpu())
    return torch.cat(out)


def build_set(model, spec: SetSpec) -> MatchSet:
    """Sample, noise and predict with `model` (its current weights: merge an adapter first for a teacher)."""
    gen = torch.Generator().manual_seed(spec.seed)
    latents, idx = sample_latents(model, spec.prompts, spec, gen)
    prompts = list(spec.prompts) + ([""] if spec.uncond else [])
    x, t, p, group = noised_items(latents, idx, len(spec.prompts), spec, model.scheduler, gen)
    y = predictions(model, x, t, p, prompts, spec.precision)
    return MatchSet(x, t, p, y, group, prompts)
