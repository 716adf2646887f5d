"""The "blue fire" style dataset for LoRA training, its held-out images and evaluation prompts.

Generated at run time (deterministic, well under a second), never committed. The layout is
kohya's DreamBooth folder layout: `<folder>/<repeats>_<class>/<name>.png` with a `<name>.txt`
caption beside each image, so `--train_data_dir <folder>` works without a dataset config.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .concepts import BACKGROUNDS, COLOURS, STYLE_SEEN, STYLE_TRIGGER, STYLE_UNSEEN, sample_scene
from .render import render_scene

STYLE_CLASS = "bluefire"
TRAIN_REPEATS = 10
SPLITS = ("train", "eval")


def style_subfolder(split: str = "train") -> str:
    """The kohya subfolder name, `<repeats>_bluefire` (10 repeats for training, 1 for evaluation)."""
    return f"{TRAIN_REPEATS if split == 'train' else 1}_{STYLE_CLASS}"


def write_style_dataset(folder: str | Path, seed: int = 0, split: str = "train",
                        per_concept: int | None = None) -> Path:
    """Write the style images and captions under `folder`; returns `folder` (kohya's train_data_dir).

    split="train": the SEEN concepts (`concepts.STYLE_SEEN`, 6), 8 images each, in `10_bluefire/`.
    split="eval":  held-out images of SEEN and UNSEEN concepts (12), 4 each, in `1_bluefire/`,
                   drawn from a random stream disjoint from the training one.
    Captions read "bluefire style, a red circle on a sky background". Same seed, same bytes.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    concepts = STYLE_SEEN if split == "train" else STYLE_SEEN + STYLE_UNSEEN
    n = per_concept or (8 if split == "train" else 4)
    rng = np.random.default_rng([seed, SPLITS.index(split), 0xB1F])
    out = Path(folder) / style_subfolder(split)
    out.mkdir(parents=True, exist_ok=True)
    for concept in concepts:
        for i in range(n):
            scene = sample_scene(rng, "bluefire", concept=concept)
            name = f"{concept}_{i:02d}"
            render_scene(scene).save(out / f"{name}.png", optimize=False)
            (out / f"{name}.txt").write_text(scene.caption() + "\n", encoding="utf-8")
    return Path(folder)


def eval_prompts(n_seen: int = 9, n_unseen: int = 21, seed: int = 0) -> list[tuple[str, bool]]:
    """Held-out prompts with the style trigger: (prompt, seen) where seen = concept in the training set.

    The default 9 seen + 21 unseen mirrors the paper's BlueFire validation set. Colours and
    backgrounds are drawn at random (deterministic), so seen prompts are new combinations too.
    """
    rng = np.random.default_rng([seed, 0xE7A1])
    out: list[tuple[str, bool]] = []
    for concepts, count, seen in ((STYLE_SEEN, n_seen, True), (STYLE_UNSEEN, n_unseen, False)):
        for i in range(count):
            concept = concepts[i % len(concepts)]
            colour = str(rng.choice(list(COLOURS)))
            bg = str(rng.choice(BACKGROUNDS))
            out.append((f"{STYLE_TRIGGER}, a {colour} {concept} on a {bg} background", seen))
    return out
