"""Draw a `Scene` as a 64x64 RGB image (numpy + PIL only; deterministic for a given scene).

Shapes are drawn at 4x and downsampled (anti-aliasing); backgrounds and the style effects
("painting" for the shifted distribution, blue flames for the style dataset) are computed on the
64x64 grid with numpy.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .concepts import COLOURS, Scene

SIZE = 64
_SS = 4  # supersampling factor for the shape layer


def render_scene(scene: Scene, size: int = SIZE) -> Image.Image:
    """The scene as an RGB PIL image of `size` x `size` pixels."""
    rng = np.random.default_rng(scene.texture_seed)
    img = _background(scene.background, size, rng)
    outline = 8 if scene.style == "shifted" else 0
    layer = _shape_layer(scene, size, outline)
    rgb = np.asarray(layer.convert("RGB"), dtype=np.float32)
    alpha = np.asarray(layer.getchannel("A"), dtype=np.float32)[..., None] / 255.0
    if scene.style == "bluefire":
        img = _bluefire(img * 0.3 + np.array([0, 0, 18], np.float32), rgb * 0.35, alpha[..., 0], rng)
    else:
        img = img * (1 - alpha) + rgb * alpha
        if scene.style == "shifted":
            img = _painting(img, rng)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------- noise and backgrounds

def _smooth_noise(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    """Value noise in [-1, 1]: a coarse random grid upsampled bicubically (rows x cols cells)."""
    grid = rng.uniform(0, 255, size=cells).astype(np.uint8)
    up = Image.fromarray(grid, "L").resize((size, size), Image.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 127.5 - 1.0


def _gradient(size: int, top, bottom) -> np.ndarray:
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    return np.broadcast_to((1 - t) * np.array(top, np.float32) + t * np.array(bottom, np.float32),
                           (size, size, 3)).copy()


def _background(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    y = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
    if name == "sky":
        img = _gradient(size, (70, 130, 220), (170, 210, 245))
        clouds = np.clip(_smooth_noise(rng, size, (4, 6)) * 1.6 - 0.5, 0, 1)[..., None]
        return img * (1 - clouds) + 245 * clouds
    if name == "grass":
        img = _gradient(size, (70, 170, 60), (30, 110, 30))
        blades = _smooth_noise(rng, size, (6, 40))[..., None]  # tall thin cells: vertical blades
        return img + 25 * blades
    if name == "sea":
        img = _gradient(size, (30, 110, 180), (15, 60, 130))
        phase = 3 * _smooth_noise(rng, size, (4, 4))
        waves = np.sin(y * 40 + phase)[..., None]
        return img + 18 * np.clip(waves, 0, 1)
    if name == "sand":
        img = _gradient(size, (225, 200, 145), (200, 170, 115))
        dunes = np.sin(y * 12 + 2 * _smooth_noise(rng, size, (3, 3)))[..., None]
        return img + 12 * dunes + rng.normal(0, 6, size=(size, size, 1)).astype(np.float32)
    if name == "night":
        img = _gradient(size, (8, 12, 40), (25, 30, 70))
        stars = (rng.random((size, size)) > 0.985)[..., None]
        return np.where(stars, np.float32(230), img)
    if name == "sunset":
        img = _gradient(size, (250, 130, 60), (110, 45, 120))
        return img + 10 * _smooth_noise(rng, size, (3, 3))[..., None]
    raise ValueError(f"unknown background {name!r}")


# ---------------------------------------------------------------- shapes

def _rot(points, cx: float, cy: float, angle: float):
    a = math.radians(angle)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in points]


def _star(r: float, n: int = 5, inner: float = 0.45):
    return [((r if i % 2 == 0 else r * inner) * math.sin(math.pi * i / n),
             -(r if i % 2 == 0 else r * inner) * math.cos(math.pi * i / n)) for i in range(2 * n)]


def _heart(r: float, n: int = 40):
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x * r / 17, -y * r / 17))
    return pts


def _shape_layer(scene: Scene, size: int, outline: int) -> Image.Image:
    """An RGBA layer holding the shape (alpha = coverage), downsampled from 4x."""
    big = size * _SS
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    cx, cy, r, ang = scene.cx * big, scene.cy * big, scene.scale * big, scene.angle
    col = COLOURS[scene.colour] + (255,)
    line = (25, 20, 15, 255) if outline else None
    kw = dict(outline=line, width=outline) if outline else {}

    def poly(points, fill=col):
        d.polygon(_rot(points, cx, cy, ang), fill=fill, **kw)

    c = scene.concept
    if c == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col, **kw)
    elif c == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=line or col)
        w = r * 0.3 if outline else 0
        d.ellipse([cx - r + w, cy - r + w, cx + r - w, cy + r - w], fill=col)
        hole = r * 0.55
        d.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=(0, 0, 0, 0), **kw)
    elif c == "square":
        s = r * 0.85
        poly([(-s, -s), (s, -s), (s, s), (-s, s)])
    elif c == "triangle":
        poly([(0, -r), (r * 0.87, r * 0.5), (-r * 0.87, r * 0.5)])
    elif c == "star":
        poly(_star(r))
    elif c == "cross":
        a, b = r, r * 0.33
        poly([(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
              (-a, -b), (-b, -b)])
    elif c == "diamond":
        poly([(0, -r), (r * 0.6, 0), (0, r), (-r * 0.6, 0)])
    elif c == "heart":
        poly(_heart(r))
    elif c == "house":
        poly([(-r * 0.7, -r * 0.1), (r * 0.7, -r * 0.1), (r * 0.7, r), (-r * 0.7, r)])
        poly([(0, -r), (r * 0.9, -r * 0.1), (-r * 0.9, -r * 0.1)], fill=(150, 40, 30, 255))
        poly([(-r * 0.15, r * 0.4), (r * 0.15, r * 0.4), (r * 0.15, r), (-r * 0.15, r)], fill=(70, 45, 25, 255))
    elif c == "tree":
        poly([(-r * 0.15, 0), (r * 0.15, 0), (r * 0.15, r), (-r * 0.15, r)], fill=(100, 65, 30, 255))
        k = r * 0.65
        d.ellipse([cx - k, cy - r, cx + k, cy - r + 2 * k], fill=col, **kw)
    elif c == "flower":
        p = r * 0.42
        for i in range(5):
            a = 2 * math.pi * i / 5 + math.radians(ang)
            px, py = cx + math.cos(a) * r * 0.55, cy + math.sin(a) * r * 0.55
            d.ellipse([px - p, py - p, px + p, py + p], fill=col, **kw)
        q = r * 0.3
        d.ellipse([cx - q, cy - q, cx + q, cy + q], fill=(250, 210, 40, 255), **kw)
    elif c == "fish":
        poly([(r * 0.35, 0), (r, -r * 0.5), (r, r * 0.5)])
        d.ellipse([cx - r, cy - r * 0.45, cx + r * 0.5, cy + r * 0.45], fill=col, **kw)
        e = r * 0.09
        ex, ey = cx - r * 0.55, cy - r * 0.1
        d.ellipse([ex - e, ey - e, ex + e, ey + e], fill=(10, 10, 10, 255))
    else:
        raise ValueError(f"unknown concept {c!r}")
    return layer.resize((size, size), Image.LANCZOS)


# ---------------------------------------------------------------- style effects

def _painting(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The shifted rendering: warmer, more saturated palette, diagonal brush texture, posterised."""
    grey = img.mean(axis=2, keepdims=True)
    img = grey + 1.35 * (img - grey)                       # saturation
    img = img * np.array([1.08, 1.0, 0.85], np.float32)    # warm tint
    noise = rng.normal(0, 1, size=img.shape[:2]).astype(np.float32)
    strokes = sum(np.roll(np.roll(noise, k, axis=0), k, axis=1) for k in range(-3, 4)) / math.sqrt(7)
    img = img + 14 * strokes[..., None]
    step = 255 / 7
    return np.round(np.clip(img, 0, 255) / step) * step    # posterise: flat paint patches


