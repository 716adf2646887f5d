"""What `--method distill` costs on a full-size SD1.5 model on this machine's CPU: per fit step, per
teacher pass, peak memory, and a default run's estimated time and compute share.

    PYTHONPATH=. python benchmarks/bench_distill.py [--steps 3] [--batch_size 8] [--micro_batch 2] [--work_dir DIR]
    PYTHONPATH=. python benchmarks/bench_distill.py --size tiny --steps 2 --batch_size 2   # the test's run

Builds once (kept in --work_dir): a full-size SD1.5 random-weight diffusers model (512 px, latents
64 x 64), its 5 % drift as the target, and a rank-8 LoRA-X adapter on the source's attention
modules. Then runs `distill_transfer` with a small teacher set (4 latents, 3 sampler steps) and
--steps fit steps. Prints seconds per fit step at --batch_size (the steps alone), the teacher's
seconds per UNet pass (model loading included: an upper bound), the peak RSS, and a default run
priced at those rates.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sd_scripts_lorax.formats.checkpoint import Checkpoint  # noqa: E402
from sd_scripts_lorax.formats.lora_file import (LoraModule, lorax_metadata, minimum_kohya_metadata,  # noqa: E402
                                               write_lora)
from sd_scripts_lorax.lorax import lorax_factors, top_bases  # noqa: E402
from sd_scripts_lorax.testing.fixtures import derive_fixture, write_fixture  # noqa: E402
from sd_scripts_lorax.transfer.distill.options import PAPER_TRAINING_PASSES, DistillOptions  # noqa: E402
from sd_scripts_lorax.transfer.distill.run import distill_transfer  # noqa: E402

RANK = 8


def inputs(work: Path, size: str = "full") -> tuple[Path, Path, Path, Path]:
    """(source, target, adapter, prompts file), written on first use."""
    src, tgt = work / f"sd15_{size}_diffusers", work / f"sd15_{size}_diffusers_ft"
    lora, prompts = work / f"adapter_{size}_r8.safetensors", work / "prompts.txt"
    if not src.exists():
        write_fixture("sd1", "diffusers", size, 0, src)
    if not tgt.exists():
        derive_fixture(src, tgt, drift=0.05, seed=1, keep_text_encoder=True)
    if not lora.exists():
        g = torch.Generator().manual_seed(0)
        mods = []
        with Checkpoint.open(src) as c:
            for name, ref in sorted(c.modules().items()):
                if ref.group != "attn":
                    continue
                b = top_bases(c.weight(ref), RANK)
                up, down = lorax_factors(b, b.s * 0.1 * torch.randn(b.rank, generator=g), ref.shape)
                mods.append(LoraModule(name, down, up, float(b.rank)))
            meta = {**minimum_kohya_metadata("sd1", "networks.lora_x", [m.rank for m in mods],
                                             [m.alpha for m in mods]), **lorax_metadata(RANK, c.name, "0" * 64)}
        write_lora(lora, mods, meta)
    if not prompts.exists():
        prompts.write_text("a painting of a castle, bluefire style\na portrait of a woman, bluefire style\n")
    return src, tgt, lora, prompts


def run(work: Path, steps: int, batch: int, micro: int, src: Path, tgt: Path, lora: Path, prompts: Path) -> dict:
    opts = DistillOptions(steps=steps, batch_size=batch, micro_batch=micro, samples=4, draws=1, sample_steps=3,
                          lr_warmup_steps=0, prompts_file=str(prompts))
    _, rep = distill_transfer(lora, src, tgt, work / "distilled.safetensors", opts, overwrite=True,
                              progress=False, log=lambda s: None)
    return {"seconds": rep.seconds, "passes": opts.unet_passes()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="fit steps timed")
    p.add_argument("--batch_size", type=int, default=DistillOptions().batch_size)
    p.add_argument("--micro_batch", type=int, default=0, help="distill's --micro_batch (0: the whole batch)")
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="tiny: the test's fixtures")
    p.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "lorax_bench_distill"))
    a = p.parse_args(argv)
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if a.steps < 1:
        p.error("--steps must be at least 1")
    src, tgt, lora, prompts = inputs(work, a.size)
    print(f"inputs ready in {time.perf_counter() - t:.0f} s ({work}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    one = run(work, a.steps, a.batch_size, a.micro_batch, src, tgt, lora, prompts)
    per_step = one["seconds"]["fit_steps"] / a.steps
    teacher = one["passes"]["sampling"] + one["passes"]["teacher"]
    per_pass = one["seconds"]["teacher"] / teacher
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    d = DistillOptions()
    dp = d.unet_passes()
    fit_s = d.steps * per_step * d.batch_size / a.batch_size
    est = (dp["sampling"] + dp["teacher"] + dp["held_out"]) * per_pass + fit_s
    print(f"fit step (batch {a.batch_size}, micro-batch {a.micro_batch or a.batch_size}, {a.size} SD1.5): "
          f"{per_step:.1f} s; teacher: {per_pass:.2f} s per "
          f"UNet pass (loading included, {teacher} passes in {one['seconds']['teacher']:.0f} s); "
          f"peak RSS {peak_gib:.1f} GiB")
    print(f"a default run ({d.steps} steps of batch {d.batch_size}, {d.samples} latents x "
          f"{d.sample_steps} sampler steps) at these rates: about {est / 3600:.1f} h on this CPU; compute "
          f"{100 * d.compute_share():.1f} % of training the adapter on the target "
          f"({PAPER_TRAINING_PASSES // 3} items of forward + backward)")
    print(f"BENCH_DISTILL per_step_s={per_step:.4f} per_pass_s={per_pass:.4f} peak_rss_gib={peak_gib:.2f} "
          f"default_run_s={est:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
