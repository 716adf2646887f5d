"""A virtual environment holding exactly kohya-ss sd-scripts' pinned packages, with a CPU torch.

Built once per machine under ~/.cache/sd-scripts-lorax/ (or $SD_SCRIPTS_LORAX_CACHE), in a folder
named by a hash of the recipe below, so a changed recipe builds a new one. A stamp file written
last marks a complete build; a lock file serialises builders.

The recipe is kohya's requirements.txt (the pins its trainers import; the optional optimizers,
bitsandbytes, tensorboard and sentencepiece are imported lazily and left out), torch 2.13.0 (the
machine's local CPU wheel), torchvision with --no-deps (so pip keeps that torch) and one patch to
torchvision: its CUDA build's ops do not load beside a CPU torch, and two `register_fake`
decorators in `torchvision/_meta_registrations.py` are the only ones not guarded against that.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

TORCH = "torch==2.13.0"
TORCHVISION = "torchvision==0.28.0"
# kohya-ss/sd-scripts requirements.txt at 48d368fa (the packages its SD/SDXL trainers import)
KOHYA_PINS = (
    "accelerate==1.6.0",
    "transformers==4.54.1",
    "diffusers[torch]==0.32.1",
    "ftfy==6.3.1",
    "opencv-python-headless==4.10.0.84",
    "einops==0.7.0",
    "safetensors==0.4.5",
    "toml==0.10.2",
    "voluptuous==0.15.2",
    "huggingface-hub==0.34.3",
    "imagesize==1.4.1",
    "numpy",
    "rich==14.1.0",
)
# name -> version kohya's venv must keep (what installing this project must not change)
PINNED = {re.sub(r"\[.*\]", "", p.split("==")[0]).lower(): p.split("==")[1] for p in KOHYA_PINS if "==" in p}
PINNED["torch"] = TORCH.split("==")[1]

GUARD_PATTERN = re.compile(r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$', re.M)
GUARDED = '@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() else (lambda f: f))'


def patch_torchvision(site_packages: Path) -> bool:
    """Guard the two unguarded fake registrations (nms, qnms) the way the file guards its other ops
    (`torchvision.extension._has_ops()`); True when the file was changed."""
    path = site_packages / "torchvision" / "_meta_registrations.py"
    text = path.read_text()
    new, n = GUARD_PATTERN.subn(lambda m: GUARDED.format(op=m.group(1)), text)
    if n == 0 and GUARDED.format(op="nms") in text:
        return False
    if n != 2:
        raise RuntimeError(f"{path}: expected 2 unguarded register_fake(nms/qnms) decorators, found {n}")
    path.write_text(new)
    return True


RECIPE = {
    "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    "torch": TORCH,
    "torchvision": TORCHVISION,
    "pins": KOHYA_PINS,
    "patch": [GUARD_PATTERN.pattern, GUARDED],
    "version": 1,
}


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("SD_SCRIPTS_LORAX_CACHE") or Path.home() / ".cache" / "sd-scripts-lorax")


def venv_dir() -> Path:
    return cache_root() / f"kohya-venv-{recipe_hash()}"


def venv_python(venv: Path | None = None) -> Path:
    return (venv or venv_dir()) / "bin" / "python"


def _run(cmd: list[str], log, **kw) -> None:
    log.write(f"$ {' '.join(map(str, cmd))}\n")
    log.flush()
    out = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)
    if out.returncode != 0:
        raise RuntimeError(f"kohya venv build: `{' '.join(map(str, cmd))}` failed ({out.returncode}); see {log.name}")


def installed_versions(python: Path) -> dict[str, str]:
    code = ("import json, importlib.metadata as m\n"
            "print(json.dumps({d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def pin_drift(python: Path) -> dict[str, tuple[str, str | None]]:
    """{package: (pinned, installed)} for every kohya pin the venv does not hold exactly."""
    have = installed_versions(python)
    drift = {}
    for name, want in PINNED.items():
        got = have.get(name)
        if got is None or got.split("+")[0] != want.split("+")[0]:
            drift[name] = (want, got)
    return drift


def build(venv: Path, log) -> None:
    py = venv_python(venv)
    _run([sys.executable, "-m", "venv", "--clear", str(venv)], log)
    pip = [str(py), "-m", "pip", "--disable-pip-version-check"]
    _run(pip + ["install", TORCH], log)
    # constrain torch so that nothing below can replace the CPU wheel
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    _run(pip + ["install", "-c", str(constraints), *KOHYA_PINS], log)
    _run(pip + ["install", "--no-deps", TORCHVISION], log)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    patch_torchvision(site)
    _run([str(py), "-c", "import torchvision.transforms, cv2, transformers, diffusers, accelerate, safetensors; "
                         "from transformers import CLIPFeatureExtractor; print('kohya imports ok')"], log)
    drift = pin_drift(py)
    if drift:
        raise RuntimeError(f"kohya venv build: pins not met after install: {drift}")


def ensure_venv(log_to: Path | None = None) -> Path:
    """The cached venv (building it when missing or incomplete); returns its python."""
    venv = venv_dir()
    stamp = venv / ".complete"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and not pin_drift(venv_python(venv)):
            return venv_python(venv)
        log_path = log_to or venv.parent / f"{venv.name}.build.log"
        with open(log_path, "w") as log:
            t0 = time.time()
            build(venv, log)
            log.write(f"built in {time.time() - t0:.0f} s\n")
        stamp.write_text(json.dumps(RECIPE, indent=1))
    return venv_python(venv)


if __name__ == "__main__":
    print(ensure_venv())  # python -m sd_scripts_lorax.testing.kohya.env: build (or find) it, print its python
