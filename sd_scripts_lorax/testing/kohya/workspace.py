"""A kohya user's setup, made for a test or a benchmark: sd-scripts copied to a temp folder, this
project installed into kohya's venv the way the README says, a full-size random-weight checkpoint
(cached per machine), offline tokenizers, a small dataset, and kohya's own trainers run on them.

Every step that can fail raises `StageFailed` naming the stage, the command and the end of its log.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import env

PROJECT = Path(__file__).resolve().parents[3]
# kohya's SD1/SDXL single-file loaders fix every architecture constant: only full-size models load
CHECKPOINTS = {"sd15": "sd15", "sdxl": "sdxl"}
TRAINERS = {"sd15": "train_network.py", "sdxl": "sdxl_train_network.py"}
TOKENIZER_DIRS = {"sd15": ("openai_clip-vit-large-patch14",),
                  "sdxl": ("openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k")}
CAPTIONS = ("a red circle", "a blue square", "a green star", "a photo of sks")
# The recipe of a fixture's values: a change to it makes a new cached file. Key names and shapes are
# the real SD1.5/SDXL layouts (kohya's loaders accept nothing else), so the code writing them is not
# part of the key: an edit there would only rewrite gigabytes of the same checkpoint.
_FIXTURE_SOURCES = ("testing/fixture_math.py",)


class StageFailed(AssertionError):
    """A step of the kohya run failed; the message says which one and how."""


def kohya_source() -> Path:
    """The unmodified sd-scripts export: $KOHYA_SD_SCRIPTS, else ../shared/kohya-sd-scripts beside the repo."""
    path = Path(os.environ.get("KOHYA_SD_SCRIPTS") or PROJECT.parent / "shared" / "kohya-sd-scripts")
    if not (path / "train_network.py").is_file():
        raise StageFailed(f"kohya sd-scripts not found at {path} (set KOHYA_SD_SCRIPTS to a checkout of "
                          "kohya-ss/sd-scripts, or deselect these tests with -m 'not kohya')")
    return path


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def kohya_env_vars(home: Path) -> dict[str, str]:
    """The environment kohya runs in: offline, no user site, no leaked PYTHONPATH, passive OpenMP waits
    (spin-waiting threads made steps 10x slower on a shared 2-core machine)."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PYTEST", "HF_"))}
    keep.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(home / "hf"),
                OMP_WAIT_POLICY="PASSIVE", PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1",
                TOKENIZERS_PARALLELISM="false")
    return keep


# ------------------------------------------------------------------------- fixtures


def _fixture_key(family: str, dtype: str, seed: int) -> str:
    h = hashlib.sha256(f"{family}/{dtype}/{seed}".encode())
    pkg = PROJECT / "sd_scripts_lorax"
    for rel in _FIXTURE_SOURCES:
        h.update((pkg / rel).read_bytes())
    return h.hexdigest()[:12]


def cached_checkpoint(family: str, dtype: str = "fp16", seed: int = 0) -> Path:
    """A full-size random-weight single-file checkpoint, made once per machine (outside the clone)."""
    folder = env.cache_root() / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{family}-full-{dtype}-seed{seed}"
    path = folder / f"{stem}-{_fixture_key(family, dtype, seed)}.safetensors"
    with open(folder / f"{stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        for old in folder.glob(f"{stem}-*.safetensors"):  # made from older fixture code: gigabytes each
            old.unlink()
        log = folder / f"{stem}.log"
        cmd = [sys.executable, "-m", "sd_scripts_lorax.fixtures", "--family", family, "--size", "full",
               "--dtype", dtype, "--seed", str(seed), "--out", str(path)]
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=PROJECT).returncode
        if rc != 0 or not path.exists():
            raise StageFailed(f"fixture checkpoint: `{' '.join(cmd)}` failed ({rc}):\n{_tail(log)}")
    return path


def write_tokenizers(folder: Path, family: str) -> Path:
    """kohya's --tokenizer_cache_dir layout (hub id with / -> _), filled with our offline CLIP tokenizer."""
    from ..tiny_tokenizer import write_tokenizer
    for name in TOKENIZER_DIRS[family]:
        write_tokenizer(folder / name)
    return folder


def write_dataset(folder: Path, size: int = 64) -> Path:
    """kohya's DreamBooth layout: `<repeats>_<name>/` with images and .txt captions."""
    from PIL import Image
    images = folder / "1_sks"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(caption)
    return folder


# ------------------------------------------------------------------------- runs


@dataclass
class StageResult:
    name: str
    command: list[str]
    log: Path
    wall_s: float
    peak_rss_gib: float
    outputs: Path
    text: str = field(repr=False, default="")

    def file(self, suffix: str = "") -> Path:
        """The saved LoRA: `<name>.safetensors`, or e.g. suffix "-step00000001"."""
        return self.outputs / f"{self.name}{suffix}.safetensors"


