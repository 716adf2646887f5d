"""Ctrl-C during the trainer's imports and SIGKILLs during its saves (subprocess; issue 13).

The process signals itself at an exact point (a patched function): Ctrl-C while torch imports is one
line and exit 130; a SIGKILL halfway through writing an adapter, or inside a state save, leaves no
broken file under a final name, and the next run is not blocked: it removes the leftovers, says in
one line which earlier file it replaces, and its files load.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_lorax.toml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

WRAPPER = r"""
import os, signal, sys
point = sys.argv.pop(1)
die = lambda sig: os.kill(os.getpid(), sig)
if point == "imports":
    import builtins
    real_import = builtins.__import__
    def signalling_import(name, *a, **k):
        if name == "torch":
            builtins.__import__ = real_import
            die(signal.SIGINT)
        return real_import(name, *a, **k)
    builtins.__import__ = signalling_import
elif point == "weights":          # the first adapter save: half its bytes in the temporary, then killed
    from sd_scripts_lorax.train import loop
    from sd_scripts_lorax.formats.atomic import temp_path
    def save_weights_atomic(net, path, dtype, metadata):
        tmp = temp_path(path)
        net.save_weights(str(tmp), dtype, metadata)
        data = tmp.read_bytes()
        tmp.write_bytes(data[: len(data) // 2])
        die(signal.SIGKILL)
    loop.save_weights_atomic = save_weights_atomic
elif point == "state":            # the first state save: accelerate's files written, then killed
    from sd_scripts_lorax.train import loop
    real_save_state = loop.save_state
    def save_state(accelerator, folder, state, identity=None):
        inner = accelerator.save_state
        def save_then_die(d):
            inner(d)
            die(signal.SIGKILL)
        accelerator.save_state = save_then_die
        return real_save_state(accelerator, folder, state, identity)
    loop.save_state = save_state
import train_network_lorax
train_network_lorax.main()
"""


def run(point: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = ["--config_file", str(TINY), "--output_dir", str(out), "--output_name", "run", "--progress", "off",
            "--max_train_steps", "2", "--save_every_n_steps", "1", "--save_state", *extra]
    return subprocess.run([sys.executable, "-c", WRAPPER, point, *argv], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=600)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_ctrl_c_during_imports_is_one_line(tmp_path):
    res = run("imports", tmp_path / "run")
    assert res.returncode == 130, res.stderr
    assert [ln for ln in res.stderr.splitlines() if ln.strip()] == \
        ["interrupted: every file already in the output folder is complete"]
    assert names(tmp_path) == []


def test_sigkill_during_saves_leaves_no_broken_file_and_blocks_nothing(tmp_path):
    out = tmp_path / "run"
    res = run("weights", out)
    assert res.returncode == -signal.SIGKILL, res.stderr
    left = names(out)
    assert len(left) == 1 and left[0].startswith(".run-step00000001.safetensors.") and ".tmp" in left[0], left

    res = run("state", out)
    assert res.returncode == -signal.SIGKILL, res.stderr
    # the first run's temporary is gone; the step-1 adapter is complete; its state never got its name
    assert names(out) == [".run-step00000001-state.tmp", "run-step00000001.safetensors"]
    assert load_file(out / "run-step00000001.safetensors")

    res = run("none", out)
    assert res.returncode == 0, res.stderr
    notes = [ln for ln in res.stderr.splitlines() if ln.startswith("note: replacing")]
    assert notes == [f"note: replacing {out / 'run-step00000001.safetensors'} (it was there before this save)"]
    left = names(out)
    assert not [n for n in left if n.startswith(".")], left
    assert "run.safetensors" in left and "run-step00000001-state" in left
    for n in left:
        if n.endswith(".safetensors"):
            assert load_file(out / n), n
