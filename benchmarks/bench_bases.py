"""Time top-r bases: exact vs gram vs randomized vs batched gram, on SD1.5 layer shapes.

Usage: python benchmarks/bench_bases.py [--ranks 32 320] [--repeats 3] [--device cpu] [--batch 4] [--warm]
Prints, per shape and rank, the median seconds per matrix and the ratio against "exact" measured in
the same run, plus the projector error of each method against exact (||P - P_exact||_F / sqrt(r)).

--warm instead times the warm start (lorax/warm_bases.py) against "gram" on a transfer-like pair: a
fp16 source with a decaying spectrum and its 5% drift (bench_transfer's recipe); the start is the
source's top-r V rounded to fp16 (what a LoRA-X file stores). It prints gram/warm (higher: the warm
start is faster), whether the certificate held, the error against gram, and what `warm_start_pays`
says for the shape, so that rule can be checked against the measurement.

--mixed instead times the CPU gram method's float32 start (lorax/mixed_gram.py) against its float64
path, on one thread, on SD1.5 shapes with a fresh-init (flat) and a realistic spectrum: float64 / mixed
(higher: mixed is faster), whether the certificate held, and the error between the two.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from sd_scripts_lorax.lorax import bases as bases_module
from sd_scripts_lorax.lorax import top_bases, top_bases_batched
from sd_scripts_lorax.lorax.mixed_gram import mixed_pays, top_eigh_mixed
from sd_scripts_lorax.lorax.lapack import serial_blas
from sd_scripts_lorax.lorax.warm_bases import warm_start_pays, warm_top_bases
from sd_scripts_lorax.testing.fixture_math import decaying_matrix, drift_tensor

# (out, in*kh*kw) of SD1.5 layers: attention q/k/v/out, cross-attn k/v (in 768), GEGLU ff.net.0 (2560x320
# at level 0 is ff_net_0 out x in), ff.net.2 (1280x5120), a 3x3 conv (320 x 320*9)
SHAPES = [(320, 320), (640, 640), (1280, 1280), (320, 768), (2560, 320), (1280, 5120), (320, 2880)]


def realistic(out: int, n: int, seed: int) -> torch.Tensor:
    """A weight with a slowly decaying spectrum, like trained SD layers (no gap at r)."""
    g = torch.Generator().manual_seed(seed)
    m = min(out, n)
    w = torch.randn(out, n, generator=g) / math.sqrt(n)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    s = torch.linspace(1.0, 0.05, m) ** 2
    return (u * s) @ vh


def fresh_init(out: int, n: int, seed: int) -> torch.Tensor:
    """A freshly initialised layer (uniform, Kaiming-like scale): a flat top spectrum, the hard case."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(out, n, generator=g) * 2 - 1) / math.sqrt(n)


def mixed_table(args) -> None:
    shapes = [(768, 768), (768, 3072), (3072, 768), (1280, 1280), (10240, 1280), (1280, 5120), (640, 640)]
    print(f"{'shape':>12} {'r':>4} {'spectrum':>9} {'float64 s':>10} {'mixed s':>9} {'x':>6} {'cert':>5} {'err':>9}")
    float64_only = lambda m, big, r: False  # noqa: E731
    torch.set_num_threads(1)
    for out, n in shapes:
        for name, make in (("init", fresh_init), ("realistic", realistic)):
            w = make(out, n, 0)
            for r in args.ranks:
                bases_module.mixed_pays = float64_only
                t64, b64 = timed(lambda: top_bases(w, r, "gram"), args.repeats, torch.device("cpu"))
                bases_module.mixed_pays = mixed_pays
                tmix, bmix = timed(lambda: top_bases(w, r, "gram"), args.repeats, torch.device("cpu"))
                m, big = min(out, n), max(out, n)
                with serial_blas():
                    cert = mixed_pays(m, big, r) and top_eigh_mixed(w, r, out <= n) is not None
                print(f"{f'{out}x{n}':>12} {r:>4} {name:>9} {t64:10.4f} {tmix:9.4f} {t64 / tmix:6.2f} "
                      f"{'yes' if cert else 'no':>5} {proj_err(bmix.u, b64.u):9.1e}")
    print("x = float64 time / mixed time (higher: mixed is faster), one thread; cert = the float32 start was"
          " certified (else the float64 path ran after it, or it was not tried); err = projector distance")


