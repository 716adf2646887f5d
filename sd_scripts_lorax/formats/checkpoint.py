"""Lazy reading of Stable Diffusion checkpoints: single files and diffusers folders.

Only the tensors asked for are read (`safetensors.safe_open`), in the dtype they are stored in.
`.ckpt`/`.pt` pickles are read with `torch.load(weights_only=True)` only, so no arbitrary code runs.
A diffusers folder is exposed as one flat key space, `"<component>/<key inside it>"`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Union

from safetensors import SafetensorError, safe_open

from ..errors import LoraxInputError, first_line
from ..families import detect
from ..families.detect import EMA_PREFIX
from ..families.naming import index_modules
from .hashing import FileHashes, hash_files
from .pickles import SUFFIXES as PICKLE_SUFFIXES
from .pickles import load_state_dict
from .safetensors_header import read_header

if TYPE_CHECKING:  # torch is imported lazily so that bad input is refused without its import cost
    import torch

    from ..families.naming import ModuleRef

# diffusers components we read, in kohya's order; each may hold weights under either base name
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
_WEIGHT_BASES = ("diffusion_pytorch_model", "model")
UNKNOWN_ARCH = "unknown architecture (no SD1/SD2/SDXL UNet or text-encoder keys found)"


# ---------------------------------------------------------------- the checkpoint


@dataclass(frozen=True)
class _Entry:
    """Where one (virtual) key's tensor lives."""

    file: Path
    key: str                  # the key inside `file`
    shape: tuple[int, ...]
    dtype: Union["torch.dtype", str]  # a safetensors dtype name until torch is needed


def _torch_dtype(dtype: Union["torch.dtype", str]) -> "torch.dtype":
    from .safetensors_io import torch_dtype

    return torch_dtype(dtype) if isinstance(dtype, str) else dtype


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

        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
        return self._handles[file]


# ---------------------------------------------------------------- single files


def _validated_entries(file: Path, prefix: str = "") -> dict[str, _Entry]:
    """Entries of one safetensors file (keys prefixed), after our header checks and safetensors' own."""

    header = read_header(file)
    try:
        with safe_open(str(file), framework="pt", device="cpu"):
            pass
    except SafetensorError as exc:
        raise LoraxInputError(f"{file}: not a valid safetensors file ({first_line(exc)})") from None
    return {prefix + key: _Entry(file, key, shape, dt) for key, (dt, shape) in header.tensors.items()}


def _open_single_safetensors(path: Path) -> Checkpoint:
    entries = _validated_entries(path)
    family = detect_single_file_family({k: e.shape for k, e in entries.items()}, path)
    return Checkpoint(path, "single_file", family, entries, [path])


def _open_pickle(path: Path) -> Checkpoint:
    state = load_state_dict(path, "torch checkpoint")
    entries = {k: _Entry(path, k, tuple(v.shape), v.dtype) for k, v in state.items()}
    family = detect_single_file_family({k: e.shape for k, e in entries.items()}, path)
    return Checkpoint(path, "single_file", family, entries, [path], state=state)


def detect_single_file_family(shapes: Mapping[str, tuple[int, ...]], path: str | os.PathLike) -> str:
    family = detect.single_file_family(shapes)
    if family is None:
        raise LoraxInputError(f"{path}: {UNKNOWN_ARCH}")
    return family


# ---------------------------------------------------------------- diffusers folders


def _component_files(folder: Path) -> list[Path] | None:
    """The safetensors files of one component: plain, else fp16, else other variants; sharded or not."""
    candidates = []
    for base in _WEIGHT_BASES:
        candidates += [folder / f"{base}.safetensors", folder / f"{base}.safetensors.index.json"]
    for base in _WEIGHT_BASES:
        candidates += [folder / f"{base}.fp16.safetensors", folder / f"{base}.fp16.safetensors.index.json"]
    for base in _WEIGHT_BASES:
        candidates += sorted(folder.glob(f"{base}.*.safetensors"))
        candidates += sorted(folder.glob(f"{base}.*.safetensors.index.json"))
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
        raise LoraxInputError(f"{index}: corrupt shard index ({first_line(exc)})") from None
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
        raise LoraxInputError(f"{path}: corrupt JSON ({first_line(exc)})") from None
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
    if not any(k.startswith("unet/down_blocks.") for k in shapes):
        raise LoraxInputError(f"{path}: {UNKNOWN_ARCH}")
    family = detect.diffusers_family(_read_json(path / "model_index.json"), _read_json(path / "unet" / "config.json"),
                                     (path / "text_encoder_2").is_dir(), shapes)
    if family is None:
        raise LoraxInputError(f"{path}: {UNKNOWN_ARCH}")
    return family
