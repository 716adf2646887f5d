"""The distillation's options (no torch import: the command line reads their defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import LoraxInputError

PARAM_MODES = ("d", "core")
# Training the adapter on the target with the paper's settings: 5000 steps of batch 8, each item one
# forward and one backward pass through the UNet (counted as 3 forward passes, as the fit's steps are)
PAPER_TRAINING_PASSES = 5000 * 8 * 3
LR_SCHEDULERS = ("constant", "cosine", "linear")
HELD_OUT_EVERY = 8  # every 8th teacher latent is held out for the match error (MatchSet.split)


@dataclass(frozen=True)
class DistillOptions:
    """The distillation's settings; the defaults need no tuning (see README)."""

    # 300 cosine-decayed steps and 16 sampler steps: 8.3 % of training the adapter on the target (the
    # paper's 5000 x 8, by UNet passes). The earlier 400 constant steps and 20 sampler steps cost 10.8 %;
    # benchmarks/reproduce.py moved from 88.1 to 87.4 % (embedded) and 90.5 to 88.0 % (ft-strong) of the
    # trained-on-target gain, inside the 1-5 points of spread across seeds
    steps: int = 300
    lr: float = 5e-3
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 10
    batch_size: int = 8
    # items per forward/backward within a step (0: the whole batch): the same gradient with a fraction
    # of the activation memory; full-size SD1.5 on a CPU peaked at 22.4 GiB with the whole batch of 8
    micro_batch: int = 0
    seed: int = 0
    samples: int = 64          # teacher latents
    draws: int = 4             # noised copies of each latent
    sample_steps: int = 16     # DDIM steps of the teacher's sampler
    guidance: float = 4.0
    # weight of the identity term (0: match the teacher only). Off by default: on the embedded pair
    # matching alone already changed the target's own domain less than an adapter trained on the target
    # (side effect 0.011 vs 0.017) while the term cost 3-9 points of the recovered gain (README)
    keep_weight: float = 0.0
    keep_samples: int = 32     # target latents for the identity prompts
    # "core": the r x r core of U_t core V_t^T (Eq. 3's own form); "d": r shifts on its diagonal.
    # core recovered 87.8 % of the trained-on-target gain on the embedded pair against d's 84.6 %
    params: str = "core"
    prompts_file: str | None = None

    def check(self) -> None:
        ints = {"--steps": self.steps, "--batch_size": self.batch_size, "--distill_samples": self.samples,
                "--distill_draws": self.draws, "--distill_sample_steps": self.sample_steps}
        for flag, v in ints.items():
            if not isinstance(v, int) or v < 1:
                raise LoraxInputError(f"{flag} must be a positive integer, got {v!r}")
        if not isinstance(self.micro_batch, int) or self.micro_batch < 0:
            raise LoraxInputError(f"--micro_batch must be >= 0, got {self.micro_batch!r}")
        if not isinstance(self.lr_warmup_steps, int) or self.lr_warmup_steps < 0:
            raise LoraxInputError(f"--lr_warmup_steps must be >= 0, got {self.lr_warmup_steps!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise LoraxInputError(f"--lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, "
                                  f"got {self.lr_scheduler!r}")
        if not isinstance(self.keep_samples, int) or self.keep_samples < 0:
            raise LoraxInputError(f"--keep_samples must be >= 0, got {self.keep_samples!r}")
        for flag, v in {"--lr": self.lr, "--guidance": self.guidance, "--keep_weight": self.keep_weight}.items():
            if not math.isfinite(float(v)) or float(v) < 0 or (flag == "--lr" and float(v) == 0):
                raise LoraxInputError(f"{flag} must be a finite {'positive' if flag == '--lr' else 'non-negative'} "
                                      f"number, got {v!r}")
        if self.params not in PARAM_MODES:
            raise LoraxInputError(f"--distill_params must be one of {', '.join(PARAM_MODES)}, got {self.params!r}")

    def unet_passes(self, n_prompts: int = 1) -> dict[str, int]:
        """UNet forward passes of one distill run (batch-1 units; a training item counts 3: forward and
        backward), by stage: what `compute_share` compares with training on the target. A rerun with
        the teacher cached skips "sampling" and "teacher"."""
        items = self.samples * self.draws * 2                 # with the prompt and with the empty prompt
        held = _held_latents(self.samples) * self.draws * 2
        keep = self.keep_weight > 0 and self.keep_samples > 0 and n_prompts > 0
        k_items = self.keep_samples * self.draws if keep else 0
        k_held = _held_latents(self.keep_samples) * self.draws if keep else 0
        return {
            "sampling": 2 * self.sample_steps * (self.samples + (self.keep_samples if keep else 0)),  # guided
            "teacher": items + k_items,
            "held_out": 4 * held + 3 * k_held,     # target, projection, copy, result; identity: 3
            "fit": 3 * self.steps * self.batch_size * (2 if keep else 1),
        }

    def compute_share(self, n_prompts: int = 1) -> float:
        """This run's UNet passes as a share of training the adapter on the target (paper's settings)."""
        return sum(self.unet_passes(n_prompts).values()) / PAPER_TRAINING_PASSES


def _held_latents(samples: int, every: int = HELD_OUT_EVERY) -> int:
    """Latents `MatchSet.split` holds out of `samples`."""
    return 0 if samples < 2 else max(1, samples // every)
