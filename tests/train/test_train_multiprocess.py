"""Two CPU processes (torchrun; accelerate picks MULTI_CPU with gloo from its environment): data
sharded, gradients all-reduced, one file written by the main process only.

`accelerate launch --cpu --num_processes 2` starts a single process in accelerate 1.15, so the
closest multi-process CPU setup is `torchrun --nproc_per_node 2 train_network_lorax.py ...`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_two_processes_train_and_main_saves(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29561", str(REPO / "train_network_lorax.py"),
           "--config_file", str(REPO / "configs/tiny_lorax.toml"), "--output_dir", str(tmp_path),
           "--max_train_steps", "2", "--progress", "off"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        # torchrun's workers live in process groups of their own and hold our pipes open: end the
        # whole tree, then read what is left without waiting on a pipe forever
        _kill_tree(proc.pid)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out, err = "", "(no output: the pipes stayed open)"
        pytest.fail(f"torchrun timed out:\n{err[-2000:]}")
    assert proc.returncode == 0, err[-2000:]
    saved = [l for l in out.splitlines() if l.startswith("saved ")]
    assert saved == [f"saved {tmp_path / 'tiny_lorax.safetensors'} (2 processes, ranks in sync: True)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_lorax.safetensors"]  # no temp files
    with safe_open(tmp_path / "tiny_lorax.safetensors", "pt") as f:
        md = f.metadata()
    assert md["ss_total_batch_size"] == "8" and md["ss_num_batches_per_epoch"] == "3"
