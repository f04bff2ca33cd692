"""``satcli report``: one HTML file to browse a results Parquet and see where the model looked for every word.

The page is self-contained (inline script and style, no network): open it from disk. It embeds every row's path,
caption, words, scores, error and attention (each grid as bytes scaled to its peak, base64), and shows them 50 at
a time with a search box and a sort order, so tens of thousands of rows stay responsive. Rows of evaluate's
predictions also show their references, BLEU-4, CIDEr-D and objects, worst CIDEr-D first; ``limit`` keeps only
that many rows (the lowest CIDEr-D, else the first), read without loading the others. Hovering or clicking a
word draws that word's attention over the image on a canvas with the same colour map and blend as the PNG
overlays, and says the word's probability given the words before it (for files that have ``token_logprobs``).
Image thumbnails (JPEG, at most ``thumb_size`` pixels a side) go into ``<report>_files/`` beside the page,
referenced relatively: copy the two together. Relative image paths start from ``--image-root``, else from the
folder the results file records (caption's ``--root``, evaluate's dataset images), else the current directory.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from satcli.core.atomic import atomic_path, make_folder, write_text
from satcli.core.console import counted, make_progress
from satcli.core.errors import SatcliError
from satcli.core.marks import mark_pictures_folder
from satcli.core.printing import word_probability
from satcli.core.version import __version__
from satcli.formats.results import SCORE_COLUMNS, count_rows, read_metadata, recorded_image_root
from satcli.formats.results_pick import pick_rows
from satcli.formats.results_rows import checked_rows
from satcli.pictures.overlays import BLEND_FLOOR, BLEND_GAIN, colormap_lut, open_image, overlay_name, resolve_image

log = logging.getLogger(__name__)

THUMB_SIZE = 224
PAGE_SIZE = 50
_COLUMNS = ["path", "caption", "tokens", "sum_logprob", "finished", "attention", "grid_height", "grid_width",
            "image_width", "image_height", "error", "token_logprobs", "alternatives",
            *SCORE_COLUMNS]
# What the picture's place says for a row without a thumbnail: what is wrong with the file, by error kind.
_NO_PICTURE = {"empty": "empty file", "not-an-image": "not an image", "truncated": "truncated or corrupt image",
               "too-large": "too large to show"}
_THREADS = 4  # thumbnails: decoding and resizing release the GIL


@dataclass(frozen=True)
class ReportOptions:
    """What ``satcli report`` was asked to do."""

    results: Path
    output: Path | None = None  # None: the results file with .html
    image_root: Path | None = None  # relative result paths start here; None: the file's recorded root, else cwd
    thumb_size: int = THUMB_SIZE
    progress: bool = True
    limit: int | None = None  # at most this many rows in the page: the lowest CIDEr-D when scored, else the first


@dataclass
class ReportSummary:
    output: Path
    thumbnails: Path
    n_rows: int = 0
    n_errors: int = 0
    n_missing_images: int = 0
    n_total: int = 0  # rows in the results file (more than n_rows with a limit)


def default_output(results: Path) -> Path:
    return results.with_suffix(".html")


def encode_attention(grids: np.ndarray) -> tuple[str, list[float]]:
    """(n_tokens, H, W) → (base64 of uint8 grids each scaled to its own peak, the peak weights)."""
    if grids.size == 0:
        return "", []
    peaks = grids.reshape(grids.shape[0], -1).max(axis=1)
    scaled = grids / np.where(peaks > 0, peaks, 1)[:, None, None]
    data = np.rint(np.clip(scaled, 0, 1) * 255).astype(np.uint8)
    return base64.b64encode(data.tobytes()).decode("ascii"), [round(float(p), 4) for p in peaks]


def _thumbnail(source: Path, target: Path, size: int) -> bool:
    image = open_image(source)
    if image is None:
        return False
    image.thumbnail((size, size), resample=3)  # bicubic
    with atomic_path(target) as tmp:  # renamed over the name: a link planted there is replaced, its target kept
        image.save(tmp, format="JPEG", quality=82, optimize=True)
    return True


def _about(results: Path, metadata: dict[str, Any], n_rows: int, n_errors: int) -> str:
    model = metadata.get("satcli.model") or {}
    decoding = metadata.get("satcli.decoding") or {}
    parts = [f"{results.name}: {n_rows:,} images, {n_errors:,} errors"]
    if model.get("encoder"):
        parts.append(f"encoder {model['encoder']}")
    if decoding.get("beam_size"):
        parts.append(f"beam {decoding['beam_size']}")
    if model.get("path"):
        parts.append(f"model {model['path']}")
    return " · ".join(parts)


def _asset(name: str) -> str:
    return resources.files("satcli").joinpath("report_assets", name).read_text(encoding="utf-8")


def word_probabilities(token_logprobs: list[float | None] | None) -> list[float | None] | None:
    """Each word's probability for the page (4 decimals), None where unknown; None for files without the column."""
    if token_logprobs is None:
        return None
    return [None if p is None else round(p, 4) for p in map(word_probability, token_logprobs)]


def no_picture_note(error: str | None, image: Path) -> str:
    """Why a row shows no picture: what is wrong with the file (its error), else whether the file is gone."""
    if error is not None:
        kind = error.split(":", 1)[0]
        return _NO_PICTURE.get(kind, error if kind == "unreadable" else kind.replace("-", " "))
    return "image cannot be read" if image.exists() else "image not found"


def alternatives(value: list[dict[str, Any]] | None) -> list[list[Any]] | None:
    """The runners-up (``--n-best``) for the page: [caption, sum_logprob (2 decimals)], best first; None without."""
    if not value:
        return None
    return [[a["caption"], None if a["sum_logprob"] is None or not math.isfinite(a["sum_logprob"])
             else round(a["sum_logprob"], 2)] for a in value]


