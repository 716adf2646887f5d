"""One clean line (issue 13): torch pickles (refusal text whole, legacy files without warnings),
`inspect` on a torch-saved LoRA, warnings as one line, and no bitsandbytes noise in the trainer."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sd_scripts_lorax.errors import LoraxInputError, cli_errors
from sd_scripts_lorax.formats.lora_file import read_lora
from sd_scripts_lorax.tools.inspect import inspect_path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"{NAME}.lora_down.weight": torch.randn(4, 32, generator=g),
            f"{NAME}.lora_up.weight": torch.randn(32, 4, generator=g), f"{NAME}.alpha": torch.tensor(4.0)}


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_saved_lora_reads_without_warnings_and_inspects_as_a_lora(tmp_path, legacy):
    path = tmp_path / ("lora.ckpt" if legacy else "lora.pt")
    torch.save(state_dict(), path, _use_new_zipfile_serialization=not legacy)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lf = read_lora(path)
        report = inspect_path(path, with_hashes=False)
    assert [str(w.message) for w in seen] == []
    assert list(lf.modules) == [NAME]
    assert report["kind"] == "lora" and json.dumps(report)


def test_torch_saved_checkpoint_still_inspects_as_a_checkpoint(tmp_path, tiny_sd1_single):
    from safetensors.torch import load_file

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(tiny_sd1_single)}, path)
    assert inspect_path(path, with_hashes=False)["kind"] == "checkpoint"


def test_unsafe_pickle_refusal_is_whole_and_names_the_object(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": argparse.Namespace(a=1)}, path)
    with pytest.raises(LoraxInputError) as exc:
        read_lora(path)
    text = str(exc.value)
    assert text.startswith(f"{path}: refused:") and "argparse.Namespace" in text
    assert text.endswith("convert it to .safetensors with a tool you trust")
    assert "\n" not in text and "\x1b" not in text and "weights_only` set to `False" not in text


def test_cli_warnings_are_one_line(capsys):
    with cli_errors():
        warnings.warn("a: first\nsecond half of the same warning", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err == "warning: a: first\nsecond half of the same warning\n"
    with cli_errors():
        warnings.warn("b", UserWarning, stacklevel=1)
    assert capsys.readouterr().err.splitlines() == ["warning: b"]


def test_trainer_error_after_model_loading_is_one_line(tmp_path):
    """bitsandbytes (imported by diffusers/peft when installed) stays hidden: no kernel message, no
    loading bars with --progress off; the error comes from after the model loaded."""
    res = subprocess.run([sys.executable, str(ROOT / "train_network_lorax.py"), "--config_file",
                          str(ROOT / "configs" / "tiny_lorax.toml"), "--output_dir", str(tmp_path / "run"),
                          "--progress", "off", "--network_module", "no_such.module"],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == ["error: network_module 'no_such.module' cannot be imported "
                                       "(No module named 'no_such')"]
