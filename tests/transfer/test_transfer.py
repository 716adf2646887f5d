"""transfer.py and transfer_report.py: the pipeline on tiny fixtures, and the report (summary, table, JSON, plot)."""

from __future__ import annotations

import json
import math

import pytest

from sd_scripts_lorax.transfer.report import (
    BELOW_THRESHOLD,
    FILTERED,
    IDENTICAL,
    MISSING_IN_TARGET,
    TRANSFERRED,
    ModuleResult,
    TransferReport,
    format_table,
    heatmap_grid,
    plot_heatmap,
    split_block,
    write_json,
)


def _report(plain: bool = False) -> TransferReport:
    r = TransferReport("in.safetensors", "src.safetensors", "tgt", 0.8, "name", is_lorax=not plain)
    r.modules = [
        ModuleResult("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (32, 32), 4, True,
                     TRANSFERRED, 0.9, 0.95, norm_source=2.0, norm_target=1.5, energy_in_source_subspace=0.5),
        ModuleResult("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", (32, 32), 4, False,
                     BELOW_THRESHOLD, 0.3, 0.95, norm_source=1.0, norm_target=0.4, energy_in_source_subspace=1.0),
        ModuleResult("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (32, 32), 4, True, IDENTICAL,
                     1.0, 1.0, norm_source=2.0, norm_target=2.0),
        ModuleResult("lora_te_text_model_encoder_layers_0_mlp_fc1", (64, 32), 0, False, FILTERED,
                     norm_source=1.0, norm_target=0.0),
    ]
    return r


@pytest.mark.parametrize("name, block, leaf", [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
     "unet_down_blocks_0_attentions_0_transformer_blocks_0", "attn1_to_out_0"),
    ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj",
     "unet_up_blocks_1_attentions_2_transformer_blocks_0", "ff_net_0_proj"),
    ("lora_unet_input_blocks_4_1_proj_in", "unet_input_blocks_4_1", "proj_in"),
    ("lora_te2_text_model_encoder_layers_1_mlp_fc2", "te2_text_model_encoder_layers_1", "mlp_fc2"),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "unet_down_blocks_0_resnets_0", "conv1"),
])
def test_split_block(name, block, leaf):
    assert split_block(name) == (block, leaf)


def test_summary_counts_and_energy():
    s = _report().summary()
    assert (s["modules"], s["kept"], s["dropped"]) == (4, 2, 2)
    assert s["reasons"] == {TRANSFERRED: 1, IDENTICAL: 1, BELOW_THRESHOLD: 1, FILTERED: 1}
    assert s["mean_phi"] == pytest.approx((0.9 + 0.3 + 1.0) / 3)
    # kept energy: (1.5^2 + 2^2) over all inputs (2^2 + 1 + 2^2 + 1)
    assert s["energy_kept"] == pytest.approx(math.sqrt((1.5 ** 2 + 4.0) / 10.0))
    assert "energy_in_source_subspace" not in s


def test_plain_input_reports_source_subspace_energy():
    r = _report(plain=True)
    s = r.summary()
    # modules with a value: (2, 0.5) and (1, 1.0)
    assert s["energy_in_source_subspace"] == pytest.approx(math.sqrt((1.0 + 1.0) / 5.0))
    doc = r.to_json()
    assert all("energy_in_source_subspace" in m for m in doc["modules"])
    assert "in_src" in format_table(r)


def test_table_has_every_module_and_totals():
    text = format_table(_report())
    for m in _report().modules:
        assert m.name in text
    assert "dropped (below threshold)" in text and "dropped (filtered)" in text
    assert text.splitlines()[-1].startswith("total: 2 kept, 2 dropped")


def test_json_schema(tmp_path):
    path = write_json([_report()], tmp_path / "r.json")
    doc = json.loads(path.read_text())
    assert set(doc) == {"modules", "summary"}
    m = doc["modules"][0]
    for k in ("name", "shape", "phi_u", "phi_v", "phi", "transferred", "reason", "energy_kept"):
        assert k in m
    assert m["phi"] == 0.9 and m["energy_kept"] == pytest.approx(0.75)
    two = json.loads(write_json([_report(), _report()], tmp_path / "r2.json").read_text())
    assert len(two["reports"]) == 2 and set(two["reports"][0]) == {"modules", "summary"}


def test_heatmap_grid_and_png(tmp_path):
    blocks, leaves, grid = heatmap_grid(_report().modules)
    assert blocks == ["unet_down_blocks_0_attentions_0_transformer_blocks_0", "te_text_model_encoder_layers_0"]
    assert leaves == ["attn1_to_q", "attn1_to_k", "self_attn_q_proj"]
    assert grid[0][:2] == [0.9, 0.3] and math.isnan(grid[0][2]) and grid[1][2] == 1.0
    png = plot_heatmap(_report(), tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))


# ================================================================ the pipeline on tiny fixtures

