"""Dataset settings: kohya's --dataset_config TOML ([general], [[datasets]], [[datasets.subsets]]) or
the --train_data_dir / --reg_data_dir folder layout (<repeats>_<class tokens>).

Lookup order for every setting: subset > dataset > general > command line > default. Relative
image_dir values resolve against the dataset TOML's folder. Errors name the key and the file.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import LoraxInputError
from .buckets import BucketSpec
from .config import parse_resolution, read_toml

# key -> expected TOML type(s); dataset-level keys may appear in [general] or [[datasets]]
DATASET_KEYS: dict[str, tuple[type, ...]] = {
    "resolution": (int, list, str), "batch_size": (int,), "enable_bucket": (bool,),
    "min_bucket_reso": (int,), "max_bucket_reso": (int,), "bucket_reso_steps": (int,),
    "bucket_no_upscale": (bool,),
}
# subset-level keys may appear at any level
SUBSET_KEYS: dict[str, tuple[type, ...]] = {
    "num_repeats": (int,), "shuffle_caption": (bool,), "keep_tokens": (int,), "flip_aug": (bool,),
    "caption_dropout_rate": (int, float), "caption_extension": (str,), "class_tokens": (str,),
}
SUBSET_ONLY_KEYS: dict[str, tuple[type, ...]] = {"image_dir": (str,), "is_reg": (bool,)}

# command-line option names for the dataset-level fallbacks
CLI_NAMES = {"batch_size": "train_batch_size"}


@dataclass(frozen=True)
class SubsetSpec:
    image_dir: Path
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    num_repeats: int = 1
    shuffle_caption: bool = False
    keep_tokens: int = 0
    flip_aug: bool = False
    caption_dropout_rate: float = 0.0
    is_reg: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    batch_size: int
    buckets: BucketSpec
    subsets: tuple[SubsetSpec, ...] = field(default_factory=tuple)


def _check_keys(table: Mapping[str, Any], allowed: Mapping[str, tuple[type, ...]], where: str) -> dict[str, Any]:
    out = {}
    for k, v in table.items():
        if k in ("datasets", "subsets"):
            continue
        if k not in allowed:
            warnings.warn(f"{where}: unknown key {k!r} ignored", stacklevel=3)
            continue
        types = allowed[k]
        if isinstance(v, bool) and bool not in types or not isinstance(v, types):
            expected = "/".join(t.__name__ for t in types)
            raise LoraxInputError(f"{where}: key {k!r} has a bad value {v!r}; expected {expected}")
        out[k] = v
    return out


def _pick(key: str, levels: list[Mapping[str, Any]], cli: Mapping[str, Any], default: Any) -> Any:
    for level in levels:
        if level.get(key) is not None:
            return level[key]
    value = cli.get(CLI_NAMES.get(key, key))
    return default if value is None else value


def _bucket_spec(levels: list[Mapping[str, Any]], cli: Mapping[str, Any], default_reso: int, where: str) -> BucketSpec:
    reso = _pick("resolution", levels, cli, None)
    if isinstance(reso, list):
        reso = ",".join(str(r) for r in reso)
    resolution = parse_resolution(None if reso is None else str(reso), default_reso)
    spec = BucketSpec(
        resolution=resolution,
        enable=bool(_pick("enable_bucket", levels, cli, False)),
        min_reso=int(_pick("min_bucket_reso", levels, cli, 256)),
        max_reso=int(_pick("max_bucket_reso", levels, cli, 1024)),
        step=int(_pick("bucket_reso_steps", levels, cli, 64)),
        no_upscale=bool(_pick("bucket_no_upscale", levels, cli, False)),
    )
    if spec.step <= 0 or resolution[0] % spec.step or resolution[1] % spec.step:
        raise LoraxInputError(f"{where}: resolution {resolution[0]}x{resolution[1]} is not divisible by "
                              f"bucket_reso_steps {spec.step}")
    if spec.enable and (spec.min_reso % spec.step or spec.max_reso % spec.step):
        raise LoraxInputError(f"{where}: min_bucket_reso {spec.min_reso} / max_bucket_reso {spec.max_reso} are not "
                              f"divisible by bucket_reso_steps {spec.step}")
    return spec


def _subset_spec(levels: list[Mapping[str, Any]], cli: Mapping[str, Any], image_dir: Path, is_reg: bool) -> SubsetSpec:
    return SubsetSpec(
        image_dir=image_dir,
        class_tokens=_pick("class_tokens", levels, cli, None),
        caption_extension=_pick("caption_extension", levels, cli, ".caption"),
        num_repeats=int(_pick("num_repeats", levels, cli, 1)),
        shuffle_caption=bool(_pick("shuffle_caption", levels, cli, False)),
        keep_tokens=int(_pick("keep_tokens", levels, cli, 0)),
        flip_aug=bool(_pick("flip_aug", levels, cli, False)),
        caption_dropout_rate=float(_pick("caption_dropout_rate", levels, cli, 0.0)),
        is_reg=is_reg,
    )


def load_dataset_config(path: str | os.PathLike, cli: Mapping[str, Any], default_reso: int) -> list[DatasetSpec]:
    """Read a kohya dataset TOML into DatasetSpecs (all settings resolved)."""
    path = Path(path)
    raw = read_toml(path)
    for k in raw:
        if k not in ("general", "datasets"):
            warnings.warn(f"{path}: unknown table {k!r} ignored", stacklevel=2)
    general = _check_keys(raw.get("general", {}), {**DATASET_KEYS, **SUBSET_KEYS}, f"{path} [general]")
    datasets_raw = raw.get("datasets", [])
    if not isinstance(datasets_raw, list) or not datasets_raw:
        raise LoraxInputError(f"{path}: no [[datasets]] table")
    out = []
    for i, ds_raw in enumerate(datasets_raw):
        where = f"{path} [[datasets]] #{i + 1}"
        ds = _check_keys(ds_raw, {**DATASET_KEYS, **SUBSET_KEYS}, where)
        subsets = []
        for j, ss_raw in enumerate(ds_raw.get("subsets", [])):
            swhere = f"{where} subset #{j + 1}"
            ss = _check_keys(ss_raw, {**SUBSET_KEYS, **SUBSET_ONLY_KEYS}, swhere)
            if "image_dir" not in ss:
                raise LoraxInputError(f"{swhere}: key 'image_dir' is required")
            image_dir = Path(ss["image_dir"])
            if not image_dir.is_absolute():
                image_dir = (path.parent / image_dir).resolve()
            subsets.append(_subset_spec([ss, ds, general], cli, image_dir, bool(ss.get("is_reg", False))))
        if not subsets:
            raise LoraxInputError(f"{where}: no [[datasets.subsets]]")
        batch = int(_pick("batch_size", [ds, general], cli, 1))
        out.append(DatasetSpec(batch_size=batch, buckets=_bucket_spec([ds, general], cli, default_reso, where),
                               subsets=tuple(subsets)))
    return out


_FOLDER = re.compile(r"^(\d+)_(.*)$")


def _scan_folder(root: Path, cli: Mapping[str, Any], is_reg: bool) -> list[SubsetSpec]:
    if not root.is_dir():
        raise LoraxInputError(f"{root}: {'reg_data_dir' if is_reg else 'train_data_dir'} not found")
    subsets = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        m = _FOLDER.match(sub.name)
        if not m:
            warnings.warn(f"{sub}: not a <repeats>_<tokens> folder, ignored", stacklevel=3)
            continue
        levels = [{"num_repeats": int(m.group(1)), "class_tokens": m.group(2).strip() or None}]
        subsets.append(_subset_spec(levels, cli, sub, is_reg))
    if not subsets:
        raise LoraxInputError(f"{root}: no <repeats>_<tokens> sub-folders (e.g. 10_sks dog)")
    return subsets


def datasets_from_args(args: Mapping[str, Any], default_reso: int) -> list[DatasetSpec]:
    """--dataset_config if given, else --train_data_dir (+ --reg_data_dir) with the CLI settings."""
    if args.get("dataset_config"):
        return load_dataset_config(args["dataset_config"], args, default_reso)
    if not args.get("train_data_dir"):
        raise LoraxInputError("no training data: pass --dataset_config or --train_data_dir")
    subsets = _scan_folder(Path(args["train_data_dir"]), args, is_reg=False)
    if args.get("reg_data_dir"):
        subsets += _scan_folder(Path(args["reg_data_dir"]), args, is_reg=True)
    return [DatasetSpec(batch_size=int(args.get("train_batch_size") or 1),
                        buckets=_bucket_spec([], args, default_reso, "command line"), subsets=tuple(subsets))]
