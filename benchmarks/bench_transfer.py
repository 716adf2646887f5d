"""Benchmark of the training-free transfer on full-size SD1.5-architecture checkpoints.

Two fp16 single files (random weights with decaying spectra; the target derived from the source, a
fine-tune-like drift, text encoder bit-identical as in most fine-tunes), a LoRA-X adapter over the
192 UNet attention + 72 text-encoder modules, and per rank (32 and 320):

- cold: a transfer with an empty SVD cache;
- warm: the same transfer again with the cache filled;
against
- (a) reference: full torch.linalg.svd in float32 of every adapted module of both models;
- (b) read: only reading the needed tensors from both files.

Targets: cold <= 1/5 of the reference; warm <= 3x the read time.

    python benchmarks/bench_transfer.py [--modules N] [--ranks 32 320] [--work_dir DIR]

--modules N subsamples the adapted modules (evenly over the sorted names); the output says what was
measured. The checkpoints (about 2 GB each) are kept in --work_dir between runs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sd_scripts_lorax.checkpoint import Checkpoint  # noqa: E402
from sd_scripts_lorax.fixtures import derive_fixture, write_fixture  # noqa: E402
from sd_scripts_lorax.lora_file import (LoraModule, lorax_metadata, minimum_kohya_metadata,  # noqa: E402
                                        write_lora)
from sd_scripts_lorax.lorax import lorax_factors, top_bases  # noqa: E402
from sd_scripts_lorax.svd_cache import get_or_compute  # noqa: E402
from sd_scripts_lorax.transfer import transfer  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def checkpoints(work: Path) -> tuple[Path, Path]:
    src = work / "sd15_decaying_fp16.safetensors"
    tgt = work / "sd15_decaying_fp16_ft.safetensors"
    if not src.exists():
        t = time.perf_counter()
        write_fixture("sd1", "single_file", "full", 0, src, dtype="fp16", spectrum="decaying")
        log(f"  wrote {src.name} ({src.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s")
    if not tgt.exists():
        t = time.perf_counter()
        derive_fixture(src, tgt, drift=0.05, seed=1, keep_text_encoder=True)
        log(f"  wrote {tgt.name} in {time.perf_counter() - t:.0f} s")
    return src, tgt


def chosen_modules(src: Path, n: int | None) -> list[str]:
    with Checkpoint.open(src) as c:
        names = sorted(name for name, ref in c.modules().items() if ref.group == "attn")
    if n is None or n >= len(names):
        return names
    step = len(names) / n
    return [names[int(i * step)] for i in range(n)]


def make_lora(src: Path, names: list[str], rank: int, out: Path, setup_cache: Path) -> Path:
    """A LoRA-X adapter on the source's own top bases (setup, not timed; bases cached separately)."""
    g = torch.Generator().manual_seed(rank)
    mods = []
    with Checkpoint.open(src) as c:
        refs = c.modules()
        for name in names:
            ref = refs[name]
            w = c.weight(ref)
            b = get_or_compute(w, rank, setup_cache, lambda: top_bases(w, rank))
            up, down = lorax_factors(b, b.s * 0.1 * torch.randn(b.rank, generator=g), ref.shape)
            mods.append(LoraModule(name, down.half(), up.half(), float(b.rank)))
        meta = {**minimum_kohya_metadata("sd1", "networks.lora_x", [m.rank for m in mods], [m.alpha for m in mods]),
                **lorax_metadata(rank, c.name, "0" * 64)}
    return write_lora(out, mods, meta, overwrite=True)


def time_read(src: Path, tgt: Path, names: list[str]) -> float:
    t = time.perf_counter()
    with Checkpoint.open(src) as s, Checkpoint.open(tgt) as d:
        sr, dr = s.modules(), d.modules()
        for n in names:
            s.weight(sr[n])
            d.weight(dr[n])
    return time.perf_counter() - t


def time_reference(src: Path, tgt: Path, names: list[str]) -> float:
    """Full fp32 SVD of every adapted module of both models (what a straightforward script does)."""
    t = time.perf_counter()
    for path in (src, tgt):
        with Checkpoint.open(path) as c:
            refs = c.modules()
            for n in names:
                w = c.weight(refs[n]).float()
                torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", type=int, default=None, help="subsample N of the 264 adapted modules")
    p.add_argument("--ranks", type=int, nargs="+", default=[32, 320])
    p.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "lorax_bench_transfer"))
    p.add_argument("--skip_reference", action="store_true", help="do not time the full-SVD reference")
    args = p.parse_args(argv)

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads; work dir {work}")
    log("checkpoints (SD1.5 architecture, fp16, decaying spectra; target = drift 0.05, text encoder identical):")
    src, tgt = checkpoints(work)
    names = chosen_modules(src, args.modules)
    n_unet = sum(n.startswith("lora_unet_") for n in names)
    log(f"adapted modules: {len(names)} ({n_unet} UNet attn + {len(names) - n_unet} TE)"
        + (f", subsampled with --modules {args.modules}" if args.modules else ", all of them"))

    time_read(src, tgt, names)  # warm the OS page cache so both sides read from memory
    read = min(time_read(src, tgt, names) for _ in range(2))
    log(f"(b) read the needed tensors from both files: {read:.2f} s")
    t = time.perf_counter()
    for path in (src, tgt):
        with Checkpoint.open(path) as c:
            c.hashes()
    hashing = time.perf_counter() - t
    log(f"    hashing both files (sha256 for the output metadata, paid once per cold run): {hashing:.1f} s")
    ref = None
    if not args.skip_reference:
        ref = time_reference(src, tgt, names)
        log(f"(a) reference, full fp32 SVD of {len(names)} modules x 2 models: {ref:.1f} s")

    rows = []
    for rank in args.ranks:
        lora = make_lora(src, names, rank, work / f"lora_r{rank}.safetensors", work / "setup_svd_cache")
        cache = work / f"svd_cache_r{rank}"
        shutil.rmtree(cache, ignore_errors=True)
        out = work / f"out_r{rank}.safetensors"
        t = time.perf_counter()
        (rep,) = transfer(lora, src, tgt, out, svd_cache_dir=cache, overwrite=True, progress=False)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        transfer(lora, src, tgt, out, svd_cache_dir=cache, overwrite=True, progress=False)
        warm = time.perf_counter() - t
        s = rep.summary()
        svds = sum(1 for m in rep.modules if m.reason not in ("identical",))
        log(f"rank {rank}: cold {cold:.1f} s, warm {warm:.2f} s; {svds} modules projected (2 SVDs each), "
            f"{s['reasons'].get('identical', 0)} identical (copied, no SVD); kept {s['kept']}, "
            f"mean phi {s['mean_phi']:.3f}, energy kept {s['energy_kept']:.3f}")
        rows.append((rank, cold, warm))

    log("\nsummary (targets: cold <= 0.20 x reference; warm <= 3 x read)")
    log(f"{'rank':>5}  {'cold s':>8}  {'warm s':>8}  {'cold/ref':>9}  {'(cold-hash)/ref':>15}  {'warm/read':>9}")
    for rank, cold, warm in rows:
        cr = f"{cold / ref:.3f}" if ref else "-"
        cr2 = f"{(cold - hashing) / ref:.3f}" if ref else "-"
        log(f"{rank:>5}  {cold:>8.1f}  {warm:>8.2f}  {cr:>9}  {cr2:>15}  {warm / read:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
