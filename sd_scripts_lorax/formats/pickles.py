"""The one loader of torch pickles (`.ckpt`, `.pt`, `.pth`): `torch.load(weights_only=True)` only, so
no arbitrary code runs; a refusal or a broken file is one line naming the file."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LoraxInputError, first_line

if TYPE_CHECKING:
    import torch

SUFFIXES = (".ckpt", ".pt", ".pth")
MAGICS = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive, a legacy pickle


def load_state_dict(path: Path, what: str) -> dict[str, "torch.Tensor"]:
    """The tensors of a pickled state dict (a Lightning `state_dict` wrapper removed), on the CPU.

    `what` names the kind of file in errors ("torch checkpoint", "LoRA file"). Zip archives are
    memory-mapped; non-tensor entries are dropped.
    """
    import torch  # here, so that the torch-free checkpoint path stays torch-free

    with open(path, "rb") as f:
        is_zip = f.read(4) == MAGICS[0]  # legacy pickles cannot be memory-mapped
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        raise LoraxInputError(
            f"{path}: refused: this pickle holds Python objects beyond tensors ({unpickler_reason(exc)}); "
            f"loading it would run code from the file: convert it to .safetensors with a tool you trust") from None
    except Exception as exc:  # torch raises many types for truncated/corrupt zips and pickles
        raise LoraxInputError(f"{path}: not a readable {what} ({first_line(exc)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoraxInputError(f"{path}: not a state dict (top-level object is {type(obj).__name__})")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def unpickler_reason(exc: BaseException) -> str:
    """The specific part of torch's weights_only refusal (which global was refused), without its
    advice to re-run with weights_only=False and without terminal escape codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            reason = line[len("WeightsUnpickler error:"):].strip()
            return reason.split(". Please use", 1)[0].rstrip(".")[:160]
    return first_line(exc)
