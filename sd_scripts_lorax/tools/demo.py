"""`make demo`: the whole LoRA-X job on the embedded tiny model pair, offline, on a CPU.

    python -m sd_scripts_lorax.tools.demo [--out out/demo] [--quick]

1. writes the "blue fire" style dataset (training and held-out images);
2. trains a LoRA-X on the SOURCE (train_network_lorax.py, configs/demo_source.toml);
3. transfers it to the TARGET (transfer_lorax.py: adapter, JSON report, heat map), and again with
   --method distill (refined by data-free function matching; report and loss curve);
4. trains a LoRA-X on the TARGET directly, the reference (configs/demo_target.toml);
5. evaluates five variants of the target on the held-out images and prints the table;
6. draws an image grid (same prompts and seeds, one row per variant).
Steps 2-4 run the real command-line tools as subprocesses, as a user would.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import LoraxInputError, cli_errors
from ..formats.atomic import atomic_write
from ..testing.embedded import embedded_model_path, eval_prompts, write_style_dataset
from . import evaluate

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"

# Row names of the table, in order.
NONE, COPIED, TRANSFERRED, REFERENCE = ("target, no adapter", "target + source adapter copied as is",
                                        "target + transferred adapter", "target + LoRA-X trained on target")
DISTILLED = "target + distilled adapter (--method distill)"


@dataclass
class DemoPlan:
    """Sizes of a demo run (the defaults: about 5 minutes on 2 busy CPU cores)."""

    train_steps: int = 200
    eval_repeats: int = 4          # each held-out image with this many (noise, timestep) pairs
    grid_seen: int = 3
    grid_unseen: int = 3
    sample_steps: int = 20
    guidance: float = 3.0
    seed: int = 0
    distill_args: tuple[str, ...] = ()  # extra transfer_lorax.py flags of the --method distill step

    @classmethod
    def quick(cls) -> "DemoPlan":
        return cls(train_steps=10, eval_repeats=1, grid_seen=1, grid_unseen=1, sample_steps=4,
                   distill_args=("--steps", "4", "--distill_samples", "8", "--distill_sample_steps", "4"))


# ---------------------------------------------------------------- subprocesses

_STEP = re.compile(r"(\d+)/(\d+) \[")
_NOISE = ("Loading weights", "Writing model shards", "gemm_4bit", "kernels-community")


class _Stream:
    """Turns a tool's output (tqdm redraws with \\r) into a few lines: every 10 % of a bar, and the rest."""

    def __init__(self, label: str, write=print) -> None:
        self.label, self.write, self.last_decile = label, write, -1

    def line(self, text: str) -> None:
        text = text.strip()
        # the transfer's per-module table is in its JSON report; the summary lines are enough here
        if not text or any(n in text for n in _NOISE) or text.startswith(("lora_", "-----")):
            return
        m = _STEP.search(text)
        if m:
            step, total = int(m.group(1)), int(m.group(2))
            decile = 10 * step // max(total, 1)
            if decile > self.last_decile:
                self.last_decile = decile
                self.write(f"  [{self.label}] {text}")
            return
        self.write(f"  [{self.label}] {text}")


def run_tool(label: str, args: Sequence[str], write=print) -> None:
    """Run `python <args>` from the repository root, streaming condensed progress; raise on failure."""
    cmd = [sys.executable, *args]
    write(f"$ {' '.join(str(a) for a in cmd)}")
    stream = _Stream(label, write)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    buf = b""
    tail: list[str] = []
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(4096):
        buf += chunk
        parts = re.split(rb"[\r\n]", buf)
        buf = parts.pop()
        for p in parts:
            text = p.decode("utf-8", "replace")
            tail = (tail + [text])[-20:]
            stream.line(text)
    stream.line(buf.decode("utf-8", "replace"))
    if proc.wait() != 0:
        raise LoraxInputError(f"{label}: `{' '.join(map(str, args))}` failed with exit code {proc.returncode}; "
                              f"last output: {' | '.join(t for t in tail if t.strip())[-300:]}")


def float32_copy(src: Path, dst: Path) -> Path:
    """A float32 copy of a diffusers SD1 folder.

    The committed pair is fp16; the trainer loads the text encoder in the stored dtype under
    transformers 5 (and the UNet in float32), which fails on CPU. A float32 working copy sidesteps it.
    """

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if (dst / "model_index.json").is_file():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        cls.from_pretrained(src, subfolder=sub, torch_dtype=torch.float32).save_pretrained(tmp / sub)
    tmp.rename(dst)
    return dst


