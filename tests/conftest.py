"""Shared pytest fixtures: tiny fixture checkpoints, built once per session into a temp folder.

Each is written on first use only (pytest builds session fixtures lazily), so a test file that
needs none of them pays nothing. Derived targets are "fine-tunes" of the base fixture of the same
layout: every UNet 2-D/4-D weight moved by `DERIVED_DRIFT` (relative Frobenius size, mostly
low-rank), text encoders bit-identical (as in many real fine-tunes).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sd_scripts_lorax.testing.fixtures import derive_fixture, write_fixture

FIXTURE_SEED = 0
DERIVED_SEED = 1
DERIVED_DRIFT = 0.05


@pytest.fixture(scope="session")
def derived_drift() -> float:
    """The relative size of the derived fixtures' change (a fixture: test modules never import conftest,
    since tests/kohya has a conftest of its own)."""
    return DERIVED_DRIFT


def _base(tmp_path_factory, family: str, layout: str) -> Path:
    folder = tmp_path_factory.mktemp(f"fixture_{family}_{layout}")
    out = folder / (f"{family}.safetensors" if layout == "single_file" else family)
    return write_fixture(family, layout, "tiny", FIXTURE_SEED, out)


def _derived(tmp_path_factory, base: Path) -> Path:
    folder = tmp_path_factory.mktemp(f"derived_{base.stem}")
    out = folder / (f"{base.stem}_ft.safetensors" if base.is_file() else f"{base.name}_ft")
    return derive_fixture(base, out, DERIVED_DRIFT, DERIVED_SEED, keep_text_encoder=True)


@pytest.fixture(scope="session")
def tiny_sd1_diffusers(tmp_path_factory) -> Path:
    """A tiny SD1.5 diffusers folder (loads with StableDiffusionPipeline.from_pretrained)."""
    return _base(tmp_path_factory, "sd1", "diffusers")


@pytest.fixture(scope="session")
def tiny_sd1_single(tmp_path_factory) -> Path:
    """A tiny SD1.5 single-file .safetensors (LDM keys)."""
    return _base(tmp_path_factory, "sd1", "single_file")


@pytest.fixture(scope="session")
def tiny_sdxl_diffusers(tmp_path_factory) -> Path:
    """A tiny SDXL diffusers folder (loads with StableDiffusionXLPipeline.from_pretrained)."""
    return _base(tmp_path_factory, "sdxl", "diffusers")


@pytest.fixture(scope="session")
def tiny_sdxl_single(tmp_path_factory) -> Path:
    """A tiny SDXL single-file .safetensors (SAI keys, open_clip TE2)."""
    return _base(tmp_path_factory, "sdxl", "single_file")


@pytest.fixture(scope="session")
def tiny_sd1_diffusers_derived(tmp_path_factory, tiny_sd1_diffusers) -> Path:
    return _derived(tmp_path_factory, tiny_sd1_diffusers)


@pytest.fixture(scope="session")
def tiny_sd1_single_derived(tmp_path_factory, tiny_sd1_single) -> Path:
    return _derived(tmp_path_factory, tiny_sd1_single)


@pytest.fixture(scope="session")
def tiny_sdxl_diffusers_derived(tmp_path_factory, tiny_sdxl_diffusers) -> Path:
    return _derived(tmp_path_factory, tiny_sdxl_diffusers)


@pytest.fixture(scope="session")
def tiny_sdxl_single_derived(tmp_path_factory, tiny_sdxl_single) -> Path:
    return _derived(tmp_path_factory, tiny_sdxl_single)
