"""transfer_lorax.py's outputs as one unit (issue 13): clashes between outputs and with inputs (also
through symlinks and hard links) refused before any work, a failed write leaves no output at all,
stale temporaries of killed runs are removed, and the messages name the right problem.

Each case runs the entry point in this process (fast) and asserts the exit code, the one stderr
line naming the file, and the folder's contents (names and bytes) before and after.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

import transfer_lorax
from sd_scripts_lorax.formats.checkpoint import Checkpoint
from sd_scripts_lorax.formats.lora_file import LoraModule, lorax_metadata, minimum_kohya_metadata, read_lora, write_lora
from sd_scripts_lorax.lorax import lorax_factors, top_bases

DEAD_PID = 99_999_999  # above any pid_max: no such process


def lorax_file(ckpt: Path, out: Path, only: int = 6) -> Path:
    """A small LoRA-X file (rank 4) over the first `only` attention modules of `ckpt`."""
    g = torch.Generator().manual_seed(0)
    mods = []
    with Checkpoint.open(ckpt) as c:
        refs = [r for n, r in sorted(c.modules().items()) if r.group == "attn" and n.startswith("lora_unet")][:only]
        for ref in refs:
            b = top_bases(c.weight(ref), 4)
            up, down = lorax_factors(b, b.s * 0.3 * torch.randn(b.rank, generator=g), ref.shape)
            mods.append(LoraModule(ref.lora_name, down, up, float(b.rank)))
        meta = {**minimum_kohya_metadata(c.family, "networks.lora_x", [4], [4.0]), **lorax_metadata(4, c.name, "0")}
    return write_lora(out, mods, meta, overwrite=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_sd1_single, tiny_sd1_single_derived):
    """(lora, source, target) copied into one folder, so the tests can link to them."""
    folder = tmp_path_factory.mktemp("clash_inputs")
    src, tgt = folder / "src.safetensors", folder / "tgt.safetensors"
    src.write_bytes(tiny_sd1_single.read_bytes())
    tgt.write_bytes(tiny_sd1_single_derived.read_bytes())
    return lorax_file(src, folder / "style.safetensors"), src, tgt


def snapshot(*folders: Path) -> dict[str, bytes]:
    """Every entry under the folders (hidden ones too) with its bytes; links by their target."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            key = str(p)
            if p.is_symlink():
                out[key] = b"->" + os.readlink(p).encode()
            elif p.is_file():
                out[key] = p.read_bytes()
            else:
                out[key] = b"<dir>"
    return out


def run(capsys, *args) -> tuple[int, list[str], str]:
    """(exit code, stderr lines without blanks, stdout) of transfer_lorax.main."""
    try:
        code = transfer_lorax.main(["--no_progress", *map(str, args)])
    except SystemExit as exc:
        code = exc.code
    cap = capsys.readouterr()
    return code, [ln for ln in cap.err.splitlines() if ln.strip()], cap.out


def refused(capsys, *args, words=()) -> str:
    code, err, _ = run(capsys, *args)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert str(w) in err[0], err[0]
    return err[0]


def base_args(pair, out):
    lora, src, tgt = pair
    return ["--lora", lora, "--source_model", src, "--target_model", tgt, "--save_to", out, "--threshold", "0"]


# ---------------------------------------------------------------- clashes


def _link(kind: str, link: Path, target: Path) -> Path:
    if kind == "symlink":
        link.symlink_to(target)
    elif kind == "hardlink":
        os.link(target, link)
    return link


@pytest.mark.parametrize("victim", ["lora", "target", "source"])
@pytest.mark.parametrize("kind", ["same path", "symlink", "hardlink"])
def test_save_to_an_input_is_refused_even_with_overwrite(capsys, tmp_path, pair, victim, kind):
    lora, src, tgt = pair
    inp = {"lora": lora, "target": tgt, "source": src}[victim]
    out = inp if kind == "same path" else _link(kind, tmp_path / "out.safetensors", inp)
    before = snapshot(tmp_path, inp.parent)
    line = refused(capsys, *base_args(pair, out), "--overwrite", words=[out, "--save_to", inp])
    flag = {"lora": "--lora", "target": "--target_model", "source": "--source_model"}[victim]
    assert flag in line and ("symlink or a hard link" in line) == (kind != "same path")
    assert snapshot(tmp_path, inp.parent) == before


@pytest.mark.parametrize("kind", ["same path", "symlink", "hardlink"])
def test_report_and_save_to_naming_one_file(capsys, tmp_path, pair, kind):
    out = tmp_path / "out.safetensors"
    if kind == "hardlink":
        out.write_bytes(b"old")  # a hard link needs an existing file
    report = out if kind == "same path" else _link(kind, tmp_path / "r.json", out)
    before = snapshot(tmp_path)
    refused(capsys, *base_args(pair, out), "--report", report, "--overwrite",
            words=[report, "--report and --save_to", "same file"])
    assert snapshot(tmp_path) == before


def test_plot_equal_to_report(capsys, tmp_path, pair):
    before = snapshot(tmp_path)
    refused(capsys, *base_args(pair, tmp_path / "o.safetensors"), "--report", tmp_path / "r.json",
            "--plot", tmp_path / "r.json", words=[tmp_path / "r.json", "--report and --plot"])
    assert snapshot(tmp_path) == before == {}


