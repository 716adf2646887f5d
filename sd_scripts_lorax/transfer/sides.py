"""Weights, bases and phi through the caches: what the per-module work of a transfer reads.

A module's weight in each checkpoint is known first by its content key (from the tensor index, no
read) and read only when needed; bases come from the SVD cache by content key, else are computed and
stored. Source bases of a LoRA-X input come from its own `down` (`bases_from_claimed_v`), checked, and
are cached under their own method tag so that they never stand in for exact bases elsewhere.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ..cache import svd_cache
from ..cache.phi_cache import FloatBook
from ..cache.tensor_index import TensorIndex, content_key
from ..lorax import Bases, top_bases
from ..lorax.bases import bases_from_claimed_v
from ..lorax.warm_bases import CACHE_METHOD as WARM_METHOD, bases_warm_or_exact, warm_start_pays

if TYPE_CHECKING:
    from ..families.naming import ModuleRef
    from ..formats.checkpoint import Checkpoint
    from .work import Job

# SVD-cache method tag of source bases taken from a LoRA-X file (see Engine.source_bases)
CLAIMED_METHOD = "lorax-file-v1"


def slice_bases(b: Bases, r: int) -> Bases:
    """The top-r triplets of a top-R result (R >= r)."""
    return Bases(b.u[:, :r], b.s[:r], b.v[:, :r])


class Weights:
    """One checkpoint's used weights: content keys from its tensor index (no read), else read,
    NaN/Inf-checked (`Checkpoint.weight`) and hashed once, the index updated."""

    def __init__(self, ckpt: "Checkpoint", index: "TensorIndex") -> None:
        self.ckpt, self.index = ckpt, index
        self._lock = threading.Lock()  # one reader of the checkpoint's handles at a time

    def known(self, ref: "ModuleRef") -> str | None:
        return self.index.get(ref.key, ref.rows)

    def read(self, ref: "ModuleRef") -> tuple[torch.Tensor, str]:
        with self._lock:
            w = self.ckpt.weight(ref)
        key = content_key(w)  # outside the lock: hashing runs in parallel across modules
        self.index.put(ref.key, ref.rows, key)
        return w, key


class Side:
    """A module's weight in one checkpoint: its content key at once, its bytes only when needed."""

    def __init__(self, weights: Weights, ref: "ModuleRef") -> None:
        self.weights, self.ref = weights, ref
        self.shape = tuple(ref.shape)
        self._w: torch.Tensor | None = None
        known = weights.known(ref)
        if known is None:
            self._w, known = weights.read(ref)
        self.content: str = known

    def tensor(self) -> torch.Tensor:
        if self._w is None:
            # a cache miss after an index hit; the bytes decide the key from here on
            self._w, self.content = self.weights.read(self.ref)
        return self._w


@dataclass
class Engine:
    """What the per-module work needs: both checkpoints' weights, the caches, the compute settings."""

    src: Weights
    tgt: Weights
    cache_dir: Path | None
    phi: FloatBook
    norms: FloatBook
    device: torch.device
    dtype: torch.dtype
    threshold: float

    def bases(self, side: Side, rank: int, method: str, compute: Callable[[torch.Tensor], Bases]) -> Bases:
        """Bases of `side` at `rank` from the SVD cache (by content key, no read), else computed and stored."""
        b = svd_cache.lookup(side.content, side.shape, rank, self.cache_dir, method)
        if b is None:
            b = compute(side.tensor().to(self.device))
            svd_cache.store(side.content, rank, b, self.cache_dir, method)
        return b.to(self.device)

    def target_bases(self, side: Side, rank: int, start_v: torch.Tensor | None = None) -> Bases:
        """Target bases, exact; warm-started from a LoRA-X input's V (`warm_bases`) where that pays.

        Warm bases pass a certificate of the exact method's tolerances but are not its bits, so they
        get their own cache tag: an "auto" entry (exact) is used first, never replaced, and never
        made of warm bases; a warm entry serves later warm runs whatever LoRA-X file started it.
        """
        if start_v is None or not warm_start_pays(side.shape[0], math.prod(side.shape[1:]), rank):
            return self.bases(side, rank, "auto", lambda w: top_bases(w, rank))
        for method in ("auto", WARM_METHOD):
            b = svd_cache.lookup(side.content, side.shape, rank, self.cache_dir, method)
            if b is not None:
                return b.to(self.device)
        b, warm = bases_warm_or_exact(side.tensor().to(self.device), rank, start_v.to(self.device))
        svd_cache.store(side.content, rank, b, self.cache_dir, WARM_METHOD if warm else "auto")
        return b.to(self.device)

    def source_bases(self, side: Side, rank: int, claimed_v: torch.Tensor | None) -> Bases:
        """Source bases: from a LoRA-X file's own `down` when it passes the checks of
        `bases_from_claimed_v` (no SVD of the source), else exact. Cached under their own method
        tag, so they never stand in for exact bases elsewhere."""
        if claimed_v is None:
            return self.bases(side, rank, "auto", lambda w: top_bases(w, rank))

        def compute(w: torch.Tensor) -> Bases:
            b = bases_from_claimed_v(w, claimed_v.to(self.device))
            return b if b is not None else top_bases(w, rank)

        return self.bases(side, rank, CLAIMED_METHOD, compute)


def claimed_v(users: Sequence["Job"], name: str, rank: int) -> torch.Tensor | None:
    """V of the first LoRA-X input whose module `name` has the full `rank` (down = V^T), else None.

    None as soon as a plain LoRA uses the module: its report needs exact source bases (energy share).
    """
    if any(j.plain for j in users):
        return None
    for j in users:
        mod = j.lora.modules[name]
        if not j.plain and int(mod.down.shape[0]) == rank:
            return mod.down.reshape(rank, -1).T
    return None
