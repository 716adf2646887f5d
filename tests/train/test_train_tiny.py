"""configs/tiny_lorax.toml end to end: trains, the loss on held-fixed noise goes down, checkpoints,
samples and TensorBoard logs appear, and the output loads with networks.lora_x and diffusers."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from sd_scripts_lorax.train.config import parse_args
from sd_scripts_lorax.train.data_config import datasets_from_args
from sd_scripts_lorax.train.dataset import BucketedDataset
from sd_scripts_lorax.train.loss import make_noise_scheduler
from sd_scripts_lorax.train.models import encode_images, encode_text, load_models

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_lorax.toml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import train_network_lorax

    out = tmp_path_factory.mktemp("tiny")
    prompts = out / "prompts.txt"
    prompts.write_text("# comment\nbluefire style, a red circle --n blurry --w 64 --h 64 --d 7 --l 5 --s 3\n")
    train_network_lorax.main(["--config_file", str(TINY), "--output_dir", str(out / "run"), "--progress", "off",
                              "--sample_prompts", str(prompts), "--sample_every_n_steps", "40",
                              "--logging_dir", str(out / "logs")])
    return out


def _fixed_eval_loss(models, network_file: str | None) -> float:
    """MSE of the noise prediction on 16 training images at fixed noise and timesteps."""
    args = parse_args(["--config_file", str(TINY)])
    data = BucketedDataset(datasets_from_args(args, 64), 0)
    batch = data.make_batch(1, 0, list(range(16)))
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        lat = encode_images(models, batch.images, g)
        noise = torch.randn(lat.shape, generator=g)
        t = torch.linspace(50, 950, 16).long()
        noisy = make_noise_scheduler().add_noise(lat, noise, t)
        cond = encode_text(models, batch.captions, torch.device("cpu"))
        if network_file:
            lora_x = importlib.import_module("networks.lora_x")
            te = models.text_encoders[0]
            net, _ = lora_x.create_network_from_weights(1.0, network_file, models.vae, te, models.unet)
            net.apply_to(te, models.unet, True, True)
            info = net.load_weights(network_file)
            assert info["loaded"] == 192 and not info["missing"]
        return torch.nn.functional.mse_loss(models.unet(noisy, t, cond.hidden).sample, noise).item()


def test_tiny_config_trains_and_loss_goes_down(trained):
    run = trained / "run"
    final = run / "tiny_lorax.safetensors"
    assert final.is_file() and (run / "tiny_lorax-step00000020.safetensors").is_file()
    args = parse_args(["--config_file", str(TINY)])
    base = _fixed_eval_loss(load_models(args["pretrained_model_name_or_path"]), None)
    after = _fixed_eval_loss(load_models(args["pretrained_model_name_or_path"]), str(final))
    assert after < 0.9 * base, (base, after)


def test_samples_and_tensorboard(trained):
    samples = list((trained / "run" / "sample").glob("*.png"))
    assert len(samples) == 1
    events = list((trained / "logs").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss/current", "loss/average"} <= set(tags) and any(t.startswith("lr/") for t in tags)
    assert len(acc.Scalars("loss/current")) == 40


def test_diffusers_load_lora_weights(trained):
    from diffusers import StableDiffusionPipeline

    args = parse_args(["--config_file", str(TINY)])
    pipe = StableDiffusionPipeline.from_pretrained(args["pretrained_model_name_or_path"], safety_checker=None,
                                                   requires_safety_checker=False)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    h = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    file = str(trained / "run" / "tiny_lorax.safetensors")
    with torch.no_grad():
        before = pipe.unet(x, t, h).sample
        pipe.load_lora_weights(file)
        after = pipe.unet(x, t, h).sample
        # the same adapter through networks.lora_x on a fresh copy of the model gives the same output
        models = load_models(args["pretrained_model_name_or_path"])
        lora_x = importlib.import_module("networks.lora_x")
        te = models.text_encoders[0]
        net, _ = lora_x.create_network_from_weights(1.0, file, models.vae, te, models.unet)
        net.apply_to(te, models.unet, True, True)
        net.load_weights(file)
        ours = models.unet(x, t, h).sample
    assert not torch.allclose(before, after, atol=1e-3)
    assert torch.allclose(after, ours, atol=1e-4), (after - ours).abs().max()


def test_tag_frequency_gives_the_distill_prompts(trained):
    """ss_tag_frequency as `--method distill` reads it: the style trigger, then trigger + each caption's content."""
    import json

    from sd_scripts_lorax.formats.lora_file import read_lora
    from sd_scripts_lorax.transfer.distill.prompts import from_metadata

    path = trained / "run" / "tiny_lorax.safetensors"
    meta = read_lora(path).metadata
    assert json.loads(meta["ss_tag_frequency"])["10_bluefire"]["bluefire style"] == 24
    sets = from_metadata(meta, path)
    assert sets.adapter[0] == "bluefire style" and len(sets.adapter) > 1
    assert all(p.startswith("bluefire style, ") for p in sets.adapter[1:])
    assert sets.identity and not any("bluefire" in p for p in sets.identity)
