"""Images and captions -> pre-bucketed batches, in an order fixed by (seed, epoch).

Every random choice (batch order, caption shuffle and dropout, flips) is drawn from a generator
seeded by (seed, epoch, batch, sample), so that an interrupted run resumed at batch k sees exactly
the batches a straight run would: resume is bit for bit without replaying any RNG.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import LoraxInputError
from .buckets import assign_bucket, bucket_resolutions, resize_plan
from .data_config import DatasetSpec, SubsetSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str
    subset: SubsetSpec
    size: tuple[int, int]    # original (w, h)
    bucket: tuple[int, int]  # training (w, h)


@dataclass
class Batch:
    captions: list[str]
    images: torch.Tensor | None          # (B, 3, H, W) in [-1, 1], or None when latents are cached
    latents: torch.Tensor | None         # cached, already scaled
    loss_weights: torch.Tensor           # (B,)
    original_sizes: list[tuple[int, int]]  # (h, w) per sample (SDXL conditioning)
    crop_top_lefts: list[tuple[int, int]]  # (top, left)
    target_size: tuple[int, int]           # (h, w)


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            im.verify()  # catches many truncated files without decoding everything
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise LoraxInputError(f"{path}: image does not decode ({type(exc).__name__}: {exc})") from None


def read_caption(image: Path, subset: SubsetSpec) -> str:
    """The caption file next to the image, else the subset's class tokens."""
    cap = image.with_suffix(subset.caption_extension)
    if cap.is_file():
        text = cap.read_text(encoding="utf-8").strip().splitlines()
        if text and text[0].strip():
            return text[0].strip()
    if subset.class_tokens:
        return subset.class_tokens
    raise LoraxInputError(f"{image}: no caption ({cap.name} missing or empty) "
                          f"and no class_tokens for {subset.image_dir}")


