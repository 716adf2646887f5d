"""The model hashes kohya and A1111 use, computed in one streaming pass.

- `sha256`: the whole file (A1111 "AutoV2" = first 10 hex; kohya `ss_new_sd_model_hash`).
- `legacy`: first 8 hex of sha256 over the 64 KiB at offset 1 MiB (A1111's old hash; kohya
  `ss_sd_model_hash`, `sshs_legacy_hash`). Files shorter than that hash whatever lies in the range.
- `addnet`: sha256 of every byte after the safetensors header (kohya `sshs_model_hash`); None for
  bytes that are not safetensors-shaped (e.g. a `.ckpt` zip).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:
    import torch

LEGACY_OFFSET = 0x100000  # 1 MiB
LEGACY_LENGTH = 0x10000   # 64 KiB
_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class FileHashes:
    """The hashes of one file (or of one byte stream)."""

    sha256: str
    legacy: str
    addnet: str | None

    @property
    def autov2(self) -> str:
        """A1111/Civitai "AutoV2": the first 10 hex of the full-file sha256."""
        return self.sha256[:10]


class StreamHasher:
    """Feed consecutive chunks of one byte stream; all three hashes come out of a single pass.

    `addnet=False` skips the after-header hash (a second sha256 over almost every byte), for
    callers that need only `sha256` and `legacy`; `result().addnet` is then None.
    """

    def __init__(self, addnet: bool = True) -> None:
        self._full = hashlib.sha256()
        self._legacy = hashlib.sha256()
        self._after_header = hashlib.sha256() if addnet else None
        self._head = b""                  # the first 8 bytes, until the header length is known
        self._data_start: int | None = None
        self._pos = 0

    def update(self, chunk: bytes | memoryview) -> None:
        """Hash the next `len(chunk)` bytes of the stream."""
        chunk = memoryview(chunk)
        n = len(chunk)
        if n == 0:
            return
        start, end = self._pos, self._pos + n
        self._full.update(chunk)
        lo, hi = max(start, LEGACY_OFFSET), min(end, LEGACY_OFFSET + LEGACY_LENGTH)
        if lo < hi:
            self._legacy.update(chunk[lo - start:hi - start])
        if self._data_start is None and len(self._head) < 8:
            self._head += bytes(chunk[:8 - len(self._head)])
            if len(self._head) == 8:
                self._data_start = 8 + int.from_bytes(self._head, "little")
        if self._after_header is not None and self._data_start is not None and end > self._data_start:
            self._after_header.update(chunk[max(self._data_start - start, 0):])
        self._pos = end

    def result(self) -> FileHashes:
        """The hashes of everything fed so far; `addnet` is None when no valid header fits."""
        is_safetensors = self._data_start is not None and self._data_start <= self._pos
        return FileHashes(
            sha256=self._full.hexdigest(),
            legacy=self._legacy.hexdigest()[:8],
            addnet=self._after_header.hexdigest() if is_safetensors and self._after_header is not None else None,
        )


def hash_files(paths: Iterable[str | os.PathLike], chunk_size: int = _CHUNK, addnet: bool = True) -> FileHashes:
    """Hash the concatenation of `paths` (one file, or a sharded model's shards in order), reading once.

    `addnet=False`: skip `addnet` (None in the result), one sha256 pass instead of two.
    """
    hasher = StreamHasher(addnet=addnet)
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                hasher.update(view[:n])
    return hasher.result()


def hash_file(path: str | os.PathLike, chunk_size: int = _CHUNK) -> FileHashes:
    """Hash one file in a single streaming pass."""
    return hash_files([Path(path)], chunk_size)


def hash_bytes(data: bytes) -> FileHashes:
    """Hash an in-memory byte string exactly as `hash_file` would hash a file holding it."""
    hasher = StreamHasher()
    hasher.update(data)
    return hasher.result()


class KohyaHasher:
    """kohya's `(sshs_model_hash, sshs_legacy_hash)` from the data section alone, fed in order.

    `data_start` is where the data begins in kohya's buffer (its header length + 8); the header
    bytes themselves are not needed as long as the legacy window (64 KiB at 1 MiB) lies in the data,
    i.e. `data_start <= LEGACY_OFFSET` (the caller checks `covers`).
    """

    def __init__(self, data_start: int) -> None:
        self._model = hashlib.sha256()
        self._legacy = hashlib.sha256()
        self._lo = LEGACY_OFFSET - data_start  # the legacy window in data-section coordinates
        self._pos = 0

    @staticmethod
    def covers(data_start: int) -> bool:
        """True when the legacy window does not reach into a header ending at `data_start`."""
        return data_start <= LEGACY_OFFSET

    def update(self, chunk: bytes | memoryview) -> None:
        """Hash the next bytes of the data section."""
        chunk = memoryview(chunk)
        start, end = self._pos, self._pos + len(chunk)
        self._model.update(chunk)
        lo, hi = max(start, self._lo), min(end, self._lo + LEGACY_LENGTH)
        if lo < hi:
            self._legacy.update(chunk[lo - start:hi - start])
        self._pos = end

    def result(self) -> tuple[str, str]:
        """`(sshs_model_hash, sshs_legacy_hash)`."""
        return self._model.hexdigest(), self._legacy.hexdigest()[:8]


def ss_only(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """The metadata kohya serialises before hashing: the `ss_*` keys only."""
    return {k: str(v) for k, v in (metadata or {}).items() if k.startswith("ss_")}


def precalculate_safetensors_hashes(tensors: Mapping[str, "torch.Tensor"],
                                    metadata: Mapping[str, str] | None = None) -> tuple[str, str]:
    """`(sshs_model_hash, sshs_legacy_hash)` for a state dict about to be saved, as kohya defines them.

    kohya serialises the tensors with only the `ss_*` metadata (not the final metadata, which will
    hold the hashes themselves) and hashes that buffer: the bytes after the header, and the 64 KiB
    at 1 MiB of the whole buffer. Float CPU tensors are hashed in place from the library's layout
    (no serialisation); anything else, or a header reaching past 1 MiB, is serialised by the library.
    """
    from . import safetensors_io

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = ss_only(metadata)
    lay = safetensors_io.layout(tensors)
    if lay is not None:
        try:
            data_start = safetensors_io.library_header_length(lay, meta)
        except UnicodeEncodeError:
            data_start = LEGACY_OFFSET + 1  # let the library decide
        if KohyaHasher.covers(data_start):
            hasher = KohyaHasher(data_start)
            for chunk in safetensors_io.iter_chunks(lay):
                hasher.update(chunk)
            return hasher.result()
    from safetensors.torch import save

    hashes = hash_bytes(save(tensors, metadata=meta))
    assert hashes.addnet is not None  # safetensors' own output always has a valid header
    return hashes.addnet, hashes.legacy


__all__ = ["FileHashes", "StreamHasher", "hash_file", "hash_files", "hash_bytes",
           "precalculate_safetensors_hashes", "KohyaHasher", "ss_only", "LEGACY_OFFSET", "LEGACY_LENGTH"]
