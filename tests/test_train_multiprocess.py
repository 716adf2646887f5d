"""Two CPU processes (torchrun; accelerate picks MULTI_CPU with gloo from its environment): data
sharded, gradients all-reduced, one file written by the main process only.

`accelerate launch --cpu --num_processes 2` starts a single process in accelerate 1.15, so the
closest multi-process CPU setup is `torchrun --nproc_per_node 2 train_network_lorax.py ...`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]


def test_two_processes_train_and_main_saves(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29561", str(REPO / "train_network_lorax.py"),
           "--config_file", str(REPO / "configs/tiny_lorax.toml"), "--output_dir", str(tmp_path),
           "--max_train_steps", "2", "--progress", "off"]
    # own session: on a timeout the whole process group (torchrun and both ranks) is ended
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{err[-2000:]}")
    assert proc.returncode == 0, err[-2000:]
    saved = [l for l in out.splitlines() if l.startswith("saved ")]
    assert saved == [f"saved {tmp_path / 'tiny_lorax.safetensors'} (2 processes, ranks in sync: True)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_lorax.safetensors"]  # no temp files
    with safe_open(tmp_path / "tiny_lorax.safetensors", "pt") as f:
        md = f.metadata()
    assert md["ss_total_batch_size"] == "8" and md["ss_num_batches_per_epoch"] == "3"
