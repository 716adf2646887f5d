"""What the transfer checks before any work: its options, its output paths, and that the LoRA files,
the source and the target fit together (family, module names, shapes). Each problem is one
LoraxInputError line naming the file, the module and the shapes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from ..errors import LoraxInputError
from ..families import detect
from ..lorax.factors import factors_fit
from .matching import MATCHERS, filtered
from ..formats.finite import all_finite
from ..formats.precision import PRECISION_DTYPES

if TYPE_CHECKING:
    from ..formats.checkpoint import Checkpoint
    from ..formats.lora_file import LoraFile
    from .report import TransferReport

MATCH_MODES = tuple(MATCHERS)
# the names --precision and --save_precision accept (kohya's float/fp16/bf16, and fp32): dtypes from formats.precision
PRECISIONS = {name: PRECISION_DTYPES[name] for name in ("float", "fp32", "fp16", "bf16")}
SAVE_PRECISIONS = PRECISIONS


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
        if save_to.exists() or save_to.suffix:
            # a file name that is not .safetensors (out.txt, out.pt): not a missing folder
            raise LoraxInputError(f"{save_to}: --save_to must be a .safetensors file or an existing folder")
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


def check_filters(lora: "LoraFile", patterns: Sequence[str]) -> None:
    """Refuse, before any work, --filter_blocks that exclude every module of a LoRA file."""
    if patterns and lora.modules and all(filtered(n, patterns) for n in lora.modules):
        raise LoraxInputError(f"{lora.path}: --filter_blocks {' '.join(patterns)} excludes all "
                              f"{len(lora.modules)} modules of this file; nothing would be transferred")


def nothing_passed(path: Path, report: "TransferReport", threshold: float) -> str:
    """Why no module of `path` was kept, by reason (the report's), for the refusal to write an empty file."""
    counts: dict[str, int] = {}
    for m in report.modules:
        counts[m.reason] = counts.get(m.reason, 0) + 1
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
    hint = "lower --threshold" if "below threshold" in counts else "check --filter_blocks and the target model"
    return (f"{path}: no module was transferred ({why}; threshold {threshold}); nothing to write "
            f"({hint}, or use --dry_run to see the report)")


def _shape_str(shape: Iterable[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def check_lora_against_source(lora: "LoraFile", src: "Checkpoint") -> None:
    """The LoRA's family, module names and factor shapes must fit the source checkpoint."""
    family, evidence = detect.lora_family({n: tuple(m.down.shape) for n, m in lora.modules.items()}, lora.metadata)
    if not detect.fits(family, src.family):
        example = next(iter(sorted(lora.modules)), "?")
        raise LoraxInputError(
            f"{lora.path}: LoRA is for {family} (by its {evidence}, e.g. module {example}) but "
            f"the source model {src.path} is {src.family}: a LoRA transfers only within one family")
    refs = src.modules()
    for name in sorted(lora.modules):
        mod = lora.modules[name]
        ref = refs.get(name)
        if ref is None:
            raise LoraxInputError(f"{lora.path}: module {name} maps to nothing in the source model {src.path} "
                                  f"({src.family}, {len(refs)} modules)")
        if not factors_fit(mod.up.shape, mod.down.shape, ref.shape):
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
