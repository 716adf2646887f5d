"""checkpoint.py and hashing.py: lazy reading, family detection, bad input, hashes vs hashlib."""

from __future__ import annotations

import copy
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from sd_scripts_lorax.formats.checkpoint import Checkpoint
from sd_scripts_lorax.formats.safetensors_header import read_header
from sd_scripts_lorax.errors import LoraxInputError
from sd_scripts_lorax.formats.hashing import (
    LEGACY_LENGTH,
    LEGACY_OFFSET,
    hash_bytes,
    hash_file,
    precalculate_safetensors_hashes,
)
from sd_scripts_lorax.families.naming import ModuleRef

# ---------------------------------------------------------------- hand-made single files

SD1_KEYS = {  # the real original-layout key names, tiny widths
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (32, 32, 1, 1),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (32, 32),
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (32, 32),
    "first_stage_model.encoder.conv_in.weight": (16, 3, 3, 3),
    "model_ema.diffusion_modelinput_blocks11proj_inweight": (32, 32, 1, 1),
}
SD2_KEYS = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (32, 32),
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (144, 48),
    "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight": (96, 48),
}
SDXL_KEYS = {
    "model.diffusion_model.label_emb.0.0.weight": (128, 80),
    "model.diffusion_model.input_blocks.4.1.proj_in.weight": (64, 64),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (32, 32),
    "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (96, 32),
}


def make_state(keys: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g).to(dtype) for k, s in keys.items()}


