"""The transfer with warm-started target bases (lorax/warm_bases.py through transfer/sides.py): the
output files equal the exact path's within the bases tolerance, warm bases get their own cache tag,
and a warm cache run reproduces the cold run's bytes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sd_scripts_lorax.formats.lora_file import read_lora
from sd_scripts_lorax.lorax import top_bases, warm_bases
from sd_scripts_lorax.transfer import sides
from sd_scripts_lorax.transfer.engine import transfer

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_transfer.py"
RANK = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny SD1 fp16 checkpoints with decaying spectra, the target drifted 5% (bench_transfer's recipe),
    and a LoRA-X adapter on the source's own bases over every attention module."""
    spec = importlib.util.spec_from_file_location("bench_transfer", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    work = tmp_path_factory.mktemp("warm_transfer")
    src, tgt = bench.checkpoints(work, "tiny")
    names = bench.chosen_modules(src, None)
    lora = bench.make_lora(src, names, RANK, work / "lora.safetensors", work / "setup_cache")
    return work, src, tgt, lora


def _run(setup, out_name: str, cache: str, warm: bool, monkeypatch) -> tuple[Path, list[bool]]:
    work, src, tgt, lora = setup
    used: list[bool] = []

    def pays(out: int, n: int, rank: int) -> bool:   # the tiny layers are below the size where it pays
        return warm and rank < min(out, n)

    def spy(w, rank, v):   # bases_warm_or_exact without its own size rule
        b = warm_bases.warm_top_bases(w, rank, v)
        used.append(b is not None)
        return (b, True) if b is not None else (top_bases(w, rank), False)

    monkeypatch.setattr(sides, "warm_start_pays", pays)
    monkeypatch.setattr(sides, "bases_warm_or_exact", spy)
    out = work / out_name
    transfer(lora, src, tgt, out, svd_cache_dir=work / cache, overwrite=True, progress=False)
    return out, used


def test_warm_output_matches_exact_path(setup, monkeypatch):
    exact_out, used_exact = _run(setup, "exact.safetensors", "cache_exact", False, monkeypatch)
    warm_out, used = _run(setup, "warm.safetensors", "cache_warm", True, monkeypatch)
    assert not used_exact
    assert used and sum(used) >= 0.8 * len(used), "the warm start should carry most drifted modules"
    e, w = read_lora(exact_out), read_lora(warm_out)
    assert sorted(e.modules) == sorted(w.modules)
    for name, me in e.modules.items():
        mw = w.modules[name]
        assert me.up.dtype == mw.up.dtype == torch.float16 and me.alpha == mw.alpha
        assert me.up.shape == mw.up.shape and me.down.shape == mw.down.shape
        # the factors themselves (same sign convention), to the fp16 storage and the 1e-4 bases tolerance
        assert torch.allclose(me.down.float(), mw.down.float(), atol=2e-3), name
        scale = float(me.up.float().abs().max())
        assert torch.allclose(me.up.float(), mw.up.float(), atol=2e-3 * scale + 1e-6), name
        de = me.up.float().flatten(1) @ me.down.float().flatten(1)
        dw = mw.up.float().flatten(1) @ mw.down.float().flatten(1)
        assert float((de - dw).norm()) <= 2e-3 * float(de.norm()) + 1e-7, name


def test_warm_entries_have_their_own_tag_and_warm_cache_reproduces(setup, monkeypatch):
    work = setup[0]
    first, used = _run(setup, "warm1.safetensors", "cache_tag", True, monkeypatch)
    assert any(used)
    again, used_again = _run(setup, "warm2.safetensors", "cache_tag", True, monkeypatch)
    assert not used_again, "a warm cache run computes no bases"
    assert first.read_bytes() == again.read_bytes()
    # the same modules through the exact path find no warm entry under "auto": they compute exact bases
    exact, used_exact = _run(setup, "exact2.safetensors", "cache_tag", False, monkeypatch)
    assert not used_exact
    assert (work / "cache_tag").is_dir()
