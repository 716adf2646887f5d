"""Trainer data: dataset TOML lookup order, captions, repeats, buckets, reg images, shuffle, flips, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_scripts_lorax.errors import LoraxInputError
from sd_scripts_lorax.train.buckets import BucketSpec, assign_bucket, bucket_resolutions
from sd_scripts_lorax.train.config import DEFAULTS
from sd_scripts_lorax.train.data_config import SubsetSpec, datasets_from_args, load_dataset_config
from sd_scripts_lorax.train.dataset import BucketedDataset, load_image, process_caption


def _img(path: Path, w: int, h: int, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = colour  # left half coloured: flips are visible
    Image.fromarray(arr).save(path)
    return path


def _cli(**kw):
    args = dict(DEFAULTS)
    args.update(kw)
    return args


def test_lookup_order_subset_dataset_general_cli(tmp_path):
    _img(tmp_path / "a" / "1.png", 64, 64)
    (tmp_path / "a" / "1.txt").write_text("red square, dark, glow")
    toml = tmp_path / "ds.toml"
    toml.write_text("""
[general]
caption_extension = ".txt"
keep_tokens = 2
flip_aug = true
[[datasets]]
resolution = 64
batch_size = 3
flip_aug = false
  [[datasets.subsets]]
  image_dir = "a"
  num_repeats = 4
  keep_tokens = 1
  [[datasets.subsets]]
  image_dir = "a"
