"""What a ``shapes`` picture can hold: the shapes, colours, sizes and backgrounds, with the words captions use
for them, and the objects and appearances a generated picture is made of (see :mod:`satcli.data.shapes`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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

# The held-out split's appearances (see satcli.data.shapes): a fill no training image has, and a shade of the colour.
HELDOUT_FILLS = ("outline", "hatched")
HELDOUT_SHADES = {"light": 255.0, "dark": 0.0}  # mixed into the colour by _SHADE_MIX in satcli.data.shapes.draw


def pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    """One of ``options``, drawn from ``rng``."""
    return options[int(rng.integers(len(options)))]


def plural(word: str) -> str:
    """``circle`` → ``circles``, ``cross`` → ``crosses``."""
    return word + "es" if word.endswith(("s", "x")) else word + "s"


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

