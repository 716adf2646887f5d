"""The training-free transfer pipeline (paper Eq. 3): LoRA(-X) files + source + target -> LoRA-X files.

Streaming: only the weights the adapters touch are read, one module at a time, from both
checkpoints. Per module:

- identical stored weights (equal content keys: sha256 of dtype, shape and bytes) -> the adapter is
  copied as is, no SVD (reason "identical");
- otherwise source bases (for the similarity) and target bases (for the projection) at the module's
  rank; several input LoRAs share one target SVD per module, taken at the largest rank any of them
  needs and sliced (the top-r of a top-R SVD are its first r columns). A LoRA-X input trained on this
  source already holds the source's V (its `down`): the source bases come from it by one Rayleigh-Ritz
  step, checked to be the top invariant subspace (`bases_from_claimed_v`), with no source SVD; they
  serve only phi, and the SVD runs whenever the check fails (plain LoRAs, files of other bases);
- phi = min(phi_U, phi_V) >= threshold -> ``up = U_t C``, ``down = V_t^T``, ``alpha = r`` with
  ``C = (U_t^T up_s)(down_s V_t)``: the output is itself a LoRA-X adapter of the target.

Speed: the modules run on a pool of torch.get_num_threads() workers (`parallel`: one torch thread
each, results applied in module order, so outputs, reports and caches equal a serial run's); the
model hashes for the metadata run meanwhile on background threads (`model_hashes`). With an SVD cache folder, a per-checkpoint tensor
index (`tensor_index`), the bases (`svd_cache`, by content key) and the phi values (`phi_cache`) are
remembered, so a warm run reads no checkpoint tensor: only the LoRA, the index and the target bases.

Everything is validated (`transfer_inputs`) before any output is written; outputs, reports and plots are written
as one unit (`outputs.OutputSet`), so a failure or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import torch

from ..errors import LoraxInputError
from ..lorax import Bases, delta_norm, energy_in_subspace, module_similarity, project_factors, top_bases
from ..lorax.bases import METHOD_VERSION, bases_from_claimed_v
from ..lorax.similarity import Similarity
from ..cache.model_hashes import ModelHashes
from .parallel import cpu_workers, ordered_map
from ..cache.phi_cache import FloatBook, load_norm_book, load_phi_book, norm_key, phi_key
from ..cache.tensor_index import TensorIndex, content_key, stat_key
from .inputs import (
    MATCH_MODES,
    PRECISIONS,
    SAVE_PRECISIONS,
    check_checkpoints,
    check_filters,
    check_lora_against_source,
    check_options,
    nothing_passed,
    filtered,
    output_paths,
    side_paths,
)
from .outputs import OutputSet
from .report import (
    BELOW_THRESHOLD,
    FILTERED,
    IDENTICAL,
    MISSING_IN_TARGET,
    SHAPE_MISMATCH,
    TRANSFERRED,
    ModuleResult,
    TransferReport,
    format_table,
    plot_heatmap,
    split_block,
    write_json,
)

if TYPE_CHECKING:  # sibling I/O modules, imported lazily at run time
    from ..formats.checkpoint import Checkpoint
    from ..formats.hashing import FileHashes
    from ..formats.lora_file import LoraFile, LoraModule
    from ..families.naming import ModuleRef


# SVD-cache method tag of source bases taken from a LoRA-X file (see _Engine.source_bases)
CLAIMED_METHOD = "lorax-file-v1"

__all__ = ["transfer", "TransferReport", "ModuleResult", "MATCH_MODES", "PRECISIONS", "SAVE_PRECISIONS"]


# ---------------------------------------------------------------- weights, bases and phi through the caches


def slice_bases(b: Bases, r: int) -> Bases:
    """The top-r triplets of a top-R result (R >= r)."""
    return Bases(b.u[:, :r], b.s[:r], b.v[:, :r])


class _Weights:
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


class _Side:
    """A module's weight in one checkpoint: its content key at once, its bytes only when needed."""

    def __init__(self, weights: _Weights, ref: "ModuleRef") -> None:
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
class _Engine:
    """What the per-module work needs: both checkpoints' weights, the caches, the compute settings."""

    src: _Weights
    tgt: _Weights
    cache_dir: Path | None
    phi: FloatBook
    norms: FloatBook
    device: torch.device
    dtype: torch.dtype
    threshold: float

    def bases(self, side: _Side, rank: int, method: str, compute: Callable[[torch.Tensor], Bases]) -> Bases:
        """Bases of `side` at `rank` from the SVD cache (by content key, no read), else computed and stored."""
        from ..cache import svd_cache

        b = svd_cache.lookup(side.content, side.shape, rank, self.cache_dir, method)
        if b is None:
            b = compute(side.tensor().to(self.device))
            svd_cache.store(side.content, rank, b, self.cache_dir, method)
        return b.to(self.device)

    def target_bases(self, side: _Side, rank: int) -> Bases:
        return self.bases(side, rank, "auto", lambda w: top_bases(w, rank))

    def source_bases(self, side: _Side, rank: int, claimed_v: torch.Tensor | None) -> Bases:
        """Source bases: from a LoRA-X file's own `down` when it passes the checks of
        `bases_from_claimed_v` (no SVD of the source), else exact. Cached under their own method
        tag, so they never stand in for exact bases elsewhere."""
        if claimed_v is None:
            return self.bases(side, rank, "auto", lambda w: top_bases(w, rank))

        def compute(w: torch.Tensor) -> Bases:
            b = bases_from_claimed_v(w, claimed_v.to(self.device))
            return b if b is not None else top_bases(w, rank)

        return self.bases(side, rank, CLAIMED_METHOD, compute)


