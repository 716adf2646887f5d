"""Benchmark of the training-free transfer on full-size SD1.5-architecture checkpoints.

Two fp16 single files (random weights with decaying spectra; the target derived from the source, a
fine-tune-like drift, text encoder bit-identical as in most fine-tunes), a LoRA-X adapter over all
264 adapted modules (192 UNet attention + 72 text encoder), and per rank (32 and 320):

- cold: a transfer with an empty SVD cache (includes hashing both models for the output metadata);
- warm: the same transfer again with the cache filled;
against
- (a) reference: full torch.linalg.svd in float32 of every adapted module of both models;
- (b) read: only reading the needed tensors from both files.

Targets: cold <= 1/5 of the reference; warm <= 3x the read time.

Read, cold and warm are each measured twice: "hot" (the files are in the OS page cache) and "disk"
(checkpoints, LoRA and SVD-cache files evicted from the page cache with posix_fadvise(DONTNEED)
right before the timed step). The reference is timed hot only: it is compute-bound.

    python benchmarks/bench_transfer.py [--modules N] [--ranks 32 320] [--repeats K] [--work_dir DIR]
                                        [--size tiny|full] [--skip_reference]

--modules N subsamples the adapted modules (evenly over the sorted names); the output says what was
measured. --repeats K reports the median of K runs of every timed step. The checkpoints (about 2 GB
each) are kept in --work_dir between runs. --size tiny runs the same steps on tiny fixtures (seconds;
for tests of this script, its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sd_scripts_lorax.formats.checkpoint import Checkpoint
from sd_scripts_lorax.testing.fixtures import derive_fixture, write_fixture
from sd_scripts_lorax.formats.lora_file import LoraModule, lorax_metadata, minimum_kohya_metadata, write_lora
from sd_scripts_lorax.lorax import lorax_factors, top_bases
from sd_scripts_lorax.cache.svd_cache import get_or_compute
from sd_scripts_lorax.transfer.engine import transfer

# posix_fadvise is Linux/POSIX only; without it the page-cache state cannot be controlled.
CAN_EVICT = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")
DEFAULT_RANKS = {"full": [32, 320], "tiny": [4, 8]}
_CHUNK = 16 * 2**20


def log(msg: str) -> None:
    print(msg, flush=True)


def load() -> str:
    """The 1/5/15-minute load averages, so a reader can judge how noisy the timings are."""
    if not hasattr(os, "getloadavg"):
        return "load average unavailable"
    a, b, c = os.getloadavg()
    return f"load average {a:.2f} {b:.2f} {c:.2f} on {os.cpu_count()} CPUs"


# ---------------------------------------------------------------- page cache


def _files(paths: Iterable[Path]) -> list[Path]:
    """The regular files of `paths` (folders expanded recursively; missing paths skipped)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            out.append(p)
    return out


def evict(paths: Iterable[Path]) -> None:
    """Drop the files' pages from the OS page cache, so their next read comes from disk.

    fdatasync first: DONTNEED skips dirty pages, and the LoRA and cache files were just written.
    It does not need root. Pages still mapped by a live process stay; our Checkpoints are closed.
    """
    for f in _files(paths):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: Iterable[Path]) -> None:
    """Read the files whole, so that they sit in the page cache (for the "hot" measurements)."""
    buf = bytearray(_CHUNK)
    for f in _files(paths):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def _time_pread(path: Path, offset: int, size: int) -> float:
    buf = bytearray(min(_CHUNK, size))
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        done = 0
        while done < size:
            fh.seek(offset + done)
            n = fh.readinto(memoryview(buf)[: min(len(buf), size - done)])
            if not n:
                break
            done += n
    return time.perf_counter() - t


def check_eviction(path: Path, sample: int = 128 * 2**20) -> tuple[float, float, int]:
    """Time a read of `sample` bytes from the middle of `path` right after evict() and again from
    the cache; evicts again afterwards. Returns (evicted s, cached s, bytes read)."""
    size = path.stat().st_size
    n = min(sample, size)
    offset = (size - n) // 2
    evict([path])
    disk = _time_pread(path, offset, n)
    cached = _time_pread(path, offset, n)
    evict([path])
    return disk, cached, n


# ---------------------------------------------------------------- setup (not timed)


