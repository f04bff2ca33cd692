"""Readers for every caption format satcli knows, all producing the same list of :class:`ImageRecord`.

Formats (see docs/datasets.md for where each comes from):

- Karpathy split JSON (``dataset_flickr8k.json``, ``dataset_flickr30k.json``, ``dataset_coco.json``,
  ``dataset_shapes.json``): ``images[]`` with ``filename``, optional ``filepath``, ``split`` (``restval`` joins
  train) and ``sentences[].raw``; the shapes dataset adds ``objects``.
- Kaggle Flickr ``captions.txt``: CSV with the header ``image,caption``, one row per caption.
- ``Flickr8k.token.txt`` / Flickr30k ``results_20130124.token``: ``<file>#<n>\\t<caption>`` lines.
- COCO caption annotations (``captions_train2014.json``): ``images[]`` and ``annotations[]``.
- ``captions-csv``: a CSV (header with ``image`` and ``caption``, optional ``split``) or JSONL
  (``{"image": ..., "caption": ...}`` per line, or ``"captions": [...]``) of a user's own photos.

The Flickr formats use the official split files (``Flickr_8k.trainImages.txt`` and friends) found beside the
caption file or in ``--splits DIR``; formats without splits get a seeded random split. Paths in caption files
are relative to the images directory and may not leave it. A malformed entry stops the read with a
:class:`SatcliError` naming the file and the entry or line.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from satcli.errors import SatcliError, first_line
from satcli.store import SPLITS, DatasetKind
from satcli.text import tokenize

log = logging.getLogger(__name__)

FLICKR_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
FLICKR_PROPORTIONS = (6000, 1000, 1000)  # train/val/test of the official Flickr8k split
PAIRS_PROPORTIONS = (8, 1, 1)  # a user's own photos, and COCO annotation files (which carry no split)


class CaptionFormat(str, Enum):
    """The caption file layouts, as detected from a file's content."""

    karpathy = "karpathy-json"
    coco = "coco-annotations"
    flickr_csv = "flickr-captions-txt"
    flickr_token = "flickr-token"
    pairs_csv = "pairs-csv"
    pairs_jsonl = "pairs-jsonl"


_DESCRIPTIONS = {
    CaptionFormat.karpathy: ("a Karpathy split JSON", "karpathy"),
    CaptionFormat.coco: ("a COCO caption annotation JSON", "coco"),
    CaptionFormat.flickr_csv: ("a Flickr captions.txt (image,caption)", "flickr8k"),
    CaptionFormat.flickr_token: ("a Flickr token file (<file>#<n><tab><caption>)", "flickr8k"),
    CaptionFormat.pairs_csv: ("a CSV of image,caption pairs", "captions-csv"),
    CaptionFormat.pairs_jsonl: ("a JSONL of image/caption pairs", "captions-csv"),
}
_FLICKR_FORMATS = {CaptionFormat.karpathy, CaptionFormat.flickr_csv, CaptionFormat.flickr_token}
ACCEPTED_FORMATS: dict[DatasetKind, set[CaptionFormat]] = {
    DatasetKind.flickr8k: _FLICKR_FORMATS,
    DatasetKind.flickr30k: _FLICKR_FORMATS,
    DatasetKind.coco: {CaptionFormat.karpathy, CaptionFormat.coco},
    DatasetKind.karpathy: {CaptionFormat.karpathy},
    DatasetKind.captions_csv: {CaptionFormat.pairs_csv, CaptionFormat.pairs_jsonl},
    DatasetKind.shapes: {CaptionFormat.karpathy},
}


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
# Small helpers shared by the readers


def _error(file: Path, where: str, message: str) -> SatcliError:
    return SatcliError(f"{where}: {message}", path=file)


def _text(value: str, file: Path, where: str, what: str) -> str:
    """``value``, refused when it holds a lone surrogate (JSON's ``"\\ud800"``): no text, it cannot be stored."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _error(file, where, f"the {what} holds a lone surrogate escape (\\udXXX), which is not text") from None
    return value


def safe_image_path(raw: object, file: Path, where: str) -> str:
    """A caption file's image path as a clean relative POSIX path; refuses anything that leaves the images dir."""
    if not isinstance(raw, str) or not raw.strip():
        raise _error(file, where, "missing image file name")
    _text(raw, file, where, "image path")
    text = raw.strip()
    parts = [p for p in re.split(r"[\\/]", text) if p not in ("", ".")]
    if text.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", text) or ".." in parts or "\0" in text or not parts:
        raise _error(file, where, f"image path {text!r} leaves the images directory (absolute and '..' paths "
                                  "are refused)")
    return "/".join(parts)


