"""Precision names on the command lines and the torch dtypes they stand for: kohya's
`--mixed_precision` and `--save_precision`, the transfer's `--precision` / `--save_precision`, the
fixtures' `--dtype`. The one table of these names (each command line lists the names its options
accept); the safetensors dtype codes ("F16", "BF16", ...) are `safetensors_io`'s.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import LoraxInputError

PRECISION_DTYPES: dict[str, torch.dtype] = {
    "float": torch.float32,  # kohya's --save_precision spelling
    "fp32": torch.float32,
    "no": torch.float32,     # --mixed_precision no: no autocast, the weights stay float32
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


def precision_dtype(name: str | None, option: str = "precision",
                    choices: Sequence[str] = tuple(PRECISION_DTYPES)) -> torch.dtype | None:
    """The dtype a precision name stands for; None for None (an option not given: keep the dtype).

    A name outside `choices` is one LoraxInputError line naming `--option`."""
    if name is None:
        return None
    if name not in choices:
        raise LoraxInputError(f"--{option} must be one of {', '.join(choices)}, got {name!r}")
    return PRECISION_DTYPES[name]


__all__ = ["PRECISION_DTYPES", "precision_dtype"]
