"""fixtures.py: tiny fixtures in every layout write and read back, load in diffusers pipelines,
agree across layouts, and derived fixtures drift by the asked amount."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sd_scripts_lorax.families import ldm_convert as lc
from sd_scripts_lorax.errors import LoraxInputError
from sd_scripts_lorax.testing.fixture_math import init_tensor
from sd_scripts_lorax.testing.fixtures import derive_fixture, fixture_shapes, write_fixture
from sd_scripts_lorax.families.naming import index_modules


def _folder_state(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*/*.safetensors")):
        out.update({f"{f.parent.name}/{k}": v for k, v in load_file(f).items()})
    return out


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_single_file_reads_back_and_matches_diffusers_layout(tmp_path, family):
    single = write_fixture(family, "single_file", "tiny", 7, tmp_path / "m.safetensors")
    folder = write_fixture(family, "diffusers", "tiny", 7, tmp_path / "m")
    s = load_file(single)
    fam = {"sd15": "sd1"}.get(family, family)
    assert {k: tuple(v.shape) for k, v in s.items()} == fixture_shapes(family, "single_file", "tiny")
    d = _folder_state(folder)
    assert {k: tuple(v.shape) for k, v in d.items()} == fixture_shapes(family, "diffusers", "tiny")
    # the same seed is the same model in both layouts
    tm = {c: any(k.startswith(f"{c}/text_model.") for k in d) for c in ("text_encoder", "text_encoder_2")}
    back = lc.convert(lc.from_single_file(fam, {k: tuple(v.shape) for k, v in s.items()}, tm), s)
    assert set(back) == set(d) and all(torch.equal(back[k], d[k]) for k in d)
    assert set(index_modules({k: tuple(v.shape) for k, v in s.items()}, fam, "single_file")) == \
        set(index_modules({k: tuple(v.shape) for k, v in d.items()}, fam, "diffusers"))
    assert json.loads((folder / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_dtypes_ema_and_spectrum(tmp_path):
    p = write_fixture("sd15", "single_file", "tiny", 0, tmp_path / "h.safetensors", dtype="fp16", ema=True)
    s = load_file(p)
    ema = [k for k in s if k.startswith("model_ema.")]
    unet = [k for k in s if k.startswith("model.diffusion_model.")]
    assert len(ema) == len(unet) and "model_ema.diffusion_modelinput_blocks11proj_inweight" in s
    assert not torch.equal(s["model_ema.diffusion_modelinput_blocks11proj_inweight"],
                           s["model.diffusion_model.input_blocks.1.1.proj_in.weight"])
    assert all(v.dtype == torch.float16 for v in s.values())
    # EMA keys are not modules
    assert not any(r.key.startswith("model_ema") for r in index_modules(
        {k: tuple(v.shape) for k, v in s.items()}, "sd1", "single_file").values())
    b = write_fixture("sdxl", "diffusers", "tiny", 0, tmp_path / "b", dtype="bf16", spectrum="decaying")
    st = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in st.values())
    key = "unet/down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight"
    assert torch.equal(st[key.split("/", 1)[1]], init_tensor(key, (64, 256), 0, "decaying").bfloat16())
    sv = torch.linalg.svdvals(init_tensor(key, (64, 256), 0, "decaying"))
    flat = torch.linalg.svdvals(init_tensor(key, (64, 256), 0, "init"))
    assert sv[0] / sv[32] > 3 * flat[0] / flat[32]  # decays much faster than the plain init
    assert sv.norm().item() == pytest.approx(flat.norm().item(), rel=0.2)  # same overall scale
    with pytest.raises(LoraxInputError, match="ema"):
        write_fixture("sd15", "diffusers", "tiny", 0, tmp_path / "e", ema=True)


def test_writes_are_deterministic_and_refuse_existing(tmp_path):
    a = write_fixture("sd2", "single_file", "tiny", 3, tmp_path / "a.safetensors")
    b = write_fixture("sd2", "single_file", "tiny", 3, tmp_path / "b.safetensors")
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(LoraxInputError, match="exists"):
        write_fixture("sd2", "single_file", "tiny", 3, a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]  # no leftovers


def _drift_check(base: dict, derived: dict, drift: float,
                 te_prefixes=("text_encoder", "cond_stage_model.", "conditioner.")):
    assert base.keys() == derived.keys()
    n_moved = 0
    for k, w in base.items():
        v = derived[k]
        assert v.dtype == w.dtype and v.shape == w.shape
        if k.startswith(te_prefixes) or w.dim() < 2:
            assert torch.equal(v, w), k
            continue
        rel = ((v.float() - w.float()).norm() / w.float().norm()).item()
        assert rel == pytest.approx(drift, rel=1e-3), k
        n_moved += 1
    return n_moved


def test_derived_fixtures_have_the_asked_drift(tiny_sd1_single, tiny_sd1_single_derived, tiny_sdxl_diffusers,
                                               tiny_sdxl_diffusers_derived, derived_drift):
    assert _drift_check(load_file(tiny_sd1_single), load_file(tiny_sd1_single_derived), derived_drift) > 200
    sdxl, sdxl_derived = _folder_state(tiny_sdxl_diffusers), _folder_state(tiny_sdxl_diffusers_derived)
    assert _drift_check(sdxl, sdxl_derived, derived_drift) > 200
    # non-weight files are carried over
    assert (tiny_sdxl_diffusers_derived / "model_index.json").read_bytes() == \
        (tiny_sdxl_diffusers / "model_index.json").read_bytes()
    with safe_open(str(tiny_sd1_single_derived), "pt") as f:
        assert "lorax.fixture" in f.metadata()


def test_drift_is_mostly_low_rank():
    from sd_scripts_lorax.testing.fixture_math import drift_tensor

    w = torch.randn(256, 128) / 128 ** 0.5
    p = drift_tensor(w, 0.2, "k", 0) - w
    sv = torch.linalg.svdvals(p)
    k = 128 // 16
    assert (sv[:k] ** 2).sum() / (sv ** 2).sum() > 0.85
    assert torch.equal(drift_tensor(w, 0.2, "k", 0), drift_tensor(w, 0.2, "k", 0))


def test_derive_keeps_or_moves_text_encoder(tmp_path, tiny_sd1_diffusers):
    out = derive_fixture(tiny_sd1_diffusers, tmp_path / "ft", 0.1, 5, keep_text_encoder=False)
    a, b = _folder_state(tiny_sd1_diffusers), _folder_state(out)
    k = next(k for k in a if k.startswith("text_encoder/") and k.endswith("q_proj.weight"))
    rel = ((b[k] - a[k]).norm() / a[k].norm()).item()
    assert rel == pytest.approx(0.1, rel=1e-3)


def test_pipelines_load_offline_with_the_written_weights(tiny_sd1_diffusers, tiny_sdxl_diffusers_derived):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    for cls, folder in ((StableDiffusionPipeline, tiny_sd1_diffusers),
                        (StableDiffusionXLPipeline, tiny_sdxl_diffusers_derived)):
        pipe = cls.from_pretrained(folder, local_files_only=True)
        state = _folder_state(folder)
        comps = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if cls is StableDiffusionXLPipeline else [])
        for c in comps:
            live = getattr(pipe, c).state_dict()
            mine = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(c + "/")}
            assert set(mine) <= set(live), c
            assert all(torch.equal(live[k], v) for k, v in mine.items()), c
        img = pipe("a red circle", num_inference_steps=1, height=32, width=32, output_type="np",
                   guidance_scale=1.0).images
        assert img.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(img)).all()


def test_cli(tmp_path, capsys):
    from sd_scripts_lorax.testing.fixtures import main

    base = tmp_path / "m.safetensors"
    assert main(["--family", "sd15", "--layout", "single_file", "--size", "tiny", "--seed", "1",
                 "--out", str(base)]) == 0
    assert main(["--derive_from", str(base), "--drift", "0.02", "--keep_text_encoder",
                 "--out", str(tmp_path / "d.safetensors")]) == 0
    assert load_file(tmp_path / "d.safetensors").keys() == load_file(base).keys()
    with pytest.raises(SystemExit) as exc:
        main(["--family", "sd15", "--out", str(base)])
    assert exc.value.code == 2 and "exists" in capsys.readouterr().err
    # the module runs as a program; bad input is one line on stderr and exit code 2
    r = subprocess.run([sys.executable, "-m", "sd_scripts_lorax.testing.fixtures", "--derive_from",
                        str(tmp_path / "missing.safetensors"), "--drift", "0.1", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "missing.safetensors" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
