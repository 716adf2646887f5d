"""Trainer config: TOML vs CLI precedence, flattening, unknown keys, type errors, --output_config."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sd_scripts_lorax.errors import LoraxInputError
from sd_scripts_lorax.train.config import DEFAULTS, load_config_file, parse_args, parse_resolution

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_toml_sections_are_flattened_and_cli_overrides(tmp_path):
    cfg = _write(tmp_path / "c.toml", """
[model]
pretrained_model_name_or_path = "models/base"
[network]
network_dim = 32
network_args = ["conv_dim=4", "conv_alpha=1"]
[optimization]
learning_rate = 1e-3
gradient_checkpointing = true
lr_warmup_steps = 0.05
""")
    args = parse_args(["--config_file", str(cfg), "--network_dim", "16", "--max_train_steps", "7"])
    assert args["network_dim"] == 16                      # CLI wins over TOML
    assert args["learning_rate"] == 1e-3                  # TOML wins over default
    assert args["max_train_steps"] == 7
    assert args["gradient_checkpointing"] is True
    assert args["network_args"] == ["conv_dim=4", "conv_alpha=1"]
    assert args["lr_warmup_steps"] == 0.05
    assert args["optimizer_type"] == DEFAULTS["optimizer_type"] == "AdamW"
    # relative paths resolve against the TOML's folder, not the working folder
    assert args["pretrained_model_name_or_path"] == str((tmp_path / "models/base").resolve())


def test_cli_only_defaults():
    args = parse_args(["--output_dir", "o"])
    assert args["network_module"] == "networks.lora_x"
    assert args["max_train_steps"] == 1600 and args["lr_scheduler"] == "constant"
    assert args["output_dir"] == "o"


def test_unknown_key_warned_and_not_used(tmp_path):
    cfg = _write(tmp_path / "c.toml", "[a]\nnetwork_dim = 8\nnot_an_option = 3\n")
    with pytest.warns(UserWarning, match="not_an_option"):
        out = load_config_file(cfg)
    assert out == {"network_dim": 8}


def test_bad_value_names_key_and_file(tmp_path):
    cfg = _write(tmp_path / "c.toml", "network_dim = \"eight\"\n")
    with pytest.raises(LoraxInputError, match=r"c\.toml.*network_dim"):
        load_config_file(cfg)
    cfg2 = _write(tmp_path / "d.toml", "lr_scheduler = \"sawtooth\"\n")
    with pytest.raises(LoraxInputError, match=r"d\.toml.*lr_scheduler"):
        load_config_file(cfg2)
    with pytest.raises(LoraxInputError, match="not valid TOML"):
        load_config_file(_write(tmp_path / "e.toml", "a = = 1\n"))


def test_output_config_dumps_effective_config(tmp_path, capsys):
    cfg = _write(tmp_path / "c.toml", "[x]\nnetwork_dim = 8\nlearning_rate = 0.5\n")
    with pytest.raises(SystemExit) as exc:
        parse_args(["--config_file", str(cfg), "--learning_rate", "0.25", "--output_config"])
    assert exc.value.code == 0
    dumped = tomllib.loads(capsys.readouterr().out)
    assert dumped["network_dim"] == 8 and dumped["learning_rate"] == 0.25
    # kohya style: --config_file naming a new file receives the dump; it round-trips
    new = tmp_path / "new.toml"
    with pytest.raises(SystemExit):
        parse_args(["--config_file", str(new), "--network_dim", "12", "--output_config"])
    assert parse_args(["--config_file", str(new)])["network_dim"] == 12


def test_resolution_parsing():
    assert parse_resolution("512", 1024) == (512, 512)
    assert parse_resolution("512,768", 1024) == (512, 768)
    assert parse_resolution(None, 1024) == (1024, 1024)
    with pytest.raises(LoraxInputError):
        parse_resolution("a,b", 512)


def test_cli_bad_input_exits_2(tmp_path):
    """A real entry-point run: missing config -> one error line, exit 2, nothing written."""
    r = subprocess.run([sys.executable, str(REPO / "train_network_lorax.py"), "--config_file",
                        str(tmp_path / "missing.toml")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "missing.toml" in err[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, family_res", [("sd15", 512), ("sdxl", 1024)])
def test_paper_configs_parse(name, family_res):
    """The shipped paper configs: rank 320, AdamW 1e-3 constant, batch 8, min-SNR 5, 5000 steps."""
    from sd_scripts_lorax.train.data_config import load_dataset_config

    args = parse_args(["--config_file", str(REPO / "configs" / f"{name}_lorax.toml")])
    assert (args["network_module"], args["network_dim"], args["optimizer_type"]) == ("networks.lora_x", 320, "AdamW")
    assert (args["learning_rate"], args["lr_scheduler"], args["min_snr_gamma"]) == (1e-3, "constant", 5.0)
    assert args["max_train_steps"] == 5000 and args["gradient_checkpointing"]
    (ds,) = load_dataset_config(args["dataset_config"], args, family_res)
    assert ds.batch_size == 8 and ds.buckets.resolution == (family_res, family_res)
