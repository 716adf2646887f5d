"""Acceptance: kohya's unmodified train_network.py with `--network_module networks.lora_x`, on a
full-size SD1.5 checkpoint with random weights, in kohya's pinned venv, as a kohya user runs it.

Stages, in order (each test names its stage; a later stage needs the train stage's files):
  train   2 steps (min-SNR 5, gradient checkpointing, cached latents), saved every step;
  resume  --network_weights <train step 1>: the file is really loaded (d continues from it);
  dimfw   the same through --dim_from_weights (create_network_from_weights);
  conv    --network_args conv_dim=4 svd_cache_dir=...: kohya's conv keys, the cache filled;
  merge   kohya's own networks/lora.py (create_network_from_weights + merge_to) merges the saved file
          to the same weights as our merge.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

pytestmark = pytest.mark.kohya

LR = 1e-3  # Adam's first step moves every d entry by about the learning rate
STAGES: dict = {}


@pytest.fixture(scope="module")
def ws(kohya_ws):
    kohya_ws.make_fixtures()
    return kohya_ws


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    assert path.exists(), f"kohya did not save {path.name}"
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118 (safe_open has no __iter__)


def _stage(name: str):
    if name not in STAGES:
        pytest.fail(f"needs the '{name}' stage, which did not pass (see its test)")
    return STAGES[name]


def _kohya_keys(ws, conv: str) -> dict:
    return ws.probe(f"keys-sd1-{conv}", "keys", "sd1", conv)["kohya"]


def _check_file(path, expected_keys: dict, dim: int = 4) -> dict[str, torch.Tensor]:
    sd, meta = _read(path)
    assert set(sd) == set(expected_keys), (f"{path.name}: keys differ from kohya's lora.py: only ours "
                                           f"{sorted(set(sd) - set(expected_keys))[:3]}, missing "
                                           f"{sorted(set(expected_keys) - set(sd))[:3]}")
    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    assert not bad, f"{path.name}: non-finite tensors {bad[:3]}"
    assert meta.get("ss_network_module") == "networks.lora_x", meta.get("ss_network_module")
    assert meta.get("ss_network_dim") == str(dim)
    assert all(float(sd[k]) == dim for k in sd if k.endswith(".alpha")), "alpha must equal the rank"
    return sd


def _d_moves(before: dict, after: dict) -> torch.Tensor:
    """|d_after - d_before| per rank entry: up = U diag(d) with the same orthonormal U in both files,
    so the column norms of the difference of the ups are exactly |delta d|."""
    moves = []
    for k, up in after.items():
        if k.endswith("lora_up.weight"):
            diff = (up.double() - before[k].double()).reshape(up.shape[0], up.shape[1])
            moves.append(diff.norm(dim=0))
    return torch.cat(moves)


def _check_loaded(result, source: dict, stage: str) -> None:
    """The first step after loading continues from the file's d: every entry moved by about one Adam
    step (~LR). Ignoring the file would restart from d = 0, and its first step would reproduce the
    file itself (moves 0) or flip its sign (moves 2 LR)."""
    lines = [ln for ln in result.text.splitlines() if "load network weights from" in ln]
    assert lines, f"{stage}: kohya did not print 'load network weights from' (no --network_weights load)"
    assert "'loaded': 264" in lines[0], f"{stage}: load_weights did not load all 264 modules: {lines[0][-300:]}"
    first, _ = _read(result.file("-step00000001"))
    moves = _d_moves(source, first)
    share = float(((moves > 0.5 * LR) & (moves < 1.5 * LR)).double().mean())
    assert share > 0.9, (f"{stage}: after loading, only {share:.0%} of d moved by one step from the file's "
                         f"(median move {float(moves.median()):.2e}, LR {LR}): the file was not continued")


def test_train(ws):
    result = ws.train("train")
    expected = _kohya_keys(ws, "none")
    steps = [_check_file(result.file(f"-step0000000{i}"), expected) for i in (1, 2)]
    final = _check_file(result.file(), expected)
    for k in final:
        if k.endswith("lora_down.weight"):  # V^T: the bases never change
            assert torch.equal(steps[0][k], steps[1][k]), f"{k}: bases changed between steps"
    # at 64 px the mid block's self-attention sees one token: its to_q / to_k get no gradient (as in LoRA)
    moved = _d_moves({k: torch.zeros_like(v) for k, v in steps[0].items()}, steps[0]) > 0
    assert float(moved.double().mean()) > 0.98, f"step 1: only {int(moved.sum())} of {moved.numel()} d moved from 0"
    assert float(_d_moves(steps[0], steps[1]).max()) > 0, "the weights did not change between steps 1 and 2"
    assert all(torch.equal(final[k], steps[1][k]) for k in final), "the final file differs from step 2"
    STAGES["train"] = result


def test_resume_with_network_weights(ws):
    source = _stage("train").file("-step00000001")
    result = ws.train("resume", "networks.lora_x", "--network_weights", str(source))
    _check_file(result.file(), _kohya_keys(ws, "none"))
    _check_loaded(result, _read(source)[0], "resume")
    STAGES["resume"] = result


def test_dim_from_weights(ws):
    source = _stage("train").file("-step00000001")
    result = ws.train("dimfw", "networks.lora_x", "--network_weights", str(source), "--dim_from_weights")
    _check_file(result.file(), _kohya_keys(ws, "none"))
    _check_loaded(result, _read(source)[0], "dimfw")


def test_conv_dim_and_svd_cache(ws):
    cache = ws.root / "svd-cache"
    result = ws.train("conv", "networks.lora_x", "--network_args", "conv_dim=4", f"svd_cache_dir={cache}")
    expected = _kohya_keys(ws, "4")
    sd = _check_file(result.file(), expected)
    assert any(k.endswith("conv1.lora_down.weight") and sd[k].shape[2:] == (3, 3) for k in sd), "no 3x3 conv module"
    assert any(cache.rglob("*")), f"svd_cache_dir {cache} is empty"
    _, meta = _read(result.file())
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "4"
    STAGES["conv"] = result


def test_kohya_merge_equals_ours(ws):
    lora = _stage("conv").file()
    got = ws.probe("merge", "merge", str(ws.checkpoint), str(lora))
    n_file = len({k.split(".")[0] for k in _read(lora)[0]})
    assert got["modules"] == got["file_modules"] == n_file, got
    assert got["dims"].get("4", 0) > 0 and got["dims"].get("2", 0) > 0, f"conv and linear modules both merged: {got}"
    assert got["load_info"]["loaded"] == n_file and got["load_info"]["lorax"], got["load_info"]
    assert math.isfinite(got["max_err_over_tol"]) and got["max_err_over_tol"] <= 1.0, \
        (f"kohya's merge and ours differ beyond float32 rounding at {got['worst_module']}: "
         f"{got['max_err_over_tol']:.2f}x the tolerance ({got['max_rel_err']:.2e} of the update)")
