"""Read and write kohya LoRA(-X) files (docs/design.md §3).

A file holds, per module `<lora_name>`, exactly three tensors: `.lora_down.weight` (r, in[, kh, kw]),
`.lora_up.weight` (out, r[, 1, 1]) and `.alpha` (0-dim), plus string metadata (`ss_*`, `modelspec.*`,
`lorax.*`). Everything A1111, Forge, ComfyUI, diffusers and kohya's tools load. No math here.
"""

from __future__ import annotations

import datetime
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .. import FORMAT_VERSION, NETWORK_MODULE
from ..errors import LoraxInputError, first_line
from . import pickles, safetensors_io
from .atomic import atomic_write, check_writable
from .finite import all_finite
from ..families import registry
from .hashing import KohyaHasher, precalculate_safetensors_hashes, ss_only
from .safetensors_header import encode, input_error, parse

DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
SUFFIXES = (DOWN, UP, ALPHA)

_LYCORIS_MARKERS = ("hada_", "lokr_", "lora_mid", "dora_scale", "oft_", ".diff", "w_norm", "b_norm")
_PEFT_MARKERS = ("lora_A", "lora_B", "lora.down", "lora.up", "lora_linear_layer")


@dataclass
class LoraModule:
    """One module's factors as stored: dW = scale * up @ down, scale = alpha / rank."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        """The inner dimension r (rows of down)."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / rank, the factor kohya applies to up @ down."""
        return float(self.alpha) / self.rank


@dataclass
class LoraFile:
    """A read file: modules by kohya name, string metadata, and where it came from."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None


# ---------------------------------------------------------------- reading

def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or of a `.pt/.ckpt` read with weights_only."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(pickles.MAGICS):
        return pickles.load_state_dict(path, "LoRA file"), {}
    try:
        return safetensors_io.read_file(path)
    except safetensors_io.FormatError as exc:
        raise input_error(path, exc) from None
    except safetensors_io.UnsupportedError:
        pass  # e.g. an unusual dtype: the library reads it (whole-file copy, rare)
    with open(path, "rb", buffering=0) as fh:
        metadata = parse(fh, path.stat().st_size, unknown_dtypes=True).metadata
    try:
        return st_load(path.read_bytes()), metadata
    except (SafetensorError, ValueError) as exc:
        raise LoraxInputError(f"{path}: truncated or corrupt safetensors file ({first_line(exc)})") from None


def _unknown_key_error(path: Path, unknown: Sequence[str]) -> LoraxInputError:
    examples = ", ".join(unknown[:3]) + (f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else "")
    joined = " ".join(unknown)
    if any(m in joined for m in _LYCORIS_MARKERS):
        hint = ("LyCORIS tensors (LoHa/LoKr/LoCon-Tucker/DoRA/OFT): kohya's networks.lora, diffusers "
                "load_lora_weights and this tool cannot read them")
    elif any(m in joined for m in _PEFT_MARKERS):
        hint = "diffusers/PEFT-format keys: convert the file to kohya's format first"
    else:
        hint = "diffusers load_lora_weights and kohya's networks.lora refuse unknown keys"
    return LoraxInputError(f"{path}: {len(unknown)} tensor key(s) are not kohya LoRA keys "
                           f"(.{DOWN} / .{UP} / .{ALPHA}), e.g. {examples}; {hint}")


def _check_finite(path: Path, key: str, t: torch.Tensor) -> None:
    if not all_finite(t):
        what = "NaN" if torch.isnan(t).any() else "Inf"
        raise LoraxInputError(f"{path}: {key} {tuple(t.shape)} contains {what}")


def _module_from_tensors(path: Path, name: str, parts: Mapping[str, torch.Tensor]) -> LoraModule:
    down, up = parts.get(DOWN), parts.get(UP)
    if down is None or up is None:
        missing = DOWN if down is None else UP
        raise LoraxInputError(f"{path}: module {name} has no {missing} "
                              f"(has {', '.join(sorted(parts))})")
    if down.dim() not in (2, 4) or up.dim() not in (2, 4) or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise LoraxInputError(f"{path}: module {name} has unsupported shapes lora_up {tuple(up.shape)}, "
                              f"lora_down {tuple(down.shape)}")
    if up.shape[1] != down.shape[0]:
        raise LoraxInputError(f"{path}: module {name}: rank mismatch between lora_up {tuple(up.shape)} "
                              f"and lora_down {tuple(down.shape)}")
    for suffix, t in parts.items():
        _check_finite(path, f"{name}.{suffix}", t)
    alpha_t = parts.get(ALPHA)
    if alpha_t is None:
        alpha = float(down.shape[0])  # kohya's default: alpha = dim, scale 1
    elif alpha_t.numel() != 1:
        raise LoraxInputError(f"{path}: module {name}: alpha has shape {tuple(alpha_t.shape)}, expected a scalar")
    else:
        alpha = float(alpha_t.reshape(()).item())
    return LoraModule(name, down, up, alpha)


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read a kohya LoRA(-X) file (safetensors, or `.pt/.ckpt` via torch.load(weights_only=True)).

    Tensors keep their stored dtype. Raises LoraxInputError (one line naming the file, the module and
    the shapes) for a missing, corrupt or truncated file, keys other than the three kohya suffixes,
    a module without up or down, mismatched ranks and NaN/Inf.
    """
    path = Path(path)
    if not path.exists():
        raise LoraxInputError(f"{path}: no such file")
    if not path.is_file():
        raise LoraxInputError(f"{path}: not a file")
    tensors, metadata = _load_tensors(path)
    return LoraFile(modules_from_tensors(tensors, path), metadata, path)