def scan_subset(subset: SubsetSpec, bucket_fn: Callable[[tuple[int, int]], tuple[int, int]]) -> list[ImageItem]:
    if not subset.image_dir.is_dir():
        raise LoraxInputError(f"{subset.image_dir}: image_dir not found")
    files = sorted(p for p in subset.image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise LoraxInputError(f"{subset.image_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) in image_dir")
    items = []
    for f in files:
        size = _image_size(f)
        items.append(ImageItem(f, read_caption(f, subset), subset, size, bucket_fn(size)))
    return items


def process_caption(caption: str, subset: SubsetSpec, rng: random.Random) -> str:
    """Caption dropout, then tag shuffling with the first keep_tokens tags kept in place."""
    if subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate:
        return ""
    if subset.shuffle_caption:
        tags = [t.strip() for t in caption.split(",")]
        head, tail = tags[: subset.keep_tokens], tags[subset.keep_tokens:]
        rng.shuffle(tail)
        caption = ", ".join(head + tail)
    return caption


def load_image(item: ImageItem, flip: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, H, W) tensor in [-1, 1] at the item's bucket, and the crop's (top, left)."""
    try:
        with Image.open(item.path) as im:
            im = im.convert("RGB")
            (rw, rh), (left, top) = resize_plan(im.size, item.bucket)
            im = im.resize((rw, rh), Image.Resampling.LANCZOS)
            im = im.crop((left, top, left + item.bucket[0], top + item.bucket[1]))
    except (UnidentifiedImageError, OSError) as exc:
        raise LoraxInputError(f"{item.path}: image does not decode ({exc})") from None
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    t = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    if flip:
        t = torch.flip(t, dims=[2])
    return t, (top, left)


class BucketedDataset:
    """All datasets' items; `batches(epoch)` is the epoch's list of batches (item indices)."""

    def __init__(self, specs: list[DatasetSpec], seed: int, prior_loss_weight: float = 1.0):
        self.seed = seed
        self.prior_loss_weight = prior_loss_weight
        self.items: list[ImageItem] = []
        self.groups: list[tuple[int, list[int]]] = []  # (batch_size, item indices with repeats)
        self.num_train_images = 0
        self.num_reg_images = 0
        for spec in specs:
            predefined = (bucket_resolutions(spec.buckets.resolution, spec.buckets.min_reso, spec.buckets.max_reso,
                                             spec.buckets.step) if spec.buckets.enable else None)
            train, reg = [], []
            for subset in spec.subsets:
                first = len(self.items)
                self.items += scan_subset(subset, lambda s: assign_bucket(s, spec.buckets, predefined))
                idx = list(range(first, len(self.items))) * subset.num_repeats
                (reg if subset.is_reg else train).extend(idx)
            if not train:
                raise LoraxInputError(f"{spec.subsets[0].image_dir}: dataset has only regularisation images")
            self.num_train_images += len(train)
            self.num_reg_images += len(reg)
            if reg:  # kohya: as many reg samples per epoch as train samples
                reg = (reg * (len(train) // len(reg) + 1))[: len(train)]
            self.groups.append((spec.batch_size, train + reg))
        self.latent_cache: dict[tuple[int, bool], torch.Tensor] = {}
        self.epoch = 1

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"order-{self.seed}-{epoch}")
        out: list[list[int]] = []
        for batch_size, indices in self.groups:
            by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
            for i in indices:
                by_bucket[self.items[i].bucket].append(i)
            for bucket in sorted(by_bucket):
                idx = by_bucket[bucket]
                rng.shuffle(idx)
                out += [idx[k:k + batch_size] for k in range(0, len(idx), batch_size)]
        rng.shuffle(out)
        return out

    def __len__(self) -> int:
        return len(self.batches(1))

    def flips(self, epoch: int, batch_index: int, indices: list[int]) -> list[bool]:
        rng = random.Random(f"flip-{self.seed}-{epoch}-{batch_index}")
        return [self.items[i].subset.flip_aug and rng.random() < 0.5 for i in indices]

    def make_batch(self, epoch: int, batch_index: int, indices: list[int]) -> Batch:
        rng = random.Random(f"caption-{self.seed}-{epoch}-{batch_index}")
        flips = self.flips(epoch, batch_index, indices)
        captions = [process_caption(self.items[i].caption, self.items[i].subset, rng) for i in indices]
        weights = torch.tensor([self.prior_loss_weight if self.items[i].subset.is_reg else 1.0 for i in indices])
        first = self.items[indices[0]]
        sizes = [(self.items[i].size[1], self.items[i].size[0]) for i in indices]
        target = (first.bucket[1], first.bucket[0])
        crops = [resize_plan(self.items[i].size, self.items[i].bucket)[1][::-1] for i in indices]
        if all((i, f) in self.latent_cache for i, f in zip(indices, flips)):
            latents = torch.stack([self.latent_cache[(i, f)] for i, f in zip(indices, flips)])
            return Batch(captions, None, latents, weights, sizes, crops, target)
        images = torch.stack([load_image(self.items[i], f)[0] for i, f in zip(indices, flips)])
        return Batch(captions, images, None, weights, sizes, crops, target)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """{image_dir name: {tag: count}} for ss_tag_frequency."""
        out: dict[str, Counter] = defaultdict(Counter)
        for item in self.items:
            out[item.subset.image_dir.name].update(t.strip() for t in item.caption.split(",") if t.strip())
        return {k: dict(v) for k, v in out.items()}


class EpochView(torch.utils.data.Dataset):
    """One epoch's batches as a map-style dataset (DataLoader batch_size=None), for worker processes."""

    def __init__(self, data: BucketedDataset, epoch: int, batch_ids: list[int]):
        self.data, self.epoch = data, epoch
        self.all_batches = data.batches(epoch)
        self.batch_ids = batch_ids

    def __len__(self) -> int:
        return len(self.batch_ids)

    def __getitem__(self, k: int) -> Batch:
        b = self.batch_ids[k]
        return self.data.make_batch(self.epoch, b, self.all_batches[b])


def collate_identity(x):
    return x
