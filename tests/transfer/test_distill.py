"""--method distill: prompts, the hooked adapter against a dense computation, determinism, identical
models, the teacher cache, and bad input (one line, exit 2, no file). Tiny fixtures, a few steps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from sd_scripts_lorax.errors import LoraxInputError
from sd_scripts_lorax.formats.checkpoint import Checkpoint
from sd_scripts_lorax.formats.lora_file import (LoraModule, lorax_metadata, minimum_kohya_metadata, read_lora,
                                                write_lora)
from sd_scripts_lorax.lorax import lorax_factors, top_bases
from sd_scripts_lorax.transfer.distill import prompts as P
from sd_scripts_lorax.transfer.distill.adapter import Adapter, target_u
from sd_scripts_lorax.transfer.distill.options import DistillOptions
from sd_scripts_lorax.transfer.distill.run import distill_transfer, loss_plot_path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TAGS = {"10_style": {"zq style": 6, "a red circle": 2, "a blue square": 2, "a tree": 2}}
FAST = DistillOptions(steps=4, batch_size=4, samples=4, draws=1, sample_steps=2, keep_samples=2, keep_weight=1.0)


def lorax_file(ckpt: Path, out: Path, tags: dict | None = TAGS, seed: int = 0, only: int = 12) -> Path:
    """A small LoRA-X file (rank 4, random d) over the first `only` UNet attn modules, with kohya tags."""
    g = torch.Generator().manual_seed(seed)
    mods = []
    with Checkpoint.open(ckpt) as c:
        refs = [r for _, r in sorted(c.modules().items()) if r.group == "attn" and r.part == "unet"][:only]
        for ref in refs:
            b = top_bases(c.weight(ref).float(), 4)
            up, down = lorax_factors(b, b.s * 0.3 * torch.randn(b.rank, generator=g), ref.shape)
            mods.append(LoraModule(ref.lora_name, down, up, float(b.rank)))
        meta = {**minimum_kohya_metadata(c.family, "networks.lora_x", [4], [4.0]), **lorax_metadata(4, c.name, "0")}
    if tags is not None:
        meta["ss_tag_frequency"] = json.dumps(tags)
    return write_lora(out, mods, meta, overwrite=True)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one torch thread is much faster than two on a shared machine (as the CLI's OMP_NUM_THREADS=1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sd1_lora(tmp_path_factory, tiny_sd1_diffusers) -> Path:
    return lorax_file(tiny_sd1_diffusers, tmp_path_factory.mktemp("lora") / "style.safetensors")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def run_distill(lora, src, tgt, out, opts=FAST, **kw):
    return distill_transfer(lora, src, tgt, out, opts, overwrite=True, progress=False, log=lambda s: None, **kw)


# ---------------------------------------------------------------- prompts

def test_prompts_from_tags_split_trigger_and_content():
    sets = P.from_metadata({"ss_tag_frequency": json.dumps(TAGS)}, "x.safetensors")
    assert sets.adapter[0] == "zq style"
    assert set(sets.adapter[1:]) == {"zq style, a red circle", "zq style, a blue square", "zq style, a tree"}
    assert set(sets.identity) == {"a red circle", "a blue square", "a tree"}
    assert P.from_metadata({}, "x") is None and P.from_metadata({"ss_tag_frequency": "{}"}, "x") is None
    lines = P.from_lines(["zq style, a cat", "zq style, a dog", "", "# comment"], "f")
    assert lines.adapter == ("zq style, a cat", "zq style, a dog") and lines.identity == ("a cat", "a dog")
    with pytest.raises(LoraxInputError, match="--prompts FILE"):
        P.resolve({}, "lora.safetensors", None)


# ---------------------------------------------------------------- the adapter, against dense weights

def test_adapter_hooks_equal_dense_update_and_d_moves_only_the_diagonal():
    torch.manual_seed(0)
    lin, conv = nn.Linear(12, 10), nn.Conv2d(6, 8, 3, padding=1)
    mods, dense = [], {}
    for name, layer in (("lin", lin), ("conv", conv)):
        b = top_bases(layer.weight.detach(), 3)
        c = torch.randn(3, 3)  # a full core, as Eq. 3 gives
        up = (b.u @ c)
        down = b.v.T
        shape_down = (3, *layer.weight.shape[1:]) if layer.weight.dim() == 4 else (3, layer.weight.shape[1])
        shape_up = (up.shape[0], 3, 1, 1) if layer.weight.dim() == 4 else (up.shape[0], 3)
        mods.append(LoraModule(name, down.reshape(shape_down), up.reshape(shape_up), 3.0))
        dense[name] = (b, c)
    ad = Adapter({"lin": lin, "conv": conv}, mods, trainable=["lin", "conv"], mode="d")
    delta = {s.name: torch.randn(3) for s in ad.slots}
    with torch.no_grad():
        for s in ad.slots:
            s.param.copy_(delta[s.name])
    x, xc = torch.randn(5, 12), torch.randn(2, 6, 7, 7)
    for name, layer, inp in (("lin", lin, x), ("conv", conv, xc)):
        b, c = dense[name]
        dw = (b.u @ (c + torch.diag(delta[name])) @ b.v.T).reshape(layer.weight.shape)
        want = (nn.functional.linear(inp, layer.weight + dw, layer.bias) if name == "lin" else
                nn.functional.conv2d(inp, layer.weight + dw, layer.bias, padding=1))
        torch.testing.assert_close(layer(inp), want, rtol=1e-4, atol=1e-5)
        # U_t recovered from W and V_t is the top-r U (same signs)
        torch.testing.assert_close(target_u(layer.weight, b.v.T), b.u, rtol=1e-4, atol=1e-5)
    out = {m.name: m for m in ad.modules({m.name: m for m in mods})}
    b, c = dense["lin"]
    torch.testing.assert_close(out["lin"].up, b.u @ (c + torch.diag(delta["lin"])), rtol=1e-5, atol=1e-6)
    ad.enabled = False
    torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight, lin.bias))
    ad.remove()


# ---------------------------------------------------------------- the method end to end (library)

def test_deterministic_under_seed_and_improves_the_match(tmp_path, sd1_lora, tiny_sd1_diffusers,
                                                         tiny_sd1_diffusers_derived):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    # matching only (keep_weight 0), so the held-out match error must fall
    opts = DistillOptions(**{**FAST.__dict__, "steps": 20, "lr": 1e-2, "samples": 8, "draws": 2, "keep_weight": 0.0})
    rep, d = run_distill(sd1_lora, tiny_sd1_diffusers, tiny_sd1_diffusers_derived, a, opts)
    run_distill(sd1_lora, tiny_sd1_diffusers, tiny_sd1_diffusers_derived, b, opts)
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert d.trained_modules > 0 and len(d.curve) == 20
    assert d.match_error_after < d.match_error_before  # the fit reduces the held-out match error
    meta = read_lora(a).metadata
    assert meta["lorax.method"] == "distill" and meta["lorax.distill_seed"] == "0"
    assert meta["lorax.distill_steps"] == "20" and json.loads(meta["lorax.distill_prompts"])[0] == "zq style"
    assert float(meta["lorax.distill_match_error"]) == pytest.approx(d.match_error_after, rel=1e-5)
    assert meta["lorax.target_model_name"] == tiny_sd1_diffusers_derived.name
    # the output is a LoRA-X of the target: down = V_t^T (orthonormal rows), up = U_t core
    with Checkpoint.open(tiny_sd1_diffusers_derived) as c:
        ref = c.modules()[rep.kept[0].name]
        bt = top_bases(c.weight(ref).float(), 4)
    m = read_lora(a).modules[rep.kept[0].name]
    down = m.down.float().reshape(4, -1)
    torch.testing.assert_close(down, bt.v.T, atol=1e-3, rtol=1e-3)
    up = m.up.float().reshape(m.up.shape[0], 4)
    torch.testing.assert_close(bt.u @ (bt.u.T @ up), up, atol=1e-3, rtol=1e-3)
    # micro-batches (with the identity term too): the same gradients, so the same file up to rounding
    mb, mb1 = tmp_path / "mb.safetensors", tmp_path / "mb1.safetensors"
    keep = {**opts.__dict__, "keep_weight": 0.5, "steps": 6}
    run_distill(sd1_lora, tiny_sd1_diffusers, tiny_sd1_diffusers_derived, mb, DistillOptions(**keep))
    run_distill(sd1_lora, tiny_sd1_diffusers, tiny_sd1_diffusers_derived, mb1,
                DistillOptions(**{**keep, "micro_batch": 1}))
    tm, tm1 = tensors(mb), tensors(mb1)
    for k in tm:
        torch.testing.assert_close(tm1[k].float(), tm[k].float(), atol=2e-3, rtol=2e-3)
    # another seed, another result
    c_ = tmp_path / "c.safetensors"
    run_distill(sd1_lora, tiny_sd1_diffusers, tiny_sd1_diffusers_derived, c_,
                DistillOptions(**{**opts.__dict__, "seed": 3}))
    tc = tensors(c_)
    assert any(not torch.equal(ta[k], tc[k]) for k in ta if k.endswith("lora_up.weight"))


def test_identical_source_and_target_leave_the_adapter_unchanged(tmp_path, sd1_lora, tiny_sd1_diffusers):
    twin = tmp_path / "twin"
    shutil.copytree(tiny_sd1_diffusers, twin)
    out = tmp_path / "out.safetensors"
    _, d = run_distill(sd1_lora, tiny_sd1_diffusers, twin, out)
    src, got = read_lora(sd1_lora).modules, read_lora(out).modules
    assert set(src) == set(got)
    def dense(m):
        return m.up.float().reshape(m.up.shape[0], -1) @ m.down.float().reshape(m.rank, -1) * m.scale

    for n in src:
        torch.testing.assert_close(dense(got[n]), dense(src[n]), rtol=1e-3, atol=1e-6)
    assert d.match_error_after == pytest.approx(0.0, abs=1e-6)


def test_teacher_cache_reused_and_invalidated(tmp_path, tiny_sd1_diffusers, tiny_sd1_diffusers_derived):
    lora = lorax_file(tiny_sd1_diffusers, tmp_path / "l.safetensors")
    cache = tmp_path / "cache"
    out = tmp_path / "o.safetensors"
    _, d1 = run_distill(lora, tiny_sd1_diffusers, tiny_sd1_diffusers_derived, out, svd_cache_dir=cache)
    entries = sorted((cache / "distill").glob("*.safetensors"))
    assert not d1.teacher_cached and len(entries) == 2  # the teacher's set and the target's identity set
    first = tensors(out)
    _, d2 = run_distill(lora, tiny_sd1_diffusers, tiny_sd1_diffusers_derived, out, svd_cache_dir=cache)
    assert d2.teacher_cached
    second = tensors(out)
    assert all(torch.equal(first[k], second[k]) for k in first)  # the cache gives the same result
    # another adapter in the same file: a new teacher set
    lorax_file(tiny_sd1_diffusers, lora, seed=5)
    _, d3 = run_distill(lora, tiny_sd1_diffusers, tiny_sd1_diffusers_derived, out, svd_cache_dir=cache)
    assert not d3.teacher_cached and len(list((cache / "distill").glob("*.safetensors"))) == 3
    # other settings: a new set; a corrupt entry: recomputed, not an error
    for e in (cache / "distill").glob("*.safetensors"):
        e.write_bytes(b"not a safetensors file")
    _, d4 = run_distill(lora, tiny_sd1_diffusers, tiny_sd1_diffusers_derived, out, svd_cache_dir=cache)
    assert not d4.teacher_cached


# ---------------------------------------------------------------- the command line

def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "transfer_lorax.py"), "--no_progress", *map(str, args)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)


FAST_FLAGS = ["--steps", "3", "--batch_size", "4", "--distill_samples", "4", "--distill_draws", "1",
              "--distill_sample_steps", "2", "--keep_samples", "2", "--keep_weight", "1"]


def refused(res, *words):
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_cli_happy_path_report_and_plots(tmp_path, sd1_lora, tiny_sd1_diffusers, tiny_sd1_diffusers_derived):
    out, rep, plot = tmp_path / "o.safetensors", tmp_path / "r.json", tmp_path / "p.png"
    res = cli("--method", "distill", "--lora", sd1_lora, "--source_model", tiny_sd1_diffusers, "--target_model",
              tiny_sd1_diffusers_derived, "--save_to", out, "--report", rep, "--plot", plot, *FAST_FLAGS)
    assert res.returncode == 0, res.stderr
    assert "held-out match error" in res.stdout
    doc = json.loads(rep.read_text())
    assert doc["summary"]["method"] == "distill" and len(doc["distill"]["curve"]) == 3
    assert plot.is_file() and loss_plot_path(plot).is_file() and loss_plot_path(plot).name == "p_loss.png"
    assert read_lora(out).metadata["lorax.method"] == "distill"


def test_cli_bad_inputs_one_line_no_file(tmp_path, tiny_sd1_diffusers, tiny_sd1_diffusers_derived,
                                         tiny_sdxl_diffusers):
    out = tmp_path / "o.safetensors"
    base = ["--method", "distill", "--source_model", tiny_sd1_diffusers, "--save_to", out, *FAST_FLAGS]
    untagged = lorax_file(tiny_sd1_diffusers, tmp_path / "untagged.safetensors", tags=None)
    refused(cli(*base, "--lora", untagged, "--target_model", tiny_sd1_diffusers_derived),
            "untagged.safetensors", "--prompts FILE")
    tagged = lorax_file(tiny_sd1_diffusers, tmp_path / "tagged.safetensors")
    no_te = tmp_path / "no_te"
    shutil.copytree(tiny_sd1_diffusers_derived, no_te)
    shutil.rmtree(no_te / "text_encoder")
    refused(cli(*base, "--lora", tagged, "--target_model", no_te), "no_te", "text encoder")
    xl = lorax_file(tiny_sdxl_diffusers, tmp_path / "xl.safetensors")
    refused(cli(*base, "--lora", xl, "--target_model", tiny_sd1_diffusers_derived), "xl.safetensors")
    refused(cli("--lora", tagged, "--source_model", tiny_sd1_diffusers, "--target_model",
                tiny_sd1_diffusers_derived, "--save_to", out, "--steps", "5"), "--steps", "distill")
    # outputs are checked like the projection's (transfer/outputs.py): no clash with each other or an input
    refused(cli(*base, "--lora", tagged, "--target_model", tiny_sd1_diffusers_derived, "--report", out),
            "--save_to and --report", "same file")
    refused(cli("--method", "distill", "--source_model", tiny_sd1_diffusers, "--lora", tagged, "--target_model",
                tiny_sd1_diffusers_derived, "--save_to", tagged, "--overwrite", *FAST_FLAGS),
            "tagged.safetensors", "--lora file")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "no_te", "tagged.safetensors", "untagged.safetensors", "xl.safetensors"]