def modules_from_tensors(tensors: Mapping[str, torch.Tensor], origin: str | Path) -> dict[str, LoraModule]:
    """Group kohya keys (a file's tensors, or a state dict as kohya passes `weights_sd`) into validated
    LoraModules; `origin` names the file (or the caller) in errors."""
    path = Path(origin)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key in sorted(tensors):
        for suffix in SUFFIXES:
            name = key[:-len(suffix) - 1]
            if key.endswith("." + suffix) and name and "." not in name:
                grouped.setdefault(name, {})[suffix] = tensors[key]
                break
        else:
            unknown.append(key)
    if unknown:
        raise _unknown_key_error(path, unknown)
    if not grouped:
        raise LoraxInputError(f"{path}: holds no LoRA tensors")
    return {name: _module_from_tensors(path, name, parts) for name, parts in grouped.items()}


# ---------------------------------------------------------------- writing

def _state_dict(path: Path, modules: Iterable[LoraModule], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for m in modules:
        if not m.name or "." in m.name:
            raise ValueError(f"{path}: module name {m.name!r} is not a kohya LoRA name")
        if f"{m.name}.{DOWN}" in sd:
            raise ValueError(f"{path}: module {m.name} given twice")
        if m.up.dim() not in (2, 4) or m.down.dim() not in (2, 4) or m.up.shape[1] != m.down.shape[0]:
            raise ValueError(f"{path}: module {m.name}: lora_up {tuple(m.up.shape)} and lora_down "
                             f"{tuple(m.down.shape)} do not form a LoRA")
        save_dtype = dtype or m.down.dtype
        down = m.down.detach().to("cpu", save_dtype).contiguous()
        up = m.up.detach().to("cpu", save_dtype).contiguous()
        for suffix, t in ((DOWN, down), (UP, up)):
            if not all_finite(t):
                raise LoraxInputError(f"{path}: module {m.name} {suffix} {tuple(t.shape)} has NaN/Inf "
                                      f"(in {save_dtype})")
        sd[f"{m.name}.{DOWN}"] = down
        sd[f"{m.name}.{UP}"] = up
        sd[f"{m.name}.{ALPHA}"] = torch.tensor(float(m.alpha), dtype=save_dtype)  # 0-dim, like kohya
    if not sd:
        raise ValueError(f"{path}: no modules to write")
    return dict(sorted(sd.items()))


def _canonical_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """safetensors bytes with the header's JSON keys sorted, so equal inputs give equal bytes.

    The safetensors library writes `__metadata__` in hash-map order (different per process);
    readers locate tensors by offsets, so re-ordering the JSON object is safe. The slow path, for
    what `safetensors_io.layout` does not handle.
    """
    raw = st_save(dict(tensors), metadata=dict(metadata))
    header = parse(io.BytesIO(raw), len(raw), unknown_dtypes=True)
    entries = {e.name: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.lo, e.hi]}
               for e in header.entries}
    return encode(entries, header.metadata, sort_keys=True) + raw[header.data_start:]


def _with_hashes(metadata: Mapping[str, str], model_hash: str, legacy_hash: str) -> dict[str, str]:
    return {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}


