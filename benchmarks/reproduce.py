"""Reproduce the paper's transfer claims on tiny model pairs: several targets, seeds, baselines, sweeps.

    nice -n 5 python benchmarks/reproduce.py --out out/reproduce          # full: <= 25 min on 2 cores
    python benchmarks/reproduce.py --out out/reproduce_quick --quick      # CI-sized: < ~2 min

Pairs (source = the committed embedded SOURCE in every case):
- embedded:  the committed TARGET (a genuine fine-tune);
- ft-weak / ft-medium / ft-strong: the source UNet fine-tuned further on the shifted ("painting")
  distribution with a growing learning rate (cached under .cache/reproduce/ keyed by the settings);
- distilled: a UNet with layers_per_block 2 -> 1 (blocks removed and renumbered), initialised from
  the source where shapes agree and distilled to match the source's noise predictions; transferred
  with `--match similarity`.
Per pair and seed, every variant is evaluated on the held-out style images with fixed noise and
timesteps (sd_scripts_lorax.tools.evaluate): no adapter; LoRA-X copied as is; LoRA-X transferred; LoRA-X
trained on the target (reference); a plain LoRA (lycoris algo=lora, preset unet-transformer-only, same
rank) copied and transferred
(Table 2); the source d copied into the target's bases without projection (Table 5); LoRA-X
transferred with `--method distill` (data-free function matching); and LoRA-X copied at its best
single multiplier, an ORACLE that picks the multiplier by the held-out metric itself. A second held-out
set of the target's own domain (its fine-tune distribution, captions without the style trigger)
gives each variant's side effect: its loss there minus the target's without adapter. Wall times of
each method are recorded. Then a threshold sweep and a rank sweep (--no_sweeps skips them). Writes
results.md, results.json and PNG plots into --out (results.json also after every pair and seed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere; networks.lora_x is imported from the root

from sd_scripts_lorax.tools import evaluate
from sd_scripts_lorax.tools.demo import float32_copy, load_folder_images, write_text

CACHE = REPO / ".cache" / "reproduce"
V_NONE, V_COPY, V_TRANSFER, V_REF = "no adapter", "LoRA-X copied", "LoRA-X transferred", "LoRA-X trained on target"
V_PLAIN_COPY, V_PLAIN_TRANSFER, V_D_COPY = "plain LoRA copied", "plain LoRA transferred", "d copied into target bases"
V_DISTILL, V_ORACLE = "LoRA-X distilled (--method distill)", "LoRA-X copied at best multiplier (ORACLE)"
VARIANTS = (V_NONE, V_COPY, V_TRANSFER, V_REF, V_PLAIN_COPY, V_PLAIN_TRANSFER, V_D_COPY, V_DISTILL, V_ORACLE)
ORACLE_MULTIPLIERS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
# the target's own domain: what each target was fine-tuned (or distilled) on
OWN_DOMAIN = {"distilled": "base"}  # every other pair: "shifted"
SIDE_EFFECT_TOLERANCE = 0.1  # distill's side effect may exceed the reference's by 10 % of it


@dataclass
class Plan:
    """Sizes of a run."""

    pairs: tuple[str, ...] = ("embedded", "ft-weak", "ft-medium", "ft-strong", "distilled")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 100
    rank: int = 8
    lr: float = 1e-2
    plain_lr: float = 2e-3
    thresholds: tuple[float, ...] = (0.0, 0.5, 0.8, 0.9, 0.95)
    ranks: tuple[int, ...] = (4, 8, 16, 32)
    eval_per_concept: int = 4
    eval_repeats: int = 4
    finetune_steps: int = 150
    distill_steps: int = 300
    transfer_distill_steps: int | None = None  # --method distill steps (None: its default)
    own_images: int = 48
    sweeps: bool = True

    @classmethod
    def quick(cls) -> "Plan":
        return cls(pairs=("embedded",), seeds=(0,), steps=8, thresholds=(0.0, 0.8), ranks=(4, 8),
                   eval_per_concept=1, eval_repeats=1, transfer_distill_steps=4, own_images=8)


FINETUNE_LR = {"ft-weak": 2e-4, "ft-medium": 1e-3, "ft-strong": 4e-3}


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- target models

def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _latent_data(model: Path, distribution: str, n: int, seed: int):
    from transformers import CLIPTokenizer

    from sd_scripts_lorax.testing.embedded import pretrain

    v = evaluate.load_variant(model)
    x, caps = pretrain.make_images(distribution, n, seed)
    mean, std = pretrain.encode_latents(v.vae, x)
    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    return v, pretrain.LatentData(mean, std, pretrain.tokenize(tok, caps), v.vae.config.scaling_factor)


def _save_unet(source: Path, unet: torch.nn.Module, dest: Path) -> Path:
    """A copy of the source folder with `unet` in place of its UNet (written beside dest, renamed)."""
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source, tmp)
    shutil.rmtree(tmp / "unet")
    unet.save_pretrained(tmp / "unet")
    tmp.rename(dest)
    return dest


def finetuned_target(source: Path, name: str, steps: int) -> Path:
    """The source UNet fine-tuned `steps` steps on the shifted distribution at FINETUNE_LR[name]."""
    from diffusers import DDPMScheduler

    from sd_scripts_lorax.testing.embedded import pretrain
    from sd_scripts_lorax.testing.embedded.build import NOISE_SCHEDULE

    settings = {"kind": "finetune", "lr": FINETUNE_LR[name], "steps": steps, "images": 512, "batch": 16, "v": 1}
    dest = CACHE / "targets" / f"{name}-{_key(settings)}"
    if (dest / "model_index.json").is_file():
        return dest
    log(f"  building {name} target ({steps} steps, lr {settings['lr']:g}) -> {dest}")
    v, data = _latent_data(source, "shifted", settings["images"], seed=101)
    v.unet.requires_grad_(True)  # load_variant freezes it
    pretrain.train_denoiser(v.unet, v.text_encoder, data, DDPMScheduler(**NOISE_SCHEDULE), steps, 16,
                            settings["lr"], 0.01, train_te=False, seed=102)
    return _save_unet(source, v.unet, dest)


def distilled_target(source: Path, steps: int) -> Path:
    """layers_per_block 2 -> 1: shape-matching tensors copied from the source (up-block layers
    renumbered by position), then trained to match the source's noise predictions."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from sd_scripts_lorax.testing.embedded.build import NOISE_SCHEDULE

    settings = {"kind": "distill", "layers_per_block": 1, "steps": steps, "images": 512, "batch": 16, "v": 1}
    dest = CACHE / "targets" / f"distilled-{_key(settings)}"
    if (dest / "model_index.json").is_file():
        return dest
    log(f"  building distilled target ({steps} steps) -> {dest}")
    teacher, data = _latent_data(source, "base", settings["images"], seed=201)
    cfg = dict(teacher.unet.config)
    cfg["layers_per_block"] = 1
    torch.manual_seed(0)
    student = UNet2DConditionModel.from_config(cfg)
    src_sd = teacher.unet.state_dict()
    own = student.state_dict()
    # the student's layer k of a block takes the source's layer k (same name), where shapes agree
    init = {k: v for k, v in src_sd.items() if k in own and own[k].shape == v.shape}
    student.load_state_dict(init, strict=False)
    log(f"    {len(init)}/{len(own)} student tensors initialised from the source")
    sched = DDPMScheduler(**NOISE_SCHEDULE)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(202)
    student.train()
    with torch.no_grad():
        cond_all = teacher.text_encoder(data.ids)[0]
    for step in range(steps):
        idx = torch.randint(0, len(data), (16,), generator=gen)
        lat = data.sample(idx, gen)
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, 1000, (16,), generator=gen)
        noisy = sched.add_noise(lat, noise, t)
        with torch.no_grad():
            want = teacher.unet(noisy, t, cond_all[idx]).sample
        loss = torch.nn.functional.mse_loss(student(noisy, t, cond_all[idx]).sample, want)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"    distill step {step}: loss vs teacher {loss.item():.4f}")
    student.eval()
    return _save_unet(source, student, dest)


