"""`python -m sd_scripts_lorax inspect`: what a checkpoint or a LoRA file is, and whether they fit.

`inspect_path` builds a JSON-able report (a dict with at least `kind` and `family`);
`format_report` renders it as a compact aligned table; `run` is what the CLI calls.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..families import detect
from ..formats.checkpoint import Checkpoint
from ..lorax.factors import factors_fit
from ..formats.lora_file import read_lora
from ..formats.safetensors_header import read_header
from ..errors import LoraxInputError
from ..formats.hashing import FileHashes, hash_file

BASE_MODEL_FIELDS = ("ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_base_model_version",
                     "modelspec.architecture")
LIST_LIMIT = 10
_PARTS = ("unet", "te", "te1", "te2")


@dataclass(frozen=True)
class LoraEntry:
    """What inspect needs of one LoRA module: factor shapes, stored alpha, dtype."""

    down: tuple[int, ...]
    up: tuple[int, ...]
    alpha: float          # as stored; the rank when the file stores none (kohya's default)
    dtype: str


# ---------------------------------------------------------------- entry point


def run(path: str | os.PathLike, base: str | os.PathLike | None = None, as_json: bool = False,
        with_hashes: bool = True) -> int:
    """Inspect `path` (optionally against checkpoint `base`) and print a table or one JSON object."""
    report = inspect_path(path, base=base, with_hashes=with_hashes)
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    return 0


def inspect_path(path: str | os.PathLike, base: str | os.PathLike | None = None,
                 with_hashes: bool = True) -> dict[str, Any]:
    """A report on a checkpoint or a LoRA file; LoraxInputError on bad input."""
    path = Path(path)
    if not path.exists():
        raise LoraxInputError(f"{path}: no such file or folder")
    if is_lora_file(path):
        return lora_report(path, base=base, with_hashes=with_hashes)
    if base is not None:
        raise LoraxInputError(f"{path}: --base only applies to a LoRA file, and this is a checkpoint")
    return checkpoint_report(path, with_hashes=with_hashes)


def is_lora_file(path: Path) -> bool:
    """A safetensors file with kohya `lora_down`/`lora_up` keys (header only; validates the file)."""
    if path.is_dir():
        return False
    if path.suffix.lower() in (".ckpt", ".pt", ".pth"):
        return _pickle_has_lora_keys(path)
    header = read_header(path)
    return any(".lora_down." in k or ".lora_up." in k for k in header.tensors)


# ---------------------------------------------------------------- checkpoints


def _pickle_has_lora_keys(path: Path) -> bool:
    """A torch-saved LoRA (kohya writes .pt/.ckpt LoRAs too), told from a checkpoint by its key names
    without unpickling: the names sit in the pickle itself (a zip archive's data.pkl; a legacy
    file's first part, before the tensor bytes), so no tensor is read here."""
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
            f.seek(0)
            data = b"" if is_zip else f.read(8 << 20)
        if is_zip:
            with zipfile.ZipFile(path) as z:
                pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                data = z.read(pkl[0]) if pkl else b""
    except (OSError, zipfile.BadZipFile):
        return False  # the checkpoint reader says what is wrong with the file
    return b".lora_down." in data or b".lora_up." in data


def checkpoint_report(path: Path, with_hashes: bool = True) -> dict[str, Any]:
    """Family, layout, dtypes, kohya-targetable module counts per part and group, hashes."""
    with Checkpoint.open(path) as ck:
        counts: dict[str, dict[str, int]] = {}
        for ref in ck.modules().values():
            part = counts.setdefault(ref.part, {"attn": 0, "conv": 0})
            part[ref.group] = part.get(ref.group, 0) + 1
        keys = ck.keys()
        report: dict[str, Any] = {
            "kind": "checkpoint",
            "path": str(path),
            "name": ck.name,
            "family": ck.family,
            "layout": ck.layout,
            "dtypes": {str(dt).removeprefix("torch."): n for dt, n in sorted(ck.dtypes().items(), key=str)},
            "tensors": len(keys),
            "ema_tensors": sum(k.startswith("model_ema.") for k in keys),
            "modules": {p: counts[p] for p in _PARTS if p in counts},
        }
        if with_hashes:
            report["hashes"] = _hash_dict(ck.hashes())
    return report


def _hash_dict(h: FileHashes) -> dict[str, str | None]:
    return {"sha256": h.sha256, "autov2": h.autov2, "legacy": h.legacy, "addnet": h.addnet}


# ---------------------------------------------------------------- LoRA files


def read_lora_entries(path: Path) -> tuple[dict[str, LoraEntry], dict[str, str]]:
    """The modules and metadata of a LoRA file, read and validated by `lora_file.read_lora`."""
    lf = read_lora(path)
    entries = {name: LoraEntry(tuple(m.down.shape), tuple(m.up.shape), float(m.alpha),
                               str(m.down.dtype).removeprefix("torch."))
               for name, m in lf.modules.items()}
    return entries, dict(lf.metadata)


def lora_report(path: Path, base: str | os.PathLike | None = None, with_hashes: bool = True) -> dict[str, Any]:
    """Network module, ranks, alphas, counts per part, LoRA-X or not, base-model fields, fit to `base`."""
    entries, meta = read_lora_entries(path)
    family, family_source = lora_family(entries, meta)
    ranks = [e.down[0] for e in entries.values()]
    alphas = [e.alpha if e.alpha is not None else float(e.down[0]) for e in entries.values()]
    parts = Counter(_part(name) for name in entries)
    report: dict[str, Any] = {
        "kind": "lora",
        "path": str(path),
        "name": path.name,
        "family": family,
        "family_source": family_source,
        "network_module": meta.get("ss_network_module"),
        "is_lorax": any(k.startswith("lorax.") for k in meta),
        "modules": len(entries),
        "parts": {p: parts[p] for p in (*_PARTS, "other") if parts.get(p)},
        "conv_kxk_modules": sum(len(e.down) == 4 and e.down[2:] != (1, 1) for e in entries.values()),
        "rank": _spread(ranks),
        "alpha": _spread(alphas),
        "dtypes": dict(Counter(e.dtype for e in entries.values())),
        "base_model": {k: v for k, v in meta.items()
                       if k in BASE_MODEL_FIELDS or k.startswith(("lorax.source_", "lorax.target_"))},
        "lorax": {k: v for k, v in meta.items() if k.startswith("lorax.")},
    }
    if with_hashes:
        h = hash_file(path)
        report["hashes"] = _hash_dict(h)
        if "sshs_model_hash" in meta:  # kohya's sshs hash covers only the tensor data, as addnet does
            report["sshs_model_hash_matches"] = meta["sshs_model_hash"] == h.addnet
    if base is not None:
        report["base"] = base_fit(entries, family, Path(base))
    return report


def _part(name: str) -> str:
    for part in ("unet", "te1", "te2", "te"):  # longest prefixes first
        if name.startswith(f"lora_{part}_"):
            return part
    return "other"


def _spread(values: Iterable[float]) -> dict[str, float | None]:
    values = list(values)
    if not values:
        return {"min": None, "max": None, "most_common": None}
    return {"min": _num(min(values)), "max": _num(max(values)),
            "most_common": _num(Counter(values).most_common(1)[0][0])}


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)


