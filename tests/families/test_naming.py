"""naming.py and ldm_convert.py: kohya names from checkpoint keys, UNet block correspondence,
and single-file <-> diffusers conversion, checked against diffusers' own converters and against
names built from live diffusers/transformers modules."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from sd_scripts_lorax.families import ldm_convert as lc
from sd_scripts_lorax.testing.fixtures import _meta, fixture_shapes
from sd_scripts_lorax.families.model_configs import build_models
from sd_scripts_lorax.families.naming import (
    UnetBlockMap,
    index_modules,
    kohya_name,
    part_of,
    te_path_to_kohya,
    unet_path_to_kohya,
)

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def test_kohya_name_and_part():
    assert kohya_name("unet", "down_blocks.0.attentions.0.proj_in") == "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert part_of("lora_te1_text_model_encoder_layers_0_mlp_fc1") == "te1"
    assert part_of("lora_te_text_model_encoder_layers_0_mlp_fc1") == "te"
    assert part_of("lora_te2_text_model_encoder_layers_0_mlp_fc1") == "te2"
    assert part_of("lora_unet_input_blocks_4_1_proj_in") == "unet"
    with pytest.raises(ValueError):
        part_of("lora_vae_decoder_conv_in")
    assert te_path_to_kohya("encoder.layers.0.self_attn.q_proj") == "text_model.encoder.layers.0.self_attn.q_proj"
    assert te_path_to_kohya("text_model.encoder.layers.0.mlp.fc1") == "text_model.encoder.layers.0.mlp.fc1"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_block_map_matches_diffusers_converter(family):
    """Our LDM keys, fed to diffusers' single-file UNet converter, give back the model's own state dict."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = build_models(family, "tiny", with_vae=False).unet
    sd = unet.state_dict()
    bm = UnetBlockMap.from_diffusers_config(unet.config)
    ldm = {"model.diffusion_model." + bm.to_ldm(k): v for k, v in sd.items()}
    assert UnetBlockMap.from_ldm_keys(ldm).structure == bm.structure
    assert UnetBlockMap.from_diffusers_keys(sd).structure == bm.structure
    back = convert_ldm_unet_checkpoint(dict(ldm), dict(unet.config))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert all(bm.to_diffusers(bm.to_ldm(k)) == k for k in sd)


