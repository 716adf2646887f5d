"""`python -m sd_scripts_lorax inspect`: checkpoint and LoRA reports, --base fit, CLI errors (exit 2)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from sd_scripts_lorax.formats.checkpoint import Checkpoint
from sd_scripts_lorax.errors import LoraxInputError
from sd_scripts_lorax.tools.inspect import format_report, inspect_path, lora_family, LoraEntry

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- real tiny models on disk


def _live_count(models) -> dict[str, dict[str, int]]:
    """kohya's targeting rule applied to the live models, per part and group."""
    parts = ["te"] if len(models.text_encoders) == 1 else ["te1", "te2"]
    out = {"unet": {"attn": 0, "conv": 0}}
    roots = [("unet", models.unet, "attn", {"Transformer2DModel"}),
             ("unet", models.unet, "conv", {"ResnetBlock2D", "Downsample2D", "Upsample2D"})]
    roots += [(p, te, "attn", {"CLIPAttention", "CLIPMLP"}) for p, te in zip(parts, models.text_encoders)]
    for part, root, group, targets in roots:
        counts = out.setdefault(part, {"attn": 0, "conv": 0})
        for _, mod in root.named_modules():
            if type(mod).__name__ in targets:
                counts[group] += sum(type(c).__name__ in ("Linear", "Conv2d") for _, c in mod.named_modules())
    return out


@pytest.fixture(scope="module")
def folders(tiny_sd1_diffusers, tiny_sdxl_diffusers):
    """The shared tiny diffusers fixtures, with kohya's module counts from the same architecture built live."""
    from sd_scripts_lorax.families.model_configs import build_models

    return {f: (p, _live_count(build_models(f, "tiny", device="meta", with_vae=False)))
            for f, p in (("sd1", tiny_sd1_diffusers), ("sdxl", tiny_sdxl_diffusers))}


