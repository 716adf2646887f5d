"""The safetensors header, without torch: the one parser and the one dtype table of the project.

Format (safetensors spec): 8-byte little-endian header length N, N bytes of JSON
(`{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [lo, hi]}, ...}`, padded with
spaces), then the data section; offsets are relative to the data section and tile it exactly.
Torch-free so that a checkpoint or LoRA file is refused, or inspected, without torch's import cost.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Mapping

from ..errors import LoraxInputError, first_line

# safetensors dtype name -> (torch dtype attribute, item size in bytes)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}


class FormatError(ValueError):
    """Malformed or truncated safetensors bytes; the message names no file (callers add it)."""


class UnsupportedError(ValueError):
    """Well-formed but in a dtype outside `DTYPES` (the safetensors library may still read it)."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: name, dtype name, shape, and [lo, hi) relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    lo: int
    hi: int


@dataclass(frozen=True)
class Header:
    """A parsed header: entries sorted by offset, the `__metadata__` strings, where the data starts."""

    entries: list[TensorEntry]
    metadata: dict[str, str]
    data_start: int

    @property
    def tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """key -> (dtype name, shape), in file order."""
        return {e.name: (e.dtype, e.shape) for e in self.entries}


def read_exactly(fh: BinaryIO, buf: memoryview) -> None:
    """Fill `buf` from `fh`; FormatError when the file ends first."""
    done = 0
    while done < len(buf):
        got = fh.readinto(buf[done:])
        if not got:
            raise FormatError("file ends early")
        done += got


def parse(fh: BinaryIO, size: int, unknown_dtypes: bool = False) -> Header:
    """Parse the header at the start of `fh` (a file of `size` bytes).

    Checks what the safetensors library checks: a JSON object, string metadata, dtype sizes that
    match the offsets, offsets that tile the data section to the end of the file. A dtype outside
    `DTYPES` raises UnsupportedError, unless `unknown_dtypes` (then its size is not checked).
    """
    if size < 8:
        raise FormatError(f"not a safetensors file (only {size} bytes)")
    head = bytearray(8)
    read_exactly(fh, memoryview(head))
    n = int.from_bytes(head, "little")
    if n + 8 > size:
        raise FormatError(f"not a safetensors file or truncated (header length {n} exceeds file size {size})")
    raw = bytearray(n)
    read_exactly(fh, memoryview(raw))
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"corrupt header: {first_line(exc)}") from None
    if not isinstance(header, dict):
        raise FormatError("corrupt header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("corrupt header: __metadata__ is not a map of strings")
    entries = [_entry(name, info, unknown_dtypes) for name, info in header.items()]
    entries.sort(key=lambda e: (e.lo, e.hi))
    end = 0
    for e in entries:
        if e.lo != end:
            raise FormatError(f"tensor {e.name}: offsets {e.lo}..{e.hi} leave a gap or overlap at {end}")
        end = e.hi
    if end != size - 8 - n:
        raise FormatError(f"data section is {size - 8 - n} bytes, header describes {end}")
    return Header(entries, {str(k): v for k, v in metadata.items()}, 8 + n)


def _entry(name: str, info: object, unknown_dtypes: bool) -> TensorEntry:
    try:
        dtype, shape, (lo, hi) = info["dtype"], info["shape"], info["data_offsets"]  # type: ignore[index]
        ok = isinstance(dtype, str) and all(isinstance(x, int) and x >= 0 for x in (*shape, lo, hi))
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise FormatError(f"corrupt header: tensor {name}: malformed entry {str(info)[:80]}")
    if dtype not in DTYPES:
        if not unknown_dtypes:
            raise UnsupportedError(f"tensor {name} {list(shape)} has unsupported dtype {dtype}")
    elif hi - lo != math.prod(shape) * DTYPES[dtype][1]:
        raise FormatError(f"tensor {name}: offsets {lo}..{hi} do not fit {dtype} {list(shape)}")
    return TensorEntry(name, dtype, tuple(shape), lo, hi)


def read_header(path: str | os.PathLike) -> Header:
    """The header of the file at `path`; one LoraxInputError line naming the file on bad bytes."""
    path = Path(path)
    try:
        with open(path, "rb", buffering=0) as fh:
            return parse(fh, os.fstat(fh.fileno()).st_size)
    except (FormatError, UnsupportedError) as exc:
        raise input_error(path, exc) from None


def input_error(path: Path, exc: ValueError) -> LoraxInputError:
    """The one-line user error for a FormatError/UnsupportedError of the file at `path`."""
    text = str(exc)
    if isinstance(exc, FormatError) and not text.startswith("not a safetensors"):
        text = f"truncated or corrupt safetensors file ({text})"
    return LoraxInputError(f"{path}: {text}")


def encode(entries: Mapping[str, dict], metadata: Mapping[str, str] | None, sort_keys: bool) -> bytes:
    """Length prefix + JSON header padded with spaces to a multiple of 8 (the data stays aligned, as
    the library writes it); no `__metadata__` when `metadata` is None. `sort_keys` gives equal bytes
    for equal inputs."""
    header = ({} if metadata is None else {"__metadata__": dict(metadata)}) | dict(entries)
    text = json.dumps(header, sort_keys=sort_keys, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text