def _write_safetensors(tmp: Path, sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write `sd` with `metadata` plus kohya's hashes to `tmp`: the same bytes as `_canonical_safetensors`.

    One pass over the tensors, no serialisation buffer: the data section goes straight from tensor
    memory to the file after room for the header, hashed on the way (the kohya hashes cover only
    the data and, via the header length, the `ss_*` metadata); the header is written last. Hex
    digests have fixed lengths, so a header with placeholder hashes has the final length.
    """
    lay = safetensors_io.layout(sd)
    try:
        data_start = None if lay is None else safetensors_io.library_header_length(lay, ss_only(metadata))
    except UnicodeEncodeError:
        data_start = None
    if lay is None or data_start is None or not KohyaHasher.covers(data_start):
        hashes = precalculate_safetensors_hashes(sd, metadata)
        tmp.write_bytes(_canonical_safetensors(sd, _with_hashes(metadata, *hashes)))
        return
    header_len = len(safetensors_io.canonical_header(lay, _with_hashes(metadata, "0" * 64, "0" * 8)))
    hasher = KohyaHasher(data_start)
    with open(tmp, "wb", buffering=0) as fh:
        fh.seek(header_len)
        safetensors_io.write_data(fh, lay, hasher.update)
        header = safetensors_io.canonical_header(lay, _with_hashes(metadata, *hasher.result()))
        assert len(header) == header_len
        fh.seek(0)
        safetensors_io.write_all(fh, header)


def write_lora(path: str | os.PathLike, modules: Iterable[LoraModule], metadata: Mapping[str, str],
               dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write a kohya LoRA(-X) file atomically; returns the path.

    Only the three kohya keys per module; alpha is a 0-dim tensor in the save dtype (`dtype`, or each
    module's own dtype). Safetensors output gets `metadata` plus `sshs_model_hash`/`sshs_legacy_hash`
    (computed like kohya, over the tensors with only the `ss_*` metadata) and deterministic bytes.
    A `.pt/.ckpt/.pth` path is written with torch.save and, like kohya, without metadata.
    """
    path = check_writable(path, overwrite)
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"{path}: metadata must map str to str, got {k!r}: {type(v).__name__}")
    sd = _state_dict(path, modules, dtype)
    with atomic_write(path) as tmp:
        if path.suffix.lower() in (".pt", ".ckpt", ".pth"):
            torch.save(sd, tmp)
        else:
            _write_safetensors(tmp, sd, metadata)
    return path


# ---------------------------------------------------------------- metadata

def lorax_metadata(rank: int, source_name: str, source_hash: str, target_name: str | None = None,
                   target_hash: str | None = None, threshold: float | None = None, kept: int | None = None,
                   dropped: int | None = None) -> dict[str, str]:
    """The `lorax.*` metadata keys; the target/transfer keys only where given."""
    md = {
        "lorax.format_version": FORMAT_VERSION,
        "lorax.rank": str(int(rank)),
        "lorax.source_model_name": str(source_name),
        "lorax.source_model_hash": str(source_hash),
    }
    optional = {
        "lorax.target_model_name": target_name,
        "lorax.target_model_hash": target_hash,
        "lorax.threshold": None if threshold is None else repr(float(threshold)),
        "lorax.modules_kept": None if kept is None else str(int(kept)),
        "lorax.modules_dropped": None if dropped is None else str(int(dropped)),
    }
    md.update({k: str(v) for k, v in optional.items() if v is not None})
    return md


def is_lorax(lora_file: LoraFile | Mapping[str, str]) -> bool:
    """True for a LoRA-X file: a `lorax.format_version` key, or ss_network_module == networks.lora_x."""
    md = lora_file.metadata if isinstance(lora_file, LoraFile) else lora_file
    return "lorax.format_version" in md or md.get("ss_network_module") == NETWORK_MODULE


def _one_or_dynamic(values: Sequence[str]) -> str:
    return values[0] if len(set(values)) == 1 else "Dynamic"


def minimum_kohya_metadata(family: str, network_module: str, dims: Iterable[int], alphas: Iterable[float],
                           v_parameterization: bool = False, title: str = "LoRA-X",
                           date: str | None = None) -> dict[str, str]:
    """The `ss_*` and `modelspec.*` keys kohya's loaders and UIs look at, as kohya writes them.

    `dims`/`alphas` are per module; a single distinct value is written as is, several as "Dynamic".
    `date` defaults to now (ISO 8601, seconds).
    """
    fam = registry.family(family)  # ValueError for an unknown family
    dim_s = [str(int(d)) for d in dims]
    alpha_s = [str(float(a)) for a in alphas]
    if not dim_s or not alpha_s:
        raise ValueError("minimum_kohya_metadata: no modules (dims/alphas empty)")
    v = bool(v_parameterization)
    return {
        "ss_v2": str(family == "sd2"),
        "ss_base_model_version": fam.metadata_version(v),
        "ss_network_module": network_module,
        "ss_network_dim": _one_or_dynamic(dim_s),
        "ss_network_alpha": _one_or_dynamic(alpha_s),
        "ss_v_parameterization": str(v),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": fam.metadata_architecture(v),
        "modelspec.implementation": fam.implementation,
        "modelspec.title": title,
        "modelspec.date": date or datetime.datetime.now().replace(microsecond=0).isoformat(),
    }
