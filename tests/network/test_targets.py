"""Targeting on model classes other than diffusers': kohya's SD1/2 UNet keeps its config in a
types.SimpleNamespace (no `.get`), and kohya's SDXL UNet is recognised by its class name and named
by its own (SAI) paths. The real kohya classes are driven in tests/kohya (kohya's own venv)."""

from types import SimpleNamespace

from torch import nn

from sd_scripts_lorax.network.targets import find_targets, unet_naming


class Transformer2DModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Conv2d(8, 8, 1)
        self.to_q = nn.Linear(8, 8)


class ResnetBlock2D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)


class UNet2DConditionModel(nn.Module):
    """Shaped like kohya's library.original_unet class: plain nn.Module, SimpleNamespace config."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.down_blocks = nn.ModuleList([nn.ModuleDict({"attentions": Transformer2DModel(),
                                                         "resnets": ResnetBlock2D()})])


class SdxlUNet2DConditionModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.ModuleList([ResnetBlock2D(), Transformer2DModel()])])


def test_simplenamespace_config_is_sd1_naming():
    unet = UNet2DConditionModel(SimpleNamespace(in_channels=4, cross_attention_dim=768))
    assert unet_naming(unet) == ("sd1", None)
    names = sorted(t.lora_name for t in find_targets(None, unet, 4, 2))
    assert names == ["lora_unet_down_blocks_0_attentions_proj_in", "lora_unet_down_blocks_0_attentions_to_q",
                     "lora_unet_down_blocks_0_resnets_conv1"]


def test_simplenamespace_with_text_time_is_still_read():
    # an attribute-style config that does say text_time is honoured like a dict config would be
    cfg = SimpleNamespace(addition_embed_type=None)
    assert unet_naming(UNet2DConditionModel(cfg)) == ("sd1", None)


def test_kohya_sdxl_class_keeps_its_sai_paths():
    unet = SdxlUNet2DConditionModel()
    assert unet_naming(unet) == ("sd1", None)
    names = sorted(t.lora_name for t in find_targets(None, unet, 4, None))
    assert names == ["lora_unet_input_blocks_0_1_proj_in", "lora_unet_input_blocks_0_1_to_q"]


def test_no_config_at_all():
    unet = nn.Module()
    unet.add_module("mid", Transformer2DModel())
    assert [t.lora_name for t in find_targets(None, unet, 4, None)] == ["lora_unet_mid_proj_in", "lora_unet_mid_to_q"]
