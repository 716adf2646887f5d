"""The source's and target's model hashes for a transfer's metadata, remembered in the SVD cache folder.

Hashing a 2-7 GB checkpoint costs seconds, more than a warm transfer, so the sha256 and legacy hashes
are kept in `<cache>/model_hashes.json` by path, sizes, mtimes and ctimes (A1111 caches by mtime),
and computed on background threads while the modules are worked on.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ..formats.atomic import atomic_write
from ..transfer.parallel import Background
from .tensor_index import stat_key

if TYPE_CHECKING:
    from ..formats.checkpoint import Checkpoint
    from ..formats.hashing import FileHashes


HASHES_FILE = "model_hashes.json"
_HASHES_LOCK = threading.Lock()  # the source's and the target's hashing threads update one book


def model_hashes(ckpt: "Checkpoint", cache_dir: Path | None) -> "FileHashes":
    """ckpt's sha256 and legacy hashes (no addnet: the metadata does not use it), remembered in the SVD
    cache folder by path, size, mtime and ctime (hashing a 2-7 GB checkpoint costs seconds, more than a warm
    transfer; A1111 caches these the same way)."""
    from ..formats.hashing import FileHashes

    if cache_dir is None:
        return ckpt.hashes(addnet=False)
    book_path = cache_dir / HASHES_FILE
    key = stat_key(ckpt.path)
    try:
        book = json.loads(book_path.read_text())
        hit = book[key]
        return FileHashes(sha256=hit["sha256"], legacy=hit["legacy"], addnet=hit.get("addnet"))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    h = ckpt.hashes(addnet=False)
    try:
        with _HASHES_LOCK:
            _remember_hashes(book_path, key, h)
    except OSError:  # a cache that cannot be written costs time, never the result
        pass
    return h


def _remember_hashes(book_path: Path, key: str, h: "FileHashes") -> None:
    """Add one checkpoint's hashes to the book (read, update, atomic rewrite)."""
    try:
        book = json.loads(book_path.read_text())
        book = book if isinstance(book, dict) else {}
    except (OSError, ValueError):
        book = {}
    book[key] = {"sha256": h.sha256, "legacy": h.legacy, "addnet": h.addnet}
    book_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(book_path) as tmp:
        tmp.write_text(json.dumps(book, indent=1, sort_keys=True))


class ModelHashes:
    """The source's and the target's model hashes, each on its own background thread (hashlib and
    file reads release the GIL, so they use cores the module work leaves idle, e.g. at its tail)."""

    def __init__(self, src: "Checkpoint", tgt: "Checkpoint", cache_dir: Path | None) -> None:
        self._src = Background(lambda: model_hashes(src, cache_dir), "lorax-model-hashes")
        same = src.path.resolve() == tgt.path.resolve()
        self._tgt = self._src if same else Background(lambda: model_hashes(tgt, cache_dir), "lorax-model-hashes")

    def result(self) -> tuple["FileHashes", "FileHashes"]:
        return self._src.result(), self._tgt.result()
