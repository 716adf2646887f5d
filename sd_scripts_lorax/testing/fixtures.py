"""Synthetic Stable Diffusion checkpoints for tests and benchmarks, in the layouts users have.

`write_fixture` writes a seeded random SD1/SD2/SDXL model (tiny or full size) as a single
`.safetensors` file or as a diffusers folder that `StableDiffusion(XL)Pipeline.from_pretrained`
loads offline. `derive_fixture` writes a "fine-tune" of an existing fixture. Tensors are made and
written one at a time (full-size models never sit in memory whole).

    python -m sd_scripts_lorax.testing.fixtures --family sd15 --layout single_file --size tiny --seed 0 \
        --out m.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open

from ..errors import LoraxInputError, cli_errors
from ..families import ldm_convert
from ..families.model_configs import build_models, text_encoder_configs
from ..formats.atomic import atomic_write, check_writable
from ..formats.precision import precision_dtype
from ..formats.safetensors_io import UnsupportedError, torch_dtype, write_stream
from .fixture_math import SPECTRA, drift_tensor, init_tensor, key_generator
from .tiny_tokenizer import write_tokenizer

CLI_FAMILIES = {"sd15": "sd1", "sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl"}
DTYPE_NAMES = ("fp32", "fp16", "bf16")  # what --dtype accepts (formats.precision holds their dtypes)
_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True)
_WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                 "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}


# ---------------------------------------------------------------- shapes (meta device)

@lru_cache(maxsize=None)
def _meta(family: str, size: str):
    """Meta-device models, their diffusers-side shapes and the float dtypes of their keys."""
    models = build_models(family, size, device="meta")
    comps = {"unet": models.unet, "vae": models.vae, "text_encoder": models.text_encoders[0]}
    if family == "sdxl":
        comps["text_encoder_2"] = models.text_encoders[1]
    shapes, dtypes = {}, {}
    for c, mod in comps.items():
        for k, v in mod.state_dict().items():
            shapes[f"{c}/{k}"] = tuple(v.shape)
            dtypes[f"{c}/{k}"] = v.dtype
    return comps, shapes, dtypes


def _family(family: str) -> str:
    if family not in CLI_FAMILIES:
        raise LoraxInputError(f"unknown family {family!r}; expected one of sd15, sd2, sdxl")
    return CLI_FAMILIES[family]


def _single_file_plan(family: str, size: str) -> ldm_convert.Plan:
    _, shapes, _ = _meta(family, size)
    proj = text_encoder_configs(family, size)[0]["projection_dim"]
    return ldm_convert.to_single_file(family, shapes, sd2_projection_dim=proj)


def fixture_shapes(family: str, layout: str, size: str = "tiny") -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape of a fixture (no EMA), computed on the meta device."""
    family = _family(family)
    _, shapes, _ = _meta(family, size)
    if layout == "diffusers":
        return dict(shapes)
    if layout == "single_file":
        return ldm_convert.plan_shapes(_single_file_plan(family, size), shapes)
    raise LoraxInputError(f"unknown layout {layout!r}; expected single_file or diffusers")


# ---------------------------------------------------------------- writing fixtures