def timed(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def proj_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a @ a.T - b @ b.T).norm() / math.sqrt(a.shape[1]))


def warm_table(args, device: torch.device) -> None:
    """gram vs warm start on drifted pairs (see the module docstring)."""
    print(f"{'shape':>12} {'r':>4} {'gram s':>9} {'warm s':>9} {'gram/warm':>9} {'held':>5} {'err':>9} {'pays':>5}")
    for out, n in SHAPES:
        g = torch.Generator().manual_seed(out + n)
        src = decaying_matrix(out, n, g).half()
        tgt = drift_tensor(src, 0.05, f"{out}x{n}", 1).to(device)
        for rank in args.ranks:
            r = min(rank, out, n)
            if r >= min(out, n):
                continue
            start = top_bases(src, r).v.half().float().to(device)
            with serial_blas():  # as the transfer's workers run: one BLAS thread
                t_gram, ref = timed(lambda: top_bases(tgt, r, "gram"), args.repeats, device)
                t_warm, b = timed(lambda: warm_top_bases(tgt, r, start), args.repeats, device)
            err = proj_err(b.v.cpu(), ref.v.cpu()) if b is not None else float("nan")
            print(f"{f'{out}x{n}':>12} {r:>4} {t_gram:9.4f} {t_warm:9.4f} {t_gram / t_warm:9.2f} "
                  f"{str(b is not None):>5} {err:9.1e} {str(warm_start_pays(out, n, r)):>5}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 320])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="stack size for the batched timing")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warm", action="store_true", help="time the warm start against gram on drifted pairs")
    ap.add_argument("--mixed", action="store_true", help="time gram's float32 start against its float64 path")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.mixed:
        print(f"torch {torch.__version__}, one thread, repeats {args.repeats} (median)")
        mixed_table(args)
        return
    if args.warm:
        print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, repeats {args.repeats}")
        warm_table(args, device)
        return
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"repeats {args.repeats} (median), batch {args.batch}")
    header = (f"{'shape':>12} {'r':>4} {'exact s':>9} {'gram s':>9} {'x':>6} {'rand s':>9} {'x':>6} "
              f"{'batched s':>10} {'x':>6} {'err gram':>9} {'err rand':>9}")
    print(header)
    for out, n in SHAPES:
        ws = torch.stack([realistic(out, n, seed) for seed in range(args.batch)]).to(device)
        w = ws[0]
        for rank in args.ranks:
            r = min(rank, out, n)
            t_exact, e = timed(lambda: top_bases(w, r, "exact"), args.repeats, device)
            t_gram, g = timed(lambda: top_bases(w, r, "gram"), args.repeats, device)
            t_rand, rz = timed(lambda: top_bases(w, r, "randomized"), args.repeats, device)
            t_batch, _ = timed(lambda: top_bases_batched(ws, r, "gram"), args.repeats, device)
            t_batch /= args.batch
            full = r == min(out, n)  # the full-rank projector is the identity: compare values instead
            err_g = float((g.s - e.s).abs().max() / e.s[0]) if full else proj_err(g.u.cpu(), e.u.cpu())
            err_r = float((rz.s - e.s).abs().max() / e.s[0]) if full else proj_err(rz.u.cpu(), e.u.cpu())
            print(f"{f'{out}x{n}':>12} {r:>4} {t_exact:9.4f} {t_gram:9.4f} {t_exact / t_gram:6.2f} "
                  f"{t_rand:9.4f} {t_exact / t_rand:6.2f} {t_batch:10.4f} {t_exact / t_batch:6.2f} "
                  f"{err_g:9.1e} {err_r:9.1e}")
    print("x = exact time / method time (higher is faster); batched = gram on the stack, per matrix;"
          " err = projector error vs exact (singular-value error when r is full)")


if __name__ == "__main__":
    main()
