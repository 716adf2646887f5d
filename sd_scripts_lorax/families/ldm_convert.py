"""Whole-checkpoint conversion between diffusers/transformers state dicts and single-file layouts.

A conversion is a `Plan`: for every output key, the input key(s) it comes from and one elementwise-
free operation (copy, concatenate rows, slice rows, transpose, 1x1-conv <-> Linear reshape). Plans
are built from shapes alone, so the same plan serves a whole in-memory state dict, a lazily read
file, a tensor-by-tensor streaming writer, or `meta` shapes.

Diffusers-side keys are "<component>/<key>" (component: unet, vae, text_encoder, text_encoder_2);
single-file keys are the original ones (model.diffusion_model.*, first_stage_model.*,
cond_stage_model.*, conditioner.embedders.*).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

from .naming import UnetBlockMap

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# (family) -> [(component, single-file prefix, flavour)]
TE_LAYOUT = {
    "sd1": [("text_encoder", "cond_stage_model.transformer.", "hf")],
    "sd2": [("text_encoder", "cond_stage_model.model.", "open_clip")],
    "sdxl": [("text_encoder", "conditioner.embedders.0.transformer.", "hf"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "open_clip")],
}


@dataclass(frozen=True)
class Step:
    """How one output tensor is made from input tensors."""

    sources: tuple[str, ...]
    op: str = "copy"     # copy | cat | rows | t | to_conv | to_linear | rand
    arg: tuple = ()      # rows: (start, stop); rand: the shape


Plan = dict[str, Step]


def apply_step(step: Step, get: Callable[[str], torch.Tensor], key: str = "", seed: int = 0) -> torch.Tensor:
    """Make one output tensor; `get` returns an input tensor by key."""
    if step.op == "copy":
        return get(step.sources[0])
    if step.op == "cat":
        return torch.cat([get(s) for s in step.sources], dim=0)
    if step.op == "rows":
        return get(step.sources[0])[step.arg[0]: step.arg[1]]
    if step.op == "t":
        return get(step.sources[0]).t().contiguous()
    if step.op == "to_conv":
        w = get(step.sources[0])
        return w.reshape(*w.shape, 1, 1)
    if step.op == "to_linear":
        w = get(step.sources[0])
        return w.reshape(w.shape[0], w.shape[1])
    if step.op == "rand":  # weights nothing reads (e.g. SD2's unused last open_clip layer)
        gen = torch.Generator().manual_seed(_key_seed(seed, key))
        return torch.randn(step.arg, generator=gen) * 0.02
    raise ValueError(f"unknown plan op {step.op!r}")


def step_shape(step: Step, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The output shape of one step, from input shapes only."""
    if step.op == "rand":
        return tuple(step.arg)
    s = tuple(shapes[step.sources[0]])
    if step.op == "cat":
        return (sum(shapes[k][0] for k in step.sources), *s[1:])
    if step.op == "rows":
        return (step.arg[1] - step.arg[0], *s[1:])
    if step.op == "t":
        return (s[1], s[0])
    if step.op == "to_conv":
        return (*s, 1, 1)
    if step.op == "to_linear":
        return s[:2]
    return s


def run_plan(plan: Plan, get: Callable[[str], torch.Tensor], seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (output key, tensor) one at a time, in plan order."""
    for key, step in plan.items():
        yield key, apply_step(step, get, key, seed)


def convert(plan: Plan, state: Mapping[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Apply a plan to a whole in-memory state dict."""
    return dict(run_plan(plan, state.__getitem__, seed))


def plan_shapes(plan: Plan, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {k: step_shape(s, shapes) for k, s in plan.items()}


def _key_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:7], "little")


def _sub(shapes: Mapping[str, tuple], component: str) -> dict[str, tuple]:
    p = component + "/"
    return {k[len(p):]: v for k, v in shapes.items() if k.startswith(p)}


# ---------------------------------------------------------------- UNet (pure renaming)

def unet_to_ldm(shapes: Mapping[str, tuple], block_map: UnetBlockMap | None = None) -> Plan:
    """unet/<diffusers key> -> model.diffusion_model.<LDM key>. Shapes are kept (SD1 1x1 projections
    stay 4-D, SD2/SDXL Linear projections stay 2-D, as in the original files)."""
    inner = _sub(shapes, "unet")
    bm = block_map or UnetBlockMap.from_diffusers_keys(inner)
    return {UNET_PREFIX + bm.to_ldm(k): Step(("unet/" + k,)) for k in inner}


def unet_from_ldm(shapes: Mapping[str, tuple], block_map: UnetBlockMap | None = None) -> Plan:
    inner = {k[len(UNET_PREFIX):]: v for k, v in shapes.items() if k.startswith(UNET_PREFIX)}
    bm = block_map or UnetBlockMap.from_ldm_keys(inner)
    return {"unet/" + bm.to_diffusers(k): Step((UNET_PREFIX + k,)) for k in inner}