def _claimed_v(users: Sequence["_Job"], name: str, rank: int) -> torch.Tensor | None:
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


# ---------------------------------------------------------------- per-module work


@dataclass
class _Job:
    """One input LoRA in flight: its file, its report, its output modules."""

    path: Path
    lora: "LoraFile"
    report: TransferReport
    plain: bool
    stat: str = ""   # the LoRA file's tensor_index.stat_key: keys its remembered module norms
    out: dict[str, "LoraModule"] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)  # the output's metadata, set before writing


# what the per-module work returns, applied to the jobs in module order by the main thread
_Outcome = tuple[_Job, ModuleResult, "LoraModule | None"]


def _apply(outcomes: Iterable[_Outcome]) -> None:
    for job, res, mod in outcomes:
        job.report.modules.append(res)
        if mod is not None:
            job.out[res.name] = mod


def _module_rank(mod: "LoraModule", shape: tuple[int, ...]) -> int:
    return min(int(mod.down.shape[0]), int(shape[0]), math.prod(shape[1:]))


def _scale(mod: "LoraModule") -> float:
    return float(mod.alpha) / int(mod.down.shape[0]) if mod.alpha is not None else 1.0


def _source_norm(eng: _Engine, job: _Job, name: str) -> float:
    """||dW||_F of the input's module `name` from the norm book, else from its factors (then remembered)."""
    key = norm_key(job.stat, name)
    hit = eng.norms.get(key)
    if hit is not None:
        return hit[0]
    mod = job.lora.modules[name]
    # float32 Gram products: ~1e-6 relative to float64, all a report needs, at about half the cost
    norm = delta_norm(mod.up.to(eng.device), mod.down.to(eng.device), _scale(mod), dtype=torch.float32)
    eng.norms.put(key, norm)
    return norm


def _similarity(eng: _Engine, key: str, bs: Bases | None, bt: Bases, r: int) -> Similarity:
    """phi at rank r from the phi book, else from the bases (then remembered)."""
    hit = eng.phi.get(key)
    if hit is not None:
        return Similarity(hit[0], hit[1], min(hit))
    assert bs is not None
    sim = module_similarity(slice_bases(bs, r), slice_bases(bt, r))
    eng.phi.put(key, sim.phi_u, sim.phi_v)
    return sim


def _project(eng: _Engine, job: _Job, src_name: str, out_name: str, shape: tuple[int, ...], sim: Similarity | None,
             bt: Bases, bs_energy: Bases | None) -> _Outcome:
    """Eq. 3 onto the target bases (kept if phi >= threshold); bs_energy: source bases for a plain input."""
    from ..formats.lora_file import LoraModule

    mod = job.lora.modules[src_name]
    r = _module_rank(mod, shape)
    bt_r = slice_bases(bt, r)
    up, down = mod.up.to(eng.device), mod.down.to(eng.device)
    scale = _scale(mod)
    norm_s = _source_norm(eng, job, src_name)
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


