"""`python -m sd_scripts_lorax <command>`: a thin dispatcher; each command's logic lives in its own module."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .errors import EXIT_BAD_INPUT, cli_errors


def _inspect(args: argparse.Namespace) -> int:
    from .tools.inspect import run

    return run(args.path, base=args.base, as_json=args.json, with_hashes=not args.no_hash)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; each subcommand sets `handler`."""
    parser = argparse.ArgumentParser(prog="python -m sd_scripts_lorax", description="sd-scripts-lorax tools")
    sub = parser.add_subparsers(dest="command", metavar="command")
    p = sub.add_parser("inspect", help="describe a checkpoint or a LoRA file (and check a LoRA against a base)")
    p.add_argument("path", help="checkpoint (.safetensors/.ckpt or diffusers folder) or LoRA .safetensors")
    p.add_argument("--base", metavar="CKPT", help="check that every LoRA module fits this checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-hash", action="store_true", help="skip hashing the file (faster on large checkpoints)")
    p.set_defaults(handler=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the subcommand; bad input prints one `error:` line and exits 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_usage(sys.stderr)
        return EXIT_BAD_INPUT
    with cli_errors():
        return handler(args)


if __name__ == "__main__":
    sys.exit(main())
