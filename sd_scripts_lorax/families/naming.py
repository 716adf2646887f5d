"""kohya LoRA names <-> diffusers module paths <-> checkpoint keys, for SD1/SD2/SDXL.

Pure string and shape logic: no torch model is needed. Kohya names replace every "." of a module
path with "_", and module paths themselves contain "_", so a kohya name is never split back into a
path; instead the checkpoint's own keys are flattened the same way (`index_modules`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from ..errors import LoraxInputError

PARTS = ("unet", "te", "te1", "te2")
FAMILIES = ("sd1", "sd2", "sdxl")
LAYOUTS = ("single_file", "diffusers")


def kohya_name(part: str, module_path: str) -> str:
    """kohya's LoRA module name: "lora_" + part + "_" + module path with "." -> "_"."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")
    return f"lora_{part}_{module_path.replace('.', '_')}"


def part_of(lora_name: str) -> str:
    """The part ("unet", "te", "te1", "te2") a kohya LoRA name belongs to."""
    # Longest prefixes first: "lora_te1_" must not be read as "lora_te" + "1_...".
    for part in ("unet", "te1", "te2", "te"):
        if lora_name.startswith(f"lora_{part}_"):
            return part
    raise ValueError(f"{lora_name!r} is not a kohya LoRA name (expected lora_unet_/lora_te_/lora_te1_/lora_te2_)")


# ---------------------------------------------------------------- UNet block correspondence

# diffusers ResnetBlock2D children -> LDM/SAI ResBlock children
RESNET_CHILDREN = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

# top-level modules outside the blocks
_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


@dataclass(frozen=True)
class _Structure:
    """What the correspondence depends on: the UNet's block structure, not its widths."""

    layers: int                       # layers_per_block (L); up blocks have L + 1 resnets
    down_attn: tuple[bool, ...]       # per down level: has attentions
    down_sample: tuple[bool, ...]     # per down level: has a downsampler
    up_attn: tuple[bool, ...]         # per up level: has attentions
    up_sample: tuple[bool, ...]       # per up level: has an upsampler
    mid_attn: bool = True             # mid block has an attention between its two resnets