def _copy_identical(eng: _Engine, job: _Job, name: str, shape: tuple[int, ...]) -> _Outcome:
    mod = job.lora.modules[name]
    norm = _source_norm(eng, job, name)
    return job, ModuleResult(
        name=name, shape=tuple(shape), rank=int(mod.down.shape[0]), transferred=True, reason=IDENTICAL,
        phi_u=1.0, phi_v=1.0, source=name, norm_source=norm, norm_target=norm), mod


def _drop(eng: _Engine, job: _Job, name: str, shape: tuple[int, ...] | None, reason: str,
          source: str | None = None) -> _Outcome:
    norm = _source_norm(eng, job, source or name) if (source or name) in job.lora.modules else None
    return job, ModuleResult(
        name=name, shape=tuple(shape or ()), rank=0, transferred=False, reason=reason, source=source or name,
        norm_source=norm, norm_target=0.0 if norm is not None else None), None


def _progress(items: Iterable, enabled: bool, desc: str, total: int) -> Iterator:
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm

    # tqdm's bar shows elapsed<remaining, which is the "time left" users ask for
    yield from tqdm(items, desc=desc, unit="module", dynamic_ncols=True, total=total)


def _run_name_match(jobs: list[_Job], eng: _Engine, filters: Sequence[str], progress: bool) -> None:
    s_refs, t_refs = eng.src.ckpt.modules(), eng.tgt.ckpt.modules()
    names = sorted({n for j in jobs for n in j.lora.modules})

    def work(name: str) -> list[_Outcome]:
        users = [j for j in jobs if name in j.lora.modules]
        s_ref = s_refs[name]
        if filtered(name, filters):
            return [_drop(eng, j, name, s_ref.shape, FILTERED) for j in users]
        t_ref = t_refs.get(name)
        if t_ref is None:
            return [_drop(eng, j, name, s_ref.shape, MISSING_IN_TARGET) for j in users]
        if tuple(t_ref.shape) != tuple(s_ref.shape):
            return [_drop(eng, j, name, t_ref.shape, SHAPE_MISMATCH) for j in users]
        shape = tuple(s_ref.shape)
        s, t = _Side(eng.src, s_ref), _Side(eng.tgt, t_ref)
        if s.content == t.content:  # equal content keys: bit-identical weights of one dtype
            return [_copy_identical(eng, j, name, shape) for j in users]
        rank = max(_module_rank(j.lora.modules[name], shape) for j in users)
        claimed = _claimed_v(users, name, rank)
        s_method = CLAIMED_METHOD if claimed is not None else "auto"
        ranks = {j.path: _module_rank(j.lora.modules[name], shape) for j in users}
        keys = {r: phi_key(s.content, t.content, r, rank, s_method, METHOD_VERSION) for r in set(ranks.values())}
        # source bases only for a phi not yet known, or a plain input's energy share
        need_bs = any(j.plain for j in users) or any(eng.phi.get(k) is None for k in keys.values())
        bs = eng.source_bases(s, rank, claimed) if need_bs else None
        bt = eng.target_bases(t, rank)
        return [_project(eng, j, name, name, shape, _similarity(eng, keys[ranks[j.path]], bs, bt, ranks[j.path]),
                         bt, bs) for j in users]

    with cpu_workers(eng.device) as workers:
        for outcomes in _progress(ordered_map(work, names, workers), progress, "transfer", len(names)):
            _apply(outcomes)


