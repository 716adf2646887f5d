"""Numbers a warm transfer would otherwise recompute, remembered in the SVD cache folder.

- phi_u, phi_v of a module (`similarity.json`): they depend only on the two weights (their content
  keys, see `tensor_index`), the rank phi is taken at, the rank of the bases it is sliced from and
  how the source bases were obtained, so a warm transfer reads neither the weights nor the source bases.
- ||dW||_F of an input adapter's module (`adapter_norms.json`), keyed by the LoRA file's path, size,
  mtime and ctime and the module name: two r x r Gram products per module otherwise (about 40% of a warm
  run's per-module math at r = 320).

One JSON file each, read once and written once per run, atomically; floats round-trip exactly
through JSON, so a warm run reports the same numbers as the cold one. A missing or corrupt file, or
a malformed entry, is an empty/missing entry: recompute.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from pathlib import Path

from ..formats.atomic import atomic_write

PHI_FILE = "similarity.json"
NORMS_FILE = "adapter_norms.json"
_FORMAT = "sd-scripts-lorax similarity v1"
_NORMS_FORMAT = "sd-scripts-lorax adapter-norms v1"


def phi_key(source_content: str, target_content: str, rank: int, bases_rank: int, source_method: str,
            version: str) -> str:
    """Key of phi at `rank`, from source/target bases taken at `bases_rank` (source by `source_method`)."""
    text = f"{_FORMAT}\0{version}\0{source_method}\0{int(rank)}\0{int(bases_rank)}\0{source_content}\0{target_content}"
    return hashlib.sha256(text.encode()).hexdigest()


def norm_key(lora_stat: str, module: str) -> str:
    """Key of ||dW||_F of `module` in the LoRA file whose `tensor_index.stat_key` is `lora_stat`."""
    return hashlib.sha256(f"{_NORMS_FORMAT}\0{lora_stat}\0{module}".encode()).hexdigest()


class FloatBook:
    """Tuples of floats by key, in one JSON file; thread-safe; `save()` writes it back if anything was added."""

    def __init__(self, file: Path | None, fmt: str, size: int, upper: float | None,
                 entries: dict[str, tuple[float, ...]] | None = None) -> None:
        self.file, self.fmt, self.size, self.upper = file, fmt, size, upper
        self._entries = dict(entries or {})
        self._dirty = False
        self._lock = threading.Lock()

    def _valid(self, v: object) -> bool:
        return (isinstance(v, list) and len(v) == self.size
                and all(isinstance(x, float) and math.isfinite(x) and x >= 0.0
                        and (self.upper is None or x <= self.upper) for x in v))

    def _read(self) -> dict[str, tuple[float, ...]]:
        try:
            doc = json.loads(self.file.read_text("utf-8")) if self.file is not None else None
            if isinstance(doc, dict) and doc.get("format") == self.fmt and isinstance(doc.get("values"), dict):
                return {str(k): tuple(v) for k, v in doc["values"].items() if self._valid(v)}
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        return {}

    def get(self, key: str) -> tuple[float, ...] | None:
        """The remembered tuple, or None."""
        return self._entries.get(key)

    def put(self, key: str, *values: float) -> None:
        v = tuple(float(x) for x in values)
        with self._lock:
            if self._entries.get(key) != v:
                self._entries[key] = v
                self._dirty = True

    def save(self) -> None:
        """Write the book atomically if it changed, merged with what another run wrote meanwhile."""
        with self._lock:
            if self.file is None or not self._dirty:
                return
            merged = self._read()
            merged.update(self._entries)
            doc = {"format": self.fmt, "values": {k: list(v) for k, v in sorted(merged.items())}}
            try:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(self.file) as tmp:
                    tmp.write_text(json.dumps(doc, indent=0), "utf-8")
                self._dirty = False
            except OSError:  # costs time on the next run, never the result
                pass


def _load(cache_dir: str | os.PathLike | None, name: str, fmt: str, size: int, upper: float | None) -> FloatBook:
    book = FloatBook(Path(cache_dir) / name if cache_dir is not None else None, fmt, size, upper)
    book._entries = book._read()
    return book


def load_phi_book(cache_dir: str | os.PathLike | None) -> FloatBook:
    """(phi_u, phi_v) by `phi_key` (in memory only when cache_dir is None; empty when missing or unreadable)."""
    return _load(cache_dir, PHI_FILE, _FORMAT, 2, 1.0)


def load_norm_book(cache_dir: str | os.PathLike | None) -> FloatBook:
    """(||dW||_F,) by `norm_key` (in memory only when cache_dir is None; empty when missing or unreadable)."""
    return _load(cache_dir, NORMS_FILE, _NORMS_FORMAT, 1, None)


__all__ = ["FloatBook", "load_phi_book", "load_norm_book", "phi_key", "norm_key", "PHI_FILE", "NORMS_FILE"]