# ---------------------------------------------------------------- adapters

def train_adapter(model: Path, data: Path, out_dir: Path, name: str, plan: Plan, seed: int, rank: int,
                  plain: bool = False) -> Path:
    """Our trainer in-process (configs/demo_source.toml settings), LoRA-X or lycoris algo=lora."""
    from sd_scripts_lorax.train.config import parse_args
    from sd_scripts_lorax.train.run import run_training

    path = out_dir / f"{name}.safetensors"
    if path.is_file():
        return path
    argv = ["--config_file", str(REPO / "configs" / "demo_source.toml"), "--pretrained_model_name_or_path",
            str(model), "--train_data_dir", str(data), "--output_dir", str(out_dir), "--output_name", name,
            "--max_train_steps", str(plan.steps), "--seed", str(seed), "--network_dim", str(rank),
            "--progress", "off"]
    if plain:
        argv += ["--network_module", "lycoris.kohya", "--network_alpha", str(rank), "--learning_rate",
                 str(plan.plain_lr), "--network_args", "algo=lora", "preset=unet-transformer-only"]
    else:
        argv += ["--learning_rate", str(plan.lr)]
    t0 = time.perf_counter()
    run_training(parse_args(argv))
    if plain:
        keep_transformer_modules(path)
    log(f"    trained {name} ({time.perf_counter() - t0:.0f} s)")
    return path


