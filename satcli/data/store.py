"""The preprocessed dataset store, ``<data-root>/<NAME>/``: written by ``satcli preprocess``, read by training.

Files (docs/datasets.md has the full description):

- ``vocab.json``: the word list in id order (``<pad> <start> <end> <unk>`` first).
- ``train.parquet``, ``val.parquet``, ``test.parquet``: one row per image, schema :data:`SCHEMA`, written in
  row groups as images are encoded, so neither writing nor reading ever holds a whole split in memory.
- ``meta.json``: source, counts, vocabulary size, unknown-word rate, skipped images, image size, options.
  It is written last: a store without it is incomplete and is refused.

:class:`StoreWriter` builds a store in a temporary directory inside ``NAME/`` and moves the files into place at
the end; :class:`StoredDataset` opens one for reading.
"""

from __future__ import annotations

import difflib
import io
import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from satcli.core.atomic import move_into_place
from satcli.core.errors import SatcliError, first_line
from satcli.data.images import open_image_file
from satcli.data.vocab import Vocabulary

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test", "heldout")  # heldout: the shapes test in a held-out appearance
META_FILE = "meta.json"
VOCAB_FILE = "vocab.json"
PARTIAL_PREFIX = ".partial-"

OBJECT_TYPE = pa.struct([
    ("box", pa.list_(pa.float32())),  # x0, y0, x1, y1 as fractions of the width and height
    ("label", pa.string()),
    ("words", pa.list_(pa.string())),  # caption words that refer to this object
])
SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),  # unique across the splits of a store
        ("path", pa.string()),  # source image, relative to the images directory
        ("width", pa.int32()),  # of the source image, upright
        ("height", pa.int32()),
        ("image", pa.binary()),  # JPEG, resized (squashed, not cropped) to image_size × image_size
        ("captions", pa.list_(pa.string())),  # raw
        ("token_ids", pa.list_(pa.list_(pa.int32()))),  # Vocabulary.encode of each caption: <start> … <end>
        ("objects", pa.list_(OBJECT_TYPE)),  # empty unless the dataset has object boxes (shapes)
    ],
    metadata={"satcli_store_format": str(FORMAT_VERSION)},
)
TEXT_COLUMNS = ("image_id", "path", "captions", "token_ids")  # everything but the pixels: cheap to read


def split_file(split: str) -> str:
    return f"{split}.parquet"


class DatasetKind(str, Enum):
    """What ``satcli preprocess --dataset`` accepts: the kind of dataset a store is made from (its meta.json's
    ``dataset``). The readers of each kind are in :mod:`satcli.data.datasets`."""

    flickr8k = "flickr8k"
    flickr30k = "flickr30k"
    coco = "coco"
    karpathy = "karpathy"
    captions_csv = "captions-csv"
    shapes = "shapes"


@dataclass
class StoredObject:
    """An object box, normalised to [0, 1]."""

    box: tuple[float, float, float, float]
    label: str
    words: list[str] = field(default_factory=list)


@dataclass
class StoredImage:
    """One row of a split table."""

    image_id: int
    path: str
    width: int
    height: int
    image: bytes
    captions: list[str]
    token_ids: list[list[int]]
    objects: list[StoredObject] = field(default_factory=list)


def _table(rows: Sequence[StoredImage]) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [getattr(row, name) for row in rows] for name in SCHEMA.names}
    columns["objects"] = [
        [{"box": list(o.box), "label": o.label, "words": o.words} for o in row.objects] for row in rows
    ]
    return pa.Table.from_pydict(columns, schema=SCHEMA)


# ----------------------------------------------------------------------------------------------------------
# Writing