def _score(value: float | None) -> float | None:
    return round(value, 4) if value is not None and math.isfinite(value) else None


def _evaluated(row: dict) -> list[Any] | None:
    """What evaluate's predictions add to a row for the page: [references, BLEU-4, CIDEr-D, objects named,
    objects present]; None for rows without (caption results)."""
    if row["references"] is None and row["cider_d"] is None:
        return None
    return [row["references"], _score(row["bleu4"]), _score(row["cider_d"]), row["objects_named"],
            row["objects_present"]]


def _rows(options: ReportOptions, root: Path, thumbs: Path, summary: ReportSummary, only: list[int] | None,
          evaluated: list[list[Any] | None]) -> Iterator[list[Any]]:
    """The page's rows (``only`` those at these indices, None: all), thumbnails written on a few threads as the
    rows stream past; what evaluate adds to each goes to ``evaluated``, one entry per row."""
    bar = make_progress()
    bar.disable = not options.progress
    with bar, ThreadPoolExecutor(_THREADS) as pool:
        task = bar.add_task("report", total=summary.n_total if only is None else len(only), unit="images")
        batch: list[tuple[dict, Any]] = []
        folder = urllib.parse.quote(thumbs.name)

        def drain() -> Iterator[list[Any]]:
            for row, made in batch:
                thumb = f"{folder}/{overlay_name(row['path'])}.jpg" if made is not None and made.result() else None
                note = None if thumb else no_picture_note(row["error"], resolve_image(row["path"], root))
                if thumb is None and row["error"] is None:
                    summary.n_missing_images += 1
                attention, peaks = encode_attention(row["attention"]) if row["error"] is None else ("", [])
                value = row["sum_logprob"]
                sum_logprob = round(value, 4) if value is not None and math.isfinite(value) else None
                evaluated.append(_evaluated(row))
                yield [row["path"], row["caption"], row["tokens"], sum_logprob, row["finished"], row["error"],
                       row["grid_height"], row["grid_width"], attention, peaks, thumb, row["image_width"],
                       row["image_height"], word_probabilities(row["token_logprobs"]),
                       alternatives(row["alternatives"]), note]
                bar.advance(task)
            batch.clear()

        for row in checked_rows(options.results, _COLUMNS, only):
            summary.n_rows += 1
            summary.n_errors += row["error"] is not None
            made = None  # no thumbnail for an error row: its file is no image, or one too large to open
            if row["error"] is None:
                made = pool.submit(_thumbnail, resolve_image(row["path"], root),
                                   thumbs / f"{overlay_name(row['path'])}.jpg", options.thumb_size)
            batch.append((row, made))
            if len(batch) >= 64:
                yield from drain()
        yield from drain()


def build_report(options: ReportOptions) -> ReportSummary:
    """Write the report for ``options.results``; returns where it went and what it holds."""
    results = Path(options.results)
    if options.thumb_size < 16:
        raise SatcliError(f"--thumb-size must be at least 16, got {options.thumb_size}")
    if options.limit is not None and options.limit < 1:
        raise SatcliError(f"--limit must be at least 1, got {options.limit}")
    total = count_rows(results)
    output = Path(options.output) if options.output is not None else default_output(results)
    if output.resolve() == results.resolve():
        raise SatcliError("the report would overwrite the results file; name an .html file with -o", output)
    if output.is_dir():
        raise SatcliError("the output is a directory; name an .html file with -o", output)
    thumbs = output.with_name(output.stem + "_files")
    make_folder(thumbs, "is in the way of the report's thumbnail folder")
    mark_pictures_folder(thumbs, "the thumbnails of a report")
    summary = ReportSummary(output, thumbs, n_total=total)
    root = options.image_root if options.image_root is not None else recorded_image_root(results) or Path(".")
    only, note = None, ""
    if options.limit is not None and options.limit < total:  # choose from one column, then read only those rows
        only, scored = pick_rows(results, options.limit)
        note = (f"{len(only):,} of {total:,} rows shown: " +
                (f"the {len(only):,} lowest by CIDEr-D" if scored else f"the first {len(only):,}") + " (--limit)")
    evaluated: list[list[Any] | None] = []
    rows = list(_rows(options, root, thumbs, summary, only, evaluated))
    data = {
        "rows": rows,
        "about": _about(results, read_metadata(results), summary.n_rows, summary.n_errors),
        "note": note,
        # per row: [references, bleu4, cider_d, objects named, present] or null; null for caption results
        "evaluated": evaluated if any(e is not None for e in evaluated) else None,
        "lut": colormap_lut().tobytes().hex(),
        "blend": [BLEND_FLOOR, BLEND_GAIN],
        "page_size": PAGE_SIZE,
        "thumb_size": options.thumb_size,
    }
    # Inside <script>, "</script>" would end the element: "<" only occurs in JSON strings, where \u003c is "<".
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    page = (_asset("report.html")
            .replace("{{STYLE}}", _asset("report.css"))
            .replace("{{SCRIPT}}", _asset("report.js"))
            .replace("{{TITLE}}", html.escape(f"satcli report: {results.name}"))
            .replace("{{VERSION}}", __version__)
            .replace("{{DATA}}", text))  # last: the data may hold any of the other markers
    write_text(output, page)
    if summary.n_missing_images:
        log.warning("%s could not be read; relative paths are looked up under %s (see --image-root)",
                    counted(summary.n_missing_images, "image"), root.absolute())
    return summary
