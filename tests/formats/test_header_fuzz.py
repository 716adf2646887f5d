"""Seeded fuzz of safetensors headers (issue 13): a few hundred mutated LoRA files and checkpoints go
through the readers users reach (read_lora, `inspect`, Checkpoint.open + a weight read); each either
reads or is refused with one LoraxInputError naming the file: never another exception, a hang or a
huge allocation from a forged shape. Seeded, so a failure names a case that replays."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest
import torch

from sd_scripts_lorax.errors import LoraxInputError
from sd_scripts_lorax.formats.checkpoint import Checkpoint
from sd_scripts_lorax.formats.lora_file import LoraModule, read_lora, write_lora
from sd_scripts_lorax.tools.inspect import inspect_path

SEED = 20260513
LORA_CASES = 240
CHECKPOINT_CASES = 60
DTYPE_NAMES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "XYZ", "", "f32", 7, None]
WEIRD_INTS = [-1, 0, 1, 3, 2**31, 2**40, 2**63 - 1, 2**64 + 5, -(2**63)]


def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: object, body: bytes, pad: int = 0) -> bytes:
    raw = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(raw)) + raw + body


def mutate_header(rng: random.Random, header: dict) -> object:
    """One structural change to the JSON header."""
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    kind = rng.randrange(12)
    if kind == 0:
        entry["dtype"] = rng.choice(DTYPE_NAMES)
    elif kind == 1:
        entry["shape"] = rng.choice([[], [rng.choice(WEIRD_INTS)], [4, -4], [2**40, 2**40], "4x4", [1.5, 2],
                                     [[4]], None, [0, 8], list(entry["shape"])[::-1] + [1]])
    elif kind == 2:
        lo, hi = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[hi, lo], [lo, hi + 1], [lo - 1, hi], [lo, lo], [lo, 2**62],
                                            [rng.choice(WEIRD_INTS), rng.choice(WEIRD_INTS)], [lo], [lo, hi, 0],
                                            "0,4", [float(lo), float(hi)], None])
    elif kind == 3:  # two tensors over the same bytes
        other = header[rng.choice(names)]
        entry["data_offsets"] = list(other["data_offsets"])
    elif kind == 4:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif kind == 5:
        entry[rng.choice(["extra", "dtype2"])] = rng.choice([1, "x", None])
    elif kind == 6:
        header["__metadata__"] = rng.choice([[], "meta", {"a": 1}, {"a": None}, {"a": ["x"]}, None, {"": ""}])
    elif kind == 7:
        header[name] = rng.choice([[], "tensor", 5, None, {}])
    elif kind == 8:
        return rng.choice([[], "x", 1, None, [header]])
    elif kind == 9:  # a key renamed to something that is no LoRA key
        header[rng.choice(["", "x" * 300, name + ".extra", "lora_unet_x.lora_mid.weight"])] = header.pop(name)
    elif kind == 10:
        del header[name]  # a hole in the data section
    else:
        header[name + "_copy"] = dict(entry)  # a second tensor over the same bytes
    return header


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """A byte-level change: the length field, a truncation, flipped or non-UTF-8 header bytes."""
    n = struct.unpack("<Q", data[:8])[0]
    kind = rng.randrange(6)
    if kind == 0:
        return struct.pack("<Q", rng.choice([0, 1, 2, n - 1, n + 1, len(data), 2**63, 2**64 - 1])) + data[8:]
    if kind == 1:
        return data[:rng.randrange(0, len(data))]
    if kind == 2:
        b = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(8, 8 + n)] = rng.randrange(256)
        return bytes(b)
    if kind == 3:
        b = bytearray(data)
        i = rng.randrange(8, 8 + n)
        b[i:i + 2] = b"\xff\xfe"
        return bytes(b)
    if kind == 4:
        return data + bytes(rng.randrange(1, 64))  # trailing bytes beyond the data section
    return data[:8 + n] + data[8 + n + rng.randrange(1, 16):]  # a data section shorter than promised


def cases(rng: random.Random, valid: bytes, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        if rng.random() < 0.6:
            header, body = split(valid)
            for _ in range(rng.randrange(1, 3)):
                header = mutate_header(rng, header) if isinstance(header, dict) and len(header) > 1 else header
            out.append(join(header, body, pad=rng.choice([0, 0, 3])))
        else:
            out.append(mutate_bytes(rng, valid))
    return out


def survives(read, path: Path) -> str:
    """'ok' or 'refused'; any other exception fails the test with the case's path."""
    try:
        read(path)
    except LoraxInputError as exc:
        line = str(exc)
        assert "\n" not in line and str(path) in line, line
        return "refused"
    return "ok"


@pytest.fixture(scope="module")
def valid_lora(tmp_path_factory) -> bytes:
    g = torch.Generator().manual_seed(0)
    mods = [LoraModule(f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_{x}",
                       torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 4.0) for x in "qkv"]
    path = write_lora(tmp_path_factory.mktemp("fuzz") / "base.safetensors", mods, {"ss_network_dim": "4"})
    return path.read_bytes()


def test_fuzzed_lora_headers(tmp_path, valid_lora):
    rng = random.Random(SEED)
    outcomes = {"ok": 0, "refused": 0}
    for i, data in enumerate(cases(rng, valid_lora, LORA_CASES)):
        path = tmp_path / f"case{i:03d}.safetensors"
        path.write_bytes(data)
        reader = read_lora if i % 2 == 0 else (lambda p: inspect_path(p, with_hashes=False))
        outcomes[survives(reader, path)] += 1
        path.unlink()
    print("lora outcomes", outcomes)
    # the mutations mostly break the file; a few are harmless (padding, a renamed metadata value)
    assert outcomes["refused"] > LORA_CASES // 2 and outcomes["ok"] + outcomes["refused"] == LORA_CASES


def test_fuzzed_checkpoint_headers(tmp_path, tiny_sd1_single):
    valid = tiny_sd1_single.read_bytes()
    rng = random.Random(SEED + 1)

    def open_and_read(p: Path) -> None:
        with Checkpoint.open(p) as c:
            refs = sorted(c.modules().items())
            for _, ref in refs[:: max(1, len(refs) // 4)]:
                c.weight(ref)

    outcomes = {"ok": 0, "refused": 0}
    for i, data in enumerate(cases(rng, valid, CHECKPOINT_CASES)):
        path = tmp_path / f"ckpt{i:03d}.safetensors"
        path.write_bytes(data)
        outcomes[survives(open_and_read, path)] += 1
        path.unlink()
    print("checkpoint outcomes", outcomes)
    assert outcomes["refused"] > CHECKPOINT_CASES // 2
