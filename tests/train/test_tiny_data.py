"""The tiny model and dataset of configs/tiny_lorax.toml are built on first use, into a fresh folder
(a clean clone has no .cache/), atomically: nothing under the final name until complete."""

from sd_scripts_lorax.train.tiny_data import TINY_DATA, TINY_MODEL, ensure_embedded


def test_built_into_an_empty_cache_folder(tmp_path):
    cache = tmp_path / ".cache"  # does not exist yet, as in a clean clone
    assert ensure_embedded(cache / TINY_MODEL / "unet")
    assert {p.name for p in (cache / TINY_MODEL).iterdir()} >= {"model_index.json", "unet", "text_encoder", "vae"}
    assert ensure_embedded(cache / TINY_DATA)
    assert any((cache / TINY_DATA).rglob("*.png"))
    assert sorted(p.name for p in cache.iterdir()) == [TINY_DATA, TINY_MODEL]  # no staging folder left
    assert not ensure_embedded(cache / TINY_MODEL)  # built once