def _run_similarity_match(jobs: list[_Job], eng: _Engine, filters: Sequence[str], progress: bool) -> None:
    """Pair each target module with the most similar same-shaped source module of the same part and kind.

    For distilled targets whose blocks were removed and renumbered. Candidate sources are the
    modules the LoRAs touch; a same-named identical weight is paired with no SVD. The target bases
    run in parallel (in order); the source bases (memoised) and the pairing run in the main thread.
    """
    s_refs, t_refs = eng.src.ckpt.modules(), eng.tgt.ckpt.modules()

    def kind(name: str, shape: Sequence[int]) -> tuple[str, str, tuple[int, ...]]:
        return (s_refs[name].part if name in s_refs else t_refs[name].part, split_block(name)[1], tuple(shape))

    touched = sorted({n for j in jobs for n in j.lora.modules if not filtered(n, filters)})
    for j in jobs:
        _apply(_drop(eng, j, n, s_refs[n].shape, FILTERED) for n in sorted(j.lora.modules) if filtered(n, filters))
    by_kind: dict[tuple, list[str]] = {}
    for n in touched:
        by_kind.setdefault(kind(n, s_refs[n].shape), []).append(n)
    targets = sorted(n for n, ref in t_refs.items() if kind(n, ref.shape) in by_kind and not filtered(n, filters))
    src_bases: dict[str, Bases] = {}

    def source_bases(n: str) -> Bases:
        if n not in src_bases:
            users = [j for j in jobs if n in j.lora.modules]
            r = max(_module_rank(j.lora.modules[n], s_refs[n].shape) for j in users)
            src_bases[n] = eng.source_bases(_Side(eng.src, s_refs[n]), r, _claimed_v(users, n, r))
        return src_bases[n]

    def target_work(t_name: str) -> Bases | None:
        """The target bases at the largest candidate rank; None when the same-named source is identical."""
        t_ref = t_refs[t_name]
        shape = tuple(t_ref.shape)
        cands = by_kind[kind(t_name, shape)]
        t = _Side(eng.tgt, t_ref)
        if t_name in cands and _Side(eng.src, s_refs[t_name]).content == t.content:
            return None
        rank = max(_module_rank(j.lora.modules[c], shape) for j in jobs for c in cands if c in j.lora.modules)
        return eng.target_bases(t, rank)

    paired: dict[int, set[str]] = {id(j): set() for j in jobs}
    with cpu_workers(eng.device) as workers:
        results = zip(targets, ordered_map(target_work, targets, workers))
        for t_name, bt in _progress(results, progress, "transfer (similarity)", len(targets)):
            shape = tuple(t_refs[t_name].shape)
            cands = by_kind[kind(t_name, shape)]
            if bt is None:
                for j in jobs:
                    if t_name in j.lora.modules:
                        _apply([_copy_identical(eng, j, t_name, shape)])
                        paired[id(j)].add(t_name)
                continue
            for j in jobs:
                mine = [c for c in cands if c in j.lora.modules]
                if not mine:
                    continue
                best, best_sim = None, None
                for c in mine:  # ties keep the first (sorted) name, so the pairing is deterministic
                    r = _module_rank(j.lora.modules[c], shape)
                    sim = module_similarity(slice_bases(source_bases(c), r), slice_bases(bt, r))
                    if best_sim is None or sim.phi > best_sim.phi + 1e-12:
                        best, best_sim = c, sim
                assert best is not None
                _apply([_project(eng, j, best, t_name, shape, best_sim, bt, source_bases(best))])
                paired[id(j)].add(best)
    for j in jobs:
        _apply(_drop(eng, j, n, s_refs[n].shape, MISSING_IN_TARGET) for n in sorted(j.lora.modules)
               if n not in paired[id(j)] and not filtered(n, filters))


# ---------------------------------------------------------------- metadata and writing


def _output_metadata(job: _Job, src: "Checkpoint", tgt: "Checkpoint", threshold: float,
                     hashes: tuple["FileHashes", "FileHashes"]) -> dict[str, str]:
    from ..formats import lora_file

    meta = dict(job.lora.metadata)
    s_hash, t_hash = hashes
    rep = job.report
    ranks = {int(m.down.shape[0]) for m in job.out.values()}
    meta.update(lora_file.lorax_metadata(
        rank=max(ranks), source_name=src.name, source_hash=s_hash.sha256, target_name=tgt.name,
        target_hash=t_hash.sha256, threshold=threshold, kept=len(rep.kept), dropped=len(rep.dropped)))
    # kohya's base-model keys now describe the target
    meta["ss_sd_model_name"] = tgt.name
    meta["ss_sd_model_hash"] = t_hash.legacy
    meta["ss_new_sd_model_hash"] = t_hash.sha256
    # describe what is actually written (LoRA-X modules have alpha = rank)
    dims = {str(int(m.down.shape[0])) for m in job.out.values()}
    alphas = {str(float(m.alpha)) for m in job.out.values()}
    meta["ss_network_dim"] = dims.pop() if len(dims) == 1 else "Dynamic"
    meta["ss_network_alpha"] = alphas.pop() if len(alphas) == 1 else "Dynamic"
    if job.plain and any(m.reason == IDENTICAL for m in rep.kept):
        # identical modules of a plain LoRA are copied as they are, outside any subspace: do not
        # claim the file is LoRA-X, so a later transfer still warns and reports the energy
        meta.pop("lorax.format_version", None)
    return meta


