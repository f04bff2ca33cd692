"""What every caption-format reader produces (:class:`ImageRecord` in a :class:`SourceDataset`), and the checked
reading they share: text and JSON that fail as one line naming the file and the entry, safe image paths, captions.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from satcli.core.errors import SatcliError, first_line
from satcli.data.store import SPLITS
from satcli.data.text import tokenize


class CaptionFormat(str, Enum):
    """The caption file layouts, as detected from a file's content."""

    karpathy = "karpathy-json"
    coco = "coco-annotations"
    flickr_csv = "flickr-captions-txt"
    flickr_token = "flickr-token"
    pairs_csv = "pairs-csv"
    pairs_jsonl = "pairs-jsonl"


@dataclass
class ObjectBox:
    """An object drawn in an image: ``box`` is ``(x0, y0, x1, y1)`` in pixels of the source image."""

    box: tuple[float, float, float, float]
    label: str
    words: list[str] = field(default_factory=list)


@dataclass
class ImageRecord:
    """One image of a dataset: where it is (relative to the images directory), its split and raw captions."""

    image_id: int
    path: str
    split: str
    captions: list[str]
    objects: list[ObjectBox] = field(default_factory=list)


@dataclass
class SourceDataset:
    """What a reader found: the records, how they were split, and images left out with the reason."""

    format: CaptionFormat
    captions_file: Path
    split_source: str
    records: list[ImageRecord]
    left_out: dict[str, int] = field(default_factory=dict)

    def split_records(self, split: str) -> list[ImageRecord]:
        return [r for r in self.records if r.split == split]


# ----------------------------------------------------------------------------------------------------------
# Checked reading, shared by the readers


def entry_error(file: Path, where: str, message: str) -> SatcliError:
    """The one-line error of a malformed entry: ``file: where: message``."""
    return SatcliError(f"{where}: {message}", path=file)


def storable_text(value: str, file: Path, where: str, what: str) -> str:
    """``value``, refused when it holds a lone surrogate (JSON's ``"\\ud800"``): no text, it cannot be stored."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        message = f"the {what} holds a lone surrogate escape (\\udXXX), which is not text"
        raise entry_error(file, where, message) from None
    return value


def safe_image_path(raw: object, file: Path, where: str) -> str:
    """A caption file's image path as a clean relative POSIX path; refuses anything that leaves the images dir."""
    if not isinstance(raw, str) or not raw.strip():
        raise entry_error(file, where, "missing image file name")
    storable_text(raw, file, where, "image path")
    text = raw.strip()
    parts = [p for p in re.split(r"[\\/]", text) if p not in ("", ".")]
    if text.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", text) or ".." in parts or "\0" in text or not parts:
        raise entry_error(file, where, f"image path {text!r} leaves the images directory (absolute and '..' "
                                       "paths are refused)")
    return "/".join(parts)


def clean_caption(raw: object, file: Path, where: str) -> str:
    """A caption stripped of surrounding space; refused when it is not text or has no words."""
    if not isinstance(raw, str):
        raise entry_error(file, where, "caption is missing or not a string")
    caption = storable_text(raw, file, where, "caption").strip()
    if not tokenize(caption):
        raise entry_error(file, where, "empty caption")
    return caption


def read_text(path: Path) -> str:
    """A whole UTF-8 file (a BOM is dropped); unreadable or non-UTF-8 files are one-line errors."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise SatcliError(f"not UTF-8 text (byte {error.start})", path=path) from None
    except OSError as error:
        raise SatcliError(f"cannot read: {error.strerror}", path=path) from None


def load_json(path: Path) -> Any:
    """A JSON file's value; see :func:`parse_json` for its errors."""
    return parse_json(read_text(path), path, None)


def parse_json(text: str, path: Path, line: int | None) -> Any:
    """JSON text → value; malformed JSON, nesting too deep for Python and numbers too long for it are one-line
    errors naming the file (and line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno if line is None else line}" + (f" column {error.colno}" if line is None else "")
        raise entry_error(path, where, f"not valid JSON ({error.msg})") from None
    except RecursionError:
        raise entry_error(path, "top level" if line is None else f"line {line}", "not readable JSON (nested "
                          "too deeply)") from None
    except ValueError as error:  # e.g. an integer of more than 4300 digits
        reason = first_line(error, 120)
        where = "top level" if line is None else f"line {line}"
        raise entry_error(path, where, f"not readable JSON ({reason})") from None


def required_field(entry: Any, name: str, kind: type | tuple[type, ...], file: Path, where: str) -> Any:
    """``entry[name]``, refused when ``entry`` is not an object or the field is missing or not ``kind``."""
    if not isinstance(entry, dict):
        raise entry_error(file, where, f"expected an object, got {type(entry).__name__}")
    if name not in entry:
        raise entry_error(file, where, f"missing field {name!r}")
    value = entry[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise entry_error(file, where, f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


def split_name(raw: object, file: Path, where: str) -> str:
    """A split named in a caption file (``restval`` joins train); unknown names are refused."""
    split = "train" if raw == "restval" else raw
    if split not in SPLITS:
        raise entry_error(file, where, f"unknown split {raw!r} (expected train, val, test, heldout or restval)")
    return split  # type: ignore[return-value]


def csv_header_and_rows(path: Path) -> tuple[int, list[str], Iterator[tuple[int, list[str]]]]:
    """The header's line number and cells, and (line number, cells) for each following non-blank row."""
    rows = _csv_rows(path)
    first = next(rows, None)
    if first is None:
        raise SatcliError("empty file", path=path)
    return first[0], first[1], rows


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            for row in reader:
                if any(cell.strip() for cell in row):
                    yield reader.line_num, row
    except UnicodeDecodeError as error:
        raise SatcliError(f"not UTF-8 text (byte {error.start})", path=path) from None
    except csv.Error as error:
        raise SatcliError(f"not valid CSV ({error})", path=path) from None


