"""Time top-r bases: exact vs gram vs randomized vs batched gram, on SD1.5 layer shapes.

Usage: python benchmarks/bench_bases.py [--ranks 32 320] [--repeats 3] [--device cpu] [--batch 4]
                                        [--warm | --mixed | --kohya]
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

--kohya instead times the whole layer set networks.lora_x computes on a first kohya launch (SD1.5:
72 text-encoder and 192 UNet layers) at --ranks[0] (4 by default there), freshly initialised (the
flat spectrum of bench_kohya's random checkpoint), on one thread: per shape, the seconds of the
bases call, of its dense LAPACK part alone (the float32 Gram by ssyrk and the eigensolver ssyevr:
the floor of any method that needs a dense eigensolve), and the projector error a block Krylov
iteration on the same float32 Gram (no dense eigensolve) still has after as many block products as
fit in the eigensolver's time. Totals are over the layer counts.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from sd_scripts_lorax.lorax import bases as bases_module
from sd_scripts_lorax.lorax import top_bases, top_bases_batched
from sd_scripts_lorax.lorax.mixed_gram import mixed_pays, oversample, top_eigh_mixed
from sd_scripts_lorax.lorax.lapack import gram_upper, serial_blas, top_eigh
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


def sd15_first_launch() -> list[tuple[int, int, int]]:
    """(out, in, count) of the layers networks.lora_x targets on SD1.5 (kohya's defaults, conv_dim unset)."""
    layers = [(768, 768, 48), (3072, 768, 12), (768, 3072, 12)]      # CLIP-L: q, k, v, out; fc1; fc2
    for c, blocks in ((320, 5), (640, 5), (1280, 6)):                   # transformer blocks per width
        # attn1 q/k/v/out, attn2 q/out, proj_in/out (1x1); attn2 k/v (from 768); GEGLU in; ff out
        layers += [(c, c, 8 * blocks), (c, 768, 2 * blocks), (8 * c, c, blocks), (c, 4 * c, blocks)]
    return layers


def block_krylov_error(g: torch.Tensor, k: int, budget_s: float, exact_top: torch.Tensor) -> tuple[int, float]:
    """(block products, projector error of the top r) of a block Krylov iteration (block k, full
    reorthogonalisation, float32) on the Gram g, run for `budget_s` seconds."""
    r = exact_top.shape[1]
    blocks = [torch.linalg.qr(torch.randn(g.shape[0], k, generator=torch.Generator().manual_seed(0)))[0]]
    t0, steps = time.perf_counter(), 0
    while True:
        y = g @ blocks[-1]
        basis = torch.cat(blocks, 1)
        for _ in range(2):
            y = y - basis @ (basis.T @ y)
        blocks.append(torch.linalg.qr(y)[0])
        steps += 1
        if time.perf_counter() - t0 >= budget_s or len(blocks) * k >= g.shape[0] // 2:
            break
    basis = torch.cat(blocks, 1).double()
    _, c = torch.linalg.eigh(basis.T @ (g.double() @ basis))
    top = basis @ c[:, -r:]
    return steps, proj_err(top, exact_top)


def kohya_table(args) -> None:
    r = args.ranks[0]
    torch.set_num_threads(1)
    print(f"{'shape':>11} {'count':>5} {'bases s':>8} {'LAPACK s':>9} {'share':>6} {'Krylov steps':>12} "
          f"{'Krylov err':>10}")
    tot_all = tot_lapack = 0.0
    for out, n, count in sd15_first_launch():
        w = fresh_init(out, n, 0)
        small_side_is_u = out <= n
        m, big = min(out, n), max(out, n)
        k = min(m - 1, r + oversample(r, m, big))
        with serial_blas():
            t_all, b = timed(lambda: top_bases(w, r, "gram"), args.repeats, torch.device("cpu"))
            t_gram, g = timed(lambda: gram_upper(w.numpy(), small_side_is_u), args.repeats, torch.device("cpu"))
            t_eig, _ = timed(lambda: top_eigh(g.copy(order="F"), k), args.repeats, torch.device("cpu"))
            full = torch.from_numpy(g.T).tril()
            full = full + full.tril(-1).T
            steps, err = block_krylov_error(full, k, t_eig, (b.u if small_side_is_u else b.v).double())
        tot_all += count * t_all
        tot_lapack += count * (t_gram + t_eig)
        print(f"{f'{out}x{n}':>11} {count:>5} {t_all:8.4f} {t_gram + t_eig:9.4f} {(t_gram + t_eig) / t_all:6.2f} "
              f"{steps:>12} {err:10.1e}")
    print(f"total over {sum(c for *_, c in sd15_first_launch())} layers, one thread: bases {tot_all:.2f} s, "
          f"of which dense LAPACK {tot_lapack:.2f} s ({100 * tot_lapack / tot_all:.0f} %); rank {r}")
    print("LAPACK = float32 ssyrk + ssyevr (top k); Krylov err = projector error after block products worth the"
          " eigensolver's time (the certificate needs <= 5e-5)")


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
    ap.add_argument("--ranks", type=int, nargs="+", default=None, help="default 32 320 (--kohya: 4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="stack size for the batched timing")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warm", action="store_true", help="time the warm start against gram on drifted pairs")
    ap.add_argument("--mixed", action="store_true", help="time gram's float32 start against its float64 path")
    ap.add_argument("--kohya", action="store_true", help="time the SD1.5 first-launch layer set and its LAPACK floor")
    args = ap.parse_args()
    args.ranks = args.ranks or ([4] if args.kohya else [32, 320])
    device = torch.device(args.device)
    if args.kohya:
        print(f"torch {torch.__version__}, one thread, repeats {args.repeats} (median)")
        kohya_table(args)
        return
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
