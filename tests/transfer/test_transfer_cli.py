"""transfer_lorax.py as users run it (subprocess): the happy path, and every bad input -> one line, exit 2, no file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sd_scripts_lorax.formats.checkpoint import Checkpoint
from sd_scripts_lorax.formats.lora_file import LoraModule, lorax_metadata, minimum_kohya_metadata, write_lora
from sd_scripts_lorax.lorax import lorax_factors, top_bases

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "transfer_lorax.py"), "--no_progress", *map(str, args)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)


def lorax_file(ckpt: Path, out: Path, only: int | None = None) -> Path:
    """A small LoRA-X file (rank 4, random d) over the first `only` attn modules of `ckpt`."""
    g = torch.Generator().manual_seed(0)
    mods = []
    with Checkpoint.open(ckpt) as c:
        refs = [r for _, r in sorted(c.modules().items()) if r.group == "attn"][:only]
        for ref in refs:
            b = top_bases(c.weight(ref), 4)
            up, down = lorax_factors(b, b.s * 0.3 * torch.randn(b.rank, generator=g), ref.shape)
            mods.append(LoraModule(ref.lora_name, down, up, float(b.rank)))
        meta = {**minimum_kohya_metadata(c.family, "networks.lora_x", [4], [4.0]), **lorax_metadata(4, c.name, "0")}
    return write_lora(out, mods, meta, overwrite=True)


def assert_refused(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0], lines[0]


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture(scope="module")
def sd1_lora(tmp_path_factory, tiny_sd1_single) -> Path:
    return lorax_file(tiny_sd1_single, tmp_path_factory.mktemp("lora") / "style.safetensors", only=24)


def test_happy_path(tmp_path, sd1_lora, tiny_sd1_single, tiny_sd1_single_derived):
    out = tmp_path / "out.safetensors"
    res = run("--lora", sd1_lora, "--source_model", tiny_sd1_single, "--target_model", tiny_sd1_single_derived,
              "--save_to", out, "--report", tmp_path / "r.json", "--plot", tmp_path / "p.png",
              "--threshold", "0.5", "--filter_blocks", "*proj_in")
    assert res.returncode == 0, res.stderr
    assert out.is_file() and (tmp_path / "p.png").is_file()
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["summary"]["modules"] == 24 and doc["summary"]["reasons"]["filtered"] >= 1
    assert "total:" in res.stdout and f"wrote {out}" in res.stdout
    # existing output without --overwrite: refused, the file untouched
    before = out.read_bytes()
    res = run("--lora", sd1_lora, "--source_model", tiny_sd1_single, "--target_model", tiny_sd1_single_derived,
              "--save_to", out)
    assert_refused(res, str(out), "--overwrite")
    assert out.read_bytes() == before


def test_different_families(tmp_path, sd1_lora, tiny_sd1_single, tiny_sdxl_single):
    out = tmp_path / "o.safetensors"
    res = run("--lora", sd1_lora, "--source_model", tiny_sd1_single, "--target_model", tiny_sdxl_single,
              "--save_to", out)
    assert_refused(res, "sd1", "sdxl", str(tiny_sdxl_single))
    # an SD1.5 LoRA onto SDXL checkpoints
    res = run("--lora", sd1_lora, "--source_model", tiny_sdxl_single, "--target_model", tiny_sdxl_single,
              "--save_to", out)
    assert_refused(res, str(sd1_lora), "LoRA is for sd1", "sdxl")
    assert files(tmp_path) == set()


def test_different_shapes(tmp_path, sd1_lora, tiny_sd1_single):
    # same family, every attention/MLP weight half as tall: a different architecture
    state = {}
    with safe_open(str(tiny_sd1_single), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            narrow = any(s in k for s in ("transformer_blocks", "proj_in", "proj_out", "self_attn", "mlp"))
            state[k] = t[: t.shape[0] // 2].clone() if narrow and t.dim() in (2, 4) else t
    other = tmp_path / "narrow.safetensors"
    save_file(state, str(other))
    res = run("--lora", sd1_lora, "--source_model", tiny_sd1_single, "--target_model", other,
              "--save_to", tmp_path / "o.safetensors")
    assert_refused(res, "different shapes", "module lora_te_text_model_encoder_layers_0_mlp_fc1", "64x32", "32x32")
    assert files(tmp_path) == {"narrow.safetensors"}


def test_lora_key_that_maps_to_nothing(tmp_path, tiny_sd1_single):
    bogus = tmp_path / "bogus.safetensors"
    name = "lora_unet_down_blocks_7_attentions_0_proj_in"
    write_lora(bogus, [LoraModule(name, torch.randn(4, 32, 1, 1), torch.randn(32, 4, 1, 1), 4.0)], {})
    res = run("--lora", bogus, "--source_model", tiny_sd1_single, "--target_model", tiny_sd1_single,
              "--save_to", tmp_path / "o.safetensors")
    assert_refused(res, str(bogus), name, "maps to nothing")
    assert files(tmp_path) == {"bogus.safetensors"}


def test_truncated_files(tmp_path, sd1_lora, tiny_sd1_single):
    cut_lora = tmp_path / "cut_lora.safetensors"
    cut_lora.write_bytes(sd1_lora.read_bytes()[:-100])
    res = run("--lora", cut_lora, "--source_model", tiny_sd1_single, "--target_model", tiny_sd1_single,
              "--save_to", tmp_path / "o.safetensors")
    assert_refused(res, str(cut_lora))
    cut_model = tmp_path / "cut_model.safetensors"
    data = tiny_sd1_single.read_bytes()
    cut_model.write_bytes(data[: len(data) // 2])
    res = run("--lora", sd1_lora, "--source_model", tiny_sd1_single, "--target_model", cut_model,
              "--save_to", tmp_path / "o.safetensors")
    assert_refused(res, str(cut_model))
    assert files(tmp_path) == {"cut_lora.safetensors", "cut_model.safetensors"}


def test_nan_in_a_used_weight(tmp_path, sd1_lora, tiny_sd1_single):
    with Checkpoint.open(tiny_sd1_single) as c:
        key = c.modules()[sorted(read_names(sd1_lora))[3]].key
    state = {}
    with safe_open(str(tiny_sd1_single), framework="pt") as f:
        for k in f.keys():
            state[k] = f.get_tensor(k)
    state[key] = state[key].clone()
    state[key].view(-1)[5] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    res = run("--lora", sd1_lora, "--source_model", tiny_sd1_single, "--target_model", bad,
              "--save_to", tmp_path / "o.safetensors", "--report", tmp_path / "r.json")
    assert_refused(res, str(bad), key, "NaN")
    assert files(tmp_path) == {"nan.safetensors"}


def read_names(path: Path) -> list[str]:
    from sd_scripts_lorax.formats.lora_file import read_lora

    return list(read_lora(path).modules)


def test_missing_paths_unwritable_output_and_no_cuda(tmp_path, sd1_lora, tiny_sd1_single):
    common = ["--source_model", tiny_sd1_single, "--target_model", tiny_sd1_single]
    assert_refused(run("--lora", tmp_path / "nope.safetensors", *common, "--save_to", tmp_path / "o.safetensors"),
                   "nope.safetensors")
    assert_refused(run("--lora", sd1_lora, "--source_model", tmp_path / "no_model", "--target_model",
                       tiny_sd1_single, "--save_to", tmp_path / "o.safetensors"), "no_model")
    assert_refused(run("--lora", sd1_lora, *common, "--save_to", tmp_path / "no_dir" / "o.safetensors"),
                   "does not exist")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    folder = locked if not os.access(locked, os.W_OK) else Path("/proc/sys")  # root ignores modes
    if os.access(folder, os.W_OK):
        pytest.skip("no unwritable folder available")
    assert_refused(run("--lora", sd1_lora, *common, "--save_to", folder / "o.safetensors"), "not writable")
    locked.chmod(0o755)
    if not torch.cuda.is_available():
        assert_refused(run("--lora", sd1_lora, *common, "--save_to", tmp_path / "o.safetensors", "--device", "cuda"),
                       "CUDA is not available")
    assert files(tmp_path) == {"locked"} and files(locked) == set()
