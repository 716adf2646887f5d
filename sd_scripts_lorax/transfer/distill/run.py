"""`--method distill`: Eq. 3, then a data-free refinement so target + adapter behaves like source + adapter.

1. project: the ordinary transfer (`engine.transfer`) into a temporary file: a LoRA-X of the target;
2. teacher set: source + its adapter samples latents for the adapter's prompts; its predictions on
   the noised latents (with and without the prompt) are cached, then the source is freed;
3. identity set: the target alone samples latents for the identity prompts (no trigger); its own
   predictions are what the adapted target should keep there (cached as well);
4. fit: the projected modules' d (or r x r core) is trained to match (`fit`), the target the only
   UNet in memory;
5. write: a LoRA-X file of the target with `lorax.method = distill` and the figures in its metadata;
   the report gains a "distill" section (loss curve, held-out match error before and after, the
   copy baseline's) and, with a plot path, a loss-curve plot beside the heat map (`<plot>_loss.png`).
Nothing is written before the end; bad input is one line before any model runs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from ...errors import LoraxInputError
from ...formats.lora_file import read_lora, write_lora
from ..engine import transfer
from ..inputs import SAVE_PRECISIONS, check_options, output_paths
from ..outputs import OutputSet
from ..report import TRANSFERRED, plot_heatmap
from . import models as dmodels
from .adapter import Adapter
from .options import DistillOptions
from .fit import fit, mse, predict, relative
from .prompts import PromptSets, resolve
from .teacher import MatchSet, SetSpec, build_set, cache_key, load_cached, store


@dataclass
class DistillReport:
    """The refinement's figures (the report's "distill" section)."""

    prompts: list[str]
    identity_prompts: list[str]
    prompts_origin: str
    options: dict
    trained_modules: int
    curve: list[float]
    match_curve: list[float]
    # held-out match error, relative to the target without adapter (1 = no better than no adapter)
    match_error_before: float        # the projection (Eq. 3)
    match_error_after: float         # after the refinement
    match_error_copy: float | None   # the source adapter loaded as is (None: names or shapes differ)
    # drift from the target's own predictions on held-out identity prompts (mean squared difference)
    identity_drift_before: float | None
    identity_drift_after: float | None
    identity_drift_copy: float | None
    teacher_cached: bool
    seconds: dict
    # UNet passes by stage (DistillOptions.unet_passes) and their share of training on the target
    unet_passes: dict = field(default_factory=dict)
    compute_share: float = math.nan

    def to_json(self) -> dict:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v
        return {k: (clean(v) if not isinstance(v, list) else [clean(x) for x in v]) for k, v in asdict(self).items()}


def _model_identity(path: str | os.PathLike) -> str:
    from ...cache.tensor_index import stat_key

    return stat_key(path)


def _precheck_model(path: Path, role: str) -> None:
    if path.is_dir() and (path / "unet").is_dir() and not (path / "text_encoder").is_dir():
        raise LoraxInputError(f"{path}: the {role} model has no text encoder (text_encoder/ missing); "
                              f"--method distill needs it to condition the UNet on prompts")


def loss_plot_path(plot_path: str | os.PathLike) -> Path:
    p = Path(plot_path)
    return p.with_name(f"{p.stem}_loss{p.suffix or '.png'}")


def _teacher_set(source: Path, lora: Path, spec: SetSpec, device: torch.device, cache_dir: Path | None,
                 log: Callable[[str], None]) -> tuple[MatchSet, bool]:
    key = cache_key({"role": "teacher", "source": _model_identity(source), "lora": _model_identity(lora),
                     "spec": asdict(spec)})
    hit = load_cached(cache_dir, key)
    if hit is not None:
        log(f"distill: teacher predictions from the cache ({len(hit)} items)")
        return hit, True
    log(f"distill: sampling {spec.samples} teacher latents ({spec.sample_steps} steps) for {len(spec.prompts)} prompts")
    teacher = dmodels.load(source, device, "source")
    dmodels.merge_adapter(teacher, lora)
    s = build_set(teacher, spec)
    del teacher
    store(cache_dir, key, s)
    return s, False


def _identity_set(target_loaded, target: Path, spec: SetSpec, cache_dir: Path | None) -> MatchSet:
    key = cache_key({"role": "identity", "target": _model_identity(target), "spec": asdict(spec)})
    hit = load_cached(cache_dir, key)
    if hit is not None:
        return hit
    s = build_set(target_loaded, spec)
    store(cache_dir, key, s)
    return s


def _copy_predictions(tgt, src_modules: dict, held: MatchSet, precision: str) -> torch.Tensor | None:
    """Predictions of the target with the source adapter loaded unchanged, or None if it does not fit."""
    try:
        layers = tgt.layers(list(src_modules))
        if any(n not in layers for n in src_modules):
            return None
        copy = Adapter(layers, src_modules.values())
    except LoraxInputError:
        return None
    try:
        return predict(tgt, held, precision)
    finally:
        copy.remove()


def distill_transfer(lora: str | os.PathLike, source_model: str | os.PathLike, target_model: str | os.PathLike,
                     save_to: str | os.PathLike | None, opts: DistillOptions | None = None, *,
                     threshold: float = 0.8, filter_blocks: Sequence[str] = (), match: str = "name",
                     device: str = "cpu", precision: str = "float", save_precision: str | None = None,
                     svd_cache_dir: str | os.PathLike | None = None, overwrite: bool = False, dry_run: bool = False,
                     report_path: str | os.PathLike | None = None, plot_path: str | os.PathLike | None = None,
                     progress: bool = True, log: Callable[[str], None] = print):
    """Transfer one adapter with Eq. 3 and refine it by data-free function matching.

    Returns (TransferReport, DistillReport). Raises LoraxInputError on bad input before writing anything.
    """
    t_start = time.perf_counter()
    lora, source, target = Path(lora), Path(source_model), Path(target_model)
    opts = opts or DistillOptions()
    opts.check()
    dev = check_options(threshold, match, device, precision, save_precision)
    for p, what in ((lora, "LoRA file"), (source, "model"), (target, "model")):
        if not p.exists():
            raise LoraxInputError(f"{p}: {what} not found")
    out = None if dry_run else output_paths([lora], save_to, target.name)[0]
    extra_plot = loss_plot_path(plot_path) if plot_path is not None else None
    # every output checked against the inputs and each other before any work, written as one unit
    outputs = OutputSet(overwrite)
    for p, what in ((lora, "--lora"), (source, "--source_model"), (target, "--target_model")):
        outputs.input(p, what)
    for p, what in ((out, "--save_to"), (report_path, "--report"), (plot_path, "--plot"), (extra_plot, "--plot")):
        if p is not None:
            outputs.add(p, what)
    src_file = read_lora(lora)
    prompts: PromptSets = resolve(src_file.metadata, lora, opts.prompts_file)
    _precheck_model(source, "source")
    _precheck_model(target, "target")
    cache_dir = None
    if svd_cache_dir is not None:
        from ...cache.svd_cache import prepare_dir

        cache_dir = prepare_dir(svd_cache_dir)

    # 1. the projection, into a temporary file (the engine validates the inputs and pairs the modules)
    with tempfile.TemporaryDirectory(prefix="lorax-distill-") as tmp:
        proj_path = Path(tmp) / "projected.safetensors"
        (rep,) = transfer(lora, source, target, proj_path, threshold=threshold, filter_blocks=filter_blocks,
                          match=match, device=device, precision=precision, save_precision="float",
                          svd_cache_dir=cache_dir, overwrite=True, progress=progress)
        projected = read_lora(proj_path)
    t_proj = time.perf_counter()
    trained = sorted(m.name for m in rep.kept if m.reason == TRANSFERRED)  # identical modules stay as they are

    # 2. the teacher set (source + adapter), then the source is freed
    spec = SetSpec(prompts.adapter, opts.samples, opts.draws, opts.sample_steps, float(opts.guidance), True,
                   opts.seed, precision)
    teacher, cached = _teacher_set(source, lora, spec, dev, cache_dir, log)
    t_teacher = time.perf_counter()

    # 3. the target, its identity set, the adapter on it
    tgt = dmodels.load(target, dev, "target")
    keep = None
    if prompts.identity and opts.keep_weight > 0 and opts.keep_samples > 0:
        kspec = replace(spec, prompts=prompts.identity, samples=opts.keep_samples, uncond=False, seed=opts.seed + 7)
        keep = _identity_set(tgt, target, kspec, cache_dir)
    train_m, held_m = teacher.split()
    train_k, held_k = keep.split() if keep is not None else (None, None)
    copy_pred = _copy_predictions(tgt, src_file.modules, held_m, precision) if match == "name" else None
    copy_keep = (_copy_predictions(tgt, src_file.modules, held_k, precision)
                 if match == "name" and held_k is not None and len(held_k) else None)
    base_pred = predict(tgt, held_m, precision)  # the target without adapter
    layers = tgt.layers(list(projected.modules))
    adapter = Adapter(layers, projected.modules.values(), trainable=trained, mode=opts.params)
    before = predict(tgt, held_m, precision)
    keep_before = predict(tgt, held_k, precision) if held_k is not None and len(held_k) else None

    # 4. the fit
    te_trained = any(n.startswith("lora_te") for n in trained)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=opts.steps, desc="distill", unit="step", dynamic_ncols=True)
    torch.manual_seed(opts.seed)
    result = fit(tgt, adapter, train_m, train_k, opts, precision, te_trained,
                 progress=(lambda i, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.4g}"))) if bar else None)
    if bar is not None:
        bar.close()
    after = predict(tgt, held_m, precision)
    keep_after = predict(tgt, held_k, precision) if keep_before is not None else None
    t_fit = time.perf_counter()

    base_err = mse(base_pred, held_m.y)
    drep = DistillReport(
        prompts=list(prompts.adapter), identity_prompts=list(prompts.identity), prompts_origin=prompts.origin,
        options={k: v for k, v in asdict(opts).items()}, trained_modules=len(trained),
        curve=result.curve, match_curve=result.match_curve,
        match_error_before=relative(mse(before, held_m.y), base_err),
        match_error_after=relative(mse(after, held_m.y), base_err),
        match_error_copy=relative(mse(copy_pred, held_m.y), base_err) if copy_pred is not None else None,
        identity_drift_before=mse(keep_before, held_k.y) if keep_before is not None else None,
        identity_drift_after=mse(keep_after, held_k.y) if keep_after is not None else None,
        identity_drift_copy=mse(copy_keep, held_k.y) if copy_keep is not None else None,
        teacher_cached=cached, seconds={}, unet_passes=opts.unet_passes(len(prompts.identity)),
        compute_share=opts.compute_share(len(prompts.identity)))
    new_modules = adapter.modules(projected.modules)
    adapter.remove()
    del tgt

    # 5. outputs
    meta = dict(projected.metadata)
    meta.update(distill_metadata(drep, opts))
    first = next(iter(src_file.modules.values()))
    dtype = SAVE_PRECISIONS[save_precision] if save_precision else first.up.dtype
    t_end = time.perf_counter()
    drep.seconds = {"projection": round(t_proj - t_start, 2), "teacher": round(t_teacher - t_proj, 2),
                    "fit": round(t_fit - t_teacher, 2),
                    "fit_steps": round(result.seconds, 3), "total": round(t_end - t_start, 2)}
    if out is not None:
        rep.output = str(out)
    doc = rep.to_json()
    doc["summary"]["method"] = "distill"
    doc["distill"] = drep.to_json()
    with outputs.writing():
        if out is not None:
            outputs.stage(out, lambda tmp: write_lora(tmp, new_modules, meta, dtype=dtype, overwrite=True))
        if report_path is not None:
            outputs.stage(report_path, lambda tmp: tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n"))
        if plot_path is not None:
            outputs.stage(plot_path, lambda tmp: plot_heatmap(rep, tmp))
            outputs.stage(extra_plot, lambda tmp: plot_loss(drep, tmp))
    return rep, drep


def distill_metadata(d: DistillReport, opts: DistillOptions) -> dict[str, str]:
    """The `lorax.*` keys a distilled file carries."""
    def f(x):
        return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.6g}"
    return {
        "lorax.method": "distill",
        "lorax.distill_steps": str(opts.steps),
        "lorax.distill_seed": str(opts.seed),
        "lorax.distill_prompts": json.dumps(d.prompts),
        "lorax.distill_prompts_origin": d.prompts_origin,
        "lorax.distill_match_error": f(d.match_error_after),
        "lorax.distill_match_error_projection": f(d.match_error_before),
        "lorax.distill_match_error_copy": f(d.match_error_copy),
        "lorax.distill_options": json.dumps({k: v for k, v in asdict(opts).items() if k != "prompts_file"},
                                            sort_keys=True),
    }


def plot_loss(d: DistillReport, path: str | os.PathLike) -> Path:
    """The refinement's loss curve (objective and its matching term, smoothed) with the held-out figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for curve, label in ((d.curve, "objective"), (d.match_curve, "matching term")):
        if curve:
            k = max(1, len(curve) // 30)
            smooth = [sum(curve[max(0, i - k + 1):i + 1]) / len(curve[max(0, i - k + 1):i + 1])
                      for i in range(len(curve))]
            ax.plot(range(1, len(curve) + 1), smooth, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean squared difference")
    copy = "" if d.match_error_copy is None else f", copy {d.match_error_copy:.3f}"
    ax.set_title(f"held-out match error (vs no adapter = 1): projection {d.match_error_before:.3f} -> "
                 f"distill {d.match_error_after:.3f}{copy}", fontsize=8)
    ax.legend(fontsize=8)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")  # the caller stages `path` (OutputSet)
    plt.close(fig)
    return path
