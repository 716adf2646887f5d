"""Benchmark: LoRA-X network creation (cold / warm SVD cache) and a training step vs a plain LoRA.

Full-size SD1.5 UNet + text encoder with random weights, fp32 on CPU. Both adapters are measured in
the same run on the same model at the same rank, so the printed ratios are like for like:

    .venv/bin/python benchmarks/bench_network.py [--rank 320] [--repeats 3] [--latent 32]
                                                 [--cold-modules 0] [--threads N]

--cold-modules N (default 24) times the bases (cold, then from the warm cache) on N evenly spaced
targeted modules only, says so, and extrapolates by weight size; warm create_network of the whole
network is then timed on a cache of stand-in bases, and the training step uses random orthonormal
bases (neither speed depends on the bases' values). --cold-modules 0 times the whole
network for real: about 17 minutes of cold SVD on this machine's 2 busy cores at rank 320.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from sd_scripts_lorax.lorax import Bases
from sd_scripts_lorax.families.model_configs import build_models
from sd_scripts_lorax.network.layer import LoraXModule
from sd_scripts_lorax.network.lorax_network import (
    LoraXNetwork,
    compute_bases,
    create_network,
    find_targets,
    parse_options,
)
from sd_scripts_lorax.cache.svd_cache import get_many


class PlainLora(nn.Module):
    """A minimal kohya-style LoRA (for comparison only): y = W x + up(down(x)) * alpha / r."""

    def __init__(self, base: nn.Module, rank: int) -> None:
        super().__init__()
        w = base.weight
        r = min(rank, w.shape[0], w[0].numel())
        if isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(r, base.out_channels, 1, bias=False)
        else:
            self.down = nn.Linear(base.in_features, r, bias=False)
            self.up = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.normal_(self.up.weight, std=1e-4)  # non-zero so both factors get gradients
        self._base = [base]
        self._org = base.forward

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._org(x, *args, **kwargs) + self.up(self.down(x))

    def apply_to(self) -> None:
        self._base[0].forward = self.forward

    def restore(self) -> None:
        del self._base[0].forward


def _inputs(unet: nn.Module, latent: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, latent, latent, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([500]), ctx


class Stepper:
    """One adapter's training step on the shared UNet: patch, forward + backward + AdamW, unpatch."""

    def __init__(self, unet: nn.Module, modules: list[nn.Module], params: list[nn.Parameter], latent: int) -> None:
        self.unet, self.modules, self.params = unet, modules, params
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.inputs = _inputs(unet, latent)
        self.times: list[float] = []

    def step(self, timed: bool) -> None:
        for m in self.modules:
            m.apply_to()
        x, t, ctx = self.inputs
        start = time.perf_counter()
        out = self.unet(x, t, encoder_hidden_states=ctx).sample
        F.mse_loss(out, torch.zeros_like(out)).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if timed:
            self.times.append(time.perf_counter() - start)
        for m in self.modules:
            m.restore()

    def median(self) -> float:
        return sorted(self.times)[len(self.times) // 2]

    def state_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for s in self.opt.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))