def _bluefire(dark_bg: np.ndarray, dark_shape: np.ndarray, mask: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
    """The style: a darkened scene whose shape edges burn with rising blue flames."""
    size = mask.shape[0]
    img = dark_bg * (1 - mask[..., None]) + dark_shape * mask[..., None]
    m = Image.fromarray((mask * 255).astype(np.uint8), "L")
    band = (np.asarray(m.filter(ImageFilter.MaxFilter(3)), np.float32)
            - np.asarray(m.filter(ImageFilter.MinFilter(3)), np.float32)) / 255.0
    flicker = np.clip(0.6 + 0.8 * _smooth_noise(rng, size, (5, 12)), 0, 1.4)  # narrow tongues
    flame = np.zeros_like(band)
    for j in range(12):  # the edge band shifted upwards, fading: flames rise
        shifted = np.zeros_like(band)
        shifted[: size - j] = band[j:]
        flame = np.maximum(flame, shifted * (0.84 ** j) * (flicker if j else 1.0))
    flame = np.asarray(Image.fromarray(np.clip(flame * 255, 0, 255).astype(np.uint8), "L")
                       .filter(ImageFilter.GaussianBlur(0.8)), np.float32) / 255.0
    t = np.clip(flame * 1.6, 0, 1.6)[..., None]
    colour = (np.array([20, 50, 230], np.float32) * np.clip(t, 0, 1)
              + np.array([60, 170, 25], np.float32) * np.clip(t - 0.5, 0, 1)
              + np.array([150, 60, 0], np.float32) * np.clip(t - 1.0, 0, 0.6) / 0.6)
    return img + colour
