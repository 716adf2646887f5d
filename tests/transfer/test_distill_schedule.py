"""The distillation's learning-rate schedule and its compute accounting (no model runs)."""

from __future__ import annotations

import argparse

import pytest
import torch

from sd_scripts_lorax.errors import LoraxInputError
from sd_scripts_lorax.transfer.distill.fit import lr_factor
from sd_scripts_lorax.transfer.distill.options import PAPER_TRAINING_PASSES, DistillOptions, _held_latents
from sd_scripts_lorax.transfer.distill.teacher import MatchSet
from sd_scripts_lorax.transfer.methods import add_distill_arguments, distill_options


def test_warm_up_then_cosine_reaches_zero_at_the_end():
    cfg = DistillOptions(steps=100, lr_scheduler="cosine", lr_warmup_steps=10)
    f = [lr_factor(s, cfg) for s in range(cfg.steps)]
    assert f[:10] == sorted(f[:10]) and f[0] < 0.1 and f[9] < 1.0   # rising, never above --lr
    assert f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))              # then only falling
    assert 0 < f[-1] < 1e-3                                          # every step still learns a little


def test_constant_and_linear_schedules():
    const = DistillOptions(steps=50, lr_scheduler="constant", lr_warmup_steps=0)
    assert {lr_factor(s, const) for s in range(50)} == {1.0}
    lin = DistillOptions(steps=50, lr_scheduler="linear", lr_warmup_steps=0)
    assert lr_factor(0, lin) == 1.0 and lr_factor(25, lin) == pytest.approx(0.5)


def test_the_schedule_drives_the_optimizer():
    """fit's LambdaLR: the learning rate each Adam step used is --lr times lr_factor of that step."""
    cfg = DistillOptions(steps=8, lr=0.1, lr_scheduler="cosine", lr_warmup_steps=2)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    used = []
    for _ in range(cfg.steps):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == pytest.approx([cfg.lr * lr_factor(s, cfg) for s in range(cfg.steps)])


@pytest.mark.parametrize("bad", [{"lr_scheduler": "cosine_with_restarts"}, {"lr_warmup_steps": -1},
                                 {"lr_warmup_steps": 1.5}])
def test_bad_schedule_options_are_refused(bad):
    with pytest.raises(LoraxInputError, match="lr_"):
        DistillOptions(**bad).check()


def test_schedule_flags_reach_the_options():
    p = argparse.ArgumentParser()
    add_distill_arguments(p)
    opts = distill_options(p.parse_args(["--lr_scheduler", "linear", "--lr_warmup_steps", "7"]))
    assert (opts.lr_scheduler, opts.lr_warmup_steps) == ("linear", 7)
    default = distill_options(p.parse_args([]))
    assert default == DistillOptions()


@pytest.mark.parametrize("samples", [1, 2, 5, 7, 8, 9, 15, 16, 63, 64, 65])
def test_held_out_count_is_what_split_holds_out(samples):
    groups = torch.arange(samples).repeat_interleave(3)
    s = MatchSet(torch.zeros(len(groups), 1), torch.zeros(len(groups), dtype=torch.long),
                 torch.zeros(len(groups), dtype=torch.long), torch.zeros(len(groups), 1), groups, [""])
    train, held = s.split()
    held_latents = 0 if held is s else int(held.group.unique().numel())
    assert _held_latents(samples) == held_latents


def test_default_distill_costs_at_most_a_tenth_of_training_on_the_target():
    """The issue's compute bar, by UNet passes: the defaults stay within 10 % of the paper's training."""
    d = DistillOptions()
    passes = d.unet_passes()
    assert passes["fit"] == 3 * d.steps * d.batch_size
    assert passes["sampling"] == 2 * d.samples * d.sample_steps
    assert sum(passes.values()) == pytest.approx(d.compute_share() * PAPER_TRAINING_PASSES)
    assert d.compute_share() <= 0.10
    # the identity term doubles the fit and adds its own sampling
    keep = DistillOptions(keep_weight=1.0)
    assert keep.unet_passes(n_prompts=2)["fit"] == 2 * passes["fit"]
    assert keep.compute_share(n_prompts=0) == pytest.approx(d.compute_share())
