"""What the transfer checks before any work: its options, its output paths, and that the LoRA files,
the source and the target fit together (family, module names, shapes). Each problem is one
LoraxInputError line naming the file, the module and the shapes.
"""

from __future__ import annotations

import fnmatch
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from ..errors import LoraxInputError
from ..formats.finite import all_finite

if TYPE_CHECKING:
    from ..formats.checkpoint import Checkpoint
    from ..formats.lora_file import LoraFile

MATCH_MODES = ("name", "similarity")
PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAVE_PRECISIONS = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
                   "bf16": torch.bfloat16}


def check_options(threshold: float, match: str, device: str, precision: str,
                   save_precision: str | None) -> torch.device:
    if not (isinstance(threshold, (int, float)) and 0.0 <= float(threshold) <= 1.0):
        raise LoraxInputError(f"--threshold must be in [0, 1], got {threshold!r}")
    if match not in MATCH_MODES:
        raise LoraxInputError(f"--match must be one of {', '.join(MATCH_MODES)}, got {match!r}")
    if precision not in PRECISIONS:
        raise LoraxInputError(f"--precision must be one of float, fp16, bf16, got {precision!r}")
    if save_precision is not None and save_precision not in SAVE_PRECISIONS:
        raise LoraxInputError(f"--save_precision must be one of fp16, bf16, float, got {save_precision!r}")
    dev = str(device)
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LoraxInputError(f"--device {dev}: CUDA is not available here (torch {torch.__version__}, "
                                  f"cuda build: {torch.version.cuda or 'none'}); use --device cpu")
    elif dev != "cpu":
        raise LoraxInputError(f"--device must be cpu or cuda, got {dev!r}")
    return torch.device(dev)


def output_paths(loras: Sequence[Path], save_to: str | os.PathLike | None, target_name: str) -> list[Path]:
    """Where each input's output goes: SAVE_TO itself (one input, *.safetensors) or a file in folder SAVE_TO."""
    if save_to is None:
        raise LoraxInputError("no output given: pass --save_to OUT.safetensors|FOLDER (or --dry_run)")
    save_to = Path(save_to)
    if save_to.suffix == ".safetensors" and not save_to.is_dir():
        if len(loras) > 1:
            raise LoraxInputError(f"{save_to}: {len(loras)} --lora inputs need an output folder, not one file")
        return [save_to]
    if not save_to.is_dir():
        raise LoraxInputError(f"{save_to}: output folder does not exist")
    target_stem = Path(target_name).stem or "target"
    outs = [save_to / f"{p.stem}_to_{target_stem}.safetensors" for p in loras]
    if len(set(outs)) != len(outs):
        raise LoraxInputError(f"{save_to}: two --lora inputs share a file name; give them distinct names")
    return outs


def side_paths(path: str | os.PathLike | None, loras: Sequence[Path], per_input: bool) -> list[Path | None]:
    """Report/plot paths: the path itself, or with several inputs ``<stem>.<lora stem><suffix>`` each."""
    if path is None:
        return [None] * len(loras)
    path = Path(path)
    if not per_input or len(loras) == 1:
        return [path] * len(loras)
    return [path.with_name(f"{path.stem}.{p.stem}{path.suffix}") for p in loras]


def filtered(name: str, patterns: Sequence[str]) -> bool:
    short = name[len("lora_"):] if name.startswith("lora_") else name
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(short, p) for p in patterns)


def lora_family_hint(names: Iterable[str], metadata: dict[str, str]) -> str | None:
    """"sdxl" / "sd1-or-sd2" from the LoRA's names (te1/te2, input_blocks) or kohya metadata, else None."""
    names = list(names)
    if any(n.startswith(("lora_te1_", "lora_te2_")) or n.startswith("lora_unet_input_blocks_")
           or n.startswith("lora_unet_output_blocks_") or n.startswith("lora_unet_middle_block_")
           for n in names):
        return "sdxl"
    if any(n.startswith("lora_te_") or n.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_",
                                                    "lora_unet_mid_block_")) for n in names):
        return "sd1-or-sd2"
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl"
    if version.startswith(("sd_v1", "sd_v2")):
        return "sd1-or-sd2"
    return None


def _shape_str(shape: Iterable[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def check_lora_against_source(lora: "LoraFile", src: "Checkpoint") -> None:
    """The LoRA's family, module names and factor shapes must fit the source checkpoint."""
    hint = lora_family_hint(lora.modules, lora.metadata)
    src_is_xl = src.family == "sdxl"
    if hint is not None and (hint == "sdxl") != src_is_xl:
        example = next(iter(sorted(lora.modules)), "?")
        raise LoraxInputError(
            f"{lora.path}: LoRA is for {'SDXL' if hint == 'sdxl' else 'SD1/SD2'} (e.g. module {example}) but "
            f"the source model {src.path} is {src.family}: a LoRA transfers only within one family")
    refs = src.modules()
    for name in sorted(lora.modules):
        mod = lora.modules[name]
        ref = refs.get(name)
        if ref is None:
            raise LoraxInputError(f"{lora.path}: module {name} maps to nothing in the source model {src.path} "
                                  f"({src.family}, {len(refs)} modules)")
        out, n = ref.shape[0], math.prod(ref.shape[1:])
        up_out, down_n = mod.up.shape[0], math.prod(mod.down.shape[1:])
        if up_out != out or down_n != n or mod.up.shape[1] != mod.down.shape[0]:
            raise LoraxInputError(
                f"{lora.path}: module {name} has up {_shape_str(mod.up.shape)} / down {_shape_str(mod.down.shape)} "
                f"but the source weight {ref.key} in {src.path} is {_shape_str(ref.shape)}")
        for what, t in (("up", mod.up), ("down", mod.down)):
            if not all_finite(t):
                raise LoraxInputError(f"{lora.path}: module {name} {what} {_shape_str(t.shape)} contains NaN/Inf")


def check_checkpoints(src: "Checkpoint", tgt: "Checkpoint", names: Iterable[str]) -> None:
    """Same family; the modules the LoRAs touch must (mostly) have the same shapes in both models.

    A different architecture (more than half of the touched modules shaped differently) is an error
    naming the first mismatch; isolated mismatches are reported per module as "shape mismatch".
    """
    if src.family != tgt.family:
        raise LoraxInputError(f"source model {src.path} is {src.family} but target model {tgt.path} is "
                              f"{tgt.family}: transfer works only within one family")
    s_refs, t_refs = src.modules(), tgt.modules()
    shared = [n for n in sorted(names) if n in s_refs and n in t_refs]
    bad = [n for n in shared if tuple(s_refs[n].shape) != tuple(t_refs[n].shape)]
    if bad and 2 * len(bad) > len(shared):
        n = bad[0]
        raise LoraxInputError(
            f"source model {src.path} and target model {tgt.path} have different shapes: module {n} is "
            f"{_shape_str(s_refs[n].shape)} in the source and {_shape_str(t_refs[n].shape)} in the target "
            f"({len(bad)} of {len(shared)} modules differ)")
