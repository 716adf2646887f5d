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
trained on the target (reference); a plain LoRA (lycoris algo=lora, preset unet-transformer-only, same rank) copied and transferred
(Table 2); the source d copied into the target's bases without projection (Table 5). Then a threshold
sweep and a rank sweep. Writes results.md, results.json and PNG plots into --out.
"""

from __future__ import annotations

import argparse
import copy
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
VARIANTS = (V_NONE, V_COPY, V_TRANSFER, V_REF, V_PLAIN_COPY, V_PLAIN_TRANSFER, V_D_COPY)


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

    @classmethod
    def quick(cls) -> "Plan":
        return cls(pairs=("embedded",), seeds=(0,), steps=8, thresholds=(0.0, 0.8), ranks=(4, 8),
                   eval_per_concept=1, eval_repeats=1)


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
    data: evaluate.EvalSet | None = None
    preds: dict = field(default_factory=dict)

    def pred(self, model: Path, lora: Path | None) -> torch.Tensor:
        key = (str(model), str(lora))
        if key not in self.preds:
            v = evaluate.load_variant(model, lora)
            if self.data is None:
                images, captions = load_folder_images(self.eval_dir)
                self.data = evaluate.make_eval_set(v.vae, images, captions, seed=0, repeats=self.repeats)
            self.preds[key] = evaluate.noise_predictions(v, self.data)
        return self.preds[key]

    def rows(self, model: Path, loras: dict[str, Path | None]) -> dict[str, evaluate.Row]:
        preds = {k: self.pred(model, v) for k, v in loras.items()}
        return {r.name: r for r in evaluate.compare(preds, self.data, V_NONE, V_REF)}


# ---------------------------------------------------------------- the study

def run(out: Path, plan: Plan) -> dict:
    from sd_scripts_lorax.testing.embedded import embedded_model_path, write_style_dataset

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    data = write_style_dataset(work / "data", seed=0)
    eval_dir = write_style_dataset(work / "eval", seed=0, split="eval", per_concept=plan.eval_per_concept) / "1_bluefire"
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
    ev = Evaluator(eval_dir, plan.eval_repeats)
    main: dict[str, dict[str, list[dict]]] = {p: {v: [] for v in VARIANTS} for p in plan.pairs}
    sweep: dict[str, dict[float, list[dict]]] = {p: {th: [] for th in plan.thresholds} for p in plan.pairs}
    for seed in plan.seeds:
        sd = work / f"seed{seed}"
        log(f"[{time.perf_counter() - t0:.0f} s] seed {seed}: source adapters")
        src_x = train_adapter(source, data, sd, "source_lorax", plan, seed, plan.rank)
        src_plain = train_adapter(source, data, sd, "source_plain", plan, seed, plan.rank, plain=True)
        for pair, (target, match) in targets.items():
            pd = sd / pair
            log(f"[{time.perf_counter() - t0:.0f} s] seed {seed}, pair {pair}")
            ref = train_adapter(target, data, pd, "target_lorax", plan, seed, plan.rank)
            loras: dict[str, Path | None] = {
                V_NONE: None, V_REF: ref,
                V_TRANSFER: transfer_adapter(src_x, source, target, pd / "transferred.safetensors", 0.8, match)[0],
                V_PLAIN_TRANSFER: transfer_adapter(src_plain, source, target, pd / "plain_transferred.safetensors",
                                                   0.8, match)[0]}
            if match == "name":  # copying as is / d needs the same module names and shapes
                loras[V_COPY] = src_x
                loras[V_PLAIN_COPY] = src_plain
                loras[V_D_COPY] = d_copied_adapter(src_x, source, target, pd / "d_copied.safetensors")
            rows = ev.rows(target, loras)
            for name, row in rows.items():
                main[pair][name].append(asdict(row))
            for th in plan.thresholds:
                f, kept, total = transfer_adapter(src_x, source, target, pd / f"th{th}.safetensors", th, match)
                r = ev.rows(target, {V_NONE: None, V_REF: ref, "x": f})["x"]
                sweep[pair][th].append({**asdict(r), "kept": kept, "total": total})
    ranks: dict[int, dict[str, list[dict]]] = {}
    pair0, (target0, match0) = plan.pairs[0], targets[plan.pairs[0]]
    seed0 = plan.seeds[0]
    for r in plan.ranks:
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
    result = {"plan": asdict(plan), "main": main, "sweep": {p: {str(k): v for k, v in s.items()} for p, s in sweep.items()},
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
             "| pair | variant | held-out style loss | improvement recovered | cosine vs reference change | relative MSE of change |",
             "|---|---|---:|---:|---:|---:|"]
    for pair, variants in res["main"].items():
        for name, rows in variants.items():
            if not rows:
                continue
            lines.append(f"| {pair} | {name} | {_ms([r['loss'] for r in rows], _f5)} | "
                         f"{_ms([r['share'] for r in rows], _pct)} | {_ms([r['cosine'] for r in rows], _f3)} | "
                         f"{_ms([r['rel_mse'] for r in rows], _f3)} |")
    lines += ["", "## Goal check (transferred LoRA-X, means over seeds)", "",
              "| pair | improvement recovered | >= 90 % | beats LoRA-X copied (lower loss) |", "|---|---:|---|---|"]
    for pair, variants in res["main"].items():
        tr = [r["share"] for r in variants[V_TRANSFER]]
        cp = [r["loss"] for r in variants[V_COPY]]
        tl = [r["loss"] for r in variants[V_TRANSFER]]
        share = statistics.mean(tr)
        beats = "n/a (no copy: renamed blocks)" if not cp else ("yes" if statistics.mean(tl) < statistics.mean(cp) else "no")
        lines.append(f"| {pair} | {_pct(share)} | {'yes' if share >= 0.9 else 'no'} | {beats} |")
    lines += ["", "## Threshold sweep (LoRA-X transferred)", "",
              "| pair | threshold | modules kept | improvement recovered | cosine vs reference change |",
              "|---|---:|---:|---:|---:|"]
    for pair, ths in res["sweep"].items():
        for th, rows in ths.items():
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
        xs = [float(t) for t in ths]
        ax.plot(xs, [statistics.mean(r["share"] for r in rows) for rows in ths.values()], marker="o", label=p)
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
    args = p.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    if args.seeds:
        plan.seeds = tuple(args.seeds)
    if args.pairs:
        plan.pairs = tuple(args.pairs)
    if args.steps:
        plan.steps = args.steps
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    torch.set_num_threads(1)  # tiny models: one thread is much faster on a shared machine
    run(Path(args.out).resolve(), plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
