"""Numbers a warm transfer would otherwise recompute, remembered in the SVD cache folder.

- phi_u, phi_v of a module (`similarity.json`): they depend only on the two weights (their content
  keys, see `tensor_index`), the rank phi is taken at, the rank of the bases it is sliced from and
  how the source bases were obtained, so a warm transfer reads neither the weights nor the source bases.
- ||dW||_F of an input adapter's module (`adapter_norms.json`), keyed by the LoRA file's path, size,
  mtime and ctime and the module name: two r x r Gram products per module otherwise (about 40% of a warm
  run's per-module math at r = 320).

One JSON book each (`book.JsonBook`: read once, written once per run, atomically; a missing or
corrupt file, or a malformed entry, is an empty/missing entry: recompute); floats round-trip exactly
through JSON, so a warm run reports the same numbers as the cold one.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

from .book import JsonBook

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


class FloatBook(JsonBook[tuple[float, ...]]):
    """Tuples of `size` finite floats >= 0 (and <= `upper`) by key, under a format tag."""

    field = "values"

    def __init__(self, file: Path | None, fmt: str, size: int, upper: float | None) -> None:
        self.size, self.upper = size, upper
        super().__init__(file, {"format": fmt})

    def decode(self, raw: object) -> tuple[float, ...] | None:
        ok = (isinstance(raw, list) and len(raw) == self.size
              and all(isinstance(x, float) and math.isfinite(x) and x >= 0.0
                      and (self.upper is None or x <= self.upper) for x in raw))
        return tuple(raw) if ok else None

    def encode(self, value: tuple[float, ...]) -> list[float]:
        return list(value)

    def put(self, key: str, *values: float) -> None:  # type: ignore[override]  # the floats, not a tuple
        super().put(key, tuple(float(x) for x in values))


def _load(cache_dir: str | os.PathLike | None, name: str, fmt: str, size: int, upper: float | None) -> FloatBook:
    return FloatBook(Path(cache_dir) / name if cache_dir is not None else None, fmt, size, upper)


def load_phi_book(cache_dir: str | os.PathLike | None) -> FloatBook:
    """(phi_u, phi_v) by `phi_key` (in memory only when cache_dir is None; empty when missing or unreadable)."""
    return _load(cache_dir, PHI_FILE, _FORMAT, 2, 1.0)


def load_norm_book(cache_dir: str | os.PathLike | None) -> FloatBook:
    """(||dW||_F,) by `norm_key` (in memory only when cache_dir is None; empty when missing or unreadable)."""
    return _load(cache_dir, NORMS_FILE, _NORMS_FORMAT, 1, None)


__all__ = ["FloatBook", "load_phi_book", "load_norm_book", "phi_key", "norm_key", "PHI_FILE", "NORMS_FILE"]
