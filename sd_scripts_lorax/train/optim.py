"""Optimizer and learning-rate schedule from kohya's --optimizer_type / --lr_scheduler names."""

from __future__ import annotations

import ast
import importlib
from typing import Any, Sequence

import torch

from ..errors import LoraxInputError
from .config import parse_key_values

# kohya names (case-insensitive) of the bitsandbytes optimizers -> class names in bitsandbytes.optim
BNB = {
    "adamw8bit": "AdamW8bit", "pagedadamw8bit": "PagedAdamW8bit", "sgdnesterov8bit": "SGD8bit",
    "lion8bit": "Lion8bit", "pagedlion8bit": "PagedLion8bit", "pagedadamw": "PagedAdamW",
    "pagedadamw32bit": "PagedAdamW32bit", "adam8bit": "Adam8bit",
}


def wants_bitsandbytes(name: str) -> bool:
    return name.lower() in BNB or name.startswith("bitsandbytes.")


def quiet_bitsandbytes(optimizer_type: str) -> None:
    """Keep bitsandbytes out of the run unless an 8-bit optimizer is asked for.

    diffusers and peft import bitsandbytes whenever it is installed (for their quantizers), which
    costs seconds and, on CPUs with AVX512-BF16, logs a "Failed to load CPU gemm_4bit_forward from
    kernels-community" warning that then heads every later error. Without an 8-bit optimizer the
    package is hidden (a None entry in sys.modules: find_spec says absent, import fails cleanly,
    and diffusers' own flag is cleared); with one it is visible again and only that kernel warning
    is silenced (the optimizers do not use the 4-bit kernels).
    """
    import logging
    import sys

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from diffusers.utils import import_utils
    except ImportError:
        import_utils = None
    if wants_bitsandbytes(optimizer_type):
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]  # hidden by an earlier run in this process
            if import_utils is not None and hasattr(import_utils, "_bitsandbytes_available"):
                import_utils._bitsandbytes_available = _HIDDEN.get("diffusers", False)
        return
    if "bitsandbytes" in sys.modules:
        return  # already imported (by the caller): too late to hide, nothing to gain
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    if import_utils is not None and hasattr(import_utils, "_bitsandbytes_available"):
        _HIDDEN.setdefault("diffusers", import_utils._bitsandbytes_available)
        import_utils._bitsandbytes_available = False  # read by diffusers' is_bitsandbytes_available()


_HIDDEN: dict[str, bool] = {}


def check_optimizer_name(name: str) -> None:
    """An unknown --optimizer_type is refused before the model loads (a dotted path is tried later)."""
    key = name.lower()
    if key in ("adamw", "sgdnesterov", "adafactor") or key in BNB or "." in name:
        return
    raise LoraxInputError(f"optimizer_type {name!r} is unknown (AdamW, AdamW8bit, SGDNesterov, Adafactor, "
                          "... or a dotted class path)")


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # kohya keeps unparsable values as strings


def optimizer_kwargs(items: Sequence[str] | None) -> dict[str, Any]:
    return parse_key_values(items, "optimizer_args", _literal)


def make_optimizer(name: str, params: list[dict], lr: float, args: Sequence[str] | None) -> torch.optim.Optimizer:
    """Build the optimizer; unknown names and bad arguments raise LoraxInputError."""
    kw = optimizer_kwargs(args)
    key = name.lower()
    try:
        if key == "adamw":
            return torch.optim.AdamW(params, lr=lr, **kw)
        if key == "sgdnesterov":
            kw.setdefault("momentum", 0.9)
            return torch.optim.SGD(params, lr=lr, nesterov=True, **kw)
        if key in BNB:
            quiet_bitsandbytes(name)  # visible again if an earlier run in this process hid it
            import bitsandbytes.optim as bnb_optim
            if key == "sgdnesterov8bit":
                kw.setdefault("momentum", 0.9)
                kw["nesterov"] = True
            return getattr(bnb_optim, BNB[key])(params, lr=lr, **kw)
        if key == "adafactor":
            from transformers.optimization import Adafactor
            # a fixed lr (kohya's recommended setting) unless the user asks for relative steps
            for k in ("scale_parameter", "relative_step", "warmup_init"):
                kw.setdefault(k, False)
            return Adafactor(params, lr=None if kw["relative_step"] else lr, **kw)
        if "." in name:
            module, cls = name.rsplit(".", 1)
            return getattr(importlib.import_module(module), cls)(params, lr=lr, **kw)
    except (ImportError, AttributeError) as exc:
        raise LoraxInputError(f"optimizer_type {name!r}: cannot be loaded ({exc})") from None
    except TypeError as exc:
        raise LoraxInputError(f"optimizer_type {name!r}: bad optimizer_args {kw} ({exc})") from None
    raise LoraxInputError(f"optimizer_type {name!r} is unknown (AdamW, AdamW8bit, SGDNesterov, Adafactor, "
                          "... or a dotted class path)")


def optimizer_description(opt: torch.optim.Optimizer, args: Sequence[str] | None) -> str:
    """kohya's ss_optimizer: `module.Class(args)`."""
    cls = type(opt)
    extra = ",".join(args or [])
    return f"{cls.__module__}.{cls.__name__}" + (f"({extra})" if extra else "")


def warmup_steps(value: int | float, total_steps: int) -> int:
    """An int, or a float < 1 meaning a fraction of the total steps."""
    if isinstance(value, float) and value < 1:
        return int(value * total_steps)
    return int(value)


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup: int, total_steps: int,
                   num_cycles: int = 1, power: float = 1.0) -> torch.optim.lr_scheduler.LRScheduler:
    from diffusers.optimization import get_scheduler

    if name == "constant" and warmup:
        raise LoraxInputError(f"lr_scheduler 'constant' does not take lr_warmup_steps ({warmup}); "
                              "use constant_with_warmup")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         num_cycles=num_cycles, power=power)
