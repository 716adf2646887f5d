"""How the modules of the source adapter are paired with the target's: the matching methods, by
the name the CLI's `--match` uses.

- "name": the same kohya name in both models (fine-tunes and merges);
- "similarity": each target module with the most similar same-shaped source module of the same part
  and kind (distilled targets whose blocks were removed and renumbered).

A method is `run(jobs, engine, filters, progress)`; adding one is adding it to `MATCHERS`.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Sequence

from ..lorax import Bases, module_similarity
from ..lorax.parallel import cpu_workers, ordered_map
from .report import FILTERED, MISSING_IN_TARGET, SHAPE_MISMATCH, split_block
from .sides import CLAIMED_METHOD, Engine, Side, claimed_v, slice_bases
from .work import Job, Outcome, apply, copy_identical, drop, module_rank, progress_bar, project, similarity
from ..cache.phi_cache import phi_key
from ..lorax.bases import METHOD_VERSION


def filtered(name: str, patterns: Sequence[str]) -> bool:
    short = name[len("lora_"):] if name.startswith("lora_") else name
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(short, p) for p in patterns)


def run_name_match(jobs: list[Job], eng: Engine, filters: Sequence[str], progress: bool) -> None:
    s_refs, t_refs = eng.src.ckpt.modules(), eng.tgt.ckpt.modules()
    names = sorted({n for j in jobs for n in j.lora.modules})

    def work(name: str) -> list[Outcome]:
        users = [j for j in jobs if name in j.lora.modules]
        s_ref = s_refs[name]
        if filtered(name, filters):
            return [drop(eng, j, name, s_ref.shape, FILTERED) for j in users]
        t_ref = t_refs.get(name)
        if t_ref is None:
            return [drop(eng, j, name, s_ref.shape, MISSING_IN_TARGET) for j in users]
        if tuple(t_ref.shape) != tuple(s_ref.shape):
            return [drop(eng, j, name, t_ref.shape, SHAPE_MISMATCH) for j in users]
        shape = tuple(s_ref.shape)
        s, t = Side(eng.src, s_ref), Side(eng.tgt, t_ref)
        if s.content == t.content:  # equal content keys: bit-identical weights of one dtype
            return [copy_identical(eng, j, name, shape) for j in users]
        rank = max(module_rank(j.lora.modules[name], shape) for j in users)
        claimed = claimed_v(users, name, rank)
        s_method = CLAIMED_METHOD if claimed is not None else "auto"
        ranks = {j.path: module_rank(j.lora.modules[name], shape) for j in users}
        keys = {r: phi_key(s.content, t.content, r, rank, s_method, METHOD_VERSION) for r in set(ranks.values())}
        # source bases only for a phi not yet known, or a plain input's energy share
        need_bs = any(j.plain for j in users) or any(eng.phi.get(k) is None for k in keys.values())
        bs = eng.source_bases(s, rank, claimed) if need_bs else None
        bt = eng.target_bases(t, rank, claimed)  # warm-started from the source's V where that pays
        return [project(eng, j, name, name, shape, similarity(eng, keys[ranks[j.path]], bs, bt, ranks[j.path]),
                         bt, bs) for j in users]

    with cpu_workers(eng.device) as workers:
        for outcomes in progress_bar(ordered_map(work, names, workers), progress, "transfer", len(names)):
            apply(outcomes)


def run_similarity_match(jobs: list[Job], eng: Engine, filters: Sequence[str], progress: bool) -> None:
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
        apply(drop(eng, j, n, s_refs[n].shape, FILTERED) for n in sorted(j.lora.modules) if filtered(n, filters))
    by_kind: dict[tuple, list[str]] = {}
    for n in touched:
        by_kind.setdefault(kind(n, s_refs[n].shape), []).append(n)
    targets = sorted(n for n, ref in t_refs.items() if kind(n, ref.shape) in by_kind and not filtered(n, filters))
    src_bases: dict[str, Bases] = {}

    def source_bases(n: str) -> Bases:
        if n not in src_bases:
            users = [j for j in jobs if n in j.lora.modules]
            r = max(module_rank(j.lora.modules[n], s_refs[n].shape) for j in users)
            src_bases[n] = eng.source_bases(Side(eng.src, s_refs[n]), r, claimed_v(users, n, r))
        return src_bases[n]

    def target_work(t_name: str) -> Bases | None:
        """The target bases at the largest candidate rank; None when the same-named source is identical."""
        t_ref = t_refs[t_name]
        shape = tuple(t_ref.shape)
        cands = by_kind[kind(t_name, shape)]
        t = Side(eng.tgt, t_ref)
        if t_name in cands and Side(eng.src, s_refs[t_name]).content == t.content:
            return None
        rank = max(module_rank(j.lora.modules[c], shape) for j in jobs for c in cands if c in j.lora.modules)
        return eng.target_bases(t, rank)

    paired: dict[int, set[str]] = {id(j): set() for j in jobs}
    with cpu_workers(eng.device) as workers:
        results = zip(targets, ordered_map(target_work, targets, workers))
        for t_name, bt in progress_bar(results, progress, "transfer (similarity)", len(targets)):
            shape = tuple(t_refs[t_name].shape)
            cands = by_kind[kind(t_name, shape)]
            if bt is None:
                for j in jobs:
                    if t_name in j.lora.modules:
                        apply([copy_identical(eng, j, t_name, shape)])
                        paired[id(j)].add(t_name)
                continue
            for j in jobs:
                mine = [c for c in cands if c in j.lora.modules]
                if not mine:
                    continue
                best, best_sim = None, None
                for c in mine:  # ties keep the first (sorted) name, so the pairing is deterministic
                    r = module_rank(j.lora.modules[c], shape)
                    sim = module_similarity(slice_bases(source_bases(c), r), slice_bases(bt, r))
                    if best_sim is None or sim.phi > best_sim.phi + 1e-12:
                        best, best_sim = c, sim
                assert best is not None
                apply([project(eng, j, best, t_name, shape, best_sim, bt, source_bases(best))])
                paired[id(j)].add(best)
    for j in jobs:
        apply(drop(eng, j, n, s_refs[n].shape, MISSING_IN_TARGET) for n in sorted(j.lora.modules)
               if n not in paired[id(j)] and not filtered(n, filters))


MATCHERS: dict[str, Callable[[list[Job], Engine, Sequence[str], bool], None]] = {
    "name": run_name_match,
    "similarity": run_similarity_match,
}