def lora_family(entries: Mapping[str, LoraEntry], meta: Mapping[str, str]) -> tuple[str, str]:
    """`(family, where it came from)`: see `families.detect.lora_family`."""
    family, evidence = detect.lora_family({n: e.down for n, e in entries.items()}, meta)
    return family or detect.SD1_OR_SD2, evidence


def base_fit(entries: Mapping[str, LoraEntry], lora_family_: str, base: Path) -> dict[str, Any]:
    """Does every LoRA module map onto a module of `base` with matching shape?"""
    with Checkpoint.open(base) as ck:
        refs = ck.modules()
        problems = []
        for name, e in entries.items():
            ref = refs.get(name)
            if ref is None:
                problems.append(f"{name}: no such module in {ck.name}")
            elif not factors_fit(e.up, e.down, ref.shape):
                problems.append(f"{name}: down {list(e.down)} up {list(e.up)} vs weight {list(ref.shape)}")
        return {
            "path": str(base),
            "family": ck.family,
            "family_matches": detect.fits(lora_family_, ck.family),
            "fits": len(entries) - len(problems),
            "total": len(entries),
            "ok": not problems,
            "problems": problems[:LIST_LIMIT],
            "problem_count": len(problems),
        }


# ---------------------------------------------------------------- human output


def format_report(report: Mapping[str, Any]) -> str:
    """A compact, aligned two-column table of a report."""
    rows: list[tuple[str, str]] = []
    skip = {"modules", "parts", "rank", "alpha", "dtypes", "base_model", "lorax", "hashes", "base"}
    for key, value in report.items():
        if key not in skip:
            rows.append((key, _cell(value)))
    if report["kind"] == "checkpoint":
        rows.append(("dtypes", _inline(report["dtypes"])))
        for part, groups in report["modules"].items():
            rows.append((f"modules {part}", _inline(groups)))
    else:
        rows.append(("modules", str(report["modules"])))
        rows.append(("parts", _inline(report["parts"])))
        rows.append(("rank", _inline(report["rank"])))
        rows.append(("alpha", _inline(report["alpha"])))
        rows.append(("dtypes", _inline(report["dtypes"])))
        for k, v in {**report["base_model"], **report["lorax"]}.items():
            rows.append((k, v))
    for k, v in report.get("hashes", {}).items():
        rows.append((f"hash {k}", _cell(v)))
    if "base" in report:
        b = report["base"]
        rows.append(("base", f"{b['path']} ({b['family']})"))
        rows.append(("base family matches", _cell(b["family_matches"])))
        rows.append(("base fits", f"{b['fits']}/{b['total']}"))
        for p in b["problems"]:
            rows.append(("  mismatch", p))
        if b["problem_count"] > len(b["problems"]):
            rows.append(("  ...", f"{b['problem_count'] - len(b['problems'])} more"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _inline(d: Mapping[str, Any]) -> str:
    return "  ".join(f"{k}={_cell(v)}" for k, v in d.items()) or "-"
