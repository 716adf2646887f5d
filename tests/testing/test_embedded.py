"""The embedded demo pair and style dataset: generator, dataset layout, committed weights, build."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sd_scripts_lorax.testing.embedded import (
    embedded_model_path,
    eval_prompts,
    render_scene,
    sample_scene,
    write_style_dataset,
)
from sd_scripts_lorax.testing.embedded.compare import compare_unets, subspace_phi
from sd_scripts_lorax.testing.embedded.concepts import CONCEPTS, STYLE_SEEN, STYLE_UNSEEN
from sd_scripts_lorax.errors import LoraxInputError
from sd_scripts_lorax.testing.tiny_tokenizer import DEFAULT_WORDS


def _words(caption: str) -> list[str]:
    return caption.replace(",", " ").split()


# ---------------------------------------------------------------- generator

def test_generator_is_deterministic_and_seed_dependent():
    def draw(seed):
        rng = np.random.default_rng(seed)
        return [np.asarray(render_scene(sample_scene(rng, d))) for d in ("base", "shifted", "bluefire")]

    a, b, c = draw(3), draw(3), draw(4)
    assert all(x.shape == (64, 64, 3) and x.dtype == np.uint8 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not any(np.array_equal(x, y) for x, y in zip(a, c))


def test_every_concept_renders_and_shifted_rendering_differs():
    rng = np.random.default_rng(0)
    for concept in CONCEPTS:
        scene = sample_scene(rng, "base", concept=concept, colour="red", background="sky")
        base = np.asarray(render_scene(scene), dtype=np.float32)
        # the shape is drawn: red pixels exist where the sky has none
        assert ((base[..., 0] > 150) & (base[..., 2] < 110)).sum() > 8, concept
        shifted = np.asarray(render_scene(type(scene)(**{**scene.__dict__, "style": "shifted"})), np.float32)
        assert np.abs(shifted - base).mean() > 5, concept


def test_captions_use_tokenizer_words():
    rng = np.random.default_rng(1)
    vocab = set(DEFAULT_WORDS)
    for dist in ("base", "shifted"):
        for _ in range(50):
            assert set(_words(sample_scene(rng, dist).caption())) <= vocab
    # the trigger may be added to the vocabulary later; nothing else may be missing
    assert set(_words(sample_scene(rng, "bluefire").caption())) - vocab <= {"bluefire"}


# ---------------------------------------------------------------- style dataset

def test_style_dataset_kohya_layout_and_determinism(tmp_path):
    root = write_style_dataset(tmp_path / "a", seed=7)
    assert root == tmp_path / "a"
    sub = root / "10_bluefire"
    assert [p.name for p in root.iterdir()] == ["10_bluefire"]
    pngs = sorted(sub.glob("*.png"))
    assert len(pngs) == 8 * len(STYLE_SEEN) and len(STYLE_SEEN) >= 6
    concepts = set()
    for png in pngs:
        caption = png.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert caption.startswith("bluefire style, a ")
        concept = png.stem.rsplit("_", 1)[0]
        assert concept in _words(caption)
        concepts.add(concept)
        with Image.open(png) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    assert concepts == set(STYLE_SEEN)
    again = write_style_dataset(tmp_path / "b", seed=7) / "10_bluefire"
    other = write_style_dataset(tmp_path / "c", seed=8) / "10_bluefire"
    same = [(sub / p.name).read_bytes() == p.read_bytes() for p in again.iterdir()]
    assert all(same) and len(same) == 2 * len(pngs)
    assert (sub / "circle_00.png").read_bytes() != (other / "circle_00.png").read_bytes()


def test_style_eval_split_holds_seen_and_unseen_concepts(tmp_path):
    write_style_dataset(tmp_path, seed=0, split="train")
    write_style_dataset(tmp_path, seed=0, split="eval")
    train = {p.read_bytes() for p in (tmp_path / "10_bluefire").glob("*.png")}
    held = sorted((tmp_path / "1_bluefire").glob("*.png"))
    assert {p.stem.rsplit("_", 1)[0] for p in held} == set(STYLE_SEEN + STYLE_UNSEEN)
    assert all(p.with_suffix(".txt").is_file() for p in held)
    assert not train & {p.read_bytes() for p in held}  # held out: no training image reappears
    with pytest.raises(ValueError):
        write_style_dataset(tmp_path, split="test")


def test_eval_prompts_seen_and_unseen():
    prompts = eval_prompts()
    assert prompts == eval_prompts() and len(prompts) == 30
    seen = [p for p, s in prompts if s]
    unseen = [p for p, s in prompts if not s]
    assert len(seen) == 9 and len(unseen) == 21
    assert all(p.startswith("bluefire style, ") for p, _ in prompts)
    assert all(set(_words(p)) & set(STYLE_SEEN) for p in seen)
    assert all(not set(_words(p)) & set(STYLE_SEEN) and set(_words(p)) & set(STYLE_UNSEEN) for p in unseen)


# ---------------------------------------------------------------- committed weights

def test_embedded_model_path_rejects_unknown_role():
    with pytest.raises(LoraxInputError, match="expected one of"):
        embedded_model_path("teacher")


@pytest.fixture(scope="module")
def pipes():
    from diffusers import StableDiffusionPipeline

    return {role: StableDiffusionPipeline.from_pretrained(embedded_model_path(role), safety_checker=None,
                                                          torch_dtype=torch.float32, local_files_only=True)
            for role in ("source", "target")}


def test_committed_models_are_fp16_and_small():
    total = 0
    for role in ("source", "target"):
        folder = embedded_model_path(role)
        for part, fname in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                            ("text_encoder", "model")):
            with safe_open(folder / part / f"{fname}.safetensors", "pt") as f:
                assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, (role, part)
        total += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 20 * 2**20


def test_committed_models_run_two_step_inference(pipes):
    for role, pipe in pipes.items():
        out = pipe("a red circle on a grass background", num_inference_steps=2, height=64, width=64,
                   generator=torch.Generator().manual_seed(0), output_type="np").images
        assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all(), role
        assert out.std() > 0.01, role  # not a blank image


def test_source_and_target_are_a_finetune_pair(pipes):
    src, tgt = pipes["source"], pipes["target"]
    # UNet fine-tuned: every attention Linear moved, but the top subspaces stay close
    report = compare_unets(src.unet, tgt.unet, rank=8)
    assert report["rel_change_median"] > 0.01
    assert 0.5 < report["phi_median"] < 0.9999
    # text encoder and VAE shared bit for bit, as in many real fine-tunes
    for a, b in ((src.text_encoder, tgt.text_encoder), (src.vae, tgt.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_build_report_shows_learning():
    report = json.loads((embedded_model_path("source").parent / "build_report.json").read_text())
    assert report["vae"]["recon_mse_after"] < 0.5 * report["vae"]["recon_mse_before"]
    assert report["source"]["eval_loss_base_after"] < 0.8 * report["source"]["eval_loss_base_before"]
    assert report["target"]["eval_loss_shifted_after"] < report["target"]["eval_loss_shifted_before"]


def test_subspace_phi_against_dense_projection():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(24, 16, generator=g)
    assert subspace_phi(a, a, 4) == pytest.approx(1.0)
    assert subspace_phi(a, 3 * a.clone(), 4) == pytest.approx(1.0)
    b = torch.randn(24, 16, generator=g)
    # independent computation: trace of the product of the two rank-4 projectors
    ua = torch.linalg.svd(a.double())[0][:, :4]
    ub = torch.linalg.svd(b.double())[0][:, :4]
    va = torch.linalg.svd(a.double())[2][:4].T
    vb = torch.linalg.svd(b.double())[2][:4].T
    want = min(float(torch.trace(ua @ ua.T @ ub @ ub.T)), float(torch.trace(va @ va.T @ vb @ vb.T))) / 4
    assert subspace_phi(a, b, 4) == pytest.approx(want, rel=1e-5)  # float32 bases, as the transfer's
    assert subspace_phi(a, b, 4) < 0.9


# ---------------------------------------------------------------- the build itself (tiny plan)

def test_build_is_deterministic_and_refuses_existing_output(tmp_path):
    from sd_scripts_lorax.testing.embedded.build import BuildPlan, build

    plan = BuildPlan(vae_steps=2, vae_images=6, base_images=4, shifted_images=4, eval_images=4,
                     source_steps=2, target_steps=2, batch=2)
    r1 = build(tmp_path / "a", seed=5, plan=plan, progress=False)
    build(tmp_path / "b", seed=5, plan=plan, progress=False)
    for role in ("source", "target"):
        f = f"{role}/unet/diffusion_pytorch_model.safetensors"
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a/source/model_index.json").is_file() and r1["bytes"]["source"] > 0
    with pytest.raises(LoraxInputError, match="output exists"):
        build(tmp_path / "a", seed=5, plan=plan, progress=False)