def _caption(raw: object, file: Path, where: str) -> str:
    if not isinstance(raw, str):
        raise _error(file, where, "caption is missing or not a string")
    caption = _text(raw, file, where, "caption").strip()
    if not tokenize(caption):
        raise _error(file, where, "empty caption")
    return caption


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise SatcliError(f"not UTF-8 text (byte {error.start})", path=path) from None
    except OSError as error:
        raise SatcliError(f"cannot read: {error.strerror}", path=path) from None


def _load_json(path: Path) -> Any:
    return _parse_json(_read_text(path), path, None)


def _parse_json(text: str, path: Path, line: int | None) -> Any:
    """JSON text → value; malformed JSON, nesting too deep for Python and numbers too long for it are one-line
    errors naming the file (and line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno if line is None else line}" + (f" column {error.colno}" if line is None else "")
        raise _error(path, where, f"not valid JSON ({error.msg})") from None
    except RecursionError:
        raise _error(path, "top level" if line is None else f"line {line}", "not readable JSON (nested too "
                     "deeply)") from None
    except ValueError as error:  # e.g. an integer of more than 4300 digits
        reason = first_line(error, 120)
        raise _error(path, "top level" if line is None else f"line {line}", f"not readable JSON ({reason})") from None


def _key(entry: Any, name: str, kind: type | tuple[type, ...], file: Path, where: str) -> Any:
    if not isinstance(entry, dict):
        raise _error(file, where, f"expected an object, got {type(entry).__name__}")
    if name not in entry:
        raise _error(file, where, f"missing field {name!r}")
    value = entry[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _error(file, where, f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _split_name(raw: object, file: Path, where: str) -> str:
    split = "train" if raw == "restval" else raw
    if split not in SPLITS:
        raise _error(file, where, f"unknown split {raw!r} (expected train, val, test, heldout or restval)")
    return split  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# Format detection


def detect_format(kind: DatasetKind, captions: Path) -> CaptionFormat:
    """Which layout ``captions`` has, judged by its content, and refused if ``--dataset kind`` cannot read it."""
    return _detect(kind, captions)[0]


def _detect(kind: DatasetKind, captions: Path) -> tuple[CaptionFormat, Any]:
    """The layout, and the parsed document when the file is one JSON document (so it is parsed only once)."""
    head = _read_head(captions)
    first_line = next((line for line in head.splitlines() if line.strip()), "")
    doc = None
    if kind is DatasetKind.captions_csv:
        found = CaptionFormat.pairs_jsonl if head.lstrip().startswith("{") else CaptionFormat.pairs_csv
    elif head.lstrip().startswith("{"):
        doc = _load_json(captions)
        found = CaptionFormat.coco if isinstance(doc, dict) and "annotations" in doc else CaptionFormat.karpathy
    elif [c.strip().lower() for c in first_line.split(",")] == ["image", "caption"]:
        found = CaptionFormat.flickr_csv
    elif re.match(r"^[^\t]+#\d+\t", first_line):
        found = CaptionFormat.flickr_token
    else:
        raise SatcliError(
            "not a caption file satcli recognises: expected a Karpathy JSON, a captions.txt starting with "
            "'image,caption', or '<file>#<n><tab><caption>' lines", path=captions)
    if found not in ACCEPTED_FORMATS[kind]:
        description, suggestion = _DESCRIPTIONS[found]
        raise SatcliError(f"this looks like {description}, which --dataset {kind.value} does not read; "
                          f"use --dataset {suggestion}", path=captions)
    return found, doc


def _read_head(path: Path, n_chars: int = 65536) -> str:
    try:
        with path.open(encoding="utf-8-sig") as file:
            return file.read(n_chars)
    except UnicodeDecodeError as error:
        raise SatcliError(f"not UTF-8 text (byte {error.start})", path=path) from None
    except OSError as error:
        raise SatcliError(f"cannot read: {error.strerror}", path=path) from None


# ----------------------------------------------------------------------------------------------------------
# Readers. Formats with their own split return records; the others return captions per image, in file order.


def read_karpathy(path: Path, doc: Any = None) -> list[ImageRecord]:
    """Records of a Karpathy split JSON (and of the shapes dataset, which adds ``objects``).

    ``doc`` is the file's already parsed content, if the caller has it.
    """
    doc = _load_json(path) if doc is None else doc
    images = _key(doc, "images", list, path, "top level")
    records = []
    for i, entry in enumerate(images):
        where = f"images[{i}]"
        filename = _key(entry, "filename", str, path, where)
        filepath = entry.get("filepath") or ""
        if not isinstance(filepath, str):
            raise _error(path, where, "field 'filepath' is not a string")
        image_path = safe_image_path(f"{filepath}/{filename}" if filepath else filename, path, where)
        split = _split_name(_key(entry, "split", str, path, where), path, where)
        sentences = _key(entry, "sentences", list, path, where)
        if not sentences:
            raise _error(path, where, "no sentences")
        captions = [_sentence(s, path, f"{where}.sentences[{j}]") for j, s in enumerate(sentences)]
        objects = [_object(o, path, f"{where}.objects[{j}]") for j, o in enumerate(entry.get("objects") or [])]
        records.append(ImageRecord(len(records), image_path, split, captions, objects))
    return records


def _sentence(sentence: Any, file: Path, where: str) -> str:
    if not isinstance(sentence, dict):
        raise _error(file, where, "expected an object with 'raw' or 'tokens'")
    raw = sentence.get("raw")
    if not (isinstance(raw, str) and raw.strip()):
        tokens = sentence.get("tokens")
        raw = " ".join(tokens) if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens) else raw
    return _caption(raw, file, where)


def _object(entry: Any, file: Path, where: str) -> ObjectBox:
    box = _key(entry, "box", list, file, where)
    if (len(box) != 4 or not all(isinstance(v, int | float) and abs(v) < 1e9 for v in box)
            or box[0] > box[2] or box[1] > box[3]):
        raise _error(file, where, f"box must be [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1, got {box}")
    label = entry.get("label") or " ".join(str(entry[k]) for k in ("size", "colour", "shape") if k in entry)
    words = entry.get("words") or []
    if not isinstance(label, str) or not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise _error(file, where, "'label' must be a string and 'words' a list of strings")
    for text in (label, *words):
        _text(text, file, where, "object label or words")
    return ObjectBox(tuple(float(v) for v in box), label, list(words))  # type: ignore[arg-type]


def read_coco_annotations(path: Path, doc: Any = None) -> tuple[dict[str, list[str]], int]:
    """Captions per image of a COCO caption annotation JSON, and how many images had none."""
    doc = _load_json(path) if doc is None else doc
    images = _key(doc, "images", list, path, "top level")
    annotations = _key(doc, "annotations", list, path, "top level")
    file_of: dict[int, str] = {}
    for i, image in enumerate(images):
        image_id = _key(image, "id", int, path, f"images[{i}]")
        if image_id in file_of:
            raise _error(path, f"images[{i}]", f"image id {image_id} appears twice")
        file_of[image_id] = safe_image_path(_key(image, "file_name", str, path, f"images[{i}]"), path, f"images[{i}]")
    captions: dict[int, list[str]] = {}
    for j, annotation in enumerate(annotations):
        where = f"annotations[{j}]"
        image_id = _key(annotation, "image_id", int, path, where)
        if image_id not in file_of:
            raise _error(path, where, f"image_id {image_id} is not in images[]")
        captions.setdefault(image_id, []).append(_caption(annotation.get("caption"), path, where))
    by_path = {file_of[i]: captions[i] for i in file_of if i in captions}
    return by_path, len(file_of) - len(by_path)


def read_flickr_captions_txt(path: Path) -> dict[str, list[str]]:
    """Captions per image of a Kaggle Flickr ``captions.txt`` (CSV, header ``image,caption``)."""
    by_path: dict[str, list[str]] = {}
    header_line, header, rows = _csv_header_and_rows(path)
    if [c.strip().lower() for c in header] != ["image", "caption"]:
        raise _error(path, f"line {header_line}", f"expected the header image,caption, got {','.join(header)}")
    unquoted = 0
    for line, row in rows:
        row, joined = _image_caption_row(row, path, line)
        unquoted += joined
        image = safe_image_path(row[0], path, f"line {line}")
        by_path.setdefault(image, []).append(_caption(row[1], path, f"line {line}"))
    _note_unquoted(path, unquoted)
    return by_path


def _image_caption_row(row: list[str], path: Path, line: int) -> tuple[list[str], bool]:
    """An ``image,caption`` row, liberal where that is unambiguous: a caption written with unquoted commas
    (``f"{image},{caption}"`` in a notebook) splits into more cells; when the first cell is an image file name,
    everything after the first comma is the caption. Returns the row and whether it was joined."""
    if len(row) == 2:
        return row, False
    if len(row) > 2 and _looks_like_image(row[0]):
        return [row[0], ",".join(row[1:])], True
    raise _error(path, f"line {line}", f"expected 2 columns (image,caption), got {len(row)}")


def _looks_like_image(name: str) -> bool:
    return bool(re.search(r"\.(jpe?g|png|webp|gif|bmp|tiff?)$", name.strip(), re.IGNORECASE))


def _note_unquoted(path: Path, n_rows: int) -> None:
    if n_rows:
        log.warning("%s: %d rows have more than 2 columns (captions with unquoted commas); read each as the image "
                    "name, then everything after the first comma as the caption", path, n_rows)


def read_flickr_token(path: Path) -> dict[str, list[str]]:
    """Captions per image of ``Flickr8k.token.txt`` (``<file>#<n>\\t<caption>`` lines)."""
    by_path: dict[str, list[str]] = {}
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        if not tab:
            raise _error(path, f"line {n}", "no tab between '<file>#<n>' and the caption")
        match = re.fullmatch(r"(.+)#\d+", key.strip())
        if match is None:
            raise _error(path, f"line {n}", f"expected '<file>#<n>' before the tab, got {key!r}")
        image = safe_image_path(match.group(1), path, f"line {n}")
        by_path.setdefault(image, []).append(_caption(caption, path, f"line {n}"))
    return by_path


def read_pairs(path: Path, format: CaptionFormat) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Captions per image of a user's CSV or JSONL, and the split of each image when the file names one."""
    by_path: dict[str, list[str]] = {}
    splits: dict[str, str] = {}

    def add(image_raw: object, captions: list[str], split_raw: object, where: str) -> None:
        image = safe_image_path(image_raw, path, where)
        by_path.setdefault(image, []).extend(captions)
        if split_raw is None:
            return
        split = _split_name(split_raw, path, where)
        if splits.setdefault(image, split) != split:
            raise _error(path, where, f"{image} was already put in split {splits[image]!r}")

    if format is CaptionFormat.pairs_csv:
        header_line, header, rows = _csv_header_and_rows(path)
        columns = {name.strip().lower(): i for i, name in enumerate(header)}
        if "image" not in columns or "caption" not in columns:
            raise _error(path, f"line {header_line}", f"the header must name 'image' and 'caption' columns, "
                                                      f"got {','.join(header)}")
        two_columns = [name.strip().lower() for name in header] == ["image", "caption"]
        unquoted = 0
        for line, row in rows:
            if two_columns:
                row, joined = _image_caption_row(row, path, line)
                unquoted += joined
            elif len(row) != len(header):
                raise _error(path, f"line {line}", f"expected {len(header)} columns, got {len(row)}")
            split = row[columns["split"]].strip() if "split" in columns else None
            add(row[columns["image"]], [_caption(row[columns["caption"]], path, f"line {line}")], split,
                f"line {line}")
        _note_unquoted(path, unquoted)
    else:
        for n, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            entry = _parse_json(line, path, n)
            where = f"line {n}"
            if isinstance(entry, dict) and "captions" in entry:
                raw_captions = _key(entry, "captions", list, path, where)
                if not raw_captions:
                    raise _error(path, where, "the captions list is empty; give each image at least one caption")
                captions = [_caption(c, path, f"{where} caption {k + 1}") for k, c in enumerate(raw_captions)]
            else:
                captions = [_caption(_key(entry, "caption", str, path, where), path, where)]
            add(entry.get("image"), captions, entry.get("split"), where)
    if splits and len(splits) != len(by_path):
        missing = next(image for image in by_path if image not in splits)
        raise SatcliError(f"some images have a split and some do not (for example {missing})", path=path)
    return by_path, splits


def _csv_header_and_rows(path: Path) -> tuple[int, list[str], Iterator[tuple[int, list[str]]]]:
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


def read_split_files(directory: Path) -> dict[str, str]:
    """Image → split from the official ``Flickr_8k.{train,dev,test}Images.txt`` files in ``directory``."""
    split_of: dict[str, str] = {}
    for split, name in FLICKR_SPLIT_FILES.items():
        path = directory / name
        if not path.is_file():
            raise SatcliError(f"missing split file {name} (expected all of {', '.join(FLICKR_SPLIT_FILES.values())})",
                              path=directory)
        for n, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            image = safe_image_path(line, path, f"line {n}")
            if split_of.setdefault(image, split) != split:
                raise _error(path, f"line {n}", f"{image} is also in the {split_of[image]} split")
    return split_of


def find_split_files(captions: Path) -> Path | None:
    """The directory beside ``captions`` holding the Flickr split files, if they are all there."""
    directory = captions.parent
    return directory if all((directory / name).is_file() for name in FLICKR_SPLIT_FILES.values()) else None


def seeded_split(images: Sequence[str], seed: int, proportions: tuple[int, int, int]) -> dict[str, str]:
    """A reproducible random split in ``proportions`` (train, val, test); independent of the images' order.

    With three or more images, val and test get at least one each.
    """
    order = sorted(images)
    random.Random(seed).shuffle(order)
    total = sum(proportions)
    n_val = round(len(order) * proportions[1] / total)
    n_test = round(len(order) * proportions[2] / total)
    if len(order) >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
    split_of = dict.fromkeys(order[:n_test], "test")
    split_of.update(dict.fromkeys(order[n_test:n_test + n_val], "val"))
    split_of.update(dict.fromkeys(order[n_test + n_val:], "train"))
    return split_of


# ----------------------------------------------------------------------------------------------------------
# The entry point


def read_dataset(kind: DatasetKind, captions: Path, *, splits_dir: Path | None = None, seed: int = 0) -> SourceDataset:
    """Read ``captions`` as ``--dataset kind`` (detecting the layout) into records with their splits."""
    if not captions.is_file():
        raise SatcliError("caption file not found", path=captions)
    format, doc = _detect(kind, captions)
    if format is CaptionFormat.karpathy:
        if splits_dir is not None:
            log.warning("--splits is ignored: %s carries its own split", captions.name)
        return SourceDataset(format, captions, "the caption file", read_karpathy(captions, doc))

    left_out: Counter[str] = Counter()
    explicit: dict[str, str] = {}
    if format is CaptionFormat.coco:
        by_path, n_uncaptioned = read_coco_annotations(captions, doc)
        left_out["no captions"] += n_uncaptioned
    elif format is CaptionFormat.flickr_csv:
        by_path = read_flickr_captions_txt(captions)
    elif format is CaptionFormat.flickr_token:
        by_path = read_flickr_token(captions)
    else:
        by_path, explicit = read_pairs(captions, format)

    if format in (CaptionFormat.flickr_csv, CaptionFormat.flickr_token):
        splits_dir = splits_dir or find_split_files(captions)
    elif splits_dir is not None:
        log.warning("--splits is ignored: it applies to Flickr caption files")
        splits_dir = None

    if splits_dir is not None:
        split_of = read_split_files(splits_dir)
        split_source = f"split files in {splits_dir}"
        not_captioned = sum(1 for image in split_of if image not in by_path)
        if not_captioned:
            log.warning("%d images in the split files have no captions in %s", not_captioned, captions.name)
    elif explicit:
        split_of, split_source = explicit, "the caption file"
    else:
        proportions = FLICKR_PROPORTIONS if format in _FLICKR_FORMATS else PAIRS_PROPORTIONS
        split_of = seeded_split(list(by_path), seed, proportions)
        split_source = f"seeded random split (seed {seed}, proportions {'/'.join(map(str, proportions))})"

    records = []
    for image, image_captions in by_path.items():
        if image not in split_of:
            left_out["not in a split file"] += 1
            continue
        records.append(ImageRecord(len(records), image, split_of[image], image_captions))
    if not records:
        raise SatcliError("no captioned images to preprocess", path=captions)
    return SourceDataset(format, captions, split_source, records, dict(left_out))
