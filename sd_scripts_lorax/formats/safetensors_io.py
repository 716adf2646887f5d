"""safetensors tensors without whole-file copies: read each tensor straight into its own buffer,
write tensor memory straight into a file. The header and dtype table are `safetensors_header`'s.

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
from typing import BinaryIO, Callable, Iterable, Mapping, Sequence

import torch

from .safetensors_header import DTYPES as _NAMES
from .safetensors_header import FormatError, Header, UnsupportedError, encode, parse, read_exactly

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, attr) for name, (attr, _) in _NAMES.items()}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# The library orders the data section by its dtype enum, largest first; the writer only needs the
# float dtypes a LoRA file holds (anything else goes through the library itself).
_WRITE_ORDER = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}

__all__ = ["DTYPES", "DTYPE_NAMES", "FormatError", "Header", "UnsupportedError", "read_file", "read_tensors",
           "tensor_bytes", "layout", "canonical_header", "library_header_length", "write_data", "write_stream"]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (UnsupportedError for an unknown one)."""
    if name not in DTYPES:
        raise UnsupportedError(f"unsupported safetensors dtype {name}")
    return DTYPES[name]


# ---------------------------------------------------------------- reading

def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor (CPU, each its own storage, read straight into it) and the metadata of a file.

    Raises FormatError/UnsupportedError (see `safetensors_header.parse`) and OSError.
    """
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        header = parse(fh, size)
        fh.seek(header.data_start)
        for e in header.entries:  # sorted by offset and tiling the section: one sequential read
            tensor = torch.empty(e.shape, dtype=DTYPES[e.dtype])
            read_exactly(fh, tensor_bytes(tensor))
            out[e.name] = tensor
    return out, header.metadata


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


def canonical_header(lay: Layout, metadata: Mapping[str, str]) -> bytes:
    """Length prefix + JSON header with every key sorted, so equal inputs give equal bytes."""
    return encode(lay.entries, metadata, sort_keys=True)


def library_header_length(lay: Layout, metadata: Mapping[str, str]) -> int:
    """Length (prefix included) of the header `safetensors.torch.save` writes for `lay` and `metadata`.

    The library writes compact JSON with raw UTF-8 and the same escapes as Python's json with
    ensure_ascii=False; key order does not change the length. UnicodeEncodeError for strings the
    library cannot write either (lone surrogates).
    """
    header = {"__metadata__": dict(metadata), **lay.entries}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return 8 + len(text) + (-len(text) % 8)


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


def write_stream(path: str | os.PathLike, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 produce: Callable[[str], torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a file whose tensors are produced one at a time, in `entries` order (a whole model never
    sits in memory). The header is laid out from the declared shapes and dtypes (insertion order,
    no `__metadata__` when there is none); each produced tensor must match them."""
    header: dict[str, dict] = {}
    offset = 0
    for key, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    with open(path, "wb", buffering=0) as fh:
        write_all(fh, encode(header, metadata or None, sort_keys=False))
        for key, shape, dtype in entries:
            t = produce(key).to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{key}: produced shape {tuple(t.shape)}, declared {tuple(shape)}")
            write_all(fh, tensor_bytes(t))


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (see `read_file`); raises ValueError on anything malformed."""
    return read_file(Path(path))[0]
