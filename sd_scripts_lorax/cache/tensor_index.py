"""Content keys of checkpoint tensors, remembered per checkpoint in the SVD cache folder.

A content key is sha256 over (a format tag, dtype, shape, the tensor's bytes as stored): two tensors
with equal keys are bit-identical. The per-checkpoint index maps a tensor key (+ row slice) to the
content key of those bytes, recorded only for tensors that were read and found free of NaN/Inf, so
a warm transfer knows which weights are identical, and which cache entries to use, without reading
a single checkpoint tensor.

An index belongs to one state of the checkpoint on disk (path, sizes, mtimes and ctimes of its
weight files, like `model_hashes.json`); any change starts it afresh. A missing, corrupt or foreign index
file is never an error: it is an empty index (a `book.JsonBook`: writes are atomic; a failed write only
costs time).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..formats.safetensors_io import tensor_bytes
from .book import JsonBook

INDEX_DIR = "tensor_index"
_FORMAT = "sd-scripts-lorax tensor-index v1"
_CONTENT_TAG = b"sd-scripts-lorax tensor-content v1\0"


def content_key(t: torch.Tensor) -> str:
    """Hex sha256 of (dtype, shape, bytes): equal keys mean bit-identical tensors of one dtype and shape."""
    h = hashlib.sha256(_CONTENT_TAG)
    h.update(f"{t.dtype}\0{tuple(t.shape)}\0".encode())
    h.update(tensor_bytes(t.detach().to("cpu").contiguous()))  # hashlib releases the GIL on large buffers
    return h.hexdigest()


def stat_key(path: str | os.PathLike) -> str:
    """Identity of a checkpoint on disk: resolved path, sizes, mtimes and ctimes of its weight files.

    The ctime is what `cp -p` or `touch -r` cannot set back: a file replaced by another of the same
    size and mtime still gets a new key."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    stats = []
    for f in files:
        st = f.stat()
        stats.append((str(f.relative_to(path)) if f != path else "", st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return json.dumps([str(path.resolve()), stats])


def _slot(key: str, rows: tuple[int, int] | None) -> str:
    return key if rows is None else f"{key}[{int(rows[0])}:{int(rows[1])}]"


def _valid(entry: object) -> bool:
    if not isinstance(entry, dict) or entry.get("finite") is not True:
        return False
    c = entry.get("content")
    return isinstance(c, str) and len(c) == 64 and all(ch in "0123456789abcdef" for ch in c)


class TensorIndex(JsonBook[str]):
    """Tensor key (+ rows) -> content key of a finite tensor, for one state of one checkpoint. Thread-safe."""

    field = "tensors"

    def __init__(self, file: Path | None, stat: str) -> None:
        self.stat = stat  # an index written for another state of the checkpoint reads as empty
        super().__init__(file, {"format": _FORMAT, "stat": stat})

    @classmethod
    def load(cls, cache_dir: str | os.PathLike | None, checkpoint_path: str | os.PathLike) -> "TensorIndex":
        """The index of the checkpoint at `checkpoint_path` in `cache_dir` (empty when absent or stale)."""
        stat = stat_key(checkpoint_path)
        if cache_dir is None:
            return cls(None, stat)
        name = hashlib.sha256(str(Path(checkpoint_path).resolve()).encode()).hexdigest()[:32]
        return cls(Path(cache_dir) / INDEX_DIR / f"{name}.json", stat)

    def decode(self, raw: object) -> str | None:
        return raw["content"] if _valid(raw) else None  # type: ignore[index]  # _valid: a dict

    def encode(self, content: str) -> dict[str, object]:
        return {"content": content, "finite": True}

    def get(self, key: str, rows: tuple[int, int] | None = None) -> str | None:
        """The content key of tensor `key` (rows sliced), known finite; None when not indexed."""
        return super().get(_slot(key, rows))

    def put(self, key: str, rows: tuple[int, int] | None, content: str) -> None:  # type: ignore[override]
        """Record the content key of a tensor that was read and checked finite."""
        super().put(_slot(key, rows), content)


__all__ = ["TensorIndex", "content_key", "stat_key", "INDEX_DIR"]
