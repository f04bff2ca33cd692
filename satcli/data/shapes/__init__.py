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

This module lays a picture out and writes the dataset; :mod:`satcli.data.shapes.scene` holds what a picture can
contain, :mod:`satcli.data.shapes.draw` paints it and :mod:`satcli.data.shapes.words` writes its captions.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from satcli.core.atomic import process_alive
from satcli.data.shapes.draw import draw_picture
from satcli.data.shapes.scene import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_FILLS,
    HELDOUT_SHADES,
    SHAPES,
    SIZES,
    Appearance,
    ShapeObject,
    ShapesImage,
    pick,
)
from satcli.data.shapes.words import make_captions
from satcli.data.text import tokenize

log = logging.getLogger(__name__)

JSON_NAME = "dataset_shapes.json"
IMAGES_DIR = "images"
GENERATOR_VERSION = 1  # bump when the pictures or captions change, so stale generated sources are redrawn

# Object extent as a fraction of the image side. Three large objects still fit in a row.
_LARGE_EXTENT = (0.28, 0.31)
_SMALL_EXTENT = (0.16, 0.185)
_MARGIN = 2.0  # pixels kept free at the image border and between objects

# The held-out split: the same shapes, colours, sizes, layouts and caption words as the other splits, drawn in
# an appearance no training image has: every object outlined or hatched instead of solid, in a lighter or
# darker shade of its colour, and (all but circles) rotated. Drawn from its own random stream, so adding it
# leaves every train, val and test image as it was.
HELDOUT_SPLIT = "heldout"
_HELDOUT_ROTATION = (10, 35)  # degrees, either way
_HELDOUT_SHRINK = 0.85  # a rotated square or cross stays inside its layout slot


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


# ----------------------------------------------------------------------------------------------------------
# Layout: what objects, and where


def _choose_objects(rng: np.random.Generator) -> list[ShapeObject]:
    n_objects = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    objects: list[ShapeObject] = []
    for _ in range(n_objects):
        if objects and rng.random() < 0.3:  # a repeat, so "two green triangles" happens often enough
            twin = objects[int(rng.integers(len(objects)))]
            objects.append(ShapeObject(twin.shape, twin.colour, twin.size))
        else:
            objects.append(ShapeObject(pick(rng, list(SHAPES)), pick(rng, list(COLOURS)), pick(rng, list(SIZES))))
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
    return Appearance(fill=pick(rng, HELDOUT_FILLS), rotation=rotation, shade=pick(rng, list(HELDOUT_SHADES)))


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
    background = pick(rng, list(BACKGROUNDS))
    picture = draw_picture(rng, objects, outlines, background, size)
    image = ShapesImage(objects=objects, axis=axis, background=background, captions=[])
    image.captions = make_captions(rng, image)
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
    remove_dead_partials(source_dir)
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


def remove_dead_partials(source_dir: Path) -> list[Path]:
    """Delete the ``.NAME-partial-PID`` folders beside ``source_dir`` that drawing runs left when they were
    killed: those whose process is gone (:func:`satcli.core.atomic.process_alive`); a live run's is left alone.
    Returns the folders removed."""
    pattern = re.compile(rf"^\.{re.escape(source_dir.name)}-partial-(\d+)$")
    try:
        siblings = list(source_dir.parent.iterdir())
    except OSError:
        return []
    removed = []
    for sibling in siblings:
        match = pattern.match(sibling.name)
        if match is None or process_alive(int(match[1])) or sibling.is_symlink() or not sibling.is_dir():
            continue
        shutil.rmtree(sibling, ignore_errors=True)
        log.info("removed %s, left by an interrupted preprocess", sibling)
        removed.append(sibling)
    return removed


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
