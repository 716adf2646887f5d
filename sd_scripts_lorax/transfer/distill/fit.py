"""The student fit: train the adapter's parameters so that target + adapter matches the teacher.

Objective (all on the synthetic sets of `teacher`):

    L = mean ||eps_{T+A}(x_t, c) - eps_{S+A_s}(x_t, c)||^2            adapter prompts, and the empty prompt
      + keep_weight * mean ||eps_{T+A}(x_t, c') - eps_T(x_t, c')||^2   identity prompts (no trigger), on the
                                                                     target's own samples

The first term is output matching (what the source + adapter does, including how the rest of the
network responds); the second keeps the target's own behaviour where the adapter's prompts do not
apply, so the fine-tune is not pulled back toward the source. Adam on the adapter's parameters only
(learning rate warmed up, then decayed: `lr_factor`; a step's batch optionally in micro-batches);
every random draw comes from one seeded generator, so a seed gives the same result.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .options import DistillOptions
from .teacher import MatchSet, _autocast, _pick


@dataclass
class FitResult:
    curve: list[float] = field(default_factory=list)       # the objective at every step
    match_curve: list[float] = field(default_factory=list)  # its matching term
    seconds: float = 0.0                                     # wall time of the steps alone


def _conds(model, prompts: list[str], grad: bool):
    if grad:
        return model.encode(prompts)
    with torch.no_grad():
        return model.encode(prompts)


def _term(model, s: MatchSet, idx: torch.Tensor, cond, precision: str) -> torch.Tensor:
    dev = model.device
    with _autocast(dev, precision):
        pred = model.eps(s.x[idx].to(dev), s.t[idx].to(dev), _pick(cond, s.p[idx])).float()
    return F.mse_loss(pred, s.y[idx].to(dev))


def fit(model, adapter, match: MatchSet, keep: MatchSet | None, cfg: DistillOptions, precision: str, te_trained: bool,
        progress: Callable[[int, float], None] | None = None) -> FitResult:
    """Run `cfg.steps` Adam steps on `adapter.parameters()`; returns the loss curves."""
    res = FitResult()
    params = adapter.parameters()
    if not params or cfg.steps <= 0:
        return res
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))
    use_keep = keep is not None and len(keep) > 0 and cfg.keep_weight > 0
    # without trained text-encoder modules the conditioning is fixed: encode once
    fixed_m = None if te_trained else _conds(model, match.prompts, False)
    fixed_k = None if (te_trained or not use_keep) else _conds(model, keep.prompts, False)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(match), (min(cfg.batch_size, len(match)),), generator=gen)
        kidx = torch.randint(0, len(keep), (min(cfg.batch_size, len(keep)),), generator=gen) if use_keep else None
        opt.zero_grad(set_to_none=True)
        lm = _accumulate(model, match, idx, fixed_m, precision, cfg.micro_batch, 1.0)
        lk = (_accumulate(model, keep, kidx, fixed_k, precision, cfg.micro_batch, cfg.keep_weight)
              if use_keep else 0.0)
        opt.step()
        sched.step()
        res.curve.append(lm + lk)
        res.match_curve.append(lm)
        if progress is not None:
            progress(step, res.curve[-1])
    res.seconds = time.perf_counter() - t0
    return res


def _accumulate(model, s: MatchSet, idx: torch.Tensor, fixed_cond, precision: str, micro_batch: int,
                weight: float) -> float:
    """weight * the batch's mean squared error, its gradient accumulated micro-batch by micro-batch (the
    same gradient as the whole batch at once, with the activations of one micro-batch in memory)."""
    size = micro_batch if micro_batch > 0 else len(idx)
    total = 0.0
    for start in range(0, len(idx), size):
        part = idx[start:start + size]
        cond = fixed_cond if fixed_cond is not None else _conds(model, s.prompts, True)
        loss = _term(model, s, part, cond, precision) * (weight * len(part) / len(idx))
        loss.backward()
        total += float(loss.detach())
    return total


def lr_factor(step: int, cfg: DistillOptions) -> float:
    """The learning rate at `step` as a share of --lr: a linear warm-up over --lr_warmup_steps, then
    constant, or decaying to 0 at the last step (cosine / linear)."""
    warm = min(cfg.lr_warmup_steps, cfg.steps)
    if step < warm:
        return (step + 1) / (warm + 1)
    if cfg.lr_scheduler == "constant":
        return 1.0
    done = (step - warm) / max(1, cfg.steps - warm)
    if cfg.lr_scheduler == "linear":
        return 1.0 - done
    return 0.5 * (1.0 + math.cos(math.pi * done))


@torch.no_grad()
def predict(model, s: MatchSet, precision: str, batch: int = 32) -> torch.Tensor:
    """The model's current predictions on every item of `s` (float32, CPU)."""
    cond = model.encode(s.prompts)
    out = []
    for i in range(0, len(s), batch):
        idx = torch.arange(i, min(i + batch, len(s)))
        with _autocast(model.device, precision):
            out.append(model.eps(s.x[idx].to(model.device), s.t[idx].to(model.device),
                                 _pick(cond, s.p[idx])).float().cpu())
    return torch.cat(out) if out else torch.zeros_like(s.y)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.mse_loss(a.double(), b.double())) if a.numel() else math.nan


def relative(err: float, base: float) -> float:
    """err / base (0 = perfect, 1 = no better than the baseline); nan when base is 0."""
    return err / base if base > 0 else math.nan
