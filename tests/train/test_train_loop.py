"""The training loop end to end on tiny models: resume bit for bit, lycoris through our loop,
SDXL conditioning, atomic saves, bad input -> exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sd_scripts_lorax.train.checkpoints import save_weights_atomic
from sd_scripts_lorax.train.config import parse_args
from sd_scripts_lorax.train.run import run_training

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_lorax.toml"


def _args(out: Path, *extra: str, cache: bool = False) -> dict:
    args = parse_args(["--config_file", str(TINY), "--output_dir", str(out), "--progress", "off", *extra])
    args["cache_latents"] = cache  # short runs: encoding all 24 images first costs more than it saves
    return args


def test_resume_is_bit_for_bit(tmp_path):
    common = ["--gradient_accumulation_steps", "2", "--save_state", "--max_data_loader_n_workers", "0"]
    straight = run_training(_args(tmp_path / "a", "--max_train_steps", "4", *common))
    first = run_training(_args(tmp_path / "b", "--max_train_steps", "2", *common))
    state = tmp_path / "b" / "tiny_lorax-state"
    assert (state / "train_state.json").is_file()
    resumed = run_training(_args(tmp_path / "b", "--max_train_steps", "4", "--resume", str(state), *common))
    assert first["global_step"] == 2 and resumed["global_step"] == straight["global_step"] == 4
    assert resumed["losses"] == straight["losses"][2:]
    a, b = load_file(straight["final"]), load_file(resumed["final"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ups = [k for k in a if k.endswith("lora_up.weight")]
    assert any(a[k].abs().max() > 0 for k in ups)  # it did train
    with safe_open(straight["final"], "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "networks.lora_x" and md["ss_steps"] == "4"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and md["ss_base_model_version"] == "sd_v1"


def test_lycoris_lora_trains_through_our_loop(tmp_path):
    pytest.importorskip("lycoris")
    res = run_training(_args(tmp_path, "--network_module", "lycoris.kohya", "--network_args", "algo=lora",
                             "preset=attn-mlp", "--network_dim", "4", "--network_alpha", "4",
                             "--max_train_steps", "2", "--save_every_n_steps", "1", "--output_name", "ly"))
    assert (tmp_path / "ly-step00000001.safetensors").is_file() and res["final"] == tmp_path / "ly.safetensors"
    sd = load_file(res["final"])
    assert sd and all(k.startswith("lora_unet_") for k in sd)   # network_train_unet_only in the tiny config
    assert any(k.endswith(".lora_down.weight") for k in sd)
    with safe_open(res["final"], "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "lycoris.kohya" and '"algo": "lora"' in md["ss_network_args"]


def test_sdxl_conditioning_shapes_and_one_step(tmp_path):
    from sd_scripts_lorax.train.models import encode_text, load_models
    from sd_scripts_lorax.train.tiny_data import ensure_embedded

    model = REPO / ".cache" / "tiny-sdxl-lorax"
    ensure_embedded(model)
    m = load_models(str(model), sdxl=True)
    assert m.family == "sdxl"
    cond = encode_text(m, ["a red circle", "blue"], torch.device("cpu"), original_sizes=[(80, 64), (64, 64)],
                       crop_top_lefts=[(8, 0), (0, 0)], target_size=(64, 64))
    h1 = m.text_encoders[0].config.hidden_size
    h2 = m.text_encoders[1].config.hidden_size
    assert cond.hidden.shape == (2, 77, h1 + h2) == (2, 77, m.unet.config.cross_attention_dim)
    assert cond.pooled.shape == (2, m.text_encoders[1].config.projection_dim)
    assert cond.time_ids.tolist() == [[80, 64, 8, 0, 64, 64], [64, 64, 0, 0, 64, 64]]
    # hidden_states[-2] of each encoder, not the last layer
    ids = m.tokenizers[0](["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ref = m.text_encoders[0](ids, output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(cond.hidden[:1, :, :h1], ref)
    with pytest.raises(Exception, match="--v2 given"):
        load_models(str(model), v2=True)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --l 3 --d 1\n")
    res = run_training(_args(tmp_path, "--pretrained_model_name_or_path", str(model), "--sdxl",
                             "--max_train_steps", "1", "--network_dim", "4", "--sample_prompts", str(prompts),
                             "--sample_every_n_steps", "1", "--sample_sampler", "euler_a"))
    assert len(list((tmp_path / "sample").glob("*.png"))) == 1  # SDXL pipeline on the live adapter
    sd = load_file(res["final"])
    assert any(k.startswith("lora_unet_input_blocks_") for k in sd)  # SAI names for SDXL
    with safe_open(res["final"], "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"


class _Boom(torch.nn.Module):
    def save_weights(self, file, dtype, metadata):
        Path(file).write_bytes(b"half a file")
        raise KeyboardInterrupt


def test_interrupted_save_leaves_no_partial_file(tmp_path):
    final = tmp_path / "x.safetensors"
    final.write_bytes(b"previous complete file")
    with pytest.raises(KeyboardInterrupt):
        save_weights_atomic(_Boom(), final, None, {})
    assert final.read_bytes() == b"previous complete file"
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


@pytest.mark.parametrize("extra, needle", [
    (["--device", "cuda"], "CUDA is not available"),
    (["--pretrained_model_name_or_path", "{tmp}/weird"], "unknown model family"),
    (["--pretrained_model_name_or_path", "{tmp}/missing"], "not found"),
    (["--pretrained_model_name_or_path", "{tmp}/unknown.safetensors"], "unknown architecture"),
    (["--resolution", "72", "--dataset_config", "{tmp}/none.toml"], "none.toml: config file not found"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, extra, needle):
    import train_network_lorax

    if torch.cuda.is_available() and "cuda" in extra:
        pytest.skip("CUDA present")
    weird = tmp_path / "weird"
    (weird / "unet").mkdir(parents=True)
    (weird / "unet" / "config.json").write_text("{}")
    (weird / "text_encoder").mkdir()
    (weird / "text_encoder" / "config.json").write_text('{"hidden_act": "relu"}')
    from safetensors.torch import save_file
    save_file({"foo.weight": torch.zeros(2, 2)}, str(tmp_path / "unknown.safetensors"))
    argv = ["--config_file", str(TINY), "--output_dir", str(tmp_path / "out"), "--progress", "off"]
    argv += [e.replace("{tmp}", str(tmp_path)) for e in extra]
    with pytest.raises(SystemExit) as exc:
        train_network_lorax.main(argv)
    assert exc.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "out").exists()


def test_single_file_checkpoint_trains(tmp_path):
    """An LDM-layout single file (the project's tiny fixture) loads with the same weights as its
    diffusers twin and trains."""
    from sd_scripts_lorax.testing.fixtures import write_fixture
    from sd_scripts_lorax.train.models import load_models

    single = write_fixture("sd1", "single_file", "tiny", 3, tmp_path / "m.safetensors")
    folder = write_fixture("sd1", "diffusers", "tiny", 3, tmp_path / "m")
    a, b = load_models(str(single)), load_models(str(folder))
    for x, y in ((a.unet, b.unet), (a.text_encoders[0], b.text_encoders[0]), (a.vae, b.vae)):
        sx, sy = x.state_dict(), y.state_dict()
        assert all(torch.equal(sx[k], sy[k].reshape(sx[k].shape)) for k in sx)
    res = run_training(_args(tmp_path / "out", "--pretrained_model_name_or_path", str(single),
                             "--max_train_steps", "1"))
    with safe_open(res["final"], "pt") as f:
        assert f.metadata()["ss_sd_model_name"] == "m.safetensors"


def test_feature_flags_together(tmp_path):
    """bf16 autocast, gradient checkpointing, v target, noise offset, clip skip, TE training, epoch
    saves, latents cached to disk, buckets and flips, in one short run."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(REPO / ".cache" / "tiny-bluefire" / "10_bluefire", data / "2_bluefire")
    for p in sorted((data / "2_bluefire").glob("*.png"))[8:]:
        p.unlink()
        p.with_suffix(".txt").unlink()
    args = _args(tmp_path / "out", "--mixed_precision", "bf16", "--gradient_checkpointing", "--v_parameterization",
                 "--noise_offset", "0.05", "--clip_skip", "2", "--max_train_epochs", "2", "--save_every_n_epochs",
                 "1", "--gradient_accumulation_steps", "2", "--cache_latents_to_disk", "--train_data_dir",
                 str(data), "--caption_extension", ".txt", "--resolution", "64", "--enable_bucket",
                 "--min_bucket_reso", "64", "--max_bucket_reso", "128", "--flip_aug", "--min_snr_gamma", "5",
                 "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.5", "--output_name", "ff",
                 "--train_batch_size", "4")
    args.update(network_train_unet_only=False, dataset_config=None)  # a TOML store_true cannot be unset on the CLI
    res = run_training(args)
    # 8 images x 2 repeats / batch 4 = 4 batches per epoch, 2 per update -> 2 steps per epoch
    assert res["global_step"] == 4 and all(torch.isfinite(torch.tensor(res["losses"])))
    assert (tmp_path / "out" / "ff-000001.safetensors").is_file()
    assert not (tmp_path / "out" / "ff-000002.safetensors").exists()  # the last epoch is the final file
    assert len(list((data / "2_bluefire").glob("*.npz"))) == 8
    sd = load_file(res["final"])
    assert any(k.startswith("lora_te_") for k in sd) and any(k.startswith("lora_unet_") for k in sd)
    with safe_open(res["final"], "pt") as f:
        md = f.metadata()
    assert md["modelspec.prediction_type"] == "v" and md["ss_base_model_version"] == "sd_v1_v"
    assert md["ss_mixed_precision"] == "bf16" and md["ss_clip_skip"] == "2"
