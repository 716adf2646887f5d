"""The LoRA keys networks.lora_x saves on kohya's own model classes are exactly those of kohya's own
networks/lora.py on the same models and conv_dim: names, module counts and tensor shapes.

kohya's SD1/2 `library.original_unet.UNet2DConditionModel` (config: a SimpleNamespace) with the
transformers 4.54 CLIPTextModel; SDXL `library.sdxl_original_unet.SdxlUNet2DConditionModel` with the
list of two text encoders. Built on the meta device inside kohya's venv (names and shapes need no weights)."""

import pytest

pytestmark = pytest.mark.kohya

# modules (Linear/1x1 + text encoders) without conv_dim, as counted in docs/kohya-contract.md §2
MODULES = {("sd1", "none"): 192 + 72, ("sdxl", "none"): 722 + 264}
UNET_CLASS = {"sd1": "UNet2DConditionModel", "sdxl": "SdxlUNet2DConditionModel"}


@pytest.mark.parametrize("family,conv", [("sd1", "none"), ("sd1", "4"), ("sdxl", "none"), ("sdxl", "4")])
def test_key_set_equals_kohyas_lora(kohya_ws, family, conv):
    got = kohya_ws.probe(f"keys-{family}-{conv}", "keys", family, conv)
    assert got["unet_class"] == UNET_CLASS[family]
    kohya, ours = got["kohya"], got["ours"]
    assert set(ours) == set(kohya), (f"only ours: {sorted(set(ours) - set(kohya))[:5]}, "
                                     f"only kohya's: {sorted(set(kohya) - set(ours))[:5]}")
    assert {k: ours[k] for k in kohya} == kohya, "same keys, different shapes"
    suffixes = {k.split(".", 1)[1] for k in ours}
    assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}
    n_modules = len(ours) // 3
    if (family, conv) in MODULES:
        assert n_modules == MODULES[family, conv]
    else:  # conv_dim adds the ResNet / up- and down-sample convs
        assert n_modules > MODULES[family, "none"]
    prefixes = {k.split("_", 2)[1] for k in ours}
    assert prefixes == ({"unet", "te"} if family == "sd1" else {"unet", "te1", "te2"})