def write(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file(state, str(path), metadata=metadata)
    return path


# ---------------------------------------------------------------- hashing


def _expected(data: bytes) -> tuple[str, str, str]:
    n = int.from_bytes(data[:8], "little")
    return (hashlib.sha256(data).hexdigest(),
            hashlib.sha256(data[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8],
            hashlib.sha256(data[8 + n:]).hexdigest())


@pytest.mark.parametrize("chunk", [7, 4096, 1 << 20, 4 << 20])
def test_hashes_match_hashlib_on_raw_bytes(tmp_path, chunk):
    # > 1 MiB + 64 KiB so the legacy window is full, and chunks that straddle every boundary
    state = {"a": torch.arange(400_000, dtype=torch.float32), "b": torch.ones(3, dtype=torch.float16)}
    path = write(tmp_path / "m.safetensors", state, {"ss_x": "1"})
    data = path.read_bytes()
    assert len(data) > LEGACY_OFFSET + LEGACY_LENGTH
    h = hash_file(path, chunk_size=chunk)
    assert (h.sha256, h.legacy, h.addnet) == _expected(data)
    assert h.autov2 == h.sha256[:10]
    assert hash_bytes(data) == h


def test_hashes_of_short_and_non_safetensors_files(tmp_path):
    small = write(tmp_path / "s.safetensors", {"a": torch.zeros(4)})
    data = small.read_bytes()
    h = hash_file(small)
    assert (h.sha256, h.legacy, h.addnet) == _expected(data)
    assert h.legacy == hashlib.sha256(b"").hexdigest()[:8]  # nothing at 1 MiB: A1111 hashes empty bytes
    ckpt = tmp_path / "m.ckpt"
    torch.save({"a": torch.zeros(4)}, ckpt)  # a zip: its first 8 bytes are no header length
    h = hash_file(ckpt)
    assert h.sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert h.addnet is None


def test_precalculated_hashes_follow_kohya_definition(tmp_path):
    state = {"lora_unet_x.lora_down.weight": torch.randn(4, 8), "lora_unet_x.alpha": torch.tensor(4.0)}
    meta = {"ss_network_dim": "4", "modelspec.title": "t", "sshs_model_hash": "old"}
    model_hash, legacy = precalculate_safetensors_hashes(state, meta)
    # independent: serialise with only ss_* metadata, hash the bytes after the header
    buf = save(state, metadata={"ss_network_dim": "4"})
    n = int.from_bytes(buf[:8], "little")
    assert model_hash == hashlib.sha256(buf[8 + n:]).hexdigest()
    assert legacy == hashlib.sha256(buf[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_LENGTH]).hexdigest()[:8]
    # the tensor-data hash does not depend on the metadata, so a file saved with the final
    # metadata has the same addnet hash
    final = write(tmp_path / "l.safetensors", state, dict(meta, sshs_model_hash=model_hash))
    assert hash_file(final).addnet == model_hash


# ---------------------------------------------------------------- single files


def test_single_file_sd1_lazy_and_as_stored(tmp_path):
    state = make_state(SD1_KEYS, torch.float16)
    path = write(tmp_path / "sd1.safetensors", state)
    with Checkpoint.open(path) as ck:
        assert (ck.family, ck.layout, ck.name) == ("sd1", "single_file", "sd1.safetensors")
        assert set(ck.keys()) == set(SD1_KEYS)  # EMA keys are listed
        key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
        assert ck.shape(key) == (32, 32, 1, 1) and ck.dtype(key) == torch.float16
        t = ck.tensor(key)
        assert t.dtype == torch.float16 and torch.equal(t, state[key])
        assert torch.equal(ck.tensor(key, rows=(4, 9)), state[key][4:9])
        assert not ck._handles or len(ck._handles) == 1
        assert ck.dtypes() == {torch.float16: 4}  # EMA not counted
        assert ck.hashes().sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ck._handles == {}


@pytest.mark.parametrize("keys,family", [(SD1_KEYS, "sd1"), (SD2_KEYS, "sd2"), (SDXL_KEYS, "sdxl")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_file_family_detection(tmp_path, keys, family, dtype):
    path = write(tmp_path / "m.safetensors", make_state(keys, dtype))
    with Checkpoint.open(path) as ck:
        assert ck.family == family
        assert {ck.dtype(k) for k in ck.keys()} == {dtype}


@pytest.mark.parametrize("keys,family", [(SD1_KEYS, "sd1"), (SD2_KEYS, "sd2"), (SDXL_KEYS, "sdxl")])
def test_unet_only_single_file(tmp_path, keys, family):
    unet = {k: s for k, s in keys.items() if k.startswith("model.diffusion_model.")}
    unet["model.diffusion_model.input_blocks.0.0.weight"] = (32, 4, 3, 3)
    path = write(tmp_path / "u.safetensors", make_state(unet))
    with Checkpoint.open(path) as ck:
        assert ck.family == family


def test_fused_in_proj_rows_are_sliced(tmp_path):
    # text encoders only: the UNet needs its whole block structure to be indexed
    state = make_state({k: s for k, s in SDXL_KEYS.items() if k.startswith("conditioner.")})
    path = write(tmp_path / "xl.safetensors", state)
    fused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    with Checkpoint.open(path) as ck:
        ref = ck.modules()["lora_te2_text_model_encoder_layers_0_self_attn_k_proj"]
        assert ref.key == fused and ref.rows == (32, 64)
        assert torch.equal(ck.weight(ref), state[fused][32:64])


def test_weight_refuses_nan_and_inf(tmp_path):
    state = make_state(SD1_KEYS)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    state[key][3, 5] = float("nan")
    path = write(tmp_path / "nan.safetensors", state)
    ref = ModuleRef("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "unet", key,
                    None, (32, 32), "attn")
    with Checkpoint.open(path) as ck:
        with pytest.raises(LoraxInputError) as err:
            ck.weight(ref)
        msg = str(err.value)
        assert "NaN/Inf" in msg and ref.lora_name in msg and key in msg and str(path) in msg
        assert "\n" not in msg
        # an Inf only outside the sliced rows is not in the module's weight
        ok = ModuleRef(ref.lora_name, "unet", key, (0, 2), (2, 32), "attn")
        assert ck.weight(ok).shape == (2, 32)


@pytest.mark.parametrize("zipfile", [True, False])  # torch's zip format (memory-mapped) and legacy pickles
def test_ckpt_with_state_dict_wrapper(tmp_path, zipfile):
    state = make_state(SD1_KEYS, torch.float16)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": state, "global_step": 10, "epoch": 1}, path, _use_new_zipfile_serialization=zipfile)
    with Checkpoint.open(path) as ck:
        assert ck.family == "sd1" and ck.layout == "single_file"
        key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
        assert ck.dtype(key) == torch.float16 and torch.equal(ck.tensor(key, rows=(0, 3)), state[key][:3])
        assert ck.hashes().addnet is None


class Evil:  # any non-allow-listed class makes weights_only=True refuse the pickle
    def __init__(self) -> None:
        self.x = 1


def test_ckpt_needing_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": make_state(SD1_KEYS), "args": Evil()}, path)
    with pytest.raises(LoraxInputError, match=r"evil\.ckpt: refused"):
        Checkpoint.open(path)


# ---------------------------------------------------------------- bad input


def _bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    good = write(tmp / "good.safetensors", make_state(SD1_KEYS))
    data = good.read_bytes()
    out = {}
    (tmp / "trunc.safetensors").write_bytes(data[:-10])
    out["truncated"] = (tmp / "trunc.safetensors", "truncated")
    (tmp / "text.safetensors").write_text("hello, this is not a model at all\n")
    out["text"] = (tmp / "text.safetensors", "not a safetensors file")
    n = int.from_bytes(data[:8], "little")
    (tmp / "corrupt.safetensors").write_bytes(data[:8] + b"{" * n + data[8 + n:])
    out["corrupt_header"] = (tmp / "corrupt.safetensors", "corrupt header")
    (tmp / "tiny.safetensors").write_bytes(b"abc")
    out["too_short"] = (tmp / "tiny.safetensors", "not a safetensors file")
    (tmp / "trunc.ckpt").write_bytes(b"PK\x03\x04garbage")
    out["truncated_ckpt"] = (tmp / "trunc.ckpt", "not a readable torch checkpoint")
    out["missing"] = (tmp / "nope.safetensors", "no such file")
    (tmp / "folder").mkdir()
    out["plain_folder"] = (tmp / "folder", "not a diffusers model")
    out["unknown_arch"] = (write(tmp / "other.safetensors", {"encoder.weight": torch.zeros(2, 2)}),
                           "unknown architecture")
    return out


BAD_CASES = ["truncated", "text", "corrupt_header", "too_short", "truncated_ckpt", "missing",
             "plain_folder", "unknown_arch"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_naming_the_file(tmp_path, case):
    path, needle = _bad_files(tmp_path)[case]
    with pytest.raises(LoraxInputError) as err:
        Checkpoint.open(path)
    msg = str(err.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def test_header_reader_metadata(tmp_path):
    path = write(tmp_path / "m.safetensors", make_state(SD2_KEYS, torch.bfloat16), {"ss_a": "b"})
    header = read_header(path)
    assert header.metadata == {"ss_a": "b"}
    assert header.tensors["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == ("BF16", (32, 32))
    assert header.data_start == 8 + int.from_bytes(path.read_bytes()[:8], "little")


# ---------------------------------------------------------------- diffusers folders (real tiny models)


def _save_diffusers(models, out: Path, class_name: str, **save_kw) -> Path:
    out.mkdir()
    names = ["text_encoder", "text_encoder_2"]
    models.unet.save_pretrained(out / "unet", **save_kw)
    for name, te in zip(names, models.text_encoders):
        te.save_pretrained(out / name, **save_kw)
    (out / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return out


@pytest.fixture(scope="module")
def tiny_models():
    from sd_scripts_lorax.families.model_configs import build_models

    return {f: build_models(f, "tiny", seed=3, with_vae=False) for f in ("sd1", "sd2", "sdxl")}


@pytest.mark.parametrize("family,cls", [("sd1", "StableDiffusionPipeline"), ("sd2", "StableDiffusionPipeline"),
                                        ("sdxl", "StableDiffusionXLPipeline")])
def test_diffusers_folder(tmp_path, tiny_models, family, cls):
    models = tiny_models[family]
    path = _save_diffusers(models, tmp_path / "model", cls)
    with Checkpoint.open(path) as ck:
        assert (ck.family, ck.layout, ck.name) == (family, "diffusers", "model")
        sd = models.unet.state_dict()
        key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        assert torch.equal(ck.tensor("unet/" + key), sd[key])
        te_keys = [k for k in ck.keys() if k.startswith("text_encoder/")]
        assert te_keys and all(k[len("text_encoder/"):] in models.text_encoders[0].state_dict() for k in te_keys)
        unet_file = path / "unet" / "diffusion_pytorch_model.safetensors"
        assert ck.hashes().sha256 == hashlib.sha256(unet_file.read_bytes()).hexdigest()
        # every kohya-targetable module of the live model is found, by kohya's own targeting rule
        assert _live_count(models) == _groups(ck.modules())


def _live_count(models) -> dict[str, int]:
    """kohya's rule per group: Linear/Conv2d children of Transformer2DModel, CLIPAttention, CLIPMLP
    ("attn"), and of ResnetBlock2D, Downsample2D, Upsample2D ("conv")."""
    n = {"attn": 0, "conv": 0}
    roots = [(models.unet, "attn", {"Transformer2DModel"}),
             (models.unet, "conv", {"ResnetBlock2D", "Downsample2D", "Upsample2D"})]
    roots += [(te, "attn", {"CLIPAttention", "CLIPMLP"}) for te in models.text_encoders]
    for root, group, targets in roots:
        for _, mod in root.named_modules():
            if type(mod).__name__ in targets:
                n[group] += sum(type(c).__name__ in ("Linear", "Conv2d") for _, c in mod.named_modules())
    return n


def _groups(refs) -> dict[str, int]:
    return {g: sum(r.group == g for r in refs.values()) for g in ("attn", "conv")}


def _ldm_single_file(models, path: Path, ema: bool) -> Path:
    """An SD1 original-layout file from a live tiny model (UNet keys renamed by naming's block map)."""
    from sd_scripts_lorax.families.naming import UnetBlockMap

    block_map = UnetBlockMap.from_diffusers_config(models.unet.config)
    state = {}
    for k, v in models.unet.state_dict().items():
        state["model.diffusion_model." + block_map.to_ldm(k)] = v
    for k, v in models.text_encoders[0].state_dict().items():
        state["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    if ema:  # kohya/LDM EMA keys: the path with its dots removed, under model_ema.
        state |= {"model_ema." + k[len("model."):].replace(".", ""): v.clone()
                  for k, v in state.items() if k.startswith("model.diffusion_model.")}
    return write(path, {k: v.contiguous() for k, v in state.items()})


def test_single_file_modules_ignore_ema(tmp_path, tiny_models):
    models = tiny_models["sd1"]
    plain = _ldm_single_file(models, tmp_path / "plain.safetensors", ema=False)
    with_ema = _ldm_single_file(models, tmp_path / "ema.safetensors", ema=True)
    with Checkpoint.open(plain) as a, Checkpoint.open(with_ema) as b:
        assert a.family == b.family == "sd1"
        assert len(b.keys()) > len(a.keys())
        assert a.modules() == b.modules()
        assert _groups(a.modules()) == _live_count(models)
        ref = b.modules()["lora_unet_down_blocks_0_attentions_0_proj_in"]
        live = models.unet.down_blocks[0].attentions[0].proj_in.weight
        assert torch.equal(b.weight(ref), live.detach())


def test_diffusers_fp16_variant_and_shards(tmp_path, tiny_models):
    models = tiny_models["sd1"]
    unet16 = copy.deepcopy(models.unet).half()
    out = tmp_path / "v"
    out.mkdir()
    unet16.save_pretrained(out / "unet", variant="fp16")
    models.text_encoders[0].save_pretrained(out / "text_encoder", max_shard_size="20KB")
    assert list((out / "text_encoder").glob("*.index.json"))
    with Checkpoint.open(out) as ck:
        assert ck.family == "sd1"
        key = "unet/down_blocks.0.attentions.0.proj_in.weight"
        assert ck.dtype(key) == torch.float16
        te_sd = models.text_encoders[0].state_dict()
        te_keys = [k for k in ck.keys() if k.startswith("text_encoder/")]
        assert {k[len("text_encoder/"):] for k in te_keys} == set(te_sd)
        for k in te_keys[:5]:
            assert torch.equal(ck.tensor(k), te_sd[k[len("text_encoder/"):]])


def test_diffusers_without_safetensors_unet(tmp_path):
    (tmp_path / "m" / "unet").mkdir(parents=True)
    (tmp_path / "m" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(LoraxInputError, match=r"unet: no \.safetensors weights"):
        Checkpoint.open(tmp_path / "m")


def test_diffusers_unknown_architecture(tmp_path):
    out = tmp_path / "m"
    (out / "transformer").mkdir(parents=True)
    (out / "model_index.json").write_text(json.dumps({"_class_name": "SomethingElsePipeline"}))
    with pytest.raises(LoraxInputError, match="unknown architecture"):
        Checkpoint.open(out)


# ---------------------------------------------------------------- the shared fixture checkpoints


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_fixture_layouts_read_the_same_weights(request, family):
    """The same seeded model in both layouts: same kohya modules, same weights (fused rows included)."""
    single = request.getfixturevalue(f"tiny_{family}_single")
    folder = request.getfixturevalue(f"tiny_{family}_diffusers")
    with Checkpoint.open(single) as a, Checkpoint.open(folder) as b:
        assert (a.family, a.layout, b.family, b.layout) == (family, "single_file", family, "diffusers")
        ma, mb = a.modules(), b.modules()
        assert set(ma) == set(mb)
        assert any(r.rows for r in ma.values()) == (family == "sdxl")
        for name in ma:
            wa, wb = a.weight(ma[name]), b.weight(mb[name])
            assert torch.equal(wa, wb.reshape(wa.shape)), name


def test_fixture_bf16_with_ema(tmp_path, tiny_sd1_single):
    from sd_scripts_lorax.testing.fixtures import write_fixture

    path = write_fixture("sd1", "single_file", "tiny", 0, tmp_path / "ema.safetensors", dtype="bf16", ema=True)
    with Checkpoint.open(path) as ck, Checkpoint.open(tiny_sd1_single) as plain:
        assert any(k.startswith("model_ema.") for k in ck.keys())
        assert set(ck.dtypes()) == {torch.bfloat16}
        refs = ck.modules()
        assert set(refs) == set(plain.modules())
        assert not any(r.key.startswith("model_ema.") for r in refs.values())
        ref = next(iter(refs.values()))
        assert ck.weight(ref).dtype == torch.bfloat16


# ---------------------------------------------------------------- full-size layouts (sparse files, no memory)


def _sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "F16", itemsize: int = 2):
    """A valid safetensors file of real size whose data is a hole: only the header is written."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = itemsize
        for d in shape:
            n *= d
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)
    return path


@pytest.mark.parametrize("family,counts", [
    ("sd1", {"unet": 192, "te": 72}), ("sd2", {"unet": 192, "te": 138}),
    ("sdxl", {"unet": 722, "te1": 72, "te2": 192})])
def test_full_size_single_file_layouts(tmp_path, family, counts):
    """The published architectures' original-layout keys: family detection and kohya's module counts."""
    from sd_scripts_lorax.testing.fixtures import fixture_shapes

    shapes = fixture_shapes(family, "single_file", "full")
    path = _sparse_safetensors(tmp_path / f"{family}.safetensors", shapes)
    with Checkpoint.open(path) as ck:
        assert ck.family == family and ck.dtypes() == {torch.float16: len(shapes)}
        attn = Counter(r.part for r in ck.modules().values() if r.group == "attn")
        assert attn == counts


def test_hash_file_reads_each_byte_once(tmp_path, monkeypatch):
    import builtins

    from sd_scripts_lorax.formats import hashing

    path = write(tmp_path / "m.safetensors", {"a": torch.arange(300_000, dtype=torch.float32)})
    reads = []

    class Counting:
        def __init__(self, f):
            self.f = f

        def readinto(self, buf):
            n = self.f.readinto(buf)
            reads.append(n)
            return n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(hashing, "open", lambda *a, **k: Counting(builtins.open(*a, **k)), raising=False)
    h = hashing.hash_file(path, chunk_size=65536)
    assert sum(reads) == path.stat().st_size  # one pass: every byte read exactly once
    assert h.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_hashes_without_addnet_skip_only_that_pass(tmp_path):
    from sd_scripts_lorax.formats.hashing import hash_files

    state = {**make_state(SD1_KEYS), "big": torch.arange(400_000, dtype=torch.float32)}
    path = write(tmp_path / "m.safetensors", state, {"ss_x": "1"})
    sha, legacy, addnet = _expected(path.read_bytes())
    h = hash_files([path], chunk_size=4096, addnet=False)
    assert (h.sha256, h.legacy, h.addnet) == (sha, legacy, None)
    with Checkpoint.open(path) as ck:
        assert ck.reads == 0
        ck.tensor("model.diffusion_model.input_blocks.1.1.proj_in.weight", rows=(0, 4))
        assert ck.reads == 1
        assert ck.hashes(addnet=False).addnet is None
        assert ck.hashes().addnet == addnet  # asked for later: computed then
        assert ck.hashes(addnet=False).addnet == addnet  # cached full result serves both
