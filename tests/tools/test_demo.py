"""sd_scripts_lorax.tools.evaluate (the demo's metrics) and the demo's helpers, on the embedded tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from sd_scripts_lorax.tools import evaluate
from sd_scripts_lorax.tools.demo import _Stream, draw_grid, format_table, load_folder_images
from sd_scripts_lorax.testing.embedded import embedded_model_path, write_style_dataset
from sd_scripts_lorax.network.lorax_network import create_network

SOURCE = embedded_model_path("source")


def _lorax_file(path, seed: int, scale: float = 0.5, rank: int = 4):
    """A LoRA-X file for the embedded source with random d (seeded)."""
    v = evaluate.load_variant(SOURCE)
    net = create_network(1.0, rank, None, v.vae, v.text_encoder, v.unet)
    net.apply_to(v.text_encoder, v.unet, apply_text_encoder=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.applied_loras():
            m.d.copy_(torch.randn(m.d.shape, generator=gen) * scale)
    net.save_weights(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    a = _lorax_file(tmp / "a.safetensors", seed=1)
    b = _lorax_file(tmp / "b.safetensors", seed=2)
    eval_dir = write_style_dataset(tmp / "eval", seed=0, split="eval", per_concept=1) / "1_bluefire"
    images, captions = load_folder_images(eval_dir)
    base = evaluate.load_variant(SOURCE)
    data = evaluate.make_eval_set(base.vae, images, captions, seed=0, repeats=2)
    preds = {"none": evaluate.noise_predictions(base, data)}
    for name, path in (("a", a), ("a again", a), ("b", b)):
        preds[name] = evaluate.noise_predictions(evaluate.load_variant(SOURCE, path), data)
    return {"a": a, "b": b, "data": data, "preds": preds, "base": base}


def test_merge_matches_dense_update(setup):
    """The merged UNet weight is W + up @ down (scale 1), computed independently from the file."""
    sd = load_file(str(setup["a"]))
    merged = evaluate.load_variant(SOURCE, setup["a"]).unet
    base = setup["base"].unet
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    up, down = sd[f"{name}.lora_up.weight"].double(), sd[f"{name}.lora_down.weight"].double()
    alpha = float(sd[f"{name}.alpha"])
    want = base.get_submodule(path).weight.double() + up @ down * (alpha / down.shape[0])
    got = merged.get_submodule(path).weight.double()
    assert (up @ down).abs().max() > 1e-3  # the update is not trivially zero
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_identical_adapters_share_one_cosine_one(setup):
    rows = {r.name: r for r in evaluate.compare(setup["preds"], setup["data"], "none", "a")}
    assert rows["a again"].cosine == pytest.approx(1.0, abs=1e-9)
    assert rows["a again"].share == pytest.approx(1.0, abs=1e-9)
    assert rows["a again"].rel_mse == pytest.approx(0.0, abs=1e-9)
    assert rows["none"].share == 0.0 and rows["none"].cosine == 0.0 and rows["none"].rel_mse == 1.0
    # a different random adapter changes the predictions in a different direction
    assert rows["b"].cosine < 0.9
    assert rows["b"].rel_mse > 0.1
    assert rows["a"].loss != rows["none"].loss


def test_loss_is_mse_against_the_fixed_noise(setup):
    data, pred = setup["data"], setup["preds"]["none"]
    squared = sum(float(((pred[i].double() - data.noise[i].double()) ** 2).sum()) for i in range(len(data)))
    manual = squared / pred.numel()
    assert evaluate.denoising_loss(pred, data) == pytest.approx(manual, rel=1e-9)
    assert evaluate.denoising_loss(data.noise, data) == 0.0


def test_eval_set_is_deterministic_and_spread(setup):
    data = setup["data"]
    images = torch.zeros(2, 3, 64, 64)
    one = evaluate.make_eval_set(setup["base"].vae, images, ["a", "b"], seed=3, repeats=2)
    two = evaluate.make_eval_set(setup["base"].vae, images, ["a", "b"], seed=3, repeats=2)
    assert torch.equal(one.noise, two.noise) and torch.equal(one.timesteps, two.timesteps)
    assert one.captions == ["a", "a", "b", "b"]
    t = evaluate.spread_timesteps(10, 1000, repeats=3)
    assert t.shape == (30,) and t.min() < 50 and t.max() > 950 and len(set(t.tolist())) == 30
    # each item sees low and high noise
    per_item = t.reshape(10, 3)
    assert (per_item.max(1).values - per_item.min(1).values > 500).all()
    assert data.latents.shape[0] == len(data.captions) == data.noise.shape[0] == data.timesteps.shape[0]
    assert abs(float(data.latents.std()) - 1.0) < 0.5  # SD1 scaling gives roughly unit latents


def test_improvement_share_and_cosine_math():
    assert evaluate.improvement_share(0.9, 1.0, 0.8) == pytest.approx(0.5)
    assert evaluate.improvement_share(1.1, 1.0, 0.8) == pytest.approx(-0.5)
    assert math.isnan(evaluate.improvement_share(1.0, 1.0, 1.0))
    none = torch.zeros(4, 2)
    ref = torch.ones(4, 2)
    assert evaluate.change_cosine(-ref, none, ref) == pytest.approx(-1.0)
    assert evaluate.change_cosine(2 * ref, none, ref) == pytest.approx(1.0)
    assert evaluate.change_relative_mse(2 * ref, none, ref) == pytest.approx(1.0)
    assert evaluate.change_relative_mse(0.5 * ref, none, ref) == pytest.approx(0.25)


def test_stream_condenses_progress():
    lines = []
    s = _Stream("t", lines.append)
    for i in range(101):
        s.line(f"steps: {i}%| {i}/100 [00:01<00:00, 2.0it/s]")
    s.line("Loading weights: 100%| 36/36 [00:00]")
    s.line("saved x.safetensors")
    assert 10 <= len(lines) <= 13
    assert lines[-1].endswith("saved x.safetensors")
    assert not any("Loading weights" in ln for ln in lines)


def test_grid_and_table(tmp_path):
    from PIL import Image

    rows = [(f"row {i}", [Image.new("RGB", (64, 64), (40 * i, 0, 0))] * 3) for i in range(4)]
    grid = draw_grid(rows, ["a", "b", "c"], cell=96)
    assert grid.size[1] > 4 * 96 and grid.size[0] > 3 * 96
    # the first image of row 2 is pasted where it belongs
    px = grid.getpixel((grid.size[0] - 3 * 96 + 5, grid.size[1] - 2 * 96 + 5))
    assert px == (80, 0, 0)
    out = []
    text = format_table([evaluate.Row("x", 0.1, 0.5, 0.9, 0.2)], out.append)
    assert "| x | 0.10000 | 50.0 % | 0.900 | 0.200 |" in text
