"""The built-in ``shapes`` dataset: synthetic pictures of coloured shapes with captions that must be earned.

Each image holds 1–3 objects (5 shapes × 6 colours × 2 sizes) laid out along a row or a column on a muted,
textured background. Its 5 reference captions come from varied templates and synonyms, and every caption names
every object by size, colour and shape, says how many there are when several are alike, and says where they
are relative to each other (``"a large red circle to the left of a small blue square"``,
``"two little green triangles in a column"``, ``"a big yellow star between two small purple crosses"``).
A model therefore has to get shape, colour, size, count and spatial relation right to score well.

Everything is drawn from ``numpy.random.default_rng([seed, index])``, so an image depends only on the seed
and its index: the same seed writes the same bytes, and images can be drawn in parallel.

The output is ordinary JPEG files plus a Karpathy-format ``dataset_shapes.json``, read by the same reader as
Flickr8k. Each image entry also has ``objects``: ``box`` (``[x0, y0, x1, y1]`` in pixels), ``shape``,
``colour``, ``size``, ``label`` and ``words`` — the caption words of this image that refer to the object
(its size, colour and shape words, synonyms and plurals as used), for scoring attention against the boxes.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from satcli.text import tokenize

log = logging.getLogger(__name__)

JSON_NAME = "dataset_shapes.json"
IMAGES_DIR = "images"
GENERATOR_VERSION = 1  # bump when the pictures or captions change, so stale generated sources are redrawn

# Saturated object colours, far from the muted backgrounds (whose chroma stays below ~60).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 85, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 205),
    "orange": (245, 130, 20),
}
SHAPES: dict[str, tuple[str, ...]] = {  # canonical name → the words captions may use for it
    "circle": ("circle", "disc"),
    "square": ("square", "block"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross",),
}
SIZES: dict[str, tuple[str, ...]] = {"large": ("large", "big"), "small": ("small", "little")}
BACKGROUNDS: dict[str, str] = {"noise": "speckled", "stripes": "striped", "gradient": "shaded", "checks": "checkered"}
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three"}

# Object extent as a fraction of the image side. Three large objects still fit in a row.
_LARGE_EXTENT = (0.28, 0.31)
_SMALL_EXTENT = (0.16, 0.185)
_MARGIN = 2.0  # pixels kept free at the image border and between objects
_SUPERSAMPLE = 2  # draw at 2× and downsample: anti-aliased edges for free
_COLOUR_JITTER = 8

# The held-out split: the same shapes, colours, sizes, layouts and caption words as the other splits, drawn in
# an appearance no training image has: every object outlined or hatched instead of solid, in a lighter or
# darker shade of its colour, and (all but circles) rotated. Drawn from its own random stream, so adding it
# leaves every train, val and test image as it was.
HELDOUT_SPLIT = "heldout"
HELDOUT_FILLS = ("outline", "hatched")
HELDOUT_SHADES = {"light": 255.0, "dark": 0.0}  # mixed into the colour by _SHADE_MIX
_SHADE_MIX = 0.25
_HELDOUT_ROTATION = (10, 35)  # degrees, either way
_HELDOUT_SHRINK = 0.85  # a rotated square or cross stays inside its layout slot


def plural(word: str) -> str:
    """``circle`` → ``circles``, ``cross`` → ``crosses``."""
    return word + "es" if word.endswith(("s", "x")) else word + "s"


@dataclass(frozen=True)
class ShapesOptions:
    """How many images to draw, from which seed, at what size."""

    n_train: int = 4000
    n_val: int = 300
    n_test: int = 300
    n_heldout: int = 0  # test images in a held-out appearance (split "heldout"); the CLI and the demo draw 300
    seed: int = 0
    image_size: int = 128
    jpeg_quality: int = 90

    @property
    def n_images(self) -> int:
        return self.n_train + self.n_val + self.n_test + self.n_heldout

    def split_of(self, index: int) -> str:
        if index < self.n_train:
            return "train"
        if index < self.n_train + self.n_val:
            return "val"
        return "test" if index < self.n_train + self.n_val + self.n_test else HELDOUT_SPLIT


@dataclass(frozen=True)
class Appearance:
    """How an object is drawn, beyond what the caption says: its fill, rotation (degrees) and shade."""

    fill: str = "solid"  # solid, or a held-out fill: outline, hatched
    rotation: int = 0
    shade: str = "base"  # base, or held out: light / dark (the colour mixed toward white / black)


TRAIN_APPEARANCE = Appearance()  # train, val and test: every object drawn like this


@dataclass
class ShapeObject:
    """One drawn object. ``box`` is the tight box of the drawn shape, in pixels."""

    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    words: list[str] = field(default_factory=list)
    appearance: Appearance = field(default_factory=lambda: TRAIN_APPEARANCE)

    @property
    def label(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"

    def same_kind(self, other: ShapeObject) -> bool:
        return (self.shape, self.colour, self.size) == (other.shape, other.colour, other.size)


@dataclass
class ShapesImage:
    """What one generated picture shows: objects in reading order along ``axis``, background, captions."""

    objects: list[ShapeObject]
    axis: str  # "row" (left → right) or "column" (top → bottom)
    background: str
    captions: list[str]


# ----------------------------------------------------------------------------------------------------------
# Layout: what objects, and where


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _choose_objects(rng: np.random.Generator) -> list[ShapeObject]:
    n_objects = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    objects: list[ShapeObject] = []
    for _ in range(n_objects):
        if objects and rng.random() < 0.3:  # a repeat, so "two green triangles" happens often enough
            twin = objects[int(rng.integers(len(objects)))]
            objects.append(ShapeObject(twin.shape, twin.colour, twin.size))
        else:
            objects.append(ShapeObject(_pick(rng, list(SHAPES)), _pick(rng, list(COLOURS)), _pick(rng, list(SIZES))))
    rng.shuffle(objects)  # type: ignore[arg-type]
    return objects


def _place(rng: np.random.Generator, extents: list[float], image_size: int) -> list[tuple[float, float]] | None:
    """Centres (along, across) for objects placed in order along one axis, or None if the draw was unclear.

    Objects never overlap, and neighbours are further apart along the axis than across it (by 1.5×), so
    "left of" / "above" is never a judgement call.
    """
    n = len(extents)
    free = image_size - 2 * _MARGIN - (n - 1) * _MARGIN - sum(extents)
    if free < 0:
        return None
    cuts = np.sort(rng.uniform(0, free, n))
    centres_along, start = [], _MARGIN
    for i, extent in enumerate(extents):
        offset = cuts[i] - (cuts[i - 1] if i else 0.0)
        start += offset
        centres_along.append(start + extent / 2)
        start += extent + _MARGIN
    biggest = max(extents)
    base = rng.uniform(_MARGIN + biggest / 2, image_size - _MARGIN - biggest / 2)
    spread = 0.12 * image_size if n > 1 else image_size
    centres_across = [
        float(np.clip(base + rng.uniform(-spread, spread), _MARGIN + e / 2, image_size - _MARGIN - e / 2))
        for e in extents
    ]
    for i in range(n - 1):
        along = centres_along[i + 1] - centres_along[i]
        across = abs(centres_across[i + 1] - centres_across[i])
        if along < 1.5 * across:
            return None
    return list(zip(centres_along, centres_across, strict=True))


def _heldout_appearance(rng: np.random.Generator, shape: str) -> Appearance:
    rotation = 0 if shape == "circle" else int(rng.integers(*_HELDOUT_ROTATION)) * (1 if rng.random() < 0.5 else -1)
    return Appearance(fill=_pick(rng, HELDOUT_FILLS), rotation=rotation, shade=_pick(rng, list(HELDOUT_SHADES)))


def _turn(outline: list[tuple[float, float]], cx: float, cy: float, degrees: int) -> list[tuple[float, float]]:
    """A polygon rotated about (cx, cy) and shrunk by _HELDOUT_SHRINK."""
    angle = np.deg2rad(degrees)
    cos, sin = np.cos(angle) * _HELDOUT_SHRINK, np.sin(angle) * _HELDOUT_SHRINK
    return [(cx + (x - cx) * cos - (y - cy) * sin, cy + (x - cx) * sin + (y - cy) * cos) for x, y in outline]


def _outline(shape: str, cx: float, cy: float, extent: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centred on (cx, cy) in an ``extent``-sized square (circle: 2 points)."""
    half = extent / 2
    if shape == "circle":
        return [(cx - half, cy - half), (cx + half, cy + half)]
    if shape == "square":
        side = 0.86 * half
        return [(cx - side, cy - side), (cx + side, cy - side), (cx + side, cy + side), (cx - side, cy + side)]
    if shape == "triangle":
        height = 0.87 * extent
        return [(cx, cy - height / 2), (cx + half, cy + height / 2), (cx - half, cy + height / 2)]
    if shape == "star":
        outer, inner = half, 0.45 * half
        shift = half * (1 - np.cos(np.pi / 5)) / 2  # centre the star's box, whose lower points are shorter
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, outer, inner)
        return [(cx + r * np.cos(a), cy + shift + r * np.sin(a)) for r, a in zip(radii, angles, strict=True)]
    if shape == "cross":
        arm = 0.17 * extent
        return [
            (cx - arm, cy - half), (cx + arm, cy - half), (cx + arm, cy - arm), (cx + half, cy - arm),
            (cx + half, cy + arm), (cx + arm, cy + arm), (cx + arm, cy + half), (cx - arm, cy + half),
            (cx - arm, cy + arm), (cx - half, cy + arm), (cx - half, cy - arm), (cx - arm, cy - arm),
        ]  # fmt: skip
    raise ValueError(f"unknown shape {shape!r}")


