"""Aspect-ratio buckets (kohya's behaviour, written from its description): pure arithmetic, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BucketSpec:
    resolution: tuple[int, int]  # (width, height); its area is the pixel budget
    enable: bool = False
    min_reso: int = 256
    max_reso: int = 1024
    step: int = 64
    no_upscale: bool = False


def bucket_resolutions(max_reso: tuple[int, int], min_size: int, max_size: int, step: int) -> list[tuple[int, int]]:
    """All (w, h) with sides multiples of `step` in [min_size, max_size] whose area fits the budget,
    one per width (the tallest that fits) in both orientations, plus the square one."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area)) // step * step
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, (max_area // width) // step * step)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += step
    return sorted(resos)


def assign_bucket(image_size: tuple[int, int], spec: BucketSpec,
                  predefined: list[tuple[int, int]] | None = None) -> tuple[int, int]:
    """The (w, h) bucket an image of `image_size` (w, h) trains at."""
    if not spec.enable:
        return spec.resolution
    w, h = image_size
    max_area = spec.resolution[0] * spec.resolution[1]
    if spec.no_upscale:
        # keep the image's own size (shrunk to the pixel budget), rounded down to the step
        if w * h > max_area:
            scale = math.sqrt(max_area / (w * h))
            w, h = w * scale, h * scale
        bw = max(spec.step, int(w) // spec.step * spec.step)
        bh = max(spec.step, int(h) // spec.step * spec.step)
        return bw, bh
    resos = predefined or bucket_resolutions(spec.resolution, spec.min_reso, spec.max_reso, spec.step)
    aspect = w / h
    return min(resos, key=lambda r: (abs(math.log(r[0] / r[1]) - math.log(aspect)), -r[0] * r[1]))


def resize_plan(image_size: tuple[int, int], bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Scale so the image covers the bucket, then a centred crop: returns (resized (w, h), crop (left, top))."""
    w, h = image_size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    return (rw, rh), ((rw - bw) // 2, (rh - bh) // 2)
