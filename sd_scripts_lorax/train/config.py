"""Training arguments: kohya's names and meanings, from the command line and from --config_file TOML.

Precedence: explicit command-line options > --config_file TOML > defaults. TOML sections are
flattened one level deep (section names are free-form, as in kohya). Unlike kohya, TOML values are
type-checked and unknown keys are warned about and dropped, never silently used.

Relative paths inside a TOML file resolve against that file's folder (so a config and its dataset
config can travel together); relative paths on the command line resolve against the working folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import toml

from .. import NETWORK_MODULE
from ..errors import LoraxInputError

FLAG = "flag"  # store_true option
LIST = "list"  # nargs="*" list of strings


def _int_or_float(text: Any) -> int | float:
    """kohya's --lr_warmup_steps: an int, or a float < 1 meaning a fraction of the steps."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return text
    value = float(text)
    return int(value) if value >= 1 and value == int(value) else value


@dataclass(frozen=True)
class Option:
    name: str
    kind: Any  # str, int, float, FLAG, LIST or a converter
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    path: bool = False  # relative values resolve against the TOML file's folder


OPTIONS: tuple[Option, ...] = (
    # model
    Option("pretrained_model_name_or_path", str, None, "base model: single .safetensors file or diffusers folder",
           path=True),
    Option("vae", str, None, "replacement VAE (diffusers folder or single file)", path=True),
    Option("tokenizer_cache_dir", str, None,
           "folder with CLIP tokenizers saved as <hub id with / -> _> (full-size single files, offline)", path=True),
    Option("v2", FLAG, False, "the base model is SD2.x"),
    Option("sdxl", FLAG, False, "the base model is SDXL"),
    Option("v_parameterization", FLAG, False, "train with the v-prediction target"),
    Option("clip_skip", int, None, "use the output of the n-th last text-encoder layer (SD1/2)"),
    Option("device", str, "cpu", "cpu or cuda", choices=("cpu", "cuda")),
    Option("num_cpu_threads_per_process", int, None,
           "torch CPU threads (as accelerate's launcher flag; 1 avoids oversubscription on busy machines)"),
    # network
    Option("network_module", str, NETWORK_MODULE, "kohya-contract network module to train"),
    Option("network_dim", int, None, "rank"),
    Option("network_alpha", float, 1.0, "alpha (scale = alpha / dim)"),
    Option("network_dropout", float, None, "neuron dropout passed to the network"),
    Option("network_args", LIST, None, "extra key=value network arguments"),
    Option("network_weights", str, None, "initial adapter weights", path=True),
    Option("network_train_unet_only", FLAG, False, "train only the UNet part of the adapter"),
    Option("network_train_text_encoder_only", FLAG, False, "train only the text-encoder part"),
    # output
    Option("output_dir", str, None, "folder for the trained files", path=True),
    Option("output_name", str, None, "base name of the trained files"),
    Option("save_model_as", str, "safetensors", "file format", choices=("safetensors", "ckpt", "pt")),
    Option("save_precision", str, None, "dtype of saved weights", choices=("float", "fp16", "bf16")),
    Option("save_every_n_steps", int, None, "save <name>-step<step:08d> every n steps"),
    Option("save_every_n_epochs", int, None, "save <name>-<epoch:06d> every n epochs"),
    Option("save_state", FLAG, False, "also save the optimizer/scheduler/RNG state with every save"),
    Option("resume", str, None, "state folder to resume from", path=True),
    Option("training_comment", str, None, "stored as ss_training_comment"),
    Option("no_metadata", FLAG, False, "store only the minimum metadata"),
    # schedule
    Option("max_train_steps", int, 1600, "number of optimizer steps"),
    Option("max_train_epochs", int, None, "number of epochs (overrides max_train_steps)"),
    Option("train_batch_size", int, 1, "batch size (dataset default)"),
    Option("gradient_accumulation_steps", int, 1, "batches per optimizer step"),
    Option("seed", int, None, "random seed"),
    # optimizer
    Option("learning_rate", float, 1e-4, "default learning rate"),
    Option("unet_lr", float, None, "learning rate of the UNet part"),
    Option("text_encoder_lr", float, None, "learning rate of the text-encoder part"),
    Option("optimizer_type", str, "AdamW", "AdamW, AdamW8bit, ... , SGDNesterov, Adafactor or a dotted class"),
    Option("optimizer_args", LIST, None, "key=value optimizer arguments (values via ast.literal_eval)"),
    Option("lr_scheduler", str, "constant", "learning-rate schedule",
           choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")),
    Option("lr_warmup_steps", _int_or_float, 0, "warmup steps (int) or fraction of the steps (float < 1)"),
    Option("lr_scheduler_num_cycles", int, 1, "cycles of cosine_with_restarts"),
    Option("lr_scheduler_power", float, 1.0, "power of polynomial"),
    Option("max_grad_norm", float, 1.0, "gradient clipping (0 disables)"),
    Option("mixed_precision", str, "no", "autocast dtype", choices=("no", "fp16", "bf16")),
    Option("full_fp16", FLAG, False, "adapter weights in fp16 too"),
    Option("full_bf16", FLAG, False, "adapter weights in bf16 too"),
    Option("gradient_checkpointing", FLAG, False, "recompute activations in backward"),
    # loss
    Option("min_snr_gamma", float, None, "min-SNR weighting gamma"),
    Option("noise_offset", float, None, "noise offset"),
    Option("prior_loss_weight", float, 1.0, "loss weight of regularisation images"),
    # data
    Option("train_data_dir", str, None, "folder of <repeats>_<tokens> sub-folders", path=True),
    Option("reg_data_dir", str, None, "folder of regularisation <repeats>_<tokens> sub-folders", path=True),
    Option("dataset_config", str, None, "dataset TOML", path=True),
    Option("resolution", str, None, "training resolution: 512 or 512,768"),
    Option("caption_extension", str, ".caption", "caption file extension"),
    Option("enable_bucket", FLAG, False, "aspect-ratio buckets"),
    Option("min_bucket_reso", int, 256, "smallest bucket side"),
    Option("max_bucket_reso", int, 1024, "largest bucket side"),
    Option("bucket_reso_steps", int, 64, "bucket side step"),
    Option("bucket_no_upscale", FLAG, False, "never upscale images into a bucket"),
    Option("shuffle_caption", FLAG, False, "shuffle comma-separated caption tags"),
    Option("keep_tokens", int, 0, "leading tags kept in place when shuffling"),
    Option("flip_aug", FLAG, False, "random horizontal flips"),
    Option("caption_dropout_rate", float, 0.0, "probability of an empty caption"),
    Option("cache_latents", FLAG, False, "encode every image once before training"),
    Option("cache_latents_to_disk", FLAG, False, "cache latents as .npz next to the images"),
    Option("max_data_loader_n_workers", int, 0, "DataLoader workers"),
    # sampling and logging
    Option("sample_prompts", str, None, "prompts .txt for sample images", path=True),
    Option("sample_every_n_steps", int, None, "sample every n steps"),
    Option("sample_every_n_epochs", int, None, "sample every n epochs (wins over steps)"),
    Option("sample_sampler", str, "ddim", "sampler for sample images", choices=("ddim", "euler", "euler_a", "ddpm")),
    Option("logging_dir", str, None, "TensorBoard folder", path=True),
    Option("log_with", str, None, "tracker", choices=("tensorboard",)),
    Option("log_prefix", str, None, "prefix of the run folder name"),
    Option("progress", str, "auto", "progress bar", choices=("auto", "on", "off")),
)

OPTIONS_BY_NAME = {o.name: o for o in OPTIONS}
DEFAULTS = {o.name: o.default for o in OPTIONS}


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser; defaults are suppressed so that only explicit options reach the namespace."""
    p = argparse.ArgumentParser(
        prog="train_network_lorax.py", argument_default=argparse.SUPPRESS,
        description="Train a LoRA-X (or any kohya-contract network) on SD1.x/2.x/SDXL.")
    p.add_argument("--config_file", type=str, help="training TOML (sections flattened)")
    p.add_argument("--output_config", action="store_true",
                   help="write the effective config as flat TOML (to --config_file if it does not exist, "
                        "else to stdout) and exit")
    for o in OPTIONS:
        help_ = f"{o.help} (default: {o.default})"
        if o.kind is FLAG:
            p.add_argument(f"--{o.name}", action="store_true", help=help_)
        elif o.kind is LIST:
            p.add_argument(f"--{o.name}", nargs="*", type=str, help=help_)
        else:
            p.add_argument(f"--{o.name}", type=o.kind, choices=o.choices, help=help_)
    return p


def _convert_toml(option: Option, value: Any, where: str) -> Any:
    """Check and convert one TOML value; errors name the key and the file."""
    bad = LoraxInputError(f"{where}: key {option.name!r} has a bad value {value!r} "
                          f"({type(value).__name__}); expected {getattr(option.kind, '__name__', option.kind)}")
    if option.kind is FLAG:
        if not isinstance(value, bool):
            raise bad
        return value
    if option.kind is LIST:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise bad
        return [str(v) for v in value]
    if option.kind is str:
        if option.name == "resolution" and isinstance(value, (int, list)):
            return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
        if not isinstance(value, str):
            raise bad
        if option.choices and value not in option.choices:
            raise LoraxInputError(f"{where}: key {option.name!r} = {value!r} is not one of {list(option.choices)}")
        return value
    if option.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise bad
    if option.kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise bad
    try:
        return option.kind(value)
    except (TypeError, ValueError):
        raise bad from None


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """tomllib.load with a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise LoraxInputError(f"{path}: config file not found" if not path.exists() else f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise LoraxInputError(f"{path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise LoraxInputError(f"{path}: not a TOML text file (not UTF-8; a binary file?)") from None


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Flatten a kohya training TOML; unknown keys are warned about and dropped."""
    path = Path(path)
    if not path.exists() and path.suffix != ".toml":
        path = path.with_name(path.name + ".toml")  # kohya appends .toml when missing
    raw = read_toml(path)
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for k, v in items:
            if isinstance(v, dict):
                raise LoraxInputError(f"{path}: key {k!r} is a nested table; only one level of sections is allowed")
            flat[k] = v
    out: dict[str, Any] = {}
    for k, v in flat.items():
        option = OPTIONS_BY_NAME.get(k)
        if option is None:
            warnings.warn(f"{path}: unknown key {k!r} ignored", stacklevel=2)
            continue
        v = _convert_toml(option, v, str(path))
        if option.path and isinstance(v, str):
            v = str((path.parent / v).resolve()) if not os.path.isabs(v) else v
        out[k] = v
    return out


def parse_args(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Defaults <- --config_file TOML <- explicit CLI options. Returns a flat dict keyed by option name.

    With --output_config, writes the effective config and raises SystemExit(0).
    """
    parser = build_parser()
    cli = vars(parser.parse_args(argv))
    config_file = cli.pop("config_file", None)
    output_config = cli.pop("output_config", False)
    args = dict(DEFAULTS)
    if config_file and not (output_config and not Path(config_file).exists()):
        args.update(load_config_file(config_file))
    args.update(cli)
    if output_config:
        text = dump_config(args)
        if config_file and not Path(config_file).exists():
            from ..formats.atomic import atomic_write
            with atomic_write(config_file) as tmp:
                tmp.write_text(text, encoding="utf-8")
            print(f"wrote {config_file}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        raise SystemExit(0)
    return args


def dump_config(args: dict[str, Any]) -> str:
    """The effective config as flat TOML (None values left out: TOML has no null)."""
    return toml.dumps({k: v for k, v in args.items() if v is not None and k in OPTIONS_BY_NAME})


def parse_resolution(text: str | None, default: int) -> tuple[int, int]:
    """"512" -> (512, 512); "512,768" -> (width, height) as kohya."""
    if text is None:
        return default, default
    parts = [p for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise LoraxInputError(f"resolution {text!r} is not 'N' or 'W,H'") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise LoraxInputError(f"resolution {text!r} is not 'N' or 'W,H'")


def parse_key_values(items: Sequence[str] | None, what: str,
                     convert: Callable[[str], Any] = str) -> dict[str, Any]:
    """kohya's k=v lists, split on the first '='."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise LoraxInputError(f"{what}: {item!r} is not key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = convert(v.strip())
    return out
