"""The bases of a network's target layers: computed (batched by shape, cached by content when asked)
or taken from a LoRA-X weights file after a check.

A LoRA-X file's `lora_down` is V^T of the base it was trained on. When kohya resumes
(`--network_weights`, `--dim_from_weights`) from such a file, its V is checked to be the top right
singular subspace of this base's weight (`bases_from_claimed_v`; for float32 weights at a tolerance
only a float32 copy of the same weight's bases passes: fp16/bf16 rounding or another checkpoint's
subspace fall back to the SVD), and the bases come from a Rayleigh-Ritz step on it: no SVD at all.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterable, Iterator, Mapping

import torch

from ..cache.svd_cache import get_many
from ..errors import LoraxInputError
from ..formats.finite import all_finite
from ..lorax import Bases, top_bases_batched
from ..lorax.bases import bases_from_claimed_v
from ..lorax.parallel import cpu_workers, ordered_map
from .targets import Target

# Bytes of fp32 weights stacked into one batched SVD call on a GPU (bounds the peak memory of creation).
_BATCH_BYTES = 256 * 2**20
# CPU threads computing bases side by side (each single-threaded).
_MAX_WORKERS = 8
# Acceptance of a claimed V (orthonormality and invariance residuals, relative) for float32 base
# weights: a float32 V^T of the same weight's bases passes at ~1e-6; fp16 storage rounding (~2e-4)
# and other checkpoints do not. fp16/bf16 base weights (--full_fp16/--full_bf16) keep their bases in
# that dtype anyway, so a claim at that rounding (bases_from_claimed_v's own tolerance) loses nothing.
CLAIM_TOL = 1e-4
# |cos| between each claimed vector and the checked one it became (see claimed_bases)
_KEPT_COS = 0.9999


@contextlib.contextmanager
def disabled_autocast() -> Iterator[None]:
    """Bases are computed in float32/float64 even when asked for inside a training step's autocast."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def _claimed_one(t: Target, down: torch.Tensor) -> Bases | None:
    w = t.base.weight
    if w.device.type == "meta":
        return None
    full = w.dtype not in (torch.float16, torch.bfloat16)
    if full and down.dtype != torch.float32:
        return None
    rank = min(t.rank, w.shape[0], math.prod(w.shape[1:]))
    if down.shape[0] != rank or down[0].numel() != w[0].numel():
        return None
    v_claim = down.float().reshape(rank, -1).t()
    bases = bases_from_claimed_v(w.detach(), v_claim, **({"tol": CLAIM_TOL} if full else {}))
    if bases is None:
        return None
    # The Rayleigh-Ritz step may rotate the claimed vectors among themselves where singular values
    # are closer than the claim's rounding; the file's d was trained on the claimed vectors, so a
    # rotated basis would not reproduce its update: take the claim only if every vector stays put.
    v_claim = v_claim.to(bases.v.device) / v_claim.norm(dim=0).clamp_min(1e-30).to(bases.v.device)
    if float((bases.v * v_claim).sum(dim=0).abs().min()) < _KEPT_COS:
        return None
    return bases.to(w.device)


def claimed_bases(targets: Iterable[Target], claims: Mapping[str, torch.Tensor]) -> dict[str, Bases]:
    """Bases from claimed V^T (per lora name) that pass the check; the rest are left out (computed later).
    One module per thread-pool task, each on one thread (like `_batched_bases` on the CPU)."""
    jobs = [(t, claims[t.lora_name]) for t in targets if t.lora_name in claims]
    if not jobs:
        return {}
    with torch.no_grad(), cpu_workers(torch.device("cpu"), _workers()) as workers:
        found = list(ordered_map(lambda job: _claimed_one(*job), jobs, workers))
    return {t.lora_name: b for (t, _), b in zip(jobs, found) if b is not None}


def _svd_device(weight: torch.Tensor, svd_device: str | None) -> torch.device:
    if svd_device is not None:
        return torch.device(svd_device)
    return weight.device


def check_finite(targets: Iterable[Target]) -> None:
    """Refuse NaN/Inf base weights (LoraxInputError naming the module and its shape)."""
    for t in targets:
        w = t.base.weight
        if not all_finite(w):
            what = "NaN" if torch.isnan(w).any() else "Inf"
            raise LoraxInputError(f"base model: module {t.lora_name} weight {tuple(w.shape)} contains {what}")


def _workers() -> int:
    return max(1, min(_MAX_WORKERS, os.cpu_count() or 1))


def _batched_bases(weights: list[torch.Tensor], rank: int, method: str, svd_device: str | None) -> list[Bases]:
    """Bases of same-shaped weights.

    On the CPU: one weight per task on a thread pool, each task on one thread (LAPACK through scipy
    releases the GIL; `cpu_workers` runs each on one torch and LAPACK thread, so they do not oversubscribe the
    cores), so the result of each weight does not depend on the number of cores. On a GPU: stacked
    into as few batched calls as memory allows.
    """
    device = _svd_device(weights[0], svd_device)
    if device.type == "cpu":
        def one(w: torch.Tensor) -> Bases:
            return top_bases_batched(w.detach().to(device, torch.float32)[None], rank, method)[0].to(w.device)

        with torch.no_grad(), cpu_workers(device, _workers()) as workers:
            return list(ordered_map(one, weights, workers))
    per_item = 4 * weights[0].numel()
    step = max(1, _BATCH_BYTES // per_item)
    out: list[Bases] = []
    for start in range(0, len(weights), step):
        chunk = weights[start:start + step]
        with torch.no_grad():
            stack = torch.stack([w.detach().to(device, torch.float32) for w in chunk])
            bases = top_bases_batched(stack, rank, method)
        out.extend(bases[i].to(w.device) for i, w in enumerate(chunk))
    return out


def compute_bases(targets: list[Target], method: str = "auto", svd_device: str | None = None,
                  cache_dir: str | None = None) -> dict[str, Bases]:
    """Top-r bases per target: one SVD each, same-shaped weights batched, optional content-hash cache.

    NaN/Inf weights raise LoraxInputError before their SVD. Without a cache every weight is checked
    up front; with one only the misses are: a hit proves the weight finite, since entries are only
    written for bases computed from checked weights (a full pass over ~1.4 GB saved on SD1.5).
    """
    if cache_dir is None:
        check_finite(targets)
    groups: dict[tuple, list[Target]] = {}
    for t in targets:
        w = t.base.weight
        groups.setdefault((tuple(w.shape), w.dtype, t.rank, str(w.device)), []).append(t)
    out: dict[str, Bases] = {}
    for (_, _, rank, _), members in groups.items():
        weights = [t.base.weight for t in members]

        def compute_missing(missing: list[int], members=members, weights=weights, rank=rank) -> list[Bases]:
            if cache_dir is not None:
                check_finite(members[i] for i in missing)
            return _batched_bases([weights[i] for i in missing], rank, method, svd_device)

        found = get_many(weights, rank, cache_dir, compute_missing, method=method)
        out.update((t.lora_name, b) for t, b in zip(members, found))
    return out


