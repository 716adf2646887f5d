"""Trainer benchmark: LoRA-X vs a plain LoRA (lycoris algo=lora, same rank, same targets class),
trained through the same loop on the same model and data.

Each variant runs in its own subprocess so that peak memory (ru_maxrss) is its own. Steps/s counts
the training loop only (model loading, SVDs and latent caching are reported as setup time).

    .venv/bin/python benchmarks/bench_train.py                      # tiny SD1 model, rank 8, 20 steps
    .venv/bin/python benchmarks/bench_train.py --steps 50 --rank 16 --model .cache/tiny-sdxl-lorax --sdxl
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "lora_x": ["--network_module", "networks.lora_x"],
    "lora (lycoris algo=lora)": ["--network_module", "lycoris.kohya", "--network_args", "algo=lora",
                                 "preset=attn-mlp"],
}


def child(argv: list[str]) -> None:
    """Run one variant in this process; print a JSON line with its figures."""
    sys.path.insert(0, str(REPO))
    t0 = time.perf_counter()
    from sd_scripts_lorax.train.config import parse_args
    from sd_scripts_lorax.train.run import run_training

    res = run_training(parse_args(argv))
    total = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    from safetensors.torch import load_file
    sd = load_file(res["final"])
    print("BENCH " + json.dumps({
        "steps": res["steps_run"], "train_s": res["train_seconds"], "setup_s": total - res["train_seconds"],
        "steps_per_s": res["steps_run"] / res["train_seconds"], "peak_rss_mib": peak_mib,
        "file_tensors": len(sd), "file_mib": res["final"].stat().st_size / 2**20}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None, help="diffusers folder (default: the tiny config's model)")
    p.add_argument("--sdxl", action="store_true")
    p.add_argument("--out", default=str(REPO / "out" / "bench_train"))
    a = p.parse_args()
    results = {}
    for name, extra in VARIANTS.items():
        argv = ["--config_file", str(REPO / "configs" / "tiny_lorax.toml"), "--max_train_steps", str(a.steps),
                "--network_dim", str(a.rank), "--network_alpha", str(a.rank), "--progress", "off",
                "--num_cpu_threads_per_process", str(a.threads), "--output_dir", f"{a.out}/{name.split()[0]}",
                *extra]
        if a.model:
            argv += ["--pretrained_model_name_or_path", a.model] + (["--sdxl"] if a.sdxl else [])
        r = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, cwd=REPO)
        line = next((l for l in r.stdout.splitlines() if l.startswith("BENCH ")), None)
        if r.returncode != 0 or line is None:
            sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
        results[name] = json.loads(line[6:])
    print(f"{'variant':28} {'steps/s':>8} {'train s':>8} {'setup s':>8} {'peak RSS MiB':>13} {'tensors':>8} "
          f"{'file MiB':>9}")
    for name, r in results.items():
        print(f"{name:28} {r['steps_per_s']:8.2f} {r['train_s']:8.1f} {r['setup_s']:8.1f} {r['peak_rss_mib']:13.0f} "
              f"{r['file_tensors']:8d} {r['file_mib']:9.2f}")
    x, l = results["lora_x"], results["lora (lycoris algo=lora)"]
    print(f"ratios lora_x / lora: steps/s {x['steps_per_s'] / l['steps_per_s']:.2f}, "
          f"peak RSS {x['peak_rss_mib'] / l['peak_rss_mib']:.2f}, setup {x['setup_s'] / l['setup_s']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
