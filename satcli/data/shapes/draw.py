"""Drawing a ``shapes`` picture: a muted textured background, then each object in its colour and appearance."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from satcli.data.shapes.scene import COLOURS, HELDOUT_SHADES, TRAIN_APPEARANCE, ShapeObject

_SUPERSAMPLE = 2  # draw at 2× and downsample: anti-aliased edges for free
_COLOUR_JITTER = 8
_SHADE_MIX = 0.25  # how far a held-out shade moves the colour toward white or black


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return ys, xs


def _muted(rng: np.random.Generator, value: tuple[float, float] = (0.35, 0.8)) -> np.ndarray:
    """A greyish colour: random hue at low saturation."""
    grey = rng.uniform(*value) * 255
    tint = rng.uniform(-1, 1, 3)
    return grey + 22 * tint / max(1e-6, float(np.abs(tint).max()))


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A ``size``×``size``×3 float32 image of a muted texture."""
    ys, xs = _grid(size)
    first = _muted(rng).astype(np.float32)
    second = (_muted(rng, (0.25, 0.5)) if first.mean() > 150 else _muted(rng, (0.6, 0.85))).astype(np.float32)
    angle = rng.uniform(0, np.pi)
    along = (xs * np.float32(np.cos(angle)) + ys * np.float32(np.sin(angle)))[..., None]
    if kind == "noise":
        image = first + rng.standard_normal((size, size, 1), dtype=np.float32) * 16
    elif kind == "stripes":
        period = np.float32(rng.uniform(0.08, 0.2) * size)
        image = np.where((along / period) % 1.0 < 0.5, first, second)
    elif kind == "gradient":
        t = (along - along.min()) / max(1e-6, float(along.max() - along.min()))
        image = first * (1 - t) + second * t
    elif kind == "checks":
        cell = np.float32(rng.uniform(0.08, 0.16) * size)
        image = np.where((((xs // cell) + (ys // cell)) % 2 == 0)[..., None], first, second)
    else:
        raise ValueError(f"unknown background {kind!r}")
    return image + rng.standard_normal((size, size, 3), dtype=np.float32) * 4


def draw_picture(rng: np.random.Generator, objects: list[ShapeObject], outlines: list[list[tuple[float, float]]],
          background: str, size: int) -> Image.Image:
    """Background plus objects (outlines in pixels). Objects are drawn at 2× and downsampled (anti-aliased);
    the background is made at 1×, which is all a texture needs."""
    pixels = np.clip(_background(rng, background, size), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(pixels, "RGB").resize((size * _SUPERSAMPLE,) * 2, Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj, outline in zip(objects, outlines, strict=True):
        jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3)
        fill = tuple(int(c) for c in np.clip(np.array(COLOURS[obj.colour]) + jitter, 0, 255))
        scaled = [(x * _SUPERSAMPLE, y * _SUPERSAMPLE) for x, y in outline]
        if obj.appearance != TRAIN_APPEARANCE:
            _paint_heldout(canvas, obj, scaled, fill)
        elif obj.shape == "circle":
            draw.ellipse(scaled, fill=fill)
        else:
            draw.polygon(scaled, fill=fill)
    return canvas.resize((size, size), Image.Resampling.BOX)


def _paint_heldout(canvas: Image.Image, obj: ShapeObject, outline: list[tuple[float, float]],
                   colour: tuple[int, ...]) -> None:
    """An object in its held-out appearance: outlined or hatched, in a lighter or darker shade."""
    target = HELDOUT_SHADES[obj.appearance.shade]
    shaded = tuple(int(round((1 - _SHADE_MIX) * c + _SHADE_MIX * target)) for c in colour)
    xs, ys = [x for x, _ in outline], [y for _, y in outline]
    stroke = max(2 * _SUPERSAMPLE, round(0.14 * max(max(xs) - min(xs), max(ys) - min(ys))))
    mask = Image.new("L", canvas.size, 0)
    draw = ImageDraw.Draw(mask)

    def shape(fill: int | None, width: int) -> None:
        if obj.shape == "circle":
            draw.ellipse(outline, fill=fill, outline=255, width=width)
        else:
            draw.polygon(outline, fill=fill, outline=255, width=width)

    if obj.appearance.fill == "outline":
        shape(None, stroke)
    else:  # hatched: diagonal stripes inside a thin outline
        shape(255, 1)
        ys_, xs_ = _grid(canvas.size[0])
        period = 4 * _SUPERSAMPLE
        stripes = (((xs_ + ys_) // period) % 2 == 0).astype(np.uint8) * 255
        mask = Image.fromarray(np.minimum(np.asarray(mask), stripes), "L")
        draw = ImageDraw.Draw(mask)
        shape(None, max(_SUPERSAMPLE, stroke // 2))
    canvas.paste(Image.new("RGB", canvas.size, shaded), mask=mask)

