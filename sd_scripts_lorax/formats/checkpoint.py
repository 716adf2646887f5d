"""Lazy reading of Stable Diffusion checkpoints: single files and diffusers folders.

Only the tensors asked for are read (`safetensors.safe_open`), in the dtype they are stored in.
`.ckpt`/`.pt` pickles are read with `torch.load(weights_only=True)` only, so no arbitrary code runs.
A diffusers folder is exposed as one flat key space, `"<component>/<key inside it>"`.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Union

from ..errors import LoraxInputError
from .hashing import FileHashes, hash_files

if TYPE_CHECKING:  # torch is imported lazily so that bad input is refused without its import cost
    import torch

    from ..families.naming import ModuleRef

# safetensors dtype name -> torch dtype attribute
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
EMA_PREFIX = "model_ema."
# diffusers components we read, in kohya's order; each may hold weights under either base name
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
_WEIGHT_BASES = ("diffusion_pytorch_model", "model")
UNKNOWN_ARCH = "unknown architecture (no SD1/SD2/SDXL UNet or text-encoder keys found)"


# ---------------------------------------------------------------- safetensors headers


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed safetensors header: tensor dtypes/shapes and the `__metadata__` strings."""

    length: int                                      # bytes before the tensor data (8 + JSON)
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # key -> (safetensors dtype, shape)
    metadata: dict[str, str]


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading tensor data.

    Raises LoraxInputError (one line, naming the file) for files that are too short, not
    safetensors, have a corrupt header, or are truncated (tensor data past the end of the file).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraxInputError(f"{path}: not a safetensors file (only {size} bytes)")
        n = int.from_bytes(head, "little")
        if n + 8 > size:
            raise LoraxInputError(
                f"{path}: not a safetensors file or truncated (header length {n} exceeds file size {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
        data_end = 0
        for key, info in header.items():
            start, stop = info["data_offsets"]
            tensors[key] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
            data_end = max(data_end, int(stop))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise LoraxInputError(f"{path}: not a safetensors file (corrupt header: {_first_line(exc)})") from None
    if 8 + n + data_end > size:
        raise LoraxInputError(
            f"{path}: truncated safetensors file (tensor data ends at byte {8 + n + data_end}, file has {size})")
    return SafetensorsHeader(length=8 + n, tensors=tensors, metadata=metadata)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------- the checkpoint


@dataclass(frozen=True)
class _Entry:
    """Where one (virtual) key's tensor lives."""

    file: Path
    key: str                  # the key inside `file`
    shape: tuple[int, ...]
    dtype: Union["torch.dtype", str]  # a safetensors dtype name until torch is needed


def _torch_dtype(dtype: Union["torch.dtype", str]) -> "torch.dtype":
    import torch

    return getattr(torch, SAFETENSORS_DTYPES[dtype]) if isinstance(dtype, str) else dtype


class Checkpoint:
    """A checkpoint opened for lazy reading. Use `Checkpoint.open(path)` as a context manager."""

    def __init__(self, path: Path, layout: str, family: str, entries: dict[str, _Entry],
                 hash_paths: list[Path], state: Mapping[str, "torch.Tensor"] | None = None) -> None:
        self.path = path
        self.name = path.name
        self.layout = layout
        self.family = family
        self._entries = entries
        self._hash_paths = hash_paths
        self._state = state           # a loaded .ckpt state dict; None for safetensors
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self._modules: dict[str, ModuleRef] | None = None
        self._hashes: FileHashes | None = None
        self._hashes_addnet = False   # whether _hashes includes the addnet pass
        self.reads = 0                # tensors read so far (tests and benchmarks check warm runs read none)

    # -- opening

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        """Open a single-file checkpoint or a diffusers folder; LoraxInputError on bad input."""
        path = Path(path)
        if not path.exists():
            raise LoraxInputError(f"{path}: no such file or folder")
        if path.is_dir():
            return _open_diffusers(path)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            return _open_pickle(path)
        return _open_single_safetensors(path)

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release open file handles (the checkpoint can be reopened lazily afterwards)."""
        self._stack.close()
        self._handles.clear()

    # -- keys and tensors

    def keys(self) -> list[str]:
        """Every tensor key, EMA keys included, in file order."""
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key).shape

    def dtype(self, key: str) -> "torch.dtype":
        return _torch_dtype(self._entry(key).dtype)

    def dtypes(self) -> Counter["torch.dtype"]:
        """How many (non-EMA) tensors are stored in each dtype."""
        return Counter(_torch_dtype(e.dtype) for k, e in self._entries.items() if not k.startswith(EMA_PREFIX))

    def tensor(self, key: str, rows: tuple[int, int] | None = None) -> "torch.Tensor":
        """One tensor (or a row range of it), in its stored dtype, on the CPU; reads only that tensor."""
        entry = self._entry(key)
        self.reads += 1
        if rows is not None and not (0 <= rows[0] < rows[1] <= (entry.shape[0] if entry.shape else 0)):
            raise LoraxInputError(f"{self.path}: rows {list(rows)} out of range for {key} {list(entry.shape)}")
        if self._state is not None:
            t = self._state[entry.key]
            return t[rows[0]:rows[1]] if rows is not None else t
        handle = self._handle(entry.file)
        if rows is not None:
            return handle.get_slice(entry.key)[rows[0]:rows[1]]
        return handle.get_tensor(entry.key)

    def modules(self) -> dict[str, "ModuleRef"]:
        """Every kohya-targetable module of this checkpoint (EMA weights are never used)."""
        if self._modules is None:
            from ..families.naming import index_modules

            shapes = {k: e.shape for k, e in self._entries.items() if not k.startswith(EMA_PREFIX)}
            self._modules = index_modules(shapes, self.family, self.layout)
        return self._modules

    def weight(self, ref: "ModuleRef") -> "torch.Tensor":
        """A module's weight (row-sliced for fused in_proj), stored dtype; refuses NaN/Inf."""
        from .finite import all_finite

        t = self.tensor(ref.key, ref.rows)
        if t.is_floating_point() and not all_finite(t):
            raise LoraxInputError(
                f"{self.path}: module {ref.lora_name}: weight {ref.key} {list(t.shape)} contains NaN/Inf")
        return t

    def hashes(self, addnet: bool = True) -> FileHashes:
        """sha256 / legacy / addnet hashes of the file (diffusers: of the UNet weights), one pass, cached.

        `addnet=False` skips the addnet hash (None then), which halves the hashing work for callers
        that need only sha256 and legacy (the transfer's metadata).
        """
        if self._hashes is None or (addnet and not self._hashes_addnet):
            self._hashes = hash_files(self._hash_paths, addnet=addnet)
            self._hashes_addnet = addnet
        return self._hashes

    # -- internals

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise LoraxInputError(f"{self.path}: no tensor named {key}") from None

    def _handle(self, file: Path) -> Any:
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
        return self._handles[file]


# ---------------------------------------------------------------- single files


def _validated_entries(file: Path, prefix: str = "") -> dict[str, _Entry]:
    """Entries of one safetensors file (keys prefixed), after our header checks and safetensors' own."""
    from safetensors import SafetensorError, safe_open

    header = read_safetensors_header(file)
    try:
        with safe_open(str(file), framework="pt", device="cpu"):
            pass
    except SafetensorError as exc:
        raise LoraxInputError(f"{file}: not a valid safetensors file ({_first_line(exc)})") from None
    entries = {}
    for key, (dt, shape) in header.tensors.items():
        if dt not in SAFETENSORS_DTYPES:
            raise LoraxInputError(f"{file}: tensor {key} {list(shape)} has unsupported dtype {dt}")
        entries[prefix + key] = _Entry(file, key, shape, dt)
    return entries


def _open_single_safetensors(path: Path) -> Checkpoint:
    entries = _validated_entries(path)
    family = detect_single_file_family({k: e.shape for k, e in entries.items()}, path)
    return Checkpoint(path, "single_file", family, entries, [path])


def _open_pickle(path: Path) -> Checkpoint:
    import torch

    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch's zip format can be memory-mapped, legacy pickles not
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        raise LoraxInputError(
            f"{path}: refused: this pickle needs arbitrary Python objects to load "
            f"(torch.load weights_only=True: {_first_line(exc)[:160]}); convert it to .safetensors") from None
    except Exception as exc:  # torch raises many types for truncated/corrupt zips and pickles
        raise LoraxInputError(f"{path}: not a readable torch checkpoint ({_first_line(exc)[:160]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoraxInputError(f"{path}: not a state dict (top-level object is {type(obj).__name__})")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    entries = {k: _Entry(path, k, tuple(v.shape), v.dtype) for k, v in state.items()}
    family = detect_single_file_family({k: e.shape for k, e in entries.items()}, path)
    return Checkpoint(path, "single_file", family, entries, [path], state=state)


def detect_single_file_family(shapes: Mapping[str, tuple[int, ...]], path: str | os.PathLike) -> str:
    """SD1/SD2/SDXL from original-layout keys (text encoders first; UNet-only files by their UNet)."""
    keys = [k for k in shapes if not k.startswith(EMA_PREFIX)]

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    if not has("conditioner.") and not has("cond_stage_model.") and has("model.diffusion_model.input_blocks."):
        # a UNet-only file: SDXL has the text-time label embedding; SD2 has linear proj_in
        if has("model.diffusion_model.label_emb."):
            return "sdxl"
        proj_in = [s for k, s in shapes.items()
                   if k.startswith("model.diffusion_model.") and k.endswith(".proj_in.weight")]
        if proj_in:
            return "sd2" if len(proj_in[0]) == 2 else "sd1"
    raise LoraxInputError(f"{path}: {UNKNOWN_ARCH}")


# ---------------------------------------------------------------- diffusers folders


def _component_files(folder: Path) -> list[Path] | None:
    """The safetensors files of one component: plain, else fp16, else other variants; sharded or not."""
    candidates = []
    for base in _WEIGHT_BASES:
        candidates += [folder / f"{base}.safetensors", folder / f"{base}.safetensors.index.json"]
    for base in _WEIGHT_BASES:
        candidates += [folder / f"{base}.fp16.safetensors", folder / f"{base}.fp16.safetensors.index.json"]
    for base in _WEIGHT_BASES:
        candidates += sorted(folder.glob(f"{base}.*.safetensors")) + sorted(folder.glob(f"{base}.*.safetensors.index.json"))
    for cand in candidates:
        if not cand.is_file():
            continue
        if cand.name.endswith(".index.json"):
            return _shards(cand)
        return [cand]
    return None


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LoraxInputError(f"{index}: corrupt shard index ({_first_line(exc)})") from None
    files = [index.parent / n for n in names]
    for f in files:
        if not f.is_file():
            raise LoraxInputError(f"{index}: shard {f.name} is missing")
    return files


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LoraxInputError(f"{path}: corrupt JSON ({_first_line(exc)})") from None
    return data if isinstance(data, dict) else {}


def _open_diffusers(path: Path) -> Checkpoint:
    if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
        raise LoraxInputError(f"{path}: folder is not a diffusers model (no model_index.json or unet/)")
    entries: dict[str, _Entry] = {}
    unet_files: list[Path] | None = None
    for comp in DIFFUSERS_COMPONENTS:
        folder = path / comp
        if not folder.is_dir():
            continue
        files = _component_files(folder)
        if files is None:
            if comp == "unet":
                raise LoraxInputError(
                    f"{folder}: no .safetensors weights (diffusion_pytorch_model[.fp16].safetensors); "
                    "pickled .bin weights are not read")
            continue
        if comp == "unet":
            unet_files = files
        for f in files:
            entries.update(_validated_entries(f, prefix=f"{comp}/"))
    family = detect_diffusers_family(path, {k: e.shape for k, e in entries.items()})
    assert unet_files is not None  # detection requires UNet keys
    return Checkpoint(path, "diffusers", family, entries, unet_files)


def detect_diffusers_family(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> str:
    """SD1/SD2/SDXL of a diffusers folder from model_index.json, its components and the UNet config."""
    if not any(k.startswith("unet/down_blocks.") for k in shapes):
        raise LoraxInputError(f"{path}: {UNKNOWN_ARCH}")
    index = _read_json(path / "model_index.json")
    if "XL" in str(index.get("_class_name", "")) or (path / "text_encoder_2").is_dir():
        return "sdxl"
    config = _read_json(path / "unet" / "config.json")
    if config:
        if config.get("use_linear_projection") or config.get("cross_attention_dim") == 1024:
            return "sd2"
        return "sd1"
    # no config: SD2's transformer projections are Linear (2-D), SD1's are 1x1 convs
    proj_in = [s for k, s in shapes.items() if k.startswith("unet/") and k.endswith(".proj_in.weight")]
    return "sd2" if proj_in and len(proj_in[0]) == 2 else "sd1"