def train(label: str, config: Path, model: Path, data: Path, out_dir: Path, name: str, steps: int,
          extra: Sequence[str] = (), write=print) -> Path:
    """train_network_lorax.py with `config`, on `model` and `data`, into `out_dir/name.safetensors`."""
    run_tool(label, ["train_network_lorax.py", "--config_file", str(config),
                     "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
                     "--output_dir", str(out_dir), "--output_name", name, "--max_train_steps", str(steps),
                     *extra], write)
    path = out_dir / f"{name}.safetensors"
    if not path.is_file():
        raise LoraxInputError(f"{label}: the trainer reported success but {path} is missing")
    return path


def transfer_cli(lora: Path, source: Path, target: Path, save_to: Path, report: Path | None = None,
                 plot: Path | None = None, threshold: float = 0.8, match: str = "name", write=print,
                 extra: Sequence[str] = ()) -> Path:
    """transfer_lorax.py (the user's command) with --overwrite; `extra`: more flags (e.g. --method distill)."""
    save_to.parent.mkdir(parents=True, exist_ok=True)
    args = ["transfer_lorax.py", "--lora", str(lora), "--source_model", str(source), "--target_model", str(target),
            "--save_to", str(save_to), "--threshold", str(threshold), "--match", match, "--overwrite",
            "--no_progress"]
    if report:
        args += ["--report", str(report)]
    if plot:
        args += ["--plot", str(plot)]
    run_tool("transfer", [*args, *extra], write)
    return save_to


# ---------------------------------------------------------------- evaluation data

def load_folder_images(folder: Path) -> tuple[torch.Tensor, list[str]]:
    """Every `<name>.png` + `<name>.txt` of a kohya subfolder, sorted: images in [-1, 1], captions."""
    from PIL import Image

    pngs = sorted(folder.glob("*.png"))
    if not pngs:
        raise LoraxInputError(f"{folder}: no .png images")
    arr = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in pngs])
    caps = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in pngs]
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0, caps


def evaluate_variants(model: Path, loras: dict[str, Path | None], eval_dir: Path, repeats: int, seed: int,
                      none: str = NONE, reference: str = REFERENCE) -> list:
    """Rows of `evaluate.compare` for `model` with each adapter (None = no adapter)."""

    images, captions = load_folder_images(eval_dir)
    base = evaluate.load_variant(model)
    data = evaluate.make_eval_set(base.vae, images, captions, seed=seed, repeats=repeats)
    preds = {}
    for name, lora in loras.items():
        variant = base if lora is None else evaluate.load_variant(model, lora)
        preds[name] = evaluate.noise_predictions(variant, data)
    return evaluate.compare(preds, data, none, reference)


def format_table(rows: list, write=print) -> str:
    """The results as a markdown table (also printed)."""
    lines = ["| variant | held-out style loss (lower is better) | improvement recovered | "
             "cosine of change vs reference | relative MSE of change |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.loss:.5f} | {100 * r.share:.1f} % | {r.cosine:.3f} | {r.rel_mse:.3f} |")
    text = "\n".join(lines)
    write(text)
    return text


# ---------------------------------------------------------------- image grid

@torch.no_grad()
def sample_images(model: Path, lora: Path | None, prompts: Sequence[str], seed: int, steps: int,
                  guidance: float) -> list:
    """One 64x64 PIL image per prompt, each from the same seeded initial noise for every variant."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline


    v = evaluate.load_variant(model, lora)
    pipe = StableDiffusionPipeline(vae=v.vae, text_encoder=v.text_encoder, tokenizer=v.tokenizer, unet=v.unet,
                                   scheduler=DDIMScheduler.from_pretrained(model, subfolder="scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(seed + i)
        images.append(pipe(prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                           generator=gen).images[0])
    return images


def draw_grid(rows: list[tuple[str, list]], columns: Sequence[str], cell: int = 128):
    """A labelled grid: one row per (label, images), one column per prompt (headed by `columns`)."""
    from PIL import Image, ImageDraw

    label_w, head_h = 260, 44
    n_cols = max(len(imgs) for _, imgs in rows)
    grid = Image.new("RGB", (label_w + n_cols * cell, head_h + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for j, text in enumerate(columns):
        for k, line in enumerate(_wrap(text, cell // 6)[:3]):
            draw.text((label_w + j * cell + 4, 4 + 12 * k), line, fill="black")
    for i, (label, imgs) in enumerate(rows):
        y = head_h + i * cell
        for k, line in enumerate(_wrap(label, 36)):
            draw.text((6, y + cell // 2 - 14 + 12 * k), line, fill="black")
        for j, im in enumerate(imgs):
            grid.paste(im.resize((cell, cell), Image.NEAREST), (label_w + j * cell, y))
    return grid


def _wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return lines + [cur] if cur else lines


def grid_prompts(n_seen: int, n_unseen: int) -> list[tuple[str, bool]]:
    """The first `n_seen` seen and `n_unseen` unseen evaluation prompts."""

    prompts = eval_prompts()
    return [p for p in prompts if p[1]][:n_seen] + [p for p in prompts if not p[1]][:n_unseen]


# ---------------------------------------------------------------- the demo

def _quiet_loaders() -> None:
    """No per-file progress bars from transformers' loaders (the demo prints its own steps)."""
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    # tiny models: one thread is several times faster than two on a shared 2-core machine
    torch.set_num_threads(1)


