"""kohya's own trainer with `networks.lora` (kohya's plain LoRA) against `networks.lora_x`, same
arguments, measured in one run: wall time, peak memory and step time of each stage, and the ratios.

    python benchmarks/bench_kohya.py                       # SD1.5 full size: train / resume / dimfw, both modules
    python benchmarks/bench_kohya.py --family sdxl --modules networks.lora_x --stages train,resume

Stages: `train` (2 steps from scratch), `resume` (--network_weights <train step 1>), `dimfw` (the same
with --dim_from_weights). Every run is kohya's unmodified trainer in kohya's pinned venv
(sd_scripts_lorax.testing.kohya), on a full-size random-weight checkpoint, without an SVD cache
unless --svd_cache is given. Targets (issue 10): LoRA-X's step <= 1.1x and each stage <= 1.2x LoRA's.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd_scripts_lorax.testing.kohya.workspace import Workspace

STEP_RE = re.compile(r"([0-9.]+)s/it")


def step_time(log_text: str) -> float | None:
    """kohya's tqdm average seconds per step at the end of the run."""
    found = STEP_RE.findall(log_text)
    return float(found[-1]) if found else None


def run_stage(ws: Workspace, module: str, stage: str, tag: str, extra: list[str], dim: int, steps: int) -> dict:
    name, train_name = f"{stage}-{tag}", f"train-{tag}"
    args = list(extra)
    if stage in ("resume", "dimfw"):
        source = ws.root / "out" / train_name / f"{train_name}-step00000001.safetensors"
        args += ["--network_weights", str(source)] + (["--dim_from_weights"] if stage == "dimfw" else [])
    r = ws.train(name, module, *args, dim=dim, steps=steps)
    got = {"wall_s": r.wall_s, "peak_gib": r.peak_rss_gib, "s_per_it": step_time(r.text)}
    print(f"  {module:16s} {stage:7s} {r.wall_s:7.1f} s  peak {r.peak_rss_gib:5.2f} GiB  "
          f"step {got['s_per_it']} s/it", flush=True)
    return got


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time (its peak and step time with it)."""
    return sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--modules", default="networks.lora,networks.lora_x")
    p.add_argument("--stages", default="train,resume,dimfw")
    p.add_argument("--dim", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="training steps per stage (more: a steadier s/it)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every stage this many times per module and keep the median wall time")
    p.add_argument("--svd_cache", action="store_true", help="give networks.lora_x an svd_cache_dir (warm after train)")
    p.add_argument("--workdir", help="keep the workspace here (default: a temp folder, removed)")
    p.add_argument("--extra", default="",
                   help="more kohya flags, space-separated (e.g. '--full_bf16 --mixed_precision bf16')")
    args = p.parse_args(argv)
    modules, stages = args.modules.split(","), args.stages.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-kohya-") as tmp:
        ws = Workspace(Path(args.workdir or tmp), args.family)
        ws.setup()
        print(f"kohya {ws.kohya}  checkpoint {ws.checkpoint.name}  rank {args.dim}", flush=True)
        # Untimed: the first kohya run in a fresh copy compiles its .pyc files and reads the checkpoint
        # from disk; whichever module ran first used to pay ~10 s for it.
        ws.train("warmup", modules[0], *args.extra.split(), dim=args.dim, steps=1)
        table: dict[str, dict] = {m: {} for m in modules}
        for stage in stages:  # the modules take turns, so a change of load on the machine hits both
            runs: dict[str, list[dict]] = {m: [] for m in modules}
            for k in range(args.repeats):
                order = list(enumerate(modules))
                for i, module in (order if k % 2 == 0 else order[::-1]):  # alternate who goes first
                    extra = args.extra.split()
                    if module == "networks.lora_x" and args.svd_cache:
                        extra += ["--network_args", f"svd_cache_dir={ws.root / 'svd-cache'}"]
                    runs[module].append(run_stage(ws, module, stage, f"m{i}", extra, args.dim, args.steps))
            for module, got in runs.items():
                table[module][stage] = median_run(got)
        if len(modules) == 2:
            base, test = (table[m] for m in modules)
            print(f"\n{'stage':8s} {modules[0]:>16s} {modules[1]:>16s}  ratio   step ratio  peak ratio")
            for stage in stages:
                b, t = base[stage], test[stage]
                sr = (t["s_per_it"] / b["s_per_it"]) if b["s_per_it"] and t["s_per_it"] else float("nan")
                print(f"{stage:8s} {b['wall_s']:14.1f} s {t['wall_s']:14.1f} s  {t['wall_s'] / b['wall_s']:5.2f}x  "
                      f"{sr:9.2f}x  {t['peak_gib'] / b['peak_gib']:9.2f}x")
            total_b = sum(base[s]["wall_s"] for s in stages)
            total_t = sum(test[s]["wall_s"] for s in stages)
            print(f"{'all':8s} {total_b:14.1f} s {total_t:14.1f} s  {total_t / total_b:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
