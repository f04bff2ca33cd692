"""Attention grounding: does the model look at the object it names?

For datasets whose images carry object boxes and the caption words that refer to each object (``shapes``, or
any dataset whose JSON has ``objects``), every *generated* word that refers to an object of its image is scored
against the union of the boxes of the objects it refers to (``"red"`` may name two red objects):

- **pointing game**: the attention's peak cell lies in a referred box (the cell's centre is inside it);
- **attention mass**: the share of the attention that falls inside the referred boxes.

- **mean peak attention per word**: the largest weight of each generated word's map, averaged over every
  generated word (object word or not): how sharply the model looks. Uniform attention's value is 1/(H·W).

Beside each, the **chance level**: what attention spread uniformly over the grid would score on the same words
(the share of cell centres inside the boxes, and the share of the image they cover). A model that attends
well scores far above chance; one that ignores where things are scores at chance.

Boxes are ``(x0, y0, x1, y1)`` fractions of the image width and height. The encoder sees the whole image
squashed to a square, so the ``H × W`` attention grid covers the image evenly: cell ``(i, j)`` spans
``[j/W, (j+1)/W] × [i/H, (i+1)/H]``. A cell partly inside a box counts with the part inside (measured on a
16 × 16 sample of points per cell), so the mass is the expected share of attention inside the box when
attention is spread evenly within each cell.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

Box = tuple[float, float, float, float]
_SAMPLES_PER_CELL = 16


@dataclass(frozen=True)
class GroundedObject:
    """An object box (fractions of the image) and the words that refer to it."""

    box: Box
    words: tuple[str, ...]


@dataclass
class GroundingScores:
    """Scores on the 0–1 scale over ``n_words`` scored words; ``*_chance``: uniform attention's scores."""

    n_words: int = 0
    pointing: float = 0.0
    pointing_chance: float = 0.0
    mass: float = 0.0
    mass_chance: float = 0.0
    peak: float = 0.0  # mean over every generated word of its attention map's largest weight
    peak_uniform: float = 0.0  # the same for uniform attention: 1 / (H·W)
    n_peak_words: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def box_coverage(boxes: Sequence[Box], grid_shape: tuple[int, int]) -> np.ndarray:
    """(H, W): the share of each grid cell inside the union of ``boxes``."""
    rows, cols = grid_shape
    s = _SAMPLES_PER_CELL
    return _centres_in(boxes, rows * s, cols * s).reshape(rows, s, cols, s).mean(axis=(1, 3))


def centres_inside(boxes: Sequence[Box], grid_shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the cells whose centre lies inside one of ``boxes``."""
    return _centres_in(boxes, *grid_shape)


def _centres_in(boxes: Sequence[Box], rows: int, cols: int) -> np.ndarray:
    """(rows, cols) bool: which centres of a regular rows × cols lattice over the unit square lie in a box."""
    ys = (np.arange(rows) + 0.5) / rows
    xs = (np.arange(cols) + 0.5) / cols
    inside = np.zeros((rows, cols), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        inside |= ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    return inside


@dataclass
class _Totals:
    n_words: int = 0
    hits: float = 0.0
    hits_chance: float = 0.0
    mass: float = 0.0
    mass_chance: float = 0.0
    n_peak_words: int = 0
    peak: float = 0.0
    peak_uniform: float = 0.0


def _score_peaks(totals: _Totals, tokens: Sequence[str], attention: np.ndarray) -> None:
    n = min(len(tokens), len(attention))
    if n == 0:
        return
    maps = np.asarray(attention[:n], dtype=np.float64).reshape(n, -1)
    sums = maps.sum(axis=1)
    kept = np.isfinite(sums) & (sums > 0)
    totals.n_peak_words += int(kept.sum())
    totals.peak += float((maps[kept].max(axis=1) / sums[kept]).sum())
    totals.peak_uniform += float(kept.sum()) / maps.shape[1]


def _score_caption(totals: _Totals, tokens: Sequence[str], attention: np.ndarray,
                   objects: Sequence[GroundedObject]) -> None:
    if not objects or len(tokens) == 0:
        return
    grid_shape = attention.shape[1:]
    for t, word in enumerate(tokens[: len(attention)]):
        boxes = [o.box for o in objects if word in o.words]
        if not boxes:
            continue  # the word names nothing in this image (a function word, or a hallucinated object)
        alpha = np.asarray(attention[t], dtype=np.float64)
        total = alpha.sum()
        if not np.isfinite(total) or total <= 0:
            continue
        coverage = box_coverage(boxes, grid_shape)
        centres = centres_inside(boxes, grid_shape)
        peak = np.unravel_index(int(alpha.argmax()), grid_shape)
        totals.n_words += 1
        totals.hits += float(centres[peak])
        totals.hits_chance += float(centres.mean())
        totals.mass += float((alpha * coverage).sum() / total)
        totals.mass_chance += float(coverage.mean())


def grounding_scores(captions: Iterable[tuple[Sequence[str], np.ndarray, Sequence[GroundedObject]]]
                     ) -> GroundingScores:
    """Pointing game and attention mass, with their chance levels, over every generated word that refers to an
    object; the mean peak attention over every generated word. Each item: the caption's words, its attention
    (n_tokens, H, W) with ``attention[t]`` the map that wrote ``words[t]``, and the image's objects."""
    totals = _Totals()
    for tokens, attention, objects in captions:
        _score_caption(totals, tokens, attention, objects)
        _score_peaks(totals, tokens, attention)
    n, n_peak = totals.n_words, max(totals.n_peak_words, 1)
    peaks = dict(peak=totals.peak / n_peak, peak_uniform=totals.peak_uniform / n_peak,
                 n_peak_words=totals.n_peak_words)
    if n == 0:
        return GroundingScores(**peaks)
    return GroundingScores(n, totals.hits / n, totals.hits_chance / n, totals.mass / n, totals.mass_chance / n,
                           **peaks)


def objects_from_store(rows: Sequence[dict] | None) -> list[GroundedObject]:
    """The ``objects`` column of a stored image (``[{box, label, words}, ...]``) as grounded objects."""
    return [GroundedObject(tuple(float(v) for v in row["box"]), tuple(row.get("words") or ()))  # type: ignore[arg-type]
            for row in rows or () if row.get("box") is not None and len(row["box"]) == 4]
