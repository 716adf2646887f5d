"""kohya's checkpoint file names, atomic weight saves, and training-state folders for --resume."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..formats.atomic import atomic_write
from ..errors import LoraxInputError

STATE_FILE = "train_state.json"


def step_name(name: str, step: int) -> str:
    return f"{name}-step{step:08d}"


def epoch_name(name: str, epoch: int) -> str:
    return f"{name}-{epoch:06d}"


def save_weights_atomic(network: torch.nn.Module, path: Path, dtype: torch.dtype | None,
                        metadata: dict[str, str]) -> Path:
    """network.save_weights into a temporary file with the same extension, then rename: a crash
    (or Ctrl-C) never leaves a half-written file under the final name. Replacing a file that is
    already there (an earlier run's, as kohya does) is said in one line; a failed write (a disk
    that filled up during training) is one error line, the earlier files intact."""
    if path.exists():
        print(f"note: replacing {path} (it was there before this save)", file=sys.stderr)
    try:
        with atomic_write(path) as tmp:
            network.save_weights(str(tmp), dtype, metadata)
    except OSError as exc:
        raise LoraxInputError(f"{path}: cannot write ({exc.strerror or exc}); the files saved "
                              f"before it are complete") from None
    return path


@dataclass
class TrainState:
    """Where to continue: the next batch of `epoch` is `batch` (this process's count)."""
    epoch: int
    batch: int
    global_step: int
    seed: int


def save_state(accelerator, folder: Path, state: TrainState, identity: dict[str, str] | None = None) -> Path:
    """accelerator.save_state (network, optimizer, scheduler, RNG states) + train_state.json into a
    temporary sibling folder that replaces `folder` when complete. Called by every process.

    `identity` (checks.run_identity) is stored with the state, so a --resume by a run with another
    network, optimizer or model is refused before the model loads."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({**asdict(state), "run": identity or {}}))
    except OSError as exc:  # a disk that filled up: one line; the unfinished folder goes, earlier ones stay
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise LoraxInputError(f"{folder}: cannot write the training state ({exc.strerror or exc})") from None
    if accelerator.is_main_process:
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def load_state(accelerator, folder: Path) -> TrainState:
    if not (folder / STATE_FILE).is_file():
        raise LoraxInputError(f"{folder}: not a training state folder ({STATE_FILE} missing)")
    try:
        accelerator.load_state(str(folder))
    except (RuntimeError, KeyError, ValueError, IndexError) as exc:  # a state of another network or optimizer
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise LoraxInputError(f"--resume {folder}: does not fit this run ({text})") from None
    try:
        doc = json.loads((folder / STATE_FILE).read_text())
        doc.pop("run", None)
        return TrainState(**doc)
    except (TypeError, ValueError) as exc:
        raise LoraxInputError(f"{folder / STATE_FILE}: unreadable ({exc})") from None


def recover_state_folders(output_dir: Path, output_name: str) -> list[Path]:
    """Settle what a kill inside save_state left for `output_name`'s state folders: a previous state
    parked as ``.<name>.old`` goes back to ``<name>`` when that is missing (a kill between the two
    renames), then ``.<name>.tmp`` / ``.<name>.old`` leftovers are removed. Returns what was removed."""
    removed = []
    for old in sorted(output_dir.glob(f".{output_name}*-state.old")):
        final = old.with_name(old.name[1:-len(".old")])
        if not final.exists() and (old / STATE_FILE).is_file():
            old.rename(final)
    for leftover in sorted([*output_dir.glob(f".{output_name}*-state.tmp"),
                            *output_dir.glob(f".{output_name}*-state.old")]):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
            removed.append(leftover)
    return removed
