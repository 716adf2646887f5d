"""benchmarks/reproduce.py --quick: runs end to end and writes a well-formed table and plots."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_reproduce_quick(tmp_path):
    out = tmp_path / "rep"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "reproduce.py"), "--quick", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "results.md").read_text()
    for head in ("## Main table", "## Goal check", "## Threshold sweep", "## Rank sweep",
                 "## Goal check (--method distill", "## Data-free match error", "## Wall time per method"):
        assert head in md
    for variant in ("no adapter", "LoRA-X copied", "LoRA-X transferred", "LoRA-X trained on target",
                    "plain LoRA copied", "plain LoRA transferred", "d copied into target bases",
                    "LoRA-X distilled (--method distill)"):
        assert f"| embedded | {variant} |" in md
    assert "| embedded | LoRA-X copied at best multiplier (ORACLE) x" in md
    assert "side effect on target's own domain" in md
    for method in ("train on target (reference)", "transfer --method project", "transfer --method distill"):
        assert f"| embedded | {method} |" in md
    # every table row has the same number of cells as its header
    for block in md.split("\n\n"):
        rows = [ln for ln in block.splitlines() if ln.startswith("|")]
        if rows:
            assert len({ln.count("|") for ln in rows}) == 1, block
    res = json.loads((out / "results.json").read_text())
    main = res["main"]["embedded"]
    for variant, rows in main.items():
        assert len(rows) == 1
        for key in ("loss", "share", "cosine", "rel_mse", "side_effect"):
            assert math.isfinite(rows[0][key]), (variant, key)
    assert main["no adapter"][0]["side_effect"] == 0.0
    assert main["LoRA-X copied at best multiplier (ORACLE)"][0]["multiplier"] > 0
    assert main["no adapter"][0]["share"] == 0.0
    assert abs(main["LoRA-X trained on target"][0]["share"] - 1.0) < 1e-12
    assert abs(main["LoRA-X trained on target"][0]["cosine"] - 1.0) < 1e-9
    # the sweep: threshold 0 keeps every module, and a stricter threshold never keeps more
    sweep = res["sweep"]["embedded"]
    kept = [sweep[k][0]["kept"] for k in sorted(sweep, key=float)]
    assert kept[0] == sweep["0.0"][0]["total"] > 0 and kept == sorted(kept, reverse=True)
    assert set(res["ranks"]) == {"4", "8"}
    numbers = re.findall(r"-?\d+\.\d+", md)
    assert numbers and all(math.isfinite(float(x)) for x in numbers)
    for png in ("shares.png", "threshold_sweep.png", "rank_sweep.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
