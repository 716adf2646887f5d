"""Atomic file writes: a crash never leaves a half-written file under the final name.

A temporary file lives beside its final name as ``.<name>.<pid>-<random>.tmp<suffix>``: the pid
says whose it is, so a later run can remove the leftovers of a killed one (`sweep_stale`) without
touching a file that a live process is still writing.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import LoraxInputError

# temporaries of the naming used before the pid was part of it: removed only when this old
LEGACY_STALE_S = 3600.0


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse early (before any work) an output that exists or whose folder cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise LoraxInputError(f"{path}: is a folder, not a file")
    if path.exists() and not overwrite:
        raise LoraxInputError(f"{path}: output exists (pass --overwrite to replace it)")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise LoraxInputError(f"{path}: output folder {folder} {what}")
    if not os.access(folder, os.W_OK):
        raise LoraxInputError(f"{path}: output folder {folder} is not writable")
    return path


def temp_path(path: str | os.PathLike) -> Path:
    """A new, empty temporary file beside `path` (mode as a plain open() gives), named for sweeping.

    The name ends with the final extension, so writers that pick a format from it
    (network.save_weights: .safetensors or torch.save; matplotlib: .png) write the right one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=f".tmp{path.suffix}",
                               dir=path.parent or ".")
    os.close(fd)
    # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it onto `path` only if the body succeeds."""
    path = Path(path)
    tmp_path = temp_path(path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def stale_temps(path: str | os.PathLike, any_name: bool = False) -> list[Path]:
    """Temporaries left beside `path` by killed runs: ours whose process is gone (also temporaries of
    temporaries, which start with more dots), and pid-less ones of the older naming over an hour old.
    any_name: those of every file in `path`'s folder."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    name = ".+" if any_name else re.escape(path.name)
    ours = re.compile(rf"^\.+{name}\.(\d+)-[A-Za-z0-9_]+\.tmp")
    legacy = re.compile(rf"^\.{name}\.[A-Za-z0-9_]{{8}}\.tmp" + (r"" if any_name else rf"{re.escape(path.suffix)}$"))
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    now = time.time()
    for e in entries:
        if not e.name.startswith(".") or not e.is_file(follow_symlinks=False):
            continue
        m = ours.match(e.name)
        if m is not None:
            if not _alive(int(m.group(1))):
                found.append(Path(e.path))
        elif legacy.match(e.name):
            try:
                if now - e.stat(follow_symlinks=False).st_mtime > LEGACY_STALE_S:
                    found.append(Path(e.path))
            except OSError:
                pass
    return sorted(found)


def sweep_stale(path: str | os.PathLike) -> list[Path]:
    """Remove `stale_temps(path)`; returns what was removed (a file another process removed first is skipped)."""
    removed = []
    for p in stale_temps(path):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # not ours to remove after all (permissions): leave it
    return removed
