"""The captions of a ``shapes`` picture: varied templates and synonyms that name every object by size, colour and
shape, count alike objects and say where they are relative to each other; each object remembers its words."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from satcli.data.shapes.scene import BACKGROUNDS, COUNT_WORDS, SHAPES, SIZES, ShapeObject, ShapesImage, pick, plural


class _Phrases:
    """Noun phrases for objects, remembering which words named which object."""

    def __init__(self, rng: np.random.Generator, objects: list[ShapeObject]):
        self.rng = rng
        self.objects = objects

    def _words(self, obj: ShapeObject, count: int) -> tuple[str, str, str]:
        size = pick(self.rng, SIZES[obj.size])
        shape = pick(self.rng, SHAPES[obj.shape])
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
        return pick(rng, _RELATIONS[axis][0])

    def back() -> str:
        return pick(rng, _RELATIONS[axis][1])

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


def make_captions(rng: np.random.Generator, image: ShapesImage, n_captions: int = 5) -> list[str]:
    phrases = _Phrases(rng, image.objects)
    templates = _caption_templates(image, phrases)
    captions: list[str] = []
    for attempt in range(100):
        make = templates[attempt % len(templates)] if attempt < len(templates) else pick(rng, templates)
        caption = make()
        if caption not in captions:
            captions.append(caption)
        if len(captions) == n_captions:
            break
    rng.shuffle(captions)  # type: ignore[arg-type]
    return captions

