"""benchmarks/gpu_check.py in its CPU mode (--device cpu --small), so the GPU script cannot rot: every
part runs (bases, transfer through transfer_lorax.py, training LoRA-X and the plain-LoRA baseline in
child processes, distill), and the JSON and markdown come out. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_small_mode_runs_every_part(gpu_check, tmp_path):
    out = tmp_path / "out"
    rc = gpu_check.main(["--device", "cpu", "--small", "--out", str(out), "--work_dir", str(tmp_path / "work"),
                         "--ranks", "4", "--modules", "6",
                         "--steps", "1", "--budget_s", "100000"])
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["failures"] == [], {n: p.get("error") or p.get("rows") for n, p in doc["parts"].items() if not p["ok"]}
    assert rc == 0
    assert set(doc["parts"]) == {"bases", "transfer", "train", "distill"}
    assert doc["env"]["device"] == "cpu" and doc["env"]["small"] is True

    bases = doc["parts"]["bases"]["rows"]
    assert bases and all(r["ok"] for r in bases)
    assert all(r["proj_err"] < 1e-4 for r in bases if r["gap"] > 1e-3)
    assert any(r["warm"] for r in bases)

    (tr,) = doc["parts"]["transfer"]["rows"]
    assert tr["rank"] == 4 and tr["modules"] == 6 and tr["ok"]
    assert tr["dw_err_cold"] <= 2e-3 and tr["dw_err_warm"] <= 2e-3

    train = {r["variant"]: r for r in doc["parts"]["train"]["rows"]}
    assert train["lora_x"]["status"] == "ok" and train["lora_x"]["steps"] == 1
    assert train["lora_x"]["steps_per_s"] > 0
    assert "lora_x_adamw8bit" not in train            # a CUDA optimiser: not in the CPU mode
    assert train["lora"]["status"] in ("ok", "skipped")

    distill = doc["parts"]["distill"]
    assert distill["ok"] and (distill.get("status") == "skipped" or distill["rows"][0]["steps"] == 1)

    md = (out / "gpu_check.md").read_text()
    for heading in ("## bases: ok", "## transfer: ok", "## train: ok", "## distill:"):
        assert heading in md


def test_cuda_without_cuda_is_refused(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--device", "cuda", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert not (tmp_path / "gpu_check.json").exists()
