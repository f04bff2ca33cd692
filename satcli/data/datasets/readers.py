"""The caption-format readers: Karpathy JSON, COCO annotations, Flickr ``captions.txt`` and token files, and a
user's own CSV or JSONL (see :mod:`satcli.data.datasets` for the formats and how they are split)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from satcli.core.errors import SatcliError
from satcli.data.datasets.records import (
    CaptionFormat,
    ImageRecord,
    ObjectBox,
    clean_caption,
    csv_header_and_rows,
    entry_error,
    load_json,
    parse_json,
    read_text,
    required_field,
    safe_image_path,
    split_name,
    storable_text,
)

log = logging.getLogger(__name__)

# Formats with their own split return records; the others return captions per image, in file order.


def read_karpathy(path: Path, doc: Any = None) -> list[ImageRecord]:
    """Records of a Karpathy split JSON (and of the shapes dataset, which adds ``objects``).

    ``doc`` is the file's already parsed content, if the caller has it.
    """
    doc = load_json(path) if doc is None else doc
    images = required_field(doc, "images", list, path, "top level")
    records = []
    for i, entry in enumerate(images):
        where = f"images[{i}]"
        filename = required_field(entry, "filename", str, path, where)
        filepath = entry.get("filepath") or ""
        if not isinstance(filepath, str):
            raise entry_error(path, where, "field 'filepath' is not a string")
        image_path = safe_image_path(f"{filepath}/{filename}" if filepath else filename, path, where)
        split = split_name(required_field(entry, "split", str, path, where), path, where)
        sentences = required_field(entry, "sentences", list, path, where)
        if not sentences:
            raise entry_error(path, where, "no sentences")
        captions = [_sentence(s, path, f"{where}.sentences[{j}]") for j, s in enumerate(sentences)]
        objects = [_object(o, path, f"{where}.objects[{j}]") for j, o in enumerate(entry.get("objects") or [])]
        records.append(ImageRecord(len(records), image_path, split, captions, objects))
    return records


def _sentence(sentence: Any, file: Path, where: str) -> str:
    if not isinstance(sentence, dict):
        raise entry_error(file, where, "expected an object with 'raw' or 'tokens'")
    raw = sentence.get("raw")
    if not (isinstance(raw, str) and raw.strip()):
        tokens = sentence.get("tokens")
        raw = " ".join(tokens) if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens) else raw
    return clean_caption(raw, file, where)


def _object(entry: Any, file: Path, where: str) -> ObjectBox:
    box = required_field(entry, "box", list, file, where)
    if (len(box) != 4 or not all(isinstance(v, int | float) and abs(v) < 1e9 for v in box)
            or box[0] > box[2] or box[1] > box[3]):
        raise entry_error(file, where, f"box must be [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1, got {box}")
    label = entry.get("label") or " ".join(str(entry[k]) for k in ("size", "colour", "shape") if k in entry)
    words = entry.get("words") or []
    if not isinstance(label, str) or not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise entry_error(file, where, "'label' must be a string and 'words' a list of strings")
    for text in (label, *words):
        storable_text(text, file, where, "object label or words")
    return ObjectBox(tuple(float(v) for v in box), label, list(words))  # type: ignore[arg-type]


def read_coco_annotations(path: Path, doc: Any = None) -> tuple[dict[str, list[str]], int]:
    """Captions per image of a COCO caption annotation JSON, and how many images had none."""
    doc = load_json(path) if doc is None else doc
    images = required_field(doc, "images", list, path, "top level")
    annotations = required_field(doc, "annotations", list, path, "top level")
    file_of: dict[int, str] = {}
    for i, image in enumerate(images):
        image_id = required_field(image, "id", int, path, f"images[{i}]")
        if image_id in file_of:
            raise entry_error(path, f"images[{i}]", f"image id {image_id} appears twice")
        file_name = required_field(image, "file_name", str, path, f"images[{i}]")
        file_of[image_id] = safe_image_path(file_name, path, f"images[{i}]")
    captions: dict[int, list[str]] = {}
    for j, annotation in enumerate(annotations):
        where = f"annotations[{j}]"
        image_id = required_field(annotation, "image_id", int, path, where)
        if image_id not in file_of:
            raise entry_error(path, where, f"image_id {image_id} is not in images[]")
        captions.setdefault(image_id, []).append(clean_caption(annotation.get("caption"), path, where))
    by_path = {file_of[i]: captions[i] for i in file_of if i in captions}
    return by_path, len(file_of) - len(by_path)


def read_flickr_captions_txt(path: Path) -> dict[str, list[str]]:
    """Captions per image of a Kaggle Flickr ``captions.txt`` (CSV, header ``image,caption``)."""
    by_path: dict[str, list[str]] = {}
    header_line, header, rows = csv_header_and_rows(path)
    if [c.strip().lower() for c in header] != ["image", "caption"]:
        raise entry_error(path, f"line {header_line}", f"expected the header image,caption, got {','.join(header)}")
    unquoted = 0
    for line, row in rows:
        row, joined = _image_caption_row(row, path, line)
        unquoted += joined
        image = safe_image_path(row[0], path, f"line {line}")
        by_path.setdefault(image, []).append(clean_caption(row[1], path, f"line {line}"))
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
    raise entry_error(path, f"line {line}", f"expected 2 columns (image,caption), got {len(row)}")


def _looks_like_image(name: str) -> bool:
    return bool(re.search(r"\.(jpe?g|png|webp|gif|bmp|tiff?)$", name.strip(), re.IGNORECASE))


def _note_unquoted(path: Path, n_rows: int) -> None:
    if n_rows:
        log.warning("%s: %d rows have more than 2 columns (captions with unquoted commas); read each as the image "
                    "name, then everything after the first comma as the caption", path, n_rows)


def read_flickr_token(path: Path) -> dict[str, list[str]]:
    """Captions per image of ``Flickr8k.token.txt`` (``<file>#<n>\\t<caption>`` lines)."""
    by_path: dict[str, list[str]] = {}
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        if not tab:
            raise entry_error(path, f"line {n}", "no tab between '<file>#<n>' and the caption")
        match = re.fullmatch(r"(.+)#\d+", key.strip())
        if match is None:
            raise entry_error(path, f"line {n}", f"expected '<file>#<n>' before the tab, got {key!r}")
        image = safe_image_path(match.group(1), path, f"line {n}")
        by_path.setdefault(image, []).append(clean_caption(caption, path, f"line {n}"))
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
        split = split_name(split_raw, path, where)
        if splits.setdefault(image, split) != split:
            raise entry_error(path, where, f"{image} was already put in split {splits[image]!r}")

    if format is CaptionFormat.pairs_csv:
        header_line, header, rows = csv_header_and_rows(path)
        columns = {name.strip().lower(): i for i, name in enumerate(header)}
        if "image" not in columns or "caption" not in columns:
            raise entry_error(path, f"line {header_line}", f"the header must name 'image' and 'caption' columns, "
                                                           f"got {','.join(header)}")
        two_columns = [name.strip().lower() for name in header] == ["image", "caption"]
        unquoted = 0
        for line, row in rows:
            if two_columns:
                row, joined = _image_caption_row(row, path, line)
                unquoted += joined
            elif len(row) != len(header):
                raise entry_error(path, f"line {line}", f"expected {len(header)} columns, got {len(row)}")
            split = row[columns["split"]].strip() if "split" in columns else None
            add(row[columns["image"]], [clean_caption(row[columns["caption"]], path, f"line {line}")], split,
                f"line {line}")
        _note_unquoted(path, unquoted)
    else:
        for n, line in enumerate(read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            entry = parse_json(line, path, n)
            where = f"line {n}"
            if isinstance(entry, dict) and "captions" in entry:
                raw_captions = required_field(entry, "captions", list, path, where)
                if not raw_captions:
                    raise entry_error(path, where, "the captions list is empty; give each image at least one caption")
                captions = [clean_caption(c, path, f"{where} caption {k + 1}") for k, c in enumerate(raw_captions)]
            else:
                captions = [clean_caption(required_field(entry, "caption", str, path, where), path, where)]
            add(entry.get("image"), captions, entry.get("split"), where)
    if splits and len(splits) != len(by_path):
        missing = next(image for image in by_path if image not in splits)
        raise SatcliError(f"some images have a split and some do not (for example {missing})", path=path)
    return by_path, splits


