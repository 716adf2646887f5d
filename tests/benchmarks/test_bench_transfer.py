"""benchmarks/bench_transfer.py on tiny fixtures: the summary table comes out with numeric ratios for
hot and (on Linux) disk page-cache states, and a subsample is labelled as such. No timing is asserted."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_transfer.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_transfer", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One work folder for the module, so the tiny fixtures are written once."""
    return tmp_path_factory.mktemp("bench_transfer")


def _table_rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    head = next(i for i, l in enumerate(lines) if l.split()[:1] == ["rank"] and "cold/ref" in l)
    rows = []
    for line in lines[head + 1:]:
        parts = line.split()
        if not parts or not parts[0].isdigit():
            break
        rows.append(parts)
    return rows


def test_tiny_run_prints_numeric_table(bench, work, capsys):
    assert bench.main(["--size", "tiny", "--modules", "12", "--ranks", "4", "6", "--work_dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "SUBSAMPLED: 12 of" in out                   # the subsample is labelled in the summary
    assert "(hot: it is compute-bound;" in out and "threads)" in out
    assert out.count("load average") == 2               # start and end
    assert "hashing both files" in out
    rows = _table_rows(out)
    assert [r[0] for r in rows] == ["4", "6"]
    for r in rows:
        assert len(r) == 9, r                             # rank + 4 hot + 4 disk columns
        hot = [float(x) for x in r[1:5]]                  # cold s, warm s, cold/ref, warm/read
        assert all(x > 0 for x in hot)
        if bench.CAN_EVICT:
            disk = [float(x) for x in r[5:9]]
            assert all(x > 0 for x in disk)
            assert "page cache:" in out and "read in" in out
        else:
            assert r[5:9] == ["-"] * 4


def test_skip_reference_leaves_ratio_blank(bench, work, capsys):
    assert bench.main(["--size", "tiny", "--modules", "4", "--ranks", "4", "--skip_reference",
                       "--work_dir", str(work)]) == 0
    (row,) = _table_rows(capsys.readouterr().out)
    assert row[3] == "-" and float(row[4]) > 0          # no cold/ref without a reference; warm/read stays


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise unavailable")
def test_evict_and_warm_handle_files_and_folders(bench, tmp_path):
    # Functional only (residency is not observable from Python); the benchmark itself times it.
    d = tmp_path / "cache"
    d.mkdir()
    (d / "a.bin").write_bytes(os.urandom(1 << 16))
    (tmp_path / "b.bin").write_bytes(b"x" * 10)
    bench.evict([d, tmp_path / "b.bin", tmp_path / "missing"])
    bench.warm([d, tmp_path / "b.bin"])
    disk, cached, n = bench.check_eviction(d / "a.bin")
    assert n == 1 << 16 and disk > 0 and cached > 0
