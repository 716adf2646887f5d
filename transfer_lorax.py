"""Training-free LoRA-X transfer: LoRA file(s) + source checkpoint + target checkpoint -> LoRA-X for the target.

    python transfer_lorax.py --lora style.safetensors --source_model sd15.safetensors \\
        --target_model realistic_vision/ --save_to style_rv.safetensors --report report.json

All the work is in the library (`--method` picks an entry of sd_scripts_lorax.transfer.methods.METHODS:
project = engine.transfer(), distill = distill.run.distill_transfer()); this file only parses arguments.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The command line (flags are a public contract: docs/design.md §5)."""
    p = argparse.ArgumentParser(
        prog="transfer_lorax.py",
        description="Carry LoRA-X adapters from a source checkpoint to a related target checkpoint "
                    "(fine-tune, merge, distillation) with the closed-form projection of LoRA-X (Eq. 3).")
    p.add_argument("--lora", nargs="+", required=True, metavar="SRC.safetensors",
                   help="LoRA(-X) file(s) trained on the source model; several share the target's SVDs")
    p.add_argument("--source_model", required=True, help="source checkpoint: .safetensors file or diffusers folder")
    p.add_argument("--target_model", required=True, help="target checkpoint: .safetensors file or diffusers folder")
    p.add_argument("--save_to", default=None,
                   help="output .safetensors (one --lora) or an existing folder (one file per --lora)")
    p.add_argument("--threshold", type=float, default=0.8,
                   help="transfer a module only if its subspace similarity phi >= this (default 0.8)")
    p.add_argument("--filter_blocks", nargs="+", default=[], metavar="PATTERN",
                   help="fnmatch globs on kohya module names never transferred, e.g. 'lora_te_*' '*attn2*'")
    from sd_scripts_lorax.transfer.matching import MATCHERS
    from sd_scripts_lorax.transfer.methods import METHODS, add_distill_arguments

    p.add_argument("--match", choices=list(MATCHERS), default="name",
                   help="pair modules by name (default) or by subspace similarity (distilled targets)")

    p.add_argument("--method", choices=list(METHODS), default="project",
                   help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + " (default project)")
    p.add_argument("--report", default=None, metavar="REPORT.json", help="write the per-module report as JSON")
    p.add_argument("--plot", default=None, metavar="PLOT.png", help="write a per-block similarity heat map")
    p.add_argument("--dry_run", action="store_true", help="compute and report only; write no adapter")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", choices=["float", "fp16", "bf16"], default="float",
                   help="compute dtype of the projections (SVDs are always float32 or better)")
    p.add_argument("--save_precision", choices=["fp16", "bf16", "float"], default=None,
                   help="dtype of the saved adapter (default: the input's)")
    p.add_argument("--svd_cache_dir", default=None, help="folder caching the bases between runs")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_distill_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the transfer, print the report tables.

    Ctrl-C (also while the libraries import): one line, exit 130; the outputs are written as one
    unit at the very end, so an interrupted run leaves none of them (nor a temporary file).
    """
    reports = None
    try:
        args = build_parser().parse_args(argv)
        from sd_scripts_lorax.errors import cli_errors
        from sd_scripts_lorax.transfer import methods
        from sd_scripts_lorax.transfer.engine import print_tables

        with cli_errors():
            reports = methods.run(args)  # --method's entry in the registry (project: engine.transfer)
            print_tables(reports)
            for rep in reports:
                if rep.output:
                    print(f"wrote {rep.output}")
    except KeyboardInterrupt:
        done = "the outputs were already complete" if reports is not None else "no output was written"
        print(f"\ninterrupted: {done}", file=sys.stderr)
        raise SystemExit(130) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
