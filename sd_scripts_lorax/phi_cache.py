"""The subspace similarities (phi_u, phi_v) of weight pairs, remembered in the SVD cache folder.

phi of a module depends only on the two weights (their content keys, see `tensor_index`), the rank
it is taken at, the rank of the bases it is sliced from and how the source bases were obtained, so
a warm transfer reads neither the weights nor the source bases. One JSON file
(`similarity.json`), read once and written once per run, atomically; floats round-trip exactly
through JSON. A missing or corrupt file, or a malformed entry, is an empty/missing entry: recompute.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from pathlib import Path

from .atomic import atomic_write

PHI_FILE = "similarity.json"
_FORMAT = "sd-scripts-lorax similarity v1"


def phi_key(source_content: str, target_content: str, rank: int, bases_rank: int, source_method: str,
            version: str) -> str:
    """Key of phi at `rank`, from source/target bases taken at `bases_rank` (source by `source_method`)."""
    text = f"{_FORMAT}\0{version}\0{source_method}\0{int(rank)}\0{int(bases_rank)}\0{source_content}\0{target_content}"
    return hashlib.sha256(text.encode()).hexdigest()


def _valid(v: object) -> bool:
    return (isinstance(v, list) and len(v) == 2
            and all(isinstance(x, float) and math.isfinite(x) and 0.0 <= x <= 1.0 for x in v))


class PhiBook:
    """phi_u, phi_v by `phi_key`; thread-safe; `save()` writes it back if anything was added."""

    def __init__(self, file: Path | None, entries: dict[str, tuple[float, float]] | None = None) -> None:
        self.file = file
        self._entries = dict(entries or {})
        self._dirty = False
        self._lock = threading.Lock()

    @classmethod
    def load(cls, cache_dir: str | os.PathLike | None) -> "PhiBook":
        """The book in `cache_dir` (in memory only when None; empty when missing or unreadable)."""
        if cache_dir is None:
            return cls(None)
        file = Path(cache_dir) / PHI_FILE
        entries: dict[str, tuple[float, float]] = {}
        try:
            doc = json.loads(file.read_text("utf-8"))
            if isinstance(doc, dict) and doc.get("format") == _FORMAT and isinstance(doc.get("phi"), dict):
                entries = {str(k): (v[0], v[1]) for k, v in doc["phi"].items() if _valid(v)}
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        return cls(file, entries)

    def get(self, key: str) -> tuple[float, float] | None:
        """(phi_u, phi_v) or None."""
        return self._entries.get(key)

    def put(self, key: str, phi_u: float, phi_v: float) -> None:
        with self._lock:
            if self._entries.get(key) != (phi_u, phi_v):
                self._entries[key] = (float(phi_u), float(phi_v))
                self._dirty = True

    def save(self) -> None:
        """Write the book atomically if it changed, merged with what another run wrote meanwhile."""
        with self._lock:
            if self.file is None or not self._dirty:
                return
            merged = PhiBook.load(self.file.parent)._entries
            merged.update(self._entries)
            doc = {"format": _FORMAT, "phi": {k: list(v) for k, v in sorted(merged.items())}}
            try:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(self.file) as tmp:
                    tmp.write_text(json.dumps(doc, indent=0), "utf-8")
                self._dirty = False
            except OSError:  # costs time on the next run, never the result
                pass


__all__ = ["PhiBook", "phi_key", "PHI_FILE"]