""")
    (spec,) = load_dataset_config(toml, _cli(shuffle_caption=True, train_batch_size=9), 512)
    s1, s2 = spec.subsets
    assert spec.batch_size == 3 and spec.buckets.resolution == (64, 64)
    assert s1.image_dir == (tmp_path / "a").resolve()           # relative to the TOML's folder
    assert (s1.num_repeats, s1.keep_tokens, s1.flip_aug) == (4, 1, False)  # subset > dataset > general
    assert (s2.num_repeats, s2.keep_tokens, s2.flip_aug) == (1, 2, False)
    assert s1.shuffle_caption and s1.caption_extension == ".txt"  # CLI fallback, general


def test_dataset_config_errors_name_key_and_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[datasets]]\nbatch_size = \"two\"\n  [[datasets.subsets]]\n  image_dir = \"x\"\n")
    with pytest.raises(LoraxInputError, match=r"bad\.toml.*batch_size"):
        load_dataset_config(bad, _cli(), 512)
    nodir = tmp_path / "nodir.toml"
    nodir.write_text("[[datasets]]\n  [[datasets.subsets]]\n  num_repeats = 2\n")
    with pytest.raises(LoraxInputError, match=r"nodir\.toml.*image_dir"):
        load_dataset_config(nodir, _cli(), 512)
    step = tmp_path / "step.toml"
    step.write_text("[[datasets]]\nresolution = 100\n  [[datasets.subsets]]\n  image_dir = \"x\"\n")
    with pytest.raises(LoraxInputError, match=r"step\.toml.*not divisible by bucket_reso_steps 64"):
        load_dataset_config(step, _cli(), 512)


def test_kohya_folders_captions_repeats_and_reg(tmp_path):
    for i in range(3):
        _img(tmp_path / "train" / "5_sks dog" / f"{i}.png", 64, 64)
    (tmp_path / "train" / "5_sks dog" / "0.caption").write_text("sks dog, on grass\n")
    _img(tmp_path / "reg" / "1_dog" / "r.png", 64, 64)
    specs = datasets_from_args(_cli(train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"),
                                    resolution="64", train_batch_size=2), 512)
    data = BucketedDataset(specs, seed=1, prior_loss_weight=0.5)
    caps = sorted(it.caption for it in data.items)
    assert caps == ["dog", "sks dog", "sks dog", "sks dog, on grass"]  # caption file, else class tokens
    assert data.num_train_images == 15 and data.num_reg_images == 1
    # reg samples are repeated to as many as train samples per epoch; each batch 2 (one bucket)
    batches = data.batches(1)
    flat = [i for b in batches for i in b]
    reg_idx = next(i for i, it in enumerate(data.items) if it.subset.is_reg)
    assert len(flat) == 30 and flat.count(reg_idx) == 15
    assert batches == data.batches(1) and batches != data.batches(2)  # fixed by (seed, epoch)
    b = data.make_batch(1, 0, batches[0])
    assert b.images.shape == (len(batches[0]), 3, 64, 64)
    expected = [0.5 if data.items[i].subset.is_reg else 1.0 for i in batches[0]]
    assert b.loss_weights.tolist() == expected


def test_errors_missing_dir_bad_image_empty_folder(tmp_path):
    with pytest.raises(LoraxInputError, match="train_data_dir not found"):
        datasets_from_args(_cli(train_data_dir=str(tmp_path / "nope")), 512)
    (tmp_path / "t" / "2_x").mkdir(parents=True)
    specs = datasets_from_args(_cli(train_data_dir=str(tmp_path / "t"), resolution="64"), 512)
    with pytest.raises(LoraxInputError, match=r"2_x: no images"):
        BucketedDataset(specs, 0)
    (tmp_path / "t" / "2_x" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(LoraxInputError, match=r"broken\.png: image does not decode"):
        BucketedDataset(specs, 0)
    (tmp_path / "t" / "2_x" / "broken.png").unlink()
    _img(tmp_path / "t" / "2_x" / "ok.png", 64, 64)
    specs = datasets_from_args(_cli(train_data_dir=str(tmp_path / "t"), resolution="64",
                                    caption_extension=".txt"), 512)
    (tmp_path / "t" / "3_").mkdir()
    _img(tmp_path / "t" / "3_" / "nocap.png", 64, 64)
    specs = datasets_from_args(_cli(train_data_dir=str(tmp_path / "t"), resolution="64"), 512)
    with pytest.raises(LoraxInputError, match=r"nocap\.png: no caption"):
        BucketedDataset(specs, 0)
    with pytest.raises(LoraxInputError, match="not divisible"):
        datasets_from_args(_cli(train_data_dir=str(tmp_path / "t"), resolution="96"), 512)


def test_buckets_and_no_upscale():
    resos = bucket_resolutions((512, 512), 256, 1024, 64)
    assert (512, 512) in resos and (256, 1024) in resos and (1024, 256) in resos
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in resos)
    spec = BucketSpec((512, 512), enable=True, min_reso=256, max_reso=1024, step=64)
    assert assign_bucket((1000, 500), spec) in {(704, 320), (768, 320), (704, 384)}
    w, h = assign_bucket((1000, 500), spec)
    assert abs(w / h - 2.0) < 0.25
    assert assign_bucket((300, 300), spec) == (512, 512)            # upscaled into the square bucket
    nu = BucketSpec((512, 512), enable=True, step=64, no_upscale=True)
    assert assign_bucket((300, 200), nu) == (256, 192)              # own size, rounded down: no upscale
    w, h = assign_bucket((2000, 1000), nu)                          # shrunk to the pixel budget
    assert w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 and w > h
    assert assign_bucket((300, 200), BucketSpec((64, 64))) == (64, 64)  # buckets off: fixed resolution


def test_bucketed_batches_group_sizes(tmp_path):
    for i in range(3):
        _img(tmp_path / "1_x" / f"w{i}.png", 256, 128)
        _img(tmp_path / "1_x" / f"t{i}.png", 128, 256)
    specs = datasets_from_args(_cli(train_data_dir=str(tmp_path), resolution="128", enable_bucket=True,
                                    min_bucket_reso=64, max_bucket_reso=256, train_batch_size=2), 512)
    data = BucketedDataset(specs, 0)
    for b in data.batches(1):
        assert len({data.items[i].bucket for i in b}) == 1           # one bucket per batch
    buckets = {it.bucket for it in data.items}
    assert len(buckets) == 2 and all(w * h <= 128 * 128 for w, h in buckets)
    batch = data.make_batch(1, 0, data.batches(1)[0])
    w, h = data.items[data.batches(1)[0][0]].bucket
    assert batch.images.shape[-2:] == (h, w) and batch.target_size == (h, w)


def test_keep_tokens_shuffle_dropout_and_flip(tmp_path):
    import random
    sub = SubsetSpec(tmp_path, shuffle_caption=True, keep_tokens=1)
    cap = "sks, a, b, c, d, e, f"
    outs = {process_caption(cap, sub, random.Random(i)) for i in range(20)}
    assert len(outs) > 1 and all(o.startswith("sks, ") for o in outs)
    assert all(sorted(o.split(", ")) == sorted(cap.split(", ")) for o in outs)
    drop = SubsetSpec(tmp_path, caption_dropout_rate=1.0)
    assert process_caption(cap, drop, random.Random(0)) == ""
    p = _img(tmp_path / "1_x" / "f.png", 64, 64)
    from sd_scripts_lorax.train.dataset import ImageItem
    item = ImageItem(p, "x", SubsetSpec(tmp_path, flip_aug=True), (64, 64), (64, 64))
    a, _ = load_image(item, False)
    b, _ = load_image(item, True)
    assert torch.equal(torch.flip(a, dims=[2]), b) and not torch.equal(a, b)
    assert a[0, 0, 0] > 0 and a[0, 0, -1] < 0                    # left half red, in [-1, 1]
