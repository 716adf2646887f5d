"""Train a LoRA-X (or any kohya-contract network) on SD1.x/2.x/SDXL with kohya's command line.

    python train_network_lorax.py --config_file configs/tiny_lorax.toml
    accelerate launch train_network_lorax.py --config_file configs/sd15_lorax.toml     # one GPU
    torchrun --nproc_per_node 2 train_network_lorax.py --config_file ...               # 2 CPU processes (gloo)

kohya's options and TOML layouts (--config_file, --dataset_config); relative paths inside a TOML
resolve against that TOML's folder. `accelerate launch --cpu --num_processes 2` starts only one
process with accelerate 1.15; torchrun gives the multi-process CPU run. Bad input: one `error:`
line, exit 2. Ctrl-C: exit 130; every file in the output folder is complete (atomic writes).
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    # kohya imports network modules relative to the script's folder (networks.lora_x)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:  # Ctrl-C while torch/diffusers import (seconds) is one line too, not a traceback
        from sd_scripts_lorax.errors import cli_errors
        from sd_scripts_lorax.train.config import parse_args
        from sd_scripts_lorax.train.run import run_training

        with cli_errors():
            args = parse_args(argv)
            result = run_training(args)
    except KeyboardInterrupt:
        print("\ninterrupted: every file already in the output folder is complete", file=sys.stderr)
        raise SystemExit(130) from None
    if result["main"]:
        sync = f" ({result['num_processes']} processes, ranks in sync: {result['ranks_in_sync']})" \
            if result["num_processes"] > 1 else ""
        print(f"saved {result['final']}{sync}")


if __name__ == "__main__":
    main()