import contextlib
import copy
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sd_scripts_lorax.formats.checkpoint import Checkpoint
from sd_scripts_lorax.errors import LoraxInputError
from sd_scripts_lorax.testing.fixtures import derive_fixture, write_fixture
from sd_scripts_lorax.formats.lora_file import (
    LoraModule,
    is_lorax,
    lorax_metadata,
    minimum_kohya_metadata,
    read_lora,
    write_lora,
)
from sd_scripts_lorax.lorax import lorax_factors, top_bases
from sd_scripts_lorax.transfer.engine import transfer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the tiny SVDs here are dominated by thread start-up on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_lora(ckpt: Path, out: Path, rank: int = 4, seed: int = 0, plain: bool = False,
              parts: tuple[str, ...] = ("unet", "te", "te1", "te2"), dtype: torch.dtype = torch.float32) -> Path:
    """A LoRA-X file over every attn-group module of `ckpt` (random d on the weight's top bases),
    or, with plain=True, an ordinary LoRA with random factors and alpha = rank / 2."""
    g = torch.Generator().manual_seed(seed)
    mods = []
    with Checkpoint.open(ckpt) as c:
        for name, ref in sorted(c.modules().items()):
            if ref.group != "attn" or ref.part not in parts:
                continue
            w = c.weight(ref)
            if plain:
                r = rank
                n = math.prod(ref.shape[1:])
                down = torch.randn(r, *ref.shape[1:], generator=g) / math.sqrt(n)
                up = torch.randn(ref.shape[0], r, *((1, 1) if len(ref.shape) == 4 else ()), generator=g) * 0.1
                mods.append(LoraModule(name, down.to(dtype), up.to(dtype), r / 2))
            else:
                b = top_bases(w, rank)
                up, down = lorax_factors(b, b.s * 0.3 * torch.randn(b.rank, generator=g), ref.shape)
                mods.append(LoraModule(name, down.to(dtype), up.to(dtype), float(b.rank)))
        meta = minimum_kohya_metadata(c.family, "networks.lora" if plain else "networks.lora_x",
                                      [m.rank for m in mods], [m.alpha for m in mods], date="2025-01-01T00:00:00")
        if not plain:
            meta.update(lorax_metadata(rank, c.name, "0" * 64))
        meta["ss_sd_model_name"] = c.name
    return write_lora(out, mods, meta, overwrite=True)


def dense(m: LoraModule) -> torch.Tensor:
    """scale * up @ down as an (out, in*kh*kw) float64 matrix."""
    return (m.up.reshape(m.up.shape[0], -1).double() @ m.down.reshape(m.down.shape[0], -1).double()) * m.scale


def reference_projection(w_t: torch.Tensor, m: LoraModule, r: int) -> torch.Tensor:
    """U_t U_t^T dW_s V_t V_t^T with torch.linalg.svd on the dense target weight (float64)."""
    u, _, vh = torch.linalg.svd(w_t.reshape(w_t.shape[0], -1).double(), full_matrices=False)
    ur, vr = u[:, :r], vh[:r].T
    return ur @ (ur.T @ dense(m) @ vr) @ vr.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1e-30))


