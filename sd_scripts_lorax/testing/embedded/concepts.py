"""What the embedded demo's images show: concepts, colours, backgrounds, and how scenes are sampled.

Every word used in a caption is in `tiny_tokenizer.DEFAULT_WORDS`, so each is one token for the
tiny text encoder. A scene is sampled from one of three distributions:

- "base":     what the SOURCE model is pretrained on (flat rendering, all concepts);
- "shifted":  what the TARGET model is fine-tuned on (the same captions, a "painting" rendering with
              outlines, brush texture and a warmer palette, and more of the object concepts);
- "bluefire": the style dataset for LoRA training (dark scene, blue flame edges).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "heart")
OBJECTS = ("house", "tree", "flower", "fish")
CONCEPTS = SHAPES + OBJECTS

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
    "orange": (245, 140, 30), "purple": (130, 50, 170), "pink": (245, 140, 180), "white": (245, 245, 245),
    "black": (20, 20, 20), "gray": (128, 128, 128), "brown": (120, 75, 35), "cyan": (40, 210, 220),
    "magenta": (220, 40, 200),
}

BACKGROUNDS = ("sky", "grass", "sea", "sand", "night", "sunset")
DISTRIBUTIONS = ("base", "shifted", "bluefire")

# The style dataset trains on SEEN concepts; UNSEEN ones only appear in evaluation prompts.
STYLE_SEEN = ("circle", "square", "triangle", "star", "heart", "house")
STYLE_UNSEEN = ("ring", "cross", "diamond", "tree", "flower", "fish")
STYLE_TRIGGER = "bluefire style"


@dataclass(frozen=True)
class Scene:
    """One image's content; `render.render_scene` draws it, `caption` describes it."""

    concept: str
    colour: str
    background: str
    cx: float          # centre, as a fraction of the image width/height
    cy: float
    scale: float       # half-size, as a fraction of the image width
    angle: float       # rotation in degrees
    style: str         # "base" | "shifted" | "bluefire" (how it is rendered)
    texture_seed: int  # seeds the background/brush/flame noise

    @property
    def size_word(self) -> str:
        return "small" if self.scale < 0.2 else "large" if self.scale > 0.33 else ""

    def caption(self) -> str:
        size = f"{self.size_word} " if self.size_word else ""
        text = f"a {size}{self.colour} {self.concept} on a {self.background} background"
        return f"{STYLE_TRIGGER}, {text}" if self.style == "bluefire" else text


def sample_scene(rng: np.random.Generator, distribution: str, concept: str | None = None,
                 colour: str | None = None, background: str | None = None) -> Scene:
    """Draw a random scene from `distribution`; any of concept/colour/background may be fixed."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    # the fine-tune sees objects twice as often as plain shapes ("more of some concepts")
    weights = np.array([1.0] * len(SHAPES) + [2.0 if distribution == "shifted" else 1.0] * len(OBJECTS))
    c = str(rng.choice(CONCEPTS, p=weights / weights.sum()))
    col = str(rng.choice(list(COLOURS)))
    bg = str(rng.choice(BACKGROUNDS))
    scale = float(rng.uniform(0.14, 0.4))
    margin = scale + 0.04
    return Scene(
        concept=concept or c, colour=colour or col, background=background or bg,
        cx=float(rng.uniform(margin, 1 - margin)) if margin < 0.5 else 0.5,
        cy=float(rng.uniform(margin, 1 - margin)) if margin < 0.5 else 0.5,
        scale=scale, angle=float(rng.uniform(-25, 25)), style=distribution,
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )
