"""benchmarks/bench_distill.py on tiny fixtures: it runs end to end and prints positive per-step and
per-pass times (the full-size run is the note's; this keeps the script from rotting)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_tiny_run_prints_positive_rates(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_distill.py"), "--size", "tiny", "--steps", "3",
                        "--batch_size", "2", "--work_dir", str(tmp_path)], capture_output=True, text=True, cwd=REPO,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"BENCH_DISTILL per_step_s=([\d.]+) per_pass_s=([\d.]+) peak_rss_gib=([\d.]+)", r.stdout)
    assert m, r.stdout[-2000:]
    per_step, per_pass, rss = map(float, m.groups())
    assert per_step > 0 and per_pass > 0 and rss > 0.1
    assert "% of training the adapter on the target" in r.stdout