def _save_dtype(job: _Job, save_precision: str | None) -> torch.dtype:
    if save_precision is not None:
        return SAVE_PRECISIONS[save_precision]
    first = next(iter(job.lora.modules.values()))
    return first.up.dtype  # keep the input's precision


# ---------------------------------------------------------------- the public API


def transfer(loras: str | os.PathLike | Sequence[str | os.PathLike],
             source_model: str | os.PathLike, target_model: str | os.PathLike,
             save_to: str | os.PathLike | None = None, *, threshold: float = 0.8,
             filter_blocks: Sequence[str] = (), match: str = "name", device: str = "cpu",
             precision: str = "float", save_precision: str | None = None,
             svd_cache_dir: str | os.PathLike | None = None, overwrite: bool = False,
             dry_run: bool = False, report_path: str | os.PathLike | None = None,
             plot_path: str | os.PathLike | None = None, progress: bool = True) -> list[TransferReport]:
    """Transfer LoRA(-X) adapters trained on `source_model` to `target_model` (paper Eq. 3), no training.

    Args:
        loras: one path or several; several share the target's SVDs.
        source_model, target_model: single-file checkpoints or diffusers folders, same family.
        save_to: ``OUT.safetensors`` (one input) or an existing folder (one
            ``<lora stem>_to_<target stem>.safetensors`` per input). Ignored with ``dry_run``.
        threshold: keep a module only if phi = min(phi_U, phi_V) >= threshold.
        filter_blocks: fnmatch globs on kohya names (with or without ``lora_``); never transferred.
        match: "name" (pair modules by name) or "similarity" (pair each target module with the most
            similar same-shaped source module of the same part and kind; for distilled targets).
        device: "cpu" or "cuda". precision: compute dtype of the projection ("float", "fp16", "bf16");
            SVDs are always float32 or better. save_precision: output dtype (default: the input's).
        svd_cache_dir: folder of cached bases (see ``svd_cache``); reused across runs.
        overwrite: replace existing outputs. dry_run: compute and report, write no adapter.
        report_path: JSON report, ``{"modules": [...], "summary": {...}}``; with several inputs
            ``{"reports": [<that>, ...]}`` in input order.
        plot_path: per-block phi heat map (PNG); with several inputs one per input, named
            ``<stem>.<lora stem><suffix>``.
        progress: tqdm progress bar over modules.

    Returns one TransferReport per input, in order. Raises LoraxInputError on bad input, before
    anything is written.
    """
    from ..formats.checkpoint import Checkpoint
    from ..formats.lora_file import is_lorax, read_lora

    paths = [Path(loras)] if isinstance(loras, (str, os.PathLike)) else [Path(p) for p in loras]
    if not paths:
        raise LoraxInputError("no --lora input given")
    dev = check_options(threshold, match, device, precision, save_precision)
    filters = tuple(filter_blocks or ())
    plot_paths = side_paths(plot_path, paths, per_input=True)
    for p in paths:
        if not p.exists():
            raise LoraxInputError(f"{p}: LoRA file not found")
    for p in (source_model, target_model):
        if not Path(p).exists():
            raise LoraxInputError(f"{p}: model not found")
    # every output is checked against the inputs and the others before any work (see outputs.py)
    outputs = OutputSet(overwrite)
    for p in paths:
        outputs.input(p, "--lora")
    outputs.input(Path(source_model), "--source_model")
    outputs.input(Path(target_model), "--target_model")
    if report_path is not None:
        outputs.add(report_path, "--report")
    for p in plot_paths:
        if p is not None:
            outputs.add(p, "--plot")

    with Checkpoint.open(source_model) as src, Checkpoint.open(target_model) as tgt:
        outs: list[Path | None] = [None] * len(paths)
        if not dry_run:
            outs = list(output_paths(paths, save_to, tgt.name))
            for o in outs:
                outputs.add(o, "--save_to")
        files = [read_lora(p) for p in paths]
        for f in files:
            check_lora_against_source(f, src)
            check_filters(f, filters)
        check_checkpoints(src, tgt, {n for f in files for n in f.modules})

        jobs = []
        for p, f, o in zip(paths, files, outs):
            plain = not is_lorax(f)
            if plain:
                warnings.warn(f"{p}: not a LoRA-X adapter: it goes through the same projection, but only its "
                              f"part inside the source subspace transfers faithfully (see energy_in_source_subspace)",
                              stacklevel=2)
            rep = TransferReport(lora=str(p), source_model=src.name, target_model=tgt.name,
                                 threshold=float(threshold), match=match, is_lorax=not plain,
                                 output=str(o) if o is not None else None)
            jobs.append(_Job(path=p, lora=f, report=rep, plain=plain, stat=stat_key(p)))

        cache_dir = None
        if svd_cache_dir is not None:
            from ..cache.svd_cache import prepare_dir

            cache_dir = prepare_dir(svd_cache_dir)
        # the metadata's model hashes (seconds for GB files, unless remembered) overlap the module work;
        # a dry run writes no metadata and hashes nothing
        hashing = None if dry_run else ModelHashes(src, tgt, cache_dir)
        s_index = TensorIndex.load(cache_dir, src.path)
        same = src.path.resolve() == tgt.path.resolve()
        t_index = s_index if same else TensorIndex.load(cache_dir, tgt.path)
        eng = _Engine(src=_Weights(src, s_index), tgt=_Weights(tgt, t_index), cache_dir=cache_dir,
                      phi=load_phi_book(cache_dir), norms=load_norm_book(cache_dir), device=dev, dtype=PRECISIONS[precision],
                      threshold=float(threshold))
        run = _run_name_match if match == "name" else _run_similarity_match
        run(jobs, eng, filters, progress)
        for index in (eng.src.index, eng.tgt.index):
            index.save()
        eng.phi.save()
        eng.norms.save()

        if not dry_run:
            for j in jobs:
                if not j.out:
                    raise LoraxInputError(nothing_passed(j.path, j.report, threshold))
            for j in jobs:
                meta = _output_metadata(j, src, tgt, float(threshold), hashing.result())
                j.report.source_hash = meta.get("lorax.source_model_hash")
                j.report.target_hash = meta.get("lorax.target_model_hash")
                j.meta = meta

    reports = [j.report for j in jobs]
    _write_outputs(outputs, jobs, outs, reports, report_path, plot_paths, save_precision)
    return reports


def _write_outputs(outputs: OutputSet, jobs: Sequence[_Job], outs: Sequence[Path | None],
                   reports: Sequence[TransferReport], report_path: str | os.PathLike | None,
                   plot_paths: Sequence[Path | None], save_precision: str | None) -> None:
    """Adapters, report and plots as one unit: all to temporaries, then all renamed (outputs.py)."""
    from ..formats.lora_file import write_lora

    with outputs.writing():
        for j, o in zip(jobs, outs):
            if o is not None:
                mods = [j.out[n] for n in sorted(j.out)]
                outputs.stage(o, lambda tmp, j=j, mods=mods: write_lora(
                    tmp, mods, j.meta, dtype=_save_dtype(j, save_precision), overwrite=True))
        if report_path is not None:
            outputs.stage(report_path, lambda tmp: write_json(reports, tmp))
        for rep, pp in zip(reports, plot_paths):
            if pp is not None:
                outputs.stage(pp, lambda tmp, rep=rep: plot_heatmap(rep, tmp))


def print_tables(reports: Sequence[TransferReport], write: Callable[[str], None] = print) -> None:
    """Print each report's terminal table."""
    for rep in reports:
        write(format_table(rep))
