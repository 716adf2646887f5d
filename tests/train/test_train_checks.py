"""The trainer's up-front checks (issue 13): each bad setting is one `error:` line naming the value or
file and exit 2, before the model loads, with nothing written (the folders' contents are compared)."""

from __future__ import annotations

import collections
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import train_network_lorax
from sd_scripts_lorax.train import checks
from sd_scripts_lorax.train.checkpoints import recover_state_folders
from sd_scripts_lorax.train.config import parse_args
from sd_scripts_lorax.train.run import run_training

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny_lorax.toml"
DATASET = REPO / "configs" / "tiny_lorax_dataset.toml"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))} if folder.exists() else {}


def refused(capsys, monkeypatch, *argv, words=()) -> str:
    """Run the trainer in this process; the model must never load."""
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr("sd_scripts_lorax.train.run.load_models", no_model)
    with pytest.raises(SystemExit) as exc:
        train_network_lorax.main(["--config_file", str(TINY), "--progress", "off", *map(str, argv)])
    assert exc.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert str(w) in err[0], err[0]
    return err[0]


# ---------------------------------------------------------------- output folder


def test_output_dir_is_a_file(capsys, monkeypatch, tmp_path):
    f = tmp_path / "out"
    f.write_text("mine")
    refused(capsys, monkeypatch, "--output_dir", f, words=[f, "is a file, not a folder"])
    assert snapshot(tmp_path) == {"out": b"mine"}