def keep_transformer_modules(path: Path) -> None:
    """Drop a plain LoRA's modules outside the transformer blocks (lycoris also adapts e.g. the time
    embedding, which the LoRA-X rows leave alone): both plain rows then cover LoRA-X's modules."""
    from sd_scripts_lorax.formats.lora_file import read_lora, write_lora

    lf = read_lora(path)
    kept = [m for n, m in lf.modules.items() if "_attentions_" in n]
    write_lora(path, kept, dict(lf.metadata), overwrite=True)


def transfer_adapter(lora: Path, source: Path, target: Path, dest: Path, threshold: float, match: str
                     ) -> tuple[Path, int, int]:
    """Our transfer in-process; returns (file, modules kept, modules in the input)."""
    from sd_scripts_lorax.transfer.engine import transfer

    (rep,) = transfer(lora, source, target, dest, threshold=threshold, match=match, overwrite=True, progress=False,
                      svd_cache_dir=CACHE / "svd")
    return dest, len(rep.kept), len(rep.modules)


def distilled_adapter(lora: Path, source: Path, target: Path, dest: Path, match: str, plan: Plan, seed: int
                      ) -> tuple[Path, dict]:
    """`--method distill` in-process (its defaults, the run's seed); returns (file, its distill figures)."""
    from sd_scripts_lorax.transfer.distill.options import DistillOptions
    from sd_scripts_lorax.transfer.distill.run import distill_transfer

    opts = DistillOptions(seed=seed)
    if plan.transfer_distill_steps is not None:
        opts = DistillOptions(seed=seed, steps=plan.transfer_distill_steps, samples=8, keep_samples=4,
                              sample_steps=4)
    _, d = distill_transfer(lora, source, target, dest, opts, match=match, overwrite=True, progress=False,
                            svd_cache_dir=CACHE / "svd", log=lambda s: None)
    return dest, {"match_error_before": d.match_error_before, "match_error_after": d.match_error_after,
                  "match_error_copy": d.match_error_copy, "seconds": d.seconds, "compute_share": d.compute_share}


