"""Reading every caption format satcli knows into the same list of :class:`ImageRecord`: detect the format,
read it (:mod:`satcli.data.datasets.readers`) and split it.

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

import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from satcli.core.errors import SatcliError
from satcli.data.datasets.readers import (
    read_coco_annotations,
    read_flickr_captions_txt,
    read_flickr_token,
    read_karpathy,
    read_pairs,
)
from satcli.data.datasets.records import (
    CaptionFormat,
    ImageRecord,
    SourceDataset,
    entry_error,
    load_json,
    read_text,
    safe_image_path,
)
from satcli.data.store import DatasetKind

log = logging.getLogger(__name__)

FLICKR_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
FLICKR_PROPORTIONS = (6000, 1000, 1000)  # train/val/test of the official Flickr8k split
PAIRS_PROPORTIONS = (8, 1, 1)  # a user's own photos, and COCO annotation files (which carry no split)

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
        doc = load_json(captions)
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
# Splits: the official Flickr split files, or a seeded random split


def read_split_files(directory: Path) -> dict[str, str]:
    """Image → split from the official ``Flickr_8k.{train,dev,test}Images.txt`` files in ``directory``."""
    split_of: dict[str, str] = {}
    for split, name in FLICKR_SPLIT_FILES.items():
        path = directory / name
        if not path.is_file():
            raise SatcliError(f"missing split file {name} (expected all of {', '.join(FLICKR_SPLIT_FILES.values())})",
                              path=directory)
        for n, line in enumerate(read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            image = safe_image_path(line, path, f"line {n}")
            if split_of.setdefault(image, split) != split:
                raise entry_error(path, f"line {n}", f"{image} is also in the {split_of[image]} split")
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
