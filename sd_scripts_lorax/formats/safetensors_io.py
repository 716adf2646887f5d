"""Plain safetensors I/O without whole-file copies: parse the header, read each tensor straight into
its own buffer, write tensor memory straight into a file. No math here.

Format (safetensors spec): 8-byte little-endian header length N, N bytes of JSON
(`{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [lo, hi]}, ...}`, padded with
spaces), then the data section; offsets are relative to the data section and tile it exactly.
The writer reproduces the layout the safetensors library chooses (tensors ordered by dtype, larger
alignment first, then by name; header padded to a multiple of 8) so that bytes and the kohya hashes
computed over them match what `safetensors.torch.save` gives; tests compare the two.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# The library orders the data section by its dtype enum, largest first; the writer only needs the
# float dtypes a LoRA file holds (anything else goes through the library itself).
_WRITE_ORDER = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


class FormatError(ValueError):
    """Malformed or truncated safetensors bytes (the message has no file name; callers add it)."""


class UnsupportedError(ValueError):
    """Well-formed but outside what this reader handles (an unknown dtype): use the library."""


# ---------------------------------------------------------------- reading

def read_exactly(fh: BinaryIO, buf: memoryview) -> None:
    """Fill `buf` from `fh`; FormatError when the file ends first."""
    done = 0
    while done < len(buf):
        got = fh.readinto(buf[done:])
        if not got:
            raise FormatError("file ends early")
        done += got


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: name, dtype, shape, and [lo, hi) relative to the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    lo: int
    hi: int


def read_header(fh: BinaryIO, size: int) -> tuple[list[TensorEntry], dict[str, str], int]:
    """Parse the header at the start of `fh` (a file of `size` bytes).

    Returns the entries sorted by offset, the `__metadata__` strings and where the data section
    starts. Checks what the safetensors library checks: JSON object, str metadata, dtype sizes
    matching the offsets, offsets tiling the data section to the end of the file.
    """
    head = bytearray(8)
    read_exactly(fh, memoryview(head))
    start = 8 + int.from_bytes(head, "little")
    if start > size:
        raise FormatError(f"header says {start - 8} bytes, file has {size}")
    raw = bytearray(start - 8)
    read_exactly(fh, memoryview(raw))
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("__metadata__ is not a map of strings")
    entries = []
    for name, info in header.items():
        try:
            dtype_name, shape, (lo, hi) = info["dtype"], info["shape"], info["data_offsets"]
            ok = all(isinstance(x, int) and x >= 0 for x in (*shape, lo, hi))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise FormatError(f"tensor {name}: malformed entry {str(info)[:80]}")
        if dtype_name not in DTYPES:
            raise UnsupportedError(f"tensor {name}: dtype {dtype_name}")
        dtype = DTYPES[dtype_name]
        if hi - lo != math.prod(shape) * dtype.itemsize:
            raise FormatError(f"tensor {name}: offsets {lo}..{hi} do not fit {dtype_name} {shape}")
        entries.append(TensorEntry(name, dtype, tuple(shape), lo, hi))
    entries.sort(key=lambda e: (e.lo, e.hi))
    end = 0
    for e in entries:
        if e.lo != end:
            raise FormatError(f"tensor {e.name}: offsets {e.lo}..{e.hi} leave a gap or overlap at {end}")
        end = e.hi
    if end != size - start:
        raise FormatError(f"data section is {size - start} bytes, header describes {end}")
    return entries, {str(k): v for k, v in metadata.items()}, start


def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor (CPU, each its own storage, read straight into it) and the metadata of a file.

    Raises FormatError/UnsupportedError (see `read_header`) and OSError.
    """
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        entries, metadata, start = read_header(fh, size)
        fh.seek(start)
        for e in entries:  # sorted by offset and tiling the section: one sequential read
            tensor = torch.empty(e.shape, dtype=e.dtype)
            read_exactly(fh, tensor_bytes(tensor))
            out[e.name] = tensor
    return out, metadata


# ---------------------------------------------------------------- writing

def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without copying (bf16 included)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


@dataclass(frozen=True)
class Layout:
    """Tensors in data-section order with their header entries; `None` when the library must write."""

    order: list[tuple[str, torch.Tensor]]
    entries: dict[str, dict]
    data_len: int


def layout(tensors: Mapping[str, torch.Tensor]) -> Layout | None:
    """The library's data layout for contiguous CPU float tensors (None for any other dtype)."""
    if not all(t.dtype in _WRITE_ORDER and t.is_contiguous() and t.device.type == "cpu" for t in tensors.values()):
        return None
    order = sorted(tensors.items(), key=lambda kv: (_WRITE_ORDER[kv[1].dtype], kv[0]))
    entries: dict[str, dict] = {}
    pos = 0
    for name, t in order:
        n = t.numel() * t.element_size()
        entries[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    return Layout(order, entries, pos)


def _padded(text: bytes) -> bytes:
    return text + b" " * (-len(text) % 8)  # 8-byte aligned data, as the library writes it


def canonical_header(lay: Layout, metadata: Mapping[str, str]) -> bytes:
    """Length prefix + JSON header with every key sorted, so equal inputs give equal bytes."""
    header = {"__metadata__": dict(metadata), **lay.entries}
    text = _padded(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    return len(text).to_bytes(8, "little") + text


def library_header_length(lay: Layout, metadata: Mapping[str, str]) -> int:
    """Length (prefix included) of the header `safetensors.torch.save` writes for `lay` and `metadata`.

    The library writes compact JSON with raw UTF-8 and the same escapes as Python's json with
    ensure_ascii=False; key order does not change the length. UnicodeEncodeError for strings the
    library cannot write either (lone surrogates).
    """
    header = {"__metadata__": dict(metadata), **lay.entries}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return 8 + len(_padded(text))


def write_data(fh: BinaryIO, lay: Layout, on_chunk: Callable[[memoryview], None] | None = None) -> None:
    """Write the data section at the current position of an unbuffered file, tensor memory straight
    to the kernel; `on_chunk` sees every chunk in order (for hashing)."""
    for _, t in lay.order:
        view = tensor_bytes(t)
        if on_chunk is not None:
            on_chunk(view)
        write_all(fh, view)


def write_all(fh: BinaryIO, data: bytes | memoryview) -> None:
    """`fh.write` until everything is written (raw files may write less than asked)."""
    view = memoryview(data)
    while len(view):
        n = fh.write(view)
        view = view[n:]


def iter_chunks(lay: Layout) -> Iterable[memoryview]:
    """The data section as consecutive memoryviews (no copies)."""
    return (tensor_bytes(t) for _, t in lay.order)


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (see `read_file`); raises ValueError on anything malformed."""
    return read_file(Path(path))[0]