def d_copied_adapter(lora: Path, source: Path, target: Path, dest: Path) -> Path:
    """Table 5: the source's singular-value shifts d put into the target's own bases, no projection:
    up = U_t diag(d_s), down = V_t^T (modules paired by name)."""
    from sd_scripts_lorax.formats.checkpoint import Checkpoint
    from sd_scripts_lorax.formats.lora_file import LoraModule, read_lora, write_lora
    from sd_scripts_lorax.lorax import top_bases
    from sd_scripts_lorax.lorax.factors import d_from_factors

    lf = read_lora(lora)
    out = []
    with Checkpoint.open(source) as src, Checkpoint.open(target) as tgt:
        sm, tm = src.modules(), tgt.modules()
        for name, lm in lf.modules.items():
            ws, wt = src.weight(sm[name]), tgt.weight(tm[name])
            bs, bt = top_bases(ws, lm.rank), top_bases(wt, lm.rank)
            d = d_from_factors(bs.u, bs.v, lm.up.float().reshape(lm.up.shape[0], -1),
                               lm.down.float().reshape(lm.rank, -1)) * lm.scale
            up = (bt.u * d).reshape(lm.up.shape)
            down = bt.v.t().reshape(lm.down.shape)
            out.append(LoraModule(name, down.contiguous(), up.contiguous(), float(lm.rank)))
    write_lora(dest, out, dict(lf.metadata), overwrite=True)
    return dest


# ---------------------------------------------------------------- evaluation

@dataclass
class Evaluator:
    """Fixed evaluation inputs; predictions of each (model, adapter) cached."""

    eval_dir: Path
    repeats: int
    own_images: int = 48
    data: evaluate.EvalSet | None = None
    preds: dict = field(default_factory=dict)
    own: dict = field(default_factory=dict)        # domain -> EvalSet of the target's own domain
    own_preds: dict = field(default_factory=dict)

    def pred(self, model: Path, lora: Path | None, multiplier: float = 1.0) -> torch.Tensor:
        key = (str(model), str(lora), multiplier)
        if key not in self.preds:
            v = evaluate.load_variant(model, lora, multiplier)
            if self.data is None:
                images, captions = load_folder_images(self.eval_dir)
                self.data = evaluate.make_eval_set(v.vae, images, captions, seed=0, repeats=self.repeats)
            self.preds[key] = evaluate.noise_predictions(v, self.data)
        return self.preds[key]

    def own_loss(self, model: Path, lora: Path | None, domain: str, multiplier: float = 1.0) -> float:
        """The denoising loss on held-out images of `domain` with captions without the style trigger."""
        from sd_scripts_lorax.testing.embedded import pretrain

        key = (str(model), str(lora), domain, multiplier)
        if key not in self.own_preds:
            v = evaluate.load_variant(model, lora, multiplier)
            if domain not in self.own:
                x, caps = pretrain.make_images(domain, self.own_images, seed=977)
                self.own[domain] = evaluate.make_eval_set(v.vae, x, caps, seed=1, repeats=self.repeats)
            self.own_preds[key] = evaluate.denoising_loss(evaluate.noise_predictions(v, self.own[domain]),
                                                          self.own[domain])
        return self.own_preds[key]

    def rows(self, model: Path, loras: dict[str, Path | None], domain: str | None = None,
             multipliers: dict[str, float] | None = None) -> dict[str, evaluate.Row]:
        mult = multipliers or {}
        preds = {k: self.pred(model, v, mult.get(k, 1.0)) for k, v in loras.items()}
        rows = {r.name: r for r in evaluate.compare(preds, self.data, V_NONE, V_REF)}
        if domain is not None:
            base = self.own_loss(model, None, domain)
            for k, v in loras.items():
                rows[k].side_effect = self.own_loss(model, v, domain, mult.get(k, 1.0)) - base
        return rows

    def best_multiplier(self, model: Path, lora: Path) -> float:
        """The ORACLE: the multiplier with the lowest held-out style loss (it peeks at the test set)."""
        return min(ORACLE_MULTIPLIERS, key=lambda m: evaluate.denoising_loss(self.pred(model, lora, m), self.data))


# ---------------------------------------------------------------- the study

