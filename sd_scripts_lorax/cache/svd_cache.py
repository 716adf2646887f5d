"""On-disk cache of top-r bases: a folder of small .safetensors files (u, s, v).

The key is sha256 over (a cache-format tag, the bases method version and method, rank, and the
weight's content key = sha256 of its dtype, shape and bytes as stored, see `tensor_index`), so a
changed weight, dtype, rank or algorithm never hits an old entry, and a caller that already knows
the content key (from a checkpoint's tensor index) finds the entry without the weight. Entries are
written atomically; an unreadable or inconsistent entry is recomputed and replaced, never fatal. No
math here: computing bases is the caller's `compute` callback.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..formats import safetensors_io
from ..formats.atomic import atomic_write
from ..errors import LoraxInputError
from ..formats.finite import all_finite
from ..lorax.bases import METHOD_VERSION, Bases
from .tensor_index import content_key

log = logging.getLogger(__name__)

# v2: keyed by the weight's content key (v1 hashed the bytes inside the entry key)
_FORMAT_TAG = b"sd-scripts-lorax svd-cache v2\0"
# Threads for the lookups (hash + read + check) of a warm cache: 2-4 cores is where they stop helping.
_LOOKUP_THREADS = min(4, os.cpu_count() or 1)



def entry_key(content: str, rank: int, method: str = "auto", version: str = METHOD_VERSION) -> str:
    """Hex sha256 naming the entry of the weight with content key `content` at `rank` (method/version)."""
    h = hashlib.sha256(_FORMAT_TAG)
    h.update(f"{version}\0{method}\0{int(rank)}\0{content}".encode())
    return h.hexdigest()


def cache_key(weight: torch.Tensor, rank: int, method: str = "auto", version: str = METHOD_VERSION) -> str:
    """Hex sha256 naming the cache entry of `weight` at `rank` for this bases method/version."""
    return entry_key(content_key(weight), rank, method, version)


def _entry_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{key}.safetensors"


def prepare_dir(cache_dir: str | os.PathLike) -> Path:
    """Create the cache folder if needed; LoraxInputError when it cannot be created or written."""
    path = Path(cache_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoraxInputError(f"{path}: cannot create the SVD cache folder ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK):
        raise LoraxInputError(f"{path}: the SVD cache folder is not writable")
    return path


def _expected_shapes(shape: tuple[int, ...], rank: int) -> tuple[tuple[int, int], tuple[int], tuple[int, int]]:
    out = shape[0] if shape else 0
    n = math.prod(shape[1:]) if shape and out > 0 else 0
    r = min(rank, out, n)
    return (out, r), (r,), (n, r)


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a (small) cache entry, each read straight into its own tensor (5-20x faster than
    `safetensors.torch.load_file` on many small files, which faults mapped pages in one by one).
    Raises ValueError on anything malformed; callers fall back to `load_file` for the library's verdict."""
    return safetensors_io.read_tensors(path)


def _load(path: Path, shape: tuple[int, ...], rank: int) -> Bases | None:
    """The entry at `path`, or None when missing, unreadable or not matching a weight of `shape`."""
    if not path.is_file():
        return None
    try:
        try:
            tensors = read_tensors(path)
        except Exception:  # anything the fast reader does not handle: the library reader decides
            tensors = load_file(str(path))
        bases = Bases(tensors["u"], tensors["s"], tensors["v"])
    except Exception as exc:  # corrupt/truncated entry: any failure means "recompute"
        log.warning("SVD cache entry %s unreadable (%s); recomputing", path, exc)
        return None
    want = _expected_shapes(tuple(shape), rank)
    got = (tuple(bases.u.shape), tuple(bases.s.shape), tuple(bases.v.shape))
    finite = all(all_finite(t) for t in (bases.u, bases.s, bases.v))
    if got != want or not finite:
        log.warning("SVD cache entry %s has shapes %s, expected %s (or non-finite values); recomputing",
                    path, got, want)
        return None
    return bases


def _save(path: Path, bases: Bases, key: str) -> None:
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous()
               for name, t in (("u", bases.u), ("s", bases.s), ("v", bases.v))}
    try:
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata={"key": key, "rank": str(bases.rank)})
    except OSError as exc:  # a full disk must not lose the computed bases
        log.warning("could not write SVD cache entry %s (%s)", path, exc)


def get_or_compute(weight: torch.Tensor, rank: int, cache_dir: str | os.PathLike | None,
                   compute: Callable[[], Bases], method: str = "auto") -> Bases:
    """Bases of `weight` at `rank` from the cache, or `compute()` them and store them.

    `cache_dir=None` disables the cache. The result lives on `weight.device`.
    """
    return get_many([weight], rank, cache_dir, lambda missing: [compute()], method=method)[0]


def lookup(content: str, shape: tuple[int, ...], rank: int, cache_dir: str | os.PathLike | None,
           method: str = "auto") -> Bases | None:
    """The cached bases (CPU) of the weight with content key `content` and `shape` at `rank`, or None.

    Needs no weight: for callers that know the content key (a checkpoint's tensor index).
    """
    if cache_dir is None:
        return None
    return _load(_entry_path(Path(cache_dir), entry_key(content, rank, method)), tuple(shape), rank)


def store(content: str, rank: int, bases: Bases, cache_dir: str | os.PathLike | None, method: str = "auto") -> None:
    """Write `bases` as the entry of (content key, rank, method); never fatal (see `_save`)."""
    if cache_dir is None:
        return
    folder = prepare_dir(cache_dir)
    key = entry_key(content, rank, method)
    _save(_entry_path(folder, key), bases, key)


def get_many(weights: Sequence[torch.Tensor], rank: int, cache_dir: str | os.PathLike | None,
             compute_missing: Callable[[list[int]], list[Bases]], method: str = "auto") -> list[Bases]:
    """Bases for every weight; the misses are computed in one `compute_missing(indices)` call.

    `compute_missing` gets the indices (into `weights`) of the misses and returns their bases in the
    same order, so callers can batch them (e.g. `top_bases_batched` per shape).
    """
    results: list[Bases | None] = [None] * len(weights)
    paths: list[Path | None] = [None] * len(weights)
    keys: list[str] = [""] * len(weights)
    folder = prepare_dir(cache_dir) if cache_dir is not None else None
    if folder is not None:
        def lookup(i: int) -> tuple[str, Path, Bases | None]:
            key = cache_key(weights[i], rank, method)
            path = _entry_path(folder, key)
            return key, path, _load(path, tuple(weights[i].shape), rank)

        # hashing, file reads and torch reductions release the GIL: threads overlap them
        workers = min(_LOOKUP_THREADS, len(weights))
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                found = list(pool.map(lookup, range(len(weights))))
        else:
            found = [lookup(i) for i in range(len(weights))]
        for i, (key, path, bases) in enumerate(found):
            keys[i], paths[i], results[i] = key, path, bases
    missing = [i for i, b in enumerate(results) if b is None]
    if missing:
        computed = compute_missing(missing)
        if len(computed) != len(missing):
            raise ValueError(f"compute_missing returned {len(computed)} bases for {len(missing)} weights")
        for i, bases in zip(missing, computed):
            results[i] = bases
            if folder is not None:
                _save(paths[i], bases, keys[i])
    return [b.to(device=w.device) for b, w in zip(results, weights)]  # type: ignore[union-attr]