class UnetBlockMap:
    """diffusers <-> LDM/SAI UNet prefix correspondence, derived from the block structure.

    `to_ldm` / `to_diffusers` accept full parameter keys ("down_blocks.0.resnets.0.conv1.weight")
    or module paths ("down_blocks.1.attentions.0"); anything below a block that has no counterpart
    rename (attention children, parameter suffixes) is kept as is.
    """

    def __init__(self, structure: _Structure):
        self.structure = structure
        self._d2l: dict[str, str] = {}
        self._build()
        self._l2d = {v: k for k, v in self._d2l.items()}
        if len(self._l2d) != len(self._d2l):  # a collision would make the map non-invertible
            raise ValueError("UNet block map is not one-to-one")

    # -- construction

    @classmethod
    def from_diffusers_config(cls, cfg: Mapping) -> "UnetBlockMap":
        """From a UNet2DConditionModel config (dict or FrozenDict)."""
        layers = cfg.get("layers_per_block", 2)
        if not isinstance(layers, int):
            if len(set(layers)) != 1:
                raise ValueError(f"per-level layers_per_block {layers} has no LDM counterpart")
            layers = layers[0]
        down = list(cfg["down_block_types"])
        up = list(cfg["up_block_types"])
        mid_type = cfg.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
        return cls(_Structure(
            layers=layers,
            down_attn=tuple("CrossAttn" in t or t.startswith("Attn") for t in down),
            down_sample=tuple(i < len(down) - 1 for i in range(len(down))),
            up_attn=tuple("CrossAttn" in t or t.startswith("Attn") for t in up),
            up_sample=tuple(i < len(up) - 1 for i in range(len(up))),
            mid_attn="CrossAttn" in mid_type or mid_type == "UNetMidBlock2DSimpleCrossAttn",
        ))

    @classmethod
    def from_diffusers_keys(cls, keys: Iterable[str]) -> "UnetBlockMap":
        """From the parameter keys of a diffusers UNet state dict (no prefix)."""
        down_res: dict[int, set[int]] = {}
        down_attn, down_sample, up_attn, up_sample, up_levels = set(), set(), set(), set(), set()
        mid_attn = False
        for k in keys:
            if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.", k):
                i, kind, j = int(m[1]), m[2], int(m[3])
                down_res.setdefault(i, set())
                if kind == "resnets":
                    down_res[i].add(j)
                elif kind == "attentions":
                    down_attn.add(i)
                else:
                    down_sample.add(i)
            elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.", k):
                i = int(m[1])
                up_levels.add(i)
                if m[2] == "attentions":
                    up_attn.add(i)
                elif m[2] == "upsamplers":
                    up_sample.add(i)
            elif k.startswith("mid_block.attentions."):
                mid_attn = True
        if not down_res:
            raise ValueError("no down_blocks.* keys: not a diffusers UNet state dict")
        layers = max(len(v) for v in down_res.values())
        n, n_up = max(down_res) + 1, max(up_levels) + 1 if up_levels else 0
        return cls(_Structure(
            layers=layers,
            down_attn=tuple(i in down_attn for i in range(n)),
            down_sample=tuple(i in down_sample for i in range(n)),
            up_attn=tuple(i in up_attn for i in range(n_up)),
            up_sample=tuple(i in up_sample for i in range(n_up)),
            mid_attn=mid_attn,
        ))

    @classmethod
    def from_ldm_keys(cls, keys: Iterable[str]) -> "UnetBlockMap":
        """From LDM/SAI UNet keys, with or without the "model.diffusion_model." prefix."""
        inputs: dict[int, set[str]] = {}
        outputs: dict[int, set[str]] = {}
        middle: set[str] = set()
        for k in keys:
            k = k.removeprefix("model.diffusion_model.")
            if m := re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", k):
                inputs.setdefault(int(m[1]), set()).add(f"{m[2]}.{m[3]}")
            elif m := re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", k):
                outputs.setdefault(int(m[1]), set()).add(f"{m[2]}.{m[3]}")
            elif m := re.match(r"middle_block\.(\d+)\.(.*)", k):
                middle.add(f"{m[1]}.{m[2]}")
        if not inputs or not outputs:
            raise ValueError("no input_blocks/output_blocks keys: not an LDM UNet state dict")
        ops = sorted(i for i, sub in inputs.items() if any(s.startswith("0.op.") for s in sub))
        # The first downsampler sits right after level 0's L blocks (input_blocks.0 is conv_in).
        layers = ops[0] - 1 if ops else max(inputs)
        n = len(outputs) // (layers + 1)
        if n * (layers + 1) != len(outputs):
            raise ValueError(f"{len(outputs)} output_blocks do not split into levels of {layers + 1}")

        def has(sub: set[str], prefix: str) -> bool:
            return any(s.startswith(prefix) for s in sub)

        down_attn = tuple(has(inputs.get(i * (layers + 1) + 1, set()), "1.") for i in range(n))
        down_sample = tuple(((i + 1) * (layers + 1)) in ops for i in range(n))
        up_attn = tuple(has(outputs.get(i * (layers + 1), set()), "1.") for i in range(n))
        up_sample = tuple(
            any(re.match(r"[12]\.conv\.", s) for s in outputs.get(i * (layers + 1) + layers, set()))
            for i in range(n))
        return cls(_Structure(layers, down_attn, down_sample, up_attn, up_sample,
                              mid_attn=(any(s.startswith("1.") for s in middle)
                                        and any(s.startswith("2.") for s in middle))))

    # -- the table

    def _add_resnet(self, d: str, ldm: str) -> None:
        self._d2l[d] = ldm
        for dc, lc in RESNET_CHILDREN.items():
            self._d2l[f"{d}.{dc}"] = f"{ldm}.{lc}"

    def _build(self) -> None:
        s = self.structure
        L = s.layers
        self._d2l.update(_TOP_LEVEL)
        for i in range(len(s.down_attn)):
            for j in range(L):
                n = i * (L + 1) + j + 1
                self._add_resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0")
                if s.down_attn[i]:
                    self._d2l[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
            if s.down_sample[i]:
                n = (i + 1) * (L + 1)
                self._d2l[f"down_blocks.{i}.downsamplers.0"] = f"input_blocks.{n}.0"
                self._d2l[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
        for i in range(len(s.up_attn)):
            for j in range(L + 1):
                n = i * (L + 1) + j
                self._add_resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0")
                if s.up_attn[i]:
                    self._d2l[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
            if s.up_sample[i]:
                n = i * (L + 1) + L
                self._d2l[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{n}.{2 if s.up_attn[i] else 1}"
        self._add_resnet("mid_block.resnets.0", "middle_block.0")
        if s.mid_attn:
            self._d2l["mid_block.attentions.0"] = "middle_block.1"
            self._add_resnet("mid_block.resnets.1", "middle_block.2")
        else:
            self._add_resnet("mid_block.resnets.1", "middle_block.1")

    # -- lookups

    @staticmethod
    def _lookup(key: str, table: dict[str, str]) -> str | None:
        parts = key.split(".")
        for cut in range(len(parts), 0, -1):  # longest known prefix wins
            hit = table.get(".".join(parts[:cut]))
            if hit is not None:
                return ".".join([hit, *parts[cut:]])
        return None

    def to_ldm(self, key: str) -> str:
        """diffusers UNet key or module path -> LDM/SAI one (no "model.diffusion_model." prefix)."""
        out = self._lookup(key, self._d2l)
        if out is None:
            raise KeyError(f"UNet key {key!r} has no LDM counterpart")
        return out

    def to_diffusers(self, key: str) -> str:
        """LDM/SAI UNet key or module path (prefix optional) -> diffusers one."""
        out = self._lookup(key.removeprefix("model.diffusion_model."), self._l2d)
        if out is None:
            raise KeyError(f"UNet key {key!r} has no diffusers counterpart")
        return out

    def pairs(self) -> dict[str, str]:
        """The module-prefix table, diffusers -> LDM (a copy)."""
        return dict(self._d2l)


_DEFAULT_MAPS: dict[str, UnetBlockMap] = {}


def default_block_map(family: str) -> UnetBlockMap:
    """The block map of the family's published UNet (tiny configs share the block structure)."""
    if family not in _DEFAULT_MAPS:
        from .model_configs import unet_config
        _DEFAULT_MAPS[family] = UnetBlockMap.from_diffusers_config(unet_config(family, "full"))
    return _DEFAULT_MAPS[family]


def unet_path_to_kohya(path: str, family: str, block_map: UnetBlockMap | None = None) -> str:
    """A live diffusers UNet module path -> kohya's module path (SD1/2: unchanged; SDXL: SAI style)."""
    if family in ("sd1", "sd2"):
        return path
    if family == "sdxl":
        return (block_map or default_block_map(family)).to_ldm(path)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def te_path_to_kohya(path: str) -> str:
    """A live CLIP text-encoder module path -> kohya's, always starting with "text_model."."""
    # transformers 5 builds CLIPTextModel without the `text_model` submodule; kohya's names keep it.
    return path if path.startswith("text_model.") else f"text_model.{path}"


# ---------------------------------------------------------------- checkpoint index

GROUPS = ("attn", "conv")


@dataclass(frozen=True)
class ModuleRef:
    """One kohya-targetable module of a checkpoint and where its weight lives."""

    lora_name: str                  # kohya name, e.g. "lora_unet_down_blocks_0_attentions_0_proj_in"
    part: str                       # "unet" | "te" | "te1" | "te2"
    key: str                        # the checkpoint key that holds the weight
    rows: tuple[int, int] | None    # row slice [start, stop) of a fused open_clip in_proj_weight
    shape: tuple[int, ...]          # the weight's shape after slicing, as stored in the checkpoint
    group: str                      # "attn" (kohya default targets) | "conv" (ResBlock/Down/Upsample children)

    @property
    def is_conv_kxk(self) -> bool:
        """4-D with a kernel larger than 1x1 (kohya gives these conv_dim, not network_dim)."""
        return len(self.shape) == 4 and (self.shape[2] > 1 or self.shape[3] > 1)


# Where each part lives, per layout: (key prefix, part, text-encoder flavour) -- flavour "hf" for
# transformers' CLIP keys, "open_clip" for the fused open_clip layout; None for the UNet.
_SINGLE_FILE_PREFIXES = {
    "sd1": [("model.diffusion_model.", "unet", None),
            ("cond_stage_model.transformer.", "te", "hf")],
    "sd2": [("model.diffusion_model.", "unet", None),
            ("cond_stage_model.model.transformer.", "te", "open_clip"),
            ("cond_stage_model.transformer.", "te", "hf")],
    "sdxl": [("model.diffusion_model.", "unet", None),
             ("conditioner.embedders.0.transformer.", "te1", "hf"),
             ("conditioner.embedders.1.model.transformer.", "te2", "open_clip")],
}
_DIFFUSERS_PREFIXES = {
    "sd1": [("unet/", "unet", None), ("text_encoder/", "te", "hf")],
    "sd2": [("unet/", "unet", None), ("text_encoder/", "te", "hf")],
    "sdxl": [("unet/", "unet", None), ("text_encoder/", "te1", "hf"), ("text_encoder_2/", "te2", "hf")],
}

_HF_TE = re.compile(r"(?:text_model\.)?encoder\.layers\.(\d+)\."
                    r"(self_attn\.(?:q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)\.weight")
_OPEN_CLIP_TE = re.compile(r"resblocks\.(\d+)\."
                           r"(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)")
_OPEN_CLIP_CHILD = {"attn.out_proj.weight": "self_attn.out_proj", "mlp.c_fc.weight": "mlp.fc1",
                    "mlp.c_proj.weight": "mlp.fc2"}
# diffusers UNet paths of targetable modules (weights of 2-D/4-D tensors under these blocks)
_UNET_ATTN = re.compile(r"(?:down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)attentions\.\d+\.")
_UNET_CONV = re.compile(r"(?:down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)"
                        r"(?:resnets\.\d+\.|downsamplers\.0\.conv$|upsamplers\.0\.conv$)")


def _te_prefixes(family: str, layout: str) -> list[tuple[str, str, str | None]]:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if layout == "single_file":
        return _SINGLE_FILE_PREFIXES[family]
    if layout == "diffusers":
        return _DIFFUSERS_PREFIXES[family]
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def unet_group(diffusers_path: str) -> str | None:
    """"attn" / "conv" for a diffusers UNet module path kohya can target, else None."""
    if _UNET_ATTN.match(diffusers_path):
        return "attn"
    if _UNET_CONV.match(diffusers_path):
        return "conv"
    return None


def index_modules(shapes: Mapping[str, tuple[int, ...]], family: str, layout: str) -> dict[str, ModuleRef]:
    """Every kohya-targetable module of a checkpoint, keyed by kohya name.

    `shapes` maps the checkpoint's keys (see docs/architecture.md) to tensor shapes. Names come
    from flattening these keys; EMA copies, the VAE, embeddings, norms and biases are ignored.
    """

    prefixes = _te_prefixes(family, layout)
    out: dict[str, ModuleRef] = {}

    def add(ref: ModuleRef) -> None:
        if ref.lora_name in out:
            raise LoraxInputError(f"checkpoint keys {out[ref.lora_name].key!r} and {ref.key!r} both map to "
                                  f"module {ref.lora_name}")
        out[ref.lora_name] = ref

    # UNet: map keys to diffusers paths (to classify) and to kohya paths (to name)
    unet_prefix = prefixes[0][0]
    unet_keys = {k[len(unet_prefix):]: k for k in shapes if k.startswith(unet_prefix)}
    if unet_keys:
        if layout == "single_file":
            block_map = UnetBlockMap.from_ldm_keys(unet_keys)
        else:
            block_map = UnetBlockMap.from_diffusers_keys(unet_keys)
        for inner, key in unet_keys.items():
            shape = tuple(shapes[key])
            if not inner.endswith(".weight") or len(shape) not in (2, 4):
                continue
            path = inner[: -len(".weight")]
            try:
                d_path = block_map.to_diffusers(path) if layout == "single_file" else path
            except KeyError:
                continue  # keys outside the block structure are never targets
            group = unet_group(d_path)
            if group is None:
                continue
            k_path = block_map.to_ldm(d_path) if family == "sdxl" else d_path
            add(ModuleRef(kohya_name("unet", k_path), "unet", key, None, shape, group))

    # text encoders
    for prefix, part, flavour in prefixes[1:]:
        keys = [k for k in shapes if k.startswith(prefix)]
        if flavour == "hf":
            for key in keys:
                if m := _HF_TE.fullmatch(key[len(prefix):]):
                    path = f"text_model.encoder.layers.{m[1]}.{m[2]}"
                    add(ModuleRef(kohya_name(part, path), part, key, None, tuple(shapes[key]), "attn"))
            continue
        hits = [(int(m[1]), m[2], key) for key in keys if (m := _OPEN_CLIP_TE.fullmatch(key[len(prefix):]))]
        if not hits:
            continue
        # SD2: kohya converts open_clip-H with its last resblock dropped (23 of 24 layers).
        last = max(h[0] for h in hits) if family == "sd2" else None
        for layer, child, key in hits:
            if layer == last:
                continue
            shape = tuple(shapes[key])
            base = f"text_model.encoder.layers.{layer}."
            if child == "attn.in_proj_weight":
                d = shape[0] // 3
                if len(shape) != 2 or shape[0] != 3 * d:
                    raise LoraxInputError(f"{key}: fused in_proj_weight of shape {shape} is not (3*d, d)")
                for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    add(ModuleRef(kohya_name(part, base + "self_attn." + name), part, key,
                                  (i * d, (i + 1) * d), (d, *shape[1:]), "attn"))
            else:
                add(ModuleRef(kohya_name(part, base + _OPEN_CLIP_CHILD[child]), part, key, None, shape, "attn"))
    return out