def run(out: Path, plan: Plan) -> dict:
    from sd_scripts_lorax.testing.embedded import embedded_model_path, write_style_dataset

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    data = write_style_dataset(work / "data", seed=0)
    eval_dir = (write_style_dataset(work / "eval", seed=0, split="eval", per_concept=plan.eval_per_concept)
                / "1_bluefire")
    models = CACHE / "models"
    models.mkdir(parents=True, exist_ok=True)
    source = float32_copy(embedded_model_path("source"), models / "source")
    log(f"[{time.perf_counter() - t0:.0f} s] targets")
    targets: dict[str, tuple[Path, str]] = {}
    for pair in plan.pairs:
        if pair == "embedded":
            targets[pair] = (float32_copy(embedded_model_path("target"), models / "target"), "name")
        elif pair in FINETUNE_LR:
            targets[pair] = (finetuned_target(source, pair, plan.finetune_steps), "name")
        elif pair == "distilled":
            targets[pair] = (distilled_target(source, plan.distill_steps), "similarity")
        else:
            raise SystemExit(f"unknown pair {pair!r}")
    ev = Evaluator(eval_dir, plan.eval_repeats, plan.own_images)
    main: dict[str, dict[str, list[dict]]] = {p: {v: [] for v in VARIANTS} for p in plan.pairs}
    times: dict[str, dict[str, list[float]]] = {p: {} for p in plan.pairs}
    distill_info: dict[str, list[dict]] = {p: [] for p in plan.pairs}
    sweep: dict[str, dict[float, list[dict]]] = {p: {th: [] for th in plan.thresholds} for p in plan.pairs}
    for seed in plan.seeds:
        sd = work / f"seed{seed}"
        log(f"[{time.perf_counter() - t0:.0f} s] seed {seed}: source adapters")
        src_x = train_adapter(source, data, sd, "source_lorax", plan, seed, plan.rank)
        src_plain = train_adapter(source, data, sd, "source_plain", plan, seed, plan.rank, plain=True)
        for pair, (target, match) in targets.items():
            pd = sd / pair
            log(f"[{time.perf_counter() - t0:.0f} s] seed {seed}, pair {pair}")
            tick = time.perf_counter()
            ref = train_adapter(target, data, pd, "target_lorax", plan, seed, plan.rank)
            times[pair].setdefault("train on target (reference)", []).append(time.perf_counter() - tick)
            tick = time.perf_counter()
            transferred = transfer_adapter(src_x, source, target, pd / "transferred.safetensors", 0.8, match)[0]
            times[pair].setdefault("transfer --method project", []).append(time.perf_counter() - tick)
            tick = time.perf_counter()
            distilled, info = distilled_adapter(src_x, source, target, pd / "distilled.safetensors", match, plan, seed)
            times[pair].setdefault("transfer --method distill", []).append(time.perf_counter() - tick)
            distill_info[pair].append(info)
            loras: dict[str, Path | None] = {
                V_NONE: None, V_REF: ref, V_TRANSFER: transferred, V_DISTILL: distilled,
                V_PLAIN_TRANSFER: transfer_adapter(src_plain, source, target, pd / "plain_transferred.safetensors",
                                                   0.8, match)[0]}
            mult: dict[str, float] = {}
            if match == "name":  # copying as is / d needs the same module names and shapes
                loras[V_COPY] = src_x
                loras[V_PLAIN_COPY] = src_plain
                loras[V_D_COPY] = d_copied_adapter(src_x, source, target, pd / "d_copied.safetensors")
                loras[V_ORACLE] = src_x
                mult[V_ORACLE] = ev.best_multiplier(target, src_x)
            rows = ev.rows(target, loras, OWN_DOMAIN.get(pair, "shifted"), mult)
            # distill's ceiling: what it matches, the source with its adapter, scored on the target's scale
            info["teacher_share"] = evaluate.improvement_share(
                evaluate.denoising_loss(ev.pred(source, src_x), ev.data), rows[V_NONE].loss, rows[V_REF].loss)
            for name, row in rows.items():
                main[pair][name].append({**asdict(row), "side_effect": row.side_effect,
                                         **({"multiplier": mult[name]} if name in mult else {})})
            partial = {"plan": asdict(plan), "main": main, "times": times, "distill": distill_info}
            write_text(out / "results.json", json.dumps(partial, indent=2) + "\n")
            if not plan.sweeps:
                continue
            for th in plan.thresholds:
                f, kept, total = transfer_adapter(src_x, source, target, pd / f"th{th}.safetensors", th, match)
                r = ev.rows(target, {V_NONE: None, V_REF: ref, "x": f})["x"]
                sweep[pair][th].append({**asdict(r), "kept": kept, "total": total})
    ranks: dict[int, dict[str, list[dict]]] = {}
    pair0, (target0, match0) = plan.pairs[0], targets[plan.pairs[0]]
    seed0 = plan.seeds[0]
    for r in plan.ranks if plan.sweeps else ():
        log(f"[{time.perf_counter() - t0:.0f} s] rank sweep r={r} on {pair0}, seed {seed0}")
        # the main rank reuses the main run's adapters
        rd = work / f"seed{seed0}" if r == plan.rank else work / f"seed{seed0}" / f"rank{r}"
        src_r = train_adapter(source, data, rd, "source_lorax", plan, seed0, r)
        ref_r = train_adapter(target0, data, rd / pair0, "target_lorax", plan, seed0, r)
        tr = transfer_adapter(src_r, source, target0, rd / pair0 / "transferred.safetensors", 0.8, match0)[0]
        loras = {V_NONE: None, V_REF: ref_r, V_TRANSFER: tr}
        if match0 == "name":
            loras[V_COPY] = src_r
        ranks[r] = {k: asdict(v) for k, v in ev.rows(target0, loras).items()}
    result = {"plan": asdict(plan), "main": main, "times": times, "distill": distill_info,
              "sweep": {p: {str(k): v for k, v in s.items()} for p, s in sweep.items()},
              "ranks": {str(k): v for k, v in ranks.items()}, "seconds": round(time.perf_counter() - t0, 1),
              "targets": {p: str(t) for p, (t, _) in targets.items()}}
    write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    write_text(out / "results.md", markdown(result))
    plots(result, out)
    log(f"[{result['seconds']:.0f} s] done: {out / 'results.md'}")
    return result


