"""What the trainer checks before the model loads: numbers that would train nothing or diverge at
once, the output folder, the dataset TOML's batch sizes and repeats, and a --resume state (complete,
readable without unpickling code, and saved by a run with the same network, optimizer and model).

Each problem is one LoraxInputError line naming the option, file or value; none of these checks
writes anything. `tidy_output_dir` (run by the main process only) then removes what killed runs
left there.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from ..errors import LoraxInputError
from ..formats.atomic import stale_temps
from .checkpoints import STATE_FILE, recover_state_folders
from .config import read_toml

# below this many free bytes the output folder's disk counts as full (a tiny adapter is ~1 MB)
MIN_FREE_BYTES = 8 << 20
# what a run's identity stored in a training state holds: a state of another run is refused
IDENTITY_KEYS = ("network_module", "network_dim", "network_alpha", "network_args", "optimizer_type")
# files accelerate.save_state writes for one process and one model/optimizer/scheduler
STATE_FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin")


def first_line(exc: BaseException, limit: int) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def run_identity(args: Mapping[str, Any]) -> dict[str, str]:
    """The settings a resumed run must share with the run that saved the state (as strings)."""
    ident = {k: json.dumps(args.get(k)) for k in IDENTITY_KEYS}
    model = args.get("pretrained_model_name_or_path")
    ident["model"] = Path(str(model)).name if model else ""
    return ident


def check_run(args: Mapping[str, Any]) -> None:
    """All up-front checks, in the order a user would fix them."""
    check_numbers(args)
    if args.get("dataset_config"):
        check_dataset_numbers(Path(args["dataset_config"]))
    if args.get("output_dir"):
        check_output_dir(Path(args["output_dir"]))
    if args.get("resume"):
        check_resume(Path(args["resume"]), args)


def _bad(name: str, value: Any, need: str) -> LoraxInputError:
    return LoraxInputError(f"--{name} {value!r}: {need}")


def check_numbers(args: Mapping[str, Any]) -> None:
    epochs = args.get("max_train_epochs")
    if epochs is not None and epochs < 1:
        raise _bad("max_train_epochs", epochs, "must be at least 1")
    if epochs is None and args.get("max_train_steps", 1) < 1:
        raise _bad("max_train_steps", args["max_train_steps"], "must be at least 1 (nothing would be trained)")
    for name in ("learning_rate", "unet_lr", "text_encoder_lr"):
        lr = args.get(name)
        if lr is not None and not (math.isfinite(lr) and lr >= 0):
            raise _bad(name, lr, "must be a finite number >= 0")
    for name in ("train_batch_size", "gradient_accumulation_steps"):
        v = args.get(name)
        if v is not None and v < 1:
            raise _bad(name, v, "must be at least 1")
    for name in ("save_every_n_steps", "save_every_n_epochs", "sample_every_n_steps", "sample_every_n_epochs"):
        v = args.get(name)
        if v is not None and v < 0:
            raise _bad(name, v, "must be >= 0 (0 or unset: never)")


def check_dataset_numbers(path: Path) -> None:
    """batch_size >= 1 and num_repeats >= 0 at every level of a dataset TOML ([general], [[datasets]],
    [[datasets.subsets]]); other values are checked where the TOML is parsed (data_config)."""
    doc = read_toml(path)
    levels: list[tuple[str, Any]] = [("[general]", doc.get("general"))]
    datasets = doc.get("datasets")
    for i, ds in enumerate(datasets if isinstance(datasets, list) else []):
        levels.append((f"datasets[{i}]", ds))
        subsets = ds.get("subsets") if isinstance(ds, dict) else None
        for j, ss in enumerate(subsets if isinstance(subsets, list) else []):
            levels.append((f"datasets[{i}].subsets[{j}]", ss))
    for where, table in levels:
        if not isinstance(table, dict):
            continue
        bs, rep = table.get("batch_size"), table.get("num_repeats")
        if isinstance(bs, int) and not isinstance(bs, bool) and bs < 1:
            raise LoraxInputError(f"{path}: {where} batch_size = {bs}: must be at least 1")
        if isinstance(rep, int) and not isinstance(rep, bool) and rep < 0:
            raise LoraxInputError(f"{path}: {where} num_repeats = {rep}: must be >= 0")


def check_output_dir(folder: Path) -> None:
    """The output folder is, or can be made, a writable folder on a disk that is not full."""
    if folder.exists() and not folder.is_dir():
        raise LoraxInputError(f"--output_dir {folder}: is a file, not a folder")
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            raise LoraxInputError(f"--output_dir {folder}: {existing} is a broken symlink")
        existing = existing.parent
    if not existing.is_dir():
        raise LoraxInputError(f"--output_dir {folder}: {existing} is a file, so the folder cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LoraxInputError(f"--output_dir {folder}: {existing} is not writable")
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise LoraxInputError(f"--output_dir {folder}: the disk is full ({free} bytes free)")


def _load_pickle(path: Path) -> Any:
    """A state file as accelerate reads it (weights_only, numpy's safe globals), errors as one line."""
    import pickle

    from accelerate.utils.other import load

    try:
        return load(str(path), map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise LoraxInputError(f"--resume {path}: refused: it holds pickled Python objects that only load "
                              f"with weights_only=False ({first_line(exc, 100)}...)") from None
    except Exception as exc:  # truncated zips and pickles raise many types
        raise LoraxInputError(f"--resume {path}: truncated or corrupt ({first_line(exc, 120)})") from None


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                f.get_slice(k).get_shape()
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraxInputError(f"--resume {path}: truncated or corrupt ({first_line(exc, 120)})") from None


def check_resume(folder: Path, args: Mapping[str, Any]) -> None:
    """A complete, readable state folder saved by a run with this run's identity."""
    if not folder.is_dir():
        raise LoraxInputError(f"--resume {folder}: not a folder")
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise LoraxInputError(f"--resume {folder}: not a training state folder ({STATE_FILE} missing)")
    try:
        doc = json.loads(state_file.read_text("utf-8"))
        ints = [doc[k] for k in ("epoch", "batch", "global_step", "seed")]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise LoraxInputError(f"--resume {state_file}: unreadable ({first_line(exc, 120)})") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
        raise LoraxInputError(f"--resume {state_file}: epoch, batch, global_step and seed must be integers >= 0")
    for name in STATE_FILES:
        if not (folder / name).is_file():
            raise LoraxInputError(f"--resume {folder}: {name} is missing (an incomplete state)")
    _check_safetensors(folder / "model.safetensors")
    for p in [folder / "optimizer.bin", folder / "scheduler.bin", *sorted(folder.glob("random_states_*.pkl"))]:
        _load_pickle(p)
    saved = doc.get("run")
    if isinstance(saved, dict):
        mine = run_identity(args)
        for k in (*IDENTITY_KEYS, "model"):
            if k in saved and saved[k] != mine[k]:
                raise LoraxInputError(f"--resume {folder}: saved by a run with {k} = {saved[k]}, "
                                      f"this run has {mine[k]}; resume with the same settings")


def tidy_output_dir(folder: Path, output_name: str) -> list[Path]:
    """Remove temporaries of killed runs (dead writers) and settle half-swapped state folders of
    `output_name`; returns what was removed. Main process only, before training."""
    if not folder.is_dir():
        return []
    removed = []
    for p in stale_temps(folder / "x", any_name=True):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    removed += recover_state_folders(folder, output_name)
    return removed