# ----------------------------------------------------------------------------------------------------------
# Drawing


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


def _draw(rng: np.random.Generator, objects: list[ShapeObject], outlines: list[list[tuple[float, float]]],
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


# ----------------------------------------------------------------------------------------------------------
# Captions


class _Phrases:
    """Noun phrases for objects, remembering which words named which object."""

    def __init__(self, rng: np.random.Generator, objects: list[ShapeObject]):
        self.rng = rng
        self.objects = objects

    def _words(self, obj: ShapeObject, count: int) -> tuple[str, str, str]:
        size = _pick(self.rng, SIZES[obj.size])
        shape = _pick(self.rng, SHAPES[obj.shape])
        return size, obj.colour, shape if count == 1 else plural(shape)

    def one(self, index: int) -> str:
        """``a large red circle``"""
        words = self._words(self.objects[index], 1)
        self._note([index], words)
        return "a " + " ".join(words)

    def group(self, indices: list[int]) -> str:
        """``two small green triangles`` for identical objects."""
        words = self._words(self.objects[indices[0]], len(indices))
        self._note(indices, words)
        return f"{COUNT_WORDS[len(indices)]} " + " ".join(words)

    def _note(self, indices: list[int], words: tuple[str, ...]) -> None:
        for i in indices:
            for word in words:
                if word not in self.objects[i].words:
                    self.objects[i].words.append(word)


_RELATIONS = {  # (forward, backward) along an axis: A comes before B
    "row": (("to the left of", "left of", "on the left of"), ("to the right of", "right of", "on the right of")),
    "column": (("above", "over"), ("below", "under", "beneath")),
}
_ORDER = {"row": "from left to right", "column": "from top to bottom"}
_LINE = {"row": "in a row", "column": "in a column"}


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _caption_templates(image: ShapesImage, p: _Phrases) -> list[Callable[[], str]]:
    """Caption makers for this picture; each call draws fresh synonyms."""
    objects, axis = image.objects, image.axis
    rng = p.rng
    n = len(objects)
    bg = BACKGROUNDS[image.background]

    def fwd() -> str:
        return _pick(rng, _RELATIONS[axis][0])

    def back() -> str:
        return _pick(rng, _RELATIONS[axis][1])

    if n == 1:
        return [
            lambda: p.one(0),
            lambda: f"there is {p.one(0)}",
            lambda: f"{p.one(0)} on a {bg} background",
            lambda: "a single " + p.one(0).removeprefix("a "),
            lambda: f"a picture of {p.one(0)}",
            lambda: f"there is a single {p.one(0).removeprefix('a ')} on a {bg} background",
        ]
    if all(objects[0].same_kind(o) for o in objects):
        everyone = list(range(n))
        return [
            lambda: p.group(everyone),
            lambda: f"{p.group(everyone)} {_LINE[axis]}",
            lambda: f"there are {p.group(everyone)}",
            lambda: f"there are {p.group(everyone)} {_LINE[axis]}",
            lambda: f"{p.group(everyone)} on a {bg} background",
        ]
    if n == 2:
        return [
            lambda: f"{p.one(0)} {fwd()} {p.one(1)}",
            lambda: f"{p.one(1)} {back()} {p.one(0)}",
            lambda: f"there is {p.one(0)} {fwd()} {p.one(1)}",
            lambda: f"{p.one(0)} is {fwd()} {p.one(1)}",
            lambda: f"{p.one(1)} is {back()} {p.one(0)}",
            lambda: f"{p.one(0)} {fwd()} {p.one(1)} on a {bg} background",
        ]
    # Three objects, at least two different.
    pair = next(([i, j] for i in range(3) for j in range(i + 1, 3) if objects[i].same_kind(objects[j])), None)
    if pair is None:
        return [
            lambda: f"{_ORDER[axis]}: {_join([p.one(0), p.one(1), p.one(2)])}",
            lambda: f"{_join([p.one(0), p.one(1), p.one(2)])} {_ORDER[axis]}",
            lambda: f"{p.one(1)} between {p.one(0)} and {p.one(2)}",
            lambda: f"{p.one(0)} {fwd()} {p.one(1)} and {p.one(2)}",
            lambda: f"{p.one(2)} {back()} {p.one(1)} and {p.one(0)}",
            lambda: f"three shapes {_LINE[axis]}: {_join([p.one(0), p.one(1), p.one(2)])}",
        ]
    (odd,) = {0, 1, 2} - set(pair)
    if odd == 1:  # the odd one sits between the twins
        return [
            lambda: f"{p.one(1)} between {p.group(pair)}",
            lambda: f"there is {p.one(1)} between {p.group(pair)}",
            lambda: f"{p.group(pair)} with {p.one(1)} between them",
            lambda: f"{p.group(pair)} on either side of {p.one(1)}",
            lambda: f"{p.one(1)} in the middle of {p.group(pair)}",
        ]
    before, after = (fwd, back) if odd == 0 else (back, fwd)
    return [
        lambda: f"{p.one(odd)} {before()} {p.group(pair)}",
        lambda: f"{p.group(pair)} {after()} {p.one(odd)}",
        lambda: f"there is {p.one(odd)} {before()} {p.group(pair)}",
        lambda: f"three shapes: {p.group(pair)} {after()} {p.one(odd)}",
        lambda: f"{p.group(pair)} and {p.one(odd)} {_LINE[axis]}",
    ]


def _captions(rng: np.random.Generator, image: ShapesImage, n_captions: int = 5) -> list[str]:
    phrases = _Phrases(rng, image.objects)
    templates = _caption_templates(image, phrases)
    captions: list[str] = []
    for attempt in range(100):
        make = templates[attempt % len(templates)] if attempt < len(templates) else _pick(rng, templates)
        caption = make()
        if caption not in captions:
            captions.append(caption)
        if len(captions) == n_captions:
            break
    rng.shuffle(captions)  # type: ignore[arg-type]
    return captions


# ----------------------------------------------------------------------------------------------------------
# One image, and the whole dataset


def render(index: int, options: ShapesOptions) -> tuple[bytes, ShapesImage]:
    """Image ``index`` of the dataset for ``options.seed``: its JPEG bytes and what it shows."""
    rng = np.random.default_rng([options.seed, index])
    size = options.image_size
    while True:
        objects = _choose_objects(rng)
        extents = [rng.uniform(*(_LARGE_EXTENT if o.size == "large" else _SMALL_EXTENT)) * size for o in objects]
        centres = _place(rng, extents, size)
        if centres is not None:
            break
    axis = "row" if rng.random() < 0.5 else "column"
    look = np.random.default_rng([options.seed, index, 1]) if options.split_of(index) == HELDOUT_SPLIT else None
    outlines = []
    for obj, extent, (along, across) in zip(objects, extents, centres, strict=True):
        cx, cy = (along, across) if axis == "row" else (across, along)
        outline = _outline(obj.shape, cx, cy, extent)
        if look is not None:
            obj.appearance = _heldout_appearance(look, obj.shape)
            if obj.shape == "circle":
                half = extent * _HELDOUT_SHRINK / 2
                outline = [(cx - half, cy - half), (cx + half, cy + half)]
            else:
                outline = _turn(outline, cx, cy, obj.appearance.rotation)
        xs, ys = [x for x, _ in outline], [y for _, y in outline]
        obj.box = tuple(round(float(v), 1) for v in (min(xs), min(ys), max(xs), max(ys)))  # type: ignore[assignment]
        outlines.append(outline)
    background = _pick(rng, list(BACKGROUNDS))
    picture = _draw(rng, objects, outlines, background, size)
    image = ShapesImage(objects=objects, axis=axis, background=background, captions=[])
    image.captions = _captions(rng, image)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=options.jpeg_quality)
    return buffer.getvalue(), image


