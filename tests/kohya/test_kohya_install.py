"""The core install fits into kohya's pinned venv: `networks.lora_x` imports nothing beyond the core
dependencies, and `pip install --dry-run` of this project into kohya's venv changes none of its
packages (kohya's pins: transformers 4.54.1, diffusers 0.32.1, safetensors 0.4.5, ...)."""

import json
import subprocess
import sys
import tomllib

import pytest

from sd_scripts_lorax.testing.kohya import env
from sd_scripts_lorax.testing.kohya.workspace import PROJECT

# what the trainer, the transfer and the demo use: never imported by networks.lora_x
HEAVY = ("diffusers", "transformers", "accelerate", "matplotlib", "PIL", "toml", "peft", "bitsandbytes", "tensorboard")


def test_networks_lora_x_imports_only_core_dependencies():
    code = ("import sys, json, networks.lora_x\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not loaded & set(HEAVY), f"networks.lora_x pulls in {sorted(loaded & set(HEAVY))}"
    core = {d.split(">")[0].split("<")[0].split("=")[0].strip()
            for d in tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert core == {"torch", "safetensors", "numpy", "scipy", "threadpoolctl"}


@pytest.mark.kohya
def test_pip_dry_run_into_kohya_venv_changes_no_kohya_package(kohya_ws):
    """The report of `pip install --dry-run -e <project>` taken before the workspace installed it."""
    assert env.pin_drift(kohya_ws.python) == {}, "kohya's venv does not hold kohya's pins"
    would, installed = kohya_ws.dry_run
    assert "sd-scripts-lorax" in would
    changed = {k: (installed[k], v) for k, v in would.items() if k in installed and k != "sd-scripts-lorax"}
    assert not changed, f"installing sd-scripts-lorax would change packages of kohya's venv: {changed}"
    assert not set(would) & set(env.PINNED), f"would touch kohya's pins: {set(would) & set(env.PINNED)}"
