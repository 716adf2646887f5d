"""Ctrl-C and SIGKILL at chosen points of transfer_lorax.py (subprocess; issue 13).

The signal is sent by the process to itself at an exact point (a patched function), so each case is
deterministic: during the imports, in the middle of the per-module work, while the outputs are
being written to their temporaries. Ctrl-C: one line, exit 130, nothing in the output folder.
SIGKILL: no file under a final name, and the next run (no --overwrite) is not blocked, loads, and
removes the killed runs' temporaries.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sd_scripts_lorax.formats.lora_file import read_lora

from test_output_clashes import lorax_file

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# argv: POINT SIGNAL transfer-args...; POINT is where the process signals itself
WRAPPER = r"""
import os, signal, sys
point, sig = sys.argv[1], getattr(signal, sys.argv[2])
del sys.argv[1:3]
hit = lambda: os.kill(os.getpid(), sig)
if point == "imports":                       # transfer_lorax imports torch & co. inside main()
    import builtins
    real_import = builtins.__import__
    def signalling_import(name, *a, **k):
        if name == "torch":
            builtins.__import__ = real_import
            hit()
        return real_import(name, *a, **k)
    builtins.__import__ = signalling_import
else:
    from sd_scripts_lorax.transfer import engine, matching
    if point == "modules":                   # the third module's results
        calls, apply = [0], matching.apply
        def _apply(outcomes):
            calls[0] += 1
            if calls[0] == 3:
                hit()
            apply(outcomes)
        matching.apply = _apply
    elif point in ("adapter", "report"):    # through OutputSet.stage, whatever the engine calls it with
        from sd_scripts_lorax.transfer import outputs
        stage = outputs.OutputSet.stage
        def staged(self, path, write):
            def cut(tmp):
                if point == "adapter" and str(path).endswith(".safetensors"):
                    write(tmp)                   # half of the adapter in its temporary, then the signal
                    data = open(tmp, "rb").read()
                    open(tmp, "wb").write(data[: len(data) // 2])
                    hit()
                elif point == "report" and str(path).endswith(".json"):
                    open(tmp, "w").write('{"modules": [')   # the adapter staged, the report half written
                    hit()
                else:
                    write(tmp)
            return stage(self, path, cut)
        outputs.OutputSet.stage = staged
    elif point == "rename":                  # the adapter renamed into place, the report not yet
        from pathlib import Path
        real_replace = os.replace
        def replace(src, dst, *a, **k):
            real_replace(src, dst, *a, **k)
            if ".tmp" not in Path(dst).name:     # a final name, not a temporary's
                hit()
        os.replace = replace
import transfer_lorax
sys.exit(transfer_lorax.main())
"""


def run(point: str, sig: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRAPPER, point, sig, "--no_progress", *map(str, args)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_sd1_single, tiny_sd1_single_derived):
    lora = lorax_file(tiny_sd1_single, tmp_path_factory.mktemp("int_lora") / "style.safetensors")
    return ["--lora", lora, "--source_model", tiny_sd1_single, "--target_model", tiny_sd1_single_derived,
            "--threshold", "0"]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("point", ["imports", "modules", "adapter"])
def test_ctrl_c_is_one_line_exit_130_and_leaves_nothing(tmp_path, inputs, point):
    out = tmp_path / "out"
    out.mkdir()
    res = run(point, "SIGINT", *inputs, "--save_to", out / "o.safetensors", "--report", out / "r.json",
              "--plot", out / "p.png")
    assert res.returncode == 130, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines == ["interrupted: no output was written"], res.stderr
    assert names(out) == []


def test_sigkill_leaves_no_final_file_and_blocks_no_later_run(tmp_path, inputs):
    out = tmp_path / "out"
    out.mkdir()
    o, r = out / "o.safetensors", out / "r.json"
    pids = []
    for point, staged in (("adapter", 1), ("report", 2)):
        res = run(point, "SIGKILL", *inputs, "--save_to", o, "--report", r)
        assert res.returncode == -signal.SIGKILL, res.stderr
        left = names(out)
        # only temporaries: the half-written adapter; then a staged adapter and a half report, the
        # first run's temporary having been swept by the second run as it staged the same name
        assert len(left) == staged and all(n.startswith(".") and ".tmp" in n for n in left), left
        pids.append({n.split(".")[-3].split("-")[0] for n in left})
    assert pids[0] != pids[1]
    res = run("none", "SIGINT", *inputs, "--save_to", o, "--report", r)
    assert res.returncode == 0, res.stderr
    assert names(out) == ["o.safetensors", "r.json"]  # the killed runs' temporaries are gone
    assert read_lora(o).modules and json.loads(r.read_text())["summary"]["modules"] == 6


def test_sigkill_between_the_renames_blocks_no_later_run(tmp_path, inputs):
    out = tmp_path / "out"
    out.mkdir()
    o, r = out / "o.safetensors", out / "r.json"
    res = run("rename", "SIGKILL", *inputs, "--save_to", o, "--report", r)
    assert res.returncode == -signal.SIGKILL, res.stderr
    left = names(out)
    # the adapter is complete under its name; the report is still a temporary; both carry a mark
    assert "o.safetensors" in left and "r.json" not in left, left
    assert sum(n.endswith("-renaming.tmp") for n in left) == 2, left
    assert read_lora(o).modules
    before = o.read_bytes()
    res = run("none", "SIGINT", *inputs, "--save_to", o, "--report", r)  # no --overwrite
    assert res.returncode == 0, res.stderr
    assert names(out) == ["o.safetensors", "r.json"]
    assert o.read_bytes() == before and json.loads(r.read_text())["summary"]["modules"] == 6
    # a finished set is protected again
    res = run("none", "SIGINT", *inputs, "--save_to", o, "--report", r)
    assert res.returncode == 2 and "output exists" in res.stderr