# ---------------------------------------------------------------- VAE

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key_to_ldm(key: str, n_up: int) -> str:
    k = key
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    # the LDM decoder numbers its levels from the lowest resolution up: reversed
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
               lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
               lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", k)
    k = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", k)
    if m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)$", k):
        k = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    k = k.replace(".conv_shortcut.", ".nin_shortcut.")
    k = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", k)
    return k


def _is_vae_attn_matrix(ldm_key: str) -> bool:
    return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


def _n_up(keys) -> int:
    ups = {int(m[1]) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    return max(ups) + 1 if ups else 0


def vae_to_ldm(shapes: Mapping[str, tuple]) -> Plan:
    """vae/<diffusers key> -> first_stage_model.<LDM key>; attention matrices become 1x1 convs."""
    inner = _sub(shapes, "vae")
    n_up = _n_up(inner)
    plan = {}
    for k in inner:
        ldm = _vae_key_to_ldm(k, n_up)
        op = "to_conv" if _is_vae_attn_matrix(ldm) and len(inner[k]) == 2 else "copy"
        plan[VAE_PREFIX + ldm] = Step(("vae/" + k,), op)
    return plan


def vae_from_ldm(shapes: Mapping[str, tuple], vae_keys: Mapping[str, tuple] | None = None) -> Plan:
    """first_stage_model.<LDM key> -> vae/<diffusers key>. The inverse is found by converting the
    diffusers keys the LDM levels imply, so both directions share one rule."""
    inner = {k[len(VAE_PREFIX):]: v for k, v in shapes.items() if k.startswith(VAE_PREFIX)}
    n_up = max((int(m[1]) for k in inner if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=-1) + 1
    inverse: dict[str, str] = {}
    for k in inner:
        d = _vae_key_from_ldm(k, n_up)
        inverse[d] = k
    plan = {}
    for d, k in inverse.items():
        op = "to_linear" if _is_vae_attn_matrix(k) and len(inner[k]) == 4 else "copy"
        plan["vae/" + d] = Step((VAE_PREFIX + k,), op)
    return plan


def _vae_key_from_ldm(key: str, n_up: int) -> str:
    k = key
    k = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{n_up - 1 - int(m[1])}.resnets.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
               lambda m: f"decoder.up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0.", k)
    k = re.sub(r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.", k)
    if m := re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.*)$", k):
        back = {v: kk for kk, v in _VAE_ATTN.items()}
        k = f"{m[1]}.mid_block.attentions.0.{back[m[2]]}.{m[3]}"
    k = k.replace(".nin_shortcut.", ".conv_shortcut.")
    k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)
    return k


# ---------------------------------------------------------------- CLIP text encoders

def clip_to_ldm(shapes: Mapping[str, tuple], component: str, prefix: str) -> Plan:
    """transformers CLIP keys (with or without "text_model.") -> prefix + "text_model.<key>"."""
    inner = _sub(shapes, component)
    plan = {}
    for k in inner:
        if k.endswith("position_ids"):
            continue
        out = k if k.startswith("text_model.") or k.startswith("text_projection") else "text_model." + k
        plan[prefix + out] = Step((f"{component}/{k}",))
    return plan


def clip_from_ldm(shapes: Mapping[str, tuple], component: str, prefix: str, text_model_prefix: bool = True) -> Plan:
    """prefix + CLIP keys (with or without "text_model.") -> component/<key>, with "text_model."
    kept or dropped as the receiving transformers model names its parameters."""
    plan = {}
    for k in shapes:
        if not k.startswith(prefix) or k.endswith("position_ids"):
            continue
        inner = k[len(prefix):]
        if not inner.startswith("text_model.") and not inner.startswith("text_projection"):
            inner = "text_model." + inner
        if not text_model_prefix:
            inner = inner.removeprefix("text_model.")
        plan[f"{component}/{inner}"] = Step((k,))
    return plan


