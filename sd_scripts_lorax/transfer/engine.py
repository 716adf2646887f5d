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

Speed: the modules run on a pool of torch.get_num_threads() workers (`lorax.parallel`: one torch
thread each, results applied in module order, so outputs, reports and caches equal a serial run's);
the model hashes for the metadata run meanwhile on background threads (`cache.model_hashes`). With an
SVD cache folder, a per-checkpoint tensor index (`tensor_index`), the bases (`svd_cache`, by content
key) and the phi values (`phi_cache`) are remembered, so a warm run reads no checkpoint tensor: only
the LoRA, the index and the target bases. The per-module work is `work.py`, the pairing `matching.py`,
the caches' side `sides.py`.

Everything is validated (`transfer_inputs`) before any output is written; outputs, reports and plots are written
as one unit (`outputs.OutputSet`), so a failure or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from ..cache.model_hashes import ModelHashes
from ..cache.phi_cache import load_norm_book, load_phi_book
from ..cache.svd_cache import prepare_dir
from ..cache.tensor_index import TensorIndex, stat_key
from ..errors import LoraxInputError
from ..formats import lora_file
from ..formats.checkpoint import Checkpoint
from ..formats.lora_file import is_lorax, read_lora, write_lora
from .inputs import (MATCH_MODES, PRECISIONS, SAVE_PRECISIONS, check_checkpoints, check_filters,
                     check_lora_against_source, check_options, nothing_passed, output_paths, side_paths)
from .matching import MATCHERS
from .outputs import OutputSet
from .report import IDENTICAL, ModuleResult, TransferReport, format_table, plot_heatmap, write_json
from .sides import Engine, Weights
from .work import Job

if TYPE_CHECKING:  # sibling I/O modules, imported lazily at run time
    from ..formats.checkpoint import Checkpoint
    from ..formats.hashing import FileHashes

__all__ = ["transfer", "print_tables", "TransferReport", "ModuleResult", "MATCH_MODES", "PRECISIONS",
           "SAVE_PRECISIONS"]


# ---------------------------------------------------------------- metadata and writing


def _output_metadata(job: Job, src: "Checkpoint", tgt: "Checkpoint", threshold: float,
                     hashes: tuple["FileHashes", "FileHashes"]) -> dict[str, str]:

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


def _save_dtype(job: Job, save_precision: str | None) -> torch.dtype:
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
            jobs.append(Job(path=p, lora=f, report=rep, plain=plain, stat=stat_key(p)))

        cache_dir = None
        if svd_cache_dir is not None:

            cache_dir = prepare_dir(svd_cache_dir)
        # the metadata's model hashes (seconds for GB files, unless remembered) overlap the module work;
        # a dry run writes no metadata and hashes nothing
        hashing = None if dry_run else ModelHashes(src, tgt, cache_dir)
        s_index = TensorIndex.load(cache_dir, src.path)
        same = src.path.resolve() == tgt.path.resolve()
        t_index = s_index if same else TensorIndex.load(cache_dir, tgt.path)
        eng = Engine(src=Weights(src, s_index), tgt=Weights(tgt, t_index), cache_dir=cache_dir,
                      phi=load_phi_book(cache_dir), norms=load_norm_book(cache_dir), device=dev,
                      dtype=PRECISIONS[precision],
                      threshold=float(threshold))
        MATCHERS[match](jobs, eng, filters, progress)
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


def _write_outputs(outputs: OutputSet, jobs: Sequence[Job], outs: Sequence[Path | None],
                   reports: Sequence[TransferReport], report_path: str | os.PathLike | None,
                   plot_paths: Sequence[Path | None], save_precision: str | None) -> None:
    """Adapters, report and plots as one unit: all to temporaries, then all renamed (outputs.py)."""

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