class Workspace:
    """sd-scripts copied into `root`, this project installed into kohya's venv, fixtures beside it."""

    def __init__(self, root: Path, family: str = "sd15") -> None:
        self.root = Path(root)
        self.family = family
        self.root.mkdir(parents=True, exist_ok=True)
        self.kohya = self.root / "sd-scripts"
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.env = kohya_env_vars(self.root)
        self.python: Path | None = None
        self.checkpoint: Path | None = None
        self.tokenizers: Path | None = None
        self.data: Path | None = None

    # -- setup stages

    def make_venv(self) -> Path:
        try:
            self.python = env.ensure_venv()
        except Exception as exc:  # the message names the failing pip step
            raise StageFailed(f"kohya venv: {exc}") from exc
        return self.python

    def copy_kohya(self) -> Path:
        if not self.kohya.exists():
            shutil.copytree(kohya_source(), self.kohya, symlinks=True)
            for p in [self.kohya, *self.kohya.rglob("*")]:  # the CI copy of ../shared has no write bits
                p.chmod(p.stat().st_mode | 0o200)
        return self.kohya

    @contextlib.contextmanager
    def _venv_lock(self, exclusive: bool):
        """kohya's venv is shared by every workspace on the machine (pytest-xdist workers included):
        installing into it (exclusive) never overlaps a run that uses it (shared)."""
        with open(env.cache_root() / f"{env.venv_dir().name}.use.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield

    def run(self, name: str, cmd: list[str], cwd: Path | None = None, timeout: int = 1800,
            exclusive: bool = False) -> StageResult:
        """Run one command with kohya's environment, its wall time and peak RSS measured; raise on failure."""
        with self._venv_lock(exclusive):
            return self._run(name, cmd, cwd, timeout)

    def _run(self, name: str, cmd: list[str], cwd: Path | None, timeout: int) -> StageResult:
        log = self.logs / f"{name}.log"
        stats = self.logs / f"{name}.rusage.json"
        wrapped = [sys.executable, "-m", "sd_scripts_lorax.testing.kohya.measure", str(stats), "--", *map(str, cmd)]
        with open(log, "w") as fh:
            fh.write("$ " + " ".join(map(str, cmd)) + "\n")
            fh.flush()
            try:
                rc = subprocess.run(wrapped, cwd=cwd or self.kohya, env=self.env,
                                    stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                raise StageFailed(f"kohya stage '{name}' timed out after {timeout} s: {' '.join(map(str, cmd))}\n"
                                  f"{_tail(log)}") from None
        if rc != 0:
            raise StageFailed(f"kohya stage '{name}' failed (exit {rc}): {' '.join(map(str, cmd))}\n"
                              f"--- end of {log} ---\n{_tail(log)}")
        measured = json.loads(stats.read_text())
        return StageResult(name, list(map(str, cmd)), log, measured["wall_s"], measured["peak_rss_gib"],
                           self.root / "out" / name, log.read_text(errors="replace"))

    def dry_run_install(self) -> tuple[dict[str, str], dict[str, str]]:
        """({name: version} pip would install for the README's command, {name: version} installed now)."""
        report = self.logs / "dry-run-report.json"
        self.run("dry-run", [self.python, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
                             "--report", report, "-e", PROJECT], cwd=self.root, exclusive=True)
        would = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                 for i in json.loads(report.read_text())["install"]}
        return would, env.installed_versions(self.python)

    def install_project(self) -> StageResult:
        """The README's command for kohya users: `pip install -e /path/to/sd-scripts-lorax` in kohya's venv.
        Raises if it changed any package the venv already had (kohya's pins above all)."""
        with self._venv_lock(exclusive=True):
            before = env.installed_versions(self.python)
            result = self._run("install", [self.python, "-m", "pip", "install", "--disable-pip-version-check",
                                           "-e", str(PROJECT)], self.root, 1800)
            after = env.installed_versions(self.python)
        changed = {k: (v, after.get(k)) for k, v in before.items() if after.get(k) != v and k != "sd-scripts-lorax"}
        if changed:
            raise StageFailed(f"install: `pip install -e {PROJECT}` changed kohya's venv: {changed}")
        return result

    def make_fixtures(self) -> None:
        self.checkpoint = cached_checkpoint(CHECKPOINTS[self.family])
        self.tokenizers = write_tokenizers(self.root / "tokenizers", self.family)
        self.data = write_dataset(self.root / "data")

    def setup(self) -> Workspace:
        self.make_venv()
        self.copy_kohya()
        self.install_project()
        self.make_fixtures()
        return self

    # -- kohya's trainers

    def train_command(self, name: str, module: str, *extra: str, steps: int = 2, dim: int = 4) -> list[str]:
        """kohya's trainer with everything a small CPU run needs; `extra` are further kohya flags."""
        return [str(self.python), TRAINERS[self.family],
                "--pretrained_model_name_or_path", str(self.checkpoint),
                "--tokenizer_cache_dir", str(self.tokenizers),
                "--train_data_dir", str(self.data), "--caption_extension", ".txt", "--resolution", "64",
                "--output_dir", str(self.root / "out" / name), "--output_name", name,
                "--save_model_as", "safetensors", "--save_every_n_steps", "1",
                "--network_module", module, "--network_dim", str(dim),
                "--learning_rate", "1e-3", "--optimizer_type", "AdamW",
                "--max_train_steps", str(steps), "--train_batch_size", "1",
                "--mixed_precision", "no", "--seed", "0", "--max_data_loader_n_workers", "0",
                "--gradient_checkpointing", "--min_snr_gamma", "5", "--cache_latents", *extra]

    def train(self, name: str, module: str = "networks.lora_x", *extra: str, **kw) -> StageResult:
        return self.run(name, self.train_command(name, module, *extra, **kw))

    def probe(self, name: str, *args: str) -> dict:
        """Run one of probes.py's checks inside kohya's venv (cwd: the kohya copy); returns its JSON."""
        out = self.logs / f"{name}.json"
        self.run(name, [self.python, "-m", "sd_scripts_lorax.testing.kohya.probes", *args, "--json", str(out)])
        return json.loads(out.read_text())


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    value = fn(*args, **kw)
    return value, time.perf_counter() - t0