_OC_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OC_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def open_clip_to_ldm(shapes: Mapping[str, tuple], component: str, prefix: str, extra_layers: int = 0,
                     projection_dim: int | None = None) -> Plan:
    """transformers CLIP keys -> open_clip keys under `prefix` (e.g. "cond_stage_model.model.").

    q/k/v are fused into `attn.in_proj_weight/bias`; `text_projection` is stored transposed.
    `extra_layers` appends that many random resblocks (SD2's file has a last layer nobody uses);
    `projection_dim` adds a random `text_projection` when the model has none (SD2's CLIPTextModel).
    """
    inner = {k.removeprefix("text_model."): (k, v) for k, v in _sub(shapes, component).items()}
    src = lambda k: f"{component}/{inner[k][0]}"  # noqa: E731
    plan: Plan = {}
    for k, out in _OC_TOP.items():
        if k in inner:
            plan[prefix + out] = Step((src(k),))
    layers = sorted({int(m[1]) for k in inner if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for n in layers:
        base = f"encoder.layers.{n}."
        oc = f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            qkv = tuple(src(f"{base}self_attn.{x}_proj.{kind}") for x in "qkv")
            plan[f"{oc}attn.in_proj_{kind}"] = Step(qkv, "cat")
            for hf, o in _OC_LAYER.items():
                plan[f"{oc}{o}.{kind}"] = Step((src(f"{base}{hf}.{kind}"),))
    if "text_projection.weight" in inner:
        plan[prefix + "text_projection"] = Step((src("text_projection.weight"),), "t")
    if extra_layers or (projection_dim and "text_projection.weight" not in inner):
        d = inner["final_layer_norm.weight"][1][0]
        ff = inner[f"encoder.layers.{layers[0]}.mlp.fc1.weight"][1][0]
        for n in range(len(layers), len(layers) + extra_layers):
            for key, shape in _open_clip_layer_shapes(d, ff).items():
                plan[f"{prefix}transformer.resblocks.{n}.{key}"] = Step((), "rand", shape)
        if projection_dim and "text_projection.weight" not in inner:
            plan[prefix + "text_projection"] = Step((), "rand", (d, projection_dim))
    return plan


def _open_clip_layer_shapes(d: int, ff: int) -> dict[str, tuple[int, ...]]:
    return {"attn.in_proj_weight": (3 * d, d), "attn.in_proj_bias": (3 * d,),
            "attn.out_proj.weight": (d, d), "attn.out_proj.bias": (d,),
            "ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
            "mlp.c_fc.weight": (ff, d), "mlp.c_fc.bias": (ff,), "mlp.c_proj.weight": (d, ff), "mlp.c_proj.bias": (d,)}


def open_clip_from_ldm(shapes: Mapping[str, tuple], component: str, prefix: str, num_layers: int | None = None,
                       text_model_prefix: bool = True, with_projection: bool = True) -> Plan:
    """open_clip keys under `prefix` -> transformers CLIP keys; keeps the first `num_layers`
    resblocks (SD2: all but the last); drops `text_projection` unless `with_projection`."""
    tm = "text_model." if text_model_prefix else ""
    plan: Plan = {}
    for hf, oc in _OC_TOP.items():
        if prefix + oc in shapes:
            plan[f"{component}/{tm}{hf}"] = Step((prefix + oc,))
    layers = sorted({int(m[1]) for k in shapes
                     if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k))})
    if num_layers is not None:
        layers = layers[:num_layers]
    for n in layers:
        oc = f"{prefix}transformer.resblocks.{n}."
        base = f"{component}/{tm}encoder.layers.{n}."
        for kind in ("weight", "bias"):
            fused = f"{oc}attn.in_proj_{kind}"
            d = shapes[fused][0] // 3
            for i, x in enumerate("qkv"):
                plan[f"{base}self_attn.{x}_proj.{kind}"] = Step((fused,), "rows", (i * d, (i + 1) * d))
            for hf, o in _OC_LAYER.items():
                plan[f"{base}{hf}.{kind}"] = Step((f"{oc}{o}.{kind}",))
    if with_projection and prefix + "text_projection" in shapes:
        plan[f"{component}/text_projection.weight"] = Step((prefix + "text_projection",), "t")
    return plan


# ---------------------------------------------------------------- whole checkpoints

def to_single_file(family: str, shapes: Mapping[str, tuple], block_map: UnetBlockMap | None = None,
                   sd2_projection_dim: int | None = None) -> Plan:
    """diffusers-side "<component>/<key>" shapes -> plan for the family's single file."""
    plan = unet_to_ldm(shapes, block_map)
    plan.update(vae_to_ldm(shapes))
    for component, prefix, flavour in TE_LAYOUT[family]:
        if flavour == "hf":
            plan.update(clip_to_ldm(shapes, component, prefix))
        else:
            extra = 1 if family == "sd2" else 0
            plan.update(open_clip_to_ldm(shapes, component, prefix, extra_layers=extra,
                                         projection_dim=sd2_projection_dim if family == "sd2" else None))
    return plan


def from_single_file(family: str, shapes: Mapping[str, tuple], text_model_prefix: Mapping[str, bool] | None = None,
                     block_map: UnetBlockMap | None = None) -> Plan:
    """single-file shapes -> plan for "<component>/<key>" diffusers-side state dicts.

    `text_model_prefix[component]` says whether the receiving text encoder names its parameters
    with "text_model." (transformers 5: CLIPTextModel no, CLIPTextModelWithProjection yes)."""
    tmp = dict(text_model_prefix or {})
    plan = unet_from_ldm(shapes, block_map)
    plan.update(vae_from_ldm(shapes))
    for component, prefix, flavour in TE_LAYOUT[family]:
        keep = tmp.get(component, True)
        if flavour == "hf":
            plan.update(clip_from_ldm(shapes, component, prefix, keep))
        else:
            layers = {int(m[1]) for k in shapes
                      if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k))}
            # SD2: kohya and diffusers both drop open_clip-H's last layer; SD2's TE has no projection
            n = len(layers) - 1 if family == "sd2" else None
            plan.update(open_clip_from_ldm(shapes, component, prefix, n, keep, with_projection=family != "sd2"))
    return plan


def model_state_shapes(state: Mapping[str, torch.Tensor], component: str) -> dict[str, tuple[int, ...]]:
    """"<component>/<key>" -> shape, for a module's state dict (works on the meta device)."""
    return {f"{component}/{k}": tuple(v.shape) for k, v in state.items()}
