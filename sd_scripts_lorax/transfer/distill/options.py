"""The distillation's options (no torch import: the command line reads their defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import LoraxInputError

PARAM_MODES = ("d", "core")


@dataclass(frozen=True)
class DistillOptions:
    """The distillation's settings; the defaults need no tuning (see README)."""

    steps: int = 400
    lr: float = 5e-3
    batch_size: int = 8
    seed: int = 0
    samples: int = 64          # teacher latents
    draws: int = 4             # noised copies of each latent
    sample_steps: int = 20     # DDIM steps of the teacher's sampler
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
        if not isinstance(self.keep_samples, int) or self.keep_samples < 0:
            raise LoraxInputError(f"--keep_samples must be >= 0, got {self.keep_samples!r}")
        for flag, v in {"--lr": self.lr, "--guidance": self.guidance, "--keep_weight": self.keep_weight}.items():
            if not math.isfinite(float(v)) or float(v) < 0 or (flag == "--lr" and float(v) == 0):
                raise LoraxInputError(f"{flag} must be a finite {'positive' if flag == '--lr' else 'non-negative'} "
                                      f"number, got {v!r}")
        if self.params not in PARAM_MODES:
            raise LoraxInputError(f"--distill_params must be one of {', '.join(PARAM_MODES)}, got {self.params!r}")