def _target_dtype(src_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    return dtype if src_dtype.is_floating_point else src_dtype


def _ema_key(ldm_key: str) -> str:
    # LDM stores EMA weights as "model_ema." + the UNet key with its dots removed.
    return "model_ema." + ldm_key.removeprefix("model.").replace(".", "")


def write_fixture(family: str, layout: str, size: str, seed: int, out: str | os.PathLike,
                  dtype: str | torch.dtype = "fp32", ema: bool = False, spectrum: str = "init",
                  overwrite: bool = False) -> Path:
    """Write a seeded random checkpoint; returns its path.

    family: sd15|sd1|sd2|sdxl; layout: single_file|diffusers; size: tiny|full; dtype fp32|fp16|bf16;
    ema adds LDM `model_ema.*` UNet copies (single file only); spectrum init|decaying.
    """
    family = _family(family)
    if size not in ("tiny", "full"):
        raise LoraxInputError(f"unknown size {size!r}; expected tiny or full")
    if spectrum not in SPECTRA:
        raise LoraxInputError(f"unknown spectrum {spectrum!r}; expected one of {SPECTRA}")
    dt = precision_dtype(dtype, "dtype", DTYPE_NAMES) if isinstance(dtype, str) else dtype
    out = check_writable(out, overwrite)
    comps, shapes, dtypes = _meta(family, size)

    def diffusers_tensor(key: str) -> torch.Tensor:
        if not dtypes[key].is_floating_point:  # e.g. position ids: the module's own buffer
            return _buffer_value(key, family, size)
        return init_tensor(key, shapes[key], seed, spectrum)

    meta = {"format": "pt", "lorax.fixture": json.dumps(
        dict(family=family, size=size, seed=seed, spectrum=spectrum, dtype=str(dt).removeprefix("torch.")))}
    if layout == "single_file":
        plan = _single_file_plan(family, size)
        out_shapes = ldm_convert.plan_shapes(plan, shapes)
        entries = [(k, out_shapes[k], _target_dtype(_plan_dtype(plan[k], dtypes), dt)) for k in plan]
        produce = {k: (lambda k=k: ldm_convert.apply_step(plan[k], diffusers_tensor, k, seed)) for k in plan}
        if ema:
            for k in list(plan):
                if k.startswith(ldm_convert.UNET_PREFIX):
                    ek = _ema_key(k)
                    entries.append((ek, out_shapes[k], dt))
                    produce[ek] = (lambda k=k: _ema_value(produce[k](), k, seed))
        with atomic_write(out) as tmp:
            write_stream(tmp, entries, lambda k: produce[k](), meta)
        return out
    if layout != "diffusers":
        raise LoraxInputError(f"unknown layout {layout!r}; expected single_file or diffusers")
    if ema:
        raise LoraxInputError(f"{out}: --ema applies to single_file fixtures only (diffusers folders hold no EMA)")
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_diffusers(tmp_dir, family, size, comps, shapes, dtypes, dt, diffusers_tensor, meta)
        _replace_folder(tmp_dir, out)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    return out


def _plan_dtype(step: ldm_convert.Step, dtypes: dict[str, torch.dtype]) -> torch.dtype:
    return dtypes[step.sources[0]] if step.sources else torch.float32


def _ema_value(t: torch.Tensor, key: str, seed: int) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    return t + torch.randn(t.shape, generator=key_generator(seed, key, "ema")) * 1e-3


def _buffer_value(key: str, family: str, size: str) -> torch.Tensor:
    shape = _meta(family, size)[1][key]
    if key.endswith("position_ids"):
        return torch.arange(shape[-1]).reshape(shape)
    raise ValueError(f"no value recipe for non-float tensor {key}")


def _replace_folder(tmp_dir: Path, out: Path) -> None:
    """Move a finished folder onto `out`; an old `out` is removed only after the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp_dir, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def _write_diffusers(folder: Path, family: str, size: str, comps: dict, shapes: dict, dtypes: dict,
                     dt: torch.dtype, produce: Callable[[str], torch.Tensor], meta: dict[str, str]) -> None:
    from diffusers import EulerDiscreteScheduler, PNDMScheduler


    for c, mod in comps.items():
        sub = folder / c
        sub.mkdir()
        keys = [k for k in shapes if k.startswith(c + "/")]
        entries = [(k.split("/", 1)[1], shapes[k], _target_dtype(dtypes[k], dt)) for k in keys]
        write_stream(sub / _WEIGHT_FILES[c], entries, lambda k, c=c: produce(f"{c}/{k}"), meta)
        if c in ("unet", "vae"):
            mod.save_config(sub)
        else:
            cfg = mod.config
            cfg.architectures = [type(mod).__name__]
            cfg.save_pretrained(sub)
    tok_dirs = ["tokenizer"] + (["tokenizer_2"] if family == "sdxl" else [])
    for t in tok_dirs:
        write_tokenizer(folder / t)
    if family == "sdxl":
        sched = EulerDiscreteScheduler(**{k: v for k, v in _SCHEDULER.items()
                                          if k not in ("set_alpha_to_one", "skip_prk_steps")})
    else:
        sched = PNDMScheduler(**{k: v for k, v in _SCHEDULER.items() if k != "prediction_type"})
    sched.save_pretrained(folder / "scheduler")
    import diffusers
    index = {"_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", type(sched).__name__],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    if family == "sdxl":
        index.update({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"],
                      "image_encoder": [None, None], "feature_extractor": [None, None]})
    else:
        index.update({"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
                      "safety_checker": [None, None], "feature_extractor": [None, None],
                      "image_encoder": [None, None]})
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------- derived ("fine-tuned") fixtures

_TE_PREFIXES = ("text_encoder/", "text_encoder_2/", "cond_stage_model.", "conditioner.")


def _is_text_encoder(key: str) -> bool:
    return key.startswith(_TE_PREFIXES)


def derive_fixture(src: str | os.PathLike, out: str | os.PathLike, drift: float, seed: int,
                   keep_text_encoder: bool = False, overwrite: bool = False) -> Path:
    """Write a fine-tune-like copy of `src` (single file or diffusers folder): same keys, dtypes
    and layout; each 2-D/4-D float tensor moved by a mostly low-rank perturbation of relative
    Frobenius size `drift`. `keep_text_encoder` leaves text-encoder tensors bit-identical."""
    src = Path(src)
    if not src.exists():
        raise LoraxInputError(f"{src}: fixture to derive from does not exist")
    if drift < 0:
        raise LoraxInputError(f"{src}: drift must be >= 0, got {drift}")
    out = check_writable(out, overwrite)
    if src.is_file():
        with atomic_write(out) as tmp:
            _derive_file(src, tmp, drift, seed, keep_text_encoder, key_prefix="")
        return out
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            dest = tmp_dir / rel
            if path.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
            elif path.suffix == ".safetensors":
                dest.parent.mkdir(parents=True, exist_ok=True)
                _derive_file(path, dest, drift, seed, keep_text_encoder, key_prefix=f"{rel.parts[0]}/")
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
        _replace_folder(tmp_dir, out)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    return out


def _derive_file(src: Path, dest: Path, drift: float, seed: int, keep_text_encoder: bool, key_prefix: str) -> None:

    try:
        f = safe_open(str(src), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise LoraxInputError(f"{src}: not a readable safetensors file ({exc})") from None
    with f:
        keys = list(f.keys())
        metadata = f.metadata() or {}
        entries = []
        for k in keys:
            sl = f.get_slice(k)
            entries.append((k, tuple(sl.get_shape()), _dtype_from_st(sl.get_dtype())))

        def produce(k: str) -> torch.Tensor:
            t = f.get_tensor(k)
            full = key_prefix + k
            if t.dim() < 2 or not t.is_floating_point() or (keep_text_encoder and _is_text_encoder(full)):
                return t
            return drift_tensor(t, drift, full, seed)

        write_stream(dest, entries, produce, metadata)


def _dtype_from_st(name: str) -> torch.dtype:
    try:
        return torch_dtype(name)
    except UnsupportedError as exc:
        raise LoraxInputError(str(exc)) from None


# ---------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sd_scripts_lorax.testing.fixtures",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=["sd15", "sd2", "sdxl"])
    p.add_argument("--layout", choices=["single_file", "diffusers"], default="single_file")
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .safetensors file or diffusers folder")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    p.add_argument("--ema", action="store_true", help="add LDM model_ema.* UNet copies (single file)")
    p.add_argument("--spectrum", choices=SPECTRA, default="init")
    p.add_argument("--derive_from", help="write a fine-tune of this fixture instead of a new model")
    p.add_argument("--drift", type=float, default=0.05, help="relative Frobenius size of the change (--derive_from)")
    p.add_argument("--keep_text_encoder", action="store_true", help="leave text-encoder tensors bit-identical")
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Iterable[str] | None = None) -> int:
    args = _parser().parse_args(None if argv is None else list(argv))
    with cli_errors():
        if args.derive_from:
            path = derive_fixture(args.derive_from, args.out, args.drift, args.seed,
                                  keep_text_encoder=args.keep_text_encoder, overwrite=args.overwrite)
        else:
            if not args.family:
                raise LoraxInputError("--family is required unless --derive_from is given")
            path = write_fixture(args.family, args.layout, args.size, args.seed, args.out, dtype=args.dtype,
                                 ema=args.ema, spectrum=args.spectrum, overwrite=args.overwrite)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