def _entry(index: int, options: ShapesOptions, image: ShapesImage) -> dict:
    """The Karpathy-format JSON entry of one image, with the extra ``objects`` field."""
    return {
        "imgid": index,
        "split": options.split_of(index),
        "filepath": IMAGES_DIR,
        "filename": f"{index:06d}.jpg",
        "sentids": [5 * index + k for k in range(len(image.captions))],
        "sentences": [
            {"raw": raw, "tokens": tokenize(raw), "imgid": index, "sentid": 5 * index + k}
            for k, raw in enumerate(image.captions)
        ],
        "objects": [
            {"box": list(o.box), "shape": o.shape, "colour": o.colour, "size": o.size, "label": o.label,
             "words": o.words, "appearance": asdict(o.appearance)}
            for o in image.objects
        ],
        "background": BACKGROUNDS[image.background],
    }


def _info(options: ShapesOptions) -> dict:
    return {"generator": "satcli shapes", "version": GENERATOR_VERSION, **asdict(options)}


def generate(out_dir: Path, options: ShapesOptions = ShapesOptions(),
             on_image: Callable[[], None] | None = None, n_workers: int | None = None) -> Path:
    """Write ``options.n_images`` JPEGs under ``out_dir/images/`` and ``out_dir/dataset_shapes.json``.

    Returns the JSON path. ``on_image`` is called once per image written (for a progress bar).
    """
    images_dir = out_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)

    def one(index: int) -> dict:
        data, image = render(index, options)
        (images_dir / f"{index:06d}.jpg").write_bytes(data)
        if on_image is not None:
            on_image()
        return _entry(index, options, image)

    n_workers = n_workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(n_workers) as pool:
        entries = list(pool.map(one, range(options.n_images)))
    json_path = out_dir / JSON_NAME
    json_path.write_text(json.dumps({"dataset": "shapes", "info": _info(options), "images": entries}))
    return json_path


def ensure_generated(source_dir: Path, options: ShapesOptions = ShapesOptions(),
                     on_image: Callable[[], None] | None = None) -> Path:
    """The shapes source in ``source_dir``, drawn now unless one with the same options is already there.

    A new source is drawn into a temporary sibling and swapped in whole, so an interrupted run never leaves a
    half-drawn source that would be reused.
    """
    json_path = source_dir / JSON_NAME
    if _is_current(json_path, options):
        log.info("Reusing the shapes images in %s", source_dir)
        return json_path
    partial = source_dir.with_name(f".{source_dir.name}-partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        generate(partial, options, on_image)
        if source_dir.exists():
            shutil.rmtree(source_dir)
        partial.rename(source_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return json_path


def _is_current(json_path: Path, options: ShapesOptions) -> bool:
    try:
        doc = json.loads(json_path.read_text())
        info, entries = doc["info"], doc["images"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if info != _info(options) or len(entries) != options.n_images:
        return False
    images_dir = json_path.parent / IMAGES_DIR
    return all((images_dir / e["filename"]).is_file() for e in entries)