def write_lora(path: Path, base: Path, rank: int = 4, metadata: dict[str, str] | None = None,
               only: str | None = None, alpha: float = 2.0) -> Path:
    """A kohya LoRA over every attn-group module of `base` (names and shapes from the checkpoint)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    with Checkpoint.open(base) as ck:
        for name, ref in sorted(ck.modules().items()):
            if ref.group != "attn" or (only and not name.startswith(only)):
                continue
            out_f, in_f, *k = ref.shape
            state[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, *k, generator=g)
            state[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, *([1, 1] if k else []), generator=g)
            state[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path), metadata=metadata)
    return path


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_checkpoint_report(folders, family):
    root, live = folders[family]
    r = inspect_path(root)
    assert (r["kind"], r["family"], r["layout"]) == ("checkpoint", family, "diffusers")
    assert r["modules"] == live
    assert r["dtypes"] == {"float32": r["tensors"]}
    unet = root / "unet" / "diffusion_pytorch_model.safetensors"
    assert r["hashes"]["sha256"] == hashlib.sha256(unet.read_bytes()).hexdigest()
    table = format_report(r)
    assert any(line.split() == ["family", family] for line in table.splitlines())
    assert "modules unet" in table


# ---------------------------------------------------------------- LoRA files


def test_lora_report_and_base_fit(folders, tmp_path):
    root, live = folders["sdxl"]
    meta = {"ss_network_module": "networks.lora_x", "ss_base_model_version": "sdxl_base_v1-0",
            "ss_sd_model_name": "model", "ss_new_sd_model_hash": "ab" * 32, "lorax.format_version": "1",
            "lorax.source_model_name": "model", "ss_seed": "1"}
    lora = write_lora(tmp_path / "l.safetensors", root, metadata=meta)
    r = inspect_path(lora, base=root)
    assert (r["kind"], r["family"], r["family_source"]) == ("lora", "sdxl", "ss_base_model_version")
    assert r["network_module"] == "networks.lora_x" and r["is_lorax"] is True
    assert r["parts"] == {p: live[p]["attn"] for p in ("unet", "te1", "te2")}
    assert r["modules"] == sum(r["parts"].values())
    assert r["rank"] == {"min": 4, "max": 4, "most_common": 4}
    assert r["alpha"] == {"min": 2, "max": 2, "most_common": 2}
    assert r["base_model"] == {k: v for k, v in meta.items() if k not in ("ss_network_module", "ss_seed",
                                                                        "lorax.format_version")}
    assert r["lorax"] == {"lorax.format_version": "1", "lorax.source_model_name": "model"}
    assert r["base"]["ok"] and r["base"]["fits"] == r["modules"] and r["base"]["family_matches"]
    assert r["hashes"]["addnet"] == _after_header_sha(lora)


def _after_header_sha(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_lora_on_wrong_base_lists_first_ten_and_count(folders, tmp_path):
    sd1, _ = folders["sd1"]
    sdxl, _ = folders["sdxl"]
    lora = write_lora(tmp_path / "xl.safetensors", sdxl)  # no metadata: family from the names
    r = inspect_path(lora, base=sd1)
    assert r["family"] == "sdxl" and r["family_source"] == "names"
    b = r["base"]
    assert not b["ok"] and not b["family_matches"] and b["family"] == "sd1"
    assert len(b["problems"]) == 10 and b["problem_count"] == r["modules"] - b["fits"] > 10
    table = format_report(r)
    assert table.count("mismatch") == 10 and f"{b['problem_count'] - 10} more" in table


def test_shape_mismatch_is_named(folders, tmp_path):
    root, _ = folders["sd1"]
    lora = write_lora(tmp_path / "l.safetensors", root, only="lora_te_")
    # widen one module's down so it no longer fits its base Linear
    from safetensors.torch import load_file

    state = load_file(str(lora))
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    state[f"{name}.lora_down.weight"] = torch.zeros(4, 33)
    save_file(state, str(lora))
    b = inspect_path(lora, base=root)["base"]
    assert b["problem_count"] == 1 and b["problems"][0].startswith(name)
    assert "[4, 33]" in b["problems"][0] and "[32, 32]" in b["problems"][0]


def _entries(names_widths):
    return {n: LoraEntry((4, w), (w, 4), 4.0, "float32") for n, w in names_widths}


def test_lora_family_rules():
    q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert lora_family(_entries([(q, 768)]), {}) == ("sd1", "widths")
    assert lora_family(_entries([(q, 1024)]), {}) == ("sd2", "widths")
    assert lora_family(_entries([(k, 1024)]), {}) == ("sd2", "widths")
    assert lora_family(_entries([(k, 2048)]), {}) == ("sdxl", "widths")
    assert lora_family(_entries([(q, 32)]), {}) == ("sd1/sd2", "names")
    assert lora_family(_entries([("lora_unet_input_blocks_4_1_proj_in", 640)]), {})[0] == "sdxl"
    assert lora_family(_entries([(q, 768)]), {"ss_base_model_version": "sd_v2"}) == ("sd2", "ss_base_model_version")
    arch = {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    assert lora_family(_entries([(q, 768)]), arch) == ("sdxl", "modelspec.architecture")


def test_base_on_a_checkpoint_is_refused(folders):
    root, _ = folders["sd1"]
    with pytest.raises(LoraxInputError, match="--base only applies to a LoRA file"):
        inspect_path(root, base=root)


# ---------------------------------------------------------------- the real CLI


def _cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "sd_scripts_lorax", "inspect", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    good = tmp / "good.safetensors"
    save_file({"model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(8, 8),
               "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": torch.ones(8, 8)},
              str(good))
    data = good.read_bytes()
    (tmp / "trunc.safetensors").write_bytes(data[:-7])
    (tmp / "text.safetensors").write_text("just some text, not a model\n")
    n = int.from_bytes(data[:8], "little")
    (tmp / "corrupt.safetensors").write_bytes(data[:8] + b"\xff" * n + data[8 + n:])
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp / "other.safetensors"))
    (tmp / "folder").mkdir()
    lora = tmp / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 2)},
              str(lora))
    (tmp / "lora_trunc.safetensors").write_bytes(lora.read_bytes()[:-3])
    return {"missing": tmp / "nope.safetensors", "truncated": tmp / "trunc.safetensors",
            "not_safetensors": tmp / "text.safetensors", "corrupt_header": tmp / "corrupt.safetensors",
            "unknown_architecture": tmp / "other.safetensors", "not_diffusers_folder": tmp / "folder",
            "truncated_lora": tmp / "lora_trunc.safetensors", "missing_base": (lora, tmp / "nobase")}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, folders):
    """Every CLI case launched at once (each process pays torch's import time; two cores share them)."""
    tmp = tmp_path_factory.mktemp("cli")
    cases = {k: ([str(v[0]), "--base", str(v[1])] if isinstance(v, tuple) else [str(v)])
             for k, v in _bad_inputs(tmp).items()}
    root, _ = folders["sd1"]
    lora = write_lora(tmp / "ok_lora.safetensors", root, metadata={"ss_network_module": "networks.lora"})
    cases["ok_json"] = [str(lora), "--base", str(root), "--json"]
    cases["ok_table"] = [str(root), "--no-hash"]
    procs = {k: _cli(*a) for k, a in cases.items()}
    return {k: (p.wait(timeout=120), *p.communicate()) for k, p in procs.items()}


BAD = ["missing", "truncated", "not_safetensors", "corrupt_header", "unknown_architecture",
       "not_diffusers_folder", "truncated_lora", "missing_base"]


@pytest.mark.parametrize("case", BAD)
def test_cli_bad_input_exit_2_one_line(cli_runs, case):
    rc, out, err = cli_runs[case]
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert out == ""


def test_cli_json_is_one_object(cli_runs):
    rc, out, err = cli_runs["ok_json"]
    assert rc == 0, err
    report = json.loads(out)  # exactly one JSON document
    assert report["kind"] == "lora" and report["family"] == "sd1/sd2" and report["base"]["ok"]


def test_cli_table(cli_runs):
    rc, out, err = cli_runs["ok_table"]
    assert rc == 0, err
    rows = dict(line.split(None, 1) for line in out.splitlines() if not line.startswith("modules"))
    assert rows["kind"] == "checkpoint" and rows["family"] == "sd1" and rows["layout"] == "diffusers"
    assert "hash" not in out


# ---------------------------------------------------------------- single files and lora_file.write_lora


def test_single_file_sdxl_and_a_written_lora(tiny_sdxl_single, tiny_sdxl_diffusers, tiny_sd1_single, tmp_path):
    from sd_scripts_lorax.formats.lora_file import LoraModule, write_lora

    ck = inspect_path(tiny_sdxl_single, with_hashes=False)
    assert (ck["family"], ck["layout"]) == ("sdxl", "single_file")
    assert ck["modules"] == inspect_path(tiny_sdxl_diffusers, with_hashes=False)["modules"]
    # a LoRA over the conv group as well (3x3 convs get their own rank), written by lora_file
    g = torch.Generator().manual_seed(1)
    modules = []
    with Checkpoint.open(tiny_sdxl_single) as c:
        for name, ref in c.modules().items():
            r = 2 if ref.is_conv_kxk else 4
            out_f, in_f, *k = ref.shape
            modules.append(LoraModule(name, torch.randn(r, in_f, *k, generator=g),
                                      torch.randn(out_f, r, *([1, 1] if k else []), generator=g), float(r)))
    path = tmp_path / "xl.safetensors"
    write_lora(path, modules, {"ss_network_module": "networks.lora_x", "ss_network_dim": "4"})
    r: dict[str, Any] = inspect_path(path, base=tiny_sdxl_diffusers)
    assert r["family"] == "sdxl" and r["modules"] == len(modules)
    assert r["rank"] == {"min": 2, "max": 4, "most_common": 4} and r["conv_kxk_modules"] > 0
    assert r["sshs_model_hash_matches"] is True  # write_lora's sshs hash is kohya's: bytes after the header
    assert r["base"]["ok"] and r["base"]["fits"] == len(modules)
    wrong = inspect_path(path, base=tiny_sd1_single, with_hashes=False)["base"]
    assert not wrong["family_matches"] and wrong["problem_count"] == wrong["total"] - wrong["fits"] > 0
