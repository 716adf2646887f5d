"""The transfer methods `transfer_lorax.py --method` offers: {name: Method(summary, options, run)}.

- `project`: Eq. 3 (engine.transfer), no model run; the default.
- `distill`: Eq. 3 refined by data-free function matching (distill.distill_transfer): the target with
  the adapter is fitted to the source with its adapter on latents the source samples itself.

Each method's `run(args)` takes the parsed command line and returns the TransferReports it made;
`options` lists the flags that belong to that method only (the entry point refuses them elsewhere).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from ..errors import LoraxInputError


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    options: tuple[str, ...]
    run: Callable[[argparse.Namespace], list]


DISTILL_FLAGS = {  # argparse dest -> (flag, DistillOptions field)
    "steps": ("--steps", "steps"), "lr": ("--lr", "lr"), "batch_size": ("--batch_size", "batch_size"),
    "seed": ("--seed", "seed"), "prompts": ("--prompts", "prompts_file"),
    "distill_samples": ("--distill_samples", "samples"), "distill_draws": ("--distill_draws", "draws"),
    "distill_sample_steps": ("--distill_sample_steps", "sample_steps"), "guidance": ("--guidance", "guidance"),
    "keep_weight": ("--keep_weight", "keep_weight"), "keep_samples": ("--keep_samples", "keep_samples"),
    "distill_params": ("--distill_params", "params"),
    "micro_batch": ("--micro_batch", "micro_batch"), "lr_scheduler": ("--lr_scheduler", "lr_scheduler"),
    "lr_warmup_steps": ("--lr_warmup_steps", "lr_warmup_steps"),
}


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    """The distill method's flags (None = the method's default, so other methods can refuse them)."""
    from .distill.options import LR_SCHEDULERS, DistillOptions

    d = DistillOptions()
    g = p.add_argument_group("--method distill")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompts, one per line (default: the LoRA's ss_tag_frequency captions)")
    g.add_argument("--steps", type=int, default=None, help=f"refinement steps (default {d.steps})")
    g.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {d.lr:g})")
    g.add_argument("--lr_scheduler", choices=list(LR_SCHEDULERS), default=None,
                   help=f"learning-rate schedule after the warm-up (kohya's names; default {d.lr_scheduler})")
    g.add_argument("--lr_warmup_steps", type=int, default=None,
                   help=f"steps of linear warm-up to --lr (default {d.lr_warmup_steps})")
    g.add_argument("--batch_size", type=int, default=None, help=f"items per step (default {d.batch_size})")
    g.add_argument("--micro_batch", type=int, default=None,
                   help="items per forward/backward within a step, the gradient accumulated (default: the whole "
                        "batch; 2 keeps full-size SD1.5 well inside 24 GiB on a CPU)")
    g.add_argument("--seed", type=int, default=None, help=f"seed of every random draw (default {d.seed})")
    g.add_argument("--distill_samples", type=int, default=None,
                   help=f"latents the source + adapter samples (default {d.samples})")
    g.add_argument("--distill_draws", type=int, default=None,
                   help=f"noised copies (timesteps) per latent (default {d.draws})")
    g.add_argument("--distill_sample_steps", type=int, default=None,
                   help=f"sampler steps per latent (default {d.sample_steps})")
    g.add_argument("--guidance", type=float, default=None, help=f"sampler guidance scale (default {d.guidance:g})")
    g.add_argument("--keep_weight", type=float, default=None,
                   help=f"weight of keeping the target's own predictions on prompts without the adapter's "
                        f"trigger (default {d.keep_weight:g}; 0 matches the source + adapter only)")
    g.add_argument("--keep_samples", type=int, default=None,
                   help=f"target latents for those prompts (default {d.keep_samples})")
    g.add_argument("--distill_params", choices=["d", "core"], default=None,
                   help=f"what is trained per module: core (the r x r core C of the target's LoRA-X "
                        f"U_t C V_t^T) or d (r shifts of its diagonal) (default {d.params})")


def _run_project(args: argparse.Namespace) -> list:
    from .engine import transfer

    return transfer(args.lora, args.source_model, args.target_model, args.save_to, threshold=args.threshold,
                    filter_blocks=args.filter_blocks, match=args.match, device=args.device, precision=args.precision,
                    save_precision=args.save_precision, svd_cache_dir=args.svd_cache_dir, overwrite=args.overwrite,
                    dry_run=args.dry_run, report_path=args.report, plot_path=args.plot,
                    progress=not args.no_progress)


def distill_options(args: argparse.Namespace):
    from .distill.options import DistillOptions

    given = {field: getattr(args, dest) for dest, (_, field) in DISTILL_FLAGS.items()
             if getattr(args, dest, None) is not None}
    return DistillOptions(**given)


def _run_distill(args: argparse.Namespace) -> list:
    from .distill.run import distill_transfer

    if len(args.lora) != 1:
        raise LoraxInputError(f"--method distill takes one --lora at a time (got {len(args.lora)})")
    rep, d = distill_transfer(args.lora[0], args.source_model, args.target_model, args.save_to,
                              distill_options(args), threshold=args.threshold, filter_blocks=args.filter_blocks,
                              match=args.match, device=args.device, precision=args.precision,
                              save_precision=args.save_precision, svd_cache_dir=args.svd_cache_dir,
                              overwrite=args.overwrite, dry_run=args.dry_run, report_path=args.report,
                              plot_path=args.plot, progress=not args.no_progress)
    copy = "" if d.match_error_copy is None else f"copy {d.match_error_copy:.3f}, "
    print(f"distill: held-out match error to source + adapter (target without adapter = 1): {copy}"
          f"projection {d.match_error_before:.3f} -> distill {d.match_error_after:.3f} "
          f"({d.trained_modules} modules, {d.options['steps']} steps, {d.seconds['total']:.0f} s; compute "
          f"{100 * d.compute_share:.1f} % of training the adapter on the target, 5000 steps of batch 8)")
    return [rep]


METHODS: dict[str, Method] = {
    "project": Method("project", "Eq. 3: closed-form projection onto the target's bases, no model run (instant)",
                      (), _run_project),
    "distill": Method("distill", "Eq. 3 refined by data-free function matching against source + adapter "
                                 "(runs both models; minutes on a CPU)", tuple(DISTILL_FLAGS), _run_distill),
}


def check_method_options(args: argparse.Namespace) -> None:
    """Refuse a method's own flags given to another method."""
    mine = set(METHODS[args.method].options)
    for m in METHODS.values():
        for dest in m.options:
            if dest not in mine and getattr(args, dest, None) is not None:
                flag = DISTILL_FLAGS.get(dest, (f"--{dest}",))[0]
                raise LoraxInputError(f"{flag} belongs to --method {m.name} (this run uses --method {args.method})")


def run(args: argparse.Namespace) -> list:
    check_method_options(args)
    return METHODS[args.method].run(args)
