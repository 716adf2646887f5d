"""The lorax.* keys of a file our trainer saves, and the precision names its options map through."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sd_scripts_lorax import FORMAT_VERSION, NETWORK_MODULE
from sd_scripts_lorax.errors import LoraxInputError
from sd_scripts_lorax.formats.checkpoint import Checkpoint
from sd_scripts_lorax.formats.lora_file import is_lorax
from sd_scripts_lorax.formats.precision import PRECISION_DTYPES, precision_dtype
from sd_scripts_lorax.train.config import OPTIONS_BY_NAME, parse_args
from sd_scripts_lorax.train.run import run_training

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_lorax.toml"


def test_trained_file_carries_the_lorax_keys_with_the_source_model(tmp_path):
    args = parse_args(["--config_file", str(TINY), "--output_dir", str(tmp_path), "--progress", "off",
                       "--max_train_steps", "1", "--max_data_loader_n_workers", "0"])
    args["cache_latents"] = False  # one step: encoding all images first costs more than it saves
    res = run_training(args)
    with safe_open(str(res["final"]), "pt") as f:
        md = f.metadata()
    model = Path(args["pretrained_model_name_or_path"])
    with Checkpoint.open(model) as ckpt:
        hashes = ckpt.hashes()
    assert md["ss_network_module"] == NETWORK_MODULE and is_lorax(md)
    assert md["lorax.format_version"] == FORMAT_VERSION
    assert md["lorax.rank"] == str(args["network_dim"]) == "8"
    # the source model as kohya records it: its folder name and its full sha256
    assert md["lorax.source_model_name"] == md["ss_sd_model_name"] == model.name == "tiny-sd1-lorax"
    assert md["lorax.source_model_hash"] == md["ss_new_sd_model_hash"] == hashes.sha256
    assert len(hashes.sha256) == 64
    assert not any(k.startswith("lorax.target") for k in md)  # a trained file has no transfer target


def test_every_precision_option_name_has_its_dtype():
    for option in ("mixed_precision", "save_precision"):
        assert set(OPTIONS_BY_NAME[option].choices) <= set(PRECISION_DTYPES)
    assert precision_dtype("no") == precision_dtype("float") == precision_dtype("fp32") == torch.float32
    assert (precision_dtype("fp16"), precision_dtype("bf16")) == (torch.float16, torch.bfloat16)
    assert precision_dtype(None) is None  # --save_precision not given: the network's dtype
    with pytest.raises(LoraxInputError, match=r"--dtype must be one of fp32, fp16, bf16, got 'float64'"):
        precision_dtype("float64", "dtype", ("fp32", "fp16", "bf16"))
