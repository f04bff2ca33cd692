"""``satcli preprocess``: read a captioned image dataset and write the store that training reads.

One pass over the images, in split order: each image is decoded, made upright RGB, squashed to
``image_size`` × ``image_size`` and re-encoded as JPEG in a small thread pool (Pillow releases the GIL), and the
rows stream into Parquet row groups. The vocabulary is counted from the training captions before that pass.
Images that are missing or unreadable are skipped, counted and reported; only a dataset where none can be read
is an error.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from PIL import Image
from rich.table import Table

from satcli.core.console import make_progress, shown
from satcli.core.errors import SatcliError
from satcli.core.version import __version__
from satcli.data import shapes
from satcli.data.datasets import read_dataset
from satcli.data.datasets.records import CaptionFormat, ImageRecord, SourceDataset
from satcli.data.images import ImageError, load_image
from satcli.data.store import SPLITS, DatasetKind, StoredImage, StoredObject, StoreWriter
from satcli.data.text import tokenize
from satcli.data.vocab import UNK_ID, Vocabulary

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_N_WARNINGS = 5  # skipped images named one by one; the rest are counted


@dataclass(frozen=True)
class PreprocessOptions:
    """Everything ``satcli preprocess`` needs. ``n_train``, ``n_val``, ``n_test``, ``n_heldout``: shapes only."""

    dataset: DatasetKind = DatasetKind.shapes
    images: Path | None = None
    captions: Path | None = None
    splits: Path | None = None
    name: str | None = None
    data_root: Path = Path("data")
    instances: Path | None = None  # COCO instance annotations: the images' objects, for `evaluate --objects`
    min_word_freq: int = 5
    max_caption_length: int = 50
    image_size: int = 256
    seed: int = 0
    n_train: int = 4000
    n_val: int = 300
    n_test: int = 300
    n_heldout: int = 0  # `satcli preprocess` and the demo draw 300
    jpeg_quality: int = 95
    row_group_size: int = 256
    n_workers: int = 0  # 0: up to 4, as many as there are CPU cores

    @property
    def store_name(self) -> str:
        return self.name or self.dataset.value


@dataclass
class SplitReport:
    """Counts for one split: images and captions stored, images skipped, caption words and unknown ones."""

    n_images: int = 0
    n_captions: int = 0
    n_skipped: int = 0
    n_words: int = 0
    n_unknown: int = 0

    @property
    def unknown_word_rate(self) -> float:
        return self.n_unknown / self.n_words if self.n_words else 0.0


@dataclass
class PreprocessResult:
    """What ``run`` wrote, for the summary and for tests."""

    store: Path
    splits: dict[str, SplitReport]
    vocab_size: int
    n_truncated_captions: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason → images listed but unreadable
    left_out: dict[str, int] = field(default_factory=dict)  # reason → images the caption file did not place

    @property
    def unknown_word_rate(self) -> float:
        n_words = sum(s.n_words for s in self.splits.values())
        return sum(s.n_unknown for s in self.splits.values()) / n_words if n_words else 0.0


def preprocess(options: PreprocessOptions) -> PreprocessResult:
    """Preprocess ``options.dataset`` into ``data_root/NAME/``, showing progress; :func:`summary_table` shows the
    result."""
    _check(options)
    root = options.data_root / options.store_name
    images_dir, captions = _source_files(options, root)
    source = read_dataset(options.dataset, captions, splits_dir=options.splits, seed=options.seed)
    if options.instances is not None:
        _attach_instances(source, options.instances)
    log.info("Read %d images from %s (%s; split: %s)", len(source.records), captions, source.format.value,
             source.split_source)
    vocab = _build_vocab(source, options)

    reports = {split: SplitReport() for split in SPLITS}
    skipped: Counter[str] = Counter()
    truncated = 0
    with StoreWriter(root, options.row_group_size) as writer, make_progress() as progress:
        task = progress.add_task("Encoding images", total=len(source.records), unit="images")
        for split in SPLITS:
            records = source.split_records(split)
            encoded = _ordered_map(lambda r: _encode(images_dir / r.path, options), records, _n_workers(options))
            for record, image in zip(records, encoded, strict=True):
                progress.advance(task)
                report = reports[split]
                if isinstance(image, _Skip):
                    report.n_skipped += 1
                    skipped[image.reason] += 1
                    level = logging.WARNING if sum(skipped.values()) <= _N_WARNINGS else logging.DEBUG
                    log.log(level, "Skipping %s: %s", images_dir / record.path, image.detail)
                    continue
                row, n_truncated = _row(record, image, vocab, options.max_caption_length, report)
                truncated += n_truncated
                writer.add(split, row)
        n_written = sum(r.n_images for r in reports.values())
        if n_written == 0:
            raise SatcliError(f"none of the {len(source.records)} listed images could be read "
                              f"({_reasons(skipped)}); is this the folder the paths in {captions.name} are "
                              "relative to?", path=images_dir)
        result = PreprocessResult(root, {s: r for s, r in reports.items() if r.n_images}, len(vocab), truncated,
                                  dict(skipped), source.left_out)
        writer.commit(vocab, _meta(options, source, images_dir, result))
    if skipped:
        log.warning("Skipped %d images: %s", sum(skipped.values()), _reasons(skipped))
    return result


def _check(options: PreprocessOptions) -> None:
    if not _NAME.fullmatch(options.store_name):
        raise SatcliError(f"--name {options.store_name!r} must be a plain directory name "
                          "(letters, digits, '.', '_', '-')")
    for flag, value, low in [("--image-size", options.image_size, 16), ("--min-word-freq", options.min_word_freq, 1),
                             ("--max-caption-length", options.max_caption_length, 1)]:
        if value < low:
            raise SatcliError(f"{flag} must be at least {low}, got {value}")
    if options.images is not None and not options.images.is_dir():
        raise SatcliError("images directory not found", path=options.images)
    if options.captions is not None and not options.captions.is_file():
        raise SatcliError("caption file not found", path=options.captions)
    if options.splits is not None and not options.splits.is_dir():
        raise SatcliError("split directory not found", path=options.splits)


def _attach_instances(source: SourceDataset, path: Path) -> None:
    from satcli.data.instances import attach_instances

    if source.format not in (CaptionFormat.coco, CaptionFormat.karpathy):
        raise SatcliError("--instances takes COCO instance annotations, for COCO captions (a COCO caption file "
                          "or dataset_coco.json)", path=path)
    matched = attach_instances(source.records, path)
    if matched == 0:
        raise SatcliError(f"none of the {len(source.records)} images of {source.captions_file.name} is in this "
                          "instance file (images are matched by file name)", path=path)
    log.info("Objects from %s for %d of %d images", path.name, matched, len(source.records))


def _source_files(options: PreprocessOptions, root: Path) -> tuple[Path, Path]:
    """The images directory and caption file; for ``shapes`` without them, generated under ``root/source``."""
    if options.images is not None and options.captions is not None:
        return options.images, options.captions
    if options.dataset is not DatasetKind.shapes:
        raise SatcliError(f"--dataset {options.dataset.value} needs --images DIR (the photos) and --captions FILE "
                          "(see docs/datasets.md)")
    if options.images is not None or options.captions is not None:
        raise SatcliError("--dataset shapes takes both --images and --captions (a generated source), or neither")
    shapes_options = shapes.ShapesOptions(n_train=options.n_train, n_val=options.n_val, n_test=options.n_test,
                                          n_heldout=options.n_heldout, seed=options.seed)
    if shapes_options.n_images == 0:
        raise SatcliError("--n-train, --n-val, --n-test and --n-heldout are all 0: nothing to generate")
    with make_progress() as progress:
        task = progress.add_task("Drawing shapes", total=shapes_options.n_images, unit="images")
        json_path = shapes.ensure_generated(root / "source", shapes_options, lambda: progress.advance(task))
    return json_path.parent, json_path


def _build_vocab(source: SourceDataset, options: PreprocessOptions) -> Vocabulary:
    """Words of the training captions (cut to the maximum length) seen at least ``min_word_freq`` times."""
    records = source.split_records("train")
    if not records:
        log.warning("No training split: building the vocabulary from all captions")
        records = source.records
    captions = (tokenize(c)[: options.max_caption_length] for r in records for c in r.captions)
    return Vocabulary.build(captions, min_freq=options.min_word_freq)


# ----------------------------------------------------------------------------------------------------------
# One image


@dataclass
class _Encoded:
    data: bytes
    width: int
    height: int


@dataclass
class _Skip:
    reason: str
    detail: str


def _encode(path: Path, options: PreprocessOptions) -> _Encoded | _Skip:
    """The image at ``path`` squashed to ``image_size`` square and re-encoded, or why it cannot be."""
    size = options.image_size
    if not path.is_file():
        return _Skip("missing", "file not found")
    try:
        loaded = load_image(path, min_size=size)
    except ImageError as error:
        return _Skip(error.kind, error.reason)
    buffer = io.BytesIO()
    loaded.image.resize((size, size), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=options.jpeg_quality)
    return _Encoded(buffer.getvalue(), loaded.width, loaded.height)


def _row(record: ImageRecord, image: _Encoded, vocab: Vocabulary, max_length: int,
         report: SplitReport) -> tuple[StoredImage, int]:
    """The store row of one image (and how many of its captions were cut); counts words into ``report``."""
    token_ids, n_truncated = [], 0
    for caption in record.captions:
        tokens = tokenize(caption)
        n_truncated += len(tokens) > max_length
        ids = vocab.encode(tokens, max_length)
        token_ids.append(ids)
        report.n_words += len(ids) - 2
        report.n_unknown += sum(1 for i in ids[1:-1] if i == UNK_ID)
    report.n_images += 1
    report.n_captions += len(record.captions)
    objects = [StoredObject(_normalise(o.box, image.width, image.height), o.label, o.words) for o in record.objects]
    row = StoredImage(record.image_id, record.path, image.width, image.height, image.data, record.captions,
                      token_ids, objects)
    return row, n_truncated


def _normalise(box: tuple[float, float, float, float], width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    return (min(max(x0 / width, 0.0), 1.0), min(max(y0 / height, 0.0), 1.0),
            min(max(x1 / width, 0.0), 1.0), min(max(y1 / height, 0.0), 1.0))


T = TypeVar("T")
R = TypeVar("R")


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], n_workers: int) -> Iterator[R]:
    """``map(fn, items)`` on a thread pool, results in input order, at most ``4 × n_workers`` in flight."""
    pending: list[Future[R]] = []
    with ThreadPoolExecutor(n_workers) as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 4 * n_workers:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for future in pending:
                future.cancel()


def _n_workers(options: PreprocessOptions) -> int:
    return options.n_workers or min(4, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------------------
# Reporting


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _meta(options: PreprocessOptions, source: SourceDataset, images_dir: Path, result: PreprocessResult) -> dict:
    return {
        "name": options.store_name,
        "dataset": options.dataset.value,
        "source": {
            "format": source.format.value,
            "captions": str(source.captions_file.resolve()),
            "images": str(images_dir.resolve()),
            "split": source.split_source,
        },
        "splits": {s: {"skipped": r.n_skipped, "unknown_word_rate": round(r.unknown_word_rate, 6)}
                   for s, r in result.splits.items()},
        "vocab_size": result.vocab_size,
        "unknown_word_rate": round(result.unknown_word_rate, 6),
        "truncated_captions": result.n_truncated_captions,
        "skipped_images": {"total": sum(result.skipped.values()), "reasons": result.skipped},
        "left_out_images": {"total": sum(result.left_out.values()), "reasons": result.left_out},
        "image_size": options.image_size,
        "options": {k: (str(v) if isinstance(v, Path) else v.value if isinstance(v, DatasetKind) else v)
                    for k, v in asdict(options).items()},
        "satcli_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def summary_table(result: PreprocessResult, options: PreprocessOptions) -> Table:
    """Images, captions, skipped images and unknown-word rate per split, with the vocabulary in the caption."""
    table = Table(title=f"Preprocessed {shown(options.store_name)} → {shown(result.store)}")
    for column in ("split", "images", "captions", "skipped", "unknown words"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, report in result.splits.items():
        table.add_row(split, f"{report.n_images:,}", f"{report.n_captions:,}", f"{report.n_skipped:,}",
                      f"{report.unknown_word_rate:.2%}")
    totals = [sum(getattr(r, k) for r in result.splits.values()) for k in ("n_images", "n_captions", "n_skipped")]
    table.add_section()
    table.add_row("total", *(f"{n:,}" for n in totals), f"{result.unknown_word_rate:.2%}", style="bold")
    notes = [f"vocabulary: {result.vocab_size:,} words (seen ≥ {options.min_word_freq} times in train)",
             f"captions cut to {options.max_caption_length} words: {result.n_truncated_captions:,}"]
    if result.skipped:
        notes.append(f"skipped images: {_reasons(result.skipped)}")
    if result.left_out:
        notes.append(f"left out: {_reasons(result.left_out)}")
    table.caption = "\n".join(notes)
    return table
