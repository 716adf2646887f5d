"""The per-module work of a transfer: project one module onto the target bases (Eq. 3), copy it
when the weights are identical, or drop it with a reason; each returns an outcome that the main
thread applies to its job in module order."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import torch

from ..cache.phi_cache import norm_key
from ..formats.lora_file import LoraModule
from ..lorax import Bases, delta_norm, energy_in_subspace, module_similarity, project_factors
from ..lorax.similarity import Similarity
from .report import BELOW_THRESHOLD, IDENTICAL, TRANSFERRED, ModuleResult, TransferReport
from .sides import Engine, slice_bases

if TYPE_CHECKING:
    from ..formats.lora_file import LoraFile


@dataclass
class Job:
    """One input LoRA in flight: its file, its report, its output modules."""

    path: Path
    lora: "LoraFile"
    report: TransferReport
    plain: bool
    stat: str = ""   # the LoRA file's tensor_index.stat_key: keys its remembered module norms
    out: dict[str, "LoraModule"] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)  # the output's metadata, set before writing


# what the per-module work returns, applied to the jobs in module order by the main thread
Outcome = tuple[Job, ModuleResult, "LoraModule | None"]


def apply(outcomes: Iterable[Outcome]) -> None:
    for job, res, mod in outcomes:
        job.report.modules.append(res)
        if mod is not None:
            job.out[res.name] = mod


def module_rank(mod: "LoraModule", shape: tuple[int, ...]) -> int:
    return min(int(mod.down.shape[0]), int(shape[0]), math.prod(shape[1:]))


def lora_scale(mod: "LoraModule") -> float:
    return float(mod.alpha) / int(mod.down.shape[0]) if mod.alpha is not None else 1.0


def source_norm(eng: Engine, job: Job, name: str) -> float:
    """||dW||_F of the input's module `name` from the norm book, else from its factors (then remembered)."""
    key = norm_key(job.stat, name)
    hit = eng.norms.get(key)
    if hit is not None:
        return hit[0]
    mod = job.lora.modules[name]
    # float32 Gram products: ~1e-6 relative to float64, all a report needs, at about half the cost
    norm = delta_norm(mod.up.to(eng.device), mod.down.to(eng.device), lora_scale(mod), dtype=torch.float32)
    eng.norms.put(key, norm)
    return norm


def similarity(eng: Engine, key: str, bs: Bases | None, bt: Bases, r: int) -> Similarity:
    """phi at rank r from the phi book, else from the bases (then remembered)."""
    hit = eng.phi.get(key)
    if hit is not None:
        return Similarity(hit[0], hit[1], min(hit))
    assert bs is not None
    sim = module_similarity(slice_bases(bs, r), slice_bases(bt, r))
    eng.phi.put(key, sim.phi_u, sim.phi_v)
    return sim


def project(eng: Engine, job: Job, src_name: str, out_name: str, shape: tuple[int, ...], sim: Similarity | None,
             bt: Bases, bs_energy: Bases | None) -> Outcome:
    """Eq. 3 onto the target bases (kept if phi >= threshold); bs_energy: source bases for a plain input."""
    mod = job.lora.modules[src_name]
    r = module_rank(mod, shape)
    bt_r = slice_bases(bt, r)
    up, down = mod.up.to(eng.device), mod.down.to(eng.device)
    scale = lora_scale(mod)
    norm_s = source_norm(eng, job, src_name)
    dtype = eng.dtype
    up_t, down_t = project_factors(up.to(dtype), down.to(dtype), bt_r.u.to(dtype), bt_r.v.to(dtype), scale=scale)
    norm_t = float(torch.linalg.vector_norm(up_t.to(torch.float32)))  # ||U_t C||_F = ||C||_F
    kept = sim is None or sim.phi >= eng.threshold
    res = ModuleResult(
        name=out_name, shape=tuple(shape), rank=r, transferred=kept,
        reason=TRANSFERRED if kept else BELOW_THRESHOLD,
        phi_u=sim.phi_u if sim else None, phi_v=sim.phi_v if sim else None, source=src_name,
        norm_source=norm_s, norm_target=norm_t,
        energy_in_source_subspace=(energy_in_subspace(up, down, bs_energy.u[:, :r], bs_energy.v[:, :r])
                                   if job.plain and bs_energy is not None else None))
    return job, res, (LoraModule(name=out_name, down=down_t.cpu(), up=up_t.cpu(), alpha=float(r)) if kept else None)


def copy_identical(eng: Engine, job: Job, name: str, shape: tuple[int, ...]) -> Outcome:
    mod = job.lora.modules[name]
    norm = source_norm(eng, job, name)
    return job, ModuleResult(
        name=name, shape=tuple(shape), rank=int(mod.down.shape[0]), transferred=True, reason=IDENTICAL,
        phi_u=1.0, phi_v=1.0, source=name, norm_source=norm, norm_target=norm), mod


def drop(eng: Engine, job: Job, name: str, shape: tuple[int, ...] | None, reason: str,
          source: str | None = None) -> Outcome:
    norm = source_norm(eng, job, source or name) if (source or name) in job.lora.modules else None
    return job, ModuleResult(
        name=name, shape=tuple(shape or ()), rank=0, transferred=False, reason=reason, source=source or name,
        norm_source=norm, norm_target=0.0 if norm is not None else None), None


def progress_bar(items: Iterable, enabled: bool, desc: str, total: int) -> Iterator:
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm  # here: only runs with a progress bar pay its import

    # tqdm's bar shows elapsed<remaining, which is the "time left" users ask for
    yield from tqdm(items, desc=desc, unit="module", dynamic_ncols=True, total=total)