def test_report_naming_an_existing_folder(capsys, tmp_path, pair):
    (tmp_path / "r.json").mkdir()
    before = snapshot(tmp_path)
    refused(capsys, *base_args(pair, tmp_path / "o.safetensors"), "--report", tmp_path / "r.json", "--overwrite",
            words=[tmp_path / "r.json", "is a folder"])
    assert snapshot(tmp_path) == before


def test_output_inside_an_input_folder(capsys, tmp_path, tiny_sd1_diffusers, tiny_sd1_single):
    lora = lorax_file(tiny_sd1_single, tmp_path / "style.safetensors")
    out = tiny_sd1_diffusers / "unet" / "lora.safetensors"
    before = snapshot(tiny_sd1_diffusers)
    refused(capsys, "--lora", lora, "--source_model", tiny_sd1_single, "--target_model", tiny_sd1_diffusers,
            "--save_to", out, words=[out, "inside the --target_model folder"])
    assert snapshot(tiny_sd1_diffusers) == before


# ---------------------------------------------------------------- all or nothing


def test_a_failed_report_write_leaves_no_adapter(capsys, tmp_path, pair, monkeypatch):
    from sd_scripts_lorax.transfer import engine

    def full_disk(reports, path):
        Path(path).write_bytes(b"{ half")  # a partial temporary, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine, "write_json", full_disk)
    out, report = tmp_path / "o.safetensors", tmp_path / "r.json"
    refused(capsys, *base_args(pair, out), "--report", report, "--plot", tmp_path / "p.png",
            words=[report, "No space left on device"])
    assert snapshot(tmp_path) == {}  # no adapter, no plot, no temporary
    monkeypatch.undo()
    # and the next run is not blocked
    code, err, outp = run(capsys, *base_args(pair, out), "--report", report)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors", "r.json"]
    assert read_lora(out).modules and json.loads(report.read_text())["summary"]


def test_stale_temporaries_of_killed_runs_are_removed(capsys, tmp_path, pair):
    out = tmp_path / "o.safetensors"
    dead = [tmp_path / f".o.safetensors.{DEAD_PID}-abc123xy.tmp.safetensors",
            tmp_path / f"..o.safetensors.{DEAD_PID}-abc123xy.tmp.safetensors.{DEAD_PID}-zz.tmp.safetensors",
            tmp_path / f".r.json.{DEAD_PID}-q1w2e3r4.tmp.json"]
    alive = tmp_path / f".o.safetensors.{os.getppid()}-livewrit.tmp.safetensors"  # a live writer's
    other = tmp_path / ".notes.txt"
    for p in [*dead, alive, other]:
        p.write_bytes(b"x" * 100)
    code, err, _ = run(capsys, *base_args(pair, out), "--report", tmp_path / "r.json")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, "o.safetensors", "r.json"])


# ---------------------------------------------------------------- messages


def test_save_to_a_non_safetensors_name(capsys, tmp_path, pair):
    refused(capsys, *base_args(pair, tmp_path / "out.txt"),
            words=[tmp_path / "out.txt", "must be a .safetensors file or an existing folder"])
    assert snapshot(tmp_path) == {}


def test_filter_blocks_excluding_everything(capsys, tmp_path, pair):
    line = refused(capsys, *base_args(pair, tmp_path / "o.safetensors"), "--filter_blocks", "*",
                   words=[pair[0], "--filter_blocks *", "excludes all 6 modules"])
    assert "threshold" not in line
    assert snapshot(tmp_path) == {}


def test_nothing_passed_names_the_reasons(capsys, tmp_path, pair):
    lora, src, tgt = pair
    line = refused(capsys, "--lora", lora, "--source_model", src, "--target_model", tgt, "--save_to",
                   tmp_path / "o.safetensors", "--threshold", "1", words=[lora, "below threshold", "threshold 1.0"])
    assert "no module was transferred" in line
    assert snapshot(tmp_path) == {}


def test_save_to_under_a_file(capsys, tmp_path, pair):
    (tmp_path / "f").write_text("mine")
    refused(capsys, *base_args(pair, tmp_path / "f" / "o.safetensors"),
            words=[tmp_path / "f" / "o.safetensors", f"output folder {tmp_path / 'f'} is a file"])
    assert snapshot(tmp_path) == {str(tmp_path / "f"): b"mine"}


def test_legacy_pickle_lora_warns_in_one_line(capsys, tmp_path, pair):
    """A torch-saved LoRA (legacy pickle, no metadata) transfers; the plain-LoRA warning is one line."""
    lora, src, tgt = pair
    sd = {}
    for name, m in read_lora(lora).modules.items():
        sd.update({f"{name}.lora_down.weight": m.down, f"{name}.lora_up.weight": m.up,
                   f"{name}.alpha": torch.tensor(float(m.alpha))})
    legacy = tmp_path / "style.pt"
    torch.save(sd, legacy, _use_new_zipfile_serialization=False)
    out = tmp_path / "o.safetensors"
    code, err, _ = run(capsys, "--lora", legacy, "--source_model", src, "--target_model", tgt, "--save_to", out,
                       "--threshold", "0")
    assert code == 0
    assert len(err) == 1 and err[0].startswith(f"warning: {legacy}: not a LoRA-X adapter"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors", "style.pt"]