def checkpoints(work: Path, size: str) -> tuple[Path, Path]:
    tag = "" if size == "full" else f"_{size}"
    src = work / f"sd15_decaying_fp16{tag}.safetensors"
    tgt = work / f"sd15_decaying_fp16{tag}_ft.safetensors"
    if not src.exists():
        t = time.perf_counter()
        write_fixture("sd1", "single_file", size, 0, src, dtype="fp16", spectrum="decaying")
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


# ---------------------------------------------------------------- the timed steps


def median_time(step: Callable[[], object], repeats: int, before: Callable[[], None] | None = None) -> float:
    """Median wall time of `step` over `repeats` runs; `before` runs untimed ahead of each."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def read_needed(src: Path, tgt: Path, names: Sequence[str]) -> None:
    """(b): read only the adapted modules' weights from both files."""
    with Checkpoint.open(src) as s, Checkpoint.open(tgt) as d:
        sr, dr = s.modules(), d.modules()
        for n in names:
            s.weight(sr[n])
            d.weight(dr[n])


def hash_both(src: Path, tgt: Path) -> None:
    for path in (src, tgt):
        with Checkpoint.open(path) as c:
            c.hashes()


def reference(src: Path, tgt: Path, names: Sequence[str]) -> None:
    """(a): full fp32 SVD of every adapted module of both models (what a straightforward script does)."""
    for path in (src, tgt):
        with Checkpoint.open(path) as c:
            refs = c.modules()
            for n in names:
                w = c.weight(refs[n]).float()
                torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", type=int, default=None, help="subsample N of the adapted modules (default: all)")
    p.add_argument("--ranks", type=int, nargs="+", default=None, help="default 32 320 (tiny: 4 8)")
    p.add_argument("--repeats", type=int, default=1, help="report the median of K runs of each timed step")
    p.add_argument("--size", choices=("full", "tiny"), default="full",
                   help="tiny: the same steps on tiny fixtures, to test this script")
    p.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "lorax_bench_transfer"))
    p.add_argument("--skip_reference", action="store_true", help="do not time the full-SVD reference")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.modules is not None and args.modules < 1:
        p.error("--modules must be >= 1")
    ranks = args.ranks or DEFAULT_RANKS[args.size]
    k = args.repeats

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    log(f"torch {torch.__version__}, {threads} threads; work dir {work}; {load()} (start)")
    log(f"checkpoints (SD1.5 architecture, {args.size} size, fp16, decaying spectra; "
        f"target = drift 0.05, text encoder identical):")
    src, tgt = checkpoints(work, args.size)
    names = chosen_modules(src, args.modules)
    n_unet = sum(n.startswith("lora_unet_") for n in names)
    n_all = len(chosen_modules(src, None))
    subsampled = args.modules is not None and len(names) < n_all
    scope = (f"SUBSAMPLED: {len(names)} of {n_all} modules (--modules {args.modules})" if subsampled
             else f"all {len(names)} modules")
    log(f"adapted modules: {len(names)} ({n_unet} UNet attn + {len(names) - n_unet} TE), "
        + (scope if subsampled else "all of them"))
    log(f"timings: median of {k} run(s) each")

    if CAN_EVICT:
        disk, cached, n = check_eviction(src)
        mb = n / 2**20
        verdict = ("eviction works" if disk > 3 * cached else
                   "WARNING: evicted read is not much slower than cached: 'disk' numbers may come from memory")
        log(f"page cache: {mb:.0f} MiB of {src.name} read in {disk:.3f} s after eviction "
            f"({mb / disk:.0f} MiB/s), {cached:.3f} s from cache ({mb / cached:.0f} MiB/s): {verdict}")
    else:
        log("page cache: os.posix_fadvise unavailable on this platform; cannot evict, reporting hot only")

    # Hot: files in the page cache. Disk: evicted right before the timed step.
    warm([src, tgt])
    read_hot = median_time(lambda: read_needed(src, tgt, names), k)
    read_disk = median_time(lambda: read_needed(src, tgt, names), k, lambda: evict([src, tgt])) if CAN_EVICT else None
    log(f"(b) read the needed tensors from both files: hot {read_hot:.3f} s, disk {_fmt(read_disk, '.3f')} s")
    warm([src, tgt])
    hash_hot = median_time(lambda: hash_both(src, tgt), k)
    hash_disk = median_time(lambda: hash_both(src, tgt), k, lambda: evict([src, tgt])) if CAN_EVICT else None
    log(f"    hashing both files (sha256 + addnet, as Checkpoint.hashes(); a cold transfer hashes once, "
        f"sha256 only, on background threads): "
        f"hot {hash_hot:.2f} s, disk {_fmt(hash_disk, '.2f')} s")
    ref = None
    if not args.skip_reference:
        warm([src, tgt])
        torch.linalg.svd(torch.randn(64, 64))  # LAPACK's one-off first-call set-up is not the reference's cost
        ref = median_time(lambda: reference(src, tgt, names), k)
        log(f"(a) reference, full fp32 SVD of {len(names)} modules x 2 models: {ref:.2f} s "
            f"(hot: it is compute-bound; {threads} torch threads)")

    rows = []
    for rank in ranks:
        lora = make_lora(src, names, rank, work / f"lora_r{rank}{'' if args.size == 'full' else '_' + args.size}"
                         ".safetensors", work / f"setup_svd_cache_{args.size}")
        cache = work / f"svd_cache_r{rank}_{args.size}"
        out = work / f"out_r{rank}_{args.size}.safetensors"
        reports = []

        def run() -> None:
            reports[:] = transfer(lora, src, tgt, out, svd_cache_dir=cache, overwrite=True, progress=False)

        def empty_cache() -> None:
            shutil.rmtree(cache, ignore_errors=True)

        def cold_hot_setup() -> None:
            empty_cache()
            warm([src, tgt, lora])

        def cold_disk_setup() -> None:
            empty_cache()
            evict([src, tgt, lora])

        # Order: hot cold, hot warm, then disk cold, disk warm; each step's setup puts the files in
        # the state it needs, so the order only saves re-reading.
        cold_hot = median_time(run, k, cold_hot_setup)
        rep = reports[0]
        warm_hot = median_time(run, k)
        cold_disk = warm_disk = None
        if CAN_EVICT:
            cold_disk = median_time(run, k, cold_disk_setup)  # leaves the cache filled for the warm runs
            warm_disk = median_time(run, k, lambda: evict([src, tgt, lora, cache]))
        s = rep.summary()
        projected = sum(1 for m in rep.modules if m.reason != "identical")
        log(f"rank {rank}: hot cold {cold_hot:.2f} s, warm {warm_hot:.2f} s; disk cold {_fmt(cold_disk, '.2f')} s, "
            f"warm {_fmt(warm_disk, '.2f')} s; {projected} modules projected "
            f"(one target SVD each; source bases from the LoRA-X file), "
            f"{s['reasons'].get('identical', 0)} identical (copied, no SVD); kept {s['kept']}, "
            f"mean phi {s['mean_phi']:.3f}, energy kept {s['energy_kept']:.3f}")
        rows.append((rank, cold_hot, warm_hot, cold_disk, warm_disk))

    log(f"\nsummary ({scope}; median of {k}; targets: cold <= 0.20 x reference; warm <= 3 x read)")
    log(f"reference {_fmt(ref, '.2f')} s (hot, compute-bound, {threads} threads); "
        f"read: hot {read_hot:.3f} s, disk {_fmt(read_disk, '.3f')} s (warm/read divides by the read of the same "
        f"column); hashing both models, part of every cold run: hot {hash_hot:.2f} s, disk {_fmt(hash_disk, '.2f')} s")
    log(f"{'':>5}  {'hot (files in page cache)':^40}  {'disk (evicted before each step)':^40}")
    head = f"{'cold s':>8}  {'warm s':>8}  {'cold/ref':>9}  {'warm/read':>9}"
    log(f"{'rank':>5}  {head}  {head}")
    for rank, ch, wh, cd, wd in rows:
        hot = (f"{ch:>8.2f}  {wh:>8.2f}  {_fmt(ch / ref if ref else None, '.3f'):>9}  "
               f"{wh / read_hot:>9.2f}")
        dsk = (f"{_fmt(cd, '.2f'):>8}  {_fmt(wd, '.2f'):>8}  "
               f"{_fmt(cd / ref if ref and cd is not None else None, '.3f'):>9}  "
               f"{_fmt(wd / read_disk if wd is not None and read_disk else None, '.2f'):>9}")
        log(f"{rank:>5}  {hot}  {dsk}")
    log(f"{load()} (end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
