"""One JSON file of entries by key: the form of every book kept under `--svd_cache_dir`
(phi values and adapter norms, the per-checkpoint tensor index, the models' hashes).

A book is read once, updated from any number of threads, and written back by `save()`: only if
something was added, atomically, and merged with what another book of the same file wrote meanwhile
(another thread of this run, or another run that finished first), so no thread's entries are lost.

A book only remembers what can be recomputed, so nothing about its file is ever an error: a missing,
unreadable, corrupt or foreign file (a header field differs) reads as empty, a malformed entry is
dropped (the others stay usable), and a failed write costs time on the next run, never the result.

On disk: `{<header fields>, <field>: {key: entry, ...}}`, or `{key: entry, ...}` when `field` is
None; keys sorted, so the same entries always give the same bytes.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Generic, Mapping, TypeVar

from ..formats.atomic import atomic_write

V = TypeVar("V")

_FILE_LOCKS: dict[str, threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def _file_lock(file: Path) -> threading.Lock:
    """One lock per file for this process: two books of one file merge their saves in turn."""
    name = os.path.abspath(file)
    with _FILE_LOCKS_GUARD:
        return _FILE_LOCKS.setdefault(name, threading.Lock())


class JsonBook(Generic[V]):
    """Entries by string key, in one JSON file (in memory only when `file` is None); thread-safe.

    Subclasses say how an entry is stored: `decode` turns a stored entry into a value, or None
    when it is malformed (then it is dropped); `encode` is its inverse.
    """

    field: str | None = None  # where the entries sit in the file; None: the top level (no header)

    def __init__(self, file: str | os.PathLike | None, header: Mapping[str, Any] | None = None) -> None:
        self.file = Path(file) if file is not None else None
        self.header = dict(header or {})
        if self.field is None and self.header:
            raise ValueError("a book with header fields keeps its entries under a field")
        self._lock = threading.Lock()
        self._dirty = False
        self._entries: dict[str, V] = self._read()

    def decode(self, raw: Any) -> V | None:
        """The value of a stored entry, or None when it is malformed."""
        return raw

    def encode(self, value: V) -> Any:
        """The stored (JSON) form of a value."""
        return value

    def get(self, key: str) -> V | None:
        """The remembered value, or None."""
        return self._entries.get(key)

    def put(self, key: str, value: V) -> None:
        """Remember `value` under `key` (written by the next `save()`)."""
        with self._lock:
            if self._entries.get(key) != value:
                self._entries[key] = value
                self._dirty = True

    def __len__(self) -> int:
        return len(self._entries)

    def save(self) -> None:
        """Write the book atomically if it changed, merged with the file's current entries."""
        if self.file is None:
            return
        with self._lock, _file_lock(self.file):
            if not self._dirty:
                return
            merged = self._read()
            merged.update(self._entries)
            entries = {k: self.encode(v) for k, v in merged.items()}
            doc = {**self.header, self.field: entries} if self.field is not None else entries
            try:
                self.file.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(self.file) as tmp:
                    tmp.write_text(json.dumps(doc, indent=0, sort_keys=True), "utf-8")
            except OSError:  # costs time on the next run, never the result
                return
            self._entries = merged
            self._dirty = False

    def _read(self) -> dict[str, V]:
        """The file's well-formed entries; {} when it is missing, unreadable, corrupt or foreign."""
        if self.file is None:
            return {}
        try:
            doc = json.loads(self.file.read_text("utf-8"))
        except (OSError, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return {}
        if not isinstance(doc, dict) or any(doc.get(k) != v for k, v in self.header.items()):
            return {}
        stored = doc.get(self.field) if self.field is not None else doc
        if not isinstance(stored, dict):
            return {}
        entries: dict[str, V] = {}
        for key, raw in stored.items():
            try:
                value = self.decode(raw)
            except (TypeError, ValueError, KeyError, AttributeError):
                value = None
            if value is not None:
                entries[str(key)] = value
        return entries


__all__ = ["JsonBook"]
