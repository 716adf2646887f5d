"""The GPU path, proven in one run: training, transfer, bases and distill on a CUDA device, with every
figure written to one JSON and one markdown table.

    python benchmarks/gpu_check.py --device cuda --out $OUT          # on the GPU machine (~8 minutes)
    python benchmarks/gpu_check.py --device cpu --small --out DIR    # the same steps, tiny, on a CPU

Parts (each recorded as ok / failed / skipped with its reason; a failure never stops the others):
- bases: `top_bases` on the device against the CPU (SD1.5 layer shapes, ranks 32 and 320; drifted
  decaying-spectrum weights), and the warm start (`warm_top_bases`) on the device; error against the
  CPU's exact bases within the tolerances of lorax/bases.py (projector 1e-4, singular values 1e-5 of
  s_max, promised where s_r - s_{r+1} > 1e-3 s_max; rows without that gap are marked "no gap").
- transfer: `transfer_lorax.py --device <device>` at ranks 32 and 320, cold (empty SVD cache) and warm
  (filled), against `--device cpu` on the same inputs (full-size SD1.5 fp16 checkpoints of
  bench_transfer.py, a LoRA-X adapter on --modules of its modules); outputs must agree per module to
  2e-3 relative in dW = up @ down (fp16 outputs and the bases tolerance).
- train: the paper's config (configs/sd15_lorax.toml: rank 320, AdamW 1e-3, batch 8, fp16, gradient
  checkpointing, min-SNR 5) on a full-size SD1.5 random-weight diffusers model at 512 px for --steps
  steps: LoRA-X against a plain LoRA (lycoris algo=lora, as benchmarks/bench_train.py), plus LoRA-X with
  8-bit AdamW; each in its own process (steps/s, peak GPU memory, peak RSS).
- distill: where `sd_scripts_lorax.transfer.distill` exists, a few steps of `--method distill` on the
  trained LoRA-X file (source: the training model; target: a 5% drift of it): seconds per step.

--small: tiny fixtures, small ranks, a few steps (the CPU mode a test runs so this file cannot rot).
--budget_s: parts that would start after this many seconds are skipped (reason "budget").

On the GPU machine (see /work/.library/device/README.md): its Python (3.12) has torch, transformers,
accelerate, safetensors, scipy, threadpoolctl, but not diffusers (which the fixtures need too),
importlib_metadata (diffusers needs it), lycoris_lora or bitsandbytes. Carry them as wheels:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 importlib_metadata lycoris_lora==4.1.3 bitsandbytes==0.50.2
    run(carry=[".whl"], timeout_s=560, command="python3 -m pip install -q --no-index --no-deps
        --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export
        PYTHONPATH=/tmp/site; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --device cuda --out $OUT")

(the versions are this venv's; drop bitsandbytes if the wheels pass the 64 MiB the call carries: the
8-bit variant is then "skipped"). The default --budget_s 480 leaves room inside one 10-minute call;
$OUT gets gpu_check.json and gpu_check.md; fixtures and outputs stay in --work_dir (a temp folder).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

FULL_SHAPES = [(320, 320), (640, 640), (1280, 1280), (1280, 768), (10240, 1280), (1280, 5120)]
SMALL_SHAPES = [(64, 48), (96, 96)]
PROJ_TOL, SING_TOL, GAP = 1e-4, 1e-5, 1e-3     # lorax/bases.py's stated tolerances and gap condition
DW_TOL = 2e-3                                  # transfer outputs: relative ||dW_dev - dW_cpu|| per module


def log(msg: str) -> None:
    print(msg, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def _proj_dist(a: torch.Tensor, b: torch.Tensor) -> float:
    a = torch.linalg.qr(a.double().cpu())[0]
    b = torch.linalg.qr(b.double().cpu())[0]
    return math.sqrt(2.0) * float(torch.linalg.norm(b - a @ (a.T @ b))) / math.sqrt(a.shape[1])


# ---------------------------------------------------------------- parts


def part_bases(a, device: torch.device, work: Path) -> dict:
    from sd_scripts_lorax.lorax import top_bases
    from sd_scripts_lorax.lorax.warm_bases import warm_top_bases
    from sd_scripts_lorax.testing.fixture_math import decaying_matrix, drift_tensor

    rows = []
    for out, n in (SMALL_SHAPES if a.small else FULL_SHAPES):
        g = torch.Generator().manual_seed(out * 7 + n)
        src = decaying_matrix(out, n, g).half()
        tgt = drift_tensor(src, 0.05, f"{out}x{n}", 1)
        for rank in a.ranks:
            r = min(rank, out, n)
            t_cpu, ref = _timed(lambda: top_bases(tgt, r, "exact"), torch.device("cpu"))
            wide = top_bases(tgt, min(r + 1, out, n), "gram")
            gap = float(wide.s[r - 1] - wide.s[r]) / float(wide.s[0]) if r < min(out, n) else 1.0
            w_dev = tgt.to(device)
            top_bases(w_dev, r)  # first call: kernels and libraries load, not the bases' cost
            t_dev, b = _timed(lambda: top_bases(w_dev, r), device)
            start = top_bases(src, r).v.to(device) if r < min(out, n) else None
            t_warm, bw = _timed(lambda: warm_top_bases(w_dev, r, start), device) if start is not None else (None, None)
            row = {"shape": [out, n], "rank": r, "gap": gap, "cpu_exact_s": t_cpu, "device_auto_s": t_dev,
                   "proj_err": _proj_dist(b.v, ref.v) if r < min(out, n) else 0.0,
                   "s_err": float((b.s.cpu() - ref.s).abs().max()) / float(ref.s[0]),
                   "warm_s": t_warm, "warm": bw is not None,
                   "warm_proj_err": _proj_dist(bw.v, ref.v) if bw is not None else None}
            # without the documented gap no tolerance is promised; 10x looser still catches broken bases
            loose = 1.0 if gap > GAP else 10.0
            row["ok"] = (row["proj_err"] < loose * PROJ_TOL and row["s_err"] < loose * SING_TOL
                         and (bw is None or row["warm_proj_err"] < loose * PROJ_TOL))
            row["note"] = "" if gap > GAP else "no gap at r: checked at 10x the tolerance"
            rows.append(row)
            log(f"  bases {out}x{n} r={r}: device {t_dev:.3f} s, cpu exact {t_cpu:.3f} s, proj err "
                f"{row['proj_err']:.1e}, s err {row['s_err']:.1e}, warm {row['warm']} {row['note']}")
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


def _bench_transfer():
    spec = importlib.util.spec_from_file_location("bench_transfer", REPO / "benchmarks" / "bench_transfer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cli_transfer(lora: Path, src: Path, tgt: Path, out: Path, cache: Path, device: str) -> float:
    cmd = [sys.executable, str(REPO / "transfer_lorax.py"), "--lora", str(lora), "--source_model", str(src),
           "--target_model", str(tgt), "--save_to", str(out), "--svd_cache_dir", str(cache), "--device", device,
           "--overwrite", "--no_progress"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(f"transfer_lorax.py --device {device} exited {r.returncode}: {r.stderr[-2000:]}")
    return time.perf_counter() - t


def _compare(a: Path, b: Path) -> float:
    """The largest per-module ||dW_a - dW_b|| / ||dW_b|| over the two files (same module names required)."""
    from sd_scripts_lorax.formats.lora_file import read_lora

    fa, fb = read_lora(a), read_lora(b)
    if sorted(fa.modules) != sorted(fb.modules):
        raise RuntimeError(f"{a.name} and {b.name} hold different modules")
    worst = 0.0
    for name, mb in fb.modules.items():
        ma = fa.modules[name]
        da = ma.up.float().flatten(1) @ ma.down.float().flatten(1)
        db = mb.up.float().flatten(1) @ mb.down.float().flatten(1)
        worst = max(worst, float((da - db).norm()) / max(float(db.norm()), 1e-30))
    return worst


def part_transfer(a, device: torch.device, work: Path) -> dict:
    bench = _bench_transfer()
    size = "tiny" if a.small else "full"
    work = work / "transfer"
    work.mkdir(parents=True, exist_ok=True)
    src, tgt = bench.checkpoints(work, size)
    names = bench.chosen_modules(src, a.modules)
    rows = []
    for rank in a.ranks:
        lora = bench.make_lora(src, names, rank, work / f"lora_r{rank}.safetensors", work / "setup_cache")
        cpu_out = work / f"cpu_r{rank}.safetensors"
        shutil.rmtree(work / f"cache_cpu_r{rank}", ignore_errors=True)
        t_cpu = _cli_transfer(lora, src, tgt, cpu_out, work / f"cache_cpu_r{rank}", "cpu")
        cache = work / f"cache_dev_r{rank}"
        shutil.rmtree(cache, ignore_errors=True)
        cold_out, warm_out = work / f"dev_cold_r{rank}.safetensors", work / f"dev_warm_r{rank}.safetensors"
        t_cold = _cli_transfer(lora, src, tgt, cold_out, cache, device.type)
        t_warm = _cli_transfer(lora, src, tgt, warm_out, cache, device.type)
        err_cold, err_warm = _compare(cold_out, cpu_out), _compare(warm_out, cpu_out)
        row = {"rank": rank, "modules": len(names), "cpu_cold_s": t_cpu, "device_cold_s": t_cold,
               "device_warm_s": t_warm, "dw_err_cold": err_cold, "dw_err_warm": err_warm,
               "ok": err_cold <= DW_TOL and err_warm <= DW_TOL}
        rows.append(row)
        log(f"  transfer r={rank} ({len(names)} modules): cpu {t_cpu:.1f} s, {device.type} cold {t_cold:.1f} s, "
            f"warm {t_warm:.1f} s; dW err vs cpu {err_cold:.1e} / {err_warm:.1e}")
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


def _train_model(a, work: Path) -> Path:
    from sd_scripts_lorax.testing.fixtures import write_fixture

    path = work / "models" / ("sd15_tiny_diffusers" if a.small else "sd15_full_diffusers")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_fixture("sd1", "diffusers", "tiny" if a.small else "full", 0, path)
    return path


def _train_argv(a, model: Path, data: Path, out: Path, variant: str) -> list[str]:
    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--device", a.device,
            "--output_dir", str(out), "--output_name", variant, "--max_train_steps", str(a.steps),
            "--network_dim", str(a.train_rank), "--network_alpha", str(a.train_rank), "--network_train_unet_only",
            "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--min_snr_gamma", "5", "--max_grad_norm", "1.0",
            "--seed", "42", "--cache_latents", "--gradient_checkpointing", "--progress", "off",
            "--resolution", str(64 if a.small else 512), "--train_batch_size", str(1 if a.small else 8),
            "--mixed_precision", "no" if a.device == "cpu" else "fp16", "--save_model_as", "safetensors",
            "--num_cpu_threads_per_process", "1" if a.small else "8"]
    if variant == "lora":
        argv += ["--network_module", "lycoris.kohya", "--network_args", "algo=lora", "preset=attn-mlp",
                 "--optimizer_type", "AdamW"]
    else:
        argv += ["--network_module", "networks.lora_x",
                 "--optimizer_type", "AdamW8bit" if variant == "lora_x_adamw8bit" else "AdamW"]
    return argv


def train_child(argv: list[str]) -> None:
    """One training run in this process; prints a JSON line with its figures."""
    from sd_scripts_lorax.train.config import parse_args
    from sd_scripts_lorax.train.run import run_training

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = run_training(parse_args(argv))
    total = time.perf_counter() - t0
    print("GPUCHECK " + json.dumps({
        "steps": res["steps_run"], "train_s": res["train_seconds"], "setup_s": total - res["train_seconds"],
        "steps_per_s": res["steps_run"] / max(res["train_seconds"], 1e-9),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final": str(res["final"]), "final_loss": float(res["losses"][-1]) if res.get("losses") else None}))


def part_train(a, device: torch.device, work: Path) -> dict:
    from sd_scripts_lorax.train.tiny_data import write_tiny_dataset

    model = _train_model(a, work)
    data = work / "data"
    if not data.exists():
        write_tiny_dataset(data)
    variants = {"lora_x": None, "lora": "lycoris", "lora_x_adamw8bit": "bitsandbytes"}
    if a.device == "cpu":
        variants.pop("lora_x_adamw8bit")    # 8-bit AdamW is a CUDA optimiser
    rows = []
    for variant, needs in variants.items():
        if needs and importlib.util.find_spec(needs) is None:
            rows.append({"variant": variant, "status": "skipped", "reason": f"{needs} is not installed", "ok": True})
            continue
        argv = _train_argv(a, model, data, work / "train" / variant, variant)
        r = subprocess.run([sys.executable, __file__, "--train-child", *argv], capture_output=True, text=True,
                           cwd=REPO)
        line = next((l for l in r.stdout.splitlines() if l.startswith("GPUCHECK ")), None)
        if r.returncode != 0 or line is None:
            rows.append({"variant": variant, "status": "failed", "ok": False,
                         "reason": (r.stderr or r.stdout)[-1500:]})
            log(f"  train {variant}: FAILED")
            continue
        fig = json.loads(line[len("GPUCHECK "):])
        if variant == "lora_x":
            a.trained_lora = fig["final"]   # the distill part's input
        rows.append({"variant": variant, "status": "ok", "ok": True, **fig})
        log(f"  train {variant}: {fig['steps_per_s']:.2f} steps/s, peak GPU {fig['peak_gpu_mib']} MiB, "
            f"RSS {fig['peak_rss_mib']:.0f} MiB")
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


def part_distill(a, device: torch.device, work: Path) -> dict:
    if importlib.util.find_spec("sd_scripts_lorax.transfer.distill") is None:
        return {"status": "skipped", "reason": "no distill method in this checkout", "ok": True, "rows": []}
    from sd_scripts_lorax.testing.fixtures import derive_fixture
    from sd_scripts_lorax.transfer.distill.options import DistillOptions
    from sd_scripts_lorax.transfer.distill.run import distill_transfer

    lora = Path(getattr(a, "trained_lora", "") or work / "none")
    if not lora.is_file():
        return {"status": "skipped", "reason": "needs the train part's LoRA-X file", "ok": True, "rows": []}
    src = _train_model(a, work)
    tgt = src.parent / (src.name + "_ft")
    if not tgt.exists():
        derive_fixture(src, tgt, drift=0.05, seed=1, keep_text_encoder=True)
    steps = a.steps
    opts = DistillOptions(steps=steps, batch_size=1 if a.small else 8, samples=1 if a.small else 16, draws=1,
                          sample_steps=1 if a.small else 10, keep_samples=0)
    t = time.perf_counter()
    _, rep = distill_transfer(lora, src, tgt, work / "distilled.safetensors", opts, device=device.type,
                              overwrite=True, progress=False, log=lambda s: None)
    wall = time.perf_counter() - t
    secs = dict(rep.seconds)
    fit = next((v for k, v in secs.items() if "fit" in k or "train" in k), None)
    row = {"steps": steps, "wall_s": wall, "seconds": secs,
           "per_step_s": (fit / steps) if fit is not None else None, "ok": True}
    log(f"  distill: {steps} steps, {wall:.1f} s in all, per step {row['per_step_s']}")
    return {"rows": [row], "ok": True}


PARTS = {"bases": part_bases, "transfer": part_transfer, "train": part_train, "distill": part_distill}


# ---------------------------------------------------------------- report


def markdown(doc: dict) -> str:
    env = doc["env"]
    lines = [f"# gpu_check ({env['device']}{', small' if env['small'] else ''})", "",
             f"{env['device_name']}; torch {env['torch']}; {env['started']}; {doc['wall_s']:.0f} s in all", ""]
    for name, part in doc["parts"].items():
        status = part.get("status", "ok" if part.get("ok") else "failed")
        lines += [f"## {name}: {status}", ""]
        if part.get("reason") or part.get("error"):
            lines += ["```", str(part.get("reason") or part.get("error"))[-1500:], "```", ""]
        rows = part.get("rows") or []
        if rows:
            keys = [k for k in rows[0] if k not in ("reason", "final", "seconds")]
            lines.append("| " + " | ".join(keys) + " |")
            lines.append("|" + "---|" * len(keys))
            for r in rows:
                cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in (r.get(k) for k in keys)]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--small", action="store_true", help="tiny fixtures and ranks (the CPU test mode)")
    p.add_argument("--out", default=str(REPO / "out" / "gpu_check"), help="folder of gpu_check.json / .md")
    p.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "lorax_gpu_check"),
                   help="fixtures and outputs (kept between runs; not under --out, whose files travel back)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--steps", type=int, default=None, help="training steps (default 20; small 2)")
    p.add_argument("--modules", type=int, default=None, help="transfer: adapted modules (default: 64; small: all)")
    p.add_argument("--ranks", type=int, nargs="+", default=None,
                   help="bases/transfer ranks (default 32 320; small 4 8)")
    p.add_argument("--budget_s", type=float, default=480.0, help="skip parts that would start later than this")
    a = p.parse_args(argv)
    a.ranks = a.ranks or ([4, 8] if a.small else [32, 320])
    a.modules = a.modules or (None if a.small else 64)
    a.train_rank = 8 if a.small else 320
    a.steps = a.steps or (2 if a.small else 20)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here (use --device cpu --small)")
    device = torch.device(a.device)
    out = Path(a.out)
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    device_name = torch.cuda.get_device_name(0) if a.device == "cuda" else platform.processor() or "cpu"
    doc = {"env": {"device": a.device, "small": a.small, "torch": torch.__version__,
                   "python": platform.python_version(), "device_name": device_name,
                   "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                   "ranks": a.ranks, "train_rank": a.train_rank, "steps": a.steps},
           "parts": {}}
    for name in a.parts:
        if time.perf_counter() - t0 > a.budget_s:
            doc["parts"][name] = {"status": "skipped", "reason": f"budget: {a.budget_s:.0f} s spent", "ok": True}
            continue
        log(f"{name} ...")
        t = time.perf_counter()
        try:
            doc["parts"][name] = PARTS[name](a, device, work)
        except Exception as exc:  # record and go on: one JSON with everything that ran
            doc["parts"][name] = {"status": "failed", "ok": False, "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()[-4000:]}
            log(f"  {name} FAILED: {type(exc).__name__}: {exc}")
        doc["parts"][name]["seconds"] = time.perf_counter() - t
    doc["wall_s"] = time.perf_counter() - t0
    doc["failures"] = [n for n, part in doc["parts"].items() if not part.get("ok")]
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(doc))
    log(markdown(doc))
    return 1 if doc["failures"] else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--train-child":
        train_child(sys.argv[2:])
    else:
        sys.exit(main())