@pytest.fixture(scope="module")
def sd1_fp16(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sd1_fp16")
    src = write_fixture("sd1", "single_file", "tiny", 3, d / "sd1_fp16.safetensors", dtype="fp16")
    return src, derive_fixture(src, d / "sd1_fp16_ft.safetensors", 0.05, 4, keep_text_encoder=True)


def test_target_equal_to_source_copies_the_input(tmp_path, tiny_sd1_single):
    lora = make_lora(tiny_sd1_single, tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    (rep,) = transfer(lora, tiny_sd1_single, tiny_sd1_single, out, progress=False, svd_cache_dir=tmp_path / "c")
    assert all(m.reason == IDENTICAL and m.transferred for m in rep.modules)
    assert not list((tmp_path / "c").glob("*.safetensors"))  # no SVD at all
    a, b = read_lora(lora), read_lora(out)
    assert a.modules.keys() == b.modules.keys()
    for n, m in a.modules.items():
        assert torch.equal(m.up, b.modules[n].up) and torch.equal(m.down, b.modules[n].down)
        assert m.alpha == b.modules[n].alpha
    md = b.metadata
    assert md["ss_sd_model_name"] == tiny_sd1_single.name
    with Checkpoint.open(tiny_sd1_single) as c:
        h = c.hashes()
    assert md["ss_new_sd_model_hash"] == h.sha256 and md["ss_sd_model_hash"] == h.legacy
    assert md["lorax.target_model_hash"] == h.sha256 and md["lorax.modules_kept"] == str(len(a.modules))
    assert md["modelspec.date"] == "2025-01-01T00:00:00"  # input metadata carried over
    assert is_lorax(b)


def _check_against_reference(lora: Path, out: Path, target: Path, rep, tol: float) -> int:
    src_mods, out_mods = read_lora(lora).modules, read_lora(out).modules
    checked = 0
    with Checkpoint.open(target) as t:
        refs = t.modules()
        for m in rep.modules:
            if m.reason != TRANSFERRED:
                continue
            o = out_mods[m.name]
            r = o.rank
            assert o.alpha == r and tuple(o.down.shape[1:]) == tuple(refs[m.name].shape[1:])
            want = reference_projection(t.weight(refs[m.name]), src_mods[m.name], r)
            assert rel(dense(o), want) < tol, m.name
            checked += 1
    return checked


@pytest.mark.parametrize("fixture", ["sd1_single", "sd1_diffusers", "sdxl_single", "sdxl_diffusers"])
def test_derived_target_matches_dense_reference(tmp_path, request, fixture):
    src = request.getfixturevalue(f"tiny_{fixture}")
    tgt = request.getfixturevalue(f"tiny_{fixture}_derived")
    lora = make_lora(src, tmp_path / "in.safetensors", rank=4)
    out = tmp_path / "out.safetensors"
    (rep,) = transfer(lora, src, tgt, out, threshold=0.0, progress=False)
    n = _check_against_reference(lora, out, tgt, rep, 1e-4)
    assert n >= 100  # every UNet attn module (the text encoders are bit-identical: copied)
    assert {m.reason for m in rep.modules} == {TRANSFERRED, IDENTICAL}
    assert all(0.0 <= m.phi <= 1.0 for m in rep.modules)


def test_fp16_checkpoints_and_save_precision(tmp_path, sd1_fp16):
    src, tgt = sd1_fp16
    lora = make_lora(src, tmp_path / "in.safetensors", dtype=torch.float16)
    out = tmp_path / "out.safetensors"
    (rep,) = transfer(lora, src, tgt, out, threshold=0.0, save_precision="float", progress=False)
    assert _check_against_reference(lora, out, tgt, rep, 1e-4) > 100
    assert next(iter(read_lora(out).modules.values())).up.dtype == torch.float32
    out16 = tmp_path / "out16.safetensors"
    transfer(lora, src, tgt, out16, threshold=0.0, precision="bf16", progress=False)
    a, b = read_lora(out).modules, read_lora(out16).modules
    assert next(iter(b.values())).up.dtype == torch.float16  # default: the input's precision
    assert max(rel(dense(b[n]), dense(a[n])) for n in a) < 2e-2  # bf16 projection, fp16 save


def test_threshold_and_filter_blocks_drop_modules(tmp_path, tiny_sd1_single, tiny_sd1_single_derived):
    lora = make_lora(tiny_sd1_single, tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    (full,) = transfer(lora, tiny_sd1_single, tiny_sd1_single_derived, None, dry_run=True, threshold=0.0,
                       progress=False)
    phis = sorted(m.phi for m in full.modules if m.reason == TRANSFERRED)
    thr = phis[len(phis) // 2]  # about half the projected modules fall below this
    (rep,) = transfer(lora, tiny_sd1_single, tiny_sd1_single_derived, out, threshold=thr,
                      filter_blocks=["lora_te_*", "*attn2_to_k"], report_path=tmp_path / "r.json",
                      plot_path=tmp_path / "p.png", progress=False)
    written = read_lora(out).modules
    by = {m.name: m for m in rep.modules}
    assert by.keys() == read_lora(lora).modules.keys()
    for name, m in by.items():
        if name.startswith("lora_te_") or name.endswith("attn2_to_k"):
            assert m.reason == FILTERED and not m.transferred
        elif m.reason == BELOW_THRESHOLD:
            assert m.phi < thr
        else:
            assert m.reason == TRANSFERRED and m.phi >= thr
        assert (name in written) == m.transferred
    assert sum(m.reason == BELOW_THRESHOLD for m in rep.modules) >= 10
    assert read_lora(out).metadata["lorax.modules_dropped"] == str(len(rep.dropped))
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {m["reason"] for m in doc["modules"]} == {TRANSFERRED, BELOW_THRESHOLD, FILTERED}
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_dry_run_writes_only_the_report(tmp_path, tiny_sd1_single, tiny_sd1_single_derived):
    lora = make_lora(tiny_sd1_single, tmp_path / "in.safetensors")
    transfer(lora, tiny_sd1_single, tiny_sd1_single_derived, tmp_path / "out.safetensors", dry_run=True,
             report_path=tmp_path / "r.json", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "r.json"]


def test_output_loads_with_diffusers(tmp_path, tiny_sd1_diffusers, tiny_sd1_diffusers_derived):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    lora = make_lora(tiny_sd1_diffusers, tmp_path / "in.safetensors")
    out = tmp_path / "out.safetensors"
    transfer(lora, tiny_sd1_diffusers, tiny_sd1_diffusers_derived, out, threshold=0.0, progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1_diffusers_derived), safety_checker=None)
    pipe.load_lora_weights(str(out))
    merged = UNet2DConditionModel.from_pretrained(str(tiny_sd1_diffusers_derived / "unet"))
    base = copy.deepcopy(merged)
    with Checkpoint.open(tiny_sd1_diffusers_derived) as c:
        refs = c.modules()
    with torch.no_grad():
        for name, m in read_lora(out).modules.items():
            ref = refs[name]
            if ref.part == "unet":
                w = merged.get_submodule(ref.key.split("/", 1)[1].removesuffix(".weight")).weight
                w += dense(m).to(w.dtype).reshape(w.shape)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        got = pipe.unet(x, 10, encoder_hidden_states=ctx).sample
        want = merged(x, 10, encoder_hidden_states=ctx).sample
        before = base(x, 10, encoder_hidden_states=ctx).sample
    assert (want - before).abs().max() > 1e-3
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_transfer_back_is_well_defined(tmp_path, tiny_sdxl_single, tiny_sdxl_single_derived):
    lora = make_lora(tiny_sdxl_single, tmp_path / "in.safetensors")
    there, back = tmp_path / "there.safetensors", tmp_path / "back.safetensors"
    (r1,) = transfer(lora, tiny_sdxl_single, tiny_sdxl_single_derived, there, threshold=0.0, progress=False)
    (r2,) = transfer(there, tiny_sdxl_single_derived, tiny_sdxl_single, back, threshold=0.0, progress=False)
    assert r2.is_lorax and len(r2.kept) == len(read_lora(there).modules)
    assert _check_against_reference(there, back, tiny_sdxl_single, r2, 1e-4) > 100
    # the output of a transfer is in the target's subspace: transferring it onto the same target again is exact
    again = tmp_path / "again.safetensors"
    (r3,) = transfer(there, tiny_sdxl_single_derived, tiny_sdxl_single_derived, again, progress=False)
    assert all(m.reason == IDENTICAL for m in r3.modules)
    b = read_lora(back)
    assert is_lorax(b) and b.metadata["lorax.target_model_name"] == tiny_sdxl_single.name
    assert r2.summary()["energy_kept"] > 0.9


def test_plain_lora_warns_and_reports_source_subspace_energy(tmp_path, tiny_sd1_single, tiny_sd1_single_derived):
    lora = make_lora(tiny_sd1_single, tmp_path / "plain.safetensors", plain=True, parts=("unet",))
    out = tmp_path / "out.safetensors"
    with pytest.warns(UserWarning, match="not a LoRA-X"):
        (rep,) = transfer(lora, tiny_sd1_single, tiny_sd1_single_derived, out, threshold=0.0, progress=False)
    assert not rep.is_lorax
    src = read_lora(lora).modules
    with Checkpoint.open(tiny_sd1_single) as c:
        refs = c.modules()
        for m in rep.modules[:20]:
            # independent: ||P dW|| / ||dW|| with the dense source SVD
            u, _, vh = torch.linalg.svd(c.weight(refs[m.name]).reshape(m.shape[0], -1).double(),
                                        full_matrices=False)
            dw = dense(src[m.name])
            p = u[:, :4] @ u[:, :4].T @ dw @ vh[:4].T @ vh[:4]
            assert m.energy_in_source_subspace == pytest.approx(float(p.norm() / dw.norm()), rel=1e-4)
    assert 0.0 < rep.summary()["energy_in_source_subspace"] < 0.9  # a random LoRA is mostly outside
    assert _check_against_reference(lora, out, tiny_sd1_single_derived, rep, 1e-4) > 100


def test_several_loras_share_target_svds(tmp_path, tiny_sd1_single, tiny_sd1_single_derived):
    a = make_lora(tiny_sd1_single, tmp_path / "a.safetensors", rank=4, seed=1, parts=("unet",))
    b = make_lora(tiny_sd1_single, tmp_path / "b.safetensors", rank=8, seed=2, parts=("unet",))
    outdir = tmp_path / "out"
    outdir.mkdir()
    cache = tmp_path / "cache"
    reps = transfer([a, b], tiny_sd1_single, tiny_sd1_single_derived, outdir, threshold=0.0,
                    svd_cache_dir=cache, progress=False)
    n_modules = len(reps[0].modules)
    # one source and one target SVD per module, at the larger rank (8), shared by both inputs
    assert len(list(cache.glob("*.safetensors"))) == 2 * n_modules
    outs = sorted(outdir.iterdir())
    assert [p.name for p in outs] == [f"a_to_{tiny_sd1_single_derived.stem}.safetensors",
                                      f"b_to_{tiny_sd1_single_derived.stem}.safetensors"]
    (alone,) = transfer(a, tiny_sd1_single, tiny_sd1_single_derived, tmp_path / "alone.safetensors",
                        threshold=0.0, progress=False)
    shared, single = read_lora(outs[0]).modules, read_lora(tmp_path / "alone.safetensors").modules
    assert max(rel(dense(shared[n]), dense(single[n])) for n in single) < 1e-4
    assert [m.phi for m in reps[0].modules] == pytest.approx([m.phi for m in alone.modules], abs=1e-5)
    # the warm cache gives the same bytes
    again = tmp_path / "again"
    again.mkdir()
    transfer([a, b], tiny_sd1_single, tiny_sd1_single_derived, again, threshold=0.0, svd_cache_dir=cache,
             progress=False)
    assert [p.read_bytes() for p in sorted(again.iterdir())] == [p.read_bytes() for p in outs]


def _distill(src: Path, out: Path, block: str = "model.diffusion_model.input_blocks.7.1.transformer_blocks.") -> Path:
    """A 'distilled' copy: transformer block 0 of one SDXL attention removed, block 1 renumbered to 0."""
    state = {}
    with safe_open(str(src), framework="pt") as f:
        for k in f.keys():
            if k.startswith(block + "0."):
                continue
            state[k.replace(block + "1.", block + "0.")] = f.get_tensor(k)
    save_file(state, str(out))
    return out


def test_similarity_match_pairs_renumbered_blocks(tmp_path, tiny_sdxl_single, tiny_sdxl_single_derived):
    lora = make_lora(tiny_sdxl_single, tmp_path / "in.safetensors", parts=("unet",))
    tgt = _distill(tiny_sdxl_single_derived, tmp_path / "distilled.safetensors")
    blk = "lora_unet_input_blocks_7_1_transformer_blocks_"
    (by_name,) = transfer(lora, tiny_sdxl_single, tgt, tmp_path / "n.safetensors", progress=False)
    names = {m.name: m for m in by_name.modules}
    assert names[blk + "1_attn1_to_q"].reason == MISSING_IN_TARGET
    assert names[blk + "0_attn1_to_q"].reason == BELOW_THRESHOLD  # block 0 now holds block 1's weights
    out = tmp_path / "s.safetensors"
    (by_sim,) = transfer(lora, tiny_sdxl_single, tgt, out, match="similarity", progress=False)
    sims = {m.name: m for m in by_sim.modules if m.transferred}
    for leaf in ("attn1_to_q", "attn2_to_v", "ff_net_0_proj", "ff_net_2"):
        m = sims[blk + "0_" + leaf]
        assert m.source == blk + "1_" + leaf and m.phi > 0.8
    # elsewhere each module pairs with its own name
    assert all(m.source == m.name for n, m in sims.items() if not n.startswith(blk))
    assert len(sims) >= len(names) - 12
    src_mods, out_mods = read_lora(lora).modules, read_lora(out).modules
    with Checkpoint.open(tgt) as t:
        ref = t.modules()[blk + "0_attn1_to_q"]
        want = reference_projection(t.weight(ref), src_mods[blk + "1_attn1_to_q"], 4)
    assert rel(dense(out_mods[blk + "0_attn1_to_q"]), want) < 1e-4
    unpaired = [m for m in by_sim.modules if m.reason == MISSING_IN_TARGET]
    assert unpaired and all(m.name.startswith(blk + "0_") for m in unpaired)
    json.dumps(by_sim.to_json())  # sources of re-paired modules are named in the report
    assert by_sim.to_json()["modules"][[m.name for m in by_sim.modules].index(blk + "0_attn1_to_q")]["source"]


def test_noise_prediction_change_is_carried_over(tmp_path, tiny_sd1_diffusers):
    """The claim, on a function, over fine-tunes of growing strength: the change in the target's noise
    prediction made by the transferred adapter vs the change the source adapter makes on the source
    (cosine, relative MSE), against the two naive ways to carry it over:

    - "copy d": the source's singular-value shifts d put into the target's own bases (the paper's
      naive copy, Table 5). The projection must beat it at every strength;
    - "copy file": the source file loaded unchanged on the target (the everyday baseline). Per layer it
      reproduces the source's update exactly, which the projection can only shorten, so it is the
      stronger baseline; the projection must stay close to it (it costs little).
    """
    from diffusers import UNet2DConditionModel

    src = tiny_sd1_diffusers
    lora = make_lora(src, tmp_path / "in.safetensors", rank=4, seed=5, parts=("unet",))
    src_mods = read_lora(lora).modules
    us = UNet2DConditionModel.from_pretrained(str(src / "unet"))
    with Checkpoint.open(src) as c:
        paths = {n: r.key.split("/", 1)[1].removesuffix(".weight") for n, r in c.modules().items()}
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)

    def eps(unet, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        u = copy.deepcopy(unet)
        with torch.no_grad():
            for n, dw in deltas.items():
                w = u.get_submodule(paths[n]).weight
                w += dw.to(w.dtype).reshape(w.shape)
            return u(x, 500, encoder_hidden_states=ctx).sample

    def score(v: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
        cos = float(torch.nn.functional.cosine_similarity(v.flatten(), want.flatten(), dim=0))
        return cos, float(((v - want) ** 2).mean() / (want ** 2).mean())

    want = eps(us, {n: dense(m) for n, m in src_mods.items()}) - eps(us, {})
    print("\n  drift  transferred (cos / rel. MSE)  copy d (Table 5)   copy file")
    for drift in (0.02, 0.05, 0.1):
        tgt = derive_fixture(src, tmp_path / f"ft_{drift}", drift, 1)
        out = tmp_path / f"out_{drift}.safetensors"
        transfer(lora, src, tgt, out, threshold=0.0, progress=False)
        out_mods = read_lora(out).modules
        ut = UNet2DConditionModel.from_pretrained(str(tgt / "unet"))

        def d_copy(n: str) -> torch.Tensor:
            ws, wt = (m.get_submodule(paths[n]).weight.detach() for m in (us, ut))
            bs, bt = top_bases(ws, 4), top_bases(wt, 4)
            d = (bs.u.T.double() @ dense(src_mods[n]) @ bs.v.double()).diagonal()
            return bt.u.double() @ torch.diag(d) @ bt.v.double().T

        base_t = eps(ut, {})
        got = {"transferred": score(eps(ut, {n: dense(m) for n, m in out_mods.items()}) - base_t, want),
               "copy d": score(eps(ut, {n: d_copy(n) for n in src_mods}) - base_t, want),
               "copy file": score(eps(ut, {n: dense(m) for n, m in src_mods.items()}) - base_t, want)}
        print(f"  {drift:5.2f}  " + "   ".join(f"{c:.3f} / {m:.3f}" for c, m in got.values()))
        assert got["transferred"][0] > got["copy d"][0] and got["transferred"][1] < got["copy d"][1]
        assert got["transferred"][0] > got["copy file"][0] - 0.05
    assert got["transferred"][0] > 0.5   # still the same change at drift 0.1


def test_mixed_layouts(tmp_path, tiny_sd1_single, tiny_sd1_diffusers, tiny_sd1_diffusers_derived):
    """A single file and a diffusers folder of the same weights are identical module by module;
    a single-file source onto a diffusers target projects like any other pair."""
    lora = make_lora(tiny_sd1_single, tmp_path / "in.safetensors", parts=("unet", "te"))
    (same,) = transfer(lora, tiny_sd1_single, tiny_sd1_diffusers, None, dry_run=True, progress=False)
    assert {m.reason for m in same.modules} == {IDENTICAL}
    out = tmp_path / "out.safetensors"
    (rep,) = transfer(lora, tiny_sd1_single, tiny_sd1_diffusers_derived, out, threshold=0.0, progress=False)
    assert _check_against_reference(lora, out, tiny_sd1_diffusers_derived, rep, 1e-4) > 100


def test_bad_options_are_refused_before_any_work(tmp_path, tiny_sd1_single):
    lora = make_lora(tiny_sd1_single, tmp_path / "in.safetensors", parts=("te",))
    args = (lora, tiny_sd1_single, tiny_sd1_single)
    with pytest.raises(LoraxInputError, match="threshold"):
        transfer(*args, tmp_path / "o.safetensors", threshold=1.5, progress=False)
    with pytest.raises(LoraxInputError, match="--match"):
        transfer(*args, tmp_path / "o.safetensors", match="fuzzy", progress=False)
    with pytest.raises(LoraxInputError, match="--save_to"):
        transfer(*args, None, progress=False)
    with pytest.raises(LoraxInputError, match="need an output folder"):
        transfer([lora, lora], tiny_sd1_single, tiny_sd1_single, tmp_path / "o.safetensors", progress=False)
    with pytest.raises(LoraxInputError, match="no_such_folder"):
        transfer(*args, tmp_path / "no_such_folder", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_lorax_input_gives_source_bases_without_source_svd(tmp_path, tiny_sd1_single, tiny_sd1_single_derived):
    from sd_scripts_lorax.cache import svd_cache
    from sd_scripts_lorax.lorax import module_similarity
    from sd_scripts_lorax.transfer.sides import CLAIMED_METHOD

    lora = make_lora(tiny_sd1_single, tmp_path / "in.safetensors", rank=4, parts=("unet",))
    cache = tmp_path / "cache"
    (rep,) = transfer(lora, tiny_sd1_single, tiny_sd1_single_derived, None, dry_run=True, threshold=0.0,
                      svd_cache_dir=cache, progress=False)
    claimed = 0
    with Checkpoint.open(tiny_sd1_single) as s, Checkpoint.open(tiny_sd1_single_derived) as t:
        for m in rep.modules:
            if m.reason != TRANSFERRED:
                continue
            w_s, w_t = s.weight(s.modules()[m.name]), t.weight(t.modules()[m.name])
            entry = cache / f"{svd_cache.cache_key(w_s, m.rank, CLAIMED_METHOD)}.safetensors"
            assert entry.is_file(), m.name
            want = module_similarity(top_bases(w_s, m.rank, "exact"), top_bases(w_t, m.rank, "exact"))
            assert m.phi == pytest.approx(want.phi, abs=1e-4), m.name
            cached = svd_cache.get_or_compute(w_s, m.rank, cache, lambda: None, method=CLAIMED_METHOD)
            exact = top_bases(w_s, m.rank, "exact")
            claimed += int(float((cached.u @ cached.u.T - exact.u @ exact.u.T).norm()) < 1e-4)
    assert claimed > 50  # most tiny modules have a gap at r=4, and their bases came from the file


# ================================================================ speed paths: threads, tensor index, phi cache


def _doc(report: Path) -> dict:
    """A JSON report without the output path (runs compared here write to different files)."""
    doc = json.loads(report.read_text())
    doc["summary"].pop("output")
    return doc


def _run(lora, src, tgt, out, cache, report, **kw):
    return transfer(lora, src, tgt, out, threshold=0.0, svd_cache_dir=cache, report_path=report, overwrite=True,
                    progress=False, **kw)


@pytest.mark.parametrize("match", ["name", "similarity"])
def test_parallel_and_serial_give_identical_bytes(tmp_path, monkeypatch, tiny_sd1_single, tiny_sd1_single_derived,
                                                  match):
    lora = make_lora(tiny_sd1_single, tmp_path / "in.safetensors", parts=("unet", "te"))
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            d = tmp_path / f"t{threads}"
            _run(lora, tiny_sd1_single, tiny_sd1_single_derived, d.with_suffix(".safetensors"), d,
                 d.with_suffix(".json"),
                 match=match)
            assert _doc(d.with_suffix(".json"))["summary"]["modules"] > 100
            assert torch.get_num_threads() == threads  # restored after the pool
        finally:
            torch.set_num_threads(1)
        outs.append((d.with_suffix(".safetensors").read_bytes(), _doc(d.with_suffix(".json")),
                     sorted(p.name for p in d.glob("*.safetensors"))))
    assert outs[0] == outs[1]
    # warm (either match mode): no checkpoint tensor read, same bytes
    reads = _count_reads(monkeypatch)
    d = tmp_path / "t2"
    _run(lora, tiny_sd1_single, tiny_sd1_single_derived, tmp_path / "w.safetensors", d, tmp_path / "w.json",
         match=match)
    assert reads[0] == 0
    assert (tmp_path / "w.safetensors").read_bytes() == outs[1][0] and _doc(tmp_path / "w.json") == outs[1][1]


def _count_reads(monkeypatch) -> list[int]:
    count = [0]
    real = Checkpoint.tensor

    def counting(self, key, rows=None):
        count[0] += 1
        return real(self, key, rows)

    monkeypatch.setattr(Checkpoint, "tensor", counting)
    return count


@pytest.mark.parametrize("plain", [False, True])
def test_warm_run_reads_no_checkpoint_tensor(tmp_path, monkeypatch, tiny_sd1_single, tiny_sd1_single_derived, plain):
    lora = make_lora(tiny_sd1_single, tmp_path / "in.safetensors", plain=plain, parts=("unet", "te"))
    cache, out, rep_json = tmp_path / "cache", tmp_path / "out.safetensors", tmp_path / "r.json"
    reads = _count_reads(monkeypatch)
    with pytest.warns(UserWarning) if plain else contextlib.nullcontext():
        _run(lora, tiny_sd1_single, tiny_sd1_single_derived, out, cache, rep_json)
    cold_reads, cold = reads[0], (out.read_bytes(), rep_json.read_bytes())
    assert cold_reads > 0 and (cache / "tensor_index").is_dir() and (cache / "similarity.json").is_file()
    assert (cache / "adapter_norms.json").is_file()
    with pytest.warns(UserWarning) if plain else contextlib.nullcontext():
        _run(lora, tiny_sd1_single, tiny_sd1_single_derived, out, cache, rep_json)
    assert reads[0] == cold_reads  # the warm run read no checkpoint tensor
    assert (out.read_bytes(), rep_json.read_bytes()) == cold
    # and the same as without any cache at all
    with pytest.warns(UserWarning) if plain else contextlib.nullcontext():
        _run(lora, tiny_sd1_single, tiny_sd1_single_derived, tmp_path / "nc.safetensors", None, tmp_path / "nc.json")
    assert (tmp_path / "nc.safetensors").read_bytes() == cold[0]
    assert _doc(tmp_path / "nc.json") == _doc(rep_json)


@pytest.mark.parametrize("mtime_shift", [10**9, 0], ids=["rewritten", "copied_over_keeping_mtime"])
def test_rewritten_checkpoint_is_not_served_stale_entries(tmp_path, tiny_sd1_single, mtime_shift):
    lora = make_lora(tiny_sd1_single, tmp_path / "in.safetensors", parts=("unet",))
    tgt = derive_fixture(tiny_sd1_single, tmp_path / "tgt.safetensors", 0.05, 7, keep_text_encoder=True)
    cache = tmp_path / "cache"
    _run(lora, tiny_sd1_single, tgt, tmp_path / "a.safetensors", cache, None)
    # new weights under the same name: its mtime moves, as any rewrite's does, or is set back to the
    # old one with the same size (what `cp -p` of another file does): the ctime still tells
    st = tgt.stat()
    derive_fixture(tiny_sd1_single, tgt, 0.05, 8, keep_text_encoder=True, overwrite=True)
    os.utime(tgt, ns=(st.st_atime_ns, st.st_mtime_ns + mtime_shift))
    if not mtime_shift:
        assert tgt.stat().st_size == st.st_size and tgt.stat().st_mtime_ns == st.st_mtime_ns
    _run(lora, tiny_sd1_single, tgt, tmp_path / "b.safetensors", cache, tmp_path / "b.json")
    _run(lora, tiny_sd1_single, tgt, tmp_path / "c.safetensors", None, tmp_path / "c.json")
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "c.safetensors").read_bytes()
    assert _doc(tmp_path / "b.json") == _doc(tmp_path / "c.json")
    assert (tmp_path / "a.safetensors").read_bytes() != (tmp_path / "b.safetensors").read_bytes()


def test_corrupt_index_phi_book_and_entries_are_recomputed(tmp_path, monkeypatch, tiny_sd1_single,
                                                          tiny_sd1_single_derived):
    lora = make_lora(tiny_sd1_single, tmp_path / "in.safetensors", parts=("unet",))
    cache = tmp_path / "cache"
    _run(lora, tiny_sd1_single, tiny_sd1_single_derived, tmp_path / "a.safetensors", cache, tmp_path / "a.json")
    for f in (cache / "tensor_index").iterdir():
        f.write_text("{not json")
    (cache / "similarity.json").write_text('{"format": "sd-scripts-lorax similarity v1", "phi": {"x": [2, "a"]}}')
    for f in sorted(cache.glob("*.safetensors"))[::2]:
        f.write_bytes(f.read_bytes()[:50])
    reads = _count_reads(monkeypatch)
    _run(lora, tiny_sd1_single, tiny_sd1_single_derived, tmp_path / "b.safetensors", cache, tmp_path / "b.json")
    assert reads[0] > 0  # the index was rebuilt by reading
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert _doc(tmp_path / "a.json") == _doc(tmp_path / "b.json")


def test_dry_run_hashes_nothing_and_metadata_hashes_need_no_addnet(tmp_path, tiny_sd1_single, tiny_sd1_single_derived):
    lora = make_lora(tiny_sd1_single, tmp_path / "in.safetensors", parts=("te",))
    cache = tmp_path / "cache"
    transfer(lora, tiny_sd1_single, tiny_sd1_single_derived, None, dry_run=True, svd_cache_dir=cache, progress=False)
    assert not (cache / "model_hashes.json").exists()
    out = tmp_path / "out.safetensors"
    transfer(lora, tiny_sd1_single, tiny_sd1_single_derived, out, svd_cache_dir=cache, progress=False)
    book = json.loads((cache / "model_hashes.json").read_text())
    assert len(book) == 2 and all(v["addnet"] is None for v in book.values())
    md = read_lora(out).metadata
    with Checkpoint.open(tiny_sd1_single_derived) as t:
        h = t.hashes()
    assert md["lorax.target_model_hash"] == h.sha256 and md["ss_sd_model_hash"] == h.legacy


def test_nan_written_into_a_cached_target_is_still_refused(tmp_path, tiny_sd1_single):
    """A warm index stands only for the bytes it saw: a rewritten file is read and checked again."""
    lora = make_lora(tiny_sd1_single, tmp_path / "in.safetensors", parts=("unet",))
    tgt = derive_fixture(tiny_sd1_single, tmp_path / "tgt.safetensors", 0.05, 7, keep_text_encoder=True)
    cache = tmp_path / "cache"
    _run(lora, tiny_sd1_single, tgt, tmp_path / "a.safetensors", cache, None)
    with Checkpoint.open(tgt) as c:
        key = c.modules()[sorted(read_lora(lora).modules)[3]].key
    with safe_open(str(tgt), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state[key].view(-1)[5] = float("nan")
    st = tgt.stat()
    save_file(state, str(tgt))
    os.utime(tgt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(LoraxInputError, match="NaN"):
        _run(lora, tiny_sd1_single, tgt, tmp_path / "b.safetensors", cache, None)
    assert not (tmp_path / "b.safetensors").exists()
