"""Which layers a LoRA-X network adapts and their kohya names, on any model kohya or we pass.

kohya's rule (networks/lora.py): every Linear / Conv2d inside a module whose class name is a
target class. The models are kohya's own classes (`library.original_unet.UNet2DConditionModel`,
whose `config` is a SimpleNamespace; `library.sdxl_original_unet.SdxlUNet2DConditionModel`, already
in SAI paths) or diffusers' / transformers' (our trainer): nothing here may assume a diffusers
`ModelMixin`. Names only: no weights are read, so it runs on the meta device too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from torch import nn

from ..errors import LoraxInputError
from ..families.naming import UnetBlockMap, kohya_name, te_path_to_kohya, unet_path_to_kohya
from .layer import WRAPPABLE, is_kxk

logger = logging.getLogger(__name__)

# Immutable on purpose: kohya's own lora.py extends its class-level list in place (a known pitfall).
UNET_TARGETS: tuple[str, ...] = ("Transformer2DModel",)
UNET_CONV_TARGETS: tuple[str, ...] = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGETS: tuple[str, ...] = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


@dataclass
class Target:
    """One base layer the network adapts."""

    lora_name: str
    part: str          # "unet" | "te" | "te1" | "te2"
    base: nn.Module    # a Linear or Conv2d
    rank: int          # requested rank; the module keeps min(rank, out, in*kh*kw)
    alias: str | None = None  # SDXL: the diffusers-style kohya name that some files use instead


def text_encoder_parts(text_encoder: Any) -> list[tuple[str, nn.Module]]:
    """kohya's TE prefixes: one module or a list of one -> "te"; a list of two -> "te1", "te2"."""
    if text_encoder is None:
        return []
    tes = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    tes = [t for t in tes if t is not None]
    if len(tes) == 1:
        return [("te", tes[0])]
    if len(tes) == 2:
        return [("te1", tes[0]), ("te2", tes[1])]
    raise LoraxInputError(f"networks.lora_x: expected 1 or 2 text encoders, got {len(tes)}")


def unet_naming(unet: nn.Module) -> tuple[str, UnetBlockMap | None]:
    """(family for naming, block map): kohya's SDXL UNet and SD1/2 keep their paths; a diffusers
    SDXL UNet (addition_embed_type "text_time") is mapped to SAI names."""
    if type(unet).__name__ == "SdxlUNet2DConditionModel":
        return "sd1", None  # already SAI-style paths: use them as they are
    config = getattr(unet, "config", None)
    # diffusers' config is a dict (FrozenDict); kohya's own SD1/2 UNet keeps a types.SimpleNamespace
    if isinstance(config, Mapping):
        embed = config.get("addition_embed_type")
    else:
        embed = getattr(config, "addition_embed_type", None)
    if embed == "text_time":
        return "sdxl", UnetBlockMap.from_diffusers_config(config)
    return "sd1", None


def _wrappable_children(root: nn.Module, classes: tuple[str, ...]) -> Iterator[tuple[str, nn.Module]]:
    """(full path, layer) of every Linear/Conv2d inside a module whose class name is in `classes`."""
    for name, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            if child_name and type(child).__name__ in WRAPPABLE:
                yield f"{name}.{child_name}" if name else child_name, child


def find_targets(text_encoder: Any, unet: nn.Module | None, rank: int, conv_rank: int | None,
                 ranks: Mapping[str, int] | None = None) -> list[Target]:
    """The layers kohya's rules select, named the kohya way.

    With `ranks` (from a weights file) the conv classes are searched too and only the names in
    `ranks` are kept, at their given rank; otherwise Linear / 1x1 convs get `rank` and kxk convs
    `conv_rank` (skipped when it is None; conv classes are searched only when it is given).
    """
    search: list[tuple[str, nn.Module, tuple[str, ...], Any, bool]] = []
    for part, te in text_encoder_parts(text_encoder):
        search.append((part, te, TE_TARGETS, te_path_to_kohya, False))
    if unet is not None:
        family, block_map = unet_naming(unet)
        classes = UNET_TARGETS + (UNET_CONV_TARGETS if (conv_rank is not None or ranks is not None) else ())
        search.append(("unet", unet, classes, lambda p: unet_path_to_kohya(p, family, block_map), family == "sdxl"))
    targets: dict[str, Target] = {}
    seen: set[int] = set()
    for part, root, classes, to_kohya, aliased in search:
        for path, layer in _wrappable_children(root, classes):
            if id(layer) in seen:
                continue  # nested target classes reach the same layer twice
            seen.add(id(layer))
            name = kohya_name(part, to_kohya(path))
            # kohya also reads SDXL files written with diffusers-style UNet names
            alias = kohya_name(part, path) if aliased else None
            if name in targets:
                raise LoraxInputError(f"networks.lora_x: two layers map to the same name {name}")
            if ranks is not None:
                r = ranks.get(name, ranks.get(alias)) if alias else ranks.get(name)
                if r is None:
                    continue
            else:
                r = conv_rank if is_kxk(layer) else rank
                if r is None:
                    continue
            if type(layer).__name__ == "Conv2d" and layer.groups != 1:
                logger.warning("networks.lora_x: skipping grouped conv %s (groups=%d)", name, layer.groups)
                continue
            targets[name] = Target(name, part, layer, int(r), alias)
    return list(targets.values())


