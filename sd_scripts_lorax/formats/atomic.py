"""Atomic file writes: a crash never leaves a half-written file under the final name."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import LoraxInputError


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse early (before any work) an output that exists or whose folder cannot be written."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise LoraxInputError(f"{path}: output exists (pass --overwrite to replace it)")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise LoraxInputError(f"{path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise LoraxInputError(f"{path}: output folder {folder} is not writable")
    return path


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it onto `path` only if the body succeeds."""
    path = Path(path)
    # The temporary name ends with the final extension, so writers that pick a format from it
    # (network.save_weights: .safetensors or torch.save; matplotlib: .png) write the right one.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
