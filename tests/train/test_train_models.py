"""Model loading for the trainer: fp16 diffusers folders come back fp32 throughout; full-size single
files get kohya's real CLIP tokenizers from --tokenizer_cache_dir (or say clearly where to put them)."""

from __future__ import annotations

import pytest
import torch

from sd_scripts_lorax.errors import LoraxInputError
from sd_scripts_lorax.testing.tiny_tokenizer import write_tokenizer
from sd_scripts_lorax.train.models import full_size_tokenizers, load_models


def test_fp16_folder_loads_all_parts_in_fp32(tmp_path):
    from sd_scripts_lorax.testing.fixtures import write_fixture

    folder = write_fixture("sd1", "diffusers", "tiny", 0, tmp_path / "fp16", dtype="fp16")
    models = load_models(str(folder))
    for part in [models.unet, *models.text_encoders, models.vae]:
        assert {p.dtype for p in part.parameters()} == {torch.float32}


def test_tokenizers_from_kohya_cache_dir_layout(tmp_path):
    for hub_id in ("openai/clip-vit-large-patch14", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"):
        write_tokenizer(tmp_path / hub_id.replace("/", "_"))
    toks = full_size_tokenizers("sdxl", str(tmp_path))
    assert len(toks) == 2
    assert toks[1].pad_token == "!"  # SDXL's second tokenizer pads with "!" as kohya and diffusers do
    assert toks[0]("a red circle").input_ids[0] == toks[0].bos_token_id


def test_missing_tokenizer_is_one_clear_error(tmp_path):
    # the real id is looked up in the local Hugging Face cache only (nothing there on CI machines)
    with pytest.raises(LoraxInputError, match="tokenizer_cache_dir"):
        full_size_tokenizers("sd1", str(tmp_path / "nothing_here"))