def run_demo(out: str | Path = "out/demo", plan: DemoPlan | None = None, write=print) -> dict:
    """Run every step into `out`; returns the paths and the table rows (also in `out/results.json`)."""

    _quiet_loaders()
    plan = plan or DemoPlan()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def step(title: str) -> None:
        write(f"\n== {title}  ({time.perf_counter() - t0:.0f} s)")

    step("1/6 data and models")
    data = write_style_dataset(out / "data", seed=plan.seed, split="train")
    eval_root = write_style_dataset(out / "eval", seed=plan.seed, split="eval")
    eval_dir = next(p for p in sorted(eval_root.iterdir()) if p.is_dir())
    source = float32_copy(embedded_model_path("source"), out / "models" / "source")
    target = float32_copy(embedded_model_path("target"), out / "models" / "target")
    write(f"  style images: {data}, held-out: {eval_dir}; float32 model copies: {out / 'models'}")

    step("2/6 train a LoRA-X on the SOURCE")
    src_lora = train("train source", CONFIGS / "demo_source.toml", source, data, out / "source_lora",
                     "bluefire_source", plan.train_steps, write=write)

    step("3/6 transfer it to the TARGET (--method project: training-free; --method distill: data-free refinement)")
    transferred = transfer_cli(src_lora, source, target, out / "transferred" / "bluefire_transferred.safetensors",
                               out / "transfer_report.json", out / "transfer_heatmap.png", write=write)
    # the same transfer refined by data-free function matching (prompts from the file's ss_tag_frequency)
    distilled = transfer_cli(src_lora, source, target, out / "distilled" / "bluefire_distilled.safetensors",
                             out / "distill_report.json", out / "distill.png", write=write,
                             extra=["--method", "distill", *plan.distill_args])

    step("4/6 train a LoRA-X on the TARGET directly (the reference)")
    ref_lora = train("train target", CONFIGS / "demo_target.toml", target, data, out / "target_lora",
                     "bluefire_target", plan.train_steps, write=write)

    step("5/6 evaluate on the held-out style images")
    loras = {NONE: None, COPIED: src_lora, TRANSFERRED: transferred, DISTILLED: distilled, REFERENCE: ref_lora}
    rows = evaluate_variants(target, loras, eval_dir, plan.eval_repeats, plan.seed)
    table = format_table(rows, write)

    step("6/6 image grid")
    prompts = grid_prompts(plan.grid_seen, plan.grid_unseen)
    grid_rows = [(name, sample_images(target, lora, [p for p, _ in prompts], plan.seed, plan.sample_steps,
                                      plan.guidance)) for name, lora in loras.items()]
    heads = [("seen: " if seen else "unseen: ") + p.split(", ", 1)[-1].removeprefix("a ").removesuffix(" background")
             for p, seen in prompts]
    grid_path = out / "grid.png"
    img = draw_grid(grid_rows, heads)
    with atomic_write(grid_path) as tmp:
        img.save(tmp, format="PNG")

    results = {"rows": [asdict(r) for r in rows], "plan": asdict(plan), "seconds": round(time.perf_counter() - t0, 1),
               "prompts": prompts,
               "files": {"source_lora": str(src_lora), "transferred_lora": str(transferred),
                         "reference_lora": str(ref_lora), "transfer_report": str(out / "transfer_report.json"),
                         "distilled_lora": str(distilled), "distill_report": str(out / "distill_report.json"),
                         "distill_loss_plot": str(out / "distill_loss.png"),
                         "transfer_heatmap": str(out / "transfer_heatmap.png"), "grid": str(grid_path),
                         "table": str(out / "results.md"), "results": str(out / "results.json")}}
    write_text(out / "results.md", table + "\n")
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    write(f"\ndone in {results['seconds']:.0f} s. Outputs:")
    for k, v in results["files"].items():
        write(f"  {k:18s} {v}")
    return results


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""

    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd_scripts_lorax.tools.demo",
                                description="LoRA-X end to end on the embedded tiny model pair (offline, CPU).")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a handful of steps, tiny grid")
    args = p.parse_args(argv)
    with cli_errors():
        run_demo(args.out, DemoPlan.quick() if args.quick else DemoPlan())
    return 0


if __name__ == "__main__":
    sys.exit(main())
