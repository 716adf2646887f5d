"""The source's and target's model hashes for a transfer's metadata, remembered in the SVD cache folder.

Hashing a 2-7 GB checkpoint costs seconds, more than a warm transfer, so the sha256 and legacy hashes
are kept in `<cache>/model_hashes.json` by path, sizes, mtimes and ctimes (A1111 caches by mtime),
and computed on background threads while the modules are worked on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..formats.hashing import FileHashes
from .book import JsonBook
from .tensor_index import stat_key
from ..lorax.parallel import Background

if TYPE_CHECKING:
    from ..formats.checkpoint import Checkpoint


HASHES_FILE = "model_hashes.json"


class HashBook(JsonBook[FileHashes]):
    """`<cache>/model_hashes.json`: {stat_key: {"sha256", "legacy", "addnet"}} (no header)."""

    def decode(self, raw: object) -> FileHashes | None:
        if not isinstance(raw, dict):
            return None
        sha256, legacy, addnet = raw["sha256"], raw["legacy"], raw.get("addnet")
        if not (isinstance(sha256, str) and isinstance(legacy, str) and (addnet is None or isinstance(addnet, str))):
            return None
        return FileHashes(sha256=sha256, legacy=legacy, addnet=addnet)

    def encode(self, h: FileHashes) -> dict[str, str | None]:
        return {"sha256": h.sha256, "legacy": h.legacy, "addnet": h.addnet}


def model_hashes(ckpt: "Checkpoint", cache_dir: Path | None) -> FileHashes:
    """ckpt's sha256 and legacy hashes (no addnet: the metadata does not use it), remembered in the SVD
    cache folder by path, size, mtime and ctime (hashing a 2-7 GB checkpoint costs seconds, more than a warm
    transfer; A1111 caches these the same way)."""
    if cache_dir is None:
        return ckpt.hashes(addnet=False)
    book = HashBook(cache_dir / HASHES_FILE)
    key = stat_key(ckpt.path)
    hit = book.get(key)
    if hit is not None:
        return hit
    h = ckpt.hashes(addnet=False)
    book.put(key, h)
    book.save()  # merged with what the other side's hashing thread saved meanwhile
    return h


class ModelHashes:
    """The source's and the target's model hashes, each on its own background thread (hashlib and
    file reads release the GIL, so they use cores the module work leaves idle, e.g. at its tail)."""

    def __init__(self, src: "Checkpoint", tgt: "Checkpoint", cache_dir: Path | None) -> None:
        self._src = Background(lambda: model_hashes(src, cache_dir), "lorax-model-hashes")
        same = src.path.resolve() == tgt.path.resolve()
        self._tgt = self._src if same else Background(lambda: model_hashes(tgt, cache_dir), "lorax-model-hashes")

    def result(self) -> tuple[FileHashes, FileHashes]:
        return self._src.result(), self._tgt.result()