def _time_warm_create(te: nn.Module, unet: nn.Module, targets: list, rank: int, repeats: int) -> list[float]:
    """Sorted wall times of create_network on the whole network from a warm cache.

    The cache is filled with stand-in bases of the right shapes (random, not SVDs), so this needs no
    17-minute cold run: the warm path (hash, read, check, build modules) does not depend on values.
    """
    g = torch.Generator().manual_seed(0)

    def stand_in(weights: list[torch.Tensor]) -> list[Bases]:
        out = []
        for w in weights:
            r = min(rank, w.shape[0], w[0].numel())
            out.append(Bases(torch.randn(w.shape[0], r, generator=g), torch.rand(r, generator=g),
                             torch.randn(w[0].numel(), r, generator=g)))
        return out

    times = []
    with tempfile.TemporaryDirectory() as cache:
        for t in targets:
            w = t.base.weight
            get_many([w], t.rank, cache, lambda missing, w=w: stand_in([w]))
        for _ in range(repeats):
            start = time.perf_counter()
            network = create_network(1.0, rank, None, None, te, unet, svd_cache_dir=cache)
            network.resolve_bases()  # deferred to first use since issue 10: time what a launch pays
            times.append(time.perf_counter() - start)
            del network
    return sorted(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=3, help="timed training steps per adapter (median reported)")
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = a 256 px image)")
    ap.add_argument("--cold-modules", type=int, default=24,
                    help="time the bases on this many evenly spaced modules and extrapolate (0 = all: ~17 min here)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--create-repeats", type=int, default=3,
                    help="warm create_network timings of the whole network (median reported)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rank {args.rank}, "
          f"latent {args.latent}x{args.latent}, batch 1, fp32, CPU")
    t0 = time.perf_counter()
    models = build_models("sd1", "full", seed=0, with_vae=False)
    unet, te = models.unet, models.text_encoders[0]
    for m in (unet, te):
        m.requires_grad_(False)
    print(f"built full SD1.5 UNet + TE (random weights) in {time.perf_counter() - t0:.1f} s")

    options = parse_options(args.rank, None, None, {})
    targets = find_targets(te, unet, options.rank, None)
    if args.cold_modules:
        step = max(1, len(targets) // args.cold_modules)
        timed = targets[::step][:args.cold_modules]
        share = sum(t.base.weight.numel() for t in timed) / sum(t.base.weight.numel() for t in targets)
        scope = f"SUBSAMPLED {len(timed)} of {len(targets)} modules ({100 * share:.1f}% of the weights)"
    else:
        timed, share, scope = targets, 1.0, f"all {len(targets)} modules"
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        compute_bases(timed, cache_dir=cache)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        compute_bases(timed, cache_dir=cache)  # what create_network does on a second run
        warm = time.perf_counter() - start
        if args.cold_modules:
            warm_create = _time_warm_create(te, unet, targets, args.rank, args.create_repeats)
            network = LoraXNetwork(targets, options, lazy=True)  # bases come below, not timed
        else:
            start = time.perf_counter()
            network = create_network(1.0, args.rank, None, None, te, unet, svd_cache_dir=cache)
            network.resolve_bases()
            print(f"create_network, warm cache, whole network: {time.perf_counter() - start:.1f} s")
    print(f"bases, {scope}: cold {cold:.1f} s (incl. writing the cache), warm cache {warm:.1f} s "
          f"(hashing + loading), warm/cold {warm / cold:.3f}")
    if args.cold_modules:
        print(f"  extrapolated by weight size to all modules: cold ~{cold / share:.0f} s, warm ~{warm / share:.0f} s")
        print(f"create_network, warm cache, whole network ({len(targets)} modules, cache of stand-in bases): "
              f"median {warm_create[len(warm_create) // 2]:.2f} s of {[round(t, 2) for t in warm_create]}")
        # The step time does not depend on the bases' values: random orthonormal ones are used there.
        for t in targets:
            if t.part != "unet":
                continue
            w = t.base.weight
            r = min(t.rank, w.shape[0], w[0].numel())
            bases = SimpleNamespace(u=torch.linalg.qr(torch.randn(w.shape[0], r))[0],
                                    v=torch.linalg.qr(torch.randn(w[0].numel(), r))[0])
            network.unet_loras.append(LoraXModule(t.lora_name, t.base, bases))
        network._built = True
        print("  (step timing below uses random orthonormal bases for the UNet modules)")

    network.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    for m in network.unet_loras:
        m.restore()  # the steppers patch and unpatch around each step
    lx_params = [m.d for m in network.unet_loras]
    with torch.no_grad():
        for p in lx_params:
            p.normal_(std=1e-3)
    lorax = Stepper(unet, network.unet_loras, lx_params, args.latent)
    plain_mods = [PlainLora(t.base, args.rank) for t in targets if t.part == "unet"]
    plain = Stepper(unet, plain_mods, [p for m in plain_mods for p in m.parameters()], args.latent)
    # Interleaved, so that a change in machine load hits both alike; the first round warms up.
    for i in range(args.repeats + 1):
        lorax.step(timed=i > 0)
        plain.step(timed=i > 0)
    lx_time, pl_time = lorax.median(), plain.median()
    lx_count, pl_count = sum(p.numel() for p in lorax.params), sum(p.numel() for p in plain.params)
    lx_state, pl_state = lorax.state_bytes(), plain.state_bytes()

    print(f"UNet training step (forward + backward + AdamW), median of {args.repeats}, interleaved:")
    print(f"  LoRA-X     {lx_time:7.2f} s  trainable {lx_count:>12,}  optimizer state {lx_state / 2**20:9.2f} MiB")
    print(f"  plain LoRA {pl_time:7.2f} s  trainable {pl_count:>12,}  optimizer state {pl_state / 2**20:9.2f} MiB")
    print(f"  ratio LoRA-X / plain: time {lx_time / pl_time:.2f}x, trainable {lx_count / pl_count:.5f}x, "
          f"optimizer state {lx_state / pl_state:.5f}x")


if __name__ == "__main__":
    main()