# ---------------------------------------------------------------- outputs

def _ms(values: list[float], fmt: Callable[[float], str]) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return fmt(vals[0])
    return f"{fmt(statistics.mean(vals))} ± {fmt(statistics.stdev(vals))}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _f3(x: float) -> str:
    return f"{x:.3f}"


def _f5(x: float) -> str:
    return f"{x:.5f}"


def markdown(res: dict) -> str:
    seeds = len(res["plan"]["seeds"])
    lines = [f"# LoRA-X transfer study (tiny models; {seeds} seed(s), mean ± sample std over seeds)", "",
             "## Main table", "",
             "Side effect: loss on held-out images of the target's own domain (captions without the style "
             "trigger) minus the target's without adapter; lower is better. The ORACLE row picks its multiplier "
             "by the held-out style loss itself (not a method a user can run).", "",
             "| pair | variant | held-out style loss | improvement recovered | cosine vs reference change | "
             "relative MSE of change | side effect on target's own domain |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for pair, variants in res["main"].items():
        for name, rows in variants.items():
            if not rows:
                continue
            label = name
            if rows[0].get("multiplier") is not None:
                label += " x" + "/".join(f"{r['multiplier']:g}" for r in rows)
            side = [r["side_effect"] for r in rows if r.get("side_effect") is not None]
            lines.append(f"| {pair} | {label} | {_ms([r['loss'] for r in rows], _f5)} | "
                         f"{_ms([r['share'] for r in rows], _pct)} | {_ms([r['cosine'] for r in rows], _f3)} | "
                         f"{_ms([r['rel_mse'] for r in rows], _f3)} | {_ms(side, _f5) if side else 'n/a'} |")
    lines += ["", "## Goal check (transferred LoRA-X, means over seeds)", "",
              "| pair | improvement recovered | >= 90 % | beats LoRA-X copied (lower loss) |", "|---|---:|---|---|"]
    for pair, variants in res["main"].items():
        tr = [r["share"] for r in variants[V_TRANSFER]]
        cp = [r["loss"] for r in variants[V_COPY]]
        tl = [r["loss"] for r in variants[V_TRANSFER]]
        share = statistics.mean(tr)
        beats = ("n/a (no copy: renamed blocks)" if not cp else
                 ("yes" if statistics.mean(tl) < statistics.mean(cp) else "no"))
        lines.append(f"| {pair} | {_pct(share)} | {'yes' if share >= 0.9 else 'no'} | {beats} |")
    lines += ["", "## Goal check (--method distill; mean ± std over seeds)", "",
              f"Bars: >= 90 % recovered; beats copy and the oracle multiplier by more than the spread (the larger "
              f"std); side effect <= the reference's + {SIDE_EFFECT_TOLERANCE:.0%} of it.", "",
              "The teacher column is distill's ceiling: the source with its adapter (what distill matches), "
              "scored on the target's held-out style images against the same no-adapter and reference losses.", "",
              "| pair | recovered | teacher (ceiling) | >= 90 % | margin over copy | margin over oracle "
              "| side effect (distill / reference) | side effect ok |", "|---|---:|---:|---|---:|---:|---:|---|"]
    for pair, variants in res["main"].items():
        ds = [r["share"] for r in variants.get(V_DISTILL, [])]
        if not ds:
            continue

        def margin(other: str) -> str:
            os_ = [r["share"] for r in variants.get(other, [])]
            if not os_:
                return "n/a (no copy: renamed blocks)"
            diff = statistics.mean(ds) - statistics.mean(os_)
            spread = max(statistics.stdev(ds) if len(ds) > 1 else 0.0, statistics.stdev(os_) if len(os_) > 1 else 0.0)
            return f"{100 * diff:+.1f} pts ({'yes' if diff > spread else 'no'}, spread {100 * spread:.1f})"

        sd = statistics.mean(r["side_effect"] for r in variants[V_DISTILL])
        sr = statistics.mean(r["side_effect"] for r in variants[V_REF])
        ok = sd <= sr + SIDE_EFFECT_TOLERANCE * abs(sr)
        ts = [i["teacher_share"] for i in res.get("distill", {}).get(pair, []) if i.get("teacher_share") is not None]
        lines.append(f"| {pair} | {_ms(ds, _pct)} | {_ms(ts, _pct) if ts else 'n/a'} | "
                     f"{'yes' if statistics.mean(ds) >= 0.9 else 'no'} | "
                     f"{margin(V_COPY)} | {margin(V_ORACLE)} | {sd:.5f} / {sr:.5f} | {'yes' if ok else 'no'} |")
    lines += ["", "## Data-free match error of --method distill (held-out synthetic set; no adapter = 1)", "",
              "| pair | copy | projection (Eq. 3) | distill | compute (UNet passes / training on the target, "
              "5000 x 8) |", "|---|---:|---:|---:|---:|"]
    for pair, infos in res.get("distill", {}).items():
        if infos:
            cp = [i["match_error_copy"] for i in infos if i.get("match_error_copy") is not None]
            lines.append(f"| {pair} | {_ms(cp, _f3) if cp else 'n/a'} | "
                         f"{_ms([i['match_error_before'] for i in infos], _f3)} | "
                         f"{_ms([i['match_error_after'] for i in infos], _f3)} | "
                         f"{_ms([i.get('compute_share', math.nan) for i in infos], _pct)} |")
    lines += ["", "## Wall time per method (seconds, this machine, as run)", "",
              f"The last column scales this run's {res['plan']['steps']}-step training (batch 8, load and latent "
              f"caching included) to the paper's 5000 steps: an upper bound of that training's time, so the ratio "
              f"is a lower bound.", "",
              "| pair | method | seconds | ratio to training on the target (this run) | ratio to 5000-step training |",
              "|---|---|---:|---:|---:|"]
    for pair, methods in res.get("times", {}).items():
        ref_t = methods.get("train on target (reference)")
        for m, ts in methods.items():
            ratio = statistics.mean(ts) / statistics.mean(ref_t) if ref_t else math.nan
            paper = ratio * res["plan"]["steps"] / 5000
            lines.append(f"| {pair} | {m} | {_ms(ts, lambda x: f'{x:.1f}')} | {ratio:.2f} | {100 * paper:.1f} % |")
    lines += ["", "## Threshold sweep (LoRA-X transferred)", "",
              "| pair | threshold | modules kept | improvement recovered | cosine vs reference change |",
              "|---|---:|---:|---:|---:|"]
    for pair, ths in res["sweep"].items():
        for th, rows in ths.items():
            if not rows:  # --no_sweeps
                continue
            lines.append(f"| {pair} | {float(th):g} | {rows[0]['kept']}/{rows[0]['total']} | "
                         f"{_ms([r['share'] for r in rows], _pct)} | {_ms([r['cosine'] for r in rows], _f3)} |")
    lines += ["", f"## Rank sweep ({res['plan']['pairs'][0]}, seed {res['plan']['seeds'][0]})", "",
              "| rank | variant | held-out style loss | improvement recovered | cosine vs reference change |",
              "|---:|---|---:|---:|---:|"]
    for r, rows in res["ranks"].items():
        for name, row in rows.items():
            lines.append(f"| {r} | {name} | {row['loss']:.5f} | {_pct(row['share'])} | {row['cosine']:.3f} |")
    lines += ["", f"Run time: {res['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def plots(res: dict, out: Path) -> None:
    """shares.png (variants per pair), threshold_sweep.png, rank_sweep.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sd_scripts_lorax.formats.atomic import atomic_write

    def save(fig, name: str) -> None:
        with atomic_write(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)

    pairs = list(res["main"])
    shown = [v for v in VARIANTS if v not in (V_NONE,)]
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(pairs)), 4))
    width = 0.8 / len(shown)
    for i, v in enumerate(shown):
        means, errs = [], []
        for p in pairs:
            vals = [r["share"] for r in res["main"][p][v]]
            means.append(statistics.mean(vals) if vals else float("nan"))
            errs.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
        ax.bar([k + (i - len(shown) / 2 + 0.5) * width for k in range(len(pairs))], means, width, yerr=errs, label=v)
    ax.axhline(0.9, color="k", ls="--", lw=0.8)
    ax.set_xticks(range(len(pairs)), pairs)
    ax.set_ylabel("share of improvement recovered")
    ax.legend(fontsize=7, ncol=2)
    save(fig, "shares.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for p, ths in res["sweep"].items():
        done = {t: rows for t, rows in ths.items() if rows}  # empty with --no_sweeps
        if done:
            ax.plot([float(t) for t in done], [statistics.mean(r["share"] for r in rows) for rows in done.values()],
                    marker="o", label=p)
    ax.set_xlabel("similarity threshold")
    ax.set_ylabel("share of improvement recovered")
    ax.legend(fontsize=7)
    save(fig, "threshold_sweep.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    rs = [int(r) for r in res["ranks"]]
    for v in (V_TRANSFER, V_COPY):
        ys = [res["ranks"][str(r)].get(v, {}).get("share", float("nan")) for r in rs]
        ax.plot(rs, ys, marker="o", label=v)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank")
    ax.set_ylabel("share of improvement recovered")
    ax.legend(fontsize=7)
    save(fig, "rank_sweep.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/reproduce")
    p.add_argument("--quick", action="store_true", help="CI-sized: one pair, one seed, a handful of steps")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--pairs", nargs="+", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--no_sweeps", action="store_true", help="skip the threshold and rank sweeps")
    args = p.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    if args.seeds:
        plan.seeds = tuple(args.seeds)
    if args.pairs:
        plan.pairs = tuple(args.pairs)
    if args.steps:
        plan.steps = args.steps
    if args.no_sweeps:
        plan.sweeps = False
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    torch.set_num_threads(1)  # tiny models: one thread is much faster on a shared machine
    run(Path(args.out).resolve(), plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