def test_block_map_literals_sdxl():
    bm = UnetBlockMap.from_diffusers_config(_meta("sdxl", "full")[0]["unet"].config)
    assert bm.to_ldm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert bm.to_ldm("down_blocks.0.downsamplers.0.conv.weight") == "input_blocks.3.0.op.weight"
    assert bm.to_ldm("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.2.conv"
    assert bm.to_ldm("up_blocks.2.resnets.0.conv_shortcut") == "output_blocks.6.0.skip_connection"
    assert bm.to_ldm("mid_block.attentions.0.proj_in") == "middle_block.1.proj_in"
    assert bm.to_ldm("mid_block.resnets.1.time_emb_proj.bias") == "middle_block.2.emb_layers.1.bias"
    assert bm.to_ldm("add_embedding.linear_2.weight") == "label_emb.0.2.weight"
    assert bm.to_diffusers("model.diffusion_model.out.2.weight") == "conv_out.weight"
    sd1 = UnetBlockMap.from_diffusers_config(_meta("sd1", "full")[0]["unet"].config)
    # SD1's first up level has no attention: its upsampler is the block's second module
    assert sd1.to_ldm("up_blocks.0.upsamplers.0.conv.weight") == "output_blocks.2.1.conv.weight"
    with pytest.raises(KeyError):
        sd1.to_ldm("nonsense.weight")


# ---------------------------------------------------------------- full-size names on the meta device

EXPECTED = {  # (part, group) -> count, kohya's published counts for the attn group
    "sd1": {("unet", "attn"): 192, ("te", "attn"): 72},
    "sd2": {("unet", "attn"): 192, ("te", "attn"): 23 * 6},
    "sdxl": {("unet", "attn"): 722, ("te1", "attn"): 72, ("te2", "attn"): 192},
}


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def full_index(request):
    family = request.param
    out = {}
    for layout in ("single_file", "diffusers"):
        shapes = fixture_shapes(family, layout, "full")
        out[layout] = (shapes, index_modules(shapes, family, layout))
    return family, out


def test_full_size_counts_and_layouts_agree(full_index):
    family, out = full_index
    (_, single), (_, diff) = out["single_file"], out["diffusers"]
    counts = Counter((r.part, r.group) for r in single.values())
    for k, n in EXPECTED[family].items():
        assert counts[k] == n, (family, k, counts)
    assert set(single) == set(diff)
    for shapes, index in out.values():
        for name, ref in index.items():
            assert ref.lora_name == name and part_of(name) == ref.part
            stored = shapes[ref.key]
            if ref.rows is None:
                assert ref.shape == stored
            else:
                assert ref.shape == (ref.rows[1] - ref.rows[0], *stored[1:])
    for name in single:
        assert single[name].shape == diff[name].shape, name
    # every tensor backs exactly one module (fused in_proj: exactly three row slices)
    per_key = Counter(r.key for r in single.values())
    assert all(n == (3 if k.endswith("in_proj_weight") else 1) for k, n in per_key.items())


def test_full_size_literal_names():
    sd1 = index_modules(fixture_shapes("sd1", "single_file", "full"), "sd1", "single_file")
    ref = sd1["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert ref.shape == (320, 320, 1, 1) and ref.key == "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert sd1["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"].shape == (320, 768)
    assert sd1["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj"].shape == (2560, 320)
    assert sd1["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0"].group == "attn"
    conv = sd1["lora_unet_down_blocks_0_resnets_0_conv1"]
    assert conv.group == "conv" and conv.is_conv_kxk and conv.shape == (320, 320, 3, 3)
    assert sd1["lora_unet_down_blocks_1_resnets_0_conv_shortcut"].shape == (640, 320, 1, 1)
    assert not sd1["lora_unet_down_blocks_1_resnets_0_conv_shortcut"].is_conv_kxk
    assert sd1["lora_unet_down_blocks_0_downsamplers_0_conv"].shape == (320, 320, 3, 3)
    assert sd1["lora_unet_up_blocks_0_upsamplers_0_conv"].shape == (1280, 1280, 3, 3)
    assert sd1["lora_te_text_model_encoder_layers_11_mlp_fc2"].shape == (768, 3072)
    assert sd1["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].key == \
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"

    xl = index_modules(fixture_shapes("sdxl", "single_file", "full"), "sdxl", "single_file")
    assert xl["lora_unet_input_blocks_4_1_proj_in"].shape == (640, 640)
    assert xl["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"].shape == (640, 640)
    assert xl["lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k"].shape == (1280, 2048)
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0" in xl
    assert xl["lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_2"].shape == (640, 2560)
    assert xl["lora_unet_input_blocks_1_0_in_layers_2"].shape == (320, 320, 3, 3)
    assert xl["lora_unet_input_blocks_1_0_emb_layers_1"].shape == (320, 1280)
    assert xl["lora_unet_input_blocks_4_0_skip_connection"].shape == (640, 320, 1, 1)
    assert xl["lora_unet_input_blocks_3_0_op"].shape == (320, 320, 3, 3)
    assert xl["lora_unet_output_blocks_2_2_conv"].shape == (1280, 1280, 3, 3)
    assert xl["lora_unet_middle_block_0_out_layers_3"].group == "conv"
    assert xl["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"].shape == (768, 768)
    q = xl["lora_te2_text_model_encoder_layers_31_self_attn_v_proj"]
    assert q.key == "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"
    assert q.rows == (2560, 3840) and q.shape == (1280, 1280)
    assert xl["lora_te2_text_model_encoder_layers_31_mlp_fc2"].shape == (1280, 5120)

    sd2 = index_modules(fixture_shapes("sd2", "single_file", "full"), "sd2", "single_file")
    assert sd2["lora_unet_down_blocks_0_attentions_0_proj_in"].shape == (320, 320)  # Linear in SD2 files
    assert "lora_te_text_model_encoder_layers_22_mlp_fc1" in sd2
    assert "lora_te_text_model_encoder_layers_23_mlp_fc1" not in sd2  # kohya drops open_clip-H's last layer


def _live_names(family: str) -> set[tuple[str, str]]:
    """(kohya name, group) by kohya's class-name targeting rule over live (meta) diffusers modules."""
    comps = _meta(family, "full")[0]
    out = set()
    unet = comps["unet"]
    bm = UnetBlockMap.from_diffusers_config(unet.config)
    for group, targets in (("attn", UNET_TARGETS), ("conv", UNET_CONV_TARGETS)):
        for path, mod in unet.named_modules():
            if type(mod).__name__ in targets:
                for child, sub in mod.named_modules():
                    if child and type(sub).__name__ in ("Linear", "Conv2d"):
                        out.add((kohya_name("unet", unet_path_to_kohya(f"{path}.{child}", family, bm)), group))
    tes = [("text_encoder", "te")] if family != "sdxl" else [("text_encoder", "te1"), ("text_encoder_2", "te2")]
    for comp, part in tes:
        for path, mod in comps[comp].named_modules():
            if type(mod).__name__ in TE_TARGETS:
                for child, sub in mod.named_modules():
                    if child and type(sub).__name__ in ("Linear", "Conv2d"):
                        out.add((kohya_name(part, te_path_to_kohya(f"{path}.{child}")), "attn"))
    return out


def test_live_module_names_equal_index(full_index):
    family, out = full_index
    live = _live_names(family)
    for layout, (_, index) in out.items():
        assert {(n, r.group) for n, r in index.items()} == live, layout


def test_index_ignores_ema_vae_and_accepts_te_without_text_model_prefix():
    shapes = fixture_shapes("sd1", "single_file", "tiny")
    base = index_modules(shapes, "sd1", "single_file")
    extra = dict(shapes)
    extra["model_ema.diffusion_modelinput_blocks11proj_inweight"] = (32, 32, 1, 1)
    bare = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
            for k, v in extra.items()}
    assert set(index_modules(bare, "sd1", "single_file")) == set(base)
    assert not any("vae" in n or "first_stage" in r.key for n, r in base.items())


def test_index_refuses_two_keys_for_one_module():
    from sd_scripts_lorax.errors import LoraxInputError

    shapes = fixture_shapes("sd1", "diffusers", "tiny")
    k = next(k for k in shapes if k.startswith("text_encoder/") and k.endswith("q_proj.weight"))
    dup = dict(shapes)
    dup[k.replace("text_encoder/", "text_encoder/text_model.")] = shapes[k]
    with pytest.raises(LoraxInputError, match="both map to"):
        index_modules(dup, "sd1", "diffusers")


# ---------------------------------------------------------------- whole-checkpoint conversion


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_conversion_round_trips_and_diffusers_consumes_it(family):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    m = build_models(family, "tiny", seed=3)
    comps = {"unet": m.unet, "vae": m.vae, "text_encoder": m.text_encoders[0]}
    if family == "sdxl":
        comps["text_encoder_2"] = m.text_encoders[1]
    state = {f"{c}/{k}": v for c, mod in comps.items() for k, v in mod.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    single = lc.convert(lc.to_single_file(family, shapes, sd2_projection_dim=48), state, seed=1)
    s_shapes = {k: tuple(v.shape) for k, v in single.items()}
    # diffusers -> single -> diffusers, exactly
    tm = {c: any(k.startswith("text_model.") for k in mod.state_dict()) for c, mod in comps.items()}
    back = lc.convert(lc.from_single_file(family, s_shapes, tm), single)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    # single -> diffusers -> single, exactly (SD2's unused extras come from the same seed)
    again = lc.convert(lc.to_single_file(family, shapes, sd2_projection_dim=48), back, seed=1)
    assert set(again) == set(single) and all(torch.equal(again[k], single[k]) for k in single)
    # SD1's 1x1 projections stay 4-D in the file, SD2/SDXL's Linear ones 2-D; VAE attention is 1x1 conv
    proj = next(v for k, v in single.items() if k.endswith("1.proj_in.weight"))
    assert proj.dim() == (4 if family == "sd1" else 2)
    assert single["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in single  # LDM level 0 = lowest res
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in single
    # independent consumers: diffusers' own single-file converters
    u = convert_ldm_unet_checkpoint(dict(single), dict(m.unet.config))
    assert all(torch.equal(u[k], v) for k, v in m.unet.state_dict().items()) and set(u) == set(m.unet.state_dict())
    vae = m.vae.state_dict()
    v = convert_ldm_vae_checkpoint({k: t for k, t in single.items() if k.startswith("first_stage_model.")},
                                   dict(m.vae.config))
    assert set(v) == set(vae) and all(torch.equal(v[k].reshape(vae[k].shape), vae[k]) for k in vae)
    for comp, prefix, flavour in lc.TE_LAYOUT[family]:
        te = comps[comp]
        got = (convert_ldm_clip_checkpoint(single, remove_prefix=prefix) if flavour == "hf"
               else convert_open_clip_checkpoint(te, single, prefix=prefix))
        got = {k.removeprefix("text_model."): t for k, t in got.items()}
        want = {k.removeprefix("text_model."): t for k, t in te.state_dict().items()}
        for k, t in want.items():
            assert torch.equal(got[k], t), (comp, k)
    if family == "sd2":  # the extra final resblock is there and is not the model's
        n = m.text_encoders[0].config.num_hidden_layers
        assert f"cond_stage_model.model.transformer.resblocks.{n}.attn.in_proj_weight" in single
        assert f"cond_stage_model.model.transformer.resblocks.{n + 1}.attn.in_proj_weight" not in single
