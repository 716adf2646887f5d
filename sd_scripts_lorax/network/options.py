"""kohya's arguments to a LoRA-X network, parsed: `network_dim`, `network_alpha`, the dropouts and the
`--network_args` strings (conv_dim, svd_cache_dir, svd_device, svd_method; unknown keys only warn)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import LoraxInputError
from ..lorax import METHODS

logger = logging.getLogger(__name__)

DEFAULT_RANK = 320

KNOWN_ARGS = ("conv_dim", "svd_cache_dir", "svd_device", "svd_method")


@dataclass(frozen=True)
class NetworkOptions:
    """Parsed network settings (kohya passes `network_args` values as strings)."""

    rank: int = DEFAULT_RANK
    conv_rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    svd_cache_dir: str | None = None
    svd_device: str | None = None
    svd_method: str = "auto"


def _positive_int(name: str, value: Any) -> int:
    try:
        as_float = float(value)
        ok = as_float.is_integer() and as_float > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise LoraxInputError(f"network argument {name}={value!r}: expected a positive integer rank")
    return int(as_float)


def _optional_float(name: str, value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise LoraxInputError(f"network argument {name}={value!r}: expected a number") from None


def parse_options(network_dim: Any, network_alpha: Any, neuron_dropout: Any,
                  kwargs: Mapping[str, Any]) -> NetworkOptions:
    """Turn kohya's arguments (numbers or strings) into NetworkOptions; unknown keys only warn."""
    rank = DEFAULT_RANK if network_dim is None else _positive_int("network_dim", network_dim)
    conv = kwargs.get("conv_dim")
    conv_rank = None if conv is None or str(conv).strip().lower() in ("", "none") else _positive_int("conv_dim", conv)
    device = kwargs.get("svd_device")
    if device is not None and str(device).split(":")[0] not in ("cpu", "cuda"):
        raise LoraxInputError(f"network argument svd_device={device!r}: expected cpu or cuda")
    method = str(kwargs.get("svd_method") or "auto")
    if method not in METHODS:
        raise LoraxInputError(f"network argument svd_method={method!r}: expected one of {', '.join(METHODS)}")
    # kohya's trainer injects `dropout` (its --network_dropout, usually None) beside neuron_dropout:
    # the same option, so it is read, not warned about.
    if neuron_dropout is None and kwargs.get("dropout") not in (None, "", "None"):
        neuron_dropout = kwargs["dropout"]
    unknown = sorted(k for k in kwargs if k not in KNOWN_ARGS and k != "dropout")
    if unknown:
        logger.warning("networks.lora_x: ignoring network arguments it does not use: %s", ", ".join(unknown))
    cache = kwargs.get("svd_cache_dir")
    return NetworkOptions(
        rank=rank, conv_rank=conv_rank, alpha=_optional_float("network_alpha", network_alpha),
        dropout=_optional_float("neuron_dropout", neuron_dropout),
        svd_cache_dir=str(cache) if cache not in (None, "", "None") else None,
        svd_device=str(device) if device is not None else None, svd_method=method,
    )


