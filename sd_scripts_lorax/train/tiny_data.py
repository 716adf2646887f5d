"""The embedded tiny model and dataset that configs/tiny_lorax.toml trains on, built on first use.

A path whose folder name is one of EMBEDDED (e.g. `.cache/tiny-sd1-lorax`) and that does not exist
is built deterministically there: the tiny SD1 (or SDXL) model by `testing.fixtures.write_fixture`
(`model_configs` + `tiny_tokenizer`), and the "blue fire" style images from
`embedded.write_style_dataset` (kohya folder layout, `10_bluefire/*.png` + `.txt`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..testing.fixtures import write_fixture

TINY_MODEL = "tiny-sd1-lorax"
TINY_SDXL_MODEL = "tiny-sdxl-lorax"
TINY_DATA = "tiny-bluefire"


def write_tiny_model(out: Path, family: str = "sd1", seed: int = 0) -> Path:
    """A diffusers folder (model_index.json, unet, text_encoder(s), tokenizer(s), vae, scheduler)."""
    return write_fixture(family, "diffusers", "tiny", seed, out, overwrite=True)


def write_tiny_dataset(out: Path, seed: int = 0) -> Path:
    """24 64x64 PNGs with captions in `out/10_bluefire/`."""
    from ..testing.embedded import write_style_dataset

    write_style_dataset(out, seed=seed, split="train", per_concept=4)
    return out


BUILDERS: dict[str, Callable[[Path], Path]] = {
    TINY_MODEL: lambda p: write_tiny_model(p, "sd1"),
    TINY_SDXL_MODEL: lambda p: write_tiny_model(p, "sdxl"),
    TINY_DATA: write_tiny_dataset,
}


def ensure_embedded(path: str | Path) -> bool:
    """Build `path` (or the embedded folder it lies in) if it is an embedded one that is missing.

    Built in a temporary sibling folder and renamed, so an interrupted build leaves nothing behind.
    Returns True when something was built.
    """
    path = Path(path)
    for folder in [path, *path.parents]:
        if folder.name in BUILDERS:
            break
    else:
        return False
    if folder.exists():
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    built = staging / folder.name  # the builders make their output folder themselves
    try:
        BUILDERS[folder.name](built)
        try:
            built.rename(folder)
        except OSError:  # another process built it first
            if not folder.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True