def test_output_dir_under_a_file(capsys, monkeypatch, tmp_path):
    f = tmp_path / "file"
    f.write_text("mine")
    refused(capsys, monkeypatch, "--output_dir", f / "run", words=[f / "run", f"{f} is a file"])
    assert snapshot(tmp_path) == {"file": b"mine"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_output_dir_not_writable(capsys, monkeypatch, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        refused(capsys, monkeypatch, "--output_dir", ro / "run", words=[ro, "not writable"])
        assert snapshot(tmp_path) == {"ro": b"<dir>"}
    finally:
        ro.chmod(0o700)


def test_output_disk_full(capsys, monkeypatch, tmp_path):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda p: usage(10 << 30, (10 << 30) - 4096, 4096))
    refused(capsys, monkeypatch, "--output_dir", tmp_path / "run", words=[tmp_path / "run", "disk is full",
                                                                          "4096 bytes free"])
    assert snapshot(tmp_path) == {}


# ---------------------------------------------------------------- numbers and files


@pytest.mark.parametrize("argv, words", [
    (["--max_train_steps", "0"], ["--max_train_steps 0", "at least 1"]),
    (["--max_train_steps", "-5"], ["--max_train_steps -5", "at least 1"]),
    (["--max_train_epochs", "0"], ["--max_train_epochs 0"]),
    (["--learning_rate", "nan"], ["--learning_rate nan", "finite number >= 0"]),
    (["--learning_rate", "-0.001"], ["--learning_rate -0.001"]),
    (["--unet_lr", "inf"], ["--unet_lr inf"]),
    (["--train_batch_size", "0"], ["--train_batch_size 0"]),
    (["--optimizer_type", "Nope"], ["optimizer_type 'Nope' is unknown"]),
])
def test_bad_numbers(capsys, monkeypatch, tmp_path, argv, words):
    refused(capsys, monkeypatch, "--output_dir", tmp_path / "run", *argv, words=words)
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("old, new, words", [
    ("batch_size = 4", "batch_size = 0", ["datasets[0] batch_size = 0", "at least 1"]),
    ("num_repeats = 1", "num_repeats = -2", ["datasets[0].subsets[0] num_repeats = -2", ">= 0"]),
])
def test_bad_dataset_numbers(capsys, monkeypatch, tmp_path, old, new, words):
    cfg = tmp_path / "ds.toml"
    text = DATASET.read_text().replace("../.cache", str(REPO / ".cache"))
    cfg.write_text(text.replace(old, new))
    before = snapshot(tmp_path)
    refused(capsys, monkeypatch, "--output_dir", tmp_path / "run", "--dataset_config", cfg, words=[cfg, *words])
    assert snapshot(tmp_path) == before


def test_binary_config_file(capsys, monkeypatch, tmp_path):
    cfg = tmp_path / "model.toml"
    cfg.write_bytes(b"\x80\x03\xff\xfe\x00binary" * 10)
    with pytest.raises(SystemExit) as exc:
        train_network_lorax.main(["--config_file", str(cfg), "--output_dir", str(tmp_path / "run")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(err) == 1 and str(cfg) in err[0] and "not a TOML text file" in err[0], err
    assert sorted(snapshot(tmp_path)) == ["model.toml"]


# ---------------------------------------------------------------- --resume


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    """A real state folder of a one-step tiny run (network_dim 8, AdamW)."""
    out = tmp_path_factory.mktemp("state_run")
    args = parse_args(["--config_file", str(TINY), "--output_dir", str(out), "--progress", "off",
                       "--max_train_steps", "1", "--save_state", "--save_every_n_steps", "0"])
    args["cache_latents"] = False
    run_training(args)
    return out / "tiny_lorax-state"


def damaged(state: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / "state"
    shutil.copytree(state, copy)
    if how == "truncated optimizer.bin":
        data = (copy / "optimizer.bin").read_bytes()
        (copy / "optimizer.bin").write_bytes(data[: len(data) // 3])
    elif how == "missing model.safetensors":
        (copy / "model.safetensors").unlink()
    elif how == "pickled object":
        import argparse
        torch.save({"state": argparse.Namespace(x=1)}, copy / "scheduler.bin")
    elif how == "truncated model.safetensors":
        data = (copy / "model.safetensors").read_bytes()
        (copy / "model.safetensors").write_bytes(data[:100])
    elif how == "bad train_state.json":
        (copy / "train_state.json").write_text("{not json")
    return copy


@pytest.mark.parametrize("how, words", [
    ("truncated optimizer.bin", ["optimizer.bin", "truncated or corrupt"]),
    ("missing model.safetensors", ["model.safetensors is missing"]),
    ("pickled object", ["scheduler.bin", "refused", "weights_only=False"]),
    ("truncated model.safetensors", ["model.safetensors", "truncated or corrupt"]),
    ("bad train_state.json", ["train_state.json", "unreadable"]),
])
def test_damaged_state(capsys, monkeypatch, tmp_path, state, how, words):
    copy = damaged(state, tmp_path, how)
    before = snapshot(tmp_path)
    line = refused(capsys, monkeypatch, "--output_dir", tmp_path / "run", "--resume", copy, words=words)
    assert str(copy) in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("argv, words", [
    (["--network_dim", "4"], ["network_dim = 8", "this run has 4"]),
    (["--optimizer_type", "SGDNesterov"], ['optimizer_type = "AdamW"', '"SGDNesterov"']),
    (["--pretrained_model_name_or_path", "/elsewhere/other-model"], ["model = tiny-sd1-lorax", "other-model"]),
])
def test_state_of_another_run(capsys, monkeypatch, tmp_path, state, argv, words):
    before = snapshot(state)
    refused(capsys, monkeypatch, "--output_dir", tmp_path / "run", "--resume", state, *argv, words=[state, *words])
    assert snapshot(state) == before and not (tmp_path / "run").exists()


def test_state_saved_with_the_run_identity(state):
    doc = json.loads((state / "train_state.json").read_text())
    assert doc["run"]["network_dim"] == "8" and doc["run"]["model"] == "tiny-sd1-lorax"


def test_half_swapped_state_folders_are_settled(tmp_path):
    """A kill between save_state's two renames: the previous state comes back, leftovers go."""
    old = tmp_path / ".run-step00000002-state.old"
    old.mkdir()
    (old / "train_state.json").write_text("{}")
    (tmp_path / ".run-step00000002-state.tmp").mkdir()
    (tmp_path / ".run-state.tmp").mkdir()
    (tmp_path / ".other-state.tmp").mkdir()  # another output_name's: not ours to touch
    recover_state_folders(tmp_path, "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other-state.tmp", "run-step00000002-state"]
    assert (tmp_path / "run-step00000002-state" / "train_state.json").is_file()


def test_a_save_failing_midway_is_one_error_and_leaves_nothing(tmp_path):
    """A disk filling up during training: the save is one LoraxInputError line, no temporary left."""
    import errno

    from sd_scripts_lorax.errors import LoraxInputError
    from sd_scripts_lorax.train.checkpoints import save_weights_atomic

    class FullDisk(torch.nn.Module):
        def save_weights(self, file, dtype, metadata):
            Path(file).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "earlier.safetensors").write_bytes(b"kept")
    with pytest.raises(LoraxInputError) as exc:
        save_weights_atomic(FullDisk(), tmp_path / "run.safetensors", None, {})
    assert str(exc.value).startswith(f"{tmp_path / 'run.safetensors'}: cannot write (No space left on device)")
    assert snapshot(tmp_path) == {"earlier.safetensors": b"kept"}


def test_a_state_save_failing_midway_is_one_error_and_leaves_nothing(tmp_path):
    import errno

    from sd_scripts_lorax.errors import LoraxInputError
    from sd_scripts_lorax.train.checkpoints import TrainState, save_state

    class FullDisk:
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, folder):
            (Path(folder) / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

    earlier = tmp_path / "run-step00000001-state"
    earlier.mkdir()
    (earlier / "train_state.json").write_text("{}")
    with pytest.raises(LoraxInputError) as exc:
        save_state(FullDisk(), tmp_path / "run-step00000002-state", TrainState(1, 2, 2, 0))
    assert str(exc.value) == (f"{tmp_path / 'run-step00000002-state'}: cannot write the training state "
                              "(No space left on device)")
    assert snapshot(tmp_path) == {"run-step00000001-state": b"<dir>",
                                  "run-step00000001-state/train_state.json": b"{}"}
