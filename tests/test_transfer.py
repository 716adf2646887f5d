"""transfer.py and transfer_report.py: the pipeline on tiny fixtures, and the report (summary, table, JSON, plot)."""

from __future__ import annotations

import json
import math

import pytest

from sd_scripts_lorax.transfer_report import (BELOW_THRESHOLD, FILTERED, IDENTICAL, TRANSFERRED, ModuleResult,
                                              TransferReport, format_table, heatmap_grid, plot_heatmap,
                                              split_block, write_json)


def _report(plain: bool = False) -> TransferReport:
    r = TransferReport("in.safetensors", "src.safetensors", "tgt", 0.8, "name", is_lorax=not plain)
    r.modules = [
        ModuleResult("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (32, 32), 4, True,
                     TRANSFERRED, 0.9, 0.95, norm_source=2.0, norm_target=1.5, energy_in_source_subspace=0.5),
        ModuleResult("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", (32, 32), 4, False,
                     BELOW_THRESHOLD, 0.3, 0.95, norm_source=1.0, norm_target=0.4, energy_in_source_subspace=1.0),
        ModuleResult("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (32, 32), 4, True, IDENTICAL,
                     1.0, 1.0, norm_source=2.0, norm_target=2.0),
        ModuleResult("lora_te_text_model_encoder_layers_0_mlp_fc1", (64, 32), 0, False, FILTERED,
                     norm_source=1.0, norm_target=0.0),
    ]
    return r


@pytest.mark.parametrize("name, block, leaf", [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
     "unet_down_blocks_0_attentions_0_transformer_blocks_0", "attn1_to_out_0"),
    ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj",
     "unet_up_blocks_1_attentions_2_transformer_blocks_0", "ff_net_0_proj"),
    ("lora_unet_input_blocks_4_1_proj_in", "unet_input_blocks_4_1", "proj_in"),
    ("lora_te2_text_model_encoder_layers_1_mlp_fc2", "te2_text_model_encoder_layers_1", "mlp_fc2"),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "unet_down_blocks_0_resnets_0", "conv1"),
])
def test_split_block(name, block, leaf):
    assert split_block(name) == (block, leaf)


def test_summary_counts_and_energy():
    s = _report().summary()
    assert (s["modules"], s["kept"], s["dropped"]) == (4, 2, 2)
    assert s["reasons"] == {TRANSFERRED: 1, IDENTICAL: 1, BELOW_THRESHOLD: 1, FILTERED: 1}
    assert s["mean_phi"] == pytest.approx((0.9 + 0.3 + 1.0) / 3)
    # kept energy: (1.5^2 + 2^2) over all inputs (2^2 + 1 + 2^2 + 1)
    assert s["energy_kept"] == pytest.approx(math.sqrt((1.5 ** 2 + 4.0) / 10.0))
    assert "energy_in_source_subspace" not in s


def test_plain_input_reports_source_subspace_energy():
    r = _report(plain=True)
    s = r.summary()
    # modules with a value: (2, 0.5) and (1, 1.0)
    assert s["energy_in_source_subspace"] == pytest.approx(math.sqrt((1.0 + 1.0) / 5.0))
    doc = r.to_json()
    assert all("energy_in_source_subspace" in m for m in doc["modules"])
    assert "in_src" in format_table(r)


def test_table_has_every_module_and_totals():
    text = format_table(_report())
    for m in _report().modules:
        assert m.name in text
    assert "dropped (below threshold)" in text and "dropped (filtered)" in text
    assert text.splitlines()[-1].startswith("total: 2 kept, 2 dropped")


def test_json_schema(tmp_path):
    path = write_json([_report()], tmp_path / "r.json")
    doc = json.loads(path.read_text())
    assert set(doc) == {"modules", "summary"}
    m = doc["modules"][0]
    for k in ("name", "shape", "phi_u", "phi_v", "phi", "transferred", "reason", "energy_kept"):
        assert k in m
    assert m["phi"] == 0.9 and m["energy_kept"] == pytest.approx(0.75)
    two = json.loads(write_json([_report(), _report()], tmp_path / "r2.json").read_text())
    assert len(two["reports"]) == 2 and set(two["reports"][0]) == {"modules", "summary"}


def test_heatmap_grid_and_png(tmp_path):
    blocks, leaves, grid = heatmap_grid(_report().modules)
    assert blocks == ["unet_down_blocks_0_attentions_0_transformer_blocks_0", "te_text_model_encoder_layers_0"]
    assert leaves == ["attn1_to_q", "attn1_to_k", "self_attn_q_proj"]
    assert grid[0][:2] == [0.9, 0.3] and math.isnan(grid[0][2]) and grid[1][2] == 1.0
    png = plot_heatmap(_report(), tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))