class StoreWriter:
    """Writes one store: rows go to per-split Parquet files in a temporary directory, one row group per
    ``row_group_size`` images; :meth:`commit` moves the files into ``root`` with ``meta.json`` last.

    Use as a context manager: leaving it without a commit (an error, Ctrl-C) removes the temporary files and
    leaves any previous store as it was.
    """

    def __init__(self, root: Path, row_group_size: int = 256):
        self.root = root
        self.row_group_size = row_group_size
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{PARTIAL_PREFIX}*"):  # left by a preprocess that was killed
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=PARTIAL_PREFIX, dir=root))
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._pending: dict[str, list[StoredImage]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self._committed = False

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._committed:
            self.abort()

    def add(self, split: str, row: StoredImage) -> None:
        """Queue one image; a full row group is written at once."""
        pending = self._pending.setdefault(split, [])
        pending.append(row)
        counts = self.counts.setdefault(split, {"images": 0, "captions": 0, "row_groups": 0})
        counts["images"] += 1
        counts["captions"] += len(row.captions)
        if len(pending) >= self.row_group_size:
            self._flush(split)

    def _flush(self, split: str) -> None:
        rows = self._pending.get(split)
        if not rows:
            return
        if split not in self._writers:
            self._writers[split] = pq.ParquetWriter(
                self.tmp / split_file(split), SCHEMA, compression={n: "none" if n == "image" else "zstd"
                                                                   for n in SCHEMA.names},
                use_dictionary=["path"], write_statistics=["image_id"])
        self._writers[split].write_table(_table(rows), row_group_size=len(rows))
        self.counts[split]["row_groups"] += 1
        rows.clear()

    def commit(self, vocab: Vocabulary, meta: dict[str, Any]) -> Path:
        """Finish the files, write ``vocab.json`` and ``meta.json`` (``meta`` plus each split's file, images,
        captions and row groups, merged into ``meta["splits"]``), and move them into place. Returns the store."""
        for split in list(self._pending):
            self._flush(split)
        for writer in self._writers.values():
            writer.close()
        extra = meta.get("splits", {})
        splits = {s: {"file": split_file(s), **self.counts[s], **extra.get(s, {})}
                  for s in SPLITS if s in self._writers}
        meta = {"format_version": FORMAT_VERSION, **meta, "splits": splits}
        (self.tmp / VOCAB_FILE).write_text(json.dumps(vocab.to_list(), ensure_ascii=False))
        (self.tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        # From here until meta.json lands, the store is visibly incomplete rather than silently mixed.
        (self.root / META_FILE).unlink(missing_ok=True)
        for split in SPLITS:
            if split not in splits:
                (self.root / split_file(split)).unlink(missing_ok=True)
        for name in [VOCAB_FILE, *(split_file(s) for s in splits), META_FILE]:
            move_into_place(self.tmp / name, self.root / name)  # synced, so meta.json never lands before its data
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._committed = True
        return self.root

    def abort(self) -> None:
        """Drop everything written so far."""
        for writer in self._writers.values():
            try:
                writer.close()
            except Exception:  # already failing; the files are removed anyway
                pass
        self._writers.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class StoredDataset:
    """A preprocessed dataset opened for reading. Row data is streamed from Parquet, never loaded whole.

    ``meta`` is the parsed ``meta.json``, ``vocab`` the :class:`Vocabulary` the ``token_ids`` were encoded with.
    """

    root: Path
    meta: dict[str, Any]
    vocab: Vocabulary

    @classmethod
    def open(cls, data_root: Path, name: str) -> StoredDataset:
        """The store ``data_root/name``, checked to be complete; a clear error says how to make it if not."""
        root = Path(data_root) / name
        hint = _preprocess_hint(name)
        if not root.is_dir():
            raise SatcliError(f"no preprocessed dataset {name!r} here{_did_you_mean(Path(data_root), name)}; {hint}",
                              path=root)
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise SatcliError(f"incomplete preprocessed dataset (no {META_FILE}: preprocessing never finished); "
                              f"{hint}", path=root)
        meta = _read_json(meta_path, dict)
        if meta.get("format_version") != FORMAT_VERSION:
            raise SatcliError(f"store format {meta.get('format_version')!r}, this satcli reads {FORMAT_VERSION}; "
                              f"{hint} again", path=meta_path)
        try:
            vocab = Vocabulary(_read_json(root / VOCAB_FILE, list))
        except (ValueError, TypeError) as error:
            raise SatcliError(f"not a satcli vocabulary ({error})", path=root / VOCAB_FILE) from None
        dataset = cls(root, meta, vocab)
        for split in dataset.splits:
            path = dataset.path(split)
            try:
                schema = pq.read_schema(path)
            except (OSError, pa.ArrowException) as error:
                raise SatcliError(f"unreadable split file ({error}); {hint} again", path=path) from None
            if not schema.remove_metadata().equals(SCHEMA.remove_metadata()):
                raise SatcliError(f"unexpected columns; {hint} again", path=path)
        return dataset

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def splits(self) -> list[str]:
        """The splits this store has, in train/val/test order."""
        return [s for s in SPLITS if s in self.meta.get("splits", {})]

    @property
    def image_size(self) -> int:
        """Side of the stored (square) images, in pixels."""
        return int(self.meta["image_size"])

    def path(self, split: str) -> Path:
        if split not in self.splits:
            raise SatcliError(f"dataset {self.name!r} has no {split!r} split (it has: {', '.join(self.splits)})",
                              path=self.root)
        return self.root / split_file(split)

    def n_images(self, split: str) -> int:
        return pq.ParquetFile(self.path(split)).metadata.num_rows

    def n_captions(self, split: str) -> int:
        self.path(split)  # a clear error for a split the store lacks
        return int(self.meta["splits"][split]["captions"])

    def iter_batches(self, split: str, batch_size: int = 64,
                     columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream a split as record batches of ``batch_size`` rows, reading only ``columns`` (all by default).

        Memory stays at about one row group whatever the split's size.
        """
        file = pq.ParquetFile(self.path(split))
        yield from file.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None)

    def read(self, split: str, columns: Sequence[str] = TEXT_COLUMNS) -> pa.Table:
        """A whole split, but only ``columns``: by default everything except the image bytes."""
        return pq.read_table(self.path(split), columns=list(columns))

    def captions(self, split: str) -> list[list[str]]:
        """Raw reference captions of every image of ``split``, in row order (no image bytes are read)."""
        return self.read(split, ["captions"]).column("captions").to_pylist()

    def token_ids(self, split: str) -> list[list[list[int]]]:
        """Encoded captions of every image of ``split``, in row order (no image bytes are read)."""
        return self.read(split, ["token_ids"]).column("token_ids").to_pylist()

    @staticmethod
    def decode_image(data: bytes) -> Image.Image:
        """A stored image (the ``image`` column) as an RGB picture of ``image_size`` × ``image_size``."""
        with open_image_file(io.BytesIO(data)) as image:
            return image.convert("RGB")


def _did_you_mean(data_root: Path, name: str) -> str:
    """", did you mean 'shapes'?" when a store under ``data_root`` has a close name, else the stores there."""
    try:
        names = sorted(p.name for p in data_root.iterdir() if (p / META_FILE).is_file())
    except OSError:
        return ""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (it holds {', '.join(map(repr, names[:8]))}{', ...' if len(names) > 8 else ''})" if names else ""


def _preprocess_hint(name: str) -> str:
    if name == "shapes":
        return "run `satcli preprocess --dataset shapes`"
    if name in {kind.value for kind in DatasetKind}:
        return f"run `satcli preprocess --dataset {name} --images DIR --captions FILE`"
    return f"run `satcli preprocess --dataset KIND --images DIR --captions FILE --name {name}`"


def _read_json(path: Path, kind: type) -> Any:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SatcliError("missing; the store is incomplete, run `satcli preprocess` again", path=path) from None
    except (OSError, ValueError, RecursionError) as error:  # RecursionError: nested too deeply
        reason = first_line(error, empty="nested too deeply")
        raise SatcliError(f"unreadable ({reason})", path=path) from None
    if not isinstance(value, kind):
        raise SatcliError(f"expected a JSON {kind.__name__}", path=path)
    return value
